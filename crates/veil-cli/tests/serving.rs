//! End-to-end tests of serving under change and load, on the real platform (namespace
//! sandboxes, the real agent, the example function): redeploys and deletes drain the instances
//! they take out of service, and the node never runs more sandboxes than its capacity. They
//! need root (`make test`).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::{timeout, Instant};
use veil_cli::client::AdminClient;
use veil_gateway::DeployRequest;

mod common;
use common::*;

/// One response of the steady stream, and where it stood relative to the redeploy.
struct Sample {
    sent_after_redeploy: bool,
    done_after_redeploy: bool,
    status: u16,
    body: String,
    instance: String,
}

/// A steady stream of slow requests (each takes 500 ms in the function) while the function is
/// redeployed with a new environment: no request fails — the old instance finishes the ones it
/// has — and every request sent after the redeploy answered is served by the new revision. The
/// old instance is destroyed once drained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redeploy_drains_requests_in_flight_and_routes_new_ones_to_the_new_revision() {
    const WORKERS: usize = 6;
    const MAX_PER_WORKER: usize = 60;
    const AFTER_PER_WORKER: usize = 4;
    let env = up_with(|_| {}).await;
    let image = push_hello(&env, "rolling:v1").await;
    let mut req = DeployRequest::new(&image);
    req.env.insert("REV".into(), "one".into());
    env.admin.deploy("rolling", &req).await.unwrap();
    let warm = get(&env.admin, "rolling", "/env/REV").await;
    assert_eq!(text(&warm), "REV=one\n", "{}", text(&warm));
    let old_instance = instance(&warm);

    let redeployed = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let (count_tx, mut count_rx) = tokio::sync::watch::channel(0usize);
    let count_tx = Arc::new(count_tx);
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (admin, redeployed, samples, count_tx) = (
                env.admin.clone(),
                redeployed.clone(),
                samples.clone(),
                count_tx.clone(),
            );
            tokio::spawn(async move {
                let mut after = 0;
                for _ in 0..MAX_PER_WORKER {
                    let sent_after_redeploy = redeployed.load(Ordering::SeqCst);
                    let r = get(&admin, "rolling", "/sleep/500/env/REV").await;
                    let done_after_redeploy = redeployed.load(Ordering::SeqCst);
                    samples.lock().unwrap().push(Sample {
                        sent_after_redeploy,
                        done_after_redeploy,
                        status: r.status,
                        body: text(&r),
                        instance: instance(&r),
                    });
                    count_tx.send_modify(|n| *n += 1);
                    if sent_after_redeploy {
                        after += 1;
                        if after == AFTER_PER_WORKER {
                            break;
                        }
                    }
                }
            })
        })
        .collect();

    // Redeploy once the stream is flowing, so that requests are in flight on the old instance.
    timeout(
        Duration::from_secs(30),
        count_rx.wait_for(|n| *n >= 2 * WORKERS),
    )
    .await
    .expect("the stream did not get going")
    .unwrap();
    req.env.insert("REV".into(), "two".into());
    let st = env.admin.deploy("rolling", &req).await.unwrap();
    redeployed.store(true, Ordering::SeqCst);
    assert_eq!(st.record.revision, 2);
    assert_eq!(st.draining, vec![old_instance.clone()], "{st:?}");

    for w in workers {
        timeout(Duration::from_secs(60), w)
            .await
            .expect("the stream did not finish")
            .unwrap();
    }
    let samples = std::mem::take(&mut *samples.lock().unwrap());
    let failed: Vec<(u16, &str)> = samples
        .iter()
        .filter(|s| s.status != 200)
        .map(|s| (s.status, s.body.as_str()))
        .collect();
    assert!(
        failed.is_empty(),
        "requests failed across the redeploy: {failed:?}"
    );
    let across = samples
        .iter()
        .filter(|s| !s.sent_after_redeploy && s.done_after_redeploy)
        .count();
    assert!(across >= 1, "no request was in flight across the redeploy");
    for s in samples.iter().filter(|s| s.sent_after_redeploy) {
        assert_eq!(s.body, "REV=two\n", "a request sent after the redeploy");
        assert_ne!(s.instance, old_instance);
    }
    assert!(
        samples
            .iter()
            .any(|s| s.body == "REV=one\n" && s.done_after_redeploy),
        "no request finished on the old revision after the redeploy"
    );
    assert_eq!(
        samples.iter().filter(|s| s.sent_after_redeploy).count(),
        WORKERS * AFTER_PER_WORKER
    );

    // Drained, the old instance is gone.
    wait_destroyed(&env, &[old_instance], Duration::from_secs(10)).await;
    wait_status(
        &env,
        "rolling",
        Duration::from_secs(5),
        "drain listed",
        |s| s.draining.is_empty(),
    )
    .await;
    env.admin.delete("rolling").await.unwrap();
    stop_clean(env).await;
}

