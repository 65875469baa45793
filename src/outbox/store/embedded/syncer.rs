//! Makes hits durable off the writer thread.
//!
//! The writer writes each group of hits' events to the outbox log (and commits SQLite with
//! `synchronous = NORMAL`): the bytes reach the OS, not the disk. It hands the hits of each
//! group here; this thread fsyncs the log file (and the WAL, if a hit's event went to SQLite
//! too) and only then answers them. While one fsync runs, the writer goes on with the hits
//! that arrived meanwhile, and the next fsync covers all of those groups at once: the disk's
//! flush time overlaps the next group's work instead of waiting for it. A hit is answered
//! only by an fsync that began after its group was written, so an answered hit survives a
//! power cut (fsync works on the file, whatever descriptor asks).
//!
//! After a failed fsync no hit can be acknowledged safely: later writes chain onto data that
//! may never reach the disk (and Linux reports a failed write-back once, then calls the pages
//! clean). The store stops taking hits and reports not ready until tagrelay is restarted.

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use super::shared::Shared;
use crate::outbox::EnqueueError;

/// Answers an `enqueue` once its commit is durable.
pub(crate) type Waiter = oneshot::Sender<Result<(), EnqueueError>>;

/// How this thread makes the WAL durable (tests put a controllable one in).
pub(crate) type SyncFn = Box<dyn FnMut() -> io::Result<()> + Send>;

/// The hits of one commit and what holds their events: the outbox log's segment taking
/// appends, and the WAL if the commit wrote some of them to SQLite (see `writer`).
pub(crate) struct Job {
    pub waiters: Vec<Waiter>,
    pub log: Option<Arc<File>>,
    pub wal: bool,
}

