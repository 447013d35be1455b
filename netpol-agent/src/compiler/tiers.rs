//! The tier compiler: ClusterNetworkPolicy tiers and NetworkPolicy compiled
//! together into one table of final decisions, per (direction, subject
//! class, peer class, protocol, disjoint port range). Pure: nothing here is
//! written to the datapath yet (the map layout for it comes with the
//! datapath half of issue 16); [`TierTable::decide`] answers from the table
//! alone, and the randomized tests hold it to [`super::reference::decide`].
//!
//! * **Atoms.** Every peer-side predicate in play: CNP `namespaces`, `pods`,
//!   `networks` and `nodes` peers, NetworkPolicy selector peers (with the
//!   policy's namespace) and ipBlocks. `Everything` (a fail-closed rule)
//!   needs none.
//! * **Peer classes.** Addresses with the same atom memberships, the same
//!   owning-pod container ports (egress named ports resolve on the
//!   destination) and the same "address of node X" set (the own-node
//!   exemption) share a class. A live pod's IP is classed by its owner and
//!   the IP itself; any other address by its longest matching *net* among
//!   the CIDRs in play, the node addresses (as host prefixes) and both /0:
//!   membership in every CIDR atom is a function of that net, as in
//!   `prefixes`.
//! * **Subject classes.** Per direction, live pods with the same ordered
//!   Admin policies, isolating NetworkPolicies (or none), ordered Baseline
//!   policies and, for ingress, the same container ports (ingress named
//!   ports resolve on the subject) and node.
//! * **Ports.** For each (subject class, peer class, protocol), the port
//!   numbers of every rule that can apply (ranges, named ports resolved on
//!   the destination) cut 0..=65535 into disjoint ranges; one decision per
//!   range, neighbours with equal decisions merged. [`port_prefixes`] turns
//!   a range into the LPM prefixes the policy map uses. Protocols without
//!   ports (ICMP and the rest) share one entry ([`PORTLESS`]): only rules
//!   without ports or protocols match them.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;
use netpol_common::{DIR_EGRESS, DIR_INGRESS, PROTO_ICMP, PROTO_SCTP, PROTO_TCP, PROTO_UDP};

use super::{
    NodeInfo,
    ports::port_prefixes,
    reference::{AuditRule, Decision},
};
use crate::model::{
    Action, Cluster, ClusterNetworkPolicy, CnpPeer, CnpPort, CnpRule, IpBlock, LabelSelector,
    Labels, NetworkPolicy, Node, Peer, Pod, PodRef, PolicyRef, PortMatch, Protocol, Rule, Tier,
};

/// The protocol key of every protocol without ports.
pub const PORTLESS: u8 = 0;
/// Protocol keys of a table: TCP, UDP, SCTP and [`PORTLESS`].
pub const PROTOCOL_KEYS: [u8; 4] = [PROTO_TCP, PROTO_UDP, PROTO_SCTP, PORTLESS];

/// A peer-side predicate.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Atom {
    /// Pods of namespaces the selector matches.
    CnpNamespaces(LabelSelector),
    CnpPods(LabelSelector, LabelSelector),
    /// NetworkPolicy selector peer of a policy in namespace `.0`.
    NpPods(String, Option<LabelSelector>, Option<LabelSelector>),
    Networks(Vec<IpNet>),
    Nodes(LabelSelector),
    Block(IpBlock),
}

/// What an address is, as far as the policies in play can tell.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PeerKey {
    /// Membership in every atom (by atom index).
    atoms: Vec<bool>,
    /// The owning live pod's container ports `(name, protocol, port)`;
    /// `None` for an address no live pod owns.
    pod_ports: Option<Vec<(String, Protocol, u16)>>,
    /// Nodes (of the compile's `nodes`) that have this address.
    own_nodes: Vec<String>,
}

/// What a subject pod is, for one direction.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SubjectKey {
    /// Admin CNPs that select the pod, in evaluation order (indices).
    admin: Vec<usize>,
    /// NetworkPolicies that isolate the pod in this direction (indices).
    isolating: Option<Vec<usize>>,
    baseline: Vec<usize>,
    /// Ingress only: the pod's container ports and node.
    ports: Vec<(String, Protocol, u16)>,
    node: Option<String>,
}

/// One disjoint port range and its decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
    pub decision: Decision,
    /// For an allowing [`Decision::NetworkPolicy`]: the first NetworkPolicy
    /// rule (policy, index in its ingress or egress list) that allows, so
    /// the datapath's entry can name it.
    pub np_rule: Option<(PolicyRef, usize)>,
    /// The audit rule (an audited policy's Deny rule stepped over, see
    /// `reference`): `Some` only when `decision` allows.
    pub audit: Option<AuditRule>,
}

