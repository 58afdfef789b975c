//! The LogQL subset Tally answers for Grafana: a stream selector of label
//! matchers (`=`, `!=`, `=~`, `!~`) followed by line filters (`|=`, `!=`,
//! `|~`, `!~`); strings in double quotes (with `\"`, `\\`, `\n`, `\t`
//! escapes) or backticks. Anything else (parsers, label filters, metric
//! queries) is refused with what is supported.
//!
//! Bounded before it is read: at most [`MAX_QUERY_BYTES`], at most
//! [`MAX_PARTS`] matchers and filters; regexes as in [`crate::filter`].

use crate::filter::{FilterError, LineFilter};

pub const MAX_QUERY_BYTES: usize = 4096;
pub const MAX_PARTS: usize = 16;

/// How a label is matched.
#[derive(Debug, Clone)]
pub enum MatchOp {
    Eq(String),
    Ne(String),
    Re(regex::Regex),
    Nre(regex::Regex),
}

/// One label matcher.
#[derive(Debug, Clone)]
pub struct Matcher {
    pub label: String,
    pub op: MatchOp,
}

impl Matcher {
    /// Whether a stream whose `label` is `value` (absent: empty) matches.
    pub fn matches(&self, value: &str) -> bool {
        match &self.op {
            MatchOp::Eq(v) => v == value,
            MatchOp::Ne(v) => v != value,
            MatchOp::Re(re) => full_match(re, value),
            MatchOp::Nre(re) => !full_match(re, value),
        }
    }

    /// The value an `=` matcher names.
    pub fn equals(&self) -> Option<&str> {
        match &self.op {
            MatchOp::Eq(v) => Some(v),
            _ => None,
        }
    }
}

/// LogQL label regexes are anchored at both ends.
fn full_match(re: &regex::Regex, value: &str) -> bool {
    re.find(value)
        .is_some_and(|m| m.start() == 0 && m.end() == value.len())
}

/// A parsed query.
#[derive(Debug, Clone, Default)]
pub struct LogQl {
    pub matchers: Vec<Matcher>,
    pub filters: Vec<LineFilter>,
}

impl LogQl {
    /// Whether the labels `(name, value)` of a stream match every matcher
    /// (a label the stream lacks has the empty value).
    pub fn selects(&self, labels: &[(&str, &str)]) -> bool {
        self.matchers.iter().all(|m| {
            let value = labels
                .iter()
                .find(|(n, _)| *n == m.label)
                .map_or("", |(_, v)| *v);
            m.matches(value)
        })
    }

    /// The value of the first `label="value"` matcher.
    pub fn equal(&self, label: &str) -> Option<&str> {
        self.matchers
            .iter()
            .filter(|m| m.label == label)
            .find_map(Matcher::equals)
    }
}

/// Why a query was refused.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "LogQL: {0} (Tally answers a stream selector `{{label=\"value\", ...}}` with line filters `|=`, `!=`, `|~`, `!~`)"
)]
pub struct LogQlError(String);

impl From<FilterError> for LogQlError {
    fn from(e: FilterError) -> LogQlError {
        LogQlError(e.to_string())
    }
}

struct Cursor<'a> {
    s: &'a str,
    at: usize,
}

impl Cursor<'_> {
    fn skip_space(&mut self) {
        while self.s[self.at..].starts_with(char::is_whitespace) {
            self.at += self.s[self.at..].chars().next().map_or(1, char::len_utf8);
        }
    }

    fn eat(&mut self, token: &str) -> bool {
        self.skip_space();
        if self.s[self.at..].starts_with(token) {
            self.at += token.len();
            true
        } else {
            false
        }
    }

    fn ident(&mut self) -> Result<String, LogQlError> {
        self.skip_space();
        let rest = &self.s[self.at..];
        let len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        if len == 0 {
            return Err(self.error("a label name"));
        }
        self.at += len;
        Ok(rest[..len].to_owned())
    }

    fn string(&mut self) -> Result<String, LogQlError> {
        self.skip_space();
        let rest = &self.s[self.at..];
        if let Some(body) = rest.strip_prefix('`') {
            let end = body
                .find('`')
                .ok_or_else(|| self.error("a closing backtick"))?;
            self.at += end + 2;
            return Ok(body[..end].to_owned());
        }
        let Some(body) = rest.strip_prefix('"') else {
            return Err(self.error("a quoted string"));
        };
        let mut out = String::new();
        let mut chars = body.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.at += i + 2;
                    return Ok(out);
                }
                '\\' => match chars.next().map(|(_, c)| c) {
                    Some('n') => out.push('\n'),
                    Some('t') => out.push('\t'),
                    Some(c @ ('"' | '\\')) => out.push(c),
                    // RE2 escapes such as `\d` or `\.` pass through.
                    Some(c) => {
                        out.push('\\');
                        out.push(c);
                    }
                    None => break,
                },
                c => out.push(c),
            }
        }
        Err(self.error("a closing quote"))
    }

    fn error(&self, wanted: &str) -> LogQlError {
        LogQlError(format!("expected {wanted} at byte {}", self.at))
    }
}

