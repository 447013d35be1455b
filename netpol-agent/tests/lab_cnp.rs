//! ClusterNetworkPolicy in the control-plane lab: the agents (`--source kube`, the
//! ServiceAccount of `deploy/`) start on a cluster without the CRD and become ready; then the
//! CRD is installed from the network-policy-api module's manifests (`cargo xtask setup`) and
//! ClusterNetworkPolicies are applied with kubectl. The agents read them, and since the
//! datapath does not program the tiers yet, each one is reported (status errors, one log line)
//! as not enforced, with the invalid fields named.
//!
//! Needs root, the control-plane tools and the CRD manifest (`cargo xtask setup`); skips
//! loudly without them, fails under CI.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use netpol_lab::{
    AgentSource, Agents, Family, Lab, LabState, ProbeSpec, Protocol, TableKey, TruthTable,
    UpOptions,
    controlplane::{ControlPlaneSpec, ControlPlaneState, ProxyMode},
    cp_ops, require_privileges, start_agents_with,
    tools::{CNP_CRD, CONTROL_PLANE_TOOLS, require_manifests, require_tools},
};

mod common {
    pub mod lab;
}

use common::lab::AGENT;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
const PORTS: &str = "[{name: http, port: 80, protocol: TCP}]";
/// The kube source lists an absent CRD again every minute, after its retry backoff (up to 30 s).
const CRD_TIMEOUT: Duration = Duration::from_secs(150);

/// An Admin policy that would cut x off from y, and one whose Accept rule names a domain
/// (not implemented: reported, and the rule fails closed).
const CNPS: &str = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata:
  name: deny-x-to-y
spec:
  tier: Admin
  priority: 10
  subject:
    namespaces:
      matchLabels: {ns: x}
  egress:
  - name: no-y
    action: Deny
    to:
    - namespaces:
        matchLabels: {ns: "y"}
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata:
  name: allow-example
spec:
  tier: Baseline
  priority: 5
  subject:
    namespaces: {}
  egress:
  - name: example
    action: Accept
    to:
    - domainNames: ["example.com"]
"#;

const ALL_CONNECTED: &str = "
-   x/a x/b y/a y/b
x/a .   .   .   .
x/b .   .   .   .
y/a .   .   .   .
y/b .   .   .   .
";

fn lab_up(test: &str) -> Option<Lab> {
    if !require_privileges(test)
        || !require_tools(test, CONTROL_PLANE_TOOLS)
        || !require_manifests(test, &[CNP_CRD])
    {
        return None;
    }
    // "cn": this file's labs.
    let name = format!("cn{}", std::process::id() % 100_000);
    let started = Instant::now();
    let lab = Lab::up(
        &common::lab::cluster(&name, PORTS),
        &UpOptions {
            control_plane: Some(ControlPlaneSpec {
                proxy_mode: ProxyMode::None,
                dns: false,
                ..ControlPlaneSpec::default()
            }),
            ..UpOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{test}: lab up {name}: {e}"));
    eprintln!(
        "[measure] {test}: control-plane lab {name} up in {:.1?}",
        started.elapsed()
    );
    Some(lab)
}

fn cp(lab: &LabState) -> ControlPlaneState {
    cp_ops::control_plane(&lab.name).unwrap_or_else(|e| panic!("{e}"))
}

fn errors(status: &serde_json::Value) -> Vec<String> {
    status["errors"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn tcp80(lab: &LabState) -> TruthTable {
    let spec = ProbeSpec {
        ports: vec![80],
        protocols: vec![Protocol::Tcp],
        families: vec![Family::V4],
        timeout: Duration::from_secs(1),
        attempts: 2,
        ..ProbeSpec::default()
    };
    netpol_lab::probe(lab, &spec)
        .expect("probe")
        .table(&TableKey {
            port: 80,
            protocol: Protocol::Tcp,
            family: Family::V4,
        })
}

#[test]
fn cnps_applied_with_kubectl_are_read_and_reported_as_not_enforced() {
    const TEST: &str = "cnps_applied_with_kubectl_are_read_and_reported_as_not_enforced";
    let Some(lab) = lab_up(TEST) else {
        return;
    };

    // No CRD yet: the agents still list everything else and become ready.
    let source = AgentSource::kube(&lab, Path::new(DEPLOY))
        .unwrap_or_else(|e| panic!("install deploy/: {e}"));
    let mut agents: Agents =
        start_agents_with(&lab, Path::new(AGENT), &source, &[]).expect("start agents");
    agents
        .wait_synced(&[], Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{TEST}: not ready without the CRD: {e}"));
    for a in &agents.agents {
        let st = a.status().expect("status");
        assert!(errors(&st).is_empty(), "{}: {st}", a.node);
        let log = log_of(&a.log);
        assert!(
            log.contains("does not serve ClusterNetworkPolicy"),
            "{}: the missing CRD is not logged:\n{}",
            a.node,
            a.log_tail(20)
        );
    }

    let started = Instant::now();
    cp_ops::install_cnp_crd(&cp(&lab)).unwrap_or_else(|e| panic!("{TEST}: install CRD: {e}"));
    cp_ops::apply(&cp(&lab), CNPS).unwrap_or_else(|e| panic!("{TEST}: kubectl apply: {e}"));

    // Every agent reads both, says they are not enforced, and names the invalid field.
    let wanted = |errs: &[String]| {
        ["deny-x-to-y", "allow-example"].iter().all(|name| {
            errs.iter()
                .any(|e| e.contains("NOT ENFORCED") && e.contains(&format!(" {name} ")))
        }) && errs
            .iter()
            .any(|e| e.contains("allow-example") && e.contains("spec.egress[0].to[0].domainNames"))
    };
    loop {
        let done = agents
            .agents
            .iter()
            .all(|a| a.status().is_some_and(|st| wanted(&errors(&st))));
        if done {
            break;
        }
        if started.elapsed() > CRD_TIMEOUT {
            let states: Vec<String> = agents
                .agents
                .iter()
                .map(|a| format!("--- {}: {:?}\n{}", a.node, a.status(), a.log_tail(20)))
                .collect();
            panic!(
                "{TEST}: the CNPs are not reported after {CRD_TIMEOUT:?}:\n{}",
                states.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!(
        "[measure] {TEST}: CRD installed, CNPs applied and reported in {:.1?}",
        started.elapsed()
    );

    // Nothing claims enforcement: x still reaches y (the Deny is read, not programmed).
    let table = tcp80(&lab);
    let cmp = ALL_CONNECTED
        .parse::<TruthTable>()
        .expect("table")
        .compare(&table);
    assert!(
        cmp.is_match(),
        "{TEST}: reachability changed although CNPs are not enforced yet:\n{}",
        cmp.render()
    );

    // One log line per policy, not one per sync: another sync does not repeat it.
    let before = agents.revisions();
    cp_ops::apply(
        &cp(&lab),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: noop, namespace: x}\n\
         spec: {podSelector: {matchLabels: {pod: none}}}\n",
    )
    .expect("kubectl apply");
    agents
        .wait_synced(&before, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{TEST}: {e}"));
    for a in &agents.agents {
        let log = log_of(&a.log);
        let lines = log
            .lines()
            .filter(|l| l.contains("NOT ENFORCED") && l.contains(" deny-x-to-y "))
            .count();
        assert_eq!(
            lines,
            1,
            "{}: logged {lines} times:\n{}",
            a.node,
            a.log_tail(30)
        );
    }
    agents.stop();
}
