//! Isolation between tenants where they share the node: the blob directory (a tenant's
//! layers are never served to another tenant's sandbox because its image names their
//! digest) and function names (logs of a deleted function and of a new one of the same name
//! stay apart). Each test plays the attacker against a real `veil up` (in process) with real
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

/// Poll `t`'s logs of `name` until a line contains `needle` (the agent forwards output
/// asynchronously); the lines read last.
async fn logs_until(t: &Tenant, name: &str, needle: &str) -> String {
    let mut logs = String::new();
    for _ in 0..200 {
        logs = format!("{:?}", t.admin.logs(name, 500).await.unwrap());
        if logs.contains(needle) {
            return logs;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "{needle:?} never reached {}'s logs of {name}: {logs}",
        t.name
    );
}

/// Alice deletes `shared` while a request keeps her instance draining; bob deploys his own
/// `shared` at once. Bob's logs hold only his lines (none of alice's request paths), and when
/// alice's drain ends, her delete forgets her logs, not bob's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_of_a_function_name_reused_by_another_tenant_stay_apart() {
    let (p, _state) = up(Duration::from_secs(120)).await;
    let op = p.admin_client().unwrap();
    let alice = tenant(&p, "alice").await;
    let bob = tenant(&p, "bob").await;
    let hello = image(vec![hello_layer()]);
    let alice_img = push_local(&p, &alice, "alice-hello:v1", &hello).await;
    let bob_img = push_local(&p, &bob, "bob-hello:v1", &hello).await;

    alice
        .admin
        .deploy("shared", &deploy_as(&alice, &alice_img))
        .await
        .unwrap();
    let r = op
        .invoke(
            "shared",
            "GET",
            "/alice-private-path",
            Vec::new(),
            &BTreeMap::new(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", text(&r));
    logs_until(&alice, "shared", "/alice-private-path").await;

    // A request that keeps alice's instance busy, so her delete drains.
    let slow = {
        let op = p.admin_client().unwrap();
        tokio::spawn(async move {
            op.invoke(
                "shared",
                "GET",
                "/sleep/60000",
                Vec::new(),
                &BTreeMap::new(),
            )
            .await
        })
    };
    let alice_sandbox = loop {
        let s = op.list().await.unwrap();
        let s = s.iter().find(|s| s.record.name == "shared").unwrap();
        if s.inflight > 0 {
            break s.instances[0].clone();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let deleting = {
        let admin = alice.admin.clone();
        tokio::spawn(async move { admin.delete("shared").await })
    };
    // Alice's deployment is gone at once (her instance drains): bob takes the name.
    while op
        .list()
        .await
        .unwrap()
        .iter()
        .any(|s| s.record.name == "shared")
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!deleting.is_finished(), "alice's drain ended early");
    bob.admin
        .deploy("shared", &deploy_as(&bob, &bob_img))
        .await
        .unwrap();
    let r = op
        .invoke("shared", "GET", "/bob-path", Vec::new(), &BTreeMap::new())
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", text(&r));
    let logs = logs_until(&bob, "shared", "/bob-path").await;
    assert!(
        !logs.contains("alice-private-path"),
        "bob reads alice's logs: {logs}"
    );

    // End alice's drain: her sandbox dies, the slow request fails, her delete completes.
    let sandboxes = op.sandboxes().await.unwrap();
    let pids: Vec<u64> = sandboxes
        .iter()
        .filter(|s| s["id"] == alice_sandbox.as_str())
        .flat_map(|s| s["pids"].as_array().cloned().unwrap_or_default())
        .map(|p| p.as_u64().unwrap())
        .collect();
    assert!(!pids.is_empty(), "{sandboxes:?}");
    // Some of them may end by themselves meanwhile (kill then fails for those): what matters
    // is that the sandbox goes, which the delete below waits for.
    let _ = std::process::Command::new("kill")
        .arg("-KILL")
        .args(pids.iter().map(|p| p.to_string()))
        .status()
        .unwrap();
    let _ = slow.await.unwrap();
    deleting.await.unwrap().unwrap();
    let logs = format!("{:?}", bob.admin.logs("shared", 500).await.unwrap());
    assert!(
        logs.contains("/bob-path"),
        "alice's delete cleared bob's logs: {logs}"
    );
    assert!(!logs.contains("alice-private-path"), "{logs}");
    bob.admin.delete("shared").await.unwrap();
    p.stop().await.unwrap();
}
