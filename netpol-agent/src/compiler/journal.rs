//! Map writes that remember what they replaced, so that a flush can report
//! exactly the updates it made, in the order [`super::diff_maps`] uses.

use std::{
    collections::{BTreeMap, HashMap},
    hash::{BuildHasher, Hash},
    net::{Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;
use netpol_common::{EndpointValue, PeerValue, PolicyKey, PolicyValue};

use super::{Diff, Maps, hash::NumMap};
use crate::maps::Changes;
use crate::model::PodRef;

/// For every key written since the last [`Journal::take_diff`], the value it
/// had before.
#[derive(Debug, Default)]
pub(super) struct Journal {
    endpoints: HashMap<PodRef, Option<EndpointValue>>,
    peers_v4: NumMap<(Ipv4Addr, u8), Option<PeerValue>>,
    peers_v6: NumMap<(Ipv6Addr, u8), Option<PeerValue>>,
    policy: NumMap<(PolicyKey, u32), Option<PolicyValue>>,
}

fn write<K: Ord + Clone + Hash, V: Copy, S: BuildHasher>(
    map: &mut BTreeMap<K, V>,
    journal: &mut HashMap<K, Option<V>, S>,
    key: K,
    value: Option<V>,
) {
    let old = match value {
        Some(v) => map.insert(key.clone(), v),
        None => map.remove(&key),
    };
    journal.entry(key).or_insert(old);
}

impl Journal {
    pub(super) fn set_endpoint(&mut self, maps: &mut Maps, pod: PodRef, v: Option<EndpointValue>) {
        write(&mut maps.endpoints, &mut self.endpoints, pod, v);
    }

    pub(super) fn set_peer(&mut self, maps: &mut Maps, net: IpNet, v: Option<PeerValue>) {
        match net {
            IpNet::V4(n) => write(
                &mut maps.peers_v4,
                &mut self.peers_v4,
                (n.network(), n.prefix_len()),
                v,
            ),
            IpNet::V6(n) => write(
                &mut maps.peers_v6,
                &mut self.peers_v6,
                (n.network(), n.prefix_len()),
                v,
            ),
        }
    }

    pub(super) fn set_policy(
        &mut self,
        maps: &mut Maps,
        key: (PolicyKey, u32),
        v: Option<PolicyValue>,
    ) {
        write(&mut maps.policy, &mut self.policy, key, v);
    }

    /// The updates from the maps before the first write to `maps` now, in a
    /// safe order (see [`Diff::updates`]); starts a new journal.
    pub(super) fn take_diff(&mut self, maps: &Maps) -> Diff {
        let mut revokes = false;
        let (policy_up, policy_del) = changes(&mut self.policy, &maps.policy, &mut revokes);
        let (v4_up, v4_del) = changes(&mut self.peers_v4, &maps.peers_v4, &mut revokes);
        let (v6_up, v6_del) = changes(&mut self.peers_v6, &maps.peers_v6, &mut revokes);
        let (ep_up, ep_del) = changes(&mut self.endpoints, &maps.endpoints, &mut revokes);
        crate::maps::ordered(
            (policy_up, policy_del),
            (v4_up, v4_del),
            (v6_up, v6_del),
            (ep_up, ep_del),
            revokes,
        )
    }
}

/// (upserts, deletes) in key order for the journaled keys; sets `revokes`
/// when an existing key changes or goes.
fn changes<K: Ord + Clone + Hash, V: PartialEq + Copy, S: BuildHasher + Default>(
    journal: &mut HashMap<K, Option<V>, S>,
    map: &BTreeMap<K, V>,
    revokes: &mut bool,
) -> (Changes<K, V>, Changes<K, V>) {
    // Taken whole: a first compile leaves a big table that later batches
    // need not walk or keep.
    let mut touched: Vec<(K, Option<V>)> = std::mem::take(journal).into_iter().collect();
    touched.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let mut up = Vec::new();
    let mut del = Vec::new();
    for (k, old) in touched {
        match (old, map.get(&k)) {
            (Some(o), Some(n)) if o == *n => {}
            (Some(_), Some(n)) => {
                *revokes = true;
                up.push((k, Some(*n)));
            }
            (None, Some(n)) => up.push((k, Some(*n))),
            (Some(_), None) => {
                *revokes = true;
                del.push((k, None));
            }
            (None, None) => {}
        }
    }
    (up, del)
}
