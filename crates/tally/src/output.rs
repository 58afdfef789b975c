//! Output formats, in one place for every command that lists:
//! `-o table|wide|json|yaml|csv|name`.
//!
//! A listing command builds one [`Table`] (its columns, some of them shown
//! only by `wide`, and for each row the row's `kind/name` when rows have
//! names) and hands it to [`render`] with the data that `json` and `yaml`
//! print (the server's answer, or a `List` of manifests). So the formats
//! cannot drift apart between commands:
//!
//! - `table`: aligned columns for people; a missing value shows as
//!   `<none>`, times are RFC 3339.
//! - `wide`: the same with the extra columns.
//! - `csv`: every column (the wide ones too), a header row of camelCase
//!   names, RFC 4180 quoting by the `csv` crate (a field with a comma,
//!   quote, CR or LF is quoted, quotes doubled); a missing value is an
//!   empty field; values are exact (decimals as the server wrote them).
//! - `json`, `yaml`: the data, unchanged.
//! - `name`: `kind/name` per row, as kubectl prints it; an error for
//!   listings whose rows have no names (query rows).
//!
//! **Invariant:** a table or CSV cell never carries a control character
//! into a table (they are shown as spaces); CSV keeps the value as it is.

use std::fmt::Write as _;

use anyhow::{Context, bail};
use clap::ValueEnum;
use jiff::Timestamp;
use jiff::tz::TimeZone;
use serde::Serialize;

/// Shown in a table cell that has no value, as kubectl does.
pub const NONE: &str = "<none>";

/// The output formats of every listing command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Format {
    /// Aligned columns, times as RFC 3339.
    #[default]
    Table,
    /// The table with more columns.
    Wide,
    /// The data as JSON.
    Json,
    /// The data as YAML.
    Yaml,
    /// Comma-separated values (every column) with a header row.
    Csv,
    /// `kind/name` of each row.
    Name,
}

/// One cell: a value, or none (`<none>` in a table, empty in CSV).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cell(Option<String>);

impl From<String> for Cell {
    fn from(value: String) -> Self {
        Cell(Some(value))
    }
}

impl From<&str> for Cell {
    fn from(value: &str) -> Self {
        Cell(Some(value.to_owned()))
    }
}

impl From<&String> for Cell {
    fn from(value: &String) -> Self {
        Cell(Some(value.clone()))
    }
}

impl From<Option<String>> for Cell {
    fn from(value: Option<String>) -> Self {
        Cell(value)
    }
}

/// A cell for an optional value; an empty one counts as none.
pub fn or_none(value: Option<&str>) -> Cell {
    Cell(value.filter(|v| !v.is_empty()).map(str::to_owned))
}

/// A cell for an optional time, as RFC 3339.
pub fn time_cell(value: Option<Timestamp>) -> Cell {
    Cell(value.map(|t| t.to_string()))
}

/// A column: its table title (upper-cased on output), its CSV name, and
/// whether only `wide` shows it in a table.
#[derive(Debug, Clone)]
pub struct Column {
    title: String,
    csv: String,
    wide: bool,
}

impl Column {
    /// A column titled `title`; its CSV name is the title in camelCase
    /// (`WINDOW START` → `windowStart`).
    pub fn new(title: &str) -> Column {
        Column {
            title: title.to_owned(),
            csv: camel_case(title),
            wide: false,
        }
    }

    /// The column under another CSV name.
    pub fn csv(mut self, name: &str) -> Column {
        name.clone_into(&mut self.csv);
        self
    }

    /// The column's name in CSV.
    pub fn csv_name(&self) -> &str {
        &self.csv
    }

    /// Shown only by `-o wide` (CSV always has it).
    pub fn wide(mut self) -> Column {
        self.wide = true;
        self
    }
}

/// `WINDOW START` → `windowStart`, `ID` → `id`.
fn camel_case(title: &str) -> String {
    let mut out = String::new();
    for (index, word) in title.split_whitespace().enumerate() {
        let word = word.to_lowercase();
        let mut chars = word.chars();
        if index == 0 {
            out.push_str(&word);
        } else if let Some(first) = chars.next() {
            out.extend(first.to_uppercase());
            out.push_str(chars.as_str());
        }
    }
    out
}

/// Rows of a listing, with their columns and (when rows have them) names.
#[derive(Debug, Clone, Default)]
pub struct Table {
    columns: Vec<Column>,
    rows: Vec<Vec<Cell>>,
    /// `kind/name` per row; `None` once a row without a name was added.
    names: Option<Vec<String>>,
}

