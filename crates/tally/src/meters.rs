//! `tally meters list` and `tally meters query`.

use std::collections::BTreeMap;

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use jiff::tz::TimeZone;
use tally_client::{MeterQueryParams, MeterQueryResponse, MeterQueryRow, TallyClient, WindowSize};
use tally_model::OpenMeterMeter;

use crate::output::{self, Cell, Column, Format, Table, or_none, time_in};
use crate::when;

#[derive(Debug, Subcommand)]
pub enum MetersCommand {
    /// List meters (the OpenMeter view of every MeterDefinition).
    List(ListArgs),
    /// Aggregate a meter's usage over time windows.
    Query(QueryArgs),
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Output format; `name` prints `meter/SLUG`.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table, value_name = "FORMAT")]
    output: Format,
}

#[derive(Debug, Args)]
pub struct QueryArgs {
    /// The meter's slug (its MeterDefinition name).
    #[arg(value_name = "KEY")]
    meter: String,

    /// Start of the range, inclusive: RFC 3339 (2026-01-01T00:00:00Z) or a
    /// date (2026-01-01, midnight in --tz). Default: all stored usage.
    #[arg(long, value_name = "TIME")]
    from: Option<String>,

    /// End of the range, exclusive: RFC 3339 or a date (midnight in --tz).
    /// Default: now, rounded up to the minute.
    #[arg(long, value_name = "TIME")]
    to: Option<String>,

    /// Window size; without it each group gets one row for the whole range.
    #[arg(long, value_enum, value_name = "SIZE")]
    window: Option<Window>,

    /// IANA time zone that windows are aligned to, dates are read in, and
    /// times are printed in.
    #[arg(long, default_value = "UTC", value_name = "ZONE")]
    tz: String,

    /// Only this subject; repeat for several. Rows are then per subject.
    #[arg(long = "subject", value_name = "SUBJECT")]
    subjects: Vec<String>,

    /// Group rows by this dimension (`subject` groups by subject); repeatable.
    #[arg(long = "group-by", value_name = "DIMENSION")]
    group_by: Vec<String>,

    /// Only rows whose dimension K equals V; repeatable.
    #[arg(long = "filter", value_name = "K=V", value_parser = parse_filter)]
    filters: Vec<(String, String)>,

    /// Return at most N rows (one page). Without it, every page is fetched.
    #[arg(long, value_name = "N")]
    limit: Option<usize>,

    /// Output format (rows have no names, so not `name`). Table and CSV
    /// print times in --tz; CSV values are exact decimals.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table, value_name = "FORMAT")]
    output: Format,
}

/// Window sizes, as typed on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Window {
    Minute,
    Hour,
    Day,
    Month,
}

impl From<Window> for WindowSize {
    fn from(window: Window) -> Self {
        match window {
            Window::Minute => WindowSize::Minute,
            Window::Hour => WindowSize::Hour,
            Window::Day => WindowSize::Day,
            Window::Month => WindowSize::Month,
        }
    }
}

fn parse_filter(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("expected DIMENSION=VALUE, got {text:?}")),
    }
}

pub async fn run(client: &TallyClient, command: MetersCommand) -> anyhow::Result<()> {
    match command {
        MetersCommand::List(args) => list(client, args).await,
        MetersCommand::Query(args) => query(client, args).await,
    }
}

async fn list(client: &TallyClient, args: ListArgs) -> anyhow::Result<()> {
    let meters = client.list_meters().await.context("listing meters")?;
    output::print_listing(args.output, &meters, "No meters found.", || {
        meter_table(&meters)
    })
}

fn meter_table(meters: &[OpenMeterMeter]) -> Table {
    let mut table = Table::with_columns([
        Column::new("SLUG"),
        Column::new("EVENT TYPE"),
        Column::new("AGGREGATION"),
        Column::new("VALUE PROPERTY"),
        Column::new("GROUP BY"),
        Column::new("ID").wide(),
        Column::new("DESCRIPTION").wide(),
    ])
    .named();
    for meter in meters {
        let group_by: Vec<String> = meter
            .group_by
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        table.named_row(
            format!("meter/{}", meter.slug),
            [
                Cell::from(&meter.slug),
                Cell::from(&meter.event_type),
                Cell::from(meter.aggregation.to_string()),
                or_none(meter.value_property.as_deref()),
                or_none(Some(&group_by.join(","))),
                or_none(meter.id.as_deref()),
                or_none(meter.description.as_deref()),
            ],
        );
    }
    table
}

