//! Image signatures in the cosign/sigstore format, checked against a
//! `containers-policy.json(5)` policy.
//!
//! # Format
//!
//! A signed image `R@D` (repository `R`, manifest digest `D`) has, in the
//! same repository, a *signature manifest* tagged [`signature_tag`]`(D)`
//! (`sha256-<hex>.sig`): an OCI image manifest whose layers each carry one
//! signature. A layer has media type [`SIMPLE_SIGNING_MEDIA_TYPE`]; its blob
//! is the *simple signing payload*
//!
//! ```json
//! {"critical": {"identity": {"docker-reference": "host/repo:tag"},
//!               "image": {"docker-manifest-digest": "sha256:…"},
//!               "type": "cosign container image signature"},
//!  "optional": null}
//! ```
//!
//! and its annotation [`ANNOTATION_SIGNATURE`] is the base64 signature of
//! those exact payload bytes (ECDSA P-256/SHA-256 in ASN.1 for the usual
//! cosign keys; P-384, Ed25519 and RSA keys work too). This is what
//! `skopeo copy --sign-by-sigstore-private-key` and `cosign sign --key`
//! write.
//!
//! # Checking
//!
//! [`Policy::parse`] reads a containers-policy.json document;
//! [`Policy::evaluate`] picks the requirements for an image (most specific
//! `docker` scope, else the transport default, else the global default)
//! and checks every one of them: `insecureAcceptAnything`, `reject`, and
//! `sigstoreSigned` with public keys (`keyData`/`keyDatas`, or
//! `keyPath`/`keyPaths` resolved by the caller: inside a sandbox these are
//! key-broker resources, never host files). Keyless (Fulcio), Rekor and
//! GPG (`signedBy`) requirements are parsed but refused when evaluated, so
//! a policy never passes by a check that did not run.
//!
//! The payload must name the image's manifest digest and an identity the
//! requirement's `signedIdentity` accepts (default
//! `matchRepoDigestOrExact`).
//!
//! # Signing
//!
//! [`SigningKey`] reads cosign private keys (encrypted `ENCRYPTED SIGSTORE
//! PRIVATE KEY` / `ENCRYPTED COSIGN PRIVATE KEY` PEM, or plain PKCS#8) and
//! [`sign`] makes a signature; [`SignatureManifest`] builds or extends the
//! signature manifest to push.

use std::collections::BTreeMap;
use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use sigstore::crypto::{CosignVerificationKey, SigStoreSigner, Signature, SigningScheme};
use zeroize::Zeroizing;

use crate::manifest::{image_manifest_json, Descriptor, ImageManifest, OCI_CONFIG, OCI_MANIFEST};
use crate::{Digest, Reference};

mod policy;
#[cfg(test)]
mod tests;

pub use policy::{Policy, Requirement, SignedIdentity, Subject, MAX_POLICY_BYTES};

/// Media type of a layer that holds one simple signing payload.
pub const SIMPLE_SIGNING_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// Layer annotation holding the base64 signature of the payload.
pub const ANNOTATION_SIGNATURE: &str = "dev.cosignproject.cosign/signature";
/// The `critical.type` of a cosign/sigstore payload.
pub const COSIGN_PAYLOAD_TYPE: &str = "cosign container image signature";
/// Largest payload accepted.
pub const MAX_PAYLOAD_BYTES: usize = 64 << 10;
/// Most signatures considered per image.
pub const MAX_SIGNATURES: usize = 64;

/// A signature or policy problem. Messages name the image and the reason and never hold key
/// material.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    /// The policy document is malformed.
    #[error("invalid signature policy: {0}")]
    InvalidPolicy(String),
    /// A key could not be read.
    #[error("invalid signing key {which}: {reason}")]
    InvalidKey {
        /// Where the key came from.
        which: String,
        /// Why.
        reason: String,
    },
    /// The policy does not accept the image.
    #[error("image {image}: rejected by the signature policy: {reason}")]
    Rejected {
        /// The image reference.
        image: String,
        /// Why.
        reason: String,
    },
    /// A signature could not be made.
    #[error("signing failed: {0}")]
    Signing(String),
}

