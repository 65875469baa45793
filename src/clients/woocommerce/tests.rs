//! WooCommerce webhooks with the order of the REST API documentation's "Retrieve an order"
//! example (order 727), signed here the way `WC_Webhook::generate_signature` signs.

use http::Method;
use serde_json::{json, Value};

use super::*;
use crate::clients::webhook::testing::{base64_hmac, call, ignored_reason, lookup, unauthorized};
use crate::event::KeyKind;

const SECRET: &str = "wc-webhook-secret-4f1c";
const NOW_MS: i64 = 1_767_000_000_000;

fn client() -> Box<dyn Client> {
    let cfg = WooCommerceClientConfig {
        path: "/webhooks/woocommerce".into(),
        secret: Secret::new(SECRET),
    };
    match cfg.build().unwrap() {
        BuiltClient::Events(c) => c,
        BuiltClient::ScriptProxy(_) => unreachable!(),
    }
}

fn order() -> Value {
    serde_json::from_str(
        r##"{
        "id": 727, "parent_id": 0, "number": "727", "order_key": "wc_order_58d2d042d1d",
        "created_via": "checkout", "status": "processing", "currency": "USD",
        "date_created": "2025-12-29T07:00:00", "date_created_gmt": "2025-12-29T10:00:00",
        "date_modified": "2025-12-29T07:00:05", "date_modified_gmt": "2025-12-29T10:00:05",
        "discount_total": "2.00", "discount_tax": "0.00", "shipping_total": "10.00",
        "shipping_tax": "0.00", "cart_tax": "1.35", "total": "27.35", "total_tax": "1.35",
        "prices_include_tax": false, "customer_id": 0,
        "customer_ip_address": "198.51.100.23",
        "customer_user_agent": "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
        "customer_note": "",
        "billing": {
            "first_name": "John", "last_name": "Doe", "company": "",
            "address_1": "969 Market", "address_2": "", "city": "San Francisco",
            "state": "CA", "postcode": "94103", "country": "US",
            "email": "john.doe@example.com", "phone": "(555) 555-5555"
        },
        "payment_method": "bacs", "payment_method_title": "Direct Bank Transfer",
        "transaction_id": "", "date_paid": "2025-12-29T07:00:04", "date_paid_gmt": "2025-12-29T10:00:04",
        "cart_hash": "",
        "meta_data": [{"id": 13106, "key": "_download_permissions_granted", "value": "yes"}],
        "line_items": [
            {"id": 315, "name": "Woo Single #1", "product_id": 93, "variation_id": 0,
             "quantity": 2, "tax_class": "", "subtotal": "6.00", "subtotal_tax": "0.45",
             "total": "6.00", "total_tax": "0.45", "sku": "", "price": 3},
            {"id": 316, "name": "Ship Your Idea - Color: Black, Size: M Test",
             "product_id": 22, "variation_id": 23, "quantity": 1, "tax_class": "",
             "subtotal": "12.00", "subtotal_tax": "0.90", "total": "10.00",
             "total_tax": "0.90", "sku": "Bar3", "price": 10}
        ],
        "shipping_lines": [{"id": 317, "method_title": "Flat Rate", "method_id": "flat_rate", "total": "10.00"}],
        "coupon_lines": [{"id": 318, "code": "save2", "discount": "2.00"}],
        "refunds": []
    }"##,
    )
    .unwrap()
}

fn headers(topic: &str, body: &[u8], secret: &str) -> Vec<(&'static str, String)> {
    vec![
        ("content-type", "application/json".into()),
        ("x-wc-webhook-source", "https://shop.example.org/".into()),
        ("x-wc-webhook-topic", topic.into()),
        ("x-wc-webhook-resource", "order".into()),
        (
            "x-wc-webhook-event",
            topic.rsplit('.').next().unwrap().into(),
        ),
        ("x-wc-webhook-signature", base64_hmac(secret, body)),
        ("x-wc-webhook-id", "12".into()),
        (
            "x-wc-webhook-delivery-id",
            "0e4a8fd9a3a3bd6f6e5d4b7c1a2b3c4d".into(),
        ),
    ]
}

fn send(topic: &str, body: &Value) -> Result<Parsed, ClientError> {
    let bytes = serde_json::to_vec(body).unwrap();
    call(
        &*client(),
        Method::POST,
        &headers(topic, &bytes, SECRET),
        &bytes,
        NOW_MS,
    )
}

