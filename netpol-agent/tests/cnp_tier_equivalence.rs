//! Randomized equivalence of the tier compiler and the reference: for random
//! clusters mixing ClusterNetworkPolicies (both tiers, colliding priorities,
//! every action and peer kind, port ranges and named ports) with
//! NetworkPolicies, every (src, dst, protocol, port) probe gets the same
//! decision from the compiled table ([`compile_tiers`]) as from the
//! reference ([`reference::decide`]): same tier, policy, rule and action,
//! not just the same verdict.
//!
//! And fail closed: a CNP written as JSON converts back to the same model,
//! and the same object made invalid in one place (an unknown peer field from
//! a newer CRD, domainNames, port 0, a bad subject, tier or priority) never
//! allows a probe that the valid object denies.
//!
//! Cases: `NETPOL_PROPTEST_CASES` (default below). proptest draws a new seed
//! per run and shrinks a failure to a minimal cluster.

use std::{collections::BTreeSet, net::IpAddr};

use ipnet::IpNet;
use netpol_agent::{
    compiler::{
        Compiled, Compiler, NodeInfo, reference, sim,
        tiers::{TierCache, compile_tiers, compile_tiers_local, compile_tiers_local_cached},
    },
    model::{
        Action, Cluster, ClusterNetworkPolicy, CnpPeer, CnpPort, CnpRule, ContainerPort, IpBlock,
        LabelSelector, Labels, Namespace, NetworkPolicy, Node, Operator, Peer, Pod, PodPhase,
        PortMatch, PortSpec, Protocol, Requirement, Rule, Subject, Tier,
    },
};
use netpol_common::{
    DIR_EGRESS, DIR_INGRESS, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
};
use proptest::{prelude::*, sample::select, test_runner::Config};
use serde_json::json;

const DEFAULT_CASES: u32 = 500;

fn cases() -> u32 {
    std::env::var("NETPOL_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

const NAMESPACES: [&str; 3] = ["a", "b", "c"];
const NODES: [&str; 3] = ["n1", "n2", "n3"];
const PORT_NAMES: [&str; 2] = ["http", "dns"];
const PORTS: [u16; 5] = [53, 80, 81, 8080, 8081];
const POD_KEYS: &[&str] = &["app", "tier"];
const NS_KEYS: &[&str] = &["env", "team", "kubernetes.io/metadata.name"];
const NODE_KEYS: &[&str] = &["zone"];

fn v4(idx: u8) -> IpAddr {
    format!("10.0.{}.{}", idx / 8, idx % 8).parse().unwrap()
}

fn v6(idx: u8) -> IpAddr {
    format!("fd00:{}::{}", idx / 8, idx % 8).parse().unwrap()
}

fn node_addresses(i: usize) -> Vec<IpAddr> {
    vec![
        format!("192.168.0.{i}").parse().unwrap(),
        format!("fd00:ff::{i}").parse().unwrap(),
    ]
}

/// The compile's nodes: their addresses are exempt towards their pods.
fn node_infos() -> Vec<NodeInfo> {
    (1..=3)
        .map(|i| NodeInfo {
            name: format!("n{i}"),
            addresses: node_addresses(i),
        })
        .collect()
}

/// Probe addresses of one family: the pod pool, node addresses, outsiders.
fn address_pool(family_v4: bool) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = (0..16).map(if family_v4 { v4 } else { v6 }).collect();
    let extra: &[&str] = if family_v4 {
        &[
            "192.168.0.1",
            "192.168.0.2",
            "192.168.0.3",
            "172.16.0.1",
            "8.8.8.8",
        ]
    } else {
        &["fd00:ff::1", "fd00:ff::2", "fd00:ff::3", "2001:db8::1"]
    };
    out.extend(extra.iter().map(|a| a.parse::<IpAddr>().unwrap()));
    out
}

/// (protocol, port) probes on the edges of the generated ranges.
const PROBES: [(u8, u16); 12] = [
    (PROTO_TCP, 53),
    (PROTO_TCP, 80),
    (PROTO_TCP, 81),
    (PROTO_TCP, 8080),
    (PROTO_TCP, 8180),
    (PROTO_TCP, 9000),
    (PROTO_UDP, 53),
    (PROTO_UDP, 80),
    (PROTO_UDP, 8081),
    (PROTO_SCTP, 80),
    (PROTO_SCTP, 8081),
    (PROTO_ICMP, 0),
];

fn labels_strategy(keys: &'static [&'static str]) -> impl Strategy<Value = Labels> {
    prop::collection::btree_map(select(keys), select(&["x", "y"][..]), 0..=2).prop_map(|m| {
        m.into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    })
}

