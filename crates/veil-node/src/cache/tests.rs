//! Tests of the blob cache against in-process upstream registries.

use super::*;
use crate::ErrorKind;
use std::sync::atomic::AtomicUsize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An upstream that answers every request with `status` and a distribution error body,
/// counting requests.
async fn upstream(status: u16, code: &'static str) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            h.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = sock.read(&mut buf).await;
                let body = format!(r#"{{"errors":[{{"code":"{code}","message":"no"}}]}}"#);
                let resp = format!(
                    "HTTP/1.1 {status} X\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    });
    (host, hits)
}

fn cache(dir: &std::path::Path) -> BlobCache {
    let store = Arc::new(BlobStore::open(dir).unwrap());
    let client = RegistryClient::new(veil_registry::RegistryConfig::default()).unwrap();
    BlobCache::new(store, client, 1 << 30)
}

fn image(host: &str) -> ResolvedImage {
    ResolvedImage {
        reference: format!("{host}/app:v1"),
        registry: host.to_string(),
        repository: "app".into(),
        manifest_digest: Digest::sha256(b"manifest").to_string(),
        signatures: Vec::new(),
        index_digest: None,
    }
}

/// Two sandboxes waiting for one upstream fetch both get its error with its kind: a 404
/// stays "not found", a 401 "unauthorized" (not a string that maps to a generic 502).
#[tokio::test]
async fn waiters_of_a_shared_fetch_keep_the_error_kind() {
    for (status, code, kind) in [
        (404, "BLOB_UNKNOWN", ErrorKind::NotFound),
        (401, "UNAUTHORIZED", ErrorKind::Unauthorized),
        (403, "DENIED", ErrorKind::Denied),
    ] {
        let t = tempfile::tempdir().unwrap();
        let c = cache(t.path());
        let (host, hits) = upstream(status, code).await;
        let img = image(&host);
        let d = Digest::sha256(b"layer");
        let (a, b) = futures::join!(c.ensure(&img, &d), c.ensure(&img, &d));
        for e in [a.unwrap_err(), b.unwrap_err()] {
            assert!(matches!(e, NodeError::Shared(_)), "{e:?}");
            assert_eq!(e.kind(), kind, "HTTP {status}: {e}");
            assert!(e.to_string().contains(d.as_str()), "{e}");
        }
        assert_eq!(c.upstream_fetches(), 1, "one fetch for both waiters");
        assert_eq!(hits.load(Ordering::SeqCst), 1, "HTTP {status}");
        assert!(!c.store().contains(&d));
    }
}

/// A local reference resolves only to a manifest pushed to that repository: neither
/// another repository's manifest nor one cached from upstream.
#[tokio::test]
async fn local_references_resolve_only_within_their_repository() {
    let t = tempfile::tempdir().unwrap();
    let c = cache(t.path());
    let cached = c.store().put(b"{}", None).unwrap();
    let e = c
        .resolve(&format!("local/anybody@{cached}"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains("local/anybody"), "{e}");
}

/// An upstream registry that serves `routes` (path → body) and answers anything else with
/// 404 BLOB_UNKNOWN; it records every path it was asked for.
async fn registry(routes: Vec<(String, Vec<u8>)>) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let asked = Arc::new(Mutex::new(Vec::new()));
    let log = asked.clone();
    let routes: Arc<HashMap<String, Vec<u8>>> = Arc::new(routes.into_iter().collect());
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let (log, routes) = (log.clone(), routes.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                log.lock().unwrap().push(path.clone());
                let (status, ctype, body) = match routes.get(&path) {
                    Some(b) => ("200 OK", "application/octet-stream", b.clone()),
                    None => (
                        "404 Not Found",
                        "application/json",
                        br#"{"errors":[{"code":"BLOB_UNKNOWN","message":"no"}]}"#.to_vec(),
                    ),
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nConnection: close\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(&body).await;
            });
        }
    });
    (host, asked)
}

fn asked(log: &Arc<Mutex<Vec<String>>>) -> Vec<String> {
    log.lock().unwrap().clone()
}

