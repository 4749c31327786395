//! End-to-end cost of pulling an encrypted image against pulling the same image plain.
//!
//! Starts the whole platform in this process on embedded defaults (gateway, node, namespace
//! sandboxes, the embedded key broker — which accepts the INSECURE software TEE: development
//! only, no SEV-SNP/TDX here). Builds one image — the example function plus a large payload
//! layer of generated, realistically compressible data (text-like files mixed with
//! incompressible binary ones) — and pushes it to the node's local store twice: plain
//! (`local/pullbench:plain`) and with every layer encrypted (ocicrypt JWE, ECDH-ES+A256KW to a
//! fresh P-256 key whose private half is a tenant resource in the broker;
//! `local/pullbench:encrypted`).
//!
//! Both functions are deployed with the same attestation plan (software TEE, one secret from
//! the broker), so attestation is paid on both sides; the encrypted one also names its
//! decryption key. Each round cold-starts each function once (deploy, wait until the pool is
//! full and nothing else runs, invoke, read the `x-veil-cold-start` phases, delete), in
//! alternating order. The blobs are in the node's store both times, so what differs is the
//! in-sandbox pull: fetch over the channel + digest check + [decrypt] + gunzip + untar.
//!
//! Needs root. Build the agent first (again whenever veil-proto changed: a stale agent refuses
//! the assignment), then run in release mode:
//!
//! ```text
//! cargo build --release -p veil-agent
//! cargo run --release -p veil-cli --example pull_bench -- [ROUNDS] [MIB]
//! ```
//!
//! `ROUNDS` (default 7, env `PULL_BENCH_ROUNDS`) cold starts of each function; `MIB` (default
//! 64, env `PULL_BENCH_MIB`) uncompressed size of the payload layer; env
//! `PULL_BENCH_BINARY_PCT` (default 25) the share of its files that are incompressible.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};
use veil_cli::client::AdminClient;
use veil_cli::{images, Platform, UpOptions};
use veil_gateway::DeployRequest;
use veil_image::build::{assemble_image, build_image, Blob, BuiltImage};
use veil_image::crypt::{encrypt_image, PrivateKey};
use veil_image::manifest::{parse_manifest, Compression, Manifest, OCI_LAYER_TAR_GZIP};
use veil_image::unpack::{unpack_layer, UnpackOptions};
use veil_image::{Digest, Reference};

const POOL_SIZE: usize = 1;
const SECRET: &str = "default/pullbench/token";
const IMAGE_KEY: &str = "default/image-key/pullbench";
/// The whole run must finish well within this (about 20 s at the defaults on 2 cores).
const DEADLINE: Duration = Duration::from_secs(280);

/// Positional argument `pos` (if given), else environment variable `env`, else `default`.
fn arg_or_env(pos: Option<usize>, env: &str, default: usize) -> Result<usize> {
    let v = pos
        .and_then(|i| std::env::args().nth(i))
        .or_else(|| std::env::var(env).ok());
    match v {
        Some(s) => s
            .parse()
            .with_context(|| format!("{env} (or its argument): {s:?} is not a number")),
        None => Ok(default),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VEIL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rounds = arg_or_env(Some(1), "PULL_BENCH_ROUNDS", 7)?;
    let mib = arg_or_env(Some(2), "PULL_BENCH_MIB", 64)?;
    let binary_pct = arg_or_env(None, "PULL_BENCH_BINARY_PCT", 25)?;
    if binary_pct > 100 {
        bail!("PULL_BENCH_BINARY_PCT must be 0..=100 (got {binary_pct})");
    }
    if !(1..=50).contains(&rounds) {
        bail!("ROUNDS must be 1..=50 (got {rounds})");
    }
    // The sandbox root is a 256 MiB tmpfs inside a 512 MiB memory limit.
    if !(1..=192).contains(&mib) {
        bail!("MIB must be 1..=192 (the sandbox root is 256 MiB); got {mib}");
    }
    let agent = veil_node::find_agent();
    if !agent.is_file() {
        bail!(
            "no veil-agent binary next to this example ({}); run `cargo build --release -p veil-agent` first",
            agent.display()
        );
    }
    println!(
        "pull_bench: {rounds} cold starts of each function, payload {mib} MiB uncompressed, \
         {binary_pct} % of its files incompressible"
    );
    println!("agent: {}", agent.display());
    println!(
        "WARNING: attestation uses the INSECURE software TEE with the embedded development key \
         broker (no SEV-SNP/TDX here); development only, not a security measurement"
    );

    let tmp = tempfile::tempdir()?;
    let mut opts = UpOptions::defaults(tmp.path().join("state"));
    opts.listen = "127.0.0.1:0".parse()?;
    opts.pool_size = POOL_SIZE;
    let platform = Platform::start(opts).await?;
    let res = tokio::time::timeout(
        DEADLINE,
        run(&platform, tmp.path(), rounds, mib, binary_pct),
    )
    .await;
    let stop = platform.stop().await;
    match res {
        Ok(r) => r?,
        Err(_) => bail!("the benchmark did not finish within {DEADLINE:?}"),
    }
    stop
}

/// A xorshift64 generator: deterministic payloads without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const WORDS: &[&str] = &[
    "the", "function", "returns", "an", "error", "when", "request", "is", "invalid", "config",
    "value", "string", "import", "from", "self", "return", "None", "true", "false", "if", "else",
    "for", "in", "while", "let", "const", "struct", "impl", "pub", "fn", "user", "data", "node",
    "sandbox", "layer", "image", "digest", "key", "path", "file", "name", "type", "int", "len",
    "buffer", "client", "server", "response", "status", "timeout", "retry", "cache", "index", "{",
    "}", "(", ")", "=", "->", "::", "//", "#", "<", ">",
];

