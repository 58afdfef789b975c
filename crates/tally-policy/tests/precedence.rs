//! Conflicts and precedence as a matrix: Gateway over Namespace, then the
//! oldest, then namespace/name; status follows policies and targets as
//! they appear, change or go; a policy never governs another project.

use tally_model::Manifest;
use tally_policy::{Resolution, World};

const T1: &str = "2026-01-01T00:00:00Z";
const T2: &str = "2026-01-02T00:00:00Z";
const T3: &str = "2026-01-03T00:00:00Z";

/// `targets`: `gw:NAME` or `ns:NAME`.
fn policy(namespace: &str, name: &str, created: &str, targets: &[&str]) -> Manifest {
    let refs: Vec<String> = targets
        .iter()
        .map(|t| match t.split_once(':') {
            Some(("gw", n)) => {
                format!("{{group: gateway.networking.k8s.io, kind: Gateway, name: {n}}}")
            }
            Some(("ns", n)) => format!("{{group: '', kind: Namespace, name: {n}}}"),
            _ => panic!("{t}"),
        })
        .collect();
    let text = format!(
        "apiVersion: telemetry.datumapis.com/v1alpha1\nkind: TelemetryPolicy\nmetadata: {{name: {name}, namespace: {namespace}, creationTimestamp: '{created}', generation: 1}}\nspec:\n  targetRefs: [{}]\n  accessLogs: {{}}\n",
        refs.join(", ")
    );
    serde_norway::from_str(&text).unwrap()
}

fn world() -> World {
    let mut w = World::default();
    for (ns, project) in [
        ("shop", "shop"),
        ("shop-b", "shop"),
        ("other", "other"),
        ("loose", ""),
    ] {
        let project = (!project.is_empty()).then(|| project.to_owned());
        w.namespaces.insert(ns.into(), project);
    }
    for (ns, gw) in [("shop", "edge"), ("shop", "edge2"), ("other", "gw")] {
        w.gateways.insert((ns.into(), gw.into()));
    }
    w
}

fn reason(r: &Resolution, ns: &str, name: &str) -> String {
    r.status(ns, name).unwrap().reason().to_owned()
}

fn governs(r: &Resolution, ns: &str, name: &str) -> Vec<String> {
    r.status(ns, name)
        .unwrap()
        .governs
        .iter()
        .map(|t| t.to_string())
        .collect()
}

fn governing(r: &Resolution, project: &str, gw: (&str, &str)) -> Option<String> {
    r.policy_for(project, Some(gw), None)
        .map(|p| p.key.to_string())
}

