use std::collections::HashSet;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::*;
use crate::event::{ConsentState, Event};
use crate::identity::config::{ConsentDefault, CookiesConfig};

const NOW: i64 = 1_764_912_990_123;
const NOW_S: &str = "1764912990";
const FPID_SAMPLE: &str = "FPID2.2.2dCYkbN50yUysvdKpXCJUjCrYu%2BdP58DFRyIJMMrhxU%3D.1714481829";
const FPID_SAMPLE_ID: &str = "2dCYkbN50yUysvdKpXCJUjCrYu+dP58DFRyIJMMrhxU=.1714481829";

fn policy(edit: impl FnOnce(&mut CookiesConfig)) -> CookiePolicy {
    let mut cfg = CookiesConfig::default();
    edit(&mut cfg);
    CookiePolicy::build(&cfg).unwrap()
}

fn hit(cid: Option<&str>, page: Option<&str>) -> Event {
    Event {
        event_name: "page_view".into(),
        client_id: cid.map(Into::into),
        page_location: page.map(Into::into),
        ..Default::default()
    }
}

struct Req<'a> {
    host: &'a str,
    cookie: Option<&'a str>,
    referer: Option<&'a str>,
}

const HOST: Req<'static> = Req {
    host: "sst.example.com",
    cookie: None,
    referer: None,
};

fn run_seeded(
    p: &CookiePolicy,
    req: &Req<'_>,
    events: &mut [Event],
    seed: u64,
) -> Vec<CookieDecision> {
    let input = IdentityInput {
        host: req.host,
        cookie_header: req.cookie,
        referer: req.referer,
        now_ms: NOW,
    };
    let mut rng = StdRng::seed_from_u64(seed);
    p.apply(&input, events, &mut rng)
}

fn run(p: &CookiePolicy, req: &Req<'_>, events: &mut [Event]) -> Vec<CookieDecision> {
    run_seeded(p, req, events, 7)
}

fn find<'a>(ds: &'a [CookieDecision], name: &str) -> Option<&'a CookieDecision> {
    ds.iter().find(|d| d.name == name)
}

fn names(ds: &[CookieDecision]) -> Vec<&str> {
    ds.iter().map(|d| d.name.as_str()).collect()
}

// ---------------------------------------------------------------- domain

#[test]
fn registrable_domain_golden() {
    let cases = [
        ("sgtm.shop.example.co.uk", Some("example.co.uk")),
        ("sst.example.com:8443", Some("example.com")),
        ("www.example.test", Some("example.test")),
        ("WWW.Example.COM.", Some("example.com")),
        ("example.com", Some("example.com")),
        ("user.github.io", Some("user.github.io")),
        ("127.0.0.1", None),
        ("127.0.0.1:8080", None),
        ("[::1]:8080", None),
        ("[2001:db8::1]", None),
        ("::1", None),
        ("localhost", None),
        ("localhost:3000", None),
        ("co.uk", None),
        ("", None),
        ("exa mple.com", None),
        ("a..b.com", None),
    ];
    for (host, want) in cases {
        assert_eq!(registrable_domain(host).as_deref(), want, "host {host:?}");
    }
}

/// The Public Suffix List's harder rules: a cookie on a public suffix is refused by browsers
/// (and would be shared by unrelated sites if it were not), so the host must stay host-only.
#[test]
fn registrable_domain_follows_wildcard_exception_punycode_and_private_rules() {
    let cases = [
        // Punycode (browsers send IDN hosts as A-labels): `公司.cn` is a public suffix.
        ("sgtm.shop.xn--55qx5d.cn", Some("shop.xn--55qx5d.cn")),
        ("xn--55qx5d.cn", None),
        ("SGTM.Shop.XN--55QX5D.CN", Some("shop.xn--55qx5d.cn")),
        // `.рф` and a two-label IDN suffix (`ไทย` under `.ไทย`).
        ("sgtm.example.xn--p1ai", Some("example.xn--p1ai")),
        (
            "b.xn--12c1fe0br.xn--o3cw4h",
            Some("b.xn--12c1fe0br.xn--o3cw4h"),
        ),
        ("xn--12c1fe0br.xn--o3cw4h", None),
        // A Unicode host is not what a browser sends: no Domain attribute.
        ("sgtm.shop.公司.cn", None),
        // Wildcard `*.ck` with the exception `!www.ck`.
        ("foo.bar.ck", Some("foo.bar.ck")),
        ("bar.ck", None),
        ("www.ck", Some("www.ck")),
        ("sgtm.www.ck", Some("www.ck")),
        // Wildcard `*.kawasaki.jp` with the exception `!city.kawasaki.jp`.
        ("sgtm.shop.kawasaki.jp", Some("sgtm.shop.kawasaki.jp")),
        ("shop.kawasaki.jp", None),
        ("sgtm.city.kawasaki.jp", Some("city.kawasaki.jp")),
        // Private suffixes: each customer's site is its own registrable domain.
        ("shop.herokuapp.com", Some("shop.herokuapp.com")),
        ("herokuapp.com", None),
        ("sgtm.shop.netlify.app", Some("shop.netlify.app")),
        ("preview.shop.pages.dev", Some("shop.pages.dev")),
        ("shop.vercel.app", Some("shop.vercel.app")),
        ("a.b.d111.cloudfront.net", Some("d111.cloudfront.net")),
        ("shop.azurewebsites.net", Some("shop.azurewebsites.net")),
        ("bucket.s3.amazonaws.com", Some("bucket.s3.amazonaws.com")),
        ("shop.blogspot.com", Some("shop.blogspot.com")),
        // A private wildcard: every EC2 host name is itself a public suffix.
        ("ec2-1-2-3-4.compute-1.amazonaws.com", None),
    ];
    for (host, want) in cases {
        assert_eq!(registrable_domain(host).as_deref(), want, "host {host:?}");
    }
}

#[test]
fn an_explicit_cookie_domain_that_is_a_public_suffix_under_any_rule_is_refused() {
    for refused in [
        "bar.ck",
        "shop.kawasaki.jp",
        "herokuapp.com",
        "xn--55qx5d.cn",
        "ec2-1-2-3-4.compute-1.amazonaws.com",
    ] {
        let cfg = CookiesConfig {
            domain: refused.into(),
            ..CookiesConfig::default()
        };
        let e = CookiePolicy::build(&cfg).unwrap_err();
        assert!(
            e[0].starts_with("domain: ") && e[0].contains("public suffix"),
            "{refused}: {e:?}"
        );
    }
    for (domain, host, want) in [
        ("www.ck", "sgtm.www.ck", "www.ck"),
        (
            "city.kawasaki.jp",
            "sgtm.city.kawasaki.jp",
            "city.kawasaki.jp",
        ),
        (
            ".Shop.HerokuApp.com",
            "sgtm.shop.herokuapp.com",
            "shop.herokuapp.com",
        ),
        (
            "shop.xn--55qx5d.cn",
            "sgtm.shop.xn--55qx5d.cn",
            "shop.xn--55qx5d.cn",
        ),
    ] {
        let p = policy(|c| c.domain = domain.into());
        assert_eq!(p.cookie_domain(host).as_deref(), Some(want), "{domain}");
    }
}

