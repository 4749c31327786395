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

/// The tenant's image signature policy and the public keys its `keyPath`s name, all
/// released by the broker (never read from the host).
pub struct ImagePolicy {
    /// Broker resource the policy came from (for messages).
    pub source: String,
    /// The parsed policy.
    pub policy: veil_image::signature::Policy,
    /// `kbs:///…` key path → PEM public key.
    pub keys: BTreeMap<String, Vec<u8>>,
}

/// What the broker released: secrets for the environment, image decryption keys and the
/// image signature policy; and the attested session, for keys the image itself names
/// (Confidential Containers key-provider layers).
#[derive(Default)]
pub struct Released {
    /// Environment secrets.
    pub secrets: Secrets,
    /// Keys for encrypted layers: JWE private keys and raw key-broker keys.
    pub keys: veil_image::crypt::KeyRing,
    /// The signature policy, if the deployment names one.
    pub policy: Option<ImagePolicy>,
    /// The attested broker session.
    pub session: Option<KbsClient<MuxTransport>>,
    /// Time the attestation itself took on this path, in milliseconds (0 for a sandbox that
    /// attested ahead of its assignment).
    pub attest_ms: f64,
}

/// Length of a raw AES-256 key-encryption key (Confidential Containers key-provider layers).
const KEK_LEN: usize = veil_image::crypt::KBS_KEK_LEN;

impl Released {
    /// Fetch the key-encryption key `kid` (`kbs:///<repo>/<type>/<tag>`, named by a layer's
    /// key-provider annotation) from the attested broker into the key ring, unless present.
    pub async fn fetch_layer_kek(&mut self, kid: &str) -> Result<(), String> {
        if self.keys.kbs_key(kid).is_some() {
            return Ok(());
        }
        let Some(client) = self.session.as_ref() else {
            return Err(format!(
                "needs key {kid} from the key broker, but the deployment does not attest to one"
            ));
        };
        let path = veil_image::crypt::KbsResource::parse(kid)
            .map_err(|e| e.to_string())?
            .path();
        let key = client
            .get_resource(&path)
            .await
            .map_err(|e| format!("key {kid}: {e}"))?;
        if key.len() != KEK_LEN {
            return Err(format!("key {kid} is not a {KEK_LEN}-byte AES-256 key"));
        }
        self.keys.add_kbs_key(kid, key.to_vec());
        Ok(())
    }
}

/// The software TEE's self-declared measurement (SHA-384 of the agent binary), computed once in
/// the background while a pooled sandbox waits, so that hashing the binary is not on the
/// cold-start path.
static SELF_MEASUREMENT: std::sync::OnceLock<Result<String, String>> = std::sync::OnceLock::new();

fn measure_self() -> Result<String, String> {
    use sha2::Digest;
    // A namespace sandbox's node hashed this very binary (the one it executed) once for all its
    // sandboxes. Taken only if it has the form of a SHA-384.
    // (Never in a VM guest, whose PID 1 gets kernel command-line words as environment.)
    let from_node = (!crate::guest::in_guest())
        .then(|| std::env::var(MEASUREMENT_ENV).ok())
        .flatten();
    if let Some(h) = from_node {
        if h.len() == 96
            && h.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        {
            return Ok(h);
        }
    }
    let bytes = std::fs::read("/proc/self/exe").map_err(|e| format!("/proc/self/exe: {e}"))?;
    Ok(hex::encode(sha2::Sha384::digest(&bytes)))
}

/// The variable a namespace sandbox's node gives the agent its binary's SHA-384 in (the same
/// name as `veil_sandbox::process::AGENT_MEASUREMENT_ENV`; the agent does not link the
/// backends).
const MEASUREMENT_ENV: &str = "VEIL_AGENT_MEASUREMENT";

