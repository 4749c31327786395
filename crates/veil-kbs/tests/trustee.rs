//! Interoperability with Confidential Containers' trustee, both directions, against trustee's
//! own programs (`testdata/trustee/`: its KBS and its `kbs-client`, built from its public
//! sources): trustee's client gets resources from veil's broker, and veil's client (the one the
//! agent uses in every sandbox) attests to trustee's KBS and gets resources that trustee's
//! policies release.
#![allow(clippy::unwrap_used)] // tests may panic

use base64::Engine;
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use veil_attest::software::{HostKey, SoftwareAttester};
use veil_kbs::{Kbs, KbsClient, KbsConfig, ReqwestTransport};
use veil_testkit::trustee::{kbs_client, ClientOutput, Trustee};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

async fn trustee() -> Trustee {
    tokio::task::spawn_blocking(|| Trustee::start().unwrap())
        .await
        .unwrap()
}

async fn kbs_client_async(url: String, args: Vec<String>, cwd: PathBuf) -> ClientOutput {
    tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        kbs_client(&url, &a, &cwd).unwrap()
    })
    .await
    .unwrap()
}

/// veil's broker on a loopback port.
struct Veil {
    kbs: Arc<Kbs>,
    url: String,
    _dir: tempfile::TempDir,
}

async fn veil_broker(f: impl FnOnce(&mut KbsConfig)) -> Veil {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = KbsConfig::new(dir.path().join("state"));
    cfg.software_tee_hosts = vec![host().public_hex()];
    f(&mut cfg);
    let kbs = Kbs::open(cfg).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let router = kbs.router();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    Veil {
        kbs,
        url,
        _dir: dir,
    }
}

fn host() -> &'static HostKey {
    static HOST: std::sync::OnceLock<HostKey> = std::sync::OnceLock::new();
    HOST.get_or_init(HostKey::generate)
}

/// What a veil node gives a sandbox of `tenant`'s function `hello`: an endorsed software
/// attester, and the sandbox's init-data document.
fn sandbox(tenant: &str) -> (SoftwareAttester, String) {
    let c = host().endorse(
        "sb-interop",
        tenant,
        "hello",
        SystemTime::now(),
        Duration::from_secs(600),
    );
    let init = veil_kbs::veil_init_data(&json!({"tenant": tenant, "function": "hello",
        "image_digest": format!("sha256:{}", "ab".repeat(32))}))
    .unwrap();
    (
        SoftwareAttester::new(&"5e".repeat(48), "", &c).unwrap(),
        init,
    )
}

/// A resource policy for veil's broker that releases the `default` repository to any attested
/// client, as trustee's `--allow-all` does for sample evidence (what an operator installs to
/// serve trustee's client from a development broker).
const VEIL_ALLOW_DEFAULT: &str = r#"package policy
import rego.v1
default allow := false
allow if input.resource.repository == "default"
"#;

// ---------------------------------------------------------------------------------------------
// trustee's client → veil's broker

