//! Shopify order webhooks: `POST {path}` signed with `X-Shopify-Hmac-Sha256` (base64
//! HMAC-SHA256 of the raw body with the app's secret, or the key the admin shows for
//! webhooks made under Settings › Notifications).
//!
//! Topics (header `X-Shopify-Topic`): `orders/paid` → `purchase`; `orders/create` and
//! `orders/updated` → `purchase` once the order is `authorized`, `paid` or `partially_paid`;
//! `refunds/create` → `refund` (its items and the money refunded). Test orders (`"test":
//! true`) and other topics are answered 200 and ignored. Payload fields as in Shopify's Admin
//! REST `Order` and `Refund` resources (the webhook bodies are those resources).
//!
//! The transaction id is the order's `id`; the event ids are `purchase-<id>` and
//! `refund-<id>-<refund id>`. Lookup keys, best first: a `tagrelay_visitor` cart attribute
//! (`note_attributes`), `checkout_token`, `cart_token`, `id`, `name`, the ad click ids of
//! `landing_site`, the customer's id and email. Unstitched, the order keeps its own `browser_ip`, `client_details.user_agent` and
//! `landing_site` (made absolute with `X-Shopify-Shop-Domain`).

#[cfg(test)]
mod tests;

use http::Method;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::webhook::{
    self, cap_items, key, money, opt_str, param_num, param_text, round2, text, time_ms, ItemFields,
    OrderEvent,
};
use crate::clients::{BuiltClient, Client, ClientError, ClientSpec, HitRequest, Parsed};
use crate::event::{Event, KeyKind};
use crate::secret::Secret;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShopifyClientConfig {
    /// Where Shopify posts (after `server.path_prefix`), e.g. `/webhooks/shopify`.
    pub path: String,
    /// The webhook signing secret, e.g. `"${SHOPIFY_WEBHOOK_SECRET}"`.
    pub secret: Secret,
}

impl ClientSpec for ShopifyClientConfig {
    fn build(&self) -> Result<BuiltClient, Vec<String>> {
        let problems = webhook::validate_common(&self.path, &self.secret, "SHOPIFY_WEBHOOK_SECRET");
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(BuiltClient::Events(Box::new(ShopifyClient {
            path: self.path.clone(),
            secret: self.secret.clone(),
        })))
    }
}

#[derive(Debug)]
pub struct ShopifyClient {
    path: String,
    secret: Secret,
}

pub const KIND: &str = "shopify";
/// The cart attribute (`note_attributes`) a theme can set to `tagrelay.visitor()`.
const VISITOR_ATTRIBUTE: &str = "tagrelay_visitor";

impl Client for ShopifyClient {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn claims(&self, _method: &Method, path: &str) -> bool {
        path == self.path
    }

    fn parse(&self, req: &HitRequest<'_>) -> Result<Parsed, ClientError> {
        if req.method != Method::POST {
            return Err(ClientError::MethodNotAllowed);
        }
        webhook::verify_base64_hmac(
            &self.secret,
            req.body,
            req.header("x-shopify-hmac-sha256"),
            "X-Shopify-Hmac-Sha256",
        )?;
        let topic = req.header("x-shopify-topic").unwrap_or("").trim();
        let shop = req
            .header("x-shopify-shop-domain")
            .map(str::trim)
            .filter(|s| !s.is_empty() && !s.contains(['/', ' ']));
        let body = webhook::json_object(req.body)?;
        match topic {
            "orders/paid" | "orders/create" | "orders/updated" => order(&body, topic, shop),
            "refunds/create" => refund(&body),
            "" => Err(ClientError::BadRequest("X-Shopify-Topic is missing".into())),
            other => Ok(webhook::ignored(format!(
                "topic `{other}` is not used; subscribe to orders/paid and refunds/create"
            ))),
        }
    }
}

/// Financial states in which `orders/create` and `orders/updated` count as a purchase.
const PAID: [&str; 3] = ["authorized", "paid", "partially_paid"];

