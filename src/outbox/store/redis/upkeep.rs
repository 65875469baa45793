//! Background upkeep: back-pressure counters as Redis has them (other replicas change them
//! too), Redis memory, dead-letter trimming, forgotten consumers; and the backlog read for
//! the gauges.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::Value;

use super::keys::{Keys, GROUP};
use super::record::{self, int};
use super::scripts::TRIM_DEAD_SCRIPT;
use super::{Inner, MEMORY_FULL_PERCENT};
use crate::clock::now_ms;
use crate::outbox::{StoreError, TagBacklog};

/// Dead letters removed per partition per step (a step repeats at once while there is more).
const TRIM_BUDGET: u64 = 1_000;
#[cfg(not(test))]
const TRIM_EVERY: Duration = Duration::from_secs(60);
#[cfg(test)]
const TRIM_EVERY: Duration = Duration::from_millis(200);
/// Consumers with nothing pending and idle this long (replicas gone for good) are removed.
const FORGET_CONSUMERS_IDLE_MS: i64 = 24 * 3600 * 1000;
const FORGET_CONSUMERS_EVERY: Duration = Duration::from_secs(600);

/// After each (re)connect: how many partitions this deployment ever wrote (read them all),
/// which tags exist, and their counters.
pub(crate) async fn prepare(inner: &Inner) {
    let Ok(mut conn) = inner.link.work() else {
        return;
    };
    let configured = inner.settings.partitions;
    let stored: Option<u16> = redis::cmd("HGET")
        .arg(inner.keys.meta())
        .arg("partitions")
        .query_async(&mut conn)
        .await
        .unwrap_or(None);
    let most = stored.unwrap_or(0).max(configured);
    if stored.is_none_or(|s| s < configured) {
        let _: Result<(), _> = redis::cmd("HSET")
            .arg(inner.keys.meta())
            .arg("partitions")
            .arg(most)
            .query_async(&mut conn)
            .await;
    }
    if most > configured {
        tracing::info!(
            configured,
            reading = most,
            "outbox: this deployment once wrote to more partitions; reading them all so nothing left there is missed"
        );
    }
    inner.read_partitions.store(most, Ordering::Release);
    if let Ok(tags) = inner.all_tags().await {
        inner.registered_are(&tags);
        for t in &tags {
            inner.totals.tag(t);
        }
    }
    refresh_counts(inner).await;
}

/// Reads every known tag's counters.
async fn refresh_counts(inner: &Inner) {
    let Ok(mut conn) = inner.link.work() else {
        return;
    };
    let tags = inner.totals.tag_names();
    let parts = inner.read_partitions.load(Ordering::Acquire).max(1);
    if tags.is_empty() {
        return;
    }
    let mut pipe = redis::pipe();
    for t in &tags {
        for p in 0..parts {
            pipe.cmd("HMGET")
                .arg(&inner.keys.partition(t, p).counts)
                .arg("records")
                .arg("bytes");
        }
    }
    let replies: Vec<Value> = match pipe.query_async(&mut conn).await {
        Ok(r) => r,
        Err(e) => {
            inner.link.failed(&e);
            return;
        }
    };
    let mut it = replies.iter();
    for t in &tags {
        for p in 0..parts {
            if let Some(Value::Array(v)) = it.next() {
                if let [r, b] = v.as_slice() {
                    inner.totals.set(t, p, int(r), int(b));
                }
            }
        }
    }
}

pub(crate) async fn run(inner: Arc<Inner>) {
    let mut was_up = inner.link.is_up();
    let mut last_info = Instant::now();
    let mut last_trim: Option<Instant> = None;
    let mut last_forget = Instant::now();
    let mut last_tags = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = inner.link.connected.notified() => {}
            _ = inner.stop.notified() => return,
        }
        if inner.link.is_closed() {
            return;
        }
        let up = inner.link.is_up();
        if !up {
            was_up = false;
            continue;
        }
        if !was_up || last_tags.elapsed() >= Duration::from_secs(10) {
            was_up = true;
            last_tags = Instant::now();
            prepare(&inner).await;
        } else {
            refresh_counts(&inner).await;
        }
        if last_info.elapsed() >= Duration::from_secs(5) {
            last_info = Instant::now();
            if let Some(info) = inner.link.refresh_info().await {
                let full = info.memory_percent() >= MEMORY_FULL_PERCENT;
                inner.memory_full.store(full, Ordering::Release);
            }
        }
        if last_trim.is_none_or(|t| t.elapsed() >= TRIM_EVERY) {
            let more = trim_dead(&inner).await;
            // Left over: again at the next tick, not a minute later.
            last_trim = if more { None } else { Some(Instant::now()) };
        }
        if inner.settings.role.delivers() && last_forget.elapsed() >= FORGET_CONSUMERS_EVERY {
            last_forget = Instant::now();
            forget_consumers(&inner).await;
        }
    }
}

