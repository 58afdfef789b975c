//! `tally forward`: the billing forwarder on its own, against a running
//! server over HTTP. It reads the BillingSink, accounts, bindings and
//! meters through the API, usage through the query API and the meters'
//! change feeds, and keeps its progress in its own data directory. Secrets
//! are write-only through the API, so the provider's API key comes from a
//! file or the environment. Run it with `billing.enabled: false` in the
//! server's config: one sink must have one forwarder.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use futures::future::BoxFuture;
use tally_billing::runtime::{
    BillingHandle, BillingInputs, BillingRuntime, LoadInputs, RuntimeConfig,
};
use tally_billing::{
    BillingSink, ChangeCursor, Changes, SourceError, UsageQuery, UsageSource, UsageTotal,
    follow_changes,
};
use tally_client::{MeterQueryParams, TallyClient};
use tally_delivery::Registry;
use tally_model::Kind;

use crate::serve::{EgressArgs, LogFormat};

#[derive(Debug, Args)]
pub struct ForwardArgs {
    /// The BillingSink to forward.
    #[arg(long, value_name = "NAME")]
    sink: String,

    /// Where progress is kept (`<DIR>/<sink>`); keep it across runs.
    #[arg(long, value_name = "DIR", default_value = "./tally-forward")]
    data_dir: PathBuf,

    /// A file holding the provider's API key (else TALLY_BILLING_API_KEY).
    #[arg(long, value_name = "FILE")]
    api_key_file: Option<PathBuf>,

    /// The provider's API key (prefer --api-key-file; never printed).
    #[arg(
        long,
        env = "TALLY_BILLING_API_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    api_key: Option<String>,

    /// Seconds between passes.
    #[arg(long, default_value_t = 5.0, value_name = "SECONDS")]
    pass_interval: f64,

    /// Run one pass, wait until the provider answered everything, and exit.
    #[arg(long)]
    once: bool,

    /// Log format (levels from RUST_LOG).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, value_name = "FORMAT")]
    log_format: LogFormat,

    #[command(flatten)]
    egress: EgressArgs,
}

/// Usage over the HTTP API.
struct HttpUsageSource {
    client: TallyClient,
}

impl UsageSource for HttpUsageSource {
    fn totals(&self, query: UsageQuery) -> BoxFuture<'_, Result<Vec<UsageTotal>, SourceError>> {
        Box::pin(async move {
            let mut out = Vec::new();
            let mut group_by = vec!["subject".to_owned()];
            group_by.extend(query.dimensions.iter().cloned());
            let mut cursor = None;
            loop {
                let params = MeterQueryParams {
                    from: Some(query.from),
                    to: Some(query.to),
                    group_by: group_by.clone(),
                    limit: Some(10_000),
                    cursor: cursor.take(),
                    ..MeterQueryParams::default()
                };
                let page = self
                    .client
                    .query_meter(&query.meter, &params)
                    .await
                    .map_err(|e| SourceError(format!("meter {:?}: {e}", query.meter)))?;
                out.extend(page.data.into_iter().filter_map(|row| {
                    UsageTotal::from_query_row(row.subject.as_deref(), row.group_by, row.value)
                }));
                match page.next_cursor {
                    Some(next) => cursor = Some(next),
                    None => break,
                }
            }
            Ok(out)
        })
    }

    fn changes_since(
        &self,
        meter: &str,
        cursor: ChangeCursor,
    ) -> BoxFuture<'_, Result<Changes, SourceError>> {
        let meter = meter.to_owned();
        Box::pin(async move {
            follow_changes(cursor, 20, |at| {
                let meter = meter.clone();
                async move {
                    self.client
                        .meter_changes(&meter, at, 50_000)
                        .await
                        .map_err(|e| SourceError(format!("meter {meter:?}: {e}")))
                }
            })
            .await
        })
    }
}

