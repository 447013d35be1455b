//! Finding local pods' host-side interfaces through rtnetlink (no shelling
//! out to `ip`):
//! - routed CNIs (Calico-like): a /32 or /128 route whose output interface
//!   is a veth names that pod IP's interface;
//! - bridged CNIs (flannel/bridge-like): FDB and neighbour tables fill only
//!   after the pod has sent traffic, so the addresses are read from the
//!   veth's peer inside the pod's network namespace (the veth's link netns
//!   id, matched against `/run/netns/*` and `/proc/*/ns/net`).
//!
//! Also the node's own addresses (host-to-pod traffic is allowed).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs::File,
    net::IpAddr,
    os::fd::AsRawFd,
    path::PathBuf,
};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage, AddressScope},
    link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
    neighbour::NeighbourMessage,
    nsid::{NsidAttribute, NsidMessage},
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteType},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("netlink: decoding a reply: {0}")]
    Decode(String),
    #[error("netlink: the kernel answered {request} with error {code}")]
    Kernel { request: &'static str, code: i32 },
    #[error("entering network namespace {path}: {source}")]
    Setns {
        path: String,
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, NetlinkError>;

/// A host-side interface that may belong to a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Veth {
    pub ifindex: u32,
    pub name: String,
    /// Bridge the veth is a port of.
    pub controller: Option<u32>,
    /// The peer's ifindex, inside the peer's netns.
    pub peer_ifindex: Option<u32>,
    /// The peer's netns id, as seen from this netns.
    pub peer_netnsid: Option<i32>,
    pub up: bool,
}

/// What the node looks like right now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeView {
    /// Every veth in the node's namespace, by ifindex.
    pub veths: BTreeMap<u32, Veth>,
    /// Pod addresses found per veth (routes and peer addresses).
    pub addresses: BTreeMap<u32, BTreeSet<IpAddr>>,
    /// The node's own addresses (global scope, every interface).
    pub node_addresses: BTreeSet<IpAddr>,
    /// Veths that carry one of the node's own addresses (uplinks, not pods).
    pub node_veths: BTreeSet<u32>,
    /// The pod-side MAC behind a veth, where the agent read it (bridged pods:
    /// a forged MAC there poisons the bridge).
    pub peer_macs: BTreeMap<u32, [u8; 6]>,
    /// The node's other Ethernet devices (uplinks, tunnels; not bridges,
    /// not veths), by ifindex: name.
    pub devices: BTreeMap<u32, String>,
}

impl NodeView {
    /// Where pods' packets leave the node after the DNAT: the Ethernet
    /// devices and the veths that carry the node's own addresses (uplinks).
    pub fn post_nat_devices(&self) -> BTreeMap<u32, String> {
        let mut out = self.devices.clone();
        for i in &self.node_veths {
            if let Some(v) = self.veths.get(i) {
                out.insert(*i, v.name.clone());
            }
        }
        out
    }
}

impl NodeView {
    /// The veth that carries `ip`, if any.
    pub fn ifindex_of(&self, ip: IpAddr) -> Option<u32> {
        self.addresses
            .iter()
            .find(|(_, ips)| ips.contains(&ip))
            .map(|(i, _)| *i)
    }
}

/// A connected rtnetlink socket with its own sequence numbers.
pub struct Rtnl {
    sock: Socket,
    seq: u32,
}

