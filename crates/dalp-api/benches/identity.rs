//! `cargo bench -p dalp-api --bench identity`
//!
//! 1. Session validation latency: the cached path (LISTEN-invalidated cache) against the
//!    uncached database lookup of the same token, in the same run; prints p50/p99 and ratio.
//! 2. Authenticated `GET /api/v1/me` throughput with 64 concurrent clients, with the cache on
//!    and (baseline) with a server whose cache is off.
//! 3. The same with the cache on and the request audit event committed one per request (a
//!    group-commit writer limited to batches of one) against group commit (our path); p99
//!    latency and the largest batch are printed.
//!
//! Runs against the test harness's ephemeral cluster (real PostgreSQL, TLS), bounded in time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dalp_api::{ApiSettings, AppState, Services};
use dalp_db::cache::InvalidatingCache;
use dalp_db::Component;
use dalp_identity::crypto::FileKeyProvider;
use dalp_identity::store::NewUser;
use dalp_identity::types::{Email, Password};
use dalp_identity::{IdentityStore, RequestContext};

const SAMPLES: usize = 3000;
const CLIENTS: usize = 64;
const HTTP_SECONDS: u64 = 5;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn measure(store: &IdentityStore, token: &str) -> Vec<Duration> {
    let mut v = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let t = Instant::now();
        store.validate_session(token).await.expect("valid session");
        v.push(t.elapsed());
    }
    v.sort();
    v
}

async fn http_throughput(app: axum::Router, token: &str) -> (f64, u64) {
    let (rps, failed, _) = http_run(app, token).await;
    (rps, failed)
}

