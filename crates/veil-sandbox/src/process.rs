//! The namespace sandbox: the agent runs as PID 1 in new mount, PID, network, UTS, IPC and
//! cgroup namespaces, inside its own cgroup, with only loopback networking. Its one channel to the
//! node is an inherited unix socket (fd 3).
//!
//! The host side (this module) creates the cgroup, a socket pair and an empty state directory,
//! then spawns `veil-agent sandbox`. Between fork and exec the child joins the cgroup and
//! unshares the namespaces; the agent then forks once so that its child is PID 1 of the new PID
//! namespace, and that child builds the private root (see the agent's `nsinit`).

use crate::cgroup::{self, Cgroup, Layout, Limits};
use crate::{Backend, Error, Exit, Sandbox, SandboxHandle, SandboxSpec};
use futures::future::BoxFuture;
use futures::FutureExt;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use tokio::sync::watch;

/// File descriptor number the agent finds its channel on.
pub const CHANNEL_FD: i32 = 3;

/// Configuration of the namespace backend.
#[derive(Debug, Clone)]
pub struct ProcessConfig {
    /// Path of the veil-agent binary.
    pub agent: PathBuf,
    /// Directory holding one (empty, host-side) mount point per sandbox.
    pub state_dir: PathBuf,
    /// cgroup mount point, normally `/sys/fs/cgroup`.
    pub cgroup_root: PathBuf,
    /// Name of veil's parent cgroup.
    pub cgroup_parent: String,
    /// `RUST_LOG`-style filter passed to the agent.
    pub agent_log: String,
}

/// Runs sandboxes as namespaced processes on this host.
pub struct ProcessBackend {
    config: ProcessConfig,
    layout: Layout,
    /// SHA-384 of the agent binary, with the identity of the file it was taken of.
    measurement: Measured,
}

/// The file's identity (device, inode, size, modification and change times) and its SHA-384.
type Measured = std::sync::Mutex<Option<(FileId, String)>>;
type FileId = (u64, u64, u64, std::time::SystemTime, i64, i64);

/// SHA-384 (hex) of the file at `path`, from `cache` while its size and modification time stay
/// the same.
fn sha384_cached(path: &std::path::Path, cache: &Measured) -> Option<String> {
    use sha2::Digest;
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    // The change time moves with every rewrite or rename onto the path, even one that keeps
    // the size and the modification time (`cp -p`, reproducible builds).
    let id: FileId = (
        meta.dev(),
        meta.ino(),
        meta.len(),
        meta.modified().ok()?,
        meta.ctime(),
        meta.ctime_nsec(),
    );
    let mut cached = cache.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((seen, h)) = cached.as_ref() {
        if *seen == id {
            return Some(h.clone());
        }
    }
    let bytes = std::fs::read(path).ok()?;
    let h = hex::encode(sha2::Sha384::digest(&bytes));
    *cached = Some((id, h.clone()));
    Some(h)
}

/// The environment variable that gives a namespace agent the SHA-384 of its own binary (the
/// software TEE's self-declared measurement), hashed once by the node rather than by every
/// sandbox at boot. The software TEE trusts the host in any case: the host chose the binary.
pub const AGENT_MEASUREMENT_ENV: &str = "VEIL_AGENT_MEASUREMENT";

impl ProcessBackend {
    /// Check the agent binary and the cgroup layout.
    pub fn new(config: ProcessConfig) -> Result<Self, Error> {
        if !config.agent.is_file() {
            return Err(Error::AgentMissing(config.agent.clone()));
        }
        let layout = cgroup::detect(&config.cgroup_root)?;
        std::fs::create_dir_all(&config.state_dir).map_err(|source| Error::Io {
            id: "-".into(),
            source,
        })?;
        // Mount points of sandboxes of an earlier run of this state directory (empty on the
        // host: the tmpfs lived only in the sandbox's mount namespace). Their names are the
        // sandboxes that run left behind, so their cgroups are ours to remove at once.
        let mut ours = std::collections::HashSet::new();
        if let Ok(entries) = std::fs::read_dir(&config.state_dir) {
            for e in entries.flatten() {
                if let Some(n) = e.file_name().to_str() {
                    ours.insert(n.to_string());
                }
                let _ = std::fs::remove_dir(e.path());
            }
        }
        let stale = cgroup::remove_stale(&layout, &config.cgroup_parent, &ours);
        if stale > 0 {
            tracing::info!(stale, "removed empty cgroups left by an earlier node");
        }
        tracing::info!(?layout, agent = %config.agent.display(), "namespace sandbox backend ready");
        let backend = Self {
            config,
            layout,
            measurement: std::sync::Mutex::new(None),
        };
        // Hashed now, once: not on the first cold start's boot.
        let _ = backend.agent_measurement();
        Ok(backend)
    }

    /// SHA-384 (hex) of the agent binary, hashed again only if its size or modification time
    /// changed (a rebuilt agent); `None` if it cannot be read (the agent then hashes itself).
    fn agent_measurement(&self) -> Option<String> {
        sha384_cached(&self.config.agent, &self.measurement)
    }

