//! `tally`: the Tally command line.
//!
//! `tally serve` runs the server and `tally export` the exporters alone;
//! every other command talks to one over HTTP (`--server`, `TALLY_SERVER`)
//! with an optional bearer token (`--token`, `TALLY_TOKEN`).

mod backend;
mod billing;
mod collect;
mod describe;
mod events;
mod export;
mod forward;
mod instances;
mod logs;
mod meters;
mod output;
mod policy;
mod resources;
mod serve;
mod validate;
mod version;
mod watch;
mod when;

use std::io::Write as _;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tally_client::TallyClient;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in `mimalloc.h` (v2 and v3), which
/// `libmimalloc-sys` does not name.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// mimalloc's documented default for it, in milliseconds.
const DEFAULT_PURGE_DELAY_MS: std::ffi::c_long = 10;
/// How long freed memory stays with the process before it goes back to the
/// OS.
const PURGE_DELAY_MS: std::ffi::c_long = 1_000;

/// Keeps freed memory a second instead of 10 ms. A group commit or a large
/// query answer frees tens of MiB that the next one allocates again; given
/// back at once, each comes back as fresh pages the kernel must zero (a
/// fresh query spent 59 % of its CPU in `clear_page_erms`). Measured at
/// 1 M events: the grouped daily query ~12 % faster, ingest the same within
/// noise, peak RSS ~40 MiB higher. RSS still falls a second after a peak.
/// An operator's `MIMALLOC_PURGE_DELAY` wins; so does any build of
/// mimalloc whose option 15 is not the purge delay (its default differs).
fn keep_freed_memory_a_second() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: reading and setting a process-wide allocator option, which
    // mimalloc allows at any time from any thread; no memory is touched.
    unsafe {
        if libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) == DEFAULT_PURGE_DELAY_MS {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS);
        }
    }
}

/// Usage metering: ingest CloudEvents exactly once, define meters, query usage.
#[derive(Parser)]
#[command(
    name = "tally",
    version,
    long_version = version::long(),
    propagate_version = true,
    max_term_width = 100
)]
struct Cli {
    /// URL of the Tally server that client commands talk to.
    #[arg(
        long,
        global = true,
        env = "TALLY_SERVER",
        default_value = "http://127.0.0.1:8080",
        value_name = "URL"
    )]
    server: String,

    /// Bearer token. Client commands send it as `Authorization: Bearer <TOKEN>`;
    /// `serve` requires it from every client (except on /healthz and /readyz).
    /// It is never printed.
    #[arg(
        long,
        global = true,
        env = "TALLY_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    token: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the Tally server: on its embedded store, or as a cluster node (--cluster).
    Serve(serve::ServeArgs),
    /// Run the telemetry exporters alone (no ledger): metrics in over OTLP
    /// and remote-write, pulled from VictoriaMetrics, out to each Exporter's
    /// OTLP endpoints; configured from watched manifest directories.
    Export(Box<export::ExportArgs>),
    /// Create or update resources from YAML or JSON manifests, like `kubectl apply`.
    Apply(resources::ApplyArgs),
    /// Show resources of one kind (`-o table|wide|json|yaml|csv|name`);
    /// `-w` watches for changes.
    Get(resources::GetArgs),
    /// Show one resource for people: spec, status conditions and recent events.
    Describe(describe::DescribeArgs),
    /// Delete a resource.
    Delete(resources::DeleteArgs),
    /// Send and list usage events.
    #[command(subcommand)]
    Events(events::EventsCommand),
    /// List meters and query their usage.
    #[command(subcommand)]
    Meters(meters::MetersCommand),
    /// Print (and follow) the stdout/stderr of a compute instance.
    Logs(logs::LogsArgs),
    /// Inspect events that a meter could not measure yet.
    #[command(subcommand)]
    Quarantine(events::QuarantineCommand),
    /// Measure ingest throughput, query latency, memory and disk use against
    /// a real server on loopback (see BENCHMARKS.md).
    Bench(BenchArgs),
    /// Edge agent: turn Envoy access logs (files, OTLP over gRPC and HTTP)
    /// and admin connection gauges into gateway usage events and ship them
    /// to the ledger exactly once.
    Collect(Box<collect::CollectArgs>),
    /// Billing forwarder state: status, dead letters, reconciliation.
    #[command(subcommand)]
    Billing(billing::BillingCommand),
    /// TelemetryPolicy tools: render the proxy configuration of the
    /// policies in force.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Compute instances: their latest state and lifecycle events
    /// (created, scheduled, started, stopped, crashed, OOM-killed, terminated).
    #[command(subcommand)]
    Instances(instances::InstancesCommand),
    /// Run the billing forwarder of one BillingSink on its own, against a
    /// server over HTTP (turn off the server's own: billing.enabled: false).
    Forward(forward::ForwardArgs),
    /// Print the client's version, commit and target, and the server's version.
    Version(version::VersionArgs),
    /// Print a shell completion script (see README: Shell completion).
    Completion(CompletionArgs),
}

