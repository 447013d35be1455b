//! A real Kubernetes control plane for a lab: etcd, kube-apiserver and kube-controller-manager in
//! the lab's own `control` netns (on the fabric, host 253), kube-proxy in every node netns, and
//! CoreDNS as a kube-system pod behind the kube-dns Service. All of them are the upstream
//! binaries built by `cargo xtask setup` (see [`crate::tools`]).
//!
//! The lab plays the kubelet: it registers the Nodes (podCIDRs, InternalIPs), creates each Pod
//! object, plugs the pod in (CNI ADD), starts its server, and then writes the Pod's status
//! (Running, Ready, podIPs, hostIPs) as a kubelet does. Each model pod gets a ClusterIP Service
//! (`s-<namespace>-<pod>`, as upstream's e2e framework names them); the EndpointSlices come from
//! the real controller and kube-proxy programs the node's netfilter from them.
//!
//! TLS material is generated per lab ([`crate::pki`]) and goes with the state dir on `down`;
//! every process runs inside a lab netns, so `down` stops them with everything else.

use std::{
    collections::BTreeMap,
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{
    kube::{KubeError, Kubectl, run_all},
    manifests::{LAB_ANNOTATION, node_manifest, pod_manifest},
    netns::{netns_command, run_in_netns},
    pki::{self, ClientIdentity, PkiError},
    spec::{NAMESPACE_NAME_LABEL, PortSpec, Protocol},
    state::{LabState, NETNS_DIR, NodeState, PodState},
    tools::{MissingTool, tool},
};

/// Fabric host of the control plane's address (the gateway is 254, nodes are 1, 2, ...).
pub const CONTROL_PLANE_HOST: u32 = 253;
/// The API server's port.
pub const API_PORT: u16 = 6443;
/// The DNS Service's address is this host of the service CIDRs (10.96.0.10, as kubeadm's).
const DNS_SERVICE_HOST: u32 = 10;
/// Namespace and name of the agents' ServiceAccount in `deploy/`.
pub const AGENT_SERVICE_ACCOUNT: (&str, &str) = ("kube-system", "netpol-agent");
/// How long the API server gets to become ready.
const API_READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long Services get to have endpoints programmed on every node.
const SERVICES_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How kube-proxy programs Services on the nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyMode {
    #[default]
    Iptables,
    Nftables,
    /// No kube-proxy at all (ClusterIPs lead nowhere; pod IPs still work).
    None,
}

impl std::str::FromStr for ProxyMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "iptables" => Ok(ProxyMode::Iptables),
            "nftables" => Ok(ProxyMode::Nftables),
            "none" => Ok(ProxyMode::None),
            _ => Err(format!(
                "unknown kube-proxy mode {s:?} (iptables, nftables or none)"
            )),
        }
    }
}

impl std::fmt::Display for ProxyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProxyMode::Iptables => "iptables",
            ProxyMode::Nftables => "nftables",
            ProxyMode::None => "none",
        })
    }
}

/// The cluster file's `controlPlane:` (or `netpol-lab up --control-plane`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ControlPlaneSpec {
    /// kube-proxy's mode on every node.
    #[serde(default)]
    pub proxy_mode: ProxyMode,
    /// ClusterIP range, IPv4.
    #[serde(default = "default_service_cidr", rename = "serviceCIDR")]
    pub service_cidr: Ipv4Net,
    /// ClusterIP range, IPv6.
    #[serde(default = "default_service_cidr_v6", rename = "serviceCIDRv6")]
    pub service_cidr_v6: Ipv6Net,
    /// Run CoreDNS behind the kube-dns Service (default true).
    #[serde(default = "default_true")]
    pub dns: bool,
}

fn default_service_cidr() -> Ipv4Net {
    "10.96.0.0/16".parse().expect("valid")
}
fn default_service_cidr_v6() -> Ipv6Net {
    "fd00:96::/112".parse().expect("valid")
}
fn default_true() -> bool {
    true
}

impl Default for ControlPlaneSpec {
    fn default() -> Self {
        ControlPlaneSpec {
            proxy_mode: ProxyMode::default(),
            service_cidr: default_service_cidr(),
            service_cidr_v6: default_service_cidr_v6(),
            dns: true,
        }
    }
}

/// A running control plane, as recorded in the lab's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlPlaneState {
    pub spec: ControlPlaneSpec,
    /// `nplab_<lab>_control`.
    pub netns: String,
    /// Its link in the fabric netns.
    pub fabric_port: String,
    pub ip_v4: Ipv4Addr,
    pub ip_v6: Ipv6Addr,
    /// `https://<ip_v4>:6443`.
    pub server_url: String,
    /// TLS material, kubeconfigs, etcd's data and the components' logs.
    pub dir: PathBuf,
    pub etcd_pid: Option<u32>,
    pub apiserver_pid: Option<u32>,
    pub controller_manager_pid: Option<u32>,
    /// kube-proxy's pid per node.
    #[serde(default)]
    pub proxy_pids: BTreeMap<String, u32>,
    /// The kube-dns Service's ClusterIPs, when DNS runs.
    pub dns_service_ips: Vec<IpAddr>,
    /// CoreDNS's pid.
    pub dns_pid: Option<u32>,
}

