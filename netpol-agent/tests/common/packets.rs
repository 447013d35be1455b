//! A small packet builder for datapath tests: Ethernet + IPv4 (with options
//! and fragment fields) or IPv6 (with extension headers) + TCP, UDP, SCTP,
//! ICMP or ICMPv6. Lengths are consistent; checksums are left zero (the
//! datapath never checks them).
//!
//! ```ignore
//! let syn = tcp("10.0.0.1:40000", "10.0.0.2:80").syn();
//! let frag = udp("[fd00::1]:5000", "[fd00::2]:53").first_fragment(7);
//! let err = icmp_error("10.0.0.254", "10.0.0.1", &syn);
//! ```

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use netpol_common::{
    FAMILY_V4, FAMILY_V6, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;

const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
/// The source MAC of every frame the kit builds.
pub const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// The layer-4 part of a packet.
#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    Sctp {
        sport: u16,
        dport: u16,
    },
    /// ICMP or ICMPv6 (by the packet's family): type, code, the 4 bytes after
    /// the checksum, then the body.
    Icmp {
        ty: u8,
        code: u8,
        rest: [u8; 4],
        body: Vec<u8>,
    },
    /// Bytes that are not an L4 header (a later fragment) of protocol `proto`.
    Raw {
        proto: u8,
        bytes: Vec<u8>,
    },
}

/// An IPv6 extension header (8 bytes long, AH 16).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ext {
    HopByHop,
    DestOpts,
    Routing,
    /// Authentication header (16 bytes: 12 + a 4-byte ICV).
    Auth,
}

impl Ext {
    fn number(self) -> u8 {
        match self {
            Ext::HopByHop => 0,
            Ext::Routing => 43,
            Ext::DestOpts => 60,
            Ext::Auth => 51,
        }
    }
}

/// Fragment fields: `offset` in 8-byte units, as on the wire.
#[derive(Clone, Copy, Debug)]
pub struct Fragment {
    pub id: u32,
    pub offset: u16,
    pub more: bool,
}

/// An IP packet in an Ethernet frame.
#[derive(Clone, Debug)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub l4: L4,
    pub payload: Vec<u8>,
    /// IPv4 identification (when not fragmented).
    pub ip_id: u16,
    pub fragment: Option<Fragment>,
    /// IPv4 options, in 4-byte words (IHL = 5 + this).
    pub options_words: u8,
    /// Write this IHL instead of the real one (malformed packets).
    pub ihl_override: Option<u8>,
    /// IPv6 extension headers, in order, before the fragment header (if any).
    pub ext: Vec<Ext>,
    /// IPv6 extension headers of the fragmentable part (after the fragment
    /// header). A later fragment does not carry them, but its fragment
    /// header's next header names the first of them.
    pub ext_after_fragment: Vec<Ext>,
    /// IPv4 TTL or IPv6 hop limit.
    pub hop_limit: u8,
}

fn sock(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|e| panic!("bad socket address {s:?}: {e}"))
}

pub fn ip(s: &str) -> IpAddr {
    s.parse()
        .unwrap_or_else(|e| panic!("bad IP address {s:?}: {e}"))
}

fn packet(src: IpAddr, dst: IpAddr, l4: L4) -> Packet {
    assert_eq!(
        src.is_ipv4(),
        dst.is_ipv4(),
        "source and destination families differ"
    );
    Packet {
        src,
        dst,
        l4,
        payload: Vec::new(),
        ip_id: 0x1234,
        fragment: None,
        options_words: 0,
        ihl_override: None,
        ext: Vec::new(),
        ext_after_fragment: Vec::new(),
        hop_limit: 64,
    }
}

/// A TCP segment (flags: ACK; use `.syn()` for a SYN).
pub fn tcp(src: &str, dst: &str) -> Packet {
    let (s, d) = (sock(src), sock(dst));
    packet(
        s.ip(),
        d.ip(),
        L4::Tcp {
            sport: s.port(),
            dport: d.port(),
            flags: TCP_ACK,
        },
    )
}

