//! An append-only log of events, in segment files, for first deliveries.
//!
//! Why: storing each event as a SQLite row (insert, WAL frames, checkpoint copy, delete, and
//! the partly filled pages every commit rewrites) was most of the store's CPU (see
//! docs/performance-log.md). SQLite stays for what is rare: deliveries that failed, dead
//! letters and tags' positions.
//!
//! Layout: `<dir>/<first row, 20 digits>.seg`, files appended to until they pass `capacity`
//! bytes (`[outbox] log_segment_bytes`), then the next one is started. A segment is deleted
//! once every tag has passed its last row (see `log_state`). A frame:
//!
//! | bytes | field |
//! |---|---|
//! | 4 | length of what follows the checksum (LE); 0 marks the end of the written part |
//! | 4 | CRC32 of what follows the checksum |
//! | 8 | row id (LE) |
//! | 8 | enqueue time, ms since the epoch (LE) |
//! | 2 + n | the tags the event owes a first delivery to (the `fresh` column's JSON) |
//! | 2 + n | event id |
//! | rest | payload |
//!
//! Plain appends, not files zero-filled in advance: an fdatasync of an append also commits
//! ext4's journal, but filling the next file with zeros doubled the bytes written and its
//! flush held the hits' fsyncs up behind it (docs/performance-log.md).
//!
//! At open, a segment's written part ends at the first frame that is empty, runs past the
//! file or fails its checksum: what a crash left half-written was never acknowledged (a hit
//! is answered only after the fsync that covers its frames). A segment before the last that
//! ends early is damaged, not torn (see [`Log::remove_all`]). After an open, appends go to a
//! new segment, so a torn tail is never written over, and frames are read in row order
//! across segments. Inside the written part, a frame that fails its checksum is an error
//! for the reader, at that frame.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

/// Bytes before a frame's body: length and checksum.
const HEAD: usize = 8;
/// Fixed part of a frame's body: row and enqueue time.
const FIXED: usize = 16;

/// One event as the log keeps it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Frame {
    pub row: i64,
    pub enqueued_ms: i64,
    /// The `fresh` column: a JSON array of tag names.
    pub tags: Bytes,
    pub event_id: String,
    pub payload: Bytes,
}

/// Where a frame starts: its segment's first row (the segment's name) and its byte offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Pos {
    pub segment: i64,
    pub offset: u64,
}

/// Appends `frame` to `out`. Fails if a field is too long for its length prefix.
#[cfg(test)]
pub(crate) fn encode(frame: &Frame, out: &mut Vec<u8>) -> io::Result<()> {
    encode_parts(
        frame.row,
        frame.enqueued_ms,
        &frame.tags,
        &frame.event_id,
        &frame.payload,
        out,
    )
}

/// Appends the frame of one event to `out` (the writer's way: from borrowed parts, no
/// `Frame` built). Fails if a field is too long for its length prefix.
pub(crate) fn encode_parts(
    row: i64,
    enqueued_ms: i64,
    tags: &[u8],
    event_id: &str,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> io::Result<()> {
    let tags_len = u16::try_from(tags.len()).map_err(|_| too_long("tag list"))?;
    let id = u16::try_from(event_id.len()).map_err(|_| too_long("event id"))?;
    let body = FIXED + 2 + tags.len() + 2 + event_id.len() + payload.len();
    let len = u32::try_from(body).map_err(|_| too_long("event"))?;
    let start = out.len();
    out.reserve(HEAD + body);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&row.to_le_bytes());
    out.extend_from_slice(&enqueued_ms.to_le_bytes());
    out.extend_from_slice(&tags_len.to_le_bytes());
    out.extend_from_slice(tags);
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(event_id.as_bytes());
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out[start + HEAD..]);
    out[start + 4..start + HEAD].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

impl Frame {
    /// Its size in the log: where the next frame starts.
    pub(crate) fn encoded_len(&self) -> u64 {
        (HEAD + FIXED + 2 + self.tags.len() + 2 + self.event_id.len() + self.payload.len()) as u64
    }

