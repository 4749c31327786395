//! Assignment statements: how a *tenant-attested* sandbox says which function it was given.
//!
//! A pooled sandbox can attest to its tenant's broker before any request exists (init data of
//! tenant scope: `veil.tenant` and `veil.scope = "tenant"`). Its token then names the tenant
//! only. When the node assigns it a function, the agent signs the assignment — tenant, function,
//! image reference and pinned digest, secrets, image keys, signature policy, environment — with
//! the ephemeral TEE key the attested evidence bound, and sends that statement with every
//! resource request ([`STATEMENT_HEADER`]). The broker verifies it with the token's key,
//! requires the token's tenant, and evaluates its attestation policy again on the attested claims
//! with the stated assignment, so image pins hold exactly as for a sandbox that attested at
//! assignment. The host cannot forge a statement (the key never leaves the sandbox) and cannot
//! use one it relays (the resources are encrypted to that key).

use crate::jwe::{JweError, TeeKeyPair};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use kbs_types::TeePubKey;

/// Request header carrying the statement.
pub const STATEMENT_HEADER: &str = "kbs-veil-assignment";
/// Largest statement accepted.
pub const MAX_STATEMENT: usize = 64 << 10;
/// Domain separation of the signed message.
const CONTEXT: &[u8] = b"veil assignment statement v1\0";

/// Sign `assignment` (a JSON object) with the sandbox's TEE key:
/// `base64url(JCS(assignment)) "." base64url(ECDSA-P256-SHA256 signature)`.
pub fn sign(key: &TeeKeyPair, assignment: &serde_json::Value) -> Result<String, String> {
    use p256::ecdsa::signature::Signer;
    let payload = serde_json_canonicalizer::to_vec(assignment).map_err(|e| e.to_string())?;
    let sig: p256::ecdsa::Signature = key.signing_key().sign(&[CONTEXT, &payload].concat());
    Ok(format!(
        "{}.{}",
        B64.encode(&payload),
        B64.encode(sig.to_bytes())
    ))
}

/// Verify a statement against the token's TEE key; the stated assignment.
pub fn verify(tee_pubkey: &TeePubKey, statement: &str) -> Result<serde_json::Value, String> {
    use p256::ecdsa::signature::Verifier;
    if statement.len() > MAX_STATEMENT {
        return Err(format!(
            "the statement is larger than {MAX_STATEMENT} bytes"
        ));
    }
    let (payload, sig) = statement
        .split_once('.')
        .ok_or("the statement is not <payload>.<signature>")?;
    let payload = B64
        .decode(payload)
        .map_err(|_| "the statement's payload is not base64url")?;
    let sig = B64
        .decode(sig)
        .ok()
        .and_then(|b| p256::ecdsa::Signature::from_slice(&b).ok())
        .ok_or("the statement's signature is not a base64url P-256 signature")?;
    let key = match crate::jwe::tee_public_key(tee_pubkey).map_err(|e: JweError| e.to_string())? {
        crate::jwe::Recipient::P256(k) => p256::ecdsa::VerifyingKey::from(k),
        crate::jwe::Recipient::Rsa(_) => {
            return Err("statements are signed with P-256 TEE keys only".into())
        }
    };
    key.verify(&[CONTEXT, &payload].concat(), &sig)
        .map_err(|_| "the statement is not signed by the attested TEE key")?;
    let v: serde_json::Value =
        serde_json::from_slice(&payload).map_err(|e| format!("the statement is not JSON: {e}"))?;
    if !v.is_object() {
        return Err("the statement is not a JSON object".into());
    }
    Ok(v)
}

/// The attestation policy's verdicts on statements, so that the resource requests of one start
/// (its secrets, image keys and signature policy, sent together) pay for the statement's check
/// once. A verdict is keyed by the session's credential (its token or cookie) and the statement,
/// lives no longer than the token, and is forgotten whenever the policy or the reference values
/// change ([`DecisionCache::invalidate`]): it is exactly the decision the policy would take again.
#[derive(Default)]
pub(crate) struct DecisionCache {
    inner: std::sync::Mutex<CacheInner>,
}

