use super::*;
use std::collections::BTreeMap;

const TESTDATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/signature");

fn testdata(name: &str) -> Vec<u8> {
    std::fs::read(format!("{TESTDATA}/{name}")).unwrap()
}

fn r(s: &str) -> Reference {
    s.parse().unwrap()
}

fn digest(n: u8) -> Digest {
    Digest::sha256(&[n])
}

fn key_data_policy(pem: &str, identity: Option<&str>) -> Policy {
    let id = identity
        .map(|i| format!(r#","signedIdentity":{i}"#))
        .unwrap_or_default();
    let doc = format!(
        r#"{{"default":[{{"type":"reject"}}],"transports":{{"docker":{{"reg.example:5000/app":[
            {{"type":"sigstoreSigned","keyData":"{}"{id}}}]}}}}}}"#,
        STANDARD.encode(pem)
    );
    Policy::parse(doc.as_bytes()).unwrap()
}

fn eval(
    p: &Policy,
    image: &str,
    d: &Digest,
    sigs: &[SigstoreSignature],
) -> Result<String, SignatureError> {
    let reference = r(image);
    p.evaluate(
        &Subject {
            reference: &reference,
            manifest_digest: d,
            signatures: sigs,
        },
        &BTreeMap::new(),
    )
}

#[test]
fn guest_components_policy_parses_and_selects_scopes() {
    let p = Policy::parse(&testdata("policy.json")).unwrap();
    let scope = |s: &str| p.requirements_for(&r(s)).1;
    assert_eq!(
        scope("example.com/playground:v1"),
        "docker scope \"example.com/playground\""
    );
    assert_eq!(
        scope("example.com/hardened/x:v1"),
        "docker scope \"example.com/hardened\""
    );
    assert_eq!(
        scope("a.access.redhat.com/x:1"),
        "docker scope \"*.access.redhat.com\""
    );
    assert_eq!(
        scope("registry.access.redhat.com/ubi:8"),
        "docker scope \"registry.access.redhat.com\""
    );
    assert_eq!(scope("b.redhat.com/x:1"), "docker scope \"*.redhat.com\"");
    // The playground accepts anything; the GPG scopes are refused (never silently passed).
    assert!(eval(&p, "example.com/playground:v1", &digest(1), &[]).is_ok());
    let e = eval(&p, "example.com/hardened/x:v1", &digest(1), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("signedBy"), "{e}");
    assert!(e.contains("example.com/hardened/x:v1"), "{e}");
}

