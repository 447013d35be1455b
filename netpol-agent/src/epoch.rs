//! How a new policy state reaches the kernel maps so that every packet is
//! judged by the old state or the new one, never by a mix (issue 13).
//!
//! # The problem
//!
//! A change is many map writes (peer identities, policy entries, endpoints'
//! policy sets), and the kernel applies them one at a time. Written in
//! place, the states in between mix old and new entries: a peer moved to a
//! new identity before the policy entries keyed on it exist is denied
//! traffic both states allow, and a policy set id reused with a new meaning
//! can allow what neither state allows. A restarted agent numbers ids from
//! scratch, so its diff against the pinned maps mixes two numberings.
//!
//! # The design: two epochs and one flip
//!
//! The maps hold two complete states, epoch 0 and epoch 1 (see
//! `netpol_common`'s "Epochs": endpoint keys and policy set ids carry the
//! epoch bit, each epoch has its own peer tries). The top bit of
//! `ConfigValue::generation` says which epoch the datapath reads. A change:
//!
//! 1. waits, if the inactive epoch was active since the last wait, for every
//!    program run that may still read it to finish ([`Epochs::needs_grace`]);
//! 2. writes the whole new state into the inactive epoch, as a diff against
//!    what that epoch holds (so updates stay incremental: the inactive epoch
//!    holds the state before last, usually close to the new one);
//! 3. if every write succeeded, flips: one write of the generation, with the
//!    other epoch bit and a new count (established flows are re-checked under
//!    the new state on their next packet). If a write failed, there is no
//!    flip: the old state keeps being enforced whole, and the next sync
//!    writes what is missing (a write counts only once it succeeded).
//!
//! # Why every verdict is the old state's or the new one's
//!
//! * Each program run reads CONFIG once and makes every lookup of that
//!   packet (endpoint, peers, policy) in the epoch it read. While the agent
//!   writes, the active epoch does not change, so every run reads the old
//!   state whole; after the flip, every run that read the new generation
//!   reads the new state whole (it was complete before the flip).
//! * The epoch and the generation are one aligned u32: no run can see the
//!   new epoch with the old generation, or the reverse. Even a byte-wise copy
//!   of the CONFIG value by the kernel cannot hurt: a run that read a value
//!   other than the final one caches its flow under a generation that is not
//!   current, so the flow's next packet is decided again; one that read the
//!   final value has the final epoch bit.
//! * A run that read the old epoch just before the flip may still be making
//!   its lookups after it. Those entries are not rewritten until the next
//!   change, and before that change writes into the (then inactive) old
//!   epoch, the agent waits for a grace period: TC and sk_lookup programs run
//!   inside an RCU read-side critical section (with bottom halves or
//!   preemption disabled), so once `synchronize_rcu()` returns no run that
//!   started before it is still running. The agent asks the kernel for one
//!   with `membarrier(MEMBARRIER_CMD_GLOBAL)`, which is `synchronize_rcu()`
//!   (see `Datapath::grace_period`).
//! * A restarted agent reads the active epoch from the pinned CONFIG and
//!   works in the other one: its new numbering never meets the old one in
//!   the epoch the datapath reads.
//!
//! What this does not cover: maps outside the epochs (`NETPOL_LOCAL_ADDRS`,
//! `NETPOL_SLOTS`, the deferred ranges) are written in place, in an order
//! that fails closed; and a packet judged by two programs (the sender's
//! veth, then a local receiver's) can meet a flip between them.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
};

use netpol_common::{
    EndpointValue, PeerValue, PolicyKey, PolicyValue, epoch_policy_id, flip_generation,
    generation_epoch, id_epoch,
};

use crate::compiler::Maps;

/// One policy state as one epoch holds it, untagged (the compiler's ids).
/// `K` keys endpoints: the veth's ifindex in the agent, the pod in tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct State<K> {
    pub endpoints: BTreeMap<K, EndpointValue>,
    pub peers_v4: BTreeMap<(Ipv4Addr, u8), PeerValue>,
    pub peers_v6: BTreeMap<(Ipv6Addr, u8), PeerValue>,
    pub policy: BTreeMap<(PolicyKey, u32), PolicyValue>,
}

