//! The ITP check against a real resolver and an in-process DNS server on loopback: the
//! reference's twelve cases, the PSL private section, the CLI, and the running check.

use std::time::Duration;

use tagrelay::doctor::itp::{collect, evaluate, ItpResolver, PairReport, Tagging, Verdict};

use crate::dns::TestDns;
use crate::helpers::spawn_app_server;

const SITE: &str = "www.example.test";
const TAG: &str = "sgtm.example.test";
const SITE_A: &str = "www.example.test A 203.0.113.10";

/// Resolves `site` and `tagging` (None = path mode) through `dns` and judges them.
async fn judge(dns: &TestDns, site: &str, tagging: Option<&str>) -> PairReport {
    let resolver = ItpResolver::Server(dns.addr).build().unwrap();
    let s = collect(site, &resolver).await;
    match tagging {
        None => evaluate(&s, Tagging::SameOrigin),
        Some(t) => {
            let t = collect(t, &resolver).await;
            evaluate(&s, Tagging::Host(&t))
        }
    }
}

#[tokio::test]
async fn the_reference_cases_through_a_real_resolver() {
    struct Case {
        name: &'static str,
        zone: &'static str,
        tagging: Option<&'static str>,
        expected: Verdict,
    }
    let cases = [
        Case {
            name: "1 path mode",
            zone: "",
            tagging: None,
            expected: Verdict::SameOrigin,
        },
        Case {
            name: "2 A in the site's /16",
            zone: "sgtm.example.test A 203.0.113.77",
            tagging: Some(TAG),
            expected: Verdict::OkSameRange,
        },
        Case {
            name: "3 A elsewhere",
            zone: "sgtm.example.test A 198.51.100.7",
            tagging: Some(TAG),
            expected: Verdict::CappedIp,
        },
        Case {
            name: "4 CNAME to a vendor",
            zone: "sgtm.example.test CNAME abc.vendor.test\nabc.vendor.test A 198.51.100.7",
            tagging: Some(TAG),
            expected: Verdict::CappedCname,
        },
        Case {
            name: "5 two hops, the last counts",
            zone: "sgtm.example.test CNAME gw.example.test\ngw.example.test CNAME abc.vendor.test\nabc.vendor.test A 198.51.100.7",
            tagging: Some(TAG),
            expected: Verdict::CappedCname,
        },
        Case {
            name: "6 both on one CDN",
            zone: "www.example.test CNAME site.cdn.test\nsite.cdn.test A 203.0.113.10\nsgtm.example.test CNAME tag.cdn.test\ntag.cdn.test A 198.51.100.50",
            tagging: Some(TAG),
            expected: Verdict::OkSharedCname,
        },
        Case {
            name: "7 CNAME inside the site",
            zone: "sgtm.example.test CNAME gw.example.test\ngw.example.test A 198.51.100.7",
            tagging: Some(TAG),
            expected: Verdict::OkCnameInSite,
        },
        Case {
            name: "8 site dual-stack, tagging IPv4 only",
            zone: "www.example.test AAAA 2001:db8:1:1::10\nsgtm.example.test A 203.0.113.20",
            tagging: Some(TAG),
            expected: Verdict::CappedFamily,
        },
        Case {
            name: "9 same /48, not the same /64",
            zone: "www.example.test AAAA 2001:db8:1:1::10\nsgtm.example.test AAAA 2001:db8:1:2::20\nsgtm.example.test A 203.0.113.20",
            tagging: Some(TAG),
            expected: Verdict::CappedFamily,
        },
        Case {
            name: "10 addresses across /16s",
            zone: "sgtm.example.test A 203.0.113.20\nsgtm.example.test A 198.51.100.20",
            tagging: Some(TAG),
            expected: Verdict::Intermittent,
        },
        Case {
            name: "11 another site",
            zone: "sgtm.other.test A 203.0.113.20",
            tagging: Some("sgtm.other.test"),
            expected: Verdict::ThirdParty,
        },
        Case {
            name: "12 dangling CNAME",
            zone: "sgtm.example.test CNAME gone.vendor.test",
            tagging: Some(TAG),
            expected: Verdict::Unresolvable,
        },
    ];
    for case in cases {
        // The site's A record is in every zone unless the case gives the site a CNAME.
        let zone = if case.zone.contains("www.example.test CNAME") {
            case.zone.to_owned()
        } else {
            format!("{SITE_A}\n{}", case.zone)
        };
        let dns = TestDns::start(&zone).await;
        let r = judge(&dns, SITE, case.tagging).await;
        assert_eq!(r.verdict, case.expected, "case {}: {r:#?}", case.name);
        dns.stop().await;
    }
}

