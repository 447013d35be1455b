//! The policy decision for a new (or re-checked) flow: a bounded number of
//! map lookups whatever the number of policies, rules or pods:
//! endpoint flags, one peer lookup, then at most three policy lookups (the
//! peer's identity, its address-only identity, then the "any peer"
//! wildcard). The first policy entry found decides, allow or deny (deny
//! entries exist only for sets a ClusterNetworkPolicy judges).
//!
//! Each lookup asks an exact hash map first and the LPM trie behind it only
//! when the answer may be a shorter prefix (see "Exact maps" in
//! `netpol_common`): pod addresses and single ports, the common case, never
//! walk a trie, whose walk grows with the number of entries, and a policy
//! lookup that misses (a denied flow) walks none unless the policy set has
//! port ranges or port-less rules for that peer.

use aya_ebpf::btf_maps::lpm_trie::Key;
use netpol_common::{
    ACTION_ALLOW, ACTION_AUDIT, DIR_EGRESS, DIR_INGRESS, EP_F_EGRESS_ISOLATED,
    EP_F_INGRESS_ISOLATED, EndpointValue, FAMILY_V4, IDENTITY_ANY, PEER_F_HOST, PEER_F_POD,
    POLICY_PREFIX_FULL, PROTO_SCTP, PROTO_TCP, PROTO_UDP, PeerValue, PolicyKey, PolicyShortKey,
    REASON_AUDIT, REASON_DEFERRED, REASON_HOST, REASON_NOT_ISOLATED, REASON_POLICY_ALLOW,
    REASON_POLICY_DENY, id_epoch,
};

use crate::maps::{
    NETPOL_DEFER_V4, NETPOL_DEFER_V6, NETPOL_EXAC1_V4, NETPOL_EXAC1_V6, NETPOL_EXACT_V4,
    NETPOL_EXACT_V6, NETPOL_PEER1_V4, NETPOL_PEER1_V6, NETPOL_PEERS_V4, NETPOL_PEERS_V6,
    NETPOL_POLEXACT, NETPOL_POLICY, NETPOL_POLSHORT,
};

/// Where a decision is taken.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// On the pod's veth, before the node's netfilter: a pod's egress to an
    /// address kube-proxy may translate is deferred (`REASON_DEFERRED`).
    Veth,
    /// After the DNAT (a local backend's veth, the node's devices, a local
    /// socket): the destination is the real one, nothing is deferred.
    PostNat,
}

/// Identity given to an address that no peer entry covers. The agent always
/// installs /0 entries, so this only happens while maps are being filled;
/// it matches only "any peer" rules, never a selector.
const IDENTITY_UNKNOWN: u32 = u32::MAX;

pub struct Decision {
    pub allow: bool,
    pub reason: u8,
    pub rule_id: u32,
    pub peer_identity: u32,
}

/// The peer entry of an address in `epoch`'s tries (see `netpol_common`'s
/// "Epochs": each epoch has its own); [`IDENTITY_UNKNOWN`] with no flags when
/// no entry covers it.
///
/// A plain value, never an `Option`: LLVM moved the undefined payload of a
/// `None` between the branches, and the verifier refused `netpol_local_in`
/// (`R2 !read_ok`) once the policy lookup below changed shape.
#[inline(always)]
fn peer(epoch: u32, family: u8, addr: &[u8; 16]) -> PeerValue {
    // A full-length entry is the longest match: its exact copy answers
    // for the trie. Only an address without one (outside the pods, an
    // ipBlock's or /0's) walks the trie.
    let exact = if family == FAMILY_V4 {
        let a = [addr[0], addr[1], addr[2], addr[3]];
        if epoch == 0 {
            NETPOL_EXACT_V4.get_ptr(&a)
        } else {
            NETPOL_EXAC1_V4.get_ptr(&a)
        }
    } else if epoch == 0 {
        NETPOL_EXACT_V6.get_ptr(addr)
    } else {
        NETPOL_EXAC1_V6.get_ptr(addr)
    };
    if let Some(v) = exact {
        // SAFETY: a value of the map, read at once; the agent replaces
        // values whole (an update of a hash value is a copy under its
        // bucket lock, and a reader may see the old or the new one).
        let v = unsafe { &*v };
        return PeerValue::new(v.identity, v.flags).with_cidr_identity(v.cidr_identity);
    }
    let found = if family == FAMILY_V4 {
        let key = Key::new(32, [addr[0], addr[1], addr[2], addr[3]]);
        if epoch == 0 {
            NETPOL_PEERS_V4.get(&key)
        } else {
            NETPOL_PEER1_V4.get(&key)
        }
    } else {
        let key = Key::new(128, *addr);
        if epoch == 0 {
            NETPOL_PEERS_V6.get(&key)
        } else {
            NETPOL_PEER1_V6.get(&key)
        }
    };
    match found {
        Some(v) => PeerValue::new(v.identity, v.flags).with_cidr_identity(v.cidr_identity),
        None => PeerValue::new(IDENTITY_UNKNOWN, 0),
    }
}

/// The `PEER_F_*` flags of an address in `epoch` (the epoch of the CONFIG
/// value the packet's run read; 0 when the address has no entry).
#[inline(always)]
pub fn peer_flags(epoch: u32, family: u8, addr: &[u8; 16]) -> u32 {
    peer(epoch, family, addr).flags
}

/// Whether kube-proxy may translate `addr` (a Service frontend).
#[inline(always)]
fn service_frontend(family: u8, addr: &[u8; 16]) -> bool {
    if family == FAMILY_V4 {
        let key = Key::new(32, [addr[0], addr[1], addr[2], addr[3]]);
        NETPOL_DEFER_V4.get(&key).is_some()
    } else {
        let key = Key::new(128, *addr);
        NETPOL_DEFER_V6.get(&key).is_some()
    }
}

