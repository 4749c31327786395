//! Tests of the CoCo key-provider scheme ([`ANNOTATION_KEYS_COCO`]).

use super::tests::{expect_decrypt_err, read_all, sample_layer, with_annotation};
use super::*;

use crate::build::build_image;
use crate::build::tests::{sample_context, spec};
use crate::manifest::OCI_LAYER_TAR_GZIP;
use crate::unpack::{unpack_layer, UnpackOptions};

const KID: &str = "kbs:///default/image-kek/layer";

fn random_kek() -> Zeroizing<Vec<u8>> {
    let mut k = Zeroizing::new(vec![0u8; 32]);
    OsRng.fill_bytes(&mut k);
    k
}

fn ring_with(kid: &str, kek: &[u8]) -> KeyRing {
    let mut ring = KeyRing::new();
    ring.add_kbs_key(kid, kek.to_vec());
    ring
}

/// The packets of a layer's CoCo annotation, decoded.
fn packets_of(desc: &Descriptor) -> Vec<Value> {
    desc.annotations[ANNOTATION_KEYS_COCO]
        .split(',')
        .map(|p| serde_json::from_slice(&STANDARD.decode(p).unwrap()).unwrap())
        .collect()
}

fn encode_packet(packet: &Value) -> String {
    STANDARD.encode(packet.to_string())
}

fn with_packets(desc: &Descriptor, packets: &[Value]) -> Descriptor {
    let joined: Vec<String> = packets.iter().map(encode_packet).collect();
    with_annotation(desc, ANNOTATION_KEYS_COCO, Some(&joined.join(",")))
}

/// A decryption error that also must not leak `kek`.
fn expect_err_without_key(
    e: Error,
    kind: DecryptFailure,
    digest: &Digest,
    words: &str,
    kek: &[u8],
) {
    let msg = e.to_string();
    assert!(!msg.contains(&STANDARD.encode(kek)), "{msg}");
    assert!(!msg.contains(&hex::encode(kek)), "{msg}");
    expect_decrypt_err(e, kind, digest, words);
}

#[test]
fn coco_round_trip_gcm_and_ctr() {
    let layer = sample_layer();
    assert_eq!(layer.media_type, OCI_LAYER_TAR_GZIP);
    for wrap in [CocoWrap::A256Gcm, CocoWrap::A256Ctr] {
        let kek = random_kek();
        let recipient = Recipient::kbs(KID, kek.to_vec()).unwrap().with_wrap(wrap);
        let (data, desc) = encrypt_layer_for(&layer, &[recipient]).unwrap();
        assert_eq!(desc.media_type, format!("{OCI_LAYER_TAR_GZIP}+encrypted"));
        assert_eq!(desc.digest, Digest::sha256(&data));
        assert_ne!(data, layer.data);
        assert!(!desc.annotations.contains_key(ANNOTATION_KEYS_JWE));
        assert!(desc.annotations.contains_key(ANNOTATION_PUBOPTS));

        // A version-1 packet: exactly these four fields.
        let packets = packets_of(&desc);
        assert_eq!(packets.len(), 1);
        let mut fields: Vec<&String> = packets[0].as_object().unwrap().keys().collect();
        fields.sort();
        assert_eq!(fields, ["iv", "kid", "wrap_type", "wrapped_data"]);
        assert_eq!(packets[0]["kid"], KID);
        assert_eq!(packets[0]["wrap_type"], wrap.as_str());
        let iv = STANDARD.decode(packets[0]["iv"].as_str().unwrap()).unwrap();
        let iv_len = match wrap {
            CocoWrap::A256Gcm => 12,
            CocoWrap::A256Ctr => 16,
        };
        assert_eq!(iv.len(), iv_len);
        assert_eq!(coco_key_ids(&desc).unwrap(), [KID]);

        // The kid as written, its bare path and a URI with a host all find the key.
        for name in [
            KID,
            "default/image-kek/layer",
            "kbs://kbs.example:8080/default/image-kek/layer",
        ] {
            let ring = ring_with(name, &kek);
            assert!(ring.kbs_key(KID).is_some(), "{name}");
            let key = unwrap_layer_key_with(&desc, &ring).unwrap();
            assert_eq!(key.plaintext_digest(), Some(&layer.digest));
            assert_eq!(key.decrypted_media_type(), OCI_LAYER_TAR_GZIP);
            let mut reader = DecryptingReader::new(&data[..], &key);
            let mut plain = Vec::new();
            reader.read_to_end(&mut plain).unwrap();
            assert!(reader.is_verified());
            assert_eq!(plain, layer.data, "{wrap} via {name}");
        }
        let ring = ring_with(KID, &kek);
        assert_eq!(decrypt_layer_with(&desc, &data, &ring).unwrap(), layer.data);

        // The whole pipeline: decrypt, decompress, unpack.
        let key = unwrap_layer_key_with(&desc, &ring).unwrap();
        let dir = tempfile::tempdir().unwrap();
        unpack_layer(
            key.decrypt(&data[..]),
            key.compression().unwrap(),
            dir.path(),
            &UnpackOptions::default(),
        )
        .unwrap();
        assert!(dir.path().join("bin/run").exists());
    }
}

