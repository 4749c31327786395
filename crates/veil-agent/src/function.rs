//! Starting the function process inside the unpacked root, reaping children as PID 1, and
//! waiting until the function listens on its port.

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How the function process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FnExit {
    /// Exit status.
    Code(i32),
    /// Terminating signal.
    Signal(i32),
}

impl std::fmt::Display for FnExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FnExit::Code(c) => write!(f, "exit code {c}"),
            FnExit::Signal(s) => write!(f, "signal {s}"),
        }
    }
}

/// Held while spawning and while reaping, so that std's own `waitpid` on a child whose exec
/// failed never races with the reaper.
static SPAWN_LOCK: Mutex<()> = Mutex::new(());
static FUNCTION_PID: AtomicI32 = AtomicI32::new(0);

/// Reaps every child of PID 1 and reports the function's exit on a watch channel.
pub struct Reaper {
    rx: watch::Receiver<Option<FnExit>>,
}

impl Reaper {
    /// Start reaping (on SIGCHLD, and every 500 ms in case a signal was coalesced).
    pub fn start() -> Result<Self> {
        let (tx, rx) = watch::channel(None);
        let mut sig = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())
            .context("listen for SIGCHLD")?;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    _ = sig.recv() => {}
                    _ = tick.tick() => {}
                }
                reap(&tx);
            }
        });
        Ok(Self { rx })
    }

    /// A receiver that turns `Some` when the function exits.
    pub fn function_exit(&self) -> watch::Receiver<Option<FnExit>> {
        self.rx.clone()
    }
}

fn reap(tx: &watch::Sender<Option<FnExit>>) {
    let _guard = SPAWN_LOCK.lock();
    loop {
        let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(s) => s,
        };
        let (pid, exit) = match status {
            WaitStatus::Exited(pid, c) => (pid, FnExit::Code(c)),
            WaitStatus::Signaled(pid, s, _) => (pid, FnExit::Signal(s as i32)),
            _ => continue,
        };
        if pid.as_raw() == FUNCTION_PID.load(Ordering::SeqCst) {
            let _ = tx.send(Some(exit));
        }
    }
}

/// Everything needed to exec the function.
#[derive(Debug, Clone)]
pub struct Launch {
    /// argv; argv[0] is resolved against PATH inside the root.
    pub argv: Vec<String>,
    /// Full environment (`KEY=value`).
    pub env: Vec<String>,
    /// Working directory inside the root.
    pub cwd: String,
    /// User id to run as.
    pub uid: u32,
    /// Group id to run as.
    pub gid: u32,
}

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// uid/gid used when the image does not name a user: `nobody`.
pub const NOBODY: u32 = 65534;

/// Resolve the image's `User` (`uid`, `uid:gid`, `name`, `name:group`) against the root's
/// `/etc/passwd` and `/etc/group`. An empty user means `nobody` (65534), not root.
pub fn resolve_user(rootfs: &Path, user: Option<&str>) -> Result<(u32, u32)> {
    let user = user.unwrap_or("").trim();
    if user.is_empty() {
        return Ok((NOBODY, NOBODY));
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let passwd = read_image_file(rootfs, "passwd");
    let (uid, primary_gid) = if let Ok(n) = u.parse::<u32>() {
        let gid = passwd
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() > 3 && f[2] == u).then(|| f[3].parse::<u32>().ok())?
            })
            .next()
            .unwrap_or(n);
        (n, gid)
    } else {
        passwd
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                if f.len() > 3 && f[0] == u {
                    Some((f[2].parse::<u32>().ok()?, f[3].parse::<u32>().ok()?))
                } else {
                    None
                }
            })
            .ok_or_else(|| {
                anyhow!("user {u:?} of the image config is not in the image's /etc/passwd")
            })?
    };
    let gid = match g {
        None => primary_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => read_image_file(rootfs, "group")
                .lines()
                .find_map(|l| {
                    let f: Vec<&str> = l.split(':').collect();
                    (f.len() > 2 && f[0] == g).then(|| f[2].parse::<u32>().ok())?
                })
                .ok_or_else(|| {
                    anyhow!("group {g:?} of the image config is not in the image's /etc/group")
                })?,
        },
    };
    Ok((uid, gid))
}

