#![forbid(unsafe_code)]
//! tagrelay: a self-hosted server-side tagging gateway.

pub mod admin;
pub mod app;
pub mod cli;
pub mod clients;
pub mod clock;
pub mod config;
pub mod doctor;
pub mod event;
pub mod ga4_limits;
pub mod identity;
pub mod ingress;
pub mod lifecycle;
pub mod outbox;
pub mod pipeline;
pub mod secret;
pub mod set_cookie;
pub mod stitching;
pub mod tags;
pub mod telemetry;
#[cfg(test)]
pub(crate) mod test_fixtures;
#[cfg(test)]
pub(crate) mod test_metrics;
pub mod text;
pub mod trace;
pub mod typed_table;
pub mod urlenc;

pub use app::{app, AppState, Application};
