//! The per-packet flow: parse, established-flow lookup (one lookup for a
//! known flow), generation re-check, and the policy decision for new flows.

use aya_ebpf::programs::{SkLookupContext, TcContext};
use netpol_common::{
    CFG_F_AUDIT_ALL, CFG_F_LOG_ALLOWED, ConfigValue, DEFAULT_TIMEOUT_ICMP_S,
    DEFAULT_TIMEOUT_TCP_CLOSING_S, DEFAULT_TIMEOUT_TCP_S, DEFAULT_TIMEOUT_UDP_S, DIR_EGRESS,
    DIR_INGRESS, EP_F_AUDIT, EP_F_HAS_MAC, EP_F_HAS_V4, EP_F_HAS_V6, EndpointValue, FAMILY_V6,
    FLOW_S_CLOSING, FLOW_S_OPEN, FlowKey, FlowValue, FragKey, FragValue, LocalKey, PEER_F_POD,
    PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, REASON_AUDIT, REASON_ESTABLISHED, REASON_EXPIRED,
    REASON_FRAGMENT_FOLLOWS, REASON_FRAGMENT_STALE, REASON_FRAGMENT_UNKNOWN,
    REASON_ICMP_ERROR_RELATED, REASON_ICMP_ERROR_UNRELATED, REASON_MALFORMED, REASON_ND_INVALID,
    REASON_NEIGHBOR_DISCOVERY, REASON_NO_ENDPOINT, REASON_NOT_IP, REASON_NOT_POD_ADDRESS,
    REASON_RECHECK_ALLOW, REASON_REPLY, REASON_REVOKED, REASON_ROGUE_ROUTER, REASON_SPOOFED,
    REASON_TCP_NO_FLOW, REASON_UNSUPPORTED_ETHERTYPE, VERDICT_ALLOW, VERDICT_AUDIT, VERDICT_DENY,
    VerdictEvent,
};
use netpol_common::{
    FAMILY_V4, PEER_F_HOST, REASON_DEFERRED, REASON_NODE_TRAFFIC, SENDER_TAG, endpoint_key,
    generation_epoch,
};

use crate::{
    events::{coarse_now_ns, count, emit, now_ns},
    maps::{
        NETPOL_CONFIG, NETPOL_ENDPOINTS, NETPOL_FLOWS, NETPOL_FRAGS, NETPOL_LOCAL_ADDRS,
        NETPOL_SCRATCH, NETPOL_SLOTS,
    },
    parse::{
        ETH_HLEN, ETH_P_ARP, Frag, IcmpKind, Packet, ParseError, TCP_ACK, TCP_FIN, TCP_RST,
        TCP_SYN, ethertype, family_of, load, load_into, parse_ip,
    },
    policy::{Stage, decide, peer_flags},
};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Drop,
}

const ICMP6_ROUTER_ADVERT: u8 = 134;
const ICMP6_NEIGHBOR_ADVERT: u8 = 136;
const ICMP6_REDIRECT: u8 = 137;

/// `bpf_map_update_elem` flag: only create, never replace.
const BPF_NOEXIST: u64 = 1;

/// Per-CPU working memory: the parsed packets, flow keys, values and the
/// event do not fit the 512-byte BPF stack together.
#[repr(C)]
pub struct Scratch {
    pub(crate) pkt: Packet,
    inner: Packet,
    pub(crate) key: FlowKey,
    /// The key of the flow an ICMP error quotes.
    rkey: FlowKey,
    value: FlowValue,
    pub(crate) event: VerdictEvent,
    frag: FragKey,
}

/// Handle one packet seen in `direction` (the pod's point of view). Every
/// error path drops.
#[inline(always)]
pub fn handle(ctx: &TcContext, direction: u8) -> Verdict {
    // A packet of an established flow is finished by the fast path
    // (`fast.rs`); anything it does not finish is handled here from the
    // start, as if it had not run.
    let known_miss = match crate::fast::established(ctx, direction) {
        crate::fast::Fast::Pass => return Verdict::Pass,
        crate::fast::Fast::Missed => true,
        crate::fast::Fast::Slow => false,
    };
    let Some(scratch) = NETPOL_SCRATCH.get_ptr_mut(0) else {
        count(direction, REASON_MALFORMED);
        return Verdict::Drop;
    };
    // SAFETY: per-CPU slot; a TC program runs to completion on one CPU
    // without preemption by another run of itself.
    let s = unsafe { &mut *scratch };
    // Read once: every lookup of this packet is in its epoch.
    let cfg = config();
    let r = try_handle(ctx, direction, s, &cfg, known_miss);
    finish(ctx, direction, s, r, &cfg)
}

/// A packet leaving the node through one of its own devices (TC egress of
/// an uplink or tunnel device), after the node's netfilter: kube-proxy's
/// DNAT is done, so the destination is the backend the packet really goes
/// to. A local pod's packet is judged here by that pod's egress policy, as
/// if on its veth; anything else is the node's business.
#[inline(always)]
pub fn handle_post_nat(ctx: &TcContext) -> Verdict {
    let Some(scratch) = NETPOL_SCRATCH.get_ptr_mut(0) else {
        count(DIR_EGRESS, REASON_MALFORMED);
        return Verdict::Drop;
    };
    // SAFETY: as in `handle`.
    let s = unsafe { &mut *scratch };
    let cfg = config();
    let r = try_post_nat(ctx, s, &cfg);
    finish(ctx, DIR_EGRESS, s, r, &cfg)
}

/// The verdict of a handler, with the accounting of its error path: every
/// error drops, counted and reported.
#[inline(always)]
fn finish(
    ctx: &TcContext,
    direction: u8,
    s: &mut Scratch,
    r: Result<Verdict, ParseError>,
    cfg: &ConfigValue,
) -> Verdict {
    match r {
        Ok(v) => v,
        Err(ParseError(reason)) => {
            count(direction, reason);
            let ev = &mut s.event;
            ev.timestamp_ns = now_ns();
            ev.ifindex = ifindex(ctx);
            ev.endpoint_id = 0;
            ev.rule_id = 0;
            ev.peer_identity = 0;
            ev.policy_id = 0;
            ev.packet_len = ctx.len();
            ev.sport = s.pkt.sport;
            ev.dport = s.pkt.dport;
            ev.protocol = s.pkt.protocol;
            ev.family = s.pkt.family;
            ev.direction = direction;
            ev.verdict = VERDICT_DENY;
            ev.reason = reason;
            ev._pad = [0; 7];
            ev.saddr = s.pkt.saddr;
            ev.daddr = s.pkt.daddr;
            emit(ev, cfg.events_per_sec);
            Verdict::Drop
        }
    }
}

#[inline(always)]
fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: the context pointer is valid for the whole program run.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// The packet's `tc_index` (where a pod's veth puts the sender tag).
#[inline(always)]
fn tag_of(ctx: &TcContext) -> u16 {
    // SAFETY: the context pointer is valid for the whole program run.
    unsafe { (*ctx.skb.skb).tc_index as u16 }
}

