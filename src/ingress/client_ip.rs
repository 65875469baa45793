//! The visitor's IP: the socket peer, unless that peer is a trusted proxy, in which case the
//! right-most address in the forwarding chain that is not itself a trusted proxy.

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use ipnet::IpNet;

use crate::config::ClientIpHeader;

/// Resolves the client IP. Never fails: a header that says nothing usable leaves the
/// nearest address we can vouch for.
pub fn client_ip(
    peer: IpAddr,
    headers: &HeaderMap,
    trusted: &[IpNet],
    which: ClientIpHeader,
) -> IpAddr {
    let peer = peer.to_canonical();
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    // Walk the chain from the nearest hop outwards; the first hop we do not trust is the one
    // whose claim about the client we cannot check, so it *is* the client as far as we know.
    // An unreadable hop (`unknown`, garbage) ends the walk: what stands left of it was
    // written by someone we cannot vouch for.
    let mut nearest = peer;
    for hop in forwarded_chain(headers, which).into_iter().rev() {
        let Some(ip) = hop else {
            return nearest;
        };
        if !is_trusted(&ip) {
            return ip;
        }
        nearest = ip;
    }
    nearest
}

/// The hops of the configured header, left to right; `None` for an unreadable hop.
fn forwarded_chain(headers: &HeaderMap, which: ClientIpHeader) -> Vec<Option<IpAddr>> {
    let values = |name: &'static str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    match which {
        ClientIpHeader::XForwardedFor => values("x-forwarded-for").map(parse_addr).collect(),
        ClientIpHeader::Forwarded => values("forwarded")
            .map(|element| {
                element.split(';').find_map(|pair| {
                    let (k, v) = pair.split_once('=')?;
                    k.trim()
                        .eq_ignore_ascii_case("for")
                        .then(|| parse_addr(v.trim().trim_matches('"')))
                        .flatten()
                })
            })
            .collect(),
        ClientIpHeader::XRealIp => values("x-real-ip").map(parse_addr).collect(),
    }
}

/// Parses `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]:443`; anything else is None.
fn parse_addr(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some(sa.ip().to_canonical());
    }
    // `[v6]` without a port
    s.strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .and_then(|r| r.parse::<IpAddr>().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        m
    }

    fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
        super::client_ip(peer, headers, trusted, ClientIpHeader::XForwardedFor)
    }

    fn nets(s: &[&str]) -> Vec<IpNet> {
        s.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn untrusted_peer_headers_are_ignored() {
        let ip = client_ip(
            "203.0.113.9".parse().unwrap(),
            &h(&[("x-forwarded-for", "1.1.1.1")]),
            &nets(&["10.0.0.0/8"]),
        );
        assert_eq!(ip.to_string(), "203.0.113.9");
    }

    #[test]
    fn rightmost_untrusted_wins() {
        let ip = client_ip(
            "10.0.0.2".parse().unwrap(),
            &h(&[("x-forwarded-for", "6.6.6.6, 198.51.100.7, 10.0.0.5")]),
            &nets(&["10.0.0.0/8"]),
        );
        assert_eq!(ip.to_string(), "198.51.100.7");
    }

    #[test]
    fn ports_stripped_ipv6_kept_garbage_skipped() {
        let t = nets(&["127.0.0.0/8", "::1/128"]);
        let peer = "127.0.0.1".parse().unwrap();
        let ip = client_ip(peer, &h(&[("x-forwarded-for", "198.51.100.7:5555")]), &t);
        assert_eq!(ip.to_string(), "198.51.100.7");
        let ip = client_ip(peer, &h(&[("x-forwarded-for", "[2001:db8::7]:443")]), &t);
        assert_eq!(ip.to_string(), "2001:db8::7");
        // Garbage left of the first untrusted hop does not matter...
        let ip = client_ip(
            peer,
            &h(&[("x-forwarded-for", "not-an-ip, 2001:db8::8")]),
            &t,
        );
        assert_eq!(ip.to_string(), "2001:db8::8");
        // ...garbage right of it ends the walk at the nearest hop we can vouch for.
        let ip = client_ip(
            peer,
            &h(&[("x-forwarded-for", "2001:db8::8, not-an-ip")]),
            &t,
        );
        assert_eq!(ip.to_string(), "127.0.0.1");
        let ip = client_ip(peer, &h(&[("x-forwarded-for", "%%%, ,")]), &t);
        assert_eq!(ip.to_string(), "127.0.0.1");
    }

    #[test]
    fn forwarded_header() {
        let t = nets(&["127.0.0.0/8"]);
        let peer = "127.0.0.1".parse().unwrap();
        let ip = super::client_ip(
            peer,
            &h(&[(
                "forwarded",
                "for=192.0.2.60;proto=http, for=\"[2001:db8:cafe::17]:4711\"",
            )]),
            &t,
            ClientIpHeader::Forwarded,
        );
        assert_eq!(ip.to_string(), "2001:db8:cafe::17");
    }

    #[test]
    fn ipv4_mapped_peer_is_canonical() {
        let ip = client_ip("::ffff:192.0.2.1".parse().unwrap(), &HeaderMap::new(), &[]);
        assert_eq!(ip.to_string(), "192.0.2.1");
    }
}
