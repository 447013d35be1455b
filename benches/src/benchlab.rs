//! The lab the end-to-end benchmarks run in.
//!
//! Each enforcement mode gets its own client pod, server pod and pair of
//! nodes, so that the modes never share a node's network stack and can be
//! interleaved request by request without switching anything:
//!
//! ```text
//! mode          client pod (bridged node)                server pod (routed node)
//! none          bench/cli-none         on none-cli         bench/srv-none         on none-srv
//! floor         bench/cli-floor        on floor-cli        bench/srv-floor        on floor-srv
//! netpol        bench/cli-netpol       on netpol-cli       bench/srv-netpol       on netpol-srv
//! netpol-nolog  bench/cli-netpol-nolog on netpol-nolog-cli bench/srv-netpol-nolog on netpol-nolog-srv
//! iptables      bench/cli-iptables     on iptables-cli     bench/srv-iptables     on iptables-srv
//! kube-network-policies  bench/cli-kube-network-policies on kube-network-policies-cli, ...-srv
//! ```
//!
//! Traffic crosses nodes the way it does in a cluster: from the client's
//! bridged node (bridge-CNI/flannel host-gw-like) over the fabric to the
//! server's routed node (Calico-like). `floor`'s pods get a program that
//! returns at once (TC_ACT_OK) on the hooks netpol uses, TCX ingress and
//! egress of each pod's host veth and, once the agents run, TCX egress of
//! the node devices where they put `netpol_post_nat`, attached by the
//! benchmark itself (see [`crate::floor`]): the cost of running any program
//! there. `netpol-agent`
//! runs only on the nodes
//! of the netpol modes (`netpol-nolog`: with the flow log off); the iptables
//! rules live only in the iptables server's node (conntrack is never turned
//! on in the other nodes' namespaces).
//!
//! `kube-network-policies` (sig-network's reference enforcer, see
//! `netpol_lab::peer`) reads the API server: with that mode the lab gets a
//! control plane (no kube-proxy, no DNS), the peer runs on that mode's two
//! nodes only ([`BenchLab::start_peer`]) and the same policies are applied
//! through kubectl, as JSON objects. Where the kernel cannot run it (no
//! nftables `queue` expression) the mode is dropped from the lab's modes and
//! recorded in [`BenchLab::unsupported`]; the other modes run as before.
//!
//! Policies: `n` policies select the netpol servers (label `netpol:
//! server`) and the iptables server; policy `i < n-1` allows TCP port
//! `10000 + i` from one address of 10.250.0.0/16 (an `ipBlock` /32, a range
//! no lab node routes), and the last one allows the HTTP port from the
//! client (a pod selector). Every policy has a different peer, so the
//! iptables mode gets `n` ipsets and `n` rules, and a new connection from
//! the client walks all of them before it is accepted. (Peers are addresses
//! rather than pod objects so that the agents' idle work does not grow with
//! the policy count; [`BenchLab::add_fake_pods`] adds pod objects for the
//! benchmarks that want a large cluster.)

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use netpol_lab::{
    AgentProc, Agents, ClusterSpec, Lab, LabState, NodeState, PodState, Protocol, UpOptions,
    agents::agent_paths,
    controlplane::{ControlPlaneSpec, ProxyMode},
    kube::Kubectl,
    peer::PeerError,
    run_in_netns,
    state::write_atomic,
};
use serde::Serialize;
use serde_json::{Value, json};

use crate::{
    floor::{self, FloorLink, FloorProgram, Hook},
    http, iptables,
    kstats::{self, Snapshot},
    nginx::Nginx,
};

/// Namespace of every bench pod.
pub const NAMESPACE: &str = "bench";
/// nginx listens here in every server pod.
pub const HTTP_PORT: u16 = 8080;
/// The lab's own server; no bench policy allows it (a denied port).
pub const SERVE_PORT: u16 = 80;
/// Policy `i` (but the last) allows `POLICY_BASE_PORT + i`.
pub const POLICY_BASE_PORT: u16 = 10000;
/// The policies file in the manifests dir.
pub const POLICIES_FILE: &str = "bench-policies.json";

