//! The policy compiler: from cluster state and one node ([`NodeInfo`]) to the
//! contents of that node's datapath maps ([`Compiled`]), kept up to date
//! incrementally: a [`Compiler`] takes [`Change`]s and answers each batch
//! with the map updates it causes ([`Diff`]).
//!
//! # Design
//!
//! * **Two identities per address.** Every address gets a *pod identity* and
//!   an *address identity*, and the datapath looks up policy entries with
//!   both (then with [`IDENTITY_ANY`](netpol_common::IDENTITY_ANY)):
//!   - the **address identity** is the address's class under the ipBlocks in
//!     play: addresses whose longest matching prefix among every ipBlock
//!     cidr and except (and both /0) is the same have the same membership in
//!     every ipBlock. Entries of ipBlock peers are keyed on address
//!     identities, so a broad ipBlock (the cluster CIDR) costs one entry per
//!     policy set and port, not one per pod identity inside it;
//!   - the **pod identity** is the class of a pod under the pod selectors in
//!     play (the `from`/`to` entries with selectors), plus its resolution of
//!     the egress named ports of rules with selector peers (an egress named
//!     port resolves on the destination pod). Entries of selector peers are
//!     keyed on pod identities.
//!
//!   A pod IP's peer entry is `{identity: pod identity, cidr_identity:
//!   address identity}`; a pod that no selector or named port distinguishes
//!   has no pod identity and gets `{identity: address identity}`, like the
//!   prefix entries around it. Egress rules that combine an ipBlock peer with
//!   a named port need both the block and the destination pod's port: for
//!   them the address identity of a pod IP also records the owning pod's
//!   resolution of those names (a non-pod address resolves none), so such a
//!   rule still needs only address identities, a handful more of them.
//!   Prefixes are written only where they differ from their nearest
//!   enclosing prefix; pod IPs are /32 (/128) entries; `0.0.0.0/0` and
//!   `::/0` are always present.
//! * **Policy sets.** A local pod's policy set is the sorted list of policies
//!   that select it plus its own resolution of their ingress named ports
//!   (which resolve on the local pod). Pods with equal sets share a
//!   `policy_id`; entries are compiled once per policy set.
//! * **Entries.** A rule becomes, per policy set that contains its policy
//!   and per identity its peers match, one entry per port prefix; a rule
//!   that matches every address (no `from`/`to`, or ipBlocks `0.0.0.0/0` and
//!   `::/0` without excepts) uses
//!   [`IDENTITY_ANY`](netpol_common::IDENTITY_ANY). The map grows with
//!   policy sets x distinct classes, never with pods x pods.
//! * **Scope.** Only the policies that select a local pod are in play on a
//!   node: only their peers and named ports split identities. A pod that
//!   owns none of its IPs (another live pod claims them first) has no pod
//!   identity.
//! * **Incremental.** The compiler keeps what it derived per object: the
//!   atoms (selectors, ipBlocks, named ports) each pod satisfies, the
//!   policies that select each local pod, the classes and their members, and
//!   the entries each (rule, policy set, identity) triple produced. A change
//!   recomputes only what the changed object touches: a pod's keys, the
//!   local pods of a policy's namespace, the pods a selector entering or
//!   leaving play can match, the addresses inside an ipBlock entering or
//!   leaving play, and the triples whose rule, set or identity changed;
//!   the map updates come from a journal of the writes (`journal`). When
//!   most of a class moves to one new key, the class keeps its id and goes
//!   with them (see `classes`): a selector entering play that covers whole
//!   classes adds entries and rewrites no peer entry. The cost of a change
//!   is then about the number of map updates it causes: a change that
//!   splits or merges classes of thousands of pods (a selector or named
//!   port that distinguishes them entering or leaving play) rewrites their
//!   peer entries. A fresh compile is the same machinery with everything
//!   new, so the two agree by construction (the randomized tests check it).
//! * **Stable ids.** Identity, policy-set, rule and endpoint ids stay while
//!   what they name exists (an identity names a class of addresses, whose
//!   key may change); ids no longer used are forgotten and never reused.
//!
//! [`reference`](mod@reference) answers the same questions straight from the spec, and
//! [`sim`] answers them from map contents only, the way the datapath does;
//! the tests check that the two agree.

