//! Billing forwarding fixtures shared by the tests that forward to the
//! Amberflo test server (`billing.rs` on one node, `cluster_commands.rs`
//! on a cluster): the resources, events and the ledger's totals.

use std::collections::BTreeMap;

use jiff::{Timestamp, ToSpan};
use rust_decimal::Decimal;
use serde_json::{Value, json};

pub const API_KEY: &str = "af-e2e-key-3c9d7f1b";
pub const TOKEN: &str = "e2e-admin-token";
pub const PROJECTS: [(&str, &str); 4] = [
    ("p1", "acct-a"),
    ("p2", "acct-b"),
    ("p3", "acct-a"),
    ("p4", "acct-c"),
];
pub const METERS: [(&str, &str); 2] = [("requests", "gw-requests"), ("bytes", "gw-bytes")];

pub fn manifests(provider_url: &str, t0: Timestamp) -> String {
    let bound = t0 - 1.hour();
    let mut text = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: amberflo-api, namespace: tally-system}}\n\
         stringData: {{apiKey: {API_KEY}}}\n---\n\
         apiVersion: billing.miloapis.com/v1alpha1\nkind: BillingSink\nmetadata: {{name: amberflo}}\n\
         spec: {{provider: amberflo, endpoint: '{provider_url}', apiKeySecretRef: {{name: amberflo-api}},\n\
         \x20 windowSize: 1m, allowedLateness: 2s, batchSize: 4, requestTimeout: 1s, startAt: '{t0}'}}\n---\n\
         apiVersion: billing.miloapis.com/v1alpha1\nkind: BillingSink\nmetadata: {{name: odd-window}}\n\
         spec: {{provider: openmeter, endpoint: '{provider_url}', apiKeySecretRef: {{name: amberflo-api}},\n\
         \x20 windowSize: 30s, startAt: '{t0}'}}\n"
    );
    for account in ["acct-a", "acct-b", "acct-c"] {
        text.push_str(&format!(
            "---\napiVersion: billing.miloapis.com/v1alpha1\nkind: BillingAccount\n\
             metadata: {{name: {account}, uid: uid-{account}}}\nspec: {{currencyCode: USD}}\n"
        ));
    }
    // p4 has no binding: its usage belongs to no account and is not forwarded.
    for (project, account) in &PROJECTS[..3] {
        text.push_str(&format!(
            "---\napiVersion: billing.miloapis.com/v1alpha1\nkind: BillingAccountBinding\n\
             metadata: {{name: {project}-{account}}}\n\
             spec: {{billingAccountRef: {{name: {account}}}, projectRef: {{name: {project}}}}}\n\
             status: {{billingResponsibility: {{establishedAt: '{bound}'}}}}\n"
        ));
    }
    for (meter, api_name) in METERS {
        text.push_str(&format!(
            "---\napiVersion: billing.miloapis.com/v1alpha1\nkind: MeterDefinition\n\
             metadata: {{name: {meter}}}\n\
             spec: {{meterName: gw/{meter}, phase: Published,\n\
             \x20 measurement: {{aggregation: Sum, unit: '1', dimensions: [region]}},\n\
             \x20 billing: {{meterApiName: {api_name}}}}}\n"
        ));
    }
    text
}

pub fn event(id: &str, meter: &str, project: &str, time: Timestamp, value: u64) -> Value {
    let region = if value.is_multiple_of(2) { "eu" } else { "us" };
    json!({"specversion": "1.0", "id": id, "source": "e2e", "type": format!("gw/{meter}"),
           "subject": format!("projects/{project}"), "time": time.to_string(),
           "data": {"value": value.to_string(), "dimensions": {"region": region}}})
}

pub struct Api {
    pub http: reqwest::Client,
}

impl Api {
    pub async fn get(&self, base: &str, path: &str) -> (u16, String) {
        let response = self
            .http
            .get(format!("{base}{path}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    pub async fn post(&self, base: &str, path: &str, body: &Value) -> (u16, String) {
        let response = self
            .http
            .post(format!("{base}{path}"))
            .bearer_auth(TOKEN)
            // Ingest answers what it stored (200) only when asked; else 204.
            .header("prefer", "return=representation")
            .json(body)
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    /// The ledger's totals per (account uid, meter api name) over [from, to).
    pub async fn ledger_totals(
        &self,
        base: &str,
        from: Timestamp,
        to: Timestamp,
    ) -> BTreeMap<(String, String), Decimal> {
        let mut totals = BTreeMap::new();
        for (meter, api_name) in METERS {
            let (status, body) = self
                .get(
                    base,
                    &format!(
                        "/api/v1/meters/{meter}/query?from={from}&to={to}&groupBy=billing_account"
                    ),
                )
                .await;
            assert_eq!(status, 200, "{body}");
            let answer: Value = serde_json::from_str(&body).unwrap();
            for row in answer["data"].as_array().unwrap() {
                let Some(account) = row["groupBy"]["billing_account"].as_str() else {
                    continue;
                };
                let value: Decimal = row["value"].to_string().parse().unwrap();
                *totals
                    .entry((format!("uid-{account}"), api_name.to_owned()))
                    .or_insert(Decimal::ZERO) += value;
            }
        }
        totals
    }
}

pub fn nonzero(map: BTreeMap<(String, String), Decimal>) -> BTreeMap<(String, String), Decimal> {
    map.into_iter().filter(|(_, v)| !v.is_zero()).collect()
}
