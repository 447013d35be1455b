//! What a lab is once planned: names, addresses, interfaces and server pids.
//!
//! [`LabState::plan`] is a pure function from a [`ClusterSpec`] to the full state (no kernel
//! involved, unit tested); `up` then creates what the plan says and records server pids, and
//! saves the state as `/run/netpol-lab/<lab>/state.json` so that `probe`, `down` and library
//! users can work from the lab name alone ([`LabState::load`]).
//!
//! A running lab changes through [`LabState::plan_pod`], [`LabState::forget_pod`],
//! [`LabState::relabel_pod`] and [`LabState::relabel_namespace`]: pure edits of the state (and of
//! its `spec`, which always describes the cluster as it is now) that validate the change and pick
//! addresses, names and uids. `cluster::add_pod` and friends do the kernel work around them,
//! holding the lab's lock ([`lock`]) from load to save.
//!
//! # Naming
//! * Network namespaces: `nplab_<lab>_fabric`, `nplab_<lab>_node_<node>`,
//!   `nplab_<lab>_pod_<namespace>_<pod>`. Lab names are DNS labels, so they contain no `_` and
//!   the prefix `nplab_<lab>_` of one lab is never a prefix of another lab's netns.
//! * Interfaces are created directly inside their namespaces (never in the root namespace), so
//!   they only need to be unique per namespace and carry no lab prefix: `eth0` in pods and nodes,
//!   `br0` and `n<i>` in the fabric, `cni0`, `cali<11 hex>` and `veth<8 hex>` in nodes, and in
//!   vxlan mode `vxlan0` and `vxlan0-v6` in nodes.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::Write,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ops::RangeInclusive,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::{
    controlplane::ControlPlaneState,
    manifests::pod_manifest_file,
    spec::{Attachment, ClusterSpec, FabricMode, PodSpec, PortSpec, Protocol, SpecError},
};

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
/// MTU of the fabric: the nodes' `eth0` and their ports on `br0` (the kernel's default).
pub const FABRIC_MTU: u32 = 1500;

/// VXLAN network identifier of the overlay, flannel's default (its devices are `flannel.<VNI>`).
pub const VXLAN_VNI: u32 = 1;
/// UDP port of the overlay: 8472, the Linux kernel's default VXLAN port, which flannel uses
/// unless configured otherwise (Calico and Cilium use IANA's 4789).
pub const VXLAN_PORT: u16 = 8472;
/// The VXLAN device for IPv4 pod traffic, over the IPv4 fabric (flannel's `flannel.1`).
pub const VXLAN_DEVICE_V4: &str = "vxlan0";
/// The VXLAN device for IPv6 pod traffic, over the IPv6 fabric (flannel's `flannel-v6.1`).
pub const VXLAN_DEVICE_V6: &str = "vxlan0-v6";
/// What VXLAN adds to an inner IPv4-fabric frame: outer IPv4 (20), UDP (8), VXLAN (8) and
/// the inner Ethernet header (14). The kernel's default MTU for a VXLAN device over a lower
/// device is the lower device's MTU minus this; flannel's `FLANNEL_MTU` is 1500 - 50.
pub const VXLAN_OVERHEAD_V4: u32 = 50;
/// The same over the IPv6 fabric: the outer IPv6 header is 20 bytes longer than IPv4's.
pub const VXLAN_OVERHEAD_V6: u32 = 70;

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

/// Errors in a change to a running lab (adding, removing or relabelling a pod or namespace).
/// The state is left as it was.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("lab {lab:?} has no pod {pod}")]
    UnknownPod { lab: String, pod: String },
    #[error("lab {lab:?} has no namespace {namespace:?}")]
    UnknownNamespace { lab: String, namespace: String },
    #[error("lab {lab:?} already has a pod {pod}")]
    PodExists { lab: String, pod: String },
    /// A field of the pod or namespace is invalid, named as in the cluster file but relative to
    /// the object (`pod.labels`, `pod.ports[1].name`, `namespace.labels`).
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("node {node:?} has no free pod address left")]
    NoAddressLeft { node: String },
    #[error("{ip} is not a pod address of node {node:?} (hosts 2 and up of {cidr})")]
    AddressNotOnNode {
        ip: IpAddr,
        node: String,
        cidr: String,
    },
    #[error("{ip} belongs to pod {pod}, which still exists")]
    AddressInUse { ip: IpAddr, pod: String },
    #[error("pods {pod} and {other} would share the manifest file {file}")]
    ManifestClash {
        pod: String,
        other: String,
        file: String,
    },
}