/// The compiled tiers (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TierTable {
    /// Per direction (`DIR_INGRESS`, `DIR_EGRESS`): live pod -> subject class.
    subjects: BTreeMap<(u8, PodRef), u32>,
    /// IPs of live pods (their owner's) -> peer class.
    ip_peers: BTreeMap<IpAddr, u32>,
    /// Nets -> peer class of the addresses whose longest match it is.
    net_peers: BTreeMap<IpNet, u32>,
    /// IP -> the live pod that owns it (the first in namespace/name order).
    owners: BTreeMap<IpAddr, PodRef>,
    /// (direction, subject class, peer class, protocol key) -> disjoint
    /// ranges covering 0..=65535.
    pub entries: BTreeMap<(u8, u32, u32, u8), Vec<PortRange>>,
    /// Per subject class: whether anything judges it (an Admin or Baseline
    /// policy selects it, or NetworkPolicy isolates it); every decision of
    /// a class nothing judges is [`Decision::Default`].
    judged: Vec<bool>,
}

/// Subject key -> peer key -> ranges per [`PROTOCOL_KEYS`] entry.
type Memo = HashMap<SubjectKey, HashMap<PeerKey, [Vec<PortRange>; 4]>>;

/// The decisions of earlier compiles, for the next one: the ranges of each
/// (direction, subject class key, peer class key, protocol), valid while the
/// policies are the same. A class is its key's content (the policies that
/// select a pod, the atoms an address is in, ports, node), so a change that
/// makes no new class (a pod added, relabelled or gone among existing
/// classes, a namespace relabelled without moving pods between classes)
/// reuses every decision: no rule is evaluated again. The peer key of a pod
/// IP whose pod and namespace labels did not change is reused too (no
/// selector is matched again). What is left is linear: comparing pods,
/// classing, writing the entries. A policy change (CNP or NetworkPolicy)
/// empties it; a change of the nodes drops the peer keys.
#[derive(Debug, Default)]
pub struct TierCache {
    /// The policies the decisions were made under.
    cnps: Vec<ClusterNetworkPolicy>,
    nps: Vec<NetworkPolicy>,
    /// Per direction (0 ingress, 1 egress): subject key -> peer key ->
    /// ranges per [`PROTOCOL_KEYS`] entry.
    memo: [Memo; 2],
    /// The nodes (the cluster's and the compile's) the keys were made with.
    nodes: (Vec<Node>, Vec<NodeInfo>),
    /// Pod IP -> the owner and its namespace's labels as they were, and the
    /// IP's peer key.
    ip_keys: HashMap<IpAddr, (Pod, Labels, PeerKey)>,
    /// Decisions reused and made by the last compile (per (subject, peer)
    /// pair of classes).
    pub reused: usize,
    pub made: usize,
}

impl TierCache {
    /// Keeps the memo if the policies are the ones it was made under;
    /// else empties it and remembers these.
    /// Peer keys also need the same nodes (`nodes` peers, own-node
    /// addresses).
    fn validate(
        &mut self,
        cnps: &[&ClusterNetworkPolicy],
        nps: &[&NetworkPolicy],
        cluster_nodes: &BTreeMap<String, Node>,
        nodes: &[NodeInfo],
    ) {
        let same = self.cnps.len() == cnps.len()
            && self.nps.len() == nps.len()
            && self.cnps.iter().zip(cnps).all(|(a, b)| a == *b)
            && self.nps.iter().zip(nps).all(|(a, b)| a == *b);
        if !same {
            self.cnps = cnps.iter().map(|c| (*c).clone()).collect();
            self.nps = nps.iter().map(|n| (*n).clone()).collect();
            self.memo = Default::default();
            self.ip_keys.clear();
        }
        let same_nodes = self.nodes.0.len() == cluster_nodes.len()
            && self
                .nodes
                .0
                .iter()
                .zip(cluster_nodes.values())
                .all(|(a, b)| a == b)
            && self.nodes.1 == nodes;
        if !same_nodes {
            self.nodes = (cluster_nodes.values().cloned().collect(), nodes.to_vec());
            self.ip_keys.clear();
        }
        self.reused = 0;
        self.made = 0;
    }
}

/// Compile the tiers and NetworkPolicy of `cluster` for the nodes `nodes`
/// (whose addresses are exempt towards their own pods).
pub fn compile_tiers(cluster: &Cluster, nodes: &[NodeInfo]) -> TierTable {
    compile_tiers_for(cluster, nodes, None, &mut TierCache::default())
}

