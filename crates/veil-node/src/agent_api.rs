//! The node's side of what a sandbox's agent opens on its channel: its log substream, the
//! registry subset (only the blobs of the image it was assigned) and the relay to the tenant's
//! key broker. Everything here reads input from a guest, so every read is bounded.

use super::*;

/// Longest log line kept; the rest of a longer line is dropped.
pub(crate) const MAX_LINE: usize = 8192;

/// Read a sandbox's output line by line with bounded memory: lines are cut at [`MAX_LINE`]
/// bytes, bytes that are not UTF-8 are replaced, and reading goes on until EOF whatever the
/// content, so the sandbox never blocks on (or dies of) a full or closed pipe.
pub(crate) async fn read_lines<R: tokio::io::AsyncRead + Unpin>(
    mut r: R,
    mut on_line: impl FnMut(&str),
) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 16 << 10];
    let mut line: Vec<u8> = Vec::new();
    let mut overlong = false;
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for &b in &buf[..n] {
            if b == b'\n' {
                on_line(&String::from_utf8_lossy(&line));
                line.clear();
                overlong = false;
            } else if line.len() < MAX_LINE {
                line.push(b);
            } else if !overlong {
                overlong = true;
            }
        }
    }
    if !line.is_empty() {
        on_line(&String::from_utf8_lossy(&line));
    }
}

/// The sandbox's log substream: function output and the agent's own log, rate-limited (a
/// guest can write as fast as it likes; the node keeps [`logs::LINES_PER_SEC`] lines a second
/// and counts the rest).
pub(crate) async fn read_log_stream(logs: Arc<logs::LogBook>, e: Arc<SandboxEntry>, s: Substream) {
    let mut limit = logs::RateLimit::new(Instant::now());
    let mut warned = false;
    read_lines(s, move |line| {
        let (source, text) = match line
            .as_bytes()
            .first()
            .copied()
            .and_then(veil_proto::LogSource::from_byte)
        {
            Some(src) => (src, &line[1..]),
            None => (veil_proto::LogSource::Agent, line),
        };
        let admit = limit.admit(Instant::now());
        if admit == logs::Admit::Drop {
            return;
        }
        let owner = e.log_owner();
        if let logs::Admit::KeepAfterDropping(n) = admit {
            // The operator hears of it once per sandbox; the function's own log keeps the
            // counts (at most one note a second).
            if !std::mem::replace(&mut warned, true) {
                tracing::warn!(sandbox = %e.id, dropped = n, "sandbox log rate-limited");
            } else {
                tracing::debug!(sandbox = %e.id, dropped = n, "sandbox log rate-limited");
            }
            logs.push(
                &owner,
                &e.id,
                &format!("[veil] {n} log lines dropped (rate limit)"),
            );
        }
        match source {
            veil_proto::LogSource::Agent => {
                tracing::debug!(sandbox = %e.id, "agent: {text}");
                logs.push(&owner, &e.id, &format!("[agent] {text}"));
            }
            _ => logs.push(&owner, &e.id, text),
        }
    })
    .await;
}

/// Serve the registry subset to one sandbox: only the blobs of the image it was assigned.
pub(crate) async fn serve_agent(
    cache: Arc<BlobCache>,
    logs: Arc<logs::LogBook>,
    entry: Arc<SandboxEntry>,
    mut incoming: tokio::sync::mpsc::UnboundedReceiver<Substream>,
) {
    while let Some(mut s) = incoming.recv().await {
        let cache = cache.clone();
        let logs = logs.clone();
        let entry = entry.clone();
        tokio::spawn(async move {
            let kind = match mux::accept_kind(&mut s).await {
                Ok(k @ (StreamKind::Registry | StreamKind::Kbs)) => k,
                Ok(StreamKind::Log) => {
                    if entry.log_opened.swap(true, Ordering::SeqCst) {
                        tracing::warn!(sandbox = %entry.id, "agent opened a second log substream; ignored");
                        return;
                    }
                    read_log_stream(logs, entry, s).await;
                    return;
                }
                Ok(other) => {
                    tracing::warn!(sandbox = %entry.id, ?other, "agent opened an unexpected substream");
                    return;
                }
                Err(e) => {
                    tracing::debug!(sandbox = %entry.id, error = %e, "bad substream from agent");
                    return;
                }
            };
            let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let cache = cache.clone();
                let entry = entry.clone();
                async move {
                    let resp = match kind {
                        StreamKind::Kbs => kbs_relay(&entry, req).await,
                        _ => registry_request(&cache, &entry, req).await,
                    };
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(s), svc)
                .await;
        });
    }
}

pub(crate) fn err_resp(
    status: http::StatusCode,
    code: &str,
    message: String,
) -> hyper::Response<RespBody> {
    let body = serde_json::to_vec(&ErrorBody {
        code: code.into(),
        message,
    })
    .unwrap_or_default();
    let mut r = hyper::Response::new(Full::new(Bytes::from(body)).map_err(|n| match n {}).boxed());
    *r.status_mut() = status;
    r
}

/// Largest key-broker request or response the node relays.
const KBS_RELAY_LIMIT: usize = 1 << 20;

pub(crate) fn relay_client() -> &'static reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new())
    })
}

