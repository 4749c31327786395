//! The broker over real HTTP on loopback: the full round trip and every refusal.
#![allow(clippy::unwrap_used)] // tests may panic

use base64::Engine;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use veil_attest::software::{HostKey, SoftwareAttester};
use veil_attest::{Attester, Claims, TeeKind, Verifier};
use veil_kbs::parse::{runtime_data_digest, veil_additional_evidence, HashAlgorithm};
use veil_kbs::{Kbs, KbsClient, KbsConfig, ReqwestTransport, TeeKeyPair};

const MEASUREMENT: &str = "5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e";

struct Broker {
    kbs: Arc<Kbs>,
    base: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

async fn start_with(f: impl FnOnce(&mut KbsConfig), extra: Vec<Arc<dyn Verifier>>) -> Broker {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = KbsConfig::new(dir.path().join("state"));
    cfg.software_tee_hosts = vec![host().public_hex()];
    f(&mut cfg);
    let kbs = Kbs::open_with_verifiers(cfg, extra).unwrap();
    kbs.set_reference_values(
        veil_kbs::SOFTWARE_TEE_TENANTS,
        &["acme".into(), "other".into()],
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = kbs.router();
    tokio::spawn(async move {
        axum::serve(listener, router).await.unwrap();
    });
    Broker {
        kbs,
        base: format!("http://{addr}"),
        http: reqwest::Client::new(),
        _dir: dir,
    }
}

async fn start_insecure() -> Broker {
    start_with(|c| c.allow_insecure_software_tee = true, vec![]).await
}

/// veil's init-data document for `tenant`'s function `hello`.
fn assignment(tenant: &str) -> String {
    veil_kbs::veil_init_data(&json!({"tenant": tenant, "function": "hello",
        "image_digest": format!("sha256:{}", "ab".repeat(32))}))
    .unwrap()
}

/// The node host key the test brokers trust for software-TEE endorsements.
fn host() -> &'static HostKey {
    static HOST: std::sync::OnceLock<HostKey> = std::sync::OnceLock::new();
    HOST.get_or_init(HostKey::generate)
}

/// A software attester endorsed by `host` for `tenant`'s function `hello`.
fn attester_by(host: &HostKey, tenant: &str) -> SoftwareAttester {
    let c = host.endorse(
        "sb-test",
        tenant,
        "hello",
        SystemTime::now(),
        Duration::from_secs(600),
    );
    SoftwareAttester::new(MEASUREMENT, "", &c).unwrap()
}

fn attester() -> SoftwareAttester {
    attester_by(host(), "acme")
}

impl Broker {
    fn client(&self) -> KbsClient<ReqwestTransport> {
        KbsClient::new(ReqwestTransport::new(self.base.clone()))
    }

