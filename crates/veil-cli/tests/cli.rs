//! The `veil` command as a user runs it: `veil up` in one process, the other commands from
//! another, exactly as the README shows. Needs root (namespace sandboxes).
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const VEIL: &str = env!("CARGO_BIN_EXE_veil");

/// Operator tokens of the `veil up`s this test started, by server URL.
static TOKENS: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());

fn remember_token(server: &str, state_dir: &std::path::Path) {
    let t = std::fs::read_to_string(state_dir.join("auth/operator.token")).unwrap();
    TOKENS
        .lock()
        .unwrap()
        .push((server.to_string(), t.trim().to_string()));
}

fn token_of(server: &str) -> Option<String> {
    TOKENS
        .lock()
        .unwrap()
        .iter()
        .find(|(s, _)| s == server)
        .map(|(_, t)| t.clone())
}

fn veil(server: &str, args: &[&str]) -> Output {
    let mut c = Command::new(VEIL);
    c.args(args)
        .env("VEIL_SERVER", server)
        .env("VEIL_LOG", "warn")
        .env_remove("VEIL_TOKEN");
    if let Some(t) = token_of(server) {
        c.env("VEIL_TOKEN", t);
    }
    c.output().unwrap()
}

fn ok(server: &str, args: &[&str]) -> String {
    let out = veil(server, args);
    assert!(
        out.status.success(),
        "veil {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Up(std::process::Child);

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn readme_workflow_with_the_veil_command() {
    let tmp = tempfile::tempdir().unwrap();
    let port = veil_testkit::free_port();
    let server = format!("http://127.0.0.1:{port}");
    let child = Command::new(VEIL)
        .args([
            "up",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--pool-size",
            "1",
            "--state-dir",
        ])
        .arg(tmp.path().join("state"))
        .env("VEIL_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut up = Up(child);
    let start = Instant::now();
    while reqwest::blocking_get(&format!("{server}/healthz")).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "veil up did not come up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    remember_token(&server, &tmp.path().join("state"));

    let ctx = tmp.path().join("hello");
    ok(&server, &["image", "example", ctx.to_str().unwrap()]);
    let built = ok(
        &server,
        &[
            "image",
            "build",
            ctx.to_str().unwrap(),
            "-t",
            "local/hello:v1",
            "--entrypoint",
            "/hello",
        ],
    );
    assert!(built.contains("pushed local/hello:v1 (sha256:"), "{built}");
    let inspected = ok(&server, &["image", "inspect", "local/hello:v1"]);
    assert!(
        inspected.contains("layer 0:") && inspected.contains("[plain]"),
        "{inspected}"
    );

    let deployed = ok(
        &server,
        &[
            "deploy",
            "hello",
            "--image",
            "local/hello:v1",
            "--env",
            "GREETING=hi",
        ],
    );
    assert!(
        deployed.contains("deployed hello (revision 1)"),
        "{deployed}"
    );
    let said = ok(&server, &["invoke", "hello", "--data", "hi"]);
    assert_eq!(said, "Hello from veil! POST / (2 bytes): hi\n");
    let listed = ok(&server, &["ls"]);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("hello ") && l.contains("local/hello:v1")),
        "{listed}"
    );
    let logs = ok(&server, &["logs", "hello"]);
    assert!(logs.contains("hello: listening on port 8080"), "{logs}");
    // `veil logs --follow` prints new lines as they come, each once, until the function is
    // deleted (further down).
    let mut follow = Command::new(VEIL);
    follow
        .args(["logs", "hello", "--follow", "--tail", "1"])
        .env("VEIL_SERVER", &server)
        .env("VEIL_TOKEN", token_of(&server).unwrap())
        .env("VEIL_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut follower = Up(follow.spawn().unwrap());
    let (seen_tx, seen) = std::sync::mpsc::channel::<String>();
    let stdout = follower.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(stdout).lines() {
            let Ok(l) = l else { break };
            if seen_tx.send(l).is_err() {
                break;
            }
        }
    });
    for i in 0..3 {
        ok(
            &server,
            &["invoke", "hello", "--path", &format!("/followed-{i}")],
        );
    }
    let mut followed = Vec::new();
    while followed.len() < 3 {
        let l = seen
            .recv_timeout(Duration::from_secs(20))
            .expect("veil logs --follow printed no new line");
        if l.contains("/followed-") {
            followed.push(l.split_once(' ').unwrap().1.to_string());
        }
    }
    assert_eq!(
        followed,
        [
            "hello: GET /followed-0",
            "hello: GET /followed-1",
            "hello: GET /followed-2"
        ]
    );

    // Secrets through the embedded key broker, administered with `veil kbs`.
    let admin_key = tmp.path().join("state/kbs/admin.key");
    let key = admin_key.to_str().unwrap();
    ok(
        &server,
        &[
            "kbs",
            "set-resource",
            "default/app/token",
            "--value",
            "tok123",
            "--admin-key",
            key,
        ],
    );
    let listed = ok(&server, &["kbs", "ls", "--admin-key", key]);
    assert!(
        listed.contains("default/app/token") && !listed.contains("tok123"),
        "{listed}"
    );
    ok(
        &server,
        &[
            "deploy",
            "sec",
            "--image",
            "local/hello:v1",
            "--secret",
            "TOKEN=kbs:///default/app/token",
            "--allow-insecure-software-tee",
        ],
    );
    assert_eq!(
        ok(&server, &["invoke", "sec", "--path", "/env/TOKEN"]),
        "TOKEN=tok123\n"
    );
    ok(&server, &["delete", "sec"]);
    let stranger = tmp.path().join("stranger.key");
    std::fs::write(&stranger, "not a key").unwrap();
    let refused = veil(
        &server,
        &["kbs", "ls", "--admin-key", stranger.to_str().unwrap()],
    );
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("stranger.key"));

    // Encrypt the image with a key generated into the broker, run it, inspect it.
    let enc = ok(
        &server,
        &[
            "image",
            "encrypt",
            "local/hello:v1",
            "--key",
            "kbs:///default/image-key/k1",
            "--output",
            "local/hello:enc",
            "--admin-key",
            key,
        ],
    );
    assert!(enc.contains("pushed encrypted local/hello:enc"), "{enc}");
    let inspected = ok(&server, &["image", "inspect", "local/hello:enc"]);
    assert!(
        inspected.contains("+encrypted") && inspected.contains("[encrypted: jwe]"),
        "{inspected}"
    );
    ok(
        &server,
        &[
            "deploy",
            "encfn",
            "--image",
            "local/hello:enc",
            "--decryption-key",
            "kbs:///default/image-key/k1",
            "--allow-insecure-software-tee",
        ],
    );
    assert_eq!(
        ok(&server, &["invoke", "encfn", "--data", "x"]),
        "Hello from veil! POST / (1 bytes): x\n"
    );
    ok(&server, &["delete", "encfn"]);
    let bad_layers = veil(
        &server,
        &[
            "image",
            "encrypt",
            "local/hello:v1",
            "--key",
            "kbs:///default/image-key/k2",
            "--layers",
            "7",
            "--admin-key",
            key,
        ],
    );
    assert!(!bad_layers.status.success());

    // The Confidential Containers key-provider format: a key-encryption key generated into
    // the broker under the key id the layers name.
    let coco = ok(
        &server,
        &[
            "image",
            "encrypt",
            "local/hello:v1",
            "--format",
            "coco",
            "--key",
            "kbs:///default/image-kek/k3",
            "--output",
            "local/hello:coco",
            "--admin-key",
            key,
        ],
    );
    assert!(coco.contains("256-bit key-encryption key"), "{coco}");
    let inspected = ok(&server, &["image", "inspect", "local/hello:coco"]);
    assert!(
        inspected.contains("[encrypted: coco kbs:///default/image-kek/k3]"),
        "{inspected}"
    );
    ok(
        &server,
        &[
            "deploy",
            "cocofn",
            "--image",
            "local/hello:coco",
            "--decryption-key",
            "kbs:///default/image-kek/k3",
            "--allow-insecure-software-tee",
        ],
    );
    assert_eq!(
        ok(&server, &["invoke", "cocofn", "--data", "y"]),
        "Hello from veil! POST / (1 bytes): y\n"
    );
    ok(&server, &["delete", "cocofn"]);
    let pem_for_coco = veil(
        &server,
        &[
            "image",
            "encrypt",
            "local/hello:v1",
            "--format",
            "coco",
            "--key",
            "pub.pem",
            "--admin-key",
            key,
        ],
    );
    assert!(!pem_for_coco.status.success());
    assert!(String::from_utf8_lossy(&pem_for_coco.stderr).contains("--format coco needs"));

    // Sign the image, give the broker the public key and a policy, deploy with the policy.
    let prefix = tmp.path().join("cosign");
    let out = Command::new(VEIL)
        .args(["image", "generate-key"])
        .arg(&prefix)
        .env("VEIL_SIGN_PASSPHRASE", "pw")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(VEIL)
        .args(["image", "sign", "local/hello:v1", "--key"])
        .arg(prefix.with_extension("key"))
        .env("VEIL_SERVER", &server)
        .env("VEIL_TOKEN", token_of(&server).unwrap())
        .env("VEIL_SIGN_PASSPHRASE", "pw")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pubfile = prefix.with_extension("pub");
    let inspected = ok(
        &server,
        &[
            "image",
            "inspect",
            "local/hello:v1",
            "--key",
            pubfile.to_str().unwrap(),
        ],
    );
    assert!(inspected.contains("[verified by"), "{inspected}");
    let policy = tmp.path().join("policy.json");
    std::fs::write(
        &policy,
        r#"{"default":[{"type":"sigstoreSigned","keyPath":"kbs:///default/cosign/pub"}]}"#,
    )
    .unwrap();
    for (path, file) in [
        ("default/cosign/pub", pubfile.to_str().unwrap()),
        ("default/policy/images", policy.to_str().unwrap()),
    ] {
        ok(
            &server,
            &[
                "kbs",
                "set-resource",
                path,
                "--file",
                file,
                "--admin-key",
                key,
            ],
        );
    }
    for (name, image) in [
        ("signedfn", "local/hello:v1"),
        ("unsignedfn", "local/hello:enc"),
    ] {
        ok(
            &server,
            &[
                "deploy",
                name,
                "--image",
                image,
                "--signature-policy",
                "kbs:///default/policy/images",
                "--decryption-key",
                "kbs:///default/image-key/k1",
                "--allow-insecure-software-tee",
            ],
        );
    }
    assert_eq!(
        ok(&server, &["invoke", "signedfn", "--data", "z"]),
        "Hello from veil! POST / (1 bytes): z\n"
    );
    let refused = veil(&server, &["invoke", "unsignedfn"]);
    assert!(!refused.status.success());
    let text = String::from_utf8_lossy(&refused.stdout).into_owned()
        + &String::from_utf8_lossy(&refused.stderr);
    assert!(text.contains("no sigstore signature was found"), "{text}");
    ok(&server, &["delete", "signedfn"]);
    ok(&server, &["delete", "unsignedfn"]);

    // Bad input through the CLI: clear errors and a failing exit status.
    let missing = veil(&server, &["invoke", "nope"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stdout).contains("is not deployed"));
    let bad_env = veil(
        &server,
        &[
            "deploy",
            "x",
            "--image",
            "local/hello:v1",
            "--env",
            "NOEQUALS",
        ],
    );
    assert!(!bad_env.status.success());
    assert!(String::from_utf8_lossy(&bad_env.stderr).contains("expected KEY=VALUE"));
    let bad_image = veil(&server, &["deploy", "x", "--image", "local/absent:v1"]);
    assert!(!bad_image.status.success());
    assert!(String::from_utf8_lossy(&bad_image.stderr).contains("IMAGE_NOT_FOUND"));

    // Names are one URL path segment: this must not delete `hello`.
    let sneaky = veil(&server, &["delete", "nonexistent/../hello"]);
    assert!(!sneaky.status.success());
    assert!(ok(&server, &["ls"]).contains("hello "));

    // Tokens: nothing under /v1/ or /v2/ without one; a tenant reaches only its own functions
    // and repositories.
    let anon = Command::new(VEIL)
        .args(["ls"])
        .env("VEIL_SERVER", &server)
        .env("VEIL_LOG", "warn")
        .env("VEIL_STATE_DIR", tmp.path().join("elsewhere"))
        .env_remove("VEIL_TOKEN")
        .output()
        .unwrap();
    assert!(!anon.status.success());
    assert!(
        String::from_utf8_lossy(&anon.stderr).contains("HTTP 401"),
        "{}",
        String::from_utf8_lossy(&anon.stderr)
    );
    assert!(reqwest::blocking_get(&format!("{server}/v1/functions")).is_err());
    assert!(reqwest::blocking_get(&format!("{server}/v2/hello/tags/list")).is_err());
    assert_eq!(
        reqwest::blocking_get(&format!("{server}/healthz")).unwrap(),
        "ok\n"
    );
    let tenant_b = ok(&server, &["token", "create", "--tenant", "b"])
        .trim()
        .to_string();
    let as_b = |args: &[&str]| {
        Command::new(VEIL)
            .args(args)
            .env("VEIL_SERVER", &server)
            .env("VEIL_LOG", "warn")
            .env("VEIL_TOKEN", &tenant_b)
            .output()
            .unwrap()
    };
    let out = |o: &Output| {
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
    };
    let listed_b = as_b(&["ls"]);
    assert!(listed_b.status.success(), "{}", out(&listed_b));
    assert!(!out(&listed_b).contains("hello"), "{}", out(&listed_b));
    for args in [
        &["delete", "hello"][..],
        &["logs", "hello"],
        &["deploy", "hello", "--image", "local/hello:v1"],
        &["deploy", "mine", "--image", "local/hello:v1"],
        &[
            "deploy",
            "mine",
            "--image",
            "local/hello:v1",
            "--tenant",
            "default",
        ],
        &["token", "ls"],
        &["image", "inspect", "local/hello:v1"],
    ] {
        let o = as_b(args);
        assert!(
            !o.status.success(),
            "tenant b could run {args:?}: {}",
            out(&o)
        );
    }
    assert!(
        ok(&server, &["ls"]).contains("hello "),
        "b's delete must not succeed"
    );
    // b pushes its own repository and deploys from it; default's token cannot be guessed.
    let pushed = as_b(&[
        "image",
        "build",
        ctx.to_str().unwrap(),
        "-t",
        "local/b-app:v1",
        "--entrypoint",
        "/hello",
    ]);
    assert!(pushed.status.success(), "{}", out(&pushed));
    let deployed_b = as_b(&["deploy", "bfn", "--image", "local/b-app:v1"]);
    assert!(deployed_b.status.success(), "{}", out(&deployed_b));
    let theirs = veil(&server, &["ls"]);
    assert!(
        out(&theirs).contains("bfn "),
        "the operator sees every tenant"
    );
    let ids = ok(&server, &["token", "ls"]);
    let id = ids.split_whitespace().next().unwrap().to_string();
    ok(&server, &["token", "revoke", &id]);
    let revoked = as_b(&["ls"]);
    assert!(!revoked.status.success(), "{}", out(&revoked));
    ok(&server, &["delete", "bfn"]);

    let token = token_of(&server).unwrap();
    let sandboxes: Vec<serde_json::Value> = serde_json::from_str(
        &reqwest::blocking_get_with(&format!("{server}/v1/sandboxes"), Some(&token)).unwrap(),
    )
    .unwrap();
    assert!(!sandboxes.is_empty());
    ok(&server, &["delete", "hello"]);
    let gone = veil(&server, &["invoke", "hello"]);
    assert!(!gone.status.success());
    // The follower ends with the function (its long poll looks every second), saying why.
    let start = Instant::now();
    let status = loop {
        if let Some(st) = follower.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "veil logs --follow outlived its function"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    let mut why = String::new();
    std::io::Read::read_to_string(&mut follower.0.stderr.take().unwrap(), &mut why).unwrap();
    assert!(
        why.contains("NOT_FOUND") || why.contains("not deployed"),
        "{why}"
    );

    // SIGTERM stops veil cleanly and takes every sandbox with it.
    let pid = up.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = up.0.wait().unwrap();
    assert!(status.success(), "veil up exited with {status}");
    for s in sandboxes {
        let id = s["id"].as_str().unwrap();
        assert!(!std::path::Path::new(&format!("/sys/fs/cgroup/memory/veil/{id}")).exists());
        assert!(!std::path::Path::new(&format!("/sys/fs/cgroup/veil/{id}")).exists());
        for p in s["pids"].as_array().unwrap() {
            assert!(!std::path::Path::new(&format!("/proc/{}", p.as_u64().unwrap())).exists());
        }
    }
    let unreachable = veil(&server, &["ls"]);
    assert!(String::from_utf8_lossy(&unreachable.stderr).contains("is `veil up` running?"));
}

