//! Rules, policy sets, endpoints and policy entries.
//!
//! The policy map is the union over (rule, policy set, identity) *triples*
//! of the entries each produces: `(policy set, identity, direction, port
//! prefix)` for every port prefix the rule allows that identity when the set
//! contains the rule's policy. The compiler remembers what each triple
//! produced; a flush recomputes the triples whose rule, set or identity
//! changed and applies the difference. A key produced by several rules is
//! named by the first in rule order.

use std::collections::{BTreeSet, HashMap};

use ipnet::IpNet;
use netpol_common::{
    DIR_INGRESS, EP_F_AUDIT, EP_F_EGRESS_ISOLATED, EP_F_INGRESS_ISOLATED, EndpointValue,
    IDENTITY_ANY, POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTO, POLICY_PREFIX_FULL, PolicyKey,
    PolicyValue,
};

use super::{
    Atom, Batch, Compiler, PolicySetInfo, PolicySetKey, Resolutions, RuleKey,
    classes::{Keys, Move},
    hash::{NumMap, NumSet},
    identities::key_atoms,
    ids::Interner,
    ports,
    scope::resolve,
};
use crate::model::{Peer, PolicyRef, PortMatch, Rule};

/// `(protocol, port, policy prefix length)` of one policy entry.
pub(super) type PortEntry = (u8, u16, u32);

/// One rule of a policy in play, with its peers and named ports as atoms.
#[derive(Debug)]
pub(super) struct RulePlan {
    pub(super) key: RuleKey,
    /// The rule matches every address.
    any_peer: bool,
    /// Pod atoms of its selector peers (when not `any_peer`).
    pod_atoms: Vec<u32>,
    /// Block atoms of its ipBlock peers (when not `any_peer`).
    block_atoms: Vec<u32>,
    /// Entries that do not depend on the peer or the endpoint.
    ports: Vec<PortEntry>,
    /// Ingress named ports: (atom, protocol number).
    ingress_named: Vec<(u32, u8)>,
    /// Egress named ports resolved through pod identities.
    pod_named: Vec<(u32, u8)>,
    /// Egress named ports resolved through address identities.
    block_named: Vec<(u32, u8)>,
    /// Every distinct atom the plan holds a reference to.
    pub(super) atoms: Vec<u32>,
}

impl RulePlan {
    /// Plans a rule, taking a reference on each atom it uses.
    pub(super) fn new(key: RuleKey, rule: &Rule, interner: &mut Interner<Atom>) -> Self {
        let mut acquired: HashMap<Atom, u32> = HashMap::new();
        let mut atom = |a: Atom| {
            *acquired
                .entry(a)
                .or_insert_with_key(|a| interner.acquire(a))
        };
        let any_peer = matches_every_address(rule);
        let mut pod_atoms = Vec::new();
        let mut block_atoms = Vec::new();
        if !any_peer {
            for peer in &rule.peers {
                match peer {
                    Peer::Pods {
                        namespace_selector,
                        pod_selector,
                    } => pod_atoms.push(atom(Atom::Pods {
                        own_namespace: namespace_selector
                            .is_none()
                            .then(|| key.policy.namespace.clone()),
                        namespace_selector: namespace_selector.clone(),
                        pod_selector: pod_selector.clone(),
                    })),
                    Peer::IpBlock(b) => block_atoms.push(atom(Atom::Block(b.clone()))),
                }
            }
        }
        let mut ports = Vec::new();
        let mut ingress_named = Vec::new();
        let mut pod_named = Vec::new();
        let mut block_named = Vec::new();
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
                    if key.direction == DIR_INGRESS {
                        let a = atom(Atom::IngressNamed(name.clone(), spec.protocol));
                        ingress_named.push((a, proto));
                        continue;
                    }
                    if any_peer || !pod_atoms.is_empty() {
                        let a = atom(Atom::PodNamed(name.clone(), spec.protocol));
                        pod_named.push((a, proto));
                    }
                    if !any_peer && !block_atoms.is_empty() {
                        let a = atom(Atom::BlockNamed(name.clone(), spec.protocol));
                        block_named.push((a, proto));
                    }
                }
            }
        }
        for list in [&mut pod_atoms, &mut block_atoms] {
            list.sort_unstable();
            list.dedup();
        }
        ports.sort_unstable();
        ports.dedup();
        let mut atoms: Vec<u32> = acquired.into_values().collect();
        atoms.sort_unstable();
        Self {
            key,
            any_peer,
            pod_atoms,
            block_atoms,
            ports,
            ingress_named,
            pod_named,
            block_named,
            atoms,
        }
    }

    /// Identities whose entries this rule can produce (before checking the
    /// policy sets): `IDENTITY_ANY` for a rule that matches every address
    /// (plus the pod identities resolving its egress named ports), else the
    /// identities of its peer atoms.
    fn identities(&self, atom_identities: &NumMap<u32, NumSet<u32>>) -> BTreeSet<u32> {
        let mut out = BTreeSet::new();
        let atoms: Vec<u32> = if self.any_peer {
            out.insert(IDENTITY_ANY);
            self.pod_named.iter().map(|(a, _)| *a).collect()
        } else {
            self.pod_atoms
                .iter()
                .chain(&self.block_atoms)
                .copied()
                .collect()
        };
        for atom in atoms {
            out.extend(atom_identities.get(&atom).into_iter().flatten().copied());
        }
        out
    }
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

