//! The migration runner. Each domain crate embeds its numbered SQL files as a
//! [`MigrationSet`]; the runner applies pending ones as the owner role, one transaction per
//! migration, under an advisory lock so two concurrent runners never interleave, and refuses
//! to continue when an applied migration was edited afterwards (its checksum changed).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio_postgres::Client;

use crate::component::{login_roles, OWNER_ROLE, PGAUDIT_ROLE};
use crate::sql::quote_ident;

/// One numbered SQL file of a schema.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub sql: &'static str,
}

impl Migration {
    /// SHA-256 of the SQL text, hex encoded; recorded when applied.
    pub fn checksum(&self) -> String {
        hex::encode(Sha256::digest(self.sql.as_bytes()))
    }
}

/// The ordered migrations of one schema, embedded in the binary by the crate that owns it.
#[derive(Debug, Clone, Copy)]
pub struct MigrationSet {
    pub schema: &'static str,
    pub migrations: &'static [Migration],
}

impl MigrationSet {
    pub fn latest_version(&self) -> u32 {
        self.migrations.last().map(|m| m.version).unwrap_or(0)
    }
}

/// Session advisory lock key ("dalpmigr") that serialises concurrent runners.
const LOCK_KEY: i64 = 0x6461_6c70_6d69_6772;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("cannot act as the owner role {OWNER_ROLE} while connected as {user}: {source}. Migrations must run as a member of {OWNER_ROLE} (GRANT {OWNER_ROLE} TO {user})")]
    NotOwner {
        user: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("roles missing in the database: {}. Create them first with `dalp roles create` as a role with CREATEROLE", .0.join(", "))]
    MissingRoles(Vec<String>),
    #[error("migration {schema}/{version:04}_{name} was edited after it was applied (recorded checksum {recorded}, embedded {embedded}); restore the original file and add a new migration instead")]
    Tampered {
        schema: String,
        version: u32,
        name: String,
        recorded: String,
        embedded: String,
    },
    #[error("the database has migration {schema}/{version:04}_{name} which this dalp binary does not know; run a newer dalp")]
    Unknown {
        schema: String,
        version: u32,
        name: String,
    },
    #[error("embedded migrations of {schema} are not strictly increasing at version {version}")]
    InvalidSet { schema: String, version: u32 },
    #[error("migration {schema}/{version:04}_{name} failed and was rolled back: {source}")]
    Failed {
        schema: String,
        version: u32,
        name: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("database error while migrating: {0}")]
    Db(#[from] tokio_postgres::Error),
}

/// A migration recorded in `dalp_meta.schema_migrations`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedMigration {
    pub schema: String,
    pub version: u32,
    pub name: String,
    pub checksum: String,
}

/// What one run did (or, in a dry run, would do).
#[derive(Debug, Default)]
pub struct MigrationReport {
    /// `(schema, version, name, time taken)` of migrations applied by this run, in order.
    pub applied: Vec<(String, u32, String, Duration)>,
    /// Migrations that were already applied before this run.
    pub already_applied: usize,
}

/// Per-schema state for `status` and readiness.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SchemaStatus {
    pub schema: String,
    pub applied_version: u32,
    pub latest_version: u32,
}

impl SchemaStatus {
    pub fn is_current(&self) -> bool {
        self.applied_version == self.latest_version
    }
}

const META_DDL: &str = "
CREATE SCHEMA IF NOT EXISTS dalp_meta;
CREATE TABLE IF NOT EXISTS dalp_meta.schema_migrations (
    schema_name  text        NOT NULL,
    version      integer     NOT NULL CHECK (version > 0),
    name         text        NOT NULL,
    checksum     text        NOT NULL,
    applied_at   timestamptz NOT NULL DEFAULT now(),
    applied_by   text        NOT NULL DEFAULT session_user,
    execution_ms integer     NOT NULL,
    PRIMARY KEY (schema_name, version)
);
-- Where a node's data stands, for replica routing (`dalp_db::ha`): whether it is in
-- recovery, its replayed (or, on a primary, current) WAL position, and the timeline it
-- follows: on a replica only while its WAL receiver streams, else NULL. A replica that is
-- not streaming may replay WAL of a timeline the cluster has left (after a failover) and
-- report a position past commits it lacks, so routing needs the timeline as well as the
-- position. SECURITY DEFINER because only pg_read_all_stats sees the receiver's state
-- (the owner role has it); it returns nothing else.
CREATE OR REPLACE FUNCTION dalp_meta.replica_state(
    OUT in_recovery boolean, OUT wal_position pg_lsn, OUT timeline integer)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
