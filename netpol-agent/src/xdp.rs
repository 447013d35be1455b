//! XDP on the node's uplinks (issue 17): `netpol_xdp_uplink` on the devices
//! through which other nodes' pods and the rest of the world reach this
//! node, an early drop of new flows a local pod's ingress policy denies
//! (see `netpol-ebpf/src/xdp.rs`). The TC programs on the pod veths still
//! judge every packet: with XDP off, no verdict changes.
//!
//! Which devices: those that the main table's default route and its routes
//! through a gateway (host-gw routes to other nodes' pod CIDRs) leave by,
//! unless `--xdp-devices` names them. Tunnel devices (VXLAN, Geneve) are
//! left out: XDP would see their decapsulated packets only in generic mode,
//! and the encapsulated packets on the underlay device are addressed to the
//! node, so they pass XDP; the pod's veth judges the inner packet.
//!
//! Each attachment is a BPF link pinned at `<root>/links/<ifindex>-xdp`: a
//! restarted agent swaps its program into the pinned link, and
//! `netpol-agent cleanup` (which removes every pin) detaches it.
//!
//! UDP and SCTP are dropped only once the reply records are armed
//! ([`arm_reply_records`], see `netpol_common::XdpReplyConfig`): the agent
//! writes when the records started and conntrack's longest UDP and SCTP
//! timeouts on this node, read from `/proc/sys/net/netfilter`.

use std::{
    collections::{BTreeMap, BTreeSet},
    str::FromStr,
};

use aya::maps::Array;
use aya::programs::{
    Xdp,
    links::{FdLink, PinnedLink},
    xdp::XdpLink,
};
use netlink_packet_route::{
    AddressFamily,
    link::{InfoKind, LinkAttribute, LinkInfo, LinkXdp, XdpAttached},
    route::{RouteAttribute, RouteHeader, RouteType},
};
use netpol_common::{XdpReplyConfig, map_names, prog_names};

use crate::{datapath::Datapath, netlink, pins::Pins};

/// `--xdp`: where (and whether) the XDP program runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XdpMode {
    /// No XDP program; links a previous agent pinned are removed.
    Off,
    /// In the driver only; a device without native XDP is an error.
    Native,
    /// Generic XDP (after the skb is built: saves the stack, not the skb).
    Generic,
    /// Native where the driver has it, generic elsewhere.
    #[default]
    Auto,
}

impl FromStr for XdpMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Self::Off),
            "native" => Ok(Self::Native),
            "generic" => Ok(Self::Generic),
            "auto" => Ok(Self::Auto),
            _ => Err(format!(
                "--xdp {s:?}: expected off, native, generic or auto"
            )),
        }
    }
}

/// The agent's XDP settings.
#[derive(Clone, Debug, Default)]
pub struct XdpConfig {
    pub mode: XdpMode,
    /// Device names that replace the ones found from the routes.
    pub devices: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    #[error("reading routes and links through netlink: {0}")]
    Netlink(#[from] netlink::NetlinkError),
    #[error("attaching {program} to {ifname} (ifindex {ifindex}) in {mode:?} mode: {source}")]
    Attach {
        program: &'static str,
        ifname: String,
        ifindex: u32,
        mode: XdpMode,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("--xdp-devices names {ifname}, which this node does not have")]
    NoSuchDevice { ifname: String },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// Conntrack's timeouts when `/proc/sys/net/netfilter` does not have them
/// (nf_conntrack not loaded yet; it may load later with its defaults): the
/// largest defaults of recent kernels (UDP stream 180 s before 5.9, SCTP
/// established 5 days before 6.0).
const FALLBACK_CONNTRACK_UDP_S: u32 = 180;
const FALLBACK_CONNTRACK_SCTP_S: u32 = 432_000;

/// The longest of the conntrack timeouts in `dir` whose file names start
/// with `prefix` (`nf_conntrack_udp_timeout`, `nf_conntrack_sctp_timeout_`),
/// or `fallback` if there are none.
fn longest_timeout(dir: &std::path::Path, prefix: &str, fallback: u32) -> u32 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return fallback;
    };
    rd.flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(prefix))
        })
        .filter_map(|e| {
            std::fs::read_to_string(e.path())
                .ok()?
                .trim()
                .parse::<u32>()
                .ok()
        })
        .max()
        .unwrap_or(fallback)
}

