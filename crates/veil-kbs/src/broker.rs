//! The broker itself: configuration, storage, verifiers, policies and the HTTP router.

use crate::error::{KbsError, Result};
use crate::parse::{self, parse_resource_path, MAX_BODY};
use crate::policy::{Policy, DEFAULT_ATTESTATION_POLICY, DEFAULT_RESOURCE_POLICY};
use crate::store::{PolicyKind, Store};
use crate::token::{self, TokenClaims};
use crate::{server, session};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use veil_attest::{TeeKind, Verifier};

/// Broker configuration.
#[derive(Debug, Clone)]
pub struct KbsConfig {
    /// Where `kbs.db` and the key files live (created if missing).
    pub state_dir: PathBuf,
    /// Let the policy accept the insecure software TEE (visible to it as
    /// `input.config.allow_insecure`). Development only.
    pub allow_insecure_software_tee: bool,
    /// Host keys (Ed25519, hex) whose endorsements of software-TEE evidence this broker
    /// accepts: the nodes whose sandboxes may use the software TEE. Software evidence not
    /// endorsed by one of them is refused, so a local process cannot make it up.
    pub software_tee_hosts: Vec<String>,
    /// Accept *unendorsed* sample evidence, from any client (what trustee's sample attester
    /// sends), visible to the policy as `input.config.allow_unendorsed_sample`. It proves
    /// nothing and anyone who reaches the broker can make it up: the equivalent of trustee
    /// accepting sample evidence. Such a token names no tenant, so it reaches only resources
    /// the resource policy releases explicitly. Needs `allow_insecure_software_tee`; only for a
    /// standalone development broker, never the one embedded in `veil up`.
    pub allow_unendorsed_sample: bool,
    /// Lifetime of attestation tokens.
    pub token_ttl: Duration,
    /// Lifetime of a challenge nonce.
    pub nonce_ttl: Duration,
    /// Lifetime of a session.
    pub session_ttl: Duration,
}

impl KbsConfig {
    /// Defaults (tokens and sessions 300 s, nonces 60 s, software TEE refused) for `state_dir`.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            state_dir: state_dir.into(),
            allow_insecure_software_tee: false,
            software_tee_hosts: Vec::new(),
            allow_unendorsed_sample: false,
            token_ttl: Duration::from_secs(300),
            nonce_ttl: Duration::from_secs(60),
            session_ttl: Duration::from_secs(300),
        }
    }
}

impl Default for KbsConfig {
    fn default() -> Self {
        Self::new("kbs-state")
    }
}

/// The key broker.
pub struct Kbs {
    pub(crate) cfg: KbsConfig,
    pub(crate) store: Store,
    pub(crate) verifiers: HashMap<TeeKind, Arc<dyn Verifier>>,
    pub(crate) attestation_policy: RwLock<Arc<Policy>>,
    pub(crate) resource_policy: RwLock<Arc<Policy>>,
    pub(crate) sessions: session::Sessions,
    pub(crate) token_key: ed25519_dalek::SigningKey,
    pub(crate) admin_key: ed25519_dalek::VerifyingKey,
    /// The attestation policy's verdicts on assignment statements.
    pub(crate) decisions: crate::decisions::DecisionCache,
}

/// Register the hardware verifiers of `veil-attest` (SEV-SNP and TDX). Tests and special
/// deployments can replace them with [`Kbs::open_with_verifiers`].
fn register_hardware_verifiers(map: &mut HashMap<TeeKind, Arc<dyn Verifier>>) {
    map.insert(TeeKind::Snp, Arc::new(veil_attest::snp::SnpVerifier::new()));
    map.insert(TeeKind::Tdx, Arc::new(veil_attest::tdx::TdxVerifier::new()));
}

fn default_verifiers(cfg: &KbsConfig) -> Result<HashMap<TeeKind, Arc<dyn Verifier>>> {
    let mut map: HashMap<TeeKind, Arc<dyn Verifier>> = HashMap::new();
    let software = veil_attest::software::SoftwareVerifier::trusting(&cfg.software_tee_hosts)
        .map_err(|e| KbsError::InvalidValue(e.to_string()))?
        .accepting_unendorsed(cfg.allow_insecure_software_tee && cfg.allow_unendorsed_sample);
    map.insert(TeeKind::Software, Arc::new(software));
    register_hardware_verifiers(&mut map);
    Ok(map)
}

