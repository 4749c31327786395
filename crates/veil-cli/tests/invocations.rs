//! End-to-end tests of asynchronous invocations (`Prefer: respond-async`) on the real platform
//! (namespace sandboxes, the real agent, the example function), and of their durability under
//! `kill -9` of a real `veil up`. They need root (`make test`).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;
use tokio::time::Instant;
use veil_cli::client::AdminClient;
use veil_gateway::{DeployRequest, InvocationState, InvocationStatus};

fn prefer_async() -> BTreeMap<String, String> {
    BTreeMap::from([("prefer".to_string(), "respond-async".to_string())])
}

/// Invoke `name` asynchronously; the 202 and its id.
async fn accept(admin: &AdminClient, name: &str, path: &str, body: &[u8]) -> InvocationStatus {
    let r = admin
        .invoke(name, "POST", path, body.to_vec(), &prefer_async())
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{}", text(&r));
    assert_eq!(r.headers["preference-applied"], "respond-async");
    let s: InvocationStatus = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        r.headers["location"].to_str().unwrap(),
        format!("/v1/invocations/{}", s.id)
    );
    assert_eq!(s.state, InvocationState::Queued);
    assert_eq!(s.id.len(), 32);
    s
}

/// Poll until the invocation has finished.
async fn finished(admin: &AdminClient, id: &str, within: Duration) -> InvocationStatus {
    let deadline = Instant::now() + within;
    loop {
        let s = admin.invocation(id).await.unwrap();
        if matches!(
            s.state,
            InvocationState::Succeeded | InvocationState::Failed
        ) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "not finished within {within:?}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn body(s: &InvocationStatus) -> String {
    String::from_utf8_lossy(&s.response.as_ref().unwrap().body).into_owned()
}

/// The async path end to end: 202 with an id at once, the result later for the owner and the
/// operator only; bounded bodies and queue; a hung function is retried a bounded number of
/// times and then fails with the reason; deleting a function deletes its invocations; results
/// expire after the retention period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_invocations_run_later_retry_bounded_and_expire() {
    let env = up_with(|o| {
        o.invocations.max_attempts = 2;
        o.invocations.attempt_timeout = Duration::from_millis(1500);
        o.invocations.retry_backoff = Duration::from_millis(50);
        o.invocations.retention = Duration::from_secs(4);
        o.invocations.max_body = 4096;
        o.invocations.max_unfinished = 3;
    })
    .await;
    let image = push_hello(&env, "job:v1").await;
    env.admin
        .deploy("job", &DeployRequest::new(&image))
        .await
        .unwrap();
    let a = env.admin.create_token("a").await.unwrap();
    let as_a = AdminClient::new(&env.platform.url())
        .unwrap()
        .with_token(&a.token);

    // Accepted, then run: the stored request (method, path, query, headers, body) reaches it.
    let mut h = prefer_async();
    h.insert("x-trace".into(), "t1".into());
    let r = env
        .admin
        .invoke("job", "PUT", "/echo?q=1", b"payload".to_vec(), &h)
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{}", text(&r));
    let first: InvocationStatus = serde_json::from_slice(&r.body).unwrap();
    let done = finished(&env.admin, &first.id, Duration::from_secs(30)).await;
    assert_eq!(done.state, InvocationState::Succeeded, "{done:?}");
    assert_eq!(done.attempts, 1);
    assert_eq!(done.response.as_ref().unwrap().status, 200);
    assert_eq!(
        body(&done),
        "Hello from veil! PUT /echo?q=1 (7 bytes): payload\n"
    );
    // Another tenant, a made-up id and a malformed one: the same 404, nothing revealed.
    for (who, id) in [
        (&as_a, first.id.clone()),
        (&env.admin, "0".repeat(32)),
        (&env.admin, "../../v1/functions".to_string()),
    ] {
        let e = who.invocation(&id).await.unwrap_err().to_string();
        assert!(e.contains("INVOCATION_NOT_FOUND"), "{id}: {e}");
    }
    let anonymous = AdminClient::new(&env.platform.url()).unwrap();
    let e = anonymous
        .invocation(&first.id)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("401"), "{e}");

    // Refused at once, with the reason, and nothing stored.
    let r = env
        .admin
        .invoke("nope", "POST", "/", Vec::new(), &prefer_async())
        .await
        .unwrap();
    assert_eq!(r.status, 404, "{}", text(&r));
    let r = env
        .admin
        .invoke("job", "POST", "/", vec![b'x'; 4097], &prefer_async())
        .await
        .unwrap();
    assert_eq!(r.status, 413, "{}", text(&r));
    assert!(text(&r).contains("BODY_TOO_LARGE"), "{}", text(&r));
    let r = reqwest::Client::new()
        .post(format!("{}/f/job@nosuchtag/", env.platform.url()))
        .header("prefer", "respond-async")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // A function that hangs: each attempt times out, two are made, then it fails with why.
    // While those three wait, the queue (3) is full.
    env.admin
        .deploy("hang", &DeployRequest::new(&image))
        .await
        .unwrap();
    let mut hung = Vec::new();
    for _ in 0..3 {
        hung.push(accept(&env.admin, "hang", "/sleep/20000", b"").await);
    }
    let r = env
        .admin
        .invoke("job", "POST", "/", Vec::new(), &prefer_async())
        .await
        .unwrap();
    assert_eq!(r.status, 503, "{}", text(&r));
    assert_eq!(r.headers["retry-after"], "5");
    assert!(text(&r).contains("ASYNC_QUEUE_FULL"), "{}", text(&r));
    for h in &hung {
        let s = finished(&env.admin, &h.id, Duration::from_secs(30)).await;
        assert_eq!(s.state, InvocationState::Failed, "{s:?}");
        assert_eq!(s.attempts, 2, "{s:?}");
        let why = s.error.unwrap();
        assert!(
            why.contains("2 attempt(s) failed") && why.contains("no answer within"),
            "{why}"
        );
    }
    // The queue has room again.
    let later = accept(&env.admin, "job", "/later", b"").await;

    // A function deleted with an invocation waiting: the invocation goes with it.
    let waiting = accept(&env.admin, "hang", "/sleep/20000", b"").await;
    env.admin.delete("hang").await.unwrap();
    let e = env
        .admin
        .invocation(&waiting.id)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("INVOCATION_NOT_FOUND"), "{e}");

    // A tenant's own invocation: readable with its token (and the operator's), not another's.
    let a_image = push_example(&env.platform.url(), &a.token, "a-job:v1", &["/hello"]).await;
    as_a.deploy("afn", &DeployRequest::new(&a_image))
        .await
        .unwrap();
    let mine = accept(&as_a, "afn", "/mine", b"").await;
    let s = finished(&as_a, &mine.id, Duration::from_secs(30)).await;
    assert_eq!(s.state, InvocationState::Succeeded, "{s:?}");
    assert_eq!(body(&s), "Hello from veil! POST /mine (0 bytes)\n");
    env.admin.invocation(&mine.id).await.unwrap();
    let b = env.admin.create_token("b").await.unwrap();
    let as_b = AdminClient::new(&env.platform.url())
        .unwrap()
        .with_token(&b.token);
    let e = as_b.invocation(&mine.id).await.unwrap_err().to_string();
    assert!(e.contains("INVOCATION_NOT_FOUND"), "{e}");
    as_a.delete("afn").await.unwrap();

    let s = finished(&env.admin, &later.id, Duration::from_secs(30)).await;
    assert_eq!(s.state, InvocationState::Succeeded, "{s:?}");

    // Retention: the first result expires (4 s after it finished).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match env.admin.invocation(&first.id).await {
            Ok(_) => {
                assert!(Instant::now() < deadline, "the result did not expire");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => {
                assert!(e.to_string().contains("INVOCATION_NOT_FOUND"), "{e}");
                break;
            }
        }
    }
    env.admin.delete("job").await.unwrap();
    stop_clean(env).await;
}

