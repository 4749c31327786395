//! The namespace sandbox backend and the QEMU microVM backend side by side, in one run.
//!
//! Starts two whole platforms in this process (gateway + node each, one pre-booted sandbox in
//! each pool, no key broker): one on namespace sandboxes, one on microVMs booting the veil
//! guest (Debian's cloud kernel + an initrd whose `/init` is the release veil-agent, built here
//! with `veil_guest::build`), under the accelerator named by `BACKEND_BENCH_ACCEL` (default
//! `tcg`; `auto` probes KVM with a real guest and falls back to TCG, and the output names what
//! it chose). The same image — the example function, 643 KiB — is pushed to both local stores.
//! Before every measurement both platforms are settled: pool full, nothing assigned (unless the
//! step needs its instance), and every sandbox process idle (< 0.1 core over 250 ms), so a
//! guest still finishing its boot-time work does not steal the CPU of the other side.
//!
//! By default each node's capacity holds exactly one sandbox (1 CPU), so the pool is *not*
//! refilled while a cold start runs: a cold start measures itself, not the refill boot running
//! beside it (under TCG that boot is seconds of emulated CPU on the same cores). The example
//! refills the pool itself after each round (`Node::fill_pool`) and times that fill. With
//! `BACKEND_BENCH_OVERLAP=1` the capacity is the machine's default instead and the node refills
//! the pool as soon as a cold start takes its sandbox, as in production.
//!
//! Measured, per backend:
//! - **boot of a pooled sandbox**: `Node::fill_pool` on an empty pool until it returns with one
//!   sandbox pooled (backend create, the node's health check over the channel); for microVMs
//!   also the backend's own "QEMU spawned → the guest's agent opened its virtio-serial port"
//!   (the `ms` of its "microVM agent opened its port" debug event, captured by a tracing layer);
//!   and the first fill right after the platform started (cold page cache);
//! - **cold start from the pool**, `ROUNDS` times: deploy a fresh name, settle, one request,
//!   the `x-veil-cold-start` phases (which must say `pooled=true` and `boot=0`), delete; rounds
//!   alternate which backend goes first;
//! - **warm latency**: `BACKEND_BENCH_WARM` (default 200) sequential requests to one instance,
//!   in four interleaved chunks per backend, and **throughput**: a burst of
//!   `BACKEND_BENCH_BURST` (default 1000) requests at concurrency `BACKEND_BENCH_CONCURRENCY`
//!   (default 16) through the gateway from a tokio client in this process (max_scale 1: the
//!   burst never cold-starts a second instance);
//! - **memory**: RSS (`VmRSS`) of an idle pooled sandbox's processes (for a microVM: its QEMU)
//!   and of the warm instance, and the initrd's size;
//! - the ratios microVM / namespace of the medians (and of cold starts per round).
//!
//! Every load is bounded: each request has a 10 s timeout (60 s for cold ones), each settle
//! 60 s, each pool fill 120 s, the burst 120 s, and the whole run `DEADLINE`. Every QEMU is
//! stopped with its platform; the example then checks that no QEMU naming its state directory
//! is left (and kills any that is).
//!
//! Needs root, qemu-system-x86 and the guest kernel (`scripts/install-deps.sh`). Build the
//! agent on its own first (a workspace build would unify features into it), then run:
//!
//! ```text
//! cargo build --release -p veil-agent
//! cargo build --release -p veil-cli --example backend_bench --bins
//! cargo run --release -p veil-cli --example backend_bench -- [ROUNDS]
//! ```
//!
//! `ROUNDS` (default 5, env `BACKEND_BENCH_ROUNDS`): cold starts and pool fills per backend.

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tracing_subscriber::prelude::*;
use veil_cli::backend::{BackendChoice, MicroVmOptions};
use veil_cli::client::AdminClient;
use veil_cli::{images, Platform, UpOptions};
use veil_gateway::DeployRequest;
use veil_image::Reference;
use veil_sandbox::microvm::Accel;

