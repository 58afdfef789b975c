//! Tailing a log file through rotation, line by whole line.
//!
//! A file is identified by its device and inode plus an XXH3 fingerprint of
//! its first [`FINGERPRINT_BYTES`] bytes (so a reused inode is not mistaken
//! for the old file). Rotation by rename: the renamed file is read to its end
//! before it is let go, then the new file at the path from its start: lines
//! are handed out in file order whatever the timing, which keeps window
//! closing deterministic. Rotation by
//! copytruncate: a file shorter than the position, or whose fingerprint
//! changed, is read again from its start. **Gap:** a file copied and
//! truncated while the agent was down, whose checkpoint is at position 0
//! (the agent had not read into it yet), is not recognised as truncated:
//! the copy's lines are not read (a checkpoint past 0 carries the
//! fingerprint that finds the copy, and is handled). Only whole lines are handed out;
//! a partial last line is read again once its newline arrives (or when its
//! rotated file is let go). Positions are a [`TailCheckpoint`]: restoring
//! one finds each file again by identity in the directory of the path, even
//! if it was renamed while the agent was down.
//!
//! At the first start (no checkpoint), rotated siblings already on disk are
//! read before the file at the path, oldest first: by modification time,
//! then `FILE.N` before `FILE.N-1` (logrotate's numbering) — see
//! [`rotated_sibling`] for which names count. Compressed rotations
//! (`FILE.2.gz`...) are **skipped**, logged, never decompressed: they were
//! compressed after their rotation, so an agent that was running has read
//! them already, and at a first start only the uncompressed ones
//! (logrotate's `delaycompress` keeps `FILE.1`) are taken. Each is then
//! known by identity, so logrotate renaming it later does not read it again.
//!
//! **Bound:** a line is kept whole up to [`MAX_LINE_BYTES`] (the tailer's
//! limit, [`FileTailer::with_max_line`]); a longer one is handed out cut to
//! that many bytes, the rest of it skipped up to its newline (the skipping
//! survives polls, rotation and a checkpoint), and counted in
//! [`FileTailer::cut_lines`]. **Invariant:** reading never holds more than
//! the limit plus one byte of one line (or [`READ_CHUNK`] of whole lines),
//! whatever the file holds.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

/// How many leading bytes make a file's fingerprint.
pub const FINGERPRINT_BYTES: usize = 256;
/// Bytes read at a time when lines are short.
pub const READ_CHUNK: usize = 256 * 1024;
const MIN_CHUNK: usize = 4096;
/// The longest line handed out whole by default; a longer one is cut.
pub const MAX_LINE_BYTES: usize = 1024 * 1024;

/// Where reading of one file stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilePosition {
    pub device: u64,
    pub inode: u64,
    /// XXH3 of the first [`FINGERPRINT_BYTES`] bytes, once the file has them.
    pub fingerprint: Option<u64>,
    /// Byte offset just after the last line handed out.
    pub offset: u64,
    /// Read to its end and let go; remembered (the last
    /// [`FINISHED_REMEMBERED`]) so that a rotated file is never read twice,
    /// whatever its modification time says.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub finished: bool,
    /// Inside a line that was cut at the limit: bytes up to the next
    /// newline are skipped.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skipping: bool,
}

/// How many finished files a tailer remembers.
pub const FINISHED_REMEMBERED: usize = 64;

/// Positions of every file still being read, oldest first (the last one is
/// the file at the path), then the files finished most recently.
pub type TailCheckpoint = Vec<FilePosition>;

/// A failure to read the tailed files.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error("reading {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

struct TailedFile {
    file: File,
    position: FilePosition,
}

/// Tails one path through rotations.
pub struct FileTailer {
    path: PathBuf,
    files: Vec<TailedFile>,
    buffer: Vec<u8>,
    /// Checkpointed files that could not be found again.
    lost: Vec<FilePosition>,
    /// Files read to their end, newest last (at most [`FINISHED_REMEMBERED`]).
    finished: Vec<FilePosition>,
    /// The longest line handed out whole.
    max_line: usize,
    /// Lines cut at `max_line` so far.
    cut_lines: u64,
}

