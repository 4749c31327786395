//! Sandbox backends: where a veil-agent runs, isolated from the host.
//!
//! One trait, [`Backend`], with one implementation per kind: [`process::ProcessBackend`]
//! (Linux namespaces + cgroups + seccomp, the runc-like baseline) and, behind the `microvm`
//! feature, [`microvm::MicroVmBackend`] (a QEMU microVM whose `/init` is the agent). A backend
//! starts the agent and hands the node the node's end of the agent's one channel — any byte
//! stream: a socket pair, or the host side of a virtio-serial port — and reports when the
//! sandbox ends and what it left behind. It knows nothing about images or functions; logs
//! travel over the channel, not through the backend.

pub mod cgroup;
#[cfg(feature = "cvm")]
pub mod cvm;
#[cfg(feature = "microvm")]
pub mod microvm;
pub mod process;

use futures::future::BoxFuture;
use std::path::PathBuf;
use std::pin::Pin;
use tokio::io::{AsyncRead, AsyncWrite};

/// Errors of sandbox backends.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The agent binary is missing or not executable.
    #[error("veil-agent binary not found at {0} (build it with `cargo build --bins`, or set VEIL_AGENT)")]
    AgentMissing(PathBuf),
    /// Creating or configuring a cgroup failed.
    #[error("cgroup {path}: {source}")]
    Cgroup {
        /// The cgroup file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// No usable cgroup hierarchy was found.
    #[error("no usable cgroup hierarchy: {0}")]
    NoCgroups(String),
    /// Spawning the sandbox failed.
    #[error("starting sandbox {id}: {source}")]
    Spawn {
        /// Sandbox id.
        id: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The sandbox did not go away.
    #[error("sandbox {id} still has processes after kill: {pids:?}")]
    Lingering {
        /// Sandbox id.
        id: String,
        /// Processes still present.
        pids: Vec<u32>,
    },
    /// Something the backend needs is not installed or built.
    #[error("missing: {0}")]
    Missing(String),
    /// A sandbox did not come up.
    #[error("sandbox {id} did not boot: {reason}")]
    Boot {
        /// Sandbox id.
        id: String,
        /// Why, with what the VMM said.
        reason: String,
    },
    /// Other I/O error.
    #[error("sandbox {id}: {source}")]
    Io {
        /// Sandbox id.
        id: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// Resource limits and identity of one sandbox.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// Unique id (lowercase hex); names the cgroup and the state directory.
    pub id: String,
    /// Memory limit in bytes (includes the sandbox's private root, which is memory-backed).
    pub memory_bytes: u64,
    /// CPU limit in thousandths of a core.
    pub cpu_millis: u32,
    /// Maximum number of processes and threads.
    pub pids_max: u32,
    /// Size limit of the sandbox's private root filesystem.
    pub rootfs_bytes: u64,
}

/// How a sandbox ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Exited with a status code.
    Code(i32),
    /// Killed by a signal.
    Signal(i32),
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::Signal(s) => write!(f, "signal {s}"),
        }
    }
}

/// A byte stream to an agent: whatever the backend connects (a socket pair, the host side of a
/// virtio-serial port, vsock). Nothing above the backend depends on which.
pub trait ChannelIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> ChannelIo for T {}

/// The node's end of an agent's channel.
pub type Channel = Box<dyn ChannelIo>;

/// What a backend captured outside the channel: a namespace agent's stderr, a VM's serial
/// console. For diagnosing a sandbox that never reached its channel; it carries no function
/// output (that goes over the channel's log substream).
pub type Console = Pin<Box<dyn AsyncRead + Send>>;

/// Reap `child` on its own task and publish how it ended, after `on_exit` ran (so a reader of
/// the receiver knows the process is gone and `on_exit`'s bookkeeping done). `what` names the
/// process in logs.
pub(crate) fn watch_exit(
    mut child: tokio::process::Child,
    id: String,
    what: &'static str,
    on_exit: impl FnOnce() + Send + 'static,
) -> tokio::sync::watch::Receiver<Option<Exit>> {
    use std::os::unix::process::ExitStatusExt;
    let (tx, rx) = tokio::sync::watch::channel(None);
    tokio::spawn(async move {
        let exit = match child.wait().await {
            Ok(status) => match status.code() {
                Some(code) => Exit::Code(code),
                None => Exit::Signal(status.signal().unwrap_or(0)),
            },
            Err(e) => {
                tracing::warn!(sandbox = %id, error = %e, "waiting for the {what} failed");
                Exit::Code(-1)
            }
        };
        tracing::debug!(sandbox = %id, %exit, "the {what} exited");
        on_exit();
        let _ = tx.send(Some(exit));
    });
    rx
}

/// Resolves with the exit [`watch_exit`] publishes (`Exit::Code(-1)` if it never can).
pub(crate) fn wait_exit(
    rx: &tokio::sync::watch::Receiver<Option<Exit>>,
) -> BoxFuture<'static, Exit> {
    let mut rx = rx.clone();
    Box::pin(async move {
        match rx.wait_for(|e| e.is_some()).await {
            Ok(v) => v.clone().unwrap_or(Exit::Code(-1)),
            Err(_) => Exit::Code(-1),
        }
    })
}

/// A started sandbox. The node owns it and must call [`SandboxHandle::destroy`].
pub struct Sandbox {
    /// Sandbox id.
    pub id: String,
    /// The node's end of the agent's channel.
    pub channel: Channel,
    /// Diagnostic output from outside the channel, line by line, if the backend has any.
    pub console: Option<Console>,
    /// Control of the running sandbox.
    pub handle: Box<dyn SandboxHandle>,
}

/// Where a sandbox runs, for listings and metrics.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SandboxKind {
    /// The backend (`process`, `microvm`, `cvm`).
    pub backend: String,
    /// The accelerator actually used (`kvm`, `tcg`), for VM backends.
    pub accelerator: Option<String>,
}

/// Control of a running sandbox.
pub trait SandboxHandle: Send + Sync {
    /// Kill everything in the sandbox, wait for it, check nothing is left, and release its
    /// resources. Idempotent.
    fn destroy(&self) -> BoxFuture<'_, Result<(), Error>>;
    /// Resolves when the sandbox has ended on its own or was destroyed.
    fn exited(&self) -> BoxFuture<'_, Exit>;
    /// What of the sandbox is still on the host (processes, VMMs, sockets), as short
    /// descriptions; empty once destroyed. The leak check of tests and of `destroy`.
    fn leftovers(&self) -> Vec<String>;
    /// Host pids of the sandbox's processes (the agent's, or the VMM's), for listings.
    fn pids(&self) -> Vec<u32>;
}

/// A kind of sandbox.
pub trait Backend: Send + Sync {
    /// Short name (`process`, `microvm`, `cvm`).
    fn name(&self) -> &'static str;
    /// Backend and accelerator of the sandboxes it makes.
    fn kind(&self) -> SandboxKind {
        SandboxKind {
            backend: self.name().to_string(),
            accelerator: None,
        }
    }
    /// How long a new sandbox may take until its agent answers on the channel.
    fn boot_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(10)
    }
    /// Boot a sandbox whose agent waits for an assignment on its channel.
    fn create(&self, spec: SandboxSpec) -> BoxFuture<'_, Result<Sandbox, Error>>;
    /// The node is stopping: end every sandbox this backend started that is still running,
    /// including ones still booting, and return once they are gone.
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}
