//! `tally billing status|deadletters|retry|reconcile`: the billing
//! forwarder's state, its dead letters, and the ledger against the provider.

use anyhow::Context;
use clap::{Args, Subcommand};
use jiff::tz::TimeZone;
use serde_json::Value;
use tally_client::TallyClient;

use crate::output::{self, Cell, Format, NONE, Table};
use crate::print;
use crate::when::parse_instant;

#[derive(Debug, Subcommand)]
pub enum BillingCommand {
    /// Per sink and meter: readiness (and why not, since when), last
    /// forwarded window, lag in seconds, records sent and pending, dead
    /// letters, unattributed usage.
    Status(StatusArgs),
    /// Batches the provider refused for good, with its answer.
    Deadletters(DeadLettersArgs),
    /// Send a dead letter's records again (same uniqueIds), or all of a
    /// sink's with --all.
    Retry(RetryArgs),
    /// Compare, per billing account and meter, the ledger's totals with the
    /// provider's own (its usage API) and with what it acknowledged; exits
    /// non-zero when the provider's total drifts either way.
    Reconcile(ReconcileArgs),
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Only this BillingSink.
    #[arg(long, value_name = "NAME")]
    sink: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table, value_name = "FORMAT")]
    output: Format,
}

#[derive(Debug, Args)]
pub struct DeadLettersArgs {
    /// Only this BillingSink.
    #[arg(long, value_name = "NAME")]
    sink: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table, value_name = "FORMAT")]
    output: Format,
}

#[derive(Debug, Args)]
pub struct RetryArgs {
    /// The BillingSink.
    #[arg(value_name = "SINK")]
    sink: String,
    /// The dead letter's id (see `tally billing deadletters`).
    #[arg(
        value_name = "ID",
        required_unless_present = "all",
        conflicts_with = "all"
    )]
    id: Option<u64>,
    /// Every dead letter of the sink.
    #[arg(long)]
    all: bool,
}

#[derive(Debug, Args)]
pub struct ReconcileArgs {
    /// Windows starting at or after this (RFC 3339 or a date, UTC).
    #[arg(long, value_name = "TIME")]
    from: String,
    /// Windows starting before this (RFC 3339 or a date, UTC).
    #[arg(long, value_name = "TIME")]
    to: String,
    /// Only this BillingSink.
    #[arg(long, value_name = "NAME")]
    sink: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table, value_name = "FORMAT")]
    output: Format,
}