/// An enforcement mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// No agent, no programs, no rules.
    None,
    /// No agent, no rules: a program that returns TC_ACT_OK at once on the
    /// hooks netpol uses (TCX ingress and egress of both pods' host veths,
    /// and, after [`BenchLab::mirror_post_nat`], the post-NAT devices),
    /// attached by the benchmark. What netpol costs above this is its own
    /// work; the rest is what any TC program costs.
    Floor,
    /// netpol-agent on both nodes with every new flow flow-logged
    /// (`--log-allowed`: a verdict event and a JSON line per new flow, up to
    /// `--events-per-sec`), the policies as manifests.
    Netpol,
    /// The same with `--events-per-sec 0`: the datapath alone, no flow log.
    /// (The agent's default logs drops only, so with nothing denied this is
    /// what a default deployment costs.)
    NetpolNolog,
    /// The iptables chain of [`crate::iptables`] in the server's node.
    Iptables,
    /// sig-network's kube-network-policies on both nodes, the policies
    /// applied through the lab's API server (see the module docs).
    #[serde(rename = "kube-network-policies")]
    #[value(name = "kube-network-policies")]
    Peer,
}

impl Mode {
    pub const ALL: [Mode; 5] = [
        Mode::None,
        Mode::Floor,
        Mode::Netpol,
        Mode::NetpolNolog,
        Mode::Iptables,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::Floor => "floor",
            Mode::Netpol => "netpol",
            Mode::NetpolNolog => "netpol-nolog",
            Mode::Iptables => "iptables",
            Mode::Peer => "kube-network-policies",
        }
    }

    /// Runs netpol-agent.
    pub fn is_netpol(self) -> bool {
        matches!(self, Mode::Netpol | Mode::NetpolNolog)
    }

    /// Its pods carry the `netpol` labels the policies select.
    fn labelled(self) -> bool {
        self.is_netpol() || self == Mode::Peer
    }

    /// Something enforces the policies.
    pub fn enforces(self) -> bool {
        !matches!(self, Mode::None | Mode::Floor)
    }

    /// Has eBPF programs in its nodes (netpol's or the floor's), whose
    /// kernel statistics [`BenchLab::hook_snapshot`] reads.
    pub fn has_programs(self) -> bool {
        self.is_netpol() || self == Mode::Floor
    }

    fn index(self) -> u8 {
        match self {
            Mode::None => 0,
            Mode::Netpol => 1,
            Mode::Iptables => 2,
            Mode::NetpolNolog => 3,
            Mode::Peer => 4,
            Mode::Floor => 5,
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A mode's two pods and their nodes.
#[derive(Debug, Clone)]
pub struct Pair {
    pub mode: Mode,
    pub client: PodState,
    pub server: PodState,
    pub client_node: NodeState,
    pub server_node: NodeState,
    /// Clients dial this ClusterIP (of a Service for nginx's port in the
    /// server pod; kube-proxy translates it) instead of the pod's address.
    pub service_ip: Option<IpAddr>,
}

impl Pair {
    /// nginx in the server pod: its address, or its Service's ClusterIP.
    pub fn http_addr(&self) -> SocketAddr {
        SocketAddr::new(
            self.service_ip.unwrap_or(IpAddr::V4(self.server.ip_v4)),
            HTTP_PORT,
        )
    }
}

/// How clients reach servers, and what else is enforced.
#[derive(Debug, Clone, Copy, Default)]
pub struct LabOptions {
    /// Through each server's Service (a control plane with kube-proxy in
    /// iptables mode), not its pod address.
    pub via_service: bool,
    /// One more policy isolates the netpol (and peer) clients for egress,
    /// allowing TCP to the servers' HTTP port: netpol then judges each new
    /// connection's egress too (after kube-proxy's DNAT when dialled through
    /// a Service). Part of every policy count but 0.
    pub client_egress: bool,
}

/// How long applying `n` policies took.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PolicyTimes {
    pub policies: usize,
    /// Written to the manifests dir until every agent reported the revision synced.
    pub netpol_secs: Option<f64>,
    /// `ipset restore` + `iptables-restore`.
    pub iptables_secs: Option<f64>,
    /// kube-network-policies: `kubectl apply` (and delete) until a probe saw
    /// the policies enforced (the peer reports no sync of its own, so from
    /// the second policy count on this is mostly the apply).
    pub peer_secs: Option<f64>,
}

/// The lab, its agents and nginx servers; everything goes when dropped.
#[derive(Debug)]
pub struct BenchLab {
    pub options: LabOptions,
    /// With [`LabOptions::via_service`]: each mode's server Service's IPv4
    /// ClusterIP (port `HTTP_PORT`).
    service_ips: BTreeMap<Mode, IpAddr>,
    // Dropped in this order: servers, agents, floor links, then the lab
    // (namespaces).
    nginx: Vec<Nginx>,
    agents: Vec<(Mode, Agents)>,
    floor: Vec<FloorLink>,
    peer: Option<netpol_lab::peer::Peer>,
    lab: Lab,
    pub modes: Vec<Mode>,
    pub backend: iptables::Backend,
    fake_ips: Vec<Ipv4Addr>,
    policies: usize,
    /// Modes that could not run here, with the reason (removed from `modes`).
    pub unsupported: Vec<(Mode, String)>,
}

fn node_name(mode: Mode, server: bool) -> String {
    format!("{}-{}", mode.as_str(), if server { "srv" } else { "cli" })
}

fn pod_name(mode: Mode, server: bool) -> String {
    format!("{}-{}", if server { "srv" } else { "cli" }, mode.as_str())
}

/// The cluster file: two nodes and two pods per mode.
fn spec(name: &str, modes: &[Mode]) -> Result<ClusterSpec> {
    let mut y = format!("name: {name}\nnodes:\n");
    for &m in modes {
        let base = 1 + 2 * m.index();
        for (server, k) in [(true, base), (false, base + 1)] {
            y.push_str(&format!(
                "  - {{name: {}, attachment: {}, podCIDR: 10.244.{k}.0/24, podCIDRv6: 'fd00:244:{k}::/64'}}\n",
                node_name(m, server),
                if server { "routed" } else { "bridged" }
            ));
        }
    }
    y.push_str(&format!("namespaces:\n  - {{name: {NAMESPACE}}}\npods:\n"));
    for &m in modes {
        for server in [true, false] {
            // The policies select every netpol mode's server and allow every
            // netpol mode's client through the `netpol` label.
            let extra = if m.labelled() {
                format!(", netpol: {}", if server { "server" } else { "client" })
            } else {
                String::new()
            };
            y.push_str(&format!(
                "  - {{namespace: {NAMESPACE}, name: {p}, node: {}, labels: {{app: {p}{extra}}}, ports: [{{port: {SERVE_PORT}}}]}}\n",
                node_name(m, server),
                p = pod_name(m, server)
            ));
        }
    }
    ClusterSpec::from_yaml(&y).map_err(|e| anyhow!("bench cluster: {e}"))
}

/// The address of fake pod `i`: 10.250.0.0/16, a range no lab node routes.
pub fn fake_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 250, 0, 0)) + 1 + i as u32)
}

