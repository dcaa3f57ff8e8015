//! A cluster over several hosts, from a spec file: `dalp cluster init --spec FILE --dir DIR`
//! makes the cluster's CA, one certificate per host, the secrets, and one bundle directory
//! per host (`DIR/hosts/<name>/`); `dalp node up --bundle DIR/hosts/<name>` on that host
//! starts what it runs. `DIR` itself is the operator's copy: it runs nothing, and `dalp
//! cluster status|switchover --dir DIR` work from it (its certificate is a client one).
//!
//! The spec (TOML):
//!
//! ```toml
//! # Networks (besides the hosts) whose clients — dalp's API servers — may connect.
//! clients = ["10.0.0.0/24"]
//!
//! [[host]]
//! name = "db1"
//! address = "10.0.0.11"
//! roles = ["etcd", "postgres"]
//!
//! [[host]]
//! name = "db2"
//! address = "10.0.0.12"
//! roles = ["etcd", "postgres"]
//!
//! [[host]]
//! name = "db3"
//! address = "10.0.0.13"
//! roles = ["etcd", "postgres"]
//!
//! # The backup repositories (pgBackRest's TLS server), on a host of their own.
//! [[host]]
//! name = "backup"
//! address = "10.0.0.20"
//! roles = ["repository"]
//!
//! # Optional: Patroni's timings (seconds) and the ports every host uses.
//! [timings]
//! ttl = 20
//! loop_wait = 2
//! retry_timeout = 5
//!
//! [ports]
//! postgres = 5432
//! patroni = 8008
//! etcd_client = 2379
//! etcd_peer = 2380
//! backup = 8432
//! ```
//!
//! Each host's bundle is expected at `/var/lib/dalp/cluster` on it (a host's `dir` says
//! otherwise): the repository host reaches each node's data directory and pgBackRest
//! configuration there.

use std::collections::HashSet;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::OpsError;
use crate::ha::{complete_secrets, ClusterFile, EtcdMember, HaOptions, NodeSpec, RepositoryHost};
use crate::pki;
use crate::process::ServerUser;

/// What a host runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// An etcd member (Patroni's DCS).
    Etcd,
    /// PostgreSQL under Patroni.
    Postgres,
    /// The backup repositories (pgBackRest's TLS server; at most one host, not a database
    /// host: a repository must outlive any database host).
    Repository,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Host {
    pub name: String,
    pub address: String,
    pub roles: Vec<Role>,
    /// Where the host's bundle is installed (default `/var/lib/dalp/cluster`): the
    /// repository host reaches a node's data as `<dir>/<name>/pgdata` on its host.
    #[serde(default)]
    pub dir: Option<PathBuf>,
}

/// Where a bundle is installed on its host unless the spec says otherwise.
pub const DEFAULT_BUNDLE_DIR: &str = "/var/lib/dalp/cluster";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timings {
    pub ttl: u32,
    pub loop_wait: u32,
    pub retry_timeout: u32,
    /// Refuse writes when no synchronous standby is available.
    pub synchronous_mode_strict: bool,
}

impl Default for Timings {
    fn default() -> Self {
        let d = HaOptions::default();
        Timings {
            ttl: d.ttl,
            loop_wait: d.loop_wait,
            retry_timeout: d.retry_timeout,
            synchronous_mode_strict: d.synchronous_mode_strict,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ports {
    pub postgres: u16,
    pub patroni: u16,
    pub etcd_client: u16,
    pub etcd_peer: u16,
    /// Every host's `pgbackrest server` (with a repository host).
    pub backup: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Ports {
            postgres: 5432,
            patroni: 8008,
            etcd_client: 2379,
            etcd_peer: 2380,
            backup: 8432,
        }
    }
}

/// A cluster spec file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    #[serde(rename = "host")]
    pub hosts: Vec<Host>,
    #[serde(default)]
    pub clients: Vec<String>,
    #[serde(default)]
    pub timings: Timings,
    #[serde(default)]
    pub ports: Ports,
}

fn bad(path: &Path, message: impl Into<String>) -> OpsError {
    OpsError::Bootstrap {
        context: format!("cluster spec {}", path.display()),
        message: message.into(),
    }
}

impl ClusterSpec {
    /// Reads and checks a spec file.
    pub fn load(path: &Path) -> Result<ClusterSpec, OpsError> {
        let text = std::fs::read_to_string(path).map_err(|e| bad(path, e.to_string()))?;
        let spec: ClusterSpec = toml::from_str(&text).map_err(|e| bad(path, e.to_string()))?;
        spec.check().map_err(|m| bad(path, m))?;
        Ok(spec)
    }

