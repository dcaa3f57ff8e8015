//! Statements that work through a transaction-mode pooler (PgBouncer 1.18) and cost one
//! round trip.
//!
//! tokio-postgres's `query(&str, …)` prepares a *named* statement (Parse/Describe/Sync),
//! then binds it in a second exchange and closes it in a third. Through PgBouncer in
//! transaction mode, each exchange outside a transaction may land on a different server
//! connection, where that statement does not exist (or, worse, where another process's
//! leftover statement of the same name does).
//!
//! The `typed_*` methods instead send one unnamed Parse/Bind/Execute/Sync with explicit
//! parameter types (`query_typed`). The types are learned once per SQL text, by preparing
//! it inside a transaction (so all of that stays on one server connection), and cached
//! when they are built-in types (whose OIDs are the same in every database).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, OnceLock, RwLock};

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Error, Row, Transaction};

/// Learned parameter types per SQL text. Bounded: dynamic SQL never grows it without limit.
const CACHE_LIMIT: usize = 4096;
/// OIDs below this are built into PostgreSQL and the same in every database.
const FIRST_NORMAL_OID: u32 = 16384;

fn cache() -> &'static RwLock<HashMap<String, Arc<[Type]>>> {
    static CACHE: OnceLock<RwLock<HashMap<String, Arc<[Type]>>>> = OnceLock::new();
    CACHE.get_or_init(|| RwLock::new(HashMap::new()))
}

fn cached(sql: &str) -> Option<Arc<[Type]>> {
    cache()
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(sql)
        .cloned()
}

fn remember(sql: &str, types: Vec<Type>) -> Arc<[Type]> {
    let types: Arc<[Type]> = types.into();
    if types.iter().all(|t| t.oid() < FIRST_NORMAL_OID) {
        let mut c = cache().write().unwrap_or_else(|e| e.into_inner());
        if c.len() >= CACHE_LIMIT {
            c.clear();
        }
        c.insert(sql.to_string(), types.clone());
    }
    types
}

