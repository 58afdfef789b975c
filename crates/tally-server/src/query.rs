//! Query-string parsing with repeated keys (`subject=a&subject=b`) and
//! OpenMeter's `filterGroupBy[key]=value`.

use std::collections::BTreeMap;
use std::str::FromStr;

use jiff::Timestamp;

use crate::problem::Problem;

pub struct Params(Vec<(String, String)>);

impl Params {
    pub fn parse(query: Option<&str>) -> Result<Params, Problem> {
        Ok(Params(
            form_urlencoded::parse(query.unwrap_or("").as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        ))
    }

    /// Refuses parameters this endpoint does not know, so typos are not ignored.
    pub fn only(&self, known: &[&str]) -> Result<(), Problem> {
        for (key, _) in &self.0 {
            let base = key.split('[').next().unwrap_or(key);
            if !known.contains(&base) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(
            Params::parse(Some("limit=-1"))
                .unwrap()
                .number("limit")
                .is_err()
        );
    }
}
