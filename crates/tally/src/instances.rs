//! `tally instances list` and `tally instances events INSTANCE`.

use anyhow::Context;
use clap::{Args, Subcommand};
use tally_client::{
    InstancePage, InstanceSummary, LifecycleEvent, LifecycleEventPage, TallyClient,
};

use crate::events::{Page, Paging, pages};
use crate::output::{self, Cell, Column, Table, or_none, time_cell};

#[derive(Debug, Subcommand)]
pub enum InstancesCommand {
    /// Instances with lifecycle events and their latest state.
    List(ListArgs),
    /// One instance's lifecycle events (start, stop, crash, OOM kill...),
    /// with reason and time, in arrival order.
    Events(EventsArgs),
}

crate::events::listed!(
    Instances: "Instances per page", "Follow nextCursor and list every instance, not just one page";
    LifecycleEvents: "Events per page", "Follow nextCursor and list every event, not just one page";
);

#[derive(Debug, Args)]
pub struct ListArgs {
    /// The project (default: the token's only project; operators: every project).
    #[arg(long, value_name = "PROJECT")]
    project: Option<String>,

    #[command(flatten)]
    page: Paging<Instances>,
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// The instance's name.
    #[arg(value_name = "INSTANCE")]
    instance: String,

    /// The instance's project (default: the token's only project; required
    /// for operators).
    #[arg(long, value_name = "PROJECT")]
    project: Option<String>,

    #[command(flatten)]
    page: Paging<LifecycleEvents>,
}

impl Page for InstancePage {
    type Item = InstanceSummary;
    fn parts(&mut self) -> (&mut Vec<InstanceSummary>, &mut Option<String>) {
        (&mut self.items, &mut self.next_cursor)
    }
}

impl Page for LifecycleEventPage {
    type Item = LifecycleEvent;
    fn parts(&mut self) -> (&mut Vec<LifecycleEvent>, &mut Option<String>) {
        (&mut self.items, &mut self.next_cursor)
    }
}

pub async fn run(client: &TallyClient, command: InstancesCommand) -> anyhow::Result<()> {
    match command {
        InstancesCommand::List(args) => list(client, args).await,
        InstancesCommand::Events(args) => events(client, args).await,
    }
}

fn instance_table(items: &[InstanceSummary]) -> Table {
    let mut table = Table::with_columns([
        Column::new("PROJECT"),
        Column::new("INSTANCE"),
        Column::new("STATE"),
        Column::new("REASON"),
        Column::new("SINCE"),
        Column::new("WORKLOAD").wide(),
        Column::new("NODE").wide(),
        Column::new("EVENTS").wide(),
    ])
    .named();
    for i in items {
        table.named_row(
            format!("{}/{}", i.project, i.instance),
            [
                Cell::from(&i.project),
                Cell::from(&i.instance),
                Cell::from(i.state.as_str()),
                or_none(i.reason.map(|r| r.as_str())),
                time_cell(Some(i.since)),
                or_none(i.workload.as_deref()),
                or_none(i.node.as_deref()),
                Cell::from(i.events.to_string()),
            ],
        );
    }
    table
}

fn event_table(items: &[LifecycleEvent]) -> Table {
    let mut table = Table::with_columns([
        Column::new("TIME"),
        Column::new("EVENT"),
        Column::new("REASON"),
        Column::new("MESSAGE"),
        Column::new("NODE").wide(),
        Column::new("SOURCE").wide(),
        Column::new("ID").wide(),
    ])
    .named();
    for e in items {
        table.named_row(
            e.id.clone(),
            [
                time_cell(Some(e.time)),
                Cell::from(e.kind.as_str()),
                or_none(e.reason.map(|r| r.as_str())),
                or_none(e.message.as_deref()),
                or_none(e.node.as_deref()),
                Cell::from(&e.source),
                Cell::from(&e.id),
            ],
        );
    }
    table
}

async fn list(client: &TallyClient, args: ListArgs) -> anyhow::Result<()> {
    let project = args.project.as_deref();
    let page: InstancePage = pages(args.page.all, |cursor| async move {
        client
            .list_instances(project, args.page.limit, cursor.as_deref())
            .await
            .context("listing instances")
    })
    .await?;
    output::print_listing(args.page.output, &page, "No instances.", || {
        instance_table(&page.items)
    })?;
    if page.next_cursor.is_some() {
        eprintln!("(more instances: use --all to list them all)");
    }
    Ok(())
}

async fn events(client: &TallyClient, args: EventsArgs) -> anyhow::Result<()> {
    let (instance, project) = (args.instance.as_str(), args.project.as_deref());
    let page: LifecycleEventPage = pages(args.page.all, |cursor| async move {
        client
            .instance_events(instance, project, args.page.limit, cursor.as_deref())
            .await
            .with_context(|| format!("listing the events of instance {instance:?}"))
    })
    .await?;
    output::print_listing(args.page.output, &page, "No events.", || {
        event_table(&page.items)
    })?;
    if page.next_cursor.is_some() {
        eprintln!("(more events: use --all to list them all)");
    }
    Ok(())
}
