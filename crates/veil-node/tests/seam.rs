//! The node against agents it must not trust to be what it expects, through a test backend
//! whose channel is an in-memory byte stream: an agent speaking another protocol version is
//! refused with both versions named, and a channel carrying garbage (or a flood of it) ends
//! with the sandbox destroyed. No root, no cgroups.
#![allow(clippy::unwrap_used)]

use futures::future::{BoxFuture, FutureExt};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use veil_sandbox::{Backend, Error, Exit, Sandbox, SandboxHandle, SandboxSpec};

#[derive(Clone, Copy)]
enum Agent {
    /// Answers `/health` with this protocol version.
    Protocol(u32),
    /// Writes this many bytes of garbage, then keeps the stream open.
    Garbage(usize),
}

struct TestBackend {
    agent: Agent,
    created: AtomicUsize,
    destroyed: Arc<AtomicUsize>,
}

struct TestHandle {
    destroyed: Arc<AtomicUsize>,
    done: AtomicBool,
    exit: tokio::sync::watch::Sender<bool>,
}

impl SandboxHandle for TestHandle {
    fn destroy(&self) -> BoxFuture<'_, Result<(), Error>> {
        async move {
            if !self.done.swap(true, Ordering::SeqCst) {
                self.destroyed.fetch_add(1, Ordering::SeqCst);
            }
            let _ = self.exit.send(true);
            Ok(())
        }
        .boxed()
    }
    fn exited(&self) -> BoxFuture<'_, Exit> {
        let mut rx = self.exit.subscribe();
        async move {
            let _ = rx.wait_for(|e| *e).await;
            Exit::Signal(9)
        }
        .boxed()
    }
    fn leftovers(&self) -> Vec<String> {
        Vec::new()
    }
    fn pids(&self) -> Vec<u32> {
        Vec::new()
    }
}

async fn fake_agent(io: tokio::io::DuplexStream, agent: Agent) {
    match agent {
        Agent::Protocol(version) => {
            let (_mux, mut incoming) = veil_proto::mux::start(io, veil_proto::mux::Side::Agent);
            while let Some(mut s) = incoming.recv().await {
                tokio::spawn(async move {
                    let _ = veil_proto::mux::accept_kind(&mut s).await;
                    let svc = hyper::service::service_fn(move |_req| async move {
                        let body = serde_json::to_vec(&veil_proto::Health {
                            protocol: version,
                            agent: "0.0.1-old".into(),
                            platform: "guest".into(),
                        })
                        .unwrap();
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from(body)),
                        ))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
                });
            }
        }
        Agent::Garbage(n) => {
            let mut io = io;
            let junk: Vec<u8> = (0..64 << 10).map(|i| (i * 7 + 3) as u8).collect();
            let mut sent = 0;
            while sent < n {
                if io.write_all(&junk).await.is_err() {
                    return;
                }
                sent += junk.len();
            }
            // Keep the stream open: the node must not wait for the agent to close it.
            std::future::pending::<()>().await;
        }
    }
}

impl Backend for TestBackend {
    fn name(&self) -> &'static str {
        "test"
    }
    fn boot_timeout(&self) -> Duration {
        Duration::from_secs(2)
    }
    fn create(&self, spec: SandboxSpec) -> BoxFuture<'_, Result<Sandbox, Error>> {
        async move {
            self.created.fetch_add(1, Ordering::SeqCst);
            let (node_end, agent_end) = tokio::io::duplex(1 << 16);
            tokio::spawn(fake_agent(agent_end, self.agent));
            Ok(Sandbox {
                id: spec.id,
                channel: Box::new(node_end),
                console: None,
                handle: Box::new(TestHandle {
                    destroyed: self.destroyed.clone(),
                    done: AtomicBool::new(false),
                    exit: tokio::sync::watch::channel(false).0,
                }),
            })
        }
        .boxed()
    }
}

/// Captured log output of this test process.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture() -> Captured {
    let c = Captured::default();
    let w = c.clone();
    let _ = tracing_subscriber::fmt()
        .with_writer(move || w.clone())
        .with_ansi(false)
        .try_init();
    c
}

async fn node_with(agent: Agent) -> (Arc<veil_node::Node>, Arc<TestBackend>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = veil_node::NodeConfig::with_state_dir(dir.path().to_path_buf());
    cfg.pool_size = 1;
    let backend = Arc::new(TestBackend {
        agent,
        created: AtomicUsize::new(0),
        destroyed: Arc::new(AtomicUsize::new(0)),
    });
    let node = veil_node::Node::with_backend(cfg, backend.clone()).unwrap();
    (node, backend, dir)
}

/// Wait (bounded, as a guard against a hang — not a timing assertion) until `f` holds.
async fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..3000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what} never happened");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_of_another_protocol_is_refused_naming_both_versions() {
    let log = capture();
    let (node, backend, _dir) = node_with(Agent::Protocol(1)).await;
    node.fill_pool().await;
    assert_eq!(node.pooled().await, 0);
    assert!(backend.created.load(Ordering::SeqCst) >= 1);
    eventually("the sandbox was destroyed", || {
        backend.destroyed.load(Ordering::SeqCst) >= 1
    })
    .await;
    let text = String::from_utf8_lossy(&log.0.lock().unwrap()).into_owned();
    assert!(
        text.contains("speaks protocol 1 (agent 0.0.1-old, guest)")
            && text.contains(&format!(
                "this node speaks protocol {}",
                veil_proto::PROTOCOL_VERSION
            )),
        "{text}"
    );
    assert!(node.sandboxes().is_empty());
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_of_garbage_or_a_flood_ends_with_the_sandbox_destroyed() {
    for n in [100, 64 << 20] {
        let (node, backend, _dir) = node_with(Agent::Garbage(n)).await;
        node.fill_pool().await;
        assert_eq!(node.pooled().await, 0, "{n} bytes of garbage");
        eventually("the sandbox was destroyed", || {
            backend.destroyed.load(Ordering::SeqCst) >= 1
        })
        .await;
        assert!(node.sandboxes().is_empty());
        node.shutdown().await;
    }
}
