//! Stripe webhooks: events shaped like the API reference's Event, Checkout Session, Charge and
//! Refund objects, signed here as Stripe documents it (`t=…,v1=` HMAC-SHA256 of `t.body`).

use http::Method;
use serde_json::{json, Value};

use super::*;
use crate::clients::webhook::testing::{call, hex_hmac, ignored_reason, lookup, unauthorized};
use crate::event::KeyKind;

const SECRET: &str = "whsec_test_5ff3a1c0e9b24d7c";
const NOW_MS: i64 = 1_767_000_000_000;
const NOW_S: i64 = NOW_MS / 1000;

fn client() -> Box<dyn Client> {
    let cfg: StripeClientConfig = toml::from_str(&format!(
        "path = \"/webhooks/stripe\"\nsecret = \"{SECRET}\""
    ))
    .unwrap();
    assert_eq!(cfg.tolerance_secs, 300, "Stripe's default");
    match cfg.build().unwrap() {
        BuiltClient::Events(c) => c,
        BuiltClient::ScriptProxy(_) => unreachable!(),
    }
}

fn event(kind: &str, object: Value) -> Value {
    json!({
        "id": "evt_1QxYz2LkdIwHu7ixAbCdEf01",
        "object": "event",
        "api_version": "2024-06-20",
        "created": NOW_S - 2,
        "data": {"object": object},
        "livemode": false,
        "pending_webhooks": 1,
        "request": {"id": null, "idempotency_key": null},
        "type": kind
    })
}

fn session() -> Value {
    json!({
        "id": "cs_test_a1b2c3d4e5",
        "object": "checkout.session",
        "amount_subtotal": 4000,
        "amount_total": 4590,
        "client_reference_id": "tv-5d41402abc4b2a76",
        "created": NOW_S - 120,
        "currency": "eur",
        "customer": "cus_QxY1",
        "customer_details": {
            "address": {"city": "Paris", "country": "FR", "line1": "1 Rue de Rivoli",
                        "line2": null, "postal_code": "75001", "state": null},
            "email": "Jenny.Rosen@Example.com",
            "name": "Jenny Rosen",
            "phone": "+33612345678",
            "tax_exempt": "none"
        },
        "customer_email": null,
        "metadata": {"tagrelay_visitor": "tv-meta-1"},
        "mode": "payment",
        "payment_intent": "pi_3QxYz2LkdIwHu7ix0aBcDeFg",
        "payment_status": "paid",
        "status": "complete",
        "success_url": "https://shop.example.com/thanks?session_id={CHECKOUT_SESSION_ID}",
        "total_details": {"amount_discount": 0, "amount_shipping": 490, "amount_tax": 100}
    })
}

fn signed(body: &[u8], t: i64, secrets: &[&str]) -> Vec<(&'static str, String)> {
    let mut message = format!("{t}.").into_bytes();
    message.extend_from_slice(body);
    let mut header = format!("t={t}");
    for s in secrets {
        header.push_str(",v1=");
        header.push_str(&hex_hmac(s, &message));
    }
    // Stripe's test-mode header also carries a v0 scheme that is ignored.
    header.push_str(",v0=6ffbb59b2300aae63f272406069a9788598b792a944a07aba816edb039989a39");
    vec![
        ("content-type", "application/json; charset=utf-8".into()),
        ("stripe-signature", header),
    ]
}

fn send(v: &Value) -> Result<Parsed, ClientError> {
    let bytes = serde_json::to_vec(v).unwrap();
    call(
        &*client(),
        Method::POST,
        &signed(&bytes, NOW_S, &[SECRET]),
        &bytes,
        NOW_MS,
    )
}

#[test]
fn a_paid_checkout_session_is_a_purchase_of_its_payment_intent() {
    let p = send(&event("checkout.session.completed", session())).unwrap();
    let [e] = p.events.as_slice() else {
        panic!("{:?}", p.events)
    };
    assert_eq!(e.event_name, "purchase");
    assert_eq!(
        e.transaction_id.as_deref(),
        Some("pi_3QxYz2LkdIwHu7ix0aBcDeFg")
    );
    assert_eq!(e.event_id, "purchase-pi_3QxYz2LkdIwHu7ix0aBcDeFg");
    assert_eq!(e.value, Some(45.9), "cents to euros");
    assert_eq!(e.currency.as_deref(), Some("EUR"));
    assert_eq!(e.params["tax"], json!(1.0));
    assert_eq!(e.params["shipping"], json!(4.9));
    assert_eq!(e.timestamp_ms, (NOW_S - 2) * 1000, "the event's time");
    assert!(e.items.is_empty(), "Stripe's webhook carries no line items");
    let u = &e.user_data;
    assert_eq!(u.email_address.as_deref(), Some("Jenny.Rosen@Example.com"));
    assert_eq!(u.address.first_name.as_deref(), Some("Jenny"));
    assert_eq!(u.address.last_name.as_deref(), Some("Rosen"));
    assert_eq!(u.address.country.as_deref(), Some("FR"));
    assert_eq!(
        e.stitch.as_ref().unwrap().dedup_key,
        "stripe:pi_3QxYz2LkdIwHu7ix0aBcDeFg:purchase"
    );
    assert_eq!(
        lookup(e),
        vec![
            (
                "client_reference_id".into(),
                KeyKind::Visitor,
                "tv-5d41402abc4b2a76".into()
            ),
            (
                "metadata.tagrelay_visitor".into(),
                KeyKind::Visitor,
                "tv-meta-1".into()
            ),
            ("id".into(), KeyKind::Reference, "cs_test_a1b2c3d4e5".into()),
            (
                "payment_intent".into(),
                KeyKind::Reference,
                "pi_3QxYz2LkdIwHu7ix0aBcDeFg".into()
            ),
            (
                "customer_details.email".into(),
                KeyKind::Email,
                "Jenny.Rosen@Example.com".into()
            ),
        ]
    );
}