async fn query(client: &TallyClient, args: QueryArgs) -> anyhow::Result<()> {
    let tz = when::parse_zone(&args.tz)?;
    let from = args
        .from
        .as_deref()
        .map(|t| when::parse_instant(t, &tz).context("--from"))
        .transpose()?;
    let to = args
        .to
        .as_deref()
        .map(|t| when::parse_instant(t, &tz).context("--to"))
        .transpose()?;
    if let (Some(from), Some(to)) = (from, to)
        && from >= to
    {
        bail!("--from ({from}) must be before --to ({to})");
    }
    let mut params = MeterQueryParams {
        from,
        to,
        window_size: args.window.map(Into::into),
        window_time_zone: Some(args.tz.clone()),
        subjects: args.subjects.clone(),
        group_by: args.group_by.clone(),
        filter_group_by: args.filters.iter().cloned().collect::<BTreeMap<_, _>>(),
        limit: args.limit,
        cursor: None,
    };
    let context = || format!("querying meter {:?}", args.meter);
    let mut answer = client
        .query_meter(&args.meter, &params)
        .await
        .with_context(context)?;
    if args.limit.is_none() {
        while let Some(cursor) = answer.next_cursor.take() {
            if params.cursor.as_ref() == Some(&cursor) {
                bail!("the server returned the same nextCursor twice; stopping");
            }
            params.cursor = Some(cursor);
            let page = client
                .query_meter(&args.meter, &params)
                .await
                .with_context(context)?;
            answer.data.extend(page.data);
            answer.next_cursor = page.next_cursor;
        }
    }
    output::print_listing(args.output, &answer, "No usage in this range.", || {
        query_table(&answer, &args.group_by, &tz)
    })?;
    if answer.next_cursor.is_some() {
        eprintln!("(more rows: run without --limit to fetch them all)");
    }
    Ok(())
}

/// The columns of a query answer: whether rows have a subject, and the
/// group-by keys (the requested ones first, then any others in the answer).
fn columns(answer: &MeterQueryResponse, requested: &[String]) -> (bool, Vec<String>) {
    let with_subject =
        answer.data.iter().any(|r| r.subject.is_some()) || requested.iter().any(|k| k == "subject");
    let mut keys: Vec<String> = Vec::new();
    let all = requested
        .iter()
        .chain(answer.data.iter().flat_map(|r| r.group_by.keys()));
    for key in all {
        if key != "subject" && !keys.contains(key) {
            keys.push(key.clone());
        }
    }
    (with_subject, keys)
}

fn group_value<'a>(row: &'a MeterQueryRow, key: &str) -> Option<&'a str> {
    row.group_by.get(key).and_then(Option::as_deref)
}

