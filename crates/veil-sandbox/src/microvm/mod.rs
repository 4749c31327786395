//! The QEMU microVM backend: each sandbox is a QEMU process booting the veil guest (a kernel
//! and an initrd whose `/init` is veil-agent) by direct kernel boot, with no firmware, no
//! network and no disk. The agent's channel is a virtio-serial port (`veil.0`) whose host side
//! is a unix socket QEMU listens on; QEMU's QMP socket reports when the guest opened the port
//! (readiness) and the process's exit ends the sandbox.
//!
//! The accelerator is KVM when it demonstrably runs the guest — a `/dev/kvm` can exist that
//! does not (a nested host that hangs standard guests) — so [`MicroVmBackend::start`] boots one
//! probe guest under KVM with a time bound and falls back to TCG (software emulation),
//! saying so. Every QEMU gets a parent-death signal, so none outlives the node, and the next
//! start kills and removes whatever an earlier node left in its state directory.

mod qmp;

use crate::{Backend, Error, Exit, Sandbox, SandboxHandle, SandboxKind, SandboxSpec};
use futures::future::{BoxFuture, FutureExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::watch;

pub use qmp::{Qmp, QmpError};

/// Name of the virtio-serial port the agent opens in the guest.
pub const PORT_NAME: &str = "veil.0";

/// Which accelerator to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// KVM if a probe guest boots under it in time, else TCG.
    Auto,
    /// KVM only.
    Kvm,
    /// Software emulation only.
    Tcg,
}

impl std::str::FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "kvm" => Ok(Self::Kvm),
            "tcg" => Ok(Self::Tcg),
            o => Err(format!("accelerator {o:?} is not auto, kvm or tcg")),
        }
    }
}

/// Settings of the microVM backend.
#[derive(Debug, Clone)]
pub struct MicroVmConfig {
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// The guest kernel (bzImage/vmlinuz).
    pub kernel: PathBuf,
    /// The guest initrd (its `/init` is veil-agent).
    pub initrd: PathBuf,
    /// The kernel command line.
    pub append: String,
    /// Machine type and options (`microvm,…` or `q35,…`).
    pub machine: String,
    /// Device arguments for the virtio-serial controller on that machine
    /// (`virtio-serial-device` on microvm's virtio-mmio, `virtio-serial-pci` on q35).
    pub serial_controller: String,
    /// Accelerator choice.
    pub accel: Accel,
    /// Where per-sandbox sockets and pid files live (`<dir>/<id>/`).
    pub state_dir: PathBuf,
    /// How long a guest may take from QEMU's start until its agent opened the port.
    pub boot_timeout: Duration,
    /// How long the KVM probe may take before KVM is declared unusable.
    pub kvm_probe_timeout: Duration,
    /// Appended to the kernel command line under TCG only (e.g. `tsc_early_khz=…`: a microvm
    /// has no kvmclock, HPET or PM timer, and a busy host can make the kernel's TSC
    /// calibration fail and the boot hang). Never part of a measured command line.
    pub tcg_append: Option<String>,
    /// Launch every guest as a confidential VM (SEV-SNP or TDX, with measured direct boot)
    /// instead of a plain microVM; needs the hardware, the kvm parameter, a recent QEMU and
    /// the firmware, which [`MicroVmBackend::start`] checks first.
    #[cfg(feature = "cvm")]
    pub confidential: Option<Confidential>,
}

/// How a confidential guest is launched.
#[cfg(feature = "cvm")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confidential {
    /// AMD SEV-SNP: an OVMF built from edk2's AmdSevX64 and QEMU's CPU model (its signature is
    /// part of the launch measurement, so it must match what the broker registered).
    Snp {
        /// The firmware.
        firmware: PathBuf,
        /// QEMU's CPU model, e.g. `EPYC-v4`.
        cpu_model: String,
    },
    /// Intel TDX with a TDVF.
    Tdx {
        /// The firmware.
        firmware: PathBuf,
    },
}

