//! Shared by the agent's lab tests: the two-node cluster (one routed node,
//! one bridged node), bringing it up, and dropping policies in.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use netpol_lab::{ClusterSpec, Lab, LabState, UpOptions};

/// The agent binary under test.
pub const AGENT: &str = env!("CARGO_BIN_EXE_netpol-agent");

/// Two nodes (node-a routed, node-b bridged), namespaces x and y, pods a and
/// b in each spread over both nodes, dual-stack, each serving `ports`
/// (e.g. `[{port: 80, protocol: TCP}]`).
pub fn cluster(name: &str, ports: &str) -> ClusterSpec {
    ClusterSpec::from_yaml(&cluster_yaml(name, ports)).expect("test cluster parses")
}

/// The YAML of [`cluster`], for tests that add to it.
pub fn cluster_yaml(name: &str, ports: &str) -> String {
    format!(
        r#"
name: {name}
nodes:
  - {{name: node-a, attachment: routed, podCIDR: 10.244.1.0/24, podCIDRv6: "fd00:244:1::/64"}}
  - {{name: node-b, attachment: bridged, podCIDR: 10.244.2.0/24, podCIDRv6: "fd00:244:2::/64"}}
namespaces:
  - {{name: x, labels: {{ns: x}}}}
  - {{name: y, labels: {{ns: y}}}}
pods:
  - {{namespace: x, name: a, node: node-a, labels: {{pod: a}}, ports: {ports}}}
  - {{namespace: x, name: b, node: node-b, labels: {{pod: b}}, ports: {ports}}}
  - {{namespace: y, name: a, node: node-b, labels: {{pod: a}}, ports: {ports}}}
  - {{namespace: y, name: b, node: node-a, labels: {{pod: b}}, ports: {ports}}}
"#
    )
}

/// Bring the cluster up under a name unique to this test process. The pod
/// servers are the `netpol-lab` binary, found by the lab (`NETPOL_LAB_BIN`,
/// or next to the test executable: `cargo xtask test` builds it).
pub fn up(prefix: char, ports: &str) -> Lab {
    let name = format!("{prefix}{}", std::process::id() % 100_000);
    Lab::up(&cluster(&name, ports), &UpOptions::default())
        .unwrap_or_else(|e| panic!("lab up {name}: {e}"))
}

/// Drop a manifest into the lab's manifests directory atomically (a hidden
/// temp file, then a rename), as a user would with `kubectl apply`.
pub fn write_policy(lab: &LabState, file: &str, yaml: &str) {
    let tmp = lab.manifests_dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, yaml).expect("write policy");
    std::fs::rename(&tmp, lab.manifests_dir.join(file)).expect("rename policy");
}
