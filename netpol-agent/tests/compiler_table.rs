//! Table tests of the policy compiler: every rule of NetworkPolicy
//! semantics, each checked with both the reference evaluator and the
//! datapath simulator over the compiled maps (they must agree), plus the
//! shape of the compiled maps (ids, sizes, flags) and of diffs.

use netpol_agent::{
    compiler::{Change, Compiled, Compiler, MapUpdate, NodeInfo, compile, diff, reference, sim},
    convert,
    model::{Cluster, ObjectRef, build::*},
};
use netpol_common::{
    DIR_EGRESS, DIR_INGRESS, EP_F_AUDIT, EP_F_EGRESS_ISOLATED, EP_F_INGRESS_ISOLATED, IDENTITY_ANY,
    PEER_F_HOST, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
};

// ---------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------

fn nodes() -> Vec<NodeInfo> {
    vec![
        NodeInfo::new("n1", ["192.168.0.1", "fd00:ff::1"]),
        NodeInfo::new("n2", ["192.168.0.2", "fd00:ff::2"]),
    ]
}

fn compile_all(cluster: &Cluster) -> Vec<Compiled> {
    nodes().iter().map(|n| compile(cluster, n)).collect()
}

/// Whether a new connection is allowed; the reference evaluator and the
/// simulator over compiled maps must agree.
fn allowed(cluster: &Cluster, src: &str, dst: &str, proto: u8, port: u16) -> bool {
    let (s, d) = (src.parse().unwrap(), dst.parse().unwrap());
    let want = reference::allowed(cluster, &nodes(), s, d, proto, port);
    let got = sim::allowed(&compile_all(cluster), s, d, proto, port);
    assert_eq!(
        got, want,
        "{src} -> {dst} proto {proto} port {port}: simulator {got}, reference {want}"
    );
    want
}

fn tcp_ok(cluster: &Cluster, src: &str, dst: &str, port: u16) -> bool {
    allowed(cluster, src, dst, PROTO_TCP, port)
}

fn n1(cluster: &Cluster) -> Compiled {
    compile(cluster, &nodes()[0])
}

/// Namespaces x and y; pods x/a (10.0.1.1, n1), x/b (10.0.1.2, n2) and
/// y/c (10.0.2.1, n1), labelled pod=<name>.
fn base() -> Cluster {
    cluster()
        .namespace(namespace("x").label("team", "red"))
        .namespace(namespace("y").label("team", "blue"))
        .pod(
            pod("x", "a")
                .labels([("pod", "a")])
                .ip("10.0.1.1")
                .node("n1"),
        )
        .pod(
            pod("x", "b")
                .labels([("pod", "b")])
                .ip("10.0.1.2")
                .node("n2"),
        )
        .pod(
            pod("y", "c")
                .labels([("pod", "c")])
                .ip("10.0.2.1")
                .node("n1"),
        )
}

const A: &str = "10.0.1.1";
const B: &str = "10.0.1.2";
const C: &str = "10.0.2.1";
const OUTSIDE: &str = "203.0.113.9";

fn k8s_policy(json: serde_json::Value) -> k8s_openapi::api::networking::v1::NetworkPolicy {
    serde_json::from_value(json).expect("valid NetworkPolicy JSON")
}

// ---------------------------------------------------------------------------
// Isolation and peers
// ---------------------------------------------------------------------------

#[test]
fn without_policies_everything_is_allowed() {
    let c = base();
    assert!(tcp_ok(&c, A, B, 80));
    assert!(tcp_ok(&c, C, A, 80));
    assert!(tcp_ok(&c, OUTSIDE, A, 80));
    assert!(allowed(&c, A, B, PROTO_ICMP, 0));
}

#[test]
fn default_deny_ingress_isolates_only_the_selected_pods_ingress() {
    let c = base().policy(policy("x", "deny-all").select(all()).deny_ingress());
    assert!(!tcp_ok(&c, C, A, 80), "x/a is isolated for ingress");
    assert!(!tcp_ok(&c, A, B, 80), "same namespace too");
    assert!(!tcp_ok(&c, OUTSIDE, B, 80));
    assert!(
        tcp_ok(&c, A, C, 80),
        "egress of x/a is not isolated, y/c not selected"
    );
    assert!(
        tcp_ok(&c, "192.168.0.1", A, 80),
        "the pod's own node may always reach it (probes)"
    );
    assert!(
        !tcp_ok(&c, "192.168.0.2", A, 80),
        "another node's address is an ordinary peer"
    );

    let n1 = n1(&c);
    let a = ObjectRef::new("x", "a");
    assert_eq!(policy_flags(&n1.maps.endpoints[&a]), EP_F_INGRESS_ISOLATED);
    // The endpoint carries the pod's own address: what the datapath lets it
    // send from (anti-spoofing).
    let ep = n1.maps.endpoints[&a];
    assert_ne!(ep.flags & netpol_common::EP_F_HAS_V4, 0);
    assert_eq!(std::net::Ipv4Addr::from(ep.addr_v4).to_string(), A);
    assert_eq!(
        n1.isolating_policies(&a, DIR_INGRESS),
        &[ObjectRef::new("x", "deny-all")]
    );
    assert!(n1.isolating_policies(&a, DIR_EGRESS).is_empty());
    assert!(
        n1.maps.policy.is_empty(),
        "a policy without rules compiles to no entries"
    );
}

#[test]
fn default_deny_egress() {
    let c = base().policy(policy("x", "deny-egress").select(all()).deny_egress());
    assert!(!tcp_ok(&c, A, C, 80));
    assert!(!tcp_ok(&c, A, OUTSIDE, 443));
    assert!(tcp_ok(&c, C, A, 80), "ingress of x/a is open");
}

#[test]
fn allow_from_pod_selector_is_scoped_to_the_policy_namespace() {
    let c = base()
        .pod(
            pod("y", "a2")
                .labels([("pod", "a")])
                .ip("10.0.2.2")
                .node("n2"),
        )
        .policy(
            policy("x", "allow-from-a")
                .select(labels([("pod", "b")]))
                .ingress(allow().from(pods(labels([("pod", "a")])))),
        );
    assert!(tcp_ok(&c, A, B, 80));
    assert!(
        !tcp_ok(&c, "10.0.2.2", B, 80),
        "pod=a in namespace y is not selected"
    );
    assert!(!tcp_ok(&c, C, B, 80));
}

#[test]
fn allow_from_namespace_selector() {
    let c = base().policy(
        policy("x", "allow-blue")
            .select(all())
            .ingress(allow().from(namespaces(labels([("team", "blue")])))),
    );
    assert!(tcp_ok(&c, C, A, 80));
    assert!(!tcp_ok(&c, B, A, 80), "own namespace is red");
    assert!(!tcp_ok(&c, OUTSIDE, A, 80));
}

