//! The evaluation on hand-built facts: every verdict, and the edges between them.

use std::net::IpAddr;

use super::evaluate::{evaluate, Severity, Tagging, Verdict};
use super::facts::HostFacts;
use super::render::Report;

const S: &str = "www.example.test";
const T: &str = "sgtm.example.test";

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|a| a.parse().unwrap()).collect()
}

fn host(name: &str, chain: &[&str], addrs: &[&str]) -> HostFacts {
    HostFacts::resolved(name, chain, &ips(addrs))
}

fn site() -> HostFacts {
    host(S, &[], &["203.0.113.10"])
}

fn judge(s: &HostFacts, t: &HostFacts) -> super::PairReport {
    evaluate(s, Tagging::Host(t))
}

#[test]
fn path_mode_is_same_origin() {
    let r = evaluate(&site(), Tagging::SameOrigin);
    assert_eq!(r.verdict, Verdict::SameOrigin);
    assert_eq!(r.severity, Severity::Ok);
    assert!(r.fix.is_empty());
    assert!(r.notes.is_empty(), "{:?}", r.notes);
    assert_eq!(r.hosts.len(), 1);
    assert_eq!(r.hosts[0].role, "page+tagging");
    // A tagging host equal to the page host is the same thing.
    assert_eq!(judge(&site(), &site()).verdict, Verdict::SameOrigin);
    // Judged by name alone (the running check): no DNS facts needed.
    let by_name = evaluate(&HostFacts::by_name(S), Tagging::SameOrigin);
    assert_eq!(by_name.verdict, Verdict::SameOrigin);
}

#[test]
fn same_origin_notes_a_site_without_cname_spanning_ranges() {
    let s = host(S, &[], &["104.21.1.1", "172.67.1.1"]);
    let r = evaluate(&s, Tagging::SameOrigin);
    assert_eq!(r.verdict, Verdict::SameOrigin);
    assert!(r.notes[0].contains("span 2 ranges"), "{:?}", r.notes);
    // With a CNAME the same host always yields the same chain: nothing to note.
    let s = host(S, &["site.cdn.test"], &["104.21.1.1", "172.67.1.1"]);
    assert!(evaluate(&s, Tagging::SameOrigin).notes.is_empty());
}

#[test]
fn addresses_in_the_sites_ranges_are_ok() {
    let r = judge(&site(), &host(T, &[], &["203.0.113.77"]));
    assert_eq!(r.verdict, Verdict::OkSameRange);
    assert_eq!(r.severity, Severity::Ok);
    assert_eq!(r.visitors.len(), 1, "no IPv6 anywhere: one kind of visitor");
    assert_eq!(r.visitors[0].outcome, "ok");
    assert!(r.notes.iter().any(|n| n.contains("NAT64")), "{:?}", r.notes);

    let s = host(S, &[], &["203.0.113.10", "2001:db8:1:1::10"]);
    let t = host(T, &[], &["203.0.200.1", "2001:db8:1:1:ffff::1"]);
    let r = judge(&s, &t);
    assert_eq!(r.verdict, Verdict::OkSameRange);
    assert_eq!(r.visitors[1].visitors, "dual-stack");
    assert_eq!(r.visitors[1].outcome, "ok");
    assert!(!r.notes.iter().any(|n| n.contains("NAT64")));
}

#[test]
fn addresses_outside_the_sites_ranges_are_capped() {
    let r = judge(&site(), &host(T, &[], &["198.51.100.7"]));
    assert_eq!(r.verdict, Verdict::CappedIp);
    assert_eq!(r.severity, Severity::Capped);
    assert_eq!(r.visitors[0].pairs[0].shared_bits, 4);
    assert!(r.fix[0].starts_with("Same-origin path"), "{:?}", r.fix);
    // One bit short of the /16 is still outside.
    let r = judge(&site(), &host(T, &[], &["203.1.113.10"]));
    assert_eq!(r.verdict, Verdict::CappedIp);
    assert_eq!(r.visitors[0].pairs[0].shared_bits, 15);
    // IPv6-only hosts in different /64s.
    let s = host(S, &[], &["2001:db8:1:1::10"]);
    let r = judge(&s, &host(T, &[], &["2001:db8:1:2::10"]));
    assert_eq!(r.verdict, Verdict::CappedIp);
}

