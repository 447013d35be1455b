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
//! # A packet judged by two programs
//!
//! A packet between two pods of one node is judged by the sender's veth
//! (its egress) and then by the receiver's (its ingress), two runs that may
//! read different epochs: a flip can fall between them, and even two flips
//! and the rewrite of the epoch the sender's run read (the packet may wait
//! in a neighbour queue, outside any RCU read-side section, so no grace
//! period covers it). The receiver never trusts the sender's verdict across
//! that gap: for every new flow into a pod from a local pod, and for every
//! re-check of such a flow, the receiver's run judges the sender's egress
//! again, in its own epoch, besides the receiver's ingress
//! (`sender_denies`/`sender_revoked` in `netpol-ebpf/src/conntrack.rs`,
//! the same check that judges a Service's local backend after the DNAT). A
//! flow entry on the receiver's veth records the generation both were
//! judged in. So, for a packet whose sender's run read state `S` and whose
//! receiver's run read `T`:
//!
//! * delivered means the sender's veth passed it under `S` and the
//!   receiver's run found both the egress and the ingress allowed under `T`:
//!   `T` delivers it;
//! * dropped means `S` denied the egress (the sender's veth dropped it), or
//!   `T` denied the egress or the ingress: `S` or `T` drops it.
//!
//! The receiver finds the sender by the tag its veth wrote (`tc_index`) or
//! by the source address (`NETPOL_LOCAL_ADDRS`), and believes either only if
//! the sender's endpoint *in the receiver's epoch* carries the packet's
//! source address (or, for the tag, the source is the node's own: a
//! masquerade). A local address whose veth has no endpoint carrying it in
//! that epoch is dropped (`no_endpoint`, counted on the sender's egress):
//! under `T` that veth's own program drops the packet (no endpoint, or
//! spoofed), or, if the address belongs to another veth in `T`, the map
//! names its veth in the other state, where the real sender's program drops
//! it (see below). Before this rule, a sender missing from `T` was trusted
//! on its verdict under `S`, and `(S: egress allowed, ingress denied) ->
//! (T: sender deleted, ingress allowed)` was delivered, which neither state
//! does (`tests/datapath_epoch_paths.rs`).
//!
//! # Maps outside the epochs
//!
//! Three maps are written in place, not per epoch. Each is written so that
//! every intermediate state still gives the old state's or the new one's
//! verdict:
//!
//! * `NETPOL_LOCAL_ADDRS` (address -> veth). After a flip, the next sync
//!   first waits for the grace period, so a run reads one of two states:
//!   the enforced one and the one being written. The map is written so that
//!   every address either state gives to a veth is present, naming that
//!   veth or the address's veth in the other state
//!   ([`local_addr_writes`] before the epoch writes, [`stale_local_addrs`]
//!   after, which removes only addresses neither epoch holds). A run in
//!   state `T` that finds the address's veth `v` believes it only if `v`'s
//!   endpoint in `T` carries the address: then it judges exactly as `T`.
//!   Otherwise it drops, and some state drops too: if `T` gives the address
//!   to nobody, `T` drops whatever sends from it; if `T` gives it to `w`,
//!   the other state gives it to `v`, not `w`, and drops what `w` sends,
//!   while `T` drops what `v` sends. This holds for pods added, deleted
//!   and re-addressed alike;
//!   `tests::local_addresses_name_a_veth_of_the_old_or_the_new_state_at_every_write`
//!   applies these writes one at a time over random pod changes with
//!   failed writes, and catches the previous rule.
//! * `NETPOL_SLOTS` (tag slot -> veth). A slot is never handed to another
//!   veth while an endpoint of either epoch carries it, and a tag is
//!   believed only as above, so a stale tag falls back to the address.
//! * The deferred ranges (`NETPOL_DEFER_*`): they decide only *where* a
//!   pod's egress is judged (on its veth, or after the DNAT against the
//!   backend), never by which policy. New ranges go in before the epoch
//!   writes, gone ones after, each followed by a new generation that
//!   re-checks established flows. A deferred new flow is judged once, after
//!   the DNAT, in the epoch of that run: one state's verdict. An address
//!   that no DNAT translates gets the same verdict after the DNAT as on the
//!   veth (the same destination, port and policy), so a range written
//!   early or removed late changes no verdict for it.
//!
//! Node changes (a node's addresses, the host flag that defers NodePorts
//! and lets kubelet probes in) are peer entries, inside the epochs; they
//! change none of these three maps.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use netpol_common::{
    EndpointValue, PeerValue, PolicyKey, PolicyValue, epoch_policy_id, flip_generation,
    generation_epoch, id_epoch,
};

