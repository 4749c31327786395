//! Isolation between tenants where they share the node: the blob directory (a tenant's
//! layers are never served to another tenant's sandbox because its image names their
//! digest). Each test plays the attacker against a real `veil up` (in process) with real
//! namespace sandboxes and the real agent. Needs root and docker-registry.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use veil_cli::client::AdminClient;
use veil_cli::{images, Platform, UpOptions};
use veil_gateway::DeployRequest;
use veil_image::build::{assemble_image, Blob, BuiltImage};
use veil_image::manifest::{RunConfig, OCI_LAYER_TAR_GZIP, OCI_MANIFEST};
use veil_image::Reference;
use veil_testkit::TestRegistry;

async fn up(drain_timeout: Duration) -> (Platform, tempfile::TempDir) {
    let state = tempfile::tempdir().unwrap();
    let mut opts = UpOptions::defaults(state.path().join("state"));
    opts.listen = "127.0.0.1:0".parse().unwrap();
    opts.pool_size = 1;
    opts.drain_timeout = drain_timeout;
    let p = Platform::start(opts).await.unwrap();
    (p, state)
}

/// A tenant: its admin client and its registry client for the local store.
struct Tenant {
    name: &'static str,
    admin: AdminClient,
    registry: veil_registry::RegistryClient,
}

async fn tenant(p: &Platform, name: &'static str) -> Tenant {
    let token = p
        .admin_client()
        .unwrap()
        .create_token(name)
        .await
        .unwrap()
        .token;
    Tenant {
        name,
        admin: AdminClient::new(&p.url()).unwrap().with_token(&token),
        registry: images::registry_client_with_token(&[], &p.url(), &token).unwrap(),
    }
}

fn gz_layer(entries: &[(&str, &[u8])]) -> Blob {
    let mut data = Vec::new();
    {
        let gz = flate2::write::GzEncoder::new(&mut data, flate2::Compression::fast());
        let mut b = tar::Builder::new(gz);
        for (name, content) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(content.len() as u64);
            h.set_mode(0o755);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_cksum();
            b.append_data(&mut h, name, *content).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap();
    }
    Blob::new(OCI_LAYER_TAR_GZIP, data)
}

fn image(layers: Vec<Blob>) -> BuiltImage {
    assemble_image(
        layers,
        &RunConfig {
            entrypoint: vec!["/hello".into()],
            ..RunConfig::default()
        },
    )
    .unwrap()
}

fn hello_layer() -> Blob {
    gz_layer(&[("hello", veil_cli::HELLO_BINARY)])
}

/// Push `img` as `local/<repo_tag>` with `t`'s token; the reference to deploy.
async fn push_local(p: &Platform, t: &Tenant, repo_tag: &str, img: &BuiltImage) -> String {
    let reference: Reference = format!("local/{repo_tag}").parse().unwrap();
    let target = images::push_target(&reference, &p.url()).unwrap();
    images::push(&t.registry, img, &target).await.unwrap();
    reference.to_string()
}

fn deploy_as(t: &Tenant, image: &str) -> DeployRequest {
    let mut req = DeployRequest::new(image);
    req.tenant = Some(t.name.into());
    req
}

fn text(r: &veil_cli::client::Invocation) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