impl FileTailer {
    /// Starts tailing `path`, resuming from `checkpoint` when given (else
    /// from the start of the file at the path).
    pub fn open(path: &Path, checkpoint: &[FilePosition]) -> Result<Self, TailError> {
        let mut tailer = FileTailer {
            path: path.to_owned(),
            files: Vec::new(),
            buffer: Vec::new(),
            lost: Vec::new(),
            finished: Vec::new(),
            max_line: MAX_LINE_BYTES,
            cut_lines: 0,
        };
        let candidates = tailer.candidates()?;
        if checkpoint.is_empty() {
            tailer.adopt_existing(&candidates);
        }
        for position in checkpoint {
            if position.finished {
                tailer.finished.push(position.clone());
                continue;
            }
            let found = candidates.iter().find_map(|candidate| {
                let file = File::open(candidate).ok()?;
                let meta = file.metadata().ok()?;
                let same_inode = meta.dev() == position.device && meta.ino() == position.inode;
                let same_content = position.fingerprint.is_none()
                    || fingerprint(&file, meta.len()).ok()? == position.fingerprint;
                (same_inode && same_content).then_some(file)
            });
            let found = found
                .map(|file| (file, position.clone()))
                .or_else(|| tailer.copy_of(&candidates, position));
            match found {
                Some((file, position)) => tailer.files.push(TailedFile { file, position }),
                None => {
                    tracing::warn!(path = %path.display(), inode = position.inode, offset = position.offset,
                        "a checkpointed log file is gone; its unread lines are lost");
                    tailer.lost.push(position.clone());
                }
            }
        }
        Ok(tailer)
    }

    /// A checkpointed file truncated while the agent was down
    /// (copytruncate): its copy, a rotated sibling with its fingerprint and
    /// at least its offset, is read on from that offset.
    fn copy_of(
        &self,
        candidates: &[PathBuf],
        position: &FilePosition,
    ) -> Option<(File, FilePosition)> {
        let wanted = position.fingerprint?;
        candidates.iter().find_map(|candidate| {
            if *candidate == self.path || !self.is_plain_rotation(candidate) {
                return None;
            }
            let file = File::open(candidate).ok()?;
            let meta = file.metadata().ok()?;
            let same = fingerprint(&file, meta.len()).ok()? == Some(wanted);
            (same && meta.is_file() && meta.len() >= position.offset).then(|| {
                tracing::info!(path = %candidate.display(), offset = position.offset,
                    "a checkpointed log file was copied and truncated while down: reading on in its copy");
                let position = FilePosition {
                    device: meta.dev(),
                    inode: meta.ino(),
                    ..position.clone()
                };
                (file, position)
            })
        })
    }

    /// Sets the longest line handed out whole (at least 1 byte); a longer
    /// line is cut to it and the rest skipped.
    pub fn with_max_line(mut self, bytes: usize) -> Self {
        self.max_line = bytes.max(1);
        self
    }

    /// How many lines were cut at the line limit since opening.
    pub fn cut_lines(&self) -> u64 {
        self.cut_lines
    }

    /// Checkpointed files that were not found when opening.
    pub fn lost_files(&self) -> &[FilePosition] {
        &self.lost
    }

    /// The positions to checkpoint, consistent with the lines handed out.
    pub fn checkpoint(&self) -> TailCheckpoint {
        self.files
            .iter()
            .map(|f| f.position.clone())
            .chain(self.finished.iter().cloned())
            .collect()
    }

    /// Whether a file is one being read or one read to its end.
    fn seen(&self, device: u64, inode: u64, file: &File, len: u64) -> bool {
        if self
            .files
            .iter()
            .any(|f| f.position.device == device && f.position.inode == inode)
        {
            return true;
        }
        self.finished.iter().any(|f| {
            f.device == device
                && f.inode == inode
                // A reused inode holds other content.
                && (f.fingerprint.is_none()
                    || fingerprint(file, len).ok().flatten() == f.fingerprint)
        })
    }

