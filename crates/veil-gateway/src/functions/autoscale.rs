//! Scaling: starting instances (in room claimed from the node), and the autoscaler.
//!
//! The autoscaler works on observed concurrency, in the manner of Knative's: every tick it
//! samples each live revision's concurrency (requests in flight on its instances plus those
//! waiting for one) and averages it over a *stable* window (60 s) and a *panic* window (6 s).
//! The instances wanted are the average over the function's target concurrency per instance,
//! rounded up. When the panic window's average wants at least twice (the panic threshold) the
//! instances that are ready, the revision *panics*: it scales on the panic window and never
//! scales down until a whole stable window has passed without that condition. Scaling is bounded
//! by `min_scale`, `max_scale` and the node's capacity; scale-down goes through the drain, at
//! most halving the instances per tick, and never below one instance while the function is
//! in use: scale to zero is the keep-alive policy's (after `scale_to_zero_after`, or the hybrid
//! histogram's decision). The request path starts instances too, one per `target` requests
//! waiting, so a burst from zero starts what it needs at once instead of waiting for a tick.

use super::{lock, Runtime, Slot};
use crate::Gateway;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use veil_node::{Claim, InstanceSpec};

/// Start one instance of `rt`'s revision in the room `claim` holds, in the background; the
/// runtime counts it as starting until it is ready or failed.
pub(super) fn start_instance(gw: &Arc<Gateway>, rt: &mut Runtime, claim: Claim) {
    rt.starting += 1;
    let rec = rt.record.clone();
    let runtime = rt.id;
    let gw = gw.clone();
    let cancel = rt.cancel.clone();
    tokio::spawn(async move {
        let spec = InstanceSpec {
            tenant: rec.tenant.clone(),
            function: rec.name.clone(),
            image: rec.image.clone(),
            env: rec.env.clone(),
            port: rec.port,
            concurrency: rec.concurrency,
            ready_timeout: Duration::from_secs(rec.ready_timeout_s),
            attestation: (!rec.secrets.is_empty()
                || !rec.image_keys.is_empty()
                || rec.signature_policy.is_some())
            .then(|| veil_proto::AttestationPlan {
                secrets: rec.secrets.clone(),
                allow_software_tee: rec.allow_insecure_software_tee,
                image_keys: rec.image_keys.clone(),
                signature_policy: rec.signature_policy.clone(),
                software_tee: None,
            }),
            kbs_url: rec.kbs_url.clone(),
        };
        let t = Instant::now();
        let res = gw.node.start_instance(&spec, claim, &cancel).await;
        gw.metrics
            .cold_start(&rec.name, res.is_ok(), t.elapsed().as_secs_f64() * 1000.0);
        if let Ok(inst) = &res {
            gw.metrics.start_phases(&inst.timings);
        }
        let mut stale = None;
        {
            let mut map = lock(&gw.functions.map);
            let rt = map
                .get_mut(&rec.name)
                .and_then(|f| f.live.get_mut(&rec.revision));
            match rt {
                Some(rt) if rt.id == runtime => {
                    rt.starting = rt.starting.saturating_sub(1);
                    match res {
                        Ok(inst) => {
                            rt.recent_starts.push_back(inst.timings.clone());
                            while rt.recent_starts.len() > super::RECENT_STARTS {
                                rt.recent_starts.pop_front();
                            }
                            rt.instances.push(Arc::new(Slot {
                                inst,
                                inflight: AtomicU32::new(0),
                                last_used: Mutex::new(Instant::now()),
                                ready_at: Instant::now(),
                                first_served: AtomicBool::new(false),
                            }))
                        }
                        Err(e) => {
                            rt.failures += 1;
                            rt.last_error = Some(e.to_string());
                            rt.last_failure = Some(Instant::now());
                        }
                    }
                    rt.bump();
                }
                // Deleted, or the revision lost its traffic meanwhile: the instance belongs to
                // nobody.
                _ => stale = res.ok(),
            }
        }
        if let Some(inst) = stale {
            inst.destroy().await;
        }
    });
}

