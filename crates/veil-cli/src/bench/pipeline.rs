//! The external baseline no one here wrote: the pipeline a user would script instead of veil.
//! The same image is put in a real registry (Debian's `docker-registry` on loopback, filled by
//! `skopeo copy` from an OCI layout); then, each run, `skopeo copy` (with `--decryption-key`
//! for the encrypted image) into a fresh OCI layout, `umoci unpack` into a bundle, and `runc
//! run` of it on the host's network until the function answers — timed phase by phase.

use super::report::{Pipeline, PipelineRun, Progress};
use super::{BenchOptions, Images};
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Progress steps the pipeline takes.
pub(super) fn steps(opts: &BenchOptions) -> u64 {
    if opts.no_pipeline {
        0
    } else {
        2 * opts.rounds as u64
    }
}

/// The pipeline's result when it did not run.
pub(super) fn skipped(why: &str) -> Pipeline {
    Pipeline {
        runs: Vec::new(),
        not_measured: Some(why.to_string()),
    }
}

const TOOLS: [(&str, &str); 4] = [
    ("skopeo", "apt-get install skopeo"),
    ("umoci", "apt-get install umoci"),
    ("runc", "apt-get install runc"),
    (
        veil_testkit::REGISTRY_BINARY,
        "apt-get install docker-registry",
    ),
];

/// Run the pipeline for the plain and the encrypted image, `opts.rounds` times each, in
/// alternating order. A missing tool or a failing step is reported as the reason it was not
/// measured, not as a failure of the whole benchmark.
pub(super) async fn run(
    tmp: &Path,
    imgs: &Images,
    opts: &BenchOptions,
    progress: &Progress,
) -> Pipeline {
    for (tool, install) in TOOLS {
        if which(tool).is_none() {
            return skipped(&format!("{tool} is not installed ({install})"));
        }
    }
    progress.say("pipeline: skopeo + umoci + runc");
    let tmp = tmp.to_path_buf();
    let plain = imgs.plain.clone();
    let encrypted = imgs.encrypted.clone();
    let key_pem = match imgs.key.to_pem() {
        Ok(k) => k,
        Err(e) => return skipped(&format!("the image key: {e}")),
    };
    let rounds = opts.rounds;
    let progress = progress.clone();
    let res = tokio::task::spawn_blocking(move || {
        blocking(&tmp, &plain, &encrypted, &key_pem, rounds, &progress)
    })
    .await;
    match res {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => skipped(&format!("the pipeline failed: {e:#}")),
        Err(e) => skipped(&format!("the pipeline panicked: {e}")),
    }
}

fn which(tool: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
    })
}

fn blocking(
    tmp: &Path,
    plain: &veil_image::build::BuiltImage,
    encrypted: &veil_image::build::BuiltImage,
    key_pem: &str,
    rounds: usize,
    progress: &Progress,
) -> Result<Pipeline> {
    let registry = veil_testkit::TestRegistry::start()?;
    let dir = tmp.join("pipeline");
    std::fs::create_dir_all(&dir)?;
    let layout = veil_image::layout::OciLayout::create(&dir.join("source"))?;
    layout.write_image(plain, "plain")?;
    layout.write_image(encrypted, "encrypted")?;
    let key = dir.join("image-key.pem");
    std::fs::write(&key, key_pem)?;
    for tag in ["plain", "encrypted"] {
        run_tool(
            "skopeo",
            &[
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
                &format!("oci:{}:{tag}", layout.dir().display()),
                &format!("docker://{}/bench:{tag}", registry.host()),
            ],
        )?;
    }
    let mut runs = Vec::new();
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            ["plain", "encrypted"]
        } else {
            ["encrypted", "plain"]
        };
        for tag in order {
            let key = (tag == "encrypted").then_some(key.as_path());
            let r = once(&dir, &registry.host(), tag, key, round)
                .with_context(|| format!("the {tag} image, round {round}"))?;
            runs.push(r);
            progress.step();
        }
    }
    Ok(Pipeline {
        runs,
        not_measured: None,
    })
}