impl Table {
    /// A table with these column titles, none of them wide.
    pub fn new<I, S>(headers: I) -> Table
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Table::with_columns(headers.into_iter().map(|h| Column::new(h.as_ref())))
    }

    /// A table of these columns, whose rows have no names.
    pub fn with_columns(columns: impl IntoIterator<Item = Column>) -> Table {
        Table {
            columns: columns.into_iter().collect(),
            rows: Vec::new(),
            names: None,
        }
    }

    /// The table with named rows ([`Table::named_row`]): `-o name` prints
    /// them, and nothing for no rows.
    pub fn named(mut self) -> Table {
        self.names = Some(Vec::new());
        self
    }

    /// Adds a row without a name: the table cannot print `-o name`.
    /// Missing cells at the end are blank.
    pub fn row<I, C>(&mut self, cells: I)
    where
        I: IntoIterator<Item = C>,
        C: Into<Cell>,
    {
        self.names = None;
        self.rows.push(cells.into_iter().map(Into::into).collect());
    }

    /// Adds a row named `name` (`kind/name`).
    pub fn named_row<I, C>(&mut self, name: String, cells: I)
    where
        I: IntoIterator<Item = C>,
        C: Into<Cell>,
    {
        if let Some(names) = &mut self.names {
            names.push(name);
        }
        self.rows.push(cells.into_iter().map(Into::into).collect());
    }

    /// Puts `column` first, with `cells` for the rows in order (none for
    /// rows beyond them).
    pub fn prepend(&mut self, column: Column, cells: Vec<Cell>) {
        self.columns.insert(0, column);
        let mut cells = cells.into_iter();
        for row in &mut self.rows {
            row.insert(0, cells.next().unwrap_or_default());
        }
    }

    /// Whether the table has no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as aligned text, `wide` columns included when `wide`:
    /// upper-case headers, left-aligned columns separated by three spaces,
    /// no trailing blanks, one line per row, each ending in a newline.
    pub fn render(&self, wide: bool) -> String {
        let shown: Vec<usize> = (0..self.columns.len())
            .filter(|&i| wide || !self.columns[i].wide)
            .collect();
        let headers: Vec<String> = shown
            .iter()
            .map(|&i| self.columns[i].title.to_uppercase())
            .collect();
        let body = self.rows.iter().map(|row| {
            shown
                .iter()
                .map(|&i| match row.get(i) {
                    Some(Cell(Some(text))) => printable(text),
                    Some(Cell(None)) => NONE.to_owned(),
                    None => String::new(),
                })
                .collect::<Vec<String>>()
        });
        let lines: Vec<Vec<String>> = std::iter::once(headers).chain(body).collect();
        align(&lines)
    }

    /// Every column as CSV with a header row of CSV names.
    pub fn csv(&self) -> anyhow::Result<String> {
        let mut writer = csv::WriterBuilder::new()
            .terminator(csv::Terminator::Any(b'\n'))
            .from_writer(Vec::new());
        writer
            .write_record(self.columns.iter().map(|c| c.csv.as_str()))
            .context("writing CSV")?;
        for row in &self.rows {
            let fields = (0..self.columns.len()).map(|i| match row.get(i) {
                Some(Cell(Some(text))) => text.as_str(),
                _ => "",
            });
            writer.write_record(fields).context("writing CSV")?;
        }
        let bytes = writer.into_inner().context("writing CSV")?;
        String::from_utf8(bytes).context("writing CSV")
    }

    /// `kind/name` of every row, one per line; a name that several rows
    /// share (a sink's rows per meter) once.
    pub fn names(&self) -> anyhow::Result<String> {
        let Some(names) = &self.names else {
            bail!("these rows have no names; use -o csv, json or yaml");
        };
        let mut seen = std::collections::HashSet::new();
        Ok(names
            .iter()
            .filter(|n| seen.insert(n.as_str()))
            .map(|n| format!("{n}\n"))
            .collect())
    }
}

/// Control characters shown as spaces, so a value cannot break the layout.
fn printable(text: &str) -> String {
    if text.chars().any(char::is_control) {
        text.chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect()
    } else {
        text.to_owned()
    }
}

