//! The stitching parts on their own: which browser events record what (consent), what an
//! order takes from a session, and the embedded store's guarantees (the ones a Redis store
//! must give too).

use serde_json::json;

use super::embedded::{EmbeddedStitchStore, Limits};
use super::record::{records, RecordPolicy};
use super::*;
use crate::event::{ConsentState, Event, OrderKey, Stitch, StitchStatus};

const NOW_MS: i64 = 1_767_000_000_000;
const DAY_MS: i64 = 86_400_000;

const POLICY: RecordPolicy = RecordPolicy {
    unknown_is_denied: false,
    shopify_cart: true,
};

/// A `begin_checkout` after the identity step: client id, session, cookies, click ids.
fn checkout_event() -> Event {
    let mut e = Event {
        event_name: "begin_checkout".into(),
        timestamp_ms: NOW_MS,
        client_id: Some("1234567890.1766000000".into()),
        ip_override: Some("203.0.113.50".into()),
        user_agent: Some("Mozilla/5.0 Test".into()),
        page_location: Some("https://shop.example.com/checkout".into()),
        transaction_id: Some("bd5a8aa1ecd019dd3520ff791ee3a24c".into()),
        ..Event::default()
    };
    e.ga.measurement_id = Some("G-STITCH1".into());
    e.ga.session_id = Some("1766999000".into());
    e.ga.session_number = Some(3);
    e.identity.fbp = Some("fb.1.1766000000000.1234567890".into());
    e.identity.fbc = Some("fb.1.1766999000000.IwAR-click".into());
    e.identity.gclid = Some("Cj0-GCLID".into());
    e.identity.debug_marker = Some("me".into());
    e.user_data.email_address = Some(" Bob@Example.com ".into());
    e
}

#[test]
fn keys_are_stored_hashed_where_they_are_personal() {
    fn k(kind: KeyKind, v: &str) -> Option<String> {
        StoreKey::new(kind, v).map(|k| k.0)
    }
    assert_eq!(k(KeyKind::Reference, " T-1 "), Some("r:T-1".into()));
    assert_eq!(
        k(KeyKind::Reference, "c1-abc?key=9f"),
        Some("r:c1-abc".into()),
        "a cart token's key suffix is not part of it"
    );
    assert_eq!(k(KeyKind::Visitor, "tv-1"), Some("v:tv-1".into()));
    let email = k(KeyKind::Email, "Bob@Example.com").unwrap();
    assert_eq!(email, format!("e:{}", sha256_hex("bob@example.com")));
    assert_eq!(
        k(
            KeyKind::Email,
            &sha256_hex("bob@example.com").to_uppercase()
        ),
        Some(email),
        "a supplied SHA-256 is the same key"
    );
    assert_eq!(
        k(KeyKind::UserId, "42"),
        Some(format!("u:{}", sha256_hex("42")))
    );
    assert_eq!(k(KeyKind::Email, "not an email"), None);
    assert_eq!(k(KeyKind::Reference, "  "), None);
    assert_eq!(k(KeyKind::Reference, &"x".repeat(300)), None);
}