/// Tag a packet the pod sends with its sender tag (or clear what the pod's
/// own namespace may have put there). Written to `tc_classid`: when a TC
/// program passes a packet the kernel sets `tc_index` from it (TCX's
/// `tcx_action_code`, the classic TC path alike), overwriting whatever a
/// program wrote to `tc_index` itself.
#[inline(always)]
pub(crate) fn set_tag(ctx: &TcContext, tag: u16) {
    // SAFETY: as above; `tc_classid` is writable from TC programs.
    unsafe { (*ctx.skb.skb).tc_classid = u32::from(tag) };
}

/// CONFIG, read once per program run: its generation's top bit is the epoch
/// of every map lookup of the run (see `netpol_common`'s "Epochs").
#[inline(always)]
pub(crate) fn config() -> ConfigValue {
    NETPOL_CONFIG.get(0).copied().unwrap_or_default()
}

/// The endpoint of a veth in the epoch of the run's CONFIG.
#[inline(always)]
pub(crate) fn endpoint(ifindex: u32, cfg: &ConfigValue) -> Option<&'static EndpointValue> {
    let key = endpoint_key(ifindex, generation_epoch(cfg.generation));
    // SAFETY: a map value is valid for the program run.
    unsafe { NETPOL_ENDPOINTS.get(&key) }
}

/// The epoch of the run's CONFIG.
#[inline(always)]
const fn epoch(cfg: &ConfigValue) -> u32 {
    generation_epoch(cfg.generation)
}

#[inline(always)]
const fn flip(direction: u8) -> u8 {
    if direction == DIR_INGRESS {
        DIR_EGRESS
    } else {
        DIR_INGRESS
    }
}

/// The flow's key from the pod's side: the pod is the source of what it
/// sends (`DIR_EGRESS`) and the destination of what it receives.
#[inline(always)]
pub(crate) fn fill_flow_key(k: &mut FlowKey, ifindex: u32, p: &Packet, direction: u8) {
    k.ifindex = ifindex;
    k.protocol = p.protocol;
    k.family = p.family;
    k._pad = [0; 2];
    if direction == DIR_EGRESS {
        k.pod_port = p.sport;
        k.remote_port = p.dport;
        k.pod_addr = p.saddr;
        k.remote_addr = p.daddr;
    } else {
        k.pod_port = p.dport;
        k.remote_port = p.sport;
        k.pod_addr = p.daddr;
        k.remote_addr = p.saddr;
    }
}

#[inline(always)]
fn fill_frag_key(fk: &mut FragKey, ifindex: u32, p: &Packet, direction: u8) {
    fk.ifindex = ifindex;
    fk.id = p.frag_id;
    // An IPv6 later fragment's header names the first header of the
    // fragmentable part, not the upper protocol: key IPv6 datagrams on
    // addresses and id only, as the kernel's reassembly does.
    fk.protocol = if p.family == FAMILY_V6 { 0 } else { p.protocol };
    fk.family = p.family;
    fk.direction = direction;
    fk._pad = 0;
    fk.saddr = p.saddr;
    fk.daddr = p.daddr;
}

/// The remote side of the packet: its source when the pod receives it, its
/// destination when the pod sends it.
#[inline(always)]
fn remote(p: &Packet, direction: u8) -> &[u8; 16] {
    if direction == DIR_INGRESS {
        &p.saddr
    } else {
        &p.daddr
    }
}

/// The verdict of an allowing decision: `audit` when an audited
/// ClusterNetworkPolicy rule would have denied it (`ACTION_AUDIT`).
#[inline(always)]
fn allowed_verdict(d: &crate::policy::Decision) -> u8 {
    if d.reason == REASON_AUDIT {
        VERDICT_AUDIT
    } else {
        VERDICT_ALLOW
    }
}

#[inline(always)]
pub(crate) fn audit(ep: &EndpointValue, cfg: &ConfigValue) -> bool {
    ep.flags & EP_F_AUDIT != 0 || cfg.flags & CFG_F_AUDIT_ALL != 0
}

/// Fill `s.event` from the packet and send it (rate-limited).
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "flat for the verifier")]
pub(crate) fn send_event(
    s: &mut Scratch,
    cfg: &ConfigValue,
    ifindex: u32,
    direction: u8,
    ep: &EndpointValue,
    verdict: u8,
    reason: u8,
    rule_id: u32,
    peer_identity: u32,
    len: u32,
    now: u64,
) {
    let ev = &mut s.event;
    let p = &s.pkt;
    ev.timestamp_ns = now;
    ev.ifindex = ifindex;
    ev.endpoint_id = ep.endpoint_id;
    ev.rule_id = rule_id;
    ev.peer_identity = peer_identity;
    ev.policy_id = ep.policy_id;
    ev.packet_len = len;
    ev.sport = p.sport;
    ev.dport = p.dport;
    ev.protocol = p.protocol;
    ev.family = p.family;
    ev.direction = direction;
    ev.verdict = verdict;
    ev.reason = reason;
    ev._pad = [0; 7];
    ev.saddr = p.saddr;
    ev.daddr = p.daddr;
    emit(ev, cfg.events_per_sec);
}

#[inline(always)]
fn try_handle(
    ctx: &TcContext,
    direction: u8,
    s: &mut Scratch,
    cfg: &ConfigValue,
    known_miss: bool,
) -> Result<Verdict, ParseError> {
    // Start from a clean packet so that an early error reports zeros, not
    // the previous packet's addresses.
    s.pkt.family = 0;
    s.pkt.protocol = 0;
    s.pkt.sport = 0;
    s.pkt.dport = 0;
    s.pkt.saddr = [0; 16];
    s.pkt.daddr = [0; 16];

    // SAFETY: the context pointer is valid for the whole program run.
    if unsafe { (*ctx.skb.skb).vlan_present } != 0 {
        // A VLAN tag the device carries out of band (veths offload it): the
        // frame's data looks untagged, but a bridge forwards it tagged. Fail
        // closed, as for an in-band tag.
        return Err(ParseError(REASON_UNSUPPORTED_ETHERTYPE));
    }
    if direction == DIR_EGRESS {
        // Only this program says who sent a packet: nothing the pod's own
        // namespace set survives its veth.
        set_tag(ctx, 0);
    }
    let ethertype = ethertype(ctx)?;
    let ifindex = ifindex(ctx);
    let Some(family) = family_of(ethertype) else {
        if ethertype == ETH_P_ARP {
            if direction == DIR_EGRESS {
                arp_from_pod(ctx, ifindex, cfg)?;
            }
            // ARP is not IP: NetworkPolicy does not apply to it, and without
            // it no IPv4 traffic (allowed or not) could flow at all. What a
            // pod says in it is its own address and MAC (checked above).
            count(direction, REASON_NOT_IP);
            return Ok(Verdict::Pass);
        }
        // VLAN, QinQ, MPLS, PPPoE, ... can carry IP past the policy check
        // (a Linux bridge forwards tagged frames): fail closed.
        return Err(ParseError(REASON_UNSUPPORTED_ETHERTYPE));
    };

    parse_ip(ctx, family, ETH_HLEN, false, &mut s.pkt)?;

    if s.pkt.icmp == IcmpKind::NeighborDiscovery {
        // IPv6 neighbour discovery and MLD are the link's own control plane
        // (the IPv6 equivalent of ARP): without them no IPv6 traffic could
        // flow at all. Only what RFC 4861/2710 lets a link carry passes, and
        // a pod speaks only for itself and is no router.
        neighbor_discovery(ctx, &s.pkt, ifindex, direction, cfg)?;
        count(direction, REASON_NEIGHBOR_DISCOVERY);
        return Ok(Verdict::Pass);
    }

    flow_path(
        ctx,
        s,
        ifindex,
        direction,
        family,
        Stage::Veth,
        cfg,
        known_miss,
    )
}

