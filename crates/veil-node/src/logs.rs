//! Function logs: the last lines each function's sandboxes wrote, kept in memory.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// Lines kept per function.
pub const KEEP: usize = 2000;

/// One log line.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Line {
    /// Sandbox that wrote it.
    pub sandbox: String,
    /// Unix time in milliseconds.
    pub ts_ms: u128,
    /// The text.
    pub text: String,
}

/// Per-function ring buffers of log lines.
#[derive(Default)]
pub struct LogBook {
    inner: Mutex<HashMap<String, VecDeque<Line>>>,
}

impl LogBook {
    /// Append a line (lines longer than 8 KiB are cut).
    pub fn push(&self, function: &str, sandbox: &str, text: &str) {
        let mut text = text.to_string();
        if text.len() > 8192 {
            let mut cut = 8192;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        let ts_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let q = m.entry(function.to_string()).or_default();
        if q.len() >= KEEP {
            q.pop_front();
        }
        q.push_back(Line {
            sandbox: sandbox.to_string(),
            ts_ms,
            text,
        });
    }

    /// The last `n` lines of a function.
    pub fn tail(&self, function: &str, n: usize) -> Vec<Line> {
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        m.get(function)
            .map(|q| q.iter().skip(q.len().saturating_sub(n)).cloned().collect())
            .unwrap_or_default()
    }

    /// The last `n` lines any function logged from one sandbox (for error messages).
    pub fn tail_sandbox(&self, sandbox: &str, n: usize) -> Vec<String> {
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<String> = m
            .values()
            .flat_map(|q| {
                q.iter()
                    .filter(|l| l.sandbox == sandbox)
                    .map(|l| l.text.clone())
            })
            .collect();
        let skip = v.len().saturating_sub(n);
        v.drain(..skip);
        v
    }

    /// Forget a function's logs.
    pub fn forget(&self, function: &str) {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(function);
    }
}
