//! How an event is measured by the meters of its type: one home for the
//! answer of ingest (quarantine notices), of workers (what they publish on
//! `.quarantine.<reason>`) and of reads (which events count, which are
//! listed as quarantined).

use std::sync::Arc;

use jiff::Timestamp;
use tally_meter::{CompiledMeter, Sample, Unmeterable};
use tally_model::{CloudEvent, MeterPhase};

use crate::mirror::CatalogState;

/// Reason of an event no meter reads (as the embedded backend names it).
pub const UNKNOWN_METER: &str = "UNKNOWN_METER";

/// One meter's verdict on one event that it cannot measure.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Verdict {
    /// The meter (`""` when no meter reads the event's type).
    pub meter: String,
    pub reason: String,
    pub message: String,
}

/// Samples `event` with `meter`, as stored at `ingested_at`: a Retired
/// meter measures what was stored before it retired (`retired_at`).
pub fn sample(
    meter: &CompiledMeter,
    event: &CloudEvent,
    ingested_at: Timestamp,
    retired_at: Option<Timestamp>,
) -> Result<Sample, Unmeterable> {
    match (meter.phase(), retired_at) {
        (MeterPhase::Retired, Some(at)) if ingested_at < at => meter.sample_in_any_phase(event),
        _ => meter.sample(event),
    }
}

/// Every meter's reason not to measure `event`, stored at `ingested_at`.
pub fn verdicts(
    catalog: &CatalogState,
    event: &CloudEvent,
    ingested_at: Timestamp,
) -> Vec<Verdict> {
    let Some(meters) = catalog.meters.get(&event.kind) else {
        return vec![Verdict {
            meter: String::new(),
            reason: UNKNOWN_METER.into(),
            message: format!("no meter reads events of type {:?}", event.kind),
        }];
    };
    meters
        .iter()
        .filter_map(|meter: &Arc<CompiledMeter>| {
            let retired_at = catalog.retired_at.get(&meter.key).copied();
            sample(meter, event, ingested_at, retired_at)
                .err()
                .map(|reason| Verdict {
                    meter: meter.key.clone(),
                    reason: reason.code().into(),
                    message: reason.to_string(),
                })
        })
        .collect()
}
