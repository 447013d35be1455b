//! ClusterNetworkPolicy `status.conditions` in the control-plane lab: each agent (`--source
//! kube`, the ServiceAccount and RBAC of `deploy/`) publishes its node report as a Lease in
//! its namespace, and one agent writes every policy's `Programmed` condition from them: on how
//! many nodes the policy's current generation is programmed, and why not elsewhere
//! (`netpol-agent/src/cnp_status.rs`). A new generation is followed.
//!
//! Needs root, the control-plane tools and the CRD manifest (`cargo xtask setup`); skips
//! loudly without them, fails under CI.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use netpol_agent::cnp_status::{CONDITION_TYPE, REPORT_LABEL};
use netpol_lab::{
    AgentSource, Agents, Lab,
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
/// Reports are looked at every 2 s; a condition follows within a few ticks.
const TIMEOUT: Duration = Duration::from_secs(60);

fn cnp(priority: u32) -> String {
    format!(
        r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata:
  name: deny-x-to-y
spec:
  tier: Admin
  priority: {priority}
  subject:
    namespaces:
      matchLabels: {{ns: x}}
  egress:
  - name: no-y
    action: Deny
    to:
    - namespaces:
        matchLabels: {{ns: "y"}}
"#
    )
}

fn cp(lab: &Lab) -> ControlPlaneState {
    cp_ops::control_plane(&lab.name).unwrap_or_else(|e| panic!("{e}"))
}

fn kubectl_json(cp: &ControlPlaneState, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let out = cp
        .kubectl()
        .expect("kubectl")
        .run(&all, None)
        .unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("kubectl {args:?}: {e}: {out}"))
}

/// The policy's generation and its `Programmed` condition, once the condition speaks of that
/// generation.
fn wait_condition(
    lab: &Lab,
    agents: &Agents,
    want: impl Fn(&serde_json::Value) -> bool,
) -> (i64, serde_json::Value) {
    let started = Instant::now();
    let mut last = serde_json::Value::Null;
    loop {
        let obj = kubectl_json(&cp(lab), &["get", "clusternetworkpolicy", "deny-x-to-y"]);
        let generation = obj["metadata"]["generation"].as_i64().expect("generation");
        let cond = obj["status"]["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == CONDITION_TYPE))
            .cloned();
        if let Some(c) = cond {
            if c["observedGeneration"].as_i64() == Some(generation) && want(&c) {
                return (generation, c);
            }
            last = c;
        }
        if started.elapsed() > TIMEOUT {
            let logs: Vec<String> = agents
                .agents
                .iter()
                .map(|a| format!("--- {}:\n{}", a.node, a.log_tail(15)))
                .collect();
            panic!(
                "no {CONDITION_TYPE} condition for generation {generation} as wanted after \
                 {TIMEOUT:?}; last: {last}\n{}",
                logs.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn agents_report_each_node_and_write_the_programmed_condition() {
    const TEST: &str = "agents_report_each_node_and_write_the_programmed_condition";
    if !require_manifests(TEST, &[CNP_CRD]) {
        return;
    }
    // "cs": this file's labs.
    let Some(lab) = common::lab::control_plane_up(TEST, "cs", PORTS) else {
        return;
    };
    cp_ops::install_cnp_crd(&cp(&lab)).unwrap_or_else(|e| panic!("{TEST}: install CRD: {e}"));
    let source = AgentSource::kube(&lab, Path::new(DEPLOY))
        .unwrap_or_else(|e| panic!("install deploy/: {e}"));
    let mut agents: Agents =
        start_agents_with(&lab, Path::new(AGENT), &source, &[]).expect("start agents");
    agents
        .wait_synced(&[], Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{TEST}: agents not ready: {e}"));
    cp_ops::apply(&cp(&lab), &cnp(10)).unwrap_or_else(|e| panic!("{TEST}: kubectl apply: {e}"));

    let expect = |c: &serde_json::Value| {
        c["status"] == "True"
            && c["reason"] == "Programmed"
            && c["message"] == "programmed on 2 of 2 nodes"
    };
    let (g1, c1) = wait_condition(&lab, &agents, expect);
    eprintln!("[measure] {TEST}: generation {g1}: {c1}");

    // One report per node, in the agents' namespace.
    let leases = kubectl_json(
        &cp(&lab),
        &[
            "get",
            "leases",
            "-n",
            "kube-system",
            "-l",
            &format!("{}={}", REPORT_LABEL.0, REPORT_LABEL.1),
        ],
    );
    let mut holders: Vec<String> = leases["items"]
        .as_array()
        .expect("lease list")
        .iter()
        .filter_map(|l| l["spec"]["holderIdentity"].as_str().map(String::from))
        .collect();
    holders.sort();
    assert_eq!(holders, ["node-a", "node-b"], "{leases}");

    // A new generation: the condition follows it.
    cp_ops::apply(&cp(&lab), &cnp(20)).unwrap_or_else(|e| panic!("{TEST}: kubectl apply: {e}"));
    let (g2, c2) = wait_condition(&lab, &agents, expect);
    assert!(g2 > g1, "the edit made a new generation ({g1} -> {g2})");
    eprintln!("[measure] {TEST}: generation {g2}: {c2}");
    agents.stop();
}