    /// The tags it owes first deliveries to (`None`: unreadable, never written so by us).
    pub(crate) fn tag_list(&self) -> Option<Vec<Arc<str>>> {
        std::str::from_utf8(&self.tags)
            .ok()
            .and_then(|c| parse_column(Some(c)))
    }
}

/// Frames in row order from a position on (see [`Log::frames`]); an error ends it.
pub(crate) struct Frames<'a> {
    log: &'a Log,
    pos: Option<Pos>,
    read: std::vec::IntoIter<(Pos, Frame)>,
}

impl Iterator for Frames<'_> {
    type Item = io::Result<Frame>;

    fn next(&mut self) -> Option<io::Result<Frame>> {
        loop {
            if let Some((_, f)) = self.read.next() {
                return Some(Ok(f));
            }
            let pos = self.pos?;
            match self.log.read(pos, 256) {
                Ok((frames, next)) if !frames.is_empty() => {
                    self.pos = Some(next);
                    self.read = frames.into_iter();
                }
                Ok(_) => {
                    self.pos = None;
                    return None;
                }
                Err(e) => {
                    self.pos = None;
                    return Some(Err(e));
                }
            }
        }
    }
}

fn too_long(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{what} too long for the outbox log"),
    )
}

/// The frame at the start of `buf` and its encoded size, or `None` at the end of the
/// written part (zeros, a torn or damaged frame, or too few bytes to tell).
pub(crate) fn decode(buf: &[u8]) -> Option<(Frame, usize)> {
    let len = u32::from_le_bytes(buf.get(..4)?.try_into().ok()?) as usize;
    if len < FIXED + 4 {
        return None;
    }
    let crc = u32::from_le_bytes(buf.get(4..HEAD)?.try_into().ok()?);
    let body = buf.get(HEAD..HEAD + len)?;
    if crc32fast::hash(body) != crc {
        return None;
    }
    let row = i64::from_le_bytes(body.get(..8)?.try_into().ok()?);
    let enqueued_ms = i64::from_le_bytes(body.get(8..16)?.try_into().ok()?);
    let mut at = FIXED;
    let mut field = || -> Option<&[u8]> {
        let n = u16::from_le_bytes(body.get(at..at + 2)?.try_into().ok()?) as usize;
        let f = body.get(at + 2..at + 2 + n)?;
        at += 2 + n;
        Some(f)
    };
    let tags = Bytes::copy_from_slice(field()?);
    let event_id = String::from_utf8(field()?.to_vec()).ok()?;
    let payload = Bytes::copy_from_slice(body.get(at..)?);
    Some((
        Frame {
            row,
            enqueued_ms,
            tags,
            event_id,
            payload,
        },
        HEAD + len,
    ))
}

#[derive(Debug)]
struct Segment {
    first_row: i64,
    path: PathBuf,
    /// Shared with the syncer, which fsyncs the segment taking appends on its own thread.
    file: Arc<File>,
    /// End of the written part.
    len: u64,
    /// Where appends stop for this segment (`capacity`, or a larger group's size); for
    /// segments found at open, their file's length.
    size: u64,
}

/// The log: segments in row order, the last one taking appends.
#[derive(Debug)]
pub(crate) struct Log {
    dir: PathBuf,
    capacity: u64,
    segments: Vec<Segment>,
    /// Segments found at open take no more frames: a torn tail is never written over.
    sealed: bool,
    /// A failed fsync of the directory at a rotation: the new file's name may not survive a
    /// power cut, so no hit in it may be acknowledged. The writer stops the store.
    sync_failed: Option<String>,
    /// Read buffer, kept: zeroing a fresh one for every read was a tenth of the writer's
    /// instructions (callgrind).
    scratch: std::cell::RefCell<Vec<u8>>,
}