    /// The rules a cluster must follow, each broken one in a sentence.
    pub fn check(&self) -> Result<(), String> {
        let mut names = HashSet::new();
        let mut addresses = HashSet::new();
        for h in &self.hosts {
            let ip = check_host(&h.name, &h.address)?;
            if !names.insert(&h.name) {
                return Err(format!("host `{}` is named twice", h.name));
            }
            if !addresses.insert(ip) {
                return Err(format!("address {} is given to two hosts", h.address));
            }
            if h.roles.is_empty() {
                return Err(format!(
                    "host `{}` has no roles (etcd, postgres, repository)",
                    h.name
                ));
            }
        }
        let etcd = self.with(Role::Etcd).count();
        let pg = self.with(Role::Postgres).count();
        if pg == 0 {
            return Err("no host has the postgres role".into());
        }
        if pg > 9 {
            return Err(format!("{pg} postgres hosts: at most 9"));
        }
        let repos: Vec<&Host> = self.with(Role::Repository).collect();
        if repos.len() > 1 {
            return Err(format!(
                "{} repository hosts: one holds both repositories",
                repos.len()
            ));
        }
        if let Some(r) = repos.iter().find(|h| h.roles.contains(&Role::Postgres)) {
            return Err(format!(
                "host `{}` has both the repository and postgres roles: the backups must outlive any database host",
                r.name
            ));
        }
        if etcd == 0 || etcd % 2 == 0 {
            return Err(format!(
                "{etcd} etcd hosts: etcd needs an odd number (1, 3 or 5); an even one tolerates no more failures than one fewer"
            ));
        }
        for c in &self.clients {
            let (ip, len) = c
                .split_once('/')
                .ok_or_else(|| format!("client network `{c}` is not in CIDR form (a.b.c.d/n)"))?;
            let ip: IpAddr = ip
                .parse()
                .map_err(|_| format!("client network `{c}`: not an address"))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            if !len.parse::<u8>().is_ok_and(|l| l <= max) {
                return Err(format!("client network `{c}`: bad prefix length"));
            }
        }
        let t = &self.timings;
        HaOptions {
            nodes: pg,
            ttl: t.ttl,
            loop_wait: t.loop_wait,
            retry_timeout: t.retry_timeout,
            ..Default::default()
        }
        .validate()
        .map_err(|e| e.to_string())?;
        Ok(())
    }

    fn with(&self, role: Role) -> impl Iterator<Item = &Host> {
        self.hosts.iter().filter(move |h| h.roles.contains(&role))
    }

    /// The cluster's `cluster.json`, running the pieces of `runs`.
    fn cluster_file(&self, runs: Vec<String>) -> ClusterFile {
        let p = &self.ports;
        ClusterFile {
            etcd: self
                .with(Role::Etcd)
                .map(|h| EtcdMember {
                    name: format!("etcd-{}", h.name),
                    host: Some(h.name.clone()),
                    address: h.address.clone(),
                    client_port: p.etcd_client,
                    peer_port: p.etcd_peer,
                })
                .collect(),
            nodes: self
                .with(Role::Postgres)
                .map(|h| NodeSpec {
                    name: h.name.clone(),
                    host: Some(h.name.clone()),
                    address: h.address.clone(),
                    pg_port: p.postgres,
                    api_port: p.patroni,
                    dir: Some(
                        h.dir
                            .clone()
                            .unwrap_or_else(|| PathBuf::from(DEFAULT_BUNDLE_DIR)),
                    ),
                })
                .collect(),
            runs: Some(runs),
            clients: self.clients.clone(),
            repository: self.with(Role::Repository).next().map(|h| RepositoryHost {
                host: h.name.clone(),
                address: h.address.clone(),
                port: p.backup,
                dir: Some(
                    h.dir
                        .clone()
                        .unwrap_or_else(|| PathBuf::from(DEFAULT_BUNDLE_DIR)),
                ),
            }),
            ttl: self.timings.ttl,
            loop_wait: self.timings.loop_wait,
            retry_timeout: self.timings.retry_timeout,
            synchronous_mode_strict: self.timings.synchronous_mode_strict,
            // Every node archives to the repository host; without one nothing archives (a
            // node-local repository would not survive its node).
            archive: self.with(Role::Repository).next().is_some(),
        }
    }
}

/// A host's name and address as a cluster accepts them; the address parsed.
fn check_host(name: &str, address: &str) -> Result<IpAddr, String> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && name != "tls"
        && name != "hosts";
    if !ok {
        return Err(format!("host name `{name}`: use 1-32 of a-z, 0-9 and -"));
    }
    let ip: IpAddr = address
        .parse()
        .map_err(|_| format!("host `{name}`: address `{address}` is not an IP address"))?;
    if ip.is_unspecified() || ip.is_multicast() {
        return Err(format!(
            "host `{name}`: {address} cannot be a host's address"
        ));
    }
    Ok(ip)
}

