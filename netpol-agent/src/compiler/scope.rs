//! What is in play on the node: the objects held, which pods are live and
//! local, which policies select a local pod, their rules and the atoms those
//! rules use. The first steps of a flush.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::IpAddr,
};

use netpol_common::{DIR_EGRESS, DIR_INGRESS};

use super::{Atom, Batch, Change, Compiler, RuleInfo, RuleKey, entries::RulePlan};
use crate::model::{LabelSelector, NetworkPolicy, Pod, PodRef, PolicyRef, Rule};

/// The pods held, in slots (ids that stay while the pod exists).
#[derive(Debug, Default)]
pub(super) struct Pods {
    index: HashMap<PodRef, u32>,
    pub(super) slots: Vec<PodSlot>,
    free: Vec<u32>,
}

/// One pod and what was derived from it (as of the last flush).
#[derive(Debug, Default)]
pub(super) struct PodSlot {
    /// The pod as last given (kept after removal until the flush).
    pub(super) pod: Pod,
    /// Not removed.
    pub(super) present: bool,
    /// Live as of the last flush (see [`Pod::is_live`]).
    pub(super) live: bool,
    /// The distinct IPs it claims in `Compiler::ips` (live pods only).
    pub(super) claimed: Vec<IpAddr>,
    /// Sorted pod atoms it satisfies.
    pub(super) pod_atoms: Vec<u32>,
    /// Its resolution of the `PodNamed` atoms in play.
    pub(super) pod_named: super::Resolutions,
    /// Its resolution of the `BlockNamed` atoms in play.
    pub(super) block_named: super::Resolutions,
    /// Its pod identity (0: none, nothing distinguishes it).
    pub(super) identity: u32,
}

impl Pods {
    /// The pod with this name, unless removed.
    pub(super) fn get(&self, pref: &PodRef) -> Option<&Pod> {
        let slot = &self.slots[*self.index.get(pref)? as usize];
        slot.present.then_some(&slot.pod)
    }

    /// Names of the pods held.
    pub(super) fn refs(&self) -> impl Iterator<Item = &PodRef> {
        self.index
            .iter()
            .filter(|(_, s)| self.slots[**s as usize].present)
            .map(|(r, _)| r)
    }

    pub(super) fn slot(&self, id: u32) -> &PodSlot {
        &self.slots[id as usize]
    }

    pub(super) fn slot_mut(&mut self, id: u32) -> &mut PodSlot {
        &mut self.slots[id as usize]
    }

    /// Stores a pod; returns its slot if anything changed.
    fn upsert(&mut self, pod: Pod) -> Option<u32> {
        let pref = pod.pod_ref();
        if let Some(&id) = self.index.get(&pref) {
            let slot = &mut self.slots[id as usize];
            if slot.present && slot.pod == pod {
                return None;
            }
            slot.pod = pod;
            slot.present = true;
            return Some(id);
        }
        let slot = PodSlot {
            pod,
            present: true,
            ..Default::default()
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.slots[id as usize] = slot;
                id
            }
            None => {
                self.slots.push(slot);
                u32::try_from(self.slots.len() - 1).expect("fewer than 2^32 pods")
            }
        };
        self.index.insert(pref, id);
        Some(id)
    }

    /// Marks a pod removed; returns its slot if it was there.
    fn remove(&mut self, pref: &PodRef) -> Option<u32> {
        let id = *self.index.get(pref)?;
        let slot = &mut self.slots[id as usize];
        std::mem::replace(&mut slot.present, false).then_some(id)
    }

    /// Frees the slot of a removed pod once the flush has undone it.
    pub(super) fn release(&mut self, id: u32) {
        let slot = &mut self.slots[id as usize];
        if !slot.present && !slot.live {
            self.index.remove(&slot.pod.pod_ref());
            *slot = PodSlot::default();
            self.free.push(id);
        }
    }
}

/// Objects changed since the last flush.
#[derive(Debug, Default)]
pub(super) struct Dirty {
    pods: BTreeSet<u32>,
    namespaces: BTreeSet<String>,
    policies: BTreeSet<PolicyRef>,
}

/// A namespace as the node sees it.
#[derive(Debug, Default)]
pub(super) struct NsView {
    /// Live pods in it.
    pub(super) live: BTreeSet<u32>,
    /// Local pods in it.
    pub(super) locals: BTreeSet<u32>,
    /// Sorted pod atoms with a namespace selector that matches it.
    pub(super) selected_by: Vec<u32>,
    pub(super) audit: bool,
}

