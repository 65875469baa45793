//! The writer's side of the outbox log (see `log`): frames of the commit being built, where
//! each written group starts, log rows also copied into SQLite, and releasing segments no
//! tag needs any more.
//!
//! Rows from the log's first segment on ([`LogState::start_row`]) are read from the log; rows
//! below it from SQLite's `events`: a store written before the log, rows copied in at open,
//! and rows copied in before their segment was released. A log row is copied into `events`
//! only when something in SQLite must refer to it: a delivery row (a failure, a lease given
//! back or ended, a close), a dead letter, or a delivery still out when its segment goes.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::{mpsc, Arc};

use super::fresh::FreshSet;
use super::log::{self, Frame, Log, Pos};

const INDEX_STEP: u64 = 64 << 10;

pub(crate) struct LogState {
    pub log: Log,
    pub first_row: i64,
    /// `(first row of a written group, where its first frame starts)`, oldest first, at
    /// least `INDEX_STEP` apart: finds a row's frame with a short read.
    index: VecDeque<(i64, Pos)>,
    /// Frames of the commit being built, written by [`LogState::flush`] in one `pwrite`.
    buf: Vec<u8>,
    buf_first: Option<i64>,
    /// Rows handed out before their frame was written, with their frame's offset in `buf`.
    unplaced: Vec<(i64, u64)>,
    /// Log rows also in `events`.
    pub copied: HashSet<i64>,
    /// Per lagging tag: the row its scan goes on from, and where that row's frame starts.
    resume: HashMap<Arc<str>, (i64, Pos)>,
    /// The WAL, fsynced before a segment is released: rows copied out of it must be durable
    /// first.
    wal: PathBuf,
    deleter: Option<Deleter>,
}

impl LogState {
    pub fn new(log: Log, first_row: i64, wal: PathBuf) -> LogState {
        LogState {
            log,
            first_row,
            index: VecDeque::new(),
            buf: Vec::with_capacity(1 << 16),
            buf_first: None,
            unplaced: Vec::new(),
            copied: HashSet::new(),
            resume: HashMap::new(),
            wal,
            deleter: None,
        }
    }

    /// Adds an event's frame to the commit being built; returns its offset there.
    pub fn push(
        &mut self,
        row: i64,
        enqueued_ms: i64,
        tags: &[u8],
        event_id: &str,
        payload: &[u8],
    ) -> io::Result<u64> {
        let off = self.buf.len() as u64;
        if let Err(e) = log::encode_parts(row, enqueued_ms, tags, event_id, payload, &mut self.buf)
        {
            self.buf.truncate(off as usize);
            return Err(e);
        }
        self.buf_first.get_or_insert(row);
        Ok(off)
    }

    /// `row`, handed out from this commit, has its frame at `off` in the commit's frames.
    pub fn unplaced(&mut self, row: i64, off: u64) {
        self.unplaced.push((row, off));
    }

    #[cfg(test)]
    pub fn has_unwritten(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Writes the commit's frames (not yet durable: the syncer makes them so) and tells
    /// `fresh` where the ones handed out are.
    pub fn flush(&mut self, fresh: &mut FreshSet) -> io::Result<()> {
        let Some(first) = self.buf_first.take() else {
            return Ok(());
        };
        let written = self.log.append(&self.buf, first);
        self.buf.clear();
        let pos = match written {
            Ok(pos) => pos,
            Err(e) => {
                self.unplaced.clear();
                return Err(e);
            }
        };
        // One entry per `INDEX_STEP` bytes at most: finding a row reads at most that much
        // past its group's start, and the index stays small while a lagging tag holds many
        // segments.
        let near = self
            .index
            .back()
            .is_some_and(|&(_, p)| p.segment == pos.segment && pos.offset < p.offset + INDEX_STEP);
        if !near {
            self.index.push_back((first, pos));
        }
        for (row, off) in self.unplaced.drain(..) {
            fresh.place(
                row,
                Pos {
                    segment: pos.segment,
                    offset: pos.offset + off,
                },
            );
        }
        Ok(())
    }

    /// After a failed commit: its frames are not written (those written already stay, and
    /// are delivered: at-least-once).
    pub fn discard(&mut self) {
        self.buf.clear();
        self.buf_first = None;
        self.unplaced.clear();
        self.resume.clear();
    }

    /// Rows below this are read from SQLite (`events`): written before the log (a store of an
    /// older version), copied in at open, or copied in before their segment was released.
    /// Rows from it on are read from the log. Call after [`LogState::flush`].
    pub fn start_row(&self) -> i64 {
        self.log.start().map_or(i64::MAX, |p| p.segment)
    }

    /// A failed fsync of the log at a rotation, once (see `Log`).
    pub fn take_sync_failure(&mut self) -> Option<String> {
        self.log.take_sync_failure()
    }

    /// Sets the gauges of the log's size on disk (what a lagging tag holds).
    pub fn report_size(&self) {
        let (bytes, files) = self.log.size();
        metrics::gauge!("tagrelay_outbox_log_bytes").set(bytes as f64);
        metrics::gauge!("tagrelay_outbox_log_files").set(files as f64);
    }

    /// The segment taking appends, for the syncer.
    pub fn current_file(&self) -> Option<Arc<File>> {
        self.log.current_file()
    }

    /// Where to start reading to find `row`: the start of its group (of the last indexed one
    /// for a row past them all), or of the log's first group for a row before it. `None`:
    /// nothing written since open.
    pub fn locate(&self, row: i64) -> Option<Pos> {
        let i = self.index.partition_point(|&(first, _)| first <= row);
        match i {
            0 => self.index.front().map(|&(_, p)| p),
            _ => self.index.get(i - 1).map(|&(_, p)| p),
        }
    }

    /// The first indexed group starting after `pos`: where a reader goes on past a damaged
    /// stretch.
    pub fn entry_after(&self, pos: Pos) -> Option<(i64, Pos)> {
        self.index.iter().find(|&&(_, p)| p > pos).copied()
    }

    /// The frame of `row` (`at`: where it starts, if known).
    pub fn frame(&self, row: i64, at: Option<Pos>) -> io::Result<Option<Frame>> {
        if let Some(at) = at {
            if let Some((_, f)) = self.log.read(at, 1)?.0.into_iter().next() {
                if f.row == row {
                    return Ok(Some(f));
                }
            }
        }
        for f in self.frames_from(row) {
            let f = f?;
            if f.row >= row {
                return Ok((f.row == row).then_some(f));
            }
        }
        Ok(None)
    }

    /// Frames from the group `row` is in (earlier rows of that group included), in order.
    pub fn frames_from(&self, row: i64) -> log::Frames<'_> {
        // `None` only for a log with nothing in it (every file's first group is indexed).
        self.log.frames(self.locate(row))
    }

