//! Ad platforms' click ids kept in first-party cookies (ad-platforms §7): the click id of the
//! landing URL (`gclid`, `ttclid`, …) is written server-side into the cookie the platform's own
//! script reads, in that script's format, and re-issued on later hits so it outlives Safari's
//! 7-day cap on script-set cookies. Tags read the ids from the event's `identity`.
//!
//! Same rules as `_fbc` (`mod.rs`): a fresh URL click id beats the cookie's; stored cookies are
//! read and written only when `ad_storage` allows; the URL's own id goes on the events either
//! way, since it involves no storage. Every value is checked (charset, length) before it can
//! become a `Set-Cookie`, so a crafted URL or cookie never yields a malformed header.
//!
//! Cost: one pass over the page URL's query comparing names, and the cookie names matched in
//! the pass `RequestCookies` already makes. Without click ids nothing is allocated.

use std::borrow::Cow;

use serde::Deserialize;

use super::{days, CookieReason, Decisions};
use crate::event::{Event, Identity};

/// Longest click id kept (Meta's client code ignores longer `fbclid`s; real ids are ~100).
const MAX_ID_LEN: usize = 500;
/// Longest `_ttp` re-issued; real values are 27–35 characters.
const MAX_TTP_LEN: usize = 200;

/// `[cookies.click_ids]`: one switch and one lifetime per platform. Defaults are the lifetimes
/// the reference found (ad-platforms §7); which of them are the vendors' own is said per key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClickIdsConfig {
    /// `gclid` / `gbraid` / `wbraid` → `_gcl_aw` / `_gcl_ag` / `_gcl_gb`.
    pub google: bool,
    /// 90 days as cookie scanners report for `_gcl_*` (UNVERIFIED at Google's own level).
    pub google_max_age_days: u32,
    /// `ttclid` → `ttclid`, and `_ttp` re-issued.
    pub tiktok: bool,
    /// 30 days, as TikTok's own server template sets it.
    pub tiktok_max_age_days: u32,
    /// 395 days (13 months, TikTok's documented pixel-cookie lifetime).
    pub tiktok_ttp_max_age_days: u32,
    /// `ScCid` → `_scclid` (Stape's name; the Snap pixel's own is UNVERIFIED).
    pub snapchat: bool,
    pub snapchat_max_age_days: u32,
    /// `epik` → `_epik`.
    pub pinterest: bool,
    pub pinterest_max_age_days: u32,
    /// `li_fat_id` → `li_fat_id`.
    pub linkedin: bool,
    pub linkedin_max_age_days: u32,
    /// `msclkid` → `_uetmsclkid` (`_uet<msclkid>`).
    pub microsoft: bool,
    pub microsoft_max_age_days: u32,
}

impl Default for ClickIdsConfig {
    fn default() -> Self {
        ClickIdsConfig {
            google: true,
            google_max_age_days: 90,
            tiktok: true,
            tiktok_max_age_days: 30,
            tiktok_ttp_max_age_days: 395,
            snapchat: true,
            snapchat_max_age_days: 365,
            pinterest: true,
            pinterest_max_age_days: 365,
            linkedin: true,
            linkedin_max_age_days: 90,
            microsoft: true,
            microsoft_max_age_days: 90,
        }
    }
}

