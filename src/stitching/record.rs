//! Which browser events record a session for later orders, under which keys, holding what.
//! Pure: the hit path calls it after identity, and hands the result to the store.
//!
//! Keys (the browser side of the contract): the event's `transaction_id`, the parameters
//! `checkout_token`, `cart_token` and `tagrelay_visitor`, `user_id` (hashed), the email of
//! `user_data` (hashed), Shopify's `cart` cookie when the request carries it, and the ad click
//! ids of a landing page's URL. An event with none of them records nothing, so a page view
//! costs a few field reads.
//!
//! Consent: a signal that is denied, or unknown while `[cookies] require_consent` is on with
//! `consent_default = "denied"`, keeps its identifiers out: `analytics_storage` the client id
//! and GA session, `ad_storage` `_fbp`/`_fbc` and the click ids, `ad_user_data` (or
//! `ad_storage` when the hit does not say) the IP and User-Agent. The consent itself is kept,
//! so a stitched order is sent only where the visitor's consent lets it go.

use compact_str::CompactString;

use super::{email_hash, SessionRecord, SessionSnapshot, StoreKey};
use crate::event::{ConsentState, Event, KeyKind};

/// The event parameter `tagrelay.js` puts its visitor token in.
pub const VISITOR_PARAM: &str = "tagrelay_visitor";
/// Shopify's cart cookie (its value is the cart token an order's `cart_token` repeats).
pub const SHOPIFY_CART_COOKIE: &str = "cart";
/// Event parameters recorded as order references.
const REFERENCE_PARAMS: [&str; 2] = ["checkout_token", "cart_token"];

/// How records are taken, from the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordPolicy {
    /// `[cookies] require_consent` with `consent_default = "denied"`: unknown means denied.
    pub unknown_is_denied: bool,
    /// Read Shopify's `cart` cookie (only when a Shopify client is configured: elsewhere a
    /// cookie of that name means something else).
    pub shopify_cart: bool,
}

impl RecordPolicy {
    fn allows(&self, s: ConsentState) -> bool {
        match s {
            ConsentState::Granted => true,
            ConsentState::Denied => false,
            ConsentState::Unknown => !self.unknown_is_denied,
        }
    }
}

/// The records a hit's events make (identity already applied), at most one per event that
/// carries a key.
pub fn records(
    events: &[Event],
    cookie_header: Option<&str>,
    policy: &RecordPolicy,
    now_ms: i64,
) -> Vec<SessionRecord> {
    let cart = if policy.shopify_cart {
        cookie_header
            .and_then(|h| crate::identity::cookie_value(h, SHOPIFY_CART_COOKIE))
            .map(|v| {
                percent_encoding::percent_decode_str(v)
                    .decode_utf8_lossy()
                    .into_owned()
            })
    } else {
        None
    };
    let mut out = Vec::new();
    for e in events {
        let mut keys: Vec<(StoreKey, CompactString)> = Vec::new();
        let mut push = |kind: KeyKind, value: &str, label: &str| {
            if let Some(k) = StoreKey::new(kind, value) {
                if !keys.iter().any(|(have, _)| *have == k) {
                    keys.push((k, label.into()));
                }
            }
        };
        if let Some(t) = &e.transaction_id {
            push(KeyKind::Reference, t, "transaction_id");
        }
        for p in REFERENCE_PARAMS {
            if let Some(v) = e.params.get(p).and_then(text) {
                push(KeyKind::Reference, &v, p);
            }
        }
        if let Some(v) = e.params.get(VISITOR_PARAM).and_then(text) {
            push(KeyKind::Visitor, &v, VISITOR_PARAM);
        }
        if let Some(c) = &cart {
            push(KeyKind::Reference, c, "cart");
        }
        // Only landing hits carry a click id in their URL: they record the visit the click
        // began, for an order whose landing site repeats it.
        if let Some(url) = e
            .page_location
            .as_deref()
            .filter(|u| u.contains("clid=") || u.contains("braid="))
        {
            for k in super::click_keys(url) {
                push(KeyKind::Click, &k, "landing_click");
            }
        }
        if let Some(u) = &e.user_id {
            push(KeyKind::UserId, u, "user_id");
        }
        let email = e
            .user_data
            .email_address
            .as_deref()
            .or(e.user_data.sha256_email_address.as_deref())
            .and_then(email_hash);
        if let Some(h) = &email {
            push(KeyKind::Email, h, "email");
        }
        if keys.is_empty() {
            continue;
        }
        let snapshot = snapshot(e, policy, now_ms);
        if snapshot.client_id.is_none()
            && snapshot.identity.is_empty()
            && snapshot.ip.is_none()
            && snapshot.user_agent.is_none()
        {
            // Consent left nothing to attribute an order by.
            continue;
        }
        out.push(SessionRecord {
            client_id: snapshot.client_id.as_deref().map(str::to_owned),
            email,
            keys,
            snapshot,
        });
    }
    out
}

fn text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// What one event leaves, as its consent allows.
fn snapshot(e: &Event, policy: &RecordPolicy, now_ms: i64) -> SessionSnapshot {
    let c = &e.consent;
    let analytics = policy.allows(c.analytics_storage);
    let ads = policy.allows(c.ad_storage);
    let user_data = match c.ad_user_data {
        ConsentState::Unknown => ads,
        s => policy.allows(s),
    };
    let mut identity = if ads {
        e.identity.clone()
    } else {
        crate::event::Identity::default()
    };
    // The GA client id is an analytics identifier; the debug marker belongs to the hit.
    if !analytics {
        identity.ga_client_id = None;
    }
    identity.debug_marker = None;
    let ga = &e.ga;
    SessionSnapshot {
        recorded_ms: if e.timestamp_ms > 0 {
            e.timestamp_ms
        } else {
            now_ms
        },
        event_name: e.event_name.as_str().into(),
        client_id: analytics.then(|| e.client_id.clone()).flatten(),
        measurement_id: ga.measurement_id.clone(),
        session_id: analytics.then(|| ga.session_id.clone()).flatten(),
        session_number: analytics.then_some(ga.session_number).flatten(),
        identity,
        ip: user_data.then(|| e.ip_override.clone()).flatten(),
        user_agent: user_data.then(|| e.user_agent.clone()).flatten(),
        page_location: e.page_location.clone(),
        page_referrer: e.page_referrer.clone(),
        language: e.language.clone(),
        consent: c.clone(),
    }
}