fn order(o: &Map<String, Value>, topic: &str, shop: Option<&str>) -> Result<Parsed, ClientError> {
    let Some(id) = text(o.get("id")) else {
        return Err(ClientError::BadRequest("the order has no `id`".into()));
    };
    if o.get("test").and_then(Value::as_bool) == Some(true) {
        return Ok(webhook::ignored(format!("order {id} is a test order")));
    }
    let status = o
        .get("financial_status")
        .and_then(Value::as_str)
        .unwrap_or("");
    if topic != "orders/paid" && !PAID.contains(&status) {
        return Ok(webhook::ignored(format!(
            "order {id} is not paid yet (financial_status `{status}`)"
        )));
    }
    let customer = o.get("customer").and_then(Value::as_object);
    let email = text(o.get("email"))
        .or_else(|| text(o.get("contact_email")))
        .or_else(|| customer.and_then(|c| text(c.get("email"))));

    let mut lookup = Vec::new();
    key(
        &mut lookup,
        "note_attributes.tagrelay_visitor",
        KeyKind::Visitor,
        note_attribute(o, VISITOR_ATTRIBUTE),
    );
    key(
        &mut lookup,
        "checkout_token",
        KeyKind::Reference,
        text(o.get("checkout_token")),
    );
    key(
        &mut lookup,
        "cart_token",
        KeyKind::Reference,
        text(o.get("cart_token")),
    );
    key(&mut lookup, "id", KeyKind::Reference, Some(id.clone()));
    key(&mut lookup, "name", KeyKind::Reference, text(o.get("name")));
    if let Some(landing) = text(o.get("landing_site")) {
        // A relative landing site still has its query; any base reads it.
        let url = if landing.starts_with('/') {
            format!("https://shop.invalid{landing}")
        } else {
            landing
        };
        for k in crate::stitching::click_keys(&url) {
            key(&mut lookup, "landing_site", KeyKind::Click, Some(k));
        }
    }
    key(
        &mut lookup,
        "customer.id",
        KeyKind::UserId,
        customer.and_then(|c| text(c.get("id"))),
    );
    key(&mut lookup, "email", KeyKind::Email, email.clone());

    let mut e = OrderEvent {
        name: "purchase",
        source: KIND,
        transaction_id: id,
        part: None,
        time_ms: time_ms(o.get("processed_at")).or_else(|| time_ms(o.get("created_at"))),
        scope: None,
        lookup,
    }
    .build();
    e.currency = text(o.get("currency")).map(|c| c.to_ascii_uppercase().into());
    e.value = money(o.get("total_price"));
    param_num(&mut e, "tax", money(o.get("total_tax")));
    param_num(&mut e, "shipping", shipping(o));
    let coupons: Vec<String> = o
        .get("discount_codes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|d| text(d.get("code")))
        .collect();
    param_text(
        &mut e,
        "coupon",
        (!coupons.is_empty()).then(|| coupons.join(",")),
    );
    e.items = o
        .get("line_items")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|li| line_item(li, None))
        .collect();
    cap_items(&mut e.items);
    user_data(&mut e, o, email);
    browser(&mut e, o, shop);
    Ok(webhook::accepted(vec![e]))
}

fn refund(r: &Map<String, Value>) -> Result<Parsed, ClientError> {
    let (Some(refund_id), Some(order_id)) = (text(r.get("id")), text(r.get("order_id"))) else {
        return Err(ClientError::BadRequest(
            "the refund needs `id` and `order_id`".into(),
        ));
    };
    let mut lookup = Vec::new();
    key(
        &mut lookup,
        "order_id",
        KeyKind::Reference,
        Some(order_id.clone()),
    );
    let mut e = OrderEvent {
        name: "refund",
        source: KIND,
        transaction_id: order_id,
        part: Some(refund_id.clone()),
        time_ms: time_ms(r.get("processed_at")).or_else(|| time_ms(r.get("created_at"))),
        scope: None,
        lookup,
    }
    .build();
    // The money refunded: the refund's successful refund transactions.
    let mut value = 0.0;
    let mut currency = None;
    let mut any = false;
    for t in r
        .get("transactions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let kind = t.get("kind").and_then(Value::as_str).unwrap_or("refund");
        let status = t.get("status").and_then(Value::as_str).unwrap_or("success");
        if kind != "refund" || status != "success" {
            continue;
        }
        if let Some(a) = money(t.get("amount")) {
            value += a;
            any = true;
        }
        if currency.is_none() {
            currency = text(t.get("currency"));
        }
    }
    for rli in r
        .get("refund_line_items")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let qty = rli.get("quantity").and_then(Value::as_f64);
        if let Some(item) = rli.get("line_item").and_then(|li| line_item(li, qty)) {
            e.items.push(item);
        }
        if !any {
            value += money(rli.get("subtotal")).unwrap_or(0.0)
                + money(rli.get("total_tax")).unwrap_or(0.0);
        }
    }
    cap_items(&mut e.items);
    if value <= 0.0 && e.items.is_empty() {
        return Ok(webhook::ignored(format!(
            "refund {refund_id} refunds no money and no items"
        )));
    }
    e.value = Some(round2(value));
    e.currency = currency.map(|c| c.to_ascii_uppercase().into());
    Ok(webhook::accepted(vec![e]))
}