/// A delete takes the function out of routing at once but lets the request in flight finish;
/// when it returns, the instance is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_lets_the_request_in_flight_finish() {
    let env = up_with(|_| {}).await;
    let image = push_hello(&env, "leaving:v1").await;
    env.admin
        .deploy("leaving", &DeployRequest::new(&image))
        .await
        .unwrap();
    let warm = get(&env.admin, "leaving", "/").await;
    assert_eq!(warm.status, 200, "{}", text(&warm));
    let slow = {
        let admin = env.admin.clone();
        tokio::spawn(async move { get(&admin, "leaving", "/sleep/1500/env/PORT").await })
    };
    wait_status(
        &env,
        "leaving",
        Duration::from_secs(10),
        "request in flight",
        |s| s.inflight == 1,
    )
    .await;
    env.admin.delete("leaving").await.unwrap();
    let after = get(&env.admin, "leaving", "/").await;
    assert_eq!(after.status, 404, "{}", text(&after));
    let r = timeout(Duration::from_secs(30), slow)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(text(&r), "PORT=8080\n");
    // The delete returned after the drain: the instance is already gone.
    let left: Vec<serde_json::Value> = sandboxes(&env)
        .await
        .into_iter()
        .filter(|s| s["id"] == instance(&warm).as_str())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    stop_clean(env).await;
}

/// A request that outlives the drain timeout does not keep the old instance: it is destroyed
/// at the deadline (and that request fails).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_is_bounded_by_the_drain_timeout() {
    let env = up_with(|o| o.drain_timeout = Duration::from_secs(1)).await;
    let image = push_hello(&env, "stuck:v1").await;
    let mut req = DeployRequest::new(&image);
    env.admin.deploy("stuck", &req).await.unwrap();
    let warm = get(&env.admin, "stuck", "/").await;
    let old = instance(&warm);
    let endless = {
        let admin = env.admin.clone();
        tokio::spawn(async move { get(&admin, "stuck", "/sleep/60000").await })
    };
    wait_status(
        &env,
        "stuck",
        Duration::from_secs(10),
        "request in flight",
        |s| s.inflight == 1,
    )
    .await;
    req.env.insert("NEW".into(), "1".into());
    let st = env.admin.deploy("stuck", &req).await.unwrap();
    assert_eq!(st.draining, vec![old.clone()]);
    // Far less than the request's 60 s: the drain deadline ends it.
    let r = timeout(Duration::from_secs(30), endless)
        .await
        .expect("the drain did not end at its deadline")
        .unwrap();
    assert_eq!(r.status, 502, "{}", text(&r));
    assert!(text(&r).contains("INSTANCE_FAILED"), "{}", text(&r));
    wait_destroyed(&env, &[old], Duration::from_secs(10)).await;
    let fresh = get(&env.admin, "stuck", "/env/NEW").await;
    assert_eq!(text(&fresh), "NEW=1\n");
    env.admin.delete("stuck").await.unwrap();
    stop_clean(env).await;
}