/// [`compile_tiers`] for one node's datapath: subjects are the live pods
/// that run on `node` (entries only for them); its addresses are the exempt
/// ones.
pub fn compile_tiers_local(cluster: &Cluster, node: &NodeInfo) -> TierTable {
    compile_tiers_local_cached(cluster, node, &mut TierCache::default())
}

/// [`compile_tiers_local`] reusing the decisions `cache` holds from earlier
/// compiles of the same node (see [`TierCache`]); the table is the same as
/// without it.
pub fn compile_tiers_local_cached(
    cluster: &Cluster,
    node: &NodeInfo,
    cache: &mut TierCache,
) -> TierTable {
    compile_tiers_for(cluster, std::slice::from_ref(node), Some(&node.name), cache)
}

fn compile_tiers_for(
    cluster: &Cluster,
    nodes: &[NodeInfo],
    only: Option<&str>,
    cache: &mut TierCache,
) -> TierTable {
    let cnps: Vec<&ClusterNetworkPolicy> = cluster.cluster_policies.values().collect();
    let nps: Vec<&NetworkPolicy> = cluster.policies.values().collect();
    cache.validate(&cnps, &nps, &cluster.nodes, nodes);

    // Atoms.
    let mut atoms: Vec<Atom> = Vec::new();
    let mut atom_index: HashMap<Atom, usize> = HashMap::new();
    let mut intern = |a: Atom| -> usize {
        *atom_index.entry(a.clone()).or_insert_with(|| {
            atoms.push(a);
            atoms.len() - 1
        })
    };
    let mut cnp_peer_atoms: HashMap<CnpPeer, usize> = HashMap::new();
    for cnp in &cnps {
        for rule in cnp.ingress.iter().chain(&cnp.egress) {
            for peer in &rule.peers {
                let atom = match peer {
                    CnpPeer::Everything => continue,
                    CnpPeer::Namespaces(s) => Atom::CnpNamespaces(s.clone()),
                    CnpPeer::Pods {
                        namespace_selector,
                        pod_selector,
                    } => Atom::CnpPods(namespace_selector.clone(), pod_selector.clone()),
                    CnpPeer::Networks(n) => Atom::Networks(n.clone()),
                    CnpPeer::Nodes(s) => Atom::Nodes(s.clone()),
                };
                let i = intern(atom);
                cnp_peer_atoms.insert(peer.clone(), i);
            }
        }
    }
    let mut np_peer_atoms: HashMap<(String, Peer), usize> = HashMap::new();
    for np in &nps {
        for rule in np
            .ingress
            .iter()
            .flatten()
            .chain(np.egress.iter().flatten())
        {
            for peer in &rule.peers {
                let atom = match peer {
                    Peer::IpBlock(b) => Atom::Block(b.clone()),
                    Peer::Pods {
                        namespace_selector,
                        pod_selector,
                    } => Atom::NpPods(
                        np.namespace.clone(),
                        namespace_selector.clone(),
                        pod_selector.clone(),
                    ),
                };
                let i = intern(atom);
                np_peer_atoms.insert((np.namespace.clone(), peer.clone()), i);
            }
        }
    }

    // Owners of pod IPs.
    let mut owners: BTreeMap<IpAddr, PodRef> = BTreeMap::new();
    for pod in cluster.pods.values().filter(|p| p.is_live()) {
        for ip in &pod.ips {
            owners.entry(*ip).or_insert_with(|| pod.pod_ref());
        }
    }

    // Nets: CIDRs in play, node addresses, both /0.
    let mut nets: BTreeSet<IpNet> = BTreeSet::new();
    nets.insert(IpNet::new(Ipv4Addr::UNSPECIFIED.into(), 0).expect("/0"));
    nets.insert(IpNet::new(Ipv6Addr::UNSPECIFIED.into(), 0).expect("/0"));
    for a in &atoms {
        match a {
            Atom::Networks(ns) => nets.extend(ns.iter().copied()),
            Atom::Block(b) => {
                nets.insert(b.cidr);
                nets.extend(b.except.iter().copied());
            }
            _ => {}
        }
    }
    for addr in cluster
        .nodes
        .values()
        .flat_map(|n| &n.addresses)
        .chain(nodes.iter().flat_map(|n| &n.addresses))
    {
        nets.insert(IpNet::from(*addr));
    }

    let addr_atoms = |net: IpNet, atoms_out: &mut Vec<bool>| {
        let host = (net.prefix_len() == net.max_prefix_len()).then(|| net.addr());
        for (i, a) in atoms.iter().enumerate() {
            atoms_out[i] = match a {
                Atom::Networks(ns) => ns.iter().any(|c| within(net, *c)),
                Atom::Block(b) => within(net, b.cidr) && !b.except.iter().any(|e| within(net, *e)),
                Atom::Nodes(sel) => host.is_some_and(|ip| {
                    cluster
                        .nodes
                        .values()
                        .any(|n| sel.matches(&n.labels) && n.addresses.contains(&ip))
                }),
                _ => atoms_out[i],
            };
        }
    };
    let own_nodes = |net: IpNet| -> Vec<String> {
        if net.prefix_len() != net.max_prefix_len() {
            return Vec::new();
        }
        nodes
            .iter()
            .filter(|n| n.addresses.contains(&net.addr()))
            .map(|n| n.name.clone())
            .collect()
    };

    let mut peer_keys: Vec<PeerKey> = Vec::new();
    let mut peer_index: HashMap<PeerKey, u32> = HashMap::new();
    let mut class_of = |k: PeerKey| -> u32 {
        *peer_index.entry(k.clone()).or_insert_with(|| {
            peer_keys.push(k);
            (peer_keys.len() - 1) as u32
        })
    };
    let mut net_peers = BTreeMap::new();
    for net in &nets {
        let mut bits = vec![false; atoms.len()];
        addr_atoms(*net, &mut bits);
        let key = PeerKey {
            atoms: bits,
            pod_ports: None,
            own_nodes: own_nodes(*net),
        };
        net_peers.insert(*net, class_of(key));
    }
    let mut ip_peers = BTreeMap::new();
    // A pod IP's key is a function of the pod, its namespace's labels and
    // the IP (atoms and nodes being the cache's): reused when those are.
    let mut old_ips = std::mem::take(&mut cache.ip_keys);
    let mut ip_keys = HashMap::with_capacity(owners.len());
    for (ip, owner) in &owners {
        let pod = &cluster.pods[owner];
        let ns_labels = cluster.namespace_labels(&pod.namespace);
        if let Some((p, l, key)) = old_ips.remove(ip)
            && &p == pod
            && &l == ns_labels
        {
            ip_peers.insert(*ip, class_of(key.clone()));
            ip_keys.insert(*ip, (p, l, key));
            continue;
        }
        let mut bits = vec![false; atoms.len()];
        for (i, a) in atoms.iter().enumerate() {
            bits[i] = match a {
                Atom::CnpNamespaces(s) => s.matches(ns_labels),
                Atom::CnpPods(ns, p) => ns.matches(ns_labels) && p.matches(&pod.labels),
                Atom::NpPods(policy_ns, ns, p) => {
                    (match ns {
                        None => &pod.namespace == policy_ns,
                        Some(sel) => sel.matches(ns_labels),
                    }) && p.as_ref().is_none_or(|sel| sel.matches(&pod.labels))
                }
                _ => false,
            };
        }
        addr_atoms(IpNet::from(*ip), &mut bits);
        let key = PeerKey {
            atoms: bits,
            pod_ports: Some(ports_of(pod)),
            own_nodes: own_nodes(IpNet::from(*ip)),
        };
        ip_peers.insert(*ip, class_of(key.clone()));
        ip_keys.insert(*ip, (pod.clone(), ns_labels.clone(), key));
    }
    cache.ip_keys = ip_keys;

    // Subjects.
    let mut order: Vec<usize> = (0..cnps.len()).collect();
    order.sort_by(|&a, &b| {
        (cnps[a].priority, &cnps[a].name).cmp(&(cnps[b].priority, &cnps[b].name))
    });
    let mut subjects = BTreeMap::new();
    let mut subject_keys: Vec<(u8, SubjectKey)> = Vec::new();
    let mut subject_index: HashMap<(u8, SubjectKey), u32> = HashMap::new();
    for pod in cluster
        .pods
        .values()
        .filter(|p| p.is_live() && only.is_none_or(|n| p.node.as_deref() == Some(n)))
    {
        let ns_labels = cluster.namespace_labels(&pod.namespace);
        // A policy without rules in a direction changes nothing there: it
        // is left out, so a direction no rule can decide is not judged.
        let tier = |t: Tier, dir: u8| -> Vec<usize> {
            order
                .iter()
                .copied()
                .filter(|&i| {
                    cnps[i].tier == t
                        && !cnps[i].rules(dir).is_empty()
                        && cnps[i].selects(pod, ns_labels)
                })
                .collect()
        };
        for dir in [DIR_INGRESS, DIR_EGRESS] {
            let isolating: Vec<usize> = (0..nps.len())
                .filter(|&i| nps[i].selects(pod) && nps[i].rules(dir).is_some())
                .collect();
            let key = SubjectKey {
                admin: tier(Tier::Admin, dir),
                isolating: (!isolating.is_empty()).then_some(isolating),
                baseline: tier(Tier::Baseline, dir),
                ports: if dir == DIR_INGRESS {
                    ports_of(pod)
                } else {
                    Vec::new()
                },
                node: if dir == DIR_INGRESS {
                    pod.node.clone()
                } else {
                    None
                },
            };
            let id = *subject_index.entry((dir, key.clone())).or_insert_with(|| {
                subject_keys.push((dir, key));
                (subject_keys.len() - 1) as u32
            });
            subjects.insert((dir, pod.pod_ref()), id);
        }
    }

    // Entries.
    let ctx = Ctx {
        cnps: &cnps,
        nps: &nps,
        cnp_peer_atoms: &cnp_peer_atoms,
        np_peer_atoms: &np_peer_atoms,
    };
    let mut entries = BTreeMap::new();
    // Decisions of this compile, which become the cache's: classes that
    // went away are forgotten.
    let mut memo: [Memo; 2] = Default::default();
    for (s, (dir, skey)) in subject_keys.iter().enumerate() {
        let d = usize::from(*dir != DIR_INGRESS);
        let old = cache.memo[d].remove(skey);
        let mut by_peer: HashMap<PeerKey, [Vec<PortRange>; 4]> =
            HashMap::with_capacity(peer_keys.len());
        for (p, pkey) in peer_keys.iter().enumerate() {
            let ranges = match old.as_ref().and_then(|o| o.get(pkey)) {
                Some(r) => {
                    cache.reused += 1;
                    r.clone()
                }
                None => {
                    cache.made += 1;
                    PROTOCOL_KEYS.map(|proto| ctx.ranges(*dir, skey, pkey, proto))
                }
            };
            for (proto, r) in PROTOCOL_KEYS.iter().zip(&ranges) {
                entries.insert((*dir, s as u32, p as u32, *proto), r.clone());
            }
            by_peer.insert(pkey.clone(), ranges);
        }
        memo[d].insert(skey.clone(), by_peer);
    }
    cache.memo = memo;
    let judged = subject_keys
        .iter()
        .map(|(_, k)| !k.admin.is_empty() || k.isolating.is_some() || !k.baseline.is_empty())
        .collect();
    TierTable {
        subjects,
        ip_peers,
        net_peers,
        owners,
        entries,
        judged,
    }
}

