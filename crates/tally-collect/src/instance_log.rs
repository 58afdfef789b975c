//! Instance log files on a node: which files belong to which instance (a
//! path pattern with captures), and how their lines become log records
//! (CRI partial lines joined, long records bounded).
//!
//! # Path patterns
//! A pattern is an absolute path whose components may hold `{project}`,
//! `{instance}` and `{stream}` captures and `*` wildcards, e.g. kubelet's
//! layout `/var/log/pods/{project}_{instance}_*/*/*.log`
//! (`<namespace>_<pod>_<uid>/<container>/<n>.log`). A capture matches a
//! Kubernetes name (`[a-z0-9.-]+`, what `tally serve` takes as a project or
//! instance; `{stream}` matches `stdout` or `stderr`), `*` any run of
//! characters other than `/`. The components before the first capture or
//! wildcard are a fixed directory. A pattern without `{project}` takes the
//! project from the configuration; `{instance}` is required.
//!
//! # Records
//! - **CRI** (`format: cri`, the kubelet's files): each line is
//!   `<RFC 3339 time> <stdout|stderr> <P|F> <text>`. `P` lines are pieces of
//!   one record that the runtime split; the record ends with the next `F`
//!   line *of the same stream*, and its time is its first piece's. So a
//!   record longer than the runtime's line buffer is one record, whole.
//! - **Plain** (`format: plain`): each line is one record, timed when read,
//!   on the stream the path's `{stream}` names (default `stdout`).
//!
//! A record is kept whole up to the log store's limit (64 KiB). Of a
//! longer one the agent keeps [`MAX_RECORD_BYTES`] (the limit and one
//! byte), drops and counts the rest, and `tally serve` cuts it to its limit
//! with its own marker (` …[truncated by tally]`), as it does for every
//! over-long line: one rule, in one place.
//!
//! **Never:** hold more than [`MAX_RECORD_BYTES`] of a pending record per
//! stream.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use regex::Regex;
use serde::{Deserialize, Serialize};

/// Most bytes of one record kept: the log store's 64 KiB limit and one
/// byte, so the store sees a longer record is over its limit.
pub const MAX_RECORD_BYTES: usize = 64 * 1024 + 1;

/// How a file's lines are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Container runtime (CRI) lines with `P`/`F` flags.
    #[default]
    Cri,
    /// One line, one record.
    Plain,
}

/// A compiled path pattern.
#[derive(Debug, Clone)]
pub struct PathPattern {
    /// The fixed directory the walk starts in.
    root: PathBuf,
    /// One regex per component after the root.
    components: Vec<Regex>,
}

/// What a matching path says about its instance.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PathLabels {
    pub project: Option<String>,
    pub instance: String,
    pub stream: Option<String>,
}

impl PathPattern {
    /// Compiles `pattern`; errors say what is wrong with it.
    pub fn new(pattern: &str) -> Result<PathPattern, String> {
        let path = Path::new(pattern);
        if !path.is_absolute() {
            return Err(format!("the log path pattern {pattern:?} is not absolute"));
        }
        if !pattern.contains("{instance}") {
            return Err(format!(
                "the log path pattern {pattern:?} has no {{instance}} capture"
            ));
        }
        let mut root = PathBuf::from("/");
        let mut components = Vec::new();
        for part in pattern.split('/').filter(|p| !p.is_empty()) {
            let variable = part.contains('{') || part.contains('*');
            if !variable && components.is_empty() {
                root.push(part);
                continue;
            }
            components.push(component_regex(part)?);
        }
        if components.is_empty() {
            return Err(format!(
                "the log path pattern {pattern:?} has no capture or wildcard"
            ));
        }
        Ok(PathPattern { root, components })
    }

    /// Every file matching the pattern now, with its labels, sorted by path.
    /// At most `limit` files (the rest are ignored, logged by the caller).
    pub fn files(&self, limit: usize) -> Vec<(PathBuf, PathLabels)> {
        let mut found = Vec::new();
        self.walk(&self.root, 0, &BTreeMap::new(), limit, &mut found);
        found.sort_by(|a, b| a.0.cmp(&b.0));
        found
    }