SELECT r,
       CASE WHEN r THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END,
       CASE WHEN r THEN (SELECT received_tli FROM pg_stat_wal_receiver WHERE status = 'streaming')
            ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::integer
       END
  FROM pg_is_in_recovery() AS r
$fn$;
REVOKE ALL ON FUNCTION dalp_meta.replica_state() FROM PUBLIC;
";

/// Reads what is recorded as applied; empty when the bookkeeping table does not exist yet.
pub async fn applied(client: &Client) -> Result<Vec<AppliedMigration>, tokio_postgres::Error> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('dalp_meta.schema_migrations') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    if !exists {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            "SELECT schema_name, version, name, checksum FROM dalp_meta.schema_migrations ORDER BY schema_name, version",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| AppliedMigration {
            schema: r.get(0),
            version: r.get::<_, i32>(1) as u32,
            name: r.get(2),
            checksum: r.get(3),
        })
        .collect())
}

/// Applied versus embedded version per schema. Any role with SELECT on the bookkeeping
/// table (every component role) may call this.
pub async fn status(
    client: &Client,
    sets: &[MigrationSet],
) -> Result<Vec<SchemaStatus>, tokio_postgres::Error> {
    let applied = applied(client).await?;
    Ok(sets
        .iter()
        .map(|set| SchemaStatus {
            schema: set.schema.to_string(),
            applied_version: applied
                .iter()
                .filter(|a| a.schema == set.schema)
                .map(|a| a.version)
                .max()
                .unwrap_or(0),
            latest_version: set.latest_version(),
        })
        .collect())
}

/// Migrations still to apply, `(schema, migration)` in order, and how many are applied.
type Plan<'a> = (Vec<(&'a str, &'a Migration)>, usize);

/// Checks recorded migrations against the embedded ones and returns those still to apply.
fn plan<'a>(
    sets: &'a [MigrationSet],
    applied: &[AppliedMigration],
) -> Result<Plan<'a>, MigrateError> {
    let mut by_key: BTreeMap<(&str, u32), &AppliedMigration> = BTreeMap::new();
    for a in applied {
        by_key.insert((a.schema.as_str(), a.version), a);
    }
    let mut pending = Vec::new();
    let mut already = 0;
    for set in sets {
        let mut last = 0;
        for m in set.migrations {
            if m.version <= last {
                return Err(MigrateError::InvalidSet {
                    schema: set.schema.into(),
                    version: m.version,
                });
            }
            last = m.version;
            match by_key.remove(&(set.schema, m.version)) {
                Some(a) => {
                    let embedded = m.checksum();
                    if a.checksum != embedded {
                        return Err(MigrateError::Tampered {
                            schema: set.schema.into(),
                            version: m.version,
                            name: m.name.into(),
                            recorded: a.checksum.clone(),
                            embedded,
                        });
                    }
                    already += 1;
                }
                None => pending.push((set.schema, m)),
            }
        }
    }
    // Whatever is left was recorded for a schema we embed but a version we do not know.
    if let Some(a) = by_key
        .values()
        .find(|a| sets.iter().any(|s| s.schema == a.schema))
    {
        return Err(MigrateError::Unknown {
            schema: a.schema.clone(),
            version: a.version,
            name: a.name.clone(),
        });
    }
    Ok((pending, already))
}

/// Applies every pending migration of `sets`, in order. The connected user must be a member
/// of the owner role; objects are created as the owner. With `dry_run`, nothing is written
/// and the report lists what would be applied.
pub async fn migrate(
    client: &mut Client,
    sets: &[MigrationSet],
    dry_run: bool,
) -> Result<MigrationReport, MigrateError> {
    let user: String = client
        .query_one("SELECT session_user::text", &[])
        .await?
        .get(0);
    if let Err(source) = client
        .batch_execute(&format!("SET ROLE {}", quote_ident(OWNER_ROLE)))
        .await
    {
        return Err(MigrateError::NotOwner { user, source });
    }
    let wanted: Vec<&str> = login_roles().chain([PGAUDIT_ROLE]).collect();
    let missing: Vec<String> = client
        .query(
            "SELECT r FROM unnest($1::text[]) AS r WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r)",
            &[&wanted],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !missing.is_empty() {
        return Err(MigrateError::MissingRoles(missing));
    }

    if dry_run {
        let applied = applied(client).await?;
        let (pending, already) = plan(sets, &applied)?;
        return Ok(MigrationReport {
            applied: pending
                .into_iter()
                .map(|(s, m)| (s.to_string(), m.version, m.name.to_string(), Duration::ZERO))
                .collect(),
            already_applied: already,
        });
    }

    client
        .execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY])
        .await?;
    let result = apply_locked(client, sets).await;
    // Release even on failure; closing the session would release it too.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY])
        .await;
    result
}

