//! Holes a hostile tester found, closed: each test plays the attacker against a real `veil up`
//! (in process) with its embedded broker, real namespace sandboxes and the real agent.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};
use veil_cli::{images, Platform, UpOptions};
use veil_gateway::DeployRequest;
use veil_image::Reference;

async fn up() -> (Platform, tempfile::TempDir) {
    let state = tempfile::tempdir().unwrap();
    let mut opts = UpOptions::defaults(state.path().join("state"));
    opts.listen = "127.0.0.1:0".parse().unwrap();
    opts.pool_size = 1;
    let p = Platform::start(opts).await.unwrap();
    (p, state)
}

async fn push_hello(p: &Platform, repo_tag: &str) -> String {
    push_hello_with(p, &p.registry_client().unwrap(), repo_tag).await
}

async fn push_hello_with(
    p: &Platform,
    client: &veil_registry::RegistryClient,
    repo_tag: &str,
) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = tmp.path().join("ctx");
    images::write_example(&ctx).unwrap();
    let mut spec = images::example_spec(&ctx);
    spec.entrypoint = vec!["/hello".into()];
    let image = veil_image::build::build_image(&spec).unwrap();
    let reference: Reference = format!("local/{repo_tag}").parse().unwrap();
    let target = images::push_target(&reference, &p.url()).unwrap();
    images::push(client, &image, &target).await.unwrap();
    reference.to_string()
}

/// A plain local process sends made-up software-TEE evidence naming a tenant to the embedded
/// broker: it gets nothing, whether the evidence is unendorsed or endorsed by a key it made
/// itself. A sandbox the node started gets its tenant's secret, and only once that tenant has
/// opted in to the software TEE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_software_evidence_gets_no_secret_from_the_embedded_broker() {
    let (p, _state) = up().await;
    let kbs = p.kbs.clone().unwrap();
    kbs.set_resource("b/app/token", b"tenant-b-secret").unwrap();
    kbs.set_resource("default/app/token", b"default-secret")
        .unwrap();

    let rogue = veil_attest::software::HostKey::generate();
    for tenant in ["b", "default"] {
        let cred = rogue.endorse(
            "sb-fake",
            tenant,
            "f",
            SystemTime::now(),
            Duration::from_secs(600),
        );
        let attester = veil_attest::software::SoftwareAttester::new("ab", "", &cred).unwrap();
        let mut client = veil_kbs::KbsClient::new(veil_kbs::ReqwestTransport::new(p.url()));
        let init = veil_kbs::veil_init_data(&serde_json::json!({"tenant": tenant,
            "function": "f", "image_digest": format!("sha256:{}", "0".repeat(64))}))
        .unwrap();
        let err = client.attest(&attester, Some(&init)).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("not endorsed by a host this broker trusts"),
            "{err}"
        );
        assert!(client
            .get_resource(&format!("{tenant}/app/token"))
            .await
            .is_err());
    }

    // A real sandbox of tenant b: refused until b opts in, then served.
    let admin = p.admin_client().unwrap();
    let b_token = admin.create_token("b").await.unwrap().token;
    let b_reg = images::registry_client_with_token(&[], &p.url(), &b_token).unwrap();
    let image = push_hello_with(&p, &b_reg, "b-hello:v1").await;
    let mut req = DeployRequest::new(&image);
    req.tenant = Some("b".into());
    req.secrets
        .insert("TOKEN".into(), "kbs:///b/app/token".into());
    req.allow_insecure_software_tee = true;
    admin.deploy("bfn", &req).await.unwrap();
    let r = admin
        .invoke("bfn", "GET", "/env/TOKEN", Vec::new(), &BTreeMap::new())
        .await
        .unwrap();
    let body = String::from_utf8_lossy(&r.body).into_owned();
    assert_eq!(r.status, 502, "{body}");
    assert!(body.contains("has not opted in"), "{body}");

    kbs.set_reference_values(
        veil_kbs::SOFTWARE_TEE_TENANTS,
        &["default".into(), "b".into()],
    )
    .unwrap();
    admin.deploy("bfn", &req).await.unwrap();
    let r = admin
        .invoke("bfn", "GET", "/env/TOKEN", Vec::new(), &BTreeMap::new())
        .await
        .unwrap();
    let body = String::from_utf8_lossy(&r.body).into_owned();
    assert_eq!(r.status, 200, "{body}");
    assert_eq!(body, "TOKEN=tenant-b-secret\n");
    admin.delete("bfn").await.unwrap();
    p.stop().await.unwrap();
}

