//! The policy compiler: a pure function from cluster state ([`Cluster`]) and
//! one node ([`NodeInfo`]) to the contents of that node's datapath maps
//! ([`Compiled`]), plus [`diff`] to turn two compiles into map updates.
//!
//! # Design
//!
//! * **Identities.** Every address gets an identity: its equivalence class
//!   under every peer predicate in play on this node (the `from`/`to` entries
//!   of the policies that select a local pod). Pod and namespace selectors are
//!   evaluated on the live pod that owns the address, ipBlocks on the address
//!   itself. For egress named ports the identity also records the owning
//!   pod's resolution of the names in play, because an egress named port
//!   resolves on the peer (destination) pod. Addresses that are not pod IPs
//!   are classified by their longest matching prefix among all ipBlock cidrs
//!   and excepts: membership in any ipBlock only depends on that prefix. Pod
//!   IPs are /32 (/128) entries; `0.0.0.0/0` and `::/0` are always present.
//!   A prefix whose identity equals the one of its nearest enclosing prefix is
//!   left out (the LPM lookup gives the same answer without it).
//! * **Policy sets.** A local pod's policy set is the list of policies that
//!   select it plus its own resolution of the ingress named ports they use
//!   (ingress named ports resolve on the local pod). Pods with equal policy
//!   sets share a `policy_id`, and entries are compiled once per policy set.
//! * **Entries.** A rule becomes `identities x port prefixes` entries per
//!   policy set; a rule that matches every address (no `from`/`to`, or
//!   ipBlocks `0.0.0.0/0` and `::/0` without excepts) uses [`IDENTITY_ANY`].
//!   Identical pods share an identity and identical endpoints a policy id, so
//!   the map grows with policy sets x distinct label sets, never with pods x
//!   pods. A broad ipBlock that covers pod IPs (say the cluster CIDR) matches
//!   every pod identity, so each policy set using one gets an entry per pod
//!   identity: see `tests/compiler_scale.rs` for numbers.
//! * **Scope.** Only the policies that select a local pod are in play on a
//!   node: identities are split by their peers and named ports alone.
//! * **Stable ids.** [`Compiler`] remembers identity, policy-set, rule and
//!   endpoint ids between compiles, so unrelated changes leave ids alone and
//!   map diffs stay small. Ids that a compile no longer uses are forgotten
//!   and never reused.
//!
//! [`reference`] answers the same questions straight from the spec, and
//! [`sim`] answers them from map contents only, the way the datapath does;
//! the tests check that the two agree.

pub mod diff;
mod ids;
pub mod ports;
pub mod reference;
pub mod sim;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

pub use diff::{Diff, MapUpdate, diff, diff_maps};
use ids::IdTable;
use ipnet::IpNet;
use netpol_common::{
    DIR_EGRESS, DIR_INGRESS, EP_F_AUDIT, EP_F_EGRESS_ISOLATED, EP_F_INGRESS_ISOLATED,
    EndpointValue, IDENTITY_ANY, PEER_F_HOST, POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTO,
    POLICY_PREFIX_FULL, PeerValue, PolicyKey, PolicyValue,
};

use crate::model::{
    Cluster, IpBlock, LabelSelector, Labels, NetworkPolicy, Peer, Pod, PodRef, PolicyRef,
    PortMatch, Protocol, Rule,
};

/// The node a compile is for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// `spec.nodeName` of the pods that run here.
    pub name: String,
    /// The node's own addresses: traffic from them to local pods is allowed.
    pub addresses: Vec<IpAddr>,
}

impl NodeInfo {
    /// A node (panics on a malformed address: fixtures only).
    pub fn new<'a>(name: &str, addresses: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            name: name.into(),
            addresses: addresses
                .into_iter()
                .map(|a| {
                    a.parse()
                        .unwrap_or_else(|e| panic!("bad address {a:?}: {e}"))
                })
                .collect(),
        }
    }
}

