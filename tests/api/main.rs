//! The one integration-test binary: real server on port 0, real fake vendors on loopback.

mod ad_platforms;
mod architecture;
mod backend_purchases;
mod browser;
mod browser_ads;
mod browser_ga4;
mod debug_view;
mod delivery;
mod dns;
mod foundation;
mod helpers;
mod itp;
mod lifecycle;
mod more_clients;
mod operations;
mod otel;
mod pipeline;
mod process;
#[path = "../../src/outbox/store/redis/test_server.rs"]
mod redis_server;
mod scale_out;
mod script_proxy;
mod secrets;
