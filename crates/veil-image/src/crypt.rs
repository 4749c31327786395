//! Image-layer encryption and decryption in the ocicrypt format, as written
//! by `skopeo copy --encryption-key jwe:<pub.pem>` and read by
//! `skopeo copy --decryption-key <priv.pem>`, and with layer keys wrapped
//! for a key broker in the Confidential Containers (CoCo) key-provider
//! format.
//!
//! # Format
//!
//! An encrypted layer has media type `<plaintext media type>+encrypted`,
//! the public options annotation and at least one wrapped-key annotation:
//!
//! * [`ANNOTATION_PUBOPTS`]: base64 of the *public options* JSON
//!   `{"cipher": "AES_256_CTR_HMAC_SHA256", "hmac": b64,
//!   "cipheroptions": {}}`.
//! * [`ANNOTATION_KEYS_JWE`]: one or more JWEs (RFC 7516 JSON
//!   serialization), each base64 (standard alphabet, padded), joined by `,`.
//!   Each JWE encrypts the *private options* JSON
//!   `{"symkey": b64, "digest": "sha256:<plaintext layer>",
//!   "cipheroptions": {"nonce": b64}}` for one or more recipients, with
//!   content encryption `A256GCM` and key management `RSA-OAEP` (SHA-1,
//!   go-jose's choice for RSA keys; `RSA-OAEP-256` is accepted too) or
//!   `ECDH-ES+A256KW` (P-256; `+A128KW`/`+A192KW` accepted too).
//! * [`ANNOTATION_KEYS_COCO`] (the CoCo attestation agent's key provider):
//!   one or more *annotation packets*, each base64 (standard, padded) of a
//!   JSON object, joined by `,`. A packet wraps the same private options
//!   JSON with a key-encryption key (KEK) that a key broker (KBS) holds as
//!   a resource:
//!   `{"kid": "kbs:///<repository>/<type>/<tag>", "wrapped_data": b64,
//!   "iv": b64, "wrap_type": "A256GCM" | "A256CTR"}`. The `kid` is a
//!   [`KbsResource`] URI (`kbs://<host>/…` names a broker host too); the
//!   KEK is that resource's raw value, 32 bytes. `A256GCM` is AES-256-GCM
//!   with a 12-byte IV and the 16-byte tag appended to `wrapped_data`, no
//!   additional data; `A256CTR` is AES-256-CTR with the 16-byte IV as the
//!   initial big-endian counter block, unauthenticated. Version 2 packets
//!   add `"version"` (only `"0.1.0"`, the default, is supported),
//!   `"provider"` (only `"kbs"`, the default), `"provider_settings"` and
//!   `"annotations"` (objects, ignored); with the `kbs` provider, `iv` and
//!   `wrap_type` are required. Unknown fields are ignored. veil writes
//!   version-1 packets.
//!
//! A layer may carry both key annotations; either opens it.
//!
//! The layer bytes are the plaintext layer blob encrypted with AES-256-CTR
//! (key `symkey`, 32 bytes; the 16-byte `nonce` is the initial counter
//! block, incremented big-endian over all 128 bits), and `hmac` is
//! HMAC-SHA256, keyed with the same `symkey`, over the whole *ciphertext*.
//!
//! # Decrypting
//!
//! [`unwrap_layer_key_with`] finds a JWE recipient that one of a
//! [`KeyRing`]'s [`PrivateKey`]s can open, or a CoCo packet whose `kid` the
//! ring holds a KBS key for, and returns the [`LayerKey`];
//! [`unwrap_layer_key`] does the same with private keys only, and
//! [`coco_key_ids`] lists the KBS resources a layer's packets name (what to
//! fetch from the broker before unwrapping).
//! [`LayerKey::decrypt`] wraps the encrypted blob in a [`DecryptingReader`],
//! which checks the HMAC (and the plaintext digest from the private
//! options) when it reaches EOF and fails the final read if either does not
//! match. Data returned before EOF is not yet authenticated: unpack into a
//! scratch directory and discard it unless the whole stream was read
//! without error ([`crate::unpack::unpack_layer`] always reads to EOF).
//!
//! # Encrypting
//!
//! [`encrypt_layer_for`] encrypts a blob for one or more [`Recipient`]s
//! (JWE public keys, whose wrapped keys share one JWE, and KBS keys, one
//! A256GCM or A256CTR packet each); [`encrypt_image_for`] rewrites a
//! [`BuiltImage`] with chosen layers encrypted. [`encrypt_layer`] and
//! [`encrypt_image`] are the same for JWE public keys only.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read};
use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ctr::cipher::{KeyIvInit, StreamCipher};
use hmac::{Hmac, Mac};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use rand_core::{OsRng, RngCore};
use rsa::pkcs1::{DecodeRsaPrivateKey, DecodeRsaPublicKey};
use rsa::pkcs8::{
    DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, LineEnding,
};
use rsa::traits::PublicKeyParts;
use rsa::Oaep;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::{Digest as _, Sha256};
use zeroize::{Zeroize, Zeroizing};

use crate::build::{Blob, BuiltImage};
use crate::digest::Hasher;
use crate::manifest::{
    image_manifest_json, parse_manifest, Compression, Descriptor, Manifest, OCI_MANIFEST,
};
use crate::{Digest, Error};

pub use crate::manifest::{decrypted_layer_compression, decrypted_media_type, ENCRYPTED_SUFFIX};

mod coco;

pub use coco::{CocoWrap, KbsResource, KBS_KEK_LEN};

/// Annotation holding the JWE-wrapped private options.
pub const ANNOTATION_KEYS_JWE: &str = "org.opencontainers.image.enc.keys.jwe";
/// Annotation holding the private options wrapped with key broker (KBS)
/// keys, as annotation packets of the CoCo attestation agent's key provider.
pub const ANNOTATION_KEYS_COCO: &str =
    "org.opencontainers.image.enc.keys.provider.attestation-agent";
/// Annotation holding the public options (cipher and HMAC).
pub const ANNOTATION_PUBOPTS: &str = "org.opencontainers.image.enc.pubopts";
/// Prefix of all ocicrypt annotations.
pub const ANNOTATION_PREFIX: &str = "org.opencontainers.image.enc.";
/// Prefix of the wrapped-key annotations (`jwe`, `pgp`, `pkcs7`, ...).
const ANNOTATION_KEYS_PREFIX: &str = "org.opencontainers.image.enc.keys.";
/// The only layer cipher ocicrypt defines.
pub const CIPHER_AES_256_CTR_HMAC_SHA256: &str = "AES_256_CTR_HMAC_SHA256";

/// At most this many JWEs in one annotation, and recipients in one JWE
/// (bounds the private-key operations hostile metadata can cause).
const MAX_JWES: usize = 16;
const MAX_RECIPIENTS: usize = 16;

const SYMKEY_LEN: usize = 32;
const NONCE_LEN: usize = 16;
const GCM_IV_LEN: usize = 12;
const GCM_TAG_LEN: usize = 16;
const P256_COORD_LEN: usize = 32;

type Aes256Ctr = ctr::Ctr128BE<aes::Aes256>;
type HmacSha256 = Hmac<Sha256>;

/// Why an encrypted layer could not be decrypted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecryptFailure {
    /// The layer's media type does not end in `+encrypted`.
    NotEncrypted,
    /// No private key was given.
    NoKey,
    /// Keys were given, but none of them can unwrap the layer key.
    WrongKey,
    /// The encryption metadata (annotations, JWE, options) is malformed.
    Malformed,
    /// The metadata is well-formed but uses a scheme or algorithm veil does
    /// not support.
    Unsupported,
    /// The layer content failed its integrity check (HMAC or digest): it
    /// was tampered with or truncated.
    Integrity,
}

fn fail(desc_digest: &Digest, kind: DecryptFailure, reason: impl Into<String>) -> Error {
    Error::LayerDecryption {
        digest: desc_digest.clone(),
        kind,
        reason: reason.into(),
    }
}

// ---------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------

/// A private key that can unwrap layer keys: RSA, or EC on P-256.
#[derive(Clone)]
pub struct PrivateKey(PrivKind);

#[derive(Clone)]
enum PrivKind {
    Rsa(Box<rsa::RsaPrivateKey>),
    P256(p256::SecretKey),
}

/// A public key that layers can be encrypted for: RSA, or EC on P-256.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey(PubKind);

#[derive(Clone, PartialEq, Eq)]
enum PubKind {
    Rsa(Box<rsa::RsaPublicKey>),
    P256(p256::PublicKey),
}

fn rsa_bits(k: &impl PublicKeyParts) -> usize {
    k.size() * 8
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey({})", self.kind())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.kind())
    }
}

/// The PEM blocks in `text`: (label, whole block text).
fn pem_blocks(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some((label, block)) = current.as_mut() {
            block.push_str(line);
            block.push('\n');
            if line == format!("-----END {label}-----") {
                out.extend(current.take());
            }
        } else if let Some(label) = line
            .strip_prefix("-----BEGIN ")
            .and_then(|l| l.strip_suffix("-----"))
        {
            current = Some((label.to_string(), format!("{line}\n")));
        }
    }
    out
}

