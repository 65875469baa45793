//! GA4 Measurement Protocol client: server-to-server events on `/mp/collect`, and Google's
//! validation server on `/debug/mp/collect`.
//!
//! Production answers `204` like Google and forwards what GA4 would accept: problems GA4
//! silently drops are dropped here too (and counted in `tagrelay_mp_dropped_total`), so a
//! sender never gets a 4xx for content Google would have taken with a 2xx. Only a request
//! that is wrong as HTTP (not POST, no stream id, unreadable JSON, bad secret) is refused.
//! The debug endpoint runs the same validator and forwards nothing.

pub mod item;
pub mod json;
pub mod validate;

impl crate::clients::ClientSpec for MeasurementProtocolClientConfig {
    fn build(&self) -> Result<crate::clients::BuiltClient, Vec<String>> {
        MeasurementProtocolClient::from_config(self)
            .map(|c| crate::clients::BuiltClient::Events(Box::new(c)))
    }
}

#[cfg(test)]
mod tests;

use http::{Method, StatusCode};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::clients::{Client, ClientError, ClientResponse, HitRequest, Parsed};
use crate::secret::Secret;
use json::Json;

pub const COLLECT_PATH: &str = "/mp/collect";
pub const DEBUG_PATH: &str = "/debug/mp/collect";

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MeasurementProtocolClientConfig {
    /// Accepted `api_secret` query values (`${ENV}` references). Empty = no secret required.
    pub api_secrets: Vec<Secret>,
    /// Accepted `measurement_id` / `firebase_app_id` values. Empty = any.
    pub measurement_ids: Vec<String>,
}

#[derive(Debug)]
pub struct MeasurementProtocolClient {
    api_secrets: Vec<Secret>,
    measurement_ids: Vec<String>,
}

impl MeasurementProtocolClient {
    pub fn from_config(cfg: &MeasurementProtocolClientConfig) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        for (i, s) in cfg.api_secrets.iter().enumerate() {
            if s.expose().trim().is_empty() {
                problems.push(format!(
                    "api_secrets[{i}]: is empty (an unset environment variable?); an empty secret would accept requests without one"
                ));
            }
        }
        for (i, id) in cfg.measurement_ids.iter().enumerate() {
            if id.is_empty() || id.chars().any(char::is_whitespace) {
                problems.push(format!(
                    "measurement_ids[{i}]: `{id}` must be a measurement id like \"G-ABCDEF1234\" or a firebase app id"
                ));
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(MeasurementProtocolClient {
            api_secrets: cfg.api_secrets.clone(),
            measurement_ids: cfg.measurement_ids.clone(),
        })
    }

    fn secret_accepted(&self, given: Option<&str>) -> bool {
        if self.api_secrets.is_empty() {
            return true;
        }
        let Some(given) = given else { return false };
        // Every configured secret is compared so timing reveals neither which one matched
        // nor how much of a guess was right.
        let mut ok = subtle::Choice::from(0u8);
        for s in &self.api_secrets {
            ok |= s.expose().as_bytes().ct_eq(given.as_bytes());
        }
        bool::from(ok)
    }
}

impl Client for MeasurementProtocolClient {
    fn kind(&self) -> &'static str {
        "measurement_protocol"
    }

    fn claims(&self, _method: &Method, path: &str) -> bool {
        // Every method: a GET on /mp/collect is a mistake worth a 405, not someone else's route.
        path == COLLECT_PATH || path == DEBUG_PATH
    }

    fn parse(&self, req: &HitRequest<'_>) -> Result<Parsed, ClientError> {
        if req.method != Method::POST {
            return Err(ClientError::MethodNotAllowed);
        }
        let debug = req.path == DEBUG_PATH;

        let mut measurement_id = None;
        let mut firebase_app_id = None;
        let mut api_secret = None;
        for (k, v) in crate::urlenc::pairs(req.query) {
            match k.as_ref() {
                "measurement_id" => measurement_id = Some(v),
                "firebase_app_id" => firebase_app_id = Some(v),
                "api_secret" => api_secret = Some(v),
                _ => {}
            }
        }
        if !self.secret_accepted(api_secret.as_deref()) {
            return Err(ClientError::Unauthorized(
                "api_secret is missing or not one this client accepts".into(),
            ));
        }
        let (stream_id, app_stream) = match (&measurement_id, &firebase_app_id) {
            (Some(m), _) if !m.is_empty() => (m.as_ref(), false),
            (_, Some(f)) if !f.is_empty() => (f.as_ref(), true),
            _ => {
                return Err(ClientError::BadRequest(
                    "measurement_id (web) or firebase_app_id (app) query parameter is required"
                        .into(),
                ))
            }
        };
        if !self.measurement_ids.is_empty() && !self.measurement_ids.iter().any(|m| m == stream_id)
        {
            let which = if app_stream {
                "firebase_app_id"
            } else {
                "measurement_id"
            };
            return Err(ClientError::Unauthorized(format!(
                "{which} is not one this client accepts"
            )));
        }

        let body = Json::parse(req.body)
            .map_err(|e| ClientError::BadRequest(format!("body is not valid JSON: {e}")))?;
        let Json::Obj(top) = &body else {
            return Err(ClientError::BadRequest(format!(
                "body must be a JSON object, got {}",
                body.type_name()
            )));
        };
        let cx = validate::Context {
            measurement_id: (!app_stream).then_some(stream_id),
            app_stream,
            now_ms: req.now_ms,
            collect_messages: debug,
        };
        let outcome = validate::process(top, &cx);

        if debug {
            return Ok(Parsed {
                events: Vec::new(),
                response: ClientResponse::Body {
                    status: StatusCode::OK,
                    content_type: "application/json",
                    body: validate::messages_json(&outcome.messages),
                    headers: Vec::new(),
                },
                set_cookies: false,
            });
        }
        for (reason, n) in &outcome.dropped {
            metrics::counter!("tagrelay_mp_dropped_total", "reason" => *reason).increment(*n);
        }
        Ok(Parsed {
            events: outcome.events,
            response: ClientResponse::NoContent,
            // Server-to-server: the caller is the site's backend, not the visitor's browser.
            set_cookies: false,
        })
    }
}
