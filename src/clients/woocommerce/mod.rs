//! WooCommerce order webhooks: `POST {path}` signed with `X-WC-Webhook-Signature` (base64
//! HMAC-SHA256 of the raw body with the webhook's secret, as `WC_Webhook::generate_signature`
//! computes it). The body is the order as the REST API (`/wc/v3/orders/<id>`) returns it.
//!
//! Topics (header `X-WC-Webhook-Topic`): `order.created` and `order.updated`. An order that
//! was paid (`date_paid_gmt` set, or status `processing` / `completed`) gives a `purchase`;
//! each entry of its `refunds` gives a `refund` (WooCommerce has no refund topic: a refund
//! arrives as an `order.updated`). Every resend of the order repeats them; the dedup record
//! keeps one of each. WooCommerce's ping when a webhook is saved (`webhook_id=<n>`, form
//! encoded, unsigned) is answered 200 and stores nothing.
//!
//! The transaction id is the order `number` (what the thank-you page and GTM4WP show; the
//! `id` when there is none). Lookup keys, best first: a `tagrelay_visitor` order meta field,
//! `number`, `id`, `customer_id` (when logged in), the billing email. Unstitched, the order
//! keeps its `customer_ip_address` and `customer_user_agent`, and the shop's address
//! (`X-WC-Webhook-Source`) as the page.

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
pub struct WooCommerceClientConfig {
    /// The webhook's Delivery URL path (after `server.path_prefix`).
    pub path: String,
    /// The webhook's Secret, e.g. `"${WOOCOMMERCE_WEBHOOK_SECRET}"`.
    pub secret: Secret,
}

impl ClientSpec for WooCommerceClientConfig {
    fn build(&self) -> Result<BuiltClient, Vec<String>> {
        let problems =
            webhook::validate_common(&self.path, &self.secret, "WOOCOMMERCE_WEBHOOK_SECRET");
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(BuiltClient::Events(Box::new(WooCommerceClient {
            path: self.path.clone(),
            secret: self.secret.clone(),
        })))
    }
}

#[derive(Debug)]
pub struct WooCommerceClient {
    path: String,
    secret: Secret,
}

pub const KIND: &str = "woocommerce";
const VISITOR_META: [&str; 2] = ["tagrelay_visitor", "_tagrelay_visitor"];
/// Statuses of an order that is paid even when `date_paid_gmt` is missing.
const PAID: [&str; 2] = ["processing", "completed"];
/// Statuses that never count as a purchase.
const UNPAID: [&str; 5] = [
    "pending",
    "failed",
    "cancelled",
    "checkout-draft",
    "on-hold",
];

impl Client for WooCommerceClient {
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
        let signature = req.header("x-wc-webhook-signature");
        if signature.is_none() && is_ping(req.body) {
            return Ok(webhook::ignored("ping: this webhook is set up"));
        }
        webhook::verify_base64_hmac(&self.secret, req.body, signature, "X-WC-Webhook-Signature")?;
        let topic = req.header("x-wc-webhook-topic").unwrap_or("").trim();
        if topic != "order.created" && topic != "order.updated" {
            return Ok(webhook::ignored(format!(
                "topic `{topic}` is not used; use order.created and order.updated"
            )));
        }
        let source = req
            .header("x-wc-webhook-source")
            .map(str::trim)
            .filter(|s| s.starts_with("http://") || s.starts_with("https://"));
        let body = webhook::json_object(req.body)?;
        order(&body, source)
    }
}

