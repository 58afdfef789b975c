//! `tally meters validate METER`, and the verdict `tally apply` prints when
//! a manifest publishes a Draft meter.
//!
//! The figures are the server's (`GET /api/v1/meters/{slug}/validate`);
//! this module only lays them out: `-o table` one row per figure, `json`
//! and `yaml` the answer unchanged, then the verdict on standard output
//! (table) or standard error (other formats, so the data stays parseable).

use anyhow::Context;
use clap::Args;
use tally_client::TallyClient;
use tally_meter::validate::{Count, ReasonCount, ValidationAnswer, Verdict};
use tally_model::{Kind, Manifest, MeterPhase};

use crate::output::{self, Format, Table};
use crate::when;

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// The meter's slug (its MeterDefinition name).
    #[arg(value_name = "METER")]
    meter: String,

    /// Start of the range, inclusive: RFC 3339 or a date (midnight UTC).
    /// Default: 7 days before --to.
    #[arg(long, value_name = "TIME")]
    from: Option<String>,

    /// End of the range, exclusive: RFC 3339 or a date. Default: now.
    #[arg(long, value_name = "TIME")]
    to: Option<String>,

    /// Output format (`table`, `json`, `yaml`, `csv`).
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table, value_name = "FORMAT")]
    output: Format,
}

pub async fn run(client: &TallyClient, args: ValidateArgs) -> anyhow::Result<()> {
    let utc = jiff::tz::TimeZone::UTC;
    let parse = |t: &Option<String>, flag: &str| {
        t.as_deref()
            .map(|t| when::parse_instant(t, &utc).with_context(|| flag.to_owned()))
            .transpose()
    };
    let (from, to) = (parse(&args.from, "--from")?, parse(&args.to, "--to")?);
    let answer = client
        .validate_meter(&args.meter, from, to)
        .await
        .with_context(|| format!("validating meter {:?}", args.meter))?;
    if let Some(text) = output::render(args.output, &answer, || report_table(&answer))? {
        crate::print(&text)?;
    }
    let verdict = verdict_text(&args.meter, &answer.report.verdict);
    if matches!(args.output, Format::Table | Format::Wide) {
        crate::print(&verdict)
    } else {
        eprint!("{verdict}");
        Ok(())
    }
}

/// One row per figure: `CHECK`, `RESULT`.
fn report_table(a: &ValidationAnswer) -> Table {
    let r = &a.report;
    let mut t = Table::new(["CHECK", "RESULT"]);
    t.row(["range".to_owned(), format!("{} – {}", a.from, a.to)]);
    let cap = if r.cap_reached { " (cap reached)" } else { "" };
    t.row([
        "events seen".to_owned(),
        format!(
            "{} of type {}{cap}; {} voided skipped",
            r.events_seen, r.event_type, r.events_voided
        ),
    ]);
    if let Some(v) = &r.values {
        let or = |x: &Option<String>| x.clone().unwrap_or_else(|| "-".into());
        t.row([
            "values".to_owned(),
            format!(
                "count {} min {} p50 {} p99 {} max {} (unit {})",
                v.count,
                or(&v.min),
                or(&v.p50),
                or(&v.p99),
                or(&v.max),
                r.unit.as_deref().unwrap_or("none"),
            ),
        ]);
        t.row([
            "odd values".to_owned(),
            format!(
                "{} zeros, {} non-numeric, {} missing",
                v.zeros, v.non_numeric, v.missing
            ),
        ]);
    }
    for d in &r.dimensions {
        t.row([
            format!("dimension {}", d.name),
            format!(
                "{} distinct, {} without; top {}",
                d.cardinality,
                d.absent,
                counts(&d.top)
            ),
        ]);
    }
    let lists = [
        ("undeclared dimensions", counts(&r.undeclared_dimensions)),
        (
            "declared, never present",
            r.declared_never_present.join(", "),
        ),
        ("required labels missing", counts(&r.missing_labels)),
    ];
    for (check, result) in lists.into_iter().filter(|(_, v)| !v.is_empty()) {
        t.row([check.to_owned(), result]);
    }
    for (what, reasons) in [
        ("would quarantine", &r.would_quarantine),
        ("quarantined now", &a.stored_quarantine),
    ] {
        for q in reasons {
            t.row([format!("{what} {}", q.reason), reason_text(q)]);
        }
    }
    for w in &r.unit_warnings {
        t.row(["unit".to_owned(), w.clone()]);
    }
    t
}

fn counts(counts: &[Count]) -> String {
    let parts: Vec<String> = counts
        .iter()
        .map(|c| format!("{} ×{}", c.name, c.events))
        .collect();
    parts.join(", ")
}

fn reason_text(q: &ReasonCount) -> String {
    let example = q
        .examples
        .first()
        .map(|e| format!(" (e.g. {}: {})", e.id, e.message))
        .unwrap_or_default();
    format!("{} events{example}", q.events)
}

/// The verdict as lines of text.
pub fn verdict_text(meter: &str, v: &Verdict) -> String {
    let mut out = if v.safe_to_publish {
        format!("meter {meter}: safe to publish\n")
    } else {
        format!("meter {meter}: NOT safe to publish\n")
    };
    for reason in &v.reasons {
        out.push_str(&format!("  - {reason}\n"));
    }
    for warning in &v.warnings {
        out.push_str(&format!("  ! {warning}\n"));
    }
    out
}

/// The meters `text` moves from Draft (as the server has them) to Published.
pub async fn publishing(client: &TallyClient, text: &str) -> Vec<String> {
    let Ok(manifests) = Manifest::parse_documents(text) else {
        return Vec::new(); // the server will say what is wrong
    };
    let mut names = Vec::new();
    for m in manifests {
        let wants_published = m.typed_kind().ok() == Some(Kind::MeterDefinition)
            && m.spec.get("phase").and_then(|p| p.as_str()) == Some("Published");
        if !wants_published {
            continue;
        }
        let current = client
            .get_resource(Kind::MeterDefinition, None, &m.metadata.name)
            .await;
        let was_draft = current.is_ok_and(|c| {
            tally_model::MeterDefinition::from_manifest(&c)
                .is_ok_and(|d| d.phase == MeterPhase::Draft)
        });
        if was_draft {
            names.push(m.metadata.name);
        }
    }
    names
}

/// The verdict on each meter `tally apply` publishes, fetched before the
/// apply. A validation the server refuses is said, and does not stop the
/// apply.
pub async fn verdicts(client: &TallyClient, meters: &[String]) -> String {
    let mut out = String::new();
    for meter in meters {
        match client.validate_meter(meter, None, None).await {
            Ok(answer) => out.push_str(&verdict_text(meter, &answer.report.verdict)),
            Err(e) => out.push_str(&format!(
                "meter {meter}: could not validate it before publishing: {e}\n"
            )),
        }
    }
    out
}
