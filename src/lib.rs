#![forbid(unsafe_code)]
//! tagrelay: a self-hosted server-side tagging gateway.

pub mod admin;
pub mod app;
pub mod cli;
pub mod clients;
pub mod config;
pub mod doctor;
pub mod event;
pub mod ga4_limits;
pub mod identity;
pub mod ingress;
pub mod outbox;
pub mod pipeline;
pub mod tags;
pub mod telemetry;
#[cfg(test)]
pub(crate) mod test_metrics;
pub mod urlenc;

pub use app::{app, AppState, Application};
