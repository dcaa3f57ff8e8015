//! Getting sealed events out: JSON lines, CSV, CEF and RFC 5424 syslog, to a file or to a
//! SIEM over syslog/TLS (RFC 5425 octet-counted frames). Events leave in sealed-sequence
//! order, so a forwarder's durable cursor is one number and a restart resumes exactly where
//! delivery was last confirmed (at-least-once: a batch sent but not yet recorded is sent
//! again).

use dalp_db::TypedClient;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use deadpool_postgres::Pool;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio_postgres::Client;
use tokio_rustls::client::TlsStream;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Csv,
    Cef,
    Rfc5424,
}

impl Format {
    pub fn parse(s: &str) -> Result<Format, String> {
        match s {
            "jsonl" => Ok(Format::Jsonl),
            "csv" => Ok(Format::Csv),
            "cef" => Ok(Format::Cef),
            "rfc5424" => Ok(Format::Rfc5424),
            _ => Err(format!(
                "unknown format `{s}`: use jsonl, csv, cef or rfc5424"
            )),
        }
    }
}

/// One sealed event with its place in the chain.
#[derive(Debug, Clone, PartialEq)]
pub struct SealedEvent {
    pub seq: i64,
    pub id: i64,
    pub occurred_at: DateTime<Utc>,
    pub actor: String,
    pub organisation_id: Option<String>,
    pub action: String,
    pub resource_type: String,
    pub resource_id: Option<String>,
    pub outcome: String,
    pub request_id: Option<String>,
    pub source_ip: Option<String>,
    pub details: Value,
}

/// Up to `limit` sealed events after sequence `after`, optionally only those at or after
/// `since`, in sequence order. Events removed by retention are skipped.
pub async fn read_sealed(
    client: &Client,
    after: i64,
    since: Option<DateTime<Utc>>,
    limit: i64,
) -> Result<Vec<SealedEvent>, tokio_postgres::Error> {
    let rows = client
        .typed_query(
            "SELECT b.first_seq + x.ord - 1 AS seq, e.id, e.occurred_at, e.actor, e.organisation_id::text, e.action,
                    e.resource_type, e.resource_id, e.outcome, e.request_id, host(e.source_ip), e.details
               FROM dalp_audit.seal_batches b
              CROSS JOIN LATERAL unnest(b.event_ids, b.event_times) WITH ORDINALITY AS x(id, at, ord)
               JOIN dalp_audit.events e ON e.id = x.id AND e.occurred_at = x.at
              WHERE b.last_seq > $1 AND b.first_seq + x.ord - 1 > $1
                AND ($2::timestamptz IS NULL OR x.at >= $2)
              ORDER BY seq
              LIMIT $3",
            &[&after, &since, &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| SealedEvent {
            seq: r.get(0),
            id: r.get(1),
            occurred_at: r.get(2),
            actor: r.get(3),
            organisation_id: r.get(4),
            action: r.get(5),
            resource_type: r.get(6),
            resource_id: r.get(7),
            outcome: r.get(8),
            request_id: r.get(9),
            source_ip: r.get(10),
            details: r.get(11),
        })
        .collect())
}

pub const CSV_HEADER: &str =
    "seq,id,occurred_at,actor,organisation_id,action,resource_type,resource_id,outcome,request_id,source_ip,details";

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// CEF header fields escape `\` and `|`.
fn cef_header(s: &str) -> String {
    s.replace('\\', "\\\\").replace('|', "\\|")
}

/// CEF extension values escape `\`, `=` and line breaks.
fn cef_value(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('=', "\\=")
        .replace('\n', "\\n")
        .replace('\r', "\\r")
}

/// RFC 5424 structured-data values escape `"`, `\` and `]`.
fn sd_value(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace(']', "\\]")
}

/// Facility 13 (log audit); severity 6 (informational), 4 (warning) for denials, 3 (error).
fn severity(outcome: &str) -> (u8, u8) {
    match outcome {
        "denied" => (4, 7),
        "error" => (3, 8),
        _ => (6, 3),
    }
}

