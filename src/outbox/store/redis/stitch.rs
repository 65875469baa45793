//! The stitching stores on the shared Redis, so that a session recorded by one replica
//! stitches the order another replica takes, and an order is claimed once across all.
//!
//! | key                 | type   | holds                                                      |
//! |---------------------|--------|------------------------------------------------------------|
//! | `P:st:s:<key>`      | hash   | a session: `r` recorded ms, `l` label, `v` snapshot (JSON), `c` client id, `e` email hash; expires after the retention |
//! | `P:st:idx`          | zset   | every session key, scored by when it was recorded (size cap, purge) |
//! | `P:st:c:<client>`   | set    | the session keys a client id recorded (for `forget`)       |
//! | `P:st:e:<hash>`     | set    | the session keys an email hash recorded (for `forget`)     |
//! | `P:st:o:<order>`    | string | `c:<consumer>` while claimed (a lease of a minute), `s:<ms>` once sent (kept for the dedup window) |
//!
//! Session records are written by one task per process, off the hit path, pipelined; a
//! lookup goes through the same task, so it sees every record this process handed over
//! before it. Scripts touch keys they compute (session keys from the index): Redis Cluster is
//! refused for the outbox anyway.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use redis::Script;
use std::sync::LazyLock;
use tokio::sync::{mpsc, oneshot};

use super::conn::Link;
use crate::stitching::{
    email_hash, Claim, Forget, Found, Limits, OrderLedger, SessionRecord, SessionSnapshot,
    SessionStore, StoreError, StoreKey,
};

/// Records and lookups waiting for the writer task; past this, records are dropped (counted).
const QUEUE: usize = 16_384;
/// Commands taken per wake-up: their records go out in one pipeline.
const BATCH: usize = 512;
/// How often expired sessions leave the index and the size cap is applied.
const PURGE_INTERVAL: Duration = Duration::from_secs(60);
/// A claim whose holder died is free again after this.
const CLAIM_LEASE_MS: u64 = 60_000;
/// Sessions deleted per purge step.
const PURGE_STEP: usize = 1000;

/// Newest wins: a record older than the one under its key is dropped.
static RECORD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local cur = redis.call('HGET', KEYS[1], 'r')
if cur and tonumber(cur) > tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'r', ARGV[1], 'l', ARGV[2], 'v', ARGV[3], 'c', ARGV[4], 'e', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('ZADD', KEYS[2], ARGV[1], KEYS[1])
if ARGV[4] ~= '' then
  redis.call('SADD', KEYS[3], KEYS[1])
  redis.call('PEXPIRE', KEYS[3], ARGV[6])
end
if ARGV[5] ~= '' then
  redis.call('SADD', KEYS[4], KEYS[1])
  redis.call('PEXPIRE', KEYS[4], ARGV[6])
end
return 1
",
    )
});

/// `{'fresh'}`, `{'busy'}` or `{'done', sent_ms}`.
static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local v = redis.call('GET', KEYS[1])
if v then
  local sent = string.match(v, '^s:(%-?%d+)$')
  if not sent then return {'busy'} end
  if tonumber(sent) >= tonumber(ARGV[3]) then return {'done', sent} end
end
redis.call('SET', KEYS[1], 'c:' .. ARGV[1], 'PX', ARGV[2])
return {'fresh'}
",
    )
});

/// Frees a claim this process still holds (a lapsed lease may have passed it on).
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == 'c:' .. ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
",
    )
});

/// Deletes sessions recorded before ARGV[1], then the oldest over ARGV[2], at most
/// ARGV[3] of each; returns how many went.
static PURGE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local step = tonumber(ARGV[3])
local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1], 'LIMIT', 0, step)
for i = 1, #old do redis.call('DEL', old[i]) end
if #old > 0 then redis.call('ZREM', KEYS[1], unpack(old)) end
local n = #old
local over = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[2])
if over > 0 then
  local popped = redis.call('ZPOPMIN', KEYS[1], math.min(over, step))
  for i = 1, #popped, 2 do
    redis.call('DEL', popped[i])
    n = n + 1
  end
