//! Connecting to PostgreSQL: libpq-style URLs, TLS with full verification (rustls), and the
//! options every dalp connection carries (application_name, timeouts, session attributes).

use std::fmt;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use tokio_postgres::config::TargetSessionAttrs;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{Client, NoTls, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;

/// How long one host's connection attempt runs alone before the next listed host's attempt
/// starts beside it. A host that is cut off (packets dropped: the connect hangs until its
/// timeout) then costs this, not the connect timeout, on every new connection — after a
/// failover that cut the old primary off, that is the difference between reconnecting at
/// once and waiting out a timeout per connection.
pub const HOST_STAGGER: Duration = Duration::from_millis(500);

/// Everything needed to open one connection as one role.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectOptions {
    /// `(host, port)`; a host starting with `/` is a Unix socket directory.
    pub hosts: Vec<(String, u16)>,
    pub dbname: String,
    pub user: String,
    pub password: Option<String>,
    /// CA the server certificate must chain to; required for TCP hosts (verify-full).
    pub ca_file: Option<PathBuf>,
    pub application_name: String,
    pub connect_timeout: Duration,
    pub statement_timeout: Option<Duration>,
    /// Only accept a server that takes writes (`target_session_attrs=read-write`).
    pub read_write: bool,
}

impl fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("hosts", &self.hosts)
            .field("dbname", &self.dbname)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("ca_file", &self.ca_file)
            .field("application_name", &self.application_name)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid database URL: {0}")]
    InvalidUrl(String),
    #[error("TLS setup with CA file {path}: {message}")]
    Tls { path: String, message: String },
    #[error("TCP connections need a CA file to verify the server (sslrootcert=PATH in the URL, or database.ca_file)")]
    MissingCa,
    #[error("cannot connect to {target} as {user}: {detail}")]
    Connect {
        target: String,
        user: String,
        /// The server's message (or the I/O error), not tokio-postgres's bare "db error".
        detail: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

impl ConnectError {
    /// The PostgreSQL SQLSTATE of a refused connection, when the server sent one.
    pub fn sqlstate(&self) -> Option<&tokio_postgres::error::SqlState> {
        match self {
            ConnectError::Connect { source, .. } => source.code(),
            _ => None,
        }
    }
}

/// Splits `host:port` (or `[v6]:port`).
pub fn parse_host_port(s: &str) -> Result<(String, u16), String> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest
            .split_once("]:")
            .ok_or_else(|| format!("`{s}` is not [ipv6]:port"))?;
        (h.to_string(), p)
    } else {
        let (h, p) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("`{s}` is not host:port"))?;
        (h.to_string(), p)
    };
    if host.is_empty() {
        return Err(format!("`{s}` has an empty host"));
    }
    let port = port
        .parse::<u16>()
        .map_err(|_| format!("`{s}` has an invalid port"))?;
    Ok((host, port))
}

fn decode(s: &str) -> Result<String, ConnectError> {
    percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| ConnectError::InvalidUrl("percent-encoded text is not UTF-8".into()))
}

/// RFC 3986 unreserved characters stay readable; everything else is escaped.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');
/// In query values `/` may stay too, so file paths read naturally.
const QUERY_VALUE: &AsciiSet = &COMPONENT.remove(b'/');

fn encode(s: &str) -> String {
    utf8_percent_encode(s, COMPONENT).to_string()
}

fn encode_query(s: &str) -> String {
    utf8_percent_encode(s, QUERY_VALUE).to_string()
}

