//! The established-packet fast path of the pod veths' programs.
//!
//! Most packets on a veth belong to a flow that already has an entry in
//! `NETPOL_FLOWS`, decided under the current policy generation. For the
//! commonest shape of such a packet (unfragmented IPv4 without options, or
//! IPv6 without extension headers, carrying TCP or UDP, headers in the
//! linear part of the skb) this path reads the few header bytes the flow key
//! needs straight from the packet, builds the key on the stack, and finishes
//! the packet with one flow lookup: no per-CPU scratch, no parsed-packet
//! struct, no copy of `NETPOL_CONFIG`.
//!
//! It decides nothing the full path (`conntrack::handle`) would decide
//! differently. It checks exactly what the full parser checks for such a
//! packet (IP version and header length, fragment bits, the datagram's length
//! field against the packet, the whole minimal L4 header inside the
//! datagram), and it finishes only a packet of a live entry of the current
//! generation, with the same effects as the full path's established branch
//! (TCP closing state, sender tag, idle time, per-flow counters, the per-CPU
//! reason counter). Everything else goes to the full path, which parses the
//! packet again from the start:
//! - any other packet shape (ARP, ICMP, fragments, IPv4 options, IPv6
//!   extension headers, SCTP, VLAN metadata, headers outside the linear
//!   part) and any length field that does not fit: the full path counts and
//!   drops what is malformed;
//! - no entry ([`Fast::Missed`]: the full path skips its own lookup of the
//!   same key), an entry idle past its timeout, a new SYN on a closing entry,
//!   an entry of an older generation (re-checked there against the policy).

use aya_ebpf::{helpers::bpf_skb_load_bytes, programs::TcContext};
use netpol_common::{
    ConfigValue, DIR_EGRESS, FAMILY_V4, FAMILY_V6, FLOW_S_CLOSING, FlowKey, PROTO_TCP, PROTO_UDP,
    REASON_ESTABLISHED, REASON_REPLY,
};

use crate::{
    conntrack::{bump_flow, idle_timeout_ns, set_tag},
    events::{coarse_now_ns, count},
    maps::{NETPOL_CONFIG, NETPOL_FLOWS},
    parse::{ETH_HLEN, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// What the fast path did with a packet.
pub enum Fast {
    /// Finished: the verdict of an established flow's packet.
    Pass,
    /// The packet is of the fast path's shape and its flow has no entry:
    /// the full path need not look the same key up again.
    Missed,
    /// Anything else: the full path handles the packet from the start.
    Slow,
}

/// IPv4 header (no options) + the TCP header up to its flags byte.
const V4_LEN: usize = 20 + 14;
/// IPv6 header + the TCP header up to its flags byte.
const V6_LEN: usize = 40 + 14;

/// The IP and first L4 bytes of the packet, copied to the stack with one
/// `bpf_skb_load_bytes` so that every field is read with one aligned load.
/// Read in place, the IP header (at offset 14) is only 2-aligned at best,
/// and the BPF backend turns every unaligned read into single bytes (a
/// load, shift and or per byte), which cost more than the rest of this path.
#[repr(C, align(8))]
struct Headers<const N: usize>([u8; N]);

impl<const N: usize> Headers<N> {
    /// The first `N` bytes after the Ethernet header, or `None` if the
    /// packet is shorter (the helper bounds-checks the skb, linear part or
    /// not).
    #[inline(always)]
    fn load(ctx: &TcContext) -> Option<Self> {
        let mut h = core::mem::MaybeUninit::<Self>::uninit();
        // SAFETY: `h` has room for `N` bytes.
        let ret = unsafe {
            bpf_skb_load_bytes(
                ctx.skb.skb.cast(),
                ETH_HLEN as u32,
                h.as_mut_ptr().cast(),
                N as u32,
            )
        };
        // SAFETY: on success the helper wrote all `N` bytes. (Not zeroed
        // first: the BPF backend zeroes a buffer this size with a call to a
        // byte-by-byte `memset`.)
        (ret >= 0).then(|| unsafe { h.assume_init() })
    }

    /// The byte at `off`.
    #[inline(always)]
    fn b8(&self, off: usize) -> u8 {
        self.0[off]
    }
    /// The big-endian 16-bit field at `off` (even, constant).
    #[inline(always)]
    fn be16(&self, off: usize) -> u16 {
        // SAFETY: in range; the buffer is 8-aligned and `off` even.
        u16::from_be(unsafe { core::ptr::read(self.0.as_ptr().add(off).cast::<u16>()) })
    }
    /// The 16 bytes at `off` (a multiple of 8), as they are.
    #[inline(always)]
    fn addr6(&self, off: usize) -> [u8; 16] {
        // SAFETY: in range and 8-aligned.
        let w = unsafe { core::ptr::read(self.0.as_ptr().add(off).cast::<[u64; 2]>()) };
        // SAFETY: same size; every bit pattern is a valid [u8; 16].
        unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>(w) }
    }
    /// The four bytes at `off` (a multiple of 4) in the first four bytes of
    /// a 16-byte slot, as `parse::parse_ip` leaves an IPv4 address.
    #[inline(always)]
    fn addr4(&self, off: usize) -> [u8; 16] {
        // SAFETY: in range and 4-aligned.
        let w = unsafe { core::ptr::read(self.0.as_ptr().add(off).cast::<u32>()) };
        // SAFETY: same size; every bit pattern is a valid [u8; 16].
        unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>([w, 0, 0, 0]) }
    }
}