#[test]
fn a_cname_out_of_the_site_is_capped_whatever_the_addresses() {
    // The address is in the site's /16, but the CNAME test runs instead of the address test.
    let t = host(T, &["abc.vendor.test"], &["203.0.113.11"]);
    let r = judge(&site(), &t);
    assert_eq!(r.verdict, Verdict::CappedCname);
    assert!(r.visitors.is_empty(), "the address test does not run");
    assert!(
        r.message
            .starts_with("sgtm.example.test → abc.vendor.test (vendor.test), while www.example.test has no CNAME"),
        "{}",
        r.message
    );
    assert_eq!(r.fix.len(), 3);
    assert!(r.fix[0].starts_with("Same-origin path"));
    assert!(r.fix[2].contains("203.0.0.0/16"), "{}", r.fix[2]);
    // The last target counts, not the first.
    let t = host(
        T,
        &["gw.example.test", "abc.vendor.test"],
        &["198.51.100.7"],
    );
    assert_eq!(judge(&site(), &t).verdict, Verdict::CappedCname);
    // A site on another CDN than the tagging host's.
    let s = host(S, &["site.cdn.test"], &["203.0.113.10"]);
    let r = judge(&s, &host(T, &["abc.vendor.test"], &["198.51.100.7"]));
    assert_eq!(r.verdict, Verdict::CappedCname);
    assert!(r
        .message
        .contains("while www.example.test CNAMEs to site.cdn.test (cdn.test)"));
    assert!(r.fix[1].contains("also ends in cdn.test"), "{}", r.fix[1]);
}

#[test]
fn chains_ending_in_one_domain_are_ok() {
    let s = host(S, &["site.cdn.test"], &["203.0.113.10"]);
    let t = host(T, &["tag.cdn.test"], &["198.51.100.50"]);
    let r = judge(&s, &t);
    assert_eq!(r.verdict, Verdict::OkSharedCname);
    assert_eq!(r.severity, Severity::Ok);
    // Private PSL suffixes: d1.cloudfront.net and d2.cloudfront.net are different sites.
    let s = host(S, &["d2.cloudfront.net"], &["203.0.113.10"]);
    let t = host(T, &["d1.cloudfront.net"], &["203.0.113.11"]);
    assert_eq!(judge(&s, &t).verdict, Verdict::CappedCname);
    let t = host(T, &["x.d2.cloudfront.net"], &["198.51.100.1"]);
    assert_eq!(judge(&s, &t).verdict, Verdict::OkSharedCname);
}

#[test]
fn a_chain_ending_inside_the_site_is_a_warning() {
    let t = host(T, &["gw.example.test"], &["198.51.100.7"]);
    let r = judge(&site(), &t);
    assert_eq!(r.verdict, Verdict::OkCnameInSite);
    assert_eq!(r.severity, Severity::Warn);
    assert!(r.fix[0].starts_with("Same-origin path"));
}

#[test]
fn families_that_differ_cap_dual_stack_visitors() {
    let s = host(S, &[], &["203.0.113.10", "2001:db8:1:1::10"]);
    let r = judge(&s, &host(T, &[], &["203.0.113.20"]));
    assert_eq!(r.verdict, Verdict::CappedFamily);
    assert_eq!(r.visitors[0].outcome, "ok");
    assert_eq!(r.visitors[1].outcome, "capped");
    assert!(r.message.contains("IPv4 only"), "{}", r.message);
    // The reverse: the tagging host dual-stack, the page IPv4 only.
    let t = host(T, &[], &["203.0.113.20", "2001:db8:1:1::20"]);
    assert_eq!(judge(&site(), &t).verdict, Verdict::CappedFamily);
    // A tagging host without IPv4 cannot even be reached by IPv4-only visitors.
    let r = judge(&s, &host(T, &[], &["2001:db8:1:1::20"]));
    assert_eq!(r.verdict, Verdict::CappedFamily);
    assert_eq!(r.visitors[0].outcome, "unreachable");
    assert!(
        r.message.contains("cannot reach it at all"),
        "{}",
        r.message
    );
}

#[test]
fn the_same_slash_48_is_not_the_same_slash_64() {
    let s = host(S, &[], &["203.0.113.10", "2001:db8:1:1::10"]);
    let t = host(T, &[], &["203.0.113.20", "2001:db8:1:2::20"]);
    let r = judge(&s, &t);
    assert_eq!(r.verdict, Verdict::CappedFamily);
    assert!(r.message.contains("different /64s"), "{}", r.message);
}