/// What went wrong with the control plane.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error(transparent)]
    Tool(#[from] MissingTool),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Kube(#[from] KubeError),
    #[error("starting {component}: {source}")]
    Spawn {
        component: String,
        #[source]
        source: io::Error,
    },
    #[error("{component} exited early; the end of its log ({log}):\n{tail}")]
    Exited {
        component: String,
        log: PathBuf,
        tail: String,
    },
    #[error("{what} was not ready after {waited:?}: {last}")]
    NotReady {
        what: String,
        waited: Duration,
        last: String,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl ControlPlaneState {
    /// Plans the control plane of a lab (names and addresses; nothing is created).
    pub fn plan(state: &LabState, spec: &ControlPlaneSpec) -> ControlPlaneState {
        let ip_v4 = nth_v4(&state.fabric.cidr_v4, CONTROL_PLANE_HOST);
        let ip_v6 = nth_v6(&state.fabric.cidr_v6, CONTROL_PLANE_HOST);
        ControlPlaneState {
            spec: spec.clone(),
            netns: format!("{}control", crate::state::netns_prefix(&state.name)),
            fabric_port: "cp".to_owned(),
            ip_v4,
            ip_v6,
            server_url: format!("https://{ip_v4}:{API_PORT}"),
            dir: state.state_dir.join("control-plane"),
            etcd_pid: None,
            apiserver_pid: None,
            controller_manager_pid: None,
            proxy_pids: BTreeMap::new(),
            dns_service_ips: if spec.dns {
                vec![
                    nth_v4(&spec.service_cidr, DNS_SERVICE_HOST).into(),
                    nth_v6(&spec.service_cidr_v6, DNS_SERVICE_HOST).into(),
                ]
            } else {
                Vec::new()
            },
            dns_pid: None,
        }
    }

    /// `/run/netns/<netns>`.
    pub fn netns_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.netns)
    }

    /// The admin's kubeconfig (system:masters).
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.join("pki").join("admin.kubeconfig")
    }

    /// `kubectl` as the lab's admin, in the control plane's netns.
    pub fn kubectl(&self) -> Result<Kubectl, MissingTool> {
        Ok(Kubectl {
            exe: tool("kubectl")?,
            kubeconfig: self.admin_kubeconfig(),
            netns: self.netns_path(),
        })
    }

    /// Where a component's log goes.
    pub fn log(&self, component: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{component}.log"))
    }

    fn pki_dir(&self) -> PathBuf {
        self.dir.join("pki")
    }
}

fn nth_v4(net: &Ipv4Net, host: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()) + host)
}

fn nth_v6(net: &Ipv6Net, host: u32) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(net.network()) + u128::from(host))
}

/// Starts a long-running component detached (own session, stdin closed, output appended to its
/// log) inside a netns; returns its pid.
pub fn spawn_daemon(
    netns: &Path,
    exe: &Path,
    args: &[String],
    log: &Path,
    component: &str,
) -> Result<u32, ControlPlaneError> {
    let mut command = netns_command(netns, exe);
    command.args(args);
    spawn_command(command, log, component)
}

/// Starts `command` detached (own session, stdin closed, output appended to `log`); returns its
/// pid.
pub fn spawn_command(
    mut command: std::process::Command,
    log: &Path,
    component: &str,
) -> Result<u32, ControlPlaneError> {
    let err = |source| ControlPlaneError::Spawn {
        component: component.to_owned(),
        source,
    };
    if let Some(dir) = log.parent() {
        fs::create_dir_all(dir).map_err(err)?;
    }
    let out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(err)?;
    command
        .stdin(Stdio::null())
        .stdout(out.try_clone().map_err(err)?)
        .stderr(out);
    // SAFETY: setsid is async-signal-safe; the component outlives `netpol-lab up`.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().map_err(err)?;
    Ok(child.id())
}

/// The last lines of a log, for errors.
pub fn log_tail(log: &Path, lines: usize) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn check_alive(pid: u32, component: &str, log: &Path) -> Result<(), ControlPlaneError> {
    if crate::netns::is_alive(pid) {
        Ok(())
    } else {
        Err(ControlPlaneError::Exited {
            component: component.to_owned(),
            log: log.to_owned(),
            tail: log_tail(log, 25),
        })
    }
}

/// Starts etcd and kube-apiserver in the control netns (which must exist), writing TLS
/// material first; returns once the API server answers `/readyz`. Then kube-controller-manager.
pub fn start(cp: &mut ControlPlaneState) -> Result<(), ControlPlaneError> {
    let pki_dir = cp.pki_dir();
    let kubernetes_service_ip: IpAddr = nth_v4(&cp.spec.service_cidr, 1).into();
    let kubernetes_service_ip6: IpAddr = nth_v6(&cp.spec.service_cidr_v6, 1).into();
    let pki = pki::generate(
        &pki_dir,
        &cp.server_url,
        &[
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
            "localhost",
        ],
        &[
            cp.ip_v4.into(),
            cp.ip_v6.into(),
            kubernetes_service_ip,
            kubernetes_service_ip6,
            Ipv4Addr::LOCALHOST.into(),
        ],
        &[
            ClientIdentity {
                name: "admin",
                user: "netpol-lab-admin",
                groups: &["system:masters"],
            },
            ClientIdentity {
                name: "controller-manager",
                user: "system:kube-controller-manager",
                groups: &[],
            },
            // Bound to system:node-proxier by the API server's default RBAC.
            ClientIdentity {
                name: "kube-proxy",
                user: "system:kube-proxy",
                groups: &[],
            },
            // Bound to the lab's system:coredns ClusterRole (see `bootstrap_objects`).
            ClientIdentity {
                name: "coredns",
                user: "system:coredns",
                groups: &[],
            },
        ],
    )?;

    let netns = cp.netns_path();
    let etcd_dir = cp.dir.join("etcd");
    let etcd_log = cp.log("etcd");
    cp.etcd_pid = Some(spawn_daemon(
        &netns,
        &tool("etcd")?,
        &[
            "--name=lab".into(),
            format!("--data-dir={}", etcd_dir.display()),
            "--listen-client-urls=http://127.0.0.1:2379".into(),
            "--advertise-client-urls=http://127.0.0.1:2379".into(),
            "--listen-peer-urls=http://127.0.0.1:2380".into(),
            "--initial-advertise-peer-urls=http://127.0.0.1:2380".into(),
            "--initial-cluster=lab=http://127.0.0.1:2380".into(),
            "--listen-metrics-urls=http://127.0.0.1:2381".into(),
            // The data lives on tmpfs and goes with the lab: fsync buys nothing here.
            "--unsafe-no-fsync".into(),
            "--quota-backend-bytes=8589934592".into(),
            "--log-level=warn".into(),
        ],
        &etcd_log,
        "etcd",
    )?);

    let apiserver_args = apiserver_args(cp, &pki);
    cp.apiserver_pid = Some(spawn_daemon(
        &netns,
        &tool("kube-apiserver")?,
        &apiserver_args,
        &cp.log("kube-apiserver"),
        "kube-apiserver",
    )?);
    wait_api_ready(cp)?;

    cp.controller_manager_pid = Some(spawn_daemon(
        &netns,
        &tool("kube-controller-manager")?,
        &controller_manager_args(cp),
        &cp.log("kube-controller-manager"),
        "kube-controller-manager",
    )?);
    Ok(())
}

