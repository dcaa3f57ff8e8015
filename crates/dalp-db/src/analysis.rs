//! Query analysis for operators: the heaviest statements by component (`pg_stat_statements`)
//! and an index-coverage lint over dalp's schemas. Both read statistics; the migrator role
//! is a member of `pg_read_all_stats` for this.

use chrono::{DateTime, Months, Utc};
use serde::Serialize;
use tokio_postgres::Client;

use crate::component::{Component, MIGRATOR_ROLE};
use crate::partitions::{self, PartitionPolicy};

#[derive(Debug, thiserror::Error)]
pub enum AnalysisError {
    #[error("pg_stat_statements is not installed in this database: preload it (the embedded cluster does) and CREATE EXTENSION pg_stat_statements as a superuser")]
    NoStatements,
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
}

/// Ordering of `top`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopOrder {
    Total,
    Mean,
    Calls,
}

impl TopOrder {
    pub fn parse(s: &str) -> Option<TopOrder> {
        match s {
            "total" => Some(TopOrder::Total),
            "mean" => Some(TopOrder::Mean),
            "calls" => Some(TopOrder::Calls),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Statement {
    /// The dalp component whose role ran it, or the role's name.
    pub component: String,
    pub calls: i64,
    pub total_ms: f64,
    pub mean_ms: f64,
    /// mean + 2 standard deviations: a rough p95 for a roughly normal distribution.
    pub p95ish_ms: f64,
    pub rows: i64,
    pub query: String,
}

fn component_of(role: &str) -> String {
    Component::ALL
        .iter()
        .find(|c| c.role() == role)
        .map(|c| c.application_name().to_string())
        .unwrap_or_else(|| role.to_string())
}

async fn has_statements(client: &Client) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements')",
            &[],
        )
        .await?
        .get(0))
}

