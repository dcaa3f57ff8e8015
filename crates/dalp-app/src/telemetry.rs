//! Store-operation latency for `/metrics`: every store method carries
//! `#[tracing::instrument(target = "dalp_store", name = "<store>.<method>")]`, and
//! [`StoreLayer`] times those spans into one histogram per operation. [`Histogram`] is
//! shared with the HTTP metrics of `dalp-api`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A Prometheus latency histogram.
#[derive(Default, Clone)]
pub struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    pub fn observe(&mut self, took: Duration) {
        let secs = took.as_secs_f64();
        for (i, le) in BUCKETS.iter().enumerate() {
            if secs <= *le {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += secs;
    }

    /// The `_bucket`, `_sum` and `_count` lines of metric `name` with `labels`.
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        for (i, le) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels},le=\"{le}\"}} {}",
                self.counts[i]
            );
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {:.6}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

/// A label value, escaped for the text exposition format.
pub fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Latency of store operations (wall time, awaits included).
#[derive(Default)]
pub struct StoreMetrics {
    latency: Mutex<BTreeMap<String, Histogram>>,
}

/// The process-wide store metrics (one tracing subscriber per process feeds them).
pub fn store_metrics() -> &'static StoreMetrics {
    static M: std::sync::OnceLock<StoreMetrics> = std::sync::OnceLock::new();
    M.get_or_init(StoreMetrics::default)
}

impl StoreMetrics {
    pub fn observe(&self, operation: &str, took: Duration) {
        let mut map = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(operation.to_string()).or_default().observe(took);
    }

    pub fn render(&self, out: &mut String) {
        let name = "dalp_store_operation_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Latency of store operations (one per domain method, database round trips included)."
        );
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (op, h) in self
            .latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            h.render(out, name, &format!("operation=\"{}\"", escape(op)));
        }
    }
}

/// The tracing target of store-operation spans.
pub const STORE_TARGET: &str = "dalp_store";

struct Started(std::time::Instant);

/// A tracing layer that times store-operation spans into [`store_metrics`]. Install it
/// with [`store_layer_filter`] so only those spans are created for it.
pub struct StoreLayer;

impl<S> tracing_subscriber::Layer<S> for StoreLayer
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if attrs.metadata().target() == STORE_TARGET {
            if let Some(span) = ctx.span(id) {
                span.extensions_mut()
                    .insert(Started(std::time::Instant::now()));
            }
        }
    }

    fn on_close(&self, id: tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        if let Some(span) = ctx.span(&id) {
            if let Some(Started(t)) = span.extensions().get::<Started>() {
                store_metrics().observe(span.name(), t.elapsed());
            }
        }
    }
}

/// The filter for [`StoreLayer`]: store-operation spans at any level, nothing else.
pub fn store_layer_filter() -> tracing_subscriber::filter::Targets {
    tracing_subscriber::filter::Targets::new().with_target(STORE_TARGET, tracing::Level::TRACE)
}
