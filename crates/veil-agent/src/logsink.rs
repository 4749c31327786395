//! The sandbox's log, carried over the channel: the agent's own tracing output and the
//! function's stdout and stderr become records on one `L` substream (a VM has no stdout the
//! node could read, so nothing relies on one). Until the channel is up, the agent logs to its
//! stderr (a namespace sandbox's console, a VM's serial console).

use std::io::Write;
use std::sync::OnceLock;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use veil_proto::mux::MuxHandle;
use veil_proto::{LogSource, StreamKind};

/// Records queued for the node; beyond this the agent's own lines are dropped (never
/// blocking the agent) and the function's output waits (backpressure on its pipes).
const QUEUE: usize = 4096;

/// Longest line forwarded; the rest of a longer line is cut.
const MAX_LINE: usize = 8192;

static SINK: OnceLock<mpsc::Sender<Vec<u8>>> = OnceLock::new();

/// Open the log substream on `mux` and forward every record from now on.
pub async fn install(mux: &MuxHandle) -> std::io::Result<()> {
    let mut s = mux.open(StreamKind::Log).await?;
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(QUEUE);
    if SINK.set(tx).is_err() {
        return Ok(());
    }
    tokio::spawn(async move {
        while let Some(rec) = rx.recv().await {
            if s.write_all(&rec).await.is_err() {
                break;
            }
        }
    });
    Ok(())
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
                    let _ = tx.try_send(record(LogSource::Agent, line));
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
    let spawned = std::thread::Builder::new()
        .name("fn-log".into())
        .spawn(move || {
            use std::io::BufRead;
            let mut r = std::io::BufReader::new(pipe);
            let mut line = Vec::new();
            loop {
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
                        if tx.blocking_send(record(source, text)).is_err() {
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