#[test]
fn pod_and_namespace_selector_in_one_peer_are_anded() {
    let c =
        base()
            .pod(
                pod("y", "d")
                    .labels([("pod", "d")])
                    .ip("10.0.2.4")
                    .node("n2"),
            )
            .policy(policy("x", "and").select(all()).ingress(
                allow().from(pods_in(labels([("team", "blue")]), labels([("pod", "c")]))),
            ));
    assert!(tcp_ok(&c, C, A, 80));
    assert!(!tcp_ok(&c, "10.0.2.4", A, 80), "blue namespace but pod=d");
    assert!(!tcp_ok(&c, B, A, 80), "red namespace");
}

#[test]
fn several_peers_are_ored() {
    let c = base().policy(
        policy("x", "or").select(labels([("pod", "a")])).ingress(
            allow()
                .from(pods(labels([("pod", "b")])))
                .from(namespaces(labels([("team", "blue")])))
                .from(ip_block("203.0.113.0/24")),
        ),
    );
    assert!(tcp_ok(&c, B, A, 80));
    assert!(tcp_ok(&c, C, A, 80));
    assert!(tcp_ok(&c, OUTSIDE, A, 80));
    assert!(!tcp_ok(&c, "198.51.100.1", A, 80));
}

#[test]
fn several_policies_are_a_union() {
    let c = base()
        .policy(
            policy("x", "from-b")
                .select(labels([("pod", "a")]))
                .ingress(allow().from(pods(labels([("pod", "b")]))).port(tcp(80))),
        )
        .policy(
            policy("x", "from-c")
                .select(labels([("pod", "a")]))
                .ingress(
                    allow()
                        .from(namespaces(labels([("team", "blue")])))
                        .port(tcp(443)),
                ),
        );
    assert!(tcp_ok(&c, B, A, 80));
    assert!(!tcp_ok(&c, B, A, 443));
    assert!(tcp_ok(&c, C, A, 443));
    assert!(!tcp_ok(&c, C, A, 80));
    let a = ObjectRef::new("x", "a");
    assert_eq!(n1(&c).isolating_policies(&a, DIR_INGRESS).len(), 2);
}

#[test]
fn ip_block_with_except_applies_to_pod_ips_too() {
    let c = base().policy(
        policy("x", "cidr")
            .select(labels([("pod", "a")]))
            .ingress(allow().from(block(cidr("10.0.0.0/16").except("10.0.2.0/24")))),
    );
    assert!(tcp_ok(&c, B, A, 80), "pod IP inside the cidr");
    assert!(!tcp_ok(&c, C, A, 80), "pod IP inside the except");
    assert!(
        tcp_ok(&c, "10.0.9.9", A, 80),
        "non-pod address inside the cidr"
    );
    assert!(
        !tcp_ok(&c, "10.0.2.200", A, 80),
        "non-pod address inside the except"
    );
    assert!(!tcp_ok(&c, "10.1.0.1", A, 80));
}

#[test]
fn a_rule_without_peers_allows_every_address_with_identity_any() {
    let c = base().policy(
        policy("x", "port-80")
            .select(labels([("pod", "a")]))
            .ingress(allow().port(tcp(80))),
    );
    assert!(tcp_ok(&c, OUTSIDE, A, 80));
    assert!(tcp_ok(&c, C, A, 80));
    assert!(!tcp_ok(&c, C, A, 81));
    let n1 = n1(&c);
    assert_eq!(n1.maps.policy.len(), 1);
    assert!(
        n1.maps
            .policy
            .keys()
            .all(|(k, _)| k.identity == IDENTITY_ANY)
    );
}

#[test]
fn an_empty_rule_allows_everything_but_isolation_stays_per_direction() {
    let c = base().policy(
        policy("x", "allow-all")
            .select(all())
            .ingress(allow())
            .deny_egress(),
    );
    assert!(tcp_ok(&c, OUTSIDE, A, 1234));
    assert!(allowed(&c, OUTSIDE, A, PROTO_ICMP, 0));
    assert!(!tcp_ok(&c, A, C, 80), "egress denied");
}

// ---------------------------------------------------------------------------
// Policy types
// ---------------------------------------------------------------------------

#[test]
fn policy_types_default_to_ingress_plus_egress_iff_egress_rules() {
    let without_egress = convert::network_policy(&k8s_policy(serde_json::json!({
        "metadata": {"namespace": "x", "name": "p"},
        "spec": {"podSelector": {}, "ingress": [{}]}
    })))
    .unwrap();
    assert!(without_egress.errors.is_empty());
    assert!(without_egress.value.ingress.is_some());
    assert!(without_egress.value.egress.is_none());

    let with_egress = convert::network_policy(&k8s_policy(serde_json::json!({
        "metadata": {"namespace": "x", "name": "p"},
        "spec": {"podSelector": {}, "egress": [{"ports": [{"port": 53, "protocol": "UDP"}]}]}
    })))
    .unwrap()
    .value;
    assert_eq!(
        with_egress.ingress,
        Some(vec![]),
        "Ingress always: deny all ingress"
    );
    assert_eq!(with_egress.egress.as_ref().map(Vec::len), Some(1));

    let egress_only = convert::network_policy(&k8s_policy(serde_json::json!({
        "metadata": {"namespace": "x", "name": "p"},
        "spec": {"podSelector": {}, "policyTypes": ["Egress"], "ingress": [{}]}
    })))
    .unwrap()
    .value;
    assert!(
        egress_only.ingress.is_none(),
        "ingress rules ignored without the type"
    );
    assert_eq!(egress_only.egress, Some(vec![]));

    let c = base().policy(egress_only);
    assert!(tcp_ok(&c, C, A, 80), "not isolated for ingress");
    assert!(!tcp_ok(&c, A, C, 80), "isolated for egress, no rules");
}

#[test]
fn egress_only_policy_with_rules() {
    let c = base().policy(
        policy("x", "egress-to-c")
            .select(labels([("pod", "a")]))
            .egress(
                allow()
                    .to(namespaces(labels([("team", "blue")])))
                    .port(tcp(5432)),
            ),
    );
    assert!(tcp_ok(&c, A, C, 5432));
    assert!(!tcp_ok(&c, A, C, 80));
    assert!(!tcp_ok(&c, A, B, 5432));
    assert!(tcp_ok(&c, B, A, 80), "ingress untouched");
    let a = ObjectRef::new("x", "a");
    assert_eq!(
        policy_flags(&n1(&c).maps.endpoints[&a]),
        EP_F_EGRESS_ISOLATED
    );
}

#[test]
fn a_connection_needs_source_egress_and_destination_ingress() {
    let c = base()
        .policy(
            policy("x", "a-egress")
                .select(labels([("pod", "a")]))
                .egress(allow().to(pods(labels([("pod", "b")])))),
        )
        .policy(
            policy("x", "b-ingress")
                .select(labels([("pod", "b")]))
                .ingress(allow().from(pods(labels([("pod", "nobody")])))),
        );
    assert!(
        !tcp_ok(&c, A, B, 80),
        "A's egress allows, B's ingress denies"
    );
}

// ---------------------------------------------------------------------------
// Ports
// ---------------------------------------------------------------------------