#[derive(Default)]
struct CacheInner {
    generation: u64,
    map: std::collections::HashMap<[u8; 32], Verdict>,
}

/// What an allowed statement established.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Verdict {
    pub(crate) function: String,
    pub(crate) image_digest: String,
    /// Unix seconds after which it is not used (the token's expiry).
    pub(crate) expires_at: u64,
}

/// Verdicts kept at most; beyond, expired ones go and then all of them.
const CACHE_CAPACITY: usize = 4096;

impl DecisionCache {
    /// The key of `statement` sent with `credential`.
    pub(crate) fn key(credential: &str, statement: &str) -> [u8; 32] {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update((credential.len() as u64).to_be_bytes());
        h.update(credential.as_bytes());
        h.update(statement.as_bytes());
        h.finalize().into()
    }

    /// The generation verdicts are taken under (pass it back to [`DecisionCache::put`]).
    pub(crate) fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// A verdict still valid at `now` (Unix seconds).
    pub(crate) fn get(&self, key: &[u8; 32], now: u64) -> Option<Verdict> {
        self.lock()
            .map
            .get(key)
            .filter(|v| v.expires_at > now)
            .cloned()
    }

    /// Remember a verdict taken under `generation` (dropped if the policy changed meanwhile).
    pub(crate) fn put(&self, key: [u8; 32], v: Verdict, generation: u64, now: u64) {
        let mut c = self.lock();
        if c.generation != generation {
            return;
        }
        if c.map.len() >= CACHE_CAPACITY {
            c.map.retain(|_, v| v.expires_at > now);
            if c.map.len() >= CACHE_CAPACITY {
                c.map.clear();
            }
        }
        c.map.insert(key, v);
    }

    /// Forget every verdict: the policy or the reference values changed.
    pub(crate) fn invalidate(&self) {
        let mut c = self.lock();
        c.generation += 1;
        c.map.clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_expire_are_invalidated_and_bounded() {
        let c = DecisionCache::default();
        let v = Verdict {
            function: "f".into(),
            image_digest: "sha256:00".into(),
            expires_at: 100,
        };
        let k = DecisionCache::key("token", "st");
        // Another credential or statement is another key.
        assert_ne!(k, DecisionCache::key("token", "st2"));
        assert_ne!(k, DecisionCache::key("tokens", "t"));
        let g = c.generation();
        c.put(k, v.clone(), g, 10);
        assert_eq!(c.get(&k, 50), Some(v.clone()));
        assert_eq!(c.get(&k, 100), None, "expired with its token");
        c.invalidate();
        assert_eq!(c.get(&k, 50), None, "forgotten when the policy changes");
        // A verdict taken before a change is not stored after it.
        c.put(k, v.clone(), g, 10);
        assert_eq!(c.get(&k, 50), None);
        let g = c.generation();
        for i in 0..CACHE_CAPACITY + 10 {
            c.put(DecisionCache::key("t", &i.to_string()), v.clone(), g, 10);
        }
        assert!(c.lock().map.len() <= CACHE_CAPACITY);
    }

    #[test]
    fn statements_verify_only_with_their_key_and_unaltered() {
        let k = TeeKeyPair::generate();
        let a = serde_json::json!({"tenant": "t", "function": "f", "image_digest": "sha256:00"});
        let s = sign(&k, &a).unwrap();
        assert_eq!(verify(&k.public_key(), &s).unwrap(), a);
        let other = TeeKeyPair::generate();
        assert!(verify(&other.public_key(), &s).is_err());
        let (_, sig) = s.split_once('.').unwrap();
        let forged = format!(
            "{}.{sig}",
            B64.encode(br#"{"function":"f","image_digest":"sha256:00","tenant":"victim"}"#)
        );
        assert!(verify(&k.public_key(), &forged).is_err());
        for bad in ["", "x", "a.b", &"x".repeat(MAX_STATEMENT + 1)] {
            assert!(verify(&k.public_key(), bad).is_err());
        }
    }
}