/// Trims dead letters of every tag and partition by age, count and bytes (the caps split
/// evenly over tags and partitions). Returns whether some are left over the limits.
pub(crate) async fn trim_dead(inner: &Inner) -> bool {
    let s = &inner.settings;
    if s.dead_letter_max_age_ms == 0
        && s.dead_letter_max_records == 0
        && s.dead_letter_max_bytes == 0
    {
        return false;
    }
    let Ok(mut conn) = inner.link.work() else {
        return false;
    };
    let tags = inner.totals.tag_names();
    if tags.is_empty() {
        return false;
    }
    let parts = inner.read_partitions.load(Ordering::Acquire).max(1);
    let shares = (tags.len() as u64).saturating_mul(u64::from(parts)).max(1);
    let per = |cap: u64| if cap == 0 { 0 } else { cap.div_ceil(shares) };
    let oldest_kept = if s.dead_letter_max_age_ms == 0 {
        0
    } else {
        now_ms().saturating_sub(i64::try_from(s.dead_letter_max_age_ms).unwrap_or(i64::MAX))
    };
    let mut pipe = redis::pipe();
    for t in &tags {
        for p in 0..parts {
            let k = inner.keys.partition(t, p);
            pipe.cmd("EVALSHA")
                .arg(TRIM_DEAD_SCRIPT.get_hash())
                .arg(2)
                .arg(&k.dead)
                .arg(&k.counts)
                .arg(oldest_kept.max(0))
                .arg(per(s.dead_letter_max_records))
                .arg(per(s.dead_letter_max_bytes))
                .arg(TRIM_BUDGET);
        }
    }
    let replies: Vec<Value> = match pipe.query_async(&mut conn).await {
        Ok(r) => r,
        Err(e) => {
            inner.link.failed(&e);
            return false;
        }
    };
    let mut removed = 0u64;
    let mut more = false;
    for r in &replies {
        if let Value::Array(v) = r {
            let n = v.first().map(int).unwrap_or(0);
            removed += u64::try_from(n).unwrap_or(0);
            more |= u64::try_from(n).unwrap_or(0) >= TRIM_BUDGET;
        }
    }
    if removed > 0 {
        metrics::counter!("tagrelay_outbox_dead_letters_purged_total").increment(removed);
        tracing::info!(
            removed,
            "outbox: deleted dead letters past their retention (age, count or bytes)"
        );
    }
    more
}

/// Removes consumers of replicas long gone that hold nothing: a restarted replica is a new
/// consumer, and a group's consumer list would otherwise only grow. One holding pending
/// entries is never removed (that would drop them from the group).
async fn forget_consumers(inner: &Inner) {
    let Ok(mut conn) = inner.link.work() else {
        return;
    };
    let parts = inner.read_partitions.load(Ordering::Acquire).max(1);
    for t in inner.totals.tag_names() {
        for p in 0..parts {
            let q = inner.keys.partition(&t, p).queue.clone();
            let list: Value = match redis::cmd("XINFO")
                .arg("CONSUMERS")
                .arg(&q)
                .arg(GROUP)
                .query_async(&mut conn)
                .await
            {
                Ok(v) => v,
                Err(_) => continue,
            };
            for c in list.as_sequence().unwrap_or_default() {
                let name = field_text(c, "name");
                let pending = field_int(c, "pending");
                let idle = field_int(c, "idle");
                if let Some(name) = name {
                    if name != inner.consumer && pending == 0 && idle > FORGET_CONSUMERS_IDLE_MS {
                        let _: Result<i64, _> = redis::cmd("XGROUP")
                            .arg("DELCONSUMER")
                            .arg(&q)
                            .arg(GROUP)
                            .arg(&name)
                            .query_async(&mut conn)
                            .await;
                    }
                }
            }
        }
    }
}

/// A field of a reply given as a map (RESP3) or a flat `[name, value, ...]` list (RESP2).
fn field<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    match v {
        Value::Map(pairs) => pairs
            .iter()
            .find(|(k, _)| redis::from_redis_value_ref::<String>(k).is_ok_and(|k| k == name))
            .map(|(_, v)| v),
        Value::Array(items) => items.chunks(2).find_map(|kv| match kv {
            [k, v] if redis::from_redis_value_ref::<String>(k).is_ok_and(|k| k == name) => Some(v),
            _ => None,
        }),
        _ => None,
    }
}

fn field_text(v: &Value, name: &str) -> Option<String> {
    field(v, name).and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
}

fn field_int(v: &Value, name: &str) -> i64 {
    field(v, name).map(int).unwrap_or(0)
}