/// One row per window (and subject, and group): times in `tz`, a column
/// per dimension (its CSV name the dimension's own), exact values.
fn query_table(answer: &MeterQueryResponse, requested: &[String], tz: &TimeZone) -> Table {
    let (with_subject, keys) = columns(answer, requested);
    let mut headers = vec![Column::new("WINDOW START"), Column::new("WINDOW END")];
    if with_subject {
        headers.push(Column::new("SUBJECT"));
    }
    headers.extend(keys.iter().map(|k| Column::new(&k.to_uppercase()).csv(k)));
    headers.push(Column::new("VALUE"));
    let mut table = Table::with_columns(headers);
    for row in &answer.data {
        let mut cells: Vec<Cell> = vec![
            time_in(row.window_start, tz).into(),
            time_in(row.window_end, tz).into(),
        ];
        if with_subject {
            cells.push(or_none(row.subject.as_deref()));
        }
        cells.extend(keys.iter().map(|k| or_none(group_value(row, k))));
        cells.push(row.value.to_string().into());
        table.row(cells);
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer() -> MeterQueryResponse {
        serde_json::from_str(
            r#"{"windowSize": "DAY", "windowTimeZone": "Europe/Berlin", "data": [
                {"value": 12345678901234567890, "windowStart": "2026-03-28T23:00:00Z", "windowEnd": "2026-03-29T22:00:00Z",
                 "subject": "acme", "groupBy": {"method": "GET", "path": "/a,b"}},
                {"value": 0.25, "windowStart": "2026-03-29T22:00:00Z", "windowEnd": "2026-03-30T22:00:00Z",
                 "subject": "acme", "groupBy": {"method": null}}
            ]}"#,
        )
        .unwrap()
    }

    #[test]
    fn tables_print_times_in_the_zone_and_one_column_per_dimension() {
        let tz = when::parse_zone("Europe/Berlin").unwrap();
        let table = query_table(&answer(), &["method".into()], &tz).render(false);
        assert_eq!(
            table,
            "WINDOW START                WINDOW END                  SUBJECT   METHOD   PATH     VALUE\n\
             2026-03-29T00:00:00+01:00   2026-03-30T00:00:00+02:00   acme      GET      /a,b     12345678901234567890\n\
             2026-03-30T00:00:00+02:00   2026-03-31T00:00:00+02:00   acme      <none>   <none>   0.25\n"
        );
    }

    #[test]
    fn csv_is_exact_and_escaped() {
        let csv = query_table(&answer(), &["method".into()], &TimeZone::UTC)
            .csv()
            .unwrap();
        assert_eq!(
            csv,
            "windowStart,windowEnd,subject,method,path,value\n\
             2026-03-28T23:00:00+00:00,2026-03-29T22:00:00+00:00,acme,GET,\"/a,b\",12345678901234567890\n\
             2026-03-29T22:00:00+00:00,2026-03-30T22:00:00+00:00,acme,,,0.25\n"
        );
    }

    #[test]
    fn subject_is_its_own_column_not_a_dimension() {
        let mut answer = answer();
        for row in &mut answer.data {
            row.subject = None;
            row.group_by.clear();
        }
        let (with_subject, keys) = columns(&answer, &["subject".into(), "region".into()]);
        assert!(with_subject);
        assert_eq!(keys, ["region"]);
        let (with_subject, keys) = columns(&answer, &[]);
        assert!(!with_subject);
        assert!(keys.is_empty());
    }

    #[test]
    fn filters_need_an_equals_sign() {
        assert_eq!(
            parse_filter("method=GET").unwrap(),
            ("method".into(), "GET".into())
        );
        assert_eq!(parse_filter("q=a=b").unwrap(), ("q".into(), "a=b".into()));
        assert!(parse_filter("method").is_err());
        assert!(parse_filter("=x").is_err());
    }

    #[test]
    fn meters_table_lists_group_bys() {
        let meters: Vec<OpenMeterMeter> = serde_json::from_str(
            r#"[{"slug": "tokens", "aggregation": "SUM", "eventType": "prompt", "valueProperty": "$.tokens",
                 "groupBy": {"model": "$.model", "team": "$.team"}},
                {"slug": "calls", "aggregation": "COUNT", "eventType": "call"}]"#,
        )
        .unwrap();
        let table = meter_table(&meters);
        assert_eq!(
            table.render(false),
            "SLUG     EVENT TYPE   AGGREGATION   VALUE PROPERTY   GROUP BY\n\
             tokens   prompt       SUM           $.tokens         model=$.model,team=$.team\n\
             calls    call         COUNT         <none>           <none>\n"
        );
        assert_eq!(table.names().unwrap(), "meter/tokens\nmeter/calls\n");
        assert!(table.render(true).starts_with(
            "SLUG     EVENT TYPE   AGGREGATION   VALUE PROPERTY   GROUP BY                    ID       DESCRIPTION\n"
        ));
    }
}
