//! Signed tokens: compact JWS (`alg: EdDSA`, Ed25519) for attestation tokens and admin tokens,
//! and the key files they are signed with.

use crate::error::{KbsError, Result};
use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};
use zeroize::Zeroizing;

/// Issuer of attestation tokens.
pub const ISSUER: &str = "veil-kbs";
/// Subject of admin tokens.
pub const ADMIN_SUBJECT: &str = "veil-kbs-admin";
/// Longest lifetime of an admin token the broker accepts.
pub const ADMIN_TOKEN_MAX_TTL_SECS: u64 = 600;
/// Clock skew tolerated on `iat`.
const SKEW_SECS: u64 = 30;

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The claims of an attestation token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenClaims {
    /// Issuer, always [`ISSUER`].
    pub iss: String,
    /// Issued at (seconds since the epoch).
    pub iat: u64,
    /// Expires at (seconds since the epoch).
    pub exp: u64,
    /// Unique token id (hex).
    pub jti: String,
    /// TEE kind (`snp`, `tdx`, `software`).
    pub tee: veil_attest::TeeKind,
    /// True for the insecure software TEE.
    pub insecure: bool,
    /// Launch measurement (hex).
    pub measurement: String,
    /// Tenant the sandbox was assigned to, when its assignment is bound to the evidence (or
    /// endorsed, for the software TEE). A token without one reaches only what the resource
    /// policy allows explicitly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Function the sandbox was assigned to (with `tenant`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<String>,
    /// Image manifest digest the sandbox attested to (with `tenant`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,
    /// How the init data was bound to the evidence: `runtime` (its digest in the runtime data,
    /// veil's late binding), `launch` (HOSTDATA/MRCONFIGID), `endorsed` (the software TEE's
    /// host endorsement), `none` (not bound: unendorsed sample evidence), or absent when no init
    /// data was sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_data_binding: Option<String>,
    /// `tenant` for a sandbox attested to its tenant before it had a function: its resource
    /// requests must carry an assignment statement ([`crate::statement`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// The verified claims, kept in tenant-scoped tokens so that the attestation policy can be
    /// evaluated again with the stated assignment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attested: Option<veil_attest::Claims>,
    /// The sandbox's ephemeral key that resources are encrypted to.
    #[serde(rename = "tee-pubkey")]
    pub tee_pubkey: kbs_types::TeePubKey,
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    alg: String,
    typ: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct AdminClaims {
    sub: String,
    iat: u64,
    exp: u64,
}

fn b64_json<T: Serialize>(v: &T) -> Result<String> {
    let j = serde_json::to_vec(v).map_err(|e| KbsError::Token(e.to_string()))?;
    Ok(URL_SAFE_NO_PAD.encode(j))
}

/// Sign `claims` as a compact JWS.
pub(crate) fn sign<C: Serialize>(key: &SigningKey, claims: &C) -> Result<String> {
    let header = Header {
        alg: "EdDSA".into(),
        typ: "JWT".into(),
    };
    let input = format!("{}.{}", b64_json(&header)?, b64_json(claims)?);
    let sig = key.sign(input.as_bytes());
    Ok(format!(
        "{input}.{}",
        URL_SAFE_NO_PAD.encode(sig.to_bytes())
    ))
}

/// Verify a compact JWS signed with `key` and return its claims. Messages never echo the token.
pub(crate) fn verify<C: DeserializeOwned>(key: &VerifyingKey, token: &str) -> Result<C, String> {
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("token is not a compact JWS".into());
    };
    let header: Header = URL_SAFE_NO_PAD
        .decode(h)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or("token header is malformed")?;
    if header.alg != "EdDSA" {
        return Err(format!("token algorithm {:?} is not accepted", header.alg));
    }
    let sig: [u8; 64] = URL_SAFE_NO_PAD
        .decode(s)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or("token signature is malformed")?;
    let sig = ed25519_dalek::Signature::from_bytes(&sig);
    key.verify_strict(format!("{h}.{c}").as_bytes(), &sig)
        .map_err(|_| "token signature does not verify".to_string())?;
    let claims = URL_SAFE_NO_PAD
        .decode(c)
        .map_err(|_| "token claims are malformed".to_string())?;
    serde_json::from_slice(&claims).map_err(|e| format!("token claims are malformed: {e}"))
}