#[tokio::test]
async fn the_evidence_carries_the_whole_chain_and_both_families() {
    let dns = TestDns::start(&format!(
        "{SITE_A}\nwww.example.test AAAA 2001:db8:1:1::10\nsgtm.example.test CNAME gw.example.test\ngw.example.test CNAME abc.vendor.test\nabc.vendor.test A 198.51.100.7\nabc.vendor.test AAAA 2001:db8:2:1::7"
    ))
    .await;
    let r = judge(&dns, SITE, Some(TAG)).await;
    let tag = &r.hosts[1];
    assert_eq!(tag.host, TAG);
    assert_eq!(tag.cname_chain, ["gw.example.test", "abc.vendor.test"]);
    assert_eq!(tag.last_cname_domain.as_deref(), Some("vendor.test"));
    assert_eq!(
        tag.ipv4,
        ["198.51.100.7".parse::<std::net::Ipv4Addr>().unwrap()]
    );
    assert_eq!(
        tag.ipv6,
        ["2001:db8:2:1::7".parse::<std::net::Ipv6Addr>().unwrap()]
    );
    assert_eq!(tag.ttl_secs, Some(crate::dns::TTL));
    let site = &r.hosts[0];
    assert_eq!(site.ipv4_ranges, ["203.0.0.0/16"]);
    assert_eq!(site.ipv6_ranges, ["2001:db8:1:1::/64"]);
    assert!(r.message.contains("vendor.test"), "{}", r.message);

    // A dangling chain says where it ends.
    dns.stop().await;
    let dns = TestDns::start(&format!(
        "{SITE_A}\nsgtm.example.test CNAME gone.vendor.test"
    ))
    .await;
    let r = judge(&dns, SITE, Some(TAG)).await;
    assert_eq!(r.hosts[1].cname_chain, ["gone.vendor.test"]);
    assert!(
        r.message.contains("dangles at gone.vendor.test"),
        "{}",
        r.message
    );
    dns.stop().await;
}

/// `cloudfront.net` is in the PSL's private section: `d1.cloudfront.net` and
/// `d2.cloudfront.net` are different sites to WebKit, though one ICANN domain.
#[tokio::test]
async fn private_psl_suffixes_are_sites_of_their_own() {
    let zone = "www.example.test CNAME d2.cloudfront.net\nd2.cloudfront.net A 203.0.113.10\nsgtm.example.test CNAME d1.cloudfront.net\nd1.cloudfront.net A 203.0.113.11\nlive.example.test CNAME edge.d2.cloudfront.net\nedge.d2.cloudfront.net A 198.51.100.9";
    let dns = TestDns::start(zone).await;
    let r = judge(&dns, SITE, Some(TAG)).await;
    assert_eq!(r.verdict, Verdict::CappedCname, "{r:#?}");
    assert_eq!(
        r.hosts[1].last_cname_domain.as_deref(),
        Some("d1.cloudfront.net")
    );
    // Control: a chain ending under the page's own distribution matches it.
    let r = judge(&dns, SITE, Some("live.example.test")).await;
    assert_eq!(r.verdict, Verdict::OkSharedCname, "{r:#?}");
    dns.stop().await;
}