    /// Hands whole lines (without `\n`) to `on_line`, reading about
    /// `max_bytes` at most. Returns how many lines were handed out.
    pub fn read_lines(
        &mut self,
        max_bytes: usize,
        mut on_line: impl FnMut(&[u8]),
    ) -> Result<u64, TailError> {
        self.discover()?;
        let mut lines = 0;
        let mut budget = max_bytes;
        let mut index = 0;
        while index < self.files.len() && budget > 0 {
            let is_live = index + 1 == self.files.len();
            let read = self.read_file(index, &mut budget, &mut lines, &mut on_line)?;
            let newer_has_data =
                !is_live && self.files[index + 1..].iter().any(|f| has_data(&f.file));
            if read == 0 && newer_has_data {
                // Nothing more in the rotated file while the writer has moved on
                // to the new one: hand out an unterminated last line and let go.
                let tailed = &mut self.files[index];
                let len = tailed.file.metadata().map(|m| m.len()).unwrap_or(0);
                if len > tailed.position.offset {
                    let mut split = Splitter {
                        max_line: self.max_line,
                        skipping: tailed.position.skipping,
                        cut_lines: &mut self.cut_lines,
                        lines: &mut lines,
                    };
                    let from = tailed.position.offset;
                    read_lines_to_end(
                        &tailed.file,
                        from,
                        len,
                        &mut self.buffer,
                        &mut split,
                        &mut on_line,
                    )
                    .map_err(|source| TailError::Io {
                        path: self.path.clone(),
                        source,
                    })?;
                }
                let mut done = self.files.remove(index).position;
                done.skipping = false;
                done.finished = true;
                done.offset = len.max(done.offset);
                self.finished.push(done);
                if self.finished.len() > FINISHED_REMEMBERED {
                    self.finished.remove(0);
                }
                continue;
            }
            if !is_live {
                // Files are read one after the other, so lines always come
                // out in the same order whatever the timing of the polls.
                break;
            }
            index += 1;
        }
        Ok(lines)
    }