impl ConnectOptions {
    /// Parses a libpq URL: `postgres://user:pass@h1:p1,h2:p2/db?sslmode=verify-full&sslrootcert=/ca.crt`.
    /// TCP hosts require `sslmode=verify-full` (the default here) and a CA.
    pub fn from_url(url: &str) -> Result<ConnectOptions, ConnectError> {
        let bad = |m: &str| ConnectError::InvalidUrl(m.to_string());
        let rest = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))
            .ok_or_else(|| bad("must start with postgres:// or postgresql://"))?;
        let (authority, path_query) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let (path, query) = path_query.split_once('?').unwrap_or((path_query, ""));
        let (userinfo, hostlist) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (user, password) = match userinfo {
            Some(u) => match u.split_once(':') {
                Some((u, p)) => (decode(u)?, Some(decode(p)?)),
                None => (decode(u)?, None),
            },
            None => return Err(bad("a user name is required (postgres://USER@host/db)")),
        };
        let mut hosts = Vec::new();
        for h in hostlist.split(',').filter(|h| !h.is_empty()) {
            let h = decode(h)?;
            if h.contains(':') {
                hosts.push(parse_host_port(&h).map_err(ConnectError::InvalidUrl)?);
            } else {
                hosts.push((h, 5432));
            }
        }
        let mut opts = ConnectOptions {
            hosts,
            dbname: if path.is_empty() {
                user.clone()
            } else {
                decode(path)?
            },
            user,
            password,
            ca_file: None,
            application_name: "dalp".into(),
            connect_timeout: Duration::from_secs(5),
            statement_timeout: None,
            read_write: false,
        };
        let mut sslmode = "verify-full".to_string();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = decode(v)?;
            match k {
                "sslmode" => sslmode = v,
                "sslrootcert" => opts.ca_file = Some(PathBuf::from(v)),
                "application_name" => opts.application_name = v,
                "host" => opts.hosts.push((v, 5432)),
                "port" => {
                    let port: u16 = v.parse().map_err(|_| bad("port is not a number"))?;
                    for h in &mut opts.hosts {
                        h.1 = port;
                    }
                }
                "connect_timeout" => {
                    let secs: u64 = v
                        .parse()
                        .map_err(|_| bad("connect_timeout is not a number of seconds"))?;
                    opts.connect_timeout = Duration::from_secs(secs.max(1));
                }
                "target_session_attrs" => match v.as_str() {
                    "read-write" => opts.read_write = true,
                    "any" => opts.read_write = false,
                    other => {
                        return Err(ConnectError::InvalidUrl(format!(
                            "target_session_attrs={other} is not supported (use read-write or any)"
                        )))
                    }
                },
                other => {
                    return Err(ConnectError::InvalidUrl(format!(
                        "unsupported parameter `{other}`"
                    )))
                }
            }
        }
        if opts.hosts.is_empty() {
            return Err(bad("at least one host is required"));
        }
        let has_tcp = opts.hosts.iter().any(|(h, _)| !h.starts_with('/'));
        if has_tcp && sslmode != "verify-full" {
            return Err(ConnectError::InvalidUrl(format!(
                "sslmode={sslmode} is refused: dalp connects over TCP only with sslmode=verify-full"
            )));
        }
        if has_tcp && opts.ca_file.is_none() {
            return Err(ConnectError::MissingCa);
        }
        Ok(opts)
    }

    /// A libpq URL `psql` accepts as is (includes the password when set).
    pub fn to_url(&self) -> String {
        let mut s = format!("postgresql://{}", encode(&self.user));
        if let Some(p) = &self.password {
            s.push(':');
            s.push_str(&encode(p));
        }
        s.push('@');
        let hosts: Vec<String> = self
            .hosts
            .iter()
            .map(|(h, p)| {
                if h.contains(':') {
                    format!("[{h}]:{p}")
                } else {
                    format!("{h}:{p}")
                }
            })
            .collect();
        s.push_str(&hosts.join(","));
        s.push('/');
        s.push_str(&encode(&self.dbname));
        s.push_str("?sslmode=verify-full");
        if let Some(ca) = &self.ca_file {
            s.push_str("&sslrootcert=");
            s.push_str(&encode_query(&ca.display().to_string()));
        }
        s.push_str("&application_name=");
        s.push_str(&encode_query(&self.application_name));
        if self.read_write {
            s.push_str("&target_session_attrs=read-write");
        }
        s
    }

    fn target(&self) -> String {
        self.hosts
            .iter()
            .map(|(h, p)| format!("{h}:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// One configuration per host, in order (each as [`ConnectOptions::pg_config`] with that
    /// host alone), for [`connect_first`].
    pub fn host_configs(&self) -> Vec<tokio_postgres::Config> {
        self.hosts
            .iter()
            .map(|h| {
                let mut one = self.clone();
                one.hosts = vec![h.clone()];
                one.pg_config()
            })
            .collect()
    }

    /// A deadpool manager whose new connections come from [`connect_first`] over these
    /// hosts (with `recycling`), over verify-full TLS.
    pub fn manager(
        &self,
        recycling: deadpool_postgres::RecyclingMethod,
    ) -> Result<deadpool_postgres::Manager, ConnectError> {
        Ok(deadpool_postgres::Manager::from_connect(
            self.pg_config(),
            FirstHost {
                configs: self.host_configs(),
                tls: self.tls()?,
            },
            deadpool_postgres::ManagerConfig {
                recycling_method: recycling,
            },
        ))
    }

    /// The tokio-postgres configuration these options describe.
    pub fn pg_config(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        for (h, p) in &self.hosts {
            if h.starts_with('/') {
                c.host_path(h);
            } else {
                c.host(h);
            }
            c.port(*p);
        }
        c.dbname(&self.dbname)
            .user(&self.user)
            .application_name(&self.application_name)
            .connect_timeout(self.connect_timeout)
            .keepalives_idle(Duration::from_secs(30));
        if let Some(p) = &self.password {
            c.password(p);
        }
        if self.uses_tcp() {
            c.ssl_mode(tokio_postgres::config::SslMode::Require);
        }
        if let Some(t) = self.statement_timeout {
            c.options(format!("-c statement_timeout={}", t.as_millis()));
        }
        if self.read_write {
            c.target_session_attrs(TargetSessionAttrs::ReadWrite);
        }
        c
    }

    fn uses_tcp(&self) -> bool {
        self.hosts.iter().any(|(h, _)| !h.starts_with('/'))
    }

    /// The rustls connector for these options (verify-full against `ca_file`).
    pub fn tls(&self) -> Result<MakeRustlsConnect, ConnectError> {
        let ca = self.ca_file.as_deref().ok_or(ConnectError::MissingCa)?;
        tls_connector(ca)
    }

    /// Opens one connection and drives it on the current runtime.
    pub async fn connect(&self) -> Result<Client, ConnectError> {
        let wrap = |source: tokio_postgres::Error| ConnectError::Connect {
            target: self.target(),
            user: self.user.clone(),
            detail: describe_error(&source),
            source,
        };
        let configs = self.host_configs();
        if self.uses_tcp() {
            let (client, conn) = connect_first(&configs, self.tls()?).await.map_err(wrap)?;
            drive(conn);
            Ok(client)
        } else {
            let (client, conn) = connect_first(&configs, NoTls).await.map_err(wrap)?;
            drive(conn);
            Ok(client)
        }
    }
}

/// Runs a connection's I/O on the current runtime until it closes.
fn drive<F>(conn: F) -> tokio::task::JoinHandle<()>
where
    F: std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "connection closed");
        }
    })
}