fn selector_strategy(keys: &'static [&'static str]) -> impl Strategy<Value = LabelSelector> {
    let req = (
        select(keys),
        0..4u8,
        prop::collection::btree_set(select(&["x", "y", "a", "b"][..]), 1..=2),
    )
        .prop_map(|(key, op, values)| {
            let values: BTreeSet<String> = values.into_iter().map(String::from).collect();
            Requirement {
                key: key.into(),
                operator: match op {
                    0 => Operator::In(values),
                    1 => Operator::NotIn(values),
                    2 => Operator::Exists,
                    _ => Operator::DoesNotExist,
                },
            }
        });
    (
        labels_strategy(keys).prop_map(|l| l.into_iter().take(1).collect()),
        prop::collection::vec(req, 0..=1),
    )
        .prop_map(|(match_labels, match_expressions)| LabelSelector {
            match_labels,
            match_expressions,
        })
}

fn cidr_strategy() -> impl Strategy<Value = IpNet> {
    let v4s = (0..16u8, select(&[0u8, 16, 24, 29, 30, 32][..]))
        .prop_map(|(base, len)| IpNet::new(v4(base), len).unwrap().trunc());
    let v6s = (0..16u8, select(&[0u8, 32, 64, 125, 126, 128][..]))
        .prop_map(|(base, len)| IpNet::new(v6(base), len).unwrap().trunc());
    let nodes = prop_oneof![
        Just("192.168.0.0/30".parse::<IpNet>().unwrap()),
        Just("192.168.0.2/32".parse::<IpNet>().unwrap())
    ];
    prop_oneof![3 => v4s, 2 => v6s, 1 => nodes]
}

fn protocol_strategy() -> impl Strategy<Value = Protocol> {
    prop_oneof![4 => Just(Protocol::Tcp), 2 => Just(Protocol::Udp), 1 => Just(Protocol::Sctp)]
}

fn range_strategy() -> impl Strategy<Value = (u16, u16)> {
    (select(&PORTS[..]), select(&[0u16, 1, 100, 8000][..]))
        .prop_map(|(start, d)| (start, start.saturating_add(d)))
}

// NetworkPolicy.

fn np_peer_strategy() -> impl Strategy<Value = Peer> {
    prop_oneof![
        3 => (
            prop::option::weighted(0.5, selector_strategy(NS_KEYS)),
            prop::option::weighted(0.7, selector_strategy(POD_KEYS)),
        )
            .prop_map(|(namespace_selector, pod_selector)| Peer::Pods {
                namespace_selector,
                pod_selector,
            }),
        2 => (cidr_strategy(), prop::option::weighted(0.3, 1..=3u8)).prop_map(|(cidr, d)| {
            let except = d
                .filter(|d| cidr.prefix_len() + d <= cidr.max_prefix_len())
                .map(|d| IpNet::new(cidr.addr(), cidr.prefix_len() + d).unwrap().trunc())
                .into_iter()
                .collect();
            Peer::IpBlock(IpBlock { cidr, except })
        }),
    ]
}

fn np_rule_strategy() -> impl Strategy<Value = Rule> {
    let port = prop_oneof![
        1 => Just(PortMatch::All),
        3 => range_strategy().prop_map(|(start, end)| PortMatch::Range { start, end }),
        2 => select(&PORT_NAMES[..]).prop_map(|n| PortMatch::Named(n.into())),
    ];
    (
        prop::collection::vec(np_peer_strategy(), 0..=2),
        prop::collection::vec(
            (protocol_strategy(), port).prop_map(|(protocol, port)| PortSpec { protocol, port }),
            0..=2,
        ),
    )
        .prop_map(|(peers, ports)| Rule { peers, ports })
}

fn np_strategy(idx: usize) -> impl Strategy<Value = NetworkPolicy> {
    let rules = || prop::option::weighted(0.6, prop::collection::vec(np_rule_strategy(), 0..=2));
    (
        select(&NAMESPACES[..]),
        selector_strategy(POD_KEYS),
        rules(),
        rules(),
    )
        .prop_map(move |(ns, pod_selector, ingress, egress)| NetworkPolicy {
            namespace: ns.into(),
            name: format!("np{idx}"),
            pod_selector,
            ingress,
            egress,
            invalid: false,
        })
}

// ClusterNetworkPolicy.

fn cnp_peer_strategy(egress: bool) -> BoxedStrategy<CnpPeer> {
    let namespaces = selector_strategy(NS_KEYS).prop_map(CnpPeer::Namespaces);
    let pods = (selector_strategy(NS_KEYS), selector_strategy(POD_KEYS)).prop_map(
        |(namespace_selector, pod_selector)| CnpPeer::Pods {
            namespace_selector,
            pod_selector,
        },
    );
    if egress {
        prop_oneof![
            2 => namespaces,
            2 => pods,
            2 => prop::collection::vec(cidr_strategy(), 1..=2).prop_map(CnpPeer::Networks),
            1 => selector_strategy(NODE_KEYS).prop_map(CnpPeer::Nodes),
            1 => Just(CnpPeer::Everything),
        ]
        .boxed()
    } else {
        prop_oneof![3 => namespaces, 3 => pods, 1 => Just(CnpPeer::Everything)].boxed()
    }
}

