//! The agent as a VM guest's `/init`: the guest platform layer.
//!
//! The kernel unpacks the initrd (built by `veil guest build`) into its initial root and runs
//! `/init` — this binary — as PID 1 with `/dev/console` as stdio. [`main`] then does what the
//! namespace sandbox's [`crate::nsinit`] does with namespaces, with a VM's means:
//! - mounts `/proc`, `/sys`, devtmpfs on `/dev`, a tmpfs on `/tmp`, configfs on
//!   `/sys/kernel/config` (configfs-tsm attestation reports), and a tmpfs on
//!   [`crate::server::ROOTFS`] where the image is unpacked (guest memory, which a confidential
//!   VM's host cannot read);
//! - loads the kernel modules the initrd lists in [`MODULES_LIST`] (virtio transports, the
//!   virtio console, configfs), in that order;
//! - sets the hostname and brings up `lo`.
//!
//! Then PID 1 forks. The child is the agent proper: a child subreaper (so the function's
//! orphans are still reaped by the same [`crate::function::Reaper`] as in a namespace sandbox)
//! with the agent's seccomp filter, serving [`crate::server::serve`] — the same code as the
//! namespace sandbox — on the virtio-serial port named [`PORT_NAME`]. PID 1 itself only waits:
//! when the agent ends, for whatever reason (its function exited, the node closed the channel,
//! an error, a panic), PID 1 syncs and powers the guest off. PID 1 never exits, which would
//! panic the kernel.
//!
//! Kernel command line parameters read here: `veil.port=<name>` (default [`PORT_NAME`]) and
//! `veil.log=<filter>` (like `VEIL_LOG`).

use anyhow::{bail, Context, Result};
use nix::mount::{mount, MsFlags};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};
use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{ready, Context as TaskContext, Poll};
use std::time::{Duration, Instant};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Name of the virtio-serial port (QEMU: `-device virtserialport,name=veil.0`) the agent's
/// channel runs on.
pub const PORT_NAME: &str = "veil.0";

/// The initrd's list of kernel modules to load, one absolute path a line, in load order.
pub const MODULES_LIST: &str = "/etc/veil/modules";

/// How long the agent waits for its port to appear before giving up (and powering off).
const PORT_TIMEOUT: Duration = Duration::from_secs(60);

/// Set in the guest's PID 1 before the agent is forked, so the agent (no longer PID 1) knows.
static IN_GUEST: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this agent runs in a VM guest (set by [`main`], inherited by the forked agent).
pub fn in_guest() -> bool {
    IN_GUEST.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether this process is a guest's `/init`: PID 1, started by the kernel as `/init` (or
/// explicitly as `veil-agent guest`, e.g. with `rdinit=` naming another path).
pub fn is_guest_init(argv0: Option<&str>, first_arg: Option<&str>) -> bool {
    std::process::id() == 1 && (argv0 == Some("/init") || first_arg == Some("guest"))
}

/// Settings from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestOptions {
    /// The virtio-serial port name of the channel.
    pub port: String,
    /// A log filter (`veil.log=`).
    pub log: Option<String>,
}

/// Parse `veil.*` parameters out of `/proc/cmdline`.
pub fn parse_cmdline(cmdline: &str) -> GuestOptions {
    let mut o = GuestOptions {
        port: PORT_NAME.to_string(),
        log: None,
    };
    for word in cmdline.split_whitespace() {
        if word == "--" {
            break;
        }
        if let Some(v) = word.strip_prefix("veil.port=") {
            if !v.is_empty() {
                o.port = v.to_string();
            }
        } else if let Some(v) = word.strip_prefix("veil.log=") {
            o.log = Some(v.to_string());
        }
    }
    o
}

/// Run as the guest's PID 1. Never returns: the guest powers off when the agent ends.
pub fn main() -> ! {
    if std::process::id() != 1 {
        eprintln!("veil-agent guest: not PID 1; this mode is the /init of a veil VM guest");
        std::process::exit(2);
    }
    IN_GUEST.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Err(e) = mount_early() {
        eprintln!("veil-agent: guest setup failed: {e:#}");
        power_off();
    }
    let opts = parse_cmdline(&fs::read_to_string("/proc/cmdline").unwrap_or_default());
    if let Some(filter) = &opts.log {
        // Single-threaded still: nothing reads the environment concurrently.
        std::env::set_var("VEIL_LOG", filter);
    }
    crate::init_logging();
    if let Err(e) = setup() {
        tracing::error!("guest setup failed: {e:#}; powering off");
        power_off();
    }
    // Still single-threaded (no runtime, no helper thread yet), so the child may run anything.
    // SAFETY: no other thread exists in this process at this point.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            let code = match agent(&opts) {
                Ok(()) => 0,
                Err(e) => {
                    tracing::error!("agent stopped: {e:#}");
                    1
                }
            };
            std::process::exit(code);
        }
        Ok(ForkResult::Parent { child }) => supervise(child),
        Err(e) => {
            tracing::error!("cannot fork the agent: {e}; powering off");
            power_off();
        }
    }
}