/// Conntrack's longest UDP and SCTP timeouts in this network namespace.
pub fn conntrack_timeouts() -> (u32, u32) {
    let dir = std::path::Path::new("/proc/sys/net/netfilter");
    (
        longest_timeout(dir, "nf_conntrack_udp_timeout", FALLBACK_CONNTRACK_UDP_S),
        longest_timeout(dir, "nf_conntrack_sctp_timeout_", FALLBACK_CONNTRACK_SCTP_S),
    )
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Arm the XDP program's UDP/SCTP drops: the first time (a fresh map), the
/// records start now; a restarted agent keeps the start a previous agent
/// wrote (the pinned records are still valid). Conntrack's timeouts are only
/// ever raised: a flow conntrack keeps under an older, longer timeout must
/// not lose its record. Returns what the datapath now has.
pub fn arm_reply_records(dp: &mut Datapath) -> Result<XdpReplyConfig, XdpError> {
    let map = map_names::XDP_CONFIG;
    let (udp, sctp) = conntrack_timeouts();
    let mut m: Array<_, XdpReplyConfig> = Array::try_from(
        dp.ebpf_mut()
            .map_mut(map)
            .expect("NETPOL_XDP_CFG is in the object"),
    )
    .map_err(|source| XdpError::Map { map, source })?;
    let old = m
        .get(&0, 0)
        .map_err(|source| XdpError::Map { map, source })?;
    let new = XdpReplyConfig {
        records_since_ns: if old.records_since_ns == 0 {
            monotonic_ns()
        } else {
            old.records_since_ns
        },
        conntrack_udp_s: old.conntrack_udp_s.max(udp),
        conntrack_sctp_s: old.conntrack_sctp_s.max(sctp),
    };
    if new != old {
        m.set(0, new, 0)
            .map_err(|source| XdpError::Map { map, source })?;
        tracing::info!(
            conntrack_udp_s = new.conntrack_udp_s,
            conntrack_sctp_s = new.conntrack_sctp_s,
            "XDP reply records armed: UDP/SCTP drops start once a reply window has passed"
        );
    }
    Ok(new)
}

/// The devices to attach to: `cfg.devices` by name, else the uplinks.
pub fn devices(cfg: &XdpConfig) -> Result<BTreeMap<u32, String>, XdpError> {
    if cfg.devices.is_empty() {
        return uplinks();
    }
    cfg.devices
        .iter()
        .map(|name| {
            let c = std::ffi::CString::new(name.as_str()).map_err(|_| XdpError::NoSuchDevice {
                ifname: name.clone(),
            })?;
            // SAFETY: a valid C string.
            match unsafe { libc::if_nametoindex(c.as_ptr()) } {
                0 => Err(XdpError::NoSuchDevice {
                    ifname: name.clone(),
                }),
                i => Ok((i, name.clone())),
            }
        })
        .collect()
}

/// The devices the main table's default routes and gateway routes leave by,
/// tunnels excepted.
pub fn uplinks() -> Result<BTreeMap<u32, String>, XdpError> {
    let mut rtnl = netlink::Rtnl::new()?;
    let mut names = BTreeMap::new();
    let mut tunnels = BTreeSet::new();
    for l in rtnl.links()? {
        for a in &l.attributes {
            match a {
                LinkAttribute::IfName(n) => {
                    names.insert(l.header.index, n.clone());
                }
                LinkAttribute::LinkInfo(infos)
                    if infos.iter().any(|i| {
                        matches!(i, LinkInfo::Kind(InfoKind::Vxlan | InfoKind::Geneve))
                    }) =>
                {
                    tunnels.insert(l.header.index);
                }
                _ => {}
            }
        }
    }
    let mut out = BTreeMap::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        for r in rtnl.routes(family)? {
            let table = r
                .attributes
                .iter()
                .find_map(|a| match a {
                    RouteAttribute::Table(t) => Some(*t),
                    _ => None,
                })
                .unwrap_or(u32::from(r.header.table));
            if table != u32::from(RouteHeader::RT_TABLE_MAIN) || r.header.kind != RouteType::Unicast
            {
                continue;
            }
            let default = r.header.destination_prefix_length == 0;
            let gateway = r
                .attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Gateway(_)));
            if !(default || gateway) {
                continue;
            }
            let oif = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            });
            if let Some(i) = oif
                && !tunnels.contains(&i)
                && let Some(name) = names.get(&i)
            {
                out.insert(i, name.clone());
            }
        }
    }
    Ok(out)
}

/// How the kernel runs XDP on `ifindex`, as the link's `IFLA_XDP` says:
/// "native" (in the driver), "generic" (after the skb), "offload" (on the
/// NIC), several of them ("native+generic", ...), "none", or "gone" when
/// the device no longer exists. What the agent asked for (`--xdp auto`) is
/// not always what runs: this is.
pub fn kernel_mode(ifindex: u32) -> Result<String, XdpError> {
    let mut rtnl = netlink::Rtnl::new()?;
    let Some(link) = rtnl
        .links()?
        .into_iter()
        .find(|l| l.header.index == ifindex)
    else {
        return Ok("gone".to_string());
    };
    Ok(mode_of(&link.attributes))
}