/// A local pod (an endpoint).
#[derive(Debug, Default)]
pub(super) struct Local {
    /// Sorted policies (with a type) that select it.
    pub(super) policies: Vec<PolicyRef>,
    /// Its policy set (`None`: not isolated, `policy_id` 0).
    pub(super) set: Option<u32>,
    pub(super) endpoint_id: u32,
}

/// A policy that selects local pods (or did until this flush).
#[derive(Debug, Default)]
pub(super) struct Relevant {
    /// How many local pods it selects.
    pub(super) locals: u32,
    /// Its compiled rules: (direction, index, rule as compiled, rule id).
    pub(super) rules: Vec<(u8, u32, Rule, u32)>,
}

/// The atoms in play, by kind.
#[derive(Debug, Default)]
pub(super) struct Play {
    pub(super) atoms: BTreeSet<u32>,
    /// Pod atoms without a namespace selector, by the namespace they apply to.
    pub(super) own: HashMap<String, BTreeSet<u32>>,
    /// Pod atoms with a namespace selector.
    pub(super) namespaced: BTreeSet<u32>,
    pub(super) pod_named: BTreeSet<u32>,
    pub(super) block_named: BTreeSet<u32>,
}

impl Compiler {
    /// Records a change; [`Compiler::flush`] derives its effects.
    pub(super) fn stage(&mut self, change: Change) {
        self.staged = true;
        match change {
            Change::UpsertClusterPolicy(cnp) => {
                self.cluster_policies.insert(cnp.name.clone(), cnp);
            }
            Change::RemoveClusterPolicy(name) => {
                self.cluster_policies.remove(&name);
            }
            Change::UpsertNode(node) => {
                self.nodes.insert(node.name.clone(), node);
            }
            Change::RemoveNode(name) => {
                self.nodes.remove(&name);
            }
            Change::UpsertNamespace(ns) => {
                if self.namespaces.get(&ns.name) != Some(&ns) {
                    self.dirty.namespaces.insert(ns.name.clone());
                    self.namespaces.insert(ns.name.clone(), ns);
                }
            }
            Change::RemoveNamespace(name) => {
                if self.namespaces.remove(&name).is_some() {
                    self.dirty.namespaces.insert(name);
                }
            }
            Change::UpsertPod(pod) => {
                if let Some(id) = self.pods.upsert(pod) {
                    self.dirty.pods.insert(id);
                }
            }
            Change::RemovePod(pref) => {
                if let Some(id) = self.pods.remove(&pref) {
                    self.dirty.pods.insert(id);
                }
            }
            Change::UpsertPolicy(pol) => {
                let pref = pol.policy_ref();
                if self.policies.get(&pref) != Some(&pol) {
                    self.policies_by_ns
                        .entry(pref.namespace.clone())
                        .or_default()
                        .insert(pref.clone());
                    self.policies.insert(pref.clone(), pol);
                    self.dirty.policies.insert(pref);
                }
            }
            Change::RemovePolicy(pref) => {
                if self.policies.remove(&pref).is_some() {
                    if let Some(set) = self.policies_by_ns.get_mut(&pref.namespace) {
                        set.remove(&pref);
                        if set.is_empty() {
                            self.policies_by_ns.remove(&pref.namespace);
                        }
                    }
                    self.dirty.policies.insert(pref);
                }
            }
            Change::SetNode(node) => {
                if node.name != self.node.name {
                    // Pods on the old or the new node change locality.
                    for (id, slot) in self.pods.slots.iter().enumerate() {
                        let on = slot.pod.node.as_deref();
                        if on == Some(self.node.name.as_str()) || on == Some(node.name.as_str()) {
                            self.dirty.pods.insert(id as u32);
                        }
                    }
                    self.out.node = node.name.clone();
                }
                self.node = node;
            }
        }
    }

