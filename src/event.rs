//! The common event model every client produces and every tag consumes.
//!
//! Key names follow GTM-SS "common event data" so that users who know server-side GTM can
//! address fields in triggers by the names they already use (`page_location`,
//! `user_data.email_address`, `items.0.item_id`, …). GA4 session state is typed rather than
//! buried in `x-ga-*` strings because tags and triggers read it on every event.

use compact_str::CompactString;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One event, as stored in the outbox and shown in the debug view.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Event {
    pub event_name: String,
    /// Shared by every copy of the event (browser pixel, every tag) so vendors deduplicate.
    pub event_id: String,
    /// When the event happened, in unix milliseconds (hit receipt unless the hit says otherwise).
    pub timestamp_ms: i64,
    /// Which configured client produced the event (`ga4`, `measurement_protocol`, `data`).
    pub source: CompactString,

    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<CompactString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// The visitor's IP as tagrelay resolved it (trusted-proxy rules applied).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip_override: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page_location: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page_referrer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page_title: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub language: Option<CompactString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub screen_resolution: Option<CompactString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub currency: Option<CompactString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transaction_id: Option<String>,

    #[serde(skip_serializing_if = "UserData::is_empty")]
    pub user_data: UserData,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<Item>,

    #[serde(skip_serializing_if = "GaSession::is_empty")]
    pub ga: GaSession,
    #[serde(skip_serializing_if = "Consent::is_empty")]
    pub consent: Consent,
    /// Identifiers read from or written to first-party cookies.
    #[serde(skip_serializing_if = "Identity::is_empty")]
    pub identity: Identity,

    /// User properties (`up.*` strings / `upn.*` numbers on the GA4 wire).
    #[serde(skip_serializing_if = "Map::is_empty")]
    pub user_properties: Map<String, Value>,
    /// Custom event parameters (`ep.*` strings / `epn.*` numbers on the GA4 wire).
    #[serde(skip_serializing_if = "Map::is_empty")]
    pub params: Map<String, Value>,
    /// Hit parameters tagrelay has no typed field for, kept verbatim (decoded once) in order,
    /// so the GA4 tag passes them through unchanged.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub passthrough: Vec<(String, String)>,
    /// The W3C `traceparent` of the span of the hit that took this event, when the hit was
    /// traced (`[telemetry]`): stored with the event so that its deliveries, even after a
    /// restart, link to that span. Payloads from before it, or from untraced hits, have none.
    /// Not event data: tags do not send it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// Set on a backend order's events (webhook clients): how the order was joined to the
    /// browsing session it came from. Boxed: browser events never carry it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stitch: Option<Box<Stitch>>,
}

/// A backend order event's link to the visitor who placed the order. The webhook client
/// fills `lookup` and `dedup_key`; the stitching step at the ingress claims the order, looks
/// the keys up and sets the outcome.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Stitch {
    pub status: StitchStatus,
    /// The order's field whose value found the session (`checkout_token`, `email`, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<CompactString>,
    /// The browser event that recorded that session (`begin_checkout`, `purchase`, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matched_event: Option<CompactString>,
    /// When that browser event was recorded, unix milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recorded_ms: Option<i64>,
    /// The order's fields that were looked up, best first (names only: the values are not
    /// kept once looked up).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tried: Vec<CompactString>,
    /// What the order can be found by, best first. Emptied by the stitching step.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub lookup: Vec<OrderKey>,
    /// Platform, order and event type (`shopify:450789469:purchase`): one event per key,
    /// however often the platform sends the order.
    pub dedup_key: String,
}

impl Stitch {
    /// A stitch waiting for the lookup of `lookup`, deduplicated by `dedup_key`.
    pub fn pending(dedup_key: String, lookup: Vec<OrderKey>) -> Box<Stitch> {
        Box::new(Stitch {
            dedup_key,
            lookup,
            ..Stitch::default()
        })
    }
}

/// Where a backend order event stands with its browsing session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StitchStatus {
    /// Not looked up yet.
    #[default]
    Pending,
    /// Enriched from the visitor's browsing session.
    Stitched,
    /// No session matched (or stitching is off): sent with what the order itself carries.
    Unstitched,
}

