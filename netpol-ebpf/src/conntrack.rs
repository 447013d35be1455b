//! The per-packet flow: parse, established-flow lookup (one lookup for a
//! known flow), generation re-check, and the policy decision for new flows.

use aya_ebpf::programs::TcContext;
use netpol_common::{
    CFG_F_AUDIT_ALL, CFG_F_LOG_ALLOWED, ConfigValue, DEFAULT_TIMEOUT_ICMP_S,
    DEFAULT_TIMEOUT_TCP_CLOSING_S, DEFAULT_TIMEOUT_TCP_S, DEFAULT_TIMEOUT_UDP_S, DIR_EGRESS,
    DIR_INGRESS, EP_F_AUDIT, EndpointValue, FAMILY_V6, FLOW_S_CLOSING, FLOW_S_OPEN, FlowKey,
    FlowValue, FragKey, FragValue, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, REASON_AUDIT,
    REASON_ESTABLISHED, REASON_EXPIRED, REASON_FRAGMENT_FOLLOWS, REASON_FRAGMENT_STALE,
    REASON_FRAGMENT_UNKNOWN, REASON_ICMP_ERROR_RELATED, REASON_ICMP_ERROR_UNRELATED,
    REASON_MALFORMED, REASON_NEIGHBOR_DISCOVERY, REASON_NO_ENDPOINT, REASON_NOT_IP,
    REASON_RECHECK_ALLOW, REASON_REPLY, REASON_REVOKED, REASON_TCP_NO_FLOW,
    REASON_UNSUPPORTED_ETHERTYPE, VERDICT_ALLOW, VERDICT_AUDIT, VERDICT_DENY, VerdictEvent,
};

use crate::{
    events::{coarse_now_ns, count, emit, now_ns},
    maps::{NETPOL_CONFIG, NETPOL_ENDPOINTS, NETPOL_FLOWS, NETPOL_FRAGS, NETPOL_SCRATCH},
    parse::{
        ETH_HLEN, ETH_P_ARP, Frag, IcmpKind, Packet, ParseError, TCP_ACK, TCP_FIN, TCP_RST,
        TCP_SYN, ethertype, family_of, parse_ip,
    },
    policy::decide,
};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Drop,
}

/// `bpf_map_update_elem` flag: only create, never replace.
const BPF_NOEXIST: u64 = 1;

/// Per-CPU working memory: the parsed packets, flow keys, values and the
/// event do not fit the 512-byte BPF stack together.
#[repr(C)]
pub struct Scratch {
    pkt: Packet,
    inner: Packet,
    key: FlowKey,
    /// The key of the flow an ICMP error quotes.
    rkey: FlowKey,
    value: FlowValue,
    event: VerdictEvent,
    frag: FragKey,
}

