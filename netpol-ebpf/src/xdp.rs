//! XDP on the node's uplink devices: an early filter in front of the pod
//! veths' TC programs, never a replacement for them.
//!
//! For a packet addressed to a local pod it asks what `netpol_to_pod` would
//! ask of a new flow's first packet, with the same helpers: the local pod by
//! its address (`local_sender`), the flow key (`fill_flow_key`), the flow
//! table, the endpoint, audit mode and `policy::decide`. It returns
//! `XDP_DROP` only for a packet that
//! - is an unfragmented IPv4/IPv6 TCP SYN (no ACK), UDP or SCTP packet,
//! - addressed to an address `NETPOL_LOCAL_ADDRS` names (a local pod),
//! - of a flow with no entry in `NETPOL_FLOWS` (not established, not a reply),
//! - to an endpoint that is not in audit mode,
//! - and that the pod's ingress policy denies.
//!
//! Such a packet reaches the pod's veth unchanged if XDP passes it (routing
//! to a pod address does not rewrite it), finds no flow entry there either,
//! and `netpol_to_pod` denies it by the same decision: dropping it here
//! changes no verdict, only where it is taken. Everything else is
//! `XDP_PASS`, and the TC programs decide exactly as without XDP; each pass
//! below says why it is safe. The program only reads the flow table: it
//! never creates, refreshes or removes an entry, so TC's view of flows
//! (idle timeouts, re-checks after a policy change, quotas) does not depend
//! on whether XDP runs.
//!
//! Tunnelled traffic (VXLAN, Geneve between nodes) is not parsed: its outer
//! packet is addressed to the node, not to a pod, so it passes, and the
//! inner packet is judged on the pod's veth as before.

use aya_ebpf::bindings::xdp_action::{XDP_DROP, XDP_PASS};
use aya_ebpf::programs::XdpContext;
use netpol_common::{
    DIR_INGRESS, PROTO_SCTP, PROTO_TCP, PROTO_UDP, REASON_MALFORMED, REASON_XDP_DENY, VERDICT_DENY,
};

use crate::{
    conntrack::{audit, config, endpoint, fill_flow_key, local_sender, send_event},
    events::{count, now_ns},
    maps::{NETPOL_FLOWS, NETPOL_XDP_SCRATCH},
    parse::{ETH_HLEN, Frag, PacketCtx, TCP_ACK, TCP_SYN, ethertype, family_of, parse_ip},
    policy::{Stage, decide},
};

/// The program's answer: `XDP_PASS` unless the packet is a denied new flow
/// to a local pod.
#[inline(always)]
pub fn handle_xdp(ctx: &XdpContext) -> u32 {
    let Some(scratch) = NETPOL_XDP_SCRATCH.get_ptr_mut(0) else {
        // No working memory: nothing decided here; the pod's veth decides.
        count(DIR_INGRESS, REASON_MALFORMED);
        return XDP_PASS;
    };
    // SAFETY: per-CPU slot used only by this program, which runs to
    // completion on its CPU.
    let s = unsafe { &mut *scratch };
    match try_xdp(ctx, s) {
        Ok(true) => XDP_DROP,
        // A parse error is not a verdict here: the packet goes on to the
        // stack, and `netpol_to_pod` (which reads the whole skb, not only
        // the linear part XDP sees) judges it and fails closed itself.
        Ok(false) | Err(_) => XDP_PASS,
    }
}

/// Whether to drop the packet.
#[inline(always)]
fn try_xdp(
    ctx: &XdpContext,
    s: &mut crate::conntrack::Scratch,
) -> Result<bool, crate::parse::ParseError> {
    let ethertype = ethertype(ctx)?;
    // ARP, VLAN-tagged frames, LLDP, ...: not a pod's IP packet as XDP sees
    // it. The stack untags or routes what is meant for a pod, and the veth
    // judges it (and drops what it cannot parse).
    let Some(family) = family_of(ethertype) else {
        return Ok(false);
    };
    parse_ip(ctx, family, ETH_HLEN, false, &mut s.pkt)?;
    // Fragments: the veth follows each datagram's first fragment
    // (`NETPOL_FRAGS`), and only it records that state. Dropping a first
    // fragment here would leave the later ones to be dropped as unknown on
    // the veth (same outcome), but the kernel may reassemble before the veth
    // too; the veth decides every fragment, as without XDP.
    if s.pkt.frag != Frag::None {
        return Ok(false);
    }
    let p = &s.pkt;
    let opens_flow = match p.protocol {
        // A pure SYN is the only TCP packet that can open a flow. Any other
        // TCP packet without an entry keyed on the addresses seen here may
        // be the reply of a connection a local pod opened through a Service
        // (its entry on the veth names the ClusterIP, and conntrack restores
        // that source only after XDP): the veth decides.
        PROTO_TCP => p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN,
        PROTO_UDP | PROTO_SCTP => true,
        // ICMP (errors quote a flow: `related_error` on the veth decides
        // them), other protocols: rare, and not what a flood of denied
        // traffic is made of. The veth decides.
        _ => false,
    };
    if !opens_flow {
        return Ok(false);
    }
    // Not a local pod's address (the node itself, a ClusterIP or NodePort
    // that kube-proxy translates later, a tunnel's outer packet, traffic
    // routed through the node, multicast): NetworkPolicy on this node has
    // no say before the stack's DNAT and routing; the veth (if any) decides.
    let Some(ifindex) = local_sender(family, &p.daddr) else {
        return Ok(false);
    };
    fill_flow_key(&mut s.key, ifindex, &s.pkt, DIR_INGRESS);
    // A flow the pod's veth knows (established, a reply to a connection the
    // pod opened, expired or stale under an older policy generation): the
    // veth handles it, with its timeouts and re-checks. Read, never written.
    // SAFETY: the entry is only tested for presence.
    if unsafe { NETPOL_FLOWS.get(&s.key) }.is_some() {
        return Ok(false);
    }
    // CONFIG once per run: its epoch names the endpoint, peer and policy
    // entries this packet is judged with (the same state the veth uses).
    let cfg = config();
    // An address with no endpoint (the pod is being set up or torn down):
    // the veth fails closed with `REASON_NO_ENDPOINT`.
    let Some(ep) = endpoint(ifindex, &cfg).copied() else {
        return Ok(false);
    };
    // Audit mode passes what policy denies, on the veth, with its event.
    if audit(&ep, &cfg) {
        return Ok(false);
    }
    let d = decide(
        &ep,
        DIR_INGRESS,
        family,
        &s.pkt.saddr,
        s.pkt.protocol,
        s.pkt.dport,
        Stage::Veth,
    );
    if d.allow {
        // The veth decides it again, creates its entry and applies quotas.
        return Ok(false);
    }
    let len = PacketCtx::len(ctx);
    send_event(
        s,
        &cfg,
        ifindex,
        DIR_INGRESS,
        &ep,
        VERDICT_DENY,
        REASON_XDP_DENY,
        d.rule_id,
        d.peer_identity,
        len,
        now_ns(),
    );
    count(DIR_INGRESS, REASON_XDP_DENY);
    Ok(true)
}