use crate::maps::{MapUpdate, Maps};

/// A CONFIG generation's count, without the epoch in its top bit: the
/// number status and metrics show (the epoch is shown apart).
pub const fn generation_count(generation: u32) -> u32 {
    generation & !netpol_common::EPOCH_BIT
}

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
    /// Per epoch, the peer and policy keys whose entry there may differ
    /// from the desired state (see [`Epochs::plan`]).
    stale: [Stale; 2],
}

/// The peer and policy keys of one epoch that may differ from the desired
/// state: every key a change touched since that epoch last matched it, and
/// every key whose write into it failed. `all`: the epoch was read from the
/// kernel (start, reconcile) and any key may differ.
#[derive(Clone, Debug, Default)]
struct Stale {
    all: bool,
    peers_v4: BTreeSet<(Ipv4Addr, u8)>,
    peers_v6: BTreeSet<(Ipv6Addr, u8)>,
    policy: BTreeSet<(PolicyKey, u32)>,
}

impl Stale {
    fn everything() -> Self {
        Self {
            all: true,
            ..Self::default()
        }
    }

    fn is_empty(&self) -> bool {
        !self.all && self.peers_v4.is_empty() && self.peers_v6.is_empty() && self.policy.is_empty()
    }

    fn len(&self) -> usize {
        self.peers_v4.len() + self.peers_v6.len() + self.policy.len()
    }
}

/// The desired state by reference: the compiler's peer and policy maps as
/// they are (never copied), with the node's endpoints (keyed by veth).
#[derive(Debug)]
pub struct Desired<'a, K> {
    pub endpoints: &'a BTreeMap<K, EndpointValue>,
    pub peers_v4: &'a BTreeMap<(Ipv4Addr, u8), PeerValue>,
    pub peers_v6: &'a BTreeMap<(Ipv6Addr, u8), PeerValue>,
    pub policy: &'a BTreeMap<(PolicyKey, u32), PolicyValue>,
}

impl<K> Clone for Desired<'_, K> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<K> Copy for Desired<'_, K> {}

impl<'a, K> Desired<'a, K> {
    /// The compiled peer and policy entries (its endpoints, keyed by pod,
    /// are not these: the agent keys them by veth) with `endpoints`.
    pub fn new(maps: &'a Maps, endpoints: &'a BTreeMap<K, EndpointValue>) -> Self {
        Self {
            endpoints,
            peers_v4: &maps.peers_v4,
            peers_v6: &maps.peers_v6,
            policy: &maps.policy,
        }
    }
}

