//! JWE for released resources: `ECDH-ES+A256KW` key agreement on P-256 with `A256GCM` content
//! encryption (RFC 7516 / RFC 7518 §4.6), in the JSON serialization of `kbs_types::Response`.
//! The broker also encrypts to `RSA-OAEP-256` keys (RFC 7518 §4.3), which Confidential
//! Containers' client uses with a key of its own (`kbs-client --tee-key-file`); veil's client
//! always uses P-256.
//!
//! Everything cryptographic comes from RustCrypto crates (p256 ECDH, AES key wrap, AES-GCM,
//! rsa OAEP); only the Concat KDF of RFC 7518 §4.6.2 (one SHA-256 round for a 256-bit key) is
//! composed here.

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use kbs_types::{ProtectedHeader, Response, TeePubKey};
use p256::elliptic_curve::sec1::{FromEncodedPoint, ToEncodedPoint};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// Key-management algorithm of the JWE.
pub const ALG_ECDH_ES_A256KW: &str = "ECDH-ES+A256KW";
/// Content-encryption algorithm of the JWE.
pub const ENC_A256GCM: &str = "A256GCM";
/// The only curve supported.
pub const CRV_P256: &str = "P-256";
/// Key-management algorithm for RSA TEE keys.
pub const ALG_RSA_OAEP_256: &str = "RSA-OAEP-256";
/// Accepted RSA modulus sizes (bits).
const RSA_BITS: std::ops::RangeInclusive<usize> = 2048..=8192;

/// A TEE key the broker can encrypt to.
pub enum Recipient {
    /// P-256, `ECDH-ES+A256KW`.
    P256(p256::PublicKey),
    /// RSA, `RSA-OAEP-256`.
    Rsa(Box<rsa::RsaPublicKey>),
}

/// JWE errors. Messages never contain key material or plaintext.
#[derive(Debug, thiserror::Error)]
pub enum JweError {
    /// The TEE public key is not a P-256 `ECDH-ES+A256KW` key.
    #[error("unsupported TEE public key: {0}")]
    UnsupportedKey(String),
    /// The TEE public key is malformed (bad base64, wrong length, not on the curve).
    #[error("invalid TEE public key: {0}")]
    InvalidKey(String),
    /// The JWE is malformed.
    #[error("malformed JWE: {0}")]
    Malformed(String),
    /// Decryption failed (wrong key, or the JWE was altered).
    #[error("JWE does not decrypt: wrong key or altered ciphertext")]
    Decrypt,
    /// Encryption failed.
    #[error("JWE encryption failed: {0}")]
    Encrypt(String),
}

pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    use rand::RngCore;
    let mut b = [0u8; N];
    rand::rng().fill_bytes(&mut b);
    b
}

/// A fresh P-256 secret key from the thread CSPRNG.
fn random_secret_key() -> p256::SecretKey {
    loop {
        let bytes = Zeroizing::new(random_bytes::<32>());
        // Fails only for 0 or values >= n (probability ~2^-32): draw again.
        if let Ok(k) = p256::SecretKey::from_slice(bytes.as_slice()) {
            return k;
        }
    }
}

fn b64_coord(name: &str, v: &str) -> Result<[u8; 32], JweError> {
    let b = URL_SAFE_NO_PAD
        .decode(v)
        .map_err(|e| JweError::InvalidKey(format!("{name} is not base64url: {e}")))?;
    b.try_into()
        .map_err(|_| JweError::InvalidKey(format!("{name} is not 32 bytes")))
}

fn point(x: &str, y: &str) -> Result<p256::PublicKey, JweError> {
    let x = b64_coord("x", x)?;
    let y = b64_coord("y", y)?;
    let ep = p256::EncodedPoint::from_affine_coordinates(&x.into(), &y.into(), false);
    Option::from(p256::PublicKey::from_encoded_point(&ep))
        .ok_or_else(|| JweError::InvalidKey("point is not on P-256".into()))
}

