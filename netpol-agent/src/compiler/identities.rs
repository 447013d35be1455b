//! Pod and address identities, and the peer maps.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
};

use ipnet::IpNet;
use netpol_common::{PEER_F_HOST, PEER_F_POD, PeerValue};

use super::{
    Atom, Batch, Compiler, IdentityKey, Resolutions,
    classes::{Keys, Move},
    hash::NumMap,
    scope::{pod_selector_matches, resolve},
};
use crate::model::{Labels, PodRef};

/// A member of an identity class: a pod (pod identities), a pod IP or a net
/// (address identities).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Member {
    Pod(u32),
    Ip(IpAddr),
    Net(IpNet),
}

/// An address that live pods claim.
#[derive(Debug)]
pub(super) struct IpSlot {
    /// Pods that list the address, in namespace/name order: the first owns it.
    pub(super) claimants: Vec<u32>,
    /// The net whose class the address is in (see `Prefixes::class_net`).
    class: IpNet,
    /// Address identity (0: none yet).
    pub(super) identity: u32,
    /// The pod entry as last written: owner, entry, whether the owner is
    /// local.
    written: Option<(u32, PeerValue, bool)>,
}

impl IpSlot {
    /// A slot for an address whose class is the one of net `class`.
    pub(super) fn new(class: IpNet) -> Self {
        Self {
            claimants: Vec::new(),
            class,
            identity: 0,
            written: None,
        }
    }
}

impl Compiler {
    /// Pod identity keys of the pods that may have changed, and their moves
    /// between classes.
    pub(super) fn classify_pods(&mut self, b: &mut Batch) {
        // Pods recomputed from scratch; pods with equal labels in one
        // namespace satisfy the same pod atoms: evaluate each pair once.
        let mut computed: Vec<(u32, Vec<u32>, Resolutions, Resolutions)> = Vec::new();
        {
            let mut cache: HashMap<(&str, &Labels), Vec<u32>> = HashMap::new();
            let mut full: Vec<u32> = b.pods_full.iter().copied().collect();
            full.sort_unstable();
            for &id in &full {
                let slot = self.pods.slot(id);
                if !slot.live {
                    continue;
                }
                let pod = &slot.pod;
                let atoms = cache
                    .entry((pod.namespace.as_str(), &pod.labels))
                    .or_insert_with(|| {
                        let own = self.play.own.get(&pod.namespace).into_iter().flatten();
                        let namespaced = self
                            .ns_views
                            .get(&pod.namespace)
                            .map(|v| v.selected_by.as_slice())
                            .unwrap_or_default();
                        let mut atoms: Vec<u32> = own
                            .chain(namespaced)
                            .copied()
                            .filter(|a| pod_selector_matches(self.atoms.get(*a), &pod.labels))
                            .collect();
                        atoms.sort_unstable();
                        atoms
                    })
                    .clone();
                let named = |set: &BTreeSet<u32>| -> Resolutions {
                    set.iter()
                        .filter_map(|&atom| {
                            let (Atom::PodNamed(name, proto) | Atom::BlockNamed(name, proto)) =
                                self.atoms.get(atom)
                            else {
                                unreachable!("named atoms");
                            };
                            let ports = resolve(pod, name, *proto);
                            (!ports.is_empty()).then_some((atom, ports))
                        })
                        .collect()
                };
                computed.push((
                    id,
                    atoms,
                    named(&self.play.pod_named),
                    named(&self.play.block_named),
                ));
            }
        }
        for (id, atoms, pod_named, block_named) in computed {
            let slot = self.pods.slot_mut(id);
            slot.pod_atoms = atoms;
            slot.pod_named = pod_named;
            if slot.block_named != block_named {
                slot.block_named = block_named;
                b.ips.extend(slot.claimed.iter().copied());
            }
        }

        // A pod that owns none of its addresses (another pod claims them
        // first) has no identity: claims that changed touch every claimant.
        for ip in &b.ips {
            if let Some(slot) = self.ips.get(ip) {
                b.pods_touched.extend(slot.claimants.iter().copied());
            }
        }
        b.pods_touched.sort_unstable();
        b.pods_touched.dedup();
        let touched = &b.pods_touched;
        let mut keys = Keys::default();
        let moves: Vec<Move<Member>> = {
            let mut index: NumMap<(&[u32], &Resolutions), u32> = NumMap::default();
            touched
                .iter()
                .map(|&id| {
                    let slot = self.pods.slot(id);
                    let owns = slot
                        .claimed
                        .iter()
                        .any(|ip| self.ips[ip].claimants.first() == Some(&id));
                    let distinct = !(slot.pod_atoms.is_empty() && slot.pod_named.is_empty());
                    let to = (slot.live && owns && distinct).then(|| {
                        *index
                            .entry((&slot.pod_atoms, &slot.pod_named))
                            .or_insert_with(|| {
                                keys.index(IdentityKey {
                                    address: false,
                                    atoms: slot.pod_atoms.clone(),
                                    named: slot.pod_named.clone(),
                                })
                            })
                    });
                    Move {
                        member: Member::Pod(id),
                        from: (slot.identity != 0).then_some(slot.identity),
                        to,
                    }
                })
                .collect()
        };
        let renumbered = self.identities.regroup(
            &moves,
            keys,
            &mut self.identity_alloc,
            &mut b.identity_changes,
        );
        for (member, identity) in renumbered {
            let Member::Pod(id) = member else {
                unreachable!("pod identities hold pods");
            };
            let slot = self.pods.slot_mut(id);
            slot.identity = identity.unwrap_or(0);
            b.ips.extend(slot.claimed.iter().copied());
        }
    }