/// Read `/etc/<name>` of the image, but only if `etc` is a real directory and the file a
/// regular file of at most 1 MiB: the agent runs privileged, and an image must not make it read
/// through a symlink (into `/proc`, a device, or anything else outside the image).
fn read_image_file(rootfs: &Path, name: &str) -> String {
    let etc = rootfs.join("etc");
    let is_dir = std::fs::symlink_metadata(&etc).is_ok_and(|m| m.is_dir());
    let file = etc.join(name);
    let ok =
        is_dir && std::fs::symlink_metadata(&file).is_ok_and(|m| m.is_file() && m.len() <= 1 << 20);
    if !ok {
        return String::new();
    }
    std::fs::read_to_string(file).unwrap_or_default()
}

fn resolve_program(rootfs: &Path, argv0: &str, env: &[String]) -> Result<String> {
    if argv0.contains('/') {
        return Ok(argv0.to_string());
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    for dir in path.split(':').filter(|d| d.starts_with('/')) {
        let inside = format!("{}/{}", dir.trim_end_matches('/'), argv0);
        // lstat only: an absolute symlink is resolved by exec inside the root, not here.
        if std::fs::symlink_metadata(rootfs.join(inside.trim_start_matches('/'))).is_ok() {
            return Ok(inside);
        }
    }
    bail!("entrypoint {argv0:?} not found on PATH {path:?} in the image")
}

/// Spawn the function chrooted into `rootfs`, with no capabilities, no new privileges and the
/// function seccomp filter. Its stdout and stderr go through pipes to the sandbox's log
/// substream (see [`crate::logsink`]).
pub fn spawn(rootfs: &Path, launch: &Launch) -> Result<u32> {
    let argv0 = launch
        .argv
        .first()
        .ok_or_else(|| anyhow!("the image has no entrypoint or cmd"))?;
    if !launch.cwd.starts_with('/') {
        bail!(
            "the image's WorkingDir {:?} is not an absolute path",
            launch.cwd
        );
    }
    let program = resolve_program(rootfs, argv0, &launch.env)?;
    let filter =
        crate::seccomp::function_filter().context("compile the function's seccomp filter")?;
    let (out_r, out) = std::io::pipe()?;
    let (err_r, err) = std::io::pipe()?;
    let root_c = std::ffi::CString::new(rootfs.as_os_str().as_encoded_bytes())?;
    let cwd_c = std::ffi::CString::new(launch.cwd.as_bytes())?;
    let (uid, gid) = (launch.uid, launch.gid);

    let mut cmd = Command::new(&program);
    cmd.args(&launch.argv[1..])
        .env_clear()
        .envs(launch.env.iter().filter_map(|kv| kv.split_once('=')))
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err));
    // SAFETY: runs in the forked child before exec; only raw syscalls on data prepared before
    // the fork (C strings, ids, the compiled BPF program); nothing allocates or locks.
    unsafe {
        cmd.pre_exec(move || {
            // chroot does not move the working directory: go to the new root first, so no
            // path (even a relative WorkingDir) starts outside it.
            if libc::chroot(root_c.as_ptr()) != 0
                || libc::chdir(c"/".as_ptr()) != 0
                || libc::chdir(cwd_c.as_ptr()) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // The bounding set can only be cleared while CAP_SETPCAP is still held, so
            // before switching to the function's user.
            for cap in 0..64 {
                libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
            }
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            drop_all_caps()?;
            seccompiler::apply_filter(&filter)
                .map_err(|_| std::io::Error::from_raw_os_error(libc::EPERM))?;
            Ok(())
        });
    }
    let child = {
        let _guard = SPAWN_LOCK.lock();
        let child = cmd
            .spawn()
            .with_context(|| format!("exec {program:?} in the function root"))?;
        FUNCTION_PID.store(child.id() as i32, Ordering::SeqCst);
        child
    };
    // Our copies of the pipes' write ends live in `cmd`: drop them, so the forwarders see
    // the end of the function's output when it exits.
    drop(cmd);
    crate::logsink::forward_pipe(out_r, veil_proto::LogSource::Stdout);
    crate::logsink::forward_pipe(err_r, veil_proto::LogSource::Stderr);
    // The reaper owns waiting; dropping Child neither kills nor waits.
    let pid = child.id();
    drop(child);
    Ok(pid)
}

