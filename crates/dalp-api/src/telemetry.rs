//! In-process HTTP metrics for `/metrics`: a latency histogram per (method, route) and a
//! counter of error responses per status. (Store-operation latency is
//! `dalp_app::telemetry`.)

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use dalp_app::telemetry::{escape, Histogram};

#[derive(Default)]
pub struct HttpMetrics {
    latency: Mutex<BTreeMap<(String, String), Histogram>>,
    errors: Mutex<BTreeMap<u16, u64>>,
}

impl HttpMetrics {
    pub fn observe(&self, method: &str, route: &str, status: u16, took: Duration) {
        self.latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((method.to_string(), route.to_string()))
            .or_default()
            .observe(took);
        if status >= 400 {
            *self
                .errors
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(status)
                .or_default() += 1;
        }
    }

    /// Prometheus text exposition of both families.
    pub fn render(&self, out: &mut String) {
        let name = "dalp_http_request_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Latency of API requests by method and route."
        );
        let _ = writeln!(out, "# TYPE {name} histogram");
        for ((method, route), h) in self
            .latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            h.render(
                out,
                name,
                &format!("method=\"{method}\",route=\"{}\"", escape(route)),
            );
        }
        let name = "dalp_http_errors_total";
        let _ = writeln!(out, "# HELP {name} Error responses by HTTP status.");
        let _ = writeln!(out, "# TYPE {name} counter");
        for (status, n) in self.errors.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "{name}{{status=\"{status}\"}} {n}");
        }
    }
}