/// An encrypted layer built by hand (ctr, hmac, aes_gcm and serde_json
/// directly), with its key in the given packets.
fn hand_made_layer(
    layer: &Blob,
    make_packets: impl Fn(&[u8]) -> Vec<Value>,
) -> (Vec<u8>, Descriptor) {
    let symkey = [0x11u8; 32];
    let nonce = [0x22u8; 16];
    let mut ciphertext = layer.data.clone();
    Aes256Ctr::new_from_slices(&symkey, &nonce)
        .unwrap()
        .apply_keystream(&mut ciphertext);
    let mut mac = <HmacSha256 as Mac>::new_from_slice(&symkey).unwrap();
    mac.update(&ciphertext);
    let pubopts = json!({
        "cipher": "AES_256_CTR_HMAC_SHA256",
        "hmac": STANDARD.encode(mac.finalize().into_bytes()),
        "cipheroptions": {},
    });
    let privopts = json!({
        "symkey": STANDARD.encode(symkey),
        "digest": layer.digest.as_str(),
        "cipheroptions": {"nonce": STANDARD.encode(nonce)},
    });
    let mut desc = Descriptor::new(
        format!("{OCI_LAYER_TAR_GZIP}+encrypted"),
        Digest::sha256(&ciphertext),
        ciphertext.len() as u64,
    );
    desc.annotations.insert(
        ANNOTATION_PUBOPTS.to_string(),
        STANDARD.encode(pubopts.to_string()),
    );
    let packets: Vec<String> = make_packets(privopts.to_string().as_bytes())
        .iter()
        .map(encode_packet)
        .collect();
    desc.annotations
        .insert(ANNOTATION_KEYS_COCO.to_string(), packets.join(","));
    (ciphertext, desc)
}

fn gcm_wrap(kek: &[u8], iv: &[u8], opts: &[u8]) -> String {
    let sealed = Aes256Gcm::new_from_slice(kek)
        .unwrap()
        .encrypt(Nonce::from_slice(iv), opts)
        .unwrap();
    assert_eq!(sealed.len(), opts.len() + 16);
    STANDARD.encode(sealed)
}

