#![forbid(unsafe_code)]
//! tagrelay: a self-hosted server-side tagging gateway.

pub mod admin;
pub mod app;
pub mod cli;
pub mod clients;
pub mod config;
pub mod event;
pub mod ga4_limits;
pub mod identity;
pub mod ingress;
pub mod outbox;
pub mod pipeline;
pub mod tags;
pub mod telemetry;

pub use app::{app, AppState, Application};