fn invalid_key(reason: impl Into<String>) -> Error {
    Error::InvalidKey {
        reason: reason.into(),
    }
}

impl PrivateKey {
    /// Parse a PEM private key: PKCS#8 (`PRIVATE KEY`, RSA or EC P-256),
    /// PKCS#1 (`RSA PRIVATE KEY`) or SEC1 (`EC PRIVATE KEY`, P-256; an
    /// `EC PARAMETERS` block before it is skipped). Password-protected keys
    /// are not supported.
    pub fn from_pem(pem: &str) -> Result<Self, Error> {
        for (label, block) in pem_blocks(pem) {
            let key = match label.as_str() {
                "PRIVATE KEY" => {
                    if let Ok(k) = rsa::RsaPrivateKey::from_pkcs8_pem(&block) {
                        PrivKind::Rsa(Box::new(k))
                    } else if let Ok(k) = p256::SecretKey::from_pkcs8_pem(&block) {
                        PrivKind::P256(k)
                    } else {
                        return Err(invalid_key(
                            "the PKCS#8 private key is neither an RSA key nor an EC key on \
                             P-256 (other curves are not supported), or it is corrupt",
                        ));
                    }
                }
                "RSA PRIVATE KEY" => {
                    if block.contains("Proc-Type:") {
                        return Err(invalid_key(
                            "password-protected PEM private keys are not supported",
                        ));
                    }
                    let k = rsa::RsaPrivateKey::from_pkcs1_pem(&block).map_err(|e| {
                        invalid_key(format!("the PKCS#1 RSA private key is invalid: {e}"))
                    })?;
                    PrivKind::Rsa(Box::new(k))
                }
                "EC PRIVATE KEY" => {
                    if block.contains("Proc-Type:") {
                        return Err(invalid_key(
                            "password-protected PEM private keys are not supported",
                        ));
                    }
                    let k = p256::SecretKey::from_sec1_pem(&block).map_err(|_| {
                        invalid_key(
                            "the SEC1 EC private key is not a valid key on P-256 \
                             (other curves are not supported)",
                        )
                    })?;
                    PrivKind::P256(k)
                }
                "ENCRYPTED PRIVATE KEY" => {
                    return Err(invalid_key(
                        "password-protected (encrypted PKCS#8) private keys are not supported",
                    ))
                }
                _ => continue,
            };
            let key = PrivateKey(key);
            key.check()?;
            return Ok(key);
        }
        Err(invalid_key(
            "no PEM private key block (PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY) found",
        ))
    }

    /// Read and parse a PEM private key file (see [`PrivateKey::from_pem`]).
    pub fn from_pem_file(path: &Path) -> Result<Self, Error> {
        let text = Zeroizing::new(
            std::fs::read_to_string(path)
                .map_err(|e| Error::io(path, "reading a private key file", e))?,
        );
        Self::from_pem(&text).map_err(|e| match e {
            Error::InvalidKey { reason } => invalid_key(format!("{}: {reason}", path.display())),
            other => other,
        })
    }

    /// A fresh random EC P-256 private key.
    pub fn generate_p256() -> Self {
        PrivateKey(PrivKind::P256(p256::SecretKey::random(&mut OsRng)))
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        match &self.0 {
            PrivKind::Rsa(k) => PublicKey(PubKind::Rsa(Box::new(k.to_public_key()))),
            PrivKind::P256(k) => PublicKey(PubKind::P256(k.public_key())),
        }
    }

    /// PKCS#8 PEM encoding of this key.
    pub fn to_pem(&self) -> Result<Zeroizing<String>, Error> {
        let pem = match &self.0 {
            PrivKind::Rsa(k) => k.to_pkcs8_pem(LineEnding::LF),
            PrivKind::P256(k) => k.to_pkcs8_pem(LineEnding::LF),
        };
        pem.map_err(|e| invalid_key(format!("cannot PEM-encode the private key: {e}")))
    }

    /// `"RSA-<bits>"` or `"EC P-256"`.
    pub fn kind(&self) -> String {
        match &self.0 {
            PrivKind::Rsa(k) => format!("RSA-{}", rsa_bits(k.as_ref())),
            PrivKind::P256(_) => "EC P-256".to_string(),
        }
    }

    fn check(&self) -> Result<(), Error> {
        match &self.0 {
            PrivKind::Rsa(k) if rsa_bits(k.as_ref()) < 2048 => Err(invalid_key(format!(
                "the RSA key has {} bits; at least 2048 are required",
                rsa_bits(k.as_ref())
            ))),
            _ => Ok(()),
        }
    }
}

impl PublicKey {
    /// Parse a PEM public key: SPKI (`PUBLIC KEY`, RSA or EC P-256) or
    /// PKCS#1 (`RSA PUBLIC KEY`). A PEM private key is accepted too, and
    /// its public half used.
    pub fn from_pem(pem: &str) -> Result<Self, Error> {
        for (label, block) in pem_blocks(pem) {
            let key = match label.as_str() {
                "PUBLIC KEY" => {
                    if let Ok(k) = rsa::RsaPublicKey::from_public_key_pem(&block) {
                        PubKind::Rsa(Box::new(k))
                    } else if let Ok(k) = p256::PublicKey::from_public_key_pem(&block) {
                        PubKind::P256(k)
                    } else {
                        return Err(invalid_key(
                            "the public key is neither an RSA key nor an EC key on P-256 \
                             (other curves are not supported), or it is corrupt",
                        ));
                    }
                }
                "RSA PUBLIC KEY" => {
                    let k = rsa::RsaPublicKey::from_pkcs1_pem(&block).map_err(|e| {
                        invalid_key(format!("the PKCS#1 RSA public key is invalid: {e}"))
                    })?;
                    PubKind::Rsa(Box::new(k))
                }
                "PRIVATE KEY" | "RSA PRIVATE KEY" | "EC PRIVATE KEY" | "ENCRYPTED PRIVATE KEY" => {
                    return Ok(PrivateKey::from_pem(pem)?.public_key())
                }
                _ => continue,
            };
            let key = PublicKey(key);
            if let PubKind::Rsa(k) = &key.0 {
                if rsa_bits(k.as_ref()) < 2048 {
                    return Err(invalid_key(format!(
                        "the RSA key has {} bits; at least 2048 are required",
                        rsa_bits(k.as_ref())
                    )));
                }
            }
            return Ok(key);
        }
        Err(invalid_key(
            "no PEM public key block (PUBLIC KEY or RSA PUBLIC KEY) found",
        ))
    }

    /// Read and parse a PEM public key file (see [`PublicKey::from_pem`]).
    pub fn from_pem_file(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(path, "reading a public key file", e))?;
        Self::from_pem(&text).map_err(|e| match e {
            Error::InvalidKey { reason } => invalid_key(format!("{}: {reason}", path.display())),
            other => other,
        })
    }

    /// SPKI (`PUBLIC KEY`) PEM encoding of this key, as skopeo's
    /// `--encryption-key jwe:<file>` expects.
    pub fn to_pem(&self) -> Result<String, Error> {
        let pem = match &self.0 {
            PubKind::Rsa(k) => k.to_public_key_pem(LineEnding::LF),
            PubKind::P256(k) => k.to_public_key_pem(LineEnding::LF),
        };
        pem.map_err(|e| invalid_key(format!("cannot PEM-encode the public key: {e}")))
    }

    /// `"RSA-<bits>"` or `"EC P-256"`.
    pub fn kind(&self) -> String {
        match &self.0 {
            PubKind::Rsa(k) => format!("RSA-{}", rsa_bits(k.as_ref())),
            PubKind::P256(_) => "EC P-256".to_string(),
        }
    }
}

// ---------------------------------------------------------------------------
// Annotation and options parsing
// ---------------------------------------------------------------------------

fn b64std(s: &str) -> Result<Vec<u8>, String> {
    STANDARD
        .decode(s.trim())
        .map_err(|e| format!("invalid base64: {e}"))
}

fn b64url(s: &str) -> Result<Vec<u8>, String> {
    URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .map_err(|e| format!("invalid base64url: {e}"))
}

#[derive(Deserialize)]
struct RawPubOpts {
    #[serde(default)]
    cipher: Option<String>,
    #[serde(default)]
    hmac: Option<String>,
    #[serde(default)]
    cipheroptions: Option<BTreeMap<String, Option<String>>>,
}

#[derive(Serialize)]
struct PubOptsOut<'a> {
    cipher: &'a str,
    hmac: String,
    cipheroptions: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct RawPrivOpts {
    #[serde(default)]
    symkey: Option<String>,
    #[serde(default)]
    digest: Option<String>,
    #[serde(default)]
    cipheroptions: Option<BTreeMap<String, Option<String>>>,
}

#[derive(Serialize)]
struct PrivOptsOut<'a> {
    symkey: &'a str,
    digest: &'a str,
    cipheroptions: BTreeMap<&'static str, String>,
}

/// Public options of an encrypted layer.
struct PubOpts {
    hmac: Vec<u8>,
    nonce: Option<Vec<u8>>,
}

