//! WebKit's rule for capping cookies set by cloaked hosts, as one pure function over the DNS
//! facts of a page host and a tagging host. Mirrors `NetworkTaskCocoa`'s logic: the CNAME test
//! when the tagging host has a CNAME chain, else the address test (/16 for IPv4, /64 for IPv6).

use std::fmt;
use std::net::IpAddr;

use serde::Serialize;

use super::facts::{required_bits, same_range, shared_bits, site_of, HostFacts};

/// What Safari will do with the cookies tagrelay sets, for one (page host, tagging host) pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    SameOrigin,
    OkSameRange,
    OkSharedCname,
    OkCnameInSite,
    CappedCname,
    CappedIp,
    CappedFamily,
    Intermittent,
    ThirdParty,
    Unresolvable,
}

impl Verdict {
    /// Every verdict, for metrics that must show each label from the start.
    pub const ALL: [Verdict; 10] = [
        Verdict::SameOrigin,
        Verdict::OkSameRange,
        Verdict::OkSharedCname,
        Verdict::OkCnameInSite,
        Verdict::CappedCname,
        Verdict::CappedIp,
        Verdict::CappedFamily,
        Verdict::Intermittent,
        Verdict::ThirdParty,
        Verdict::Unresolvable,
    ];

    pub fn code(self) -> &'static str {
        match self {
            Verdict::SameOrigin => "same-origin",
            Verdict::OkSameRange => "ok-same-range",
            Verdict::OkSharedCname => "ok-shared-cname",
            Verdict::OkCnameInSite => "ok-cname-in-site",
            Verdict::CappedCname => "capped-cname",
            Verdict::CappedIp => "capped-ip",
            Verdict::CappedFamily => "capped-family",
            Verdict::Intermittent => "intermittent",
            Verdict::ThirdParty => "third-party",
            Verdict::Unresolvable => "unresolvable",
        }
    }

    pub fn severity(self) -> Severity {
        match self {
            Verdict::SameOrigin | Verdict::OkSameRange | Verdict::OkSharedCname => Severity::Ok,
            Verdict::OkCnameInSite | Verdict::Intermittent => Severity::Warn,
            Verdict::CappedCname | Verdict::CappedIp | Verdict::CappedFamily => Severity::Capped,
            Verdict::ThirdParty | Verdict::Unresolvable => Severity::Error,
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// How bad a verdict is, in increasing order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Ok,
    Warn,
    Capped,
    Error,
}

impl Severity {
    pub fn code(self) -> &'static str {
        match self {
            Severity::Ok => "ok",
            Severity::Warn => "warn",
            Severity::Capped => "capped",
            Severity::Error => "error",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// Where the browser sends hits: the page's own host under a path, or another host.
#[derive(Debug, Clone, Copy)]
pub enum Tagging<'a> {
    /// Path mode: hits go to the page host itself (`https://www.shop.com/t/...`).
    SameOrigin,
    /// Subdomain mode: hits go to this host (`https://sgtm.shop.com/...`).
    Host(&'a HostFacts),
}

/// One host of the evidence table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostEvidence {
    pub host: String,
    /// `page`, `tagging`, or `page+tagging` in path mode.
    pub role: &'static str,
    /// Registrable domain of the host (Public Suffix List, private section included).
    pub site: String,
    pub cname_chain: Vec<String>,
    /// Registrable domain of the chain's last target: what WebKit compares.
    pub last_cname_domain: Option<String>,
    pub ipv4: Vec<std::net::Ipv4Addr>,
    pub ipv6: Vec<std::net::Ipv6Addr>,
    pub ipv4_ranges: Vec<String>,
    pub ipv6_ranges: Vec<String>,
    pub ttl_secs: Option<u32>,
    /// False when the host was judged by name alone.
    pub looked_up: bool,
    pub error: Option<String>,
}

impl HostEvidence {
    pub fn new(f: &HostFacts, role: &'static str) -> Self {
        HostEvidence {
            host: f.host.clone(),
            role,
            site: site_of(&f.host),
            cname_chain: f.cname_chain.clone(),
            last_cname_domain: f.last_cname_domain(),
            ipv4: f.ipv4.clone(),
            ipv6: f.ipv6.clone(),
            ipv4_ranges: f.v4_prefixes(),
            ipv6_ranges: f.v6_prefixes(),
            ttl_secs: f.ttl_secs,
            looked_up: f.looked_up,
            error: f.error.clone(),
        }
    }
}

/// The address test for one kind of visitor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VisitorCheck {
    /// `ipv4-only` or `dual-stack`.
    pub visitors: &'static str,
    /// `ok`, `capped`, `intermittent`, `unreachable` (the tagging host has no address of the
    /// family these visitors use) or `not-applicable` (they cannot load the page either).
    pub outcome: &'static str,
    /// Every (page address, tagging address) pair such a visitor may be handed.
    pub pairs: Vec<AddressPair>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AddressPair {
    pub page: IpAddr,
    pub tagging: IpAddr,
    pub shared_bits: u32,
    pub required_bits: u32,
    pub passes: bool,
}

/// The verdict for one (page host, tagging host) pair, with its evidence and fix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PairReport {
    pub page_host: String,
    pub tagging_host: String,
    pub verdict: Verdict,
    pub severity: Severity,
    /// One or two sentences: what Safari does and why, with the names involved.
    pub message: String,
    /// One line for lists and the debug view's summary.
    pub summary: String,
    /// Concrete fixes, the recommended one first.
    pub fix: Vec<String>,
    /// Things worth knowing that do not change the verdict.
    pub notes: Vec<String>,
    /// The address test per kind of visitor, when it ran.
    pub visitors: Vec<VisitorCheck>,
    pub hosts: Vec<HostEvidence>,
}

/// Which browsers the rule concerns; printed with every report.
pub const APPLIES_TO: &str = "This rule applies to Safari and every iOS/iPadOS browser (WebKit with tracking prevention on): the CNAME test since Safari 14, the address test since Safari 16.4. Chrome, Firefox and Edge on desktop and Android are not affected.";

/// What a DNS-based check cannot see; printed with every report.
pub fn cannot_see(resolver: &str) -> Vec<String> {
    vec![
        format!("These answers are as {resolver} sees them. Geo-DNS CDNs (CloudFront, Akamai, Fastly) give visitors in other regions other edges, whose addresses may differ; anycast CDNs (Cloudflare) give out the same addresses everywhere."),
        "Safari compares the address it actually connected to for the page, which no DNS answer and no request header reveals; a host with several addresses is judged on every pair it could be given.".to_owned(),
        "Under iCloud Private Relay or an HTTP proxy Safari records the proxy's address for both hosts and may see no CNAME chain, so those visitors can fare better or worse than shown.".to_owned(),
    ]
}

/// The same-origin fix, recommended first wherever a fix is offered.
fn same_origin_fix(page: &str) -> String {
    format!(
        "Same-origin path (recommended): on {page}'s CDN or reverse proxy route /t/* to tagrelay, set [server] path_prefix = \"/t\", and send hits to https://{page}/t (gtag: server_container_url). Check it with: tagrelay doctor itp --site https://{page} --path /t"
    )
}

const SAME_ORIGIN_SHORT: &str = "serve tagrelay on a path of the page's own host (same-origin)";

/// Judges one pair. `site` is the page host; `tagging` where its hits go.
pub fn evaluate(site: &HostFacts, tagging: Tagging<'_>) -> PairReport {
    let s = site.host.as_str();
    let sd = site_of(s);
    let (t_facts, same_origin) = match tagging {
        Tagging::SameOrigin => (site, true),
        Tagging::Host(t) if t.host == site.host => (site, true),
        Tagging::Host(t) => (t, false),
    };
    let t = t_facts.host.as_str();
    let hosts = if same_origin {
        vec![HostEvidence::new(site, "page+tagging")]
    } else {
        vec![
            HostEvidence::new(site, "page"),
            HostEvidence::new(t_facts, "tagging"),
        ]
    };
    let mut r = PairReport {
        page_host: s.to_owned(),
        tagging_host: t.to_owned(),
        verdict: Verdict::SameOrigin,
        severity: Severity::Ok,
        message: String::new(),
        summary: String::new(),
        fix: Vec::new(),
        notes: Vec::new(),
        visitors: Vec::new(),
        hosts,
    };

    // Third-party needs no DNS: the names say it.
    let td = site_of(t);
    if !same_origin && td != sd {
        return r.with(
            Verdict::ThirdParty,
            format!("{t} is not under {sd} (it belongs to {td}): its cookies are third-party on {s}, and Safari blocks them entirely."),
            format!("{t} is not under {sd}"),
            vec![
                same_origin_fix(s),
                format!("Or use a subdomain of {sd} such as sgtm.{sd}, with A/AAAA records in {s}'s ranges or the same CDN zone, and re-run this check."),
            ],
            SAME_ORIGIN_SHORT,
        );
    }

    for f in [site, t_facts] {
        if let Some(why) = f.unresolvable_reason() {
            return r.with(
                Verdict::Unresolvable,
                format!("Cannot judge: {why}."),
                why.clone(),
                vec![format!("Fix DNS: {why}; then re-run this check.")],
                "fix DNS",
            );
        }
    }

    if same_origin {
        if site.looked_up && site.cname_chain.is_empty() {
            let ranges = site.v4_prefixes().len().max(site.v6_prefixes().len());
            if ranges > 1 {
                r.notes.push(format!(
                    "{s} has no CNAME and its addresses span {ranges} ranges ({}): should Safari open a second connection for a hit to another of them, it could apply the address test to its own host. Rare, and not seen confirmed in a real browser.",
                    site.v4_prefixes().into_iter().chain(site.v6_prefixes()).collect::<Vec<_>>().join(", ")
                ));
            }
        }
        return r.with(
            Verdict::SameOrigin,
            format!(
                "Hits go to {s} itself: Safari keeps tagrelay's cookies for their full lifetime."
            ),
            format!("hits go to {s} itself"),
            Vec::new(),
            "",
        );
    }

    // The CNAME test. When it runs, the address test does not.
    if let Some(last) = t_facts.last_cname() {
        let d = site_of(last);
        let chain = std::iter::once(t)
            .chain(t_facts.cname_chain.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" → ");
        if d == sd {
            return r.with(
                Verdict::OkCnameInSite,
                format!("{chain}: the chain ends inside {sd}, so Safari skips its address check and keeps the cookies. This rests on WebKit's current code, not on stated policy."),
                format!("{t}'s CNAME chain ends inside {sd} (fragile)"),
                vec![
                    same_origin_fix(s),
                    format!("Or serve {t} from {s}'s own infrastructure (the same CDN zone or load balancer)."),
                ],
                SAME_ORIGIN_SHORT,
            );
        }
        let site_cname = site.last_cname_domain();
        if site_cname.as_deref() == Some(d.as_str()) {
            return r.with(
                Verdict::OkSharedCname,
                format!(
                    "{chain} ({d}), and {s}'s own chain ends in {d} too: Safari keeps the cookies."
                ),
                format!("{t} and {s} both CNAME to {d}"),
                Vec::new(),
                "",
            );
        }
        let page_side = match (site.last_cname(), &site_cname) {
            (Some(l), Some(pd)) => format!("while {s} CNAMEs to {l} ({pd})"),
            _ => format!("while {s} has no CNAME"),
        };
        let mut fix = vec![
            same_origin_fix(s),
            match &site_cname {
                Some(pd) => format!("Or put {t} behind the same CDN zone as {s}, so its chain also ends in {pd}."),
                None => format!("Or put {t} behind the same CDN or load balancer as {s}, with A/AAAA records (no CNAME) in {s}'s ranges."),
            },
        ];
        fix.push(format!(
            "An A/AAAA record instead of the CNAME helps only if it points into {s}'s own ranges ({}); elsewhere Safari's address test caps the cookies just the same.",
            ranges_of(site)
        ));
        return r.with(
            Verdict::CappedCname,
            format!("{chain} ({d}), {page_side}: Safari caps every cookie {t} sets to 7 days."),
            format!("{t} CNAMEs to {d}"),
            fix,
            SAME_ORIGIN_SHORT,
        );
    }

    // The address test, per kind of visitor.
    let v4_only = visitor_check("ipv4-only", &v4(site), &v4(t_facts));
    let dual = (!site.ipv6.is_empty() || !t_facts.ipv6.is_empty())
        .then(|| visitor_check("dual-stack", &preferred(site), &preferred(t_facts)));
    let a = v4_only.outcome;
    let b = dual.as_ref().map_or(a, |d| d.outcome);
    r.visitors.push(v4_only);
    r.visitors.extend(dual);

    if site.ipv6.is_empty() && t_facts.ipv6.is_empty() {
        r.notes.push("Visitors on IPv6-only networks with NAT64 (some mobile carriers) reach both hosts through one synthesized IPv6 prefix; Safari may then see them in one /64 and not cap. This is an inference, not confirmed in a real browser.".to_owned());
    }
    let same_set = {
        let (mut sa, mut ta): (Vec<IpAddr>, Vec<IpAddr>) =
            (site.addresses().collect(), t_facts.addresses().collect());
        sa.sort();
        ta.sort();
        sa == ta
    };

    let capped = |o: &str| o == "capped" || o == "unreachable";
    let families_differ = (site.ipv4.is_empty() != t_facts.ipv4.is_empty())
        || (site.ipv6.is_empty() != t_facts.ipv6.is_empty());
    if capped(a) || capped(b) {
        let v4_fine = matches!(a, "ok" | "intermittent");
        if families_differ || (v4_fine && capped(b)) {
            let (what, gist) = if families_differ {
                (
                    format!(
                        "{s} has {} and {t} has {}: visitors whose browser reaches the two over different families (dual-stack visitors, most iPhones on cellular{}) get their cookies capped to 7 days by Safari.",
                        families(site),
                        families(t_facts),
                        if t_facts.ipv4.is_empty() { "; IPv4-only visitors cannot reach it at all" } else { "" }
                    ),
                    format!("{t} has {} where {s} has {}", families(t_facts), families(site)),
                )
            } else {
                (
                    format!(
                        "{s}'s and {t}'s IPv6 addresses are in different /64s ({} vs {}): dual-stack visitors (most iPhones on cellular) get their cookies capped to 7 days by Safari; IPv4-only visitors are fine.",
                        site.v6_prefixes().join(", "),
                        t_facts.v6_prefixes().join(", ")
                    ),
                    format!("{t}'s IPv6 addresses are outside {s}'s /64"),
                )
            };
            return r.with(
                Verdict::CappedFamily,
                what,
                gist,
                vec![
                    same_origin_fix(s),
                    format!("Or give {t} the same address families as {s} ({}), inside {s}'s ranges ({}); usually possible only on the same CDN.", families(site), ranges_of(site)),
                ],
                SAME_ORIGIN_SHORT,
            );
        }
        return r.with(
            Verdict::CappedIp,
            format!(
                "{t} has no CNAME and its addresses ({}) share fewer than 16 (IPv4) / 64 (IPv6) leading bits with {s}'s ({}): Safari caps every cookie {t} sets to 7 days.",
                ranges_of(t_facts),
                ranges_of(site)
            ),
            format!("{t}'s addresses are outside {s}'s ranges"),
            vec![
                same_origin_fix(s),
                format!("Or front {t} with {s}'s CDN or load balancer, so it gets {s}'s addresses ({})." , ranges_of(site)),
            ],
            SAME_ORIGIN_SHORT,
        );
    }
    if a == "intermittent" || b == "intermittent" {
        if same_set {
            r.notes.push(format!("{t}'s addresses are exactly {s}'s (the same CDN zone): Safari most likely reuses or picks the same address for both, but as the set spans several ranges this stays a warning."));
        }
        return r.with(
            Verdict::Intermittent,
            format!(
                "Some address pairs of {s} ({}) and {t} ({}) share the range Safari requires and some do not: whether a visitor's cookies are capped to 7 days depends on which addresses their browser picks.",
                ranges_of(site),
                ranges_of(t_facts)
            ),
            format!("only some of {t}'s addresses are in {s}'s ranges"),
            vec![
                same_origin_fix(s),
                format!("Or make {t}'s address set equal to {s}'s (the same CDN zone), in one /16 and one /64."),
            ],
            SAME_ORIGIN_SHORT,
        );
    }
    r.with(
        Verdict::OkSameRange,
        format!(
            "{t} has no CNAME and every address pair shares the /16 (IPv4) and /64 (IPv6) with {s} ({}): Safari keeps the cookies.",
            ranges_of(site)
        ),
        format!("{t}'s addresses are in {s}'s ranges"),
        vec![format!("Keep {t}'s DNS tied to {s}'s, and re-run this check after any DNS or CDN change.")],
        "",
    )
}

impl PairReport {
    fn with(
        mut self,
        verdict: Verdict,
        message: String,
        gist: String,
        fix: Vec<String>,
        fix_short: &str,
    ) -> Self {
        self.verdict = verdict;
        self.severity = verdict.severity();
        let lead = match verdict {
            Verdict::SameOrigin
            | Verdict::OkSameRange
            | Verdict::OkSharedCname
            | Verdict::OkCnameInSite => "Safari keeps cookies set for",
            Verdict::Intermittent => "Safari may cap cookies set for",
            Verdict::CappedCname | Verdict::CappedIp | Verdict::CappedFamily => {
                "Safari will cap cookies set for"
            }
            Verdict::ThirdParty => "Safari blocks cookies set for",
            Verdict::Unresolvable => "Cannot judge cookies set for",
        };
        self.summary = if fix_short.is_empty() {
            format!("{lead} {}: {gist}", self.page_host)
        } else {
            format!("{lead} {}: {gist} — fix: {fix_short}", self.page_host)
        };
        self.message = message;
        self.fix = fix;
        self
    }
}

fn v4(f: &HostFacts) -> Vec<IpAddr> {
    f.ipv4.iter().map(|a| IpAddr::V4(*a)).collect()
}

/// The addresses a dual-stack browser uses: IPv6 when the host has any.
fn preferred(f: &HostFacts) -> Vec<IpAddr> {
    if f.ipv6.is_empty() {
        v4(f)
    } else {
        f.ipv6.iter().map(|a| IpAddr::V6(*a)).collect()
    }
}

fn visitor_check(visitors: &'static str, page: &[IpAddr], tagging: &[IpAddr]) -> VisitorCheck {
    let pairs: Vec<AddressPair> = page
        .iter()
        .flat_map(|&p| {
            tagging.iter().map(move |&t| AddressPair {
                page: p,
                tagging: t,
                shared_bits: shared_bits(p, t),
                required_bits: required_bits(p),
                passes: same_range(p, t),
            })
        })
        .collect();
    let outcome = if page.is_empty() {
        "not-applicable"
    } else if tagging.is_empty() {
        "unreachable"
    } else if pairs.iter().all(|p| p.passes) {
        "ok"
    } else if pairs.iter().any(|p| p.passes) {
        "intermittent"
    } else {
        "capped"
    };
    VisitorCheck {
        visitors,
        outcome,
        pairs,
    }
}

fn families(f: &HostFacts) -> &'static str {
    match (f.ipv4.is_empty(), f.ipv6.is_empty()) {
        (false, false) => "IPv4 and IPv6",
        (false, true) => "IPv4 only",
        (true, false) => "IPv6 only",
        (true, true) => "no addresses",
    }
}

fn ranges_of(f: &HostFacts) -> String {
    let mut all = f.v4_prefixes();
    all.extend(f.v6_prefixes());
    all.join(", ")
}