/// Handle one packet seen in `direction` (the pod's point of view). Every
/// error path drops.
#[inline(always)]
pub fn handle(ctx: &TcContext, direction: u8) -> Verdict {
    let Some(scratch) = NETPOL_SCRATCH.get_ptr_mut(0) else {
        count(direction, REASON_MALFORMED);
        return Verdict::Drop;
    };
    // SAFETY: per-CPU slot; a TC program runs to completion on one CPU
    // without preemption by another run of itself.
    let s = unsafe { &mut *scratch };
    match try_handle(ctx, direction, s) {
        Ok(v) => v,
        Err(ParseError(reason)) => {
            count(direction, reason);
            let cfg = config();
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

#[inline(always)]
fn config() -> ConfigValue {
    NETPOL_CONFIG.get(0).copied().unwrap_or_default()
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
fn fill_flow_key(k: &mut FlowKey, ifindex: u32, p: &Packet, direction: u8) {
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

#[inline(always)]
fn audit(ep: &EndpointValue, cfg: &ConfigValue) -> bool {
    ep.flags & EP_F_AUDIT != 0 || cfg.flags & CFG_F_AUDIT_ALL != 0
}

/// Fill `s.event` from the packet and send it (rate-limited).
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "flat for the verifier")]
fn send_event(
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
fn try_handle(ctx: &TcContext, direction: u8, s: &mut Scratch) -> Result<Verdict, ParseError> {
    // Start from a clean packet so that an early error reports zeros, not
    // the previous packet's addresses.
    s.pkt.family = 0;
    s.pkt.protocol = 0;
    s.pkt.sport = 0;
    s.pkt.dport = 0;
    s.pkt.saddr = [0; 16];
    s.pkt.daddr = [0; 16];

    let ethertype = ethertype(ctx)?;
    let Some(family) = family_of(ethertype) else {
        if ethertype == ETH_P_ARP {
            // ARP is not IP: NetworkPolicy does not apply to it, and without
            // it no IPv4 traffic (allowed or not) could flow at all.
            count(direction, REASON_NOT_IP);
            return Ok(Verdict::Pass);
        }
        // VLAN, QinQ, MPLS, PPPoE, ... can carry IP past the policy check
        // (a Linux bridge forwards tagged frames): fail closed.
        return Err(ParseError(REASON_UNSUPPORTED_ETHERTYPE));
    };

    let ifindex = ifindex(ctx);
    parse_ip(ctx, family, ETH_HLEN, false, &mut s.pkt)?;

    if s.pkt.icmp == IcmpKind::NeighborDiscovery {
        // IPv6 neighbour discovery and MLD are the link's own control plane
        // (the IPv6 equivalent of ARP): they carry no application data, and
        // without them no IPv6 traffic could flow at all.
        count(direction, REASON_NEIGHBOR_DISCOVERY);
        return Ok(Verdict::Pass);
    }

    let cfg = config();
    let len = ctx.len();

    if s.pkt.frag == Frag::Later {
        return later_fragment(s, ifindex, direction, &cfg, len);
    }

    fill_flow_key(&mut s.key, ifindex, &s.pkt, direction);
    if let Some(f) = NETPOL_FLOWS.get_ptr_mut(&s.key) {
        // SAFETY: the entry stays valid for this program run; the fields
        // written below are counters and idempotent stores.
        let f = unsafe { &mut *f };
        // Idle time only needs coarse precision: the cheaper clock.
        let now = coarse_now_ns();
        // The coarse clock can lag the precise one the entry was created with
        // by a tick: a "negative" idle time is no idle time.
        if now.saturating_sub(f.last_seen_ns) > idle_timeout_ns(f, s.key.protocol, &cfg) {
            // Idle past its timeout (or closed and idle past the closing
            // timeout): forget it, and judge this packet as new.
            let _ = NETPOL_FLOWS.remove(&s.key);
            count(direction, REASON_EXPIRED);
            return new_flow(ctx, s, ifindex, direction, family, &cfg, len);
        }
        if f.state == FLOW_S_CLOSING && s.pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
            // A new connection on the 5-tuple of a closed one: a new flow,
            // decided (and logged) as such.
            let _ = NETPOL_FLOWS.remove(&s.key);
            count(direction, REASON_EXPIRED);
            return new_flow(ctx, s, ifindex, direction, family, &cfg, len);
        }
        if s.pkt.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            f.state = FLOW_S_CLOSING;
        }
        if f.generation == cfg.generation {
            f.last_seen_ns = now;
            bump_flow(f, direction, len);
            let verdict = f.verdict;
            let reply = f.origin != direction;
            if s.pkt.frag == Frag::First {
                record_first_fragment(s, ifindex, direction, verdict);
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
        let v = recheck(s, ifindex, direction, f, &cfg, len);
        if s.pkt.frag == Frag::First {
            let verdict = if v == Verdict::Pass {
                f.verdict
            } else {
                VERDICT_DENY
            };
            record_first_fragment(s, ifindex, direction, verdict);
        }
        return Ok(v);
    }
    new_flow(ctx, s, ifindex, direction, family, &cfg, len)
}

/// The idle timeout of a flow entry: by protocol, and short once closing.
#[inline(always)]
fn idle_timeout_ns(f: &FlowValue, protocol: u8, cfg: &ConfigValue) -> u64 {
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
fn later_fragment(
    s: &mut Scratch,
    ifindex: u32,
    direction: u8,
    cfg: &ConfigValue,
    len: u32,
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
            && recheck(s, ifindex, direction, f, cfg, len) != Verdict::Pass
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
fn new_flow(
    ctx: &TcContext,
    s: &mut Scratch,
    ifindex: u32,
    direction: u8,
    family: u8,
    cfg: &ConfigValue,
    len: u32,
) -> Result<Verdict, ParseError> {
    let cfg = *cfg;
    let now = now_ns();
    let Some(ep) = (unsafe { NETPOL_ENDPOINTS.get(&ifindex) }).copied() else {
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

    if s.pkt.icmp == IcmpKind::Error {
        // The quoted packet travelled the other way through this endpoint:
        // an error about an allowed flow passes (path MTU discovery).
        if parse_ip(ctx, family, s.pkt.l4_off + 8, true, &mut s.inner).is_ok() {
            // The quoted packet travelled the other way.
            fill_flow_key(&mut s.rkey, ifindex, &s.inner, flip(direction));
            if unsafe { NETPOL_FLOWS.get(&s.rkey) }.is_some() {
                count(direction, REASON_ICMP_ERROR_RELATED);
                return Ok(Verdict::Pass);
            }
        }
    }

    let d = decide(
        &ep,
        direction,
        s.pkt.family,
        remote(&s.pkt, direction),
        s.pkt.protocol,
        s.pkt.dport,
    );
    let (verdict, reason) = if d.allow {
        (VERDICT_ALLOW, d.reason)
    } else if audit(&ep, &cfg) {
        (VERDICT_AUDIT, REASON_AUDIT)
    } else if s.pkt.icmp == IcmpKind::Error {
        (VERDICT_DENY, REASON_ICMP_ERROR_UNRELATED)
    } else {
        (VERDICT_DENY, d.reason)
    };
    if verdict != VERDICT_ALLOW || cfg.flags & CFG_F_LOG_ALLOWED != 0 {
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
            record_first_fragment(s, ifindex, direction, VERDICT_DENY);
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
        v.created_ns = now;
        v.last_seen_ns = now;
        v.packets_from_pod = 0;
        v.bytes_from_pod = 0;
        v.packets_to_pod = 0;
        v.bytes_to_pod = 0;
        v.generation = cfg.generation;
        v.rule_id = d.rule_id;
        v.verdict = verdict;
        v.reason = reason;
        v.origin = direction;
        v.state = FLOW_S_OPEN;
        v._pad = [0; 4];
        bump_flow(v, direction, len);
        // BPF_NOEXIST: a packet of the other direction that created the
        // entry a moment earlier on another CPU keeps its origin.
        let _ = NETPOL_FLOWS.insert(&s.key, &s.value, BPF_NOEXIST);
    }
    if s.pkt.frag == Frag::First {
        record_first_fragment(s, ifindex, direction, verdict);
    }
    Ok(Verdict::Pass)
}

/// Count a packet on a flow entry. The BPF target has no atomic
/// read-modify-write in `core`, so two CPUs on the same flow at the same
/// instant can lose an increment: the counters are statistics, never an
/// input to a verdict.
#[inline(always)]
fn bump_flow(f: &mut FlowValue, direction: u8, len: u32) {
    if direction == DIR_EGRESS {
        f.packets_from_pod = f.packets_from_pod.wrapping_add(1);
        f.bytes_from_pod = f.bytes_from_pod.wrapping_add(len as u64);
    } else {
        f.packets_to_pod = f.packets_to_pod.wrapping_add(1);
        f.bytes_to_pod = f.bytes_to_pod.wrapping_add(len as u64);
    }
}

#[inline(always)]
fn record_first_fragment(s: &mut Scratch, ifindex: u32, direction: u8, verdict: u8) {
    fill_frag_key(&mut s.frag, ifindex, &s.pkt, direction);
    let fv = FragValue {
        sport: s.pkt.sport,
        dport: s.pkt.dport,
        generation: config().generation,
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
fn recheck(
    s: &mut Scratch,
    ifindex: u32,
    direction: u8,
    f: &mut FlowValue,
    cfg: &ConfigValue,
    len: u32,
) -> Verdict {
    let now = now_ns();
    let Some(ep) = (unsafe { NETPOL_ENDPOINTS.get(&ifindex) }).copied() else {
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
    );
    if d.allow || audit(&ep, cfg) {
        f.generation = cfg.generation;
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
