//! `GET /metrics`: Prometheus text format: audit seal lag, identity cache, workflow queue,
//! indexer lag, HTTP latency and errors, store operation latency, connection pools,
//! partition horizon, replication (per replica lag and sync state), WAL archiving and the
//! age of the newest backup per repository.

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use dalp_db::Component;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(metrics))
}

/// Prometheus metrics: replication, archiving, backups, audit seal lag, caches, pools,
/// indexer, workflows, HTTP and store latency.
#[utoipa::path(get, path = "/metrics", tag = "meta", security(()),
    responses((status = 200, description = "Prometheus text exposition format", content_type = "text/plain; version=0.0.4", body = String)))]
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
    {
        use std::sync::atomic::Ordering::Relaxed;
        let g = state.request_audit.stats();
        for (name, help, v) in [
            (
                "dalp_request_audit_events_total",
                "api.request audit events committed or failed.",
                g.events.load(Relaxed),
            ),
            (
                "dalp_request_audit_batches_total",
                "Group commits of api.request events.",
                g.batches.load(Relaxed),
            ),
            (
                "dalp_request_audit_failed_batches_total",
                "Group commits that failed (their events were retried one by one).",
                g.failed_batches.load(Relaxed),
            ),
            (
                "dalp_request_audit_max_batch",
                "The largest group commit so far.",
                g.max_batch.load(Relaxed),
            ),
        ] {
            gauge(name, help, "counter", v.to_string());
        }
        gauge(
            "dalp_request_audit_wait_seconds_sum",
            "Sum over api.request events of the time from hand-over to commit.",
            "counter",
            format!("{:.6}", g.wait_micros.load(Relaxed) as f64 / 1e6),
        );
        gauge(
            "dalp_request_audit_queued",
            "api.request events waiting for the group-commit writer.",
            "gauge",
            state.request_audit.queued().to_string(),
        );
    }
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
    match state.workflows.stranded_nonces().await {
        Ok(list) => {
            out.push_str("# HELP dalp_tx_stranded_nonces Nonces broadcast by a request that ended unmined, with a replacement in flight, per signer.\n# TYPE dalp_tx_stranded_nonces gauge\n# HELP dalp_tx_stranded_nonce_oldest_seconds Age of the oldest stranded nonce's replacement, per signer.\n# TYPE dalp_tx_stranded_nonce_oldest_seconds gauge\n");
            for s in dalp_workflows::stranded_per_signer(&list) {
                let labels = format!("chain_id=\"{}\",signer=\"{}\"", s.chain_id, s.signer);
                out.push_str(&format!(
                    "dalp_tx_stranded_nonces{{{labels}}} {}\ndalp_tx_stranded_nonce_oldest_seconds{{{labels}}} {:.3}\n",
                    s.count, s.oldest_age_seconds
                ));
            }
        }
        Err(e) => tracing::warn!(error = %e, "stranded-nonce metrics unavailable"),
    }
    if let Ok(chains) = state.indexed.chains().await {
        let mut lag_lines = String::new();
        let mut diverged_lines = String::new();
        let mut drift_lines = String::new();
        for c in chains {
            if let Ok(s) = state.indexed.status(c.chain_id).await {
                let lag = s.lag.map(|l| l.to_string()).unwrap_or_else(|| "NaN".into());
                lag_lines.push_str(&format!(
                    "dalp_indexer_lag_blocks{{chain_id=\"{}\"}} {lag}\n",
                    c.chain_id
                ));
                diverged_lines.push_str(&format!(
                    "dalp_indexer_diverged{{chain_id=\"{}\"}} {}\n",
                    c.chain_id,
                    s.is_diverged() as u8
                ));
            }
            if let Ok(list) = state.indexed.reconciliations(c.chain_id).await {
                for r in list {
                    drift_lines.push_str(&format!(
                        "dalp_indexer_reconcile_disagreement{{chain_id=\"{}\",token=\"{}\",block=\"{}\"}} {}\n",
                        c.chain_id,
                        r.token,
                        r.block,
                        (!r.in_agreement) as u8
                    ));
                }
            }
        }
        out.push_str("# HELP dalp_indexer_lag_blocks Blocks between the reported head and the checkpoint, per chain.\n# TYPE dalp_indexer_lag_blocks gauge\n");
        out.push_str(&lag_lines);
        out.push_str("# HELP dalp_indexer_diverged 1 when the node no longer has the indexed chain and ingest is stopped (see dalp index status).\n# TYPE dalp_indexer_diverged gauge\n");
        out.push_str(&diverged_lines);
        out.push_str("# HELP dalp_indexer_reconcile_disagreement 1 when the token's indexed supply or a sampled balance differs from the contract at the labelled block (last reconciliation).\n# TYPE dalp_indexer_reconcile_disagreement gauge\n");
        out.push_str(&drift_lines);
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
        for p in dalp_app::catalog::PARTITIONS {
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
    replication_and_archiving(&state, &mut out).await;
    if let Some(b) = state
        .backups
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
    {
        out.push_str("# HELP dalp_backup_last_success_age_seconds Seconds since the newest successful backup ended, per repository.\n# TYPE dalp_backup_last_success_age_seconds gauge\n");
        for (repo, at) in &b.newest_by_repo {
            out.push_str(&format!(
                "dalp_backup_last_success_age_seconds{{repo=\"{repo}\"}} {}\n",
                (chrono::Utc::now() - *at).num_seconds()
            ));
        }
    }
    dalp_app::telemetry::store_metrics().render(&mut out);
    dalp_db::pool::render_waits(&mut out);
    dalp_db::typed::render_errors(&mut out);
    dalp_db::write::render(&mut out);
    ([(CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

/// Replication and archiver state as the monitor role (a member of pg_monitor) sees it on
/// the primary.
async fn replication_and_archiving(state: &AppState, out: &mut String) {
    let Ok(c) = state.pools.get(Component::Monitor).get().await else {
        return;
    };
    use dalp_db::TypedClient;
    if let Ok(rows) = c
        .typed_query(
            "SELECT application_name, sync_state, coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn), 0)::float8, coalesce(extract(epoch FROM replay_lag), 0)::float8 FROM pg_stat_replication ORDER BY 1",
            &[],
        )
        .await
    {
        out.push_str("# HELP dalp_replication_replicas Replicas streaming from this primary.\n# TYPE dalp_replication_replicas gauge\n");
        out.push_str(&format!("dalp_replication_replicas {}\n", rows.len()));
        out.push_str("# HELP dalp_replication_lag_bytes WAL bytes each replica has yet to replay.\n# TYPE dalp_replication_lag_bytes gauge\n");
        for r in &rows {
            out.push_str(&format!(
                "dalp_replication_lag_bytes{{replica=\"{}\"}} {}\n",
                r.get::<_, String>(0),
                r.get::<_, f64>(2)
            ));
        }
        out.push_str("# HELP dalp_replication_lag_seconds Replay lag of each replica (time).\n# TYPE dalp_replication_lag_seconds gauge\n");
        for r in &rows {
            out.push_str(&format!(
                "dalp_replication_lag_seconds{{replica=\"{}\"}} {:.3}\n",
                r.get::<_, String>(0),
                r.get::<_, f64>(3)
            ));
        }
        out.push_str("# HELP dalp_replication_sync_state 1 for each replica's sync state (sync, potential, quorum, async).\n# TYPE dalp_replication_sync_state gauge\n");
        for r in &rows {
            out.push_str(&format!(
                "dalp_replication_sync_state{{replica=\"{}\",state=\"{}\"}} 1\n",
                r.get::<_, String>(0),
                r.get::<_, String>(1)
            ));
        }
    }
    if let Ok(r) = c
        .typed_query_one(
            "SELECT current_setting('archive_mode') <> 'off', archived_count, failed_count, extract(epoch FROM now() - last_archived_time)::float8, coalesce(last_failed_time > coalesce(last_archived_time, '-infinity'), false) FROM pg_stat_archiver",
            &[],
        )
        .await
    {
        let mut g = |name: &str, help: &str, kind: &str, v: String| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"));
        };
        g("dalp_wal_archiving_enabled", "1 when archive_mode is on.", "gauge", (r.get::<_, bool>(0) as u8).to_string());
        g("dalp_wal_archived_total", "WAL segments archived since statistics were reset.", "counter", r.get::<_, i64>(1).to_string());
        g("dalp_wal_archive_failures_total", "Failed archive attempts since statistics were reset.", "counter", r.get::<_, i64>(2).to_string());
        g(
            "dalp_wal_archive_age_seconds",
            "Seconds since the last WAL segment was archived (NaN before the first).",
            "gauge",
            r.get::<_, Option<f64>>(3).map(|v| format!("{v:.0}")).unwrap_or_else(|| "NaN".into()),
        );
        g("dalp_wal_archive_failing", "1 when the last archive attempt failed.", "gauge", (r.get::<_, bool>(4) as u8).to_string());
    }
}