mod classes;
pub mod diff;
mod entries;
mod hash;
mod identities;
mod ids;
mod journal;
pub mod ports;
mod prefixes;
pub mod reference;
mod scope;
pub mod sim;
mod tiered;
pub mod tiers;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

/// The map types live below the compiler and the datapath loader alike
/// (`crate::maps`); re-exported here for the compiler's callers.
pub use crate::maps::{Diff, MapUpdate, Maps, diff_maps};
use classes::{Classes, KeyChanges};
pub use diff::diff;
use hash::{NumMap, NumSet};
use ids::{IdAlloc, Interner};
use ipnet::IpNet;
use journal::Journal;
use netpol_common::PolicyKey;
use prefixes::Prefixes;

use crate::model::{
    Action, Cluster, ClusterNetworkPolicy, IpBlock, LabelSelector, Namespace, NetworkPolicy, Node,
    Pod, PodRef, PolicyRef, Protocol, Tier,
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

/// Which rule a `rule_id` names.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleInfo {
    /// The NetworkPolicy's namespace; empty for a ClusterNetworkPolicy.
    pub namespace: String,
    pub policy: String,
    /// `DIR_INGRESS` or `DIR_EGRESS`.
    pub direction: u8,
    /// Index in the policy's `ingress` or `egress` list.
    pub index: u32,
    /// A ClusterNetworkPolicy rule: its tier, name and action.
    pub cluster: Option<ClusterRuleInfo>,
}

/// What a ClusterNetworkPolicy rule is, for flow logs and `explain`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClusterRuleInfo {
    pub tier: Tier,
    /// The rule's `name` (may be empty).
    pub name: String,
    pub action: Action,
}

impl std::fmt::Display for RuleInfo {
    /// `ns/policy ingress rule 1`, or for a ClusterNetworkPolicy
    /// `Admin ClusterNetworkPolicy name egress rule 0 "rule-name" (Deny)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dir = if self.direction == netpol_common::DIR_INGRESS {
            "ingress"
        } else {
            "egress"
        };
        match &self.cluster {
            None => write!(
                f,
                "{}/{} {dir} rule {}",
                self.namespace, self.policy, self.index
            ),
            Some(c) => write!(
                f,
                "{} ClusterNetworkPolicy {} {dir} rule {} {:?} ({})",
                c.tier, self.policy, self.index, c.name, c.action
            ),
        }
    }
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
    /// An address identity (the class of addresses under the ipBlocks in
    /// play, the `cidr_identity` of pod IPs), rather than a pod identity.
    pub address: bool,
    /// How many pod IPs have this identity in their peer entry's
    /// `identity` ([`Compiler::pods_with_identity`] says which).
    pub pod_ips: usize,
    /// Prefixes in the peer maps with this identity (addresses whose longest
    /// match is one of them, unless a longer entry is present).
    pub prefixes: BTreeSet<IpNet>,
    /// Node addresses with this identity.
    pub node_addresses: BTreeSet<IpAddr>,
}

/// Everything a compile produces for one node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    pub node: String,
    /// The map contents.
    pub maps: Maps,
    /// `rule_id` -> rule, for every rule of the policies in play on this node.
    pub rules: BTreeMap<u32, RuleInfo>,
    /// `policy_id` -> isolating policies.
    pub policy_sets: BTreeMap<u32, PolicySetInfo>,
    /// identity -> what it covers, for every identity in use.
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
        if direction == netpol_common::DIR_INGRESS {
            &set.ingress
        } else {
            &set.egress
        }
    }
}

/// Compiles a cluster for one node from scratch. Keep a [`Compiler`] to get
/// stable ids and incremental updates.
pub fn compile(cluster: &Cluster, node: &NodeInfo) -> Compiled {
    let mut compiler = Compiler::new(node.clone());
    compiler.sync(cluster);
    compiler.into_compiled()
}

/// One change to the cluster state a [`Compiler`] compiles (what a watcher
/// reports). Upserts replace the object with the same name.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    UpsertNamespace(Namespace),
    RemoveNamespace(String),
    UpsertPod(Pod),
    RemovePod(PodRef),
    UpsertPolicy(NetworkPolicy),
    RemovePolicy(PolicyRef),
    /// The node compiled for, or its addresses, changed.
    SetNode(NodeInfo),
    UpsertClusterPolicy(ClusterNetworkPolicy),
    RemoveClusterPolicy(String),
    /// A Node object (labels and addresses, what CNP `nodes` peers match).
    UpsertNode(Node),
    RemoveNode(String),
}

