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
    netpol_lab::fixtures::two_node_cluster(name, ports).expect("test cluster parses")
}

/// The YAML of [`cluster`], for tests that add to it.
pub fn cluster_yaml(name: &str, ports: &str) -> String {
    netpol_lab::fixtures::two_node_cluster_yaml(name, ports)
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

/// A control-plane lab (real etcd, kube-apiserver, controller manager; no kube-proxy, no DNS)
/// of [`cluster`], under a name unique to this test process; `None` (after a loud skip) without
/// root or the tools.
pub fn control_plane_up(test: &str, prefix: &str, ports: &str) -> Option<Lab> {
    use netpol_lab::{
        controlplane::{ControlPlaneSpec, ProxyMode},
        require_privileges,
        tools::{CONTROL_PLANE_TOOLS, require_tools},
    };
    if !require_privileges(test) || !require_tools(test, CONTROL_PLANE_TOOLS) {
        return None;
    }
    let name = format!("{prefix}{}", std::process::id() % 100_000);
    let started = std::time::Instant::now();
    let lab = Lab::up(
        &cluster(&name, ports),
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