/// The autoscaler's windows and thresholds (Knative's defaults).
#[derive(Debug, Clone)]
pub struct AutoscaleConfig {
    /// The window concurrency is averaged over to decide the instances wanted.
    pub stable_window: Duration,
    /// The short window that detects bursts.
    pub panic_window: Duration,
    /// Panic when the panic window wants this many times the ready instances.
    pub panic_threshold: f64,
    /// At most this factor fewer instances per tick (2: at most halve).
    pub max_scale_down_rate: f64,
}

impl Default for AutoscaleConfig {
    fn default() -> Self {
        Self {
            stable_window: Duration::from_secs(60),
            panic_window: Duration::from_secs(6),
            panic_threshold: 2.0,
            max_scale_down_rate: 2.0,
        }
    }
}

/// What the autoscaler decided for one revision, as status reports it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AutoscalerStatus {
    /// Instances wanted (within min_scale and max_scale).
    pub desired: usize,
    /// Whether it is in panic mode.
    pub panic: bool,
    /// Average concurrency over the stable window.
    pub stable_concurrency: f64,
    /// Average concurrency over the panic window.
    pub panic_concurrency: f64,
    /// The target concurrency per instance it divides by.
    pub target: f64,
}

/// One revision's concurrency samples over the stable window, and its panic state.
#[derive(Debug, Default)]
pub(super) struct Observed {
    samples: VecDeque<(Instant, f64)>,
    /// When the panic condition last held, while panicking.
    panic_since: Option<Instant>,
    /// The most instances wanted during this panic (panic never scales down).
    panic_max: usize,
    pub(super) last: Option<AutoscalerStatus>,
}

impl Observed {
    /// Add a sample taken at `now`; samples older than the stable window go.
    pub(super) fn record(&mut self, now: Instant, concurrency: f64, cfg: &AutoscaleConfig) {
        self.samples.push_back((now, concurrency));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > cfg.stable_window)
        {
            self.samples.pop_front();
        }
    }

    fn average(&self, now: Instant, window: Duration) -> f64 {
        let (sum, n) = self
            .samples
            .iter()
            .rev()
            .take_while(|(t, _)| now.saturating_duration_since(*t) <= window)
            .fold((0.0, 0u32), |(s, n), (_, c)| (s + c, n + 1));
        if n == 0 {
            0.0
        } else {
            sum / f64::from(n)
        }
    }

    /// Decide the instances wanted at `now`, with `ready` instances up, aiming at `target`
    /// concurrent requests per instance, within `min..=max`.
    pub(super) fn decide(
        &mut self,
        now: Instant,
        cfg: &AutoscaleConfig,
        target: f64,
        ready: usize,
        min: usize,
        max: usize,
    ) -> AutoscalerStatus {
        let target = if target.is_finite() && target > 0.0 {
            target
        } else {
            1.0
        };
        let stable = self.average(now, cfg.stable_window);
        let panic_c = self.average(now, cfg.panic_window);
        let want = |c: f64| (c / target).ceil() as usize;
        let (stable_want, panic_want) = (want(stable), want(panic_c));
        if panic_want as f64 / ready.max(1) as f64 >= cfg.panic_threshold && panic_want > ready {
            if self.panic_since.is_none() {
                tracing::info!(panic_want, ready, "autoscaler: entering panic mode");
                self.panic_max = 0;
            }
            self.panic_since = Some(now);
        } else if self
            .panic_since
            .is_some_and(|t| now.saturating_duration_since(t) >= cfg.stable_window)
        {
            tracing::info!(stable_want, "autoscaler: leaving panic mode");
            self.panic_since = None;
        }
        let desired = if self.panic_since.is_some() {
            self.panic_max = self.panic_max.max(panic_want).max(ready);
            self.panic_max
        } else {
            stable_want
        };
        let status = AutoscalerStatus {
            desired: desired.clamp(min, max.max(min)),
            panic: self.panic_since.is_some(),
            stable_concurrency: stable,
            panic_concurrency: panic_c,
            target,
        };
        self.last = Some(status.clone());
        status
    }
}

/// How many of `len` instances may go this tick when `keep` are wanted.
fn scale_down_room(len: usize, keep: usize, rate: f64) -> usize {
    let floor = (len as f64 / rate.max(1.0)).ceil() as usize;
    len.saturating_sub(keep.max(floor))
}