/// A whole lab, as planned and (after `up`) as running.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabState {
    pub name: String,
    /// The cluster as it is now: the cluster file the lab was made from, with the pods added
    /// and removed and the labels changed since `up`.
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
    /// The `netpol-lab` binary that runs the pod servers (`up` records it; `add_pod` reuses it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_exe: Option<PathBuf>,
    /// Per node, the host index of the last pod addresses handed out. Like host-local IPAM,
    /// the next pod gets the next free index after it, so the addresses of a deleted pod are
    /// reused only once the node's range wraps around (or when asked for explicitly).
    #[serde(default)]
    pub last_pod_host: BTreeMap<String, u64>,
    /// How many pods were added to the running lab; salts the uids of added pods, so that a pod
    /// deleted and created again gets a new uid, as in Kubernetes.
    #[serde(default)]
    pub pods_added: u64,
    /// The Kubernetes control plane, when the lab has one (see [`crate::controlplane`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_plane: Option<ControlPlaneState>,
    /// Pods the lab runs for the cluster itself (CoreDNS), not part of the model: probes and
    /// truth tables leave them out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub system_pods: Vec<PodState>,
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
    /// How pod traffic crosses from node to node (state files from before it existed: host-gw).
    #[serde(default)]
    pub mode: FabricMode,
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
    /// MTU of the node's pod interfaces: both ends of every pod veth, and `cni0`. The fabric's
    /// in host-gw mode; in vxlan mode the smaller of the two VXLAN devices' MTUs, since a pod's
    /// `eth0` carries both families (see [`VxlanState`]).
    #[serde(default = "default_pod_mtu")]
    pub pod_mtu: u32,
    /// The node's VXLAN tunnel endpoints, in vxlan mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vxlan: Option<VxlanState>,
}

fn default_pod_mtu() -> u32 {
    FABRIC_MTU
}

/// A node's VXLAN tunnel endpoints in vxlan mode, as flannel's vxlan backend makes them: one
/// device per family (`vxlan0` over the IPv4 fabric, `vxlan0-v6` over the IPv6 fabric), VNI
/// [`VXLAN_VNI`], UDP port [`VXLAN_PORT`], no learning, the node's fabric address as local
/// address and `eth0` as lower device.
///
/// Every other node gets, per family, a route `<its pod CIDR> via <its VTEP address> dev
/// <device> onlink`, a permanent neighbour entry (its VTEP address -> its VTEP MAC) and an FDB
/// entry (its VTEP MAC -> dst its fabric address), so nothing is learnt or flooded.
///
/// MTUs: the kernel's default for a VXLAN device over a 1500-byte `eth0` (1450 over IPv4, 1430
/// over IPv6, whose outer header is 20 bytes longer). Pods get the smaller, 1430 (flannel gives
/// them 1450 and leaves large IPv6 packets to Packet Too Big from the node): then no pod packet
/// of either family is too big for its tunnel, and probes and streams never depend on PMTU
/// discovery getting through a NetworkPolicy enforcer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VxlanState {
    pub vni: u32,
    /// UDP destination port of the encapsulated packets.
    pub port: u16,
    pub v4: Vtep<Ipv4Addr>,
    pub v6: Vtep<Ipv6Addr>,
}