    /// The detected cgroup layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    fn spawn(&self, spec: SandboxSpec) -> Result<Sandbox, Error> {
        let id = spec.id.clone();
        let io_err = |source: std::io::Error| Error::Spawn {
            id: id.clone(),
            source,
        };
        let cg = Cgroup::create(
            &self.layout,
            &self.config.cgroup_parent,
            &spec.id,
            Limits {
                memory_bytes: spec.memory_bytes,
                cpu_millis: spec.cpu_millis,
                pids_max: spec.pids_max,
            },
        )?;
        let cg = CgroupGuard(Some(cg));
        let mount_dir = self.config.state_dir.join(&spec.id);
        std::fs::create_dir_all(&mount_dir).map_err(io_err)?;
        // Removed again if anything below fails; kept once the sandbox runs.
        let mut dir_guard = DirGuard(Some(mount_dir.clone()));

        let (node_end, agent_end) = std::os::unix::net::UnixStream::pair().map_err(io_err)?;
        let procs: Vec<File> = cg
            .get()
            .procs_files()
            .iter()
            .map(|p| OpenOptions::new().write(true).open(p))
            .collect::<Result<_, _>>()
            .map_err(io_err)?;
        let proc_fds: Vec<i32> = procs.iter().map(|f| f.as_raw_fd()).collect();
        let agent_fd = OwnedFd::from(agent_end);
        let agent_raw = agent_fd.as_raw_fd();

