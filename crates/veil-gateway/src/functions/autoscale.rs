//! Scaling: starting instances (in room claimed from the node), and the autoscaler that keeps
//! `min_scale` instances up and scales idle ones down through the drain.

use super::{lock, Runtime, Slot};
use crate::Gateway;
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

/// Every second (or a quarter of the keep-alive histogram's bin, if shorter): remove ended
/// instances, scale idle functions down (to zero unless `min_scale` says otherwise, when the
/// keep-alive policy says so), keep `min_scale` instances up, and pre-warm the functions whose
/// hybrid keep-alive policy expects them to be invoked soon.
pub fn spawn_autoscaler(gw: Weak<Gateway>) {
    tokio::spawn(async move {
        let period = gw.upgrade().map_or(Duration::from_secs(1), |g| {
            (g.functions.keep_alive.bin / 4)
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
                    while !backing_off && rt.instances.len() + rt.starting < want.up {
                        match gw.node.claim_for(
                            &rt.record.tenant,
                            rt.record.kbs_url.as_deref(),
                            rt.record.allow_insecure_software_tee,
                            false,
                        ) {
                            Ok(claim) => {
                                rt.min_scale_blocked = false;
                                if want.up > rt.record.min_scale as usize {
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
}