/// The compiler of one node: holds the cluster state it was given, what it
/// derived from it, and the current [`Compiled`] output.
///
/// Feed it changes with [`Compiler::apply_change`] /
/// [`Compiler::apply_changes`] (each call returns the map updates that bring
/// the previous output to the new one), or whole snapshots with
/// [`Compiler::sync`] / [`Compiler::compile`] (which find the changed objects
/// first). Either way ids stay stable across calls.
#[derive(Debug, Default)]
pub struct Compiler {
    node: NodeInfo,
    // ---- The cluster as given.
    namespaces: HashMap<String, Namespace>,
    pods: scope::Pods,
    policies: HashMap<PolicyRef, NetworkPolicy>,
    policies_by_ns: HashMap<String, BTreeSet<PolicyRef>>,
    /// Objects changed since the last flush.
    dirty: scope::Dirty,
    // ---- Scope: namespaces, addresses, local pods, policies in play.
    ns_views: HashMap<String, scope::NsView>,
    ips: NumMap<IpAddr, identities::IpSlot>,
    /// The keys of `ips`, in order (for the addresses inside a prefix).
    ip_order: BTreeSet<IpAddr>,
    locals: NumMap<u32, scope::Local>,
    relevant: HashMap<PolicyRef, scope::Relevant>,
    atoms: Interner<Atom>,
    play: scope::Play,
    // ---- Rules of the policies in play.
    rule_ids: HashMap<RuleKey, u32>,
    rule_alloc: IdAlloc,
    rules: NumMap<u32, entries::RulePlan>,
    /// Atom -> rules that use it (as a peer or a named port).
    atom_rules: NumMap<u32, BTreeSet<u32>>,
    // ---- Identities.
    identities: Classes<IdentityKey, identities::Member>,
    identity_alloc: IdAlloc,
    /// Atom -> identities whose key holds it.
    atom_identities: NumMap<u32, NumSet<u32>>,
    prefixes: Prefixes,
    /// Node addresses as last written, with their identity.
    node_entries: Vec<(IpAddr, u32)>,
    // ---- Policy sets, endpoints and entries.
    sets: Classes<PolicySetKey, u32>,
    set_alloc: IdAlloc,
    /// Policy -> the policy sets that contain it.
    policy_sets: HashMap<PolicyRef, BTreeSet<u32>>,
    endpoint_alloc: IdAlloc,
    /// Rule -> (policy set, identity) -> the port entries it produced.
    emitted: NumMap<u32, NumMap<(u32, u32), Vec<entries::PortEntry>>>,
    /// Policy map key -> the rules that produce it (the first in rule order
    /// names the entry).
    contributors: NumMap<(PolicyKey, u32), Vec<u32>>,
    // ---- Output.
    out: Compiled,
    journal: Journal,
    // ---- ClusterNetworkPolicy (see `tiered`).
    cluster_policies: BTreeMap<String, ClusterNetworkPolicy>,
    nodes: BTreeMap<String, Node>,
    /// Something was staged since the last flush.
    staged: bool,
    /// The output while any ClusterNetworkPolicy exists: the tier
    /// compile, which then replaces `out` as what the datapath gets.
    tiered: Option<Compiled>,
    /// Stable rule ids of ClusterNetworkPolicy rules (policy, direction,
    /// index), from `rule_alloc`, so they never meet a NetworkPolicy's.
    cnp_rule_ids: HashMap<(String, u8, u32), u32>,
    /// The tier compile's decisions and pod peer keys, kept between flushes
    /// while any ClusterNetworkPolicy exists (see `tiers::TierCache`).
    tier_cache: tiers::TierCache,
}

/// A peer predicate or a named port, in play on a node. Interned: keys hold
/// atom ids.
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
    /// A named port of an egress rule with selector peers or no peers:
    /// resolved on the peer pod, part of pod identities.
    PodNamed(String, Protocol),
    /// A named port of an egress rule with ipBlock peers: resolved on the
    /// pod that owns the peer address, part of address identities.
    BlockNamed(String, Protocol),
    /// A named port of an ingress rule: resolved on the local pod, part of
    /// policy sets.
    IngressNamed(String, Protocol),
}