/// Check that `key` is a P-256 `ECDH-ES+A256KW` key on the curve, or an `RSA-OAEP-256` key of
/// 2048 to 8192 bits, and return it.
pub fn tee_public_key(key: &TeePubKey) -> Result<Recipient, JweError> {
    const SUPPORTED: &str = "EC P-256 with ECDH-ES+A256KW, or RSA with RSA-OAEP-256";
    match key {
        TeePubKey::EC { crv, alg, x, y } => {
            if crv != CRV_P256 || alg != ALG_ECDH_ES_A256KW {
                return Err(JweError::UnsupportedKey(format!(
                    "EC key with crv {crv:?} and alg {alg:?} (supported: {SUPPORTED})"
                )));
            }
            point(x, y).map(Recipient::P256)
        }
        TeePubKey::RSA { alg, k_mod, k_exp } => {
            if alg != ALG_RSA_OAEP_256 {
                return Err(JweError::UnsupportedKey(format!(
                    "RSA key with alg {alg:?} (supported: {SUPPORTED})"
                )));
            }
            let int = |name: &str, v: &str, max: usize| {
                let b = URL_SAFE_NO_PAD
                    .decode(v)
                    .map_err(|e| JweError::InvalidKey(format!("{name} is not base64url: {e}")))?;
                if b.is_empty() || b.len() > max {
                    return Err(JweError::InvalidKey(format!("{name} has a bad length")));
                }
                Ok(rsa::BigUint::from_bytes_be(&b))
            };
            let n = int("n", k_mod, RSA_BITS.end() / 8)?;
            let e = int("e", k_exp, 8)?;
            if !RSA_BITS.contains(&n.bits()) {
                return Err(JweError::UnsupportedKey(format!(
                    "RSA key of {} bits (2048 to 8192 accepted)",
                    n.bits()
                )));
            }
            rsa::RsaPublicKey::new_with_max_size(n, e, *RSA_BITS.end())
                .map(|k| Recipient::Rsa(Box::new(k)))
                .map_err(|e| JweError::InvalidKey(format!("RSA key: {e}")))
        }
        TeePubKey::AKP { .. } => Err(JweError::UnsupportedKey(format!(
            "AKP keys are not accepted (supported: {SUPPORTED})"
        ))),
    }
}

fn coords(pk: &p256::PublicKey) -> Result<(String, String), JweError> {
    let ep = pk.to_encoded_point(false);
    match (ep.x(), ep.y()) {
        (Some(x), Some(y)) => Ok((URL_SAFE_NO_PAD.encode(x), URL_SAFE_NO_PAD.encode(y))),
        _ => Err(JweError::InvalidKey("point at infinity".into())),
    }
}

/// Concat KDF (NIST SP 800-56A, as profiled by RFC 7518 §4.6.2) for keys of at most 256 bits
/// (one SHA-256 round): `SHA-256(1 ‖ Z ‖ len‖alg ‖ len‖apu ‖ len‖apv ‖ keybits)`, truncated.
fn concat_kdf(z: &[u8], alg: &str, apu: &[u8], apv: &[u8], key_bits: u32) -> Zeroizing<Vec<u8>> {
    let mut h = Sha256::new();
    h.update(1u32.to_be_bytes());
    h.update(z);
    for field in [alg.as_bytes(), apu, apv] {
        h.update((field.len() as u32).to_be_bytes());
        h.update(field);
    }
    h.update(key_bits.to_be_bytes());
    let mut out = Zeroizing::new(h.finalize().to_vec());
    out.truncate((key_bits / 8).min(32) as usize);
    out
}

