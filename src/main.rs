#![forbid(unsafe_code)]
//! `tagrelay`: serve (default), check, reload, drain, doctor, identity, outbox tools.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tagrelay::cli;

/// Every hit allocates a few dozen small, short-lived objects across the runtime and the
/// outbox writer thread; glibc's malloc spent far more of a loaded core on them than
/// mimalloc does (docs/performance-log.md). Built without transparent huge pages
/// (Cargo.toml), which filled the peak RSS with half-empty pages.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "tagrelay",
    version = tagrelay::telemetry::build_info::LONG_VERSION,
    about = "Server-side tagging gateway: GA4 hits in, GA4 + Meta CAPI out, nothing lost"
)]
struct Cli {
    /// Config file (default: $TAGRELAY_CONFIG, else config/tagrelay.toml, else the embedded default)
    #[arg(long, global = true, env = "TAGRELAY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default)
    Serve,
    /// Validate the config without opening sockets or the network
    Check,
    /// Inspect and repair the outbox of this config (safe while the server runs)
    Outbox {
        #[command(subcommand)]
        command: OutboxCommand,
    },
    /// Check a deployment before and after going live
    Doctor {
        #[command(subcommand)]
        command: DoctorCommand,
    },
    /// Make the running server reload its config (through its admin listener; as SIGHUP)
    Reload {
        /// The admin listener's base URL instead of the config's `server.admin_listen`
        #[arg(long)]
        url: Option<String>,
    },
    /// Make the running server stop taking hits, deliver what its outbox holds, and stop
    /// when it owes nothing (or at the time limit). For scale-downs and rollbacks
    Drain {
        /// Stop after this many seconds even with deliveries pending (default:
        /// server.drain_timeout_ms); what is left stays in the outbox
        #[arg(long)]
        timeout_secs: Option<u64>,
        /// Return only once the server has stopped
        #[arg(long)]
        wait: bool,
        /// The admin listener's base URL instead of the config's `server.admin_listen`
        #[arg(long)]
        url: Option<String>,
    },
    /// Visitors' records kept for backend orders (stitching)
    Identity {
        #[command(subcommand)]
        command: IdentityCommand,
    },
    /// Exit 0 when the URL answers 2xx (for container HEALTHCHECKs; no curl needed)
    Healthcheck {
        /// Probe this URL instead of `/healthz` on the config's `server.listen` (an
        /// unspecified address such as 0.0.0.0 is probed on loopback)
        #[arg(long)]
        url: Option<String>,
    },
}

#[derive(Subcommand)]
enum DoctorCommand {
    /// Will Safari keep tagrelay's cookies? Checks DNS against WebKit's 7-day cap on cookies
    /// from hosts that CNAME out of the site or sit outside its address ranges. Exit 0 ok,
    /// 1 capped or error (or warning with --fail-on warn), 2 the check could not run
    Itp(tagrelay::doctor::itp::cli::ItpArgs),
}

#[derive(Subcommand)]
enum IdentityCommand {
    /// Erase a person's browsing sessions from the stitching store (safe while the server runs)
    Forget(tagrelay::stitching::cli::ForgetArgs),
}

#[derive(Subcommand)]
enum OutboxCommand {
    /// Pending records per tag, oldest age, dead letters
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// List dead-lettered events with their reasons
    DeadLetters {
        #[arg(long)]
        tag: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Move dead letters back to pending so they are delivered again
    Replay {
        /// Only this tag's dead letters
        #[arg(long, conflicts_with = "all")]
        tag: Option<String>,
        /// Every dead letter of every tag
        #[arg(long)]
        all: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let path = cli.config.as_deref();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => cli::serve(path),
        Command::Check => cli::check(path),
        Command::Healthcheck { url } => cli::healthcheck(path, url.as_deref()),
        Command::Reload { url } => cli::reload(path, url.as_deref()),
        Command::Drain {
            timeout_secs,
            wait,
            url,
        } => cli::drain(path, url.as_deref(), timeout_secs, wait),
        Command::Identity { command } => match command {
            IdentityCommand::Forget(args) => cli::identity_forget(path, &args),
        },
        Command::Doctor { command } => match command {
            DoctorCommand::Itp(args) => cli::doctor_itp(path, &args),
        },
        Command::Outbox { command } => match command {
            OutboxCommand::Stats { json } => cli::outbox_stats(path, json),
            OutboxCommand::DeadLetters { tag, limit, json } => {
                cli::outbox_dead_letters(path, tag.as_deref(), limit, json)
            }
            OutboxCommand::Replay { tag, all } => cli::outbox_replay(path, tag.as_deref(), all),
        },
    }
}
