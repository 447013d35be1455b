//! End to end, in a lab of network namespaces: one routed node and one
//! bridged node, an agent on each, real connections between pods.
//! Needs root (namespaces, BPF); skips loudly without it, fails under CI.

use std::{path::Path, process::Command, time::Duration};

use netpol_lab::{
    Family, LabState, ProbeSpec, Protocol, TableKey, TruthTable, require_privileges, start_agents,
};

mod common {
    pub mod lab;
}

use common::lab::{AGENT, write_policy};

const PORTS: &str = "[{name: http, port: 80, protocol: TCP}, {name: dns, port: 80, protocol: UDP}]";

fn tcp80(lab: &LabState, family: Family) -> TruthTable {
    let spec = ProbeSpec {
        ports: vec![80],
        protocols: vec![Protocol::Tcp],
        families: vec![family],
        ..ProbeSpec::default()
    };
    let res = netpol_lab::probe(lab, &spec).expect("probe");
    res.table(&TableKey {
        port: 80,
        protocol: Protocol::Tcp,
        family,
    })
}

fn expect(lab: &LabState, family: Family, expected: &str) {
    let expected: TruthTable = expected.parse().expect("expected table parses");
    let actual = tcp80(lab, family);
    let cmp = expected.compare(&actual);
    assert!(
        cmp.is_match(),
        "TCP/80 {family:?} reachability differs:\n{}\nactual:\n{}",
        cmp.render(),
        actual.render()
    );
}

const ALL_CONNECTED: &str = "
-   x/a x/b y/a y/b
x/a .   .   .   .
x/b .   .   .   .
y/a .   .   .   .
y/b .   .   .   .
";

const DENY_ALL_X: &str = netpol_lab::fixtures::DENY_ALL_X;

const ALLOW_Y_TO_XA: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-from-y, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
    - from:
        - namespaceSelector: {matchLabels: {ns: y}}
      ports:
        - {protocol: TCP, port: 80}
"#;

/// Default deny and an allow from another namespace, across a routed and
/// a bridged node, IPv4 and IPv6; flow logs name the deciding policy;
/// deleting the policies restores everything.
#[test]
fn policies_enforced_across_routed_and_bridged_nodes() {
    if !require_privileges("policies_enforced_across_routed_and_bridged_nodes") {
        return;
    }
    let lab = common::lab::up('e', PORTS);
    // Allowed flows are flow-logged too (off by default).
    let mut agents =
        start_agents(&lab, Path::new(AGENT), &["--log-allowed".to_string()]).expect("start agents");
    agents
        .wait_synced(&[], Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    for family in [Family::V4, Family::V6] {
        expect(&lab, family, ALL_CONNECTED);
    }

    agents
        .change(
            || {
                write_policy(&lab, "deny-all.yaml", DENY_ALL_X);
                write_policy(&lab, "allow-from-y.yaml", ALLOW_Y_TO_XA);
            },
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let enforced = "
-   x/a x/b y/a y/b
x/a .   X   .   .
x/b X   .   .   .
y/a .   X   .   .
y/b .   X   .   .
";
    for family in [Family::V4, Family::V6] {
        expect(&lab, family, enforced);
    }

    // `explain` agrees with the probes, cell by cell (a pod reaching
    // itself never leaves its netns, so those cells are not policy's).
    let actual = tcp80(&lab, Family::V4);
    let state_dir = agents.node("node-a").state_dir.clone();
    for from in ["x/a", "x/b", "y/a", "y/b"] {
        for to in ["x/a", "x/b", "y/a", "y/b"] {
            if from == to {
                continue;
            }
            let (code, body) = netpol_agent::api::get(
                &state_dir,
                &format!("/explain?from={from}&to={to}&port=80/TCP"),
            )
            .unwrap_or_else(|e| panic!("explain {from} -> {to}: {e}"));
            assert_eq!(code, 200, "explain {from} -> {to}: {body}");
            let e: netpol_agent::explain::Explanation =
                serde_json::from_str(&body).expect("explanation JSON");
            let probed = actual.get(from, to).expect("probed cell");
            assert_eq!(
                e.allowed, probed,
                "explain says {} but the probe says {probed} for {from} -> {to}:\n{e}",
                e.allowed
            );
        }
    }

    // Flow logs: the deny names default-deny and the isolating policy, the
    // allow names the policy and rule.
    std::thread::sleep(Duration::from_millis(300));
    let logs = agents.flow_logs();
    let xb = lab.pod("x", "b").unwrap().ip_v4.to_string();
    let xa = lab.pod("x", "a").unwrap().ip_v4.to_string();
    let deny = logs.iter().find(|(_, l)| {
        l["verdict"] == "deny" && l["dst"]["ip"] == xb.as_str() && l["protocol"] == "TCP"
    });
    let (raw, deny) = deny.unwrap_or_else(|| panic!("no deny logged for x/b: {logs:?}"));
    assert_eq!(deny["policy"], "default-deny", "{raw}");
    assert_eq!(deny["dst"]["pod"], "b", "{raw}");
    assert!(
        deny["isolated_by"]
            .as_array()
            .is_some_and(|a| a.iter().any(|p| p == "x/deny-all")),
        "{raw}"
    );
    let allow = logs.iter().find(|(_, l)| {
        l["verdict"] == "allow" && l["dst"]["ip"] == xa.as_str() && l["policy"] == "x/allow-from-y"
    });
    let (raw, allow) = allow.unwrap_or_else(|| panic!("no allow by x/allow-from-y: {logs:?}"));
    assert_eq!(allow["rule"], "ingress[0]", "{raw}");
    assert_eq!(allow["src"]["namespace"], "y", "{raw}");

    // The maps are pinned and bpftool prints them as typed structs.
    let a = agents.node("node-a");
    let endpoints = a.bpffs_root.join("maps/NETPOL_ENDPOINTS");
    assert!(endpoints.exists(), "{} not pinned", endpoints.display());
    if let Ok(out) = Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(&endpoints)
        .output()
    {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("policy_id") && text.contains("flags"),
            "bpftool does not show typed values:\n{text}"
        );
    }

    agents
        .change(
            || {
                std::fs::remove_file(lab.manifests_dir.join("deny-all.yaml")).unwrap();
                std::fs::remove_file(lab.manifests_dir.join("allow-from-y.yaml")).unwrap();
            },
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    expect(&lab, Family::V4, ALL_CONNECTED);
}

/// A peer map too small for the cluster must not let an address fall back
/// to a more permissive identity: every local pod is denied, the status
/// names the map.
#[test]
fn full_peer_map_fails_closed() {
    if !require_privileges("full_peer_map_fails_closed") {
        return;
    }
    let lab = common::lab::up('f', PORTS);
    let mut agents = start_agents(
        &lab,
        Path::new(AGENT),
        &["--max-peers-v4".to_string(), "1".to_string()],
    )
    .expect("start agents");
    agents
        .wait_synced(&[], Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    let status = agents.node("node-a").status().expect("status");
    let errors = status["errors"].to_string();
    assert!(
        errors.contains("NETPOL_PEERS_V4 is full"),
        "status does not name the full map: {errors}"
    );
    // Only a pod talking to itself (never leaves its netns) connects.
    let locked = "
-   x/a x/b y/a y/b
x/a .   X   X   X
x/b X   .   X   X
y/a X   X   .   X
y/b X   X   X   .
";
    expect(&lab, Family::V4, locked);
    expect(&lab, Family::V6, locked);
}