async fn apply_locked(
    client: &mut Client,
    sets: &[MigrationSet],
) -> Result<MigrationReport, MigrateError> {
    let grants: String = login_roles()
        .map(|r| {
            format!(
                "GRANT USAGE ON SCHEMA dalp_meta TO {q}; GRANT SELECT ON dalp_meta.schema_migrations TO {q}; GRANT EXECUTE ON FUNCTION dalp_meta.replica_state() TO {q};",
                q = quote_ident(r)
            )
        })
        .collect();
    client.batch_execute(&format!("{META_DDL}{grants}")).await?;
    let applied = applied(client).await?;
    let (pending, already) = plan(sets, &applied)?;
    let mut report = MigrationReport {
        applied: Vec::new(),
        already_applied: already,
    };
    for (schema, m) in pending {
        let started = Instant::now();
        let fail = |source| MigrateError::Failed {
            schema: schema.into(),
            version: m.version,
            name: m.name.into(),
            source,
        };
        let tx = client.transaction().await?;
        tx.batch_execute(&format!("SET LOCAL search_path TO {}", quote_ident(schema)))
            .await
            .map_err(fail)?;
        tx.batch_execute(m.sql).await.map_err(fail)?;
        let elapsed = started.elapsed();
        tx.execute(
            "INSERT INTO dalp_meta.schema_migrations (schema_name, version, name, checksum, execution_ms) VALUES ($1, $2, $3, $4, $5)",
            &[
                &schema,
                &(m.version as i32),
                &m.name,
                &m.checksum(),
                &(elapsed.as_millis().min(i32::MAX as u128) as i32),
            ],
        )
        .await
        .map_err(fail)?;
        tx.commit().await.map_err(fail)?;
        tracing::info!(
            schema,
            version = m.version,
            name = m.name,
            ms = elapsed.as_millis() as u64,
            "migration applied"
        );
        report
            .applied
            .push((schema.to_string(), m.version, m.name.to_string(), elapsed));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &[Migration] = &[
        Migration {
            version: 1,
            name: "init",
            sql: "select 1",
        },
        Migration {
            version: 2,
            name: "more",
            sql: "select 2",
        },
    ];

    fn rec(schema: &str, m: &Migration) -> AppliedMigration {
        AppliedMigration {
            schema: schema.into(),
            version: m.version,
            name: m.name.into(),
            checksum: m.checksum(),
        }
    }

    #[test]
    fn plan_lists_only_pending() {
        let sets = [MigrationSet {
            schema: "s",
            migrations: A,
        }];
        let (pending, already) = plan(&sets, &[rec("s", &A[0])]).unwrap();
        assert_eq!(already, 1);
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].1.version, 2);
    }

    #[test]
    fn plan_refuses_edited_and_unknown_migrations() {
        let sets = [MigrationSet {
            schema: "s",
            migrations: A,
        }];
        let mut edited = rec("s", &A[0]);
        edited.checksum = "00".into();
        assert!(matches!(
            plan(&sets, &[edited]),
            Err(MigrateError::Tampered { version: 1, .. })
        ));
        let unknown = AppliedMigration {
            schema: "s".into(),
            version: 9,
            name: "future".into(),
            checksum: "x".into(),
        };
        assert!(matches!(
            plan(&sets, &[unknown]),
            Err(MigrateError::Unknown { version: 9, .. })
        ));
    }

    #[test]
    fn plan_refuses_unordered_sets() {
        const BAD: &[Migration] = &[
            Migration {
                version: 2,
                name: "b",
                sql: "",
            },
            Migration {
                version: 1,
                name: "a",
                sql: "",
            },
        ];
        let sets = [MigrationSet {
            schema: "s",
            migrations: BAD,
        }];
        assert!(matches!(
            plan(&sets, &[]),
            Err(MigrateError::InvalidSet { .. })
        ));
    }
}
