//! The node: owns the sandboxes on one machine. It boots them through a backend (keeping a
//! small pool of generic, unassigned sandboxes booted ahead of time) within its capacity — a
//! memory and CPU budget every sandbox counts against — assigns them to functions,
//! serves each sandbox the blobs of the image it was assigned (from the blob cache, which
//! holds registry bytes only), carries invocations over the sandbox channel, and destroys
//! sandboxes. A sandbox is assigned once and never handed to another function or tenant.
#![forbid(unsafe_code)]

mod agent_api;
pub mod cache;
pub mod capacity;
mod instance;
pub mod logs;
mod pool;
pub mod store;
pub mod tenant_pool;

pub use instance::{Instance, InstanceSpec, StartTimings};
pub use pool::{Claim, NodeStatus};
pub use tenant_pool::{TenantPoolConfig, TenantPoolStatus};

#[cfg(test)]
use agent_api::MAX_LINE;
use agent_api::{read_lines, serve_agent};
use bytes::Bytes;
use cache::{BlobCache, ResolvedImage};
use futures::future::BoxFuture;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use store::BlobStore;
pub use tokio_util::sync::CancellationToken;
use veil_image::Digest;
use veil_proto::mux::{self, MuxHandle, Side, Substream};
use veil_proto::{ErrorBody, StreamKind};
use veil_sandbox::{Backend, SandboxHandle, SandboxSpec};

/// Errors of the node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Bad image reference.
    #[error("invalid image reference {0}")]
    BadReference(String),
    /// Image or tag not found.
    #[error("image not found: {0}")]
    ImageNotFound(String),
    /// Malformed image data.
    #[error("invalid image: {0}")]
    Image(String),
    /// Upstream registry failure; `source` keeps its kind (not found, unauthorized, deadline …).
    #[error("registry error: {context}: {source}")]
    Upstream {
        /// What was being fetched (image reference, blob digest).
        context: String,
        /// The registry client's error.
        #[source]
        source: veil_registry::Error,
    },
    /// A blob from upstream did not match its digest.
    #[error("tampered blob: {0}")]
    Tampered(String),
    /// Data did not match the expected digest.
    #[error("digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// Expected digest.
        expected: String,
        /// Actual digest.
        actual: String,
    },
    /// Local storage failure.
    #[error("storage: {0}")]
    Storage(String),
    /// An error shared by several waiters of one fetch; it has the kind of the shared error.
    #[error(transparent)]
    Shared(Arc<NodeError>),
    /// The store cannot take more bytes: uploads in progress would exceed its size bound.
    #[error("the store is full: {needed} more bytes would exceed its bound of {limit} bytes for uploads in progress and upstream blobs")]
    StoreFull {
        /// Bytes asked for.
        needed: u64,
        /// The bound (`cache_max_bytes`).
        limit: u64,
    },
    /// The local image store cannot take more bytes: what it holds plus uploads in progress
    /// would exceed its bound.
    #[error("the local image store is full: {needed} more bytes would exceed its bound of {limit} bytes ({stored} bytes stored or being uploaded)")]
    LocalStoreFull {
        /// Bytes asked for.
        needed: u64,
        /// Bytes held and being uploaded now.
        stored: u64,
        /// The bound (`max_store_bytes` of the local store).
        limit: u64,
    },
    /// Sandbox backend failure.
    #[error("sandbox: {0}")]
    Sandbox(#[from] veil_sandbox::Error),
    /// The sandbox channel failed.
    #[error("sandbox {id}: channel: {reason}")]
    Channel {
        /// Sandbox id.
        id: String,
        /// Why.
        reason: String,
    },
    /// The start was cancelled because the function went away.
    #[error("start of function {0} cancelled: the function was deleted or redeployed")]
    Cancelled(String),
    /// The agent refused or failed the assignment.
    #[error("function {function}: {code}: {message}")]
    Assign {
        /// Function name.
        function: String,
        /// Agent error code.
        code: String,
        /// Agent message.
        message: String,
    },
    /// The node's capacity (memory and CPU budget) has no room, or is misconfigured.
    #[error(transparent)]
    Capacity(#[from] capacity::CapacityError),
}

/// What kind of failure a [`NodeError`] is, whatever path it took (shared fetches included):
/// callers map kinds to statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The reference or name is malformed.
    BadReference,
    /// The image, manifest or blob does not exist (locally or upstream).
    NotFound,
    /// The upstream registry refused the node's credentials (or wants some).
    Unauthorized,
    /// The upstream registry denied access.
    Denied,
    /// The image data is malformed.
    BadImage,
    /// Bytes did not match their digest.
    Tampered,
    /// The upstream registry was too slow (deadline or timeout).
    UpstreamTimeout,
    /// Any other upstream registry failure.
    Upstream,
    /// The store is full.
    StoreFull,
    /// Local storage failed.
    Storage,
    /// Sandbox, channel or agent failure.
    Sandbox,
    /// The start was cancelled.
    Cancelled,
    /// The node is at capacity (or its capacity holds no sandbox).
    Capacity,
}

