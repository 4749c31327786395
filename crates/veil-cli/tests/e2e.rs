//! End-to-end tests on real components: Debian's docker-registry (the CNCF distribution
//! server), skopeo, namespace sandboxes with real cgroups, the real agent binary and the
//! example function. They need root, docker-registry and skopeo (`make test` installs them).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use veil_cli::client::{AdminClient, Invocation};
use veil_cli::{images, Platform, UpOptions};
use veil_gateway::DeployRequest;
use veil_image::build::{assemble_image, build_image, Blob, BuildSpec, BuiltImage};
use veil_image::manifest::{RunConfig, OCI_LAYER_TAR_GZIP};
use veil_image::Reference;
use veil_testkit::{skopeo, TestRegistry};

struct Env {
    platform: Platform,
    admin: AdminClient,
    _state: tempfile::TempDir,
}

async fn up() -> Env {
    up_with(|_| {}).await
}

async fn up_with(f: impl FnOnce(&mut UpOptions)) -> Env {
    let state = tempfile::tempdir().unwrap();
    let mut opts = UpOptions::defaults(state.path().join("state"));
    opts.listen = "127.0.0.1:0".parse().unwrap();
    opts.pool_size = 1;
    opts.agent_log = "debug".into();
    f(&mut opts);
    let platform = Platform::start(opts).await.unwrap();
    let admin = platform.admin_client().unwrap();
    Env {
        platform,
        admin,
        _state: state,
    }
}

fn deploy_req(image: &str) -> DeployRequest {
    DeployRequest::new(image)
}

fn hello_image(dir: &Path, entrypoint: &[&str]) -> BuiltImage {
    images::write_example(dir).unwrap();
    let mut spec: BuildSpec = images::example_spec(dir);
    spec.entrypoint = entrypoint.iter().map(|s| s.to_string()).collect();
    build_image(&spec).unwrap()
}

async fn invoke(env: &Env, name: &str, path: &str, body: &str) -> Invocation {
    env.admin
        .invoke(
            name,
            "POST",
            path,
            body.as_bytes().to_vec(),
            &BTreeMap::new(),
        )
        .await
        .unwrap()
}