/// One VXLAN device of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vtep<A> {
    /// Name of the device in the node netns.
    pub device: String,
    /// The device's address: the network address of the node's pod CIDR, as a /32 or /128
    /// (flannel's `x.x.x.0/32`): the other nodes' next hop to this node's pods, and the node's
    /// source address towards other nodes' pods.
    pub ip: A,
    /// The device's MAC, deterministic per lab, node and family.
    pub mac: String,
    pub mtu: u32,
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
    /// The ClusterIPs of the pod's Service (`s-<ns>-<pod>`), in a lab with a control plane.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_ips: Vec<IpAddr>,
    /// Set up through the chained CNI plugin `netpol-cni` (see [`crate::cni`]): its DEL runs
    /// before the veth goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cni: Option<crate::cni::PodCni>,
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

    /// The ClusterIP of a family of the pod's Service, if it has one.
    pub fn service_ip(&self, family: Family) -> Option<IpAddr> {
        self.service_ips
            .iter()
            .copied()
            .find(|ip| Family::of(ip) == family)
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
            mode: spec.fabric.mode,
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
                let netns = format!("{prefix}node_{}", node.name);
                let vxlan = (spec.fabric.mode == FabricMode::Vxlan).then(|| VxlanState {
                    vni: VXLAN_VNI,
                    port: VXLAN_PORT,
                    v4: Vtep {
                        device: VXLAN_DEVICE_V4.to_owned(),
                        ip: node.pod_cidr.network(),
                        mac: mac(lab, &format!("{netns}/{VXLAN_DEVICE_V4}")),
                        mtu: FABRIC_MTU - VXLAN_OVERHEAD_V4,
                    },
                    v6: Vtep {
                        device: VXLAN_DEVICE_V6.to_owned(),
                        ip: node.pod_cidr_v6.network(),
                        mac: mac(lab, &format!("{netns}/{VXLAN_DEVICE_V6}")),
                        mtu: FABRIC_MTU - VXLAN_OVERHEAD_V6,
                    },
                });
                let pod_mtu = vxlan
                    .as_ref()
                    .map_or(FABRIC_MTU, |v| v.v4.mtu.min(v.v6.mtu));
                NodeState {
                    name: node.name.clone(),
                    netns,
                    attachment: node.attachment,
                    uid: uid(&[lab, "node", &node.name]),
                    pod_cidr_v4: node.pod_cidr,
                    pod_cidr_v6: node.pod_cidr_v6,
                    ip_v4: host4(&spec.fabric.cidr, host),
                    ip_v6: host6(&spec.fabric.cidr_v6, host.into()),
                    fabric_port: format!("n{i}"),
                    gateway_v4,
                    gateway_v6,
                    pod_mtu,
                    vxlan,
                }
            })
            .collect();

        let mut state = LabState {
            name: lab.to_owned(),
            spec: spec.clone(),
            state_dir: state_dir(lab),
            manifests_dir: manifests_dir.unwrap_or_else(|| default_manifests_dir(lab)),
            fabric,
            nodes,
            pods: Vec::new(),
            manifests: Vec::new(),
            server_exe: None,
            last_pod_host: BTreeMap::new(),
            pods_added: 0,
            control_plane: None,
            system_pods: Vec::new(),
        };
        for node in &state.nodes {
            state.last_pod_host.insert(node.name.clone(), 1);
        }
        for pod in &spec.pods {
            let node = state
                .node(&pod.node)
                .expect("validated: pods reference declared nodes");
            let last = state.last_pod_host[&node.name];
            let host = u32::try_from(last + 1).expect("validated: the node has room");
            let (ip_v4, ip_v6) = (
                host4(&node.pod_cidr_v4, host),
                host6(&node.pod_cidr_v6, host.into()),
            );
            let uid = uid(&[lab, "pod", &pod.namespace, &pod.name]);
            let planned = state.pod_state(pod, ip_v4, ip_v6, uid);
            state.last_pod_host.insert(pod.node.clone(), last + 1);
            state.pods.push(planned);
        }
        state
    }

    /// The state of a new pod with the given addresses and uid: netns name, and a host-side
    /// veth name that is free on its node.
    fn pod_state(&self, pod: &PodSpec, ip_v4: Ipv4Addr, ip_v6: Ipv6Addr, uid: String) -> PodState {
        let node = self
            .node(&pod.node)
            .expect("callers check that the node exists");
        let taken: BTreeSet<String> = self
            .pods
            .iter()
            .filter(|p| p.node == node.name)
            .map(|p| p.host_veth.clone())
            .collect();
        PodState {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            node: pod.node.clone(),
            netns: format!(
                "{}pod_{}_{}",
                netns_prefix(&self.name),
                pod.namespace,
                pod.name
            ),
            uid,
            ip_v4,
            ip_v6,
            host_veth: host_veth_name(node.attachment, &pod.namespace, &pod.name, &taken),
            labels: pod.labels.clone(),
            ports: pod.ports.clone(),
            server_pid: None,
            service_ips: Vec::new(),
            cni: None,
        }
    }

    /// Plans a system pod (CoreDNS) on its node at the node's highest pod address, which
    /// [`LabState::plan_pod`] then never hands out, and records it in `system_pods`.
    pub fn plan_system_pod(&mut self, pod: &PodSpec) -> PodState {
        let node = self.node(&pod.node).expect("callers pick a declared node");
        let host = u32::try_from(*pod_hosts(node).end()).expect("pod host indexes fit a u32");
        let (ip_v4, ip_v6) = (
            host4(&node.pod_cidr_v4, host),
            host6(&node.pod_cidr_v6, host.into()),
        );
        let uid = uid(&[&self.name, "system-pod", &pod.namespace, &pod.name]);
        let planned = self.pod_state(pod, ip_v4, ip_v6, uid);
        self.system_pods.push(planned.clone());
        planned
    }

    /// Plans a pod added to the running lab and records it in the state (and its `spec`); the
    /// caller creates it and saves the state. The pod must be new, on a declared node, in a
    /// declared namespace, with valid labels and ports.
    ///
    /// Addresses: `ip_v4`/`ip_v6` when given (any free pod address of the node, such as a deleted
    /// pod's), else the next host index after the node's last one that is free in every family
    /// asked for, wrapping around to host 2 (see [`LabState::last_pod_host`]). An address of a
    /// pod that still exists is never given out. The uid is new: a pod created again under the
    /// same name gets a different uid.
    pub fn plan_pod(
        &mut self,
        pod: PodSpec,
        ip_v4: Option<Ipv4Addr>,
        ip_v6: Option<Ipv6Addr>,
    ) -> Result<PodState, ChangeError> {
        let key = format!("{}/{}", pod.namespace, pod.name);
        if self.pod(&pod.namespace, &pod.name).is_some() {
            return Err(ChangeError::PodExists {
                lab: self.name.clone(),
                pod: key,
            });
        }
        let mut spec = self.spec.clone();
        spec.pods.push(pod.clone());
        check_spec(&spec, &format!("pods[{}].", spec.pods.len() - 1), "pod.")?;
        let node = self
            .node(&pod.node)
            .expect("validated: the pod's node is declared");
        let file = pod_manifest_file(&pod.namespace, &pod.name);
        if let Some(other) = self
            .pods
            .iter()
            .find(|p| pod_manifest_file(&p.namespace, &p.name) == file)
        {
            return Err(ChangeError::ManifestClash {
                pod: key,
                other: other.key(),
                file,
            });
        }

        let hosts = pod_hosts(node);
        let used: BTreeMap<IpAddr, &PodState> = self
            .pods
            .iter()
            .chain(&self.system_pods)
            .flat_map(|p| [(IpAddr::from(p.ip_v4), p), (IpAddr::from(p.ip_v6), p)])
            .collect();
        for ip in [ip_v4.map(IpAddr::from), ip_v6.map(IpAddr::from)]
            .into_iter()
            .flatten()
        {
            let (index, cidr) = match ip {
                IpAddr::V4(ip) => (
                    host_index4(&node.pod_cidr_v4, ip),
                    node.pod_cidr_v4.to_string(),
                ),
                IpAddr::V6(ip) => (
                    host_index6(&node.pod_cidr_v6, ip),
                    node.pod_cidr_v6.to_string(),
                ),
            };
            if !index.is_some_and(|i| hosts.contains(&i)) {
                return Err(ChangeError::AddressNotOnNode {
                    ip,
                    node: node.name.clone(),
                    cidr,
                });
            }
            if let Some(owner) = used.get(&ip) {
                return Err(ChangeError::AddressInUse {
                    ip,
                    pod: owner.key(),
                });
            }
        }

        let last = self.last_pod_host.get(&node.name).copied().unwrap_or(1);
        let free = |index: u64| {
            let host = u32::try_from(index).expect("pod host indexes fit a u32");
            (ip_v4.is_some() || !used.contains_key(&host4(&node.pod_cidr_v4, host).into()))
                && (ip_v6.is_some()
                    || !used.contains_key(&host6(&node.pod_cidr_v6, host.into()).into()))
        };
        let auto = if ip_v4.is_some() && ip_v6.is_some() {
            None
        } else {
            let start = last.clamp(*hosts.start() - 1, *hosts.end());
            let index = (start + 1..=*hosts.end())
                .chain(*hosts.start()..=start)
                .find(|&i| free(i))
                .ok_or_else(|| ChangeError::NoAddressLeft {
                    node: node.name.clone(),
                })?;
            Some(u32::try_from(index).expect("pod host indexes fit a u32"))
        };
        let ip_v4 = ip_v4.unwrap_or_else(|| host4(&node.pod_cidr_v4, auto.expect("picked")));
        let ip_v6 = ip_v6.unwrap_or_else(|| host6(&node.pod_cidr_v6, auto.expect("picked").into()));

        let added = self.pods_added + 1;
        let uid = uid(&[
            &self.name,
            "pod",
            &pod.namespace,
            &pod.name,
            &added.to_string(),
        ]);
        let planned = self.pod_state(&pod, ip_v4, ip_v6, uid);
        if let Some(index) = auto {
            self.last_pod_host.insert(node.name.clone(), index.into());
        }
        self.pods_added = added;
        self.spec = spec;
        self.pods.push(planned.clone());
        Ok(planned)
    }

    /// Removes a pod from the state (and its `spec`) and returns it; the caller deletes it.
    pub fn forget_pod(&mut self, namespace: &str, name: &str) -> Result<PodState, ChangeError> {
        let index = self.pod_index(namespace, name)?;
        self.spec
            .pods
            .retain(|p| !(p.namespace == namespace && p.name == name));
        Ok(self.pods.remove(index))
    }

    /// Replaces a pod's labels (in the state and its `spec`) and returns the updated pod.
    pub fn relabel_pod(
        &mut self,
        namespace: &str,
        name: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<PodState, ChangeError> {
        let index = self.pod_index(namespace, name)?;
        let mut spec = self.spec.clone();
        let spec_index = spec
            .pods
            .iter()
            .position(|p| p.namespace == namespace && p.name == name)
            .expect("state invariant: every pod is in the spec");
        spec.pods[spec_index].labels = labels.clone();
        check_spec(&spec, &format!("pods[{spec_index}]."), "pod.")?;
        self.spec = spec;
        self.pods[index].labels = labels;
        Ok(self.pods[index].clone())
    }

    /// Replaces a namespace's labels (in the `spec`). `kubernetes.io/metadata.name` is always
    /// added to the manifest; giving it with another value than the name is an error.
    pub fn relabel_namespace(
        &mut self,
        namespace: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<(), ChangeError> {
        let mut spec = self.spec.clone();
        let index = spec
            .namespaces
            .iter()
            .position(|n| n.name == namespace)
            .ok_or_else(|| ChangeError::UnknownNamespace {
                lab: self.name.clone(),
                namespace: namespace.to_owned(),
            })?;
        spec.namespaces[index].labels = labels;
        check_spec(&spec, &format!("namespaces[{index}]."), "namespace.")?;
        self.spec = spec;
        Ok(())
    }

    fn pod_index(&self, namespace: &str, name: &str) -> Result<usize, ChangeError> {
        self.pods
            .iter()
            .position(|p| p.namespace == namespace && p.name == name)
            .ok_or_else(|| ChangeError::UnknownPod {
                lab: self.name.clone(),
                pod: format!("{namespace}/{name}"),
            })
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

    /// The pod whose Service has a ClusterIP.
    pub fn pod_by_service_ip(&self, ip: IpAddr) -> Option<&PodState> {
        self.pods.iter().find(|p| p.service_ips.contains(&ip))
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

/// A lab's lock, held while a change loads, edits and saves its state (see [`lock`]).
#[derive(Debug)]
pub struct LabLock {
    _file: fs::File,
}

/// Takes the lab's lock (`flock` on `<state dir>/.lock`), waiting for other changes of the lab
/// (in this or another process) to finish. Released when the [`LabLock`] is dropped.
pub fn lock(lab: &str) -> Result<LabLock, StateError> {
    let state = state_file(lab);
    if !state.is_file() {
        return Err(StateError::NotFound {
            lab: lab.to_owned(),
            path: state,
        });
    }
    let path = state_dir(lab).join(".lock");
    let io = |action, source| StateError::Io {
        action,
        path: path.clone(),
        source,
    };
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| io("open", e))?;
    // SAFETY: flock only takes the descriptor, which `file` keeps open.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io("lock", std::io::Error::last_os_error()));
    }
    Ok(LabLock { _file: file })
}

/// Validates a changed spec; errors about the changed object (`pods[7].labels`) are renamed
/// relative to it (`pod.labels`).
fn check_spec(spec: &ClusterSpec, from: &str, to: &str) -> Result<(), ChangeError> {
    spec.validate().map_err(|e| match e {
        SpecError::Invalid { field, message } => ChangeError::Invalid {
            field: field
                .strip_prefix(from)
                .map_or(field.clone(), |rest| format!("{to}{rest}")),
            message,
        },
        other => ChangeError::Invalid {
            field: to.trim_end_matches('.').to_owned(),
            message: other.to_string(),
        },
    })
}

/// Host indexes of a node's pod addresses: 2 and up (0 is the network, 1 the bridged nodes'
/// gateway), both families, without the IPv4 broadcast address. The same room as
/// [`ClusterSpec::validate`] allows per node.
fn pod_hosts(node: &NodeState) -> RangeInclusive<u64> {
    let room4 = (1u64 << (32 - u32::from(node.pod_cidr_v4.prefix_len()))) - 3;
    let bits6 = (128 - u32::from(node.pod_cidr_v6.prefix_len())).min(63);
    let room6 = (1u64 << bits6) - 2;
    2..=room4.min(room6) + 1
}

/// The host index of an address in an IPv4 network, if it is in it.
fn host_index4(net: &Ipv4Net, ip: Ipv4Addr) -> Option<u64> {
    net.contains(&ip)
        .then(|| u64::from(u32::from(ip) - u32::from(net.network())))
}

/// The host index of an address in an IPv6 network, if it is in it and the index is small
/// enough to be a pod's.
fn host_index6(net: &Ipv6Net, ip: Ipv6Addr) -> Option<u64> {
    net.contains(&ip)
        .then(|| u64::try_from(u128::from(ip) - u128::from(net.network())).ok())
        .flatten()
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

/// A locally administered unicast MAC, stable per lab and `key` (a netns name, or a netns and
/// an interface in it).
pub(crate) fn mac(lab: &str, key: &str) -> String {
    let h = uid(&[lab, "mac", key]).replace('-', "");
    format!(
        "02:{}:{}:{}:{}:{}",
        &h[0..2],
        &h[2..4],
        &h[4..6],
        &h[6..8],
        &h[8..10]
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
    fn host_gw_plans_no_tunnel_and_full_size_pods() {
        let state = LabState::plan(&demo(), None);
        assert_eq!(state.fabric.mode, FabricMode::HostGw);
        for node in &state.nodes {
            assert_eq!(node.vxlan, None, "{}", node.name);
            assert_eq!(node.pod_mtu, FABRIC_MTU, "{}", node.name);
        }
    }

    #[test]
    fn vxlan_plans_flannel_like_vteps_per_family() {
        let mut spec = demo();
        spec.fabric.mode = FabricMode::Vxlan;
        let state = LabState::plan(&spec, None);
        assert_eq!(state, LabState::plan(&spec, None), "deterministic");
        assert_eq!(state.fabric.mode, FabricMode::Vxlan);
        let mut macs = BTreeSet::new();
        for node in &state.nodes {
            let vxlan = node.vxlan.as_ref().expect("vxlan mode plans VTEPs");
            assert_eq!((vxlan.vni, vxlan.port), (1, 8472));
            assert_eq!(vxlan.v4.device, "vxlan0");
            assert_eq!(vxlan.v6.device, "vxlan0-v6");
            // flannel's VTEP address: the network address of the node's pod CIDR, which is
            // never a pod's (pods start at host 2).
            assert_eq!(vxlan.v4.ip, node.pod_cidr_v4.network());
            assert_eq!(vxlan.v6.ip, node.pod_cidr_v6.network());
            assert!(state.pod_by_ip(vxlan.v4.ip.into()).is_none());
            assert_eq!((vxlan.v4.mtu, vxlan.v6.mtu), (1450, 1430));
            assert_eq!(node.pod_mtu, 1430, "pods fit both tunnels");
            for vtep in [&vxlan.v4.device, &vxlan.v6.device] {
                assert!(vtep.len() <= 15, "{vtep} fits IFNAMSIZ");
            }
            for mac in [&vxlan.v4.mac, &vxlan.v6.mac] {
                assert!(mac.starts_with("02:") && mac.len() == 17, "{mac}");
                assert!(macs.insert(mac.clone()), "{mac} is unique");
            }
        }
        // Another lab of the same shape gets other MACs (labs never share a fabric, but a MAC
        // that says which lab it is from helps reading captures).
        spec.name = "other".into();
        let other = LabState::plan(&spec, None);
        let vtep = |s: &LabState| s.nodes[0].vxlan.as_ref().expect("vtep").v4.mac.clone();
        assert_ne!(vtep(&state), vtep(&other));
    }

    #[test]
    fn state_files_from_before_fabric_modes_load_as_host_gw() {
        let state = LabState::plan(&demo(), None);
        let mut json: serde_json::Value = serde_json::to_value(&state).expect("serializes");
        json["fabric"]
            .as_object_mut()
            .expect("fabric")
            .remove("mode");
        json["spec"]["fabric"]
            .as_object_mut()
            .expect("spec.fabric")
            .remove("mode");
        for node in json["nodes"].as_array_mut().expect("nodes") {
            let node = node.as_object_mut().expect("node");
            node.remove("pod_mtu");
            assert!(node.get("vxlan").is_none(), "host-gw nodes write no vxlan");
        }
        let old: LabState = serde_json::from_value(json).expect("old state loads");
        assert_eq!(old, state);
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

    fn pod(namespace: &str, name: &str, node: &str) -> PodSpec {
        PodSpec {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            node: node.to_owned(),
            labels: BTreeMap::from([("pod".to_owned(), name.to_owned())]),
            ports: Vec::new(),
        }
    }

    fn change_field(result: Result<PodState, ChangeError>) -> String {
        match result {
            Err(ChangeError::Invalid { field, .. }) => field,
            other => panic!("expected ChangeError::Invalid, got {other:?}"),
        }
    }

    #[test]
    fn added_pods_get_the_next_free_addresses_and_new_uids() {
        let mut state = LabState::plan(&demo(), None);
        let node = state.node("node-a").expect("node-a").clone();
        let on_node = state.pods.iter().filter(|p| p.node == "node-a").count();
        let last = u32::try_from(on_node).expect("few pods") + 1;

        let c = state
            .plan_pod(pod("x", "d", "node-a"), None, None)
            .expect("add x/d");
        assert_eq!(c.ip_v4, host4(&node.pod_cidr_v4, last + 1));
        assert_eq!(c.ip_v6, host6(&node.pod_cidr_v6, (last + 1).into()));
        assert!(c.host_veth.starts_with("cali"));
        assert_eq!(c.netns, "nplab_two-node_pod_x_d");
        assert_eq!(state.pod("x", "d"), Some(&c));
        assert!(state.spec.pods.iter().any(|p| p.name == "d"));

        // A removed pod's addresses are not handed out again at once...
        let removed = state.forget_pod("x", "d").expect("remove x/d");
        assert!(state.pod("x", "d").is_none());
        assert!(!state.spec.pods.iter().any(|p| p.name == "d"));
        let again = state
            .plan_pod(pod("x", "d", "node-a"), None, None)
            .expect("re-add");
        assert_ne!(again.ip_v4, removed.ip_v4);
        assert_ne!(again.uid, removed.uid, "a re-created pod gets a new uid");
        // ...but can be asked for.
        let reuse = state
            .plan_pod(
                pod("x", "e", "node-a"),
                Some(removed.ip_v4),
                Some(removed.ip_v6),
            )
            .expect("explicit reuse");
        assert_eq!((reuse.ip_v4, reuse.ip_v6), (removed.ip_v4, removed.ip_v6));

        // Never the address of a pod that exists.
        let taken = state.pod("x", "a").expect("x/a").clone();
        match state.plan_pod(pod("x", "f", "node-a"), Some(taken.ip_v4), None) {
            Err(ChangeError::AddressInUse { pod, .. }) => assert_eq!(pod, "x/a"),
            other => panic!("expected AddressInUse, got {other:?}"),
        }
        let elsewhere = state.node("node-b").expect("node-b").clone();
        for ip in [
            host4(&elsewhere.pod_cidr_v4, 9),
            host4(&node.pod_cidr_v4, 1),
            host4(&node.pod_cidr_v4, 255),
        ] {
            match state.plan_pod(pod("x", "f", "node-a"), Some(ip), None) {
                Err(ChangeError::AddressNotOnNode { .. }) => {}
                other => panic!("{ip}: expected AddressNotOnNode, got {other:?}"),
            }
        }
        let used: BTreeSet<Ipv4Addr> = state.pods.iter().map(|p| p.ip_v4).collect();
        assert_eq!(used.len(), state.pods.len(), "addresses are unique");
    }

    #[test]
    fn addresses_wrap_around_a_full_node() {
        let mut spec = demo();
        spec.nodes[0].pod_cidr = "10.244.1.0/29".parse().expect("cidr");
        let mut state = LabState::plan(&spec, None);
        // A /29 holds hosts 2..=6; fill node-a up.
        let mut i = 0;
        while state.pods.iter().filter(|p| p.node == "node-a").count() < 5 {
            state
                .plan_pod(pod("x", &format!("p{i}"), "node-a"), None, None)
                .expect("room left");
            i += 1;
        }
        match state.plan_pod(pod("x", "full", "node-a"), None, None) {
            Err(ChangeError::Invalid { field, message }) => {
                assert_eq!(field, "pod.node");
                assert!(message.contains("no pod address left"), "{message}");
            }
            other => panic!("expected a full node, got {other:?}"),
        }
        // Freeing the first address makes it the next one, after wrapping around.
        let first = state
            .pods
            .iter()
            .find(|p| p.ip_v4 == Ipv4Addr::new(10, 244, 1, 2))
            .expect("host 2")
            .clone();
        state
            .forget_pod(&first.namespace, &first.name)
            .expect("remove");
        let next = state
            .plan_pod(pod("x", "wrapped", "node-a"), None, None)
            .expect("wraps");
        assert_eq!(next.ip_v4, first.ip_v4);
    }

    #[test]
    fn invalid_changes_name_the_field_and_change_nothing() {
        let mut state = LabState::plan(&demo(), None);
        let before = state.clone();
        let mut bad = pod("x", "d", "node-a");
        bad.labels.insert("bad key!".into(), "v".into());
        assert_eq!(change_field(state.plan_pod(bad, None, None)), "pod.labels");
        assert_eq!(
            change_field(state.plan_pod(pod("nope", "d", "node-a"), None, None)),
            "pod.namespace"
        );
        assert_eq!(
            change_field(state.plan_pod(pod("x", "d", "node-z"), None, None)),
            "pod.node"
        );
        assert_eq!(
            change_field(state.plan_pod(pod("x", "D", "node-a"), None, None)),
            "pod.name"
        );
        assert!(matches!(
            state.plan_pod(pod("x", "a", "node-b"), None, None),
            Err(ChangeError::PodExists { .. })
        ));
        let bad_labels = BTreeMap::from([("a b".to_owned(), "c".to_owned())]);
        assert_eq!(
            change_field(state.relabel_pod("x", "a", bad_labels.clone())),
            "pod.labels"
        );
        match state.relabel_namespace("x", bad_labels) {
            Err(ChangeError::Invalid { field, .. }) => assert_eq!(field, "namespace.labels"),
            other => panic!("expected Invalid, got {other:?}"),
        }
        let wrong_name =
            BTreeMap::from([(crate::spec::NAMESPACE_NAME_LABEL.to_owned(), "y".to_owned())]);
        assert!(state.relabel_namespace("x", wrong_name).is_err());
        assert!(matches!(
            state.relabel_namespace("nope", BTreeMap::new()),
            Err(ChangeError::UnknownNamespace { .. })
        ));
        assert!(matches!(
            state.forget_pod("x", "nope"),
            Err(ChangeError::UnknownPod { .. })
        ));
        assert_eq!(state, before);
    }

    #[test]
    fn relabelling_updates_state_and_spec() {
        let mut state = LabState::plan(&demo(), None);
        let labels = BTreeMap::from([("role".to_owned(), "db".to_owned())]);
        let pod = state
            .relabel_pod("y", "b", labels.clone())
            .expect("relabel");
        assert_eq!(pod.labels, labels);
        assert_eq!(state.pod("y", "b").expect("y/b").labels, labels);
        let spec_pod = state
            .spec
            .pods
            .iter()
            .find(|p| p.namespace == "y" && p.name == "b")
            .expect("in spec");
        assert_eq!(spec_pod.labels, labels);
        state
            .relabel_namespace("z", labels.clone())
            .expect("relabel namespace");
        let ns = state.spec.namespaces.iter().find(|n| n.name == "z");
        assert_eq!(ns.map(|n| &n.labels), Some(&labels));
    }

    #[test]
    fn manifest_file_clashes_are_refused() {
        let mut spec = demo();
        spec.namespaces.push(crate::spec::NamespaceSpec {
            name: "x-a".into(),
            labels: BTreeMap::new(),
        });
        let mut state = LabState::plan(&spec, None);
        // pod-x-a-b.yaml: x/a-b clashes with x-a/b.
        state
            .plan_pod(pod("x-a", "b", "node-a"), None, None)
            .expect("x-a/b");
        assert!(matches!(
            state.plan_pod(pod("x", "a-b", "node-a"), None, None),
            Err(ChangeError::ManifestClash { .. })
        ));
    }
}