/// `first enqueued` of a retry as the schedule keeps it (a MessagePack array of field names
/// and values, packed by Lua's `cmsgpack`).
pub(crate) fn retry_first_ms(member: &[u8]) -> Option<i64> {
    let mut rd = member;
    let n = rmp::decode::read_array_len(&mut rd).ok()?;
    let next = |rd: &mut &[u8]| -> Option<Vec<u8>> {
        let len = rmp::decode::read_str_len(rd).ok()? as usize;
        let (s, rest) = (rd.get(..len)?, rd.get(len..)?);
        let out = s.to_vec();
        *rd = rest;
        Some(out)
    };
    for _ in 0..n / 2 {
        let k = next(&mut rd)?;
        let v = next(&mut rd)?;
        if k == b"t" {
            return std::str::from_utf8(&v).ok()?.parse().ok();
        }
    }
    None
}

/// Pending deliveries per tag, from the counters and the streams' heads; sets the lag
/// gauge on the way.
pub(crate) async fn backlog(inner: &Inner, _now_ms: i64) -> Result<Vec<TagBacklog>, StoreError> {
    let tags = inner.all_tags().await?;
    let mut conn = inner.link.work()?;
    let parts = inner.read_partitions.load(Ordering::Acquire).max(1);
    let found = backlog_of(&mut conn, &inner.keys, tags, parts)
        .await
        .map_err(|e| inner.link.failed(&e))?;
    Ok(found
        .into_iter()
        .map(|(b, lag)| {
            metrics::gauge!("tagrelay_outbox_redis_lag", "tag" => b.tag.clone()).set(lag as f64);
            b
        })
        .collect())
}

/// `(backlog, consumer-group lag)` of each tag: pending from the counters, leased from the
/// pending lists, the oldest from the head of each stream and schedule.
pub(crate) async fn backlog_of(
    conn: &mut MultiplexedConnection,
    keys: &Keys,
    tags: Vec<String>,
    parts: u16,
) -> Result<Vec<(TagBacklog, i64)>, redis::RedisError> {
    if tags.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for t in &tags {
        for p in 0..parts {
            let k = keys.partition(t, p);
            pipe.cmd("HGET").arg(&k.counts).arg("records");
            pipe.cmd("XPENDING").arg(&k.queue).arg(GROUP);
            pipe.cmd("XRANGE")
                .arg(&k.queue)
                .arg("-")
                .arg("+")
                .arg("COUNT")
                .arg(1);
            pipe.cmd("ZRANGE").arg(&k.retries).arg(0).arg(0);
            pipe.cmd("XINFO").arg("GROUPS").arg(&k.queue);
        }
    }
    let replies: Vec<Value> = pipe.query_async(conn).await?;
    let mut it = replies.chunks(5);
    let mut out = Vec::with_capacity(tags.len());
    for t in tags {
        let (mut pending, mut leased, mut lag) = (0u64, 0u64, 0i64);
        let mut oldest: Option<i64> = None;
        let mut older = |ms: Option<i64>| {
            if let Some(ms) = ms {
                oldest = Some(oldest.map_or(ms, |o| o.min(ms)));
            }
        };
        for _ in 0..parts {
            let Some([records, xpending, head, first_retry, groups]) =
                it.next().and_then(|c| <&[Value; 5]>::try_from(c).ok())
            else {
                break;
            };
            pending += u64::try_from(int(records)).unwrap_or(0);
            if let Value::Array(s) = xpending {
                leased += u64::try_from(s.first().map(int).unwrap_or(0)).unwrap_or(0);
            }
            if let Some(e) = record::entries(head).into_iter().next() {
                older(e.first_ms);
            }
            if let Value::Array(m) = first_retry {
                if let Some(Value::BulkString(b)) = m.first() {
                    older(retry_first_ms(b));
                }
            }
            for g in groups.as_sequence().unwrap_or_default() {
                if field_text(g, "name").as_deref() == Some(GROUP) {
                    lag += field_int(g, "lag");
                }
            }
        }
        out.push((
            TagBacklog {
                tag: t,
                pending,
                leased,
                oldest_enqueued_ms: oldest,
            },
            lag,
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_retrys_first_time_is_read_from_its_packed_fields() {
        // What cmsgpack.pack({'v','1','e','ev','t','1700000000000'}) gives.
        let mut buf = Vec::new();
        rmp::encode::write_array_len(&mut buf, 6).unwrap();
        for s in ["v", "1", "e", "ev", "t", "1700000000000"] {
            rmp::encode::write_str(&mut buf, s).unwrap();
        }
        assert_eq!(super::retry_first_ms(&buf), Some(1_700_000_000_000));
        assert_eq!(super::retry_first_ms(b"junk"), None);
    }
}