/// The local pod that sent a packet, by its source address: the ifindex of
/// its veth (its endpoint key). Anti-spoofing on every pod veth makes the
/// answer trustworthy: only the pod (or the node itself) sends from it.
#[inline(always)]
pub(crate) fn local_sender(family: u8, saddr: &[u8; 16]) -> Option<u32> {
    let key = LocalKey::new(family, *saddr);
    unsafe { NETPOL_LOCAL_ADDRS.get(&key) }.copied()
}

/// The local pod that sent a packet seen after the DNAT: by the tag its veth
/// wrote (which survives kube-proxy's masquerade), believed only when the
/// source is that pod's address or one of this node's own (masqueraded),
/// else by the source address.
#[inline(always)]
fn tagged_sender(tag: u16, family: u8, saddr: &[u8; 16], cfg: &ConfigValue) -> Option<u32> {
    if tag & SENDER_TAG != 0
        && let Some(&ifp) = NETPOL_SLOTS.get(u32::from(tag & !SENDER_TAG))
        && ifp != 0
        && let Some(ep) = endpoint(ifp, cfg)
    {
        let own = if family == FAMILY_V6 {
            ep.flags & EP_F_HAS_V6 != 0 && eq16(saddr, &ep.addr_v6)
        } else {
            ep.flags & EP_F_HAS_V4 != 0 && eq4(saddr, &ep.addr_v4)
        };
        if own || peer_flags(epoch(cfg), family, saddr) & PEER_F_HOST != 0 {
            return Some(ifp);
        }
    }
    epoch_sender(family, saddr, cfg)
}

/// What `epoch_sender` answers for a local pod's address whose veth, in the
/// epoch the run reads, has no endpoint carrying that address. No device
/// has ifindex 0, so no endpoint either: callers drop as `no_endpoint`.
const UNKNOWN_SENDER: u32 = 0;

/// `local_sender`, believed only when the sender's endpoint in the run's
/// epoch carries the address. `NETPOL_LOCAL_ADDRS` is written in place,
/// outside the epochs (see the agent's `epoch` module): it may name the
/// address's veth in the other state. Then the state this run reads drops
/// whatever sends from the address (its veth's own program would), or the
/// other state does: `UNKNOWN_SENDER`, and the caller drops.
#[inline(always)]
fn epoch_sender(family: u8, saddr: &[u8; 16], cfg: &ConfigValue) -> Option<u32> {
    let ifp = local_sender(family, saddr)?;
    match endpoint(ifp, cfg) {
        Some(ep) if carries(ep, family, saddr) => Some(ifp),
        _ => Some(UNKNOWN_SENDER),
    }
}

/// Whether an endpoint has `addr` as its pod's address.
#[inline(always)]
pub(crate) fn carries(ep: &EndpointValue, family: u8, addr: &[u8; 16]) -> bool {
    if family == FAMILY_V6 {
        ep.flags & EP_F_HAS_V6 != 0 && eq16(addr, &ep.addr_v6)
    } else {
        ep.flags & EP_F_HAS_V4 != 0 && eq4(addr, &ep.addr_v4)
    }
}

#[inline(always)]
fn try_post_nat(
    ctx: &TcContext,
    s: &mut Scratch,
    cfg: &ConfigValue,
) -> Result<Verdict, ParseError> {
    s.pkt.family = 0;
    s.pkt.protocol = 0;
    s.pkt.sport = 0;
    s.pkt.dport = 0;
    s.pkt.saddr = [0; 16];
    s.pkt.daddr = [0; 16];
    // What is not a local pod's IP packet passes: the node's own traffic,
    // traffic routed through the node, tunnels' outer packets. NetworkPolicy
    // does not apply to them, and the node's connectivity must not depend
    // on this parser.
    let Ok(ethertype) = ethertype(ctx) else {
        count(DIR_EGRESS, REASON_NODE_TRAFFIC);
        return Ok(Verdict::Pass);
    };
    let Some(family) = family_of(ethertype) else {
        count(DIR_EGRESS, REASON_NODE_TRAFFIC);
        return Ok(Verdict::Pass);
    };
    // The source address first: most packets on a node's device are not a
    // local pod's, and need no more than this one lookup.
    let mut saddr = [0u8; 16];
    let read = if family == FAMILY_V4 {
        load::<[u8; 4], _>(ctx, ETH_HLEN + 12).map(|a| {
            saddr[0] = a[0];
            saddr[1] = a[1];
            saddr[2] = a[2];
            saddr[3] = a[3];
        })
    } else {
        load_into(ctx, ETH_HLEN + 8, &mut saddr)
    };
    let sender = match read {
        Ok(()) => tagged_sender(tag_of(ctx), family, &saddr, cfg),
        Err(_) => None,
    };
    let Some(ifindex) = sender else {
        count(DIR_EGRESS, REASON_NODE_TRAFFIC);
        return Ok(Verdict::Pass);
    };
    // A local pod's packet: from here on, what does not parse is dropped.
    parse_ip(ctx, family, ETH_HLEN, false, &mut s.pkt)?;
    // Whatever is decided below: the uplink's XDP program must know that a
    // reply may come (see `crate::xdp::record_sent`).
    crate::xdp::record_sent(&s.pkt);
    if s.pkt.icmp == IcmpKind::NeighborDiscovery {
        // Checked on the pod's veth; never routed.
        count(DIR_EGRESS, REASON_NEIGHBOR_DISCOVERY);
        return Ok(Verdict::Pass);
    }
    flow_path(
        ctx,
        s,
        ifindex,
        DIR_EGRESS,
        family,
        Stage::PostNat,
        cfg,
        false,
    )
}

