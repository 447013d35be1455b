//! Privileged tests of the control-plane lab: etcd, kube-apiserver, kube-controller-manager,
//! kube-proxy (iptables and nftables) and CoreDNS, all the upstream binaries built by
//! `cargo xtask setup`. Without root or without the tools they print a loud SKIPPED line (with
//! `CI=true` they panic instead).

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use netpol_lab::{
    AddPodOptions, ClusterSpec, Family, Lab, PodSpec, PortSpec, ProbeSpec, Protocol, UpOptions,
    Via,
    controlplane::{ControlPlaneSpec, ProxyMode},
    probe, require_privileges,
    tools::{CONTROL_PLANE_TOOLS, require_tools},
};
use serde_json::Value;

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
  - {{namespace: y, name: a, node: node-b, labels: {{pod: a}}, ports: {ports}}}
"#
    );
    ClusterSpec::from_yaml(&yaml).expect("test cluster is valid")
}

fn up(test: &str, tag: &str, mode: ProxyMode) -> Option<Lab> {
    if !require_privileges(test) || !require_tools(test, CONTROL_PLANE_TOOLS) {
        return None;
    }
    let name = format!("cp-{tag}-{}", std::process::id());
    let started = Instant::now();
    let lab = Lab::up(
        &cluster(&name),
        &UpOptions {
            server_exe: Some(PathBuf::from(env!("CARGO_BIN_EXE_netpol-lab"))),
            control_plane: Some(ControlPlaneSpec {
                proxy_mode: mode,
                ..ControlPlaneSpec::default()
            }),
            ..UpOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{test}: lab up: {e}"));
    eprintln!("{test}: control-plane lab up in {:.1?}", started.elapsed());
    Some(lab)
}

fn kubectl_json(lab: &Lab, args: &[&str]) -> Value {
    let cp = lab.control_plane.as_ref().expect("control plane");
    cp.kubectl()
        .expect("kubectl")
        .json(args)
        .unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"))
}

fn all_connected(lab: &Lab, via: Via) {
    let results = probe(
        lab,
        &ProbeSpec {
            via,
            ..ProbeSpec::default()
        },
    )
    .expect("probe");
    assert!(
        results.all_connected(),
        "via {via:?}:\n{}",
        results.render()
    );
}

#[test]
fn control_plane_lab_is_a_real_cluster() {
    let Some(mut lab) = up(
        "control_plane_lab_is_a_real_cluster",
        "ipt",
        ProxyMode::Iptables,
    ) else {
        return;
    };

    // Nodes registered with their CIDRs and addresses.
    let nodes = kubectl_json(&lab, &["get", "nodes", "-o", "json"]);
    for node in &lab.nodes {
        let object = nodes["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["metadata"]["name"] == node.name.as_str())
            .unwrap_or_else(|| panic!("node {} not registered: {nodes}", node.name));
        assert_eq!(
            object["spec"]["podCIDRs"],
            serde_json::json!([node.pod_cidr_v4.to_string(), node.pod_cidr_v6.to_string()])
        );
        let addresses = object["status"]["addresses"].to_string();
        assert!(addresses.contains(&node.ip_v4.to_string()), "{addresses}");
        assert!(addresses.contains(&node.ip_v6.to_string()), "{addresses}");
    }

    // Pods Running and Ready with the lab's addresses, as a kubelet reports them.
    let pods = kubectl_json(&lab, &["get", "pods", "--all-namespaces", "-o", "json"]);
    for pod in lab.pods.iter().chain(&lab.system_pods) {
        let object = pods["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| {
                p["metadata"]["namespace"] == pod.namespace.as_str()
                    && p["metadata"]["name"] == pod.name.as_str()
            })
            .unwrap_or_else(|| panic!("pod {} missing", pod.key()));
        assert_eq!(object["status"]["phase"], "Running", "{}", pod.key());
        assert_eq!(
            object["status"]["podIPs"],
            serde_json::json!([{ "ip": pod.ip_v4.to_string() }, { "ip": pod.ip_v6.to_string() }])
        );
        assert_eq!(object["spec"]["nodeName"], pod.node.as_str());
    }

    // Every model pod has a dual-stack ClusterIP Service, and kube-proxy leads there.
    for pod in &lab.pods {
        assert!(pod.service_ip(Family::V4).is_some(), "{}", pod.key());
        assert!(pod.service_ip(Family::V6).is_some(), "{}", pod.key());
    }
    all_connected(&lab, Via::Pod);
    all_connected(&lab, Via::Service);

    // Cluster DNS through the kube-dns Service (resolv.conf bound by `ip netns exec`).
    let client = lab.pod("y", "a").unwrap().clone();
    let target = lab.pod("x", "b").unwrap().clone();
    let out = Command::new("ip")
        .args(["netns", "exec", &client.netns, "getent", "ahosts"])
        .arg("s-x-b.x.svc.cluster.local")
        .output()
        .expect("getent");
    let text = String::from_utf8_lossy(&out.stdout);
    for ip in &target.service_ips {
        assert!(text.contains(&ip.to_string()), "getent: {text}");
    }
    // The search path resolves short names, as in a real pod.
    let out = Command::new("ip")
        .args(["netns", "exec", &client.netns, "getent", "hosts", "s-x-b.x"])
        .output()
        .expect("getent");
    assert!(out.status.success(), "short name: {out:?}");

    // A pod added later: object first, then Running with its IPs; its Service works.
    let ports = vec![
        PortSpec {
            name: Some("serve-80-tcp".into()),
            port: 80,
            protocol: Protocol::Tcp,
        },
        PortSpec {
            name: Some("serve-80-udp".into()),
            port: 80,
            protocol: Protocol::Udp,
        },
    ];
    let added = lab
        .add_pod(
            PodSpec {
                namespace: "y".into(),
                name: "c".into(),
                node: "node-a".into(),
                labels: BTreeMap::from([("pod".into(), "c".into())]),
                ports,
            },
            &AddPodOptions::default(),
        )
        .expect("add pod");
    let pod = kubectl_json(&lab, &["get", "pod", "c", "-n", "y", "-o", "json"]);
    assert_eq!(pod["status"]["phase"], "Running");
    assert_eq!(pod["status"]["podIP"], added.ip_v4.to_string());
    assert_eq!(added.service_ips.len(), 2, "{added:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let via_service = |lab: &Lab| {
        probe(
            lab,
            &ProbeSpec {
                via: Via::Service,
                to: Some(vec!["y/c".into()]),
                protocols: vec![Protocol::Tcp],
                ..ProbeSpec::default()
            },
        )
        .expect("probe")
    };
    loop {
        let r = via_service(&lab);
        if r.all_connected() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "new pod's Service never worked:\n{}",
            r.render()
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // Labels change through the API.
    lab.set_pod_labels(
        "y",
        "c",
        BTreeMap::from([("pod".into(), "c".into()), ("tier".into(), "db".into())]),
    )
    .expect("relabel");
    let pod = kubectl_json(&lab, &["get", "pod", "c", "-n", "y", "-o", "json"]);
    assert_eq!(pod["metadata"]["labels"]["tier"], "db");
    lab.set_namespace_labels("y", BTreeMap::from([("team".into(), "blue".into())]))
        .expect("relabel namespace");
    let ns = kubectl_json(&lab, &["get", "namespace", "y", "-o", "json"]);
    assert_eq!(ns["metadata"]["labels"]["team"], "blue");
    assert!(ns["metadata"]["labels"].get("ns").is_none(), "{ns}");
    assert_eq!(ns["metadata"]["labels"]["kubernetes.io/metadata.name"], "y");

    // Removal: the Pod and its Service go from the API.
    lab.remove_pod("y", "c").expect("remove pod");
    let pods = kubectl_json(&lab, &["get", "pods", "-n", "y", "-o", "json"]);
    assert!(
        !pods["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["metadata"]["name"] == "c"),
        "{pods}"
    );
    let svcs = kubectl_json(&lab, &["get", "services", "-n", "y", "-o", "json"]);
    assert!(!svcs.to_string().contains("s-y-c"), "{svcs}");
    lab.down().expect("down");
}

#[test]
fn kube_proxy_nftables_mode_serves_cluster_ips() {
    let Some(lab) = up(
        "kube_proxy_nftables_mode_serves_cluster_ips",
        "nft",
        ProxyMode::Nftables,
    ) else {
        return;
    };
    all_connected(&lab, Via::Service);
    // It really is nftables: kube-proxy's table exists in every node's netns.
    for node in &lab.nodes {
        let out = netpol_lab::netns_command(&node.netns_path(), "nft")
            .args(["list", "table", "ip", "kube-proxy"])
            .output()
            .expect("nft");
        assert!(
            out.status.success(),
            "{}: {}",
            node.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    lab.down().expect("down");
}

/// Whether this kernel has the nftables `queue` expression kube-network-policies needs: a rule
/// with it in a scratch netns.
fn kernel_has_nft_queue() -> bool {
    let ns = format!("npq-{}", std::process::id());
    let ok = Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .is_ok_and(|s| s.success())
        && [
            "add table inet t",
            "add chain inet t c { type filter hook forward priority 0; }",
            "add rule inet t c queue num 100",
        ]
        .iter()
        .all(|rule| {
            Command::new("ip")
                .args(["netns", "exec", &ns, "nft", rule])
                .output()
                .is_ok_and(|o| o.status.success())
        });
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    ok
}

#[test]
fn the_reference_peer_enforces_or_says_why_not() {
    let test = "the_reference_peer_enforces_or_says_why_not";
    if !require_privileges(test) || !require_tools(test, &["kube-network-policies"]) {
        return;
    }
    let Some(lab) = up(test, "peer", ProxyMode::Iptables) else {
        return;
    };
    let supported = kernel_has_nft_queue();
    match netpol_lab::peer::start_peer(&lab) {
        Ok(_peer) => {
            assert!(supported, "the peer started although nft queue is missing");
            // A default-deny ingress policy in x: x/a becomes unreachable.
            let cp = lab.control_plane.as_ref().unwrap();
            cp.kubectl()
                .unwrap()
                .apply(&[serde_json::json!({
                    "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                    "metadata": { "name": "deny", "namespace": "x" },
                    "spec": { "podSelector": {}, "policyTypes": ["Ingress"] },
                })])
                .expect("apply");
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let r = probe(
                    &lab,
                    &ProbeSpec {
                        from: Some(vec!["y/a".into()]),
                        to: Some(vec!["x/a".into()]),
                        protocols: vec![Protocol::Tcp],
                        ..ProbeSpec::default()
                    },
                )
                .unwrap();
                if r.results.iter().all(|c| !c.connected) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "peer never denied:\n{}",
                    r.render()
                );
            }
        }
        Err(netpol_lab::peer::PeerError::Unsupported { reason, .. }) => {
            assert!(!supported, "nft queue works here, yet: {reason}");
            eprintln!("{test}: the peer cannot enforce on this kernel: {reason}");
        }
        Err(e) => panic!("{test}: {e}"),
    }
    lab.down().expect("down");
}