/// A node with room for three sandboxes: a min_scale beyond it is refused with a message that
/// names the capacity (alone, and together with other functions' min_scale); a function that
/// finds no room waits in its queue and gets 503 + Retry-After saying so, or is served as soon
/// as room appears. Capacity and usage show in `/v1/node` and `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_scale_beyond_the_capacity_is_refused_and_requests_wait_for_room() {
    let env = up_with(|o| {
        o.capacity_cpu_millis = Some(3000);
        o.cold_start_timeout = Duration::from_secs(8);
    })
    .await;
    let image = push_hello(&env, "big:v1").await;
    let node = node_status(&env).await;
    assert_eq!(node["capacity"]["max_sandboxes"], 3, "{node}");

    let mut req = DeployRequest::new(&image);
    req.min_scale = Some(4);
    req.max_scale = Some(4);
    let err = env.admin.deploy("big", &req).await.unwrap_err().to_string();
    assert!(
        err.contains("CAPACITY_EXCEEDED") && err.contains("HTTP 422"),
        "{err}"
    );
    assert!(
        err.contains("holds 3 sandboxes") && err.contains("3 CPU"),
        "{err}"
    );
    assert!(env.admin.list().await.unwrap().is_empty());

    // max_scale beyond the capacity is fine; min_scale 3 fills the node.
    req.min_scale = Some(3);
    req.max_scale = Some(50);
    env.admin.deploy("big", &req).await.unwrap();
    let mut other = DeployRequest::new(&image);
    other.min_scale = Some(1);
    let err = env
        .admin
        .deploy("other", &other)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("CAPACITY_EXCEEDED") && err.contains("other functions keep 3"),
        "{err}"
    );
    other.min_scale = None;
    env.admin.deploy("other", &other).await.unwrap();
    wait_status(
        &env,
        "big",
        Duration::from_secs(30),
        "min_scale instances",
        |s| s.instances.len() == 3,
    )
    .await;
    let node = node_status(&env).await;
    assert_eq!(node["capacity"]["sandboxes"], 3, "{node}");
    assert_eq!(node["pooled"], 0, "{node}");

    // No room for `other`: its request waits, then is told why.
    let r = get(&env.admin, "other", "/").await;
    assert_eq!(r.status, 503, "{}", text(&r));
    assert_eq!(r.headers["retry-after"], "1");
    assert!(
        text(&r).contains("AT_CAPACITY") && text(&r).contains("at capacity"),
        "{}",
        text(&r)
    );
    let metrics = reqwest::get(format!("{}/metrics", env.platform.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in ["veil_capacity_sandboxes 3", "veil_committed_sandboxes 3"] {
        assert!(metrics.contains(line), "{line} missing from {metrics}");
    }

    // Room that appears while a request waits serves it.
    let waiting = {
        let admin = env.admin.clone();
        tokio::spawn(async move { get(&admin, "other", "/").await })
    };
    wait_status(
        &env,
        "other",
        Duration::from_secs(6),
        "request waiting",
        |s| s.waiting == 1,
    )
    .await;
    env.admin.delete("big").await.unwrap();
    let r = timeout(Duration::from_secs(30), waiting)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.status, 200, "{}", text(&r));
    env.admin.delete("other").await.unwrap();
    stop_clean(env).await;
}