/// The flow table and, for a new flow, the policy: for the endpoint on
/// `ifindex` (the pod's veth, also when `stage` is `PostNat` and the packet
/// is seen on another device). `known_miss`: the fast path looked this very
/// key up in this run and found no entry.
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "flat for the verifier")]
fn flow_path(
    ctx: &TcContext,
    s: &mut Scratch,
    ifindex: u32,
    direction: u8,
    family: u8,
    stage: Stage,
    cfg: &ConfigValue,
    known_miss: bool,
) -> Result<Verdict, ParseError> {
    let cfg = *cfg;
    let len = ctx.len();

    if s.pkt.frag == Frag::Later {
        return later_fragment(s, ifindex, direction, &cfg, len, stage, tag_of(ctx));
    }

    fill_flow_key(&mut s.key, ifindex, &s.pkt, direction);
    let found = if known_miss {
        None
    } else {
        NETPOL_FLOWS.get_ptr_mut(&s.key)
    };
    if let Some(f) = found {
        // SAFETY: the entry stays valid for this program run; the fields
        // written below are counters and idempotent stores.
        let f = unsafe { &mut *f };
        if stage == Stage::PostNat && f.reason == REASON_DEFERRED {
            // The pod's veth deferred this flow and no DNAT changed it (no
            // kube-proxy, or a local address without a NodePort): this is
            // the post-DNAT point, where it is decided.
            let _ = NETPOL_FLOWS.remove(&s.key);
            return new_flow(ctx, s, ifindex, direction, family, &cfg, len, stage);
        }
        // Idle time only needs coarse precision: the cheaper clock.
        let now = coarse_now_ns();
        // The coarse clock can lag the precise one the entry was created with
        // by a tick: a "negative" idle time is no idle time.
        if now.saturating_sub(f.last_seen_ns) > idle_timeout_ns(f, s.key.protocol, &cfg) {
            // Idle past its timeout (or closed and idle past the closing
            // timeout): forget it, and judge this packet as new.
            let _ = NETPOL_FLOWS.remove(&s.key);
            count(direction, REASON_EXPIRED);
            return new_flow(ctx, s, ifindex, direction, family, &cfg, len, stage);
        }
        if f.state == FLOW_S_CLOSING && s.pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
            // A new connection on the 5-tuple of a closed one: a new flow,
            // decided (and logged) as such.
            let _ = NETPOL_FLOWS.remove(&s.key);
            count(direction, REASON_EXPIRED);
            return new_flow(ctx, s, ifindex, direction, family, &cfg, len, stage);
        }
        if s.pkt.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            f.state = FLOW_S_CLOSING;
        }
        if stage == Stage::Veth && direction == DIR_EGRESS {
            set_tag(ctx, f.sender_tag);
        }
        if f.generation == cfg.generation {
            f.last_seen_ns = now;
            bump_flow(f, direction, len);
            let verdict = f.verdict;
            let reply = f.origin != direction;
            if s.pkt.frag == Frag::First {
                record_first_fragment(s, ifindex, direction, verdict, &cfg);
            }
            count(
                direction,
                if reply {
                    REASON_REPLY
                } else {
                    REASON_ESTABLISHED
                },
            );
            return Ok(Verdict::Pass);
        }
        let v = recheck(s, ifindex, direction, f, &cfg, len, stage, tag_of(ctx));
        if s.pkt.frag == Frag::First {
            let verdict = if v == Verdict::Pass {
                f.verdict
            } else {
                VERDICT_DENY
            };
            record_first_fragment(s, ifindex, direction, verdict, &cfg);
        }
        return Ok(v);
    }
    new_flow(ctx, s, ifindex, direction, family, &cfg, len, stage)
}

/// 16 bytes equal, as two 64-bit words (no `memcmp` in BPF).
#[inline(always)]
fn eq16(a: &[u8; 16], b: &[u8; 16]) -> bool {
    // SAFETY: both are 16 readable bytes.
    let (a, b) = unsafe {
        (
            core::ptr::read_unaligned(a.as_ptr().cast::<[u64; 2]>()),
            core::ptr::read_unaligned(b.as_ptr().cast::<[u64; 2]>()),
        )
    };
    a[0] == b[0] && a[1] == b[1]
}

/// The first four bytes of `a` (an IPv4 address in a 16-byte slot) are `b`.
#[inline(always)]
fn eq4(a: &[u8; 16], b: &[u8; 4]) -> bool {
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3]
}

#[inline(always)]
fn eq6(a: &[u8; 6], b: &[u8; 6]) -> bool {
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4] && a[5] == b[5]
}

#[inline(always)]
fn link_local6(a: &[u8; 16]) -> bool {
    a[0] == 0xfe && a[1] & 0xc0 == 0x80
}

/// The frame's source MAC is the pod's, when the agent knows it.
#[inline(always)]
fn mac_is_pods(ctx: &TcContext, ep: &EndpointValue) -> Result<bool, ParseError> {
    if ep.flags & EP_F_HAS_MAC == 0 {
        return Ok(true);
    }
    let src: [u8; 6] = load(ctx, 6)?;
    Ok(eq6(&src, &ep.mac))
}

/// An IP packet from the pod carries the pod's source address.
#[inline(always)]
fn sent_by_pod(p: &Packet, ep: &EndpointValue) -> bool {
    if p.family == FAMILY_V6 {
        ep.flags & EP_F_HAS_V6 != 0 && eq16(&p.saddr, &ep.addr_v6)
    } else {
        ep.flags & EP_F_HAS_V4 != 0 && eq4(&p.saddr, &ep.addr_v4)
    }
}

/// A packet for the pod is addressed to it, or to a group it may be in
/// (multicast, IPv4 limited broadcast). A unicast packet for another address
/// reached this veth through a poisoned neighbour cache: not the pod's.
#[inline(always)]
fn for_pod(p: &Packet, ep: &EndpointValue) -> bool {
    let d = &p.daddr;
    if p.family == FAMILY_V6 {
        d[0] == 0xff || (ep.flags & EP_F_HAS_V6 != 0 && eq16(d, &ep.addr_v6))
    } else {
        d[0] & 0xf0 == 0xe0
            || (d[0] == 255 && d[1] == 255 && d[2] == 255 && d[3] == 255)
            || (ep.flags & EP_F_HAS_V4 != 0 && eq4(d, &ep.addr_v4))
    }
}