end
return n
",
    )
});

/// Deletes the sessions of a key set whose field ARGV[1] is ARGV[2] (a key may since hold
/// another person's newer session), and the set; returns the client ids of those deleted
/// and, first, how many.
static FORGET_SET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local keys = redis.call('SMEMBERS', KEYS[1])
local n, clients = 0, {}
for i = 1, #keys do
  local f = redis.call('HMGET', keys[i], ARGV[1], 'c')
  if f[1] == ARGV[2] then
    redis.call('DEL', keys[i])
    redis.call('ZREM', KEYS[2], keys[i])
    n = n + 1
    if f[2] and f[2] ~= '' then clients[#clients + 1] = f[2] end
  end
end
redis.call('DEL', KEYS[1])
table.insert(clients, 1, n)
return clients
",
    )
});

enum Cmd {
    Record(Vec<SessionRecord>),
    Find {
        keys: Vec<StoreKey>,
        now_ms: i64,
        reply: oneshot::Sender<Result<Option<Found>, StoreError>>,
    },
    Purge {
        now_ms: i64,
        reply: Option<oneshot::Sender<()>>,
    },
}

/// Key names under the outbox's prefix.
#[derive(Debug, Clone)]
struct Names {
    prefix: String,
    index: String,
}

impl Names {
    fn new(prefix: &str) -> Names {
        Names {
            prefix: format!("{prefix}:st:"),
            index: format!("{prefix}:st:idx"),
        }
    }
    fn session(&self, key: &StoreKey) -> String {
        format!("{}s:{}", self.prefix, key.as_str())
    }
    fn client(&self, id: &str) -> String {
        format!("{}c:{id}", self.prefix)
    }
    fn email(&self, hash: &str) -> String {
        format!("{}e:{hash}", self.prefix)
    }
    fn order(&self, key: &str) -> String {
        format!("{}o:{key}", self.prefix)
    }
}

/// The Redis [`SessionStore`] and [`OrderLedger`]. Cheap to share behind an `Arc`.
pub struct RedisStitchStore {
    link: Arc<Link>,
    names: Names,
    limits: Limits,
    /// Marks this process's claims.
    owner: String,
    tx: mpsc::Sender<Cmd>,
}

impl std::fmt::Debug for RedisStitchStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStitchStore")
            .field("prefix", &self.names.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisStitchStore {
    /// Starts the writer task and its purge timer (on the current Tokio runtime). They end
    /// when the link closes.
    pub(crate) fn start(
        link: Arc<Link>,
        key_prefix: &str,
        owner: &str,
        limits: Limits,
    ) -> Arc<RedisStitchStore> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let store = Arc::new(RedisStitchStore {
            link: link.clone(),
            names: Names::new(key_prefix),
            limits,
            owner: owner.to_owned(),
            tx: tx.clone(),
        });
        tokio::spawn(run(link.clone(), store.names.clone(), limits, rx));
        tokio::spawn(async move {
            let mut every = tokio::time::interval_at(
                tokio::time::Instant::now() + PURGE_INTERVAL,
                PURGE_INTERVAL,
            );
            while !link.is_closed() {
                every.tick().await;
                let cmd = Cmd::Purge {
                    now_ms: crate::clock::now_ms(),
                    reply: None,
                };
                if tx.send(cmd).await.is_err() {
                    return;
                }
            }
        });
        store
    }

    fn conn(&self) -> Result<MultiplexedConnection, StoreError> {
        self.link.work().map_err(|e| StoreError::Io(e.to_string()))
    }

    fn failed(&self, e: &redis::RedisError) -> StoreError {
        StoreError::Io(self.link.failed(e).to_string())
    }

    /// Applies retention and the size cap now, after everything handed over before.
    pub async fn purge(&self, now_ms: i64) {
        let (reply, rx) = oneshot::channel();
        let cmd = Cmd::Purge {
            now_ms,
            reply: Some(reply),
        };
        if self.tx.send(cmd).await.is_ok() {
            let _ = rx.await;
        }
    }

    async fn forget_set(
        &self,
        conn: &mut MultiplexedConnection,
        set: &str,
        field: &str,
        value: &str,
    ) -> Result<(u64, Vec<String>), StoreError> {
        let mut out: Vec<redis::Value> = FORGET_SET
            .key(set)
            .key(&self.names.index)
            .arg(field)
            .arg(value)
            .invoke_async(conn)
            .await
            .map_err(|e| self.failed(&e))?;
        let n = match out.first() {
            Some(redis::Value::Int(n)) => u64::try_from(*n).unwrap_or(0),
            _ => 0,
        };
        let clients = out
            .drain(1.min(out.len())..)
            .filter_map(|v| redis::from_redis_value::<String>(v).ok())
            .collect();
        Ok((n, clients))
    }
}

