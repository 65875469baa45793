//! WAL checkpoints, mostly on their own thread and connection.
//!
//! SQLite's automatic checkpoint runs inside the COMMIT that crosses the threshold: the
//! writer thread copies ~1000 pages into the database file and fsyncs it while every hit
//! of that group commit waits. Here the writer connection never checkpoints on its own;
//! this thread copies the WAL back in PASSIVE steps, which never block the writer.
//!
//! A WAL is only rewound when it is fully copied back at the start of a write transaction,
//! which a busy writer may never allow; a RESTART checkpoint would force it but holds the
//! writer for as long as the copy takes (hundreds of milliseconds on a slow disk under full
//! load). So when the WAL passes [`WRITER_STEP_FRAMES`], the writer itself takes one PASSIVE
//! step between two commits (after answering the hits of the first): little is left to
//! copy by then, and the next transaction rewinds the WAL.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::Connection;

use super::shared::Shared;
use crate::outbox::config::FsyncMode;

/// How often this thread copies the WAL back.
const EVERY: Duration = Duration::from_millis(250);
/// Frames (4 KiB pages) past which the writer takes a step itself: 16 MiB.
pub(crate) const WRITER_STEP_FRAMES: i64 = 4_096;

/// The running checkpointer; stops (after one last PASSIVE step) when dropped or stopped.
#[derive(Debug)]
pub(crate) struct Checkpointer {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// Why the checkpointer could not start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StartError {
    #[error(transparent)]
    Database(#[from] rusqlite::Error),
    #[error("cannot start the checkpoint thread: {0}")]
    Thread(std::io::Error),
}

impl Checkpointer {
    pub(crate) fn start(
        path: &Path,
        fsync: FsyncMode,
        shared: Arc<Shared>,
    ) -> Result<Checkpointer, StartError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(super::schema::BUSY_TIMEOUT)?;
        // A checkpoint fsyncs the database file exactly when the writer's commits are
        // fsynced: same durability, on another thread.
        let sync = match fsync {
            FsyncMode::Off => "NORMAL",
            FsyncMode::Batch | FsyncMode::Always => "FULL",
        };
        conn.pragma_update(None, "synchronous", sync)?;
        conn.pragma_update(None, "fullfsync", fsync == FsyncMode::Always)?;
        conn.pragma_update(None, "checkpoint_fullfsync", fsync == FsyncMode::Always)?;
        let (stop, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("outbox-checkpoint".into())
            .spawn(move || run(conn, rx, shared))
            .map_err(StartError::Thread)?;
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

fn run(conn: Connection, stop: mpsc::Receiver<()>, shared: Arc<Shared>) {
    let mut warned = false;
    // Anything but a timeout means stopped (or the store is gone).
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(EVERY) {
        match step(&conn) {
            Ok(frames) => {
                shared.wal_frames.store(frames, Ordering::Relaxed);
                warned = false;
            }
            Err(e) if !warned => {
                warned = true;
                tracing::warn!(error = %e, "outbox: WAL checkpoint failed; retrying (the WAL grows until it succeeds)");
            }
            Err(_) => {}
        }
    }
}

/// One PASSIVE step. Returns the frames in the WAL.
pub(crate) fn step(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))
}

/// Called by the writer between commits: a step of its own when the WAL has grown long.
pub(crate) fn writer_step(conn: &Connection, shared: &Shared) {
    if shared.wal_frames.load(Ordering::Relaxed) > WRITER_STEP_FRAMES {
        match step(conn) {
            Ok(frames) => shared.wal_frames.store(frames, Ordering::Relaxed),
            Err(e) => tracing::warn!(error = %e, "outbox: WAL checkpoint failed; retrying"),
        }
    }
}
