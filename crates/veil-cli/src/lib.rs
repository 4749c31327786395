//! The library behind the `veil` command: starting the platform in one process, the admin
//! client, image commands and the demo. Tests drive the platform through this crate.
#![forbid(unsafe_code)]

pub mod backend;
pub mod bench;
pub mod client;
pub mod demo;
pub mod guest;
pub mod images;
pub mod serving;
pub mod simulate;

use anyhow::{bail, Context, Result};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use veil_gateway::{Gateway, GatewayConfig};
use veil_node::NodeConfig;

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
    /// Memory the pools together (generic and tenants') may commit (default: all of the
    /// capacity).
    pub pool_memory: Option<u64>,
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
    /// Memory all sandboxes together may commit (default: derived from the machine).
    pub capacity_memory: Option<u64>,
    /// CPU all sandboxes together may commit, in thousandths of a core (default: derived from
    /// the machine).
    pub capacity_cpu_millis: Option<u64>,
    /// How long instances taken out of service get to finish their requests.
    pub drain_timeout: Duration,
    /// Limits of asynchronous invocations.
    pub invocations: veil_gateway::InvocationsConfig,
    /// The autoscaler's windows.
    pub autoscale: veil_gateway::AutoscaleConfig,
    /// Limits of the local image store's uploads.
    pub local_store: veil_gateway::LocalStoreConfig,
    /// Which sandboxes functions run in.
    pub backend: backend::BackendChoice,
    /// Bin width of the hybrid keep-alive policy's idle-time histogram (one minute).
    pub keep_alive_bin: Duration,
    /// Tenants' pools of sandboxes attested ahead of demand.
    pub tenant_pools: Vec<TenantPoolSpec>,
    /// Lifetime of the embedded broker's attestation tokens (default 300 s).
    pub kbs_token_ttl: Option<Duration>,
}

/// A tenant's pool as `veil up --tenant-pool` names it: `TENANT=SIZE`, optionally followed by
/// `,kbs=URL` (default: the embedded broker) and `,insecure-software-tee`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantPoolSpec {
    /// The tenant.
    pub tenant: String,
    /// Sandboxes kept attested.
    pub size: usize,
    /// The tenant's broker (default: the embedded one).
    pub kbs_url: Option<String>,
    /// Attest with the INSECURE software TEE where no SEV-SNP/TDX exists.
    pub allow_insecure_software_tee: bool,
}

impl std::str::FromStr for TenantPoolSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let head = parts.next().unwrap_or_default();
        let (tenant, size) = head.split_once('=').ok_or_else(|| {
            format!("{s:?}: expected TENANT=SIZE[,kbs=URL][,insecure-software-tee]")
        })?;
        if tenant.is_empty()
            || tenant.len() > 128
            || !tenant
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(format!("{s:?}: {tenant:?} is not a tenant name"));
        }
        let size: usize = size
            .parse()
            .ok()
            .filter(|n| *n <= 256)
            .ok_or_else(|| format!("{s:?}: the size must be a number from 0 to 256"))?;
        let mut spec = TenantPoolSpec {
            tenant: tenant.to_string(),
            size,
            kbs_url: None,
            allow_insecure_software_tee: false,
        };
        for p in parts {
            match p.split_once('=') {
                Some(("kbs", u)) if u.starts_with("http://") || u.starts_with("https://") => {
                    spec.kbs_url = Some(u.to_string())
                }
                None if p == "insecure-software-tee" => spec.allow_insecure_software_tee = true,
                _ => return Err(format!("{s:?}: unknown pool option {p:?}")),
            }
        }
        Ok(spec)
    }
}