/// The mode `IFLA_XDP` reports, in `kernel_mode`'s words.
fn mode_of(attributes: &[LinkAttribute]) -> String {
    let Some(xdp) = attributes.iter().find_map(|a| match a {
        LinkAttribute::Xdp(x) => Some(x),
        _ => None,
    }) else {
        return "none".to_string();
    };
    let attached = xdp.iter().find_map(|x| match x {
        LinkXdp::Attached(a) => Some(a),
        _ => None,
    });
    match attached {
        Some(XdpAttached::Driver) => "native".to_string(),
        Some(XdpAttached::SocketBuffer) => "generic".to_string(),
        Some(XdpAttached::Hardware) => "offload".to_string(),
        Some(XdpAttached::Multiple) => {
            let modes: Vec<&str> = xdp
                .iter()
                .filter_map(|x| match x {
                    LinkXdp::DrvProgId(_) => Some("native"),
                    LinkXdp::SkbProgId(_) => Some("generic"),
                    LinkXdp::HwProgId(_) => Some("offload"),
                    _ => None,
                })
                .collect();
            modes.join("+")
        }
        Some(XdpAttached::Other(n)) => format!("unknown ({n})"),
        Some(XdpAttached::None) | None => "none".to_string(),
        Some(_) => "unknown".to_string(),
    }
}