fn cnp_rule_strategy(egress: bool) -> impl Strategy<Value = CnpRule> {
    let action = prop_oneof![Just(Action::Accept), Just(Action::Deny), Just(Action::Pass)];
    let port = prop_oneof![
        3 => (protocol_strategy(), range_strategy()).prop_map(|(protocol, (start, end))| {
            CnpPort::Range { protocol, start, end }
        }),
        1 => select(&PORT_NAMES[..]).prop_map(|n| CnpPort::Named(n.into())),
    ];
    (
        action,
        // Empty peers: the fail-closed form of an unreadable Accept rule.
        prop::collection::vec(cnp_peer_strategy(egress), 0..=2),
        prop::collection::vec(port, 0..=2),
        0..100u32,
    )
        .prop_map(|(action, peers, protocols, n)| CnpRule {
            name: format!("r{n}"),
            action,
            peers,
            protocols,
        })
}

fn cnp_strategy(idx: usize) -> impl Strategy<Value = ClusterNetworkPolicy> {
    let subject = prop_oneof![
        selector_strategy(NS_KEYS).prop_map(Subject::Namespaces),
        (selector_strategy(NS_KEYS), selector_strategy(POD_KEYS)).prop_map(
            |(namespace_selector, pod_selector)| Subject::Pods {
                namespace_selector,
                pod_selector,
            }
        ),
    ];
    (
        prop_oneof![Just(Tier::Admin), Just(Tier::Baseline)],
        // Few priorities: equal ones are ordered by name.
        select(&[0u32, 1, 2][..]),
        subject,
        prop::collection::vec(cnp_rule_strategy(false), 0..=3),
        prop::collection::vec(cnp_rule_strategy(true), 0..=3),
        // One policy in four is audited (`netpol.dev/audit: "true"`).
        select(&[false, false, false, true][..]),
    )
        .prop_map(move |(tier, priority, subject, ingress, egress, audit)| {
            ClusterNetworkPolicy {
                name: format!("cnp{idx}"),
                tier,
                priority,
                subject: Some(subject),
                ingress,
                egress,
                invalid: false,
                audit,
            }
        })
}

// The cluster.

fn pod_strategy(idx: usize) -> impl Strategy<Value = Pod> {
    let port = (
        select(&PORT_NAMES[..]),
        protocol_strategy(),
        select(&PORTS[..]),
    )
        .prop_map(|(n, protocol, port)| ContainerPort {
            name: Some(n.into()),
            port,
            protocol,
        });
    let phase = prop_oneof![
        8 => Just(PodPhase::Running),
        1 => Just(PodPhase::Pending),
        1 => Just(PodPhase::Succeeded),
    ];
    (
        select(&NAMESPACES[..]),
        labels_strategy(POD_KEYS),
        prop::option::weighted(0.95, select(&NODES[..])),
        prop::option::weighted(0.9, 0..16u8),
        prop::option::weighted(0.5, 0..16u8),
        prop::bool::weighted(0.08),
        phase,
        prop::collection::vec(port, 0..=2),
    )
        .prop_map(
            move |(ns, labels, node, ip4, ip6, host_network, phase, ports)| Pod {
                namespace: ns.into(),
                name: format!("p{idx}"),
                node: node.map(String::from),
                labels,
                ips: ip4.map(v4).into_iter().chain(ip6.map(v6)).collect(),
                host_network,
                phase,
                ports,
            },
        )
}

fn namespace_strategy(name: &'static str) -> impl Strategy<Value = Option<Namespace>> {
    prop::option::weighted(0.9, labels_strategy(&["env", "team"])).prop_map(move |labels| {
        labels.map(|mut labels| {
            labels.insert("kubernetes.io/metadata.name".into(), name.into());
            Namespace {
                name: name.into(),
                labels,
                annotations: Labels::new(),
            }
        })
    })
}

