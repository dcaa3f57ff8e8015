//! Framing for a SIEM: every message is RFC 5424 — the event's own time, the configured
//! host, app-name `dalp`, a severity from the outcome, the whole request context in
//! structured data — whatever the body format (the event's details as JSON, a CEF line or a
//! JSON line). Messages stay within a maximum size: an oversized `details` is replaced by a
//! marker that says how big it was, and anything still too long is cut with a marker.

use chrono::{NaiveDateTime, SecondsFormat, Utc};
use serde_json::{json, Value};

use super::{render, sd_value, severity, Format, SealedEvent};

/// The default SD-ID. dalp has no IANA Private Enterprise Number of its own, so the default
/// uses 32473, the number RFC 5612 reserves for documentation: it can never be mistaken for
/// someone's registered one. Deployments set their organisation's own (`--sd-id NAME@PEN`).
pub const DEFAULT_SD_ID: &str = "dalp@32473";

/// rsyslog's default `maxMessageSize` (8 KiB): larger frames are split or cut by receivers.
pub const DEFAULT_MAX_FRAME: usize = 8192;

/// Every receiver must accept 480 octets (RFC 5424 §6.1); a smaller maximum is refused.
pub const MIN_MAX_FRAME: usize = 480;

const CUT_MARKER: &str = "...[truncated]";

/// Builds the RFC 5424 messages a SIEM receives.
#[derive(Debug, Clone)]
pub struct Framer {
    format: Format,
    hostname: String,
    sd_id: String,
    max_frame: usize,
}

impl Framer {
    /// `format` is the body: rfc5424 (the details as JSON), cef or jsonl. CSV has no place
    /// in a syslog message and is refused, as are an SD-ID that is not `NAME@NUMBER` and a
    /// maximum below 480 octets.
    pub fn new(
        format: Format,
        hostname: &str,
        sd_id: &str,
        max_frame: usize,
    ) -> Result<Framer, String> {
        if format == Format::Csv {
            return Err("csv cannot be sent to a SIEM: use rfc5424, cef or jsonl".into());
        }
        check_sd_id(sd_id)?;
        if max_frame < MIN_MAX_FRAME {
            return Err(format!(
                "the maximum frame size must be at least {MIN_MAX_FRAME} octets (RFC 5424 §6.1), not {max_frame}"
            ));
        }
        Ok(Framer {
            format,
            hostname: header_field(hostname, 255),
            sd_id: sd_id.to_string(),
            max_frame,
        })
    }

    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// The structured data of one event: every field of its request context.
    fn structured_data(&self, e: &SealedEvent) -> String {
        let mut sd = format!(
            "[{} seq=\"{}\" id=\"{}\" actor=\"{}\" action=\"{}\" outcome=\"{}\" resourceType=\"{}\"",
            self.sd_id,
            e.seq,
            e.id,
            sd_value(&e.actor),
            sd_value(&e.action),
            sd_value(&e.outcome),
            sd_value(&e.resource_type)
        );
        let optional = [
            ("resourceId", &e.resource_id),
            ("organisationId", &e.organisation_id),
            ("requestId", &e.request_id),
            ("sourceIp", &e.source_ip),
        ];
        for (name, value) in optional {
            if let Some(v) = value {
                sd.push_str(&format!(" {name}=\"{}\"", sd_value(v)));
            }
        }
        sd.push(']');
        sd
    }

    fn body(&self, e: &SealedEvent) -> String {
        match self.format {
            Format::Rfc5424 => e.details.to_string(),
            other => render(other, e, &self.hostname),
        }
    }

    /// One event as an RFC 5424 message of at most `max_frame` octets.
    pub fn event(&self, e: &SealedEvent) -> String {
        let (sev, _) = severity(&e.outcome);
        let head = format!(
            "<{}>1 {} {} dalp - audit {} ",
            13 * 8 + sev,
            e.occurred_at.to_rfc3339_opts(SecondsFormat::Micros, true),
            self.hostname,
            self.structured_data(e)
        );
        let message = format!("{head}{}", self.body(e));
        if message.len() <= self.max_frame {
            return message;
        }
        // Too big: the details (the only unbounded part) give way to a marker.
        let smaller = SealedEvent {
            details: json!({ "truncated_bytes": e.details.to_string().len() }),
            ..e.clone()
        };
        cut(format!("{head}{}", self.body(&smaller)), self.max_frame)
    }

