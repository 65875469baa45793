//! `tagrelay outbox stats | dead-letters | replay` on the shared store. They connect with
//! the server's configuration and work while servers run: a replay is seen by running
//! dispatchers at once (it publishes a wake-up).

use redis::aio::MultiplexedConnection;
use redis::Value;

use super::conn::{ConnectError, Connector, Link};
use super::keys::{Keys, GROUP};
use super::record::{self, int, WRITE_VERSION};
use super::scripts::REPLAY_SCRIPT;
use super::upkeep::backlog_of;
use crate::clock::now_ms;
use crate::outbox::config::OutboxConfig;
use crate::outbox::store::report::{utc, DeadLetter, DeadLetterId, Stats, TagStats};

/// Dead letters moved per script call (each is one short step for Redis).
const REPLAY_STEP: u32 = 500;

struct Ctx {
    conn: MultiplexedConnection,
    keys: Keys,
    partitions: u16,
    tags: Vec<String>,
}

/// A link for a one-off command: connected once, not supervised, nothing logged.
pub(crate) async fn one_off_link(cfg: &OutboxConfig) -> Result<Link, String> {
    let link = Link::new(Connector::from_config(&cfg.redis)?, &cfg.redis);
    match link.connect_once().await {
        Ok(_) => {}
        Err(ConnectError::Refused(why)) => {
            return Err(format!("Redis at {}: {why}", link.describe()))
        }
        Err(ConnectError::Down(why)) => {
            return Err(format!(
                "Redis at {} is unreachable: {why}",
                link.describe()
            ))
        }
    }
    link.use_as_is();
    Ok(link)
}

async fn connect(cfg: &OutboxConfig) -> Result<Ctx, String> {
    let link = one_off_link(cfg).await?;
    let mut conn = link
        .work()
        .map_err(|e| format!("Redis at {}: {e}", link.describe()))?;
    let keys = Keys::new(&cfg.redis.key_prefix);
    let stored: Option<u16> = redis::cmd("HGET")
        .arg(keys.meta())
        .arg("partitions")
        .query_async(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    let mut tags: Vec<String> = redis::cmd("SMEMBERS")
        .arg(keys.tags())
        .query_async(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    tags.sort();
    Ok(Ctx {
        conn,
        keys,
        partitions: stored.unwrap_or(0).max(cfg.redis.partitions).max(1),
        tags,
    })
}

pub async fn stats(cfg: &OutboxConfig) -> Result<Stats, String> {
    let mut c = connect(cfg).await?;
    let now = now_ms();
    if c.tags.is_empty() {
        return Ok(Stats {
            tags: Vec::new(),
            pending: 0,
            dead_letters: 0,
        });
    }
    let backlog = backlog_of(&mut c.conn, &c.keys, c.tags.clone(), c.partitions)
        .await
        .map_err(|e| e.to_string())?;
    let mut pipe = redis::pipe();
    for t in &c.tags {
        for p in 0..c.partitions {
            pipe.cmd("XLEN").arg(&c.keys.partition(t, p).dead);
        }
    }
    let dead: Vec<i64> = pipe
        .query_async(&mut c.conn)
        .await
        .map_err(|e| e.to_string())?;
    let per = usize::from(c.partitions);
    let tags: Vec<TagStats> = backlog
        .into_iter()
        .enumerate()
        .map(|(i, (b, _))| TagStats {
            dead_letters: dead
                .iter()
                .skip(i * per)
                .take(per)
                .map(|n| u64::try_from(*n).unwrap_or(0))
                .sum(),
            oldest_age_secs: b
                .oldest_enqueued_ms
                .map(|t| u64::try_from(now.saturating_sub(t)).unwrap_or(0) / 1000),
            tag: b.tag,
            pending: b.pending,
            leased: b.leased,
        })
        .collect();
    Ok(Stats {
        pending: tags.iter().map(|t| t.pending).sum(),
        dead_letters: tags.iter().map(|t| t.dead_letters).sum(),
        tags,
    })
}

#[derive(serde::Deserialize)]
struct EventName {
    event_name: Option<String>,
}

pub async fn dead_letters(
    cfg: &OutboxConfig,
    tag: Option<&str>,
    limit: usize,
) -> Result<Vec<DeadLetter>, String> {
    let mut c = connect(cfg).await?;
    let tags: Vec<&String> = c
        .tags
        .iter()
        .filter(|t| tag.is_none_or(|w| w == t.as_str()))
        .collect();
    if tags.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for t in &tags {
        for p in 0..c.partitions {
            pipe.cmd("XREVRANGE")
                .arg(&c.keys.partition(t, p).dead)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(limit);
        }
    }
    let replies: Vec<Value> = pipe
        .query_async(&mut c.conn)
        .await
        .map_err(|e| e.to_string())?;
    let mut out: Vec<DeadLetter> = Vec::new();
    let mut it = replies.iter();
    for t in &tags {
        for p in 0..c.partitions {
            let Some(list) = it.next() else { break };
            for e in record::entries(list) {
                let Some(id) = e.id else { continue };
                let dead_at_ms = e
                    .dead_at_ms
                    .unwrap_or_else(|| i64::try_from(id.ms).unwrap_or(0));
                let first = e.first_ms.unwrap_or(dead_at_ms);
                out.push(DeadLetter {
                    id: DeadLetterId::Entry(format!("{t}/{p}/{id}")),
                    tag: (*t).clone(),
                    event_id: e.event_id.unwrap_or_default(),
                    event_name: e.payload.as_deref().and_then(|b| {
                        crate::event::decode_payload::<EventName>(b)
                            .ok()
                            .and_then(|n| n.event_name)
                    }),
                    attempts: e.attempts,
                    first_enqueued_ms: first,
                    dead_at_ms,
                    first_enqueued_at: utc(first),
                    dead_at: utc(dead_at_ms),
                    reason: e.reason.unwrap_or_default(),
                    last_error: e.last_error,
                });
            }
        }
    }
    out.sort_by_key(|d| std::cmp::Reverse(d.dead_at_ms));
    out.truncate(limit);
    Ok(out)
}

pub async fn replay(cfg: &OutboxConfig, tag: Option<&str>) -> Result<usize, String> {
    let mut c = connect(cfg).await?;
    let tags: Vec<String> = c
        .tags
        .iter()
        .filter(|t| tag.is_none_or(|w| w == t.as_str()))
        .cloned()
        .collect();
    let mut moved = 0usize;
    let mut woken: Vec<&str> = Vec::new();
    for t in &tags {
        for p in 0..c.partitions {
            let k = c.keys.partition(t, p);
            loop {
                let n: Value = redis::cmd("EVALSHA")
                    .arg(REPLAY_SCRIPT.get_hash())
                    .arg(3)
                    .arg(&k.dead)
                    .arg(&k.queue)
                    .arg(&k.counts)
                    .arg(GROUP)
                    .arg(WRITE_VERSION)
                    .arg(now_ms())
                    .arg(REPLAY_STEP)
                    .query_async(&mut c.conn)
                    .await
                    .map_err(|e| e.to_string())?;
                let n = usize::try_from(int(&n)).unwrap_or(0);
                moved += n;
                if n > 0 && !woken.contains(&t.as_str()) {
                    woken.push(t);
                }
                if n < REPLAY_STEP as usize {
                    break;
                }
            }
        }
    }
    if !woken.is_empty() {
        let _: Result<i64, _> = redis::cmd("PUBLISH")
            .arg(c.keys.wake_channel())
            .arg(woken.join("\n"))
            .query_async(&mut c.conn)
            .await;
    }
    Ok(moved)
}
