//! Drives real server processes: the embedded PostgreSQL cluster behind `dalp up` (initdb,
//! its own CA and server certificate, TLS-only `pg_hba.conf`, start and stop as the
//! `postgres` system user, role bootstrap), the local Patroni + etcd cluster, pgBackRest
//! (backups, archiving, restore, the key bundle a disaster restore needs), PgBouncer.

pub mod backup;
pub mod embedded;
pub mod error;
pub mod guard;
pub mod ha;
pub mod keybundle;
pub mod pki;
pub mod pooler;
pub mod process;
pub mod spec;
pub mod walreceiver;

pub use embedded::{Instance, InstanceInfo, Layout, RunningCluster, StartOptions};
pub use error::OpsError;
pub use ha::{HaCluster, HaOptions};
pub use pooler::{Pooler, PoolerSpec};
pub use spec::ClusterSpec;
