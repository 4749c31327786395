//! `veil`: run the platform, deploy and invoke functions, build and push images.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use veil_cli::client::AdminClient;
use veil_cli::{images, Platform, UpOptions};
use veil_gateway::DeployRequest;
use veil_image::Reference;

mod measure;

#[derive(Parser)]
#[command(name = "veil", version, about = "Serverless confidential functions")]
struct Cli {
    /// Address of a running veil (`veil up`).
    #[arg(
        long,
        global = true,
        env = "VEIL_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    server: String,
    /// Token for the admin API and the local image store (default: the operator token in
    /// `$VEIL_STATE_DIR/auth/operator.token`, else `/var/lib/veil/auth/operator.token`).
    #[arg(long, global = true, env = "VEIL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

/// The token the CLI authenticates with: `--token`/`$VEIL_TOKEN`, else the operator token of
/// the default state directory when this user can read it.
fn resolve_token(explicit: Option<String>) -> Option<String> {
    explicit.or_else(|| {
        std::fs::read_to_string(
            veil_cli::default_state_dir().join(veil_gateway::auth::OPERATOR_TOKEN_FILE),
        )
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
    })
}

#[derive(Subcommand)]
enum Cmd {
    /// Run gateway and node (namespace sandboxes, local image store) until interrupted.
    Up(UpArgs),
    /// Build the example function, deploy it, invoke it cold and warm, print latencies, stop.
    Demo {
        /// State directory (default: a fresh temporary one).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[command(flatten)]
        backend: BackendArgs,
    },
    /// Measure cold start, warm start and instantiation throughput up the ladder of what
    /// confidentiality adds, beside the skopeo + umoci + runc pipeline; writes bench.json and
    /// bench.md.
    Bench(BenchArgs),
    /// Deploy (or update) a function.
    Deploy(DeployArgs),
    /// Invoke a function and print its response body.
    Invoke {
        /// Function name.
        name: String,
        /// Request body, or @file to read it from a file.
        #[arg(short, long)]
        data: Option<String>,
        /// Path within the function.
        #[arg(long, default_value = "/")]
        path: String,
        /// HTTP method (default POST with --data, else GET).
        #[arg(short = 'X', long)]
        method: Option<String>,
        /// Print status and headers too.
        #[arg(short, long)]
        verbose: bool,
        /// Answered at once with an invocation id (`Prefer: respond-async`): veil stores the
        /// request, runs it with retries, and `veil invocation get <id>` shows the result.
        #[arg(long = "async")]
        run_async: bool,
    },
    /// Results of asynchronous invocations.
    #[command(subcommand)]
    Invocation(InvocationCmd),
    /// List deployed functions.
    Ls,
    /// Show one function: its settings, instances, keep-alive decision and the phase
    /// breakdown of its latest cold starts.
    Describe {
        /// Function name.
        name: String,
    },
    /// Show a function's recent log lines.
    Logs {
        /// Function name.
        name: String,
        /// Number of lines.
        #[arg(long, default_value_t = 100)]
        tail: usize,
        /// Keep printing new lines as the function writes them (until the function is
        /// deleted, or Ctrl-C).
        #[arg(short, long)]
        follow: bool,
    },
    /// Delete a function and its instances.
    Delete {
        /// Function name.
        name: String,
    },
    /// List a function's revisions: traffic, tags, instances, image.
    Revisions {
        /// Function name.
        name: String,
    },
    /// Split a function's traffic between revisions, e.g. `veil traffic hello 3=90 @latest=10
    /// --tag canary=@latest`. `@latest` follows every new deploy; a pinned revision does not.
    /// Revisions that lose their traffic drain.
    Traffic {
        /// Function name.
        name: String,
        /// `<revision>=<percent>` or `@latest=<percent>`; the percents sum to 100.
        #[arg(required = true)]
        splits: Vec<String>,
        /// `<tag>=<revision>` or `<tag>=@latest`: the target gets its own address,
        /// `/f/<fn>@<tag>/` (or `Host: <tag>.<fn><suffix>`).
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
    /// Send all of a function's traffic back to an older revision (by default the newest one
    /// older than the revision taking most of it now). Tags stay.
    Rollback {
        /// Function name.
        name: String,
        /// The revision to roll back to.
        #[arg(long)]
        to: Option<u64>,
    },
    /// Build, push and inspect images.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Attestation tools.
    #[command(subcommand)]
    Attest(AttestCmd),
    /// Run or administer a key broker (KBS).
    #[command(subcommand)]
    Kbs(KbsCmd),
    /// Print the expected SEV-SNP launch measurement of a guest (flags and output as
    /// sev-snp-measure's).
    Measure(measure::MeasureArgs),
    /// Create, list and revoke tenant tokens (needs the operator token).
    #[command(subcommand)]
    Token(TokenCmd),
    /// Build the microVM guest (kernel, initrd with veil-agent as /init, command line).
    #[command(subcommand)]
    Guest(GuestCmd),
    /// Simulations that need no running veil.
    #[command(subcommand)]
    Simulate(SimulateCmd),
    /// Tenants' pools of sandboxes attested ahead of demand (needs the operator token).
    #[command(subcommand)]
    Pool(PoolCmd),
    /// List tenants, or delete one with everything it runs (needs the operator token).
    #[command(subcommand)]
    Tenant(TenantCmd),
}

#[derive(Subcommand)]
enum InvocationCmd {
    /// Show an asynchronous invocation: its state, and the function's response body once it
    /// succeeded (exit status 1 if it failed, 2 if it has not finished).
    Get {
        /// The id `veil invoke --async` printed.
        id: String,
        /// Wait up to this many seconds for it to finish.
        #[arg(long)]
        wait: Option<u64>,
        /// Print the whole record as JSON (the body base64-encoded).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TenantCmd {
    /// List the tenants: tokens, functions, pool and repositories of each.
    Ls,
    /// Delete a tenant: revoke its tokens, destroy its pool, delete its functions (their
    /// requests in flight finish first). Its repositories stay its own.
    Rm {
        /// The tenant.
        tenant: String,
    },
}

#[derive(Subcommand)]
enum PoolCmd {
    /// List the pools: size, ready, preparing, and why the last preparation failed.
    Ls,
    /// Create, resize or reconfigure a tenant's pool.
    Set {
        /// The tenant.
        tenant: String,
        /// Sandboxes kept attested (0 removes the pool).
        #[arg(long)]
        size: usize,
        /// The tenant's key broker (default: the one embedded in `veil up`).
        #[arg(long)]
        kbs_url: Option<String>,
        /// Attest with the INSECURE software TEE where no SEV-SNP/TDX exists.
        #[arg(long)]
        allow_insecure_software_tee: bool,
    },
    /// Remove a tenant's pool; its sandboxes are destroyed.
    Rm {
        /// The tenant.
        tenant: String,
    },
}

#[derive(Subcommand)]
enum SimulateCmd {
    /// Replay an invocation trace (Azure Functions 2019 per-minute format) against the
    /// keep-alive policies: cold-start fraction and idle memory-time of each.
    KeepAlive(veil_cli::simulate::KeepAliveArgs),
}

#[derive(Subcommand)]
enum GuestCmd {
    /// Build the guest artifacts and print their paths, sizes and SHA-256 digests.
    Build {
        /// Output directory (default: <state dir>/guest).
        #[arg(long)]
        out: Option<PathBuf>,
        /// The veil-agent binary (default: $VEIL_AGENT, else next to this executable).
        #[arg(long)]
        agent: Option<PathBuf>,
        /// Kernel image (default: the newest boot/vmlinuz-* in --kernel-dir).
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// The kernel's lib/modules/<version> directory (default: beside the kernel image).
        #[arg(long)]
        modules_dir: Option<PathBuf>,
        /// Where scripts/install-deps.sh unpacked Debian's cloud kernel.
        #[arg(long, default_value = veil_guest::DEFAULT_KERNEL_DIR)]
        kernel_dir: PathBuf,
        /// Kernel command line.
        #[arg(long, default_value = veil_guest::DEFAULT_CMDLINE)]
        cmdline: String,
        /// Keep the agent's symbols and debug information.
        #[arg(long)]
        no_strip: bool,
        /// Firmware for the SNP launch measurement: an OVMF built from edk2's AmdSevX64 (with
        /// the SNP kernel-hashes section). Without it no measurement is printed.
        #[arg(long)]
        firmware: Option<PathBuf>,
        /// vCPUs of the measured guest.
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a token for a tenant and print it (the only time it is shown).
    Create {
        /// The tenant it acts for.
        #[arg(long)]
        tenant: String,
    },
    /// List tenant tokens (ids and tenants, never the tokens).
    Ls,
    /// Revoke a token by id.
    Revoke {
        /// Token id (from `veil token ls`).
        id: String,
    },
}

/// `veil bench`.
#[derive(Args, Debug)]
struct BenchArgs {
    /// A smoke run: one round, ten warm requests, N = 1 and 4.
    #[arg(long)]
    quick: bool,
    /// Where bench.json and bench.md go.
    #[arg(long, default_value = "veil-bench")]
    out: PathBuf,
    /// Cold starts per configuration and pipeline runs per image (default 5; 1 with --quick).
    #[arg(long)]
    rounds: Option<usize>,
    /// Warm requests per configuration (default 100; 10 with --quick).
    #[arg(long)]
    warm: Option<usize>,
    /// Concurrent cold starts of distinct functions, each N measured (default 1,4,16,64).
    #[arg(long, value_delimiter = ',')]
    throughput_n: Vec<usize>,
    /// Leave out the skopeo + umoci + runc pipeline.
    #[arg(long)]
    no_pipeline: bool,
}

#[derive(Args)]
struct KbsAdmin {
    /// The broker (default: the one embedded in the running `veil up`).
    #[arg(long, env = "VEIL_KBS_URL")]
    kbs_url: Option<String>,
    /// The broker's admin private key (default: <state dir>/kbs/admin.key).
    #[arg(long, env = "VEIL_KBS_ADMIN_KEY")]
    admin_key: Option<PathBuf>,
}

#[derive(Subcommand)]
enum KbsCmd {
    /// Run a standalone key broker with SQLite storage.
    Serve {
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: std::net::SocketAddr,
        /// State directory (database and keys).
        #[arg(long, default_value = "/var/lib/veil-kbs")]
        state_dir: PathBuf,
        /// Accept the INSECURE software TEE (development only): evidence endorsed by a node
        /// named with --software-tee-host, for tenants listed in the reference value
        /// `software_tee_tenants`. It trusts those nodes' hosts completely.
        #[arg(long)]
        allow_insecure_software_tee: bool,
        /// A node's software-TEE host public key (hex, or a file holding it, such as
        /// `<state dir>/node/software-tee-host.key.pub`) whose sandboxes may use the software
        /// TEE. Repeatable.
        #[arg(long = "software-tee-host", requires = "allow_insecure_software_tee")]
        software_tee_hosts: Vec<String>,
        /// Also accept UNENDORSED sample evidence from ANY client, as trustee's KBS accepts
        /// sample evidence (for trustee's `kbs-client` and guests without a veil node). It
        /// proves nothing: anyone who reaches the broker can make it up. Such a client's token
        /// names no tenant, so it gets only what the resource policy releases explicitly
        /// (`veil kbs set-policy resource`). Development only.
        #[arg(long, requires = "allow_insecure_software_tee")]
        insecure_allow_unendorsed_sample: bool,
    },
    /// Store a resource (`<tenant>/<type>/<tag>`).
    SetResource {
        /// Resource path.
        path: String,
        /// Value (prefer --file for anything secret: arguments show up in process lists).
        #[arg(long, conflicts_with = "file")]
        value: Option<String>,
        /// Read the value from a file.
        #[arg(long)]
        file: Option<PathBuf>,
        #[command(flatten)]
        admin: KbsAdmin,
    },
    /// Set the accepted values of a reference value (e.g. `measurement`).
    SetReferenceValues {
        /// Name.
        name: String,
        /// Accepted values: hex or <alg>:<hex> (an image reference for `image`, a resource path
        /// for `signature_policy`).
        values: Vec<String>,
        #[command(flatten)]
        admin: KbsAdmin,
    },
    /// Replace the attestation or resource policy (Rego).
    SetPolicy {
        /// Which policy.
        #[arg(value_parser = ["attestation", "resource"])]
        which: String,
        /// Rego file.
        file: PathBuf,
        #[command(flatten)]
        admin: KbsAdmin,
    },
    /// List resource paths (never values).
    Ls {
        #[command(flatten)]
        admin: KbsAdmin,
    },
}

#[derive(Subcommand)]
enum AttestCmd {
    /// Check an SEV-SNP report, a TDX quote or an evidence JSON file offline and print whether
    /// it verifies, the measurement, TCB and report data.
    Verify {
        /// The report, quote or evidence file.
        file: PathBuf,
        /// VCEK certificate (DER) for an SNP report.
        #[arg(long)]
        vcek: Option<PathBuf>,
        /// VLEK certificate (DER) for an SNP report.
        #[arg(long)]
        vlek: Option<PathBuf>,
        /// Extra AMD intermediate certificates (PEM).
        #[arg(long)]
        ca_chain: Option<PathBuf>,
        /// TDX collateral (JSON file or directory).
        #[arg(long)]
        collateral: Option<PathBuf>,
        /// Expected report data (128 hex digits); without it the binding is not checked.
        #[arg(long)]
        report_data: Option<String>,
        /// Verify as of this Unix time instead of now (collateral and certificates expire).
        #[arg(long)]
        at: Option<u64>,
    },
}

#[derive(Args)]
struct UpArgs {
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: std::net::SocketAddr,
    /// State directory.
    #[arg(long, env = "VEIL_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Generic sandboxes kept booted ahead of demand.
    #[arg(long, default_value_t = 2)]
    pool_size: usize,
    /// A tenant's pool of sandboxes attested to its key broker ahead of demand:
    /// TENANT=SIZE[,kbs=URL][,insecure-software-tee] (repeatable; default broker: the
    /// embedded one). Its functions' cold starts then have no attestation on their path.
    #[arg(long = "tenant-pool")]
    tenant_pools: Vec<veil_cli::TenantPoolSpec>,
    /// Memory the pools together may commit (generic and tenant-attested sandboxes not yet
    /// assigned), e.g. 4GiB; tenants' pools fill first, in turn [default: all of the capacity].
    /// A start a request waits on that finds the node full evicts the oldest idle
    /// tenant-attested sandbox.
    #[arg(long, value_parser = veil_node::capacity::parse_size)]
    pool_memory: Option<u64>,
    /// Registries (host:port) to reach over plain HTTP besides loopback.
    #[arg(long = "insecure-registry")]
    insecure_registries: Vec<String>,
    /// Bytes of registry blobs the node cache keeps before evicting the least recently used.
    #[arg(long, default_value_t = 10 << 30)]
    cache_max_bytes: u64,
    /// Memory all sandboxes together may commit (their limits, pooled ones included), e.g.
    /// 8GiB [default: total memory less max(1 GiB, an eighth)].
    #[arg(long, value_parser = veil_node::capacity::parse_size)]
    capacity_memory: Option<u64>,
    /// CPUs all sandboxes together may commit, e.g. 3 or 1.5 [default: 4 per CPU].
    #[arg(long)]
    capacity_cpus: Option<f64>,
    /// Seconds instances taken out of service (redeploy, delete, scale-down) get to finish
    /// their requests before they are destroyed anyway.
    #[arg(long, default_value_t = 30)]
    drain_timeout: u64,
    /// The autoscaler's stable window: concurrency is averaged over it to size functions,
    /// e.g. 60s.
    #[arg(long, value_parser = veil_cli::serving::parse_duration, default_value = "60s")]
    stable_window: std::time::Duration,
    /// The autoscaler's panic window (a burst wanting twice the ready instances over it
    /// scales up at once, and nothing scales down for a stable window), e.g. 6s.
    #[arg(long, value_parser = veil_cli::serving::parse_duration, default_value = "6s")]
    panic_window: std::time::Duration,
    /// Asynchronous invocation attempts running at once (over all functions).
    #[arg(long, default_value_t = 16)]
    async_concurrency: usize,
    /// Attempts an asynchronous invocation gets (the first included; retried on a 5xx, a
    /// timeout, or no instance).
    #[arg(long, default_value_t = 3)]
    async_attempts: u32,
    /// Seconds one attempt of an asynchronous invocation may take.
    #[arg(long, default_value_t = 300)]
    async_timeout: u64,
    /// Seconds a finished asynchronous invocation's result is kept.
    #[arg(long, default_value_t = 86400)]
    async_retention: u64,
    /// Largest blob a push to the local store may upload, e.g. 512MiB (larger: 413).
    #[arg(long, value_parser = veil_node::capacity::parse_size, default_value = "2GiB")]
    max_blob_size: u64,
    /// Seconds without activity after which an upload to the local store is abandoned (its
    /// file deleted, its id forgotten).
    #[arg(long, default_value_t = 600)]
    upload_expiry: u64,
    /// Most bytes the local image store holds (finished pushes and uploads in progress);
    /// pushes beyond it get 507.
    #[arg(long, value_parser = veil_node::capacity::parse_size, default_value = "20GiB")]
    max_store_size: u64,
    #[command(flatten)]
    backend: BackendArgs,
}

/// Where functions run.
#[derive(Args)]
struct BackendArgs {
    /// Sandbox backend: process (namespaces; the host can read them), microvm (QEMU
    /// microVMs), cvm (SEV-SNP or TDX confidential VMs, with --tee).
    #[arg(long, default_value = "process")]
    backend: String,
    /// The TEE of --backend cvm: snp or tdx.
    #[arg(long)]
    tee: Option<veil_cli::backend::Tee>,
    /// Accelerator of VM backends: auto (KVM if a probe guest boots under it in time, else
    /// TCG), kvm or tcg.
    #[arg(long, default_value = "auto")]
    accel: veil_sandbox::microvm::Accel,
    /// A guest built with `veil guest build --out DIR` (default: built at start into
    /// <state dir>/guest from this veil's agent).
    #[arg(long)]
    guest_dir: Option<PathBuf>,
    /// Firmware of --backend cvm (an OVMF with SNP kernel hashes, or TDVF).
    #[arg(long)]
    firmware: Option<PathBuf>,
}

impl BackendArgs {
    fn choice(&self) -> Result<veil_cli::backend::BackendChoice> {
        veil_cli::backend::BackendChoice::parse(
            &self.backend,
            self.tee,
            self.accel,
            self.guest_dir.clone(),
            self.firmware.clone(),
        )
    }
}

#[derive(Args)]
struct DeployArgs {
    /// Function name.
    name: String,
    /// Image reference (`local/<name>:<tag>` for images pushed to veil itself).
    #[arg(long)]
    image: String,
    /// Environment variable KEY=VALUE (repeatable).
    #[arg(long = "env", short = 'e')]
    env: Vec<String>,
    /// Concurrent requests per instance (a hard limit; more wait).
    #[arg(long)]
    concurrency: Option<u32>,
    /// Concurrent requests per instance the autoscaler aims for (at most --concurrency)
    /// [default: the concurrency].
    #[arg(long)]
    target: Option<f64>,
    /// Instances kept when idle.
    #[arg(long)]
    min_scale: Option<u32>,
    /// Most instances.
    #[arg(long)]
    max_scale: Option<u32>,
    /// Port the function listens on.
    #[arg(long)]
    port: Option<u16>,
    /// How long an idle instance is kept before the function scales down (to zero, unless
    /// --min-scale), e.g. 90s, 5m, 1h or plain seconds (the fixed keep-alive window)
    /// [default: 60s].
    #[arg(long, alias = "idle-timeout", value_parser = veil_cli::serving::parse_whole_seconds)]
    scale_to_zero_after: Option<u64>,
    /// Keep-alive policy: fixed (the idle timeout) or hybrid (a histogram of the function's
    /// idle times decides when to unload an instance and when to pre-warm one).
    #[arg(long, value_parser = ["fixed", "hybrid"])]
    keep_alive: Option<String>,
    /// Owning tenant.
    #[arg(long)]
    tenant: Option<String>,
    /// Secret from the tenant's key broker: ENV=kbs:///<tenant>/<type>/<tag> (repeatable).
    #[arg(long = "secret")]
    secrets: Vec<String>,
    /// Key-broker resource with a private key (PEM) for the image's encrypted layers:
    /// kbs:///<tenant>/<type>/<tag> (repeatable).
    #[arg(long = "decryption-key")]
    decryption_keys: Vec<String>,
    /// Key-broker resource with the tenant's image signature policy (containers-policy.json):
    /// kbs:///<tenant>/<type>/<tag>. The sandbox fetches it after attestation and refuses an
    /// image the policy does not accept.
    #[arg(long)]
    signature_policy: Option<String>,
    /// The tenant's key broker URL (default: the one embedded in `veil up`).
    #[arg(long)]
    kbs_url: Option<String>,
    /// Where no SEV-SNP/TDX exists, attest with the INSECURE software TEE (development only).
    #[arg(long)]
    allow_insecure_software_tee: bool,
}

/// How `veil image encrypt` wraps layer keys.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum EncryptFormat {
    /// ocicrypt JWE recipients (what skopeo reads and writes).
    Jwe,
    /// The Confidential Containers key-provider annotation (AES-256-GCM with a broker key).
    Coco,
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Build an OCI image from a directory (one layer) and push it, or write an OCI layout.
    Build {
        /// Directory whose contents become the image's root.
        dir: PathBuf,
        /// Image reference to push to (`local/<name>:<tag>` = the running veil).
        #[arg(short, long)]
        tag: String,
        /// Entrypoint, one word per flag: --entrypoint /hello --entrypoint --verbose.
        #[arg(long, allow_hyphen_values = true)]
        entrypoint: Vec<String>,
        /// Default arguments, one word per flag: --cmd --port --cmd 9000.
        #[arg(long, allow_hyphen_values = true)]
        cmd: Vec<String>,
        /// Environment KEY=VALUE (repeatable).
        #[arg(long)]
        env: Vec<String>,
        /// Working directory.
        #[arg(long)]
        workdir: Option<String>,
        /// User to run as (uid[:gid] or name).
        #[arg(long)]
        user: Option<String>,
        /// Write an OCI image layout here instead of pushing.
        #[arg(long)]
        oci_layout: Option<PathBuf>,
    },
    /// Push an image from an OCI layout (`<dir>:<tag>`) to a reference.
    Push {
        /// Source layout and tag, e.g. ./out:latest.
        source: String,
        /// Destination reference.
        reference: String,
    },
    /// Encrypt an image's layers and push the result. Format `jwe` (default; ocicrypt JWE,
    /// readable by `skopeo --decryption-key`): with `--key kbs:///<tenant>/<type>/<tag>` a new
    /// P-256 key pair is generated and its private half stored in the key broker (admin key
    /// required); with `--key <pub.pem>` an existing public key is used. Format `coco` (the
    /// Confidential Containers key-provider annotation): `--key kbs:///…` only; a new 256-bit
    /// key-encryption key is generated and stored in the broker under that id.
    Encrypt {
        /// Source image.
        reference: String,
        /// Public key file, or kbs:///<tenant>/<type>/<tag> to generate and store a key (repeatable).
        #[arg(long, required = true)]
        key: Vec<String>,
        /// Destination (default: the source reference).
        #[arg(long)]
        output: Option<String>,
        /// Which layers (0-based, comma-separated); default all.
        #[arg(long, value_delimiter = ',')]
        layers: Vec<usize>,
        /// Key-wrapping format: jwe or coco.
        #[arg(long, default_value = "jwe")]
        format: EncryptFormat,
        #[command(flatten)]
        admin: KbsAdmin,
    },
    /// Show an image's manifest, its layers (encrypted or plain) and its signatures.
    Inspect {
        /// Image reference.
        reference: String,
        /// Public key (PEM) to check the signatures against (repeatable).
        #[arg(long)]
        key: Vec<PathBuf>,
    },
    /// Sign an image with a cosign key (the cosign/sigstore format that
    /// `skopeo copy --sign-by-sigstore-private-key` writes) and push the signature next to it.
    Sign {
        /// Image reference; it is also the signed identity unless --identity is given.
        reference: String,
        /// Cosign private key (encrypted `ENCRYPTED SIGSTORE PRIVATE KEY` PEM, or plain PKCS#8).
        #[arg(long)]
        key: PathBuf,
        /// File holding the key's passphrase (default: $VEIL_SIGN_PASSPHRASE, else empty).
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
        /// Identity to sign for (a full reference, e.g. registry.example/app:v1).
        #[arg(long)]
        identity: Option<String>,
    },
    /// Generate a cosign key pair: <prefix>.key (encrypted with the passphrase) and <prefix>.pub.
    GenerateKey {
        /// Path prefix of the two files, e.g. ./cosign.
        prefix: PathBuf,
        /// File holding the passphrase (default: $VEIL_SIGN_PASSPHRASE, else empty).
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
    },
    /// Write the example function's binary into a directory (build it with --entrypoint /hello).
    Example {
        /// Target directory.
        dir: PathBuf,
    },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VEIL_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("warn,veil_gateway=info,veil_node=info,veil_cli=info")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// An authenticated request to the key broker's admin API (a short-lived token signed with the
/// broker's admin key).
fn kbs_admin_request(
    admin: &KbsAdmin,
    server: &str,
    method: reqwest::Method,
    path: &str,
) -> Result<reqwest::RequestBuilder> {
    let base = admin.kbs_url.clone().unwrap_or_else(|| server.to_string());
    let key = admin
        .admin_key
        .clone()
        .unwrap_or_else(|| veil_cli::default_state_dir().join("kbs").join("admin.key"));
    let token =
        veil_kbs::admin_token(&key).with_context(|| format!("admin key {}", key.display()))?;
    Ok(reqwest::Client::new()
        .request(method, format!("{}{path}", base.trim_end_matches('/')))
        .bearer_auth(token))
}

/// Send an admin request; a refusal becomes an error with the broker's detail.
async fn kbs_admin_send(rb: reqwest::RequestBuilder) -> Result<String> {
    let r = rb.send().await.context("cannot reach the key broker")?;
    let status = r.status();
    let body = r.text().await.unwrap_or_default();
    if !status.is_success() {
        let detail = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["detail"].as_str().map(String::from))
            .unwrap_or(body);
        bail!("key broker refused (HTTP {}): {detail}", status.as_u16());
    }
    Ok(body)
}

async fn store_kbs_resource(
    admin: &KbsAdmin,
    server: &str,
    path: &str,
    value: &[u8],
) -> Result<()> {
    let rb = kbs_admin_request(
        admin,
        server,
        reqwest::Method::PUT,
        &format!("/kbs/v0/resource/{path}"),
    )?;
    kbs_admin_send(rb.body(value.to_vec()))
        .await
        .with_context(|| format!("storing {path}"))?;
    Ok(())
}

async fn kbs_cmd(kc: KbsCmd, server: &str) -> Result<()> {
    let admin_request = |admin: &KbsAdmin, method: reqwest::Method, path: &str| {
        kbs_admin_request(admin, server, method, path)
    };
    let done = kbs_admin_send;
    match kc {
        KbsCmd::Serve {
            listen,
            state_dir,
            allow_insecure_software_tee,
            software_tee_hosts,
            insecure_allow_unendorsed_sample,
        } => {
            let mut cfg = veil_kbs::KbsConfig::new(state_dir);
            cfg.allow_insecure_software_tee = allow_insecure_software_tee;
            cfg.allow_unendorsed_sample = insecure_allow_unendorsed_sample;
            for h in software_tee_hosts {
                let key = if std::path::Path::new(&h).is_file() {
                    std::fs::read_to_string(&h)
                        .with_context(|| format!("read software-TEE host key {h}"))?
                        .trim()
                        .to_string()
                } else {
                    h
                };
                cfg.software_tee_hosts.push(key);
            }
            if allow_insecure_software_tee
                && cfg.software_tee_hosts.is_empty()
                && !insecure_allow_unendorsed_sample
            {
                bail!(
                    "--allow-insecure-software-tee needs at least one --software-tee-host (or, \
                     to accept sample evidence that anyone can make up, \
                     --insecure-allow-unendorsed-sample)"
                );
            }
            if insecure_allow_unendorsed_sample {
                eprintln!(
                    "WARNING: this key broker accepts UNENDORSED sample evidence from ANY \
                     client. It proves nothing; the resource policy alone decides what such a \
                     client gets. Development only."
                );
            }
            let kbs = veil_kbs::Kbs::open(cfg)?;
            let listener = tokio::net::TcpListener::bind(listen).await?;
            println!(
                "key broker at http://{} (admin key {})",
                listener.local_addr()?,
                kbs.admin_key_path().display()
            );
            axum::serve(listener, kbs.router())
                .with_graceful_shutdown(async {
                    let _ = tokio::signal::ctrl_c().await;
                })
                .await?;
        }
        KbsCmd::SetResource {
            path,
            value,
            file,
            admin,
        } => {
            let bytes = match (value, file) {
                (Some(v), None) => v.into_bytes(),
                (None, Some(f)) => {
                    std::fs::read(&f).with_context(|| format!("read {}", f.display()))?
                }
                _ => bail!("give the value with --value or --file"),
            };
            done(
                admin_request(
                    &admin,
                    reqwest::Method::PUT,
                    &format!("/kbs/v0/resource/{path}"),
                )?
                .body(bytes),
            )
            .await?;
            println!("stored {path}");
        }
        KbsCmd::SetReferenceValues {
            name,
            values,
            admin,
        } => {
            let body = serde_json::to_vec(&values)?;
            done(
                admin_request(
                    &admin,
                    reqwest::Method::PUT,
                    &format!("/kbs/v0/reference-value/{name}"),
                )?
                .header("content-type", "application/json")
                .body(body),
            )
            .await?;
            println!("reference value {name}: {} accepted value(s)", values.len());
        }
        KbsCmd::SetPolicy { which, file, admin } => {
            let rego = std::fs::read(&file).with_context(|| format!("read {}", file.display()))?;
            done(
                admin_request(
                    &admin,
                    reqwest::Method::PUT,
                    &format!("/kbs/v0/{which}-policy"),
                )?
                .body(rego),
            )
            .await?;
            println!("{which} policy replaced");
        }
        KbsCmd::Ls { admin } => {
            print!(
                "{}",
                done(admin_request(
                    &admin,
                    reqwest::Method::GET,
                    "/kbs/v0/resource"
                )?)
                .await?
            );
            println!();
        }
    }
    Ok(())
}

fn parse_env(kvs: &[String]) -> Result<BTreeMap<String, String>> {
    kvs.iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("--env {kv:?}: expected KEY=VALUE"))
        })
        .collect()
}