#[async_trait]
impl SessionStore for RedisStitchStore {
    fn record(&self, records: Vec<SessionRecord>) {
        let n: usize = records.iter().map(|r| r.keys.len()).sum();
        let reason = match self.tx.try_send(Cmd::Record(records)) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(_)) => "queue_full",
            Err(mpsc::error::TrySendError::Closed(_)) => "closed",
        };
        metrics::counter!("tagrelay_stitch_sessions_dropped_total", "reason" => reason)
            .increment(n as u64);
    }

    async fn find(&self, keys: &[StoreKey], now_ms: i64) -> Result<Option<Found>, StoreError> {
        let (reply, rx) = oneshot::channel();
        let cmd = Cmd::Find {
            keys: keys.to_vec(),
            now_ms,
            reply,
        };
        self.tx.send(cmd).await.map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn forget(&self, who: &Forget) -> Result<u64, StoreError> {
        let mut conn = self.conn()?;
        let mut n = 0;
        let clients = match who {
            Forget::ClientId(cid) => vec![cid.clone()],
            Forget::Email(email) => {
                let Some(hash) = email_hash(email) else {
                    return Err(StoreError::Io(format!("`{email}` is not an email address")));
                };
                // The record under the email's own key, then every record carrying the hash.
                let own = self.names.session(&StoreKey(format!("e:{hash}")));
                let (cid, deleted): (Option<String>, u64) = redis::pipe()
                    .hget(&own, "c")
                    .del(&own)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| self.failed(&e))?;
                n += deleted;
                let (m, mut clients) = self
                    .forget_set(&mut conn, &self.names.email(&hash), "e", &hash)
                    .await?;
                n += m;
                clients.extend(cid.filter(|c| !c.is_empty()));
                clients.sort();
                clients.dedup();
                clients
            }
        };
        for cid in clients {
            let (m, _) = self
                .forget_set(&mut conn, &self.names.client(&cid), "c", &cid)
                .await?;
            n += m;
        }
        Ok(n)
    }
}

#[async_trait]
impl OrderLedger for RedisStitchStore {
    async fn claim(&self, key: &str, now_ms: i64) -> Result<Claim, StoreError> {
        let mut conn = self.conn()?;
        let reply: Vec<String> = CLAIM
            .key(self.names.order(key))
            .arg(&self.owner)
            .arg(CLAIM_LEASE_MS)
            .arg(now_ms - self.limits.dedup_window_ms)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.failed(&e))?;
        match reply.first().map(String::as_str) {
            Some("fresh") => Ok(Claim::Fresh),
            Some("busy") => Ok(Claim::Busy),
            Some("done") => Ok(Claim::Done {
                at_ms: reply.get(1).and_then(|s| s.parse().ok()).unwrap_or(0),
            }),
            other => Err(StoreError::Io(format!("unexpected claim reply {other:?}"))),
        }
    }

    async fn settle(&self, keys: &[String], sent: bool, now_ms: i64) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        if sent {
            let window = u64::try_from(self.limits.dedup_window_ms)
                .unwrap_or(0)
                .max(1);
            let mut pipe = redis::pipe();
            for k in keys {
                pipe.cmd("SET")
                    .arg(self.names.order(k))
                    .arg(format!("s:{now_ms}"))
                    .arg("PX")
                    .arg(window)
                    .ignore();
            }
            pipe.query_async::<()>(&mut conn)
                .await
                .map_err(|e| self.failed(&e))
        } else {
            for k in keys {
                RELEASE
                    .key(self.names.order(k))
                    .arg(&self.owner)
                    .invoke_async::<()>(&mut conn)
                    .await
                    .map_err(|e| self.failed(&e))?;
            }
            Ok(())
        }
    }
}

