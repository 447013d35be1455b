//! Packet parsing: Ethernet, IPv4 (with options), IPv6 (with extension
//! headers walked to a fixed depth), the first bytes of TCP/UDP/SCTP and
//! ICMP/ICMPv6. Every read is bounds-checked (directly against `data_end`,
//! else through `bpf_skb_load_bytes` on an skb), so a truncated packet is an
//! error, never a guess. The parser takes any `PacketCtx`: the TC programs'
//! skb and the uplink's XDP buffer (`xdp.rs`) share it.

use aya_ebpf::{
    helpers::{bpf_skb_load_bytes, bpf_xdp_get_buff_len, bpf_xdp_load_bytes},
    programs::{TcContext, XdpContext},
};
use netpol_common::{
    FAMILY_V4, FAMILY_V6, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
    REASON_IPV6_EXT_TOO_DEEP, REASON_MALFORMED,
};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_ARP: u16 = 0x0806;

/// Headers further into the packet than this are read with
/// `bpf_skb_load_bytes` rather than directly.
const MAX_DIRECT_OFF: usize = 1024;

/// How many IPv6 extension headers the datapath walks before giving up
/// (and dropping with `REASON_IPV6_EXT_TOO_DEEP`).
pub const MAX_IPV6_EXT: usize = 6;

const IPV6_NH_HOP: u8 = 0;
const IPV6_NH_ROUTING: u8 = 43;
const IPV6_NH_FRAGMENT: u8 = 44;
const IPV6_NH_AH: u8 = 51;
const IPV6_NH_DSTOPTS: u8 = 60;

/// What kind of ICMP message a packet is, for the datapath's special cases.
#[repr(u8)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum IcmpKind {
    /// Not ICMP/ICMPv6.
    None,
    /// Echo request/reply and every other informational type: a port-less
    /// flow subject to policy.
    Info,
    /// Destination unreachable, packet too big, time exceeded, parameter
    /// problem: quotes the packet that caused it.
    Error,
    /// IPv6 neighbour discovery and MLD (link-local control traffic).
    NeighborDiscovery,
}

/// Fragment position of the packet.
#[repr(u8)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Frag {
    /// Not a fragment.
    None,
    /// First fragment (offset 0, more fragments follow): carries the ports.
    First,
    /// A later fragment: no L4 header; follows the first fragment's verdict.
    Later,
}

/// The parsed packet. Addresses are in network byte order (IPv4 in the first
/// four bytes), ports in host byte order. Lives in the per-CPU scratch map,
/// not on the 512-byte BPF stack.
#[repr(C)]
pub struct Packet {
    pub family: u8,
    pub protocol: u8,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub frag: Frag,
    /// IPv4 identification or IPv6 fragment identification.
    pub frag_id: u32,
    pub icmp: IcmpKind,
    /// Offset of the L4 header.
    pub l4_off: usize,
    /// Where the IP datagram ends by its own length field (total length,
    /// payload length): bytes past it are link padding, not headers.
    pub l3_end: usize,
    /// TCP flags (`TCP_SYN`, ...), 0 for other protocols.
    pub tcp_flags: u8,
    /// IPv4 TTL or IPv6 hop limit.
    pub hop_limit: u8,
    /// ICMP/ICMPv6 type (0 for other protocols).
    pub icmp_type: u8,
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// What the parser needs of a program's context: the linear packet data,
/// the packet's length, and a slow path for bytes outside the linear part.
pub trait PacketCtx {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Length of the whole packet (linear part and any fragments).
    fn len(&self) -> u32;
    /// Read `T` at `off` when it is not in the linear part.
    fn load_slow<T: Copy>(&self, off: usize) -> Result<T>;
    /// Read 16 bytes at `off` into `dst` when they are not in the linear part.
    fn load_into_slow(&self, off: usize, dst: &mut [u8; 16]) -> Result<()>;
}

impl PacketCtx for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
    #[inline(always)]
    fn len(&self) -> u32 {
        TcContext::len(self)
    }
    #[inline(always)]
    fn load_slow<T: Copy>(&self, off: usize) -> Result<T> {
        self.load::<T>(off)
            .map_err(|_| ParseError(REASON_MALFORMED))
    }
    #[inline(always)]
    fn load_into_slow(&self, off: usize, dst: &mut [u8; 16]) -> Result<()> {
        // SAFETY: `dst` is 16 writable bytes; the helper bounds-checks the skb.
        let ret = unsafe {
            bpf_skb_load_bytes(self.skb.skb.cast(), off as u32, dst.as_mut_ptr().cast(), 16)
        };
        if ret < 0 {
            Err(ParseError(REASON_MALFORMED))
        } else {
            Ok(())
        }
    }
}