#[test]
fn subdomain_index_counts_dots_of_the_cookie_domain() {
    assert_eq!(subdomain_index("example.com"), 1);
    assert_eq!(subdomain_index(".example.com"), 1);
    assert_eq!(subdomain_index("example.co.uk"), 2);
    assert_eq!(subdomain_index("www.example.com"), 2);
    assert_eq!(subdomain_index("localhost"), 0);
    assert_eq!(subdomain_index("127.0.0.1"), 0);
    assert_eq!(subdomain_index("[2001:db8::1]:8080"), 0);
}

#[test]
fn auto_domain_is_applied_to_cookies() {
    let p = policy(|_| {});
    for (host, want) in [
        ("sgtm.shop.example.co.uk", Some("example.co.uk")),
        ("sst.example.com:8443", Some("example.com")),
        ("www.example.test", Some("example.test")),
        ("127.0.0.1", None),
        ("[::1]:8080", None),
        ("localhost", None),
    ] {
        let req = Req { host, ..HOST };
        let ds = run(&p, &req, &mut [hit(None, None)]);
        let fpid = find(&ds, "FPID").unwrap();
        assert_eq!(fpid.domain.as_deref(), want, "host {host}");
        assert_eq!(p.cookie_domain(host).as_deref(), want, "host {host}");
    }
}

#[test]
fn explicit_domain_is_used_on_matching_hosts_and_host_only_elsewhere() {
    use crate::test_metrics::recording;
    const MISMATCH: &str = "tagrelay_cookie_domain_mismatch_total";
    let p = policy(|c| c.domain = ".Example.com".into());
    let ((), counted) = recording(|| {
        for host in ["example.com", "sst.example.com", "a.b.example.com:443"] {
            let ds = run(&p, &Req { host, ..HOST }, &mut [hit(None, None)]);
            assert_eq!(
                find(&ds, "FPID").unwrap().domain.as_deref(),
                Some("example.com")
            );
        }
    });
    assert_eq!(counted.counter(MISMATCH, &[]), 0);

    let req = Req {
        host: "sst.other.com",
        referer: Some("https://other.com/?fbclid=CLICK"),
        ..HOST
    };
    let mut events = [hit(None, None)];
    let (ds, counted) = recording(|| run(&p, &req, &mut events));
    assert!(!ds.is_empty());
    assert!(ds.iter().all(|d| d.domain.is_none()), "{ds:?}");
    assert_eq!(counted.counter(MISMATCH, &[]), 1);
    // Host-only on `sst.other.com`: the cookie lives on a 3-label host.
    assert_eq!(
        events[0].identity.fbc.as_deref(),
        Some(format!("fb.2.{NOW}.CLICK").as_str())
    );

    // `notexample.com` is not a subdomain of `example.com`.
    let (ds, counted) = recording(|| {
        run(
            &p,
            &Req {
                host: "notexample.com",
                ..HOST
            },
            &mut [hit(None, None)],
        )
    });
    assert_eq!(find(&ds, "FPID").unwrap().domain, None);
    assert_eq!(counted.counter(MISMATCH, &[]), 1);
}

#[test]
fn build_reports_problems_by_key() {
    let bad = |edit: fn(&mut CookiesConfig)| {
        let mut cfg = CookiesConfig::default();
        edit(&mut cfg);
        CookiePolicy::build(&cfg).unwrap_err()
    };
    let e = bad(|c| c.domain = "co.uk".into());
    assert!(
        e[0].starts_with("domain: ") && e[0].contains("public suffix"),
        "{e:?}"
    );
    let e = bad(|c| c.domain = "https://example.com".into());
    assert!(e[0].starts_with("domain: "), "{e:?}");
    let e = bad(|c| c.domain = "10.0.0.1".into());
    assert!(e[0].contains("IP address"), "{e:?}");
    let e = bad(|c| c.domain = "localhost".into());
    assert!(e[0].contains("single-label"), "{e:?}");
    let e = bad(|c| c.visitor_cookie = "_ga".into());
    assert!(e[0].starts_with("visitor_cookie: "), "{e:?}");
    let e = bad(|c| c.visitor_cookie = "my id".into());
    assert!(e[0].starts_with("visitor_cookie: "), "{e:?}");
    let e = bad(|c| {
        c.visitor_max_age_days = 0;
        c.meta_max_age_days = 730;
    });
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(e[0].starts_with("visitor_max_age_days: "), "{e:?}");
    assert!(e[1].starts_with("meta_max_age_days: "), "{e:?}");

    assert!(CookiePolicy::build(&CookiesConfig::default()).is_ok());
    let p = policy(|c| c.domain = "AUTO".into());
    assert_eq!(
        p.cookie_domain("www.example.com").as_deref(),
        Some("example.com")
    );
}

// ---------------------------------------------------------------- cookie header

#[test]
fn cookie_header_parsing_is_forgiving() {
    let h = r#"  a=1;b = 2 ;; junk; =nope; q="quoted.value"; a=second; _ga=GA1.1.1.2;empty=; x=é"#;
    let got: Vec<_> = parse_cookie_header(h).collect();
    assert_eq!(
        got,
        vec![
            ("a", "1"),
            ("b", "2"),
            ("q", "quoted.value"),
            ("a", "second"),
            ("_ga", "GA1.1.1.2"),
            ("empty", ""),
            ("x", "é"),
        ]
    );
    assert_eq!(cookie_value(h, "a"), Some("1"), "first wins");
    assert_eq!(cookie_value(h, "missing"), None);
    // The name inside another cookie's name or value is not that cookie.
    let h = "x=tagrelay_debug; tagrelay_debug_old=1; tagrelay_debug=on";
    assert_eq!(cookie_value(h, "tagrelay_debug"), Some("on"));
    assert_eq!(cookie_value("x=tagrelay_debug", "tagrelay_debug"), None);
    assert_eq!(cookie_value("tagrelay_debug_old=1", "tagrelay_debug"), None);
    assert_eq!(parse_cookie_header("").count(), 0);
    assert_eq!(parse_cookie_header(";;;  ;").count(), 0);
}

// ---------------------------------------------------------------- visitor id

