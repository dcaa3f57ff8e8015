//! Connections to a SIEM, always TLS with the receiver's certificate checked against a CA
//! bundle and its name against the target host:
//! - `syslog+tls://HOST:PORT`: RFC 5425 octet-counted frames. Syslog has no acknowledgement,
//!   so a send returns once the receiver's TCP stack has acknowledged every byte (the socket's
//!   unacknowledged send queue is empty) and the connection is still open; the forwarder
//!   treats that as delivered only after it has seen the connection stay open for a while
//!   longer (see `Forwarder::settle`).
//! - `relp+tls://HOST:PORT`: RELP (rsyslog's imrelp and others): every message is answered
//!   by the receiver's application with `200 OK`, so a send returns once the receiver holds
//!   exactly what was sent.
//!
//! Every close sends TLS close_notify (RFC 5425 §4.4); RELP also ends its session with `close`.

use std::io::BufReader;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::ExportError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// RFC 5425 syslog over TLS.
    Syslog,
    /// RELP over TLS: acknowledged by the receiver.
    Relp,
}

/// Where a SIEM listens: `syslog+tls://HOST:PORT` or `relp+tls://HOST:PORT`.
#[derive(Debug, Clone)]
pub struct SyslogTarget {
    pub protocol: Protocol,
    pub host: String,
    pub port: u16,
}

impl SyslogTarget {
    pub fn parse(s: &str) -> Result<SyslogTarget, String> {
        let (protocol, rest) = if let Some(r) = s.strip_prefix("syslog+tls://") {
            (Protocol::Syslog, r)
        } else if let Some(r) = s.strip_prefix("relp+tls://") {
            (Protocol::Relp, r)
        } else {
            return Err(format!(
                "`{s}` is not syslog+tls://HOST:PORT or relp+tls://HOST:PORT"
            ));
        };
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| format!("`{s}` needs a port"))?;
        let port = port
            .parse()
            .map_err(|_| format!("`{s}` has an invalid port"))?;
        Ok(SyslogTarget {
            protocol,
            host: host.trim_matches(['[', ']']).to_string(),
            port,
        })
    }

    /// True when a target string names a SIEM rather than a file.
    pub fn is_target(s: &str) -> bool {
        s.starts_with("syslog+tls://") || s.starts_with("relp+tls://")
    }
}

/// How long a send may wait for the receiver's acknowledgement.
const ACK_TIMEOUT: Duration = Duration::from_secs(15);
/// RELP transaction numbers run 1..=999,999,999 and wrap.
const RELP_MAX_TXNR: u32 = 999_999_999;

/// An open connection to a SIEM.
pub struct SyslogSink {
    protocol: Protocol,
    stream: TlsStream<TcpStream>,
    /// The last RELP transaction number used.
    txnr: u32,
    /// Received bytes not yet parsed (RELP answers).
    inbuf: Vec<u8>,
}

/// The TLS material for a SIEM: the CA bundle its certificate must chain to and, for
/// receivers that require mutual TLS (rsyslog's imrelp does by default), a client
/// certificate and key.
#[derive(Debug, Clone)]
pub struct SiemTls {
    pub ca_file: PathBuf,
    pub client: Option<(PathBuf, PathBuf)>,
}

impl SiemTls {
    pub fn ca(ca_file: impl Into<PathBuf>) -> SiemTls {
        SiemTls {
            ca_file: ca_file.into(),
            client: None,
        }
    }
}

