//! Retry policy: exponential backoff with full jitter, vendor `Retry-After` honoured, and a
//! bounded retry window after which a record is dead-lettered.

use std::time::Duration;

use rand::Rng;

use crate::outbox::config::OutboxConfig;
use crate::tags::DeliveryRules;
pub use crate::text::human_duration;

/// Longest a vendor's `Retry-After` is obeyed, both as a pause of the whole tag and as the
/// delay of the events it answered. Vendors ask for seconds or minutes; a day (a misbehaving
/// proxy, a bug) would hold those events for most of their retry window while later events
/// went out, and could carry a Meta event past its 7-day limit unsent.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max: Duration,
    /// Give up once this long has passed since the record was first enqueued.
    pub max_age: Duration,
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    RetryAt(i64),
    GiveUp,
}

impl RetryPolicy {
    pub fn from_config(cfg: &OutboxConfig) -> Self {
        RetryPolicy {
            initial: Duration::from_millis(cfg.retry_initial_ms.max(1)),
            max: Duration::from_millis(cfg.retry_max_ms.max(cfg.retry_initial_ms).max(1)),
            max_age: Duration::from_secs(cfg.max_retry_age_secs),
        }
    }

    /// The retry window for a tag: the configured one, never past the vendor's own limit.
    pub fn window_for(&self, rules: &DeliveryRules) -> Duration {
        match rules.max_event_age {
            Some(limit) => self.max_age.min(limit),
            None => self.max_age,
        }
    }

    /// Full jitter: uniform in `[0, min(max, initial * 2^attempts)]` ("Exponential Backoff
    /// And Jitter", AWS architecture blog) so that retries after an outage spread out.
    pub fn backoff(&self, attempts: u32, rng: &mut impl Rng) -> Duration {
        let cap = self.ceiling(attempts);
        let ms = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rng.gen_range(0..=ms))
    }

    /// The upper bound of the jittered backoff after `attempts` failures.
    pub fn ceiling(&self, attempts: u32) -> Duration {
        let factor = 1u32.checked_shl(attempts.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// Decides the next attempt after a failure. `attempts` counts failures including this
    /// one; `after` is the vendor's `Retry-After`, a floor for the delay up to
    /// [`MAX_RETRY_AFTER`].
    pub fn decide(
        &self,
        attempts: u32,
        first_enqueued_ms: i64,
        now_ms: i64,
        window: Duration,
        after: Option<Duration>,
        rng: &mut impl Rng,
    ) -> RetryDecision {
        let deadline = first_enqueued_ms.saturating_add(duration_ms(window));
        if now_ms >= deadline {
            return RetryDecision::GiveUp;
        }
        let delay = self
            .backoff(attempts.saturating_sub(1), rng)
            .max(after.unwrap_or_default().min(MAX_RETRY_AFTER));
        RetryDecision::RetryAt(now_ms.saturating_add(duration_ms(delay)))
    }
}

pub(crate) fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The bounded `reason` label of `tagrelay_outbox_retries_total`.
pub fn retry_label(status: Option<u16>, timed_out: bool) -> &'static str {
    match status {
        None if timed_out => "timeout",
        None => "network",
        Some(429) => "http_429",
        Some(408) => "http_408",
        Some(500..=599) => "http_5xx",
        Some(_) => "vendor",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(300),
            max_age: Duration::from_secs(86_400),
        }
    }

    #[test]
    fn ceiling_doubles_then_caps() {
        let p = policy();
        assert_eq!(p.ceiling(0), Duration::from_secs(1));
        assert_eq!(p.ceiling(1), Duration::from_secs(2));
        assert_eq!(p.ceiling(8), Duration::from_secs(256));
        assert_eq!(p.ceiling(9), Duration::from_secs(300));
        assert_eq!(p.ceiling(400), Duration::from_secs(300));
    }

    #[test]
    fn backoff_is_jittered_within_ceiling() {
        let p = policy();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let samples: Vec<Duration> = (0..200).map(|_| p.backoff(3, &mut rng)).collect();
        assert!(samples.iter().all(|d| *d <= Duration::from_secs(8)));
        let distinct: std::collections::HashSet<_> = samples.iter().collect();
        assert!(distinct.len() > 100, "full jitter must spread retries");
    }

    #[test]
    fn retry_after_is_a_floor_and_window_ends_retries() {
        let p = policy();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let now = 10_000_000;
        for _ in 0..50 {
            match p.decide(
                1,
                now,
                now,
                p.max_age,
                Some(Duration::from_secs(30)),
                &mut rng,
            ) {
                RetryDecision::RetryAt(t) => assert!(t >= now + 30_000),
                RetryDecision::GiveUp => panic!("inside the window"),
            }
        }
        let first = now - 86_400_000;
        assert_eq!(
            p.decide(5, first, now, p.max_age, None, &mut rng),
            RetryDecision::GiveUp
        );
        let week = Duration::from_secs(7 * 86_400);
        let limited = DeliveryRules {
            vendor: "Meta",
            max_event_age: Some(week),
        };
        let unlimited = DeliveryRules {
            vendor: "GA4",
            max_event_age: None,
        };
        assert_eq!(p.window_for(&limited), Duration::from_secs(86_400));
        let long = RetryPolicy {
            max_age: Duration::from_secs(30 * 86_400),
            ..p
        };
        assert_eq!(long.window_for(&limited), week);
        assert_eq!(
            long.window_for(&unlimited),
            Duration::from_secs(30 * 86_400)
        );
    }

    #[test]
    fn human_durations() {
        let h = |s| human_duration(Duration::from_secs(s));
        assert_eq!(h(41), "41s");
        assert_eq!(h(60), "1m");
        assert_eq!(h(3 * 3600 + 12 * 60 + 5), "3h 12m");
        assert_eq!(h(7 * 86_400), "7d");
        assert_eq!(h(8 * 86_400 + 2 * 3600), "8d 2h");
    }

    #[test]
    fn a_retry_after_longer_than_an_hour_holds_the_event_for_an_hour() {
        let p = policy();
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let now = 10_000_000;
        for after in [86_400, 7 * 86_400, u64::MAX / 1000] {
            assert_eq!(
                p.decide(
                    1,
                    now,
                    now,
                    p.max_age,
                    Some(Duration::from_secs(after)),
                    &mut rng
                ),
                RetryDecision::RetryAt(now + 3_600_000),
                "Retry-After: {after}"
            );
        }
        // Up to the cap, the vendor's value stands.
        assert_eq!(
            p.decide(
                1,
                now,
                now,
                p.max_age,
                Some(Duration::from_secs(3_000)),
                &mut rng
            ),
            RetryDecision::RetryAt(now + 3_000_000)
        );
    }

    #[test]
    fn labels_are_bounded() {
        assert_eq!(retry_label(Some(503), false), "http_5xx");
        assert_eq!(retry_label(Some(429), false), "http_429");
        assert_eq!(retry_label(Some(408), false), "http_408");
        assert_eq!(retry_label(Some(200), false), "vendor");
        assert_eq!(retry_label(None, true), "timeout");
        assert_eq!(retry_label(None, false), "network");
    }
}
