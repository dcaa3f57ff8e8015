//! Getting sealed events out: JSON lines, CSV, CEF and RFC 5424 syslog, to a file or to a
//! SIEM over syslog/TLS (RFC 5425) or RELP/TLS (`transport`), framed as RFC 5424 (`frame`).
//! Events leave in sealed-sequence order, so a forwarder's durable cursor is one number and a
//! restart resumes from what the receiver is known to hold (`forward`: at-least-once; a
//! resent event carries its sequence number, so a SIEM can drop the duplicate).

use dalp_db::TypedClient;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Value};
use tokio_postgres::Client;

mod forward;
mod frame;
mod transport;

pub use forward::{Forwarder, Progress};
pub use frame::{Framer, DEFAULT_MAX_FRAME, DEFAULT_SD_ID};
pub use transport::{Protocol, SiemTls, SyslogSink, SyslogTarget};

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
                -- Without a time filter the next `limit` events are the sequence numbers
                -- right after `after`: only the batches holding them are read.
                AND ($2::timestamptz IS NOT NULL OR (b.first_seq <= $1 + $3 AND b.first_seq + x.ord - 1 <= $1 + $3))
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
pub(crate) fn sd_value(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace(']', "\\]")
}

/// Facility 13 (log audit); severity 6 (informational), 4 (warning) for denials, 3 (error).
pub(crate) fn severity(outcome: &str) -> (u8, u8) {
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
            if let Some(o) = &e.organisation_id {
                ext.push(format!("cs4Label=organisationId cs4={}", cef_value(o)));
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
        // The same message a SIEM receives, without a size limit.
        Format::Rfc5424 => Framer::new(Format::Rfc5424, hostname, DEFAULT_SD_ID, usize::MAX)
            .expect("the default framing settings are valid")
            .event(e),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A setting that cannot work (unreadable CA bundle, bad host name): fatal.
    #[error("configuration: {0}")]
    Config(String),
    #[error("the SIEM's certificate was refused: {0} (check --ca and the host name in --to)")]
    Certificate(String),
    #[error("TLS with the SIEM failed: {0}")]
    Tls(String),
    #[error("SIEM unreachable: {0}")]
    Unreachable(String),
    #[error("the SIEM closed the connection")]
    Closed,
    #[error("the SIEM did not acknowledge within {0:?}")]
    NoAck(std::time::Duration),
    #[error("the SIEM refused a message: {0}")]
    Refused(String),
    #[error("sending to the SIEM: {0}")]
    Io(#[from] std::io::Error),
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("reading the chain head: {0}")]
    Chain(String),
    #[error("database unavailable: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
}

impl ExportError {
    /// Errors that retrying cannot fix: the forwarder stops on them.
    pub fn is_fatal(&self) -> bool {
        matches!(self, ExportError::Config(_))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A sealed event with characters every format must escape.
    pub(crate) fn ev(outcome: &str) -> SealedEvent {
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
}
