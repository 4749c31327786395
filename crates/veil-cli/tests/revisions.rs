//! End-to-end tests of revisions and traffic on the real platform (namespace sandboxes, the
//! real agent, the example function), and of the state database under `kill -9` of a real
//! `veil up`. They need root (`make test`).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::time::Instant;
use veil_cli::serving::{parse_split, parse_tag, rollback_traffic};
use veil_cli::{Platform, UpOptions};
use veil_gateway::{DeployRequest, TrafficTarget};

fn split(s: &[&str]) -> Vec<TrafficTarget> {
    s.iter()
        .map(|t| {
            if t.contains('=')
                && t.split('=').next().unwrap().parse::<u64>().is_err()
                && !t.starts_with('@')
            {
                parse_tag(t).unwrap()
            } else {
                parse_split(t).unwrap()
            }
        })
        .collect()
}

async fn bodies(env: &Env, name: &str, n: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let r = get(&env.admin, name, "/env/REV").await;
        assert_eq!(r.status, 200, "{}", text(&r));
        *seen.entry(text(&r)).or_insert(0) += 1;
    }
    seen
}

/// Every deploy is an immutable revision; traffic splits between them by percent, a tag
/// addresses one alone (path and Host forms), a pinned split ignores new deploys, a revision
/// that loses its traffic drains and its instance goes, rollback is one traffic change, and
/// all of it survives a restart. Bad traffic is refused with every reason and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revisions_split_traffic_tag_roll_back_and_survive_a_restart() {
    let env = up_with(|o| o.pool_size = 2).await;
    let image = push_hello(&env, "rev:v1").await;
    let mut req = DeployRequest::new(&image);
    req.env.insert("REV".into(), "one".into());
    assert_eq!(
        env.admin.deploy("rev", &req).await.unwrap().record.revision,
        1
    );
    req.env.insert("REV".into(), "two".into());
    let st = env.admin.deploy("rev", &req).await.unwrap();
    assert_eq!(st.record.revision, 2);
    assert_eq!(st.traffic.len(), 1);
    assert!(
        st.traffic[0].latest && st.traffic[0].revision == 2,
        "{st:?}"
    );
    assert_eq!(
        bodies(&env, "rev", 3).await.keys().collect::<Vec<_>>(),
        ["REV=two\n"]
    );

    // Half and half (by a fair draw: 40 requests on one side only is a 2^-39 event).
    let st = env
        .admin
        .set_traffic("rev", split(&["1=50", "@latest=50"]))
        .await
        .unwrap();
    assert!(st.revisions.iter().all(|r| r.live), "{:?}", st.revisions);
    let seen = bodies(&env, "rev", 40).await;
    assert_eq!(seen.len(), 2, "both revisions serve: {seen:?}");

    // Bad traffic: refused, with the reason, and nothing changes.
    for (bad, want) in [
        (split(&["1=50", "2=40"]), "sum to 90"),
        (split(&["9=100"]), "revision 9 does not exist"),
        (split(&["1=100", "Bad=2"]), "tag \"Bad\""),
        (Vec::new(), "at least one"),
    ] {
        let e = env.admin.set_traffic("rev", bad).await.unwrap_err();
        assert!(
            e.to_string().contains(want) && e.to_string().contains("BAD_TRAFFIC"),
            "{e}"
        );
    }
    let e = env
        .admin
        .set_traffic("nope", split(&["1=100"]))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("FUNCTION_NOT_FOUND"), "{e}");
    let raw = reqwest::Client::new()
        .put(format!("{}/v1/functions/rev/traffic", env.platform.url()))
        .bearer_auth(env.platform.operator_token())
        .body(r#"{"traffic": [{"percent": 100, "weight": 3}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 400);
    assert!(raw.text().await.unwrap().contains("unknown field `weight`"));
    assert_eq!(env.admin.function("rev").await.unwrap().traffic.len(), 2);

    // Another tenant sees no such function.
    let other = env.admin.create_token("other").await.unwrap();
    let as_other = veil_cli::client::AdminClient::new(&env.platform.url())
        .unwrap()
        .with_token(&other.token);
    let e = as_other
        .set_traffic("rev", split(&["1=100"]))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("FUNCTION_NOT_FOUND"), "{e}");

    // Pinned to 2, with revision 1 reachable by its tag only.
    let st = env
        .admin
        .set_traffic("rev", split(&["2=100", "old=1"]))
        .await
        .unwrap();
    assert!(
        st.revisions.iter().all(|r| r.live),
        "a tag keeps revision 1 live"
    );
    assert_eq!(
        bodies(&env, "rev", 5).await.keys().collect::<Vec<_>>(),
        ["REV=two\n"]
    );
    let tagged = get(&env.admin, "rev@old", "/env/REV").await;
    assert_eq!(text(&tagged), "REV=one\n");
    let by_host = reqwest::Client::new()
        .get(format!("{}/env/REV", env.platform.url()))
        .header("host", "old.rev.veil.localhost")
        .send()
        .await
        .unwrap();
    assert_eq!(by_host.text().await.unwrap(), "REV=one\n");
    let unknown = get(&env.admin, "rev@nope", "/").await;
    assert_eq!(unknown.status, 404);
    assert!(
        text(&unknown).contains("TAG_NOT_FOUND"),
        "{}",
        text(&unknown)
    );

    // A deploy while pinned creates revision 3 and takes no traffic.
    req.env.insert("REV".into(), "three".into());
    let st = env.admin.deploy("rev", &req).await.unwrap();
    assert_eq!(st.record.revision, 3);
    let r3 = st.revisions.iter().find(|r| r.revision == 3).unwrap();
    assert!(!r3.live && r3.percent == 0, "{r3:?}");
    assert_eq!(
        bodies(&env, "rev", 3).await.keys().collect::<Vec<_>>(),
        ["REV=two\n"]
    );

    // Roll back to 1: revision 2 loses its traffic, drains, and its instance is destroyed.
    let before = env.admin.function("rev").await.unwrap();
    let (to, traffic) = rollback_traffic(&before, None).unwrap();
    assert_eq!(to, 1);
    let two_ids: Vec<String> = before.instances.clone();
    let st = env.admin.set_traffic("rev", traffic).await.unwrap();
    assert!(!st.revisions.iter().find(|r| r.revision == 2).unwrap().live);
    assert_eq!(
        bodies(&env, "rev", 3).await.keys().collect::<Vec<_>>(),
        ["REV=one\n"]
    );
    let after = env.admin.function("rev").await.unwrap();
    let gone: Vec<String> = two_ids
        .into_iter()
        .filter(|id| !after.instances.contains(id))
        .collect();
    assert!(!gone.is_empty(), "revision 2's instance left routing");
    wait_destroyed(&env, &gone, Duration::from_secs(10)).await;
    assert!(
        rollback_traffic(&after, None).is_err(),
        "nothing older than 1 to roll back to"
    );

    // Restarted on the same state: revisions, traffic and tags are all there.
    let state_dir = env.state.path().join("state");
    let Env {
        platform, state, ..
    } = env;
    platform.stop().await.unwrap();
    let mut opts = UpOptions::defaults(state_dir);
    opts.listen = "127.0.0.1:0".parse().unwrap();
    opts.pool_size = 1;
    let platform = Platform::start(opts).await.unwrap();
    let admin = platform.admin_client().unwrap();
    let env = Env {
        platform,
        admin,
        state,
    };
    let st = env.admin.function("rev").await.unwrap();
    assert_eq!(
        st.revisions.iter().map(|r| r.revision).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(st.traffic, after.traffic);
    assert_eq!(
        bodies(&env, "rev", 2).await.keys().collect::<Vec<_>>(),
        ["REV=one\n"]
    );
    // Back to following deploys.
    env.admin
        .set_traffic("rev", split(&["@latest=100"]))
        .await
        .unwrap();
    assert_eq!(
        bodies(&env, "rev", 2).await.keys().collect::<Vec<_>>(),
        ["REV=three\n"]
    );
    env.admin.delete("rev").await.unwrap();
    // A name deployed again never reuses a revision number.
    req.env.insert("REV".into(), "four".into());
    assert_eq!(
        env.admin.deploy("rev", &req).await.unwrap().record.revision,
        4
    );
    env.admin.delete("rev").await.unwrap();
    stop_clean(env).await;
}

