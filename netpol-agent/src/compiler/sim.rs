//! A datapath simulator: answers "is this new connection allowed?" from map
//! contents only, the way the eBPF programs do.
//!
//! Per new flow on a local pod's veth:
//! 1. the endpoint entry; not isolated in the packet's direction -> allow;
//! 2. the peer address (source for ingress, destination for egress) -> LPM
//!    lookup in the peer map; ingress from a `PEER_F_HOST` address -> allow;
//! 3. policy LPM lookup at prefix 96 with the peer's identity, its distinct
//!    address-only identity (`cidr_identity`, if non-zero and different),
//!    then `IDENTITY_ANY`; the first entry found decides (`ACTION_ALLOW`
//!    allows, `ACTION_AUDIT` allows and reports, anything else denies: deny entries are written for sets a
//!    ClusterNetworkPolicy judges); no entry denies. Port-less protocols
//!    (ICMP echo) are looked up with port 0.
//!
//! A connection is allowed when the source pod's egress (on its node) and the
//! destination pod's ingress (on its node) both allow it. Audit mode is not
//! applied: the answer is the policy verdict.

use std::net::IpAddr;

use netpol_common::{
    ACTION_ALLOW, ACTION_AUDIT, DIR_EGRESS, DIR_INGRESS, EP_F_EGRESS_ISOLATED,
    EP_F_INGRESS_ISOLATED, IDENTITY_ANY, PEER_F_HOST, POLICY_PREFIX_ANY_PORT,
    POLICY_PREFIX_ANY_PROTO, POLICY_PREFIX_FULL, PROTO_SCTP, PROTO_TCP, PROTO_UDP, PeerValue,
    PolicyKey, PolicyValue,
};

use super::{Compiled, Maps};
use crate::model::PodRef;

/// What the datapath decides on one endpoint's veth.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The endpoint is not isolated in this direction.
    NotIsolated,
    /// Ingress from one of the node's own addresses.
    Host,
    /// A policy entry allowed it.
    Allow { rule_id: u32 },
    /// An `ACTION_AUDIT` entry allowed it, naming the audited
    /// ClusterNetworkPolicy Deny rule that would have denied it.
    Audit { rule_id: u32 },
    /// Isolated and nothing allows it (no entry, or a deny entry naming no
    /// rule: NetworkPolicy's default deny under the tiers).
    Deny,
    /// A deny entry naming a rule (a ClusterNetworkPolicy Deny).
    DenyRule { rule_id: u32 },
    /// No endpoint entry for the pod (the datapath fails closed).
    NoEndpoint,
}

impl Verdict {
    pub fn is_allowed(self) -> bool {
        matches!(
            self,
            Verdict::NotIsolated | Verdict::Host | Verdict::Allow { .. } | Verdict::Audit { .. }
        )
    }
}

/// Whether a new connection `src -> dst` is allowed, from the compiled maps
/// of every node. Pods are found through each node's `local_ips` (the agent's
/// veth-to-pod knowledge); an address that is no local endpoint anywhere is
/// not enforced.
pub fn allowed(nodes: &[Compiled], src: IpAddr, dst: IpAddr, proto: u8, port: u16) -> bool {
    let on = |ip: IpAddr| {
        nodes
            .iter()
            .find_map(|c| c.local_ips.get(&ip).map(|pod| (c, pod)))
    };
    let egress_ok = on(src).is_none_or(|(c, pod)| {
        endpoint_verdict(&c.maps, pod, DIR_EGRESS, dst, proto, port).is_allowed()
    });
    let ingress_ok = on(dst).is_none_or(|(c, pod)| {
        endpoint_verdict(&c.maps, pod, DIR_INGRESS, src, proto, port).is_allowed()
    });
    egress_ok && ingress_ok
}