/// The connection of the first host in `configs` (one host each) that takes it, trying them
/// in order but without waiting out a silent host: the next host's attempt starts
/// [`HOST_STAGGER`] after the previous one's (at once when it failed). The first to succeed
/// wins; the others are dropped (closed). With one host this is a plain connect. The error,
/// when every host fails, is the last one.
pub async fn connect_first<T>(
    configs: &[tokio_postgres::Config],
    tls: T,
) -> Result<
    (
        Client,
        tokio_postgres::Connection<Socket, <T as MakeTlsConnect<Socket>>::Stream>,
    ),
    tokio_postgres::Error,
>
where
    T: MakeTlsConnect<Socket> + Clone,
{
    let mut attempts = FuturesUnordered::new();
    let mut next = 0;
    let mut last_error = None;
    loop {
        if attempts.is_empty() {
            match configs.get(next) {
                Some(c) => {
                    attempts.push(c.connect(tls.clone()));
                    next += 1;
                }
                None => {
                    return match last_error {
                        Some(e) => Err(e),
                        // No host at all: tokio-postgres says so.
                        None => tokio_postgres::Config::new().connect(tls).await,
                    };
                }
            }
        }
        tokio::select! {
            Some(r) = attempts.next() => match r {
                Ok(won) => return Ok(won),
                Err(e) => last_error = Some(e),
            },
            _ = tokio::time::sleep(HOST_STAGGER), if next < configs.len() => {
                attempts.push(configs[next].connect(tls.clone()));
                next += 1;
            }
        }
    }
}

