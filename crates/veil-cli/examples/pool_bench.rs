//! Starts from each pool kind, side by side in one run, on the namespace backend with the
//! embedded broker and the (insecure, development) software TEE:
//!
//! - **generic**: a cold start of a function with a secret from the generic pool (the sandbox
//!   attests to the broker on the request path);
//! - **tenant-attested**: the same from the tenant's pool (attested ahead of demand; the
//!   broker releases the secret against the stated assignment), which must show
//!   `attested_ahead=true`;
//! - **function-warm**: the first request to an instance started ahead of demand (`min_scale`
//!   1), compared with warm requests to it.
//!
//! Rounds alternate which pool kind goes first. Before each measurement the node is settled:
//! the generic pool and (when measured) the tenant's pool full, nothing else assigned. The
//! tenant's pool is switched off (size 0) for generic rounds, so those starts cannot take it.
//! Reports min / median / max of the end-to-end latency seen by the client and of the
//! `x-veil-cold-start` total and attest phase, and the ratios of the medians.
//!
//! ```text
//! cargo build --release -p veil-agent
//! cargo run --release -p veil-cli --example pool_bench -- [ROUNDS]
//! ```
//! `ROUNDS` (default 10).

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use veil_cli::client::AdminClient;
use veil_cli::{images, Platform, TenantPoolSpec, UpOptions};
use veil_gateway::DeployRequest;
use veil_image::build::build_image;
use veil_image::Reference;

const DEADLINE: Duration = Duration::from_secs(300);

#[path = "support/mod.rs"]
mod support;
use support::stats;

fn phase(header: &str, name: &str) -> Option<String> {
    header
        .split(';')
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")).map(str::to_string))
}