impl Rtnl {
    pub fn new() -> Result<Self> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        Ok(Self { sock, seq: 0 })
    }

    /// Send a request (a dump when `dump`) and collect every reply message.
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        dump: bool,
        what: &'static str,
    ) -> Result<Vec<RouteNetlinkMessage>> {
        self.seq += 1;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | if dump { NLM_F_DUMP } else { 0 };
        header.sequence_number = self.seq;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        nl.finalize();
        let mut buf = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut buf);
        self.sock.send(&buf, 0)?;

        let mut out = Vec::new();
        let mut rbuf = vec![0u8; 1 << 16];
        loop {
            let n = self.sock.recv(&mut &mut rbuf[..], 0)?;
            let mut off = 0;
            while off < n {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rbuf[off..n])
                    .map_err(|e| NetlinkError::Decode(e.to_string()))?;
                let len = msg.header.length as usize;
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(out), // an ACK
                            Some(code) => Err(NetlinkError::Kernel {
                                request: what,
                                code: code.get(),
                            }),
                        };
                    }
                    NetlinkPayload::InnerMessage(m) => {
                        out.push(m);
                        if !dump {
                            return Ok(out);
                        }
                    }
                    _ => {}
                }
                if len == 0 {
                    break;
                }
                off += len;
            }
        }
    }

    pub fn links(&mut self) -> Result<Vec<LinkMessage>> {
        let msgs = self.request(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            true,
            "link dump",
        )?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })
            .collect())
    }

    pub fn addresses(&mut self) -> Result<Vec<AddressMessage>> {
        let msgs = self.request(
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            true,
            "address dump",
        )?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => Some(a),
                _ => None,
            })
            .collect())
    }

    pub fn routes(&mut self, family: AddressFamily) -> Result<Vec<RouteMessage>> {
        let mut req = RouteMessage::default();
        req.header.address_family = family;
        let msgs = self.request(RouteNetlinkMessage::GetRoute(req), true, "route dump")?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => Some(r),
                _ => None,
            })
            .collect())
    }

    /// The neighbour tables (ARP and NDP) of every interface.
    pub fn neighbours(&mut self) -> Result<Vec<NeighbourMessage>> {
        let msgs = self.request(
            RouteNetlinkMessage::GetNeighbour(NeighbourMessage::default()),
            true,
            "neighbour dump",
        )?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) => Some(n),
                _ => None,
            })
            .collect())
    }

    /// The id this netns gives to the netns behind `fd` (None: unassigned).
    pub fn nsid_of_fd(&mut self, fd: i32) -> Result<Option<i32>> {
        let mut req = NsidMessage::default();
        req.attributes.push(NsidAttribute::Fd(fd as u32));
        let msgs = self.request(RouteNetlinkMessage::GetNsId(req), false, "nsid lookup")?;
        for m in msgs {
            if let RouteNetlinkMessage::NewNsId(m) = m {
                for a in m.attributes {
                    if let NsidAttribute::Id(id) = a {
                        return Ok((id >= 0).then_some(id));
                    }
                }
            }
        }
        Ok(None)
    }
}

fn link_to_veth(l: &LinkMessage) -> Option<Veth> {
    let mut name = None;
    let mut is_veth = false;
    let mut controller = None;
    let mut peer_ifindex = None;
    let mut peer_netnsid = None;
    for a in &l.attributes {
        match a {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::LinkInfo(infos) => {
                is_veth = infos
                    .iter()
                    .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)));
            }
            LinkAttribute::Controller(c) => controller = Some(*c),
            LinkAttribute::Link(p) => peer_ifindex = Some(*p),
            LinkAttribute::LinkNetNsId(id) => peer_netnsid = Some(*id),
            _ => {}
        }
    }
    is_veth.then(|| Veth {
        ifindex: l.header.index,
        name: name.unwrap_or_default(),
        controller,
        peer_ifindex,
        peer_netnsid,
        up: l.header.flags.contains(LinkFlags::Up),
    })
}

/// An Ethernet device that is neither a veth nor a bridge (nor loopback).
fn link_to_device(l: &LinkMessage) -> Option<(u32, String)> {
    use netlink_packet_route::link::LinkLayerType;
    if l.header.link_layer_type != LinkLayerType::Ether {
        return None;
    }
    let mut name = None;
    for a in &l.attributes {
        match a {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::LinkInfo(infos)
                if infos
                    .iter()
                    .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Bridge | InfoKind::Veth))) =>
            {
                return None;
            }
            _ => {}
        }
    }
    Some((l.header.index, name.unwrap_or_default()))
}

fn address_of(a: &AddressMessage) -> Option<IpAddr> {
    a.attributes.iter().find_map(|at| match at {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    })
}

/// Every network namespace file we can see: named ones first, then those
/// of running processes (deduplicated by inode).
pub(crate) fn netns_candidates() -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt as _;
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    let mut push = |p: PathBuf| {
        if let Ok(m) = std::fs::metadata(&p)
            && seen.insert((m.dev(), m.ino()))
        {
            out.push(p);
        }
    };
    if let Ok(rd) = std::fs::read_dir("/run/netns") {
        let mut v: Vec<_> = rd.flatten().map(|e| e.path()).collect();
        v.sort();
        v.into_iter().for_each(&mut push);
    }
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            if e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
            {
                push(e.path().join("ns/net"));
            }
        }
    }
    out
}

/// Run `f` on a fresh thread that has entered the netns at `path` (only
/// that thread changes namespace).
pub fn in_netns<T: Send + 'static>(
    path: PathBuf,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    std::thread::spawn(move || {
        let file = File::open(&path).map_err(|e| NetlinkError::Setns {
            path: path.display().to_string(),
            source: e,
        })?;
        // SAFETY: setns on this thread only, with a valid netns fd.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(NetlinkError::Setns {
                path: path.display().to_string(),
                source: std::io::Error::last_os_error(),
            });
        }
        f()
    })
    .join()
    .expect("netns thread panicked")
}

