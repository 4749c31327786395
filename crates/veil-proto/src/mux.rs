//! One byte stream split into many substreams (yamux), plus HTTP/1.1 over a substream.

use crate::StreamKind;
use futures::future::poll_fn;
use http_body_util::BodyExt;
use hyper::body::{Body, Incoming};
use hyper_util::rt::TokioIo;
use std::io;
use std::task::Poll;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

/// A substream usable with tokio I/O.
pub type Substream = Compat<yamux::Stream>;

/// Which end of the channel this is; the node is the client, the agent the server.
#[derive(Debug, Clone, Copy)]
pub enum Side {
    /// The node's end.
    Node,
    /// The agent's end.
    Agent,
}

type OpenReply = oneshot::Sender<Result<yamux::Stream, yamux::ConnectionError>>;

enum Cmd {
    Open(OpenReply),
    Close(oneshot::Sender<()>),
}

/// Handle to a running multiplexed channel: opens substreams; cheap to clone.
#[derive(Clone)]
pub struct MuxHandle {
    open_tx: mpsc::Sender<Cmd>,
    closed_rx: watch::Receiver<bool>,
}

/// Bytes buffered on each side of the channel's byte stream.
const CHANNEL_BUFFER: usize = 64 << 10;

/// Start multiplexing `io`. Returns the handle and the receiver of substreams the peer opens.
/// The driver runs on a tokio task until the stream ends or fails.
pub fn start<T>(io: T, side: Side) -> (MuxHandle, mpsc::UnboundedReceiver<Substream>)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mode = match side {
        Side::Node => yamux::Mode::Client,
        Side::Agent => yamux::Mode::Server,
    };
    let mut cfg = yamux::Config::default();
    cfg.set_max_num_streams(4096);
    // Buffered both ways: yamux writes a frame's header and body separately and reads a
    // header before its body; buffered, a frame is one write and one read takes whatever
    // frames have arrived (a syscall is most of what a small frame costs).
    let io = tokio::io::BufStream::with_capacity(CHANNEL_BUFFER, CHANNEL_BUFFER, io);
    let conn = yamux::Connection::new(io.compat(), cfg, mode);
    let (open_tx, open_rx) = mpsc::channel::<Cmd>(64);
    let (in_tx, in_rx) = mpsc::unbounded_channel();
    let (closed_tx, closed_rx) = watch::channel(false);
    tokio::spawn(async move {
        drive(conn, open_rx, in_tx).await;
        let _ = closed_tx.send(true);
    });
    (MuxHandle { open_tx, closed_rx }, in_rx)
}

async fn drive<T>(
    mut conn: yamux::Connection<T>,
    mut open_rx: mpsc::Receiver<Cmd>,
    in_tx: mpsc::UnboundedSender<Substream>,
) where
    T: futures::AsyncRead + futures::AsyncWrite + Unpin,
{
    let mut pending: Option<OpenReply> = None;
    let mut opens_done = false;
    let mut closing: Option<oneshot::Sender<()>> = None;
    poll_fn(|cx| loop {
        if let Some(done) = closing.take() {
            match conn.poll_close(cx) {
                Poll::Ready(_) => {
                    let _ = done.send(());
                    return Poll::Ready(());
                }
                Poll::Pending => {
                    closing = Some(done);
                    return Poll::Pending;
                }
            }
        }
        if pending.is_none() && !opens_done {
            match open_rx.poll_recv(cx) {
                Poll::Ready(Some(Cmd::Open(reply))) => pending = Some(reply),
                Poll::Ready(Some(Cmd::Close(done))) => {
                    closing = Some(done);
                    continue;
                }
                Poll::Ready(None) => opens_done = true,
                Poll::Pending => {}
            }
        }
        if let Some(reply) = pending.take() {
            match conn.poll_new_outbound(cx) {
                Poll::Ready(Ok(s)) => {
                    let _ = reply.send(Ok(s));
                    continue;
                }
                Poll::Ready(Err(e)) => {
                    tracing::debug!(error = %e, "channel failed while opening a substream");
                    let _ = reply.send(Err(e));
                    return Poll::Ready(());
                }
                Poll::Pending => pending = Some(reply),
            }
        }
        match conn.poll_next_inbound(cx) {
            Poll::Ready(Some(Ok(s))) => {
                // The receiver may be gone if the owner is shutting down; drop the stream then.
                let _ = in_tx.send(s.compat());
                continue;
            }
            Poll::Ready(Some(Err(e))) => {
                tracing::debug!(error = %e, "channel failed");
                return Poll::Ready(());
            }
            Poll::Ready(None) => return Poll::Ready(()),
            Poll::Pending => return Poll::Pending,
        }
    })
    .await
}

