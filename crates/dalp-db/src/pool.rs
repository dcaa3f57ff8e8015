//! One connection pool per component role.

use std::collections::BTreeMap;
use std::time::Duration;

use deadpool_postgres::{Pool, RecyclingMethod, Runtime};

use crate::component::Component;
use crate::connect::{ConnectError, ConnectOptions};
use crate::secrets::{Secrets, SecretsError};

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(transparent)]
    Secrets(#[from] SecretsError),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("building the pool for {role}: {message}")]
    Build { role: String, message: String },
}

/// A pool per [`Component`], each logging in as that component's role with its own
/// `application_name`. Components never borrow each other's pools.
#[derive(Clone)]
pub struct ComponentPools {
    pools: BTreeMap<Component, Pool>,
    options: BTreeMap<Component, ConnectOptions>,
}

impl ComponentPools {
    /// Builds (lazily connecting) pools for every component. `base` supplies hosts,
    /// database, CA and timeouts; user, password and application name are set per role.
    pub fn build(
        base: &ConnectOptions,
        secrets: &Secrets,
        max_size: usize,
        wait_timeout: Duration,
    ) -> Result<ComponentPools, PoolError> {
        Self::build_via(base, base, secrets, max_size, wait_timeout)
    }

    /// Like [`ComponentPools::build`], but the pools connect through `pooled` (a PgBouncer in
    /// transaction mode) while [`ComponentPools::options`] still describe direct connections
    /// (`direct`), for LISTEN and other session-bound work.
    pub fn build_via(
        pooled: &ConnectOptions,
        direct: &ConnectOptions,
        secrets: &Secrets,
        max_size: usize,
        wait_timeout: Duration,
    ) -> Result<ComponentPools, PoolError> {
        let mut pools = BTreeMap::new();
        let mut options = BTreeMap::new();
        for component in Component::ALL {
            let for_role = |base: &ConnectOptions| -> Result<ConnectOptions, PoolError> {
                let mut opts = base.clone();
                opts.user = component.role().to_string();
                opts.password = Some(secrets.password(component.role())?);
                opts.application_name = component.application_name().to_string();
                Ok(opts)
            };
            let via = for_role(pooled)?;
            let opts = for_role(direct)?;
            let manager = via.manager(RecyclingMethod::Fast)?;
            let pool = Pool::builder(manager)
                .max_size(max_size)
                .wait_timeout(Some(wait_timeout))
                .create_timeout(Some(via.connect_timeout))
                .runtime(Runtime::Tokio1)
                .build()
                .map_err(|e| PoolError::Build {
                    role: component.role().to_string(),
                    message: e.to_string(),
                })?;
            pools.insert(component, pool);
            options.insert(component, opts);
        }
        Ok(ComponentPools { pools, options })
    }

    /// The pool of `component`.
    pub fn get(&self, component: Component) -> &Pool {
        &self.pools[&component]
    }

    /// Direct connection options for `component` (e.g. for a dedicated LISTEN connection);
    /// the same as the pool's unless it goes through a pooler.
    pub fn options(&self, component: Component) -> &ConnectOptions {
        &self.options[&component]
    }

    /// Closes every pool; in-flight connections are dropped when returned.
    pub fn close(&self) {
        for pool in self.pools.values() {
            pool.close();
        }
    }
}

/// Upper bounds (seconds) of the pool-wait histogram buckets.
const WAIT_BUCKETS: [f64; 10] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 1.0, 5.0,
];

#[derive(Default, Clone)]
struct WaitHistogram {
    counts: [u64; WAIT_BUCKETS.len()],
    count: u64,
    sum: f64,
    timeouts: u64,
}

fn waits() -> &'static std::sync::Mutex<BTreeMap<&'static str, WaitHistogram>> {
    static W: std::sync::OnceLock<std::sync::Mutex<BTreeMap<&'static str, WaitHistogram>>> =
        std::sync::OnceLock::new();
    W.get_or_init(Default::default)
}

/// Takes a connection from `pool` for the store named `store`, recording how long the
/// caller waited (the time to create one included) for `/metrics`.
pub async fn checkout(
    pool: &Pool,
    store: &'static str,
) -> Result<deadpool_postgres::Object, deadpool_postgres::PoolError> {
    let started = std::time::Instant::now();
    let result = pool.get().await;
    let secs = started.elapsed().as_secs_f64();
    let mut map = waits().lock().unwrap_or_else(|e| e.into_inner());
    let h = map.entry(store).or_default();
    if result.is_err() {
        h.timeouts += 1;
    }
    for (i, le) in WAIT_BUCKETS.iter().enumerate() {
        if secs <= *le {
            h.counts[i] += 1;
        }
    }
    h.count += 1;
    h.sum += secs;
    result
}

/// Prometheus text of the pool waits recorded by [`checkout`].
pub fn render_waits(out: &mut String) {
    use std::fmt::Write as _;
    let map = waits().lock().unwrap_or_else(|e| e.into_inner());
    let name = "dalp_pool_wait_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Time a store waited for a pooled connection (creating one included)."
    );
    let _ = writeln!(out, "# TYPE {name} histogram");
    for (store, h) in map.iter() {
        for (i, le) in WAIT_BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{store=\"{store}\",le=\"{le}\"}} {}",
                h.counts[i]
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{store=\"{store}\",le=\"+Inf\"}} {}",
            h.count
        );
        let _ = writeln!(out, "{name}_sum{{store=\"{store}\"}} {:.6}", h.sum);
        let _ = writeln!(out, "{name}_count{{store=\"{store}\"}} {}", h.count);
    }
    let name = "dalp_pool_checkout_failures_total";
    let _ = writeln!(
        out,
        "# HELP {name} Checkouts that failed (pool timeout or no connection could be made)."
    );
    let _ = writeln!(out, "# TYPE {name} counter");
    for (store, h) in map.iter() {
        let _ = writeln!(out, "{name}{{store=\"{store}\"}} {}", h.timeouts);
    }
}
