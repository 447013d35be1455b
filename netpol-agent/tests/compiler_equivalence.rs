//! Randomized equivalence: the datapath simulator over compiled maps must
//! agree with the reference evaluator on random clusters and packets, and
//! incremental updates (changes applied one at a time, or snapshots) must
//! give what a fresh compile gives, through diffs that rebuild the maps.
//!
//! Cases per property: `NETPOL_PROPTEST_CASES` (default below).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnet::IpNet;
use netpol_agent::{
    compiler::{
        Change, Compiled, Compiler, IdentityInfo, Maps, NodeInfo, PolicySetInfo, RuleInfo, compile,
        diff, reference, sim,
    },
    model::{
        Cluster, IpBlock, LabelSelector, Labels, Namespace, NetworkPolicy, ObjectRef, Operator,
        Peer, Pod, PodPhase, PodRef, PortMatch, PortSpec, Protocol, Requirement, Rule,
    },
};
use netpol_common::{
    DIR_EGRESS, DIR_INGRESS, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP, PeerValue,
};
use proptest::{prelude::*, sample::select, test_runner::Config};

const DEFAULT_CASES: u32 = 2000;
const DEFAULT_INCREMENTAL_CASES: u32 = 200;

fn cases(default: u32) -> u32 {
    std::env::var("NETPOL_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------
// Generators: small alphabets so that selectors, ipBlocks and named ports
// collide often.
// ---------------------------------------------------------------------------

const NAMESPACES: [&str; 3] = ["a", "b", "c"];
const NODES: [&str; 3] = ["n1", "n2", "n3"];
const PORT_NAMES: [&str; 2] = ["http", "dns"];
const PORTS: [u16; 5] = [53, 80, 81, 8080, 8081];

fn nodes() -> Vec<NodeInfo> {
    (1..=3)
        .map(|i| NodeInfo {
            name: format!("n{i}"),
            addresses: vec![
                format!("192.168.0.{i}").parse().unwrap(),
                format!("fd00:ff::{i}").parse().unwrap(),
            ],
        })
        .collect()
}

fn v4(idx: u8) -> IpAddr {
    format!("10.0.{}.{}", idx / 8, idx % 8).parse().unwrap()
}

fn v6(idx: u8) -> IpAddr {
    format!("fd00:{}::{}", idx / 8, idx % 8).parse().unwrap()
}

/// Addresses packets are sent between: pod pool, node addresses, outsiders.
fn address_pool(family_v4: bool) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = (0..16).map(if family_v4 { v4 } else { v6 }).collect();
    let extra: &[&str] = if family_v4 {
        &[
            "192.168.0.1",
            "192.168.0.2",
            "192.168.0.3",
            "10.0.3.1",
            "172.16.0.1",
            "10.0.0.255",
        ]
    } else {
        &[
            "fd00:ff::1",
            "fd00:ff::2",
            "fd00:ff::3",
            "fd00:3::1",
            "2001:db8::1",
            "fd00::ff",
        ]
    };
    out.extend(extra.iter().map(|a| a.parse::<IpAddr>().unwrap()));
    out
}

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
        prop::collection::btree_set(select(&["x", "y"][..]), 1..=2),
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

const POD_KEYS: &[&str] = &["app", "tier"];
const NS_KEYS: &[&str] = &["env", "team", "kubernetes.io/metadata.name"];

fn ip_block_strategy() -> impl Strategy<Value = IpBlock> {
    let v4s = (
        0..16u8,
        select(&[0u8, 8, 16, 24, 29, 30, 32][..]),
        prop::option::weighted(0.4, (0..16u8, 1..=3u8)),
    )
        .prop_map(|(base, len, except)| {
            make_block(v4(base), len, except.map(|(e, d)| (v4(e), d)), 32)
        });
    let v6s = (
        0..16u8,
        select(&[0u8, 16, 32, 64, 125, 126, 128][..]),
        prop::option::weighted(0.4, (0..16u8, 1..=3u8)),
    )
        .prop_map(|(base, len, except)| {
            make_block(v6(base), len, except.map(|(e, d)| (v6(e), d)), 128)
        });
    prop_oneof![3 => v4s, 2 => v6s, 1 => Just(make_block("172.16.0.0".parse().unwrap(), 12, None, 32))]
}

/// An ipBlock around `base`; the except (if any) is `delta` bits longer and
/// placed around `except_base` if that is inside the cidr, else around `base`.
fn make_block(base: IpAddr, len: u8, except: Option<(IpAddr, u8)>, max: u8) -> IpBlock {
    let cidr = IpNet::new(base, len).unwrap().trunc();
    let except = except
        .filter(|_| len < max)
        .map(|(e, delta)| {
            let at = if cidr.contains(&e) { e } else { base };
            IpNet::new(at, (len + delta).min(max)).unwrap().trunc()
        })
        .into_iter()
        .collect();
    IpBlock { cidr, except }
}

fn peer_strategy() -> impl Strategy<Value = Peer> {
    prop_oneof![
        3 => (
            prop::option::weighted(0.5, selector_strategy(NS_KEYS)),
            prop::option::weighted(0.7, selector_strategy(POD_KEYS)),
        )
            .prop_map(|(namespace_selector, pod_selector)| Peer::Pods {
                namespace_selector,
                pod_selector,
            }),
        2 => ip_block_strategy().prop_map(Peer::IpBlock),
    ]
}

fn protocol_strategy() -> impl Strategy<Value = Protocol> {
    prop_oneof![4 => Just(Protocol::Tcp), 2 => Just(Protocol::Udp), 1 => Just(Protocol::Sctp)]
}

fn port_spec_strategy() -> impl Strategy<Value = PortSpec> {
    let port = prop_oneof![
        1 => Just(PortMatch::All),
        3 => (select(&PORTS[..]), select(&[0u16, 1, 100, 8000][..])).prop_map(|(start, d)| PortMatch::Range {
            start,
            end: start.saturating_add(d),
        }),
        3 => select(&PORT_NAMES[..]).prop_map(|n| PortMatch::Named(n.into())),
    ];
    (protocol_strategy(), port).prop_map(|(protocol, port)| PortSpec { protocol, port })
}

fn rule_strategy() -> impl Strategy<Value = Rule> {
    (
        prop::collection::vec(peer_strategy(), 0..=2),
        prop::collection::vec(port_spec_strategy(), 0..=2),
    )
        .prop_map(|(peers, ports)| Rule { peers, ports })
}

fn rules_strategy() -> impl Strategy<Value = Option<Vec<Rule>>> {
    prop::option::weighted(0.6, prop::collection::vec(rule_strategy(), 0..=2))
}

fn policy_strategy(idx: usize) -> impl Strategy<Value = NetworkPolicy> {
    (
        select(&NAMESPACES[..]),
        selector_strategy(POD_KEYS),
        rules_strategy(),
        rules_strategy(),
    )
        .prop_map(move |(ns, pod_selector, ingress, egress)| NetworkPolicy {
            namespace: ns.into(),
            name: format!("pol{idx}"),
            pod_selector,
            ingress,
            egress,
            invalid: false,
        })
}

fn phase_strategy() -> impl Strategy<Value = PodPhase> {
    prop_oneof![
        8 => Just(PodPhase::Running),
        1 => Just(PodPhase::Pending),
        1 => Just(PodPhase::Succeeded),
        1 => Just(PodPhase::Failed),
    ]
}

fn pod_strategy(idx: usize) -> impl Strategy<Value = Pod> {
    let port = (
        select(&PORT_NAMES[..]),
        protocol_strategy(),
        select(&PORTS[..]),
    )
        .prop_map(|(n, protocol, port)| netpol_agent::model::ContainerPort {
            name: Some(n.into()),
            port,
            protocol,
        });
    (
        select(&NAMESPACES[..]),
        labels_strategy(POD_KEYS),
        prop::option::weighted(0.95, select(&NODES[..])),
        prop::option::weighted(0.85, 0..16u8),
        prop::option::weighted(0.6, 0..16u8),
        prop::bool::weighted(0.08),
        phase_strategy(),
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
    let pods = (0..=10usize).prop_flat_map(|n| (0..n).map(pod_strategy).collect::<Vec<_>>());
    let policies = (0..=5usize).prop_flat_map(|n| (0..n).map(policy_strategy).collect::<Vec<_>>());
    let namespaces = (
        namespace_strategy("a"),
        namespace_strategy("b"),
        namespace_strategy("c"),
    );
    (namespaces, pods, policies).prop_map(|((a, b, c), pods, policies)| {
        let mut cluster = Cluster::default();
        for ns in [a, b, c].into_iter().flatten() {
            cluster.upsert_namespace(ns);
        }
        for p in pods {
            cluster.upsert_pod(p);
        }
        for p in policies {
            cluster.upsert_policy(p);
        }
        cluster
    })
}

fn compile_all(cluster: &Cluster, nodes: &[NodeInfo]) -> Vec<Compiled> {
    nodes.iter().map(|n| compile(cluster, n)).collect()
}

// ---------------------------------------------------------------------------
// Simulator == reference.
// ---------------------------------------------------------------------------

/// Every address worth sending from or to: the pod address pools (where
/// ipBlocks are built too), node addresses and a few outsiders.
fn addresses() -> Vec<IpAddr> {
    let mut v = address_pool(true);
    v.extend(address_pool(false));
    v
}

/// (protocol, port) pairs that hit the edges of the generated port specs.
const PROBES: [(u8, u16); 12] = [
    (PROTO_TCP, 53),
    (PROTO_TCP, 80),
    (PROTO_TCP, 81),
    (PROTO_TCP, 82),
    (PROTO_TCP, 8080),
    (PROTO_TCP, 8081),
    (PROTO_TCP, 16080),
    (PROTO_UDP, 53),
    (PROTO_UDP, 80),
    (PROTO_SCTP, 81),
    (PROTO_SCTP, 8080),
    (PROTO_ICMP, 0),
];

proptest! {
    #![proptest_config(Config { cases: cases(DEFAULT_CASES), ..Config::default() })]

    /// Every pair of interesting addresses (same family), with rotating probes.
    #[test]
    fn simulator_agrees_with_reference(cluster in cluster_strategy()) {
        let nodes = nodes();
        let compiled = compile_all(&cluster, &nodes);
        let addrs = addresses();
        for (i, &src) in addrs.iter().enumerate() {
            for (j, &dst) in addrs.iter().enumerate().filter(|(_, d)| d.is_ipv4() == src.is_ipv4()) {
                // A third of the probes per pair, rotating, so that every
                // probe meets every address.
                for k in 0..PROBES.len() / 3 {
                    let (proto, port) = PROBES[(i * 7 + j * 5 + k * 3) % PROBES.len()];
                    let proto = if proto == PROTO_ICMP && src.is_ipv6() { PROTO_ICMPV6 } else { proto };
                    let want = reference::allowed(&cluster, &nodes, src, dst, proto, port);
                    let got = sim::allowed(&compiled, src, dst, proto, port);
                    prop_assert_eq!(
                        got, want,
                        "{} -> {} proto {} port {}: simulator says {}, reference says {}\ncluster: {:#?}\ncompiled: {:#?}",
                        src, dst, proto, port, got, want, cluster, compiled
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Incremental updates == fresh compiles.
// ---------------------------------------------------------------------------

/// A change to the generated cluster. Pods and policies are named p<i> and
/// pol<i>, and found whatever their namespace.
#[derive(Clone, Debug)]
enum Step {
    UpsertPod(Pod),
    RemovePod(usize),
    SetPhase(usize, PodPhase),
    SetPodLabels(usize, Labels),
    UpsertNamespace(Option<Namespace>, &'static str),
    UpsertPolicy(NetworkPolicy),
    RemovePolicy(usize),
    /// Node `.0` gets its usual addresses plus, maybe, an address of the pod
    /// pool (a pod IP that is also a node address).
    SetNodeAddresses(usize, Option<u8>),
}

fn step_strategy() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..12usize).prop_flat_map(pod_strategy).prop_map(Step::UpsertPod),
        1 => (0..12usize).prop_map(Step::RemovePod),
        1 => (0..12usize, phase_strategy()).prop_map(|(i, p)| Step::SetPhase(i, p)),
        2 => (0..12usize, labels_strategy(POD_KEYS)).prop_map(|(i, l)| Step::SetPodLabels(i, l)),
        1 => select(&NAMESPACES[..]).prop_flat_map(|n| namespace_strategy(n).prop_map(move |ns| Step::UpsertNamespace(ns, n))),
        2 => (0..6usize).prop_flat_map(policy_strategy).prop_map(Step::UpsertPolicy),
        1 => (0..6usize).prop_map(Step::RemovePolicy),
        1 => (0..3usize, prop::option::of(0..16u8)).prop_map(|(n, ip)| Step::SetNodeAddresses(n, ip)),
    ]
}

/// Applies a step to the cluster and the nodes; returns the changes a
/// watcher would report, each with the node whose compiler gets it (`None`:
/// every node's).
fn apply_step(
    cluster: &mut Cluster,
    nodes: &mut [NodeInfo],
    step: &Step,
) -> Vec<(Option<usize>, Change)> {
    let pod_ref =
        |c: &Cluster, i: usize| c.pods.keys().find(|r| r.name == format!("p{i}")).cloned();
    let policy_ref = |c: &Cluster, name: &str| c.policies.keys().find(|r| r.name == name).cloned();
    let mut out = Vec::new();
    let mut edit_pod = |cluster: &mut Cluster, i: usize, edit: &dyn Fn(&mut Pod)| {
        if let Some(r) = pod_ref(cluster, i) {
            let pod = cluster.pods.get_mut(&r).unwrap();
            edit(pod);
            out.push((None, Change::UpsertPod(pod.clone())));
        }
    };
    match step.clone() {
        Step::UpsertPod(p) => {
            if let Some(old) = pod_ref(cluster, p.name[1..].parse().unwrap())
                && old != p.pod_ref()
            {
                cluster.remove_pod(&old);
                out.push((None, Change::RemovePod(old)));
            }
            cluster.upsert_pod(p.clone());
            out.push((None, Change::UpsertPod(p)));
        }
        Step::RemovePod(i) => {
            if let Some(r) = pod_ref(cluster, i) {
                cluster.remove_pod(&r);
                out.push((None, Change::RemovePod(r)));
            }
        }
        Step::SetPhase(i, phase) => edit_pod(cluster, i, &|p| p.phase = phase),
        Step::SetPodLabels(i, labels) => edit_pod(cluster, i, &|p| p.labels = labels.clone()),
        Step::UpsertNamespace(ns, name) => match ns {
            Some(ns) => {
                cluster.upsert_namespace(ns.clone());
                out.push((None, Change::UpsertNamespace(ns)));
            }
            None => {
                cluster.remove_namespace(name);
                out.push((None, Change::RemoveNamespace(name.into())));
            }
        },
        Step::UpsertPolicy(p) => {
            if let Some(old) = policy_ref(cluster, &p.name)
                && old != p.policy_ref()
            {
                cluster.remove_policy(&old);
                out.push((None, Change::RemovePolicy(old)));
            }
            cluster.upsert_policy(p.clone());
            out.push((None, Change::UpsertPolicy(p)));
        }
        Step::RemovePolicy(i) => {
            if let Some(old) = policy_ref(cluster, &format!("pol{i}")) {
                cluster.remove_policy(&old);
                out.push((None, Change::RemovePolicy(old)));
            }
        }
        Step::SetNodeAddresses(n, extra) => {
            let mut node = crate::nodes()[n].clone();
            node.addresses.extend(extra.map(v4));
            nodes[n] = node.clone();
            out.push((Some(n), Change::SetNode(node)));
        }
    }
    out
}

/// Compiled state with ids replaced by what they stand for, so compiles
/// with different id histories can be compared: an identity by the peer
/// entries that carry it (as `identity` and as `cidr_identity`) and the
/// prefixes it is written for, a policy id by the endpoints that use it, a
/// rule id by the rule.
#[derive(Debug, PartialEq, Eq)]
struct Canonical {
    endpoints: BTreeMap<PodRef, (String, u32)>,
    peers: BTreeMap<IpNet, (String, String, u32)>,
    policy: BTreeMap<(String, String, u8, u8, u16, u32), RuleInfo>,
    identities: BTreeMap<String, IdentityInfo>,
    policy_sets: BTreeMap<String, PolicySetInfo>,
    local_ips: BTreeMap<IpAddr, PodRef>,
}

fn canonical(c: &Compiled) -> Canonical {
    let mut peer_entries: Vec<(IpNet, PeerValue)> = Vec::new();
    for ((a, l), v) in &c.maps.peers_v4 {
        peer_entries.push((IpNet::new((*a).into(), *l).unwrap(), *v));
    }
    for ((a, l), v) in &c.maps.peers_v6 {
        peer_entries.push((IpNet::new((*a).into(), *l).unwrap(), *v));
    }
    let mut carriers: BTreeMap<u32, (Vec<IpNet>, Vec<IpNet>)> = BTreeMap::new();
    for (net, v) in &peer_entries {
        carriers.entry(v.identity).or_default().0.push(*net);
        if v.cidr_identity != 0 && v.cidr_identity != v.identity {
            carriers.entry(v.cidr_identity).or_default().1.push(*net);
        }
    }
    // A prefix entry can be hidden by a pod IP entry at the same address:
    // its identity is then known by the prefixes the table gives it.
    let identity = |id: u32| match (carriers.get(&id), c.identities.get(&id)) {
        _ if id == 0 => "ANY".to_string(),
        (None, None) => format!("identity {id} that no address has"),
        (carriers, info) => format!("{:?} {:?}", carriers, info.map(|i| &i.prefixes)),
    };
    let mut users: BTreeMap<u32, Vec<&PodRef>> = BTreeMap::new();
    for (pod, ep) in &c.maps.endpoints {
        users.entry(ep.policy_id).or_default().push(pod);
    }
    let policy_set = |id: u32| format!("{:?}", users.get(&id));
    let mut identities = BTreeMap::new();
    for (id, info) in &c.identities {
        let previous = identities.insert(identity(*id), info.clone());
        assert!(previous.is_none(), "two identities described alike: {c:#?}");
    }
    Canonical {
        endpoints: c
            .maps
            .endpoints
            .iter()
            .map(|(p, ep)| (p.clone(), (policy_set(ep.policy_id), ep.flags)))
            .collect(),
        peers: peer_entries
            .iter()
            .map(|(net, v)| {
                let cidr = if v.cidr_identity == 0 {
                    "none".to_string()
                } else {
                    identity(v.cidr_identity)
                };
                (*net, (identity(v.identity), cidr, v.flags))
            })
            .collect(),
        policy: c
            .maps
            .policy
            .iter()
            .map(|((k, len), v)| {
                let rule = c
                    .rules
                    .get(&v.rule_id)
                    .unwrap_or_else(|| panic!("rule {} not in the rules table", v.rule_id))
                    .clone();
                (
                    (
                        policy_set(k.policy_id),
                        identity(k.identity),
                        k.direction,
                        k.protocol,
                        k.port(),
                        *len,
                    ),
                    rule,
                )
            })
            .collect(),
        identities,
        policy_sets: c
            .policy_sets
            .iter()
            .map(|(id, info)| (policy_set(*id), info.clone()))
            .collect(),
        local_ips: c.local_ips.clone(),
    }
}

/// Every verdict allowed by `before` is allowed by `after` (what a diff
/// that does not revoke promises).
fn nothing_revoked(before: &Compiled, after: &Compiled) -> Result<(), String> {
    for pod in before.maps.endpoints.keys() {
        for dir in [DIR_INGRESS, DIR_EGRESS] {
            for peer in addresses() {
                for (proto, port) in [
                    (PROTO_TCP, 80),
                    (PROTO_UDP, 53),
                    (PROTO_TCP, 8081),
                    (PROTO_SCTP, 81),
                    (PROTO_ICMP, 0),
                ] {
                    let was = sim::endpoint_verdict(&before.maps, pod, dir, peer, proto, port);
                    let is = sim::endpoint_verdict(&after.maps, pod, dir, peer, proto, port);
                    if was.is_allowed() && !is.is_allowed() {
                        return Err(format!(
                            "{pod} dir {dir} peer {peer} {proto}/{port} was {was:?}, now {is:?}"
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(Config { cases: cases(DEFAULT_INCREMENTAL_CASES), ..Config::default() })]

    /// Per node, three compilers follow the same history: one fed the
    /// watcher's changes one at a time (`apply_change`), one fed snapshots
    /// (`compile`), and a fresh one per step. The first two must equal the
    /// fresh compile (up to ids) at every step, every incremental diff must
    /// be exactly the difference of the outputs around it (applied in order
    /// it rebuilds the maps), and a diff that does not revoke must not turn
    /// any allowed verdict into a denied one.
    #[test]
    fn incremental_updates_equal_fresh_compiles(
        initial in cluster_strategy(),
        steps in prop::collection::vec(step_strategy(), 1..8),
    ) {
        let mut nodes = nodes();
        let mut cluster = initial;
        let mut incremental: Vec<Compiler> = nodes.iter().map(|n| Compiler::new(n.clone())).collect();
        let mut snapshots: Vec<Compiler> = nodes.iter().map(|_| Compiler::default()).collect();
        let mut kernel: Vec<Maps> = nodes.iter().map(|_| Maps::default()).collect();
        for (i, compiler) in incremental.iter_mut().enumerate() {
            let d = compiler.sync(&cluster);
            prop_assert!(!d.revokes, "a first compile only adds");
            kernel[i].apply(&d.updates);
        }
        for (n, step) in std::iter::once(None).chain(steps.iter().map(Some)).enumerate() {
            let changes = match step {
                Some(step) => apply_step(&mut cluster, &mut nodes, step),
                None => Vec::new(),
            };
            for (i, node) in nodes.iter().enumerate() {
                let before = incremental[i].compiled().clone();
                let mut revokes = false;
                for (_, change) in changes.iter().filter(|(only, _)| only.is_none_or(|o| o == i)) {
                    let previous = incremental[i].compiled().clone();
                    let d = incremental[i].apply_change(change.clone());
                    let want = diff(&previous, incremental[i].compiled());
                    prop_assert_eq!(&d, &want, "step {} ({:?}) node {}: {:?}: diff != difference of outputs", n, step, node.name, change);
                    kernel[i].apply(&d.updates);
                    revokes |= d.revokes;
                }
                let now = incremental[i].compiled();
                prop_assert_eq!(&kernel[i], &now.maps, "step {} ({:?}) node {}: diffs applied != output", n, step, node.name);

                let fresh = compile(&cluster, node);
                prop_assert_eq!(canonical(now), canonical(&fresh), "step {} ({:?}) node {}: incremental != fresh", n, step, node.name);
                let snapshot = snapshots[i].compile(&cluster, node);
                prop_assert_eq!(canonical(&snapshot), canonical(&fresh), "step {} ({:?}) node {}: snapshot != fresh", n, step, node.name);

                if !revokes
                    && let Err(e) = nothing_revoked(&before, now)
                {
                    prop_assert!(false, "step {} ({:?}) node {}: {} but the diffs do not revoke", n, step, node.name, e);
                }
            }
        }
    }
}

#[test]
fn object_ref_displays_namespace_slash_name() {
    assert_eq!(ObjectRef::new("x", "a").to_string(), "x/a");
}