fn cluster_strategy() -> impl Strategy<Value = Cluster> {
    let pods = (0..=8usize).prop_flat_map(|n| (0..n).map(pod_strategy).collect::<Vec<_>>());
    let nps = (0..=3usize).prop_flat_map(|n| (0..n).map(np_strategy).collect::<Vec<_>>());
    let cnps = (0..=4usize).prop_flat_map(|n| (0..n).map(cnp_strategy).collect::<Vec<_>>());
    let namespaces = (
        namespace_strategy("a"),
        namespace_strategy("b"),
        namespace_strategy("c"),
    );
    let node_labels = prop::collection::vec(labels_strategy(NODE_KEYS), 3);
    (namespaces, pods, nps, cnps, node_labels).prop_map(
        |((a, b, c), pods, nps, cnps, node_labels)| {
            let mut cluster = Cluster::default();
            for ns in [a, b, c].into_iter().flatten() {
                cluster.upsert_namespace(ns);
            }
            for p in pods {
                cluster.upsert_pod(p);
            }
            for p in nps {
                cluster.upsert_policy(p);
            }
            for p in cnps {
                cluster.upsert_cluster_policy(p);
            }
            for (i, labels) in node_labels.into_iter().enumerate() {
                cluster.upsert_node(Node {
                    name: format!("n{}", i + 1),
                    labels,
                    addresses: node_addresses(i + 1),
                });
            }
            cluster
        },
    )
}

proptest! {
    #![proptest_config(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    })]

    #[test]
    fn the_tier_table_decides_like_the_reference(cluster in cluster_strategy()) {
        let nodes = node_infos();
        let table = compile_tiers(&cluster, &nodes);
        for family_v4 in [true, false] {
            let pool = address_pool(family_v4);
            for &src in &pool {
                for &dst in &pool {
                    for (proto, port) in PROBES {
                        let proto = if proto == PROTO_ICMP && !family_v4 { PROTO_ICMPV6 } else { proto };
                        let want = reference::decide_audited(&cluster, &nodes, src, dst, proto, port);
                        let got = table.decide_audited(src, dst, proto, port);
                        prop_assert_eq!(
                            &got, &want,
                            "{} -> {} proto {} port {}", src, dst, proto, port
                        );
                    }
                }
            }
        }
    }
}

/// One edit of a cluster, for the cache test: pod `.0` (modulo the pods)
/// removed, given the labels of the next pod, moved to the next node, or its
/// namespace relabelled; or (`.1 == 4`) the first ClusterNetworkPolicy
/// removed (a policy change: the cache starts over); or (`.1 == 5`) a node
/// relabelled.
fn edit(cluster: &mut Cluster, (at, how): (usize, u8)) {
    let pods: Vec<Pod> = cluster.pods.values().cloned().collect();
    if how == 5 {
        // A node relabelled (`nodes` peers).
        if let Some(mut n) = cluster.nodes.values().nth(at % 3).cloned() {
            let v = if n.labels.contains_key("zone") {
                None
            } else {
                Some("z1")
            };
            match v {
                Some(v) => n.labels.insert("zone".into(), v.into()),
                None => n.labels.remove("zone"),
            };
            cluster.upsert_node(n);
        }
        return;
    }
    if how == 4 {
        if let Some(name) = cluster.cluster_policies.keys().next().cloned() {
            cluster.cluster_policies.remove(&name);
        }
        return;
    }
    if pods.is_empty() {
        return;
    }
    let mut pod = pods[at % pods.len()].clone();
    match how {
        0 => {
            cluster.pods.remove(&pod.pod_ref());
            return;
        }
        1 => pod.labels = pods[(at + 1) % pods.len()].labels.clone(),
        2 => {
            let i = NODES.iter().position(|n| Some(*n) == pod.node.as_deref());
            pod.node = Some(NODES[i.map_or(0, |i| (i + 1) % NODES.len())].into());
        }
        _ => {
            if let Some(mut ns) = cluster.namespaces.get(&pod.namespace).cloned() {
                let team = if ns.labels.get("team").map(String::as_str) == Some("t1") {
                    "t2"
                } else {
                    "t1"
                };
                ns.labels.insert("team".into(), team.into());
                cluster.upsert_namespace(ns);
            }
            return;
        }
    }
    cluster.upsert_pod(pod);
}

proptest! {
    #![proptest_config(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    })]

    /// A compile that reuses earlier compiles' decisions ([`TierCache`])
    /// gives the table a fresh compile gives, after every edit of a
    /// sequence (pods removed, relabelled, moved, namespaces relabelled, a
    /// policy removed, a node relabelled).
    #[test]
    fn a_cached_compile_is_a_fresh_compile(
        cluster in cluster_strategy(),
        edits in prop::collection::vec((0..8usize, 0..6u8), 1..6),
    ) {
        let node = &node_infos()[0];
        let mut cache = TierCache::default();
        let mut cluster = cluster;
        let first = compile_tiers_local_cached(&cluster, node, &mut cache);
        prop_assert_eq!(&first, &compile_tiers_local(&cluster, node));
        for e in edits {
            edit(&mut cluster, e);
            let cached = compile_tiers_local_cached(&cluster, node, &mut cache);
            prop_assert_eq!(&cached, &compile_tiers_local(&cluster, node), "after {:?}", e);
        }
    }
}