/// What `init` made.
#[derive(Debug)]
pub struct Initialized {
    /// The operator's directory (runs nothing; status and switchover from here).
    pub dir: PathBuf,
    /// (host, its bundle directory).
    pub bundles: Vec<(String, PathBuf)>,
}

/// Makes the cluster's CA, secrets and one bundle per host under `dir` (which must not hold a
/// cluster yet).
pub fn init(spec: &ClusterSpec, dir: &Path) -> Result<Initialized, OpsError> {
    let user = ServerUser::resolve()?;
    if ClusterFile::path(dir).exists() {
        return Err(OpsError::Bootstrap {
            context: format!("{}", dir.display()),
            message: "already holds a cluster; choose another --dir (its certificates and secrets would be replaced)".into(),
        });
    }
    std::fs::create_dir_all(dir).map_err(OpsError::io(format!("create {}", dir.display())))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
        .map_err(OpsError::io(format!("chmod {}", dir.display())))?;
    let tls = dir.join("tls");
    pki::ensure_ca(&tls)?;
    let mut secrets = dalp_db::roles::generate_secrets();
    complete_secrets(&mut secrets);
    let secrets_json = serde_json::to_string_pretty(&secrets).expect("secrets serialize");
    // The operator's client certificate sits where a host's would.
    pki::issue_host(&tls, &tls, &["dalp-operator".to_string()], &user)?;
    pki::write_private(&dir.join("secrets.json"), &secrets_json)?;
    spec.cluster_file(Vec::new()).write(dir)?;
    // The repositories' cipher passphrase, for every host: the repository host encrypts,
    // and database hosts read what they archived (pgBackRest does not hand every
    // repository's passphrase over from the repository host).
    let cipher = hex::encode(rand::random::<[u8; 32]>());
    let write_cipher = |root: &Path| -> Result<(), OpsError> {
        let keys = root.join("keys");
        std::fs::create_dir_all(&keys)
            .map_err(OpsError::io(format!("create {}", keys.display())))?;
        std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o700))
            .map_err(OpsError::io("chmod keys dir"))?;
        pki::write_private(&keys.join(crate::backup::CIPHER_FILE), &cipher)
    };
    write_cipher(dir)?;
    let mut bundles = Vec::new();
    for h in &spec.hosts {
        let b = make_bundle(dir, &h.name, &h.address, &user, &secrets_json)?;
        write_cipher(&b)?;
        spec.cluster_file(vec![h.name.clone()]).write(&b)?;
        bundles.push((h.name.clone(), b));
    }
    std::fs::set_permissions(dir.join("hosts"), std::fs::Permissions::from_mode(0o711))
        .map_err(OpsError::io("chmod hosts dir"))?;
    Ok(Initialized {
        dir: dir.to_path_buf(),
        bundles,
    })
}

/// Host `name`'s bundle directory under the operator's `dir`: its certificate (valid for
/// its name and address) from the cluster's CA in `dir/tls`, and the secrets; the caller
/// adds the cipher passphrase and `cluster.json`.
fn make_bundle(
    dir: &Path,
    name: &str,
    address: &str,
    user: &ServerUser,
    secrets_json: &str,
) -> Result<PathBuf, OpsError> {
    let b = dir.join("hosts").join(name);
    std::fs::create_dir_all(&b).map_err(OpsError::io(format!("create {}", b.display())))?;
    std::fs::set_permissions(&b, std::fs::Permissions::from_mode(0o711))
        .map_err(OpsError::io(format!("chmod {}", b.display())))?;
    let names = vec![
        name.to_string(),
        address.to_string(),
        "localhost".into(),
        "127.0.0.1".into(),
    ];
    pki::issue_host(&dir.join("tls"), &b.join("tls"), &names, user)?;
    std::fs::set_permissions(b.join("tls"), std::fs::Permissions::from_mode(0o755))
        .map_err(OpsError::io("chmod tls dir"))?;
    pki::write_private(&b.join("secrets.json"), secrets_json)?;
    Ok(b)
}

