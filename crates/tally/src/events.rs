//! `tally events send|list` and `tally quarantine list`.

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, IsTerminal as _, Read};
use std::path::PathBuf;

use anyhow::{Context, anyhow, bail};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use jiff::tz::TimeZone;
use serde_json::Value;
use tally_client::{
    ClientError, EventListParams, EventPage, IngestOutcome, QuarantineListParams, QuarantineNotice,
    QuarantinePage, TallyClient, VoidPage, VoidRecord,
};

use crate::output::{self, Cell, Column, Format, Table, time_cell};
use crate::{print, when};

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Send CloudEvents from a file: NDJSON (one event per line) or a JSON array.
    Send(SendArgs),
    /// List stored events, newest first.
    List(ListArgs),
    /// Void a stored event: it stops counting in every meter. The event stays
    /// in the log, marked voided, with an audit record; send a corrected
    /// event under a new id.
    Void(VoidArgs),
    /// The audit trail of voided events, newest first.
    Voids(VoidsArgs),
}

#[derive(Debug, Args)]
pub struct VoidArgs {
    /// The event's source.
    #[arg(long, value_name = "SOURCE")]
    source: String,

    /// The event's id.
    #[arg(long, value_name = "ID")]
    id: String,

    /// Why it is voided; kept in the audit trail.
    #[arg(long, value_name = "TEXT")]
    reason: String,

    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table, value_name = "FORMAT")]
    output: Format,
}

#[derive(Debug, Args)]
pub struct VoidsArgs {
    #[command(flatten)]
    page: Paging<Voids>,
}

#[derive(Debug, Subcommand)]
pub enum QuarantineCommand {
    /// List quarantined events, newest first, with the reason each meter gave.
    List(QuarantineArgs),
}

#[derive(Debug, Args)]
pub struct SendArgs {
    /// File of events: NDJSON (one JSON object per line) or a JSON array
    /// (detected by a leading `[`). `-` reads standard input.
    #[arg(value_name = "FILE")]
    file: PathBuf,

    /// Events per request. Each batch is validated before it is sent; the
    /// server stores a batch all or nothing.
    #[arg(long, default_value_t = 1000, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    batch_size: u32,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only events at or after this time: RFC 3339 or a date (midnight UTC).
    #[arg(long, value_name = "TIME")]
    from: Option<String>,

    /// Only events before this time: RFC 3339 or a date (midnight UTC).
    #[arg(long, value_name = "TIME")]
    to: Option<String>,

    /// Only events of this CloudEvents type.
    #[arg(long = "type", value_name = "TYPE")]
    event_type: Option<String>,

    /// Only events of this subject.
    #[arg(long, value_name = "SUBJECT")]
    subject: Option<String>,

    /// Only events from this source.
    #[arg(long, value_name = "SOURCE")]
    source: Option<String>,

    /// Only events with this id.
    #[arg(long, value_name = "ID")]
    id: Option<String>,

    #[command(flatten)]
    page: Paging<Events>,
}

#[derive(Debug, Args)]
pub struct QuarantineArgs {
    /// Only events quarantined for this meter.
    #[arg(long, value_name = "METER")]
    meter: Option<String>,

    #[command(flatten)]
    page: Paging<Quarantined>,
}

pub async fn run(client: &TallyClient, command: EventsCommand) -> anyhow::Result<()> {
    match command {
        EventsCommand::Send(args) => send(client, args).await,
        EventsCommand::List(args) => list(client, args).await,
        EventsCommand::Void(args) => void(client, args).await,
        EventsCommand::Voids(args) => voids(client, args).await,
    }
}

/// Voids, named `void/SEQ`.
fn void_table(records: &[VoidRecord]) -> Table {
    let mut table = Table::with_columns([
        Column::new("SEQ"),
        Column::new("VOIDED AT"),
        Column::new("BY"),
        Column::new("TYPE"),
        Column::new("SUBJECT"),
        Column::new("SOURCE"),
        Column::new("ID"),
        Column::new("REASON"),
        Column::new("EVENT TIME").wide(),
    ])
    .named();
    for r in records {
        table.named_row(
            format!("void/{}", r.seq),
            [
                Cell::from(r.seq.to_string()),
                time_cell(Some(r.voided_at)),
                Cell::from(&r.voided_by),
                Cell::from(&r.event_type),
                Cell::from(&r.subject),
                Cell::from(&r.source),
                Cell::from(&r.id),
                Cell::from(&r.reason),
                time_cell(Some(r.event_time)),
            ],
        );
    }
    table
}

