//! Least privilege as data: each domain crate declares which role may do what in its schema
//! ([`SchemaAccess`]); [`check`] reads what the database actually grants (including grants
//! to PUBLIC and through role membership) and reports every difference.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;
use tokio_postgres::Client;

use crate::component::{Component, MIGRATOR_ROLE, OWNER_ROLE};

/// A set of table privileges.
#[derive(Clone, Copy, PartialEq, Eq, Default, PartialOrd, Ord, Hash)]
pub struct Privs(u8);

/// Table privileges in psql's ACL letter order, with their letters.
const PRIVS: [(Privs, char, &str); 7] = [
    (Privs::INSERT, 'a', "INSERT"),
    (Privs::SELECT, 'r', "SELECT"),
    (Privs::UPDATE, 'w', "UPDATE"),
    (Privs::DELETE, 'd', "DELETE"),
    (Privs::TRUNCATE, 'D', "TRUNCATE"),
    (Privs::REFERENCES, 'x', "REFERENCES"),
    (Privs::TRIGGER, 't', "TRIGGER"),
];

impl Privs {
    pub const NONE: Privs = Privs(0);
    pub const SELECT: Privs = Privs(1);
    pub const INSERT: Privs = Privs(2);
    pub const UPDATE: Privs = Privs(4);
    pub const DELETE: Privs = Privs(8);
    pub const TRUNCATE: Privs = Privs(16);
    pub const REFERENCES: Privs = Privs(32);
    pub const TRIGGER: Privs = Privs(64);
    /// SELECT only.
    pub const READ: Privs = Privs::SELECT;
    /// SELECT, INSERT, UPDATE, DELETE.
    pub const READ_WRITE: Privs = Privs(1 | 2 | 4 | 8);

    pub const fn union(self, other: Privs) -> Privs {
        Privs(self.0 | other.0)
    }

    pub const fn contains(self, other: Privs) -> bool {
        self.0 & other.0 == other.0
    }

    /// SQL keywords of the privileges in the set.
    pub fn keywords(self) -> Vec<&'static str> {
        PRIVS
            .iter()
            .filter(|(p, _, _)| self.contains(*p))
            .map(|(_, _, k)| *k)
            .collect()
    }
}

impl fmt::Display for Privs {
    /// psql's letters (`arwdDxt`), or `-` for none.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            return f.write_str("-");
        }
        for (p, c, _) in PRIVS {
            if self.contains(p) {
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Privs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// What one role may do in one schema: USAGE, `tables` on every table, except the tables
/// listed in `overrides`.
#[derive(Debug, Clone, Copy)]
pub struct RoleGrant {
    pub role: &'static str,
    pub tables: Privs,
    pub overrides: &'static [(&'static str, Privs)],
}

/// The declared access to one schema. A role not listed has no USAGE and no privileges.
#[derive(Debug, Clone, Copy)]
pub struct SchemaAccess {
    pub schema: &'static str,
    pub grants: &'static [RoleGrant],
}

impl SchemaAccess {
    /// Whether `role` is declared on this schema at all (USAGE), and its privileges on `table`.
    pub fn expected(&self, role: &str, table: &str) -> (bool, Privs) {
        match self.grants.iter().find(|g| g.role == role) {
            Some(g) => (
                true,
                g.overrides
                    .iter()
                    .find(|(t, _)| *t == table)
                    .map(|(_, p)| *p)
                    .unwrap_or(g.tables),
            ),
            None => (false, Privs::NONE),
        }
    }
}

/// Access to the migration bookkeeping: every login role may read it (readiness checks).
pub const META_ACCESS: SchemaAccess = SchemaAccess {
    schema: "dalp_meta",
    grants: &[
        RoleGrant {
            role: "dalp_monitor",
            tables: Privs::READ,
            overrides: &[],
        },
        RoleGrant {
            role: "dalp_identity_svc",
            tables: Privs::READ,
            overrides: &[],
        },
        RoleGrant {
            role: "dalp_assets_svc",
            tables: Privs::READ,
            overrides: &[],
        },
        RoleGrant {
            role: "dalp_indexer_svc",
            tables: Privs::READ,
            overrides: &[],
        },
        RoleGrant {
            role: "dalp_workflows_svc",
            tables: Privs::READ,
            overrides: &[],
        },
        RoleGrant {
            role: "dalp_auditor",
            tables: Privs::READ,
            overrides: &[],
        },
        RoleGrant {
            role: "dalp_readonly",
            tables: Privs::READ,
            overrides: &[],
        },
        RoleGrant {
            role: "dalp_audit_sealer",
            tables: Privs::READ,
            overrides: &[],
        },
        RoleGrant {
            role: MIGRATOR_ROLE,
            tables: Privs::READ,
            overrides: &[],
        },
    ],
};