fn run_tool(tool: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {tool}"))?;
    if !out.status.success() {
        bail!(
            "{tool} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// One run: pull, unpack, run until it answers.
fn once(
    dir: &Path,
    registry: &str,
    tag: &str,
    key: Option<&Path>,
    round: usize,
) -> Result<PipelineRun> {
    let work = dir.join(format!("{tag}-{round}"));
    std::fs::create_dir_all(&work)?;
    let oci = work.join("oci");
    let bundle = work.join("bundle");
    let id = format!("veil-bench-{}-{tag}-{round}", std::process::id());
    let port = veil_testkit::free_port();

    let t0 = Instant::now();
    let src = format!("docker://{registry}/bench:{tag}");
    let dst = format!("oci:{}:{tag}", oci.display());
    let mut copy = vec!["copy", "--quiet", "--src-tls-verify=false"];
    let key_arg;
    if let Some(k) = key {
        key_arg = k.display().to_string();
        copy.extend(["--decryption-key", &key_arg]);
    }
    copy.extend([src.as_str(), dst.as_str()]);
    run_tool("skopeo", &copy)?;
    let pulled = t0.elapsed();

    run_tool(
        "umoci",
        &[
            "unpack",
            "--image",
            &format!("{}:{tag}", oci.display()),
            &bundle.display().to_string(),
        ],
    )?;
    let unpacked = t0.elapsed();
    host_network(&bundle.join("config.json"), port)?;

    let mut runc = Command::new("runc")
        .args(["run", "--bundle", &bundle.display().to_string(), &id])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("run runc")?;
    let answered = wait_answer(port, &mut runc, Duration::from_secs(30));
    let ready = t0.elapsed();
    let _ = Command::new("runc")
        .args(["delete", "--force", &id])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let _ = runc.kill();
    let out = runc.wait_with_output();
    let _ = std::fs::remove_dir_all(&work);
    if let Err(e) = answered {
        let stderr = out
            .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            .unwrap_or_default();
        bail!("{e}; runc said: {}", stderr.trim());
    }
    Ok(PipelineRun {
        image: tag.to_string(),
        pull_ms: pulled.as_secs_f64() * 1000.0,
        unpack_ms: (unpacked - pulled).as_secs_f64() * 1000.0,
        run_ms: (ready - unpacked).as_secs_f64() * 1000.0,
        total_ms: ready.as_secs_f64() * 1000.0,
    })
}

/// The bundle's container shares the host's network (so the function is reachable on
/// loopback), runs without a terminal and listens on `port`.
fn host_network(config: &Path, port: u16) -> Result<()> {
    let text =
        std::fs::read_to_string(config).with_context(|| format!("read {}", config.display()))?;
    let mut v: serde_json::Value = serde_json::from_str(&text)?;
    v["process"]["terminal"] = serde_json::Value::Bool(false);
    let env = v["process"]["env"]
        .as_array_mut()
        .context("config.json has no process.env")?;
    env.push(format!("PORT={port}").into());
    let ns = v["linux"]["namespaces"]
        .as_array_mut()
        .context("config.json has no linux.namespaces")?;
    ns.retain(|n| n["type"] != "network");
    std::fs::write(config, serde_json::to_vec_pretty(&v)?)?;
    Ok(())
}

fn wait_answer(port: u16, runc: &mut std::process::Child, within: Duration) -> Result<()> {
    use std::io::{Read, Write};
    let t = Instant::now();
    loop {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let req = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";
            let mut head = [0u8; 12];
            if s.write_all(req).is_ok()
                && s.read_exact(&mut head).is_ok()
                && head.starts_with(b"HTTP/1.1 200")
            {
                return Ok(());
            }
        }
        if let Ok(Some(st)) = runc.try_wait() {
            bail!("the container ended ({st}) before it answered");
        }
        if t.elapsed() > within {
            bail!("the container did not answer on port {port} within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bundle's config is changed as the pipeline needs, and a config without the parts it
    /// changes is refused with a clear error.
    #[test]
    fn host_network_edits_the_bundle_config() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(
            &p,
            r#"{"process":{"terminal":true,"env":["PATH=/"]},"linux":{"namespaces":[{"type":"pid"},{"type":"network"},{"type":"mount"}]}}"#,
        )
        .unwrap();
        host_network(&p, 4242).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        assert_eq!(v["process"]["terminal"], false);
        assert_eq!(v["process"]["env"][1], "PORT=4242");
        let kinds: Vec<_> = v["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(kinds, ["pid", "mount"]);
        std::fs::write(&p, r#"{"process":{}}"#).unwrap();
        let e = host_network(&p, 1).unwrap_err().to_string();
        assert!(e.contains("process.env"), "{e}");
    }
}