/// The contents of one node's datapath maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Maps {
    /// Local endpoints (the agent keys the kernel map by the pod's veth).
    pub endpoints: BTreeMap<PodRef, EndpointValue>,
    /// `NETPOL_PEERS_V4`: (network address, prefix length) -> peer.
    pub peers_v4: BTreeMap<(Ipv4Addr, u8), PeerValue>,
    /// `NETPOL_PEERS_V6`.
    pub peers_v6: BTreeMap<(Ipv6Addr, u8), PeerValue>,
    /// `NETPOL_POLICY`: (key, prefix length) -> value.
    pub policy: BTreeMap<(PolicyKey, u32), PolicyValue>,
}

/// Which rule a `rule_id` names.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleInfo {
    pub namespace: String,
    pub policy: String,
    /// `DIR_INGRESS` or `DIR_EGRESS`.
    pub direction: u8,
    /// Index in the policy's `ingress` or `egress` list.
    pub index: u32,
}

/// The policies that isolate the endpoints of one `policy_id`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicySetInfo {
    /// Policies with type Ingress that select the endpoints.
    pub ingress: Vec<PolicyRef>,
    /// Policies with type Egress that select the endpoints.
    pub egress: Vec<PolicyRef>,
}

/// What addresses an identity covers (for explain and flow logs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdentityInfo {
    /// Pods whose IPs have this identity.
    pub pods: Vec<PodRef>,
    /// Prefixes in the peer maps with this identity (addresses whose longest
    /// match is one of them, unless a longer entry is present).
    pub prefixes: Vec<IpNet>,
    /// Node addresses with this identity.
    pub node_addresses: Vec<IpAddr>,
}

/// Everything one compile produces for one node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    pub node: String,
    /// The map contents.
    pub maps: Maps,
    /// `rule_id` -> rule, for every rule of the policies in play on this node.
    pub rules: BTreeMap<u32, RuleInfo>,
    /// `policy_id` -> isolating policies.
    pub policy_sets: BTreeMap<u32, PolicySetInfo>,
    /// identity -> what it covers.
    pub identities: BTreeMap<u32, IdentityInfo>,
    /// IPs of local endpoints -> the pod (the live pod that owns the IP).
    pub local_ips: BTreeMap<IpAddr, PodRef>,
}

impl Compiled {
    /// The policies that isolate a local pod in one direction (`DIR_*`);
    /// empty when the pod is not isolated or not local.
    pub fn isolating_policies(&self, pod: &PodRef, direction: u8) -> &[PolicyRef] {
        let Some(set) = self
            .maps
            .endpoints
            .get(pod)
            .and_then(|ep| self.policy_sets.get(&ep.policy_id))
        else {
            return &[];
        };
        if direction == DIR_INGRESS {
            &set.ingress
        } else {
            &set.egress
        }
    }
}

/// Compiles a cluster for one node with fresh ids. Use a [`Compiler`] to keep
/// ids stable across compiles.
pub fn compile(cluster: &Cluster, node: &NodeInfo) -> Compiled {
    Compiler::default().compile(cluster, node)
}

/// A peer predicate, or a named port, in play on a node. Interned to keep
/// identity keys small.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Atom {
    /// Pods selected by a `from`/`to` entry with selectors.
    Pods {
        /// `None`: the policy's own namespace, given in `own_namespace`.
        namespace_selector: Option<LabelSelector>,
        own_namespace: Option<String>,
        pod_selector: Option<LabelSelector>,
    },
    Block(IpBlock),
    /// A named port of an egress rule (resolved on the peer pod).
    EgressNamed(String, Protocol),
    /// A named port of an ingress rule (resolved on the local pod).
    IngressNamed(String, Protocol),
}

/// An identity: the sorted ids of the peer atoms its addresses satisfy, and
/// the owning pod's resolution of egress named ports (non-empty ones only).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
struct IdentityKey {
    atoms: Vec<u32>,
    named: Vec<(u32, Vec<u16>)>,
}