pub fn udp(src: &str, dst: &str) -> Packet {
    let (s, d) = (sock(src), sock(dst));
    packet(
        s.ip(),
        d.ip(),
        L4::Udp {
            sport: s.port(),
            dport: d.port(),
        },
    )
    .payload(&[0x55; 16])
}

pub fn sctp(src: &str, dst: &str) -> Packet {
    let (s, d) = (sock(src), sock(dst));
    // A common header and one (INIT-like) chunk header.
    packet(
        s.ip(),
        d.ip(),
        L4::Sctp {
            sport: s.port(),
            dport: d.port(),
        },
    )
    .payload(&[
        1, 0, 0, 20, 0, 0, 0, 1, 0, 0, 0x10, 0, 0, 1, 0, 1, 0, 0, 0, 1,
    ])
}

fn is_v6(src: &IpAddr) -> bool {
    src.is_ipv6()
}

/// ICMP echo request (ICMPv6 128 for IPv6 addresses) with echo id `id`.
pub fn echo_request(src: &str, dst: &str, id: u16) -> Packet {
    let (s, d) = (ip(src), ip(dst));
    let ty = if is_v6(&s) { 128 } else { 8 };
    let [a, b] = id.to_be_bytes();
    packet(
        s,
        d,
        L4::Icmp {
            ty,
            code: 0,
            rest: [a, b, 0, 1],
            body: vec![0x42; 32],
        },
    )
}

/// ICMP echo reply (ICMPv6 129).
pub fn echo_reply(src: &str, dst: &str, id: u16) -> Packet {
    let mut p = echo_request(src, dst, id);
    if let L4::Icmp { ty, .. } = &mut p.l4 {
        *ty = if is_v6(&p.src) { 129 } else { 0 };
    }
    p
}

/// An ICMP error quoting `quoted` (its IP packet, without Ethernet): for
/// IPv4 a destination unreachable / fragmentation needed (type 3 code 4)
/// quoting the IP header and 8 bytes, for IPv6 a packet too big (type 2).
pub fn icmp_error(src: &str, dst: &str, quoted: &Packet) -> Packet {
    let (s, d) = (ip(src), ip(dst));
    assert_eq!(s.is_ipv6(), quoted.src.is_ipv6(), "quote of another family");
    let mut q = quoted.ip_bytes();
    if is_v6(&s) {
        q.truncate(1280 - 48);
        packet(
            s,
            d,
            L4::Icmp {
                ty: 2,
                code: 0,
                rest: 1280u32.to_be_bytes(),
                body: q,
            },
        )
    } else {
        let ihl = usize::from(q[0] & 0x0f) * 4;
        q.truncate(ihl + 8);
        packet(
            s,
            d,
            L4::Icmp {
                ty: 3,
                code: 4,
                rest: [0, 0, 0x05, 0xdc],
                body: q,
            },
        )
    }
}

/// An IPv6 neighbour solicitation (ICMPv6 135) for `target`.
pub fn neighbor_solicitation(src: &str, target: &str) -> Packet {
    let s = ip(src);
    let IpAddr::V6(t) = ip(target) else {
        panic!("neighbour solicitation target must be IPv6")
    };
    let o = t.octets();
    let solicited = Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        u16::from_be_bytes([o[14], o[15]]),
    );
    // RFC 4861: neighbour discovery is sent, and accepted, with hop limit 255.
    packet(
        s,
        IpAddr::V6(solicited),
        L4::Icmp {
            ty: 135,
            code: 0,
            rest: [0; 4],
            body: o.to_vec(),
        },
    )
    .hop_limit(255)
}

impl Packet {
    pub fn syn(mut self) -> Self {
        self.set_tcp_flags(TCP_SYN);
        self
    }

    pub fn syn_ack(mut self) -> Self {
        self.set_tcp_flags(TCP_SYN | TCP_ACK);
        self
    }

    pub fn ack(mut self) -> Self {
        self.set_tcp_flags(TCP_ACK);
        self
    }