    /// The signed chain head as an RFC 5424 message (MSGID `chainhead`, the checkpoint as
    /// JSON): shipped beside the events, the SIEM becomes a witness of the chain that
    /// `dalp audit verify --checkpoint` can check against.
    pub fn head(&self, head: &crate::Checkpoint) -> String {
        format!(
            "<110>1 {} {} dalp - chainhead [{} batch=\"{}\" lastSeq=\"{}\" keyId=\"{}\"] {}",
            head.sealed_at.to_rfc3339_opts(SecondsFormat::Micros, true),
            self.hostname,
            self.sd_id,
            head.batch_no,
            head.last_seq,
            sd_value(&head.key_id),
            serde_json::to_string(head).expect("serialize")
        )
    }

    /// One AUDIT line of PostgreSQL's JSON log as an RFC 5424 message, stamped with the
    /// line's own time (the forwarding time only when the line has none that parses). An
    /// oversized line keeps its JSON shape: the statement text is shortened and
    /// `message_truncated_bytes` says by how much.
    pub fn pgaudit(&self, line: &str) -> String {
        let parsed: Option<Value> = serde_json::from_str(line).ok();
        let at = parsed
            .as_ref()
            .and_then(|v| v.get("timestamp")?.as_str().and_then(log_time))
            .unwrap_or_else(|| Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true));
        let head = format!("<110>1 {at} {} dalp - pgaudit - ", self.hostname);
        let message = format!("{head}{line}");
        if message.len() <= self.max_frame {
            return message;
        }
        let Some(mut v) = parsed else {
            return cut(message, self.max_frame);
        };
        let text = v
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        // Room for the marker field itself.
        let excess = message.len() - self.max_frame + 48;
        let keep = floor_char_boundary(&text, text.len().saturating_sub(excess));
        v["message"] = Value::String(text[..keep].to_string());
        v["message_truncated_bytes"] = json!(text.len() - keep);
        cut(format!("{head}{v}"), self.max_frame)
    }
}

/// RFC 5424 SD-ID for private use: `NAME@NUMBER`, NAME 1–32 printable ASCII characters
/// other than `=`, space, `]`, `"` and `@`.
fn check_sd_id(sd_id: &str) -> Result<(), String> {
    let bad =
        || format!("`{sd_id}` is not an SD-ID: use NAME@PEN, e.g. dalp@<your enterprise number>");
    let (name, pen) = sd_id.split_once('@').ok_or_else(bad)?;
    let name_ok = (1..=32).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_graphic() && !matches!(c, '=' | ']' | '"' | '@'));
    let pen_ok = !pen.is_empty() && pen.chars().all(|c| c.is_ascii_digit());
    if name_ok && pen_ok {
        Ok(())
    } else {
        Err(bad())
    }
}

/// A header field: printable ASCII without spaces, at most `max` characters, `-` if empty.
fn header_field(s: &str, max: usize) -> String {
    let f: String = s
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(max)
        .collect();
    if f.is_empty() {
        "-".into()
    } else {
        f
    }
}

