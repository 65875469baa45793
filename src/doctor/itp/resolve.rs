//! Gathering a host's facts from DNS: A and AAAA with the CNAME chain that led to them.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::TokioResolver;
use serde::{Deserialize, Serialize};

use super::facts::HostFacts;
use crate::identity::{is_ip_literal, normalized_host};

/// Longest CNAME chain followed by hand when the address lookups found nothing.
const MAX_CNAME_HOPS: usize = 16;

/// Which DNS resolver answers: the system's (`/etc/resolv.conf`), or one server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ItpResolver {
    #[default]
    System,
    /// A DNS server at this address (port 53 unless given).
    Server(SocketAddr),
}

impl FromStr for ItpResolver {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("system") {
            return Ok(ItpResolver::System);
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(ItpResolver::Server(SocketAddr::new(ip, 53)));
        }
        match s.parse::<SocketAddr>() {
            Ok(addr) if addr.port() != 0 => Ok(ItpResolver::Server(addr)),
            _ => Err(format!(
                "`{s}` is not a resolver: use \"system\" (the resolvers of /etc/resolv.conf) or a DNS server's IP address with an optional port, e.g. \"192.0.2.53\", \"192.0.2.53:5353\" or \"[2001:db8::53]:53\""
            )),
        }
    }
}

impl TryFrom<String> for ItpResolver {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<ItpResolver> for String {
    fn from(r: ItpResolver) -> String {
        r.to_string()
    }
}

impl fmt::Display for ItpResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ItpResolver::System => f.write_str("system"),
            ItpResolver::Server(a) => write!(f, "{a}"),
        }
    }
}

impl ItpResolver {
    /// Words for reports: whose vantage point the answers come from.
    pub fn describe(&self) -> String {
        match self {
            ItpResolver::System => "this machine's resolver (/etc/resolv.conf)".to_owned(),
            ItpResolver::Server(a) => format!("the DNS server {a}"),
        }
    }

    /// A resolver that keeps intermediate records (the CNAME chain). Must be called inside a
    /// Tokio runtime.
    pub fn build(&self) -> Result<TokioResolver, String> {
        let builder = match self {
            ItpResolver::System => {
                let mut b = TokioResolver::builder_tokio()
                    .map_err(|e| format!("cannot read the system's resolver configuration: {e}"))?;
                b.options_mut().preserve_intermediates = true;
                b
            }
            ItpResolver::Server(addr) => {
                let conn = |mut c: ConnectionConfig| {
                    c.port = addr.port();
                    c
                };
                let ns = NameServerConfig::new(
                    addr.ip(),
                    true,
                    vec![conn(ConnectionConfig::udp()), conn(ConnectionConfig::tcp())],
                );
                let mut opts = ResolverOpts::default();
                opts.preserve_intermediates = true;
                // Only the named server answers: not /etc/hosts either.
                opts.use_hosts_file = ResolveHosts::Never;
                opts.timeout = Duration::from_secs(3);
                opts.try_tcp_on_error = true;
                TokioResolver::builder_with_config(
                    ResolverConfig::from_name_servers(vec![ns]),
                    TokioRuntimeProvider::default(),
                )
                .with_options(opts)
            }
        };
        builder
            .build()
            .map_err(|e| format!("cannot set up the DNS resolver: {e}"))
    }
}

