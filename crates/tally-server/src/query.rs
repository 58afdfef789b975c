//! Query-string parsing with repeated keys (`subject=a&subject=b`) and
//! OpenMeter's `filterGroupBy[key]=value`.

use std::collections::BTreeMap;
use std::str::FromStr;

use jiff::Timestamp;

use crate::problem::Problem;

pub struct Params(Vec<(String, String)>);

/// The parameters that name a key in brackets (`filterGroupBy[model]`).
const BRACKETED: [&str; 2] = ["filterGroupBy", "filter"];

impl Params {
    pub fn parse(query: Option<&str>) -> Result<Params, Problem> {
        Ok(Params(
            form_urlencoded::parse(query.unwrap_or("").as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        ))
    }

    /// Refuses parameters this endpoint does not know, so typos are not ignored.
    /// Only the parameters in [`BRACKETED`] take `[name]` after them.
    pub fn only(&self, known: &[&str]) -> Result<(), Problem> {
        for (key, _) in &self.0 {
            let base = key.split('[').next().unwrap_or(key);
            if !known.contains(&base) || (base != key && !BRACKETED.contains(&base)) {
                return Err(Problem::bad_request(format!(
                    "unknown query parameter {key:?}; known: {}",
                    known.join(", ")
                )));
            }
        }
        Ok(())
    }

    /// The values of an array parameter in either of OpenMeter's
    /// encodings: repeated (`subject=a&subject=b`) or comma-separated
    /// (`subject=a,b`); empty items are dropped.
    pub fn list(&self, key: &str) -> Vec<String> {
        self.all(key)
            .iter()
            .flat_map(|v| v.split(','))
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// Refuses a parameter this server knows but cannot honour, naming why.
    pub fn refuse(&self, key: &str, why: &str) -> Result<(), Problem> {
        match self
            .0
            .iter()
            .find(|(k, _)| k == key || k.starts_with(&format!("{key}[")))
        {
            Some((k, _)) => Err(Problem::bad_request(format!(
                "query parameter {k:?} is not supported: {why}"
            ))),
            None => Ok(()),
        }
    }

    pub fn all(&self, key: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .collect()
    }

    pub fn one(&self, key: &str) -> Result<Option<String>, Problem> {
        let mut values = self.all(key);
        match values.len() {
            0 => Ok(None),
            1 => Ok(values.pop()),
            _ => Err(Problem::bad_request(format!(
                "query parameter {key:?} may be given once"
            ))),
        }
    }

    pub fn parsed<T: FromStr>(&self, key: &str, what: &str) -> Result<Option<T>, Problem>
    where
        T::Err: std::fmt::Display,
    {
        self.one(key)?
            .map(|v| {
                v.parse::<T>()
                    .map_err(|e| Problem::bad_request(format!("{key}={v:?} is not {what}: {e}")))
            })
            .transpose()
    }

    pub fn timestamp(&self, key: &str) -> Result<Option<Timestamp>, Problem> {
        self.parsed(key, "an RFC 3339 timestamp")
    }

    pub fn number(&self, key: &str) -> Result<Option<usize>, Problem> {
        self.parsed(key, "a non-negative integer")
    }

    /// `prefix[key]=value` pairs.
    pub fn bracketed(&self, prefix: &str) -> Result<BTreeMap<String, String>, Problem> {
        let mut out = BTreeMap::new();
        for (k, v) in &self.0 {
            if let Some(rest) = k.strip_prefix(prefix).and_then(|r| r.strip_prefix('['))
                && let Some(name) = rest.strip_suffix(']')
                && out.insert(name.to_owned(), v.clone()).is_some()
            {
                return Err(Problem::bad_request(format!("{k} may be given once")));
            }
        }
        Ok(out)
    }
}

/// A map of strings given as one parameter value: a JSON object
/// (`{"model":"small"}`), or the Python literal OpenMeter's official Python
/// SDK sends for a `dict[str, str]` parameter (`{'model': 'small'}`).
pub fn string_map(key: &str, text: &str) -> Result<BTreeMap<String, String>, Problem> {
    if let Ok(map) = serde_json::from_str::<BTreeMap<String, String>>(text) {
        return Ok(map);
    }
    python_dict(text).ok_or_else(|| {
        Problem::bad_request(format!(
            "{key}={text:?} is not an object of strings; use {key}[name]=value"
        ))
    })
}

/// `{'a': 'b', "c": 'd'}`: Python's repr of a `dict[str, str]`.
fn python_dict(text: &str) -> Option<BTreeMap<String, String>> {
    let mut chars = text.trim().chars().peekable();
    let skip_spaces = |chars: &mut std::iter::Peekable<std::str::Chars>| {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
    };
    let string = |chars: &mut std::iter::Peekable<std::str::Chars>| -> Option<String> {
        let quote = chars.next().filter(|q| *q == '\'' || *q == '"')?;
        let mut out = String::new();
        loop {
            match chars.next()? {
                c if c == quote => return Some(out),
                '\\' => out.push(match chars.next()? {
                    'n' => '\n',
                    't' => '\t',
                    'r' => '\r',
                    c @ ('\\' | '\'' | '"') => c,
                    _ => return None,
                }),
                c => out.push(c),
            }
        }
    };
    if chars.next()? != '{' {
        return None;
    }
    let mut map = BTreeMap::new();
    loop {
        skip_spaces(&mut chars);
        if chars.peek() == Some(&'}') && map.is_empty() {
            chars.next();
            break;
        }
        let k = string(&mut chars)?;
        skip_spaces(&mut chars);
        if chars.next()? != ':' {
            return None;
        }
        skip_spaces(&mut chars);
        let v = string(&mut chars)?;
        map.insert(k, v);
        skip_spaces(&mut chars);
        match chars.next()? {
            ',' => continue,
            '}' => break,
            _ => return None,
        }
    }
    chars.next().is_none().then_some(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_as_json_or_python_literals() {
        let want = BTreeMap::from([
            ("model".to_owned(), "small".to_owned()),
            ("r".into(), "it's".into()),
        ]);
        assert_eq!(
            string_map("f", r#"{"model":"small","r":"it's"}"#).unwrap(),
            want
        );
        assert_eq!(
            string_map("f", r#"{'model': 'small', 'r': "it's"}"#).unwrap(),
            want
        );
        assert_eq!(
            string_map("f", r"{'model': 'small', 'r': 'it\'s'}").unwrap(),
            want
        );
        assert!(string_map("f", "{}").unwrap().is_empty());
        for bad in [
            "model=small",
            "{'a': 1}",
            "{'a': 'b'",
            "{'a' 'b'}",
            "{'a': 'b'} x",
            "['a']",
        ] {
            assert!(string_map("f", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn repeated_and_bracketed_keys() {
        let p = Params::parse(Some(
            "subject=a&subject=b&filterGroupBy%5Bmethod%5D=GET&limit=5",
        ))
        .unwrap();
        assert_eq!(p.all("subject"), ["a", "b"]);
        let commas = Params::parse(Some("subject=a,b&subject=c&groupBy=x%2Cy")).unwrap();
        assert_eq!(commas.list("subject"), ["a", "b", "c"]);
        assert_eq!(commas.list("groupBy"), ["x", "y"]);
        assert!(commas.refuse("groupBy", "no").is_err());
        assert!(commas.refuse("filterCustomerId", "no").is_ok());
        assert_eq!(p.bracketed("filterGroupBy").unwrap()["method"], "GET");
        assert_eq!(p.number("limit").unwrap(), Some(5));
        assert!(p.one("subject").is_err());
        assert!(p.only(&["subject", "limit"]).is_err());
        assert!(p.only(&["subject", "limit", "filterGroupBy"]).is_ok());
        let indexed = Params::parse(Some("groupBy%5B0%5D=model")).unwrap();
        assert!(
            indexed.only(&["groupBy"]).is_err(),
            "groupBy[0] is not ignored"
        );
        assert!(
            Params::parse(Some("limit=-1"))
                .unwrap()
                .number("limit")
                .is_err()
        );
    }
}
