//! `GET /metrics`: Prometheus text format. For now the audit seal lag and the identity
//! cache; the observability issue adds pools, latencies, replication and more.

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
    ([(CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