/// The ports a list of named-port atoms resolves to, as full-port entries.
fn named_entries(named: &[(u32, u8)], resolutions: &Resolutions, out: &mut Vec<PortEntry>) {
    for &(atom, proto) in named {
        if let Ok(at) = resolutions.binary_search_by_key(&atom, |(a, _)| *a) {
            out.extend(
                resolutions[at]
                    .1
                    .iter()
                    .map(|&port| (proto, port, POLICY_PREFIX_FULL)),
            );
        }
    }
}

fn intersects(a: &[u32], b: &[u32]) -> bool {
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => return true,
        }
    }
    false
}

impl Compiler {
    /// Policy sets of the local pods that may have changed, the policy set
    /// table, and the endpoint entries.
    pub(super) fn update_sets(&mut self, b: &mut Batch) {
        let mut moves = Vec::new();
        let mut keys = Keys::default();
        for (id, pref, local) in std::mem::take(&mut b.gone_locals) {
            moves.push(Move {
                member: id,
                from: local.set,
                to: None,
            });
            self.journal.set_endpoint(&mut self.out.maps, pref, None);
        }
        for &id in &b.reselect {
            let local = &self.locals[&id];
            moves.push(Move {
                member: id,
                from: local.set,
                to: self.set_key(id, &local.policies).map(|k| keys.index(k)),
            });
        }
        let renumbered = self
            .sets
            .regroup(&moves, keys, &mut self.set_alloc, &mut b.set_changes);
        for (id, set) in renumbered {
            if let Some(local) = self.locals.get_mut(&id) {
                local.set = set;
                b.endpoints.insert(id);
            }
        }
        let mut infos: BTreeSet<u32> = BTreeSet::new();
        for (&set, old) in &b.set_changes {
            for pref in old.iter().flat_map(|k| &k.policies) {
                if let Some(sets) = self.policy_sets.get_mut(pref) {
                    sets.remove(&set);
                    if sets.is_empty() {
                        self.policy_sets.remove(pref);
                    }
                }
            }
            match self.sets.key(set) {
                Some(new) => {
                    for pref in &new.policies {
                        self.policy_sets
                            .entry(pref.clone())
                            .or_default()
                            .insert(set);
                    }
                    infos.insert(set);
                }
                None => {
                    self.out.policy_sets.remove(&set);
                }
            }
        }
        for pref in &b.policies {
            infos.extend(self.policy_sets.get(pref).into_iter().flatten());
        }
        for set in infos {
            let key = self.sets.key(set).expect("live set");
            let mut info = PolicySetInfo::default();
            for pref in &key.policies {
                let pol = &self.policies[pref];
                if pol.ingress.is_some() {
                    info.ingress.push(pref.clone());
                }
                if pol.egress.is_some() {
                    info.egress.push(pref.clone());
                }
            }
            self.out.policy_sets.insert(set, info);
        }
        for &id in &b.endpoints {
            let Some(local) = self.locals.get(&id) else {
                continue;
            };
            let pod = &self.pods.slot(id).pod;
            let mut flags = 0;
            for pref in &local.policies {
                let pol = &self.policies[pref];
                if pol.ingress.is_some() {
                    flags |= EP_F_INGRESS_ISOLATED;
                }
                if pol.egress.is_some() {
                    flags |= EP_F_EGRESS_ISOLATED;
                }
            }
            if self
                .namespaces
                .get(&pod.namespace)
                .is_some_and(|n| n.audit())
            {
                flags |= EP_F_AUDIT;
            }
            // The pod's addresses: the datapath drops what the pod sends
            // from any other (and unicast for any other): anti-spoofing.
            let value = EndpointValue::new(local.set.unwrap_or(0), local.endpoint_id, flags)
                .with_addresses(pod.ips.iter().copied(), None);
            self.journal
                .set_endpoint(&mut self.out.maps, pod.pod_ref(), Some(value));
        }
    }