fn closed_err() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "sandbox channel is closed")
}

impl MuxHandle {
    /// Open a substream and announce what it carries.
    pub async fn open(&self, kind: StreamKind) -> io::Result<Substream> {
        let (tx, rx) = oneshot::channel();
        self.open_tx
            .send(Cmd::Open(tx))
            .await
            .map_err(|_| closed_err())?;
        let stream = rx
            .await
            .map_err(|_| closed_err())?
            .map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, e))?;
        let mut s = stream.compat();
        s.write_all(&[kind as u8]).await?;
        Ok(s)
    }

    /// Flush everything written so far and close the channel (yamux GoAway).
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.open_tx.send(Cmd::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// True once the channel has ended.
    pub fn is_closed(&self) -> bool {
        *self.closed_rx.borrow()
    }

    /// Resolves when the channel ends.
    pub async fn closed(&self) {
        let mut rx = self.closed_rx.clone();
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Send one HTTP/1.1 request on a fresh substream of `kind` and return the response head
    /// with its streaming body.
    pub async fn request<B>(
        &self,
        kind: StreamKind,
        req: hyper::Request<B>,
    ) -> io::Result<hyper::Response<Incoming>>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut sender = self.connect(kind).await?;
        sender.send_request(req).await.map_err(io::Error::other)
    }

    /// Open a substream of `kind` and start an HTTP/1.1 client connection on it (driven on
    /// its own task).
    async fn connect<B>(
        &self,
        kind: StreamKind,
    ) -> io::Result<hyper::client::conn::http1::SendRequest<B>>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let s = self.open(kind).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .map_err(io::Error::other)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "substream connection ended with an error");
            }
        });
        Ok(sender)
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body a [`SubstreamPool`] sends.
pub type ClientBody = http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, BoxError>;

type Sender = hyper::client::conn::http1::SendRequest<ClientBody>;

/// Idle substreams kept per pool; more, and the extra ones close when their response ends.
const MAX_IDLE: usize = 256;

/// HTTP/1.1 connections over substreams of one kind, kept alive between requests: a request
/// takes an idle one (the peer's server keeps it open) and opens a substream only when none is
/// idle. A connection goes back to the pool only once its response body has been read to the
/// end; one whose body was dropped half-way is closed.
#[derive(Clone)]
pub struct SubstreamPool {
    mux: MuxHandle,
    kind: StreamKind,
    idle: std::sync::Arc<std::sync::Mutex<Vec<Sender>>>,
}

impl SubstreamPool {
    fn take_idle(&self) -> Option<Sender> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    /// Send one request and return the response head with its streaming body.
    pub async fn request(
        &self,
        req: hyper::Request<ClientBody>,
    ) -> io::Result<hyper::Response<PooledBody>> {
        let mut sender = None;
        while let Some(mut s) = self.take_idle() {
            if s.is_closed() {
                continue;
            }
            if s.ready().await.is_ok() {
                sender = Some(s);
                break;
            }
        }
        let mut sender = match sender {
            Some(s) => s,
            None => self.mux.connect(self.kind).await?,
        };
        let resp = sender.send_request(req).await.map_err(io::Error::other)?;
        let pool = std::sync::Arc::downgrade(&self.idle);
        Ok(resp.map(|inner| PooledBody {
            inner,
            sender: Some(sender),
            pool,
            ended: false,
        }))
    }
}

