//! OpenMeter API families Tally does not serve: each answers `501
//! application/problem+json` naming the feature, never a bare 404 or 405,
//! so an OpenMeter client learns at once what it cannot do here.

use axum::extract::OriginalUri;
use axum::http::StatusCode;

use crate::problem::Problem;

/// The route prefixes of OpenMeter's API beyond metering, each with the
/// feature it belongs to. Routes are `PREFIX` and `PREFIX/{*rest}`.
pub const FAMILIES: &[(&str, &str)] = &[
    ("/api/v1/entitlements", "entitlements"),
    ("/api/v2/entitlements", "entitlements"),
    ("/api/v1/grants", "entitlement grants"),
    ("/api/v2/grants", "entitlement grants"),
    ("/api/v1/subjects/{key}/entitlements", "entitlements"),
    ("/api/v1/features", "features"),
    ("/api/v1/plans", "plans and prices"),
    ("/api/v1/addons", "add-ons"),
    ("/api/v1/subscriptions", "subscriptions"),
    ("/api/v1/customers", "customers"),
    ("/api/v2/customers", "customers"),
    ("/api/v1/billing/invoices", "invoices"),
    ("/api/v1/billing/profiles", "billing profiles"),
    ("/api/v1/billing/customers", "customer billing overrides"),
    ("/api/v1/notification", "notifications"),
    ("/api/v1/apps", "apps"),
    ("/api/v1/marketplace", "the app marketplace"),
    ("/api/v1/stripe", "Stripe integration"),
    ("/api/v1/portal", "the customer portal"),
    ("/api/v1/info", "info (currencies, query progress)"),
    ("/api/v1/debug", "debug metrics"),
];

/// Whether `route` (a matched route pattern) is one of [`FAMILIES`],
/// or subject management (`POST /api/v1/subjects`, `DELETE
/// /api/v1/subjects/{key}` are handled here too, by method).
pub fn is_unserved_route(route: &str) -> bool {
    FAMILIES
        .iter()
        .any(|(prefix, _)| route == *prefix || route.strip_prefix(prefix) == Some("/{*rest}"))
}

/// Documents every route of [`FAMILIES`] (and subject management) in
/// `/openapi.json` as answering 501, so clients generated from it know.
pub struct Document;

impl utoipa::Modify for Document {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::path::{HttpMethod, OperationBuilder};
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder, ResponsesBuilder};
        let operation = |feature: &str| {
            let problem = ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("Problem")))
                .build();
            let answer = ResponseBuilder::new()
                .description(format!(
                    "Not served: Tally does not serve OpenMeter's {feature}"
                ))
                .content("application/problem+json", problem)
                .build();
            OperationBuilder::new()
                .tag("not served")
                .summary(Some(format!("OpenMeter's {feature} (not served)")))
                .responses(ResponsesBuilder::new().response("501", answer).build())
                .build()
        };
        let methods = || {
            vec![
                HttpMethod::Get,
                HttpMethod::Post,
                HttpMethod::Put,
                HttpMethod::Patch,
                HttpMethod::Delete,
            ]
        };
        for (prefix, feature) in FAMILIES {
            let op = operation(feature);
            openapi
                .paths
                .add_path_operation(prefix, methods(), op.clone());
            openapi
                .paths
                .add_path_operation(format!("{prefix}/{{rest}}"), methods(), op);
        }
        let management = operation("subject management");
        openapi.paths.add_path_operation(
            "/api/v1/subjects",
            vec![HttpMethod::Post],
            management.clone(),
        );
        openapi.paths.add_path_operation(
            "/api/v1/subjects/{key}",
            vec![HttpMethod::Delete],
            management,
        );
    }
}

/// The answer to any request under a family of [`FAMILIES`].
pub async fn not_served(OriginalUri(uri): OriginalUri) -> Problem {
    let path = uri.path();
    if path.starts_with("/api/v1/subjects") && !path.contains("/entitlements") {
        return Problem::new(
            StatusCode::NOT_IMPLEMENTED,
            "Tally does not serve OpenMeter's subject management: subjects are the keys usage events name, listed from stored usage",
        );
    }
    let feature = FAMILIES
        .iter()
        .filter(|(prefix, _)| matches(prefix, path))
        .max_by_key(|(prefix, _)| prefix.len())
        .map_or("this OpenMeter feature", |(_, feature)| feature);
    Problem::new(
        StatusCode::NOT_IMPLEMENTED,
        format!(
            "Tally does not serve OpenMeter's {feature} API ({path}); it serves events, meters, meter queries and subjects"
        ),
    )
}

/// Whether `path` is under `prefix`, whose `{…}` segments match any one segment.
fn matches(prefix: &str, path: &str) -> bool {
    let mut path = path.split('/');
    prefix
        .split('/')
        .all(|p| path.next().is_some_and(|s| p.starts_with('{') || p == s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_longest_family() {
        assert!(matches(
            "/api/v1/subjects/{key}/entitlements",
            "/api/v1/subjects/acme/entitlements/x"
        ));
        assert!(!matches("/api/v1/plans", "/api/v1/meters"));
        assert!(matches("/api/v1/plans", "/api/v1/plans/p1/publish"));
    }
}
