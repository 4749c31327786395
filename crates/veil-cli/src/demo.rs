//! `veil demo`: the whole platform in one process on embedded defaults. Builds the example
//! function image, pushes and signs it in the local store over the registry API, deploys it
//! with a secret and a signature policy from the embedded key broker, invokes it twice (a cold
//! start and a warm start), prints the answers and latencies, and shuts down.

use crate::{images, Platform, UpOptions};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::time::Instant;
use veil_gateway::DeployRequest;
use veil_image::Reference;

/// Run the demo on `backend`. `state_dir` defaults to a fresh temporary directory.
pub async fn run(
    state_dir: Option<std::path::PathBuf>,
    backend: crate::backend::BackendChoice,
) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let state = state_dir.unwrap_or_else(|| tmp.path().join("state"));
    let mut opts = UpOptions::defaults(state);
    opts.listen = "127.0.0.1:0".parse()?;
    opts.pool_size = 1;
    opts.backend = backend;
    let platform = Platform::start(opts).await?;
    let res = steps(&platform, tmp.path()).await;
    let stop = platform.stop().await;
    res?;
    stop?;
    Ok(())
}

async fn steps(p: &Platform, tmp: &std::path::Path) -> Result<()> {
    let backend = p.gateway.node().backend_label();
    println!(
        "veil demo: gateway, node and {} sandboxes on {}",
        match backend.as_str() {
            "process" => "namespace".to_string(),
            other => other.to_string(),
        },
        p.url()
    );
    // Steady state: sandboxes are booted ahead of demand; wait for the first one.
    let t = Instant::now();
    while p.gateway.node().pooled().await == 0 && t.elapsed() < std::time::Duration::from_secs(120)
    {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    println!(
        "pre-booted sandbox ready after {:.0} ms (off the request path)",
        t.elapsed().as_secs_f64() * 1000.0
    );
    let ctx = tmp.join("hello");
    images::write_example(&ctx)?;
    let image = veil_image::build::build_image(&images::example_spec(&ctx))?;
    let reference: Reference = "local/hello:latest".parse()?;
    let client = p.registry_client()?;
    let target = images::push_target(&reference, &p.url())?;
    let digest = images::push(&client, &image, &target).await?;
    let size: usize = image.layers.iter().map(|l| l.data.len()).sum();
    println!(
        "built and pushed {reference} ({digest}, {} layer, {} KiB)",
        image.layers.len(),
        size / 1024
    );

    // Sign it (cosign format) with a key made for the demo.
    let key = veil_image::signature::SigningKey::generate()?;
    let (signed, _) = images::sign_image(&client, &target, &reference, &key).await?;
    println!("signed {reference} ({signed}) with a new cosign key");

    let admin = p.admin_client()?;
    // A secret only the attested sandbox receives, and the tenant's signature policy with its
    // public key, all from the embedded key broker.
    let kbs = p
        .kbs
        .as_ref()
        .context("the demo needs the embedded key broker")?;
    kbs.set_resource("default/demo/greeting", b"hello from the key broker")?;
    kbs.set_resource("default/demo/cosign-pub", key.public_key_pem()?.as_bytes())?;
    kbs.set_resource(
        "default/demo/image-policy",
        br#"{"default":[{"type":"reject"}],"transports":{"docker":{"local/hello":[
            {"type":"sigstoreSigned","keyPath":"kbs:///default/demo/cosign-pub"}]}}}"#,
    )?;
    let mut req = DeployRequest::new(&reference.to_string());
    req.secrets
        .insert("GREETING".into(), "kbs:///default/demo/greeting".into());
    req.signature_policy = Some("kbs:///default/demo/image-policy".into());
    req.allow_insecure_software_tee = true;
    let st = admin.deploy("hello", &req).await.context("deploy")?;
    println!(
        "deployed function hello -> {}",
        st.record.image.manifest_digest
    );

    for (label, data) in [("cold", "hello, veil"), ("warm", "hello again")] {
        let t = Instant::now();
        let r = admin
            .invoke(
                "hello",
                "POST",
                "/",
                data.as_bytes().to_vec(),
                &BTreeMap::new(),
            )
            .await?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        if r.status != 200 {
            bail!(
                "{label} invoke failed: HTTP {}: {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            );
        }
        println!(
            "{label} start: {ms:8.1} ms  {}",
            String::from_utf8_lossy(&r.body).trim_end()
        );
        if let Some(b) = r
            .headers
            .get("x-veil-cold-start")
            .and_then(|v| v.to_str().ok())
        {
            println!("    cold-start phases (ms): {}", b.replace(';', ", "));
        }
    }
    let r = admin
        .invoke(
            "hello",
            "GET",
            "/env/GREETING",
            Vec::new(),
            &BTreeMap::new(),
        )
        .await?;
    println!(
        "secret in the sandbox: {} (released after attestation and the signature check; this \
         machine has no SEV-SNP/TDX, so the INSECURE software TEE stood in)",
        String::from_utf8_lossy(&r.body).trim_end()
    );
    admin.delete("hello").await?;
    let left = admin.sandboxes().await?;
    let assigned = left.iter().filter(|s| !s["function"].is_null()).count();
    println!(
        "deleted hello; {assigned} assigned sandboxes left, {} pre-booted idle",
        left.len() - assigned
    );
    Ok(())
}