async fn void(client: &TallyClient, args: VoidArgs) -> anyhow::Result<()> {
    let outcome = client
        .void_event(&args.source, &args.id, &args.reason)
        .await
        .with_context(|| format!("voiding event {:?} from {:?}", args.id, args.source))?;
    if outcome.already_voided && matches!(args.output, Format::Table | Format::Wide) {
        eprintln!("The event was voided before; nothing changed.");
    }
    output::print_listing(args.output, &outcome, "", || {
        void_table(std::slice::from_ref(&outcome.record))
    })
}

async fn voids(client: &TallyClient, args: VoidsArgs) -> anyhow::Result<()> {
    let page: VoidPage = pages(args.page.all, |cursor| async move {
        client
            .list_voids(args.page.limit, cursor.as_deref())
            .await
            .context("listing voided events")
    })
    .await?;
    output::print_listing(args.page.output, &page, "No voided events.", || {
        void_table(&page.items)
    })?;
    if page.next_cursor.is_some() {
        eprintln!("(more voided events: use --all to list them all)");
    }
    Ok(())
}

/// What a cursor-paged listing lists: the noun in its `--limit` and
/// `--all` help (clap's help is text, so each listing names its own).
pub(crate) trait Listed: Clone + Send + Sync + 'static {
    /// `--limit`'s help, e.g. "Events per page".
    const PER_PAGE: &'static str;
    /// `--all`'s help.
    const ALL: &'static str;
}

/// `--limit`, `--all` and `-o` of a paged listing, flattened into each
/// listing's arguments.
#[derive(Debug, Args)]
pub(crate) struct Paging<L: Listed> {
    #[arg(long, default_value_t = 100, value_name = "N", help = L::PER_PAGE)]
    pub limit: usize,

    #[arg(long, help = L::ALL)]
    pub all: bool,

    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table, value_name = "FORMAT")]
    pub output: Format,

    #[arg(skip)]
    listed: std::marker::PhantomData<L>,
}

macro_rules! listed {
    ($($noun:ident: $per_page:literal, $all:literal;)*) => {$(
        #[derive(Debug, Clone)]
        pub(crate) struct $noun;
        impl $crate::events::Listed for $noun {
            const PER_PAGE: &'static str = $per_page;
            const ALL: &'static str = $all;
        }
    )*};
}

pub(crate) use listed;

listed!(
    Events: "Events per page", "Follow nextCursor and list every matching event, not just one page";
    Voids: "Records per page", "Follow nextCursor and list every voided event, not just one page";
    Quarantined: "Events per page", "Follow nextCursor and list every quarantined event, not just one page";
);

/// One page of a cursor-paged listing.
pub(crate) trait Page {
    type Item;
    fn parts(&mut self) -> (&mut Vec<Self::Item>, &mut Option<String>);
}

macro_rules! page {
    ($($page:ty => $item:ty),*) => {$(
        impl Page for $page {
            type Item = $item;
            fn parts(&mut self) -> (&mut Vec<$item>, &mut Option<String>) {
                (&mut self.items, &mut self.next_cursor)
            }
        }
    )*};
}

page!(
    EventPage => tally_client::StoredEvent,
    QuarantinePage => tally_client::QuarantinedEvent,
    VoidPage => VoidRecord
);

/// The first page of a listing (`fetch(None)`) and, with `all`, every page
/// after it, following `nextCursor`.
pub(crate) async fn pages<P, F, Fut>(all: bool, mut fetch: F) -> anyhow::Result<P>
where
    P: Page,
    F: FnMut(Option<String>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<P>>,
{
    let mut page = fetch(None).await?;
    let mut last: Option<String> = None;
    if !all {
        return Ok(page);
    }
    while let Some(cursor) = page.parts().1.take() {
        if last.as_ref() == Some(&cursor) {
            bail!("the server returned the same nextCursor twice; stopping");
        }
        last = Some(cursor.clone());
        let mut next = fetch(Some(cursor)).await?;
        let (items, next_cursor) = next.parts();
        let (mine, my_cursor) = page.parts();
        mine.append(items);
        *my_cursor = next_cursor.take();
    }
    Ok(page)
}

// ---------------------------------------------------------------------------
// Reading events

/// Where an event came from, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// 1-based line of an NDJSON file.
    Line(u64),
    /// 0-based index in a JSON array.
    Item(usize),
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::Line(n) => write!(f, "line {n}"),
            Position::Item(i) => write!(f, "item {i}"),
        }
    }
}