/// Requests per second, failures and the p99 latency.
async fn http_run(app: axum::Router, token: &str) -> (f64, u64, Duration) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        dalp_api::serve(listener, app, Default::default(), std::future::pending())
            .await
            .unwrap();
    });
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CLIENTS)
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(HTTP_SECONDS);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let client = client.clone();
        let url = format!("http://{addr}/api/v1/me");
        let token = token.to_string();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut failed, mut lat) = (0u64, 0u64, Vec::new());
            while Instant::now() < deadline {
                let t = Instant::now();
                match client.get(&url).bearer_auth(&token).send().await {
                    Ok(r) if r.status().is_success() => ok += 1,
                    _ => failed += 1,
                }
                lat.push(t.elapsed());
            }
            (ok, failed, lat)
        }));
    }
    let (mut ok, mut failed, mut lat) = (0, 0, Vec::new());
    for t in tasks {
        let (o, f, l) = t.await.unwrap();
        ok += o;
        failed += f;
        lat.extend(l);
    }
    let secs = started.elapsed().as_secs_f64();
    server.abort();
    lat.sort();
    (ok as f64 / secs, failed, percentile(&lat, 0.99))
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let db = dalp_testkit::migrated_database(&dalp_app::catalog::MIGRATIONS).await;
        let key_dir = tempfile::tempdir().unwrap();
        let key_file = key_dir.path().join(dalp_app::keys::KEK_FILE);
        let pools = Arc::new(db.pools_sized(CLIENTS));
        let services =
            Services::start(pools.clone(), key_dir.path(), ApiSettings::default()).unwrap();
        while !services.state.identity.cache().is_listening() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let store = services.state.identity.clone();
        let ctx = RequestContext {
            actor: "service:bench".into(),
            ..Default::default()
        };
        let user = store
            .create_user(
                &ctx,
                NewUser {
                    email: Email::parse("bench@bank.example").unwrap(),
                    name: "Bench".into(),
                    password: Some(Password::parse("correct horse battery staple").unwrap()),
                    wallet_address: None,
                    roles: vec![],
                },
            )
            .await
            .unwrap();
        let token = store
            .login(&ctx, "bench@bank.example", "correct horse battery staple")
            .await
            .unwrap()
            .token;

        // Baseline: the same store code with a cache that never listens, so never serves.
        let uncached = IdentityStore::new(
            pools.get(Component::Identity).clone(),
            Arc::new(FileKeyProvider::open_or_create(&key_file).unwrap()),
            InvalidatingCache::new(1),
        );
        let _ = measure(&uncached, &token).await; // warm-up
        let db_lat = measure(&uncached, &token).await;
        let cached_lat = measure(&store, &token).await;
        let (c50, c99) = (percentile(&cached_lat, 0.5), percentile(&cached_lat, 0.99));
        let (u50, u99) = (percentile(&db_lat, 0.5), percentile(&db_lat, 0.99));
        println!("session validation, {SAMPLES} samples each:");
        println!(
            "  uncached (database lookup)  p50 {:>9.1} µs   p99 {:>9.1} µs",
            u50.as_secs_f64() * 1e6,
            u99.as_secs_f64() * 1e6
        );
        println!(
            "  cached                      p50 {:>9.1} µs   p99 {:>9.1} µs",
            c50.as_secs_f64() * 1e6,
            c99.as_secs_f64() * 1e6
        );
        println!(
            "  ratio uncached/cached       p50 {:>9.1}x    p99 {:>9.1}x   (goal: >= 20x)",
            u50.as_secs_f64() / c50.as_secs_f64(),
            u99.as_secs_f64() / c99.as_secs_f64()
        );

        let (rps_cached, f1) = http_throughput(services.router(), &token).await;
        let uncached_state = AppState::new(pools.clone(), uncached, ApiSettings::default());
        let (rps_uncached, f2) = http_throughput(dalp_api::router(uncached_state), &token).await;
        println!(
            "authenticated GET /api/v1/me, {CLIENTS} concurrent clients, {HTTP_SECONDS} s each:"
        );
        println!("  cache on   {rps_cached:>9.0} req/s  ({f1} failed)");
        println!("  cache off  {rps_uncached:>9.0} req/s  ({f2} failed)");
        println!("  ratio on/off {:.2}x", rps_cached / rps_uncached);

        // Request audit: one commit per request, concurrently (the path before group
        // commit: batches of one, as many writers as clients) against group commit.
        let mut one_each = services.state.clone();
        one_each.request_audit = Arc::new(
            dalp_audit::GroupWriter::new(
                pools.get(Component::Identity).clone(),
                1,
                dalp_api::REQUEST_AUDIT_QUEUE,
            )
            .with_writers(CLIENTS),
        );
        let (rps_one, f3, p99_one) = http_run(dalp_api::router(one_each), &token).await;
        let (rps_group, f4, p99_group) = http_run(services.router(), &token).await;
        let max_batch = services
            .state
            .request_audit
            .stats()
            .max_batch
            .load(std::sync::atomic::Ordering::Relaxed);
        println!("GET /api/v1/me, request audit event, {CLIENTS} clients, cache on:");
        println!(
            "  one commit per request (concurrent)  {rps_one:>9.0} req/s  p99 {:>7.1} ms  ({f3} failed)",
            p99_one.as_secs_f64() * 1e3
        );
        println!(
            "  group commit            {rps_group:>9.0} req/s  p99 {:>7.1} ms  ({f4} failed, largest batch {max_batch})",
            p99_group.as_secs_f64() * 1e3
        );
        println!("  ratio group/one         {:.2}x", rps_group / rps_one);

        // The database's ceiling for the same work, one commit per request: pgbench reads
        // the user row and inserts one audit event (each its own transaction) from as many
        // clients, over the Unix socket, as the superuser.
        let tps = pgbench_ceiling(&db.name, user.id, key_dir.path());
        println!("pgbench, the same SQL per request, {CLIENTS} clients, one commit per request:");
        println!("  {tps:>9.0} tps");
        println!(
            "  ratio /me group commit / pgbench ceiling  {:.2}x   (goal: >= 2x)",
            rps_group / tps
        );
    });
}

/// pgbench's transactions per second for `/me`'s database work: the user row (with its
/// roles) and one `api.request` audit event, each committed alone.
fn pgbench_ceiling(dbname: &str, user: uuid::Uuid, scratch: &std::path::Path) -> f64 {
    let su = dalp_testkit::cluster().superuser_options(dbname);
    let (socket, port) = su.hosts[0].clone();
    let script = scratch.join("me.sql");
    std::fs::write(
        &script,
        format!(
            "SELECT u.*, array(SELECT role FROM dalp_identity.platform_roles r WHERE r.user_id = u.id) FROM dalp_identity.users u WHERE u.id = '{user}';\n\
             INSERT INTO dalp_audit.events (actor, action, resource_type, outcome, request_id, details) VALUES ('user:{user}', 'api.request', 'request', 'success', 'bench', '{{}}'::jsonb);\n"
        ),
    )
    .unwrap();
    let out = std::process::Command::new(
        std::path::Path::new(dalp_ops::embedded::DEFAULT_PG_BIN).join("pgbench"),
    )
    .args(["-n", "-h", &socket, "-p", &port.to_string(), "-U", &su.user])
    .args([
        "-c",
        &CLIENTS.to_string(),
        "-j",
        "2",
        "-T",
        &HTTP_SECONDS.to_string(),
    ])
    .arg("-f")
    .arg(&script)
    .arg(dbname)
    .output()
    .expect("run pgbench");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pgbench: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no tps in pgbench's output: {text}"))
}