/// The operator's copy in `dir` (made by `dalp cluster init`: it holds the CA key and runs
/// nothing) and its topology.
fn operator_copy(dir: &Path) -> Result<ClusterFile, OpsError> {
    let bad = |m: String| OpsError::Bootstrap {
        context: format!("{}", dir.display()),
        message: m,
    };
    let text = std::fs::read_to_string(ClusterFile::path(dir)).map_err(|e| {
        bad(format!(
            "{e}: not a cluster directory (`dalp cluster init` makes one)"
        ))
    })?;
    let state: ClusterFile =
        serde_json::from_str(&text).map_err(|e| bad(format!("cluster.json: {e}")))?;
    if state.runs.as_ref().is_none_or(|r| !r.is_empty())
        || !dir.join("tls").join(pki::CA_KEY).exists()
    {
        return Err(bad(
            "not the operator's copy made by `dalp cluster init` (it holds the CA key and runs no host); hosts are added and removed there".into(),
        ));
    }
    Ok(state)
}

/// Writes the operator's topology `state` to `dir` and to every bundle under `dir/hosts`
/// (each keeping the hosts it runs). Returns the hosts whose bundle was rewritten.
fn write_topology(dir: &Path, state: &ClusterFile) -> Result<Vec<String>, OpsError> {
    state.write(dir)?;
    let mut hosts = Vec::new();
    let entries = std::fs::read_dir(dir.join("hosts")).map_err(OpsError::io(format!(
        "read {}",
        dir.join("hosts").display()
    )))?;
    for e in entries.flatten() {
        let b = e.path();
        let Ok(text) = std::fs::read_to_string(ClusterFile::path(&b)) else {
            continue;
        };
        let Ok(mine) = serde_json::from_str::<ClusterFile>(&text) else {
            continue;
        };
        let mut next = state.clone();
        next.runs = mine.runs;
        next.write(&b)?;
        hosts.push(e.file_name().to_string_lossy().into_owned());
    }
    hosts.sort();
    Ok(hosts)
}

/// What `add_host` / `remove_host` changed.
#[derive(Debug)]
pub struct TopologyChange {
    /// The added host's new bundle (`add_host`).
    pub bundle: Option<PathBuf>,
    /// The hosts whose bundle's `cluster.json` changed: copy it to each and run `dalp node
    /// up` there, so its Patroni (pg_hba) and the repository (its list of nodes) follow.
    pub rewritten: Vec<String>,
}

/// Adds a PostgreSQL host (`name` at `address`, its bundle to be installed at `bundle_dir`
/// on it) to the cluster whose operator copy is `dir`: a certificate from the cluster's CA,
/// the secrets and the cipher passphrase in a new bundle `dir/hosts/<name>`, and the new
/// topology in every bundle. Patroni on the new host clones from the leader when it starts.
pub fn add_host(
    dir: &Path,
    name: &str,
    address: &str,
    bundle_dir: &Path,
) -> Result<TopologyChange, OpsError> {
    let user = ServerUser::resolve()?;
    let mut state = operator_copy(dir)?;
    let bad = |m: String| OpsError::Bootstrap {
        context: format!("add host `{name}`"),
        message: m,
    };
    let ip = check_host(name, address).map_err(bad)?;
    let taken_names = state
        .nodes
        .iter()
        .filter_map(|n| n.host.clone())
        .chain(state.etcd.iter().filter_map(|m| m.host.clone()))
        .chain(state.repository.iter().map(|r| r.host.clone()));
    if taken_names.into_iter().any(|h| h == name) || dir.join("hosts").join(name).exists() {
        return Err(bad(format!(
            "the cluster already has a host named `{name}`"
        )));
    }
    let addresses = state
        .nodes
        .iter()
        .map(|n| n.address.clone())
        .chain(state.etcd.iter().map(|m| m.address.clone()))
        .chain(state.repository.iter().map(|r| r.address.clone()));
    if addresses
        .into_iter()
        .any(|a| a.parse::<IpAddr>().ok() == Some(ip))
    {
        return Err(bad(format!("{address} is already a host of the cluster")));
    }
    if state.nodes.len() >= 9 {
        return Err(bad(
            "the cluster has 9 PostgreSQL hosts, the most dalp runs".into(),
        ));
    }
    let like =
        state.nodes.first().cloned().ok_or_else(|| {
            bad("the cluster has no PostgreSQL host to take the ports from".into())
        })?;
    state.nodes.push(NodeSpec {
        name: name.to_string(),
        host: Some(name.to_string()),
        address: address.to_string(),
        pg_port: like.pg_port,
        api_port: like.api_port,
        dir: Some(bundle_dir.to_path_buf()),
    });
    let secrets_json = std::fs::read_to_string(dir.join("secrets.json"))
        .map_err(OpsError::io("read secrets.json"))?;
    let cipher = std::fs::read_to_string(dir.join("keys").join(crate::backup::CIPHER_FILE))
        .map_err(OpsError::io("read the backup cipher passphrase"))?;
    let b = make_bundle(dir, name, address, &user, &secrets_json)?;
    let keys = b.join("keys");
    std::fs::create_dir_all(&keys).map_err(OpsError::io(format!("create {}", keys.display())))?;
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o700))
        .map_err(OpsError::io("chmod keys dir"))?;
    pki::write_private(&keys.join(crate::backup::CIPHER_FILE), &cipher)?;
    let mut mine = state.clone();
    mine.runs = Some(vec![name.to_string()]);
    mine.write(&b)?;
    let rewritten = write_topology(dir, &state)?
        .into_iter()
        .filter(|h| h != name)
        .collect();
    Ok(TopologyChange {
        bundle: Some(b),
        rewritten,
    })
}