    /// Whether `row` is in `events`: below the log, or copied in.
    pub fn in_events(&self, row: i64) -> bool {
        row < self.first_row || self.copied.contains(&row)
    }

    pub fn read(&self, pos: Pos, max: usize) -> io::Result<(Vec<(Pos, Frame)>, Pos)> {
        self.log.read(pos, max)
    }

    /// Where `tag`'s scan goes on from, if it stopped at `row`.
    pub fn resume_at(&self, tag: &str, row: i64) -> Option<Pos> {
        self.resume
            .get(tag)
            .filter(|&&(r, _)| r == row)
            .map(|&(_, p)| p)
    }

    pub fn set_resume(&mut self, tag: &Arc<str>, at: Option<(i64, Pos)>) {
        match at {
            Some(at) => {
                self.resume.insert(tag.clone(), at);
            }
            None => {
                self.resume.remove(tag);
            }
        }
    }

    /// The row below which segments could go if nothing out needed them (`None`: no segment
    /// would go): every tag has read past it (`lowest_lag`, see `FreshSet::lowest_lag`).
    pub fn release_bound(&self, lowest_lag: i64) -> Option<i64> {
        self.log.releasable(lowest_lag).then_some(lowest_lag)
    }

    /// Takes the segments holding only rows below `bound` out of the log and has them deleted
    /// on a thread of its own, after an fsync of the WAL makes the rows copied out of them
    /// durable (deliveries still out there were copied by the caller, in the commit just
    /// made). Both took milliseconds on the writer thread, for every log file, which put a
    /// stall in front of every hit of that commit.
    pub fn release(&mut self, bound: i64) {
        let gone = self.log.detach_below(bound);
        if gone.is_empty() {
            return;
        }
        if let Some(start) = self.log.start() {
            while self
                .index
                .front()
                .is_some_and(|&(_, p)| p.segment < start.segment)
            {
                self.index.pop_front();
            }
            self.resume.retain(|_, (_, p)| p.segment >= start.segment);
        }
        if self.deleter.is_none() {
            self.deleter = Deleter::start(self.wal.clone());
        }
        let gone = match self.deleter.as_ref().and_then(|d| d.tx.as_ref()) {
            Some(tx) => match tx.send(gone) {
                Ok(()) => return,
                Err(mpsc::SendError(gone)) => gone,
            },
            None => gone,
        };
        // No thread: here, then.
        delete(&self.wal, gone);
    }
}

/// The thread deleting released segments.
struct Deleter {
    tx: Option<mpsc::Sender<Vec<PathBuf>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Deleter {
    fn start(wal: PathBuf) -> Option<Deleter> {
        let (tx, rx) = mpsc::channel::<Vec<PathBuf>>();
        let thread = std::thread::Builder::new()
            .name("outbox-log-release".into())
            .spawn(move || {
                while let Ok(mut gone) = rx.recv() {
                    while let Ok(more) = rx.try_recv() {
                        gone.extend(more);
                    }
                    delete(&wal, gone);
                }
            })
            .ok()?;
        Some(Deleter {
            tx: Some(tx),
            thread: Some(thread),
        })
    }
}

impl Drop for Deleter {
    fn drop(&mut self) {
        // Closing the channel ends the thread once it has deleted what it was given.
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Fsyncs the WAL, then deletes `gone`. A file left behind (the fsync or a delete failed) is
/// found again at the next start, which copies in only what some tag still owes from it.
fn delete(wal: &std::path::Path, gone: Vec<PathBuf>) {
    if let Err(e) = File::open(wal).and_then(|f| f.sync_data()) {
        tracing::warn!(error = %e, "outbox: could not fsync the WAL before deleting log files; they stay until the next start");
        return;
    }
    for path in gone {
        match std::fs::remove_file(&path) {
            Ok(()) => {
                tracing::debug!(file = %path.display(), "outbox: deleted a log file every tag has read past")
            }
            Err(e) => {
                tracing::warn!(error = %e, file = %path.display(), "outbox: could not delete a log file every tag has read past; it stays until the next start")
            }
        }
    }
}
