//! The local image store's `/v2/` API against real clients and a real upstream registry:
//! repository membership (nothing is served under a repository it was not pushed to, blobs
//! cached from upstream never), bounded uploads, `tags/list` with pagination and `skopeo
//! inspect`, and deploy statuses that keep the upstream error's kind. No sandbox is started:
//! the node runs with an empty pool. Needs root, docker-registry and skopeo.
#![allow(clippy::unwrap_used)]

use reqwest::StatusCode;
use std::sync::Arc;
use std::time::Duration;
use veil_gateway::{Gateway, GatewayConfig, LocalStoreConfig};
use veil_image::build::{assemble_image, Blob, BuiltImage};
use veil_image::manifest::{RunConfig, OCI_LAYER_TAR_GZIP, OCI_MANIFEST};
use veil_image::Digest;
use veil_node::{Node, NodeConfig};
use veil_testkit::{skopeo, TestRegistry};

struct Env {
    gw: Arc<Gateway>,
    url: String,
    /// The operator token, when the gateway requires one.
    token: Option<String>,
    http: reqwest::Client,
    _stop: tokio::sync::oneshot::Sender<()>,
    _state: tempfile::TempDir,
}

async fn up(local_store: LocalStoreConfig, cache_max_bytes: u64) -> Env {
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().join("state");
    std::fs::create_dir_all(&dir).unwrap();
    let mut ncfg = NodeConfig::with_state_dir(dir.clone());
    ncfg.pool_size = 0;
    ncfg.cache_max_bytes = cache_max_bytes;
    let node = Node::new(ncfg).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let gw = Gateway::new(
        node,
        GatewayConfig {
            listen: addr,
            host_suffix: String::new(),
            max_queue: 16,
            cold_start_timeout: Duration::from_secs(10),
            state_dir: dir.clone(),
            default_kbs_url: None,
            drain_timeout: Duration::from_secs(1),
            keep_alive_bin: Duration::from_secs(60),
            invocations: Default::default(),
            autoscale: Default::default(),
            local_store,
        },
    )
    .unwrap();
    let token = std::fs::read_to_string(dir.join("auth/operator.token"))
        .ok()
        .map(|t| t.trim().to_string());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let g = gw.clone();
    tokio::spawn(async move {
        let _ = veil_gateway::serve(g, listener, async move {
            let _ = rx.await;
        })
        .await;
    });
    Env {
        gw,
        url: format!("http://{addr}"),
        token,
        http: reqwest::Client::new(),
        _stop: tx,
        _state: state,
    }
}

impl Env {
    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let url = if path.starts_with("http") {
            path.to_string()
        } else {
            format!("{}{path}", self.url)
        };
        let rb = self.http.request(method, url);
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    async fn status(&self, method: reqwest::Method, path: &str) -> (StatusCode, String) {
        let r = self.req(method, path).send().await.unwrap();
        (r.status(), r.text().await.unwrap())
    }