    fn walk(
        &self,
        dir: &Path,
        depth: usize,
        captures: &BTreeMap<String, String>,
        limit: usize,
        found: &mut Vec<(PathBuf, PathLabels)>,
    ) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let last = depth + 1 == self.components.len();
        let regex = &self.components[depth];
        let mut names: Vec<_> = entries.filter_map(Result::ok).collect();
        names.sort_by_key(|e| e.file_name());
        for entry in names {
            if found.len() >= limit {
                return;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(matched) = regex.captures(&name) else {
                continue;
            };
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            let mut here = captures.clone();
            for group in ["project", "instance", "stream"] {
                if let Some(value) = matched.name(group) {
                    here.insert(group.to_owned(), value.as_str().to_owned());
                }
            }
            if last && kind.is_file() {
                let Some(instance) = here.get("instance").cloned() else {
                    continue;
                };
                found.push((
                    entry.path(),
                    PathLabels {
                        project: here.get("project").cloned(),
                        instance,
                        stream: here.get("stream").cloned(),
                    },
                ));
            } else if !last && kind.is_dir() {
                self.walk(&entry.path(), depth + 1, &here, limit, found);
            }
        }
    }
}

/// One component of a pattern as an anchored regex.
fn component_regex(part: &str) -> Result<Regex, String> {
    let mut out = String::from("^");
    let mut rest = part;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('*') {
            out.push_str("[^/]*");
            rest = after;
        } else if let Some(after) = rest.strip_prefix('{') {
            let (name, after) = after
                .split_once('}')
                .ok_or_else(|| format!("an unclosed {{ in the path component {part:?}"))?;
            let class = match name {
                "project" | "instance" => "[a-z0-9][a-z0-9.-]*",
                "stream" => "stdout|stderr",
                _ => {
                    return Err(format!(
                        "unknown capture {{{name}}} (known: {{project}}, {{instance}}, {{stream}})"
                    ));
                }
            };
            out.push_str(&format!("(?P<{name}>{class})"));
            rest = after;
        } else {
            let end = rest.find(['*', '{']).unwrap_or(rest.len());
            out.push_str(&regex::escape(&rest[..end]));
            rest = &rest[end..];
        }
    }
    out.push('$');
    Regex::new(&out).map_err(|e| format!("the path component {part:?}: {e}"))
}

/// A whole record of one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Unix nanoseconds, if the line said (CRI); else the reader times it.
    pub time_unix_nano: Option<u64>,
    pub stream: String,
    pub text: Vec<u8>,
}

/// A record begun by `P` lines and not yet ended, per stream; part of the
/// checkpoint, so a restart goes on with it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub time_unix_nano: Option<u64>,
    /// Bytes of the record so far (at most [`MAX_RECORD_BYTES`]).
    pub text: Vec<u8>,
    /// Bytes dropped past the limit.
    pub dropped: u64,
}

/// Joins lines of one file into records.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assembler {
    /// Stream → its pending record.
    pub pending: BTreeMap<String, Pending>,
    /// Lines that were not CRI lines (skipped), and bytes dropped past
    /// [`MAX_RECORD_BYTES`].
    #[serde(default)]
    pub malformed: u64,
    #[serde(default)]
    pub cut_bytes: u64,
}

impl Assembler {
    /// Reads one line (without its `\n`); a record it completes goes to
    /// `out`.
    pub fn push(
        &mut self,
        format: LogFormat,
        plain_stream: &str,
        line: &[u8],
        out: &mut Vec<Record>,
    ) {
        match format {
            LogFormat::Plain => {
                let mut pending = Pending::default();
                self.append(&mut pending, line);
                out.push(self.finish(plain_stream.to_owned(), pending));
            }
            LogFormat::Cri => {
                let Some((time, stream, last, text)) = parse_cri(line) else {
                    self.malformed += 1;
                    return;
                };
                let mut pending = self.pending.remove(stream).unwrap_or_default();
                if pending.text.is_empty() && pending.dropped == 0 {
                    pending.time_unix_nano = time;
                }
                self.append(&mut pending, text);
                if last {
                    out.push(self.finish(stream.to_owned(), pending));
                } else {
                    self.pending.insert(stream.to_owned(), pending);
                }
            }
        }
    }

    fn append(&mut self, pending: &mut Pending, text: &[u8]) {
        let room = MAX_RECORD_BYTES.saturating_sub(pending.text.len());
        let kept = text.len().min(room);
        pending.text.extend_from_slice(&text[..kept]);
        pending.dropped += (text.len() - kept) as u64;
    }

    fn finish(&mut self, stream: String, pending: Pending) -> Record {
        self.cut_bytes += pending.dropped;
        Record {
            time_unix_nano: pending.time_unix_nano,
            stream,
            text: pending.text,
        }
    }
}