/// The minimal L4 header the full parser requires of a protocol this path
/// takes: TCP's 20 bytes, UDP's 8.
#[inline(always)]
fn l4_min(protocol: u8) -> Option<usize> {
    match protocol {
        PROTO_TCP => Some(20),
        PROTO_UDP => Some(8),
        _ => None,
    }
}

/// The fast path for a packet seen in `direction` on a pod's veth.
#[inline(always)]
pub fn established(ctx: &TcContext, direction: u8) -> Fast {
    // SAFETY: the context pointer is valid for the whole program run.
    if unsafe { (*ctx.skb.skb).vlan_present } != 0 {
        return Fast::Slow;
    }
    let data = ctx.data();
    if data + ETH_HLEN > ctx.data_end() {
        return Fast::Slow;
    }
    // SAFETY: the Ethernet header is in range (checked just above).
    let et = unsafe { [*((data + 12) as *const u8), *((data + 13) as *const u8)] };
    let v6 = match et {
        [0x08, 0x00] => false,
        [0x86, 0xdd] => true,
        _ => return Fast::Slow,
    };
    // Each family reads its own constant offsets (the L4 header follows the
    // fixed IP header): what a field is never depends on a computed offset.
    let (family, saddr, daddr, protocol, l4_min_ok, ports, flags) = if v6 {
        let Some(h) = Headers::<V6_LEN>::load(ctx) else {
            return Fast::Slow;
        };
        if h.b8(0) >> 4 != 6 {
            return Fast::Slow;
        }
        // The next header is the upper protocol itself (no extension
        // headers); anything else is for the full parser.
        let (nh, payload) = (h.b8(6), h.be16(4) as usize);
        let Some(min) = l4_min(nh) else {
            return Fast::Slow;
        };
        // The datagram inside the packet (its length field may not claim
        // bytes that are not there; padding after it is ignored), the whole
        // minimal L4 header inside the datagram: as `parse::parse_ip`.
        let ok = payload >= min && ETH_HLEN + 40 + payload <= ctx.len() as usize;
        (
            FAMILY_V6,
            h.addr6(8),
            h.addr6(24),
            nh,
            ok,
            (h.be16(40), h.be16(42)),
            h.b8(40 + 13),
        )
    } else {
        // Version 4, no options; neither MF nor a fragment offset (DF is
        // fine): the full parser takes such a packet as one whole datagram.
        let Some(h) = Headers::<V4_LEN>::load(ctx) else {
            return Fast::Slow;
        };
        if h.b8(0) != 0x45 || h.be16(6) & 0x3fff != 0 {
            return Fast::Slow;
        }
        let (proto, tot) = (h.b8(9), h.be16(2) as usize);
        let Some(min) = l4_min(proto) else {
            return Fast::Slow;
        };
        let ok = tot >= 20 + min && ETH_HLEN + tot <= ctx.len() as usize;
        (
            FAMILY_V4,
            h.addr4(12),
            h.addr4(16),
            proto,
            ok,
            (h.be16(20), h.be16(22)),
            h.b8(20 + 13),
        )
    };
    if !l4_min_ok {
        return Fast::Slow;
    }
    let (sport, dport) = ports;
    let flags = if protocol == PROTO_TCP { flags } else { 0 };
    // SAFETY: the context pointer is valid for the whole program run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // As `conntrack::fill_flow_key`, from the pod's side.
    let key = if direction == DIR_EGRESS {
        FlowKey {
            ifindex,
            pod_port: sport,
            remote_port: dport,
            protocol,
            family,
            _pad: [0; 2],
            pod_addr: saddr,
            remote_addr: daddr,
        }
    } else {
        FlowKey {
            ifindex,
            pod_port: dport,
            remote_port: sport,
            protocol,
            family,
            _pad: [0; 2],
            pod_addr: daddr,
            remote_addr: saddr,
        }
    };

    let Some(f) = NETPOL_FLOWS.get_ptr_mut(&key) else {
        return Fast::Missed;
    };
    // SAFETY: the entry stays valid for this program run; what is written
    // below is what the full path's established branch writes.
    let f = unsafe { &mut *f };
    let Some(cfg) = NETPOL_CONFIG.get(0) else {
        return Fast::Slow;
    };
    let cfg: &ConfigValue = cfg;
    if f.generation != cfg.generation {
        return Fast::Slow;
    }
    if f.state == FLOW_S_CLOSING && flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        return Fast::Slow;
    }
    let now = coarse_now_ns();
    if now.saturating_sub(f.last_seen_ns) > idle_timeout_ns(f, protocol, cfg) {
        return Fast::Slow;
    }
    if flags & (TCP_FIN | TCP_RST) != 0 {
        f.state = FLOW_S_CLOSING;
    }
    if direction == DIR_EGRESS {
        set_tag(ctx, f.sender_tag);
    }
    f.last_seen_ns = now;
    bump_flow(f, direction, ctx.len());
    count(
        direction,
        if f.origin != direction {
            REASON_REPLY
        } else {
            REASON_ESTABLISHED
        },
    );
    Fast::Pass
}