fn parse_pubopts(annotation: &str) -> Result<PubOpts, (DecryptFailure, String)> {
    let malformed = |m: String| (DecryptFailure::Malformed, m);
    let json = b64std(annotation).map_err(|e| {
        malformed(format!(
            "the {ANNOTATION_PUBOPTS} annotation is not base64: {e}"
        ))
    })?;
    let raw: RawPubOpts = serde_json::from_slice(&json).map_err(|e| {
        malformed(format!(
            "the {ANNOTATION_PUBOPTS} annotation is not a valid options JSON object: {e}"
        ))
    })?;
    match raw.cipher.as_deref() {
        Some(CIPHER_AES_256_CTR_HMAC_SHA256) => {}
        Some(other) => {
            return Err((
                DecryptFailure::Unsupported,
                format!(
                    "unknown layer cipher {other:?}; only {CIPHER_AES_256_CTR_HMAC_SHA256} is supported"
                ),
            ))
        }
        None => {
            return Err(malformed(format!(
                "the {ANNOTATION_PUBOPTS} annotation names no cipher"
            )))
        }
    }
    let hmac = match raw.hmac.as_deref() {
        Some(h) if !h.is_empty() => b64std(h).map_err(|e| {
            malformed(format!(
                "the hmac in {ANNOTATION_PUBOPTS} is not base64: {e}"
            ))
        })?,
        _ => {
            return Err(malformed(format!(
                "the {ANNOTATION_PUBOPTS} annotation has no hmac, so the layer cannot be verified"
            )))
        }
    };
    let nonce = match raw
        .cipheroptions
        .unwrap_or_default()
        .remove("nonce")
        .flatten()
    {
        Some(n) => Some(
            b64std(&n).map_err(|e| malformed(format!("the public nonce is not base64: {e}")))?,
        ),
        None => None,
    };
    Ok(PubOpts { hmac, nonce })
}