/// Look at the node's namespace (the one this process is in).
pub fn discover() -> Result<NodeView> {
    let mut rtnl = Rtnl::new()?;
    let mut view = NodeView::default();
    for l in rtnl.links()? {
        if let Some(v) = link_to_veth(&l) {
            view.veths.insert(v.ifindex, v);
        } else if let Some((i, name)) = link_to_device(&l) {
            view.devices.insert(i, name);
        }
    }

    // Routed: host routes to veths.
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        for r in rtnl.routes(family)? {
            let full = if family == AddressFamily::Inet {
                32
            } else {
                128
            };
            // Unicast host routes only: the local table's local, broadcast
            // and anycast routes name the node's own addresses.
            if r.header.destination_prefix_length != full || r.header.kind != RouteType::Unicast {
                continue;
            }
            let mut dst = None;
            let mut oif = None;
            for a in &r.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(ip)) => {
                        dst = Some(IpAddr::V4(*ip))
                    }
                    RouteAttribute::Destination(RouteAddress::Inet6(ip)) => {
                        dst = Some(IpAddr::V6(*ip))
                    }
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            if let (Some(ip), Some(oif)) = (dst, oif)
                && view.veths.contains_key(&oif)
            {
                view.addresses.entry(oif).or_default().insert(ip);
            }
        }
    }

    // Node addresses.
    for a in rtnl.addresses()? {
        if a.header.scope != AddressScope::Universe {
            continue;
        }
        if let Some(ip) = address_of(&a)
            && !ip.is_loopback()
        {
            view.node_addresses.insert(ip);
            if view.veths.contains_key(&a.header.index) {
                view.node_veths.insert(a.header.index);
            }
        }
    }

    // Bridged (and any veth without a host route): the peer's addresses in
    // the pod's namespace.
    let wanted: HashMap<i32, Vec<(u32, u32)>> = view
        .veths
        .values()
        .filter(|v| !view.addresses.contains_key(&v.ifindex))
        .filter_map(|v| Some((v.peer_netnsid?, (v.ifindex, v.peer_ifindex?))))
        .fold(HashMap::new(), |mut m, (id, pair)| {
            m.entry(id).or_default().push(pair);
            m
        });
    if !wanted.is_empty() {
        for path in netns_candidates() {
            let Ok(file) = File::open(&path) else {
                continue;
            };
            let Ok(Some(id)) = rtnl.nsid_of_fd(file.as_raw_fd()) else {
                continue;
            };
            let Some(pairs) = wanted.get(&id) else {
                continue;
            };
            let pairs = pairs.clone();
            let found = in_netns(path.clone(), move || {
                let mut rtnl = Rtnl::new()?;
                let addrs = rtnl.addresses()?;
                let links = rtnl.links()?;
                let mut out: Vec<(u32, IpAddr)> = Vec::new();
                let mut macs: Vec<(u32, [u8; 6])> = Vec::new();
                for (host_if, peer_if) in pairs {
                    for a in &addrs {
                        if a.header.index == peer_if
                            && a.header.scope == AddressScope::Universe
                            && let Some(ip) = address_of(a)
                        {
                            out.push((host_if, ip));
                        }
                    }
                    for l in links.iter().filter(|l| l.header.index == peer_if) {
                        for attr in &l.attributes {
                            if let LinkAttribute::Address(mac) = attr
                                && let Ok(mac) = <[u8; 6]>::try_from(mac.as_slice())
                            {
                                macs.push((host_if, mac));
                            }
                        }
                    }
                }
                Ok((out, macs))
            });
            match found {
                Ok((found, macs)) => {
                    for (host_if, ip) in found {
                        view.addresses.entry(host_if).or_default().insert(ip);
                    }
                    view.peer_macs.extend(macs);
                }
                Err(e) => tracing::debug!(netns = %path.display(), "reading peer addresses: {e}"),
            }
        }
    }
    Ok(view)
}

/// A socket subscribed to link, address and route changes: readable when
/// something changed (the caller re-runs [`discover`]).
pub fn subscribe() -> Result<Socket> {
    let mut sock = Socket::new(NETLINK_ROUTE)?;
    // RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE |
    // RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE
    let groups = 0x1 | 0x10 | 0x40 | 0x100 | 0x400;
    sock.bind(&SocketAddr::new(0, groups))?;
    Ok(sock)
}
