//! Shopify webhooks from payloads shaped like the examples of Shopify's Admin REST `Order`
//! and `Refund` resources (the webhook bodies are those resources), signed here with a known
//! secret the way Shopify signs them.

use http::Method;
use serde_json::{json, Value};

use super::*;
use crate::clients::webhook::testing::base64_hmac;
use crate::clients::webhook::testing::{call, ignored_reason, lookup, unauthorized};
use crate::clients::ClientResponse;
use crate::event::{KeyKind, StitchStatus};

const SECRET: &str = "shpss_test_secret_0123456789";
const NOW_MS: i64 = 1_767_000_000_000;

fn client(secret: &str) -> Box<dyn Client> {
    let cfg = ShopifyClientConfig {
        path: "/webhooks/shopify".into(),
        secret: Secret::new(secret),
    };
    match cfg.build().unwrap() {
        BuiltClient::Events(c) => c,
        BuiltClient::ScriptProxy(_) => unreachable!(),
    }
}

/// The order of Shopify's documentation example (Bob Norman's iPod Nano), trimmed to the
/// fields tagrelay reads plus a few it ignores.
pub(crate) fn order() -> Value {
    serde_json::from_str(
        r##"{
        "id": 450789469,
        "admin_graphql_api_id": "gid://shopify/Order/450789469",
        "name": "#1001",
        "order_number": 1001,
        "email": "bob.norman@mail.example.com",
        "contact_email": "bob.norman@mail.example.com",
        "phone": "+557734881234",
        "browser_ip": "216.191.105.146",
        "cart_token": "68778783ad298f1c80c3bafcddeea02f",
        "checkout_token": "bd5a8aa1ecd019dd3520ff791ee3a24c",
        "token": "b1946ac92492d2347c6235b4d2611184",
        "client_details": {
            "accept_language": "en-US,en;q=0.9",
            "browser_ip": "216.191.105.146",
            "user_agent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Safari/605.1.15"
        },
        "landing_site": "/?gclid=Cj0KCQ-LANDING&utm_source=google",
        "referring_site": "https://www.google.com/",
        "created_at": "2025-12-29T04:59:00-05:00",
        "processed_at": "2025-12-29T05:00:00-05:00",
        "currency": "USD",
        "financial_status": "paid",
        "test": false,
        "subtotal_price": "597.00",
        "total_price": "598.94",
        "total_tax": "11.94",
        "total_discounts": "10.00",
        "discount_codes": [{"code": "TENOFF", "amount": "10.00", "type": "fixed_amount"}],
        "note_attributes": [{"name": "custom engraving", "value": "Happy Birthday"}],
        "total_shipping_price_set": {
            "shop_money": {"amount": "10.00", "currency_code": "USD"},
            "presentment_money": {"amount": "10.00", "currency_code": "USD"}
        },
        "shipping_lines": [{"code": "INT.TP", "price": "10.00", "title": "Small Packet International Air"}],
        "line_items": [
            {
                "id": 466157049, "product_id": 632910392, "variant_id": 39072856,
                "sku": "IPOD2008GREEN", "title": "IPod Nano - 8gb", "variant_title": "green",
                "vendor": "Apple", "name": "IPod Nano - 8gb - green", "price": "199.00",
                "quantity": 2, "total_discount": "0.00",
                "discount_allocations": [{"amount": "6.68", "discount_application_index": 0}]
            },
            {
                "id": 518995019, "product_id": 632910393, "variant_id": 49148385,
                "sku": "", "title": "IPod Nano - 8gb", "variant_title": "red",
                "vendor": null, "price": "199.00", "quantity": 1, "total_discount": "0.00",
                "discount_allocations": []
            }
        ],
        "billing_address": {
            "first_name": "Bob", "last_name": "Norman", "address1": "Chestnut Street 92",
            "city": "Louisville", "province": "Kentucky", "province_code": "KY",
            "zip": "40202", "country": "United States", "country_code": "US",
            "phone": "+1(502)-459-2181"
        },
        "customer": {
            "id": 207119551, "email": "bob.norman@mail.example.com",
            "first_name": "Bob", "last_name": "Norman", "phone": "+16136120707"
        }
    }"##,
    )
    .unwrap()
}

/// A refund of one of the green iPods, shaped like the documentation's `Refund` example.
fn refund() -> Value {
    json!({
        "id": 509562969,
        "order_id": 450789469,
        "created_at": "2025-12-30T10:00:00-05:00",
        "processed_at": "2025-12-30T10:00:00-05:00",
        "note": "it broke during shipping",
        "restock": true,
        "refund_line_items": [{
            "id": 104689539, "line_item_id": 466157049, "quantity": 1,
            "restock_type": "return", "subtotal": 195.66, "total_tax": 3.98,
            "line_item": {
                "id": 466157049, "product_id": 632910392, "variant_id": 39072856,
                "sku": "IPOD2008GREEN", "title": "IPod Nano - 8gb", "variant_title": "green",
                "price": "199.00", "quantity": 2
            }
        }],
        "transactions": [{
            "id": 179259969, "order_id": 450789469, "kind": "refund", "status": "success",
            "amount": "199.64", "currency": "USD", "gateway": "bogus"
        }],
        "order_adjustments": []
    })
}