impl StitchStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            StitchStatus::Pending => "pending",
            StitchStatus::Stitched => "stitched",
            StitchStatus::Unstitched => "unstitched",
        }
    }
}

/// One value an order can be found by, and which kind of browser-side key it matches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderKey {
    /// The order's field, for the debug view (`checkout_token`, `client_reference_id`, …).
    pub field: CompactString,
    pub kind: KeyKind,
    /// As the order has it (emails and user ids are hashed by the stitching step).
    pub value: String,
}

impl OrderKey {
    pub fn new(field: &str, kind: KeyKind, value: impl Into<String>) -> OrderKey {
        OrderKey {
            field: field.into(),
            kind,
            value: value.into(),
        }
    }
}

/// The kinds of value a browsing session is recorded under and an order looked up by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyKind {
    /// A token `tagrelay.js` handed the page (`tagrelay.visitor()`), returned by the platform
    /// (Stripe `client_reference_id`, `metadata.tagrelay_visitor`, a cart attribute).
    Visitor,
    /// An order reference both sides know: transaction id, checkout token, cart token, order
    /// id or number.
    Reference,
    /// The shop's own customer id (GA4 `user_id` on the browser side).
    UserId,
    /// The customer's email address.
    Email,
    /// An ad click id of the landing page, as `<param>=<id>` (`gclid=Cj0…`): the visit that
    /// landed from the click, found by an order's landing-site URL.
    Click,
}

/// The event id of an order's event, derived from the order so that every copy of it (the
/// webhook's, the thank-you page's pixel, `tagrelay.js`) carries the same one and vendors
/// deduplicate: `purchase-<transaction_id>`, `refund-<transaction_id>[-<refund id>]`.
pub fn order_event_id(event_name: &str, transaction_id: &str, part: Option<&str>) -> String {
    match part {
        Some(p) => format!("{event_name}-{transaction_id}-{p}"),
        None => format!("{event_name}-{transaction_id}"),
    }
}

/// GA4 session and protocol state carried by the hit.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GaSession {
    /// `tid`, the measurement id `G-…`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measurement_id: Option<CompactString>,
    /// `sid`: unix seconds of session start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<CompactString>,
    /// `sct`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_number: Option<u32>,
    /// `seg`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_engaged: Option<bool>,
    /// `_et`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engagement_time_msec: Option<u64>,
    /// `_ss` (1, or 2 when also a conversion)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_start: Option<u8>,
    /// `_fv`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_visit: Option<u8>,
    /// `_nsi`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_session_id: Option<u8>,
    /// `_c`: key event (conversion)
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub key_event: bool,
    /// `_dbg` or `ep.debug_mode`
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub debug_mode: bool,
    /// `v`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol_version: Option<CompactString>,
    /// `gtm`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gtm_version: Option<CompactString>,
    /// `_p`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page_id: Option<CompactString>,
    /// `_s`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_count: Option<u32>,
    /// The client id the browser's JavaScript sent (`cid`), kept when the server-managed id wins.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub js_client_id: Option<CompactString>,
}

impl GaSession {
    pub fn is_empty(&self) -> bool {
        self == &GaSession::default()
    }
}

/// One consent signal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsentState {
    #[default]
    Unknown,
    Granted,
    Denied,
}

impl ConsentState {
    pub fn is_unknown(&self) -> bool {
        matches!(self, ConsentState::Unknown)
    }
}

/// Consent Mode state of the hit, plus the raw strings for pass-through.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Consent {
    #[serde(skip_serializing_if = "ConsentState::is_unknown")]
    pub ad_storage: ConsentState,
    #[serde(skip_serializing_if = "ConsentState::is_unknown")]
    pub analytics_storage: ConsentState,
    #[serde(skip_serializing_if = "ConsentState::is_unknown")]
    pub ad_user_data: ConsentState,
    #[serde(skip_serializing_if = "ConsentState::is_unknown")]
    pub ad_personalization: ConsentState,
    /// `gcs`, e.g. `G111`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gcs: Option<CompactString>,
    /// `gcd`, e.g. `13t3t3t3t5l1`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gcd: Option<CompactString>,
    /// `npa` (or ga4mp's `_npa`)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub npa: Option<CompactString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dma: Option<CompactString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dma_cps: Option<CompactString>,
}