fn text(r: &Invocation) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Every sandbox the node still has must be an unassigned pool member.
async fn assert_no_assigned_sandboxes(env: &Env) {
    for _ in 0..100 {
        let sbs = env.admin.sandboxes().await.unwrap();
        if sbs.iter().all(|s| s["function"].is_null()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "assigned sandboxes remain: {:?}",
        env.admin.sandboxes().await.unwrap()
    );
}

async fn stop_and_check_clean(env: Env) {
    let sbs = env.admin.sandboxes().await.unwrap();
    let pids: Vec<u32> = sbs
        .iter()
        .flat_map(|s| s["pids"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p.as_u64().map(|p| p as u32))
        .collect();
    let ids: Vec<String> = sbs
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    env.platform.stop().await.unwrap();
    for p in pids {
        assert!(!pid_alive(p), "sandbox process {p} survived shutdown");
    }
    for id in ids {
        assert!(
            !Path::new(&format!("/sys/fs/cgroup/memory/veil/{id}")).exists()
                && !Path::new(&format!("/sys/fs/cgroup/veil/{id}")).exists(),
            "cgroup of sandbox {id} survived shutdown"
        );
    }
}

/// Build the example image, copy it into a real registry with skopeo, deploy, invoke cold and
/// warm, delete, and check that nothing is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_image_pushed_by_skopeo_runs_cold_and_warm() {
    let reg = TestRegistry::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let image = hello_image(&tmp.path().join("ctx"), &["/hello"]);
    let layout_dir = tmp.path().join("layout");
    let layout = veil_image::layout::OciLayout::create(&layout_dir).unwrap();
    layout.write_image(&image, "v1").unwrap();
    let dest = format!("docker://{}/e2e/hello:v1", reg.host());
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", layout_dir.display()),
        &dest,
    ])
    .unwrap();

    let env = up().await;
    let st = env
        .admin
        .deploy(
            "hello",
            &deploy_req(&format!("{}/e2e/hello:v1", reg.host())),
        )
        .await
        .unwrap();
    assert_eq!(
        st.record.image.manifest_digest,
        image.manifest.digest.to_string()
    );

    let cold = invoke(&env, "hello", "/greet?x=1", "cold body").await;
    assert_eq!(cold.status, 200, "{}", text(&cold));
    assert_eq!(
        text(&cold),
        "Hello from veil! POST /greet?x=1 (9 bytes): cold body\n"
    );
    assert!(
        cold.headers.contains_key("x-veil-cold-start"),
        "{:?}",
        cold.headers
    );
    let instance = cold.headers["x-veil-instance"]
        .to_str()
        .unwrap()
        .to_string();

    let warm = invoke(&env, "hello", "/", "warm").await;
    assert_eq!(warm.status, 200);
    assert_eq!(text(&warm), "Hello from veil! POST / (4 bytes): warm\n");
    assert!(!warm.headers.contains_key("x-veil-cold-start"));
    assert_eq!(warm.headers["x-veil-instance"].to_str().unwrap(), instance);

    // Host-header routing reaches the same function.
    let via_host = reqwest::Client::new()
        .get(format!("{}/anything", env.platform.url()))
        .header("host", "hello.veil.localhost")
        .send()
        .await
        .unwrap();
    assert_eq!(via_host.status(), 200);
    assert!(via_host
        .text()
        .await
        .unwrap()
        .starts_with("Hello from veil! GET /anything"));

    // Paths reach the function exactly as sent, and Host routing wins over gateway paths.
    let raw = reqwest::Client::new()
        .get(format!("{}/f/hello/a%20b%2Fc?x=%3F", env.platform.url()))
        .send()
        .await
        .unwrap();
    assert!(raw
        .text()
        .await
        .unwrap()
        .starts_with("Hello from veil! GET /a%20b%2Fc?x=%3F "));
    let shadow = reqwest::Client::new()
        .get(format!("{}/metrics", env.platform.url()))
        .header("host", "hello.veil.localhost")
        .send()
        .await
        .unwrap();
    assert!(shadow
        .text()
        .await
        .unwrap()
        .starts_with("Hello from veil! GET /metrics"));

    // Metrics count what happened (a metric that never moves would fail here).
    let metrics = reqwest::get(format!("{}/metrics", env.platform.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for want in [
        "veil_requests_total{function=\"hello\",code=\"200\"} 5",
        "veil_cold_starts_total{function=\"hello\",outcome=\"ok\"} 1",
        "veil_cold_start_seconds_count{function=\"hello\"} 1",
        "veil_request_duration_seconds_count{function=\"hello\",revision=\"1\"} 5",
        "veil_instances{function=\"hello\"} 1",
        "veil_blob_upstream_fetches 2",
    ] {
        assert!(metrics.contains(want), "missing {want} in:\n{metrics}");
    }

    // The function's output reached the node's log.
    let logs = env.admin.logs("hello", 50).await.unwrap();
    assert!(
        logs.iter().any(|l| l["text"]
            .as_str()
            .unwrap_or("")
            .contains("hello: listening")),
        "{logs:?}"
    );

    let before: Vec<u32> = env
        .admin
        .sandboxes()
        .await
        .unwrap()
        .iter()
        .filter(|s| s["id"] == instance.as_str())
        .flat_map(|s| s["pids"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p.as_u64().map(|p| p as u32))
        .collect();
    assert!(
        before.len() >= 2,
        "expected agent and function processes, got {before:?}"
    );
    env.admin.delete("hello").await.unwrap();
    assert_no_assigned_sandboxes(&env).await;
    for p in before {
        assert!(
            !pid_alive(p),
            "process {p} of the deleted function is still alive"
        );
    }
    let gone = invoke(&env, "hello", "/", "").await;
    assert_eq!(gone.status, 404);
    stop_and_check_clean(env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_function_is_404_with_a_clear_message() {
    let env = up().await;
    let r = invoke(&env, "nope", "/", "").await;
    assert_eq!(r.status, 404);
    assert!(
        text(&r).contains("function \\\"nope\\\" is not deployed"),
        "{}",
        text(&r)
    );
    stop_and_check_clean(env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_references_that_do_not_resolve_are_refused_at_deploy() {
    let reg = TestRegistry::start().unwrap();
    let env = up().await;
    let cases = [
        (
            format!("{}/missing/image:v1", reg.host()),
            "MANIFEST_UNKNOWN",
        ),
        (
            "local/never-pushed:v1".to_string(),
            "has no repository \"never-pushed\" in the local store",
        ),
        ("Not A Reference".to_string(), "invalid image reference"),
        ("127.0.0.1:1/refused:v1".to_string(), "registry error"),
    ];
    for (image, expect) in cases {
        let e = env
            .admin
            .deploy("bad", &deploy_req(&image))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(expect), "deploying {image}: {e}");
    }
    assert!(
        env.admin.list().await.unwrap().is_empty(),
        "a failed deploy left a function behind"
    );
    stop_and_check_clean(env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_deploy_requests_are_400() {
    let env = up().await;
    let http = reqwest::Client::new();
    for (name, body, expect) in [
        ("Bad_Name", r#"{"image":"local/x:v1"}"#, "BAD_NAME"),
        (
            "ok",
            r#"{"image":"local/x:v1","concurrency":0}"#,
            "concurrency",
        ),
        (
            "ok",
            r#"{"image":"local/x:v1","min_scale":5,"max_scale":2}"#,
            "min_scale",
        ),
        ("ok", r#"{"image":"local/x:v1","env":{"PORT":"1"}}"#, "PORT"),
        (
            "ok",
            r#"{"image":"local/x:v1","surprise":true}"#,
            "unknown field",
        ),
        ("ok", r#"not json"#, "malformed"),
    ] {
        let r = http
            .put(format!("{}/v1/functions/{name}", env.platform.url()))
            .bearer_auth(env.platform.operator_token())
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let t = r.text().await.unwrap();
        assert!(t.contains(expect), "{body}: {t}");
    }
    stop_and_check_clean(env).await;
}

/// A registry that serves a layer whose bytes do not match its digest: the node refuses to
/// cache it, the caller gets a clear error, and no sandbox remains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_blob_is_refused() {
    let reg = TestRegistry::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let image = hello_image(&tmp.path().join("ctx"), &["/hello"]);
    let client = images::registry_client(&[]).unwrap();
    let target: Reference = format!("{}/e2e/tampered:v1", reg.host()).parse().unwrap();
    images::push(&client, &image, &target).await.unwrap();
    let layer = &image.layers[0];
    let data_path = reg.blob_data_path(layer.digest.as_str());
    let mut bytes = std::fs::read(&data_path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&data_path, bytes).unwrap();

    let env = up().await;
    env.admin
        .deploy("tampered", &deploy_req(&target.to_string()))
        .await
        .unwrap();
    let r = invoke(&env, "tampered", "/", "").await;
    assert_eq!(r.status, 502, "{}", text(&r));
    let t = text(&r);
    assert!(
        t.contains("COLD_START_FAILED")
            && t.contains("tampered")
            && t.contains(layer.digest.as_str()),
        "{t}"
    );
    assert!(!env
        .platform
        .gateway
        .node()
        .cache()
        .store()
        .contains(&layer.digest));
    assert_no_assigned_sandboxes(&env).await;
    stop_and_check_clean(env).await;
}

fn hostile_layer(name: &[u8]) -> Blob {
    let mut data = Vec::new();
    {
        let gz = flate2::write::GzEncoder::new(&mut data, flate2::Compression::fast());
        let mut b = tar::Builder::new(gz);
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_size(5);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        b.append(&h, &b"owned"[..]).unwrap();
        b.into_inner().unwrap().finish().unwrap();
    }
    Blob::new(OCI_LAYER_TAR_GZIP, data)
}

/// A layer with an entry that would escape the root is refused inside the sandbox; the error
/// names the image, the layer digest and the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tar_entry_escaping_the_root_is_refused() {
    let reg = TestRegistry::start().unwrap();
    let layer = hostile_layer(b"../../escaped");
    let digest = layer.digest.clone();
    let run = RunConfig {
        entrypoint: vec!["/hello".into()],
        ..RunConfig::default()
    };
    let image = assemble_image(vec![layer], &run).unwrap();
    let client = images::registry_client(&[]).unwrap();
    let target: Reference = format!("{}/e2e/hostile:v1", reg.host()).parse().unwrap();
    images::push(&client, &image, &target).await.unwrap();

    let env = up().await;
    env.admin
        .deploy("hostile", &deploy_req(&target.to_string()))
        .await
        .unwrap();
    let r = invoke(&env, "hostile", "/", "").await;
    assert_eq!(r.status, 502, "{}", text(&r));
    let t = text(&r);
    assert!(
        t.contains("IMAGE_PULL") && t.contains(digest.as_str()) && t.contains(".."),
        "{t}"
    );
    assert!(t.contains("e2e/hostile:v1"), "{t}");
    assert_no_assigned_sandboxes(&env).await;
    stop_and_check_clean(env).await;
}

/// Push to veil's own local store (no external registry), as the demo does.
async fn push_local(env: &Env, repo_tag: &str, entrypoint: &[&str]) -> String {
    push_local_spec(env, repo_tag, |s| {
        s.entrypoint = entrypoint.iter().map(|e| e.to_string()).collect();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_that_crashes_on_start_gives_a_clear_error() {
    let env = up().await;
    let image = push_local(&env, "crash:v1", &["/hello", "--exit", "3"]).await;
    env.admin
        .deploy("crash", &deploy_req(&image))
        .await
        .unwrap();
    let r = invoke(&env, "crash", "/", "").await;
    assert_eq!(r.status, 502, "{}", text(&r));
    assert!(
        text(&r).contains("FUNCTION_EXITED") && text(&r).contains("exit code 3"),
        "{}",
        text(&r)
    );
    let st = env.admin.list().await.unwrap();
    assert!(st[0]
        .last_error
        .as_deref()
        .unwrap_or("")
        .contains("exit code 3"));
    assert_no_assigned_sandboxes(&env).await;
    stop_and_check_clean(env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_that_never_listens_times_out_clearly() {
    let env = up().await;
    let image = push_local(&env, "mute:v1", &["/hello", "--never-listen"]).await;
    let mut req = deploy_req(&image);
    req.ready_timeout_s = Some(1);
    env.admin.deploy("mute", &req).await.unwrap();
    let r = invoke(&env, "mute", "/", "").await;
    assert_eq!(r.status, 502, "{}", text(&r));
    assert!(
        text(&r).contains("FUNCTION_NOT_READY") && text(&r).contains("did not listen on port 8080"),
        "{}",
        text(&r)
    );
    assert_no_assigned_sandboxes(&env).await;
    stop_and_check_clean(env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_waits_too_long_for_a_cold_start_gets_503() {
    let env = up_with(|o| o.cold_start_timeout = Duration::from_millis(500)).await;
    let image = push_local(&env, "slow:v1", &["/hello", "--never-listen"]).await;
    env.admin.deploy("slow", &deploy_req(&image)).await.unwrap();
    let r = invoke(&env, "slow", "/", "").await;
    assert_eq!(r.status, 503, "{}", text(&r));
    assert!(text(&r).contains("COLD_START_TIMEOUT"), "{}", text(&r));
    assert_eq!(r.headers["retry-after"], "1");
    env.admin.delete("slow").await.unwrap();
    assert_no_assigned_sandboxes(&env).await;
    stop_and_check_clean(env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_is_refused_with_503_instead_of_hanging() {
    let env = up_with(|o| {
        o.max_queue = 2;
        o.cold_start_timeout = Duration::from_secs(3);
    })
    .await;
    let image = push_local(&env, "q:v1", &["/hello", "--never-listen"]).await;
    env.admin.deploy("q", &deploy_req(&image)).await.unwrap();
    let calls = (0..6).map(|_| {
        let admin = env.admin.clone();
        async move {
            admin
                .invoke("q", "GET", "/", Vec::new(), &BTreeMap::new())
                .await
                .unwrap()
        }
    });
    let results = futures::future::join_all(calls).await;
    let full = results
        .iter()
        .filter(|r| r.status == 503 && text(r).contains("QUEUE_FULL"))
        .count();
    let timed_out = results
        .iter()
        .filter(|r| r.status == 503 && text(r).contains("COLD_START_TIMEOUT"))
        .count();
    assert_eq!(
        full + timed_out,
        6,
        "{:?}",
        results.iter().map(text).collect::<Vec<_>>()
    );
    assert!(
        full >= 1 && timed_out <= 2,
        "full={full} timed_out={timed_out}"
    );
    env.admin.delete("q").await.unwrap();
    stop_and_check_clean(env).await;
}

/// When a running function exits, the node notices, the instance is dropped, and the next
/// request cold-starts a fresh sandbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_that_dies_is_replaced() {
    let env = up().await;
    let image = push_local(&env, "mortal:v1", &["/hello"]).await;
    env.admin
        .deploy("mortal", &deploy_req(&image))
        .await
        .unwrap();
    let first = invoke(&env, "mortal", "/crash", "").await;
    assert_eq!(first.status, 200, "{}", text(&first));
    let id1 = first.headers["x-veil-instance"]
        .to_str()
        .unwrap()
        .to_string();
    for _ in 0..100 {
        if env.admin.list().await.unwrap()[0].instances.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        env.admin.list().await.unwrap()[0].instances.is_empty(),
        "dead instance still listed"
    );
    let second = invoke(&env, "mortal", "/", "").await;
    assert_eq!(second.status, 200, "{}", text(&second));
    assert_ne!(second.headers["x-veil-instance"].to_str().unwrap(), id1);
    // Log lines arrive asynchronously (over the sandbox's log substream): wait for the last one.
    let mut logs = Vec::new();
    for _ in 0..100 {
        logs = env.admin.logs("mortal", 100).await.unwrap();
        if logs.iter().any(|l| {
            l["text"]
                .as_str()
                .unwrap_or("")
                .contains("crashing as asked")
        }) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        logs.iter().any(|l| l["text"]
            .as_str()
            .unwrap_or("")
            .contains("crashing as asked")),
        "{logs:?}"
    );
    env.admin.delete("mortal").await.unwrap();
    stop_and_check_clean(env).await;
}

/// What the function sees from inside: no capabilities, no new privileges, seccomp on, its own
/// hostname, only loopback, only the sandbox's processes, no host files, read-only /proc/sys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_function_runs_isolated() {
    let env = up().await;
    let image = push_local(&env, "probe:v1", &["/hello"]).await;
    env.admin
        .deploy("probe", &deploy_req(&image))
        .await
        .unwrap();
    let r = invoke(&env, "probe", "/whoami", "").await;
    assert_eq!(r.status, 200);
    let facts: BTreeMap<String, String> = text(&r)
        .lines()
        .filter_map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    let get = |k: &str| facts.get(k).cloned().unwrap_or_default();
    assert_eq!(get("Uid"), "65534", "{facts:?}");
    assert_eq!(get("Gid"), "65534");
    assert_eq!(get("CapEff"), "0000000000000000");
    assert_eq!(get("CapPrm"), "0000000000000000");
    assert_eq!(get("CapBnd"), "0000000000000000");
    assert_eq!(get("NoNewPrivs"), "1");
    assert_eq!(get("Seccomp"), "2");
    assert!(get("hostname").starts_with("veil-"), "{facts:?}");
    assert_eq!(get("interfaces"), "lo");
    assert_eq!(get("can_write_proc_sys"), "false");
    // Agent (PID 1) and the function only.
    assert_eq!(get("visible_processes"), "2", "{facts:?}");
    assert_eq!(get("root"), "dev,hello,proc,tmp");
    let id = r.headers["x-veil-instance"].to_str().unwrap().to_string();
    // The host side: the sandbox has its own cgroup with the configured memory limit.
    let v1 = format!("/sys/fs/cgroup/memory/veil/{id}/memory.limit_in_bytes");
    let v2 = format!("/sys/fs/cgroup/veil/{id}/memory.max");
    let limit = std::fs::read_to_string(&v1)
        .or_else(|_| std::fs::read_to_string(&v2))
        .unwrap();
    assert_eq!(limit.trim(), (512u64 << 20).to_string());
    env.admin.delete("probe").await.unwrap();
    stop_and_check_clean(env).await;
}

/// A burst against a cold function with concurrency 1 starts several instances at once; the
/// node fetches each blob from the registry once however many sandboxes need it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_scales_out_and_fetches_each_blob_once() {
    let reg = TestRegistry::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let image = hello_image(&tmp.path().join("ctx"), &["/hello"]);
    let client = images::registry_client(&[]).unwrap();
    let target: Reference = format!("{}/e2e/burst:v1", reg.host()).parse().unwrap();
    images::push(&client, &image, &target).await.unwrap();

    let env = up().await;
    let mut req = deploy_req(&target.to_string());
    req.concurrency = Some(1);
    req.max_scale = Some(3);
    env.admin.deploy("burst", &req).await.unwrap();
    let calls = (0..8).map(|i| {
        let admin = env.admin.clone();
        async move {
            admin
                .invoke(
                    "burst",
                    "POST",
                    "/sleep/300",
                    format!("n{i}").into_bytes(),
                    &BTreeMap::new(),
                )
                .await
                .unwrap()
        }
    });
    let t = std::time::Instant::now();
    let results = futures::future::join_all(calls).await;
    let took = t.elapsed();
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.status, 200, "{}", text(r));
        assert!(text(r).ends_with(&format!(": n{i}\n")), "{}", text(r));
    }
    let instances: std::collections::BTreeSet<String> = results
        .iter()
        .map(|r| r.headers["x-veil-instance"].to_str().unwrap().to_string())
        .collect();
    assert!(
        instances.len() >= 2,
        "expected a scale-out, got {instances:?} in {took:?}: {:?}",
        results
            .iter()
            .map(|r| (text(r), r.headers.clone()))
            .collect::<Vec<_>>()
    );
    assert!(instances.len() <= 3, "max_scale exceeded: {instances:?}");
    // Config and one layer: two upstream fetches in total.
    assert_eq!(env.platform.gateway.node().cache().upstream_fetches(), 2);
    env.admin.delete("burst").await.unwrap();
    assert_no_assigned_sandboxes(&env).await;
    stop_and_check_clean(env).await;
}

/// Instances idle longer than the function's idle timeout are removed (scale to zero), and
/// the next request cold-starts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_instances_scale_to_zero() {
    let env = up().await;
    let image = push_local(&env, "idle:v1", &["/hello"]).await;
    let mut req = deploy_req(&image);
    req.idle_timeout_s = Some(1);
    env.admin.deploy("idle", &req).await.unwrap();
    let first = invoke(&env, "idle", "/", "").await;
    assert_eq!(first.status, 200);
    let mut scaled = false;
    for _ in 0..100 {
        if env.admin.list().await.unwrap()[0].instances.is_empty() {
            scaled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(scaled, "idle instance was not removed");
    assert_no_assigned_sandboxes(&env).await;
    let again = invoke(&env, "idle", "/", "").await;
    assert_eq!(again.status, 200);
    assert!(again.headers.contains_key("x-veil-cold-start"));
    env.admin.delete("idle").await.unwrap();
    stop_and_check_clean(env).await;
}

async fn standalone_kbs(
    allow_software_tee: bool,
) -> (std::sync::Arc<veil_kbs::Kbs>, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = veil_kbs::KbsConfig::new(dir.path().join("kbs"));
    cfg.allow_insecure_software_tee = allow_software_tee;
    let kbs = veil_kbs::Kbs::open(cfg).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let router = kbs.router();
    tokio::spawn(async move { axum::serve(listener, router).await });
    (kbs, url, dir)
}

/// Secrets from the tenant's key broker reach the function inside the sandbox after
/// attestation — here with the insecure software TEE, since this machine has no SEV-SNP or
/// TDX — and never appear on the host side (logs); every refusal is a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_released_to_the_attested_sandbox_only() {
    let env = up().await;
    let kbs = env.platform.kbs.clone().unwrap();
    kbs.set_resource("default/app/greeting", b"s3cr3t-value")
        .unwrap();
    let image = push_local(&env, "sec:v1", &["/hello"]).await;
    let with_secret = |uri: &str, allow: bool| {
        let mut req = deploy_req(&image);
        req.secrets.insert("GREETING".into(), uri.into());
        req.allow_insecure_software_tee = allow;
        req
    };

    env.admin
        .deploy("sec", &with_secret("kbs:///default/app/greeting", true))
        .await
        .unwrap();
    let r = invoke(&env, "sec", "/env/GREETING", "").await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(text(&r), "GREETING=s3cr3t-value\n");
    let phases = r.headers["x-veil-cold-start"].to_str().unwrap().to_string();
    assert!(phases.contains("attest="), "{phases}");
    let logs = env.admin.logs("sec", 500).await.unwrap();
    let all = format!("{logs:?}");
    assert!(
        all.contains("INSECURE software TEE"),
        "the insecure TEE must be named: {all}"
    );
    assert!(
        !all.contains("s3cr3t-value"),
        "secret leaked into host-side logs"
    );

    // The deployment does not allow the software TEE: nothing is released, nothing runs.
    env.admin
        .deploy("strict", &with_secret("kbs:///default/app/greeting", false))
        .await
        .unwrap();
    let r = invoke(&env, "strict", "/", "").await;
    assert_eq!(r.status, 502, "{}", text(&r));
    assert!(
        text(&r).contains("ATTESTATION")
            && text(&r).contains("does not allow the insecure software TEE"),
        "{}",
        text(&r)
    );

    // A resource that does not exist.
    env.admin
        .deploy("missing", &with_secret("kbs:///default/app/nope", true))
        .await
        .unwrap();
    let r = invoke(&env, "missing", "/", "").await;
    assert_eq!(r.status, 502, "{}", text(&r));
    assert!(
        text(&r).contains("404") && text(&r).contains("default/app/nope"),
        "{}",
        text(&r)
    );

    // Another tenant's resource is refused at deploy time.
    let e = env
        .admin
        .deploy("other", &with_secret("kbs:///acme/app/greeting", true))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("a resource of tenant \"acme\""), "{e}");

    // A tenant's own broker with the default policy refuses the software TEE.
    let (strict_kbs, url, _dir) = standalone_kbs(false).await;
    strict_kbs
        .set_resource("default/app/greeting", b"other-value")
        .unwrap();
    let mut req = with_secret("kbs:///default/app/greeting", true);
    req.kbs_url = Some(url);
    env.admin.deploy("refused", &req).await.unwrap();
    let r = invoke(&env, "refused", "/", "").await;
    assert_eq!(r.status, 502, "{}", text(&r));
    assert!(
        // Refused by its verifier (it trusts no node's endorsement) before its policy runs.
        text(&r).contains("401") && text(&r).contains("not endorsed by a host this broker trusts"),
        "{}",
        text(&r)
    );

    for f in ["sec", "strict", "missing", "refused"] {
        env.admin.delete(f).await.unwrap();
    }
    assert_no_assigned_sandboxes(&env).await;
    stop_and_check_clean(env).await;
}

/// Clients that give up (disconnect) while waiting for a cold start or while their request runs
/// must not leave the function's queue or the instance's concurrency slot taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_disconnect_release_their_queue_place_and_slot() {
    let env = up_with(|o| o.max_queue = 2).await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();

    let mute = push_local(&env, "mute2:v1", &["/hello", "--never-listen"]).await;
    env.admin.deploy("mute2", &deploy_req(&mute)).await.unwrap();
    for _ in 0..4 {
        let r = impatient
            .get(format!("{}/f/mute2/", env.platform.url()))
            .send()
            .await;
        assert!(
            r.is_err(),
            "the request should have timed out on the client"
        );
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let st = env.admin.list().await.unwrap();
    let mute_st = st.iter().find(|f| f.record.name == "mute2").unwrap();
    assert_eq!(
        mute_st.waiting, 0,
        "queue places leaked by disconnected clients"
    );

    let image = push_local(&env, "slowpoke:v1", &["/hello"]).await;
    let mut req = deploy_req(&image);
    req.concurrency = Some(1);
    req.max_scale = Some(1);
    env.admin.deploy("slowpoke", &req).await.unwrap();
    assert_eq!(invoke(&env, "slowpoke", "/", "").await.status, 200);
    // Occupy the only slot with a slow request and walk away.
    let r = impatient
        .get(format!("{}/f/slowpoke/sleep/1500", env.platform.url()))
        .send()
        .await;
    assert!(r.is_err());
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The slot is free again: a new request is served by the same single instance.
    let again = invoke(&env, "slowpoke", "/", "").await;
    assert_eq!(again.status, 200, "{}", text(&again));
    env.admin.delete("mute2").await.unwrap();
    env.admin.delete("slowpoke").await.unwrap();
    stop_and_check_clean(env).await;
}

async fn push_local_spec(env: &Env, repo_tag: &str, f: impl FnOnce(&mut BuildSpec)) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = tmp.path().join("ctx");
    images::write_example(&ctx).unwrap();
    let mut spec = images::example_spec(&ctx);
    f(&mut spec);
    let image = build_image(&spec).unwrap();
    let reference: Reference = format!("local/{repo_tag}").parse().unwrap();
    let client = env.platform.registry_client().unwrap();
    let target = images::push_target(&reference, &env.platform.url()).unwrap();
    images::push(&client, &image, &target).await.unwrap();
    reference.to_string()
}

/// Hostile image configs: a relative WorkingDir (which would start the function outside its
/// root) is refused; a function running as uid 0 gets private device nodes, so changing them
/// leaves the host's alone, and /proc/sys stays read-only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_image_configs_stay_contained() {
    let env = up().await;
    let relative = push_local_spec(&env, "reldir:v1", |s| s.working_dir = Some(".".into())).await;
    env.admin
        .deploy("reldir", &deploy_req(&relative))
        .await
        .unwrap();
    let r = invoke(&env, "reldir", "/", "").await;
    assert_eq!(r.status, 502, "{}", text(&r));
    assert!(
        text(&r).contains("WorkingDir") && text(&r).contains("not an absolute path"),
        "{}",
        text(&r)
    );

    let rooted = push_local_spec(&env, "rooted:v1", |s| s.user = Some("0".into())).await;
    env.admin
        .deploy("rooted", &deploy_req(&rooted))
        .await
        .unwrap();
    let host_mode = std::fs::metadata("/dev/null").unwrap().permissions();
    let r = invoke(&env, "rooted", "/chmod-dev-null", "").await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(
        text(&r),
        "chmod /dev/null: done\n",
        "uid 0 may change its own private node"
    );
    assert_eq!(
        std::fs::metadata("/dev/null").unwrap().permissions(),
        host_mode,
        "host /dev/null changed"
    );
    let who = invoke(&env, "rooted", "/whoami", "").await;
    assert!(
        text(&who).contains("Uid=0\n") && text(&who).contains("CapEff=0000000000000000"),
        "{}",
        text(&who)
    );
    assert!(
        text(&who).contains("can_write_proc_sys=false"),
        "{}",
        text(&who)
    );
    env.admin.delete("reldir").await.unwrap();
    env.admin.delete("rooted").await.unwrap();
    stop_and_check_clean(env).await;
}

/// The local store's registry API turns names into paths: traversal and absolute names are
/// refused, and nothing of the state directory (e.g. the key broker's keys) is ever served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_api_refuses_path_tricks() {
    let env = up().await;
    let key =
        std::fs::read_to_string(env._state.path().join("state/kbs/token.key")).unwrap_or_default();
    let http = reqwest::Client::new();
    for path in [
        "/v2/x/manifests/..%2F..%2Fkbs%2Ftoken.key",
        "/v2/x/manifests/%2Fetc%2Fpasswd",
        "/v2/x/manifests/..",
        "/v2/..%2F..%2Fkbs/manifests/v1",
        "/v2/x/blobs/sha256:..%2F..%2Fkbs%2Ftoken.key",
    ] {
        let r = http
            .get(format!("{}{path}", env.platform.url()))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body = r.text().await.unwrap();
        assert!((400..500).contains(&status), "{path}: HTTP {status} {body}");
        assert!(
            key.is_empty() || !body.contains(key.trim()),
            "{path} leaked the key"
        );
        assert!(!body.contains("root:x:0:0"), "{path} leaked /etc/passwd");
    }
    stop_and_check_clean(env).await;
}

/// An image encrypted by skopeo (ocicrypt JWE) runs when the tenant's broker releases the
/// private key to the attested sandbox; the node caches ciphertext only; a missing or wrong key
/// is a clear error naming the layer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_encrypted_by_skopeo_is_decrypted_inside_the_sandbox() {
    use veil_image::crypt::PrivateKey;
    let reg = TestRegistry::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let image = hello_image(&tmp.path().join("ctx"), &["/hello"]);
    let layout_dir = tmp.path().join("layout");
    veil_image::layout::OciLayout::create(&layout_dir)
        .unwrap()
        .write_image(&image, "v1")
        .unwrap();
    let key = PrivateKey::generate_p256();
    let pub_pem = tmp.path().join("pub.pem");
    std::fs::write(&pub_pem, key.public_key().to_pem().unwrap()).unwrap();
    let dest = format!("{}/e2e/enc:v1", reg.host());
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        "--encryption-key",
        &format!("jwe:{}", pub_pem.display()),
        &format!("oci:{}:v1", layout_dir.display()),
        &format!("docker://{dest}"),
    ])
    .unwrap();

    let env = up().await;
    let kbs = env.platform.kbs.clone().unwrap();
    kbs.set_resource("default/image-key/hello", key.to_pem().unwrap().as_bytes())
        .unwrap();
    let other = PrivateKey::generate_p256();
    kbs.set_resource(
        "default/image-key/other",
        other.to_pem().unwrap().as_bytes(),
    )
    .unwrap();
    let with_key = |k: Option<&str>| {
        let mut req = deploy_req(&dest);
        req.decryption_keys = k.into_iter().map(String::from).collect();
        req.allow_insecure_software_tee = true;
        req
    };

    env.admin
        .deploy("enc", &with_key(Some("kbs:///default/image-key/hello")))
        .await
        .unwrap();
    let r = invoke(&env, "enc", "/", "secret code").await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(
        text(&r),
        "Hello from veil! POST / (11 bytes): secret code\n"
    );
    // The host-side cache holds the registry's ciphertext, never the plaintext layer.
    let store = env.platform.gateway.node().cache().store().clone();
    assert!(
        !store.contains(&image.layers[0].digest),
        "plaintext layer on the host"
    );
    let fetched = images::registry_client(&[])
        .unwrap()
        .resolve_image(&dest.parse().unwrap())
        .await
        .unwrap();
    let m = match veil_image::manifest::parse_manifest(&fetched.bytes, None).unwrap() {
        veil_image::manifest::Manifest::Image(m) => m,
        _ => panic!("index"),
    };
    let enc_layer = &m.layers[0];
    assert!(
        enc_layer.media_type.ends_with("+encrypted"),
        "{}",
        enc_layer.media_type
    );
    assert!(store.contains(&enc_layer.digest));

    env.admin.deploy("nokey", &with_key(None)).await.unwrap();
    let r = invoke(&env, "nokey", "/", "").await;
    assert_eq!(r.status, 502, "{}", text(&r));
    assert!(
        text(&r).contains("names no decryption key")
            && text(&r).contains(enc_layer.digest.as_str()),
        "{}",
        text(&r)
    );

    env.admin
        .deploy(
            "wrongkey",
            &with_key(Some("kbs:///default/image-key/other")),
        )
        .await
        .unwrap();
    let r = invoke(&env, "wrongkey", "/", "").await;
    assert_eq!(r.status, 502, "{}", text(&r));
    assert!(
        text(&r).contains("no key can decrypt this layer")
            && text(&r).contains(enc_layer.digest.as_str()),
        "{}",
        text(&r)
    );
    for f in ["enc", "nokey", "wrongkey"] {
        env.admin.delete(f).await.unwrap();
    }
    assert_no_assigned_sandboxes(&env).await;
    stop_and_check_clean(env).await;
}

fn gz_layer(entries: &[(&str, &[u8])]) -> Blob {
    let mut data = Vec::new();
    {
        let gz = flate2::write::GzEncoder::new(&mut data, flate2::Compression::fast());
        let mut b = tar::Builder::new(gz);
        for (name, content) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(content.len() as u64);
            h.set_mode(0o755);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_cksum();
            b.append_data(&mut h, name, *content).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap();
    }
    Blob::new(OCI_LAYER_TAR_GZIP, data)
}

/// A multi-layer image (fetched in parallel, applied in order) with a whiteout: the file the
/// upper layer deletes is gone, the others are there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_apply_in_order_with_whiteouts() {
    let reg = TestRegistry::start().unwrap();
    let base = gz_layer(&[("hello", veil_cli::HELLO_BINARY), ("a", b"1"), ("b", b"2")]);
    let upper = gz_layer(&[(".wh.b", b""), ("c", b"3")]);
    let run = RunConfig {
        entrypoint: vec!["/hello".into()],
        ..RunConfig::default()
    };
    let image = assemble_image(vec![base, upper], &run).unwrap();
    let client = images::registry_client(&[]).unwrap();
    let target: Reference = format!("{}/e2e/layers:v1", reg.host()).parse().unwrap();
    images::push(&client, &image, &target).await.unwrap();
    let env = up().await;
    env.admin
        .deploy("layers", &deploy_req(&target.to_string()))
        .await
        .unwrap();
    let r = invoke(&env, "layers", "/whoami", "").await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert!(
        text(&r).contains("root=a,c,dev,hello,proc,tmp\n"),
        "{}",
        text(&r)
    );
    env.admin.delete("layers").await.unwrap();
    stop_and_check_clean(env).await;
}

/// The node cache is bounded: upstream blobs no live sandbox uses are evicted least recently
/// used first, and fetched again when needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_evicts_unused_upstream_blobs_and_refetches_them() {
    let reg = TestRegistry::start().unwrap();
    let client = images::registry_client(&[]).unwrap();
    let run = RunConfig {
        entrypoint: vec!["/hello".into()],
        ..RunConfig::default()
    };
    let x = assemble_image(
        vec![gz_layer(&[("hello", veil_cli::HELLO_BINARY), ("x", b"x")])],
        &run,
    )
    .unwrap();
    let y = assemble_image(
        vec![gz_layer(&[("hello", veil_cli::HELLO_BINARY), ("y", b"y")])],
        &run,
    )
    .unwrap();
    let xr: Reference = format!("{}/e2e/x:v1", reg.host()).parse().unwrap();
    let yr: Reference = format!("{}/e2e/y:v1", reg.host()).parse().unwrap();
    images::push(&client, &x, &xr).await.unwrap();
    images::push(&client, &y, &yr).await.unwrap();

    let env = up_with(|o| o.cache_max_bytes = 1).await;
    let node = env.platform.gateway.node().clone();
    let store = node.cache().store().clone();
    env.admin
        .deploy("fx", &deploy_req(&xr.to_string()))
        .await
        .unwrap();
    assert_eq!(invoke(&env, "fx", "/", "").await.status, 200);
    // In use by a live sandbox: kept despite the tiny limit.
    assert!(store.contains(&x.layers[0].digest));
    env.admin.delete("fx").await.unwrap();
    assert_no_assigned_sandboxes(&env).await;

    env.admin
        .deploy("fy", &deploy_req(&yr.to_string()))
        .await
        .unwrap();
    assert_eq!(invoke(&env, "fy", "/", "").await.status, 200);
    assert!(
        !store.contains(&x.layers[0].digest),
        "unused blob of x not evicted"
    );
    assert!(
        store.contains(&y.layers[0].digest),
        "blob in use was evicted"
    );

    let before = node.cache().upstream_fetches();
    env.admin
        .deploy("fx", &deploy_req(&xr.to_string()))
        .await
        .unwrap();
    let again = invoke(&env, "fx", "/", "").await;
    assert_eq!(again.status, 200, "{}", text(&again));
    assert!(
        node.cache().upstream_fetches() > before,
        "x was not fetched again"
    );
    env.admin.delete("fx").await.unwrap();
    env.admin.delete("fy").await.unwrap();
    stop_and_check_clean(env).await;
}

/// Sign a local-store image (the signature goes to veil's own `/v2/` under the sigstore tag).
async fn sign_local(env: &Env, image: &str, key: &veil_image::signature::SigningKey) {
    let reference: Reference = image.parse().unwrap();
    let client = env.platform.registry_client().unwrap();
    let target = images::push_target(&reference, &env.platform.url()).unwrap();
    images::sign_image(&client, &target, &reference, key)
        .await
        .unwrap();
}

/// The tenant's signature policy and keys come from its broker; the sandbox runs a signed image
/// the policy accepts and refuses, with the reason, an unsigned image, an image signed by
/// another key, an image the policy rejects outright, and policies it cannot use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signature_policy_from_the_broker_decides_what_runs() {
    use veil_image::signature::SigningKey;
    let env = up().await;
    let kbs = env.platform.kbs.clone().unwrap();
    let key = SigningKey::generate().unwrap();
    let other = SigningKey::generate().unwrap();
    kbs.set_resource(
        "default/cosign/pub",
        key.public_key_pem().unwrap().as_bytes(),
    )
    .unwrap();
    let signed = push_local(&env, "signed:v1", &["/hello"]).await;
    sign_local(&env, &signed, &key).await;
    let unsigned = push_local(&env, "unsigned:v1", &["/hello"]).await;
    let foreign = push_local(&env, "foreign:v1", &["/hello"]).await;
    sign_local(&env, &foreign, &other).await;

    let sigstore = r#"[{"type":"sigstoreSigned","keyPath":"kbs:///default/cosign/pub"}]"#;
    let policy = format!(
        r#"{{"default":[{{"type":"reject"}}],"transports":{{"docker":{{
            "local/signed":{sigstore},"local/unsigned":{sigstore},"local/foreign":{sigstore}}}}}}}"#
    );
    kbs.set_resource("default/policy/images", policy.as_bytes())
        .unwrap();
    kbs.set_resource(
        "default/policy/reject",
        br#"{"default":[{"type":"reject"}]}"#,
    )
    .unwrap();
    kbs.set_resource(
        "default/policy/hostkey",
        br#"{"default":[{"type":"sigstoreSigned","keyPath":"/etc/cosign.pub"}]}"#,
    )
    .unwrap();
    kbs.set_resource("default/policy/broken", b"{\"default\": [")
        .unwrap();
    let with_policy = |image: &str, policy: &str| {
        let mut req = deploy_req(image);
        req.signature_policy = Some(policy.into());
        req.allow_insecure_software_tee = true;
        req
    };

    env.admin
        .deploy(
            "signed",
            &with_policy(&signed, "kbs:///default/policy/images"),
        )
        .await
        .unwrap();
    let r = invoke(&env, "signed", "/", "hi").await;
    assert_eq!(r.status, 200, "{}", text(&r));
    let phases = r.headers["x-veil-cold-start"].to_str().unwrap().to_string();
    assert!(phases.contains("signature="), "{phases}");

    let refused: &[(&str, &str, &str, &[&str])] = &[
        (
            "unsigned",
            unsigned.as_str(),
            "kbs:///default/policy/images",
            &["no sigstore signature was found"],
        ),
        (
            "foreign",
            foreign.as_str(),
            "kbs:///default/policy/images",
            &["does not verify with any accepted key"],
        ),
        (
            "rejected",
            signed.as_str(),
            "kbs:///default/policy/reject",
            &["the policy default says reject"],
        ),
        (
            "hostkey",
            signed.as_str(),
            "kbs:///default/policy/hostkey",
            &["not a key-broker resource", "/etc/cosign.pub"],
        ),
        (
            "broken",
            signed.as_str(),
            "kbs:///default/policy/broken",
            &["invalid signature policy"],
        ),
        (
            "nopolicy",
            signed.as_str(),
            "kbs:///default/policy/absent",
            &["404", "default/policy/absent"],
        ),
    ];
    for (name, image, policy, wants) in refused {
        env.admin
            .deploy(name, &with_policy(image, policy))
            .await
            .unwrap();
        let r = invoke(&env, name, "/", "").await;
        assert_eq!(r.status, 502, "{name}: {}", text(&r));
        for w in *wants {
            assert!(text(&r).contains(w), "{name}: want {w:?} in {}", text(&r));
        }
        assert!(
            text(&r).contains(image.trim_start_matches("local/")),
            "{}",
            text(&r)
        );
    }
    // The tenant pins the image reference and the policy in its broker: a node that names a
    // laxer policy of the tenant, or another image, gets no attestation.
    kbs.set_resource(
        "default/policy/lax",
        br#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
    )
    .unwrap();
    kbs.set_reference_values("image", std::slice::from_ref(&signed))
        .unwrap();
    kbs.set_reference_values("signature_policy", &["default/policy/images".to_string()])
        .unwrap();
    let pinned: &[(&str, &str, &str, &str)] = &[
        (
            "pinned",
            signed.as_str(),
            "kbs:///default/policy/images",
            "",
        ),
        (
            "laxpolicy",
            signed.as_str(),
            "kbs:///default/policy/lax",
            "signature policy default/policy/lax is not among the reference values",
        ),
        (
            "otherimage",
            unsigned.as_str(),
            "kbs:///default/policy/images",
            "is not among the reference values",
        ),
    ];
    for (name, image, policy, want) in pinned {
        env.admin
            .deploy(name, &with_policy(image, policy))
            .await
            .unwrap();
        let r = invoke(&env, name, "/", "").await;
        if want.is_empty() {
            assert_eq!(r.status, 200, "{name}: {}", text(&r));
        } else {
            assert_eq!(r.status, 502, "{name}: {}", text(&r));
            assert!(
                text(&r).contains(want),
                "{name}: want {want:?} in {}",
                text(&r)
            );
        }
        env.admin.delete(name).await.unwrap();
    }
    kbs.set_reference_values("image", &[]).unwrap();
    kbs.set_reference_values("signature_policy", &[]).unwrap();

    // Another tenant's policy is refused at deploy time.
    let e = env
        .admin
        .deploy("x", &with_policy(&signed, "kbs:///acme/policy/images"))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("a resource of tenant \"acme\""), "{e}");

    env.admin.delete("signed").await.unwrap();
    for (name, ..) in refused {
        env.admin.delete(name).await.unwrap();
    }
    assert_no_assigned_sandboxes(&env).await;
    stop_and_check_clean(env).await;
}

