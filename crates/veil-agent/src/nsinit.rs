//! Turning a freshly unshared process into the PID 1 of a sandbox with a private root.
//!
//! The node spawned us with new mount, PID, network, UTS, IPC and cgroup namespaces already
//! unshared. A PID namespace takes effect for children only, so [`become_pid1`] forks: the
//! parent stays outside, waits, and mirrors the child's exit status; the child is PID 1. Then
//! [`setup_root`] gives PID 1 a root of its own: a size-limited tmpfs holding only `/dev` (a few
//! safe device nodes), `/proc`, `/tmp` and `/rootfs` (where the image will be unpacked), and
//! pivots into it so nothing of the host's filesystem remains reachable.

use crate::SandboxArgs;
use anyhow::{bail, Context, Result};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, pivot_root, sethostname, ForkResult};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Device nodes made visible inside a sandbox (bind-mounted from the host's `/dev`).
pub const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom"];

/// Fork; the child returns as PID 1 of the new PID namespace, the parent never returns.
pub fn become_pid1() -> Result<()> {
    // SAFETY: called from `main` before any thread is started, so the child may run arbitrary
    // code after the fork.
    match unsafe { fork() }.context("fork into the new PID namespace")? {
        ForkResult::Child => {
            // If the outer process is killed (that is how the node destroys a sandbox), the
            // kernel kills us, and with us every process in our PID namespace.
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .context("set parent-death signal")?;
            if nix::unistd::getpid().as_raw() != 1 {
                bail!("not PID 1 after fork: the PID namespace was not unshared");
            }
            Ok(())
        }
        ForkResult::Parent { child } => {
            // The outer process has no use for the channel; only PID 1 holds it.
            // SAFETY: closing our copy of fd 3; nothing else in this process uses it.
            unsafe {
                libc::close(3);
            }
            let code = loop {
                match waitpid(child, None) {
                    Ok(WaitStatus::Exited(_, c)) => break c,
                    Ok(WaitStatus::Signaled(_, s, _)) => break 128 + s as i32,
                    Ok(_) => continue,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(_) => break 1,
                }
            };
            std::process::exit(code);
        }
    }
}

/// Build the private root on `args.root_dir` and pivot into it.
pub fn setup_root(args: &SandboxArgs) -> Result<()> {
    let none: Option<&str> = None;
    // Nothing we mount may propagate back to the host.
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .context("make mounts private")?;
    let root = args.root_dir.as_path();
    let opts = format!("size={},mode=0755", args.root_size);
    mount(
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(opts.as_str()),
    )
    .with_context(|| format!("mount tmpfs on {}", root.display()))?;
    for d in ["oldroot", "dev", "proc", "tmp", "rootfs"] {
        fs::create_dir(root.join(d)).with_context(|| format!("mkdir {d}"))?;
    }
    fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    bind_devices(Path::new("/dev"), &root.join("dev"))?;
    mount(
        Some("proc"),
        &root.join("proc"),
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        none,
    )
    .context("mount /proc")?;
    mask_proc(&root.join("proc"))?;
    pivot_root(root, &root.join("oldroot")).context("pivot_root")?;
    nix::unistd::chdir("/").context("chdir /")?;
    umount2("/oldroot", MntFlags::MNT_DETACH).context("detach the host root")?;
    fs::remove_dir("/oldroot").context("remove /oldroot")?;
    let short: String = args.id.chars().take(12).collect();
    sethostname(format!("veil-{short}")).context("set hostname")?;
    loopback_up().context("bring up loopback")?;
    crate::seccomp::apply_agent_filter().context("install the agent's seccomp filter")?;
    tracing::info!(sandbox = %args.id, "sandbox ready: PID 1, private root, loopback only");
    Ok(())
}

/// Bind-mount the safe device nodes from `from` into the directory `to`.
pub fn bind_devices(from: &Path, to: &Path) -> Result<()> {
    let none: Option<&str> = None;
    for dev in DEVICES {
        let target = to.join(dev);
        fs::File::create(&target).with_context(|| format!("create {}", target.display()))?;
        mount(Some(&from.join(dev)), &target, none, MsFlags::MS_BIND, none)
            .with_context(|| format!("bind /dev/{dev}"))?;
    }
    Ok(())
}

/// Character devices (major 1) a function gets, as (name, minor).
const MEM_DEVICES: &[(&str, u64)] = &[
    ("null", 3),
    ("zero", 5),
    ("full", 7),
    ("random", 8),
    ("urandom", 9),
];

/// Create the function's own device nodes in `dir` (a tmpfs). Private inodes, not binds of the
/// host's: a function running as uid 0 may chmod or remove them without touching the host's.
fn make_devices(dir: &Path) -> Result<()> {
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    for (name, minor) in MEM_DEVICES {
        let p = dir.join(name);
        mknod(
            &p,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(1, *minor),
        )
        .with_context(|| format!("mknod {}", p.display()))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o666))?;
    }
    Ok(())
}

