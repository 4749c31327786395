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

#[cfg(test)]
mod tests {
    use super::*;

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
