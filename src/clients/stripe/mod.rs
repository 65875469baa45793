//! Stripe webhooks: `POST {path}` with `Stripe-Signature: t=<unix s>,v1=<hex>[,v1=…]`, each
//! `v1` the HMAC-SHA256 of `<t>.<raw body>` keyed with the endpoint's signing secret
//! (`whsec_…`, used as it is). Any `v1` may match (Stripe sends several while a secret is
//! rolled); `t` must be within `tolerance_secs` of the receipt time, against replays.
//!
//! Events: `checkout.session.completed` (when `payment_status` is `paid` or
//! `no_payment_required`) and `checkout.session.async_payment_succeeded` → `purchase`;
//! `charge.refunded` (one `refund` per refund listed, or one for the charge's
//! `amount_refunded` when the list is not included) and `refund.created` → `refund`. Other
//! types are answered 200 and ignored. Amounts are in the currency's minor unit (cents;
//! none for zero-decimal currencies such as JPY).
//!
//! The transaction id is the PaymentIntent id (`pi_…`; the Checkout Session id `cs_…` when
//! the session has none), which a refund also carries. Lookup keys, best first:
//! `client_reference_id` and `metadata.tagrelay_visitor` (set them to `tagrelay.visitor()`),
//! the session and PaymentIntent ids, the customer's email. Stripe's webhook does not carry
//! line items, the buyer's IP or User-Agent: an unstitched Stripe order has none.

#[cfg(test)]
mod tests;

use http::Method;
use serde::Deserialize;
use serde_json::{Map, Value};

use hmac::Mac;

use super::webhook::{self, key, opt_str, param_num, text, OrderEvent};
use crate::clients::{BuiltClient, Client, ClientError, ClientSpec, HitRequest, Parsed};
use crate::event::{Event, KeyKind};
use crate::secret::Secret;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StripeClientConfig {
    /// The endpoint's path (after `server.path_prefix`).
    pub path: String,
    /// The endpoint's signing secret (`whsec_…`), e.g. `"${STRIPE_WEBHOOK_SECRET}"`.
    pub secret: Secret,
    /// How far `t` of `Stripe-Signature` may be from the receipt time.
    #[serde(default = "default_tolerance")]
    pub tolerance_secs: u64,
}

/// Stripe's libraries default to five minutes.
fn default_tolerance() -> u64 {
    300
}

impl ClientSpec for StripeClientConfig {
    fn build(&self) -> Result<BuiltClient, Vec<String>> {
        let mut problems =
            webhook::validate_common(&self.path, &self.secret, "STRIPE_WEBHOOK_SECRET");
        if !(1..=86_400).contains(&self.tolerance_secs) {
            problems.push(format!(
                "tolerance_secs: {} is out of range; use 1 to 86400 (Stripe's libraries use 300)",
                self.tolerance_secs
            ));
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(BuiltClient::Events(Box::new(StripeClient {
            path: self.path.clone(),
            secret: self.secret.clone(),
            tolerance_ms: i64::try_from(self.tolerance_secs).unwrap_or(300) * 1000,
        })))
    }
}

#[derive(Debug)]
pub struct StripeClient {
    path: String,
    secret: Secret,
    tolerance_ms: i64,
}

pub const KIND: &str = "stripe";
const VISITOR_METADATA: &str = "tagrelay_visitor";
const HEADER: &str = "Stripe-Signature";

impl Client for StripeClient {
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
        self.verify(req.header("stripe-signature"), req.body, req.now_ms)?;
        let body = webhook::json_object(req.body)?;
        let kind = body.get("type").and_then(Value::as_str).unwrap_or("");
        let created_ms = body
            .get("created")
            .and_then(Value::as_i64)
            .map(|s| s.saturating_mul(1000));
        let Some(object) = body
            .get("data")
            .and_then(|d| d.get("object"))
            .and_then(Value::as_object)
        else {
            return Err(ClientError::BadRequest(
                "the event has no `data.object`".into(),
            ));
        };
        match kind {
            "checkout.session.completed" | "checkout.session.async_payment_succeeded" => {
                session(object, created_ms)
            }
            "charge.refunded" => charge_refunded(object, created_ms),
            "refund.created" => refund_created(object, created_ms),
            "" => Err(ClientError::BadRequest("the event has no `type`".into())),
            other => Ok(webhook::ignored(format!(
                "event type `{other}` is not used; send checkout.session.completed, checkout.session.async_payment_succeeded and charge.refunded"
            ))),
        }
    }
}

