//! What DNS says about one host, and the address arithmetic WebKit applies to it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use crate::identity::{normalized_host, registrable_domain};

/// Leading bits two IPv4 addresses must share for Safari to count them as one site's (/16).
pub const V4_BITS: u32 = 16;
/// The same for IPv6 (/64).
pub const V6_BITS: u32 = 64;

/// One host as a resolver saw it: the CNAME chain and the addresses at its end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFacts {
    pub host: String,
    /// CNAME targets in the order the chain follows them, lower case, without the root dot.
    pub cname_chain: Vec<String>,
    pub ipv4: Vec<Ipv4Addr>,
    pub ipv6: Vec<Ipv6Addr>,
    /// Shortest TTL of the answers, in seconds, when DNS gave one.
    pub ttl_secs: Option<u32>,
    /// The lookup failed for another reason than "no such records" (timeout, SERVFAIL, …).
    pub error: Option<String>,
    /// False when no DNS query was made: the running check judges some pairs by name alone.
    pub looked_up: bool,
}

impl HostFacts {
    /// A host judged by its name only (no DNS query).
    pub fn by_name(host: &str) -> Self {
        HostFacts {
            host: normalized_host(host).into_owned(),
            cname_chain: Vec::new(),
            ipv4: Vec::new(),
            ipv6: Vec::new(),
            ttl_secs: None,
            error: None,
            looked_up: false,
        }
    }

    /// A host whose lookups answered: `chain` then `addresses`.
    pub fn resolved(host: &str, chain: &[&str], addresses: &[IpAddr]) -> Self {
        let mut f = HostFacts::by_name(host);
        f.looked_up = true;
        f.cname_chain = chain.iter().map(|c| c.to_ascii_lowercase()).collect();
        for a in addresses {
            match a {
                IpAddr::V4(v4) => f.ipv4.push(*v4),
                IpAddr::V6(v6) => f.ipv6.push(*v6),
            }
        }
        f
    }

    /// The last CNAME target, the name WebKit takes the registrable domain of.
    pub fn last_cname(&self) -> Option<&str> {
        self.cname_chain.last().map(String::as_str)
    }

    /// Registrable domain of the last CNAME target (WebKit's `lastCNAMEDomain`).
    pub fn last_cname_domain(&self) -> Option<String> {
        self.last_cname().map(site_of)
    }

    pub fn has_addresses(&self) -> bool {
        !self.ipv4.is_empty() || !self.ipv6.is_empty()
    }

    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.ipv4
            .iter()
            .map(|a| IpAddr::V4(*a))
            .chain(self.ipv6.iter().map(|a| IpAddr::V6(*a)))
    }

    /// Why a looked-up host cannot be judged, if it cannot.
    pub fn unresolvable_reason(&self) -> Option<String> {
        if !self.looked_up {
            return None;
        }
        if let Some(e) = &self.error {
            return Some(format!("the lookup of {} failed: {e}", self.host));
        }
        if self.has_addresses() {
            return None;
        }
        Some(match self.last_cname() {
            Some(last) => format!(
                "{} has no addresses: its CNAME chain dangles at {last}, which has no A or AAAA records",
                self.host
            ),
            None => format!("{} has no A or AAAA records", self.host),
        })
    }

    /// Distinct /16 prefixes of the IPv4 addresses, in order of first appearance.
    pub fn v4_prefixes(&self) -> Vec<String> {
        distinct(self.ipv4.iter().map(|a| prefix(IpAddr::V4(*a))))
    }

    /// Distinct /64 prefixes of the IPv6 addresses.
    pub fn v6_prefixes(&self) -> Vec<String> {
        distinct(self.ipv6.iter().map(|a| prefix(IpAddr::V6(*a))))
    }
}

fn distinct(items: impl Iterator<Item = String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for i in items {
        if !out.contains(&i) {
            out.push(i);
        }
    }
    out
}

/// The site a host belongs to, as WebKit's `RegistrableDomain` sees it: the registrable domain
/// by the Public Suffix List (its private section included, so `d1.cloudfront.net` is a site of
/// its own), or the host itself when it has none (IP literals, single labels).
pub fn site_of(host: &str) -> String {
    registrable_domain(host).unwrap_or_else(|| normalized_host(host).into_owned())
}