/// Whether every address of `net` is in `cidr`.
fn within(net: IpNet, cidr: IpNet) -> bool {
    cidr.prefix_len() <= net.prefix_len() && cidr.contains(&net.network())
}

fn ports_of(pod: &Pod) -> Vec<(String, Protocol, u16)> {
    let mut v: Vec<_> = pod
        .ports
        .iter()
        .filter_map(|p| Some((p.name.clone()?, p.protocol, p.port)))
        .collect();
    v.sort();
    v.dedup();
    v
}

fn resolve<'a>(
    ports: &'a [(String, Protocol, u16)],
    name: &'a str,
) -> impl Iterator<Item = (Protocol, u16)> + 'a {
    ports
        .iter()
        .filter(move |(n, _, _)| n == name)
        .map(|(_, proto, port)| (*proto, *port))
}

struct Ctx<'a> {
    cnps: &'a [&'a ClusterNetworkPolicy],
    nps: &'a [&'a NetworkPolicy],
    cnp_peer_atoms: &'a HashMap<CnpPeer, usize>,
    np_peer_atoms: &'a HashMap<(String, Peer), usize>,
}

impl Ctx<'_> {
    /// The disjoint ranges of one (direction, subject, peer, protocol).
    fn ranges(&self, dir: u8, s: &SubjectKey, p: &PeerKey, proto: u8) -> Vec<PortRange> {
        let destination: Option<&[(String, Protocol, u16)]> = if dir == DIR_INGRESS {
            Some(&s.ports)
        } else {
            p.pod_ports.as_deref()
        };
        // Cut points: the first port of every range and the one after it.
        let mut cuts: BTreeSet<u32> = BTreeSet::from([0]);
        if proto != PORTLESS {
            let mut add = |start: u16, end: u16| {
                cuts.insert(start.into());
                cuts.insert(u32::from(end) + 1);
            };
            for &i in s.admin.iter().chain(&s.baseline) {
                for rule in self.cnps[i].rules(dir) {
                    for port in &rule.protocols {
                        match port {
                            CnpPort::Range {
                                protocol,
                                start,
                                end,
                            } if protocol.number() == proto => add(*start, *end),
                            CnpPort::Range { .. } => {}
                            CnpPort::Named(name) => {
                                for (protocol, port) in
                                    resolve(destination.unwrap_or_default(), name)
                                {
                                    if protocol.number() == proto {
                                        add(port, port);
                                    }
                                }
                            }
                        }
                    }
                }
            }
            for &i in s.isolating.iter().flatten() {
                for rule in self.nps[i].rules(dir).unwrap_or_default() {
                    for spec in rule.ports.iter().filter(|sp| sp.protocol.number() == proto) {
                        match &spec.port {
                            PortMatch::All => {}
                            PortMatch::Range { start, end } => add(*start, *end),
                            PortMatch::Named(name) => {
                                for (protocol, port) in
                                    resolve(destination.unwrap_or_default(), name)
                                {
                                    if protocol == spec.protocol {
                                        add(port, port);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        let cuts: Vec<u32> = cuts.into_iter().filter(|c| *c <= 0xffff).collect();
        let mut out: Vec<PortRange> = Vec::new();
        for (k, &start) in cuts.iter().enumerate() {
            let end = cuts.get(k + 1).map_or(0xffff, |next| next - 1);
            let (start, end) = (start as u16, end as u16);
            let probe_proto = if proto == PORTLESS { PROTO_ICMP } else { proto };
            let (decision, audit) = self.decide(dir, s, p, destination, probe_proto, start);
            let np_rule = match decision {
                Decision::NetworkPolicy { allowed: true } => {
                    self.np_rule(dir, s, p, destination, probe_proto, start)
                }
                _ => None,
            };
            match out.last_mut() {
                Some(last)
                    if last.decision == decision
                        && last.np_rule == np_rule
                        && last.audit == audit =>
                {
                    last.end = end
                }
                _ => out.push(PortRange {
                    start,
                    end,
                    decision,
                    np_rule,
                    audit,
                }),
            }
        }
        out
    }

    fn decide(
        &self,
        dir: u8,
        s: &SubjectKey,
        p: &PeerKey,
        destination: Option<&[(String, Protocol, u16)]>,
        proto: u8,
        port: u16,
    ) -> (Decision, Option<AuditRule>) {
        if dir == DIR_INGRESS && s.node.as_ref().is_some_and(|n| p.own_nodes.contains(n)) {
            return (Decision::OwnNode, None);
        }
        let mut audit: Option<AuditRule> = None;
        let mut tier = |policies: &[usize], tier: Tier| -> Option<Decision> {
            for &i in policies {
                let cnp = self.cnps[i];
                for (index, rule) in cnp.rules(dir).iter().enumerate() {
                    if !self.cnp_rule_matches(rule, p, destination, proto, port) {
                        continue;
                    }
                    if cnp.audit && rule.action == Action::Deny {
                        audit.get_or_insert_with(|| AuditRule {
                            tier,
                            policy: cnp.name.clone(),
                            index,
                            name: rule.name.clone(),
                        });
                        continue;
                    }
                    return (rule.action != Action::Pass).then(|| Decision::Rule {
                        tier,
                        policy: cnp.name.clone(),
                        index,
                        name: rule.name.clone(),
                        action: rule.action,
                    });
                }
            }
            None
        };
        let decision = tier(&s.admin, Tier::Admin)
            .or_else(|| {
                s.isolating.as_ref().map(|isolating| {
                    let allowed = isolating.iter().any(|&i| {
                        let np = self.nps[i];
                        np.rules(dir)
                            .unwrap_or_default()
                            .iter()
                            .any(|rule| self.np_rule_matches(np, rule, p, destination, proto, port))
                    });
                    Decision::NetworkPolicy { allowed }
                })
            })
            .or_else(|| tier(&s.baseline, Tier::Baseline))
            .unwrap_or(Decision::Default);
        let audit = if decision.allowed() { audit } else { None };
        (decision, audit)
    }

    /// The first NetworkPolicy rule (policies in name order, rules in
    /// order) that allows; the one an allow entry names.
    fn np_rule(
        &self,
        dir: u8,
        s: &SubjectKey,
        p: &PeerKey,
        destination: Option<&[(String, Protocol, u16)]>,
        proto: u8,
        port: u16,
    ) -> Option<(PolicyRef, usize)> {
        s.isolating.iter().flatten().find_map(|&i| {
            let np = self.nps[i];
            np.rules(dir)
                .unwrap_or_default()
                .iter()
                .position(|rule| self.np_rule_matches(np, rule, p, destination, proto, port))
                .map(|index| (np.policy_ref(), index))
        })
    }

    fn cnp_rule_matches(
        &self,
        rule: &CnpRule,
        p: &PeerKey,
        destination: Option<&[(String, Protocol, u16)]>,
        proto: u8,
        port: u16,
    ) -> bool {
        let peer = rule.peers.iter().any(|peer| match peer {
            CnpPeer::Everything => true,
            other => p.atoms[self.cnp_peer_atoms[other]],
        });
        let ports = rule.protocols.is_empty()
            || rule.protocols.iter().any(|pp| match pp {
                CnpPort::Range {
                    protocol,
                    start,
                    end,
                } => protocol.number() == proto && (*start..=*end).contains(&port),
                CnpPort::Named(name) => resolve(destination.unwrap_or_default(), name)
                    .any(|(pr, po)| pr.number() == proto && po == port),
            });
        peer && ports
    }

    fn np_rule_matches(
        &self,
        np: &NetworkPolicy,
        rule: &Rule,
        p: &PeerKey,
        destination: Option<&[(String, Protocol, u16)]>,
        proto: u8,
        port: u16,
    ) -> bool {
        let peer = rule.peers.is_empty()
            || rule
                .peers
                .iter()
                .any(|peer| p.atoms[self.np_peer_atoms[&(np.namespace.clone(), peer.clone())]]);
        let ports = rule.ports.is_empty()
            || rule.ports.iter().any(|spec| {
                spec.protocol.number() == proto
                    && match &spec.port {
                        PortMatch::All => true,
                        PortMatch::Range { start, end } => (*start..=*end).contains(&port),
                        PortMatch::Named(name) => resolve(destination.unwrap_or_default(), name)
                            .any(|(pr, po)| pr == spec.protocol && po == port),
                    }
            });
        peer && ports
    }
}

impl TierTable {
    /// The peer class of an address: its owner's if a live pod owns it,
    /// else its longest matching net's.
    fn peer_class(&self, ip: IpAddr) -> u32 {
        if let Some(c) = self.ip_peers.get(&ip) {
            return *c;
        }
        self.net_peers
            .iter()
            .filter(|(net, _)| net.contains(&ip))
            .max_by_key(|(net, _)| net.prefix_len())
            .map(|(_, c)| *c)
            .expect("both /0 nets are always present")
    }

    fn lookup(&self, dir: u8, pod: &PodRef, peer: IpAddr, proto: u8, port: u16) -> Decision {
        self.lookup_range(dir, pod, peer, proto, port)
            .decision
            .clone()
    }

    fn lookup_range(
        &self,
        dir: u8,
        pod: &PodRef,
        peer: IpAddr,
        proto: u8,
        port: u16,
    ) -> &PortRange {
        let subject = self.subjects[&(dir, pod.clone())];
        let key = if matches!(proto, PROTO_TCP | PROTO_UDP | PROTO_SCTP) {
            proto
        } else {
            PORTLESS
        };
        let ranges = &self.entries[&(dir, subject, self.peer_class(peer), key)];
        let port = if key == PORTLESS { 0 } else { port };
        ranges
            .iter()
            .find(|r| (r.start..=r.end).contains(&port))
            .expect("ranges cover every port")
    }

    /// [`Self::decide`] with each direction's audit rule, from the table
    /// alone.
    pub fn decide_audited(
        &self,
        src: IpAddr,
        dst: IpAddr,
        proto: u8,
        port: u16,
    ) -> ((Decision, Option<AuditRule>), (Decision, Option<AuditRule>)) {
        let side = |dir: u8, pod: Option<&PodRef>, peer: IpAddr| {
            pod.map_or((Decision::Default, None), |pod| {
                let r = self.lookup_range(dir, pod, peer, proto, port);
                (r.decision.clone(), r.audit.clone())
            })
        };
        (
            side(DIR_EGRESS, self.owners.get(&src), dst),
            side(DIR_INGRESS, self.owners.get(&dst), src),
        )
    }

    /// The decision of each direction of a new connection `src -> dst`
    /// (egress of the source pod, ingress of the destination pod), from the
    /// table alone; [`Decision::Default`] for a side that is not a pod.
    pub fn decide(&self, src: IpAddr, dst: IpAddr, proto: u8, port: u16) -> (Decision, Decision) {
        let egress = self.owners.get(&src).map_or(Decision::Default, |pod| {
            self.lookup(DIR_EGRESS, pod, dst, proto, port)
        });
        let ingress = self.owners.get(&dst).map_or(Decision::Default, |pod| {
            self.lookup(DIR_INGRESS, pod, src, proto, port)
        });
        (egress, ingress)
    }

    /// Whether both directions allow `src -> dst`.
    pub fn allowed(&self, src: IpAddr, dst: IpAddr, proto: u8, port: u16) -> bool {
        let (e, i) = self.decide(src, dst, proto, port);
        e.allowed() && i.allowed()
    }

    /// Number of subject classes (both directions) and peer classes.
    pub fn class_counts(&self) -> (usize, usize) {
        let subjects: BTreeSet<(u8, u32)> =
            self.subjects.iter().map(|((d, _), c)| (*d, *c)).collect();
        let peers: BTreeSet<u32> = self
            .ip_peers
            .values()
            .chain(self.net_peers.values())
            .copied()
            .collect();
        (subjects.len(), peers.len())
    }

    /// Every entry as the policy map would key it: (direction, subject
    /// class, peer class, protocol key, first port, LPM prefix length) and
    /// its decision.
    pub fn prefix_entries(
        &self,
    ) -> impl Iterator<Item = ((u8, u32, u32, u8, u16, u32), &Decision)> {
        self.entries.iter().flat_map(|(&(d, s, p, proto), ranges)| {
            ranges.iter().flat_map(move |r| {
                port_prefixes(r.start, r.end)
                    .into_iter()
                    .map(move |(first, len)| ((d, s, p, proto, first, len), &r.decision))
            })
        })
    }

    /// Whether anything judges a subject class (see `judged`).
    pub fn judged(&self, class: u32) -> bool {
        self.judged.get(class as usize).copied().unwrap_or(true)
    }

    /// Live IPs (their owner's) -> peer class.
    pub fn ip_classes(&self) -> &BTreeMap<IpAddr, u32> {
        &self.ip_peers
    }

    /// Nets -> peer class of the addresses whose longest match it is.
    pub fn net_classes(&self) -> &BTreeMap<IpNet, u32> {
        &self.net_peers
    }

    /// The subject class of a live pod in a direction.
    pub fn subject_class(&self, direction: u8, pod: &PodRef) -> Option<u32> {
        self.subjects.get(&(direction, pod.clone())).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ObjectRef, build::*};

    #[test]
    fn overlapping_ranges_split_into_disjoint_ranges() {
        // Admin: deny TCP 80-90 from b; accept TCP 85-100 from b (shadowed
        // where they overlap); NetworkPolicy allows nothing (isolates).
        let c = cluster()
            .namespace(namespace("a"))
            .namespace(namespace("b"))
            .pod(pod("a", "server").ip("10.0.0.1").node("n1"))
            .pod(pod("b", "client").ip("10.0.0.2").node("n1"))
            .policy(policy("a", "isolate").deny_ingress())
            .cluster_policy(
                admin("p")
                    .subject(in_namespaces(labels([(
                        "kubernetes.io/metadata.name",
                        "a",
                    )])))
                    .ingress(deny().peer(peer_namespaces(all())).port(dports(
                        Protocol::Tcp,
                        80,
                        90,
                    )))
                    .ingress(accept().peer(peer_namespaces(all())).port(dports(
                        Protocol::Tcp,
                        85,
                        100,
                    ))),
            );
        let t = compile_tiers(&c, &[]);
        let server = ObjectRef::new("a", "server");
        let s = t.subject_class(DIR_INGRESS, &server).expect("live pod");
        let p = t.peer_class("10.0.0.2".parse().unwrap());
        let ranges = &t.entries[&(DIR_INGRESS, s, p, PROTO_TCP)];
        let spans: Vec<(u16, u16, bool)> = ranges
            .iter()
            .map(|r| (r.start, r.end, r.decision.allowed()))
            .collect();
        assert_eq!(
            spans,
            [
                (0, 79, false),
                (80, 90, false),
                (91, 100, true),
                (101, 65535, false)
            ],
            "{ranges:?}"
        );
        assert!(matches!(
            ranges[0].decision,
            Decision::NetworkPolicy { allowed: false }
        ));
        assert!(matches!(
            ranges[1].decision,
            Decision::Rule {
                action: Action::Deny,
                ..
            }
        ));
        // The prefixes cover 0..=65535 exactly once per entry.
        let mut covered = 0u32;
        for ((d, ss, pp, proto, _, len), _) in t.prefix_entries() {
            if (d, ss, pp, proto) == (DIR_INGRESS, s, p, PROTO_TCP) {
                covered += 1 << (96 - len);
            }
        }
        assert_eq!(covered, 65536);
    }
}