/// The writer task: records batched into one pipeline per wake-up, lookups and purges in
/// order after the records handed over before them.
async fn run(link: Arc<Link>, names: Names, limits: Limits, mut rx: mpsc::Receiver<Cmd>) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut records = Vec::new();
    loop {
        if rx.recv_many(&mut batch, BATCH).await == 0 || link.is_closed() {
            return;
        }
        for cmd in batch.drain(..) {
            if let Cmd::Record(r) = cmd {
                records.extend(r);
                continue;
            }
            write_records(&link, &names, &limits, &mut records).await;
            match cmd {
                Cmd::Record(_) => {}
                Cmd::Find {
                    keys,
                    now_ms,
                    reply,
                } => {
                    let _ = reply.send(find(&link, &names, &keys, now_ms - limits.ttl_ms).await);
                }
                Cmd::Purge { now_ms, reply } => {
                    purge(&link, &names, &limits, now_ms).await;
                    if let Some(r) = reply {
                        let _ = r.send(());
                    }
                }
            }
        }
        write_records(&link, &names, &limits, &mut records).await;
    }
}

async fn write_records(
    link: &Link,
    names: &Names,
    limits: &Limits,
    records: &mut Vec<SessionRecord>,
) {
    if records.is_empty() {
        return;
    }
    let n: usize = records.iter().map(|r| r.keys.len()).sum();
    let ttl = u64::try_from(limits.ttl_ms).unwrap_or(0).max(1);
    let mut pipe = redis::pipe();
    for r in records.iter() {
        let snapshot = serde_json::to_string(&r.snapshot).unwrap_or_default();
        let client = r.client_id.as_deref().unwrap_or("");
        let email = r.email.as_deref().unwrap_or("");
        for (key, label) in &r.keys {
            pipe.cmd("EVALSHA")
                .arg(RECORD.get_hash())
                .arg(4)
                .arg(names.session(key))
                .arg(&names.index)
                .arg(names.client(client))
                .arg(names.email(email))
                .arg(r.snapshot.recorded_ms)
                .arg(label.as_str())
                .arg(&snapshot)
                .arg(client)
                .arg(email)
                .arg(ttl)
                .ignore();
        }
    }
    records.clear();
    let result = match link.work() {
        Ok(mut conn) => {
            let mut sent = pipe.query_async::<()>(&mut conn).await;
            // A pipeline cannot load a script itself: after a Redis restart, load and resend.
            if matches!(&sent, Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript))
            {
                sent = match RECORD.load_async(&mut conn).await {
                    Ok(_) => pipe.query_async::<()>(&mut conn).await,
                    Err(e) => Err(e),
                };
            }
            sent.map_err(|e| link.failed(&e).to_string())
        }
        Err(e) => Err(e.to_string()),
    };
    match result {
        Ok(()) => metrics::counter!("tagrelay_stitch_sessions_recorded_total").increment(n as u64),
        Err(e) => {
            metrics::counter!("tagrelay_stitch_sessions_dropped_total", "reason" => "store_error")
                .increment(n as u64);
            tracing::warn!(error = %e, keys = n, "stitching store: sessions not recorded; their orders will go out unstitched");
        }
    }
}