/// A response body that gives its connection back to the pool once read to the end.
pub struct PooledBody {
    inner: Incoming,
    sender: Option<Sender>,
    pool: std::sync::Weak<std::sync::Mutex<Vec<Sender>>>,
    ended: bool,
}

impl PooledBody {
    fn give_back(&mut self) {
        if let (Some(s), Some(pool)) = (self.sender.take(), self.pool.upgrade()) {
            let mut idle = pool.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < MAX_IDLE && !s.is_closed() {
                idle.push(s);
            }
        }
    }
}

impl Body for PooledBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) => {
                self.ended = true;
                self.give_back();
            }
            Poll::Ready(Some(Err(_))) => self.sender = None,
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // Read to the end (a known length fully received counts): the connection is clean.
        if self.ended || self.inner.is_end_stream() {
            self.give_back();
        }
    }
}

impl MuxHandle {
    /// A pool of kept-alive HTTP/1.1 connections over substreams of `kind`.
    pub fn pool(&self, kind: StreamKind) -> SubstreamPool {
        SubstreamPool {
            mux: self.clone(),
            kind,
            idle: std::sync::Arc::default(),
        }
    }
}

/// Read the kind byte of a substream the peer opened.
pub async fn accept_kind(s: &mut Substream) -> io::Result<StreamKind> {
    let b = s.read_u8().await?;
    StreamKind::from_byte(b).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown substream kind byte {b:#04x}"),
        )
    })
}