/// `/proc`, `/sys` and `/dev`: what everything after needs (the command line, module loading,
/// the port's sysfs entry and device node).
fn mount_early() -> Result<()> {
    let none: Option<&str> = None;
    let hardened = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(Some("proc"), "/proc", Some("proc"), hardened, none).context("mount /proc")?;
    mount(Some("sysfs"), "/sys", Some("sysfs"), hardened, none).context("mount /sys")?;
    mount(
        Some("devtmpfs"),
        "/dev",
        Some("devtmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0755"),
    )
    .context("mount devtmpfs on /dev")?;
    Ok(())
}

fn setup() -> Result<()> {
    let started = Instant::now();
    let none: Option<&str> = None;
    let loaded = load_modules(Path::new(MODULES_LIST))?;
    let hardened = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    // configfs-tsm (a kernel's TSM reports) lives here; a kernel without configfs only lacks
    // that way of attesting.
    if let Err(e) = mount(
        Some("configfs"),
        "/sys/kernel/config",
        Some("configfs"),
        hardened,
        none,
    ) {
        tracing::warn!("cannot mount configfs on /sys/kernel/config: {e}");
    }
    mount(
        Some("tmpfs"),
        "/tmp",
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )
    .context("mount tmpfs on /tmp")?;
    // The function's root: a tmpfs of its own, so it is a mount point like the namespace
    // sandbox's and nothing of the initrd is under it.
    let rootfs = Path::new(crate::server::ROOTFS);
    fs::create_dir_all(rootfs).with_context(|| format!("mkdir {}", rootfs.display()))?;
    mount(
        Some("tmpfs"),
        rootfs,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )
    .with_context(|| format!("mount tmpfs on {}", rootfs.display()))?;
    nix::unistd::sethostname("veil").context("set hostname")?;
    crate::nsinit::loopback_up().context("bring up loopback")?;
    tracing::info!(
        modules = loaded,
        ms = started.elapsed().as_millis() as u64,
        uptime_ms = uptime_ms(),
        "guest ready: filesystems mounted, modules loaded, loopback up"
    );
    Ok(())
}

/// Load every module `list` names, in order. A module that is already there (built in, or
/// loaded as another's dependency) is fine; one that fails is logged and skipped — the guest
/// may still work (an optional confidential-guest driver refuses to load on other hosts), and
/// a missing essential one shows as a clear error later (no port).
fn load_modules(list: &Path) -> Result<usize> {
    let text = match fs::read_to_string(list) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("read {}", list.display())),
    };
    let mut loaded = 0;
    for path in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let res = fs::File::open(path).and_then(|f| {
            nix::kmod::finit_module(&f, c"", nix::kmod::ModuleInitFlags::empty())
                .map_err(std::io::Error::from)
        });
        match res {
            Ok(()) => loaded += 1,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => tracing::warn!(module = path, "cannot load kernel module: {e}"),
        }
    }
    Ok(loaded)
}

