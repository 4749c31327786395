//! Prometheus metrics in the text exposition format, served at `GET /metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// A gauge computed at scrape time: name, help text, and (label set, value) samples.
pub type Gauge<'a> = (&'a str, &'a str, Vec<(String, f64)>);

/// Counters kept by the gateway; gauges are computed at scrape time.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<String, BTreeMap<u16, u64>>>,
    cold_starts: Mutex<BTreeMap<(String, &'static str), u64>>,
    cold_start_ms: Mutex<BTreeMap<String, (f64, u64)>>,
    /// Per (backend, pool kind, phase): a histogram of the phase's duration in cold starts.
    phases: Mutex<BTreeMap<(String, String, &'static str), Histogram>>,
    /// Per (function, revision): a histogram of the time to the function's response headers.
    latency: Mutex<BTreeMap<String, BTreeMap<u64, Histogram>>>,
}

/// Upper bounds (seconds) of the phase histograms' buckets.
const BUCKETS: [f64; 13] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, secs: f64) {
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += secs;
        self.count += 1;
    }
}

impl Histogram {
    /// Write the histogram `name` with labels `l` (without braces).
    fn render(&self, out: &mut String, name: &str, l: &str) {
        for (b, c) in BUCKETS.iter().zip(self.counts.iter()) {
            let _ = writeln!(out, "{name}_bucket{{{l},le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{{l},le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{l}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{l}}} {}", self.count);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Escape a label value.
pub(crate) fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// Count one routed request by function and status.
    pub fn request(&self, function: &str, status: u16) {
        *entry(&mut lock(&self.requests), function, status) += 1;
    }

    /// Count one request an instance of `revision` answered, and its latency (from routing to
    /// the function's response headers; cold-start waits included).
    pub fn request_served(&self, function: &str, revision: u64, status: u16, took: Duration) {
        self.request(function, status);
        entry(&mut lock(&self.latency), function, revision).observe(took.as_secs_f64());
    }

    /// Count one cold start and its duration.
    pub fn cold_start(&self, function: &str, ok: bool, ms: f64) {
        let outcome = if ok { "ok" } else { "failed" };
        *lock(&self.cold_starts)
            .entry((function.to_string(), outcome))
            .or_default() += 1;
        if ok {
            let mut m = lock(&self.cold_start_ms);
            let e = m.entry(function.to_string()).or_default();
            e.0 += ms / 1000.0;
            e.1 += 1;
        }
    }

    /// Record the phases of one successful cold start (`veil_cold_start_phase_seconds`,
    /// labelled by backend, pool kind and phase).
    pub fn start_phases(&self, t: &veil_node::StartTimings) {
        let pool = if t.pool.is_empty() {
            "none"
        } else {
            t.pool.as_str()
        };
        let mut m = lock(&self.phases);
        for (phase, ms) in t.phases() {
            m.entry((t.backend.clone(), pool.to_string(), phase))
                .or_default()
                .observe(ms / 1000.0);
        }
    }

    /// Render everything with the given gauges.
    pub fn render(&self, gauges: &[Gauge<'_>]) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP veil_requests_total Invocations routed by the gateway."
        );
        let _ = writeln!(out, "# TYPE veil_requests_total counter");
        for (f, code, n) in flat(&lock(&self.requests)) {
            let _ = writeln!(
                out,
                "veil_requests_total{{function=\"{}\",code=\"{code}\"}} {n}",
                esc(f)
            );
        }
        let _ = writeln!(
            out,
            "# HELP veil_cold_starts_total Instance cold starts by outcome."
        );
        let _ = writeln!(out, "# TYPE veil_cold_starts_total counter");
        for ((f, o), n) in lock(&self.cold_starts).iter() {
            let _ = writeln!(
                out,
                "veil_cold_starts_total{{function=\"{}\",outcome=\"{o}\"}} {n}",
                esc(f)
            );
        }
        let _ = writeln!(
            out,
            "# HELP veil_cold_start_seconds Time from start request to ready instance."
        );
        let _ = writeln!(out, "# TYPE veil_cold_start_seconds summary");
        let _ = writeln!(
            out,
            "# HELP veil_cold_start_phase_seconds Phases of successful cold starts, by backend and pool kind (generic, tenant-attested, none)."
        );
        let _ = writeln!(out, "# TYPE veil_cold_start_phase_seconds histogram");
        for ((backend, pool, phase), h) in lock(&self.phases).iter() {
            let l = format!(
                "backend=\"{}\",pool=\"{}\",phase=\"{phase}\"",
                esc(backend),
                esc(pool)
            );
            h.render(&mut out, "veil_cold_start_phase_seconds", &l);
        }
        let _ = writeln!(
            out,
            "# HELP veil_request_duration_seconds Latency of requests answered by an instance (to the response headers, cold-start waits included), by function and revision."
        );
        let _ = writeln!(out, "# TYPE veil_request_duration_seconds histogram");
        for (f, rev, h) in flat(&lock(&self.latency)) {
            let l = format!("function=\"{}\",revision=\"{rev}\"", esc(f));
            h.render(&mut out, "veil_request_duration_seconds", &l);
        }
        for (f, (sum, count)) in lock(&self.cold_start_ms).iter() {
            let _ = writeln!(
                out,
                "veil_cold_start_seconds_sum{{function=\"{}\"}} {sum}",
                esc(f)
            );
            let _ = writeln!(
                out,
                "veil_cold_start_seconds_count{{function=\"{}\"}} {count}",
                esc(f)
            );
        }
        for (name, help, values) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} gauge");
            for (labels, v) in values {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        }
        out
    }
}

/// The node's capacity and what its sandboxes commit against it.
pub fn capacity_gauges(c: &veil_node::capacity::CapacityStatus) -> Vec<Gauge<'static>> {
    let one = |v: u64| vec![(String::new(), v as f64)];
    vec![
        (
            "veil_capacity_memory_bytes",
            "Memory the node may commit to sandboxes (their limits).",
            one(c.capacity.memory_bytes),
        ),
        (
            "veil_capacity_cpu_millis",
            "CPU the node may commit to sandboxes, in thousandths of a core.",
            one(c.capacity.cpu_millis),
        ),
        (
            "veil_capacity_sandboxes",
            "Sandboxes the node's capacity holds.",
            one(c.max_sandboxes),
        ),
        (
            "veil_committed_memory_bytes",
            "Memory limits of the sandboxes that exist or are booting.",
            one(c.used.memory_bytes),
        ),
        (
            "veil_committed_cpu_millis",
            "CPU limits of the sandboxes that exist or are booting.",
            one(c.used.cpu_millis),
        ),
        (
            "veil_committed_sandboxes",
            "Sandboxes counted against the capacity (pooled, assigned, booting).",
            one(c.sandboxes),
        ),
    ]
}