impl ClickIdsConfig {
    /// Every lifetime key with its value, for validation.
    pub(crate) fn lifetimes(&self) -> [(&'static str, u32); 7] {
        [
            ("click_ids.google_max_age_days", self.google_max_age_days),
            ("click_ids.tiktok_max_age_days", self.tiktok_max_age_days),
            (
                "click_ids.tiktok_ttp_max_age_days",
                self.tiktok_ttp_max_age_days,
            ),
            (
                "click_ids.snapchat_max_age_days",
                self.snapchat_max_age_days,
            ),
            (
                "click_ids.pinterest_max_age_days",
                self.pinterest_max_age_days,
            ),
            (
                "click_ids.linkedin_max_age_days",
                self.linkedin_max_age_days,
            ),
            (
                "click_ids.microsoft_max_age_days",
                self.microsoft_max_age_days,
            ),
        ]
    }

    fn platform(&self, p: Platform) -> (bool, u32) {
        match p {
            Platform::Google => (self.google, self.google_max_age_days),
            Platform::TikTok => (self.tiktok, self.tiktok_max_age_days),
            Platform::Snapchat => (self.snapchat, self.snapchat_max_age_days),
            Platform::Pinterest => (self.pinterest, self.pinterest_max_age_days),
            Platform::LinkedIn => (self.linkedin, self.linkedin_max_age_days),
            Platform::Microsoft => (self.microsoft, self.microsoft_max_age_days),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Platform {
    Google,
    TikTok,
    Snapchat,
    Pinterest,
    LinkedIn,
    Microsoft,
}

/// How a click id sits in its cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// gtag's `GCL.<unix s>.<id>` (the id may itself hold dots).
    Gcl,
    /// The id as it is.
    Raw,
    /// UET's `_uet<msclkid>` ([obs] cookie dumps).
    UetPrefix,
}

/// One click id: its URL parameter, cookie, platform and cookie format.
struct Kind {
    param: &'static str,
    cookie: &'static str,
    platform: Platform,
    format: Format,
}

const KINDS: [Kind; 8] = [
    Kind {
        param: "gclid",
        cookie: "_gcl_aw",
        platform: Platform::Google,
        format: Format::Gcl,
    },
    Kind {
        param: "gbraid",
        cookie: "_gcl_ag",
        platform: Platform::Google,
        format: Format::Gcl,
    },
    Kind {
        param: "wbraid",
        cookie: "_gcl_gb",
        platform: Platform::Google,
        format: Format::Gcl,
    },
    Kind {
        param: "ttclid",
        cookie: "ttclid",
        platform: Platform::TikTok,
        format: Format::Raw,
    },
    Kind {
        param: "ScCid",
        cookie: "_scclid",
        platform: Platform::Snapchat,
        format: Format::Raw,
    },
    Kind {
        param: "epik",
        cookie: "_epik",
        platform: Platform::Pinterest,
        format: Format::Raw,
    },
    Kind {
        param: "li_fat_id",
        cookie: "li_fat_id",
        platform: Platform::LinkedIn,
        format: Format::Raw,
    },
    Kind {
        param: "msclkid",
        cookie: "_uetmsclkid",
        platform: Platform::Microsoft,
        format: Format::UetPrefix,
    },
];
const N: usize = KINDS.len();

/// The server cookies Google's sGTM Conversion Linker writes (`FPGCLAW` …, `2.1.k<id>$i<s>`,
/// [obs] format): read as a fallback source for `_gcl_aw` / `_gcl_ag` / `_gcl_gb` so a site
/// moving from GTM-SS keeps its visitors' clicks; never written (only Google's own server
/// container reads them).
const FP_COOKIES: [&str; 3] = ["FPGCLAW", "FPGCLAG", "FPGCLGB"];

const TTP_COOKIE: &str = "_ttp";

/// Every cookie name the keeper writes, so other cookie names can be checked against them.
pub(crate) fn cookie_names() -> impl Iterator<Item = &'static str> {
    KINDS.iter().map(|k| k.cookie).chain([TTP_COOKIE])
}

/// The click-id cookies of one request, borrowed from the `Cookie` header.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ClickCookies<'a> {
    ids: [Option<&'a str>; N],
    fp: [Option<&'a str>; 3],
    ttp: Option<&'a str>,
}

impl<'a> ClickCookies<'a> {
    /// Takes `value` if `name` is one of the keeper's cookies; false otherwise. First wins,
    /// like the other cookies (the browser sends the most specific first).
    pub(crate) fn offer(&mut self, name: &str, value: &'a str) -> bool {
        let slot = if name == TTP_COOKIE {
            &mut self.ttp
        } else if let Some(i) = KINDS.iter().position(|k| k.cookie == name) {
            &mut self.ids[i]
        } else if let Some(i) = FP_COOKIES.iter().position(|c| *c == name) {
            &mut self.fp[i]
        } else {
            return false;
        };
        if slot.is_none() {
            *slot = Some(value);
        }
        true
    }
}

/// A click id as it may go into a cookie and to a vendor: `[A-Za-z0-9-._~=+/]`, 1 to 500
/// characters. Real ids are base64url-like (`gclid`, `ttclid` `E.C.P.…`, `msclkid` hex);
/// anything else (spaces, quotes, `;`, `,`, non-ASCII) is refused rather than re-encoded.
pub fn is_click_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'=' | b'+' | b'/')
        })
}

/// The click id `param` (`gclid`, `ttclid`, …) of a URL's query, when well-formed: for tags
/// that get events the keeper did not see (clients that set no cookies).
pub fn click_id_in_url(url: &str, param: &str) -> Option<String> {
    crate::urlenc::param(url, param).filter(|id| is_click_id(id))
}

/// The click id held by a cookie value in `format`, if the value is well-formed.
fn id_in_cookie(format: Format, value: &str) -> Option<&str> {
    let id = match format {
        Format::Raw => value,
        Format::UetPrefix => value.strip_prefix("_uet")?,
        // gtag's `GCL.<s>.<id>`; Stape notes `_gcl_ag` is found in the server form too.
        Format::Gcl => match value.strip_prefix("GCL.") {
            Some(rest) => {
                let (secs, id) = rest.split_once('.')?;
                if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                id
            }
            None => id_in_server_form(value)?,
        },
    };
    is_click_id(id).then_some(id)
}