impl NodeError {
    /// The kind of this error; a [`NodeError::Shared`] error has its inner error's kind.
    pub fn kind(&self) -> ErrorKind {
        match self {
            NodeError::BadReference(_) => ErrorKind::BadReference,
            NodeError::ImageNotFound(_) => ErrorKind::NotFound,
            NodeError::Image(_) => ErrorKind::BadImage,
            NodeError::Upstream { source, .. } => match source {
                veil_registry::Error::NotFound { .. } => ErrorKind::NotFound,
                veil_registry::Error::Unauthorized { .. } => ErrorKind::Unauthorized,
                veil_registry::Error::Denied { .. } => ErrorKind::Denied,
                veil_registry::Error::Deadline { .. } => ErrorKind::UpstreamTimeout,
                veil_registry::Error::DigestMismatch { .. } => ErrorKind::Tampered,
                veil_registry::Error::Manifest(_) => ErrorKind::BadImage,
                _ => ErrorKind::Upstream,
            },
            NodeError::Tampered(_) | NodeError::DigestMismatch { .. } => ErrorKind::Tampered,
            NodeError::Storage(_) => ErrorKind::Storage,
            NodeError::StoreFull { .. } | NodeError::LocalStoreFull { .. } => ErrorKind::StoreFull,
            NodeError::Shared(inner) => inner.kind(),
            NodeError::Sandbox(_) | NodeError::Channel { .. } | NodeError::Assign { .. } => {
                ErrorKind::Sandbox
            }
            NodeError::Cancelled(_) => ErrorKind::Cancelled,
            NodeError::Capacity(_) => ErrorKind::Capacity,
        }
    }

    pub(crate) fn upstream(context: impl Into<String>, source: veil_registry::Error) -> Self {
        NodeError::Upstream {
            context: context.into(),
            source,
        }
    }
}

/// Node configuration.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// State directory (blob store, sandbox mount points).
    pub state_dir: PathBuf,
    /// veil-agent binary.
    pub agent: PathBuf,
    /// Upstream registry settings.
    pub registry: veil_registry::RegistryConfig,
    /// Per-sandbox memory limit.
    pub memory_bytes: u64,
    /// Per-sandbox CPU limit (thousandths of a core).
    pub cpu_millis: u32,
    /// Per-sandbox task limit.
    pub pids_max: u32,
    /// Per-sandbox private root size.
    pub rootfs_bytes: u64,
    /// Generic sandboxes kept booted ahead of demand.
    pub pool_size: usize,
    /// Memory the pools together (generic and tenant-attested sandboxes, booted, booting or
    /// being attested, not yet assigned) may commit; `None`: the whole capacity.
    pub pool_memory: Option<u64>,
    /// What all sandboxes together may commit (their memory and CPU limits, pooled sandboxes
    /// included); default [`capacity::Resources::of_this_machine`].
    pub capacity: capacity::Resources,
    /// Bytes of upstream blobs the cache keeps before evicting least recently used ones.
    pub cache_max_bytes: u64,
    /// Log filter for agents.
    pub agent_log: String,
    /// cgroup mount point.
    pub cgroup_root: PathBuf,
    /// Name of veil's parent cgroup.
    pub cgroup_parent: String,
}