fn apiserver_args(cp: &ControlPlaneState, pki: &pki::Pki) -> Vec<String> {
    let p = |path: &Path| path.display().to_string();
    vec![
        "--etcd-servers=http://127.0.0.1:2379".into(),
        "--bind-address=::".into(),
        format!("--secure-port={API_PORT}"),
        format!("--advertise-address={}", cp.ip_v4),
        format!("--tls-cert-file={}", p(&pki.server_cert)),
        format!("--tls-private-key-file={}", p(&pki.server_key)),
        format!("--client-ca-file={}", p(&pki.ca_cert)),
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
        format!("--service-account-key-file={}", p(&pki.sa_pub)),
        format!("--service-account-signing-key-file={}", p(&pki.sa_key)),
        format!(
            "--service-cluster-ip-range={},{}",
            cp.spec.service_cidr, cp.spec.service_cidr_v6
        ),
        "--authorization-mode=RBAC".into(),
        "--allow-privileged=true".into(),
        "--profiling=false".into(),
        // Tokens for the agents are minted with `kubectl create token --duration`.
        "--service-account-max-token-expiration=48h".into(),
        "--service-account-extend-token-expiration=false".into(),
        "--v=1".into(),
    ]
}

fn controller_manager_args(cp: &ControlPlaneState) -> Vec<String> {
    let pki = cp.pki_dir();
    let kubeconfig = pki.join("controller-manager.kubeconfig");
    vec![
        format!("--kubeconfig={}", kubeconfig.display()),
        format!("--authentication-kubeconfig={}", kubeconfig.display()),
        format!("--authorization-kubeconfig={}", kubeconfig.display()),
        format!(
            "--service-account-private-key-file={}",
            pki.join("sa.key").display()
        ),
        format!("--root-ca-file={}", pki.join("ca.crt").display()),
        "--use-service-account-credentials=true".into(),
        // No kubelets post heartbeats: the node lifecycle controller would taint every node
        // unreachable and evict the pods. Node CIDRs come from the cluster file.
        "--controllers=*,-node-lifecycle-controller,-node-ipam-controller".into(),
        "--leader-elect=false".into(),
        "--bind-address=127.0.0.1".into(),
        "--cluster-name=netpol-lab".into(),
        "--v=1".into(),
    ]
}

/// Waits for `/readyz` of the API server (and that it is still running).
pub fn wait_api_ready(cp: &ControlPlaneState) -> Result<(), ControlPlaneError> {
    let kubectl = cp.kubectl()?;
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < API_READY_TIMEOUT {
        if let Some(pid) = cp.apiserver_pid {
            check_alive(pid, "kube-apiserver", &cp.log("kube-apiserver"))?;
        }
        if let Some(pid) = cp.etcd_pid {
            check_alive(pid, "etcd", &cp.log("etcd"))?;
        }
        match kubectl.run(&["get", "--raw", "/readyz", "--request-timeout=2s"], None) {
            Ok(out) if out.trim() == "ok" => return Ok(()),
            Ok(out) => last = out,
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    Err(ControlPlaneError::NotReady {
        what: "kube-apiserver".into(),
        waited: API_READY_TIMEOUT,
        last,
    })
}

/// Objects the lab needs before anything else: CoreDNS's RBAC.
fn bootstrap_objects() -> Vec<Value> {
    vec![
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": { "name": "system:coredns" },
            "rules": [
                { "apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"],
                  "verbs": ["list", "watch"] },
                { "apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                  "verbs": ["list", "watch"] },
            ],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": { "name": "system:coredns" },
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                         "name": "system:coredns" },
            "subjects": [{ "apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                           "name": "system:coredns" }],
        }),
    ]
}

/// The Namespace object of a lab namespace (labels as in the cluster file plus
/// `kubernetes.io/metadata.name`, which the API server also sets).
fn namespace_object(state: &LabState, name: &str, labels: &BTreeMap<String, String>) -> Value {
    let mut labels = labels.clone();
    labels.insert(NAMESPACE_NAME_LABEL.to_owned(), name.to_owned());
    json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": { "name": name, "labels": labels,
                      "annotations": { LAB_ANNOTATION: state.name } },
    })
}