fn tls_config(tls: &SiemTls) -> Result<rustls::ClientConfig, ExportError> {
    let ca_file = &tls.ca_file;
    let config = |e: String| ExportError::Config(format!("CA bundle {}: {e}", ca_file.display()));
    let f = std::fs::File::open(ca_file).map_err(|e| config(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut BufReader::new(f)) {
        roots
            .add(cert.map_err(|e| config(e.to_string()))?)
            .map_err(|e| config(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(config("no certificate in it".into()));
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    .map_err(|e| ExportError::Config(e.to_string()))?
    .with_root_certificates(roots);
    let Some((cert_file, key_file)) = &tls.client else {
        return Ok(builder.with_no_client_auth());
    };
    let client = |p: &Path, e: String| ExportError::Config(format!("client {}: {e}", p.display()));
    let open = |p: &Path| {
        std::fs::File::open(p)
            .map(BufReader::new)
            .map_err(|e| client(p, e.to_string()))
    };
    let certs = rustls_pemfile::certs(&mut open(cert_file)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| client(cert_file, e.to_string()))?;
    let key = rustls_pemfile::private_key(&mut open(key_file)?)
        .map_err(|e| client(key_file, e.to_string()))?
        .ok_or_else(|| client(key_file, "no private key in it".into()))?;
    builder
        .with_client_auth_cert(certs, key)
        .map_err(|e| client(cert_file, e.to_string()))
}

/// A failed handshake, classified: certificate problems are named as such.
fn handshake_error(e: std::io::Error) -> ExportError {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(
            rustls::Error::InvalidCertificate(_)
            | rustls::Error::NoCertificatesPresented
            | rustls::Error::InvalidCertRevocationList(_),
        ) => ExportError::Certificate(e.to_string()),
        Some(other) => ExportError::Tls(other.to_string()),
        None => ExportError::Unreachable(format!("TLS handshake: {e}")),
    }
}

/// One parsed RELP frame.
#[derive(Debug, PartialEq)]
struct RelpFrame {
    txnr: u32,
    command: String,
    data: Vec<u8>,
}

/// The first complete RELP frame in `buf` and its length, `None` if more bytes are needed:
/// `TXNR SP COMMAND SP DATALEN [SP DATA] LF`.
fn parse_relp(buf: &[u8]) -> Result<Option<(RelpFrame, usize)>, String> {
    let field = |from: usize| -> Option<(usize, usize)> {
        let end = buf[from..].iter().position(|b| *b == b' ' || *b == b'\n')?;
        Some((from, from + end))
    };
    let bad = || format!("malformed RELP answer: {:?}", String::from_utf8_lossy(buf));
    let Some((a, b)) = field(0) else {
        return Ok(None);
    };
    let txnr: u32 = std::str::from_utf8(&buf[a..b])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let Some((c, d)) = field(b + 1) else {
        return Ok(None);
    };
    let command = String::from_utf8_lossy(&buf[c..d]).to_string();
    let Some((e, f)) = field(d + 1) else {
        return Ok(None);
    };
    let len: usize = std::str::from_utf8(&buf[e..f])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let (data, end) = if len == 0 {
        (Vec::new(), f)
    } else {
        if buf[f] != b' ' {
            return Err(bad());
        }
        let start = f + 1;
        if buf.len() < start + len + 1 {
            return Ok(None);
        }
        (buf[start..start + len].to_vec(), start + len)
    };
    if buf.len() <= end {
        return Ok(None);
    }
    if buf[end] != b'\n' {
        return Err(bad());
    }
    Ok(Some((
        RelpFrame {
            txnr,
            command,
            data,
        },
        end + 1,
    )))
}

impl SyslogSink {
    /// Connects (5 s for TCP, 10 s for the handshake) and, for RELP, opens the session.
    pub async fn connect(target: &SyslogTarget, tls: &SiemTls) -> Result<SyslogSink, ExportError> {
        let config = tls_config(tls)?;
        let name = rustls::pki_types::ServerName::try_from(target.host.clone())
            .map_err(|e| ExportError::Config(format!("host `{}`: {e}", target.host)))?;
        let addr = format!("{}:{}", target.host, target.port);
        let tcp = tokio::time::timeout(
            Duration::from_secs(5),
            TcpStream::connect((target.host.as_str(), target.port)),
        )
        .await
        .map_err(|_| ExportError::Unreachable(format!("{addr}: connect timed out")))?
        .map_err(|e| ExportError::Unreachable(format!("{addr}: {e}")))?;
        tcp.set_nodelay(true)?;
        let stream = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
        )
        .await
        .map_err(|_| ExportError::Unreachable(format!("{addr}: TLS handshake timed out")))?
        .map_err(handshake_error)?;
        let mut sink = SyslogSink {
            protocol: target.protocol,
            stream,
            txnr: 0,
            inbuf: Vec::new(),
        };
        if sink.protocol == Protocol::Relp {
            let offers = format!(
                "relp_version=0\nrelp_software=dalp,{},https://dalp.invalid\ncommands=syslog",
                env!("CARGO_PKG_VERSION")
            );
            let txnr = sink.relp_write("open", offers.as_bytes()).await?;
            sink.stream.flush().await?;
            let answer = sink.relp_answer(txnr, Instant::now() + ACK_TIMEOUT).await?;
            let text = String::from_utf8_lossy(&answer);
            if !text.starts_with("200") {
                return Err(ExportError::Refused(format!("RELP open: {text}")));
            }
            if !text.contains("commands=syslog") {
                return Err(ExportError::Refused(
                    "the RELP receiver does not offer the syslog command".into(),
                ));
            }
        }
        Ok(sink)
    }

    /// Whether a completed send means the receiver's application has the messages.
    pub fn acknowledges(&self) -> bool {
        self.protocol == Protocol::Relp
    }

    /// Fails with `Closed` when the receiver has closed or reset the connection (seen on the
    /// read side without waiting): the forwarder checks before every batch, so it never
    /// writes into a connection the peer already left.
    pub async fn check_open(&mut self) -> Result<(), ExportError> {
        let mut b = [0u8; 4096];
        match tokio::time::timeout(Duration::from_millis(1), self.stream.read(&mut b)).await {
            Err(_) => Ok(()),
            Ok(Ok(0)) => Err(ExportError::Closed),
            Ok(Ok(n)) => {
                if self.protocol == Protocol::Relp {
                    self.inbuf.extend_from_slice(&b[..n]);
                    if let Some((f, _)) = parse_relp(&self.inbuf).map_err(ExportError::Refused)? {
                        if f.command == "serverclose" {
                            return Err(ExportError::Closed);
                        }
                    }
                }
                Ok(())
            }
            Ok(Err(e)) => Err(ExportError::Io(e)),
        }
    }

    async fn relp_write(&mut self, command: &str, data: &[u8]) -> Result<u32, ExportError> {
        self.txnr = if self.txnr >= RELP_MAX_TXNR {
            1
        } else {
            self.txnr + 1
        };
        let mut frame = format!("{} {command} {}", self.txnr, data.len()).into_bytes();
        if !data.is_empty() {
            frame.push(b' ');
            frame.extend_from_slice(data);
        }
        frame.push(b'\n');
        self.stream.write_all(&frame).await?;
        Ok(self.txnr)
    }

    /// The next RELP frame from the receiver, by `deadline`.
    async fn relp_frame(&mut self, deadline: Instant) -> Result<RelpFrame, ExportError> {
        loop {
            if let Some((frame, used)) = parse_relp(&self.inbuf).map_err(ExportError::Refused)? {
                self.inbuf.drain(..used);
                if frame.command == "serverclose" {
                    return Err(ExportError::Closed);
                }
                return Ok(frame);
            }
            let mut b = [0u8; 8192];
            let n = tokio::time::timeout_at(deadline.into(), self.stream.read(&mut b))
                .await
                .map_err(|_| ExportError::NoAck(ACK_TIMEOUT))??;
            if n == 0 {
                return Err(ExportError::Closed);
            }
            self.inbuf.extend_from_slice(&b[..n]);
        }
    }

    /// The answer to transaction `txnr`.
    async fn relp_answer(&mut self, txnr: u32, deadline: Instant) -> Result<Vec<u8>, ExportError> {
        let f = self.relp_frame(deadline).await?;
        if f.command != "rsp" || f.txnr != txnr {
            return Err(ExportError::Refused(format!(
                "RELP: expected the answer to {txnr}, got `{} {}`",
                f.txnr, f.command
            )));
        }
        Ok(f.data)
    }

    /// Sends `messages` and returns once the receiver acknowledged them: RELP, each answered
    /// `200`; syslog, every byte acknowledged by the receiver's TCP stack with the
    /// connection still open.
    pub async fn send(&mut self, messages: &[String]) -> Result<(), ExportError> {
        let deadline = Instant::now() + ACK_TIMEOUT;
        match self.protocol {
            Protocol::Syslog => {
                let mut buf = Vec::new();
                for m in messages {
                    buf.extend_from_slice(format!("{} {m}", m.len()).as_bytes());
                }
                self.stream.write_all(&buf).await?;
                self.stream.flush().await?;
                loop {
                    self.check_open().await?;
                    if unacknowledged_bytes(&self.stream)? == 0 {
                        return Ok(());
                    }
                    if Instant::now() > deadline {
                        return Err(ExportError::NoAck(ACK_TIMEOUT));
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            Protocol::Relp => {
                let mut pending = std::collections::VecDeque::new();
                for m in messages {
                    pending.push_back(self.relp_write("syslog", m.as_bytes()).await?);
                }
                self.stream.flush().await?;
                while let Some(txnr) = pending.pop_front() {
                    let answer = self.relp_answer(txnr, deadline).await?;
                    if !answer.starts_with(b"200") {
                        return Err(ExportError::Refused(
                            String::from_utf8_lossy(&answer).to_string(),
                        ));
                    }
                }
                Ok(())
            }
        }
    }

    /// Ends the session properly: RELP `close`, then TLS close_notify, then waits (5 s) for
    /// the receiver to close its side. True when it did: having read our close_notify, it
    /// has read everything before it.
    pub async fn close(mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        if self.protocol == Protocol::Relp {
            let closed = async {
                let txnr = self.relp_write("close", b"").await?;
                self.stream.flush().await?;
                self.relp_answer(txnr, deadline).await
            };
            if closed.await.is_err() {
                return false;
            }
        }
        if tokio::time::timeout_at(deadline.into(), self.stream.shutdown())
            .await
            .map(|r| r.is_err())
            .unwrap_or(true)
        {
            return false;
        }
        let mut b = [0u8; 4096];
        loop {
            match tokio::time::timeout_at(deadline.into(), self.stream.read(&mut b)).await {
                Ok(Ok(0)) => return true,
                Ok(Ok(_)) => continue,
                // A receiver that answers close_notify by closing the socket at once.
                Ok(Err(e)) => return e.kind() == std::io::ErrorKind::UnexpectedEof,
                Err(_) => return false,
            }
        }
    }
}

/// Bytes written to the socket that the peer's TCP stack has not acknowledged yet
/// (Linux `SIOCOUTQ`).
fn unacknowledged_bytes(stream: &TlsStream<TcpStream>) -> std::io::Result<i32> {
    let fd = stream.get_ref().0.as_raw_fd();
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes one c_int through the pointer, which points to `n`; `fd` is
    // the open socket owned by `stream`, borrowed for the duration of the call.
    let r = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n as *mut libc::c_int) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        let t = SyslogTarget::parse("syslog+tls://siem.example:6514").unwrap();
        assert_eq!(
            (t.protocol, t.host.as_str(), t.port),
            (Protocol::Syslog, "siem.example", 6514)
        );
        let t = SyslogTarget::parse("relp+tls://[::1]:2514").unwrap();
        assert_eq!((t.protocol, t.host.as_str()), (Protocol::Relp, "::1"));
        assert!(SyslogTarget::parse("tcp://x:1").is_err());
        assert!(SyslogTarget::parse("syslog+tls://x").is_err());
    }

    #[test]
    fn relp_frames_parse_whole_or_wait_for_more() {
        let (f, n) = parse_relp(b"2 rsp 6 200 OK\n3 rsp").unwrap().unwrap();
        assert_eq!(
            (f.txnr, f.command.as_str(), f.data.as_slice()),
            (2, "rsp", &b"200 OK"[..])
        );
        assert_eq!(n, 15);
        assert_eq!(parse_relp(b"2 rsp 6 200").unwrap(), None);
        assert_eq!(parse_relp(b"2 rsp 6 200 OK").unwrap(), None);
        let (f, _) = parse_relp(b"0 serverclose 0\n").unwrap().unwrap();
        assert_eq!((f.txnr, f.command.as_str()), (0, "serverclose"));
        assert!(parse_relp(b"x rsp 0\n").is_err());
        assert!(parse_relp(b"1 rsp 2 okX\n").is_err());
    }
}