    /// Liveness, address claims, namespace membership and locality of the
    /// changed pods.
    pub(super) fn update_pods(&mut self, b: &mut Batch) {
        b.namespaces = std::mem::take(&mut self.dirty.namespaces);
        for id in std::mem::take(&mut self.dirty.pods) {
            let slot = self.pods.slot(id);
            let was_live = slot.live;
            let now_live = slot.present && slot.pod.is_live();
            let ns = slot.pod.namespace.clone();
            let mut new_ips: Vec<IpAddr> = if now_live {
                slot.pod.ips.clone()
            } else {
                Vec::new()
            };
            new_ips.sort_unstable();
            new_ips.dedup();
            let old_ips = std::mem::take(&mut self.pods.slot_mut(id).claimed);
            for ip in &old_ips {
                if new_ips.binary_search(ip).is_err() {
                    self.unclaim(*ip, id);
                }
                b.ips.push(*ip);
            }
            for ip in &new_ips {
                if old_ips.binary_search(ip).is_err() {
                    self.claim(*ip, id);
                }
                b.ips.push(*ip);
            }
            let now_local =
                now_live && self.pods.slot(id).pod.node.as_deref() == Some(self.node.name.as_str());
            let slot = self.pods.slot_mut(id);
            slot.claimed = new_ips;
            slot.live = now_live;
            if !now_live {
                slot.pod_atoms.clear();
                slot.pod_named.clear();
                slot.block_named.clear();
            }
            if was_live != now_live {
                let view = self.ns_views.entry(ns.clone()).or_insert_with(|| {
                    b.namespaces.insert(ns.clone());
                    NsView::default()
                });
                if now_live {
                    view.live.insert(id);
                } else {
                    view.live.remove(&id);
                }
            }
            if now_live {
                b.pods_full.insert(id);
            }
            b.pods_touched.push(id);

            let was_local = self.locals.contains_key(&id);
            if was_local && !now_local {
                let local = self.locals.remove(&id).expect("local");
                for pref in &local.policies {
                    self.relevant.get_mut(pref).expect("relevant").locals -= 1;
                    b.policies.insert(pref.clone());
                }
                if let Some(view) = self.ns_views.get_mut(&ns) {
                    view.locals.remove(&id);
                }
                b.gone_locals
                    .push((id, self.pods.slot(id).pod.pod_ref(), local));
            }
            if now_local {
                if !was_local {
                    let endpoint_id = self.endpoint_alloc.next();
                    self.locals.insert(
                        id,
                        Local {
                            endpoint_id,
                            ..Default::default()
                        },
                    );
                    self.ns_views.entry(ns).or_default().locals.insert(id);
                }
                b.reselect.insert(id);
            }
        }
    }

    /// Adds a claim on `ip` by pod `id`; claimants stay in namespace/name
    /// order (the first one owns the address).
    fn claim(&mut self, ip: IpAddr, id: u32) {
        let pods = &self.pods;
        let prefixes = &self.prefixes;
        let order = &mut self.ip_order;
        let slot = self.ips.entry(ip).or_insert_with(|| {
            order.insert(ip);
            super::identities::IpSlot::new(prefixes.class_net(ip))
        });
        let name = |s: u32| {
            let p = &pods.slot(s).pod;
            (p.namespace.as_str(), p.name.as_str())
        };
        let at = slot
            .claimants
            .binary_search_by(|s| name(*s).cmp(&name(id)))
            .unwrap_or_else(|at| at);
        slot.claimants.insert(at, id);
    }

    fn unclaim(&mut self, ip: IpAddr, id: u32) {
        if let Some(slot) = self.ips.get_mut(&ip) {
            slot.claimants.retain(|s| *s != id);
        }
    }

    /// Which policies select each local pod that may have changed, and so
    /// how many local pods each policy selects.
    pub(super) fn update_selection(&mut self, b: &mut Batch) {
        for pref in std::mem::take(&mut self.dirty.policies) {
            if let Some(view) = self.ns_views.get(&pref.namespace) {
                b.reselect.extend(view.locals.iter().copied());
            }
            b.policies.insert(pref);
        }
        for &id in &b.reselect {
            let pod = &self.pods.slot(id).pod;
            let selecting: Vec<PolicyRef> = self
                .policies_by_ns
                .get(&pod.namespace)
                .into_iter()
                .flatten()
                .filter(|pref| {
                    let pol = &self.policies[*pref];
                    (pol.ingress.is_some() || pol.egress.is_some()) && pol.selects(pod)
                })
                .cloned()
                .collect();
            let local = self.locals.get_mut(&id).expect("reselected pods are local");
            if local.policies != selecting {
                for pref in &local.policies {
                    self.relevant.get_mut(pref).expect("relevant").locals -= 1;
                    b.policies.insert(pref.clone());
                }
                for pref in &selecting {
                    self.relevant.entry(pref.clone()).or_default().locals += 1;
                    b.policies.insert(pref.clone());
                }
                local.policies = selecting;
            }
            b.endpoints.insert(id);
        }
    }

