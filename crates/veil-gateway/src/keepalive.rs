//! Keep-alive policies: how long an idle function keeps an instance, and when to pre-warm one.
//!
//! Besides the fixed idle timeout, the *hybrid histogram* policy of "Serverless in the Wild"
//! (Shahrad et al., USENIX ATC'20): per function, a range-limited histogram of idle times (the
//! time from the end of one invocation to the start of the next, in bins of one minute over
//! four hours). When the histogram is representative, its head (5th percentile, less a 10%
//! margin) is the **pre-warm window** — the instance is unloaded when the function goes idle and
//! loaded again that long after — and its tail (99th percentile, plus 10%) ends the
//! **keep-alive window**. With too little data, a histogram too flat to say anything (the
//! coefficient of variation of its bin counts at most 2), or most idle times beyond its range,
//! it falls back to the fixed window (the paper forecasts out-of-range idle times with ARIMA
//! instead; veil does not, and says so in the decision).
//!
//! Pure code: the gateway's autoscaler applies it, and `veil simulate keep-alive` replays a
//! trace in the Azure Functions 2019 format against it.

use std::time::Duration;

/// A deployment's keep-alive policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeepAlive {
    /// Keep an idle instance for the deployment's idle timeout.
    #[default]
    Fixed,
    /// The hybrid histogram policy, with the idle timeout as its fallback.
    Hybrid,
}

/// Parameters of the hybrid policy (the paper's defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct HybridConfig {
    /// Width of a histogram bin.
    pub bin: Duration,
    /// Number of bins (the range is `bin * bins`).
    pub bins: usize,
    /// Fewer idle times than this: fall back.
    pub min_samples: u32,
    /// A histogram whose bin counts have a coefficient of variation at most this is too flat
    /// to predict from: fall back.
    pub min_cv: f64,
    /// More than this fraction of idle times beyond the range: fall back.
    pub max_out_of_range: f64,
    /// Percentile of the head (pre-warm window).
    pub head_percentile: f64,
    /// Percentile of the tail (end of the keep-alive window).
    pub tail_percentile: f64,
    /// Safety margin: the pre-warm window shrinks, the keep-alive window grows, by this fraction.
    pub margin: f64,
}

impl Default for HybridConfig {
    fn default() -> Self {
        Self::with_bin(Duration::from_secs(60))
    }
}

impl HybridConfig {
    /// The paper's parameters with another bin width (tests use short bins).
    pub fn with_bin(bin: Duration) -> Self {
        Self {
            bin,
            bins: 240,
            min_samples: 10,
            min_cv: 2.0,
            max_out_of_range: 0.5,
            head_percentile: 5.0,
            tail_percentile: 99.0,
            margin: 0.10,
        }
    }
}

/// What to do while a function is idle.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Unload the instance when the function goes idle and load one again this long after;
    /// zero keeps the instance loaded from the start.
    pub prewarm: Duration,
    /// Keep the (re)loaded instance this long, counted from the end of the pre-warm window.
    pub keep_alive: Duration,
    /// Why: `histogram` or the reason for the fallback.
    pub source: String,
}

impl Decision {
    /// Idle for `idle`: whether an instance should be loaded now.
    pub fn wants_instance(&self, idle: Duration) -> bool {
        idle >= self.prewarm && idle < self.prewarm + self.keep_alive
    }
}

/// A function's idle-time histogram.
#[derive(Debug, Clone, Default)]
pub struct IdleHistogram {
    counts: Vec<u32>,
    out_of_range: u32,
    total: u32,
}

impl IdleHistogram {
    /// Record one idle time.
    pub fn record(&mut self, idle: Duration, cfg: &HybridConfig) {
        if self.counts.len() != cfg.bins {
            self.counts = vec![0; cfg.bins];
        }
        let bin = (idle.as_secs_f64() / cfg.bin.as_secs_f64().max(1e-9)) as usize;
        match self.counts.get_mut(bin) {
            Some(c) => *c = c.saturating_add(1),
            None => self.out_of_range = self.out_of_range.saturating_add(1),
        }
        self.total = self.total.saturating_add(1);
    }

    /// Idle times recorded.
    pub fn samples(&self) -> u32 {
        self.total
    }