#[derive(clap::Args)]
struct CompletionArgs {
    /// The shell to complete in.
    #[arg(value_enum, value_name = "SHELL")]
    shell: clap_complete::Shell,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Events to ingest.
    #[arg(long, default_value_t = 1_000_000)]
    events: usize,
    /// Events per HTTP request.
    #[arg(long, default_value_t = 1_000)]
    batch: usize,
    /// Concurrent HTTP connections.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Distinct subjects (projects).
    #[arg(long, default_value_t = 10_000)]
    subjects: usize,
    /// Repetitions of each timed query.
    #[arg(long, default_value_t = 50)]
    query_runs: usize,
    /// Keep the store in this directory instead of a temporary one.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<std::path::PathBuf>,
    /// Run the load generator as a separate process, so it does not share
    /// the server's process (it still shares the machine's cores).
    #[arg(long)]
    load_process: bool,
    /// The order event times come in: `random` (any time in the 30 days,
    /// the writer's worst case) or `time` (a month replayed in order, each
    /// event up to five minutes late).
    #[arg(long, default_value = "random", value_name = "ORDER")]
    order: tally_bench::Order,
    /// Skip ingest: time the queries on the store that an earlier run left
    /// in --data-dir (give the same --events, for the per-million figures).
    #[arg(long, requires = "data_dir")]
    queries_only: bool,
    /// Spread event times over the 30 days before this time instead of now
    /// (the same time gives the same events on every run).
    #[arg(long, value_name = "RFC3339")]
    now: Option<jiff::Timestamp>,
    /// Write the events (the same ones a run with the same --events,
    /// --batch, --subjects, --order and --now sends) to FILE as NDJSON, one
    /// CloudEvent a line, and exit without serving.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["events_file", "queries_only"])]
    write_events: Option<std::path::PathBuf>,
    /// Send the events of this NDJSON file (at most 10 M lines of 64 KiB)
    /// in batches of --batch instead of generating them; --events is then
    /// the file's count. Give the --now it was written with, so the queries
    /// cover its 30 days.
    #[arg(long, value_name = "FILE", conflicts_with = "load_process")]
    events_file: Option<std::path::PathBuf>,
    /// Also write the report as JSON to FILE, with the answers of both
    /// queries in full (for bench/compare-storage.py).
    #[arg(long, value_name = "FILE")]
    report_json: Option<std::path::PathBuf>,
    /// Internal: be the load generator of `--load-process` for the server at URL.
    #[arg(long, value_name = "URL", hide = true)]
    load_only_to: Option<String>,
    /// Internal: the time the load generator spreads events before.
    #[arg(long, value_name = "RFC3339", hide = true, requires = "load_only_to")]
    load_now: Option<jiff::Timestamp>,
}

fn main() -> ExitCode {
    keep_freed_memory_a_second();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // `{:#}` prints the context chain: "what we did: why it failed".
            let _ = std::io::stdout().flush();
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let client_command = match cli.command {
        Command::Serve(args) => return serve::run(args, cli.token),
        Command::Export(args) => return export::run(*args, cli.token),
        Command::Bench(args) => return bench(args),
        Command::Collect(args) => return collect::run(*args, cli.server, cli.token),
        Command::Forward(args) => return forward::run(args, cli.server, cli.token),
        Command::Completion(args) => return completion(args.shell),
        Command::Version(args) if args.client => return version::print_client(args.output),
        Command::Version(args) => ClientCommand::Version(args),
        Command::Describe(args) => ClientCommand::Describe(args),
        Command::Billing(command) => ClientCommand::Billing(command),
        Command::Policy(command) => ClientCommand::Policy(command),
        Command::Apply(args) => ClientCommand::Apply(args),
        Command::Get(args) => ClientCommand::Get(args),
        Command::Delete(args) => ClientCommand::Delete(args),
        Command::Events(command) => ClientCommand::Events(command),
        Command::Meters(command) => ClientCommand::Meters(command),
        Command::Quarantine(command) => ClientCommand::Quarantine(command),
        Command::Logs(args) => ClientCommand::Logs(args),
        Command::Instances(command) => ClientCommand::Instances(command),
    };
    let client = TallyClient::new(&cli.server, cli.token).context("setting up the client")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        match client_command {
            ClientCommand::Apply(args) => resources::apply(&client, args).await,
            ClientCommand::Get(args) => resources::get(&client, args).await,
            ClientCommand::Describe(args) => describe::run(&client, args).await,
            ClientCommand::Version(args) => version::run(&client, args).await,
            ClientCommand::Delete(args) => resources::delete(&client, args).await,
            ClientCommand::Events(command) => events::run(&client, command).await,
            ClientCommand::Meters(command) => meters::run(&client, command).await,
            ClientCommand::Quarantine(command) => events::run_quarantine(&client, command).await,
            ClientCommand::Logs(args) => logs::run(&client, args).await,
            ClientCommand::Billing(command) => billing::run(&client, command).await,
            ClientCommand::Policy(command) => policy::run(&client, command).await,
            ClientCommand::Instances(command) => instances::run(&client, command).await,
        }
    })
}

fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    if let Some(base) = args.load_only_to {
        let load = tally_bench::LoadOptions {
            events: args.events,
            batch: args.batch.max(1),
            connections: args.connections.max(1),
            subjects: args.subjects.max(1),
            now: args.load_now.unwrap_or_else(jiff::Timestamp::now),
            order: args.order,
        };
        return runtime.block_on(tally_bench::run_load(load, base));
    }
    if let Some(path) = &args.write_events {
        let load = tally_bench::LoadOptions {
            events: args.events,
            batch: args.batch.max(1),
            connections: 1,
            subjects: args.subjects.max(1),
            now: args.now.unwrap_or_else(jiff::Timestamp::now),
            order: args.order,
        };
        return tally_bench::write_events(&load, path);
    }
    let options = tally_bench::BenchOptions {
        events: args.events,
        batch: args.batch.max(1),
        connections: args.connections.max(1),
        subjects: args.subjects.max(1),
        data_dir: args.data_dir,
        query_runs: args.query_runs.max(1),
        load_process: args.load_process,
        order: args.order,
        queries_only: args.queries_only,
        now: args.now,
        events_file: args.events_file,
        report_json: args.report_json,
    };
    runtime.block_on(tally_bench::run(options))
}

/// The commands that talk to a server.
enum ClientCommand {
    Apply(resources::ApplyArgs),
    Get(resources::GetArgs),
    Describe(describe::DescribeArgs),
    Delete(resources::DeleteArgs),
    Version(version::VersionArgs),
    Events(events::EventsCommand),
    Meters(meters::MetersCommand),
    Quarantine(events::QuarantineCommand),
    Billing(billing::BillingCommand),
    Policy(policy::PolicyCommand),
    Logs(logs::LogsArgs),
    Instances(instances::InstancesCommand),
}

/// Writes a completion script for `shell` to standard output.
fn completion(shell: clap_complete::Shell) -> anyhow::Result<()> {
    use clap::CommandFactory;
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "tally", &mut script);
    print(&String::from_utf8_lossy(&script))
}

/// Writes text to standard output; a closed pipe (`tally ... | head`) is not
/// an error worth a message.
fn print(text: &str) -> anyhow::Result<()> {
    print_open(text).map(drop)
}

/// Writes text to standard output; false when it is closed (a reader
/// such as `head` went away), so a command that keeps printing can stop.
fn print_open(text: &str) -> anyhow::Result<bool> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        other => other.context("writing to standard output").map(|()| true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_option_has_help() {
        fn walk(command: &clap::Command, path: &str) {
            for arg in command.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                assert!(
                    arg.get_help().is_some() || arg.get_long_help().is_some(),
                    "{path} {id} has no help"
                );
            }
            for sub in command.get_subcommands() {
                assert!(
                    sub.get_about().is_some(),
                    "{path} {} has no about",
                    sub.get_name()
                );
                walk(sub, &format!("{path} {}", sub.get_name()));
            }
        }
        walk(&Cli::command(), "tally");
    }

    #[test]
    fn global_options_work_after_the_subcommand() {
        let cli = Cli::try_parse_from([
            "tally",
            "get",
            "md",
            "--server",
            "http://x:1",
            "--token",
            "t",
        ])
        .unwrap();
        assert_eq!(cli.server, "http://x:1");
        assert_eq!(cli.token.as_deref(), Some("t"));
    }
}