fn kek(shared: &p256::ecdh::SharedSecret) -> Result<aes_kw::KekAes256, JweError> {
    let k = concat_kdf(
        &shared.raw_secret_bytes()[..],
        ALG_ECDH_ES_A256KW,
        b"",
        b"",
        256,
    );
    aes_kw::KekAes256::try_from(k.as_slice()).map_err(|_| JweError::Encrypt("KEK length".into()))
}
/// ECDH-ES+A256KW: wrap `cek` for `recipient` with a fresh ephemeral key; the header and the
/// wrapped key.
fn wrap_ecdh(
    recipient: &p256::PublicKey,
    cek: &[u8; 32],
) -> Result<(ProtectedHeader, Vec<u8>), JweError> {
    let eph = random_secret_key();
    let shared = p256::ecdh::diffie_hellman(eph.to_nonzero_scalar(), recipient.as_affine());
    let mut encrypted_key = vec![0u8; 40];
    kek(&shared)?
        .wrap(cek.as_slice(), &mut encrypted_key)
        .map_err(|e| JweError::Encrypt(format!("key wrap: {e}")))?;
    let (ex, ey) = coords(&eph.public_key())?;
    // Members in sorted order at every level: trustee's client rebuilds the authenticated data
    // by re-serialising the header with sorted keys (`serde_json` without `preserve_order`),
    // while this workspace's `serde_json` keeps insertion order. Inserting sorted makes both
    // the same bytes.
    let mut epk = serde_json::Map::new();
    epk.insert("crv".into(), CRV_P256.into());
    epk.insert("kty".into(), "EC".into());
    epk.insert("x".into(), ex.into());
    epk.insert("y".into(), ey.into());
    let mut other = serde_json::Map::new();
    other.insert("epk".into(), serde_json::Value::Object(epk));
    let header = ProtectedHeader {
        alg: ALG_ECDH_ES_A256KW.into(),
        enc: ENC_A256GCM.into(),
        other_fields: other,
    };
    Ok((header, encrypted_key))
}

/// Protected-header member naming the resource a JWE holds (`<repo>/<type>/<tag>`): the
/// broker authenticates it with the content, so a relay that rewrites the request path cannot
/// hand a sandbox another resource than the one it asked for. Clients that do not know it
/// (trustee's) ignore it.
pub const RESOURCE_HEADER: &str = "kbs-resource";

/// Encrypt `plaintext` to `tee_pubkey`.
pub fn encrypt(tee_pubkey: &TeePubKey, plaintext: &[u8]) -> Result<Response, JweError> {
    seal(tee_pubkey, plaintext, None)
}

/// Encrypt the resource `path` to `tee_pubkey`, naming it in the protected header
/// ([`RESOURCE_HEADER`]).
pub fn encrypt_resource(
    tee_pubkey: &TeePubKey,
    plaintext: &[u8],
    path: &str,
) -> Result<Response, JweError> {
    seal(tee_pubkey, plaintext, Some(path))
}

fn seal(
    tee_pubkey: &TeePubKey,
    plaintext: &[u8],
    resource: Option<&str>,
) -> Result<Response, JweError> {
    use aes_gcm::aead::{AeadInPlace, KeyInit};
    let cek = Zeroizing::new(random_bytes::<32>());
    let (mut protected, encrypted_key) = match tee_public_key(tee_pubkey)? {
        Recipient::P256(recipient) => wrap_ecdh(&recipient, &cek)?,
        Recipient::Rsa(recipient) => {
            let wrapped = recipient
                .encrypt(
                    &mut rand_core::OsRng,
                    rsa::Oaep::new::<Sha256>(),
                    cek.as_slice(),
                )
                .map_err(|e| JweError::Encrypt(format!("RSA-OAEP: {e}")))?;
            let header = ProtectedHeader {
                alg: ALG_RSA_OAEP_256.into(),
                enc: ENC_A256GCM.into(),
                other_fields: serde_json::Map::new(),
            };
            (header, wrapped)
        }
    };
    if let Some(r) = resource {
        // After `epk`: the members stay in sorted order (see `wrap_ecdh`).
        protected
            .other_fields
            .insert(RESOURCE_HEADER.into(), r.into());
    }
    let aad = protected
        .generate_aad()
        .map_err(|e| JweError::Encrypt(format!("protected header: {e}")))?;
    let iv = random_bytes::<12>();
    let cipher = aes_gcm::Aes256Gcm::new_from_slice(cek.as_slice())
        .map_err(|e| JweError::Encrypt(e.to_string()))?;
    let mut ciphertext = plaintext.to_vec();
    let tag = cipher
        .encrypt_in_place_detached((&iv).into(), &aad, &mut ciphertext)
        .map_err(|_| JweError::Encrypt("AES-GCM".into()))?;
    Ok(Response {
        protected,
        encrypted_key,
        aad: None,
        iv: iv.to_vec(),
        ciphertext,
        tag: tag.to_vec(),
    })
}