/// [`connect_first`] for deadpool pools ([`ConnectOptions::manager`]).
struct FirstHost<T> {
    configs: Vec<tokio_postgres::Config>,
    tls: T,
}

impl<T> deadpool_postgres::Connect for FirstHost<T>
where
    T: MakeTlsConnect<Socket> + Clone + Sync + Send + 'static,
    T::Stream: Sync + Send,
    T::TlsConnect: Sync + Send,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    fn connect(
        &self,
        _: &tokio_postgres::Config,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<
                    Output = Result<(Client, tokio::task::JoinHandle<()>), tokio_postgres::Error>,
                > + Send
                + '_,
        >,
    > {
        Box::pin(async move {
            let (client, conn) = connect_first(&self.configs, self.tls.clone()).await?;
            Ok((client, drive(conn)))
        })
    }
}

/// A PostgreSQL error as a person needs it: the server's severity and message (with its
/// SQLSTATE), or the chain of causes of a client-side failure.
pub fn describe_error(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} {} ({})", db.severity(), db.message(), db.code().code());
    }
    cause_chain(e)
}

/// `e` and every source under it, joined by ": " (a source whose text the outer message
/// already repeats is left out), so an error's log line says what really failed.
pub fn cause_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// A rustls client config trusting only the certificates in `ca_file`, TLS 1.2 or newer,
/// with hostname verification (rustls always verifies the name: verify-full).
pub fn tls_connector(ca_file: &Path) -> Result<MakeRustlsConnect, ConnectError> {
    let err = |message: String| ConnectError::Tls {
        path: ca_file.display().to_string(),
        message,
    };
    let file = std::fs::File::open(ca_file).map_err(|e| err(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut BufReader::new(file)) {
        let cert = cert.map_err(|e| err(e.to_string()))?;
        roots.add(cert).map_err(|e| err(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(err("no PEM certificate in the file".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| err(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_multi_host_url_with_tls() {
        let o = ConnectOptions::from_url(
            "postgres://dalp_migrator:p%40ss@127.0.0.1:5433,[::1]:5434/dalp?sslmode=verify-full&sslrootcert=/tmp/ca.crt&target_session_attrs=read-write",
        )
        .unwrap();
        assert_eq!(o.user, "dalp_migrator");
        assert_eq!(o.password.as_deref(), Some("p@ss"));
        assert_eq!(
            o.hosts,
            vec![("127.0.0.1".into(), 5433), ("::1".into(), 5434)]
        );
        assert_eq!(o.dbname, "dalp");
        assert!(o.read_write);
        let again = ConnectOptions::from_url(&o.to_url()).unwrap();
        assert_eq!(again.hosts, o.hosts);
        assert_eq!(again.password, o.password);
        assert_eq!(again.ca_file, o.ca_file);
    }

    #[test]
    fn refuses_weak_sslmodes_and_missing_ca() {
        for mode in ["disable", "prefer", "require", "verify-ca"] {
            let e = ConnectOptions::from_url(&format!(
                "postgres://u@127.0.0.1:5432/d?sslmode={mode}&sslrootcert=/x"
            ))
            .unwrap_err();
            assert!(e.to_string().contains("verify-full"), "{e}");
        }
        let e = ConnectOptions::from_url("postgres://u@127.0.0.1:5432/d").unwrap_err();
        assert!(matches!(e, ConnectError::MissingCa));
        let e = ConnectOptions::from_url("mysql://u@h/d").unwrap_err();
        assert!(e.to_string().contains("postgres://"));
        let e = ConnectOptions::from_url("postgres://u@h:99999/d?sslrootcert=/x").unwrap_err();
        assert!(e.to_string().contains("invalid port"), "{e}");
        let e = ConnectOptions::from_url("postgres://u@h/d?sslrootcert=/x&bogus=1").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
    }

    #[test]
    fn debug_never_shows_the_password() {
        let o = ConnectOptions::from_url("postgres://u:sekrit@h/d?sslrootcert=/x").unwrap();
        assert!(!format!("{o:?}").contains("sekrit"));
    }
}