#[test]
fn new_visitor_gets_an_fpid_cookie() {
    let p = policy(|_| {});
    let mut events = [hit(None, None)];
    let ds = run(&p, &HOST, &mut events);
    let fpid = find(&ds, "FPID").unwrap();
    assert_eq!(fpid.reason, CookieReason::New);
    assert!(fpid.http_only && fpid.secure);
    assert_eq!(fpid.max_age_secs, 34_560_000);

    let rest = fpid.value.strip_prefix("FPID2.2.").unwrap();
    let (b64_enc, ts) = rest.rsplit_once('.').unwrap();
    assert_eq!(ts, NOW_S);
    let b64 = percent_encoding::percent_decode_str(b64_enc)
        .decode_utf8()
        .unwrap();
    assert_eq!(STANDARD.decode(b64.as_bytes()).unwrap().len(), 32);
    assert!(!b64_enc.contains(['+', '/', '=']), "url-encoded: {b64_enc}");
    assert_eq!(
        events[0].client_id.as_deref(),
        Some(format!("{b64}.{NOW_S}").as_str())
    );
    assert_eq!(events[0].ga.js_client_id, None);

    let header = fpid.header_value();
    for part in [
        "HttpOnly",
        "SameSite=Lax",
        "Secure",
        "Path=/",
        "Domain=example.com",
        "Max-Age=34560000",
    ] {
        assert!(header.split("; ").any(|p| p == part), "{part} in {header}");
    }
    assert!(header.starts_with(&format!("FPID={}", fpid.value)));

    // Randomness comes from the RNG passed in.
    let other = run_seeded(&p, &HOST, &mut [hit(None, None)], 8);
    assert_ne!(find(&other, "FPID").unwrap().value, fpid.value);
    let same = run_seeded(&p, &HOST, &mut [hit(None, None)], 7);
    assert_eq!(find(&same, "FPID").unwrap().value, fpid.value);
}

#[test]
fn second_hit_with_issued_cookie_keeps_the_client_id() {
    let p = policy(|_| {});
    for first_cid in [None, Some("1234567890.1764912990")] {
        let mut first = [hit(first_cid, None)];
        let ds = run(&p, &HOST, &mut first);
        let fpid = find(&ds, "FPID").unwrap();
        let header = format!("FPID={}", fpid.value);
        let req = Req {
            cookie: Some(&header),
            ..HOST
        };
        let mut second = [hit(Some("999.888"), None)];
        let ds2 = run_seeded(&p, &req, &mut second, 99);
        assert_eq!(
            second[0].client_id, first[0].client_id,
            "first cid {first_cid:?}"
        );
        assert_eq!(second[0].ga.js_client_id.as_deref(), Some("999.888"));
        let again = find(&ds2, "FPID").unwrap();
        assert_eq!(again.value, fpid.value, "re-issued unchanged");
        assert_eq!(again.reason, CookieReason::Kept);
    }
}

#[test]
fn returning_visitor_keeps_gtm_ss_fpid() {
    let p = policy(|_| {});
    let header = format!("_ga=GA1.1.111.222; FPID={FPID_SAMPLE}");
    let req = Req {
        cookie: Some(&header),
        ..HOST
    };
    let mut events = [hit(Some("111.222"), None), hit(Some("111.222"), None)];
    let ds = run(&p, &req, &mut events);
    for e in &events {
        assert_eq!(e.client_id.as_deref(), Some(FPID_SAMPLE_ID));
        assert_eq!(e.ga.js_client_id.as_deref(), Some("111.222"));
        assert_eq!(e.identity.ga_client_id.as_deref(), Some("111.222"));
    }
    let fpid = find(&ds, "FPID").unwrap();
    assert_eq!(fpid.value, FPID_SAMPLE);
    assert_eq!(fpid.reason, CookieReason::Kept);
}

#[test]
fn migration_from_the_js_client_id_keeps_the_ga_id() {
    let p = policy(|_| {});
    let mut events = [hit(Some("1234567890.1764912990"), None)];
    let ds = run(&p, &HOST, &mut events);
    let fpid = find(&ds, "FPID").unwrap();
    assert_eq!(fpid.value, "FPID2.2.1234567890.1764912990");
    assert_eq!(fpid.reason, CookieReason::MigratedFromGa);
    assert_eq!(
        events[0].client_id.as_deref(),
        Some("1234567890.1764912990")
    );
    assert_eq!(
        events[0].ga.js_client_id.as_deref(),
        Some("1234567890.1764912990")
    );
}

#[test]
fn migration_from_the_ga_cookie_when_the_hit_has_no_cid() {
    let p = policy(|_| {});
    let req = Req {
        cookie: Some("_ga=GA1.2.240625919.1775537645"),
        ..HOST
    };
    let mut events = [hit(None, None)];
    let ds = run(&p, &req, &mut events);
    assert_eq!(events[0].client_id.as_deref(), Some("240625919.1775537645"));
    assert_eq!(
        events[0].identity.ga_client_id.as_deref(),
        Some("240625919.1775537645")
    );
    assert_eq!(
        find(&ds, "FPID").unwrap().value,
        "FPID2.2.240625919.1775537645"
    );
}

#[test]
fn js_client_id_wins_over_ga_cookie_and_invalid_fpid_is_replaced() {
    let p = policy(|_| {});
    let req = Req {
        cookie: Some("FPID=FPID2.2.%ZZ; _ga=GA1.1.1.2"),
        ..HOST
    };
    let mut events = [hit(Some("5.6"), None)];
    let ds = run(&p, &req, &mut events);
    assert_eq!(events[0].client_id.as_deref(), Some("5.6"));
    assert_eq!(find(&ds, "FPID").unwrap().value, "FPID2.2.5.6");
}

#[test]
fn without_migration_a_fresh_id_replaces_the_js_one() {
    let p = policy(|c| c.migrate_from_ga = false);
    let mut events = [hit(Some("1234567890.1764912990"), None)];
    let ds = run(&p, &HOST, &mut events);
    let fpid = find(&ds, "FPID").unwrap();
    assert_eq!(fpid.reason, CookieReason::New);
    let id = client_id_from_visitor_cookie(&fpid.value).unwrap();
    assert_eq!(events[0].client_id.as_deref(), Some(id.as_str()));
    assert_ne!(id, "1234567890.1764912990");
    assert_eq!(
        events[0].ga.js_client_id.as_deref(),
        Some("1234567890.1764912990")
    );
}

#[test]
fn visitor_cookie_name_is_configurable() {
    let p = policy(|c| c.visitor_cookie = "tr_id".into());
    let req = Req {
        cookie: Some("FPID=FPID2.2.1.1; tr_id=FPID2.2.7.8"),
        ..HOST
    };
    let mut events = [hit(None, None)];
    let ds = run(&p, &req, &mut events);
    assert_eq!(events[0].client_id.as_deref(), Some("7.8"));
    assert_eq!(names(&ds), vec!["tr_id", "_fbp"]);
}

#[test]
fn ga_cookie_parsing() {
    assert_eq!(
        client_id_from_ga_cookie("GA1.1.240625919.1775537645"),
        Some("240625919.1775537645")
    );
    assert_eq!(client_id_from_ga_cookie("GA1.2.3.4.5"), Some("4.5"));
    assert_eq!(client_id_from_ga_cookie("1.2.3"), None);
    assert_eq!(client_id_from_ga_cookie("GA1.1.abc.123"), None);
    assert_eq!(client_id_from_ga_cookie("GA1.1..123"), None);
    assert_eq!(client_id_from_ga_cookie(""), None);
}