/// A Pod object for fake pod `i`, Running on a node that does not exist.
fn fake_pod(i: usize) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": format!("fake-{i}"),
            "namespace": NAMESPACE,
            "uid": format!("00000000-0000-4000-8000-{i:012}"),
            "labels": { "role": "fake", "peer": format!("f{i}") },
        },
        "spec": {
            "nodeName": format!("fake-node-{}", i / 100),
            "containers": [{ "name": "c", "image": "none",
                             "ports": [{ "containerPort": HTTP_PORT, "protocol": "TCP" }] }],
        },
        "status": {
            "phase": "Running",
            "podIP": fake_ip(i).to_string(),
            "podIPs": [{ "ip": fake_ip(i).to_string() }],
        },
    })
}

/// Policy `i` of `n` selecting the netpol servers (see the module docs).
fn policy(i: usize, n: usize) -> Value {
    let last = i + 1 == n;
    let (peer, port) = if last {
        (
            json!({ "podSelector": { "matchLabels": { "netpol": "client" } } }),
            HTTP_PORT,
        )
    } else {
        (
            json!({ "ipBlock": { "cidr": format!("{}/32", fake_ip(i)) } }),
            POLICY_BASE_PORT + i as u16,
        )
    };
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": { "name": format!("bench-{i:05}"), "namespace": NAMESPACE },
        "spec": {
            "podSelector": { "matchLabels": { "netpol": "server" } },
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [peer],
                "ports": [{ "protocol": "TCP", "port": port }],
            }],
        },
    })
}