    /// The IPv4 TTL or IPv6 hop limit (64 unless set).
    pub fn hop_limit(mut self, hops: u8) -> Self {
        self.hop_limit = hops;
        self
    }

    /// FIN|ACK: the sender is done.
    pub fn fin(mut self) -> Self {
        self.set_tcp_flags(TCP_FIN | TCP_ACK);
        self
    }

    /// RST: the connection is gone.
    pub fn rst(mut self) -> Self {
        self.set_tcp_flags(TCP_RST);
        self
    }

    fn set_tcp_flags(&mut self, f: u8) {
        match &mut self.l4 {
            L4::Tcp { flags, .. } => *flags = f,
            other => panic!("TCP flags on {other:?}"),
        }
    }

    pub fn payload(mut self, bytes: &[u8]) -> Self {
        self.payload = bytes.to_vec();
        self
    }

    /// The same flow in the other direction (addresses and ports swapped;
    /// an echo request becomes an echo reply).
    pub fn reversed(&self) -> Self {
        let mut p = self.clone();
        p.src = self.dst;
        p.dst = self.src;
        p.fragment = None;
        match &mut p.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
            } => {
                std::mem::swap(sport, dport);
                *flags = TCP_ACK;
            }
            L4::Udp { sport, dport } | L4::Sctp { sport, dport } => std::mem::swap(sport, dport),
            L4::Icmp { ty, .. } => {
                *ty = match *ty {
                    8 => 0,
                    0 => 8,
                    128 => 129,
                    129 => 128,
                    t => t,
                }
            }
            L4::Raw { .. } => {}
        }
        p
    }

    /// IPv4 options of `words` 4-byte words (NOPs then end-of-list).
    pub fn ip_options(mut self, words: u8) -> Self {
        assert!(self.src.is_ipv4() && words <= 10);
        self.options_words = words;
        self
    }

    /// Write IHL `ihl` into the header whatever its real length.
    pub fn ihl(mut self, ihl: u8) -> Self {
        self.ihl_override = Some(ihl);
        self
    }

    pub fn ip_id(mut self, id: u16) -> Self {
        self.ip_id = id;
        self
    }

    /// IPv6 extension headers (8 bytes each), in order.
    pub fn ext_headers(mut self, ext: &[Ext]) -> Self {
        assert!(self.src.is_ipv6());
        self.ext = ext.to_vec();
        self
    }

    /// IPv6 extension headers after the fragment header (in the
    /// fragmentable part of the datagram).
    pub fn ext_after_fragment(mut self, ext: &[Ext]) -> Self {
        assert!(self.src.is_ipv6());
        self.ext_after_fragment = ext.to_vec();
        self
    }

    /// The first fragment of datagram `id` (offset 0, more fragments): it
    /// carries the L4 header.
    pub fn first_fragment(mut self, id: u32) -> Self {
        self.fragment = Some(Fragment {
            id,
            offset: 0,
            more: true,
        });
        self
    }

    /// A later fragment of datagram `id` at `offset` 8-byte units (the last
    /// one: no more fragments): payload bytes only, no L4 header.
    pub fn later_fragment(mut self, id: u32, offset: u16) -> Self {
        let proto = self.protocol();
        self.l4 = L4::Raw {
            proto,
            bytes: vec![0xab; 64],
        };
        self.payload = Vec::new();
        self.fragment = Some(Fragment {
            id,
            offset,
            more: false,
        });
        self
    }

    pub fn family(&self) -> u8 {
        if self.src.is_ipv4() {
            FAMILY_V4
        } else {
            FAMILY_V6
        }
    }

    pub fn protocol(&self) -> u8 {
        match &self.l4 {
            L4::Tcp { .. } => PROTO_TCP,
            L4::Udp { .. } => PROTO_UDP,
            L4::Sctp { .. } => PROTO_SCTP,
            L4::Icmp { .. } => {
                if self.src.is_ipv4() {
                    PROTO_ICMP
                } else {
                    PROTO_ICMPV6
                }
            }
            L4::Raw { proto, .. } => *proto,
        }
    }

    /// Source port as the datapath sees it (echo id of a request, 0 for a
    /// later fragment and other port-less packets).
    pub fn sport(&self) -> u16 {
        match &self.l4 {
            L4::Tcp { sport, .. } | L4::Udp { sport, .. } | L4::Sctp { sport, .. } => *sport,
            L4::Icmp {
                ty: 8 | 128, rest, ..
            } => u16::from_be_bytes([rest[0], rest[1]]),
            _ => 0,
        }
    }

    /// Destination port as the datapath sees it (echo id of a reply).
    pub fn dport(&self) -> u16 {
        match &self.l4 {
            L4::Tcp { dport, .. } | L4::Udp { dport, .. } | L4::Sctp { dport, .. } => *dport,
            L4::Icmp {
                ty: 0 | 129, rest, ..
            } => u16::from_be_bytes([rest[0], rest[1]]),
            _ => 0,
        }
    }

    fn l4_bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        match &self.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
            } => {
                b.extend(sport.to_be_bytes());
                b.extend(dport.to_be_bytes());
                b.extend(1000u32.to_be_bytes()); // seq
                b.extend(if flags & TCP_ACK != 0 { 2000u32 } else { 0 }.to_be_bytes());
                b.push(5 << 4); // data offset
                b.push(*flags);
                b.extend(64240u16.to_be_bytes()); // window
                b.extend([0, 0, 0, 0]); // checksum, urgent pointer
            }
            L4::Udp { sport, dport } => {
                b.extend(sport.to_be_bytes());
                b.extend(dport.to_be_bytes());
                let len = 8 + self.payload.len();
                b.extend((len as u16).to_be_bytes());
                b.extend([0, 0]);
            }
            L4::Sctp { sport, dport } => {
                b.extend(sport.to_be_bytes());
                b.extend(dport.to_be_bytes());
                b.extend(0xdead_beefu32.to_be_bytes()); // verification tag
                b.extend([0, 0, 0, 0]); // checksum
            }
            L4::Icmp {
                ty,
                code,
                rest,
                body,
            } => {
                b.push(*ty);
                b.push(*code);
                b.extend([0, 0]);
                b.extend(rest);
                b.extend(body);
            }
            L4::Raw { bytes, .. } => b.extend(bytes),
        }
        b.extend(&self.payload);
        b
    }

    /// The IP packet (no Ethernet header).
    pub fn ip_bytes(&self) -> Vec<u8> {
        let l4 = self.l4_bytes();
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => self.v4_bytes(s, d, &l4),
            (IpAddr::V6(s), IpAddr::V6(d)) => self.v6_bytes(s, d, &l4),
            _ => unreachable!("families checked at construction"),
        }
    }

    fn v4_bytes(&self, s: Ipv4Addr, d: Ipv4Addr, l4: &[u8]) -> Vec<u8> {
        let hlen = 20 + 4 * usize::from(self.options_words);
        let ihl = self.ihl_override.unwrap_or((hlen / 4) as u8);
        let mut b = Vec::with_capacity(hlen + l4.len());
        b.push(0x40 | (ihl & 0x0f));
        b.push(0); // TOS
        b.extend(((hlen + l4.len()) as u16).to_be_bytes());
        let (id, frag_field) = match self.fragment {
            Some(f) => {
                assert!(f.id <= 0xffff, "IPv4 fragment id is 16 bits");
                (
                    f.id as u16,
                    (f.offset & 0x1fff) | if f.more { 0x2000 } else { 0 },
                )
            }
            None => (self.ip_id, 0x4000), // DF
        };
        b.extend(id.to_be_bytes());
        b.extend(frag_field.to_be_bytes());
        b.push(self.hop_limit); // TTL
        b.push(self.protocol());
        b.extend([0, 0]); // checksum
        b.extend(s.octets());
        b.extend(d.octets());
        let opts = 4 * usize::from(self.options_words);
        for i in 0..opts {
            b.push(if i + 1 == opts { 0 } else { 1 }); // NOP..., EOL
        }
        b.extend(l4);
        b
    }

    fn v6_bytes(&self, s: Ipv6Addr, d: Ipv6Addr, l4: &[u8]) -> Vec<u8> {
        // Chain: ext headers, the fragment header, the fragmentable part's
        // ext headers (only in a first fragment), then L4.
        let later = self.fragment.is_some_and(|f| f.offset != 0);
        let mut chain: Vec<u8> = self.ext.iter().map(|e| e.number()).collect();
        if self.fragment.is_some() {
            chain.push(44);
        }
        chain.extend(self.ext_after_fragment.iter().map(|e| e.number()));
        chain.push(self.protocol());
        let mut hdrs = Vec::new();
        let ext_hdr = |hdrs: &mut Vec<u8>, e: &Ext, next: u8| match e {
            Ext::HopByHop | Ext::DestOpts => {
                // Next header, length 0 (8 bytes), PadN of 4 zero bytes.
                hdrs.extend([next, 0, 1, 4, 0, 0, 0, 0]);
            }
            Ext::Routing => {
                // Segments left 0: receivers ignore it.
                hdrs.extend([next, 0, 4, 0, 0, 0, 0, 0]);
            }
            Ext::Auth => {
                // Payload length 2: (2 + 2) * 4 = 16 bytes; SPI, sequence, ICV.
                hdrs.extend([next, 2, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0]);
            }
        };
        for (i, e) in self.ext.iter().enumerate() {
            ext_hdr(&mut hdrs, e, chain[i + 1]);
        }
        let mut i = self.ext.len();
        if let Some(f) = self.fragment {
            i += 1;
            let field = (f.offset << 3) | u16::from(f.more);
            hdrs.push(chain[i]);
            hdrs.push(0);
            hdrs.extend(field.to_be_bytes());
            hdrs.extend(f.id.to_be_bytes());
        }
        if !later {
            for e in &self.ext_after_fragment {
                ext_hdr(&mut hdrs, e, chain[i + 1]);
                i += 1;
            }
        }
        let mut b = Vec::with_capacity(40 + hdrs.len() + l4.len());
        b.extend([0x60, 0, 0, 0]);
        b.extend(((hdrs.len() + l4.len()) as u16).to_be_bytes());
        b.push(chain[0]);
        b.push(self.hop_limit); // hop limit
        b.extend(s.octets());
        b.extend(d.octets());
        b.extend(hdrs);
        b.extend(l4);
        b
    }

    /// The Ethernet frame.
    pub fn frame(&self) -> Vec<u8> {
        let ethertype = if self.src.is_ipv4() {
            ETH_P_IP
        } else {
            ETH_P_IPV6
        };
        let mut b = ethernet_header(ethertype);
        b.extend(self.ip_bytes());
        b
    }

    /// The Ethernet frame cut to `len` bytes.
    pub fn frame_truncated(&self, len: usize) -> Vec<u8> {
        let mut f = self.frame();
        assert!(len <= f.len(), "truncating to more than the frame");
        f.truncate(len);
        f
    }

    /// The frame with an 802.1Q tag (VLAN `vid`) before the IP ethertype.
    pub fn vlan_tagged(&self, vid: u16) -> Vec<u8> {
        let f = self.frame();
        let mut b = Vec::with_capacity(f.len() + 4);
        b.extend(&f[..12]);
        b.extend(ETH_P_8021Q.to_be_bytes());
        b.extend((vid & 0x0fff).to_be_bytes());
        b.extend(&f[12..]);
        b
    }
}