/// PID 1 after the fork: reap everything until the agent is gone, then power off.
fn supervise(agent: Pid) -> ! {
    loop {
        match waitpid(Pid::from_raw(-1), None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == agent => {
                tracing::info!(code, "agent exited; powering the guest off");
                break;
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == agent => {
                tracing::error!(signal = %sig, "agent killed; powering the guest off");
                break;
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                tracing::error!("waiting for the agent: {e}; powering the guest off");
                break;
            }
        }
    }
    power_off()
}

/// Flush filesystems and power the guest off. If the firmware interface refuses, reboot
/// (QEMU's `-no-reboot` turns that into an exit too); if even that fails, idle forever rather
/// than let PID 1 exit.
pub fn power_off() -> ! {
    nix::unistd::sync();
    let e = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    eprintln!("veil-agent: power off failed ({e:?}); rebooting");
    let e = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    eprintln!("veil-agent: reboot failed ({e:?}); halting here");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// The agent proper, in PID 1's child.
fn agent(opts: &GuestOptions) -> Result<()> {
    // Orphans of the function are re-parented to us, not to PID 1: the server's reaper
    // reaps them, as PID 1 does in a namespace sandbox.
    nix::sys::prctl::set_child_subreaper(true).context("become a child subreaper")?;
    crate::seccomp::apply_agent_filter().context("install the agent's seccomp filter")?;
    crate::attest::precompute_software_measurement();
    let path = wait_for_port(&opts.port, PORT_TIMEOUT)?;
    let port = PortFd::open(&path)?;
    wait_host_connected(&port.fd);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the runtime")?;
    rt.block_on(async move {
        let stream = Port::new(port).context("register the port with the runtime")?;
        tracing::info!(
            port = %path.display(),
            uptime_ms = uptime_ms(),
            "agent serving on the virtio-serial port"
        );
        crate::server::serve(stream, Path::new(crate::server::ROOTFS)).await
    })
}

/// Find `/dev/vportNpM` whose sysfs name is `name`. The console driver creates ports when the
/// host announces them, shortly after the module is loaded, so this polls.
fn wait_for_port(name: &str, timeout: Duration) -> Result<PathBuf> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(p) = find_port(Path::new("/sys/class/virtio-ports"), name) {
            if p.exists() {
                return Ok(p);
            }
        }
        if Instant::now() >= deadline {
            bail!("no virtio-serial port named {name:?} appeared within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `/dev/<port>` for the entry of `class_dir` whose `name` file holds `name`.
fn find_port(class_dir: &Path, name: &str) -> Option<PathBuf> {
    for e in fs::read_dir(class_dir).ok()?.flatten() {
        let Ok(n) = fs::read_to_string(e.path().join("name")) else {
            continue;
        };
        if n.trim_end() == name {
            return Some(Path::new("/dev").join(e.file_name()));
        }
    }
    None
}

/// Until the host side of the port is connected, the console driver reports end of file on
/// reads (and hang-up on poll): wait for the connection before handing the port to the mux.
fn wait_host_connected(fd: &OwnedFd) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let started = Instant::now();
    let mut said = false;
    loop {
        let mut fds = [PollFd::new(
            fd.as_fd(),
            PollFlags::POLLIN | PollFlags::POLLOUT,
        )];
        let hup = match poll(&mut fds, PollTimeout::ZERO) {
            Ok(_) => fds[0]
                .revents()
                .is_some_and(|r| r.contains(PollFlags::POLLHUP)),
            Err(_) => true,
        };
        if !hup {
            return;
        }
        if !said && started.elapsed() > Duration::from_secs(1) {
            tracing::info!("waiting for the host to connect to the port");
            said = true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The port's file descriptor, opened non-blocking.
struct PortFd {
    fd: OwnedFd,
}

impl PortFd {
    fn open(path: &Path) -> Result<Self> {
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)
            .with_context(|| format!("open {}", path.display()))?;
        Ok(Self { fd: f.into() })
    }
}

/// A virtio-serial port as a tokio byte stream: the console driver supports poll, so the
/// non-blocking descriptor is driven by the runtime's reactor (edge-triggered epoll) like a
/// socket. End of file means the host closed its side.
pub struct Port {
    fd: AsyncFd<OwnedFd>,
}

impl Port {
    fn new(p: PortFd) -> std::io::Result<Self> {
        // SAFETY: the OwnedFd is moved into the AsyncFd, which owns it from now on: it stays
        // open and names the same port until the AsyncFd is dropped, and nothing else closes
        // or replaces it.
        let fd = unsafe { AsyncFd::register(p.fd) }.map_err(|e| e.into_parts().1)?;
        Ok(Self { fd })
    }
}

impl AsyncRead for Port {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| {
                nix::unistd::read(fd.get_ref(), unfilled).map_err(std::io::Error::from)
            }) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for Port {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard
                .try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(std::io::Error::from))
            {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        // Every write is handed to the device at once.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        // A port has no half-close; the host sees the end when the guest powers off.
        Poll::Ready(Ok(()))
    }
}

/// Milliseconds since the kernel started (`/proc/uptime`), for boot timing in the log.
fn uptime_ms() -> u64 {
    fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map(|s| (s * 1000.0) as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline() {
        let o = parse_cmdline("console=ttyS0 quiet panic=-1\n");
        assert_eq!(o.port, PORT_NAME);
        assert_eq!(o.log, None);
        let o = parse_cmdline("quiet veil.port=veil.7 veil.log=debug,yamux=warn -- veil.port=x");
        assert_eq!(o.port, "veil.7");
        assert_eq!(o.log.as_deref(), Some("debug,yamux=warn"));
        assert_eq!(parse_cmdline("veil.port=").port, PORT_NAME);
    }

    #[test]
    fn port_lookup() {
        let d = std::env::temp_dir().join(format!("veil-agent-ports-{}", std::process::id()));
        for (dir, name) in [
            ("vport0p0", "org.qemu.guest_agent.0\n"),
            ("vport0p1", "veil.0\n"),
        ] {
            fs::create_dir_all(d.join(dir)).unwrap();
            fs::write(d.join(dir).join("name"), name).unwrap();
        }
        fs::create_dir_all(d.join("vport1p1")).unwrap();
        assert_eq!(
            find_port(&d, "veil.0"),
            Some(PathBuf::from("/dev/vport0p1"))
        );
        assert_eq!(find_port(&d, "veil.1"), None);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn not_guest_init_here() {
        assert!(!is_guest_init(Some("/init"), None));
    }
}