impl StripeClient {
    fn verify(&self, header: Option<&str>, body: &[u8], now_ms: i64) -> Result<(), ClientError> {
        let Some(h) = header.map(str::trim).filter(|h| !h.is_empty()) else {
            return Err(ClientError::Unauthorized(format!(
                "{HEADER} is missing; only signed webhooks are taken"
            )));
        };
        let mut t: Option<&str> = None;
        let mut signatures: Vec<Vec<u8>> = Vec::new();
        for part in h.split(',') {
            match part.trim().split_once('=') {
                Some(("t", v)) => t = Some(v.trim()),
                Some(("v1", v)) => {
                    if let Ok(sig) = hex::decode(v.trim()) {
                        signatures.push(sig);
                    }
                }
                _ => {}
            }
        }
        let Some(t) = t else {
            return Err(ClientError::Unauthorized(format!(
                "{HEADER} has no timestamp (t=)"
            )));
        };
        let Ok(secs) = t.parse::<i64>() else {
            return Err(ClientError::Unauthorized(format!(
                "{HEADER}: t={t} is not a unix time"
            )));
        };
        if signatures.is_empty() {
            return Err(ClientError::Unauthorized(format!(
                "{HEADER} has no v1 signature"
            )));
        }
        let mut message = Vec::with_capacity(t.len() + 1 + body.len());
        message.extend_from_slice(t.as_bytes());
        message.push(b'.');
        message.extend_from_slice(body);
        let mac = webhook::mac(&self.secret, &message)
            .ok_or_else(|| ClientError::Unauthorized("cannot check the signature".into()))?;
        // Every candidate is compared in constant time; which one matched is not revealed.
        let matched = signatures
            .iter()
            .fold(false, |ok, sig| mac.clone().verify_slice(sig).is_ok() | ok);
        if !matched {
            return Err(ClientError::Unauthorized(format!(
                "{HEADER} does not match the body (wrong signing secret, or the body was changed on the way)"
            )));
        }
        // Checked after the signature, so the age of a forged header tells nothing.
        let age_ms = now_ms - secs.saturating_mul(1000);
        if age_ms.abs() > self.tolerance_ms {
            return Err(ClientError::Unauthorized(format!(
                "{HEADER}: signed {} s {} this server's clock, over the tolerance of {} s (a replayed webhook, or a clock that is off)",
                age_ms.abs() / 1000,
                if age_ms >= 0 { "before" } else { "ahead of" },
                self.tolerance_ms / 1000
            )));
        }
        Ok(())
    }
}

/// Currencies whose amounts Stripe writes without minor units, and those with three decimals
/// (Stripe's "zero-decimal" and "three-decimal" lists).
const ZERO_DECIMAL: [&str; 16] = [
    "BIF", "CLP", "DJF", "GNF", "JPY", "KMF", "KRW", "MGA", "PYG", "RWF", "UGX", "VND", "VUV",
    "XAF", "XOF", "XPF",
];
const THREE_DECIMAL: [&str; 5] = ["BHD", "JOD", "KWD", "OMR", "TND"];

/// An amount in minor units as a decimal amount of `currency` (upper case).
fn amount(v: Option<&Value>, currency: &str) -> Option<f64> {
    let minor = v?.as_i64()? as f64;
    let div = if ZERO_DECIMAL.contains(&currency) {
        1.0
    } else if THREE_DECIMAL.contains(&currency) {
        1000.0
    } else {
        100.0
    };
    Some(minor / div)
}

fn currency_of(o: &Map<String, Value>) -> Option<String> {
    text(o.get("currency")).map(|c| c.to_ascii_uppercase())
}

/// An id field that may be a string or an expanded object with an `id`.
fn id_of(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::Object(o) => text(o.get("id")),
        other => text(Some(other)),
    }
}

fn session(s: &Map<String, Value>, created_ms: Option<i64>) -> Result<Parsed, ClientError> {
    let Some(session_id) = text(s.get("id")) else {
        return Err(ClientError::BadRequest(
            "the Checkout Session has no `id`".into(),
        ));
    };
    let status = s
        .get("payment_status")
        .and_then(Value::as_str)
        .unwrap_or("");
    if status != "paid" && status != "no_payment_required" {
        return Ok(webhook::ignored(format!(
            "Checkout Session {session_id} is not paid (payment_status `{status}`); its purchase comes with checkout.session.async_payment_succeeded"
        )));
    }
    let payment_intent = id_of(s.get("payment_intent"));
    let transaction_id = payment_intent.clone().unwrap_or_else(|| session_id.clone());
    let details = s.get("customer_details").filter(|d| d.is_object());
    let email = opt_str(details, "email").or_else(|| text(s.get("customer_email")));

    let mut lookup = Vec::new();
    key(
        &mut lookup,
        "client_reference_id",
        KeyKind::Visitor,
        text(s.get("client_reference_id")),
    );
    key(
        &mut lookup,
        "metadata.tagrelay_visitor",
        KeyKind::Visitor,
        text(s.get("metadata").and_then(|m| m.get(VISITOR_METADATA))),
    );
    key(&mut lookup, "id", KeyKind::Reference, Some(session_id));
    key(
        &mut lookup,
        "payment_intent",
        KeyKind::Reference,
        payment_intent,
    );
    key(
        &mut lookup,
        "customer_details.email",
        KeyKind::Email,
        email.clone(),
    );

    let mut e = OrderEvent {
        name: "purchase",
        source: KIND,
        transaction_id,
        part: None,
        time_ms: created_ms,
        scope: None,
        lookup,
    }
    .build();
    let currency = currency_of(s).unwrap_or_default();
    e.value = amount(s.get("amount_total"), &currency);
    let totals = s.get("total_details").filter(|t| t.is_object());
    param_num(
        &mut e,
        "tax",
        amount(totals.and_then(|t| t.get("amount_tax")), &currency),
    );
    param_num(
        &mut e,
        "shipping",
        amount(totals.and_then(|t| t.get("amount_shipping")), &currency),
    );
    e.currency = (!currency.is_empty()).then(|| currency.into());
    user_data(&mut e, details, email);
    Ok(webhook::accepted(vec![e]))
}