/// Interfaces with a pinned XDP link under `pins`.
pub fn attached(pins: &Pins) -> BTreeSet<u32> {
    std::fs::read_dir(pins.links_dir())
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    e.file_name()
                        .to_str()?
                        .strip_suffix("-xdp")?
                        .parse::<u32>()
                        .ok()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Remove the XDP program from `ifindex` (unpinning destroys the link).
pub fn detach(pins: &Pins, ifindex: u32) {
    let _ = std::fs::remove_file(pins.xdp_link(ifindex));
}

/// Attach `netpol_xdp_uplink` to `ifname`, or swap it into the link a
/// previous agent pinned there. Returns the mode it runs in.
pub fn attach(
    dp: &mut Datapath,
    ifindex: u32,
    ifname: &str,
    mode: XdpMode,
) -> Result<XdpMode, XdpError> {
    let path = dp.pins().xdp_link(ifindex);
    let program = prog_names::XDP_UPLINK;
    let err = |mode, source: Box<dyn std::error::Error + Send + Sync>| XdpError::Attach {
        program,
        ifname: ifname.to_string(),
        ifindex,
        mode,
        source,
    };
    // A link running this object's program (a restart): kept as it is.
    if dp.adoptable(&path, program) {
        return Ok(mode);
    }
    let prog: &mut Xdp = dp
        .ebpf_mut()
        .program_mut(program)
        .expect("program is in the object")
        .try_into()
        .map_err(|e| err(mode, Box::new(e)))?;
    if path.exists() {
        let adopted = PinnedLink::from_pin(&path)
            .map_err(|e| err(mode, Box::new(e)))
            .and_then(|pinned| {
                let link: XdpLink = FdLink::from(pinned)
                    .try_into()
                    .map_err(|e: aya::programs::links::LinkError| err(mode, Box::new(e)))?;
                let id = prog
                    .attach_to_link(link)
                    .map_err(|e| err(mode, Box::new(e)))?;
                // Ownership back out of the program, so that dropping the
                // program never detaches; the pin keeps the link alive.
                let link = prog.take_link(id).map_err(|e| err(mode, Box::new(e)))?;
                drop(link);
                Ok(())
            });
        match adopted {
            // The pinned link keeps the mode it was created with.
            Ok(()) => return Ok(mode),
            Err(e) => {
                tracing::warn!(ifname, ifindex, "stale XDP link pin: {e}");
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    let tries: &[(XdpMode, aya::programs::XdpMode)] = match mode {
        XdpMode::Off => return Ok(XdpMode::Off),
        XdpMode::Native => &[(XdpMode::Native, aya::programs::XdpMode::Driver)],
        XdpMode::Generic => &[(XdpMode::Generic, aya::programs::XdpMode::Skb)],
        XdpMode::Auto => &[
            (XdpMode::Native, aya::programs::XdpMode::Driver),
            (XdpMode::Generic, aya::programs::XdpMode::Skb),
        ],
    };
    let mut last = None;
    for (ours, theirs) in tries {
        match prog.attach_to_if_index(ifindex, *theirs) {
            Ok(id) => {
                let link = prog.take_link(id).map_err(|e| err(*ours, Box::new(e)))?;
                let fd: FdLink = link
                    .try_into()
                    .map_err(|e: aya::programs::links::LinkError| err(*ours, Box::new(e)))?;
                fd.pin(&path).map_err(|e| err(*ours, Box::new(e)))?;
                return Ok(*ours);
            }
            Err(e) => last = Some(err(*ours, Box::new(e))),
        }
    }
    Err(last.expect("at least one mode tried"))
}

/// Bring the node's XDP attachments in line with `cfg`: attach where
/// missing (once per run, adopting pinned links), detach from devices no
/// longer selected. Returns the errors, for the caller to log.
/// `attached` is what the kernel runs on each device this agent put XDP on:
/// device name -> [`kernel_mode`], for the status and the metrics.
pub fn reconcile(
    dp: &mut Datapath,
    cfg: &XdpConfig,
    this_run: &mut BTreeSet<u32>,
    attached_modes: &mut BTreeMap<String, String>,
) -> Vec<String> {
    let pins = dp.pins().clone();
    let mut errors = Vec::new();
    // Before the program is attached (also with --xdp off: the records are
    // kept by `netpol_post_nat` whatever the mode, so that turning XDP on
    // later finds them).
    if let Err(e) = arm_reply_records(dp) {
        errors.push(e.to_string());
    }
    let wanted = if cfg.mode == XdpMode::Off {
        BTreeMap::new()
    } else {
        match devices(cfg) {
            Ok(d) => d,
            Err(e) => {
                errors.push(e.to_string());
                return errors;
            }
        }
    };
    for (ifindex, name) in &wanted {
        if this_run.contains(ifindex) {
            continue;
        }
        match attach(dp, *ifindex, name, cfg.mode) {
            Ok(mode) => {
                // What runs, read back from the link (an adopted link keeps
                // the mode it was created with, whatever was asked now).
                let kernel = kernel_mode(*ifindex).unwrap_or_else(|e| format!("unknown ({e})"));
                tracing::info!(
                    ifname = %name,
                    ifindex,
                    requested = ?cfg.mode,
                    tried = ?mode,
                    kernel = %kernel,
                    "XDP attached"
                );
                if cfg.mode == XdpMode::Native && kernel != "native" {
                    errors.push(format!(
                        "--xdp native on {name} (ifindex {ifindex}): the kernel runs XDP there \
                         in mode {kernel}"
                    ));
                }
                attached_modes.insert(name.clone(), kernel);
                this_run.insert(*ifindex);
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    for ifindex in attached(&pins) {
        if !wanted.contains_key(&ifindex) {
            detach(&pins, ifindex);
            this_run.remove(&ifindex);
            tracing::info!(ifindex, "XDP detached");
        }
    }
    attached_modes.retain(|name, _| wanted.values().any(|n| n == name));
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse() {
        assert_eq!("auto".parse::<XdpMode>(), Ok(XdpMode::Auto));
        assert_eq!("off".parse::<XdpMode>(), Ok(XdpMode::Off));
        assert_eq!("native".parse::<XdpMode>(), Ok(XdpMode::Native));
        assert_eq!("generic".parse::<XdpMode>(), Ok(XdpMode::Generic));
        assert!("on".parse::<XdpMode>().is_err());
    }

    #[test]
    fn the_kernel_mode_is_read_from_ifla_xdp() {
        let xdp = |v: Vec<LinkXdp>| vec![LinkAttribute::Xdp(v)];
        assert_eq!(mode_of(&[]), "none");
        assert_eq!(
            mode_of(&xdp(vec![LinkXdp::Attached(XdpAttached::None)])),
            "none"
        );
        assert_eq!(
            mode_of(&xdp(vec![
                LinkXdp::Attached(XdpAttached::Driver),
                LinkXdp::ProgId(7)
            ])),
            "native"
        );
        assert_eq!(
            mode_of(&xdp(vec![LinkXdp::Attached(XdpAttached::SocketBuffer)])),
            "generic"
        );
        assert_eq!(
            mode_of(&xdp(vec![LinkXdp::Attached(XdpAttached::Hardware)])),
            "offload"
        );
        assert_eq!(
            mode_of(&xdp(vec![
                LinkXdp::Attached(XdpAttached::Multiple),
                LinkXdp::DrvProgId(7),
                LinkXdp::SkbProgId(8),
            ])),
            "native+generic"
        );
    }

    #[test]
    fn conntrack_timeouts_are_the_longest_or_the_fallback() {
        let dir = std::env::temp_dir().join(format!("netpol-ct-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(longest_timeout(&dir, "nf_conntrack_udp_timeout", 180), 180);
        std::fs::write(dir.join("nf_conntrack_udp_timeout"), "30\n").unwrap();
        std::fs::write(dir.join("nf_conntrack_udp_timeout_stream"), "120\n").unwrap();
        std::fs::write(dir.join("nf_conntrack_sctp_timeout_established"), "210\n").unwrap();
        assert_eq!(longest_timeout(&dir, "nf_conntrack_udp_timeout", 180), 120);
        assert_eq!(longest_timeout(&dir, "nf_conntrack_sctp_timeout_", 9), 210);
        assert_eq!(longest_timeout(&dir.join("absent"), "x", 5), 5);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