/// What the autoscaler aims for, for one function, this tick.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Target {
    /// Instances kept however idle.
    pub keep: usize,
    /// An instance beyond `keep` idle this long is scaled down.
    pub idle_after: Duration,
    /// Instances to have up (started if missing): `min_scale`, or one to pre-warm.
    pub up: usize,
}

/// The target for a function with `min_scale`, the fixed window `fixed`, its keep-alive policy's
/// decision (for `hybrid`) and how long it has been idle (`None`: busy, or never invoked).
pub(super) fn target(
    min_scale: usize,
    fixed: Duration,
    decision: Option<&crate::keepalive::Decision>,
    idle: Option<Duration>,
) -> Target {
    let Some(d) = decision else {
        return Target {
            keep: min_scale,
            idle_after: fixed,
            up: min_scale,
        };
    };
    match idle {
        // Busy (or never used): extra instances go after the policy's whole window.
        None => Target {
            keep: min_scale,
            idle_after: d.prewarm + d.keep_alive,
            up: min_scale,
        },
        // In the keep-alive window: one instance loaded (pre-warmed if it was unloaded).
        Some(i) if d.wants_instance(i) => Target {
            keep: min_scale.max(1),
            idle_after: d.keep_alive,
            up: min_scale.max(1),
        },
        // Before the pre-warm window, or after the keep-alive window: unload now.
        Some(_) => Target {
            keep: min_scale,
            idle_after: Duration::ZERO,
            up: min_scale,
        },
    }
}

