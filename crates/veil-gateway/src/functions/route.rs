//! Routing one invocation: a revision by the function's traffic (or the tag the request
//! addresses), then the least-loaded ready instance of that revision, or a place in its
//! bounded queue while an instance starts (within the node's capacity), then the proxy to the
//! instance. A request waiting for a revision that loses its traffic is routed again.

use super::autoscale::start_instance;
use super::{lock, Slot};
use crate::{api_error, not_deployed, Gateway};
use axum::body::Body;
use axum::http::{HeaderValue, Request, StatusCode};
use axum::response::Response;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::watch;

enum Pick {
    Slot(Busy),
    Wait(watch::Receiver<u64>, Counted),
    Respond(Response),
}

/// Route one invocation of `name` (of its target tagged `tag`, if given) with the
/// function-relative `path_and_query`.
pub async fn invoke(
    gw: &Arc<Gateway>,
    name: &str,
    tag: Option<&str>,
    path_and_query: String,
    mut req: Request<Body>,
) -> Response {
    // A veil token is never meant for a function: a client that reached a function by its
    // Host name with the operator's or a tenant's credentials must not hand them to whoever
    // owns that name. Other Authorization headers are the function's business.
    if gw.auth.authenticate(req.headers()).is_ok() {
        req.headers_mut().remove(http::header::AUTHORIZATION);
    }
    if crate::invocations::wants_async(req.headers()) {
        return crate::invocations::accept(gw, name, tag, path_and_query, req).await;
    }
    dispatch(gw, name, None, tag, path_and_query, req).await
}

/// Route one request now (and count it): of `name`'s target tagged `tag`, provided the
/// function (still) belongs to `owner`, if given — an asynchronous invocation must not reach a
/// function of the same name that another tenant deployed after it was accepted.
pub(crate) async fn dispatch(
    gw: &Arc<Gateway>,
    name: &str,
    owner: Option<&str>,
    tag: Option<&str>,
    path_and_query: String,
    req: Request<Body>,
) -> Response {
    let started = Instant::now();
    let resp = route(gw, name, owner, tag, path_and_query, req).await;
    if let Some(ServedBy(rev)) = resp.extensions().get::<ServedBy>() {
        gw.metrics
            .request_served(name, *rev, resp.status().as_u16(), started.elapsed());
    } else if resp.status() != StatusCode::NOT_FOUND || lock(&gw.functions.map).contains_key(name) {
        gw.metrics.request(name, resp.status().as_u16());
    }
    resp
}

async fn route(
    gw: &Arc<Gateway>,
    name: &str,
    owner: Option<&str>,
    tag: Option<&str>,
    path_and_query: String,
    req: Request<Body>,
) -> Response {
    let deadline = tokio::time::Instant::now() + gw.config.cold_start_timeout;
    let mut seen_failures: Option<u64> = None;
    let mut waited = false;
    // Why the last attempt to start an instance found no room on the node, if it did.
    let mut at_capacity: Option<String> = None;
    let mut room = gw.node.capacity_changes();
    // Counted as the function's activity (the keep-alive policy's input) until it ends.
    let mut activity: Option<super::ActivityGuard> = None;
    // The revision this request goes to, drawn once (and again if it loses its traffic).
    let mut chosen: Option<(u64, u64)> = None;
    let slot = loop {
        let pick = {
            let mut map = lock(&gw.functions.map);
            let Some(f) = map
                .get_mut(name)
                .filter(|f| owner.is_none_or(|t| t == f.tenant))
            else {
                return not_deployed(name);
            };
            let still_live =
                chosen.filter(|(rev, id)| f.live.get(rev).is_some_and(|rt| rt.id == *id));
            let rev = match still_live {
                Some((rev, _)) => rev,
                None => {
                    let roll = rand::random_range(0..100);
                    let Some(rev) = super::traffic::pick(&f.revisions, &f.traffic, tag, roll)
                    else {
                        return tag_not_found(name, tag.unwrap_or_default());
                    };
                    if chosen.is_some() {
                        // A new revision: its failures, its activity.
                        seen_failures = None;
                        activity = None;
                    }
                    chosen = f.live.get(&rev).map(|rt| (rev, rt.id));
                    rev
                }
            };
            let Some(rt) = f.live.get_mut(&rev) else {
                return not_deployed(name);
            };
            let before = rt.instances.len();
            rt.instances.retain(|s| s.inst.is_alive());
            if rt.instances.len() != before {
                tracing::info!(
                    function = name,
                    "dropped {} ended instance(s)",
                    before - rt.instances.len()
                );
            }
            if activity.is_none() {
                activity = Some(rt.activity.arrive(&gw.functions.keep_alive));
            }
            let seen = *seen_failures.get_or_insert(rt.failures);
            let limit = rt.record.concurrency;
            let best = rt
                .instances
                .iter()
                .filter(|s| s.inflight.load(Ordering::SeqCst) < limit)
                .min_by_key(|s| s.inflight.load(Ordering::SeqCst))
                .cloned();
            if let Some(s) = best {
                s.inflight.fetch_add(1, Ordering::SeqCst);
                Pick::Slot(Busy {
                    slot: s,
                    revision: rev,
                    changes: rt.changes.clone(),
                    _activity: activity.take(),
                })
            } else if rt.failures > seen && rt.instances.is_empty() && rt.starting == 0 {
                Pick::Respond(api_error(
                    StatusCode::BAD_GATEWAY,
                    "COLD_START_FAILED",
                    format!(
                        "function {name:?} could not be started: {}",
                        rt.last_error.clone().unwrap_or_default()
                    ),
                ))
            } else if rt.waiting.load(Ordering::SeqCst) >= gw.config.max_queue {
                let mut r = api_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "QUEUE_FULL",
                    format!(
                        "function {name:?} has {} requests waiting for capacity; try again",
                        rt.waiting.load(Ordering::SeqCst)
                    ),
                );
                r.headers_mut()
                    .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
                Pick::Respond(r)
            } else {
                // One instance starts per `target` requests waiting (a burst starts what it
                // needs at once), within max_scale and the node's room.
                let per_instance = rt.record.target_concurrency().ceil().max(1.0) as usize;
                if rt.instances.len() + rt.starting < rt.record.max_scale as usize
                    && (rt.starting == 0
                        || rt.waiting.load(Ordering::SeqCst) >= rt.starting * per_instance)
                {
                    // Seen before claiming, so room that appears after a refusal wakes us.
                    room.borrow_and_update();
                    match gw.node.claim_for(
                        &rt.record.tenant,
                        rt.record.kbs_url.as_deref(),
                        rt.record.allow_insecure_software_tee,
                        true,
                    ) {
                        Ok(claim) => {
                            at_capacity = None;
                            start_instance(gw, rt, claim);
                        }
                        Err(e) => at_capacity = Some(e.to_string()),
                    }
                }
                rt.waiting.fetch_add(1, Ordering::SeqCst);
                Pick::Wait(rt.changes.subscribe(), Counted(rt.waiting.clone()))
            }
        };
        match pick {
            Pick::Slot(s) => break s,
            Pick::Respond(r) => return r,
            Pick::Wait(mut rx, counted) => {
                waited = true;
                let blocked = at_capacity.is_some();
                let woken = async {
                    tokio::select! {
                        _ = rx.changed() => {}
                        _ = room.changed(), if blocked => {}
                    }
                };
                let res = tokio::time::timeout_at(deadline, woken).await;
                drop(counted);
                if let (Err(_), Some(why)) = (&res, &at_capacity) {
                    let mut r = api_error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "AT_CAPACITY",
                        format!(
                            "function {name:?} had no free instance within {:?} and none could \
                             be started: {why}; try again",
                            gw.config.cold_start_timeout
                        ),
                    );
                    r.headers_mut()
                        .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
                    return r;
                }
                if res.is_err() {
                    let mut r = api_error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "COLD_START_TIMEOUT",
                        format!(
                            "function {name:?} had no ready instance within {:?}; try again",
                            gw.config.cold_start_timeout
                        ),
                    );
                    r.headers_mut()
                        .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
                    return r;
                }
            }
        }
    };
    proxy(slot, name, path_and_query, req, waited).await
}

