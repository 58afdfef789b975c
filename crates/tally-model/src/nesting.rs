//! How deep a text nests, measured by a linear scan before a parser reads
//! it.
//!
//! Parsers Tally uses recurse once per level of nesting without a limit of
//! their own (sonic-rs skipping the value of an unknown field,
//! serde_json_path's grammar, promql-parser), so a deep enough input
//! overflows the thread's stack and aborts the process; serde_json_path
//! also takes time exponential in how deep filters nest, and the YAML
//! parser time that grows faster than linearly with nesting (100,000 levels
//! in 586 KiB took 40 s), checking its own recursion limit only after the
//! whole document has been parsed into events. Their callers measure first:
//!
//! - [`nesting_exceeds`]: brackets and parentheses of JSON, JSONPath and
//!   MetricsQL, outside quoted strings;
//! - [`yaml_too_deep`]: YAML, counting indentation levels of block
//!   collections, compact `- - x` sequences and flow collections `[` `{`,
//!   outside quoted scalars, comments and block scalars (`|`, `>`). It may
//!   count a level a parser would not (a plain scalar's continuation line).
//!
//! **Invariant:** both read each byte once and never under-count: a text
//! nested deeper than the limit is always refused, unread by the parser.

/// How deeply a manifest may nest. Kubernetes-style manifests nest about
/// ten levels; the bound leaves room for over-counting.
pub const MAX_MANIFEST_DEPTH: usize = 64;

/// The first line (1-based) at which `text` may nest deeper than `max`
/// levels, or `None` if it never does.
pub fn yaml_too_deep(text: &str, max: usize) -> Option<usize> {
    let mut scan = Scan::default();
    for (index, line) in text.lines().enumerate() {
        if scan.line(line) > max {
            return Some(index + 1);
        }
    }
    None
}