/// A namespace's `default` ServiceAccount: the ServiceAccount admission plugin refuses pods
/// until it exists, and the controller that creates it may not have run yet.
fn default_service_account(namespace: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": { "name": "default", "namespace": namespace },
    })
}

/// A Pod object as created (spec only: the API server ignores status on create).
fn pod_object(state: &LabState, pod: &PodState) -> Value {
    let mut object = pod_manifest(state, pod);
    if let Some(meta) = object["metadata"].as_object_mut() {
        meta.remove("uid");
    }
    if let Some(o) = object.as_object_mut() {
        o.remove("status");
    }
    object["spec"]["automountServiceAccountToken"] = json!(false);
    object["spec"]["enableServiceLinks"] = json!(false);
    object
}

/// The status a kubelet writes once the pod's sandbox has its IPs and its container runs.
fn pod_running_status(state: &LabState, pod: &PodState) -> Value {
    let node = state
        .node(&pod.node)
        .expect("state invariant: every pod's node exists");
    let now = now_rfc3339();
    let condition =
        |kind: &str| json!({ "type": kind, "status": "True", "lastTransitionTime": now });
    json!({ "status": {
        "phase": "Running",
        "conditions": [
            condition("PodReadyToStartContainers"), condition("Initialized"),
            condition("ContainersReady"), condition("Ready"), condition("PodScheduled"),
        ],
        "hostIP": node.ip_v4.to_string(),
        "hostIPs": [{ "ip": node.ip_v4.to_string() }, { "ip": node.ip_v6.to_string() }],
        "podIP": pod.ip_v4.to_string(),
        "podIPs": [{ "ip": pod.ip_v4.to_string() }, { "ip": pod.ip_v6.to_string() }],
        "startTime": now,
        "containerStatuses": [{
            "name": "serve", "ready": true, "started": true, "restartCount": 0,
            "image": "netpol-lab/serve", "imageID": "",
            "state": { "running": { "startedAt": now } },
        }],
    }})
}

/// What a kubelet writes into its Node's status: addresses and Ready.
fn node_status(node: &NodeState) -> Value {
    let now = now_rfc3339();
    json!({ "status": {
        "addresses": [
            { "type": "InternalIP", "address": node.ip_v4.to_string() },
            { "type": "InternalIP", "address": node.ip_v6.to_string() },
            { "type": "Hostname", "address": node.name },
        ],
        "conditions": [{ "type": "Ready", "status": "True", "reason": "KubeletReady",
                         "message": "netpol-lab plays the kubelet",
                         "lastHeartbeatTime": now, "lastTransitionTime": now }],
    }})
}

/// Name of a pod's Service, as upstream's e2e framework names it.
pub fn service_name(pod: &PodState) -> String {
    format!("s-{}-{}", pod.namespace, pod.name)
}

/// The ClusterIP Service of a model pod: every container port (name
/// `service-port-<protocol>-<port>`, as upstream's e2e), dual-stack. It selects `pod: <name>` when
/// the pod has that label (as upstream's model pods do), else the pod's labels at creation.
pub fn service_object(pod: &PodState) -> Option<Value> {
    if pod.ports.is_empty() {
        return None;
    }
    let selector = match pod.labels.get("pod") {
        Some(v) if v == &pod.name => BTreeMap::from([("pod".to_owned(), pod.name.clone())]),
        _ => pod.labels.clone(),
    };
    let mut seen = std::collections::BTreeSet::new();
    let ports: Vec<Value> = pod
        .ports
        .iter()
        .filter(|p| seen.insert((p.protocol, p.port)))
        .map(|p: &PortSpec| {
            json!({
                "name": format!("service-port-{}-{}", p.protocol.as_str().to_lowercase(), p.port),
                "port": p.port, "targetPort": p.port, "protocol": p.protocol.as_str(),
            })
        })
        .collect();
    Some(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": service_name(pod), "namespace": pod.namespace },
        "spec": {
            "type": "ClusterIP", "selector": selector, "ports": ports,
            "ipFamilyPolicy": "PreferDualStack", "ipFamilies": ["IPv4", "IPv6"],
        },
    }))
}

/// The kube-dns Service in front of CoreDNS.
fn dns_service_object(cp: &ControlPlaneState) -> Value {
    let ips: Vec<String> = cp.dns_service_ips.iter().map(IpAddr::to_string).collect();
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": "kube-dns", "namespace": "kube-system",
                      "labels": { "k8s-app": "kube-dns" } },
        "spec": {
            "type": "ClusterIP", "selector": { "k8s-app": "kube-dns" },
            "clusterIP": ips[0], "clusterIPs": ips,
            "ipFamilyPolicy": "PreferDualStack", "ipFamilies": ["IPv4", "IPv6"],
            "ports": [
                { "name": "dns", "port": 53, "targetPort": 53, "protocol": "UDP" },
                { "name": "dns-tcp", "port": 53, "targetPort": 53, "protocol": "TCP" },
            ],
        },
    })
}

