//! The agent's side of the channel: the control API (assign, health) and the invocation proxy.

use crate::function::{self, FnExit, Launch, Reaper};
use anyhow::{Context, Result};
use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use veil_proto::mux::{self, MuxHandle, Side, Substream};
use veil_proto::{AssignReply, Assignment, ErrorBody, StreamKind, AGENT_ERROR_HEADER};

type Body = BoxBody<Bytes, hyper::Error>;

/// Where the function's root lives inside the agent's private root.
pub const ROOTFS: &str = "/rootfs";

enum State {
    Idle,
    Assigning,
    Running(Arc<Running>),
    Failed(String),
}

struct Running {
    /// The tenant the sandbox is bound to.
    tenant: String,
    port: u16,
    permits: Arc<Semaphore>,
    function: String,
}

struct Agent {
    mux: MuxHandle,
    state: Mutex<State>,
    /// Attested to a tenant ahead of assignment (a tenant-attested pool); taken at assignment.
    prepared: tokio::sync::Mutex<Option<crate::attest::Prepared>>,
    /// The tenant this sandbox is bound to, once prepared or assigned: it never changes.
    bound_tenant: Mutex<Option<String>>,
    reaper: Reaper,
    client: Client<crate::conn::PrimedConnector, Incoming>,
    /// The client's connector, primed with the readiness probe's connection.
    connector: crate::conn::PrimedConnector,
    rootfs: PathBuf,
}

/// Serve the channel found on file descriptor `fd` until the node closes it.
pub async fn run_on_fd(fd: i32) -> Result<()> {
    // SAFETY: fd 3 was set up by the node as our end of the channel; nothing else in this
    // process owns it, and it is wrapped exactly once.
    let std_stream =
        unsafe { <std::os::unix::net::UnixStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // The function must not inherit the channel.
    // SAFETY: setting FD_CLOEXEC on a descriptor we own.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error()).context("set FD_CLOEXEC on the channel");
    }
    std_stream.set_nonblocking(true)?;
    let stream = tokio::net::UnixStream::from_std(std_stream).context("channel fd")?;
    serve(stream, Path::new(ROOTFS)).await
}

/// Serve one channel (the node's end is on the other side of `io`).
pub async fn serve<T>(io: T, rootfs: &Path) -> Result<()>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mux, mut incoming) = mux::start(io, Side::Agent);
    if let Err(e) = crate::logsink::install(&mux).await {
        tracing::warn!(error = %e, "cannot open the log substream; logging to stderr");
    }
    let connector = crate::conn::PrimedConnector::new();
    let agent = Arc::new(Agent {
        mux,
        state: Mutex::new(State::Idle),
        prepared: tokio::sync::Mutex::new(None),
        bound_tenant: Mutex::new(None),
        reaper: Reaper::start()?,
        client: Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector.clone()),
        connector,
        rootfs: rootfs.to_path_buf(),
    });
    tracing::info!("agent waiting for an assignment");
    while let Some(s) = incoming.recv().await {
        let agent = agent.clone();
        tokio::spawn(async move {
            if let Err(e) = handle_substream(agent, s).await {
                tracing::debug!(error = %e, "substream ended with an error");
            }
        });
    }
    tracing::info!("node closed the channel; agent exiting");
    Ok(())
}

