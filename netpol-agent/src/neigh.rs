//! Neighbour announcements for a pod the agent has just started to enforce.
//!
//! Until a veth has an endpoint, the datapath drops all of its traffic, ARP
//! and neighbour discovery included: it cannot tell a pod's own address
//! from a spoofed one before it knows the pod (fail closed). Whatever
//! address resolution ran across the veth meanwhile failed: the node's entry
//! for the pod (a client already dialling it), other bridged pods' entries
//! for it, and the pod's own entries (its gateway, its first DNS server). The
//! kernel asks again only after `retrans_time_ms` (1 s by default), so the
//! pod's first allowed packets waited a second for nothing.
//!
//! Once the endpoint is written, the agent speaks for the pod, from inside
//! the pod's network namespace, out of its interface (so through the veth
//! program, which now checks these frames like any other of the pod's):
//! - a gratuitous ARP for each of its IPv4 addresses (the endpoint's, as the
//!   agent knows them) and an unsolicited
//!   neighbour advertisement (override) for each IPv6 one: the node's and
//!   the bridge neighbours' unresolved entries for the pod take the pod's
//!   MAC at once, and their queued packets leave;
//! - for each of the pod's own entries still unresolved (INCOMPLETE or
//!   FAILED), a fresh ARP request or neighbour solicitation: the answer
//!   resolves it, and the pod's queued packets leave.
//!
//! Nothing here decides a verdict; a failure is logged and costs only the
//! kernel's own retry.

use std::{
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use netlink_packet_route::{
    AddressFamily,
    link::LinkAttribute,
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState},
};

use crate::netlink::{self, NetlinkError, Rtnl, Veth};

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const BROADCAST: [u8; 6] = [0xff; 6];

/// What was sent into one pod's namespace.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Announced {
    /// Gratuitous ARPs and unsolicited advertisements (one per address).
    pub announcements: usize,
    /// Requests for the pod's own unresolved entries.
    pub resolicited: Vec<IpAddr>,
}

/// An Ethernet frame carrying a gratuitous ARP request for `ip`, from `mac`.
pub fn gratuitous_arp(mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    arp_request(mac, ip, ip)
}

/// An Ethernet frame carrying an ARP request "who has `target`? tell
/// `sender` at `mac`", broadcast.
pub fn arp_request(mac: [u8; 6], sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&BROADCAST);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    // Ethernet, IPv4, 6-byte and 4-byte addresses, request.
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&sender.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

/// The ICMPv6 checksum over the IPv6 pseudo-header and `body`.
fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, body: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for c in bytes.chunks(2) {
            let word = u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]);
            sum = sum.wrapping_add(u32::from(word));
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&(body.len() as u32).to_be_bytes());
    add(&[0, 0, 0, 58]);
    add(body);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet frame with an IPv6 ICMPv6 neighbour-discovery message.
fn nd_frame(
    mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    mut icmp: Vec<u8>,
) -> Vec<u8> {
    let csum = icmpv6_checksum(src, dst, &icmp);
    icmp[2..4].copy_from_slice(&csum.to_be_bytes());
    let mut f = Vec::with_capacity(54 + icmp.len());
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    // Next header ICMPv6, hop limit 255 (ND messages with less are ignored).
    f.extend_from_slice(&[58, 255]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&icmp);
    f
}

/// An unsolicited neighbour advertisement for `ip` at `mac` (override set,
/// to all nodes), as a host sends when its link-layer address is new.
pub fn unsolicited_na(mac: [u8; 6], ip: Ipv6Addr) -> Vec<u8> {
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let mut icmp = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
    icmp.extend_from_slice(&ip.octets());
    // Target link-layer address option.
    icmp.extend_from_slice(&[2, 1]);
    icmp.extend_from_slice(&mac);
    nd_frame(mac, [0x33, 0x33, 0, 0, 0, 1], ip, all_nodes, icmp)
}

/// A neighbour solicitation for `target` from `src` at `mac`, to the
/// target's solicited-node multicast address.
pub fn neighbour_solicitation(mac: [u8; 6], src: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let t = target.octets();
    let dst = Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(t[13]),
        u16::from_be_bytes([t[14], t[15]]),
    );
    let dst_mac = [0x33, 0x33, 0xff, t[13], t[14], t[15]];
    let mut icmp = vec![135, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&t);
    // Source link-layer address option.
    icmp.extend_from_slice(&[1, 1]);
    icmp.extend_from_slice(&mac);
    nd_frame(mac, dst_mac, src, dst, icmp)
}

/// A raw packet socket for sending on `ifindex` of the calling thread's
/// namespace.
struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

impl PacketSocket {
    fn open(ifindex: u32) -> io::Result<Self> {
        // Protocol 0: sends only, receives nothing.
        // SAFETY: socket(2) with constant arguments.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            // SAFETY: a fresh descriptor we own.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            ifindex: i32::try_from(ifindex).map_err(io::Error::other)?,
        })
    }

    fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = self.ifindex;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: `frame` and `addr` are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// The most entries of the pod's own table asked for again: a pod controls
/// its table, and must not make the agent send a flood on its behalf.
const MAX_RESOLICIT: usize = 16;