impl MicroVmConfig {
    /// Defaults for the given guest artifacts: `microvm` with virtio-mmio, automatic
    /// accelerator, a 60 s boot bound (TCG boots a Debian cloud kernel in a few seconds) and a
    /// 20 s KVM probe.
    pub fn new(kernel: PathBuf, initrd: PathBuf, append: String, state_dir: PathBuf) -> Self {
        Self {
            qemu: PathBuf::from("qemu-system-x86_64"),
            kernel,
            initrd,
            append,
            machine: "microvm,x-option-roms=off,isa-serial=on,rtc=on".into(),
            serial_controller: "virtio-serial-device".into(),
            accel: Accel::Auto,
            state_dir,
            boot_timeout: Duration::from_secs(60),
            kvm_probe_timeout: Duration::from_secs(20),
            tcg_append: None,
            #[cfg(feature = "cvm")]
            confidential: None,
        }
    }
}

/// The microVM backend.
pub struct MicroVmBackend {
    config: MicroVmConfig,
    /// `kvm` or `tcg`, as decided at start.
    accel: &'static str,
    /// Every QEMU started and not yet reaped (booting ones too), by sandbox id.
    live: std::sync::Arc<Mutex<std::collections::HashMap<String, u32>>>,
}

fn io_err(id: &str) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        id: id.to_string(),
        source,
    }
}

fn boot_failed(id: &str, reason: impl Into<String>) -> Error {
    Error::Boot {
        id: id.to_string(),
        reason: reason.into(),
    }
}

impl MicroVmBackend {
    /// Check the artifacts and QEMU, clean up what an earlier node left, and pick the
    /// accelerator (probing KVM with a real guest under a time bound).
    pub async fn start(config: MicroVmConfig) -> Result<Self, Error> {
        for (what, p, hint) in [
            ("guest kernel", &config.kernel, "run `veil guest build`"),
            ("guest initrd", &config.initrd, "run `veil guest build`"),
        ] {
            if !p.is_file() {
                return Err(Error::Missing(format!("{what} {} ({hint})", p.display())));
            }
        }
        let version = tokio::process::Command::new(&config.qemu)
            .arg("--version")
            .output()
            .await
            .map_err(|e| {
                Error::Missing(format!(
                    "QEMU {}: {e} (install Debian's qemu-system-x86)",
                    config.qemu.display()
                ))
            })?;
        let version = String::from_utf8_lossy(&version.stdout);
        #[cfg(feature = "cvm")]
        if let Some(c) = &config.confidential {
            let (tee, firmware) = match c {
                Confidential::Snp { firmware, .. } => (crate::cvm::Tee::Snp, firmware),
                Confidential::Tdx { firmware } => (crate::cvm::Tee::Tdx, firmware),
            };
            let probe = crate::cvm::HostProbe::system(&config.qemu, firmware);
            let checked = tokio::task::spawn_blocking(move || crate::cvm::check_host(tee, &probe))
                .await
                .map_err(|e| Error::Missing(e.to_string()))?;
            checked.map_err(|e| Error::Missing(e.to_string()))?;
        }
        std::fs::create_dir_all(&config.state_dir).map_err(io_err("-"))?;
        let cleaned = clean_leftovers(&config.state_dir);
        if cleaned > 0 {
            tracing::info!(cleaned, "removed microVMs left by an earlier node");
        }
        let mut me = Self {
            config,
            accel: "tcg",
            live: Default::default(),
        };
        me.accel = match me.config.accel {
            _ if me.confidential() => "kvm",
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
            Accel::Auto => me.probe_kvm().await,
        };
        tracing::info!(
            accelerator = me.accel,
            qemu = version.lines().next().unwrap_or(""),
            machine = %me.config.machine,
            "microVM backend ready"
        );
        Ok(me)
    }