/// Leading bits `a` and `b` share; 0 when one is IPv4 and the other IPv6, as in WebKit's
/// `IPAddress::matchingNetMaskLength`.
pub fn shared_bits(a: IpAddr, b: IpAddr) -> u32 {
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (a.to_bits() ^ b.to_bits()).leading_zeros(),
        (IpAddr::V6(a), IpAddr::V6(b)) => (a.to_bits() ^ b.to_bits()).leading_zeros(),
        _ => 0,
    }
}

/// Bits Safari requires a page and a subresource address of this family to share.
pub fn required_bits(a: IpAddr) -> u32 {
    match a {
        IpAddr::V4(_) => V4_BITS,
        IpAddr::V6(_) => V6_BITS,
    }
}

/// Whether Safari leaves cookies from `tagging` alone when the page came from `page`.
pub fn same_range(page: IpAddr, tagging: IpAddr) -> bool {
    page.is_ipv4() == tagging.is_ipv4() && shared_bits(page, tagging) >= required_bits(page)
}

/// `203.0.0.0/16` or `2001:db8:1:1::/64`: the range Safari compares.
pub fn prefix(a: IpAddr) -> String {
    match a {
        IpAddr::V4(v4) => {
            let masked = Ipv4Addr::from_bits(v4.to_bits() & !(u32::MAX >> V4_BITS));
            format!("{masked}/{V4_BITS}")
        }
        IpAddr::V6(v6) => {
            let masked = Ipv6Addr::from_bits(v6.to_bits() & !(u128::MAX >> V6_BITS));
            format!("{masked}/{V6_BITS}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn shared_bits_counts_leading_equal_bits_and_zero_across_families() {
        assert_eq!(shared_bits(ip("203.0.113.10"), ip("203.0.113.77")), 25);
        assert_eq!(shared_bits(ip("203.0.113.10"), ip("203.0.113.10")), 32);
        assert_eq!(shared_bits(ip("203.0.113.10"), ip("198.51.100.7")), 4);
        assert_eq!(
            shared_bits(ip("2001:db8:1:1::10"), ip("2001:db8:1:2::20")),
            62
        );
        assert_eq!(shared_bits(ip("203.0.113.10"), ip("2001:db8::1")), 0);
    }

    #[test]
    fn same_range_is_a_shared_slash_16_or_slash_64() {
        assert!(same_range(ip("203.0.113.10"), ip("203.0.1.1")));
        assert!(!same_range(ip("203.0.113.10"), ip("203.1.113.10")));
        assert!(same_range(
            ip("2001:db8:1:1::10"),
            ip("2001:db8:1:1:ffff::1")
        ));
        assert!(!same_range(ip("2001:db8:1:1::10"), ip("2001:db8:1:2::10")));
        // ::ffff:203.0.113.10 is an IPv6 address to WebKit's comparison: another family.
        assert!(!same_range(ip("203.0.113.10"), ip("::ffff:203.0.113.10")));
    }

    #[test]
    fn prefixes_are_the_compared_ranges() {
        assert_eq!(prefix(ip("203.0.113.10")), "203.0.0.0/16");
        assert_eq!(prefix(ip("2001:db8:1:1::10")), "2001:db8:1:1::/64");
    }

    #[test]
    fn site_of_uses_the_private_section_of_the_psl() {
        assert_eq!(site_of("sgtm.example.test"), "example.test");
        assert_eq!(site_of("d1.cloudfront.net"), "d1.cloudfront.net");
        assert_eq!(site_of("x.d1.cloudfront.net"), "d1.cloudfront.net");
        assert_eq!(site_of("sgtm.shop.example.co.uk"), "example.co.uk");
        assert_eq!(site_of("203.0.113.10"), "203.0.113.10");
        assert_eq!(site_of("WWW.Example.TEST."), "example.test");
    }

    #[test]
    fn a_dangling_chain_names_where_it_ends() {
        let f = HostFacts::resolved("sgtm.example.test", &["gone.vendor.test"], &[]);
        let why = f.unresolvable_reason().unwrap();
        assert!(why.contains("dangles at gone.vendor.test"), "{why}");
        assert_eq!(HostFacts::by_name("x.test").unresolvable_reason(), None);
    }
}