// ---------------------------------------------------------------- _ga keeper

#[test]
fn ga_cookie_is_reissued_readable_by_js() {
    let p = policy(|_| {});
    let req = Req {
        host: "sgtm.shop.example.co.uk",
        cookie: Some("_ga=\"GA1.1.240625919.1775537645\""),
        ..HOST
    };
    let ds = run(&p, &req, &mut [hit(None, None)]);
    let ga = find(&ds, "_ga").unwrap();
    assert_eq!(ga.value, "GA1.1.240625919.1775537645");
    assert!(!ga.http_only);
    assert_eq!(ga.max_age_secs, 400 * 86_400);
    assert_eq!(ga.domain.as_deref(), Some("example.co.uk"));
    assert!(!ga.header_value().contains("HttpOnly"));

    let ds = run(&policy(|c| c.keep_ga = false), &req, &mut [hit(None, None)]);
    assert!(find(&ds, "_ga").is_none());

    let garbage = Req {
        cookie: Some("_ga=hello"),
        ..HOST
    };
    let ds = run(&p, &garbage, &mut [hit(None, None)]);
    assert!(find(&ds, "_ga").is_none());
}

// ---------------------------------------------------------------- Meta

#[test]
fn fbclid_builds_fbc_and_a_new_fbp() {
    let p = policy(|_| {});
    let req = Req {
        host: "www.example.co.uk:443",
        ..HOST
    };
    let mut events = [
        hit(None, Some("https://www.example.co.uk/?fbclid=IwAR2xYz&x=1")),
        hit(None, None),
    ];
    let ds = run(&p, &req, &mut events);
    let fbc = find(&ds, "_fbc").unwrap();
    assert_eq!(fbc.value, format!("fb.2.{NOW}.IwAR2xYz"));
    assert_eq!(fbc.domain.as_deref(), Some("example.co.uk"));
    assert_eq!(fbc.max_age_secs, 7_776_000);
    assert!(!fbc.http_only);
    assert_eq!(fbc.reason, CookieReason::New);

    let fbp = find(&ds, "_fbp").unwrap();
    let prefix = format!("fb.2.{NOW}.");
    let r: u64 = fbp.value.strip_prefix(&prefix).unwrap().parse().unwrap();
    assert!((1_000_000_000..2_147_483_648).contains(&r), "{r}");
    assert!(is_valid_meta_cookie(&fbp.value));
    for e in &events {
        assert_eq!(e.identity.fbc.as_deref(), Some(fbc.value.as_str()));
        assert_eq!(e.identity.fbp.as_deref(), Some(fbp.value.as_str()));
    }
}

#[test]
fn fbclid_is_percent_decoded_and_kept_case_sensitive() {
    let p = policy(|_| {});
    let mut events = [hit(None, Some("https://example.com/p?fbclid=AbC%2D1_x"))];
    run(&p, &HOST, &mut events);
    assert_eq!(
        events[0].identity.fbc.as_deref(),
        Some(format!("fb.1.{NOW}.AbC-1_x").as_str())
    );

    for bad in ["a.b", "", "a%20b", "a%3Bb"] {
        let url = format!("https://example.com/?fbclid={bad}");
        let mut events = [hit(None, Some(&url))];
        let ds = run(&p, &HOST, &mut events);
        assert_eq!(events[0].identity.fbc, None, "fbclid {bad:?}");
        assert!(find(&ds, "_fbc").is_none());
    }
    let long = format!("https://example.com/?fbclid={}", "a".repeat(501));
    let mut events = [hit(None, Some(&long))];
    run(&p, &HOST, &mut events);
    assert_eq!(events[0].identity.fbc, None);
}

#[test]
fn referer_is_consulted_only_without_page_location() {
    let p = policy(|_| {});
    let req = Req {
        host: "example.com",
        referer: Some("https://example.com/landing?fbclid=REFCLICK&utm_source=fb"),
        ..HOST
    };
    let mut events = [hit(None, None)];
    let ds = run(&p, &req, &mut events);
    assert_eq!(
        find(&ds, "_fbc").unwrap().value,
        format!("fb.1.{NOW}.REFCLICK")
    );

    let mut events = [hit(None, Some("https://example.com/?fbclid=PAGECLICK"))];
    let ds = run(&p, &req, &mut events);
    assert_eq!(
        find(&ds, "_fbc").unwrap().value,
        format!("fb.1.{NOW}.PAGECLICK")
    );
}

#[test]
fn existing_fbc_with_the_same_click_id_is_kept() {
    let p = policy(|_| {});
    for stored in [
        "fb.1.1700000000000.SAME",
        "fb.1.1700000000000.SAME.AQICAQMC",
        "fb.1.1700000000000.SAME.AQ",
    ] {
        let header = format!("_fbc={stored}");
        let req = Req {
            cookie: Some(&header),
            ..HOST
        };
        let mut events = [hit(None, Some("https://example.com/?fbclid=SAME"))];
        let ds = run(&p, &req, &mut events);
        let fbc = find(&ds, "_fbc").unwrap();
        assert_eq!(fbc.value, stored);
        assert_eq!(fbc.reason, CookieReason::Kept);
        assert_eq!(events[0].identity.fbc.as_deref(), Some(stored));
    }
}

#[test]
fn a_new_click_replaces_fbc_and_keeps_fbp() {
    let p = policy(|_| {});
    let req = Req {
        host: "www.example.com",
        cookie: Some("_fbc=fb.1.1700000000000.OLDCLICK.AQ; _fbp=fb.1.1700000000000.1234567890"),
        ..HOST
    };
    let mut events = [hit(None, Some("https://www.example.com/?fbclid=NEWCLICK"))];
    let ds = run(&p, &req, &mut events);
    let fbc = find(&ds, "_fbc").unwrap();
    assert_eq!(fbc.value, format!("fb.1.{NOW}.NEWCLICK"));
    assert_eq!(fbc.reason, CookieReason::Replaced);
    let fbp = find(&ds, "_fbp").unwrap();
    assert_eq!(fbp.value, "fb.1.1700000000000.1234567890");
    assert_eq!(fbp.reason, CookieReason::Kept);
}

#[test]
fn param_builder_values_are_accepted_as_they_are() {
    let p = policy(|_| {});
    let fbp = "fb.1.1700000000000.1234567890.AQQAAQMC";
    let fbc = "fb.1.1700000000000.AbCdEf.AQIAAQMC";
    let header = format!("_fbp={fbp}; _fbc={fbc}");
    let req = Req {
        cookie: Some(&header),
        ..HOST
    };
    let mut events = [hit(None, None)];
    let ds = run(&p, &req, &mut events);
    assert_eq!(find(&ds, "_fbp").unwrap().value, fbp);
    assert_eq!(find(&ds, "_fbc").unwrap().value, fbc);
    assert_eq!(events[0].identity.fbp.as_deref(), Some(fbp));
    assert_eq!(events[0].identity.fbc.as_deref(), Some(fbc));
}