/// A policy set: the (sorted) policies selecting an endpoint and the
/// endpoint's resolution of their ingress named ports (non-empty ones only).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
struct PolicySetKey {
    policies: Vec<PolicyRef>,
    named: Vec<(u32, Vec<u16>)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct RuleKey {
    policy: PolicyRef,
    direction: u8,
    index: u32,
}

/// Keeps ids stable across compiles of one node.
#[derive(Debug, Default)]
pub struct Compiler {
    atoms: IdTable<Atom>,
    identities: IdTable<IdentityKey>,
    policy_sets: IdTable<PolicySetKey>,
    rules: IdTable<RuleKey>,
    endpoints: IdTable<PodRef>,
}

/// One rule, with its peers resolved to identities.
struct RulePlan {
    rule_id: u32,
    /// The rule matches every address.
    any_peer: bool,
    /// Identities matched by the rule's peers (when not `any_peer`).
    identities: Vec<u32>,
    /// (protocol, port, prefix) entries that do not depend on the peer.
    ports: Vec<(u8, u16, u32)>,
    /// Named ports: (atom id, protocol).
    named: Vec<(u32, Protocol)>,
}

/// Which pods are local and which policies are in play on a node.
struct Scope<'c> {
    /// Live pods on this node (the endpoints).
    local: Vec<&'c Pod>,
    /// For each local pod, the policies (with a type) that select it.
    selecting: Vec<Vec<&'c NetworkPolicy>>,
    /// Policies that select at least one local pod: only their peers and
    /// ports shape identities and entries on this node.
    relevant: BTreeMap<PolicyRef, &'c NetworkPolicy>,
    /// Every IP of a live pod -> that pod (the first in namespace/name order,
    /// should two claim it).
    owners: HashMap<IpAddr, &'c Pod>,
}

impl<'c> Scope<'c> {
    fn new(cluster: &'c Cluster, node: &NodeInfo) -> Self {
        let local: Vec<&Pod> = cluster
            .pods
            .values()
            .filter(|p| p.is_live() && p.node.as_deref() == Some(node.name.as_str()))
            .collect();
        let mut by_namespace: BTreeMap<&str, Vec<&NetworkPolicy>> = BTreeMap::new();
        for pol in cluster.policies.values() {
            if pol.ingress.is_some() || pol.egress.is_some() {
                by_namespace.entry(&pol.namespace).or_default().push(pol);
            }
        }
        let selecting: Vec<Vec<&NetworkPolicy>> = local
            .iter()
            .map(|pod| {
                let candidates = by_namespace.get(pod.namespace.as_str());
                candidates
                    .into_iter()
                    .flatten()
                    .copied()
                    .filter(|pol| pol.selects(pod))
                    .collect()
            })
            .collect();
        let relevant = selecting
            .iter()
            .flatten()
            .map(|pol| (pol.policy_ref(), *pol))
            .collect();
        let mut owners: HashMap<IpAddr, &Pod> = HashMap::new();
        for pod in cluster.pods.values().filter(|p| p.is_live()) {
            for ip in &pod.ips {
                owners.entry(*ip).or_insert(pod);
            }
        }
        Self {
            local,
            selecting,
            relevant,
            owners,
        }
    }

    /// The IPs of `pod` that it owns.
    fn owned_ips<'p>(&'p self, pod: &'p Pod) -> impl Iterator<Item = IpAddr> + 'p {
        pod.ips
            .iter()
            .copied()
            .filter(move |ip| self.owners.get(ip).is_some_and(|o| std::ptr::eq(*o, pod)))
    }
}

/// The peer predicates and named ports in play, with their atom ids.
#[derive(Default)]
struct AtomsInPlay {
    pods: Vec<(u32, Atom)>,
    blocks: Vec<(u32, IpBlock)>,
    egress_named: Vec<(u32, String, Protocol)>,
}

/// The identities of one compile.
#[derive(Default)]
struct Identities<'c> {
    keys: BTreeMap<u32, IdentityKey>,
    /// Identity of each ipBlock prefix class.
    classes: BTreeMap<IpNet, u32>,
    /// (IP, identity, owner) of every owned pod IP.
    pod_ips: Vec<(IpAddr, u32, &'c Pod)>,
    /// Peer atom -> identities that satisfy it.
    by_atom: HashMap<u32, Vec<u32>>,
    /// Egress named port atom -> (identity, its port numbers).
    by_named: HashMap<u32, Vec<(u32, Vec<u16>)>>,
}

