//! veil's side of the study: each configuration of the ladder, from the namespace sandbox (the
//! runc-like baseline) up to the full confidential path, measured the same way.

use super::report::{Measured, Progress, Rung, Stats, Throughput};
use super::{BenchOptions, Images, POOL_SIZE};
use crate::{images, Platform};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use veil_gateway::DeployRequest;
use veil_image::Reference;

const SECRET: &str = "default/bench/token";
const IMAGE_KEY: &str = "default/image-key/bench";
const POLICY: &str = "default/policy/bench";
const COSIGN_KEY: &str = "default/cosign/bench";

/// A configuration veil measures: what the deploy asks for.
struct Config {
    name: &'static str,
    what: &'static str,
    attest: bool,
    signed: bool,
    encrypted: bool,
}

const CONFIGS: [Config; 4] = [
    Config {
        name: "namespace",
        what: "namespace sandbox (the runc-like baseline): plain image, no broker",
        attest: false,
        signed: false,
        encrypted: false,
    },
    Config {
        name: "+ attestation",
        what: "+ attestation to the tenant's broker and a secret released (software TEE: INSECURE, development only)",
        attest: true,
        signed: false,
        encrypted: false,
    },
    Config {
        name: "+ signed image",
        what: "+ the image's cosign signature checked in the sandbox against the tenant's policy",
        attest: true,
        signed: true,
        encrypted: false,
    },
    Config {
        name: "+ encrypted image",
        what: "+ every layer encrypted (ocicrypt JWE), its key released after attestation: the full confidential path",
        attest: true,
        signed: true,
        encrypted: true,
    },
];

/// Progress steps the ladder takes.
pub(super) fn steps(opts: &BenchOptions) -> u64 {
    (CONFIGS.len() * (opts.rounds + 1 + opts.throughput_n.len())) as u64
}

/// Rows of the study's ladder this run cannot measure, and why.
fn not_measured() -> Vec<Rung> {
    let later = "not yet measured by veil bench (the microVM backend runs here under TCG; \
                 examples/backend_bench compares it with the namespace backend)";
    let mut rows = vec![
        Rung::not_measured(
            "microVM",
            "QEMU microVM, direct kernel boot, no firmware",
            later,
        ),
        Rung::not_measured(
            "microVM + firmware",
            "q35 + OVMF, the firmware a confidential guest boots",
            later,
        ),
    ];
    for (tee, name) in [
        (veil_sandbox::cvm::Tee::Snp, "SEV-SNP"),
        (veil_sandbox::cvm::Tee::Tdx, "TDX"),
    ] {
        let probe =
            veil_sandbox::cvm::HostProbe::system("qemu-system-x86_64", "/usr/share/ovmf/OVMF.fd");
        let why = match veil_sandbox::cvm::check_host(tee, &probe) {
            Ok(_) => "the host has what it needs, but veil bench does not launch confidential \
                      guests yet"
                .to_string(),
            Err(e) => e.to_string(),
        };
        rows.push(Rung::not_measured(
            name,
            "a confidential VM with hardware attestation",
            &why,
        ));
    }
    rows
}

/// Push the images, register what the broker releases, and measure every configuration.
pub(super) async fn run(
    p: &Platform,
    imgs: &Images,
    opts: &BenchOptions,
    progress: &Progress,
) -> Result<Vec<Rung>> {
    let kbs = p
        .kbs
        .as_ref()
        .context("veil bench needs the embedded key broker")?;
    kbs.set_resource(SECRET, b"bench-token")?;
    kbs.set_resource(IMAGE_KEY, imgs.key.to_pem()?.as_bytes())?;
    kbs.set_resource(COSIGN_KEY, imgs.signing.public_key_pem()?.as_bytes())?;
    let policy = format!(
        r#"{{"default":[{{"type":"reject"}}],"transports":{{"docker":{{"local/bench":[{{"type":"sigstoreSigned","keyPath":"kbs:///{COSIGN_KEY}"}}]}}}}}}"#
    );
    kbs.set_resource(POLICY, policy.as_bytes())?;
    let client = p.registry_client()?;
    let mut refs = BTreeMap::new();
    for (tag, image) in [("plain", &imgs.plain), ("encrypted", &imgs.encrypted)] {
        let reference: Reference = format!("local/bench:{tag}").parse()?;
        let target = images::push_target(&reference, &p.url())?;
        images::push(&client, image, &target).await?;
        images::sign_image(&client, &target, &reference, &imgs.signing).await?;
        refs.insert(tag, reference.to_string());
    }
    let admin = p.admin_client()?;
    // One start of each before measuring: the page cache and the node's caches are warm for
    // every configuration alike.
    for (i, c) in CONFIGS.iter().enumerate() {
        let name = format!("warmup{i}");
        admin.deploy(&name, &deploy(c, &refs)).await?;
        let r = get(p, &name, "/").await?;
        if r.status != 200 {
            bail!("{}: warm-up answered {}: {}", c.name, r.status, r.body);
        }
        admin.delete(&name).await?;
    }
    let mut rungs = Vec::new();
    for (i, c) in CONFIGS.iter().enumerate() {
        progress.say(&format!("veil: {}", c.name));
        let m = measure(p, &admin, i, c, &refs, opts, progress)
            .await
            .with_context(|| format!("configuration {:?}", c.name))?;
        rungs.push(Rung::measured(c.name, c.what, m));
    }
    rungs.extend(not_measured());
    Ok(rungs)
}