/// A cart attribute's value (`note_attributes: [{name, value}]`).
fn note_attribute(o: &Map<String, Value>, name: &str) -> Option<String> {
    o.get("note_attributes")?
        .as_array()?
        .iter()
        .find(|a| a.get("name").and_then(Value::as_str) == Some(name))
        .and_then(|a| text(a.get("value")))
}

/// Shipping charged: `total_shipping_price_set.shop_money.amount`, else the shipping lines.
fn shipping(o: &Map<String, Value>) -> Option<f64> {
    if let Some(a) = money(
        o.get("total_shipping_price_set")
            .and_then(|s| s.get("shop_money"))
            .and_then(|m| m.get("amount")),
    ) {
        return Some(a);
    }
    let lines = o.get("shipping_lines")?.as_array()?;
    let sum: f64 = lines.iter().filter_map(|l| money(l.get("price"))).sum();
    Some(round2(sum))
}

/// A line item: id = SKU, else variant id, else product id; `quantity` overrides the line's
/// (a refund's).
fn line_item(li: &Value, quantity: Option<f64>) -> Option<crate::event::Item> {
    let qty = quantity.or_else(|| li.get("quantity").and_then(Value::as_f64));
    let discount = money(li.get("total_discount"))
        .filter(|d| *d > 0.0)
        .or_else(|| {
            let sum: f64 = li
                .get("discount_allocations")?
                .as_array()?
                .iter()
                .filter_map(|d| money(d.get("amount")))
                .sum();
            Some(sum)
        })
        .zip(
            li.get("quantity")
                .and_then(Value::as_f64)
                .filter(|q| *q > 0.0),
        )
        .map(|(total, q)| round2(total / q));
    ItemFields {
        id: text(li.get("sku"))
            .or_else(|| text(li.get("variant_id")))
            .or_else(|| text(li.get("product_id"))),
        name: text(li.get("title")).or_else(|| text(li.get("name"))),
        variant: text(li.get("variant_title")),
        brand: text(li.get("vendor")),
        price: money(li.get("price")),
        quantity: qty,
        discount,
    }
    .build()
}

/// Email, phone, name and address for the ad platforms (they normalise and hash them).
fn user_data(e: &mut Event, o: &Map<String, Value>, email: Option<String>) {
    let billing = o
        .get("billing_address")
        .or_else(|| o.get("shipping_address"))
        .filter(|a| a.is_object());
    let customer = o.get("customer").filter(|c| c.is_object());
    let u = &mut e.user_data;
    u.email_address = email;
    u.phone_number = text(o.get("phone"))
        .or_else(|| opt_str(billing, "phone"))
        .or_else(|| opt_str(customer, "phone"));
    let a = &mut u.address;
    a.first_name = opt_str(billing, "first_name").or_else(|| opt_str(customer, "first_name"));
    a.last_name = opt_str(billing, "last_name").or_else(|| opt_str(customer, "last_name"));
    a.street = opt_str(billing, "address1");
    a.city = opt_str(billing, "city");
    a.region = opt_str(billing, "province_code").or_else(|| opt_str(billing, "province"));
    a.postal_code = opt_str(billing, "zip");
    a.country = opt_str(billing, "country_code");
}

/// What the order knows of the buyer's browser: IP, User-Agent, landing page and referrer.
fn browser(e: &mut Event, o: &Map<String, Value>, shop: Option<&str>) {
    let details = o.get("client_details").filter(|c| c.is_object());
    e.ip_override = text(o.get("browser_ip"))
        .or_else(|| opt_str(details, "browser_ip"))
        .filter(|ip| ip.parse::<std::net::IpAddr>().is_ok());
    e.user_agent = opt_str(details, "user_agent");
    e.page_location = text(o.get("landing_site")).and_then(|l| {
        if l.starts_with("http://") || l.starts_with("https://") {
            Some(l)
        } else if l.starts_with('/') {
            shop.map(|s| format!("https://{s}{l}"))
        } else {
            None
        }
    });
    e.page_referrer = text(o.get("referring_site")).filter(|r| r.starts_with("http"));
}