/// An ephemeral P-256 key pair held by the TEE side; its public half goes into the attestation
/// as `tee-pubkey`, and it decrypts the resources the broker releases.
pub struct TeeKeyPair {
    secret: p256::SecretKey,
}

impl std::fmt::Debug for TeeKeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TeeKeyPair").finish_non_exhaustive()
    }
}

impl TeeKeyPair {
    /// A fresh key pair.
    pub fn generate() -> Self {
        Self {
            secret: random_secret_key(),
        }
    }

    /// The signing form of the key (assignment statements, [`crate::statement`]).
    pub(crate) fn signing_key(&self) -> p256::ecdsa::SigningKey {
        p256::ecdsa::SigningKey::from(&self.secret)
    }

    /// The public key as a KBS `tee-pubkey` JWK.
    pub fn public_key(&self) -> TeePubKey {
        let ep = self.secret.public_key().to_encoded_point(false);
        let enc =
            |c: Option<&p256::FieldBytes>| c.map(|c| URL_SAFE_NO_PAD.encode(c)).unwrap_or_default();
        TeePubKey::EC {
            crv: CRV_P256.into(),
            alg: ALG_ECDH_ES_A256KW.into(),
            x: enc(ep.x()),
            y: enc(ep.y()),
        }
    }

    /// Decrypt a resource released for `path`: as [`TeeKeyPair::decrypt`], and the
    /// authenticated header must name exactly `path` ([`RESOURCE_HEADER`]) if it names a
    /// resource — always with veil's broker — and must name one when `require_path`.
    pub fn decrypt_resource(
        &self,
        response_json: &[u8],
        path: &str,
        require_path: bool,
    ) -> Result<Zeroizing<Vec<u8>>, JweError> {
        let plain = self.decrypt(response_json)?;
        // Authenticated by the decryption above (the header is the AAD).
        let resp: Response = serde_json::from_slice(response_json)
            .map_err(|e| JweError::Malformed(e.to_string()))?;
        let named = resp.protected.other_fields.get(RESOURCE_HEADER);
        match named.map(|v| v.as_str()) {
            None if !require_path => {}
            Some(Some(n)) if n == path => {}
            other => {
                return Err(JweError::Malformed(format!(
                    "the broker's answer holds resource {:?}, not the {path:?} asked for \
                     (a relay rewrote the request?)",
                    other.flatten()
                )))
            }
        }
        Ok(plain)
    }

