//! The accept loop's limits, on a bare router (no database): slow request heads are dropped,
//! slow handlers answer 503 in the JSON shape, and connections beyond the bound wait.

use std::time::Duration;

use axum::routing::get;
use axum::Router;
use dalp_api::server::ConnectionLimits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn start(limits: ConnectionLimits) -> std::net::SocketAddr {
    let app = Router::new().route("/fast", get(|| async { "ok" })).route(
        "/slow",
        get(|| async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            "late"
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(dalp_api::serve(
        listener,
        app,
        limits,
        std::future::pending(),
    ));
    addr
}

async fn get_text(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn a_trickling_request_head_is_dropped() {
    let addr = start(ConnectionLimits {
        header_read_timeout: Duration::from_millis(300),
        request_timeout: Duration::from_secs(5),
        max_connections: 16,
    })
    .await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /fast HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Never finishes the head: the server closes the connection (bounded wait for the test).
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "a slow request head was kept open");
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));
    // A normal request is served.
    assert!(get_text(addr, "/fast").await.starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn a_request_past_its_deadline_gets_503_in_the_error_shape() {
    let addr = start(ConnectionLimits {
        header_read_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_millis(200),
        max_connections: 16,
    })
    .await;
    let r = get_text(addr, "/slow").await;
    assert!(r.starts_with("HTTP/1.1 503"), "{r}");
    let body = r.split("\r\n\r\n").nth(1).unwrap();
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert!(v["error"]["code"].is_string(), "{v}");
}

#[tokio::test]
async fn connections_beyond_the_bound_wait_for_a_free_slot() {
    let addr = start(ConnectionLimits {
        header_read_timeout: Duration::from_secs(30),
        request_timeout: Duration::from_secs(5),
        max_connections: 1,
    })
    .await;
    // The only slot: an idle connection.
    let idle = TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let waiting = tokio::spawn(get_text(addr, "/fast"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "served beyond the connection bound");
    drop(idle);
    let r = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("served once the slot was free")
        .unwrap();
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}
