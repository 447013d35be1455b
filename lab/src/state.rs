//! What a lab is once planned: names, addresses, interfaces and server pids.
//!
//! [`LabState::plan`] is a pure function from a [`ClusterSpec`] to the full state (no kernel
//! involved, unit tested); `up` then creates what the plan says and records server pids, and
//! saves the state as `/run/netpol-lab/<lab>/state.json` so that `probe`, `down` and library
//! users can work from the lab name alone ([`LabState::load`]).
//!
//! # Naming
//! * Network namespaces: `nplab_<lab>_fabric`, `nplab_<lab>_node_<node>`,
//!   `nplab_<lab>_pod_<namespace>_<pod>`. Lab names are DNS labels, so they contain no `_` and
//!   the prefix `nplab_<lab>_` of one lab is never a prefix of another lab's netns.
//! * Interfaces are created directly inside their namespaces (never in the root namespace), so
//!   they only need to be unique per namespace and carry no lab prefix: `eth0` in pods and nodes,
//!   `br0` and `n<i>` in the fabric, `cni0`, `cali<11 hex>` and `veth<8 hex>` in nodes.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::Write,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::spec::{Attachment, ClusterSpec, PortSpec, Protocol};

/// Where labs keep their state: `<STATE_ROOT>/<lab>/state.json`.
pub const STATE_ROOT: &str = "/run/netpol-lab";
/// Where `ip netns` keeps named network namespaces.
pub const NETNS_DIR: &str = "/run/netns";
/// Every netns the lab creates starts with this.
pub const NETNS_PREFIX: &str = "nplab_";

/// Routed pods' IPv4 gateway: a link-local address nobody owns, answered by proxy ARP.
pub const ROUTED_GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// Routed pods' IPv6 gateway, assigned to every host-side `cali*` veth.
pub const ROUTED_GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// Host index of the fabric gateway (a sink in the fabric netns, see README).
pub const FABRIC_GATEWAY_HOST: u32 = 254;

/// Errors loading or saving lab state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("lab {lab:?} is not up (no {path})")]
    NotFound { lab: String, path: PathBuf },
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt state file {path}: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// An IP family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Family {
    #[serde(rename = "IPv4")]
    V4,
    #[serde(rename = "IPv6")]
    V6,
}

impl Family {
    /// `IPv4` or `IPv6`.
    pub fn as_str(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    /// The family of an address.
    pub fn of(ip: &IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A whole lab, as planned and (after `up`) as running.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabState {
    pub name: String,
    /// The cluster file the lab was made from.
    pub spec: ClusterSpec,
    /// `/run/netpol-lab/<lab>`.
    pub state_dir: PathBuf,
    /// Where the Namespace, Pod and Node manifests are written (and NetworkPolicies dropped).
    pub manifests_dir: PathBuf,
    pub fabric: FabricState,
    pub nodes: Vec<NodeState>,
    pub pods: Vec<PodState>,
    /// Manifest files the lab wrote (removed again by `down`).
    pub manifests: Vec<PathBuf>,
}

/// The netns that links the nodes: a bridge `br0` with one port per node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FabricState {
    pub netns: String,
    pub bridge: String,
    pub cidr_v4: Ipv4Net,
    pub cidr_v6: Ipv6Net,
    /// Address of `br0`: the nodes' default gateway, a sink (forwarding is off in the fabric).
    pub gateway_v4: Ipv4Addr,
    pub gateway_v6: Ipv6Addr,
}

/// One node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    pub name: String,
    pub netns: String,
    pub attachment: Attachment,
    pub uid: String,
    pub pod_cidr_v4: Ipv4Net,
    pub pod_cidr_v6: Ipv6Net,
    /// The node's address on the fabric (its `eth0`), its InternalIP.
    pub ip_v4: Ipv4Addr,
    pub ip_v6: Ipv6Addr,
    /// Name of the node's link in the fabric netns (peer of the node's `eth0`).
    pub fabric_port: String,
    /// The pods' default gateways: link-local for routed nodes, `cni0`'s addresses for bridged.
    pub gateway_v4: Ipv4Addr,
    pub gateway_v6: Ipv6Addr,
}

impl NodeState {
    /// `/run/netns/<netns>`: what `setns`/`nsenter --net=` take.
    pub fn netns_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.netns)
    }

    /// The node's fabric address of a family.
    pub fn ip(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => self.ip_v4.into(),
            Family::V6 => self.ip_v6.into(),
        }
    }
}