    /// Files in the path's directory whose name starts with its file name.
    fn candidates(&self) -> Result<Vec<PathBuf>, TailError> {
        let io = |source| TailError::Io {
            path: self.path.clone(),
            source,
        };
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        let prefix = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut candidates = vec![self.path.clone()];
        for entry in fs::read_dir(&dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) && entry.path() != self.path {
                candidates.push(entry.path());
            }
        }
        Ok(candidates)
    }

    /// At a first start: the rotated siblings on disk, oldest first, are
    /// read before the file at the path.
    fn adopt_existing(&mut self, candidates: &[PathBuf]) {
        let at_path = fs::metadata(&self.path).ok().map(|m| (m.dev(), m.ino()));
        let mut found = Vec::new();
        let mut compressed = Vec::new();
        for candidate in candidates.iter().filter(|c| **c != self.path) {
            let Some(order) = self.rotation_order(candidate) else {
                continue;
            };
            let Some(number) = order else {
                compressed.push(candidate.display().to_string());
                continue;
            };
            let Ok(file) = File::open(candidate) else {
                continue;
            };
            let Ok(meta) = file.metadata() else {
                continue;
            };
            if !meta.is_file() || Some((meta.dev(), meta.ino())) == at_path {
                continue;
            }
            let modified = meta.modified().ok();
            found.push((
                (modified, std::cmp::Reverse(number)),
                candidate.clone(),
                file,
                meta,
            ));
        }
        if !compressed.is_empty() {
            tracing::info!(path = %self.path.display(), files = ?compressed,
                "compressed rotated log files are not read");
        }
        found.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
        for (_, candidate, file, meta) in found {
            tracing::info!(path = %candidate.display(), inode = meta.ino(),
                "reading a rotated log file found at the first start");
            self.files.push(TailedFile {
                file,
                position: FilePosition {
                    device: meta.dev(),
                    inode: meta.ino(),
                    fingerprint: None,
                    offset: 0,
                    finished: false,
                    skipping: false,
                },
            });
        }
    }

    /// How `candidate` sorts among rotations: `None` if its name is not a
    /// rotation of the path, `Some(None)` if it is a compressed one,
    /// `Some(Some(n))` otherwise (`n`: logrotate's number, 0 if none).
    fn rotation_order(&self, candidate: &Path) -> Option<Option<u64>> {
        let name = candidate.file_name()?.to_str()?;
        let prefix = self.path.file_name()?.to_str()?;
        rotated_sibling(name.strip_prefix(prefix)?)
    }

    /// Whether `candidate` is an uncompressed rotation of the path.
    fn is_plain_rotation(&self, candidate: &Path) -> bool {
        matches!(self.rotation_order(candidate), Some(Some(_)))
    }

    /// Starts reading the file at the path if it is not one being read.
    fn discover(&mut self) -> Result<(), TailError> {
        let file = match File::open(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(TailError::Io {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let meta = file.metadata().map_err(|source| TailError::Io {
            path: self.path.clone(),
            source,
        })?;
        let known = self
            .files
            .iter()
            .any(|f| f.position.device == meta.dev() && f.position.inode == meta.ino());
        if !known {
            self.adopt_rotated(meta.dev(), meta.ino())?;
            tracing::info!(path = %self.path.display(), inode = meta.ino(), "tailing a new log file");
            self.files.push(TailedFile {
                file,
                position: FilePosition {
                    device: meta.dev(),
                    inode: meta.ino(),
                    fingerprint: None,
                    offset: 0,
                    finished: false,
                    skipping: false,
                },
            });
        }
        Ok(())
    }

    /// Before a new file at the path is tailed: if the newest file being read
    /// was renamed away (rotation by rename), siblings written after it
    /// are files that were rotated while nobody polled (the agent was down,
    /// or several rotations happened between two polls). They are read
    /// next, oldest (by modification time) first, so no rotated file is
    /// skipped. After copytruncate the newest file is still at the path, so
    /// its copy is never adopted.
    fn adopt_rotated(&mut self, device: u64, inode: u64) -> Result<(), TailError> {
        let Some(newest) = self.files.last() else {
            return Ok(());
        };
        let Ok(newest_meta) = newest.file.metadata() else {
            return Ok(());
        };
        let Ok(newest_modified) = newest_meta.modified() else {
            return Ok(());
        };
        let mut adopted = Vec::new();
        for candidate in self.candidates()? {
            let Ok(file) = File::open(&candidate) else {
                continue;
            };
            let Ok(meta) = file.metadata() else {
                continue;
            };
            let is_known = (meta.dev() == device && meta.ino() == inode)
                || self.seen(meta.dev(), meta.ino(), &file, meta.len());
            // Only uncompressed rotations (a `.gz` made of a file read
            // already has its time, and is not text).
            let is_rotation = self.is_plain_rotation(&candidate);
            // Not older: file times are coarse (a clock tick), so a file
            // rotated within the tick of the newest one's last write has the
            // same time. Files already read are excluded by identity instead.
            let newer = meta.modified().is_ok_and(|m| m >= newest_modified);
            if !is_known && newer && is_rotation && meta.is_file() {
                let modified = meta.modified().ok();
                adopted.push((modified, meta.ino(), candidate, file, meta.dev()));
            }
        }
        adopted.sort_by_key(|a| (a.0, a.1));
        for (_, inode, candidate, file, device) in adopted {
            tracing::info!(path = %candidate.display(), inode,
                "tailing a log file rotated while it was not being read");
            self.files.push(TailedFile {
                file,
                position: FilePosition {
                    device,
                    inode,
                    fingerprint: None,
                    offset: 0,
                    finished: false,
                    skipping: false,
                },
            });
        }
        Ok(())
    }

    /// Reads whole lines of one file. Returns the bytes consumed.
    fn read_file(
        &mut self,
        index: usize,
        budget: &mut usize,
        lines: &mut u64,
        on_line: &mut impl FnMut(&[u8]),
    ) -> Result<u64, TailError> {
        let io = |source| TailError::Io {
            path: self.path.clone(),
            source,
        };
        let tailed = &mut self.files[index];
        let len = tailed.file.metadata().map_err(io)?.len();
        let current = fingerprint(&tailed.file, len).map_err(io)?;
        let replaced =
            matches!((tailed.position.fingerprint, current), (Some(old), Some(new)) if old != new);
        if len < tailed.position.offset || replaced {
            tracing::info!(path = %self.path.display(), offset = tailed.position.offset, len,
                "log file truncated (copytruncate): reading it from the start");
            let before = tailed.position.clone();
            tailed.position.offset = 0;
            tailed.position.skipping = false;
            tailed.position.fingerprint = current;
            // What the copy holds past where we were comes first.
            self.read_copy(&before, lines, on_line)?;
        }
        let path = &self.path;
        let io = |source| TailError::Io {
            path: path.clone(),
            source,
        };
        let tailed = &mut self.files[index];
        if tailed.position.fingerprint.is_none() {
            tailed.position.fingerprint = current;
        }
        let start = tailed.position.offset;
        let mut split = Splitter {
            max_line: self.max_line,
            skipping: tailed.position.skipping,
            cut_lines: &mut self.cut_lines,
            lines,
        };
        let cap = split.chunk_cap();
        let first_chunk = |budget: usize| READ_CHUNK.min(budget).max(MIN_CHUNK).min(cap);
        let mut consumed = 0u64;
        let mut chunk = first_chunk(*budget);
        while *budget > 0 {
            let from = start + consumed;
            let end = len.min(from.saturating_add(chunk as u64));
            if from >= end {
                break;
            }
            read_at(&tailed.file, from, end, &mut self.buffer).map_err(io)?;
            let used = split.split(&self.buffer, false, on_line);
            if used == 0 {
                if end == len || self.buffer.len() < chunk || chunk >= cap {
                    break; // a partial last line: wait for its newline
                }
                chunk = chunk.saturating_mul(2).min(cap); // a line longer than the chunk
                continue;
            }
            consumed += used as u64;
            *budget = budget.saturating_sub(used);
            chunk = first_chunk(*budget);
        }
        tailed.position.skipping = split.skipping;
        self.buffer.clear();
        tailed.position.offset = start + consumed;
        Ok(consumed)
    }
}

/// Suffixes of compressed rotations, which are never read.
const COMPRESSED: [&str; 7] = [".gz", ".bz2", ".xz", ".zst", ".lz4", ".Z", ".zip"];

/// Whether `suffix` (a sibling's name after the path's file name) names a
/// rotation: a separator (`.`, `-`, `_`) then a digit, then only digits and
/// separators (`.1`, `-20240501`, `.2024-05-01`), possibly compressed.
/// `None`: not a rotation; `Some(None)`: a compressed one; `Some(Some(n))`
/// an uncompressed one, `n` being logrotate's number (`.N`) or 0.
pub fn rotated_sibling(suffix: &str) -> Option<Option<u64>> {
    let (plain, compressed) = match COMPRESSED.iter().find_map(|c| suffix.strip_suffix(c)) {
        Some(plain) => (plain, true),
        None => (suffix, false),
    };
    let mut chars = plain.chars();
    let separator = chars.next()?;
    let rest = chars.as_str();
    let is_separator = |c: char| matches!(c, '.' | '-' | '_');
    if !is_separator(separator)
        || !rest.starts_with(|c: char| c.is_ascii_digit())
        || !rest.chars().all(|c| c.is_ascii_digit() || is_separator(c))
    {
        return None;
    }
    if compressed {
        return Some(None);
    }
    let number = match separator {
        '.' => rest.parse().unwrap_or(0),
        _ => 0,
    };
    Some(Some(number))
}

impl FileTailer {
    /// After copytruncate: the lines the copy (a rotated sibling starting
    /// with the same [`FINGERPRINT_BYTES`]) holds past `before.offset` were
    /// written before the truncation and not read yet: hands them out (the
    /// last one even without its newline: the copy is complete) and
    /// remembers the copy as finished. A file shorter than the fingerprint
    /// has no fingerprint to find its copy by: its unread lines are lost.
    fn read_copy(
        &mut self,
        before: &FilePosition,
        lines: &mut u64,
        on_line: &mut impl FnMut(&[u8]),
    ) -> Result<(), TailError> {
        let Some(wanted) = before.fingerprint else {
            return Ok(());
        };
        for candidate in self.candidates()? {
            if candidate == self.path || !self.is_plain_rotation(&candidate) {
                continue;
            }
            let Ok(file) = File::open(&candidate) else {
                continue;
            };
            let Ok(meta) = file.metadata() else {
                continue;
            };
            let same_start = fingerprint(&file, meta.len()).ok().flatten() == Some(wanted);
            if !meta.is_file()
                || !same_start
                || meta.len() < before.offset
                || self.seen(meta.dev(), meta.ino(), &file, meta.len())
            {
                continue;
            }
            tracing::info!(path = %candidate.display(), from = before.offset, to = meta.len(),
                "reading the end of a copytruncate copy");
            let mut split = Splitter {
                max_line: self.max_line,
                skipping: before.skipping,
                cut_lines: &mut self.cut_lines,
                lines,
            };
            read_lines_to_end(
                &file,
                before.offset,
                meta.len(),
                &mut self.buffer,
                &mut split,
                on_line,
            )
            .map_err(|source| TailError::Io {
                path: candidate.clone(),
                source,
            })?;
            self.finished.push(FilePosition {
                device: meta.dev(),
                inode: meta.ino(),
                fingerprint: Some(wanted),
                offset: meta.len(),
                finished: true,
                skipping: false,
            });
            if self.finished.len() > FINISHED_REMEMBERED {
                self.finished.remove(0);
            }
            return Ok(());
        }
        Ok(())
    }
}

/// Hands out every line of `file` in `[from, to)`, the last one even
/// without a newline, reading a chunk (doubled for a longer line, up to the
/// line limit) at a time.
fn read_lines_to_end(
    file: &File,
    from: u64,
    to: u64,
    buffer: &mut Vec<u8>,
    split: &mut Splitter<'_>,
    on_line: &mut impl FnMut(&[u8]),
) -> io::Result<()> {
    let cap = split.chunk_cap();
    let (mut at, mut chunk) = (from, READ_CHUNK.min(cap));
    while at < to {
        let end = to.min(at.saturating_add(chunk as u64));
        read_at(file, at, end, buffer)?;
        if buffer.is_empty() {
            break; // the file is shorter than it was
        }
        let complete = end == to || buffer.len() < chunk;
        let used = split.split(buffer, complete, on_line);
        if used == 0 {
            if chunk >= cap {
                break; // cannot happen: a full chunk of `cap` bytes always yields
            }
            chunk = chunk.saturating_mul(2).min(cap);
            continue;
        }
        at += used as u64;
        chunk = READ_CHUNK.min(cap);
    }
    buffer.clear();
    Ok(())
}

/// Splits read bytes into lines of at most `max_line` bytes: a longer line
/// is cut (at a UTF-8 boundary when the cut falls inside a character) and
/// what follows it up to its newline skipped, across calls.
struct Splitter<'a> {
    max_line: usize,
    /// Inside a cut line: skip up to the next newline.
    skipping: bool,
    cut_lines: &'a mut u64,
    lines: &'a mut u64,
}

impl Splitter<'_> {
    /// The most bytes read at once: enough to see a line's newline or that
    /// it is longer than the limit.
    fn chunk_cap(&self) -> usize {
        self.max_line.saturating_add(1)
    }

    /// Hands out the lines of `buffer` (the bytes at the read position).
    /// `complete`: nothing follows, so a last line without its newline is
    /// handed out too. Returns the bytes consumed: 0 when `buffer` holds only
    /// the start of a line still within the limit.
    fn split(&mut self, buffer: &[u8], complete: bool, on_line: &mut impl FnMut(&[u8])) -> usize {
        let mut at = 0;
        if self.skipping {
            let Some(newline) = memchr::memchr(b'\n', buffer) else {
                return buffer.len(); // all of it is the rest of a cut line
            };
            at = newline + 1;
            self.skipping = false;
        }
        let rest = &buffer[at..];
        let whole = memchr::memrchr(b'\n', rest).map_or(0, |newline| newline + 1);
        let mut line_start = 0;
        for newline in memchr::memchr_iter(b'\n', &rest[..whole]) {
            self.emit(&rest[line_start..newline], on_line);
            line_start = newline + 1;
        }
        let tail = &rest[whole..];
        if tail.len() > self.max_line {
            self.emit(tail, on_line);
            self.skipping = true;
            return buffer.len();
        }
        if complete && !tail.is_empty() {
            self.emit(tail, on_line);
            return buffer.len();
        }
        at + whole
    }

    fn emit(&mut self, line: &[u8], on_line: &mut impl FnMut(&[u8])) {
        *self.lines += 1;
        if line.len() <= self.max_line {
            return on_line(line);
        }
        *self.cut_lines += 1;
        let mut cut = self.max_line;
        // Not inside a character: back off over at most 3 continuation bytes.
        while cut > 0 && self.max_line - cut < 3 && line[cut] & 0xC0 == 0x80 {
            cut -= 1;
        }
        if cut == 0 {
            cut = self.max_line;
        }
        tracing::debug!(
            len = line.len(),
            kept = cut,
            "a log line longer than the limit was cut"
        );
        on_line(&line[..cut]);
    }
}

fn has_data(file: &File) -> bool {
    file.metadata().is_ok_and(|m| m.len() > 0)
}

/// Reads `[from, to)` into `buffer` (shorter if the file is).
fn read_at(file: &File, from: u64, to: u64, buffer: &mut Vec<u8>) -> io::Result<()> {
    let len = usize::try_from(to.saturating_sub(from)).unwrap_or(usize::MAX);
    buffer.clear();
    buffer.resize(len, 0);
    let mut filled = 0;
    while filled < len {
        match file.read_at(&mut buffer[filled..], from + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buffer.truncate(filled);
    Ok(())
}

fn fingerprint(file: &File, len: u64) -> io::Result<Option<u64>> {
    if len < FINGERPRINT_BYTES as u64 {
        return Ok(None);
    }
    let mut head = [0; FINGERPRINT_BYTES];
    file.read_exact_at(&mut head, 0)?;
    Ok(Some(xxh3_64(&head)))
}
