//! Behaviour against a scripted in-process HTTP server: throttling, resumed
//! blob downloads, basic and bearer authentication, mirrors, error bodies.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{head, response, Stub};
use futures::StreamExt;
use veil_image::{Digest, Reference};
use veil_registry::{Error, RegistryClient, RegistryConfig};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn manifest_json() -> Vec<u8> {
    let cfg = Digest::sha256(b"{}");
    let layer = Digest::sha256(b"layer");
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cfg}","size":2}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer}","size":5}}]}}"#
    )
    .into_bytes()
}

fn reference(stub: &Stub, rest: &str) -> Reference {
    format!("{}/{rest}", stub.host())
        .parse()
        .expect("valid reference")
}

fn client() -> RegistryClient {
    client_with(RegistryConfig {
        timeout: Duration::from_secs(5),
        ..Default::default()
    })
}

fn client_with(config: RegistryConfig) -> RegistryClient {
    RegistryClient::new(config).expect("client")
}

fn manifest_ok() -> Vec<u8> {
    response(200, &[("Content-Type", OCI_MANIFEST)], &manifest_json())
}

#[tokio::test]
async fn too_many_requests_honours_retry_after() {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let stub = Stub::start(move |_req| {
        if h.fetch_add(1, Ordering::SeqCst) == 0 {
            response(429, &[("Retry-After", "1")], b"slow down")
        } else {
            manifest_ok()
        }
    })
    .await;
    let started = Instant::now();
    let m = client()
        .get_manifest(&reference(&stub, "app:v1"))
        .await
        .expect("manifest after one 429");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "Retry-After: 1 was not honoured ({:?})",
        started.elapsed()
    );
    assert_eq!(&m.bytes[..], &manifest_json()[..]);
    assert_eq!(m.digest, Digest::sha256(&manifest_json()));
    assert_eq!(m.media_type, OCI_MANIFEST);
    assert_eq!(stub.count("/v2/app/manifests/v1"), 2);
}

#[tokio::test]
async fn persistent_throttling_gives_up() {
    let stub = Stub::start(|_req| response(503, &[("Retry-After", "0")], b"")).await;
    let err = client()
        .get_manifest(&reference(&stub, "app:v1"))
        .await
        .expect_err("must fail");
    assert!(matches!(err, Error::Throttled { status: 503, .. }), "{err}");
    assert!(err.to_string().contains("app:v1"), "{err}");
    // The first try plus three retries.
    assert_eq!(stub.count("/v2/"), 4);
}

fn blob_bytes() -> Vec<u8> {
    (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect()
}

#[tokio::test]
async fn broken_blob_download_resumes_with_range() {
    let blob = blob_bytes();
    let digest = Digest::sha256(&blob);
    let b = blob.clone();
    let stub = Stub::start(move |req| match req.header("range") {
        None => {
            // Announce the whole blob, send 40%, then hang up.
            let mut out = head(200, &[], b.len());
            out.extend_from_slice(&b[..40_000]);
            out
        }
        Some(range) => {
            let start: usize = range
                .strip_prefix("bytes=")
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|s| s.parse().ok())
                .expect("open-ended byte range");
            let cr = format!("bytes {}-{}/{}", start, b.len() - 1, b.len());
            response(206, &[("Content-Range", &cr)], &b[start..])
        }
    })
    .await;
    let r = reference(&stub, "app:v1");
    let mut bs = client().get_blob(&r, &digest).await.expect("blob");
    assert_eq!(bs.size, Some(blob.len() as u64));
    let mut got = Vec::new();
    while let Some(chunk) = bs.stream.next().await {
        got.extend_from_slice(&chunk.expect("chunk"));
    }
    assert_eq!(got.len(), blob.len());
    assert_eq!(Digest::sha256(&got), digest);
    let reqs = stub.requests();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!(reqs[1].header("range"), Some("bytes=40000-"));
}

