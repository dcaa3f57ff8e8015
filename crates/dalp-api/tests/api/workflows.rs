//! `/api/v1/workflows/...`: roles enforced, idempotent starts, operator retry/cancel, the
//! transaction request lifecycle with illegal transitions refused, metrics.

use dalp_identity::types::PlatformRole;
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::{spawn_app, Cred};

#[tokio::test]
async fn runs_and_transaction_requests_over_http() {
    let app = spawn_app().await;
    app.create_user("ops@bank.example", &[PlatformRole::SystemManager])
        .await;
    app.create_user("tm@bank.example", &[PlatformRole::TokenManager])
        .await;
    app.create_user("nobody@bank.example", &[]).await;
    let ops = app.token("ops@bank.example").await;
    let tm = app.token("tm@bank.example").await;
    let nobody = app.token("nobody@bank.example").await;
    let org = crate::helpers::ORG;
    let body = json!({"organisation_id": org, "kind": "dalp.selftest", "idempotency_key": "k1", "input": {"steps": 1}});

    let (s, _) = app
        .call(
            Method::POST,
            "/api/v1/workflows/runs",
            Cred::Token(&nobody),
            Some(body.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, b) = app
        .call(
            Method::POST,
            "/api/v1/workflows/runs",
            Cred::Token(&ops),
            Some(body.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let id = b["run"]["id"].as_str().unwrap().to_string();
    let (s, b) = app
        .call(
            Method::POST,
            "/api/v1/workflows/runs",
            Cred::Token(&ops),
            Some(body),
        )
        .await;
    assert_eq!(
        (s, b["run"]["id"].as_str(), b["created"].as_bool()),
        (StatusCode::OK, Some(id.as_str()), Some(false))
    );
    let (s, b) = app
        .call(
            Method::POST,
            "/api/v1/workflows/runs",
            Cred::Token(&ops),
            Some(json!({"organisation_id": org, "kind": "DROP TABLE runs;--", "idempotency_key": "k2"})),
        )
        .await;
    assert_eq!(
        (s, b["error"]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("kind")),
        "{b}"
    );

    let (s, b) = app
        .call(
            Method::POST,
            &format!("/api/v1/workflows/runs/{id}/retry"),
            Cred::Token(&ops),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    let (s, b) = app
        .call(
            Method::POST,
            &format!("/api/v1/workflows/runs/{id}/cancel"),
            Cred::Token(&ops),
            None,
        )
        .await;
    assert_eq!(
        (s, b["run"]["status"].as_str()),
        (StatusCode::OK, Some("cancelled")),
        "{b}"
    );
    let (s, _) = app
        .call(
            Method::POST,
            &format!("/api/v1/workflows/runs/{id}/cancel"),
            Cred::Token(&ops),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, _) = app
        .call(
            Method::GET,
            "/api/v1/workflows/runs/not-a-uuid",
            Cred::Token(&ops),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, b) = app
        .call(
            Method::GET,
            "/api/v1/workflows/runs?status=cancelled",
            Cred::Token(&ops),
            None,
        )
        .await;
    assert_eq!(
        (s, b["runs"].as_array().map(Vec::len)),
        (StatusCode::OK, Some(1)),
        "{b}"
    );
    let (s, _) = app
        .call(
            Method::GET,
            "/api/v1/workflows/runs?status=bogus'--",
            Cred::Token(&ops),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let (s, b) = app
        .call(
            Method::GET,
            "/api/v1/workflows/stats",
            Cred::Token(&ops),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");

    // Transaction requests.
    let tx = json!({"organisation_id": org, "chain_id": 1, "sender": "0x5fbdb2315678afecb367f032d93f642f64180aa3",
                    "to": "0x70997970c51812dc3a010c7d01b50e0d17dc79c8", "value": "5", "idempotency_key": "pay-9"});
    let (s, b) = app
        .call(
            Method::POST,
            "/api/v1/workflows/tx-requests",
            Cred::Token(&tm),
            Some(tx.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let rid = b["tx_request"]["id"].as_str().unwrap().to_string();
    let (s, b) = app
        .call(
            Method::POST,
            "/api/v1/workflows/tx-requests",
            Cred::Token(&tm),
            Some(tx.clone()),
        )
        .await;
    assert_eq!(
        (s, b["tx_request"]["id"].as_str()),
        (StatusCode::OK, Some(rid.as_str()))
    );
    let mut bad = tx.clone();
    bad["sender"] = json!("0xnothex");
    let (s, b) = app
        .call(
            Method::POST,
            "/api/v1/workflows/tx-requests",
            Cred::Token(&tm),
            Some(bad),
        )
        .await;
    assert_eq!(
        (s, b["error"]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("sender")),
        "{b}"
    );
    let path = format!("/api/v1/workflows/tx-requests/{rid}/transition");
    let (s, _) = app
        .call(
            Method::POST,
            &path,
            Cred::Token(&tm),
            Some(json!({"to": "QUEUED"})),
        )
        .await;
    assert_eq!(
        s,
        StatusCode::FORBIDDEN,
        "token managers create, operators move"
    );
    let (s, b) = app
        .call(
            Method::POST,
            &path,
            Cred::Token(&ops),
            Some(json!({"to": "SIGNING"})),
        )
        .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("illegal_transition")),
        "{b}"
    );
    let (s, b) = app
        .call(
            Method::POST,
            &path,
            Cred::Token(&ops),
            Some(json!({"to": "NOPE"})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    let (s, _) = app
        .call(
            Method::POST,
            &path,
            Cred::Token(&ops),
            Some(json!({"to": "QUEUED"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, b) = app
        .call(
            Method::POST,
            &path,
            Cred::Token(&ops),
            Some(json!({"to": "PREPARING", "gas_limit": 21000})),
        )
        .await;
    assert_eq!(
        (s, b["tx_request"]["nonce"].as_i64()),
        (StatusCode::OK, Some(0)),
        "{b}"
    );
    let (s, b) = app
        .call(
            Method::GET,
            &format!("/api/v1/workflows/tx-requests/{rid}"),
            Cred::Token(&ops),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["transitions"].as_array().unwrap().len(), 3);

    // Metrics carry the workflow families.
    let text = reqwest::get(format!("{}/metrics", app.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for family in [
        "dalp_workflow_runs{state=\"ready\"}",
        "dalp_workflow_oldest_ready_seconds",
        "dalp_workflow_claim_latency_seconds{quantile=\"0.99\"}",
    ] {
        assert!(text.contains(family), "{family} missing:\n{text}");
    }
}