        let mut cmd = tokio::process::Command::new(&self.config.agent);
        cmd.arg("sandbox")
            .arg("--id")
            .arg(&spec.id)
            .arg("--root-dir")
            .arg(&mount_dir)
            .arg("--root-size")
            .arg(spec.rootfs_bytes.to_string())
            .env_clear()
            .env("VEIL_LOG", &self.config.agent_log)
            .envs(self.agent_measurement().map(|h| (AGENT_MEASUREMENT_ENV, h)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // SAFETY: the closure runs in the forked child before exec and only makes raw,
        // async-signal-safe syscalls (write, dup2, fcntl, setsid, unshare) on values prepared
        // before the fork; it allocates nothing and takes no locks.
        unsafe {
            cmd.pre_exec(move || child_setup(&proc_fds, agent_raw));
        }
        let mut child = cmd.spawn().map_err(io_err)?;
        drop(agent_fd);
        drop(procs);
        node_end.set_nonblocking(true).map_err(io_err)?;
        let channel = tokio::net::UnixStream::from_std(node_end).map_err(io_err)?;
        let console = child.stderr.take().map(|e| Box::pin(e) as crate::Console);
        let pid = child.id();
        tracing::debug!(sandbox = %spec.id, ?pid, "sandbox started");

        let exit_rx = crate::watch_exit(child, spec.id.clone(), "sandbox agent", || {});

        dir_guard.0 = None;
        Ok(Sandbox {
            id: spec.id.clone(),
            channel: Box::new(channel),
            console,
            handle: Box::new(ProcessSandbox {
                id: spec.id,
                cgroup: Mutex::new(cg),
                mount_dir,
                pid,
                exit_rx,
            }),
        })
    }
}

/// Runs between fork and exec in the child. Only async-signal-safe calls.
fn child_setup(proc_fds: &[i32], agent_fd: i32) -> std::io::Result<()> {
    for &fd in proc_fds {
        // SAFETY: fd is an open cgroup.procs file of the parent, inherited across fork; the
        // buffer is a static byte string.
        let n = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
        if n != 1 {
            return Err(std::io::Error::last_os_error());
        }
    }
    if agent_fd == CHANNEL_FD {
        // SAFETY: clearing FD_CLOEXEC on an fd we own in this child.
        if unsafe { libc::fcntl(CHANNEL_FD, libc::F_SETFD, 0) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    } else {
        // SAFETY: dup2 onto fd 3; the new descriptor does not inherit FD_CLOEXEC.
        if unsafe { libc::dup2(agent_fd, CHANNEL_FD) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    // SAFETY: setsid has no memory effects; failure only means we already lead a session.
    unsafe {
        libc::setsid();
    }
    let flags = libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWCGROUP;
    // SAFETY: unshare with constant flags; affects only this (single-threaded) child.
    if unsafe { libc::unshare(flags) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

struct DirGuard(Option<PathBuf>);

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

struct CgroupGuard(Option<Cgroup>);

impl CgroupGuard {
    fn get(&self) -> &Cgroup {
        // The guard is only emptied by `take` in destroy, after which `get` is not called.
        self.0
            .as_ref()
            .unwrap_or_else(|| unreachable!("cgroup taken"))
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        if let Some(cg) = self.0.take() {
            // Killed tasks leave the cgroup asynchronously; rmdir fails (EBUSY) until they have.
            for _ in 0..50 {
                cg.kill_all();
                if cg.remove().is_ok() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            tracing::warn!(dirs = ?cg.dirs(), "could not remove a sandbox cgroup");
        }
    }
}

struct ProcessSandbox {
    id: String,
    cgroup: Mutex<CgroupGuard>,
    mount_dir: PathBuf,
    pid: Option<u32>,
    exit_rx: watch::Receiver<Option<Exit>>,
}

impl ProcessSandbox {
    fn cgroup_pids(&self) -> Vec<u32> {
        match self.cgroup.lock() {
            Ok(g) => g.0.as_ref().map(|c| c.pids()).unwrap_or_default(),
            Err(_) => Vec::new(),
        }
    }

    async fn do_destroy(&self) -> Result<(), Error> {
        if self.exit_rx.borrow().is_none() {
            // Kill PID 1 of the sandbox (and everything else inside) but not the outer process:
            // it reaps PID 1 and exits, so no zombie is left to the host's init.
            let outer = self.pid;
            for pid in self.cgroup_pids() {
                if Some(pid) == outer {
                    continue;
                }
                if let Ok(pid) = i32::try_from(pid) {
                    // SAFETY: kill(2) on a pid listed in the sandbox's own cgroup.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
            let ended =
                tokio::time::timeout(std::time::Duration::from_secs(2), self.exited()).await;
            if ended.is_err() {
                if let Some(pid) = outer.and_then(|p| i32::try_from(p).ok()) {
                    // SAFETY: kill(2) on our own child, which has not been reaped yet (the
                    // waiter task reports the exit only after reaping), so the pid is ours.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
        }
        let _ = self.exited().await;
        // PID 1 of the sandbox dies with its parent (parent-death signal), and the kernel
        // kills the rest of its PID namespace. Kill stragglers through the cgroup anyway.
        let mut left = Vec::new();
        for _ in 0..100 {
            left = self.cgroup_pids();
            if left.is_empty() {
                break;
            }
            if let Ok(g) = self.cgroup.lock() {
                if let Some(c) = g.0.as_ref() {
                    c.kill_all();
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        if !left.is_empty() {
            return Err(Error::Lingering {
                id: self.id.clone(),
                pids: left,
            });
        }
        let cg = match self.cgroup.lock() {
            Ok(mut g) => g.0.take(),
            Err(_) => None,
        };
        if let Some(cg) = cg {
            cg.remove()?;
        }
        remove_mount_dir(&self.mount_dir);
        Ok(())
    }
}

fn remove_mount_dir(dir: &Path) {
    // The tmpfs lived only in the sandbox's mount namespace; on the host the directory is empty.
    if let Err(e) = std::fs::remove_dir(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %dir.display(), error = %e, "could not remove sandbox directory");
        }
    }
}

impl SandboxHandle for ProcessSandbox {
    fn destroy(&self) -> BoxFuture<'_, Result<(), Error>> {
        self.do_destroy().boxed()
    }

    fn exited(&self) -> BoxFuture<'_, Exit> {
        crate::wait_exit(&self.exit_rx)
    }

    fn leftovers(&self) -> Vec<String> {
        let mut left: Vec<String> = self
            .cgroup_pids()
            .into_iter()
            .map(|p| format!("process {p}"))
            .collect();
        if let Ok(g) = self.cgroup.lock() {
            if let Some(c) = g.0.as_ref() {
                left.extend(c.dirs().iter().map(|d| format!("cgroup {}", d.display())));
            }
        }
        if self.mount_dir.exists() {
            left.push(format!("directory {}", self.mount_dir.display()));
        }
        left
    }

    fn pids(&self) -> Vec<u32> {
        self.cgroup_pids()
    }
}

impl Backend for ProcessBackend {
    fn name(&self) -> &'static str {
        "process"
    }

    fn create(&self, spec: SandboxSpec) -> BoxFuture<'_, Result<Sandbox, Error>> {
        async move { self.spawn(spec) }.boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_measurement_is_hashed_once_and_again_when_it_changes() {
        use sha2::Digest;
        let dir = std::env::temp_dir().join(format!("veil-measure-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("agent");
        std::fs::write(&f, b"one").unwrap();
        let cache = Measured::default();
        let one = sha384_cached(&f, &cache).unwrap();
        assert_eq!(one, hex::encode(sha2::Sha384::digest(b"one")));
        assert_eq!(sha384_cached(&f, &cache).unwrap(), one);
        // A rebuilt agent (another size) is hashed again.
        std::fs::write(&f, b"second").unwrap();
        assert_eq!(
            sha384_cached(&f, &cache).unwrap(),
            hex::encode(sha2::Sha384::digest(b"second"))
        );
        // So is one of the same size and modification time (its change time moved).
        let mtime = std::fs::metadata(&f).unwrap().modified().unwrap();
        std::fs::write(&f, b"SECOND").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        assert_eq!(
            sha384_cached(&f, &cache).unwrap(),
            hex::encode(sha2::Sha384::digest(b"SECOND"))
        );
        assert_eq!(sha384_cached(&dir.join("missing"), &cache), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