    /// The policy set of a local pod selected by `policies` (`None` when
    /// nothing selects it).
    fn set_key(&self, id: u32, policies: &[PolicyRef]) -> Option<PolicySetKey> {
        if policies.is_empty() {
            return None;
        }
        let pod = &self.pods.slot(id).pod;
        let mut names = BTreeSet::new();
        for pref in policies {
            for rule in self.policies[pref].ingress.iter().flatten() {
                for spec in &rule.ports {
                    if let PortMatch::Named(name) = &spec.port {
                        names.insert((name.as_str(), spec.protocol));
                    }
                }
            }
        }
        let mut named: Resolutions = names
            .into_iter()
            .filter_map(|(name, proto)| {
                let ports = resolve(pod, name, proto);
                let atom = Atom::IngressNamed(name.into(), proto);
                let atom = self.atoms.id_of(&atom).expect("rules in play hold it");
                (!ports.is_empty()).then_some((atom, ports))
            })
            .collect();
        named.sort();
        Some(PolicySetKey {
            policies: policies.to_vec(),
            named,
        })
    }

    /// Recomputes the triples whose rule, policy set or identity changed.
    pub(super) fn update_entries(&mut self, b: &mut Batch) {
        let mut triples: NumSet<(u32, u32, u32)> = NumSet::default();
        // Changed rules: everything they produced and could produce.
        for &rule in &b.rules {
            if let Some(done) = self.emitted.get(&rule) {
                triples.extend(done.keys().map(|&(s, i)| (rule, s, i)));
            }
            if let Some(plan) = self.rules.get(&rule) {
                let identities = plan.identities(&self.atom_identities);
                for &set in self.policy_sets.get(&plan.key.policy).into_iter().flatten() {
                    triples.extend(identities.iter().map(|&i| (rule, set, i)));
                }
            }
        }
        // Changed policy sets: the rules of the policies that came or went
        // (all of them when the set's named ports resolve differently).
        for (&set, old) in &b.set_changes {
            let new = self.sets.key(set);
            let policies: BTreeSet<&PolicyRef> = match (old, new) {
                (Some(old), Some(new)) if old.named == new.named => {
                    let (o, n): (BTreeSet<_>, BTreeSet<_>) =
                        (old.policies.iter().collect(), new.policies.iter().collect());
                    o.symmetric_difference(&n).copied().collect()
                }
                _ => old.iter().chain(new).flat_map(|k| &k.policies).collect(),
            };
            for pref in policies {
                let Some(relevant) = self.relevant.get(pref) else {
                    continue; // its rules are gone: they are in `b.rules`
                };
                for &(_, _, _, rule) in &relevant.rules {
                    if b.rules.contains(&rule) {
                        continue;
                    }
                    if let Some(done) = self.emitted.get(&rule) {
                        triples.extend(
                            done.keys()
                                .filter(|(s, _)| *s == set)
                                .map(|&(s, i)| (rule, s, i)),
                        );
                    }
                    if new.is_some_and(|k| k.policies.binary_search(pref).is_ok()) {
                        let plan = &self.rules[&rule];
                        let identities = plan.identities(&self.atom_identities);
                        triples.extend(identities.into_iter().map(|i| (rule, set, i)));
                    }
                }
            }
        }
        // Changed identities: the rules of the atoms that came or went.
        for (&identity, old) in &b.identity_changes {
            let new = self.identities.key(identity);
            let old_atoms: BTreeSet<u32> = old.iter().flat_map(key_atoms).collect();
            let new_atoms: BTreeSet<u32> = new.into_iter().flat_map(key_atoms).collect();
            let mut atoms: BTreeSet<u32> = old_atoms
                .symmetric_difference(&new_atoms)
                .copied()
                .collect();
            if let (Some(old), Some(new)) = (old, new) {
                // Named ports that resolve differently.
                for (atom, ports) in &new.named {
                    if old.named.iter().any(|(a, p)| a == atom && p != ports) {
                        atoms.insert(*atom);
                    }
                }
            }
            for atom in atoms {
                for &rule in self.atom_rules.get(&atom).into_iter().flatten() {
                    if b.rules.contains(&rule) {
                        continue;
                    }
                    let policy = &self.rules[&rule].key.policy;
                    for &set in self.policy_sets.get(policy).into_iter().flatten() {
                        triples.insert((rule, set, identity));
                    }
                }
            }
            // A triple this misses had its rule changed (`b.rules`) or its
            // set stop holding the rule's policy (`b.set_changes`).
        }
        let mut triples: Vec<(u32, u32, u32)> = triples.into_iter().collect();
        triples.sort_unstable();
        for (rule, set, identity) in triples {
            self.recompute(rule, set, identity, b);
        }
    }