/// What a role actually has in one schema.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Cell {
    pub role: String,
    pub schema: String,
    pub usage: bool,
    pub create: bool,
    /// Privileges per table.
    pub tables: BTreeMap<String, String>,
}

impl Cell {
    /// Compact text: `U:arwd`, `-`, or `U:mixed` when tables differ.
    pub fn summary(&self) -> String {
        let set: BTreeSet<&String> = self.tables.values().collect();
        let tables = match set.len() {
            0 => "-".to_string(),
            1 => set.into_iter().next().cloned().unwrap_or_default(),
            _ => "mixed".to_string(),
        };
        let mut s = String::new();
        if self.usage {
            s.push('U');
        }
        if self.create {
            s.push('C');
        }
        if s.is_empty() && tables == "-" {
            return "-".into();
        }
        format!("{}:{}", if s.is_empty() { "-" } else { &s }, tables)
    }
}

/// The actual matrix and every difference from the declaration.
#[derive(Debug, Clone, Serialize)]
pub struct AccessReport {
    pub roles: Vec<String>,
    pub schemas: Vec<String>,
    pub cells: Vec<Cell>,
    pub drift: Vec<String>,
}

impl AccessReport {
    pub fn is_clean(&self) -> bool {
        self.drift.is_empty()
    }

    pub fn cell(&self, role: &str, schema: &str) -> Option<&Cell> {
        self.cells
            .iter()
            .find(|c| c.role == role && c.schema == schema)
    }

    /// A fixed-width table: roles down, schemas across.
    pub fn render(&self) -> String {
        let w0 = self.roles.iter().map(|r| r.len()).max().unwrap_or(4).max(4);
        let widths: Vec<usize> = self
            .schemas
            .iter()
            .map(|s| {
                self.roles
                    .iter()
                    .filter_map(|r| self.cell(r, s).map(|c| c.summary().len()))
                    .max()
                    .unwrap_or(1)
                    .max(s.len())
            })
            .collect();
        let mut out = format!("{:w0$}", "role");
        for (s, w) in self.schemas.iter().zip(&widths) {
            out.push_str(&format!("  {s:w$}"));
        }
        out.push('\n');
        for r in &self.roles {
            out.push_str(&format!("{r:w0$}"));
            for (s, w) in self.schemas.iter().zip(&widths) {
                let v = self.cell(r, s).map(|c| c.summary()).unwrap_or_default();
                out.push_str(&format!("  {v:w$}"));
            }
            out.push('\n');
        }
        out.push_str("legend: U=USAGE C=CREATE on the schema; table privileges a=INSERT r=SELECT w=UPDATE d=DELETE D=TRUNCATE x=REFERENCES t=TRIGGER\n");
        out
    }
}

/// Roles whose privileges are compared: the component roles. The owner owns everything and
/// the migrator acts as the owner; their attributes and memberships are checked instead.
fn checked_roles() -> Vec<&'static str> {
    Component::ALL.into_iter().map(Component::role).collect()
}