impl Log {
    /// Opens the log in `dir` (created if missing) and finds where each segment's written part
    /// ends. Appends go to a new segment, started at `next_row` by the first append.
    pub(crate) fn open(dir: &Path, capacity: u64) -> io::Result<Log> {
        fs::create_dir_all(dir)?;
        Self::open_with(dir, capacity, true)
    }

    /// Opens the log in `dir` for reading only (the CLI, while a server may be writing it).
    pub(crate) fn open_read_only(dir: &Path) -> io::Result<Log> {
        Self::open_with(dir, 0, false)
    }

    fn open_with(dir: &Path, capacity: u64, write: bool) -> io::Result<Log> {
        let mut segments = Vec::new();
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            let Some(first_row) = segment_row(&path) else {
                continue;
            };
            let file = OpenOptions::new().read(true).write(write).open(&path)?;
            let size = file.metadata()?.len();
            segments.push(Segment {
                first_row,
                path,
                file: Arc::new(file),
                len: 0,
                size,
            });
        }
        segments.sort_by_key(|s| s.first_row);
        let sealed = !segments.is_empty();
        let mut log = Log {
            dir: dir.to_path_buf(),
            capacity,
            segments,
            sealed,
            sync_failed: None,
            scratch: Default::default(),
        };
        for i in 0..log.segments.len() {
            let end = log.scan_end(i)?;
            if let Some(s) = log.segments.get_mut(i) {
                s.len = end;
            }
        }
        Ok(log)
    }

    /// The end of segment `i`'s written part: the offset of its first invalid frame.
    fn scan_end(&self, i: usize) -> io::Result<u64> {
        let Some(seg) = self.segments.get(i) else {
            return Ok(0);
        };
        let mut pos = 0u64;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = read_some(&seg.file, &mut buf, pos, seg.size)?;
            let got = buf.get(..n).unwrap_or_default();
            let mut at = 0usize;
            while let Some((_, size)) = got.get(at..).and_then(decode) {
                at += size;
            }
            if at == 0 {
                // A frame larger than the buffer is read whole; anything else is the end.
                let need = first_len(got).saturating_add(HEAD);
                if need > n && n == buf.len() && pos + need as u64 <= seg.size {
                    buf.resize(need, 0);
                    continue;
                }
                return Ok(pos);
            }
            pos += at as u64;
        }
    }

    /// Appends encoded frames (`frames`, whose first row is `first_row`), starting a new
    /// segment when the current one cannot take them. Returns where they start. The frames
    /// are written, not yet durable: [`Log::sync`] makes them so.
    pub(crate) fn append(&mut self, frames: &[u8], first_row: i64) -> io::Result<Pos> {
        let fits = !self.sealed
            && self
                .segments
                .last()
                .is_some_and(|s| s.len + frames.len() as u64 <= s.size);
        if !fits {
            self.start_segment(first_row, frames.len() as u64)?;
        }
        let seg = self
            .segments
            .last_mut()
            .ok_or_else(|| io::Error::other("outbox log has no segment"))?;
        if let Err(e) = seg.file.write_all_at(frames, seg.len) {
            // Part of the group may be in the file: cut it off, so that the file ends where
            // its records do (a longer file reads as damaged at the next start).
            let _ = seg.file.set_len(seg.len);
            return Err(e);
        }
        let pos = Pos {
            segment: seg.first_row,
            offset: seg.len,
        };
        seg.len += frames.len() as u64;
        Ok(pos)
    }

    /// A new segment named `first_row`, for at least `need` bytes. The current one is not
    /// fsynced here: every group in it went to the syncer with that file, which fsyncs it
    /// before answering the group's hits. (An fsync here could take a write-back error that
    /// Linux reports once per file, and the syncer's would then succeed over lost pages.)
    fn start_segment(&mut self, first_row: i64, need: u64) -> io::Result<()> {
        let size = self.capacity.max(need);
        if let Some(last) = self.segments.last_mut() {
            if last.len == 0 && last.first_row <= first_row {
                // Started and never written to (a crash right after a rotation): reuse it.
                last.size = size;
                self.sealed = false;
                return Ok(());
            }
        }
        let path = self.dir.join(format!("{first_row:020}.seg"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        // The new name must survive a power cut before a frame in it is acknowledged.
        if let Err(e) = File::open(&self.dir).and_then(|d| d.sync_all()) {
            self.sync_failed = Some(e.to_string());
            return Err(e);
        }
        self.segments.push(Segment {
            first_row,
            path,
            file: Arc::new(file),
            len: 0,
            size,
        });
        self.sealed = false;
        Ok(())
    }

    /// Makes every appended frame durable (the server's syncer does it on its own thread).
    #[cfg(test)]
    pub(crate) fn sync(&self) -> io::Result<()> {
        match self.segments.last() {
            Some(s) => s.file.sync_data(),
            None => Ok(()),
        }
    }

    /// A handle the syncer can fsync on its own thread: the segment taking appends.
    pub(crate) fn current_file(&self) -> Option<Arc<File>> {
        self.segments.last().map(|s| s.file.clone())
    }

    /// Up to `max` frames from `pos` on, in row order, each with where it starts, and where
    /// the next read starts.
    pub(crate) fn read(&self, pos: Pos, max: usize) -> io::Result<(Vec<(Pos, Frame)>, Pos)> {
        let mut out = Vec::new();
        let mut pos = pos;
        let mut scratch = self.scratch.borrow_mut();
        while out.len() < max {
            let Some(i) = self
                .segments
                .iter()
                .position(|s| s.first_row == pos.segment)
            else {
                break;
            };
            let Some(seg) = self.segments.get(i) else {
                break;
            };
            if pos.offset >= seg.len {
                match self.segments.get(i + 1) {
                    Some(next) => {
                        pos = Pos {
                            segment: next.first_row,
                            offset: 0,
                        };
                        continue;
                    }
                    None => break,
                }
            }
            let left = seg.len - pos.offset;
            // About what `max` frames take, not the whole segment: a lease asks for a few
            // dozen frames at a time.
            let want = max
                .saturating_sub(out.len())
                .saturating_mul(2048)
                .clamp(1 << 14, 1 << 20);
            let mut n = left.min(want as u64) as usize;
            if scratch.len() < n {
                scratch.resize(n, 0);
            }
            seg.file.read_exact_at(&mut scratch[..n], pos.offset)?;
            let need = first_len(&scratch[..n]).saturating_add(HEAD);
            if need > n && need as u64 <= left {
                // A frame larger than one read: read it whole.
                n = need;
                if scratch.len() < n {
                    scratch.resize(n, 0);
                }
                seg.file.read_exact_at(&mut scratch[..n], pos.offset)?;
            }
            let buf = &scratch[..n];
            let mut at = 0usize;
            while out.len() < max {
                let Some((frame, size)) = buf.get(at..).and_then(decode) else {
                    break;
                };
                out.push((
                    Pos {
                        segment: pos.segment,
                        offset: pos.offset + at as u64,
                    },
                    frame,
                ));
                at += size;
            }
            if at == 0 {
                if !out.is_empty() {
                    // What was read before the damage; the next read reports it, exactly where.
                    break;
                }
                // Damaged inside the written part: nothing more can be read from here.
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "outbox log segment {} is damaged at offset {}",
                        seg.path.display(),
                        pos.offset
                    ),
                ));
            }
            pos.offset += at as u64;
        }
        Ok((out, pos))
    }

    /// Every frame from `from` (`None`: the log's start) on, read a few hundred at a time.
    pub(crate) fn frames(&self, from: Option<Pos>) -> Frames<'_> {
        Frames {
            log: self,
            pos: from.or_else(|| self.start()),
            read: Vec::new().into_iter(),
        }
    }

    /// Where the frame of `row` (or the first after it) starts, read from the segment's
    /// start (the writer keeps an index instead; see `log_state`).
    #[cfg(test)]
    pub(crate) fn locate(&self, row: i64) -> io::Result<Pos> {
        let i = self
            .segments
            .iter()
            .rposition(|s| s.first_row <= row)
            .unwrap_or(0);
        let Some(seg) = self.segments.get(i) else {
            return Ok(Pos {
                segment: row,
                offset: 0,
            });
        };
        let mut pos = Pos {
            segment: seg.first_row,
            offset: 0,
        };
        loop {
            let (frames, next) = self.read(pos, 256)?;
            if let Some((at, _)) = frames.iter().find(|(_, f)| f.row >= row) {
                return Ok(*at);
            }
            if frames.is_empty() {
                return Ok(next);
            }
            pos = next;
        }
    }

    /// A failed fsync of the log seen by the writer, once.
    pub(crate) fn take_sync_failure(&mut self) -> Option<String> {
        self.sync_failed.take()
    }

    /// Whether [`Log::detach_below`] would take a segment.
    pub(crate) fn releasable(&self, row: i64) -> bool {
        self.segments.len() > 1 && self.segments.get(1).is_some_and(|s| s.first_row <= row)
    }

    /// Takes the segments that hold only rows below `row` out of the log (never the one taking
    /// appends) and returns their files' paths, for the caller to delete.
    pub(crate) fn detach_below(&mut self, row: i64) -> Vec<PathBuf> {
        let mut gone = Vec::new();
        while self.releasable(row) {
            gone.push(self.segments.remove(0).path);
        }
        gone
    }

    /// Deletes the segments that hold only rows below `row`.
    #[cfg(test)]
    pub(crate) fn release_below(&mut self, row: i64) -> io::Result<usize> {
        let gone = self.detach_below(row);
        for path in &gone {
            fs::remove_file(path)?;
        }
        Ok(gone.len())
    }

    /// Deletes every segment (their events were copied elsewhere and made durable).
    /// A segment before the last that ends before its file does cannot be a crash's torn
    /// tail (it was fsynced whole before the next one started): it is damaged, and what
    /// follows the damage is kept as `<name>.damaged` for an operator instead of deleted.
    /// Returns the paths kept.
    pub(crate) fn remove_all(&mut self) -> io::Result<Vec<PathBuf>> {
        let last = self.segments.len().saturating_sub(1);
        let mut kept = Vec::new();
        for (i, seg) in self.segments.drain(..).enumerate() {
            if i < last && seg.len < seg.size {
                let mut keep = seg.path.clone().into_os_string();
                keep.push(".damaged");
                fs::rename(&seg.path, &keep)?;
                kept.push(PathBuf::from(keep));
            } else {
                if seg.len < seg.size {
                    // A write a crash cut short (its hits were never answered), or damage in
                    // the last file: either way nothing after it could be read.
                    tracing::warn!(file = %seg.path.display(), bytes = seg.size - seg.len, "outbox: ignored the end of the last log file after its last complete record");
                }
                fs::remove_file(&seg.path)?;
            }
        }
        File::open(&self.dir)?.sync_all()?;
        self.sealed = false;
        Ok(kept)
    }

    /// Bytes of frames in the log's files, and how many files (for the gauges).
    pub(crate) fn size(&self) -> (u64, usize) {
        (
            self.segments.iter().map(|s| s.len).sum(),
            self.segments.len(),
        )
    }

    /// Whether the log holds no segment.
    pub(crate) fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// The position of the first frame of the log.
    pub(crate) fn start(&self) -> Option<Pos> {
        self.segments.first().map(|s| Pos {
            segment: s.first_row,
            offset: 0,
        })
    }
}