/// The XDP buffer: a read outside the range the verifier can check goes
/// through `bpf_xdp_load_bytes`, which reads across the fragments of a
/// multi-buffer frame (the program is loaded with `xdp.frags`) and fails
/// past the end of the frame.
impl PacketCtx for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
    /// The whole packet: with `xdp.frags` (multi-buffer packets, jumbo MTUs)
    /// the linear part `data..data_end` may be only its start. Length checks
    /// use the whole packet; headers past the linear part are read with
    /// `bpf_xdp_load_bytes`, which reads across the fragments.
    #[inline(always)]
    fn len(&self) -> u32 {
        // SAFETY: the context pointer is valid for the program run.
        unsafe { bpf_xdp_get_buff_len(self.ctx) as u32 }
    }
    #[inline(always)]
    fn load_slow<T: Copy>(&self, off: usize) -> Result<T> {
        let mut v = core::mem::MaybeUninit::<T>::uninit();
        // SAFETY: `v` is `size_of::<T>()` writable bytes; the helper
        // bounds-checks the frame and fills all of them or fails.
        let ret = unsafe {
            bpf_xdp_load_bytes(
                self.ctx,
                off as u32,
                v.as_mut_ptr().cast(),
                core::mem::size_of::<T>() as u32,
            )
        };
        if ret < 0 {
            return Err(ParseError(REASON_MALFORMED));
        }
        // SAFETY: written in full by the helper.
        Ok(unsafe { v.assume_init() })
    }
    #[inline(always)]
    fn load_into_slow(&self, off: usize, dst: &mut [u8; 16]) -> Result<()> {
        // SAFETY: `dst` is 16 writable bytes; the helper bounds-checks.
        let ret = unsafe { bpf_xdp_load_bytes(self.ctx, off as u32, dst.as_mut_ptr().cast(), 16) };
        if ret < 0 {
            Err(ParseError(REASON_MALFORMED))
        } else {
            Ok(())
        }
    }
}

/// A parse failure, with the reason the datapath counts it under.
pub struct ParseError(pub u8);

type Result<T> = core::result::Result<T, ParseError>;

/// Read a `T` at `off`: straight from the packet's linear part when it is
/// there (no helper call: the fast path), else through
/// `bpf_skb_load_bytes` (headers in a non-linear part). Beyond the packet
/// it is an error.
#[inline(always)]
pub fn load<T: Copy, C: PacketCtx>(ctx: &C, off: usize) -> Result<T> {
    let start = ctx.data();
    let end = ctx.data_end();
    // The bound on `off` lets the verifier accept the pointer arithmetic
    // (offsets read back from the scratch map are otherwise unbounded). At
    // least two bytes are checked: LLVM turns `p + 1 <= end` into `p < end`,
    // from which the verifier learns no range when `p`'s offset is variable
    // (a one-byte read at the very end takes the helper path instead).
    let need = if core::mem::size_of::<T>() < 2 {
        2
    } else {
        core::mem::size_of::<T>()
    };
    if off < MAX_DIRECT_OFF && start + off + need <= end {
        // SAFETY: bounds checked against data_end just above.
        return Ok(unsafe { core::ptr::read_unaligned((start + off) as *const T) });
    }
    ctx.load_slow::<T>(off)
}

/// Load an IPv6 address straight into `dst` (no stack temporary); fails
/// unless all 16 bytes are in the packet.
#[inline(always)]
pub fn load_into<C: PacketCtx>(ctx: &C, off: usize, dst: &mut [u8; 16]) -> Result<()> {
    let start = ctx.data();
    let end = ctx.data_end();
    if off < MAX_DIRECT_OFF && start + off + 16 <= end {
        // SAFETY: bounds checked against data_end just above.
        *dst = unsafe { core::ptr::read_unaligned((start + off) as *const [u8; 16]) };
        return Ok(());
    }
    ctx.load_into_slow(off, dst)
}

/// Parse the IP packet that starts at `l3` (either the outer packet, or the
/// packet quoted in an ICMP error when `quoted` is true: then only the first
/// 8 bytes of its L4 header are guaranteed to be there) into `p`.
#[inline(always)]
pub fn parse_ip<C: PacketCtx>(
    ctx: &C,
    family: u8,
    l3: usize,
    quoted: bool,
    p: &mut Packet,
) -> Result<()> {
    p.family = family;
    p.protocol = 0;
    p.saddr = [0; 16];
    p.daddr = [0; 16];
    p.sport = 0;
    p.dport = 0;
    p.frag = Frag::None;
    p.frag_id = 0;
    p.icmp = IcmpKind::None;
    p.l4_off = 0;
    p.l3_end = 0;
    p.tcp_flags = 0;
    p.hop_limit = 0;
    p.icmp_type = 0;
    if family == FAMILY_V4 {
        parse_v4(ctx, l3, quoted, p)?;
    } else {
        parse_v6(ctx, l3, quoted, p)?;
    }
    if p.frag == Frag::Later {
        return Ok(());
    }
    parse_l4(ctx, p, quoted)
}

