//! Proof of Safari's 7-day cap from real visitors (`[cookies] measure_cookie_age`).
//!
//! Beside the visitor cookie tagrelay sets a companion holding the time it set them (unix
//! seconds), with the same lifetime and attributes, in the same response. When a browser
//! returns both, the companion says how long ago the visitor cookie was last set. Safari,
//! when it caps the response's cookies, never returns one older than 7 days; uncapped
//! browsers do. The histogram by engine shows which is happening, whatever DNS suggests
//! (Private Relay, per-region CDN edges and Safari changes included).

/// The companion of visitor cookie `visitor` (`FPID` → `FPID_set`).
pub fn visitor_set_cookie_name(visitor: &str) -> String {
    format!("{visitor}_set")
}

/// `webkit` for browsers whose cookies follow WebKit's rules: Safari, and every browser on
/// iOS/iPadOS (they must use WebKit); `other` for the rest, including an unknown agent.
pub fn browser_engine(user_agent: Option<&str>) -> &'static str {
    let Some(ua) = user_agent else {
        return "other";
    };
    let ios = ["iPhone", "iPad", "iPod"].iter().any(|d| ua.contains(d));
    let webkit = ua.contains("AppleWebKit") && !ua.contains("Chrome/") && !ua.contains("Chromium");
    if ios || webkit {
        "webkit"
    } else {
        "other"
    }
}

/// The companion's value for a response sent at `now_ms`.
pub(crate) fn set_value(now_ms: i64) -> String {
    (now_ms.max(0) / 1000).to_string()
}

/// Seconds since the returned companion `stored` was set, recorded in the histogram; `None`
/// (nothing recorded) for a missing or malformed value, or one from the future.
pub(crate) fn record(stored: Option<&str>, now_ms: i64, user_agent: Option<&str>) -> Option<i64> {
    let set_s: i64 = stored
        .filter(|v| !v.is_empty() && v.len() <= 12 && v.bytes().all(|b| b.is_ascii_digit()))?
        .parse()
        .ok()?;
    let age = now_ms / 1000 - set_s;
    if age < 0 {
        return None;
    }
    metrics::histogram!("tagrelay_visitor_cookie_age_seconds", "engine" => browser_engine(user_agent))
        .record(age as f64);
    Some(age)
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;
    use crate::event::Event;
    use crate::identity::config::CookiesConfig;
    use crate::identity::{CookiePolicy, CookieReason, IdentityInput};

    const SAFARI: &str = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Safari/605.1.15";
    const CHROME: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36";
    const CHROME_IOS: &str = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) CriOS/124.0.6367.88 Mobile/15E148 Safari/604.1";
    const FIREFOX: &str = "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0";
    const EDGE_ANDROID: &str = "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Mobile Safari/537.36 EdgA/124.0.0.0";

    const NOW: i64 = 1_764_912_990_123;
    const FPID: &str = "FPID2.2.2dCYkbN50yUysvdKpXCJUjCrYu%2BdP58DFRyIJMMrhxU%3D.1714481829";

    #[test]
    fn engines_by_user_agent() {
        assert_eq!(browser_engine(Some(SAFARI)), "webkit");
        assert_eq!(browser_engine(Some(CHROME_IOS)), "webkit");
        assert_eq!(browser_engine(Some(CHROME)), "other");
        assert_eq!(browser_engine(Some(FIREFOX)), "other");
        assert_eq!(browser_engine(Some(EDGE_ANDROID)), "other");
        assert_eq!(browser_engine(None), "other");
    }

    fn policy(measure: bool) -> CookiePolicy {
        CookiePolicy::build(&CookiesConfig {
            measure_cookie_age: measure,
            ..CookiesConfig::default()
        })
        .unwrap()
    }

    /// Cookies set and histogram samples recorded for one hit.
    fn hit(
        p: &CookiePolicy,
        cookie: Option<&str>,
        ua: &str,
    ) -> (Vec<crate::identity::CookieDecision>, Vec<(String, f64)>) {
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let decisions = metrics::with_local_recorder(&recorder, || {
            let mut events = vec![Event {
                event_name: "page_view".into(),
                user_agent: Some(ua.into()),
                ..Default::default()
            }];
            let input = IdentityInput {
                host: "sgtm.example.com",
                cookie_header: cookie,
                referer: None,
                now_ms: NOW,
            };
            p.apply(&input, &mut events, &mut StdRng::seed_from_u64(1))
        });
        let samples = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(k, ..)| k.key().name() == crate::telemetry::metrics::VISITOR_COOKIE_AGE)
            .flat_map(|(k, _, _, v)| {
                let engine = k
                    .key()
                    .labels()
                    .find(|l| l.key() == "engine")
                    .map(|l| l.value().to_owned())
                    .unwrap_or_default();
                match v {
                    metrics_util::debugging::DebugValue::Histogram(h) => h
                        .into_iter()
                        .map(|s| (engine.clone(), s.into_inner()))
                        .collect::<Vec<_>>(),
                    _ => Vec::new(),
                }
            })
            .collect();
        (decisions, samples)
    }

    #[test]
    fn the_companion_is_set_beside_the_visitor_cookie_and_measures_its_age() {
        let p = policy(true);
        // First visit: both set, nothing to measure.
        let (ds, samples) = hit(&p, None, SAFARI);
        let set = ds
            .iter()
            .find(|d| d.name == "FPID_set")
            .expect("companion set");
        assert_eq!(set.value, "1764912990");
        let fpid = ds.iter().find(|d| d.name == "FPID").unwrap();
        assert_eq!(
            (set.max_age_secs, set.http_only, &set.domain),
            (fpid.max_age_secs, true, &fpid.domain)
        );
        assert_eq!(set.reason, CookieReason::New);
        assert!(samples.is_empty());

        // A return three days later: the age is recorded by engine; the FPID value is unchanged.
        let three_days = 3 * 86_400;
        let cookie = format!("FPID={FPID}; FPID_set={}", 1_764_912_990 - three_days);
        let (ds, samples) = hit(&p, Some(&cookie), SAFARI);
        assert_eq!(samples, [("webkit".to_owned(), three_days as f64)]);
        let fpid = ds.iter().find(|d| d.name == "FPID").unwrap();
        assert_eq!(fpid.value, FPID);
        assert_eq!(fpid.reason, CookieReason::Kept);
        let set = ds.iter().find(|d| d.name == "FPID_set").unwrap();
        assert_eq!(
            (set.value.as_str(), set.reason),
            ("1764912990", CookieReason::Replaced)
        );
        let (_, samples) = hit(&p, Some(&cookie), CHROME);
        assert_eq!(samples, [("other".to_owned(), three_days as f64)]);

        // A companion without its visitor cookie, or a malformed one, measures nothing.
        let (_, samples) = hit(&p, Some("FPID_set=1764000000"), SAFARI);
        assert!(samples.is_empty());
        let (_, samples) = hit(&p, Some(&format!("FPID={FPID}; FPID_set=abc")), SAFARI);
        assert!(samples.is_empty());
        let (_, samples) = hit(
            &p,
            Some(&format!("FPID={FPID}; FPID_set=99999999999")),
            SAFARI,
        );
        assert!(samples.is_empty(), "from the future");
    }

    #[test]
    fn off_by_default_nothing_changes() {
        let p = policy(false);
        let cookie = format!("FPID={FPID}; FPID_set=1764000000");
        let (ds, samples) = hit(&p, Some(&cookie), SAFARI);
        assert!(ds.iter().all(|d| d.name != "FPID_set"));
        assert!(samples.is_empty());
    }
}
