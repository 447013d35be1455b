//! The reference evaluator: NetworkPolicy semantics written straight from
//! the spec, deliberately simple and separate from the compiler (it shares
//! only the model's definitions: which pods are live, how selectors match).
//!
//! * A pod is isolated for a direction iff some policy with that type
//!   selects it; then what is allowed is the union of the rules of every such
//!   policy.
//! * A connection from A to B needs A's egress and B's ingress.
//! * Traffic from an address of B's node to B is allowed (ingress side).
//! * An ipBlock applies to every address, pod IPs included.
//! * Named ports resolve on the destination pod, in both directions.
//! * A port entry with a protocol and no port means every port of that
//!   protocol; a rule without ports allows every port and protocol. ICMP
//!   (port-less) is matched only by rules without ports.

use std::net::IpAddr;

use netpol_common::DIR_EGRESS;
use netpol_common::DIR_INGRESS;

use super::NodeInfo;
use crate::model::{Cluster, NetworkPolicy, Peer, Pod, PortMatch, Rule};

/// Whether a new connection `src -> dst` (`proto` = `PROTO_*`, `port` = the
/// destination port, ignored for port-less protocols) is allowed. `nodes`
/// gives each node's own addresses.
pub fn allowed(
    cluster: &Cluster,
    nodes: &[NodeInfo],
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    port: u16,
) -> bool {
    let src_pod = owner(cluster, src);
    let dst_pod = owner(cluster, dst);
    let egress_ok =
        src_pod.is_none_or(|a| direction_allows(cluster, a, DIR_EGRESS, dst, dst_pod, proto, port));
    let ingress_ok = dst_pod.is_none_or(|b| {
        from_own_node(nodes, b, src)
            || direction_allows(cluster, b, DIR_INGRESS, src, src_pod, proto, port)
    });
    egress_ok && ingress_ok
}

/// The live pod an address belongs to (the first in namespace/name order,
/// should two claim it).
pub fn owner(cluster: &Cluster, ip: IpAddr) -> Option<&Pod> {
    cluster
        .pods
        .values()
        .find(|p| p.is_live() && p.ips.contains(&ip))
}

fn from_own_node(nodes: &[NodeInfo], pod: &Pod, src: IpAddr) -> bool {
    nodes
        .iter()
        .any(|n| Some(&n.name) == pod.node.as_ref() && n.addresses.contains(&src))
}

/// Whether `pod`'s policies allow traffic in `direction` with `peer`
/// (the remote address and the pod that owns it, if any).
fn direction_allows(
    cluster: &Cluster,
    pod: &Pod,
    direction: u8,
    peer: IpAddr,
    peer_pod: Option<&Pod>,
    proto: u8,
    port: u16,
) -> bool {
    let policies: Vec<&NetworkPolicy> = cluster
        .policies
        .values()
        .filter(|pol| pol.selects(pod) && pol.rules(direction).is_some())
        .collect();
    if policies.is_empty() {
        return true; // not isolated
    }
    let destination = if direction == DIR_INGRESS {
        Some(pod)
    } else {
        peer_pod
    };
    policies.iter().any(|pol| {
        pol.rules(direction).unwrap_or_default().iter().any(|rule| {
            peer_matches(cluster, pol, rule, peer, peer_pod)
                && port_matches(rule, destination, proto, port)
        })
    })
}

fn peer_matches(
    cluster: &Cluster,
    pol: &NetworkPolicy,
    rule: &Rule,
    ip: IpAddr,
    pod: Option<&Pod>,
) -> bool {
    if rule.peers.is_empty() {
        return true;
    }
    rule.peers.iter().any(|peer| match peer {
        Peer::IpBlock(block) => block.contains(ip),
        Peer::Pods {
            namespace_selector,
            pod_selector,
        } => pod.is_some_and(|p| {
            let namespace_ok = match namespace_selector {
                None => p.namespace == pol.namespace,
                Some(sel) => sel.matches(cluster.namespace_labels(&p.namespace)),
            };
            namespace_ok
                && pod_selector
                    .as_ref()
                    .is_none_or(|sel| sel.matches(&p.labels))
        }),
    })
}

fn port_matches(rule: &Rule, destination: Option<&Pod>, proto: u8, port: u16) -> bool {
    if rule.ports.is_empty() {
        return true;
    }
    rule.ports.iter().any(|spec| {
        spec.protocol.number() == proto
            && match &spec.port {
                PortMatch::All => true,
                PortMatch::Range { start, end } => (*start..=*end).contains(&port),
                PortMatch::Named(name) => destination
                    .is_some_and(|d| d.resolve_named_port(name, spec.protocol).any(|p| p == port)),
            }
    })
}