/// PostgreSQL's log time (`2026-11-29 20:13:44.123 UTC`) as RFC 3339, when it is in UTC.
fn log_time(ts: &str) -> Option<String> {
    let local = ts
        .strip_suffix(" UTC")
        .or_else(|| ts.strip_suffix(" GMT"))?;
    let t = NaiveDateTime::parse_from_str(local, "%Y-%m-%d %H:%M:%S%.f").ok()?;
    Some(t.and_utc().to_rfc3339_opts(SecondsFormat::Micros, true))
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// `message` cut to `max` octets (on a character boundary) with a marker, if longer.
fn cut(message: String, max: usize) -> String {
    if message.len() <= max {
        return message;
    }
    let keep = floor_char_boundary(&message, max - CUT_MARKER.len());
    format!("{}{CUT_MARKER}", &message[..keep])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(outcome: &str, details: Value) -> SealedEvent {
        SealedEvent {
            actor: "user:a".into(),
            organisation_id: Some("0191f1a0-0000-7000-8000-000000000001".into()),
            source_ip: Some("192.0.2.7".into()),
            details,
            ..crate::export::tests::ev(outcome)
        }
    }

    #[test]
    fn every_body_format_gets_the_rfc5424_header_and_full_context() {
        for (format, body_start) in [
            (Format::Rfc5424, "{"),
            (Format::Cef, "CEF:0|"),
            (Format::Jsonl, "{\"action\":"),
        ] {
            let f = Framer::new(format, "host 1", "acme@12345", 8192).unwrap();
            let m = f.event(&ev("denied", json!({"k": 1})));
            assert!(
                m.starts_with(
                    "<108>1 2026-11-23T10:00:00.500000Z host1 dalp - audit [acme@12345 seq=\"7\" id=\"42\""
                ),
                "{m}"
            );
            for part in [
                "resourceId=\"x\\\"\\]y\"",
                "organisationId=\"0191f1a0-0000-7000-8000-000000000001\"",
                "requestId=\"r1\"",
                "sourceIp=\"192.0.2.7\"",
            ] {
                assert!(m.contains(part), "{part} missing: {m}");
            }
            let body = m.split("\"] ").nth(1).unwrap();
            assert!(body.starts_with(body_start), "{format:?}: {body}");
        }
        let ok = Framer::new(Format::Rfc5424, "h", DEFAULT_SD_ID, 8192).unwrap();
        assert!(ok.event(&ev("success", json!({}))).starts_with("<110>1 "));
        assert!(ok.event(&ev("error", json!({}))).starts_with("<107>1 "));
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(Framer::new(Format::Csv, "h", DEFAULT_SD_ID, 8192).is_err());
        for bad in ["dalp", "dalp@", "@1", "da lp@1", "dalp@x1", "a]b@1"] {
            assert!(Framer::new(Format::Cef, "h", bad, 8192).is_err(), "{bad}");
        }
        assert!(Framer::new(Format::Cef, "h", DEFAULT_SD_ID, 479).is_err());
    }

    #[test]
    fn oversized_details_become_a_marker_and_frames_stay_within_the_maximum() {
        let f = Framer::new(Format::Rfc5424, "h", DEFAULT_SD_ID, 1024).unwrap();
        let big = json!({ "blob": "é".repeat(5000) });
        let m = f.event(&ev("success", big.clone()));
        assert!(m.len() <= 1024, "{}", m.len());
        let body: Value = serde_json::from_str(m.split("\"] ").nth(1).unwrap()).unwrap();
        assert_eq!(body["truncated_bytes"], json!(big.to_string().len()));
        // A CEF line carries no details; a huge resource id is cut with a marker.
        let mut e = ev("success", json!({}));
        e.resource_id = Some("r".repeat(4000));
        let m = Framer::new(Format::Cef, "h", DEFAULT_SD_ID, 1024)
            .unwrap()
            .event(&e);
        assert!(m.len() <= 1024 && m.ends_with(CUT_MARKER), "{m}");
    }

    #[test]
    fn pgaudit_lines_carry_their_own_time_and_stay_json_when_shortened() {
        let f = Framer::new(Format::Rfc5424, "h", DEFAULT_SD_ID, 600).unwrap();
        let line = json!({
            "timestamp": "2026-11-29 20:13:44.123 UTC",
            "message": format!("AUDIT: SESSION,1,1,WRITE,INSERT,,,{}", "x".repeat(2000)),
        })
        .to_string();
        let m = f.pgaudit(&line);
        assert!(
            m.starts_with("<110>1 2026-11-29T20:13:44.123000Z h dalp - pgaudit - {"),
            "{m}"
        );
        assert!(m.len() <= 600, "{}", m.len());
        let v: Value = serde_json::from_str(m.splitn(8, ' ').nth(7).unwrap()).unwrap();
        assert!(v["message"].as_str().unwrap().starts_with("AUDIT: SESSION"));
        assert!(v["message_truncated_bytes"].as_u64().unwrap() > 1000);
    }
}
