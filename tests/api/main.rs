//! The one integration-test binary: real server on port 0, real fake vendors on loopback.

mod browser;
mod browser_ga4;
mod foundation;
mod helpers;
mod pipeline;
mod process;
mod script_proxy;