/// One line (no line break) in `format`.
pub fn render(format: Format, e: &SealedEvent, hostname: &str) -> String {
    let at = e.occurred_at.to_rfc3339_opts(SecondsFormat::Micros, true);
    match format {
        Format::Jsonl => json!({
            "seq": e.seq, "id": e.id, "occurred_at": at, "actor": e.actor,
            "organisation_id": e.organisation_id, "action": e.action, "resource_type": e.resource_type,
            "resource_id": e.resource_id, "outcome": e.outcome, "request_id": e.request_id,
            "source_ip": e.source_ip, "details": e.details,
        })
        .to_string(),
        Format::Csv => [
            e.seq.to_string(),
            e.id.to_string(),
            at,
            csv_field(&e.actor),
            e.organisation_id.clone().unwrap_or_default(),
            csv_field(&e.action),
            csv_field(&e.resource_type),
            csv_field(e.resource_id.as_deref().unwrap_or("")),
            e.outcome.clone(),
            csv_field(e.request_id.as_deref().unwrap_or("")),
            e.source_ip.clone().unwrap_or_default(),
            csv_field(&e.details.to_string()),
        ]
        .join(","),
        Format::Cef => {
            let (_, cef_sev) = severity(&e.outcome);
            let mut ext = vec![
                format!("rt={}", e.occurred_at.timestamp_millis()),
                format!("externalId={}", e.seq),
                format!("suser={}", cef_value(&e.actor)),
                format!("outcome={}", e.outcome),
                format!("cs1Label=resourceType cs1={}", cef_value(&e.resource_type)),
            ];
            if let Some(r) = &e.resource_id {
                ext.push(format!("cs2Label=resourceId cs2={}", cef_value(r)));
            }
            if let Some(r) = &e.request_id {
                ext.push(format!("cs3Label=requestId cs3={}", cef_value(r)));
            }
            if let Some(ip) = &e.source_ip {
                ext.push(format!("src={ip}"));
            }
            format!(
                "CEF:0|dalp|dalp|{}|{}|{}|{}|{}",
                env!("CARGO_PKG_VERSION"),
                cef_header(&e.action),
                cef_header(&e.action),
                cef_sev,
                ext.join(" ")
            )
        }
        Format::Rfc5424 => {
            let (sev, _) = severity(&e.outcome);
            let pri = 13 * 8 + sev;
            let mut sd = format!(
                "[dalp@32473 seq=\"{}\" id=\"{}\" actor=\"{}\" action=\"{}\" outcome=\"{}\" resourceType=\"{}\"",
                e.seq,
                e.id,
                sd_value(&e.actor),
                sd_value(&e.action),
                e.outcome,
                sd_value(&e.resource_type)
            );
            if let Some(r) = &e.resource_id {
                sd.push_str(&format!(" resourceId=\"{}\"", sd_value(r)));
            }
            sd.push(']');
            format!("<{pri}>1 {at} {hostname} dalp - audit {sd} {}", e.details)
        }
    }
}

/// A syslog-over-TLS destination: `syslog+tls://HOST:PORT`.
#[derive(Debug, Clone)]
pub struct SyslogTarget {
    pub host: String,
    pub port: u16,
}

