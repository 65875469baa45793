//! Will Safari keep the cookies tagrelay sets? WebKit caps every persistent cookie a
//! subresource response sets to 7 days when the responding host is "cloaked": its CNAME chain
//! leaves the site, or (without a CNAME) its address is outside the page's /16 (IPv4) or /64
//! (IPv6). This component checks a deployment against that rule:
//!
//! - [`resolve`]: the facts of a host from DNS (CNAME chain, A, AAAA, TTL);
//! - [`evaluate`]: the rule, one pure function over the facts of a page and a tagging host;
//! - [`render`]: the report of `tagrelay doctor itp`, text or JSON; [`cli`]: the command;
//! - [`monitor`]: the running check, fed by hits, resolving in the background.

pub mod cli;
pub mod evaluate;
pub mod facts;
pub mod monitor;
pub mod render;
pub mod resolve;
#[cfg(test)]
mod tests;

pub use evaluate::{evaluate, PairReport, Severity, Tagging, Verdict};
pub use facts::HostFacts;
pub use monitor::{ItpMonitor, ItpSettings, PairView};
pub use render::Report;
pub use resolve::{collect, ItpResolver};
