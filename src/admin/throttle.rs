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

#[derive(Debug, Default)]
pub struct LoginThrottle {
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
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
    /// How long `ip` must wait before its next attempt counts (`None`: it may try now).
    pub fn blocked(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let map = self.failures.lock().ok()?;
        Self::left(&map, key(ip), now)
    }

    fn left(map: &HashMap<IpAddr, (u32, Instant)>, k: IpAddr, now: Instant) -> Option<Duration> {
        let &(count, since) = map.get(&k)?;
        let left = WINDOW.checked_sub(now.saturating_duration_since(since))?;
        (count >= MAX_FAILURES && !left.is_zero()).then_some(left)
    }

    /// Counts an attempt that has not been checked yet (a login form on its way), unless
    /// `ip` is blocked: then how long it must wait. Check and count are one step.
    pub fn attempt(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let Ok(mut map) = self.failures.lock() else {
            return Ok(());
        };
        let k = key(ip);
        if let Some(left) = Self::left(&map, k, now) {
            return Err(left);
        }
        Self::count(&mut map, k, now);
        Ok(())
    }

    pub fn failed(&self, ip: IpAddr, now: Instant) {
        if let Ok(mut map) = self.failures.lock() {
            Self::count(&mut map, key(ip), now);
        }
    }

    fn count(map: &mut HashMap<IpAddr, (u32, Instant)>, k: IpAddr, now: Instant) {
        if map.len() >= MAX_TRACKED && !map.contains_key(&k) {
            map.retain(|_, (_, since)| now.saturating_duration_since(*since) < WINDOW);
            if map.len() >= MAX_TRACKED {
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
    }

    pub fn succeeded(&self, ip: IpAddr) {
        if let Ok(mut map) = self.failures.lock() {
            if !map.is_empty() {
                map.remove(&key(ip));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_failures_in_a_minute_block_the_address_for_the_rest_of_it() {
        let t = LoginThrottle::default();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let start = Instant::now();
        for _ in 0..MAX_FAILURES - 1 {
            t.failed(ip, start);
        }
        assert_eq!(t.blocked(ip, start), None, "nine is not yet ten");
        t.failed(ip, start);
        let later = start + Duration::from_secs(20);
        assert_eq!(t.blocked(ip, later), Some(Duration::from_secs(40)));
        assert_eq!(t.blocked(other, later), None, "per address");
        assert_eq!(t.blocked(ip, start + WINDOW), None, "the window ends");
        t.failed(ip, start + WINDOW);
        assert_eq!(
            t.blocked(ip, start + WINDOW),
            None,
            "a new window starts at one"
        );
        t.succeeded(ip);
        assert_eq!(t.blocked(ip, start), None);
    }

    #[test]
    fn attempts_are_counted_before_they_are_checked() {
        let t = LoginThrottle::default();
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        let now = Instant::now();
        for _ in 0..MAX_FAILURES {
            assert!(t.attempt(ip, now).is_ok());
        }
        // The eleventh is refused even though none of the ten has been answered yet.
        assert_eq!(t.attempt(ip, now), Err(WINDOW));
        t.succeeded(ip);
        assert!(t.attempt(ip, now).is_ok(), "a success clears the count");
    }

    #[test]
    fn ipv6_is_counted_per_64_and_mapped_ipv4_as_ipv4() {
        let t = LoginThrottle::default();
        let now = Instant::now();
        for i in 0..MAX_FAILURES {
            t.failed(format!("2001:db8:1:2::{i:x}").parse().unwrap(), now);
        }
        assert!(t
            .blocked("2001:db8:1:2:ffff::1".parse().unwrap(), now)
            .is_some());
        assert!(t.blocked("2001:db8:1:3::1".parse().unwrap(), now).is_none());
        for _ in 0..MAX_FAILURES {
            t.failed("::ffff:192.0.2.7".parse().unwrap(), now);
        }
        assert!(t.blocked("192.0.2.7".parse().unwrap(), now).is_some());
    }

    #[test]
    fn waits_round_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(40_200)), 41);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
    }

    #[test]
    fn tracking_is_bounded_and_spares_blocked_addresses() {
        let t = LoginThrottle::default();
        let now = Instant::now();
        let bad: IpAddr = "198.51.100.1".parse().unwrap();
        for _ in 0..MAX_FAILURES {
            t.failed(bad, now);
        }
        for i in 0..(MAX_TRACKED as u32 + 10) {
            t.failed(IpAddr::from(i.to_be_bytes()), now);
        }
        assert!(t.failures.lock().unwrap().len() <= MAX_TRACKED);
        assert!(t.blocked(bad, now).is_some());
    }
}