/// Registers the lab's cluster in the API server: RBAC the lab needs, Namespaces (and their
/// default ServiceAccounts), Nodes with their status, Pods (not yet running) and their Services.
pub fn register(state: &LabState, cp: &ControlPlaneState) -> Result<(), ControlPlaneError> {
    let kubectl = cp.kubectl()?;
    let mut objects = bootstrap_objects();
    for ns in &state.spec.namespaces {
        objects.push(namespace_object(state, &ns.name, &ns.labels));
        objects.push(default_service_account(&ns.name));
    }
    let mut system_namespaces: Vec<&str> = state
        .system_pods
        .iter()
        .map(|p| p.namespace.as_str())
        .collect();
    system_namespaces.dedup();
    // kube-system exists from the start; its default ServiceAccount may not yet.
    objects.extend(system_namespaces.into_iter().map(default_service_account));
    for node in &state.nodes {
        let mut object = node_manifest(state, node);
        if let Some(o) = object.as_object_mut() {
            o.remove("status");
        }
        if let Some(meta) = object["metadata"].as_object_mut() {
            meta.remove("uid");
        }
        objects.push(object);
    }
    for pod in state.pods.iter().chain(&state.system_pods) {
        objects.push(pod_object(state, pod));
    }
    for pod in &state.pods {
        objects.extend(service_object(pod));
    }
    if cp.spec.dns {
        objects.push(dns_service_object(cp));
    }
    kubectl.apply(&objects)?;
    let calls: Vec<(Vec<String>, Option<String>)> = state
        .nodes
        .iter()
        .map(|node| {
            (
                status_patch_args("node", None, &node.name),
                Some(node_status(node).to_string()),
            )
        })
        .collect();
    run_all(&kubectl, &calls)?;
    Ok(())
}

fn status_patch_args(kind: &str, namespace: Option<&str>, name: &str) -> Vec<String> {
    let mut args = vec![
        "patch".to_owned(),
        kind.to_owned(),
        name.to_owned(),
        "--subresource=status".to_owned(),
        "--type=merge".to_owned(),
        "--patch-file=/dev/stdin".to_owned(),
    ];
    if let Some(ns) = namespace {
        args.push(format!("--namespace={ns}"));
    }
    args
}

/// Writes the running status of pods (as their kubelet would once they run).
pub fn report_running(
    state: &LabState,
    cp: &ControlPlaneState,
    pods: &[&PodState],
) -> Result<(), ControlPlaneError> {
    let kubectl = cp.kubectl()?;
    let calls: Vec<(Vec<String>, Option<String>)> = pods
        .iter()
        .map(|pod| {
            (
                status_patch_args("pod", Some(&pod.namespace), &pod.name),
                Some(pod_running_status(state, pod).to_string()),
            )
        })
        .collect();
    run_all(&kubectl, &calls)?;
    Ok(())
}

/// Creates a pod's object and Service (before its network exists, as the scheduler and the
/// user would).
pub fn create_pod(
    state: &LabState,
    cp: &ControlPlaneState,
    pod: &PodState,
) -> Result<(), ControlPlaneError> {
    let kubectl = cp.kubectl()?;
    let mut objects = vec![pod_object(state, pod)];
    objects.extend(service_object(pod));
    kubectl.apply(&objects)?;
    Ok(())
}

/// Asks the API server to delete a pod gracefully (it becomes Terminating), as a user would.
pub fn begin_delete_pod(cp: &ControlPlaneState, pod: &PodState) -> Result<(), ControlPlaneError> {
    let kubectl = cp.kubectl()?;
    kubectl.run(
        &[
            "delete",
            "pod",
            &pod.name,
            &format!("--namespace={}", pod.namespace),
            "--wait=false",
            "--ignore-not-found",
        ],
        None,
    )?;
    Ok(())
}

/// The kubelet's last word on a deleted pod (grace period 0 once it is torn down), and the
/// pod's Service.
pub fn finish_delete_pod(cp: &ControlPlaneState, pod: &PodState) -> Result<(), ControlPlaneError> {
    let kubectl = cp.kubectl()?;
    kubectl.run(
        &[
            "delete",
            "pod",
            &pod.name,
            &format!("--namespace={}", pod.namespace),
            "--grace-period=0",
            "--force",
            "--ignore-not-found",
        ],
        None,
    )?;
    kubectl.run(
        &[
            "delete",
            "service",
            &service_name(pod),
            &format!("--namespace={}", pod.namespace),
            "--ignore-not-found",
        ],
        None,
    )?;
    Ok(())
}

