//! Failure prediction for a pre-copy: from each round's numbers, whether
//! the stream will ever get the rest across within the pause allowed, and
//! whether it moves at all.

use std::time::{Duration, Instant};

use flotilla_qemu::live::LiveProgress;

/// Rounds over memory before a prediction is trusted.
const MIN_ROUNDS: u64 = 5;
/// Rounds over which what is left must shrink.
const WINDOW: usize = 4;
/// What is left must shrink by this fraction over the window.
const SHRINK: f64 = 0.10;
const PAGE: u64 = 4096;
/// A stream that sends nothing for this long is cut off.
pub const STALL_LIMIT: Duration = Duration::from_secs(10);

/// What a pre-copy looks like so far.
#[derive(Debug)]
pub struct Watch {
    /// (rounds, bytes left, expected pause) at each new round.
    rounds: Vec<(u64, u64, u64)>,
    max_downtime_ms: u64,
    last_sent: u64,
    last_moved: Instant,
}

/// What the watch concludes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Fine,
    /// It will not converge: why, in one line.
    WontConverge(String),
    /// Nothing sent for [`STALL_LIMIT`].
    Stalled,
}

impl Watch {
    pub fn new(max_downtime_ms: u64, now: Instant) -> Watch {
        Watch {
            rounds: Vec::new(),
            max_downtime_ms,
            last_sent: 0,
            last_moved: now,
        }
    }

    pub fn observe(&mut self, p: &LiveProgress, now: Instant) -> Verdict {
        if p.transferred_bytes != self.last_sent {
            self.last_sent = p.transferred_bytes;
            self.last_moved = now;
        } else if matches!(p.status.as_str(), "setup" | "active")
            && now - self.last_moved >= STALL_LIMIT
        {
            return Verdict::Stalled;
        }
        let expected = p.expected_downtime_ms.unwrap_or(0);
        if self.rounds.last().is_none_or(|r| r.0 != p.rounds) {
            self.rounds.push((p.rounds, p.remaining_bytes, expected));
        }
        if p.rounds < MIN_ROUNDS || self.rounds.len() <= WINDOW {
            return Verdict::Fine;
        }
        let dirty_bps = p.dirty_pages_rate * PAGE;
        if p.throughput_bps > 0 && dirty_bps >= p.throughput_bps {
            return Verdict::WontConverge(format!(
                "the guest dirties {:.1} MB/s and the stream sends {:.1} MB/s",
                dirty_bps as f64 / 1e6,
                p.throughput_bps as f64 / 1e6
            ));
        }
        let then = self.rounds[self.rounds.len() - 1 - WINDOW].1 as f64;
        let left = p.remaining_bytes as f64;
        if expected > self.max_downtime_ms && left > then * (1.0 - SHRINK) {
            return Verdict::WontConverge(format!(
                "{:.1} MiB stay left round after round; sending them would pause the guest {expected} ms, more than {} ms",
                left / (1024.0 * 1024.0),
                self.max_downtime_ms
            ));
        }
        Verdict::Fine
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(rounds: u64, left: u64, expected: u64, dirty_pages: u64, bps: u64) -> LiveProgress {
        LiveProgress {
            status: "active".into(),
            rounds,
            remaining_bytes: left,
            expected_downtime_ms: Some(expected),
            dirty_pages_rate: dirty_pages,
            throughput_bps: bps,
            transferred_bytes: rounds * 1_000_000,
            ..LiveProgress::default()
        }
    }

    #[test]
    fn a_shrinking_remainder_is_fine_and_a_stuck_one_is_not() {
        let t = Instant::now();
        let mut w = Watch::new(300, t);
        for r in 1..=10 {
            let v = w.observe(&round(r, 100_000_000 >> r, 50, 10, 100_000_000), t);
            assert_eq!(v, Verdict::Fine, "round {r}");
        }
        let mut w = Watch::new(300, t);
        let mut last = Verdict::Fine;
        for r in 1..=10 {
            last = w.observe(&round(r, 50_000_000, 900, 10, 100_000_000), t);
        }
        assert!(
            matches!(last, Verdict::WontConverge(ref why) if why.contains("900 ms")),
            "{last:?}"
        );
    }

    #[test]
    fn dirtying_faster_than_sending_is_predicted() {
        let t = Instant::now();
        let mut w = Watch::new(300, t);
        let mut last = Verdict::Fine;
        for r in 1..=8 {
            // 10,000 pages/s = 41 MB/s dirtied, 10 MB/s sent.
            last = w.observe(&round(r, 50_000_000 >> r, 100, 10_000, 10_000_000), t);
        }
        assert!(
            matches!(last, Verdict::WontConverge(ref why) if why.contains("dirties")),
            "{last:?}"
        );
    }

    #[test]
    fn a_stream_that_sends_nothing_is_stalled() {
        let t = Instant::now();
        let mut w = Watch::new(300, t);
        let p = round(1, 1000, 10, 0, 1);
        assert_eq!(w.observe(&p, t), Verdict::Fine);
        assert_eq!(w.observe(&p, t + Duration::from_secs(5)), Verdict::Fine);
        assert_eq!(w.observe(&p, t + STALL_LIMIT), Verdict::Stalled);
    }
}
