//! The serving layer's performance, side by side in one run, on the namespace backend:
//!
//! - **warm throughput**: `wrk` (Debian's) with the same connections against the example
//!   function through veil (`/f/hello/`, one warm instance) and against the same function
//!   binary run directly on the host;
//! - **warm latency**: `wrk` with one connection against both; the median veil adds;
//! - **burst from zero**: 100 concurrent clients to a function that takes 100 ms per request
//!   with `--concurrency 1`: the time until 90 % of `max_scale` instances are up.
//!
//! Rounds alternate which side goes first; min / median / max over the rounds and the ratios
//! of the medians are printed.
//!
//! ```text
//! apt-get install wrk
//! cargo build --release -p veil-agent
//! cargo run --release -p veil-cli --example serving_bench -- [ROUNDS] [SECONDS] [CONNECTIONS]
//! ```
//! Defaults: 3 rounds, 5 s per measurement, 16 connections.

use anyhow::{bail, Context, Result};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use veil_cli::{images, Platform, UpOptions};
use veil_gateway::DeployRequest;
use veil_image::build::build_image;
use veil_image::Reference;

#[path = "support/mod.rs"]
mod support;
use support::stats;

/// A wrk duration (`123.45us`, `1.20ms`, `1.00s`) in milliseconds.
fn wrk_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let (n, scale) = if let Some(n) = s.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return None;
    };
    n.parse::<f64>().ok().map(|v| v * scale)
}

struct Wrk {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: bool,
}

fn wrk(url: &str, connections: usize, secs: u64) -> Result<Wrk> {
    let threads = connections.clamp(1, 2).to_string();
    let out = Command::new("wrk")
        .args([
            "-t",
            &threads,
            "-c",
            &connections.to_string(),
            "-d",
            &format!("{secs}s"),
            "--latency",
            url,
        ])
        .output()
        .context("run wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix).map(|r| r.trim().to_string()))
    };
    let rps = field("Requests/sec:")
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no Requests/sec in wrk's output:\n{text}"))?;
    let p50_ms = field("50%").and_then(|v| wrk_ms(&v)).context("no 50%")?;
    let p99_ms = field("99%").and_then(|v| wrk_ms(&v)).context("no 99%")?;
    let errors = text.contains("Non-2xx") || text.contains("Socket errors");
    Ok(Wrk {
        rps,
        p50_ms,
        p99_ms,
        errors,
    })
}

