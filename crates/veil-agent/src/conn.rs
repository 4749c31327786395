//! The agent's connections to its function. The readiness probe's connection is not thrown
//! away: the first invocation goes over it, so the first request to a fresh instance pays
//! neither a TCP connect nor the function's accept of a new connection (for a function that
//! starts a thread or task per connection, as most do, that is most of what a first request
//! costs more than a warm one).

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// The probe's connection serves the first request only if it comes this soon after readiness
/// (a request waiting on the start comes within milliseconds; servers that drop connections
/// quiet before their first request do so after seconds, and a request sent as one does so
/// would be lost: hyper retries only on connections it reused).
const MAX_PRIMED_AGE: Duration = Duration::from_secs(1);

/// Connects to the function: hands out the readiness probe's connection once, then connects as
/// hyper's own connector does.
#[derive(Clone)]
pub(crate) struct PrimedConnector {
    primed: Arc<Mutex<Option<(TcpStream, Instant)>>>,
    inner: HttpConnector,
}

impl PrimedConnector {
    pub(crate) fn new() -> Self {
        let mut inner = HttpConnector::new();
        // Requests and responses are small and interactive: no Nagle delay between a request's
        // head and its body on a streamed request.
        inner.set_nodelay(true);
        Self {
            primed: Arc::default(),
            inner,
        }
    }

    /// Keep `conn` (the function's first accepted connection) for the first request.
    pub(crate) fn prime(&self, conn: TcpStream) {
        let _ = conn.set_nodelay(true);
        *self.primed.lock().unwrap_or_else(|p| p.into_inner()) = Some((conn, Instant::now()));
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Connecting = Pin<Box<dyn Future<Output = Result<TokioIo<TcpStream>, BoxError>> + Send>>;

impl tower_service::Service<http::Uri> for PrimedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Connecting;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let primed = self.primed.lock().unwrap_or_else(|p| p.into_inner()).take();
        match primed {
            // Only a fresh connection the function has not closed meanwhile: some servers
            // drop connections that stay quiet for a while, and a request sent as one does
            // so would be lost.
            Some((conn, at)) if at.elapsed() < MAX_PRIMED_AGE && still_open(&conn) => {
                Box::pin(async move { Ok(TokioIo::new(conn)) })
            }
            _ => {
                let fut = self.inner.call(uri);
                Box::pin(async move { fut.await.map_err(Into::into) })
            }
        }
    }
}

/// Whether the function still holds its end of `conn`: nothing to read and no end of stream.
fn still_open(conn: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    match conn.try_read(&mut b) {
        Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
        // End of stream (closed), or bytes the function sent unasked: not a clean connection.
        Ok(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server that answers every request on a connection with the connection's number, and
    /// closes the first connection unanswered if `close_first`.
    async fn server(close_first: bool) -> (u16, Arc<AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let a = accepted.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                let n = a.fetch_add(1, Ordering::SeqCst) + 1;
                if n == 1 && close_first {
                    drop(s);
                    continue;
                }
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {
                                let body = n.to_string();
                                let r = format!(
                                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                                    body.len()
                                );
                                if s.write_all(r.as_bytes()).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        (port, accepted)
    }

    async fn get(c: &Client<PrimedConnector, Empty<bytes::Bytes>>, port: u16) -> String {
        let r = c
            .request(
                http::Request::get(format!("http://127.0.0.1:{port}/"))
                    .body(Empty::new())
                    .unwrap(),
            )
            .await
            .unwrap();
        let b = r.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8_lossy(&b).into_owned()
    }

    #[tokio::test]
    async fn the_first_request_goes_over_the_probes_connection() {
        let (port, accepted) = server(false).await;
        let conn = PrimedConnector::new();
        conn.prime(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
        let c = Client::builder(TokioExecutor::new()).build(conn);
        assert_eq!(get(&c, port).await, "1");
        assert_eq!(get(&c, port).await, "1");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_probe_connection_the_function_closed_is_not_used() {
        let (port, accepted) = server(true).await;
        let conn = PrimedConnector::new();
        conn.prime(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
        // The server closes it.
        for _ in 0..100 {
            if accepted.load(Ordering::SeqCst) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let c = Client::builder(TokioExecutor::new()).build(conn);
        assert_eq!(get(&c, port).await, "2");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }
}
