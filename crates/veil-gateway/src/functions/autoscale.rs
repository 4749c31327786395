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
        let mut stale = None;
        {
            let mut map = lock(&gw.functions.map);
            match map.get_mut(&rec.name) {
                Some(rt) if rt.record.revision == rec.revision => {
                    rt.starting = rt.starting.saturating_sub(1);
                    match res {
                        Ok(inst) => rt.instances.push(Arc::new(Slot {
                            inst,
                            inflight: AtomicU32::new(0),
                            last_used: Mutex::new(Instant::now()),
                            first_served: AtomicBool::new(false),
                        })),
                        Err(e) => {
                            rt.failures += 1;
                            rt.last_error = Some(e.to_string());
                            rt.last_failure = Some(Instant::now());
                        }
                    }
                    rt.bump();
                }
                // Deleted or redeployed meanwhile: the instance belongs to nobody.
                _ => stale = res.ok(),
            }
        }
        if let Some(inst) = stale {
            inst.destroy().await;
        }
    });
}

/// Every second: remove ended instances, scale idle functions down (to zero unless
/// `min_scale` says otherwise), and keep `min_scale` instances up.
pub fn spawn_autoscaler(gw: Weak<Gateway>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let Some(gw) = gw.upgrade() else { return };
            {
                let mut map = lock(&gw.functions.map);
                for rt in map.values_mut() {
                    let mut doomed = Vec::new();
                    rt.instances.retain(|s| s.inst.is_alive());
                    let idle = Duration::from_secs(rt.record.idle_timeout_s);
                    while rt.instances.len() > rt.record.min_scale as usize {
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
                        tracing::info!(function = %rt.record.name, revision = rt.record.revision, count = doomed.len(), "scaling down idle instances");
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
                    while !backing_off
                        && rt.instances.len() + rt.starting < rt.record.min_scale as usize
                    {
                        match gw.node.claim() {
                            Ok(claim) => {
                                rt.min_scale_blocked = false;
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