/// The tenants' pools: their size, what is ready, whether they are backing off, and what was
/// evicted from them.
pub fn tenant_pool_gauges(pools: &[veil_node::TenantPoolStatus]) -> Vec<Gauge<'static>> {
    let per = |f: &dyn Fn(&veil_node::TenantPoolStatus) -> f64| {
        pools
            .iter()
            .map(|p| (format!("{{tenant=\"{}\"}}", esc(&p.config.tenant)), f(p)))
            .collect::<Vec<_>>()
    };
    vec![
        (
            "veil_tenant_pool_size",
            "Sandboxes a tenant's pool keeps attested ahead of demand.",
            per(&|p| p.config.size as f64),
        ),
        (
            "veil_tenant_pool_ready",
            "Sandboxes of a tenant's pool attested and waiting.",
            per(&|p| p.ready as f64),
        ),
        (
            "veil_tenant_pool_preparing",
            "Sandboxes of a tenant's pool being attested.",
            per(&|p| p.preparing as f64),
        ),
        (
            "veil_tenant_pool_failing",
            "1 while a tenant's pool backs off after a failed preparation (the reason is in veil pool ls).",
            per(&|p| f64::from(u8::from(p.last_error.is_some()))),
        ),
        (
            "veil_tenant_pool_short_of_memory",
            "Sandboxes a tenant's pool lacks because the pools' memory budget is taken.",
            per(&|p| p.short_of_memory as f64),
        ),
        (
            "veil_tenant_pool_evicted",
            "Idle sandboxes of a tenant's pool destroyed to make room for other starts, since start.",
            per(&|p| p.evicted as f64),
        ),
    ]
}