#[inline(always)]
fn parse_v4<C: PacketCtx>(ctx: &C, l3: usize, quoted: bool, p: &mut Packet) -> Result<()> {
    let vihl: u8 = load(ctx, l3)?;
    if vihl >> 4 != 4 {
        return Err(ParseError(REASON_MALFORMED));
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Err(ParseError(REASON_MALFORMED));
    }
    let tot_len: [u8; 2] = load(ctx, l3 + 2)?;
    let tot_len = u16::from_be_bytes(tot_len) as usize;
    p.l3_end = datagram_end(ctx, l3, tot_len, ihl, quoted)?;
    let id: [u8; 2] = load(ctx, l3 + 4)?;
    let frag_field: [u8; 2] = load(ctx, l3 + 6)?;
    let frag_field = u16::from_be_bytes(frag_field);
    let more = frag_field & 0x2000 != 0;
    let offset = frag_field & 0x1fff;
    p.hop_limit = load(ctx, l3 + 8)?;
    p.protocol = load(ctx, l3 + 9)?;
    let s: [u8; 4] = load(ctx, l3 + 12)?;
    let d: [u8; 4] = load(ctx, l3 + 16)?;
    p.saddr[0] = s[0];
    p.saddr[1] = s[1];
    p.saddr[2] = s[2];
    p.saddr[3] = s[3];
    p.daddr[0] = d[0];
    p.daddr[1] = d[1];
    p.daddr[2] = d[2];
    p.daddr[3] = d[3];
    // Options (ihl > 20) are skipped: the L4 header starts after them.
    p.l4_off = l3 + ihl;
    p.frag_id = u16::from_be_bytes(id) as u32;
    p.frag = if offset != 0 {
        // RFC 1858: a later fragment that starts inside the first 16 bytes of
        // the L4 header could overwrite the ports the first one was judged by.
        if (offset as usize) * 8 < 16 {
            return Err(ParseError(REASON_MALFORMED));
        }
        Frag::Later
    } else if more {
        Frag::First
    } else {
        Frag::None
    };
    Ok(())
}

#[inline(always)]
fn parse_v6<C: PacketCtx>(ctx: &C, l3: usize, quoted: bool, p: &mut Packet) -> Result<()> {
    let v: u8 = load(ctx, l3)?;
    if v >> 4 != 6 {
        return Err(ParseError(REASON_MALFORMED));
    }
    let payload_len: [u8; 2] = load(ctx, l3 + 4)?;
    // At least one byte of payload: a jumbogram (payload length 0 and a
    // hop-by-hop jumbo option, BIG TCP) is refused like any length that does
    // not fit, and an empty datagram carries nothing to judge.
    p.l3_end = datagram_end(
        ctx,
        l3,
        40 + u16::from_be_bytes(payload_len) as usize,
        41,
        quoted,
    )?;
    let nh_hl: [u8; 2] = load(ctx, l3 + 6)?;
    let mut nh = nh_hl[0];
    p.hop_limit = nh_hl[1];
    load_into(ctx, l3 + 8, &mut p.saddr)?;
    load_into(ctx, l3 + 24, &mut p.daddr)?;
    let mut off = l3 + 40;
    // Up to MAX_IPV6_EXT extension headers are walked; the header after the
    // last of them must be the upper protocol.
    let mut i = 0;
    while i <= MAX_IPV6_EXT {
        let is_ext = matches!(
            nh,
            IPV6_NH_HOP | IPV6_NH_ROUTING | IPV6_NH_DSTOPTS | IPV6_NH_AH | IPV6_NH_FRAGMENT
        );
        if is_ext && i == MAX_IPV6_EXT {
            return Err(ParseError(REASON_IPV6_EXT_TOO_DEEP));
        }
        match nh {
            IPV6_NH_HOP | IPV6_NH_ROUTING | IPV6_NH_DSTOPTS => {
                let hdr: [u8; 2] = load(ctx, off)?;
                nh = hdr[0];
                off += (hdr[1] as usize + 1) * 8;
            }
            IPV6_NH_AH => {
                let hdr: [u8; 2] = load(ctx, off)?;
                nh = hdr[0];
                off += (hdr[1] as usize + 2) * 4;
            }
            IPV6_NH_FRAGMENT => {
                let hdr: [u8; 8] = load(ctx, off)?;
                nh = hdr[0];
                let field = u16::from_be_bytes([hdr[2], hdr[3]]);
                let offset = field >> 3;
                let more = field & 1 != 0;
                p.frag_id = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
                off += 8;
                if offset != 0 {
                    if (offset as usize) * 8 < 16 {
                        return Err(ParseError(REASON_MALFORMED));
                    }
                    // What follows is the middle of the datagram, not
                    // headers: stop here.
                    p.frag = Frag::Later;
                    p.protocol = nh;
                    p.l4_off = off;
                    return Ok(());
                } else if more {
                    p.frag = Frag::First;
                }
                // An atomic fragment (offset 0, no more) is a whole datagram.
            }
            _ => {
                p.protocol = nh;
                p.l4_off = off;
                return Ok(());
            }
        }
        i += 1;
    }
    Err(ParseError(REASON_IPV6_EXT_TOO_DEEP))
}