    /// Decrypt a `kbs_types::Response` in its JSON form. The AAD is the `protected` member
    /// exactly as received.
    pub fn decrypt(&self, response_json: &[u8]) -> Result<Zeroizing<Vec<u8>>, JweError> {
        use aes_gcm::aead::{AeadInPlace, KeyInit};
        let raw: serde_json::Value = serde_json::from_slice(response_json)
            .map_err(|e| JweError::Malformed(e.to_string()))?;
        let protected_b64 = raw
            .get("protected")
            .and_then(|p| p.as_str())
            .ok_or_else(|| JweError::Malformed("missing protected header".into()))?;
        let resp: Response =
            serde_json::from_value(raw.clone()).map_err(|e| JweError::Malformed(e.to_string()))?;
        if resp.protected.alg != ALG_ECDH_ES_A256KW || resp.protected.enc != ENC_A256GCM {
            return Err(JweError::Malformed(format!(
                "unsupported alg {:?} / enc {:?}",
                resp.protected.alg, resp.protected.enc
            )));
        }
        let epk = resp
            .protected
            .other_fields
            .get("epk")
            .ok_or_else(|| JweError::Malformed("missing epk".into()))?;
        let field = |n: &str| {
            epk.get(n)
                .and_then(|v| v.as_str())
                .ok_or_else(|| JweError::Malformed(format!("epk without {n}")))
        };
        if field("kty")? != "EC" || field("crv")? != CRV_P256 {
            return Err(JweError::Malformed("epk is not an EC P-256 key".into()));
        }
        let epk = point(field("x")?, field("y")?)
            .map_err(|e| JweError::Malformed(format!("epk: {e}")))?;
        let iv: [u8; 12] = resp
            .iv
            .as_slice()
            .try_into()
            .map_err(|_| JweError::Malformed("iv is not 12 bytes".into()))?;
        let tag: [u8; 16] = resp
            .tag
            .as_slice()
            .try_into()
            .map_err(|_| JweError::Malformed("tag is not 16 bytes".into()))?;
        if resp.encrypted_key.len() != 40 {
            return Err(JweError::Malformed("encrypted_key is not 40 bytes".into()));
        }
        let shared = p256::ecdh::diffie_hellman(self.secret.to_nonzero_scalar(), epk.as_affine());
        let mut cek = Zeroizing::new([0u8; 32]);
        kek(&shared)
            .map_err(|_| JweError::Decrypt)?
            .unwrap(&resp.encrypted_key, cek.as_mut_slice())
            .map_err(|_| JweError::Decrypt)?;
        let cipher =
            aes_gcm::Aes256Gcm::new_from_slice(cek.as_slice()).map_err(|_| JweError::Decrypt)?;
        let mut plain = Zeroizing::new(resp.ciphertext);
        cipher
            .decrypt_in_place_detached(
                (&iv).into(),
                protected_b64.as_bytes(),
                &mut plain,
                (&tag).into(),
            )
            .map_err(|_| JweError::Decrypt)?;
        Ok(plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decrypts_only_with_the_right_key() {
        let right = TeeKeyPair::generate();
        let wrong = TeeKeyPair::generate();
        let secret = b"the tenant's image key \x00\x01\xff";
        let jwe = encrypt(&right.public_key(), secret).unwrap();
        let json = serde_json::to_vec(&jwe).unwrap();
        assert_eq!(right.decrypt(&json).unwrap().as_slice(), secret);
        assert!(matches!(wrong.decrypt(&json), Err(JweError::Decrypt)));
        // The ciphertext does not contain the plaintext.
        assert!(!json.windows(secret.len()).any(|w| w == secret));
    }

    /// The protected header is in canonical (sorted) member order at every level, which is how
    /// trustee's client rebuilds it for the authenticated data.
    #[test]
    fn protected_header_is_sorted() {
        let k = TeeKeyPair::generate();
        let jwe = serde_json::to_value(encrypt(&k.public_key(), b"x").unwrap()).unwrap();
        let header = URL_SAFE_NO_PAD
            .decode(jwe["protected"].as_str().unwrap())
            .unwrap();
        let value: serde_json::Value = serde_json::from_slice(&header).unwrap();
        assert_eq!(header, serde_json_canonicalizer::to_vec(&value).unwrap());
        assert!(String::from_utf8(header).unwrap().starts_with(
            r#"{"alg":"ECDH-ES+A256KW","enc":"A256GCM","epk":{"crv":"P-256","kty":"EC","x":"#
        ));
    }

    /// RSA-OAEP-256 recipients: the CEK unwraps with the private key (as the client does it)
    /// and the content decrypts; weak or malformed RSA keys are refused.
    #[test]
    fn rsa_oaep_recipients() {
        use aes_gcm::aead::{AeadInPlace, KeyInit};
        use rsa::traits::PublicKeyParts;
        let sk = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048).unwrap();
        let pk = sk.to_public_key();
        let tpk = TeePubKey::RSA {
            alg: ALG_RSA_OAEP_256.into(),
            k_mod: URL_SAFE_NO_PAD.encode(pk.n().to_bytes_be()),
            k_exp: URL_SAFE_NO_PAD.encode(pk.e().to_bytes_be()),
        };
        let jwe = encrypt(&tpk, b"for an RSA key").unwrap();
        assert_eq!(jwe.protected.alg, ALG_RSA_OAEP_256);
        let cek = sk
            .decrypt(rsa::Oaep::new::<Sha256>(), &jwe.encrypted_key)
            .unwrap();
        let aad = jwe.protected.generate_aad().unwrap();
        let cipher = aes_gcm::Aes256Gcm::new_from_slice(&cek).unwrap();
        let mut plain = jwe.ciphertext.clone();
        let iv: [u8; 12] = jwe.iv.as_slice().try_into().unwrap();
        let tag: [u8; 16] = jwe.tag.as_slice().try_into().unwrap();
        cipher
            .decrypt_in_place_detached((&iv).into(), &aad, &mut plain, (&tag).into())
            .unwrap();
        assert_eq!(plain, b"for an RSA key");

        let weak = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 1024)
            .unwrap()
            .to_public_key();
        for bad in [
            TeePubKey::RSA {
                alg: ALG_RSA_OAEP_256.into(),
                k_mod: URL_SAFE_NO_PAD.encode(weak.n().to_bytes_be()),
                k_exp: URL_SAFE_NO_PAD.encode(weak.e().to_bytes_be()),
            },
            TeePubKey::RSA {
                alg: "RSA1_5".into(),
                k_mod: URL_SAFE_NO_PAD.encode(pk.n().to_bytes_be()),
                k_exp: URL_SAFE_NO_PAD.encode(pk.e().to_bytes_be()),
            },
            TeePubKey::RSA {
                alg: ALG_RSA_OAEP_256.into(),
                k_mod: "***".into(),
                k_exp: "AQAB".into(),
            },
        ] {
            assert!(encrypt(&bad, b"x").is_err());
        }
    }

