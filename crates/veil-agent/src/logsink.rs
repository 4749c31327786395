//! The sandbox's log, carried over the channel: the agent's own tracing output and the
//! function's stdout and stderr become records on one `L` substream (a VM has no stdout the
//! node could read, so nothing relies on one). Until the channel is up, the agent logs to its
//! stderr (a namespace sandbox's console, a VM's serial console).

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};
use veil_proto::loglimit::{Admit, RateLimit};
use veil_proto::mux::MuxHandle;
use veil_proto::{LogSource, StreamKind};

/// Records queued for the node; beyond this the agent's own lines are dropped (never
/// blocking the agent) and the function's output waits (backpressure on its pipes).
const QUEUE: usize = 4096;

/// Longest line forwarded; the rest of a longer line is cut.
const MAX_LINE: usize = 8192;

/// What the log writer is sent.
enum Msg {
    /// One or more records.
    Rec(Vec<u8>),
    /// Write out everything queued before this, then answer.
    Flush(oneshot::Sender<()>),
}

static SINK: OnceLock<mpsc::Sender<Msg>> = OnceLock::new();

/// Pipe forwarders still running (the function's stdout and stderr until it closes them).
static FORWARDING: AtomicUsize = AtomicUsize::new(0);

/// Open the log substream on `mux` and forward every record from now on.
pub async fn install(mux: &MuxHandle) -> std::io::Result<()> {
    let mut s = mux.open(StreamKind::Log).await?;
    let (tx, mut rx) = mpsc::channel::<Msg>(QUEUE);
    if SINK.set(tx).is_err() {
        return Ok(());
    }
    tokio::spawn(async move {
        // Whatever is queued goes in one write (one frame on the channel), not one per line.
        let mut batch = Vec::new();
        let mut acks = Vec::new();
        let mut tick = tokio::time::interval(veil_proto::loglimit::REPORT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            batch.clear();
            let first = tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => m,
                    None => break,
                },
                _ = tick.tick() => {
                    // A flood that stopped: no later line reports its drops, so the clock does.
                    let n = limiter().take_report(Instant::now());
                    match n {
                        Some(n) => Msg::Rec(dropped_note(n)),
                        None => continue,
                    }
                }
            };
            let mut next = Some(first);
            while let Some(m) = next.take() {
                match m {
                    Msg::Rec(rec) => batch.extend_from_slice(&rec),
                    Msg::Flush(ack) => acks.push(ack),
                }
                if batch.len() < BATCH_BYTES {
                    next = rx.try_recv().ok();
                }
            }
            if !batch.is_empty() && s.write_all(&batch).await.is_err() {
                break;
            }
            if !acks.is_empty() {
                let _ = s.flush().await;
                for ack in acks.drain(..) {
                    let _ = ack.send(());
                }
            }
        }
    });
    Ok(())
}

/// Wait (at most `within`) until the function's output is all forwarded: its pipes closed and
/// every record written to the channel. The last words of a function that exits are often
/// the ones that say why.
pub async fn drain(within: std::time::Duration) {
    let deadline = tokio::time::Instant::now() + within;
    while FORWARDING.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    if let Some(tx) = SINK.get() {
        let (ack, done) = oneshot::channel();
        if tx.send(Msg::Flush(ack)).await.is_ok() {
            let _ = tokio::time::timeout_at(deadline, done).await;
        }
    }
}

/// How long the function's output gathers in its pipe between two reads.
const GATHER: std::time::Duration = std::time::Duration::from_millis(10);

/// Queued records written to the channel at once, at most (about).
const BATCH_BYTES: usize = 64 << 10;

static LIMIT: OnceLock<Mutex<RateLimit>> = OnceLock::new();

fn limiter() -> std::sync::MutexGuard<'static, RateLimit> {
    LIMIT
        .get_or_init(|| Mutex::new(RateLimit::new(Instant::now())))
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