#[test]
fn coco_independent_vectors_v1_and_v2() {
    let layer = sample_layer();
    let kek = [0x42u8; 32];
    let iv = [0x24u8; 12];
    let ctr_iv = [0x35u8; 16];
    let v2 = |opts: &[u8]| {
        json!({
            "version": "0.1.0",
            "provider": "kbs",
            "kid": KID,
            "wrapped_data": gcm_wrap(&kek, &iv, opts),
            "iv": STANDARD.encode(iv),
            "wrap_type": "A256GCM",
            "provider_settings": {},
            "annotations": {},
            "some_future_field": [1, 2, 3],
        })
    };
    let v2_defaults = |opts: &[u8]| {
        json!({
            "kid": KID,
            "wrapped_data": gcm_wrap(&kek, &iv, opts),
            "iv": STANDARD.encode(iv),
            "wrap_type": "A256GCM",
            "provider_settings": {"unused": true},
            "annotations": {"x": "y"},
        })
    };
    let v1 = |opts: &[u8]| {
        json!({
            "kid": KID,
            "wrapped_data": gcm_wrap(&kek, &iv, opts),
            "iv": STANDARD.encode(iv),
            "wrap_type": "A256GCM",
        })
    };
    let v1_ctr = |opts: &[u8]| {
        let mut wrapped = opts.to_vec();
        Aes256Ctr::new_from_slices(&kek, &ctr_iv)
            .unwrap()
            .apply_keystream(&mut wrapped);
        json!({
            "kid": KID,
            "wrapped_data": STANDARD.encode(wrapped),
            "iv": STANDARD.encode(ctr_iv),
            "wrap_type": "A256CTR",
        })
    };
    let ring = ring_with(KID, &kek);
    for (name, make) in [
        ("v2", &v2 as &dyn Fn(&[u8]) -> Value),
        ("v2 with defaults", &v2_defaults),
        ("v1", &v1),
        ("v1 A256CTR", &v1_ctr),
    ] {
        let (data, desc) = hand_made_layer(&layer, |opts| vec![make(opts)]);
        assert_eq!(coco_key_ids(&desc).unwrap(), [KID], "{name}");
        let key = unwrap_layer_key_with(&desc, &ring).unwrap();
        assert_eq!(key.plaintext_digest(), Some(&layer.digest), "{name}");
        assert_eq!(
            read_all(key.decrypt(&data[..])).unwrap(),
            layer.data,
            "{name}"
        );
    }
}

#[test]
fn coco_and_jwe_on_one_layer() {
    let layer = sample_layer();
    let ec = PrivateKey::generate_p256();
    let kek = random_kek();
    let recipients = [
        Recipient::from(ec.public_key()),
        Recipient::kbs(KID, kek.to_vec()).unwrap(),
    ];
    let (data, desc) = encrypt_layer_for(&layer, &recipients).unwrap();
    assert!(desc.annotations.contains_key(ANNOTATION_KEYS_JWE));
    assert!(desc.annotations.contains_key(ANNOTATION_KEYS_COCO));

    // Either kind of key opens it, alone or together.
    let jwe_only = KeyRing::from(vec![ec.clone()]);
    let kbs_only = ring_with(KID, &kek);
    let mut both = ring_with(KID, &kek);
    both.add_private_key(ec.clone());
    for ring in [&jwe_only, &kbs_only, &both] {
        assert_eq!(decrypt_layer_with(&desc, &data, ring).unwrap(), layer.data);
    }
    // The private-key-only API still works.
    assert_eq!(
        decrypt_layer(&desc, &data, std::slice::from_ref(&ec)).unwrap(),
        layer.data
    );

    // A wrong KBS key does not stop the right private key, and the reverse.
    let mut wrong_kbs = ring_with(KID, &random_kek());
    wrong_kbs.add_private_key(ec.clone());
    assert_eq!(
        decrypt_layer_with(&desc, &data, &wrong_kbs).unwrap(),
        layer.data
    );
    let mut wrong_ec = ring_with(KID, &kek);
    wrong_ec.add_private_key(PrivateKey::generate_p256());
    assert_eq!(
        decrypt_layer_with(&desc, &data, &wrong_ec).unwrap(),
        layer.data
    );

    // Neither fits: both reasons are given.
    let mut neither = ring_with(KID, &random_kek());
    neither.add_private_key(PrivateKey::generate_p256());
    let e = unwrap_layer_key_with(&desc, &neither).unwrap_err();
    expect_err_without_key(
        e,
        DecryptFailure::WrongKey,
        &desc.digest,
        "GCM tag mismatch",
        &kek,
    );
    let e = unwrap_layer_key_with(&desc, &neither).unwrap_err();
    expect_decrypt_err(
        e,
        DecryptFailure::WrongKey,
        &desc.digest,
        "JWE #1 recipient #1",
    );

    // A JWE key still opens a layer whose CoCo packet veil cannot use.
    let mut packet = packets_of(&desc).remove(0);
    packet["provider"] = json!("aliyun");
    let d = with_packets(&desc, &[packet]);
    assert_eq!(decrypt_layer(&d, &data, &[ec]).unwrap(), layer.data);
}

