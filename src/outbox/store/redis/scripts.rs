//! The Lua scripts: each moves records of one partition atomically in one round trip, and
//! touches only that partition's keys (one hash tag). Redis 6.2 / 7.0 commands only.
//!
//! The scripts keep the partition's counters (`records`, `bytes` of what is ready or
//! scheduled, `dead_bytes`) in step with what they add and remove, so back-pressure reads
//! three numbers instead of scanning.

use std::sync::LazyLock;

use redis::Script;

/// Shared helpers, prepended to each script.
const PRELUDE: &str = r#"
local function field(f, name)
  for i = 1, #f, 2 do
    if f[i] == name then return f[i + 1] end
  end
  return nil
end
local function count(n, records, bytes, dead_bytes)
  if records ~= 0 then redis.call('HINCRBY', n, 'records', records) end
  if bytes ~= 0 then redis.call('HINCRBY', n, 'bytes', bytes) end
  if dead_bytes ~= 0 then redis.call('HINCRBY', n, 'dead_bytes', dead_bytes) end
end
-- Moves entry `id` (fields `f`) of stream `q` to the dead letters with `reason`.
local function bury(q, dead, n, group, id, f, reason, attempted, now)
  local out = {}
  local attempts = tonumber(field(f, 'a') or '0') or 0
  for i = 1, #f, 2 do
    local k = f[i]
    if k ~= 'a' and k ~= 'r' and k ~= 'd' then
      out[#out + 1] = k
      out[#out + 1] = f[i + 1]
    end
  end
  out[#out + 1] = 'a'
  out[#out + 1] = tostring(attempts + attempted)
  out[#out + 1] = 'r'
  out[#out + 1] = reason
  out[#out + 1] = 'd'
  out[#out + 1] = now
  redis.call('XADD', dead, '*', unpack(out))
  redis.call('XACK', q, group, id)
  redis.call('XDEL', q, id)
  local size = #(field(f, 'p') or '')
  count(n, -1, -size, size)
end
"#;

/// Adds first deliveries. KEYS: q, n. ARGV: group, version, then (event id, first ms,
/// payload) per delivery. Creates the stream with its group (from the start: `0`) when it
/// does not exist. Returns the partition's `{records, bytes}`.
const ENQUEUE: &str = r#"
local q, n = KEYS[1], KEYS[2]
if redis.call('EXISTS', q) == 0 then
  redis.call('XGROUP', 'CREATE', q, ARGV[1], '0', 'MKSTREAM')
end
local v = ARGV[2]
local added, bytes = 0, 0
for i = 3, #ARGV, 3 do
  redis.call('XADD', q, '*', 'v', v, 'e', ARGV[i], 't', ARGV[i + 1], 'p', ARGV[i + 2])
  added = added + 1
  bytes = bytes + #ARGV[i + 2]
end
return {redis.call('HINCRBY', n, 'records', added), redis.call('HINCRBY', n, 'bytes', bytes)}
"#;

/// Leases. KEYS: q, z, pause, n, dead. ARGV: group, consumer, count, now ms, claim (1/0),
/// lease ms (claim idle), claim cursor, most deliveries, highest readable version, idle ms
/// for given-back entries.
///
/// In order: a paused partition returns its pause (ms left) and nothing else; retries due
/// by `now` go back into the stream; with `claim`, entries idle for a lease are claimed
/// (`XAUTOCLAIM`), those delivered too often dead-lettered (they stopped every replica that
/// took them); then new entries are read for this consumer. Entries of a newer schema are
/// given back. Returns `{pause ms, cursor, claimed, new, buried, given back}`, and after
/// burying, the partition's `records, bytes`.
const LEASE: &str = r#"
local q, z, pause, n, dead = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local group, me, want, now = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local cursor = ARGV[7]
local pttl = redis.call('PTTL', pause)
if pttl > 0 then return {pttl, cursor, {}, {}, 0, 0} end
local due = redis.call('ZRANGEBYSCORE', z, '-inf', now, 'LIMIT', 0, 256)
if #due > 0 then
  if redis.call('EXISTS', q) == 0 then
    redis.call('XGROUP', 'CREATE', q, group, '0', 'MKSTREAM')
  end
  for _, m in ipairs(due) do
    redis.call('XADD', q, '*', unpack(cmsgpack.unpack(m)))
  end
  redis.call('ZREM', z, unpack(due))
end
if redis.call('EXISTS', q) == 0 then return {0, cursor, {}, {}, 0, 0} end
local maxv = tonumber(ARGV[9])
local given = 0
-- Entries of a schema this version cannot read go back, as they were, for a newer replica.
local function readable(id, f, deliveries_before)
  local v = tonumber(field(f, 'v') or '')
  if v ~= nil and v > maxv then
    redis.call('XCLAIM', q, group, me, 0, id, 'IDLE', ARGV[10], 'RETRYCOUNT', deliveries_before, 'JUSTID')
    given = given + 1
    return false
  end
  return true
end
local claimed, buried = {}, 0
if ARGV[5] == '1' then
  local r = redis.call('XAUTOCLAIM', q, group, me, ARGV[6], cursor, 'COUNT', want)
  cursor = r[1]
  for _, e in ipairs(r[2]) do
    local id, f = e[1], e[2]
    if type(f) ~= 'table' then
      -- Redis 6.2: an entry deleted while still pending.
      redis.call('XACK', q, group, id)
    else
      local p = redis.call('XPENDING', q, group, id, id, 1)
      local deliveries = (p[1] and tonumber(p[1][4])) or 1
      if readable(id, f, deliveries - 1) then
        if deliveries > tonumber(ARGV[8]) then
          bury(q, dead, n, group, id, f, 'crashed: taken ' .. deliveries .. ' times, and every replica that took it stopped before settling it', 0, now)
          buried = buried + 1
        else
          claimed[#claimed + 1] = e
        end
      end
    end
  end
end
local fresh = {}
local room = want - #claimed
if room > 0 then
  local r = redis.pcall('XREADGROUP', 'GROUP', group, me, 'COUNT', room, 'STREAMS', q, '>')
  if type(r) == 'table' and r.err then
    if string.find(r.err, 'NOGROUP', 1, true) then
      redis.call('XGROUP', 'CREATE', q, group, '0')
      r = redis.call('XREADGROUP', 'GROUP', group, me, 'COUNT', room, 'STREAMS', q, '>')
    else
      return redis.error_reply(r.err)
    end
  end
  if type(r) == 'table' and r[1] then
    for _, e in ipairs(r[1][2]) do
      if readable(e[1], e[2], 0) then fresh[#fresh + 1] = e end
    end
  end
end
if buried > 0 then
  return {0, cursor, claimed, fresh, buried, given,
    tonumber(redis.call('HGET', n, 'records') or '0'), tonumber(redis.call('HGET', n, 'bytes') or '0')}
end
return {0, cursor, claimed, fresh, buried, given}
"#;

/// Settles. KEYS: q, z, dead, n. ARGV: group, consumer, now ms, then per record:
/// `a id` (delivered or skipped), `n id due-ms error` (retry), `d id reason attempted`.
/// A retry or a dead letter applies only while this consumer still holds the entry (after
/// its lease ended another replica may have claimed it and decides its fate); a delivery
/// always applies. Returns `{acked, retried, buried, skipped, records, bytes}`.
const SETTLE: &str = r#"
local q, z, dead, n = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local group, me, now = ARGV[1], ARGV[2], ARGV[3]
local acked, retried, buried, skipped = 0, 0, 0, 0
local function held(id)
  local p = redis.call('XPENDING', q, group, id, id, 1)
  if #p == 0 or p[1][2] ~= me then return nil end
  local e = redis.call('XRANGE', q, id, id)
  if #e == 0 then return nil end
  return e[1][2]
end
local i = 4
while i <= #ARGV do
  local op, id = ARGV[i], ARGV[i + 1]
  if op == 'a' then
    local e = redis.call('XRANGE', q, id, id)
    if #e > 0 then
      redis.call('XACK', q, group, id)
      redis.call('XDEL', q, id)
      count(n, -1, -#(field(e[1][2], 'p') or ''), 0)
      acked = acked + 1
    else
      skipped = skipped + 1
    end
    i = i + 2
  elseif op == 'n' then
    local f = held(id)
    if f then
      local out = {}
      local attempts = tonumber(field(f, 'a') or '0') or 0
      for j = 1, #f, 2 do
        local k = f[j]
        if k ~= 'a' and k ~= 'x' and k ~= 'o' then
          out[#out + 1] = k
          out[#out + 1] = f[j + 1]
        end
      end
      out[#out + 1] = 'a'
      out[#out + 1] = tostring(attempts + 1)
      out[#out + 1] = 'x'
      out[#out + 1] = ARGV[i + 3]
      -- Where it came from: makes the member unique however alike two retries are.
      out[#out + 1] = 'o'
      out[#out + 1] = id
      redis.call('ZADD', z, ARGV[i + 2], cmsgpack.pack(out))
      redis.call('XACK', q, group, id)
      redis.call('XDEL', q, id)
      retried = retried + 1
    else
      skipped = skipped + 1
    end
    i = i + 4
  elseif op == 'd' then
    local f = held(id)
    if f then
      bury(q, dead, n, group, id, f, ARGV[i + 2], tonumber(ARGV[i + 3]), now)
      buried = buried + 1
    else
      skipped = skipped + 1
    end
    i = i + 4
  else
    return redis.error_reply('unknown settle op ' .. tostring(op))
  end
end
return {acked, retried, buried, skipped,
  tonumber(redis.call('HGET', n, 'records') or '0'), tonumber(redis.call('HGET', n, 'bytes') or '0')}
"#;

/// Pauses a partition for ARGV[1] ms unless it is paused longer already. KEYS: pause.
const PAUSE: &str = r#"
local ms = tonumber(ARGV[1])
if redis.call('PTTL', KEYS[1]) < ms then
  redis.call('SET', KEYS[1], '1', 'PX', ms)
end
return 1
"#;

/// Trims dead letters, oldest first, while any limit is exceeded. KEYS: dead, n. ARGV:
/// oldest ms kept (0: no age limit), most kept (0: no cap), most payload bytes (0: none),
/// most removed in this call. Returns `{removed, left}`.
const TRIM_DEAD: &str = r#"
local dead, n = KEYS[1], KEYS[2]
local min_ms, max_n, max_b, budget = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local len = redis.call('XLEN', dead)
local bytes = tonumber(redis.call('HGET', n, 'dead_bytes') or '0') or 0
local removed, freed, done = 0, 0, false
while not done and removed < budget and len > 0 do
  local batch = redis.call('XRANGE', dead, '-', '+', 'COUNT', 100)
  if #batch == 0 then break end
  for _, e in ipairs(batch) do
    local ms = tonumber(string.match(e[1], '^(%d+)')) or 0
    if removed >= budget or not ((min_ms > 0 and ms < min_ms) or (max_n > 0 and len > max_n) or (max_b > 0 and bytes > max_b)) then
      done = true
      break
    end
    local size = #(field(e[2], 'p') or '')
    redis.call('XDEL', dead, e[1])
    len = len - 1
    bytes = bytes - size
    freed = freed + size
    removed = removed + 1
  end
end
count(n, 0, 0, -freed)
return {removed, len}
"#;

/// Moves up to ARGV[4] dead letters (oldest first) back to the stream as first deliveries
/// due now, attempts reset, the last error kept. KEYS: dead, q, n. ARGV: group, version (of
/// the fields it writes), now ms, most. Returns how many moved.
const REPLAY: &str = r#"
local dead, q, n = KEYS[1], KEYS[2], KEYS[3]
local batch = redis.call('XRANGE', dead, '-', '+', 'COUNT', tonumber(ARGV[4]))
if #batch == 0 then return 0 end
if redis.call('EXISTS', q) == 0 then
  redis.call('XGROUP', 'CREATE', q, ARGV[1], '0', 'MKSTREAM')
end
local bytes = 0
for _, e in ipairs(batch) do
  local f, out = e[2], {}
  for j = 1, #f, 2 do
    local k = f[j]
    if k ~= 'a' and k ~= 'r' and k ~= 'd' and k ~= 't' and k ~= 'o' then
      out[#out + 1] = k
      out[#out + 1] = f[j + 1]
    end
  end
  out[#out + 1] = 't'
  out[#out + 1] = ARGV[3]
  redis.call('XADD', q, '*', unpack(out))
  redis.call('XDEL', dead, e[1])
  bytes = bytes + #(field(f, 'p') or '')
end
count(n, #batch, bytes, -bytes)
return #batch
"#;

fn script(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}{body}"))
}

pub static ENQUEUE_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(ENQUEUE));
pub static LEASE_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(LEASE));
pub static SETTLE_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(SETTLE));
pub static PAUSE_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(PAUSE));
pub static TRIM_DEAD_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(TRIM_DEAD));
pub static REPLAY_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(REPLAY));

/// Every script, for `SCRIPT LOAD` after each (re)connect.
pub fn all() -> [&'static Script; 6] {
    [
        &ENQUEUE_SCRIPT,
        &LEASE_SCRIPT,
        &SETTLE_SCRIPT,
        &PAUSE_SCRIPT,
        &TRIM_DEAD_SCRIPT,
        &REPLAY_SCRIPT,
    ]
}
