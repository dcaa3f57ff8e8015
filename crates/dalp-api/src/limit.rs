//! Rate limits kept in process (per login address+email, per API key), as a sliding window:
//! the previous minute's count, weighted by how much of it still overlaps the last 60
//! seconds, plus this minute's count. Unlike fixed windows, a burst straddling a minute
//! boundary cannot get twice the limit through.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Default)]
pub struct RateLimiter {
    /// key → (minute, count in that minute, count in the minute before).
    windows: Mutex<HashMap<String, (u64, u32, u32)>>,
}

impl RateLimiter {
    /// Counts one attempt for `key` (refused attempts count too, so hammering does not
    /// help); false when the last 60 seconds hold more than `per_minute`.
    pub fn allow(&self, key: &str, per_minute: u32) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.allow_at(key, per_minute, now)
    }

    fn allow_at(&self, key: &str, per_minute: u32, now_secs: f64) -> bool {
        let minute = (now_secs / 60.0) as u64;
        let elapsed = (now_secs / 60.0).fract();
        let mut w = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        if w.len() > 100_000 {
            w.retain(|_, (m, _, _)| *m + 1 >= minute);
        }
        let entry = w.entry(key.to_string()).or_insert((minute, 0, 0));
        if entry.0 != minute {
            let previous = if entry.0 + 1 == minute { entry.1 } else { 0 };
            *entry = (minute, 0, previous);
        }
        entry.1 += 1;
        let estimate = entry.2 as f64 * (1.0 - elapsed) + entry.1 as f64;
        estimate <= per_minute as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_across_a_minute_boundary_is_still_limited() {
        let l = RateLimiter::default();
        let t = 60.0 * 1000.0 - 0.5; // half a second before a minute ends
        for _ in 0..3 {
            assert!(l.allow_at("k", 3, t));
        }
        assert!(
            !l.allow_at("k", 3, t + 1.0),
            "the new minute forgot the burst"
        );
        // Two minutes later everything has expired.
        assert!(l.allow_at("k", 3, t + 121.0));
        assert!(l.allow_at("other", 3, t));
    }
}