#[test]
fn egress_named_ports_resolve_per_peer_pod() {
    let c = base()
        .pod(
            pod("y", "web1")
                .labels([("app", "web")])
                .ip("10.0.2.11")
                .node("n2")
                .named_port("http", Protocol::Tcp, 8080),
        )
        .pod(
            pod("y", "web2")
                .labels([("app", "web")])
                .ip("10.0.2.12")
                .node("n2")
                .named_port("http", Protocol::Tcp, 9090),
        )
        .policy(
            policy("x", "to-web").select(labels([("pod", "a")])).egress(
                allow()
                    .to(namespaces(labels([("team", "blue")])))
                    .port(named(Protocol::Tcp, "http")),
            ),
        );
    assert!(tcp_ok(&c, A, "10.0.2.11", 8080));
    assert!(!tcp_ok(&c, A, "10.0.2.11", 9090), "web1's http is 8080");
    assert!(tcp_ok(&c, A, "10.0.2.12", 9090));
    assert!(!tcp_ok(&c, A, "10.0.2.12", 8080), "web2's http is 9090");
    assert!(!tcp_ok(&c, A, C, 8080), "c has no port named http");
    assert!(
        !allowed(&c, A, "10.0.2.11", PROTO_UDP, 8080),
        "protocol must match"
    );
}

#[test]
fn egress_named_ports_without_peers_resolve_on_every_pod() {
    let c =
        base()
            .pod(pod("y", "web1").ip("10.0.2.11").node("n2").named_port(
                "http",
                Protocol::Tcp,
                8080,
            ))
            .pod(pod("x", "web2").ip("10.0.1.12").node("n2").named_port(
                "http",
                Protocol::Tcp,
                9090,
            ))
            .policy(
                policy("x", "to-http")
                    .select(labels([("pod", "a")]))
                    .egress(allow().port(named(Protocol::Tcp, "http"))),
            );
    assert!(tcp_ok(&c, A, "10.0.2.11", 8080));
    assert!(tcp_ok(&c, A, "10.0.1.12", 9090));
    assert!(!tcp_ok(&c, A, "10.0.1.12", 8080));
    assert!(
        !tcp_ok(&c, A, OUTSIDE, 8080),
        "a non-pod address has no named ports"
    );
}

#[test]
fn ingress_named_ports_resolve_on_the_destination_pod() {
    let c = cluster()
        .namespace(namespace("x"))
        .pod(
            pod("x", "s1")
                .labels([("app", "srv")])
                .ip("10.0.1.1")
                .node("n1")
                .named_port("api", Protocol::Tcp, 8000),
        )
        .pod(
            pod("x", "s2")
                .labels([("app", "srv")])
                .ip("10.0.1.2")
                .node("n1")
                .named_port("api", Protocol::Tcp, 9000),
        )
        .pod(
            pod("x", "s3")
                .labels([("app", "srv")])
                .ip("10.0.1.3")
                .node("n1")
                .named_port("api", Protocol::Tcp, 8000),
        )
        .policy(
            policy("x", "api")
                .select(labels([("app", "srv")]))
                .ingress(allow().port(named(Protocol::Tcp, "api"))),
        );
    assert!(tcp_ok(&c, OUTSIDE, "10.0.1.1", 8000));
    assert!(!tcp_ok(&c, OUTSIDE, "10.0.1.1", 9000));
    assert!(tcp_ok(&c, OUTSIDE, "10.0.1.2", 9000));
    assert!(!tcp_ok(&c, OUTSIDE, "10.0.1.2", 8000));
    let n1 = n1(&c);
    let ep = |name: &str| n1.maps.endpoints[&ObjectRef::new("x", name)].policy_id;
    assert_eq!(
        ep("s1"),
        ep("s3"),
        "same policies, same resolution: one policy id"
    );
    assert_ne!(
        ep("s1"),
        ep("s2"),
        "different resolution: different policy ids"
    );
}

#[test]
fn end_port_ranges() {
    let c = base().policy(
        policy("x", "range")
            .select(labels([("pod", "a")]))
            .ingress(allow().port(port_range(Protocol::Tcp, 8000, 8080))),
    );
    for (port, want) in [
        (7999, false),
        (8000, true),
        (8063, true),
        (8064, true),
        (8080, true),
        (8081, false),
    ] {
        assert_eq!(tcp_ok(&c, B, A, port), want, "port {port}");
    }
    assert!(!allowed(&c, B, A, PROTO_UDP, 8000));
    assert_eq!(
        n1(&c).maps.policy.len(),
        3,
        "8000/26, 8064/28, 8080/32 as prefixes"
    );
}

#[test]
fn protocol_without_port_means_every_port_of_that_protocol() {
    let c = base().policy(
        policy("x", "udp")
            .select(labels([("pod", "a")]))
            .ingress(allow().port(any_port(Protocol::Udp))),
    );
    assert!(allowed(&c, B, A, PROTO_UDP, 1));
    assert!(allowed(&c, B, A, PROTO_UDP, 65535));
    assert!(!allowed(&c, B, A, PROTO_TCP, 53));
    assert!(!allowed(&c, B, A, PROTO_ICMP, 0));
}

#[test]
fn sctp_ports() {
    let c = base().policy(
        policy("x", "sctp")
            .select(labels([("pod", "a")]))
            .ingress(allow().port(sctp(3868))),
    );
    assert!(allowed(&c, B, A, PROTO_SCTP, 3868));
    assert!(!allowed(&c, B, A, PROTO_TCP, 3868));
    assert!(!allowed(&c, B, A, PROTO_SCTP, 3869));
}

#[test]
fn icmp_is_matched_only_by_rules_without_ports() {
    let with_ports = base().policy(
        policy("x", "tcp")
            .select(labels([("pod", "a")]))
            .ingress(allow().port(any_port(Protocol::Tcp))),
    );
    assert!(!allowed(&with_ports, B, A, PROTO_ICMP, 0));
    let without_ports = base().policy(
        policy("x", "from-b")
            .select(labels([("pod", "a")]))
            .ingress(allow().from(pods(labels([("pod", "b")])))),
    );
    assert!(allowed(&without_ports, B, A, PROTO_ICMP, 0));
    assert!(!allowed(&without_ports, C, A, PROTO_ICMP, 0));
}

// ---------------------------------------------------------------------------
// Addresses: IPv6, hostNetwork, finished pods, IP reuse, node addresses
// ---------------------------------------------------------------------------