impl Consent {
    pub fn is_empty(&self) -> bool {
        self == &Consent::default()
    }

    /// Looks a signal up by its Consent Mode name (`ad_storage`, …).
    pub fn get(&self, name: &str) -> Option<ConsentState> {
        match name {
            "ad_storage" => Some(self.ad_storage),
            "analytics_storage" => Some(self.analytics_storage),
            "ad_user_data" => Some(self.ad_user_data),
            "ad_personalization" => Some(self.ad_personalization),
            _ => None,
        }
    }

    pub const SIGNALS: [&'static str; 4] = [
        "ad_storage",
        "analytics_storage",
        "ad_user_data",
        "ad_personalization",
    ];
}

/// First-party identifiers from cookies (read from the request, or minted by tagrelay).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Identity {
    /// Meta browser id (`_fbp` cookie value).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fbp: Option<String>,
    /// Meta click id (`_fbc` cookie value, or built from `fbclid`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fbc: Option<String>,
    /// The `_ga` cookie's client id, when present.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ga_client_id: Option<CompactString>,
    /// Value of the debug marker cookie/header, so the debug view can filter to one browser.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub debug_marker: Option<String>,
    // Ad platforms' click ids, raw (as in the landing URL), from the page URL or the platform's
    // first-party cookie (the click-id keeper, `identity/click_ids.rs`).
    /// Google Ads `gclid` (`_gcl_aw`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gclid: Option<String>,
    /// Google Ads `gbraid` (`_gcl_ag`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gbraid: Option<String>,
    /// Google Ads `wbraid` (`_gcl_gb`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wbraid: Option<String>,
    /// TikTok `ttclid` (cookie `ttclid`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttclid: Option<String>,
    /// TikTok browser id (`_ttp` cookie value).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttp: Option<String>,
    /// Snapchat `ScCid` (`_scclid`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sccid: Option<String>,
    /// Pinterest `epik` (`_epik`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epik: Option<String>,
    /// LinkedIn `li_fat_id` (cookie `li_fat_id`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub li_fat_id: Option<String>,
    /// Microsoft Advertising `msclkid` (`_uetmsclkid`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub msclkid: Option<String>,
}

impl Identity {
    pub fn is_empty(&self) -> bool {
        self == &Identity::default()
    }
}

/// User-provided data, in GTM-SS `user_data.*` names. Plain or `sha256_` forms.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UserData {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email_address: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256_email_address: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phone_number: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256_phone_number: Option<String>,
    #[serde(skip_serializing_if = "Address::is_empty")]
    pub address: Address,
    /// Date of birth, any common form; normalized per vendor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub date_of_birth: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gender: Option<String>,
}

