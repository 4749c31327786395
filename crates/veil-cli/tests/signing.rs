//! Signature interop with the reference cosign tool and a real registry: images veil signs
//! verify with `cosign verify`, images cosign signs verify in veil, keys made by either work in
//! the other. (Debian bookworm's skopeo is built with sigstore disabled, so cosign stands in for
//! `skopeo --sign-by-sigstore-private-key`; both write the same format.)
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};
use veil_testkit::{cosign, skopeo, TestRegistry};

const VEIL: &str = env!("CARGO_BIN_EXE_veil");

fn veil(dir: &Path, args: &[&str], passphrase: &str) -> Output {
    Command::new(VEIL)
        .args(args)
        .current_dir(dir)
        .env("VEIL_SIGN_PASSPHRASE", passphrase)
        .env("VEIL_LOG", "warn")
        .output()
        .unwrap()
}

fn ok(dir: &Path, args: &[&str], passphrase: &str) -> String {
    let out = veil(dir, args, passphrase);
    assert!(
        out.status.success(),
        "veil {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails(dir: &Path, args: &[&str], passphrase: &str) -> String {
    let out = veil(dir, args, passphrase);
    assert!(!out.status.success(), "veil {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Push the example image to `reg` as hello:v1 with skopeo; returns the reference.
fn push_example(dir: &Path, reg: &TestRegistry) -> String {
    ok(dir, &["image", "example", "ex"], "");
    ok(
        dir,
        &[
            "image",
            "build",
            "ex",
            "-t",
            "local/hello:v1",
            "--oci-layout",
            "lay",
            "--entrypoint",
            "/hello",
        ],
        "",
    );
    let image = format!("{}/hello:v1", reg.host());
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", dir.join("lay").display()),
        &format!("docker://{image}"),
    ])
    .unwrap();
    image
}

fn cosign_keys(dir: &Path, prefix: &str, password: &str) {
    veil_testkit::cosign_key_pair(dir, prefix, password).unwrap();
}

const COSIGN_NET: [&str; 2] = ["--allow-insecure-registry", "--allow-http-registry"];

#[test]
fn veil_signatures_verify_with_cosign_and_wrong_keys_fail() {
    let reg = TestRegistry::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let image = push_example(dir, &reg);

    ok(dir, &["image", "generate-key", "veil"], "pw-veil");
    // A second key pair, made by cosign, did not sign.
    cosign_keys(dir, "other", "x");
    assert!(dir.join("other.pub").exists());

    // Before signing, inspect finds nothing.
    let out = ok(dir, &["image", "inspect", &image], "");
    assert!(out.contains(": none"), "{out}");

    let out = ok(
        dir,
        &["image", "sign", &image, "--key", "veil.key"],
        "pw-veil",
    );
    assert!(out.contains(&format!("as {image}")), "{out}");

    let veil_pub = dir.join("veil.pub");
    let other_pub = dir.join("other.pub");
    let mut args = vec!["verify", "--insecure-ignore-tlog=true", "--key"];
    let vp = veil_pub.to_str().unwrap();
    args.push(vp);
    args.extend(COSIGN_NET);
    args.push(&image);
    let out = cosign(&args, &[]).unwrap();
    assert!(
        out.contains("verified against the specified public key"),
        "{out}"
    );
    assert!(
        out.contains(&format!("\"docker-reference\":\"{image}\"")),
        "{out}"
    );

    let op = other_pub.to_str().unwrap();
    let mut args = vec!["verify", "--insecure-ignore-tlog=true", "--key", op];
    args.extend(COSIGN_NET);
    args.push(&image);
    let e = cosign(&args, &[]).unwrap_err().to_string();
    assert!(e.contains("no matching signatures"), "{e}");

    // veil's own view agrees.
    let out = ok(
        dir,
        &[
            "image",
            "inspect",
            &image,
            "--key",
            "veil.pub",
            "--key",
            "other.pub",
        ],
        "",
    );
    assert!(
        out.contains("identity ") && out.contains("[verified by veil.pub]"),
        "{out}"
    );
    let out = ok(dir, &["image", "inspect", &image, "--key", "other.pub"], "");
    assert!(out.contains("[NOT made by any given key]"), "{out}");

    // Bad inputs: wrong passphrase, missing key file, garbage key, bad identity.
    let e = fails(
        dir,
        &["image", "sign", &image, "--key", "veil.key"],
        "wrong",
    );
    assert!(e.contains("wrong passphrase"), "{e}");
    assert!(!e.contains("pw-veil"));
    let e = fails(dir, &["image", "sign", &image, "--key", "nope.key"], "");
    assert!(e.contains("nope.key"), "{e}");
    std::fs::write(dir.join("junk.key"), "not a key").unwrap();
    let e = fails(dir, &["image", "sign", &image, "--key", "junk.key"], "");
    assert!(e.contains("junk.key"), "{e}");
    let e = fails(
        dir,
        &[
            "image",
            "sign",
            &image,
            "--key",
            "veil.key",
            "--identity",
            "Bad Ref",
        ],
        "pw-veil",
    );
    assert!(e.contains("--identity"), "{e}");
    let e = fails(dir, &["image", "generate-key", "veil"], "");
    assert!(e.contains("exists"), "{e}");
    let e = fails(
        dir,
        &[
            "image",
            "sign",
            &format!("{}/absent:v1", reg.host()),
            "--key",
            "veil.key",
        ],
        "pw-veil",
    );
    assert!(e.contains("absent"), "{e}");
}

#[test]
fn cosign_signatures_and_keys_work_in_veil() {
    let reg = TestRegistry::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let image = push_example(dir, &reg);
    cosign_keys(dir, "cs", "pw-cosign");

    // cosign signs by digest (its identity is the repository, without tag).
    let out = ok(dir, &["image", "inspect", &image], "");
    let digest = out
        .lines()
        .find_map(|l| l.strip_prefix("manifest:  "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();
    let by_digest = format!("{}/hello@{digest}", reg.host());
    let key = dir.join("cs.key");
    let mut args = vec![
        "sign",
        "--key",
        key.to_str().unwrap(),
        "--tlog-upload=false",
        "-y",
    ];
    args.extend(COSIGN_NET);
    args.push(&by_digest);
    cosign(&args, &[("COSIGN_PASSWORD", "pw-cosign")]).unwrap();

    let out = ok(dir, &["image", "inspect", &image, "--key", "cs.pub"], "");
    assert!(
        out.contains(&format!(
            "identity {}/hello [verified by cs.pub]",
            reg.host()
        )),
        "{out}"
    );

    // veil signs with cosign's own encrypted key; cosign then finds two signatures.
    ok(
        dir,
        &["image", "sign", &image, "--key", "cs.key"],
        "pw-cosign",
    );
    let out = ok(dir, &["image", "inspect", &image, "--key", "cs.pub"], "");
    assert_eq!(out.matches("[verified by cs.pub]").count(), 2, "{out}");
    let pubk = dir.join("cs.pub");
    let mut args = vec![
        "verify",
        "--insecure-ignore-tlog=true",
        "--key",
        pubk.to_str().unwrap(),
    ];
    args.extend(COSIGN_NET);
    args.push(&image);
    let out = cosign(&args, &[]).unwrap();
    assert!(
        out.contains(&format!("\"docker-reference\":\"{image}\"")),
        "{out}"
    );
    assert!(
        out.contains(&format!("\"docker-reference\":\"{}/hello\"", reg.host())),
        "{out}"
    );
}