/// The admin API and the local store need a token; a tenant token reaches only that tenant's
/// functions and repositories, and cannot deploy as another tenant (which is how a secret of
/// tenant b could be read through a function).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_reach_only_their_own_functions_and_repositories() {
    let (p, _state) = up().await;
    let http = reqwest::Client::new();
    let url = p.url();
    for (method, path) in [
        ("GET", "/v1/functions"),
        ("PUT", "/v1/functions/x"),
        ("GET", "/v1/sandboxes"),
        ("POST", "/v1/tokens"),
        ("GET", "/v2/"),
        ("POST", "/v2/hello/blobs/uploads/"),
    ] {
        let r = http
            .request(method.parse().unwrap(), format!("{url}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{method} {path}");
        assert!(
            r.headers().contains_key("www-authenticate"),
            "{method} {path}"
        );
    }
    // Health and metrics stay open on loopback.
    for path in ["/healthz", "/metrics"] {
        let r = http.get(format!("{url}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }

    let op = p.admin_client().unwrap();
    let image = push_hello(&p, "opsimg:v1").await;
    op.deploy("opsfn", &DeployRequest::new(&image))
        .await
        .unwrap();
    let a = op.create_token("a").await.unwrap();
    let b = op.create_token("b").await.unwrap();
    let as_a = veil_cli::client::AdminClient::new(&url)
        .unwrap()
        .with_token(&a.token);
    let as_b = veil_cli::client::AdminClient::new(&url)
        .unwrap()
        .with_token(&b.token);

    // Tenant a pushes its own repository; b can neither read nor overwrite it.
    let refused = |m: &str| {
        m.contains("HTTP 403")
            || m.contains("belongs to another tenant")
            || m.contains("HTTP 404")
            || m.contains("does not belong to tenant")
            || m.contains("belongs to tenant")
    };
    let a_reg = images::registry_client_with_token(&[], &url, &a.token).unwrap();
    let b_reg = images::registry_client_with_token(&[], &url, &b.token).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let ctx = tmp.path().join("ctx");
    images::write_example(&ctx).unwrap();
    let mut spec = images::example_spec(&ctx);
    spec.entrypoint = vec!["/hello".into()];
    let built = veil_image::build::build_image(&spec).unwrap();
    let a_ref: Reference = "local/a-app:v1".parse().unwrap();
    let target = images::push_target(&a_ref, &url).unwrap();
    images::push(&a_reg, &built, &target).await.unwrap();
    let e = images::push(&p.registry_client().unwrap(), &built, &target)
        .await
        .unwrap_err();
    assert!(
        refused(&format!("{e:#}")),
        "the operator overwrote a tenant's repository: {e:#}"
    );
    let e = images::push(&b_reg, &built, &target).await.unwrap_err();
    assert!(refused(&format!("{e:#}")), "{e:#}");
    let e = b_reg.resolve_image(&target).await.unwrap_err();
    assert!(refused(&e.to_string()), "{e}");
    let e = images::push(
        &b_reg,
        &built,
        &images::push_target(&"local/opsimg:v2".parse().unwrap(), &url).unwrap(),
    )
    .await
    .unwrap_err();
    assert!(refused(&format!("{e:#}")), "{e:#}");

    // Ownership is checked on the repository the registry itself parses from the path: tenant
    // a owning `team` gets nothing of b's `team/blobs/app` (whose path starts like `team`'s).
    let team_app = images::push_target(&"local/team/blobs/app:v1".parse().unwrap(), &url).unwrap();
    images::push(&b_reg, &built, &team_app).await.unwrap();
    let team = images::push_target(&"local/team:v1".parse().unwrap(), &url).unwrap();
    images::push(&a_reg, &built, &team).await.unwrap();
    let e = a_reg.resolve_image(&team_app).await.unwrap_err();
    assert!(refused(&e.to_string()), "{e}");
    b_reg.resolve_image(&team_app).await.unwrap();

    // a deploys from its repository, as itself.
    let mut req = DeployRequest::new("local/a-app:v1");
    let st = as_a.deploy("afn", &req).await.unwrap();
    assert_eq!(st.record.tenant, "a");
    // b: not as a, not over a's function, not from a's repository, not as the operator.
    req.tenant = Some("a".into());
    let e = as_b.deploy("bfn", &req).await.unwrap_err().to_string();
    assert!(e.contains("cannot deploy for tenant \"a\""), "{e}");
    req.tenant = None;
    let e = as_b.deploy("afn", &req).await.unwrap_err().to_string();
    assert!(e.contains("taken by another tenant"), "{e}");
    let e = as_b.deploy("bfn", &req).await.unwrap_err().to_string();
    assert!(e.contains("belongs to another tenant"), "{e}");
    // Nor may the operator run a tenant's repository for another tenant.
    let mut for_default = DeployRequest::new("local/a-app:v1");
    for_default.tenant = Some("default".into());
    let e = op
        .deploy("opsa", &for_default)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("belongs to another tenant"), "{e}");
    let e = as_b
        .deploy("bfn", &DeployRequest::new(&image))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("403") || e.contains("FORBIDDEN"), "{e}");
    for e in [
        as_b.delete("afn").await.unwrap_err().to_string(),
        as_b.logs("afn", 10).await.unwrap_err().to_string(),
    ] {
        assert!(e.contains("is not deployed"), "{e}");
    }
    assert!(as_b
        .sandboxes()
        .await
        .unwrap_err()
        .to_string()
        .contains("operator"));
    assert!(as_b.create_token("b").await.is_err());
    let listed: Vec<String> = as_b
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|f| f.record.name)
        .collect();
    assert!(listed.is_empty(), "{listed:?}");
    let listed: Vec<String> = as_a
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|f| f.record.name)
        .collect();
    assert_eq!(listed, vec!["afn".to_string()]);
    assert_eq!(op.list().await.unwrap().len(), 2);

    // A 200 KB environment value would make every cold start fail: refused at deploy.
    let mut big = DeployRequest::new("local/a-app:v1");
    big.env.insert("BIG".into(), "x".repeat(200 << 10));
    let e = as_a.deploy("afn", &big).await.unwrap_err().to_string();
    assert!(e.contains("at most"), "{e}");

    // Revoked tokens stop working at once.
    op.revoke_token(&a.info.id).await.unwrap();
    assert!(as_a.list().await.unwrap_err().to_string().contains("401"));
    for f in ["afn", "opsfn"] {
        op.delete(f).await.unwrap();
    }
    p.stop().await.unwrap();
}