/// Runs the real binary; returns (exit code, stdout, stderr).
async fn doctor(args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(crate::process::BIN)
        .arg("doctor")
        .arg("itp")
        .args(args)
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_cli_exit_codes_and_json_shape() {
    let dns = TestDns::start(&format!(
        "{SITE_A}\nexample.test A 203.0.113.11\nsgtm.example.test CNAME abc.vendor.test\nabc.vendor.test A 198.51.100.7\nnear.example.test A 203.0.113.77\ngw.example.test CNAME in.example.test\nin.example.test A 198.51.100.7"
    ))
    .await;
    let resolver = dns.resolver();
    let base = [
        "--site",
        "https://www.example.test/shop?x=1",
        "--site",
        "example.test",
        "--resolver",
        resolver.as_str(),
    ];

    // Capped: exit 1, one JSON object with the verdict, severity, evidence and fix.
    let (code, out, err) = doctor(
        &[
            &base[..],
            &["--tagging", "https://sgtm.example.test", "--json"],
        ]
        .concat(),
    )
    .await;
    assert_eq!(code, 1, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["verdict"], "capped-cname");
    assert_eq!(v["severity"], "capped");
    let hosts = v["hosts"].as_array().unwrap();
    let names: Vec<&str> = hosts.iter().map(|h| h["host"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["www.example.test", "sgtm.example.test", "example.test"]
    );
    assert_eq!(hosts[1]["cname_chain"][0], "abc.vendor.test");
    assert_eq!(hosts[1]["last_cname_domain"], "vendor.test");
    assert_eq!(hosts[1]["ipv4"][0], "198.51.100.7");
    assert_eq!(hosts[0]["ipv4_ranges"][0], "203.0.0.0/16");
    let fix = v["fix"].as_array().unwrap();
    assert!(
        fix[0].as_str().unwrap().starts_with("Same-origin path"),
        "{fix:?}"
    );
    assert_eq!(v["pairs"].as_array().unwrap().len(), 2);
    assert!(v["cannot_see"].as_array().unwrap().len() >= 3);
    assert!(v["resolver"].as_str().unwrap().contains(&resolver));

    // Ok: exit 0; the text names the verdict and shows the evidence table.
    let (code, out, err) = doctor(&[&base[..], &["--tagging", "near.example.test"]].concat()).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ok-same-range (ok)"), "{out}");
    assert!(out.contains("203.0.0.0/16"), "{out}");
    assert!(out.contains("What this check cannot see"), "{out}");
    assert!(out.contains("Private Relay"), "{out}");

    // A warning passes by default and fails with --fail-on warn.
    let warn = [&base[..], &["--tagging", "gw.example.test", "--json"]].concat();
    let (code, out, _) = doctor(&warn).await;
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["verdict"].as_str(), v["severity"].as_str()),
        (Some("ok-cname-in-site"), Some("warn"))
    );
    let (code, _, _) = doctor(&[&warn[..], &["--fail-on", "warn"]].concat()).await;
    assert_eq!(code, 1);

    // Path mode: same-origin, exit 0.
    let (code, out, _) = doctor(&[&base[..], &["--path", "/t", "--json"]].concat()).await;
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["verdict"], "same-origin");

    // Third-party and unresolvable are errors: exit 1.
    let (code, out, _) =
        doctor(&[&base[..], &["--tagging", "sgtm.other.test", "--json"]].concat()).await;
    assert_eq!(code, 1);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["severity"],
        "error"
    );
    let (code, out, _) =
        doctor(&[&base[..], &["--tagging", "missing.example.test", "--json"]].concat()).await;
    assert_eq!(code, 1);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["verdict"],
        "unresolvable"
    );

    // The check cannot run: exit 2 with the reason.
    let (code, _, err) = doctor(&[
        "--site",
        "https://www.example.test",
        "--tagging",
        TAG,
        "--resolver",
        "dns.example",
    ])
    .await;
    assert_eq!(code, 2);
    assert!(err.contains("not a resolver"), "{err}");
    dns.stop().await;
}