/// trustee's `kbs-client`, with its sample attester, gets a resource from veil's broker that
/// accepts unendorsed sample evidence: the whole exchange (hash negotiation, canonical runtime
/// data, sample evidence, no init-data, and the JWE the client decrypts with sorted headers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trustee_client_gets_resources_from_veils_broker() {
    let v = veil_broker(|c| {
        c.allow_insecure_software_tee = true;
        c.allow_unendorsed_sample = true;
    })
    .await;
    v.kbs.set_resource_policy(VEIL_ALLOW_DEFAULT).unwrap();
    let secret = b"a resource for trustee's client \x00\xff";
    v.kbs.set_resource("default/key/x", secret).unwrap();
    let cwd = tempfile::tempdir().unwrap();
    let out = kbs_client_async(
        v.url.clone(),
        ["get-resource", "--path", "default/key/x"]
            .map(String::from)
            .to_vec(),
        cwd.path().to_path_buf(),
    )
    .await;
    assert!(out.ok, "kbs-client failed: {}", out.stderr);
    assert_eq!(B64.decode(&out.stdout).unwrap(), secret);

    // With init-data (TOML, as the client sends it): accepted, but unendorsed sample evidence
    // binds nothing, so it does not make the client a tenant's sandbox.
    let init = sandbox("acme").1;
    v.kbs.set_resource("acme/key/x", b"acme's").unwrap();
    let out = kbs_client_async(
        v.url.clone(),
        vec![
            "get-resource".into(),
            "--path".into(),
            "default/key/x".into(),
            init.clone(),
        ],
        cwd.path().to_path_buf(),
    )
    .await;
    assert!(out.ok, "kbs-client with init-data failed: {}", out.stderr);
    assert_eq!(B64.decode(&out.stdout).unwrap(), secret);
    // A resource of another tenant (named in the unbound init data, or not): refused.
    let out = kbs_client_async(
        v.url.clone(),
        vec![
            "get-resource".into(),
            "--path".into(),
            "acme/key/x".into(),
            init,
        ],
        cwd.path().to_path_buf(),
    )
    .await;
    assert!(!out.ok);
    assert!(out.stderr.contains("PolicyDeny"), "{}", out.stderr);
    assert!(!out.stdout.contains(&B64.encode(b"acme's")));

    // With an RSA TEE key of its own (`--tee-key-file`, RSA-OAEP-256), too.
    let key = cwd.path().join("tee.pem");
    let st = std::process::Command::new("openssl")
        .args(["genrsa", "-traditional", "-out"])
        .arg(&key)
        .arg("2048")
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let out = kbs_client_async(
        v.url.clone(),
        vec![
            "get-resource".into(),
            "--path".into(),
            "default/key/x".into(),
            "--tee-key-file".into(),
            key.to_string_lossy().into_owned(),
        ],
        cwd.path().to_path_buf(),
    )
    .await;
    assert!(out.ok, "kbs-client with an RSA key failed: {}", out.stderr);
    assert_eq!(B64.decode(&out.stdout).unwrap(), secret);

    // `kbs-client attest` prints veil's token, which names no tenant.
    let out = kbs_client_async(
        v.url.clone(),
        vec!["attest".into()],
        cwd.path().to_path_buf(),
    )
    .await;
    assert!(out.ok, "{}", out.stderr);
    let claims = v.kbs.verify_token(&out.stdout).unwrap();
    assert_eq!(claims.tenant, None);
    assert!(claims.insecure);
}

/// A broker whose policy refuses sample evidence (every broker by default, and the one in
/// `veil up`): trustee's client is refused, and the error says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trustee_client_is_refused_clearly_without_sample_acceptance() {
    let cwd = tempfile::tempdir().unwrap();
    // Software TEE accepted for endorsed sandboxes only.
    let v = veil_broker(|c| c.allow_insecure_software_tee = true).await;
    v.kbs.set_resource_policy(VEIL_ALLOW_DEFAULT).unwrap();
    v.kbs.set_resource("default/key/x", b"x").unwrap();
    let out = kbs_client_async(
        v.url.clone(),
        vec!["attest".into()],
        cwd.path().to_path_buf(),
    )
    .await;
    assert!(!out.ok);
    assert!(
        out.stderr
            .contains("sample evidence without a host endorsement"),
        "{}",
        out.stderr
    );
    // The default: no software TEE at all.
    let v = veil_broker(|_| {}).await;
    let out = kbs_client_async(
        v.url.clone(),
        vec!["attest".into()],
        cwd.path().to_path_buf(),
    )
    .await;
    assert!(!out.ok);
    assert!(
        out.stderr
            .contains("sample evidence without a host endorsement"),
        "{}",
        out.stderr
    );
}

// ---------------------------------------------------------------------------------------------
// veil's client (the agent's) → trustee's KBS

