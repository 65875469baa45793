//! Failed admin authentications per client address: after `MAX_FAILURES` within `WINDOW`,
//! that address gets `429` until the window ends, right token or not, so the admin token
//! cannot be guessed at network speed. Only failures count: a user who logs in is never
//! slowed down. Behind a proxy every client shares the proxy's address; an attacker there
//! can lock others out of the admin surface for a minute at a time, never in.

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

impl LoginThrottle {
    /// How long `ip` must wait before its next attempt counts (`None`: it may try now).
    pub fn blocked(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let map = self.failures.lock().ok()?;
        let &(count, since) = map.get(&ip)?;
        let left = WINDOW.checked_sub(now.saturating_duration_since(since))?;
        (count >= MAX_FAILURES && !left.is_zero()).then_some(left)
    }

    pub fn failed(&self, ip: IpAddr, now: Instant) {
        let Ok(mut map) = self.failures.lock() else {
            return;
        };
        if map.len() >= MAX_TRACKED && !map.contains_key(&ip) {
            map.retain(|_, (_, since)| now.saturating_duration_since(*since) < WINDOW);
            if map.len() >= MAX_TRACKED {
                if let Some(any) = map.keys().next().copied() {
                    map.remove(&any);
                }
            }
        }
        let entry = map.entry(ip).or_insert((0, now));
        if now.saturating_duration_since(entry.1) >= WINDOW {
            *entry = (0, now);
        }
        entry.0 = entry.0.saturating_add(1);
    }

    pub fn succeeded(&self, ip: IpAddr) {
        if let Ok(mut map) = self.failures.lock() {
            map.remove(&ip);
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
    fn tracking_is_bounded() {
        let t = LoginThrottle::default();
        let now = Instant::now();
        for i in 0..(MAX_TRACKED as u32 + 10) {
            t.failed(IpAddr::from(i.to_be_bytes()), now);
        }
        assert!(t.failures.lock().unwrap().len() <= MAX_TRACKED);
    }
}