#[tokio::main]
async fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let token = resolve_token(cli.token.clone());
    let admin = || -> Result<AdminClient> {
        let c = AdminClient::new(&cli.server)?;
        Ok(match &token {
            Some(t) => c.with_token(t),
            None => c,
        })
    };
    match cli.cmd {
        Cmd::Up(a) => {
            let mut opts =
                UpOptions::defaults(a.state_dir.unwrap_or_else(veil_cli::default_state_dir));
            opts.listen = a.listen;
            opts.pool_size = a.pool_size;
            opts.pool_memory = a.pool_memory;
            opts.tenant_pools = a.tenant_pools;
            opts.insecure_registries = a.insecure_registries;
            opts.cache_max_bytes = a.cache_max_bytes;
            opts.capacity_memory = a.capacity_memory;
            opts.capacity_cpu_millis = a.capacity_cpus.map(|c| (c * 1000.0).round() as u64);
            opts.drain_timeout = std::time::Duration::from_secs(a.drain_timeout);
            opts.invocations.concurrency = a.async_concurrency.max(1);
            opts.invocations.max_attempts = a.async_attempts.max(1);
            opts.invocations.attempt_timeout =
                std::time::Duration::from_secs(a.async_timeout.max(1));
            opts.invocations.retention = std::time::Duration::from_secs(a.async_retention.max(1));
            if a.panic_window.is_zero() || a.panic_window >= a.stable_window {
                anyhow::bail!(
                    "--panic-window ({:?}) must be positive and shorter than --stable-window ({:?})",
                    a.panic_window,
                    a.stable_window
                );
            }
            opts.autoscale.stable_window = a.stable_window;
            opts.autoscale.panic_window = a.panic_window;
            opts.backend = a.backend.choice()?;
            opts.local_store.max_blob_bytes = a.max_blob_size;
            opts.local_store.max_store_bytes = a.max_store_size;
            opts.local_store.upload_expiry = std::time::Duration::from_secs(a.upload_expiry.max(1));
            if !a.listen.ip().is_loopback() {
                tracing::warn!("listening on a non-loopback address: the admin API and the local store need tokens, but travel in plain HTTP; invocations are public");
            }
            let p = Platform::start(opts).await?;
            println!("veil is up at {} (Ctrl-C to stop)", p.url());
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            println!("stopping: destroying sandboxes");
            p.stop().await?;
        }
        Cmd::Demo { state_dir, backend } => {
            veil_cli::demo::run(state_dir, backend.choice()?).await?
        }
        Cmd::Bench(a) => {
            let mut o = veil_cli::bench::BenchOptions::new(a.quick, a.out);
            if let Some(r) = a.rounds {
                o.rounds = r;
            }
            if let Some(w) = a.warm {
                o.warm = w;
            }
            if !a.throughput_n.is_empty() {
                o.throughput_n = a.throughput_n;
            }
            o.no_pipeline = a.no_pipeline;
            let out = o.out.clone();
            let report = veil_cli::bench::run(o).await?;
            print!("{}", report.markdown());
            println!(
                "\nwrote {} and {}",
                out.join("bench.json").display(),
                out.join("bench.md").display()
            );
        }
        Cmd::Deploy(a) => {
            let st = admin()?
                .deploy(
                    &a.name,
                    &DeployRequest {
                        image: a.image,
                        tenant: a.tenant,
                        env: parse_env(&a.env)?,
                        concurrency: a.concurrency,
                        target: a.target,
                        min_scale: a.min_scale,
                        max_scale: a.max_scale,
                        port: a.port,
                        ready_timeout_s: None,
                        idle_timeout_s: a.scale_to_zero_after,
                        keep_alive: a.keep_alive.as_deref().map(|k| match k {
                            "hybrid" => veil_gateway::keepalive::KeepAlive::Hybrid,
                            _ => veil_gateway::keepalive::KeepAlive::Fixed,
                        }),
                        secrets: parse_env(&a.secrets)?,
                        decryption_keys: a.decryption_keys,
                        signature_policy: a.signature_policy,
                        kbs_url: a.kbs_url,
                        allow_insecure_software_tee: a.allow_insecure_software_tee,
                    },
                )
                .await?;
            println!(
                "deployed {} (revision {}) -> {}",
                st.record.name, st.record.revision, st.record.image.manifest_digest
            );
        }
        Cmd::Invoke {
            name,
            data,
            path,
            method,
            verbose,
            run_async,
        } => {
            let body = match &data {
                Some(d) if d.starts_with('@') => {
                    std::fs::read(&d[1..]).with_context(|| format!("read {}", &d[1..]))?
                }
                Some(d) => d.clone().into_bytes(),
                None => Vec::new(),
            };
            let method = method.unwrap_or_else(|| {
                if data.is_some() {
                    "POST".into()
                } else {
                    "GET".into()
                }
            });
            let mut headers = BTreeMap::new();
            if run_async {
                headers.insert("prefer".to_string(), "respond-async".to_string());
            }
            let r = admin()?
                .invoke(&name, &method, &path, body, &headers)
                .await?;
            if run_async && r.status == 202 {
                let s: veil_gateway::InvocationStatus =
                    serde_json::from_slice(&r.body).context("the gateway's 202 answer")?;
                println!("{}", s.id);
                eprintln!("accepted; see `veil invocation get {}`", s.id);
                return Ok(ExitCode::SUCCESS);
            }
            if verbose {
                eprintln!("HTTP {}", r.status);
                for (k, v) in &r.headers {
                    eprintln!("{k}: {}", v.to_str().unwrap_or("?"));
                }
            }
            use std::io::Write;
            std::io::stdout().write_all(&r.body)?;
            if r.status >= 400 {
                eprintln!("invoke failed: HTTP {}", r.status);
                return Ok(ExitCode::FAILURE);
            }
        }
        Cmd::Ls => {
            let fns = admin()?.list().await?;
            println!(
                "{:<20} {:<10} {:<12} {:>9} {:>8} {:>8}  IMAGE",
                "NAME", "TENANT", "BACKEND", "INSTANCES", "DRAINING", "REV"
            );
            for f in fns {
                println!(
                    "{:<20} {:<10} {:<12} {:>9} {:>8} {:>8}  {} ({})",
                    f.record.name,
                    f.record.tenant,
                    f.backend,
                    f.instances.len(),
                    f.draining.len(),
                    f.record.revision,
                    f.record.image.reference,
                    f.record.image.manifest_digest
                );
            }
        }
        Cmd::Describe { name } => {
            let f = admin()?
                .list()
                .await?
                .into_iter()
                .find(|f| f.record.name == name)
                .with_context(|| format!("no function {name:?}"))?;
            let r = &f.record;
            println!("{} (tenant {}, revision {})", r.name, r.tenant, r.revision);
            println!(
                "  image        {} ({})",
                r.image.reference, r.image.manifest_digest
            );
            println!("  backend      {}", f.backend);
            println!(
                "  scale        min {} max {}, concurrency {} (target {}), scale to zero after {}s, keep-alive {:?}",
                r.min_scale,
                r.max_scale,
                r.concurrency,
                r.target_concurrency(),
                r.idle_timeout_s,
                r.keep_alive
            );
            if let Some(d) = &f.keep_alive_decision {
                println!("  keep-alive   {d}");
            }
            for r in &f.revisions {
                if let Some(a) = &r.autoscaler {
                    println!(
                        "  autoscaler   revision {}: {} wanted{}, concurrency {:.2} (stable) / {:.2} (panic), target {}",
                        r.revision,
                        a.desired,
                        if a.panic { " (PANIC)" } else { "" },
                        a.stable_concurrency,
                        a.panic_concurrency,
                        a.target
                    );
                }
            }
            println!(
                "  instances    {} ready, {} starting, {} draining, {} in flight, {} waiting",
                f.instances.len(),
                f.starting,
                f.draining.len(),
                f.inflight,
                f.waiting
            );
            if let Some(e) = &f.last_error {
                println!("  last error   {e}");
            }
            println!("  latest cold starts (ms):");
            let mut head = format!("    {:<16}", "pool");
            for ph in veil_node::StartTimings::PHASES {
                head.push_str(&format!(" {ph:>9}"));
            }
            println!("{head}");
            for t in &f.recent_starts {
                let mut row = format!("    {:<16}", t.pool);
                for (_, ms) in t.phases() {
                    row.push_str(&format!(" {ms:>9.1}"));
                }
                println!("{row}");
            }
        }
        Cmd::Logs { name, tail, follow } => {
            let admin = admin()?;
            let print = |l: &serde_json::Value| {
                println!(
                    "{} {}",
                    l["sandbox"].as_str().unwrap_or("-"),
                    l["text"].as_str().unwrap_or("")
                );
                l["seq"].as_u64().unwrap_or(0)
            };
            let mut cursor = 0;
            for l in admin.logs(&name, tail).await? {
                cursor = print(&l);
            }
            if follow {
                loop {
                    for l in admin.logs_after(&name, cursor, 500, 25).await? {
                        cursor = print(&l).max(cursor);
                    }
                    use std::io::Write;
                    std::io::stdout().flush()?;
                }
            }
        }
        Cmd::Delete { name } => {
            admin()?.delete(&name).await?;
            println!("deleted {name}");
        }
        Cmd::Revisions { name } => veil_cli::serving::revisions(&admin()?, &name).await?,
        Cmd::Traffic { name, splits, tags } => {
            let mut traffic = splits
                .iter()
                .map(|s| veil_cli::serving::parse_split(s))
                .collect::<Result<Vec<_>>>()?;
            for t in &tags {
                traffic.push(veil_cli::serving::parse_tag(t)?);
            }
            let f = admin()?.set_traffic(&name, traffic).await?;
            println!("{name}: traffic set");
            veil_cli::serving::print_traffic(&f);
        }
        Cmd::Invocation(InvocationCmd::Get { id, wait, json }) => {
            let admin = admin()?;
            let deadline =
                std::time::Instant::now() + std::time::Duration::from_secs(wait.unwrap_or(0));
            let inv = loop {
                let inv = admin.invocation(&id).await?;
                let finished = matches!(
                    inv.state,
                    veil_gateway::InvocationState::Succeeded
                        | veil_gateway::InvocationState::Failed
                );
                if finished || std::time::Instant::now() >= deadline {
                    break inv;
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            };
            return veil_cli::serving::print_invocation(&inv, json);
        }
        Cmd::Rollback { name, to } => {
            let admin = admin()?;
            let f = admin.function(&name).await?;
            let (target, traffic) = veil_cli::serving::rollback_traffic(&f, to)?;
            let f = admin.set_traffic(&name, traffic).await?;
            println!(
                "{name}: all traffic to revision {target}, pinned (new deploys take none until \
                 `veil traffic {name} @latest=100`)"
            );
            veil_cli::serving::print_traffic(&f);
        }
        Cmd::Image(ic) => image_cmd(ic, &cli.server, token.as_deref()).await?,
        Cmd::Token(tc) => match tc {
            TokenCmd::Create { tenant } => {
                let t = admin()?.create_token(&tenant).await?;
                println!("{}", t.token);
                eprintln!(
                    "token {} for tenant {} (shown once; use it as VEIL_TOKEN)",
                    t.info.id, t.info.tenant
                );
            }
            TokenCmd::Ls => {
                for t in admin()?.tokens().await? {
                    println!("{}\t{}\t{}", t.id, t.tenant, t.created);
                }
            }
            TokenCmd::Revoke { id } => {
                admin()?.revoke_token(&id).await?;
                println!("revoked {id}");
            }
        },
        Cmd::Kbs(kc) => kbs_cmd(kc, &cli.server).await?,
        Cmd::Measure(a) => measure::run(&a)?,
        Cmd::Pool(pc) => {
            let a = admin()?;
            let pools = match pc {
                PoolCmd::Ls => a.tenant_pools().await?,
                PoolCmd::Set {
                    tenant,
                    size,
                    kbs_url,
                    allow_insecure_software_tee,
                } => {
                    a.set_tenant_pool(
                        &tenant,
                        &veil_gateway::TenantPoolRequest {
                            size,
                            kbs_url,
                            allow_insecure_software_tee,
                        },
                    )
                    .await?
                }
                PoolCmd::Rm { tenant } => {
                    a.remove_tenant_pool(&tenant).await?;
                    println!("removed the pool of {tenant}");
                    a.tenant_pools().await?
                }
            };
            println!(
                "{:<16} {:>5} {:>6} {:>10} {:>8}  {:<28} PROBLEM",
                "TENANT", "SIZE", "READY", "PREPARING", "EVICTED", "BROKER"
            );
            for p in pools {
                let mut problem = p
                    .last_error
                    .map(|e| format!("{e} (retry in {}s)", p.retry_in_s.unwrap_or(0)))
                    .unwrap_or_default();
                if p.short_of_memory > 0 {
                    if !problem.is_empty() {
                        problem.push_str("; ");
                    }
                    problem.push_str(&format!(
                        "{} short: the pools' memory is taken",
                        p.short_of_memory
                    ));
                }
                println!(
                    "{:<16} {:>5} {:>6} {:>10} {:>8}  {:<28} {problem}",
                    p.config.tenant,
                    p.config.size,
                    p.ready,
                    p.preparing,
                    p.evicted,
                    p.config.kbs_url,
                );
            }
        }
        Cmd::Tenant(TenantCmd::Ls) => {
            let tenants = admin()?.tenants().await?;
            println!(
                "{:<20} {:>6} {:>5} {:>12}  FUNCTIONS",
                "TENANT", "TOKENS", "POOL", "REPOSITORIES"
            );
            for t in tenants {
                println!(
                    "{:<20} {:>6} {:>5} {:>12}  {}",
                    t.tenant,
                    t.tokens,
                    t.pool_size.map_or("-".to_string(), |n| n.to_string()),
                    t.repositories,
                    t.functions.join(",")
                );
            }
        }
        Cmd::Tenant(TenantCmd::Rm { tenant }) => {
            let d = admin()?.delete_tenant(&tenant).await?;
            println!(
                "deleted tenant {}: {} token(s) revoked, pool {}, {} function(s) deleted{}; {} repositor{} kept as its own",
                d.tenant,
                d.tokens_revoked,
                if d.pool_removed { "destroyed" } else { "none" },
                d.functions_deleted.len(),
                if d.functions_deleted.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", d.functions_deleted.join(", "))
                },
                d.repositories_kept,
                if d.repositories_kept == 1 { "y" } else { "ies" }
            );
        }
        Cmd::Simulate(SimulateCmd::KeepAlive(a)) => {
            let rows = veil_cli::simulate::run(&a)?;
            veil_cli::simulate::print(&a, &rows);
        }
        Cmd::Guest(GuestCmd::Build {
            out,
            agent,
            kernel,
            modules_dir,
            kernel_dir,
            cmdline,
            no_strip,
            firmware,
            vcpus,
        }) => {
            let opts = veil_cli::guest::BuildOptions {
                out,
                agent,
                kernel,
                modules_dir,
                kernel_dir: Some(kernel_dir),
                cmdline: Some(cmdline),
                no_strip,
            };
            let built =
                tokio::task::spawn_blocking(move || veil_cli::guest::build(&opts)).await??;
            print!("{}", veil_cli::guest::report(&built));
            match firmware {
                Some(f) => print!(
                    "{}",
                    veil_cli::guest::measurement_report(&built, &f, vcpus)?
                ),
                None => println!(
                    "snp-measurement: pass --firmware <AmdSevX64 OVMF> to compute the SEV-SNP \
                     launch measurement of this guest (Debian's ovmf lacks the kernel-hashes \
                     section measured direct boot needs)"
                ),
            }
        }
        Cmd::Attest(AttestCmd::Verify {
            file,
            vcek,
            vlek,
            ca_chain,
            collateral,
            report_data,
            at,
        }) => {
            let report_data = match report_data {
                Some(h) => {
                    let b = hex::decode(h.trim()).context("--report-data must be hex")?;
                    Some(<[u8; 64]>::try_from(b.as_slice()).map_err(|_| {
                        anyhow::anyhow!("--report-data must be 64 bytes (128 hex digits)")
                    })?)
                }
                None => None,
            };
            let now = match at {
                Some(t) => std::time::UNIX_EPOCH + std::time::Duration::from_secs(t),
                None => std::time::SystemTime::now(),
            };
            let opts = veil_attest::report::VerifyOptions {
                vcek,
                vlek,
                ca_chain,
                collateral,
                report_data,
            };
            let report = veil_attest::report::verify_file(&file, &opts, now)?;
            print!("{report}");
            if !report.verified {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The signing-key passphrase: from a file (trailing newline dropped), else
/// `$VEIL_SIGN_PASSPHRASE`, else empty. Wiped from memory when dropped.
fn passphrase(file: Option<&std::path::Path>) -> Result<zeroize::Zeroizing<String>> {
    let s = match file {
        Some(f) => {
            let raw = zeroize::Zeroizing::new(
                std::fs::read_to_string(f)
                    .with_context(|| format!("read passphrase file {}", f.display()))?,
            );
            raw.trim_end_matches(['\n', '\r']).to_string()
        }
        None => std::env::var("VEIL_SIGN_PASSPHRASE").unwrap_or_default(),
    };
    Ok(zeroize::Zeroizing::new(s))
}

async fn image_cmd(ic: ImageCmd, server: &str, token: Option<&str>) -> Result<()> {
    // Pushes to and pulls from veil's local store authenticate with the token; other
    // registries use their own credentials (none configured here).
    let registry_client = || match token {
        Some(t) => images::registry_client_with_token(&[], server, t),
        None => images::registry_client(&[]),
    };
    match ic {
        ImageCmd::Build {
            dir,
            tag,
            entrypoint,
            cmd,
            env,
            workdir,
            user,
            oci_layout,
        } => {
            if !dir.is_dir() {
                bail!("{} is not a directory", dir.display());
            }
            let spec = veil_image::build::BuildSpec {
                context: dir.clone(),
                entrypoint,
                cmd,
                env,
                working_dir: workdir,
                user,
            };
            let image = veil_image::build::build_image(&spec)?;
            let reference: Reference = tag.parse()?;
            match oci_layout {
                Some(out) => {
                    let layout = veil_image::layout::OciLayout::create(&out)?;
                    let t = reference.tag.clone().unwrap_or_else(|| "latest".into());
                    layout.write_image(&image, &t)?;
                    println!("wrote {}:{t} ({})", out.display(), image.manifest.digest);
                }
                None => {
                    let client = registry_client()?;
                    let target = images::push_target(&reference, server)?;
                    let d = images::push(&client, &image, &target).await?;
                    println!("pushed {reference} ({d})");
                }
            }
        }
        ImageCmd::Push { source, reference } => {
            let (dir, tag) = source
                .rsplit_once(':')
                .unwrap_or((source.as_str(), "latest"));
            let image = images::read_layout(std::path::Path::new(dir), tag)?;
            let reference: Reference = reference.parse()?;
            let client = registry_client()?;
            let target = images::push_target(&reference, server)?;
            let d = images::push(&client, &image, &target).await?;
            println!("pushed {reference} ({d})");
        }
        ImageCmd::Encrypt {
            reference,
            key,
            output,
            layers,
            format,
            admin,
        } => {
            let src: Reference = reference.parse()?;
            let dst: Reference = output.as_deref().unwrap_or(&reference).parse()?;
            let client = registry_client()?;
            let image = images::pull_image(&client, &images::push_target(&src, server)?).await?;
            let n = image.layers.len();
            if let Some(bad) = layers.iter().find(|&&i| i >= n) {
                bail!(
                    "--layers: the image has {n} layers (0..{}), not {bad}",
                    n.saturating_sub(1)
                );
            }
            let mut recipients = Vec::new();
            for k in &key {
                match (format, k.strip_prefix("kbs:///")) {
                    (EncryptFormat::Jwe, Some(path)) => {
                        let private = veil_image::crypt::PrivateKey::generate_p256();
                        let pem = private.to_pem()?;
                        store_kbs_resource(&admin, server, path, pem.as_bytes()).await?;
                        println!(
                            "generated a P-256 key; private key stored in the key broker as {k}"
                        );
                        recipients.push(veil_image::crypt::Recipient::Jwe(private.public_key()));
                    }
                    (EncryptFormat::Jwe, None) => {
                        recipients.push(veil_image::crypt::Recipient::Jwe(
                            veil_image::crypt::PublicKey::from_pem_file(std::path::Path::new(k))?,
                        ));
                    }
                    (EncryptFormat::Coco, Some(path)) => {
                        let (r, kek) = veil_image::crypt::Recipient::kbs_generated(k.as_str())?;
                        store_kbs_resource(&admin, server, path, &kek).await?;
                        println!(
                            "generated a 256-bit key-encryption key; stored in the key broker as {k}"
                        );
                        recipients.push(r);
                    }
                    (EncryptFormat::Coco, None) => bail!(
                        "--format coco needs --key kbs:///<tenant>/<type>/<tag> (the key id the \
                         layers name), not {k:?}"
                    ),
                }
            }
            let encrypted = veil_image::crypt::encrypt_image_for(&image, &recipients, |i, _| {
                layers.is_empty() || layers.contains(&i)
            })?;
            let d = images::push(&client, &encrypted, &images::push_target(&dst, server)?).await?;
            println!("pushed encrypted {dst} ({d})");
        }
        ImageCmd::Inspect { reference, key } => {
            let reference: Reference = reference.parse()?;
            let mut keys = Vec::new();
            for k in &key {
                let pem = std::fs::read(k).with_context(|| format!("read {}", k.display()))?;
                keys.push(veil_image::signature::VerificationKey::from_pem(
                    &pem,
                    k.display().to_string(),
                )?);
            }
            let client = registry_client()?;
            let target = images::push_target(&reference, server)?;
            print!("{}", images::inspect(&client, &target, &keys).await?);
        }
        ImageCmd::Sign {
            reference,
            key,
            passphrase_file,
            identity,
        } => {
            let reference: Reference = reference.parse()?;
            let identity: Reference = match identity {
                Some(i) => i.parse().with_context(|| format!("--identity {i:?}"))?,
                None => reference.clone(),
            };
            let pem = std::fs::read(&key).with_context(|| format!("read {}", key.display()))?;
            let pass = passphrase(passphrase_file.as_deref())?;
            let signing = veil_image::signature::SigningKey::from_pem(
                &pem,
                pass.as_bytes(),
                &key.display().to_string(),
            )?;
            let client = registry_client()?;
            let target = images::push_target(&reference, server)?;
            let (d, sd) = images::sign_image(&client, &target, &identity, &signing).await?;
            println!(
                "signed {reference} ({d}) as {identity}; signature manifest {sd} tagged {}",
                veil_image::signature::signature_tag(&d)
            );
        }
        ImageCmd::GenerateKey {
            prefix,
            passphrase_file,
        } => {
            let pass = passphrase(passphrase_file.as_deref())?;
            let key = veil_image::signature::SigningKey::generate()?;
            let private = key.to_encrypted_pem(pass.as_bytes())?;
            let public = key.public_key_pem()?;
            let kpath = prefix.with_extension("key");
            let ppath = prefix.with_extension("pub");
            for p in [&kpath, &ppath] {
                if p.exists() {
                    bail!("{} exists; not overwriting a key", p.display());
                }
            }
            {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&kpath)
                    .with_context(|| format!("create {}", kpath.display()))?;
                f.write_all(private.as_bytes())?;
            }
            std::fs::write(&ppath, public).with_context(|| format!("write {}", ppath.display()))?;
            println!(
                "wrote {} (private, encrypted) and {} (public)",
                kpath.display(),
                ppath.display()
            );
        }
        ImageCmd::Example { dir } => {
            images::write_example(&dir)?;
            println!("wrote {}/hello; build it with: veil image build {} -t local/hello:latest --entrypoint /hello", dir.display(), dir.display());
        }
    }
    Ok(())
}
