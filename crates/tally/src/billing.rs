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
    /// Per sink and meter: last forwarded window, lag, records sent,
    /// retries, dead letters.
    Status(StatusArgs),
    /// Batches the provider refused for good, with its answer.
    Deadletters(DeadLettersArgs),
    /// Send a dead letter's records again (same uniqueIds).
    Retry(RetryArgs),
    /// Compare, per billing account and meter, the ledger's totals with what
    /// the provider acknowledged; exits non-zero when any differ.
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
    #[arg(value_name = "ID")]
    id: u64,
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
        BillingCommand::Retry(args) => {
            client
                .billing_retry_dead_letter(&args.sink, args.id)
                .await
                .with_context(|| format!("retrying dead letter {} of {}", args.id, args.sink))?;
            print(&format!(
                "dead letter {} of billing sink {} queued again\n",
                args.id, args.sink
            ))
        }
        BillingCommand::Reconcile(args) => reconcile(client, args).await,
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
    ])
    .named();
    for sink in answer["sinks"].as_array().into_iter().flatten() {
        let ready = if sink["ready"].as_bool() == Some(true) {
            "True".to_owned()
        } else {
            format!("False ({})", text(&sink["reason"]))
        };
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
                ],
            );
        }
    }
    output::print_listing(args.output, &answer, "No billing sinks.", || table)
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
        "DIFFERENCE",
    ]);
    for sink in answer["sinks"].as_array().into_iter().flatten() {
        for row in sink["totals"].as_array().into_iter().flatten() {
            let ledger = text(&row["ledger"]);
            let acknowledged = text(&row["acknowledged"]);
            let difference = match (
                ledger.parse::<rust_decimal::Decimal>(),
                acknowledged.parse::<rust_decimal::Decimal>(),
            ) {
                (Ok(l), Ok(a)) if l == a => String::new(),
                (Ok(l), Ok(a)) => (l - a).normalize().to_string(),
                _ => "?".to_owned(),
            };
            table.row([
                cell(&sink["sink"]),
                cell(&row["customerId"]),
                cell(&row["meterApiName"]),
                ledger.into(),
                acknowledged.into(),
                difference.into(),
            ]);
        }
    }
    output::print_listing(args.output, &answer, "Nothing to reconcile.", || table)?;
    if differences > 0 {
        anyhow::bail!("{differences} (billing account, meter) total(s) differ from the provider's");
    }
    Ok(())
}