/// The tag under which the signatures of manifest `d` are stored (`sha256-<hex>.sig`).
pub fn signature_tag(d: &Digest) -> String {
    format!("{}.sig", d.as_str().replacen(':', "-", 1))
}

/// Where the signatures of manifest `d` of `r`'s repository are stored: `r` with the tag
/// [`signature_tag`]`(d)` and no digest.
pub fn signature_reference(r: &Reference, d: &Digest) -> Reference {
    Reference {
        tag: Some(signature_tag(d)),
        digest: None,
        ..r.clone()
    }
}

/// One signature found for an image: the payload bytes and the base64 signature over them.
#[derive(Clone, PartialEq, Eq)]
pub struct SigstoreSignature {
    /// The simple signing payload exactly as stored (the signed bytes).
    pub payload: Vec<u8>,
    /// Base64 of the signature (the layer annotation).
    pub signature: String,
}

impl fmt::Debug for SigstoreSignature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigstoreSignature")
            .field("payload", &String::from_utf8_lossy(&self.payload))
            .finish_non_exhaustive()
    }
}

/// The signed claims of a payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Payload {
    /// The `critical.identity.docker-reference` the signer named.
    pub identity: String,
    /// The signed manifest digest.
    pub manifest_digest: Digest,
}

#[derive(Serialize, Deserialize)]
struct RawPayload {
    critical: RawCritical,
    #[serde(default)]
    optional: Option<serde_json::Value>,
}

// `critical` claims must all be understood: unknown ones refuse the signature.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCritical {
    identity: RawIdentity,
    image: RawImage,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    #[serde(rename = "docker-reference")]
    docker_reference: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawImage {
    #[serde(rename = "docker-manifest-digest")]
    docker_manifest_digest: String,
}

impl Payload {
    /// Parse a payload (only once its signature verified: the claims mean nothing before).
    pub fn parse(bytes: &[u8]) -> Result<Payload, String> {
        if bytes.len() > MAX_PAYLOAD_BYTES {
            return Err(format!("payload exceeds {MAX_PAYLOAD_BYTES} bytes"));
        }
        let raw: RawPayload =
            serde_json::from_slice(bytes).map_err(|e| format!("payload is not valid: {e}"))?;
        if raw.critical.kind != COSIGN_PAYLOAD_TYPE {
            return Err(format!(
                "payload type is {:?}, not {COSIGN_PAYLOAD_TYPE:?}",
                raw.critical.kind
            ));
        }
        let manifest_digest = raw
            .critical
            .image
            .docker_manifest_digest
            .parse()
            .map_err(|e: crate::Error| format!("payload digest: {e}"))?;
        Ok(Payload {
            identity: raw.critical.identity.docker_reference,
            manifest_digest,
        })
    }

    /// The payload bytes for `identity` and `manifest_digest`.
    pub fn to_bytes(identity: &str, manifest_digest: &Digest) -> Vec<u8> {
        let raw = RawPayload {
            critical: RawCritical {
                identity: RawIdentity {
                    docker_reference: identity.to_string(),
                },
                image: RawImage {
                    docker_manifest_digest: manifest_digest.to_string(),
                },
                kind: COSIGN_PAYLOAD_TYPE.into(),
            },
            optional: None,
        };
        serde_json::to_vec(&raw).unwrap_or_default()
    }
}

/// A public key that verifies signatures.
pub struct VerificationKey {
    key: CosignVerificationKey,
    /// Where it came from, for messages (`keyData #1`, `kbs:///t/keys/cosign`, a file name).
    pub source: String,
}

impl fmt::Debug for VerificationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerificationKey")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl VerificationKey {
    /// Parse a PEM `PUBLIC KEY` (SubjectPublicKeyInfo): ECDSA P-256/P-384, Ed25519 or RSA.
    pub fn from_pem(pem: &[u8], source: impl Into<String>) -> Result<Self, SignatureError> {
        let source = source.into();
        let key =
            CosignVerificationKey::try_from_pem(pem).map_err(|e| SignatureError::InvalidKey {
                which: source.clone(),
                reason: format!("not a usable PEM public key: {e}"),
            })?;
        Ok(VerificationKey { key, source })
    }

    /// Whether `sig` (base64) is a valid signature of `payload` by this key.
    pub fn verifies(&self, payload: &[u8], sig: &str) -> bool {
        self.key
            .verify_signature(Signature::Base64Encoded(sig.trim().as_bytes()), payload)
            .is_ok()
    }
}

