//! Tenant-attested pools, end to end on the namespace backend with the embedded broker and the
//! (insecure, development) software TEE: sandboxes attested to one tenant ahead of demand start
//! that tenant's functions without attesting on the request path, a mixed burst for two tenants
//! never has a sandbox serve both (as the sandboxes themselves report it), and the faults of
//! the pool issue are handled: a broker that refuses, tokens that expire while pooled, a pool
//! removed while full, a node stopped with pools full.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;
use veil_cli::client::{AdminClient, Invocation};
use veil_cli::{images, Platform, TenantPoolSpec, UpOptions};
use veil_gateway::DeployRequest;
use veil_image::build::build_image;
use veil_image::Reference;

struct Tenant {
    name: String,
    admin: AdminClient,
    registry: veil_registry::RegistryClient,
}

async fn tenant(p: &Platform, name: &str) -> Tenant {
    let token = p
        .admin_client()
        .unwrap()
        .create_token(name)
        .await
        .unwrap()
        .token;
    Tenant {
        name: name.into(),
        admin: AdminClient::new(&p.url()).unwrap().with_token(&token),
        registry: images::registry_client_with_token(&[], &p.url(), &token).unwrap(),
    }
}

/// Push the example function as `local/<tenant>-hello:v1`, owned by the tenant.
async fn push(p: &Platform, t: &Tenant) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = tmp.path().join("ctx");
    images::write_example(&ctx).unwrap();
    let image = build_image(&images::example_spec(&ctx)).unwrap();
    let reference: Reference = format!("local/{}-hello:v1", t.name).parse().unwrap();
    let target = images::push_target(&reference, &p.url()).unwrap();
    images::push(&t.registry, &image, &target).await.unwrap();
    reference.to_string()
}

/// Run the `veil` CLI against `p` with the operator token.
fn veil(p: &Platform, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_veil"))
        .args(args)
        .args(["--server", &p.url(), "--token", p.operator_token()])
        .output()
        .unwrap()
}

fn pool(tenant: &str, size: usize) -> TenantPoolSpec {
    TenantPoolSpec {
        tenant: tenant.into(),
        size,
        kbs_url: None,
        allow_insecure_software_tee: true,
    }
}

async fn up(state: &Path, f: impl FnOnce(&mut UpOptions)) -> Platform {
    let mut opts = UpOptions::defaults(state.join("state"));
    opts.listen = "127.0.0.1:0".parse().unwrap();
    opts.pool_size = 1;
    f(&mut opts);
    Platform::start(opts).await.unwrap()
}

async fn invoke(admin: &AdminClient, name: &str, path: &str) -> Invocation {
    admin
        .invoke(name, "GET", path, Vec::new(), &BTreeMap::new())
        .await
        .unwrap()
}

