//! `[cookies]`: which first-party cookies tagrelay keeps, for how long, and consent gating.

use serde::Deserialize;

use super::click_ids::ClickIdsConfig;

/// What to assume for a consent signal the hit does not carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ConsentDefault {
    #[default]
    Granted,
    Denied,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CookiesConfig {
    /// Manage first-party cookies at all.
    pub enabled: bool,
    /// `auto` = registrable domain (eTLD+1) of the request host; or an explicit domain.
    pub domain: String,
    /// Browsers drop `Secure` cookies over plain http; turn off only for local testing.
    pub secure: bool,
    /// Name of the server-managed visitor id cookie (GTM-SS calls it FPID).
    pub visitor_cookie: String,
    pub visitor_max_age_days: u32,
    /// Seed a new visitor id from the hit's GA client id so visitors keep the id GA knows.
    pub migrate_from_ga: bool,
    /// Re-issue `_ga` server-side (lifts Safari's 7-day cap on script cookies).
    pub keep_ga: bool,
    pub ga_max_age_days: u32,
    /// Re-issue `_fbp`/`_fbc` and build `_fbc` from `fbclid`.
    pub keep_meta: bool,
    pub meta_max_age_days: u32,
    /// Gate cookies on Consent Mode: analytics_storage for the visitor id and `_ga`,
    /// ad_storage for `_fbp`/`_fbc` and the click-id cookies.
    pub require_consent: bool,
    /// Consent assumed when a hit carries no consent signals.
    pub consent_default: ConsentDefault,
    /// Ad platforms' click-id cookies (`gclid` → `_gcl_aw`, `ttclid`, …), gated by ad_storage.
    pub click_ids: ClickIdsConfig,
    /// Record when the visitor cookie was last set (a companion `<visitor_cookie>_set`) and
    /// measure, per browser engine, how old the visitor cookies browsers return are: proof of
    /// Safari's 7-day cap from real visitors.
    pub measure_cookie_age: bool,
}

impl Default for CookiesConfig {
    fn default() -> Self {
        CookiesConfig {
            enabled: true,
            domain: "auto".into(),
            secure: true,
            visitor_cookie: "FPID".into(),
            visitor_max_age_days: 400,
            migrate_from_ga: true,
            keep_ga: true,
            ga_max_age_days: 400,
            keep_meta: true,
            meta_max_age_days: 90,
            require_consent: false,
            consent_default: ConsentDefault::Granted,
            click_ids: ClickIdsConfig::default(),
            measure_cookie_age: false,
        }
    }
}