/// One pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodState {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub netns: String,
    pub uid: String,
    pub ip_v4: Ipv4Addr,
    pub ip_v6: Ipv6Addr,
    /// Host-side veth in the node netns (`cali…` routed, `veth…` bridged); the pod side is `eth0`.
    pub host_veth: String,
    pub labels: BTreeMap<String, String>,
    pub ports: Vec<PortSpec>,
    /// Pid of the pod's `netpol-lab serve` process, once started.
    pub server_pid: Option<u32>,
}

impl PodState {
    /// `namespace/name`, the pod's name in truth tables and server answers.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// `/run/netns/<netns>`.
    pub fn netns_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.netns)
    }

    /// The pod's address of a family.
    pub fn ip(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => self.ip_v4.into(),
            Family::V6 => self.ip_v6.into(),
        }
    }

    /// Ports of a protocol, in file order, deduplicated.
    pub fn ports_of(&self, protocol: Protocol) -> Vec<u16> {
        let mut seen = BTreeSet::new();
        self.ports
            .iter()
            .filter(|p| p.protocol == protocol && seen.insert(p.port))
            .map(|p| p.port)
            .collect()
    }
}

/// `/run/netpol-lab/<lab>`.
pub fn state_dir(lab: &str) -> PathBuf {
    Path::new(STATE_ROOT).join(lab)
}

/// `/run/netpol-lab/<lab>/state.json`.
pub fn state_file(lab: &str) -> PathBuf {
    state_dir(lab).join("state.json")
}

/// `/run/netpol-lab/<lab>/manifests`.
pub fn default_manifests_dir(lab: &str) -> PathBuf {
    state_dir(lab).join("manifests")
}

/// `nplab_<lab>_`: the prefix of every netns of a lab.
pub fn netns_prefix(lab: &str) -> String {
    format!("{NETNS_PREFIX}{lab}_")
}

impl LabState {
    /// Plans a lab: every name and address, deterministically from the spec (nodes get fabric
    /// hosts 1, 2, ... in file order; pods get hosts 2, 3, ... of their node's CIDRs in file
    /// order). The spec must be valid ([`ClusterSpec::validate`]).
    pub fn plan(spec: &ClusterSpec, manifests_dir: Option<PathBuf>) -> LabState {
        let lab = spec.name.as_str();
        let prefix = netns_prefix(lab);
        let fabric = FabricState {
            netns: format!("{prefix}fabric"),
            bridge: "br0".to_owned(),
            cidr_v4: spec.fabric.cidr,
            cidr_v6: spec.fabric.cidr_v6,
            gateway_v4: host4(&spec.fabric.cidr, FABRIC_GATEWAY_HOST),
            gateway_v6: host6(&spec.fabric.cidr_v6, FABRIC_GATEWAY_HOST.into()),
        };
        let nodes: Vec<NodeState> = spec
            .nodes
            .iter()
            .enumerate()
            .map(|(i, node)| {
                let host = u32::try_from(i).expect("at most 253 nodes") + 1;
                let (gateway_v4, gateway_v6) = match node.attachment {
                    Attachment::Routed => (ROUTED_GATEWAY_V4, ROUTED_GATEWAY_V6),
                    Attachment::Bridged => (host4(&node.pod_cidr, 1), host6(&node.pod_cidr_v6, 1)),
                };
                NodeState {
                    name: node.name.clone(),
                    netns: format!("{prefix}node_{}", node.name),
                    attachment: node.attachment,
                    uid: uid(&[lab, "node", &node.name]),
                    pod_cidr_v4: node.pod_cidr,
                    pod_cidr_v6: node.pod_cidr_v6,
                    ip_v4: host4(&spec.fabric.cidr, host),
                    ip_v6: host6(&spec.fabric.cidr_v6, host.into()),
                    fabric_port: format!("n{i}"),
                    gateway_v4,
                    gateway_v6,
                }
            })
            .collect();

        let mut next_host: BTreeMap<&str, u32> = BTreeMap::new();
        let mut veths: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
        let pods = spec
            .pods
            .iter()
            .map(|pod| {
                let node = nodes
                    .iter()
                    .find(|n| n.name == pod.node)
                    .expect("validated: pods reference declared nodes");
                let host = next_host.entry(node.name.as_str()).or_insert(2);
                let (ip_v4, ip_v6) = (
                    host4(&node.pod_cidr_v4, *host),
                    host6(&node.pod_cidr_v6, (*host).into()),
                );
                *host += 1;
                let taken = veths.entry(node.name.as_str()).or_default();
                let host_veth = host_veth_name(node.attachment, &pod.namespace, &pod.name, taken);
                taken.insert(host_veth.clone());
                PodState {
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                    node: pod.node.clone(),
                    netns: format!("{prefix}pod_{}_{}", pod.namespace, pod.name),
                    uid: uid(&[lab, "pod", &pod.namespace, &pod.name]),
                    ip_v4,
                    ip_v6,
                    host_veth,
                    labels: pod.labels.clone(),
                    ports: pod.ports.clone(),
                    server_pid: None,
                }
            })
            .collect();

        LabState {
            name: lab.to_owned(),
            spec: spec.clone(),
            state_dir: state_dir(lab),
            manifests_dir: manifests_dir.unwrap_or_else(|| default_manifests_dir(lab)),
            fabric,
            nodes,
            pods,
            manifests: Vec::new(),
        }
    }