/// "lines 1–1000", "item 7".
fn describe_range(positions: &[Position]) -> String {
    match (positions.first(), positions.last()) {
        (Some(first), Some(last)) if first == last => first.to_string(),
        (Some(Position::Line(a)), Some(Position::Line(b))) => format!("lines {a}–{b}"),
        (Some(Position::Item(a)), Some(Position::Item(b))) => format!("items {a}–{b}"),
        _ => "an empty batch".into(),
    }
}

/// Events to send in one request, and where each came from.
#[derive(Debug, Default)]
pub struct Batch {
    pub events: Vec<Value>,
    pub positions: Vec<Position>,
}

/// Events read from NDJSON line by line, or from a JSON array parsed whole.
pub enum EventSource {
    Lines {
        reader: Box<dyn BufRead>,
        line: u64,
        buffer: String,
        bytes_read: u64,
    },
    Array {
        items: std::vec::IntoIter<Value>,
        next: usize,
        total: usize,
    },
}

impl EventSource {
    /// Detects the format from the first character that is not white space.
    pub fn open(mut reader: Box<dyn BufRead>) -> anyhow::Result<EventSource> {
        let mut skipped_lines = 0;
        let mut skipped_bytes = 0;
        let first = loop {
            let buffer = reader.fill_buf().context("reading events")?;
            if buffer.is_empty() {
                break None;
            }
            match buffer.iter().position(|b| !b.is_ascii_whitespace()) {
                Some(at) => {
                    let first = buffer[at];
                    skipped_lines += buffer[..at].iter().filter(|b| **b == b'\n').count();
                    skipped_bytes += at;
                    reader.consume(at);
                    break Some(first);
                }
                None => {
                    let length = buffer.len();
                    skipped_lines += buffer.iter().filter(|b| **b == b'\n').count();
                    skipped_bytes += length;
                    reader.consume(length);
                }
            }
        };
        if first != Some(b'[') {
            return Ok(EventSource::Lines {
                reader,
                line: skipped_lines as u64,
                buffer: String::new(),
                bytes_read: skipped_bytes as u64,
            });
        }
        // Keep serde_json's line numbers right for the lines skipped above.
        let mut text = "\n".repeat(skipped_lines);
        reader.read_to_string(&mut text).context("reading events")?;
        let items: Vec<Value> =
            serde_json::from_str(&text).map_err(|e| anyhow!("invalid JSON array: {e}"))?;
        let total = items.len();
        Ok(EventSource::Array {
            items: items.into_iter(),
            next: 0,
            total,
        })
    }

    /// The next batch of at most `size` events, `None` at the end. A line that
    /// is not a JSON object is an error naming the line; nothing of the batch
    /// it is in has been sent.
    pub fn next_batch(&mut self, size: usize) -> anyhow::Result<Option<Batch>> {
        let mut batch = Batch::default();
        match self {
            EventSource::Array { items, next, .. } => {
                for event in items.by_ref().take(size) {
                    let position = Position::Item(*next);
                    *next += 1;
                    if !event.is_object() {
                        bail!(
                            "{position}: expected a JSON object (an event), got {}",
                            json_type(&event)
                        );
                    }
                    batch.events.push(event);
                    batch.positions.push(position);
                }
            }
            EventSource::Lines {
                reader,
                line,
                buffer,
                bytes_read,
            } => {
                while batch.events.len() < size {
                    buffer.clear();
                    *line += 1;
                    let position = Position::Line(*line);
                    let read = reader.read_line(buffer).map_err(|e| match e.kind() {
                        std::io::ErrorKind::InvalidData => anyhow!("{position}: not valid UTF-8"),
                        _ => anyhow!(e).context(format!("reading {position}")),
                    })?;
                    if read == 0 {
                        break;
                    }
                    *bytes_read += read as u64;
                    let text = buffer.trim();
                    if text.is_empty() {
                        continue;
                    }
                    let event: Value = serde_json::from_str(text).map_err(|e| {
                        anyhow!(
                            "{position}: {} (column {})",
                            json_error_text(&e),
                            e.column()
                        )
                    })?;
                    if !event.is_object() {
                        bail!(
                            "{position}: expected a JSON object (one event per line), got {}",
                            json_type(&event)
                        );
                    }
                    batch.events.push(event);
                    batch.positions.push(position);
                }
            }
        }
        Ok((!batch.events.is_empty()).then_some(batch))
    }