/// veil's client attests to trustee's KBS with the software TEE (trustee's sample format plus
/// veil's endorsement, which trustee ignores) and the init-data document of its assignment,
/// and trustee's resource policy decides on that assignment: it releases the resource to
/// tenant acme's sandbox and refuses another tenant's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn veils_client_gets_resources_from_trustee() {
    let t = trustee().await;
    t.set_resource("acme/key/image", b"acme's image key")
        .unwrap();
    // trustee's policy, on the init-data claims of the token trustee issued.
    t.set_resource_policy(
        r#"package policy
import rego.v1
default allow := false
allow if {
	input["submods"]["cpu0"]["ear.veraison.annotated-evidence"]["init_data_claims"]["veil.tenant"] == data["resource-path"][0]
}
"#,
    )
    .unwrap();
    let (attester, init) = sandbox("acme");
    let mut c = KbsClient::new(ReqwestTransport::new(t.url()));
    let token = c.attest(&attester, Some(&init)).await.unwrap_or_else(|e| {
        panic!("attest to trustee: {e}\n{}", t.log());
    });
    // trustee's EAR token carries the assignment as init-data claims.
    let payload: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    let evidence = &payload["submods"]["cpu0"]["ear.veraison.annotated-evidence"];
    assert_eq!(evidence["init_data_claims"]["veil.tenant"], "acme");
    assert_eq!(evidence["sample"]["svn"], "1");
    let v = c.get_resource("acme/key/image").await.unwrap();
    assert_eq!(v.as_slice(), b"acme's image key");

    // Another tenant's sandbox asks for acme's key: trustee's policy refuses.
    let (attester, init) = sandbox("globex");
    let mut c = KbsClient::new(ReqwestTransport::new(t.url()));
    c.attest(&attester, Some(&init)).await.unwrap();
    let e = c.get_resource("acme/key/image").await.unwrap_err();
    assert!(e.to_string().contains("refused"), "{e}");
}

/// Tokens are the issuing broker's: veil's token at trustee, and trustee's at veil, are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_from_one_broker_is_refused_by_the_other() {
    let t = trustee().await;
    t.set_resource("acme/key/x", b"trustee's").unwrap();
    t.config(&["set-resource-policy", "--allow-all"]).unwrap();
    let v = veil_broker(|c| c.allow_insecure_software_tee = true).await;
    v.kbs
        .set_reference_values(veil_kbs::SOFTWARE_TEE_TENANTS, &["acme".into()])
        .unwrap();
    v.kbs.set_resource("acme/key/x", b"veil's").unwrap();
    let http = reqwest::Client::new();

    // A token from veil's broker, presented to trustee.
    let (attester, init) = sandbox("acme");
    let mut c = KbsClient::new(ReqwestTransport::new(v.url.clone()));
    let veil_token = c.attest(&attester, Some(&init)).await.unwrap();
    let r = http
        .get(format!("{}/kbs/v0/resource/acme/key/x", t.url()))
        .bearer_auth(&veil_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "{}", r.text().await.unwrap());

    // A token from trustee, presented to veil's broker.
    let mut c = KbsClient::new(ReqwestTransport::new(t.url()));
    let trustee_token = c.attest(&attester, Some(&init)).await.unwrap();
    let r = http
        .get(format!("{}/kbs/v0/resource/acme/key/x", v.url))
        .bearer_auth(&trustee_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["type"].as_str().unwrap().ends_with("TokenInvalid"),
        "{body}"
    );
}

/// A trustee KBS that is down: a clear error, not a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trustee_that_is_down_gives_a_clear_error() {
    let mut t = trustee().await;
    let url = t.url();
    t.stop();
    let (attester, init) = sandbox("acme");
    let mut c = KbsClient::new(ReqwestTransport::new(url));
    let e = tokio::time::timeout(Duration::from_secs(30), c.attest(&attester, Some(&init)))
        .await
        .expect("attesting to a KBS that is down must fail promptly")
        .unwrap_err();
    assert!(e.to_string().contains("key broker unreachable"), "{e}");
}