    /// Address identity keys of the nets (when blocks changed) and of the
    /// pod IPs that may have changed, and their moves between classes.
    pub(super) fn classify_addresses(&mut self, b: &mut Batch) {
        let mut keys = Keys::default();
        let mut moves = Vec::new();
        if self.prefixes.take_changed() {
            // Nets inside the blocks that came or went, and nets never
            // classified (both /0 at first).
            b.nets = self.prefixes.inside(&b.blocks);
            let fresh = self.prefixes.nets.iter().filter(|(_, n)| n.identity == 0);
            b.nets.extend(fresh.map(|(net, _)| *net));
            b.nets.sort_unstable();
            b.nets.dedup();
        }
        if !b.nets.is_empty() {
            let classes: Vec<(IpNet, Option<Vec<u32>>)> = b
                .nets
                .iter()
                .map(|net| {
                    let live = self.prefixes.nets[net].refs > 0;
                    (*net, live.then(|| self.prefixes.atoms_of(net)))
                })
                .collect();
            for (net, atoms) in classes {
                let n = self.prefixes.nets.get_mut(&net).expect("net");
                if let Some(atoms) = &atoms {
                    n.atoms.clone_from(atoms);
                }
                moves.push(Move {
                    member: Member::Net(net),
                    from: (n.identity != 0).then_some(n.identity),
                    to: atoms.map(|atoms| {
                        keys.index(IdentityKey {
                            address: true,
                            atoms,
                            named: Vec::new(),
                        })
                    }),
                });
            }
            // Addresses in blocks that came or went may have another class.
            for cidr in &b.blocks {
                let inside = self.ip_order.range(cidr.network()..=cidr.broadcast());
                for ip in inside {
                    let slot = self.ips.get_mut(ip).expect("ordered addresses have slots");
                    slot.class = self.prefixes.class_net(*ip);
                    b.ips.push(*ip);
                }
            }
        }
        b.ips.sort_unstable();
        b.ips.dedup();
        {
            let mut index: NumMap<(IpNet, &Resolutions), u32> = NumMap::default();
            for ip in &b.ips {
                let slot = self.ips.get(ip);
                let to = slot
                    .and_then(|s| Some((s.claimants.first()?, s)))
                    .map(|(&owner, s)| {
                        let named = &self.pods.slot(owner).block_named;
                        *index.entry((s.class, named)).or_insert_with(|| {
                            keys.index(IdentityKey {
                                address: true,
                                atoms: self.prefixes.nets[&s.class].atoms.clone(),
                                named: named.clone(),
                            })
                        })
                    });
                let from = slot.map_or(0, |s| s.identity);
                moves.push(Move {
                    member: Member::Ip(*ip),
                    from: (from != 0).then_some(from),
                    to,
                });
            }
        }
        let renumbered = self.identities.regroup(
            &moves,
            keys,
            &mut self.identity_alloc,
            &mut b.identity_changes,
        );
        let mut more_ips = false;
        for (member, identity) in renumbered {
            let identity = identity.unwrap_or(0);
            match member {
                Member::Net(net) => {
                    self.prefixes.nets.get_mut(&net).expect("net").identity = identity;
                    if b.nets.binary_search(&net).is_err() {
                        // Renumbered without moving (the rest of its class
                        // moved): its entry and those of the nets inside it
                        // (whose parent it may be) are rewritten.
                        let inside = self.prefixes.inside(&[net]);
                        b.nets.extend(inside);
                        b.nets.sort_unstable();
                        b.nets.dedup();
                    }
                }
                Member::Ip(ip) => {
                    if let Some(slot) = self.ips.get_mut(&ip) {
                        slot.identity = identity;
                    }
                    if b.ips.binary_search(&ip).is_err() {
                        b.ips.push(ip);
                        more_ips = true;
                    }
                }
                Member::Pod(_) => unreachable!("address identities hold addresses"),
            }
        }
        if more_ips {
            b.ips.sort_unstable();
            b.ips.dedup();
        }
    }