impl UserData {
    pub fn is_empty(&self) -> bool {
        self == &UserData::default()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Address {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256_first_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256_last_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub street: Option<String>,
    /// Measurement Protocol `user_data.address[].sha256_street`, already hashed by the sender.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256_street: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub city: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postal_code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
}

impl Address {
    pub fn is_empty(&self) -> bool {
        self == &Address::default()
    }
}

/// One ecommerce item, GA4 names.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Item {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item_id: Option<CompactString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item_name: Option<CompactString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item_brand: Option<CompactString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item_category: Option<CompactString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item_category2: Option<CompactString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item_category3: Option<CompactString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item_category4: Option<CompactString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item_category5: Option<CompactString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item_variant: Option<CompactString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item_list_name: Option<CompactString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item_list_id: Option<CompactString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affiliation: Option<CompactString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coupon: Option<CompactString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discount: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location_id: Option<CompactString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub price: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantity: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub creative_name: Option<CompactString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub creative_slot: Option<CompactString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub promotion_id: Option<CompactString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub promotion_name: Option<CompactString>,
    /// Custom item parameters (`k<i>`/`v<i>` pairs on the GA4 wire), in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub custom: Vec<(String, String)>,
}

/// Items' text fields, listed once: a field's GA4 name is its Rust name, which is also what
/// serde writes. `Item::TEXT_FIELDS`, `text_fields` and `text_field_mut` come from this list.
macro_rules! item_text_fields {
    ($($field:ident),* $(,)?) => {
        impl Item {
            /// The text fields' GA4 names, in the order `text_fields` gives them.
            pub const TEXT_FIELDS: [&'static str; 18] = [$(stringify!($field)),*];

            /// Every text field with its GA4 name: the one list the clients, the trigger's
            /// field paths and the tags read items by.
            pub fn text_fields(&self) -> [(&'static str, &Option<CompactString>); 18] {
                [$((stringify!($field), &self.$field)),*]
            }

            /// The text field with this GA4 name.
            pub fn text_field_mut(&mut self, name: &str) -> Option<&mut Option<CompactString>> {
                match name {
                    $(stringify!($field) => Some(&mut self.$field),)*
                    _ => None,
                }
            }
        }
    };
}

item_text_fields!(
    item_id,
    item_name,
    affiliation,
    coupon,
    item_brand,
    item_category,
    item_category2,
    item_category3,
    item_category4,
    item_category5,
    item_list_id,
    item_list_name,
    item_variant,
    location_id,
    creative_name,
    creative_slot,
    promotion_id,
    promotion_name,
);

impl Item {
    /// The number fields' GA4 names (`index` is a whole number).
    pub const NUMBER_FIELDS: [&'static str; 4] = ["discount", "price", "quantity", "index"];
}

/// A value read out of an event by a field path, for triggers and the debug view.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue<'a> {
    Str(&'a str),
    Num(f64),
    Bool(bool),
    Json(&'a Value),
}

impl FieldValue<'_> {
    pub fn as_string(&self) -> String {
        match self {
            FieldValue::Str(s) => (*s).to_owned(),
            FieldValue::Num(n) => format_number(*n),
            FieldValue::Bool(b) => b.to_string(),
            FieldValue::Json(Value::String(s)) => s.clone(),
            FieldValue::Json(v) => v.to_string(),
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            FieldValue::Str(s) => s.trim().parse().ok(),
            FieldValue::Num(n) => Some(*n),
            FieldValue::Bool(_) => None,
            FieldValue::Json(Value::Number(n)) => n.as_f64(),
            FieldValue::Json(Value::String(s)) => s.trim().parse().ok(),
            FieldValue::Json(_) => None,
        }
    }
}

/// Formats a number the way GA4 and humans expect: `59`, not `59.0`.
pub fn format_number(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        format!("{n}")
    }
}

/// The top-level field names a trigger may address (besides `user_data.*`, `items.N.*`,
/// `params.*`, `user_properties.*`, `consent.*`, `ga.*`, `identity.*`, `stitch.*`).
pub const TOP_LEVEL_FIELDS: &[&str] = &[
    "event_name",
    "event_id",
    "timestamp_ms",
    "source",
    "client_id",
    "user_id",
    "ip_override",
    "user_agent",
    "page_location",
    "page_referrer",
    "page_title",
    "page_hostname",
    "page_path",
    "language",
    "screen_resolution",
    "currency",
    "value",
    "transaction_id",
];

const NESTED_ROOTS: &[&str] = &[
    "user_data",
    "items",
    "params",
    "user_properties",
    "consent",
    "ga",
    "identity",
    "stitch",
];

/// Checks at config load time that a field path can ever resolve. Returns a message naming the
/// closest valid root when it cannot.
pub fn validate_field_path(path: &str) -> Result<(), String> {
    let (root, rest) = match path.split_once('.') {
        Some((r, rest)) => (r, Some(rest)),
        None => (path, None),
    };
    if rest.is_none() && TOP_LEVEL_FIELDS.contains(&root) {
        return Ok(());
    }
    if NESTED_ROOTS.contains(&root) {
        return match rest {
            Some(r) if !r.is_empty() => Ok(()),
            _ => Err(format!("field `{path}` needs a key after `{root}.`")),
        };
    }
    let all = TOP_LEVEL_FIELDS.iter().chain(NESTED_ROOTS.iter());
    let best = all
        .map(|c| (strsim::jaro_winkler(root, c), *c))
        .max_by(|a, b| a.0.total_cmp(&b.0));
    let hint = match best {
        Some((score, c)) if score > 0.8 => format!("; did you mean `{c}`?"),
        _ => "; custom event parameters are addressed as `params.<name>`".to_owned(),
    };
    Err(format!("unknown field `{path}`{hint}"))
}

/// Room reserved for an event's stored payload: a GA4 page_view with cookies comes to ~0.9
/// KiB, so most payloads are written without growing the buffer.
const PAYLOAD_CAPACITY: usize = 1536;
/// About the size of a typical event's stored payload, for estimates where none was written.
pub const TYPICAL_PAYLOAD_BYTES: usize = 900;

/// Reads a stored payload: MessagePack as written since the payload format changed, or JSON
/// as stores from before hold (a JSON object starts with `{`, which no MessagePack map does).
/// Only a map is an event: rmp-serde would also read an array positionally, so a damaged
/// payload such as an empty array would pass as an empty event instead of failing.
pub fn decode_payload<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, String> {
    match payload.first() {
        Some(b'{') => serde_json::from_slice(payload).map_err(|e| e.to_string()),
        Some(0x80..=0x8f | 0xde | 0xdf) => {
            rmp_serde::from_slice(payload).map_err(|e| e.to_string())
        }
        _ => Err("neither a MessagePack map nor a JSON object".into()),
    }
}

impl Event {
    /// The event as the outbox stores it: MessagePack with field names (a map, so fields can
    /// be added or retired like in JSON). Not JSON because escaping every string byte by
    /// byte made serializing the event a fifth of a hit's instructions (callgrind);
    /// MessagePack copies strings whole and is ~14 % smaller.
    pub fn to_payload(&self) -> Result<Vec<u8>, rmp_serde::encode::Error> {
        let mut buf = Vec::with_capacity(PAYLOAD_CAPACITY);
        rmp_serde::encode::write_named(&mut buf, self)?;
        Ok(buf)
    }

    /// An event from its stored payload (either format, see [`decode_payload`]).
    pub fn from_payload(payload: &[u8]) -> Result<Event, String> {
        decode_payload(payload)
    }

    /// Reads a field by its GTM-SS path (`page_location`, `user_data.address.city`,
    /// `items.0.item_id`, `params.coupon`, `consent.ad_storage`). Missing → `None`.
    pub fn field(&self, path: &str) -> Option<FieldValue<'_>> {
        let (root, rest) = match path.split_once('.') {
            Some((r, rest)) => (r, Some(rest)),
            None => (path, None),
        };
        match (root, rest) {
            ("event_name", None) => Some(FieldValue::Str(&self.event_name)),
            ("event_id", None) => Some(FieldValue::Str(&self.event_id)),
            ("timestamp_ms", None) => Some(FieldValue::Num(self.timestamp_ms as f64)),
            ("source", None) => Some(FieldValue::Str(&self.source)),
            ("client_id", None) => s(&self.client_id),
            ("user_id", None) => s(&self.user_id),
            ("ip_override", None) => s(&self.ip_override),
            ("user_agent", None) => s(&self.user_agent),
            ("page_location", None) => s(&self.page_location),
            ("page_referrer", None) => s(&self.page_referrer),
            ("page_title", None) => s(&self.page_title),
            ("page_hostname", None) => self
                .page_location
                .as_deref()
                .and_then(|u| url_host(u))
                .map(FieldValue::Str),
            ("page_path", None) => self
                .page_location
                .as_deref()
                .and_then(url_path)
                .map(FieldValue::Str),
            ("language", None) => s(&self.language),
            ("screen_resolution", None) => s(&self.screen_resolution),
            ("currency", None) => s(&self.currency),
            ("value", None) => self.value.map(FieldValue::Num),
            ("transaction_id", None) => s(&self.transaction_id),
            ("user_data", Some(k)) => self.user_data_field(k),
            ("items", Some(k)) => {
                let (idx, key) = k.split_once('.')?;
                let item = self.items.get(idx.parse::<usize>().ok()?)?;
                item_field(item, key)
            }
            ("params", Some(k)) => self.params.get(k).map(json_field),
            ("user_properties", Some(k)) => self.user_properties.get(k).map(json_field),
            ("consent", Some(k)) => match self.consent.get(k) {
                Some(ConsentState::Granted) => Some(FieldValue::Str("granted")),
                Some(ConsentState::Denied) => Some(FieldValue::Str("denied")),
                Some(ConsentState::Unknown) => None,
                None => match k {
                    "gcs" => s(&self.consent.gcs),
                    "gcd" => s(&self.consent.gcd),
                    "npa" => s(&self.consent.npa),
                    "dma" => s(&self.consent.dma),
                    _ => None,
                },
            },
            ("ga", Some(k)) => {
                let g = &self.ga;
                match k {
                    "measurement_id" => s(&g.measurement_id),
                    "session_id" => s(&g.session_id),
                    "session_number" => g.session_number.map(|n| FieldValue::Num(n.into())),
                    "session_engaged" => g.session_engaged.map(FieldValue::Bool),
                    "engagement_time_msec" => {
                        g.engagement_time_msec.map(|n| FieldValue::Num(n as f64))
                    }
                    "session_start" => g.session_start.map(|n| FieldValue::Num(n.into())),
                    "first_visit" => g.first_visit.map(|n| FieldValue::Num(n.into())),
                    "key_event" => Some(FieldValue::Bool(g.key_event)),
                    "debug_mode" => Some(FieldValue::Bool(g.debug_mode)),
                    "js_client_id" => s(&g.js_client_id),
                    _ => None,
                }
            }
            ("stitch", Some(k)) => {
                let st = self.stitch.as_deref()?;
                match k {
                    "status" => Some(FieldValue::Str(st.status.as_str())),
                    "key" => s(&st.key),
                    "matched_event" => s(&st.matched_event),
                    "recorded_ms" => st.recorded_ms.map(|n| FieldValue::Num(n as f64)),
                    _ => None,
                }
            }
            ("identity", Some(k)) => match k {
                "fbp" => s(&self.identity.fbp),
                "fbc" => s(&self.identity.fbc),
                "ga_client_id" => s(&self.identity.ga_client_id),
                "debug_marker" => s(&self.identity.debug_marker),
                "gclid" => s(&self.identity.gclid),
                "gbraid" => s(&self.identity.gbraid),
                "wbraid" => s(&self.identity.wbraid),
                "ttclid" => s(&self.identity.ttclid),
                "ttp" => s(&self.identity.ttp),
                "sccid" => s(&self.identity.sccid),
                "epik" => s(&self.identity.epik),
                "li_fat_id" => s(&self.identity.li_fat_id),
                "msclkid" => s(&self.identity.msclkid),
                _ => None,
            },
            _ => None,
        }
    }

    fn user_data_field(&self, k: &str) -> Option<FieldValue<'_>> {
        let u = &self.user_data;
        let a = &u.address;
        let v = match k {
            "email_address" => &u.email_address,
            "sha256_email_address" => &u.sha256_email_address,
            "phone_number" => &u.phone_number,
            "sha256_phone_number" => &u.sha256_phone_number,
            "date_of_birth" => &u.date_of_birth,
            "gender" => &u.gender,
            "address.first_name" => &a.first_name,
            "address.sha256_first_name" => &a.sha256_first_name,
            "address.last_name" => &a.last_name,
            "address.sha256_last_name" => &a.sha256_last_name,
            "address.street" => &a.street,
            "address.sha256_street" => &a.sha256_street,
            "address.city" => &a.city,
            "address.region" => &a.region,
            "address.postal_code" => &a.postal_code,
            "address.country" => &a.country,
            _ => return None,
        };
        v.as_deref().map(FieldValue::Str)
    }
}

fn s<T: std::ops::Deref<Target = str>>(o: &Option<T>) -> Option<FieldValue<'_>> {
    o.as_deref().map(FieldValue::Str)
}