async fn find(
    link: &Link,
    names: &Names,
    keys: &[StoreKey],
    cutoff_ms: i64,
) -> Result<Option<Found>, StoreError> {
    if keys.is_empty() {
        return Ok(None);
    }
    let mut conn = link.work().map_err(|e| StoreError::Io(e.to_string()))?;
    let mut pipe = redis::pipe();
    for k in keys {
        pipe.cmd("HMGET")
            .arg(names.session(k))
            .arg(&["r", "l", "v"]);
    }
    type Row = (Option<i64>, Option<String>, Option<String>);
    let rows: Vec<Row> = pipe
        .query_async(&mut conn)
        .await
        .map_err(|e| StoreError::Io(link.failed(&e).to_string()))?;
    for (index, row) in rows.into_iter().enumerate() {
        let (Some(recorded), Some(label), Some(v)) = row else {
            continue;
        };
        if recorded < cutoff_ms {
            continue;
        }
        match serde_json::from_str::<SessionSnapshot>(&v) {
            Ok(snapshot) => {
                return Ok(Some(Found {
                    index,
                    label: label.into(),
                    snapshot,
                }))
            }
            Err(e) => {
                tracing::warn!(error = %e, "stitching store: an unreadable session was skipped")
            }
        }
    }
    Ok(None)
}