#[test]
fn the_precedence_matrix() {
    // (policies, expected per policy: (name, reason), who governs edge and edge2)
    type Row<'a> = (
        &'a [(&'a str, &'a str, &'a [&'a str])],
        &'a [(&'a str, &'a str)],
        Option<&'a str>,
        Option<&'a str>,
    );
    let rows: &[Row] = &[
        // One Gateway policy.
        (
            &[("a", T1, &["gw:edge"])],
            &[("a", "Accepted")],
            Some("shop/a"),
            None,
        ),
        // Two on one Gateway: the oldest wins.
        (
            &[("a", T2, &["gw:edge"]), ("b", T1, &["gw:edge"])],
            &[("a", "Conflicted"), ("b", "Accepted")],
            Some("shop/b"),
            None,
        ),
        // Equally old: namespace/name decides.
        (
            &[("b", T1, &["gw:edge"]), ("a", T1, &["gw:edge"])],
            &[("a", "Accepted"), ("b", "Conflicted")],
            Some("shop/a"),
            None,
        ),
        // Gateway over Namespace, even when the Namespace policy is older.
        (
            &[("ns", T1, &["ns:shop"]), ("gw", T3, &["gw:edge"])],
            &[("ns", "Accepted"), ("gw", "Accepted")],
            Some("shop/gw"),
            Some("shop/ns"),
        ),
        // Two Namespace policies: the oldest wins everywhere it applies.
        (
            &[("n1", T2, &["ns:shop"]), ("n2", T1, &["ns:shop"])],
            &[("n1", "Conflicted"), ("n2", "Accepted")],
            Some("shop/n2"),
            Some("shop/n2"),
        ),
        // A policy that wins one target and loses another stays Accepted.
        (
            &[("x", T1, &["gw:edge"]), ("y", T2, &["gw:edge", "gw:edge2"])],
            &[("x", "Accepted"), ("y", "Accepted")],
            Some("shop/x"),
            Some("shop/y"),
        ),
        // A missing Gateway.
        (
            &[("a", T1, &["gw:nope"])],
            &[("a", "TargetNotFound")],
            None,
            None,
        ),
        // Another project's Namespace may not be targeted.
        (
            &[("a", T1, &["ns:other"])],
            &[("a", "TargetNotPermitted")],
            None,
            None,
        ),
        // A namespace of the same project may.
        (
            &[("a", T1, &["ns:shop-b"])],
            &[("a", "Accepted")],
            None,
            None,
        ),
    ];
    for (i, (policies, expected, edge, edge2)) in rows.iter().enumerate() {
        let manifests: Vec<Manifest> = policies
            .iter()
            .map(|(name, created, targets)| policy("shop", name, created, targets))
            .collect();
        let r = Resolution::resolve(&manifests, &world());
        for (name, want) in *expected {
            assert_eq!(reason(&r, "shop", name), *want, "row {i}: {name}");
        }
        assert_eq!(
            governing(&r, "shop", ("shop", "edge")).as_deref(),
            *edge,
            "row {i}: edge"
        );
        assert_eq!(
            governing(&r, "shop", ("shop", "edge2")).as_deref(),
            *edge2,
            "row {i}: edge2"
        );
    }
}

#[test]
fn status_names_the_winner_and_the_governed_targets() {
    let manifests = [
        policy("shop", "ns", T1, &["ns:shop"]),
        policy("shop", "gw", T3, &["gw:edge"]),
        policy("shop", "late", T3, &["gw:edge"]),
    ];
    let r = Resolution::resolve(&manifests, &world());
    assert_eq!(
        governs(&r, "shop", "ns"),
        ["Gateway shop/edge2", "Namespace shop"]
    );
    assert_eq!(governs(&r, "shop", "gw"), ["Gateway shop/edge"]);
    let late = r.status("shop", "late").unwrap();
    assert_eq!(late.reason(), "Conflicted");
    assert!(
        late.conditions[0]
            .message
            .contains("governed by policy shop/gw"),
        "{:?}",
        late
    );
    assert_eq!(late.ancestors[0].ancestor_ref.kind, "Gateway");
    assert_eq!(late.ancestors[0].conditions[0].reason, "Conflicted");
    assert!(late.governs.is_empty());
    let json = serde_json::to_value(r.status("shop", "gw").unwrap()).unwrap();
    assert_eq!(json["conditions"][0]["type"], "Accepted");
    assert_eq!(json["conditions"][0]["status"], "True");
    assert_eq!(json["ancestors"][0]["ancestorRef"]["namespace"], "shop");
    assert_eq!(
        json["ancestors"][0]["controllerName"],
        "telemetry.datumapis.com/tally"
    );
}