/// `{function="<name>"}`.
pub fn fn_label(name: &str) -> String {
    format!("{{function=\"{}\"}}", esc(name))
}

/// The counter of `function`'s `key`, created if new (the function's name is copied only
/// then: this runs on every request).
fn entry<'m, K: Ord, V: Default>(
    m: &'m mut BTreeMap<String, BTreeMap<K, V>>,
    function: &str,
    key: K,
) -> &'m mut V {
    if !m.contains_key(function) {
        m.insert(function.to_string(), BTreeMap::new());
    }
    m.get_mut(function)
        .expect("inserted above")
        .entry(key)
        .or_default()
}

/// Every (function, key, value), in order.
fn flat<K: Copy, V>(
    m: &BTreeMap<String, BTreeMap<K, V>>,
) -> impl Iterator<Item = (&String, K, &V)> {
    m.iter()
        .flat_map(|(f, per)| per.iter().map(move |(k, v)| (f, *k, v)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_gauges() {
        let m = Metrics::default();
        m.request("a\"b", 200);
        m.request("a\"b", 200);
        m.cold_start("a\"b", true, 1500.0);
        m.start_phases(&veil_node::StartTimings {
            backend: "process".into(),
            pool: "tenant-attested".into(),
            total_ms: 20.0,
            ..Default::default()
        });
        m.cold_start("a\"b", false, 0.0);
        let t = m.render(&[("veil_sandboxes", "Sandboxes.", vec![(String::new(), 3.0)])]);
        assert!(
            t.contains("veil_requests_total{function=\"a\\\"b\",code=\"200\"} 2"),
            "{t}"
        );
        assert!(t.contains("veil_cold_starts_total{function=\"a\\\"b\",outcome=\"failed\"} 1"));
        assert!(t.contains("veil_cold_start_seconds_sum{function=\"a\\\"b\"} 1.5"));
        assert!(t.contains(
            "veil_cold_start_phase_seconds_bucket{backend=\"process\",pool=\"tenant-attested\",phase=\"total\",le=\"0.025\"} 1"
        ));
        assert!(t.contains(
            "veil_cold_start_phase_seconds_bucket{backend=\"process\",pool=\"tenant-attested\",phase=\"total\",le=\"0.01\"} 0"
        ));
        assert!(t.contains("veil_sandboxes 3"));
        m.request_served("f", 2, 200, Duration::from_millis(3));
        m.request_served("f", 2, 500, Duration::from_secs(20));
        let t = m.render(&[]);
        for want in [
            "veil_request_duration_seconds_bucket{function=\"f\",revision=\"2\",le=\"0.0025\"} 0",
            "veil_request_duration_seconds_bucket{function=\"f\",revision=\"2\",le=\"0.005\"} 1",
            "veil_request_duration_seconds_bucket{function=\"f\",revision=\"2\",le=\"10\"} 1",
            "veil_request_duration_seconds_bucket{function=\"f\",revision=\"2\",le=\"+Inf\"} 2",
            "veil_request_duration_seconds_count{function=\"f\",revision=\"2\"} 2",
            "veil_requests_total{function=\"f\",code=\"500\"} 1",
        ] {
            assert!(t.contains(want), "missing {want} in {t}");
        }
    }
}