#[test]
fn dual_stack_pod_addresses_are_classified_separately() {
    let c = cluster()
        .namespace(namespace("x"))
        .pod(
            pod("x", "a")
                .labels([("pod", "a")])
                .ip("10.0.1.1")
                .ip("fd00:1::1")
                .node("n1"),
        )
        .pod(
            pod("x", "b")
                .labels([("pod", "b")])
                .ip("10.0.1.2")
                .ip("fd00:1::2")
                .node("n2"),
        )
        .policy(
            policy("x", "v4-only")
                .select(labels([("pod", "a")]))
                .ingress(allow().from(ip_block("10.0.0.0/8"))),
        )
        .policy(
            policy("x", "b-by-label")
                .select(labels([("pod", "b")]))
                .ingress(allow().from(pods(labels([("pod", "a")])))),
        );
    assert!(tcp_ok(&c, "10.0.1.2", "10.0.1.1", 80));
    assert!(
        !tcp_ok(&c, "fd00:1::2", "fd00:1::1", 80),
        "the v6 address is outside the v4 block"
    );
    assert!(
        tcp_ok(&c, "fd00:1::1", "fd00:1::2", 80),
        "selectors match both families"
    );
    assert!(allowed(&c, "fd00:1::1", "fd00:1::2", PROTO_ICMPV6, 0));
    assert!(
        tcp_ok(&c, "fd00:ff::1", "fd00:1::1", 80),
        "node's v6 address is the host too"
    );
    let n1 = n1(&c);
    assert!(n1.maps.peers_v6.contains_key(&("::".parse().unwrap(), 0)));
    assert!(
        n1.maps
            .peers_v4
            .contains_key(&("0.0.0.0".parse().unwrap(), 0))
    );
}

#[test]
fn ipv6_ip_blocks() {
    let c = cluster()
        .namespace(namespace("x"))
        .pod(pod("x", "a").ip("fd00:1::1").node("n1"))
        .policy(
            policy("x", "v6")
                .select(all())
                .egress(allow().to(block(cidr("2001:db8::/32").except("2001:db8:bad::/48")))),
        );
    assert!(tcp_ok(&c, "fd00:1::1", "2001:db8::1", 443));
    assert!(!tcp_ok(&c, "fd00:1::1", "2001:db8:bad::1", 443));
    assert!(!tcp_ok(&c, "fd00:1::1", "2001:db9::1", 443));
}

#[test]
fn host_network_pods_take_no_part() {
    let c = base()
        .pod(
            pod("x", "agent")
                .labels([("pod", "a")])
                .ip("192.168.0.1")
                .node("n1")
                .host_network(),
        )
        .policy(
            policy("x", "deny")
                .select(all())
                .deny_ingress()
                .deny_egress(),
        );
    let n1 = n1(&c);
    assert!(
        !n1.maps
            .endpoints
            .contains_key(&ObjectRef::new("x", "agent")),
        "not an endpoint"
    );
    let host = n1.maps.peers_v4[&("192.168.0.1".parse().unwrap(), 32)];
    assert_eq!(
        host.flags, PEER_F_HOST,
        "its IP is the node's, not a pod IP"
    );
    assert!(
        tcp_ok(&c, "192.168.0.1", A, 80),
        "from the node to a local pod"
    );
    assert!(!tcp_ok(&c, "192.168.0.1", B, 80), "b runs on n2");
}

#[test]
fn pods_without_ip_or_node_are_not_endpoints() {
    let c = base()
        .pod(pod("x", "pending").labels([("pod", "a")]).node("n1"))
        .pod(pod("x", "unscheduled").labels([("pod", "a")]));
    let n1 = n1(&c);
    assert_eq!(n1.maps.endpoints.len(), 2, "x/a and y/c only");
}

#[test]
fn finished_pods_and_ip_reuse() {
    // The old pod finished; its IP now belongs to a new pod with other labels.
    let c = base()
        .pod(
            pod("x", "old-db")
                .labels([("role", "db")])
                .ip("10.0.1.9")
                .node("n2")
                .phase(PodPhase::Succeeded),
        )
        .pod(
            pod("x", "new-web")
                .labels([("role", "web")])
                .ip("10.0.1.9")
                .node("n2"),
        )
        .pod(
            pod("x", "failed-db")
                .labels([("role", "db")])
                .ip("10.0.1.10")
                .node("n2")
                .phase(PodPhase::Failed),
        )
        .policy(
            policy("x", "from-db")
                .select(labels([("pod", "a")]))
                .ingress(allow().from(pods(labels([("role", "db")])))),
        );
    assert!(!tcp_ok(&c, "10.0.1.9", A, 5432), "the IP is new-web's now");
    assert!(
        !tcp_ok(&c, "10.0.1.10", A, 5432),
        "a failed pod's IP carries no identity"
    );
    let mut compiler = Compiler::new(nodes()[0].clone());
    compiler.sync(&c);
    let n1 = compiler.compiled();
    let owners: Vec<Vec<ObjectRef>> = n1
        .identities
        .keys()
        .map(|id| compiler.pods_with_identity(*id))
        .collect();
    let of_new_web = owners
        .iter()
        .find(|pods| pods.contains(&ObjectRef::new("x", "new-web")))
        .expect("new-web has an identity");
    assert!(!of_new_web.contains(&ObjectRef::new("x", "old-db")));
    assert!(
        owners
            .iter()
            .flatten()
            .all(|p| p.name != "old-db" && p.name != "failed-db"),
        "finished pods have no identity"
    );
    assert!(
        !n1.maps
            .peers_v4
            .contains_key(&("10.0.1.10".parse().unwrap(), 32))
    );
}

#[test]
fn node_addresses_are_flagged_host() {
    let c = base().policy(policy("x", "deny").select(all()).deny_ingress());
    let n1 = n1(&c);
    assert_eq!(
        n1.maps.peers_v4[&("192.168.0.1".parse().unwrap(), 32)].flags,
        PEER_F_HOST
    );
    assert_eq!(
        n1.maps.peers_v6[&("fd00:ff::1".parse().unwrap(), 128)].flags,
        PEER_F_HOST
    );
    assert!(
        !n1.maps
            .peers_v4
            .contains_key(&("192.168.0.2".parse().unwrap(), 32)),
        "other nodes' addresses are not host here"
    );
}

// ---------------------------------------------------------------------------
// Selectors
// ---------------------------------------------------------------------------

#[test]
fn match_expressions_operators() {
    let c = cluster()
        .namespace(namespace("x"))
        .pod(
            pod("x", "t")
                .labels([("pod", "t")])
                .ip("10.0.1.1")
                .node("n1"),
        )
        .pod(
            pod("x", "prod")
                .labels([("env", "prod")])
                .ip("10.0.1.2")
                .node("n1"),
        )
        .pod(
            pod("x", "dev")
                .labels([("env", "dev"), ("debug", "1")])
                .ip("10.0.1.3")
                .node("n1"),
        )
        .pod(pod("x", "none").ip("10.0.1.4").node("n1"));
    let target = "10.0.1.1";
    let with = |sel| {
        c.clone().policy(
            policy("x", "p")
                .select(labels([("pod", "t")]))
                .ingress(allow().from(pods(sel))),
        )
    };
    let from =
        |c: &Cluster| ["10.0.1.2", "10.0.1.3", "10.0.1.4"].map(|src| tcp_ok(c, src, target, 80));
    assert_eq!(
        from(&with(all().key_in("env", ["prod", "qa"]))),
        [true, false, false]
    );
    assert_eq!(
        from(&with(all().key_not_in("env", ["prod"]))),
        [false, true, true],
        "NotIn matches a missing label"
    );
    assert_eq!(from(&with(all().exists("env"))), [true, true, false]);
    assert_eq!(
        from(&with(all().does_not_exist("debug"))),
        [true, false, true]
    );
    assert_eq!(
        from(&with(all().exists("env").does_not_exist("debug"))),
        [true, false, false],
        "requirements are ANDed"
    );
    assert_eq!(
        from(&with(labels([("env", "dev")]).key_in("debug", ["1"]))),
        [false, true, false],
        "matchLabels AND matchExpressions"
    );
}

