//! Asynchronous invocations: `Prefer: respond-async` on any invocation. The request is stored
//! durably before the 202 answers it, then run by a bounded set of workers, retried a bounded
//! number of times, and its result kept for a retention period at `GET /v1/invocations/<id>`
//! (the owning tenant's or the operator's token).
//!
//! Durability: the row is written (and synced) before the client hears 202, every attempt is
//! recorded as it starts, so an invocation interrupted by a crash is queued again at the next
//! start with its attempts counted — a request that crashes veil each time stops after
//! `max_attempts`. Deleting a function deletes its invocations; a worker whose row is gone
//! drops the work.
//!
//! The host keeps these requests and responses, in plaintext: they are as visible to it as the
//! synchronous ones until requests are encrypted end to end.

use crate::functions::{dispatch, now_ms};
use crate::state::{Invocation, InvocationState, StoreError, StoredRequest, StoredResponse};
use crate::{api_error, auth, Gateway};
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::Semaphore;

/// Limits of asynchronous invocations.
#[derive(Debug, Clone)]
pub struct InvocationsConfig {
    /// Attempts running at once, over all functions.
    pub concurrency: usize,
    /// Attempts per invocation (the first included).
    pub max_attempts: u32,
    /// How long one attempt may take, response body included.
    pub attempt_timeout: Duration,
    /// Wait before the second attempt; doubled before each further one (at most 30 s).
    pub retry_backoff: Duration,
    /// How long a finished invocation's result is kept.
    pub retention: Duration,
    /// Invocations accepted and not finished, over all functions; beyond it: 503.
    pub max_unfinished: usize,
    /// Largest request body and largest kept response body.
    pub max_body: usize,
}

impl Default for InvocationsConfig {
    fn default() -> Self {
        Self {
            concurrency: 16,
            max_attempts: 3,
            attempt_timeout: Duration::from_secs(300),
            retry_backoff: Duration::from_secs(1),
            retention: Duration::from_secs(24 * 3600),
            max_unfinished: 10_000,
            max_body: 1 << 20,
        }
    }
}

/// An invocation as `GET /v1/invocations/<id>` shows it (the stored request left out).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct InvocationStatus {
    /// Its id.
    pub id: String,
    /// The function it invokes.
    pub function: String,
    /// The tag it addressed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Progress.
    pub state: InvocationState,
    /// Attempts started.
    pub attempts: u32,
    /// Accepted (ms since the Unix epoch).
    pub created_ms: u64,
    /// Last change.
    pub updated_ms: u64,
    /// The function's answer (once succeeded; or the last 5xx of a failed one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<StoredResponse>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl From<&Invocation> for InvocationStatus {
    fn from(i: &Invocation) -> Self {
        Self {
            id: i.id.clone(),
            function: i.function.clone(),
            tag: i.tag.clone(),
            state: i.state,
            attempts: i.attempts,
            created_ms: i.created_ms,
            updated_ms: i.updated_ms,
            response: i.response.clone(),
            error: i.error.clone(),
        }
    }
}

/// The gateway's asynchronous invocations.
pub struct Invocations {
    config: InvocationsConfig,
    workers: Arc<Semaphore>,
    unfinished: AtomicUsize,
    running: AtomicUsize,
}

impl Invocations {
    pub(crate) fn new(config: InvocationsConfig) -> Self {
        Self {
            workers: Arc::new(Semaphore::new(config.concurrency.max(1))),
            config,
            unfinished: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
        }
    }

    /// Accepted and not finished.
    pub fn unfinished(&self) -> usize {
        self.unfinished.load(Ordering::SeqCst)
    }

    /// Attempts running now.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }
}

/// Does the request ask to be answered asynchronously (`Prefer: respond-async`, RFC 7240)?
pub(crate) fn wants_async(headers: &HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| {
            let name = p.split([';', '=']).next().unwrap_or("").trim();
            name.eq_ignore_ascii_case("respond-async")
        })
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(StoreError::Io(std::io::Error::other(e))))
}