fn deploy(c: &Config, refs: &BTreeMap<&str, String>) -> DeployRequest {
    let image = if c.encrypted {
        &refs["encrypted"]
    } else {
        &refs["plain"]
    };
    let mut req = DeployRequest::new(image);
    if c.attest {
        req.secrets
            .insert("BENCH_TOKEN".into(), format!("kbs:///{SECRET}"));
        req.allow_insecure_software_tee = true;
    }
    if c.signed {
        req.signature_policy = Some(format!("kbs:///{POLICY}"));
    }
    if c.encrypted {
        req.decryption_keys = vec![format!("kbs:///{IMAGE_KEY}")];
    }
    req
}

pub(super) struct Answer {
    pub status: u16,
    pub body: String,
    pub cold: Option<String>,
}

async fn get(p: &Platform, name: &str, path: &str) -> Result<Answer> {
    let url = format!("{}/f/{name}{path}", p.url());
    let r = http().get(&url).send().await?;
    let status = r.status().as_u16();
    let cold = r
        .headers()
        .get("x-veil-cold-start")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = r.text().await.unwrap_or_default();
    Ok(Answer { status, body, cold })
}

fn http() -> &'static reqwest::Client {
    static C: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    C.get_or_init(|| {
        reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(256)
            .build()
            .unwrap_or_default()
    })
}

/// The numeric phases of an `x-veil-cold-start` header, in milliseconds.
pub(super) fn phases(h: &str) -> BTreeMap<String, f64> {
    h.split(';')
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| v.parse::<f64>().ok().map(|v| (k.trim().to_string(), v)))
        .collect()
}

/// Wait until the generic pool is full and no function is left: every start begins alike.
async fn settle(p: &Platform) -> Result<()> {
    let t = Instant::now();
    loop {
        let st = p.gateway.node().status();
        if st.pooled >= POOL_SIZE && st.assigned == 0 {
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(60) {
            bail!(
                "the node did not settle (pool {} of {POOL_SIZE}, {} assigned)",
                st.pooled,
                st.assigned
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn measure(
    p: &Platform,
    admin: &crate::client::AdminClient,
    i: usize,
    c: &Config,
    refs: &BTreeMap<&str, String>,
    opts: &BenchOptions,
    progress: &Progress,
) -> Result<Measured> {
    let req = deploy(c, refs);
    let mut cold = Vec::new();
    let mut node_side = Vec::new();
    let mut per_phase: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut warm = Vec::new();
    for round in 0..opts.rounds {
        let name = format!("c{i}r{round}");
        admin.deploy(&name, &req).await?;
        settle(p).await?;
        let t = Instant::now();
        let r = get(p, &name, "/").await?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        if r.status != 200 {
            bail!("cold start answered {}: {}", r.status, r.body);
        }
        let ph = phases(
            r.cold
                .as_deref()
                .context("no x-veil-cold-start on a cold start")?,
        );
        cold.push(ms);
        node_side.push(ph.get("total").copied().unwrap_or(f64::NAN));
        for (k, v) in ph {
            if k != "total" {
                per_phase.entry(k).or_default().push(v);
            }
        }
        // Warm starts: requests to the instance the cold start left, spread over the rounds.
        let share = opts.warm / opts.rounds + usize::from(round < opts.warm % opts.rounds);
        for _ in 0..share {
            let t = Instant::now();
            let r = get(p, &name, "/").await?;
            if r.status != 200 || r.cold.is_some() {
                bail!("a warm request answered {} (cold: {:?})", r.status, r.cold);
            }
            warm.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        admin.delete(&name).await?;
        progress.step();
    }
    progress.step();
    let mut throughput = Vec::new();
    for &n in &opts.throughput_n {
        throughput.push(instantiate(p, admin, i, n, &req).await?);
        progress.step();
    }
    Ok(Measured {
        cold_ms: Stats::of(&cold),
        cold_node_ms: Stats::of(&node_side),
        phases_ms: per_phase
            .into_iter()
            .map(|(k, v)| (k, Stats::of(&v)))
            .collect(),
        warm_ms: Stats::of(&warm),
        throughput,
    })
}

/// N distinct functions, deployed, none started; then one request to each at once: how many
/// cold starts complete per second.
async fn instantiate(
    p: &Platform,
    admin: &crate::client::AdminClient,
    i: usize,
    n: usize,
    req: &DeployRequest,
) -> Result<Throughput> {
    let names: Vec<String> = (0..n).map(|k| format!("t{i}n{n}f{k}")).collect();
    for name in &names {
        admin.deploy(name, req).await?;
    }
    settle(p).await?;
    let t = Instant::now();
    let calls = names
        .iter()
        .map(|name| async move { get(p, name, "/").await });
    let answers = futures::future::join_all(calls).await;
    let took = t.elapsed().as_secs_f64();
    let ok = answers
        .iter()
        .filter(|a| a.as_ref().is_ok_and(|a| a.status == 200))
        .count();
    for name in &names {
        admin.delete(name).await?;
    }
    if ok < n {
        let first_bad = answers
            .iter()
            .find_map(|a| match a {
                Ok(a) if a.status == 200 => None,
                Ok(a) => Some(format!("{}: {}", a.status, a.body)),
                Err(e) => Some(e.to_string()),
            })
            .unwrap_or_default();
        bail!(
            "{} of {n} concurrent cold starts failed; first: {first_bad}",
            n - ok
        );
    }
    Ok(Throughput {
        n,
        took_s: took,
        per_s: n as f64 / took,
    })
}