/// The cache is used: an edit that makes no new class (a pod's labels
/// swapped for another's of the same namespace, node and ports) reuses
/// every decision.
#[test]
fn an_edit_that_makes_no_new_class_reuses_every_decision() {
    use netpol_agent::model::build::*;
    let c = cluster()
        .namespace(namespace("a"))
        .namespace(namespace("b"))
        .pod(
            pod("a", "x1")
                .labels([("app", "x")])
                .ip("10.0.0.1")
                .node("n1"),
        )
        .pod(
            pod("a", "y1")
                .labels([("app", "y")])
                .ip("10.0.0.2")
                .node("n1"),
        )
        .pod(
            pod("b", "z1")
                .labels([("app", "z")])
                .ip("10.0.0.3")
                .node("n2"),
        )
        .cluster_policy(
            admin("guard")
                .subject(in_namespaces(labels([(
                    "kubernetes.io/metadata.name",
                    "a",
                )])))
                .ingress(deny().peer(peer_pods(all(), labels([("app", "z")])))),
        );
    let node = NodeInfo::new("n1", ["192.168.0.1"]);
    let mut cache = TierCache::default();
    compile_tiers_local_cached(&c, &node, &mut cache);
    assert!(cache.made > 0 && cache.reused == 0, "{cache:?}");
    // A new pod like x1: no new class.
    let c = c.pod(
        pod("a", "x2")
            .labels([("app", "x")])
            .ip("10.0.0.4")
            .node("n1"),
    );
    let t = compile_tiers_local_cached(&c, &node, &mut cache);
    assert_eq!(t, compile_tiers_local(&c, &node));
    assert_eq!(cache.made, 0, "{cache:?}");
    assert!(cache.reused > 0);
    // A new policy: everything is decided again.
    let c = c.cluster_policy(
        baseline("floor")
            .subject(in_namespaces(all()))
            .egress(deny().peer(networks(["203.0.113.0/24"]))),
    );
    compile_tiers_local_cached(&c, &node, &mut cache);
    assert!(cache.made > 0 && cache.reused == 0, "{cache:?}");
}

// ---------------------------------------------------------------------------
// The product's compiler: the maps it writes, read the datapath's way
// (`sim`), decide like the reference and name the same rule.
// ---------------------------------------------------------------------------

/// The per-node compiles of `cluster`, each reached incrementally from the
/// same cluster without its ClusterNetworkPolicies (so the diff into the
/// tier compile is exercised too): the diff applied to the previous maps
/// must give the new maps.
fn compile_nodes(cluster: &Cluster) -> Result<Vec<Compiled>, TestCaseError> {
    let mut without = cluster.clone();
    without.cluster_policies.clear();
    let mut out = Vec::new();
    for node in node_infos() {
        let mut compiler = Compiler::new(node.clone());
        compiler.sync(&without);
        let mut maps = compiler.compiled().maps.clone();
        let diff = compiler.sync(cluster);
        maps.apply(&diff.updates);
        prop_assert_eq!(
            &maps,
            &compiler.compiled().maps,
            "diff into the tier compile on {}",
            node.name
        );
        // And back: removing every CNP returns to NetworkPolicy's maps.
        let mut back = Compiler::new(node.clone());
        back.sync(cluster);
        let mut maps = back.compiled().maps.clone();
        let diff = back.sync(&without);
        maps.apply(&diff.updates);
        prop_assert_eq!(
            &maps,
            &back.compiled().maps,
            "diff out of the tier compile on {}",
            node.name
        );
        out.push(compiler.into_compiled());
    }
    Ok(out)
}

