//! WAL checkpoints on their own thread and connection.
//!
//! SQLite's automatic checkpoint runs inside the COMMIT that crosses the threshold: the
//! writer thread copies ~1000 pages into the database file and fsyncs it while every hit
//! of that group commit waits (2–5 ms on the development machine, the largest part of
//! the p99 at moderate load). Here the writer connection never checkpoints; this thread
//! does it in small PASSIVE steps, which never block the writer. A WAL that is fully
//! copied back is rewound by the writer's next transaction, so it stays small; only if it
//! grows past [`RESTART_FRAMES`] (the writer never left a gap) does this thread force a
//! RESTART, which briefly holds the writer.

use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::Connection;

use crate::config::FsyncMode;

/// How often the WAL is copied back. Records are usually delivered and deleted within a
/// second, so a longer interval copies fewer pages that are about to change again; the
/// WAL file itself is bounded by [`RESTART_FRAMES`].
const EVERY: Duration = Duration::from_secs(1);
/// Frames (4 KiB pages) past which a RESTART checkpoint is forced: 64 MiB.
pub(crate) const RESTART_FRAMES: i64 = 16_384;

/// The running checkpointer; stops (after one last PASSIVE step) when dropped or stopped.
#[derive(Debug)]
pub(crate) struct Checkpointer {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    pub(crate) fn start(path: &Path, fsync: FsyncMode) -> Result<Checkpointer, String> {
        let conn = Connection::open(path).map_err(|e| e.to_string())?;
        conn.busy_timeout(super::sqlite::BUSY_TIMEOUT)
            .map_err(|e| e.to_string())?;
        // A checkpoint fsyncs the database file exactly when the writer's commits are
        // fsynced: same durability, on another thread.
        let sync = match fsync {
            FsyncMode::Off => "NORMAL",
            FsyncMode::Batch | FsyncMode::Always => "FULL",
        };
        conn.pragma_update(None, "synchronous", sync)
            .map_err(|e| e.to_string())?;
        conn.pragma_update(None, "fullfsync", fsync == FsyncMode::Always)
            .map_err(|e| e.to_string())?;
        conn.pragma_update(None, "checkpoint_fullfsync", fsync == FsyncMode::Always)
            .map_err(|e| e.to_string())?;
        let (stop, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("outbox-checkpoint".into())
            .spawn(move || run(conn, rx))
            .map_err(|e| format!("cannot start the checkpoint thread: {e}"))?;
        Ok(Checkpointer {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it (blocking: call from a blocking context).
    pub(crate) fn stop(&mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        // Never join in drop: it may run on an async thread.
        self.stop.take();
    }
}

fn run(conn: Connection, stop: mpsc::Receiver<()>) {
    let mut warned = false;
    // Anything but a timeout means stopped (or the store is gone).
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(EVERY) {
        match step(&conn) {
            Ok(()) => warned = false,
            Err(e) if !warned => {
                warned = true;
                tracing::warn!(error = %e, "outbox: WAL checkpoint failed; retrying (the WAL grows until it succeeds)");
            }
            Err(_) => {}
        }
    }
}

/// One PASSIVE step; a RESTART when the WAL has grown too long.
pub(crate) fn step(conn: &Connection) -> rusqlite::Result<()> {
    let (_, log, _) = checkpoint(conn, "PASSIVE")?;
    if log > RESTART_FRAMES {
        checkpoint(conn, "RESTART")?;
    }
    Ok(())
}

/// (busy, frames in the WAL, frames copied back).
fn checkpoint(conn: &Connection, mode: &str) -> rusqlite::Result<(i64, i64, i64)> {
    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    })
}