mod reqwest {
    /// A tiny blocking GET (the workspace's reqwest is built without its blocking client).
    pub fn blocking_get(url: &str) -> Result<String, String> {
        blocking_get_with(url, None)
    }

    /// A blocking GET with a bearer token.
    pub fn blocking_get_with(url: &str, token: Option<&str>) -> Result<String, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async {
            let mut rb = ::reqwest::Client::new().get(url);
            if let Some(t) = token {
                rb = rb.bearer_auth(t);
            }
            let r = rb.send().await.map_err(|e| e.to_string())?;
            if !r.status().is_success() {
                return Err(format!("HTTP {}", r.status()));
            }
            r.text().await.map_err(|e| e.to_string())
        })
    }
}

/// `veil attest verify` on the real vectors (crates/veil-attest/testdata): they verify at a time when
/// their certificates and collateral were valid, fail today (collateral expired), and fail
/// when a byte of the report is flipped.
#[test]
fn attest_verify_real_vectors() {
    let td = concat!(env!("CARGO_MANIFEST_DIR"), "/../veil-attest/testdata");
    let snp = format!("{td}/snp/virtee-sev/report_milan.hex");
    let vcek = format!("{td}/snp/virtee-sev/vcek_milan.der");
    let out = veil(
        "-",
        &[
            "attest",
            "verify",
            &snp,
            "--vcek",
            &vcek,
            "--at",
            "1751328000",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("VERIFIED") && text.contains("7a1e5c266c0108db"),
        "{text}"
    );

    let quote = format!("{td}/tdx/dcap-qvl/tdx_quote");
    let coll = format!("{td}/tdx/dcap-qvl/tdx_quote_collateral.json");
    let ok = veil(
        "-",
        &[
            "attest",
            "verify",
            &quote,
            "--collateral",
            &coll,
            "--at",
            "1752919234",
        ],
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    let expired = veil("-", &["attest", "verify", &quote, "--collateral", &coll]);
    assert!(!expired.status.success());
    assert!(String::from_utf8_lossy(&expired.stdout).contains("DOES NOT VERIFY"));

    // Change one hex digit inside the measurement (report bytes 0x90..0xc0).
    let tmp = tempfile::tempdir().unwrap();
    let hex = std::fs::read_to_string(&snp).unwrap();
    let mut digits = 0;
    let hex: String = hex
        .chars()
        .map(|c| {
            if !c.is_ascii_hexdigit() {
                return c;
            }
            digits += 1;
            if digits == 2 * 0x90 + 1 {
                if c == '0' {
                    '1'
                } else {
                    '0'
                }
            } else {
                c
            }
        })
        .collect();
    let bad = tmp.path().join("tampered.hex");
    std::fs::write(&bad, hex).unwrap();
    let out = veil(
        "-",
        &[
            "attest",
            "verify",
            bad.to_str().unwrap(),
            "--vcek",
            &vcek,
            "--at",
            "1751328000",
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("DOES NOT VERIFY"));

    // Bad input: a missing file and a bad --report-data are clear errors.
    let missing = veil("-", &["attest", "verify", "/nonexistent/report.bin"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/report.bin"));
    let short = veil("-", &["attest", "verify", &snp, "--report-data", "abcd"]);
    assert!(String::from_utf8_lossy(&short.stderr).contains("64 bytes"));
}

/// `--entrypoint` takes one word per flag, so the flags after it keep their meaning (it used to
/// swallow `--env A=1` and `--oci-layout DIR`, which then pushed to Docker Hub).
#[test]
fn image_build_flags_do_not_swallow_each_other() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = tmp.path().join("ctx");
    let out_dir = tmp.path().join("layout");
    let server = "http://127.0.0.1:9";
    ok(server, &["image", "example", ctx.to_str().unwrap()]);
    let built = ok(
        server,
        &[
            "image",
            "build",
            ctx.to_str().unwrap(),
            "-t",
            "hello:v1",
            "--entrypoint",
            "/hello",
            "--entrypoint",
            "--exit",
            "--env",
            "A=1",
            "--oci-layout",
            out_dir.to_str().unwrap(),
        ],
    );
    assert!(built.contains("wrote "), "{built}");
    let read = |d: &str| {
        let (alg, hex) = d.split_once(':').unwrap();
        serde_json::from_slice::<serde_json::Value>(
            &std::fs::read(out_dir.join("blobs").join(alg).join(hex)).unwrap(),
        )
        .unwrap()
    };
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("index.json")).unwrap()).unwrap();
    let manifest = read(index["manifests"][0]["digest"].as_str().unwrap());
    let config = read(manifest["config"]["digest"].as_str().unwrap());
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/hello", "--exit"])
    );
    assert!(
        config["config"]["Env"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("A=1")),
        "{config}"
    );
}