    /// The entries of one triple under the current state.
    fn entries_for(&self, rule: u32, set: u32, identity: u32) -> Vec<PortEntry> {
        let mut out = Vec::new();
        let (Some(plan), Some(key)) = (self.rules.get(&rule), self.sets.key(set)) else {
            return out;
        };
        if key.policies.binary_search(&plan.key.policy).is_err() {
            return out;
        }
        let base = |out: &mut Vec<PortEntry>| {
            out.extend_from_slice(&plan.ports);
            named_entries(&plan.ingress_named, &key.named, out);
        };
        if identity == IDENTITY_ANY {
            if plan.any_peer {
                base(&mut out);
            }
        } else if let Some(id) = self.identities.key(identity) {
            let (peers, named) = if id.address {
                (&plan.block_atoms, &plan.block_named)
            } else {
                (&plan.pod_atoms, &plan.pod_named)
            };
            if plan.any_peer {
                if !id.address {
                    named_entries(&plan.pod_named, &id.named, &mut out);
                }
            } else if intersects(peers, &id.atoms) {
                base(&mut out);
                named_entries(named, &id.named, &mut out);
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Brings one triple's entries up to date.
    fn recompute(&mut self, rule: u32, set: u32, identity: u32, b: &Batch) {
        let new = self.entries_for(rule, set, identity);
        let old = self
            .emitted
            .get(&rule)
            .and_then(|m| m.get(&(set, identity)))
            .map_or(&[][..], Vec::as_slice);
        if old == new.as_slice() {
            return;
        }
        let direction = self
            .rules
            .get(&rule)
            .or_else(|| b.retired.get(&rule))
            .expect("a rule in play or retired by this batch")
            .key
            .direction;
        let gone: Vec<PortEntry> = old
            .iter()
            .filter(|e| new.binary_search(e).is_err())
            .copied()
            .collect();
        let came: Vec<PortEntry> = new
            .iter()
            .filter(|e| old.binary_search(e).is_err())
            .copied()
            .collect();
        let key = |(proto, port, len): PortEntry| {
            (PolicyKey::new(set, identity, direction, proto, port), len)
        };
        for e in gone {
            self.contribute(key(e), rule, false, b);
        }
        for e in came {
            self.contribute(key(e), rule, true, b);
        }
        let done = self.emitted.entry(rule).or_default();
        if new.is_empty() {
            done.remove(&(set, identity));
            if done.is_empty() {
                self.emitted.remove(&rule);
            }
        } else {
            done.insert((set, identity), new);
        }
    }

    /// Adds or removes `rule` as a producer of a policy entry; writes the
    /// entry (named by its first producer in rule order) or deletes it.
    fn contribute(&mut self, key: (PolicyKey, u32), rule: u32, add: bool, b: &Batch) {
        let rule_key = |r: u32| -> &RuleKey {
            &self
                .rules
                .get(&r)
                .or_else(|| b.retired.get(&r))
                .expect("a rule in play or retired by this batch")
                .key
        };
        let list = self.contributors.entry(key).or_default();
        let before = list.first().copied();
        if add {
            let at = list
                .binary_search_by(|r| rule_key(*r).cmp(rule_key(rule)))
                .unwrap_or_else(|at| at);
            list.insert(at, rule);
        } else {
            list.retain(|r| *r != rule);
        }
        let after = list.first().copied();
        if list.is_empty() {
            self.contributors.remove(&key);
        }
        if before != after {
            self.journal
                .set_policy(&mut self.out.maps, key, after.map(PolicyValue::allow));
        }
    }

    /// Forgets what the flush left unused.
    pub(super) fn cleanup(&mut self, b: &mut Batch) {
        self.atoms.sweep(b.atoms.iter().copied());
        for (rule, plan) in &b.retired {
            if !self.rules.contains_key(rule) {
                self.rule_ids.remove(&plan.key);
            }
        }
        for &id in &b.pods_touched {
            self.pods.release(id);
        }
        self.ns_views
            .retain(|_, v| !v.live.is_empty() || !v.locals.is_empty());
    }
}