/// Decide traffic of `ep` in `direction` (the pod's point of view) with the
/// peer at `peer` (the remote address), on `protocol`/`port`.
///
/// Every lookup is in the epoch of `ep`, which the caller looked up in the
/// epoch its run read from CONFIG: the endpoint's policy set id carries it.
///
/// At `Stage::Veth`, a pod's egress to a Service frontend (the deferred
/// destinations map), or to one of this node's own addresses (a NodePort),
/// over a protocol kube-proxy translates, is not decided here: the address
/// the pod dialled is not where the packet goes. The decision returns
/// `REASON_DEFERRED` and is taken again, at `Stage::PostNat`, against the
/// backend. A pod address is never translated, so pod destinations (the
/// common case) cost no extra lookup.
#[inline(always)]
pub fn decide(
    ep: &EndpointValue,
    direction: u8,
    family: u8,
    peer: &[u8; 16],
    protocol: u8,
    port: u16,
    stage: Stage,
) -> Decision {
    let isolated_flag = if direction == DIR_INGRESS {
        EP_F_INGRESS_ISOLATED
    } else {
        EP_F_EGRESS_ISOLATED
    };
    if ep.flags & isolated_flag == 0 {
        return Decision {
            allow: true,
            reason: REASON_NOT_ISOLATED,
            rule_id: 0,
            peer_identity: 0,
        };
    }

    let v = self::peer(id_epoch(ep.policy_id), family, peer);
    let (identity, cidr_identity, peer_flags) = (v.identity, v.cidr_identity, v.flags);

    // Kubernetes: traffic from the node to its pods (kubelet probes) is
    // always allowed.
    if direction == DIR_INGRESS && peer_flags & PEER_F_HOST != 0 {
        return Decision {
            allow: true,
            reason: REASON_HOST,
            rule_id: 0,
            peer_identity: identity,
        };
    }

    // A node address is deferred for TCP and UDP only: after the DNAT it may
    // be a socket on the node, which `netpol_local_in` (sk_lookup, TCP and
    // UDP only) judges. SCTP to the node stays judged here, against the node.
    if direction == DIR_EGRESS
        && stage == Stage::Veth
        && peer_flags & PEER_F_POD == 0
        && ((peer_flags & PEER_F_HOST != 0 && matches!(protocol, PROTO_TCP | PROTO_UDP))
            || (matches!(protocol, PROTO_TCP | PROTO_UDP | PROTO_SCTP)
                && service_frontend(family, peer)))
    {
        return Decision {
            allow: true,
            reason: REASON_DEFERRED,
            rule_id: 0,
            peer_identity: identity,
        };
    }

    let has_cidr = cidr_identity != 0 && cidr_identity != identity;
    for (i, id) in [identity, cidr_identity, IDENTITY_ANY]
        .into_iter()
        .enumerate()
    {
        if i == 1 && !has_cidr {
            continue;
        }
        // The first entry found decides. Only sets judged by a
        // ClusterNetworkPolicy hold deny entries (the tiers' final verdict,
        // keyed on the peer's identity alone); any action but allow and audit denies.
        let (action, rule_id) = lookup(ep.policy_id, id, direction, protocol, port);
        if action == ACTION_NONE {
            continue;
        }
        if action == ACTION_ALLOW {
            return Decision {
                allow: true,
                reason: REASON_POLICY_ALLOW,
                rule_id,
                peer_identity: identity,
            };
        }
        // An audited CNP's Deny rule would have denied it: allowed, reported.
        if action == ACTION_AUDIT {
            return Decision {
                allow: true,
                reason: REASON_AUDIT,
                rule_id,
                peer_identity: identity,
            };
        }
        return Decision {
            allow: false,
            reason: REASON_POLICY_DENY,
            rule_id,
            peer_identity: identity,
        };
    }
    Decision {
        allow: false,
        reason: REASON_POLICY_DENY,
        rule_id: 0,
        peer_identity: identity,
    }
}

/// `lookup` found no entry (no `ACTION_*` is 0).
const ACTION_NONE: u32 = 0;

/// The policy entry of (`policy_id`, `identity`, ...) on this port: its
/// action and rule id, or `(ACTION_NONE, 0)`. Plain values rather than an
/// `Option` with a payload: LLVM leaves the payload of `None` undefined and
/// may still move it, which the verifier rejects as an uninitialized
/// register (`R2 !read_ok` in `netpol_local_in`).
#[inline(always)]
fn lookup(policy_id: u32, identity: u32, direction: u8, protocol: u8, port: u16) -> (u32, u32) {
    let exact = PolicyKey::new(policy_id, identity, direction, protocol, port);
    // A one-port entry is the longest match of its key.
    if let Some(v) = NETPOL_POLEXACT.get_ptr(&exact) {
        // SAFETY: a value of the map, read at once (see `peer`).
        let v = unsafe { &*v };
        return (v.action, v.rule_id);
    }
    // No one-port entry: the trie can only answer with a shorter one, and
    // `NETPOL_POLSHORT` counts those. None for this protocol: no entry.
    let covered =
        match NETPOL_POLSHORT.get_ptr(&PolicyShortKey::new(policy_id, identity, direction)) {
            // SAFETY: as above.
            Some(s) => unsafe { &*s }.covers(protocol),
            None => false,
        };
    if !covered {
        return (ACTION_NONE, 0);
    }
    match NETPOL_POLICY.get(&Key::new(POLICY_PREFIX_FULL, exact)) {
        Some(v) => (v.action, v.rule_id),
        None => (ACTION_NONE, 0),
    }
}