impl<K> Default for State<K> {
    fn default() -> Self {
        Self {
            endpoints: BTreeMap::new(),
            peers_v4: BTreeMap::new(),
            peers_v6: BTreeMap::new(),
            policy: BTreeMap::new(),
        }
    }
}

impl<K: Ord + Clone> State<K> {
    /// The compiled peer and policy entries with these endpoints.
    pub fn new(maps: &Maps, endpoints: BTreeMap<K, EndpointValue>) -> Self {
        Self {
            endpoints,
            peers_v4: maps.peers_v4.clone(),
            peers_v6: maps.peers_v6.clone(),
            policy: maps.policy.clone(),
        }
    }

    /// Entries over both epochs' maps.
    pub fn len(&self) -> usize {
        self.endpoints.len() + self.peers_v4.len() + self.peers_v6.len() + self.policy.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl State<crate::model::PodRef> {
    /// A compile's maps as one state (endpoints keyed by pod).
    pub fn from_maps(maps: &Maps) -> Self {
        Self::new(maps, maps.endpoints.clone())
    }
}

/// Splits what the kernel maps hold into the two epochs' states, untagged:
/// endpoint keys and policy ids by their epoch bit, peers by trie.
pub fn split<K: Ord + Clone>(
    endpoints: impl IntoIterator<Item = ((K, u32), EndpointValue)>,
    peers_v4: [BTreeMap<(Ipv4Addr, u8), PeerValue>; 2],
    peers_v6: [BTreeMap<(Ipv6Addr, u8), PeerValue>; 2],
    policy: impl IntoIterator<Item = ((PolicyKey, u32), PolicyValue)>,
) -> [State<K>; 2] {
    let [v4_0, v4_1] = peers_v4;
    let [v6_0, v6_1] = peers_v6;
    let mut out = [
        State {
            peers_v4: v4_0,
            peers_v6: v6_0,
            ..State::default()
        },
        State {
            peers_v4: v4_1,
            peers_v6: v6_1,
            ..State::default()
        },
    ];
    for ((key, epoch), mut v) in endpoints {
        v.policy_id = epoch_policy_id(v.policy_id, 0);
        out[(epoch & 1) as usize].endpoints.insert(key, v);
    }
    for ((mut k, len), v) in policy {
        let epoch = id_epoch(k.policy_id) as usize;
        k.policy_id = epoch_policy_id(k.policy_id, 0);
        out[epoch].policy.insert((k, len), v);
    }
    out
}

/// One kernel write, already in its epoch's form (tagged policy set ids).
/// `value: None` deletes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write<K> {
    Endpoint {
        epoch: u32,
        key: K,
        value: Option<EndpointValue>,
    },
    PeerV4 {
        epoch: u32,
        addr: Ipv4Addr,
        prefix_len: u8,
        value: Option<PeerValue>,
    },
    PeerV6 {
        epoch: u32,
        addr: Ipv6Addr,
        prefix_len: u8,
        value: Option<PeerValue>,
    },
    Policy {
        key: PolicyKey,
        prefix_len: u32,
        value: Option<PolicyValue>,
    },
    /// Write `ConfigValue::generation`: the datapath reads the other epoch.
    Flip { generation: u32 },
}

/// What the kernel's epoch maps hold, as far as this agent knows from the
/// writes that succeeded (and from reading the maps at start and on
/// reconcile).
#[derive(Clone, Debug)]
pub struct Epochs<K> {
    generation: u32,
    held: [State<K>; 2],
    /// The active epoch changed (or may have: a previous agent) since the
    /// last grace period: runs may still read the inactive epoch.
    grace_pending: bool,
}

/// A failed write, with what it was.
#[derive(Debug)]
pub struct Failed<K, E> {
    pub write: Write<K>,
    pub error: E,
}

impl<K: Ord + Clone> Epochs<K> {
    /// Adopts what the maps hold: the generation from CONFIG and both
    /// epochs' contents ([`split`]). A previous agent may have flipped just
    /// before it died: the first write waits for a grace period.
    pub fn adopt(generation: u32, held: [State<K>; 2]) -> Self {
        Self {
            generation,
            held,
            grace_pending: true,
        }
    }

    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// The epoch the datapath reads.
    pub fn active(&self) -> u32 {
        generation_epoch(self.generation)
    }

    pub fn inactive(&self) -> u32 {
        self.active() ^ 1
    }

