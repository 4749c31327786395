//! Attestation to the tenant's key broker at assignment time, and release of the function's
//! secrets into the sandbox.
//!
//! The agent reaches the broker through its channel: the node relays the HTTP exchange without
//! being able to read what matters (the released values are JWE-encrypted to an ephemeral key
//! that never leaves this process, and the evidence binds that key, the broker's nonce and the
//! assignment — tenant, function and image digest — so neither can be swapped by the host).

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::Full;
use std::collections::BTreeMap;
use veil_attest::Attester;
use veil_kbs::client::{ClientError, KbsClient, Transport};
use veil_proto::mux::{read_body_limited, MuxHandle};
use veil_proto::{Assignment, AttestationPlan, StreamKind};
use zeroize::Zeroizing;

/// Largest broker reply the agent reads.
const MAX_REPLY: usize = 1 << 20;

/// HTTP to the key broker over a `K` substream of the channel.
pub struct MuxTransport {
    mux: MuxHandle,
}

impl Transport for MuxTransport {
    fn send(
        &self,
        req: http::Request<Bytes>,
    ) -> BoxFuture<'_, Result<http::Response<Bytes>, ClientError>> {
        Box::pin(async move {
            let (mut parts, body) = req.into_parts();
            parts
                .headers
                .insert(http::header::HOST, http::HeaderValue::from_static("kbs"));
            let req = hyper::Request::from_parts(parts, Full::new(body));
            let resp =
                self.mux.request(StreamKind::Kbs, req).await.map_err(|e| {
                    ClientError::Transport(format!("over the sandbox channel: {e}"))
                })?;
            let (parts, body) = resp.into_parts();
            let bytes = read_body_limited(body, MAX_REPLY)
                .await
                .map_err(|e| ClientError::Transport(e.to_string()))?;
            Ok(http::Response::from_parts(parts, bytes))
        })
    }
}

/// Secrets released to this sandbox: environment variable → value (wiped on drop).
pub type Secrets = BTreeMap<String, Zeroizing<String>>;

/// What the broker released: secrets for the environment and image decryption keys.
#[derive(Default)]
pub struct Released {
    /// Environment secrets.
    pub secrets: Secrets,
    /// Private keys for encrypted layers.
    pub image_keys: Vec<veil_image::crypt::PrivateKey>,
}

/// The software TEE's self-declared measurement (SHA-384 of the agent binary), computed once in
/// the background while a pooled sandbox waits, so that hashing the binary is not on the
/// cold-start path.
static SELF_MEASUREMENT: std::sync::OnceLock<Result<String, String>> = std::sync::OnceLock::new();

fn measure_self() -> Result<String, String> {
    use sha2::Digest;
    let bytes = std::fs::read("/proc/self/exe").map_err(|e| format!("/proc/self/exe: {e}"))?;
    Ok(hex::encode(sha2::Sha384::digest(&bytes)))
}

/// Start computing the software-TEE measurement in the background (no-op where a hardware
/// TEE exists). Call once at startup.
pub fn precompute_software_measurement() {
    if veil_attest::detect().is_some() {
        return;
    }
    PRECOMPUTING.store(true, std::sync::atomic::Ordering::SeqCst);
    std::thread::spawn(|| {
        let _ = SELF_MEASUREMENT.get_or_init(measure_self);
    });
}

static PRECOMPUTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Block until the ahead-of-time work started by [`precompute_software_measurement`] is done
/// (immediately if none was started). The agent reports healthy only after this, so a pooled
/// sandbox is fully prepared before it is handed out.
pub fn wait_ahead_of_time_work() {
    if PRECOMPUTING.load(std::sync::atomic::Ordering::SeqCst) {
        let _ = SELF_MEASUREMENT.get_or_init(measure_self);
    }
}

/// Pick the attester: SEV-SNP or TDX when the device exists; otherwise the INSECURE software TEE
/// only if the deployment allows it.
fn attester(plan: &AttestationPlan, init_hash: &str) -> Result<Box<dyn Attester>, String> {
    if let Some(a) = veil_attest::detect() {
        return Ok(a);
    }
    if !plan.allow_software_tee {
        return Err(
            "no SEV-SNP or TDX device in this sandbox, and the deployment does not allow \
                    the insecure software TEE"
                .into(),
        );
    }
    tracing::warn!(
        "attesting with the INSECURE software TEE (development only): no hardware TEE here"
    );
    let measurement = SELF_MEASUREMENT.get_or_init(measure_self).clone()?;
    Ok(Box::new(veil_attest::software::SoftwareAttester::new(
        &measurement,
        init_hash,
    )))
}

/// Attest and fetch every secret of `plan`. Errors name the step and never a secret value.
pub async fn attest_and_fetch(
    mux: &MuxHandle,
    a: &Assignment,
    plan: &AttestationPlan,
) -> Result<Released, String> {
    // Everything the (untrusted) node chose about this sandbox is bound into the evidence, so
    // the tenant's broker policy can check it: who, which image, which secrets go into which
    // variables, and the plain environment.
    let init_data = serde_json::json!({
        "tenant": a.tenant,
        "function": a.function,
        "image_digest": a.manifest_digest,
        "secrets": plan.secrets,
        "image_keys": plan.image_keys,
        "env": a.env,
    });
    let init_hash = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(init_data.to_string().as_bytes()))
    };
    let attester = attester(plan, &init_hash)?;
    let mut client = KbsClient::new(MuxTransport { mux: mux.clone() });
    client
        .attest(attester.as_ref(), &init_data)
        .await
        .map_err(|e| format!("attestation to the key broker failed: {e}"))?;
    let mut out = Secrets::new();
    for (env, path) in &plan.secrets {
        let value = client
            .get_resource(path)
            .await
            .map_err(|e| format!("secret {env} ({path}): {e}"))?;
        let text = String::from_utf8(value.to_vec())
            .map_err(|_| format!("secret {env} ({path}) is not UTF-8 text"))?;
        if text.contains('\0') {
            return Err(format!("secret {env} ({path}) contains a NUL byte"));
        }
        out.insert(env.clone(), Zeroizing::new(text));
    }
    let mut image_keys = Vec::new();
    for path in &plan.image_keys {
        let pem = client
            .get_resource(path)
            .await
            .map_err(|e| format!("image key {path}: {e}"))?;
        let pem =
            std::str::from_utf8(&pem).map_err(|_| format!("image key {path} is not PEM text"))?;
        let key = veil_image::crypt::PrivateKey::from_pem(pem)
            .map_err(|e| format!("image key {path}: {e}"))?;
        image_keys.push(key);
    }
    tracing::info!(
        function = %a.function,
        secrets = out.len(),
        image_keys = image_keys.len(),
        "attested; secrets and keys released to the sandbox"
    );
    Ok(Released {
        secrets: out,
        image_keys,
    })
}