    /// Whether input may remain (false only when the end is certain).
    pub fn has_more(&mut self) -> bool {
        match self {
            EventSource::Array { items, .. } => items.len() > 0,
            EventSource::Lines { reader, .. } => {
                reader.fill_buf().map(|b| !b.is_empty()).unwrap_or(true)
            }
        }
    }

    /// Progress so far: bytes read for NDJSON, events taken for an array.
    fn progress(&self) -> u64 {
        match self {
            EventSource::Lines { bytes_read, .. } => *bytes_read,
            EventSource::Array { next, .. } => *next as u64,
        }
    }
}

fn json_type(value: &Value) -> &'static str {
    tally_model::event::json_type(value)
}

/// A serde_json error without its "at line 1 column 5" suffix.
fn json_error_text(error: &serde_json::Error) -> String {
    let text = error.to_string();
    let suffix = format!(" at line {} column {}", error.line(), error.column());
    text.strip_suffix(&suffix)
        .map_or_else(|| text.clone(), str::to_owned)
}

// ---------------------------------------------------------------------------
// Sending events

/// Totals of everything sent so far.
#[derive(Debug, Default)]
struct Totals {
    accepted: u64,
    duplicates: u64,
    quarantined: u64,
    /// The first quarantine notices, with where the event came from.
    notices: Vec<(Position, QuarantineNotice)>,
    /// Distinct warnings the server gave (e.g. a Deprecated meter).
    warnings: Vec<String>,
}

const NOTICES_SHOWN: usize = 20;

impl Totals {
    fn add(&mut self, outcome: IngestOutcome, positions: &[Position]) {
        self.accepted += outcome.accepted;
        self.duplicates += outcome.duplicates;
        self.quarantined += outcome.quarantined.len() as u64;
        for warning in outcome.warnings {
            if !self.warnings.contains(&warning) {
                self.warnings.push(warning);
            }
        }
        for notice in outcome.quarantined {
            if self.notices.len() < NOTICES_SHOWN
                && let Some(position) = positions.get(notice.index)
            {
                self.notices.push((*position, notice));
            }
        }
    }

    fn report(&self) -> String {
        let mut out = format!(
            "accepted {}, duplicates {}, quarantined {}\n",
            self.accepted, self.duplicates, self.quarantined
        );
        for (position, notice) in &self.notices {
            out.push_str(&format!(
                "  {position} (id {:?}): meter {}: {}: {}\n",
                notice.id, notice.meter, notice.reason, notice.message
            ));
        }
        let more = self.quarantined.saturating_sub(self.notices.len() as u64);
        if more > 0 {
            out.push_str(&format!("  ... and {more} more\n"));
        }
        for warning in &self.warnings {
            out.push_str(&format!("warning: {warning}\n"));
        }
        out
    }
}

/// Opens the input and, for a regular file, its size (for the progress bar).
fn open_input(file: &PathBuf) -> anyhow::Result<(Box<dyn BufRead>, Option<u64>)> {
    const BUFFER: usize = 256 * 1024;
    if file.as_os_str() == "-" {
        return Ok((
            Box::new(BufReader::with_capacity(BUFFER, std::io::stdin())),
            None,
        ));
    }
    let handle = File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let size = handle
        .metadata()
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.len());
    Ok((Box::new(BufReader::with_capacity(BUFFER, handle)), size))
}