fn json_field(v: &Value) -> FieldValue<'_> {
    match v {
        Value::String(s) => FieldValue::Str(s),
        Value::Number(n) => n
            .as_f64()
            .map(FieldValue::Num)
            .unwrap_or(FieldValue::Json(v)),
        Value::Bool(b) => FieldValue::Bool(*b),
        other => FieldValue::Json(other),
    }
}

fn item_field<'a>(item: &'a Item, key: &str) -> Option<FieldValue<'a>> {
    match key {
        "price" => item.price.map(FieldValue::Num),
        "quantity" => item.quantity.map(FieldValue::Num),
        "discount" => item.discount.map(FieldValue::Num),
        "index" => item.index.map(|i| FieldValue::Num(i.into())),
        _ => match item
            .text_fields()
            .into_iter()
            .find(|(name, _)| *name == key)
        {
            Some((_, v)) => s(v),
            None => item
                .custom
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| FieldValue::Str(v)),
        },
    }
}

/// Host part of an absolute URL, without userinfo or port.
pub fn url_host(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let host_port = authority.rsplit('@').next()?;
    let host = if host_port.starts_with('[') {
        host_port.split(']').next().map(|h| &h[1..])?
    } else {
        host_port.split(':').next()?
    };
    (!host.is_empty()).then_some(host)
}