#[tokio::test]
async fn the_cli_takes_sites_and_path_from_the_config() {
    let dns = TestDns::start(&format!("{SITE_A}\nshop.example.test A 203.0.113.12")).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tagrelay.toml");
    std::fs::write(
        &config,
        "[server]\npath_prefix = \"/t\"\nallowed_origins = [\"https://www.example.test\", \"https://shop.example.test:8443\"]\n",
    )
    .unwrap();
    let resolver = dns.resolver();
    let config_arg = config.display().to_string();
    let (code, out, err) =
        doctor(&["--config", &config_arg, "--resolver", &resolver, "--json"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["verdict"], "same-origin");
    assert_eq!(v["path"], "/t", "from [server] path_prefix");
    let pages: Vec<&str> = v["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["page_host"].as_str().unwrap())
        .collect();
    assert_eq!(pages, ["www.example.test", "shop.example.test"]);

    // Without path_prefix the config cannot say where hits go: the command asks.
    std::fs::write(
        &config,
        "[server]\nallowed_origins = [\"https://www.example.test\"]\n",
    )
    .unwrap();
    let (code, _, err) = doctor(&["--config", &config_arg, "--resolver", &resolver]).await;
    assert_eq!(code, 2);
    assert!(err.contains("--tagging URL"), "{err}");
    dns.stop().await;
}

#[tokio::test]
async fn the_running_check_reaches_the_metric_and_the_debug_view_through_the_test_dns() {
    let dns = TestDns::start(&format!(
        "{SITE_A}\nsgtm.example.test CNAME abc.vendor.test\nabc.vendor.test A 198.51.100.7"
    ))
    .await;
    let app = spawn_app_server(
        &format!(
            "itp_check = true\nitp_resolver = \"{}\"\nallowed_origins = [\"https://www.example.test\"]",
            dns.resolver()
        ),
        "[[clients]]\ntype = \"ga4\"\n",
    )
    .await;
    let itp = app.state.itp().expect("the check runs").clone();
    let mut changes = itp.subscribe();
    // A browser's hit from the page, to the tagging host: the hit path tells the check.
    let hit = || {
        app.http
            .get(app.url("/g/collect?v=2&tid=G-ITP&cid=1.2&en=page_view"))
            .header("host", "sgtm.example.test:443")
            .header("origin", "https://www.example.test")
            .header("x-tagrelay-debug", "itp-test")
            .send()
    };
    assert_eq!(hit().await.unwrap().status(), 204);
    let report = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Some(r) = itp.report_for("https://www.example.test/page", "sgtm.example.test") {
                return r;
            }
            changes.changed().await.unwrap();
        }
    })
    .await
    .expect("a verdict within 20 s");
    assert_eq!(report.verdict, Verdict::CappedCname);
    assert!(
        report.summary.starts_with("Safari will cap cookies set for www.example.test: sgtm.example.test CNAMEs to vendor.test — fix: "),
        "{}",
        report.summary
    );
    assert_eq!(itp.summary(), std::slice::from_ref(&report.summary));

    let metrics = app.admin_text("/metrics").await;
    assert!(
        metrics.contains("tagrelay_itp_verdict{verdict=\"capped-cname\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tagrelay_itp_verdict{verdict=\"ok-same-range\"} 0"),
        "{metrics}"
    );

    // The debug view: the summary, and the verdict on the next traced hit.
    let panel: serde_json::Value =
        serde_json::from_str(&app.admin_text("/debug/api/itp").await).unwrap();
    assert_eq!(panel["enabled"], true);
    assert_eq!(panel["summary"][0], report.summary.as_str());
    assert_eq!(hit().await.unwrap().status(), 204);
    let traces: serde_json::Value =
        serde_json::from_str(&app.admin_text("/debug/api/traces?limit=1").await).unwrap();
    let note = &traces["traces"][0]["itp"];
    assert_eq!(note["verdict"], "capped-cname", "{traces}");
    assert_eq!(note["severity"], "capped");
    assert_eq!(note["summary"], report.summary.as_str());
    app.stop().await;
    dns.stop().await;
}