/// A burst against a function whose max_scale is beyond the node's capacity of three sandboxes
/// never runs more than three; every request is answered with 200, or 503 + Retry-After.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_never_runs_more_sandboxes_than_the_capacity() {
    const BURST: usize = 16;
    let env = up_with(|o| {
        o.capacity_cpu_millis = Some(3000);
        o.cold_start_timeout = Duration::from_secs(4);
    })
    .await;
    let image = push_hello(&env, "burst:v1").await;
    let mut req = DeployRequest::new(&image);
    req.concurrency = Some(1);
    req.max_scale = Some(20);
    env.admin.deploy("burst", &req).await.unwrap();

    // Watch the node's sandbox list while the burst runs.
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (admin, done) = (env.admin.clone(), done.clone());
        tokio::spawn(async move {
            let mut most = 0;
            let deadline = Instant::now() + Duration::from_secs(120);
            while !done.load(Ordering::SeqCst) && Instant::now() < deadline {
                most = most.max(admin.sandboxes().await.unwrap().len());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            most
        })
    };
    let calls = (0..BURST).map(|_| get(&env.admin, "burst", "/sleep/400"));
    let results = timeout(Duration::from_secs(90), futures::future::join_all(calls))
        .await
        .expect("the burst was not answered");
    done.store(true, Ordering::SeqCst);
    let most = sampler.await.unwrap();

    // Checked first: without a capacity the node boots a sandbox per waiting request.
    assert!(most <= 3, "{most} sandboxes on a node with room for 3");
    let instances: BTreeSet<String> = results
        .iter()
        .filter(|r| r.status == 200)
        .map(instance)
        .collect();
    assert!(
        instances.len() <= 3,
        "more instances than the capacity: {instances:?}"
    );
    let mut ok = 0;
    for r in &results {
        match r.status {
            200 => ok += 1,
            503 => assert_eq!(r.headers["retry-after"], "1", "{}", text(r)),
            other => panic!("HTTP {other}: {}", text(r)),
        }
    }
    assert!(ok >= 1, "nothing was served");
    let node = node_status(&env).await;
    assert!(
        node["capacity"]["sandboxes"].as_u64().unwrap() <= 3,
        "{node}"
    );
    env.admin.delete("burst").await.unwrap();
    stop_clean(env).await;
}

/// The hybrid keep-alive policy learns a function's rhythm: invoked once a second (histogram
/// bins shortened to 100 ms for the test), it first keeps instances for its fallback window;
/// once it has enough idle times it unloads the instance right after each request and
/// pre-warms a new one just before the next, so that requests stay warm without an instance
/// idling in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hybrid_keep_alive_unloads_and_prewarms_on_the_functions_rhythm() {
    // Two pooled sandboxes: every pre-warm takes one, and the refill's boot (most of a second
    // in a debug build on a busy machine) must not leave the next pre-warm without one.
    let env = up_with(|o| {
        o.keep_alive_bin = Duration::from_millis(100);
        o.pool_size = 2;
    })
    .await;
    let image = push_hello(&env, "rhythm:v1").await;
    let mut req = DeployRequest::new(&image);
    req.keep_alive = Some(veil_gateway::keepalive::KeepAlive::Hybrid);
    env.admin.deploy("rhythm", &req).await.unwrap();
    let status = |admin: AdminClient| async move {
        admin
            .list()
            .await
            .unwrap()
            .into_iter()
            .find(|f| f.record.name == "rhythm")
            .unwrap()
    };
    let first = status(env.admin.clone()).await;
    assert!(
        first
            .keep_alive_decision
            .as_deref()
            .unwrap()
            .contains("fixed window"),
        "{:?}",
        first.keep_alive_decision
    );
    // The rhythm starts once the generic pool is full: a first request that has to boot a
    // sandbox while the pool boots its own may take most of the first second, and its idle
    // time would then be a stray near-zero sample.
    for _ in 0..600 {
        if env.platform.gateway.node().status().pooled >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (mut warm, mut unloaded, mut instances) = (0, 0, BTreeSet::new());
    let start = Instant::now();
    for i in 0..17u32 {
        tokio::time::sleep_until(start + Duration::from_secs(u64::from(i))).await;
        let r = get(&env.admin, "rhythm", "/").await;
        assert_eq!(r.status, 200, "{}", text(&r));
        if i >= 12 {
            warm += u32::from(!r.headers.contains_key("x-veil-cold-start"));
            instances.insert(instance(&r));
            tokio::time::sleep(Duration::from_millis(400)).await;
            let st = status(env.admin.clone()).await;
            unloaded += u32::from(st.instances.is_empty());
        }
    }
    let st = status(env.admin.clone()).await;
    let decision = st.keep_alive_decision.unwrap();
    eprintln!("{decision}: {warm} of 5 warm, unloaded {unloaded} of 5 times");
    assert!(decision.contains("histogram of"), "{decision}");
    assert!(
        unloaded >= 3,
        "the instance should be unloaded between requests ({unloaded} of 5): {decision}"
    );
    assert!(
        warm >= 3,
        "pre-warmed instances should serve the requests warm ({warm} of 5): {decision}"
    );
    assert!(instances.len() >= 3, "{instances:?}");
    env.admin.delete("rhythm").await.unwrap();
    env.platform.stop().await.unwrap();
}