/// capset(2) with empty sets (for a function that runs as uid 0).
fn drop_all_caps() -> std::io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const V3: u32 = 0x2008_0522;
    let mut hdr = Header {
        version: V3,
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset with a v3 header and two data structs, the layout the kernel expects;
    // both live on this stack frame for the duration of the call.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut hdr as *mut Header, data.as_ptr()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Why the function did not become ready.
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    /// It exited first.
    #[error("the function exited with {0} before listening on port {1}")]
    Exited(FnExit, u16),
    /// It never listened.
    #[error("the function did not listen on port {0} within {1:?}")]
    Timeout(u16, Duration),
}

/// Wait until something accepts TCP connections on 127.0.0.1:`port`: how long that took, and
/// the accepted connection (the first request goes over it). Probes are 250 µs apart for the
/// first 20 ms, then back off to 50 ms, so a function that listens at once is seen at once.
pub async fn wait_ready(
    port: u16,
    timeout: Duration,
    mut exit: watch::Receiver<Option<FnExit>>,
) -> Result<(Duration, tokio::net::TcpStream), NotReady> {
    let start = Instant::now();
    let mut pause = Duration::from_micros(250);
    loop {
        if let Some(e) = *exit.borrow_and_update() {
            return Err(NotReady::Exited(e, port));
        }
        if let Ok(conn) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            return Ok((start.elapsed(), conn));
        }
        if start.elapsed() >= timeout {
            return Err(NotReady::Timeout(port, timeout));
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = exit.changed() => {}
        }
        // Most functions listen within milliseconds of their start: probe finely for the
        // first 20 ms (a refused connect on loopback costs microseconds), then back off.
        if start.elapsed() >= Duration::from_millis(20) {
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users() {
        let d = std::env::temp_dir().join(format!("veil-agent-user-{}", std::process::id()));
        std::fs::create_dir_all(d.join("etc")).unwrap();
        std::fs::write(
            d.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(d.join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        let check = |u: Option<&str>| resolve_user(&d, u).map_err(|e| e.to_string());
        assert_eq!(check(None).unwrap(), (NOBODY, NOBODY));
        assert_eq!(check(Some("")).unwrap(), (NOBODY, NOBODY));
        assert_eq!(check(Some("app")).unwrap(), (1000, 1001));
        assert_eq!(check(Some("1000")).unwrap(), (1000, 1001));
        assert_eq!(check(Some("42")).unwrap(), (42, 42));
        assert_eq!(check(Some("app:staff")).unwrap(), (1000, 50));
        assert_eq!(check(Some("7:8")).unwrap(), (7, 8));
        assert!(check(Some("ghost"))
            .unwrap_err()
            .contains("not in the image's /etc/passwd"));
        assert!(check(Some("app:ghosts"))
            .unwrap_err()
            .contains("/etc/group"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn program_lookup() {
        let d = std::env::temp_dir().join(format!("veil-agent-path-{}", std::process::id()));
        std::fs::create_dir_all(d.join("usr/bin")).unwrap();
        std::fs::write(d.join("usr/bin/hello"), "").unwrap();
        assert_eq!(resolve_program(&d, "hello", &[]).unwrap(), "/usr/bin/hello");
        assert_eq!(resolve_program(&d, "/x/y", &[]).unwrap(), "/x/y");
        assert!(resolve_program(&d, "nope", &["PATH=/bin".into()]).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