fn refund_event(
    transaction_id: String,
    refund_id: String,
    value: f64,
    currency: &str,
    time_ms: Option<i64>,
) -> Event {
    let mut lookup = Vec::new();
    key(
        &mut lookup,
        "payment_intent",
        KeyKind::Reference,
        Some(transaction_id.clone()),
    );
    let mut e = OrderEvent {
        name: "refund",
        source: KIND,
        transaction_id,
        part: Some(refund_id),
        time_ms,
        scope: None,
        lookup,
    }
    .build();
    e.value = Some(value);
    e.currency = (!currency.is_empty()).then(|| currency.into());
    e
}

fn charge_refunded(c: &Map<String, Value>, created_ms: Option<i64>) -> Result<Parsed, ClientError> {
    let Some(charge_id) = text(c.get("id")) else {
        return Err(ClientError::BadRequest("the charge has no `id`".into()));
    };
    let transaction_id = id_of(c.get("payment_intent")).unwrap_or_else(|| charge_id.clone());
    let currency = currency_of(c).unwrap_or_default();
    let listed = c
        .get("refunds")
        .and_then(|r| r.get("data"))
        .and_then(Value::as_array);
    let mut events = Vec::new();
    match listed {
        Some(list) if !list.is_empty() => {
            for r in list {
                let Some(id) = text(r.get("id")) else {
                    continue;
                };
                if r.get("status").and_then(Value::as_str) == Some("failed") {
                    continue;
                }
                let cur = text(r.get("currency"))
                    .map(|c| c.to_ascii_uppercase())
                    .unwrap_or_else(|| currency.clone());
                let Some(value) = amount(r.get("amount"), &cur) else {
                    continue;
                };
                let at = r
                    .get("created")
                    .and_then(Value::as_i64)
                    .map(|s| s.saturating_mul(1000))
                    .or(created_ms);
                events.push(refund_event(transaction_id.clone(), id, value, &cur, at));
            }
        }
        _ => {
            // Without the list (not included by newer API versions), the charge's total so
            // far: one refund event per amount reached.
            if let Some(value) = amount(c.get("amount_refunded"), &currency).filter(|v| *v > 0.0) {
                let part = format!(
                    "{charge_id}-{}",
                    c.get("amount_refunded")
                        .and_then(Value::as_i64)
                        .unwrap_or(0)
                );
                events.push(refund_event(
                    transaction_id,
                    part,
                    value,
                    &currency,
                    created_ms,
                ));
            }
        }
    }
    if events.is_empty() {
        return Ok(webhook::ignored(format!(
            "charge {charge_id} lists no refund"
        )));
    }
    Ok(webhook::accepted(events))
}

fn refund_created(r: &Map<String, Value>, created_ms: Option<i64>) -> Result<Parsed, ClientError> {
    let Some(refund_id) = text(r.get("id")) else {
        return Err(ClientError::BadRequest("the refund has no `id`".into()));
    };
    if r.get("status").and_then(Value::as_str) == Some("failed") {
        return Ok(webhook::ignored(format!("refund {refund_id} failed")));
    }
    let Some(transaction_id) = id_of(r.get("payment_intent")).or_else(|| id_of(r.get("charge")))
    else {
        return Err(ClientError::BadRequest(
            "the refund has neither `payment_intent` nor `charge`".into(),
        ));
    };
    let currency = currency_of(r).unwrap_or_default();
    let Some(value) = amount(r.get("amount"), &currency) else {
        return Err(ClientError::BadRequest("the refund has no `amount`".into()));
    };
    let at = r
        .get("created")
        .and_then(Value::as_i64)
        .map(|s| s.saturating_mul(1000))
        .or(created_ms);
    Ok(webhook::accepted(vec![refund_event(
        transaction_id,
        refund_id,
        value,
        &currency,
        at,
    )]))
}

fn user_data(e: &mut Event, details: Option<&Value>, email: Option<String>) {
    let u = &mut e.user_data;
    u.email_address = email;
    u.phone_number = opt_str(details, "phone");
    // Stripe has one `name`; the first word is taken as the given name, the rest as the
    // family name (what Meta and Google match by).
    if let Some(name) = opt_str(details, "name") {
        let mut parts = name.splitn(2, ' ');
        u.address.first_name = parts.next().map(str::to_owned).filter(|s| !s.is_empty());
        u.address.last_name = parts
            .next()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty());
    }
    let addr = details
        .and_then(|d| d.get("address"))
        .filter(|a| a.is_object());
    let a = &mut u.address;
    a.street = opt_str(addr, "line1");
    a.city = opt_str(addr, "city");
    a.region = opt_str(addr, "state");
    a.postal_code = opt_str(addr, "postal_code");
    a.country = opt_str(addr, "country");
}