/// A connection or transaction that can describe a statement and run it unnamed.
pub trait TypedClient: Sync {
    /// The parameter types of `sql`, as the server infers them.
    fn describe_params(&self, sql: &str) -> impl Future<Output = Result<Vec<Type>, Error>> + Send;
    fn query_with_types(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<Vec<Row>, Error>> + Send;
    fn execute_with_types(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<u64, Error>> + Send;
    fn query_one_with_types(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<Row, Error>> + Send;
    fn query_opt_with_types(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<Option<Row>, Error>> + Send;

    /// Like `query`, pooler-safe and in one round trip once the statement's types are known.
    fn typed_query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Vec<Row>, Error>> + Send {
        async move {
            let types = types_of(self, sql).await.inspect_err(count_error)?;
            self.query_with_types(sql, &zip(params, &types))
                .await
                .inspect_err(count_error)
        }
    }

    /// Like `query_one`: exactly one row, else an error.
    fn typed_query_one(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Row, Error>> + Send {
        async move {
            let types = types_of(self, sql).await.inspect_err(count_error)?;
            self.query_one_with_types(sql, &zip(params, &types))
                .await
                .inspect_err(count_error)
        }
    }

    /// Like `query_opt`: at most one row.
    fn typed_query_opt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Option<Row>, Error>> + Send {
        async move {
            let types = types_of(self, sql).await.inspect_err(count_error)?;
            self.query_opt_with_types(sql, &zip(params, &types))
                .await
                .inspect_err(count_error)
        }
    }

    /// Like `execute`: the number of rows affected.
    fn typed_execute(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<u64, Error>> + Send {
        async move {
            let types = types_of(self, sql).await.inspect_err(count_error)?;
            self.execute_with_types(sql, &zip(params, &types))
                .await
                .inspect_err(count_error)
        }
    }
}

/// Errors of store statements by kind, for `/metrics`.
fn error_counts() -> &'static std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>> {
    static E: OnceLock<std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>> =
        OnceLock::new();
    E.get_or_init(Default::default)
}

/// The kind of a statement error: its SQLSTATE class, or `connection` for a lost or
/// failed connection, or `client` for a conversion error on our side.
pub fn error_kind(e: &Error) -> &'static str {
    let Some(code) = e.code() else {
        if e.is_closed() || std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>()) {
            return "connection";
        }
        return "client";
    };
    match &code.code()[..2] {
        "08" => "connection",
        "22" => "data_exception",
        "23" => "integrity_constraint_violation",
        "25" => "invalid_transaction_state",
        "28" => "invalid_authorization",
        "40" => "transaction_rollback",
        "42" => "syntax_or_access_rule",
        "53" => "insufficient_resources",
        "54" => "program_limit_exceeded",
        "55" => "object_not_in_prerequisite_state",
        "57" => "operator_intervention",
        "58" => "system_error",
        "P0" => "plpgsql_error",
        "XX" => "internal_error",
        _ => "other",
    }
}

fn count_error(e: &Error) {
    *error_counts()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(error_kind(e))
        .or_default() += 1;
}

/// Prometheus text of the statement errors counted so far.
pub fn render_errors(out: &mut String) {
    use std::fmt::Write as _;
    let name = "dalp_db_errors_total";
    let _ = writeln!(
        out,
        "# HELP {name} Store statement errors by kind (SQLSTATE class, or connection/client)."
    );
    let _ = writeln!(out, "# TYPE {name} counter");
    for (kind, n) in error_counts()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
    {
        let _ = writeln!(out, "{name}{{kind=\"{kind}\"}} {n}");
    }
}

fn zip<'a>(
    params: &'a [&'a (dyn ToSql + Sync)],
    types: &[Type],
) -> Vec<(&'a (dyn ToSql + Sync), Type)> {
    params
        .iter()
        .zip(
            types
                .iter()
                .cloned()
                .chain(std::iter::repeat(Type::UNKNOWN)),
        )
        .map(|(p, t)| (*p, t))
        .collect()
}

async fn types_of<C: TypedClient + ?Sized>(c: &C, sql: &str) -> Result<Arc<[Type]>, Error> {
    if let Some(t) = cached(sql) {
        return Ok(t);
    }
    Ok(remember(sql, c.describe_params(sql).await?))
}

impl TypedClient for Client {
    async fn describe_params(&self, sql: &str) -> Result<Vec<Type>, Error> {
        // Inside a transaction, so Parse, Describe and Close stay on one pooled server
        // connection.
        self.batch_execute("BEGIN").await?;
        let described = self.prepare(sql).await;
        let end = self
            .batch_execute(if described.is_ok() {
                "COMMIT"
            } else {
                "ROLLBACK"
            })
            .await;
        let statement = described?;
        end?;
        Ok(statement.params().to_vec())
    }
    async fn query_with_types(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<Row>, Error> {
        self.query_typed(sql, params).await
    }
    async fn execute_with_types(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<u64, Error> {
        self.execute_typed(sql, params).await
    }
    async fn query_one_with_types(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Row, Error> {
        self.query_typed_one(sql, params).await
    }
    async fn query_opt_with_types(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Option<Row>, Error> {
        self.query_typed_opt(sql, params).await
    }
}

impl TypedClient for Transaction<'_> {
    async fn describe_params(&self, sql: &str) -> Result<Vec<Type>, Error> {
        Ok(self.prepare(sql).await?.params().to_vec())
    }
    async fn query_with_types(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<Row>, Error> {
        self.query_typed(sql, params).await
    }
    async fn execute_with_types(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<u64, Error> {
        self.execute_typed(sql, params).await
    }
    async fn query_one_with_types(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Row, Error> {
        self.query_typed_one(sql, params).await
    }
    async fn query_opt_with_types(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Option<Row>, Error> {
        self.query_typed_opt(sql, params).await
    }
}