    /// The policy's decision; `fallback` is the fixed keep-alive window.
    pub fn decide(&self, cfg: &HybridConfig, fallback: Duration) -> Decision {
        let fixed = |why: String| Decision {
            prewarm: Duration::ZERO,
            keep_alive: fallback,
            source: format!("fixed window ({why})"),
        };
        if self.total < cfg.min_samples {
            return fixed(format!(
                "{} idle times, fewer than {}",
                self.total, cfg.min_samples
            ));
        }
        let oob = f64::from(self.out_of_range) / f64::from(self.total);
        if oob > cfg.max_out_of_range {
            return fixed(format!(
                "{:.0}% of idle times beyond the histogram's range",
                oob * 100.0
            ));
        }
        let in_range: u32 = self.counts.iter().sum();
        let n = self.counts.len().max(1) as f64;
        let mean = f64::from(in_range) / n;
        let var = self
            .counts
            .iter()
            .map(|c| (f64::from(*c) - mean).powi(2))
            .sum::<f64>()
            / n;
        let cv = if mean > 0.0 { var.sqrt() / mean } else { 0.0 };
        if cv <= cfg.min_cv {
            return fixed(format!("histogram too flat (CV {cv:.2})"));
        }
        let percentile_bin = |p: f64| {
            let want = (f64::from(in_range) * p / 100.0).ceil().max(1.0) as u64;
            let mut seen = 0u64;
            for (i, c) in self.counts.iter().enumerate() {
                seen += u64::from(*c);
                if seen >= want {
                    return i;
                }
            }
            self.counts.len().saturating_sub(1)
        };
        let head = percentile_bin(cfg.head_percentile);
        let tail = percentile_bin(cfg.tail_percentile);
        let prewarm = cfg.bin.mul_f64(head as f64 * (1.0 - cfg.margin));
        let end = cfg.bin.mul_f64((tail + 1) as f64 * (1.0 + cfg.margin));
        Decision {
            prewarm,
            keep_alive: end.saturating_sub(prewarm).max(cfg.bin),
            source: format!("histogram of {} idle times", self.total),
        }
    }
}

/// One function's invocations per minute, as in the Azure Functions 2019 trace
/// (`HashOwner,HashApp,HashFunction,Trigger,1,…,1440`).
#[derive(Debug, Clone)]
pub struct TraceFunction {
    /// `HashFunction` (with owner and app, for messages).
    pub name: String,
    /// Invocations in each minute.
    pub per_minute: Vec<u32>,
}

/// Parse a trace in the Azure Functions 2019 per-minute format: a header line, then one line
/// per function with four identifying columns and one count per minute.
pub fn parse_trace(text: &str) -> Result<Vec<TraceFunction>, String> {
    let mut lines = text.lines().enumerate();
    let (_, header) = lines.next().ok_or("the trace is empty")?;
    let cols: Vec<&str> = header.split(',').collect();
    if cols.len() < 5 || cols[..4] != ["HashOwner", "HashApp", "HashFunction", "Trigger"] {
        return Err(
            "not an Azure Functions invocation trace: the header must start with \
             HashOwner,HashApp,HashFunction,Trigger followed by the minutes"
                .into(),
        );
    }
    let minutes = cols.len() - 4;
    let mut out = Vec::new();
    for (i, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split(',').collect();
        if f.len() != cols.len() {
            return Err(format!(
                "line {}: {} columns, the header has {}",
                i + 1,
                f.len(),
                cols.len()
            ));
        }
        let per_minute = f[4..]
            .iter()
            .map(|v| {
                v.trim()
                    .parse::<u32>()
                    .map_err(|_| format!("line {}: {v:?} is not an invocation count", i + 1))
            })
            .collect::<Result<Vec<u32>, String>>()?;
        debug_assert_eq!(per_minute.len(), minutes);
        out.push(TraceFunction {
            name: format!("{}/{}/{}", f[0], f[1], f[2]),
            per_minute,
        });
    }
    if out.is_empty() {
        return Err("the trace has no functions".into());
    }
    Ok(out)
}

/// A keep-alive policy to simulate.
#[derive(Debug, Clone)]
pub enum Policy {
    /// Keep an instance this long after each invocation.
    Fixed(Duration),
    /// The hybrid histogram policy, with the fixed window as its fallback.
    Hybrid(HybridConfig, Duration),
}

/// What a policy cost on a trace.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SimResult {
    /// Invocations.
    pub invocations: u64,
    /// Invocations that found no loaded instance.
    pub cold_starts: u64,
    /// Minutes an instance was loaded while no invocation ran (memory-time wasted, in
    /// instance-minutes).
    pub idle_minutes: u64,
    /// Per function: its cold-start percentage.
    pub per_function_cold_pct: Vec<f64>,
}

impl SimResult {
    /// Cold starts over invocations.
    pub fn cold_fraction(&self) -> f64 {
        if self.invocations == 0 {
            0.0
        } else {
            self.cold_starts as f64 / self.invocations as f64
        }
    }