impl BenchLab {
    /// Brings up lab `name` (removing leftovers of an earlier run of the
    /// same name first) with the pairs of `modes`.
    pub fn up(
        name: &str,
        modes: &[Mode],
        lab_bin: &Path,
        backend: iptables::Backend,
    ) -> Result<BenchLab> {
        Self::up_with(name, modes, lab_bin, backend, LabOptions::default())
    }

    /// [`BenchLab::up`] with [`LabOptions`].
    pub fn up_with(
        name: &str,
        modes: &[Mode],
        lab_bin: &Path,
        backend: iptables::Backend,
        options: LabOptions,
    ) -> Result<BenchLab> {
        let spec = spec(name, modes)?;
        let _ = netpol_lab::down(name);
        netpol_lab::agents::remove_agent_pins(name);
        let lab = Lab::up(
            &spec,
            &UpOptions {
                server_exe: Some(lab_bin.to_path_buf()),
                control_plane: (modes.contains(&Mode::Peer) || options.via_service).then(|| {
                    ControlPlaneSpec {
                        proxy_mode: if options.via_service {
                            ProxyMode::Iptables
                        } else {
                            ProxyMode::None
                        },
                        dns: false,
                        ..ControlPlaneSpec::default()
                    }
                }),
                ..UpOptions::default()
            },
        )
        .map_err(|e| anyhow!("lab up: {e}"))?;
        let mut lab = BenchLab {
            options,
            service_ips: BTreeMap::new(),
            nginx: Vec::new(),
            agents: Vec::new(),
            floor: Vec::new(),
            peer: None,
            lab,
            modes: modes.to_vec(),
            backend,
            fake_ips: Vec::new(),
            policies: 0,
            unsupported: Vec::new(),
        };
        if options.via_service {
            for &m in modes {
                let server = pod_name(m, true);
                let svc = netpol_lab::services::create_service(
                    &lab.lab,
                    NAMESPACE,
                    &format!("http-{server}"),
                    &BTreeMap::from([("app".to_string(), server.clone())]),
                    &[(HTTP_PORT, Protocol::Tcp)],
                    netpol_lab::services::ServiceType::ClusterIp,
                )
                .map_err(|e| anyhow!("the Service of {server}: {e}"))?;
                let ip = svc
                    .cluster_ip(netpol_lab::Family::V4)
                    .ok_or_else(|| anyhow!("the Service of {server} has no IPv4 ClusterIP"))?;
                lab.service_ips.insert(m, ip);
            }
        }
        if modes.contains(&Mode::Floor) {
            lab.attach_floor()?;
        }
        if modes.contains(&Mode::Iptables) {
            if !iptables::available(backend) {
                bail!("iptables ({}) or ipset is not installed", backend.as_str());
            }
            iptables::clear(&lab.pair(Mode::Iptables).server_node.netns_path(), backend)?;
        }
        Ok(lab)
    }

    /// The `n` bench policies, and the clients' egress policy with
    /// [`LabOptions::client_egress`].
    fn policy_objects(&self, n: usize) -> Vec<Value> {
        let mut out: Vec<Value> = (0..n).map(|i| policy(i, n)).collect();
        if self.options.client_egress && n > 0 {
            out.push(json!({
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": { "name": "bench-client-egress", "namespace": NAMESPACE },
                "spec": {
                    "podSelector": { "matchLabels": { "netpol": "client" } },
                    "policyTypes": ["Egress"],
                    "egress": [{
                        "to": [{ "podSelector": { "matchLabels": { "netpol": "server" } } }],
                        "ports": [{ "protocol": "TCP", "port": HTTP_PORT }],
                    }],
                },
            }));
        }
        out
    }

