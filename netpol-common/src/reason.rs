//! Verdict reasons: a numbered, **append-only** list (never renumber: the
//! numbers are in pinned counter maps, flow entries and logs). Counted per
//! direction in the per-CPU `NETPOL_COUNTERS` array.

/// A policy rule allowed a new flow.
pub const REASON_POLICY_ALLOW: u8 = 0;
/// A packet of a known flow in the direction that opened it.
pub const REASON_ESTABLISHED: u8 = 1;
/// A reply packet of an allowed flow (NetworkPolicy is stateful).
pub const REASON_REPLY: u8 = 2;
/// The pod is not isolated in this direction.
pub const REASON_NOT_ISOLATED: u8 = 3;
/// From one of the node's own addresses to the pod (kubelet probes).
pub const REASON_HOST: u8 = 4;
/// Not IP (ARP and other link-layer protocols): NetworkPolicy is about IP.
pub const REASON_NOT_IP: u8 = 5;
/// IPv6 neighbour discovery / router solicitation: the link needs it.
pub const REASON_NEIGHBOR_DISCOVERY: u8 = 6;
/// An ICMP error that quotes an allowed flow (PMTU discovery works).
pub const REASON_ICMP_ERROR_RELATED: u8 = 7;
/// A non-first fragment of a datagram whose first fragment was allowed.
pub const REASON_FRAGMENT_FOLLOWS: u8 = 8;
/// Would have been denied; passed because the endpoint is in audit mode.
pub const REASON_AUDIT: u8 = 9;
/// Isolated and no rule allows it.
pub const REASON_POLICY_DENY: u8 = 10;
/// Truncated or malformed header.
pub const REASON_MALFORMED: u8 = 11;
/// IPv6 extension header chain deeper than the datapath walks.
pub const REASON_IPV6_EXT_TOO_DEEP: u8 = 12;
/// A later fragment whose first fragment was never seen (or was denied).
pub const REASON_FRAGMENT_UNKNOWN: u8 = 13;
/// The veth has programs attached but no endpoint entry (pod not yet known
/// to the agent, or already gone): fail closed.
pub const REASON_NO_ENDPOINT: u8 = 14;
/// An established flow re-checked after a policy change and now denied.
pub const REASON_REVOKED: u8 = 15;
/// An ICMP error that quotes no allowed flow.
pub const REASON_ICMP_ERROR_UNRELATED: u8 = 16;
/// A re-checked flow that is still allowed.
pub const REASON_RECHECK_ALLOW: u8 = 17;
/// A link-layer protocol other than IPv4, IPv6 and ARP (VLAN, QinQ, MPLS,
/// PPPoE, ...): it could carry IP past the policy check.
pub const REASON_UNSUPPORTED_ETHERTYPE: u8 = 18;

/// A flow entry idle past its protocol's timeout (or closed by FIN/RST and
/// idle past the closing timeout) was forgotten when its next packet came;
/// that packet was then judged as new. Counted in addition to the packet's
/// own reason: it is an event, not a verdict.
pub const REASON_EXPIRED: u8 = 19;
/// A TCP packet other than a SYN, with no flow entry, that policy allows in
/// its own direction: passed, but it opens no flow (only a SYN does), so it
/// gives the other side no reply path.
pub const REASON_TCP_NO_FLOW: u8 = 20;
/// A later fragment of a datagram whose first fragment was decided under an
/// older policy generation, and whose flow is not (or no longer) allowed.
pub const REASON_FRAGMENT_STALE: u8 = 21;

/// A packet from the pod whose source is not the pod's address (or an ARP
/// or neighbour advertisement claiming another address, or a frame with
/// another MAC): spoofing.
pub const REASON_SPOOFED: u8 = 22;
/// A unicast packet for the pod's veth whose destination is not the pod's
/// address (delivered there by a poisoned neighbour cache or bridge).
pub const REASON_NOT_POD_ADDRESS: u8 = 23;
/// A router advertisement or redirect sent by a pod.
pub const REASON_ROGUE_ROUTER: u8 = 24;
/// Neighbour discovery that RFC 4861 says to ignore (hop limit not 255, or
/// an MLD message whose hop limit is not 1): it came from off-link or is
/// a tunnel through the link's control plane.
pub const REASON_ND_INVALID: u8 = 25;