    /// Boot one guest under KVM and see whether its agent opens its port in time.
    async fn probe_kvm(&self) -> &'static str {
        if !Path::new("/dev/kvm").exists() {
            tracing::info!("no /dev/kvm: microVMs use TCG (software emulation)");
            return "tcg";
        }
        let id = format!("kvmprobe{:08x}", rand_u32());
        let started = std::time::Instant::now();
        let res = self
            .boot(&id, "kvm", 1, 128 << 20, self.config.kvm_probe_timeout)
            .await;
        match res {
            Ok(sb) => {
                let _ = sb.handle.destroy().await;
                tracing::info!(
                    ms = started.elapsed().as_millis() as u64,
                    "KVM runs the guest: microVMs use KVM"
                );
                "kvm"
            }
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "KVM did not boot the probe guest in time: microVMs fall back to TCG \
                     (software emulation, much slower)"
                );
                "tcg"
            }
        }
    }

    fn confidential(&self) -> bool {
        #[cfg(feature = "cvm")]
        return self.config.confidential.is_some();
        #[cfg(not(feature = "cvm"))]
        false
    }

    /// The launch arguments: a plain microVM's, or — for a confidential guest — the SNP/TDX
    /// arguments (q35, memfd memory, the guest object, firmware and measured direct boot)
    /// followed by the same channel, QMP and console as a microVM's (virtio-serial on PCI).
    fn launch_args(
        &self,
        dir: &Path,
        accel: &str,
        vcpus: u32,
        memory_bytes: u64,
    ) -> Result<Vec<String>, Error> {
        #[cfg(feature = "cvm")]
        if let Some(conf) = &self.config.confidential {
            let c = &self.config;
            let mib = (memory_bytes >> 20).max(64);
            let base = match conf {
                Confidential::Snp {
                    firmware,
                    cpu_model,
                } => {
                    let mut g = crate::cvm::qemu::SnpGuest::new(firmware, &c.kernel, mib, vcpus);
                    g.initrd = Some(&c.initrd);
                    g.append = Some(&c.append);
                    g.cpu_model = cpu_model;
                    crate::cvm::qemu::snp_args(&g)
                }
                Confidential::Tdx { firmware } => {
                    crate::cvm::qemu::tdx_args(&crate::cvm::qemu::TdxGuest {
                        memory_mib: mib,
                        vcpus,
                        firmware,
                        kernel: &c.kernel,
                        initrd: Some(&c.initrd),
                        append: Some(&c.append),
                    })
                }
            }
            .map_err(|e| Error::Missing(e.to_string()))?;
            let mut args: Vec<String> = base
                .into_iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            // q35 has PCI, not microvm's virtio-mmio.
            args.extend(self.host_args(dir, "virtio-serial-pci"));
            return Ok(args);
        }
        Ok(self.args(dir, accel, vcpus, memory_bytes))
    }

    /// A plain microVM's arguments: its machine, CPU, memory and boot, then the host side
    /// every guest shares ([`Self::host_args`]).
    fn args(&self, dir: &Path, accel: &str, vcpus: u32, memory_bytes: u64) -> Vec<String> {
        let c = &self.config;
        let mib = (memory_bytes >> 20).max(64);
        let cpu = if accel == "kvm" { "host" } else { "max" };
        let mut args: Vec<String> = vec![
            "-machine".into(),
            c.machine.clone(),
            "-accel".into(),
            accel.into(),
            "-cpu".into(),
            cpu.into(),
            "-smp".into(),
            vcpus.max(1).to_string(),
            "-m".into(),
            format!("{mib}M"),
            "-kernel".into(),
            c.kernel.display().to_string(),
            "-initrd".into(),
            c.initrd.display().to_string(),
            "-append".into(),
            match (&c.tcg_append, accel) {
                (Some(extra), "tcg") => format!("{} {extra}", c.append),
                _ => c.append.clone(),
            },
        ];
        args.extend(self.host_args(dir, &c.serial_controller));
        args
    }

    /// What every guest has on the host side, plain or confidential: its name, no default
    /// devices, a paused start, the serial console on stdout, the agent's virtio-serial
    /// channel (on `serial_controller`), QMP and a pid file.
    fn host_args(&self, dir: &Path, serial_controller: &str) -> Vec<String> {
        let channel = dir.join("channel.sock");
        let qmp = dir.join("qmp.sock");
        vec![
            "-name".into(),
            format!(
                "veil-{}",
                dir.file_name().and_then(|n| n.to_str()).unwrap_or("vm")
            ),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-nographic".into(),
            "-no-reboot".into(),
            "-S".into(),
            "-serial".into(),
            "stdio".into(),
            "-chardev".into(),
            format!(
                "socket,id=veil0,path={},server=on,wait=off",
                channel.display()
            ),
            "-device".into(),
            serial_controller.into(),
            "-device".into(),
            format!("virtserialport,chardev=veil0,name={PORT_NAME},id=veilport"),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qmp.display()),
            "-pidfile".into(),
            dir.join("qemu.pid").display().to_string(),
        ]
    }

    async fn boot(
        &self,
        id: &str,
        accel: &str,
        vcpus: u32,
        memory_bytes: u64,
        timeout: Duration,
    ) -> Result<Sandbox, Error> {
        let dir = self.config.state_dir.join(id);
        std::fs::create_dir_all(&dir).map_err(io_err(id))?;
        let mut guard = DirGuard(Some(dir.clone()));
        let mut cmd = tokio::process::Command::new(&self.config.qemu);
        cmd.args(self.launch_args(&dir, accel, vcpus, memory_bytes)?)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // SAFETY: runs in the forked child before exec; prctl is async-signal-safe and only
        // sets this child's parent-death signal, so QEMU dies with the node.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let started = std::time::Instant::now();
        let mut child = cmd.spawn().map_err(|source| Error::Spawn {
            id: id.to_string(),
            source,
        })?;
        let pid = child.id();
        if let (Some(p), Ok(mut live)) = (pid, self.live.lock()) {
            live.insert(id.to_string(), p);
        }
        let live = self.live.clone();
        let mut stdout = child.stdout.take();
        let mut stderr = child.stderr.take();
        let wid = id.to_string();
        let exit_rx = crate::watch_exit(child, id.to_string(), "QEMU", move || {
            if let Ok(mut l) = live.lock() {
                l.remove(&wid);
            }
        });
        let handle = VmHandle {
            id: id.to_string(),
            dir: dir.clone(),
            pid,
            exit_rx,
            destroyed: Mutex::new(false),
        };
        guard.0 = None;
        let deadline = tokio::time::Instant::now() + timeout;
        let ready = self.wait_ready(&dir, deadline, &handle).await;
        let channel = match ready {
            Ok(c) => c,
            Err(e) => {
                // Name what QEMU said, then leave nothing behind.
                let mut said = String::new();
                if let Some(err) = stderr.as_mut() {
                    use tokio::io::AsyncReadExt;
                    let mut buf = vec![0u8; 4096];
                    if let Ok(Ok(n)) =
                        tokio::time::timeout(Duration::from_millis(200), err.read(&mut buf)).await
                    {
                        said = String::from_utf8_lossy(&buf[..n]).trim().to_string();
                    }
                }
                let console = match stdout.as_mut() {
                    Some(out) => console_tail(out).await,
                    None => String::new(),
                };
                let _ = handle.do_destroy().await;
                let mut reason = e.to_string();
                if !said.is_empty() {
                    reason.push_str(&format!("; QEMU said: {said}"));
                }
                if !console.is_empty() {
                    reason.push_str(&format!("; guest console ends: {console}"));
                }
                return Err(boot_failed(id, reason));
            }
        };
        tracing::debug!(
            sandbox = id,
            accel,
            ms = started.elapsed().as_millis() as u64,
            "microVM agent opened its port"
        );
        // QEMU's own complaints after boot go to the debug log.
        if let Some(err) = stderr {
            let sid = id.to_string();
            tokio::spawn(async move {
                use tokio::io::AsyncBufReadExt;
                let mut lines = tokio::io::BufReader::new(err).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    tracing::debug!(sandbox = %sid, "qemu: {l}");
                }
            });
        }
        Ok(Sandbox {
            id: id.to_string(),
            channel: Box::new(channel),
            console: stdout.map(|s| Box::pin(s) as crate::Console),
            handle: Box::new(handle),
        })
    }

    /// Connect QMP, start the (paused) guest, connect the channel socket, and wait until the
    /// guest's agent opened its port — or QEMU exits, or the deadline passes.
    async fn wait_ready(
        &self,
        dir: &Path,
        deadline: tokio::time::Instant,
        handle: &VmHandle,
    ) -> Result<tokio::net::UnixStream, String> {
        let work = async {
            let mut q = Qmp::connect(&dir.join("qmp.sock"), deadline)
                .await
                .map_err(|e| e.to_string())?;
            let channel = loop {
                match tokio::net::UnixStream::connect(dir.join("channel.sock")).await {
                    Ok(s) => break s,
                    Err(e) if tokio::time::Instant::now() >= deadline => {
                        return Err(format!("channel socket: {e}"))
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            };
            q.execute("cont", serde_json::json!({}))
                .await
                .map_err(|e| e.to_string())?;
            q.wait_event("VSERPORT_CHANGE", |d| {
                d.get("open").and_then(|o| o.as_bool()) == Some(true)
            })
            .await
            .map_err(|e| e.to_string())?;
            Ok(channel)
        };
        tokio::select! {
            r = tokio::time::timeout_at(deadline, work) => match r {
                Ok(r) => r,
                Err(_) => Err("the guest's agent did not open its channel in time".into()),
            },
            exit = handle.exited() => Err(format!("QEMU exited ({exit}) before the guest's agent was up")),
        }
    }
}

/// The last lines the guest printed on its console (what is buffered now), for an error.
async fn console_tail(out: &mut tokio::process::ChildStdout) -> String {
    use tokio::io::AsyncReadExt;
    let mut all = Vec::new();
    let mut buf = vec![0u8; 16 << 10];
    while all.len() < (256 << 10) {
        match tokio::time::timeout(Duration::from_millis(100), out.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => all.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&all);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(6)..].join(" | ")
}

fn rand_u32() -> u32 {
    // Probe ids only need to differ from sandbox ids (which are 16 hex digits).
    std::process::id()
        ^ (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0))
}

