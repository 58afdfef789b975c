//! How deep a text nests, measured before a recursive parser reads it.
//!
//! Parsers Tally uses recurse once per level of nesting without a limit of
//! their own (sonic-rs skipping the value of an unknown field,
//! serde_json_path's grammar), so a deep enough input overflows the
//! thread's stack and aborts the process; serde_json_path also takes time
//! exponential in how deep filters nest. Their callers measure first.
//!
//! **Invariant:** [`nesting_exceeds`] never answers `false` for a text
//! nested deeper than the limit (it over-counts brackets it cannot place,
//! never under-counts), and reads each byte once.

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
