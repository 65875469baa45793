//! `tagrelay identity forget --email … | --client-id …`: erases a person's browsing sessions
//! from the stitching store of a config. Safe while the server runs (SQLite WAL; the server's
//! own connection waits for the erase to finish). With the redis backend the CLI erases from
//! the shared store instead (`outbox/store/redis/stitch.rs`).

use std::path::Path;
use std::process::ExitCode;

use clap::Args;

use super::Forget;

#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct ForgetArgs {
    /// The person's email address (hashed before it is looked up; the store holds only hashes)
    #[arg(long)]
    pub email: Option<String>,
    /// A visitor id (FPID) / GA client id, as the debug view and the vendors show it
    #[arg(long)]
    pub client_id: Option<String>,
}

/// Runs `identity forget` on the stitching database `file` (the caller reads it from the
/// config); exit 0 with the number erased, 1 on error.
pub fn forget(file: &Path, args: &ForgetArgs) -> ExitCode {
    let Some(who) = whose(args) else {
        return ExitCode::FAILURE;
    };
    if !file.exists() {
        println!("0 records erased ({} does not exist)", file.display());
        return ExitCode::SUCCESS;
    }
    let erased =
        super::embedded::open_db(file).and_then(|conn| super::embedded::forget(&conn, &who));
    said(erased, &file.display().to_string())
}

/// Whose records the arguments name; `None` (said on stderr) when they name nobody.
pub fn whose(args: &ForgetArgs) -> Option<Forget> {
    match (&args.email, &args.client_id) {
        (Some(e), _) => Some(Forget::Email(e.clone())),
        (None, Some(c)) if !c.trim().is_empty() => Some(Forget::ClientId(c.trim().to_owned())),
        _ => {
            eprintln!(
                "tagrelay identity forget: say whose records: --email ADDRESS or --client-id ID"
            );
            None
        }
    }
}

/// Prints the outcome of an erase in `place`.
pub fn said(result: Result<u64, String>, place: &str) -> ExitCode {
    match result {
        Ok(n) => {
            println!(
                "{n} record{} erased from {place}",
                if n == 1 { "" } else { "s" }
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tagrelay identity forget: {e}");
            ExitCode::FAILURE
        }
    }
}
