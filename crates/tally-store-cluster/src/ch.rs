//! ClickHouse over its HTTP interface: the schema, inserts and streamed
//! reads. Plain HTTP (reqwest, already in the workspace) keeps the build
//! light and works with ClickHouse 18.16 (Debian's) as with current
//! releases: no query parameters (18.16 has none), so string values are
//! quoted with [`lit`]; no `DateTime64`, so times are `Int64` nanoseconds.
//!
//! ## Schema (database `<db>`)
//!
//! `events`: one row per stream message the workers materialised.
//!
//! | column        | type   | meaning                                      |
//! |---------------|--------|----------------------------------------------|
//! | `source`,`id` | String | the dedupe key; the table's sorting key      |
//! | `seq`         | UInt64 | JetStream stream sequence of the message     |
//! | `version`     | UInt64 | `2^64-1 - seq`: the first stored copy wins    |
//! | `project`     | String | the project the message was published for    |
//! | `type`        | String | CloudEvent `type`                            |
//! | `subject`     | String | CloudEvent `subject`                         |
//! | `time_ns`     | Int64  | CloudEvent `time`, ns since the Unix epoch    |
//! | `ingested_ms` | Int64  | when a node acknowledged it, ms since epoch   |
//! | `event`       | String | the CloudEvent as JSON                        |
//!
//! Engine `ReplacingMergeTree(version)`, `ORDER BY (source, id)`, one
//! partition (rows of one key must share a partition to be replaced).
//!
//! `samples`: each meter's measured events — one row per (meter
//! generation, event) the meter measures, written by the roller
//! (`rollup.rs`) from the lowest stored copy of each event.
//!
//! | column          | type                    | meaning                                   |
//! |-----------------|-------------------------|-------------------------------------------|
//! | `meter`,`gen`   | String                  | meter name; hash of its definition        |
//! | `seq`           | UInt64                  | the event's stream sequence               |
//! | `time_ns`       | Int64                   | the event's time                          |
//! | `source`,`id`   | String                  | the event's dedupe key                    |
//! | `subject`       | String                  | CloudEvent `subject`                      |
//! | `gkey`          | String                  | `groups` as JSON (a sortable key)         |
//! | `groups`        | Array(Nullable(String)) | the meter's dimensions, in its order      |
//! | `exact`         | UInt8                   | 1 when `num` holds the value exactly      |
//! | `num`           | Decimal128(12)          | the numeric value (0 when not `exact`)    |
//! | `scale`         | UInt8                   | the value's decimal scale                 |
//! | `text`          | String                  | the value as text (UNIQUE_COUNT, MIN...)  |
//!
//! Engine `ReplacingMergeTree`, `ORDER BY (meter, gen, seq)`: one event has
//! one row per generation, and a sequence range is one key range.
//!
//! `rollups`: pre-summed slabs of `samples` (`presum.rs`), one row per
//! (meter, gen, `width`, `lo` (the slab `[lo, lo+width)` of sequences),
//! `unit` (ns: minute, hour or day), subject, `bucket` (`time_ns / unit`),
//! `gkey`) with `groups`, `rn` (count), `rok` (all exact), `rs` (sum,
//! `Decimal128(12)`), `rsc` (largest scale), `rmx` (largest |value|),
//! `rvn`/`rvt` (MIN or MAX as number and text; LATEST's text), `rlt`/`rls`
//! (LATEST's time and sequence), `ru` (UNIQUE_COUNT's values,
//! `Array(String)`); columns the
//! meter's aggregation does not use keep their defaults. Engine
//! `ReplacingMergeTree`, sorted by that key.
//!
//! `rollup_marks (meter, gen, width, below, at)`,
//! `ReplacingMergeTree(at)`, `ORDER BY (meter, gen, width)`: the latest row
//! (`at`, ns) says every sample (`width` 0) or slab of that width below
//! `below` is stored. Tables of the first layout (no `at`) are dropped and
//! rebuilt by the roller.
//!
//! **Invariant:** every read of `events` says `FINAL`, so each (source, id)
//! counts once — the copy with the lowest stream sequence — whether a
//! duplicate came days later through another node or a worker inserted the
//! same message twice (killed after its insert, before its ack).

use std::time::Duration;

use serde::de::DeserializeOwned;

/// Why ClickHouse did not answer.
#[derive(Debug, thiserror::Error)]
pub enum ChError {
    #[error("ClickHouse at {url} is unreachable: {message}")]
    Unreachable { url: String, message: String },
    #[error("ClickHouse refused a statement ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error("ClickHouse answered a row this build cannot read: {0}")]
    Decode(String),
}