    /// Loads the state of a running lab.
    pub fn load(lab: &str) -> Result<LabState, StateError> {
        let path = state_file(lab);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StateError::NotFound {
                    lab: lab.to_owned(),
                    path,
                });
            }
            Err(source) => {
                return Err(StateError::Io {
                    action: "read",
                    path,
                    source,
                });
            }
        };
        serde_json::from_str(&text).map_err(|source| StateError::Corrupt { path, source })
    }

    /// Saves the state atomically to `state.json` in the state dir.
    pub fn save(&self) -> Result<(), StateError> {
        let text = serde_json::to_string_pretty(self).expect("state serializes");
        write_atomic(&self.state_dir.join("state.json"), text.as_bytes())
    }

    /// Names of every lab that has a state file.
    pub fn list() -> Vec<String> {
        let Ok(entries) = fs::read_dir(STATE_ROOT) else {
            return Vec::new();
        };
        let mut labs: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join("state.json").is_file())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        labs.sort();
        labs
    }

    /// A node by name.
    pub fn node(&self, name: &str) -> Option<&NodeState> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// A pod by namespace and name.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<&PodState> {
        self.pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
    }

    /// A pod by `namespace/name`.
    pub fn pod_by_key(&self, key: &str) -> Option<&PodState> {
        let (namespace, name) = key.split_once('/')?;
        self.pod(namespace, name)
    }

    /// The pod that owns an address, if any.
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&PodState> {
        self.pods
            .iter()
            .find(|p| IpAddr::from(p.ip_v4) == ip || IpAddr::from(p.ip_v6) == ip)
    }

    /// The node a pod runs on.
    pub fn node_of(&self, pod: &PodState) -> &NodeState {
        self.node(&pod.node)
            .expect("state invariant: every pod's node exists")
    }

    /// Every netns of the lab: pods, nodes, then the fabric.
    pub fn netns_names(&self) -> Vec<String> {
        self.pods
            .iter()
            .map(|p| p.netns.clone())
            .chain(self.nodes.iter().map(|n| n.netns.clone()))
            .chain([self.fabric.netns.clone()])
            .collect()
    }

    /// `/run/netpol-lab/<lab>/logs/<ns>_<pod>.log`: the pod server's stderr.
    pub fn server_log(&self, pod: &PodState) -> PathBuf {
        self.state_dir
            .join("logs")
            .join(format!("{}_{}.log", pod.namespace, pod.name))
    }
}

/// Writes a file atomically: a hidden temp file (`.<name>.tmp`) in the same directory, then
/// rename. Watchers of the directory should ignore names starting with `.`.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), StateError> {
    let io = |action, source| StateError::Io {
        action,
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut file = fs::File::create(&tmp).map_err(|e| io("create", e))?;
    file.write_all(contents).map_err(|e| io("write", e))?;
    file.sync_all().map_err(|e| io("sync", e))?;
    drop(file);
    fs::rename(&tmp, path).map_err(|e| io("rename", e))
}

/// Host `index` of an IPv4 network.
fn host4(net: &Ipv4Net, index: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()) + index)
}

/// Host `index` of an IPv6 network.
fn host6(net: &Ipv6Net, index: u128) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(net.network()) + index)
}