fn segment_row(path: &Path) -> Option<i64> {
    let name = path.file_name()?.to_str()?;
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Length field of the frame at the start of `buf` (0 if too short).
fn first_len(buf: &[u8]) -> usize {
    buf.get(..4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, |b| u32::from_le_bytes(b) as usize)
}

/// Reads up to `buf.len()` bytes at `pos`, fewer at the end of a file of `size` bytes.
fn read_some(file: &File, buf: &mut [u8], pos: u64, size: u64) -> io::Result<usize> {
    let n = (size.saturating_sub(pos)).min(buf.len() as u64) as usize;
    let part = buf.get_mut(..n).unwrap_or_default();
    file.read_exact_at(part, pos)?;
    Ok(n)
}

/// The tags a `fresh` column lists (`Some(empty)` for none); `None` if it cannot be read,
/// which the caller must treat as "may still owe deliveries" (never written so by us).
pub(crate) fn parse_column(column: Option<&str>) -> Option<Vec<Arc<str>>> {
    match column {
        None => Some(Vec::new()),
        Some(c) => serde_json::from_str::<Vec<String>>(c)
            .ok()
            .map(|tags| tags.into_iter().map(Arc::from).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(row: i64, payload_len: usize) -> Frame {
        Frame {
            row,
            enqueued_ms: 1_700_000_000_000 + row,
            tags: Bytes::from_static(br#"["ga4","meta"]"#),
            event_id: format!("event-{row}"),
            payload: Bytes::from(vec![b'x'; payload_len]),
        }
    }

    fn append(log: &mut Log, frames: &[Frame]) -> Pos {
        let mut buf = Vec::new();
        for f in frames {
            encode(f, &mut buf).unwrap();
        }
        log.append(&buf, frames[0].row).unwrap()
    }

    #[test]
    fn a_frame_round_trips_and_damage_ends_the_log() {
        let f = frame(7, 100);
        let mut buf = Vec::new();
        encode(&f, &mut buf).unwrap();
        let (back, size) = decode(&buf).unwrap();
        assert_eq!(back, f);
        assert_eq!(size, buf.len());
        // Zeros (the unwritten part of a segment), a torn frame, a flipped bit: the end.
        assert!(decode(&[0u8; 64]).is_none());
        assert!(decode(&buf[..buf.len() - 1]).is_none());
        let mut bad = buf.clone();
        bad[30] ^= 1;
        assert!(decode(&bad).is_none());
    }

    #[test]
    fn frames_are_read_back_in_order_across_segments_and_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path(), 4096).unwrap();
        let start = append(&mut log, &[frame(1, 1000), frame(2, 1000)]);
        append(&mut log, &[frame(3, 1000), frame(4, 1000)]);
        append(&mut log, &[frame(5, 10)]);
        log.sync().unwrap();
        assert_eq!(
            log.segments.len(),
            2,
            "the second group did not fit the first segment"
        );

        let (frames, end) = log.read(start, 100).unwrap();
        assert_eq!(frames[0].0, start);
        let rows: Vec<i64> = frames.iter().map(|(_, f)| f.row).collect();
        assert_eq!(rows, vec![1, 2, 3, 4, 5]);
        let each: Vec<i64> = log.frames(None).map(|f| f.unwrap().row).collect();
        assert_eq!(each, rows, "the iterator reads the same, across segments");
        let later: Vec<i64> = log.frames(Some(end)).map(|f| f.unwrap().row).collect();
        assert!(later.is_empty());
        // In small steps too, each read going on where the last stopped.
        let (a, p) = log.read(start, 2).unwrap();
        let (b, p) = log.read(p, 2).unwrap();
        let (c, p) = log.read(p, 2).unwrap();
        assert_eq!(a.len() + b.len() + c.len(), 5);
        assert_eq!(p, end);
        assert_eq!(log.read(p, 2).unwrap().0, vec![]);

        drop(log);
        let mut log = Log::open(dir.path(), 4096).unwrap();
        let (frames, _) = log.read(log.start().unwrap(), 100).unwrap();
        assert_eq!(frames.len(), 5, "a reopened log reads what was written");
        assert_eq!(frames[4].1, frame(5, 10));
        // Appends after a reopen go to a new segment and read on in order.
        append(&mut log, &[frame(6, 10)]);
        let (frames, _) = log.read(log.start().unwrap(), 100).unwrap();
        assert_eq!(frames.last().unwrap().1.row, 6);
        assert_eq!(frames.len(), 6);
    }

    #[test]
    fn a_torn_tail_is_the_end_and_is_never_written_over() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path(), 1 << 16).unwrap();
        append(&mut log, &[frame(1, 100), frame(2, 100)]);
        let seg = log.segments[0].path.clone();
        let end = log.segments[0].len;
        drop(log);
        // A crash in the middle of the next group's write: half a frame.
        let mut torn = Vec::new();
        encode(&frame(3, 100), &mut torn).unwrap();
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        f.write_all_at(&torn[..torn.len() / 2], end).unwrap();
        drop(f);

        let mut log = Log::open(dir.path(), 1 << 16).unwrap();
        assert_eq!(
            log.segments[0].len, end,
            "the torn frame is not part of the log"
        );
        append(&mut log, &[frame(3, 100)]);
        let (frames, _) = log.read(log.start().unwrap(), 100).unwrap();
        let rows: Vec<i64> = frames.iter().map(|(_, f)| f.row).collect();
        assert_eq!(rows, vec![1, 2, 3]);
        assert_eq!(
            log.segments.len(),
            2,
            "the row after the tear went to a new segment"
        );
    }

    #[test]
    fn rows_are_located_and_passed_segments_released() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path(), 4096).unwrap();
        for row in 1..=12 {
            append(&mut log, &[frame(row, 900)]);
        }
        let segments = log.segments.len();
        assert!(segments >= 3, "{segments}");
        for row in [1, 5, 12] {
            let pos = log.locate(row).unwrap();
            let (frames, _) = log.read(pos, 1).unwrap();
            assert_eq!(frames[0].1.row, row);
        }
        // Past the last row: where the next append would be read from.
        let end = log.locate(13).unwrap();
        assert!(log.read(end, 1).unwrap().0.is_empty());

        let second = log.segments[1].first_row;
        let (bytes, files) = log.size();
        assert_eq!(files, segments);
        assert_eq!(
            bytes,
            (1..=12).map(|r| frame(r, 900).encoded_len()).sum::<u64>()
        );
        assert_eq!(log.release_below(second).unwrap(), 1);
        assert_eq!(log.size().1, segments - 1);
        assert!(log.size().0 < bytes);
        assert_eq!(log.start().unwrap().segment, second);
        assert!(!dir.path().join(format!("{:020}.seg", 1)).exists());
        // The segment taking appends is never released.
        log.release_below(i64::MAX).unwrap();
        assert_eq!(log.segments.len(), 1);
        let (frames, _) = log.read(log.start().unwrap(), 100).unwrap();
        assert_eq!(frames.last().unwrap().1.row, 12);
    }

    #[test]
    fn a_reader_gets_the_frames_before_damage_then_an_error_at_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path(), 1 << 20).unwrap();
        let start = append(&mut log, &[frame(1, 100), frame(2, 100), frame(3, 100)]);
        // A bit flips in frame 2 after it was written (the disk, not a crash).
        let at = frame(1, 100).encoded_len() + 30;
        let f = OpenOptions::new()
            .write(true)
            .open(&log.segments[0].path)
            .unwrap();
        f.write_all_at(&[0xff], at).unwrap();
        let (frames, next) = log.read(start, 10).unwrap();
        assert_eq!(frames.len(), 1, "frame 1, read before the damage");
        assert_eq!(next.offset, frame(1, 100).encoded_len());
        let err = log.read(next, 10).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn a_frame_larger_than_a_segment_gets_one_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path(), 4096).unwrap();
        append(&mut log, &[frame(1, 10)]);
        append(&mut log, &[frame(2, 10_000)]);
        append(&mut log, &[frame(3, 10)]);
        let (frames, _) = log.read(log.start().unwrap(), 10).unwrap();
        assert_eq!(
            frames.iter().map(|(_, f)| f.row).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        drop(log);
        let log = Log::open(dir.path(), 4096).unwrap();
        let (frames, _) = log.read(log.start().unwrap(), 10).unwrap();
        assert_eq!(frames.len(), 3);
    }
}