#[test]
fn default_reject_names_the_image_and_scope() {
    let p = Policy::parse(br#"{"default":[{"type":"reject"}]}"#).unwrap();
    let e = eval(&p, "quay.io/a/b:1", &digest(1), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("quay.io/a/b:1"), "{e}");
    assert!(e.contains("the policy default says reject"), "{e}");
}

#[test]
fn real_cosign_public_keys_parse() {
    for f in ["cosign1.pub", "cosign3.pub", "nv.pub"] {
        VerificationKey::from_pem(&testdata(f), f).unwrap();
    }
    let e = VerificationKey::from_pem(
        b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        "x",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("invalid signing key x"), "{e}");
}

#[test]
fn sign_then_verify_with_key_data() {
    let key = SigningKey::generate().unwrap();
    let pem = key.public_key_pem().unwrap();
    let d = digest(7);
    let sig = sign(&key, &r("reg.example:5000/app:v1"), &d).unwrap();
    let payload = Payload::parse(&sig.payload).unwrap();
    assert_eq!(payload.identity, "reg.example:5000/app:v1");
    assert_eq!(payload.manifest_digest, d);
    let p = key_data_policy(&pem, None);
    let how = eval(
        &p,
        "reg.example:5000/app:v1",
        &d,
        std::slice::from_ref(&sig),
    )
    .unwrap();
    assert!(how.contains("sigstoreSigned"), "{how}");
    // A digest reference in the same repository is accepted by matchRepoDigestOrExact.
    let by_digest = format!("reg.example:5000/app@{d}");
    eval(&p, &by_digest, &d, std::slice::from_ref(&sig)).unwrap();
}

#[test]
fn bad_signatures_are_rejected_with_reasons() {
    let key = SigningKey::generate().unwrap();
    let pem = key.public_key_pem().unwrap();
    let d = digest(7);
    let image = "reg.example:5000/app:v1";
    let good = sign(&key, &r(image), &d).unwrap();
    let p = key_data_policy(&pem, None);

    // No signature at all.
    let e = eval(&p, image, &d, &[]).unwrap_err().to_string();
    assert!(e.contains("no sigstore signature was found"), "{e}");

    // Signed by another key (the real cosign3.pub did not sign it).
    let other = key_data_policy(std::str::from_utf8(&testdata("cosign3.pub")).unwrap(), None);
    let e = eval(&other, image, &d, std::slice::from_ref(&good))
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not verify with any accepted key"), "{e}");

    // Tampered payload (signature no longer matches).
    let mut tampered = good.clone();
    tampered.payload = Payload::to_bytes(image, &digest(8));
    let e = eval(&p, image, &digest(8), &[tampered])
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not verify"), "{e}");

    // A genuine signature for another manifest (rollback to an older signed image).
    let e = eval(&p, image, &digest(9), std::slice::from_ref(&good))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not the image's manifest"), "{e}");

    // Signed for another tag: matchRepoDigestOrExact is exact for tagged references.
    let e = eval(
        &p,
        "reg.example:5000/app:v2",
        &d,
        std::slice::from_ref(&good),
    );
    // (v2 is another scope key only by tag; the repository scope still applies.)
    let e = e.unwrap_err().to_string();
    assert!(e.contains("signed for reg.example:5000/app:v1"), "{e}");

    // Garbage base64 signature.
    let garbage = SigstoreSignature {
        payload: good.payload.clone(),
        signature: "!!!".into(),
    };
    let e = eval(&p, image, &d, &[garbage]).unwrap_err().to_string();
    assert!(e.contains("does not verify"), "{e}");

    // One bad and one good signature: accepted.
    let bad = SigstoreSignature {
        payload: b"{}".to_vec(),
        signature: good.signature.clone(),
    };
    eval(&p, image, &d, &[bad, good]).unwrap();
}

#[test]
fn signed_identity_rules() {
    let key = SigningKey::generate().unwrap();
    let pem = key.public_key_pem().unwrap();
    let d = digest(3);
    let sig = sign(&key, &r("reg.example:5000/app:v1"), &d).unwrap();
    let sigs = std::slice::from_ref(&sig);
    let cases: &[(&str, &str, bool)] = &[
        (r#"{"type":"matchExact"}"#, "reg.example:5000/app:v1", true),
        (r#"{"type":"matchExact"}"#, "reg.example:5000/app:v2", false),
        (
            r#"{"type":"matchRepository"}"#,
            "reg.example:5000/app:v2",
            true,
        ),
        (
            r#"{"type":"exactReference","dockerReference":"reg.example:5000/app:v1"}"#,
            "reg.example:5000/app:other",
            true,
        ),
        (
            r#"{"type":"exactReference","dockerReference":"reg.example:5000/app:v9"}"#,
            "reg.example:5000/app:v1",
            false,
        ),
        (
            r#"{"type":"exactRepository","dockerRepository":"reg.example:5000/app"}"#,
            "reg.example:5000/app:v3",
            true,
        ),
        (
            r#"{"type":"exactRepository","dockerRepository":"reg.example:5000/other"}"#,
            "reg.example:5000/app:v1",
            false,
        ),
    ];
    for (rule, image, ok) in cases {
        let p = key_data_policy(&pem, Some(rule));
        let res = eval(&p, image, &d, sigs);
        assert_eq!(res.is_ok(), *ok, "{rule} {image}: {res:?}");
    }
    // remapIdentity: a mirror's references are checked as the upstream ones they copy.
    let sig = sign(&key, &r("upstream.example/team/app:v1"), &d).unwrap();
    let doc = format!(
        r#"{{"default":[{{"type":"sigstoreSigned","keyData":"{}","signedIdentity":
            {{"type":"remapIdentity","prefix":"mirror.example/team","signedPrefix":"upstream.example/team"}}}}]}}"#,
        STANDARD.encode(&pem)
    );
    let p = Policy::parse(doc.as_bytes()).unwrap();
    eval(
        &p,
        "mirror.example/team/app:v1",
        &d,
        std::slice::from_ref(&sig),
    )
    .unwrap();
    assert!(eval(
        &p,
        "mirror.example/team/app:v2",
        &d,
        std::slice::from_ref(&sig)
    )
    .is_err());
}

