//! Confidential Containers' trustee, for interoperability tests: its KBS and its `kbs-client`,
//! built from trustee's public sources (`testdata/trustee/README.md` gives the commits and the
//! build), shipped xz-compressed and unpacked on first use.

use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// sha256 of the decompressed programs, as the fixture's README records them.
const PROGRAMS: [(&str, &str); 2] = [
    (
        "kbs",
        "7a9bd7661d675a026a3ff810f061482e6c202b51521674ec654300ecb329d937",
    ),
    (
        "kbs-client",
        "038e9542a0afa1d8043878ce1c547ceb1d2a798bd0cbb6c7015a530406c57ff1",
    ),
];

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/trustee")
}

/// Path of trustee's program `name` (`kbs` or `kbs-client`), unpacked (with `xz`) into the
/// temporary directory once and checked against its recorded digest.
pub fn program(name: &str) -> anyhow::Result<PathBuf> {
    let (_, digest) = PROGRAMS
        .iter()
        .find(|(n, _)| *n == name)
        .with_context(|| format!("no trustee program {name}"))?;
    let dir = std::env::temp_dir().join("veil-testkit-trustee");
    std::fs::create_dir_all(&dir)?;
    let out = dir.join(format!("{name}-{}", &digest[..16]));
    if out.exists() {
        return Ok(out);
    }
    let src = fixture().join(format!("{name}.xz"));
    let data = Command::new("xz")
        .arg("-dc")
        .arg(&src)
        .output()
        .with_context(|| format!("xz (package xz-utils) unpacks {}", src.display()))?;
    if !data.status.success() {
        bail!("xz -dc {} failed", src.display());
    }
    use sha2::Digest;
    let got = hex::encode(sha2::Sha256::digest(&data.stdout));
    if got != *digest {
        bail!(
            "{} unpacks to sha256 {got}, not the recorded trustee build {digest}",
            src.display()
        );
    }
    // Several test processes may unpack at once: write aside, then rename into place.
    let tmp = dir.join(format!("{name}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, &data.stdout)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&tmp, &out)?;
    Ok(out)
}

/// trustee's KBS on a loopback port with local storage, an open admin API and insecure HTTP
/// (`kbs.toml.in`), killed and reaped on drop.
pub struct Trustee {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Trustee {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What `kbs-client` did.
#[derive(Debug)]
pub struct ClientOutput {
    /// It exited with success.
    pub ok: bool,
    /// Its standard output, trimmed.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

/// Run trustee's `kbs-client --url <url> <args>` in `cwd`.
pub fn kbs_client(url: &str, args: &[&str], cwd: &Path) -> anyhow::Result<ClientOutput> {
    let out = Command::new(program("kbs-client")?)
        .arg("--url")
        .arg(url)
        .args(args)
        .current_dir(cwd)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .context("run kbs-client")?;
    Ok(ClientOutput {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

impl Trustee {
    /// Start a KBS and wait (at most 60 s) until it accepts connections.
    pub fn start() -> anyhow::Result<Trustee> {
        let dir = tempfile::tempdir()?;
        let port = crate::free_port();
        let template = std::fs::read_to_string(fixture().join("kbs.toml.in"))?;
        let storage = dir.path().join("storage");
        let config = template
            .replace("@LISTEN@", &format!("127.0.0.1:{port}"))
            .replace("@STORAGE_DIR@", &storage.to_string_lossy());
        let config_path = dir.path().join("kbs.toml");
        std::fs::write(&config_path, config)?;
        let log = std::fs::File::create(dir.path().join("kbs.log"))?;
        let child = Command::new(program("kbs")?)
            .arg("--config-file")
            .arg(&config_path)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start trustee's kbs")?;
        let mut t = Trustee { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = t.child.try_wait() {
                bail!("trustee's kbs exited ({status}): {}", t.log());
            }
            if Instant::now() > deadline {
                bail!("trustee's kbs did not start within 60 s: {}", t.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(t)
    }

    /// Its base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// What it logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("kbs.log")).unwrap_or_default()
    }

    /// Kill it (a KBS that is down); its port then refuses connections.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `kbs-client config <args>` against it.
    pub fn config(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = kbs_client(&self.url(), &[&["config"], args].concat(), self.dir.path())?;
        if !out.ok {
            bail!("kbs-client config {args:?}: {}", out.stderr);
        }
        Ok(())
    }

    /// Store a resource (`<repo>/<type>/<tag>`).
    pub fn set_resource(&self, path: &str, value: &[u8]) -> anyhow::Result<()> {
        let f = self.dir.path().join("resource");
        std::fs::write(&f, value)?;
        self.config(&[
            "set-resource",
            "--path",
            path,
            "--resource-file",
            &f.to_string_lossy(),
        ])
    }

    /// Replace the resource policy (Rego).
    pub fn set_resource_policy(&self, rego: &str) -> anyhow::Result<()> {
        let f = self.dir.path().join("policy.rego");
        std::fs::write(&f, rego)?;
        self.config(&["set-resource-policy", "--policy-file", &f.to_string_lossy()])
    }
}