/// What DNS says about `host`: its CNAME chain, its IPv4 and IPv6 addresses, the shortest TTL.
/// An IP literal is its own address (no query). "No records" for a family is a fact, not an
/// error; other failures (timeouts, SERVFAIL) are kept in `error`.
pub async fn collect(host: &str, resolver: &TokioResolver) -> HostFacts {
    let mut facts = HostFacts::by_name(host);
    facts.looked_up = true;
    if is_ip_literal(&facts.host) {
        if let Ok(ip) = facts.host.parse::<IpAddr>() {
            match ip {
                IpAddr::V4(a) => facts.ipv4.push(a),
                IpAddr::V6(a) => facts.ipv6.push(a),
            }
        }
        return facts;
    }
    // Fully qualified, so no search domain of the machine is tried.
    let fqdn = format!("{}.", facts.host);
    let (a, aaaa) = tokio::join!(
        resolver.lookup(fqdn.as_str(), RecordType::A),
        resolver.lookup(fqdn.as_str(), RecordType::AAAA)
    );
    let mut ttl: Option<u32> = None;
    let mut errors = Vec::new();
    for result in [a, aaaa] {
        match result {
            Ok(lookup) => {
                let answers = lookup.answers();
                let chain = chain_of(&facts.host, answers);
                // The no-records error of one family drops its chain: take the longer one.
                if chain.len() > facts.cname_chain.len() {
                    facts.cname_chain = chain;
                }
                for r in answers {
                    match &r.data {
                        RData::A(a) if !facts.ipv4.contains(&a.0) => facts.ipv4.push(a.0),
                        RData::AAAA(a) if !facts.ipv6.contains(&a.0) => facts.ipv6.push(a.0),
                        _ => {}
                    }
                    ttl = Some(ttl.map_or(r.ttl, |t| t.min(r.ttl)));
                }
            }
            Err(e) if e.is_no_records_found() => {
                if let Some(n) = negative_ttl(&e) {
                    ttl = Some(ttl.map_or(n, |t| t.min(n)));
                }
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    if !facts.has_addresses() {
        if let Some(e) = errors.into_iter().next() {
            facts.error = Some(e);
        } else if facts.cname_chain.is_empty() {
            facts.cname_chain = walk_cnames(&facts.host, resolver).await;
        }
    }
    facts.ttl_secs = ttl;
    facts
}

/// The CNAME targets leading from `host` in `answers`, followed name by name (answers need
/// not be in chain order).
fn chain_of(host: &str, answers: &[hickory_resolver::proto::rr::Record]) -> Vec<String> {
    let mut chain: Vec<String> = Vec::new();
    let mut current = host.to_owned();
    while chain.len() < MAX_CNAME_HOPS {
        let next = answers.iter().find_map(|r| match &r.data {
            RData::CNAME(target) if name_eq(&r.name.to_ascii(), &current) => {
                Some(plain(&target.0.to_ascii()))
            }
            _ => None,
        });
        match next {
            Some(n) if !chain.contains(&n) => {
                current.clone_from(&n);
                chain.push(n);
            }
            _ => break,
        }
    }
    chain
}

/// Where a chain dangles: asks for CNAME records hop by hop.
async fn walk_cnames(host: &str, resolver: &TokioResolver) -> Vec<String> {
    let mut chain: Vec<String> = Vec::new();
    let mut current = host.to_owned();
    while chain.len() < MAX_CNAME_HOPS {
        let Ok(lookup) = resolver
            .lookup(format!("{current}.").as_str(), RecordType::CNAME)
            .await
        else {
            break;
        };
        let hop = chain_of(&current, lookup.answers());
        let Some(next) = hop.into_iter().next() else {
            break;
        };
        if chain.contains(&next) {
            break;
        }
        current.clone_from(&next);
        chain.push(next);
    }
    chain
}

fn negative_ttl(e: &NetError) -> Option<u32> {
    match e {
        NetError::Dns(hickory_resolver::net::DnsError::NoRecordsFound(n)) => n.negative_ttl,
        _ => None,
    }
}

fn plain(name: &str) -> String {
    normalized_host(name).into_owned()
}

fn name_eq(a: &str, b: &str) -> bool {
    plain(a) == plain(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolver_choices_parse_with_clear_errors() {
        assert_eq!("system".parse::<ItpResolver>(), Ok(ItpResolver::System));
        assert_eq!(
            "192.0.2.53".parse::<ItpResolver>(),
            Ok(ItpResolver::Server("192.0.2.53:53".parse().unwrap()))
        );
        assert_eq!(
            "127.0.0.1:5353".parse::<ItpResolver>(),
            Ok(ItpResolver::Server("127.0.0.1:5353".parse().unwrap()))
        );
        assert_eq!(
            "[2001:db8::53]:53".parse::<ItpResolver>(),
            Ok(ItpResolver::Server("[2001:db8::53]:53".parse().unwrap()))
        );
        assert_eq!(
            "2001:db8::53".parse::<ItpResolver>(),
            Ok(ItpResolver::Server("[2001:db8::53]:53".parse().unwrap()))
        );
        for bad in ["dns.example", "127.0.0.1:0", "", "1.2.3.4:x"] {
            let e = bad.parse::<ItpResolver>().unwrap_err();
            assert!(e.contains("\"system\""), "{bad}: {e}");
        }
    }
}