/// Verify an attestation token: signature, issuer and expiry.
pub(crate) fn verify_attestation_token(
    key: &VerifyingKey,
    token: &str,
) -> Result<TokenClaims, String> {
    let claims: TokenClaims = verify(key, token)?;
    if claims.iss != ISSUER {
        return Err("token was not issued by this broker".into());
    }
    if now_secs() >= claims.exp {
        return Err("token has expired".into());
    }
    Ok(claims)
}

/// Verify an admin token: signature, subject, `exp` in the future and at most 10 minutes away.
pub(crate) fn verify_admin_token(key: &VerifyingKey, token: &str) -> Result<(), String> {
    let c: AdminClaims = verify(key, token)?;
    let now = now_secs();
    if c.sub != ADMIN_SUBJECT {
        return Err("not an admin token".into());
    }
    if now >= c.exp {
        return Err("admin token has expired".into());
    }
    if c.exp > now + ADMIN_TOKEN_MAX_TTL_SECS + SKEW_SECS || c.iat > now + SKEW_SECS {
        return Err("admin token lives longer than 10 minutes".into());
    }
    Ok(())
}

/// Make an admin token valid for `ttl_secs` (at most 600) with the admin private key in
/// `private_key_path` (as created by the broker at first start).
pub fn admin_token_with_ttl(private_key_path: &Path, ttl_secs: u64) -> Result<String> {
    let key = read_signing_key(private_key_path)?;
    let now = now_secs();
    sign(
        &key,
        &AdminClaims {
            sub: ADMIN_SUBJECT.into(),
            iat: now,
            exp: now + ttl_secs.min(ADMIN_TOKEN_MAX_TTL_SECS),
        },
    )
}

/// Make an admin token (valid for 5 minutes) with the admin private key in `private_key_path`.
pub fn admin_token(private_key_path: &Path) -> Result<String> {
    admin_token_with_ttl(private_key_path, 300)
}

/// An admin token with explicit times, for tests of expiry handling.
#[doc(hidden)]
pub fn admin_token_at(private_key_path: &Path, iat: u64, exp: u64) -> Result<String> {
    let key = read_signing_key(private_key_path)?;
    sign(
        &key,
        &AdminClaims {
            sub: ADMIN_SUBJECT.into(),
            iat,
            exp,
        },
    )
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> KbsError + '_ {
    move |source| KbsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn read_hex32(path: &Path) -> Result<Zeroizing<[u8; 32]>> {
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(io_err(path))?);
    let mut out = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(text.trim(), out.as_mut_slice()).map_err(|_| KbsError::KeyFile {
        path: path.to_path_buf(),
        reason: "expected 64 hex digits".into(),
    })?;
    Ok(out)
}

/// Read an Ed25519 private key file (hex seed).
pub(crate) fn read_signing_key(path: &Path) -> Result<SigningKey> {
    Ok(SigningKey::from_bytes(&*read_hex32(path)?))
}

/// Read an Ed25519 public key file (hex).
pub(crate) fn read_verifying_key(path: &Path) -> Result<VerifyingKey> {
    VerifyingKey::from_bytes(&*read_hex32(path)?).map_err(|_| KbsError::KeyFile {
        path: path.to_path_buf(),
        reason: "not an Ed25519 public key".into(),
    })
}

/// Write a file that must not exist yet with mode `mode`.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(contents).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// Load the private key at `path`, or create it (mode 0600) if it does not exist.
pub(crate) fn load_or_create_signing_key(path: &Path) -> Result<SigningKey> {
    if path.exists() {
        return read_signing_key(path);
    }
    let seed = Zeroizing::new(crate::jwe::random_bytes::<32>());
    let text = Zeroizing::new(format!("{}\n", hex::encode(seed.as_slice())));
    write_new(path, text.as_bytes(), 0o600)?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Load the admin public key at `pub_path`; at first start create the admin key pair
/// (`priv_path` mode 0600, `pub_path` mode 0644). The broker never needs the private key again:
/// an operator may move it elsewhere.
pub(crate) fn load_or_create_admin_key(priv_path: &Path, pub_path: &Path) -> Result<VerifyingKey> {
    if pub_path.exists() {
        return read_verifying_key(pub_path);
    }
    let key = load_or_create_signing_key(priv_path)?;
    let vk = key.verifying_key();
    write_new(
        pub_path,
        format!("{}\n", hex::encode(vk.as_bytes())).as_bytes(),
        0o644,
    )?;
    Ok(vk)
}
