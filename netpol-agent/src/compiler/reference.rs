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
//!
//! With ClusterNetworkPolicy ([`allowed_with_tiers`], [`decide`]), each
//! direction of a connection is decided for the pod on that side (the
//! source pod for egress, the destination pod for ingress) in this order
//! (upstream `ClusterNetworkPolicySpec.Tier`):
//!
//! 1. Admin tier: the CNPs whose subject selects the pod, by ascending
//!    priority (equal priorities by name: upstream leaves the order
//!    unspecified, we make it deterministic), each policy's rules in order.
//!    The first rule whose peers and protocols match decides: Accept allows,
//!    Deny drops, Pass skips the rest of the tier.
//! 2. NetworkPolicy: if the pod is isolated in that direction, its policies
//!    decide (allowed iff one of their rules allows).
//! 3. Baseline tier: like Admin; Pass skips to the default.
//! 4. Default: allowed.
//!
//! hostNetwork pods are never subjects nor pod peers (they are not live
//! pods: their address is their node's). `networks` peers match any
//! address, pod IPs included; `nodes` peers match the addresses of the
//! matching Nodes. A protocol entry without a port does not exist in CNP:
//! an empty `protocols` matches everything (ICMP too), a `destinationPort`
//! entry only its protocol and ports, a `destinationNamedPort` the
//! destination pod's container ports of that name (any protocol). Traffic
//! from a pod's own node to the pod stays allowed whatever the tiers say
//! (kubelet probes), as it is for NetworkPolicy. Replies are not in scope:
//! this answers for new connections only.
//!
//! **Audited policies** (`netpol.dev/audit: "true"` on the
//! ClusterNetworkPolicy, [`decide_audited`]): the policy's Deny rules are
//! audit-only, and nothing else about it changes (its Accept and Pass rules
//! are enforced). A flow gets the decision it would get if those rules did
//! not exist: a matching audited Deny rule is stepped over and evaluation
//! goes on with the next rule. If that decision allows the flow, the first
//! audited Deny rule that matched (in evaluation order: Admin, then
//! Baseline) is the flow's *audit rule*: the flow passes and is reported as
//! `audit`, naming it. If the decision denies, there is no audit rule: the
//! flow is denied, and the report names the rule that denies it. An
//! audited pod (namespace annotation, `--audit`) passes whatever denies and
//! is reported as `audit` too; that is the datapath's, not the tiers'.

use std::net::IpAddr;

use netpol_common::DIR_EGRESS;
use netpol_common::DIR_INGRESS;

use super::NodeInfo;
use crate::model::{
    Action, Cluster, ClusterNetworkPolicy, CnpPeer, CnpPort, CnpRule, NetworkPolicy, Peer, Pod,
    PortMatch, Rule, Tier,
};

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
    network_policy_decides(cluster, pod, direction, peer, peer_pod, proto, port).unwrap_or(true)
}

/// NetworkPolicy's answer for `pod` in `direction`: `None` when no policy
/// isolates the pod in that direction, else whether one allows the traffic.
fn network_policy_decides(
    cluster: &Cluster,
    pod: &Pod,
    direction: u8,
    peer: IpAddr,
    peer_pod: Option<&Pod>,
    proto: u8,
    port: u16,
) -> Option<bool> {
    let policies: Vec<&NetworkPolicy> = cluster
        .policies
        .values()
        .filter(|pol| pol.selects(pod) && pol.rules(direction).is_some())
        .collect();
    if policies.is_empty() {
        return None; // not isolated
    }
    let destination = if direction == DIR_INGRESS {
        Some(pod)
    } else {
        peer_pod
    };
    Some(policies.iter().any(|pol| {
        pol.rules(direction).unwrap_or_default().iter().any(|rule| {
            peer_matches(cluster, pol, rule, peer, peer_pod)
                && port_matches(rule, destination, proto, port)
        })
    }))
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

/// What decided one direction of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// A CNP rule matched with Accept or Deny.
    Rule {
        tier: Tier,
        policy: String,
        /// Index in the policy's `ingress` or `egress` list.
        index: usize,
        name: String,
        action: Action,
    },
    /// NetworkPolicy isolates the pod (Admin did not decide).
    NetworkPolicy { allowed: bool },
    /// No tier decided (nothing selects the pod, or it was passed on).
    Default,
    /// Traffic from the destination pod's own node (ingress only).
    OwnNode,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        match self {
            Decision::Rule { action, .. } => *action == Action::Accept,
            Decision::NetworkPolicy { allowed } => *allowed,
            Decision::Default | Decision::OwnNode => true,
        }
    }
}