async fn handle_substream(agent: Arc<Agent>, mut s: Substream) -> Result<()> {
    let kind = mux::accept_kind(&mut s).await?;
    let svc = hyper::service::service_fn(move |req| {
        let agent = agent.clone();
        async move {
            let resp = match kind {
                StreamKind::Control => control(agent, req).await,
                StreamKind::Invoke => invoke(agent, req).await,
                StreamKind::Registry | StreamKind::Kbs | StreamKind::Log => error(
                    StatusCode::BAD_REQUEST,
                    "BAD_STREAM",
                    "the agent serves no registry",
                ),
            };
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(s), svc)
        .await?;
    Ok(())
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

fn error(status: StatusCode, code: &str, message: &str) -> hyper::Response<Body> {
    let body = serde_json::to_vec(&ErrorBody {
        code: code.into(),
        message: message.into(),
    })
    .unwrap_or_default();
    let mut r = hyper::Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(AGENT_ERROR_HEADER, HeaderValue::from_static("1"));
    r
}

fn json<T: serde::Serialize>(v: &T) -> hyper::Response<Body> {
    let mut r = hyper::Response::new(full(serde_json::to_vec(v).unwrap_or_default()));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

async fn control(agent: Arc<Agent>, req: hyper::Request<Incoming>) -> hyper::Response<Body> {
    match (req.method().as_str(), req.uri().path()) {
        ("GET", veil_proto::HEALTH_PATH) => {
            let _ = tokio::task::spawn_blocking(crate::attest::wait_ahead_of_time_work).await;
            let state = match &*agent.state.lock().unwrap_or_else(|p| p.into_inner()) {
                State::Idle => "idle".to_string(),
                State::Assigning => "assigning".to_string(),
                State::Running(r) => format!("running {}", r.function),
                State::Failed(e) => format!("failed: {e}"),
            };
            let mut v = serde_json::to_value(veil_proto::Health {
                protocol: veil_proto::PROTOCOL_VERSION,
                agent: env!("CARGO_PKG_VERSION").into(),
                platform: crate::platform().into(),
            })
            .unwrap_or_default();
            v["state"] = state.into();
            // The tenant this sandbox serves, as the sandbox itself knows it: once bound (by
            // preparation or assignment) it never changes.
            v["tenant"] = agent
                .bound_tenant
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .into();
            json(&v)
        }
        ("POST", veil_proto::PREPARE_PATH) => {
            let body = match mux::read_body_limited(req.into_body(), 64 << 10).await {
                Ok(b) => b,
                Err(e) => return error(StatusCode::BAD_REQUEST, "BAD_REQUEST", &e.to_string()),
            };
            let p: veil_proto::Preparation = match serde_json::from_slice(&body) {
                Ok(p) => p,
                Err(e) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "BAD_REQUEST",
                        &format!("malformed preparation: {e}"),
                    )
                }
            };
            let mut prepared = agent.prepared.lock().await;
            {
                // Checked and bound in one critical section with the assignment's check, so a
                // concurrent assignment for another tenant cannot slip in between. Bound from
                // the first attempt on, whether or not it succeeds.
                let st = agent.state.lock().unwrap_or_else(|p| p.into_inner());
                let mut bound = agent.bound_tenant.lock().unwrap_or_else(|p| p.into_inner());
                if !matches!(*st, State::Idle) || prepared.is_some() || bound.is_some() {
                    return error(
                        StatusCode::CONFLICT,
                        "ALREADY_BOUND",
                        "this sandbox is already bound; sandboxes are never re-bound",
                    );
                }
                *bound = Some(p.tenant.clone());
            }
            let t = Instant::now();
            match crate::attest::prepare(&agent.mux, &p).await {
                Ok(ok) => {
                    let reply = veil_proto::PrepareReply {
                        token_expires_at: ok.client.token_expiry(),
                        attest_ms: t.elapsed().as_secs_f64() * 1000.0,
                    };
                    *prepared = Some(ok);
                    json(&reply)
                }
                Err(msg) => {
                    tracing::error!(tenant = %p.tenant, "preparation failed: {msg}");
                    error(StatusCode::UNPROCESSABLE_ENTITY, "ATTESTATION", &msg)
                }
            }
        }
        ("POST", veil_proto::ASSIGN_PATH) => {
            let body = match mux::read_body_limited(req.into_body(), 256 << 10).await {
                Ok(b) => b,
                Err(e) => return error(StatusCode::BAD_REQUEST, "BAD_REQUEST", &e.to_string()),
            };
            let a: Assignment = match serde_json::from_slice(&body) {
                Ok(a) => a,
                Err(e) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "BAD_REQUEST",
                        &format!("malformed assignment: {e}"),
                    )
                }
            };
            {
                let mut st = agent.state.lock().unwrap_or_else(|p| p.into_inner());
                if !matches!(*st, State::Idle) {
                    return error(
                        StatusCode::CONFLICT,
                        "ALREADY_ASSIGNED",
                        "this sandbox was already assigned; sandboxes are never re-assigned",
                    );
                }
                let mut bound = agent.bound_tenant.lock().unwrap_or_else(|p| p.into_inner());
                match bound.as_deref() {
                    Some(t) if t != a.tenant => {
                        return error(
                            StatusCode::CONFLICT,
                            "WRONG_TENANT",
                            &format!(
                                "this sandbox is bound to tenant {t:?} and never serves another \
                                 (asked for tenant {:?})",
                                a.tenant
                            ),
                        )
                    }
                    _ => *bound = Some(a.tenant.clone()),
                }
                *st = State::Assigning;
            }
            match assign(&agent, &a).await {
                Ok(reply) => json(&reply),
                Err((code, msg)) => {
                    tracing::error!(function = %a.function, "assignment failed: {msg}");
                    *agent.state.lock().unwrap_or_else(|p| p.into_inner()) =
                        State::Failed(msg.clone());
                    error(StatusCode::UNPROCESSABLE_ENTITY, code, &msg)
                }
            }
        }
        _ => error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "unknown control endpoint",
        ),
    }
}