fn header(r: &Invocation, name: &str) -> String {
    r.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// Wait until `tenant`'s pool holds `n` attested sandboxes.
async fn pool_ready(p: &Platform, tenant: &str, n: usize) {
    for _ in 0..1200 {
        let st = p.gateway.node().status();
        if st
            .tenant_pools
            .iter()
            .any(|t| t.config.tenant == tenant && t.ready >= n)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "the pool of {tenant} never held {n}: {:?}",
        p.gateway.node().status().tenant_pools
    );
}

fn deploy_with_secret(image: &str, secret: &str) -> DeployRequest {
    let mut req = DeployRequest::new(image);
    req.secrets.insert("GREETING".into(), secret.into());
    req.allow_insecure_software_tee = true;
    req.concurrency = Some(1);
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_attested_starts_skip_attestation_and_never_cross_tenants() {
    let state = tempfile::tempdir().unwrap();
    let p = up(state.path(), |o| {
        o.tenant_pools = vec![pool("acme", 2), pool("globex", 2)];
    })
    .await;
    let kbs = p.kbs.clone().unwrap();
    kbs.set_reference_values(
        veil_kbs::SOFTWARE_TEE_TENANTS,
        &["default".into(), "acme".into(), "globex".into()],
    )
    .unwrap();
    let tenants = [tenant(&p, "acme").await, tenant(&p, "globex").await];
    let mut functions = Vec::new();
    for t in &tenants {
        kbs.set_resource(
            &format!("{}/app/greeting", t.name),
            format!("hello-{}", t.name).as_bytes(),
        )
        .unwrap();
        let image = push(&p, t).await;
        for f in ["one", "two"] {
            let name = format!("{}-{f}", t.name);
            t.admin
                .deploy(
                    &name,
                    &deploy_with_secret(&image, &format!("kbs:///{}/app/greeting", t.name)),
                )
                .await
                .unwrap();
            functions.push((t.name.clone(), name));
        }
    }
    // The pools attest after the tenants opted in (the first attempts were refused and backed
    // off), so wait for them.
    pool_ready(&p, "acme", 2).await;
    pool_ready(&p, "globex", 2).await;

    // A start from the tenant's pool: no attestation on its path, the secret released.
    let r = invoke(&tenants[0].admin, "acme-one", "/env/GREETING").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(String::from_utf8_lossy(&r.body), "GREETING=hello-acme\n");
    let phases = header(&r, "x-veil-cold-start");
    assert!(
        phases.contains("pool=tenant-attested") && phases.contains("attested_ahead=true"),
        "{phases}"
    );

    // A deployment that does not allow the software TEE never takes a sandbox of a pool that
    // may have attested with it.
    let strict = push(&p, &tenants[0]).await;
    tenants[0]
        .admin
        .deploy("acme-strict", &DeployRequest::new(&strict))
        .await
        .unwrap();
    let r = invoke(&tenants[0].admin, "acme-strict", "/").await;
    assert_eq!(r.status, 200);
    let phases = header(&r, "x-veil-cold-start");
    assert!(!phases.contains("pool=tenant-attested"), "{phases}");
    tenants[0].admin.delete("acme-strict").await.unwrap();

    // The breakdown is kept for `veil describe` and in the phase histograms of /metrics.
    let st = tenants[0].admin.list().await.unwrap();
    let f = st.iter().find(|f| f.record.name == "acme-one").unwrap();
    let last = f.recent_starts.last().unwrap();
    assert_eq!(last.pool, "tenant-attested");
    assert_eq!(last.agent.attest_ms, 0.0);
    assert!(last.agent.attested_ahead);
    let out = veil(&p, &["describe", "acme-one"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let head = text
        .lines()
        .find(|l| l.trim_start().starts_with("pool "))
        .unwrap_or("");
    for ph in veil_node::StartTimings::PHASES {
        assert!(head.contains(ph), "{ph} missing in {text}");
    }
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("tenant-attested")),
        "{text}"
    );
    let metrics = reqwest::get(format!("{}/metrics", p.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(
            "veil_cold_start_phase_seconds_count{backend=\"process\",pool=\"tenant-attested\",phase=\"attest\"}"
        ),
        "{metrics}"
    );

    // A mixed burst for both tenants: every response is its own tenant's, and every sandbox
    // says (from inside) that it serves one tenant only.
    let mut tasks = Vec::new();
    for round in 0..3 {
        for (tenant, name) in &functions {
            let admin = tenants
                .iter()
                .find(|t| &t.name == tenant)
                .unwrap()
                .admin
                .clone();
            let (tenant, name) = (tenant.clone(), name.clone());
            tasks.push(tokio::spawn(async move {
                let r = invoke(&admin, &name, "/env/GREETING").await;
                (round, tenant, name, r)
            }));
        }
    }
    let mut served: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut pools_used = BTreeSet::new();
    for t in tasks {
        let (_, tenant, name, r) = t.await.unwrap();
        assert_eq!(
            r.status,
            200,
            "{name}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(
            String::from_utf8_lossy(&r.body),
            format!("GREETING=hello-{tenant}\n"),
            "{name}"
        );
        let inside = header(&r, "x-veil-sandbox-tenant");
        assert_eq!(
            inside, tenant,
            "{name}: the sandbox says it serves {inside:?}"
        );
        served
            .entry(header(&r, "x-veil-instance"))
            .or_default()
            .insert(inside);
        if let Some(pool) = header(&r, "x-veil-cold-start")
            .split(';')
            .find_map(|kv| kv.strip_prefix("pool="))
        {
            pools_used.insert(pool.to_string());
        }
    }
    for (sandbox, tenants) in &served {
        assert_eq!(tenants.len(), 1, "sandbox {sandbox} served {tenants:?}");
    }
    assert!(pools_used.contains("tenant-attested"), "{pools_used:?}");
    eprintln!(
        "pools used by the burst's cold starts: {pools_used:?}; sandboxes: {}",
        served.len()
    );

    // Removing a tenant's pool destroys its sandboxes; stopping the node leaves nothing. (The
    // burst's instances take the node's capacity: deleted, they leave room for the pool.)
    for (tenant, name) in &functions {
        let admin = &tenants.iter().find(|t| &t.name == tenant).unwrap().admin;
        admin.delete(name).await.unwrap();
    }
    pool_ready(&p, "globex", 1).await;
    let before: Vec<String> = tenant_pool_sandboxes(&p, "globex").await;
    assert!(!before.is_empty());
    p.gateway.node().remove_tenant_pool("globex").await;
    // A preparation still in flight is destroyed when it finishes.
    let mut after = tenant_pool_sandboxes(&p, "globex").await;
    for _ in 0..200 {
        if after.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        after = tenant_pool_sandboxes(&p, "globex").await;
    }
    assert!(after.is_empty(), "{after:?}");
    let pids: Vec<u32> = p
        .admin_client()
        .unwrap()
        .sandboxes()
        .await
        .unwrap()
        .iter()
        .flat_map(|s| s["pids"].as_array().cloned().unwrap_or_default())
        .filter_map(|v| v.as_u64().map(|p| p as u32))
        .collect();
    p.stop().await.unwrap();
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "sandbox process {pid} survived the node"
        );
    }
}

/// Sandboxes of `tenant`'s pool (prepared, not assigned to a function), by id.
async fn tenant_pool_sandboxes(p: &Platform, tenant: &str) -> Vec<String> {
    p.admin_client()
        .unwrap()
        .sandboxes()
        .await
        .unwrap()
        .iter()
        .filter(|s| s["tenant"] == tenant && s["function"] == "(pool)")
        .map(|s| s["id"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// A broker that refuses a pool (its tenant has not opted in to the software TEE): the pool
/// backs off and says why, functions still start the ordinary way (and fail as clearly); once
/// the broker accepts, the pool fills. Tokens that expire while pooled are replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusing_brokers_and_expiring_tokens() {
    let state = tempfile::tempdir().unwrap();
    let p = up(state.path(), |o| {
        o.tenant_pools = vec![pool("acme", 1)];
        o.kbs_token_ttl = Some(Duration::from_secs(8));
    })
    .await;
    let kbs = p.kbs.clone().unwrap();
    let mut why = None;
    for _ in 0..400 {
        let st = p.gateway.node().status();

        let t = st
            .tenant_pools
            .iter()
            .find(|t| t.config.tenant == "acme")
            .unwrap();
        if let (Some(e), Some(_)) = (&t.last_error, t.retry_in_s) {
            assert_eq!(t.ready, 0);
            why = Some(e.clone());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let why = why.expect("the refused pool must say why and back off");
    assert!(why.contains("not opted in"), "{why}");

    // Opted in: the pool fills after its back-off.
    kbs.set_reference_values(
        veil_kbs::SOFTWARE_TEE_TENANTS,
        &["default".into(), "acme".into()],
    )
    .unwrap();
    pool_ready(&p, "acme", 1).await;
    let first = tenant_pool_sandboxes(&p, "acme").await;
    assert_eq!(first.len(), 1, "{first:?}");
    // An 8 s token: replaced before it expires, by a sandbox that attested again.
    let mut replaced = false;
    for _ in 0..400 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = tenant_pool_sandboxes(&p, "acme").await;
        if !now.is_empty() && now != first {
            replaced = true;
            break;
        }
    }
    assert!(
        replaced,
        "the pooled sandbox was not replaced before its token expired"
    );
    p.stop().await.unwrap();
}

/// The pools' admin API (what `veil pool set|ls|rm` calls): operator only, bad input refused
/// with a clear error, a removed pool leaves no sandbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_are_managed_through_the_admin_api() {
    let state = tempfile::tempdir().unwrap();
    let p = up(state.path(), |_| {}).await;
    p.kbs
        .clone()
        .unwrap()
        .set_reference_values(
            veil_kbs::SOFTWARE_TEE_TENANTS,
            &["default".into(), "acme".into()],
        )
        .unwrap();
    let op = p.admin_client().unwrap();
    let req = |size| veil_gateway::TenantPoolRequest {
        size,
        kbs_url: None,
        allow_insecure_software_tee: true,
    };
    let pools = op.set_tenant_pool("acme", &req(1)).await.unwrap();
    assert_eq!(pools.len(), 1);
    assert_eq!(pools[0].config.kbs_url, p.url());
    pool_ready(&p, "acme", 1).await;
    assert_eq!(op.tenant_pools().await.unwrap()[0].ready, 1);

    for (tenant, r, why) in [
        ("acme", req(100_000), "at most"),
        ("Not A Tenant", req(1), "not a tenant name"),
        (
            "acme",
            veil_gateway::TenantPoolRequest {
                kbs_url: Some("ftp://x".into()),
                ..req(1)
            },
            "http(s)",
        ),
    ] {
        let e = op
            .set_tenant_pool(tenant, &r)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(why), "{e}");
    }
    // A tenant cannot manage pools.
    let acme = tenant(&p, "acme").await;
    let e = acme.admin.tenant_pools().await.unwrap_err().to_string();
    assert!(e.contains("403") || e.contains("operator"), "{e}");

    op.remove_tenant_pool("acme").await.unwrap();
    assert!(op.tenant_pools().await.unwrap().is_empty());
    for _ in 0..200 {
        if tenant_pool_sandboxes(&p, "acme").await.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(tenant_pool_sandboxes(&p, "acme").await.is_empty());
    p.stop().await.unwrap();
}

/// Opt `tenants` in to the software TEE and give each a pool of its size, through the admin
/// API (so that no first attempt is refused and backs off).
async fn pools_for(p: &Platform, tenants: &[(&str, usize)]) {
    let mut opted: Vec<String> = vec!["default".into()];
    opted.extend(tenants.iter().map(|(t, _)| t.to_string()));
    p.kbs
        .clone()
        .unwrap()
        .set_reference_values(veil_kbs::SOFTWARE_TEE_TENANTS, &opted)
        .unwrap();
    let op = p.admin_client().unwrap();
    for (t, size) in tenants {
        op.set_tenant_pool(
            t,
            &veil_gateway::TenantPoolRequest {
                size: *size,
                kbs_url: None,
                allow_insecure_software_tee: true,
            },
        )
        .await
        .unwrap();
    }
}

const SANDBOX: u64 = 512 << 20;

/// The pools' memory budget: tenants' pools fill first and in turn, the generic pool gets what
/// is left, the shortfall is reported; and a start that finds the node full evicts the oldest
/// idle tenant-attested sandbox (destroyed before its replacement boots), never going past the
/// node's capacity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_memory_bounds_the_pools_and_a_full_node_evicts_idle_prepared_sandboxes() {
    let state = tempfile::tempdir().unwrap();
    let p = up(state.path(), |o| {
        o.capacity_memory = Some(3 * SANDBOX);
        o.pool_memory = Some(2 * SANDBOX);
    })
    .await;
    pools_for(&p, &[("acme", 2), ("globex", 2)]).await;
    pool_ready(&p, "acme", 1).await;
    pool_ready(&p, "globex", 1).await;
    // Settled: one each (in turn), none for the generic pool, one sandbox of room left.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let st = p.gateway.node().status();
    let held: usize = st.pooled
        + st.tenant_pools
            .iter()
            .map(|t| t.ready + t.preparing)
            .sum::<usize>();
    assert_eq!(held, 2, "{st:?}");
    for t in &st.tenant_pools {
        assert_eq!((t.ready, t.short_of_memory), (1, 1), "{t:?}");
    }
    assert_eq!(st.capacity.sandboxes, 2, "{st:?}");
    let metrics = reqwest::get(format!("{}/metrics", p.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("veil_tenant_pool_short_of_memory{tenant=\"acme\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("veil_sandboxes{backend=\"process\"} 2"),
        "{metrics}"
    );

    // Two functions of a tenant with no pool: the first takes the free room, the second finds
    // the node full and evicts the oldest prepared sandbox.
    let initech = tenant(&p, "initech").await;
    let image = push(&p, &initech).await;
    for f in ["initech-a", "initech-b"] {
        initech
            .admin
            .deploy(f, &DeployRequest::new(&image))
            .await
            .unwrap();
    }
    let oldest = {
        let a = tenant_pool_sandboxes(&p, "acme").await;
        let g = tenant_pool_sandboxes(&p, "globex").await;
        (a, g)
    };
    let r = invoke(&initech.admin, "initech-a", "/").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = invoke(&initech.admin, "initech-b", "/").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(header(&r, "x-veil-sandbox-tenant"), "initech");
    let st = p.gateway.node().status();
    assert!(st.capacity.sandboxes <= 3, "{st:?}");
    let evicted: u64 = st.tenant_pools.iter().map(|t| t.evicted).sum();
    assert_eq!(evicted, 1, "{:?}", st.tenant_pools);
    // The evicted sandbox is destroyed (gone from the node), not serving initech.
    let b = header(&r, "x-veil-instance");
    let before: BTreeSet<String> = oldest.0.iter().chain(oldest.1.iter()).cloned().collect();
    let live: BTreeSet<String> = p
        .gateway
        .node()
        .sandboxes()
        .into_iter()
        .map(|s| s.id)
        .collect();
    let gone: Vec<&String> = before.iter().filter(|id| !live.contains(*id)).collect();
    assert_eq!(gone.len(), 1, "{before:?} / {live:?}");
    assert!(!before.contains(&b), "{b} was a pooled sandbox");
    let e = veil(&p, &["pool", "ls"]);
    let out = String::from_utf8_lossy(&e.stdout);
    assert!(out.contains("EVICTED") && out.contains("short"), "{out}");

    // Room again: the pool that lost its sandbox fills once more.
    initech.admin.delete("initech-a").await.unwrap();
    initech.admin.delete("initech-b").await.unwrap();
    for _ in 0..200 {
        let st = p.gateway.node().status();
        if st.tenant_pools.iter().all(|t| t.ready == 1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let st = p.gateway.node().status();
    assert!(st.tenant_pools.iter().all(|t| t.ready == 1), "{st:?}");
    p.stop().await.unwrap();
}

/// A pool memory that holds no sandbox is refused at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_memory_too_small_for_one_sandbox_is_refused() {
    let state = tempfile::tempdir().unwrap();
    let mut opts = UpOptions::defaults(state.path().join("state"));
    opts.listen = "127.0.0.1:0".parse().unwrap();
    opts.pool_size = 1;
    opts.pool_memory = Some(SANDBOX / 2);
    let e = Platform::start(opts).await.err().unwrap();
    let e = format!("{e:#}");
    assert!(e.contains("holds no sandbox"), "{e}");
}

/// Deleting a tenant: its tokens stop working, its pool and functions go (requests in flight
/// finish), nothing of it is left on the node, and its repositories stay its own, so another
/// tenant cannot take them over. Bad input gets a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_tenant_leaves_nothing_of_it_running() {
    let state = tempfile::tempdir().unwrap();
    let p = up(state.path(), |_| {}).await;
    pools_for(&p, &[("acme", 1)]).await;
    pool_ready(&p, "acme", 1).await;
    let acme = tenant(&p, "acme").await;
    let globex = tenant(&p, "globex").await;
    let image = push(&p, &acme).await;
    acme.admin
        .deploy("acme-fn", &DeployRequest::new(&image))
        .await
        .unwrap();
    let gimage = push(&p, &globex).await;
    globex
        .admin
        .deploy("globex-fn", &DeployRequest::new(&gimage))
        .await
        .unwrap();
    assert_eq!(invoke(&acme.admin, "acme-fn", "/").await.status, 200);
    assert_eq!(invoke(&globex.admin, "globex-fn", "/").await.status, 200);
    let op = p.admin_client().unwrap();
    let listed = op.tenants().await.unwrap();
    let a = listed.iter().find(|t| t.tenant == "acme").unwrap();
    assert_eq!(
        (a.tokens, a.pool_size, a.repositories, a.functions.clone()),
        (1, Some(1), 1, vec!["acme-fn".to_string()])
    );

    // Bad input: another tenant, a malformed name, an unknown tenant.
    let e = globex
        .admin
        .delete_tenant("acme")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("403") || e.contains("operator"), "{e}");
    let e = op
        .delete_tenant("Not A Tenant")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a tenant name"), "{e}");
    let e = op.delete_tenant("nobody").await.unwrap_err().to_string();
    assert!(e.contains("TENANT_NOT_FOUND"), "{e}");

    // A request in flight when the tenant is deleted finishes.
    let slow = {
        let admin = acme.admin.clone();
        tokio::spawn(async move { invoke(&admin, "acme-fn", "/sleep/1500/").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let d = op.delete_tenant("acme").await.unwrap();
    assert_eq!(d.tokens_revoked, 1);
    assert!(d.pool_removed);
    assert_eq!(d.functions_deleted, vec!["acme-fn".to_string()]);
    assert_eq!(d.repositories_kept, 1);
    let r = slow.await.unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // Its functions' logs and its pool's are gone.
    let logs = p.gateway.node().logs();
    assert!(logs.tail("acme", "acme-fn", 100).is_empty());
    assert!(logs.tail("acme", "(pool)", 100).is_empty());

    // Nothing of it is left: no token, no function, no sandbox bound to it.
    let e = acme.admin.list().await.unwrap_err().to_string();
    assert!(e.contains("401") || e.contains("revoked"), "{e}");
    assert_eq!(invoke(&op, "acme-fn", "/").await.status, 404);
    for _ in 0..200 {
        if p.gateway
            .node()
            .sandboxes()
            .iter()
            .all(|s| s.tenant.as_deref() != Some("acme"))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left: Vec<_> = p
        .gateway
        .node()
        .sandboxes()
        .into_iter()
        .filter(|s| s.tenant.as_deref() == Some("acme"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(op.tenant_pools().await.unwrap().is_empty());
    // The other tenant is untouched.
    assert_eq!(invoke(&globex.admin, "globex-fn", "/").await.status, 200);
    // Its repository stays its own: globex cannot push to it or deploy from it.
    let listed = op.tenants().await.unwrap();
    let a = listed.iter().find(|t| t.tenant == "acme").unwrap();
    assert_eq!((a.tokens, a.pool_size, a.repositories), (0, None, 1));
    let e = globex
        .admin
        .deploy("stolen", &DeployRequest::new(&image))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("404") || e.contains("not"), "{e}");
    // The CLI lists and deletes the same way.
    let out = veil(&p, &["tenant", "ls"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("globex") && text.contains("globex-fn"),
        "{text}"
    );
    let out = veil(&p, &["tenant", "rm", "globex"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("1 function(s) deleted (globex-fn)"),
        "{text}"
    );
    p.stop().await.unwrap();
}

/// Host pids of `tenant`'s pooled sandboxes, by sandbox id.
async fn tenant_pool_pids(p: &Platform, tenant: &str) -> BTreeMap<String, Vec<u32>> {
    p.admin_client()
        .unwrap()
        .sandboxes()
        .await
        .unwrap()
        .iter()
        .filter(|s| s["tenant"] == tenant && s["function"] == "(pool)")
        .map(|s| {
            (
                s["id"].as_str().unwrap_or_default().to_string(),
                s["pids"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|v| v.as_u64().map(|p| p as u32))
                    .collect(),
            )
        })
        .collect()
}

/// A tenant-attested sandbox whose agent is killed (-9) is never handed out: the pool notices,
/// destroys it and attests a replacement, and the tenant's start still comes from the pool. A
/// node stopped with its pools full and started again on the same state directory leaves
/// nothing of the old sandboxes behind and fills its pools anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_sandbox_whose_agent_dies_is_replaced_and_a_restart_leaves_nothing() {
    let state = tempfile::tempdir().unwrap();
    let p = up(state.path(), |_| {}).await;
    pools_for(&p, &[("acme", 2)]).await;
    pool_ready(&p, "acme", 2).await;
    let before = tenant_pool_pids(&p, "acme").await;
    let (victim, pids) = before.iter().next().unwrap();
    for pid in pids {
        // SAFETY: kill(2) on a sandbox process of this test's own node.
        unsafe {
            libc::kill(*pid as i32, libc::SIGKILL);
        }
    }
    let mut replaced = false;
    for _ in 0..400 {
        let now = tenant_pool_pids(&p, "acme").await;
        let st = p.gateway.node().status();
        let ready = st
            .tenant_pools
            .iter()
            .find(|t| t.config.tenant == "acme")
            .unwrap()
            .ready;
        if !now.contains_key(victim) && ready == 2 && now.len() == 2 {
            replaced = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(replaced, "the killed sandbox {victim} was not replaced");
    let acme = tenant(&p, "acme").await;
    let image = push(&p, &acme).await;
    let mut req = DeployRequest::new(&image);
    req.allow_insecure_software_tee = true;
    req.secrets
        .insert("GREETING".into(), "kbs:///acme/app/greeting".into());
    p.kbs
        .clone()
        .unwrap()
        .set_resource("acme/app/greeting", b"hello-acme")
        .unwrap();
    acme.admin.deploy("acme-fn", &req).await.unwrap();
    let r = invoke(&acme.admin, "acme-fn", "/env/GREETING").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(header(&r, "x-veil-cold-start").contains("pool=tenant-attested"));
    acme.admin.delete("acme-fn").await.unwrap();
    pool_ready(&p, "acme", 2).await;

    // Stopped with the pool full, started again on the same state directory.
    let old: Vec<u32> = tenant_pool_pids(&p, "acme")
        .await
        .into_values()
        .flatten()
        .collect();
    let old_ids: BTreeSet<String> = tenant_pool_pids(&p, "acme").await.into_keys().collect();
    p.stop().await.unwrap();
    for pid in &old {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "{pid} survived the stop"
        );
    }
    let p = up(state.path(), |_| {}).await;
    pools_for(&p, &[("acme", 2)]).await;
    pool_ready(&p, "acme", 2).await;
    let new_ids: BTreeSet<String> = tenant_pool_pids(&p, "acme").await.into_keys().collect();
    assert!(new_ids.is_disjoint(&old_ids), "{new_ids:?} / {old_ids:?}");
    let all = p.gateway.node().sandboxes();
    assert!(all.iter().all(|s| !old_ids.contains(&s.id)), "{all:?}");
    p.stop().await.unwrap();
}

/// Fair shares of the pools' memory: a pool that filled it alone gives sandboxes up to a pool
/// configured later until neither holds two more than the other (each handed-over room is
/// destroyed before the poorer pool boots in it), and then it stays put: no pool keeps
/// destroying and re-attesting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_memory_is_shared_fairly_and_settles() {
    let state = tempfile::tempdir().unwrap();
    let p = up(state.path(), |o| {
        o.pool_size = 0;
        o.capacity_memory = Some(4 * SANDBOX);
        o.pool_memory = Some(4 * SANDBOX);
    })
    .await;
    pools_for(&p, &[("acme", 4)]).await;
    pool_ready(&p, "acme", 4).await;
    pools_for(&p, &[("acme", 4), ("globex", 2)]).await;
    let ready = |p: &Platform| -> BTreeMap<String, (usize, u64)> {
        p.gateway
            .node()
            .status()
            .tenant_pools
            .into_iter()
            .map(|t| (t.config.tenant, (t.ready, t.evicted)))
            .collect()
    };
    let mut settled = None;
    for _ in 0..400 {
        let r = ready(&p);
        if r["acme"].0 == 2 && r["globex"].0 == 2 {
            settled = Some(r);
            break;
        }
        assert!(p.gateway.node().capacity().sandboxes <= 4);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let settled = settled.unwrap_or_else(|| panic!("never shared: {:?}", ready(&p)));
    assert_eq!(settled["acme"].1, 2, "{settled:?}");
    // Stable: three sweeps later nothing more was given up.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let later = ready(&p);
    assert_eq!(later, settled);
    assert!(p.gateway.node().capacity().sandboxes <= 4);
    p.stop().await.unwrap();
}