#[test]
fn coco_encrypt_image_for() {
    let ctx = sample_context();
    let img = build_image(&spec(ctx.path())).unwrap();
    let kek = random_kek();
    let enc = encrypt_image_for(
        &img,
        &[Recipient::kbs(KID, kek.to_vec()).unwrap()],
        |_, _| true,
    )
    .unwrap();
    let Manifest::Image(m) = parse_manifest(&enc.manifest.data, None).unwrap() else {
        panic!("expected an image manifest");
    };
    assert!(is_encrypted(&m.layers[0]));
    assert_eq!(coco_key_ids(&m.layers[0]).unwrap(), [KID]);
    let plain =
        decrypt_layer_with(&m.layers[0], &enc.layers[0].data, &ring_with(KID, &kek)).unwrap();
    assert_eq!(plain, img.layers[0].data);
}

#[test]
fn coco_bad_inputs() {
    let layer = sample_layer();
    let kek = random_kek();
    let (data, desc) =
        encrypt_layer_for(&layer, &[Recipient::kbs(KID, kek.to_vec()).unwrap()]).unwrap();
    let good = packets_of(&desc).remove(0);
    let ring = ring_with(KID, &kek);
    let b64 = |s: &str| STANDARD.encode(s);
    let changed = |field: &str, value: Value| {
        let mut p = good.clone();
        p[field] = value;
        with_packets(&desc, &[p])
    };
    let without = |field: &str| {
        let mut p = good.clone();
        p.as_object_mut().unwrap().remove(field);
        with_packets(&desc, &[p])
    };
    let mut tampered = STANDARD
        .decode(good["wrapped_data"].as_str().unwrap())
        .unwrap();
    tampered[3] ^= 1;

    // Annotation problems, with the right key.
    let cases: Vec<(Descriptor, DecryptFailure, &str)> = vec![
        (
            with_annotation(&desc, ANNOTATION_KEYS_COCO, Some("%%%not base64")),
            DecryptFailure::Malformed,
            "invalid base64",
        ),
        (
            with_annotation(&desc, ANNOTATION_KEYS_COCO, Some(&b64("{\"kid\": "))),
            DecryptFailure::Malformed,
            "not a valid annotation packet JSON object",
        ),
        (
            with_annotation(&desc, ANNOTATION_KEYS_COCO, Some(&b64("[1, 2]"))),
            DecryptFailure::Malformed,
            "not a valid annotation packet JSON object",
        ),
        (
            with_annotation(
                &desc,
                ANNOTATION_KEYS_COCO,
                Some(&format!("{},???", encode_packet(&good))),
            ),
            DecryptFailure::Malformed,
            "CoCo packet #2",
        ),
        (
            with_annotation(
                &desc,
                ANNOTATION_KEYS_COCO,
                Some(&vec![encode_packet(&good); 17].join(",")),
            ),
            DecryptFailure::Malformed,
            "at most 16",
        ),
        (
            changed("provider_settings", json!("not an object")),
            DecryptFailure::Malformed,
            "not a valid annotation packet JSON object",
        ),
        (without("kid"), DecryptFailure::Malformed, "it has no kid"),
        (
            without("wrapped_data"),
            DecryptFailure::Malformed,
            "it has no wrapped_data",
        ),
        (
            changed("wrapped_data", json!("***")),
            DecryptFailure::Malformed,
            "wrapped_data: invalid base64",
        ),
        (
            without("iv"),
            DecryptFailure::Malformed,
            "it has no iv (required with the kbs provider)",
        ),
        (
            without("wrap_type"),
            DecryptFailure::Malformed,
            "it has no wrap_type (required with the kbs provider)",
        ),
        (
            changed("iv", json!("!!")),
            DecryptFailure::Malformed,
            "iv: invalid base64",
        ),
        (
            changed("iv", json!(STANDARD.encode([0u8; 16]))),
            DecryptFailure::Malformed,
            "its A256GCM iv is 16 bytes; 12 are required",
        ),
        (
            changed("wrap_type", json!("A256CTR")),
            DecryptFailure::Malformed,
            "its A256CTR iv is 12 bytes; 16 are required",
        ),
        (
            changed("wrapped_data", json!(STANDARD.encode([0u8; 8]))),
            DecryptFailure::Malformed,
            "shorter than the 16-byte tag",
        ),
        (
            changed("wrap_type", json!("A128KW")),
            DecryptFailure::Unsupported,
            "wrap_type 'A128KW' is not supported (A256GCM and A256CTR are)",
        ),
        (
            changed("provider", json!("aliyun")),
            DecryptFailure::Unsupported,
            "key provider 'aliyun' is not supported; only 'kbs'",
        ),
        (
            changed("version", json!("0.2.0")),
            DecryptFailure::Unsupported,
            "annotation packet version '0.2.0' is not supported; only 0.1.0",
        ),
        (
            changed("wrapped_data", json!(STANDARD.encode(&tampered))),
            DecryptFailure::WrongKey,
            "wrapped_data was tampered with",
        ),
    ];
    for (d, kind, words) in cases {
        let e = unwrap_layer_key_with(&d, &ring).unwrap_err();
        expect_err_without_key(e, kind, &d.digest, words, &kek);
    }

    // Malformed kids.
    for (kid, why) in [
        ("http://x/a/b/c", "does not start with kbs://"),
        ("kbs:", "does not start with kbs://"),
        ("kbs://", "no /<repository>/<type>/<tag> path"),
        ("kbs:///a/b", "exactly three"),
        ("kbs:///a/b/c/d", "exactly three"),
        ("kbs:///a/b/c/", "exactly three"),
        ("kbs:///a//c", "type segment is empty"),
        ("kbs:///a/../c", "type segment is \"..\""),
        ("kbs:///a/b/c?x=1", "tag segment contains '?'"),
        ("kbs://ho st/a/b/c", "host contains ' '"),
        ("", "it has no kid"),
    ] {
        let d = changed("kid", json!(kid));
        let e = unwrap_layer_key_with(&d, &ring).unwrap_err();
        expect_decrypt_err(e, DecryptFailure::Malformed, &d.digest, why);
        let e = coco_key_ids(&d).unwrap_err();
        expect_decrypt_err(e, DecryptFailure::Malformed, &d.digest, why);
    }
    let long = format!("kbs:///a/b/{}", "c".repeat(2000));
    let d = changed("kid", json!(long));
    let e = unwrap_layer_key_with(&d, &ring).unwrap_err();
    // The over-long kid is not echoed in full.
    assert!(e.to_string().len() < 1000, "{e}");
    expect_decrypt_err(e, DecryptFailure::Malformed, &d.digest, "longer than 1024");

    // Key problems with a good annotation.
    let e = unwrap_layer_key_with(&desc, &ring_with(KID, &random_kek())).unwrap_err();
    expect_err_without_key(
        e,
        DecryptFailure::WrongKey,
        &desc.digest,
        "wrong key (A256GCM tag mismatch)",
        &kek,
    );
    let short = &kek[..16];
    let e = unwrap_layer_key_with(&desc, &ring_with(KID, short)).unwrap_err();
    expect_err_without_key(
        e,
        DecryptFailure::WrongKey,
        &desc.digest,
        "is 16 bytes, but a KBS key-encryption key must be 32 bytes",
        short,
    );
    let e = unwrap_layer_key_with(&desc, &ring_with("kbs:///default/image-kek/other", &kek))
        .unwrap_err();
    expect_err_without_key(
        e,
        DecryptFailure::NoKey,
        &desc.digest,
        &format!("no key for kid {KID}"),
        &kek,
    );
    let e = unwrap_layer_key_with(&desc, &KeyRing::from(vec![PrivateKey::generate_p256()]))
        .unwrap_err();
    expect_decrypt_err(e, DecryptFailure::NoKey, &desc.digest, "no key for kid");
    let e = unwrap_layer_key_with(&desc, &KeyRing::new()).unwrap_err();
    expect_decrypt_err(
        e,
        DecryptFailure::NoKey,
        &desc.digest,
        "no private key or KBS key was given",
    );
    let e = unwrap_layer_key(&desc, &[]).unwrap_err();
    expect_decrypt_err(e, DecryptFailure::NoKey, &desc.digest, "no key can decrypt");

    // A256CTR is unauthenticated: a wrong key yields garbage options.
    let (_, ctr_desc) = encrypt_layer_for(
        &layer,
        &[Recipient::kbs(KID, kek.to_vec())
            .unwrap()
            .with_wrap(CocoWrap::A256Ctr)],
    )
    .unwrap();
    let e = unwrap_layer_key_with(&ctr_desc, &ring_with(KID, &random_kek())).unwrap_err();
    expect_err_without_key(
        e,
        DecryptFailure::WrongKey,
        &ctr_desc.digest,
        "A256CTR is unauthenticated",
        &kek,
    );

    // Missing or foreign key annotations.
    let bare = with_annotation(&desc, ANNOTATION_KEYS_COCO, None);
    let e = unwrap_layer_key_with(&bare, &ring).unwrap_err();
    expect_decrypt_err(
        e,
        DecryptFailure::Malformed,
        &bare.digest,
        ANNOTATION_KEYS_COCO,
    );
    let foreign = with_annotation(
        &bare,
        "org.opencontainers.image.enc.keys.provider.other",
        Some("x"),
    );
    let e = unwrap_layer_key_with(&foreign, &ring).unwrap_err();
    expect_decrypt_err(
        e,
        DecryptFailure::Unsupported,
        &foreign.digest,
        "provider.other",
    );

    // The good layer still decrypts (the cases above changed copies).
    assert_eq!(decrypt_layer_with(&desc, &data, &ring).unwrap(), layer.data);
}