/// WooCommerce's ping: `webhook_id=<digits>`.
fn is_ping(body: &[u8]) -> bool {
    std::str::from_utf8(body)
        .ok()
        .and_then(|b| b.trim().strip_prefix("webhook_id="))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

fn order(o: &Map<String, Value>, source: Option<&str>) -> Result<Parsed, ClientError> {
    let Some(id) = text(o.get("id")) else {
        return Err(ClientError::BadRequest("the order has no `id`".into()));
    };
    let number = text(o.get("number")).unwrap_or_else(|| id.clone());
    let status = o.get("status").and_then(Value::as_str).unwrap_or("");
    // The `_gmt` fields: the others are in the site's time zone, without an offset.
    let paid_ms = time_ms(o.get("date_paid_gmt"));
    let paid = !UNPAID.contains(&status) && (paid_ms.is_some() || PAID.contains(&status));
    let billing = o.get("billing").filter(|b| b.is_object());
    let email = opt_str(billing, "email");
    let site = source.map(|s| s.trim_end_matches('/').to_owned());
    let scope = site
        .as_deref()
        .and_then(crate::event::url_host)
        .map(str::to_owned);

    let mut lookup = Vec::new();
    key(
        &mut lookup,
        "meta_data.tagrelay_visitor",
        KeyKind::Visitor,
        meta(o),
    );
    key(
        &mut lookup,
        "number",
        KeyKind::Reference,
        Some(number.clone()),
    );
    if number != id {
        key(&mut lookup, "id", KeyKind::Reference, Some(id.clone()));
    }
    key(
        &mut lookup,
        "customer_id",
        KeyKind::UserId,
        text(o.get("customer_id")).filter(|c| c != "0"),
    );
    key(&mut lookup, "billing.email", KeyKind::Email, email.clone());

    let currency = text(o.get("currency")).map(|c| c.to_ascii_uppercase());
    let mut events = Vec::new();
    if paid {
        let mut e = OrderEvent {
            name: "purchase",
            source: KIND,
            transaction_id: number.clone(),
            part: None,
            time_ms: paid_ms.or_else(|| time_ms(o.get("date_created_gmt"))),
            scope: scope.clone(),
            lookup: lookup.clone(),
        }
        .build();
        e.currency = currency.clone().map(Into::into);
        e.value = money(o.get("total"));
        param_num(&mut e, "tax", money(o.get("total_tax")));
        param_num(&mut e, "shipping", money(o.get("shipping_total")));
        let coupons: Vec<String> = o
            .get("coupon_lines")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|c| text(c.get("code")))
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
            .filter_map(line_item)
            .collect();
        cap_items(&mut e.items);
        user_data(&mut e, billing, email.clone());
        browser(&mut e, o, site.as_deref());
        events.push(e);
    }
    let refunded_at = time_ms(o.get("date_modified_gmt"));
    for r in o
        .get("refunds")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(refund_id) = text(r.get("id")) else {
            continue;
        };
        let Some(amount) = money(r.get("total")).map(f64::abs).filter(|a| *a > 0.0) else {
            continue;
        };
        let mut e = OrderEvent {
            name: "refund",
            source: KIND,
            transaction_id: number.clone(),
            part: Some(refund_id),
            time_ms: refunded_at,
            scope: scope.clone(),
            lookup: lookup.clone(),
        }
        .build();
        e.currency = currency.clone().map(Into::into);
        e.value = Some(round2(amount));
        browser(&mut e, o, site.as_deref());
        events.push(e);
    }
    if events.is_empty() {
        return Ok(webhook::ignored(format!(
            "order {number} is not paid (status `{status}`) and has no refunds"
        )));
    }
    Ok(webhook::accepted(events))
}

/// The visitor token a checkout stored as order meta.
fn meta(o: &Map<String, Value>) -> Option<String> {
    o.get("meta_data")?
        .as_array()?
        .iter()
        .find(|m| {
            m.get("key")
                .and_then(Value::as_str)
                .is_some_and(|k| VISITOR_META.contains(&k))
        })
        .and_then(|m| text(m.get("value")))
}

fn line_item(li: &Value) -> Option<crate::event::Item> {
    let qty = li.get("quantity").and_then(Value::as_f64);
    // `price` is the unit price after discounts; `subtotal` is before them.
    let subtotal = money(li.get("subtotal"));
    let total = money(li.get("total"));
    let q = qty.filter(|q| *q > 0.0);
    let unit_before = subtotal.zip(q).map(|(s, q)| round2(s / q));
    let discount = subtotal
        .zip(total)
        .zip(q)
        .map(|((s, t), q)| round2((s - t) / q));
    let variation = text(li.get("variation_id")).filter(|v| v != "0");
    ItemFields {
        id: text(li.get("sku"))
            .or(variation)
            .or_else(|| text(li.get("product_id"))),
        name: text(li.get("name")),
        variant: None,
        brand: None,
        price: unit_before.or_else(|| money(li.get("price"))),
        quantity: qty,
        discount,
    }
    .build()
}

fn user_data(e: &mut Event, billing: Option<&Value>, email: Option<String>) {
    let u = &mut e.user_data;
    u.email_address = email;
    u.phone_number = opt_str(billing, "phone");
    let a = &mut u.address;
    a.first_name = opt_str(billing, "first_name");
    a.last_name = opt_str(billing, "last_name");
    a.street = opt_str(billing, "address_1");
    a.city = opt_str(billing, "city");
    a.region = opt_str(billing, "state");
    a.postal_code = opt_str(billing, "postcode");
    a.country = opt_str(billing, "country");
}

fn browser(e: &mut Event, o: &Map<String, Value>, site: Option<&str>) {
    e.ip_override =
        text(o.get("customer_ip_address")).filter(|ip| ip.parse::<std::net::IpAddr>().is_ok());
    e.user_agent = text(o.get("customer_user_agent"));
    e.page_location = site.map(|s| format!("{s}/"));
}