    /// Keeps `atom_identities` and the identity table in step with the
    /// classes that changed.
    pub(super) fn index_identities(&mut self, b: &Batch) {
        for (&id, old) in &b.identity_changes {
            if let Some(old) = old {
                for atom in key_atoms(old) {
                    if let Some(ids) = self.atom_identities.get_mut(&atom) {
                        ids.remove(&id);
                        if ids.is_empty() {
                            self.atom_identities.remove(&atom);
                        }
                    }
                }
            }
            match self.identities.key(id) {
                Some(new) => {
                    for atom in key_atoms(new) {
                        self.atom_identities.entry(atom).or_default().insert(id);
                    }
                    let address = new.address;
                    self.out.identities.entry(id).or_default().address = address;
                }
                None => {
                    self.out.identities.remove(&id);
                }
            }
        }
    }

    /// Writes the peer entries that may have changed: pod IPs, nets (when
    /// blocks changed) and the node's addresses; keeps the identity table
    /// and the local IPs up to date.
    pub(super) fn write_peers(&mut self, b: &mut Batch) {
        // Prefixes (and node addresses) whose entry is recomputed at the end.
        let mut touched: Vec<IpNet> = Vec::new();
        for &ip in &b.ips {
            let Some(slot) = self.ips.get(&ip) else {
                continue;
            };
            let written = slot.claimants.first().map(|&o| {
                (
                    o,
                    self.pod_entry(o, slot.identity),
                    self.locals.contains_key(&o),
                )
            });
            let old = slot.written;
            if written == old {
                continue;
            }
            if let Some((_, entry, _)) = old
                && let Some(info) = self.out.identities.get_mut(&entry.identity)
            {
                info.pod_ips -= 1;
            }
            if let Some((_, entry, _)) = written {
                self.out
                    .identities
                    .entry(entry.identity)
                    .or_default()
                    .pod_ips += 1;
            }
            let owner = |w: Option<(u32, PeerValue, bool)>| w.map(|(o, _, local)| (o, local));
            if owner(written) != owner(old) {
                match written {
                    Some((o, _, true)) => {
                        let pref = self.pods.slot(o).pod.pod_ref();
                        self.out.local_ips.insert(ip, pref);
                    }
                    _ => {
                        self.out.local_ips.remove(&ip);
                    }
                }
            }
            self.ips.get_mut(&ip).expect("slot").written = written;
            match written {
                // A pod IP's entry, unless it is a node address (flagged,
                // written below).
                Some((_, entry, _)) if !self.node.addresses.contains(&ip) => {
                    let net = IpNet::from(ip);
                    self.journal.set_peer(&mut self.out.maps, net, Some(entry));
                }
                _ => touched.push(IpNet::from(ip)),
            }
        }
        if !b.nets.is_empty() {
            for &net in &b.nets {
                let n = &self.prefixes.nets[&net];
                let written = (n.refs > 0
                    && self
                        .prefixes
                        .parent(&net)
                        .is_none_or(|p| self.prefixes.nets[&p].identity != n.identity))
                .then_some(n.identity);
                let old = n.written;
                if written == old {
                    continue;
                }
                if let Some(id) = old
                    && let Some(info) = self.out.identities.get_mut(&id)
                {
                    info.prefixes.remove(&net);
                }
                if let Some(id) = written {
                    self.out
                        .identities
                        .entry(id)
                        .or_default()
                        .prefixes
                        .insert(net);
                }
                self.prefixes.nets.get_mut(&net).expect("net").written = written;
                touched.push(net);
            }
            self.prefixes.drop_unused();
        }
        // The node's addresses: always recomputed (there are a few).
        for (ip, id) in std::mem::take(&mut self.node_entries) {
            if let Some(info) = self.out.identities.get_mut(&id) {
                info.node_addresses.remove(&ip);
            }
            touched.push(IpNet::from(ip));
        }
        for ip in self.node.addresses.clone() {
            let value = self.unflagged_peer(ip);
            self.out
                .identities
                .entry(value.identity)
                .or_default()
                .node_addresses
                .insert(ip);
            self.node_entries.push((ip, value.identity));
            touched.push(IpNet::from(ip));
        }
        touched.sort_unstable();
        touched.dedup();
        for net in touched {
            let value = self.peer_value(&net);
            self.journal.set_peer(&mut self.out.maps, net, value);
        }
        for ip in &b.ips {
            if self.ips.get(ip).is_some_and(|s| s.claimants.is_empty()) {
                self.ips.remove(ip);
                self.ip_order.remove(ip);
            }
        }
    }