#[test]
fn coco_key_ids_lists_the_kids() {
    let layer = sample_layer();
    let kids = [
        "kbs:///default/image-kek/one",
        "kbs://broker.example/tenant-a/keys/two",
    ];
    let recipients: Vec<Recipient> = kids
        .iter()
        .map(|k| Recipient::kbs(*k, random_kek().to_vec()).unwrap())
        .collect();
    let (_, desc) = encrypt_layer_for(&layer, &recipients).unwrap();
    assert_eq!(desc.annotations[ANNOTATION_KEYS_COCO].split(',').count(), 2);
    assert_eq!(coco_key_ids(&desc).unwrap(), kids);

    // Repeated kids are listed once; packets veil cannot use are left out.
    let mut packets = packets_of(&desc);
    let mut aliyun = packets[0].clone();
    aliyun["provider"] = json!("aliyun");
    aliyun["kid"] = json!("acs:kms:some-key");
    packets.push(packets[0].clone());
    packets.push(aliyun);
    let d = with_packets(&desc, &packets);
    assert_eq!(coco_key_ids(&d).unwrap(), kids);

    // No annotation, or not encrypted: nothing to fetch.
    assert!(
        coco_key_ids(&with_annotation(&desc, ANNOTATION_KEYS_COCO, None))
            .unwrap()
            .is_empty()
    );
    assert!(coco_key_ids(&layer.descriptor()).unwrap().is_empty());
    let (_, jwe_desc) = encrypt_layer(&layer, &[PrivateKey::generate_p256().public_key()]).unwrap();
    assert!(coco_key_ids(&jwe_desc).unwrap().is_empty());

    // Malformed: an error naming the layer.
    let d = with_annotation(&desc, ANNOTATION_KEYS_COCO, Some("@@"));
    let e = coco_key_ids(&d).unwrap_err();
    expect_decrypt_err(e, DecryptFailure::Malformed, &d.digest, "invalid base64");
}