#[tokio::test]
async fn the_check_is_off_unless_asked_for() {
    let app = spawn_app_server("", "").await;
    assert!(app.state.itp().is_none());
    app.stop().await;
}

#[tokio::test]
async fn the_startup_check_judges_the_configured_origins_in_path_mode() {
    // Path mode is judged by the names alone; the resolver is the test's own anyway.
    let dns = TestDns::start("").await;
    let app = spawn_app_server(
        &format!(
            "itp_check = true\nitp_resolver = \"{}\"\npath_prefix = \"/t\"\nallowed_origins = [\"https://www.example.test\"]",
            dns.resolver()
        ),
        "",
    )
    .await;
    let itp = app.state.itp().expect("the check runs").clone();
    let mut changes = itp.subscribe();
    let pair = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Some(p) = itp.pairs().into_iter().find(|p| p.report.is_some()) {
                return p;
            }
            changes.changed().await.unwrap();
        }
    })
    .await
    .expect("a verdict within 20 s");
    assert!(pair.configured);
    assert_eq!(
        (pair.page_host.as_str(), pair.tagging_host.as_str()),
        ("www.example.test", "www.example.test")
    );
    assert_eq!(pair.report.unwrap().verdict, Verdict::SameOrigin);
    app.stop().await;
    dns.stop().await;
}

/// `[cookies] measure_cookie_age`: a real hit sets the companion beside an unchanged FPID,
/// and a Safari return is measured in the histogram by engine.
#[tokio::test]
async fn visitor_cookie_ages_are_measured_by_engine() {
    const SAFARI: &str = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1";
    let dir = tempfile::tempdir().unwrap();
    let text = crate::helpers::test_config(dir.path(), "[[clients]]\ntype = \"ga4\"\n").replace(
        "secure = false",
        "secure = false\nmeasure_cookie_age = true",
    );
    let app = crate::helpers::spawn_with(dir, &text).await;
    let hit = app.url("/g/collect?v=2&en=page_view&tid=G-1&cid=111.222");
    let r = app
        .http
        .get(&hit)
        .header("user-agent", SAFARI)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let set: Vec<String> = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    let fpid = set.iter().find(|c| c.starts_with("FPID=")).unwrap();
    assert!(fpid.starts_with("FPID=FPID2.2.111.222;"), "{fpid}");
    let companion = set
        .iter()
        .find(|c| c.starts_with("FPID_set="))
        .expect("companion set");
    assert!(companion.contains("HttpOnly"), "{companion}");

    // The browser comes back eight days later with both cookies.
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let cookie = format!("FPID=FPID2.2.111.222; FPID_set={}", now_s - 8 * 86_400);
    let r = app
        .http
        .get(&hit)
        .header("user-agent", SAFARI)
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let fpid_again = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .find(|c| c.starts_with("FPID="))
        .unwrap();
    assert!(
        fpid_again.starts_with("FPID=FPID2.2.111.222;"),
        "{fpid_again}"
    );
    let metrics = app.admin_text("/metrics").await;
    // The bucket below the 7-day cap stays empty; the 8-day bucket holds the visit.
    assert!(
        metrics.contains(
            "tagrelay_visitor_cookie_age_seconds_bucket{engine=\"webkit\",le=\"604800\"} 0"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "tagrelay_visitor_cookie_age_seconds_bucket{engine=\"webkit\",le=\"691200\"} 1"
        ),
        "{metrics}"
    );
    app.stop().await;
}

#[test]
fn check_names_a_bad_itp_resolver_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tagrelay.toml");
    std::fs::write(
        &path,
        "[server]\nitp_check = true\nitp_resolver = \"dns.example\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(crate::process::BIN)
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("`server.itp_resolver`"), "{err}");
    assert!(err.contains("\"system\""), "{err}");
    assert!(err.contains("192.0.2.53:5353"), "{err}");
}