impl<'a, K> From<&'a State<K>> for Desired<'a, K> {
    fn from(s: &'a State<K>) -> Self {
        Self {
            endpoints: &s.endpoints,
            peers_v4: &s.peers_v4,
            peers_v6: &s.peers_v6,
            policy: &s.policy,
        }
    }
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
            stale: [Stale::everything(), Stale::everything()],
        }
    }

    /// CONFIG's generation as written: the count with the active epoch in
    /// its top bit.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// The generation's count, without the epoch bit (what people read:
    /// status, metrics).
    pub fn generation_count(&self) -> u32 {
        generation_count(self.generation)
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
        self.compare_all();
        n
    }

    /// The next plan compares every entry of both epochs with the desired
    /// state, not only the noted ones (what a read-back needs; a benchmark
    /// of the agent's path before `note` uses it too).
    pub fn compare_all(&mut self) {
        self.stale = [Stale::everything(), Stale::everything()];
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

    /// The compiler changed these entries (its [`Diff`](crate::maps::Diff)'s
    /// updates): both epochs may now differ from the desired state there.
    /// Endpoint updates are ignored (endpoints are keyed by veth and
    /// compared whole, they are few).
    pub fn note(&mut self, updates: &[MapUpdate]) {
        for stale in &mut self.stale {
            if stale.all {
                continue;
            }
            for u in updates {
                match u {
                    MapUpdate::Endpoint { .. } => {}
                    MapUpdate::PeerV4 {
                        addr, prefix_len, ..
                    } => {
                        stale.peers_v4.insert((*addr, *prefix_len));
                    }
                    MapUpdate::PeerV6 {
                        addr, prefix_len, ..
                    } => {
                        stale.peers_v6.insert((*addr, *prefix_len));
                    }
                    MapUpdate::Policy {
                        key, prefix_len, ..
                    } => {
                        stale.policy.insert((*key, *prefix_len));
                    }
                }
            }
        }
    }

    /// Keys of epoch `e` that may differ from `desired`: those that do, and
    /// only those. A key whose write failed still differs and stays; after
    /// a read-back (`all`) every key is compared once.
    fn settle(&mut self, e: usize, d: Desired<'_, K>) {
        let held = &self.held[e];
        let stale = &mut self.stale[e];
        if std::mem::take(&mut stale.all) {
            fn differing<K: Ord + Clone, V: PartialEq>(
                a: &BTreeMap<K, V>,
                b: &BTreeMap<K, V>,
            ) -> BTreeSet<K> {
                a.iter()
                    .filter(|(k, v)| b.get(*k) != Some(*v))
                    .map(|(k, _)| k.clone())
                    .chain(b.keys().filter(|k| !a.contains_key(*k)).cloned())
                    .collect()
            }
            stale.peers_v4 = differing(&held.peers_v4, d.peers_v4);
            stale.peers_v6 = differing(&held.peers_v6, d.peers_v6);
            stale.policy = differing(&held.policy, d.policy);
            return;
        }
        stale
            .peers_v4
            .retain(|k| held.peers_v4.get(k) != d.peers_v4.get(k));
        stale
            .peers_v6
            .retain(|k| held.peers_v6.get(k) != d.peers_v6.get(k));
        stale
            .policy
            .retain(|k| held.policy.get(k) != d.policy.get(k));
    }

    /// Peer and policy keys the next plan writes into the inactive epoch
    /// (after [`Epochs::plan`] settled them): for tests and logs.
    pub fn pending(&self) -> usize {
        self.stale[self.inactive() as usize].len()
    }

    /// The writes that bring the datapath to `desired`: the inactive epoch
    /// made equal to it, then a flip. Nothing when the active epoch already
    /// holds it. Inside the inactive epoch the order does not matter (no
    /// packet reads it); deletes go first, so the maps never need room for
    /// more than both states.
    ///
    /// Incremental: the peer and policy entries compared are only those
    /// [`Epochs::note`] was told of since each epoch last matched (the
    /// inactive epoch holds the state before last, so its pending keys are
    /// the previous change's and this one's, coalesced by key), and those
    /// whose write failed; the endpoints (a node's, few) are compared whole.
    /// After [`Epochs::adopt`] or [`Epochs::reread`] every key is compared
    /// once. `desired`'s peers and policy must be what the noted updates
    /// led to (the compiler's maps).
    pub fn plan<'a>(&mut self, desired: impl Into<Desired<'a, K>>) -> Vec<Write<K>>
    where
        K: 'a,
    {
        let d = desired.into();
        let (a, e) = (self.active(), self.inactive());
        self.settle(a as usize, d);
        self.settle(e as usize, d);
        if self.stale[a as usize].is_empty() && self.current().endpoints == *d.endpoints {
            return Vec::new();
        }
        let held = self.held(e);
        let stale = &self.stale[e as usize];
        let mut deletes = Vec::new();
        let mut upserts = Vec::new();
        let mut put = |w: Write<K>, delete: bool| {
            if delete {
                deletes.push(w)
            } else {
                upserts.push(w)
            }
        };
        for k in held.endpoints.keys() {
            if !d.endpoints.contains_key(k) {
                put(
                    Write::Endpoint {
                        epoch: e,
                        key: k.clone(),
                        value: None,
                    },
                    true,
                );
            }
        }
        for (k, v) in d.endpoints {
            if held.endpoints.get(k) != Some(v) {
                put(
                    Write::Endpoint {
                        epoch: e,
                        key: k.clone(),
                        value: Some(EndpointValue {
                            policy_id: epoch_policy_id(v.policy_id, e),
                            ..*v
                        }),
                    },
                    false,
                );
            }
        }
        for &(addr, prefix_len) in &stale.peers_v4 {
            let value = d.peers_v4.get(&(addr, prefix_len)).copied();
            put(
                Write::PeerV4 {
                    epoch: e,
                    addr,
                    prefix_len,
                    value,
                },
                value.is_none(),
            );
        }
        for &(addr, prefix_len) in &stale.peers_v6 {
            let value = d.peers_v6.get(&(addr, prefix_len)).copied();
            put(
                Write::PeerV6 {
                    epoch: e,
                    addr,
                    prefix_len,
                    value,
                },
                value.is_none(),
            );
        }
        for &(key, prefix_len) in &stale.policy {
            let value = d.policy.get(&(key, prefix_len)).copied();
            put(
                Write::Policy {
                    key: PolicyKey {
                        policy_id: epoch_policy_id(key.policy_id, e),
                        ..key
                    },
                    prefix_len,
                    value,
                },
                value.is_none(),
            );
        }
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

/// The addresses an endpoint carries (its pod's IPv4 and IPv6).
pub fn endpoint_addrs(ep: &EndpointValue) -> impl Iterator<Item = IpAddr> + use<> {
    let v4 = (ep.flags & netpol_common::EP_F_HAS_V4 != 0).then(|| IpAddr::from(ep.addr_v4));
    let v6 = (ep.flags & netpol_common::EP_F_HAS_V6 != 0).then(|| IpAddr::from(ep.addr_v6));
    v4.into_iter().chain(v6)
}

/// Each address the state's endpoints carry, with its endpoint.
pub fn owners<K: Ord + Clone>(endpoints: &BTreeMap<K, EndpointValue>) -> BTreeMap<IpAddr, K> {
    endpoints
        .iter()
        .flat_map(|(k, ep)| endpoint_addrs(ep).map(move |ip| (ip, k.clone())))
        .collect()
}

/// `NETPOL_LOCAL_ADDRS` (address -> veth) is written in place, outside the
/// epochs. The writes to make before a change's epoch writes: every address
/// of `desired` names its veth there, and every other address of the
/// enforced state `current` names its veth in `current` (a value left by an
/// earlier change that failed is put right). Nothing is removed here.
pub fn local_addr_writes<K: Ord + Clone + PartialEq>(
    map: &BTreeMap<IpAddr, K>,
    current: &BTreeMap<K, EndpointValue>,
    desired: &BTreeMap<K, EndpointValue>,
) -> Vec<(IpAddr, K)> {
    let mut want = owners(current);
    want.extend(owners(desired));
    want.into_iter()
        .filter(|(ip, k)| map.get(ip) != Some(k))
        .collect()
}

/// The addresses to remove from `NETPOL_LOCAL_ADDRS` after a change's epoch
/// writes (and flip): those that neither epoch's endpoints nor `desired`
/// carry. An address leaves the map only once no epoch holds it, so a run
/// that read the epoch before the flip still finds it, and the next change
/// (which waits for a grace period before it rewrites that epoch) is what
/// makes it go.
pub fn stale_local_addrs<K: Ord + Clone>(
    map: &BTreeMap<IpAddr, K>,
    held: [&BTreeMap<K, EndpointValue>; 2],
    desired: &BTreeMap<K, EndpointValue>,
) -> Vec<IpAddr> {
    let keep: BTreeSet<IpAddr> = held
        .into_iter()
        .chain([desired])
        .flat_map(|s| owners(s).into_keys())
        .collect();
    map.keys()
        .filter(|ip| !keep.contains(ip))
        .copied()
        .collect()
}

#[cfg(test)]
mod tests {
    use netpol_common::{DIR_INGRESS, EPOCH_BIT, PROTO_TCP};

    use super::*;

    /// A small random state: veths 1..=3, each maybe present, with one of
    /// four addresses (distinct within the state, as pod IPs are).
    fn random_pods(next: &mut impl FnMut() -> u64) -> State<u32> {
        let mut s = State::default();
        let mut used = BTreeSet::new();
        for veth in 1..=3u32 {
            if next().is_multiple_of(4) {
                continue;
            }
            let ip = IpAddr::from([10, 0, 0, (next() % 4) as u8 + 1]);
            if used.insert(ip) {
                s.endpoints.insert(
                    veth,
                    EndpointValue::new(veth, veth, 0).with_addresses([ip], None),
                );
            }
        }
        s
    }

    /// Where `NETPOL_LOCAL_ADDRS` breaks the rule the datapath relies on:
    /// every address that a state a run may read (`readable`) gives to a
    /// veth is in the map, naming that veth or the address's veth in the
    /// other state of the change (`old`, `new`).
    fn local_addr_violations(
        map: &BTreeMap<IpAddr, u32>,
        readable: &[&State<u32>],
        (old, new): (&State<u32>, &State<u32>),
    ) -> Vec<String> {
        let (o, n) = (owners(&old.endpoints), owners(&new.endpoints));
        let mut out = Vec::new();
        for s in readable {
            for (ip, veth) in owners(&s.endpoints) {
                let ok = map
                    .get(&ip)
                    .is_some_and(|v| *v == veth || o.get(&ip) == Some(v) || n.get(&ip) == Some(v));
                if !ok {
                    out.push(format!(
                        "{ip}: map {:?}, veth {veth}, old {:?}, new {:?}",
                        map.get(&ip),
                        o.get(&ip),
                        n.get(&ip)
                    ));
                }
            }
        }
        out
    }

    /// Random pod changes (adds, deletes, address moves between veths), with
    /// failed epoch writes, applied in the agent's order one write at a
    /// time; after each write, the in-place address map is checked against
    /// the states a run may read: the enforced one, and after the flip the
    /// new one too (the grace period at the start of the next change ends
    /// the old one). `keep_held: false` is the rule before this one (the new
    /// state's addresses only, the rest removed after the flip, nothing put
    /// back after a failed change): the check must catch it.
    fn local_addr_sequences(keep_held: bool) -> Vec<String> {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut broken = Vec::new();
        for seq in 0..300 {
            let mut epochs = Epochs::<u32>::adopt(1, [State::default(), State::default()]);
            let mut map: BTreeMap<IpAddr, u32> = BTreeMap::new();
            for change in 0..8 {
                let desired = random_pods(&mut next);
                // The grace period: only the enforced state is read now.
                epochs.graced();
                let old = epochs.current().clone();
                let mut check =
                    |map: &BTreeMap<IpAddr, u32>, readable: &[&State<u32>], step: &str| {
                        for v in local_addr_violations(map, readable, (&old, &desired)) {
                            broken.push(format!("sequence {seq}, change {change}, {step}: {v}"));
                        }
                    };
                check(&map, &[&old], "before the change");
                let writes = if keep_held {
                    local_addr_writes(&map, &old.endpoints, &desired.endpoints)
                } else {
                    owners(&desired.endpoints)
                        .into_iter()
                        .filter(|(ip, k)| map.get(ip) != Some(k))
                        .collect()
                };
                for (ip, veth) in writes {
                    map.insert(ip, veth);
                    check(&map, &[&old], "address written");
                }
                // The epoch writes leave this map alone; the flip makes the
                // new state readable.
                let plan = epochs.plan(&desired);
                let fail_at = next()
                    .is_multiple_of(4)
                    .then(|| next() as usize % plan.len().max(1));
                let mut i = 0;
                let failed = epochs.execute(plan, |_| {
                    i += 1;
                    if Some(i - 1) == fail_at {
                        Err(())
                    } else {
                        Ok(())
                    }
                });
                let flipped = epochs.current() == &desired;
                let readable: Vec<&State<u32>> = if flipped && failed.is_empty() {
                    vec![&old, &desired]
                } else {
                    vec![&old]
                };
                check(&map, &readable, "epoch written");
                if keep_held && !flipped {
                    for (ip, veth) in local_addr_writes(&map, &old.endpoints, &old.endpoints) {
                        map.insert(ip, veth);
                        check(&map, &readable, "address put back");
                    }
                }
                let gone = if keep_held {
                    stale_local_addrs(
                        &map,
                        [&epochs.held(0).endpoints, &epochs.held(1).endpoints],
                        &desired.endpoints,
                    )
                } else if flipped {
                    let want = owners(&desired.endpoints);
                    map.keys()
                        .filter(|ip| !want.contains_key(ip))
                        .copied()
                        .collect()
                } else {
                    Vec::new()
                };
                for ip in gone {
                    map.remove(&ip);
                    check(&map, &readable, "address removed");
                }
            }
        }
        broken
    }

    #[test]
    fn local_addresses_name_a_veth_of_the_old_or_the_new_state_at_every_write() {
        let broken = local_addr_sequences(true);
        assert!(broken.is_empty(), "{}", broken.join("\n"));
        // The check can fail: the rule before this one breaks it.
        assert!(
            !local_addr_sequences(false).is_empty(),
            "the previous rule (new state's addresses only) was not caught"
        );
    }

    #[test]
    fn status_shows_the_generation_without_the_epoch_bit_and_the_epoch_apart() {
        // 2147483649 is generation 1 read in epoch 1.
        let e = Epochs::<u32>::adopt(2_147_483_649, [State::default(), State::default()]);
        assert_eq!((e.generation_count(), e.active()), (1, 1));
        let e = Epochs::<u32>::adopt(5, [State::default(), State::default()]);
        assert_eq!((e.generation_count(), e.active()), (5, 0));
        assert_eq!(generation_count(flip_generation(5, 1)), 6);
    }

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

    /// The state `state(p, i)` with one more peer entry per `extra`.
    fn with_peers(mut s: State<u32>, extra: &[(u8, u32)]) -> State<u32> {
        for (last, identity) in extra {
            s.peers_v4.insert(
                (Ipv4Addr::new(10, 0, 0, *last), 32),
                PeerValue::new(*identity, 0),
            );
        }
        s
    }

    /// The updates that turn `a`'s peers into `b`'s (what the compiler's
    /// diff says).
    fn peer_updates(a: &State<u32>, b: &State<u32>) -> Vec<MapUpdate> {
        let keys: BTreeSet<_> = a.peers_v4.keys().chain(b.peers_v4.keys()).collect();
        keys.into_iter()
            .filter(|k| a.peers_v4.get(k) != b.peers_v4.get(k))
            .map(|k| MapUpdate::PeerV4 {
                addr: k.0,
                prefix_len: k.1,
                value: b.peers_v4.get(k).copied(),
            })
            .collect()
    }

    #[test]
    fn a_change_writes_only_what_it_touched_and_a_failed_write_stays_pending() {
        let big: Vec<(u8, u32)> = (10..200).map(|i| (i, 1)).collect();
        let s0 = with_peers(state(1, 1), &big);
        let mut e = Epochs::adopt(0, [s0.clone(), s0.clone()]);
        e.graced();
        // Both epochs hold s0: nothing to do, after one full comparison.
        assert!(e.plan(&s0).is_empty());
        // One peer changes: one write into epoch 1, then the flip.
        let s1 = with_peers(s0.clone(), &[(10, 7)]);
        e.note(&peer_updates(&s0, &s1));
        let plan = e.plan(&s1);
        assert_eq!(plan.len(), 2, "{plan:#?}");
        // Its write fails: no flip; a second change comes before the retry.
        let failed = e.execute(plan, |w| match w {
            Write::PeerV4 { .. } => Err("ENOMEM"),
            _ => Ok(()),
        });
        assert_eq!((failed.len(), e.active()), (1, 0));
        let s2 = with_peers(s1.clone(), &[(11, 8)]);
        e.note(&peer_updates(&s1, &s2));
        let plan = e.plan(&s2);
        let peers: BTreeSet<u8> = plan
            .iter()
            .filter_map(|w| match w {
                Write::PeerV4 { addr, .. } => Some(addr.octets()[3]),
                _ => None,
            })
            .collect();
        assert_eq!(
            peers,
            BTreeSet::from([10, 11]),
            "the failed write and the new one, nothing else: {plan:#?}"
        );
        assert!(e.execute::<()>(plan, |_| Ok(())).is_empty());
        assert_eq!((e.active(), e.current()), (1, &s2));
        // Epoch 0 holds s0: the next change writes there what s1, s2 and it
        // changed, coalesced by key.
        e.graced();
        let s3 = with_peers(s2.clone(), &[(10, 9)]);
        e.note(&peer_updates(&s2, &s3));
        let plan = e.plan(&s3);
        assert_eq!(plan.len(), 3, "peers .10 and .11, then the flip: {plan:#?}");
        assert!(e.execute::<()>(plan, |_| Ok(())).is_empty());
        assert_eq!((e.active(), e.current()), (0, &s3));
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