/// Layers encrypted in the Confidential Containers key-provider format (AES-256-GCM-wrapped
/// layer keys, `kbs:///` key ids) run with the key-encryption key from the tenant's broker —
/// named by the deployment, or fetched because the layer names it — and fail clearly without.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coco_key_provider_layers_use_the_brokers_key() {
    use veil_image::crypt::{encrypt_image_for, Recipient};
    let env = up().await;
    let kbs = env.platform.kbs.clone().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let plain = hello_image(&tmp.path().join("ctx"), &["/hello"]);
    let client = env.platform.registry_client().unwrap();
    let mut kek = [0u8; 32];
    for (i, b) in kek.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(37).wrapping_add(11);
    }
    let push = |tag: &'static str, kid: &'static str, kek: [u8; 32]| {
        let client = client.clone();
        let plain = &plain;
        let url = env.platform.url();
        async move {
            let enc = encrypt_image_for(
                plain,
                &[Recipient::kbs(kid, kek.to_vec()).unwrap()],
                |_, _| true,
            )
            .unwrap();
            let reference: Reference = format!("local/coco:{tag}").parse().unwrap();
            let target = images::push_target(&reference, &url).unwrap();
            images::push(&client, &enc, &target).await.unwrap();
            (reference.to_string(), enc)
        }
    };
    let (good, enc) = push("good", "kbs:///default/image-kek/hello", kek).await;
    let (missing, _) = push("missing", "kbs:///default/image-kek/absent", kek).await;
    let mut wrong_kek = kek;
    wrong_kek[0] ^= 1;
    let (wrong, _) = push("wrong", "kbs:///default/image-kek/wrong", kek).await;
    kbs.set_resource("default/image-kek/hello", &kek).unwrap();
    kbs.set_resource("default/image-kek/wrong", &wrong_kek)
        .unwrap();
    kbs.set_resource(
        "default/policy/any",
        br#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
    )
    .unwrap();
    let enc_layer = enc.layers[0].digest.clone();

    // The deployment names the key-encryption key.
    let mut req = deploy_req(&good);
    req.decryption_keys = vec!["kbs:///default/image-kek/hello".into()];
    req.allow_insecure_software_tee = true;
    env.admin.deploy("named", &req).await.unwrap();
    let r = invoke(&env, "named", "/", "coco").await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert!(text(&r).contains("(4 bytes): coco"), "{}", text(&r));
    // The host caches the ciphertext only.
    let store = env.platform.gateway.node().cache().store().clone();
    assert!(store.contains(&enc_layer));
    assert!(
        !store.contains(&plain.layers[0].digest),
        "plaintext layer on the host"
    );

    // An attested deployment fetches the key the layer names.
    let attested = |image: &str| {
        let mut req = deploy_req(image);
        req.signature_policy = Some("kbs:///default/policy/any".into());
        req.allow_insecure_software_tee = true;
        req
    };
    env.admin.deploy("fetched", &attested(&good)).await.unwrap();
    let r = invoke(&env, "fetched", "/", "").await;
    assert_eq!(r.status, 200, "{}", text(&r));

    let failing: &[(&str, DeployRequest, &[&str])] = &[
        (
            "absent",
            attested(&missing),
            &["kbs:///default/image-kek/absent", "404"],
        ),
        ("wrongkek", attested(&wrong), &["wrong key"]),
        (
            "unattested",
            deploy_req(&good),
            &["kbs:///default/image-kek/hello", "does not attest"],
        ),
    ];
    for (name, req, wants) in failing {
        env.admin.deploy(name, req).await.unwrap();
        let r = invoke(&env, name, "/", "").await;
        assert_eq!(r.status, 502, "{name}: {}", text(&r));
        for w in *wants {
            assert!(text(&r).contains(w), "{name}: want {w:?} in {}", text(&r));
        }
        assert!(text(&r).contains("sha256:"), "{name}: {}", text(&r));
    }
    for f in ["named", "fetched", "absent", "wrongkek", "unattested"] {
        env.admin.delete(f).await.unwrap();
    }
    assert_no_assigned_sandboxes(&env).await;
    stop_and_check_clean(env).await;
}