async fn wait_listening(url: &str) -> Result<()> {
    let t = Instant::now();
    while reqwest::get(url).await.is_err() {
        if t.elapsed() > Duration::from_secs(10) {
            bail!("{url} did not answer");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let rounds: usize = args.get(1).map_or(Ok(3), |s| s.parse())?;
    let secs: u64 = args.get(2).map_or(Ok(5), |s| s.parse())?;
    let conns: usize = args.get(3).map_or(Ok(16), |s| s.parse())?;
    let tmp = tempfile::tempdir()?;
    let mut opts = UpOptions::defaults(tmp.path().join("state"));
    opts.listen = "127.0.0.1:0".parse()?;
    opts.pool_size = 4;
    let p = Platform::start(opts).await?;
    let admin = p.admin_client()?;

    let ctx = tmp.path().join("ctx");
    images::write_example(&ctx)?;
    let image = build_image(&images::example_spec(&ctx))?;
    let reference: Reference = "local/hello:bench".parse()?;
    let target = images::push_target(&reference, &p.url())?;
    images::push(&p.registry_client()?, &image, &target).await?;
    admin
        .deploy("hello", &DeployRequest::new(&reference.to_string()))
        .await?;
    let via_veil = format!("{}/f/hello/", p.url());
    wait_listening(&via_veil).await?;

    // The same binary, directly on the host.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let mut direct = Command::new(ctx.join("hello"))
        .env("PORT", port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let direct_url = format!("http://127.0.0.1:{port}/");
    wait_listening(&direct_url).await?;

    let (mut v_rps, mut d_rps, mut v_p50, mut d_p50, mut added) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let order: [(&str, &str); 2] = if round % 2 == 0 {
            [("veil", &via_veil), ("direct", &direct_url)]
        } else {
            [("direct", &direct_url), ("veil", &via_veil)]
        };
        let mut lat = [0.0f64; 2];
        for (who, url) in order {
            let t = wrk(url, conns, secs)?;
            let l = wrk(url, 1, secs.min(3))?;
            eprintln!(
                "round {round} {who:>6}: {:>9.0} req/s at {conns} connections; 1 connection: p50 {:.3} ms, p99 {:.3} ms{}",
                t.rps,
                l.p50_ms,
                l.p99_ms,
                if t.errors || l.errors { " (ERRORS)" } else { "" }
            );
            if who == "veil" {
                v_rps.push(t.rps);
                v_p50.push(l.p50_ms);
                lat[0] = l.p50_ms;
            } else {
                d_rps.push(t.rps);
                d_p50.push(l.p50_ms);
                lat[1] = l.p50_ms;
            }
        }
        added.push(lat[0] - lat[1]);
    }
    let _ = direct.kill();
    let _ = direct.wait();

    // Burst from zero: 100 clients, 100 ms per request, concurrency 1 per instance; the warm
    // function goes first, so the whole node is the burst's.
    admin.delete("hello").await?;
    let cap = p.gateway.node().capacity().max_sandboxes as u32;
    let max_scale = cap.min(10);
    let want = (f64::from(max_scale) * 0.9).ceil() as usize;
    let mut burst_s = Vec::new();
    for round in 0..rounds {
        let name = format!("sleepy{round}");
        let mut req = DeployRequest::new(&reference.to_string());
        req.concurrency = Some(1);
        req.max_scale = Some(max_scale);
        admin.deploy(&name, &req).await?;
        // Let the generic pool refill first, as it would between bursts.
        let t = Instant::now();
        while p.gateway.node().status().pooled < 4 && t.elapsed() < Duration::from_secs(30) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let url = format!("{}/f/{name}/sleep/100", p.url());
        let http = reqwest::Client::builder().no_proxy().build()?;
        let clients: Vec<_> = (0..100)
            .map(|_| {
                let (http, url, stop) = (http.clone(), url.clone(), stop.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::SeqCst) {
                        let _ = http.get(&url).send().await.map(|r| r.bytes());
                    }
                })
            })
            .collect();
        let t = Instant::now();
        let reached = loop {
            let up = admin.function(&name).await?.instances.len();
            if up >= want {
                break Some(t.elapsed().as_secs_f64());
            }
            if t.elapsed() > Duration::from_secs(30) {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        stop.store(true, Ordering::SeqCst);
        for c in clients {
            let _ = c.await;
        }
        match reached {
            Some(s) => {
                eprintln!(
                    "round {round}: {want} of max_scale {max_scale} instances up in {s:.3} s"
                );
                burst_s.push(s);
            }
            None => eprintln!("round {round}: {want} instances not up within 30 s"),
        }
        admin.delete(&name).await?;
    }

    let (a, b, c) = stats(&v_rps);
    println!("warm throughput via veil ({conns} connections): {a:.0} / {b:.0} / {c:.0} req/s (min/median/max)");
    let (a2, b2, c2) = stats(&d_rps);
    println!("warm throughput direct   ({conns} connections): {a2:.0} / {b2:.0} / {c2:.0} req/s");
    println!("ratio veil/direct (medians): {:.3}x", b / b2);
    let (a, b, c) = stats(&v_p50);
    println!("warm p50 latency via veil (1 connection): {a:.3} / {b:.3} / {c:.3} ms");
    let (a, b, c) = stats(&d_p50);
    println!("warm p50 latency direct   (1 connection): {a:.3} / {b:.3} / {c:.3} ms");
    let (a, b, c) = stats(&added);
    println!("latency veil adds at the median: {a:.3} / {b:.3} / {c:.3} ms");
    let (a, b, c) = stats(&burst_s);
    println!(
        "burst from zero to {want} of {max_scale} instances: {a:.3} / {b:.3} / {c:.3} s ({} of {rounds} rounds reached it)",
        burst_s.len()
    );
    p.stop().await?;
    Ok(())
}