/// Whether `[`, `{` or `(` outside quoted strings (`"…"` or `'…'`, with
/// backslash escapes) nest deeper than `limit`.
pub fn nesting_exceeds(text: &[u8], limit: usize) -> bool {
    let mut depth = 0usize;
    let mut quote: Option<u8> = None;
    let mut escaped = false;
    for &b in text {
        if let Some(q) = quote {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                _ if b == q => quote = None,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' | b'\'' => quote = Some(b),
            b'[' | b'{' | b'(' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' | b')' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// The columns where the items of the `- ` indicators a line's content
/// starts with begin (`- - x` at indent 0: 2 and 4).
fn item_columns(content: &[u8], indent: usize) -> Vec<usize> {
    let mut columns = Vec::new();
    let mut at = 0;
    while content.get(at) == Some(&b'-')
        && content.get(at + 1).is_none_or(|&b| b == b' ' || b == b'\t')
    {
        at += 1;
        while content.get(at).is_some_and(|&b| b == b' ' || b == b'\t') {
            at += 1;
        }
        columns.push(indent + at);
    }
    columns
}

#[derive(Default)]
struct Scan {
    /// The open block collections, innermost last: their indentation, and
    /// whether it is a sequence at the same indentation as its key (which
    /// indentation alone does not show).
    levels: Vec<(usize, bool)>,
    /// Open `[` and `{`.
    flow: usize,
    /// Inside a quoted scalar that goes on past its line.
    quote: Option<u8>,
    /// Inside a block scalar whose header stood on a line so indented.
    block_scalar: Option<usize>,
    /// The column of a key whose value starts on the next line.
    open_key: Option<usize>,
}

impl Scan {
    /// Reads one line; the deepest nesting seen on it.
    fn line(&mut self, line: &str) -> usize {
        let bytes = line.as_bytes();
        let indent = bytes.iter().take_while(|&&b| b == b' ').count();
        let blank = indent == bytes.len() || bytes[indent] == b'#';
        if let Some(parent) = self.block_scalar {
            if blank || indent > parent {
                return 0;
            }
            self.block_scalar = None;
        }
        if blank && self.quote.is_none() {
            return 0;
        }
        let content = &bytes[indent..];
        if self.quote.is_none() && self.flow == 0 {
            self.open_levels(indent, &item_columns(content, indent), content);
        }
        self.tokens(content, indent)
    }

    /// Closes the block collections a line at `indent` ends, and opens the
    /// ones it starts: its own, and one per `- ` it starts with, at the
    /// column of that item's content (`items`); `content` is the line after
    /// its indentation.
    fn open_levels(&mut self, indent: usize, items: &[usize], content: &[u8]) {
        while self.levels.last().is_some_and(|&(top, _)| top > indent) {
            self.levels.pop();
        }
        if items.is_empty() && self.levels.last() == Some(&(indent, true)) {
            self.levels.pop();
        }
        // A line that is a flow collection (`{...}`, `[...]`) opens no block
        // level of its own: its brackets count it.
        let flow_node = items.is_empty() && matches!(content.first(), Some(b'{' | b'['));
        if !flow_node && self.levels.last().is_none_or(|&(top, _)| top < indent) {
            self.levels.push((indent, false));
        }
        if !items.is_empty() && self.open_key == Some(indent) {
            self.levels.push((indent, true));
        }
        self.open_key = None;
        for &column in items {
            if self.levels.last().is_none_or(|&(top, _)| top < column) {
                self.levels.push((column, false));
            }
        }
    }

    /// Scans a line's content after its indentation.
    fn tokens(&mut self, bytes: &[u8], indent: usize) -> usize {
        let mut deepest = self.levels.len() + self.flow;
        // Whether a scalar may start here (a quote opens one only there).
        let mut token_start = true;
        // Where the line's key starts (after any `- `), and its last
        // significant byte outside quotes and comments.
        let mut key_column = None;
        let mut last = 0;
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            if let Some(q) = self.quote {
                i += self.skip_quoted(&bytes[i..], q);
                token_start = false;
                last = q;
                continue;
            }
            let next_is_space = bytes.get(i + 1).is_none_or(|&n| n == b' ' || n == b'\t');
            match b {
                b'#' if token_start || i == 0 || bytes[i - 1] == b' ' => break,
                b'\'' | b'"' if token_start => self.quote = Some(b),
                // Inside a plain scalar (`a: x[1]`) a bracket is text.
                b'[' | b'{' if token_start => self.flow += 1,
                b']' | b'}' => self.flow = self.flow.saturating_sub(1),
                b'|' | b'>' if token_start && self.flow == 0 => {
                    self.block_scalar = Some(indent);
                    break;
                }
                _ => {}
            }
            if b != b' ' && b != b'\t' {
                last = b;
                if b != b'-' || !next_is_space {
                    key_column.get_or_insert(indent + i);
                }
            }
            deepest = deepest.max(self.levels.len() + self.flow);
            token_start = match b {
                b' ' | b'\t' => token_start,
                // Only a bracket that opened a collection, or a comma
                // between flow entries, starts a new scalar.
                b'[' | b'{' => token_start,
                b',' => self.flow > 0,
                // In flow context (JSON) a value may follow `:` at once.
                b':' => next_is_space || self.flow > 0,
                b'-' | b'?' => token_start && next_is_space,
                _ => false,
            };
            i += 1;
        }
        if last == b':' && self.flow == 0 && self.quote.is_none() {
            self.open_key = key_column;
        }
        deepest
    }

    /// Skips quoted text up to and including its closing quote `q`, if on
    /// this line; how many bytes were read.
    fn skip_quoted(&mut self, bytes: &[u8], q: u8) -> usize {
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'\\' if q == b'"' => i += 2,
                b'\'' if q == b'\'' && bytes.get(i + 1) == Some(&b'\'') => i += 2,
                c if c == q => {
                    self.quote = None;
                    return i + 1;
                }
                _ => i += 1,
            }
        }
        bytes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn depth(text: &str) -> usize {
        let mut scan = Scan::default();
        text.lines().map(|l| scan.line(l)).max().unwrap_or(0)
    }

    #[test]
    fn counts_block_flow_and_compact_nesting() {
        assert_eq!(depth("a: 1\nb: 2\n"), 1);
        assert_eq!(depth("a:\n  b:\n    c: 1\n"), 3);
        assert_eq!(depth("a: [1, [2, [3]]]\n"), 4);
        assert_eq!(depth("- - - x\n"), 4);
        assert_eq!(depth("{\"a\": {\"b\": [1]}}"), 3);
        assert_eq!(depth("a:\n  {b: {c: 1}}\n"), 3);
        assert_eq!(depth("- a:\n    b: 1\n  c: 2\n- d\n"), 3);
        // An item that is a scalar counts as a level too.
        assert_eq!(depth("a:\n- b:\n  - 1\nc: 2\n"), 5);
    }

    #[test]
    fn ignores_quotes_comments_and_block_scalars() {
        assert_eq!(depth("a: '[[[[['\nb: \"{{{\\\"{{\"\n"), 1);
        assert_eq!(depth("a: it's [1]\n"), 1);
        assert_eq!(depth("a: a[\nb:\n  c:\n  - 1\n"), 4);
        assert_eq!(depth("a: 1 # [[[[[[\n"), 1);
        assert_eq!(depth("a: |\n      [[[[[[\n        [[[[\nb: 1\n"), 1);
        assert_eq!(depth("a: 'multi\n  [[[[ line'\nb: 1\n"), 1);
    }

    #[test]
    fn finds_the_line_of_deep_text() {
        let deep = "[".repeat(100_000);
        assert_eq!(yaml_too_deep(&deep, MAX_MANIFEST_DEPTH), Some(1));
        let mut block = String::new();
        for level in 0..100 {
            block.push_str(&" ".repeat(level));
            block.push_str("a:\n");
        }
        assert_eq!(yaml_too_deep(&block, MAX_MANIFEST_DEPTH), Some(65));
        let manifest = "apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\n  namespace: n\nstringData:\n  token: abc\n";
        assert_eq!(yaml_too_deep(manifest, MAX_MANIFEST_DEPTH), None);
    }

    #[test]
    fn counts_levels_outside_strings() {
        assert!(!nesting_exceeds(b"[[{(x)}]]", 4));
        assert!(nesting_exceeds(b"[[{(x)}]]", 3));
        assert!(!nesting_exceeds(b"[1][2][3][4][5]", 1));
        assert!(!nesting_exceeds(br#"{"a":"[[[[","b":'((((('}"#, 1));
        assert!(!nesting_exceeds(br#"{"a":"\"[[[[","b":'\'((((('}"#, 1));
        assert!(nesting_exceeds(br#"{"a":"\\"[[[[}"#, 2));
        assert!(nesting_exceeds(&b"(".repeat(1_000_000), 64));
    }

    /// The nesting depth of a JSON value, counting each array and object.
    fn json_depth(v: &serde_json::Value) -> usize {
        match v {
            serde_json::Value::Array(a) => 1 + a.iter().map(json_depth).max().unwrap_or(0),
            serde_json::Value::Object(o) => 1 + o.values().map(json_depth).max().unwrap_or(0),
            _ => 0,
        }
    }

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<i64>().prop_map(serde_json::Value::from),
            "[a-z'\\[\\]{}#|>\" :,?-]{0,8}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(12, 64, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                prop::collection::btree_map("[a-z]{1,4}", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Never counts fewer levels than the text has, in JSON or in the
        /// block YAML a YAML writer makes of the same value.
        #[test]
        fn never_undercounts(value in json_value()) {
            let real = json_depth(&value);
            let json = serde_json::to_string(&value).unwrap();
            prop_assert!(depth(&json) >= real, "json {json}: {} < {real}", depth(&json));
            let yaml = serde_norway::to_string(&value).unwrap();
            let counted = depth(&yaml);
            // A block YAML writer puts one level of an empty collection
            // inline (`[]`, `{}`), which is still counted.
            prop_assert!(counted >= real, "yaml {yaml}: {counted} < {real}");
        }
    }
}
