//! Delivery failures in the log, per tag and minute. A vendor rejecting every event, or down
//! for an hour, must show in the log (dead letters at ERROR: that data is lost to the vendor;
//! failed attempts at INFO: they are retried) without writing one line per batch: the first
//! failure of a quiet spell is logged at once, those that follow are counted and logged as one
//! line a minute, with a count per reason and an example reason.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long failures are counted before their line is written.
pub(crate) const WINDOW: Duration = Duration::from_secs(60);

/// One line to write: how many failures, by reason, since when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Line {
    pub count: u64,
    /// `rejected: 3, expired: 1`.
    pub reasons: String,
    /// One failure's reason (already redacted by the tag).
    pub example: String,
    /// Seconds the line covers (0 for the first failure of a quiet spell, logged at once).
    pub over_secs: u64,
}

#[derive(Debug, Default)]
struct State {
    /// When the current window opened; `None` while quiet (the next failure is logged at once).
    since: Option<Instant>,
    count: u64,
    reasons: Vec<(&'static str, u64)>,
    example: Option<String>,
}

impl State {
    fn take(&mut self, now: Instant) -> Option<Line> {
        if self.count == 0 {
            return None;
        }
        let line = Line {
            count: self.count,
            reasons: self
                .reasons
                .iter()
                .map(|(r, n)| format!("{r}: {n}"))
                .collect::<Vec<_>>()
                .join(", "),
            example: self.example.take().unwrap_or_default(),
            over_secs: self
                .since
                .map_or(0, |s| now.saturating_duration_since(s).as_secs()),
        };
        self.count = 0;
        self.reasons.clear();
        Some(line)
    }
}

/// Failures of one kind for one tag.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    state: Mutex<State>,
}

impl Tally {
    /// Counts failures (`reasons`: label and count). Returns the line to write now: the
    /// first failure after a quiet spell, or what the minute that just ended gathered.
    pub(crate) fn add(
        &self,
        now: Instant,
        reasons: &[(&'static str, u64)],
        example: &str,
    ) -> Vec<Line> {
        let n: u64 = reasons.iter().map(|(_, n)| n).sum();
        if n == 0 {
            return Vec::new();
        }
        let Ok(mut s) = self.state.lock() else {
            return Vec::new();
        };
        let mut out: Vec<Line> = roll(&mut s, now).into_iter().collect();
        for &(r, k) in reasons.iter().filter(|(_, k)| *k > 0) {
            match s.reasons.iter_mut().find(|(x, _)| *x == r) {
                Some((_, c)) => *c += k,
                None => s.reasons.push((r, k)),
            }
        }
        s.count += n;
        if s.example.is_none() {
            s.example = Some(example.to_owned());
        }
        if s.since.is_none() {
            // Quiet until now: say so at once, and count what follows for a minute.
            s.since = Some(now);
            out.extend(s.take(now));
        }
        out
    }

    /// The line of a minute that has ended, if it gathered anything (call every second or so).
    pub(crate) fn tick(&self, now: Instant) -> Option<Line> {
        self.state.lock().ok().and_then(|mut s| roll(&mut s, now))
    }

    /// Whatever is counted, now (when the dispatcher stops).
    pub(crate) fn flush(&self, now: Instant) -> Option<Line> {
        self.state.lock().ok().and_then(|mut s| s.take(now))
    }
}

/// Ends the window if a minute has passed: its line if it gathered anything (and a new
/// window opens, so a steady flood gives a line a minute), else quiet again.
fn roll(s: &mut State, now: Instant) -> Option<Line> {
    let since = s.since?;
    if now.saturating_duration_since(since) < WINDOW {
        return None;
    }
    let line = s.take(now);
    s.since = line.is_some().then_some(now);
    line
}

/// A tag's two tallies: dead letters and failed attempts that will be retried.
#[derive(Debug, Default)]
pub(crate) struct DeliveryLog {
    pub dead: Tally,
    pub failed: Tally,
}

impl DeliveryLog {
    pub(crate) fn dead_lettered(&self, tag: &str, reasons: &[(&'static str, u64)], example: &str) {
        for l in self.dead.add(Instant::now(), reasons, example) {
            log_dead(tag, &l);
        }
    }

    pub(crate) fn failed(&self, tag: &str, reasons: &[(&'static str, u64)], example: &str) {
        for l in self.failed.add(Instant::now(), reasons, example) {
            log_failed(tag, &l);
        }
    }

    /// Writes the lines of minutes that have ended; with `all`, everything counted.
    pub(crate) fn tick(&self, tag: &str, all: bool) {
        let now = Instant::now();
        let (dead, failed) = if all {
            (self.dead.flush(now), self.failed.flush(now))
        } else {
            (self.dead.tick(now), self.failed.tick(now))
        };
        if let Some(l) = dead {
            log_dead(tag, &l);
        }
        if let Some(l) = failed {
            log_failed(tag, &l);
        }
    }
}

fn log_dead(tag: &str, l: &Line) {
    tracing::error!(
        tag,
        dead_lettered = l.count,
        reasons = %l.reasons,
        example = %l.example,
        over_secs = l.over_secs,
        "outbox: deliveries dead-lettered; the vendor will not get these events unless they are replayed (`tagrelay outbox dead-letters --tag`, then `replay`); more are counted and logged once a minute"
    );
}

fn log_failed(tag: &str, l: &Line) {
    tracing::info!(
        tag,
        failed = l.count,
        reasons = %l.reasons,
        example = %l.example,
        over_secs = l.over_secs,
        "outbox: delivery attempts failed and will be retried; more are counted and logged once a minute"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_failure_is_told_at_once_and_a_flood_once_a_minute() {
        let t = Tally::default();
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        let first = t.add(t0, &[("rejected", 2)], "rejected: HTTP 400 bad event");
        assert_eq!(
            first,
            vec![Line {
                count: 2,
                reasons: "rejected: 2".into(),
                example: "rejected: HTTP 400 bad event".into(),
                over_secs: 0,
            }]
        );
        // A flood within the minute: nothing written, everything counted.
        for i in 1..=59 {
            assert!(t
                .add(s(i), &[("rejected", 10), ("expired", 1)], "x")
                .is_empty());
            assert_eq!(t.tick(s(i)), None);
        }
        let minute = t.tick(s(60)).expect("the minute's line");
        assert_eq!(minute.count, 59 * 11);
        assert_eq!(minute.reasons, "rejected: 590, expired: 59");
        assert_eq!(minute.example, "x");
        assert_eq!(minute.over_secs, 60);
        // Still flooding: the next minute's line comes from `add` itself when it rolls over.
        assert!(t.add(s(61), &[("rejected", 1)], "y").is_empty());
        let rolled = t.add(s(121), &[("rejected", 1)], "z");
        assert_eq!(rolled.len(), 1);
        assert_eq!((rolled[0].count, rolled[0].example.as_str()), (1, "y"));
        // A quiet minute closes the window; the next failure is told at once again.
        assert_eq!(t.tick(s(181)).map(|l| l.count), Some(1));
        assert_eq!(t.tick(s(241)), None);
        let again = t.add(s(300), &[("invalid", 1)], "w");
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].over_secs, 0);
        assert!(t.add(s(301), &[("invalid", 0)], "nothing").is_empty());
        assert_eq!(t.flush(s(302)), None);
        t.add(s(303), &[("invalid", 4)], "v");
        assert_eq!(t.flush(s(304)).map(|l| l.count), Some(4));
    }
}