/// Kill the QEMUs of sandbox directories an earlier node left under `state_dir` (only
/// processes whose command line names that directory) and remove the directories.
fn clean_leftovers(state_dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(state_dir) else {
        return 0;
    };
    let mut n = 0;
    for e in entries.flatten() {
        let dir = e.path();
        if !dir.is_dir() {
            continue;
        }
        if let Some(pid) = read_pid(&dir.join("qemu.pid")) {
            if process_names(pid, &dir) {
                // SAFETY: kill(2) on a pid whose command line names this sandbox directory.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
                for _ in 0..200 {
                    if !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        if std::fs::remove_dir_all(&dir).is_ok() {
            n += 1;
        }
    }
    n
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Whether process `pid` runs with `dir` in its command line (so it is that sandbox's QEMU and
/// not an unrelated process that reused the pid).
fn process_names(pid: i32, dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let needle = dir.as_os_str().as_encoded_bytes();
    cmdline.windows(needle.len()).any(|w| w == needle)
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(')')
                .next()
                .map(|r| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

struct DirGuard(Option<PathBuf>);

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

struct VmHandle {
    id: String,
    dir: PathBuf,
    pid: Option<u32>,
    exit_rx: watch::Receiver<Option<Exit>>,
    destroyed: Mutex<bool>,
}

impl VmHandle {
    fn alive(&self) -> bool {
        self.exit_rx.borrow().is_none()
    }

    async fn do_destroy(&self) -> Result<(), Error> {
        if self.alive() {
            if let Some(pid) = self.pid.and_then(|p| i32::try_from(p).ok()) {
                // SAFETY: kill(2) on our own child QEMU, not yet reaped (the waiter reports
                // the exit only after reaping), so the pid is still ours.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        let ended = tokio::time::timeout(Duration::from_secs(10), self.exited()).await;
        if ended.is_err() {
            return Err(Error::Lingering {
                id: self.id.clone(),
                pids: self.pid.into_iter().collect(),
            });
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(Error::Io {
                    id: self.id.clone(),
                    source: e,
                });
            }
        }
        if let Ok(mut d) = self.destroyed.lock() {
            *d = true;
        }
        Ok(())
    }
}

impl SandboxHandle for VmHandle {
    fn destroy(&self) -> BoxFuture<'_, Result<(), Error>> {
        self.do_destroy().boxed()
    }

    fn exited(&self) -> BoxFuture<'_, Exit> {
        crate::wait_exit(&self.exit_rx)
    }

    fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        if self.alive() {
            left.push(format!("QEMU process {:?}", self.pid));
        }
        if self.dir.exists() {
            left.push(format!("directory {}", self.dir.display()));
        }
        left
    }

    fn pids(&self) -> Vec<u32> {
        if self.alive() {
            self.pid.into_iter().collect()
        } else {
            Vec::new()
        }
    }
}

impl Backend for MicroVmBackend {
    fn name(&self) -> &'static str {
        if self.confidential() {
            "cvm"
        } else {
            "microvm"
        }
    }

    fn kind(&self) -> SandboxKind {
        SandboxKind {
            backend: self.name().into(),
            accelerator: Some(self.accel.into()),
        }
    }

    fn boot_timeout(&self) -> Duration {
        // The backend returns only once the agent opened its port; the node's health check
        // after that needs little more.
        Duration::from_secs(10)
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        async move {
            let pids: Vec<u32> = match self.live.lock() {
                Ok(l) => l.values().copied().collect(),
                Err(_) => Vec::new(),
            };
            for pid in pids {
                if let Ok(pid) = i32::try_from(pid) {
                    // SAFETY: kill(2) on a QEMU this backend spawned and has not reaped yet
                    // (its waiter removes it from `live` only after reaping).
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
            for _ in 0..1000 {
                if self.live.lock().map(|l| l.is_empty()).unwrap_or(true) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tracing::warn!("some QEMU processes did not end within 10 s of the shutdown");
        }
        .boxed()
    }

    fn create(&self, spec: SandboxSpec) -> BoxFuture<'_, Result<Sandbox, Error>> {
        async move {
            let vcpus = spec.cpu_millis.div_ceil(1000).max(1);
            self.boot(
                &spec.id,
                self.accel,
                vcpus,
                spec.memory_bytes,
                self.config.boot_timeout,
            )
            .await
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_has_the_channel_qmp_and_no_network() {
        let cfg = MicroVmConfig::new(
            "/k".into(),
            "/i".into(),
            "console=ttyS0".into(),
            "/state".into(),
        );
        let mut cfg = cfg;
        cfg.tcg_append = Some("tsc_early_khz=2000000".into());
        let b = MicroVmBackend {
            config: cfg,
            accel: "tcg",
            live: Default::default(),
        };
        let a = b
            .args(Path::new("/state/ab12"), "tcg", 2, 256 << 20)
            .join(" ");
        for want in [
            "-machine microvm,",
            "-accel tcg",
            "-cpu max",
            "-smp 2",
            "-m 256M",
            "-nodefaults",
            "-no-reboot",
            " -S ",
            "-chardev socket,id=veil0,path=/state/ab12/channel.sock,server=on,wait=off",
            "-device virtserialport,chardev=veil0,name=veil.0,id=veilport",
            "-qmp unix:/state/ab12/qmp.sock,server=on,wait=off",
        ] {
            assert!(a.contains(want), "{want} missing from {a}");
        }
        assert!(!a.contains("-netdev") && !a.contains("-nic"), "{a}");
        assert!(a.contains("console=ttyS0 tsc_early_khz=2000000"), "{a}");
        let k = b.args(Path::new("/state/x"), "kvm", 1, 1 << 20).join(" ");
        assert!(k.contains("-cpu host") && k.contains("-m 64M"), "{k}");
        assert!(
            !k.contains("tsc_early_khz"),
            "TCG-only parameter under KVM: {k}"
        );
    }

    /// A confidential guest gets the SNP (or TDX) launch arguments and the same channel, QMP
    /// and console as a microVM, with virtio-serial on PCI (q35), and never a debug policy.
    #[cfg(feature = "cvm")]
    #[test]
    fn confidential_guests_keep_the_channel_on_q35() {
        let mut cfg = MicroVmConfig::new(
            "/k".into(),
            "/i".into(),
            "console=ttyS0".into(),
            "/state".into(),
        );
        cfg.tcg_append = Some("tsc_early_khz=1".into());
        cfg.confidential = Some(Confidential::Snp {
            firmware: "/fw/OVMF.amdsev.fd".into(),
            cpu_model: "EPYC-Milan".into(),
        });
        let b = MicroVmBackend {
            config: cfg.clone(),
            accel: "kvm",
            live: Default::default(),
        };
        assert_eq!(b.name(), "cvm");
        let a = b
            .launch_args(Path::new("/state/ab12"), "kvm", 2, 512 << 20)
            .unwrap()
            .join(" ");
        for want in [
            "-accel kvm",
            "-machine q35,confidential-guest-support=sev0,memory-backend=ram1",
            "sev-snp-guest,id=sev0,cbitpos=51,reduced-phys-bits=1,kernel-hashes=on,policy=0x30000",
            "-cpu EPYC-Milan",
            "-bios /fw/OVMF.amdsev.fd",
            "-device virtio-serial-pci",
            "-device virtserialport,chardev=veil0,name=veil.0,id=veilport",
            "-qmp unix:/state/ab12/qmp.sock,server=on,wait=off",
            " -S ",
        ] {
            assert!(a.contains(want), "{want} missing from {a}");
        }
        for never in [
            "virtio-serial-device",
            "-cpu max",
            "-cpu host",
            "microvm",
            "tsc_early_khz",
        ] {
            assert!(!a.contains(never), "{never} in {a}");
        }
        assert_eq!(a.matches("-machine").count(), 1, "{a}");
        cfg.confidential = Some(Confidential::Tdx {
            firmware: "/fw/TDVF.fd".into(),
        });
        let b = MicroVmBackend {
            config: cfg,
            accel: "kvm",
            live: Default::default(),
        };
        let a = b
            .launch_args(Path::new("/state/cd34"), "kvm", 1, 256 << 20)
            .unwrap()
            .join(" ");
        assert!(
            a.contains("tdx-guest,id=tdx0") && a.contains("-device virtio-serial-pci"),
            "{a}"
        );
    }

    /// On a host without SEV-SNP (this one), starting a confidential backend refuses, naming
    /// what is missing.
    #[cfg(feature = "cvm")]
    #[tokio::test]
    async fn a_confidential_backend_refuses_a_host_without_the_hardware() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("vmlinuz");
        let i = dir.path().join("initrd.img");
        std::fs::write(&k, b"k").unwrap();
        std::fs::write(&i, b"i").unwrap();
        let mut cfg = MicroVmConfig::new(k, i, String::new(), dir.path().join("vms"));
        cfg.confidential = Some(Confidential::Snp {
            firmware: dir.path().join("missing-ovmf.fd"),
            cpu_model: "EPYC-v4".into(),
        });
        if std::path::Path::new("/dev/sev").exists() {
            return; // a real SNP host: the refusal below is not what happens there
        }
        let e = MicroVmBackend::start(cfg).await.err().unwrap().to_string();
        assert!(e.contains("SEV-SNP") && e.contains("/dev/sev"), "{e}");
    }

    #[test]
    fn leftovers_of_an_earlier_node_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let sb = dir.path().join("0123456789abcdef");
        std::fs::create_dir_all(&sb).unwrap();
        // A pid file naming a process that is not this sandbox's QEMU (this test itself):
        // the directory goes, the process is left alone.
        std::fs::write(sb.join("qemu.pid"), std::process::id().to_string()).unwrap();
        assert_eq!(clean_leftovers(dir.path()), 1);
        assert!(!sb.exists());
    }

    #[test]
    fn accelerators_parse() {
        assert_eq!("auto".parse::<Accel>(), Ok(Accel::Auto));
        assert_eq!("tcg".parse::<Accel>(), Ok(Accel::Tcg));
        assert!("hvf".parse::<Accel>().is_err());
    }
}