/// Parses a query of the subset.
pub fn parse(query: &str) -> Result<LogQl, LogQlError> {
    if query.len() > MAX_QUERY_BYTES {
        return Err(LogQlError(format!(
            "a query is at most {MAX_QUERY_BYTES} bytes"
        )));
    }
    let mut c = Cursor { s: query, at: 0 };
    let mut out = LogQl::default();
    if !c.eat("{") {
        return Err(c.error("`{` opening a stream selector"));
    }
    if !c.eat("}") {
        loop {
            let label = c.ident()?;
            let op = if c.eat("=~") {
                MatchOp::Re(label_regex(&c.string()?)?)
            } else if c.eat("!~") {
                MatchOp::Nre(label_regex(&c.string()?)?)
            } else if c.eat("!=") {
                MatchOp::Ne(c.string()?)
            } else if c.eat("=") {
                MatchOp::Eq(c.string()?)
            } else {
                return Err(c.error("`=`, `!=`, `=~` or `!~`"));
            };
            out.matchers.push(Matcher { label, op });
            if out.matchers.len() > MAX_PARTS {
                return Err(LogQlError(format!("at most {MAX_PARTS} matchers")));
            }
            if c.eat("}") {
                break;
            }
            if !c.eat(",") {
                return Err(c.error("`,` or `}`"));
            }
        }
    }
    loop {
        let filter = if c.eat("|=") {
            LineFilter::text(&c.string()?, false)?
        } else if c.eat("!=") {
            LineFilter::text(&c.string()?, true)?
        } else if c.eat("|~") {
            LineFilter::regex(&c.string()?, false)?
        } else if c.eat("!~") {
            LineFilter::regex(&c.string()?, true)?
        } else {
            break;
        };
        out.filters.push(filter);
        if out.filters.len() > MAX_PARTS {
            return Err(LogQlError(format!("at most {MAX_PARTS} line filters")));
        }
    }
    c.skip_space();
    if c.at < query.len() {
        return Err(c.error("a line filter or the end of the query"));
    }
    Ok(out)
}

fn label_regex(pattern: &str) -> Result<regex::Regex, LogQlError> {
    match LineFilter::regex(pattern, false)? {
        LineFilter::Matches(re) => Ok(re),
        _ => Err(LogQlError("regex".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grafana_shaped_queries_parse() {
        let q = parse(
            r#"{instance="web-0", stream=~"std(out|err)"} |= "error" != `healthz` |~ "5\d\d""#,
        )
        .unwrap();
        assert_eq!(q.matchers.len(), 2);
        assert_eq!(q.equal("instance"), Some("web-0"));
        assert!(q.selects(&[("instance", "web-0"), ("stream", "stderr")]));
        assert!(!q.selects(&[("instance", "web-0"), ("stream", "stdio")]));
        assert_eq!(q.filters.len(), 3);
        assert!(q.filters.iter().all(|f| f.keeps("error 503")));
        assert!(!q.filters.iter().all(|f| f.keeps("error 503 healthz")));
        let q = parse(r#"{workload!="db"}"#).unwrap();
        assert!(q.selects(&[("workload", "web")]));
        assert!(parse("{}").unwrap().matchers.is_empty());
    }

    #[test]
    fn what_is_not_in_the_subset_is_refused() {
        for bad in [
            "",
            "rate({a=\"b\"}[5m])",
            "{a=\"b\"} | json",
            "{a=\"b\"",
            "{a=b}",
            "{a=\"b\"} |= ",
            "{a=\"unterminated}",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        assert!(parse(&format!("{{a=\"{}\"}}", "x".repeat(MAX_QUERY_BYTES))).is_err());
    }
}
