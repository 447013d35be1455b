//! Privileged lab tests: real network namespaces, veths, bridges and servers.
//!
//! They need root; without it they print a loud SKIPPED line and return (with `CI=true` they
//! panic instead). Each test uses its own lab name, so they can run in parallel with each other
//! and with other labs on the machine.

use std::{
    collections::BTreeSet,
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use netpol_lab::{
    ClusterSpec, Family, Lab, LabError, ProbeSpec, Protocol, TruthTable, UpOptions, connect,
    connect_detailed, down, netns::is_alive, netns::list_netns, netns_command, probe,
    require_privileges, state::netns_prefix,
};
use serde_yaml::Value;

/// Two nodes (routed and bridged), two namespaces, five pods, dual-stack.
fn small_cluster(name: &str) -> ClusterSpec {
    let ports = "[{name: serve-80-tcp, port: 80, protocol: TCP}, \
                 {name: serve-80-udp, port: 80, protocol: UDP}, \
                 {name: serve-81-tcp, port: 81, protocol: TCP}, \
                 {name: serve-81-udp, port: 81, protocol: UDP}]";
    let yaml = format!(
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
  - {{namespace: y, name: a, node: node-a, labels: {{pod: a}}, ports: {ports}}}
  - {{namespace: y, name: b, node: node-b, labels: {{pod: b}}, ports: {ports}}}
  - namespace: y
    name: c
    node: node-a
    labels: {{pod: c, app: db}}
    ports:
      - {{name: serve-80-tcp, port: 80, protocol: TCP}}
      - {{name: serve-80-udp, port: 80, protocol: UDP}}
      - {{name: serve-81-tcp, port: 81, protocol: TCP}}
      - {{name: serve-81-udp, port: 81, protocol: UDP}}
      - {{name: sctp-90, port: 90, protocol: SCTP}}
"#
    );
    ClusterSpec::from_yaml(&yaml).expect("test cluster is valid")
}

/// A lab name unique to this test run and test.
fn lab_name(test: &str) -> String {
    format!("it-{test}-{}", std::process::id())
}

fn options(manifests_dir: Option<PathBuf>) -> UpOptions {
    UpOptions {
        manifests_dir,
        server_exe: Some(PathBuf::from(env!("CARGO_BIN_EXE_netpol-lab"))),
        ..UpOptions::default()
    }
}

fn read_yaml(path: &Path) -> Value {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

#[test]
fn up_probe_down() {
    if !require_privileges("up_probe_down") {
        return;
    }
    let name = lab_name("basic");
    let manifests = std::env::temp_dir().join(format!("{name}-manifests"));
    let _ = fs::remove_dir_all(&manifests);
    let lab = Lab::up(&small_cluster(&name), &options(Some(manifests.clone()))).expect("up");

    // Every pod reaches every pod, on both ports, both protocols, both families.
    let results = probe(&lab, &ProbeSpec::default()).expect("probe");
    assert_eq!(results.results.len(), 5 * 5 * 2 * 2 * 2);
    let pods: Vec<String> = lab.pods.iter().map(|p| p.key()).collect();
    for (key, table) in results.tables() {
        let comparison = TruthTable::new(&pods, &pods, true).compare(&table);
        assert!(comparison.is_match(), "{key}\n{comparison}");
    }
    for r in &results.results {
        assert_eq!(r.detail, r.to, "the server answers with its pod's name");
    }

    // Probes can fail: nothing listens on port 82 (refused, so no timeout to wait for).
    let closed = ProbeSpec {
        ports: vec![82],
        from: Some(vec!["x/a".into(), "x/b".into()]),
        ..ProbeSpec::default()
    };
    let results = probe(&lab, &closed).expect("probe closed port");
    assert_eq!(results.results.len(), 2 * 5 * 2 * 2);
    assert!(
        results.results.iter().all(|r| !r.connected),
        "{}",
        results.render()
    );

    // The single-connection helper, across nodes and attachments.
    let xa = lab.pod("x", "a").expect("x/a");
    let yb = lab.pod("y", "b").expect("y/b");
    for family in [Family::V4, Family::V6] {
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            let attempt = connect_detailed(
                &lab,
                xa,
                yb.ip(family),
                81,
                protocol,
                Duration::from_secs(1),
            );
            assert!(
                attempt.connected,
                "x/a -> y/b {protocol}/81 {family}: {}",
                attempt.detail
            );
            assert_eq!(attempt.detail, "y/b");
        }
    }
    let nowhere: IpAddr = "10.244.1.200".parse().expect("ip");
    assert!(!connect(
        &lab,
        xa,
        nowhere,
        80,
        Protocol::Tcp,
        Duration::from_millis(300)
    ));

    // Commands run in a node's netns see that node's links.
    let node_a = lab.node("node-a").expect("node-a");
    let out = netns_command(&node_a.netns_path(), "ip")
        .args(["-br", "link"])
        .output()
        .expect("run ip in node netns");
    let links = String::from_utf8_lossy(&out.stdout);
    assert!(links.contains(&xa.host_veth), "{links}");
    assert!(links.contains("eth0"), "{links}");

    check_manifests(&lab, &manifests);

    // A NetworkPolicy a user dropped into the manifests dir outlives the lab.
    let policy = manifests.join("networkpolicy-x-deny.yaml");
    fs::write(&policy, "kind: NetworkPolicy\n").expect("write policy");

    let netns: Vec<String> = lab.netns_names();
    let pids: Vec<u32> = lab.pods.iter().filter_map(|p| p.server_pid).collect();
    assert_eq!(pids.len(), 5);
    assert!(pids.iter().all(|&pid| is_alive(pid)));
    let state_dir = lab.state_dir.clone();
    let report = lab.down().expect("down");
    assert_eq!(report.netns_deleted.len(), netns.len());
    assert!(
        list_netns(&netns_prefix(&name)).is_empty(),
        "netns left behind"
    );
    for pid in pids {
        assert!(!is_alive(pid), "server {pid} still running");
    }
    assert!(!state_dir.exists(), "state dir left behind");
    let left: Vec<_> = fs::read_dir(&manifests)
        .expect("manifests dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(left, vec![policy.file_name().expect("name").to_owned()]);
    assert!(
        down(&name).expect("second down").is_empty(),
        "down is idempotent"
    );
    fs::remove_dir_all(&manifests).expect("clean up manifests dir");
}

fn check_manifests(lab: &netpol_lab::LabState, dir: &Path) {
    let files: BTreeSet<String> = fs::read_dir(dir)
        .expect("manifests dir")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    assert_eq!(files.len(), 2 + 2 + 5, "{files:?}");
    assert!(
        files.iter().all(|f| f.ends_with(".yaml")),
        "no temp files left: {files:?}"
    );

    let ns = read_yaml(&dir.join("namespace-y.yaml"));
    assert_eq!(ns["kind"], "Namespace");
    assert_eq!(ns["metadata"]["name"], "y");
    assert_eq!(ns["metadata"]["labels"]["ns"], "y");
    assert_eq!(ns["metadata"]["labels"]["kubernetes.io/metadata.name"], "y");

    let pod_state = lab.pod("y", "c").expect("y/c");
    let pod = read_yaml(&dir.join("pod-y-c.yaml"));
    assert_eq!(pod["kind"], "Pod");
    assert_eq!(pod["metadata"]["namespace"], "y");
    assert_eq!(pod["metadata"]["name"], "c");
    assert_eq!(
        pod["metadata"]["uid"].as_str(),
        Some(pod_state.uid.as_str())
    );
    assert_eq!(pod["metadata"]["labels"]["app"], "db");
    assert_eq!(pod["spec"]["nodeName"], "node-a");
    let ports = &pod["spec"]["containers"][0]["ports"];
    assert_eq!(ports[4]["name"], "sctp-90");
    assert_eq!(ports[4]["containerPort"], 90);
    assert_eq!(ports[4]["protocol"], "SCTP");
    assert_eq!(pod["status"]["phase"], "Running");
    assert_eq!(
        pod["status"]["podIP"].as_str(),
        Some(pod_state.ip_v4.to_string().as_str())
    );
    assert_eq!(
        pod["status"]["podIPs"][1]["ip"].as_str(),
        Some(pod_state.ip_v6.to_string().as_str())
    );
    assert_eq!(pod["status"]["hostIP"], "172.31.0.1");

    let node = read_yaml(&dir.join("node-node-b.yaml"));
    assert_eq!(node["kind"], "Node");
    assert_eq!(node["metadata"]["name"], "node-b");
    assert_eq!(node["spec"]["podCIDRs"][0], "10.244.2.0/24");
    assert_eq!(node["spec"]["podCIDRs"][1], "fd00:244:2::/64");
    assert_eq!(node["status"]["addresses"][0]["type"], "InternalIP");
    assert_eq!(node["status"]["addresses"][0]["address"], "172.31.0.2");
    assert_eq!(node["status"]["addresses"][1]["address"], "fd00:31::2");
}

#[test]
fn up_twice_is_refused_and_failed_up_leaves_nothing() {
    if !require_privileges("up_twice_is_refused_and_failed_up_leaves_nothing") {
        return;
    }
    let name = lab_name("twice");
    let spec = small_cluster(&name);
    let lab = Lab::up(&spec, &options(None)).expect("up");
    match netpol_lab::up(&spec, &options(None)) {
        Err(LabError::AlreadyUp { lab, .. }) => assert_eq!(lab, name),
        other => panic!("second up of a running lab: {other:?}"),
    }
    drop(lab);
    assert!(
        list_netns(&netns_prefix(&name)).is_empty(),
        "drop tears the lab down"
    );

    // Servers that cannot start: `up` fails and removes what it made.
    let broken = UpOptions {
        manifests_dir: None,
        server_exe: Some(PathBuf::from("/nonexistent/netpol-lab")),
        ..UpOptions::default()
    };
    let err = netpol_lab::up(&spec, &broken).expect_err("up with a missing server binary");
    assert!(err.to_string().contains("server"), "{err}");
    assert!(
        list_netns(&netns_prefix(&name)).is_empty(),
        "failed up left netns behind"
    );
    assert!(
        !netpol_lab::state::state_dir(&name).exists(),
        "failed up left state behind"
    );
}

#[test]
fn down_removes_leftovers_without_state() {
    if !require_privileges("down_removes_leftovers_without_state") {
        return;
    }
    let name = lab_name("stale");
    let netns = format!("{}node_ghost", netns_prefix(&name));
    let status = std::process::Command::new("ip")
        .args(["netns", "add", &netns])
        .status()
        .expect("run ip");
    assert!(status.success());
    // A process living in the stale netns (like a server of a crashed lab).
    let mut sleeper = netns_command(&Path::new("/run/netns").join(&netns), "sleep")
        .arg("600")
        .spawn()
        .expect("spawn sleep in netns");

    let report = down(&name).expect("down");
    assert_eq!(report.netns_deleted, vec![netns]);
    assert_eq!(report.processes_killed, vec![sleeper.id()]);
    assert!(sleeper.try_wait().is_err() || !is_alive(sleeper.id()));
    assert!(list_netns(&netns_prefix(&name)).is_empty());
}