/// Collect a response body, refusing more than `limit` bytes.
pub async fn read_body_limited(body: Incoming, limit: usize) -> io::Result<bytes::Bytes> {
    let limited = http_body_util::Limited::new(body, limit);
    limited
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    #[tokio::test]
    async fn substreams_both_ways() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (node, mut node_in) = start(a, Side::Node);
        let (agent, mut agent_in) = start(b, Side::Agent);
        // Agent side echoes kind byte + payload.
        tokio::spawn(async move {
            while let Some(mut s) = agent_in.recv().await {
                tokio::spawn(async move {
                    let k = accept_kind(&mut s).await.unwrap();
                    let mut buf = Vec::new();
                    s.read_to_end(&mut buf).await.unwrap();
                    s.write_all(&[k as u8]).await.unwrap();
                    s.write_all(&buf).await.unwrap();
                    s.shutdown().await.unwrap();
                });
            }
        });
        let mut s = node.open(StreamKind::Invoke).await.unwrap();
        s.write_all(b"hello").await.unwrap();
        s.shutdown().await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, b"Ihello");

        // And the other direction.
        let mut s2 = agent.open(StreamKind::Registry).await.unwrap();
        s2.shutdown().await.unwrap();
        let mut got = node_in.recv().await.unwrap();
        assert_eq!(accept_kind(&mut got).await.unwrap(), StreamKind::Registry);
    }

    #[tokio::test]
    async fn http_over_substream() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (node, _node_in) = start(a, Side::Node);
        let (_agent, mut agent_in) = start(b, Side::Agent);
        tokio::spawn(async move {
            while let Some(mut s) = agent_in.recv().await {
                tokio::spawn(async move {
                    let _ = accept_kind(&mut s).await.unwrap();
                    let svc =
                        hyper::service::service_fn(|req: hyper::Request<Incoming>| async move {
                            let body = read_body_limited(req.into_body(), 1024).await?;
                            Ok::<_, io::Error>(hyper::Response::new(Full::new(body)))
                        });
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await
                        .unwrap();
                });
            }
        });
        for i in 0..20 {
            let req = hyper::Request::post("/x")
                .body(Full::new(bytes::Bytes::from(format!("n{i}"))))
                .unwrap();
            let resp = node.request(StreamKind::Invoke, req).await.unwrap();
            let body = read_body_limited(resp.into_body(), 1024).await.unwrap();
            assert_eq!(body, format!("n{i}").as_bytes());
        }
    }

    /// The pool keeps one substream for sequential requests, opens more only for concurrent
    /// ones, and never gives back a connection whose response was dropped half-way.
    #[tokio::test]
    async fn pooled_substreams_are_reused_only_when_clean() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (node, _node_in) = start(a, Side::Node);
        let (_agent, mut agent_in) = start(b, Side::Agent);
        let opened = std::sync::Arc::new(AtomicUsize::new(0));
        let seen = opened.clone();
        tokio::spawn(async move {
            while let Some(mut s) = agent_in.recv().await {
                seen.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let _ = accept_kind(&mut s).await.unwrap();
                    let svc =
                        hyper::service::service_fn(|req: hyper::Request<Incoming>| async move {
                            let chunks = if req.uri().path() == "/long" { 64 } else { 1 };
                            let frames = futures::stream::iter((0..chunks).map(|i| {
                                Ok::<_, io::Error>(hyper::body::Frame::data(bytes::Bytes::from(
                                    format!("{i:04};").repeat(1024),
                                )))
                            }));
                            Ok::<_, io::Error>(hyper::Response::new(
                                http_body_util::StreamBody::new(frames),
                            ))
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        let pool = node.pool(StreamKind::Invoke);
        let get = |path: &str| {
            hyper::Request::get(path)
                .body(
                    http_body_util::Empty::new()
                        .map_err(|never| match never {})
                        .boxed_unsync(),
                )
                .unwrap()
        };
        for _ in 0..5 {
            let resp = pool.request(get("/x")).await.unwrap();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body.len(), 5 * 1024);
        }
        assert_eq!(
            opened.load(Ordering::SeqCst),
            1,
            "sequential requests reuse one"
        );
        // Two at once: a second substream, and both kept.
        let (r1, r2) = tokio::join!(pool.request(get("/x")), pool.request(get("/x")));
        let (b1, b2) = (r1.unwrap().into_body(), r2.unwrap().into_body());
        let _ = (b1.collect().await.unwrap(), b2.collect().await.unwrap());
        assert_eq!(opened.load(Ordering::SeqCst), 2);
        // A long answer dropped after its first frame: that connection is not reused.
        let before = opened.load(Ordering::SeqCst);
        let mut long = pool.request(get("/long")).await.unwrap().into_body();
        let first = long.frame().await.unwrap().unwrap();
        assert!(first.is_data());
        drop(long);
        for _ in 0..3 {
            let (a, b) = tokio::join!(pool.request(get("/x")), pool.request(get("/x")));
            let _ = a.unwrap().into_body().collect().await.unwrap();
            let _ = b.unwrap().into_body().collect().await.unwrap();
        }
        // One of the two kept connections carried the long answer and was closed: the second
        // of each concurrent pair needed one new substream, once.
        assert_eq!(opened.load(Ordering::SeqCst), before + 1);
    }

    #[tokio::test]
    async fn closed_channel_is_an_error() {
        let (a, b) = tokio::io::duplex(1024);
        let (node, _in) = start(a, Side::Node);
        drop(b);
        node.closed().await;
        assert!(node.is_closed());
        assert!(node.open(StreamKind::Control).await.is_err());
    }

    #[test]
    fn kind_bytes_round_trip() {
        for k in [
            StreamKind::Control,
            StreamKind::Invoke,
            StreamKind::Registry,
            StreamKind::Kbs,
        ] {
            assert_eq!(StreamKind::from_byte(k as u8), Some(k));
        }
        assert_eq!(StreamKind::from_byte(0), None);
    }
}