/// Set IFF_UP on `lo`, the only interface in the sandbox's network namespace (or, in a VM
/// guest, the only interface the guest has).
pub fn loopback_up() -> Result<()> {
    // SAFETY: plain socket(2) call; the descriptor is wrapped in an OwnedFd right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket");
    }
    // SAFETY: fd is a fresh descriptor we exclusively own.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&sock);
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads into `req`, a valid ifreq that outlives the call.
    if unsafe { libc::ioctl(raw, libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error()).context("SIOCGIFFLAGS lo");
    }
    // SAFETY: after SIOCGIFFLAGS the flags member of the union is the initialised one.
    unsafe {
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
    }
    // SAFETY: SIOCSIFFLAGS reads `req`, a valid ifreq that outlives the call.
    if unsafe { libc::ioctl(raw, libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(std::io::Error::last_os_error()).context("SIOCSIFFLAGS lo");
    }
    Ok(())
}

/// Make `dir` a real directory (replacing a symlink or file an image may have put there), so
/// that mounting on it can never follow a path chosen by the image.
pub fn ensure_real_dir(dir: &Path, mode: u32) -> Result<()> {
    match fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            fs::remove_file(dir).with_context(|| format!("remove {}", dir.display()))?;
            fs::create_dir(dir).with_context(|| format!("mkdir {}", dir.display()))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir(dir).with_context(|| format!("mkdir {}", dir.display()))?;
        }
        Err(e) => return Err(e).with_context(|| format!("stat {}", dir.display())),
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Bind the global kernel knobs under a `/proc` mount onto themselves read-only.
fn mask_proc(proc_dir: &Path) -> Result<()> {
    let none: Option<&str> = None;
    for sub in ["sys", "sysrq-trigger", "irq", "bus"] {
        let p = proc_dir.join(sub);
        if fs::symlink_metadata(&p).is_err() {
            continue;
        }
        mount(Some(&p), &p, none, MsFlags::MS_BIND | MsFlags::MS_REC, none)
            .with_context(|| format!("bind /proc/{sub}"))?;
        mount(
            none,
            &p,
            none,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            none,
        )
        .with_context(|| format!("make /proc/{sub} read-only"))?;
    }
    Ok(())
}

/// Prepare `/dev`, `/proc` and `/tmp` inside the unpacked function root.
pub fn prepare_function_root(rootfs: &Path) -> Result<()> {
    let none: Option<&str> = None;
    let dev = rootfs.join("dev");
    ensure_real_dir(&dev, 0o755)?;
    mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("size=64k,mode=0755"),
    )
    .context("mount tmpfs on the function's /dev")?;
    make_devices(&dev)?;
    let proc_dir = rootfs.join("proc");
    ensure_real_dir(&proc_dir, 0o555)?;
    mount(
        Some("proc"),
        &proc_dir,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        none,
    )
    .context("mount the function's /proc")?;
    // Global kernel knobs stay read-only even for a function that runs as uid 0.
    mask_proc(&proc_dir)?;
    ensure_real_dir(&rootfs.join("tmp"), 0o1777)?;
    Ok(())
}