impl ChError {
    /// A short, bounded name of the failure for metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            ChError::Unreachable { .. } => "unreachable",
            ChError::Refused { .. } => "refused",
            ChError::Decode(_) => "decode",
        }
    }
}

/// Longest ClickHouse error text kept in an error.
const MAX_ERROR_TEXT: usize = 2_000;

/// Longest row of an answer (an event's JSON is bounded by ingest).
const MAX_ROW_BYTES: usize = 8 << 20;

/// A ClickHouse HTTP endpoint and one database on it.
#[derive(Clone)]
pub struct Ch {
    http: reqwest::Client,
    url: String,
    /// `url` without credentials, for errors and logs.
    shown: String,
    pub database: String,
}

/// Quotes a string as a ClickHouse literal: backslash, quote and every
/// control byte escaped, so no value can end the literal.
pub fn lit(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\x{:02X}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// `url` with any `user:password@` removed, for errors and logs.
pub fn without_credentials(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) if scheme.is_empty() => rest[at + 1..].to_owned(),
        Some(at) => format!("{scheme}://{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// Whether `name` may be used as a database name unquoted.
pub fn valid_identifier(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit())
}

impl Ch {
    pub fn new(url: &str, database: &str, timeout: Duration) -> Result<Ch, ChError> {
        // A long scan streams its rows: bound each read, not the whole answer.
        let shown = without_credentials(url);
        let http = tally_delivery::client_builder()
            .read_timeout(timeout)
            .connect_timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| ChError::Unreachable {
                url: shown.clone(),
                message: e.without_url().to_string(),
            })?;
        Ok(Ch {
            http,
            shown,
            url: url.trim_end_matches('/').to_owned(),
            database: database.to_owned(),
        })
    }

    /// Creates the database and tables when missing.
    pub async fn migrate(&self) -> Result<(), ChError> {
        let db = &self.database;
        self.execute(&format!("CREATE DATABASE IF NOT EXISTS {db}"))
            .await?;
        self.execute(&format!(
            "CREATE TABLE IF NOT EXISTS {db}.events (\
             source String, id String, seq UInt64, version UInt64, project String, \
             type String, subject String, time_ns Int64, ingested_ms Int64, event String) \
             ENGINE = ReplacingMergeTree(version) PARTITION BY tuple() ORDER BY (source, id)"
        ))
        .await?;
        self.drop_old_rollups().await?;
        self.execute(&format!(
            "CREATE TABLE IF NOT EXISTS {db}.samples (\
             meter String, gen String, seq UInt64, time_ns Int64, source String, id String, \
             subject String, gkey String, groups Array(Nullable(String)), exact UInt8, \
             num Decimal128(12), scale UInt8, text String) \
             ENGINE = ReplacingMergeTree PARTITION BY tuple() ORDER BY (meter, gen, seq)"
        ))
        .await?;
        self.execute(&format!(
            "CREATE TABLE IF NOT EXISTS {db}.rollups (\
             meter String, gen String, width UInt64, lo UInt64, unit Int64, subject String, \
             bucket Int64, gkey String, groups Array(Nullable(String)), rn UInt64, rok UInt8, \
             rs Decimal128(12), rsc UInt8, rmx Decimal128(12), rvn Decimal128(12), rvt String, \
             rlt Int64, rls UInt64, ru Array(String)) \
             ENGINE = ReplacingMergeTree PARTITION BY tuple() \
             ORDER BY (meter, gen, width, lo, unit, subject, bucket, gkey)"
        ))
        .await?;
        self.execute(&format!(
            "CREATE TABLE IF NOT EXISTS {db}.rollup_marks (\
             meter String, gen String, width UInt64, below UInt64, at Int64) \
             ENGINE = ReplacingMergeTree(at) ORDER BY (meter, gen, width)"
        ))
        .await
    }

    /// Drops `samples` and `rollup_marks` of the first rollup layout (sorted
    /// by time; marks without levels): derived data the roller rebuilds.
    async fn drop_old_rollups(&self) -> Result<(), ChError> {
        #[derive(serde::Deserialize)]
        struct Column {
            name: String,
        }
        let db = &self.database;
        let columns: Vec<Column> = self
            .select(&format!(
                "SELECT name FROM system.columns WHERE database = {} AND table = 'rollup_marks'",
                lit(db)
            ))
            .await?;
        if !columns.is_empty() && !columns.iter().any(|c| c.name == "at") {
            for table in ["samples", "rollup_marks"] {
                self.execute(&format!("DROP TABLE IF EXISTS {db}.{table}"))
                    .await?;
            }
        }
        Ok(())
    }

    async fn send(&self, query: Option<&str>, body: Vec<u8>) -> Result<reqwest::Response, ChError> {
        let mut request = self.http.post(format!("{}/", self.url)).query(&[
            ("output_format_json_quote_64bit_integers", "0"),
            // Statements name up to a batch of keys (bounded by ingest's
            // request limits); ClickHouse's default is 256 KiB.
            ("max_query_size", "67108864"),
            // ... and a rollup read may name every voided key of a type.
            ("max_ast_elements", "4000000"),
            ("max_expanded_ast_elements", "4000000"),
        ]);
        if let Some(query) = query {
            request = request.query(&[("query", query)]);
        }
        let response = request
            .body(body)
            .send()
            .await
            .map_err(|e| ChError::Unreachable {
                url: self.shown.clone(),
                message: e.without_url().to_string(),
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let mut message = response.text().await.unwrap_or_default();
        message.truncate(MAX_ERROR_TEXT);
        Err(ChError::Refused {
            status: status.as_u16(),
            message: message.trim().to_owned(),
        })
    }

    /// Runs a statement that answers nothing.
    pub async fn execute(&self, sql: &str) -> Result<(), ChError> {
        self.send(None, sql.as_bytes().to_vec()).await.map(drop)
    }

    /// Inserts rows (`JSONEachRow`, one JSON object a line) into `table`.
    pub async fn insert(&self, table: &str, rows: Vec<u8>) -> Result<(), ChError> {
        let query = format!("INSERT INTO {}.{table} FORMAT JSONEachRow", self.database);
        self.send(Some(&query), rows).await.map(drop)
    }

    /// Runs a `SELECT` (without `FORMAT`) and hands each row to `each` as it
    /// arrives, so an answer of any length takes the memory of one row.
    pub async fn select_each<T: DeserializeOwned>(
        &self,
        sql: &str,
        mut each: impl FnMut(T) -> Result<(), ChError>,
    ) -> Result<(), ChError> {
        let sql = format!("{sql} FORMAT JSONEachRow");
        let mut response = self.send(None, sql.into_bytes()).await?;
        let mut pending: Vec<u8> = Vec::new();
        let unreachable = |e: reqwest::Error| ChError::Unreachable {
            url: self.shown.clone(),
            message: e.without_url().to_string(),
        };
        while let Some(chunk) = response.chunk().await.map_err(unreachable)? {
            pending.extend_from_slice(&chunk);
            let mut start = 0;
            while let Some(end) = pending[start..].iter().position(|b| *b == b'\n') {
                let line = &pending[start..start + end];
                start += end + 1;
                if !line.is_empty() {
                    each(decode(line)?)?;
                }
            }
            pending.drain(..start);
            if pending.len() > MAX_ROW_BYTES {
                return Err(ChError::Decode("a row longer than 8 MiB".into()));
            }
        }
        if !pending.is_empty() {
            each(decode(&pending)?)?;
        }
        Ok(())
    }

    /// Runs a `SELECT` and collects its rows.
    pub async fn select<T: DeserializeOwned>(&self, sql: &str) -> Result<Vec<T>, ChError> {
        let mut rows = Vec::new();
        self.select_each(sql, |row| {
            rows.push(row);
            Ok(())
        })
        .await?;
        Ok(rows)
    }
}

fn decode<T: DeserializeOwned>(line: &[u8]) -> Result<T, ChError> {
    serde_json::from_slice(line).map_err(|e| ChError::Decode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_cannot_be_escaped() {
        assert_eq!(lit("a'b\\c"), "'a\\'b\\\\c'");
        assert_eq!(lit("x\ny\0"), "'x\\x0Ay\\x00'");
        assert_eq!(lit("ü"), "'ü'");
    }

    #[test]
    fn credentials_never_reach_errors() {
        assert_eq!(
            without_credentials("http://u:secret@ch:8123/x@y"),
            "http://ch:8123/x@y"
        );
        assert_eq!(without_credentials("nats://tok@n:4222"), "nats://n:4222");
        assert_eq!(without_credentials("http://ch:8123"), "http://ch:8123");
    }

    #[test]
    fn identifiers_are_plain() {
        assert!(valid_identifier("tally_1"));
        assert!(!valid_identifier("1x"));
        assert!(!valid_identifier("a;DROP"));
        assert!(!valid_identifier(""));
    }
}