#[test]
fn a_checkout_records_its_session_under_every_key_it_carries() {
    let mut e = checkout_event();
    e.params.insert(
        "cart_token".into(),
        json!("68778783ad298f1c80c3bafcddeea02f"),
    );
    e.params.insert("tagrelay_visitor".into(), json!("tv-1"));
    e.user_id = Some("42".into());
    let cookie = "cart=Z2NwLXVzOjAx%3Fkey%3Dabc; _ga=GA1.1.1.2";
    let r = records(&[e], Some(cookie), &POLICY, NOW_MS);
    let [rec] = r.as_slice() else { panic!("{r:?}") };
    let labels: Vec<&str> = rec.keys.iter().map(|(_, l)| l.as_str()).collect();
    assert_eq!(
        labels,
        [
            "transaction_id",
            "cart_token",
            "tagrelay_visitor",
            "cart",
            "user_id",
            "email"
        ]
    );
    assert!(
        rec.keys.iter().any(|(k, _)| k.0 == "r:Z2NwLXVzOjAx"),
        "{:?}",
        rec.keys
    );
    assert_eq!(rec.client_id.as_deref(), Some("1234567890.1766000000"));
    assert_eq!(
        rec.email.as_deref(),
        Some(sha256_hex("bob@example.com").as_str())
    );
    let s = &rec.snapshot;
    assert_eq!(s.event_name, "begin_checkout");
    assert_eq!(s.session_id.as_deref(), Some("1766999000"));
    assert_eq!(s.identity.gclid.as_deref(), Some("Cj0-GCLID"));
    assert_eq!(
        s.identity.debug_marker, None,
        "the debug mark belongs to the hit"
    );
    assert_eq!(s.ip.as_deref(), Some("203.0.113.50"));
    let stored = serde_json::to_string(s).unwrap();
    assert!(
        !stored.contains("Bob@") && !stored.contains("bob@"),
        "{stored}"
    );

    // Shopify's cookie is read only when a Shopify client is configured.
    let no_cart = RecordPolicy {
        shopify_cart: false,
        ..POLICY
    };
    let r = records(&[checkout_event()], Some(cookie), &no_cart, NOW_MS);
    assert!(!r[0].keys.iter().any(|(_, l)| l == "cart"));
    // A landing page view records the visit under its ad click ids.
    let landing = Event {
        event_name: "page_view".into(),
        client_id: Some("1.2".into()),
        page_location: Some(
            "https://shop.example.com/?utm_source=x&gclid=Cj0-L&fbclid=IwAR-L".into(),
        ),
        ..Event::default()
    };
    let r = records(&[landing], None, &no_cart, NOW_MS);
    let keys: Vec<&str> = r[0].keys.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["k:gclid=Cj0-L", "k:fbclid=IwAR-L"]);
    // A page view without any key records nothing.
    let pv = Event {
        event_name: "page_view".into(),
        client_id: Some("1.2".into()),
        ..Event::default()
    };
    assert!(records(&[pv], None, &no_cart, NOW_MS).is_empty());
}

#[test]
fn consent_keeps_identifiers_out_of_the_record() {
    // Ads denied: no cookies' ids, no IP or User-Agent; the analytics ids stay.
    let mut e = checkout_event();
    e.consent.ad_storage = ConsentState::Denied;
    let s = &records(&[e], None, &POLICY, NOW_MS)[0].snapshot;
    assert!(s.identity.fbp.is_none() && s.identity.gclid.is_none());
    assert!(s.ip.is_none() && s.user_agent.is_none());
    assert_eq!(s.client_id.as_deref(), Some("1234567890.1766000000"));
    assert_eq!(
        s.consent.ad_storage,
        ConsentState::Denied,
        "the consent itself is kept"
    );

    // ad_user_data speaks for IP and User-Agent when the hit carries it.
    let mut e = checkout_event();
    e.consent.ad_storage = ConsentState::Granted;
    e.consent.ad_user_data = ConsentState::Denied;
    let s = &records(&[e], None, &POLICY, NOW_MS)[0].snapshot;
    assert!(s.identity.fbp.is_some());
    assert!(s.ip.is_none() && s.user_agent.is_none());

    // Analytics denied: no client id or session.
    let mut e = checkout_event();
    e.consent.analytics_storage = ConsentState::Denied;
    let s = &records(&[e], None, &POLICY, NOW_MS)[0].snapshot;
    assert!(s.client_id.is_none() && s.session_id.is_none());

    // Fail closed: unknown is denied, and with nothing left there is no record at all.
    let closed = RecordPolicy {
        unknown_is_denied: true,
        ..POLICY
    };
    assert!(records(&[checkout_event()], None, &closed, NOW_MS).is_empty());
}

fn order(lookup: Vec<OrderKey>) -> Event {
    let mut e = Event {
        event_name: "purchase".into(),
        source: "shopify".into(),
        timestamp_ms: NOW_MS,
        transaction_id: Some("450789469".into()),
        user_agent: Some("Order UA".into()),
        page_location: Some(
            "https://shop.example.com/?fbclid=IwAR-landing&gclid=Cj0-landing".into(),
        ),
        ..Event::default()
    };
    e.stitch = Some(Stitch::pending("shopify:450789469:purchase".into(), lookup));
    e
}