impl Compiler {
    /// Compiles the cluster for `node`. Ids of things that were in the
    /// previous compile keep their values.
    pub fn compile(&mut self, cluster: &Cluster, node: &NodeInfo) -> Compiled {
        let mut out = Compiled {
            node: node.name.clone(),
            ..Default::default()
        };
        let scope = Scope::new(cluster, node);
        let atoms = self.atoms_in_play(&scope);
        let classes = PrefixClasses::new(&atoms.blocks);
        let identities = self.identities(cluster, &scope, &atoms, &classes);
        write_peers(&mut out, &classes, &identities, node);
        let plans = self.plan_rules(&mut out, &scope, &identities);
        let sets = self.write_endpoints(&mut out, cluster, &scope);
        write_policy(&mut out, &scope, &sets, &plans, &identities);

        for info in out.identities.values_mut() {
            info.pods.sort();
            info.prefixes.sort();
            info.node_addresses.sort();
        }
        self.atoms.end_round();
        self.identities.end_round();
        self.policy_sets.end_round();
        self.rules.end_round();
        self.endpoints.end_round();
        out
    }

    fn atoms_in_play(&mut self, scope: &Scope) -> AtomsInPlay {
        let mut out = AtomsInPlay::default();
        let mut seen = BTreeSet::new();
        for pol in scope.relevant.values() {
            for (dir, rules) in directions(pol) {
                for rule in rules {
                    let peers = rule.peers.iter().map(|peer| peer_atom(pol, peer));
                    let named = rule.ports.iter().filter_map(|spec| match &spec.port {
                        PortMatch::Named(name) => Some(named_atom(dir, name, spec.protocol)),
                        _ => None,
                    });
                    for atom in peers.chain(named) {
                        let id = self.atoms.id(&atom);
                        if !seen.insert(id) {
                            continue;
                        }
                        match atom {
                            Atom::Pods { .. } => out.pods.push((id, atom)),
                            Atom::Block(b) => out.blocks.push((id, b)),
                            Atom::EgressNamed(name, proto) => {
                                out.egress_named.push((id, name, proto))
                            }
                            Atom::IngressNamed(..) => {}
                        }
                    }
                }
            }
        }
        out
    }

