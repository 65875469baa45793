//! An authoritative DNS server on a loopback UDP port, in process, serving test zones.
//! Records use documentation addresses only (192.0.2/24, 198.51.100/24, 203.0.113/24,
//! 2001:db8::/32): they are DNS data here and never contacted.

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;

use hickory_server::proto::rr::rdata::{A, AAAA, CNAME, SOA};
use hickory_server::proto::rr::{LowerName, Name, RData, Record};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};
use hickory_server::Server;

/// The zones every test server is authoritative for.
const ZONES: &[&str] = &[
    "example.test",
    "vendor.test",
    "cdn.test",
    "other.test",
    "cloudfront.net",
];

/// Records' TTL: long enough that nothing expires during a test.
pub const TTL: u32 = 300;

pub struct TestDns {
    pub addr: SocketAddr,
    server: Server<Catalog>,
}

impl TestDns {
    /// Serves `records`, one per line: `name TYPE value` with TYPE one of A, AAAA, CNAME.
    /// Blank lines are skipped. Names outside the known zones are a test bug (panic).
    pub async fn start(records: &str) -> TestDns {
        let mut handlers: Vec<(Name, InMemoryZoneHandler)> = ZONES
            .iter()
            .map(|z| {
                let origin = Name::from_str(&format!("{z}.")).unwrap();
                let mut h =
                    InMemoryZoneHandler::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
                let soa = SOA::new(
                    Name::from_str(&format!("ns.{z}.")).unwrap(),
                    Name::from_str(&format!("hostmaster.{z}.")).unwrap(),
                    1,
                    3600,
                    600,
                    86400,
                    60,
                );
                assert!(h.upsert_mut(Record::from_rdata(origin.clone(), TTL, RData::SOA(soa)), 1));
                (origin, h)
            })
            .collect();
        for line in records.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let mut parts = line.split_whitespace();
            let (name, kind, value) = (
                parts.next().unwrap(),
                parts.next().unwrap(),
                parts.next().unwrap(),
            );
            let owner = Name::from_str(&format!("{name}.")).unwrap();
            let data = match kind {
                "A" => RData::A(A(value.parse().unwrap())),
                "AAAA" => RData::AAAA(AAAA(value.parse().unwrap())),
                "CNAME" => RData::CNAME(CNAME(Name::from_str(&format!("{value}.")).unwrap())),
                other => panic!("record type {other} is not served by the test DNS"),
            };
            let (_, zone) = handlers
                .iter_mut()
                .find(|(origin, _)| origin.zone_of(&owner))
                .unwrap_or_else(|| panic!("{name} is in none of the test zones {ZONES:?}"));
            assert!(
                zone.upsert_mut(Record::from_rdata(owner, TTL, data), 1),
                "{line}"
            );
        }
        let mut catalog = Catalog::new();
        for (origin, h) in handlers {
            catalog.upsert(LowerName::new(&origin), vec![Arc::new(h)]);
        }
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let mut server = Server::new(catalog);
        server.register_socket(socket);
        TestDns { addr, server }
    }

    /// `--resolver` / `itp_resolver` value pointing at this server.
    pub fn resolver(&self) -> String {
        self.addr.to_string()
    }

    pub async fn stop(mut self) {
        let _ = self.server.shutdown_gracefully().await;
    }
}