/// ARP from the pod: Ethernet/IPv4 ARP whose sender is the pod (its IPv4
/// address, or 0.0.0.0 in a probe) with the pod's MAC. A gratuitous ARP
/// claiming another pod's or the gateway's address is spoofing.
#[inline(always)]
fn arp_from_pod(ctx: &TcContext, ifindex: u32, cfg: &ConfigValue) -> Result<(), ParseError> {
    let Some(ep) = endpoint(ifindex, cfg) else {
        return Err(ParseError(REASON_NO_ENDPOINT));
    };
    // htype 1 (Ethernet), ptype 0x0800 (IPv4), hlen 6, plen 4.
    let hdr: [u8; 6] = load(ctx, ETH_HLEN)?;
    if hdr[0] != 0 || hdr[1] != 1 || hdr[2] != 0x08 || hdr[3] != 0 || hdr[4] != 6 || hdr[5] != 4 {
        return Err(ParseError(REASON_MALFORMED));
    }
    let sha: [u8; 6] = load(ctx, ETH_HLEN + 8)?;
    let spa: [u8; 4] = load(ctx, ETH_HLEN + 14)?;
    let probe = spa[0] == 0 && spa[1] == 0 && spa[2] == 0 && spa[3] == 0;
    let own = ep.flags & EP_F_HAS_V4 != 0
        && spa[0] == ep.addr_v4[0]
        && spa[1] == ep.addr_v4[1]
        && spa[2] == ep.addr_v4[2]
        && spa[3] == ep.addr_v4[3];
    let mac_ok = ep.flags & EP_F_HAS_MAC == 0 || eq6(&sha, &ep.mac);
    if !(probe || own) || !mac_ok || !mac_is_pods(ctx, ep)? {
        return Err(ParseError(REASON_SPOOFED));
    }
    Ok(())
}

/// Neighbour discovery and MLD: hop limit 255 for ND (RFC 4861: anything
/// else came from off-link or is meant to leave it), 1 for MLD (RFC 2710).
/// From a pod: no router advertisements or redirects, a source that is the
/// pod's (link-local, unspecified for DAD, or its address), a neighbour
/// advertisement only for its own address, and its own MAC.
#[inline(always)]
fn neighbor_discovery(
    ctx: &TcContext,
    p: &Packet,
    ifindex: u32,
    direction: u8,
    cfg: &ConfigValue,
) -> Result<(), ParseError> {
    let ty = p.icmp_type;
    let mld = matches!(ty, 130..=132 | 143);
    if (mld && p.hop_limit != 1) || (!mld && p.hop_limit != 255) {
        return Err(ParseError(REASON_ND_INVALID));
    }
    if direction != DIR_EGRESS {
        return Ok(());
    }
    if ty == ICMP6_ROUTER_ADVERT || ty == ICMP6_REDIRECT {
        return Err(ParseError(REASON_ROGUE_ROUTER));
    }
    // On the link: a link-local or multicast destination, the node (the
    // pod's gateway, unicast neighbour unreachability detection) or another
    // pod of this node (a bridged neighbour). A "neighbour solicitation" to
    // any other address would be routed off the link: a data channel, not
    // neighbour discovery.
    let d = &p.daddr;
    if !(link_local6(d)
        || d[0] == 0xff
        || peer_flags(epoch(cfg), FAMILY_V6, d) & PEER_F_HOST != 0
        || local_sender(FAMILY_V6, d).is_some())
    {
        return Err(ParseError(REASON_ND_INVALID));
    }
    let Some(ep) = endpoint(ifindex, cfg) else {
        return Err(ParseError(REASON_NO_ENDPOINT));
    };
    let unspecified = p.saddr[0] == 0 && eq16(&p.saddr, &[0; 16]);
    let own_source = link_local6(&p.saddr)
        || unspecified
        || (ep.flags & EP_F_HAS_V6 != 0 && eq16(&p.saddr, &ep.addr_v6));
    if !own_source || !mac_is_pods(ctx, ep)? {
        return Err(ParseError(REASON_SPOOFED));
    }
    if ty == ICMP6_NEIGHBOR_ADVERT {
        let mut target = [0u8; 16];
        load_into(ctx, p.l4_off + 8, &mut target)?;
        let own_target =
            link_local6(&target) || (ep.flags & EP_F_HAS_V6 != 0 && eq16(&target, &ep.addr_v6));
        if !own_target {
            return Err(ParseError(REASON_SPOOFED));
        }
    }
    Ok(())
}

/// An ICMP error is related to a flow (and passes without a policy decision,
/// so path MTU discovery works) only if it is what such an error looks like:
/// no longer than an error may be (576 bytes IPv4, 1280 IPv6: a bounded
/// quote, not a data channel), addressed to the quoted packet's sender and
/// sent by its destination (or by a router on the path, see below), about a
/// flow this endpoint has under the current policy (a revoked flow has no
/// related errors). Anything else is judged by policy as traffic of its own.
#[inline(always)]
fn related_error(
    ctx: &TcContext,
    s: &mut Scratch,
    ifindex: u32,
    direction: u8,
    family: u8,
    cfg: &ConfigValue,
) -> bool {
    let max = if family == FAMILY_V6 { 1280 } else { 576 };
    if s.pkt.l3_end - ETH_HLEN > max {
        return false;
    }
    if parse_ip(ctx, family, s.pkt.l4_off + 8, true, &mut s.inner).is_err() {
        return false;
    }
    // The error goes to the quoted packet's sender...
    if !eq16(&s.inner.saddr, &s.pkt.daddr) {
        return false;
    }
    // ...from its destination, or, for an error reaching the pod, from a
    // router on the path (packet too big, time exceeded): a node or any
    // address that is not a pod. A pod is no router: another pod "reporting"
    // on this pod's flow is a forgery. A pod sends errors only to the flow's
    // far end: never "about its DNS flow" to a third host.
    if !eq16(&s.inner.daddr, &s.pkt.saddr)
        && (direction == DIR_EGRESS
            || peer_flags(epoch(cfg), family, &s.pkt.saddr) & PEER_F_POD != 0)
    {
        return false;
    }
    // The quoted packet travelled the other way through this endpoint.
    fill_flow_key(&mut s.rkey, ifindex, &s.inner, flip(direction));
    unsafe { NETPOL_FLOWS.get(&s.rkey) }.is_some_and(|f| {
        f.generation == cfg.generation && (f.verdict == VERDICT_ALLOW || f.verdict == VERDICT_AUDIT)
    })
}

/// The idle timeout of a flow entry: by protocol, and short once closing.
#[inline(always)]
pub(crate) fn idle_timeout_ns(f: &FlowValue, protocol: u8, cfg: &ConfigValue) -> u64 {
    let or = |v: u32, default: u32| if v == 0 { default } else { v };
    let secs = if protocol == PROTO_TCP {
        if f.state == FLOW_S_CLOSING {
            or(cfg.timeout_tcp_closing_s, DEFAULT_TIMEOUT_TCP_CLOSING_S)
        } else {
            or(cfg.timeout_tcp_s, DEFAULT_TIMEOUT_TCP_S)
        }
    } else if protocol == PROTO_ICMP || protocol == PROTO_ICMPV6 {
        or(cfg.timeout_icmp_s, DEFAULT_TIMEOUT_ICMP_S)
    } else {
        or(cfg.timeout_udp_s, DEFAULT_TIMEOUT_UDP_S)
    };
    secs as u64 * 1_000_000_000
}

