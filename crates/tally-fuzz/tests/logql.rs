//! The LogQL subset of the Loki API (`tally_logstore::logql::parse`): any
//! text is parsed or refused with a reason, never panics; what parses
//! parses again with whitespace around it, and its filters run on any line.

use proptest::prelude::*;
use proptest::sample::select;
use tally_fuzz::{Input, fuzz, inputs, replay};
use tally_logstore::logql;

const TARGET: &str = "logql";

fn check(bytes: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(bytes);
    let parsed = match logql::parse(&text) {
        Err(e) if e.to_string().is_empty() => return Err("refused without a reason".into()),
        Err(_) => return Ok(()),
        Ok(q) => q,
    };
    if text.len() + 4 <= logql::MAX_QUERY_BYTES && logql::parse(&format!(" \n{text}\t ")).is_err() {
        return Err("accepted, but not with surrounding whitespace".into());
    }
    for line in ["", "error 503", "é\u{0}\n", &text] {
        let _ = parsed.filters.iter().all(|f| f.keeps(line));
        let _ = parsed.selects(&[("instance", line), ("stream", "stdout")]);
    }
    Ok(())
}

const LABELS: &[&str] = &[
    "instance", "project", "stream", "workload", "a_b", "é", "0bad", "",
];
const OPS: &[&str] = &["=", "!=", "=~", "!~", "==", "~"];
const VALUES: &[&str] = &[
    "web-0",
    "",
    "a\\\"b",
    "\\\\",
    "a\\nb",
    "(unclosed",
    ".*",
    "a|b",
    "\\p{L}+",
    "x{1000}{1000}",
    "é",
];
const FILTERS: &[&str] = &["|=", "!=", "|~", "!~", "|", "| json", "|= |="];

fn query() -> BoxedStrategy<Input> {
    let quote = select(&["\"", "`", "'"][..]);
    let matcher = (select(LABELS), select(OPS), quote.clone(), select(VALUES))
        .prop_map(|(l, op, q, v)| format!("{l}{op}{q}{v}{q}"));
    let filter =
        (select(FILTERS), quote, select(VALUES)).prop_map(|(f, q, v)| format!(" {f} {q}{v}{q}"));
    (
        proptest::collection::vec(matcher, 0..4),
        select(&[",", ""][..]),
        proptest::collection::vec(filter, 0..4),
    )
        .prop_map(|(m, trailing, f)| {
            Input(format!("{{{}{trailing}}}{}", m.join(", "), f.concat()).into_bytes())
        })
        .boxed()
}

#[test]
fn fuzz_logql() {
    fuzz(TARGET, || inputs(TARGET, query()), |input| check(input));
}

#[test]
fn corpus_logql() {
    replay(TARGET, check);
}
