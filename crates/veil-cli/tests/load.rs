//! Load tests of the serving layer on the real platform (namespace sandboxes, the real agent,
//! the example function), bounded in count and time, on loopback: a burst from zero, a
//! redeploy and a traffic shift during a burst, and a crash-looping function under a burst.
//! Every answer is a success or a clear refusal (503 with Retry-After, or the reason the
//! function cannot start); none hangs. They need root (`make test`).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use veil_gateway::{DeployRequest, TrafficTarget};

/// One answer of a burst.
#[derive(Debug)]
struct Answer {
    status: u16,
    retry_after: bool,
    body: String,
    took: Duration,
}

/// `n` requests to `url` from `concurrency` clients at once; each request may take at most
/// `limit` (a hang fails the test).
async fn burst(url: &str, n: usize, concurrency: usize, limit: Duration) -> Vec<Answer> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(concurrency)
        .build()
        .unwrap();
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (http, next, url) = (http.clone(), next.clone(), url.to_string());
            tokio::spawn(async move {
                let mut out = Vec::new();
                while next.fetch_add(1, Ordering::SeqCst) < n {
                    let t = Instant::now();
                    let r = tokio::time::timeout(limit, async {
                        let r = http.get(&url).send().await.unwrap();
                        let status = r.status().as_u16();
                        let retry_after = r.headers().contains_key("retry-after");
                        (status, retry_after, r.text().await.unwrap_or_default())
                    })
                    .await
                    .unwrap_or_else(|_| panic!("a request to {url} hung for {limit:?}"));
                    out.push(Answer {
                        status: r.0,
                        retry_after: r.1,
                        body: r.2,
                        took: t.elapsed(),
                    });
                }
                out
            })
        })
        .collect();
    let mut all = Vec::with_capacity(n);
    for w in workers {
        all.extend(w.await.unwrap());
    }
    all
}

fn by_status(answers: &[Answer]) -> BTreeMap<u16, usize> {
    let mut m = BTreeMap::new();
    for a in answers {
        *m.entry(a.status).or_insert(0) += 1;
    }
    m
}