/// A later fragment has no L4 header: it follows the verdict of its
/// datagram's first fragment. One whose first was never seen (or was denied)
/// is dropped, so no fragment ordering lets a denied datagram through; one
/// whose first was decided under an older policy generation follows only a
/// flow that is still allowed now.
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "flat for the verifier")]
fn later_fragment(
    s: &mut Scratch,
    ifindex: u32,
    direction: u8,
    cfg: &ConfigValue,
    len: u32,
    stage: Stage,
    tag: u16,
) -> Result<Verdict, ParseError> {
    fill_frag_key(&mut s.frag, ifindex, &s.pkt, direction);
    let Some(fv) = NETPOL_FRAGS.get_ptr_mut(&s.frag) else {
        return Err(ParseError(REASON_FRAGMENT_UNKNOWN));
    };
    // SAFETY: valid for this program run.
    let fv = unsafe { &mut *fv };
    if fv.verdict != VERDICT_ALLOW && fv.verdict != VERDICT_AUDIT {
        return Err(ParseError(REASON_FRAGMENT_UNKNOWN));
    }
    if fv.generation != cfg.generation {
        // The datagram's flow, as its first fragment's ports name it: it
        // decides, re-checked under the current policy if need be.
        s.pkt.protocol = fv.protocol;
        s.pkt.sport = fv.sport;
        s.pkt.dport = fv.dport;
        fill_flow_key(&mut s.key, ifindex, &s.pkt, direction);
        let Some(f) = NETPOL_FLOWS.get_ptr_mut(&s.key) else {
            return Err(ParseError(REASON_FRAGMENT_STALE));
        };
        // SAFETY: valid for this program run.
        let f = unsafe { &mut *f };
        if f.generation != cfg.generation
            && recheck(s, ifindex, direction, f, cfg, len, stage, tag) != Verdict::Pass
        {
            return Ok(Verdict::Drop);
        }
        fv.generation = cfg.generation;
    }
    count(direction, REASON_FRAGMENT_FOLLOWS);
    Ok(Verdict::Pass)
}

/// A packet with no (live) flow entry: endpoint, policy, and for an allowed
/// flow-opening packet a new entry.
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "flat for the verifier")]
fn new_flow(
    ctx: &TcContext,
    s: &mut Scratch,
    ifindex: u32,
    direction: u8,
    family: u8,
    cfg: &ConfigValue,
    len: u32,
    stage: Stage,
) -> Result<Verdict, ParseError> {
    let cfg = *cfg;
    let now = now_ns();
    let ep_ptr = endpoint(ifindex, &cfg);
    if stage == Stage::Veth
        && let Some(ep) = ep_ptr
    {
        // Before anything is decided or recorded: the pod speaks only from
        // its own address and MAC, and hears only what is addressed to it.
        // The flow table, keyed on the pod's address, then never holds an
        // entry for an address that is not the pod's.
        if direction == DIR_EGRESS {
            if !sent_by_pod(&s.pkt, ep) || !mac_is_pods(ctx, ep)? {
                return Err(ParseError(REASON_SPOOFED));
            }
        } else if !for_pod(&s.pkt, ep) {
            return Err(ParseError(REASON_NOT_POD_ADDRESS));
        }
    }
    if stage == Stage::Veth
        && direction == DIR_EGRESS
        && let Some(ep) = ep_ptr
    {
        set_tag(ctx, ep.slot | SENDER_TAG);
    }
    let Some(ep) = ep_ptr.copied() else {
        // Programs are attached but the agent has not (or no longer) told
        // the datapath which pod this is: fail closed.
        send_event(
            s,
            &cfg,
            ifindex,
            direction,
            &EndpointValue::default(),
            VERDICT_DENY,
            REASON_NO_ENDPOINT,
            0,
            0,
            len,
            now,
        );
        count(direction, REASON_NO_ENDPOINT);
        return Ok(Verdict::Drop);
    };

    if s.pkt.icmp == IcmpKind::Error && related_error(ctx, s, ifindex, direction, family, &cfg) {
        count(direction, REASON_ICMP_ERROR_RELATED);
        return Ok(Verdict::Pass);
    }

    let d = decide(
        &ep,
        direction,
        s.pkt.family,
        remote(&s.pkt, direction),
        s.pkt.protocol,
        s.pkt.dport,
        stage,
    );
    let (verdict, reason) = if d.allow {
        (allowed_verdict(&d), d.reason)
    } else if audit(&ep, &cfg) {
        (VERDICT_AUDIT, REASON_AUDIT)
    } else if s.pkt.icmp == IcmpKind::Error {
        (VERDICT_DENY, REASON_ICMP_ERROR_UNRELATED)
    } else {
        (VERDICT_DENY, d.reason)
    };
    if verdict != VERDICT_DENY
        && direction == DIR_INGRESS
        && stage == Stage::Veth
        && sender_denies(s, &cfg, len, now, tag_of(ctx))
    {
        return Ok(Verdict::Drop);
    }
    // The endpoint's share of the flow table (quota.rs): a packet that would
    // open an entry beyond it is refused, never another pod's flow evicted.
    let (verdict, reason) = crate::quota::gate(&s.key, &s.pkt, verdict, reason, &cfg);
    if reason != REASON_DEFERRED && (verdict != VERDICT_ALLOW || cfg.flags & CFG_F_LOG_ALLOWED != 0)
    {
        send_event(
            s,
            &cfg,
            ifindex,
            direction,
            &ep,
            verdict,
            reason,
            d.rule_id,
            d.peer_identity,
            len,
            now,
        );
    }
    count(direction, reason);
    if verdict == VERDICT_DENY {
        if s.pkt.frag == Frag::First {
            // Later fragments of a denied datagram must not follow an older
            // allow recorded under a reused id.
            record_first_fragment(s, ifindex, direction, VERDICT_DENY, &cfg);
        }
        return Ok(Verdict::Drop);
    }
    if s.pkt.protocol == PROTO_TCP && s.pkt.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        // Only a SYN opens a TCP flow. Anything else without an entry (an
        // ACK, a RST, a forged SYN-ACK "reply") was judged in its own
        // direction just above and passes on its own merits, but opens no
        // entry: it must never give the other side a reply path.
        count(direction, REASON_TCP_NO_FLOW);
        return Ok(Verdict::Pass);
    }
    if s.pkt.icmp != IcmpKind::Error {
        // One entry serves both directions of travel. If the table is full
        // the LRU evicts the least recently used flow as a whole; its next
        // packet is decided again as a new flow (a reply of an evicted flow
        // is then judged as traffic of its own: fail closed).
        let v = &mut s.value;
        fresh_flow(v, now, &cfg, &ep, d.rule_id, verdict, reason, direction);
        bump_flow(v, direction, len);
        // BPF_NOEXIST: a packet of the other direction that created the
        // entry a moment earlier on another CPU keeps its origin.
        let _ = NETPOL_FLOWS.insert(&s.key, &s.value, BPF_NOEXIST);
    }
    if s.pkt.frag == Frag::First {
        record_first_fragment(s, ifindex, direction, verdict, &cfg);
    }
    Ok(Verdict::Pass)
}

