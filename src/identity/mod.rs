//! First-party identity: visitor id, `_ga`/`_fbp`/`_fbc` keeping, consent-gated Set-Cookie
//! decisions. Pure functions of request + config + clock + RNG.
//!
//! Consent principle: when a storage signal is not granted (with `require_consent`), stored
//! identifiers are neither read nor written; identifiers that travel in the hit itself (the JS
//! `cid`, an `fbclid` in the page URL) may still be used because they involve no storage.

mod age;
mod click_ids;
pub mod config;
mod consent;
mod cookies;
mod domain;
mod meta;
#[cfg(test)]
mod tests;
mod visitor;

use std::borrow::Cow;

use rand::RngCore;

use crate::event::Event;
pub use crate::set_cookie::{CookieDecision, CookieReason};
use config::CookiesConfig;

pub use age::{browser_engine, visitor_set_cookie_name};
pub use click_ids::{click_id_in_url, is_click_id, ClickIdsConfig};
pub use cookies::{cookie_value, is_cookie_octet, parse_cookie_header};
pub use domain::{
    domain_matches, host_without_port, is_ip_literal, normalized_host, registrable_domain,
    subdomain_index,
};
pub use meta::{fbc_click_id, fbclid_from_url, is_valid_meta_cookie, mint_fbc, mint_fbp};
pub use visitor::{
    client_id_from_ga_cookie, client_id_from_visitor_cookie, ephemeral_client_id,
    is_plausible_client_id, mint_visitor, visitor_cookie_value, VISITOR_PREFIX,
};

use cookies::{is_cookie_name, is_cookie_value, RequestCookies};

/// Browsers cap cookie lifetimes at 400 days (Chrome, RFC 6265bis), so longer is a config error.
const MAX_AGE_DAYS_LIMIT: u32 = 400;
const SECS_PER_DAY: i64 = 86_400;

const GA_COOKIE: &str = "_ga";
const FBP_COOKIE: &str = "_fbp";
const FBC_COOKIE: &str = "_fbc";

/// What identity needs from the request.
#[derive(Debug, Clone, Copy)]
pub struct IdentityInput<'a> {
    /// `Host` header (may carry a port).
    pub host: &'a str,
    /// Raw `Cookie` header, if any.
    pub cookie_header: Option<&'a str>,
    /// `Referer` header, consulted for `fbclid` when the event has no page_location.
    pub referer: Option<&'a str>,
    pub now_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum DomainMode {
    Auto,
    /// Normalized: lower case, no leading dot.
    Explicit(String),
}

/// Validated cookie policy built from `[cookies]`.
#[derive(Debug, Clone)]
pub struct CookiePolicy {
    pub config: CookiesConfig,
    domain: DomainMode,
    /// The visitor cookie's companion (`measure_cookie_age`), empty when off.
    set_cookie: String,
}

impl CookiePolicy {
    /// Validates `[cookies]`. Problems are `key: message`; the caller prefixes `cookies.`.
    pub fn build(config: &CookiesConfig) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();

        let domain = if config.domain.trim().eq_ignore_ascii_case("auto") {
            DomainMode::Auto
        } else {
            match domain::normalize_explicit_domain(&config.domain) {
                Ok(d) => DomainMode::Explicit(d),
                Err(m) => {
                    problems.push(format!("domain: {m}"));
                    DomainMode::Auto
                }
            }
        };

        let name = config.visitor_cookie.as_str();
        if !is_cookie_name(name) {
            problems.push(format!(
                "visitor_cookie: `{name}` is not a valid cookie name (letters, digits and `_-.!#$%&'*+^`|~`; e.g. \"FPID\")"
            ));
        } else if [GA_COOKIE, FBP_COOKIE, FBC_COOKIE].contains(&name) {
            problems.push(format!(
                "visitor_cookie: `{name}` is managed separately (keep_ga/keep_meta); pick another name such as \"FPID\""
            ));
        } else if click_ids::cookie_names().any(|c| c == name) {
            problems.push(format!(
                "visitor_cookie: `{name}` is an ad platform's click-id cookie ([cookies.click_ids]); pick another name such as \"FPID\""
            ));
        } else if name.starts_with("__Host-") {
            problems.push(format!(
                "visitor_cookie: `{name}`: `__Host-` cookies may not carry a Domain attribute, which tagrelay sets; drop the prefix"
            ));
        } else if name.starts_with("__Secure-") && !config.secure {
            problems.push(format!(
                "visitor_cookie: `{name}`: `__Secure-` cookies need secure = true"
            ));
        }

        for (key, days) in [
            ("visitor_max_age_days", config.visitor_max_age_days),
            ("ga_max_age_days", config.ga_max_age_days),
            ("meta_max_age_days", config.meta_max_age_days),
        ]
        .into_iter()
        .chain(config.click_ids.lifetimes())
        {
            if days == 0 || days > MAX_AGE_DAYS_LIMIT {
                problems.push(format!(
                    "{key}: {days} is out of range; use 1 to {MAX_AGE_DAYS_LIMIT} (browsers cap cookie lifetimes at {MAX_AGE_DAYS_LIMIT} days)"
                ));
            }
        }

