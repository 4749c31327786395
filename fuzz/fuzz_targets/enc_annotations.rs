//! Encrypted-layer annotations (`org.opencontainers.image.enc.*`) come from registries: untrusted.
//! Decoding them (base64, options JSON, JWE JSON/compact, epk, key unwrap attempts) must never
//! panic and must fail with an error naming the layer, whatever the bytes.
//!
//! Input: a mode byte, then the JWE annotation and the pubopts annotation separated by 0xFF.
//! Mode bit 0 base64-encodes the JWE part, bit 1 the pubopts part, so the fuzzer reaches the
//! JSON parsers behind the base64 layer; bit 2 also appends a second JWE (`,`-separated).
#![no_main]

use std::io::Read;
use std::sync::OnceLock;

use base64::Engine;
use libfuzzer_sys::fuzz_target;
use veil_image::crypt::{self, PrivateKey};
use veil_image::manifest::Descriptor;
use veil_image::{Digest, Error};

fn keys() -> &'static [PrivateKey] {
    static K: OnceLock<Vec<PrivateKey>> = OnceLock::new();
    K.get_or_init(|| vec![PrivateKey::generate_p256()])
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (jwe, pubopts) = match rest.iter().position(|&b| b == 0xFF) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let enc = |b: &[u8], yes: bool| {
        if yes {
            base64::engine::general_purpose::STANDARD.encode(b)
        } else {
            String::from_utf8_lossy(b).into_owned()
        }
    };
    let mut jwe_annotation = enc(jwe, mode & 1 != 0);
    if mode & 4 != 0 {
        jwe_annotation = format!("{jwe_annotation},{jwe_annotation}");
    }
    let digest = Digest::sha256(data);
    let mut desc = Descriptor::new(
        "application/vnd.oci.image.layer.v1.tar+gzip+encrypted",
        digest.clone(),
        0,
    );
    desc.annotations
        .insert(crypt::ANNOTATION_KEYS_JWE.into(), jwe_annotation);
    desc.annotations.insert(
        crypt::ANNOTATION_PUBOPTS.into(),
        enc(pubopts, mode & 2 != 0),
    );
    for ks in [&[][..], keys()] {
        match crypt::unwrap_layer_key(&desc, ks) {
            Ok(key) => {
                // Only reachable with a forged JWE for our key; the stream must still verify.
                let mut out = Vec::new();
                let _ = key.decrypt(&data[..]).read_to_end(&mut out);
            }
            Err(Error::LayerDecryption { digest: d, .. }) => assert_eq!(d, digest),
            Err(other) => panic!("unexpected error kind: {other}"),
        }
    }
    let _ = desc.decrypted_compression();
});