/// Path part of an absolute URL (no query or fragment).
pub fn url_path(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let start = rest.find('/')?;
    let path = &rest[start..];
    Some(path.split(['?', '#']).next().unwrap_or(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Event {
        let mut e = Event {
            event_name: "purchase".into(),
            page_location: Some("https://shop.example.com/checkout/thanks?fbclid=AbC%2D1#x".into()),
            value: Some(134.0),
            ..Default::default()
        };
        e.items.push(Item {
            item_id: Some("SKU_123".into()),
            custom: vec![("size".into(), "42".into())],
            ..Default::default()
        });
        e.params
            .insert("coupon".into(), Value::String("SUMMER".into()));
        e.user_data.address.city = Some("Paris".into());
        e.consent.ad_storage = ConsentState::Granted;
        e
    }

    #[test]
    fn the_item_table_names_each_text_field_once_as_serde_does() {
        let mut item = Item::default();
        for name in Item::TEXT_FIELDS {
            *item.text_field_mut(name).unwrap() = Some(format!("v-{name}").into());
        }
        // Each name reaches its own field: serde's names for them agree with the table.
        let json = serde_json::to_value(&item).unwrap();
        for name in Item::TEXT_FIELDS {
            assert_eq!(json[name], format!("v-{name}"), "{name}");
        }
        for (name, v) in item.text_fields() {
            assert_eq!(v.as_deref(), Some(format!("v-{name}").as_str()));
        }
        assert!(item.text_field_mut("price").is_none());
        // Every text field is reachable from a trigger's field path.
        let e = Event {
            items: vec![item],
            ..Default::default()
        };
        assert_eq!(
            e.field("items.0.promotion_id"),
            Some(FieldValue::Str("v-promotion_id"))
        );
        assert_eq!(
            e.field("items.0.creative_slot"),
            Some(FieldValue::Str("v-creative_slot"))
        );
    }

    #[test]
    fn the_stored_payload_reads_back_whole_in_either_format() {
        let mut e = sample();
        // Every kind of parameter value survives the binary format as it did JSON.
        let params = serde_json::json!({
            "nested": {"a": [1, -2, 3.5, true, null, "x"]},
            "big": u64::MAX,
            "neg": i64::MIN,
            "float": 0.1,
            "whole_float": 2.0,
            "empty": "",
            "unicode": "Café \u{1F600} \"quoted\"\n",
        });
        if let serde_json::Value::Object(m) = params {
            e.params.extend(m);
        }
        let stored = e.to_payload().unwrap();
        assert_ne!(
            stored.first(),
            Some(&b'{'),
            "new payloads are never read as JSON"
        );
        assert_eq!(Event::from_payload(&stored).unwrap(), e);
        // What stores from before hold (JSON) still reads.
        let old = serde_json::to_vec(&e).unwrap();
        assert_eq!(Event::from_payload(&old).unwrap(), e);
        assert!(
            stored.len() < old.len(),
            "{} vs {}",
            stored.len(),
            old.len()
        );
        // Bigger than the reserved room still comes out whole.
        let mut big = sample();
        big.page_title = Some("t".repeat(4 * PAYLOAD_CAPACITY));
        let stored = big.to_payload().unwrap();
        assert!(stored.len() > 4 * PAYLOAD_CAPACITY);
        assert_eq!(Event::from_payload(&stored).unwrap(), big);
        // Damaged payloads are errors, not panics.
        for bad in [
            &b""[..],
            b"{not json",
            b"\x81\xa5",
            // An array would decode positionally, an empty one as a default event.
            b"\x90",
            b"\x93\xa1a\xa1b\x01",
            &stored[..stored.len() / 2],
        ] {
            assert!(Event::from_payload(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_hit_trace_context_travels_in_the_payload_and_old_payloads_have_none() {
        let mut e = sample();
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        e.traceparent = Some(tp.into());
        let back = Event::from_payload(&e.to_payload().unwrap()).unwrap();
        assert_eq!(back.traceparent.as_deref(), Some(tp));
        // A payload written before the field existed (MessagePack or JSON) reads as none.
        e.traceparent = None;
        let stored = e.to_payload().unwrap();
        assert!(!String::from_utf8_lossy(&stored).contains("traceparent"));
        assert_eq!(Event::from_payload(&stored).unwrap().traceparent, None);
        let json = serde_json::to_vec(&e).unwrap();
        assert_eq!(Event::from_payload(&json).unwrap().traceparent, None);
    }

    #[test]
    fn fields_resolve_by_gtm_names() {
        let e = sample();
        assert_eq!(e.field("event_name"), Some(FieldValue::Str("purchase")));
        assert_eq!(e.field("value"), Some(FieldValue::Num(134.0)));
        assert_eq!(e.field("items.0.item_id"), Some(FieldValue::Str("SKU_123")));
        assert_eq!(e.field("items.0.size"), Some(FieldValue::Str("42")));
        assert_eq!(e.field("items.1.item_id"), None);
        assert_eq!(e.field("params.coupon"), Some(FieldValue::Str("SUMMER")));
        assert_eq!(
            e.field("user_data.address.city"),
            Some(FieldValue::Str("Paris"))
        );
        assert_eq!(
            e.field("consent.ad_storage"),
            Some(FieldValue::Str("granted"))
        );
        assert_eq!(e.field("consent.analytics_storage"), None);
        assert_eq!(
            e.field("page_hostname"),
            Some(FieldValue::Str("shop.example.com"))
        );
        assert_eq!(
            e.field("page_path"),
            Some(FieldValue::Str("/checkout/thanks"))
        );
    }

    #[test]
    fn field_paths_are_validated_with_a_hint() {
        assert!(validate_field_path("page_location").is_ok());
        assert!(validate_field_path("items.0.item_id").is_ok());
        let err = validate_field_path("page_locaton").unwrap_err();
        assert!(err.contains("did you mean `page_location`"), "{err}");
        let err = validate_field_path("coupon").unwrap_err();
        assert!(err.contains("params.<name>"), "{err}");
        assert!(validate_field_path("params.").is_err());
    }

    #[test]
    fn url_helpers() {
        assert_eq!(url_host("http://[::1]:8080/x"), Some("::1"));
        assert_eq!(url_host("https://u@h.example:1/"), Some("h.example"));
        assert_eq!(url_path("https://h/"), Some("/"));
    }

    #[test]
    fn event_roundtrips_through_json() {
        let e = sample();
        let json = serde_json::to_string(&e).unwrap();
        let back: Event = serde_json::from_str(&json).unwrap();
        assert_eq!(e, back);
        assert!(!json.contains("passthrough"), "empty fields are omitted");
    }
}
