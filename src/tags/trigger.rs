//! Triggers decide whether a tag fires for an event, and can say why not.
//!
//! A trigger is checked in this order: event name, consent, conditions (all must hold),
//! exceptions (any match blocks). Everything that can be checked once — field paths, operator
//! count, regexes — is checked at build time, so `evaluate` only reads the event.
//!
//! Conditions and exceptions are numbered from 0 in reasons, like their config arrays
//! (`trigger.conditions[2]` ↔ "condition 2 failed").

use std::borrow::Cow;

use regex::Regex;
use serde::Deserialize;

use crate::event::{ConsentState, Event, FieldValue};
use crate::identity::config::ConsentDefault;

/// A trigger's verdict before it is put into words.
enum Verdict<'a> {
    Fired,
    OtherEvent,
    ConsentDenied(&'a str),
    ConsentUnknown(&'a str),
    ConditionFailed(usize, &'a Condition),
    Excepted(usize, &'a Condition),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerConfig {
    /// Event names that fire the tag; `["*"]` for all.
    #[serde(default = "all_events")]
    pub events: Vec<String>,
    /// Consent signals that must be granted.
    #[serde(default)]
    pub consent: Vec<String>,
    /// Every condition must hold for the tag to fire.
    #[serde(default)]
    pub conditions: Vec<ConditionConfig>,
    /// Any exception that holds blocks the tag.
    #[serde(default)]
    pub exceptions: Vec<ConditionConfig>,
}

impl Default for TriggerConfig {
    fn default() -> Self {
        TriggerConfig {
            events: all_events(),
            consent: Vec::new(),
            conditions: Vec::new(),
            exceptions: Vec::new(),
        }
    }
}

fn all_events() -> Vec<String> {
    vec!["*".into()]
}

/// One `{ field = "…", <operator> = … }` entry. Exactly one operator must be set.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConditionConfig {
    /// An event field path (`page_location`, `params.coupon`, `items.0.item_id`, …).
    pub field: String,
    #[serde(default)]
    pub equals: Option<Scalar>,
    #[serde(default)]
    pub not_equals: Option<Scalar>,
    #[serde(default)]
    pub contains: Option<String>,
    #[serde(default)]
    pub starts_with: Option<String>,
    /// A regular expression (Rust `regex` syntax; `(?i)` for case-insensitive).
    #[serde(default)]
    pub matches: Option<String>,
    #[serde(default)]
    pub exists: Option<bool>,
    #[serde(default)]
    pub gt: Option<f64>,
    #[serde(default)]
    pub lt: Option<f64>,
}

/// A literal in a condition: TOML strings, numbers and booleans are all allowed.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Scalar {
    Bool(bool),
    Num(f64),
    Str(String),
}

/// A trigger's verdict with its explanation for the debug view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub fired: bool,
    pub reason: String,
}

impl Decision {
    fn no(reason: String) -> Self {
        Decision {
            fired: false,
            reason,
        }
    }
}

/// A literal prepared for comparison against any field type without allocating.
#[derive(Debug, Clone)]
struct Expected {
    text: String,
    num: Option<f64>,
    boolean: Option<bool>,
}

impl Expected {
    fn new(s: &Scalar) -> Self {
        match s {
            Scalar::Bool(b) => Expected {
                text: b.to_string(),
                num: None,
                boolean: Some(*b),
            },
            Scalar::Num(n) => Expected {
                text: crate::event::format_number(*n),
                num: Some(*n),
                boolean: None,
            },
            Scalar::Str(t) => Expected {
                text: t.clone(),
                num: t.trim().parse().ok().filter(|n: &f64| n.is_finite()),
                boolean: match t.as_str() {
                    "true" => Some(true),
                    "false" => Some(false),
                    _ => None,
                },
            },
        }
    }

