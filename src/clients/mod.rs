//! Clients claim incoming requests and parse them into events (pure: request in, events out).

pub mod data;
pub mod ga4;
pub mod measurement_protocol;
pub mod script_proxy;
pub mod shopify;
pub mod stripe;
pub mod webhook;
pub mod woocommerce;

use std::net::IpAddr;

use http::{HeaderMap, Method, StatusCode};

use crate::event::Event;

/// Everything a client may look at. Borrowed from the live request; no I/O.
#[derive(Debug)]
pub struct HitRequest<'a> {
    pub method: &'a Method,
    /// Path with the configured `path_prefix` already stripped (always starts with `/`).
    pub path: &'a str,
    /// Raw query string (without `?`), not yet decoded.
    pub query: &'a str,
    pub headers: &'a HeaderMap,
    /// `Host` (or the URI's authority), port included if sent.
    pub host: &'a str,
    pub body: &'a [u8],
    /// Visitor IP after the trusted-proxy rules.
    pub client_ip: IpAddr,
    /// Receipt time, unix milliseconds.
    pub now_ms: i64,
}

impl HitRequest<'_> {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// All `Cookie` headers as one (HTTP/2 proxies may split them), borrowed when there is
    /// one.
    pub fn cookie_header(&self) -> Option<std::borrow::Cow<'_, str>> {
        let mut values = self
            .headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok());
        let first = values.next()?;
        match values.next() {
            None => Some(std::borrow::Cow::Borrowed(first)),
            Some(second) => {
                let mut joined = format!("{first}; {second}");
                for v in values {
                    joined.push_str("; ");
                    joined.push_str(v);
                }
                Some(std::borrow::Cow::Owned(joined))
            }
        }
    }
}

/// How the ingress answers a claimed request once its events are safely queued.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientResponse {
    /// `204 No Content` (what Google's collect endpoint answers).
    NoContent,
    /// A JSON body listing the accepted events (`event_id`, `event_name`), for the data client.
    EventIds,
    /// A fixed body with a content type, e.g. a JS file or validation messages.
    Body {
        status: StatusCode,
        content_type: &'static str,
        body: Vec<u8>,
        /// Extra response headers (e.g. `cache-control`, `etag`); names are lowercase.
        headers: Vec<(&'static str, String)>,
    },
}

/// What a client made of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    /// Events in hit order. `event_id` may be empty: the ingress mints one.
    pub events: Vec<Event>,
    pub response: ClientResponse,
    /// Whether first-party cookies are managed for this request (browser hits: yes;
    /// server-to-server Measurement Protocol: no).
    pub set_cookies: bool,
}

/// A request the client claimed but cannot accept. Rendered as a 4xx with the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    BadRequest(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("unauthorized: {0}")]
    Unauthorized(String),
}

impl ClientError {
    pub fn status(&self) -> StatusCode {
        match self {
            ClientError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ClientError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ClientError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
        }
    }
}

/// A configured client. Implementations are pure functions of the request.
pub trait Client: Send + Sync + std::fmt::Debug {
    /// The client's type name, used as the `client` metric label and the event `source`.
    fn kind(&self) -> &'static str;
    /// Whether this client takes the request (first claimant wins, in config order).
    fn claims(&self, method: &Method, path: &str) -> bool;
    fn parse(&self, req: &HitRequest<'_>) -> Result<Parsed, ClientError>;
}

/// A client as built from its config: an event client, or a first-party script proxy (asked
/// before event clients for `GET`/`HEAD`; not an event client, because it does network I/O).
#[derive(Debug)]
pub enum BuiltClient {
    Events(Box<dyn Client>),
    ScriptProxy(script_proxy::ScriptProxy),
}

/// What every client type's config can do; the registry ([`ClientConfig`]) hands configs out
/// as this.
pub trait ClientSpec {
    /// Validates the config into the client (every problem named by its key).
    fn build(&self) -> Result<BuiltClient, Vec<String>>;
}

crate::typed_table::typed_configs! {
    /// A `[[clients]]` entry, by its `type`. A new client type is a folder under
    /// `src/clients/` whose config implements [`ClientSpec`], and one line here.
    pub enum ClientConfig("client", CLIENT_TYPES) as dyn ClientSpec {
        Ga4("ga4", ga4::Ga4ClientConfig),
        MeasurementProtocol("measurement_protocol", measurement_protocol::MeasurementProtocolClientConfig),
        Data("data", data::DataClientConfig),
        ScriptProxy("script_proxy", script_proxy::ScriptProxyConfig),
        Shopify("shopify", shopify::ShopifyClientConfig),
        WooCommerce("woocommerce", woocommerce::WooCommerceClientConfig),
        Stripe("stripe", stripe::StripeClientConfig),
    }
}

/// Strong validator of a body we serve: a hash of its bytes, so it changes exactly when they
/// do.
pub(crate) fn etag_of(body: &[u8]) -> http::HeaderValue {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(body);
    let hex = hex::encode(digest.get(..16).unwrap_or(&digest[..]));
    http::HeaderValue::from_str(&format!("\"{hex}\""))
        .unwrap_or(http::HeaderValue::from_static("\"0\""))
}

/// `If-None-Match` (every such header) against our ETag, with the weak comparison of RFC 9110
/// §13.1.2: `W/` prefixes are ignored, `*` matches.
pub(crate) fn etag_matches(headers: &HeaderMap, etag: &http::HeaderValue) -> bool {
    let ours = etag.as_bytes();
    headers
        .get_all(http::header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t).as_bytes() == ours)
}