pub(crate) fn tag_not_found(name: &str, tag: &str) -> Response {
    api_error(
        StatusCode::NOT_FOUND,
        "TAG_NOT_FOUND",
        format!("function {name:?} has no traffic target tagged {tag:?}"),
    )
}

/// One unit of a counter, given back on drop — also when the client disconnects and axum drops
/// the request's future half-way.
struct Counted(Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A request in flight on an instance: the instance's slot is released (and waiters woken) when
/// the response body is finished or dropped, whichever way the request ends.
struct Busy {
    slot: Arc<Slot>,
    revision: u64,
    changes: Arc<watch::Sender<u64>>,
    /// Dropped after the slot is released (fields drop in order after `Drop::drop`).
    _activity: Option<super::ActivityGuard>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.slot.inflight.fetch_sub(1, Ordering::SeqCst);
        *lock(&self.slot.last_used) = Instant::now();
        self.changes.send_modify(|v| *v += 1);
    }
}

async fn proxy(
    busy: Busy,
    name: &str,
    path_and_query: String,
    req: Request<Body>,
    waited: bool,
) -> Response {
    let (mut parts, body) = req.into_parts();
    parts.uri = match path_and_query.parse() {
        Ok(u) => u,
        Err(e) => {
            return api_error(
                StatusCode::BAD_REQUEST,
                "BAD_REQUEST",
                format!("bad path: {e}"),
            )
        }
    };
    for h in veil_proto::HOP_BY_HOP {
        parts.headers.remove(*h);
    }
    let slot = busy.slot.clone();
    let resp = match slot.inst.invoke(Request::from_parts(parts, body)).await {
        Ok(r) => r,
        Err(e) => {
            return api_error(
                StatusCode::BAD_GATEWAY,
                "INSTANCE_FAILED",
                format!("function {name:?}, instance {}: {e}", slot.inst.id()),
            )
        }
    };
    let (mut parts, body) = resp.into_parts();
    for h in veil_proto::HOP_BY_HOP {
        parts.headers.remove(*h);
    }
    if let Ok(v) = HeaderValue::from_str(slot.inst.id()) {
        parts.headers.insert("x-veil-instance", v);
    }
    if waited && !slot.first_served.swap(true, Ordering::SeqCst) {
        let t = &slot.inst.timings;
        let mut v: Vec<String> = t
            .phases()
            .iter()
            .map(|(ph, ms)| format!("{ph}={ms:.1}"))
            .collect();
        v.push(format!("pooled={}", t.pooled));
        v.push(format!("pool={}", t.pool));
        v.push(format!("attested_ahead={}", t.agent.attested_ahead));
        v.push(format!("backend={}", t.backend));
        let v = v.join(";");
        if let Ok(v) = HeaderValue::from_str(&v) {
            parts.headers.insert("x-veil-cold-start", v);
        }
    }
    parts.extensions.insert(ServedBy(busy.revision));
    // The instance counts as busy until the response body is done (or the client is gone).
    let body = http_body_util::BodyExt::map_err(body, move |e| {
        let _held = &busy;
        e
    });
    Response::from_parts(parts, Body::new(body))
}

/// The revision whose instance answered (a response extension, for the latency metrics).
#[derive(Clone, Copy)]
struct ServedBy(u64);
