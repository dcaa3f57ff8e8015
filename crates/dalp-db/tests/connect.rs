//! Connecting over several hosts: a host that accepts TCP but never answers (cut off, or a
//! frozen server) costs [`HOST_STAGGER`], not the connect timeout, before the next host is
//! tried — for single connections and for pools alike.

use std::time::{Duration, Instant};

use dalp_db::connect::HOST_STAGGER;
use dalp_testkit::migrated_database;

/// A listener whose connections are accepted by the kernel and never answered.
fn silent_host() -> (std::net::TcpListener, u16) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

/// The port of the server `c` is connected to.
async fn served_port(c: &tokio_postgres::Client) -> u16 {
    let port: i32 = c
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    port as u16
}

#[tokio::test]
async fn a_silent_first_host_costs_the_stagger_not_the_timeout() {
    let db = migrated_database(&[]).await;
    let (_silent, port) = silent_host();
    let mut opts = db.options("dalp_readonly");
    let real = opts.hosts[0].clone();
    opts.hosts = vec![("127.0.0.1".into(), port), real.clone()];
    opts.connect_timeout = Duration::from_secs(30);

    let t = Instant::now();
    let c = opts.connect().await.unwrap();
    let took = t.elapsed();
    assert_eq!(served_port(&c).await, real.1);
    assert!(took >= HOST_STAGGER, "{took:?}");
    assert!(
        took < opts.connect_timeout,
        "{took:?}: waited out the silent host"
    );

    // A pool's connections come the same way.
    let pool = deadpool_postgres::Pool::builder(
        opts.manager(deadpool_postgres::RecyclingMethod::Fast)
            .unwrap(),
    )
    .max_size(2)
    .runtime(deadpool_postgres::Runtime::Tokio1)
    .build()
    .unwrap();
    let t = Instant::now();
    let c = pool.get().await.unwrap();
    assert!(t.elapsed() < opts.connect_timeout, "{:?}", t.elapsed());
    assert_eq!(served_port(&c).await, real.1);

    // Every host failing: the error names the target, after the last host's failure. (A
    // port bound and let go again: nothing listens there.)
    let (closed, closed_port) = silent_host();
    drop(closed);
    let mut none = opts.clone();
    none.hosts = vec![("127.0.0.1".into(), closed_port)];
    let e = none.connect().await.unwrap_err().to_string();
    assert!(e.contains(&closed_port.to_string()), "{e}");
}