    /// Compiles the rules of policies that entered play or changed, and
    /// retires those of policies that left play.
    pub(super) fn update_rules(&mut self, b: &mut Batch) {
        for pref in std::mem::take(&mut b.policies) {
            let relevant = self.relevant.get(&pref).is_some_and(|r| r.locals > 0);
            let mut wanted: Vec<(u8, u32, Rule)> = Vec::new();
            if relevant {
                let pol = &self.policies[&pref];
                for (dir, rules) in directions(pol) {
                    for (index, rule) in rules.iter().enumerate() {
                        let index = u32::try_from(index).expect("fewer than 2^32 rules");
                        wanted.push((dir, index, rule.clone()));
                    }
                }
            }
            let old = self
                .relevant
                .get_mut(&pref)
                .map(|r| std::mem::take(&mut r.rules))
                .unwrap_or_default();
            let mut kept = Vec::new();
            for (dir, index, rule, id) in old {
                match wanted
                    .iter()
                    .position(|(d, i, r)| (*d, *i) == (dir, index) && *r == rule)
                {
                    Some(at) => {
                        wanted.remove(at);
                        kept.push((dir, index, rule, id));
                    }
                    None => self.retire_rule(id, b),
                }
            }
            for (dir, index, rule) in wanted {
                let id = self.add_rule(&pref, dir, index, &rule, b);
                kept.push((dir, index, rule, id));
            }
            kept.sort_by_key(|(d, i, _, _)| (*d, *i));
            b.policies.insert(pref.clone());
            match self.relevant.get_mut(&pref) {
                Some(r) if r.locals == 0 && kept.is_empty() => {
                    self.relevant.remove(&pref);
                }
                Some(r) => r.rules = kept,
                None => debug_assert!(kept.is_empty()),
            }
        }
    }

    fn add_rule(
        &mut self,
        pref: &PolicyRef,
        dir: u8,
        index: u32,
        rule: &Rule,
        b: &mut Batch,
    ) -> u32 {
        let key = RuleKey {
            policy: pref.clone(),
            direction: dir,
            index,
        };
        let id = match self.rule_ids.get(&key) {
            Some(&id) => id,
            None => {
                let id = self.rule_alloc.next();
                self.rule_ids.insert(key.clone(), id);
                id
            }
        };
        let plan = RulePlan::new(key, rule, &mut self.atoms);
        for &atom in &plan.atoms {
            self.atom_rules.entry(atom).or_default().insert(id);
            b.atoms.insert(atom);
        }
        self.out.rules.insert(
            id,
            RuleInfo {
                namespace: pref.namespace.clone(),
                policy: pref.name.clone(),
                direction: dir,
                index,
                cluster: None,
            },
        );
        self.rules.insert(id, plan);
        b.rules.insert(id);
        id
    }

    fn retire_rule(&mut self, id: u32, b: &mut Batch) {
        let plan = self.rules.remove(&id).expect("retired rules exist");
        for &atom in &plan.atoms {
            self.atoms.release(atom);
            if let Some(rules) = self.atom_rules.get_mut(&atom) {
                rules.remove(&id);
                if rules.is_empty() {
                    self.atom_rules.remove(&atom);
                }
            }
            b.atoms.insert(atom);
        }
        self.out.rules.remove(&id);
        b.retired.insert(id, plan);
        b.rules.insert(id);
    }