pub fn ethernet_header(ethertype: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(64);
    b.extend(DST_MAC);
    b.extend(SRC_MAC);
    b.extend(ethertype.to_be_bytes());
    b
}

/// An ARP request "who has `target`? tell `sender`" (IPv4 addresses).
pub fn arp_request(sender: &str, target: &str) -> Vec<u8> {
    let (IpAddr::V4(s), IpAddr::V4(t)) = (ip(sender), ip(target)) else {
        panic!("ARP is IPv4")
    };
    let mut b = ethernet_header(ETH_P_ARP);
    b.extend([0, 1, 0x08, 0x00, 6, 4, 0, 1]); // Ethernet/IPv4, request
    b.extend(SRC_MAC);
    b.extend(s.octets());
    b.extend([0; 6]);
    b.extend(t.octets());
    b
}

/// Turn a range of ports into the (port, prefix length over the 16 port
/// bits) blocks that cover it exactly: what an `endPort` range compiles to.
pub fn port_range_prefixes(first: u16, last: u16) -> Vec<(u16, u32)> {
    assert!(first <= last);
    let mut out = Vec::new();
    let mut lo = u32::from(first);
    let hi = u32::from(last);
    while lo <= hi {
        // The biggest aligned block starting at lo that fits in [lo, hi].
        let mut size = if lo == 0 {
            1 << 16
        } else {
            1u32 << lo.trailing_zeros()
        };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        out.push((lo as u16, 16 - size.trailing_zeros()));
        lo += size;
    }
    out
}