/// The end of a datagram of `len` bytes (its length field) starting at `l3`:
/// it must hold at least `min` bytes and, outside an ICMP quote (which is
/// cut short on purpose), fit in the packet. Padding after it is ignored.
#[inline(always)]
fn datagram_end<C: PacketCtx>(
    ctx: &C,
    l3: usize,
    len: usize,
    min: usize,
    quoted: bool,
) -> Result<usize> {
    if len < min || (!quoted && l3 + len > ctx.len() as usize) {
        return Err(ParseError(REASON_MALFORMED));
    }
    Ok(l3 + len)
}

#[inline(always)]
fn parse_l4<C: PacketCtx>(ctx: &C, p: &mut Packet, quoted: bool) -> Result<()> {
    let off = p.l4_off;
    // Headers are judged only from bytes inside the datagram: link padding
    // after it must not complete a truncated L4 header.
    let end = if quoted { usize::MAX } else { p.l3_end };
    match p.protocol {
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => {
            // The whole minimal header must be there (a TCP header cut by a
            // tiny first fragment is refused), except in the quote of an ICMP
            // error, which only promises 8 bytes.
            let min = if quoted {
                8
            } else {
                match p.protocol {
                    PROTO_TCP => 20,
                    PROTO_UDP => 8,
                    _ => 12,
                }
            };
            if off + min > end {
                return Err(ParseError(REASON_MALFORMED));
            }
            let _: u8 = load(ctx, off + min - 1)?;
            let ports: [u8; 4] = load(ctx, off)?;
            p.sport = u16::from_be_bytes([ports[0], ports[1]]);
            p.dport = u16::from_be_bytes([ports[2], ports[3]]);
            if p.protocol == PROTO_TCP && !quoted {
                p.tcp_flags = load(ctx, off + 13)?;
            }
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            if off + 8 > end {
                return Err(ParseError(REASON_MALFORMED));
            }
            let hdr: [u8; 8] = load(ctx, off)?;
            let ty = hdr[0];
            p.icmp_type = ty;
            let id = u16::from_be_bytes([hdr[4], hdr[5]]);
            let v6 = p.protocol == PROTO_ICMPV6;
            let (request, reply, kind) = if v6 {
                match ty {
                    128 => (true, false, IcmpKind::Info),
                    129 => (false, true, IcmpKind::Info),
                    1..=4 => (false, false, IcmpKind::Error),
                    130..=137 | 143 => (false, false, IcmpKind::NeighborDiscovery),
                    _ => (false, false, IcmpKind::Info),
                }
            } else {
                match ty {
                    8 => (true, false, IcmpKind::Info),
                    0 => (false, true, IcmpKind::Info),
                    3 | 11 | 12 => (false, false, IcmpKind::Error),
                    _ => (false, false, IcmpKind::Info),
                }
            };
            p.icmp = kind;
            // Echo: the id travels as a "port" so that a reply's flow key is
            // the request's reversed. Other types are port-less.
            if request {
                p.sport = id;
            } else if reply {
                p.dport = id;
            }
        }
        _ => {
            // Another IP protocol: a port-less flow, subject to policy (only
            // rules without ports can allow it).
        }
    }
    Ok(())
}

/// The frame's ethertype.
#[inline(always)]
pub fn ethertype<C: PacketCtx>(ctx: &C) -> Result<u16> {
    let t: [u8; 2] = load(ctx, 12)?;
    Ok(u16::from_be_bytes(t))
}

pub const fn family_of(ethertype: u16) -> Option<u8> {
    match ethertype {
        ETH_P_IP => Some(FAMILY_V4),
        ETH_P_IPV6 => Some(FAMILY_V6),
        _ => None,
    }
}