    #[test]
    fn tampering_is_detected() {
        let k = TeeKeyPair::generate();
        let jwe = encrypt(&k.public_key(), b"hello").unwrap();
        let mut v = serde_json::to_value(&jwe).unwrap();
        // Flip a ciphertext bit.
        let mut ct = URL_SAFE_NO_PAD
            .decode(v["ciphertext"].as_str().unwrap())
            .unwrap();
        ct[0] ^= 1;
        v["ciphertext"] = URL_SAFE_NO_PAD.encode(&ct).into();
        assert!(matches!(
            k.decrypt(&serde_json::to_vec(&v).unwrap()),
            Err(JweError::Decrypt)
        ));
        // Alter the protected header (AAD).
        let mut v = serde_json::to_value(&jwe).unwrap();
        let hdr = URL_SAFE_NO_PAD
            .decode(v["protected"].as_str().unwrap())
            .unwrap();
        let mut hdr: serde_json::Value = serde_json::from_slice(&hdr).unwrap();
        hdr["extra"] = "x".into();
        v["protected"] = URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(&hdr).unwrap())
            .into();
        assert!(k.decrypt(&serde_json::to_vec(&v).unwrap()).is_err());
    }

    #[test]
    fn rejects_foreign_keys() {
        let bad = [
            TeePubKey::RSA {
                alg: "RSA-OAEP-256".into(),
                k_mod: "AQAB".into(),
                k_exp: "AQAB".into(),
            },
            TeePubKey::EC {
                crv: "P-384".into(),
                alg: ALG_ECDH_ES_A256KW.into(),
                x: String::new(),
                y: String::new(),
            },
            TeePubKey::EC {
                crv: CRV_P256.into(),
                alg: ALG_ECDH_ES_A256KW.into(),
                x: URL_SAFE_NO_PAD.encode([1u8; 32]),
                y: URL_SAFE_NO_PAD.encode([2u8; 32]),
            },
        ];
        for k in bad {
            assert!(encrypt(&k, b"x").is_err());
        }
    }

    #[test]
    fn concat_kdf_matches_rfc7518_appendix_c() {
        // RFC 7518 Appendix C: alg "A128GCM" (direct ECDH-ES), apu "Alice", apv "Bob".
        let z = [
            158, 86, 217, 29, 129, 113, 53, 211, 114, 131, 66, 131, 191, 132, 38, 156, 251, 49,
            110, 163, 218, 128, 106, 72, 246, 218, 167, 121, 140, 254, 144, 196,
        ];
        let k = concat_kdf(&z, "A128GCM", b"Alice", b"Bob", 128);
        assert_eq!(
            URL_SAFE_NO_PAD.encode(k.as_slice()),
            "VqqN6vgjbSBcIijNcacQGg"
        );
    }
}
