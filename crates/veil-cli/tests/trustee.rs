//! veil with Confidential Containers' trustee, end to end, with trustee's own programs: a
//! tenant deploys with `--kbs-url <its trustee KBS>` and the sandbox attests to trustee and gets
//! its secrets there, trustee's policy deciding; trustee's `kbs-client` against the brokers veil
//! runs (`veil kbs serve`, and the one embedded in `veil up`).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use veil_cli::client::{AdminClient, Invocation};
use veil_cli::{images, Platform, UpOptions};
use veil_gateway::DeployRequest;
use veil_image::build::build_image;
use veil_image::Reference;
use veil_testkit::trustee::{kbs_client, Trustee};

async fn up(state: &Path) -> (Platform, AdminClient) {
    let mut opts = UpOptions::defaults(state.join("state"));
    opts.listen = "127.0.0.1:0".parse().unwrap();
    opts.pool_size = 1;
    let platform = Platform::start(opts).await.unwrap();
    let admin = platform.admin_client().unwrap();
    (platform, admin)
}

/// Build the example function and push it to the platform's local store as `local/<repo_tag>`.
async fn push_example(p: &Platform, repo_tag: &str) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = tmp.path().join("ctx");
    images::write_example(&ctx).unwrap();
    let image = build_image(&images::example_spec(&ctx)).unwrap();
    let reference: Reference = format!("local/{repo_tag}").parse().unwrap();
    let target = images::push_target(&reference, &p.url()).unwrap();
    images::push(&p.registry_client().unwrap(), &image, &target)
        .await
        .unwrap();
    reference.to_string()
}

async fn invoke(admin: &AdminClient, name: &str, path: &str) -> Invocation {
    admin
        .invoke(name, "GET", path, Vec::new(), &BTreeMap::new())
        .await
        .unwrap()
}

fn text(r: &Invocation) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

async fn start_trustee() -> Trustee {
    tokio::task::spawn_blocking(|| Trustee::start().unwrap())
        .await
        .unwrap()
}

/// trustee's resource policy for this test: a resource of repository R goes to a sandbox whose
/// init-data (veil's assignment, in trustee's EAR token) names tenant R and function `sec`.
const TRUSTEE_POLICY: &str = r#"package policy
import rego.v1
default allow := false
claims := input["submods"]["cpu0"]["ear.veraison.annotated-evidence"]["init_data_claims"]
allow if {
	claims["veil.tenant"] == data["resource-path"][0]
	claims["veil.function"] == "sec"
}
"#;

