//! The partition manager for time-partitioned tables (audit events now, indexed chain data
//! later): monthly range partitions kept ahead of time, and retention enforced by dropping
//! whole expired partitions — detach, record, drop, in one transaction. It runs as the owner
//! role (a member of `dalp_owner`), like migrations.

use chrono::{DateTime, Datelike, Months, NaiveDate, TimeZone, Utc};
use serde::Serialize;
use tokio_postgres::Client;

use crate::component::OWNER_ROLE;
use crate::sql::quote_ident;

/// How one partitioned table is kept.
#[derive(Debug, Clone, Copy)]
pub struct PartitionPolicy {
    /// Schema-qualified parent, e.g. `dalp_audit.events`.
    pub schema: &'static str,
    pub table: &'static str,
    /// Months of partitions kept ahead of the current one.
    pub ahead_months: u32,
    /// Partitions whose whole range is older than this many months are dropped.
    pub retention_months: Option<u32>,
    /// Table (schema-qualified) that gets one row per dropped partition, columns
    /// `(table_name, partition_name, range_from, range_to, rows_dropped)`.
    pub retention_log: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Partition {
    pub name: String,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Maintenance {
    pub table: String,
    pub created: Vec<String>,
    pub dropped: Vec<(String, i64)>,
    /// End of the last partition: inserts up to here are covered.
    pub horizon: Option<DateTime<Utc>>,
}

fn month_start(d: DateTime<Utc>) -> DateTime<Utc> {
    Utc.from_utc_datetime(
        &NaiveDate::from_ymd_opt(d.year(), d.month(), 1)
            .expect("valid month")
            .and_hms_opt(0, 0, 0)
            .expect("midnight"),
    )
}

/// Parses `FOR VALUES FROM ('2026-11-01 00:00:00+00') TO ('2026-12-01 00:00:00+00')`
/// as printed with `TimeZone = UTC`.
fn parse_bound(expr: &str) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    let quoted: Vec<&str> = expr.split('\'').skip(1).step_by(2).collect();
    let parse = |s: &str| {
        DateTime::parse_from_str(&format!("{s}00"), "%Y-%m-%d %H:%M:%S%z")
            .ok()
            .map(|d| d.with_timezone(&Utc))
    };
    Some((parse(quoted.first()?)?, parse(quoted.get(1)?)?))
}

/// Partitions of `policy`'s table, oldest first.
pub async fn list(
    client: &Client,
    policy: &PartitionPolicy,
) -> Result<Vec<Partition>, tokio_postgres::Error> {
    client.batch_execute("SET TimeZone = 'UTC'").await?;
    let rows = client
        .query(
            "SELECT c.relname::text, pg_get_expr(c.relpartbound, c.oid)
               FROM pg_inherits i
               JOIN pg_class c ON c.oid = i.inhrelid
               JOIN pg_class p ON p.oid = i.inhparent
               JOIN pg_namespace n ON n.oid = p.relnamespace
              WHERE n.nspname = $1 AND p.relname = $2",
            &[&policy.schema, &policy.table],
        )
        .await?;
    let mut parts: Vec<Partition> = rows
        .iter()
        .filter_map(|r| {
            let (from, to) = parse_bound(r.get::<_, &str>(1))?;
            Some(Partition {
                name: r.get(0),
                from,
                to,
            })
        })
        .collect();
    parts.sort_by_key(|p| p.from);
    Ok(parts)
}

/// Creates missing monthly partitions from the month of `now` to `ahead_months` after it,
/// and drops partitions past retention. `client` must be able to `SET ROLE` to the owner.
pub async fn maintain(
    client: &mut Client,
    policy: &PartitionPolicy,
    now: DateTime<Utc>,
) -> Result<Maintenance, tokio_postgres::Error> {
    client
        .batch_execute(&format!("SET ROLE {}", quote_ident(OWNER_ROLE)))
        .await?;
    let mut report = Maintenance {
        table: format!("{}.{}", policy.schema, policy.table),
        ..Default::default()
    };
    let existing = list(client, policy).await?;
    let first = month_start(now);
    for i in 0..=policy.ahead_months {
        let from = first + Months::new(i);
        let to = from + Months::new(1);
        if existing.iter().any(|p| p.from <= from && p.to > from) {
            continue;
        }
        let name = format!("{}_p{}", policy.table, from.format("%Y%m"));
        let sql = format!(
            "CREATE TABLE IF NOT EXISTS {}.{} PARTITION OF {}.{} FOR VALUES FROM ('{}') TO ('{}')",
            quote_ident(policy.schema),
            quote_ident(&name),
            quote_ident(policy.schema),
            quote_ident(policy.table),
            from.format("%Y-%m-%d %H:%M:%S+00"),
            to.format("%Y-%m-%d %H:%M:%S+00"),
        );
        client.batch_execute(&sql).await?;
        report.created.push(name);
    }

    if let Some(months) = policy.retention_months {
        let cutoff = now - Months::new(months);
        for p in list(client, policy)
            .await?
            .into_iter()
            .filter(|p| p.to <= cutoff)
        {
            let qualified = format!("{}.{}", quote_ident(policy.schema), quote_ident(&p.name));
            let tx = client.transaction().await?;
            let rows: i64 = tx
                .query_one(&format!("SELECT count(*) FROM {qualified}"), &[])
                .await?
                .get(0);
            tx.batch_execute(&format!(
                "ALTER TABLE {}.{} DETACH PARTITION {qualified}",
                quote_ident(policy.schema),
                quote_ident(policy.table)
            ))
            .await?;
            if let Some(log) = policy.retention_log {
                tx.execute(
                    &format!(
                        "INSERT INTO {log} (table_name, partition_name, range_from, range_to, rows_dropped) VALUES ($1, $2, $3, $4, $5)"
                    ),
                    &[&report.table, &p.name, &p.from, &p.to, &rows],
                )
                .await?;
            }
            tx.batch_execute(&format!("DROP TABLE {qualified}")).await?;
            tx.commit().await?;
            tracing::info!(partition = %p.name, rows, "dropped expired partition");
            report.dropped.push((p.name, rows));
        }
    }
    report.horizon = list(client, policy).await?.last().map(|p| p.to);
    client.batch_execute("RESET ROLE").await?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_range_bounds_as_printed_in_utc() {
        let (f, t) =
            parse_bound("FOR VALUES FROM ('2026-11-01 00:00:00+00') TO ('2026-12-01 00:00:00+00')")
                .unwrap();
        assert_eq!(f, Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap());
        assert_eq!(t, Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap());
        assert!(parse_bound("DEFAULT").is_none());
    }

    #[test]
    fn month_start_truncates() {
        let d = Utc.with_ymd_and_hms(2026, 2, 28, 23, 59, 59).unwrap();
        assert_eq!(
            month_start(d),
            Utc.with_ymd_and_hms(2026, 2, 1, 0, 0, 0).unwrap()
        );
    }
}