/// A pod's new flow to an address kube-proxy may translate (a Service
/// frontend: a ClusterIP range, an external IP, this node's own address for
/// a NodePort): the pod's egress policy is judged after the translation,
/// against the backend the packet is really sent to (by `netpol_to_pod` on
/// a local backend's veth, `netpol_post_nat` on the node's devices, or
/// `netpol_local_in` for a socket on the node). Passes here.
pub const REASON_DEFERRED: u8 = 26;
/// `netpol_post_nat` or `netpol_local_in` saw a packet that no local pod
/// sent (the node's own traffic, or traffic routed through the node):
/// NetworkPolicy does not apply to it. Passes.
pub const REASON_NODE_TRAFFIC: u8 = 27;

// 28 and 29 are left free: the flow-quota work took 30 while 26..=29 were
// reserved for the Service work.

/// An allowed packet that would open a flow entry while its endpoint already
/// holds its whole share of the flow table (`NETPOL_QUOTA_*`, see
/// `netpol-ebpf/src/quota.rs`): dropped, so that one pod's flows never evict
/// another pod's.
pub const REASON_FLOW_QUOTA: u8 = 30;

/// A new flow from another node that the destination pod's ingress policy
/// denies, dropped by the XDP program on the node's uplink
/// (`netpol_xdp_uplink`) before the node built an skb for it. The pod's veth
/// would have dropped it too (`REASON_POLICY_DENY`); counted in the ingress
/// direction.
pub const REASON_XDP_DENY: u8 = 31;

/// Number of reasons defined so far.
pub const REASON_COUNT: u8 = 32;

/// Stable, metric-friendly name of a reason.
pub const fn reason_name(reason: u8) -> &'static str {
    match reason {
        REASON_POLICY_ALLOW => "policy_allow",
        REASON_ESTABLISHED => "established",
        REASON_REPLY => "reply",
        REASON_NOT_ISOLATED => "not_isolated",
        REASON_HOST => "host",
        REASON_NOT_IP => "not_ip",
        REASON_NEIGHBOR_DISCOVERY => "neighbor_discovery",
        REASON_ICMP_ERROR_RELATED => "icmp_error_related",
        REASON_FRAGMENT_FOLLOWS => "fragment_follows",
        REASON_AUDIT => "audit",
        REASON_POLICY_DENY => "policy_deny",
        REASON_MALFORMED => "malformed",
        REASON_IPV6_EXT_TOO_DEEP => "ipv6_ext_too_deep",
        REASON_FRAGMENT_UNKNOWN => "fragment_unknown",
        REASON_NO_ENDPOINT => "no_endpoint",
        REASON_REVOKED => "revoked",
        REASON_ICMP_ERROR_UNRELATED => "icmp_error_unrelated",
        REASON_RECHECK_ALLOW => "recheck_allow",
        REASON_UNSUPPORTED_ETHERTYPE => "unsupported_ethertype",
        REASON_EXPIRED => "expired",
        REASON_TCP_NO_FLOW => "tcp_no_flow",
        REASON_FRAGMENT_STALE => "fragment_stale",
        REASON_SPOOFED => "spoofed",
        REASON_NOT_POD_ADDRESS => "not_pod_address",
        REASON_ROGUE_ROUTER => "rogue_router",
        REASON_ND_INVALID => "nd_invalid",
        REASON_DEFERRED => "deferred",
        REASON_NODE_TRAFFIC => "node_traffic",
        REASON_FLOW_QUOTA => "flow_quota",
        REASON_XDP_DENY => "xdp_deny",
        _ => "unknown",
    }
}

/// Whether packets counted under this reason were passed.
pub const fn reason_passes(reason: u8) -> bool {
    matches!(
        reason,
        REASON_POLICY_ALLOW
            | REASON_ESTABLISHED
            | REASON_REPLY
            | REASON_NOT_ISOLATED
            | REASON_HOST
            | REASON_NOT_IP
            | REASON_NEIGHBOR_DISCOVERY
            | REASON_ICMP_ERROR_RELATED
            | REASON_FRAGMENT_FOLLOWS
            | REASON_AUDIT
            | REASON_RECHECK_ALLOW
            | REASON_TCP_NO_FLOW
            | REASON_DEFERRED
            | REASON_NODE_TRAFFIC
    )
}