/// The datapath's verdict for `pod_ip`'s side (direction `dir`, remote
/// `peer`) agrees with the reference's decision `want`, rule and all.
/// `Ok(false)`: the address is no local endpoint anywhere (not enforced).
fn check_side(
    compiled: &[Compiled],
    pod_ip: IpAddr,
    dir: u8,
    peer: IpAddr,
    proto: u8,
    port: u16,
    want: &(reference::Decision, Option<reference::AuditRule>),
) -> Result<bool, String> {
    use reference::Decision as D;
    let (want, audit) = (&want.0, &want.1);
    let Some((c, pod)) = compiled
        .iter()
        .find_map(|c| c.local_ips.get(&pod_ip).map(|pod| (c, pod)))
    else {
        return Ok(false);
    };
    let got = sim::endpoint_verdict(&c.maps, pod, dir, peer, proto, port);
    let rule = |id: u32| c.rules.get(&id);
    let ok = match (want, got) {
        // Allowed, and an audited policy's Deny rule would have denied it:
        // the entry is an audit entry naming that rule.
        (_, sim::Verdict::Audit { rule_id }) => audit.as_ref().is_some_and(|a| {
            want.allowed()
                && rule(rule_id).is_some_and(|r| {
                    r.policy == a.policy
                        && r.index as usize == a.index
                        && r.direction == dir
                        && r.cluster
                            .as_ref()
                            .is_some_and(|cr| cr.tier == a.tier && cr.action == Action::Deny)
                })
        }),
        _ if audit.is_some() => false,
        (
            D::Rule {
                tier,
                policy,
                index,
                action,
                ..
            },
            sim::Verdict::Allow { rule_id } | sim::Verdict::DenyRule { rule_id },
        ) => rule(rule_id).is_some_and(|r| {
            r.policy == *policy
                && r.index as usize == *index
                && r.direction == dir
                && r.cluster
                    .as_ref()
                    .is_some_and(|cr| cr.tier == *tier && cr.action == *action)
                && got.is_allowed() == (*action == Action::Accept)
        }),
        (D::NetworkPolicy { allowed: true }, sim::Verdict::Allow { rule_id }) => {
            rule(rule_id).is_some_and(|r| r.cluster.is_none() && r.direction == dir)
        }
        (D::NetworkPolicy { allowed: false }, sim::Verdict::Deny) => true,
        (D::Default, sim::Verdict::NotIsolated) => true,
        (D::Default, sim::Verdict::Allow { rule_id: 0 }) => true,
        (D::OwnNode, sim::Verdict::Host | sim::Verdict::NotIsolated) => true,
        _ => false,
    };
    if ok {
        Ok(true)
    } else {
        Err(format!(
            "{} of {pod} with {peer} proto {proto} port {port}: reference {want:?}, datapath {got:?} ({:?})",
            if dir == DIR_INGRESS {
                "ingress"
            } else {
                "egress"
            },
            match got {
                sim::Verdict::Allow { rule_id }
                | sim::Verdict::DenyRule { rule_id }
                | sim::Verdict::Audit { rule_id } => rule(rule_id),
                _ => None,
            }
        ))
    }
}

proptest! {
    #![proptest_config(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    })]

    /// The compiled maps of every node, read the way the datapath reads
    /// them, decide every probe like the reference and name the same tier,
    /// policy, rule and action.
    #[test]
    fn the_compiled_maps_decide_like_the_reference(cluster in cluster_strategy()) {
        let nodes = node_infos();
        let compiled = compile_nodes(&cluster)?;
        for family_v4 in [true, false] {
            let pool = address_pool(family_v4);
            for &src in &pool {
                for &dst in &pool {
                    for (proto, port) in PROBES {
                        let proto = if proto == PROTO_ICMP && !family_v4 { PROTO_ICMPV6 } else { proto };
                        let (egress, ingress) = reference::decide_audited(&cluster, &nodes, src, dst, proto, port);
                        let e = check_side(&compiled, src, DIR_EGRESS, dst, proto, port, &egress);
                        prop_assert!(e.is_ok(), "{} -> {}: {}", src, dst, e.unwrap_err());
                        let i = check_side(&compiled, dst, DIR_INGRESS, src, proto, port, &ingress);
                        prop_assert!(i.is_ok(), "{} -> {}: {}", src, dst, i.unwrap_err());
                    }
                }
            }
        }
    }
}

/// The generator is not degenerate: over a fixed batch of clusters, every
/// kind of decision comes up (a generator that never produced, say, a
/// Baseline decision would make the property above vacuous for it).
#[test]
fn the_generated_clusters_exercise_every_kind_of_decision() {
    use proptest::{strategy::ValueTree, test_runner::TestRunner};
    let mut runner = TestRunner::deterministic();
    let nodes = node_infos();
    let mut seen = BTreeSet::new();
    for _ in 0..200 {
        let cluster = cluster_strategy()
            .new_tree(&mut runner)
            .expect("a cluster")
            .current();
        let pool = address_pool(true);
        for &src in &pool {
            for &dst in &pool {
                for (proto, port) in PROBES {
                    let (e, i) = reference::decide_audited(&cluster, &nodes, src, dst, proto, port);
                    for (d, audit) in [e, i] {
                        if let Some(a) = audit {
                            seen.insert(format!("audit {}", a.tier));
                        }
                        seen.insert(match d {
                            reference::Decision::Rule { tier, action, .. } => {
                                format!("{tier} {action}")
                            }
                            reference::Decision::NetworkPolicy { allowed } => {
                                format!("NetworkPolicy {allowed}")
                            }
                            reference::Decision::Default => "Default".into(),
                            reference::Decision::OwnNode => "OwnNode".into(),
                        });
                    }
                }
            }
        }
    }
    for want in [
        "Admin Accept",
        "Admin Deny",
        "Baseline Accept",
        "Baseline Deny",
        "NetworkPolicy true",
        "NetworkPolicy false",
        "Default",
        "OwnNode",
        "audit Admin",
        "audit Baseline",
    ] {
        assert!(seen.contains(want), "never decided {want:?}: {seen:?}");
    }
}