/// `veil up` killed with SIGKILL at arbitrary moments during a stream of deploys and traffic
/// changes: after each restart every acknowledged deploy is there, the traffic is the last
/// acknowledged change (or the one in flight at the kill), and the database opens cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_change_is_lost_to_kill_9() {
    const ROUNDS: u64 = 6;
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let port = veil_testkit::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut acked_revisions: Vec<u64> = Vec::new();
    let mut acked_traffic: Option<Vec<TrafficTarget>> = None;
    let mut image = String::new();
    for round in 0..ROUNDS {
        let mut up = start_veil(&state, port, &[]);
        wait_up(&url).await;
        let token = std::fs::read_to_string(state.join("auth/operator.token")).unwrap();
        let admin = veil_cli::client::AdminClient::new(&url)
            .unwrap()
            .with_token(token.trim());
        if round == 0 {
            image = push_example(&url, token.trim(), "crash:v1", &["/hello"]).await;
        } else {
            // What the previous round had acknowledged is all there.
            let st = admin.function("crash").await.unwrap();
            let have: Vec<u64> = st.revisions.iter().map(|r| r.revision).collect();
            // Every acknowledged revision not pruned since (at most MAX_REVISIONS are kept,
            // the oldest go first) is there, the newest always.
            let oldest = have.iter().min().copied().unwrap_or(0);
            for r in acked_revisions.iter().filter(|r| **r >= oldest) {
                assert!(
                    have.contains(r),
                    "round {round}: acknowledged revision {r} lost: {have:?}"
                );
            }
            let newest = *acked_revisions.last().unwrap();
            assert!(
                have.contains(&newest),
                "round {round}: {newest} not in {have:?}"
            );
            let traffic: Vec<TrafficTarget> = st
                .traffic
                .iter()
                .map(|t| TrafficTarget {
                    revision: (!t.latest).then_some(t.revision),
                    percent: t.percent,
                    tag: t.tag.clone(),
                })
                .collect();
            // The change in flight at the kill was a deploy, which leaves pinned traffic
            // alone: the traffic is exactly the last one acknowledged.
            assert_eq!(Some(&traffic), acked_traffic.as_ref(), "round {round}");
        }
        // Changes, each acknowledged before the next, until the kill lands at a moment
        // chosen by the round.
        let kill_after = Duration::from_millis(150 + 97 * round);
        let started = Instant::now();
        let mut n = 0u64;
        while started.elapsed() < kill_after {
            let mut req = DeployRequest::new(&image);
            req.env.insert("N".into(), format!("{round}-{n}"));
            match admin.deploy("crash", &req).await {
                Ok(st) => acked_revisions.push(st.record.revision),
                Err(e) => panic!("deploy failed while veil was up: {e}"),
            }
            let rev = *acked_revisions.last().unwrap();
            let t = vec![TrafficTarget {
                revision: Some(rev),
                percent: 100,
                tag: Some(format!("t{n}")),
            }];
            admin.set_traffic("crash", t.clone()).await.unwrap();
            acked_traffic = Some(t);
            n += 1;
        }
        // A change in flight when the kill lands.
        let admin2 = admin.clone();
        let image2 = image.clone();
        let inflight = tokio::spawn(async move {
            let _ = admin2.deploy("crash", &DeployRequest::new(&image2)).await;
        });
        tokio::time::sleep(Duration::from_millis(3 * round)).await;
        // Child::kill is SIGKILL.
        up.0.kill().unwrap();
        up.0.wait().unwrap();
        let _ = inflight.await;
        assert!(
            n > 0,
            "round {round}: no change was acknowledged before the kill"
        );
    }
    // Last: it still opens, with everything.
    let _up = start_veil(&state, port, &[]);
    wait_up(&url).await;
    let token = std::fs::read_to_string(state.join("auth/operator.token")).unwrap();
    let admin = veil_cli::client::AdminClient::new(&url)
        .unwrap()
        .with_token(token.trim());
    let st = admin.function("crash").await.unwrap();
    let have: Vec<u64> = st.revisions.iter().map(|r| r.revision).collect();
    // At most 50 are kept; the pinned one and the newest are always among them.
    let newest = *acked_revisions.last().unwrap();
    assert!(have.contains(&newest), "{newest} not in {have:?}");
    assert!(have.len() <= veil_gateway::MAX_REVISIONS, "{}", have.len());
}