/// After the DNAT, on a local pod's veth: a new flow from another local pod.
/// The sender's veth may have deferred its egress verdict (it dialled a
/// Service address and kube-proxy chose this pod): the sender's egress policy
/// decides now, against this pod, its address and the port the packet is
/// really sent to. A sender that dialled this pod's own address was judged
/// the same way on its veth already: the same answer. Returns whether the
/// sender's egress denies (counted and reported from the sender's side).
#[inline(always)]
fn sender_denies(s: &mut Scratch, cfg: &ConfigValue, len: u32, now: u64, tag: u16) -> bool {
    let family = s.pkt.family;
    let Some(src_if) = tagged_sender(tag, family, &s.pkt.saddr, cfg) else {
        return false;
    };
    let Some(src_ep) = endpoint(src_if, cfg).copied() else {
        // A local pod's packet whose sender has no endpoint (carrying its
        // address) in the epoch this run reads: its own veth would drop it
        // under this state (see `epoch_sender`). Never trust a verdict the
        // sender's veth took in another epoch.
        send_event(
            s,
            cfg,
            src_if,
            DIR_EGRESS,
            &EndpointValue::default(),
            VERDICT_DENY,
            REASON_NO_ENDPOINT,
            0,
            0,
            len,
            now,
        );
        count(DIR_EGRESS, REASON_NO_ENDPOINT);
        return true;
    };
    let d = decide(
        &src_ep,
        DIR_EGRESS,
        family,
        &s.pkt.daddr,
        s.pkt.protocol,
        s.pkt.dport,
        Stage::PostNat,
    );
    if d.allow {
        return false;
    }
    let audited = audit(&src_ep, cfg);
    let (verdict, reason) = if audited {
        (VERDICT_AUDIT, REASON_AUDIT)
    } else {
        (VERDICT_DENY, d.reason)
    };
    send_event(
        s,
        cfg,
        src_if,
        DIR_EGRESS,
        &src_ep,
        verdict,
        reason,
        0,
        d.peer_identity,
        len,
        now,
    );
    count(DIR_EGRESS, reason);
    !audited
}

/// `sender_denies` for a known flow under a newer policy generation: the
/// flow into this pod (`s.key`, opened to `port`) came from another local
/// pod whose egress no longer allows it.
#[inline(always)]
fn sender_revoked(s: &mut Scratch, cfg: &ConfigValue, port: u16, tag: u16) -> bool {
    let family = s.key.family;
    let Some(src_if) = tagged_sender(tag, family, &s.key.remote_addr, cfg) else {
        return false;
    };
    // No endpoint (carrying the address) in this epoch: revoked, as in
    // `sender_denies`.
    let Some(src_ep) = endpoint(src_if, cfg).copied() else {
        return true;
    };
    let d = decide(
        &src_ep,
        DIR_EGRESS,
        family,
        &s.key.pod_addr,
        s.key.protocol,
        port,
        Stage::PostNat,
    );
    !d.allow && !audit(&src_ep, cfg)
}

const SK_DROP: u32 = 0;
const SK_PASS: u32 = 1;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// sk_lookup in the node's network namespace: a TCP connection (its SYN) or
/// a UDP datagram about to be delivered to a socket on the node, after
/// kube-proxy's DNAT. From a local pod it is judged by that pod's egress
/// policy against the node address and port it really reaches (a
/// hostNetwork backend, a NodePort served on the node, a node service).
/// Anything else is the node's own business and passes.
#[inline(always)]
pub fn local_in(ctx: &SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // SAFETY: the context is valid for the whole run; each read is a load of
    // one field, of that field's size, which the verifier allows.
    let (family_raw, protocol) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*l).family),
            core::ptr::read_volatile(&raw const (*l).protocol),
        )
    };
    let family = match family_raw {
        AF_INET => FAMILY_V4,
        AF_INET6 => FAMILY_V6,
        _ => return SK_PASS,
    };
    let mut remote = [0u8; 16];
    let mut local = [0u8; 16];
    if family == FAMILY_V4 {
        // SAFETY: as above.
        let (r, lo) = unsafe {
            (
                core::ptr::read_volatile(&raw const (*l).remote_ip4).to_ne_bytes(),
                core::ptr::read_volatile(&raw const (*l).local_ip4).to_ne_bytes(),
            )
        };
        remote[0] = r[0];
        remote[1] = r[1];
        remote[2] = r[2];
        remote[3] = r[3];
        local[0] = lo[0];
        local[1] = lo[1];
        local[2] = lo[2];
        local[3] = lo[3];
    } else {
        let mut i = 0;
        while i < 4 {
            // SAFETY: as above; i < 4.
            let (r, lo) = unsafe {
                (
                    core::ptr::read_volatile(&raw const (*l).remote_ip6[i]).to_ne_bytes(),
                    core::ptr::read_volatile(&raw const (*l).local_ip6[i]).to_ne_bytes(),
                )
            };
            remote[4 * i] = r[0];
            remote[4 * i + 1] = r[1];
            remote[4 * i + 2] = r[2];
            remote[4 * i + 3] = r[3];
            local[4 * i] = lo[0];
            local[4 * i + 1] = lo[1];
            local[4 * i + 2] = lo[2];
            local[4 * i + 3] = lo[3];
            i += 1;
        }
    }
    let Some(ifindex) = local_sender(family, &remote) else {
        count(DIR_EGRESS, REASON_NODE_TRAFFIC);
        return SK_PASS;
    };
    // From here on the packet is a local pod's: every failure drops.
    // SAFETY: as above.
    let (remote_port, local_port) = unsafe {
        (
            u16::from_be(core::ptr::read_volatile(&raw const (*l).remote_port)),
            core::ptr::read_volatile(&raw const (*l).local_port) as u16,
        )
    };
    let Some(scratch) = NETPOL_SCRATCH.get_ptr_mut(0) else {
        count(DIR_EGRESS, REASON_MALFORMED);
        return SK_DROP;
    };
    // SAFETY: per-CPU slot, as in `handle`.
    let s = unsafe { &mut *scratch };
    s.pkt.family = family;
    s.pkt.protocol = protocol as u8;
    s.pkt.saddr = remote;
    s.pkt.daddr = local;
    s.pkt.sport = remote_port;
    s.pkt.dport = local_port;
    let cfg = config();
    fill_flow_key(&mut s.key, ifindex, &s.pkt, DIR_EGRESS);
    if let Some(f) = unsafe { NETPOL_FLOWS.get(&s.key) } {
        if f.origin == DIR_INGRESS {
            // A reply to a flow the node opened to the pod (an unconnected
            // UDP socket on the node): replies pass statefully; the pod's
            // veth re-checks the flow itself.
            count(DIR_EGRESS, REASON_REPLY);
            return SK_PASS;
        }
        if f.reason != REASON_DEFERRED
            && f.generation == cfg.generation
            && (f.verdict == VERDICT_ALLOW || f.verdict == VERDICT_AUDIT)
        {
            count(DIR_EGRESS, REASON_ESTABLISHED);
            return SK_PASS;
        }
    }
    let now = now_ns();
    // The address's veth must carry it in this run's epoch (see
    // `epoch_sender`): else no pod sends from it under this state.
    let Some(ep) = endpoint(ifindex, &cfg)
        .copied()
        .filter(|ep| carries(ep, family, &s.pkt.saddr))
    else {
        count(DIR_EGRESS, REASON_NO_ENDPOINT);
        return SK_DROP;
    };
    let d = decide(
        &ep,
        DIR_EGRESS,
        family,
        &s.pkt.daddr,
        s.pkt.protocol,
        s.pkt.dport,
        Stage::PostNat,
    );
    let (verdict, reason) = if d.allow {
        (allowed_verdict(&d), d.reason)
    } else if audit(&ep, &cfg) {
        (VERDICT_AUDIT, REASON_AUDIT)
    } else {
        (VERDICT_DENY, d.reason)
    };
    if verdict != VERDICT_ALLOW || cfg.flags & CFG_F_LOG_ALLOWED != 0 {
        send_event(
            s,
            &cfg,
            ifindex,
            DIR_EGRESS,
            &ep,
            verdict,
            reason,
            d.rule_id,
            d.peer_identity,
            0,
            now,
        );
    }
    count(DIR_EGRESS, reason);
    if verdict == VERDICT_DENY {
        // A deferred entry of the pod's veth for this very 5-tuple (no DNAT)
        // must not let the next datagram through as "established".
        let _ = NETPOL_FLOWS.remove(&s.key);
        return SK_DROP;
    }
    // Recorded (replacing the veth's deferred entry for the same 5-tuple):
    // the next datagrams of a UDP flow cost one lookup here, and a policy
    // change re-decides them.
    fresh_flow(
        &mut s.value,
        now,
        &cfg,
        &ep,
        d.rule_id,
        verdict,
        reason,
        DIR_EGRESS,
    );
    let _ = NETPOL_FLOWS.insert(&s.key, &s.value, 0);
    SK_PASS
}