    /// What an epoch holds (untagged).
    pub fn held(&self, epoch: u32) -> &State<K> {
        &self.held[(epoch & 1) as usize]
    }

    /// The state the datapath enforces.
    pub fn current(&self) -> &State<K> {
        self.held(self.active())
    }

    /// Replaces what an epoch is believed to hold (reconcile: read back from
    /// the kernel); returns how many entries differed.
    pub fn reread(&mut self, held: [State<K>; 2]) -> usize {
        let n = (0..2)
            .map(|e| count_differences(&self.held[e], &held[e]))
            .sum();
        self.held = held;
        n
    }

    /// CONFIG's generation in the kernel is not the one this agent wrote
    /// (changed by hand): believe its epoch bit (that is the state packets
    /// read now), keep the larger count (so the next flip is a generation no
    /// flow was ever cached under), and wait for a grace period before
    /// writing the other epoch, which packets may just have been reading.
    pub fn config_drifted(&mut self, kernel_generation: u32) {
        let count = (kernel_generation & !netpol_common::EPOCH_BIT)
            .max(self.generation & !netpol_common::EPOCH_BIT);
        self.generation = count | (kernel_generation & netpol_common::EPOCH_BIT);
        self.grace_pending = true;
    }

    /// Whether a grace period must pass before the inactive epoch is written.
    pub fn needs_grace(&self) -> bool {
        self.grace_pending
    }

    /// A grace period passed: no run reads the inactive epoch any more.
    pub fn graced(&mut self) {
        self.grace_pending = false;
    }

    /// The writes that bring the datapath to `desired`: the inactive epoch
    /// made equal to it, then a flip. Nothing when the active epoch already
    /// holds it. Inside the inactive epoch the order does not matter (no
    /// packet reads it); deletes go first, so the maps never need room for
    /// more than both states.
    pub fn plan(&self, desired: &State<K>) -> Vec<Write<K>> {
        if self.current() == desired {
            return Vec::new();
        }
        let e = self.inactive();
        let held = self.held(e);
        let mut deletes = Vec::new();
        let mut upserts = Vec::new();
        let endpoint = |key: K, value: Option<EndpointValue>| Write::Endpoint {
            epoch: e,
            key,
            value: value.map(|v| EndpointValue {
                policy_id: epoch_policy_id(v.policy_id, e),
                ..v
            }),
        };
        let peer4 = |(addr, prefix_len): (Ipv4Addr, u8), value| Write::PeerV4 {
            epoch: e,
            addr,
            prefix_len,
            value,
        };
        let peer6 = |(addr, prefix_len): (Ipv6Addr, u8), value| Write::PeerV6 {
            epoch: e,
            addr,
            prefix_len,
            value,
        };
        let policy = |(key, prefix_len): (PolicyKey, u32), value| Write::Policy {
            key: PolicyKey {
                policy_id: epoch_policy_id(key.policy_id, e),
                ..key
            },
            prefix_len,
            value,
        };
        diff_into(
            &held.endpoints,
            &desired.endpoints,
            endpoint,
            &mut deletes,
            &mut upserts,
        );
        diff_into(
            &held.peers_v4,
            &desired.peers_v4,
            peer4,
            &mut deletes,
            &mut upserts,
        );
        diff_into(
            &held.peers_v6,
            &desired.peers_v6,
            peer6,
            &mut deletes,
            &mut upserts,
        );
        diff_into(
            &held.policy,
            &desired.policy,
            policy,
            &mut deletes,
            &mut upserts,
        );
        let mut out = deletes;
        out.append(&mut upserts);
        out.push(Write::Flip {
            generation: flip_generation(self.generation, e),
        });
        out
    }

    /// Runs a plan through `write` (the kernel, or a test's model of it):
    /// every write counts only once it succeeded; the flip happens only when
    /// every write before it succeeded. Returns the failures (the flip among
    /// them if it failed), for the caller to report; the next plan retries.
    pub fn execute<E>(
        &mut self,
        plan: Vec<Write<K>>,
        mut write: impl FnMut(&Write<K>) -> Result<(), E>,
    ) -> Vec<Failed<K, E>> {
        let mut failed = Vec::new();
        for w in plan {
            if matches!(w, Write::Flip { .. }) && !failed.is_empty() {
                // The new state is incomplete: keep enforcing the old one.
                break;
            }
            assert!(
                !self.grace_pending || matches!(w, Write::Flip { .. }),
                "the inactive epoch is written before a grace period passed"
            );
            match write(&w) {
                Ok(()) => self.wrote(&w),
                Err(error) => failed.push(Failed { write: w, error }),
            }
        }
        failed
    }

