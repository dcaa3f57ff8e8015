//! `cargo bench -p dalp-ops --bench pooling`
//!
//! Short read/write transactions from 200 concurrent clients, directly against PostgreSQL
//! (200 server connections) and through PgBouncer in transaction mode (40 server
//! connections: `dalp pool up`'s default of 20 per process, one process per CPU on this
//! 2-core machine), on the same instance in the same run, then the same with a new
//! connection (TLS + SCRAM) per transaction. Two poolers: the previous setup (one process,
//! TCP + TLS to the server) and the product's (one process per CPU on the port with
//! `so_reuseport`, the server's Unix socket). Prints throughput, latency and the ratios.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dalp_db::connect::ConnectOptions;
use dalp_db::{TypedClient, MIGRATOR_ROLE};
use dalp_ops::embedded::DATABASE;
use dalp_ops::{Instance, Pooler, PoolerSpec, StartOptions};

const CLIENTS: usize = 200;
const ACCOUNTS: i32 = 100_000;
const SECONDS: u64 = 10;

struct Outcome {
    tps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: usize,
}

async fn one_transaction(
    c: &mut tokio_postgres::Client,
    seed: u64,
) -> Result<(), tokio_postgres::Error> {
    let a = (seed % ACCOUNTS as u64) as i32 + 1;
    let b = ((seed * 7919) % ACCOUNTS as u64) as i32 + 1;
    let tx = c.transaction().await?;
    tx.typed_execute(
        "UPDATE bench.accounts SET balance = balance + 1 WHERE id = $1",
        &[&a],
    )
    .await?;
    tx.typed_query_one("SELECT balance FROM bench.accounts WHERE id = $1", &[&b])
        .await?;
    tx.commit().await
}

async fn run(opts: &ConnectOptions, reconnect: bool, seconds: u64) -> Outcome {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    // Connect everyone first, so the measurement is of transactions (or, with `reconnect`,
    // of connect + transaction).
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(if reconnect {
            None
        } else {
            Some(opts.connect().await.expect("connect"))
        });
    }
    let started = Instant::now();
    for (i, client) in clients.into_iter().enumerate() {
        let (stop, opts) = (stop.clone(), opts.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0;
            let mut client = client;
            let mut n = i as u64 * 1_000_003;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let r = async {
                    if reconnect {
                        let mut c = opts.connect().await.map_err(|e| e.to_string())?;
                        one_transaction(&mut c, n).await.map_err(|e| e.to_string())
                    } else {
                        one_transaction(client.as_mut().unwrap(), n)
                            .await
                            .map_err(|e| e.to_string())
                    }
                }
                .await;
                match r {
                    Ok(()) => lat.push(t.elapsed().as_secs_f64() * 1000.0),
                    Err(e) => {
                        if errors == 0 {
                            eprintln!("  client {i}: {e}");
                        }
                        errors += 1;
                    }
                }
                n += 1;
            }
            (lat, errors)
        }));
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.unwrap();
        lat.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    Outcome {
        tps: lat.len() as f64 / elapsed,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        errors,
    }
}