/// Every sandbox the node still has must be an unassigned pool member.
async fn assert_no_assigned_sandboxes(admin: &AdminClient) {
    for _ in 0..100 {
        let sbs = admin.sandboxes().await.unwrap();
        if sbs.iter().all(|s| s["function"].is_null()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("assigned sandboxes left: {:?}", admin.sandboxes().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_get_their_secrets_from_a_tenants_trustee() {
    let mut t = start_trustee().await;
    t.set_resource("default/app/greeting", b"from-trustee")
        .unwrap();
    t.set_resource_policy(TRUSTEE_POLICY).unwrap();
    let state = tempfile::tempdir().unwrap();
    let (p, admin) = up(state.path()).await;
    let image = push_example(&p, "sec:v1").await;
    let deploy = |kbs_url: String| {
        let mut req = DeployRequest::new(&image);
        req.secrets
            .insert("GREETING".into(), "kbs:///default/app/greeting".into());
        req.allow_insecure_software_tee = true;
        req.kbs_url = Some(kbs_url);
        req
    };

    // The sandbox attests to trustee (sample evidence, its assignment as init-data) and gets
    // the secret trustee's policy releases to it.
    admin.deploy("sec", &deploy(t.url())).await.unwrap();
    let r = invoke(&admin, "sec", "/env/GREETING").await;
    assert_eq!(r.status, 200, "{}\n{}", text(&r), t.log());
    assert_eq!(text(&r), "GREETING=from-trustee\n");
    let logs = format!("{:?}", admin.logs("sec", 500).await.unwrap());
    assert!(!logs.contains("from-trustee"), "secret in host-side logs");

    // Another function of the same tenant: trustee's policy refuses it, clearly.
    admin.deploy("other", &deploy(t.url())).await.unwrap();
    let r = invoke(&admin, "other", "/env/GREETING").await;
    assert_eq!(r.status, 502, "{}", text(&r));
    assert!(
        text(&r).contains("Access denied by policy") && text(&r).contains("default/app/greeting"),
        "{}",
        text(&r)
    );

    // trustee is down when a sandbox attests: a clear error, and the sandbox is destroyed.
    t.stop();
    admin.deploy("late", &deploy(t.url())).await.unwrap();
    let r = invoke(&admin, "late", "/env/GREETING").await;
    assert_eq!(r.status, 502, "{}", text(&r));
    assert!(
        text(&r).contains("ATTESTATION") && text(&r).contains("unreachable"),
        "{}",
        text(&r)
    );
    for f in ["sec", "other", "late"] {
        admin.delete(f).await.unwrap();
    }
    assert_no_assigned_sandboxes(&admin).await;
    p.stop().await.unwrap();
}

/// The broker embedded in `veil up` keeps the hardening rule: software evidence only from the
/// node's own sandboxes. trustee's client, with its sample attester, is refused, and told why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trustee_client_is_refused_by_the_embedded_broker() {
    let state = tempfile::tempdir().unwrap();
    let (p, _admin) = up(state.path()).await;
    let kbs = p.kbs.clone().unwrap();
    kbs.set_resource("default/app/greeting", b"x").unwrap();
    let url = p.url();
    let cwd = tempfile::tempdir().unwrap();
    let dir = cwd.path().to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        kbs_client(
            &url,
            &["get-resource", "--path", "default/app/greeting"],
            &dir,
        )
        .unwrap()
    })
    .await
    .unwrap();
    assert!(!out.ok, "{}", out.stdout);
    assert!(
        out.stderr
            .contains("sample evidence without a host endorsement"),
        "{}",
        out.stderr
    );
    p.stop().await.unwrap();
}

/// `veil kbs serve --allow-insecure-software-tee --insecure-allow-unendorsed-sample` serves
/// trustee's client what its resource policy releases, and says loudly that it is insecure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn veil_kbs_serve_serves_trustees_client_when_told_to() {
    let dir = tempfile::tempdir().unwrap();
    let port = veil_testkit::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let log = std::fs::File::create(dir.path().join("serve.log")).unwrap();
    let mut serve = std::process::Command::new(env!("CARGO_BIN_EXE_veil"))
        .args(["kbs", "serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--state-dir")
        .arg(dir.path().join("kbs"))
        .args([
            "--allow-insecure-software-tee",
            "--insecure-allow-unendorsed-sample",
        ])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let veil = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_veil"))
            .args(args)
            .args(["--kbs-url", &url])
            .arg("--admin-key")
            .arg(dir.path().join("kbs/admin.key"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "veil {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let policy = dir.path().join("resource.rego");
    std::fs::write(
        &policy,
        "package policy\nimport rego.v1\ndefault allow := false\n\
         allow if input.resource.repository == \"default\"\n",
    )
    .unwrap();
    veil(&["kbs", "set-policy", "resource", policy.to_str().unwrap()]);
    veil(&[
        "kbs",
        "set-resource",
        "default/key/x",
        "--value",
        "for-kbs-client",
    ]);
    veil(&["kbs", "set-resource", "acme/key/x", "--value", "acme-only"]);
    let cwd = dir.path().to_path_buf();
    let u = url.clone();
    let (ok, other) = tokio::task::spawn_blocking(move || {
        (
            kbs_client(&u, &["get-resource", "--path", "default/key/x"], &cwd).unwrap(),
            kbs_client(&u, &["get-resource", "--path", "acme/key/x"], &cwd).unwrap(),
        )
    })
    .await
    .unwrap();
    let _ = serve.kill();
    let _ = serve.wait();
    assert!(ok.ok, "{}", ok.stderr);
    // kbs-client prints the resource in base64: "for-kbs-client".
    assert_eq!(ok.stdout, "Zm9yLWticy1jbGllbnQ=");
    assert!(
        !other.ok && other.stderr.contains("PolicyDeny"),
        "{}",
        other.stderr
    );
    let log = std::fs::read_to_string(dir.path().join("serve.log")).unwrap();
    assert!(log.contains("UNENDORSED sample evidence from ANY"), "{log}");
}