/// The whole run must end within this.
const DEADLINE: Duration = Duration::from_secs(540);
/// How long a settle may wait for pools, teardowns and idle sandboxes.
const SETTLE_LIMIT: Duration = Duration::from_secs(60);
/// A sandbox set counts as idle below this many cores of CPU over [`IDLE_WINDOW`].
const IDLE_CORES: f64 = 0.1;
const IDLE_WINDOW: Duration = Duration::from_millis(250);
/// /proc's clock ticks per second (USER_HZ, 100 on Linux/x86).
const USER_HZ: f64 = 100.0;
const IMAGE: &str = "local/backendbench:v1";
/// The cold-start phases of `x-veil-cold-start`, in the order reported.
const PHASES: [&str; 7] = [
    "cache",
    "attest",
    "manifest",
    "signature",
    "layers",
    "spawn",
    "ready",
];

/// Positional argument `pos` (if given), else environment variable `env`, else `default`,
/// within `range`.
fn arg_or_env(
    pos: Option<usize>,
    env: &str,
    default: usize,
    range: std::ops::RangeInclusive<usize>,
) -> Result<usize> {
    let v = pos
        .and_then(|i| std::env::args().nth(i))
        .or_else(|| std::env::var(env).ok());
    let n = match v {
        Some(s) => s
            .parse()
            .with_context(|| format!("{env} (or its argument): {s:?} is not a number"))?,
        None => default,
    };
    if !range.contains(&n) {
        bail!("{env} must be within {range:?} (got {n})");
    }
    Ok(n)
}

/// The `ms` of each "microVM agent opened its port" event: (sandbox id, ms).
static PORT_OPENED: Mutex<Vec<(String, u64)>> = Mutex::new(Vec::new());

/// A tracing layer that records the microVM backend's boot events.
struct PortOpened;

#[derive(Default)]
struct Fields {
    message: String,
    sandbox: String,
    ms: Option<u64>,
}

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            "sandbox" => self.sandbox = format!("{value:?}").trim_matches('"').to_string(),
            _ => {}
        }
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        match field.name() {
            "message" => self.message = value.to_string(),
            "sandbox" => self.sandbox = value.to_string(),
            _ => {}
        }
    }

    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        if field.name() == "ms" {
            self.ms = Some(value);
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for PortOpened {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let mut f = Fields::default();
        event.record(&mut f);
        if f.message == "microVM agent opened its port" {
            if let Some(ms) = f.ms {
                PORT_OPENED
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((f.sandbox, ms));
            }
        }
    }
}

/// The backend's own boot time of sandbox `id`, if it logged one.
fn port_opened_ms(id: &str) -> Option<f64> {
    PORT_OPENED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .find(|(s, _)| s == id)
        .map(|(_, ms)| *ms as f64)
}

struct Settings {
    rounds: usize,
    warm: usize,
    burst: usize,
    concurrency: usize,
    overlap: bool,
    accel: Accel,
    started: Instant,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(
                    tracing_subscriber::EnvFilter::try_from_env("VEIL_LOG")
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
                ),
        )
        .with(
            PortOpened.with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target("veil_sandbox::microvm", tracing::Level::DEBUG),
            ),
        )
        .init();
    let s = Settings {
        rounds: arg_or_env(Some(1), "BACKEND_BENCH_ROUNDS", 5, 1..=30)?,
        warm: arg_or_env(None, "BACKEND_BENCH_WARM", 200, 4..=2000)?,
        burst: arg_or_env(None, "BACKEND_BENCH_BURST", 1000, 1..=10_000)?,
        concurrency: arg_or_env(None, "BACKEND_BENCH_CONCURRENCY", 16, 1..=64)?,
        overlap: std::env::var("BACKEND_BENCH_OVERLAP").is_ok_and(|v| v == "1"),
        accel: std::env::var("BACKEND_BENCH_ACCEL")
            .unwrap_or_else(|_| "tcg".into())
            .parse()
            .map_err(|e: String| anyhow::anyhow!("BACKEND_BENCH_ACCEL: {e}"))?,
        started: Instant::now(),
    };
    let agent = veil_node::find_agent();
    if !agent.is_file() {
        bail!(
            "no veil-agent binary next to this example ({}); run `cargo build --release -p \
             veil-agent` first, or set VEIL_AGENT",
            agent.display()
        );
    }
    println!(
        "backend_bench: {} cold starts and pool fills per backend, {} warm requests, burst of \
         {} at concurrency {}; pool refill {} the cold start",
        s.rounds,
        s.warm,
        s.burst,
        s.concurrency,
        if s.overlap {
            "overlaps (default capacity)"
        } else {
            "after (capacity of one sandbox)"
        }
    );
    println!("agent: {}", agent.display());
    println!("host: {}", host_notes());

    let tmp = tempfile::tempdir()?;
    // `run` stops its platforms at DEADLINE; this bound is only a last resort.
    let res = tokio::time::timeout(
        DEADLINE + Duration::from_secs(60),
        run(&s, tmp.path(), &agent),
    )
    .await;
    // Whatever happened, no QEMU of this run may outlive it.
    let left = qemus_under(tmp.path());
    if !left.is_empty() {
        println!("QEMU left behind, killing: {left:?}");
        for pid in &left {
            kill(*pid);
        }
    }
    match res {
        Ok(r) => r?,
        Err(_) => bail!("the benchmark did not finish within {DEADLINE:?}"),
    }
    if !left.is_empty() {
        bail!("QEMU processes were left behind: {left:?}");
    }
    println!("no QEMU left under {}", tmp.path().display());
    Ok(())
}

