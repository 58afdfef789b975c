//! A meter query's plan: its windows, groups, filters and billing-account
//! attribution, and the row key each measured event (or rolled-up bucket)
//! belongs to. Shared by the raw read ([`crate::read`]) and the rollup read
//! ([`crate::rollup`]).

use std::collections::BTreeMap;

use jiff::Timestamp;
use tally_ledger::{LedgerError, MeterQuery, QueryRow};
use tally_meter::{AggState, CompiledMeter, window};
use tally_model::CloudEvent;
use tally_model::billing::{Attribution, Owner};

use crate::ledger::Inner;

/// The group key that attributes usage to billing accounts.
pub(crate) const BILLING_ACCOUNT: &str = "billing_account";

/// Where a query's rows go and what they are keyed by.
pub(crate) struct Plan {
    pub windows: Vec<window::Window>,
    /// (name, position in the meter's dimensions) of each group, in the
    /// query's order, `billing_account` excluded.
    pub groups: Vec<(String, usize)>,
    pub filters: Vec<(usize, String)>,
    pub by_subject: bool,
    pub by_account: bool,
    pub account_filter: Option<String>,
    pub attribution: Option<Attribution>,
}

/// (window index, subject, group values, billing account).
pub(crate) type RowKey = (usize, Option<String>, Vec<Option<String>>, Option<String>);

pub(crate) fn plan(
    inner: &Inner,
    meter: &CompiledMeter,
    q: &MeterQuery,
) -> Result<Plan, LedgerError> {
    let position = |name: &str| meter.dimension_position(name).map_err(LedgerError::Invalid);
    let mut groups: Vec<(String, usize)> = Vec::new();
    for g in &q.group_by {
        if g != "subject" && g != BILLING_ACCOUNT && !groups.iter().any(|(n, _)| n == g) {
            groups.push((g.clone(), position(g)?));
        }
    }
    let filters = q
        .filter_group_by
        .iter()
        .filter(|(k, _)| *k != BILLING_ACCOUNT)
        .map(|(k, v)| position(k).map(|p| (p, v.clone())))
        .collect::<Result<_, _>>()?;
    let by_account = q.group_by.iter().any(|g| g == BILLING_ACCOUNT);
    let account_filter = q.filter_group_by.get(BILLING_ACCOUNT).cloned();
    let attribution = if by_account || account_filter.is_some() {
        let resources = inner
            .resources
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| {
                LedgerError::Invalid(
                    "this ledger cannot attribute usage to billing accounts".into(),
                )
            })?;
        Some(resources.snapshot().attribution())
    } else {
        None
    };
    let windows = window::windows(q.from, q.to, q.window_size, &q.time_zone)
        .map_err(|e| LedgerError::Invalid(e.to_string()))?;
    Ok(Plan {
        windows,
        groups,
        filters,
        by_subject: !q.subjects.is_empty() || q.group_by.iter().any(|g| g == "subject"),
        by_account,
        account_filter,
        attribution,
    })
}

/// The account owning a subject's usage at `t`.
fn account_at(attribution: &Attribution, subject: &str, t: Timestamp) -> Option<String> {
    let project = subject.strip_prefix("projects/")?;
    match attribution.owner_at(project, t) {
        Owner::Account { name, .. } | Owner::UnknownAccount(name) => Some(name.to_owned()),
        Owner::Unattributed => None,
    }
}

impl Plan {
    /// The row one measured event belongs to, or `None` when the query
    /// leaves it out.
    pub fn key(&self, event: &CloudEvent, groups: &[Option<String>]) -> Option<RowKey> {
        self.key_at(event.time, &event.subject, groups)
    }

    /// The row of usage of `subject` at `time` with the meter's `groups`.
    pub fn key_at(
        &self,
        time: Timestamp,
        subject: &str,
        groups: &[Option<String>],
    ) -> Option<RowKey> {
        if self
            .filters
            .iter()
            .any(|(p, v)| groups.get(*p).cloned().flatten().as_ref() != Some(v))
        {
            return None;
        }
        let window = self.windows.partition_point(|w| w.end <= time);
        let w = self.windows.get(window)?;
        if time < w.start {
            return None;
        }
        let account = match &self.attribution {
            Some(a) => account_at(a, subject, time),
            None => None,
        };
        if let Some(wanted) = &self.account_filter
            && account.as_ref() != Some(wanted)
        {
            return None;
        }
        Some((
            window,
            self.by_subject.then(|| subject.to_owned()),
            self.groups
                .iter()
                .map(|(_, p)| groups.get(*p).cloned().flatten())
                .collect(),
            if self.by_account { account } else { None },
        ))
    }

    pub fn row(&self, key: &RowKey, state: &AggState) -> QueryRow {
        let (window, subject, groups, account) = key;
        let w = self.windows[*window];
        let mut group_by: BTreeMap<String, Option<String>> = self
            .groups
            .iter()
            .zip(groups)
            .map(|((name, _), v)| (name.clone(), v.clone()))
            .collect();
        if self.by_account {
            group_by.insert(BILLING_ACCOUNT.into(), account.clone());
        }
        QueryRow {
            window_start: w.start,
            window_end: w.end,
            subject: subject.clone(),
            group_by,
            value: state.result(),
        }
    }
}
