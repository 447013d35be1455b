//! Finding the pod's host-side veth, in the namespace the plugin runs in
//! (the node's), through rtnetlink.
//!
//! The authoritative way is the peer of `CNI_IFNAME` inside `CNI_NETNS`: a
//! veth's `IFLA_LINK` names its peer's ifindex. When the sandbox is gone or
//! its interface is not a veth, the previous result's host-side interfaces
//! (those without `sandbox`) that are veths here are the fallback; the bridge
//! plugin lists the bridge too, which is not a veth and so drops out.

use std::path::{Path, PathBuf};

use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use netpol_agent::netlink::{NetlinkError, Rtnl, in_netns};

/// A host-side veth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostVeth {
    pub ifindex: u32,
    pub name: String,
}

#[derive(Debug, Clone, Default)]
struct Link {
    index: u32,
    name: String,
    veth: bool,
    /// IFLA_LINK: a veth's peer ifindex (in the peer's namespace).
    peer: Option<u32>,
    /// IFLA_LINK_NETNSID: the peer lives in another namespace.
    peer_netnsid: Option<i32>,
}

fn link(l: &LinkMessage) -> Link {
    let mut out = Link {
        index: l.header.index,
        ..Link::default()
    };
    for a in &l.attributes {
        match a {
            LinkAttribute::IfName(n) => out.name = n.clone(),
            LinkAttribute::LinkInfo(infos) => {
                out.veth = infos
                    .iter()
                    .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)));
            }
            LinkAttribute::Link(p) => out.peer = Some(*p),
            LinkAttribute::LinkNetNsId(id) => out.peer_netnsid = Some(*id),
            _ => {}
        }
    }
    out
}

fn links() -> Result<Vec<Link>, NetlinkError> {
    Ok(Rtnl::new()?.links()?.iter().map(link).collect())
}

/// The host veth whose peer is `ifname` inside the netns at `netns`.
pub fn peer_of(netns: &Path, ifname: &str) -> Result<HostVeth, String> {
    let wanted = ifname.to_string();
    let pod_side = in_netns(PathBuf::from(netns), move || {
        Ok(links()?.into_iter().find(|l| l.name == wanted))
    })
    .map_err(|e| format!("reading {ifname} in {}: {e}", netns.display()))?
    .ok_or_else(|| format!("no interface {ifname} in {}", netns.display()))?;
    let (true, Some(peer), Some(_)) = (pod_side.veth, pod_side.peer, pod_side.peer_netnsid) else {
        return Err(format!(
            "{ifname} in {} is not a veth with its peer in another namespace",
            netns.display()
        ));
    };
    let host = links().map_err(|e| format!("reading the node's links: {e}"))?;
    // The peer index is the host side's only if that link points back at
    // the pod side (indexes are per namespace).
    host.into_iter()
        .find(|l| l.index == peer && l.veth && l.peer == Some(pod_side.index))
        .map(|l| HostVeth {
            ifindex: l.index,
            name: l.name,
        })
        .ok_or_else(|| {
            format!(
                "the peer of {ifname} (ifindex {peer}) is not a veth in this namespace: is the \
                 plugin running in the node's network namespace?"
            )
        })
}

/// Veths here with one of `names` whose peer is in another namespace.
pub fn veths_named(names: &[&str]) -> Result<Vec<HostVeth>, String> {
    let host = links().map_err(|e| format!("reading the node's links: {e}"))?;
    Ok(host
        .into_iter()
        .filter(|l| l.veth && l.peer_netnsid.is_some() && names.contains(&l.name.as_str()))
        .map(|l| HostVeth {
            ifindex: l.index,
            name: l.name,
        })
        .collect())
}

/// The name of the interface with `ifindex` here, if there is one.
pub fn name_of(ifindex: u32) -> Option<String> {
    links()
        .ok()?
        .into_iter()
        .find(|l| l.index == ifindex)
        .map(|l| l.name)
}

/// The pod's host veth: the peer of `ifname` in `netns` if that can be read,
/// else the single veth among the previous result's host interfaces.
pub fn find(netns: Option<&Path>, ifname: &str, prev_host: &[&str]) -> Result<HostVeth, String> {
    let mut why = Vec::new();
    if let Some(netns) = netns {
        match peer_of(netns, ifname) {
            Ok(v) => return Ok(v),
            Err(e) => why.push(e),
        }
    }
    if !prev_host.is_empty() {
        let mut found = veths_named(prev_host)?;
        match found.len() {
            1 => return Ok(found.remove(0)),
            0 => why.push(format!(
                "none of prevResult's host interfaces ({}) is a veth here",
                prev_host.join(", ")
            )),
            _ => why.push(format!(
                "prevResult names several host veths ({}); cannot tell which is the pod's",
                found
                    .iter()
                    .map(|v| v.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    } else {
        why.push("prevResult names no host-side interface".into());
    }
    Err(why.join("; "))
}
