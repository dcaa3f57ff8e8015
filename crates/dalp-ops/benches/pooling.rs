//! `cargo bench -p dalp-ops --bench pooling`
//!
//! Short read/write transactions from 200 concurrent clients, directly against PostgreSQL
//! (200 server connections) and through PgBouncer in transaction mode (20 server
//! connections), on the same instance in the same run, then the same with a new
//! connection (TLS + SCRAM) per transaction. Prints throughput, latency and the ratios.

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
    let pooler = Pooler::start(PoolerSpec {
        dir: dir.path().join("pgbouncer"),
        tls_dir: cluster.layout().tls_dir(),
        server_port: cluster.port(),
        port: None,
        pool_size: 20,
        max_client_conn: 1000,
        users,
    })
    .await
    .unwrap();
    let via = pooler.client_options(&direct);

    println!("{CLIENTS} clients, {SECONDS} s each, transaction = UPDATE one row + SELECT another, TLS everywhere");
    println!("persistent client connections:");
    let d = run(&direct, false, SECONDS).await;
    print("direct (200 server connections)", &d);
    let p = run(&via, false, SECONDS).await;
    print("PgBouncer (20 server connections)", &p);
    println!(
        "  ratio PgBouncer / direct: {:.2}× throughput, p99 {:.2}×",
        p.tps / d.tps,
        p.p99_ms / d.p99_ms
    );
    println!("a new connection (TLS + SCRAM) per transaction:");
    let d2 = run(&direct, true, SECONDS / 2).await;
    print("direct", &d2);
    let p2 = run(&via, true, SECONDS / 2).await;
    print("PgBouncer", &p2);
    println!(
        "  ratio PgBouncer / direct: {:.2}× throughput, p99 {:.2}×",
        p2.tps / d2.tps,
        p2.p99_ms / d2.p99_ms
    );
    drop(pooler);
    cluster.shutdown().unwrap();
}