    /// Records a write that succeeded.
    fn wrote(&mut self, w: &Write<K>) {
        fn set<K: Ord, V>(map: &mut BTreeMap<K, V>, key: K, value: Option<V>) {
            match value {
                Some(v) => map.insert(key, v),
                None => map.remove(&key),
            };
        }
        match w.clone() {
            Write::Endpoint { epoch, key, value } => {
                let value = value.map(|v| EndpointValue {
                    policy_id: epoch_policy_id(v.policy_id, 0),
                    ..v
                });
                set(&mut self.held[(epoch & 1) as usize].endpoints, key, value)
            }
            Write::PeerV4 {
                epoch,
                addr,
                prefix_len,
                value,
            } => set(
                &mut self.held[(epoch & 1) as usize].peers_v4,
                (addr, prefix_len),
                value,
            ),
            Write::PeerV6 {
                epoch,
                addr,
                prefix_len,
                value,
            } => set(
                &mut self.held[(epoch & 1) as usize].peers_v6,
                (addr, prefix_len),
                value,
            ),
            Write::Policy {
                key,
                prefix_len,
                value,
            } => {
                let epoch = id_epoch(key.policy_id) as usize;
                let key = PolicyKey {
                    policy_id: epoch_policy_id(key.policy_id, 0),
                    ..key
                };
                set(&mut self.held[epoch].policy, (key, prefix_len), value)
            }
            Write::Flip { generation } => {
                self.generation = generation;
                self.grace_pending = true;
            }
        }
    }

    /// A new generation in the same epoch (a revocation outside the epoch
    /// maps): returns it, for the caller to write.
    pub fn bumped(&self) -> u32 {
        netpol_common::bump_generation(self.generation)
    }

    /// The bumped generation was written.
    pub fn set_generation(&mut self, generation: u32) {
        assert_eq!(
            generation_epoch(generation),
            self.active(),
            "a bump does not flip"
        );
        self.generation = generation;
    }
}

fn diff_into<K: Ord + Clone, V: PartialEq + Copy, W>(
    held: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
    mk: impl Fn(K, Option<V>) -> W,
    deletes: &mut Vec<W>,
    upserts: &mut Vec<W>,
) {
    for k in held.keys() {
        if !desired.contains_key(k) {
            deletes.push(mk(k.clone(), None));
        }
    }
    for (k, v) in desired {
        if held.get(k) != Some(v) {
            upserts.push(mk(k.clone(), Some(*v)));
        }
    }
}

fn count_differences<K: Ord>(a: &State<K>, b: &State<K>) -> usize {
    fn differ<K: Ord, V: PartialEq>(a: &BTreeMap<K, V>, b: &BTreeMap<K, V>) -> usize {
        a.iter().filter(|(k, v)| b.get(k) != Some(v)).count()
            + b.keys().filter(|k| !a.contains_key(k)).count()
    }
    differ(&a.endpoints, &b.endpoints)
        + differ(&a.peers_v4, &b.peers_v4)
        + differ(&a.peers_v6, &b.peers_v6)
        + differ(&a.policy, &b.policy)
}

#[cfg(test)]
mod tests {
    use netpol_common::{DIR_INGRESS, EPOCH_BIT, PROTO_TCP};

    use super::*;

    fn state(policy_id: u32, identity: u32) -> State<u32> {
        let mut s = State::default();
        s.endpoints.insert(7, EndpointValue::new(policy_id, 1, 1));
        s.peers_v4
            .insert((Ipv4Addr::UNSPECIFIED, 0), PeerValue::new(identity, 0));
        s.policy.insert(
            (
                PolicyKey::new(policy_id, identity, DIR_INGRESS, PROTO_TCP, 80),
                96,
            ),
            PolicyValue::allow(3),
        );
        s
    }

