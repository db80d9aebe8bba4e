//! Prometheus metrics in the text exposition format (version 0.0.4): the
//! counters and histograms the coordinator and the worker keep, and the page
//! they serve at `/metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// A monotonically increasing count.
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Durations in seconds, counted into cumulative buckets.
pub struct Histogram {
    bounds: &'static [f64],
    /// One count per bound, then the +Inf bucket; not cumulative until rendered.
    counts: Vec<AtomicU64>,
    /// The sum of observations, in nanoseconds.
    sum_nanos: AtomicU64,
}

/// Bucket bounds for request latencies, in seconds.
pub const LATENCY_BOUNDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, seconds: f64) {
        let i = self
            .bounds
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos
            .fetch_add((seconds.max(0.0) * 1e9) as u64, Ordering::Relaxed);
    }
}

/// A metrics page being written: families, each with its help and type, then samples.
#[derive(Default)]
pub struct Page(String);

impl Page {
    pub fn new() -> Page {
        Page::default()
    }

    /// Starts a family: `kind` is counter, gauge or histogram.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) -> &mut Page {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
        self
    }

    /// One sample; `labels` as (name, value) pairs.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Page {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let escaped = v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
                let _ = write!(self.0, "{k}=\"{escaped}\"");
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
        self
    }

    pub fn counter(&mut self, name: &str, help: &str, counter: &Counter) -> &mut Page {
        self.family(name, "counter", help)
            .sample(name, &[], counter.get() as f64)
    }

    pub fn gauge(&mut self, name: &str, help: &str, value: f64) -> &mut Page {
        self.family(name, "gauge", help).sample(name, &[], value)
    }

    pub fn histogram(&mut self, name: &str, help: &str, h: &Histogram) -> &mut Page {
        self.family(name, "histogram", help);
        let mut cumulative = 0;
        for (i, count) in h.counts.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            let le = h.bounds.get(i).map_or("+Inf".to_string(), |b| b.to_string());
            self.sample(&format!("{name}_bucket"), &[("le", &le)], cumulative as f64);
        }
        self.sample(
            &format!("{name}_sum"),
            &[],
            h.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        );
        self.sample(&format!("{name}_count"), &[], cumulative as f64)
    }

    pub fn text(self) -> String {
        self.0
    }
}

/// The content type of a page.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_holds_counters_gauges_and_cumulative_histograms() {
        let c = Counter::default();
        c.add(3);
        let h = Histogram::new(&[0.1, 1.0]);
        h.observe(0.05);
        h.observe(0.5);
        h.observe(7.0);
        let mut page = Page::new();
        page.counter("x_total", "xs", &c)
            .family("t", "gauge", "by state")
            .sample("t", &[("state", "a\"b")], 2.0)
            .histogram("d_seconds", "durations", &h);
        let text = page.text();
        assert!(text.contains("# TYPE x_total counter\nx_total 3\n"), "{text}");
        assert!(text.contains("t{state=\"a\\\"b\"} 2\n"), "{text}");
        assert!(text.contains("d_seconds_bucket{le=\"0.1\"} 1\n"), "{text}");
        assert!(text.contains("d_seconds_bucket{le=\"1\"} 2\n"), "{text}");
        assert!(text.contains("d_seconds_bucket{le=\"+Inf\"} 3\n"), "{text}");
        assert!(text.contains("d_seconds_count 3\n"), "{text}");
        assert!(text.contains("d_seconds_sum 7.55"), "{text}");
    }
}