#[test]
fn an_unpaid_session_waits_for_its_async_payment_and_zero_decimal_currencies_stay_whole() {
    let mut s = session();
    s["payment_status"] = json!("unpaid");
    let m = ignored_reason(&send(&event("checkout.session.completed", s.clone())).unwrap());
    assert!(m.contains("async_payment_succeeded"), "{m}");
    s["payment_status"] = json!("paid");
    s["currency"] = json!("jpy");
    s["amount_total"] = json!(4590);
    let p = send(&event("checkout.session.async_payment_succeeded", s)).unwrap();
    assert_eq!(p.events[0].value, Some(4590.0));
    assert_eq!(p.events[0].currency.as_deref(), Some("JPY"));
    // Without a PaymentIntent (a free order), the session id is the transaction.
    let mut s = session();
    s["payment_intent"] = Value::Null;
    s["payment_status"] = json!("no_payment_required");
    let p = send(&event("checkout.session.completed", s)).unwrap();
    assert_eq!(
        p.events[0].transaction_id.as_deref(),
        Some("cs_test_a1b2c3d4e5")
    );
}

#[test]
fn bad_missing_and_stale_signatures_are_refused() {
    let c = client();
    let bytes = serde_json::to_vec(&event("checkout.session.completed", session())).unwrap();
    let go =
        |h: Vec<(&'static str, String)>, body: &[u8]| call(&*c, Method::POST, &h, body, NOW_MS);
    // Missing.
    let m = unauthorized(go(vec![], &bytes));
    assert!(m.contains("Stripe-Signature is missing"), "{m}");
    // Another endpoint's secret.
    let m = unauthorized(go(signed(&bytes, NOW_S, &["whsec_other"]), &bytes));
    assert!(m.contains("does not match"), "{m}");
    // Signed for another body.
    let m = unauthorized(go(signed(b"{}", NOW_S, &[SECRET]), &bytes));
    assert!(m.contains("does not match"), "{m}");
    // A replay of a genuine webhook ten minutes later.
    let m = unauthorized(go(signed(&bytes, NOW_S - 600, &[SECRET]), &bytes));
    assert!(
        m.contains("600 s before") && m.contains("tolerance of 300 s"),
        "{m}"
    );
    // Or from a clock far ahead.
    unauthorized(go(signed(&bytes, NOW_S + 900, &[SECRET]), &bytes));
    // No timestamp, no v1.
    unauthorized(go(vec![("stripe-signature", "v1=00".into())], &bytes));
    unauthorized(go(vec![("stripe-signature", format!("t={NOW_S}"))], &bytes));
    // While a secret is rolled, one of several v1 matching is enough.
    assert!(go(signed(&bytes, NOW_S - 200, &["whsec_old", SECRET]), &bytes).is_ok());
}

#[test]
fn refunds_from_charges_and_refund_objects_share_their_keys() {
    let charge = json!({
        "id": "ch_3QxYz2", "object": "charge", "amount": 4590, "amount_refunded": 1500,
        "currency": "eur", "payment_intent": "pi_3QxYz2LkdIwHu7ix0aBcDeFg", "refunded": false,
        "refunds": {"object": "list", "data": [
            {"id": "re_1", "object": "refund", "amount": 1000, "currency": "eur", "created": NOW_S - 50,
             "payment_intent": "pi_3QxYz2LkdIwHu7ix0aBcDeFg", "status": "succeeded"},
            {"id": "re_2", "object": "refund", "amount": 500, "currency": "eur", "created": NOW_S - 5,
             "payment_intent": "pi_3QxYz2LkdIwHu7ix0aBcDeFg", "status": "succeeded"}
        ]}
    });
    let p = send(&event("charge.refunded", charge.clone())).unwrap();
    let got: Vec<_> = p
        .events
        .iter()
        .map(|e| (e.event_id.as_str(), e.value))
        .collect();
    assert_eq!(
        got,
        vec![
            ("refund-pi_3QxYz2LkdIwHu7ix0aBcDeFg-re_1", Some(10.0)),
            ("refund-pi_3QxYz2LkdIwHu7ix0aBcDeFg-re_2", Some(5.0)),
        ]
    );
    assert_eq!(
        p.events[0].transaction_id.as_deref(),
        Some("pi_3QxYz2LkdIwHu7ix0aBcDeFg")
    );
    // `refund.created` for the same refund has the same dedup key: sent once whichever comes.
    let r = charge["refunds"]["data"][1].clone();
    let q = send(&event("refund.created", r)).unwrap();
    assert_eq!(
        q.events[0].stitch.as_ref().unwrap().dedup_key,
        p.events[1].stitch.as_ref().unwrap().dedup_key
    );
    // Newer API versions leave the list out: the charge's running total.
    let mut bare = charge;
    bare.as_object_mut().unwrap().remove("refunds");
    let p = send(&event("charge.refunded", bare)).unwrap();
    assert_eq!(p.events[0].value, Some(15.0));
    assert_eq!(
        p.events[0].event_id,
        "refund-pi_3QxYz2LkdIwHu7ix0aBcDeFg-ch_3QxYz2-1500"
    );
}

#[test]
fn other_event_types_are_ignored() {
    let m = ignored_reason(&send(&event("customer.created", json!({"id": "cus_1"}))).unwrap());
    assert!(m.contains("checkout.session.completed"), "{m}");
}