impl UpOptions {
    /// Embedded defaults.
    pub fn defaults(state_dir: PathBuf) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            state_dir,
            pool_size: 2,
            pool_memory: None,
            host_suffix: ".veil.localhost".into(),
            max_queue: 256,
            cold_start_timeout: Duration::from_secs(60),
            insecure_registries: Vec::new(),
            agent_log: "info".into(),
            embedded_kbs: true,
            cache_max_bytes: 10 << 30,
            capacity_memory: None,
            capacity_cpu_millis: None,
            drain_timeout: Duration::from_secs(30),
            invocations: Default::default(),
            autoscale: Default::default(),
            local_store: veil_gateway::LocalStoreConfig::default(),
            backend: backend::BackendChoice::Process,
            keep_alive_bin: Duration::from_secs(60),
            tenant_pools: Vec::new(),
            kbs_token_ttl: None,
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
    operator_token: String,
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
        // Blobs of every tenant (plaintext for unencrypted images), deployments with their
        // environments, keys and tokens live here: no other local user may read any of it.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&opts.state_dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("make {} private", opts.state_dir.display()))?;
        }
        let mut ncfg = NodeConfig::with_state_dir(opts.state_dir.clone());
        ncfg.pool_size = opts.pool_size;
        ncfg.pool_memory = opts.pool_memory;
        ncfg.cache_max_bytes = opts.cache_max_bytes;
        ncfg.capacity.memory_bytes = opts.capacity_memory.unwrap_or(ncfg.capacity.memory_bytes);
        ncfg.capacity.cpu_millis = opts.capacity_cpu_millis.unwrap_or(ncfg.capacity.cpu_millis);
        ncfg.agent_log = opts.agent_log.clone();
        ncfg.registry.insecure = opts.insecure_registries.clone();
        let node = backend::start_node(&opts.backend, ncfg).await?;
        let listener = tokio::net::TcpListener::bind(opts.listen)
            .await
            .with_context(|| format!("listen on {}", opts.listen))?;
        let addr = listener.local_addr()?;
        let kbs = if opts.embedded_kbs {
            let kdir = opts.state_dir.join("kbs");
            let first_start = !kdir.join("kbs.db").exists();
            let mut kcfg = veil_kbs::KbsConfig::new(kdir);
            // No SEV-SNP or TDX here: the embedded development broker accepts the insecure
            // software TEE, but only from sandboxes this node started and endorsed, and only for
            // tenants that opted in. A tenant's production broker (`veil kbs serve`) refuses it.
            kcfg.allow_insecure_software_tee = true;
            kcfg.software_tee_hosts = vec![node.software_tee_host_key()];
            if let Some(ttl) = opts.kbs_token_ttl {
                kcfg.token_ttl = ttl;
            }
            let kbs = veil_kbs::Kbs::open(kcfg).context("start the embedded key broker")?;
            if first_start {
                // The development default: tenant `default` opts in. Other tenants opt in with
                // `veil kbs set-reference-values software_tee_tenants default <tenant>…`.
                kbs.set_reference_values(veil_kbs::SOFTWARE_TEE_TENANTS, &["default".into()])
                    .context("opt tenant default in to the software TEE")?;
            }
            let tenants = kbs
                .reference_values()
                .ok()
                .and_then(|mut r| r.remove(veil_kbs::SOFTWARE_TEE_TENANTS))
                .unwrap_or_default();
            tracing::warn!(
                tenants = ?tenants,
                "embedded key broker at http://{addr}/kbs/v0 accepts the INSECURE software TEE \
                 (development default) for these tenants: {}; admin key: {}",
                veil_attest::software::TRUSTS,
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
                drain_timeout: opts.drain_timeout,
                invocations: opts.invocations.clone(),
                autoscale: opts.autoscale.clone(),
                local_store: opts.local_store.clone(),
                keep_alive_bin: opts.keep_alive_bin,
            },
        )
        .context("open the gateway's token store")?;
        let operator_token = std::fs::read_to_string(gateway.operator_token_path())
            .context("read the operator token")?
            .trim()
            .to_string();
        let mut app = gateway.router();
        if let Some(k) = &kbs {
            app = app.merge(k.embeddable_router());
        }
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            veil_gateway::serve_app(app, listener, async move {
                let _ = rx.await;
            })
            .await
        });
        let n = node.clone();
        tokio::spawn(async move { n.fill_pool().await });
        for p in &opts.tenant_pools {
            let kbs_url = match (&p.kbs_url, &kbs) {
                (Some(u), _) => u.clone(),
                (None, Some(_)) => format!("http://{addr}"),
                (None, None) => bail!(
                    "the pool of tenant {} names no key broker, and veil runs without the \
                     embedded one: give it ,kbs=URL",
                    p.tenant
                ),
            };
            node.set_tenant_pool(veil_node::TenantPoolConfig {
                tenant: p.tenant.clone(),
                size: p.size,
                kbs_url,
                allow_insecure_software_tee: p.allow_insecure_software_tee,
            })
            .await;
        }
        tracing::info!(%addr, "veil is up");
        Ok(Self {
            gateway,
            addr,
            operator_token,
            kbs,
            stop: Some(tx),
            task: Some(task),
        })
    }

    /// Base URL of the gateway.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The operator token (also in `<state dir>/auth/operator.token`).
    pub fn operator_token(&self) -> &str {
        &self.operator_token
    }

    /// An admin client with the operator token.
    pub fn admin_client(&self) -> Result<client::AdminClient> {
        Ok(client::AdminClient::new(&self.url())?.with_token(&self.operator_token))
    }

    /// A registry client that pushes to and pulls from this platform's local store with the
    /// operator token.
    pub fn registry_client(&self) -> Result<veil_registry::RegistryClient> {
        images::registry_client_with_token(&[], &self.url(), &self.operator_token)
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