#[test]
fn meta_cookie_validation() {
    for ok in [
        "fb.1.1596403881668.1116446470",
        "fb.0.1.x",
        "fb.2.1700000000000.IwAR2xYz.AQQCAQMC",
        "fb.1.1700000000000.OLDCLICK.Bg",
    ] {
        assert!(is_valid_meta_cookie(ok), "{ok}");
    }
    for bad in [
        "garbage",
        "fb.1.1700000000000",
        "fb.1.1700000000000.",
        "fx.1.1700000000000.1",
        "fb.a.1700000000000.1",
        "fb.1.17e12.1",
        "fb.1.1.2.ZZ",
        "fb.1.1.2.AQIDAQM",
        // 8 chars but the language byte is 9.
        "fb.1.1.2.AQkCAQMC",
        "fb.1.1.2.AQICAQMC.x",
        "fb.1.1.a b",
    ] {
        assert!(!is_valid_meta_cookie(bad), "{bad}");
    }
}

#[test]
fn invalid_fbp_is_replaced() {
    let p = policy(|_| {});
    for stored in ["garbage", "fb.1.abc.123", "fb.1.1.2.ZZZZZZZZ"] {
        let header = format!("_fbp={stored}");
        let req = Req {
            host: "www.example.com",
            cookie: Some(&header),
            ..HOST
        };
        let mut events = [hit(None, None)];
        let ds = run(&p, &req, &mut events);
        let fbp = find(&ds, "_fbp").unwrap();
        assert_ne!(fbp.value, stored);
        assert!(
            fbp.value.starts_with(&format!("fb.1.{NOW}.")),
            "{}",
            fbp.value
        );
        assert_eq!(fbp.reason, CookieReason::Replaced);
        assert_eq!(events[0].identity.fbp.as_deref(), Some(fbp.value.as_str()));
    }
}

#[test]
fn ip_hosts_get_index_zero_and_host_only_cookies() {
    let p = policy(|_| {});
    let req = Req {
        host: "[2001:db8::1]:8080",
        ..HOST
    };
    let mut events = [hit(None, Some("http://[2001:db8::1]:8080/?fbclid=C1"))];
    let ds = run(&p, &req, &mut events);
    assert!(find(&ds, "_fbp")
        .unwrap()
        .value
        .starts_with(&format!("fb.0.{NOW}.")));
    assert_eq!(find(&ds, "_fbc").unwrap().value, format!("fb.0.{NOW}.C1"));
    assert!(ds.iter().all(|d| d.domain.is_none()));
}

#[test]
fn keep_meta_off_sets_no_meta_cookies_but_reads_them() {
    let p = policy(|c| c.keep_meta = false);
    let req = Req {
        cookie: Some("_fbp=fb.1.1700000000000.1234567890"),
        ..HOST
    };
    let mut events = [hit(None, Some("https://example.com/?fbclid=C"))];
    let ds = run(&p, &req, &mut events);
    assert_eq!(names(&ds), vec!["FPID"]);
    assert_eq!(
        events[0].identity.fbp.as_deref(),
        Some("fb.1.1700000000000.1234567890")
    );
    assert_eq!(
        events[0].identity.fbc.as_deref(),
        Some(format!("fb.1.{NOW}.C").as_str())
    );
}

// ---------------------------------------------------------------- consent

fn with_consent(analytics: ConsentState, ads: ConsentState, cid: Option<&str>) -> Event {
    let mut e = hit(cid, Some("https://example.com/?fbclid=CLICK"));
    e.consent.analytics_storage = analytics;
    e.consent.ad_storage = ads;
    e
}

const ALL_COOKIES: &str = "FPID=FPID2.2.7.8; _ga=GA1.1.111.222; _fbp=fb.1.1700000000000.1234567890; _fbc=fb.1.1700000000000.OLD";

#[test]
fn analytics_denied_sets_no_analytics_cookies() {
    use ConsentState::*;
    let p = policy(|c| c.require_consent = true);
    let req = Req {
        cookie: Some(ALL_COOKIES),
        ..HOST
    };
    let mut events = [with_consent(Denied, Granted, Some("5.6"))];
    let ds = run(&p, &req, &mut events);
    assert_eq!(names(&ds), vec!["_fbp", "_fbc"]);
    // Stored ids are not read; the hit's own cid is.
    assert_eq!(events[0].client_id.as_deref(), Some("5.6"));
    assert_eq!(events[0].identity.ga_client_id, None);

    // No cid at all: a throwaway GA-shaped id, different per request.
    let mut a = [with_consent(Denied, Granted, None)];
    let mut b = [with_consent(Denied, Granted, None)];
    run_seeded(&p, &req, &mut a, 1);
    run_seeded(&p, &req, &mut b, 2);
    let id = a[0].client_id.clone().unwrap();
    let (r, ts) = id.split_once('.').unwrap();
    assert!(
        r.len() == 10 && r.bytes().all(|c| c.is_ascii_digit()),
        "{id}"
    );
    assert_eq!(ts, NOW_S);
    assert_ne!(a[0].client_id, b[0].client_id);
    assert_ne!(a[0].client_id.as_deref(), Some("7.8"));
}

#[test]
fn ads_denied_sets_no_meta_cookies() {
    use ConsentState::*;
    let p = policy(|c| c.require_consent = true);
    let req = Req {
        cookie: Some(ALL_COOKIES),
        ..HOST
    };
    let mut events = [with_consent(Granted, Denied, None)];
    let ds = run(&p, &req, &mut events);
    assert_eq!(names(&ds), vec!["FPID", "_ga"]);
    assert_eq!(events[0].client_id.as_deref(), Some("7.8"));
    assert_eq!(events[0].identity.fbp, None, "stored _fbp is not used");
    // The click id travels in the URL, not in storage.
    assert_eq!(
        events[0].identity.fbc.as_deref(),
        Some(format!("fb.1.{NOW}.CLICK").as_str())
    );
}

#[test]
fn one_denied_event_in_a_batch_holds_cookies_back() {
    use ConsentState::*;
    let p = policy(|c| c.require_consent = true);
    let mut events = [
        with_consent(Granted, Granted, None),
        with_consent(Denied, Denied, None),
    ];
    let ds = run(&p, &HOST, &mut events);
    assert!(ds.is_empty(), "{ds:?}");
    assert_eq!(events[0].client_id, events[1].client_id);
}