    /// Loads the floor programs and attaches them to the TCX ingress and
    /// egress hooks of the floor pods' host veths, in their nodes' netns.
    fn attach_floor(&mut self) -> Result<()> {
        let pair = self.pair(Mode::Floor);
        let progs = Hook::ALL.map(|h| {
            FloorProgram::load(h).with_context(|| format!("loading floor_{}", h.as_str()))
        });
        let progs = progs.into_iter().collect::<Result<Vec<_>>>()?;
        for (node, pod) in [
            (&pair.server_node, &pair.server),
            (&pair.client_node, &pair.client),
        ] {
            let links = run_in_netns(&node.netns_path(), || {
                let ifindex = floor::ifindex(&pod.host_veth)?;
                progs
                    .iter()
                    .map(|p| p.attach(ifindex))
                    .collect::<std::io::Result<Vec<_>>>()
            })
            .with_context(|| {
                format!(
                    "attaching the floor programs (TCX) to {} in {}",
                    pod.host_veth, node.name
                )
            })?;
            self.floor.extend(links);
        }
        Ok(())
    }

    /// The kernel's counters of the TCX programs in `mode`'s two nodes:
    /// the pods' host veths and, for netpol (and the floor mirroring it),
    /// the node devices with `post_nat` (see [`crate::kstats`]; statistics
    /// must be on).
    pub fn hook_snapshot(&self, mode: Mode) -> Result<Snapshot> {
        let pair = self.pair(mode);
        let mut programs = Vec::new();
        for node in [&pair.server_node, &pair.client_node] {
            programs.extend(kstats::tcx_programs(&node.netns_path())?);
        }
        Ok(Snapshot::new(programs))
    }

    /// Puts the floor's `post_nat` program on the devices of the floor's
    /// nodes where the agents of `netpol_mode` put `netpol_post_nat` (same
    /// device names; server node to server node, client to client), so
    /// that the floor runs on every hook netpol runs on. Returns
    /// `node/device` for each, and the devices it found no twin for.
    pub fn mirror_post_nat(&mut self, netpol_mode: Mode) -> Result<(Vec<String>, Vec<String>)> {
        if !self.modes.contains(&Mode::Floor) {
            return Ok((Vec::new(), Vec::new()));
        }
        let netpol = self.pair(netpol_mode);
        let floor = self.pair(Mode::Floor);
        let prog = FloorProgram::load(Hook::PostNat).context("loading floor_post_nat")?;
        let (mut done, mut missing) = (Vec::new(), Vec::new());
        for (theirs, ours) in [
            (&netpol.server_node, &floor.server_node),
            (&netpol.client_node, &floor.client_node),
        ] {
            let devices: Vec<String> = kstats::tcx_programs(&theirs.netns_path())?
                .into_iter()
                .filter(|p| p.hook == Hook::PostNat && p.egress)
                .map(|p| p.ifname)
                .collect();
            for dev in devices {
                match run_in_netns(&ours.netns_path(), || prog.attach(floor::ifindex(&dev)?)) {
                    Ok(link) => {
                        self.floor.push(link);
                        done.push(format!("{}/{dev}", ours.name));
                    }
                    Err(e) => missing.push(format!("{}/{dev} ({e})", ours.name)),
                }
            }
        }
        Ok((done, missing))
    }

    pub fn state(&self) -> &LabState {
        &self.lab
    }

    pub fn pair(&self, mode: Mode) -> Pair {
        let pod = |server| {
            self.lab
                .pod(NAMESPACE, &pod_name(mode, server))
                .unwrap_or_else(|| panic!("no {mode} pair in this lab"))
                .clone()
        };
        let (client, server) = (pod(false), pod(true));
        Pair {
            mode,
            service_ip: self.service_ips.get(&mode).copied(),
            client_node: self.lab.node_of(&client).clone(),
            server_node: self.lab.node_of(&server).clone(),
            client,
            server,
        }
    }