/// Bob's layer is in the store, fetched from bob's registry. Alice's image names its digest,
/// and her registry does not have it: for her it is fetched from her registry (and fails),
/// never served from what bob's fetch stored. Another repository of bob's registry is
/// another source too. Bob's own image still finds it without fetching again.
#[tokio::test]
async fn a_blob_counts_only_for_the_source_it_was_fetched_from() {
    let t = tempfile::tempdir().unwrap();
    let c = cache(t.path());
    let secret = b"bob's private layer".to_vec();
    let d = Digest::sha256(&secret);
    let path = format!("/v2/app/blobs/{d}");
    let (bob_host, bob_log) = registry(vec![(path.clone(), secret.clone())]).await;
    let (alice_host, alice_log) = registry(Vec::new()).await;
    let bob = image(&bob_host);
    c.ensure(&bob, &d).await.unwrap();
    assert_eq!(c.store().read(&d).unwrap(), secret);

    let e = c.ensure(&image(&alice_host), &d).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert_eq!(
        asked(&alice_log),
        std::slice::from_ref(&path),
        "alice's registry was not asked"
    );
    let mut elsewhere = image(&bob_host);
    elsewhere.repository = "other".into();
    let e = c.ensure(&elsewhere, &d).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");

    c.ensure(&bob, &d).await.unwrap();
    assert_eq!(
        asked(&bob_log),
        [path.clone(), format!("/v2/other/blobs/{d}")],
        "bob's image fetched its blob again"
    );
    assert_eq!(c.upstream_fetches(), 3);
    assert_eq!(
        c.store().read(&d).unwrap(),
        secret,
        "a failed fetch touched the blob"
    );
}

/// Manifests too: a manifest of the local store (or of another source) named as an upstream
/// image's manifest is fetched from that image's registry, by the manifests endpoint.
#[tokio::test]
async fn a_manifest_counts_only_for_its_source() {
    let t = tempfile::tempdir().unwrap();
    let c = cache(t.path());
    let md = c
        .store()
        .put_manifest("bob/secret", br#"{"schemaVersion":2}"#, None)
        .unwrap();
    let (alice_host, alice_log) = registry(Vec::new()).await;
    let mut alice = image(&alice_host);
    alice.manifest_digest = md.to_string();
    let e = c.ensure(&alice, &md).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert_eq!(asked(&alice_log), [format!("/v2/app/manifests/{md}")]);
}

/// A local image gets only what its repository holds, not another repository's blobs or
/// manifests in the same store.
#[tokio::test]
async fn a_local_image_gets_only_its_repository_blobs() {
    let t = tempfile::tempdir().unwrap();
    let c = cache(t.path());
    let up = c.store().temp_path();
    std::fs::write(&up, b"bob's secret layer").unwrap();
    let d = Digest::sha256(b"bob's secret layer");
    c.store().import_file(&up, &d, "bob/secret").unwrap();
    let md = c
        .store()
        .put_manifest("bob/secret", br#"{"schemaVersion":2}"#, None)
        .unwrap();
    let local = |repo: &str| ResolvedImage {
        reference: format!("local/{repo}:v1"),
        registry: "local".into(),
        repository: repo.into(),
        manifest_digest: md.to_string(),
        signatures: Vec::new(),
        index_digest: None,
    };
    for x in [&d, &md] {
        let e = c.ensure(&local("alice/app"), x).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
        assert!(e.to_string().contains("local/alice/app"), "{e}");
        c.ensure(&local("bob/secret"), x).await.unwrap();
    }
    assert_eq!(c.upstream_fetches(), 0);
}

/// However many ask at once, a blob is fetched once per source: two sources that both have
/// the bytes are each asked once, and afterwards neither again.
#[tokio::test]
async fn each_source_fetches_a_blob_once_however_many_ask() {
    let t = tempfile::tempdir().unwrap();
    let c = cache(t.path());
    let layer = vec![9u8; 200_000];
    let d = Digest::sha256(&layer);
    let path = format!("/v2/app/blobs/{d}");
    let (a_host, a_log) = registry(vec![(path.clone(), layer.clone())]).await;
    let (b_host, b_log) = registry(vec![(path.clone(), layer.clone())]).await;
    let (a, b) = (image(&a_host), image(&b_host));
    let all = futures::future::join_all([&a, &b, &a, &b, &a].map(|i| c.ensure(i, &d))).await;
    assert!(all.iter().all(|r| r.is_ok()), "{all:?}");
    c.ensure(&a, &d).await.unwrap();
    c.ensure(&b, &d).await.unwrap();
    assert_eq!(asked(&a_log), std::slice::from_ref(&path));
    assert_eq!(asked(&b_log), [path]);
    assert_eq!(c.upstream_fetches(), 2);
    assert!(c.store().has_source(&a.source(), &d) && c.store().has_source(&b.source(), &d));
}
