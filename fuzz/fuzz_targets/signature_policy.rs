//! Signature policies and payloads are tenant- or registry-supplied bytes: parsing and
//! evaluating them must never panic. The input is split into a policy document, a payload and
//! a signature; the policy is evaluated against a fixed image with that one signature.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;
use veil_image::signature::{Payload, Policy, SigstoreSignature, Subject};

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |b| *b == 0);
    let policy = parts.next().unwrap_or_default();
    let payload = parts.next().unwrap_or_default();
    let sig = parts.next().unwrap_or_default();
    let _ = Payload::parse(payload);
    let Ok(policy) = Policy::parse(policy) else {
        return;
    };
    for image in ["reg.example:5000/team/app:v1", "local/app@sha256:0000000000000000000000000000000000000000000000000000000000000000", "a.b.example.com/x"] {
        let Ok(reference) = image.parse::<veil_image::Reference>() else {
            continue;
        };
        let keys: BTreeMap<String, Vec<u8>> = policy
            .key_paths_for(&reference)
            .into_iter()
            .map(|k| (k, payload.to_vec()))
            .collect();
        let digest = veil_image::Digest::sha256(payload);
        let sigs = [SigstoreSignature {
            payload: payload.to_vec(),
            signature: String::from_utf8_lossy(sig).into_owned(),
        }];
        let _ = policy.evaluate(
            &Subject {
                reference: &reference,
                manifest_digest: &digest,
                signatures: &sigs,
            },
            &keys,
        );
    }
});