async fn purge(link: &Link, names: &Names, limits: &Limits, now_ms: i64) {
    let Ok(mut conn) = link.work() else {
        return;
    };
    let mut total = 0u64;
    loop {
        let step: Result<u64, _> = PURGE
            .key(&names.index)
            .arg(now_ms - limits.ttl_ms)
            .arg(limits.max_records)
            .arg(PURGE_STEP)
            .invoke_async(&mut conn)
            .await;
        match step {
            Ok(n) => {
                total += n;
                if n < PURGE_STEP as u64 {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(error = %link.failed(&e), "stitching store: purge failed; retried in a minute");
                break;
            }
        }
    }
    if total > 0 {
        metrics::counter!("tagrelay_stitch_sessions_purged_total").increment(total);
    }
}

/// `tagrelay identity forget` against the shared store of `cfg`.
pub async fn forget(
    cfg: &crate::outbox::config::OutboxConfig,
    limits: Limits,
    who: &Forget,
) -> Result<u64, String> {
    let link = Arc::new(super::tools::one_off_link(cfg).await?);
    let store = RedisStitchStore::start(link.clone(), &cfg.redis.key_prefix, "forget", limits);
    let n = store.forget(who).await.map_err(|e| e.to_string());
    link.close();
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::store::redis::test_server::RedisServer;
    use crate::outbox::store::redis::RedisStore;
    use crate::outbox::DeliveryStore;
    use crate::stitching::{SessionSnapshot, Stores};

    const DAY_MS: i64 = 86_400_000;

    fn limits() -> Limits {
        Limits {
            ttl_ms: 30 * DAY_MS,
            max_records: 1000,
            dedup_window_ms: 90 * DAY_MS,
        }
    }

    /// Two replicas' stitching stores on one Redis, as the application opens them.
    async fn replicas(server: &RedisServer, limits: Limits) -> (Stores, Stores) {
        let cfg = super::super::tests::config(server);
        let a = RedisStore::open(&cfg).await.unwrap();
        let b = RedisStore::open(&cfg).await.unwrap();
        (
            a.shared_stitching(limits).unwrap(),
            b.shared_stitching(limits).unwrap(),
        )
    }

    fn rec(key: &str, label: &str, client: &str, email: Option<&str>, at: i64) -> SessionRecord {
        SessionRecord {
            keys: vec![(StoreKey(key.into()), label.into())],
            client_id: Some(client.into()),
            email: email.map(str::to_owned),
            snapshot: SessionSnapshot {
                recorded_ms: at,
                event_name: "begin_checkout".into(),
                client_id: Some(client.into()),
                ..SessionSnapshot::default()
            },
        }
    }

    fn keys(list: &[&str]) -> Vec<StoreKey> {
        list.iter().map(|k| StoreKey((*k).into())).collect()
    }

    /// What `find` on `store` answers once everything it was handed is written.
    async fn client_of(store: &Stores, key: &str, now: i64) -> Option<String> {
        store
            .sessions
            .find(&keys(&[key]), now)
            .await
            .unwrap()
            .and_then(|f| f.snapshot.client_id.map(String::from))
    }

    #[tokio::test]
    async fn a_session_one_replica_records_is_found_by_another_newest_kept_best_key_first() {
        let server = RedisServer::start(&[]);
        let (a, b) = replicas(&server, limits()).await;
        let now = crate::clock::now_ms();
        a.sessions
            .record(vec![rec("r:A", "transaction_id", "c1", None, now - 10)]);
        a.sessions
            .record(vec![rec("e:H", "email", "c2", None, now - 5)]);
        // A lookup on `a` comes after its own records; then `b` sees them.
        assert_eq!(client_of(&a, "r:A", now).await.as_deref(), Some("c1"));
        let f = b
            .sessions
            .find(&keys(&["v:none", "r:A", "e:H"]), now)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((f.index, f.label.as_str()), (1, "transaction_id"));
        // Newer replaces older, whichever replica records it; older never replaces newer.
        b.sessions
            .record(vec![rec("r:A", "checkout_token", "c3", None, now - 1)]);
        a.sessions
            .record(vec![rec("r:A", "transaction_id", "c0", None, now - 100)]);
        assert_eq!(client_of(&b, "r:A", now).await.as_deref(), Some("c3"));
        assert_eq!(client_of(&a, "r:A", now).await.as_deref(), Some("c3"));
        // Past the retention a session no longer matches, and the purge deletes it.
        a.sessions.record(vec![rec(
            "r:OLD",
            "transaction_id",
            "c9",
            None,
            now - 31 * DAY_MS,
        )]);
        assert_eq!(client_of(&a, "r:OLD", now).await, None);
        let mut conn = redis::Client::open(server.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let exists = |k: &'static str| {
            let mut c = conn.clone();
            async move {
                redis::cmd("EXISTS")
                    .arg(format!("tagrelay:st:s:{k}"))
                    .query_async::<bool>(&mut c)
                    .await
                    .unwrap()
            }
        };
        assert!(exists("r:OLD").await);
        purge_now(&server, now).await;
        assert!(!exists("r:OLD").await, "purged");
        assert!(exists("r:A").await);
        let _ = redis::cmd("PING").query_async::<String>(&mut conn).await;
    }

    /// A purge through a store of its own, after the others' writes were seen.
    async fn purge_now(server: &RedisServer, now: i64) {
        purge_with(server, limits(), now).await;
    }

    async fn purge_with(server: &RedisServer, limits: Limits, now: i64) {
        let cfg = super::super::tests::config(server);
        let link = Arc::new(super::super::tools::one_off_link(&cfg).await.unwrap());
        let store = RedisStitchStore::start(link.clone(), "tagrelay", "purger", limits);
        store.purge(now).await;
        link.close();
    }

    #[tokio::test]
    async fn the_size_cap_keeps_the_newest_sessions() {
        let server = RedisServer::start(&[]);
        let (a, _) = replicas(&server, limits()).await;
        let now = crate::clock::now_ms();
        for i in 0..5 {
            a.sessions.record(vec![rec(
                &format!("r:{i}"),
                "transaction_id",
                "c",
                None,
                now - 100 + i,
            )]);
        }
        assert!(client_of(&a, "r:4", now).await.is_some());
        purge_with(
            &server,
            Limits {
                max_records: 3,
                ..limits()
            },
            now,
        )
        .await;
        for i in 0..5 {
            let found = client_of(&a, &format!("r:{i}"), now).await;
            assert_eq!(found.is_some(), i >= 2, "key {i}");
        }
    }

    #[tokio::test]
    async fn an_order_is_claimed_once_across_replicas_and_a_dead_holders_claim_lapses() {
        let server = RedisServer::start(&[]);
        let (a, b) = replicas(&server, limits()).await;
        let now = crate::clock::now_ms();
        let k = "shopify:1:purchase";
        assert_eq!(a.ledger.claim(k, now).await.unwrap(), Claim::Fresh);
        assert_eq!(b.ledger.claim(k, now).await.unwrap(), Claim::Busy);
        // Released by the holder: free again, for the other replica too.
        a.ledger.settle(&[k.to_owned()], false, now).await.unwrap();
        assert_eq!(b.ledger.claim(k, now).await.unwrap(), Claim::Fresh);
        // A replica cannot release another's claim.
        a.ledger.settle(&[k.to_owned()], false, now).await.unwrap();
        assert_eq!(a.ledger.claim(k, now).await.unwrap(), Claim::Busy);
        b.ledger.settle(&[k.to_owned()], true, now).await.unwrap();
        assert_eq!(
            a.ledger.claim(k, now + 1).await.unwrap(),
            Claim::Done { at_ms: now }
        );
        // Past the window it may be sent again.
        assert_eq!(
            a.ledger.claim(k, now + 91 * DAY_MS).await.unwrap(),
            Claim::Fresh
        );
        // A claim is a lease: its holder may die holding it.
        let mut conn = redis::Client::open(server.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let k2 = "shopify:2:purchase";
        let marker = format!("tagrelay:st:o:{k2}");
        assert_eq!(a.ledger.claim(k2, now).await.unwrap(), Claim::Fresh);
        let lease: i64 = redis::cmd("PTTL")
            .arg(&marker)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(
            (1..=CLAIM_LEASE_MS as i64).contains(&lease),
            "lease {lease} ms"
        );
        assert_eq!(b.ledger.claim(k2, now).await.unwrap(), Claim::Busy);
        // The lease runs out (shortened here): the claim is free for the other replica.
        redis::cmd("PEXPIRE")
            .arg(&marker)
            .arg(1)
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match b.ledger.claim(k2, now).await.unwrap() {
                Claim::Fresh => break,
                Claim::Busy if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                other => panic!("the dead holder's claim never lapsed: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn forget_erases_a_persons_sessions_by_email_or_client_id_on_every_replica() {
        let server = RedisServer::start(&[]);
        let (a, b) = replicas(&server, limits()).await;
        let now = crate::clock::now_ms();
        let hash = email_hash("bob@example.com").unwrap();
        let mut with_email = rec("r:T1", "transaction_id", "bob-browser", Some(&hash), now);
        with_email
            .keys
            .push((StoreKey(format!("e:{hash}")), "email".into()));
        a.sessions.record(vec![
            with_email,
            // The same browser, earlier, before the email was known.
            rec("r:CART", "cart", "bob-browser", None, now - 1000),
            rec("r:T2", "transaction_id", "someone-else", None, now),
        ]);
        assert!(client_of(&a, "r:T2", now).await.is_some());
        let n = b
            .sessions
            .forget(&Forget::Email(" BOB@example.com".into()))
            .await
            .unwrap();
        assert_eq!(
            n, 3,
            "both keys of the email's record and the browser's other one"
        );
        for k in ["r:CART", "r:T1"] {
            assert_eq!(client_of(&a, k, now).await, None, "{k}");
        }
        assert!(client_of(&a, "r:T2", now).await.is_some());
        // A key since taken by another person's newer session is not theirs to erase.
        a.sessions
            .record(vec![rec("r:SHARED", "cart", "someone-else", None, now - 5)]);
        a.sessions
            .record(vec![rec("r:SHARED", "cart", "third", None, now)]);
        assert_eq!(
            client_of(&a, "r:SHARED", now).await.as_deref(),
            Some("third")
        );
        let n = a
            .sessions
            .forget(&Forget::ClientId("someone-else".into()))
            .await
            .unwrap();
        assert_eq!(n, 1);
        assert_eq!(client_of(&b, "r:T2", now).await, None);
        assert_eq!(
            client_of(&b, "r:SHARED", now).await.as_deref(),
            Some("third")
        );
        assert!(b
            .sessions
            .forget(&Forget::Email("nobody".into()))
            .await
            .is_err());
    }
}