// ---------------------------------------------------------------------------
// Fail closed: an object with an invalid or unknown field never allows more
// than the object it was meant to be.
// ---------------------------------------------------------------------------

fn selector_json(s: &LabelSelector) -> serde_json::Value {
    let exprs: Vec<serde_json::Value> = s
        .match_expressions
        .iter()
        .map(|r| {
            let (op, values): (&str, Vec<String>) = match &r.operator {
                Operator::In(v) => ("In", v.iter().cloned().collect()),
                Operator::NotIn(v) => ("NotIn", v.iter().cloned().collect()),
                Operator::Exists => ("Exists", vec![]),
                Operator::DoesNotExist => ("DoesNotExist", vec![]),
            };
            if values.is_empty() {
                json!({"key": r.key, "operator": op})
            } else {
                json!({"key": r.key, "operator": op, "values": values})
            }
        })
        .collect();
    json!({"matchLabels": s.match_labels, "matchExpressions": exprs})
}

fn peer_json(p: &CnpPeer) -> serde_json::Value {
    match p {
        CnpPeer::Namespaces(s) => json!({"namespaces": selector_json(s)}),
        CnpPeer::Pods {
            namespace_selector,
            pod_selector,
        } => json!({"pods": {
            "namespaceSelector": selector_json(namespace_selector),
            "podSelector": selector_json(pod_selector),
        }}),
        CnpPeer::Networks(n) => {
            json!({"networks": n.iter().map(ToString::to_string).collect::<Vec<_>>()})
        }
        CnpPeer::Nodes(s) => json!({"nodes": selector_json(s)}),
        CnpPeer::Everything => unreachable!("not generated for round trips"),
    }
}

fn port_json(p: &CnpPort) -> serde_json::Value {
    match p {
        CnpPort::Named(n) => json!({"destinationNamedPort": n}),
        CnpPort::Range {
            protocol,
            start,
            end,
        } => {
            let port = if start == end {
                json!({"number": start})
            } else {
                json!({"range": {"start": start, "end": end}})
            };
            let key = protocol.to_string().to_lowercase();
            json!({ key: {"destinationPort": port} })
        }
    }
}

/// The object a user would write for `p` (which must be expressible: no
/// `Everything` peer, no empty peer list, no range with start == end + k
/// written as a number).
fn cnp_json(p: &ClusterNetworkPolicy) -> serde_json::Value {
    let subject = match p.subject.as_ref().expect("subject") {
        Subject::Namespaces(s) => json!({"namespaces": selector_json(s)}),
        Subject::Pods {
            namespace_selector,
            pod_selector,
        } => json!({"pods": {
            "namespaceSelector": selector_json(namespace_selector),
            "podSelector": selector_json(pod_selector),
        }}),
    };
    let rules = |rules: &[CnpRule], peers: &str| -> Vec<serde_json::Value> {
        rules
            .iter()
            .map(|r| {
                let mut v = json!({
                    "name": r.name,
                    "action": r.action.to_string(),
                    peers: r.peers.iter().map(peer_json).collect::<Vec<_>>(),
                });
                if !r.protocols.is_empty() {
                    v["protocols"] = r.protocols.iter().map(port_json).collect();
                }
                v
            })
            .collect()
    };
    json!({
        "apiVersion": "policy.networking.k8s.io/v1alpha2",
        "kind": "ClusterNetworkPolicy",
        "metadata": if p.audit {
            json!({"name": p.name, "annotations": {"netpol.dev/audit": "true"}})
        } else {
            json!({"name": p.name})
        },
        "spec": {
            "tier": p.tier.to_string(),
            "priority": p.priority,
            "subject": subject,
            "ingress": rules(&p.ingress, "from"),
            "egress": rules(&p.egress, "to"),
        },
    })
}

/// Whether the rule survives a JSON round trip unchanged: users cannot write
/// `Everything`, an empty peer list, a one-port range (it is a number) or a
/// `networks` peer whose CIDRs are not sorted and distinct.
fn expressible(r: &CnpRule) -> bool {
    !r.peers.is_empty()
        && r.peers.iter().all(|p| match p {
            CnpPeer::Everything => false,
            CnpPeer::Networks(n) => n.windows(2).all(|w| w[0] < w[1]),
            _ => true,
        })
        && !(r
            .peers
            .iter()
            .any(|p| matches!(p, CnpPeer::Networks(_) | CnpPeer::Nodes(_)))
            && r.protocols.iter().any(|p| matches!(p, CnpPort::Named(_))))
        && r.protocols.iter().all(|p| match p {
            CnpPort::Range { start, end, .. } => start <= end,
            CnpPort::Named(_) => true,
        })
}