        if problems.is_empty() {
            Ok(CookiePolicy {
                config: config.clone(),
                domain,
                set_cookie: if config.measure_cookie_age {
                    visitor_set_cookie_name(&config.visitor_cookie)
                } else {
                    String::new()
                },
            })
        } else {
            Err(problems)
        }
    }

    /// The Domain attribute cookies get on a request to `host`; `None` = host-only.
    pub fn cookie_domain(&self, host: &str) -> Option<String> {
        self.resolve_domain(&normalized_host(host)).0
    }

    /// `(domain, explicit domain did not match the host)`; `host` must be normalized.
    fn resolve_domain(&self, host: &str) -> (Option<String>, bool) {
        match &self.domain {
            DomainMode::Auto => (registrable_domain(host), false),
            DomainMode::Explicit(d) if domain_matches(host, d) => (Some(d.clone()), false),
            DomainMode::Explicit(_) => (None, true),
        }
    }

    /// Updates `events` (client_id, fbp/fbc) and returns the cookies to set, at most one per
    /// name.
    pub fn apply(
        &self,
        input: &IdentityInput<'_>,
        events: &mut [Event],
        rng: &mut dyn RngCore,
    ) -> Vec<CookieDecision> {
        let cfg = &self.config;
        let now_ms = input.now_ms;
        let jar = RequestCookies::read(input.cookie_header, &cfg.visitor_cookie, &self.set_cookie);
        let analytics_ok = consent::storage_allowed(cfg, events, |c| c.analytics_storage);
        let ads_ok = consent::storage_allowed(cfg, events, |c| c.ad_storage);

        let host = normalized_host(input.host);
        let (domain, mismatch) = self.resolve_domain(&host);
        if mismatch && cfg.enabled {
            metrics::counter!("tagrelay_cookie_domain_mismatch_total").increment(1);
        }
        let sub_index = subdomain_index(domain.as_deref().unwrap_or(&host));
        let mut out = Decisions {
            list: Vec::with_capacity(4),
            domain,
            secure: cfg.secure,
        };

        // --- analytics: client id, visitor cookie, `_ga` ---
        let js_cid: Option<String> = events
            .iter()
            .find_map(|e| {
                e.ga.js_client_id
                    .as_deref()
                    .or(e.client_id.as_deref())
                    .filter(|c| !c.is_empty())
            })
            .map(str::to_owned);
        let ga_cid = if analytics_ok {
            jar.ga.and_then(client_id_from_ga_cookie)
        } else {
            None
        };

        let client_id = if cfg.enabled && analytics_ok {
            let (id, value, reason) =
                self.visitor_identity(jar.visitor, js_cid.as_deref(), ga_cid, rng, now_ms);
            out.push(
                &cfg.visitor_cookie,
                value,
                days(cfg.visitor_max_age_days),
                true,
                reason,
            );
            if !self.set_cookie.is_empty() {
                // Only a returned visitor cookie has an age; its companion came with it.
                if reason == CookieReason::Kept {
                    let ua = events.iter().find_map(|e| e.user_agent.as_deref());
                    age::record(jar.visitor_set, now_ms, ua);
                }
                let set_reason = if jar.visitor_set.is_some() {
                    CookieReason::Replaced
                } else {
                    CookieReason::New
                };
                out.push(
                    &self.set_cookie,
                    age::set_value(now_ms),
                    days(cfg.visitor_max_age_days),
                    true,
                    set_reason,
                );
            }
            id
        } else {
            // Nothing may be persisted: use what the hit itself carries. GA4 still wants a
            // client id on such (cookieless) hits, so fall back to a per-request one.
            js_cid
                .clone()
                .or_else(|| ga_cid.map(str::to_owned))
                .unwrap_or_else(|| ephemeral_client_id(rng, now_ms))
        };

        if cfg.enabled && analytics_ok && cfg.keep_ga {
            if let (Some(raw), Some(_)) = (jar.ga, ga_cid) {
                if is_cookie_value(raw) {
                    out.push(
                        GA_COOKIE,
                        raw.to_owned(),
                        days(cfg.ga_max_age_days),
                        false,
                        CookieReason::Kept,
                    );
                }
            }
        }

        // --- Meta: `_fbc` from the click id, `_fbp` ---
        let meta_cookies = cfg.enabled && cfg.keep_meta && ads_ok;
        let stored_fbp = jar.fbp.filter(|v| ads_ok && is_valid_meta_cookie(v));
        let stored_fbc = jar.fbc.filter(|v| ads_ok && is_valid_meta_cookie(v));
        let click = click_id(events, input.referer);

        let fbc: Option<(Cow<'_, str>, CookieReason)> = match (click.as_deref(), stored_fbc) {
            (Some(c), Some(old)) if fbc_click_id(old) == Some(c) => {
                Some((Cow::Borrowed(old), CookieReason::Kept))
            }
            (Some(c), old) => {
                let reason = if old.is_some() || jar.fbc.is_some() {
                    CookieReason::Replaced
                } else {
                    CookieReason::New
                };
                Some((Cow::Owned(mint_fbc(sub_index, now_ms, c)), reason))
            }
            (None, Some(old)) => Some((Cow::Borrowed(old), CookieReason::Kept)),
            (None, None) => None,
        };
        let fbp: Option<(Cow<'_, str>, CookieReason)> = match stored_fbp {
            Some(v) => Some((Cow::Borrowed(v), CookieReason::Kept)),
            // A minted `_fbp` that is not persisted would be a different "browser" every hit,
            // which is worse for Meta's matching than none at all.
            None if meta_cookies => {
                let reason = if jar.fbp.is_some() {
                    CookieReason::Replaced
                } else {
                    CookieReason::New
                };
                Some((Cow::Owned(mint_fbp(sub_index, now_ms, rng)), reason))
            }
            None => None,
        };

        if meta_cookies {
            let max_age = days(cfg.meta_max_age_days);
            if let Some((v, reason)) = &fbp {
                out.push(FBP_COOKIE, v.clone().into_owned(), max_age, false, *reason);
            }
            if let Some((v, reason)) = &fbc {
                out.push(FBC_COOKIE, v.clone().into_owned(), max_age, false, *reason);
            }
        }

        // --- ad platforms' click ids (`click_ids.rs`) ---
        click_ids::keep(
            &cfg.click_ids,
            cfg.enabled && ads_ok,
            ads_ok,
            input.referer,
            &jar.clicks,
            now_ms,
            &mut out,
            events,
        );

        // --- events ---
        let fbp = fbp.map(|(v, _)| v.into_owned());
        let fbc = fbc.map(|(v, _)| v.into_owned());
        for e in events.iter_mut() {
            let from_client = e.client_id.take().filter(|c| !c.is_empty());
            if e.ga.js_client_id.is_none() {
                e.ga.js_client_id = from_client;
            }
            e.client_id = Some(client_id.as_str().into());
            // Values a client set explicitly (e.g. from a JSON payload) win over cookies.
            if e.identity.ga_client_id.is_none() {
                e.identity.ga_client_id = ga_cid.map(Into::into);
            }
            if e.identity.fbp.is_none() {
                e.identity.fbp.clone_from(&fbp);
            }
            if e.identity.fbc.is_none() {
                e.identity.fbc.clone_from(&fbc);
            }
        }

        out.list
    }

    /// Client id, visitor cookie value and reason, by precedence: valid visitor cookie → (with
    /// `migrate_from_ga`) the hit's JS client id, then the `_ga` client id → a new id.
    fn visitor_identity(
        &self,
        stored: Option<&str>,
        js_cid: Option<&str>,
        ga_cid: Option<&str>,
        rng: &mut dyn RngCore,
        now_ms: i64,
    ) -> (String, String, CookieReason) {
        if let Some(raw) = stored {
            if let Some(id) = client_id_from_visitor_cookie(raw) {
                return (id, raw.to_owned(), CookieReason::Kept);
            }
        }
        if self.config.migrate_from_ga {
            // Seed from GA so the visitor keeps the id GA already knows; the cookie encodes
            // that id (see `visitor_cookie_value`) so later hits resolve to it as well.
            if let Some(seed) = js_cid.filter(|c| is_plausible_client_id(c)).or(ga_cid) {
                return (
                    seed.to_owned(),
                    visitor_cookie_value(seed),
                    CookieReason::MigratedFromGa,
                );
            }
        }
        let (value, id) = mint_visitor(rng, now_ms);
        let reason = if stored.is_some() {
            CookieReason::Replaced
        } else {
            CookieReason::New
        };
        (id, value, reason)
    }
}

/// `fbclid` of the page: from the first event carrying a `page_location`, else the `Referer`.
fn click_id(events: &[Event], referer: Option<&str>) -> Option<String> {
    match events.iter().find_map(|e| e.page_location.as_deref()) {
        Some(url) => fbclid_from_url(url),
        None => referer.and_then(fbclid_from_url),
    }
}

fn days(d: u32) -> i64 {
    i64::from(d) * SECS_PER_DAY
}

/// Collects decisions sharing the request's domain and `Secure` setting.
struct Decisions {
    list: Vec<CookieDecision>,
    domain: Option<String>,
    secure: bool,
}

impl Decisions {
    fn push(
        &mut self,
        name: &str,
        value: String,
        max_age_secs: i64,
        http_only: bool,
        reason: CookieReason,
    ) {
        // Two Set-Cookie headers for one name would leave the browser's result to header order.
        if self.list.iter().any(|d| d.name == name) {
            return;
        }
        self.list.push(CookieDecision {
            name: name.to_owned(),
            value,
            domain: self.domain.clone(),
            max_age_secs,
            http_only,
            secure: self.secure,
            same_site: "Lax",
            path: "/",
            reason,
        });
    }
}