#[tokio::test]
async fn resume_ignored_range_and_bounded_retries() {
    // A server that ignores Range and always breaks at the same point: the
    // client skips what it already has and gives up after 3 resumptions.
    let blob = blob_bytes();
    let digest = Digest::sha256(&blob);
    let b = blob.clone();
    let stub = Stub::start(move |_req| {
        let mut out = head(200, &[], b.len());
        out.extend_from_slice(&b[..30_000]);
        out
    })
    .await;
    let r = reference(&stub, "app:v1");
    let mut bs = client().get_blob(&r, &digest).await.expect("blob");
    let mut got = Vec::new();
    let mut error = None;
    while let Some(chunk) = bs.stream.next().await {
        match chunk {
            Ok(c) => got.extend_from_slice(&c),
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    let error = error.expect("the download must fail");
    assert!(matches!(error, Error::Transport(_)), "{error}");
    assert_eq!(&got[..], &blob[..30_000], "no duplicated bytes");
    assert_eq!(stub.count("/v2/app/blobs/"), 4);
}

#[tokio::test]
async fn not_found_names_the_error_code() {
    let stub = Stub::start(|_req| {
        response(
            404,
            &[("Content-Type", "application/json")],
            br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{"Tag":"nope"}}]}"#,
        )
    })
    .await;
    let err = client()
        .get_manifest(&reference(&stub, "team/app:nope"))
        .await
        .expect_err("404");
    match &err {
        Error::NotFound { code, .. } => assert_eq!(code.as_deref(), Some("MANIFEST_UNKNOWN")),
        other => panic!("unexpected {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("MANIFEST_UNKNOWN: manifest unknown"), "{msg}");
    assert!(msg.contains("team/app:nope"), "{msg}");
}

#[tokio::test]
async fn oversized_manifest_is_refused() {
    let stub = Stub::start(|_req| {
        let mut out = head(200, &[("Content-Type", OCI_MANIFEST)], 5 * 1024 * 1024);
        out.extend_from_slice(b"{");
        out
    })
    .await;
    let err = client()
        .get_manifest(&reference(&stub, "app:big"))
        .await
        .expect_err("too large");
    assert!(matches!(err, Error::TooLarge { .. }), "{err}");
}

#[tokio::test]
async fn forbidden_and_other_statuses() {
    let stub = Stub::start(|req| {
        if req.path().contains("denied") {
            response(
                403,
                &[],
                br#"{"errors":[{"code":"DENIED","message":"no way"}]}"#,
            )
        } else {
            response(500, &[], b"internal kaboom")
        }
    })
    .await;
    let err = client()
        .get_manifest(&reference(&stub, "denied:v1"))
        .await
        .expect_err("403");
    assert!(matches!(err, Error::Denied { .. }), "{err}");
    assert!(err.to_string().contains("DENIED: no way"), "{err}");
    let err = client()
        .get_manifest(&reference(&stub, "boom:v1"))
        .await
        .expect_err("500");
    assert!(matches!(err, Error::Status { status: 500, .. }), "{err}");
    assert!(err.to_string().contains("internal kaboom"), "{err}");
}

#[tokio::test]
async fn basic_auth_challenge() {
    // "alice:secret" in base64.
    let stub = Stub::start(|req| match req.header("authorization") {
        Some("Basic YWxpY2U6c2VjcmV0") => manifest_ok(),
        _ => response(
            401,
            &[("WWW-Authenticate", r#"Basic realm="Registry Realm""#)],
            b"",
        ),
    })
    .await;
    let r = reference(&stub, "app:v1");

    let err = client().get_manifest(&r).await.expect_err("no credentials");
    assert!(matches!(err, Error::Unauthorized { .. }), "{err}");
    assert!(err.to_string().contains(&stub.host()), "{err}");

    let mut credentials = HashMap::new();
    credentials.insert(stub.host(), ("alice".to_string(), "secret".to_string()));
    let c = client_with(RegistryConfig {
        credentials,
        ..Default::default()
    });
    c.get_manifest(&r).await.expect("with credentials");
    // The scheme is remembered: the next request authenticates up front.
    let before = stub.requests().len();
    c.get_manifest(&r).await.expect("again");
    assert_eq!(stub.requests().len(), before + 1);

    let mut credentials = HashMap::new();
    credentials.insert(stub.host(), ("alice".to_string(), "wrong".to_string()));
    let err = client_with(RegistryConfig {
        credentials,
        ..Default::default()
    })
    .get_manifest(&r)
    .await
    .expect_err("wrong password");
    assert!(matches!(err, Error::Unauthorized { .. }), "{err}");
    let text = format!("{err} {err:?}");
    assert!(!text.contains("wrong"), "password leaked: {text}");
}

#[tokio::test]
async fn bearer_token_flow_with_cache() {
    let token_hits = Arc::new(AtomicUsize::new(0));
    let th = token_hits.clone();
    let port = Arc::new(std::sync::OnceLock::<String>::new());
    let p = port.clone();
    let stub = Stub::start(move |req| {
        let host = p.get().cloned().unwrap_or_default();
        if req.path() == "/token" {
            th.fetch_add(1, Ordering::SeqCst);
            // Credentials must be sent to the token endpoint.
            if req.header("authorization") != Some("Basic Ym9iOmh1bnRlcjI=") {
                return response(401, &[], b"bad creds");
            }
            assert!(req.target.contains("service=stub-registry"), "{}", req.target);
            assert!(
                req.target.contains("scope=repository%3Ateam%2Fapp%3Apull"),
                "{}",
                req.target
            );
            return response(
                200,
                &[("Content-Type", "application/json")],
                br#"{"access_token":"tok-123","expires_in":300}"#,
            );
        }
        match req.header("authorization") {
            Some("Bearer tok-123") => manifest_ok(),
            _ => {
                let ch = format!(
                    r#"Bearer realm="http://{host}/token",service="stub-registry",scope="repository:team/app:pull""#
                );
                response(401, &[("WWW-Authenticate", &ch)], br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#)
            }
        }
    })
    .await;
    port.set(stub.host()).expect("set once");
    let r = reference(&stub, "team/app:v1");

    let mut credentials = HashMap::new();
    credentials.insert(stub.host(), ("bob".to_string(), "hunter2".to_string()));
    let c = client_with(RegistryConfig {
        credentials,
        ..Default::default()
    });
    let m = c.get_manifest(&r).await.expect("manifest with token");
    assert_eq!(m.digest, Digest::sha256(&manifest_json()));
    c.get_manifest(&r).await.expect("again, cached token");
    assert_eq!(token_hits.load(Ordering::SeqCst), 1, "token is cached");
    // 401, retry with token, then straight with the cached token.
    assert_eq!(stub.count("/v2/"), 3);

    // Without credentials the token server refuses: Unauthorized.
    let err = client().get_manifest(&r).await.expect_err("no creds");
    assert!(matches!(err, Error::Unauthorized { .. }), "{err}");
    assert!(!format!("{err:?}").contains("tok-123"));
}

#[tokio::test]
async fn mirror_is_tried_first_then_registry() {
    let mirror = Stub::start(|_req| {
        response(
            404,
            &[],
            br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"not here"}]}"#,
        )
    })
    .await;
    let registry = Stub::start(|_req| manifest_ok()).await;
    let mut mirrors = HashMap::new();
    mirrors.insert(registry.host(), vec![mirror.host()]);
    let c = client_with(RegistryConfig {
        mirrors,
        ..Default::default()
    });
    let m = c
        .get_manifest(&reference(&registry, "app:v1"))
        .await
        .expect("falls back to the registry");
    assert_eq!(&m.bytes[..], &manifest_json()[..]);
    assert_eq!(mirror.count("/v2/app/manifests/v1"), 1);
    assert_eq!(registry.count("/v2/app/manifests/v1"), 1);

    // A mirror that has it answers alone.
    let good_mirror = Stub::start(|_req| manifest_ok()).await;
    let mut mirrors = HashMap::new();
    mirrors.insert(registry.host(), vec![good_mirror.host()]);
    let c = client_with(RegistryConfig {
        mirrors,
        ..Default::default()
    });
    c.get_manifest(&reference(&registry, "app:v1"))
        .await
        .expect("from mirror");
    assert_eq!(registry.count("/v2/"), 1);
}

#[tokio::test]
async fn connection_refused_is_a_transport_error() {
    let port = veil_testkit::free_port();
    let r: Reference = format!("127.0.0.1:{port}/app:v1").parse().expect("ref");
    let err = client().get_manifest(&r).await.expect_err("refused");
    assert!(matches!(err, Error::Transport(_)), "{err}");
}

/// A server that answers every request with headers announcing `len` bytes, then sends one byte
/// every `every` — each gap shorter than the client's idle timeout, so only an overall deadline
/// ends it. `finished` turns true once a whole body was sent.
async fn trickle_server(
    len: usize,
    every: Duration,
) -> (String, Arc<std::sync::atomic::AtomicBool>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind trickle server");
    let host = listener.local_addr().expect("addr").to_string();
    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = finished.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let done = done.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = sock.read(&mut buf).await;
                let head = common::head(200, &[("Content-Type", OCI_MANIFEST)], len);
                if sock.write_all(&head).await.is_err() {
                    return;
                }
                for _ in 0..len {
                    tokio::time::sleep(every).await;
                    if sock.write_all(b" ").await.is_err() || sock.flush().await.is_err() {
                        return;
                    }
                }
                done.store(true, Ordering::SeqCst);
            });
        }
    });
    (host, finished)
}