#[test]
fn label_changes_move_pods_between_identities_and_revoke() {
    let mut c = base().policy(
        policy("x", "from-b")
            .select(labels([("pod", "a")]))
            .ingress(allow().from(pods(labels([("pod", "b")])))),
    );
    let node = &nodes()[0];
    let mut compiler = Compiler::default();
    let before = compiler.compile(&c, node);
    assert!(tcp_ok(&c, B, A, 80));

    c.pods.get_mut(&ObjectRef::new("x", "b")).unwrap().labels =
        [("pod".to_string(), "z".to_string())].into();
    let after = compiler.compile(&c, node);
    assert!(!tcp_ok(&c, B, A, 80));
    let d = diff(&before, &after);
    assert!(d.revokes, "b lost its access: flows must be re-checked");

    // Namespace label changes count as well.
    let mut c = base().policy(
        policy("x", "from-blue")
            .select(all())
            .ingress(allow().from(namespaces(labels([("team", "blue")])))),
    );
    assert!(tcp_ok(&c, C, A, 80));
    c.namespaces
        .get_mut("y")
        .unwrap()
        .labels
        .insert("team".into(), "green".into());
    assert!(!tcp_ok(&c, C, A, 80));
}

// ---------------------------------------------------------------------------
// Invalid policies
// ---------------------------------------------------------------------------

#[test]
fn invalid_policy_keeps_isolation_without_rules_and_names_the_field() {
    let converted = convert::network_policy(&k8s_policy(serde_json::json!({
        "metadata": {"namespace": "x", "name": "allow-web"},
        "spec": {
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [
                {"podSelector": {}},
                {"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.1.0.0/16"]}}
            ]}]
        }
    })))
    .unwrap();
    let messages: Vec<String> = converted.errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        messages,
        [
            "NetworkPolicy x/allow-web: spec.ingress[0].from[1].ipBlock.except[0]: 10.1.0.0/16 is not inside cidr 10.0.0.0/16"
        ]
    );
    let p = converted.value;
    assert!(p.invalid);
    assert_eq!(p.ingress, Some(vec![]), "kept isolating, no rules");
    assert_eq!(p.pod_selector, labels([("pod", "a")]));

    let c = base().policy(p);
    assert!(!tcp_ok(&c, B, A, 80), "the valid peer opens nothing either");
    assert!(tcp_ok(&c, A, B, 80), "b is not selected");
}

#[test]
fn every_validation_error_is_reported() {
    let converted = convert::network_policy(&k8s_policy(serde_json::json!({
        "metadata": {"namespace": "x", "name": "bad"},
        "spec": {
            "podSelector": {},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{
                "from": [
                    {"ipBlock": {"cidr": "10.0.0.0/33"}},
                    {"podSelector": {"matchExpressions": [{"key": "a", "operator": "Like", "values": ["x"]}]}},
                    {"podSelector": {"matchExpressions": [{"key": "a", "operator": "In", "values": []}]}},
                    {"namespaceSelector": {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]}},
                    {},
                    {"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}
                ],
                "ports": [
                    {"port": 0},
                    {"port": 70000},
                    {"port": 90, "endPort": 80},
                    {"port": "http", "endPort": 80},
                    {"endPort": 80},
                    {"port": 80, "protocol": "ICMP"},
                    {"port": "Not_A_Name"}
                ]
            }],
            "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.0.0/8", "fd00::/64", "junk"]}}]}]
        }
    })))
    .unwrap();
    let got: Vec<String> = converted
        .errors
        .iter()
        .map(|e| format!("{}: {}", e.field, e.problem))
        .collect();
    let want = [
        "spec.ingress[0].from[0].ipBlock.cidr: \"10.0.0.0/33\" is not a valid CIDR",
        "spec.ingress[0].from[1].podSelector.matchExpressions[0].operator: unknown operator \"Like\" (want In, NotIn, Exists or DoesNotExist)",
        "spec.ingress[0].from[2].podSelector.matchExpressions[0].values: operator In needs at least one value",
        "spec.ingress[0].from[3].namespaceSelector.matchExpressions[0].values: operator Exists takes no values",
        "spec.ingress[0].from[4]: must specify a peer (podSelector, namespaceSelector or ipBlock)",
        "spec.ingress[0].from[5]: ipBlock may not be combined with podSelector or namespaceSelector",
        "spec.ingress[0].ports[0].port: port 0 is outside 1-65535",
        "spec.ingress[0].ports[1].port: port 70000 is outside 1-65535",
        "spec.ingress[0].ports[2].endPort: endPort 80 is less than port 90",
        "spec.ingress[0].ports[3].endPort: endPort may not be used with a named port",
        "spec.ingress[0].ports[4].endPort: endPort may not be used without port",
        "spec.ingress[0].ports[5].protocol: unknown protocol \"ICMP\" (want TCP, UDP or SCTP)",
        "spec.ingress[0].ports[6].port: \"Not_A_Name\" is not a valid port name (IANA_SVC_NAME)",
        "spec.egress[0].to[0].ipBlock.except[0]: 10.0.0.0/8 is not inside cidr 10.0.0.0/8",
        "spec.egress[0].to[0].ipBlock.except[1]: fd00::/64 is not inside cidr 10.0.0.0/8",
        "spec.egress[0].to[0].ipBlock.except[2]: \"junk\" is not a valid CIDR",
    ];
    assert_eq!(got, want);
    assert!(
        converted
            .errors
            .iter()
            .all(|e| e.kind == "NetworkPolicy" && e.object == "x/bad")
    );
    let p = converted.value;
    assert_eq!((p.ingress, p.egress), (Some(vec![]), Some(vec![])));
}

#[test]
fn invalid_pod_selector_isolates_the_whole_namespace() {
    let converted = convert::network_policy(&k8s_policy(serde_json::json!({
        "metadata": {"namespace": "x", "name": "bad-selector"},
        "spec": {
            "podSelector": {"matchExpressions": [{"key": "pod", "operator": "NotIn"}]},
            "ingress": [{}]
        }
    })))
    .unwrap();
    assert_eq!(converted.errors.len(), 1);
    assert_eq!(
        converted.errors[0].field,
        "spec.podSelector.matchExpressions[0].values"
    );
    let c = base().policy(converted.value);
    assert!(!tcp_ok(&c, C, A, 80));
    assert!(!tcp_ok(&c, C, B, 80));
    assert!(tcp_ok(&c, A, C, 80), "other namespaces are untouched");
}