/// Compares the database with `declared` (plus [`META_ACCESS`]); also checks role attributes,
/// memberships, ownership and that nobody may CREATE in `public`.
pub async fn check(
    client: &Client,
    declared: &[SchemaAccess],
) -> Result<AccessReport, tokio_postgres::Error> {
    let mut declared: Vec<SchemaAccess> = declared.to_vec();
    declared.push(META_ACCESS);
    let roles = checked_roles();
    let schema_names: Vec<&str> = declared
        .iter()
        .map(|d| d.schema)
        .chain(std::iter::once("public"))
        .collect();
    let mut drift = Vec::new();

    let existing: BTreeMap<String, String> = client
        .query(
            "SELECT n.nspname::text, pg_get_userbyid(n.nspowner)::text FROM pg_namespace n WHERE n.nspname = ANY($1)",
            &[&schema_names],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for d in &declared {
        match existing.get(d.schema) {
            None => drift.push(format!(
                "schema {} does not exist (run `dalp migrate`)",
                d.schema
            )),
            Some(owner) if owner != OWNER_ROLE => drift.push(format!(
                "schema {} is owned by {owner}, declared {OWNER_ROLE}",
                d.schema
            )),
            _ => {}
        }
    }

    let mut cells: BTreeMap<(String, String), Cell> = BTreeMap::new();
    for row in client
        .query(
            "SELECT r.rolname::text, n.nspname::text,
                    has_schema_privilege(r.oid, n.oid, 'USAGE'),
                    has_schema_privilege(r.oid, n.oid, 'CREATE')
               FROM pg_roles r CROSS JOIN pg_namespace n
              WHERE r.rolname = ANY($1) AND n.nspname = ANY($2)",
            &[&roles, &schema_names],
        )
        .await?
    {
        let (role, schema): (String, String) = (row.get(0), row.get(1));
        cells.insert(
            (role.clone(), schema.clone()),
            Cell {
                role,
                schema,
                usage: row.get(2),
                create: row.get(3),
                tables: BTreeMap::new(),
            },
        );
    }
    for r in &roles {
        if !cells.keys().any(|(role, _)| role == r) {
            drift.push(format!("role {r} does not exist"));
        }
    }

    let rows = client
        .query(
            "SELECT r.rolname::text, n.nspname::text, c.relname::text, pg_get_userbyid(c.relowner)::text,
                    has_table_privilege(r.oid, c.oid, 'SELECT'),
                    has_table_privilege(r.oid, c.oid, 'INSERT'),
                    has_table_privilege(r.oid, c.oid, 'UPDATE'),
                    has_table_privilege(r.oid, c.oid, 'DELETE'),
                    has_table_privilege(r.oid, c.oid, 'TRUNCATE'),
                    has_table_privilege(r.oid, c.oid, 'REFERENCES'),
                    has_table_privilege(r.oid, c.oid, 'TRIGGER')
               FROM pg_roles r
               CROSS JOIN pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE r.rolname = ANY($1) AND n.nspname = ANY($2) AND n.nspname <> 'public'
                AND c.relkind IN ('r', 'p', 'v', 'm', 'f') AND NOT c.relispartition
              ORDER BY 1, 2, 3",
            &[&roles, &schema_names],
        )
        .await?;
    let mut owners_reported = BTreeSet::new();
    for row in rows {
        let (role, schema, table, owner): (String, String, String, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let flags = [
            Privs::SELECT,
            Privs::INSERT,
            Privs::UPDATE,
            Privs::DELETE,
            Privs::TRUNCATE,
            Privs::REFERENCES,
            Privs::TRIGGER,
        ];
        let actual = flags
            .iter()
            .enumerate()
            .filter(|(i, _)| row.get::<_, bool>(i + 4))
            .fold(Privs::NONE, |acc, (_, p)| acc.union(*p));
        if owner != OWNER_ROLE && owners_reported.insert((schema.clone(), table.clone())) {
            drift.push(format!(
                "{schema}.{table} is owned by {owner}, declared {OWNER_ROLE}"
            ));
        }
        if let Some(d) = declared.iter().find(|d| d.schema == schema) {
            let (_, expected) = d.expected(&role, &table);
            if actual != expected {
                drift.push(format!(
                    "{role} on {schema}.{table}: has {actual}, declared {expected}"
                ));
            }
        }
        if let Some(cell) = cells.get_mut(&(role, schema)) {
            cell.tables.insert(table, actual.to_string());
        }
    }

    for cell in cells.values() {
        let declared_usage = declared
            .iter()
            .find(|d| d.schema == cell.schema)
            .map(|d| d.expected(&cell.role, "").0);
        if cell.create {
            drift.push(format!(
                "{} has CREATE on schema {}, declared none",
                cell.role, cell.schema
            ));
        }
        if let Some(expected) = declared_usage {
            if cell.usage != expected {
                drift.push(format!(
                    "{} USAGE on schema {}: has {}, declared {}",
                    cell.role, cell.schema, cell.usage, expected
                ));
            }
        }
    }

    drift.extend(check_role_attributes(client).await?);

    Ok(AccessReport {
        roles: roles.iter().map(|r| r.to_string()).collect(),
        schemas: schema_names.iter().map(|s| s.to_string()).collect(),
        cells: cells.into_values().collect(),
        drift,
    })
}

/// Attributes and memberships: the owner cannot log in, nobody is a superuser or may create
/// roles or databases, component roles belong to no other role, and only the migrator
/// (and later the two-factor admin role) is a member of the owner.
async fn check_role_attributes(client: &Client) -> Result<Vec<String>, tokio_postgres::Error> {
    let mut drift = Vec::new();
    let mut all: Vec<&str> = checked_roles();
    all.push(OWNER_ROLE);
    all.push(MIGRATOR_ROLE);
    let rows = client
        .query(
            "SELECT rolname::text, rolcanlogin, rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls
               FROM pg_roles WHERE rolname = ANY($1)",
            &[&all],
        )
        .await?;
    for row in rows {
        let role: String = row.get(0);
        let login: bool = row.get(1);
        let want_login = role != OWNER_ROLE;
        if login != want_login {
            drift.push(format!(
                "role {role}: LOGIN is {login}, declared {want_login}"
            ));
        }
        for (i, attr) in [
            (2, "SUPERUSER"),
            (3, "CREATEROLE"),
            (4, "CREATEDB"),
            (5, "REPLICATION"),
            (6, "BYPASSRLS"),
        ] {
            if row.get::<_, bool>(i) {
                drift.push(format!("role {role} has {attr}, declared none"));
            }
        }
    }
    let memberships = client
        .query(
            "SELECT m.rolname::text, g.rolname::text
               FROM pg_auth_members a
               JOIN pg_roles m ON m.oid = a.member
               JOIN pg_roles g ON g.oid = a.roleid
              WHERE m.rolname = ANY($1) OR g.rolname = ANY($1)",
            &[&all],
        )
        .await?;
    for row in memberships {
        let (member, group): (String, String) = (row.get(0), row.get(1));
        let allowed = (group == OWNER_ROLE && (member == MIGRATOR_ROLE || member == "dalp_admin"))
            || (group == "pg_read_all_stats" && (member == MIGRATOR_ROLE || member == OWNER_ROLE))
            || (group == crate::component::MONITOR_GROUP
                && member == crate::Component::Monitor.role());
        if !allowed {
            drift.push(format!(
                "role {member} is a member of {group}, declared not"
            ));
        }
    }
    let migrator_is_member: bool = client
        .query_one(
            "SELECT pg_has_role($1, $2, 'MEMBER')",
            &[&MIGRATOR_ROLE, &OWNER_ROLE],
        )
        .await
        .map(|r| r.get(0))
        .unwrap_or(false);
    if !migrator_is_member {
        drift.push(format!(
            "role {MIGRATOR_ROLE} is not a member of {OWNER_ROLE}"
        ));
    }
    Ok(drift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn privs_render_in_psql_letters() {
        assert_eq!(Privs::READ_WRITE.to_string(), "arwd");
        assert_eq!(Privs::INSERT.to_string(), "a");
        assert_eq!(Privs::NONE.to_string(), "-");
        assert_eq!(
            Privs::READ.union(Privs::TRUNCATE).keywords(),
            ["SELECT", "TRUNCATE"]
        );
    }

    #[test]
    fn overrides_win_over_the_schema_default() {
        const A: SchemaAccess = SchemaAccess {
            schema: "s",
            grants: &[RoleGrant {
                role: "r",
                tables: Privs::READ,
                overrides: &[("secret", Privs::NONE)],
            }],
        };
        assert_eq!(A.expected("r", "t"), (true, Privs::READ));
        assert_eq!(A.expected("r", "secret"), (true, Privs::NONE));
        assert_eq!(A.expected("other", "t"), (false, Privs::NONE));
    }
}