#[test]
fn a_paid_order_is_a_purchase_keyed_by_its_number() {
    let p = send("order.created", &order()).unwrap();
    let [e] = p.events.as_slice() else {
        panic!("{:?}", p.events)
    };
    assert_eq!(e.event_name, "purchase");
    assert_eq!(e.source, "woocommerce");
    assert_eq!(e.transaction_id.as_deref(), Some("727"));
    assert_eq!(e.event_id, "purchase-727");
    assert_eq!(e.value, Some(27.35));
    assert_eq!(e.currency.as_deref(), Some("USD"));
    assert_eq!(e.params["tax"], json!(1.35));
    assert_eq!(e.params["shipping"], json!(10.0));
    assert_eq!(e.params["coupon"], json!("save2"));
    assert_eq!(
        e.timestamp_ms, 1_767_002_404_000,
        "date_paid_gmt, read as UTC"
    );
    let [a, b] = e.items.as_slice() else {
        panic!("{:?}", e.items)
    };
    assert_eq!(
        a.item_id.as_deref(),
        Some("93"),
        "no SKU, no variation: the product"
    );
    assert_eq!(
        (a.price, a.quantity, a.discount),
        (Some(3.0), Some(2.0), None)
    );
    assert_eq!(b.item_id.as_deref(), Some("Bar3"));
    assert_eq!(
        (b.price, b.discount),
        (Some(12.0), Some(2.0)),
        "before discount, and the discount"
    );
    assert_eq!(
        e.user_data.email_address.as_deref(),
        Some("john.doe@example.com")
    );
    assert_eq!(e.user_data.address.postal_code.as_deref(), Some("94103"));
    assert_eq!(e.ip_override.as_deref(), Some("198.51.100.23"));
    assert!(e.user_agent.as_deref().unwrap().contains("Firefox"));
    assert_eq!(
        e.page_location.as_deref(),
        Some("https://shop.example.org/")
    );
    let st = e.stitch.as_ref().unwrap();
    assert_eq!(st.dedup_key, "woocommerce:shop.example.org:727:purchase");
    assert_eq!(
        lookup(e),
        vec![
            ("number".into(), KeyKind::Reference, "727".into()),
            (
                "billing.email".into(),
                KeyKind::Email,
                "john.doe@example.com".into()
            ),
        ],
        "a guest checkout: no customer id"
    );
}

#[test]
fn refunds_of_an_updated_order_are_refunds_and_a_visitor_token_is_looked_up_first() {
    let mut o = order();
    o["status"] = json!("refunded");
    o["customer_id"] = json!(12);
    o["meta_data"] = json!([{"id": 1, "key": "_tagrelay_visitor", "value": "tv-abc"}]);
    o["refunds"] = json!([
        {"id": 726, "reason": "damaged", "total": "-10.00"},
        {"id": 729, "reason": "", "total": "-17.35"}
    ]);
    let p = send("order.updated", &o).unwrap();
    let names: Vec<_> = p
        .events
        .iter()
        .map(|e| (e.event_name.as_str(), e.event_id.as_str(), e.value))
        .collect();
    assert_eq!(
        names,
        vec![
            ("purchase", "purchase-727", Some(27.35)),
            ("refund", "refund-727-726", Some(10.0)),
            ("refund", "refund-727-729", Some(17.35)),
        ],
        "paid once, then refunded: each with its own dedup key"
    );
    assert_eq!(
        p.events[1].stitch.as_ref().unwrap().dedup_key,
        "woocommerce:shop.example.org:727:refund:726"
    );
    let keys = lookup(&p.events[0]);
    assert_eq!(
        keys[0],
        (
            "meta_data.tagrelay_visitor".into(),
            KeyKind::Visitor,
            "tv-abc".into()
        )
    );
    assert!(keys.contains(&("customer_id".into(), KeyKind::UserId, "12".into())));
}

#[test]
fn unpaid_orders_and_other_topics_are_ignored() {
    let mut o = order();
    o["status"] = json!("on-hold");
    o["date_paid_gmt"] = Value::Null;
    let m = ignored_reason(&send("order.created", &o).unwrap());
    assert!(m.contains("not paid"), "{m}");
    let m = ignored_reason(&send("product.updated", &json!({"id": 5})).unwrap());
    assert!(m.contains("order.created and order.updated"), "{m}");
}

#[test]
fn the_ping_when_a_webhook_is_saved_gets_200_and_nothing_else_goes_unsigned() {
    let c = client();
    let form = [(
        "content-type",
        "application/x-www-form-urlencoded".to_string(),
    )];
    let p = call(&*c, Method::POST, &form, b"webhook_id=12", NOW_MS).unwrap();
    assert!(ignored_reason(&p).contains("ping"));
    // An unsigned order is refused, as is one signed with another secret.
    let bytes = serde_json::to_vec(&order()).unwrap();
    let m = unauthorized(call(&*c, Method::POST, &form, &bytes, NOW_MS));
    assert!(m.contains("X-WC-Webhook-Signature is missing"), "{m}");
    let h = headers("order.created", &bytes, "not-the-secret");
    let m = unauthorized(call(&*c, Method::POST, &h, &bytes, NOW_MS));
    assert!(m.contains("does not match"), "{m}");
    // A ping-shaped body with a bad signature is not a ping.
    let mut h = headers("order.created", b"webhook_id=12", "not-the-secret");
    h.retain(|(k, _)| *k != "content-type");
    unauthorized(call(&*c, Method::POST, &h, b"webhook_id=12", NOW_MS));
}
