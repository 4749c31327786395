use super::*;

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use crate::build::build_image;
use crate::build::tests::{sample_context, spec};
use crate::layout::OciLayout;
use crate::manifest::{ImageManifest, OCI_LAYER_TAR_GZIP};
use crate::unpack::{unpack_layer, UnpackOptions};

const SKOPEO: &str = "/usr/bin/skopeo";
const OPENSSL: &str = "/usr/bin/openssl";

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A key pair written as PEM files in a temporary directory.
struct KeyFiles {
    _dir: tempfile::TempDir,
    private: PathBuf,
    public: PathBuf,
}

impl KeyFiles {
    fn private_key(&self) -> PrivateKey {
        PrivateKey::from_pem_file(&self.private).unwrap()
    }
    fn public_key(&self) -> PublicKey {
        PublicKey::from_pem_file(&self.public).unwrap()
    }
}

/// Generate a key pair with the openssl CLI (`"rsa"` or `"ec"`), falling
/// back to the p256 crate for EC when openssl is missing. RSA key
/// generation in unoptimised builds is slow, hence openssl.
fn gen_keys(kind: &str) -> Option<KeyFiles> {
    let dir = tempfile::tempdir().unwrap();
    let private = dir.path().join("priv.pem");
    let public = dir.path().join("pub.pem");
    if !Path::new(OPENSSL).exists() {
        assert!(
            kind == "ec",
            "{OPENSSL} is required for the RSA tests (make test installs it)"
        );
        let k = PrivateKey::generate_p256();
        fs::write(&private, k.to_pem().unwrap().as_bytes()).unwrap();
        fs::write(&public, k.public_key().to_pem().unwrap()).unwrap();
    } else {
        let mut gen = Command::new(OPENSSL);
        gen.args(["genpkey", "-out"]).arg(&private);
        match kind {
            "rsa" => gen.args(["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]),
            _ => gen.args(["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]),
        };
        run(&mut gen);
        run(Command::new(OPENSSL)
            .args(["pkey", "-pubout", "-in"])
            .arg(&private)
            .arg("-out")
            .arg(&public));
    }
    Some(KeyFiles {
        _dir: dir,
        private,
        public,
    })
}

/// One RSA and one EC key pair shared by the tests (generated once).
fn rsa_keys() -> Option<&'static KeyFiles> {
    static K: OnceLock<Option<KeyFiles>> = OnceLock::new();
    K.get_or_init(|| gen_keys("rsa")).as_ref()
}
fn ec_keys() -> &'static KeyFiles {
    static K: OnceLock<KeyFiles> = OnceLock::new();
    K.get_or_init(|| gen_keys("ec").unwrap())
}

/// The interop tests need the real skopeo; they fail (never skip) without it.
fn have_skopeo() -> bool {
    assert!(
        Path::new(SKOPEO).exists(),
        "{SKOPEO} is required for the interop tests (make test installs it)"
    );
    true
}

fn skopeo_copy(extra: &[String], from: &Path, to: &Path) {
    let mut cmd = Command::new(SKOPEO);
    cmd.args(["--insecure-policy", "copy"])
        .args(extra)
        .arg(format!("oci:{}:v1", from.display()))
        .arg(format!("oci:{}:v1", to.display()));
    run(&mut cmd);
}

fn read_image(dir: &Path) -> (OciLayout, ImageManifest) {
    let layout = OciLayout::open(dir).unwrap();
    let desc = layout.resolve("v1").unwrap();
    let Manifest::Image(m) =
        parse_manifest(&layout.read_blob(&desc.digest).unwrap(), None).unwrap()
    else {
        panic!("expected an image manifest");
    };
    (layout, m)
}

fn assert_same_files(root: &Path, ctx: &Path) {
    for f in ["bin/run", "app/data/a.txt", "app/data/z.txt", "app/empty"] {
        assert_eq!(
            fs::read(root.join(f)).unwrap(),
            fs::read(ctx.join(f)).unwrap(),
            "{f}"
        );
    }
    assert_eq!(
        fs::read_link(root.join("app/link")).unwrap(),
        fs::read_link(ctx.join("app/link")).unwrap()
    );
}

pub(super) fn sample_layer() -> Blob {
    let ctx = sample_context();
    build_image(&spec(ctx.path())).unwrap().layers.remove(0)
}

pub(super) fn expect_decrypt_err(e: Error, kind: DecryptFailure, digest: &Digest, words: &str) {
    let msg = e.to_string();
    match &e {
        Error::LayerDecryption {
            kind: k, digest: d, ..
        } => {
            assert_eq!(*k, kind, "{msg}");
            assert_eq!(d, digest, "{msg}");
        }
        other => panic!("expected LayerDecryption, got {other:?}"),
    }
    assert!(msg.contains(digest.as_str()), "{msg}");
    assert!(msg.contains(words), "{msg:?} should contain {words:?}");
}

// ---------------------------------------------------------------------------
// Interop A: skopeo encrypts, veil decrypts.
// ---------------------------------------------------------------------------

fn skopeo_encrypts_veil_decrypts(encryption_keys: &[&KeyFiles], decrypt_with: &KeyFiles) {
    let ctx = sample_context();
    let img = build_image(&spec(ctx.path())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain");
    let enc = dir.path().join("enc");
    OciLayout::create(&plain)
        .unwrap()
        .write_image(&img, "v1")
        .unwrap();
    let args: Vec<String> = encryption_keys
        .iter()
        .map(|k| format!("--encryption-key=jwe:{}", k.public.display()))
        .collect();
    skopeo_copy(&args, &plain, &enc);

    let (layout, m) = read_image(&enc);
    assert_eq!(m.layers.len(), 1);
    let l = &m.layers[0];
    assert_eq!(l.media_type, format!("{OCI_LAYER_TAR_GZIP}+encrypted"));
    assert!(is_encrypted(l));
    assert!(l.annotations.contains_key(ANNOTATION_KEYS_JWE), "{l:?}");
    assert!(l.annotations.contains_key(ANNOTATION_PUBOPTS), "{l:?}");
    // Without a key, the existing paths still refuse the layer.
    assert!(matches!(l.compression(), Err(Error::EncryptedLayer { .. })));
    assert_eq!(l.decrypted_compression().unwrap(), Compression::Gzip);
    // The config (diff_ids) is unchanged by encryption.
    assert_eq!(m.config.digest, img.config.digest);

    let key = unwrap_layer_key(l, &[decrypt_with.private_key()]).unwrap();
    assert_eq!(key.layer_digest(), &l.digest);
    assert_eq!(key.decrypted_media_type(), OCI_LAYER_TAR_GZIP);
    assert_eq!(key.plaintext_digest(), Some(&img.layers[0].digest));
    let blob = layout.read_blob(&l.digest).unwrap();

    let root = dir.path().join("rootfs");
    fs::create_dir(&root).unwrap();
    let mut reader = key.decrypt(&blob[..]);
    unpack_layer(
        &mut reader,
        key.compression().unwrap(),
        &root,
        &UnpackOptions::default(),
    )
    .unwrap();
    assert!(reader.is_verified());
    assert_eq!(reader.bytes_read(), blob.len() as u64);
    assert_same_files(&root, ctx.path());

    // The whole-blob helper gives back the original layer bytes.
    let plain_blob = decrypt_layer(l, &blob, &[decrypt_with.private_key()]).unwrap();
    assert_eq!(plain_blob, img.layers[0].data);
}

#[test]
fn interop_skopeo_encrypts_rsa() {
    let Some(rsa) = rsa_keys() else { return };
    if have_skopeo() {
        skopeo_encrypts_veil_decrypts(&[rsa], rsa);
    }
}

#[test]
fn interop_skopeo_encrypts_ec() {
    if have_skopeo() {
        skopeo_encrypts_veil_decrypts(&[ec_keys()], ec_keys());
    }
}

#[test]
fn interop_skopeo_encrypts_for_two_recipients() {
    let Some(rsa) = rsa_keys() else { return };
    if have_skopeo() {
        // One JWE with two recipients (general JSON serialization).
        skopeo_encrypts_veil_decrypts(&[rsa, ec_keys()], ec_keys());
        skopeo_encrypts_veil_decrypts(&[rsa, ec_keys()], rsa);
    }
}

// ---------------------------------------------------------------------------
// Interop B: veil encrypts, skopeo decrypts.
// ---------------------------------------------------------------------------

fn veil_encrypts_skopeo_decrypts(recipients: &[&KeyFiles], decrypt_with: &KeyFiles) {
    let ctx = sample_context();
    let img = build_image(&spec(ctx.path())).unwrap();
    let pubs: Vec<PublicKey> = recipients.iter().map(|k| k.public_key()).collect();
    let enc_img = encrypt_image(&img, &pubs, |_, _| true).unwrap();
    assert_eq!(enc_img.config, img.config);
    assert_ne!(enc_img.layers[0].digest, img.layers[0].digest);

    let dir = tempfile::tempdir().unwrap();
    let enc = dir.path().join("enc");
    let plain = dir.path().join("plain");
    OciLayout::create(&enc)
        .unwrap()
        .write_image(&enc_img, "v1")
        .unwrap();
    skopeo_copy(
        &[format!(
            "--decryption-key={}",
            decrypt_with.private.display()
        )],
        &enc,
        &plain,
    );
    let (layout, m) = read_image(&plain);
    assert_eq!(m.layers.len(), 1);
    let l = &m.layers[0];
    assert_eq!(l.media_type, OCI_LAYER_TAR_GZIP);
    assert_eq!(l.digest, img.layers[0].digest);
    assert_eq!(layout.read_blob(&l.digest).unwrap(), img.layers[0].data);
    assert!(l
        .annotations
        .keys()
        .all(|k| !k.starts_with(ANNOTATION_PREFIX)));
}

#[test]
fn interop_veil_encrypts_rsa() {
    let Some(rsa) = rsa_keys() else { return };
    if have_skopeo() {
        veil_encrypts_skopeo_decrypts(&[rsa], rsa);
    }
}

#[test]
fn interop_veil_encrypts_ec() {
    if have_skopeo() {
        veil_encrypts_skopeo_decrypts(&[ec_keys()], ec_keys());
    }
}

#[test]
fn interop_veil_encrypts_for_two_recipients() {
    let Some(rsa) = rsa_keys() else { return };
    if have_skopeo() {
        veil_encrypts_skopeo_decrypts(&[rsa, ec_keys()], rsa);
        veil_encrypts_skopeo_decrypts(&[rsa, ec_keys()], ec_keys());
    }
}

// ---------------------------------------------------------------------------
// Round trips and bad input (no skopeo needed).
// ---------------------------------------------------------------------------

#[test]
fn round_trip_single_and_multi_recipient() {
    let layer = sample_layer();
    let ec2 = PrivateKey::generate_p256();
    let mut sets: Vec<Vec<PrivateKey>> = vec![
        vec![ec_keys().private_key()],
        vec![ec_keys().private_key(), ec2.clone()],
    ];
    if let Some(rsa) = rsa_keys() {
        sets.push(vec![rsa.private_key()]);
        sets.push(vec![rsa.private_key(), ec2.clone()]);
    }
    for keys in sets {
        let pubs: Vec<PublicKey> = keys.iter().map(PrivateKey::public_key).collect();
        let (data, desc) = encrypt_layer(&layer, &pubs).unwrap();
        assert_eq!(desc.media_type, format!("{OCI_LAYER_TAR_GZIP}+encrypted"));
        assert_eq!(desc.digest, Digest::sha256(&data));
        assert_eq!(desc.size, data.len() as u64);
        assert_eq!(data.len(), layer.data.len());
        assert_ne!(data, layer.data);
        for k in &keys {
            assert_eq!(
                decrypt_layer(&desc, &data, std::slice::from_ref(k)).unwrap(),
                layer.data
            );
        }
        // The right key among wrong ones is found.
        let mut many = vec![PrivateKey::generate_p256()];
        many.push(keys[keys.len() - 1].clone());
        assert_eq!(decrypt_layer(&desc, &data, &many).unwrap(), layer.data);
    }
}

#[test]
fn annotation_format_matches_ocicrypt() {
    let layer = sample_layer();
    let (data, desc) = encrypt_layer(&layer, &[ec_keys().public_key()]).unwrap();
    let pubopts: Value = serde_json::from_slice(
        &STANDARD
            .decode(&desc.annotations[ANNOTATION_PUBOPTS])
            .unwrap(),
    )
    .unwrap();
    assert_eq!(pubopts["cipher"], CIPHER_AES_256_CTR_HMAC_SHA256);
    assert_eq!(pubopts["cipheroptions"], json!({}));
    // The HMAC is HMAC-SHA256 over the ciphertext.
    let key = unwrap_layer_key(&desc, &[ec_keys().private_key()]).unwrap();
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key.symkey.as_ref()).unwrap();
    mac.update(&data);
    assert_eq!(
        pubopts["hmac"],
        STANDARD.encode(mac.finalize().into_bytes())
    );
    // A single-recipient JWE is flattened with alg/epk in the protected header.
    let jwe: Value = serde_json::from_slice(
        &STANDARD
            .decode(&desc.annotations[ANNOTATION_KEYS_JWE])
            .unwrap(),
    )
    .unwrap();
    let protected: Value =
        serde_json::from_slice(&b64url(jwe["protected"].as_str().unwrap()).unwrap()).unwrap();
    assert_eq!(protected["alg"], "ECDH-ES+A256KW");
    assert_eq!(protected["enc"], "A256GCM");
    assert_eq!(protected["epk"]["crv"], "P-256");
    assert!(jwe.get("recipients").is_none());
    assert_eq!(key.plaintext_digest(), Some(&layer.digest));
}

#[test]
fn missing_and_wrong_keys() {
    let layer = sample_layer();
    let (data, desc) = encrypt_layer(&layer, &[ec_keys().public_key()]).unwrap();
    let e = unwrap_layer_key(&desc, &[]).unwrap_err();
    expect_decrypt_err(
        e,
        DecryptFailure::NoKey,
        &desc.digest,
        "no key can decrypt this layer",
    );
    let e = decrypt_layer(&desc, &data, &[PrivateKey::generate_p256()]).unwrap_err();
    expect_decrypt_err(e, DecryptFailure::WrongKey, &desc.digest, "wrong key");

    // A JWE for a different key type: EC recipient, RSA key (and back).
    if let Some(rsa) = rsa_keys() {
        let e = unwrap_layer_key(&desc, &[rsa.private_key()]).unwrap_err();
        expect_decrypt_err(
            e,
            DecryptFailure::WrongKey,
            &desc.digest,
            "needs an EC P-256 key",
        );
        let (_, rdesc) = encrypt_layer(&layer, &[rsa.public_key()]).unwrap();
        let e = unwrap_layer_key(&rdesc, &[ec_keys().private_key()]).unwrap_err();
        expect_decrypt_err(
            e,
            DecryptFailure::WrongKey,
            &rdesc.digest,
            "needs an RSA key",
        );
        let other = gen_keys("rsa").unwrap();
        let e = unwrap_layer_key(&rdesc, &[other.private_key()]).unwrap_err();
        expect_decrypt_err(
            e,
            DecryptFailure::WrongKey,
            &rdesc.digest,
            "RSA-OAEP decryption",
        );
    }

    // Not encrypted at all.
    let e = unwrap_layer_key(&layer.descriptor(), &[ec_keys().private_key()]).unwrap_err();
    expect_decrypt_err(
        e,
        DecryptFailure::NotEncrypted,
        &layer.digest,
        "not an encrypted",
    );
}

pub(super) fn read_all<R: Read>(mut r: R) -> io::Result<Vec<u8>> {
    let mut v = Vec::new();
    r.read_to_end(&mut v).map(|_| v)
}

#[test]
fn tampered_truncated_or_extended_layers_fail_at_eof() {
    let layer = sample_layer();
    let (data, desc) = encrypt_layer(&layer, &[ec_keys().public_key()]).unwrap();
    let key = unwrap_layer_key(&desc, &[ec_keys().private_key()]).unwrap();
    assert_eq!(read_all(key.decrypt(&data[..])).unwrap(), layer.data);

    let mut flipped = data.clone();
    flipped[data.len() / 2] ^= 1;
    let truncated = &data[..data.len() - 1];
    let mut extended = data.clone();
    extended.push(0);
    for bad in [&flipped[..], truncated, &extended[..], &[][..]] {
        let mut r = key.decrypt(bad);
        let e = read_all(&mut r).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        let msg = e.to_string();
        assert!(msg.contains(desc.digest.as_str()), "{msg}");
        assert!(msg.contains("tampered with or truncated"), "{msg}");
        assert!(!r.is_verified());
        // The failure is sticky.
        assert!(r.read(&mut [0u8; 16]).is_err());
        let e = decrypt_layer(&desc, bad, &[ec_keys().private_key()]).unwrap_err();
        expect_decrypt_err(
            e,
            DecryptFailure::Integrity,
            &desc.digest,
            "integrity check",
        );
    }

    // Through the unpacker, the (truncated) layer fails too.
    let dir = tempfile::tempdir().unwrap();
    let e = unpack_layer(
        key.decrypt(truncated),
        key.compression().unwrap(),
        dir.path(),
        &UnpackOptions::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains(desc.digest.as_str()), "{e}");
}

#[test]
fn a_different_plaintext_digest_is_caught() {
    // Encrypt with a descriptor claiming another plaintext digest: the HMAC
    // holds, but the recorded digest does not.
    let layer = sample_layer();
    let mut plain = layer.descriptor();
    plain.digest = Digest::sha256(b"something else");
    let (data, desc) = encrypt_with_descriptor(
        &plain,
        &layer.data,
        &[Recipient::Jwe(ec_keys().public_key())],
    )
    .unwrap();
    let e = decrypt_layer(&desc, &data, &[ec_keys().private_key()]).unwrap_err();
    expect_decrypt_err(e, DecryptFailure::Integrity, &desc.digest, "hashes to");
}

pub(super) fn with_annotation(desc: &Descriptor, key: &str, value: Option<&str>) -> Descriptor {
    let mut d = desc.clone();
    match value {
        Some(v) => d.annotations.insert(key.to_string(), v.to_string()),
        None => d.annotations.remove(key),
    };
    d
}

#[test]
fn garbage_annotations() {
    let layer = sample_layer();
    let (_, desc) = encrypt_layer(&layer, &[ec_keys().public_key()]).unwrap();
    let keys = [ec_keys().private_key()];
    let b64 = |s: &str| STANDARD.encode(s);
    let good_jwe = desc.annotations[ANNOTATION_KEYS_JWE].clone();
    let cases: Vec<(Descriptor, DecryptFailure, &str)> = vec![
        (
            with_annotation(&desc, ANNOTATION_KEYS_JWE, Some("%%%not base64")),
            DecryptFailure::Malformed,
            "base64",
        ),
        (
            with_annotation(&desc, ANNOTATION_KEYS_JWE, Some(&b64("{not json"))),
            DecryptFailure::Malformed,
            "not a valid JWE",
        ),
        (
            with_annotation(&desc, ANNOTATION_KEYS_JWE, Some(&b64("a.b.c"))),
            DecryptFailure::Malformed,
            "compact",
        ),
        (
            with_annotation(
                &desc,
                ANNOTATION_KEYS_JWE,
                Some(&b64(
                    r#"{"iv":"","ciphertext":"","tag":"","protected":"!!"}"#,
                )),
            ),
            DecryptFailure::Malformed,
            "protected header",
        ),
        (
            with_annotation(&desc, ANNOTATION_KEYS_JWE, Some(&format!("{good_jwe},???"))),
            DecryptFailure::Malformed,
            "JWE #2",
        ),
        (
            with_annotation(&desc, ANNOTATION_KEYS_JWE, None),
            DecryptFailure::Malformed,
            ANNOTATION_KEYS_JWE,
        ),
        (
            with_annotation(&desc, ANNOTATION_PUBOPTS, Some("%%%")),
            DecryptFailure::Malformed,
            "not base64",
        ),
        (
            with_annotation(&desc, ANNOTATION_PUBOPTS, Some(&b64("[1,2"))),
            DecryptFailure::Malformed,
            "not a valid options JSON",
        ),
        (
            with_annotation(
                &desc,
                ANNOTATION_PUBOPTS,
                Some(&b64(r#"{"cipher":"AES_128_GCM","hmac":"AAAA"}"#)),
            ),
            DecryptFailure::Unsupported,
            "unknown layer cipher \"AES_128_GCM\"",
        ),
        (
            with_annotation(
                &desc,
                ANNOTATION_PUBOPTS,
                Some(&b64(r#"{"cipher":"AES_256_CTR_HMAC_SHA256"}"#)),
            ),
            DecryptFailure::Malformed,
            "no hmac",
        ),
        (
            with_annotation(&desc, ANNOTATION_PUBOPTS, Some(&b64(r#"{"hmac":"AAAA"}"#))),
            DecryptFailure::Malformed,
            "no cipher",
        ),
        (
            with_annotation(&desc, ANNOTATION_PUBOPTS, None),
            DecryptFailure::Malformed,
            ANNOTATION_PUBOPTS,
        ),
        (
            with_annotation(
                &with_annotation(&desc, ANNOTATION_KEYS_JWE, None),
                "org.opencontainers.image.enc.keys.pgp",
                Some("x"),
            ),
            DecryptFailure::Unsupported,
            "pgp",
        ),
    ];
    for (d, kind, words) in cases {
        let e = unwrap_layer_key(&d, &keys).unwrap_err();
        expect_decrypt_err(e, kind, &d.digest, words);
    }

    // JWEs whose recipient uses an algorithm or feature veil does not support.
    for (field, value, words) in [
        ("alg", json!("RSA1_5"), "\"RSA1_5\" is not supported"),
        (
            "enc",
            json!("A128CBC-HS256"),
            "\"A128CBC-HS256\" is not supported",
        ),
        ("zip", json!("DEF"), "compression (zip)"),
        ("crit", json!(["exp"]), "critical extensions"),
    ] {
        let mut jwe: Value = serde_json::from_slice(&STANDARD.decode(&good_jwe).unwrap()).unwrap();
        let mut protected: Value =
            serde_json::from_slice(&b64url(jwe["protected"].as_str().unwrap()).unwrap()).unwrap();
        protected[field] = value;
        jwe["protected"] = json!(URL_SAFE_NO_PAD.encode(protected.to_string()));
        let d = with_annotation(&desc, ANNOTATION_KEYS_JWE, Some(&b64(&jwe.to_string())));
        let e = unwrap_layer_key(&d, &keys).unwrap_err();
        expect_decrypt_err(e, DecryptFailure::Unsupported, &d.digest, words);
    }

    // A tampered JWE (content ciphertext) fails authentication.
    let mut jwe: Value = serde_json::from_slice(&STANDARD.decode(&good_jwe).unwrap()).unwrap();
    let mut ct = b64url(jwe["ciphertext"].as_str().unwrap()).unwrap();
    ct[0] ^= 1;
    jwe["ciphertext"] = json!(URL_SAFE_NO_PAD.encode(ct));
    let d = with_annotation(&desc, ANNOTATION_KEYS_JWE, Some(&b64(&jwe.to_string())));
    let e = unwrap_layer_key(&d, &keys).unwrap_err();
    expect_decrypt_err(
        e,
        DecryptFailure::WrongKey,
        &d.digest,
        "A256GCM authentication",
    );

    // A protected header changed after encryption fails authentication too.
    let mut jwe: Value = serde_json::from_slice(&STANDARD.decode(&good_jwe).unwrap()).unwrap();
    let mut protected: Value =
        serde_json::from_slice(&b64url(jwe["protected"].as_str().unwrap()).unwrap()).unwrap();
    protected["kid"] = json!("x");
    jwe["protected"] = json!(URL_SAFE_NO_PAD.encode(protected.to_string()));
    let d = with_annotation(&desc, ANNOTATION_KEYS_JWE, Some(&b64(&jwe.to_string())));
    let e = unwrap_layer_key(&d, &keys).unwrap_err();
    expect_decrypt_err(
        e,
        DecryptFailure::WrongKey,
        &d.digest,
        "A256GCM authentication",
    );
}

#[test]
fn pem_formats() {
    let ec = ec_keys();
    let k = ec.private_key();
    assert_eq!(k.kind(), "EC P-256");
    assert_eq!(ec.public_key(), k.public_key());
    // A private key PEM works where a public key is expected.
    assert_eq!(
        PublicKey::from_pem(&fs::read_to_string(&ec.private).unwrap()).unwrap(),
        k.public_key()
    );
    // Round trip through our own PEM encoders.
    let again = PrivateKey::from_pem(&k.to_pem().unwrap()).unwrap();
    assert_eq!(again.public_key(), k.public_key());
    assert_eq!(
        PublicKey::from_pem(&k.public_key().to_pem().unwrap()).unwrap(),
        k.public_key()
    );
    for bad in [
        "",
        "hello",
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    ] {
        let e = PrivateKey::from_pem(bad).unwrap_err();
        assert!(matches!(e, Error::InvalidKey { .. }), "{e}");
        let e = PublicKey::from_pem(bad).unwrap_err();
        assert!(matches!(e, Error::InvalidKey { .. }), "{e}");
    }
    let e = PrivateKey::from_pem_file(Path::new("/nonexistent/key.pem")).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");

    assert!(
        Path::new(OPENSSL).exists(),
        "{OPENSSL} is required (make test installs it)"
    );
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    // SEC1 with an EC PARAMETERS block first (`openssl ecparam -genkey`).
    run(Command::new(OPENSSL)
        .args(["ecparam", "-name", "prime256v1", "-genkey", "-out"])
        .arg(p("sec1.pem")));
    let sec1 = fs::read_to_string(p("sec1.pem")).unwrap();
    assert!(sec1.contains("EC PARAMETERS") && sec1.contains("EC PRIVATE KEY"));
    assert_eq!(PrivateKey::from_pem(&sec1).unwrap().kind(), "EC P-256");
    // P-384 is refused with a clear message.
    run(Command::new(OPENSSL)
        .args(["ecparam", "-name", "secp384r1", "-genkey", "-out"])
        .arg(p("p384.pem")));
    let e = PrivateKey::from_pem(&fs::read_to_string(p("p384.pem")).unwrap()).unwrap_err();
    assert!(e.to_string().contains("P-256"), "{e}");
    if let Some(rsa) = rsa_keys() {
        // PKCS#1 private and public keys.
        run(Command::new(OPENSSL)
            .args(["rsa", "-traditional", "-in"])
            .arg(&rsa.private)
            .arg("-out")
            .arg(p("pkcs1.pem")));
        let pkcs1 = fs::read_to_string(p("pkcs1.pem")).unwrap();
        assert!(pkcs1.contains("BEGIN RSA PRIVATE KEY"));
        let k = PrivateKey::from_pem(&pkcs1).unwrap();
        assert_eq!(k.kind(), "RSA-2048");
        assert_eq!(k.public_key(), rsa.public_key());
        run(Command::new(OPENSSL)
            .args(["rsa", "-RSAPublicKey_out", "-in"])
            .arg(&rsa.private)
            .arg("-out")
            .arg(p("pkcs1pub.pem")));
        let pkcs1pub = fs::read_to_string(p("pkcs1pub.pem")).unwrap();
        assert!(pkcs1pub.contains("BEGIN RSA PUBLIC KEY"));
        assert_eq!(PublicKey::from_pem(&pkcs1pub).unwrap(), rsa.public_key());
        // Small RSA keys are refused.
        run(Command::new(OPENSSL)
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:1024",
                "-out",
            ])
            .arg(p("small.pem")));
        let e = PrivateKey::from_pem(&fs::read_to_string(p("small.pem")).unwrap()).unwrap_err();
        assert!(e.to_string().contains("2048"), "{e}");
    }
}

#[test]
fn encrypt_image_selected_layers() {
    let ctx = sample_context();
    let img = build_image(&spec(ctx.path())).unwrap();
    // A second layer, left unencrypted.
    let extra = Blob::new(OCI_LAYER_TAR_GZIP, img.layers[0].data.clone());
    let two = crate::build::assemble_image(
        vec![img.layers[0].clone(), extra],
        &spec(ctx.path()).run_config(),
    )
    .unwrap();
    let enc = encrypt_image(&two, &[ec_keys().public_key()], |i, _| i == 0).unwrap();
    assert_eq!(enc.config, two.config);
    let Manifest::Image(m) = parse_manifest(&enc.manifest.data, None).unwrap() else {
        panic!()
    };
    assert_eq!(m.config, two.config.descriptor());
    assert!(is_encrypted(&m.layers[0]));
    assert!(!is_encrypted(&m.layers[1]));
    assert_eq!(m.layers[1], two.layers[1].descriptor());
    assert_eq!(m.layers[0].digest, enc.layers[0].digest);
    assert_eq!(enc.manifest.digest, Digest::sha256(&enc.manifest.data));
    let plain = decrypt_layer(
        &m.layers[0],
        &enc.layers[0].data,
        &[ec_keys().private_key()],
    )
    .unwrap();
    assert_eq!(plain, two.layers[0].data);
    // Encrypting again leaves encrypted layers alone.
    let again = encrypt_image(&enc, &[ec_keys().public_key()], |_, _| true).unwrap();
    assert_eq!(again.layers[0], enc.layers[0]);
    assert!(is_encrypted(&again.layers[1].descriptor()));
    // Refusals.
    let e = encrypt_layer(&enc.layers[0], &[ec_keys().public_key()]).unwrap_err();
    assert!(e.to_string().contains("encrypted already"), "{e}");
    let e = encrypt_layer(&img.layers[0], &[]).unwrap_err();
    assert!(e.to_string().contains(img.layers[0].digest.as_str()), "{e}");
}