#[test]
fn a_stitched_order_takes_the_sessions_ids_and_consent() {
    let snap = records(&[checkout_event()], None, &POLICY, NOW_MS)
        .remove(0)
        .snapshot;
    let mut e = order(vec![]);
    let found = Found {
        index: 0,
        label: "transaction_id".into(),
        snapshot: snap,
    };
    enrich::stitched(&mut e, &found, "checkout_token");
    assert_eq!(e.client_id.as_deref(), Some("1234567890.1766000000"));
    assert_eq!(e.ga.session_id.as_deref(), Some("1766999000"));
    assert_eq!(e.ga.session_number, Some(3));
    assert_eq!(e.ga.measurement_id.as_deref(), Some("G-STITCH1"));
    assert_eq!(
        e.identity.fbc.as_deref(),
        Some("fb.1.1766999000000.IwAR-click")
    );
    assert_eq!(
        e.identity.gclid.as_deref(),
        Some("Cj0-GCLID"),
        "the session's click wins"
    );
    assert_eq!(e.ip_override.as_deref(), Some("203.0.113.50"));
    assert_eq!(e.user_agent.as_deref(), Some("Mozilla/5.0 Test"));
    assert_eq!(
        e.page_location.as_deref(),
        Some("https://shop.example.com/checkout")
    );
    let st = e.stitch.as_deref().unwrap();
    assert_eq!(st.status, StitchStatus::Stitched);
    assert_eq!(st.key.as_deref(), Some("checkout_token"));
    assert_eq!(st.matched_event.as_deref(), Some("begin_checkout"));
    assert_eq!(
        e.field("stitch.status"),
        Some(crate::event::FieldValue::Str("stitched"))
    );
}

#[test]
fn an_unstitched_order_keeps_what_it_has_and_gets_a_stable_client_id() {
    let mut e = order(vec![]);
    enrich::unstitched(&mut e);
    assert_eq!(
        e.stitch.as_deref().unwrap().status,
        StitchStatus::Unstitched
    );
    assert_eq!(e.user_agent.as_deref(), Some("Order UA"));
    assert_eq!(
        e.identity.fbc.as_deref(),
        Some(format!("fb.1.{NOW_MS}.IwAR-landing").as_str()),
        "built from the landing page's fbclid"
    );
    assert_eq!(e.identity.gclid.as_deref(), Some("Cj0-landing"));
    let cid = e.client_id.clone().unwrap();
    let (a, b) = cid.split_once('.').unwrap();
    assert!(a.len() == 10 && b.len() == 10 && cid.bytes().all(|c| c == b'.' || c.is_ascii_digit()));
    // The refund of the same order lands on the same GA4 user.
    let mut refund = order(vec![]);
    refund.event_name = "refund".into();
    enrich::unstitched(&mut refund);
    assert_eq!(refund.client_id, e.client_id);
    let mut other = order(vec![]);
    other.transaction_id = Some("1".into());
    enrich::unstitched(&mut other);
    assert_ne!(other.client_id, e.client_id);
}

fn limits() -> Limits {
    Limits {
        ttl_ms: 30 * DAY_MS,
        max_records: 1000,
        dedup_window_ms: 90 * DAY_MS,
    }
}

fn open(dir: &std::path::Path, limits: Limits) -> std::sync::Arc<EmbeddedStitchStore> {
    std::sync::Arc::new(EmbeddedStitchStore::open(&dir.join("stitching.sqlite3"), limits).unwrap())
}

fn rec(key: &str, label: &str, client: &str, at: i64) -> SessionRecord {
    SessionRecord {
        keys: vec![(StoreKey(key.into()), label.into())],
        client_id: Some(client.into()),
        email: None,
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

#[tokio::test]
async fn a_lookup_sees_what_was_recorded_before_it_best_key_first_newest_session_kept() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), limits());
    // Handed over and looked up at once: the lookup sees it (one queue, in order).
    store.record(vec![rec("r:A", "transaction_id", "c1", NOW_MS - 10)]);
    store.record(vec![rec("e:H", "email", "c2", NOW_MS - 5)]);
    let f = store
        .find(&keys(&["v:none", "r:A", "e:H"]), NOW_MS)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (f.index, f.label.as_str()),
        (1, "transaction_id"),
        "best key first"
    );
    assert_eq!(f.snapshot.client_id.as_deref(), Some("c1"));
    // A newer session under a key replaces the older; an older one does not.
    store.record(vec![rec("r:A", "checkout_token", "c3", NOW_MS - 1)]);
    store.record(vec![rec("r:A", "transaction_id", "c0", NOW_MS - 100)]);
    let f = store.find(&keys(&["r:A"]), NOW_MS).await.unwrap().unwrap();
    assert_eq!(f.snapshot.client_id.as_deref(), Some("c3"));
    assert!(store
        .find(&keys(&["r:none"]), NOW_MS)
        .await
        .unwrap()
        .is_none());
    // Past the retention a session no longer matches, and the purge deletes it.
    store.record(vec![rec(
        "r:OLD",
        "transaction_id",
        "c9",
        NOW_MS - 31 * DAY_MS,
    )]);
    assert!(store
        .find(&keys(&["r:OLD"]), NOW_MS)
        .await
        .unwrap()
        .is_none());
    store.purge(NOW_MS).await;
    store.close().await;
    let conn = embedded::open_db(&dir.path().join("stitching.sqlite3")).unwrap();
    let n: i64 = conn
        .query_row(
            "SELECT count(*) FROM stitch_sessions WHERE key = 'r:OLD'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 0);
}

