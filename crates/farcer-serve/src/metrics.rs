//! Prometheus text exposition, written by hand: a few counters, gauges and one latency
//! histogram need no metrics crate.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Upper bounds (seconds) of the latency histogram's buckets.
const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Default)]
pub struct Metrics {
    /// Requests by (route, status).
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    /// Latency by route.
    latency: Mutex<BTreeMap<String, Histogram>>,
    /// Requests waiting for or holding the model.
    pub queue_depth: AtomicUsize,
    pub sessions_open: AtomicUsize,
    pub sessions_evicted: AtomicUsize,
    pub sessions_expired: AtomicUsize,
    pub kv_cache_bytes: AtomicUsize,
    pub cache_rebuilds: AtomicUsize,
    /// Model passes over waiting session utterances, and the utterances they answered.
    pub batches: AtomicUsize,
    pub batched_utterances: AtomicUsize,
}

impl Metrics {
    pub fn record(&self, route: &str, status: u16, seconds: f64) {
        *self
            .requests
            .lock()
            .expect("metrics")
            .entry((route.to_string(), status))
            .or_default() += 1;
        let mut l = self.latency.lock().expect("metrics");
        let h = l.entry(route.to_string()).or_default();
        for (i, b) in BUCKETS.iter().enumerate() {
            if seconds <= *b {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += seconds;
    }

    /// Requests answered with `status` on `route` so far.
    pub fn count(&self, route: &str, status: u16) -> u64 {
        self.requests
            .lock()
            .expect("metrics")
            .get(&(route.to_string(), status))
            .copied()
            .unwrap_or(0)
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        s.push_str("# HELP farcer_requests_total HTTP requests by route and status.\n");
        s.push_str("# TYPE farcer_requests_total counter\n");
        for ((route, status), n) in self.requests.lock().expect("metrics").iter() {
            let _ = writeln!(
                s,
                "farcer_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        s.push_str("# HELP farcer_request_seconds Request latency by route.\n");
        s.push_str("# TYPE farcer_request_seconds histogram\n");
        for (route, h) in self.latency.lock().expect("metrics").iter() {
            for (b, c) in BUCKETS.iter().zip(h.counts) {
                let _ = writeln!(
                    s,
                    "farcer_request_seconds_bucket{{route=\"{route}\",le=\"{b}\"}} {c}"
                );
            }
            let _ = writeln!(
                s,
                "farcer_request_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                s,
                "farcer_request_seconds_sum{{route=\"{route}\"}} {}",
                h.sum
            );
            let _ = writeln!(
                s,
                "farcer_request_seconds_count{{route=\"{route}\"}} {}",
                h.count
            );
        }
        let gauges = [
            (
                "farcer_queue_depth",
                "gauge",
                "Requests waiting for or holding the model.",
                &self.queue_depth,
            ),
            (
                "farcer_sessions_open",
                "gauge",
                "Live sessions.",
                &self.sessions_open,
            ),
            (
                "farcer_kv_cache_bytes",
                "gauge",
                "Bytes of KV cache the live sessions hold.",
                &self.kv_cache_bytes,
            ),
            (
                "farcer_sessions_evicted_total",
                "counter",
                "Sessions evicted to stay within the bounds.",
                &self.sessions_evicted,
            ),
            (
                "farcer_sessions_expired_total",
                "counter",
                "Sessions ended for being idle.",
                &self.sessions_expired,
            ),
            (
                "farcer_session_cache_rebuilds_total",
                "counter",
                "KV cache rebuilds after dropping a session's oldest utterances.",
                &self.cache_rebuilds,
            ),
            (
                "farcer_session_batches_total",
                "counter",
                "Model passes answering waiting session utterances together.",
                &self.batches,
            ),
            (
                "farcer_session_batched_utterances_total",
                "counter",
                "Session utterances answered by those passes (over batches: the mean batch).",
                &self.batched_utterances,
            ),
        ];
        for (name, kind, help, v) in gauges {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
            let _ = writeln!(s, "{name} {}", v.load(Ordering::Relaxed));
        }
        if let Some(rss) = resident_bytes() {
            let name = "process_resident_memory_bytes";
            let _ = writeln!(s, "# HELP {name} Resident memory size in bytes.");
            let _ = writeln!(s, "# TYPE {name} gauge\n{name} {rss}");
        }
        s
    }
}

/// This process's resident memory (`VmRSS` in `/proc/self/status`, whatever the page
/// size); `None` off Linux.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let m = Metrics::default();
        m.record("/v1/predict", 200, 0.03);
        m.record("/v1/predict", 200, 2.0);
        m.record("/v1/predict", 400, 0.001);
        let t = m.render();
        assert!(t.contains("farcer_requests_total{route=\"/v1/predict\",status=\"200\"} 2"));
        assert!(t.contains("farcer_requests_total{route=\"/v1/predict\",status=\"400\"} 1"));
        assert!(t.contains("farcer_request_seconds_bucket{route=\"/v1/predict\",le=\"0.05\"} 2"));
        assert!(t.contains("farcer_request_seconds_bucket{route=\"/v1/predict\",le=\"+Inf\"} 3"));
        assert!(t.contains("farcer_request_seconds_count{route=\"/v1/predict\"} 3"));
        assert_eq!(m.count("/v1/predict", 200), 2);
        if cfg!(target_os = "linux") {
            let rss = t
                .lines()
                .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
                .expect("RSS gauge on Linux");
            assert!(rss.parse::<u64>().unwrap() > 1 << 20, "{rss}");
        }
    }
}