/// Start the ahead-of-time work in the background: the software-TEE measurement (skipped where
/// a hardware TEE exists) and the signature warm-up. Call once at startup.
///
/// The warm-up runs the signature-verification code once (the crypto backend initialises
/// itself on first use), so that checking an image signature costs only the check on a cold
/// start.
pub fn precompute_software_measurement() {
    PRECOMPUTING.store(true, std::sync::atomic::Ordering::SeqCst);
    let software = veil_attest::detect().is_none();
    std::thread::spawn(move || {
        // Marks the work done however this thread ends, so health reporting never waits forever.
        struct Done;
        impl Drop for Done {
            fn drop(&mut self) {
                let _ = AHEAD_OF_TIME_DONE.set(());
            }
        }
        let _done = Done;
        if software {
            let _ = SELF_MEASUREMENT.get_or_init(measure_self);
        }
        if !veil_image::signature::warm_up() {
            tracing::warn!("signature code warm-up failed; the first signature check will say why");
        }
    });
}

static AHEAD_OF_TIME_DONE: std::sync::OnceLock<()> = std::sync::OnceLock::new();

static PRECOMPUTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Block until the ahead-of-time work started by [`precompute_software_measurement`] is done
/// (immediately if none was started). The agent reports healthy only after this, so a pooled
/// sandbox is fully prepared before it is handed out.
pub fn wait_ahead_of_time_work() {
    if PRECOMPUTING.load(std::sync::atomic::Ordering::SeqCst) {
        AHEAD_OF_TIME_DONE.wait();
    }
}

/// Pick the attester: SEV-SNP or TDX when the device exists; otherwise the INSECURE software TEE
/// only if the deployment allows it.
fn attester(
    allow_software_tee: bool,
    software_tee: Option<&veil_proto::SoftwareTeeCredential>,
    init_hash: &str,
) -> Result<Box<dyn Attester>, String> {
    if let Some(a) = veil_attest::detect() {
        return Ok(a);
    }
    if !allow_software_tee {
        return Err(
            "no SEV-SNP or TDX device in this sandbox, and the deployment does not allow \
                    the insecure software TEE"
                .into(),
        );
    }
    tracing::warn!(
        "attesting with the INSECURE software TEE (development only): no hardware TEE here"
    );
    let cred = software_tee.ok_or(
        "the node gave this sandbox no software-TEE credential, so it cannot attest with the \
         insecure software TEE",
    )?;
    let measurement = SELF_MEASUREMENT.get_or_init(measure_self).clone()?;
    let credential = veil_attest::software::Credential {
        signing_key: cred.signing_key.clone(),
        endorsement: cred.endorsement.clone(),
    };
    veil_attest::software::SoftwareAttester::new(&measurement, init_hash, &credential)
        .map(|a| Box::new(a) as Box<dyn Attester>)
        .map_err(|e| e.to_string())
}

/// Everything the (untrusted) node chose about this sandbox, as its init data (or its
/// assignment statement) carries it, so the tenant's broker policy can check it: who, which
/// image, which secrets go into which variables, and the plain environment.
fn assignment_json(a: &Assignment, plan: &AttestationPlan) -> serde_json::Value {
    serde_json::json!({
        "tenant": a.tenant,
        "function": a.function,
        "image": a.image,
        "image_digest": a.manifest_digest,
        "secrets": plan.secrets,
        "image_keys": plan.image_keys,
        "signature_policy": plan.signature_policy,
        "env": a.env,
    })
}

/// Attest with `init_data` (an init-data document) and return the attested session.
async fn attest_with(
    mux: &MuxHandle,
    init_doc: &str,
    allow_software_tee: bool,
    software_tee: Option<&veil_proto::SoftwareTeeCredential>,
) -> Result<KbsClient<MuxTransport>, String> {
    let init_hash = veil_kbs::parse_init_data(init_doc)
        .map(|p| hex::encode(p.digest))
        .map_err(|e| format!("init-data document: {}", e.detail))?;
    let attester = attester(allow_software_tee, software_tee, &init_hash)?;
    let mut client = KbsClient::new(MuxTransport { mux: mux.clone() });
    client
        .attest(attester.as_ref(), Some(init_doc))
        .await
        .map_err(|e| format!("attestation to the key broker failed: {e}"))?;
    Ok(client)
}