/// A private key that makes cosign signatures.
pub struct SigningKey {
    signer: SigStoreSigner,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningKey(…)")
    }
}

fn scheme_for(pair: &sigstore::crypto::signing_key::SigStoreKeyPair) -> SigningScheme {
    use sigstore::crypto::signing_key::ecdsa::ECDSAKeys;
    use sigstore::crypto::signing_key::SigStoreKeyPair;
    match pair {
        SigStoreKeyPair::ECDSA(ECDSAKeys::P256(_)) => SigningScheme::ECDSA_P256_SHA256_ASN1,
        SigStoreKeyPair::ECDSA(ECDSAKeys::P384(_)) => SigningScheme::ECDSA_P384_SHA384_ASN1,
        SigStoreKeyPair::ECDSA(ECDSAKeys::P521(_)) => SigningScheme::ECDSA_P521_SHA512_ASN1,
        SigStoreKeyPair::ED25519(_) => SigningScheme::ED25519,
        // PKCS#1 v1.5 with SHA-256, what cosign uses for RSA keys (the size is not used here).
        SigStoreKeyPair::RSA(_) => SigningScheme::RSA_PKCS1_SHA256(0),
    }
}

impl SigningKey {
    /// Read a cosign private key: encrypted (`ENCRYPTED SIGSTORE PRIVATE KEY` or `ENCRYPTED
    /// COSIGN PRIVATE KEY`, opened with `passphrase`) or plain PKCS#8 PEM.
    pub fn from_pem(pem: &[u8], passphrase: &[u8], source: &str) -> Result<Self, SignatureError> {
        use sigstore::crypto::signing_key::SigStoreKeyPair;
        let bad = |reason: String| SignatureError::InvalidKey {
            which: source.to_string(),
            reason,
        };
        let text = std::str::from_utf8(pem).map_err(|_| bad("not PEM text".into()))?;
        let pair = if text.contains("ENCRYPTED SIGSTORE PRIVATE KEY")
            || text.contains("ENCRYPTED COSIGN PRIVATE KEY")
        {
            SigStoreKeyPair::from_encrypted_pem(pem, passphrase).map_err(|e| {
                bad(format!(
                    "cannot open the encrypted key (wrong passphrase or corrupt key): {e}"
                ))
            })?
        } else {
            SigStoreKeyPair::from_pem(pem).map_err(|e| bad(format!("not a private key: {e}")))?
        };
        let signer = pair
            .to_sigstore_signer(&scheme_for(&pair))
            .map_err(|e| bad(e.to_string()))?;
        Ok(SigningKey { signer })
    }

    /// A new ECDSA P-256 key, as `cosign generate-key-pair` makes.
    pub fn generate() -> Result<Self, SignatureError> {
        let signer = SigningScheme::ECDSA_P256_SHA256_ASN1
            .create_signer()
            .map_err(|e| SignatureError::Signing(e.to_string()))?;
        Ok(SigningKey { signer })
    }

    /// The private key as cosign's encrypted PEM (scrypt + secretbox under `passphrase`).
    pub fn to_encrypted_pem(&self, passphrase: &[u8]) -> Result<Zeroizing<String>, SignatureError> {
        self.signer
            .to_sigstore_keypair()
            .and_then(|p| p.private_key_to_encrypted_pem(passphrase))
            .map_err(|e| SignatureError::Signing(e.to_string()))
    }

    /// The public key as PEM (`PUBLIC KEY`).
    pub fn public_key_pem(&self) -> Result<String, SignatureError> {
        self.signer
            .to_sigstore_keypair()
            .and_then(|p| p.public_key_to_pem())
            .map_err(|e| SignatureError::Signing(e.to_string()))
    }
}

