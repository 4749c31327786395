//! Test helpers shared by veil's crates: a real OCI registry process
//! (Debian's `docker-registry`, the CNCF distribution server), a `skopeo`
//! wrapper, free loopback ports, and Confidential Containers' trustee ([`trustee`]).
#![forbid(unsafe_code)]

pub mod trustee;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Path of the registry binary shipped by Debian's `docker-registry` package.
pub const REGISTRY_BINARY: &str = "docker-registry";
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A free TCP port on 127.0.0.1 (the OS picks it; it is released before
/// returning, so a race with other processes is possible but unlikely).
pub fn free_port() -> u16 {
    match TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
        Ok(addr) => addr.port(),
        // Binding to an ephemeral loopback port does not fail on a working
        // machine; fall back to a fixed high port rather than panic.
        Err(_) => 45_000 + (std::process::id() % 10_000) as u16,
    }
}

/// A real OCI registry running on 127.0.0.1 with its own temporary
/// storage. The process is killed (and reaped) on drop.
pub struct TestRegistry {
    child: Child,
    port: u16,
    storage: PathBuf,
    log: PathBuf,
    // Dropped last: holds config, storage and log.
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for TestRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestRegistry")
            .field("host", &self.host())
            .field("storage", &self.storage)
            .finish()
    }
}

impl TestRegistry {
    /// Starts `docker-registry serve <config>` on a free port and waits (up
    /// to 10 s) until `GET /v2/` answers.
    pub fn start() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("veil-test-registry-")
            .tempdir()
            .context("creating a temporary directory for the registry")?;
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage).context("creating registry storage dir")?;
        let log = dir.path().join("registry.log");
        let config = dir.path().join("config.yml");

        // A port can be taken between free_port() and the registry binding
        // it; retry a few times with new ports.
        let mut last_err = None;
        for _ in 0..3 {
            let port = free_port();
            std::fs::write(&config, config_yaml(&storage, port))
                .context("writing registry config")?;
            let log_file = std::fs::File::create(&log).context("creating registry log")?;
            let log_err = log_file.try_clone().context("cloning log handle")?;
            let mut child = match Command::new(REGISTRY_BINARY)
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log_file)
                .stderr(log_err)
                .spawn()
            {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                    "{REGISTRY_BINARY} not found on PATH; install docker-registry: \
                     apt-get install docker-registry"
                ),
                Err(e) => return Err(e).context(format!("spawning {REGISTRY_BINARY}")),
            };
            match wait_ready(&mut child, port, &log) {
                Ok(()) => {
                    return Ok(TestRegistry {
                        child,
                        port,
                        storage,
                        log,
                        _dir: dir,
                    })
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("docker-registry did not start")))
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `127.0.0.1:<port>`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The port the registry listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The registry's storage root directory.
    pub fn storage_dir(&self) -> &Path {
        &self.storage
    }

    /// Path of a blob's data file in the registry's storage
    /// (`docker/registry/v2/blobs/sha256/<2 hex>/<hex>/data`), for tests
    /// that tamper with a blob. `digest` is `sha256:<hex>` (a bare hex is
    /// accepted too).
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let (algo, hex) = digest.split_once(':').unwrap_or(("sha256", digest));
        let prefix: String = hex.chars().take(2).collect();
        self.storage
            .join("docker/registry/v2/blobs")
            .join(algo)
            .join(prefix)
            .join(hex)
            .join("data")
    }

    /// The registry's log output so far (for test failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}

fn wait_ready(child: &mut Child, port: u16, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().context("checking registry process")? {
            bail!(
                "docker-registry exited with {status} before becoming ready; log:\n{}",
                log_tail(log)
            );
        }
        if probe_v2(port) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "docker-registry did not answer GET /v2/ on 127.0.0.1:{port} within {:?}; log:\n{}",
                START_TIMEOUT,
                log_tail(log)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn log_tail(log: &Path) -> String {
    let s = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn config_yaml(storage: &Path, port: u16) -> String {
    format!(
        "version: 0.1\n\
         log:\n  level: warn\n  accesslog:\n    disabled: true\n\
         storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n\
         http:\n  addr: 127.0.0.1:{port}\n",
        storage = storage.display()
    )
}

/// Whether `GET /v2/` on the port gets an HTTP answer.
fn probe_v2(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    ) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let req = format!("GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut buf = [0u8; 12];
    let mut n = 0;
    while n < buf.len() {
        match s.read(&mut buf[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    buf[..n].starts_with(b"HTTP/1.")
}

/// Runs `skopeo` with `args` and returns its stdout; the error carries the
/// exit status and stderr. Copies to a plain-HTTP test registry need
/// `--dest-tls-verify=false` (and `--src-tls-verify=false` from it).
pub fn skopeo(args: &[&str]) -> anyhow::Result<String> {
    let out = match Command::new("skopeo")
        .args(args)
        .stdin(Stdio::null())
        .output()
    {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("skopeo not found on PATH; install it: apt-get install skopeo")
        }
        Err(e) => return Err(e).context("running skopeo"),
    };
    if !out.status.success() {
        bail!(
            "skopeo {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).context("skopeo printed non-UTF-8 output")
}

/// Runs the reference `cosign` tool with `args` and extra environment (e.g. `COSIGN_PASSWORD`),
/// returning stdout+stderr on success; the error carries the exit status and output. Plain-HTTP
/// test registries need `--allow-insecure-registry --allow-http-registry`; there is no
/// transparency log here, so signing needs `--tlog-upload=false` and verifying
/// `--insecure-ignore-tlog=true`.
pub fn cosign(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<String> {
    let out = match Command::new("cosign")
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
    {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("cosign not found on PATH; scripts/install-deps.sh installs it")
        }
        Err(e) => return Err(e).context("running cosign"),
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!(
            "cosign {} failed ({}): {}",
            args.join(" "),
            out.status,
            text.trim()
        );
    }
    Ok(text)
}

/// `cosign generate-key-pair` into `dir`: `<prefix>.key` (encrypted with `password`) and
/// `<prefix>.pub`.
pub fn cosign_key_pair(dir: &Path, prefix: &str, password: &str) -> anyhow::Result<()> {
    let out = Command::new("cosign")
        .args(["generate-key-pair", "--output-key-prefix", prefix])
        .current_dir(dir)
        .env("COSIGN_PASSWORD", password)
        .stdin(Stdio::null())
        .output()
        .context("running cosign (scripts/install-deps.sh installs it)")?;
    if !out.status.success() {
        bail!(
            "cosign generate-key-pair failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_bindable() {
        let p = free_port();
        assert!(p > 0);
        assert!(TcpListener::bind(("127.0.0.1", p)).is_ok());
    }

    #[test]
    fn registry_starts_answers_and_stops() -> anyhow::Result<()> {
        let reg = TestRegistry::start()?;
        assert!(probe_v2(reg.port()));
        assert!(reg.storage_dir().is_dir());
        let p = reg.blob_data_path("sha256:abcdef");
        assert!(p.ends_with("docker/registry/v2/blobs/sha256/ab/abcdef/data"));
        let port = reg.port();
        drop(reg);
        assert!(!probe_v2(port));
        Ok(())
    }
}