/// In the pod's namespace (the calling thread must be in it): announce `ips`
/// (the endpoint's addresses, as the agent knows them, never what the pod
/// configured) on interface `ifindex`, and re-solicit its unresolved
/// entries.
pub fn announce_here(ifindex: u32, ips: &[IpAddr]) -> Result<Announced, NetlinkError> {
    let mut rtnl = Rtnl::new()?;
    let mac = rtnl
        .links()?
        .into_iter()
        .filter(|l| l.header.index == ifindex)
        .flat_map(|l| l.attributes)
        .find_map(|a| match a {
            LinkAttribute::Address(m) => <[u8; 6]>::try_from(m.as_slice()).ok(),
            _ => None,
        })
        .ok_or_else(|| NetlinkError::Decode(format!("interface {ifindex} has no MAC")))?;
    let v4: Vec<Ipv4Addr> = ips
        .iter()
        .filter_map(|ip| match ip {
            IpAddr::V4(ip) => Some(*ip),
            IpAddr::V6(_) => None,
        })
        .collect();
    let v6: Vec<Ipv6Addr> = ips
        .iter()
        .filter_map(|ip| match ip {
            IpAddr::V6(ip) => Some(*ip),
            IpAddr::V4(_) => None,
        })
        .collect();
    let sock = PacketSocket::open(ifindex)?;
    let mut out = Announced::default();
    for ip in &v4 {
        sock.send(&gratuitous_arp(mac, *ip))?;
        out.announcements += 1;
    }
    for ip in &v6 {
        sock.send(&unsolicited_na(mac, *ip))?;
        out.announcements += 1;
    }
    for n in rtnl.neighbours()? {
        if out.resolicited.len() >= MAX_RESOLICIT {
            break;
        }
        if n.header.ifindex != ifindex
            || !matches!(
                n.header.state,
                NeighbourState::Incomplete | NeighbourState::Failed
            )
        {
            continue;
        }
        let Some(dst) = n.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::Destination(d) => Some(d.clone()),
            _ => None,
        }) else {
            continue;
        };
        match (n.header.family, dst) {
            (AddressFamily::Inet, NeighbourAddress::Inet(target)) => {
                if let Some(src) = v4.first() {
                    sock.send(&arp_request(mac, *src, target))?;
                    out.resolicited.push(IpAddr::V4(target));
                }
            }
            (AddressFamily::Inet6, NeighbourAddress::Inet6(target)) => {
                if let Some(src) = v6.first() {
                    sock.send(&neighbour_solicitation(mac, *src, target))?;
                    out.resolicited.push(IpAddr::V6(target));
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// Announce the pod behind host veth `veth` (see the module docs): finds
/// its namespace by the veth's link netns id, and works from a thread in it.
pub fn announce(veth: &Veth, ips: Vec<IpAddr>) -> Result<Announced, NetlinkError> {
    let (Some(nsid), Some(peer)) = (veth.peer_netnsid, veth.peer_ifindex) else {
        return Err(NetlinkError::Decode(format!(
            "{}: no peer namespace or interface",
            veth.name
        )));
    };
    let mut rtnl = Rtnl::new()?;
    for path in netlink::netns_candidates() {
        let Ok(file) = File::open(&path) else {
            continue;
        };
        if rtnl.nsid_of_fd(file.as_raw_fd())? == Some(nsid) {
            return netlink::in_netns(path, move || announce_here(peer, &ips));
        }
    }
    Err(NetlinkError::Decode(format!(
        "{}: no namespace with id {nsid} found",
        veth.name
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];

    #[test]
    fn a_gratuitous_arp_names_the_pod_as_sender_and_target() {
        let ip = Ipv4Addr::new(10, 244, 1, 7);
        let f = gratuitous_arp(MAC, ip);
        assert_eq!(f.len(), 42);
        assert_eq!(&f[0..6], &BROADCAST);
        assert_eq!(&f[6..12], &MAC);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[20..22], &[0, 1], "a request");
        assert_eq!(&f[22..28], &MAC, "sender MAC");
        assert_eq!(&f[28..32], &ip.octets(), "sender IP");
        assert_eq!(&f[38..42], &ip.octets(), "target IP");
    }

    /// The ICMPv6 checksum is the one the kernel verifies: summing the
    /// pseudo-header and the message with the checksum in place gives 0xffff.
    #[test]
    fn neighbour_discovery_frames_carry_a_valid_checksum() {
        let ip: Ipv6Addr = "fd00:244:1::7".parse().unwrap();
        let target: Ipv6Addr = "fd00:244:1::1".parse().unwrap();
        for (frame, dst) in [
            (
                unsolicited_na(MAC, ip),
                "ff02::1".parse::<Ipv6Addr>().unwrap(),
            ),
            (
                neighbour_solicitation(MAC, ip, target),
                "ff02::1:ff00:1".parse().unwrap(),
            ),
        ] {
            assert_eq!(&frame[12..14], &[0x86, 0xdd]);
            assert_eq!(frame[20], 58, "ICMPv6");
            assert_eq!(frame[21], 255, "hop limit 255");
            assert_eq!(&frame[38..54], &dst.octets());
            let icmp = &frame[54..];
            assert_eq!(
                usize::from(u16::from_be_bytes([frame[18], frame[19]])),
                icmp.len()
            );
            assert_eq!(icmpv6_checksum(ip, dst, icmp), 0, "checksum verifies");
        }
        let na = unsolicited_na(MAC, ip);
        assert_eq!(na[54], 136);
        assert_eq!(na[58] & 0x20, 0x20, "override");
        assert_eq!(&na[62..78], &ip.octets(), "target");
        assert_eq!(&na[80..86], &MAC, "target link-layer address");
        let ns = neighbour_solicitation(MAC, ip, target);
        assert_eq!(&ns[0..6], &[0x33, 0x33, 0xff, 0, 0, 1]);
        assert_eq!(ns[54], 135);
        assert_eq!(&ns[62..78], &target.octets());
    }
}