fn progress_bar(source: &EventSource, file_size: Option<u64>) -> ProgressBar {
    let template =
        |t: &str| ProgressStyle::with_template(t).unwrap_or_else(|_| ProgressStyle::default_bar());
    let bar = match (source, file_size) {
        (EventSource::Array { total, .. }, _) => ProgressBar::new(*total as u64).with_style(
            template("{bar:40} {pos}/{len} events  {msg}  [{elapsed_precise}, eta {eta}]"),
        ),
        (EventSource::Lines { .. }, Some(size)) => ProgressBar::new(size).with_style(template(
            "{bar:40} {bytes}/{total_bytes}  {msg}  [{elapsed_precise}, eta {eta}]",
        )),
        (EventSource::Lines { .. }, None) => ProgressBar::new_spinner().with_style(template(
            "{spinner} {bytes} read  {msg}  [{elapsed_precise}]",
        )),
    };
    bar.set_draw_target(ProgressDrawTarget::stderr());
    bar
}

async fn send(client: &TallyClient, args: SendArgs) -> anyhow::Result<()> {
    let label = if args.file.as_os_str() == "-" {
        "standard input".to_owned()
    } else {
        args.file.display().to_string()
    };
    let (reader, file_size) = open_input(&args.file)?;
    let mut source =
        EventSource::open(reader).with_context(|| format!("sending events from {label}"))?;
    let batch_size = args.batch_size as usize;
    let mut totals = Totals::default();
    let mut bar: Option<ProgressBar> = None;
    let mut first = true;
    let result: anyhow::Result<()> = async {
        while let Some(batch) = source.next_batch(batch_size)? {
            if first
                && batch.events.len() == batch_size
                && source.has_more()
                && std::io::stderr().is_terminal()
            {
                bar = Some(progress_bar(&source, file_size));
            }
            first = false;
            let outcome = client
                .send_events(&batch.events)
                .await
                .map_err(|e| batch_error(e, &batch.positions))?;
            totals.add(outcome, &batch.positions);
            if let Some(bar) = &bar {
                bar.set_position(source.progress());
                bar.set_message(format!(
                    "{} accepted, {} duplicates",
                    totals.accepted, totals.duplicates
                ));
            }
        }
        Ok(())
    }
    .await;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    print(&totals.report())?;
    result.with_context(|| format!("sending events from {label}"))
}

/// An error for a batch that was not stored, naming its lines (or items), and
/// for refused events the line of each.
fn batch_error(error: ClientError, positions: &[Position]) -> anyhow::Error {
    let range = describe_range(positions);
    let ClientError::Api {
        status,
        title,
        detail,
        errors: Some(Value::Array(items)),
    } = &error
    else {
        let hint = if error.status() == Some(413) {
            "; try a smaller --batch-size"
        } else {
            ""
        };
        return anyhow!(error).context(format!("sending {range} (not stored{hint})"));
    };
    let mut message =
        format!("the server refused {range}, nothing of it was stored: {title} (HTTP {status})");
    if let Some(detail) = detail {
        message.push_str(&format!(": {detail}"));
    }
    for item in items {
        let index = item
            .get("index")
            .and_then(Value::as_u64)
            .and_then(|i| usize::try_from(i).ok());
        let position = index
            .and_then(|i| positions.get(i))
            .map_or_else(|| format!("event {index:?}"), ToString::to_string);
        let id = item
            .get("id")
            .and_then(Value::as_str)
            .map(|id| format!(" (id {id:?})"))
            .unwrap_or_default();
        let field_errors = item
            .get("errors")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for field_error in field_errors {
            let field = field_error
                .get("field")
                .and_then(Value::as_str)
                .unwrap_or("");
            let reason = field_error
                .get("reason")
                .and_then(Value::as_str)
                .map_or_else(|| field_error.to_string(), str::to_owned);
            if field.is_empty() {
                message.push_str(&format!("\n  {position}{id}: {reason}"));
            } else {
                message.push_str(&format!("\n  {position}{id}: {field}: {reason}"));
            }
        }
    }
    anyhow!(message)
}

// ---------------------------------------------------------------------------
// Listing

async fn list(client: &TallyClient, args: ListArgs) -> anyhow::Result<()> {
    let utc = TimeZone::UTC;
    let parse = |flag: &str, value: &Option<String>| {
        value
            .as_deref()
            .map(|v| when::parse_instant(v, &utc).with_context(|| flag.to_owned()))
            .transpose()
    };
    let mut params = EventListParams {
        from: parse("--from", &args.from)?,
        to: parse("--to", &args.to)?,
        event_type: args.event_type.clone(),
        subject: args.subject.clone(),
        source: args.source.clone(),
        id: args.id.clone(),
        limit: Some(args.page.limit),
        cursor: None,
    };
    let page: EventPage = pages(args.page.all, |cursor| {
        params.cursor = cursor;
        let params = params.clone();
        async move { client.list_events(&params).await.context("listing events") }
    })
    .await?;
    output::print_listing(args.page.output, &page, "No events found.", || {
        event_table(&page.items)
    })?;
    if page.next_cursor.is_some() {
        eprintln!("(more events: use --all to list them all)");
    }
    Ok(())
}