/// The id of a `2.1.k<id>$i<unix s>` value (sGTM's `FPGCL*`, per the reference's [obs] dumps
/// and Stape's parser).
fn id_in_server_form(value: &str) -> Option<&str> {
    let mut parts = value.splitn(3, '.');
    let (_, _, rest) = (parts.next()?, parts.next()?, parts.next()?);
    let (id, _) = rest.strip_prefix('k')?.split_once("$i")?;
    is_click_id(id).then_some(id)
}

fn cookie_value(format: Format, id: &str, now_ms: i64) -> String {
    match format {
        Format::Raw => id.to_owned(),
        Format::UetPrefix => format!("_uet{id}"),
        Format::Gcl => format!("GCL.{}.{id}", now_ms.max(0) / 1000),
    }
}

/// The click ids in the query of `url`, by kind, decoded; invalid ones are left out. The first
/// occurrence of a parameter wins. Allocates only for a percent-encoded id.
fn ids_in_url(url: &str) -> [Option<Cow<'_, str>>; N] {
    let mut found: [Option<Cow<'_, str>>; N] = Default::default();
    let url = url.split('#').next().unwrap_or(url);
    let Some((_, query)) = url.split_once('?') else {
        return found;
    };
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = crate::urlenc::decode(k);
        // `sccid` is accepted too: some integrations lower-case the parameter (§3.4).
        let Some(i) = KINDS
            .iter()
            .position(|kind| kind.param == k || (kind.param == "ScCid" && k == "sccid"))
        else {
            continue;
        };
        if found[i].is_some() {
            continue;
        }
        let id = crate::urlenc::decode(v);
        if is_click_id(&id) {
            found[i] = Some(id);
        } else if !id.is_empty() {
            metrics::counter!("tagrelay_click_ids_refused_total", "param" => KINDS[i].param)
                .increment(1);
        }
    }
    found
}

/// Keeps the click-id cookies of one request and puts the ids on its events.
///
/// The URL is the first event's page URL, else the `Referer`; `cookies_on` says whether
/// cookies may be written at all (`cookies.enabled`, ad_storage granted), `ads_ok` whether
/// stored values may be read.
#[allow(clippy::too_many_arguments)]
pub(super) fn keep(
    cfg: &ClickIdsConfig,
    cookies_on: bool,
    ads_ok: bool,
    referer: Option<&str>,
    jar: &ClickCookies<'_>,
    now_ms: i64,
    out: &mut Decisions,
    events: &mut [Event],
) {
    // Owned (only the ids found, so nothing without a click id) because the events they are
    // read from are written below.
    let from_url: [Option<String>; N] = match events
        .iter()
        .find_map(|e| e.page_location.as_deref())
        .or(referer)
    {
        Some(u) => ids_in_url(u).map(|id| id.map(Cow::into_owned)),
        None => Default::default(),
    };
    let mut ids: [Option<&str>; N] = [None; N];
    for (i, kind) in KINDS.iter().enumerate() {
        let stored_raw = jar.ids[i].filter(|_| ads_ok);
        let mut stored = stored_raw.and_then(|v| id_in_cookie(kind.format, v).map(|id| (v, id)));
        if stored.is_none() && kind.platform == Platform::Google && ads_ok {
            // sGTM's server cookie as the source of a click the gtag cookie lost.
            stored = jar
                .fp
                .get(i)
                .copied()
                .flatten()
                .and_then(id_in_server_form)
                .map(|id| ("", id));
        }
        let (enabled, max_age) = cfg.platform(kind.platform);
        let write = cookies_on && enabled;
        let decision: Option<(Cow<'_, str>, CookieReason)> = match (&from_url[i], stored) {
            (Some(u), Some((raw, id))) if id == u && !raw.is_empty() => {
                Some((Cow::Borrowed(raw), CookieReason::Kept))
            }
            (Some(u), _) => {
                // Replaced: the browser had this platform's cookie, for another or a
                // malformed click.
                let reason = if stored_raw.is_some() {
                    CookieReason::Replaced
                } else {
                    CookieReason::New
                };
                Some((Cow::Owned(cookie_value(kind.format, u, now_ms)), reason))
            }
            (None, Some((raw, _))) if !raw.is_empty() => {
                Some((Cow::Borrowed(raw), CookieReason::Kept))
            }
            // Only the sGTM cookie holds the click: write the gtag cookie from it.
            (None, Some((_, id))) => Some((
                Cow::Owned(cookie_value(kind.format, id, now_ms)),
                CookieReason::New,
            )),
            (None, None) => None,
        };
        if let (true, Some((value, reason))) = (write, decision) {
            out.push(
                kind.cookie,
                value.into_owned(),
                days(max_age),
                false,
                reason,
            );
        }
        ids[i] = match &from_url[i] {
            Some(u) => Some(u.as_str()),
            None => stored.map(|(_, id)| id),
        };
    }

    // `_ttp` is TikTok's browser id: opaque (its format changed in 2025), only ever kept, never
    // minted, since TikTok's pixel owns its form.
    let ttp = jar
        .ttp
        .filter(|v| ads_ok && !v.is_empty() && v.len() <= MAX_TTP_LEN)
        .filter(|v| v.bytes().all(crate::set_cookie::is_cookie_octet));
    if let Some(v) = ttp {
        if cookies_on && cfg.tiktok {
            out.push(
                TTP_COOKIE,
                v.to_owned(),
                days(cfg.tiktok_ttp_max_age_days),
                false,
                CookieReason::Kept,
            );
        }
    }

    if ttp.is_none() && ids.iter().all(Option::is_none) {
        return;
    }
    for e in events.iter_mut() {
        let id = &mut e.identity;
        // Values a client set explicitly (a JSON payload) win over the URL and cookies.
        for (i, slot) in slots(id).into_iter().enumerate() {
            if slot.is_none() {
                *slot = ids[i].map(str::to_owned);
            }
        }
        if id.ttp.is_none() {
            id.ttp = ttp.map(str::to_owned);
        }
    }
}