/// A sandbox attested to one tenant ahead of demand (a tenant-attested pool).
pub struct Prepared {
    /// The tenant it attested to; it serves no other.
    pub tenant: String,
    /// It attested with the INSECURE software TEE.
    pub software: bool,
    /// The attested session.
    pub client: KbsClient<MuxTransport>,
}

/// Attest to `tenant` with init data of tenant scope, before any function is assigned. A
/// veil broker that answers with a token naming another tenant is refused.
pub async fn prepare(mux: &MuxHandle, p: &veil_proto::Preparation) -> Result<Prepared, String> {
    let doc = veil_kbs::veil_init_data(&serde_json::json!({
        "tenant": p.tenant,
        "scope": veil_kbs::parse::TENANT_SCOPE,
    }))
    .map_err(|e| format!("could not write the init-data document: {e}"))?;
    let software = veil_attest::detect().is_none();
    let client = attest_with(mux, &doc, p.allow_software_tee, p.software_tee.as_ref()).await?;
    // Only veil's broker checks the statements a tenant-attested sandbox sends later; a token
    // from any other (or one for another tenant, or not of tenant scope) is refused.
    client
        .check_tenant_scoped_token(&p.tenant)
        .map_err(|e| e.to_string())?;
    tracing::info!(tenant = %p.tenant, "attested to the tenant ahead of assignment");
    Ok(Prepared {
        tenant: p.tenant.clone(),
        software,
        client,
    })
}

/// Attest (or, for a sandbox `prepared` for the tenant, state the assignment over its session)
/// and fetch every secret of `plan`. Errors name the step and never a secret value.
pub async fn attest_and_fetch(
    mux: &MuxHandle,
    a: &Assignment,
    plan: &AttestationPlan,
    prepared: Option<Prepared>,
) -> Result<Released, String> {
    let init_data = assignment_json(a, plan);
    let t_attest = std::time::Instant::now();
    let ahead = prepared.is_some();
    let client = match prepared {
        Some(mut p) => {
            if p.tenant != a.tenant {
                return Err(format!(
                    "this sandbox attested to tenant {:?}, not to {:?}",
                    p.tenant, a.tenant
                ));
            }
            if p.software && !plan.allow_software_tee {
                return Err(
                    "this sandbox attested with the INSECURE software TEE, which the deployment \
                     does not allow"
                        .into(),
                );
            }
            p.client
                .state_assignment(&init_data)
                .map_err(|e| format!("stating the assignment: {e}"))?;
            p.client
        }
        None => {
            // As a CoCo init-data document (`veil.*` data), which veil's broker and trustee
            // both read; its digest is bound into the evidence through the runtime data where
            // the broker takes it (veil's), since this sandbox learned its assignment after
            // launch.
            let init_doc = veil_kbs::veil_init_data(&init_data)
                .map_err(|e| format!("could not write the init-data document: {e}"))?;
            attest_with(
                mux,
                &init_doc,
                plan.allow_software_tee,
                plan.software_tee.as_ref(),
            )
            .await?
        }
    };
    let attest_ms = if ahead {
        0.0
    } else {
        t_attest.elapsed().as_secs_f64() * 1000.0
    };
    // Everything is released over the one attested session; the fetches do not depend on each
    // other (the policy's keys on the policy only), so they run concurrently.
    let client_ref = &client;
    let secrets = async {
        let values = futures::future::join_all(plan.secrets.iter().map(|(env, path)| async move {
            let value = client_ref
                .get_resource(path)
                .await
                .map_err(|e| format!("secret {env} ({path}): {e}"))?;
            let text = String::from_utf8(value.to_vec())
                .map_err(|_| format!("secret {env} ({path}) is not UTF-8 text"))?;
            if text.contains('\0') {
                return Err(format!("secret {env} ({path}) contains a NUL byte"));
            }
            Ok::<_, String>((env.clone(), Zeroizing::new(text)))
        }))
        .await;
        values.into_iter().collect::<Result<Secrets, String>>()
    };
    // Image keys: a PEM private key (ocicrypt JWE recipients), or 32 raw bytes (a key-broker
    // key-encryption key, as Confidential Containers key-provider layers name them).
    let image_keys = async {
        let fetched = futures::future::join_all(plan.image_keys.iter().map(|path| async move {
            let bytes = client_ref
                .get_resource(path)
                .await
                .map_err(|e| format!("image key {path}: {e}"))?;
            Ok::<_, String>((path, bytes))
        }))
        .await;
        let mut keys = veil_image::crypt::KeyRing::new();
        for r in fetched {
            let (path, bytes) = r?;
            if bytes.len() == KEK_LEN {
                keys.add_kbs_key(format!("kbs:///{path}"), bytes.to_vec());
                continue;
            }
            let pem = std::str::from_utf8(&bytes).map_err(|_| {
                format!("image key {path} is neither PEM text nor a {KEK_LEN}-byte key")
            })?;
            let key = veil_image::crypt::PrivateKey::from_pem(pem)
                .map_err(|e| format!("image key {path}: {e}"))?;
            keys.add_private_key(key);
        }
        Ok::<_, String>(keys)
    };
    let policy = async {
        match &plan.signature_policy {
            Some(path) => fetch_policy(client_ref, a, path)
                .await
                .map(Some)
                .map_err(|e| format!("image {}: {e}", a.image)),
            None => Ok(None),
        }
    };
    let (out, keys, policy) = futures::future::try_join3(secrets, image_keys, policy).await?;
    tracing::info!(
        function = %a.function,
        secrets = out.len(),
        image_keys = plan.image_keys.len(),
        signature_policy = plan.signature_policy.is_some(),
        "attested; secrets and keys released to the sandbox"
    );
    Ok(Released {
        secrets: out,
        keys,
        policy,
        session: Some(client),
        attest_ms,
    })
}

