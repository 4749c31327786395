//! Encrypted-layer annotations (`org.opencontainers.image.enc.*`) come from registries: untrusted.
//! Decoding them (base64, options JSON, JWE JSON/compact, epk, key unwrap attempts, CoCo
//! annotation packets and their KBS resource URIs) must never panic and must fail with an error
//! naming the layer, whatever the bytes.
//!
//! Input: a mode byte, then the key annotation and the pubopts annotation separated by 0xFF.
//! Mode bit 0 base64-encodes the key part, bit 1 the pubopts part, so the fuzzer reaches the
//! JSON parsers behind the base64 layer; bit 2 also appends a second JWE (`,`-separated).
//! Bit 3 also puts the key part in the CoCo (`provider.attestation-agent`) annotation, bit 4
//! drops the JWE annotation, and bit 5 makes the CoCo annotation a well-formed A256CTR packet
//! for the fuzz KBS key whose wrapped data is the raw key part (so unwrapping reaches the
//! private-options parser).
#![no_main]

use std::io::Read;
use std::sync::OnceLock;

use base64::Engine;
use libfuzzer_sys::fuzz_target;
use veil_image::crypt::{self, KeyRing, PrivateKey};
use veil_image::manifest::Descriptor;
use veil_image::{Digest, Error};

/// The KBS resource the fuzz key ring holds a 32-byte key for.
const FUZZ_KID: &str = "kbs:///fuzz/image-kek/one";

fn keys() -> &'static [PrivateKey] {
    static K: OnceLock<Vec<PrivateKey>> = OnceLock::new();
    K.get_or_init(|| vec![PrivateKey::generate_p256()])
}

/// Key rings: private keys only, KBS keys only (a good one, one of the wrong length, one named
/// by its bare path), and both.
fn rings() -> &'static [KeyRing] {
    static R: OnceLock<Vec<KeyRing>> = OnceLock::new();
    R.get_or_init(|| {
        let mut kbs = KeyRing::new();
        kbs.add_kbs_key(FUZZ_KID, vec![0x5a; 32]);
        kbs.add_kbs_key("kbs:///fuzz/image-kek/short", vec![0x5a; 16]);
        kbs.add_kbs_key("fuzz/image-kek/path", vec![0xa5; 32]);
        let mut both = kbs.clone();
        both.private_keys = keys().to_vec();
        vec![KeyRing::from(keys().to_vec()), kbs, both]
    })
}

fn check(result: Result<(), Error>, digest: &Digest) {
    match result {
        Ok(()) => {}
        Err(Error::LayerDecryption { digest: d, .. }) => assert_eq!(&d, digest),
        Err(other) => panic!("unexpected error kind: {other}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (keys_part, pubopts) = match rest.iter().position(|&b| b == 0xFF) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let enc = |b: &[u8], yes: bool| {
        if yes {
            b64(b)
        } else {
            String::from_utf8_lossy(b).into_owned()
        }
    };
    let mut key_annotation = enc(keys_part, mode & 1 != 0);
    if mode & 4 != 0 {
        key_annotation = format!("{key_annotation},{key_annotation}");
    }
    let digest = Digest::sha256(data);
    let mut desc = Descriptor::new(
        "application/vnd.oci.image.layer.v1.tar+gzip+encrypted",
        digest.clone(),
        0,
    );
    if mode & 16 == 0 {
        desc.annotations
            .insert(crypt::ANNOTATION_KEYS_JWE.into(), key_annotation.clone());
    }
    if mode & 32 != 0 {
        let packet = format!(
            r#"{{"kid":"{FUZZ_KID}","wrapped_data":"{}","iv":"{}","wrap_type":"A256CTR"}}"#,
            b64(keys_part),
            b64(&[0u8; 16][..]),
        );
        desc.annotations
            .insert(crypt::ANNOTATION_KEYS_COCO.into(), b64(packet.as_bytes()));
    } else if mode & 8 != 0 {
        desc.annotations
            .insert(crypt::ANNOTATION_KEYS_COCO.into(), key_annotation);
    }
    desc.annotations.insert(
        crypt::ANNOTATION_PUBOPTS.into(),
        enc(pubopts, mode & 2 != 0),
    );
    check(crypt::coco_key_ids(&desc).map(|_| ()), &digest);
    for ks in [&[][..], keys()] {
        check(
            crypt::unwrap_layer_key(&desc, ks).map(|key| {
                // Only reachable with a forged JWE for our key; the stream must still verify.
                let mut out = Vec::new();
                let _ = key.decrypt(&data[..]).read_to_end(&mut out);
            }),
            &digest,
        );
    }
    for ring in rings() {
        check(
            crypt::unwrap_layer_key_with(&desc, ring).map(|key| {
                // Reachable with a forged packet or JWE for a fuzz key; the stream must still
                // verify.
                let mut out = Vec::new();
                let _ = key.decrypt(&data[..]).read_to_end(&mut out);
            }),
            &digest,
        );
    }
    let _ = desc.decrypted_compression();
});
