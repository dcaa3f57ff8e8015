//! The audit endpoints, with the sealer of the running services.

use std::time::Duration;

use dalp_identity::types::PlatformRole;
use reqwest::{Method, StatusCode};

use crate::helpers::{spawn_app, Cred, PASSWORD};

#[tokio::test]
async fn auditors_query_events_and_verify_the_sealed_chain() {
    let app = spawn_app().await;
    app.create_user("auditor@bank.example", &[PlatformRole::Auditor])
        .await;
    app.create_user("plain@bank.example", &[]).await;
    let _ = app.login("plain@bank.example", "wrong password here").await;
    let auditor = app.token("auditor@bank.example").await;
    let plain = app.token("plain@bank.example").await;

    let (s, _) = app
        .call(
            Method::GET,
            "/api/v1/audit/events",
            Cred::Token(&plain),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    let (s, b) = app
        .call(
            Method::GET,
            "/api/v1/audit/events?action=identity.login&outcome=denied",
            Cred::Token(&auditor),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let events = b["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{b}");
    assert_eq!(events[0]["details"]["reason"], "invalid_credentials");
    assert!(!b.to_string().contains(PASSWORD) && !b.to_string().contains("wrong password"));

    let (s, b) = app
        .call(
            Method::GET,
            "/api/v1/audit/events?limit=2",
            Cred::Token(&auditor),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let next = b["next_before_id"].as_i64().unwrap();
    let (_, b2) = app
        .call(
            Method::GET,
            &format!("/api/v1/audit/events?limit=2&before_id={next}"),
            Cred::Token(&auditor),
            None,
        )
        .await;
    assert!(b2["events"][0]["id"].as_i64().unwrap() < next);

    for bad in [
        "from=yesterday",
        "limit=0",
        "outcome=maybe",
        "colour=blue",
        "from=2026-02-01T00:00:00Z&to=2026-01-01T00:00:00Z",
    ] {
        let (s, _) = app
            .call(
                Method::GET,
                &format!("/api/v1/audit/events?{bad}"),
                Cred::Token(&auditor),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}");
    }

    // The services' sealer seals within a second; then the chain verifies.
    let mut report = serde_json::Value::Null;
    for _ in 0..50 {
        let (s, b) = app
            .call(
                Method::GET,
                "/api/v1/audit/verify",
                Cred::Token(&auditor),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK);
        report = b;
        if report["events_checked"].as_u64().unwrap_or(0) >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(report["ok"], true, "{report}");
    let metrics = app
        .http
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lag: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("dalp_audit_seal_lag_seconds "))
        .expect("seal lag metric")
        .parse()
        .unwrap();
    assert!((0.0..=1.0).contains(&lag), "seal lag {lag}");
    assert!(
        metrics.contains("dalp_identity_cache_listening 1"),
        "{metrics}"
    );
    assert!(report["batches"].as_u64().unwrap() >= 1, "{report}");

    // Tampering shows up in the API's verdict.
    app.superuser_exec(
        "SET session_replication_role = replica; UPDATE dalp_audit.events SET actor = 'nobody' WHERE id = (SELECT min(id) FROM dalp_audit.events)",
    )
    .await;
    let (_, b) = app
        .call(
            Method::GET,
            "/api/v1/audit/verify",
            Cred::Token(&auditor),
            None,
        )
        .await;
    assert_eq!(b["ok"], false, "{b}");
    assert_eq!(b["problem"]["detail"]["kind"], "event_changed");
}

#[tokio::test]
async fn every_api_request_that_touches_data_is_recorded_once() {
    let app = spawn_app().await;
    let uid = app.create_user("rec@bank.example", &[]).await;
    let token = app.token("rec@bank.example").await;
    let resp = app
        .http
        .get(format!("{}/api/v1/me", app.base))
        .bearer_auth(&token)
        .header("x-request-id", "req-me-1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-request-id"], "req-me-1");
    let (s, _) = app
        .call(
            Method::GET,
            "/api/v1/audit/events",
            Cred::Token(&token),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = app
        .call(Method::GET, "/api/v1/openapi.json", Cred::None, None)
        .await;
    assert_eq!(s, StatusCode::OK);

    let su = app.db.superuser().await;
    let me: Vec<(String, String, String)> = su
        .query(
            "SELECT actor, outcome, details->>'status' FROM dalp_audit.events WHERE action = 'api.request' AND request_id = 'req-me-1'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        me,
        vec![(
            format!("user:{uid}"),
            "success".to_string(),
            "200".to_string()
        )]
    );
    let denied: i64 = su
        .query_one(
            "SELECT count(*) FROM dalp_audit.events WHERE action = 'api.request' AND resource_id = 'GET /api/v1/audit/events' AND outcome = 'denied'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(denied, 1);
    let docs: i64 = su
        .query_one("SELECT count(*) FROM dalp_audit.events WHERE details->>'path' = '/api/v1/openapi.json'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(docs, 0, "the API description touches no data");
}
