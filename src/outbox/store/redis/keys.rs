//! Key layout. Every key of one partition of one tag shares the hash tag `{T:p}`, so each
//! script touches one slot (what Redis Cluster will need); the prefix lets deployments share
//! one Redis.
//!
//! | key                   | type   | holds                                                  |
//! |-----------------------|--------|--------------------------------------------------------|
//! | `P:{T:p}:q`           | stream | deliveries ready to send; consumer group `tagrelay`    |
//! | `P:{T:p}:z`           | zset   | retries, scored by when they are due (ms)              |
//! | `P:{T:p}:dead`        | stream | dead letters, with reason and time                     |
//! | `P:{T:p}:n`           | hash   | `records`, `bytes` (q + z), `dead_bytes` (dead)         |
//! | `P:{T:p}:pause`       | string | set with PX after a vendor's `Retry-After`             |
//! | `P:tags`              | set    | every tag that ever had a record (for the tools)       |
//! | `P:meta`              | hash   | `partitions`: the most this deployment ever wrote to   |
//! | `P:wake`, `P:pause`, `P:debug` | channels | wake-ups, pauses, debug-view traces     |

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// The consumer group of every delivery stream. One per stream: replicas are its consumers.
pub const GROUP: &str = "tagrelay";

/// The keys of one partition of one tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionKeys {
    pub queue: String,
    pub retries: String,
    pub dead: String,
    pub counts: String,
    pub pause: String,
}

/// Names derived from the configured prefix; a partition's names are made once and kept
/// (commits, leases and settles name them every time).
#[derive(Debug)]
pub struct Keys {
    prefix: String,
    tags: String,
    meta: String,
    wake: String,
    pause: String,
    debug: String,
    /// Per tag, per partition.
    made: RwLock<HashMap<Arc<str>, Vec<Arc<PartitionKeys>>>>,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_owned(),
            tags: format!("{prefix}:tags"),
            meta: format!("{prefix}:meta"),
            wake: format!("{prefix}:wake"),
            pause: format!("{prefix}:pause"),
            debug: format!("{prefix}:debug"),
            made: RwLock::default(),
        }
    }

    pub fn partition(&self, tag: &str, p: u16) -> Arc<PartitionKeys> {
        let i = usize::from(p);
        if let Ok(made) = self.made.read() {
            if let Some(k) = made.get(tag).and_then(|v| v.get(i)) {
                return k.clone();
            }
        }
        let Ok(mut made) = self.made.write() else {
            return Arc::new(self.make(tag, p));
        };
        let list = made.entry(Arc::from(tag)).or_default();
        while list.len() <= i {
            let next = u16::try_from(list.len()).unwrap_or(u16::MAX);
            list.push(Arc::new(self.make(tag, next)));
        }
        list[i].clone()
    }

    fn make(&self, tag: &str, p: u16) -> PartitionKeys {
        let base = format!("{}:{{{tag}:{p}}}", self.prefix);
        PartitionKeys {
            queue: format!("{base}:q"),
            retries: format!("{base}:z"),
            dead: format!("{base}:dead"),
            counts: format!("{base}:n"),
            pause: format!("{base}:pause"),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn tags(&self) -> &str {
        &self.tags
    }

    pub fn meta(&self) -> &str {
        &self.meta
    }

    pub fn wake_channel(&self) -> &str {
        &self.wake
    }

    pub fn pause_channel(&self) -> &str {
        &self.pause
    }

    pub fn debug_channel(&self) -> &str {
        &self.debug
    }
}

/// The partition of an event: stable across processes and versions (CRC-32 of its id), so
/// deliveries spread evenly and any replica computes the same. Nothing depends on order:
/// vendors carry each event's own time.
pub fn partition_of(event_id: &str, partitions: u16) -> u16 {
    let n = u32::from(partitions.max(1));
    u16::try_from(crc32fast::hash(event_id.as_bytes()) % n).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partitions_keys_share_one_hash_tag() {
        let k = Keys::new("tagrelay").partition("meta", 3);
        for key in [&k.queue, &k.retries, &k.dead, &k.counts, &k.pause] {
            assert!(key.starts_with("tagrelay:{meta:3}:"), "{key}");
        }
        assert_eq!(k.queue, "tagrelay:{meta:3}:q");
        assert_eq!(Keys::new("x").tags(), "x:tags");
    }

    #[test]
    fn partitions_are_stable_and_spread() {
        // Fixed forever: replicas of different versions must agree.
        assert_eq!(partition_of("event-1", 4), partition_of("event-1", 4));
        assert_eq!(partition_of("anything", 1), 0);
        let mut seen = [0u32; 4];
        for i in 0..4_000 {
            seen[usize::from(partition_of(&format!("e{i}"), 4))] += 1;
        }
        assert!(seen.iter().all(|&n| n > 800), "{seen:?}");
    }
}
