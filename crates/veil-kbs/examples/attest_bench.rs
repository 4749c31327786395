//! Runs N full attest + resource round trips against a broker on loopback and prints latency.
//!
//! `cargo run --release -p veil-kbs --example attest_bench -- [N] [CONCURRENCY]` (defaults 200
//! and 1). With CONCURRENCY > 1 that many clients run at once, which measures the broker's
//! throughput rather than one client's latency. Uses the
//! INSECURE software TEE, so the numbers cover the protocol, policy, token and JWE costs, not
//! hardware evidence verification.

use std::time::{Duration, Instant};
use veil_attest::software::SoftwareAttester;
use veil_kbs::{Kbs, KbsClient, KbsConfig, ReqwestTransport};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(200)
        .clamp(1, 100_000);
    let conc: usize = std::env::args()
        .nth(2)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(1)
        .clamp(1, 256);
    let dir = tempfile::tempdir()?;
    let host = std::sync::Arc::new(veil_attest::software::HostKey::generate());
    let mut cfg = KbsConfig::new(dir.path());
    cfg.allow_insecure_software_tee = true;
    cfg.software_tee_hosts = vec![host.public_hex()];
    let kbs = Kbs::open(cfg)?;
    kbs.set_reference_values(veil_kbs::SOFTWARE_TEE_TENANTS, &["bench".into()])?;
    kbs.set_resource("bench/key/image", &[7u8; 32])?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let router = kbs.router();
    let server = tokio::spawn(async move { axum::serve(listener, router).await });

    let init = veil_kbs::veil_init_data(&serde_json::json!({
        "tenant": "bench", "function": "f", "image_digest": format!("sha256:{}", "0".repeat(64)),
    }))?;
    let all = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..conc {
        let rounds = n / conc + usize::from(w < n % conc);
        let base = base.clone();
        let init = init.clone();
        let host = host.clone();
        tasks.push(tokio::spawn(async move {
            let credential = host.endorse(
                "bench",
                "bench",
                "f",
                std::time::SystemTime::now(),
                std::time::Duration::from_secs(3600),
            );
            let attester = SoftwareAttester::new(&"ab".repeat(48), "", &credential)
                .map_err(|e| e.to_string())?;
            let mut lat = Vec::with_capacity(rounds);
            for _ in 0..rounds {
                let t = Instant::now();
                let mut c = KbsClient::new(ReqwestTransport::new(base.clone()));
                c.attest(&attester, Some(&init))
                    .await
                    .map_err(|e| e.to_string())?;
                let v = c
                    .get_resource("bench/key/image")
                    .await
                    .map_err(|e| e.to_string())?;
                if v.len() != 32 {
                    return Err("wrong resource length".to_string());
                }
                lat.push(t.elapsed());
            }
            Ok::<_, String>(lat)
        }));
    }
    let mut lat: Vec<Duration> = Vec::with_capacity(n);
    for t in tasks {
        lat.extend(t.await??);
    }
    let total = all.elapsed();
    server.abort();
    lat.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{n} rounds (auth + attest + resource), {conc} at a time: min {:.2} ms, median {:.2} ms, max {:.2} ms, {:.1} rounds/s",
        ms(lat[0]),
        ms(lat[n / 2]),
        ms(lat[n - 1]),
        n as f64 / total.as_secs_f64()
    );
    Ok(())
}