fn headers(topic: &str, body: &[u8], secret: &str) -> Vec<(&'static str, String)> {
    vec![
        ("content-type", "application/json".into()),
        ("x-shopify-topic", topic.into()),
        ("x-shopify-hmac-sha256", base64_hmac(secret, body)),
        ("x-shopify-shop-domain", "shop.example.com".into()),
        (
            "x-shopify-webhook-id",
            "b54557e4-bdd9-4b37-8a5f-bf7d70bcd043".into(),
        ),
    ]
}

fn send(topic: &str, body: &Value) -> Result<Parsed, ClientError> {
    let bytes = serde_json::to_vec(body).unwrap();
    call(
        &*client(SECRET),
        Method::POST,
        &headers(topic, &bytes, SECRET),
        &bytes,
        NOW_MS,
    )
}

#[test]
fn a_paid_order_is_a_purchase_with_its_values_items_user_data_and_keys() {
    let p = send("orders/paid", &order()).unwrap();
    assert_eq!(p.response, ClientResponse::EventIds);
    assert!(!p.set_cookies, "a server's request: no cookies");
    let [e] = p.events.as_slice() else {
        panic!("{:?}", p.events)
    };
    assert_eq!(e.event_name, "purchase");
    assert_eq!(e.source, "shopify");
    assert_eq!(e.transaction_id.as_deref(), Some("450789469"));
    assert_eq!(e.event_id, "purchase-450789469", "derived from the order");
    assert_eq!(e.value, Some(598.94));
    assert_eq!(e.currency.as_deref(), Some("USD"));
    assert_eq!(e.params["tax"], json!(11.94));
    assert_eq!(e.params["shipping"], json!(10.0));
    assert_eq!(e.params["coupon"], json!("TENOFF"));
    // 2025-12-29T05:00:00-05:00
    assert_eq!(e.timestamp_ms, 1_767_002_400_000);
    assert_eq!(e.items.len(), 2);
    let green = &e.items[0];
    assert_eq!(green.item_id.as_deref(), Some("IPOD2008GREEN"));
    assert_eq!(green.item_name.as_deref(), Some("IPod Nano - 8gb"));
    assert_eq!(green.item_variant.as_deref(), Some("green"));
    assert_eq!(green.item_brand.as_deref(), Some("Apple"));
    assert_eq!((green.price, green.quantity), (Some(199.0), Some(2.0)));
    assert_eq!(green.discount, Some(3.34), "per unit, from the allocations");
    assert_eq!(
        e.items[1].item_id.as_deref(),
        Some("49148385"),
        "no SKU: the variant id"
    );
    let u = &e.user_data;
    assert_eq!(
        u.email_address.as_deref(),
        Some("bob.norman@mail.example.com")
    );
    assert_eq!(u.phone_number.as_deref(), Some("+557734881234"));
    assert_eq!(u.address.first_name.as_deref(), Some("Bob"));
    assert_eq!(u.address.last_name.as_deref(), Some("Norman"));
    assert_eq!(u.address.city.as_deref(), Some("Louisville"));
    assert_eq!(u.address.region.as_deref(), Some("KY"));
    assert_eq!(u.address.postal_code.as_deref(), Some("40202"));
    assert_eq!(u.address.country.as_deref(), Some("US"));
    // What the order knows of the buyer's browser, for an unstitched order.
    assert_eq!(e.ip_override.as_deref(), Some("216.191.105.146"));
    assert!(e.user_agent.as_deref().unwrap().contains("Safari"));
    assert_eq!(
        e.page_location.as_deref(),
        Some("https://shop.example.com/?gclid=Cj0KCQ-LANDING&utm_source=google")
    );
    // Not looked up yet: the ingress does that; keys best first.
    let st = e.stitch.as_ref().unwrap();
    assert_eq!(st.status, StitchStatus::Pending);
    assert_eq!(st.dedup_key, "shopify:450789469:purchase");
    assert_eq!(
        lookup(e),
        vec![
            (
                "checkout_token".into(),
                KeyKind::Reference,
                "bd5a8aa1ecd019dd3520ff791ee3a24c".into()
            ),
            (
                "cart_token".into(),
                KeyKind::Reference,
                "68778783ad298f1c80c3bafcddeea02f".into()
            ),
            ("id".into(), KeyKind::Reference, "450789469".into()),
            ("name".into(), KeyKind::Reference, "#1001".into()),
            (
                "landing_site".into(),
                KeyKind::Click,
                "gclid=Cj0KCQ-LANDING".into()
            ),
            ("customer.id".into(), KeyKind::UserId, "207119551".into()),
            (
                "email".into(),
                KeyKind::Email,
                "bob.norman@mail.example.com".into()
            ),
        ]
    );
}