    /// String fields compare as text, and numerically when the literal is a number, so
    /// `params.value = "59"` equals `59`; numbers and booleans compare by value.
    fn matches(&self, v: &FieldValue<'_>) -> bool {
        match v {
            FieldValue::Str(s) => self.str_matches(s),
            FieldValue::Json(serde_json::Value::String(s)) => self.str_matches(s),
            FieldValue::Num(n) => self.num == Some(*n),
            FieldValue::Json(serde_json::Value::Number(n)) => {
                self.num.is_some() && self.num == n.as_f64()
            }
            FieldValue::Bool(b) => self.boolean == Some(*b),
            FieldValue::Json(serde_json::Value::Bool(b)) => self.boolean == Some(*b),
            FieldValue::Json(_) => false,
        }
    }

    fn str_matches(&self, s: &str) -> bool {
        s == self.text
            || self
                .num
                .is_some_and(|n| s.trim().parse::<f64>().ok() == Some(n))
    }
}

#[derive(Debug, Clone)]
enum Op {
    Equals(Expected),
    NotEquals(Expected),
    Contains(String),
    StartsWith(String),
    Matches(Regex),
    Exists(bool),
    Gt(f64),
    Lt(f64),
}

#[derive(Debug, Clone)]
struct Condition {
    field: String,
    op: Op,
}

/// Text of a field for string operators; borrowed for strings, the common case.
fn text_of<'a>(v: &'a FieldValue<'a>) -> Cow<'a, str> {
    match v {
        FieldValue::Str(s) => Cow::Borrowed(s),
        FieldValue::Json(serde_json::Value::String(s)) => Cow::Borrowed(s.as_str()),
        other => Cow::Owned(other.as_string()),
    }
}

impl Condition {
    /// Whether the condition holds. A missing field fails every operator except
    /// `not_equals` (a missing value differs from any literal) and `exists = false`.
    fn holds(&self, event: &Event) -> bool {
        let value = event.field(&self.field);
        match (&self.op, value) {
            (Op::Exists(want), v) => v.is_some() == *want,
            (Op::NotEquals(_), None) => true,
            (_, None) => false,
            (Op::Equals(e), Some(v)) => e.matches(&v),
            (Op::NotEquals(e), Some(v)) => !e.matches(&v),
            (Op::Contains(needle), Some(v)) => text_of(&v).contains(needle.as_str()),
            (Op::StartsWith(prefix), Some(v)) => text_of(&v).starts_with(prefix.as_str()),
            (Op::Matches(re), Some(v)) => re.is_match(&text_of(&v)),
            (Op::Gt(limit), Some(v)) => v.as_f64().is_some_and(|n| n > *limit),
            (Op::Lt(limit), Some(v)) => v.as_f64().is_some_and(|n| n < *limit),
        }
    }

    /// Describes the condition's outcome on `event`; `held` says which way it went.
    /// Only called off the fired path.
    fn describe(&self, event: &Event, held: bool) -> String {
        let f = &self.field;
        let value = event.field(f);
        let Some(v) = value else {
            return match &self.op {
                Op::Exists(_) => format!("`{f}` does not exist"),
                Op::NotEquals(e) => format!("`{f}` is missing, so it differs from `{}`", e.text),
                _ => format!("`{f}` is missing"),
            };
        };
        let text = v.as_string();
        let shown = short(&text);
        let verb = |yes: &str, no: &str| if held { yes.to_owned() } else { no.to_owned() };
        match &self.op {
            Op::Exists(_) => format!("`{f}` exists ({shown})"),
            Op::Equals(e) => format!(
                "`{f}` ({shown}) {} `{}`",
                verb("equals", "does not equal"),
                e.text
            ),
            Op::NotEquals(e) => format!(
                "`{f}` ({shown}) {} `{}`",
                verb("does not equal", "equals"),
                e.text
            ),
            Op::Contains(n) => format!(
                "`{f}` ({shown}) {} `{n}`",
                verb("contains", "does not contain")
            ),
            Op::StartsWith(p) => format!(
                "`{f}` ({shown}) {} `{p}`",
                verb("starts with", "does not start with")
            ),
            Op::Matches(re) => format!(
                "`{f}` ({shown}) {} `{}`",
                verb("matches", "does not match"),
                re.as_str()
            ),
            Op::Gt(l) => format!(
                "`{f}` ({shown}) is {}> {}",
                verb("", "not "),
                crate::event::format_number(*l)
            ),
            Op::Lt(l) => format!(
                "`{f}` ({shown}) is {}< {}",
                verb("", "not "),
                crate::event::format_number(*l)
            ),
        }
    }
}