/// Text-like content: source/config/log-shaped lines of words, identifiers and numbers.
fn text(rng: &mut Rng, size: usize, out: &mut Vec<u8>) {
    let end = out.len() + size;
    let mut col = 0;
    while out.len() < end {
        let r = rng.next();
        match r % 16 {
            0 => {
                let _ = write!(out, "{}", (r >> 8) % 100_000);
            }
            1 => {
                out.push(b'\n');
                let indent = ((r >> 8) % 4) as usize * 4;
                out.extend(std::iter::repeat_n(b' ', indent));
                col = indent;
                continue;
            }
            _ => out.extend_from_slice(WORDS[((r >> 8) % WORDS.len() as u64) as usize].as_bytes()),
        }
        out.push(b' ');
        col += 6;
        if col > 90 {
            out.push(b'\n');
            col = 0;
        }
    }
    out.truncate(end);
}

/// Incompressible content (already-compressed assets, stripped binaries' data sections).
fn binary(rng: &mut Rng, size: usize, out: &mut Vec<u8>) {
    let end = out.len() + size;
    while out.len() < end {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    out.truncate(end);
}

/// A tar of about `total` bytes of files: mostly small, some medium, a few large;
/// `binary_pct` % of them incompressible, the others text-like. With the default 25 % it
/// compresses about 2.4x with gzip.
fn payload_tar(total: usize, binary_pct: u64) -> Result<(Vec<u8>, usize)> {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut b = tar::Builder::new(Vec::with_capacity(total + (4 << 20)));
    let header = |size: usize, mode: u32, kind: tar::EntryType| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size as u64);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        h
    };
    b.append_data(
        &mut header(0, 0o755, tar::EntryType::Directory),
        "payload/",
        std::io::empty(),
    )?;
    let (mut written, mut files) = (0, 0);
    let mut data = Vec::new();
    while written < total {
        let size = match rng.below(100) {
            0..70 => 1024 + rng.below(63 * 1024),
            70..95 => (64 << 10) + rng.below(960 << 10),
            _ => (1 << 20) + rng.below(3 << 20),
        } as usize;
        let size = size.min(total - written);
        if files % 64 == 0 {
            b.append_data(
                &mut header(0, 0o755, tar::EntryType::Directory),
                format!("payload/d{}/", files / 64),
                std::io::empty(),
            )?;
        }
        data.clear();
        let ext = if rng.below(100) < binary_pct {
            binary(&mut rng, size, &mut data);
            "bin"
        } else {
            text(&mut rng, size, &mut data);
            "txt"
        };
        b.append_data(
            &mut header(size, 0o644, tar::EntryType::Regular),
            format!("payload/d{}/f{files}.{ext}", files / 64),
            &data[..],
        )?;
        written += size;
        files += 1;
    }
    Ok((b.into_inner()?, files))
}

fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    // The level `veil image build` uses.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(data)?;
    Ok(gz.finish()?)
}

fn layer_bytes(image: &BuiltImage) -> u64 {
    image.layers.iter().map(|l| l.data.len() as u64).sum()
}

async fn push(p: &Platform, image: &BuiltImage, reference: &str) -> Result<String> {
    let reference: Reference = reference.parse()?;
    let client = p.registry_client()?;
    let target = images::push_target(&reference, &p.url())?;
    let digest = images::push(&client, image, &target).await?;
    println!(
        "pushed {reference} ({digest}): layers {} bytes ({})",
        layer_bytes(image),
        image
            .layers
            .iter()
            .map(|l| format!("{} {} B", short_type(&l.media_type), l.data.len()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(reference.to_string())
}

fn short_type(mt: &str) -> &str {
    mt.rsplit('.').next().unwrap_or(mt)
}

/// Reads one phase of a sample.
type Phase = fn(&Sample) -> f64;

/// Phases of one cold start, in ms.
#[derive(Debug, Clone, Default)]
struct Sample {
    /// Client-side latency of the cold request.
    client: f64,
    /// Node side, start request → ready.
    total: f64,
    /// Sandbox boot (0 when taken from the pool).
    boot: f64,
    attest: f64,
    manifest: f64,
    layers: f64,
    spawn: f64,
    ready: f64,
}

fn parse_phases(h: &str) -> Result<Sample> {
    let mut m = BTreeMap::new();
    for kv in h.split(';') {
        if let Some((k, v)) = kv.split_once('=') {
            if let Ok(v) = v.parse::<f64>() {
                m.insert(k.trim(), v);
            }
        }
    }
    let get = |k: &str| {
        m.get(k)
            .copied()
            .with_context(|| format!("phase {k:?} missing from x-veil-cold-start: {h}"))
    };
    Ok(Sample {
        client: 0.0,
        total: get("total")?,
        boot: get("boot")?,
        attest: get("attest")?,
        manifest: get("manifest")?,
        layers: get("layers")?,
        spawn: get("spawn")?,
        ready: get("ready")?,
    })
}

/// Wait until no sandbox is assigned to a function and the pool is full, so a cold start
/// neither overlaps a teardown nor takes a half-booted pool.
async fn quiesce(p: &Platform, admin: &AdminClient) -> Result<()> {
    let t = Instant::now();
    loop {
        let sbs = admin.sandboxes().await?;
        let assigned = sbs.iter().any(|s| !s["function"].is_null());
        if !assigned && p.gateway.node().pooled().await >= POOL_SIZE {
            break;
        }
        if t.elapsed() > Duration::from_secs(20) {
            bail!("the node did not settle within 20 s (sandboxes: {sbs:?})");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Let the just-booted sandbox's agent go idle.
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(())
}

/// Deploy `name`, cold-start it with one request, delete it.
async fn cold_start(
    p: &Platform,
    admin: &AdminClient,
    name: &str,
    req: &DeployRequest,
) -> Result<Sample> {
    admin
        .deploy(name, req)
        .await
        .with_context(|| format!("deploy {name}"))?;
    quiesce(p, admin).await?;
    let t = Instant::now();
    let r = admin
        .invoke(name, "POST", "/", b"pull".to_vec(), &BTreeMap::new())
        .await?;
    let client = t.elapsed().as_secs_f64() * 1000.0;
    let body = String::from_utf8_lossy(&r.body);
    if r.status != 200 || !body.starts_with("Hello from veil!") {
        bail!("{name}: HTTP {}: {body}", r.status);
    }
    let h = r
        .headers
        .get("x-veil-cold-start")
        .and_then(|v| v.to_str().ok())
        .with_context(|| format!("{name}: the request was not a cold start"))?;
    let mut s = parse_phases(h)?;
    s.client = client;
    admin.delete(name).await?;
    Ok(s)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

/// Median wall time in ms of `reps` runs of `f`.
fn time_ms(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(median(&v))
}

/// The parts of the pull pipeline, timed on the payload layer in this process (one thread,
/// no sandbox, no CPU quota), to see what dominates the in-sandbox figures.
fn offline_parts(
    plain: &BuiltImage,
    encrypted: &BuiltImage,
    key: &PrivateKey,
    tmp: &std::path::Path,
) -> Result<()> {
    const REPS: usize = 5;
    let m = match parse_manifest(&encrypted.manifest.data, None)? {
        Manifest::Image(m) => m,
        Manifest::Index(_) => bail!("the encrypted image has an index"),
    };
    let i = plain.layers.len() - 1;
    let (gz, enc) = (&plain.layers[i].data, &encrypted.layers[i].data);
    let lk = veil_image::crypt::unwrap_layer_key(&m.layers[i], std::slice::from_ref(key))?;
    // The sandbox root is a tmpfs: unpack onto one too when the host has it.
    let shm = std::path::Path::new("/dev/shm");
    let scratch = if shm.is_dir() {
        tempfile::tempdir_in(shm)?
    } else {
        tempfile::tempdir_in(tmp)?
    };
    let opts = UnpackOptions {
        preserve_owner: true,
        ..UnpackOptions::default()
    };
    let mut n = 0;
    let mut unpack = |r: &mut dyn std::io::Read| -> Result<()> {
        n += 1;
        let dir = scratch.path().join(n.to_string());
        std::fs::create_dir(&dir)?;
        unpack_layer(r, Compression::Gzip, &dir, &opts)?;
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    };
    let sha = time_ms(REPS, || {
        Digest::sha256(enc);
        Ok(())
    })?;
    let unwrap = time_ms(REPS, || {
        veil_image::crypt::unwrap_layer_key(&m.layers[i], std::slice::from_ref(key))?;
        Ok(())
    })?;
    let decrypt = time_ms(REPS, || {
        std::io::copy(&mut lk.decrypt(&enc[..]), &mut std::io::sink())?;
        Ok(())
    })?;
    let gunzip = time_ms(REPS, || {
        std::io::copy(
            &mut flate2::read::MultiGzDecoder::new(&gz[..]),
            &mut std::io::sink(),
        )?;
        Ok(())
    })?;
    let plain_unpack = time_ms(REPS, || unpack(&mut &gz[..]))?;
    let conf_unpack = time_ms(REPS, || unpack(&mut lk.decrypt(&enc[..])))?;
    println!(
        "offline parts on the payload layer ({} B blob; this process, one thread, no sandbox \
         or quota; unpack onto {}; median of {REPS}), ms:",
        gz.len(),
        scratch.path().display()
    );
    println!(
        "  sha256 of the blob {sha:.1} | JWE key unwrap {unwrap:.1} | decrypt (AES-CTR + HMAC + \
         plaintext sha256) {decrypt:.1} | gunzip {gunzip:.1}"
    );
    println!(
        "  plain unpack (gunzip + untar) {plain_unpack:.1} | confidential unpack (decrypt + \
         gunzip + untar) {conf_unpack:.1} | ratio {:.2}x",
        conf_unpack / plain_unpack
    );
    Ok(())
}

async fn run(
    p: &Platform,
    tmp: &std::path::Path,
    rounds: usize,
    mib: usize,
    binary_pct: usize,
) -> Result<()> {
    println!("platform on {} (pool of {POOL_SIZE})", p.url());
    let kbs = p
        .kbs
        .as_ref()
        .context("the benchmark needs the embedded key broker")?;

    // One image: the example function + the payload layer.
    let t = Instant::now();
    let ctx = tmp.join("hello");
    images::write_example(&ctx)?;
    let spec = images::example_spec(&ctx);
    let hello = build_image(&spec)?;
    let (tar, files) = payload_tar(mib << 20, binary_pct as u64)?;
    let payload = Blob::new(OCI_LAYER_TAR_GZIP, gzip(&tar)?);
    println!(
        "payload layer: {files} files, tar {} bytes, gzip {} bytes (ratio {:.2})",
        tar.len(),
        payload.data.len(),
        tar.len() as f64 / payload.data.len() as f64
    );
    drop(tar);
    let mut layers = hello.layers.clone();
    layers.push(payload);
    let plain = assemble_image(layers, &spec.run_config())?;
    let key = PrivateKey::generate_p256();
    let encrypted = encrypt_image(&plain, &[key.public_key()], |_, _| true)?;
    kbs.set_resource(IMAGE_KEY, key.to_pem()?.as_bytes())?;
    kbs.set_resource(SECRET, b"pull-bench-token")?;
    let plain_ref = push(p, &plain, "local/pullbench:plain").await?;
    let enc_ref = push(p, &encrypted, "local/pullbench:encrypted").await?;
    println!(
        "image built, encrypted and pushed in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    offline_parts(&plain, &encrypted, &key, tmp)?;

    // The same attestation plan on both sides; only the encrypted one names a key.
    let deploy = |image: &str, keys: &[&str]| {
        let mut req = DeployRequest::new(image);
        req.secrets
            .insert("BENCH_TOKEN".into(), format!("kbs:///{SECRET}"));
        req.decryption_keys = keys.iter().map(|k| format!("kbs:///{k}")).collect();
        req.allow_insecure_software_tee = true;
        req
    };
    let variants = [
        ("plain", deploy(&plain_ref, &[])),
        ("encrypted", deploy(&enc_ref, &[IMAGE_KEY])),
    ];

    let admin = p.admin_client()?;
    // One unmeasured cold start each (page cache, lazy initialisation, checks it works).
    for (name, req) in &variants {
        let s = cold_start(p, &admin, name, req).await?;
        println!(
            "warm-up {name:>9}: client {:.1} ms, layers {:.1} ms",
            s.client, s.layers
        );
    }

    let mut samples: [Vec<Sample>; 2] = [Vec::new(), Vec::new()];
    println!();
    println!(
        "round  variant    client  total  boot  attest  manifest  layers  spawn  ready   (ms)"
    );
    for round in 0..rounds {
        // Alternate the order too, so neither side always runs right after the other.
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let (name, req) = &variants[i];
            let s = cold_start(p, &admin, name, req).await?;
            println!(
                "{round:>5}  {name:<9} {:>7.1} {:>6.1} {:>5.1} {:>7.1} {:>9.1} {:>7.1} {:>6.1} {:>6.1}",
                s.client, s.total, s.boot, s.attest, s.manifest, s.layers, s.spawn, s.ready
            );
            samples[i].push(s);
        }
    }

    let [ps, es] = &samples;
    let col = |v: &[Sample], f: Phase| v.iter().map(f).collect::<Vec<_>>();
    let metrics: [(&str, Phase); 6] = [
        (
            "layers (fetch + digest + [decrypt] + gunzip + untar)",
            |s| s.layers,
        ),
        ("manifest + config", |s| s.manifest),
        ("attestation + secret [+ image key] release", |s| s.attest),
        ("pull incl. attestation (attest + manifest + layers)", |s| {
            s.attest + s.manifest + s.layers
        }),
        ("cold start, node side (total)", |s| s.total),
        ("cold start, client side (one HTTP request)", |s| s.client),
    ];
    println!();
    println!(
        "layer bytes per pull: plain {} , encrypted {} (ciphertext; same plaintext)",
        layer_bytes(&plain),
        layer_bytes(&encrypted)
    );
    println!();
    println!(
        "| phase (ms, {rounds} cold starts each) | plain min | median | max | encrypted min | median | max | ratio of medians | per-round ratio median (min–max) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (label, f) in metrics {
        let (a, b) = (col(ps, f), col(es, f));
        let ratios: Vec<f64> = a.iter().zip(&b).map(|(x, y)| y / x).collect();
        println!(
            "| {label} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2}x | {:.2}x ({:.2}–{:.2}) |",
            min(&a),
            median(&a),
            max(&a),
            min(&b),
            median(&b),
            max(&b),
            median(&b) / median(&a),
            median(&ratios),
            min(&ratios),
            max(&ratios)
        );
    }
    let lr = median(&col(es, |s| s.layers)) / median(&col(ps, |s| s.layers));
    println!();
    println!(
        "target: encrypted pull <= 1.2x plain pull; layers phase ratio of medians {lr:.2}x: {}",
        if lr <= 1.2 { "MET" } else { "NOT MET" }
    );
    println!("(attestation used the INSECURE software TEE; development only)");
    Ok(())
}
