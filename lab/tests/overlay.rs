//! Privileged tests of the fabric modes: a vxlan lab (flannel's default overlay) with a routed
//! and a bridged node, checked on the kernel's side (devices, routes, neighbours, FDB, MTUs) and
//! on the traffic's (every pod reaches every pod, and the cross-node part of it went through the
//! tunnel), and a host-gw lab that has no tunnel.
//!
//! They need root; without it they print a loud SKIPPED line and return (with `CI=true` they
//! panic instead). Each test uses its own lab name, so they run in parallel with other labs.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use netpol_lab::{
    AddPodOptions, ClusterSpec, FabricMode, Family, Lab, NodeState, PodSpec, PortSpec, ProbeSpec,
    Protocol, TruthTable, UpOptions, connect, netns_command, probe, require_privileges,
    run_in_netns,
};
use serde_json::Value;

/// A routed and a bridged node over `mode`, two pods on each, serving TCP and UDP port 80.
fn cluster(name: &str, mode: &str) -> ClusterSpec {
    let ports = "[{name: serve-80-tcp, port: 80, protocol: TCP}, \
                 {name: serve-80-udp, port: 80, protocol: UDP}]";
    let yaml = format!(
        r#"
name: {name}
fabric: {{mode: {mode}}}
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
"#
    );
    ClusterSpec::from_yaml(&yaml).expect("test cluster is valid")
}

/// A lab name unique to this test run and test.
fn lab_name(test: &str) -> String {
    format!("ov-{test}-{}", std::process::id())
}

fn options() -> UpOptions {
    UpOptions {
        manifests_dir: None,
        server_exe: Some(PathBuf::from(env!("CARGO_BIN_EXE_netpol-lab"))),
        ..UpOptions::default()
    }
}