#[test]
fn addresses_across_ranges_are_intermittent() {
    let r = judge(&site(), &host(T, &[], &["203.0.113.20", "198.51.100.20"]));
    assert_eq!(r.verdict, Verdict::Intermittent);
    assert_eq!(r.severity, Severity::Warn);
    assert!(r.notes.iter().all(|n| !n.contains("exactly")));
    // The same address set as the page (one CDN zone) is said so, and stays a warning.
    let s = host(S, &[], &["104.21.1.1", "172.67.1.1"]);
    let t = host(T, &[], &["172.67.1.1", "104.21.1.1"]);
    let r = judge(&s, &t);
    assert_eq!(r.verdict, Verdict::Intermittent);
    assert!(
        r.notes.iter().any(|n| n.contains("exactly")),
        "{:?}",
        r.notes
    );
    // Intermittent for IPv4-only visitors but always capped for dual-stack ones is capped.
    let s = host(S, &[], &["203.0.113.10", "2001:db8:1:1::10"]);
    let t = host(
        T,
        &[],
        &["203.0.113.20", "198.51.100.20", "2001:db8:9:9::1"],
    );
    assert_eq!(judge(&s, &t).verdict, Verdict::CappedFamily);
}

#[test]
fn another_site_is_third_party_without_any_dns() {
    let r = judge(
        &HostFacts::by_name(S),
        &HostFacts::by_name("sgtm.other.test"),
    );
    assert_eq!(r.verdict, Verdict::ThirdParty);
    assert_eq!(r.severity, Severity::Error);
    assert!(
        r.message.contains("is not under example.test"),
        "{}",
        r.message
    );
    // Even an unresolvable one: the names decide.
    let t = host("sgtm.other.test", &[], &[]);
    assert_eq!(judge(&site(), &t).verdict, Verdict::ThirdParty);
}

#[test]
fn hosts_without_addresses_are_unresolvable() {
    let r = judge(&site(), &host(T, &["gone.vendor.test"], &[]));
    assert_eq!(r.verdict, Verdict::Unresolvable);
    assert_eq!(r.severity, Severity::Error);
    assert!(
        r.message.contains("dangles at gone.vendor.test"),
        "{}",
        r.message
    );
    let r = judge(&site(), &host(T, &[], &[]));
    assert!(r.message.contains("no A or AAAA records"), "{}", r.message);
    let mut failed = host(T, &[], &[]);
    failed.error = Some("request timed out".into());
    let r = judge(&site(), &failed);
    assert_eq!(r.verdict, Verdict::Unresolvable);
    assert!(r.message.contains("request timed out"), "{}", r.message);
    // The page's host too.
    let r = judge(&host(S, &[], &[]), &host(T, &[], &["203.0.113.77"]));
    assert_eq!(r.verdict, Verdict::Unresolvable);
    assert!(r.message.contains(S));
}

#[test]
fn codes_severities_and_summaries() {
    for v in Verdict::ALL {
        assert_eq!(serde_json::to_value(v).unwrap(), v.code());
    }
    assert!(Severity::Ok < Severity::Warn && Severity::Warn < Severity::Capped);
    assert!(Severity::Capped < Severity::Error);
    let r = judge(&site(), &host(T, &["x.vendor.test"], &["198.51.100.7"]));
    assert_eq!(
        r.summary,
        "Safari will cap cookies set for www.example.test: sgtm.example.test CNAMEs to vendor.test — fix: serve tagrelay on a path of the page's own host (same-origin)"
    );
    let r = evaluate(&site(), Tagging::SameOrigin);
    assert_eq!(
        r.summary,
        "Safari keeps cookies set for www.example.test: hits go to www.example.test itself"
    );
}

#[test]
fn a_report_over_several_pages_takes_the_worst_and_lists_each_host_once() {
    let t = host(T, &[], &["203.0.113.77"]);
    let apex = host("example.test", &[], &["198.51.100.1"]);
    let pairs = vec![judge(&site(), &t), judge(&apex, &t)];
    let report = Report::new(pairs, "the DNS server 127.0.0.1:53", None);
    assert_eq!(report.verdict, Verdict::CappedIp);
    assert_eq!(report.severity, Severity::Capped);
    let names: Vec<&str> = report.hosts.iter().map(|h| h.host.as_str()).collect();
    assert_eq!(names, [S, T, "example.test"]);
    assert!(report.cannot_see[0].contains("127.0.0.1:53"));
    let text = report.text();
    assert!(text.contains("verdict: capped-ip (capped)"), "{text}");
    assert!(text.contains("198.51.0.0/16"), "{text}");
}
