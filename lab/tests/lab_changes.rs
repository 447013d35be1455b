//! Privileged tests of changes to a running lab (adding, removing and relabelling pods and
//! namespaces) and of long-lived streams between pods.
//!
//! They need root; without it they print a loud SKIPPED line and return (with `CI=true` they
//! panic instead). Each test uses its own lab name, so they run in parallel with each other and
//! with other labs on the machine.

use std::{
    collections::BTreeMap,
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use netpol_lab::{
    AddPodOptions, ChangeError, ClusterSpec, Family, Lab, LabError, LabState, PodSpec, PodState,
    PortSpec, ProbeSpec, Protocol, StreamError, StreamReport, UpOptions, connect, netns_command,
    probe, require_privileges, start_stream,
};
use serde_yaml::Value;

/// Two nodes (routed and bridged), namespaces x and y, three pods serving TCP and UDP port 80.
fn cluster(name: &str) -> ClusterSpec {
    let ports = "[{name: serve-80-tcp, port: 80, protocol: TCP}, \
                 {name: serve-80-udp, port: 80, protocol: UDP}]";
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
"#
    );
    ClusterSpec::from_yaml(&yaml).expect("test cluster is valid")
}

/// A lab name unique to this test run and test.
fn lab_name(test: &str) -> String {
    format!("ch-{test}-{}", std::process::id())
}