/// The datapath's decision on `pod`'s veth for a new flow in `direction`
/// with the remote address `peer`.
pub fn endpoint_verdict(
    maps: &Maps,
    pod: &PodRef,
    direction: u8,
    peer: IpAddr,
    proto: u8,
    port: u16,
) -> Verdict {
    let Some(ep) = maps.endpoints.get(pod) else {
        return Verdict::NoEndpoint;
    };
    let isolated = if direction == DIR_INGRESS {
        EP_F_INGRESS_ISOLATED
    } else {
        EP_F_EGRESS_ISOLATED
    };
    if ep.flags & isolated == 0 {
        return Verdict::NotIsolated;
    }
    // No entry (the compiler always writes both /0, so only while maps are
    // being filled): the datapath's "unknown" identity, which only "any
    // peer" rules match.
    let peer = peer_lookup(maps, peer).unwrap_or(PeerValue::new(IDENTITY_UNKNOWN, 0));
    if direction == DIR_INGRESS && peer.flags & PEER_F_HOST != 0 {
        return Verdict::Host;
    }
    let port = if matches!(proto, PROTO_TCP | PROTO_UDP | PROTO_SCTP) {
        port
    } else {
        0
    };
    // The datapath's order: the peer's identity, its distinct address-only
    // identity if it has one, then the "any peer" wildcard.
    let has_cidr = peer.cidr_identity != 0 && peer.cidr_identity != peer.identity;
    for (i, identity) in [peer.identity, peer.cidr_identity, IDENTITY_ANY]
        .into_iter()
        .enumerate()
    {
        if i == 1 && !has_cidr {
            continue;
        }
        let key = PolicyKey::new(ep.policy_id, identity, direction, proto, port);
        if let Some(v) = policy_entry(maps, key) {
            return match (v.action, v.rule_id) {
                (ACTION_ALLOW, rule_id) => Verdict::Allow { rule_id },
                (ACTION_AUDIT, rule_id) => Verdict::Audit { rule_id },
                (_, 0) => Verdict::Deny,
                (_, rule_id) => Verdict::DenyRule { rule_id },
            };
        }
    }
    Verdict::Deny
}

/// The identity the datapath gives an address no peer entry covers.
const IDENTITY_UNKNOWN: u32 = u32::MAX;

/// Longest-prefix match in the peer map of the address's family.
pub fn peer_lookup(maps: &Maps, ip: IpAddr) -> Option<PeerValue> {
    match ip {
        IpAddr::V4(v4) => (0..=32u8).rev().find_map(|len| {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            let net = (u32::from(v4) & mask).into();
            maps.peers_v4.get(&(net, len)).copied()
        }),
        IpAddr::V6(v6) => (0..=128u8).rev().find_map(|len| {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            let net = (u128::from(v6) & mask).into();
            maps.peers_v6.get(&(net, len)).copied()
        }),
    }
}

/// Longest-prefix match of a full (prefix 96) key in the policy map; the
/// rule id of the matching entry if it allows.
pub fn policy_lookup(maps: &Maps, key: PolicyKey) -> Option<u32> {
    policy_entry(maps, key)
        .filter(|v| v.action == ACTION_ALLOW)
        .map(|v| v.rule_id)
}

/// Longest-prefix match of a full (prefix 96) key in the policy map.
pub fn policy_entry(maps: &Maps, key: PolicyKey) -> Option<PolicyValue> {
    let full = key.port();
    for len in (POLICY_PREFIX_ANY_PROTO..=POLICY_PREFIX_FULL).rev() {
        let mut k = key;
        if len < POLICY_PREFIX_ANY_PORT {
            k.protocol = 0;
        }
        let bits = len.saturating_sub(POLICY_PREFIX_ANY_PORT);
        let mask = if bits == 0 {
            0
        } else {
            u16::MAX << (16 - bits)
        };
        k.port = (full & mask).to_be_bytes();
        if let Some(v) = maps.policy.get(&(k, len)) {
            return Some(*v);
        }
    }
    None
}