#[test]
fn kbs_resources_recipients_and_key_rings() {
    let r = KbsResource::parse("kbs:///default/image-kek/layer").unwrap();
    assert_eq!(r.host(), None);
    assert_eq!(
        (r.repository(), r.resource_type(), r.tag()),
        ("default", "image-kek", "layer")
    );
    assert_eq!(r.path(), "default/image-kek/layer");
    assert_eq!(r.to_string(), "kbs:///default/image-kek/layer");
    let r: KbsResource = "kbs://kbs.example:8080/a/b/c".parse().unwrap();
    assert_eq!(r.host(), Some("kbs.example:8080"));
    assert_eq!(r.to_string(), "kbs://kbs.example:8080/a/b/c");
    let e = KbsResource::parse("kbs:///a/b").unwrap_err();
    assert!(e.to_string().contains("exactly three"), "{e}");

    assert_eq!("A256GCM".parse::<CocoWrap>().unwrap(), CocoWrap::A256Gcm);
    assert_eq!("A256CTR".parse::<CocoWrap>().unwrap(), CocoWrap::A256Ctr);
    assert_eq!(CocoWrap::default(), CocoWrap::A256Gcm);
    let e = "A128GCM".parse::<CocoWrap>().unwrap_err();
    assert!(e.to_string().contains("'A128GCM' is not supported"), "{e}");

    // Recipients are checked, without echoing the key.
    let kek = random_kek();
    let e = Recipient::kbs("kbs:///a/b", kek.to_vec()).unwrap_err();
    assert!(e.to_string().contains("not a KBS resource URI"), "{e}");
    let e = Recipient::kbs(KID, kek[..31].to_vec()).unwrap_err();
    assert!(
        e.to_string()
            .contains("31 bytes; 32 (AES-256) are required"),
        "{e}"
    );
    assert!(!e.to_string().contains(&STANDARD.encode(&kek[..31])), "{e}");
    let layer = sample_layer();
    let bad = Recipient::Kbs {
        kid: KID.into(),
        kek: Zeroizing::new(vec![1; 16]),
        wrap: CocoWrap::A256Gcm,
    };
    let e = encrypt_layer_for(&layer, &[bad]).unwrap_err();
    assert!(e.to_string().contains(layer.digest.as_str()), "{e}");
    assert!(e.to_string().contains("recipient #1"), "{e}");
    let e = encrypt_layer_for(&layer, &[]).unwrap_err();
    assert!(e.to_string().contains("no recipient"), "{e}");

    // Debug output names kids, never keys.
    let recipient = Recipient::kbs(KID, kek.to_vec()).unwrap();
    let shown = format!("{recipient:?}");
    assert!(
        shown.contains(KID) && shown.contains("<32 bytes>"),
        "{shown}"
    );
    let ring = ring_with(KID, &kek);
    let shown = format!("{ring:?}");
    assert!(shown.contains(KID), "{shown}");
    assert!(!shown.contains(&format!("{:?}", &kek[..])), "{shown}");
    assert!(!shown.contains(&hex::encode(&kek)), "{shown}");

    // Lookup: exact name, then the same path under another name.
    let mut ring = KeyRing::new();
    assert!(ring.is_empty());
    ring.add_kbs_key("a/b/c", vec![1u8; 32]);
    ring.add_kbs_key("kbs:///a/b/d", vec![2u8; 32]);
    assert_eq!(ring.kbs_key("kbs:///a/b/c"), Some(&[1u8; 32][..]));
    assert_eq!(ring.kbs_key("kbs://h/a/b/c"), Some(&[1u8; 32][..]));
    assert_eq!(ring.kbs_key("a/b/d"), Some(&[2u8; 32][..]));
    assert_eq!(ring.kbs_key("kbs:///a/b/e"), None);
    assert_eq!(ring.kbs_key("not a kid"), None);
}

