//! The contents of one node's datapath maps ([`Maps`]) and the updates
//! between two of them ([`MapUpdate`], [`Diff`]): what the compiler
//! produces and the agent's planner and loader consume. It lives below both,
//! so the loader and the planner never import the compiler.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
};

use netpol_common::{EndpointValue, PeerValue, PolicyKey, PolicyValue};

use crate::model::PodRef;

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

/// One write to a datapath map. `value: None` deletes the entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapUpdate {
    Endpoint {
        pod: PodRef,
        value: Option<EndpointValue>,
    },
    PeerV4 {
        addr: Ipv4Addr,
        prefix_len: u8,
        value: Option<PeerValue>,
    },
    PeerV6 {
        addr: Ipv6Addr,
        prefix_len: u8,
        value: Option<PeerValue>,
    },
    Policy {
        key: PolicyKey,
        prefix_len: u32,
        value: Option<PolicyValue>,
    },
}

impl MapUpdate {
    /// Whether the update deletes an entry.
    pub fn is_delete(&self) -> bool {
        match self {
            MapUpdate::Endpoint { value, .. } => value.is_none(),
            MapUpdate::PeerV4 { value, .. } | MapUpdate::PeerV6 { value, .. } => value.is_none(),
            MapUpdate::Policy { value, .. } => value.is_none(),
        }
    }
}

/// The updates that turn the maps of one compile into the next.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// In a safe order: new and changed policy entries first, then peers,
    /// then endpoints (so nothing points at an entry that isn't there yet),
    /// then deletions of endpoints, peers and policy entries (so nothing
    /// points at an entry that is already gone).
    pub updates: Vec<MapUpdate>,
    /// Some update removes or changes an existing entry: flows allowed
    /// before may be denied now, so the generation must be bumped. A diff
    /// that only adds entries never revokes.
    pub revokes: bool,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.updates.is_empty()
    }
}

/// The map updates from `old` to `new` (both of the same node).
pub fn diff_maps(old: &Maps, new: &Maps) -> Diff {
    let mut revokes = false;
    let (policy_up, policy_del) = changes(&old.policy, &new.policy, &mut revokes);
    let (v4_up, v4_del) = changes(&old.peers_v4, &new.peers_v4, &mut revokes);
    let (v6_up, v6_del) = changes(&old.peers_v6, &new.peers_v6, &mut revokes);
    let (ep_up, ep_del) = changes(&old.endpoints, &new.endpoints, &mut revokes);

    ordered(
        (policy_up, policy_del),
        (v4_up, v4_del),
        (v6_up, v6_del),
        (ep_up, ep_del),
        revokes,
    )
}

/// One map's (upserts, deletes).
pub(crate) type UpDel<K, V> = (Changes<K, V>, Changes<K, V>);

/// The updates of each map as (upserts, deletes), put in the safe order of
/// [`Diff::updates`]: upserts of policy entries, peers, endpoints, then
/// deletes of endpoints, peers, policy entries. Shared by [`diff_maps`] and
/// the compiler's journal.
pub(crate) fn ordered(
    policy: UpDel<(PolicyKey, u32), PolicyValue>,
    v4: UpDel<(Ipv4Addr, u8), PeerValue>,
    v6: UpDel<(Ipv6Addr, u8), PeerValue>,
    ep: UpDel<PodRef, EndpointValue>,
    revokes: bool,
) -> Diff {
    let p = |((key, prefix_len), value)| MapUpdate::Policy {
        key,
        prefix_len,
        value,
    };
    let a4 = |((addr, prefix_len), value)| MapUpdate::PeerV4 {
        addr,
        prefix_len,
        value,
    };
    let a6 = |((addr, prefix_len), value)| MapUpdate::PeerV6 {
        addr,
        prefix_len,
        value,
    };
    let e = |(pod, value)| MapUpdate::Endpoint { pod, value };
    let mut updates = Vec::new();
    updates.extend(policy.0.into_iter().map(p));
    updates.extend(v4.0.into_iter().map(a4));
    updates.extend(v6.0.into_iter().map(a6));
    updates.extend(ep.0.into_iter().map(e));
    updates.extend(ep.1.into_iter().map(e));
    updates.extend(v4.1.into_iter().map(a4));
    updates.extend(v6.1.into_iter().map(a6));
    updates.extend(policy.1.into_iter().map(p));
    Diff { updates, revokes }
}

pub(crate) type Changes<K, V> = Vec<(K, Option<V>)>;

/// (upserts, deletes) between two maps; sets `revokes` when an existing key
/// changes or goes.
fn changes<K: Ord + Clone, V: PartialEq + Copy>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
    revokes: &mut bool,
) -> (Changes<K, V>, Changes<K, V>) {
    let mut up = Vec::new();
    let mut del = Vec::new();
    for (k, v) in new {
        match old.get(k) {
            Some(o) if o == v => {}
            Some(_) => {
                *revokes = true;
                up.push((k.clone(), Some(*v)));
            }
            None => up.push((k.clone(), Some(*v))),
        }
    }
    for k in old.keys() {
        if !new.contains_key(k) {
            *revokes = true;
            del.push((k.clone(), None));
        }
    }
    (up, del)
}

impl Maps {
    /// Applies updates the way the agent writes them to the kernel maps.
    pub fn apply(&mut self, updates: &[MapUpdate]) {
        fn set<K: Ord, V>(map: &mut BTreeMap<K, V>, key: K, value: Option<V>) {
            match value {
                Some(v) => {
                    map.insert(key, v);
                }
                None => {
                    map.remove(&key);
                }
            }
        }
        for u in updates.iter().cloned() {
            match u {
                MapUpdate::Endpoint { pod, value } => set(&mut self.endpoints, pod, value),
                MapUpdate::PeerV4 {
                    addr,
                    prefix_len,
                    value,
                } => set(&mut self.peers_v4, (addr, prefix_len), value),
                MapUpdate::PeerV6 {
                    addr,
                    prefix_len,
                    value,
                } => set(&mut self.peers_v6, (addr, prefix_len), value),
                MapUpdate::Policy {
                    key,
                    prefix_len,
                    value,
                } => set(&mut self.policy, (key, prefix_len), value),
            }
        }
    }
}