#[test]
fn unknown_consent_follows_the_default() {
    use ConsentState::*;
    let denied_default = policy(|c| {
        c.require_consent = true;
        c.consent_default = ConsentDefault::Denied;
    });
    let ds = run(
        &denied_default,
        &HOST,
        &mut [with_consent(Unknown, Unknown, None)],
    );
    assert!(ds.is_empty(), "{ds:?}");
    let ds = run(
        &denied_default,
        &HOST,
        &mut [with_consent(Granted, Unknown, None)],
    );
    assert_eq!(names(&ds), vec!["FPID"]);
    let ds = run(
        &denied_default,
        &HOST,
        &mut [with_consent(Unknown, Granted, None)],
    );
    assert_eq!(names(&ds), vec!["_fbp", "_fbc"]);

    let granted_default = policy(|c| c.require_consent = true);
    let ds = run(
        &granted_default,
        &HOST,
        &mut [with_consent(Unknown, Unknown, None)],
    );
    assert_eq!(names(&ds), vec!["FPID", "_fbp", "_fbc"]);

    // Without require_consent, consent signals do not gate cookies.
    let ungated = policy(|c| c.consent_default = ConsentDefault::Denied);
    let ds = run(&ungated, &HOST, &mut [with_consent(Denied, Denied, None)]);
    assert_eq!(names(&ds), vec!["FPID", "_fbp", "_fbc"]);
}

// ---------------------------------------------------------------- misc

#[test]
fn never_two_set_cookies_for_one_name() {
    let p = policy(|_| {});
    let header = format!("{ALL_COOKIES}; {ALL_COOKIES}; FPID=other; _ga=GA1.1.9.9");
    let req = Req {
        cookie: Some(&header),
        ..HOST
    };
    let mut events = [
        hit(Some("1.2"), Some("https://example.com/?fbclid=A")),
        hit(Some("3.4"), Some("https://example.com/?fbclid=B")),
    ];
    let ds = run(&p, &req, &mut events);
    assert_eq!(names(&ds), vec!["FPID", "_ga", "_fbp", "_fbc"]);
    assert_eq!(
        find(&ds, "_ga").unwrap().value,
        "GA1.1.111.222",
        "first wins"
    );
    assert_eq!(find(&ds, "_fbc").unwrap().value, format!("fb.1.{NOW}.A"));
}

#[test]
fn secure_false_omits_secure() {
    let p = policy(|c| c.secure = false);
    let req = Req {
        cookie: Some(ALL_COOKIES),
        ..HOST
    };
    let ds = run(&p, &req, &mut [hit(None, None)]);
    assert_eq!(ds.len(), 4);
    for d in &ds {
        assert!(!d.secure);
        assert!(!d.header_value().contains("Secure"), "{}", d.header_value());
    }
}

#[test]
fn disabled_sets_nothing_but_still_fills_client_id() {
    let p = policy(|c| c.enabled = false);
    let req = Req {
        cookie: Some(ALL_COOKIES),
        ..HOST
    };
    let mut events = [hit(Some("5.6"), None)];
    assert!(run(&p, &req, &mut events).is_empty());
    assert_eq!(events[0].client_id.as_deref(), Some("5.6"));

    let mut events = [hit(None, None)];
    assert!(run(&p, &req, &mut events).is_empty());
    assert_eq!(events[0].client_id.as_deref(), Some("111.222"));
    assert_eq!(
        events[0].identity.fbp.as_deref(),
        Some("fb.1.1700000000000.1234567890")
    );
}

#[test]
fn header_value_renders_every_attribute() {
    let d = CookieDecision {
        name: "_fbp".into(),
        value: "fb.1.1.2".into(),
        domain: Some("example.com".into()),
        max_age_secs: 7_776_000,
        http_only: false,
        secure: true,
        same_site: "Lax",
        path: "/",
        reason: CookieReason::New,
    };
    assert_eq!(
        d.header_value(),
        "_fbp=fb.1.1.2; SameSite=Lax; Secure; Path=/; Domain=example.com; Max-Age=7776000"
    );
    let host_only = CookieDecision {
        domain: None,
        http_only: true,
        ..d
    };
    assert_eq!(
        host_only.header_value(),
        "_fbp=fb.1.1.2; HttpOnly; SameSite=Lax; Secure; Path=/; Max-Age=7776000"
    );
}

#[test]
fn explicitly_set_identity_fields_are_kept() {
    let p = policy(|_| {});
    let req = Req {
        cookie: Some(ALL_COOKIES),
        ..HOST
    };
    let mut e = hit(None, None);
    e.identity.fbp = Some("fb.1.5.5".into());
    let mut events = [e];
    run(&p, &req, &mut events);
    assert_eq!(events[0].identity.fbp.as_deref(), Some("fb.1.5.5"));
    assert_eq!(
        events[0].identity.fbc.as_deref(),
        Some("fb.1.1700000000000.OLD")
    );
}

// ---------------------------------------------------------------- properties

fn consent_state() -> impl Strategy<Value = ConsentState> {
    prop_oneof![
        Just(ConsentState::Unknown),
        Just(ConsentState::Granted),
        Just(ConsentState::Denied)
    ]
}

fn cookie_header() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        any::<String>(),
        "[ ;=\"a-zA-Z0-9._%+/-]{0,40}",
        "(FPID|_ga|_fbp|_fbc)=[ \"a-zA-Z0-9._%+/=-]{0,40}",
        Just("FPID=FPID2.2.%FF%FE.1".to_owned()),
        Just("_fbc=fb.1.1.x.AQkCAQMC".to_owned()),
    ];
    prop::collection::vec(piece, 0..6).prop_map(|v| v.join("; "))
}

fn host() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-zA-Z0-9.:\\[\\]-]{0,30}",
        Just("[::1".to_owned()),
        Just("[]:".to_owned()),
        Just(".".to_owned()),
        Just("example.com:99999".to_owned()),
    ]
}

fn url() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "https?://[a-z.]{0,12}/?\\??(fbclid=[^#&]{0,20})?&?.{0,10}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn apply_never_panics_and_emits_valid_unique_cookies(
        header in prop::option::of(cookie_header()),
        host in host(),
        referer in prop::option::of(url()),
        page in prop::option::of(url()),
        cid in prop::option::of(any::<String>()),
        analytics in consent_state(),
        ads in consent_state(),
        require_consent in any::<bool>(),
        explicit in any::<bool>(),
        seed in any::<u64>(),
        now_ms in any::<i64>(),
    ) {
        let p = policy(|c| {
            c.require_consent = require_consent;
            if explicit {
                c.domain = "example.com".into();
            }
        });
        let mut e = hit(cid.as_deref(), page.as_deref());
        e.consent.analytics_storage = analytics;
        e.consent.ad_storage = ads;
        let mut events = [e.clone(), e];
        let input = IdentityInput {
            host: &host,
            cookie_header: header.as_deref(),
            referer: referer.as_deref(),
            now_ms,
        };
        let mut rng = StdRng::seed_from_u64(seed);
        let ds = p.apply(&input, &mut events, &mut rng);

        let mut seen = HashSet::new();
        for d in &ds {
            prop_assert!(seen.insert(d.name.clone()), "duplicate {}", d.name);
            prop_assert!(d.value.bytes().all(is_cookie_octet), "value {:?}", d.value);
            let rendered = d.header_value();
            let parsed = cookie::Cookie::parse(rendered.as_str()).unwrap();
            prop_assert_eq!(parsed.name(), d.name.as_str());
            prop_assert_eq!(parsed.value(), d.value.as_str());
        }
        prop_assert!(events.iter().all(|e| e.client_id.as_deref().is_some_and(|c| !c.is_empty())));
        prop_assert_eq!(&events[0].client_id, &events[1].client_id);

        // Whatever was issued resolves to the same client id on the next hit.
        if let Some(fpid) = ds.iter().find(|d| d.name == "FPID") {
            let resolved = client_id_from_visitor_cookie(&fpid.value);
            prop_assert_eq!(
                resolved.as_deref(),
                events[0].client_id.as_deref()
            );
        }
    }

    #[test]
    fn plausible_client_ids_roundtrip_through_the_visitor_cookie(id in "[A-Za-z0-9+/=._~-]{1,128}") {
        let value = visitor_cookie_value(&id);
        prop_assert!(value.bytes().all(is_cookie_octet));
        prop_assert_eq!(client_id_from_visitor_cookie(&value), Some(id));
    }
}