/// Lines of cells, left-aligned in columns three spaces apart.
fn align(lines: &[Vec<String>]) -> String {
    let columns = lines.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0; columns];
    for line in lines {
        for (width, cell) in widths.iter_mut().zip(line) {
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

/// The text of a listing in `format`: `data` for JSON and YAML, the table
/// (built only when needed) for the others. `None` for a table without
/// rows, so the caller can say so on standard error.
pub fn render<T, F>(format: Format, data: &T, table: F) -> anyhow::Result<Option<String>>
where
    T: Serialize + ?Sized,
    F: FnOnce() -> Table,
{
    Ok(Some(match format {
        Format::Json => to_json(data)?,
        Format::Yaml => to_yaml(data)?,
        Format::Csv => table().csv()?,
        Format::Name => table().names()?,
        Format::Table | Format::Wide => {
            let table = table();
            if table.is_empty() {
                return Ok(None);
            }
            table.render(format == Format::Wide)
        }
    }))
}

/// Prints a listing in `format`; an empty table prints `empty` on
/// standard error instead.
pub fn print_listing<T, F>(format: Format, data: &T, empty: &str, table: F) -> anyhow::Result<()>
where
    T: Serialize + ?Sized,
    F: FnOnce() -> Table,
{
    match render(format, data, table)? {
        Some(text) => crate::print(&text),
        None => {
            eprintln!("{empty}");
            Ok(())
        }
    }
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

/// How long ago `then` was, at `now`, in the largest unit that fits:
/// `45s`, `12m`, `3h`, `5d` (kubectl's AGE); `0s` for a future time.
pub fn age(then: Timestamp, now: Timestamp) -> String {
    let seconds = now.duration_since(then).as_secs().max(0);
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86_400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_model::Manifest;

    fn sample() -> Table {
        let mut table = Table::with_columns([
            Column::new("name"),
            Column::new("meter name"),
            Column::new("ready"),
            Column::new("labels").wide(),
        ])
        .named();
        table.named_row(
            "md/requests".into(),
            [
                Cell::from("requests"),
                "gw/requests".into(),
                "True".into(),
                "a=b,c".into(),
            ],
        );
        table.named_row("md/a".into(), [Cell::from("a"), "b".into(), "".into()]);
        table.named_row("md/a".into(), [Cell::from("a"), "c".into()]);
        table.named_row(
            "md/wide-name-here".into(),
            [
                Cell::from("wide-name-here"),
                "x\ty".into(),
                or_none(None),
                "say \"hi\"\n".into(),
            ],
        );
        table
    }

    #[test]
    fn tables_align_left_with_three_spaces() {
        assert_eq!(
            sample().render(false),
            "NAME             METER NAME    READY\n\
             requests         gw/requests   True\n\
             a                b\n\
             a                c\n\
             wide-name-here   x y           <none>\n"
        );
        assert_eq!(
            sample().render(true),
            "NAME             METER NAME    READY    LABELS\n\
             requests         gw/requests   True     a=b,c\n\
             a                b\n\
             a                c\n\
             wide-name-here   x y           <none>   say \"hi\"\n"
        );
    }

    #[test]
    fn tables_count_characters_not_bytes() {
        let mut table = Table::new(["a", "b"]);
        table.row(["größe", "1"]);
        assert_eq!(table.render(false), "A       B\ngröße   1\n");
        assert_eq!(Table::new(["only"]).render(false), "ONLY\n");
    }

    #[test]
    fn csv_has_every_column_quoted_where_needed_and_none_is_empty() {
        assert_eq!(
            sample().csv().unwrap(),
            "name,meterName,ready,labels\n\
             requests,gw/requests,True,\"a=b,c\"\n\
             a,b,,\n\
             a,c,,\n\
             wide-name-here,x\ty,,\"say \"\"hi\"\"\n\"\n"
        );
        let mut table = Table::with_columns([Column::new("VALUE").csv("v")]);
        table.row(["1.000000000000000000001"]);
        assert_eq!(table.csv().unwrap(), "v\n1.000000000000000000001\n");
    }

    #[test]
    fn names_are_kind_slash_name_or_refused() {
        assert_eq!(
            sample().names().unwrap(),
            "md/requests\nmd/a\nmd/wide-name-here\n"
        );
        let mut table = Table::new(["value"]);
        table.row(["1"]);
        assert!(table.names().unwrap_err().to_string().contains("no names"));
        assert!(Table::new(["x"]).names().is_err());
        assert_eq!(Table::new(["x"]).named().names().unwrap(), "");
    }

    #[test]
    fn render_picks_the_format_and_leaves_empty_tables_to_the_caller() {
        let data = serde_json::json!({"items": [1]});
        let json = render(Format::Json, &data, || unreachable!()).unwrap();
        assert_eq!(json.unwrap(), "{\n  \"items\": [\n    1\n  ]\n}\n");
        let yaml = render(Format::Yaml, &data, || unreachable!()).unwrap();
        assert_eq!(yaml.unwrap(), "items:\n- 1\n");
        assert_eq!(
            render(Format::Table, &data, || Table::new(["a"])).unwrap(),
            None
        );
        let wide = render(Format::Wide, &data, sample).unwrap().unwrap();
        assert!(wide.starts_with("NAME "), "{wide}");
        assert!(wide.lines().next().unwrap().ends_with("LABELS"), "{wide}");
    }

    #[test]
    fn csv_names_are_camel_case_titles() {
        assert_eq!(camel_case("WINDOW START"), "windowStart");
        assert_eq!(camel_case("ID"), "id");
        assert_eq!(camel_case("billing_account"), "billing_account");
        assert_eq!(camel_case("DEAD  LETTERS"), "deadLetters");
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
    fn times_carry_the_zone_offset_and_ages_the_largest_unit() {
        let t: Timestamp = "2026-03-29T01:00:00Z".parse().unwrap();
        let berlin = TimeZone::get("Europe/Berlin").unwrap();
        assert_eq!(time_in(t, &berlin), "2026-03-29T03:00:00+02:00");
        assert_eq!(time_in(t, &TimeZone::UTC), "2026-03-29T01:00:00+00:00");
        assert_eq!(or_none(None), Cell(None));
        assert_eq!(or_none(Some("")), Cell(None));
        assert_eq!(or_none(Some("x")), Cell::from("x"));
        let later = |s: i64| t + jiff::SignedDuration::from_secs(s);
        assert_eq!(age(t, later(45)), "45s");
        assert_eq!(age(t, later(119)), "119s");
        assert_eq!(age(t, later(600)), "10m");
        assert_eq!(age(t, later(3 * 3600)), "3h");
        assert_eq!(age(t, later(5 * 86_400 + 7)), "5d");
        assert_eq!(age(later(10), t), "0s");
    }

    proptest::proptest! {
        /// Whatever the cells hold (commas, quotes, line breaks, control
        /// characters, none), CSV reads back to the same fields, none as
        /// empty, one record per row.
        #[test]
        fn csv_reads_back_every_cell(
            rows in proptest::collection::vec(
                proptest::collection::vec(proptest::option::of(".{0,12}"), 3), 0..6)
        ) {
            let mut table = Table::new(["a", "b c", "d"]);
            for row in &rows {
                table.row(row.iter().cloned().map(Cell::from));
            }
            let text = table.csv().unwrap();
            let records: Vec<Vec<String>> = csv::ReaderBuilder::new()
                .has_headers(true)
                .from_reader(text.as_bytes())
                .records()
                .map(|r| r.unwrap().iter().map(str::to_owned).collect())
                .collect();
            let expected: Vec<Vec<String>> = rows
                .iter()
                .map(|row| row.iter().map(|c| c.clone().unwrap_or_default()).collect())
                .collect();
            proptest::prop_assert_eq!(records, expected);
        }

        /// The table has a line per row, none with a control character or
        /// trailing blank, and every column starts at the same character
        /// on every line.
        #[test]
        fn tables_keep_their_layout(
            rows in proptest::collection::vec(
                proptest::collection::vec("[a-z\\t\\n ]{1,8}", 2), 1..6)
        ) {
            let mut table = Table::new(["first", "second"]);
            for row in &rows {
                table.row(row.iter().map(|c| Cell::from(c.as_str())));
            }
            let text = table.render(false);
            let lines: Vec<&str> = text.lines().collect();
            proptest::prop_assert_eq!(lines.len(), rows.len() + 1);
            let width = 1 + rows.iter().map(|r| r[0].chars().count()).max().unwrap_or(0).max(5);
            for (line, row) in lines[1..].iter().zip(&rows) {
                proptest::prop_assert!(!line.chars().any(char::is_control));
                proptest::prop_assert!(!line.ends_with(' '));
                let second: String = line.chars().skip(width + 2).collect();
                proptest::prop_assert_eq!(second, printable(&row[1]).trim_end().to_owned());
            }
        }

        /// `-o name` prints each name once, in the order first seen.
        #[test]
        fn names_are_listed_once_in_order(names in proptest::collection::vec("[a-c]/[x-z]", 0..12)) {
            let mut table = Table::new(["n"]).named();
            for name in &names {
                table.named_row(name.clone(), [Cell::from(name.as_str())]);
            }
            let mut expected = String::new();
            for (index, name) in names.iter().enumerate() {
                if !names[..index].contains(name) {
                    expected.push_str(name);
                    expected.push('\n');
                }
            }
            proptest::prop_assert_eq!(table.names().unwrap(), expected);
        }
    }
}
