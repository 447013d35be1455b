//! ClusterNetworkPolicy in the control-plane lab: the agents (`--source kube`, the
//! ServiceAccount of `deploy/`) start on a cluster without the CRD and become ready; then the
//! CRD is installed from the network-policy-api module's manifests (`cargo xtask setup`) and
//! ClusterNetworkPolicies are applied with kubectl. The agents read them (naming the invalid
//! fields) and enforce them: an Admin Deny cuts x off from y until it is deleted.
//!
//! Needs root, the control-plane tools and the CRD manifest (`cargo xtask setup`); skips
//! loudly without them, fails under CI.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use netpol_lab::{
    AgentSource, Agents, Family, Lab, LabState, ProbeSpec, Protocol, TableKey, TruthTable,
    controlplane::ControlPlaneState,
    cp_ops, start_agents_with,
    tools::{CNP_CRD, require_manifests},
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

/// The shared control-plane lab ("cn": this file's labs), once the CRD manifest is there.
fn lab_up(test: &str) -> Option<Lab> {
    if !require_manifests(test, &[CNP_CRD]) {
        return None;
    }
    common::lab::control_plane_up(test, "cn", PORTS)
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
fn cnps_applied_with_kubectl_are_enforced() {
    const TEST: &str = "cnps_applied_with_kubectl_are_enforced";
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

    // Every agent reads both and names the invalid field; nothing is reported as not enforced.
    let wanted = |errs: &[String]| {
        errs.iter()
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
                "{TEST}: the CNPs are not read after {CRD_TIMEOUT:?}:\n{}",
                states.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    for a in &agents.agents {
        let st = a.status().expect("status");
        assert!(
            !errors(&st).iter().any(|e| e.contains("NOT ENFORCED")),
            "{}: {st}",
            a.node
        );
    }
    eprintln!(
        "[measure] {TEST}: CRD installed, CNPs applied and read in {:.1?}",
        started.elapsed()
    );

    // Enforced: the Admin Deny cuts x off from y (egress of x); the Baseline Accept whose
    // only peer is invalid matches nothing and changes nothing.
    wait_for_table(&lab, TEST, X_CUT_FROM_Y, "the Admin Deny");

    // Deleting the policy gives the connections back.
    cp_ops::delete(&cp(&lab), "clusternetworkpolicy", "default", "deny-x-to-y")
        .unwrap_or_else(|e| panic!("{TEST}: kubectl delete: {e}"));
    wait_for_table(&lab, TEST, ALL_CONNECTED, "the deletion");
    agents.stop();
}

/// x may not open connections to y (TCP 80, IPv4).
const X_CUT_FROM_Y: &str = "
-   x/a x/b y/a y/b
x/a .   .   X   X
x/b .   .   X   X
y/a .   .   .   .
y/b .   .   .   .
";

/// Probes until the table is `want` (the agents apply a change within seconds); panics with
/// the last difference after a minute.
fn wait_for_table(lab: &LabState, test: &str, want: &str, what: &str) {
    let want = want.parse::<TruthTable>().expect("table");
    let started = Instant::now();
    loop {
        let cmp = want.compare(&tcp80(lab));
        if cmp.is_match() {
            eprintln!(
                "[measure] {test}: {what} enforced after {:.1?}",
                started.elapsed()
            );
            return;
        }
        if started.elapsed() > Duration::from_secs(60) {
            panic!("{test}: {what} not enforced after 60 s:\n{}", cmp.render());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