// ---------------------------------------------------------------- click ids

const GCLID: &str = "Cj0KCQiA-Abc_123";

fn click_hit(query: &str) -> Event {
    hit(
        None,
        Some(&format!("https://shop.example.com/landing?{query}")),
    )
}

fn keeper_only() -> CookiePolicy {
    // The keeper's cookies alone, so the lists below name nothing else.
    policy(|c| {
        c.keep_meta = false;
        c.keep_ga = false;
    })
}

fn click_names(ds: &[CookieDecision]) -> Vec<&str> {
    names(ds).into_iter().filter(|n| *n != "FPID").collect()
}

#[test]
fn every_click_id_gets_its_platforms_cookie_in_its_format() {
    let p = keeper_only();
    let mut events = [click_hit(
        "gclid=Cj0KCQiA-Abc_123&gbraid=0AAAAAB-gb&wbraid=Cl0KCQwb.x&ttclid=E.C.P.CqQB-tt\
         &ScCid=sc-1&epik=dj0yJnU9ZE5X&li_fat_id=8a1b-4c&msclkid=b4458f42c1b214060f81e89d7a9da3bb",
    )];
    let ds = run(&p, &HOST, &mut events);
    let got: Vec<(&str, &str, i64)> = ds
        .iter()
        .filter(|d| d.name != "FPID")
        .map(|d| (d.name.as_str(), d.value.as_str(), d.max_age_secs / 86_400))
        .collect();
    let gcl = |id: &str| format!("GCL.{NOW_S}.{id}");
    assert_eq!(
        got,
        vec![
            ("_gcl_aw", gcl(GCLID).as_str(), 90),
            ("_gcl_ag", gcl("0AAAAAB-gb").as_str(), 90),
            ("_gcl_gb", gcl("Cl0KCQwb.x").as_str(), 90),
            ("ttclid", "E.C.P.CqQB-tt", 30),
            ("_scclid", "sc-1", 365),
            ("_epik", "dj0yJnU9ZE5X", 365),
            ("li_fat_id", "8a1b-4c", 90),
            ("_uetmsclkid", "_uetb4458f42c1b214060f81e89d7a9da3bb", 90),
        ]
    );
    for d in ds.iter().filter(|d| d.name != "FPID") {
        // Readable by the platform's own script, first-party, Lax, as `_fbc`.
        assert!(!d.http_only, "{}", d.name);
        assert_eq!(d.domain.as_deref(), Some("example.com"));
        assert_eq!(d.same_site, "Lax");
        assert_eq!(d.reason, CookieReason::New, "{}", d.name);
        assert!(d.header_value().starts_with(&format!("{}=", d.name)));
    }
    let id = &events[0].identity;
    assert_eq!(id.gclid.as_deref(), Some(GCLID));
    assert_eq!(id.gbraid.as_deref(), Some("0AAAAAB-gb"));
    assert_eq!(id.wbraid.as_deref(), Some("Cl0KCQwb.x"));
    assert_eq!(id.ttclid.as_deref(), Some("E.C.P.CqQB-tt"));
    assert_eq!(id.sccid.as_deref(), Some("sc-1"));
    assert_eq!(id.epik.as_deref(), Some("dj0yJnU9ZE5X"));
    assert_eq!(id.li_fat_id.as_deref(), Some("8a1b-4c"));
    assert_eq!(
        id.msclkid.as_deref(),
        Some("b4458f42c1b214060f81e89d7a9da3bb")
    );
}

#[test]
fn click_cookies_are_kept_refreshed_and_replaced() {
    let p = keeper_only();
    let stored = format!(
        "_gcl_aw=GCL.1700000000.{GCLID}; ttclid=E.C.P.old; _ttp=01K5Y2QHK3PRN35DHHJTBYE973_.tt.1; \
         _uetmsclkid=_uetabc"
    );
    // A later hit without a click id: every cookie re-issued unchanged (lifetime refreshed),
    // and the ids reach the event from the cookies.
    let req = Req {
        cookie: Some(&stored),
        ..HOST
    };
    let mut events = [hit(None, Some("https://shop.example.com/checkout"))];
    let ds = run(&p, &req, &mut events);
    let gcl = find(&ds, "_gcl_aw").unwrap();
    assert_eq!(gcl.value, format!("GCL.1700000000.{GCLID}"));
    assert_eq!(gcl.reason, CookieReason::Kept);
    assert_eq!(find(&ds, "ttclid").unwrap().reason, CookieReason::Kept);
    let ttp = find(&ds, "_ttp").unwrap();
    assert_eq!(ttp.value, "01K5Y2QHK3PRN35DHHJTBYE973_.tt.1");
    assert_eq!(ttp.max_age_secs, 395 * 86_400);
    assert_eq!(events[0].identity.gclid.as_deref(), Some(GCLID));
    assert_eq!(events[0].identity.ttclid.as_deref(), Some("E.C.P.old"));
    assert_eq!(events[0].identity.msclkid.as_deref(), Some("abc"));
    assert_eq!(
        events[0].identity.ttp.as_deref(),
        Some("01K5Y2QHK3PRN35DHHJTBYE973_.tt.1")
    );

    // The same click again: kept with its first timestamp. A new click: replaced, now.
    let mut same = [click_hit(&format!("gclid={GCLID}&ttclid=E.C.P.new"))];
    let ds = run(&p, &req, &mut same);
    assert_eq!(find(&ds, "_gcl_aw").unwrap().reason, CookieReason::Kept);
    let tt = find(&ds, "ttclid").unwrap();
    assert_eq!(
        (tt.value.as_str(), tt.reason),
        ("E.C.P.new", CookieReason::Replaced)
    );
    assert_eq!(same[0].identity.ttclid.as_deref(), Some("E.C.P.new"));
    let mut newer = [click_hit("gclid=NEWCLICK")];
    let ds = run(&p, &req, &mut newer);
    let gcl = find(&ds, "_gcl_aw").unwrap();
    assert_eq!(gcl.value, format!("GCL.{NOW_S}.NEWCLICK"));
    assert_eq!(gcl.reason, CookieReason::Replaced);
    assert_eq!(newer[0].identity.gclid.as_deref(), Some("NEWCLICK"));
}