fn host_notes() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "{cores} cores ({cpu}), load average {}, /dev/kvm {}",
        loadavg(),
        if Path::new("/dev/kvm").exists() {
            "present"
        } else {
            "absent"
        }
    )
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// One platform and what the benchmark needs of it.
struct Side {
    label: &'static str,
    p: Platform,
    admin: AdminClient,
    http: reqwest::Client,
}

impl Side {
    fn node(&self) -> &std::sync::Arc<veil_node::Node> {
        self.p.gateway.node()
    }

    fn url(&self, name: &str) -> String {
        format!("{}/f/{name}/", self.p.url())
    }
}

async fn start(
    label: &'static str,
    state: PathBuf,
    backend: BackendChoice,
    overlap: bool,
) -> Result<Side> {
    let mut opts = UpOptions::defaults(state);
    opts.listen = "127.0.0.1:0".parse()?;
    opts.pool_size = 1;
    opts.embedded_kbs = false;
    opts.cold_start_timeout = Duration::from_secs(120);
    if !overlap {
        // Both backends give each sandbox 1 CPU: the budget holds exactly one sandbox.
        opts.capacity_cpu_millis = Some(1000);
    }
    opts.backend = backend;
    let p = Platform::start(opts)
        .await
        .with_context(|| format!("start the {label} platform"))?;
    let admin = p.admin_client()?;
    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(64)
        .build()?;
    Ok(Side {
        label,
        p,
        admin,
        http,
    })
}

async fn run(s: &Settings, tmp: &Path, agent: &Path) -> Result<()> {
    // The guest, from the same agent the namespace backend runs.
    let t = Instant::now();
    let gcfg = veil_guest::GuestConfig::new(agent.to_path_buf(), tmp.join("guest"));
    let guest = tokio::task::spawn_blocking(move || veil_guest::build(&gcfg))
        .await?
        .context("build the microVM guest (the kernel comes from scripts/install-deps.sh)")?;
    println!(
        "guest built in {:.1} s: kernel {} ({} B), initrd {} B ({:.1} MiB, sha256 {}), modules {}",
        t.elapsed().as_secs_f64(),
        guest.kernel_version,
        guest.kernel.size,
        guest.initrd.size,
        guest.initrd.size as f64 / (1 << 20) as f64,
        &guest.initrd.sha256[..16],
        guest.modules.join(" ")
    );
    println!("kernel command line: {}", guest.cmdline);
    println!("qemu: {}", qemu_version().await);

    let mut sides = Vec::new();
    let mut res = match tokio::time::timeout(DEADLINE, run_sides(s, tmp, &guest, &mut sides)).await
    {
        Ok(r) => r,
        Err(_) => Err(anyhow::anyhow!(
            "the benchmark did not finish within {DEADLINE:?}"
        )),
    };
    for side in sides {
        let label = side.label;
        if let Err(e) = side.p.stop().await {
            println!("stopping the {label} platform: {e:#}");
            if res.is_ok() {
                res = Err(e);
            }
        }
    }
    res
}

async fn qemu_version() -> String {
    match tokio::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .await
    {
        Ok(o) => String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_string(),
        Err(e) => format!("not runnable: {e}"),
    }
}