    async fn post(&self, path: &str, cookie: Option<&str>, body: Vec<u8>) -> (u16, Value) {
        let mut r = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body);
        if let Some(c) = cookie {
            r = r.header("cookie", format!("kbs-session-id={c}"));
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.bytes().await.unwrap();
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    /// `/auth`: (cookie, nonce).
    async fn auth(&self, tee: &str) -> (String, String) {
        let resp = self
            .http
            .post(format!("{}/kbs/v0/auth", self.base))
            .json(&json!({"version": "0.4.0", "tee": tee, "extra-params": {}}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let set_cookie = resp.headers()["set-cookie"].to_str().unwrap().to_string();
        let cookie = set_cookie
            .split(';')
            .next()
            .unwrap()
            .strip_prefix("kbs-session-id=")
            .unwrap()
            .to_string();
        let ch: kbs_types::Challenge = resp.json().await.unwrap();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(&ch.nonce)
            .unwrap();
        assert_eq!(raw.len(), 32);
        (cookie, ch.nonce)
    }

    async fn get(&self, path: &str, cookie: Option<&str>, bearer: Option<&str>) -> (u16, Vec<u8>) {
        let mut r = self.http.get(format!("{}{path}", self.base));
        if let Some(c) = cookie {
            r = r.header("cookie", format!("kbs-session-id={c}"));
        }
        if let Some(t) = bearer {
            r = r.bearer_auth(t);
        }
        let resp = r.send().await.unwrap();
        (resp.status().as_u16(), resp.bytes().await.unwrap().to_vec())
    }

    fn admin(&self) -> String {
        veil_kbs::admin_token(&self.kbs.admin_key_path()).unwrap()
    }
}

/// An `/attest` body; `evidence_key` is the key bound into the evidence, `sent_key` the one sent.
fn attestation_body(
    nonce: &str,
    attester: &dyn Attester,
    evidence_key: &kbs_types::TeePubKey,
    sent_key: &kbs_types::TeePubKey,
    init: &str,
) -> Vec<u8> {
    let digest = veil_kbs::parse_init_data(init).unwrap().digest;
    let ae = veil_additional_evidence(&digest);
    let rd = runtime_data_digest(HashAlgorithm::Sha384, nonce, evidence_key, &ae);
    let evidence = attester.evidence(&rd).unwrap();
    serde_json::to_vec(&json!({
        "init-data": {"format": "toml", "body": init},
        "runtime-data": {"nonce": nonce, "tee-pubkey": sent_key},
        "tee-evidence": {"primary_evidence": evidence, "additional_evidence": ae},
    }))
    .unwrap()
}

fn detail(v: &Value) -> &str {
    assert!(
        v["type"]
            .as_str()
            .unwrap()
            .starts_with(veil_kbs::ERROR_TYPE_PREFIX),
        "{v}"
    );
    v["detail"].as_str().unwrap()
}

#[tokio::test]
async fn full_round_trip_with_the_software_tee() {
    let b = start_insecure().await;
    let secret: Vec<u8> = (0..=255u8).chain(b"image key".iter().copied()).collect();
    b.kbs.set_resource("acme/key/image", &secret).unwrap();
    let mut c = b.client();
    let token = c
        .attest(&attester(), Some(&assignment("acme")))
        .await
        .unwrap();
    let claims = b.kbs.verify_token(&token).unwrap();
    assert_eq!(claims.tenant.as_deref(), Some("acme"));
    assert_eq!(claims.function.as_deref(), Some("hello"));
    assert_eq!(claims.init_data_binding.as_deref(), Some("endorsed"));
    assert_eq!(claims.tee, TeeKind::Software);
    assert!(claims.insecure);
    assert_eq!(claims.measurement, MEASUREMENT);
    let got = c.get_resource("acme/key/image").await.unwrap();
    assert_eq!(got.as_slice(), secret.as_slice());

    // With the bearer token alone (no cookie) the resource is released too, to the same key.
    let (status, body) = b
        .get("/kbs/v0/resource/acme/key/image", None, Some(&token))
        .await;
    assert_eq!(status, 200);
    assert!(!body.windows(9).any(|w| w == b"image key"));
}

#[tokio::test]
async fn malformed_json_is_400() {
    let b = start_insecure().await;
    let (s, v) = b.post("/kbs/v0/auth", None, b"{not json".to_vec()).await;
    assert_eq!(s, 400);
    assert!(detail(&v).contains("malformed request"), "{v}");
    let (cookie, _) = b.auth("sample").await;
    let (s, v) = b
        .post(
            "/kbs/v0/attest",
            Some(&cookie),
            b"{\"init-data\": 3}".to_vec(),
        )
        .await;
    assert_eq!(s, 400);
    assert!(detail(&v).contains("malformed attestation"), "{v}");
}

#[tokio::test]
async fn unknown_tee_is_400() {
    let b = start_insecure().await;
    let body =
        serde_json::to_vec(&json!({"version": "0.4.0", "tee": "quantum", "extra-params": {}}))
            .unwrap();
    let (s, v) = b.post("/kbs/v0/auth", None, body).await;
    assert_eq!(s, 400);
    assert!(detail(&v).contains("unknown TEE \"quantum\""), "{v}");
    let body =
        serde_json::to_vec(&json!({"version": "0.4.0", "tee": "sgx", "extra-params": {}})).unwrap();
    let (s, v) = b.post("/kbs/v0/auth", None, body).await;
    assert_eq!(s, 400);
    assert!(detail(&v).contains("TEE sgx is not supported"), "{v}");
}

#[tokio::test]
async fn wrong_protocol_version_is_400() {
    let b = start_insecure().await;
    let body =
        serde_json::to_vec(&json!({"version": "0.1.0", "tee": "sample", "extra-params": {}}))
            .unwrap();
    let (s, v) = b.post("/kbs/v0/auth", None, body).await;
    assert_eq!(s, 400);
    let d = detail(&v);
    assert!(d.contains("0.1.0") && d.contains("0.4.0"), "{v}");
}

#[tokio::test]
async fn stale_nonce_is_401() {
    let b = start_with(
        |c| {
            c.allow_insecure_software_tee = true;
            c.nonce_ttl = Duration::from_millis(100);
        },
        vec![],
    )
    .await;
    let (cookie, nonce) = b.auth("sample").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let key = TeeKeyPair::generate().public_key();
    let body = attestation_body(&nonce, &attester(), &key, &key, &assignment("acme"));
    let (s, v) = b.post("/kbs/v0/attest", Some(&cookie), body).await;
    assert_eq!(s, 401);
    assert!(detail(&v).contains("nonce has expired"), "{v}");
}

#[tokio::test]
async fn reused_nonce_is_401() {
    let b = start_insecure().await;
    let (cookie, nonce) = b.auth("sample").await;
    let key = TeeKeyPair::generate().public_key();
    let body = attestation_body(&nonce, &attester(), &key, &key, &assignment("acme"));
    let (s, v) = b.post("/kbs/v0/attest", Some(&cookie), body.clone()).await;
    assert_eq!(s, 200, "{v}");
    assert!(v["token"].is_string());
    let (s, v) = b.post("/kbs/v0/attest", Some(&cookie), body).await;
    assert_eq!(s, 401);
    assert!(detail(&v).contains("already used"), "{v}");
}

#[tokio::test]
async fn nonce_of_another_session_is_401() {
    let b = start_insecure().await;
    let (cookie, _) = b.auth("sample").await;
    let (_, other_nonce) = b.auth("sample").await;
    let key = TeeKeyPair::generate().public_key();
    let body = attestation_body(&other_nonce, &attester(), &key, &key, &assignment("acme"));
    let (s, v) = b.post("/kbs/v0/attest", Some(&cookie), body).await;
    assert_eq!(s, 401);
    assert!(detail(&v).contains("does not match"), "{v}");
    // No cookie at all.
    let (s, v) = b.post("/kbs/v0/attest", None, b"{}".to_vec()).await;
    assert_eq!(s, 401);
    assert!(detail(&v).contains("cookie"), "{v}");
}

#[tokio::test]
async fn evidence_not_binding_the_key_is_401() {
    let b = start_insecure().await;
    let (cookie, nonce) = b.auth("sample").await;
    let bound = TeeKeyPair::generate().public_key();
    let swapped = TeeKeyPair::generate().public_key();
    let body = attestation_body(&nonce, &attester(), &bound, &swapped, &assignment("acme"));
    let (s, v) = b.post("/kbs/v0/attest", Some(&cookie), body).await;
    assert_eq!(s, 401);
    assert!(detail(&v).contains("does not bind"), "{v}");

    // Same with the init data changed after the evidence was made.
    let (cookie, nonce) = b.auth("sample").await;
    let key = TeeKeyPair::generate().public_key();
    let good = attestation_body(&nonce, &attester(), &key, &key, &assignment("acme"));
    let mut v: Value = serde_json::from_slice(&good).unwrap();
    v["init-data"]["body"] = assignment("globex").into();
    let (s, r) = b
        .post(
            "/kbs/v0/attest",
            Some(&cookie),
            serde_json::to_vec(&v).unwrap(),
        )
        .await;
    assert_eq!(s, 401);
    assert!(detail(&r).contains("but the evidence binds"), "{r}");
    assert_eq!(
        r["type"],
        format!("{}InitDataMismatch", veil_kbs::ERROR_TYPE_PREFIX)
    );

    // ... or with the binding of the init data dropped from the additional evidence.
    let (cookie, nonce) = b.auth("sample").await;
    let key = TeeKeyPair::generate().public_key();
    let good = attestation_body(&nonce, &attester(), &key, &key, &assignment("acme"));
    let mut v: Value = serde_json::from_slice(&good).unwrap();
    v["tee-evidence"]["additional_evidence"] = "".into();
    let (s, r) = b
        .post(
            "/kbs/v0/attest",
            Some(&cookie),
            serde_json::to_vec(&v).unwrap(),
        )
        .await;
    assert_eq!(s, 401);
    assert!(detail(&r).contains("does not bind"), "{r}");
}

#[tokio::test]
async fn measurement_not_in_reference_values_is_403() {
    let b = start_insecure().await;
    b.kbs
        .set_reference_values("measurement", &["00".repeat(48)])
        .unwrap();
    let err = b
        .client()
        .attest(&attester(), Some(&assignment("acme")))
        .await
        .unwrap_err();
    match err {
        veil_kbs::ClientError::Refused { status, detail, .. } => {
            assert_eq!(status, 403);
            assert!(
                detail.contains(&format!(
                    "measurement {MEASUREMENT} is not among the reference values"
                )),
                "{detail}"
            );
        }
        e => panic!("{e}"),
    }
    // Registering the right one lets it through.
    b.kbs
        .set_reference_values(
            "measurement",
            &["00".repeat(48), MEASUREMENT.to_uppercase()],
        )
        .unwrap();
    b.client()
        .attest(&attester(), Some(&assignment("acme")))
        .await
        .unwrap();
}

/// A stand-in for hardware: "evidence" is `{"report_data": hex}`, claims say SNP with debug on
/// (and HOSTDATA `host_data`).
#[derive(Default)]
struct DebugGuestVerifier {
    production: bool,
    host_data: String,
}
struct DebugGuestAttester;

impl Verifier for DebugGuestVerifier {
    fn tee(&self) -> TeeKind {
        TeeKind::Snp
    }
    fn verify(
        &self,
        evidence: &Value,
        expected: &[u8; veil_attest::REPORT_DATA_LEN],
        _now: SystemTime,
    ) -> Result<Claims, veil_attest::Error> {
        let rd =
            hex::decode(evidence["report_data"].as_str().unwrap_or_default()).unwrap_or_default();
        let rd = veil_attest::pad_report_data(TeeKind::Snp, &rd)?;
        veil_attest::check_report_data(TeeKind::Snp, &rd, expected)?;
        Ok(Claims {
            tee: TeeKind::Snp,
            insecure: false,
            measurement: "aa".into(),
            report_data: hex::encode(rd),
            init_data: self.host_data.clone(),
            debug: !self.production,
            details: json!({}),
        })
    }
}

impl Attester for DebugGuestAttester {
    fn tee(&self) -> TeeKind {
        TeeKind::Snp
    }
    fn evidence(&self, rd: &[u8]) -> Result<Value, veil_attest::Error> {
        Ok(json!({"report_data": hex::encode(rd)}))
    }
    fn launch_data(&self, _: &Value) -> Result<Option<Vec<u8>>, veil_attest::Error> {
        Ok(None)
    }
}

/// A stand-in guest the host launched with HOSTDATA `host_data`.
struct LaunchedGuest {
    host_data: Vec<u8>,
}

impl Attester for LaunchedGuest {
    fn tee(&self) -> TeeKind {
        TeeKind::Snp
    }
    fn evidence(&self, rd: &[u8]) -> Result<Value, veil_attest::Error> {
        Ok(json!({"report_data": hex::encode(rd)}))
    }
    fn launch_data(&self, _: &Value) -> Result<Option<Vec<u8>>, veil_attest::Error> {
        Ok(Some(self.host_data.clone()))
    }
}

#[tokio::test]
async fn debug_guest_is_403() {
    let b = start_with(|_| {}, vec![Arc::new(DebugGuestVerifier::default())]).await;
    b.kbs
        .set_reference_values("measurement", &["aa".into()])
        .unwrap();
    let err = b
        .client()
        .attest(&DebugGuestAttester, Some(&assignment("acme")))
        .await
        .unwrap_err();
    match err {
        veil_kbs::ClientError::Refused { status, detail, .. } => {
            assert_eq!(status, 403);
            assert!(detail.contains("debugging allowed"), "{detail}");
        }
        e => panic!("{e}"),
    }
}

/// Hardware evidence must bind the init data that names its assignment: through the runtime
/// data (veil's agent), or at launch (HOSTDATA, as Confidential Containers does). Unbound init
/// data is refused, whatever the policy; bound init data lets the assignment into the token.
#[tokio::test]
async fn hardware_init_data_must_be_bound() {
    let init = assignment("acme");
    let digest = veil_kbs::parse_init_data(&init).unwrap().digest;
    let plain_body = |nonce: &str, key: &kbs_types::TeePubKey| {
        let rd = runtime_data_digest(HashAlgorithm::Sha384, nonce, key, "");
        serde_json::to_vec(&json!({
            "init-data": {"format": "toml", "body": init},
            "runtime-data": {"nonce": nonce, "tee-pubkey": key},
            "tee-evidence": {"primary_evidence": DebugGuestAttester.evidence(&rd).unwrap(),
                "additional_evidence": ""},
        }))
        .unwrap()
    };
    let refs = |b: &Broker| {
        b.kbs
            .set_reference_values("measurement", &["aa".into()])
            .unwrap();
        b.kbs
            .set_reference_values("image_digest", &[format!("sha256:{}", "ab".repeat(32))])
            .unwrap();
    };
    let v = DebugGuestVerifier {
        production: true,
        host_data: String::new(),
    };
    let b = start_with(|_| {}, vec![Arc::new(v)]).await;
    refs(&b);
    let (cookie, nonce) = b.auth("snp").await;
    let key = TeeKeyPair::generate().public_key();
    let (s, r) = b
        .post("/kbs/v0/attest", Some(&cookie), plain_body(&nonce, &key))
        .await;
    assert_eq!(s, 401, "{r}");
    assert_eq!(
        r["type"],
        format!("{}InitDataNotBound", veil_kbs::ERROR_TYPE_PREFIX)
    );
    // veil's client binds it through the additional evidence.
    let token = b
        .client()
        .attest(&DebugGuestAttester, Some(&init))
        .await
        .unwrap();
    let c = b.kbs.verify_token(&token).unwrap();
    assert_eq!(c.tenant.as_deref(), Some("acme"));
    assert_eq!(c.init_data_binding.as_deref(), Some("runtime"));

    // Bound at launch: HOSTDATA holds the digest truncated to its 32 bytes.
    let v = DebugGuestVerifier {
        production: true,
        host_data: hex::encode(&digest[..32]),
    };
    let b = start_with(|_| {}, vec![Arc::new(v)]).await;
    refs(&b);
    let (cookie, nonce) = b.auth("snp").await;
    let key = TeeKeyPair::generate().public_key();
    let (s, r) = b
        .post("/kbs/v0/attest", Some(&cookie), plain_body(&nonce, &key))
        .await;
    assert_eq!(s, 200, "{r}");
    let c = b.kbs.verify_token(r["token"].as_str().unwrap()).unwrap();
    assert_eq!(c.init_data_binding.as_deref(), Some("launch"));
    assert_eq!(c.tenant.as_deref(), Some("acme"));

    // The guest side: a host that launched the guest with another assignment's init data in
    // HOSTDATA (to have the broker take it as launch-bound) gets no attestation at all, and
    // one launched with this sandbox's own init data (or none) attests.
    let other = veil_kbs::parse_init_data(&assignment("globex"))
        .unwrap()
        .digest;
    let e = b
        .client()
        .attest(
            &LaunchedGuest {
                host_data: other[..32].to_vec(),
            },
            Some(&init),
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("refusing to attest"), "{e}");
    for host_data in [digest[..32].to_vec(), vec![0; 32]] {
        b.client()
            .attest(&LaunchedGuest { host_data }, Some(&init))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn software_tee_is_refused_by_default() {
    let b = start_with(|_| {}, vec![]).await;
    let (cookie, nonce) = b.auth("sample").await;
    let key = TeeKeyPair::generate().public_key();
    let body = attestation_body(&nonce, &attester(), &key, &key, &assignment("acme"));
    let (s, v) = b.post("/kbs/v0/attest", Some(&cookie), body).await;
    assert_eq!(s, 403);
    assert_eq!(
        detail(&v),
        "attestation policy denied: software TEE is insecure and not allowed by this broker's policy"
    );
    // Nothing released on that session.
    b.kbs.set_resource("acme/key/image", b"k").unwrap();
    let (s, _) = b
        .get("/kbs/v0/resource/acme/key/image", Some(&cookie), None)
        .await;
    assert_eq!(s, 401);
}

#[tokio::test]
async fn policy_reason_is_passed_on() {
    let b = start_insecure().await;
    b.kbs
        .set_attestation_policy(
            "package policy\nimport rego.v1\ndefault allow := false\ndeny contains \"tenant acme is suspended\" if input.init_data.tenant == \"acme\"\nallow if count(deny) == 0\n",
        )
        .unwrap();
    let err = b
        .client()
        .attest(&attester(), Some(&assignment("acme")))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("tenant acme is suspended"),
        "{err}"
    );
    b.client()
        .attest(&attester_by(host(), "other"), Some(&assignment("other")))
        .await
        .unwrap();
}

#[tokio::test]
async fn expired_token_is_401() {
    let b = start_with(
        |c| {
            c.allow_insecure_software_tee = true;
            c.token_ttl = Duration::from_secs(1);
        },
        vec![],
    )
    .await;
    b.kbs.set_resource("acme/key/image", b"k").unwrap();
    let mut c = b.client();
    let token = c
        .attest(&attester(), Some(&assignment("acme")))
        .await
        .unwrap();
    c.get_resource("acme/key/image").await.unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (s, body) = b
        .get("/kbs/v0/resource/acme/key/image", None, Some(&token))
        .await;
    assert_eq!(s, 401);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert!(detail(&v).contains("token has expired"), "{v}");
    let err = c.get_resource("acme/key/image").await.unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");
    // A forged token is refused as well.
    let (s, _) = b
        .get("/kbs/v0/resource/acme/key/image", None, Some("a.b.c"))
        .await;
    assert_eq!(s, 401);
    let (s, _) = b.get("/kbs/v0/resource/acme/key/image", None, None).await;
    assert_eq!(s, 401);
}

#[tokio::test]
async fn resource_of_another_tenant_is_403() {
    let b = start_insecure().await;
    b.kbs.set_resource("globex/key/image", b"theirs").unwrap();
    let mut c = b.client();
    c.attest(&attester(), Some(&assignment("acme")))
        .await
        .unwrap();
    match c.get_resource("globex/key/image").await.unwrap_err() {
        veil_kbs::ClientError::Refused { status, detail, .. } => {
            assert_eq!(status, 403);
            assert!(detail.contains("resource of another tenant"), "{detail}");
        }
        e => panic!("{e}"),
    }
}

#[tokio::test]
async fn missing_resource_is_404() {
    let b = start_insecure().await;
    let mut c = b.client();
    c.attest(&attester(), Some(&assignment("acme")))
        .await
        .unwrap();
    match c.get_resource("acme/key/nothing").await.unwrap_err() {
        veil_kbs::ClientError::Refused { status, detail, .. } => {
            assert_eq!(status, 404);
            assert_eq!(detail, "no resource acme/key/nothing");
        }
        e => panic!("{e}"),
    }
}

#[tokio::test]
async fn oversized_body_is_413() {
    let b = start_insecure().await;
    let big = vec![b' '; veil_kbs::MAX_BODY + 1];
    let (s, v) = b.post("/kbs/v0/auth", None, big.clone()).await;
    assert_eq!(s, 413);
    assert!(detail(&v).contains("exceeds"), "{v}");
    let (cookie, _) = b.auth("sample").await;
    let (s, _) = b.post("/kbs/v0/attest", Some(&cookie), big.clone()).await;
    assert_eq!(s, 413);
    // Chunked (no Content-Length) as well.
    let stream = futures::stream::iter(
        big.chunks(64 * 1024)
            .map(|c| Ok::<_, std::io::Error>(bytes::Bytes::copy_from_slice(c)))
            .collect::<Vec<_>>(),
    );
    let resp = b
        .http
        .post(format!("{}/kbs/v0/auth", b.base))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
}

#[tokio::test]
async fn admin_endpoints_need_a_valid_admin_token() {
    let b = start_insecure().await;
    let url = format!("{}/kbs/v0/resource/acme/key/image", b.base);
    // No token.
    let r = b.http.put(&url).body("v").send().await.unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert!(detail(&v).contains("admin bearer token"), "{v}");
    // Garbage token.
    let r = b
        .http
        .put(&url)
        .bearer_auth("nope")
        .body("v")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Token signed by another key.
    let other = tempfile::tempdir().unwrap();
    let other_kbs = Kbs::open(KbsConfig::new(other.path())).unwrap();
    let foreign = veil_kbs::admin_token(&other_kbs.admin_key_path()).unwrap();
    let r = b
        .http
        .put(&url)
        .bearer_auth(&foreign)
        .body("v")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert!(detail(&v).contains("signature"), "{v}");
    // Expired token.
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expired = veil_kbs::admin_token_at(&b.kbs.admin_key_path(), now - 700, now - 100).unwrap();
    let r = b
        .http
        .put(&url)
        .bearer_auth(&expired)
        .body("v")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert!(detail(&v).contains("expired"), "{v}");
    // Lives longer than 10 minutes.
    let long = veil_kbs::admin_token_at(&b.kbs.admin_key_path(), now, now + 3600).unwrap();
    let r = b
        .http
        .put(&url)
        .bearer_auth(&long)
        .body("v")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // An attestation token is not an admin token.
    let token = b
        .client()
        .attest(&attester(), Some(&assignment("acme")))
        .await
        .unwrap();
    let r = b
        .http
        .put(&url)
        .bearer_auth(&token)
        .body("v")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // GET listings too.
    for p in [
        "/kbs/v0/resource",
        "/kbs/v0/reference-value",
        "/kbs/v0/attestation-policy",
        "/kbs/v0/resource-policy",
    ] {
        let (s, _) = b.get(p, None, None).await;
        assert_eq!(s, 401, "{p}");
    }

    // With a valid token everything works, and listings never show values.
    let admin = b.admin();
    let r = b
        .http
        .put(&url)
        .bearer_auth(&admin)
        .body("top secret value")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let (s, body) = b.get("/kbs/v0/resource", None, Some(&admin)).await;
    assert_eq!(s, 200);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap(),
        json!(["acme/key/image"])
    );
    assert!(!String::from_utf8_lossy(&body).contains("secret"));
    let r = b
        .http
        .put(format!("{}/kbs/v0/reference-value/measurement", b.base))
        .bearer_auth(&admin)
        .json(&json!([MEASUREMENT]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let (s, body) = b.get("/kbs/v0/reference-value", None, Some(&admin)).await;
    assert_eq!(s, 200);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap(),
        json!({"measurement": [MEASUREMENT], "software_tee_tenants": ["acme", "other"]})
    );
    let r = b
        .http
        .put(format!("{}/kbs/v0/reference-value/measurement", b.base))
        .bearer_auth(&admin)
        .json(&json!(["not hex"]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let mut c = b.client();
    c.attest(&attester(), Some(&assignment("acme")))
        .await
        .unwrap();
    assert_eq!(
        c.get_resource("acme/key/image").await.unwrap().as_slice(),
        b"top secret value"
    );
    let (s, body) = b
        .get("/kbs/v0/attestation-policy", None, Some(&admin))
        .await;
    assert_eq!(s, 200);
    assert!(String::from_utf8_lossy(&body).contains("package policy"));
}

#[tokio::test]
async fn bad_rego_is_400() {
    let b = start_insecure().await;
    let admin = b.admin();
    for ep in ["attestation-policy", "resource-policy"] {
        let r = b
            .http
            .put(format!("{}/kbs/v0/{ep}", b.base))
            .bearer_auth(&admin)
            .body("package policy\nallow if {")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{ep}");
        let v: Value = r.json().await.unwrap();
        assert!(detail(&v).starts_with("policy does not compile:"), "{v}");
        let r = b
            .http
            .put(format!("{}/kbs/v0/{ep}", b.base))
            .bearer_auth(&admin)
            .body("package other\nallow := true")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{ep}");
    }
    // The default policies are still in force.
    assert_eq!(
        b.kbs.attestation_policy(),
        veil_kbs::DEFAULT_ATTESTATION_POLICY
    );
    // A good resource policy installs and is enforced.
    let r = b
        .http
        .put(format!("{}/kbs/v0/resource-policy", b.base))
        .bearer_auth(&admin)
        .body("package policy\nimport rego.v1\ndefault allow := false\nallow if input.resource.type == \"key\"\ndeny contains \"only keys\" if input.resource.type != \"key\"\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    b.kbs.set_resource("acme/cert/x", b"c").unwrap();
    let mut c = b.client();
    c.attest(&attester(), Some(&assignment("acme")))
        .await
        .unwrap();
    let e = c.get_resource("acme/cert/x").await.unwrap_err();
    assert!(
        e.to_string().contains("only keys") && e.to_string().contains("403"),
        "{e}"
    );
}

#[tokio::test]
async fn state_persists_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = KbsConfig::new(dir.path());
    let kbs = Kbs::open(cfg.clone()).unwrap();
    kbs.set_resource("acme/key/a", b"1").unwrap();
    kbs.set_reference_values("measurement", &["aa".into()])
        .unwrap();
    kbs.set_resource_policy("package policy\nallow := true")
        .unwrap();
    let admin_pub = std::fs::read(dir.path().join("admin.pub")).unwrap();
    let token_key = kbs.token_public_key();
    drop(kbs);
    let kbs = Kbs::open(cfg).unwrap();
    assert_eq!(kbs.list_resources().unwrap(), vec!["acme/key/a"]);
    assert_eq!(kbs.reference_values().unwrap()["measurement"], vec!["aa"]);
    assert_eq!(kbs.resource_policy(), "package policy\nallow := true");
    assert_eq!(
        std::fs::read(dir.path().join("admin.pub")).unwrap(),
        admin_pub
    );
    assert_eq!(kbs.token_public_key(), token_key);
    use std::os::unix::fs::PermissionsExt;
    for f in ["admin.key", "token.key"] {
        let mode = std::fs::metadata(dir.path().join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
}

/// The hole a hostile tester found: a plain local process with made-up software-TEE evidence
/// got any tenant's resources. Now software evidence needs a trusted node's endorsement for the
/// very tenant and function it asks for, and the tenant must have opted in.
#[tokio::test]
async fn made_up_software_evidence_gets_nothing() {
    let b = start_insecure().await;
    b.kbs.set_resource("acme/key/db", b"acme-secret").unwrap();

    // Self-endorsed evidence from a process with its own "host" key.
    let rogue = HostKey::generate();
    let err = b
        .client()
        .attest(&attester_by(&rogue, "acme"), Some(&assignment("acme")))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("not endorsed by a host this broker trusts"),
        "{err}"
    );

    // Plain sample evidence (trustee's sample attester's, or anyone's), hand-built.
    struct Unsigned;
    impl Attester for Unsigned {
        fn tee(&self) -> TeeKind {
            TeeKind::Software
        }
        fn evidence(&self, rd: &[u8]) -> Result<Value, veil_attest::Error> {
            Ok(json!({"svn": "1",
                "report_data": base64::engine::general_purpose::STANDARD.encode(rd)}))
        }
    }
    let (cookie, nonce) = b.auth("sample").await;
    let key = TeeKeyPair::generate().public_key();
    let body = attestation_body(&nonce, &Unsigned, &key, &key, &assignment("acme"));
    let (status, v) = b.post("/kbs/v0/attest", Some(&cookie), body).await;
    assert_eq!(status, 401, "{v}");
    assert!(detail(&v).contains("without a host endorsement"), "{v}");

    // A genuine endorsement for tenant acme, used to ask as tenant other.
    let err = b
        .client()
        .attest(&attester_by(host(), "acme"), Some(&assignment("other")))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("endorsed this INSECURE software-TEE sandbox for tenant \"acme\""),
        "{err}"
    );

    // A genuine endorsement for the right tenant, but the tenant has not opted in.
    b.kbs
        .set_reference_values(veil_kbs::SOFTWARE_TEE_TENANTS, &["other".into()])
        .unwrap();
    let err = b
        .client()
        .attest(&attester(), Some(&assignment("acme")))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("has not opted in"), "{err}");
}

/// A broker that allows the software TEE but trusts no host key accepts no software evidence.
#[tokio::test]
async fn software_tee_without_trusted_hosts_accepts_nothing() {
    let b = start_with(
        |c| {
            c.allow_insecure_software_tee = true;
            c.software_tee_hosts.clear();
        },
        vec![],
    )
    .await;
    let err = b
        .client()
        .attest(&attester(), Some(&assignment("acme")))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("not endorsed by a host this broker trusts"),
        "{err}"
    );
}

/// Real SEV-SNP evidence in the shape guest-components sends it (`attestation_report`,
/// `cert_chain`; trustee's own test vector) is read and its signature chain checked by the
/// broker: it is refused only because its report data does not bind this session.
#[tokio::test]
async fn guest_components_snp_evidence_is_verified_not_refused_as_malformed() {
    let b = start_with(|_| {}, vec![]).await;
    let evidence: Value = serde_json::from_slice(
        &std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../veil-attest/testdata/snp/trustee/evidence.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let (cookie, nonce) = b.auth("snp").await;
    let key = TeeKeyPair::generate().public_key();
    let body = serde_json::to_vec(&json!({
        "init-data": null,
        "runtime-data": {"nonce": nonce, "tee-pubkey": key},
        "tee-evidence": {"primary_evidence": evidence, "additional_evidence": ""},
    }))
    .unwrap();
    let (s, v) = b.post("/kbs/v0/attest", Some(&cookie), body).await;
    assert_eq!(s, 401, "{v}");
    assert_eq!(
        v["type"],
        format!("{}BindingMismatch", veil_kbs::ERROR_TYPE_PREFIX)
    );
    assert!(detail(&v).contains("report data"), "{v}");
}

/// A tenant-attested sandbox: it attests with init data of tenant scope before it has a
/// function (its token names the tenant only), then states its assignment with every resource
/// request. Without a statement, with another tenant's, or with one the policy's image pins
/// refuse, nothing is released; the endorsement must be for any function of that tenant.
#[tokio::test]
async fn tenant_attested_sandboxes_state_their_assignment() {
    let b = start_insecure().await;
    b.kbs.set_resource("acme/key/k", b"acme-key").unwrap();
    let tenant_doc =
        |t: &str| veil_kbs::veil_init_data(&json!({"tenant": t, "scope": "tenant"})).unwrap();
    let any = |t: &str| {
        let c = host().endorse(
            "sb-pool",
            t,
            "*",
            SystemTime::now(),
            Duration::from_secs(600),
        );
        SoftwareAttester::new(MEASUREMENT, "", &c).unwrap()
    };
    let stated = |t: &str, digest: &str| {
        json!({"tenant": t, "function": "hello", "image": "local/hello:v1",
               "image_digest": digest})
    };
    let pinned = format!("sha256:{}", "ab".repeat(32));

    let mut c = b.client();
    let token = c
        .attest(&any("acme"), Some(&tenant_doc("acme")))
        .await
        .unwrap();
    let claims = b.kbs.verify_token(&token).unwrap();
    assert_eq!(claims.tenant.as_deref(), Some("acme"));
    assert_eq!(claims.scope.as_deref(), Some("tenant"));
    assert_eq!(claims.function, None);
    let e = c.get_resource("acme/key/k").await.unwrap_err().to_string();
    assert!(e.contains("must state its assignment"), "{e}");
    c.state_assignment(&stated("acme", &pinned)).unwrap();
    assert_eq!(
        c.get_resource("acme/key/k").await.unwrap().as_slice(),
        b"acme-key"
    );
    // Stating another tenant: refused.
    c.state_assignment(&stated("globex", &pinned)).unwrap();
    let e = c.get_resource("acme/key/k").await.unwrap_err().to_string();
    assert!(e.contains("attested to tenant"), "{e}");

    // The image pins apply to the stated assignment.
    b.kbs
        .set_reference_values("image_digest.acme", std::slice::from_ref(&pinned))
        .unwrap();
    let mut c = b.client();
    c.attest(&any("acme"), Some(&tenant_doc("acme")))
        .await
        .unwrap();
    c.state_assignment(&stated("acme", &format!("sha256:{}", "cd".repeat(32))))
        .unwrap();
    let e = c.get_resource("acme/key/k").await.unwrap_err().to_string();
    assert!(
        e.contains("denied the stated assignment") && e.contains("image digest"),
        "{e}"
    );
    c.state_assignment(&stated("acme", &pinned)).unwrap();
    assert_eq!(
        c.get_resource("acme/key/k").await.unwrap().as_slice(),
        b"acme-key"
    );

    // Endorsements: "any function" only with tenant scope, and for that tenant.
    let e = b
        .client()
        .attest(&any("acme"), Some(&assignment("acme")))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("tenant scope only"), "{e}");
    let e = b
        .client()
        .attest(&attester(), Some(&tenant_doc("acme")))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("not for any function of tenant"), "{e}");
    let e = b
        .client()
        .attest(&any("globex"), Some(&tenant_doc("acme")))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("EndorsementMismatch") || e.contains("not for any function"),
        "{e}"
    );
    // A function-scoped token does not take statements.
    let mut c = b.client();
    c.attest(&attester(), Some(&assignment("acme")))
        .await
        .unwrap();
    c.state_assignment(&stated("acme", &pinned)).unwrap();
    let e = c.get_resource("acme/key/k").await.unwrap_err().to_string();
    assert!(
        e.contains("only for sandboxes that attested with tenant scope"),
        "{e}"
    );
}

/// A broker on loopback that answers every attestation with the (unsigned) token `payload`;
/// its challenge offers veil's init-data binding when `veil_like`.
async fn lying_broker(veil_like: bool, payload: &'static str) -> String {
    use axum::routing::post;
    let extra = if veil_like {
        json!({"veil-init-data": "additional-evidence"})
    } else {
        json!("")
    };
    let lying = axum::Router::new()
        .route(
            "/kbs/v0/auth",
            post(move || async move {
                (
                    [("set-cookie", "kbs-session-id=s; Path=/kbs")],
                    axum::Json(json!({"nonce": "bm9uY2U=", "extra-params": extra})),
                )
            }),
        )
        .route(
            "/kbs/v0/attest",
            post(move || async move {
                use base64::engine::general_purpose::URL_SAFE_NO_PAD as U;
                let token = format!(
                    "{}.{}.{}",
                    U.encode(b"{}"),
                    U.encode(payload.as_bytes()),
                    U.encode(b"x")
                );
                axum::Json(json!({ "token": token }))
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, lying).await.unwrap() });
    url
}

/// A sandbox attesting to its tenant ahead of its assignment keeps the session only with
/// veil's broker and a token of tenant scope for exactly its tenant: a broker that answers
/// with another tenant's identity, with a token of no scope, or that is not veil's (it would
/// not check the statements that follow) is refused.
#[tokio::test]
async fn a_token_for_another_tenant_is_refused_by_the_sandbox() {
    let c = host().endorse(
        "sb-pool",
        "acme",
        "*",
        SystemTime::now(),
        Duration::from_secs(600),
    );
    let attester = SoftwareAttester::new(MEASUREMENT, "", &c).unwrap();
    let doc = veil_kbs::veil_init_data(&json!({"tenant": "acme", "scope": "tenant"})).unwrap();
    let victim = r#"{"tenant":"victim","scope":"tenant","exp":9999999999}"#;
    for (veil_like, payload, tenant, why) in [
        (
            true,
            victim,
            "acme",
            "tenant Some(\"victim\"), not to \"acme\"",
        ),
        (
            true,
            r#"{"tenant":"acme","exp":9999999999}"#,
            "acme",
            "not of tenant scope",
        ),
        (false, victim, "victim", "needs veil's key broker"),
    ] {
        let url = lying_broker(veil_like, payload).await;
        let mut client = KbsClient::new(ReqwestTransport::new(url));
        client.attest(&attester, Some(&doc)).await.unwrap();
        let e = client
            .check_tenant_scoped_token(tenant)
            .unwrap_err()
            .to_string();
        assert!(e.contains(why), "{e}");
    }
    // The one combination a sandbox keeps.
    let url = lying_broker(true, victim).await;
    let mut client = KbsClient::new(ReqwestTransport::new(url));
    client.attest(&attester, Some(&doc)).await.unwrap();
    assert!(client.check_tenant_scoped_token("victim").is_ok());
}