/// The running syncer; dropping it answers every hit handed to it (after one last fsync) and
/// joins the thread.
#[derive(Debug)]
pub(crate) struct Syncer {
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Syncer {
    /// Syncs the WAL file `wal` with `fdatasync` (F_FULLFSYNC on Apple platforms, as Rust's
    /// `sync_data` does there). The file's directory entry is already durable: the store was
    /// opened with `synchronous = FULL`, and SQLite's first sync of a new WAL syncs its
    /// directory too.
    pub(crate) fn start(wal: &Path, shared: Arc<Shared>) -> io::Result<Syncer> {
        let file = File::open(wal).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot open `{}` to fsync it: {e}", wal.display()),
            )
        })?;
        Self::with(Box::new(move || file.sync_data()), shared)
    }

    pub(crate) fn with(mut sync: SyncFn, shared: Arc<Shared>) -> io::Result<Syncer> {
        let (tx, rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("outbox-sync".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut waiters = first.waiters;
                    let mut wal = first.wal;
                    let mut logs: Vec<Arc<File>> = first.log.into_iter().collect();
                    // Every commit handed over so far has returned: one fsync covers them all.
                    while let Ok(more) = rx.try_recv() {
                        waiters.extend(more.waiters);
                        wal |= more.wal;
                        if let Some(f) = more.log {
                            // A rotation synced the segment before it (see `log`); a group
                            // after one still syncs both, which costs nothing extra.
                            if !logs.iter().any(|l| Arc::ptr_eq(l, &f)) {
                                logs.push(f);
                            }
                        }
                    }
                    // After a failed fsync nothing is acknowledged (see the module docs).
                    if shared.failed.get().is_none() {
                        shared.syncing.store(true, Ordering::Release);
                        let started = std::time::Instant::now();
                        let mut result = Ok(());
                        for f in &logs {
                            result = result.and_then(|()| f.sync_data());
                        }
                        if wal {
                            result = result.and_then(|()| sync());
                        }
                        #[cfg(test)]
                        if shared.fail_fsync.swap(false, Ordering::AcqRel) {
                            result = Err(io::Error::other("injected fsync failure (EIO)"));
                        }
                        shared.syncing.store(false, Ordering::Release);
                        metrics::histogram!("tagrelay_outbox_fsync_duration_seconds")
                            .record(started.elapsed().as_secs_f64());
                        shared.fsyncs.fetch_add(1, Ordering::Release);
                        metrics::counter!("tagrelay_outbox_fsyncs_total").increment(1);
                        if let Err(e) = result {
                            tracing::error!(error = %e, hits = waiters.len(), "outbox: fsync of the outbox log or WAL failed; hits are refused and the server reports not ready until it is restarted");
                            shared.stop_taking_hits(format!(
                                "fsync of the outbox failed ({e}); restart tagrelay"
                            ));
                        }
                    }
                    for w in waiters {
                        let _ = w.send(match shared.failed.get() {
                            None => Ok(()),
                            // Refused like every later hit (503, logged once above).
                            Some(msg) => Err(EnqueueError::Failed(msg.clone())),
                        });
                    }
                }
            })?;
        Ok(Syncer {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Hands over the hits of a commit that has returned, whose events are in the WAL.
    #[cfg(test)]
    pub(crate) fn submit(&self, waiters: Vec<Waiter>) {
        self.submit_job(Job {
            waiters,
            log: None,
            wal: true,
        });
    }

    /// Hands over the hits of a commit that has returned.
    pub(crate) fn submit_job(&self, job: Job) {
        let Some(tx) = &self.tx else { return };
        if let Err(mpsc::SendError(job)) = tx.send(job) {
            // The thread is gone (it never panics on its own): nothing will fsync these.
            for w in job.waiters {
                let _ = w.send(Err(EnqueueError::Io(
                    "the outbox sync thread stopped".into(),
                )));
            }
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;

    /// A sync function that blocks until the test lets it go, counting calls.
    fn gated() -> (SyncFn, mpsc::Sender<io::Result<()>>, Arc<Mutex<usize>>) {
        let (go, gate) = mpsc::channel::<io::Result<()>>();
        let calls = Arc::new(Mutex::new(0));
        let c = calls.clone();
        let f: SyncFn = Box::new(move || {
            *c.lock().unwrap() += 1;
            gate.recv().unwrap_or(Ok(()))
        });
        (f, go, calls)
    }

    fn waiter() -> (Waiter, oneshot::Receiver<Result<(), EnqueueError>>) {
        oneshot::channel()
    }

    fn wait_for(mut cond: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(std::time::Instant::now() < deadline, "timed out");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn hits_are_answered_only_after_an_fsync_that_began_after_their_commit() {
        let shared = Arc::new(Shared::default());
        let (f, go, calls) = gated();
        let syncer = Syncer::with(f, shared.clone()).unwrap();

        let (a, mut ra) = waiter();
        syncer.submit(vec![a]);
        wait_for(|| *calls.lock().unwrap() == 1);
        // Handed over while the first fsync runs: that fsync may have begun before their
        // commit returned, so they wait for the next one.
        let (b, mut rb) = waiter();
        let (c, mut rc) = waiter();
        syncer.submit(vec![b]);
        syncer.submit(vec![c]);
        std::thread::sleep(Duration::from_millis(20));
        assert!(ra.try_recv().is_err(), "answered before its fsync returned");

        go.send(Ok(())).unwrap();
        wait_for(|| *calls.lock().unwrap() == 2);
        assert!(matches!(ra.try_recv(), Ok(Ok(()))));
        assert!(rb.try_recv().is_err() && rc.try_recv().is_err());

        // One fsync covers both later commits.
        go.send(Ok(())).unwrap();
        drop(syncer);
        assert!(matches!(rb.try_recv(), Ok(Ok(()))));
        assert!(matches!(rc.try_recv(), Ok(Ok(()))));
        assert_eq!(*calls.lock().unwrap(), 2);
        assert_eq!(shared.fsyncs.load(Ordering::Acquire), 2);
    }

    #[test]
    fn after_a_failed_fsync_no_hit_is_acknowledged_and_the_store_reports_not_ready() {
        let shared = Arc::new(Shared::default());
        shared.open.store(true, Ordering::Release);
        let (f, go, calls) = gated();
        let syncer = Syncer::with(f, shared.clone()).unwrap();
        let (a, ra) = waiter();
        syncer.submit(vec![a]);
        wait_for(|| *calls.lock().unwrap() == 1);
        go.send(Err(io::Error::other("EIO"))).unwrap();
        match ra.blocking_recv() {
            Ok(Err(EnqueueError::Failed(msg))) => assert!(msg.contains("fsync"), "{msg}"),
            other => panic!("{other:?}"),
        }
        assert!(!shared.open.load(Ordering::Acquire), "still reports ready");
        assert!(shared.failed.get().is_some_and(|m| m.contains("restart")));
        // A later commit's frames may chain onto the lost ones: refused without another try.
        let (b, rb) = waiter();
        syncer.submit(vec![b]);
        assert!(matches!(
            rb.blocking_recv(),
            Ok(Err(EnqueueError::Failed(_)))
        ));
        assert_eq!(*calls.lock().unwrap(), 1);
    }

    #[test]
    fn dropping_the_syncer_answers_everything_handed_to_it() {
        let shared = Arc::new(Shared::default());
        let syncer = Syncer::with(Box::new(|| Ok(())), shared).unwrap();
        let rxs: Vec<_> = (0..10)
            .map(|_| {
                let (w, r) = waiter();
                syncer.submit(vec![w]);
                r
            })
            .collect();
        drop(syncer);
        for mut r in rxs {
            assert!(matches!(r.try_recv(), Ok(Ok(()))));
        }
    }
}