impl NodeConfig {
    /// Defaults rooted at `state_dir`, with the agent found by [`find_agent`].
    pub fn with_state_dir(state_dir: PathBuf) -> Self {
        Self {
            state_dir,
            agent: find_agent(),
            registry: veil_registry::RegistryConfig::default(),
            memory_bytes: 512 << 20,
            cpu_millis: 1000,
            pids_max: 256,
            rootfs_bytes: 256 << 20,
            pool_size: 2,
            pool_memory: None,
            capacity: capacity::Resources::of_this_machine(),
            cache_max_bytes: 10 << 30,
            agent_log: "info".into(),
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            cgroup_parent: "veil".into(),
        }
    }
}

/// Locate the veil-agent binary: `$VEIL_AGENT`, else next to the running executable, else in
/// the directory above it (where cargo puts binaries relative to test executables).
pub fn find_agent() -> PathBuf {
    if let Some(p) = std::env::var_os("VEIL_AGENT") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(PathBuf::from);
    while let Some(d) = dir {
        let cand = d.join("veil-agent");
        if cand.is_file() {
            return cand;
        }
        dir = d.parent().map(PathBuf::from);
        if dir.as_ref().is_some_and(|p| p.join("Cargo.toml").is_file()) {
            break;
        }
    }
    PathBuf::from("veil-agent")
}

struct SandboxEntry {
    id: String,
    handle: Box<dyn SandboxHandle>,
    mux: MuxHandle,
    /// Image this sandbox may fetch, set once at assignment.
    grant: Mutex<Option<Grant>>,
    dead: AtomicBool,
    destroying: AtomicBool,
    destroyed: tokio::sync::OnceCell<()>,
    /// The tenant and function it is assigned to, set at assignment (its log lines go there).
    owner: Mutex<Option<logs::Owner>>,
    /// The tenant's key broker this sandbox may reach through the node, set at assignment.
    kbs_url: Mutex<Option<String>>,
    /// This sandbox's share of the node's budget, given back once it is destroyed.
    reservation: Mutex<Option<capacity::Reservation>>,
    /// Whether the agent opened its (single) log substream.
    log_opened: AtomicBool,
}

impl SandboxEntry {
    /// Whose logs this sandbox's lines go to.
    fn log_owner(&self) -> logs::Owner {
        lock(&self.owner)
            .clone()
            .unwrap_or_else(logs::Owner::unassigned)
    }
}

#[derive(Clone)]
struct Grant {
    image: ResolvedImage,
    digests: HashSet<Digest>,
}

/// A summary of one sandbox for listings.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SandboxInfo {
    /// Sandbox id.
    pub id: String,
    /// Function it is assigned to, if any (`(pool)` for a sandbox of a tenant's pool).
    pub function: Option<String>,
    /// Tenant it is bound to, if any.
    pub tenant: Option<String>,
    /// Host pids of its processes (the agent's, or the VMM's).
    pub pids: Vec<u32>,
    /// Backend and accelerator.
    #[serde(flatten)]
    pub kind: veil_sandbox::SandboxKind,
}

/// The node.
pub struct Node {
    config: NodeConfig,
    backend: Arc<dyn Backend>,
    cache: Arc<BlobCache>,
    sandboxes: Mutex<HashMap<String, Arc<SandboxEntry>>>,
    pool: Mutex<Vec<Arc<SandboxEntry>>>,
    /// Memory and CPU budget every sandbox counts against, booting or booted.
    budget: Arc<capacity::Budget>,
    logs: Arc<logs::LogBook>,
    shutting_down: AtomicBool,
    /// One pool refill at a time, so a burst of cold starts does not overfill the pool.
    filling: AtomicBool,
    /// Generic sandboxes booting for the pool (they count against the pools' memory).
    pool_booting: std::sync::atomic::AtomicUsize,
    /// Pool boots that failed in a row (the retry backs off with it).
    pool_failures: std::sync::atomic::AtomicU32,
    /// Endorses the INSECURE software TEE's sandbox keys (see [`Node::software_tee_host_key`]).
    software_tee_host: veil_attest::software::HostKey,
    /// Sandboxes attested to one tenant ahead of demand.
    tenant_pools: tenant_pool::TenantPools,
}

type RespBody = BoxBody<Bytes, std::io::Error>;