impl SyslogTarget {
    pub fn parse(s: &str) -> Result<SyslogTarget, String> {
        let rest = s
            .strip_prefix("syslog+tls://")
            .ok_or_else(|| format!("`{s}` is not syslog+tls://HOST:PORT"))?;
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| format!("`{s}` needs a port"))?;
        let port = port
            .parse()
            .map_err(|_| format!("`{s}` has an invalid port"))?;
        Ok(SyslogTarget {
            host: host.trim_matches(['[', ']']).to_string(),
            port,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("sending to the SIEM: {0}")]
    Io(#[from] std::io::Error),
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("database unavailable: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
}

/// A TLS connection to a syslog receiver (certificate verified against `ca_file`, name
/// checked against the host), sending RFC 5425 octet-counted frames.
pub struct SyslogSink {
    stream: TlsStream<tokio::net::TcpStream>,
}

impl SyslogSink {
    pub async fn connect(target: &SyslogTarget, ca_file: &Path) -> Result<SyslogSink, ExportError> {
        let tls = |e: String| ExportError::Tls(e);
        let mut roots = rustls::RootCertStore::empty();
        let f =
            std::fs::File::open(ca_file).map_err(|e| tls(format!("{}: {e}", ca_file.display())))?;
        for cert in rustls_pemfile::certs(&mut BufReader::new(f)) {
            roots
                .add(cert.map_err(|e| tls(e.to_string()))?)
                .map_err(|e| tls(e.to_string()))?;
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(target.host.clone())
            .map_err(|e| tls(e.to_string()))?;
        let tcp = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect((target.host.as_str(), target.port)),
        )
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await?;
        Ok(SyslogSink { stream })
    }

    /// Sends messages and flushes: when this returns, the receiver's TCP stack has them.
    pub async fn send(&mut self, messages: &[String]) -> Result<(), ExportError> {
        let mut buf = Vec::new();
        for m in messages {
            buf.extend_from_slice(format!("{} {m}", m.len()).as_bytes());
        }
        self.stream.write_all(&buf).await?;
        self.stream.flush().await?;
        Ok(())
    }
}

/// Ships sealed events to a SIEM continuously, with a durable cursor in
/// `dalp_audit.forward_cursors` (runs as the sealer role).
pub struct Forwarder {
    pub pool: Pool,
    pub name: String,
    pub format: Format,
    pub target: SyslogTarget,
    pub ca_file: std::path::PathBuf,
    pub batch: i64,
    pub hostname: String,
    /// Pause after each batch, to spare a SIEM with ingest limits. Zero: none.
    pub pace: Duration,
    /// Also ship pgAudit's AUDIT entries from the JSON server logs (`*.json`) in this
    /// directory, each file with its own durable byte-offset cursor.
    pub pgaudit_dir: Option<std::path::PathBuf>,
}

/// A cursor's position, creating its row (at 0) only when it does not exist yet.
async fn read_or_create_cursor(
    c: &deadpool_postgres::Object,
    name: &str,
) -> Result<i64, ExportError> {
    if let Some(r) = c
        .typed_query_opt(
            "SELECT last_seq FROM dalp_audit.forward_cursors WHERE name = $1",
            &[&name],
        )
        .await?
    {
        return Ok(r.get(0));
    }
    c.typed_execute(
        "INSERT INTO dalp_audit.forward_cursors (name) VALUES ($1) ON CONFLICT (name) DO NOTHING",
        &[&name],
    )
    .await?;
    Ok(c.typed_query_one(
        "SELECT last_seq FROM dalp_audit.forward_cursors WHERE name = $1",
        &[&name],
    )
    .await?
    .get(0))
}

/// Cursor name of one server log file: `<forwarder>-pgaudit-<file>` in cursor syntax.
fn log_cursor_name(forwarder: &str, file: &str) -> String {
    let f: String = file
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let mut n = format!("{forwarder}-pgaudit-{f}");
    n.truncate(63);
    n
}

impl Forwarder {
    /// The durable cursor (read; the row is created the first time only, so an idle
    /// forwarder writes nothing that pgAudit would log).
    pub async fn cursor(&self) -> Result<i64, ExportError> {
        let c = dalp_db::pool::checkout(&self.pool, "audit").await?;
        read_or_create_cursor(&c, &self.name).await
    }

    /// Sends one batch after the cursor and then records it; returns how many were sent.
    pub async fn step(&self, sink: &mut SyslogSink) -> Result<usize, ExportError> {
        let after = self.cursor().await?;
        let c = dalp_db::pool::checkout(&self.pool, "audit").await?;
        let events = read_sealed(&c, after, None, self.batch).await?;
        if events.is_empty() {
            return Ok(0);
        }
        let lines: Vec<String> = events
            .iter()
            .map(|e| render(self.format, e, &self.hostname))
            .collect();
        sink.send(&lines).await?;
        let last = events.last().map(|e| e.seq).unwrap_or(after);
        c.typed_execute(
            "UPDATE dalp_audit.forward_cursors SET last_seq = $2, updated_at = now() WHERE name = $1 AND last_seq < $2",
            &[&self.name, &last],
        )
        .await?;
        Ok(events.len())
    }

    /// Ships new AUDIT lines of the server's JSON logs; returns how many were sent.
    /// `offsets` keeps each file's position between rounds: the durable cursor is written
    /// only after lines were shipped, and the forwarder's own cursor statements (pgAudit
    /// logs them as writes naming `dalp_audit.forward_cursors`) are skipped, never shipped — else
    /// each cursor write would log a line that needs another cursor write.
    pub async fn step_pgaudit(
        &self,
        sink: &mut SyslogSink,
        offsets: &mut std::collections::HashMap<String, i64>,
    ) -> Result<usize, ExportError> {
        use std::io::{Read, Seek, SeekFrom};
        let Some(dir) = &self.pgaudit_dir else {
            return Ok(0);
        };
        let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().map(|x| x == "json").unwrap_or(false))
            .collect();
        files.sort();
        let c = dalp_db::pool::checkout(&self.pool, "audit").await?;
        let mut sent = 0;
        for path in files {
            let file_name = path
                .file_name()
                .map(|f| f.to_string_lossy().to_string())
                .unwrap_or_default();
            let cursor = log_cursor_name(&self.name, &file_name);
            let offset = match offsets.get(&cursor) {
                Some(o) => *o,
                None => read_or_create_cursor(&c, &cursor).await?,
            };
            let mut f = std::fs::File::open(&path)?;
            f.seek(SeekFrom::Start(offset as u64))?;
            let mut buf = Vec::new();
            f.take(4 << 20).read_to_end(&mut buf)?;
            // Only whole lines; a line still being written waits for the next round.
            let Some(end) = buf.iter().rposition(|b| *b == b'\n') else {
                offsets.insert(cursor, offset);
                continue;
            };
            let text = String::from_utf8_lossy(&buf[..=end]);
            let now = Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true);
            let lines: Vec<String> = text
                .lines()
                .filter(|l| l.contains("\"message\":\"AUDIT: "))
                .filter(|l| !l.contains("dalp_audit.forward_cursors"))
                .map(|l| format!("<110>1 {now} {} dalp - pgaudit - {l}", self.hostname))
                .collect();
            let next = offset + end as i64 + 1;
            if !lines.is_empty() {
                sink.send(&lines).await?;
                sent += lines.len();
                c.typed_execute(
                    "UPDATE dalp_audit.forward_cursors SET last_seq = $2, updated_at = now() WHERE name = $1",
                    &[&cursor, &next],
                )
                .await?;
            }
            offsets.insert(cursor, next);
        }
        Ok(sent)
    }

    /// Runs until aborted: reconnects with backoff on any failure, never advancing the cursor
    /// past what was sent.
    pub async fn run(&self, mut on_sent: impl FnMut(usize, i64)) {
        let mut backoff = Duration::from_millis(200);
        loop {
            let mut sink = match SyslogSink::connect(&self.target, &self.ca_file).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "SIEM unreachable; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            };
            backoff = Duration::from_millis(200);
            // Log positions read since the last durable write (see `step_pgaudit`).
            let mut offsets = std::collections::HashMap::new();
            loop {
                let logs = match self.step_pgaudit(&mut sink, &mut offsets).await {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::warn!(error = %e, "forwarding server audit logs failed; reconnecting");
                        break;
                    }
                };
                if logs > 0 {
                    on_sent(logs, self.cursor().await.unwrap_or(-1));
                }
                match self.step(&mut sink).await {
                    Ok(0) => tokio::time::sleep(Duration::from_millis(250)).await,
                    Ok(n) => {
                        on_sent(n, self.cursor().await.unwrap_or(-1));
                        if !self.pace.is_zero() {
                            tokio::time::sleep(self.pace).await;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "forwarding failed; reconnecting");
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(outcome: &str) -> SealedEvent {
        SealedEvent {
            seq: 7,
            id: 42,
            occurred_at: DateTime::parse_from_rfc3339("2026-11-23T10:00:00.5Z")
                .unwrap()
                .with_timezone(&Utc),
            actor: "user:a=b|c".into(),
            organisation_id: None,
            action: "identity.login".into(),
            resource_type: "session".into(),
            resource_id: Some("x\"]y".into()),
            outcome: outcome.into(),
            request_id: Some("r1".into()),
            source_ip: Some("127.0.0.1".into()),
            details: json!({"k": "v, w"}),
        }
    }

    /// Splits a CEF line as a reader does: seven header fields on unescaped pipes, then the
    /// extension (where pipes need no escaping).
    pub(crate) fn parse_cef(line: &str) -> Option<(Vec<String>, String)> {
        let mut fields = Vec::new();
        let mut cur = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => cur.push(chars.next()?),
                '|' if fields.len() < 7 => fields.push(std::mem::take(&mut cur)),
                _ => cur.push(c),
            }
            if fields.len() == 7 {
                return Some((fields, chars.collect()));
            }
        }
        None
    }

    #[test]
    fn cef_escapes_and_has_seven_header_fields() {
        let line = render(Format::Cef, &ev("denied"), "h");
        let (header, ext) = parse_cef(&line).expect("parses");
        assert_eq!(header[0], "CEF:0");
        assert_eq!(header[4], "identity.login");
        assert_eq!(header[6], "7", "denied is severity 7");
        assert!(ext.starts_with("rt="), "{ext}");
        assert!(ext.contains("suser=user:a\\=b|c"), "{ext}");
        assert!(ext.contains("externalId=7"), "{ext}");
    }

    #[test]
    fn rfc5424_has_priority_version_and_escaped_structured_data() {
        let line = render(Format::Rfc5424, &ev("denied"), "host1");
        assert!(
            line.starts_with(
                "<108>1 2026-11-23T10:00:00.500000Z host1 dalp - audit [dalp@32473 seq=\"7\""
            ),
            "{line}"
        );
        assert!(line.contains("resourceId=\"x\\\"\\]y\""), "{line}");
        assert!(render(Format::Rfc5424, &ev("success"), "h").starts_with("<110>1 "));
    }

    #[test]
    fn csv_quotes_fields_with_commas() {
        let line = render(Format::Csv, &ev("success"), "h");
        assert_eq!(line.split(',').next(), Some("7"));
        assert!(line.contains("\"{\"\"k\"\":\"\"v, w\"\"}\""), "{line}");
        assert_eq!(CSV_HEADER.split(',').count(), 12);
    }

    #[test]
    fn syslog_targets_parse() {
        let t = SyslogTarget::parse("syslog+tls://siem.example:6514").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("siem.example", 6514));
        assert!(SyslogTarget::parse("tcp://x:1").is_err());
        assert!(SyslogTarget::parse("syslog+tls://x").is_err());
    }
}