    #[test]
    fn a_change_goes_to_the_inactive_epoch_then_one_flip() {
        let mut e = Epochs::adopt(4, [state(1, 1), State::default()]);
        assert_eq!(e.active(), 0);
        let plan = e.plan(&state(2, 5));
        assert!(
            plan[..plan.len() - 1].iter().all(|w| match w {
                Write::Endpoint { epoch, value, .. } =>
                    *epoch == 1 && value.is_none_or(|v| v.policy_id == 2 | EPOCH_BIT),
                Write::PeerV4 { epoch, .. } | Write::PeerV6 { epoch, .. } => *epoch == 1,
                Write::Policy { key, .. } => key.policy_id == 2 | EPOCH_BIT,
                Write::Flip { .. } => false,
            }),
            "every write but the last is in epoch 1: {plan:#?}"
        );
        assert_eq!(
            plan.last(),
            Some(&Write::Flip {
                generation: 5 | EPOCH_BIT
            })
        );
        e.graced();
        let failed = e.execute::<()>(plan, |_| Ok(()));
        assert!(failed.is_empty());
        assert_eq!((e.active(), e.current()), (1, &state(2, 5)));
        assert_eq!(e.held(0), &state(1, 1), "the old state stays whole");
        assert!(e.needs_grace());
        assert!(e.plan(&state(2, 5)).is_empty(), "nothing to do");
    }

    #[test]
    fn a_failed_write_stops_the_flip_and_is_retried() {
        let mut e = Epochs::adopt(0, [state(1, 1), State::default()]);
        e.graced();
        let plan = e.plan(&state(2, 2));
        let failed = e.execute(plan, |w| match w {
            Write::Policy { .. } => Err("ENOMEM"),
            _ => Ok(()),
        });
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert_eq!(e.active(), 0, "no flip to an incomplete state");
        let retry = e.plan(&state(2, 2));
        assert_eq!(
            retry.len(),
            2,
            "only the failed write, then the flip: {retry:#?}"
        );
        assert!(e.execute::<()>(retry, |_| Ok(())).is_empty());
        assert_eq!(e.current(), &state(2, 2));
    }

    #[test]
    fn a_generation_changed_by_hand_is_repaired_by_writing_the_other_epoch() {
        let mut e = Epochs::adopt(0, [State::default(), State::default()]);
        e.graced();
        let plan = e.plan(&state(2, 2));
        assert!(e.execute::<()>(plan, |_| Ok(())).is_empty());
        assert_eq!(e.generation(), 1 | EPOCH_BIT);
        // Someone writes generation 0 (epoch 0, the stale empty state).
        e.config_drifted(0);
        assert_eq!((e.active(), e.current()), (0, &State::default()));
        assert!(e.needs_grace(), "packets may be reading epoch 1 right now");
        e.graced();
        let plan = e.plan(&state(2, 2));
        assert_eq!(
            plan,
            vec![Write::Flip {
                generation: 2 | EPOCH_BIT
            }],
            "epoch 1 holds the state already; the flip's generation is new"
        );
    }

    #[test]
    #[should_panic(expected = "grace period")]
    fn the_inactive_epoch_is_not_written_before_a_grace_period() {
        let mut e = Epochs::adopt(0, [state(1, 1), State::default()]);
        let plan = e.plan(&state(2, 2));
        e.execute::<()>(plan, |_| Ok(()));
    }

    #[test]
    fn split_reads_tagged_maps_back_into_untagged_states() {
        let mut e = Epochs::adopt(0, [State::default(), State::default()]);
        e.graced();
        let plan = e.plan(&state(2, 2));
        let mut endpoints = Vec::new();
        let mut v4 = [BTreeMap::new(), BTreeMap::new()];
        let mut policy = Vec::new();
        e.execute::<()>(plan, |w| {
            match w {
                Write::Endpoint {
                    epoch,
                    key,
                    value: Some(v),
                } => endpoints.push(((*key, *epoch), *v)),
                Write::PeerV4 {
                    epoch,
                    addr,
                    prefix_len,
                    value: Some(v),
                } => {
                    v4[*epoch as usize].insert((*addr, *prefix_len), *v);
                }
                Write::Policy {
                    key,
                    prefix_len,
                    value: Some(v),
                } => policy.push(((*key, *prefix_len), *v)),
                _ => {}
            }
            Ok(())
        });
        let held = split(endpoints, v4, Default::default(), policy);
        assert_eq!(held[1], state(2, 2));
        assert_eq!(held[0], State::default());
    }
}