/// The node's software-TEE host key, relative to its state directory (0600; its public key is
/// beside it in `<name>.pub`).
pub const SOFTWARE_TEE_HOST_KEY: &str = "node/software-tee-host.key";

/// How long a sandbox's software-TEE endorsement is valid: it attests right after assignment.
const SOFTWARE_TEE_ENDORSEMENT_TTL: Duration = Duration::from_secs(600);

impl Node {
    /// Start a node with the namespace sandbox backend.
    pub fn new(config: NodeConfig) -> Result<Arc<Self>, NodeError> {
        let backend =
            veil_sandbox::process::ProcessBackend::new(veil_sandbox::process::ProcessConfig {
                agent: config.agent.clone(),
                state_dir: config.state_dir.join("sandboxes"),
                cgroup_root: config.cgroup_root.clone(),
                cgroup_parent: config.cgroup_parent.clone(),
                agent_log: config.agent_log.clone(),
            })?;
        Self::with_backend(config, Arc::new(backend))
    }

    /// The public half of the key this node endorses its sandboxes' INSECURE software-TEE
    /// evidence with (Ed25519, hex). A broker that accepts the software TEE from this node's
    /// sandboxes must trust it; what that trusts is the host itself.
    pub fn software_tee_host_key(&self) -> String {
        self.software_tee_host.public_hex()
    }

    fn endorse_software_tee(
        &self,
        sandbox: &str,
        spec: &InstanceSpec,
    ) -> veil_proto::SoftwareTeeCredential {
        self.endorse_for(sandbox, &spec.tenant, &spec.function)
    }

    /// Endorse `sandbox`'s software-TEE key for `tenant`'s `function` (`*`: any of them, for a
    /// tenant-attested pool).
    fn endorse_for(
        &self,
        sandbox: &str,
        tenant: &str,
        function: &str,
    ) -> veil_proto::SoftwareTeeCredential {
        let c = self.software_tee_host.endorse(
            sandbox,
            tenant,
            function,
            std::time::SystemTime::now(),
            SOFTWARE_TEE_ENDORSEMENT_TTL,
        );
        veil_proto::SoftwareTeeCredential {
            signing_key: c.signing_key,
            endorsement: c.endorsement,
        }
    }

    /// The backend and accelerator its sandboxes run on, e.g. `process` or `microvm/tcg`.
    pub fn backend_label(&self) -> String {
        let k = self.backend.kind();
        match k.accelerator {
            Some(a) => format!("{}/{a}", k.backend),
            None => k.backend,
        }
    }

    /// Start a node with a given backend.
    pub fn with_backend(
        config: NodeConfig,
        backend: Arc<dyn Backend>,
    ) -> Result<Arc<Self>, NodeError> {
        let budget = capacity::Budget::new(
            config.capacity,
            capacity::Resources {
                memory_bytes: config.memory_bytes,
                cpu_millis: u64::from(config.cpu_millis),
            },
        )?;
        if let Some(m) = config.pool_memory {
            if m < config.memory_bytes && config.pool_size > 0 {
                return Err(capacity::CapacityError::PoolTooSmall {
                    pool_memory: m,
                    each_memory: config.memory_bytes,
                }
                .into());
            }
        }
        let store = Arc::new(BlobStore::open(&config.state_dir.join("store"))?);
        let client = veil_registry::RegistryClient::new(config.registry.clone())
            .map_err(|e| NodeError::upstream("registry client", e))?;
        let host_key = config.state_dir.join(SOFTWARE_TEE_HOST_KEY);
        let software_tee_host = veil_attest::software::HostKey::load_or_create(&host_key)
            .map_err(|e| NodeError::Storage(e.to_string()))?;
        let node = Arc::new(Self {
            software_tee_host,
            cache: Arc::new(BlobCache::new(store, client, config.cache_max_bytes)),
            config,
            backend,
            sandboxes: Mutex::new(HashMap::new()),
            pool: Mutex::new(Vec::new()),
            budget,
            logs: Arc::new(logs::LogBook::default()),
            shutting_down: AtomicBool::new(false),
            filling: AtomicBool::new(false),
            pool_booting: std::sync::atomic::AtomicUsize::new(0),
            pool_failures: std::sync::atomic::AtomicU32::new(0),
            tenant_pools: tenant_pool::TenantPools::default(),
        });
        node.spawn_tenant_pool_sweeper();
        // Blobs of images assigned to live sandboxes are never evicted.
        let weak = Arc::downgrade(&node);
        node.cache.set_in_use(Arc::new(move |d: &Digest| {
            weak.upgrade().is_some_and(|n| {
                n.sandboxes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .values()
                    .any(|e| {
                        e.grant
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .as_ref()
                            .is_some_and(|g| g.digests.contains(d))
                    })
            })
        }));
        Ok(node)
    }

