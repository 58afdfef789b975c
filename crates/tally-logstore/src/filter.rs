//! Line filters: `--grep TEXT` and LogQL's `|=`, `!=`, `|~`, `!~`.
//!
//! A regex is bounded before it runs: at most [`MAX_PATTERN_BYTES`] of
//! pattern, compiled under a size limit, and matched by the `regex` crate
//! in time linear in the line (no backtracking), so a tenant's pattern
//! cannot stall a reader.

use memchr::memmem;

/// The longest filter text or pattern accepted.
pub const MAX_PATTERN_BYTES: usize = 1024;
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// One line filter.
#[derive(Debug, Clone)]
pub enum LineFilter {
    /// The line contains the text.
    Contains(String),
    /// The line does not contain the text.
    NotContains(String),
    /// The line matches the regex.
    Matches(regex::Regex),
    /// The line does not match the regex.
    NotMatches(regex::Regex),
}

/// A filter that cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct FilterError(String);

impl LineFilter {
    /// `|=` / `!=` (`negate`) of `text`.
    pub fn text(text: &str, negate: bool) -> Result<LineFilter, FilterError> {
        bound(text)?;
        Ok(if negate {
            LineFilter::NotContains(text.to_owned())
        } else {
            LineFilter::Contains(text.to_owned())
        })
    }

    /// `|~` / `!~` (`negate`) of `pattern` (RE2 syntax, as LogQL).
    pub fn regex(pattern: &str, negate: bool) -> Result<LineFilter, FilterError> {
        bound(pattern)?;
        let re = regex::RegexBuilder::new(pattern)
            .size_limit(REGEX_SIZE_LIMIT)
            .dfa_size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map_err(|e| FilterError(format!("regex {pattern:?}: {e}")))?;
        Ok(if negate {
            LineFilter::NotMatches(re)
        } else {
            LineFilter::Matches(re)
        })
    }

    pub fn keeps(&self, line: &str) -> bool {
        match self {
            LineFilter::Contains(t) => memmem::find(line.as_bytes(), t.as_bytes()).is_some(),
            LineFilter::NotContains(t) => memmem::find(line.as_bytes(), t.as_bytes()).is_none(),
            LineFilter::Matches(re) => re.is_match(line),
            LineFilter::NotMatches(re) => !re.is_match(line),
        }
    }
}

fn bound(text: &str) -> Result<(), FilterError> {
    if text.len() > MAX_PATTERN_BYTES {
        return Err(FilterError(format!(
            "a line filter is at most {MAX_PATTERN_BYTES} bytes"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_keep_what_they_say() {
        let line = "GET /healthz 200";
        assert!(LineFilter::text("healthz", false).unwrap().keeps(line));
        assert!(!LineFilter::text("healthz", true).unwrap().keeps(line));
        assert!(
            LineFilter::regex("^GET .* 2\\d\\d$", false)
                .unwrap()
                .keeps(line)
        );
        assert!(!LineFilter::regex("5\\d\\d", false).unwrap().keeps(line));
        assert!(LineFilter::regex("5\\d\\d", true).unwrap().keeps(line));
    }

    #[test]
    fn oversized_patterns_are_refused() {
        assert!(LineFilter::regex(&"a".repeat(MAX_PATTERN_BYTES + 1), false).is_err());
        // A pattern that expands past the compiled size limit.
        assert!(LineFilter::regex("(\\w{100}){100}", false).is_err());
        assert!(LineFilter::regex("(", false).is_err());
    }
}