#[test]
fn key_paths_are_resolved_by_the_caller() {
    let key = SigningKey::generate().unwrap();
    let pem = key.public_key_pem().unwrap();
    let d = digest(4);
    let image = r("local/app:v1");
    let sig = sign(&key, &image, &d).unwrap();
    let p = Policy::parse(
        br#"{"default":[{"type":"sigstoreSigned","keyPaths":["kbs:///t/keys/a","kbs:///t/keys/b"]}]}"#,
    )
    .unwrap();
    assert_eq!(
        p.key_paths_for(&image),
        vec!["kbs:///t/keys/a".to_string(), "kbs:///t/keys/b".to_string()]
    );
    let subject = Subject {
        reference: &image,
        manifest_digest: &d,
        signatures: std::slice::from_ref(&sig),
    };
    let e = p
        .evaluate(&subject, &BTreeMap::new())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("public key kbs:///t/keys/a was not provided"),
        "{e}"
    );
    let mut keys = BTreeMap::new();
    keys.insert("kbs:///t/keys/a".to_string(), testdata("cosign1.pub"));
    keys.insert("kbs:///t/keys/b".to_string(), pem.into_bytes());
    p.evaluate(&subject, &keys).unwrap();
}

#[test]
fn invalid_policies_are_refused() {
    const STRUCTURE: &str = "not the containers-policy.json structure";
    let cases: &[(&str, &str)] = &[
        (
            r#"{}"#,
            "the required `default` requirement list is missing",
        ),
        (r#"{"default":[]}"#, "empty requirement list"),
        (r#"{"default":[{"type":"acceptEverything"}]}"#, STRUCTURE),
        (r#"{"default":[{"type":"reject"}],"extra":1}"#, STRUCTURE),
        (
            r#"{"default":[{"type":"sigstoreSigned"}]}"#,
            "exactly one of keyPath",
        ),
        (
            r#"{"default":[{"type":"sigstoreSigned","keyPath":"a","keyData":"b"}]}"#,
            "exactly one of keyPath",
        ),
        (
            r#"{"default":[{"type":"sigstoreSigned","keyPaths":[]}]}"#,
            "empty key list",
        ),
        (
            r#"{"default":[{"type":"sigstoreSigned","keyPath":"a","signedIdentity":{"type":"matchNothing"}}]}"#,
            STRUCTURE,
        ),
        // A misspelt field must not silently fall back to the default identity rule.
        (
            r#"{"default":[{"type":"sigstoreSigned","keyPath":"a","signedidentity":{"type":"matchExact"}}]}"#,
            STRUCTURE,
        ),
        // Duplicate scopes: which one applies would be the parser's choice.
        (
            r#"{"default":[{"type":"reject"}],"transports":{"docker":{"r.io/a":[{"type":"reject"}],"r.io/a":[{"type":"insecureAcceptAnything"}]}}}"#,
            STRUCTURE,
        ),
        (
            r#"{"default":[{"type":"sigstoreSigned","keyPath":"a","signedIdentity":{"type":"exactReference","dockerReference":"UPPER/x:1"}}]}"#,
            "not an image reference",
        ),
        (
            r#"{"default":[{"type":"sigstoreSigned","keyPath":"a","signedIdentity":{"type":"exactReference","dockerReference":"reg:5000/app"}}]}"#,
            "needs a tag or digest",
        ),
        (
            r#"{"default":[{"type":"sigstoreSigned","keyPath":"a","signedIdentity":{"type":"remapIdentity","prefix":"reg.example/app:v1","signedPrefix":"up.example"}}]}"#,
            "without tag, digest or wildcard",
        ),
        (
            r#"{"default":[{"type":"reject"}],"transports":{"docker":{"x.io":[]}}}"#,
            "transports.docker[\"x.io\"]: an empty requirement list",
        ),
        ("not json", "malformed JSON at line 1"),
        ("{\"default\": [", "truncated JSON"),
    ];
    for (doc, want) in cases {
        let e = Policy::parse(doc.as_bytes()).unwrap_err().to_string();
        assert!(e.starts_with("invalid signature policy"), "{doc}: {e}");
        assert!(e.contains(want), "{doc}: {e}");
    }
}

#[test]
fn parse_errors_never_echo_the_document() {
    // The host names which broker resource is "the policy": if it names a secret, the error
    // must not reveal it.
    for doc in [
        r#""s3cr3t-token""#,
        "483920",
        r#"{"s3cr3t-name": "v"}"#,
        r#"{"default": "s3cr3t-token"}"#,
        r#"{"default":[{"type":"s3cr3t-token"}]}"#,
    ] {
        let e = Policy::parse(doc.as_bytes()).unwrap_err().to_string();
        assert!(!e.contains("s3cr3t") && !e.contains("483920"), "{doc}: {e}");
        assert!(e.contains("line 1"), "{e}");
    }
}

#[test]
fn untagged_identities_do_not_stand_for_latest() {
    let key = SigningKey::generate().unwrap();
    let pem = key.public_key_pem().unwrap();
    let d = digest(6);
    // A cosign-style signature: the repository alone.
    let sig = sign(&key, &r("reg.example:5000/app@sha256:0000000000000000000000000000000000000000000000000000000000000000"), &d).unwrap();
    assert_eq!(
        Payload::parse(&sig.payload).unwrap().identity,
        "reg.example:5000/app"
    );
    let sigs = std::slice::from_ref(&sig);
    for rule in [None, Some(r#"{"type":"matchExact"}"#)] {
        let p = key_data_policy(&pem, rule);
        let e = eval(&p, "reg.example:5000/app:latest", &d, sigs)
            .unwrap_err()
            .to_string();
        assert!(e.contains("names no tag or digest"), "{rule:?}: {e}");
    }
    let p = key_data_policy(&pem, Some(r#"{"type":"matchRepository"}"#));
    eval(&p, "reg.example:5000/app:latest", &d, sigs).unwrap();
    // Digest references only need the repository (matchRepoDigestOrExact).
    let p = key_data_policy(&pem, None);
    eval(&p, &format!("reg.example:5000/app@{d}"), &d, sigs).unwrap();
}

#[test]
fn remap_prefixes_end_at_a_path_component() {
    let key = SigningKey::generate().unwrap();
    let pem = STANDARD.encode(key.public_key_pem().unwrap());
    let d = digest(2);
    let sig = sign(&key, &r("up.example/app:v1"), &d).unwrap();
    let policy = |prefix: &str| {
        Policy::parse(
            format!(
                r#"{{"default":[{{"type":"sigstoreSigned","keyData":"{pem}","signedIdentity":
                {{"type":"remapIdentity","prefix":"{prefix}","signedPrefix":"up.example"}}}}]}}"#
            )
            .as_bytes(),
        )
        .unwrap()
    };
    eval(
        &policy("mirror.example"),
        "mirror.example/app:v1",
        &d,
        std::slice::from_ref(&sig),
    )
    .unwrap();
    // "mirror.example" is not a prefix of the host "mirror.example:5000".
    assert!(eval(
        &policy("mirror.example"),
        "mirror.example:5000/app:v1",
        &d,
        std::slice::from_ref(&sig)
    )
    .is_err());
    assert!(eval(
        &policy("mirror.example/ap"),
        "mirror.example/app:v1",
        &d,
        std::slice::from_ref(&sig)
    )
    .is_err());
}

#[test]
fn unknown_critical_claims_refuse_the_signature() {
    let d = digest(1);
    let mut v: serde_json::Value =
        serde_json::from_slice(&Payload::to_bytes("r.io/a:v1", &d)).unwrap();
    v["critical"]["image"]["extra"] = serde_json::json!("x");
    let e = Payload::parse(&serde_json::to_vec(&v).unwrap()).unwrap_err();
    assert!(e.contains("unknown field"), "{e}");
    let mut v: serde_json::Value =
        serde_json::from_slice(&Payload::to_bytes("r.io/a:v1", &d)).unwrap();
    v["critical"]["must-understand"] = serde_json::json!(true);
    assert!(Payload::parse(&serde_json::to_vec(&v).unwrap()).is_err());
    // The optional section may hold anything.
    let mut v: serde_json::Value =
        serde_json::from_slice(&Payload::to_bytes("r.io/a:v1", &d)).unwrap();
    v["optional"] = serde_json::json!({"creator": "cosign", "timestamp": 1});
    Payload::parse(&serde_json::to_vec(&v).unwrap()).unwrap();
}

#[test]
fn unsupported_requirements_fail_closed() {
    let cases: &[(&str, &str)] = &[
        (
            r#"{"default":[{"type":"sigstoreSigned","fulcio":{"caPath":"x"}}]}"#,
            "keyless",
        ),
        (
            r#"{"default":[{"type":"sigstoreSigned","keyData":"AAAA","rekorPublicKeyData":"AAAA"}]}"#,
            "Rekor",
        ),
        (
            r#"{"default":[{"type":"sigstoreSigned","keyData":"%%%"}]}"#,
            "not base64",
        ),
        (
            r#"{"default":[{"type":"sigstoreSigned","keyData":"AAAA"}]}"#,
            "not a usable PEM public key",
        ),
        (
            r#"{"default":[{"type":"insecureAcceptAnything"},{"type":"reject"}]}"#,
            "says reject",
        ),
    ];
    for (doc, want) in cases {
        let p = Policy::parse(doc.as_bytes()).unwrap();
        let e = eval(&p, "reg.example/app:v1", &digest(1), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{doc}: {e}");
    }
}

#[test]
fn encrypted_private_keys_round_trip() {
    let key = SigningKey::generate().unwrap();
    let pem = key.to_encrypted_pem(b"correct horse").unwrap();
    assert!(pem.contains("ENCRYPTED SIGSTORE PRIVATE KEY"));
    let again = SigningKey::from_pem(pem.as_bytes(), b"correct horse", "k").unwrap();
    assert_eq!(
        again.public_key_pem().unwrap(),
        key.public_key_pem().unwrap()
    );
    let e = SigningKey::from_pem(pem.as_bytes(), b"wrong", "cosign.key")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cosign.key") && e.contains("wrong passphrase"),
        "{e}"
    );
    assert!(!e.contains("correct horse"));
    let e = SigningKey::from_pem(b"garbage", b"", "k")
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a private key"), "{e}");
}

#[test]
fn signature_manifest_round_trip() {
    let key = SigningKey::generate().unwrap();
    let d = digest(5);
    assert_eq!(
        signature_tag(&d),
        format!("sha256-{}.sig", &d.as_str()["sha256:".len()..])
    );
    let s1 = sign(&key, &r("reg.example/app:v1"), &d).unwrap();
    let m1 = SignatureManifest::with_signature(None, &s1);
    assert_eq!(m1.blobs.len(), 2);
    let parsed = match crate::manifest::parse_manifest(&m1.manifest_json(), None).unwrap() {
        crate::manifest::Manifest::Image(m) => m,
        other => panic!("{other:?}"),
    };
    let layers = signature_layers(&parsed);
    assert_eq!(layers.len(), 1);
    assert_eq!(layers[0].1, s1.signature);
    assert_eq!(layers[0].0.digest, Digest::sha256(&s1.payload));
    // Signing again with the same signature adds nothing; another signature is appended.
    let same = SignatureManifest::with_signature(Some(parsed.clone()), &s1);
    assert_eq!(same.manifest.layers.len(), 1);
    let s2 = sign(
        &SigningKey::generate().unwrap(),
        &r("reg.example/app:v1"),
        &d,
    )
    .unwrap();
    let m2 = SignatureManifest::with_signature(Some(parsed), &s2);
    assert_eq!(signature_layers(&m2.manifest).len(), 2);
}
