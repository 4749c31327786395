//! The log rate limit both ends of the channel apply: the agent, so that lines the node would
//! drop never cross the channel (a function that logs every request would otherwise spend
//! more on its log than on its requests), and the node, which enforces it whatever a guest
//! sends. Time is a parameter, so tests need no clock.

use std::time::{Duration, Instant};

/// Lines a sandbox may log in a burst before the rate limit applies.
pub const BURST_LINES: f64 = 500.0;
/// Lines per second a sandbox may log in the long run; the rest is dropped and counted.
pub const LINES_PER_SEC: f64 = 200.0;
/// Dropped lines are reported at most this often, so that a steady flood leaves a note a
/// second in the log, not one beside every line kept.
pub const REPORT_EVERY: Duration = Duration::from_secs(1);

/// A token bucket over log lines: at most [`LINES_PER_SEC`] lines a second after a burst of
/// [`BURST_LINES`], and a count of the dropped ones.
#[derive(Debug)]
pub struct RateLimit {
    tokens: f64,
    last: Instant,
    dropped: u64,
    reported: Instant,
}

/// What to do with one line.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Keep it.
    Keep,
    /// Keep it, after a note that `n` lines were dropped since the last note.
    KeepAfterDropping(u64),
    /// Drop it.
    Drop,
}

impl RateLimit {
    /// A full bucket at `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            tokens: BURST_LINES,
            last: now,
            dropped: 0,
            reported: now,
        }
    }

    /// Decide about one line arriving at `now`.
    pub fn admit(&mut self, now: Instant) -> Admit {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * LINES_PER_SEC).min(BURST_LINES);
        if self.tokens < 1.0 {
            self.dropped += 1;
            return Admit::Drop;
        }
        self.tokens -= 1.0;
        if self.dropped == 0 || now.saturating_duration_since(self.reported) < REPORT_EVERY {
            return Admit::Keep;
        }
        self.reported = now;
        Admit::KeepAfterDropping(std::mem::take(&mut self.dropped))
    }

    /// Lines dropped and not yet reported.
    pub fn unreported(&self) -> u64 {
        self.dropped
    }

    /// The count of dropped lines to report now, if any are unreported and the last report is
    /// [`REPORT_EVERY`] old: for a flood that stopped, whose drops no later line reports.
    pub fn take_report(&mut self, now: Instant) -> Option<u64> {
        if self.dropped == 0 || now.saturating_duration_since(self.reported) < REPORT_EVERY {
            return None;
        }
        self.reported = now;
        Some(std::mem::take(&mut self.dropped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_cut_to_the_rate_and_counted() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(t0);
        let kept = (0..10_000).filter(|_| r.admit(t0) != Admit::Drop).count();
        assert_eq!(kept, BURST_LINES as usize);
        assert_eq!(r.unreported(), 10_000 - BURST_LINES as u64);
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

    /// A steady flood (ten times the rate, for ten seconds) keeps the rate's worth of lines
    /// and leaves about one note a second, whose counts add up to every line dropped.
    #[test]
    fn a_steady_flood_is_reported_once_a_second() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(t0);
        let (mut kept, mut notes, mut reported) = (0u64, 0u64, 0u64);
        let n = (LINES_PER_SEC as u64) * 10 * 10;
        for i in 0..n {
            let at = t0 + Duration::from_micros(i * 10_000_000 / n);
            match r.admit(at) {
                Admit::Keep => kept += 1,
                Admit::KeepAfterDropping(d) => {
                    kept += 1;
                    notes += 1;
                    reported += d;
                }
                Admit::Drop => {}
            }
        }
        assert!((9..=10).contains(&notes), "{notes} notes in 10 s");
        assert_eq!(kept + reported + r.unreported(), n);
        let expect = BURST_LINES as u64 + 10 * LINES_PER_SEC as u64;
        assert!(
            kept.abs_diff(expect) <= 2,
            "kept {kept}, expected about {expect}"
        );
        // The flood stops: what the last note did not cover is reported a second later, once.
        let end = t0 + Duration::from_secs(10);
        let left = r.unreported();
        assert!(left > 0);
        assert_eq!(r.take_report(end + REPORT_EVERY), Some(left));
        assert_eq!(r.take_report(end + REPORT_EVERY), None);
        assert_eq!(r.take_report(end + 3 * REPORT_EVERY), None);
        assert_eq!(r.admit(end + 3 * REPORT_EVERY), Admit::Keep);
    }
}
