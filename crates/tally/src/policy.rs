//! `tally policy render`: the Envoy Gateway configuration equivalent to the
//! TelemetryPolicies in force on a namespace's gateways. The resolution and
//! the rendering are `tally-policy`'s; this reads what the caller may see
//! (policies, namespaces, gateways) and prints YAML.

use anyhow::Context;
use clap::Subcommand;
use tally_client::TallyClient;
use tally_model::{Kind, Manifest};
use tally_policy::render::{Collector, render};
use tally_policy::{Resolution, Target, World};

use crate::{output, print};

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Print the proxy configuration equivalent to the policies in force on
    /// the gateways of a namespace.
    Render(RenderArgs),
}

#[derive(clap::Args)]
pub struct RenderArgs {
    /// The namespace whose gateways to render.
    #[arg(short = 'n', long)]
    namespace: String,
    /// Render Envoy Gateway `EnvoyProxy` resources
    /// (gateway.envoyproxy.io/v1alpha1, `spec.telemetry`).
    #[arg(long, required = true)]
    envoy_gateway: bool,
    /// Where the proxy sends access logs and spans over OTLP/gRPC (the collector).
    #[arg(long, default_value = "tally-collect.tally-system.svc.cluster.local")]
    otlp_host: String,
    /// The collector's OTLP/gRPC port.
    #[arg(long, default_value_t = 4317)]
    otlp_port: u16,
}

pub async fn run(client: &TallyClient, command: PolicyCommand) -> anyhow::Result<()> {
    match command {
        PolicyCommand::Render(args) => render_namespace(client, args).await,
    }
}

async fn render_namespace(client: &TallyClient, args: RenderArgs) -> anyhow::Result<()> {
    let list = |kind: Kind| async move {
        client
            .list_resources(kind, None)
            .await
            .with_context(|| format!("listing {}", kind.plural()))
    };
    let policies = list(Kind::TelemetryPolicy).await?;
    let world = world(&list(Kind::Namespace).await?, &list(Kind::Gateway).await?);
    let resolution = Resolution::resolve(&policies, &world);
    let collector = Collector {
        host: args.otlp_host,
        port: args.otlp_port,
    };
    let mut documents = Vec::new();
    for (target, policy) in resolution.in_force(&world) {
        let Target::Gateway { namespace, .. } = &target else {
            continue;
        };
        if *namespace != args.namespace {
            continue;
        }
        if let Some(rendered) = render(&target, policy, &collector) {
            let mut text = String::new();
            for note in &rendered.notes {
                text.push_str(&format!("# {note}\n"));
            }
            text.push_str(&output::to_yaml(&rendered.manifest)?);
            documents.push(text);
        }
    }
    if documents.is_empty() {
        eprintln!(
            "No gateway of namespace {} has a policy in force.",
            args.namespace
        );
        return Ok(());
    }
    print(&documents.join("---\n"))
}

/// The namespaces (and their projects) and gateways the caller can see.
fn world(namespaces: &[Manifest], gateways: &[Manifest]) -> World {
    let mut world = World::default();
    for ns in namespaces {
        let project = ns
            .metadata
            .labels
            .get("resourcemanager.miloapis.com/project-name")
            .cloned()
            .unwrap_or_else(|| ns.metadata.name.clone());
        world
            .namespaces
            .insert(ns.metadata.name.clone(), Some(project));
    }
    for gw in gateways {
        if let Some(namespace) = &gw.metadata.namespace {
            world
                .gateways
                .insert((namespace.clone(), gw.metadata.name.clone()));
        }
    }
    world
}