    /// Atoms entering and leaving play: namespace matches, pod atoms and
    /// named-port resolutions of the pods not recomputed from scratch, and
    /// the address partition.
    pub(super) fn update_atoms(&mut self, b: &mut Batch) {
        let mut entering = Vec::new();
        let mut leaving = Vec::new();
        for &atom in &b.atoms {
            let now = self.atoms.refs(atom) > 0;
            let was = self.play.atoms.contains(&atom);
            if now && !was {
                entering.push(atom);
                self.play.atoms.insert(atom);
            } else if was && !now {
                leaving.push(atom);
                self.play.atoms.remove(&atom);
            }
        }
        let mut namespaced = Vec::new();
        let mut own = Vec::new();
        let mut pod_named = Vec::new();
        let mut block_named = Vec::new();
        for (atom, enter) in entering
            .iter()
            .map(|a| (*a, true))
            .chain(leaving.iter().map(|a| (*a, false)))
        {
            match self.atoms.get(atom).clone() {
                Atom::Pods {
                    namespace_selector: Some(_),
                    ..
                } => {
                    set_member(&mut self.play.namespaced, atom, enter);
                    namespaced.push((atom, enter));
                }
                Atom::Pods {
                    own_namespace: Some(ns),
                    ..
                } => {
                    let set = self.play.own.entry(ns.clone()).or_default();
                    set_member(set, atom, enter);
                    if set.is_empty() {
                        self.play.own.remove(&ns);
                    }
                    own.push((atom, ns, enter));
                }
                Atom::Pods { .. } => {}
                Atom::Block(block) => {
                    if enter {
                        self.prefixes.add_block(atom, &block);
                    } else {
                        self.prefixes.remove_block(atom, &block);
                    }
                    b.blocks.push(block.cidr);
                }
                Atom::PodNamed(..) => {
                    set_member(&mut self.play.pod_named, atom, enter);
                    pod_named.push((atom, enter));
                }
                Atom::BlockNamed(..) => {
                    set_member(&mut self.play.block_named, atom, enter);
                    block_named.push((atom, enter));
                }
                Atom::IngressNamed(..) => {}
            }
        }

        // Namespaces whose labels changed: which namespaced atoms match them.
        for ns in std::mem::take(&mut b.namespaces) {
            let labels = namespace_labels(&self.namespaces, &ns);
            let audit = self.namespaces.get(&ns).is_some_and(|n| n.audit());
            let Some(view) = self.ns_views.get_mut(&ns) else {
                continue;
            };
            let selected_by: Vec<u32> = self
                .play
                .namespaced
                .iter()
                .copied()
                .filter(|a| namespace_matches(self.atoms.get(*a), labels))
                .collect();
            if selected_by != view.selected_by {
                view.selected_by = selected_by;
                b.pods_full.extend(view.live.iter().copied());
                b.pods_touched.extend(view.live.iter().copied());
            }
            if view.audit != audit {
                view.audit = audit;
                b.endpoints.extend(view.locals.iter().copied());
            }
        }

        // Pod atoms entering or leaving: the pods they can match (but those
        // recomputed from scratch anyway, whole namespaces of them on a first
        // compile).
        let recomputed: HashSet<String> = if namespaced.is_empty() && own.is_empty() {
            HashSet::new()
        } else {
            self.ns_views
                .iter()
                .filter(|(_, v)| v.live.iter().all(|p| b.pods_full.contains(p)))
                .map(|(ns, _)| ns.clone())
                .collect()
        };
        for (atom, enter) in namespaced {
            let selector = self.atoms.get(atom).clone();
            for (ns, view) in &mut self.ns_views {
                let matches = if enter {
                    namespace_matches(&selector, namespace_labels(&self.namespaces, ns))
                } else {
                    view.selected_by.binary_search(&atom).is_ok()
                };
                if !matches {
                    continue;
                }
                match view.selected_by.binary_search(&atom) {
                    Ok(at) if !enter => {
                        view.selected_by.remove(at);
                    }
                    Err(at) if enter => view.selected_by.insert(at, atom),
                    _ => {}
                }
                if !recomputed.contains(ns) {
                    toggle_pod_atom(&mut self.pods, view, &selector, atom, enter, b);
                }
            }
        }
        for (atom, ns, enter) in own {
            let selector = self.atoms.get(atom).clone();
            if !recomputed.contains(&ns)
                && let Some(view) = self.ns_views.get(&ns)
            {
                toggle_pod_atom(&mut self.pods, view, &selector, atom, enter, b);
            }
        }

        // Named ports entering or leaving: every live pod resolves them.
        for (atom, enter, block) in pod_named
            .into_iter()
            .map(|(a, e)| (a, e, false))
            .chain(block_named.into_iter().map(|(a, e)| (a, e, true)))
        {
            let (Atom::PodNamed(name, proto) | Atom::BlockNamed(name, proto)) =
                self.atoms.get(atom).clone()
            else {
                unreachable!("named atoms");
            };
            for view in self.ns_views.values() {
                for &id in &view.live {
                    if b.pods_full.contains(&id) {
                        continue;
                    }
                    let slot = self.pods.slot_mut(id);
                    let ports = if enter {
                        resolve(&slot.pod, &name, proto)
                    } else {
                        Vec::new()
                    };
                    let list = if block {
                        &mut slot.block_named
                    } else {
                        &mut slot.pod_named
                    };
                    let changed = match list.binary_search_by_key(&atom, |(a, _)| *a) {
                        Ok(at) => {
                            list.remove(at);
                            true
                        }
                        Err(_) => false,
                    };
                    let changed = changed || !ports.is_empty();
                    if !ports.is_empty() {
                        let at = list
                            .binary_search_by_key(&atom, |(a, _)| *a)
                            .unwrap_or_else(|at| at);
                        list.insert(at, (atom, ports));
                    }
                    if changed {
                        if block {
                            b.ips.extend(slot.claimed.iter().copied());
                        } else {
                            b.pods_touched.push(id);
                        }
                    }
                }
            }
        }
    }
}