/// The autoscaler on observed concurrency: a burst well past the target panics it, and the
/// instances the burst needs start at once (bounded by max_scale); once the burst is over and
/// a stable window has passed, a steady trickle keeps only what the stable window wants
/// (the idle timeout, far off, plays no part). Impossible targets are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_panics_the_autoscaler_and_the_stable_window_scales_it_back() {
    let env = up_with(|o| {
        o.pool_size = 2;
        o.autoscale.stable_window = Duration::from_secs(3);
        o.autoscale.panic_window = Duration::from_millis(600);
    })
    .await;
    let image = push_hello(&env, "burst:v1").await;
    let mut req = DeployRequest::new(&image);
    req.concurrency = Some(4);
    for (target, why) in [
        (0.0, "target 0"),
        (5.0, "target 5"),
        (1e9, "target 1000000000"),
    ] {
        req.target = Some(target);
        let e = env
            .admin
            .deploy("burst", &req)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(why) && e.contains("BAD_REQUEST"), "{e}");
    }
    assert!(env.admin.list().await.unwrap().is_empty());
    req.target = Some(1.0);
    req.max_scale = Some(4);
    req.idle_timeout_s = Some(600);
    env.admin.deploy("burst", &req).await.unwrap();
    let r = get(&env.admin, "burst", "/").await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(status(&env, "burst").await.instances.len(), 1);

    // The burst: 8 requests of 1.5 s at a target of 1.
    let burst: Vec<_> = (0..8)
        .map(|_| {
            let admin = env.admin.clone();
            tokio::spawn(async move { get(&admin, "burst", "/sleep/1500").await })
        })
        .collect();
    let st = wait_status(&env, "burst", Duration::from_secs(20), "panic", |st| {
        st.revisions[0]
            .autoscaler
            .as_ref()
            .is_some_and(|a| a.panic && a.desired == 4)
            && st.instances.len() + st.starting == 4
    })
    .await;
    assert!(st.instances.len() + st.starting <= 4, "{st:?}");
    let metrics = reqwest::get(format!("{}/metrics", env.platform.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for want in [
        "veil_autoscaler_panic{function=\"burst\",revision=\"1\"} 1",
        "veil_autoscaler_desired_instances{function=\"burst\",revision=\"1\"} 4",
    ] {
        assert!(metrics.contains(want), "missing {want} in:\n{metrics}");
    }
    for b in burst {
        let r = b.await.unwrap();
        assert_eq!(r.status, 200, "{}", text(&r));
    }

    // A trickle (one request at a time): panic ends a stable window after the burst, then the
    // autoscaler scales down to one instance though none has been idle for the idle timeout.
    let st = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = get(&env.admin, "burst", "/sleep/50").await;
            assert_eq!(r.status, 200, "{}", text(&r));
            let st = status(&env, "burst").await;
            let a = st.revisions[0].autoscaler.clone().unwrap();
            if !a.panic && st.instances.len() == 1 {
                break st;
            }
            assert!(Instant::now() < deadline, "not scaled back: {st:?}");
        }
    };
    assert_eq!(st.revisions[0].autoscaler.as_ref().unwrap().desired, 1);
    env.admin.delete("burst").await.unwrap();
    stop_clean(env).await;
}