/// Ways an object can be wrong.
#[derive(Clone, Copy, Debug)]
enum Corruption {
    /// A peer with a field of a newer CRD.
    UnknownPeerField,
    /// A protocol entry with port 0.
    PortZero,
    /// A peer with domainNames (not implemented).
    DomainNames,
    /// A subject selector with an unknown operator.
    BadSubject,
    /// An unknown tier.
    BadTier,
    /// A priority out of range.
    BadPriority,
}

fn corrupt(mut v: serde_json::Value, how: Corruption, dir: &str, rule: usize) -> serde_json::Value {
    let peers = if dir == "ingress" { "from" } else { "to" };
    let spec = &mut v["spec"];
    match how {
        Corruption::UnknownPeerField => {
            if let Some(r) = spec[dir].get_mut(rule) {
                r[peers]
                    .as_array_mut()
                    .expect("peers")
                    .push(json!({"serviceAccounts": {"names": ["x"]}}));
            }
        }
        Corruption::PortZero => {
            if let Some(r) = spec[dir].get_mut(rule) {
                r["protocols"] = json!([{"tcp": {"destinationPort": {"number": 0}}}]);
            }
        }
        Corruption::DomainNames => {
            if let Some(r) = spec[dir].get_mut(rule) {
                r[peers]
                    .as_array_mut()
                    .expect("peers")
                    .push(json!({"domainNames": ["example.com"]}));
            }
        }
        Corruption::BadSubject => {
            spec["subject"] = json!({"namespaces": {
                "matchExpressions": [{"key": "env", "operator": "Near"}],
            }});
        }
        Corruption::BadTier => spec["tier"] = json!("Middle"),
        Corruption::BadPriority => spec["priority"] = json!(5000),
    }
    v
}

fn corruption_strategy() -> impl Strategy<Value = Corruption> {
    prop_oneof![
        Just(Corruption::UnknownPeerField),
        Just(Corruption::PortZero),
        Just(Corruption::DomainNames),
        Just(Corruption::BadSubject),
        Just(Corruption::BadTier),
        Just(Corruption::BadPriority),
    ]
}

fn convert(v: serde_json::Value) -> netpol_agent::convert::Converted<ClusterNetworkPolicy> {
    let obj: netpol_agent::crd::ClusterNetworkPolicy =
        serde_json::from_value(v).expect("the wire types take any object");
    netpol_agent::convert::cluster_network_policy(&obj).expect("named")
}

proptest! {
    #![proptest_config(Config {
        cases: cases() / 2,
        failure_persistence: None,
        ..Config::default()
    })]

    /// Valid objects convert back to what was written, and an object made
    /// invalid in one place never allows a probe the valid one denies.
    #[test]
    fn an_invalid_cnp_never_allows_more_than_the_valid_one(
        cluster in cluster_strategy(),
        how in corruption_strategy(),
        pick in 0..4usize,
        egress in any::<bool>(),
        rule in 0..3usize,
    ) {
        let names: Vec<String> = cluster.cluster_policies.keys().cloned().collect();
        prop_assume!(!names.is_empty());
        let name = &names[pick % names.len()];
        let mut valid = cluster.clone();
        let cnp = valid.cluster_policies.get_mut(name).expect("picked");
        cnp.ingress.retain(expressible);
        cnp.egress.retain(expressible);
        let cnp = cnp.clone();

        // Round trip: what a user writes is what the model holds.
        let written = cnp_json(&cnp);
        let read = convert(written.clone());
        prop_assert!(read.errors.is_empty(), "{:?}", read.errors);
        prop_assert_eq!(&read.value, &cnp);

        let dir = if egress { "egress" } else { "ingress" };
        let broken = convert(corrupt(written, how, dir, rule));
        prop_assume!(!broken.errors.is_empty());
        prop_assert!(broken.value.invalid);
        let mut weakened = valid.clone();
        weakened.upsert_cluster_policy(broken.value.clone());

        let nodes = node_infos();
        for family_v4 in [true, false] {
            let pool = address_pool(family_v4);
            for &src in &pool {
                for &dst in &pool {
                    for (proto, port) in PROBES {
                        let proto = if proto == PROTO_ICMP && !family_v4 { PROTO_ICMPV6 } else { proto };
                        if reference::allowed_with_tiers(&weakened, &nodes, src, dst, proto, port) {
                            prop_assert!(
                                reference::allowed_with_tiers(&valid, &nodes, src, dst, proto, port),
                                "{how:?} in {dir}[{rule}] of {name} allowed {src} -> {dst} {proto}/{port}: {:?}",
                                broken.value
                            );
                        }
                    }
                }
            }
        }
    }
}