#[test]
fn unknown_policy_types_isolate_both_directions() {
    let converted = convert::network_policy(&k8s_policy(serde_json::json!({
        "metadata": {"namespace": "x", "name": "typo"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingres"], "ingress": [{}]}
    })))
    .unwrap();
    assert_eq!(
        converted.errors[0].to_string(),
        "NetworkPolicy x/typo: spec.policyTypes[0]: unknown policy type \"Ingres\" (want Ingress or Egress)"
    );
    let c = base().policy(converted.value);
    assert!(!tcp_ok(&c, C, A, 80));
    assert!(!tcp_ok(&c, A, C, 80));
}

#[test]
fn valid_policy_converts_fully() {
    let p = convert::network_policy(&k8s_policy(serde_json::json!({
        "metadata": {"namespace": "x", "name": "web"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "web"}},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [
                    {"namespaceSelector": {"matchLabels": {"team": "blue"}}, "podSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["fe"]}]}},
                    {"ipBlock": {"cidr": "10.0.0.1/16", "except": ["10.0.5.0/24"]}}
                ],
                "ports": [
                    {"port": 80},
                    {"port": 8000, "endPort": 8080, "protocol": "TCP"},
                    {"port": "metrics"},
                    {"protocol": "UDP"},
                    {"port": 3868, "protocol": "SCTP"}
                ]
            }]
        }
    })))
    .unwrap();
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    let want = policy("x", "web").select(labels([("app", "web")])).ingress(
        allow()
            .from(pods_in(
                labels([("team", "blue")]),
                all().key_in("tier", ["fe"]),
            ))
            .from(block(cidr("10.0.0.0/16").except("10.0.5.0/24")))
            .port(tcp(80))
            .port(port_range(Protocol::Tcp, 8000, 8080))
            .port(named(Protocol::Tcp, "metrics"))
            .port(any_port(Protocol::Udp))
            .port(sctp(3868)),
    );
    assert_eq!(p.value, want);
}

#[test]
fn pods_and_namespaces_convert() {
    let p: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"namespace": "x", "name": "a", "labels": {"app": "web"}},
        "spec": {
            "nodeName": "n1",
            "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}, {"containerPort": 53, "protocol": "UDP"}]}],
            "initContainers": [
                {"name": "sidecar", "restartPolicy": "Always", "ports": [{"name": "metrics", "containerPort": 9090}]},
                {"name": "init", "ports": [{"name": "ignored", "containerPort": 1}]}
            ]
        },
        "status": {"phase": "Running", "podIP": "10.0.1.1", "podIPs": [{"ip": "10.0.1.1"}, {"ip": "fd00:1::1"}]}
    }))
    .unwrap();
    let converted = convert::pod(&p).unwrap();
    assert!(converted.errors.is_empty());
    let want = pod("x", "a")
        .labels([("app", "web")])
        .node("n1")
        .ip("10.0.1.1")
        .ip("fd00:1::1");
    let want = netpol_agent::model::Pod {
        ports: vec![
            netpol_agent::model::ContainerPort {
                name: Some("http".into()),
                port: 8080,
                protocol: Protocol::Tcp,
            },
            netpol_agent::model::ContainerPort {
                name: None,
                port: 53,
                protocol: Protocol::Udp,
            },
            netpol_agent::model::ContainerPort {
                name: Some("metrics".into()),
                port: 9090,
                protocol: Protocol::Tcp,
            },
        ],
        ..want
    };
    assert_eq!(converted.value, want);

    let ns: k8s_openapi::api::core::v1::Namespace = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "x", "labels": {"team": "red"}, "annotations": {"netpol.dev/audit": "true", "kubectl.kubernetes.io/last-applied-configuration": "{...}"}}
    }))
    .unwrap();
    let ns = convert::namespace(&ns).unwrap();
    assert!(ns.audit());
    assert_eq!(
        ns.annotations.len(),
        1,
        "only netpol.dev/ annotations are kept"
    );

    let nameless = k8s_policy(serde_json::json!({"metadata": {"namespace": "x"}}));
    assert_eq!(
        convert::network_policy(&nameless).unwrap_err().to_string(),
        "NetworkPolicy ?: metadata.name: required value"
    );
}

// ---------------------------------------------------------------------------
// Flags, explain data, ids and diffs
// ---------------------------------------------------------------------------

#[test]
fn audit_annotation_sets_the_endpoint_flag() {
    let c = base()
        .namespace(namespace("x").label("team", "red").audited())
        .policy(policy("x", "deny").select(all()).deny_ingress());
    let n1 = n1(&c);
    assert_eq!(
        policy_flags(&n1.maps.endpoints[&ObjectRef::new("x", "a")]),
        EP_F_INGRESS_ISOLATED | EP_F_AUDIT
    );
    assert_eq!(
        policy_flags(&n1.maps.endpoints[&ObjectRef::new("y", "c")]),
        0
    );
}

#[test]
fn rules_table_names_every_rule() {
    let c = base().policy(
        policy("x", "two-rules")
            .select(labels([("pod", "a")]))
            .ingress(allow().from(pods(labels([("pod", "b")]))).port(tcp(80)))
            .ingress(
                allow()
                    .from(namespaces(labels([("team", "blue")])))
                    .port(tcp(443)),
            ),
    );
    let n1 = n1(&c);
    let infos: Vec<_> = n1
        .rules
        .values()
        .map(|r| (r.policy.as_str(), r.direction, r.index))
        .collect();
    assert_eq!(
        infos,
        [("two-rules", DIR_INGRESS, 0), ("two-rules", DIR_INGRESS, 1)]
    );
    let b = sim::endpoint_verdict(
        &n1.maps,
        &ObjectRef::new("x", "a"),
        DIR_INGRESS,
        B.parse().unwrap(),
        PROTO_TCP,
        80,
    );
    let sim::Verdict::Allow { rule_id } = b else {
        panic!("expected allow, got {b:?}")
    };
    assert_eq!(n1.rules[&rule_id].index, 0);
    assert!(!n1.rules.contains_key(&0), "rule id 0 means none");
}

#[test]
fn identical_pods_share_identities_and_policy_ids() {
    let mut c = cluster()
        .namespace(namespace("clients").label("role", "client"))
        .namespace(namespace("srv"));
    for i in 0..1000u32 {
        c.upsert_pod(
            pod("clients", &format!("cl-{i}"))
                .labels([("app", "client")])
                .ip(&format!("10.1.{}.{}", i / 250, i % 250 + 1))
                .node("n2"),
        );
        c.upsert_pod(
            pod("srv", &format!("srv-{i}"))
                .labels([("app", "srv")])
                .ip(&format!("10.2.{}.{}", i / 250, i % 250 + 1))
                .node("n1"),
        );
    }
    c.upsert_policy(
        policy("srv", "from-clients")
            .select(labels([("app", "srv")]))
            .ingress(
                allow()
                    .from(namespaces(labels([("role", "client")])))
                    .port(tcp(8080)),
            ),
    );
    let n1 = n1(&c);
    assert_eq!(n1.maps.endpoints.len(), 1000);
    let ids: std::collections::BTreeSet<u32> =
        n1.maps.endpoints.values().map(|e| e.policy_id).collect();
    assert_eq!(ids.len(), 1, "1000 identical endpoints share one policy id");
    assert_eq!(n1.maps.policy.len(), 1, "one identity x one port");
    assert!(
        n1.maps.peers_v4.len() <= 2000 + 2,
        "pod IPs, /0, node address"
    );
    assert!(n1.identities.len() <= 3, "clients, servers, the rest");
    assert!(tcp_ok(&c, "10.1.3.250", "10.2.0.7", 8080));
    assert!(!tcp_ok(&c, "10.2.0.8", "10.2.0.7", 8080));
}