fn pool_total() -> u32 {
    std::env::var("DALP_BENCH_POOL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40)
}

fn print(label: &str, o: &Outcome) {
    println!(
        "  {label:<34} {:>9.0} tx/s   p50 {:>7.2} ms   p99 {:>8.2} ms   errors {}",
        o.tps, o.p50_ms, o.p99_ms, o.errors
    );
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let dir = tempfile::Builder::new()
        .prefix("dalp-bench-pool-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let cluster = Instance::open(dir.path())
        .unwrap()
        .start(StartOptions {
            // Enough for 200 direct clients plus the pooler's and ours.
            max_connections: Some(300),
            // Statement statistics and plans are not what is measured here.
            slow_query_ms: Some(60_000),
            ..Default::default()
        })
        .await
        .unwrap();
    let direct = cluster.role_options(MIGRATOR_ROLE, DATABASE);
    let setup = direct.connect().await.unwrap();
    setup
        .batch_execute(&format!(
            "CREATE SCHEMA bench;
             CREATE TABLE bench.accounts (id int PRIMARY KEY, balance bigint NOT NULL);
             INSERT INTO bench.accounts SELECT g, 0 FROM generate_series(1, {ACCOUNTS}) g;"
        ))
        .await
        .unwrap();
    setup
        .batch_execute("VACUUM ANALYZE bench.accounts")
        .await
        .unwrap();
    drop(setup);
    let users =
        dalp_ops::pooler::scram_verifiers(&cluster.superuser_options("postgres"), &[MIGRATOR_ROLE])
            .await
            .unwrap();
    let start_pooler = |name: &str, socket: bool, processes: u32| {
        let spec = PoolerSpec {
            dir: dir.path().join(name),
            tls_dir: cluster.layout().tls_dir(),
            server_port: cluster.port(),
            server_socket_dir: socket.then(|| cluster.layout().socket_dir()),
            processes,
            port: None,
            // The same server connections in all (40, or DALP_BENCH_POOL), however many
            // processes share them.
            pool_size: (pool_total() / processes.max(1)).max(1),
            max_client_conn: 1000,
            users: users.clone(),
        };
        Pooler::start(spec)
    };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    let old = start_pooler("pgbouncer-tcp", false, 1).await.unwrap();
    let new = start_pooler("pgbouncer-socket", true, cpus).await.unwrap();
    let via_old = old.client_options(&direct);
    let via_new = new.client_options(&direct);
    let new_name = format!("PgBouncer ×{cpus}, Unix socket to the server");

    println!("{CLIENTS} clients, {SECONDS} s each, transaction = UPDATE one row + SELECT another, TLS from every client; {} server connections through either pooler", pool_total());
    // Rounds alternate the order (direct, ×1, ×N, then the reverse), so no mode always
    // runs first or last; throughput is the mean over rounds, latency the worst round's.
    let rounds: usize = std::env::var("DALP_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    for (title, reconnect, secs) in [
        ("persistent client connections:", false, SECONDS),
        (
            "a new connection (TLS + SCRAM) per transaction:",
            true,
            SECONDS / 2,
        ),
    ] {
        println!("{title}");
        let modes: [(&str, &ConnectOptions); 3] = [
            ("direct (200 server connections)", &direct),
            ("PgBouncer ×1, TCP + TLS to the server", &via_old),
            (&new_name, &via_new),
        ];
        let mut runs: Vec<Vec<Outcome>> = vec![Vec::new(), Vec::new(), Vec::new()];
        for round in 0..rounds {
            let order: Vec<usize> = if round % 2 == 0 {
                vec![0, 1, 2]
            } else {
                vec![2, 1, 0]
            };
            for m in order {
                runs[m].push(run(modes[m].1, reconnect, secs).await);
            }
        }
        let merged: Vec<Outcome> = runs
            .iter()
            .map(|r| Outcome {
                tps: r.iter().map(|o| o.tps).sum::<f64>() / r.len() as f64,
                p50_ms: r.iter().map(|o| o.p50_ms).fold(0.0, f64::max),
                p99_ms: r.iter().map(|o| o.p99_ms).fold(0.0, f64::max),
                errors: r.iter().map(|o| o.errors).sum(),
            })
            .collect();
        for (m, o) in merged.iter().enumerate() {
            let each: Vec<String> = runs[m].iter().map(|o| format!("{:.0}", o.tps)).collect();
            print(modes[m].0, o);
            println!("      rounds: {} tx/s", each.join(", "));
        }
        let (d, o, n) = (&merged[0], &merged[1], &merged[2]);
        println!(
            "  ratio {new_name} / direct: {:.2}× throughput, p99 {:.2}×; ×1 TCP + TLS / direct: {:.2}×",
            n.tps / d.tps,
            n.p99_ms / d.p99_ms,
            o.tps / d.tps
        );
    }
    drop(old);
    drop(new);
    cluster.shutdown().unwrap();
}
