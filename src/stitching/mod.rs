//! Identity stitching for backend orders: while a visitor browses, what identifies them
//! (visitor id, GA session, `_fbp`/`_fbc`, click ids, IP and User-Agent as consent allows) is
//! recorded under the keys a later order can be found by; when a webhook order arrives it is
//! joined to the best match, so GA4, Meta and Google Ads attribute it to the click.
//!
//! The parts, floor by floor:
//! - [`record`]: pure; which browser events record a session, under which keys, holding what.
//! - [`enrich`]: pure; what a stitched (or unstitched) order event takes from the session.
//! - [`SessionStore`] and [`OrderLedger`]: the storage, engine-neutral. [`embedded`] is the
//!   SQLite implementation (its own database file, never the outbox's), written by one
//!   thread off the hit path.
//! - [`Stitching`] ([`orders`]): what the ingress calls for a webhook's events: claim each
//!   order event once, look its keys up, enrich; then commit or release the claims.
//!
//! With `[outbox] backend = "redis"` the shared outbox's engine provides both stores
//! (`outbox/store/redis/stitch.rs`), so a session recorded by one replica stitches an order
//! another replica takes; see the traits' documentation for what each engine must do.

pub mod cli;
pub mod config;
pub mod embedded;
pub mod enrich;
mod orders;
pub mod record;
#[cfg(test)]
mod tests;

pub use orders::{Prepared, StitchError, Stitching};

use async_trait::async_trait;
use compact_str::CompactString;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::event::{Consent, Identity, KeyKind};

/// A key a session is stored under: the kind's prefix and the value (`r:<checkout token>`,
/// `v:<visitor token>`, `u:<sha256 of the user id>`, `e:<sha256 of the email>`,
/// `k:gclid=<id>`). Emails and user ids are only ever stored hashed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StoreKey(pub String);

/// Longest key value accepted (tokens and ids are far shorter; a longer one is not a key).
const MAX_KEY_CHARS: usize = 256;

impl StoreKey {
    /// The stored form of `value` as a key of `kind`; `None` when it cannot be one (empty,
    /// too long, an email without `@`).
    pub fn new(kind: KeyKind, value: &str) -> Option<StoreKey> {
        let v = value.trim();
        if v.is_empty() || v.chars().count() > MAX_KEY_CHARS {
            return None;
        }
        Some(StoreKey(match kind {
            KeyKind::Visitor => format!("v:{v}"),
            KeyKind::Reference => format!("r:{}", reference(v)?),
            KeyKind::UserId => format!("u:{}", sha256_hex(v)),
            KeyKind::Email => format!("e:{}", email_hash(v)?),
            KeyKind::Click => format!("k:{v}"),
        }))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An order reference as stored: a Shopify cart token may carry a `?key=…` suffix on one side
/// and not the other, so only what precedes `?` counts.
fn reference(v: &str) -> Option<&str> {
    let r = v.split('?').next().unwrap_or(v).trim();
    (!r.is_empty()).then_some(r)
}

/// The ad click ids a landing URL carries, as `<param>=<id>` key values, in this order.
pub fn click_keys(url: &str) -> impl Iterator<Item = String> + '_ {
    const PARAMS: [&str; 6] = ["gclid", "gbraid", "wbraid", "fbclid", "ttclid", "msclkid"];
    PARAMS.into_iter().filter_map(move |p| {
        let id = if p == "fbclid" {
            crate::identity::fbclid_from_url(url)
        } else {
            crate::identity::click_id_in_url(url, p)
        };
        id.map(|id| format!("{p}={id}"))
    })
}

pub(crate) fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// The hash an email is stored and looked up by: SHA-256 of the trimmed, lower-cased address
/// (the form Meta and Google both start from). A value that already is a SHA-256 hex digest
/// (GA4's `sha256_email_address`) is taken as it is, lower-cased.
pub fn email_hash(email: &str) -> Option<String> {
    let e = email.trim();
    if e.len() == 64 && e.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Some(e.to_ascii_lowercase());
    }
    let (local, domain) = e.split_once('@')?;
    if local.is_empty() || domain.is_empty() || e.contains(char::is_whitespace) {
        return None;
    }
    Some(sha256_hex(&e.to_lowercase()))
}

