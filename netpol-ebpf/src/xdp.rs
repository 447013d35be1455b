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
//! - for UDP and SCTP: whose 5-tuple no reply record saw within the reply
//!   window (it cannot be the reply of a flow the pod opened through a
//!   Service, which conntrack would un-DNAT before the veth; see
//!   `netpol_common::XdpReplyConfig`),
//! - and that the pod's ingress policy denies.
//!
//! Such a packet reaches the pod's veth unchanged if XDP passes it (routing
//! to a pod address does not rewrite it, and no conntrack entry translates
//! it), finds no flow entry there either, and `netpol_to_pod` denies it by
//! the same decision: dropping it here
//! changes no verdict, only where it is taken. Everything else is
//! `XDP_PASS`, and the TC programs decide exactly as without XDP; each pass
//! below says why it is safe. The program only reads the flow table: it
//! never creates, refreshes or removes an entry (it writes only its own
//! reply records), so TC's view of flows
//! (idle timeouts, re-checks after a policy change, quotas) does not depend
//! on whether XDP runs.
//!
//! Tunnelled traffic (VXLAN, Geneve between nodes) is not parsed: its outer
//! packet is addressed to the node, not to a pod, so it passes, and the
//! inner packet is judged on the pod's veth as before.

use aya_ebpf::bindings::xdp_action::{XDP_DROP, XDP_PASS};
use aya_ebpf::programs::XdpContext;
use netpol_common::{
    ConfigValue, DEFAULT_TIMEOUT_UDP_S, DIR_INGRESS, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
    REASON_MALFORMED, REASON_XDP_DENY, VERDICT_DENY, XDP_REPLY_SLACK_NS, xdp_reply_bucket,
};