    /// The blob cache (and through it the local image store).
    pub fn cache(&self) -> &Arc<BlobCache> {
        &self.cache
    }

    /// Function logs.
    pub fn logs(&self) -> &Arc<logs::LogBook> {
        &self.logs
    }

    /// Resolve an image reference for a deployment.
    pub async fn resolve(&self, image: &str) -> Result<ResolvedImage, NodeError> {
        self.cache.resolve(image).await
    }

    /// Boot a sandbox within `reservation`, which it keeps until destroyed (and gives back at
    /// once if the boot fails).
    async fn boot(
        self: &Arc<Self>,
        reservation: capacity::Reservation,
    ) -> Result<Arc<SandboxEntry>, NodeError> {
        let id = format!("{:016x}", rand::random::<u64>());
        let spec = SandboxSpec {
            id: id.clone(),
            memory_bytes: self.config.memory_bytes,
            cpu_millis: self.config.cpu_millis,
            pids_max: self.config.pids_max,
            rootfs_bytes: self.config.rootfs_bytes,
        };
        let sb = self.backend.create(spec).await?;
        let (mux, incoming) = mux::start(sb.channel, Side::Node);
        let entry = Arc::new(SandboxEntry {
            id: id.clone(),
            handle: sb.handle,
            mux,
            grant: Mutex::new(None),
            dead: AtomicBool::new(false),
            destroying: AtomicBool::new(false),
            destroyed: tokio::sync::OnceCell::new(),
            owner: Mutex::new(None),
            kbs_url: Mutex::new(None),
            reservation: Mutex::new(Some(reservation)),
            log_opened: AtomicBool::new(false),
        });
        self.sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), entry.clone());
        // What the backend saw outside the channel (a namespace agent's early errors, a VM's
        // console): diagnostics, kept under the function once assigned.
        if let Some(console) = sb.console {
            let logs = self.logs.clone();
            let e = entry.clone();
            tokio::spawn(read_lines(console, move |line| {
                tracing::debug!(sandbox = %e.id, "console: {line}");
                logs.push(&e.log_owner(), &e.id, &format!("[console] {line}"));
            }));
        }
        // Requests the agent makes (image blobs).
        tokio::spawn(serve_agent(
            self.cache.clone(),
            self.logs.clone(),
            entry.clone(),
            incoming,
        ));
        // Notice when the sandbox ends on its own.
        let me = Arc::downgrade(self);
        let e = entry.clone();
        tokio::spawn(async move {
            let exit = e.handle.exited().await;
            e.dead.store(true, Ordering::SeqCst);
            if let Some(node) = me.upgrade() {
                if !e.destroying.load(Ordering::SeqCst) {
                    // One booted as the node shut down is ended by the backend: expected.
                    if node.shutting_down.load(Ordering::SeqCst) {
                        tracing::debug!(sandbox = %e.id, %exit, "sandbox ended at shutdown");
                    } else {
                        tracing::warn!(sandbox = %e.id, %exit, "sandbox ended");
                    }
                    node.destroy_entry(&e).await;
                    // A pooled sandbox that died is replaced.
                    if !node.shutting_down.load(Ordering::SeqCst) {
                        tokio::spawn(pool::refill_later(Arc::downgrade(&node), Duration::ZERO));
                    }
                }
            }
        });
        // Wait until the agent answers, and speaks this node's protocol.
        let t = Instant::now();
        let deadline = self.backend.boot_timeout();
        loop {
            let req = hyper::Request::get(veil_proto::HEALTH_PATH)
                .header(http::header::HOST, "agent")
                .body(Empty::<Bytes>::new())
                .map_err(|e| NodeError::Channel {
                    id: id.clone(),
                    reason: e.to_string(),
                })?;
            match entry.mux.request(StreamKind::Control, req).await {
                Ok(r) if r.status().is_success() => {
                    let body = r.into_body().collect().await.map(|b| b.to_bytes());
                    let health = body
                        .ok()
                        .and_then(|b| serde_json::from_slice::<veil_proto::Health>(&b).ok());
                    match health {
                        Some(h) if h.protocol == veil_proto::PROTOCOL_VERSION => break,
                        other => {
                            self.destroy_entry(&entry).await;
                            let theirs = other.map_or(
                                "an unknown protocol (no version in its health answer)".to_string(),
                                |h| {
                                    format!(
                                        "protocol {} (agent {}, {})",
                                        h.protocol, h.agent, h.platform
                                    )
                                },
                            );
                            return Err(NodeError::Channel {
                                id,
                                reason: format!(
                                    "the agent speaks {theirs}, this node speaks protocol {}: \
                                     rebuild the agent (or the guest image) from this veil",
                                    veil_proto::PROTOCOL_VERSION
                                ),
                            });
                        }
                    }
                }
                Ok(r) => {
                    self.destroy_entry(&entry).await;
                    return Err(NodeError::Channel {
                        id,
                        reason: format!("agent health check answered {}", r.status()),
                    });
                }
                Err(e) => {
                    if entry.dead.load(Ordering::SeqCst) || t.elapsed() > deadline {
                        let logs = self.logs.tail_sandbox(&id, 5).join(" | ");
                        self.destroy_entry(&entry).await;
                        return Err(NodeError::Channel {
                            id,
                            reason: format!("agent did not come up: {e} {logs}"),
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
        Ok(entry)
    }

    async fn destroy_entry(&self, e: &SandboxEntry) {
        e.destroyed
            .get_or_init(|| async {
                e.destroying.store(true, Ordering::SeqCst);
                e.dead.store(true, Ordering::SeqCst);
                if let Err(err) = e.handle.destroy().await {
                    tracing::error!(sandbox = %e.id, error = %err, "destroying sandbox failed");
                }
                self.sandboxes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&e.id);
                // Its processes are gone (or reported): its share of the budget comes back.
                drop(lock(&e.reservation).take());
                tracing::debug!(sandbox = %e.id, "sandbox destroyed");
            })
            .await;
    }

    /// All live sandboxes.
    pub fn sandboxes(&self) -> Vec<SandboxInfo> {
        let map = self.sandboxes.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<SandboxInfo> = map
            .values()
            .map(|e| {
                let owner = lock(&e.owner).clone();
                SandboxInfo {
                    id: e.id.clone(),
                    function: owner.as_ref().map(|o| o.function.clone()),
                    tenant: owner.map(|o| o.tenant),
                    pids: e.handle.pids(),
                    kind: self.backend.kind(),
                }
            })
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Destroy every sandbox (pooled ones too) and stop refilling the pool.
    pub async fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        lock(&self.pool).clear();
        self.clear_tenant_pools();
        let all: Vec<Arc<SandboxEntry>> = self
            .sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        futures::future::join_all(all.iter().map(|e| self.destroy_entry(e))).await;
        // Sandboxes still booting are not registered yet: the backend ends those.
        self.backend.shutdown().await;
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A boxed future, for trait objects elsewhere.
pub type NodeFuture<'a, T> = BoxFuture<'a, T>;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn output_lines_are_bounded_and_lossy() {
        let mut data = b"first\n".to_vec();
        data.extend(std::iter::repeat_n(b'x', 100_000));
        data.extend(b"\nbad \xff\xfe bytes\nlast without newline");
        let mut got = Vec::new();
        read_lines(&data[..], |l| got.push(l.to_string())).await;
        assert_eq!(got.len(), 4);
        assert_eq!(got[0], "first");
        assert_eq!(got[1].len(), MAX_LINE);
        assert_eq!(got[2], "bad \u{fffd}\u{fffd} bytes");
        assert_eq!(got[3], "last without newline");
    }
}
