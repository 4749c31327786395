//! `veil bench`: the cold-start / warm-start / instantiation-throughput study, run on this
//! machine in one run, up the ladder of what confidentiality adds, and beside the pipeline a
//! user would script instead (`skopeo copy` from a real registry, `umoci unpack`, `runc run`).
//!
//! Everything runs in this process on embedded defaults: gateway, node, namespace sandboxes,
//! the embedded key broker (whose software TEE is INSECURE: development only, and every output
//! says so). The figures that matter are ratios measured in the same run; the machine is shared.

mod ladder;
mod pipeline;
pub mod report;

use crate::{images, Platform, UpOptions};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use veil_image::build::{build_image, BuiltImage};
use veil_image::crypt::{encrypt_image, PrivateKey};
use veil_image::signature::SigningKey;

pub use report::Report;

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// A smoke run: one round, few warm requests, N = 1 and 4 only.
    pub quick: bool,
    /// Cold starts per configuration (and pipeline runs per image).
    pub rounds: usize,
    /// Sequential warm requests per configuration.
    pub warm: usize,
    /// Concurrent cold starts of distinct functions, one measurement per N.
    pub throughput_n: Vec<usize>,
    /// Where `bench.json` and `bench.md` go.
    pub out: PathBuf,
    /// Skip the external pipeline (it needs skopeo, umoci, runc and docker-registry).
    pub no_pipeline: bool,
}

impl BenchOptions {
    /// The defaults (about three minutes on two cores), or a smoke run.
    pub fn new(quick: bool, out: PathBuf) -> Self {
        if quick {
            Self {
                quick,
                rounds: 1,
                warm: 10,
                throughput_n: vec![1, 4],
                out,
                no_pipeline: false,
            }
        } else {
            Self {
                quick,
                rounds: 5,
                warm: 100,
                throughput_n: vec![1, 4, 16, 64],
                out,
                no_pipeline: false,
            }
        }
    }

    fn check(&self) -> Result<()> {
        if !(1..=50).contains(&self.rounds) {
            bail!("--rounds must be 1..=50 (got {})", self.rounds);
        }
        if !(1..=10_000).contains(&self.warm) {
            bail!("--warm must be 1..=10000 (got {})", self.warm);
        }
        if self.throughput_n.is_empty() || self.throughput_n.iter().any(|n| !(1..=64).contains(n)) {
            bail!(
                "--throughput-n must name counts of 1..=64 (got {:?})",
                self.throughput_n
            );
        }
        Ok(())
    }
}

/// Pre-booted sandboxes the benchmark's node keeps.
const POOL_SIZE: usize = 4;
/// The whole run is bounded.
const DEADLINE: Duration = Duration::from_secs(900);

/// Run the benchmark and write its outputs; returns the report.
pub async fn run(opts: BenchOptions) -> Result<Report> {
    opts.check()?;
    crate::preflight()?;
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("create the output directory {}", opts.out.display()))?;
    let agent = veil_node::find_agent();
    if !agent.is_file() {
        bail!(
            "no veil-agent binary at {} (build it: cargo build --release -p veil-agent)",
            agent.display()
        );
    }
    eprintln!(
        "WARNING: attestation here uses the INSECURE software TEE with the embedded development \
         key broker (no SEV-SNP/TDX on this machine): development only, not a security measurement"
    );
    let tmp = tempfile::tempdir()?;
    let mut up = UpOptions::defaults(tmp.path().join("state"));
    up.listen = "127.0.0.1:0".parse()?;
    up.pool_size = POOL_SIZE;
    // Room for the largest N at once: namespace sandboxes of the example use a few MiB each,
    // far below the budget a sandbox reserves by default.
    let max_n = opts.throughput_n.iter().copied().max().unwrap_or(1);
    let slots = (max_n + POOL_SIZE + 4) as u64;
    up.capacity_memory = Some(slots * (512 << 20));
    up.capacity_cpu_millis = Some(slots * 1000);
    up.cold_start_timeout = Duration::from_secs(60);
    let platform = Platform::start(up).await?;
    let started = Instant::now();
    let res = tokio::time::timeout(DEADLINE, measure(&platform, tmp.path(), &opts)).await;
    let stop = platform.stop().await;
    let mut report = match res {
        Ok(r) => r?,
        Err(_) => bail!("the benchmark did not finish within {DEADLINE:?}"),
    };
    stop?;
    report.took_s = started.elapsed().as_secs_f64();
    report.write(&opts.out)?;
    Ok(report)
}

/// The images every configuration uses: the example function, plain, and the same encrypted
/// to a fresh P-256 key.
pub(crate) struct Images {
    pub plain: BuiltImage,
    pub encrypted: BuiltImage,
    pub key: PrivateKey,
    pub signing: SigningKey,
}

fn build_images(dir: &Path) -> Result<Images> {
    let ctx = dir.join("hello");
    images::write_example(&ctx)?;
    let plain = build_image(&images::example_spec(&ctx))?;
    let key = PrivateKey::generate_p256();
    let encrypted = encrypt_image(&plain, &[key.public_key()], |_, _| true)?;
    Ok(Images {
        plain,
        encrypted,
        key,
        signing: SigningKey::generate()?,
    })
}

async fn measure(p: &Platform, tmp: &Path, opts: &BenchOptions) -> Result<Report> {
    let imgs = build_images(tmp)?;
    let mut report = Report::new(opts, &imgs);
    let progress = report::Progress::new(ladder::steps(opts) + pipeline::steps(opts));
    report.rungs = ladder::run(p, &imgs, opts, &progress).await?;
    report.pipeline = if opts.no_pipeline {
        pipeline::skipped("--no-pipeline")
    } else {
        pipeline::run(tmp, &imgs, opts, &progress).await
    };
    progress.finish();
    Ok(report)
}