/// A registry that serves `blobs` (digest → bytes) and one manifest under `repo:tag` and by
/// its digest, answers 404 BLOB_UNKNOWN for anything else, and records every path asked for:
/// an attacker's registry that names digests it does not have.
async fn fake_registry(
    repo: &str,
    tag: &str,
    img: &BuiltImage,
    blobs: &[&Blob],
) -> (String, Arc<Mutex<Vec<String>>>) {
    let mut routes: HashMap<String, (&'static str, Vec<u8>)> = HashMap::new();
    for b in blobs {
        routes.insert(
            format!("/v2/{repo}/blobs/{}", b.digest),
            ("application/octet-stream", b.data.clone()),
        );
    }
    for r in [tag.to_string(), img.manifest.digest.to_string()] {
        routes.insert(
            format!("/v2/{repo}/manifests/{r}"),
            (OCI_MANIFEST, img.manifest.data.clone()),
        );
    }
    let routes = Arc::new(routes);
    let asked = Arc::new(Mutex::new(Vec::new()));
    let log = asked.clone();
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
        let (routes, log) = (routes.clone(), log.clone());
        async move {
            use axum::response::IntoResponse;
            log.lock().unwrap().push(uri.path().to_string());
            match routes.get(uri.path()) {
                Some((ctype, body)) => {
                    ([(axum::http::header::CONTENT_TYPE, *ctype)], body.clone()).into_response()
                }
                None => (
                    axum::http::StatusCode::NOT_FOUND,
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    r#"{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown"}]}"#,
                )
                    .into_response(),
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (host, asked)
}

/// Bob's layers are in the node's shared blob directory: one pushed to his local repository,
/// one cached from his upstream repository when his function started. Alice runs a registry
/// whose manifest names each of those digests (it does not have the bytes and answers 404)
/// next to her own layer, and deploys it. The node must fetch the layer from her registry —
/// a digest proves nothing — so her cold start fails and bob's files never reach her
/// function. Her honest image from the same registry runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_digest_named_in_a_foreign_manifest_does_not_serve_another_tenants_layer() {
    let (p, _state) = up(Duration::from_secs(5)).await;
    let op = p.admin_client().unwrap();
    let bob = tenant(&p, "bob").await;
    let alice = tenant(&p, "alice").await;

    // Bob's local secret, and his upstream image with another secret, run once so the node
    // caches its layers.
    let local_secret = gz_layer(&[("bob-local-secret", b"bob's local store secret")]);
    let local = push_local(
        &p,
        &bob,
        "bobsecret:v1",
        &image(vec![hello_layer(), local_secret.clone()]),
    )
    .await;
    let reg = TestRegistry::start().unwrap();
    let upstream_secret = gz_layer(&[("bob-upstream-secret", b"bob's upstream secret")]);
    let bob_upstream = image(vec![hello_layer(), upstream_secret.clone()]);
    let bob_ref: Reference = format!("{}/bob/private:v1", reg.host()).parse().unwrap();
    images::push(
        &images::registry_client(&[]).unwrap(),
        &bob_upstream,
        &bob_ref,
    )
    .await
    .unwrap();
    for (name, img) in [
        ("bob-local", local.clone()),
        ("bob-up", bob_ref.to_string()),
    ] {
        bob.admin
            .deploy(name, &deploy_as(&bob, &img))
            .await
            .unwrap();
        let r = op
            .invoke(name, "GET", "/whoami", Vec::new(), &BTreeMap::new())
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", text(&r));
        assert!(text(&r).contains("bob-"), "{}", text(&r));
    }
    let store = p.gateway.node().cache().store().clone();
    assert!(store.contains(&local_secret.digest) && store.contains(&upstream_secret.digest));

    // Alice's honest image from her registry works (so what fails below is the stolen layer).
    let own = hello_layer();
    let honest = image(vec![own.clone()]);
    let (host, _) = fake_registry("alice/honest", "v1", &honest, &[&own, &honest.config]).await;
    let honest_ref = format!("{host}/alice/honest:v1");
    alice
        .admin
        .deploy("honest", &deploy_as(&alice, &honest_ref))
        .await
        .unwrap();
    let r = op
        .invoke("honest", "GET", "/whoami", Vec::new(), &BTreeMap::new())
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", text(&r));
    alice.admin.delete("honest").await.unwrap();

    for (name, stolen) in [("evil-local", &local_secret), ("evil-up", &upstream_secret)] {
        let evil = image(vec![own.clone(), stolen.clone()]);
        let (host, asked) = fake_registry("evil/app", "v1", &evil, &[&own, &evil.config]).await;
        let evil_ref = format!("{host}/evil/app:v1");
        let deployed = alice
            .admin
            .deploy(name, &deploy_as(&alice, &evil_ref))
            .await;
        if deployed.is_ok() {
            let r = op
                .invoke(name, "GET", "/whoami", Vec::new(), &BTreeMap::new())
                .await
                .unwrap();
            let body = text(&r);
            assert!(
                !body.contains("bob-"),
                "{name}: alice's function read bob's layer: {body}"
            );
            assert_ne!(r.status, 200, "{name}: the cold start succeeded: {body}");
            assert!(body.contains(stolen.digest.as_str()), "{name}: {body}");
            let logs = format!("{:?}", alice.admin.logs(name, 500).await.unwrap());
            assert!(!logs.contains("bob-"), "{name}: {logs}");
        }
        // The node asked her registry for the layer instead of serving its own copy.
        let stolen_path = format!("/v2/evil/app/blobs/{}", stolen.digest);
        assert!(
            deployed.is_err() || asked.lock().unwrap().contains(&stolen_path),
            "{name}: {:?}",
            asked.lock().unwrap()
        );
    }
    // Bob's own functions still get their layers.
    let r = op
        .invoke("bob-up", "GET", "/whoami", Vec::new(), &BTreeMap::new())
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", text(&r));
    p.stop().await.unwrap();
}