/// The `limit` heaviest statements of this database, optionally of one role only.
pub async fn top(
    client: &Client,
    order: TopOrder,
    limit: i64,
    role: Option<&str>,
) -> Result<Vec<Statement>, AnalysisError> {
    if !has_statements(client).await? {
        return Err(AnalysisError::NoStatements);
    }
    let order_by = match order {
        TopOrder::Total => "s.total_exec_time",
        TopOrder::Mean => "s.mean_exec_time",
        TopOrder::Calls => "s.calls",
    };
    let rows = client
        .query(
            &format!(
                "SELECT r.rolname::text, s.calls, s.total_exec_time, s.mean_exec_time,
                        s.mean_exec_time + 2 * s.stddev_exec_time, s.rows,
                        left(regexp_replace(s.query, '\\s+', ' ', 'g'), 300)
                   FROM pg_stat_statements s
                   JOIN pg_roles r ON r.oid = s.userid
                  WHERE s.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
                    AND ($2::text IS NULL OR r.rolname = $2)
                  ORDER BY {order_by} DESC LIMIT $1"
            ),
            &[&limit, &role],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Statement {
            component: component_of(r.get(0)),
            calls: r.get(1),
            total_ms: r.get(2),
            mean_ms: r.get(3),
            p95ish_ms: r.get(4),
            rows: r.get(5),
            query: r.get(6),
        })
        .collect())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Error,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }

    pub fn parse(s: &str) -> Option<Severity> {
        match s {
            "info" => Some(Severity::Info),
            "warning" => Some(Severity::Warning),
            "error" => Some(Severity::Error),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub severity: Severity,
    pub check: &'static str,
    pub object: String,
    pub message: String,
    /// What to do about it.
    pub fix: String,
}

/// Thresholds of [`lint`].
#[derive(Debug, Clone)]
pub struct LintOptions {
    /// Schemas checked (dalp's five).
    pub schemas: Vec<String>,
    /// Partitioned tables and how far ahead their partitions must reach.
    pub partitions: Vec<PartitionPolicy>,
    /// Dead tuples above this share of live ones on a workflow table is bloat.
    pub bloat_ratio: f64,
    /// Only tables with at least this many rows count for scan and bloat checks.
    pub min_rows: i64,
}

/// Foreign keys without an index whose leading columns are the key, duplicate and unused
/// indexes, tables read mostly by sequential scans, bloat on the hot workflow tables, and
/// partitions not created far enough ahead.
pub async fn lint(
    client: &Client,
    opts: &LintOptions,
    now: DateTime<Utc>,
) -> Result<Vec<Finding>, AnalysisError> {
    let mut out = Vec::new();
    let schemas = &opts.schemas;

    // Foreign keys with no index starting with the key's columns (in order).
    for r in client
        .query(
            "SELECT c.conrelid::regclass::text, c.conname::text,
                    (SELECT string_agg(a.attname, ', ' ORDER BY k.ord)
                       FROM unnest(c.conkey) WITH ORDINALITY k(attnum, ord)
                       JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum)
               FROM pg_constraint c
               JOIN pg_class t ON t.oid = c.conrelid
               JOIN pg_namespace n ON n.oid = t.relnamespace
              WHERE c.contype = 'f' AND c.conparentid = 0 AND n.nspname = ANY($1)
                AND NOT EXISTS (
                    SELECT 1 FROM pg_index i
                     WHERE i.indrelid = c.conrelid
                       AND (i.indkey::int2[])[0:cardinality(c.conkey) - 1] = c.conkey)",
            &[schemas],
        )
        .await?
    {
        let (table, name, cols): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        out.push(Finding {
            severity: Severity::Warning,
            check: "unindexed_foreign_key",
            object: format!("{table} ({name})"),
            message: format!("foreign key on ({cols}) has no index starting with those columns: deletes and updates of the referenced rows scan {table}"),
            fix: format!("CREATE INDEX ON {table} ({cols});"),
        });
    }

    // Exact duplicates: same table, columns, expressions and predicate.
    for r in client
        .query(
            "SELECT i1.indexrelid::regclass::text, i2.indexrelid::regclass::text, t.oid::regclass::text
               FROM pg_index i1
               JOIN pg_index i2 ON i1.indrelid = i2.indrelid AND i1.indexrelid < i2.indexrelid
                AND i1.indkey::text = i2.indkey::text
                AND coalesce(pg_get_expr(i1.indexprs, i1.indrelid), '') = coalesce(pg_get_expr(i2.indexprs, i2.indrelid), '')
                AND coalesce(pg_get_expr(i1.indpred, i1.indrelid), '') = coalesce(pg_get_expr(i2.indpred, i2.indrelid), '')
               JOIN pg_class t ON t.oid = i1.indrelid
               JOIN pg_namespace n ON n.oid = t.relnamespace
              WHERE n.nspname = ANY($1) AND NOT t.relispartition",
            &[schemas],
        )
        .await?
    {
        let (a, b, table): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        out.push(Finding {
            severity: Severity::Warning,
            check: "duplicate_index",
            object: table,
            message: format!("indexes {a} and {b} cover the same columns: every write maintains both"),
            fix: format!("DROP INDEX {b}; (keep the one a constraint uses)"),
        });
    }

    // Scan statistics: unused indexes and sequential scans on busy tables.
    for r in client
        .query(
            "SELECT s.relid::regclass::text, s.seq_scan, coalesce(s.idx_scan, 0), s.n_live_tup, s.n_dead_tup,
                    s.schemaname::text
               FROM pg_stat_user_tables s
               JOIN pg_class t ON t.oid = s.relid
              WHERE s.schemaname = ANY($1) AND NOT t.relispartition",
            &[schemas],
        )
        .await?
    {
        let (table, seq, idx, live, dead, schema): (String, i64, i64, i64, i64, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5));
        if live >= opts.min_rows && seq > 10 * idx.max(1) {
            out.push(Finding {
                severity: Severity::Warning,
                check: "sequential_scans",
                object: table.clone(),
                message: format!("{seq} sequential scans against {idx} index scans on {live} rows"),
                fix: format!("run `dalp db top --by total` and index what its statements on {table} filter by"),
            });
        }
        if schema == "dalp_workflows" && live + dead >= opts.min_rows && dead as f64 > opts.bloat_ratio * live.max(1) as f64 {
            out.push(Finding {
                severity: Severity::Warning,
                check: "bloat",
                object: table.clone(),
                message: format!("{dead} dead tuples against {live} live: autovacuum is not keeping up"),
                fix: format!("VACUUM (ANALYZE) {table}; then lower its autovacuum_vacuum_scale_factor or purge finished runs"),
            });
        }
    }
    for r in client
        .query(
            "SELECT s.indexrelid::regclass::text, s.relid::regclass::text
               FROM pg_stat_user_indexes s
               JOIN pg_index i ON i.indexrelid = s.indexrelid
               JOIN pg_stat_user_tables t ON t.relid = s.relid
               JOIN pg_class c ON c.oid = s.relid
              WHERE s.schemaname = ANY($1) AND NOT c.relispartition
                AND s.idx_scan = 0 AND NOT i.indisunique AND NOT i.indisprimary
                AND t.seq_scan + coalesce(t.idx_scan, 0) >= 10000 AND t.n_live_tup >= $2",
            &[schemas, &opts.min_rows],
        )
        .await?
    {
        let (index, table): (String, String) = (r.get(0), r.get(1));
        out.push(Finding {
            severity: Severity::Info,
            check: "unused_index",
            object: index.clone(),
            message: format!("never used although {table} is busy"),
            fix: format!("check over a full business cycle, then DROP INDEX {index};"),
        });
    }

    // Partitions ahead: at least one whole month beyond this one.
    let wanted = now + Months::new(1);
    for p in &opts.partitions {
        let horizon = partitions::list(client, p).await?.last().map(|x| x.to);
        if horizon.is_none_or(|h| h < wanted) {
            out.push(Finding {
                severity: Severity::Error,
                check: "partitions_ahead",
                object: format!("{}.{}", p.schema, p.table),
                message: format!(
                    "partitions reach only {}; inserts after that fail",
                    horizon
                        .map(|h| h.to_rfc3339())
                        .unwrap_or_else(|| "nowhere".into())
                ),
                fix: "run `dalp partitions --apply` (dalp up does hourly)".into(),
            });
        }
    }
    out.sort_by(|a, b| b.severity.cmp(&a.severity).then(a.object.cmp(&b.object)));
    Ok(out)
}