/// `<time> <stream> <P|F> <text>`: (time, stream, ends the record, text).
fn parse_cri(line: &[u8]) -> Option<(Option<u64>, &str, bool, &[u8])> {
    let mut parts = line.splitn(4, |b| *b == b' ');
    let time = std::str::from_utf8(parts.next()?).ok()?;
    let stream = match parts.next()? {
        b"stdout" => "stdout",
        b"stderr" => "stderr",
        _ => return None,
    };
    let last = match parts.next()? {
        b"F" => true,
        b"P" => false,
        _ => return None,
    };
    let text = parts.next().unwrap_or_default();
    let time = time
        .parse::<jiff::Timestamp>()
        .ok()
        .and_then(|t| u64::try_from(t.as_nanosecond()).ok());
    Some((time, stream, last, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(format: LogFormat, lines: &[&str]) -> (Vec<Record>, Assembler) {
        let mut assembler = Assembler::default();
        let mut out = Vec::new();
        for line in lines {
            assembler.push(format, "stdout", line.as_bytes(), &mut out);
        }
        (out, assembler)
    }

    #[test]
    fn cri_partial_lines_make_one_record_per_stream() {
        let (out, assembler) = records(
            LogFormat::Cri,
            &[
                "2026-12-06T10:00:00.000000001Z stdout P first ",
                "2026-12-06T10:00:01Z stderr F an error",
                "2026-12-06T10:00:02Z stdout P second ",
                "2026-12-06T10:00:03Z stdout F third",
                "not a cri line",
                "2026-12-06T10:00:04Z stdout P left open",
            ],
        );
        let texts: Vec<(&str, String)> = out
            .iter()
            .map(|r| {
                (
                    r.stream.as_str(),
                    String::from_utf8_lossy(&r.text).into_owned(),
                )
            })
            .collect();
        assert_eq!(
            texts,
            [
                ("stderr", "an error".to_owned()),
                ("stdout", "first second third".to_owned())
            ]
        );
        let first: jiff::Timestamp = "2026-12-06T10:00:00.000000001Z".parse().unwrap();
        assert_eq!(
            out[1].time_unix_nano,
            Some(first.as_nanosecond() as u64),
            "a record is timed by its first piece"
        );
        assert_eq!(assembler.malformed, 1);
        assert_eq!(assembler.pending["stdout"].text, b"left open");
    }

    #[test]
    fn a_long_record_is_kept_whole_up_to_the_limit_and_bounded_past_it() {
        let piece = "x".repeat(40_000);
        let lines = [
            format!("2026-12-06T10:00:00Z stdout P {piece}"),
            format!("2026-12-06T10:00:00Z stdout F {piece}"),
        ];
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        let (out, assembler) = records(LogFormat::Cri, &lines);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].text.len(), MAX_RECORD_BYTES);
        assert_eq!(assembler.cut_bytes, 80_000 - MAX_RECORD_BYTES as u64);
        let (plain, _) = records(LogFormat::Plain, &["one", "", "two"]);
        assert_eq!(plain.len(), 3);
        assert_eq!(plain[2].time_unix_nano, None);
    }

    #[test]
    fn a_pattern_maps_paths_to_instances() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for path in [
            "pods/acme_web-0_u1/app/0.log",
            "pods/acme_web-0_u1/app/0.log.20261206-100000",
            "pods/globex_db-1_u2/db/1.log",
            "pods/Bad_name_u3/app/0.log",
            "pods/acme_web-2_u4/app/notes.txt",
        ] {
            let path = root.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, "").unwrap();
        }
        let pattern = PathPattern::new(&format!(
            "{}/pods/{{project}}_{{instance}}_*/*/*.log",
            root.display()
        ))
        .unwrap();
        let files = pattern.files(100);
        let found: Vec<(String, Option<&str>, &str)> = files
            .iter()
            .map(|(p, l)| {
                (
                    p.strip_prefix(root).unwrap().display().to_string(),
                    l.project.as_deref(),
                    l.instance.as_str(),
                )
            })
            .collect();
        assert_eq!(
            found,
            [
                (
                    "pods/acme_web-0_u1/app/0.log".to_owned(),
                    Some("acme"),
                    "web-0"
                ),
                (
                    "pods/globex_db-1_u2/db/1.log".to_owned(),
                    Some("globex"),
                    "db-1"
                ),
            ]
        );
        assert_eq!(pattern.files(1).len(), 1, "bounded");
        for bad in [
            "relative/{instance}.log",
            "/var/log/{project}.log",
            "/x/{nope}/{instance}",
        ] {
            assert!(PathPattern::new(bad).is_err(), "{bad}");
        }
        let stream =
            PathPattern::new(&format!("{}/{{instance}}.{{stream}}", root.display())).unwrap();
        std::fs::write(root.join("web-9.stderr"), "").unwrap();
        assert_eq!(stream.files(10)[0].1.stream.as_deref(), Some("stderr"));
    }
}