#[test]
fn unrelated_changes_keep_ids_and_pure_additions_do_not_revoke() {
    let mut c = base()
        .policy(
            policy("x", "from-b")
                .select(labels([("pod", "a")]))
                .ingress(allow().from(pods(labels([("pod", "b")]))).port(tcp(80))),
        )
        .policy(
            policy("x", "egress-dns")
                .select(all())
                .egress(allow().port(udp(53))),
        );
    let node = &nodes()[0];
    let mut compiler = Compiler::default();
    let before = compiler.compile(&c, node);

    // A new pod in another namespace with new labels: only additions.
    c.upsert_pod(
        pod("y", "new")
            .labels([("pod", "new")])
            .ip("10.0.2.9")
            .node("n2"),
    );
    let after = compiler.compile(&c, node);
    let d = diff(&before, &after);
    assert!(!d.revokes, "{:#?}", d.updates);
    assert_eq!(
        d.updates,
        [MapUpdate::PeerV4 {
            addr: "10.0.2.9".parse().unwrap(),
            prefix_len: 32,
            value: Some(after.maps.peers_v4[&("10.0.2.9".parse().unwrap(), 32)]),
        }]
    );
    assert_eq!(
        before.maps.endpoints, after.maps.endpoints,
        "policy and endpoint ids unchanged"
    );
    assert_eq!(
        before.maps.policy, after.maps.policy,
        "identity and rule ids unchanged"
    );

    // Another policy in namespace y: nothing on n1's x pods changes.
    c.upsert_policy(
        policy("y", "deny")
            .select(labels([("pod", "nothing-here")]))
            .deny_ingress(),
    );
    let again = compiler.compile(&c, node);
    assert!(diff(&after, &again).is_empty());

    // A recompile of the same state is empty; compiling from nothing is
    // all additions.
    assert!(diff(&again, &compiler.compile(&c, node)).is_empty());
    let from_scratch = diff(&Compiled::default(), &again);
    assert!(!from_scratch.revokes);
    assert!(from_scratch.updates.iter().all(|u| !u.is_delete()));
}

#[test]
fn diffs_add_before_they_delete() {
    let mut c = base().policy(
        policy("x", "from-b")
            .select(labels([("pod", "a")]))
            .ingress(allow().from(pods(labels([("pod", "b")])))),
    );
    let node = &nodes()[0];
    let mut compiler = Compiler::default();
    let before = compiler.compile(&c, node);
    c.upsert_policy(
        policy("x", "from-b")
            .select(labels([("pod", "a")]))
            .ingress(allow().from(pods(labels([("pod", "c")])))),
    );
    c.remove_pod(&ObjectRef::new("x", "b"));
    let after = compiler.compile(&c, node);
    let d = diff(&before, &after);
    assert!(d.revokes);
    let first_delete = d
        .updates
        .iter()
        .position(MapUpdate::is_delete)
        .expect("something is deleted");
    assert!(
        d.updates[first_delete..].iter().all(MapUpdate::is_delete),
        "{:#?}",
        d.updates
    );
    let mut maps = before.maps.clone();
    maps.apply(&d.updates);
    assert_eq!(maps, after.maps);
}

#[test]
fn identity_table_describes_pods_prefixes_and_node_addresses() {
    let c = base().policy(
        policy("x", "p").select(labels([("pod", "a")])).ingress(
            allow()
                .from(ip_block("10.0.0.0/8"))
                .from(pods(labels([("pod", "b")]))),
        ),
    );
    let mut compiler = Compiler::new(nodes()[0].clone());
    compiler.sync(&c);
    let n1 = compiler.compiled();
    let of = |ip: &str| {
        sim::peer_lookup(&n1.maps, ip.parse().unwrap())
            .expect("every address has an identity")
            .identity
    };
    let b = &n1.identities[&of(B)];
    assert_eq!(
        (b.address, b.pod_ips),
        (false, 1),
        "b: a pod identity, one IP"
    );
    assert_eq!(
        compiler.pods_with_identity(of(B)),
        [ObjectRef::new("x", "b")]
    );
    let ten = &n1.identities[&of("10.9.9.9")];
    assert!(ten.address);
    assert!(ten.prefixes.contains(&"10.0.0.0/8".parse().unwrap()));
    assert_eq!(
        compiler.pods_with_identity(of("10.9.9.9")),
        [ObjectRef::new("x", "a"), ObjectRef::new("y", "c")],
        "a and c are just addresses in 10/8 here"
    );
    assert_eq!(ten.pod_ips, 2);
    let world = &n1.identities[&of(OUTSIDE)];
    assert!(world.prefixes.contains(&"0.0.0.0/0".parse().unwrap()));
    assert!(
        world
            .node_addresses
            .contains(&"192.168.0.1".parse().unwrap())
    );
    assert_ne!(of(B), of(A));
}

// ---------------------------------------------------------------------------
// Address identities (ipBlocks) and incremental updates
// ---------------------------------------------------------------------------

#[test]
fn ip_block_entries_are_keyed_on_the_address_identity() {
    // b is both selected by label and inside the block: its entry carries a
    // pod identity and the address identity of 10.0.0.0/16.
    let c = base().policy(
        policy("x", "p").select(labels([("pod", "a")])).ingress(
            allow()
                .from(block(cidr("10.0.0.0/16").except("10.0.2.0/24")))
                .from(pods(labels([("pod", "b")])))
                .port(tcp(80)),
        ),
    );
    let n1 = n1(&c);
    let peer = |ip: &str| sim::peer_lookup(&n1.maps, ip.parse().unwrap()).unwrap();
    let (b, outside_pod, inside) = (peer(B), peer(C), peer("10.0.9.9"));
    assert!(!n1.identities[&b.identity].address, "b has a pod identity");
    assert_eq!(
        b.cidr_identity, inside.identity,
        "and the address identity of the block's addresses"
    );
    assert!(n1.identities[&inside.identity].address);
    assert_eq!(
        outside_pod.cidr_identity, 0,
        "c: no selector distinguishes it, its identity is its address identity"
    );
    assert!(n1.identities[&outside_pod.identity].address);
    let keys: Vec<u32> = n1.maps.policy.keys().map(|(k, _)| k.identity).collect();
    assert_eq!(
        keys.len(),
        2,
        "one entry for the block, one for the selector: {keys:?}"
    );
    assert!(keys.contains(&inside.identity) && keys.contains(&b.identity));
    assert!(tcp_ok(&c, B, A, 80));
    assert!(tcp_ok(&c, "10.0.9.9", A, 80));
    assert!(!tcp_ok(&c, C, A, 80), "c is in the except");
}