fn state_error(e: &StoreError) -> Response {
    tracing::error!("asynchronous invocations: {e}");
    api_error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "STATE_ERROR",
        format!("could not store the invocation: {e}"),
    )
}

/// Accept an asynchronous invocation of `name` (its target tagged `tag`): store it, start it,
/// answer 202 with its id.
pub(crate) async fn accept(
    gw: &Arc<Gateway>,
    name: &str,
    tag: Option<&str>,
    path_and_query: String,
    req: Request<Body>,
) -> Response {
    let cfg = &gw.invocations.config;
    let tenant = match gw.functions.target_tenant(name, tag) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, cfg.max_body).await {
        Ok(b) => b,
        Err(e) => {
            return api_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "BODY_TOO_LARGE",
                format!(
                    "an asynchronous invocation's body is at most {} bytes ({e})",
                    cfg.max_body
                ),
            )
        }
    };
    let mut headers = Vec::new();
    for (k, v) in &parts.headers {
        let k = k.as_str();
        if k == "prefer" || k == "content-length" || veil_proto::HOP_BY_HOP.contains(&k) {
            continue;
        }
        let Ok(v) = std::str::from_utf8(v.as_bytes()) else {
            return api_error(
                StatusCode::BAD_REQUEST,
                "BAD_HEADER",
                format!("header {k:?} is not UTF-8: an asynchronous invocation cannot keep it"),
            );
        };
        headers.push((k.to_string(), v.to_string()));
    }
    // Counted before the store write, so concurrent acceptances cannot pass the bound together.
    let unfinished = gw.invocations.unfinished.fetch_add(1, Ordering::SeqCst);
    if unfinished >= cfg.max_unfinished {
        gw.invocations.unfinished.fetch_sub(1, Ordering::SeqCst);
        let mut r = api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "ASYNC_QUEUE_FULL",
            format!(
                "{unfinished} asynchronous invocations are waiting (at most {}); try again",
                cfg.max_unfinished
            ),
        );
        r.headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from_static("5"));
        return r;
    }
    let now = now_ms();
    let inv = Invocation {
        id: hex::encode(rand::random::<[u8; 16]>()),
        function: name.to_string(),
        tenant,
        tag: tag.map(str::to_string),
        state: InvocationState::Queued,
        attempts: 0,
        created_ms: now,
        updated_ms: now,
        request: StoredRequest {
            method: parts.method.to_string(),
            path: path_and_query,
            headers,
            body: body.to_vec(),
        },
        response: None,
        error: None,
    };
    let store = gw.functions.store().clone();
    let row = inv.clone();
    if let Err(e) = blocking(move || store.insert_invocation(&row)).await {
        gw.invocations.unfinished.fetch_sub(1, Ordering::SeqCst);
        return state_error(&e);
    }
    let location = format!("/v1/invocations/{}", inv.id);
    let status = InvocationStatus::from(&inv);
    tokio::spawn(run(Arc::downgrade(gw), inv));
    let mut r = (StatusCode::ACCEPTED, Json(status)).into_response();
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&location) {
        h.insert(http::header::LOCATION, v);
    }
    h.insert(
        "preference-applied",
        HeaderValue::from_static("respond-async"),
    );
    r
}

/// Queue again what a previous run of veil accepted and did not finish (called once at start).
pub(crate) fn resume(gw: &Arc<Gateway>) -> Result<usize, StoreError> {
    let pending = gw.functions.store().unfinished_invocations()?;
    let n = pending.len();
    for inv in pending {
        gw.invocations.unfinished.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(run(Arc::downgrade(gw), inv));
    }
    Ok(n)
}

/// What one attempt came to.
enum Outcome {
    Done(StoredResponse),
    /// Worth another attempt (5xx, no instance, timeout), with the response if there was one.
    Retry(String, Option<StoredResponse>),
    /// No point trying again (the function or tag is gone, the answer is too large).
    Fail(String, Option<StoredResponse>),
}