fn sample_attestation_input() -> serde_json::Value {
    serde_json::json!({
        "claims": {"tee": "software", "insecure": true, "measurement": "00", "report_data": "00",
                   "init_data": "", "debug": false, "details": {"endorsement": null}},
        "init_data": {"tenant": "t", "function": "f", "image_digest": format!("sha256:{}", "0".repeat(64))},
        "init_data_claims": {"veil.tenant": "t"},
        "init_data_binding": "none",
        "phase": "assignment",
        "reference_values": {},
        "config": {"allow_insecure": false, "allow_unendorsed_sample": false},
    })
}

fn sample_resource_input() -> serde_json::Value {
    serde_json::json!({
        "token": {"tenant": "t", "function": "f", "tee": "software", "insecure": true,
                  "measurement": "00", "image_digest": format!("sha256:{}", "0".repeat(64))},
        "resource": {"repository": "t", "type": "key", "tag": "k"},
    })
}

impl Kbs {
    /// Open (or create) the broker's state in `cfg.state_dir`: the database, the token signing
    /// key (`token.key`, 0600) and the admin key pair (`admin.key` 0600, `admin.pub`).
    pub fn open(cfg: KbsConfig) -> Result<Arc<Kbs>> {
        Self::open_with_verifiers(cfg, Vec::new())
    }

