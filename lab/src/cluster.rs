//! Bringing a lab up and tearing it down.
//!
//! `up` creates what [`LabState::plan`] says with `ip` (iproute2) and sysctl writes, starts the
//! pod servers and writes the manifests. Every interface is created directly inside its target
//! namespace (`ip -n <ns> link add ... peer name ... netns <other>`), so nothing of the lab ever
//! appears in the root network namespace, and no namespace of the lab has a link to it.
//!
//! `down` works from netns names alone (every lab netns starts with `nplab_<lab>_`), so it also
//! removes leftovers of a crashed `up` that never wrote a state file.
//!
//! A running lab changes with [`add_pod`], [`remove_pod`], [`set_pod_labels`] and
//! [`set_namespace_labels`], in the order a kubelet and its CNI plugin do things:
//!
//! * adding: netns, veth, addresses and routes first (CNI ADD), then the server (the container
//!   starts), and only then the Pod manifest with `status.podIPs` (the kubelet reports the
//!   sandbox's IPs once CNI ADD returned, and Running once the container runs). A watcher that
//!   sees the Pod can count on its veth existing.
//! * removing: the server is stopped, the routes and the veth are deleted (CNI DEL), the netns
//!   is deleted, and only then the manifest is removed (the API server forgets a pod once the
//!   kubelet has torn it down).
//!
//! Each change holds the lab's lock ([`crate::state::lock`]) from loading the state to saving
//! it, so changes from several threads or processes do not lose each other's updates.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Display,
    fs, io,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use crate::{
    Lab, cni,
    controlplane::{self, ControlPlaneSpec, ControlPlaneState},
    manifests::{pod_manifest_file, write_manifests, write_namespace_manifest, write_pod_manifest},
    netns::{is_alive, list_netns, processes_in, terminate, write_sysctls},
    server::{self, ServerError},
    spec::{Attachment, ClusterSpec, PodSpec, SpecError},
    state::{
        ChangeError, LabState, NETNS_DIR, NETNS_PREFIX, NodeState, PodState, STATE_ROOT,
        StateError, Vtep, VxlanState, lock, mac, netns_prefix, state_dir, state_file,
    },
};

/// How long servers get to bind their sockets.
const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long processes in lab namespaces get between SIGTERM and SIGKILL.
const TERMINATE_GRACE: Duration = Duration::from_secs(2);