/// What a browsing session leaves for a later order: only what the consent of the event that
/// recorded it allowed (see [`record`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SessionSnapshot {
    pub recorded_ms: i64,
    /// The browser event that recorded it.
    pub event_name: CompactString,
    /// The visitor id (FPID) / GA client id the events carried.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<CompactString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measurement_id: Option<CompactString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<CompactString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_number: Option<u32>,
    /// `_fbp`, `_fbc`, the `_ga` client id and every click id the keeper held.
    #[serde(skip_serializing_if = "Identity::is_empty")]
    pub identity: Identity,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page_location: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page_referrer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub language: Option<CompactString>,
    #[serde(skip_serializing_if = "Consent::is_empty")]
    pub consent: Consent,
}

/// One session to record under its keys.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRecord {
    /// Each key with the browser-side name it came from (`transaction_id`, `cart`, …).
    pub keys: Vec<(StoreKey, CompactString)>,
    /// For `tagrelay identity forget --client-id`.
    pub client_id: Option<String>,
    /// The email's hash, for `tagrelay identity forget --email`.
    pub email: Option<String>,
    pub snapshot: SessionSnapshot,
}

/// The session an order's key found.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    /// Which of the looked-up keys matched (index into them).
    pub index: usize,
    /// The browser-side name of that key.
    pub label: CompactString,
    pub snapshot: SessionSnapshot,
}

/// The answer to claiming an order event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Not sent within the window, and now held by this request until it commits or
    /// releases the claim.
    Fresh,
    /// Already sent (at this time).
    Done { at_ms: i64 },
    /// Another request holds the claim right now.
    Busy,
}

/// Whose records `tagrelay identity forget` erases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forget {
    /// Plain address (hashed before it is looked up) or its SHA-256.
    Email(String),
    ClientId(String),
}

/// Retention and bounds, from `[stitching]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub ttl_ms: i64,
    pub max_records: u64,
    pub dedup_window_ms: i64,
}

/// The stores a [`Stitching`] uses, as one engine provides them.
#[derive(Clone)]
pub struct Stores {
    pub sessions: std::sync::Arc<dyn SessionStore>,
    pub ledger: std::sync::Arc<dyn OrderLedger>,
}

/// A store operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("the stitching store is closed")]
    Closed,
    #[error("stitching store error: {0}")]
    Io(String),
}

/// Browsing sessions by key. What any engine must do:
/// - `record` never waits: the hit path hands records over and goes on; what cannot be kept
///   (queue full, store down) is dropped and counted. A record replaces an older one under
///   the same key, never a newer one.
/// - `find` returns the first of `keys` (they come best first) with a record not older than
///   the retention (`[stitching] ttl_days`), and sees every record handed over before it.
/// - Retention and size are enforced by the engine (expiry, oldest first).
/// - `forget` erases every record of a person: those under their email's key or carrying
///   their email hash, and every record of the client ids found there (or of the client id
///   given).
#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    fn record(&self, records: Vec<SessionRecord>);
    async fn find(&self, keys: &[StoreKey], now_ms: i64) -> Result<Option<Found>, StoreError>;
    async fn forget(&self, who: &Forget) -> Result<u64, StoreError>;
}

/// Which order events were sent, for `[stitching] dedup_window_days`. What any engine must do:
/// - `claim` is atomic across everything sharing the store: of concurrent claims of one key,
///   one gets `Fresh`, the others `Busy`; a key committed within the window is `Done`.
/// - A `Fresh` claim is held until `settle`: committed (`sent = true`: `Done` for the
///   window, durable before `settle` returns) or released (`false`: free again at once).
///   A claim whose holder died must become free again (in memory, or a lease of a minute).
#[async_trait]
pub trait OrderLedger: Send + Sync + 'static {
    async fn claim(&self, key: &str, now_ms: i64) -> Result<Claim, StoreError>;
    async fn settle(&self, keys: &[String], sent: bool, now_ms: i64) -> Result<(), StoreError>;
}
