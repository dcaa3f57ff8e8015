//! Drives real server processes. For now: the embedded PostgreSQL cluster behind `dalp up`
//! (initdb, its own CA and server certificate, TLS-only `pg_hba.conf`, start and stop as the
//! `postgres` system user, role bootstrap). Later: Patroni + etcd, pgBackRest, PgBouncer.

pub mod backup;
pub mod embedded;
pub mod error;
pub mod ha;
pub mod pki;
pub mod pooler;
pub mod process;

pub use embedded::{Instance, InstanceInfo, Layout, RunningCluster, StartOptions};
pub use error::OpsError;
pub use ha::{HaCluster, HaOptions};
pub use pooler::{Pooler, PoolerSpec};
