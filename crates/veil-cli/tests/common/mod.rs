//! Helpers shared by the end-to-end tests that run the platform in process.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio::time::Instant;
use veil_cli::client::{AdminClient, Invocation};
use veil_cli::{images, Platform, UpOptions};
use veil_gateway::FunctionStatus;
use veil_image::build::build_image;
use veil_image::Reference;

pub struct Env {
    pub platform: Platform,
    pub admin: AdminClient,
    pub state: tempfile::TempDir,
}

pub async fn up_with(f: impl FnOnce(&mut UpOptions)) -> Env {
    let state = tempfile::tempdir().unwrap();
    let mut opts = UpOptions::defaults(state.path().join("state"));
    opts.listen = "127.0.0.1:0".parse().unwrap();
    opts.pool_size = 1;
    f(&mut opts);
    let platform = Platform::start(opts).await.unwrap();
    let admin = platform.admin_client().unwrap();
    Env {
        platform,
        admin,
        state,
    }
}

/// Push the example function to the platform's local store as `local/<repo_tag>`.
pub async fn push_hello(env: &Env, repo_tag: &str) -> String {
    push_example(
        &env.platform.url(),
        env.platform.operator_token(),
        repo_tag,
        &["/hello"],
    )
    .await
}

/// Build the example function, run as `entrypoint`, and push it as `local/<repo_tag>` to the
/// local store of the veil at `url`, authenticated with `token`; the reference.
pub async fn push_example(url: &str, token: &str, repo_tag: &str, entrypoint: &[&str]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = tmp.path().join("ctx");
    images::write_example(&ctx).unwrap();
    let mut spec = images::example_spec(&ctx);
    spec.entrypoint = entrypoint.iter().map(|s| s.to_string()).collect();
    let image = build_image(&spec).unwrap();
    let reference: Reference = format!("local/{repo_tag}").parse().unwrap();
    let client = images::registry_client_with_token(&[], url, token).unwrap();
    let target = images::push_target(&reference, url).unwrap();
    images::push(&client, &image, &target).await.unwrap();
    reference.to_string()
}

pub async fn get(admin: &AdminClient, name: &str, path: &str) -> Invocation {
    admin
        .invoke(name, "GET", path, Vec::new(), &BTreeMap::new())
        .await
        .unwrap()
}

pub fn text(r: &Invocation) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

pub fn instance(r: &Invocation) -> String {
    r.headers
        .get("x-veil-instance")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

pub async fn status(env: &Env, name: &str) -> FunctionStatus {
    env.admin
        .list()
        .await
        .unwrap()
        .into_iter()
        .find(|f| f.record.name == name)
        .unwrap()
}

/// Wait (at most `within`) until `cond` holds of the function's status; panic with the last
/// status otherwise.
pub async fn wait_status(
    env: &Env,
    name: &str,
    within: Duration,
    what: &str,
    cond: impl Fn(&FunctionStatus) -> bool,
) -> FunctionStatus {
    let deadline = Instant::now() + within;
    loop {
        let st = status(env, name).await;
        if cond(&st) {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {within:?}: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn sandboxes(env: &Env) -> Vec<serde_json::Value> {
    env.admin.sandboxes().await.unwrap()
}

/// Wait until no sandbox with one of `ids` exists any more.
pub async fn wait_destroyed(env: &Env, ids: &[String], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let live = sandboxes(env).await;
        let left: Vec<&serde_json::Value> = live
            .iter()
            .filter(|s| ids.iter().any(|id| s["id"] == id.as_str()))
            .collect();
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "sandboxes {ids:?} not destroyed within {within:?}: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `GET /v1/node` with the operator token.
pub async fn node_status(env: &Env) -> serde_json::Value {
    reqwest::Client::new()
        .get(format!("{}/v1/node", env.platform.url()))
        .bearer_auth(env.platform.operator_token())
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Stop the platform and check that no sandbox process survived.
pub async fn stop_clean(env: Env) {
    let pids: Vec<u64> = sandboxes(&env)
        .await
        .iter()
        .flat_map(|s| s["pids"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p.as_u64())
        .collect();
    env.platform.stop().await.unwrap();
    for p in pids {
        assert!(
            !Path::new(&format!("/proc/{p}")).exists(),
            "sandbox process {p} survived shutdown"
        );
    }
}

/// A `veil up` child process, killed (SIGKILL) when dropped.
pub struct Up(pub std::process::Child);

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start `veil up` on `port` with its state in `state`, no pool, and `extra` flags.
pub fn start_veil(state: &Path, port: u16, extra: &[&str]) -> Up {
    let child = Command::new(env!("CARGO_BIN_EXE_veil"))
        .args([
            "up",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--pool-size",
            "0",
        ])
        .args(extra)
        .arg("--state-dir")
        .arg(state)
        .env("VEIL_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Up(child)
}

/// Wait until the `veil up` at `url` answers its health check.
pub async fn wait_up(url: &str) {
    let start = Instant::now();
    while reqwest::get(format!("{url}/healthz")).await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "veil up did not come up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