/// Every second (or a quarter of the keep-alive histogram's bin, or a twelfth of the panic
/// window, if shorter): remove ended instances, sample concurrency and scale functions in use
/// to what the windows want, scale idle functions down (to zero unless `min_scale` says
/// otherwise, when the keep-alive policy says so), keep `min_scale` instances up, and pre-warm
/// the functions whose hybrid keep-alive policy expects them to be invoked soon.
pub fn spawn_autoscaler(gw: Weak<Gateway>) {
    tokio::spawn(async move {
        let period = gw.upgrade().map_or(Duration::from_secs(1), |g| {
            (g.functions.keep_alive.bin / 4)
                .min(g.config.autoscale.panic_window / 12)
                .clamp(Duration::from_millis(10), Duration::from_secs(1))
        });
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            let Some(gw) = gw.upgrade() else { return };
            {
                let mut map = lock(&gw.functions.map);
                for rt in map.values_mut().flat_map(|f| f.live.values_mut()) {
                    let mut doomed = Vec::new();
                    rt.instances.retain(|s| s.inst.is_alive());
                    let fixed = Duration::from_secs(rt.record.idle_timeout_s);
                    let decision = (rt.record.keep_alive == crate::keepalive::KeepAlive::Hybrid)
                        .then(|| rt.activity.decide(&gw.functions.keep_alive, fixed));
                    let want = target(
                        rt.record.min_scale as usize,
                        fixed,
                        decision.as_ref(),
                        rt.activity.idle_for(),
                    );
                    let now = Instant::now();
                    let concurrency = rt
                        .instances
                        .iter()
                        .map(|s| f64::from(s.inflight.load(Ordering::SeqCst)))
                        .sum::<f64>()
                        + rt.waiting.load(Ordering::SeqCst) as f64;
                    let cfg = &gw.config.autoscale;
                    rt.observed.record(now, concurrency, cfg);
                    let auto = rt.observed.decide(
                        now,
                        cfg,
                        rt.record.target_concurrency(),
                        rt.instances.len(),
                        rt.record.min_scale as usize,
                        rt.record.max_scale as usize,
                    );
                    // The windows speak for a function in use; an idle one is the keep-alive
                    // policy's alone (its scale to zero, its pre-warming).
                    let in_use = concurrency > 0.0;
                    let idle = want.idle_after;
                    while rt.instances.len() > want.keep {
                        let pos = rt.instances.iter().position(|s| {
                            s.inflight.load(Ordering::SeqCst) == 0
                                && lock(&s.last_used).elapsed() >= idle
                        });
                        match pos {
                            Some(p) => doomed.push(rt.instances.remove(p)),
                            None => break,
                        }
                    }
                    let idle_count = doomed.len();
                    // Over-provisioned while in use: instances beyond what the autoscaler wants
                    // go (at most halving per tick), if they carry nothing now and have been up
                    // for a panic window (a fresh one is not taken back at once).
                    if in_use && !auto.panic {
                        let keep = auto.desired.max(want.keep).max(1);
                        let mut room =
                            scale_down_room(rt.instances.len(), keep, cfg.max_scale_down_rate);
                        while room > 0 {
                            let pos = rt.instances.iter().position(|s| {
                                s.inflight.load(Ordering::SeqCst) == 0
                                    && s.ready_at.elapsed() >= cfg.panic_window
                            });
                            let Some(p) = pos else { break };
                            doomed.push(rt.instances.remove(p));
                            room -= 1;
                        }
                    }
                    if doomed.len() > idle_count {
                        tracing::info!(function = %rt.record.name, revision = rt.record.revision, count = doomed.len() - idle_count, desired = auto.desired, stable_concurrency = auto.stable_concurrency, "autoscaler: scaling down");
                    }
                    if !doomed.is_empty() {
                        tracing::info!(function = %rt.record.name, revision = rt.record.revision, count = doomed.len(), after_ms = idle.as_millis() as u64, "scaling down idle instances");
                        // Idle and out of the runtime: they drain at once.
                        drop(gw.functions.drains.start(
                            &rt.record.name,
                            rt.record.revision,
                            doomed,
                            &rt.changes,
                            "idle",
                        ));
                    }
                    // A function that fails to start is retried for min_scale at most every
                    // 10 s, not every tick.
                    let backing_off = rt
                        .last_failure
                        .is_some_and(|t| t.elapsed() < Duration::from_secs(10));
                    let up = if in_use {
                        want.up.max(auto.desired)
                    } else {
                        want.up
                    };
                    while !backing_off && rt.instances.len() + rt.starting < up {
                        match gw.node.claim_for(
                            &rt.record.tenant,
                            rt.record.kbs_url.as_deref(),
                            rt.record.allow_insecure_software_tee,
                            false,
                        ) {
                            Ok(claim) => {
                                rt.min_scale_blocked = false;
                                if auto.desired > want.up {
                                    tracing::debug!(function = %rt.record.name, desired = auto.desired, panic = auto.panic, "autoscaler: scaling up");
                                } else if want.up > rt.record.min_scale as usize {
                                    tracing::debug!(function = %rt.record.name, "pre-warming an instance (hybrid keep-alive)");
                                }
                                start_instance(&gw, rt, claim);
                            }
                            Err(e) => {
                                if !rt.min_scale_blocked {
                                    tracing::warn!(function = %rt.record.name, min_scale = rt.record.min_scale, instances = rt.instances.len() + rt.starting, error = %e, "no room on the node for min_scale instances; waiting for capacity");
                                    rt.min_scale_blocked = true;
                                }
                                break;
                            }
                        }
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keepalive::Decision;

    fn s(x: u64) -> Duration {
        Duration::from_secs(x)
    }

    #[test]
    fn targets_follow_the_keep_alive_decision() {
        // Fixed: the idle timeout, min_scale kept.
        assert_eq!(
            target(0, s(60), None, Some(s(5))),
            Target {
                keep: 0,
                idle_after: s(60),
                up: 0
            }
        );
        let d = Decision {
            prewarm: s(30),
            keep_alive: s(10),
            source: "histogram".into(),
        };
        // Just gone idle, before the pre-warm window: unload now.
        assert_eq!(
            target(0, s(60), Some(&d), Some(s(1))),
            Target {
                keep: 0,
                idle_after: Duration::ZERO,
                up: 0
            }
        );
        // In the window: one instance up (pre-warmed), extra ones go after the keep-alive.
        assert_eq!(
            target(0, s(60), Some(&d), Some(s(31))),
            Target {
                keep: 1,
                idle_after: s(10),
                up: 1
            }
        );
        // After the window: unload again; min_scale always stays.
        assert_eq!(
            target(2, s(60), Some(&d), Some(s(45))),
            Target {
                keep: 2,
                idle_after: Duration::ZERO,
                up: 2
            }
        );
        // Busy: extra instances wait out the whole window.
        assert_eq!(
            target(0, s(60), Some(&d), None),
            Target {
                keep: 0,
                idle_after: s(40),
                up: 0
            }
        );
        // A fallback decision (no pre-warm) keeps the instance for the fixed window.
        let f = Decision {
            prewarm: Duration::ZERO,
            keep_alive: s(60),
            source: "fixed window".into(),
        };
        assert_eq!(target(0, s(60), Some(&f), Some(s(59))).keep, 1);
        assert_eq!(target(0, s(60), Some(&f), Some(s(61))).keep, 0);
    }

    fn cfg() -> AutoscaleConfig {
        AutoscaleConfig::default()
    }

    /// Feed one sample a second from `start` for `secs` seconds at `c`; the decision after.
    fn feed(
        o: &mut Observed,
        t: &mut Instant,
        secs: u64,
        c: f64,
        ready: usize,
    ) -> AutoscalerStatus {
        let mut last = None;
        for _ in 0..secs {
            *t += s(1);
            o.record(*t, c, &cfg());
            last = Some(o.decide(*t, &cfg(), 10.0, ready, 0, 20));
        }
        last.unwrap()
    }

    #[test]
    fn the_stable_window_averages_and_the_panic_window_catches_bursts() {
        let mut o = Observed::default();
        let mut t = Instant::now();
        // Steady 25 concurrent at a target of 10: three instances, no panic.
        let d = feed(&mut o, &mut t, 60, 25.0, 3);
        assert_eq!((d.desired, d.panic), (3, false), "{d:?}");
        assert!((d.stable_concurrency - 25.0).abs() < 1e-9);
        // A burst to 100 with 3 ready: within seconds the panic window wants twice the
        // instances ready, and the revision panics, long before the stable window notices.
        let d = feed(&mut o, &mut t, 1, 100.0, 3);
        assert!(!d.panic, "{d:?}");
        let d = feed(&mut o, &mut t, 3, 100.0, 3);
        assert!(d.panic, "{d:?}");
        assert!(d.desired >= 6, "{d:?}");
        let d = feed(&mut o, &mut t, 6, 100.0, 10);
        assert_eq!((d.desired, d.panic), (10, true), "{d:?}");
        // The burst ends: panic never scales down, and lasts a stable window after the
        // condition last held.
        let d = feed(&mut o, &mut t, 30, 5.0, 10);
        assert_eq!((d.desired, d.panic), (10, true), "{d:?}");
        let d = feed(&mut o, &mut t, 31, 5.0, 10);
        assert!(!d.panic, "{d:?}");
        // Then the stable window's average decides: below 10 per instance.
        let d = feed(&mut o, &mut t, 60, 5.0, 10);
        assert_eq!((d.desired, d.panic), (1, false), "{d:?}");
        // No traffic for a whole window: nothing wanted (scale to zero is the keep-alive's).
        let d = feed(&mut o, &mut t, 61, 0.0, 1);
        assert_eq!(d.desired, 0, "{d:?}");
    }

    #[test]
    fn decisions_stay_within_the_scale_bounds() {
        let mut o = Observed::default();
        let t = Instant::now();
        o.record(t, 1000.0, &cfg());
        let d = o.decide(t, &cfg(), 1.0, 0, 2, 5);
        assert_eq!(d.desired, 5);
        let mut o = Observed::default();
        o.record(t, 0.0, &cfg());
        assert_eq!(o.decide(t, &cfg(), 1.0, 0, 2, 5).desired, 2);
        // From zero, a single request is not a panic (one instance wanted, none ready).
        let mut o = Observed::default();
        o.record(t, 1.0, &cfg());
        let d = o.decide(t, &cfg(), 100.0, 0, 0, 5);
        assert_eq!((d.desired, d.panic), (1, false));
    }

    #[test]
    fn scale_down_at_most_halves() {
        assert_eq!(scale_down_room(10, 1, 2.0), 5);
        assert_eq!(scale_down_room(10, 8, 2.0), 2);
        assert_eq!(scale_down_room(3, 1, 2.0), 1);
        assert_eq!(scale_down_room(1, 1, 2.0), 0);
        assert_eq!(scale_down_room(4, 0, 1.0), 0);
    }
}