/// Field values in reasons are cut so one huge URL cannot flood the debug view.
fn short(s: &str) -> Cow<'_, str> {
    crate::text::ellipsize(s, 80)
}

#[derive(Debug, Clone)]
pub struct Trigger {
    all_events: bool,
    events: Vec<String>,
    consent: Vec<&'static str>,
    consent_default: ConsentDefault,
    conditions: Vec<Condition>,
    exceptions: Vec<Condition>,
}

const OPERATORS: &str = "equals, not_equals, contains, starts_with, matches, exists, gt, lt";

fn build_condition(c: &ConditionConfig, at: &str, problems: &mut Vec<String>) -> Option<Condition> {
    let before = problems.len();
    if let Err(e) = crate::event::validate_field_path(&c.field) {
        problems.push(format!("{at}: {e}"));
    }
    let mut ops: Vec<(&'static str, Option<Op>)> = Vec::new();
    if let Some(v) = &c.equals {
        ops.push(("equals", Some(Op::Equals(Expected::new(v)))));
    }
    if let Some(v) = &c.not_equals {
        ops.push(("not_equals", Some(Op::NotEquals(Expected::new(v)))));
    }
    if let Some(v) = &c.contains {
        ops.push(("contains", Some(Op::Contains(v.clone()))));
    }
    if let Some(v) = &c.starts_with {
        ops.push(("starts_with", Some(Op::StartsWith(v.clone()))));
    }
    if let Some(v) = &c.matches {
        let op = match Regex::new(v) {
            Ok(re) => Some(Op::Matches(re)),
            Err(e) => {
                let msg = e.to_string();
                let msg = msg.split_whitespace().collect::<Vec<_>>().join(" ");
                problems.push(format!("{at}.matches: invalid regex `{v}`: {msg}"));
                None
            }
        };
        ops.push(("matches", op));
    }
    if let Some(v) = c.exists {
        ops.push(("exists", Some(Op::Exists(v))));
    }
    for (name, v) in [("gt", c.gt), ("lt", c.lt)] {
        if let Some(n) = v {
            let op = if n.is_finite() {
                Some(if name == "gt" { Op::Gt(n) } else { Op::Lt(n) })
            } else {
                problems.push(format!("{at}.{name}: must be a finite number"));
                None
            };
            ops.push((name, op));
        }
    }
    match ops.len() {
        0 => problems.push(format!(
            "{at}: no operator for `{}`; set exactly one of {OPERATORS}",
            c.field
        )),
        1 => {}
        _ => {
            let names: Vec<&str> = ops.iter().map(|(n, _)| *n).collect();
            problems.push(format!(
                "{at}: several operators ({}); use exactly one per condition (add another condition for a range)",
                names.join(", ")
            ));
        }
    }
    if problems.len() != before {
        return None;
    }
    let op = ops.pop().and_then(|(_, op)| op)?;
    Some(Condition {
        field: c.field.clone(),
        op,
    })
}

impl Trigger {
    pub fn build(
        cfg: &TriggerConfig,
        consent_default: ConsentDefault,
    ) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        if cfg.events.is_empty() {
            problems.push(
                "trigger.events: an empty list never fires; use [\"*\"] for every event".into(),
            );
        }
        for (i, e) in cfg.events.iter().enumerate() {
            if e.trim().is_empty() {
                problems.push(format!("trigger.events[{i}]: event name is empty"));
            }
        }
        let mut consent = Vec::with_capacity(cfg.consent.len());
        for c in &cfg.consent {
            match crate::event::Consent::SIGNALS
                .iter()
                .find(|s| **s == c.as_str())
            {
                Some(s) => consent.push(*s),
                None => problems.push(format!(
                    "trigger.consent: unknown consent signal `{c}` (expected one of {})",
                    crate::event::Consent::SIGNALS.join(", ")
                )),
            }
        }
        let mut conditions = Vec::with_capacity(cfg.conditions.len());
        for (i, c) in cfg.conditions.iter().enumerate() {
            let at = format!("trigger.conditions[{i}]");
            conditions.extend(build_condition(c, &at, &mut problems));
        }
        let mut exceptions = Vec::with_capacity(cfg.exceptions.len());
        for (i, c) in cfg.exceptions.iter().enumerate() {
            let at = format!("trigger.exceptions[{i}]");
            exceptions.extend(build_condition(c, &at, &mut problems));
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Trigger {
            all_events: cfg.events.iter().any(|e| e == "*"),
            events: cfg.events.clone(),
            consent,
            consent_default,
            conditions,
            exceptions,
        })
    }

    /// Whether the tag fires: the hot path, which never builds an explanation.
    pub fn fires(&self, event: &Event) -> bool {
        matches!(self.verdict(event), Verdict::Fired)
    }

    /// Whether the tag fires and why (for the debug view).
    pub fn evaluate(&self, event: &Event) -> Decision {
        let reason = match self.verdict(event) {
            Verdict::Fired => {
                return Decision {
                    fired: true,
                    reason: String::from("fired"),
                }
            }
            Verdict::OtherEvent => format!("event `{}` is not in trigger.events", event.event_name),
            Verdict::ConsentDenied(c) => format!("consent `{c}` is denied"),
            Verdict::ConsentUnknown(c) => {
                format!("consent `{c}` is unknown and cookies.consent_default is denied")
            }
            Verdict::ConditionFailed(i, c) => {
                format!("condition {i} failed: {}", c.describe(event, false))
            }
            Verdict::Excepted(i, c) => {
                format!("blocked by exception {i}: {}", c.describe(event, true))
            }
        };
        Decision::no(reason)
    }

    fn verdict(&self, event: &Event) -> Verdict<'_> {
        if !self.all_events && !self.events.iter().any(|e| e == &event.event_name) {
            return Verdict::OtherEvent;
        }
        for c in &self.consent {
            match event.consent.get(c).unwrap_or(ConsentState::Unknown) {
                ConsentState::Granted => {}
                ConsentState::Denied => return Verdict::ConsentDenied(c),
                ConsentState::Unknown => {
                    if self.consent_default != ConsentDefault::Granted {
                        return Verdict::ConsentUnknown(c);
                    }
                }
            }
        }
        for (i, c) in self.conditions.iter().enumerate() {
            if !c.holds(event) {
                return Verdict::ConditionFailed(i, c);
            }
        }
        for (i, c) in self.exceptions.iter().enumerate() {
            if c.holds(event) {
                return Verdict::Excepted(i, c);
            }
        }
        Verdict::Fired
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Item;

    fn cond(field: &str) -> ConditionConfig {
        ConditionConfig {
            field: field.into(),
            ..Default::default()
        }
    }

    fn trigger_with(conditions: Vec<ConditionConfig>) -> Trigger {
        let cfg = TriggerConfig {
            conditions,
            ..Default::default()
        };
        Trigger::build(&cfg, ConsentDefault::Granted).unwrap()
    }

    #[test]
    fn fires_agrees_with_evaluate() {
        let mut gt = cond("value");
        gt.gt = Some(50.0);
        let mut starts = cond("page_location");
        starts.starts_with = Some("https://shop.".into());
        let mut exception = cond("params.coupon");
        exception.equals = Some(Scalar::Str("SUMMER".into()));
        let cases = [
            trigger_with(vec![]),
            trigger_with(vec![gt]),
            trigger_with(vec![starts.clone()]),
            Trigger::build(
                &TriggerConfig {
                    conditions: vec![starts],
                    exceptions: vec![exception],
                    ..Default::default()
                },
                ConsentDefault::Granted,
            )
            .unwrap(),
            Trigger::build(
                &TriggerConfig {
                    events: vec!["page_view".into()],
                    ..Default::default()
                },
                ConsentDefault::Granted,
            )
            .unwrap(),
            Trigger::build(
                &TriggerConfig {
                    consent: vec!["ad_storage".into()],
                    ..Default::default()
                },
                ConsentDefault::Denied,
            )
            .unwrap(),
        ];
        let fired: Vec<bool> = cases.iter().map(|t| t.fires(&event())).collect();
        assert_eq!(fired, [true, false, true, false, false, false]);
        for t in &cases {
            assert_eq!(t.fires(&event()), t.evaluate(&event()).fired);
        }
    }

    fn event() -> Event {
        let mut e = Event {
            event_name: "purchase".into(),
            page_location: Some("https://shop.example.com/checkout/thanks?x=1".into()),
            value: Some(12.0),
            currency: Some("EUR".into()),
            ..Default::default()
        };
        e.params
            .insert("coupon".into(), serde_json::Value::String("SUMMER".into()));
        e.params.insert("tax".into(), serde_json::json!(21.4));
        e.params
            .insert("amount_text".into(), serde_json::json!("59"));
        e.params.insert("logged_in".into(), serde_json::json!(true));
        e.items.push(Item {
            item_id: Some("SKU_123".into()),
            ..Default::default()
        });
        e
    }

    fn fires(t: &Trigger, e: &Event) -> bool {
        t.evaluate(e).fired
    }

    #[test]
    fn events_list_and_wildcard() {
        let e = event();
        let all = Trigger::build(&TriggerConfig::default(), ConsentDefault::Granted).unwrap();
        assert_eq!(
            all.evaluate(&e),
            Decision {
                fired: true,
                reason: "fired".into()
            }
        );
        let cfg = TriggerConfig {
            events: vec!["page_view".into(), "add_to_cart".into()],
            ..Default::default()
        };
        let only = Trigger::build(&cfg, ConsentDefault::Granted).unwrap();
        let d = only.evaluate(&e);
        assert!(!d.fired);
        assert_eq!(d.reason, "event `purchase` is not in trigger.events");
        let mut pv = e.clone();
        pv.event_name = "page_view".into();
        assert!(fires(&only, &pv));
    }

    #[test]
    fn equals_and_not_equals() {
        let e = event();
        let eq = |field: &str, v: Scalar| {
            let mut c = cond(field);
            c.equals = Some(v);
            trigger_with(vec![c])
        };
        assert!(fires(&eq("currency", Scalar::Str("EUR".into())), &e));
        assert!(!fires(&eq("currency", Scalar::Str("eur".into())), &e));
        assert!(fires(&eq("value", Scalar::Num(12.0)), &e));
        assert!(fires(&eq("value", Scalar::Str("12".into())), &e));
        assert!(!fires(&eq("value", Scalar::Num(13.0)), &e));
        // A numeric string parameter compares numerically against a number literal.
        assert!(fires(&eq("params.amount_text", Scalar::Num(59.0)), &e));
        assert!(fires(&eq("params.logged_in", Scalar::Bool(true)), &e));
        assert!(!fires(&eq("params.logged_in", Scalar::Bool(false)), &e));
        assert!(fires(
            &eq("items.0.item_id", Scalar::Str("SKU_123".into())),
            &e
        ));
        // Missing fields never equal anything.
        assert!(!fires(&eq("transaction_id", Scalar::Str("".into())), &e));

        let d = eq("currency", Scalar::Str("USD".into())).evaluate(&e);
        assert_eq!(
            d.reason,
            "condition 0 failed: `currency` (EUR) does not equal `USD`"
        );

        let ne = |field: &str, v: Scalar| {
            let mut c = cond(field);
            c.not_equals = Some(v);
            trigger_with(vec![c])
        };
        assert!(fires(&ne("currency", Scalar::Str("USD".into())), &e));
        assert!(!fires(&ne("currency", Scalar::Str("EUR".into())), &e));
        assert!(fires(&ne("transaction_id", Scalar::Str("T-1".into())), &e));
        let d = ne("currency", Scalar::Str("EUR".into())).evaluate(&e);
        assert_eq!(
            d.reason,
            "condition 0 failed: `currency` (EUR) equals `EUR`"
        );
    }

    #[test]
    fn contains_starts_with_and_matches() {
        let e = event();
        let mut c = cond("page_location");
        c.contains = Some("/checkout/".into());
        assert!(fires(&trigger_with(vec![c.clone()]), &e));
        c.contains = Some("/cart/".into());
        let d = trigger_with(vec![c]).evaluate(&e);
        assert!(!d.fired);
        assert_eq!(
            d.reason,
            "condition 0 failed: `page_location` (https://shop.example.com/checkout/thanks?x=1) does not contain `/cart/`"
        );

        let mut c = cond("page_hostname");
        c.starts_with = Some("shop.".into());
        assert!(fires(&trigger_with(vec![c.clone()]), &e));
        c.starts_with = Some("www.".into());
        assert!(!fires(&trigger_with(vec![c]), &e));

        // Numbers are matched by their text.
        let mut c = cond("params.tax");
        c.starts_with = Some("21.".into());
        assert!(fires(&trigger_with(vec![c]), &e));

        let mut c = cond("page_path");
        c.matches = Some(r"^/checkout/(thanks|done)$".into());
        assert!(fires(&trigger_with(vec![c.clone()]), &e));
        c.matches = Some(r"(?i)^/CHECKOUT/".into());
        assert!(fires(&trigger_with(vec![c.clone()]), &e));
        c.matches = Some(r"^/cart".into());
        let d = trigger_with(vec![c]).evaluate(&e);
        assert_eq!(
            d.reason,
            "condition 0 failed: `page_path` (/checkout/thanks) does not match `^/cart`"
        );

        // String operators on a missing field fail with a clear reason.
        let mut c = cond("page_referrer");
        c.contains = Some("google".into());
        let d = trigger_with(vec![c]).evaluate(&e);
        assert_eq!(d.reason, "condition 0 failed: `page_referrer` is missing");
    }

    #[test]
    fn exists_gt_lt() {
        let e = event();
        let mut c = cond("currency");
        c.exists = Some(true);
        assert!(fires(&trigger_with(vec![c.clone()]), &e));
        c.exists = Some(false);
        assert!(!fires(&trigger_with(vec![c]), &e));
        let mut c = cond("user_id");
        c.exists = Some(false);
        assert!(fires(&trigger_with(vec![c.clone()]), &e));
        c.exists = Some(true);
        assert_eq!(
            trigger_with(vec![c]).evaluate(&e).reason,
            "condition 0 failed: `user_id` does not exist"
        );

        let mut gt = cond("value");
        gt.gt = Some(0.0);
        let mut gt50 = cond("value");
        gt50.gt = Some(50.0);
        assert!(fires(&trigger_with(vec![gt.clone()]), &e));
        let d = trigger_with(vec![gt.clone(), cond_lt("value", 100.0), gt50]).evaluate(&e);
        assert_eq!(d.reason, "condition 2 failed: `value` (12) is not > 50");
        assert!(fires(&trigger_with(vec![cond_lt("value", 12.5)]), &e));
        assert!(!fires(&trigger_with(vec![cond_lt("value", 12.0)]), &e));
        // A numeric string parameter is compared as a number; a non-number never passes.
        assert!(fires(
            &trigger_with(vec![cond_lt("params.amount_text", 60.0)]),
            &e
        ));
        assert!(!fires(
            &trigger_with(vec![cond_lt("params.coupon", 1e9)]),
            &e
        ));
        assert!(!fires(
            &trigger_with(vec![cond_lt("transaction_id", 1e9)]),
            &e
        ));
    }

    fn cond_lt(field: &str, n: f64) -> ConditionConfig {
        let mut c = cond(field);
        c.lt = Some(n);
        c
    }

    #[test]
    fn exceptions_block() {
        let mut exc = cond("page_location");
        exc.matches = Some("/test/".into());
        let cfg = TriggerConfig {
            exceptions: vec![cond_lt("value", 0.0), exc],
            ..Default::default()
        };
        let t = Trigger::build(&cfg, ConsentDefault::Granted).unwrap();
        let mut e = event();
        assert!(fires(&t, &e));
        e.page_location = Some("https://shop.example.com/test/page".into());
        let d = t.evaluate(&e);
        assert!(!d.fired);
        assert_eq!(
            d.reason,
            "blocked by exception 1: `page_location` (https://shop.example.com/test/page) matches `/test/`"
        );
    }

    #[test]
    fn consent_signals_and_default() {
        let cfg = TriggerConfig {
            consent: vec!["ad_storage".into(), "analytics_storage".into()],
            ..Default::default()
        };
        let lenient = Trigger::build(&cfg, ConsentDefault::Granted).unwrap();
        let strict = Trigger::build(&cfg, ConsentDefault::Denied).unwrap();
        let mut e = event();
        // Unknown follows the default.
        assert!(fires(&lenient, &e));
        let d = strict.evaluate(&e);
        assert!(!d.fired);
        assert_eq!(
            d.reason,
            "consent `ad_storage` is unknown and cookies.consent_default is denied"
        );
        e.consent.ad_storage = ConsentState::Granted;
        e.consent.analytics_storage = ConsentState::Granted;
        assert!(fires(&strict, &e));
        e.consent.ad_storage = ConsentState::Denied;
        let d = lenient.evaluate(&e);
        assert!(!d.fired);
        assert_eq!(d.reason, "consent `ad_storage` is denied");
    }

    #[test]
    fn build_errors_name_the_condition() {
        let mut bad_re = cond("page_location");
        bad_re.matches = Some("(unclosed".into());
        let mut two = cond("value");
        two.gt = Some(1.0);
        two.lt = Some(5.0);
        let none = cond("page_title");
        let mut unknown = cond("page_locaton");
        unknown.exists = Some(true);
        let mut exc_bad = cond("coupon");
        exc_bad.equals = Some(Scalar::Str("X".into()));
        let cfg = TriggerConfig {
            events: vec![],
            consent: vec!["ads".into()],
            conditions: vec![bad_re, two, none, unknown],
            exceptions: vec![exc_bad],
        };
        let errs = Trigger::build(&cfg, ConsentDefault::Granted).unwrap_err();
        assert_eq!(errs.len(), 7, "{errs:#?}");
        assert!(
            errs[0].starts_with("trigger.events: an empty list never fires"),
            "{errs:#?}"
        );
        assert!(errs[1].starts_with("trigger.consent: unknown consent signal `ads`"));
        assert!(
            errs[2].starts_with("trigger.conditions[0].matches: invalid regex `(unclosed`: "),
            "{}",
            errs[2]
        );
        assert!(!errs[2].contains('\n'));
        assert_eq!(
            errs[3],
            "trigger.conditions[1]: several operators (gt, lt); use exactly one per condition (add another condition for a range)"
        );
        assert_eq!(
            errs[4],
            "trigger.conditions[2]: no operator for `page_title`; set exactly one of equals, not_equals, contains, starts_with, matches, exists, gt, lt"
        );
        assert_eq!(
            errs[5],
            "trigger.conditions[3]: unknown field `page_locaton`; did you mean `page_location`?"
        );
        assert!(
            errs[6].starts_with("trigger.exceptions[0]: unknown field `coupon`"),
            "{}",
            errs[6]
        );
    }

    #[test]
    fn parses_from_toml_config() {
        let text = r#"
[[tags]]
name = "web"
type = "http"
url = "http://127.0.0.1:1/x"
[tags.trigger]
events = ["purchase"]
consent = ["analytics_storage"]
conditions = [
  { field = "page_location", matches = "/checkout/" },
  { field = "value", gt = 0 },
  { field = "currency", equals = "EUR" },
  { field = "params.logged_in", equals = true },
]
exceptions = [{ field = "params.coupon", exists = false }]
"#;
        let cfg = crate::config::load_str(text, "x.toml", false).unwrap();
        let crate::tags::TagConfig::Http(h) = &cfg.tags[0] else {
            panic!("wrong tag type");
        };
        let t = Trigger::build(&h.trigger, ConsentDefault::Granted).unwrap();
        let mut e = event();
        assert!(fires(&t, &e), "{:?}", t.evaluate(&e));
        e.params.remove("coupon");
        assert_eq!(
            t.evaluate(&e).reason,
            "blocked by exception 0: `params.coupon` does not exist"
        );
        e.consent.analytics_storage = ConsentState::Denied;
        assert_eq!(
            t.evaluate(&e).reason,
            "consent `analytics_storage` is denied"
        );
    }
}