/// Errors bringing a lab up or down.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error(transparent)]
    Change(#[from] ChangeError),
    #[error("control plane: {0}")]
    ControlPlane(#[from] crate::controlplane::ControlPlaneError),
    #[error("lab {lab:?} is already up (state file {path}); run `netpol-lab down {lab}` first")]
    AlreadyUp { lab: String, path: PathBuf },
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

/// Options of [`up`].
#[derive(Debug, Clone, Default)]
pub struct UpOptions {
    /// Where to write manifests; default `/run/netpol-lab/<lab>/manifests`.
    pub manifests_dir: Option<PathBuf>,
    /// The `netpol-lab` binary that runs pod servers; default [`server::server_exe`].
    pub server_exe: Option<PathBuf>,
    /// A Kubernetes control plane, overriding the cluster file's `controlPlane`.
    pub control_plane: Option<ControlPlaneSpec>,
}

/// What [`down`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DownReport {
    pub lab: String,
    pub netns_deleted: Vec<String>,
    pub processes_killed: Vec<u32>,
    pub manifests_removed: usize,
    pub state_dir_removed: bool,
}

impl DownReport {
    /// True when there was nothing of the lab left.
    pub fn is_empty(&self) -> bool {
        self.netns_deleted.is_empty()
            && self.processes_killed.is_empty()
            && self.manifests_removed == 0
            && !self.state_dir_removed
    }
}

/// Brings a lab up: namespaces, links, addresses, routes, servers, manifests, state file.
/// Leftovers of an earlier lab of the same name without a state file are removed first; a lab
/// that is up (has a state file) is an error. On failure everything created is removed again.
pub fn up(spec: &ClusterSpec, options: &UpOptions) -> Result<LabState, LabError> {
    let mut spec = spec.clone();
    if let Some(cp) = &options.control_plane {
        spec.control_plane = Some(cp.clone());
    }
    let spec = &spec;
    spec.validate()?;
    let lab = spec.name.as_str();
    let path = state_file(lab);
    if path.exists() {
        return Err(LabError::AlreadyUp {
            lab: lab.to_owned(),
            path,
        });
    }
    if !list_netns(&netns_prefix(lab)).is_empty() {
        down(lab)?;
    }
    let exe = match &options.server_exe {
        Some(exe) => exe.clone(),
        None => server::server_exe()?,
    };
    let mut state = LabState::plan(spec, options.manifests_dir.clone());
    state.server_exe = Some(exe.clone());
    if let Some(cp) = &spec.control_plane {
        state.control_plane = Some(ControlPlaneState::plan(&state, cp));
    }
    fs::create_dir_all(&state.state_dir).map_err(|source| LabError::Io {
        context: format!("create {}", state.state_dir.display()),
        source,
    })?;
    state.save()?;
    match build(&mut state, &exe) {
        Ok(()) => Ok(state),
        Err(e) => {
            // Best effort: the error that matters is the one that stopped `up`.
            let _ = down(lab);
            Err(e)
        }
    }
}

fn build(state: &mut LabState, exe: &Path) -> Result<(), LabError> {
    create_fabric(state)?;
    for node in &state.nodes {
        create_node(state, node)?;
    }
    if state.control_plane.is_some() {
        start_control_plane(state)?;
    }
    for pod in &state.pods {
        create_pod(state.node_of(pod), pod)?;
    }
    start_servers(state, exe)?;
    state.save()?;
    if state.control_plane.is_some() {
        finish_control_plane(state)?;
    }
    state.manifests = write_manifests(state)?;
    state.save()?;
    Ok(())
}

/// Runs `ip` with a command line given as format arguments, split on whitespace (lab names,
/// addresses and interface names never contain any).
macro_rules! ip {
    ($($arg:tt)*) => {
        ip(&format!($($arg)*))
    };
}

/// Runs `bridge` (iproute2, for FDB entries) as [`ip!`] runs `ip`.
macro_rules! bridge {
    ($($arg:tt)*) => {
        bridge(&format!($($arg)*))
    };
}

fn create_fabric(state: &LabState) -> Result<(), LabError> {
    let f = &state.fabric;
    let (ns, br) = (f.netns.as_str(), f.bridge.as_str());
    let (gw4, len4, gw6, len6) = (
        f.gateway_v4,
        f.cidr_v4.prefix_len(),
        f.gateway_v6,
        f.cidr_v6.prefix_len(),
    );
    add_netns(ns)?;
    sysctls(ns, &[common_sysctls(), forwarding("0")].concat())?;
    ip!(
        "-n {ns} link add {br} address {} type bridge",
        mac(&state.name, ns)
    )?;
    ip!("-n {ns} addr add {gw4}/{len4} dev {br}")?;
    ip!("-n {ns} addr add {gw6}/{len6} dev {br} nodad")?;
    ip!("-n {ns} link set {br} up")
}

/// A new netns `ns` with `eth0` plugged into the fabric bridge (its link there is `port`),
/// holding fabric addresses `ip4` and `ip6`; `forward` turns IP forwarding on.
fn plug_into_fabric(
    state: &LabState,
    ns: &str,
    port: &str,
    (ip4, ip6): (Ipv4Addr, Ipv6Addr),
    forward: bool,
) -> Result<(), LabError> {
    let f = &state.fabric;
    let (fabric, br) = (f.netns.as_str(), f.bridge.as_str());
    let (len4, len6) = (f.cidr_v4.prefix_len(), f.cidr_v6.prefix_len());
    add_netns(ns)?;
    let forwarding = forwarding(if forward { "1" } else { "0" });
    sysctls(ns, &[common_sysctls(), forwarding].concat())?;
    ip!("-n {ns} link add eth0 type veth peer name {port} netns {fabric}")?;
    ip!("-n {fabric} link set {port} master {br} up")?;
    ip!("-n {ns} addr add {ip4}/{len4} dev eth0")?;
    ip!("-n {ns} addr add {ip6}/{len6} dev eth0 nodad")?;
    ip!("-n {ns} link set eth0 up")
}

fn create_node(state: &LabState, node: &NodeState) -> Result<(), LabError> {
    let f = &state.fabric;
    let ns = node.netns.as_str();
    plug_into_fabric(state, ns, &node.fabric_port, (node.ip_v4, node.ip_v6), true)?;
    // The default route leads to the fabric's sink gateway. Routed nodes need one: proxy ARP
    // only answers for addresses (the pods' 169.254.1.1 gateway) that route via another device.
    let (gw4, gw6) = (f.gateway_v4, f.gateway_v6);
    ip!("-n {ns} route add default via {gw4}")?;
    ip!("-n {ns} -6 route add default via {gw6}")?;
    // Other nodes' pod CIDRs: the planned state has VXLAN endpoints in vxlan mode only.
    match &node.vxlan {
        None => {
            // host-gw: via their fabric address.
            for other in state.nodes.iter().filter(|n| n.name != node.name) {
                let (cidr4, via4, cidr6, via6) = (
                    other.pod_cidr_v4,
                    other.ip_v4,
                    other.pod_cidr_v6,
                    other.ip_v6,
                );
                ip!("-n {ns} route add {cidr4} via {via4}")?;
                ip!("-n {ns} -6 route add {cidr6} via {via6}")?;
            }
        }
        Some(vxlan) => create_overlay(state, node, vxlan)?,
    }

    let (cidr4, cidr6, mtu) = (node.pod_cidr_v4, node.pod_cidr_v6, node.pod_mtu);
    match node.attachment {
        Attachment::Routed => {
            // Like Calico: unassigned pod addresses of this node go nowhere.
            ip!("-n {ns} route add blackhole {cidr4}")?;
            ip!("-n {ns} -6 route add blackhole {cidr6}")
        }
        Attachment::Bridged => {
            let (gw4, len4, gw6, len6) = (
                node.gateway_v4,
                cidr4.prefix_len(),
                node.gateway_v6,
                cidr6.prefix_len(),
            );
            // A fixed MAC: a bridge without one takes its lowest port's, changing as pods come.
            // The pods' MTU, as the bridge CNI plugin sets it from flannel's subnet file.
            ip!(
                "-n {ns} link add cni0 address {} mtu {mtu} type bridge",
                mac(&state.name, ns)
            )?;
            ip!("-n {ns} addr add {gw4}/{len4} dev cni0")?;
            ip!("-n {ns} addr add {gw6}/{len6} dev cni0 nodad")?;
            ip!("-n {ns} link set cni0 up")?;
            // As kube-proxy requires of bridged pods (br_netfilter): frames between ports of
            // cni0 go through the node's iptables/nftables too, so a Service's DNAT is undone
            // on replies from a backend on the same bridge.
            sysctls(
                ns,
                &[
                    ("net/bridge/bridge-nf-call-iptables".to_owned(), "1"),
                    ("net/bridge/bridge-nf-call-ip6tables".to_owned(), "1"),
                ],
            )
        }
    }
}

/// vxlan mode, as flannel's vxlan backend sets a node up (see [`VxlanState`]): a VXLAN device
/// per family with the node's VTEP address, then for every other node a permanent neighbour
/// entry for its VTEP, an FDB entry sending its VTEP MAC to its fabric address, and last (so
/// the kernel never has to resolve the next hop itself) the route to its pod CIDR.
fn create_overlay(state: &LabState, node: &NodeState, vxlan: &VxlanState) -> Result<(), LabError> {
    let ns = node.netns.as_str();
    let (vni, port) = (vxlan.vni, vxlan.port);
    create_vtep(ns, &vxlan.v4, node.ip_v4, 32, vni, port)?;
    create_vtep(ns, &vxlan.v6, node.ip_v6, 128, vni, port)?;
    for other in state.nodes.iter().filter(|n| n.name != node.name) {
        let Some(peer) = &other.vxlan else {
            unreachable!("state invariant: in vxlan mode every node has VXLAN endpoints");
        };
        add_vxlan_peer(ns, &vxlan.v4, &peer.v4, other.pod_cidr_v4, other.ip_v4)?;
        add_vxlan_peer(ns, &vxlan.v6, &peer.v6, other.pod_cidr_v6, other.ip_v6)?;
    }
    Ok(())
}

/// A VXLAN device over `eth0` with its VTEP address (`len` is 32 or 128), up.
fn create_vtep<A: Display>(
    ns: &str,
    vtep: &Vtep<A>,
    local: impl Display,
    len: u8,
    vni: u32,
    port: u16,
) -> Result<(), LabError> {
    let (dev, ip, mac, mtu) = (vtep.device.as_str(), &vtep.ip, &vtep.mac, vtep.mtu);
    ip!(
        "-n {ns} link add {dev} address {mac} mtu {mtu} type vxlan id {vni} local {local} \
         dev eth0 dstport {port} nolearning"
    )?;
    let nodad = if len == 128 { "nodad" } else { "" };
    ip!("-n {ns} addr add {ip}/{len} dev {dev} {nodad}")?;
    ip!("-n {ns} link set {dev} up")
}

/// What sends `cidr` (another node's pod CIDR of one family) through the local VTEP `local` to
/// the peer VTEP `peer` at fabric address `remote`: neighbour, FDB entry, onlink route.
fn add_vxlan_peer<A: Display>(
    ns: &str,
    local: &Vtep<A>,
    peer: &Vtep<A>,
    cidr: impl Display,
    remote: impl Display,
) -> Result<(), LabError> {
    let (dev, via, mac) = (local.device.as_str(), &peer.ip, &peer.mac);
    ip!("-n {ns} neigh add {via} lladdr {mac} dev {dev} nud permanent")?;
    bridge!("-n {ns} fdb add {mac} dev {dev} dst {remote} self permanent")?;
    ip!("-n {ns} route add {cidr} via {via} dev {dev} onlink")
}

fn create_pod(node: &NodeState, pod: &PodState) -> Result<(), LabError> {
    let (ns, node_ns, veth) = (
        pod.netns.as_str(),
        node.netns.as_str(),
        pod.host_veth.as_str(),
    );
    let (ip4, ip6, gw4, gw6) = (pod.ip_v4, pod.ip_v6, node.gateway_v4, node.gateway_v6);
    let mtu = node.pod_mtu;
    add_netns(ns)?;
    sysctls(ns, &common_sysctls())?;
    ip!("-n {node_ns} link add {veth} mtu {mtu} type veth peer name eth0 mtu {mtu} netns {ns}")?;

    match node.attachment {
        Attachment::Routed => {
            sysctls(
                node_ns,
                &[
                    (format!("net/ipv4/conf/{veth}/proxy_arp"), "1"),
                    // Answer proxy ARP at once instead of after a random delay of up to 0.8 s.
                    (format!("net/ipv4/neigh/{veth}/proxy_delay"), "0"),
                ],
            )?;
            ip!("-n {node_ns} addr add {gw6}/64 dev {veth} nodad")?;
            ip!("-n {node_ns} link set {veth} up")?;

            ip!("-n {ns} addr add {ip4}/32 dev eth0")?;
            ip!("-n {ns} addr add {ip6}/128 dev eth0 nodad")?;
            ip!("-n {ns} link set eth0 up")?;
            ip!("-n {ns} route add {gw4} dev eth0 scope link")?;
            ip!("-n {ns} route add default via {gw4} dev eth0")?;
            ip!("-n {ns} -6 route add default via {gw6} dev eth0")?;
            // The node's routes to the pod last, as the ptp plugin does: until then its
            // addresses hit the node's blackhole route. Routed before the pod's side was up,
            // traffic already on its way (a client retrying) left an unanswered ARP behind,
            // and the pod was unreachable until the kernel's next try, up to a second later.
            ip!("-n {node_ns} route add {ip4}/32 dev {veth} scope link")?;
            ip!("-n {node_ns} -6 route add {ip6}/128 dev {veth}")
        }
        Attachment::Bridged => {
            let (len4, len6) = (node.pod_cidr_v4.prefix_len(), node.pod_cidr_v6.prefix_len());
            ip!("-n {node_ns} link set {veth} master cni0 up")?;
            // Hairpin, as the bridge CNI plugin's hairpinMode (flannel's default): a pod that
            // dials its own Service gets its packet back out of the port it came in on.
            ip!("-n {node_ns} link set dev {veth} type bridge_slave hairpin on")?;
            ip!("-n {ns} addr add {ip4}/{len4} dev eth0")?;
            ip!("-n {ns} addr add {ip6}/{len6} dev eth0 nodad")?;
            ip!("-n {ns} link set eth0 up")?;
            ip!("-n {ns} route add default via {gw4}")?;
            ip!("-n {ns} -6 route add default via {gw6}")
        }
    }
}

/// Starts every pod's server, then waits for all of them (so they bind in parallel).
fn start_servers(state: &mut LabState, exe: &Path) -> Result<(), LabError> {
    let starting = state
        .pods
        .iter()
        .map(|pod| server::spawn(exe, pod, state.server_log(pod)))
        .collect::<Result<Vec<_>, _>>()?;
    for (pod, starting) in state.pods.iter_mut().zip(starting) {
        pod.server_pid = Some(starting.wait_ready(SERVER_READY_TIMEOUT)?);
    }
    Ok(())
}

/// Options of [`add_pod`].
#[derive(Debug, Clone, Default)]
pub struct AddPodOptions {
    /// The pod's IPv4 address instead of the next free one: any pod address of its node that no
    /// existing pod has, such as a deleted pod's (to test that an address that changes hands
    /// gets the new pod's identity).
    pub ip_v4: Option<Ipv4Addr>,
    /// The pod's IPv6 address instead of the next free one.
    pub ip_v6: Option<Ipv6Addr>,
    /// The `netpol-lab` binary that runs the pod's server; default: the one `up` used if it
    /// still exists, else [`server::server_exe`].
    pub server_exe: Option<PathBuf>,
    /// Set the pod up through this chained CNI plugin (`netpol-cni`, see [`crate::cni`]): once
    /// its veth, addresses and routes exist, CNI ADD runs with them as `prevResult`, before the
    /// pod's server starts; CNI DEL runs when the pod is removed.
    pub cni: Option<PathBuf>,
}

/// Adds a pod to a running lab, as `up` would have created it: netns, veth on its node's
/// attachment (routed: /32 and /128 routes and proxy ARP; bridged: a `cni0` port), addresses
/// (the next free ones of the node's CIDRs, see [`LabState::plan_pod`], or those in `options`),
/// then its server, then its Pod manifest (atomically), then the state file. Returns the pod as
/// recorded. On failure, whatever was created is removed again and the state is unchanged.
pub fn add_pod(lab: &str, pod: PodSpec, options: &AddPodOptions) -> Result<PodState, LabError> {
    let _lock = lock(lab)?;
    let mut state = LabState::load(lab)?;
    let mut pod = state.plan_pod(pod, options.ip_v4, options.ip_v6)?;
    let exe = match options
        .server_exe
        .clone()
        .or_else(|| state.server_exe.clone().filter(|exe| exe.is_file()))
    {
        Some(exe) => exe,
        None => server::server_exe()?,
    };
    let node = state.node_of(&pod).clone();
    pod.cni = options
        .cni
        .as_deref()
        .map(|exe| cni::PodCni::new(&state, &node, exe));
    match start_pod(&mut state, &node, &mut pod, &exe) {
        Ok(()) => Ok(pod),
        Err(e) => {
            // Best effort: the error that matters is the one that stopped `add_pod`.
            let _ = delete_pod(&node, &pod);
            let _ = remove_pod_manifest(&state, &pod);
            if let Some(cp) = &state.control_plane {
                let _ = controlplane::finish_delete_pod(cp, &pod);
            }
            Err(e)
        }
    }
}

/// The kernel and file side of [`add_pod`], in kubelet order: CNI ADD, container, manifest.
fn start_pod(
    state: &mut LabState,
    node: &NodeState,
    pod: &mut PodState,
    exe: &Path,
) -> Result<(), LabError> {
    let cp = state.control_plane.clone();
    if let Some(cp) = &cp {
        // The Pod object exists (scheduled to its node) before its kubelet sets it up.
        controlplane::create_pod(state, cp, pod)?;
    }
    create_pod(node, pod)?;
    if let Some(plugin) = &pod.cni {
        cni::add(plugin, node, pod)?;
    }
    let starting = server::spawn(exe, pod, state.server_log(pod))?;
    pod.server_pid = Some(starting.wait_ready(SERVER_READY_TIMEOUT)?);
    if let Some(cp) = &cp {
        controlplane::report_running(state, cp, &[pod])?;
        controlplane::write_resolv_conf(cp, pod)?;
        pod.service_ips = controlplane::service_ips(cp, pod)?;
    }
    if let Some(recorded) = state
        .pods
        .iter_mut()
        .find(|p| p.namespace == pod.namespace && p.name == pod.name)
    {
        recorded.server_pid = pod.server_pid;
        recorded.service_ips = pod.service_ips.clone();
        recorded.cni = pod.cni.clone();
    }
    let path = write_pod_manifest(state, pod)?;
    if !state.manifests.contains(&path) {
        state.manifests.push(path);
    }
    state.save()?;
    Ok(())
}

/// Removes a pod from a running lab: stops its server (and anything else running in its
/// netns), deletes its routes and veth on the node and its netns, then removes its Pod
/// manifest and updates the state file. Returns the pod as it was.
pub fn remove_pod(lab: &str, namespace: &str, name: &str) -> Result<PodState, LabError> {
    let _lock = lock(lab)?;
    let mut state = LabState::load(lab)?;
    let pod = state.forget_pod(namespace, name)?;
    let node = state
        .node(&pod.node)
        .expect("state invariant: every pod's node exists")
        .clone();
    if let Some(cp) = &state.control_plane {
        // The user's delete: the pod turns Terminating while its kubelet tears it down.
        controlplane::begin_delete_pod(cp, &pod)?;
    }
    delete_pod(&node, &pod)?;
    if let Some(cp) = &state.control_plane {
        controlplane::finish_delete_pod(cp, &pod)?;
        let _ = fs::remove_dir_all(Path::new("/etc/netns").join(&pod.netns));
    }
    let manifest = remove_pod_manifest(&state, &pod)?;
    state.manifests.retain(|path| path != &manifest);
    state.save()?;
    Ok(pod)
}

/// Replaces a pod's labels (the whole set) and rewrites its Pod manifest atomically, then the
/// state file. Returns the updated pod.
pub fn set_pod_labels(
    lab: &str,
    namespace: &str,
    name: &str,
    labels: BTreeMap<String, String>,
) -> Result<PodState, LabError> {
    let _lock = lock(lab)?;
    let mut state = LabState::load(lab)?;
    let old = state
        .pod(namespace, name)
        .map(|p| p.labels.clone())
        .unwrap_or_default();
    let pod = state.relabel_pod(namespace, name, labels)?;
    if let Some(cp) = &state.control_plane {
        controlplane::set_labels(cp, "pod", Some(namespace), name, &old, &pod.labels)?;
    }
    write_pod_manifest(&state, &pod)?;
    state.save()?;
    Ok(pod)
}

/// Replaces a namespace's labels (the whole set; `kubernetes.io/metadata.name` stays) and
/// rewrites its Namespace manifest atomically, then the state file.
pub fn set_namespace_labels(
    lab: &str,
    namespace: &str,
    labels: BTreeMap<String, String>,
) -> Result<(), LabError> {
    let _lock = lock(lab)?;
    let mut state = LabState::load(lab)?;
    let old = state
        .spec
        .namespaces
        .iter()
        .find(|n| n.name == namespace)
        .map(|n| n.labels.clone())
        .unwrap_or_default();
    state.relabel_namespace(namespace, labels)?;
    if let Some(cp) = &state.control_plane {
        let new = state
            .spec
            .namespaces
            .iter()
            .find(|n| n.name == namespace)
            .map(|n| n.labels.clone())
            .unwrap_or_default();
        controlplane::set_labels(cp, "namespace", None, namespace, &old, &new)?;
    }
    write_namespace_manifest(&state, namespace)?;
    state.save()?;
    Ok(())
}

/// Changes to a running [`Lab`] that keep its copy of the state current (see [`add_pod`] and
/// friends, which work from the lab name and the state file).
impl Lab {
    /// Reads the state file again (after changes made through the free functions or the CLI).
    pub fn reload(&mut self) -> Result<(), LabError> {
        self.state = LabState::load(&self.state.name)?;
        Ok(())
    }

    /// [`add_pod`] on this lab.
    pub fn add_pod(&mut self, pod: PodSpec, options: &AddPodOptions) -> Result<PodState, LabError> {
        let added = add_pod(&self.state.name, pod, options)?;
        self.reload()?;
        Ok(added)
    }

    /// [`remove_pod`] on this lab.
    pub fn remove_pod(&mut self, namespace: &str, name: &str) -> Result<PodState, LabError> {
        let removed = remove_pod(&self.state.name, namespace, name)?;
        self.reload()?;
        Ok(removed)
    }

    /// [`set_pod_labels`] on this lab.
    pub fn set_pod_labels(
        &mut self,
        namespace: &str,
        name: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<PodState, LabError> {
        let pod = set_pod_labels(&self.state.name, namespace, name, labels)?;
        self.reload()?;
        Ok(pod)
    }

    /// [`set_namespace_labels`] on this lab.
    pub fn set_namespace_labels(
        &mut self,
        namespace: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<(), LabError> {
        set_namespace_labels(&self.state.name, namespace, labels)?;
        self.reload()
    }
}

/// Tears one pod down, in the order a kubelet does: stops every process in its netns (its
/// server, and anything else started there), deletes its routes and veth on the node (CNI DEL;
/// deleting the host side takes the pod's `eth0` with it at once, while a deleted netns only
/// goes away once nothing holds it), then its netns. Parts already gone are skipped.
fn delete_pod(node: &NodeState, pod: &PodState) -> Result<(), LabError> {
    let netns_path = pod.netns_path();
    let mut pids: BTreeSet<u32> = processes_in(&[netns_path.as_path()]).into_iter().collect();
    if let Some(pid) = pod.server_pid
        && is_alive(pid)
        && is_server_of(pid, &pod.key())
    {
        pids.insert(pid);
    }
    terminate(&pids.into_iter().collect::<Vec<_>>(), TERMINATE_GRACE);

    let (node_ns, veth, ip4, ip6) = (
        node.netns.as_str(),
        pod.host_veth.as_str(),
        pod.ip_v4,
        pod.ip_v6,
    );
    // The chained plugin's DEL first (a runtime runs a chain's DEL in reverse order); its
    // error is reported once the pod is gone, so that the lab stays consistent.
    let cni_del = pod.cni.as_ref().map(|plugin| cni::del(plugin, node, pod));
    if ip_succeeds(&format!("-n {node_ns} link show dev {veth}")) {
        if node.attachment == Attachment::Routed {
            // Like Calico's CNI DEL. Deleting the veth would remove them as well, so a route
            // that is missing (a failed CNI ADD) is no error.
            ip_succeeds(&format!("-n {node_ns} route del {ip4}/32 dev {veth}"));
            ip_succeeds(&format!("-n {node_ns} -6 route del {ip6}/128 dev {veth}"));
        }
        ip!("-n {node_ns} link del {veth}")?;
    }
    if netns_path.exists() {
        ip!("netns delete {}", pod.netns)?;
    }
    cni_del.unwrap_or(Ok(()))
}

/// Removes a pod's manifest file if it exists; returns its path.
fn remove_pod_manifest(state: &LabState, pod: &PodState) -> Result<PathBuf, LabError> {
    let path = state
        .manifests_dir
        .join(pod_manifest_file(&pod.namespace, &pod.name));
    match fs::remove_file(&path) {
        Ok(()) => Ok(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(path),
        Err(source) => Err(LabError::Io {
            context: format!("remove {}", path.display()),
            source,
        }),
    }
}

/// The control plane's netns on the fabric (host 253), then etcd, kube-apiserver and
/// kube-controller-manager in it; then the cluster's objects: Nodes, Namespaces, Pods (not yet
/// running) and their Services, and the CoreDNS pod's.
fn start_control_plane(state: &mut LabState) -> Result<(), LabError> {
    let mut cp = state.control_plane.clone().expect("caller checked");
    let ns = cp.netns.as_str();
    plug_into_fabric(state, ns, &cp.fabric_port, (cp.ip_v4, cp.ip_v6), false)?;
    // Pods talk to the API server (CoreDNS does): answers go back via their node.
    for node in &state.nodes {
        let (cidr4, via4, cidr6, via6) =
            (node.pod_cidr_v4, node.ip_v4, node.pod_cidr_v6, node.ip_v6);
        ip!("-n {ns} route add {cidr4} via {via4}")?;
        ip!("-n {ns} -6 route add {cidr6} via {via6}")?;
    }
    controlplane::start(&mut cp)?;
    if cp.spec.dns {
        let dns = controlplane::dns_pod_spec(state);
        state.plan_system_pod(&dns);
    }
    state.control_plane = Some(cp.clone());
    state.save()?;
    controlplane::register(state, &cp)?;
    Ok(())
}

/// Once the pods run: CoreDNS, the pods' status (Running, podIPs), kube-proxy on every node,
/// and waits until Services reach their pods from every node.
fn finish_control_plane(state: &mut LabState) -> Result<(), LabError> {
    let mut cp = state.control_plane.clone().expect("caller checked");
    for pod in &state.system_pods {
        create_pod(state.node_of(pod), pod)?;
        controlplane::start_dns(&mut cp, pod)?;
    }
    let running: Vec<&PodState> = state.pods.iter().chain(&state.system_pods).collect();
    controlplane::report_running(state, &cp, &running)?;
    controlplane::start_proxies(state, &mut cp)?;
    state.control_plane = Some(cp.clone());
    state.save()?;
    for pod in &state.pods {
        controlplane::write_resolv_conf(&cp, pod)?;
    }
    controlplane::wait_endpoints(state, &cp)?;
    controlplane::read_service_ips(state, &cp)?;
    controlplane::wait_proxies(state, &cp)?;
    Ok(())
}

/// Sysctls of every lab netns: `lo` up is done by `add_netns`; no IPv6 DAD (addresses would
/// be tentative for a second or more), no reverse-path filtering (independent of the host's
/// settings, which IPv4 namespaces inherit).
fn common_sysctls() -> Vec<(String, &'static str)> {
    [
        ("net/ipv6/conf/all/accept_dad", "0"),
        ("net/ipv6/conf/default/accept_dad", "0"),
        ("net/ipv4/conf/all/rp_filter", "0"),
        ("net/ipv4/conf/default/rp_filter", "0"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

fn forwarding(value: &'static str) -> Vec<(String, &'static str)> {
    vec![
        ("net/ipv4/ip_forward".to_owned(), value),
        ("net/ipv6/conf/all/forwarding".to_owned(), value),
    ]
}

fn sysctls(netns: &str, values: &[(String, &str)]) -> Result<(), LabError> {
    write_sysctls(&Path::new(NETNS_DIR).join(netns), values).map_err(|source| LabError::Io {
        context: format!("sysctl in netns {netns}"),
        source,
    })
}

fn add_netns(name: &str) -> Result<(), LabError> {
    ip!("netns add {name}")?;
    ip!("-n {name} link set lo up")
}

/// Runs `ip <args>` (split on whitespace) and tells whether it succeeded (for `show` queries).
fn ip_succeeds(args: &str) -> bool {
    Command::new("ip")
        .args(args.split_whitespace())
        .output()
        .is_ok_and(|output| output.status.success())
}

/// Runs `ip <args>` (split on whitespace), turning a failure into an error that shows the
/// command and its stderr.
fn ip(args: &str) -> Result<(), LabError> {
    run("ip", args)
}

/// Runs `bridge <args>` as [`ip`] runs `ip`.
fn bridge(args: &str) -> Result<(), LabError> {
    run("bridge", args)
}

/// Runs `<program> <args>` (split on whitespace), turning a failure into an error that shows the
/// command and its stderr.
fn run(program: &str, args: &str) -> Result<(), LabError> {
    let command = || format!("{program} {args}");
    let output = Command::new(program)
        .args(args.split_whitespace())
        .output()
        .map_err(|source| LabError::Io {
            context: format!("run `{}`", command()),
            source,
        })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(LabError::Command {
            command: command(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// Tears a lab down: kills every process in its namespaces (servers, and anything else that
/// was started there, such as an agent), deletes its namespaces (which deletes their links),
/// removes the manifests it wrote and its state dir. Works without a state file; idempotent.
pub fn down(lab: &str) -> Result<DownReport, LabError> {
    let mut report = DownReport {
        lab: lab.to_owned(),
        ..DownReport::default()
    };
    let state = LabState::load(lab).ok();
    let netns = list_netns(&netns_prefix(lab));
    let paths: Vec<PathBuf> = netns.iter().map(|n| Path::new(NETNS_DIR).join(n)).collect();
    let path_refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
    let mut pids: BTreeSet<u32> = processes_in(&path_refs).into_iter().collect();
    // Servers whose netns file is gone already (deleted by hand) are still ours to stop.
    if let Some(state) = &state {
        for pod in &state.pods {
            if let Some(pid) = pod.server_pid
                && is_alive(pid)
                && is_server_of(pid, &pod.key())
            {
                pids.insert(pid);
            }
        }
    }
    report.processes_killed = pids.into_iter().collect();
    terminate(&report.processes_killed, TERMINATE_GRACE);
    // Agents run in node namespaces and are gone now; their pinned maps and
    // links (whose veths are about to go) would outlive the lab.
    crate::agents::remove_agent_pins(lab);
    // Pods' resolv.conf files (control-plane labs).
    crate::controlplane::remove_netns_etc(&netns_prefix(lab));

    for name in netns {
        match ip!("netns delete {name}") {
            Ok(()) => report.netns_deleted.push(name),
            // Someone else (a parallel `down`) may have deleted it meanwhile.
            Err(_) if !Path::new(NETNS_DIR).join(&name).exists() => {}
            Err(e) => return Err(e),
        }
    }

    if let Some(state) = &state
        && !state.manifests_dir.starts_with(&state.state_dir)
    {
        for file in &state.manifests {
            if fs::remove_file(file).is_ok() {
                report.manifests_removed += 1;
            }
        }
    }
    let dir = state_dir(lab);
    if dir.exists() {
        if let Some(state) = &state
            && state.manifests_dir.starts_with(&dir)
        {
            report.manifests_removed += state.manifests.len();
        }
        fs::remove_dir_all(&dir).map_err(|source| LabError::Io {
            context: format!("remove {}", dir.display()),
            source,
        })?;
        report.state_dir_removed = true;
    }
    Ok(report)
}

/// Tears down every lab: those with a state dir and those with only leftover namespaces.
pub fn down_all() -> Result<Vec<DownReport>, LabError> {
    let mut labs: BTreeSet<String> = fs::read_dir(STATE_ROOT)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| !name.starts_with('.'))
        .collect();
    for netns in list_netns(NETNS_PREFIX) {
        if let Some((lab, _)) = netns[NETNS_PREFIX.len()..].split_once('_') {
            labs.insert(lab.to_owned());
        }
    }
    labs.iter().map(|lab| down(lab)).collect()
}

/// True if `pid`'s command line is `... serve --name <key> ...`.
fn is_server_of(pid: u32, key: &str) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    args.contains(&b"serve".as_slice())
        && args
            .windows(2)
            .any(|w| w[0] == b"--name" && w[1] == key.as_bytes())
}