fn dropped_note(n: u64) -> Vec<u8> {
    record(
        LogSource::Agent,
        format!("{n} log lines dropped in the sandbox (rate limit)").as_bytes(),
    )
}

/// Send one record of `source` to the node, within the rate limit the node applies too: a
/// line the node would drop is dropped here, before it costs a frame on the channel. `wait`
/// makes a full queue block (the function's pipes: a slow node slows the function); without
/// it a full queue drops the line (the agent's own log never blocks the agent).
fn send(tx: &mpsc::Sender<Msg>, source: LogSource, line: &[u8], wait: bool) -> bool {
    let admit = limiter().admit(Instant::now());
    let mut rec = match admit {
        Admit::Drop => return true,
        Admit::Keep => Vec::new(),
        Admit::KeepAfterDropping(n) => dropped_note(n),
    };
    rec.extend_from_slice(&record(source, line));
    if wait {
        tx.blocking_send(Msg::Rec(rec)).is_ok()
    } else {
        let _ = tx.try_send(Msg::Rec(rec));
        true
    }
}

fn record(source: LogSource, line: &[u8]) -> Vec<u8> {
    veil_proto::log_record(source, &line[..line.len().min(MAX_LINE)])
}

/// A `tracing` writer: lines go to the channel once it is up, to stderr before.
pub struct AgentLog {
    buf: Vec<u8>,
}

impl AgentLog {
    fn emit(&mut self) {
        let mut text = std::mem::take(&mut self.buf);
        while text.last() == Some(&b'\n') {
            text.pop();
        }
        if text.is_empty() {
            return;
        }
        match SINK.get() {
            // Never block the agent on its own log: a full queue drops the line.
            Some(tx) => {
                for line in text.split(|&b| b == b'\n') {
                    send(tx, LogSource::Agent, line, false);
                }
            }
            None => {
                text.push(b'\n');
                let _ = std::io::stderr().write_all(&text);
            }
        }
    }
}

impl Write for AgentLog {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for AgentLog {
    fn drop(&mut self) {
        self.emit();
    }
}

/// The `MakeWriter` for the agent's subscriber.
pub fn agent_writer() -> AgentLog {
    AgentLog { buf: Vec::new() }
}

/// Forward what the function writes to `pipe` as `source` records, line by line, until the
/// function closes it. Runs on its own thread; a slow node makes the function wait.
pub fn forward_pipe(pipe: std::io::PipeReader, source: LogSource) {
    struct Running;
    impl Drop for Running {
        fn drop(&mut self) {
            FORWARDING.fetch_sub(1, Ordering::SeqCst);
        }
    }
    FORWARDING.fetch_add(1, Ordering::SeqCst);
    let running = Running;
    let spawned = std::thread::Builder::new()
        .name("fn-log".into())
        .spawn(move || {
            let _running = running;
            use std::io::BufRead;
            let mut r = std::io::BufReader::with_capacity(64 << 10, pipe);
            let mut line = Vec::new();
            loop {
                // Everything read is forwarded; before the next read, a pause lets lines
                // gather, so that a function logging every request costs a read and a wake-up
                // every few milliseconds, not per line (the pipe holds far more than the
                // rate limit lets through meanwhile).
                if r.buffer().is_empty() {
                    std::thread::sleep(GATHER);
                }
                line.clear();
                // Bounded: a line without a newline is cut into MAX_LINE pieces.
                let n = match std::io::Read::take(&mut r, MAX_LINE as u64)
                    .read_until(b'\n', &mut line)
                {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let text = if line.ends_with(b"\n") {
                    &line[..n - 1]
                } else {
                    &line[..n]
                };
                match SINK.get() {
                    Some(tx) => {
                        if !send(tx, source, text, true) {
                            break;
                        }
                    }
                    None => {
                        let _ = std::io::stderr().write_all(&record(source, text));
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the function log forwarder");
    }
}