/// Adds or removes a pod atom on the live pods of a namespace that its pod
/// selector matches (pods recomputed from scratch are skipped).
fn toggle_pod_atom(
    pods: &mut Pods,
    view: &NsView,
    atom_key: &Atom,
    atom: u32,
    enter: bool,
    b: &mut Batch,
) {
    let Atom::Pods { pod_selector, .. } = atom_key else {
        unreachable!("pod atoms");
    };
    for &id in &view.live {
        if b.pods_full.contains(&id) {
            continue;
        }
        let slot = pods.slot_mut(id);
        let changed = if enter {
            let matches = pod_selector
                .as_ref()
                .is_none_or(|s| s.matches(&slot.pod.labels));
            match slot.pod_atoms.binary_search(&atom) {
                Err(at) if matches => {
                    slot.pod_atoms.insert(at, atom);
                    true
                }
                _ => false,
            }
        } else {
            match slot.pod_atoms.binary_search(&atom) {
                Ok(at) => {
                    slot.pod_atoms.remove(at);
                    true
                }
                Err(_) => false,
            }
        };
        if changed {
            b.pods_touched.push(id);
        }
    }
}

fn set_member(set: &mut BTreeSet<u32>, atom: u32, member: bool) {
    if member {
        set.insert(atom);
    } else {
        set.remove(&atom);
    }
}

/// Labels of a namespace; empty when it is not known (yet).
pub(super) fn namespace_labels<'a>(
    namespaces: &'a HashMap<String, crate::model::Namespace>,
    ns: &str,
) -> &'a crate::model::Labels {
    static EMPTY: std::sync::LazyLock<crate::model::Labels> =
        std::sync::LazyLock::new(Default::default);
    namespaces.get(ns).map_or(&*EMPTY, |n| &n.labels)
}

/// Whether the namespace selector of a pod atom matches a namespace.
fn namespace_matches(atom: &Atom, labels: &crate::model::Labels) -> bool {
    matches!(atom, Atom::Pods { namespace_selector: Some(sel), .. } if sel.matches(labels))
}

/// Whether a pod atom's pod selector matches labels.
pub(super) fn pod_selector_matches(atom: &Atom, labels: &crate::model::Labels) -> bool {
    match atom {
        Atom::Pods { pod_selector, .. } => pod_selector
            .as_ref()
            .is_none_or(|s: &LabelSelector| s.matches(labels)),
        _ => false,
    }
}

/// The directions a policy has, with their rules.
pub(super) fn directions(pol: &NetworkPolicy) -> impl Iterator<Item = (u8, &[Rule])> {
    [
        (DIR_INGRESS, pol.ingress.as_deref()),
        (DIR_EGRESS, pol.egress.as_deref()),
    ]
    .into_iter()
    .filter_map(|(d, r)| r.map(|r| (d, r)))
}

/// The sorted, distinct port numbers a named port resolves to on a pod.
pub(super) fn resolve(pod: &Pod, name: &str, protocol: crate::model::Protocol) -> Vec<u16> {
    let mut ports: Vec<u16> = pod.resolve_named_port(name, protocol).collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}