fn deadline_client() -> RegistryClient {
    client_with(RegistryConfig {
        // Longer than the gaps between bytes: the idle timeout never fires.
        timeout: Duration::from_secs(5),
        manifest_deadline: Duration::from_secs(1),
        blob_deadline_base: Duration::from_secs(1),
        blob_min_bytes_per_sec: 1 << 30,
        ..Default::default()
    })
}

#[tokio::test]
async fn a_trickling_registry_hits_the_manifest_deadline() {
    // 100 bytes at one per 300 ms would take 30 s.
    let (host, finished) = trickle_server(100, Duration::from_millis(300)).await;
    let r: Reference = format!("{host}/app:v1").parse().expect("ref");
    let err = deadline_client()
        .get_manifest(&r)
        .await
        .expect_err("the deadline must end the fetch");
    assert!(matches!(err, Error::Deadline { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("manifest") && msg.contains("app:v1") && msg.contains("deadline"),
        "{msg}"
    );
    assert!(
        !finished.load(Ordering::SeqCst),
        "the trickle ended before the deadline fired"
    );
}

#[tokio::test]
async fn a_trickling_registry_hits_the_blob_deadline() {
    let (host, finished) = trickle_server(100, Duration::from_millis(300)).await;
    let r: Reference = format!("{host}/app:v1").parse().expect("ref");
    let mut bs = deadline_client()
        .get_blob(&r, &Digest::sha256(b"whatever"))
        .await
        .expect("headers arrive at once");
    let mut got = 0usize;
    let err = loop {
        match bs.stream.next().await {
            Some(Ok(c)) => got += c.len(),
            Some(Err(e)) => break e,
            None => panic!("the stream ended without an error after {got} bytes"),
        }
    };
    assert!(matches!(err, Error::Deadline { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("blob") && msg.contains("deadline"), "{msg}");
    assert!(got < 100, "the whole trickle arrived");
    assert!(
        !finished.load(Ordering::SeqCst),
        "the trickle ended before the deadline fired"
    );
    assert!(
        bs.stream.next().await.is_none(),
        "the stream ends after the error"
    );
}
