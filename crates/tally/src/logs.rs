//! `tally logs INSTANCE`: an instance's stdout/stderr, as its project's
//! token may read them (`GET /api/v1/projects/{project}/instances/{instance}/logs`),
//! optionally followed. Lines print as they came, one record per entry
//! (a multi-line record keeps its line breaks), after its time and stream.

use anyhow::Context;
use clap::Args;
use serde_json::Value;
use tally_client::{LogParams, TallyClient};

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The instance's name.
    #[arg(value_name = "INSTANCE")]
    instance: String,
    /// The instance's project.
    #[arg(long, env = "TALLY_PROJECT", value_name = "PROJECT")]
    project: String,
    /// Lines since this long ago (`1h`, `30m`) or an RFC 3339 time.
    #[arg(long, default_value = "1h", value_name = "SINCE")]
    since: String,
    /// Keep printing new lines as they arrive.
    #[arg(short = 'f', long)]
    follow: bool,
    /// Only `stdout` or `stderr`.
    #[arg(long, value_parser = ["stdout", "stderr"], value_name = "STREAM")]
    stream: Option<String>,
    /// Only lines containing this text (repeatable: all must hold).
    #[arg(long, value_name = "TEXT")]
    grep: Vec<String>,
    /// At most this many lines (the newest).
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
    /// Print only the lines, without time and stream.
    #[arg(long)]
    raw: bool,
}

fn print_line(line: &Value, raw: bool) {
    let text = line["line"].as_str().unwrap_or("");
    if raw {
        println!("{text}");
    } else {
        println!(
            "{} {} {text}",
            line["time"].as_str().unwrap_or(""),
            line["stream"].as_str().unwrap_or("")
        );
    }
}

pub async fn run(client: &TallyClient, args: LogsArgs) -> anyhow::Result<()> {
    let params = LogParams {
        since: Some(args.since.clone()),
        stream: args.stream.clone(),
        grep: args.grep.clone(),
        limit: args.limit,
    };
    let what = || format!("reading the logs of {}/{}", args.project, args.instance);
    if !args.follow {
        let page = client
            .instance_logs(&args.project, &args.instance, &params)
            .await
            .with_context(what)?;
        for line in page["lines"].as_array().into_iter().flatten() {
            print_line(line, args.raw);
        }
        if page["truncated"].as_bool() == Some(true) {
            eprintln!("(more lines match: narrow --since or raise --limit)");
        }
        return Ok(());
    }
    let mut follower = client
        .follow_instance_logs(&args.project, &args.instance, &params)
        .await
        .with_context(what)?;
    while let Some(lines) = follower.next().await.with_context(what)? {
        for line in &lines {
            print_line(line, args.raw);
        }
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
    }
    Ok(())
}