/// Whether a new connection `src -> dst` is allowed by the CNP tiers and
/// NetworkPolicy together (see the module docs): the source pod's egress
/// and the destination pod's ingress must both allow it.
pub fn allowed_with_tiers(
    cluster: &Cluster,
    nodes: &[NodeInfo],
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    port: u16,
) -> bool {
    let (egress, ingress) = decide(cluster, nodes, src, dst, proto, port);
    egress.allowed() && ingress.allowed()
}

/// The decision of each direction of `src -> dst`: (egress of the source
/// pod, ingress of the destination pod); [`Decision::Default`] for a side
/// that is not a pod.
pub fn decide(
    cluster: &Cluster,
    nodes: &[NodeInfo],
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    port: u16,
) -> (Decision, Decision) {
    let src_pod = owner(cluster, src);
    let dst_pod = owner(cluster, dst);
    let egress = src_pod.map_or(Decision::Default, |a| {
        decide_direction(cluster, a, DIR_EGRESS, dst, dst_pod, proto, port)
    });
    let ingress = dst_pod.map_or(Decision::Default, |b| {
        if from_own_node(nodes, b, src) {
            Decision::OwnNode
        } else {
            decide_direction(cluster, b, DIR_INGRESS, src, src_pod, proto, port)
        }
    });
    (egress, ingress)
}

/// A Deny rule of an audited ClusterNetworkPolicy that would have denied a
/// flow its tiers allow (see "Audited policies" in the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRule {
    pub tier: Tier,
    pub policy: String,
    /// Index in the policy's `ingress` or `egress` list.
    pub index: usize,
    pub name: String,
}

/// [`decide`] with each direction's audit rule (module docs, "Audited
/// policies"): `Some` only when that direction's decision allows.
pub fn decide_audited(
    cluster: &Cluster,
    nodes: &[NodeInfo],
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    port: u16,
) -> ((Decision, Option<AuditRule>), (Decision, Option<AuditRule>)) {
    let src_pod = owner(cluster, src);
    let dst_pod = owner(cluster, dst);
    let egress = src_pod.map_or((Decision::Default, None), |a| {
        decide_direction_audited(cluster, a, DIR_EGRESS, dst, dst_pod, proto, port)
    });
    let ingress = dst_pod.map_or((Decision::Default, None), |b| {
        if from_own_node(nodes, b, src) {
            (Decision::OwnNode, None)
        } else {
            decide_direction_audited(cluster, b, DIR_INGRESS, src, src_pod, proto, port)
        }
    });
    (egress, ingress)
}

/// The tiers for `pod` in `direction` with `peer` (the remote address and
/// the live pod that owns it, if any).
pub fn decide_direction(
    cluster: &Cluster,
    pod: &Pod,
    direction: u8,
    peer: IpAddr,
    peer_pod: Option<&Pod>,
    proto: u8,
    port: u16,
) -> Decision {
    decide_direction_audited(cluster, pod, direction, peer, peer_pod, proto, port).0
}