/// Relay one request of the agent to the tenant's key broker. The node is untrusted and sees
/// only what the protocol exposes (evidence, tokens, JWE ciphertext); it forwards without
/// looking and logs no bodies.
pub(crate) async fn kbs_relay(
    entry: &SandboxEntry,
    req: hyper::Request<Incoming>,
) -> hyper::Response<RespBody> {
    use http::StatusCode;
    let base = entry
        .kbs_url
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let Some(base) = base else {
        return err_resp(
            StatusCode::FORBIDDEN,
            "DENIED",
            "no key broker is configured for this sandbox".into(),
        );
    };
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    if !pq.starts_with("/kbs/v0/") {
        return err_resp(
            StatusCode::FORBIDDEN,
            "DENIED",
            format!("{pq} is not a key-broker path"),
        );
    }
    let method = req.method().clone();
    let headers = req.headers().clone();
    let body = match mux::read_body_limited(req.into_body(), KBS_RELAY_LIMIT).await {
        Ok(b) => b,
        Err(e) => return err_resp(StatusCode::PAYLOAD_TOO_LARGE, "TOO_LARGE", e.to_string()),
    };
    let mut rb = relay_client()
        .request(method, format!("{}{pq}", base.trim_end_matches('/')))
        .body(body);
    for h in [
        http::header::CONTENT_TYPE,
        http::header::COOKIE,
        http::header::AUTHORIZATION,
        http::header::ACCEPT,
        // A tenant-attested sandbox's assignment statement (signed by the sandbox).
        http::HeaderName::from_static(veil_proto::KBS_STATEMENT_HEADER),
    ] {
        if let Some(v) = headers.get(&h) {
            rb = rb.header(h, v);
        }
    }
    let resp = match rb.send().await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(sandbox = %entry.id, error = %e, "key broker unreachable");
            return err_resp(
                StatusCode::BAD_GATEWAY,
                "KBS_UNREACHABLE",
                format!("key broker at {base} is unreachable: {e}"),
            );
        }
    };
    let status = resp.status();
    let rheaders = resp.headers().clone();
    let bytes = match resp.bytes().await {
        Ok(b) if b.len() <= KBS_RELAY_LIMIT => b,
        Ok(_) => {
            return err_resp(
                StatusCode::BAD_GATEWAY,
                "TOO_LARGE",
                "key broker reply too large".into(),
            )
        }
        Err(e) => return err_resp(StatusCode::BAD_GATEWAY, "KBS_UNREACHABLE", e.to_string()),
    };
    let mut out = hyper::Response::new(Full::new(bytes).map_err(|n| match n {}).boxed());
    *out.status_mut() = status;
    for h in [http::header::CONTENT_TYPE, http::header::SET_COOKIE] {
        for v in rheaders.get_all(&h) {
            out.headers_mut().append(h.clone(), v.clone());
        }
    }
    out
}

pub(crate) async fn registry_request(
    cache: &BlobCache,
    entry: &SandboxEntry,
    req: hyper::Request<Incoming>,
) -> hyper::Response<RespBody> {
    use http::StatusCode;
    let path = req.uri().path().to_string();
    let grant = entry
        .grant
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let Some(grant) = grant else {
        return err_resp(
            StatusCode::FORBIDDEN,
            "DENIED",
            "this sandbox has no assignment".into(),
        );
    };
    // /v2/<repository>/{manifests,blobs}/<digest>
    let parsed = path
        .strip_prefix("/v2/")
        .and_then(|rest| rest.rsplit_once('/'))
        .and_then(|(head, digest)| {
            let (repo, kind) = head.rsplit_once('/')?;
            Some((repo.to_string(), kind.to_string(), digest.to_string()))
        });
    let Some((repo, kind, digest)) = parsed else {
        return err_resp(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            format!("no such endpoint {path}"),
        );
    };
    let Ok(d) = digest.parse::<Digest>() else {
        return err_resp(
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
            format!("{digest} is not a digest; blobs are served by digest only"),
        );
    };
    if repo != grant.image.repository
        || !grant.digests.contains(&d)
        || !(kind == "blobs" || kind == "manifests")
    {
        tracing::warn!(sandbox = %entry.id, %path, "agent asked for a blob outside its image");
        return err_resp(
            StatusCode::FORBIDDEN,
            "DENIED",
            format!("{d} is not part of the image assigned to this sandbox"),
        );
    }
    if let Err(e) = cache.ensure(&grant.image, &d).await {
        let (status, code) = match e.kind() {
            ErrorKind::NotFound => (StatusCode::NOT_FOUND, "BLOB_UNKNOWN"),
            ErrorKind::UpstreamTimeout => (StatusCode::GATEWAY_TIMEOUT, "BLOB_UNAVAILABLE"),
            _ => (StatusCode::BAD_GATEWAY, "BLOB_UNAVAILABLE"),
        };
        return err_resp(status, code, e.to_string());
    }
    cache.store().touch(&d);
    let path = cache.store().path(&d);
    let file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => return err_resp(StatusCode::INTERNAL_SERVER_ERROR, "STORAGE", e.to_string()),
    };
    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 256 << 10);
    let body = StreamBody::new(futures::StreamExt::map(stream, |r| {
        r.map(hyper::body::Frame::data)
    }));
    let mut r = hyper::Response::new(BodyExt::boxed(body));
    r.headers_mut()
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    r
}
