//! The benchmark's events as an NDJSON file, so other systems can load the
//! very events `tally bench` sends (`bench/compare-storage.py`).
//!
//! Format: one CloudEvent (structured JSON) per line, `\n`-terminated, in
//! the order `tally bench` sends them; the same generator as the HTTP
//! bodies, so a file written with `--now T` holds the events of a run with
//! `--now T`. Reading turns each `batch` lines into one JSON-array body.
//! Bounded: at most [`MAX_EVENTS`] lines of at most [`MAX_LINE`] bytes.

use std::io::{BufRead, Read, Write};
use std::path::Path;

use anyhow::{Context, bail};

use crate::{Bodies, LoadOptions, PREGENERATED_EVENTS, for_each_event};

/// The most events a file may hold: they are read into memory before the
/// clock starts.
pub const MAX_EVENTS: usize = PREGENERATED_EVENTS;
/// The longest line accepted (the generator's are about 260 bytes).
pub const MAX_LINE: usize = 64 * 1024;

/// Writes the events of load `o` to `path` as NDJSON.
pub fn write(o: &LoadOptions, path: &Path) -> anyhow::Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    let mut buffer = Vec::with_capacity(o.batch * 260);
    for b in 0..o.requests() {
        buffer.clear();
        for_each_event(o, b, &mut buffer, |buffer, i| {
            if i > 0 {
                buffer.push(b'\n');
            }
        });
        buffer.push(b'\n');
        out.write_all(&buffer)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    out.flush()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Reads an NDJSON file into request bodies of `batch` events each;
/// returns them and the number of events. Empty lines are skipped.
pub(crate) fn read(path: &Path, batch: usize) -> anyhow::Result<(Bodies, usize)> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let (bodies, events) = read_from(std::io::BufReader::new(file), batch)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok((
        Bodies::Made(bodies.into_iter().map(Into::into).collect()),
        events,
    ))
}

fn read_from(mut input: impl BufRead, batch: usize) -> anyhow::Result<(Vec<Vec<u8>>, usize)> {
    let batch = batch.max(1);
    let (mut bodies, mut body, mut events) = (Vec::new(), Vec::new(), 0usize);
    let mut line = Vec::new();
    let mut number = 0usize;
    loop {
        line.clear();
        number += 1;
        let read = input
            .by_ref()
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if read == 0 {
            break;
        }
        if line.len() > MAX_LINE {
            bail!("line {number} is longer than {MAX_LINE} bytes");
        }
        let event = line.trim_ascii();
        if event.is_empty() {
            continue;
        }
        if events == MAX_EVENTS {
            bail!("more than {MAX_EVENTS} events");
        }
        body.push(if body.is_empty() { b'[' } else { b',' });
        body.extend_from_slice(event);
        events += 1;
        if events % batch == 0 {
            body.push(b']');
            bodies.push(std::mem::take(&mut body));
        }
    }
    if !body.is_empty() {
        body.push(b']');
        bodies.push(body);
    }
    Ok((bodies, events))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Order, body};

    fn load(events: usize, batch: usize) -> LoadOptions {
        LoadOptions {
            events,
            batch,
            connections: 1,
            subjects: 10,
            now: "2026-12-01T00:00:00Z".parse().unwrap(),
            order: Order::Random,
        }
    }

    /// The file read back gives exactly the bodies `tally bench` sends.
    #[test]
    fn a_written_file_reads_back_as_the_same_bodies() {
        let o = load(2_500, 1_000);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.ndjson");
        write(&o, &path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2_500);
        let (Bodies::Made(bodies), events) = read(&path, 1_000).unwrap() else {
            panic!("bodies not made")
        };
        assert_eq!(events, 2_500);
        let sent: Vec<Vec<u8>> = (0..o.requests()).map(|b| body(&o, b)).collect();
        assert_eq!(
            bodies,
            sent.into_iter().map(bytes::Bytes::from).collect::<Vec<_>>()
        );
        // Every line is one JSON event; ids are unique.
        let ids: std::collections::BTreeSet<String> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].to_string())
            .collect();
        assert_eq!(ids.len(), 2_500);
    }

    #[test]
    fn batches_split_on_the_batch_size_and_blank_lines_are_skipped() {
        let input = b"{\"a\":1}\n\n{\"a\":2}\r\n{\"a\":3}";
        let (bodies, events) = read_from(&input[..], 2).unwrap();
        assert_eq!(events, 3);
        assert_eq!(
            bodies,
            vec![b"[{\"a\":1},{\"a\":2}]".to_vec(), b"[{\"a\":3}]".to_vec()]
        );
    }

    #[test]
    fn an_overlong_line_is_refused() {
        let mut input = vec![b'x'; MAX_LINE + 1];
        input.push(b'\n');
        let error = read_from(&input[..], 10).unwrap_err();
        assert!(error.to_string().contains("longer than"), "{error}");
        // Exactly MAX_LINE bytes with its newline is fine.
        let mut input = vec![b'x'; MAX_LINE - 1];
        input.push(b'\n');
        assert_eq!(read_from(&input[..], 10).unwrap().1, 1);
    }
}
