//! The library behind the `veil` command: starting the platform in one process, the admin
//! client, image commands and the demo. Tests drive the platform through this crate.
#![forbid(unsafe_code)]

pub mod client;
pub mod demo;
pub mod images;

use anyhow::{bail, Context, Result};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use veil_gateway::{Gateway, GatewayConfig};
use veil_node::{Node, NodeConfig};

/// The example function, built by build.rs as a static binary.
pub const HELLO_BINARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hello-fn"));

/// Options of `veil up` (and of the in-process platform the demo and tests start).
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// Address the gateway listens on.
    pub listen: SocketAddr,
    /// State directory.
    pub state_dir: PathBuf,
    /// Generic sandboxes kept booted.
    pub pool_size: usize,
    /// Host suffix for Host-header routing.
    pub host_suffix: String,
    /// Max requests queued per function.
    pub max_queue: usize,
    /// How long a request waits for a cold start.
    pub cold_start_timeout: Duration,
    /// Registries reached over plain HTTP besides loopback.
    pub insecure_registries: Vec<String>,
    /// Log filter for agents.
    pub agent_log: String,
    /// Run a key broker in-process at `/kbs/v0/` (the default for `veil up`).
    pub embedded_kbs: bool,
    /// Bytes of upstream blobs the node cache keeps (least recently used are evicted).
    pub cache_max_bytes: u64,
}

impl UpOptions {
    /// Embedded defaults.
    pub fn defaults(state_dir: PathBuf) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            state_dir,
            pool_size: 2,
            host_suffix: ".veil.localhost".into(),
            max_queue: 256,
            cold_start_timeout: Duration::from_secs(60),
            insecure_registries: Vec::new(),
            agent_log: "info".into(),
            embedded_kbs: true,
            cache_max_bytes: 10 << 30,
        }
    }
}

/// A platform (node + gateway) running in this process.
pub struct Platform {
    /// The gateway.
    pub gateway: Arc<Gateway>,
    /// Where it listens.
    pub addr: SocketAddr,
    /// The embedded key broker, if any.
    pub kbs: Option<Arc<veil_kbs::Kbs>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

/// Fail early with a clear message when the namespace backend cannot work here.
pub fn preflight() -> Result<()> {
    if !nix_is_root() {
        bail!("veil's namespace sandbox backend needs root (it creates namespaces and cgroups); run as root");
    }
    Ok(())
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

impl Platform {
    /// Start node and gateway; the pool is filled in the background.
    pub async fn start(opts: UpOptions) -> Result<Self> {
        preflight()?;
        std::fs::create_dir_all(&opts.state_dir)
            .with_context(|| format!("create state dir {}", opts.state_dir.display()))?;
        let mut ncfg = NodeConfig::with_state_dir(opts.state_dir.clone());
        ncfg.pool_size = opts.pool_size;
        ncfg.cache_max_bytes = opts.cache_max_bytes;
        ncfg.agent_log = opts.agent_log.clone();
        ncfg.registry.insecure = opts.insecure_registries.clone();
        let node = Node::new(ncfg).context("start the node")?;
        let listener = tokio::net::TcpListener::bind(opts.listen)
            .await
            .with_context(|| format!("listen on {}", opts.listen))?;
        let addr = listener.local_addr()?;
        let kbs = if opts.embedded_kbs {
            let mut kcfg = veil_kbs::KbsConfig::new(opts.state_dir.join("kbs"));
            // No SEV-SNP or TDX here: the embedded development broker accepts the insecure
            // software TEE. A tenant's production broker (`veil kbs serve`) refuses it.
            kcfg.allow_insecure_software_tee = true;
            let kbs = veil_kbs::Kbs::open(kcfg).context("start the embedded key broker")?;
            tracing::warn!(
                "embedded key broker at http://{addr}/kbs/v0 accepts the INSECURE software TEE \
                 (development default); admin key: {}",
                kbs.admin_key_path().display()
            );
            Some(kbs)
        } else {
            None
        };
        let gateway = Gateway::new(
            node.clone(),
            GatewayConfig {
                listen: addr,
                host_suffix: opts.host_suffix.clone(),
                max_queue: opts.max_queue,
                cold_start_timeout: opts.cold_start_timeout,
                state_dir: opts.state_dir.clone(),
                default_kbs_url: kbs.as_ref().map(|_| format!("http://{addr}")),
                local_store: veil_gateway::LocalStoreConfig::default(),
            },
        );
        let mut app = gateway.router();
        if let Some(k) = &kbs {
            app = app.merge(k.embeddable_router());
        }
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await
        });
        let n = node.clone();
        tokio::spawn(async move { n.fill_pool().await });
        tracing::info!(%addr, "veil is up");
        Ok(Self {
            gateway,
            addr,
            kbs,
            stop: Some(tx),
            task: Some(task),
        })
    }

    /// Base URL of the gateway.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stop serving and destroy every sandbox.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.gateway.shutdown().await;
        if let Some(t) = self.task.take() {
            match tokio::time::timeout(Duration::from_secs(5), t).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => return Err(e.into()),
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => tracing::warn!("gateway did not stop within 5 s"),
            }
        }
        Ok(())
    }
}

/// Default state directory: `$VEIL_STATE_DIR`, else `/var/lib/veil`.
pub fn default_state_dir() -> PathBuf {
    std::env::var_os("VEIL_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/veil"))
}