/// The event's click-id fields, in `KINDS` order.
fn slots(id: &mut Identity) -> [&mut Option<String>; N] {
    [
        &mut id.gclid,
        &mut id.gbraid,
        &mut id.wbraid,
        &mut id.ttclid,
        &mut id.sccid,
        &mut id.epik,
        &mut id.li_fat_id,
        &mut id.msclkid,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tables_agree() {
        // `slots` follows `KINDS`: each event field is named after its URL parameter.
        let mut id = Identity::default();
        for (i, slot) in slots(&mut id).into_iter().enumerate() {
            *slot = Some(KINDS[i].param.to_ascii_lowercase());
        }
        let json = serde_json::to_value(&id).unwrap();
        for k in &KINDS {
            let field = k.param.to_ascii_lowercase();
            assert_eq!(json[&field], field, "{}", k.param);
        }
    }

    #[test]
    fn ids_are_read_from_the_query_only_when_well_formed() {
        let found = ids_in_url(
            "https://shop.example/p?x=1&gclid=Cj0K%2DAbc_1&ttclid=E.C.P.abc&gclid=second&msclkid=bad%20id#epik=frag",
        );
        assert_eq!(found[0].as_deref(), Some("Cj0K-Abc_1"));
        assert_eq!(found[3].as_deref(), Some("E.C.P.abc"));
        assert_eq!(found[7], None, "a space is refused");
        assert_eq!(found[5], None, "the fragment is not the query");
        assert!(ids_in_url("https://shop.example/p")
            .iter()
            .all(Option::is_none));
        let snap = ids_in_url("https://s.example/?sccid=abc");
        assert_eq!(snap[4].as_deref(), Some("abc"));
        // A plain id is borrowed from the URL, not copied.
        assert!(matches!(
            ids_in_url("https://s.example/?li_fat_id=abc-123")[6],
            Some(Cow::Borrowed("abc-123"))
        ));
    }

    #[test]
    fn cookie_formats_round_trip_and_refuse_garbage() {
        assert_eq!(
            id_in_cookie(Format::Gcl, "GCL.1764912990.Cj0.K.x"),
            Some("Cj0.K.x")
        );
        assert_eq!(
            id_in_cookie(Format::Gcl, "2.1.kCjwKCAjwBwE$i1755249832"),
            Some("CjwKCAjwBwE")
        );
        assert_eq!(id_in_cookie(Format::Gcl, "GCL..abc"), None);
        assert_eq!(id_in_cookie(Format::Gcl, "GCL.12a.abc"), None);
        assert_eq!(id_in_cookie(Format::Gcl, "GCL.12."), None);
        assert_eq!(
            id_in_cookie(Format::UetPrefix, "_uetb4458f42c1b214060f81e89d7a9da3bb"),
            Some("b4458f42c1b214060f81e89d7a9da3bb")
        );
        assert_eq!(id_in_cookie(Format::UetPrefix, "b4458f42"), None);
        assert_eq!(id_in_cookie(Format::Raw, "a;b"), None);
        assert_eq!(id_in_cookie(Format::Raw, &"x".repeat(501)), None);
        assert_eq!(
            cookie_value(Format::Gcl, "abc", 1_764_912_990_123),
            "GCL.1764912990.abc"
        );
        assert_eq!(cookie_value(Format::UetPrefix, "ff", 0), "_uetff");
    }
}