/// Runs `program args...` in a node's netns and returns its stdout; panics on failure.
fn run_on(node: &NodeState, program: &str, args: &[&str]) -> String {
    let out = netns_command(&node.netns_path(), program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program} in {}: {e}", node.name));
    assert!(
        out.status.success(),
        "{program} {args:?} in {}: {}",
        node.name,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// `ip -j <args>` (or `bridge -j`) in a node's netns, parsed.
fn json_on(node: &NodeState, program: &str, args: &[&str]) -> Value {
    let args: Vec<&str> = ["-j"].iter().chain(args).copied().collect();
    let text = run_on(node, program, &args);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{program} {args:?}: {e}: {text}"))
}

/// A link's packet counters in a node's netns: (rx, tx).
fn packets(node: &NodeState, device: &str) -> (u64, u64) {
    let link = json_on(node, "ip", &["-s", "link", "show", "dev", device]);
    let stats = &link[0]["stats64"];
    let count = |dir: &str| {
        stats[dir]["packets"]
            .as_u64()
            .unwrap_or_else(|| panic!("{device} on {}: no {dir} packets in {link}", node.name))
    };
    (count("rx"), count("tx"))
}

/// MTU of a link in a netns.
fn mtu_in(netns: &Path, device: &str) -> u64 {
    let out = netns_command(netns, "ip")
        .args(["-j", "link", "show", "dev", device])
        .output()
        .expect("run ip");
    let link: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{device} in {}: {e}", netns.display()));
    link[0]["mtu"].as_u64().expect("mtu")
}

#[test]
fn vxlan_overlay_carries_every_cross_node_flow() {
    if !require_privileges("vxlan_overlay_carries_every_cross_node_flow") {
        return;
    }
    let started = Instant::now();
    let lab = Lab::up(&cluster(&lab_name("vxlan"), "vxlan"), &options()).expect("up");
    eprintln!("vxlan lab up in {:.2?}", started.elapsed());
    assert_eq!(lab.fabric.mode, FabricMode::Vxlan);

    check_tunnel_config(&lab);
    check_mtus(&lab);

    // Every pod reaches every pod, TCP and UDP, both families, and each family's cross-node
    // flows went through that family's VXLAN devices: every connected cross-node probe sent at
    // least one packet each way (a SYN and a SYN-ACK, a datagram and its answer), so each node's
    // device sent and received at least one packet per cross-node probe of its family.
    let nodes = [
        lab.node("node-a").expect("a"),
        lab.node("node-b").expect("b"),
    ];
    let device = |node: &NodeState, family: Family| {
        let vxlan = node.vxlan.as_ref().expect("vxlan mode");
        match family {
            Family::V4 => vxlan.v4.device.clone(),
            Family::V6 => vxlan.v6.device.clone(),
        }
    };
    let counters = |family: Family| -> Vec<(u64, u64)> {
        nodes
            .iter()
            .map(|n| packets(n, &device(n, family)))
            .collect()
    };
    let before = [counters(Family::V4), counters(Family::V6)];
    let started = Instant::now();
    let results = probe(&lab, &ProbeSpec::default()).expect("probe");
    eprintln!(
        "{} probes in {:.2?}",
        results.results.len(),
        started.elapsed()
    );
    let after = [counters(Family::V4), counters(Family::V6)];
    assert_eq!(results.results.len(), 4 * 4 * 2 * 2);
    let pods: Vec<String> = lab.pods.iter().map(|p| p.key()).collect();
    for (key, table) in results.tables() {
        let comparison = TruthTable::new(&pods, &pods, true).compare(&table);
        assert!(comparison.is_match(), "{key}\n{comparison}");
    }
    for (i, family) in [Family::V4, Family::V6].into_iter().enumerate() {
        let cross_node = results
            .results
            .iter()
            .filter(|r| r.family == family && r.connected)
            .filter(|r| {
                let from = lab.pod_by_key(&r.from).expect("client");
                let to = lab.pod_by_key(&r.to).expect("server");
                from.node != to.node
            })
            .count() as u64;
        assert_eq!(
            cross_node,
            2 * 2 * 2 * 2,
            "{family}: half the pairs cross nodes"
        );
        for (n, node) in nodes.iter().enumerate() {
            let (rx, tx) = (
                after[i][n].0 - before[i][n].0,
                after[i][n].1 - before[i][n].1,
            );
            let dev = device(node, family);
            assert!(
                rx >= cross_node && tx >= cross_node,
                "{family}: {dev} on {} moved rx {rx} tx {tx} packets for {cross_node} \
                 cross-node probes",
                node.name
            );
        }
    }

    // The tunnel is the only way across: without the FDB entry for node-b's IPv4 VTEP, node-a's
    // pods no longer reach node-b's pods over IPv4 (IPv6 is another device), and with it back
    // they do again.
    let (a, b) = (nodes[0], nodes[1]);
    let b_vtep = &b.vxlan.as_ref().expect("vxlan").v4;
    let a_dev = device(a, Family::V4);
    let (xa, xb) = (
        lab.pod("x", "a").expect("x/a"),
        lab.pod("x", "b").expect("x/b"),
    );
    let short = Duration::from_millis(300);
    let fdb = |verb: &str| {
        let remote = b.ip_v4.to_string();
        run_on(
            a,
            "bridge",
            &[
                "fdb",
                verb,
                &b_vtep.mac,
                "dev",
                &a_dev,
                "dst",
                &remote,
                "self",
                "permanent",
            ],
        );
    };
    fdb("del");
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        assert!(
            !connect(&lab, xa, xb.ip(Family::V4), 80, protocol, short),
            "x/a -> x/b {protocol} IPv4 connected without node-a's FDB entry for node-b"
        );
        assert!(
            connect(
                &lab,
                xa,
                xb.ip(Family::V6),
                80,
                protocol,
                Duration::from_secs(1)
            ),
            "x/a -> x/b {protocol} IPv6 goes through the other device"
        );
    }
    fdb("add");
    assert!(
        connect(
            &lab,
            xa,
            xb.ip(Family::V4),
            80,
            Protocol::Tcp,
            Duration::from_secs(1)
        ),
        "x/a -> x/b TCP IPv4 with the FDB entry back"
    );

    check_full_size_segments(&lab);

    // A pod added to the running lab gets the overlay's MTU and is reached through the tunnel.
    let mut lab = lab;
    let added = lab
        .add_pod(
            PodSpec {
                namespace: "x".into(),
                name: "c".into(),
                node: "node-b".into(),
                labels: [("pod".to_owned(), "c".to_owned())].into(),
                ports: vec![PortSpec {
                    name: None,
                    port: 80,
                    protocol: Protocol::Tcp,
                }],
            },
            &AddPodOptions::default(),
        )
        .expect("add x/c");
    assert_eq!(mtu_in(&added.netns_path(), "eth0"), 1430);
    let xa = lab.pod("x", "a").expect("x/a");
    for family in [Family::V4, Family::V6] {
        assert!(
            connect(
                &lab,
                xa,
                added.ip(family),
                80,
                Protocol::Tcp,
                Duration::from_secs(1)
            ),
            "x/a -> added x/c TCP/80 {family}"
        );
    }

    let started = Instant::now();
    lab.down().expect("down");
    eprintln!("vxlan lab down in {:.2?}", started.elapsed());
}

/// One family's VXLAN device of a node and what it should know of the other node's.
struct Expected {
    what: String,
    device: String,
    mtu: u32,
    mac: String,
    vtep_ip: String,
    /// `-4` or `-6`: `ip route` shows IPv4 routes unless told otherwise.
    family: &'static str,
    /// `local` or `local6` in `ip -d -j link`'s `info_data`.
    local_key: &'static str,
    local: String,
    peer_cidr: String,
    peer_vtep_ip: String,
    peer_mac: String,
    peer_fabric_ip: String,
}

fn expected(node: &NodeState, other: &NodeState) -> [Expected; 2] {
    let (vxlan, peer) = (
        node.vxlan.as_ref().expect("vxlan mode plans VTEPs"),
        other.vxlan.as_ref().expect("vxlan mode plans VTEPs"),
    );
    [
        Expected {
            what: format!("{} on {}", vxlan.v4.device, node.name),
            device: vxlan.v4.device.clone(),
            mtu: vxlan.v4.mtu,
            mac: vxlan.v4.mac.clone(),
            vtep_ip: vxlan.v4.ip.to_string(),
            family: "-4",
            local_key: "local",
            local: node.ip_v4.to_string(),
            peer_cidr: other.pod_cidr_v4.to_string(),
            peer_vtep_ip: peer.v4.ip.to_string(),
            peer_mac: peer.v4.mac.clone(),
            peer_fabric_ip: other.ip_v4.to_string(),
        },
        Expected {
            what: format!("{} on {}", vxlan.v6.device, node.name),
            device: vxlan.v6.device.clone(),
            mtu: vxlan.v6.mtu,
            mac: vxlan.v6.mac.clone(),
            vtep_ip: vxlan.v6.ip.to_string(),
            family: "-6",
            local_key: "local6",
            local: node.ip_v6.to_string(),
            peer_cidr: other.pod_cidr_v6.to_string(),
            peer_vtep_ip: peer.v6.ip.to_string(),
            peer_mac: peer.v6.mac.clone(),
            peer_fabric_ip: other.ip_v6.to_string(),
        },
    ]
}

/// Each node has a VXLAN device per family as flannel makes them, and for the other node a
/// route via its VTEP (no host-gw route), a permanent neighbour entry and an FDB entry.
fn check_tunnel_config(lab: &Lab) {
    for node in &lab.nodes {
        let other = lab
            .nodes
            .iter()
            .find(|n| n.name != node.name)
            .expect("two nodes");
        for e in expected(node, other) {
            let what = &e.what;
            let link = &json_on(node, "ip", &["-d", "link", "show", "dev", &e.device])[0];
            let info = &link["linkinfo"]["info_data"];
            assert_eq!(link["linkinfo"]["info_kind"], "vxlan", "{what}: {link}");
            assert_eq!(info["id"], 1, "{what}: VNI");
            assert_eq!(info["port"], 8472, "{what}: dstport");
            assert_eq!(info["learning"], false, "{what}: nolearning");
            assert_eq!(info[e.local_key].as_str(), Some(e.local.as_str()), "{what}");
            assert_eq!(info["link"], "eth0", "{what}: lower device");
            assert_eq!(link["mtu"].as_u64(), Some(u64::from(e.mtu)), "{what}: mtu");
            assert_eq!(link["address"].as_str(), Some(e.mac.as_str()), "{what}");

            let addrs = json_on(node, "ip", &["addr", "show", "dev", &e.device]);
            let has_vtep_ip = addrs[0]["addr_info"]
                .as_array()
                .expect("addr_info")
                .iter()
                .any(|a| a["local"].as_str() == Some(e.vtep_ip.as_str()));
            assert!(has_vtep_ip, "{what}: VTEP address {}: {addrs}", e.vtep_ip);

            let routes = json_on(
                node,
                "ip",
                &[e.family, "route", "show", "exact", &e.peer_cidr],
            );
            assert_eq!(routes.as_array().map(Vec::len), Some(1), "{what}: {routes}");
            let route = &routes[0];
            let via = route["gateway"].as_str();
            assert_eq!(via, Some(e.peer_vtep_ip.as_str()), "{what}: {route}");
            assert_ne!(via, Some(e.peer_fabric_ip.as_str()), "{what}: host-gw");
            assert_eq!(route["dev"].as_str(), Some(e.device.as_str()), "{what}");
            let flags = route["flags"].as_array().expect("route flags");
            assert!(flags.iter().any(|f| f == "onlink"), "{what}: {route}");

            let neigh = json_on(
                node,
                "ip",
                &["neigh", "show", "dev", &e.device, &e.peer_vtep_ip],
            );
            assert_eq!(
                neigh[0]["lladdr"].as_str(),
                Some(e.peer_mac.as_str()),
                "{what}"
            );
            assert_eq!(neigh[0]["state"][0], "PERMANENT", "{what}: {neigh}");

            let fdb = json_on(node, "bridge", &["fdb", "show", "dev", &e.device]);
            let entry = fdb
                .as_array()
                .expect("fdb")
                .iter()
                .find(|f| f["mac"].as_str() == Some(e.peer_mac.as_str()))
                .unwrap_or_else(|| panic!("{what}: no FDB entry for {}: {fdb}", e.peer_mac));
            assert_eq!(
                entry["dst"].as_str(),
                Some(e.peer_fabric_ip.as_str()),
                "{what}"
            );
            assert_eq!(entry["state"], "permanent", "{what}: {entry}");
        }
    }
}

/// Pods' `eth0`, their host-side veths and `cni0` have the pods' MTU, 1430 (fits both tunnels).
fn check_mtus(lab: &Lab) {
    for pod in &lab.pods {
        let node = lab.node_of(pod);
        assert_eq!(node.pod_mtu, 1430);
        assert_eq!(mtu_in(&pod.netns_path(), "eth0"), 1430, "{}", pod.key());
        assert_eq!(
            mtu_in(&node.netns_path(), &pod.host_veth),
            1430,
            "{} on {}",
            pod.host_veth,
            node.name
        );
    }
    let bridged = lab.node("node-b").expect("node-b");
    assert_eq!(mtu_in(&bridged.netns_path(), "cni0"), 1430);
    for node in &lab.nodes {
        assert_eq!(mtu_in(&node.netns_path(), "eth0"), 1500, "{}", node.name);
    }
}

/// A bulk TCP transfer across nodes in each family, with full-size segments both ways: with the
/// pods' MTU below both tunnels' no segment is too big for the tunnel (which would need PMTU
/// discovery to get through).
fn check_full_size_segments(lab: &Lab) {
    const BYTES: usize = 2 << 20;
    let (client, server) = (
        lab.pod("x", "a").expect("x/a"),
        lab.pod("y", "b").expect("y/b"),
    );
    for family in [Family::V4, Family::V6] {
        let bind: SocketAddr = (server.ip(family), 0).into();
        let listener = run_in_netns(&server.netns_path(), move || TcpListener::bind(bind))
            .unwrap_or_else(|e| panic!("{family}: bind {bind} in the server's netns: {e}"));
        let to = listener.local_addr().expect("listener address");
        let echo = thread::spawn(move || {
            let (mut conn, _) = listener.accept().expect("accept");
            conn.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            let mut data = Vec::new();
            conn.read_to_end(&mut data).expect("read");
            conn.write_all(&data).expect("echo back");
            data.len()
        });
        let mut conn = run_in_netns(&client.netns_path(), move || {
            TcpStream::connect_timeout(&to, Duration::from_secs(2))
        })
        .unwrap_or_else(|e| panic!("{family}: connect to {to} from the client's netns: {e}"));
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let payload: Vec<u8> = (0..BYTES).map(|i| (i % 251) as u8).collect();
        conn.write_all(&payload).expect("send");
        conn.shutdown(Shutdown::Write).expect("shutdown");
        let mut back = Vec::new();
        conn.read_to_end(&mut back)
            .unwrap_or_else(|e| panic!("{family}: read echo from {to}: {e}"));
        assert_eq!(echo.join().expect("echo thread"), BYTES, "{family}");
        assert!(back == payload, "{family}: echo differs");
    }
}

#[test]
fn host_gw_lab_has_no_tunnel() {
    if !require_privileges("host_gw_lab_has_no_tunnel") {
        return;
    }
    let lab = Lab::up(&cluster(&lab_name("hostgw"), "host-gw"), &options()).expect("up");
    assert_eq!(lab.fabric.mode, FabricMode::HostGw);
    let a = lab.node("node-a").expect("node-a");
    let b = lab.node("node-b").expect("node-b");
    let links = json_on(a, "ip", &["-d", "link", "show"]);
    assert!(
        !links
            .as_array()
            .expect("links")
            .iter()
            .any(|l| l["linkinfo"]["info_kind"] == "vxlan"),
        "a host-gw node has no VXLAN device: {links}"
    );
    let cidr = b.pod_cidr_v4.to_string();
    let routes = json_on(a, "ip", &["route", "show", "exact", &cidr]);
    assert_eq!(
        routes[0]["gateway"].as_str(),
        Some(b.ip_v4.to_string().as_str())
    );
    assert_eq!(routes[0]["dev"], "eth0");
    let pod = lab.pod("x", "a").expect("x/a");
    assert_eq!(mtu_in(&pod.netns_path(), "eth0"), 1500);
    let results = probe(&lab, &ProbeSpec::default()).expect("probe");
    assert!(results.all_connected(), "{}", results.render());
}