/// [`decide_direction`] and the audit rule, if the decision allows.
pub fn decide_direction_audited(
    cluster: &Cluster,
    pod: &Pod,
    direction: u8,
    peer: IpAddr,
    peer_pod: Option<&Pod>,
    proto: u8,
    port: u16,
) -> (Decision, Option<AuditRule>) {
    let destination = if direction == DIR_INGRESS {
        Some(pod)
    } else {
        peer_pod
    };
    let mut audit: Option<AuditRule> = None;
    let mut tier = |tier: Tier| -> Option<Decision> {
        for cnp in tier_policies(cluster, pod, tier) {
            for (index, rule) in cnp.rules(direction).iter().enumerate() {
                if !cnp_peer_matches(cluster, rule, peer, peer_pod)
                    || !cnp_port_matches(rule, destination, proto, port)
                {
                    continue;
                }
                if cnp.audit && rule.action == Action::Deny {
                    // Stepped over; the first one is the audit rule.
                    audit.get_or_insert_with(|| AuditRule {
                        tier,
                        policy: cnp.name.clone(),
                        index,
                        name: rule.name.clone(),
                    });
                    continue;
                }
                return match rule.action {
                    Action::Pass => None,
                    action => Some(Decision::Rule {
                        tier,
                        policy: cnp.name.clone(),
                        index,
                        name: rule.name.clone(),
                        action,
                    }),
                };
            }
        }
        None
    };
    let decision = tier(Tier::Admin)
        .or_else(|| {
            network_policy_decides(cluster, pod, direction, peer, peer_pod, proto, port)
                .map(|allowed| Decision::NetworkPolicy { allowed })
        })
        .or_else(|| tier(Tier::Baseline))
        .unwrap_or(Decision::Default);
    let audit = if decision.allowed() { audit } else { None };
    (decision, audit)
}

/// The CNPs of `tier` whose subject selects `pod`, in evaluation order:
/// ascending priority, then name.
pub fn tier_policies<'a>(
    cluster: &'a Cluster,
    pod: &Pod,
    tier: Tier,
) -> Vec<&'a ClusterNetworkPolicy> {
    let labels = cluster.namespace_labels(&pod.namespace);
    let mut v: Vec<&ClusterNetworkPolicy> = cluster
        .cluster_policies
        .values()
        .filter(|c| c.tier == tier && c.selects(pod, labels))
        .collect();
    v.sort_by(|a, b| (a.priority, &a.name).cmp(&(b.priority, &b.name)));
    v
}

fn cnp_peer_matches(cluster: &Cluster, rule: &CnpRule, ip: IpAddr, pod: Option<&Pod>) -> bool {
    rule.peers.iter().any(|peer| match peer {
        CnpPeer::Everything => true,
        CnpPeer::Networks(nets) => nets.iter().any(|n| n.contains(&ip)),
        CnpPeer::Nodes(sel) => cluster
            .nodes
            .values()
            .any(|n| sel.matches(&n.labels) && n.addresses.contains(&ip)),
        CnpPeer::Namespaces(ns) => {
            pod.is_some_and(|p| ns.matches(cluster.namespace_labels(&p.namespace)))
        }
        CnpPeer::Pods {
            namespace_selector,
            pod_selector,
        } => pod.is_some_and(|p| {
            namespace_selector.matches(cluster.namespace_labels(&p.namespace))
                && pod_selector.matches(&p.labels)
        }),
    })
}

fn cnp_port_matches(rule: &CnpRule, destination: Option<&Pod>, proto: u8, port: u16) -> bool {
    if rule.protocols.is_empty() {
        return true;
    }
    rule.protocols.iter().any(|p| match p {
        CnpPort::Range {
            protocol,
            start,
            end,
        } => protocol.number() == proto && (*start..=*end).contains(&port),
        CnpPort::Named(name) => destination.is_some_and(|d| {
            d.ports.iter().any(|cp| {
                cp.name.as_deref() == Some(name.as_str())
                    && cp.protocol.number() == proto
                    && cp.port == port
            })
        }),
    })
}