/// The role `dalp db top --component` filters by.
pub fn role_of_component(name: &str) -> Option<&'static str> {
    if name == "migrator" {
        return Some(MIGRATOR_ROLE);
    }
    Component::ALL
        .iter()
        .find(|c| {
            c.application_name() == name
                || c.role() == name
                || c.application_name().trim_start_matches("dalp-") == name
        })
        .map(|c| c.role())
}

/// A statement's generic plan.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub statement: Statement,
    /// EXPLAIN output, or why there is none.
    pub plan: Result<String, String>,
}

/// Plans of the `limit` heaviest statements of `role`: each is prepared and explained with
/// `plan_cache_mode = force_generic_plan`, so the plan does not depend on parameter values
/// (PostgreSQL 15 has no EXPLAIN (GENERIC_PLAN)). Runs as the owner inside a transaction that
/// is rolled back; EXPLAIN without ANALYZE executes nothing.
pub async fn explain(
    client: &mut Client,
    role: &str,
    order: TopOrder,
    limit: i64,
) -> Result<Vec<Plan>, AnalysisError> {
    let statements = top(client, order, limit * 4, Some(role)).await?;
    let mut plans = Vec::new();
    for st in statements {
        if plans.len() as i64 >= limit {
            break;
        }
        let q = st.query.trim_start().to_ascii_lowercase();
        let explainable = ["select", "insert", "update", "delete", "with"]
            .iter()
            .any(|k| q.starts_with(k));
        // pg_stat_statements keeps 300 characters here; a cut statement cannot be planned.
        if !explainable || st.query.chars().count() >= 300 {
            continue;
        }
        let params = (1..=100)
            .take_while(|i| st.query.contains(&format!("${i}")))
            .count();
        let tx = client.transaction().await?;
        tx.batch_execute(&format!(
            "SET LOCAL ROLE {}; SET LOCAL plan_cache_mode = force_generic_plan",
            crate::sql::quote_ident(crate::component::OWNER_ROLE)
        ))
        .await?;
        let args = vec!["NULL"; params].join(", ");
        let prepared = tx
            .batch_execute(&format!("PREPARE dalp_explain AS {}", st.query))
            .await;
        let plan = match prepared {
            Err(e) => Err(e
                .as_db_error()
                .map(|d| d.message().to_string())
                .unwrap_or_else(|| e.to_string())),
            Ok(()) => {
                let sql = if params == 0 {
                    "EXPLAIN EXECUTE dalp_explain".to_string()
                } else {
                    format!("EXPLAIN EXECUTE dalp_explain({args})")
                };
                match tx.query(sql.as_str(), &[]).await {
                    Ok(rows) => Ok(rows
                        .iter()
                        .map(|r| r.get::<_, String>(0))
                        .collect::<Vec<_>>()
                        .join("\n")),
                    Err(e) => Err(e
                        .as_db_error()
                        .map(|d| d.message().to_string())
                        .unwrap_or_else(|| e.to_string())),
                }
            }
        };
        tx.rollback().await?;
        plans.push(Plan {
            statement: st,
            plan,
        });
    }
    Ok(plans)
}