/// The sink, accounts, bindings and catalog, read over HTTP.
async fn load(client: &TallyClient, sink: &str, key: &str) -> Result<BillingInputs, String> {
    let get = |kind: Kind| async move {
        client
            .list_resources(kind, None)
            .await
            .map_err(|e| format!("listing {}: {e}", kind.plural()))
    };
    let manifest = client
        .get_resource(Kind::BillingSink, None, sink)
        .await
        .map_err(|e| format!("reading billing sink {sink:?}: {e}"))?;
    let accounts = get(Kind::BillingAccount).await?;
    let bindings = get(Kind::BillingAccountBinding).await?;
    let definitions = get(Kind::MeterDefinition).await?;
    let resource_types = get(Kind::MonitoredResourceType).await?;
    let attribution = tally_billing::Attribution::new(
        &accounts
            .iter()
            .filter_map(|m| tally_billing::BillingAccount::from_manifest(m).ok())
            .collect::<Vec<_>>(),
        &bindings
            .iter()
            .filter_map(|m| tally_billing::BillingAccountBinding::from_manifest(m).ok())
            .collect::<Vec<_>>(),
    );
    // The key named by the sink's secret ref is the one given to us.
    let key_name = BillingSink::from_manifest(&manifest)
        .map(|s| s.api_key_secret_ref.key)
        .unwrap_or_default();
    let (inputs, _) = BillingInputs::from_manifests(
        [&manifest],
        |_, _| Some(BTreeMap::from([(key_name.clone(), key.to_owned())])),
        &definitions,
        &resource_types,
        attribution,
    );
    Ok(inputs)
}

pub fn run(args: ForwardArgs, server: String, token: Option<String>) -> anyhow::Result<()> {
    crate::serve::init_tracing(args.log_format)?;
    let key = match (&args.api_key_file, &args.api_key) {
        (Some(path), _) => std::fs::read_to_string(path)
            .with_context(|| format!("reading the API key file {}", path.display()))?,
        (None, Some(key)) => key.clone(),
        (None, None) => anyhow::bail!(
            "give the provider's API key with --api-key-file or TALLY_BILLING_API_KEY"
        ),
    };
    let key = key.trim().to_owned();
    anyhow::ensure!(!key.is_empty(), "the provider's API key is empty");
    let egress =
        tally_delivery::EgressPolicy::parse(&args.egress.allow).context("--egress-allow")?;
    let client = TallyClient::new(&server, token).context("setting up the client")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let source: Arc<dyn UsageSource> = Arc::new(HttpUsageSource {
            client: client.clone(),
        });
        let billing = BillingRuntime::new(
            RuntimeConfig {
                dir: args.data_dir.clone(),
                shutdown_grace: Duration::from_secs(5),
                tune: None,
                egress,
            },
            Registry::new(),
            source,
        );
        let handle = BillingHandle::new(billing);
        let sink = args.sink.clone();
        if args.once {
            let inputs = load(&client, &sink, &key)
                .await
                .map_err(|e| anyhow::anyhow!(e))?;
            handle.step(Some(inputs)).await;
            let idle = handle.wait_idle(Duration::from_secs(600)).await;
            let report = handle.status();
            crate::print(&crate::output::to_json(&report)?)?;
            // Backlogged after one pass is expected when catching up a long
            // history; anything else means the sink did not forward.
            if let Some(r) = report.iter().find(|r| !r.ready && r.reason != "Backlogged") {
                anyhow::bail!(
                    "billing sink {sink:?} is not ready: {}: {}",
                    r.reason,
                    r.message
                );
            }
            anyhow::ensure!(idle, "the provider did not answer every record in time");
            return Ok(());
        }
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let load: LoadInputs = Box::new(move || {
            let (client, sink, key) = (client.clone(), sink.clone(), key.clone());
            Box::pin(async move { load(&client, &sink, &key).await })
        });
        let interval = Duration::try_from_secs_f64(args.pass_interval)
            .unwrap_or(Duration::from_secs(5))
            .max(Duration::from_millis(10));
        let task = tokio::spawn(handle.run(load, None, interval, stopped));
        tally_server::shutdown_signal().await;
        let _ = stop.send(true);
        task.await.context("the forwarder task failed")
    })
}