fn veil_cli(url: &str, token: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_veil"))
        .args(args)
        .env("VEIL_SERVER", url)
        .env("VEIL_TOKEN", token)
        .env("VEIL_LOG", "warn")
        .output()
        .unwrap()
}

/// An invocation accepted by `veil invoke --async` survives `kill -9` of `veil up` in the
/// middle of its attempt: the next `veil up` runs it again (the interrupted attempt counted)
/// and `veil invocation get --wait` prints the result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accepted_invocation_survives_kill_9() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let port = veil_testkit::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut up = start_veil(&state, port, &[]);
    wait_up(&url).await;
    let token = std::fs::read_to_string(state.join("auth/operator.token")).unwrap();
    let token = token.trim().to_string();
    let admin = AdminClient::new(&url).unwrap().with_token(&token);
    let image = push_example(&url, &token, "durable:v1", &["/hello"]).await;
    admin
        .deploy("durable", &DeployRequest::new(&image))
        .await
        .unwrap();

    let out = veil_cli(
        &url,
        &token,
        &[
            "invoke",
            "durable",
            "--async",
            "--path",
            "/sleep/1500/kept",
            "-d",
            "body",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    // Killed while the attempt runs (it takes 1.5 s once the instance is up).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = admin.invocation(&id).await.unwrap();
        if s.state == InvocationState::Running {
            break;
        }
        assert_eq!(s.state, InvocationState::Queued, "{s:?}");
        assert!(Instant::now() < deadline, "never ran: {s:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    up.0.kill().unwrap();
    up.0.wait().unwrap();
    drop(up);

    let _up = start_veil(&state, port, &[]);
    wait_up(&url).await;
    let out = veil_cli(&url, &token, &["invocation", "get", &id, "--wait", "60"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "Hello from veil! POST /kept (4 bytes): body\n"
    );
    let s = admin.invocation(&id).await.unwrap();
    assert_eq!(s.state, InvocationState::Succeeded);
    assert_eq!(s.attempts, 2, "the interrupted attempt counts: {s:?}");
    // Unknown ids: exit 1 with the reason.
    let out = veil_cli(&url, &token, &["invocation", "get", &"f".repeat(32)]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("INVOCATION_NOT_FOUND"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