#[tokio::test]
async fn the_size_cap_keeps_the_newest_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(
        dir.path(),
        Limits {
            max_records: 3,
            ..limits()
        },
    );
    for i in 0..5 {
        store.record(vec![rec(
            &format!("r:{i}"),
            "transaction_id",
            "c",
            NOW_MS - 100 + i,
        )]);
    }
    store.purge(NOW_MS).await;
    for i in 0..5 {
        let found = store
            .find(&keys(&[&format!("r:{i}")]), NOW_MS)
            .await
            .unwrap();
        assert_eq!(found.is_some(), i >= 2, "key {i}");
    }
    store.close().await;
}

#[tokio::test]
async fn an_order_is_claimed_once_sent_once_and_free_again_when_released_or_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), limits());
    let k = "shopify:1:purchase";
    assert_eq!(store.claim(k, NOW_MS).await.unwrap(), Claim::Fresh);
    assert_eq!(
        store.claim(k, NOW_MS).await.unwrap(),
        Claim::Busy,
        "held by the first"
    );
    // Released (the events were not stored): free again.
    store.settle(&[k.to_owned()], false, NOW_MS).await.unwrap();
    assert_eq!(store.claim(k, NOW_MS).await.unwrap(), Claim::Fresh);
    store.settle(&[k.to_owned()], true, NOW_MS).await.unwrap();
    assert_eq!(
        store.claim(k, NOW_MS + 1).await.unwrap(),
        Claim::Done { at_ms: NOW_MS }
    );
    // A claim held when the process ends frees itself; a sent one stays sent.
    let k2 = "shopify:2:purchase";
    assert_eq!(store.claim(k2, NOW_MS).await.unwrap(), Claim::Fresh);
    store.close().await;
    let store = open(dir.path(), limits());
    assert_eq!(store.claim(k2, NOW_MS).await.unwrap(), Claim::Fresh);
    assert!(matches!(
        store.claim(k, NOW_MS).await.unwrap(),
        Claim::Done { .. }
    ));
    // Past the window the record is gone.
    assert_eq!(
        store.claim(k, NOW_MS + 91 * DAY_MS).await.unwrap(),
        Claim::Fresh
    );
    store.close().await;
}

#[tokio::test]
async fn forget_erases_a_persons_sessions_by_email_or_client_id() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), limits());
    let hash = email_hash("bob@example.com").unwrap();
    let mut with_email = rec("r:T1", "transaction_id", "bob-browser", NOW_MS);
    with_email.email = Some(hash.clone());
    with_email
        .keys
        .push((StoreKey(format!("e:{hash}")), "email".into()));
    store.record(vec![
        with_email,
        // The same browser, earlier, before the email was known.
        rec("r:CART", "cart", "bob-browser", NOW_MS - 1000),
        rec("r:T2", "transaction_id", "someone-else", NOW_MS),
    ]);
    let n = store
        .forget(&Forget::Email(" BOB@example.com".into()))
        .await
        .unwrap();
    assert_eq!(
        n, 3,
        "both keys of the email's record and the browser's other record"
    );
    assert!(store
        .find(&keys(&["r:CART", "r:T1"]), NOW_MS)
        .await
        .unwrap()
        .is_none());
    assert!(store
        .find(&keys(&["r:T2"]), NOW_MS)
        .await
        .unwrap()
        .is_some());
    assert_eq!(
        store
            .forget(&Forget::ClientId("someone-else".into()))
            .await
            .unwrap(),
        1
    );
    assert!(store
        .find(&keys(&["r:T2"]), NOW_MS)
        .await
        .unwrap()
        .is_none());
    assert!(store.forget(&Forget::Email("nobody".into())).await.is_err());
    store.close().await;
}

