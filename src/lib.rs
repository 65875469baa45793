#![forbid(unsafe_code)]
//! tagrelay: a self-hosted server-side tagging gateway.

pub mod clients;
pub mod config;
pub mod event;
pub mod identity;
pub mod outbox;
pub mod pipeline;
pub mod tags;