    /// Like [`Kbs::open`], with extra verifiers that replace the built-in one for their TEE kind.
    pub fn open_with_verifiers(cfg: KbsConfig, extra: Vec<Arc<dyn Verifier>>) -> Result<Arc<Kbs>> {
        let dir = &cfg.state_dir;
        std::fs::create_dir_all(dir).map_err(|source| KbsError::Io {
            path: dir.clone(),
            source,
        })?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(
                |source| KbsError::Io {
                    path: dir.clone(),
                    source,
                },
            )?;
        }
        let store = Store::open(&dir.join("kbs.db"))?;
        let token_key = token::load_or_create_signing_key(&dir.join("token.key"))?;
        let admin_key =
            token::load_or_create_admin_key(&dir.join("admin.key"), &dir.join("admin.pub"))?;
        let att = match store.policy(PolicyKind::Attestation)? {
            Some(rego) => Policy::compile(&rego, sample_attestation_input())?,
            None => Policy::compile(DEFAULT_ATTESTATION_POLICY, sample_attestation_input())?,
        };
        let res = match store.policy(PolicyKind::Resource)? {
            Some(rego) => Policy::compile(&rego, sample_resource_input())?,
            None => Policy::compile(DEFAULT_RESOURCE_POLICY, sample_resource_input())?,
        };
        let mut verifiers = default_verifiers(&cfg)?;
        for v in extra {
            verifiers.insert(v.tee(), v);
        }
        if cfg.allow_insecure_software_tee {
            tracing::warn!(
                hosts = cfg.software_tee_hosts.len(),
                "this key broker accepts the INSECURE software TEE for tenants listed in the \
                 reference value `{}`: {}",
                crate::policy::SOFTWARE_TEE_TENANTS,
                veil_attest::software::TRUSTS
            );
            if cfg.allow_unendorsed_sample {
                tracing::warn!(
                    "this key broker ALSO accepts UNENDORSED sample evidence from ANY client: \
                     it proves nothing, anyone who can reach the broker can make it up, and \
                     the resource policy alone decides what such a client gets"
                );
            } else if cfg.software_tee_hosts.is_empty() {
                tracing::warn!(
                    "no software-TEE host key is trusted, so no software evidence can pass"
                );
            }
        }
        Ok(Arc::new(Kbs {
            sessions: session::Sessions::default(),
            cfg,
            store,
            verifiers,
            attestation_policy: RwLock::new(Arc::new(att)),
            resource_policy: RwLock::new(Arc::new(res)),
            token_key,
            admin_key,
            decisions: Default::default(),
        }))
    }

    /// The HTTP API.
    pub fn router(self: &Arc<Self>) -> axum::Router {
        server::router(self.clone())
    }

    /// The broker's routes (all under `/kbs/v0/`) without a fallback, to merge into another
    /// router — `veil up` serves the embedded broker next to the gateway.
    pub fn embeddable_router(self: &Arc<Self>) -> axum::Router {
        server::embeddable(self.clone())
    }

    /// The configuration.
    pub fn config(&self) -> &KbsConfig {
        &self.cfg
    }

    /// Path of the admin private key (for [`admin_token`]).
    pub fn admin_key_path(&self) -> PathBuf {
        self.cfg.state_dir.join("admin.key")
    }

    /// The TEE kinds this broker has verifiers for.
    pub fn supported_tees(&self) -> Vec<TeeKind> {
        let mut v: Vec<TeeKind> = self.verifiers.keys().copied().collect();
        v.sort_by_key(|k| k.to_string());
        v
    }

    /// Store a resource at `<repo>/<type>/<tag>` (at most [`MAX_BODY`] bytes).
    pub fn set_resource(&self, path: &str, value: &[u8]) -> Result<()> {
        let p = parse_resource_path(path).map_err(|e| KbsError::InvalidPath {
            path: path.to_string(),
            reason: e.detail,
        })?;
        if value.len() > MAX_BODY {
            return Err(KbsError::InvalidValue(format!(
                "resource is larger than {MAX_BODY} bytes"
            )));
        }
        self.store.set_resource(&p.to_string(), value)
    }

    /// Delete a resource; false if there was none.
    pub fn delete_resource(&self, path: &str) -> Result<bool> {
        let p = parse_resource_path(path).map_err(|e| KbsError::InvalidPath {
            path: path.to_string(),
            reason: e.detail,
        })?;
        self.store.delete_resource(&p.to_string())
    }

    /// Paths of all resources (never their values).
    pub fn list_resources(&self) -> Result<Vec<String>> {
        self.store.list_resources()
    }

    /// Replace the accepted values of reference value `name` (e.g. `measurement`, `init_data`,
    /// `image_digest`: hex or `<alg>:<hex>`, stored lowercase; `image` and `signature_policy`:
    /// an image reference and a resource path, kept as written).
    pub fn set_reference_values(&self, name: &str, values: &[String]) -> Result<()> {
        parse::check_segment("reference value name", name).map_err(KbsError::InvalidValue)?;
        parse::check_reference_values(name, values).map_err(KbsError::InvalidValue)?;
        let normalized = parse::normalize_reference_values(name, values);
        self.store.set_reference_values(name, &normalized)?;
        self.decisions.invalidate();
        Ok(())
    }

    /// All reference values.
    pub fn reference_values(&self) -> Result<std::collections::BTreeMap<String, Vec<String>>> {
        self.store.reference_values()
    }

    /// Compile and install the attestation policy (Rego, `package policy`).
    pub fn set_attestation_policy(&self, rego: &str) -> Result<()> {
        let p = Policy::compile(rego, sample_attestation_input())?;
        self.store.set_policy(PolicyKind::Attestation, rego)?;
        *self
            .attestation_policy
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Arc::new(p);
        self.decisions.invalidate();
        Ok(())
    }

    /// Compile and install the resource policy (Rego, `package policy`).
    pub fn set_resource_policy(&self, rego: &str) -> Result<()> {
        let p = Policy::compile(rego, sample_resource_input())?;
        self.store.set_policy(PolicyKind::Resource, rego)?;
        *self
            .resource_policy
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Arc::new(p);
        Ok(())
    }

    /// The attestation policy in force (Rego text).
    pub fn attestation_policy(&self) -> String {
        self.attestation_policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .source
            .clone()
    }

    /// The resource policy in force (Rego text).
    pub fn resource_policy(&self) -> String {
        self.resource_policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .source
            .clone()
    }

    /// Verify an attestation token issued by this broker (signature, issuer, expiry).
    pub fn verify_token(&self, token: &str) -> Result<TokenClaims, String> {
        token::verify_attestation_token(&self.token_key.verifying_key(), token)
    }

    /// The public key attestation tokens are signed with (Ed25519, hex).
    pub fn token_public_key(&self) -> String {
        hex::encode(self.token_key.verifying_key().as_bytes())
    }
}
