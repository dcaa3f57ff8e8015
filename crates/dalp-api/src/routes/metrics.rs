//! `GET /metrics`: Prometheus text format: audit seal lag, identity cache, workflow queue,
//! indexer lag, HTTP latency and errors, connection pools, partition horizon. Replication,
//! archiving and backup families come with the HA and backup work.

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use dalp_db::Component;

use crate::AppState;

pub(crate) fn router() -> Router<AppState> {
    Router::new().route("/metrics", get(metrics))
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, kind: &str, value: String| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    };
    let lag = dalp_audit::Sealer::lag(state.pools.get(Component::AuditSealer)).await;
    gauge(
        "dalp_audit_seal_lag_seconds",
        "Age of the oldest committed audit event not yet sealed (0 when all are sealed).",
        "gauge",
        lag.map(|l| format!("{l:.3}"))
            .unwrap_or_else(|_| "NaN".into()),
    );
    let cache = state.identity.cache();
    let stats = cache.stats();
    gauge(
        "dalp_identity_cache_hits_total",
        "Identity cache hits.",
        "counter",
        stats.hits.to_string(),
    );
    gauge(
        "dalp_identity_cache_misses_total",
        "Identity cache misses.",
        "counter",
        stats.misses.to_string(),
    );
    gauge(
        "dalp_identity_cache_invalidations_total",
        "Invalidations received (NOTIFY or local).",
        "counter",
        stats.invalidations.to_string(),
    );
    gauge(
        "dalp_identity_cache_flushes_total",
        "Whole-cache flushes (listener drops and reconnects).",
        "counter",
        stats.flushes.to_string(),
    );
    gauge(
        "dalp_identity_cache_listening",
        "1 while the cache's LISTEN connection is up (the cache serves nothing otherwise).",
        "gauge",
        (cache.is_listening() as u8).to_string(),
    );
    gauge(
        "dalp_identity_cache_entries",
        "Entries in the identity cache.",
        "gauge",
        cache.len().to_string(),
    );
    match state.workflows.stats().await {
        Ok(w) => {
            out.push_str("# HELP dalp_workflow_runs Workflow runs by queue state.\n# TYPE dalp_workflow_runs gauge\n");
            for (s, v) in [
                ("ready", w.ready),
                ("running", w.running),
                ("sleeping", w.sleeping),
                ("waiting", w.waiting),
                ("dead_letter", w.dead_letter),
                ("failed", w.failed),
                ("stalled", w.stalled),
            ] {
                out.push_str(&format!("dalp_workflow_runs{{state=\"{s}\"}} {v}\n"));
            }
            out.push_str(&format!(
                "# HELP dalp_workflow_oldest_ready_seconds Age of the oldest ready run.\n# TYPE dalp_workflow_oldest_ready_seconds gauge\ndalp_workflow_oldest_ready_seconds {:.3}\n",
                w.oldest_ready_seconds
            ));
            out.push_str(&format!(
                "# HELP dalp_workflow_claim_latency_seconds Enqueue-to-start latency of runs started in the last 5 minutes.\n# TYPE dalp_workflow_claim_latency_seconds summary\ndalp_workflow_claim_latency_seconds{{quantile=\"0.5\"}} {:.4}\ndalp_workflow_claim_latency_seconds{{quantile=\"0.99\"}} {:.4}\n",
                w.claim_latency_p50_seconds, w.claim_latency_p99_seconds
            ));
        }
        Err(e) => tracing::warn!(error = %e, "workflow metrics unavailable"),
    }
    if let Ok(chains) = state.indexed.chains().await {
        out.push_str("# HELP dalp_indexer_lag_blocks Blocks between the reported head and the checkpoint, per chain.\n# TYPE dalp_indexer_lag_blocks gauge\n");
        for c in chains {
            if let Ok(s) = state.indexed.status(c.chain_id).await {
                let lag = s.lag.map(|l| l.to_string()).unwrap_or_else(|| "NaN".into());
                out.push_str(&format!(
                    "dalp_indexer_lag_blocks{{chain_id=\"{}\"}} {lag}\n",
                    c.chain_id
                ));
            }
        }
    }
    state.http_metrics.render(&mut out);
    // Connection pools per component.
    out.push_str("# HELP dalp_pool_connections Connections of each component's pool by state.\n# TYPE dalp_pool_connections gauge\n");
    for c in Component::ALL {
        let s = state.pools.get(c).status();
        let name = c.application_name();
        for (label, v) in [
            ("max", s.max_size),
            ("open", s.size),
            ("idle", s.available),
            ("in_use", s.size.saturating_sub(s.available)),
            ("waiting", s.waiting),
        ] {
            out.push_str(&format!(
                "dalp_pool_connections{{component=\"{name}\",state=\"{label}\"}} {v}\n"
            ));
        }
    }
    // How far ahead partitions exist.
    if let Ok(client) = state.pools.get(Component::Readonly).get().await {
        out.push_str("# HELP dalp_partition_horizon_seconds Seconds until the end of the last partition, per partitioned table.\n# TYPE dalp_partition_horizon_seconds gauge\n");
        for p in crate::catalog::PARTITIONS {
            if let Ok(parts) = dalp_db::partitions::list(&client, &p).await {
                let secs = parts
                    .last()
                    .map(|x| (x.to - chrono::Utc::now()).num_seconds().to_string())
                    .unwrap_or_else(|| "NaN".into());
                out.push_str(&format!(
                    "dalp_partition_horizon_seconds{{table=\"{}.{}\"}} {secs}\n",
                    p.schema, p.table
                ));
            }
        }
    }
    ([(CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
