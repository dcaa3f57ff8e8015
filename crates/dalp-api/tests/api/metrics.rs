//! `/metrics` parsed as Prometheus parses it, after a small workload.

use dalp_identity::types::PlatformRole;
use prometheus_parse::{Sample, Scrape, Value};
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::{spawn_app, Cred};

fn value(s: &Sample) -> f64 {
    match &s.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        Value::Histogram(h) => h.last().map(|b| b.count).unwrap_or(0.0),
        Value::Summary(q) => q.first().map(|q| q.count).unwrap_or(0.0),
    }
}

fn find<'a>(scrape: &'a Scrape, metric: &str, labels: &[(&str, &str)]) -> Vec<&'a Sample> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .collect()
}

#[tokio::test]
async fn metrics_expose_every_family_with_plausible_values() {
    {
        // As `dalp` does: store-operation spans feed /metrics whatever the log level.
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::Layer;
        let subscriber = tracing_subscriber::registry().with(
            dalp_app::telemetry::StoreLayer.with_filter(dalp_app::telemetry::store_layer_filter()),
        );
        let _ = tracing::subscriber::set_global_default(subscriber);
    }
    let app = spawn_app().await;
    *app.services.state.backups.write().unwrap() = Some(dalp_app::BackupSnapshot {
        newest_by_repo: vec![(1, chrono::Utc::now() - chrono::Duration::hours(2))],
    });
    app.create_user("ops@bank.example", &[PlatformRole::SystemManager])
        .await;
    let t = app.token("ops@bank.example").await;
    for _ in 0..3 {
        let (s, _) = app
            .call(
                Method::GET,
                "/api/v1/workflows/stats",
                Cred::Token(&t),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK);
    }
    let (s, _) = app
        .call(
            Method::GET,
            "/api/v1/workflows/runs/00000000-0000-0000-0000-000000000000",
            Cred::Token(&t),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = app
        .call(
            Method::POST,
            "/api/v1/indexed/chains",
            Cred::Token(&t),
            Some(json!({"chain_id": 7, "name": "seven"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);

    // A stranded nonce: broadcast, then failed unmined; its replacement is queued.
    {
        use dalp_workflows::{NewTxRequest, TransitionInput, TxStatus::*};
        let ctx = dalp_audit::RequestContext::service("metrics-test");
        let wf = &app.services.state.workflows;
        let (r, _) = wf
            .create_tx_request(
                &ctx,
                &NewTxRequest {
                    organisation_id: uuid::Uuid::nil(),
                    chain_id: 31337,
                    sender: "0x5fbdb2315678afecb367f032d93f642f64180aa3".into(),
                    to: None,
                    value: None,
                    data: None,
                    idempotency_key: "strand".into(),
                },
            )
            .await
            .unwrap();
        for to in [
            Queued,
            Preparing,
            PendingApproval,
            Signing,
            Broadcasting,
            Failed,
        ] {
            wf.transition(&ctx, r.id, to, &TransitionInput::default())
                .await
                .unwrap();
        }
    }
    // A statement that fails on the server, through the same typed path the stores use.
    {
        use dalp_db::TypedClient;
        let c = app.db.connect_as(dalp_db::Component::Readonly).await;
        let e = c.typed_query("SELECT 1 / 0", &[]).await.unwrap_err();
        assert_eq!(dalp_db::typed::error_kind(&e), "data_exception");
    }
    let text = reqwest::get(format!("{}/metrics", app.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let scrape =
        Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("valid exposition format");

    let lag = find(&scrape, "dalp_audit_seal_lag_seconds", &[]);
    assert!(lag.len() == 1 && value(lag[0]) >= 0.0, "{text}");
    assert!(!find(&scrape, "dalp_identity_cache_hits_total", &[]).is_empty());
    let latency = find(
        &scrape,
        "dalp_http_request_duration_seconds",
        &[("route", "/api/v1/workflows/stats")],
    );
    assert_eq!(latency.len(), 1, "{text}");
    assert!(value(latency[0]) >= 3.0, "three requests counted");
    let errors = find(&scrape, "dalp_http_errors_total", &[("status", "404")]);
    assert!(errors.len() == 1 && value(errors[0]) >= 1.0, "{text}");
    let max = find(
        &scrape,
        "dalp_pool_connections",
        &[("component", "dalp-identity"), ("state", "max")],
    );
    assert!(max.len() == 1 && value(max[0]) >= 1.0, "{text}");
    let horizon = find(
        &scrape,
        "dalp_partition_horizon_seconds",
        &[("table", "dalp_audit.events")],
    );
    assert!(
        horizon.len() == 1 && value(horizon[0]) > 30.0 * 86_400.0,
        "{text}"
    );
    assert_eq!(
        find(&scrape, "dalp_partition_horizon_seconds", &[]).len(),
        5
    );
    let ready = find(&scrape, "dalp_workflow_runs", &[("state", "ready")]);
    assert!(ready.len() == 1 && value(ready[0]) == 0.0);
    assert!(!find(&scrape, "dalp_workflow_claim_latency_seconds", &[]).is_empty());
    let stranded = find(
        &scrape,
        "dalp_tx_stranded_nonces",
        &[
            ("chain_id", "31337"),
            ("signer", "0x5fbdb2315678afecb367f032d93f642f64180aa3"),
        ],
    );
    assert!(stranded.len() == 1 && value(stranded[0]) == 1.0, "{text}");
    assert_eq!(
        find(&scrape, "dalp_tx_stranded_nonce_oldest_seconds", &[]).len(),
        1
    );
    assert_eq!(
        find(&scrape, "dalp_indexer_lag_blocks", &[("chain_id", "7")]).len(),
        1
    );
    // Store operations, timed per domain method.
    let created = find(
        &scrape,
        "dalp_store_operation_duration_seconds",
        &[("operation", "identity.create_user")],
    );
    assert!(created.len() == 1 && value(created[0]) >= 1.0, "{text}");
    let stats = find(
        &scrape,
        "dalp_store_operation_duration_seconds",
        &[("operation", "workflows.stats")],
    );
    assert!(stats.len() == 1 && value(stats[0]) >= 3.0, "{text}");
    let errors = find(
        &scrape,
        "dalp_db_errors_total",
        &[("kind", "data_exception")],
    );
    assert!(errors.len() == 1 && value(errors[0]) >= 1.0, "{text}");
    let waits = find(&scrape, "dalp_pool_wait_seconds", &[("store", "workflows")]);
    assert!(waits.len() == 1 && value(waits[0]) >= 3.0, "{text}");
    assert!(!find(
        &scrape,
        "dalp_pool_checkout_failures_total",
        &[("store", "identity")]
    )
    .is_empty());
    // Replication and archiving as the monitor role sees them (the test cluster is a
    // single node without archiving).
    let replicas = find(&scrape, "dalp_replication_replicas", &[]);
    assert!(replicas.len() == 1 && value(replicas[0]) == 0.0, "{text}");
    let archiving = find(&scrape, "dalp_wal_archiving_enabled", &[]);
    assert!(archiving.len() == 1 && value(archiving[0]) == 0.0, "{text}");
    assert_eq!(find(&scrape, "dalp_wal_archive_failing", &[]).len(), 1);
    assert_eq!(find(&scrape, "dalp_wal_archive_age_seconds", &[]).len(), 1);
    let age = find(
        &scrape,
        "dalp_backup_last_success_age_seconds",
        &[("repo", "1")],
    );
    assert!(
        age.len() == 1 && (7000.0..7400.0).contains(&value(age[0])),
        "{text}"
    );
}