#[test]
fn egress_ip_block_with_a_named_port_resolves_on_the_destination_pod() {
    let c = base()
        .pod(
            pod("y", "web")
                .ip("10.0.2.11")
                .node("n2")
                .named_port("http", Protocol::Tcp, 8080),
        )
        .pod(
            pod("y", "far")
                .ip("10.9.0.1")
                .node("n2")
                .named_port("http", Protocol::Tcp, 8080),
        )
        .policy(
            policy("x", "to-http")
                .select(labels([("pod", "a")]))
                .egress(
                    allow()
                        .to(ip_block("10.0.0.0/16"))
                        .port(named(Protocol::Tcp, "http"))
                        .port(udp(53)),
                ),
        );
    assert!(tcp_ok(&c, A, "10.0.2.11", 8080), "in the block, resolves");
    assert!(!tcp_ok(&c, A, "10.0.2.11", 9090));
    assert!(
        !tcp_ok(&c, A, "10.9.0.1", 8080),
        "resolves, outside the block"
    );
    assert!(
        !tcp_ok(&c, A, "10.0.9.9", 8080),
        "in the block, but no pod: no named ports"
    );
    assert!(!tcp_ok(&c, A, C, 8080), "c has no port named http");
    assert!(
        allowed(&c, A, C, PROTO_UDP, 53),
        "numbered ports: the block"
    );
    assert!(allowed(&c, A, "10.0.9.9", PROTO_UDP, 53));
}

#[test]
fn apply_change_returns_the_updates_of_one_change() {
    let node = nodes()[0].clone();
    let mut compiler = Compiler::new(node.clone());
    let initial = compiler.sync(
        &base().policy(
            policy("x", "from-b")
                .select(labels([("pod", "a")]))
                .ingress(allow().from(pods(labels([("pod", "b")]))).port(tcp(80))),
        ),
    );
    assert!(!initial.revokes);
    assert_eq!(
        initial.updates.len(),
        compiler.compiled().maps.policy.len() + {
            let m = &compiler.compiled().maps;
            m.peers_v4.len() + m.peers_v6.len() + m.endpoints.len()
        }
    );

    // A remote pod starts matching the selector: its peer entry changes.
    let before = compiler.compiled().clone();
    let d = compiler.apply_change(Change::UpsertPod(
        pod("x", "b2")
            .labels([("pod", "b")])
            .ip("10.0.1.3")
            .node("n2"),
    ));
    assert_eq!(d, diff(&before, compiler.compiled()));
    assert!(!d.revokes);
    let b = sim::peer_lookup(&compiler.compiled().maps, B.parse().unwrap()).unwrap();
    assert_eq!(
        d.updates,
        [MapUpdate::PeerV4 {
            addr: "10.0.1.3".parse().unwrap(),
            prefix_len: 32,
            value: Some(b),
        }],
        "b2 joins b's identity: one peer entry, no policy entry"
    );

    // The policy goes: its entries go, the endpoint is no longer isolated.
    let before = compiler.compiled().clone();
    let d = compiler.apply_change(Change::RemovePolicy(ObjectRef::new("x", "from-b")));
    assert_eq!(d, diff(&before, compiler.compiled()));
    assert!(d.revokes);
    assert!(compiler.compiled().maps.policy.is_empty());
    assert_eq!(
        policy_flags(&compiler.compiled().maps.endpoints[&ObjectRef::new("x", "a")]),
        0
    );
    assert_eq!(
        canonical_sizes(compiler.compiled()),
        canonical_sizes(&compile(
            &base().pod(
                pod("x", "b2")
                    .labels([("pod", "b")])
                    .ip("10.0.1.3")
                    .node("n2")
            ),
            &node
        ))
    );
}

fn canonical_sizes(c: &Compiled) -> [usize; 5] {
    [
        c.maps.endpoints.len(),
        c.maps.peers_v4.len(),
        c.maps.peers_v6.len(),
        c.maps.policy.len(),
        c.identities.len(),
    ]
}

#[test]
fn a_selector_covering_whole_identities_renumbers_nothing() {
    // Pods labelled pod=b (in x) already have an identity; a new policy
    // whose peer selects exactly them adds entries and rewrites no peer.
    let node = nodes()[0].clone();
    let mut compiler = Compiler::new(node);
    compiler.sync(
        &base()
            .pod(
                pod("x", "b2")
                    .labels([("pod", "b")])
                    .ip("10.0.1.3")
                    .node("n2"),
            )
            .policy(
                policy("x", "from-b")
                    .select(labels([("pod", "a")]))
                    .ingress(allow().from(pods(labels([("pod", "b")]))).port(tcp(80))),
            ),
    );
    let d = compiler.apply_change(Change::UpsertPolicy(
        policy("x", "b-again")
            .select(labels([("pod", "a")]))
            .ingress(
                allow()
                    .from(pods(all().key_in("pod", ["b"])))
                    .port(tcp(443)),
            ),
    ));
    assert!(!d.revokes);
    assert!(
        d.updates
            .iter()
            .all(|u| matches!(u, MapUpdate::Policy { .. } | MapUpdate::Endpoint { .. })),
        "{:#?}",
        d.updates
    );
    assert!(
        d.updates
            .iter()
            .any(|u| matches!(u, MapUpdate::Policy { .. }))
    );
}

#[test]
fn setting_the_node_recompiles_for_it() {
    let c = base().policy(policy("x", "deny").select(all()).deny_ingress());
    let mut compiler = Compiler::new(nodes()[0].clone());
    compiler.sync(&c);
    let d = compiler.apply_change(Change::SetNode(nodes()[1].clone()));
    assert!(d.revokes, "n1's endpoints and node addresses go");
    let (now, fresh) = (&compiler.compiled().maps, compile(&c, &nodes()[1]).maps);
    assert_eq!(now.peers_v4, fresh.peers_v4);
    assert_eq!(now.peers_v6, fresh.peers_v6);
    let flags = |m: &netpol_agent::compiler::Maps| -> Vec<(ObjectRef, u32)> {
        m.endpoints
            .iter()
            .map(|(p, e)| (p.clone(), e.flags))
            .collect()
    };
    assert_eq!(flags(now), flags(&fresh), "n2's endpoints (with new ids)");
    assert_eq!(compiler.compiled().node, "n2");
}

/// The policy part of an endpoint's flags (isolation and audit), without the
/// address flags.
fn policy_flags(ep: &netpol_common::EndpointValue) -> u32 {
    ep.flags & (EP_F_INGRESS_ISOLATED | EP_F_EGRESS_ISOLATED | EP_F_AUDIT)
}
