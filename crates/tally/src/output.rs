//! Output formats: aligned tables for people, CSV, YAML and JSON for programs.

use std::fmt::Write as _;

use anyhow::Context;
use jiff::Timestamp;
use jiff::tz::TimeZone;
use serde::Serialize;

/// Shown in a table cell that has no value, as kubectl does.
pub const NONE: &str = "<none>";

/// A table like kubectl prints: upper-case headers, left-aligned columns
/// separated by three spaces, no trailing blanks.
#[derive(Debug, Clone, Default)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers (upper-cased on output).
    pub fn new<I, S>(headers: I) -> Table
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Table {
            headers: headers.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row. Missing cells are blank; control characters are shown as
    /// spaces so that a value cannot break the layout.
    pub fn row<I, S>(&mut self, cells: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let cells = cells
            .into_iter()
            .map(|cell| {
                let cell: String = cell.into();
                if cell.chars().any(char::is_control) {
                    cell.chars()
                        .map(|c| if c.is_control() { ' ' } else { c })
                        .collect()
                } else {
                    cell
                }
            })
            .collect();
        self.rows.push(cells);
    }

    /// The table as text, one line per row, each ending in a newline.
    pub fn render(&self) -> String {
        let columns = self
            .rows
            .iter()
            .map(Vec::len)
            .chain([self.headers.len()])
            .max()
            .unwrap_or(0);
        let headers: Vec<String> = self.headers.iter().map(|h| h.to_uppercase()).collect();
        let lines: Vec<&Vec<String>> = std::iter::once(&headers).chain(&self.rows).collect();
        let mut widths = vec![0; columns];
        for line in &lines {
            for (width, cell) in widths.iter_mut().zip(line.iter()) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for line in lines {
            let mut text = String::new();
            for (index, width) in widths.iter().enumerate() {
                let cell = line.get(index).map_or("", String::as_str);
                if index + 1 < columns {
                    let padding = width - cell.chars().count();
                    let _ = write!(text, "{cell}{}   ", " ".repeat(padding));
                } else {
                    text.push_str(cell);
                }
            }
            out.push_str(text.trim_end());
            out.push('\n');
        }
        out
    }
}

/// One CSV record (RFC 4180): fields with commas, quotes or line breaks are
/// quoted, quotes doubled. Ends with `\n`.
pub fn csv_record<I, S>(fields: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut out = String::new();
    for (index, field) in fields.into_iter().enumerate() {
        if index > 0 {
            out.push(',');
        }
        let field = field.as_ref();
        if field.contains([',', '"', '\n', '\r']) {
            out.push('"');
            out.push_str(&field.replace('"', "\"\""));
            out.push('"');
        } else {
            out.push_str(field);
        }
    }
    out.push('\n');
    out
}

/// Pretty JSON with a trailing newline.
pub fn to_json<T: Serialize + ?Sized>(value: &T) -> anyhow::Result<String> {
    let mut text = serde_json::to_string_pretty(value).context("formatting JSON")?;
    text.push('\n');
    Ok(text)
}

/// YAML, as one document.
pub fn to_yaml<T: Serialize + ?Sized>(value: &T) -> anyhow::Result<String> {
    serde_norway::to_string(value).context("formatting YAML")
}

/// A Kubernetes-style `List` of items, as `-o yaml|json` prints several resources.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct List<'a, T> {
    pub api_version: &'static str,
    pub kind: &'static str,
    pub items: &'a [T],
}

impl<'a, T> List<'a, T> {
    pub fn new(items: &'a [T]) -> Self {
        List {
            api_version: "v1",
            kind: "List",
            items,
        }
    }
}

/// RFC 3339 with the offset of `tz` at that instant, e.g.
/// `2026-03-29T03:00:00+02:00`.
pub fn time_in(t: Timestamp, tz: &TimeZone) -> String {
    t.display_with_offset(tz.to_offset(t)).to_string()
}

/// A cell for an optional value.
pub fn or_none(value: Option<&str>) -> String {
    value.filter(|v| !v.is_empty()).unwrap_or(NONE).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_model::Manifest;

    #[test]
    fn tables_align_left_with_three_spaces() {
        let mut table = Table::new(["name", "meter name", "ready"]);
        table.row(["requests", "gw/requests", "True"]);
        table.row(["a", "b", ""]);
        table.row(["wide-name-here", "x\ty", "False"]);
        assert_eq!(
            table.render(),
            "NAME             METER NAME    READY\n\
             requests         gw/requests   True\n\
             a                b\n\
             wide-name-here   x y           False\n"
        );
    }

    #[test]
    fn tables_count_characters_not_bytes() {
        let mut table = Table::new(["a", "b"]);
        table.row(["größe", "1"]);
        assert_eq!(table.render(), "A       B\ngröße   1\n");
        assert_eq!(Table::new(["only"]).render(), "ONLY\n");
    }

    #[test]
    fn csv_quotes_commas_quotes_and_newlines() {
        assert_eq!(
            csv_record(["a", "b,c", "say \"hi\"", "x\ny", ""]),
            "a,\"b,c\",\"say \"\"hi\"\"\",\"x\ny\",\n"
        );
        assert_eq!(
            csv_record(["1.000000000000000000001"]),
            "1.000000000000000000001\n"
        );
    }

    const MANIFEST: &str = "apiVersion: billing.miloapis.com/v1alpha1\nkind: MeterDefinition\nmetadata:\n  name: requests\n  labels: {team: edge}\nspec:\n  meterName: gw/requests\n  measurement: {aggregation: SUM, unit: '{request}'}\nstatus:\n  conditions: [{type: Ready, status: 'True'}]\n";

    #[test]
    fn yaml_and_json_round_trip() {
        let manifests = Manifest::parse_documents(MANIFEST).unwrap();
        let yaml = to_yaml(&List::new(&manifests)).unwrap();
        assert!(
            yaml.starts_with("apiVersion: v1\nkind: List\nitems:\n"),
            "{yaml}"
        );
        assert_eq!(Manifest::parse_documents(&yaml).unwrap(), manifests);
        let one = to_yaml(&manifests[0]).unwrap();
        assert_eq!(Manifest::parse_documents(&one).unwrap(), manifests);
        let json = to_json(&List::new(&manifests)).unwrap();
        assert!(json.ends_with("}\n"));
        assert_eq!(Manifest::parse_documents(&json).unwrap(), manifests);
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["kind"], "List");
        assert_eq!(
            value["items"][0]["status"]["conditions"][0]["status"],
            "True"
        );
    }

    #[test]
    fn times_carry_the_zone_offset() {
        let t: Timestamp = "2026-03-29T01:00:00Z".parse().unwrap();
        let berlin = TimeZone::get("Europe/Berlin").unwrap();
        assert_eq!(time_in(t, &berlin), "2026-03-29T03:00:00+02:00");
        assert_eq!(time_in(t, &TimeZone::UTC), "2026-03-29T01:00:00+00:00");
        assert_eq!(or_none(None), "<none>");
        assert_eq!(or_none(Some("")), "<none>");
        assert_eq!(or_none(Some("x")), "x");
    }
}