/// Named port atom -> the port numbers it resolves to (non-empty only),
/// sorted by atom.
type Resolutions = Vec<(u32, Vec<u16>)>;

/// The key of an identity class.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct IdentityKey {
    /// An address identity (else a pod identity).
    address: bool,
    /// Sorted atoms the members satisfy: pod atoms for a pod identity,
    /// block atoms for an address identity.
    atoms: Vec<u32>,
    /// `PodNamed` (pod identity) or `BlockNamed` (address identity)
    /// resolutions.
    named: Resolutions,
}

/// The key of a policy set: the (sorted) policies selecting an endpoint and
/// the endpoint's resolution of their ingress named ports.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct PolicySetKey {
    policies: Vec<PolicyRef>,
    named: Resolutions,
}

/// Names a rule; ordered the way rules name entries they share (the first
/// rule of the first policy wins).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct RuleKey {
    policy: PolicyRef,
    direction: u8,
    index: u32,
}

impl Compiler {
    /// A compiler for `node`, with an empty cluster.
    pub fn new(node: NodeInfo) -> Self {
        Self {
            out: Compiled {
                node: node.name.clone(),
                ..Default::default()
            },
            node,
            ..Default::default()
        }
    }

    /// Applies one change; returns the map updates it causes.
    pub fn apply_change(&mut self, change: Change) -> Diff {
        self.apply_changes([change])
    }

    /// Applies a batch of changes; returns the map updates they cause
    /// together (cheaper than one at a time when a watcher delivers many).
    pub fn apply_changes(&mut self, changes: impl IntoIterator<Item = Change>) -> Diff {
        for change in changes {
            self.stage(change);
        }
        self.flush()
    }

    /// Brings the compiler to a full snapshot of the cluster (finding the
    /// objects that differ from what it has); returns the map updates.
    pub fn sync(&mut self, cluster: &Cluster) -> Diff {
        let changes = self.changes_to(cluster);
        self.apply_changes(changes)
    }

    /// [`Compiler::sync`] to `cluster` on `node`, then a copy of the output.
    /// Ids of things that were in the previous output keep their values.
    pub fn compile(&mut self, cluster: &Cluster, node: &NodeInfo) -> Compiled {
        if *node != self.node {
            self.stage(Change::SetNode(node.clone()));
        }
        self.sync(cluster);
        self.compiled().clone()
    }

    /// The current output.
    pub fn compiled(&self) -> &Compiled {
        self.tiered.as_ref().unwrap_or(&self.out)
    }

    /// The current output, by value.
    pub fn into_compiled(self) -> Compiled {
        self.tiered.unwrap_or(self.out)
    }

    /// The node compiled for.
    pub fn node(&self) -> &NodeInfo {
        &self.node
    }

    /// The changes that turn the cluster held into `cluster`.
    fn changes_to(&self, cluster: &Cluster) -> Vec<Change> {
        let mut changes = Vec::new();
        for (name, ns) in &cluster.namespaces {
            if self.namespaces.get(name) != Some(ns) {
                changes.push(Change::UpsertNamespace(ns.clone()));
            }
        }
        for name in self.namespaces.keys() {
            if !cluster.namespaces.contains_key(name) {
                changes.push(Change::RemoveNamespace(name.clone()));
            }
        }
        for (pref, pod) in &cluster.pods {
            if self.pods.get(pref) != Some(pod) {
                changes.push(Change::UpsertPod(pod.clone()));
            }
        }
        for pref in self.pods.refs() {
            if !cluster.pods.contains_key(pref) {
                changes.push(Change::RemovePod(pref.clone()));
            }
        }
        for (pref, pol) in &cluster.policies {
            if self.policies.get(pref) != Some(pol) {
                changes.push(Change::UpsertPolicy(pol.clone()));
            }
        }
        for pref in self.policies.keys() {
            if !cluster.policies.contains_key(pref) {
                changes.push(Change::RemovePolicy(pref.clone()));
            }
        }
        for (name, cnp) in &cluster.cluster_policies {
            if self.cluster_policies.get(name) != Some(cnp) {
                changes.push(Change::UpsertClusterPolicy(cnp.clone()));
            }
        }
        for name in self.cluster_policies.keys() {
            if !cluster.cluster_policies.contains_key(name) {
                changes.push(Change::RemoveClusterPolicy(name.clone()));
            }
        }
        for (name, node) in &cluster.nodes {
            if self.nodes.get(name) != Some(node) {
                changes.push(Change::UpsertNode(node.clone()));
            }
        }
        for name in self.nodes.keys() {
            if !cluster.nodes.contains_key(name) {
                changes.push(Change::RemoveNode(name.clone()));
            }
        }
        changes
    }