/// The decoded, unverified JWE annotation: one or more JWEs.
fn parse_jwe_annotation(annotation: &str) -> Result<Vec<Jwe>, String> {
    let parts: Vec<&str> = annotation.split(',').collect();
    if parts.len() > MAX_JWES {
        return Err(format!(
            "the {ANNOTATION_KEYS_JWE} annotation holds {} JWEs; at most {MAX_JWES} are accepted",
            parts.len()
        ));
    }
    parts
        .iter()
        .enumerate()
        .map(|(i, part)| {
            let bytes = b64std(part).map_err(|e| {
                format!(
                    "JWE #{} in the {ANNOTATION_KEYS_JWE} annotation: {e}",
                    i + 1
                )
            })?;
            Jwe::parse(&bytes).map_err(|e| {
                format!(
                    "JWE #{} in the {ANNOTATION_KEYS_JWE} annotation is malformed: {e}",
                    i + 1
                )
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------
// JWE (RFC 7516) as produced by go-jose for ocicrypt
// ---------------------------------------------------------------------------

#[derive(Deserialize)]
struct RawJwe {
    #[serde(default)]
    protected: Option<String>,
    #[serde(default)]
    unprotected: Option<Map<String, Value>>,
    #[serde(default)]
    header: Option<Map<String, Value>>,
    #[serde(default)]
    encrypted_key: Option<String>,
    #[serde(default)]
    recipients: Option<Vec<RawRecipient>>,
    #[serde(default)]
    aad: Option<String>,
    iv: String,
    ciphertext: String,
    tag: String,
}

#[derive(Deserialize)]
struct RawRecipient {
    #[serde(default)]
    header: Option<Map<String, Value>>,
    #[serde(default)]
    encrypted_key: Option<String>,
}

struct Jwe {
    /// Additional authenticated data for the content cipher: the protected
    /// header's base64url text, plus `.` and the `aad` member's if any.
    auth_data: Vec<u8>,
    iv: Vec<u8>,
    ciphertext: Vec<u8>,
    tag: Vec<u8>,
    recipients: Vec<JweRecipient>,
}

struct JweRecipient {
    /// Protected, shared unprotected and per-recipient headers merged.
    header: Map<String, Value>,
    encrypted_key: Vec<u8>,
}

impl JweRecipient {
    fn alg(&self) -> &str {
        self.header.get("alg").and_then(Value::as_str).unwrap_or("")
    }
}

fn merge_header(
    into: &mut Map<String, Value>,
    from: Option<Map<String, Value>>,
) -> Result<(), String> {
    for (k, v) in from.unwrap_or_default() {
        if into.contains_key(&k) {
            return Err(format!("header parameter {k:?} appears more than once"));
        }
        into.insert(k, v);
    }
    Ok(())
}

impl Jwe {
    fn parse(bytes: &[u8]) -> Result<Jwe, String> {
        let text =
            std::str::from_utf8(bytes).map_err(|_| "the JWE is not UTF-8 text".to_string())?;
        let text = text.trim();
        let raw = if text.starts_with('{') {
            serde_json::from_str::<RawJwe>(text)
                .map_err(|e| format!("not a valid JWE JSON serialization: {e}"))?
        } else {
            // Compact serialization: protected.encrypted_key.iv.ciphertext.tag
            let p: Vec<&str> = text.split('.').collect();
            let [protected, ek, iv, ct, tag] = p[..] else {
                return Err("neither a JWE JSON object nor a 5-part compact JWE".into());
            };
            RawJwe {
                protected: Some(protected.to_string()),
                unprotected: None,
                header: None,
                encrypted_key: Some(ek.to_string()),
                recipients: None,
                aad: None,
                iv: iv.to_string(),
                ciphertext: ct.to_string(),
                tag: tag.to_string(),
            }
        };
        let protected_b64 = raw.protected.unwrap_or_default();
        let mut shared = Map::new();
        if !protected_b64.is_empty() {
            let json = b64url(&protected_b64).map_err(|e| format!("protected header: {e}"))?;
            shared = match serde_json::from_slice::<Value>(&json) {
                Ok(Value::Object(m)) => m,
                _ => return Err("the protected header is not a JSON object".into()),
            };
        }
        merge_header(&mut shared, raw.unprotected)?;
        let mut auth_data = protected_b64.into_bytes();
        if let Some(aad) = &raw.aad {
            b64url(aad).map_err(|e| format!("aad: {e}"))?;
            auth_data.push(b'.');
            auth_data.extend_from_slice(aad.as_bytes());
        }
        let raw_recipients = match raw.recipients {
            Some(r) if !r.is_empty() => r,
            _ => vec![RawRecipient {
                header: raw.header,
                encrypted_key: raw.encrypted_key,
            }],
        };
        if raw_recipients.len() > MAX_RECIPIENTS {
            return Err(format!(
                "the JWE has {} recipients; at most {MAX_RECIPIENTS} are accepted",
                raw_recipients.len()
            ));
        }
        let recipients = raw_recipients
            .into_iter()
            .map(|r| {
                let mut header = shared.clone();
                merge_header(&mut header, r.header)?;
                let encrypted_key = b64url(r.encrypted_key.as_deref().unwrap_or(""))
                    .map_err(|e| format!("encrypted_key: {e}"))?;
                Ok(JweRecipient {
                    header,
                    encrypted_key,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Jwe {
            auth_data,
            iv: b64url(&raw.iv).map_err(|e| format!("iv: {e}"))?,
            ciphertext: b64url(&raw.ciphertext).map_err(|e| format!("ciphertext: {e}"))?,
            tag: b64url(&raw.tag).map_err(|e| format!("tag: {e}"))?,
            recipients,
        })
    }

    /// Decrypt the A256GCM content with the content-encryption key.
    fn decrypt_content(&self, cek: &[u8]) -> Result<Zeroizing<Vec<u8>>, String> {
        if self.iv.len() != GCM_IV_LEN || self.tag.len() != GCM_TAG_LEN {
            return Err("the A256GCM iv or tag has the wrong length".into());
        }
        let cipher = Aes256Gcm::new_from_slice(cek)
            .map_err(|_| "the unwrapped content key is not 32 bytes".to_string())?;
        let mut msg = Vec::with_capacity(self.ciphertext.len() + GCM_TAG_LEN);
        msg.extend_from_slice(&self.ciphertext);
        msg.extend_from_slice(&self.tag);
        cipher
            .decrypt(
                Nonce::from_slice(&self.iv),
                Payload {
                    msg: &msg,
                    aad: &self.auth_data,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| "the JWE content failed A256GCM authentication".to_string())
    }
}

/// Concat KDF (NIST SP 800-56A, as profiled by RFC 7518 §4.6.2) with
/// SHA-256, for outputs of at most 32 bytes (one hash round).
fn concat_kdf(
    z: &[u8],
    alg: &str,
    apu: &[u8],
    apv: &[u8],
    key_len: usize,
) -> Result<Zeroizing<Vec<u8>>, String> {
    if key_len > 32 {
        return Err("derived key too long".into());
    }
    let len32 = |n: usize| u32::try_from(n).map_err(|_| "KDF input too long".to_string());
    let mut h = Sha256::new();
    h.update(1u32.to_be_bytes());
    h.update(z);
    for part in [alg.as_bytes(), apu, apv] {
        h.update(len32(part.len())?.to_be_bytes());
        h.update(part);
    }
    h.update(len32(key_len * 8)?.to_be_bytes());
    let mut out = h.finalize();
    let key = Zeroizing::new(out[..key_len].to_vec());
    out.zeroize();
    Ok(key)
}

fn ecdh_kw_key_len(alg: &str) -> Option<usize> {
    match alg {
        "ECDH-ES+A128KW" => Some(16),
        "ECDH-ES+A192KW" => Some(24),
        "ECDH-ES+A256KW" => Some(32),
        _ => None,
    }
}

fn aes_kw_unwrap(kek: &[u8], wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>, ()> {
    let out = match kek.len() {
        16 => aes_kw::KekAes128::try_from(kek)
            .map_err(|_| ())?
            .unwrap_vec(wrapped),
        24 => aes_kw::KekAes192::try_from(kek)
            .map_err(|_| ())?
            .unwrap_vec(wrapped),
        32 => aes_kw::KekAes256::try_from(kek)
            .map_err(|_| ())?
            .unwrap_vec(wrapped),
        _ => return Err(()),
    };
    out.map(Zeroizing::new).map_err(|_| ())
}

fn parse_epk(header: &Map<String, Value>) -> Result<p256::PublicKey, String> {
    let epk = header
        .get("epk")
        .and_then(Value::as_object)
        .ok_or("the recipient has no epk (ephemeral public key) header")?;
    let field = |k: &str| epk.get(k).and_then(Value::as_str).unwrap_or("");
    if field("kty") != "EC" || field("crv") != "P-256" {
        return Err(format!(
            "the ephemeral key is kty {:?} crv {:?}; only EC P-256 is supported",
            field("kty"),
            field("crv")
        ));
    }
    let x = b64url(field("x")).map_err(|e| format!("epk x: {e}"))?;
    let y = b64url(field("y")).map_err(|e| format!("epk y: {e}"))?;
    if x.len() != P256_COORD_LEN || y.len() != P256_COORD_LEN {
        return Err("the ephemeral key coordinates are not 32 bytes".into());
    }
    let mut sec1 = vec![4u8];
    sec1.extend_from_slice(&x);
    sec1.extend_from_slice(&y);
    p256::PublicKey::from_sec1_bytes(&sec1)
        .map_err(|_| "the ephemeral key is not a point on P-256".to_string())
}

/// Reject recipients using JWE features veil does not implement, before
/// any key is tried.
fn check_recipient(r: &JweRecipient) -> Result<(), String> {
    match r.header.get("enc").and_then(Value::as_str) {
        Some("A256GCM") => {}
        Some(enc) => {
            return Err(format!(
                "content encryption {enc:?} is not supported (only A256GCM)"
            ))
        }
        None => return Err("the JWE has no enc header".into()),
    }
    if r.header.contains_key("zip") || r.header.contains_key("crit") {
        return Err(
            "JWE compression (zip) and critical extensions (crit) are not supported".into(),
        );
    }
    Ok(())
}

/// Why one key could not open one recipient.
enum Miss {
    /// The recipient needs another kind of key.
    KeyType(String),
    /// Unsupported algorithm or malformed recipient.
    Unsupported(String),
    /// Right kind of key, but it does not open this recipient.
    NotThisKey(String),
}

fn unwrap_cek(key: &PrivateKey, r: &JweRecipient) -> Result<Zeroizing<Vec<u8>>, Miss> {
    let alg = r.alg();
    match (alg, &key.0) {
        ("RSA-OAEP" | "RSA-OAEP-256", PrivKind::Rsa(k)) => {
            let padding = if alg == "RSA-OAEP" {
                Oaep::new::<sha1::Sha1>()
            } else {
                Oaep::new::<Sha256>()
            };
            k.decrypt_blinded(&mut OsRng, padding, &r.encrypted_key)
                .map(Zeroizing::new)
                .map_err(|_| Miss::NotThisKey(format!("{alg} decryption with this key failed")))
        }
        ("RSA-OAEP" | "RSA-OAEP-256", PrivKind::P256(_)) => Err(Miss::KeyType(format!(
            "the recipient ({alg}) needs an RSA key"
        ))),
        (a, PrivKind::P256(k)) if ecdh_kw_key_len(a).is_some() => {
            let key_len = ecdh_kw_key_len(a).unwrap_or(32);
            let epk = parse_epk(&r.header).map_err(Miss::Unsupported)?;
            let get_bytes = |name: &str| -> Result<Vec<u8>, Miss> {
                match r.header.get(name) {
                    None => Ok(Vec::new()),
                    Some(Value::String(s)) => {
                        b64url(s).map_err(|e| Miss::Unsupported(format!("{name}: {e}")))
                    }
                    Some(_) => Err(Miss::Unsupported(format!("{name} is not a string"))),
                }
            };
            let apu = get_bytes("apu")?;
            let apv = get_bytes("apv")?;
            let shared = p256::ecdh::diffie_hellman(k.to_nonzero_scalar(), epk.as_affine());
            let kek = concat_kdf(shared.raw_secret_bytes(), a, &apu, &apv, key_len)
                .map_err(Miss::Unsupported)?;
            aes_kw_unwrap(&kek, &r.encrypted_key)
                .map_err(|_| Miss::NotThisKey(format!("{a} key unwrap with this key failed")))
        }
        (a, PrivKind::Rsa(_)) if ecdh_kw_key_len(a).is_some() => Err(Miss::KeyType(format!(
            "the recipient ({a}) needs an EC P-256 key"
        ))),
        ("", _) => Err(Miss::Unsupported(
            "the recipient has no alg header".to_string(),
        )),
        (a, _) => Err(Miss::Unsupported(format!(
            "key management algorithm {a:?} is not supported \
             (RSA-OAEP, RSA-OAEP-256 and ECDH-ES+A128KW/A192KW/A256KW are)"
        ))),
    }
}

// ---------------------------------------------------------------------------
// Layer keys and decryption
// ---------------------------------------------------------------------------

/// The unwrapped key material of one encrypted layer.
pub struct LayerKey {
    layer: Digest,
    media_type: String,
    symkey: Zeroizing<[u8; SYMKEY_LEN]>,
    nonce: [u8; NONCE_LEN],
    hmac: Vec<u8>,
    plaintext_digest: Option<Digest>,
}

impl fmt::Debug for LayerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LayerKey")
            .field("layer", &self.layer)
            .field("media_type", &self.media_type)
            .field("plaintext_digest", &self.plaintext_digest)
            .finish_non_exhaustive()
    }
}

impl LayerKey {
    /// The digest of the encrypted layer this key is for.
    pub fn layer_digest(&self) -> &Digest {
        &self.layer
    }

    /// The media type of the decrypted layer.
    pub fn decrypted_media_type(&self) -> &str {
        &self.media_type
    }

    /// The compression of the decrypted layer.
    pub fn compression(&self) -> Result<Compression, Error> {
        Descriptor::new(self.media_type.clone(), self.layer.clone(), 0).compression()
    }

    /// The digest of the plaintext layer blob, as recorded (authenticated)
    /// by the encryptor, if it recorded one.
    pub fn plaintext_digest(&self) -> Option<&Digest> {
        self.plaintext_digest.as_ref()
    }

    /// A reader that decrypts `encrypted` (the layer blob) and verifies it
    /// at EOF.
    pub fn decrypt<R: Read>(&self, encrypted: R) -> DecryptingReader<R> {
        DecryptingReader::new(encrypted, self)
    }
}

/// The keys an agent holds for unwrapping layer keys: private keys for JWE
/// recipients ([`ANNOTATION_KEYS_JWE`]) and key broker (KBS) keys for CoCo
/// annotation packets ([`ANNOTATION_KEYS_COCO`]).
///
/// `kbs_keys` maps a packet's `kid` to the raw bytes of that KBS resource
/// (the 32-byte key-encryption key). A packet's `kid` is looked up exactly
/// as written first, then by its `<repository>/<type>/<tag>` path: an entry
/// named `kbs:///a/b/c`, `kbs://broker.example/a/b/c` or `a/b/c` serves a
/// packet whose `kid` is any of these.
#[derive(Clone, Default)]
pub struct KeyRing {
    /// Private keys for JWE recipients.
    pub private_keys: Vec<PrivateKey>,
    /// KBS keys by resource URI (or `<repository>/<type>/<tag>` path).
    pub kbs_keys: BTreeMap<String, Zeroizing<Vec<u8>>>,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("private_keys", &self.private_keys)
            .field("kbs_keys", &self.kbs_keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl From<Vec<PrivateKey>> for KeyRing {
    fn from(private_keys: Vec<PrivateKey>) -> Self {
        KeyRing {
            private_keys,
            kbs_keys: BTreeMap::new(),
        }
    }
}

impl KeyRing {
    /// An empty key ring.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the ring holds no key at all.
    pub fn is_empty(&self) -> bool {
        self.private_keys.is_empty() && self.kbs_keys.is_empty()
    }

    /// Add a private key for JWE recipients.
    pub fn add_private_key(&mut self, key: PrivateKey) {
        self.private_keys.push(key);
    }

    /// Add (or replace) the KBS key for `kid` (a resource URI, or its
    /// `<repository>/<type>/<tag>` path).
    pub fn add_kbs_key(&mut self, kid: impl Into<String>, key: impl Into<Vec<u8>>) {
        self.kbs_keys.insert(kid.into(), Zeroizing::new(key.into()));
    }

    /// The KBS key for `kid`: the entry named exactly `kid`, else the first
    /// entry naming the same `<repository>/<type>/<tag>` path.
    pub fn kbs_key(&self, kid: &str) -> Option<&[u8]> {
        self.kbs_candidates(kid).into_iter().next()
    }

    /// Every KBS key that may be the one for `kid`, the exact entry first.
    fn kbs_candidates(&self, kid: &str) -> Vec<&[u8]> {
        let mut out: Vec<&[u8]> = self
            .kbs_keys
            .get(kid)
            .map(|k| k.as_slice())
            .into_iter()
            .collect();
        if let Some(path) = coco::normalized_path(kid) {
            out.extend(
                self.kbs_keys
                    .iter()
                    .filter(|(name, _)| {
                        name.as_str() != kid
                            && coco::normalized_path(name).as_deref() == Some(path.as_str())
                    })
                    .map(|(_, k)| k.as_slice()),
            );
        }
        out
    }

    /// What the ring holds, for error messages: key kinds and KBS key
    /// names, never key material.
    fn describe(&self) -> String {
        let private = if self.private_keys.is_empty() {
            "no private key".to_string()
        } else {
            let kinds: Vec<String> = self.private_keys.iter().map(PrivateKey::kind).collect();
            format!(
                "{} private key(s) ({})",
                self.private_keys.len(),
                kinds.join(", ")
            )
        };
        let kbs = if self.kbs_keys.is_empty() {
            "no KBS key".to_string()
        } else {
            let names: Vec<&str> = self.kbs_keys.keys().map(String::as_str).collect();
            format!("{} KBS key(s) ({})", self.kbs_keys.len(), names.join(", "))
        };
        format!("{private} and {kbs}")
    }
}

/// Why no key opened a layer, gathered over all recipients and packets.
#[derive(Default)]
struct Misses {
    reasons: Vec<String>,
    /// A key was tried and did not fit (or was of the wrong kind).
    wrong: bool,
    /// A supported recipient or packet had no key to try.
    absent: bool,
}

impl Misses {
    fn wrong(&mut self, why: String) {
        self.wrong = true;
        self.reasons.push(why);
    }
    fn absent(&mut self, why: String) {
        self.absent = true;
        self.reasons.push(why);
    }
    fn unsupported(&mut self, why: String) {
        self.reasons.push(why);
    }
}

/// Unwrap the key of the encrypted layer `desc` with one of `keys`.
///
/// Every key is tried against every JWE recipient in the
/// [`ANNOTATION_KEYS_JWE`] annotation (a layer's CoCo packets need KBS
/// keys: see [`unwrap_layer_key_with`]). Errors are
/// [`Error::LayerDecryption`] naming the layer digest, with a
/// [`DecryptFailure`] kind: `NoKey` if `keys` is empty, `WrongKey` if no
/// key fits, `Malformed`/`Unsupported` for bad or unknown metadata.
pub fn unwrap_layer_key(desc: &Descriptor, keys: &[PrivateKey]) -> Result<LayerKey, Error> {
    unwrap_layer_key_with(desc, &KeyRing::from(keys.to_vec()))
}

/// Unwrap the key of the encrypted layer `desc` with a key from `keys`.
///
/// CoCo packets ([`ANNOTATION_KEYS_COCO`]) are tried with the ring's KBS
/// key for their `kid` (see [`KeyRing`]), then every private key against
/// every JWE recipient ([`ANNOTATION_KEYS_JWE`]). Errors are
/// [`Error::LayerDecryption`] naming the layer digest, with a
/// [`DecryptFailure`] kind: `NoKey` if the ring is empty or holds no key
/// for any recipient or `kid` (the message names the `kid`s), `WrongKey` if
/// keys were tried and none fits (a GCM tag mismatch, a KBS key that is not
/// 32 bytes, a JWE key of another kind...), `Malformed`/`Unsupported` for
/// bad or unknown metadata (an unsupported key provider, packet version or
/// wrap type, JWE algorithm...). The reasons list every recipient and packet.
pub fn unwrap_layer_key_with(desc: &Descriptor, keys: &KeyRing) -> Result<LayerKey, Error> {
    let d = &desc.digest;
    let Some(media_type) = decrypted_media_type(&desc.media_type) else {
        return Err(fail(
            d,
            DecryptFailure::NotEncrypted,
            format!(
                "its media type {:?} is not an encrypted ({ENCRYPTED_SUFFIX}) media type",
                desc.media_type
            ),
        ));
    };
    let jwe_annotation = desc.annotations.get(ANNOTATION_KEYS_JWE);
    let coco_annotation = desc.annotations.get(ANNOTATION_KEYS_COCO);
    if jwe_annotation.is_none() && coco_annotation.is_none() {
        let schemes: Vec<&str> = desc
            .annotations
            .keys()
            .filter_map(|k| k.strip_prefix(ANNOTATION_KEYS_PREFIX))
            .collect();
        return Err(if schemes.is_empty() {
            fail(
                d,
                DecryptFailure::Malformed,
                format!(
                    "it has no {ANNOTATION_KEYS_JWE} or {ANNOTATION_KEYS_COCO} annotation \
                     holding its wrapped key"
                ),
            )
        } else {
            fail(
                d,
                DecryptFailure::Unsupported,
                format!(
                    "its key is wrapped only with the {} scheme(s); veil supports jwe and \
                     provider.attestation-agent (CoCo)",
                    schemes.join(", ")
                ),
            )
        });
    }
    let pub_annotation = desc.annotations.get(ANNOTATION_PUBOPTS).ok_or_else(|| {
        fail(
            d,
            DecryptFailure::Malformed,
            format!("it has no {ANNOTATION_PUBOPTS} annotation (cipher and HMAC)"),
        )
    })?;
    let pubopts = parse_pubopts(pub_annotation).map_err(|(kind, why)| fail(d, kind, why))?;
    let jwes = match jwe_annotation {
        Some(a) => {
            parse_jwe_annotation(a).map_err(|why| fail(d, DecryptFailure::Malformed, why))?
        }
        None => Vec::new(),
    };
    let packets = match coco_annotation {
        Some(a) => coco::parse_annotation(a).map_err(|(kind, why)| fail(d, kind, why))?,
        None => Vec::new(),
    };
    if keys.is_empty() {
        return Err(fail(
            d,
            DecryptFailure::NoKey,
            "no key can decrypt this layer: no private key or KBS key was given",
        ));
    }
    let opened = |plain: &[u8]| {
        layer_key_from_opts(desc, media_type, plain, &pubopts).map_err(|why| {
            fail(
                d,
                DecryptFailure::Malformed,
                format!("the decrypted private options are invalid: {why}"),
            )
        })
    };

    let mut misses = Misses::default();
    // CoCo packets first: one symmetric operation per candidate key.
    for (pi, p) in packets.iter().enumerate() {
        let w = match &p.body {
            Ok(w) => w,
            Err(why) => {
                misses.unsupported(format!(
                    "CoCo packet #{} (kid {}): {why}",
                    pi + 1,
                    coco::quoted(&p.kid)
                ));
                continue;
            }
        };
        let place = format!("CoCo packet #{} (kid {}, {})", pi + 1, p.kid, w.wrap);
        let candidates = keys.kbs_candidates(&p.kid);
        if candidates.is_empty() {
            misses.absent(format!(
                "{place}: no key for kid {} ({}) in the key ring",
                p.kid,
                w.resource.path()
            ));
            continue;
        }
        for kek in candidates {
            let plain = match w.open(kek) {
                Ok(plain) => plain,
                Err(why) => {
                    misses.wrong(format!("{place}: {why}"));
                    continue;
                }
            };
            match w.wrap {
                // Authenticated: these are the encryptor's options.
                CocoWrap::A256Gcm => return opened(&plain),
                // Unauthenticated: options that do not parse mean a wrong key.
                // The plaintext digest is then the only check that binds the nonce, so it is
                // required.
                CocoWrap::A256Ctr => {
                    match layer_key_from_opts(desc, media_type, &plain, &pubopts) {
                        Ok(key) if key.plaintext_digest.is_some() => return Ok(key),
                        Ok(_) | Err(_) => misses.wrong(format!(
                            "{place}: wrong key (A256CTR is unauthenticated, and what this key \
                         unwraps is not valid private options with a sha256 plaintext digest)"
                        )),
                    }
                }
            }
        }
    }
    for (ji, jwe) in jwes.iter().enumerate() {
        for (ri, r) in jwe.recipients.iter().enumerate() {
            let alg = if r.alg().is_empty() {
                "no alg"
            } else {
                r.alg()
            };
            if let Err(why) = check_recipient(r) {
                misses.unsupported(format!(
                    "JWE #{} recipient #{} ({alg}): {why}",
                    ji + 1,
                    ri + 1
                ));
                continue;
            }
            if keys.private_keys.is_empty() {
                misses.absent(format!(
                    "JWE #{} recipient #{} ({alg}): no private key was given",
                    ji + 1,
                    ri + 1
                ));
                continue;
            }
            for (ki, key) in keys.private_keys.iter().enumerate() {
                let place = format!(
                    "JWE #{} recipient #{} ({alg}) with key #{} ({})",
                    ji + 1,
                    ri + 1,
                    ki + 1,
                    key.kind()
                );
                let cek = match unwrap_cek(key, r) {
                    Ok(cek) => cek,
                    Err(Miss::KeyType(why) | Miss::NotThisKey(why)) => {
                        misses.wrong(format!("{place}: {why}"));
                        continue;
                    }
                    Err(Miss::Unsupported(why)) => {
                        misses.unsupported(format!("{place}: {why}"));
                        continue;
                    }
                };
                let plain = match jwe.decrypt_content(&cek) {
                    Ok(p) => p,
                    Err(why) => {
                        misses.wrong(format!("{place}: {why}"));
                        continue;
                    }
                };
                return opened(&plain);
            }
        }
    }
    let (kind, head) = if misses.wrong {
        (
            DecryptFailure::WrongKey,
            "no key can decrypt this layer (wrong key)",
        )
    } else if misses.absent {
        (
            DecryptFailure::NoKey,
            "no key can decrypt this layer (no key for it)",
        )
    } else {
        (
            DecryptFailure::Unsupported,
            "no key can decrypt this layer: its wrapped keys use only unsupported algorithms, \
             key providers or versions",
        )
    };
    Err(fail(
        d,
        kind,
        format!(
            "{head}: none of the given keys ({}) unwraps its layer key; {}",
            keys.describe(),
            misses.reasons.join("; ")
        ),
    ))
}

/// The KBS resource URIs (`kid`s, as written, each once, in order) that
/// the CoCo annotation packets of the encrypted layer `desc` name: the
/// broker resources to fetch into a [`KeyRing`] before
/// [`unwrap_layer_key_with`].
///
/// Empty when the layer is not encrypted or has no
/// [`ANNOTATION_KEYS_COCO`] annotation. Packets veil cannot use (another
/// key provider, packet version or wrap type) are left out; a malformed
/// annotation (bad base64 or JSON, a `kid` that is not a KBS resource URI,
/// a missing or wrong-length IV...) is an [`Error::LayerDecryption`] naming
/// the layer.
pub fn coco_key_ids(desc: &Descriptor) -> Result<Vec<String>, Error> {
    if !is_encrypted(desc) {
        return Ok(Vec::new());
    }
    let Some(annotation) = desc.annotations.get(ANNOTATION_KEYS_COCO) else {
        return Ok(Vec::new());
    };
    let packets =
        coco::parse_annotation(annotation).map_err(|(kind, why)| fail(&desc.digest, kind, why))?;
    let mut kids: Vec<String> = Vec::new();
    for p in packets {
        if p.body.is_ok() && !kids.contains(&p.kid) {
            kids.push(p.kid);
        }
    }
    Ok(kids)
}

fn opt_b64(v: Option<String>, what: &str) -> Result<Option<Zeroizing<Vec<u8>>>, String> {
    match v {
        None => Ok(None),
        Some(mut s) => {
            let r = b64std(&s).map_err(|e| format!("{what}: {e}"));
            s.zeroize();
            r.map(|b| Some(Zeroizing::new(b)))
        }
    }
}

/// The layer key from the decrypted private options `plain`; the error says
/// what is wrong with them.
fn layer_key_from_opts(
    desc: &Descriptor,
    media_type: &str,
    plain: &[u8],
    pubopts: &PubOpts,
) -> Result<LayerKey, String> {
    let d = &desc.digest;
    let raw: RawPrivOpts =
        serde_json::from_slice(plain).map_err(|_| "not a valid options JSON object".to_string())?;
    let symkey = opt_b64(raw.symkey, "symkey")?.ok_or_else(|| "there is no symkey".to_string())?;
    let symkey: [u8; SYMKEY_LEN] = symkey[..]
        .try_into()
        .map_err(|_| format!("the symkey is {} bytes, not {SYMKEY_LEN}", symkey.len()))?;
    let symkey = Zeroizing::new(symkey);
    let private_nonce = opt_b64(
        raw.cipheroptions
            .unwrap_or_default()
            .remove("nonce")
            .flatten(),
        "nonce",
    )?;
    let nonce = match (private_nonce, pubopts.nonce.as_ref()) {
        (Some(p), Some(q)) if p[..] != q[..] => {
            return Err("the private and public options carry different nonces".into())
        }
        (Some(p), _) => p.to_vec(),
        (None, Some(q)) => q.clone(),
        (None, None) => return Err("there is no nonce".into()),
    };
    let nonce: [u8; NONCE_LEN] = nonce[..]
        .try_into()
        .map_err(|_| format!("the nonce is {} bytes, not {NONCE_LEN}", nonce.len()))?;
    let plaintext_digest = match raw.digest.as_deref() {
        None | Some("") => None,
        Some(s) => match s.parse::<Digest>() {
            Ok(pd) => Some(pd),
            Err(_) => {
                tracing::debug!(layer = %d, digest = s, "plaintext digest is not sha256; not checked");
                None
            }
        },
    };
    Ok(LayerKey {
        layer: d.clone(),
        media_type: media_type.to_string(),
        symkey,
        nonce,
        hmac: pubopts.hmac.clone(),
        plaintext_digest,
    })
}

enum ReaderState {
    Streaming,
    Verified,
    Failed(String),
}

/// Streaming decryption of an encrypted layer blob.
///
/// Each read decrypts AES-256-CTR and feeds the ciphertext to HMAC-SHA256
/// (and the plaintext to SHA-256 when the plaintext digest is known). When
/// the inner reader reaches EOF, the HMAC (and digest) are checked: on a
/// mismatch that read, and every later one, fails with an
/// [`io::ErrorKind::InvalidData`] error wrapping an
/// [`Error::LayerDecryption`] (kind [`DecryptFailure::Integrity`]) that
/// names the layer — so a tampered or truncated layer never reads to a
/// clean EOF.
pub struct DecryptingReader<R> {
    inner: R,
    cipher: Aes256Ctr,
    mac: Option<HmacSha256>,
    expected_hmac: Vec<u8>,
    hasher: Option<Hasher>,
    expected_digest: Option<Digest>,
    layer: Digest,
    bytes: u64,
    state: ReaderState,
}

impl<R> fmt::Debug for DecryptingReader<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecryptingReader")
            .field("layer", &self.layer)
            .field("bytes", &self.bytes)
            .field("verified", &matches!(self.state, ReaderState::Verified))
            .finish_non_exhaustive()
    }
}

impl<R: Read> DecryptingReader<R> {
    /// Decrypt `inner` (the encrypted blob) with `key`.
    pub fn new(inner: R, key: &LayerKey) -> Self {
        let cipher = Aes256Ctr::new(key.symkey.as_ref().into(), (&key.nonce).into());
        // HMAC accepts keys of any length; a 32-byte key cannot fail.
        let mac = <HmacSha256 as Mac>::new_from_slice(key.symkey.as_ref()).ok();
        DecryptingReader {
            inner,
            cipher,
            mac,
            expected_hmac: key.hmac.clone(),
            hasher: key.plaintext_digest.as_ref().map(|_| Hasher::new()),
            expected_digest: key.plaintext_digest.clone(),
            layer: key.layer.clone(),
            bytes: 0,
            state: ReaderState::Streaming,
        }
    }

    /// Whether EOF was reached and the layer verified.
    pub fn is_verified(&self) -> bool {
        matches!(self.state, ReaderState::Verified)
    }

    /// Ciphertext bytes read so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes
    }

    /// The inner reader.
    pub fn into_inner(self) -> R {
        self.inner
    }

    fn integrity_error(&self, reason: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            fail(&self.layer, DecryptFailure::Integrity, reason),
        )
    }

    fn finish(&mut self) -> Result<(), String> {
        let mac_ok = self
            .mac
            .take()
            .is_some_and(|m| m.verify_slice(&self.expected_hmac).is_ok());
        if !mac_ok {
            return Err(format!(
                "the layer failed its integrity check: the HMAC-SHA256 of its {} bytes of \
                 ciphertext does not match the one in {ANNOTATION_PUBOPTS}, so the layer was \
                 tampered with or truncated",
                self.bytes
            ));
        }
        if let (Some(h), Some(want)) = (self.hasher.take(), &self.expected_digest) {
            let got = h.finish();
            if &got != want {
                return Err(format!(
                    "the layer failed its integrity check: the decrypted layer hashes to {got}, \
                     but the encryption metadata says {want}"
                ));
            }
        }
        Ok(())
    }
}

impl<R: Read> Read for DecryptingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &self.state {
            ReaderState::Verified => return Ok(0),
            ReaderState::Failed(why) => return Err(self.integrity_error(why)),
            ReaderState::Streaming => {}
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        if n == 0 {
            return match self.finish() {
                Ok(()) => {
                    tracing::debug!(layer = %self.layer, bytes = self.bytes, "encrypted layer verified");
                    self.state = ReaderState::Verified;
                    Ok(0)
                }
                Err(why) => {
                    let e = self.integrity_error(&why);
                    self.state = ReaderState::Failed(why);
                    Err(e)
                }
            };
        }
        let chunk = &mut buf[..n];
        if let Some(m) = self.mac.as_mut() {
            m.update(chunk);
        }
        self.cipher.apply_keystream(chunk);
        if let Some(h) = self.hasher.as_mut() {
            h.update(chunk);
        }
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Decrypt a whole encrypted layer blob in memory: unwrap its key with one
/// of `keys`, decrypt and verify. Returns the plaintext blob.
pub fn decrypt_layer(
    desc: &Descriptor,
    encrypted: &[u8],
    keys: &[PrivateKey],
) -> Result<Vec<u8>, Error> {
    decrypt_layer_with(desc, encrypted, &KeyRing::from(keys.to_vec()))
}

/// Decrypt a whole encrypted layer blob in memory: unwrap its key with a
/// key from `keys` (see [`unwrap_layer_key_with`]), decrypt and verify.
/// Returns the plaintext blob.
pub fn decrypt_layer_with(
    desc: &Descriptor,
    encrypted: &[u8],
    keys: &KeyRing,
) -> Result<Vec<u8>, Error> {
    let key = unwrap_layer_key_with(desc, keys)?;
    let mut out = Vec::with_capacity(encrypted.len());
    key.decrypt(encrypted).read_to_end(&mut out).map_err(|e| {
        match e.into_inner().map(|b| b.downcast::<Error>()) {
            Some(Ok(inner)) => *inner,
            Some(Err(other)) => fail(&desc.digest, DecryptFailure::Integrity, other.to_string()),
            None => fail(&desc.digest, DecryptFailure::Integrity, "read failed"),
        }
    })?;
    Ok(out)
}

// ---------------------------------------------------------------------------
// Encryption
// ---------------------------------------------------------------------------

fn random<const N: usize>() -> Zeroizing<[u8; N]> {
    let mut b = Zeroizing::new([0u8; N]);
    OsRng.fill_bytes(b.as_mut());
    b
}

/// One recipient entry: its header parameters and wrapped CEK.
fn wrap_cek(key: &PublicKey, cek: &[u8]) -> Result<(Map<String, Value>, Vec<u8>), String> {
    let mut header = Map::new();
    match &key.0 {
        PubKind::Rsa(k) => {
            header.insert("alg".into(), json!("RSA-OAEP"));
            let ek = k
                .encrypt(&mut OsRng, Oaep::new::<sha1::Sha1>(), cek)
                .map_err(|e| format!("RSA-OAEP encryption failed: {e}"))?;
            Ok((header, ek))
        }
        PubKind::P256(k) => {
            let alg = "ECDH-ES+A256KW";
            let eph = p256::ecdh::EphemeralSecret::random(&mut OsRng);
            let epk = eph.public_key().to_encoded_point(false);
            let (Some(x), Some(y)) = (epk.x(), epk.y()) else {
                return Err("cannot encode the ephemeral key".into());
            };
            header.insert("alg".into(), json!(alg));
            header.insert(
                "epk".into(),
                json!({"kty": "EC", "crv": "P-256", "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y)}),
            );
            let shared = eph.diffie_hellman(k);
            let kek = concat_kdf(shared.raw_secret_bytes(), alg, &[], &[], 32)?;
            let kek = aes_kw::KekAes256::try_from(&kek[..]).map_err(|_| "bad KEK".to_string())?;
            let ek = kek
                .wrap_vec(cek)
                .map_err(|e| format!("AES key wrap failed: {e}"))?;
            Ok((header, ek))
        }
    }
}

/// A JWE (JSON serialization, go-jose style) encrypting `plaintext` with
/// A256GCM for `recipients`.
fn jwe_encrypt(plaintext: &[u8], recipients: &[&PublicKey]) -> Result<String, String> {
    let cek = random::<32>();
    let mut wrapped = recipients
        .iter()
        .map(|k| wrap_cek(k, cek.as_ref()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut protected = Map::new();
    protected.insert("enc".into(), json!("A256GCM"));
    let single = wrapped.len() == 1;
    if single {
        // Like go-jose: a single recipient's header goes into the protected header.
        for (k, v) in std::mem::take(&mut wrapped[0].0) {
            protected.insert(k, v);
        }
    }
    let protected_b64 = URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(&Value::Object(protected)).map_err(|e| e.to_string())?);
    let iv = random::<GCM_IV_LEN>();
    let cipher = Aes256Gcm::new_from_slice(cek.as_ref()).map_err(|_| "bad CEK".to_string())?;
    let mut sealed = cipher
        .encrypt(
            Nonce::from_slice(iv.as_ref()),
            Payload {
                msg: plaintext,
                aad: protected_b64.as_bytes(),
            },
        )
        .map_err(|_| "A256GCM encryption failed".to_string())?;
    let tag = sealed.split_off(sealed.len() - GCM_TAG_LEN);
    let mut out = Map::new();
    out.insert("protected".into(), json!(protected_b64));
    if single {
        out.insert(
            "encrypted_key".into(),
            json!(URL_SAFE_NO_PAD.encode(&wrapped[0].1)),
        );
    } else {
        let rs: Vec<Value> = wrapped
            .into_iter()
            .map(|(h, ek)| json!({"header": h, "encrypted_key": URL_SAFE_NO_PAD.encode(ek)}))
            .collect();
        out.insert("recipients".into(), Value::Array(rs));
    }
    out.insert("iv".into(), json!(URL_SAFE_NO_PAD.encode(iv.as_ref())));
    out.insert("ciphertext".into(), json!(URL_SAFE_NO_PAD.encode(&sealed)));
    out.insert("tag".into(), json!(URL_SAFE_NO_PAD.encode(&tag)));
    serde_json::to_string(&Value::Object(out)).map_err(|e| e.to_string())
}

/// Someone a layer is encrypted for.
#[derive(Clone)]
pub enum Recipient {
    /// A JWE recipient ([`ANNOTATION_KEYS_JWE`]): RSA-OAEP for RSA keys,
    /// ECDH-ES+A256KW for P-256 keys. All JWE recipients of a layer share
    /// one JWE.
    Jwe(PublicKey),
    /// A key broker resource ([`ANNOTATION_KEYS_COCO`]): one CoCo
    /// annotation packet wrapping the layer key with `kek`.
    Kbs {
        /// The resource's URI, `kbs:///<repository>/<type>/<tag>` (or with
        /// a broker host), written as the packet's `kid`.
        kid: String,
        /// The resource's value: the 32-byte key-encryption key.
        kek: Zeroizing<Vec<u8>>,
        /// How the packet wraps the layer key.
        wrap: CocoWrap,
    },
}

impl fmt::Debug for Recipient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Recipient::Jwe(k) => f.debug_tuple("Jwe").field(k).finish(),
            Recipient::Kbs { kid, kek, wrap } => f
                .debug_struct("Kbs")
                .field("kid", kid)
                .field("kek", &format_args!("<{} bytes>", kek.len()))
                .field("wrap", wrap)
                .finish(),
        }
    }
}

impl From<PublicKey> for Recipient {
    fn from(key: PublicKey) -> Self {
        Recipient::Jwe(key)
    }
}

impl Recipient {
    /// A KBS recipient wrapping with A256GCM, checked: `kid` must be a KBS
    /// resource URI and `kek` 32 bytes. (Errors never contain the key.)
    pub fn kbs(kid: impl Into<String>, kek: impl Into<Vec<u8>>) -> Result<Self, Error> {
        let recipient = Recipient::Kbs {
            kid: kid.into(),
            kek: Zeroizing::new(kek.into()),
            wrap: CocoWrap::default(),
        };
        recipient.check()?;
        Ok(recipient)
    }

    /// A KBS recipient with a fresh random 256-bit key-encryption key (from the OS), returned
    /// too so that it can be stored in the key broker under `kid`.
    pub fn kbs_generated(kid: impl Into<String>) -> Result<(Self, Zeroizing<Vec<u8>>), Error> {
        let mut kek = Zeroizing::new(vec![0u8; SYMKEY_LEN]);
        OsRng.fill_bytes(kek.as_mut_slice());
        Ok((Recipient::kbs(kid, kek.to_vec())?, kek))
    }

    /// The same recipient wrapping with `wrap` (no effect on JWE
    /// recipients).
    pub fn with_wrap(mut self, new_wrap: CocoWrap) -> Self {
        if let Recipient::Kbs { wrap, .. } = &mut self {
            *wrap = new_wrap;
        }
        self
    }

    fn check(&self) -> Result<(), Error> {
        match self {
            Recipient::Jwe(_) => Ok(()),
            Recipient::Kbs { kid, kek, .. } => {
                KbsResource::parse(kid)?;
                if kek.len() != coco::KBS_KEK_LEN {
                    return Err(invalid_key(format!(
                        "the key-encryption key for {kid} is {} bytes; {} (AES-256) are required",
                        kek.len(),
                        coco::KBS_KEK_LEN
                    )));
                }
                Ok(())
            }
        }
    }
}

/// Encrypt one layer blob for JWE `recipients` in the ocicrypt format
/// (AES-256-CTR + HMAC-SHA256; the key wrapped in one JWE, A256GCM, with
/// RSA-OAEP for RSA keys and ECDH-ES+A256KW for P-256 keys).
///
/// Returns the encrypted bytes and their descriptor: media type
/// `<layer.media_type>+encrypted`, with the [`ANNOTATION_KEYS_JWE`] and
/// [`ANNOTATION_PUBOPTS`] annotations. The plaintext digest is recorded in
/// the private options, so decryptors can verify it. See
/// [`encrypt_layer_for`] for KBS recipients.
pub fn encrypt_layer(
    layer: &Blob,
    recipients: &[PublicKey],
) -> Result<(Vec<u8>, Descriptor), Error> {
    encrypt_layer_for(layer, &jwe_recipients(recipients))
}

/// Encrypt one layer blob for `recipients`, JWE public keys and/or key
/// broker (KBS) keys, in the ocicrypt format.
///
/// Like [`encrypt_layer`], plus one [`ANNOTATION_KEYS_COCO`] annotation
/// packet per KBS recipient (version-1 shape, a fresh random IV each);
/// the [`ANNOTATION_KEYS_JWE`] annotation is written only when there is a
/// JWE recipient.
pub fn encrypt_layer_for(
    layer: &Blob,
    recipients: &[Recipient],
) -> Result<(Vec<u8>, Descriptor), Error> {
    encrypt_with_descriptor(&layer.descriptor(), &layer.data, recipients)
}

fn jwe_recipients(keys: &[PublicKey]) -> Vec<Recipient> {
    keys.iter().cloned().map(Recipient::Jwe).collect()
}

fn encrypt_with_descriptor(
    plain: &Descriptor,
    data: &[u8],
    recipients: &[Recipient],
) -> Result<(Vec<u8>, Descriptor), Error> {
    let refuse = |reason: String| Error::LayerEncryption {
        digest: plain.digest.clone(),
        reason,
    };
    if decrypted_media_type(&plain.media_type).is_some() {
        return Err(refuse(format!(
            "its media type {:?} says it is encrypted already",
            plain.media_type
        )));
    }
    if recipients.is_empty() {
        return Err(refuse(
            "no recipient public key or KBS key was given".into(),
        ));
    }
    if recipients.len() > MAX_RECIPIENTS {
        return Err(refuse(format!(
            "{} recipients given; at most {MAX_RECIPIENTS} are supported",
            recipients.len()
        )));
    }
    for (i, r) in recipients.iter().enumerate() {
        r.check().map_err(|e| match e {
            Error::InvalidKey { reason } => refuse(format!("recipient #{}: {reason}", i + 1)),
            other => other,
        })?;
    }
    let symkey = random::<SYMKEY_LEN>();
    let nonce = random::<NONCE_LEN>();
    let mut ciphertext = data.to_vec();
    Aes256Ctr::new(symkey.as_ref().into(), nonce.as_ref().into()).apply_keystream(&mut ciphertext);
    let mut mac = <HmacSha256 as Mac>::new_from_slice(symkey.as_ref())
        .map_err(|_| refuse("cannot key the HMAC".into()))?;
    mac.update(&ciphertext);
    let hmac = mac.finalize().into_bytes();

    let symkey_b64 = Zeroizing::new(STANDARD.encode(symkey.as_ref()));
    let priv_json = Zeroizing::new(
        serde_json::to_vec(&PrivOptsOut {
            symkey: &symkey_b64,
            digest: plain.digest.as_str(),
            cipheroptions: BTreeMap::from([("nonce", STANDARD.encode(nonce.as_ref()))]),
        })
        .map_err(|e| refuse(format!("cannot serialize the private options: {e}")))?,
    );
    let pub_json = serde_json::to_vec(&PubOptsOut {
        cipher: CIPHER_AES_256_CTR_HMAC_SHA256,
        hmac: STANDARD.encode(hmac),
        cipheroptions: BTreeMap::new(),
    })
    .map_err(|e| refuse(format!("cannot serialize the public options: {e}")))?;
    let mut jwe_keys: Vec<&PublicKey> = Vec::new();
    let mut packets: Vec<String> = Vec::new();
    for r in recipients {
        match r {
            Recipient::Jwe(k) => jwe_keys.push(k),
            Recipient::Kbs { kid, kek, wrap } => {
                packets.push(coco::wrap_packet(kid, kek, *wrap, &priv_json).map_err(refuse)?)
            }
        }
    }

    let mut desc = Descriptor::new(
        format!("{}{ENCRYPTED_SUFFIX}", plain.media_type),
        Digest::sha256(&ciphertext),
        ciphertext.len() as u64,
    );
    desc.annotations = plain.annotations.clone();
    // No stale encryption metadata survives from the plaintext descriptor.
    desc.annotations
        .retain(|k, _| !k.starts_with(ANNOTATION_PREFIX));
    if !jwe_keys.is_empty() {
        let jwe = jwe_encrypt(&priv_json, &jwe_keys).map_err(refuse)?;
        desc.annotations
            .insert(ANNOTATION_KEYS_JWE.to_string(), STANDARD.encode(jwe));
    }
    if !packets.is_empty() {
        desc.annotations
            .insert(ANNOTATION_KEYS_COCO.to_string(), packets.join(","));
    }
    desc.annotations
        .insert(ANNOTATION_PUBOPTS.to_string(), STANDARD.encode(pub_json));
    tracing::debug!(
        layer = %plain.digest,
        encrypted = %desc.digest,
        jwe_recipients = jwe_keys.len(),
        kbs_recipients = packets.len(),
        "encrypted layer"
    );
    Ok((ciphertext, desc))
}

/// Rewrite `image` with the layers chosen by `select(index, descriptor)`
/// encrypted for the JWE `recipients` (see [`encrypt_image_for`]).
///
/// The config blob (and so `rootfs.diff_ids`, which stay those of the
/// plaintext layers, as with ocicrypt) is unchanged; the manifest is
/// rebuilt with the encrypted layers' descriptors (media type
/// `+encrypted`, encryption annotations). Layers already encrypted are
/// left alone.
pub fn encrypt_image(
    image: &BuiltImage,
    recipients: &[PublicKey],
    select: impl FnMut(usize, &Descriptor) -> bool,
) -> Result<BuiltImage, Error> {
    encrypt_image_for(image, &jwe_recipients(recipients), select)
}

/// Rewrite `image` with the layers chosen by `select(index, descriptor)`
/// encrypted for `recipients`, JWE public keys and/or key broker (KBS)
/// keys; otherwise as [`encrypt_image`].
pub fn encrypt_image_for(
    image: &BuiltImage,
    recipients: &[Recipient],
    mut select: impl FnMut(usize, &Descriptor) -> bool,
) -> Result<BuiltImage, Error> {
    let mut manifest = match parse_manifest(&image.manifest.data, Some(OCI_MANIFEST))? {
        Manifest::Image(m) => m,
        Manifest::Index(_) => {
            return Err(Error::InvalidManifest {
                reason: "cannot encrypt an index; encrypt each image manifest".into(),
            })
        }
    };
    if manifest.layers.len() != image.layers.len() {
        return Err(Error::InvalidManifest {
            reason: format!(
                "the manifest lists {} layers, but the image has {} layer blobs",
                manifest.layers.len(),
                image.layers.len()
            ),
        });
    }
    let mut layers = Vec::with_capacity(image.layers.len());
    for (i, (desc, blob)) in manifest.layers.iter_mut().zip(&image.layers).enumerate() {
        if desc.digest != blob.digest {
            return Err(Error::InvalidManifest {
                reason: format!(
                    "manifest layer {i} is {}, but the image's layer blob {i} is {}",
                    desc.digest, blob.digest
                ),
            });
        }
        if decrypted_media_type(&desc.media_type).is_some() || !select(i, desc) {
            layers.push(blob.clone());
            continue;
        }
        let (data, enc_desc) = encrypt_with_descriptor(desc, &blob.data, recipients)?;
        layers.push(Blob {
            media_type: enc_desc.media_type.clone(),
            digest: enc_desc.digest.clone(),
            data,
        });
        *desc = enc_desc;
    }
    let manifest = Blob::new(manifest.media_type.clone(), image_manifest_json(&manifest));
    Ok(BuiltImage {
        manifest,
        config: image.config.clone(),
        layers,
    })
}

/// Whether `desc` is an encrypted layer (its media type ends in
/// `+encrypted`).
pub fn is_encrypted(desc: &Descriptor) -> bool {
    decrypted_media_type(&desc.media_type).is_some()
}

#[cfg(test)]
mod coco_tests;
#[cfg(test)]
mod tests;