async fn assign(agent: &Arc<Agent>, a: &Assignment) -> Result<AssignReply, (&'static str, String)> {
    tracing::info!(function = %a.function, image = %a.image, digest = %a.manifest_digest, "assigned");
    let t_attest = Instant::now();
    let prepared = agent.prepared.lock().await.take();
    let attested_ahead = prepared.is_some();
    // Signatures come from the node, not the broker: fetch them while attesting.
    let (released, prefetched) = match &a.attestation {
        Some(plan) if plan.signature_policy.is_some() => {
            let (r, sigs) = tokio::join!(
                crate::attest::attest_and_fetch(&agent.mux, a, plan, prepared),
                crate::pull::fetch_signatures(&agent.mux, a)
            );
            (r, Some(sigs))
        }
        Some(plan) => (
            crate::attest::attest_and_fetch(&agent.mux, a, plan, prepared).await,
            None,
        ),
        None => (Ok(crate::attest::Released::default()), None),
    };
    let mut released = released.map_err(|e| ("ATTESTATION", e))?;
    let secrets = std::mem::take(&mut released.secrets);
    let attest_and_release_ms = t_attest.elapsed().as_secs_f64() * 1000.0;
    let attest_ms = released.attest_ms;
    let pulled = crate::pull::pull(&agent.mux, a, &agent.rootfs, &mut released, prefetched)
        .await
        .map_err(|e| ("IMAGE_PULL", e.to_string()))?;
    let mut timings = pulled.timings;
    timings.attest_ms = attest_ms;
    timings.release_ms = (attest_and_release_ms - attest_ms).max(0.0);
    timings.attested_ahead = attested_ahead;
    let cfg = pulled.config;
    let setup = |e: anyhow::Error| ("SANDBOX_SETUP", format!("{e:#}"));
    crate::nsinit::prepare_function_root(&agent.rootfs).map_err(setup)?;
    let (uid, gid) = function::resolve_user(&agent.rootfs, cfg.user.as_deref())
        .map_err(|e| ("IMAGE_CONFIG", format!("{e:#}")))?;
    let argv = cfg.argv().map_err(|e| ("IMAGE_CONFIG", e.to_string()))?;
    let mut env: Vec<String> = cfg
        .env
        .iter()
        .filter(|e| !e.starts_with("PORT="))
        .cloned()
        .collect();
    for (k, v) in &a.env {
        env.retain(|e| !e.starts_with(&format!("{k}=")));
        env.push(format!("{k}={v}"));
    }
    for (k, v) in &secrets {
        env.retain(|e| !e.starts_with(&format!("{k}=")));
        env.push(format!("{k}={}", v.as_str()));
    }
    env.push(format!("PORT={}", a.port));
    let launch = Launch {
        argv,
        env,
        cwd: cfg
            .working_dir
            .clone()
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "/".into()),
        uid,
        gid,
    };
    let t = Instant::now();
    let pid = function::spawn(&agent.rootfs, &launch)
        .map_err(|e| ("FUNCTION_START", format!("{e:#}")))?;
    timings.spawn_ms = t.elapsed().as_secs_f64() * 1000.0;
    let exit = agent.reaper.function_exit();
    let ready = function::wait_ready(
        a.port,
        Duration::from_millis(a.ready_timeout_ms),
        exit.clone(),
    )
    .await;
    let ready = match ready {
        Ok((d, conn)) => {
            agent.connector.prime(conn);
            d
        }
        Err(e) => {
            // SAFETY: kill(2) on the function's pid; it is our child and not yet reaped unless
            // it already exited, in which case the pid is unused or a zombie we reap.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
            let code = match e {
                function::NotReady::Exited(..) => "FUNCTION_EXITED",
                function::NotReady::Timeout(..) => "FUNCTION_NOT_READY",
            };
            return Err((code, format!("function {}: {e}", a.function)));
        }
    };
    timings.ready_ms = ready.as_secs_f64() * 1000.0;
    let running = Arc::new(Running {
        tenant: a.tenant.clone(),
        port: a.port,
        permits: Arc::new(Semaphore::new(a.concurrency.max(1) as usize)),
        function: a.function.clone(),
    });
    *agent.state.lock().unwrap_or_else(|p| p.into_inner()) = State::Running(running.clone());
    watch_function(agent.clone(), exit, running, a.concurrency);
    tracing::info!(function = %a.function, pid, ?timings, "function ready");
    Ok(AssignReply {
        function_pid: pid,
        timings,
    })
}