async fn settle(p: &Platform, tenant_pool: usize) -> Result<()> {
    let t = Instant::now();
    loop {
        let st = p.gateway.node().status();
        let tenant_ready = st
            .tenant_pools
            .iter()
            .find(|t| t.config.tenant == "default")
            .map_or(0, |t| t.ready);
        if st.pooled >= st.pool_size && tenant_ready >= tenant_pool {
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(60) {
            bail!("the node did not settle: {:?}", st);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The phases of `x-veil-cold-start` printed for each pool kind (ms).
const PHASES: [&str; 10] = veil_node::StartTimings::PHASES;

struct Start {
    client_ms: f64,
    phases: BTreeMap<&'static str, f64>,
}

async fn cold_start(admin: &AdminClient, image: &str, name: &str, kind: &str) -> Result<Start> {
    let mut req = DeployRequest::new(image);
    req.secrets
        .insert("GREETING".into(), "kbs:///default/app/greeting".into());
    req.allow_insecure_software_tee = true;
    admin.deploy(name, &req).await?;
    let t = Instant::now();
    let r = admin
        .invoke(name, "GET", "/env/GREETING", Vec::new(), &BTreeMap::new())
        .await?;
    let client_ms = t.elapsed().as_secs_f64() * 1000.0;
    if r.status != 200 {
        bail!("{name}: {}", String::from_utf8_lossy(&r.body));
    }
    let h = r
        .headers
        .get("x-veil-cold-start")
        .and_then(|v| v.to_str().ok())
        .context("no cold-start breakdown")?
        .to_string();
    let pool = phase(&h, "pool").unwrap_or_default();
    if pool != kind {
        bail!("{name}: started from pool {pool:?}, not {kind:?}: {h}");
    }
    if kind == "tenant-attested" && phase(&h, "attested_ahead").as_deref() != Some("true") {
        bail!("{name}: attested on the request path: {h}");
    }
    let num = |k: &str| {
        phase(&h, k)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    admin.delete(name).await?;
    Ok(Start {
        client_ms,
        phases: PHASES.iter().map(|k| (*k, num(k))).collect(),
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10);
    let deadline = Instant::now() + DEADLINE;
    let state = tempfile::tempdir()?;
    let mut opts = UpOptions::defaults(state.path().join("state"));
    opts.listen = "127.0.0.1:0".parse()?;
    opts.pool_size = 1;
    opts.tenant_pools = vec![TenantPoolSpec {
        tenant: "default".into(),
        size: 1,
        kbs_url: None,
        allow_insecure_software_tee: true,
    }];
    let p = Platform::start(opts).await?;
    let admin = p.admin_client()?;
    p.kbs
        .as_ref()
        .context("embedded broker")?
        .set_resource("default/app/greeting", b"hello")?;
    let tmp = tempfile::tempdir()?;
    images::write_example(&tmp.path().join("ctx"))?;
    let built = build_image(&images::example_spec(&tmp.path().join("ctx")))?;
    let reference: Reference = "local/poolbench:v1".parse()?;
    images::push(
        &p.registry_client()?,
        &built,
        &images::push_target(&reference, &p.url())?,
    )
    .await?;
    let image = reference.to_string();
    let kbs_url = p.url();
    let pool_cfg = |size| veil_node::TenantPoolConfig {
        tenant: "default".into(),
        size,
        kbs_url: kbs_url.clone(),
        allow_insecure_software_tee: true,
    };

    let mut results: BTreeMap<&str, Vec<Start>> = BTreeMap::new();
    for round in 0..rounds {
        if Instant::now() > deadline {
            bail!("the run passed its deadline");
        }
        let order = if round % 2 == 0 {
            ["generic", "tenant-attested"]
        } else {
            ["tenant-attested", "generic"]
        };
        for kind in order {
            let size = usize::from(kind == "tenant-attested");
            p.gateway.node().set_tenant_pool(pool_cfg(size)).await;
            settle(&p, size).await?;
            let s = cold_start(&admin, &image, &format!("pb-{round}-{size}"), kind).await?;
            results.entry(kind).or_default().push(s);
        }
    }

    // Function-warm: an instance started ahead of demand (min_scale 1), its first request,
    // then warm requests.
    p.gateway.node().set_tenant_pool(pool_cfg(0)).await;
    let (mut first, mut warm) = (Vec::new(), Vec::new());
    for round in 0..rounds.min(5) {
        settle(&p, 0).await?;
        let name = format!("pw-{round}");
        let mut req = DeployRequest::new(&image);
        req.min_scale = Some(1);
        admin.deploy(&name, &req).await?;
        let t = Instant::now();
        loop {
            let st = admin.list().await?;
            if st
                .iter()
                .any(|f| f.record.name == name && !f.instances.is_empty())
            {
                break;
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!("{name}: min_scale instance did not start");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for i in 0..21 {
            let t = Instant::now();
            let r = admin
                .invoke(&name, "GET", "/", Vec::new(), &BTreeMap::new())
                .await?;
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            if r.status != 200 || r.headers.contains_key("x-veil-cold-start") {
                bail!("{name}: not a warm instance");
            }
            if i == 0 {
                first.push(ms);
            } else {
                warm.push(ms);
            }
        }
        admin.delete(&name).await?;
    }
    p.stop().await?;

    println!("pool kind          what                  min      median   max   (ms)");
    let mut medians = BTreeMap::new();
    for (kind, v) in &results {
        let mut rows = vec![(
            "client latency".to_string(),
            v.iter().map(|s| s.client_ms).collect::<Vec<_>>(),
        )];
        for ph in PHASES {
            rows.push((
                format!("{ph} phase"),
                v.iter().map(|s| s.phases[ph]).collect(),
            ));
        }
        for (what, xs) in rows {
            let (a, m, b) = stats(&xs);
            println!("{kind:<18} {what:<18} {a:>8.2} {m:>8.2} {b:>8.2}");
            medians.insert((*kind, what), m);
        }
    }
    for (what, xs) in [("first request", &first), ("warm request", &warm)] {
        let (a, m, b) = stats(xs);
        println!(
            "{:<18} {what:<18} {a:>8.2} {m:>8.2} {b:>8.2}",
            "function-warm"
        );
        medians.insert(("function-warm", what.to_string()), m);
    }
    let ratio = |a: (&str, &str), b: (&str, &str)| {
        let get = |k: (&str, &str)| medians.get(&(k.0, k.1.to_string())).copied();
        get(a).unwrap_or(0.0) / get(b).unwrap_or(1.0).max(1e-9)
    };
    println!(
        "tenant-attested / generic (median client latency): {:.2}x; (median cold-start total): {:.2}x",
        ratio(("tenant-attested", "client latency"), ("generic", "client latency")),
        ratio(("tenant-attested", "total phase"), ("generic", "total phase")),
    );
    println!(
        "function-warm first request / warm request (medians): {:.2}x",
        ratio(
            ("function-warm", "first request"),
            ("function-warm", "warm request")
        )
    );
    println!(
        "{rounds} rounds per pool kind; function-warm: {} instances x 20 warm requests",
        first.len()
    );

    // What a hardware attestation adds that a tenant-attested start does not pay: the broker's
    // verification of real SEV-SNP evidence (trustee's Genoa vector: AMD chain, VCEK, report
    // signature), which the software TEE above does not exercise.
    let vector = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../veil-attest/testdata/snp/trustee/evidence.json");
    let mut snp = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let r = veil_attest::report::verify_file(
            &vector,
            &veil_attest::report::VerifyOptions::default(),
            std::time::SystemTime::now(),
        )?;
        snp.push(t.elapsed().as_secs_f64() * 1000.0);
        if !r.verified {
            bail!("the SEV-SNP vector did not verify");
        }
    }
    let (a, m, b) = stats(&snp);
    println!(
        "SEV-SNP evidence verification (broker side, real vector): min {a:.2} median {m:.2} max {b:.2} ms"
    );
    Ok(())
}
