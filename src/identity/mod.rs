//! First-party identity: visitor id, `_ga`/`_fbp`/`_fbc` keeping, consent-gated Set-Cookie
//! decisions. Pure functions of request + config + clock + RNG.

use rand::RngCore;
use serde::Serialize;

use crate::config::CookiesConfig;
use crate::event::Event;

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

/// One cookie tagrelay sets, kept structured for the debug view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CookieDecision {
    pub name: String,
    pub value: String,
    /// `None` = host-only cookie.
    pub domain: Option<String>,
    pub max_age_secs: i64,
    pub http_only: bool,
    pub secure: bool,
    pub same_site: &'static str,
    pub path: &'static str,
}

/// Validated cookie policy built from `[cookies]`.
#[derive(Debug, Clone)]
pub struct CookiePolicy {
    pub config: CookiesConfig,
}

impl CookiePolicy {
    pub fn build(config: &CookiesConfig) -> Result<Self, Vec<String>> {
        Ok(CookiePolicy {
            config: config.clone(),
        })
    }

    /// Updates `events` (client_id, fbp/fbc, consent defaults) and returns the cookies to set.
    pub fn apply(
        &self,
        _input: &IdentityInput<'_>,
        _events: &mut [Event],
        _rng: &mut dyn RngCore,
    ) -> Vec<CookieDecision> {
        Vec::new()
    }
}

impl CookieDecision {
    pub fn header_value(&self) -> String {
        let mut c = cookie::Cookie::new(self.name.clone(), self.value.clone());
        c.set_path(self.path);
        c.set_max_age(cookie::time::Duration::seconds(self.max_age_secs));
        c.set_http_only(self.http_only);
        c.set_secure(self.secure);
        if let Some(d) = &self.domain {
            c.set_domain(d.clone());
        }
        c.to_string()
    }
}