/// A new flow entry of `ep`, decided now, opened in `origin`.
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "flat for the verifier")]
fn fresh_flow(
    v: &mut FlowValue,
    now: u64,
    cfg: &ConfigValue,
    ep: &EndpointValue,
    rule_id: u32,
    verdict: u8,
    reason: u8,
    origin: u8,
) {
    v.created_ns = now;
    v.last_seen_ns = now;
    v.packets_from_pod = 0;
    v.bytes_from_pod = 0;
    v.packets_to_pod = 0;
    v.bytes_to_pod = 0;
    v.generation = cfg.generation;
    v.rule_id = rule_id;
    v.verdict = verdict;
    v.reason = reason;
    v.origin = origin;
    v.state = FLOW_S_OPEN;
    v.sender_tag = ep.slot | SENDER_TAG;
    v._pad = [0; 2];
}

/// Count a packet on a flow entry. The BPF target has no atomic
/// read-modify-write in `core`, so two CPUs on the same flow at the same
/// instant can lose an increment: the counters are statistics, never an
/// input to a verdict.
#[inline(always)]
pub(crate) fn bump_flow(f: &mut FlowValue, direction: u8, len: u32) {
    if direction == DIR_EGRESS {
        f.packets_from_pod = f.packets_from_pod.wrapping_add(1);
        f.bytes_from_pod = f.bytes_from_pod.wrapping_add(len as u64);
    } else {
        f.packets_to_pod = f.packets_to_pod.wrapping_add(1);
        f.bytes_to_pod = f.bytes_to_pod.wrapping_add(len as u64);
    }
}

#[inline(always)]
fn record_first_fragment(
    s: &mut Scratch,
    ifindex: u32,
    direction: u8,
    verdict: u8,
    cfg: &ConfigValue,
) {
    fill_frag_key(&mut s.frag, ifindex, &s.pkt, direction);
    let fv = FragValue {
        sport: s.pkt.sport,
        dport: s.pkt.dport,
        // The run's generation, not a second read: a verdict is recorded
        // under the generation (and epoch) it was decided in.
        generation: cfg.generation,
        verdict,
        protocol: s.pkt.protocol,
        _pad: [0; 2],
    };
    let _ = NETPOL_FRAGS.insert(&s.frag, &fv, 0);
}

/// A known flow decided under an older policy generation: decide it again as
/// the packet that opened it (its origin direction; the remote side is the
/// peer; the port is the one the opening packet was sent to). Still allowed:
/// refresh. Now denied: drop this packet and forget the flow.
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "flat for the verifier")]
fn recheck(
    s: &mut Scratch,
    ifindex: u32,
    direction: u8,
    f: &mut FlowValue,
    cfg: &ConfigValue,
    len: u32,
    stage: Stage,
    tag: u16,
) -> Verdict {
    let now = now_ns();
    let Some(ep) = endpoint(ifindex, cfg).copied() else {
        let _ = NETPOL_FLOWS.remove(&s.key);
        count(direction, REASON_NO_ENDPOINT);
        return Verdict::Drop;
    };
    let origin = f.origin;
    let port = if origin == DIR_EGRESS {
        s.key.remote_port
    } else {
        s.key.pod_port
    };
    let d = decide(
        &ep,
        origin,
        s.key.family,
        &s.key.remote_addr,
        s.key.protocol,
        port,
        stage,
    );
    // A flow into this pod from another local pod: the sender's egress is
    // part of the verdict (it may have dialled a Service, and been judged
    // only here, after the DNAT).
    let sender_ok =
        origin != DIR_INGRESS || stage == Stage::PostNat || !sender_revoked(s, cfg, port, tag);
    if sender_ok && (d.allow || audit(&ep, cfg)) {
        f.generation = cfg.generation;
        f.reason = if d.allow { d.reason } else { REASON_AUDIT };
        f.rule_id = d.rule_id;
        f.verdict = if d.allow {
            VERDICT_ALLOW
        } else {
            VERDICT_AUDIT
        };
        f.last_seen_ns = now;
        bump_flow(f, direction, len);
        count(
            direction,
            if d.allow {
                REASON_RECHECK_ALLOW
            } else {
                REASON_AUDIT
            },
        );
        return Verdict::Pass;
    }
    send_event(
        s,
        cfg,
        ifindex,
        direction,
        &ep,
        VERDICT_DENY,
        REASON_REVOKED,
        0,
        d.peer_identity,
        len,
        now,
    );
    count(direction, REASON_REVOKED);
    let _ = NETPOL_FLOWS.remove(&s.key);
    Verdict::Drop
}