/// A neighbour advertisement from `src` to `dst` saying "`target` is at my MAC"
/// (hop limit 255, as RFC 4861 requires).
pub fn neighbor_advertisement(src: &str, dst: &str, target: &str) -> Packet {
    let IpAddr::V6(t) = ip(target) else {
        panic!("neighbour advertisement target must be IPv6")
    };
    packet(
        ip(src),
        ip(dst),
        L4::Icmp {
            ty: 136,
            code: 0,
            rest: [0x60, 0, 0, 0], // solicited, override
            body: t.octets().to_vec(),
        },
    )
    .hop_limit(255)
}

/// A router advertisement from `src` to all nodes (hop limit 255).
pub fn router_advertisement(src: &str) -> Packet {
    packet(
        ip(src),
        ip("ff02::1"),
        L4::Icmp {
            ty: 134,
            code: 0,
            rest: [64, 0, 0x07, 0x08], // hop limit 64, lifetime 1800 s
            body: vec![0; 8],
        },
    )
    .hop_limit(255)
}

/// A gratuitous ARP: "`sender` is at `mac`", from `mac`.
pub fn gratuitous_arp(sender: &str, mac: [u8; 6]) -> Vec<u8> {
    let IpAddr::V4(s) = ip(sender) else {
        panic!("ARP is IPv4")
    };
    let mut b = Vec::with_capacity(64);
    b.extend([0xff; 6]);
    b.extend(mac);
    b.extend(ETH_P_ARP.to_be_bytes());
    b.extend([0, 1, 0x08, 0x00, 6, 4, 0, 2]); // Ethernet/IPv4, reply
    b.extend(mac);
    b.extend(s.octets());
    b.extend([0xff; 6]);
    b.extend(s.octets());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_are_exact_prefix_covers() {
        assert_eq!(port_range_prefixes(8000, 8015), vec![(8000, 12)]);
        assert_eq!(port_range_prefixes(80, 80), vec![(80, 16)]);
        assert_eq!(port_range_prefixes(0, 65535), vec![(0, 0)]);
        assert_eq!(
            port_range_prefixes(7999, 8016),
            vec![(7999, 16), (8000, 12), (8016, 16)]
        );
    }

    #[test]
    fn lengths_are_consistent() {
        let p = tcp("10.0.0.1:1", "10.0.0.2:2").ip_options(2).frame();
        assert_eq!(p.len(), 14 + 28 + 20);
        assert_eq!(p[14], 0x47);
        assert_eq!(u16::from_be_bytes([p[16], p[17]]), 48);
        let p = udp("[fd00::1]:1", "[fd00::2]:2")
            .ext_headers(&[Ext::HopByHop, Ext::DestOpts])
            .first_fragment(9)
            .frame();
        assert_eq!(p[14 + 6], 0); // hop-by-hop first
        assert_eq!(p[14 + 40], 60); // then destination options
        assert_eq!(p[14 + 48], 44); // then the fragment header
        assert_eq!(p[14 + 56], 17); // then UDP
        assert_eq!(u16::from_be_bytes([p[18], p[19]]) as usize, p.len() - 54);
    }
}