fn options(manifests_dir: Option<PathBuf>) -> UpOptions {
    UpOptions {
        manifests_dir,
        server_exe: Some(PathBuf::from(env!("CARGO_BIN_EXE_netpol-lab"))),
        ..UpOptions::default()
    }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A pod serving TCP and UDP port 80, labelled `pod: <name>`.
fn web_pod(namespace: &str, name: &str, node: &str) -> PodSpec {
    PodSpec {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        node: node.to_owned(),
        labels: labels(&[("pod", name), ("app", "web")]),
        ports: [Protocol::Tcp, Protocol::Udp]
            .into_iter()
            .map(|protocol| PortSpec {
                name: Some(format!("serve-80-{}", protocol.as_str().to_lowercase())),
                port: 80,
                protocol,
            })
            .collect(),
    }
}

fn read_yaml(path: &Path) -> Value {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

fn pod_manifest(lab: &LabState, namespace: &str, name: &str) -> PathBuf {
    lab.manifests_dir
        .join(format!("pod-{namespace}-{name}.yaml"))
}

/// The labels of a manifest, as strings.
fn manifest_labels(path: &Path) -> BTreeMap<String, String> {
    serde_yaml::from_value(read_yaml(path)["metadata"]["labels"].clone())
        .unwrap_or_else(|e| panic!("labels of {}: {e}", path.display()))
}

/// Output of `ip <args>` run in a netns.
fn ip_in(netns: &Path, args: &[&str]) -> String {
    let out = netns_command(netns, "ip")
        .args(args)
        .output()
        .expect("run ip in a netns");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every pod in `pods` reaches and is reached by every pod of the lab, TCP and UDP, both
/// families, on port 80.
fn assert_reachable_both_ways(lab: &LabState, pods: &[&str]) {
    let keys: Vec<String> = pods.iter().map(|p| (*p).to_owned()).collect();
    for (from, to) in [(Some(keys.clone()), None), (None, Some(keys.clone()))] {
        let spec = ProbeSpec {
            ports: vec![80],
            from,
            to,
            ..ProbeSpec::default()
        };
        let results = probe(lab, &spec).expect("probe");
        assert!(results.all_connected(), "\n{}", results.render());
        for r in &results.results {
            assert_eq!(r.detail, r.to, "the server answers with its pod's name");
        }
    }
}

/// Checks an added pod: recorded in the state file, server running, netns and host veth there,
/// manifest with both addresses.
fn assert_pod_exists(lab: &LabState, pod: &PodState) {
    let saved = LabState::load(&lab.name).expect("load state");
    assert_eq!(saved.pod(&pod.namespace, &pod.name), Some(pod));
    let node = saved.node_of(pod);
    assert!(node.pod_cidr_v4.contains(&pod.ip_v4), "{}", pod.ip_v4);
    assert!(node.pod_cidr_v6.contains(&pod.ip_v6), "{}", pod.ip_v6);
    for other in saved.pods.iter().filter(|p| p.key() != pod.key()) {
        assert_ne!(
            other.ip_v4,
            pod.ip_v4,
            "{} has {}'s address",
            pod.key(),
            other.key()
        );
        assert_ne!(
            other.ip_v6,
            pod.ip_v6,
            "{} has {}'s address",
            pod.key(),
            other.key()
        );
    }
    let pid = pod.server_pid.expect("server started");
    assert!(
        netpol_lab::netns::is_alive(pid),
        "server {pid} of {}",
        pod.key()
    );
    assert!(pod.netns_path().exists(), "netns of {}", pod.key());
    let links = ip_in(&node.netns_path(), &["-br", "link"]);
    assert!(links.contains(&pod.host_veth), "{links}");

    let path = pod_manifest(lab, &pod.namespace, &pod.name);
    let manifest = read_yaml(&path);
    assert_eq!(manifest["kind"], "Pod");
    assert_eq!(manifest["metadata"]["uid"].as_str(), Some(pod.uid.as_str()));
    assert_eq!(
        manifest["spec"]["nodeName"].as_str(),
        Some(node.name.as_str())
    );
    assert_eq!(
        manifest["status"]["podIP"].as_str(),
        Some(pod.ip_v4.to_string().as_str())
    );
    let ips: Vec<&str> = manifest["status"]["podIPs"]
        .as_sequence()
        .expect("podIPs")
        .iter()
        .filter_map(|ip| ip["ip"].as_str())
        .collect();
    assert_eq!(ips, [pod.ip_v4.to_string(), pod.ip_v6.to_string()]);
    assert_eq!(manifest_labels(&path), pod.labels);
    assert!(
        saved.manifests.contains(&path),
        "{} recorded",
        path.display()
    );
}

/// Checks a removed pod: gone from the state file, server stopped, netns, veth, routes and
/// manifest gone, and its addresses no longer answer.
fn assert_pod_gone(lab: &LabState, pod: &PodState, client: &PodState) {
    let saved = LabState::load(&lab.name).expect("load state");
    assert!(saved.pod(&pod.namespace, &pod.name).is_none());
    assert!(
        !saved
            .spec
            .pods
            .iter()
            .any(|p| p.namespace == pod.namespace && p.name == pod.name)
    );
    let path = pod_manifest(lab, &pod.namespace, &pod.name);
    assert!(!path.exists(), "{} left behind", path.display());
    assert!(!saved.manifests.contains(&path));
    assert!(
        !pod.netns_path().exists(),
        "netns {} left behind",
        pod.netns
    );
    let pid = pod.server_pid.expect("had a server");
    assert!(!netpol_lab::netns::is_alive(pid), "server {pid} still runs");
    let node = saved.node(&pod.node).expect("the pod's node");
    let links = ip_in(&node.netns_path(), &["-br", "link"]);
    assert!(!links.contains(&pod.host_veth), "veth left behind: {links}");
    for family in ["-4", "-6"] {
        let routes = ip_in(&node.netns_path(), &[family, "route"]);
        for ip in [pod.ip_v4.to_string(), pod.ip_v6.to_string()] {
            assert!(
                !routes.lines().any(|l| l.starts_with(&format!("{ip} "))),
                "route to {ip} left behind: {routes}"
            );
        }
    }
    for family in [Family::V4, Family::V6] {
        assert!(
            !connect(
                &saved,
                client,
                pod.ip(family),
                80,
                Protocol::Tcp,
                Duration::from_millis(300)
            ),
            "{} still answers on {}",
            pod.key(),
            pod.ip(family)
        );
    }
}

#[test]
fn add_and_remove_pods_on_routed_and_bridged_nodes() {
    if !require_privileges("add_and_remove_pods_on_routed_and_bridged_nodes") {
        return;
    }
    let name = lab_name("addrm");
    let manifests = std::env::temp_dir().join(format!("{name}-manifests"));
    let _ = fs::remove_dir_all(&manifests);
    let mut lab = Lab::up(&cluster(&name), &options(Some(manifests.clone()))).expect("up");

    let routed = lab
        .add_pod(web_pod("x", "c", "node-a"), &AddPodOptions::default())
        .expect("add x/c on the routed node");
    let bridged = lab
        .add_pod(web_pod("y", "d", "node-b"), &AddPodOptions::default())
        .expect("add y/d on the bridged node");
    // Host indexes 2 and 3 of node-a and 2 of node-b are taken: the next ones follow.
    assert_eq!(routed.ip_v4.to_string(), "10.244.1.4");
    assert_eq!(routed.ip_v6.to_string(), "fd00:244:1::4");
    assert_eq!(bridged.ip_v4.to_string(), "10.244.2.3");
    assert_pod_exists(&lab, &routed);
    assert_pod_exists(&lab, &bridged);
    let node_a = lab.node("node-a").expect("node-a").netns_path();
    let routes = ip_in(&node_a, &["-4", "route"]);
    assert!(
        routes.contains(&format!("{} dev {}", routed.ip_v4, routed.host_veth)),
        "{routes}"
    );
    assert_reachable_both_ways(&lab, &["x/c", "y/d"]);

    // Adding a pod that exists, or at an address in use, changes nothing.
    match lab.add_pod(web_pod("x", "c", "node-b"), &AddPodOptions::default()) {
        Err(LabError::Change(ChangeError::PodExists { pod, .. })) => assert_eq!(pod, "x/c"),
        other => panic!("adding x/c twice: {other:?}"),
    }
    let in_use = AddPodOptions {
        ip_v4: Some(routed.ip_v4),
        ..AddPodOptions::default()
    };
    match lab.add_pod(web_pod("x", "e", "node-a"), &in_use) {
        Err(LabError::Change(ChangeError::AddressInUse { pod, .. })) => assert_eq!(pod, "x/c"),
        other => panic!("adding at x/c's address: {other:?}"),
    }
    assert!(lab.pod("x", "e").is_none());
    assert!(!pod_manifest(&lab, "x", "e").exists());

    let client = lab.pod("x", "a").expect("x/a").clone();
    let removed = lab.remove_pod("x", "c").expect("remove x/c");
    assert_eq!(removed, routed);
    assert_pod_gone(&lab, &routed, &client);
    lab.remove_pod("y", "d").expect("remove y/d");
    assert_pod_gone(&lab, &bridged, &client);
    match lab.remove_pod("y", "d") {
        Err(LabError::Change(ChangeError::UnknownPod { pod, .. })) => assert_eq!(pod, "y/d"),
        other => panic!("removing y/d twice: {other:?}"),
    }

    // The next pod does not get the deleted pod's addresses by itself...
    let next = lab
        .add_pod(web_pod("x", "f", "node-a"), &AddPodOptions::default())
        .expect("add x/f");
    assert_ne!(next.ip_v4, routed.ip_v4);
    // ...but can have them: the address now answers with the new pod's name.
    let reuse = AddPodOptions {
        ip_v4: Some(routed.ip_v4),
        ip_v6: Some(routed.ip_v6),
        ..AddPodOptions::default()
    };
    let heir = lab
        .add_pod(web_pod("y", "heir", "node-a"), &reuse)
        .expect("add y/heir at x/c's addresses");
    assert_eq!((heir.ip_v4, heir.ip_v6), (routed.ip_v4, routed.ip_v6));
    assert_ne!(heir.uid, routed.uid);
    assert_pod_exists(&lab, &heir);
    assert_reachable_both_ways(&lab, &["y/heir"]);

    // `down` removes the added pods' manifests too.
    lab.down().expect("down");
    let left: Vec<_> = fs::read_dir(&manifests)
        .expect("manifests dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    fs::remove_dir_all(&manifests).expect("clean up manifests dir");
}

#[test]
fn relabelling_rewrites_manifests() {
    if !require_privileges("relabelling_rewrites_manifests") {
        return;
    }
    let mut lab = Lab::up(&cluster(&lab_name("label")), &options(None)).expect("up");

    let pod = lab
        .set_pod_labels("x", "a", labels(&[("pod", "a"), ("role", "db")]))
        .expect("relabel x/a");
    assert_eq!(pod.labels, labels(&[("pod", "a"), ("role", "db")]));
    assert_eq!(lab.pod("x", "a").map(|p| &p.labels), Some(&pod.labels));
    let path = pod_manifest(&lab, "x", "a");
    assert_eq!(manifest_labels(&path), pod.labels);
    assert_eq!(
        LabState::load(&lab.name).expect("load").pod("x", "a"),
        Some(&pod)
    );

    lab.set_namespace_labels("y", labels(&[("team", "blue")]))
        .expect("relabel namespace y");
    let ns = lab.manifests_dir.join("namespace-y.yaml");
    assert_eq!(
        manifest_labels(&ns),
        labels(&[("team", "blue"), ("kubernetes.io/metadata.name", "y")]),
        "the whole set is replaced; kubernetes.io/metadata.name stays"
    );
    let spec_ns = lab.spec.namespaces.iter().find(|n| n.name == "y");
    assert_eq!(
        spec_ns.map(|n| &n.labels),
        Some(&labels(&[("team", "blue")]))
    );

    // Invalid labels are refused and change nothing.
    let before = fs::read_to_string(&path).expect("read manifest");
    match lab.set_pod_labels("x", "a", labels(&[("bad key!", "v")])) {
        Err(LabError::Change(ChangeError::Invalid { field, .. })) => {
            assert_eq!(field, "pod.labels")
        }
        other => panic!("invalid label: {other:?}"),
    }
    assert_eq!(fs::read_to_string(&path).expect("read manifest"), before);
    assert!(matches!(
        lab.set_namespace_labels("nope", BTreeMap::new()),
        Err(LabError::Change(ChangeError::UnknownNamespace { .. }))
    ));
    // Clearing every label is allowed.
    lab.set_pod_labels("x", "a", BTreeMap::new())
        .expect("clear labels");
    assert!(manifest_labels(&path).is_empty());
}

#[test]
fn cli_changes_a_running_lab() {
    if !require_privileges("cli_changes_a_running_lab") {
        return;
    }
    let lab = Lab::up(&cluster(&lab_name("cli")), &options(None)).expect("up");
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_netpol-lab"))
            .args(args)
            .output()
            .expect("run netpol-lab");
        assert!(
            out.status.success(),
            "netpol-lab {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    let out = run(&[
        "add-pod",
        &lab.name,
        "--namespace",
        "y",
        "--name",
        "c",
        "--node",
        "node-b",
        "--labels",
        "pod=c,app=web",
        "--port",
        "serve-80-tcp:80/TCP",
        "--port",
        "serve-80-udp:80/udp",
        "--port",
        "81",
    ]);
    assert!(out.contains("y/c\tnode-b\t10.244.2.3\t"), "{out}");
    let state = LabState::load(&lab.name).expect("load");
    let c = state.pod("y", "c").expect("y/c added");
    assert_eq!(c.labels, labels(&[("pod", "c"), ("app", "web")]));
    assert_eq!(c.ports_of(Protocol::Tcp), vec![80, 81]);
    assert!(connect(
        &state,
        state.pod("x", "a").expect("x/a"),
        c.ip(Family::V6),
        81,
        Protocol::Tcp,
        Duration::from_secs(1)
    ));

    run(&["label", &lab.name, "pod", "y/c", "pod=c,tier=front"]);
    run(&["label", &lab.name, "namespace", "x", "ns=x,env=test"]);
    let state = LabState::load(&lab.name).expect("load");
    assert_eq!(
        state.pod("y", "c").map(|p| &p.labels),
        Some(&labels(&[("pod", "c"), ("tier", "front")]))
    );
    assert_eq!(
        manifest_labels(&state.manifests_dir.join("namespace-x.yaml")),
        labels(&[
            ("ns", "x"),
            ("env", "test"),
            ("kubernetes.io/metadata.name", "x")
        ])
    );

    run(&["remove-pod", &lab.name, "y/c"]);
    let state = LabState::load(&lab.name).expect("load");
    assert!(state.pod("y", "c").is_none());
    assert!(!pod_manifest(&state, "y", "c").exists());
}

/// Waits (at most 5 s) until a stream has had `n` echoes.
fn wait_for_echoes(stream: &netpol_lab::StreamHandle, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while stream.echoed() < n && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn streams_without_enforcement_lose_nothing() {
    if !require_privileges("streams_without_enforcement_lose_nothing") {
        return;
    }
    let lab = Lab::up(&cluster(&lab_name("stream")), &options(None)).expect("up");
    let pod = |key: &str| lab.pod_by_key(key).expect("pod").clone();
    let (xa, xb, ya) = (pod("x/a"), pod("x/b"), pod("y/a"));
    let interval = Duration::from_millis(2);

    // TCP from two client netns (the retransmission counter is per netns), UDP from a third
    // pair; both families; across nodes (routed to bridged) and within one.
    let streams = [
        (&xa, xb.ip(Family::V4), 9000, Protocol::Tcp),
        (&ya, xb.ip(Family::V6), 9001, Protocol::Tcp),
        (&xb, xa.ip(Family::V4), 9000, Protocol::Udp),
        (&xb, ya.ip(Family::V6), 9001, Protocol::Udp),
    ]
    .map(|(from, to, port, protocol)| {
        start_stream(&lab, from, to, port, protocol, interval)
            .unwrap_or_else(|e| panic!("start {protocol} stream to {to}: {e}"))
    });
    for stream in &streams {
        wait_for_echoes(stream, 1);
    }
    thread::sleep(Duration::from_secs(1));
    let reports: Vec<StreamReport> = streams.into_iter().map(|s| s.stop()).collect();

    for report in &reports {
        assert!(report.sent > 0, "{report}");
        assert_eq!(report.echoed, report.sent, "{report}");
        assert!(report.lost.is_empty(), "{report}");
        assert!(report.connection_up, "{report}");
        assert_eq!(report.error, None, "{report}");
        assert_eq!(report.bytes_echoed, report.bytes_sent, "{report}");
        match report.protocol {
            Protocol::Tcp => assert_eq!(report.retransmits, Some(0), "{report}"),
            _ => assert_eq!(report.retransmits, None, "{report}"),
        }
        assert!(report.is_clean(), "{report}");
        eprintln!("{report}");
    }

    // A port the pod's own server uses is refused, and so is an address of no pod.
    match start_stream(&lab, &xa, xb.ip(Family::V4), 80, Protocol::Tcp, interval) {
        Err(StreamError::Listen { pod, .. }) => assert_eq!(pod, "x/b"),
        other => panic!("stream to the pod server's port: {other:?}"),
    }
    let nowhere: IpAddr = "10.244.1.200".parse().expect("ip");
    assert!(matches!(
        start_stream(&lab, &xa, nowhere, 9000, Protocol::Udp, interval),
        Err(StreamError::UnknownAddress { .. })
    ));
    assert!(matches!(
        start_stream(&lab, &xa, xb.ip(Family::V4), 9000, Protocol::Sctp, interval),
        Err(StreamError::Protocol(Protocol::Sctp))
    ));
    // The pod's server still answers.
    assert!(connect(
        &lab,
        &xa,
        xb.ip(Family::V4),
        80,
        Protocol::Tcp,
        Duration::from_secs(1)
    ));
}