    /// Identities of every ipBlock prefix class and every owned pod IP.
    fn identities<'c>(
        &mut self,
        cluster: &'c Cluster,
        scope: &Scope<'c>,
        atoms: &AtomsInPlay,
        classes: &PrefixClasses,
    ) -> Identities<'c> {
        let mut out = Identities::default();
        for (net, class) in &classes.classes {
            let key = IdentityKey {
                atoms: class.atoms.clone(),
                named: Vec::new(),
            };
            let id = self.identities.id(&key);
            out.keys.entry(id).or_insert(key);
            out.classes.insert(*net, id);
        }
        // Pods with equal labels in one namespace satisfy the same pod
        // atoms: evaluate each (namespace, labels) once.
        let mut pod_atom_cache: HashMap<(&str, &Labels), Vec<u32>> = HashMap::new();
        for pod in cluster.pods.values().filter(|p| p.is_live()) {
            let pod_atoms = pod_atom_cache
                .entry((pod.namespace.as_str(), &pod.labels))
                .or_insert_with(|| {
                    let ns_labels = cluster.namespace_labels(&pod.namespace);
                    let matching = atoms.pods.iter();
                    matching
                        .filter(|(_, atom)| pod_atom_matches(atom, pod, ns_labels))
                        .map(|(id, _)| *id)
                        .collect()
                });
            let named: Vec<(u32, Vec<u16>)> = atoms
                .egress_named
                .iter()
                .filter_map(|(id, name, proto)| {
                    let ports = resolve(pod, name, *proto);
                    (!ports.is_empty()).then_some((*id, ports))
                })
                .collect();
            for ip in scope.owned_ips(pod) {
                let mut key = IdentityKey {
                    atoms: pod_atoms.clone(),
                    named: named.clone(),
                };
                key.atoms.extend_from_slice(&classes.class_of(ip).atoms);
                key.atoms.sort_unstable();
                let id = self.identities.id(&key);
                out.keys.entry(id).or_insert(key);
                out.pod_ips.push((ip, id, pod));
            }
        }
        for (id, key) in &out.keys {
            for atom in &key.atoms {
                out.by_atom.entry(*atom).or_default().push(*id);
            }
            for (atom, ports) in &key.named {
                out.by_named
                    .entry(*atom)
                    .or_default()
                    .push((*id, ports.clone()));
            }
        }
        out
    }

    /// Gives every rule of the policies in play its id and its plan.
    fn plan_rules<'s>(
        &mut self,
        out: &mut Compiled,
        scope: &'s Scope,
        identities: &Identities,
    ) -> HashMap<(&'s PolicyRef, u8, usize), RulePlan> {
        let mut plans = HashMap::new();
        for (pref, pol) in &scope.relevant {
            for (dir, rules) in directions(pol) {
                for (index, rule) in rules.iter().enumerate() {
                    let index32 = u32::try_from(index).expect("fewer than 2^32 rules");
                    let rule_id = self.rules.id(&RuleKey {
                        policy: pref.clone(),
                        direction: dir,
                        index: index32,
                    });
                    out.rules.insert(
                        rule_id,
                        RuleInfo {
                            namespace: pol.namespace.clone(),
                            policy: pol.name.clone(),
                            direction: dir,
                            index: index32,
                        },
                    );
                    let plan = self.plan_rule(pol, dir, rule, rule_id, &identities.by_atom);
                    plans.insert((pref, dir, index), plan);
                }
            }
        }
        plans
    }

    /// Writes the endpoints; returns the policy sets they use.
    fn write_endpoints<'c>(
        &mut self,
        out: &mut Compiled,
        cluster: &Cluster,
        scope: &Scope<'c>,
    ) -> BTreeMap<u32, PolicySetKey> {
        let mut sets = BTreeMap::new();
        for (pod, pols) in scope.local.iter().zip(&scope.selecting) {
            let pod_ref = pod.pod_ref();
            for ip in scope.owned_ips(pod) {
                out.local_ips.insert(ip, pod_ref.clone());
            }
            let mut flags = 0;
            if pols.iter().any(|p| p.ingress.is_some()) {
                flags |= EP_F_INGRESS_ISOLATED;
            }
            if pols.iter().any(|p| p.egress.is_some()) {
                flags |= EP_F_EGRESS_ISOLATED;
            }
            if cluster.namespace_audit(&pod.namespace) {
                flags |= EP_F_AUDIT;
            }
            let policy_id = if pols.is_empty() {
                0
            } else {
                let key = self.policy_set_key(pod, pols);
                let id = self.policy_sets.id(&key);
                sets.entry(id).or_insert(key);
                id
            };
            let endpoint_id = self.endpoints.id(&pod_ref);
            out.maps
                .endpoints
                .insert(pod_ref, EndpointValue::new(policy_id, endpoint_id, flags));
        }
        sets
    }

    fn policy_set_key(&mut self, pod: &Pod, pols: &[&NetworkPolicy]) -> PolicySetKey {
        let mut names = BTreeSet::new();
        for pol in pols {
            for rule in pol.ingress.iter().flatten() {
                for spec in &rule.ports {
                    if let PortMatch::Named(name) = &spec.port {
                        names.insert((name.as_str(), spec.protocol));
                    }
                }
            }
        }
        let mut named: Vec<(u32, Vec<u16>)> = names
            .into_iter()
            .filter_map(|(name, proto)| {
                let ports = resolve(pod, name, proto);
                (!ports.is_empty())
                    .then(|| (self.atoms.id(&named_atom(DIR_INGRESS, name, proto)), ports))
            })
            .collect();
        named.sort();
        let mut policies: Vec<PolicyRef> = pols.iter().map(|p| p.policy_ref()).collect();
        policies.sort();
        PolicySetKey { policies, named }
    }

    fn plan_rule(
        &mut self,
        pol: &NetworkPolicy,
        dir: u8,
        rule: &Rule,
        rule_id: u32,
        by_atom: &HashMap<u32, Vec<u32>>,
    ) -> RulePlan {
        let any_peer = matches_every_address(rule);
        let mut identities = Vec::new();
        if !any_peer {
            for peer in &rule.peers {
                let atom = self.atoms.id(&peer_atom(pol, peer));
                identities.extend(by_atom.get(&atom).into_iter().flatten().copied());
            }
            identities.sort_unstable();
            identities.dedup();
        }
        let mut ports = Vec::new();
        let mut named = Vec::new();
        if rule.ports.is_empty() {
            ports.push((0, 0, POLICY_PREFIX_ANY_PROTO));
        }
        for spec in &rule.ports {
            let proto = spec.protocol.number();
            match &spec.port {
                PortMatch::All => ports.push((proto, 0, POLICY_PREFIX_ANY_PORT)),
                PortMatch::Range { start, end } => ports.extend(
                    ports::port_prefixes(*start, *end)
                        .into_iter()
                        .map(|(port, len)| (proto, port, len)),
                ),
                PortMatch::Named(name) => {
                    let atom = self.atoms.id(&named_atom(dir, name, spec.protocol));
                    named.push((atom, spec.protocol));
                }
            }
        }
        RulePlan {
            rule_id,
            any_peer,
            identities,
            ports,
            named,
        }
    }
}