/// Under A256CTR (unauthenticated) the plaintext digest is the only check that binds the
/// nonce, so options without one are refused rather than decrypted unchecked.
#[test]
fn coco_ctr_options_without_a_plaintext_digest_are_refused() {
    let layer = sample_layer();
    let kek = [0x42u8; 32];
    let ctr_iv = [0x35u8; 16];
    let ctr_without_digest = |opts: &[u8]| {
        let mut v: Value = serde_json::from_slice(opts).unwrap();
        v.as_object_mut().unwrap().remove("digest");
        let mut wrapped = v.to_string().into_bytes();
        Aes256Ctr::new_from_slices(&kek, &ctr_iv)
            .unwrap()
            .apply_keystream(&mut wrapped);
        json!({
            "kid": KID,
            "wrapped_data": STANDARD.encode(wrapped),
            "iv": STANDARD.encode(ctr_iv),
            "wrap_type": "A256CTR",
        })
    };
    let (_, desc) = hand_made_layer(&layer, |opts| vec![ctr_without_digest(opts)]);
    let e = unwrap_layer_key_with(&desc, &ring_with(KID, &kek))
        .unwrap_err()
        .to_string();
    assert!(e.contains("with a sha256 plaintext digest"), "{e}");
    assert!(e.contains(desc.digest.as_str()), "{e}");
}