use crate::{
    conntrack::{audit, carries, config, endpoint, fill_flow_key, local_sender, send_event},
    events::{count, now_ns},
    maps::{NETPOL_FLOWS, NETPOL_XDP_CFG, NETPOL_XDP_RPLY, NETPOL_XDP_SCRATCH},
    parse::{ETH_HLEN, Frag, Packet, PacketCtx, TCP_ACK, TCP_SYN, ethertype, family_of, parse_ip},
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
    // A later fragment has no ports: the veth follows each datagram's first
    // fragment (`NETPOL_FRAGS`), and only it records that state.
    if s.pkt.frag == Frag::Later {
        return Ok(false);
    }
    let p = &s.pkt;
    let datagram = matches!(p.protocol, PROTO_UDP | PROTO_SCTP);
    let opens_flow = match p.protocol {
        // A pure SYN is the only TCP packet that can open a flow. Any other
        // TCP packet without an entry keyed on the addresses seen here may
        // be the reply of a connection a local pod opened through a Service
        // (its entry on the veth names the ClusterIP, and conntrack restores
        // that source only after XDP): the veth decides. A pure SYN is never
        // such a reply.
        PROTO_TCP => p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN,
        // UDP and SCTP have no such bit: a datagram may be the reply of a
        // flow a local pod opened through a Service. The reply records
        // decide whether it can be (`may_be_reply`).
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
    let now = now_ns();
    let drop = if s.pkt.frag == Frag::None {
        denied_new_flow(ctx, s, ifindex, family, datagram, now)
    } else {
        // A first fragment: the veth decides every fragment, as without
        // XDP. Dropping it here would leave the later ones to be dropped as
        // unknown on the veth (same outcome), but the kernel may reassemble
        // before the veth too.
        false
    };
    if datagram && !drop {
        // Every UDP/SCTP packet to a local pod that goes on to the stack may
        // be (or refresh) a reply conntrack follows: its record is renewed,
        // so that a long stream of replies keeps its bucket fresh. See
        // `netpol_common::XdpReplyConfig`.
        let p = &s.pkt;
        touch_reply(
            xdp_reply_bucket(p.protocol, &p.saddr, p.sport, &p.daddr, p.dport),
            now,
        );
    }
    Ok(drop)
}

/// An unfragmented packet that may open a flow, to the local pod on
/// `ifindex`: whether it is a new flow that pod's ingress denies (and may
/// be dropped here, counted and reported).
#[inline(always)]
fn denied_new_flow(
    ctx: &XdpContext,
    s: &mut crate::conntrack::Scratch,
    ifindex: u32,
    family: u8,
    datagram: bool,
    now: u64,
) -> bool {
    fill_flow_key(&mut s.key, ifindex, &s.pkt, DIR_INGRESS);
    // A flow the pod's veth knows (established, a reply to a connection the
    // pod opened, expired or stale under an older policy generation): the
    // veth handles it, with its timeouts and re-checks. Read, never written.
    // SAFETY: the entry is only tested for presence.
    if unsafe { NETPOL_FLOWS.get(&s.key) }.is_some() {
        return false;
    }
    // CONFIG once per run: its epoch names the endpoint, peer and policy
    // entries this packet is judged with (the same state the veth uses).
    let cfg = config();
    // An address with no endpoint (the pod is being set up or torn down):
    // the veth fails closed with `REASON_NO_ENDPOINT`.
    let Some(ep) = endpoint(ifindex, &cfg).copied() else {
        return false;
    };
    // `NETPOL_LOCAL_ADDRS` is written in place, outside the epochs: it may
    // name the veth the address has in the other state, whose endpoint in
    // this epoch is another pod's. Judging with that pod's ingress could drop
    // what the veth passes: unless this epoch's endpoint carries the
    // destination address, the veth decides.
    if !carries(&ep, family, &s.pkt.daddr) {
        return false;
    }
    // Audit mode passes what policy denies, on the veth, with its event.
    if audit(&ep, &cfg) {
        return false;
    }
    // A datagram with no flow entry under these addresses may still be the
    // reply of a flow the pod opened through a Service: conntrack turns its
    // source back into the ClusterIP before the veth, where the ClusterIP-
    // keyed entry passes it, even if the backend-keyed entry was evicted
    // (or, after both expired, the veth judges it from the ClusterIP, not
    // from the address seen here). XDP cannot read conntrack (the
    // `bpf_xdp_ct_lookup` kfunc needs a loader that relocates kfunc calls,
    // which aya 0.14 does not), so it drops a datagram only if no packet of
    // its 5-tuple has been seen for longer than conntrack or the flow table
    // keep such a flow.
    if datagram {
        let p = &s.pkt;
        let bucket = xdp_reply_bucket(p.protocol, &p.saddr, p.sport, &p.daddr, p.dport);
        if may_be_reply(bucket, p.protocol, &cfg, now) {
            return false;
        }
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
        return false;
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
        now,
    );
    count(DIR_INGRESS, REASON_XDP_DENY);
    true
}

/// Whether a UDP/SCTP datagram whose reply bucket is `bucket` may be the
/// reply of a flow conntrack or the flow table still follow: true unless the
/// records are armed, have been kept for a whole reply window, and saw
/// nothing of the bucket within the window.
#[inline(always)]
fn may_be_reply(bucket: u32, protocol: u8, cfg: &ConfigValue, now: u64) -> bool {
    let Some(x) = NETPOL_XDP_CFG.get(0) else {
        return true;
    };
    if x.records_since_ns == 0 {
        // Not armed by the agent: no UDP or SCTP is dropped here.
        return true;
    }
    let conntrack_s = if protocol == PROTO_SCTP {
        x.conntrack_sctp_s
    } else {
        x.conntrack_udp_s
    };
    let idle_s = if cfg.timeout_udp_s == 0 {
        DEFAULT_TIMEOUT_UDP_S
    } else {
        cfg.timeout_udp_s
    };
    let longest = if conntrack_s > idle_s {
        conntrack_s
    } else {
        idle_s
    };
    let window = u64::from(longest) * 1_000_000_000 + XDP_REPLY_SLACK_NS;
    if now < x.records_since_ns.saturating_add(window) {
        // Flows opened before the records started (an agent that did not
        // keep them, a node where pods ran before netpol) may still be live.
        return true;
    }
    match NETPOL_XDP_RPLY.get(bucket) {
        // A record written on another CPU may be a little ahead of `now`.
        Some(last) => now.saturating_sub(*last) <= window,
        None => true,
    }
}

/// Renew a reply record.
#[inline(always)]
fn touch_reply(bucket: u32, now: u64) {
    if let Some(r) = NETPOL_XDP_RPLY.get_ptr_mut(bucket) {
        // SAFETY: an array slot, valid for the program's life; a torn or
        // racing store of another recent time only moves it by the slack.
        unsafe { core::ptr::write_volatile(r, now) };
    }
}

/// Called by `netpol_post_nat` for a local pod's packet leaving the node by
/// one of its devices, after any DNAT: a UDP/SCTP packet renews the record
/// of its reply (source and destination swapped), which `may_be_reply`
/// reads at the uplink.
#[inline(always)]
pub fn record_sent(p: &Packet) {
    if !matches!(p.protocol, PROTO_UDP | PROTO_SCTP) || p.frag == Frag::Later {
        return;
    }
    touch_reply(
        xdp_reply_bucket(p.protocol, &p.daddr, p.dport, &p.saddr, p.sport),
        now_ns(),
    );
}
