//! Function logs: the last lines each function's sandboxes wrote, kept in memory per tenant
//! and function (a function name is unique only among the live deployments: once one
//! tenant's function is deleted, another tenant may deploy one of the same name while the
//! first one's sandboxes still drain, and neither sees or clears the other's lines).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// Lines kept per (tenant, function).
pub const KEEP: usize = 2000;

/// One log line.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Line {
    /// Its place among all lines the node kept (increasing; a follower asks for the lines
    /// after the last one it has).
    pub seq: u64,
    /// Sandbox that wrote it.
    pub sandbox: String,
    /// Unix time in milliseconds.
    pub ts_ms: u128,
    /// The text.
    pub text: String,
}

/// Whose lines: the tenant and the function a sandbox was assigned to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Owner {
    /// The function's tenant.
    pub tenant: String,
    /// The function's name.
    pub function: String,
}

impl Owner {
    /// The owner of `tenant`'s function `function`.
    pub fn new(tenant: &str, function: &str) -> Self {
        Self {
            tenant: tenant.to_string(),
            function: function.to_string(),
        }
    }

    /// Where the lines of a sandbox not assigned yet go (only [`LogBook::tail_sandbox`]
    /// reads them: `-` is no function name).
    pub fn unassigned() -> Self {
        Self::new("-", "-")
    }
}

/// Ring buffers of log lines, one per (tenant, function).
pub struct LogBook {
    inner: Mutex<Book>,
    /// The newest line's `seq`, for followers waiting for lines.
    newest: tokio::sync::watch::Sender<u64>,
}

#[derive(Default)]
struct Book {
    lines: HashMap<Owner, VecDeque<Line>>,
    seq: u64,
}

impl Default for LogBook {
    fn default() -> Self {
        Self {
            inner: Mutex::default(),
            newest: tokio::sync::watch::channel(0).0,
        }
    }
}

impl LogBook {
    /// Append a line of `owner`'s function (lines longer than 8 KiB are cut).
    pub fn push(&self, owner: &Owner, sandbox: &str, text: &str) {
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
        m.seq += 1;
        let seq = m.seq;
        let q = match m.lines.get_mut(owner) {
            Some(q) => q,
            None => m.lines.entry(owner.clone()).or_default(),
        };
        if q.len() >= KEEP {
            q.pop_front();
        }
        q.push_back(Line {
            seq,
            sandbox: sandbox.to_string(),
            ts_ms,
            text,
        });
        drop(m);
        self.newest.send_replace(seq);
    }

    /// At most `n` of `tenant`'s function `function`'s lines after `after` (by `seq`), oldest
    /// first.
    pub fn after(&self, tenant: &str, function: &str, after: u64, n: usize) -> Vec<Line> {
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        m.lines
            .get(&Owner::new(tenant, function))
            .map(|q| {
                let start = q.partition_point(|l| l.seq <= after);
                q.iter().skip(start).take(n).cloned().collect()
            })
            .unwrap_or_default()
    }

    /// Wakes when any line is kept.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.newest.subscribe()
    }

    /// The last `n` lines of `tenant`'s function `function`.
    pub fn tail(&self, tenant: &str, function: &str, n: usize) -> Vec<Line> {
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        m.lines
            .get(&Owner::new(tenant, function))
            .map(|q| q.iter().skip(q.len().saturating_sub(n)).cloned().collect())
            .unwrap_or_default()
    }

    /// The last `n` lines any function logged from one sandbox (for error messages).
    pub fn tail_sandbox(&self, sandbox: &str, n: usize) -> Vec<String> {
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<String> = m
            .lines
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

    /// Forget the logs of `tenant`'s function `function` (another tenant's function of the
    /// same name keeps its lines).
    pub fn forget(&self, tenant: &str, function: &str) {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .lines
            .remove(&Owner::new(tenant, function));
    }
}

pub use veil_proto::loglimit::{Admit, RateLimit, BURST_LINES, LINES_PER_SEC};

#[cfg(test)]
mod tests {
    use super::*;

    /// A follower reads each line once, in order, from where it left off; other functions'
    /// lines do not show up, and a line kept wakes it.
    #[test]
    fn followers_continue_after_the_last_line_they_have() {
        let book = LogBook::default();
        let me = Owner::new("t", "f");
        let rx = book.subscribe();
        for i in 0..5 {
            book.push(&me, "sb", &format!("line {i}"));
            book.push(&Owner::new("t", "other"), "sb2", "noise");
        }
        assert!(rx.has_changed().unwrap());
        let first = book.after("t", "f", 0, 3);
        assert_eq!(
            first.iter().map(|l| l.text.as_str()).collect::<Vec<_>>(),
            ["line 0", "line 1", "line 2"]
        );
        let rest = book.after("t", "f", first[2].seq, 100);
        assert_eq!(
            rest.iter().map(|l| l.text.as_str()).collect::<Vec<_>>(),
            ["line 3", "line 4"]
        );
        assert!(book.after("t", "f", rest[1].seq, 100).is_empty());
        assert!(book.after("t", "nobody", 0, 100).is_empty());
    }

    /// Two tenants' functions of one name have separate logs: neither reads the other's
    /// lines, and forgetting one leaves the other's alone.
    #[test]
    fn logs_are_kept_per_tenant_and_function() {
        let book = LogBook::default();
        let alice = Owner::new("alice", "shared");
        let bob = Owner::new("bob", "shared");
        book.push(&alice, "sb-a", "GET /alice/private/path");
        book.push(&bob, "sb-b", "GET /bob");
        let texts = |tenant: &str| -> Vec<String> {
            book.tail(tenant, "shared", 10)
                .into_iter()
                .map(|l| l.text)
                .collect()
        };
        assert_eq!(texts("alice"), ["GET /alice/private/path"]);
        assert_eq!(texts("bob"), ["GET /bob"]);
        book.forget("alice", "shared");
        assert!(texts("alice").is_empty());
        assert_eq!(
            texts("bob"),
            ["GET /bob"],
            "alice's delete cleared bob's logs"
        );
        assert!(book.tail("carol", "shared", 10).is_empty());
    }
}
