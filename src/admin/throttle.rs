//! Failed admin authentications per client address: after `MAX_FAILURES` within `WINDOW`,
//! that address gets `429` until the window ends, right token or not, so the admin token
//! cannot be guessed at network speed. A login attempt counts before its form is read (so
//! parallel guesses cannot all be checked against the same count) and a success clears it.
//! IPv6 clients are counted per /64, the block one host usually gets. Behind a proxy every
//! client shares the proxy's address: an attacker there can lock others out of the admin
//! surface for a minute at a time, never in.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const MAX_FAILURES: u32 = 10;
pub const WINDOW: Duration = Duration::from_secs(60);
/// Addresses tracked at once; when full, expired ones go first, then any.
const MAX_TRACKED: usize = 4096;

#[derive(Debug)]
pub struct LoginThrottle {
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
    max_tracked: usize,
}

impl Default for LoginThrottle {
    fn default() -> Self {
        LoginThrottle {
            failures: Mutex::default(),
            max_tracked: MAX_TRACKED,
        }
    }
}

/// The address failures are counted under: IPv4 as is, IPv6 by its /64.
fn key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::from([s[0], s[1], s[2], s[3], 0, 0, 0, 0])
        }
        v4 => v4,
    }
}

/// Whole seconds to wait, rounded up: a client that waits that long is let in.
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_millis().div_ceil(1000).max(1) as u64
}

impl LoginThrottle {
    /// Counts an attempt before it is checked, unless `ip` is blocked: then how long it
    /// must wait. Check and count are one step.
    pub fn attempt(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let Ok(mut map) = self.failures.lock() else {
            return Ok(());
        };
        let k = key(ip);
        if let Some(&(count, since)) = map.get(&k) {
            let left = WINDOW.saturating_sub(now.saturating_duration_since(since));
            if count >= MAX_FAILURES && !left.is_zero() {
                return Err(left);
            }
        }
        if map.len() >= self.max_tracked && !map.contains_key(&k) {
            map.retain(|_, (_, since)| now.saturating_duration_since(*since) < WINDOW);
            if map.len() >= self.max_tracked {
                // Make room, sparing blocked addresses while any other can go.
                let victim = map
                    .iter()
                    .find(|(_, (count, _))| *count < MAX_FAILURES)
                    .or_else(|| map.iter().next())
                    .map(|(ip, _)| *ip);
                if let Some(v) = victim {
                    map.remove(&v);
                }
            }
        }
        let entry = map.entry(k).or_insert((0, now));
        if now.saturating_duration_since(entry.1) >= WINDOW {
            *entry = (0, now);
        }
        entry.0 = entry.0.saturating_add(1);
        Ok(())
    }

    /// The attempt was right: the address starts afresh.
    pub fn succeeded(&self, ip: IpAddr) {
        if let Ok(mut map) = self.failures.lock() {
            map.remove(&key(ip));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail(t: &LoginThrottle, ip: IpAddr, now: Instant, times: u32) {
        for _ in 0..times {
            assert!(t.attempt(ip, now).is_ok());
        }
    }

    #[test]
    fn ten_failures_in_a_minute_block_the_address_for_the_rest_of_it() {
        let t = LoginThrottle::default();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let start = Instant::now();
        fail(&t, ip, start, MAX_FAILURES);
        let later = start + Duration::from_secs(20);
        assert_eq!(t.attempt(ip, later), Err(Duration::from_secs(40)));
        assert!(t.attempt(other, later).is_ok(), "per address");
        // The window ends; the next one starts counting at one.
        let next = start + WINDOW;
        fail(&t, ip, next, MAX_FAILURES);
        assert_eq!(
            t.attempt(ip, next + Duration::from_secs(1)),
            Err(Duration::from_secs(59))
        );
    }

    #[test]
    fn the_eleventh_attempt_is_refused_before_any_is_answered_and_a_success_clears() {
        let t = LoginThrottle::default();
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        let now = Instant::now();
        fail(&t, ip, now, MAX_FAILURES);
        assert_eq!(t.attempt(ip, now), Err(WINDOW));
        t.succeeded(ip);
        assert!(
            t.attempt(ip, now).is_ok(),
            "a success clears a blocked address"
        );
    }

    #[test]
    fn ipv6_is_counted_per_64_and_mapped_ipv4_as_ipv4() {
        let t = LoginThrottle::default();
        let now = Instant::now();
        for i in 0..MAX_FAILURES {
            assert!(t
                .attempt(format!("2001:db8:1:2::{i:x}").parse().unwrap(), now)
                .is_ok());
        }
        assert!(t
            .attempt("2001:db8:1:2:ffff::1".parse().unwrap(), now)
            .is_err());
        assert!(t.attempt("2001:db8:1:3::1".parse().unwrap(), now).is_ok());
        fail(&t, "::ffff:192.0.2.7".parse().unwrap(), now, MAX_FAILURES);
        assert!(t.attempt("192.0.2.7".parse().unwrap(), now).is_err());
    }

    #[test]
    fn waits_round_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(40_200)), 41);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
    }

    #[test]
    fn a_full_table_makes_room_but_keeps_blocked_addresses() {
        let t = LoginThrottle {
            max_tracked: 3,
            ..LoginThrottle::default()
        };
        let now = Instant::now();
        let bad: IpAddr = "198.51.100.1".parse().unwrap();
        fail(&t, bad, now, MAX_FAILURES);
        for i in 0..10u32 {
            assert!(t.attempt(IpAddr::from(i.to_be_bytes()), now).is_ok());
        }
        assert!(t.failures.lock().unwrap().len() <= 3);
        assert!(t.attempt(bad, now).is_err(), "still blocked");
    }
}