    /// Derives everything the staged changes touch and returns the map
    /// updates. The steps run in dependency order.
    fn flush(&mut self) -> Diff {
        let staged = std::mem::take(&mut self.staged);
        // Entering the tier compile: the diff starts from NetworkPolicy's
        // maps as they are before this flush.
        let before = (self.tiered.is_none() && !self.cluster_policies.is_empty())
            .then(|| self.out.maps.clone());
        let diff = self.flush_network_policy();
        if !self.cluster_policies.is_empty() {
            if self.tiered.is_some() && !staged {
                return diff_maps(&Maps::default(), &Maps::default());
            }
            let mut cache = std::mem::take(&mut self.tier_cache);
            let new = self.compile_tiered_with(&mut cache);
            self.tier_cache = cache;
            let old = match (&before, &self.tiered) {
                (Some(before), _) => before,
                (None, Some(t)) => &t.maps,
                (None, None) => unreachable!("before is taken when not tiered"),
            };
            let diff = diff_maps(old, &new.maps);
            self.tiered = Some(new);
            return diff;
        }
        match self.tiered.take() {
            // Leaving the tier compile: back to NetworkPolicy's maps (the
            // tier cache goes with it).
            Some(t) => {
                self.tier_cache = tiers::TierCache::default();
                diff_maps(&t.maps, &self.out.maps)
            }
            None => diff,
        }
    }

    /// The NetworkPolicy compile's flush (`out`).
    fn flush_network_policy(&mut self) -> Diff {
        let mut batch = Batch::default();
        self.update_pods(&mut batch);
        self.update_selection(&mut batch);
        self.update_rules(&mut batch);
        self.update_atoms(&mut batch);
        self.classify_pods(&mut batch);
        self.classify_addresses(&mut batch);
        self.index_identities(&batch);
        self.write_peers(&mut batch);
        self.update_sets(&mut batch);
        self.update_entries(&mut batch);
        self.cleanup(&mut batch);
        self.journal.take_diff(&self.out.maps)
    }
}

/// What one flush found to do, step by step.
#[derive(Default)]
struct Batch {
    /// Live pods whose pod-identity key is computed from scratch.
    pods_full: NumSet<u32>,
    /// Pods whose pod identity may have changed (with repeats until
    /// `classify_pods` sorts them out).
    pods_touched: Vec<u32>,
    /// Addresses whose peer entry may have changed (with repeats until
    /// `classify_addresses` sorts them out).
    ips: Vec<IpAddr>,
    /// Local pods whose selecting policies are recomputed.
    reselect: BTreeSet<u32>,
    /// Local pods whose endpoint entry is recomputed.
    endpoints: BTreeSet<u32>,
    /// Pods that stopped being local, with what they had.
    gone_locals: Vec<(u32, PodRef, scope::Local)>,
    /// Policies whose local selection count or spec changed.
    policies: BTreeSet<PolicyRef>,
    /// Namespaces whose labels or annotations changed (or that appeared).
    namespaces: BTreeSet<String>,
    /// Atoms whose reference count changed.
    atoms: BTreeSet<u32>,
    /// Cidrs of the blocks that entered or left play.
    blocks: Vec<IpNet>,
    /// Nets whose class may have changed (those inside `blocks`, those
    /// never classified, those renumbered).
    nets: Vec<IpNet>,
    /// Rules added, removed or changed.
    rules: BTreeSet<u32>,
    /// Plans of rules removed (or replaced) by this flush.
    retired: NumMap<u32, entries::RulePlan>,
    identity_changes: KeyChanges<IdentityKey>,
    set_changes: KeyChanges<PolicySetKey>,
}