    /// The `p`-th percentile of the per-function cold-start percentages.
    pub fn function_percentile(&self, p: f64) -> f64 {
        let mut v = self.per_function_cold_pct.clone();
        if v.is_empty() {
            return 0.0;
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
        v[i.min(v.len() - 1)]
    }
}

/// Replay `trace` minute by minute with one instance per function, as the paper does: an
/// active minute is a cold start if no instance is loaded in it (its other invocations are
/// warm); a loaded minute without invocations is idle memory-time.
pub fn simulate(trace: &[TraceFunction], policy: &Policy) -> SimResult {
    let mut r = SimResult::default();
    for f in trace {
        let (mut inv, mut cold) = (0u64, 0u64);
        let mut hist = IdleHistogram::default();
        // The last active minute and the decision made at its end.
        let mut last: Option<(usize, Decision)> = None;
        for (t, &c) in f.per_minute.iter().enumerate() {
            let loaded = last.as_ref().is_some_and(|(l, d)| {
                let idle = Duration::from_secs(60 * (t - l - 1) as u64);
                d.wants_instance(idle)
            });
            if c == 0 {
                if loaded {
                    r.idle_minutes += 1;
                }
                continue;
            }
            inv += u64::from(c);
            if !loaded {
                cold += 1;
            }
            let decision = match policy {
                Policy::Fixed(w) => Decision {
                    prewarm: Duration::ZERO,
                    keep_alive: *w,
                    source: "fixed".into(),
                },
                Policy::Hybrid(cfg, fallback) => {
                    if let Some((l, _)) = &last {
                        hist.record(Duration::from_secs(60 * (t - l - 1) as u64), cfg);
                    }
                    hist.decide(cfg, *fallback)
                }
            };
            last = Some((t, decision));
        }
        r.invocations += inv;
        r.cold_starts += cold;
        if inv > 0 {
            r.per_function_cold_pct
                .push(100.0 * cold as f64 / inv as f64);
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mins(m: u64) -> Duration {
        Duration::from_secs(60 * m)
    }

    #[test]
    fn too_little_or_too_flat_data_falls_back() {
        let cfg = HybridConfig::default();
        let mut h = IdleHistogram::default();
        for _ in 0..5 {
            h.record(mins(30), &cfg);
        }
        let d = h.decide(&cfg, mins(10));
        assert_eq!((d.prewarm, d.keep_alive), (Duration::ZERO, mins(10)));
        assert!(d.source.contains("fewer than 10"), "{}", d.source);
        // Spread evenly over the whole range: no pattern.
        let mut h = IdleHistogram::default();
        for i in 0..240 {
            h.record(mins(i), &cfg);
        }
        assert!(h.decide(&cfg, mins(10)).source.contains("too flat"));
        // Mostly beyond four hours.
        let mut h = IdleHistogram::default();
        for _ in 0..20 {
            h.record(mins(600), &cfg);
        }
        assert!(h.decide(&cfg, mins(10)).source.contains("beyond"));
    }

    #[test]
    fn a_regular_pattern_prewarms_just_before_it() {
        let cfg = HybridConfig::default();
        let mut h = IdleHistogram::default();
        for i in 0..40 {
            // Idle 30 minutes, now and then 31.
            h.record(mins(if i % 8 == 0 { 31 } else { 30 }), &cfg);
        }
        let d = h.decide(&cfg, mins(10));
        assert_eq!(d.source, "histogram of 40 idle times");
        assert_eq!(d.prewarm, mins(27)); // 30 less 10%
        assert!(d.wants_instance(mins(30)) && d.wants_instance(mins(31)));
        assert!(!d.wants_instance(mins(5)) && !d.wants_instance(mins(40)));
    }

    #[test]
    fn trace_format() {
        let ok = "HashOwner,HashApp,HashFunction,Trigger,1,2,3\no,a,f,http,0,2,1\n";
        let t = parse_trace(ok).unwrap();
        assert_eq!(t[0].per_minute, vec![0, 2, 1]);
        for bad in [
            "",
            "a,b,c\n",
            "HashOwner,HashApp,HashFunction,Trigger,1,2\no,a,f,http,1\n",
            "HashOwner,HashApp,HashFunction,Trigger,1\no,a,f,http,x\n",
            "HashOwner,HashApp,HashFunction,Trigger,1\n",
        ] {
            assert!(parse_trace(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn simulation_counts_cold_starts_and_idle_minutes() {
        // Active at minutes 0, 30, 60, 90 (one invocation each).
        let mut per_minute = vec![0; 120];
        for t in [0, 30, 60, 90] {
            per_minute[t] = 1;
        }
        let f = vec![TraceFunction {
            name: "f".into(),
            per_minute,
        }];
        // A 10-minute keep-alive: every invocation is cold; 10 idle minutes after each.
        let r = simulate(&f, &Policy::Fixed(mins(10)));
        assert_eq!((r.invocations, r.cold_starts), (4, 4));
        assert_eq!(r.idle_minutes, 10 + 10 + 10 + 10);
        // A 30-minute keep-alive: only the first is cold, at 29 idle minutes each time.
        let r = simulate(&f, &Policy::Fixed(mins(30)));
        assert_eq!((r.cold_starts, r.idle_minutes), (1, 29 * 3 + 29));
    }
}