/// Every answer is a 2xx, or a 503 that says when to retry.
fn only_success_or_retry_later(what: &str, answers: &[Answer]) {
    for a in answers {
        assert!(
            (200..300).contains(&a.status) || (a.status == 503 && a.retry_after),
            "{what}: {a:?} (all: {:?})",
            by_status(answers)
        );
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// 10,000 requests at concurrency 200 to a function at zero: every one is answered (2xx, or
/// 503 with Retry-After), none hangs, and the process's memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_requests_at_concurrency_200_from_zero() {
    let env = up_with(|o| o.pool_size = 2).await;
    let image = push_hello(&env, "zero:v1").await;
    let mut req = DeployRequest::new(&image);
    req.max_scale = Some(4);
    env.admin.deploy("zero", &req).await.unwrap();
    let url = format!("{}/f/zero/", env.platform.url());
    // Warm the test's own client code paths, not the function: it stays at zero.
    let before = rss_kib();
    let answers = burst(&url, 10_000, 200, Duration::from_secs(60)).await;
    assert_eq!(answers.len(), 10_000);
    only_success_or_retry_later("burst from zero", &answers);
    let ok = answers.iter().filter(|a| a.status == 200).count();
    assert!(ok > 9_000, "{:?}", by_status(&answers));
    let grown = rss_kib().saturating_sub(before);
    assert!(
        grown < 256 * 1024,
        "the process grew by {grown} KiB over 10,000 requests"
    );
    let st = status(&env, "zero").await;
    assert!(st.instances.len() <= 4, "{st:?}");
    // The function logs a line per request, far over the log rate limit: the agent drops
    // what the node would (so the flood never crosses the channel) and says how much.
    let t = std::time::Instant::now();
    loop {
        let lines = env.admin.logs("zero", 10_000).await.unwrap();
        let text = |l: &serde_json::Value| l["text"].as_str().unwrap_or_default().to_string();
        let kept = lines
            .iter()
            .filter(|l| text(l).contains("hello: GET"))
            .count();
        if lines.iter().any(|l| text(l).contains("log lines dropped")) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{kept} request lines kept and no note of the dropped ones"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    env.admin.delete("zero").await.unwrap();
    stop_clean(env).await;
}

/// A redeploy and then traffic shifts (50/50, then all to the new revision) while a burst
/// runs: nothing fails other than a 503 with Retry-After, both revisions answer during the
/// split, and the burst's last answers all come from the new revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redeploy_and_a_traffic_shift_during_a_burst_fail_nothing() {
    let env = up_with(|o| o.pool_size = 2).await;
    let image = push_hello(&env, "shift:v1").await;
    let mut req = DeployRequest::new(&image);
    req.max_scale = Some(3);
    req.env.insert("REV".into(), "one".into());
    env.admin.deploy("shift", &req).await.unwrap();
    let url = format!("{}/f/shift/env/REV", env.platform.url());
    assert_eq!(
        text(&get(&env.admin, "shift", "/env/REV").await),
        "REV=one\n"
    );

    let load = {
        let url = url.clone();
        tokio::spawn(async move { burst(&url, 6_000, 50, Duration::from_secs(60)).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Pin revision 1, deploy revision 2 beside it, split, then move everything over.
    env.admin
        .set_traffic(
            "shift",
            vec![TrafficTarget {
                revision: Some(1),
                percent: 100,
                tag: None,
            }],
        )
        .await
        .unwrap();
    req.env.insert("REV".into(), "two".into());
    env.admin.deploy("shift", &req).await.unwrap();
    let half = |r: u64| TrafficTarget {
        revision: Some(r),
        percent: 50,
        tag: None,
    };
    env.admin
        .set_traffic("shift", vec![half(1), half(2)])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.admin
        .set_traffic(
            "shift",
            vec![TrafficTarget {
                revision: None,
                percent: 100,
                tag: None,
            }],
        )
        .await
        .unwrap();
    let answers = load.await.unwrap();
    only_success_or_retry_later("redeploy and traffic shift", &answers);
    let bodies: BTreeMap<&str, usize> = answers.iter().fold(BTreeMap::new(), |mut m, a| {
        *m.entry(a.body.as_str()).or_insert(0) += 1;
        m
    });
    assert!(
        bodies.contains_key("REV=one\n") && bodies.contains_key("REV=two\n"),
        "{bodies:?}"
    );
    // After the shift, only revision 2 answers.
    for _ in 0..20 {
        assert_eq!(
            text(&get(&env.admin, "shift", "/env/REV").await),
            "REV=two\n"
        );
    }
    env.admin.delete("shift").await.unwrap();
    stop_clean(env).await;
}

/// A function that exits as soon as it starts, under a burst: every request fails fast with
/// the reason (or is told to retry later), none waits out the cold-start timeout, and no
/// sandbox is left assigned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_looping_function_under_a_burst_fails_fast_with_the_reason() {
    let env = up_with(|o| {
        o.pool_size = 2;
        o.cold_start_timeout = Duration::from_secs(20);
    })
    .await;
    let image = push_example(
        &env.platform.url(),
        env.platform.operator_token(),
        "crashloop:v1",
        &["/hello", "--exit", "3"],
    )
    .await;
    let mut req = DeployRequest::new(&image);
    req.max_scale = Some(4);
    env.admin.deploy("crashloop", &req).await.unwrap();
    let url = format!("{}/f/crashloop/", env.platform.url());
    let started = Instant::now();
    let answers = burst(&url, 400, 40, Duration::from_secs(20)).await;
    let took = started.elapsed();
    for a in &answers {
        let reasoned = a.status == 502 && a.body.contains("exit code 3");
        assert!(
            reasoned || (a.status == 503 && a.retry_after),
            "{a:?} (all: {:?})",
            by_status(&answers)
        );
        assert!(a.took < Duration::from_secs(10), "not fast: {a:?}");
    }
    assert!(
        answers.iter().any(|a| a.status == 502),
        "{:?}",
        by_status(&answers)
    );
    eprintln!(
        "400 requests to a crash-looping function: {:?} in {took:?}",
        by_status(&answers)
    );
    let assigned: Vec<serde_json::Value> = sandboxes(&env)
        .await
        .into_iter()
        .filter(|s| s["function"] == "crashloop")
        .collect();
    assert!(assigned.len() <= 4, "{assigned:?}");
    env.admin.delete("crashloop").await.unwrap();
    stop_clean(env).await;
}