/// Run one invocation to its end: attempts until success, a permanent failure, the attempt
/// bound, its row vanishing (function deleted) or the gateway going away.
async fn run(gw: Weak<Gateway>, mut inv: Invocation) {
    struct Unfinished(Weak<Gateway>);
    impl Drop for Unfinished {
        fn drop(&mut self) {
            if let Some(gw) = self.0.upgrade() {
                gw.invocations.unfinished.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
    let _unfinished = Unfinished(gw.clone());
    let (max_attempts, backoff) = match gw.upgrade() {
        Some(g) => (
            g.invocations.config.max_attempts.max(1),
            g.invocations.config.retry_backoff,
        ),
        None => return,
    };
    let mut delay = backoff;
    loop {
        if inv.attempts >= max_attempts {
            // Interrupted (a crash) after its last attempt started: it does not get another.
            inv.state = InvocationState::Failed;
            inv.error.get_or_insert_with(|| {
                format!(
                    "interrupted after {} attempt(s), the most allowed",
                    inv.attempts
                )
            });
            save(&gw, &inv).await;
            return;
        }
        let Some(g) = gw.upgrade() else { return };
        let permit = match g.invocations.workers.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => return,
        };
        inv.attempts += 1;
        inv.state = InvocationState::Running;
        if !save(&gw, &inv).await {
            return;
        }
        g.invocations.running.fetch_add(1, Ordering::SeqCst);
        let outcome = attempt(&g, &inv).await;
        g.invocations.running.fetch_sub(1, Ordering::SeqCst);
        drop(permit);
        drop(g);
        match outcome {
            Outcome::Done(resp) => {
                inv.state = InvocationState::Succeeded;
                inv.response = Some(resp);
                inv.error = None;
                save(&gw, &inv).await;
                return;
            }
            Outcome::Fail(why, resp) => {
                inv.state = InvocationState::Failed;
                inv.response = resp;
                inv.error = Some(why);
                save(&gw, &inv).await;
                return;
            }
            Outcome::Retry(why, resp) => {
                tracing::info!(
                    function = inv.function,
                    invocation = inv.id,
                    attempt = inv.attempts,
                    "asynchronous invocation failed: {why}"
                );
                inv.response = resp;
                inv.error = Some(why);
                if inv.attempts >= max_attempts {
                    inv.state = InvocationState::Failed;
                    let why = inv.error.take().unwrap_or_default();
                    inv.error = Some(format!(
                        "{} attempt(s) failed; the last: {why}",
                        inv.attempts
                    ));
                    save(&gw, &inv).await;
                    return;
                }
                inv.state = InvocationState::Queued;
                if !save(&gw, &inv).await {
                    return;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Write the invocation's state; false if the worker should stop (its row is gone, or the
/// store failed — then the row stays as it was, and a restart takes it up again).
async fn save(gw: &Weak<Gateway>, inv: &Invocation) -> bool {
    let Some(g) = gw.upgrade() else { return false };
    let store = g.functions.store().clone();
    let mut row = inv.clone();
    row.updated_ms = now_ms();
    match blocking(move || store.update_invocation(&row)).await {
        Ok(true) => true,
        Ok(false) => {
            tracing::debug!(
                invocation = inv.id,
                "asynchronous invocation gone (function deleted)"
            );
            false
        }
        Err(e) => {
            tracing::error!(
                invocation = inv.id,
                "asynchronous invocation not saved: {e}"
            );
            false
        }
    }
}

async fn attempt(gw: &Arc<Gateway>, inv: &Invocation) -> Outcome {
    let cfg = &gw.invocations.config;
    let mut b = Request::builder().method(inv.request.method.as_str());
    for (k, v) in &inv.request.headers {
        b = b.header(k.as_str(), v.as_str());
    }
    let req = match b.body(Body::from(inv.request.body.clone())) {
        Ok(r) => r,
        Err(e) => return Outcome::Fail(format!("the stored request is not valid: {e}"), None),
    };
    let run = async {
        let resp = dispatch(
            gw,
            &inv.function,
            Some(&inv.tenant),
            inv.tag.as_deref(),
            inv.request.path.clone(),
            req,
        )
        .await;
        let from_function = resp.headers().contains_key("x-veil-instance");
        let (parts, body) = resp.into_parts();
        let headers = parts
            .headers
            .iter()
            .filter_map(|(k, v)| Some((k.to_string(), v.to_str().ok()?.to_string())))
            .collect();
        let body = axum::body::to_bytes(body, cfg.max_body).await;
        (parts.status, from_function, headers, body)
    };
    let (status, from_function, headers, body) =
        match tokio::time::timeout(cfg.attempt_timeout, run).await {
            Ok(r) => r,
            Err(_) => {
                return Outcome::Retry(format!("no answer within {:?}", cfg.attempt_timeout), None)
            }
        };
    let body = match body {
        Ok(b) => b.to_vec(),
        Err(e) if from_function => {
            return Outcome::Fail(
                format!(
                    "the function's answer is larger than {} bytes, the most kept ({e})",
                    cfg.max_body
                ),
                None,
            )
        }
        Err(e) => return Outcome::Retry(format!("reading the answer: {e}"), None),
    };
    let resp = StoredResponse {
        status: status.as_u16(),
        headers,
        body,
    };
    if from_function && status.as_u16() < 500 {
        return Outcome::Done(resp);
    }
    let why = if from_function {
        format!("the function answered {status}")
    } else {
        // veil's own refusal: its JSON error says why.
        let msg = serde_json::from_slice::<crate::ApiError>(&resp.body)
            .map(|e| format!("{}: {}", e.code, e.message))
            .unwrap_or_else(|_| status.to_string());
        if status == StatusCode::NOT_FOUND {
            return Outcome::Fail(msg, None);
        }
        msg
    };
    Outcome::Retry(why, from_function.then_some(resp))
}

/// Delete finished invocations past their retention, now and then, while the gateway lives.
pub(crate) fn spawn_sweeper(gw: Weak<Gateway>) {
    tokio::spawn(async move {
        loop {
            let (every, retention) = match gw.upgrade() {
                Some(g) => {
                    let r = g.invocations.config.retention;
                    (
                        (r / 4).clamp(Duration::from_millis(100), Duration::from_secs(60)),
                        r,
                    )
                }
                None => return,
            };
            tokio::time::sleep(every).await;
            let Some(g) = gw.upgrade() else { return };
            let store = g.functions.store().clone();
            drop(g);
            let before = now_ms().saturating_sub(retention.as_millis() as u64);
            match blocking(move || store.expire_invocations(before)).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!("{n} asynchronous invocation result(s) expired"),
                Err(e) => tracing::warn!("expiring asynchronous invocations: {e}"),
            }
        }
    });
}

/// `GET /v1/invocations/<id>`.
pub(crate) async fn get(gw: &Arc<Gateway>, caller: &auth::Caller, id: String) -> Response {
    let not_found = || {
        api_error(
            StatusCode::NOT_FOUND,
            "INVOCATION_NOT_FOUND",
            format!(
                "no asynchronous invocation {id:?} (unknown, another tenant's, or its result \
                 has expired)"
            ),
        )
    };
    if id.len() != 32
        || !id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return not_found();
    }
    let store = gw.functions.store().clone();
    let key = id.clone();
    match blocking(move || store.invocation(&key)).await {
        Ok(Some(inv)) if caller.may_act_for(&inv.tenant) => {
            Json(InvocationStatus::from(&inv)).into_response()
        }
        Ok(_) => not_found(),
        Err(e) => {
            tracing::error!("reading asynchronous invocation {id}: {e}");
            api_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "STATE_ERROR",
                format!("could not read the invocation: {e}"),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::wants_async;

    #[test]
    fn respond_async_is_recognised_among_other_preferences() {
        let h = |v: &[&str]| {
            let mut m = http::HeaderMap::new();
            for v in v {
                m.append("prefer", v.parse().unwrap());
            }
            wants_async(&m)
        };
        assert!(h(&["respond-async"]));
        assert!(h(&["wait=5, Respond-Async"]));
        assert!(h(&["return=minimal", "respond-async; foo"]));
        assert!(!h(&[]));
        assert!(!h(&["respond-asynchronously"]));
        assert!(!h(&["return=respond-async"]));
    }
}