/// Writes the peer maps: ipBlock prefixes (those that differ from their
/// enclosing prefix), owned pod IPs, and this node's addresses (flagged
/// `PEER_F_HOST`).
fn write_peers(
    out: &mut Compiled,
    classes: &PrefixClasses,
    identities: &Identities,
    node: &NodeInfo,
) {
    for (net, class) in &classes.classes {
        let id = identities.classes[net];
        if class.parent.is_some_and(|p| identities.classes[&p] == id) {
            continue; // the lookup gives the same answer without it
        }
        insert_peer(&mut out.maps, *net, PeerValue::new(id, 0));
        out.identities.entry(id).or_default().prefixes.push(*net);
    }
    for (ip, id, pod) in &identities.pod_ips {
        insert_peer(&mut out.maps, IpNet::from(*ip), PeerValue::new(*id, 0));
        let info = out.identities.entry(*id).or_default();
        info.pods.push(pod.pod_ref());
    }
    for ip in &node.addresses {
        let net = IpNet::from(*ip);
        let pod_entry = match net {
            IpNet::V4(n) => out.maps.peers_v4.get(&(n.network(), 32)).copied(),
            IpNet::V6(n) => out.maps.peers_v6.get(&(n.network(), 128)).copied(),
        };
        let identity = pod_entry.map_or_else(
            || identities.classes[&classes.class_net(*ip)],
            |v| v.identity,
        );
        insert_peer(&mut out.maps, net, PeerValue::new(identity, PEER_F_HOST));
        let info = out.identities.entry(identity).or_default();
        info.node_addresses.push(*ip);
    }
}

/// Writes the policy entries of every policy set, and the policy set table.
fn write_policy(
    out: &mut Compiled,
    scope: &Scope,
    sets: &BTreeMap<u32, PolicySetKey>,
    plans: &HashMap<(&PolicyRef, u8, usize), RulePlan>,
    identities: &Identities,
) {
    for (policy_id, key) in sets {
        let mut info = PolicySetInfo::default();
        for pref in &key.policies {
            let pol = scope.relevant[pref];
            if pol.ingress.is_some() {
                info.ingress.push(pref.clone());
            }
            if pol.egress.is_some() {
                info.egress.push(pref.clone());
            }
        }
        out.policy_sets.insert(*policy_id, info);
        let ingress_named: HashMap<u32, &[u16]> =
            key.named.iter().map(|(a, p)| (*a, p.as_slice())).collect();
        // Rules in (direction, policy, index) order: the first rule to
        // produce a key names it, whatever the ids are.
        for dir in [DIR_INGRESS, DIR_EGRESS] {
            for pref in &key.policies {
                let rules = scope.relevant[pref].rules(dir).unwrap_or_default();
                for index in 0..rules.len() {
                    let plan = &plans[&(pref, dir, index)];
                    emit_rule(
                        &mut out.maps.policy,
                        *policy_id,
                        dir,
                        plan,
                        &ingress_named,
                        identities,
                    );
                }
            }
        }
    }
}

