//! A minimal QMP client (QEMU Machine Protocol: JSON objects, one per line, over a unix
//! socket): the greeting, `qmp_capabilities`, commands, and waiting for events.

use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Longest QMP message read; QEMU's are far smaller, a longer one means a confused peer.
const MAX_LINE: usize = 64 << 10;

/// Errors of the QMP conversation.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket failed or closed.
    #[error("QMP {0}")]
    Io(String),
    /// QEMU answered something unexpected.
    #[error("QMP protocol: {0}")]
    Protocol(String),
}

/// One QMP connection in command mode.
pub struct Qmp {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl Qmp {
    /// Connect to `path`, retrying until `deadline` while QEMU creates the socket, and enter
    /// command mode.
    pub async fn connect(path: &Path, deadline: tokio::time::Instant) -> Result<Self, QmpError> {
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(QmpError::Io(format!("connect {}: {e}", path.display())))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        };
        let (r, w) = stream.into_split();
        let mut q = Self {
            reader: BufReader::new(r),
            writer: w,
        };
        let greeting = q.read().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!("no greeting: {greeting}")));
        }
        q.execute("qmp_capabilities", serde_json::json!({})).await?;
        Ok(q)
    }

    async fn read(&mut self) -> Result<serde_json::Value, QmpError> {
        let mut line = Vec::new();
        loop {
            let buf = self
                .reader
                .fill_buf()
                .await
                .map_err(|e| QmpError::Io(e.to_string()))?;
            if buf.is_empty() {
                return Err(QmpError::Io("connection closed".into()));
            }
            let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (&buf[..=i], true),
                None => (buf, false),
            };
            line.extend_from_slice(chunk);
            let n = chunk.len();
            self.reader.consume(n);
            if line.len() > MAX_LINE {
                return Err(QmpError::Protocol("message too long".into()));
            }
            if done {
                return serde_json::from_slice(&line)
                    .map_err(|e| QmpError::Protocol(format!("not JSON: {e}")));
            }
        }
    }

    /// Run a command and return its `return` value (events read meanwhile are dropped).
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: serde_json::Value,
    ) -> Result<serde_json::Value, QmpError> {
        let mut msg = serde_json::to_vec(&serde_json::json!({
            "execute": command, "arguments": arguments,
        }))
        .map_err(|e| QmpError::Protocol(e.to_string()))?;
        msg.push(b'\n');
        self.writer
            .write_all(&msg)
            .await
            .map_err(|e| QmpError::Io(e.to_string()))?;
        loop {
            let v = self.read().await?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(QmpError::Protocol(format!("{command}: {e}")));
            }
        }
    }

    /// Wait for an event named `event` whose `data` satisfies `want`.
    pub async fn wait_event(
        &mut self,
        event: &str,
        want: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value, QmpError> {
        loop {
            let v = self.read().await?;
            if v.get("event").and_then(|e| e.as_str()) == Some(event) {
                let data = v.get("data").cloned().unwrap_or_default();
                if want(&data) {
                    return Ok(data);
                }
            }
        }
    }
}