/// min, median, max of one measurement on one side.
#[derive(Default, Clone)]
struct Samples(Vec<f64>);

impl Samples {
    fn push(&mut self, v: f64) {
        self.0.push(v);
    }

    fn median(&self) -> f64 {
        median(&self.0)
    }

    fn cells(&self) -> String {
        if self.0.is_empty() {
            return "— | — | —".into();
        }
        format!(
            "{} | {} | {}",
            fmt(min(&self.0)),
            fmt(self.median()),
            fmt(max(&self.0))
        )
    }
}

fn fmt(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

/// Everything measured on one side.
#[derive(Default)]
struct Figures {
    first_fill: Samples,
    first_port: Samples,
    fill: Samples,
    port_opened: Samples,
    cold_client: Samples,
    cold_total: Samples,
    phases: BTreeMap<&'static str, Samples>,
    cold_other: Samples,
    warm: Samples,
    burst: Samples,
    burst_rps: Samples,
    rss_pooled: Samples,
    rss_instance: Samples,
}

async fn run_sides(
    s: &Settings,
    tmp: &Path,
    guest: &veil_guest::GuestArtifacts,
    sides: &mut Vec<Side>,
) -> Result<()> {
    // Both platforms start first; each then waits for its first pooled sandbox.
    let vm = BackendChoice::MicroVm(MicroVmOptions {
        guest_dir: Some(tmp.join("guest")),
        accel: s.accel,
        ..MicroVmOptions::default()
    });
    let mut figs = [Figures::default(), Figures::default()];
    for (i, (label, backend)) in [("namespace", BackendChoice::Process), ("microvm", vm)]
        .into_iter()
        .enumerate()
    {
        let t = Instant::now();
        let side = start(label, tmp.join(label), backend, s.overlap).await?;
        let started = t.elapsed();
        wait_pooled(&side).await?;
        figs[i]
            .first_fill
            .push((t.elapsed() - started).as_secs_f64() * 1000.0);
        if let Some(id) = pooled_id(&side) {
            if let Some(ms) = port_opened_ms(&id) {
                figs[i].first_port.push(ms);
            }
        }
        println!(
            "{label}: platform up in {:.0} ms (backend {}), first pooled sandbox after {:.0} ms more",
            started.as_secs_f64() * 1000.0,
            side.node().backend_label(),
            figs[i].first_fill.median()
        );
        sides.push(side);
    }
    let vm_label = sides[1].node().backend_label();
    let probes: Vec<(String, u64)> = PORT_OPENED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|(id, _)| id.starts_with("kvmprobe"))
        .cloned()
        .collect();
    if !probes.is_empty() {
        println!("KVM probe guest opened its port after {probes:?} ms");
    }
    println!("accelerator: {vm_label} (asked for {:?})", s.accel);

    // One image, pushed to both local stores.
    let ctx = tmp.join("hello");
    images::write_example(&ctx)?;
    let image = veil_image::build::build_image(&images::example_spec(&ctx))?;
    let reference: Reference = IMAGE.parse()?;
    for side in sides.iter() {
        let target = images::push_target(&reference, &side.p.url())?;
        images::push(&side.p.registry_client()?, &image, &target).await?;
    }
    println!(
        "image {IMAGE}: {} B of layers, pushed to both",
        image.layers.iter().map(|l| l.data.len()).sum::<usize>()
    );

    // One unmeasured cold start each (page cache, lazy initialisation; checks it works).
    for side in sides.iter() {
        let c = cold_start(side, "warmup").await?;
        refill(side, s.overlap).await?;
        println!(
            "warm-up cold start {}: {:.0} ms client side",
            side.label, c.client
        );
    }

    // Cold starts from the pool, interleaved, and the pool fill after each.
    println!();
    println!(
        "round  backend     client   total  {}  | pool fill  port opened   (ms)",
        PHASES.join("  ")
    );
    let mut per_round: Vec<[f64; 2]> = Vec::new();
    for round in 0..s.rounds {
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        let mut this = [0.0; 2];
        for i in order {
            settle(sides, false).await?;
            let side = &sides[i];
            let c = cold_start(side, &format!("cold{round}")).await?;
            let fill = refill(side, s.overlap).await?;
            let f = &mut figs[i];
            f.cold_client.push(c.client);
            f.cold_total.push(c.total);
            let mut sum = 0.0;
            for (k, v) in &c.phases {
                f.phases.entry(k).or_default().push(*v);
                sum += v;
            }
            f.cold_other.push(c.total - sum);
            if let Some((ms, port)) = fill {
                f.fill.push(ms);
                if let Some(p) = port {
                    f.port_opened.push(p);
                }
            }
            this[i] = c.client;
            println!(
                "{round:>5}  {:<10} {:>7.1} {:>7.1}  {}  | {:>9} {:>12}",
                side.label,
                c.client,
                c.total,
                c.phases
                    .iter()
                    .map(|(k, v)| format!("{v:>w$.1}", w = k.len()))
                    .collect::<Vec<_>>()
                    .join("  "),
                fill.map_or("—".into(), |(ms, _)| format!("{ms:.0}")),
                fill.and_then(|(_, p)| p)
                    .map_or("—".into(), |p| format!("{p:.0}")),
            );
        }
        per_round.push(this);
    }
    if s.overlap {
        // The node refilled the pools during the cold starts: only the backend's own boot
        // events tell the boot time.
        let all: Vec<f64> = PORT_OPENED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(id, _)| !id.starts_with("kvmprobe"))
            .map(|(_, ms)| *ms as f64)
            .collect();
        figs[1].port_opened = Samples(all);
    }

    // Warm requests to one instance per side.
    let mut warm_req = DeployRequest::new(IMAGE);
    warm_req.max_scale = Some(1);
    for side in sides.iter() {
        side.admin.deploy("warm", &warm_req).await?;
        let r = get(side, "warm", Duration::from_secs(60)).await?;
        if !r.cold {
            bail!(
                "{}: the first request to warm was not a cold start",
                side.label
            );
        }
    }
    settle(sides, true).await?;
    let chunk = s.warm / 4;
    for c in 0..4 {
        let order: [usize; 2] = if c % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            for _ in 0..chunk {
                let r = get(&sides[i], "warm", Duration::from_secs(10)).await?;
                if r.cold {
                    bail!("{}: a warm request was a cold start", sides[i].label);
                }
                figs[i].warm.push(r.ms);
            }
        }
    }
    for (i, side) in sides.iter().enumerate() {
        settle(sides, true).await?;
        let (lat, wall) = burst(side, s.burst, s.concurrency).await?;
        figs[i].burst_rps.push(s.burst as f64 / wall);
        figs[i].burst = Samples(lat);
        let inst: Vec<_> = side
            .node()
            .sandboxes()
            .into_iter()
            .filter(|x| x.function.is_some())
            .collect();
        if inst.len() != 1 {
            bail!(
                "{}: {} instances after the burst, expected 1",
                side.label,
                inst.len()
            );
        }
        println!(
            "burst {}: {} requests at concurrency {} in {:.2} s ({:.0}/s), latency p50 {:.1} p99 {:.1} max {:.1} ms",
            side.label,
            s.burst,
            s.concurrency,
            wall,
            s.burst as f64 / wall,
            figs[i].burst.median(),
            percentile(&figs[i].burst.0, 0.99),
            max(&figs[i].burst.0)
        );
    }

    // Memory: the warm instance (assigned), then an idle pooled sandbox.
    settle(sides, true).await?;
    for (i, side) in sides.iter().enumerate() {
        for sb in side.node().sandboxes() {
            if sb.function.is_some() {
                figs[i].rss_instance.push(rss_kib(&sb.pids) as f64 / 1024.0);
            }
        }
    }
    for side in sides.iter() {
        side.admin.delete("warm").await?;
        refill(side, s.overlap).await?;
    }
    settle(sides, false).await?;
    for (i, side) in sides.iter().enumerate() {
        for sb in side.node().sandboxes() {
            figs[i].rss_pooled.push(rss_kib(&sb.pids) as f64 / 1024.0);
            for pid in &sb.pids {
                println!(
                    "idle pooled {} sandbox, pid {pid}: {}",
                    side.label,
                    memory_detail(*pid)
                );
            }
        }
    }

    report(s, &figs, &per_round, guest, &vm_label);
    Ok(())
}