/// Removes PostgreSQL host `name` from the cluster whose operator copy is `dir` (its node
/// must be stopped: the caller checks that its Patroni does not answer): the topology of
/// every other bundle drops it, and its bundle (its key and the secrets) is deleted from
/// the operator's copy. Hosts that run etcd or the repository are not removed this way.
pub fn remove_host(dir: &Path, name: &str) -> Result<TopologyChange, OpsError> {
    let mut state = operator_copy(dir)?;
    let bad = |m: String| OpsError::Bootstrap {
        context: format!("remove host `{name}`"),
        message: m,
    };
    if state.etcd.iter().any(|m| m.host.as_deref() == Some(name)) {
        return Err(bad(format!(
            "`{name}` runs an etcd member; changing etcd's membership has no verb yet (docs/deploy-self-managed.md)"
        )));
    }
    if state.repository.as_ref().is_some_and(|r| r.host == name) {
        return Err(bad(format!("`{name}` holds the backup repositories")));
    }
    if !state.nodes.iter().any(|n| n.host.as_deref() == Some(name)) {
        return Err(bad(format!("the cluster has no PostgreSQL host `{name}`")));
    }
    if state.nodes.len() <= 2 {
        return Err(bad(
            "a cluster keeps at least two PostgreSQL hosts (synchronous replication needs a standby); add one first".into(),
        ));
    }
    state.nodes.retain(|n| n.host.as_deref() != Some(name));
    let gone = dir.join("hosts").join(name);
    if gone.exists() {
        std::fs::remove_dir_all(&gone)
            .map_err(OpsError::io(format!("remove {}", gone.display())))?;
    }
    let rewritten = write_topology(dir, &state)?;
    Ok(TopologyChange {
        bundle: None,
        rewritten,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> Result<ClusterSpec, String> {
        let s: ClusterSpec = toml::from_str(text).map_err(|e| e.to_string())?;
        s.check().map(|_| s)
    }

    const THREE: &str = r#"
        clients = ["10.9.0.0/24"]
        [[host]]
        name = "db1"
        address = "10.9.0.11"
        roles = ["etcd", "postgres"]
        [[host]]
        name = "db2"
        address = "10.9.0.12"
        roles = ["etcd", "postgres"]
        [[host]]
        name = "db3"
        address = "10.9.0.13"
        roles = ["etcd", "postgres"]
    "#;

    fn nodes_in(dir: &Path) -> Vec<String> {
        let f: ClusterFile =
            serde_json::from_str(&std::fs::read_to_string(ClusterFile::path(dir)).unwrap())
                .unwrap();
        f.nodes.into_iter().map(|n| n.name).collect()
    }

    #[test]
    fn a_postgres_host_is_added_and_removed_in_every_bundle() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cluster");
        init(&spec(THREE).unwrap(), &dir).unwrap();
        let change = add_host(&dir, "db4", "10.9.0.14", Path::new(DEFAULT_BUNDLE_DIR)).unwrap();
        let bundle = change.bundle.unwrap();
        assert_eq!(change.rewritten, ["db1", "db2", "db3"]);
        assert!(bundle.join("tls").join(pki::SERVER_KEY).exists());
        assert!(bundle
            .join("keys")
            .join(crate::backup::CIPHER_FILE)
            .exists());
        for d in [dir.clone(), dir.join("hosts/db1"), bundle.clone()] {
            assert_eq!(
                nodes_in(&d),
                ["db1", "db2", "db3", "db4"],
                "{}",
                d.display()
            );
        }
        let mine: ClusterFile =
            serde_json::from_str(&std::fs::read_to_string(ClusterFile::path(&bundle)).unwrap())
                .unwrap();
        assert_eq!(mine.runs, Some(vec!["db4".to_string()]));
        assert_eq!(mine.etcd.len(), 3, "etcd membership unchanged");

        let e = |r: Result<TopologyChange, OpsError>| r.unwrap_err().to_string();
        let add = |dir: &Path, name: &str, address: &str| {
            e(add_host(dir, name, address, Path::new(DEFAULT_BUNDLE_DIR)))
        };
        assert!(add(&dir, "db4", "10.9.0.15").contains("already has a host"));
        assert!(add(&dir, "db5", "10.9.0.12").contains("already a host"));
        assert!(add(&dir, "DB 5", "10.9.0.15").contains("host name"));
        assert!(add(&dir, "db5", "db5.example").contains("not an IP"));
        assert!(add(&dir.join("hosts/db1"), "db5", "10.9.0.15").contains("operator's copy"));
        assert!(e(remove_host(&dir, "db1")).contains("etcd member"));
        assert!(e(remove_host(&dir, "db9")).contains("no PostgreSQL host"));

        let change = remove_host(&dir, "db4").unwrap();
        assert_eq!(change.rewritten, ["db1", "db2", "db3"]);
        assert!(!bundle.exists(), "the removed host's key and secrets stay");
        for d in [dir.clone(), dir.join("hosts/db3")] {
            assert_eq!(nodes_in(&d), ["db1", "db2", "db3"]);
        }
    }

    #[test]
    fn a_three_host_spec_is_accepted_and_shaped() {
        let s = spec(THREE).unwrap();
        let f = s.cluster_file(vec!["db2".into()]);
        assert_eq!(f.etcd.len(), 3);
        assert_eq!(f.nodes.len(), 3);
        assert_eq!(f.nodes[1].address, "10.9.0.12");
        assert_eq!(f.etcd[0].name, "etcd-db1");
        assert_eq!(f.runs, Some(vec!["db2".to_string()]));
    }

    #[test]
    fn broken_specs_say_what_is_wrong() {
        let two_etcd = THREE.replacen(
            r#"roles = ["etcd", "postgres"]"#,
            r#"roles = ["postgres"]"#,
            1,
        );
        assert!(spec(&two_etcd).unwrap_err().contains("odd number"));
        let dup = THREE.replace("10.9.0.12", "10.9.0.11");
        assert!(spec(&dup).unwrap_err().contains("two hosts"));
        let bad_addr = THREE.replace("10.9.0.13", "db3.example");
        assert!(spec(&bad_addr).unwrap_err().contains("not an IP address"));
        let bad_name = THREE.replace("\"db1\"", "\"DB 1\"");
        assert!(spec(&bad_name).unwrap_err().contains("host name"));
        let bad_net = THREE.replace("10.9.0.0/24", "10.9.0.0");
        assert!(spec(&bad_net).unwrap_err().contains("CIDR"));
        let unknown = THREE.replacen(r#""etcd", "postgres""#, r#""etcd", "pgbouncer""#, 1);
        assert!(spec(&unknown).unwrap_err().contains("unknown variant"));
        let short_ttl = format!("{THREE}\n[timings]\nttl = 10\n");
        assert!(spec(&short_ttl).unwrap_err().contains("ttl"));
        let repo_on_db = THREE.replacen(
            r#"roles = ["etcd", "postgres"]"#,
            r#"roles = ["etcd", "postgres", "repository"]"#,
            1,
        );
        assert!(spec(&repo_on_db)
            .unwrap_err()
            .contains("both the repository and postgres roles"));
        let repo = |n: u8| {
            format!(
                "[[host]]\nname = \"b{n}\"\naddress = \"10.9.0.2{n}\"\nroles = [\"repository\"]\n"
            )
        };
        let two_repos = format!("{THREE}\n{}{}", repo(1), repo(2));
        assert!(spec(&two_repos).unwrap_err().contains("2 repository hosts"));
        let no_roles =
            format!("{THREE}\n[[host]]\nname = \"x\"\naddress = \"10.9.0.30\"\nroles = []\n");
        assert!(spec(&no_roles).unwrap_err().contains("has no roles"));
    }
}