/// Stored events, named `event/SEQ`.
fn event_table(events: &[tally_client::StoredEvent]) -> Table {
    let mut table = Table::with_columns([
        Column::new("SEQ"),
        Column::new("TIME"),
        Column::new("TYPE"),
        Column::new("SUBJECT"),
        Column::new("SOURCE"),
        Column::new("ID"),
        Column::new("INGESTED AT").wide(),
        Column::new("VOIDED AT").wide(),
    ])
    .named();
    for stored in events {
        let e = &stored.event;
        table.named_row(
            format!("event/{}", stored.seq),
            [
                Cell::from(stored.seq.to_string()),
                time_cell(Some(e.time)),
                Cell::from(&e.kind),
                Cell::from(&e.subject),
                Cell::from(&e.source),
                Cell::from(&e.id),
                time_cell(Some(stored.ingested_at)),
                time_cell(stored.voided.as_ref().map(|v| v.voided_at)),
            ],
        );
    }
    table
}

pub async fn run_quarantine(
    client: &TallyClient,
    command: QuarantineCommand,
) -> anyhow::Result<()> {
    let QuarantineCommand::List(args) = command;
    let mut params = QuarantineListParams {
        meter: args.meter.clone(),
        limit: Some(args.page.limit),
        cursor: None,
    };
    let page: QuarantinePage = pages(args.page.all, |cursor| {
        params.cursor = cursor;
        let params = params.clone();
        async move {
            client
                .list_quarantine(&params)
                .await
                .context("listing quarantined events")
        }
    })
    .await?;
    output::print_listing(args.page.output, &page, "No quarantined events.", || {
        quarantine_table(&page.items)
    })?;
    if page.next_cursor.is_some() {
        eprintln!("(more quarantined events: use --all to list them all)");
    }
    Ok(())
}