fn pooled_id(side: &Side) -> Option<String> {
    side.node()
        .sandboxes()
        .into_iter()
        .find(|x| x.function.is_none())
        .map(|x| x.id)
}

async fn wait_pooled(side: &Side) -> Result<()> {
    let t = Instant::now();
    while side.node().pooled().await < 1 {
        if t.elapsed() > Duration::from_secs(120) {
            bail!("{}: no pooled sandbox within 120 s", side.label);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// After a cold start's instance is gone: fill the pool and time it, with the backend's own
/// boot time for microVMs. `None` when the node had already refilled it (overlap mode).
async fn refill(side: &Side, overlap: bool) -> Result<Option<(f64, Option<f64>)>> {
    let node = side.node().clone();
    let t = Instant::now();
    // Wait until the deleted instance's sandbox is destroyed and its budget given back.
    loop {
        let pooled = node.pooled().await;
        let c = node.capacity();
        if overlap && pooled >= 1 {
            return Ok(None);
        }
        if !overlap && c.sandboxes == 0 {
            break;
        }
        if t.elapsed() > SETTLE_LIMIT {
            bail!(
                "{}: the instance was not destroyed within {SETTLE_LIMIT:?} ({} sandboxes)",
                side.label,
                c.sandboxes
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t = Instant::now();
    tokio::time::timeout(Duration::from_secs(120), node.fill_pool())
        .await
        .with_context(|| format!("{}: filling the pool took over 120 s", side.label))?;
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    if node.pooled().await < 1 {
        bail!(
            "{}: the pool fill returned without a pooled sandbox",
            side.label
        );
    }
    let port = pooled_id(side).and_then(|id| port_opened_ms(&id));
    Ok(Some((ms, port)))
}

/// Wait until both pools are full, nothing is assigned (unless `assigned_ok`) and every
/// sandbox process of both platforms is idle.
async fn settle(sides: &[Side], assigned_ok: bool) -> Result<()> {
    let t = Instant::now();
    loop {
        let mut ready = true;
        for s in sides {
            let sbs = s.node().sandboxes();
            let c = s.node().capacity();
            // The pool is full, or cannot be (the instance holds the whole budget).
            let pool_done = s.node().pooled().await >= 1 || c.sandboxes >= c.max_sandboxes;
            if !pool_done || (!assigned_ok && sbs.iter().any(|x| x.function.is_some())) {
                ready = false;
            }
        }
        if ready {
            break;
        }
        if t.elapsed() > SETTLE_LIMIT {
            bail!("the platforms did not settle within {SETTLE_LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    loop {
        let pids: Vec<u32> = sides
            .iter()
            .flat_map(|s| s.node().sandboxes())
            .flat_map(|x| x.pids)
            .collect();
        let before: Vec<Option<u64>> = pids.iter().map(|p| cpu_ticks(*p)).collect();
        tokio::time::sleep(IDLE_WINDOW).await;
        let used: u64 = pids
            .iter()
            .zip(before)
            .filter_map(|(p, b)| Some(cpu_ticks(*p)?.saturating_sub(b?)))
            .sum();
        let cores = used as f64 / USER_HZ / IDLE_WINDOW.as_secs_f64();
        if cores < IDLE_CORES {
            return Ok(());
        }
        if t.elapsed() > SETTLE_LIMIT {
            println!(
                "note: sandboxes still used {cores:.2} cores after {SETTLE_LIMIT:?}; going on"
            );
            return Ok(());
        }
    }
}

/// utime + stime of `pid` (all its threads), in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3, utime 14, stime 15.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Sum of VmRSS of `pids`, in KiB.
fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| {
            let s = std::fs::read_to_string(format!("/proc/{p}/status")).ok()?;
            let l = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            l.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .sum()
}

/// RssAnon / RssFile / RssShmem of `pid`, and its three most resident mappings (for a QEMU:
/// guest RAM, the TCG translation buffer, …).
fn memory_detail(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            / 1024
    };
    // (size KiB, rss KiB, name) per mapping.
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut maps: Vec<(u64, u64, String)> = Vec::new();
    for l in smaps.lines() {
        let mut w = l.split_whitespace();
        let first = w.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            let name = l.split_whitespace().nth(5).unwrap_or("[anon]").to_string();
            maps.push((0, 0, name));
        } else if let Some(m) = maps.last_mut() {
            let v = w.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            match first {
                "Size:" => m.0 = v,
                "Rss:" => m.1 = v,
                _ => {}
            }
        }
    }
    maps.sort_by_key(|m| std::cmp::Reverse(m.1));
    let top: Vec<String> = maps
        .iter()
        .take(3)
        .map(|(size, rss, name)| format!("{} of {} MiB {name}", rss / 1024, size / 1024))
        .collect();
    format!(
        "RssAnon {} MiB, RssFile {} MiB, RssShmem {} MiB; most resident mappings: {}",
        field("RssAnon:"),
        field("RssFile:"),
        field("RssShmem:"),
        top.join(", ")
    )
}

/// One cold start.
struct Cold {
    client: f64,
    total: f64,
    phases: Vec<(&'static str, f64)>,
}

/// Deploy `name`, settle this side, one request, check it came from the pool, delete.
async fn cold_start(side: &Side, name: &str) -> Result<Cold> {
    side.admin
        .deploy(name, &DeployRequest::new(IMAGE))
        .await
        .with_context(|| format!("{}: deploy {name}", side.label))?;
    let r = get(side, name, Duration::from_secs(60)).await?;
    side.admin.delete(name).await?;
    let h = r.cold_header.with_context(|| {
        format!(
            "{}: {name}: the first request was not a cold start",
            side.label
        )
    })?;
    let m: BTreeMap<&str, &str> = h.split(';').filter_map(|kv| kv.split_once('=')).collect();
    let num = |k: &str| -> Result<f64> {
        m.get(k)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("phase {k:?} missing from x-veil-cold-start: {h}"))
    };
    if m.get("pooled") != Some(&"true") || num("boot")? != 0.0 {
        bail!(
            "{}: {name}: the cold start did not take a pooled sandbox: {h}",
            side.label
        );
    }
    let want = side.node().backend_label();
    if m.get("backend") != Some(&want.as_str()) {
        bail!(
            "{}: cold start reports another backend than {want}: {h}",
            side.label
        );
    }
    Ok(Cold {
        client: r.ms,
        total: num("total")?,
        phases: PHASES
            .iter()
            .map(|k| Ok((*k, num(k)?)))
            .collect::<Result<_>>()?,
    })
}

struct Got {
    ms: f64,
    cold: bool,
    cold_header: Option<String>,
}

/// One GET of `/f/<name>/`, which must answer the example function's greeting.
async fn get(side: &Side, name: &str, timeout: Duration) -> Result<Got> {
    let t = Instant::now();
    let r = side
        .http
        .get(side.url(name))
        .timeout(timeout)
        .send()
        .await
        .with_context(|| format!("{}: GET {name}", side.label))?;
    let status = r.status();
    let cold_header = r
        .headers()
        .get("x-veil-cold-start")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = r.bytes().await?;
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    if status != 200 || !body.starts_with(b"Hello from veil!") {
        bail!(
            "{}: {name}: HTTP {status}: {}",
            side.label,
            String::from_utf8_lossy(&body)
        );
    }
    Ok(Got {
        ms,
        cold: cold_header.is_some(),
        cold_header,
    })
}

/// `n` requests to `warm` at concurrency `c`: latencies (ms) and wall time (s).
async fn burst(side: &Side, n: usize, c: usize) -> Result<(Vec<f64>, f64)> {
    let t = Instant::now();
    let all = tokio::time::timeout(
        Duration::from_secs(120),
        futures::stream::iter(0..n)
            .map(|_| get(side, "warm", Duration::from_secs(10)))
            .buffer_unordered(c)
            .collect::<Vec<_>>(),
    )
    .await
    .with_context(|| format!("{}: the burst took over 120 s", side.label))?;
    let wall = t.elapsed().as_secs_f64();
    let mut lat = Vec::with_capacity(n);
    for r in all {
        let r = r?;
        if r.cold {
            bail!("{}: a request of the burst was a cold start", side.label);
        }
        lat.push(r.ms);
    }
    Ok((lat, wall))
}

fn report(
    s: &Settings,
    figs: &[Figures; 2],
    per_round: &[[f64; 2]],
    guest: &veil_guest::GuestArtifacts,
    vm_label: &str,
) {
    let [ns, vm] = figs;
    println!();
    println!(
        "load average at the end: {}; the run took {:.0} s",
        loadavg(),
        s.started.elapsed().as_secs_f64()
    );
    println!();
    println!(
        "| what (ms unless noted) | namespace min | median | max | {vm_label} min | median | max | microVM / namespace (medians) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let row = |label: &str, a: &Samples, b: &Samples| {
        let r = b.median() / a.median();
        // Phases that round to 0.0 ms on either side have no meaningful ratio.
        let ratio = if a.0.is_empty() || a.median() < 0.05 || b.median() < 0.05 || !r.is_finite() {
            "—".to_string()
        } else if r < 1.0 {
            format!("{r:.2}x")
        } else {
            format!("{r:.1}x")
        };
        println!("| {label} | {} | {} | {ratio} |", a.cells(), b.cells());
    };
    let n = s.rounds;
    row(
        "first pool fill after the platform started (1)",
        &ns.first_fill,
        &vm.first_fill,
    );
    row(
        "  of which QEMU spawned → guest agent opened its port (1)",
        &ns.first_port,
        &vm.first_port,
    );
    row(
        &format!(
            "pool fill: `fill_pool` on an empty pool until pooled ({})",
            ns.fill.0.len()
        ),
        &ns.fill,
        &vm.fill,
    );
    row(
        &format!(
            "microVM: QEMU spawned → guest agent opened its port ({})",
            vm.port_opened.0.len()
        ),
        &ns.port_opened,
        &vm.port_opened,
    );
    row(
        &format!("cold start from the pool, client side ({n})"),
        &ns.cold_client,
        &vm.cold_client,
    );
    row(
        &format!("cold start, node side total ({n})"),
        &ns.cold_total,
        &vm.cold_total,
    );
    for k in PHASES {
        let empty = Samples::default();
        row(
            &format!("  phase {k}"),
            ns.phases.get(k).unwrap_or(&empty),
            vm.phases.get(k).unwrap_or(&empty),
        );
    }
    row("  total − listed phases", &ns.cold_other, &vm.cold_other);
    row(
        &format!("warm request, sequential ({})", ns.warm.0.len()),
        &ns.warm,
        &vm.warm,
    );
    row(
        &format!(
            "burst latency ({} at concurrency {})",
            s.burst, s.concurrency
        ),
        &ns.burst,
        &vm.burst,
    );
    row(
        "burst throughput (requests/s)",
        &ns.burst_rps,
        &vm.burst_rps,
    );
    row(
        "RSS of an idle pooled sandbox (MiB)",
        &ns.rss_pooled,
        &vm.rss_pooled,
    );
    row(
        "RSS of the warm instance after the burst (MiB)",
        &ns.rss_instance,
        &vm.rss_instance,
    );
    println!();
    let ratios: Vec<f64> = per_round.iter().map(|r| r[1] / r[0]).collect();
    println!(
        "cold start microVM / namespace per round (client side): median {:.1}x, range {:.1}–{:.1}x",
        median(&ratios),
        min(&ratios),
        max(&ratios)
    );
    println!(
        "burst p99: namespace {:.1} ms, microVM {:.1} ms",
        percentile(&ns.burst.0, 0.99),
        percentile(&vm.burst.0, 0.99)
    );
    println!(
        "initrd {} B ({:.1} MiB), kernel {} B; each microVM has {} MiB of memory",
        guest.initrd.size,
        guest.initrd.size as f64 / (1 << 20) as f64,
        guest.kernel.size,
        MicroVmOptions::default().memory_bytes >> 20
    );
    let ready = vm.port_opened.median();
    let cold = vm.cold_client.median() / ns.cold_client.median();
    println!(
        "issue targets (on a KVM host): agent ready <= 150 ms after VMM start — here {ready:.0} ms \
         median on {vm_label}; cold start from the pool <= 1.5x namespace — here {cold:.1}x{}",
        if vm_label.ends_with("/kvm") {
            ""
        } else {
            " (not KVM: these targets cannot be checked on this host)"
        }
    );
}

/// QEMUs whose command line names `dir`.
fn qemus_under(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    let c = String::from_utf8_lossy(&c).replace('\0', " ");
                    c.contains("qemu-system") && c.contains(&needle)
                })
                .unwrap_or(false)
        })
        .collect()
}

fn kill(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
}