#[test]
fn a_visitor_token_in_the_cart_attributes_is_looked_up_first() {
    let mut o = order();
    o["note_attributes"] = json!([{"name": "tagrelay_visitor", "value": "tv-0123abcd"}]);
    let p = send("orders/paid", &o).unwrap();
    assert_eq!(
        lookup(&p.events[0])[0],
        (
            "note_attributes.tagrelay_visitor".into(),
            KeyKind::Visitor,
            "tv-0123abcd".into()
        )
    );
}

#[test]
fn an_unsigned_or_wrongly_signed_or_altered_webhook_is_refused() {
    let bytes = serde_json::to_vec(&order()).unwrap();
    let c = client(SECRET);
    // No signature.
    let mut h = headers("orders/paid", &bytes, SECRET);
    h.retain(|(k, _)| *k != "x-shopify-hmac-sha256");
    let m = unauthorized(call(&*c, Method::POST, &h, &bytes, NOW_MS));
    assert!(m.contains("X-Shopify-Hmac-Sha256 is missing"), "{m}");
    // Signed with another secret.
    let h = headers("orders/paid", &bytes, "another-secret");
    let m = unauthorized(call(&*c, Method::POST, &h, &bytes, NOW_MS));
    assert!(m.contains("does not match"), "{m}");
    assert!(!m.contains(SECRET), "the secret never shows");
    // The body changed after signing.
    let h = headers("orders/paid", &bytes, SECRET);
    let mut altered = bytes.clone();
    let at = altered.windows(6).position(|w| w == b"598.94").unwrap();
    altered[at] = b'9';
    unauthorized(call(&*c, Method::POST, &h, &altered, NOW_MS));
    // Not base64.
    let mut h = headers("orders/paid", &bytes, SECRET);
    h[2].1 = "%%%".into();
    unauthorized(call(&*c, Method::POST, &h, &bytes, NOW_MS));
}

#[test]
fn only_posts_are_taken() {
    let r = call(&*client(SECRET), Method::GET, &[], b"", NOW_MS);
    assert_eq!(r.unwrap_err(), ClientError::MethodNotAllowed);
}

#[test]
fn unpaid_test_orders_and_other_topics_are_answered_and_ignored() {
    let mut o = order();
    o["financial_status"] = json!("pending");
    let m = ignored_reason(&send("orders/create", &o).unwrap());
    assert!(m.contains("not paid yet"), "{m}");
    // orders/paid counts whatever the status says.
    assert_eq!(send("orders/paid", &o).unwrap().events.len(), 1);
    o["financial_status"] = json!("authorized");
    assert_eq!(send("orders/create", &o).unwrap().events.len(), 1);

    let mut t = order();
    t["test"] = json!(true);
    let m = ignored_reason(&send("orders/paid", &t).unwrap());
    assert!(m.contains("test order"), "{m}");

    let m = ignored_reason(&send("products/update", &json!({"id": 1})).unwrap());
    assert!(m.contains("orders/paid and refunds/create"), "{m}");
}

#[test]
fn malformed_signed_bodies_are_400s() {
    let c = client(SECRET);
    for body in [&b"not json"[..], b"[1,2]", b"{\"no_id\":true}"] {
        let h = headers("orders/paid", body, SECRET);
        match call(&*c, Method::POST, &h, body, NOW_MS) {
            Err(ClientError::BadRequest(_)) => {}
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn a_refund_is_a_ga4_refund_of_the_same_transaction() {
    let p = send("refunds/create", &refund()).unwrap();
    let [e] = p.events.as_slice() else {
        panic!("{:?}", p.events)
    };
    assert_eq!(e.event_name, "refund");
    assert_eq!(
        e.transaction_id.as_deref(),
        Some("450789469"),
        "the order's id"
    );
    assert_eq!(e.event_id, "refund-450789469-509562969");
    assert_eq!(e.value, Some(199.64), "the money refunded");
    assert_eq!(e.currency.as_deref(), Some("USD"));
    let [item] = e.items.as_slice() else {
        panic!("{:?}", e.items)
    };
    assert_eq!(item.item_id.as_deref(), Some("IPOD2008GREEN"));
    assert_eq!(
        item.quantity,
        Some(1.0),
        "the refunded quantity, not the ordered"
    );
    let st = e.stitch.as_ref().unwrap();
    assert_eq!(st.dedup_key, "shopify:450789469:refund:509562969");
    assert_eq!(
        lookup(e),
        vec![("order_id".into(), KeyKind::Reference, "450789469".into())]
    );
    // A refund moving nothing is ignored.
    let mut r = refund();
    r["refund_line_items"] = json!([]);
    r["transactions"] = json!([]);
    assert!(ignored_reason(&send("refunds/create", &r).unwrap()).contains("no money"));
}

#[test]
fn the_config_names_what_is_wrong() {
    let cfg = ShopifyClientConfig {
        path: "webhooks".into(),
        secret: Secret::new(" "),
    };
    let problems = cfg.build().unwrap_err();
    assert!(
        problems.iter().any(|p| p.starts_with("path:")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("secret: is empty") && p.contains("${SHOPIFY_WEBHOOK_SECRET}")),
        "{problems:?}"
    );
}
