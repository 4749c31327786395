//! Sandbox backends: where a veil-agent runs, isolated from the host.
//!
//! One trait, [`Backend`], with one implementation per kind. Today: [`process::ProcessBackend`]
//! (Linux namespaces + cgroups + seccomp, the runc-like baseline). The microVM and confidential-VM
//! backends come later behind the same trait. A backend starts the agent and hands the node the
//! node's end of the agent's one channel; it knows nothing about images or functions.

pub mod cgroup;
pub mod process;

use futures::future::BoxFuture;
use std::path::PathBuf;
use tokio::net::UnixStream;

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

/// A started sandbox. The node owns it and must call [`SandboxHandle::destroy`].
pub struct Sandbox {
    /// Sandbox id.
    pub id: String,
    /// The node's end of the agent's channel.
    pub channel: UnixStream,
    /// Function output (the agent's stdout), line by line.
    pub stdout: Option<tokio::process::ChildStdout>,
    /// The agent's own log (its stderr).
    pub stderr: Option<tokio::process::ChildStderr>,
    /// Control of the running sandbox.
    pub handle: Box<dyn SandboxHandle>,
}

/// Control of a running sandbox.
pub trait SandboxHandle: Send + Sync {
    /// Kill everything in the sandbox, wait for it, and release its resources. Idempotent.
    fn destroy(&self) -> BoxFuture<'_, Result<(), Error>>;
    /// Resolves when the sandbox has ended on its own or was destroyed.
    fn exited(&self) -> BoxFuture<'_, Exit>;
    /// Host pids of processes still in the sandbox (empty once destroyed).
    fn pids(&self) -> Vec<u32>;
}

/// A kind of sandbox.
pub trait Backend: Send + Sync {
    /// Short name (`process`, `microvm`, `cvm`).
    fn name(&self) -> &'static str;
    /// Boot a sandbox whose agent waits for an assignment on its channel.
    fn create(&self, spec: SandboxSpec) -> BoxFuture<'_, Result<Sandbox, Error>>;
}