#[test]
fn malformed_click_ids_never_become_cookies() {
    let p = keeper_only();
    // Ids that could break a Set-Cookie header or are no ids at all.
    for query in [
        "gclid=a%3Bb",
        "gclid=a%20b",
        "ttclid=%22quoted%22",
        "msclkid=caf%C3%A9",
        "epik=",
    ] {
        let mut events = [click_hit(query)];
        let ds = run(&p, &HOST, &mut events);
        assert!(click_names(&ds).is_empty(), "{query}: {ds:?}");
        assert!(events[0].identity.gclid.is_none() && events[0].identity.ttclid.is_none());
    }
    let long = "x".repeat(501);
    let mut events = [click_hit(&format!("gclid={long}"))];
    assert!(click_names(&run(&p, &HOST, &mut events)).is_empty());

    // Malformed cookies are not re-issued nor used; a URL click replaces them.
    let req = Req {
        cookie: Some("_gcl_aw=GCL.notanumber.x; ttclid=\"a b\"; _uetmsclkid=nope; _ttp=a\\b"),
        ..HOST
    };
    let mut events = [hit(None, Some("https://shop.example.com/"))];
    let ds = run(&p, &req, &mut events);
    assert!(click_names(&ds).is_empty(), "{ds:?}");
    assert_eq!(events[0].identity, crate::event::Identity::default());
    let mut events = [click_hit("gclid=FRESH")];
    let ds = run(&p, &req, &mut events);
    let gcl = find(&ds, "_gcl_aw").unwrap();
    assert_eq!(
        (gcl.value.as_str(), gcl.reason),
        (
            format!("GCL.{NOW_S}.FRESH").as_str(),
            CookieReason::Replaced
        )
    );
}

#[test]
fn ad_storage_denied_keeps_no_click_cookies_but_the_url_click_still_counts() {
    use ConsentState::*;
    let p = policy(|c| c.require_consent = true);
    let req = Req {
        cookie: Some("_gcl_aw=GCL.1700000000.STORED; _ttp=ttp-value"),
        ..HOST
    };
    let mut denied = click_hit("ttclid=E.C.P.url");
    denied.consent.ad_storage = Denied;
    denied.consent.analytics_storage = Granted;
    let mut events = [denied];
    let ds = run(&p, &req, &mut events);
    assert_eq!(names(&ds), vec!["FPID"], "{ds:?}");
    let id = &events[0].identity;
    assert_eq!(
        id.ttclid.as_deref(),
        Some("E.C.P.url"),
        "the URL needs no storage"
    );
    assert_eq!(id.gclid, None, "the stored cookie is not read");
    assert_eq!(id.ttp, None);

    let mut granted = click_hit("ttclid=E.C.P.url");
    granted.consent.ad_storage = Granted;
    let mut events = [granted];
    let ds = run(&p, &req, &mut events);
    assert!(find(&ds, "ttclid").is_some() && find(&ds, "_gcl_aw").is_some());
    assert_eq!(events[0].identity.gclid.as_deref(), Some("STORED"));
}

#[test]
fn a_platform_switched_off_sets_no_cookie_but_its_id_reaches_the_event() {
    let p = policy(|c| {
        c.keep_meta = false;
        c.click_ids.google = false;
        c.click_ids.tiktok_max_age_days = 7;
    });
    let mut events = [click_hit("gclid=G1&ttclid=T1")];
    let ds = run(&p, &HOST, &mut events);
    assert_eq!(click_names(&ds), vec!["ttclid"]);
    assert_eq!(find(&ds, "ttclid").unwrap().max_age_secs, 7 * 86_400);
    assert_eq!(events[0].identity.gclid.as_deref(), Some("G1"));
    // cookies.enabled = false: no cookie at all, the ids still go to the tags.
    let off = policy(|c| c.enabled = false);
    let mut events = [click_hit("gclid=G1")];
    assert!(run(&off, &HOST, &mut events).is_empty());
    assert_eq!(events[0].identity.gclid.as_deref(), Some("G1"));
}

#[test]
fn click_ids_come_from_the_referer_without_a_page_url_and_from_sgtm_cookies() {
    let p = keeper_only();
    let req = Req {
        referer: Some("https://shop.example.com/?li_fat_id=LI-1"),
        ..HOST
    };
    let mut events = [hit(None, None)];
    let ds = run(&p, &req, &mut events);
    assert_eq!(click_names(&ds), vec!["li_fat_id"]);
    assert_eq!(events[0].identity.li_fat_id.as_deref(), Some("LI-1"));

    // A visitor from a GTM-SS setup: the sGTM linker's FPGCLAW holds the click.
    let req = Req {
        cookie: Some("FPGCLAW=2.1.kCjwKCAjwBwE$i1755249832"),
        ..HOST
    };
    let mut events = [hit(None, Some("https://shop.example.com/"))];
    let ds = run(&p, &req, &mut events);
    let gcl = find(&ds, "_gcl_aw").unwrap();
    assert_eq!(gcl.value, format!("GCL.{NOW_S}.CjwKCAjwBwE"));
    assert_eq!(gcl.reason, CookieReason::New);
    assert_eq!(
        click_names(&ds),
        vec!["_gcl_aw"],
        "FPGCLAW itself is not written"
    );
    assert_eq!(events[0].identity.gclid.as_deref(), Some("CjwKCAjwBwE"));
}

#[test]
fn explicit_click_ids_win_and_lifetimes_are_validated() {
    let p = keeper_only();
    let mut e = click_hit("gclid=FROM_URL");
    e.identity.gclid = Some("FROM_PAYLOAD".into());
    let mut events = [e];
    run(&p, &HOST, &mut events);
    assert_eq!(events[0].identity.gclid.as_deref(), Some("FROM_PAYLOAD"));

    for days in [0, 401] {
        let mut cfg = CookiesConfig::default();
        cfg.click_ids.linkedin_max_age_days = days;
        let err = CookiePolicy::build(&cfg).unwrap_err().join("\n");
        assert!(
            err.contains("click_ids.linkedin_max_age_days") && err.contains("1 to 400"),
            "{err}"
        );
    }
    let cfg = CookiesConfig {
        visitor_cookie: "_gcl_aw".into(),
        ..Default::default()
    };
    let err = CookiePolicy::build(&cfg).unwrap_err().join("\n");
    assert!(err.contains("click-id cookie"), "{err}");
}