/// Exercise the signature code once (make a key, sign, verify), so that the crypto backend's
/// one-time initialisation happens ahead of time (a pre-booted sandbox does this while it
/// waits) rather than on a cold start. Returns whether the round trip verified.
pub fn warm_up() -> bool {
    let Ok(key) = SigningKey::generate() else {
        return false;
    };
    let Ok(pem) = key.public_key_pem() else {
        return false;
    };
    let d = Digest::sha256(b"veil warm-up");
    let r = Reference {
        registry: "local".into(),
        repository: "warm-up".into(),
        tag: Some("v1".into()),
        digest: None,
    };
    match (
        sign(&key, &r, &d),
        VerificationKey::from_pem(pem.as_bytes(), "warm-up"),
    ) {
        (Ok(sig), Ok(vk)) => vk.verifies(&sig.payload, &sig.signature),
        _ => false,
    }
}

/// Sign `manifest_digest` under `identity` (normally the reference the image is pushed as).
pub fn sign(
    key: &SigningKey,
    identity: &Reference,
    manifest_digest: &Digest,
) -> Result<SigstoreSignature, SignatureError> {
    let id = Reference {
        digest: None,
        ..identity.clone()
    };
    let payload = Payload::to_bytes(&id.to_string(), manifest_digest);
    let sig = key
        .signer
        .sign(&payload)
        .map_err(|e| SignatureError::Signing(e.to_string()))?;
    Ok(SigstoreSignature {
        payload,
        signature: STANDARD.encode(sig),
    })
}

/// The signatures a signature manifest lists: for each signature layer, the payload
/// descriptor (fetch and digest-check its blob) and the base64 signature.
pub fn signature_layers(m: &ImageManifest) -> Vec<(Descriptor, String)> {
    m.layers
        .iter()
        .filter(|l| l.media_type == SIMPLE_SIGNING_MEDIA_TYPE)
        .filter_map(|l| {
            l.annotations
                .get(ANNOTATION_SIGNATURE)
                .map(|s| (l.clone(), s.clone()))
        })
        .take(MAX_SIGNATURES)
        .collect()
}

/// A signature manifest to push: its JSON, and the blobs it references (config and payloads).
pub struct SignatureManifest {
    /// The manifest.
    pub manifest: ImageManifest,
    /// Blobs by digest (the config and each payload).
    pub blobs: BTreeMap<Digest, Vec<u8>>,
}

impl SignatureManifest {
    /// Start from an existing signature manifest (its payload blobs must already be in the
    /// registry) or from nothing, and add `sig` unless an identical signature is present.
    pub fn with_signature(existing: Option<ImageManifest>, sig: &SigstoreSignature) -> Self {
        let mut layers = existing.map(|m| m.layers).unwrap_or_default();
        let pd = Digest::sha256(&sig.payload);
        let dup = layers.iter().any(|l| {
            l.digest == pd && l.annotations.get(ANNOTATION_SIGNATURE) == Some(&sig.signature)
        });
        let mut blobs = BTreeMap::new();
        if !dup {
            let mut d = Descriptor::new(
                SIMPLE_SIGNING_MEDIA_TYPE,
                pd.clone(),
                sig.payload.len() as u64,
            );
            d.annotations
                .insert(ANNOTATION_SIGNATURE.into(), sig.signature.clone());
            layers.push(d);
            blobs.insert(pd, sig.payload.clone());
        }
        let diff_ids: Vec<String> = layers.iter().map(|l| l.digest.to_string()).collect();
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "",
            "os": "",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .unwrap_or_default();
        let cd = Digest::sha256(&config);
        let manifest = ImageManifest {
            media_type: OCI_MANIFEST.into(),
            config: Descriptor::new(OCI_CONFIG, cd.clone(), config.len() as u64),
            layers,
        };
        blobs.insert(cd, config);
        SignatureManifest { manifest, blobs }
    }

    /// The manifest bytes.
    pub fn manifest_json(&self) -> Vec<u8> {
        image_manifest_json(&self.manifest)
    }
}