    /// Writes `n` fake Pod objects (`fake-pod-<i>.json`) into the manifests
    /// dir: pods on nodes that do not exist, with addresses from
    /// 10.250.0.0/16, labelled `role: fake` and `peer: f<i>`.
    pub fn add_fake_pods(&mut self, n: usize) -> Result<()> {
        for i in self.fake_ips.len()..n {
            // Hidden name first, then a rename (what the agents' directory
            // watch expects); no fsync: the manifests dir is on tmpfs.
            let name = format!("fake-pod-{i:05}.json");
            let tmp = self.lab.manifests_dir.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, fake_pod(i).to_string())
                .with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, self.lab.manifests_dir.join(&name))?;
            self.fake_ips.push(fake_ip(i));
        }
        Ok(())
    }

    pub fn fake_pods(&self) -> usize {
        self.fake_ips.len()
    }

    /// Starts `netpol-agent` on the nodes of the netpol modes (only there;
    /// `netpol` adds `--log-allowed`, `netpol-nolog` `--events-per-sec 0`)
    /// and waits until all have
    /// synced. Returns the seconds that took.
    pub fn start_agents(
        &mut self,
        agent_bin: &Path,
        extra_args: &[String],
        timeout: Duration,
    ) -> Result<f64> {
        let started = Instant::now();
        for mode in self.modes.clone().into_iter().filter(|m| m.is_netpol()) {
            let pair = self.pair(mode);
            let mut args = extra_args.to_vec();
            match mode {
                Mode::Netpol => args.push("--log-allowed".to_string()),
                Mode::NetpolNolog => {
                    args.extend(["--events-per-sec".to_string(), "0".to_string()]);
                }
                _ => {}
            }
            let mut agents = Vec::new();
            for node in [&pair.server_node, &pair.client_node] {
                let (bpffs, _) = agent_paths(&self.lab, node);
                let _ = std::process::Command::new(agent_bin)
                    .arg("cleanup")
                    .arg("--bpffs-root")
                    .arg(&bpffs)
                    .stdout(std::process::Stdio::null())
                    .status();
                agents.push(
                    AgentProc::start(&self.lab, node, agent_bin, &args)
                        .with_context(|| format!("starting {}", agent_bin.display()))?,
                );
            }
            self.agents.push((mode, Agents { agents }));
        }
        for (_, agents) in &mut self.agents {
            agents.wait_synced(&[], timeout).map_err(|e| anyhow!(e))?;
        }
        Ok(started.elapsed().as_secs_f64())
    }

    /// The agents of a netpol mode.
    pub fn agents(&mut self, mode: Mode) -> Option<&mut Agents> {
        self.agents
            .iter_mut()
            .find(|(m, _)| *m == mode)
            .map(|(_, a)| a)
    }

    /// Starts kube-network-policies on the nodes of its pair (only there) if
    /// the lab has that mode. Where this kernel cannot run it, drops the mode
    /// from [`BenchLab::modes`], records it in [`BenchLab::unsupported`] and
    /// returns the reason; the other modes are unaffected.
    pub fn start_peer(&mut self) -> Result<Option<String>> {
        if !self.modes.contains(&Mode::Peer) {
            return Ok(None);
        }
        let pair = self.pair(Mode::Peer);
        let mut state: LabState = (*self.lab).clone();
        state
            .nodes
            .retain(|n| n.name == pair.server_node.name || n.name == pair.client_node.name);
        match netpol_lab::peer::start_peer(&state) {
            Ok(peer) => {
                self.peer = Some(peer);
                Ok(None)
            }
            Err(PeerError::Unsupported { node, reason, .. }) => {
                let reason = format!("{reason} (node {node})");
                self.modes.retain(|&m| m != Mode::Peer);
                self.unsupported.push((Mode::Peer, reason.clone()));
                Ok(Some(reason))
            }
            Err(e) => Err(anyhow!("starting kube-network-policies: {e}")),
        }
    }

    /// kubectl for the lab's API server (labs with the peer mode).
    pub fn kubectl(&self) -> Result<Kubectl> {
        let cp = self
            .lab
            .control_plane
            .as_ref()
            .ok_or_else(|| anyhow!("this lab has no control plane"))?;
        cp.kubectl().map_err(|e| anyhow!("{e}"))
    }

    /// Whether the peer mode is running (started and supported).
    pub fn peer_running(&self) -> bool {
        self.peer.is_some()
    }

    /// CPU time (user + system) every agent has used so far, in seconds.
    pub fn agents_cpu_secs(&self) -> f64 {
        // SAFETY: sysconf has no memory effects.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        self.agents
            .iter()
            .flat_map(|(_, a)| &a.agents)
            .filter_map(|a| a.child.as_ref())
            .map(|c| {
                let stat =
                    std::fs::read_to_string(format!("/proc/{}/stat", c.id())).unwrap_or_default();
                let fields: Vec<&str> = stat
                    .rsplit_once(')')
                    .map(|(_, r)| r.split_whitespace().collect())
                    .unwrap_or_default();
                // utime and stime are fields 14 and 15 of stat(5); the
                // rest after ')' starts at field 3.
                let t = |k: usize| fields.get(k - 3).and_then(|v| v.parse::<f64>().ok());
                t(14).unwrap_or(0.0) + t(15).unwrap_or(0.0)
            })
            .sum::<f64>()
            / hz
    }

    /// The sum of a datapath counter (`events_sent`, `events_rate_limited`,
    /// ...) over the agents of `mode`, as their status files last said (they
    /// are rewritten about every second).
    pub fn agent_counter(&self, mode: Mode, name: &str) -> u64 {
        self.agents
            .iter()
            .filter(|(m, _)| *m == mode)
            .flat_map(|(_, a)| &a.agents)
            .filter_map(|a| a.status()?["counters"][name].as_u64())
            .sum()
    }

    /// Starts nginx in every server pod, serving a file of each size on
    /// [`HTTP_PORT`].
    pub fn start_nginx(&mut self, sizes: &[usize], workers: usize) -> Result<()> {
        for &m in &self.modes.clone() {
            let pair = self.pair(m);
            let dir = self.lab.state_dir.join("nginx").join(&pair.server.name);
            self.nginx.push(Nginx::start(
                &pair.server.netns_path(),
                &dir,
                sizes,
                HTTP_PORT,
                workers,
            )?);
        }
        Ok(())
    }

    /// Makes `n` policies select each enforcing mode's server (see the
    /// module docs): the policies file for the agents (waiting until they
    /// have synced it), the chain and ipsets for iptables.
    pub fn set_policies(&mut self, n: usize, timeout: Duration) -> Result<PolicyTimes> {
        let mut times = PolicyTimes {
            policies: n,
            ..PolicyTimes::default()
        };
        if !self.agents.is_empty() {
            let started = Instant::now();
            let path = self.lab.manifests_dir.join(POLICIES_FILE);
            let before: Vec<Vec<u64>> = self.agents.iter().map(|(_, a)| a.revisions()).collect();
            let changed = if n == 0 {
                std::fs::remove_file(&path).is_ok()
            } else {
                let list = json!({
                    "apiVersion": "v1",
                    "kind": "List",
                    "items": self.policy_objects(n),
                });
                write_atomic(&path, list.to_string().as_bytes()).map_err(|e| anyhow!("{e}"))?;
                true
            };
            if changed {
                for ((_, agents), before) in self.agents.iter_mut().zip(&before) {
                    agents
                        .wait_synced(before, timeout)
                        .map_err(|e| anyhow!(e))?;
                }
            }
            times.netpol_secs = Some(started.elapsed().as_secs_f64());
        }
        if self.modes.contains(&Mode::Iptables) {
            let pair = self.pair(Mode::Iptables);
            let rules: Vec<iptables::Rule> = (0..n)
                .map(|i| {
                    if i + 1 == n {
                        iptables::Rule {
                            port: HTTP_PORT,
                            peers: vec![pair.client.ip_v4],
                        }
                    } else {
                        iptables::Rule {
                            port: POLICY_BASE_PORT + i as u16,
                            peers: vec![fake_ip(i)],
                        }
                    }
                })
                .collect();
            let applied = iptables::apply(
                &pair.server_node.netns_path(),
                self.backend,
                &pair.server.host_veth,
                &rules,
            )?;
            let in_chain = iptables::chain_len(&pair.server_node.netns_path(), self.backend)?;
            let expected = if n == 0 { 0 } else { n + 2 };
            if in_chain != expected {
                bail!("the iptables chain has {in_chain} rules, expected {expected}");
            }
            times.iptables_secs = Some(applied.secs);
        }
        if self.peer.is_some() {
            let started = Instant::now();
            let kubectl = self.kubectl()?;
            if n < self.policies {
                // kubectl deletes by name one object at a time (about 0.2 s
                // each); deleting all and applying the `n` again is faster.
                kubectl
                    .run(
                        &[
                            "delete",
                            "networkpolicies",
                            "--all",
                            "--wait=false",
                            "-n",
                            NAMESPACE,
                        ],
                        None,
                    )
                    .map_err(|e| anyhow!("{e}"))?;
            }
            let objects: Vec<Value> = self.policy_objects(n);
            // One apply per 500 objects (a smaller request body, progress
            // the API server can take).
            for chunk in objects.chunks(500) {
                kubectl.apply(chunk).map_err(|e| anyhow!("{e}"))?;
            }
            let deadline = Instant::now() + timeout;
            while !self.enforced(Mode::Peer, n)? {
                if Instant::now() > deadline {
                    bail!("kube-network-policies: {n} policies not enforced after {timeout:?}");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            times.peer_secs = Some(started.elapsed().as_secs_f64());
        }
        self.policies = n;
        Ok(times)
    }

    /// Whether `mode` enforces `n` policies as it should: HTTP to nginx
    /// answers, the lab server's port is blocked (open when `n` is 0).
    fn enforced(&self, mode: Mode, n: usize) -> Result<bool> {
        let pair = self.pair(mode);
        let addr = pair.http_addr();
        let http_ok = run_in_netns(&pair.client.netns_path(), || {
            let mut buf = Vec::new();
            Ok(
                match http::get_close(addr, "/", Duration::from_millis(500), &mut buf) {
                    Ok(_) => true,
                    Err(e) => e.to_string().starts_with("HTTP status"),
                },
            )
        })?;
        let open = netpol_lab::connect(
            &self.lab,
            &pair.client,
            IpAddr::V4(pair.server.ip_v4),
            SERVE_PORT,
            Protocol::Tcp,
            Duration::from_millis(300),
        );
        Ok(http_ok && open == (n == 0))
    }

    /// Checks that every mode does what it should with the current policies:
    /// HTTP from the client to nginx works, and the lab server's port (which
    /// no policy allows) is reachable only where nothing enforces.
    pub fn check_enforcement(&self) -> Result<()> {
        for &m in &self.modes {
            let pair = self.pair(m);
            let addr = pair.http_addr();
            let got = run_in_netns(&pair.client.netns_path(), || {
                let mut buf = Vec::new();
                http::get_close(addr, "/", Duration::from_secs(2), &mut buf)
                    .map(|_| ())
                    .or_else(|e| {
                        // nginx answers 403/404 for "/" without an index:
                        // any HTTP answer means the connection was allowed.
                        if e.to_string().starts_with("HTTP status") {
                            Ok(())
                        } else {
                            Err(e)
                        }
                    })
            });
            if let Err(e) = got {
                bail!("{m}: HTTP from {} to {addr} failed: {e}", pair.client.key());
            }
            let expect_open = !m.enforces() || self.policies == 0;
            let open = netpol_lab::connect(
                &self.lab,
                &pair.client,
                IpAddr::V4(pair.server.ip_v4),
                SERVE_PORT,
                Protocol::Tcp,
                Duration::from_millis(400),
            );
            if open != expect_open {
                bail!(
                    "{m} with {} policies: port {SERVE_PORT} of {} is {} from {}, expected {}",
                    self.policies,
                    pair.server.key(),
                    if open { "open" } else { "blocked" },
                    pair.client.key(),
                    if expect_open { "open" } else { "blocked" },
                );
            }
        }
        Ok(())
    }

    /// The manifests dir (the agents' `--source dir:`).
    pub fn manifests_dir(&self) -> PathBuf {
        self.lab.manifests_dir.clone()
    }
}