fn text(value: &Value) -> String {
    match value {
        Value::Null => NONE.to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A table cell: none for null.
fn cell(value: &Value) -> Cell {
    match value {
        Value::Null => Cell::default(),
        other => text(other).into(),
    }
}

/// Seconds of a serialised `Duration` (`{"secs": n, "nanos": m}`).
fn seconds(value: &Value) -> Cell {
    value
        .get("secs")
        .and_then(Value::as_u64)
        .map(|secs| format!("{secs}s"))
        .into()
}

pub async fn run(client: &TallyClient, command: BillingCommand) -> anyhow::Result<()> {
    match command {
        BillingCommand::Status(args) => status(client, args).await,
        BillingCommand::Deadletters(args) => dead_letters(client, args).await,
        BillingCommand::Retry(args) => retry(client, args).await,
        BillingCommand::Reconcile(args) => reconcile(client, args).await,
    }
}

async fn retry(client: &TallyClient, args: RetryArgs) -> anyhow::Result<()> {
    let Some(id) = args.id else {
        let answer = client
            .billing_retry_all_dead_letters(&args.sink)
            .await
            .with_context(|| format!("retrying the dead letters of {}", args.sink))?;
        let ids: Vec<String> = answer["ids"]
            .as_array()
            .into_iter()
            .flatten()
            .map(text)
            .collect();
        return print(&match ids.as_slice() {
            [] => format!("billing sink {} has no dead letters\n", args.sink),
            ids => format!(
                "dead letters {} of billing sink {} queued again\n",
                ids.join(", "),
                args.sink
            ),
        });
    };
    client
        .billing_retry_dead_letter(&args.sink, id)
        .await
        .with_context(|| format!("retrying dead letter {id} of {}", args.sink))?;
    print(&format!(
        "dead letter {id} of billing sink {} queued again\n",
        args.sink
    ))
}

/// A sink's readiness: `True`, or `False (Reason since T)`.
fn readiness(sink: &Value) -> String {
    if sink["ready"].as_bool() == Some(true) {
        return "True".to_owned();
    }
    match sink["since"].as_str() {
        Some(since) => format!("False ({} since {since})", text(&sink["reason"])),
        None => format!("False ({})", text(&sink["reason"])),
    }
}

/// Unattributed usage and how many projects it belongs to.
fn unattributed(meter: &Value) -> String {
    match meter["unattributedProjects"].as_u64() {
        Some(0) | None => text(&meter["unattributed"]),
        Some(n) => format!("{} ({n} projects)", text(&meter["unattributed"])),
    }
}

async fn status(client: &TallyClient, args: StatusArgs) -> anyhow::Result<()> {
    let answer = client
        .billing_status(args.sink.as_deref())
        .await
        .context("reading the billing status")?;
    let mut table = Table::new([
        "SINK",
        "READY",
        "METER",
        "API NAME",
        "FORWARDED UNTIL",
        "LAG",
        "SENT",
        "CORRECTIONS",
        "PENDING",
        "RETRIES",
        "DEAD LETTERS",
        "UNATTRIBUTED",
    ])
    .named();
    let mut notes = String::new();
    for sink in answer["sinks"].as_array().into_iter().flatten() {
        let ready = readiness(sink);
        if sink["ready"].as_bool() != Some(true) {
            notes.push_str(&format!(
                "{}: {}\n",
                text(&sink["sink"]),
                text(&sink["message"])
            ));
        }
        let status = &sink["status"];
        let meters = status["meters"].as_array().cloned().unwrap_or_default();
        let name = format!("billingsink/{}", text(&sink["sink"]));
        if meters.is_empty() {
            table.named_row(name.clone(), [cell(&sink["sink"]), ready.clone().into()]);
        }
        for meter in meters {
            table.named_row(
                name.clone(),
                [
                    cell(&sink["sink"]),
                    ready.clone().into(),
                    cell(&meter["meter"]),
                    cell(&meter["meterApiName"]),
                    cell(&meter["forwardedUntil"]),
                    seconds(&meter["lag"]),
                    cell(&meter["recordsSent"]),
                    cell(&meter["correctionsSent"]),
                    cell(&meter["recordsPending"]),
                    cell(&status["retries"]),
                    cell(&status["deadLetters"]),
                    unattributed(&meter).into(),
                ],
            );
        }
    }
    output::print_listing(args.output, &answer, "No billing sinks.", || table)?;
    // Why a sink is not ready, for people reading the table.
    if matches!(args.output, Format::Table | Format::Wide) && !notes.is_empty() {
        print(&notes)?;
    }
    Ok(())
}

async fn dead_letters(client: &TallyClient, args: DeadLettersArgs) -> anyhow::Result<()> {
    let answer = client
        .billing_dead_letters(args.sink.as_deref())
        .await
        .context("listing billing dead letters")?;
    let wide = matches!(args.output, Format::Wide | Format::Csv);
    let mut table =
        Table::new(["SINK", "ID", "AT", "STATUS", "RECORDS", "REASON", "ANSWER"]).named();
    for sink in answer["sinks"].as_array().into_iter().flatten() {
        for letter in sink["deadLetters"].as_array().into_iter().flatten() {
            let records = letter["records"].as_array().map_or(0, Vec::len);
            let mut answer = text(&letter["answer"]);
            if !wide && answer.len() > 80 {
                let cut = (0..=80)
                    .rev()
                    .find(|i| answer.is_char_boundary(*i))
                    .unwrap_or(0);
                answer.truncate(cut);
                answer.push('…');
            }
            table.named_row(
                format!("deadletter/{}/{}", text(&sink["sink"]), text(&letter["id"])),
                [
                    cell(&sink["sink"]),
                    cell(&letter["id"]),
                    cell(&letter["at"]),
                    cell(&letter["status"]),
                    records.to_string().into(),
                    cell(&letter["reason"]),
                    answer.into(),
                ],
            );
        }
    }
    output::print_listing(args.output, &answer, "No dead letters.", || table)
}

async fn reconcile(client: &TallyClient, args: ReconcileArgs) -> anyhow::Result<()> {
    let from = parse_instant(&args.from, &TimeZone::UTC).context("--from")?;
    let to = parse_instant(&args.to, &TimeZone::UTC).context("--to")?;
    let answer = client
        .billing_reconcile(from, to, args.sink.as_deref())
        .await
        .context("reconciling billing")?;
    let differences = answer["differences"].as_u64().unwrap_or(0);
    let mut table = Table::new([
        "SINK",
        "CUSTOMER",
        "METER API NAME",
        "LEDGER",
        "ACKNOWLEDGED",
        "PROVIDER",
        "DRIFT",
    ]);
    for sink in answer["sinks"].as_array().into_iter().flatten() {
        for row in sink["totals"].as_array().into_iter().flatten() {
            // Provider minus ledger: + over-billed, - under-billed.
            let drift = match row["drift"].as_str() {
                Some("0") | None => String::new(),
                Some(d) if d.starts_with('-') => d.to_owned(),
                Some(d) => format!("+{d}"),
            };
            table.row([
                cell(&sink["sink"]),
                cell(&row["customerId"]),
                cell(&row["meterApiName"]),
                cell(&row["ledger"]),
                cell(&row["acknowledged"]),
                cell(&row["provider"]),
                drift.into(),
            ]);
        }
    }
    output::print_listing(args.output, &answer, "Nothing to reconcile.", || table)?;
    if differences > 0 {
        anyhow::bail!(
            "{differences} (billing account, meter) total(s) at the provider drift from the ledger's"
        );
    }
    Ok(())
}