    /// The peer entry of an address owned by pod `owner`, whose address
    /// identity is `address`.
    fn pod_entry(&self, owner: u32, address: u32) -> PeerValue {
        match self.pods.slot(owner).identity {
            0 => PeerValue::new(address, PEER_F_POD),
            pod => PeerValue::new(pod, PEER_F_POD).with_cidr_identity(address),
        }
    }

    /// The identities an address gets, before flags: its pod entry if a pod
    /// owns it, else the identity of its class.
    fn unflagged_peer(&self, ip: IpAddr) -> PeerValue {
        match self
            .ips
            .get(&ip)
            .and_then(|s| Some((s.claimants.first()?, s)))
        {
            Some((&owner, slot)) => self.pod_entry(owner, slot.identity),
            None => {
                let net = self.prefixes.class_net(ip);
                PeerValue::new(self.prefixes.nets[&net].identity, 0)
            }
        }
    }

    /// What the peer map holds at `net`: a node address (flagged), else a
    /// pod IP, else a written prefix.
    fn peer_value(&self, net: &IpNet) -> Option<PeerValue> {
        if net.prefix_len() == net.max_prefix_len() {
            let ip = net.addr();
            if self.node.addresses.contains(&ip) {
                let v = self.unflagged_peer(ip);
                return Some(PeerValue {
                    flags: PEER_F_HOST,
                    ..v
                });
            }
            if let Some(slot) = self.ips.get(&ip)
                && let Some(&owner) = slot.claimants.first()
            {
                return Some(self.pod_entry(owner, slot.identity));
            }
        }
        let n = self.prefixes.nets.get(net)?;
        n.written.map(|id| PeerValue::new(id, 0))
    }

    /// The pods whose IPs have `identity` in their peer entry's `identity`
    /// (what [`super::IdentityInfo::pod_ips`] counts), sorted. Scans every
    /// address: for explaining, not for hot paths.
    pub fn pods_with_identity(&self, identity: u32) -> Vec<PodRef> {
        let mut pods: Vec<PodRef> = self
            .ips
            .values()
            .filter_map(|s| s.written.filter(|w| w.1.identity == identity))
            .map(|(owner, _, _)| self.pods.slot(owner).pod.pod_ref())
            .collect();
        pods.sort();
        pods.dedup();
        pods
    }
}

/// Every atom a key holds (named-port atoms included).
pub(super) fn key_atoms(key: &IdentityKey) -> impl Iterator<Item = u32> + '_ {
    key.atoms
        .iter()
        .copied()
        .chain(key.named.iter().map(|(a, _)| *a))
}
