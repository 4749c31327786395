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
#[derive(Default)]
pub struct LogBook {
    inner: Mutex<HashMap<Owner, VecDeque<Line>>>,
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
        let q = match m.get_mut(owner) {
            Some(q) => q,
            None => m.entry(owner.clone()).or_default(),
        };
        if q.len() >= KEEP {
            q.pop_front();
        }
        q.push_back(Line {
            sandbox: sandbox.to_string(),
            ts_ms,
            text,
        });
    }

    /// The last `n` lines of `tenant`'s function `function`.
    pub fn tail(&self, tenant: &str, function: &str, n: usize) -> Vec<Line> {
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&Owner::new(tenant, function))
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

    /// Forget the logs of `tenant`'s function `function` (another tenant's function of the
    /// same name keeps its lines).
    pub fn forget(&self, tenant: &str, function: &str) {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&Owner::new(tenant, function));
    }
}

/// Lines a sandbox may log in a burst before the rate limit applies.
pub const BURST_LINES: f64 = 500.0;
/// Lines per second a sandbox may log in the long run; the rest is dropped and counted.
pub const LINES_PER_SEC: f64 = 200.0;

/// A token bucket over log lines: whatever a guest writes, the node keeps at most
/// [`LINES_PER_SEC`] lines a second (after a burst of [`BURST_LINES`]) and says how many it
/// dropped. Time is a parameter, so tests need no clock.
#[derive(Debug)]
pub struct RateLimit {
    tokens: f64,
    last: std::time::Instant,
    dropped: u64,
}

/// What to do with one line.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Keep it.
    Keep,
    /// Keep it, after a note that `n` lines were dropped before it.
    KeepAfterDropping(u64),
    /// Drop it.
    Drop,
}

impl RateLimit {
    /// A full bucket at `now`.
    pub fn new(now: std::time::Instant) -> Self {
        Self {
            tokens: BURST_LINES,
            last: now,
            dropped: 0,
        }
    }

    /// Decide about one line arriving at `now`.
    pub fn admit(&mut self, now: std::time::Instant) -> Admit {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * LINES_PER_SEC).min(BURST_LINES);
        if self.tokens < 1.0 {
            self.dropped += 1;
            return Admit::Drop;
        }
        self.tokens -= 1.0;
        match std::mem::take(&mut self.dropped) {
            0 => Admit::Keep,
            n => Admit::KeepAfterDropping(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

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

    #[test]
    fn a_flood_is_cut_to_the_rate_and_counted() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(t0);
        let kept = (0..10_000).filter(|_| r.admit(t0) != Admit::Drop).count();
        assert_eq!(kept, BURST_LINES as usize);
        // One second later: the rate's worth again, and the first kept line reports the drops.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(
            r.admit(t1),
            Admit::KeepAfterDropping(10_000 - BURST_LINES as u64)
        );
        let more = (0..10_000).filter(|_| r.admit(t1) != Admit::Drop).count();
        assert_eq!(more + 1, LINES_PER_SEC as usize);
        // A quiet sandbox is never limited.
        let mut q = RateLimit::new(t0);
        for i in 0..1000u64 {
            assert_eq!(q.admit(t0 + Duration::from_millis(10 * i)), Admit::Keep);
        }
    }
}