/// Fetch the signature policy and every public key it names for this image from the broker.
async fn fetch_policy(
    client: &KbsClient<MuxTransport>,
    a: &Assignment,
    path: &str,
) -> Result<ImagePolicy, String> {
    let bytes = client
        .get_resource(path)
        .await
        .map_err(|e| format!("signature policy {path}: {e}"))?;
    let policy = veil_image::signature::Policy::parse(&bytes)
        .map_err(|e| format!("signature policy {path}: {e}"))?;
    let reference: veil_image::Reference = a
        .image
        .parse()
        .map_err(|e| format!("image reference {}: {e}", a.image))?;
    let mut rpaths = Vec::new();
    for kp in policy.key_paths_for(&reference) {
        let Some(rpath) = kp.strip_prefix("kbs:///").map(str::to_string) else {
            return Err(format!(
                "signature policy {path}: keyPath {kp:?} is not a key-broker resource; inside \
                 the sandbox, keys come from the broker (kbs:///<repo>/<type>/<tag>), never \
                 from the host"
            ));
        };
        rpaths.push((kp, rpath));
    }
    let fetched = futures::future::join_all(rpaths.into_iter().map(|(kp, rpath)| async move {
        let pem = client
            .get_resource(&rpath)
            .await
            .map_err(|e| format!("signature policy {path}: public key {kp}: {e}"))?;
        Ok::<_, String>((kp, pem.to_vec()))
    }))
    .await;
    let keys = fetched
        .into_iter()
        .collect::<Result<BTreeMap<String, Vec<u8>>, String>>()?;
    Ok(ImagePolicy {
        source: path.to_string(),
        policy,
        keys,
    })
}

#[cfg(test)]
mod tests {
    /// The node relays the statement under the name the broker reads.
    #[test]
    fn the_node_relays_the_statement_header() {
        assert_eq!(
            veil_kbs::statement::STATEMENT_HEADER,
            veil_proto::KBS_STATEMENT_HEADER
        );
    }
}