/// A multi-platform image in a real registry, signed at its index by the reference cosign
/// tool: the node finds the index's signature upstream, and the sandbox accepts it for the
/// linux/amd64 manifest after checking the index lists that manifest. With a key that did not
/// sign, the refusal names both the manifest and the index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_signed_by_cosign_in_a_registry_is_accepted() {
    use veil_image::manifest::{index_json, Descriptor, Platform, OCI_INDEX};
    let reg = TestRegistry::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let image = hello_image(&tmp.path().join("ctx"), &["/hello"]);
    let client = images::registry_client(&[]).unwrap();
    let platform_ref: Reference = format!("{}/multi:amd64", reg.host()).parse().unwrap();
    images::push(&client, &image, &platform_ref).await.unwrap();
    let mut entry = Descriptor::new(
        image.manifest.media_type.clone(),
        image.manifest.digest.clone(),
        image.manifest.data.len() as u64,
    );
    entry.platform = Some(Platform {
        os: "linux".into(),
        architecture: "amd64".into(),
        variant: None,
    });
    let index = index_json(&[entry]);
    let index_ref: Reference = format!("{}/multi:v1", reg.host()).parse().unwrap();
    let index_digest = client
        .push_manifest(&index_ref, OCI_INDEX, index.clone().into())
        .await
        .unwrap();

    let keys = tmp.path();
    for (prefix, pw) in [("signer", "pw1"), ("stranger", "pw2")] {
        veil_testkit::cosign_key_pair(keys, prefix, pw).unwrap();
    }
    let signer_key = keys.join("signer.key");
    veil_testkit::cosign(
        &[
            "sign",
            "--key",
            signer_key.to_str().unwrap(),
            "--tlog-upload=false",
            "-y",
            "--allow-insecure-registry",
            "--allow-http-registry",
            &format!("{}/multi@{index_digest}", reg.host()),
        ],
        &[("COSIGN_PASSWORD", "pw1")],
    )
    .unwrap();

    let env = up().await;
    let kbs = env.platform.kbs.clone().unwrap();
    for name in ["signer", "stranger"] {
        kbs.set_resource(
            &format!("default/cosign/{name}"),
            &std::fs::read(keys.join(format!("{name}.pub"))).unwrap(),
        )
        .unwrap();
        // cosign's identity is the repository without a tag: matchRepository.
        let policy = format!(
            r#"{{"default":[{{"type":"sigstoreSigned","keyPath":"kbs:///default/cosign/{name}",
                "signedIdentity":{{"type":"matchRepository"}}}}]}}"#
        );
        kbs.set_resource(&format!("default/policy/{name}"), policy.as_bytes())
            .unwrap();
    }
    let req = |policy: &str| {
        let mut r = deploy_req(&index_ref.to_string());
        r.signature_policy = Some(format!("kbs:///default/policy/{policy}"));
        r.allow_insecure_software_tee = true;
        r
    };
    env.admin.deploy("multi", &req("signer")).await.unwrap();
    let r = invoke(&env, "multi", "/", "m").await;
    assert_eq!(r.status, 200, "{}", text(&r));
    let logs = format!("{:?}", env.admin.logs("multi", 500).await.unwrap());
    assert!(
        logs.contains(&format!("signed index {index_digest}")),
        "{logs}"
    );

    env.admin
        .deploy("stranger", &req("stranger"))
        .await
        .unwrap();
    let r = invoke(&env, "stranger", "/", "").await;
    assert_eq!(r.status, 502, "{}", text(&r));
    for want in [
        "for the manifest: ",
        &format!("for its index {index_digest}"),
        "does not verify with any accepted key",
    ] {
        assert!(text(&r).contains(want), "want {want:?} in {}", text(&r));
    }
    for f in ["multi", "stranger"] {
        env.admin.delete(f).await.unwrap();
    }
    assert_no_assigned_sandboxes(&env).await;
    stop_and_check_clean(env).await;
}