/// Quarantined events, named `event/SEQ`.
fn quarantine_table(items: &[tally_client::QuarantinedEvent]) -> Table {
    let mut table = Table::with_columns([
        Column::new("SEQ"),
        Column::new("METER"),
        Column::new("REASON"),
        Column::new("TIME"),
        Column::new("TYPE"),
        Column::new("SUBJECT"),
        Column::new("ID"),
        Column::new("MESSAGE"),
        Column::new("SOURCE").wide(),
        Column::new("INGESTED AT").wide(),
    ])
    .named();
    for q in items {
        let e = &q.event.event;
        table.named_row(
            format!("event/{}", q.event.seq),
            [
                Cell::from(q.event.seq.to_string()),
                Cell::from(&q.meter),
                Cell::from(&q.reason),
                time_cell(Some(e.time)),
                Cell::from(&e.kind),
                Cell::from(&e.subject),
                Cell::from(&e.id),
                Cell::from(&q.message),
                Cell::from(&e.source),
                time_cell(Some(q.event.ingested_at)),
            ],
        );
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn source(text: &str) -> EventSource {
        EventSource::open(Box::new(Cursor::new(text.as_bytes().to_vec()))).unwrap()
    }

    fn lines(batch: &Batch) -> Vec<Position> {
        batch.positions.clone()
    }

    #[test]
    fn ndjson_is_read_in_batches_with_line_numbers() {
        let mut s = source("\n\n{\"id\":\"1\"}\n\n{\"id\":\"2\"}\r\n{\"id\":\"3\"}");
        assert!(matches!(s, EventSource::Lines { .. }));
        let batch = s.next_batch(2).unwrap().unwrap();
        assert_eq!(lines(&batch), [Position::Line(3), Position::Line(5)]);
        assert!(s.has_more());
        let batch = s.next_batch(2).unwrap().unwrap();
        assert_eq!(lines(&batch), [Position::Line(6)]);
        assert_eq!(batch.events[0]["id"], "3");
        assert!(s.next_batch(2).unwrap().is_none());
        assert!(!s.has_more());
    }

    #[test]
    fn bad_lines_are_named() {
        let mut s = source("{\"id\":\"1\"}\n{\"id\": oops}\n");
        let err = s.next_batch(10).unwrap_err();
        assert_eq!(err.to_string(), "line 2: expected value (column 8)");
        let mut s = source("{\"id\":\"1\"}\n[1]\n");
        let err = s.next_batch(10).unwrap_err();
        assert_eq!(
            err.to_string(),
            "line 2: expected a JSON object (one event per line), got array"
        );
        let mut s = EventSource::open(Box::new(Cursor::new(b"{}\n\xff\n".to_vec()))).unwrap();
        assert_eq!(
            s.next_batch(10).unwrap_err().to_string(),
            "line 2: not valid UTF-8"
        );
    }

    #[test]
    fn json_arrays_are_detected_after_white_space() {
        let mut s = source("  \n [ {\"id\":\"1\"}, {\"id\":\"2\"}, {\"id\":\"3\"} ]\n");
        assert!(matches!(s, EventSource::Array { total: 3, .. }));
        let batch = s.next_batch(2).unwrap().unwrap();
        assert_eq!(lines(&batch), [Position::Item(0), Position::Item(1)]);
        assert_eq!(describe_range(&batch.positions), "items 0–1");
        assert!(s.has_more());
        assert_eq!(s.next_batch(2).unwrap().unwrap().events.len(), 1);
        assert!(s.next_batch(2).unwrap().is_none());
        let err = EventSource::open(Box::new(Cursor::new(b"\n\n[{},\n{]".to_vec())))
            .err()
            .unwrap();
        assert!(err.to_string().contains("line 4"), "{err}");
        let mut s = source("[{}, 5]");
        assert_eq!(
            s.next_batch(5).unwrap_err().to_string(),
            "item 1: expected a JSON object (an event), got number"
        );
    }

    #[test]
    fn empty_input_has_no_batches() {
        assert!(source("").next_batch(5).unwrap().is_none());
        assert!(source(" \n\n ").next_batch(5).unwrap().is_none());
    }

    fn notice(index: usize) -> QuarantineNotice {
        QuarantineNotice {
            index,
            id: format!("e{index}"),
            meter: "requests".into(),
            reason: "missing_value".into(),
            message: "no $.value".into(),
        }
    }

    #[test]
    fn totals_list_twenty_notices_then_a_count() {
        let positions: Vec<Position> = (1..=30).map(Position::Line).collect();
        let mut totals = Totals::default();
        totals.add(
            IngestOutcome {
                accepted: 28,
                duplicates: 2,
                quarantined: (0..25).map(notice).collect(),
                warnings: vec!["meter \"m\" is Deprecated".into()],
            },
            &positions,
        );
        let report = totals.report();
        let lines: Vec<&str> = report.lines().collect();
        assert_eq!(lines[0], "accepted 28, duplicates 2, quarantined 25");
        assert_eq!(
            lines[1],
            "  line 1 (id \"e0\"): meter requests: missing_value: no $.value"
        );
        assert_eq!(lines.len(), 23);
        assert_eq!(lines[21], "  ... and 5 more");
        assert_eq!(lines[22], "warning: meter \"m\" is Deprecated");
    }

    #[test]
    fn refused_batches_name_the_lines_of_bad_events() {
        let positions = [Position::Line(10), Position::Line(12)];
        let error = ClientError::Api {
            status: 400,
            title: "Bad Request".into(),
            detail: Some("1 event(s) are invalid; nothing was stored".into()),
            errors: Some(serde_json::json!([
                {"index": 1, "id": "b", "errors": [{"field": "subject", "reason": "is required"}]}
            ])),
        };
        assert_eq!(
            batch_error(error, &positions).to_string(),
            "the server refused lines 10–12, nothing of it was stored: Bad Request (HTTP 400): \
             1 event(s) are invalid; nothing was stored\n  line 12 (id \"b\"): subject: is required"
        );
        let error = ClientError::Connect {
            url: "http://127.0.0.1:1/api/v1/events".into(),
            reason: "Connection refused".into(),
        };
        assert_eq!(
            format!("{:#}", batch_error(error, &positions)),
            "sending lines 10–12 (not stored): could not reach the Tally server at \
             http://127.0.0.1:1/api/v1/events: Connection refused"
        );
    }
}