#[test]
fn status_follows_policies_and_targets_as_they_appear_change_and_go() {
    let mut w = world();
    w.gateways.remove(&("shop".into(), "edge".into()));
    let young = policy("shop", "young", T2, &["gw:edge"]);
    // The target does not exist yet.
    let r = Resolution::resolve([&young], &w);
    assert_eq!(reason(&r, "shop", "young"), "TargetNotFound");
    // It appears.
    w.gateways.insert(("shop".into(), "edge".into()));
    let r = Resolution::resolve([&young], &w);
    assert_eq!(reason(&r, "shop", "young"), "Accepted");
    // An older policy appears and takes it.
    let old = policy("shop", "old", T1, &["gw:edge"]);
    let r = Resolution::resolve([&young, &old], &w);
    assert_eq!(reason(&r, "shop", "young"), "Conflicted");
    assert_eq!(reason(&r, "shop", "old"), "Accepted");
    // The older one changes target: the younger one is in force again.
    let moved = policy("shop", "old", T1, &["gw:edge2"]);
    let r = Resolution::resolve([&young, &moved], &w);
    assert_eq!(reason(&r, "shop", "young"), "Accepted");
    assert_eq!(governs(&r, "shop", "old"), ["Gateway shop/edge2"]);
    // It becomes invalid: Invalid, and it governs nothing.
    let mut broken = moved.clone();
    broken.spec["accessLogs"] = serde_json::json!({"matches": [{"cel": "response.code == 'x'"}]});
    let r = Resolution::resolve([&young, &broken], &w);
    assert_eq!(reason(&r, "shop", "old"), "Invalid");
    assert!(
        r.status("shop", "old").unwrap().conditions[0]
            .message
            .contains("no overload of '=='")
    );
    assert_eq!(governing(&r, "shop", ("shop", "edge2")), None);
    // The target goes.
    w.gateways.remove(&("shop".into(), "edge".into()));
    let r = Resolution::resolve([&young], &w);
    assert_eq!(reason(&r, "shop", "young"), "TargetNotFound");
}

#[test]
fn a_policy_only_governs_records_of_its_own_project() {
    let manifests = [
        policy("shop", "a", T1, &["ns:shop"]),
        policy("other", "o", T1, &["gw:gw"]),
    ];
    let r = Resolution::resolve(&manifests, &world());
    assert_eq!(
        governing(&r, "shop", ("shop", "edge")).as_deref(),
        Some("shop/a")
    );
    // A record of another project on shop's gateway gets no policy.
    assert_eq!(governing(&r, "other", ("shop", "edge")), None);
    assert_eq!(governing(&r, "shop", ("other", "gw")), None);
    assert_eq!(
        governing(&r, "other", ("other", "gw")).as_deref(),
        Some("other/o")
    );
    // Without a gateway, the route's namespace decides.
    let p = r
        .policy_for("shop", None, Some("shop"))
        .map(|p| p.key.to_string());
    assert_eq!(p.as_deref(), Some("shop/a"));
    // A policy in a namespace of no project governs nothing.
    let loose = [policy("loose", "l", T1, &["ns:loose"])];
    let r = Resolution::resolve(&loose, &world());
    assert_eq!(reason(&r, "loose", "l"), "TargetNotPermitted");
}

#[test]
fn a_policy_is_compiled_once_per_version() {
    let a = policy("shop", "a", T1, &["gw:edge"]);
    let first = Resolution::resolve([&a], &world());
    // The world changes, the policy does not: the same compiled policy.
    let mut w = world();
    w.gateways.insert(("shop".into(), "edge3".into()));
    let second = Resolution::resolve_again([&a], &w, &first);
    let same = std::sync::Arc::ptr_eq(
        first.policy("shop", "a").unwrap(),
        second.policy("shop", "a").unwrap(),
    );
    assert!(same, "recompiled an unchanged policy");
    // A new version is compiled again.
    let mut changed = a.clone();
    changed.metadata.generation = Some(2);
    changed.spec["accessLogs"] = serde_json::json!({"matches": [{"cel": "response.code >= 500"}]});
    let third = Resolution::resolve_again([&changed], &w, &second);
    assert!(!std::sync::Arc::ptr_eq(
        second.policy("shop", "a").unwrap(),
        third.policy("shop", "a").unwrap()
    ));
    assert_eq!(
        third.status("shop", "a").unwrap().observed_generation,
        Some(2)
    );
}