    /// Start an upload in `repo`; its Location.
    async fn start_upload(&self, repo: &str) -> String {
        let r = self
            .req(reqwest::Method::POST, &format!("/v2/{repo}/blobs/uploads/"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        r.headers()["location"].to_str().unwrap().to_string()
    }

    /// Push a blob the way registry clients do: POST, PATCH, PUT ?digest=.
    async fn push_blob(&self, repo: &str, data: &[u8]) -> Digest {
        let d = Digest::sha256(data);
        let loc = self.start_upload(repo).await;
        let r = self
            .req(reqwest::Method::PATCH, &loc)
            .body(data.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::ACCEPTED,
            "{}",
            r.text().await.unwrap()
        );
        let loc = r.headers()["location"].to_str().unwrap().to_string();
        let r = self
            .req(reqwest::Method::PUT, &format!("{loc}?digest={d}"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::CREATED,
            "{}",
            r.text().await.unwrap()
        );
        d
    }

    async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        bytes: &[u8],
    ) -> (StatusCode, String) {
        let r = self
            .req(
                reqwest::Method::PUT,
                &format!("/v2/{repo}/manifests/{reference}"),
            )
            .header("content-type", OCI_MANIFEST)
            .body(bytes.to_vec())
            .send()
            .await
            .unwrap();
        (r.status(), r.text().await.unwrap())
    }

    async fn push_image(&self, repo: &str, tag: &str, image: &BuiltImage) {
        for b in std::iter::once(&image.config).chain(&image.layers) {
            self.push_blob(repo, &b.data).await;
        }
        let (s, body) = self.put_manifest(repo, tag, &image.manifest.data).await;
        assert_eq!(s, StatusCode::CREATED, "{body}");
    }

    async fn deploy(&self, name: &str, image: &str) -> (StatusCode, String) {
        let r = self
            .req(reqwest::Method::PUT, &format!("/v1/functions/{name}"))
            .json(&serde_json::json!({ "image": image }))
            .send()
            .await
            .unwrap();
        (r.status(), r.text().await.unwrap())
    }

    fn tmp_files(&self) -> usize {
        std::fs::read_dir(self._state.path().join("state/store/tmp"))
            .unwrap()
            .count()
    }
}

fn gz_layer(name: &str, content: &[u8]) -> Blob {
    let mut data = Vec::new();
    {
        let gz = flate2::write::GzEncoder::new(&mut data, flate2::Compression::fast());
        let mut b = tar::Builder::new(gz);
        let mut h = tar::Header::new_gnu();
        h.set_size(content.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_cksum();
        b.append_data(&mut h, name, content).unwrap();
        b.into_inner().unwrap().finish().unwrap();
    }
    Blob::new(OCI_LAYER_TAR_GZIP, data)
}

fn image(marker: &str) -> BuiltImage {
    assemble_image(
        vec![gz_layer("marker", marker.as_bytes())],
        &RunConfig {
            entrypoint: vec!["/hello".into()],
            ..RunConfig::default()
        },
    )
    .unwrap()
}

fn code(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["errors"][0]["code"].as_str().map(String::from))
        .unwrap_or_default()
}

const GET: reqwest::Method = reqwest::Method::GET;
const HEAD: reqwest::Method = reqwest::Method::HEAD;

/// A layer the node cached from a private upstream registry for another tenant's function
/// is not served under any repository name, cannot be mounted, claimed by digest or named by
/// a manifest; pushing its bytes for real does work. Local blobs appear only under the
/// repository they were pushed to, and an upload id only works in its own repository.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_are_served_only_under_the_repository_they_were_pushed_to() {
    let reg = TestRegistry::start().unwrap();
    let upstream = image("tenant b's private layer");
    let client = veil_cli::images::registry_client(&[]).unwrap();
    let target: veil_image::Reference = format!("{}/b/private:v1", reg.host()).parse().unwrap();
    veil_cli::images::push(&client, &upstream, &target)
        .await
        .unwrap();

    let env = up(LocalStoreConfig::default(), 10 << 30).await;
    // The node caches tenant b's image for a deployment.
    let cache = env.gw.node().cache().clone();
    let resolved = cache.resolve(&target.to_string()).await.unwrap();
    for (d, _) in cache.manifest_blobs(&resolved).unwrap() {
        cache.ensure(&resolved, &d).await.unwrap();
    }
    let layer = &upstream.layers[0].digest;
    assert!(cache.store().contains(layer));

    for repo in ["anybody", "b/private", "local/stolen"] {
        for m in [GET, HEAD] {
            let (s, body) = env
                .status(m.clone(), &format!("/v2/{repo}/blobs/{layer}"))
                .await;
            assert_eq!(s, StatusCode::NOT_FOUND, "{m} {repo}: {body}");
        }
        let (s, body) = env
            .status(
                GET,
                &format!("/v2/{repo}/manifests/{}", upstream.manifest.digest),
            )
            .await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{repo}: {body}");
        assert_eq!(code(&body), "MANIFEST_UNKNOWN");
    }
    // A mount from a repository that does not hold it only opens an ordinary upload.
    let r = env
        .req(
            reqwest::Method::POST,
            &format!("/v2/stolen/blobs/uploads/?mount={layer}&from=b/private"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let session = r.headers()["location"].to_str().unwrap().to_string();
    let (s, _) = env.status(reqwest::Method::DELETE, &session).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "cancelling the upload");
    // A monolithic push of the digest without its bytes proves nothing.
    let (s, body) = env
        .status(
            reqwest::Method::POST,
            &format!("/v2/stolen/blobs/uploads/?digest={layer}"),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(code(&body), "DIGEST_INVALID");
    // A manifest naming blobs the repository does not hold is refused and stores nothing.
    let (s, body) = env
        .put_manifest("stolen", "v1", &upstream.manifest.data)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(code(&body), "MANIFEST_BLOB_UNKNOWN", "{body}");
    let (s, _) = env.status(GET, "/v2/stolen/manifests/v1").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, body) = env.status(GET, "/v2/stolen/tags/list").await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(code(&body), "NAME_UNKNOWN");
    // Nor does a deployment reach the cached manifest through a local name.
    let (s, body) = env
        .deploy(
            "thief",
            &format!("local/anybody@{}", upstream.manifest.digest),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(env.tmp_files(), 0, "refused uploads left files behind");

    // Pushing the bytes for real makes them the repository's.
    env.push_image("mine", "v1", &upstream).await;
    let r = env
        .req(GET, &format!("/v2/mine/blobs/{layer}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap(), upstream.layers[0].data);
    let (s, _) = env.status(GET, "/v2/mine/manifests/v1").await;
    assert_eq!(s, StatusCode::OK);
    // Still only there.
    let (s, _) = env.status(GET, &format!("/v2/other/blobs/{layer}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // A mount from a repository that holds the blob works.
    let r = env
        .req(
            reqwest::Method::POST,
            &format!("/v2/friend/blobs/uploads/?mount={layer}&from=mine"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let (s, _) = env.status(HEAD, &format!("/v2/friend/blobs/{layer}")).await;
    assert_eq!(s, StatusCode::OK);

    // An upload id belongs to its repository.
    let loc = env.start_upload("mine").await;
    let id = loc.rsplit('/').next().unwrap();
    for m in [reqwest::Method::PATCH, reqwest::Method::PUT] {
        let r = env
            .req(
                m.clone(),
                &format!("/v2/other/blobs/uploads/{id}?digest={layer}"),
            )
            .body(upstream.layers[0].data.clone())
            .send()
            .await
            .unwrap();
        let s = r.status();
        let body = r.text().await.unwrap();
        assert_eq!(s, StatusCode::NOT_FOUND, "{m}: {body}");
        assert_eq!(code(&body), "BLOB_UPLOAD_UNKNOWN");
    }
    let (s, _) = env.status(GET, &format!("/v2/other/blobs/{layer}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // …and still works where it was started.
    let (s, _) = env.status(GET, &loc).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
}

/// A blob larger than the configured limit is refused with 413 SIZE_INVALID whether its size
/// is announced or not; the partial file is deleted and the upload id is gone. Uploads in
/// progress count against the store bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_bounded_in_size_and_by_the_store() {
    let env = up(
        LocalStoreConfig {
            max_blob_bytes: 1 << 20,
            ..LocalStoreConfig::default()
        },
        (5 << 20) / 2,
    )
    .await;
    let big = vec![0u8; (1 << 20) + 1];

    // Announced: refused before a byte is stored.
    let loc = env.start_upload("app").await;
    let r = env
        .req(reqwest::Method::PATCH, &loc)
        .body(big.clone())
        .send()
        .await;
    // The server answers (and closes) before reading the body, so the client may see its
    // write fail instead of the answer. Either way nothing is stored, and the answer says the
    // connection is closed, so that the client does not send its next request down it.
    if let Ok(r) = r {
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(r.headers()["connection"], "close");
        assert_eq!(code(&r.text().await.unwrap()), "SIZE_INVALID");
    }
    let (s, body) = env.status(reqwest::Method::PATCH, &loc).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(code(&body), "BLOB_UPLOAD_UNKNOWN");

    // Streamed without a length, in chunks that each fit: refused when the total passes.
    let loc = env.start_upload("app").await;
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..5).map(|_| Ok(vec![1u8; 256 << 10])).collect();
    let r = env
        .req(reqwest::Method::PATCH, &loc)
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await;
    if let Ok(r) = r {
        // The server may answer before the client finished sending.
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }
    let (s, _) = env.status(GET, &loc).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Monolithic.
    let r = env
        .req(
            reqwest::Method::POST,
            &format!("/v2/app/blobs/uploads/?digest={}", Digest::sha256(&big)),
        )
        .body(big.clone())
        .send()
        .await;
    if let Ok(r) = r {
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }
    assert_eq!(env.tmp_files(), 0, "partial uploads were not deleted");

    // Two uploads in progress of 1 MiB each fit a 2.5 MiB bound, a third does not.
    let part = vec![2u8; 1 << 20];
    let mut open = Vec::new();
    for _ in 0..2 {
        let loc = env.start_upload("app").await;
        let r = env
            .req(reqwest::Method::PATCH, &loc)
            .body(part.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        open.push(loc);
    }
    let loc = env.start_upload("app").await;
    let r = env
        .req(reqwest::Method::PATCH, &loc)
        .body(part.clone())
        .send()
        .await;
    // As above: the refusal may come before the body is read.
    if let Ok(r) = r {
        assert_eq!(r.status(), StatusCode::INSUFFICIENT_STORAGE);
        assert!(r.text().await.unwrap().contains("store is full"));
    }
    let (s, _) = env.status(GET, &loc).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "a refused upload must be gone");
    // Finishing one gives its share back.
    let r = env
        .req(
            reqwest::Method::PUT,
            &format!("{}?digest={}", open[0], Digest::sha256(&part)),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let d = env.push_blob("app", &[3u8; 1 << 20]).await;
    let (s, _) = env.status(HEAD, &format!("/v2/app/blobs/{d}")).await;
    assert_eq!(s, StatusCode::OK);
}

/// Finished pushes count against the local store's bound, not just uploads in progress:
/// with a 2 MiB store (and a 1 MiB cache, 512 KiB blobs), twelve monolithic pushes of 400 KiB
/// fill it after five and the rest are refused with 507, storing nothing; chunked uploads and
/// manifests are refused the same way once it is full, while re-tagging a manifest the
/// repository holds still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_pushes_count_against_the_local_store_bound() {
    let limit: u64 = 2 << 20;
    let env = up(
        LocalStoreConfig {
            max_blob_bytes: 512 << 10,
            max_store_bytes: limit,
            ..LocalStoreConfig::default()
        },
        1 << 20,
    )
    .await;
    let mut stored = 0u64;
    let mut pushed = Vec::new();
    for i in 0..12u8 {
        let data = vec![i; 400 << 10];
        let d = Digest::sha256(&data);
        // The server may refuse before it has read the body: no connection reuse after that.
        let r = env
            .req(
                reqwest::Method::POST,
                &format!("/v2/app/blobs/uploads/?digest={d}"),
            )
            .header("connection", "close")
            .body(data.clone())
            .send()
            .await;
        let fits = stored + data.len() as u64 <= limit;
        match r {
            Ok(r) => {
                let status = r.status();
                let body = r.text().await.unwrap_or_default();
                if fits {
                    assert_eq!(status, StatusCode::CREATED, "push {i}: {body}");
                } else {
                    assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE, "push {i}: {body}");
                    assert!(body.contains("local image store is full"), "{body}");
                }
            }
            Err(e) => assert!(!fits, "push {i}: {e}"),
        }
        let (head, _) = env.status(HEAD, &format!("/v2/app/blobs/{d}")).await;
        if fits {
            assert_eq!(head, StatusCode::OK);
            stored += data.len() as u64;
            pushed.push(d);
        } else {
            assert_eq!(
                head,
                StatusCode::NOT_FOUND,
                "a refused push stored its blob"
            );
        }
    }
    assert_eq!(pushed.len(), 5);
    assert_eq!(env.tmp_files(), 0, "refused pushes left files behind");
    assert_eq!(env.gw.node().cache().store().local_bytes(), stored);

    // An image manifest of what was pushed, then a blob that leaves 10 bytes of room.
    let config = env.push_blob("app", b"{}").await;
    let manifest = |note: &str| {
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": veil_image::manifest::OCI_CONFIG, "digest": config, "size": 2},
            "layers": [{"mediaType": OCI_LAYER_TAR_GZIP, "digest": pushed[0], "size": 400 << 10}],
            "annotations": {"note": note},
        }))
        .unwrap()
    };
    let first = manifest("first");
    let (s, body) = env.put_manifest("app", "v1", &first).await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    stored += 2 + first.len() as u64;
    let fill = vec![0xffu8; (limit - stored - 10) as usize];
    env.push_blob("app", &fill).await;

    let loc = env.start_upload("app").await;
    let r = env
        .req(reqwest::Method::PATCH, &loc)
        .header("connection", "close")
        .body(vec![7u8; 20])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::INSUFFICIENT_STORAGE);
    let (s, _) = env.status(GET, &loc).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "the refused upload lives on");
    let (s, body) = env.put_manifest("app", "v2", &manifest("second")).await;
    assert_eq!(s, StatusCode::INSUFFICIENT_STORAGE, "{body}");
    let (s, _) = env.status(GET, "/v2/app/manifests/v2").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, body) = env.put_manifest("app", "again", &first).await;
    assert_eq!(s, StatusCode::CREATED, "re-tagging: {body}");
    assert_eq!(env.tmp_files(), 0);
}

/// `skopeo inspect` of a local image works (it lists the repository's tags), and `tags/list`
/// pages with `n` and `last` and a `Link: rel="next"` header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_inspects_local_images_and_tags_are_paginated() {
    let env = up(LocalStoreConfig::default(), 10 << 30).await;
    let img = image("inspect me");
    env.push_image("team/app", "v1", &img).await;
    for tag in ["v2", "latest", "v10", "a", "b"] {
        let (s, body) = env.put_manifest("team/app", tag, &img.manifest.data).await;
        assert_eq!(s, StatusCode::CREATED, "{body}");
    }

    let host = env.url.trim_start_matches("http://").to_string();
    let creds = env.token.as_ref().map(|t| format!("x:{t}"));
    let mut args = vec!["inspect", "--tls-verify=false"];
    if let Some(c) = &creds {
        args.extend(["--creds", c.as_str()]);
    }
    let reference = format!("docker://{host}/team/app:v1");
    args.push(&reference);
    let out = skopeo(&args).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["Digest"], img.manifest.digest.to_string(), "{out}");
    let mut tags: Vec<String> = v["RepoTags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    tags.sort();
    assert_eq!(tags, ["a", "b", "latest", "v1", "v10", "v2"], "{out}");

    // Pages of two, following Link headers.
    let mut seen = Vec::new();
    let mut next = Some("/v2/team/app/tags/list?n=2".to_string());
    let mut pages = 0;
    while let Some(path) = next.take() {
        let r = env.req(GET, &path).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        next = r.headers().get("link").map(|l| {
            let l = l.to_str().unwrap();
            assert!(l.ends_with("; rel=\"next\""), "{l}");
            l.trim_start_matches('<')
                .split('>')
                .next()
                .unwrap()
                .to_string()
        });
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["name"], "team/app");
        let page: Vec<String> = v["tags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect();
        assert!(page.len() <= 2);
        seen.extend(page);
        pages += 1;
    }
    assert_eq!(seen, ["a", "b", "latest", "v1", "v10", "v2"]);
    assert_eq!(pages, 3);
    let v: serde_json::Value = env
        .req(GET, "/v2/team/app/tags/list?n=10&last=v1")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["tags"], serde_json::json!(["v10", "v2"]));
    let (s, body) = env.status(GET, "/v2/team/app/tags/list?n=x").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
}

/// A deploy keeps the upstream error's kind: a missing image is 404, a registry that refuses
/// the node 403 (not a generic 502).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_statuses_follow_the_upstream_error() {
    let reg = TestRegistry::start().unwrap();
    // A registry that wants credentials the node does not have.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let private = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = sock.read(&mut buf).await;
                let body =
                    r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#;
                let resp = format!(
                    "HTTP/1.1 401 Unauthorized\r\nConnection: close\r\nWWW-Authenticate: Basic realm=\"private\"\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    });
    let env = up(LocalStoreConfig::default(), 10 << 30).await;
    let (s, body) = env
        .deploy("missing", &format!("{}/nobody/here:v1", reg.host()))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{body}");
    assert!(body.contains("IMAGE_NOT_FOUND"), "{body}");
    let (s, body) = env
        .deploy("private", &format!("{private}/team/app:v1"))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("IMAGE_ACCESS_DENIED"), "{body}");
}