/// Writes the entries of one rule of one policy set.
fn emit_rule(
    policy: &mut BTreeMap<(PolicyKey, u32), PolicyValue>,
    policy_id: u32,
    dir: u8,
    plan: &RulePlan,
    ingress_named: &HashMap<u32, &[u16]>,
    identities: &Identities,
) {
    let any = [IDENTITY_ANY];
    let peers: &[u32] = if plan.any_peer {
        &any
    } else {
        &plan.identities
    };
    let value = PolicyValue::allow(plan.rule_id);
    let mut put = |identity: u32, proto: u8, port: u16, len: u32| {
        policy
            .entry((PolicyKey::new(policy_id, identity, dir, proto, port), len))
            .or_insert(value);
    };
    for &identity in peers {
        for &(proto, port, len) in &plan.ports {
            put(identity, proto, port, len);
        }
    }
    for &(atom, protocol) in &plan.named {
        let proto = protocol.number();
        if dir == DIR_INGRESS {
            // Resolved on the local pod: the same numbers for every peer.
            for &port in ingress_named.get(&atom).copied().unwrap_or_default() {
                for &identity in peers {
                    put(identity, proto, port, POLICY_PREFIX_FULL);
                }
            }
        } else if plan.any_peer {
            // Resolved on each peer pod: every identity that resolves it.
            for (identity, ports) in identities.by_named.get(&atom).into_iter().flatten() {
                for &port in ports {
                    put(*identity, proto, port, POLICY_PREFIX_FULL);
                }
            }
        } else {
            for &identity in peers {
                let key = &identities.keys[&identity];
                if let Some((_, ports)) = key.named.iter().find(|(a, _)| *a == atom) {
                    for &port in ports {
                        put(identity, proto, port, POLICY_PREFIX_FULL);
                    }
                }
            }
        }
    }
}

/// The directions a policy has, with their rules.
fn directions(pol: &NetworkPolicy) -> impl Iterator<Item = (u8, &[Rule])> {
    [
        (DIR_INGRESS, pol.ingress.as_deref()),
        (DIR_EGRESS, pol.egress.as_deref()),
    ]
    .into_iter()
    .filter_map(|(d, r)| r.map(|r| (d, r)))
}

fn peer_atom(pol: &NetworkPolicy, peer: &Peer) -> Atom {
    match peer {
        Peer::Pods {
            namespace_selector,
            pod_selector,
        } => Atom::Pods {
            own_namespace: namespace_selector.is_none().then(|| pol.namespace.clone()),
            namespace_selector: namespace_selector.clone(),
            pod_selector: pod_selector.clone(),
        },
        Peer::IpBlock(b) => Atom::Block(b.clone()),
    }
}

fn named_atom(dir: u8, name: &str, protocol: Protocol) -> Atom {
    if dir == DIR_EGRESS {
        Atom::EgressNamed(name.into(), protocol)
    } else {
        Atom::IngressNamed(name.into(), protocol)
    }
}