/// FNV-1a, 64 bits: a stable hash for names and uids (std's hashers are not stable).
fn fnv1a(parts: &[&str]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            hash ^= u64::from(b'/');
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        for b in part.bytes() {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash
}

/// A deterministic UUID-shaped uid (version 8, "custom") for a Kubernetes object.
pub(crate) fn uid(parts: &[&str]) -> String {
    let hi = fnv1a(parts);
    let mut salted = parts.to_vec();
    salted.push("uid");
    let lo = fnv1a(&salted);
    let v = (u128::from(hi) << 64) | u128::from(lo);
    // Set version 8 and the RFC 4122 variant bits.
    let v = (v & !(0xf << 76) & !(0x3 << 62)) | (0x8 << 76) | (0x2 << 62);
    let h = format!("{v:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The host-side veth of a pod: `cali` + 11 hex digits (routed, as Calico names them) or
/// `veth` + 8 hex digits (bridged), from a hash of `namespace/name`; rehashed with a salt in the
/// unlikely case the name is already taken on the node. At most 15 characters (IFNAMSIZ).
fn host_veth_name(
    attachment: Attachment,
    namespace: &str,
    name: &str,
    taken: &BTreeSet<String>,
) -> String {
    (0u32..)
        .map(|salt| {
            let salt = salt.to_string();
            let hash = fnv1a(&[namespace, name, &salt]);
            match attachment {
                Attachment::Routed => format!("cali{:011x}", hash >> 20),
                Attachment::Bridged => format!("veth{:08x}", hash >> 32),
            }
        })
        .find(|candidate| !taken.contains(candidate))
        .expect("some salt gives a free name")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo() -> ClusterSpec {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/two-node.yaml");
        ClusterSpec::from_file(&path).expect("example parses")
    }

    #[test]
    fn plan_is_deterministic_and_addresses_follow_file_order() {
        let spec = demo();
        let a = LabState::plan(&spec, None);
        assert_eq!(a, LabState::plan(&spec, None));
        assert_eq!(a.fabric.netns, "nplab_two-node_fabric");
        assert_eq!(a.fabric.gateway_v4, Ipv4Addr::new(172, 31, 0, 254));
        assert_eq!(a.nodes[0].ip_v4, Ipv4Addr::new(172, 31, 0, 1));
        assert_eq!(a.nodes[1].ip_v6, "fd00:31::2".parse::<Ipv6Addr>().unwrap());
        assert_eq!(a.nodes[1].gateway_v4, Ipv4Addr::new(10, 244, 2, 1));
        assert_eq!(a.nodes[0].gateway_v4, ROUTED_GATEWAY_V4);
        for node in &a.nodes {
            let pods: Vec<&PodState> = a.pods.iter().filter(|p| p.node == node.name).collect();
            for (i, pod) in pods.iter().enumerate() {
                let host = u32::try_from(i).unwrap() + 2;
                assert_eq!(pod.ip_v4, host4(&node.pod_cidr_v4, host), "{}", pod.key());
                assert_eq!(
                    pod.ip_v6,
                    host6(&node.pod_cidr_v6, host.into()),
                    "{}",
                    pod.key()
                );
            }
        }
        assert_eq!(
            a.manifests_dir,
            Path::new("/run/netpol-lab/two-node/manifests")
        );
    }

    #[test]
    fn names_fit_ifnamsiz_and_are_unique_per_node() {
        let state = LabState::plan(&demo(), None);
        let mut seen = BTreeSet::new();
        for pod in &state.pods {
            assert!(pod.host_veth.len() <= 15, "{}", pod.host_veth);
            let node = state.node_of(pod);
            let prefix = match node.attachment {
                Attachment::Routed => "cali",
                Attachment::Bridged => "veth",
            };
            assert!(pod.host_veth.starts_with(prefix), "{}", pod.host_veth);
            assert!(seen.insert((pod.node.clone(), pod.host_veth.clone())));
            assert!(pod.netns.starts_with("nplab_two-node_pod_"));
        }
    }

    #[test]
    fn veth_names_avoid_collisions() {
        let first = host_veth_name(Attachment::Bridged, "x", "a", &BTreeSet::new());
        let second = host_veth_name(
            Attachment::Bridged,
            "x",
            "a",
            &BTreeSet::from([first.clone()]),
        );
        assert_ne!(first, second);
        assert_eq!(second.len(), 12);
    }

    #[test]
    fn uids_look_like_uuids() {
        let u = uid(&["lab", "pod", "x", "a"]);
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "8");
        assert_ne!(u, uid(&["lab", "pod", "x", "b"]));
    }

    #[test]
    fn lookups() {
        let state = LabState::plan(&demo(), None);
        let pod = state.pod_by_key("y/b").expect("y/b exists");
        assert_eq!(pod.key(), "y/b");
        assert_eq!(state.pod_by_ip(pod.ip(Family::V6)), Some(pod));
        assert_eq!(pod.netns_path(), Path::new("/run/netns").join(&pod.netns));
        assert_eq!(pod.ports_of(Protocol::Udp), vec![80, 81]);
        assert!(state.pod_by_key("nope").is_none());
    }
}