/// Once the function runs, its exit ends the sandbox: the agent stops taking invocations, lets
/// responses already under way reach the node (up to two seconds), then PID 1 exits, the kernel
/// kills the rest, and the node sees the sandbox end.
fn watch_function(
    agent: Arc<Agent>,
    mut exit: tokio::sync::watch::Receiver<Option<FnExit>>,
    running: Arc<Running>,
    concurrency: u32,
) {
    tokio::spawn(async move {
        let status = exit
            .wait_for(|e| e.is_some())
            .await
            .map(|v| (*v).map(|e| e.to_string()).unwrap_or_default());
        if let Ok(status) = status {
            tracing::error!(function = %running.function, "function exited ({status}); ending the sandbox");
            *agent.state.lock().unwrap_or_else(|p| p.into_inner()) =
                State::Failed(format!("function exited ({status})"));
            let all = concurrency.max(1) as usize;
            let deadline = Instant::now() + Duration::from_secs(2);
            while running.permits.available_permits() < all && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // Responses are written; so is the function's output, once it is all read.
            crate::logsink::drain(Duration::from_millis(500)).await;
            // Flush the channel before PID 1 goes away.
            let _ = tokio::time::timeout(Duration::from_secs(1), agent.mux.close()).await;
            std::process::exit(3);
        }
    });
}

async fn invoke(agent: Arc<Agent>, req: hyper::Request<Incoming>) -> hyper::Response<Body> {
    let running = match &*agent.state.lock().unwrap_or_else(|p| p.into_inner()) {
        State::Running(r) => r.clone(),
        _ => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "NOT_READY",
                "the sandbox has no ready function",
            )
        }
    };
    let Ok(permit) = running.permits.clone().try_acquire_owned() else {
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            "OVERLOADED",
            "the function's concurrency limit is reached",
        );
    };
    let (mut parts, body) = req.into_parts();
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    parts.uri = match format!("http://127.0.0.1:{}{}", running.port, pq).parse() {
        Ok(u) => u,
        Err(e) => return error(StatusCode::BAD_REQUEST, "BAD_REQUEST", &e.to_string()),
    };
    for h in veil_proto::HOP_BY_HOP {
        parts.headers.remove(*h);
    }
    match agent
        .client
        .request(hyper::Request::from_parts(parts, body))
        .await
    {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            for h in veil_proto::HOP_BY_HOP {
                parts.headers.remove(*h);
            }
            // The tenant this sandbox is bound to, said by the sandbox itself (the host knows
            // it anyway): lets tests and operators check that no sandbox serves two tenants.
            if let Ok(v) = http::HeaderValue::from_str(&running.tenant) {
                parts.headers.insert(veil_proto::SANDBOX_TENANT_HEADER, v);
            }
            // The permit is released when the response body is done or dropped.
            let body = body
                .map_err(move |e| {
                    let _held = &permit;
                    e
                })
                .boxed();
            hyper::Response::from_parts(parts, body)
        }
        Err(e) => error(
            StatusCode::BAD_GATEWAY,
            "FUNCTION_UNREACHABLE",
            &format!("function {}: {e}", running.function),
        ),
    }
}