/// The sorted, distinct port numbers a named port resolves to on a pod.
fn resolve(pod: &Pod, name: &str, protocol: Protocol) -> Vec<u16> {
    let mut ports: Vec<u16> = pod.resolve_named_port(name, protocol).collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

fn pod_atom_matches(atom: &Atom, pod: &Pod, ns_labels: &Labels) -> bool {
    let Atom::Pods {
        namespace_selector,
        own_namespace,
        pod_selector,
    } = atom
    else {
        return false;
    };
    let ns_ok = match (namespace_selector, own_namespace) {
        (Some(sel), _) => sel.matches(ns_labels),
        (None, Some(ns)) => *ns == pod.namespace,
        (None, None) => false,
    };
    ns_ok
        && pod_selector
            .as_ref()
            .is_none_or(|sel| sel.matches(&pod.labels))
}

/// A rule whose peers match every address: no `from`/`to`, or ipBlocks
/// `0.0.0.0/0` and `::/0` without excepts.
fn matches_every_address(rule: &Rule) -> bool {
    if rule.peers.is_empty() {
        return true;
    }
    let whole = |want_v4: bool| {
        rule.peers.iter().any(|p| {
            matches!(p, Peer::IpBlock(b) if b.except.is_empty()
                && b.cidr.prefix_len() == 0
                && matches!(b.cidr, IpNet::V4(_)) == want_v4)
        })
    };
    whole(true) && whole(false)
}

fn insert_peer(maps: &mut Maps, net: IpNet, value: PeerValue) {
    match net {
        IpNet::V4(n) => {
            maps.peers_v4.insert((n.network(), n.prefix_len()), value);
        }
        IpNet::V6(n) => {
            maps.peers_v6.insert((n.network(), n.prefix_len()), value);
        }
    }
}

/// The class of the addresses whose longest match among the ipBlock prefixes
/// is one prefix.
struct PrefixClass {
    /// Sorted ids of the ipBlock atoms that contain these addresses.
    atoms: Vec<u32>,
    /// The nearest enclosing prefix (`None` for /0).
    parent: Option<IpNet>,
}

/// The partition of address space by every ipBlock cidr and except in play
/// (plus both /0): for an address whose longest matching prefix is P,
/// membership in every ipBlock is a function of P.
struct PrefixClasses {
    classes: BTreeMap<IpNet, PrefixClass>,
    /// Prefix lengths present, longest first, per family (v4, v6).
    lengths: [Vec<u8>; 2],
}

impl PrefixClasses {
    fn new(blocks: &[(u32, IpBlock)]) -> Self {
        let mut nets: BTreeSet<IpNet> = BTreeSet::new();
        nets.insert("0.0.0.0/0".parse().expect("valid"));
        nets.insert("::/0".parse().expect("valid"));
        for (_, b) in blocks {
            nets.insert(b.cidr.trunc());
            nets.extend(b.except.iter().map(IpNet::trunc));
        }
        let mut lengths = [Vec::new(), Vec::new()];
        for net in &nets {
            lengths[family(net)].push(net.prefix_len());
        }
        for l in &mut lengths {
            l.sort_unstable_by(|a, b| b.cmp(a));
            l.dedup();
        }
        let mut classes = BTreeMap::new();
        for net in &nets {
            // A network contains all of `net` iff it contains `net` itself.
            let mut atoms: Vec<u32> = blocks
                .iter()
                .filter(|(_, b)| b.cidr.contains(net) && !b.except.iter().any(|e| e.contains(net)))
                .map(|(id, _)| *id)
                .collect();
            atoms.sort_unstable();
            let parent = net
                .supernet()
                .map(|sup| longest_match(&lengths, sup, |n| nets.contains(n)));
            classes.insert(*net, PrefixClass { atoms, parent });
        }
        Self { classes, lengths }
    }

    /// The longest prefix containing `ip`.
    fn class_net(&self, ip: IpAddr) -> IpNet {
        longest_match(&self.lengths, IpNet::from(ip), |n| {
            self.classes.contains_key(n)
        })
    }

    fn class_of(&self, ip: IpAddr) -> &PrefixClass {
        &self.classes[&self.class_net(ip)]
    }
}

fn family(net: &IpNet) -> usize {
    match net {
        IpNet::V4(_) => 0,
        IpNet::V6(_) => 1,
    }
}

/// The longest prefix for which `has` holds among the prefixes of the
/// given lengths that contain `net` (the /0 of its family always holds).
fn longest_match(lengths: &[Vec<u8>; 2], net: IpNet, has: impl Fn(&IpNet) -> bool) -> IpNet {
    lengths[family(&net)]
        .iter()
        .filter(|&&len| len <= net.prefix_len())
        .map(|&len| {
            IpNet::new(net.network(), len)
                .expect("valid length")
                .trunc()
        })
        .find(|candidate| has(candidate))
        .expect("/0 is always present")
}