#[tokio::test]
async fn prepare_drops_duplicates_and_stale_orders_and_releases_claims_it_cannot_use() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), limits());
    let st = Stitching {
        sessions: store.clone(),
        ledger: store.clone(),
        enabled: true,
        dedup_window_ms: 90 * DAY_MS,
    };
    store.record(records(&[checkout_event()], None, &POLICY, NOW_MS));
    let lookup = vec![
        OrderKey::new(
            "checkout_token",
            KeyKind::Reference,
            "bd5a8aa1ecd019dd3520ff791ee3a24c",
        ),
        OrderKey::new("email", KeyKind::Email, "bob@example.com"),
    ];
    let mut events = vec![order(lookup.clone())];
    let prepared = st.prepare(&mut events, NOW_MS).await.unwrap();
    let s = events[0].stitch.as_deref().unwrap();
    assert_eq!(s.status, StitchStatus::Stitched);
    assert_eq!(s.key.as_deref(), Some("checkout_token"));
    assert!(
        s.lookup.is_empty(),
        "the looked-up values are not kept with the event"
    );
    assert_eq!(s.tried, ["checkout_token", "email"]);
    st.settle(prepared, true, NOW_MS).await;

    // The same order again: dropped.
    let mut again = vec![order(lookup.clone())];
    let p = st.prepare(&mut again, NOW_MS).await.unwrap();
    assert!(again.is_empty());
    assert_eq!(p.duplicates, 1);
    st.settle(p, true, NOW_MS).await;

    // Its refund finds the purchase's session by the transaction id.
    let mut refund = order(vec![OrderKey::new(
        "order_id",
        KeyKind::Reference,
        "450789469",
    )]);
    refund.event_name = "refund".into();
    refund.stitch.as_deref_mut().unwrap().dedup_key = "shopify:450789469:refund:1".into();
    let mut refunds = vec![refund];
    let p = st.prepare(&mut refunds, NOW_MS).await.unwrap();
    assert_eq!(
        refunds[0].client_id.as_deref(),
        Some("1234567890.1766000000")
    );
    assert_eq!(
        refunds[0]
            .stitch
            .as_deref()
            .unwrap()
            .matched_event
            .as_deref(),
        Some("purchase")
    );
    // Not stored: released, so the platform's retry is taken.
    st.settle(p, false, NOW_MS).await;
    assert_eq!(
        store
            .claim("shopify:450789469:refund:1", NOW_MS)
            .await
            .unwrap(),
        Claim::Fresh
    );

    // An order older than the window is not sent (it may have been, before the window).
    let mut old = order(vec![]);
    old.timestamp_ms = NOW_MS - 91 * DAY_MS;
    old.stitch.as_deref_mut().unwrap().dedup_key = "shopify:old:purchase".into();
    let mut olds = vec![old];
    let p = st.prepare(&mut olds, NOW_MS).await.unwrap();
    assert!(olds.is_empty());
    assert_eq!(p.too_old, 1);
    st.settle(p, true, NOW_MS).await;

    // Another request holding an order's claim: Busy, and this one's own claims are released.
    assert_eq!(
        store.claim("shopify:busy:purchase", NOW_MS).await.unwrap(),
        Claim::Fresh
    );
    let mut first = order(vec![]);
    first.stitch.as_deref_mut().unwrap().dedup_key = "shopify:first:purchase".into();
    let mut busy = order(vec![]);
    busy.stitch.as_deref_mut().unwrap().dedup_key = "shopify:busy:purchase".into();
    let mut both = vec![first, busy];
    assert_eq!(
        st.prepare(&mut both, NOW_MS).await.unwrap_err(),
        StitchError::Busy
    );
    assert_eq!(
        store.claim("shopify:first:purchase", NOW_MS).await.unwrap(),
        Claim::Fresh
    );
    store.close().await;
}

#[tokio::test]
async fn with_stitching_off_orders_go_out_unstitched_and_still_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), limits());
    let st = Stitching {
        sessions: store.clone(),
        ledger: store.clone(),
        enabled: false,
        dedup_window_ms: 90 * DAY_MS,
    };
    store.record(records(&[checkout_event()], None, &POLICY, NOW_MS));
    let lookup = vec![OrderKey::new(
        "checkout_token",
        KeyKind::Reference,
        "bd5a8aa1ecd019dd3520ff791ee3a24c",
    )];
    let mut events = vec![order(lookup.clone())];
    let p = st.prepare(&mut events, NOW_MS).await.unwrap();
    assert_eq!(
        events[0].stitch.as_deref().unwrap().status,
        StitchStatus::Unstitched
    );
    st.settle(p, true, NOW_MS).await;
    let mut again = vec![order(lookup)];
    let p = st.prepare(&mut again, NOW_MS).await.unwrap();
    assert_eq!((again.len(), p.duplicates), (0, 1));
    st.settle(p, true, NOW_MS).await;
    store.close().await;
}