/// Replaces the labels of an object (`kubectl label --overwrite`, removing labels not in the new
/// set), as users change labels.
pub fn set_labels(
    cp: &ControlPlaneState,
    kind: &str,
    namespace: Option<&str>,
    name: &str,
    old: &BTreeMap<String, String>,
    new: &BTreeMap<String, String>,
) -> Result<(), ControlPlaneError> {
    let kubectl = cp.kubectl()?;
    let mut args = vec![
        "label".to_owned(),
        kind.to_owned(),
        name.to_owned(),
        "--overwrite".into(),
    ];
    if let Some(ns) = namespace {
        args.push(format!("--namespace={ns}"));
    }
    let before = args.len();
    for (k, v) in new {
        if old.get(k) != Some(v) {
            args.push(format!("{k}={v}"));
        }
    }
    for k in old.keys().filter(|k| !new.contains_key(*k)) {
        if k != NAMESPACE_NAME_LABEL {
            args.push(format!("{k}-"));
        }
    }
    if args.len() == before {
        return Ok(());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    kubectl.run(&refs, None)?;
    Ok(())
}

/// Reads each model pod's Service ClusterIPs into the state.
pub fn read_service_ips(
    state: &mut LabState,
    cp: &ControlPlaneState,
) -> Result<(), ControlPlaneError> {
    let kubectl = cp.kubectl()?;
    let list = kubectl.json(&["get", "services", "--all-namespaces", "-o", "json"])?;
    let mut ips: BTreeMap<(String, String), Vec<IpAddr>> = BTreeMap::new();
    for item in list["items"].as_array().into_iter().flatten() {
        let ns = item["metadata"]["namespace"].as_str().unwrap_or_default();
        let name = item["metadata"]["name"].as_str().unwrap_or_default();
        let cluster_ips = item["spec"]["clusterIPs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str()?.parse().ok())
            .collect();
        ips.insert((ns.to_owned(), name.to_owned()), cluster_ips);
    }
    for pod in &mut state.pods {
        pod.service_ips = ips
            .get(&(pod.namespace.clone(), service_name(pod)))
            .cloned()
            .unwrap_or_default();
    }
    Ok(())
}

/// The ClusterIPs of one pod's Service.
pub fn service_ips(
    cp: &ControlPlaneState,
    pod: &PodState,
) -> Result<Vec<IpAddr>, ControlPlaneError> {
    if service_object(pod).is_none() {
        return Ok(Vec::new());
    }
    let kubectl = cp.kubectl()?;
    let svc = kubectl.json(&[
        "get",
        "service",
        &service_name(pod),
        &format!("--namespace={}", pod.namespace),
        "-o",
        "json",
    ])?;
    Ok(svc["spec"]["clusterIPs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str()?.parse().ok())
        .collect())
}

/// Waits until every model pod's Service has its pod as a ready endpoint in an EndpointSlice
/// of each family (the controller has caught up).
pub fn wait_endpoints(state: &LabState, cp: &ControlPlaneState) -> Result<(), ControlPlaneError> {
    let kubectl = cp.kubectl()?;
    let start = Instant::now();
    let mut missing: Vec<String>;
    loop {
        let list = kubectl.json(&["get", "endpointslices", "--all-namespaces", "-o", "json"])?;
        let mut ready: std::collections::BTreeSet<(String, String, IpAddr)> = Default::default();
        for slice in list["items"].as_array().into_iter().flatten() {
            let ns = slice["metadata"]["namespace"].as_str().unwrap_or_default();
            let svc = slice["metadata"]["labels"]["kubernetes.io/service-name"]
                .as_str()
                .unwrap_or_default();
            for ep in slice["endpoints"].as_array().into_iter().flatten() {
                if ep["conditions"]["ready"].as_bool() != Some(true) {
                    continue;
                }
                for a in ep["addresses"].as_array().into_iter().flatten() {
                    if let Some(ip) = a.as_str().and_then(|s| s.parse().ok()) {
                        ready.insert((ns.to_owned(), svc.to_owned(), ip));
                    }
                }
            }
        }
        missing = state
            .pods
            .iter()
            .filter(|p| service_object(p).is_some() && selects_itself(p))
            .flat_map(|p| {
                [IpAddr::from(p.ip_v4), IpAddr::from(p.ip_v6)]
                    .into_iter()
                    .filter(|ip| !ready.contains(&(p.namespace.clone(), service_name(p), *ip)))
                    .map(|ip| format!("{} ({ip})", service_name(p)))
                    .collect::<Vec<_>>()
            })
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if start.elapsed() > SERVICES_READY_TIMEOUT {
            return Err(ControlPlaneError::NotReady {
                what: "EndpointSlices".into(),
                waited: SERVICES_READY_TIMEOUT,
                last: format!("no ready endpoint for {}", missing.join(", ")),
            });
        }
        if let Some(pid) = cp.controller_manager_pid {
            check_alive(
                pid,
                "kube-controller-manager",
                &cp.log("kube-controller-manager"),
            )?;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Whether a pod's Service still selects it (it selects its labels at creation).
fn selects_itself(pod: &PodState) -> bool {
    let Some(svc) = service_object(pod) else {
        return false;
    };
    svc["spec"]["selector"].as_object().is_some_and(|sel| {
        sel.iter()
            .all(|(k, v)| pod.labels.get(k).map(String::as_str) == v.as_str())
    })
}

/// The cluster CIDRs kube-proxy calls "local": the smallest prefix per family that covers
/// every node's pod CIDR.
pub fn cluster_cidrs(state: &LabState) -> (Ipv4Net, Ipv6Net) {
    let v4 = state
        .nodes
        .iter()
        .map(|n| n.pod_cidr_v4)
        .reduce(cover4)
        .expect("validated: at least one node");
    let v6 = state
        .nodes
        .iter()
        .map(|n| n.pod_cidr_v6)
        .reduce(cover6)
        .expect("validated: at least one node");
    (v4, v6)
}

fn cover4(a: Ipv4Net, b: Ipv4Net) -> Ipv4Net {
    let mut len = a.prefix_len().min(b.prefix_len());
    loop {
        let net = Ipv4Net::new(a.network(), len).expect("len <= 32").trunc();
        if net.contains(&b.network()) {
            return net;
        }
        len -= 1;
    }
}

fn cover6(a: Ipv6Net, b: Ipv6Net) -> Ipv6Net {
    let mut len = a.prefix_len().min(b.prefix_len());
    loop {
        let net = Ipv6Net::new(a.network(), len).expect("len <= 128").trunc();
        if net.contains(&b.network()) {
            return net;
        }
        len -= 1;
    }
}

/// Starts kube-proxy in every node's netns (unless the mode is `none`).
pub fn start_proxies(
    state: &LabState,
    cp: &mut ControlPlaneState,
) -> Result<(), ControlPlaneError> {
    if cp.spec.proxy_mode == ProxyMode::None {
        return Ok(());
    }
    let exe = tool("kube-proxy")?;
    let (v4, v6) = cluster_cidrs(state);
    let kubeconfig = cp.pki_dir().join("kube-proxy.kubeconfig");
    for node in &state.nodes {
        let args = vec![
            format!("--kubeconfig={}", kubeconfig.display()),
            format!("--hostname-override={}", node.name),
            format!("--proxy-mode={}", cp.spec.proxy_mode),
            format!("--cluster-cidr={v4},{v6}"),
            // Leave the machine's conntrack table size and timeouts alone.
            "--conntrack-max-per-core=0".into(),
            "--metrics-bind-address=127.0.0.1:10249".into(),
            "--healthz-bind-address=127.0.0.1:10256".into(),
            "--v=1".into(),
        ];
        let pid = spawn_daemon(
            &node.netns_path(),
            &exe,
            &args,
            &cp.log(&format!("kube-proxy-{}", node.name)),
            "kube-proxy",
        )?;
        cp.proxy_pids.insert(node.name.clone(), pid);
    }
    Ok(())
}

/// Waits until, from every node, a TCP connection to the newest model Service's ClusterIP
/// reaches its pod (kube-proxy synced every Service created before it).
pub fn wait_proxies(state: &LabState, cp: &ControlPlaneState) -> Result<(), ControlPlaneError> {
    if cp.spec.proxy_mode == ProxyMode::None {
        return Ok(());
    }
    let Some((pod, port)) = state.pods.iter().rev().find_map(|p| {
        let port = p.ports_of(Protocol::Tcp).first().copied()?;
        (selects_itself(p) && !p.service_ips.is_empty()).then_some((p, port))
    }) else {
        return Ok(());
    };
    let targets: Vec<SocketAddr> = pod
        .service_ips
        .iter()
        .map(|ip| SocketAddr::new(*ip, port))
        .collect();
    for node in &state.nodes {
        let start = Instant::now();
        loop {
            let ok = run_in_netns(&node.netns_path(), || {
                Ok(targets
                    .iter()
                    .all(|t| TcpStream::connect_timeout(t, Duration::from_millis(300)).is_ok()))
            })
            .unwrap_or(false);
            if ok {
                break;
            }
            if let Some(pid) = cp.proxy_pids.get(&node.name) {
                check_alive(
                    *pid,
                    "kube-proxy",
                    &cp.log(&format!("kube-proxy-{}", node.name)),
                )?;
            }
            if start.elapsed() > SERVICES_READY_TIMEOUT {
                return Err(ControlPlaneError::NotReady {
                    what: format!("kube-proxy on {}", node.name),
                    waited: SERVICES_READY_TIMEOUT,
                    last: format!("no TCP connection to {targets:?} ({})", service_name(pod)),
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(())
}

/// The CoreDNS pod: kube-system/coredns on the first node, with `k8s-app: kube-dns`.
pub fn dns_pod_spec(state: &LabState) -> crate::spec::PodSpec {
    crate::spec::PodSpec {
        namespace: "kube-system".into(),
        name: "coredns".into(),
        node: state.nodes[0].name.clone(),
        labels: BTreeMap::from([("k8s-app".to_owned(), "kube-dns".to_owned())]),
        ports: vec![
            PortSpec {
                name: Some("dns".into()),
                port: 53,
                protocol: Protocol::Udp,
            },
            PortSpec {
                name: Some("dns-tcp".into()),
                port: 53,
                protocol: Protocol::Tcp,
            },
            PortSpec {
                name: Some("metrics".into()),
                port: 9153,
                protocol: Protocol::Tcp,
            },
        ],
    }
}

/// Starts CoreDNS inside its pod's netns (which must exist) and waits until it answers.
pub fn start_dns(cp: &mut ControlPlaneState, pod: &PodState) -> Result<(), ControlPlaneError> {
    let corefile = cp.dir.join("Corefile");
    let kubeconfig = cp.pki_dir().join("coredns.kubeconfig");
    let text = format!(
        ".:53 {{\n    errors\n    ready 127.0.0.1:8181\n    kubernetes cluster.local in-addr.arpa ip6.arpa {{\n        \
         kubeconfig {}\n        pods insecure\n        fallthrough in-addr.arpa ip6.arpa\n        ttl 30\n    }}\n    \
         prometheus :9153\n    cache 30\n    loadbalance\n}}\n",
        kubeconfig.display()
    );
    fs::write(&corefile, text).map_err(|source| ControlPlaneError::Io {
        context: format!("write {}", corefile.display()),
        source,
    })?;
    let log = cp.log("coredns");
    let pid = spawn_daemon(
        &pod.netns_path(),
        &tool("coredns")?,
        &[format!("-conf={}", corefile.display())],
        &log,
        "coredns",
    )?;
    cp.dns_pid = Some(pid);
    // Ready once its kubernetes plugin has synced: `ready` answers 200 on 8181.
    let start = Instant::now();
    loop {
        check_alive(pid, "coredns", &log)?;
        let ready = run_in_netns(&pod.netns_path(), || {
            use std::io::{Read as _, Write as _};
            let mut s = TcpStream::connect_timeout(
                &SocketAddr::from((Ipv4Addr::LOCALHOST, 8181)),
                Duration::from_millis(300),
            )?;
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            s.write_all(b"GET /ready HTTP/1.0\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200"))
        })
        .unwrap_or(false);
        if ready {
            return Ok(());
        }
        if start.elapsed() > SERVICES_READY_TIMEOUT {
            return Err(ControlPlaneError::NotReady {
                what: "CoreDNS".into(),
                waited: SERVICES_READY_TIMEOUT,
                last: log_tail(&log, 10),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `/etc/netns/<pod netns>/resolv.conf`, which `ip netns exec` binds over `/etc/resolv.conf`:
/// the pod resolves through kube-dns with the search path a kubelet writes.
pub fn write_resolv_conf(cp: &ControlPlaneState, pod: &PodState) -> Result<(), ControlPlaneError> {
    if cp.dns_service_ips.is_empty() {
        return Ok(());
    }
    let dir = Path::new("/etc/netns").join(&pod.netns);
    let io = |source| ControlPlaneError::Io {
        context: format!("write {}/resolv.conf", dir.display()),
        source,
    };
    fs::create_dir_all(&dir).map_err(io)?;
    let ns = &pod.namespace;
    let text = format!(
        "search {ns}.svc.cluster.local svc.cluster.local cluster.local\nnameserver {}\noptions ndots:5\n",
        cp.dns_service_ips[0]
    );
    fs::write(dir.join("resolv.conf"), text).map_err(io)
}

/// Removes `/etc/netns/<netns>` of a lab's namespaces (see [`write_resolv_conf`]).
pub fn remove_netns_etc(prefix: &str) {
    let Ok(dir) = fs::read_dir("/etc/netns") else {
        return;
    };
    for e in dir.flatten() {
        if e.file_name().to_string_lossy().starts_with(prefix) {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// Applies `deploy/` (`kubectl apply -k`), as a user installs netpol, and mints a token of the
/// agents' ServiceAccount into a kubeconfig for them.
pub fn install_netpol(
    cp: &ControlPlaneState,
    deploy_dir: &Path,
) -> Result<PathBuf, ControlPlaneError> {
    let kubectl = cp.kubectl()?;
    kubectl.run(&["apply", "-k", &deploy_dir.to_string_lossy()], None)?;
    agent_kubeconfig(cp)
}

/// A kubeconfig with a fresh token of the agents' ServiceAccount (`kubectl create token`).
pub fn agent_kubeconfig(cp: &ControlPlaneState) -> Result<PathBuf, ControlPlaneError> {
    let (ns, sa) = AGENT_SERVICE_ACCOUNT;
    token_kubeconfig(cp, ns, sa, "24h")
}

/// A fresh token of a ServiceAccount (`kubectl create token --duration`).
pub fn service_account_token(
    cp: &ControlPlaneState,
    namespace: &str,
    name: &str,
    duration: &str,
) -> Result<String, ControlPlaneError> {
    let token = cp.kubectl()?.run(
        &[
            "create",
            "token",
            name,
            &format!("--namespace={namespace}"),
            &format!("--duration={duration}"),
        ],
        None,
    )?;
    Ok(token.trim().to_owned())
}

/// A kubeconfig (`<pki>/sa-<namespace>-<name>.kubeconfig`) that authenticates with a fresh
/// token of a ServiceAccount.
pub fn token_kubeconfig(
    cp: &ControlPlaneState,
    namespace: &str,
    name: &str,
    duration: &str,
) -> Result<PathBuf, ControlPlaneError> {
    let token = service_account_token(cp, namespace, name, duration)?;
    let path = cp
        .pki_dir()
        .join(format!("sa-{namespace}-{name}.kubeconfig"));
    pki::write_token_kubeconfig(
        &path,
        &cp.server_url,
        &cp.pki_dir().join("ca.crt"),
        &format!("system:serviceaccount:{namespace}:{name}"),
        namespace,
        &token,
    )?;
    Ok(path)
}

/// RFC 3339 UTC time of now, second precision (status timestamps, as a kubelet writes them).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_cidr_covers_every_node() {
        assert_eq!(
            cover4(
                "10.244.1.0/24".parse().unwrap(),
                "10.244.2.0/24".parse().unwrap()
            ),
            "10.244.0.0/22".parse::<Ipv4Net>().unwrap()
        );
        assert_eq!(
            cover6(
                "fd00:244:1::/64".parse().unwrap(),
                "fd00:244:2::/64".parse().unwrap()
            ),
            "fd00:244::/46".parse::<Ipv6Net>().unwrap()
        );
    }

    #[test]
    fn rfc3339_has_the_right_shape() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'), "{t}");
    }

    #[test]
    fn service_selects_pod_label_like_upstream() {
        let pod = PodState {
            namespace: "x".into(),
            name: "a".into(),
            node: "n".into(),
            netns: "nplab_t_pod_x_a".into(),
            uid: "u".into(),
            ip_v4: "10.244.1.2".parse().unwrap(),
            ip_v6: "fd00:244:1::2".parse().unwrap(),
            host_veth: "calia".into(),
            labels: BTreeMap::from([("pod".into(), "a".into()), ("app".into(), "w".into())]),
            ports: vec![
                PortSpec {
                    name: Some("serve-80-tcp".into()),
                    port: 80,
                    protocol: Protocol::Tcp,
                },
                PortSpec {
                    name: Some("serve-80-udp".into()),
                    port: 80,
                    protocol: Protocol::Udp,
                },
            ],
            server_pid: None,
            service_ips: Vec::new(),
            cni: None,
        };
        let svc = service_object(&pod).unwrap();
        assert_eq!(svc["metadata"]["name"], "s-x-a");
        assert_eq!(svc["spec"]["selector"], json!({ "pod": "a" }));
        assert_eq!(svc["spec"]["ports"][1]["name"], "service-port-udp-80");
        assert!(selects_itself(&pod));
    }
}
