//! Where cases run: a lab with an enforcer on every node (the real thing), or only a planned lab
//! whose manifests are written to a scratch directory (`--reference-only`: the case files
//! checked against the reference evaluator, without root).
//!
//! Every change goes the way users make it. In a lab with a control plane, pods and labels go
//! through the lab's functions (which create, label and delete the API objects with kubectl as
//! well as writing the manifests directory), and policies are applied with `kubectl apply -f`
//! and removed with `kubectl delete -f`. The policies file in the manifests directory is written
//! too, in every lab: the `netpol` enforcer (`--source dir:`) reads it, and the reference
//! evaluator reads the cluster from that directory.
//!
//! After each change the runner waits until every agent has synced it:
//!
//! * `--source dir:` agents see one file written atomically per change, so their status's
//!   `source_revision` moves by one (a change spread over several files could be half-seen by a
//!   poll, and the wait would end before the rest was enforced).
//! * `--source kube` agents bump `source_revision` once per watch event that changes their
//!   model, and one change here is several events: adding a pod is the Pod's creation (Pending,
//!   no IPs) and then its status (Running, podIPs); applying or deleting policies is one event
//!   per policy; a label is one event; deleting a pod is one event (the graceful delete that
//!   comes first changes nothing the model keeps). Waiting for one bump only could end between
//!   two of them, so the wait counts them.
//! * kube-network-policies reports nothing: the runner gives it [`PEER_SETTLE`].

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use netpol_agent::compiler::NodeInfo;
use netpol_lab::{
    AddPodOptions, AgentSource, Agents, Attachment, Family, Lab, LabState, PodSpec, PodState,
    controlplane::{ControlPlaneState, ProxyMode},
    manifests, netns_command,
    peer::{Peer, PeerError},
    state::write_atomic,
};

use super::{case::Labels, enforcer::Enforcer};

/// How long the agents may take to enforce one change.
const SYNC_TIMEOUT: Duration = Duration::from_secs(20);
/// How long agents may take to start and sync for the first time.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// After their first sync, `--source kube` agents must see no change for this long before the
/// cases start (`deploy/`'s DaemonSet gets Pods of its own that the agents see arrive).
const QUIET: Duration = Duration::from_secs(2);
/// kube-network-policies says nothing about what it has seen: the time it gets per change.
pub const PEER_SETTLE: Duration = Duration::from_secs(2);
/// How long kube-proxy may take to program a new pod's Service on every node.
const PROXY_TIMEOUT: Duration = Duration::from_secs(30);
/// The file that holds every NetworkPolicy the runner applied (one YAML document each).
const POLICIES_FILE: &str = "conformance-policies.yaml";

/// Policies by (namespace, name).
pub type Policies = BTreeMap<(String, String), serde_yaml::Value>;

pub enum Backend {
    /// A running lab and what enforces in it (dropped, and so stopped, before the lab).
    Lab { running: Running, lab: Lab },
    /// A planned lab: manifests only, in a scratch directory.
    Plan { state: LabState, _dir: ScratchDir },
}

/// What enforces policy in the lab now.
pub enum Running {
    Nothing,
    /// netpol-agent on every node; `kube`: with `--source kube`.
    Agents {
        agents: Agents,
        kube: bool,
    },
    Peer(Peer),
}

/// One change to the cluster, for counting the watch events it makes (see the module docs).
#[derive(Debug, Clone, Copy)]
enum Change {
    AddPod,
    RemovePod,
    Labels,
    /// Policies created, changed or deleted.
    Policies(u64),
}

impl Change {
    /// How many times a `--source kube` agent's revision moves for it.
    fn kube_events(self) -> u64 {
        match self {
            Change::AddPod => 2,
            Change::RemovePod | Change::Labels => 1,
            Change::Policies(n) => n,
        }
    }
}

impl Running {
    fn mark(&self) -> Vec<u64> {
        match self {
            Running::Agents { agents, .. } => agents.revisions(),
            _ => Vec::new(),
        }
    }

    /// Waits until what enforces has taken in `change`, made after `mark`.
    fn settle(&mut self, mark: &[u64], change: Change) -> Result<()> {
        match self {
            Running::Agents { agents, kube } => {
                let events = if *kube { change.kube_events() } else { 1 };
                if events == 0 {
                    return Ok(());
                }
                let after: Vec<u64> = mark.iter().map(|r| r + events - 1).collect();
                agents
                    .wait_synced(&after, SYNC_TIMEOUT)
                    .map_err(|e| anyhow!("waiting for {events} new revision(s) ({change:?}): {e}"))
            }
            Running::Peer(_) => {
                std::thread::sleep(PEER_SETTLE);
                Ok(())
            }
            Running::Nothing => Ok(()),
        }
    }
}

/// A directory removed when dropped.
pub struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How an enforcer start went.
pub enum Started {
    Running,
    /// It cannot enforce here; why.
    Unsupported(String),
}

impl Backend {
    /// A planned lab with its manifests written to a fresh scratch directory.
    pub fn plan(spec: &netpol_lab::ClusterSpec) -> Result<Backend> {
        // One directory per plan: two plans of one process (the tests run
        // them side by side) must not write each other's manifests.
        static PLANS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "netpol-conformance-{}-{}-{}",
            spec.name,
            std::process::id(),
            PLANS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("removing a stale {}", dir.display()))?;
        }
        let state = LabState::plan(spec, Some(dir.clone()));
        manifests::write_manifests(&state).context("writing the planned lab's manifests")?;
        Ok(Backend::Plan {
            state,
            _dir: ScratchDir(dir),
        })
    }

    pub fn state(&self) -> &LabState {
        match self {
            Backend::Lab { lab, .. } => lab,
            Backend::Plan { state, .. } => state,
        }
    }

    pub fn is_live(&self) -> bool {
        matches!(self, Backend::Lab { .. })
    }

    pub fn manifests_dir(&self) -> &Path {
        &self.state().manifests_dir
    }

    fn control_plane(&self) -> Option<&ControlPlaneState> {
        self.state().control_plane.as_ref()
    }

    /// Starts `enforcer` on every node (nothing else may be running).
    pub fn start(
        &mut self,
        enforcer: Enforcer,
        agent_bin: &Path,
        deploy_dir: &Path,
        xdp: &str,
    ) -> Result<Started> {
        let Backend::Lab { running, lab } = self else {
            bail!("no lab to start {enforcer} in");
        };
        debug_assert!(matches!(running, Running::Nothing));
        match enforcer {
            Enforcer::None => Ok(Started::Running),
            Enforcer::Netpol | Enforcer::NetpolKube => {
                let kube = enforcer == Enforcer::NetpolKube;
                let source = if kube {
                    AgentSource::kube(lab, deploy_dir)
                        .map_err(|e| anyhow!("installing deploy/ into the lab's API: {e}"))?
                } else {
                    AgentSource::dir(lab)
                };
                let mut agents = netpol_lab::start_agents_with(
                    lab,
                    agent_bin,
                    &source,
                    &["--xdp".into(), xdp.into()],
                )
                .context("starting the agents")?;
                agents
                    .wait_synced(&[], START_TIMEOUT)
                    .map_err(|e| anyhow!("{e}"))?;
                if kube {
                    wait_quiet(&mut agents)?;
                }
                *running = Running::Agents { agents, kube };
                Ok(Started::Running)
            }
            Enforcer::KubeNetworkPolicies => match netpol_lab::peer::start_peer(lab) {
                Ok(peer) => {
                    *running = Running::Peer(peer);
                    Ok(Started::Running)
                }
                Err(PeerError::Unsupported { node, reason, .. }) => {
                    remove_peer_tables(lab);
                    Ok(Started::Unsupported(format!(
                        "unsupported on this kernel: {reason} (node {node})"
                    )))
                }
                Err(e) => {
                    remove_peer_tables(lab);
                    Err(anyhow!("{e}"))
                }
            },
        }
    }

    /// Stops whatever enforces (agents remove their pins; the peer's nftables table goes).
    pub fn stop(&mut self) {
        if let Backend::Lab { running, lab } = self {
            let was_peer = matches!(running, Running::Peer(_));
            *running = Running::Nothing;
            if was_peer {
                remove_peer_tables(lab);
            }
        }
    }

    /// Leaves the lab and what runs in it up; returns the lab's state.
    pub fn keep(self) -> Option<LabState> {
        match self {
            Backend::Lab { running, lab } => {
                // Dropping `Agents` or `Peer` would stop them; `netpol-lab down` stops them
                // with the lab instead.
                std::mem::forget(running);
                Some(lab.keep())
            }
            Backend::Plan { .. } => None,
        }
    }

    /// Replaces a namespace's labels (the lab keeps `kubernetes.io/metadata.name`).
    pub fn set_namespace_labels(&mut self, namespace: &str, labels: &Labels) -> Result<()> {
        let what = || format!("labelling namespace {namespace}");
        match self {
            Backend::Lab { running, lab } => {
                let mark = running.mark();
                lab.set_namespace_labels(namespace, labels.clone())
                    .with_context(what)?;
                running.settle(&mark, Change::Labels).with_context(what)
            }
            Backend::Plan { state, .. } => {
                state
                    .relabel_namespace(namespace, labels.clone())
                    .with_context(what)?;
                manifests::write_namespace_manifest(state, namespace).with_context(what)?;
                Ok(())
            }
        }
    }

    /// Replaces a pod's labels; `pod` is `namespace/name`.
    pub fn set_pod_labels(&mut self, pod: &str, labels: &Labels) -> Result<()> {
        let what = || format!("labelling pod {pod}");
        let (namespace, name) = split_key(pod)?;
        match self {
            Backend::Lab { running, lab } => {
                let mark = running.mark();
                lab.set_pod_labels(namespace, name, labels.clone())
                    .with_context(what)?;
                running.settle(&mark, Change::Labels).with_context(what)
            }
            Backend::Plan { state, .. } => {
                let updated = state
                    .relabel_pod(namespace, name, labels.clone())
                    .with_context(what)?;
                manifests::write_pod_manifest(state, &updated).with_context(what)?;
                Ok(())
            }
        }
    }

    /// Adds a pod, with the given addresses or the next free ones of its node. With a control
    /// plane, also waits until kube-proxy has programmed the pod's Service on every node.
    pub fn add_pod(&mut self, pod: PodSpec, addresses: Option<(Ipv4Addr, Ipv6Addr)>) -> Result<()> {
        let what = format!("adding pod {}/{}", pod.namespace, pod.name);
        let (ip_v4, ip_v6) = (addresses.map(|a| a.0), addresses.map(|a| a.1));
        match self {
            Backend::Lab { running, lab } => {
                let mark = running.mark();
                let options = AddPodOptions {
                    ip_v4,
                    ip_v6,
                    ..AddPodOptions::default()
                };
                let added = lab.add_pod(pod, &options).context(what.clone())?;
                running
                    .settle(&mark, Change::AddPod)
                    .context(what.clone())?;
                wait_service_programmed(lab, &added).context(what)
            }
            Backend::Plan { state, .. } => {
                let planned = state.plan_pod(pod, ip_v4, ip_v6).context(what.clone())?;
                manifests::write_pod_manifest(state, &planned).context(what)?;
                Ok(())
            }
        }
    }

    /// Removes a pod; returns it as it was (with its addresses).
    pub fn remove_pod(&mut self, pod: &str) -> Result<PodState> {
        let what = || format!("removing pod {pod}");
        let (namespace, name) = split_key(pod)?;
        match self {
            Backend::Lab { running, lab } => {
                let mark = running.mark();
                let removed = lab.remove_pod(namespace, name).with_context(what)?;
                running
                    .settle(&mark, Change::RemovePod)
                    .with_context(what)?;
                Ok(removed)
            }
            Backend::Plan { state, .. } => {
                let removed = state.forget_pod(namespace, name).with_context(what)?;
                let file = state
                    .manifests_dir
                    .join(manifests::pod_manifest_file(namespace, name));
                std::fs::remove_file(&file)
                    .with_context(|| format!("removing {}", file.display()))?;
                Ok(removed)
            }
        }
    }

    /// Makes the cluster hold `desired` instead of `applied`: the policies file (the manifests
    /// directory's copy) and, with a control plane, `kubectl delete -f` of the policies that
    /// go and `kubectl apply -f` of those that are new or changed.
    pub fn apply_policies(&mut self, applied: &Policies, desired: &Policies) -> Result<()> {
        let gone: Vec<&serde_yaml::Value> = applied
            .iter()
            .filter(|(key, _)| !desired.contains_key(*key))
            .map(|(_, m)| m)
            .collect();
        let changed: Vec<&serde_yaml::Value> = desired
            .iter()
            .filter(|(key, m)| applied.get(*key) != Some(*m))
            .map(|(_, m)| m)
            .collect();
        if gone.is_empty() && changed.is_empty() {
            return Ok(());
        }
        let path = self.manifests_dir().join(POLICIES_FILE);
        let write_file = || -> Result<()> {
            match render(desired.values())? {
                Some(text) => write_atomic(&path, text.as_bytes())
                    .with_context(|| format!("writing {}", path.display())),
                None => match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        Err(e).with_context(|| format!("removing {}", path.display()))
                    }
                    _ => Ok(()),
                },
            }
        };
        let kubectl = match self.control_plane() {
            Some(cp) => Some((cp.kubectl()?, self.state().state_dir.join("conformance"))),
            None => None,
        };
        match self {
            Backend::Lab { running, .. } => {
                let mark = running.mark();
                write_file()?;
                // Events the API server sends watchers: one per policy created, changed
                // (`configured`) or deleted, as kubectl reports them.
                let mut events = 0;
                if let Some((kubectl, dir)) = kubectl {
                    std::fs::create_dir_all(&dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                    if let Some(text) = render_json(gone.iter().copied())? {
                        let file = dir.join("delete.yaml");
                        write_atomic(&file, text.as_bytes())?;
                        // A policy the API server refused earlier is not there to delete.
                        let out = kubectl
                            .run(
                                &[
                                    "delete",
                                    "--ignore-not-found",
                                    "-f",
                                    &file.to_string_lossy(),
                                ],
                                None,
                            )
                            .context("kubectl delete")?;
                        events += count_lines(&out, "\" deleted");
                    }
                    if let Some(text) = render_json(changed.iter().copied())? {
                        let file = dir.join("apply.yaml");
                        write_atomic(&file, text.as_bytes())?;
                        let out = kubectl.apply_file(&file).context("kubectl apply")?;
                        events += count_lines(&out, " created") + count_lines(&out, " configured");
                    }
                }
                running
                    .settle(&mark, Change::Policies(events))
                    .context("applying policies")
            }
            Backend::Plan { .. } => write_file(),
        }
    }

    /// Fails if what enforces has stopped (the lab cannot enforce anything any more).
    pub fn check_running(&mut self) -> Result<()> {
        match self {
            Backend::Lab {
                running: Running::Agents { agents, .. },
                ..
            } => {
                for a in &mut agents.agents {
                    if let Some(status) = a.exited() {
                        bail!(
                            "the agent on {} exited ({status}):\n{}",
                            a.node,
                            a.log_tail(10)
                        );
                    }
                }
                Ok(())
            }
            Backend::Lab {
                running: Running::Peer(peer),
                ..
            } => {
                for p in &peer.procs {
                    if !netpol_lab::netns::is_alive(p.pid) {
                        bail!(
                            "kube-network-policies on {} exited; its log ({}):\n{}",
                            p.node,
                            p.log.display(),
                            netpol_lab::controlplane::log_tail(&p.log, 10)
                        );
                    }
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Each node as the compiler sees it: its fabric addresses and, on a bridged node, the
    /// bridge's gateway addresses (what the agent's netlink view reports as node addresses).
    pub fn nodes(&self) -> Vec<NodeInfo> {
        self.state()
            .nodes
            .iter()
            .map(|n| {
                let mut addresses: Vec<IpAddr> = vec![n.ip_v4.into(), n.ip_v6.into()];
                if n.attachment == Attachment::Bridged {
                    addresses.extend([IpAddr::from(n.gateway_v4), n.gateway_v6.into()]);
                }
                NodeInfo {
                    name: n.name.clone(),
                    addresses,
                }
            })
            .collect()
    }
}

fn split_key(pod: &str) -> Result<(&str, &str)> {
    pod.split_once('/')
        .ok_or_else(|| anyhow!("pod {pod:?} is not namespace/name"))
}

/// Manifests as one multi-document YAML text; `None` when there are none.
fn render<'a>(
    manifests: impl IntoIterator<Item = &'a serde_yaml::Value>,
) -> Result<Option<String>> {
    let mut text = String::new();
    for manifest in manifests {
        text.push_str("---\n");
        text.push_str(&serde_yaml::to_string(manifest)?);
    }
    Ok((!text.is_empty()).then_some(text))
}

/// Manifests as documents of JSON, for kubectl: serde_yaml writes strings such as `y` or `no`
/// unquoted, which kubectl's YAML 1.1 parser reads as booleans.
fn render_json<'a>(
    manifests: impl IntoIterator<Item = &'a serde_yaml::Value>,
) -> Result<Option<String>> {
    let mut text = String::new();
    for manifest in manifests {
        text.push_str("---\n");
        text.push_str(&serde_json::to_string_pretty(manifest)?);
        text.push('\n');
    }
    Ok((!text.is_empty()).then_some(text))
}

/// Lines of kubectl's output that tell of `what` happening to an object:
/// `networkpolicy.networking.k8s.io/x created`, `... "x" deleted from y namespace` (kubectl
/// 1.31 and later; `... "x" deleted` before).
fn count_lines(out: &str, what: &str) -> u64 {
    out.lines().filter(|l| l.contains(what)).count() as u64
}

/// Waits until the agents' revisions stay put for [`QUIET`].
fn wait_quiet(agents: &mut Agents) -> Result<()> {
    let start = Instant::now();
    let mut last = agents.revisions();
    let mut since = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = agents.revisions();
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= QUIET {
            // Synced at the last revision too.
            let before: Vec<u64> = last.iter().map(|r| r.saturating_sub(1)).collect();
            return agents
                .wait_synced(&before, SYNC_TIMEOUT)
                .map_err(|e| anyhow!("{e}"));
        }
        if start.elapsed() > START_TIMEOUT {
            bail!("the agents' source revisions kept moving for {START_TIMEOUT:?}: {last:?}");
        }
    }
}

/// Waits until kube-proxy on every node has rules for the pod's Service: each ClusterIP and
/// the pod's address appear in the node's NAT rules (nothing to wait for without a control
/// plane or kube-proxy).
fn wait_service_programmed(lab: &LabState, pod: &PodState) -> Result<()> {
    let Some(cp) = &lab.control_plane else {
        return Ok(());
    };
    if cp.spec.proxy_mode == ProxyMode::None || pod.service_ips.is_empty() {
        return Ok(());
    }
    let start = Instant::now();
    for node in &lab.nodes {
        loop {
            let mut missing = Vec::new();
            for family in [Family::V4, Family::V6] {
                let Some(cluster_ip) = pod.service_ip(family) else {
                    continue;
                };
                let rules = proxy_rules(&node.netns_path(), cp.spec.proxy_mode, family);
                for needed in [cluster_ip, pod.ip(family)] {
                    if !rules.contains(&needed.to_string()) {
                        missing.push(needed);
                    }
                }
            }
            if missing.is_empty() {
                break;
            }
            if start.elapsed() > PROXY_TIMEOUT {
                bail!(
                    "kube-proxy on {} has no rules for {} ({}) after {PROXY_TIMEOUT:?}: {missing:?} \
                     missing",
                    node.name,
                    netpol_lab::controlplane::service_name(pod),
                    pod.key()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

/// kube-proxy's NAT rules of one family in a node's netns, as text.
fn proxy_rules(netns: &Path, mode: ProxyMode, family: Family) -> String {
    let mut command = match (mode, family) {
        (ProxyMode::Nftables, Family::V4) => {
            let mut c = netns_command(netns, "nft");
            c.args(["list", "table", "ip", "kube-proxy"]);
            c
        }
        (ProxyMode::Nftables, Family::V6) => {
            let mut c = netns_command(netns, "nft");
            c.args(["list", "table", "ip6", "kube-proxy"]);
            c
        }
        (_, Family::V4) => {
            let mut c = netns_command(netns, "iptables-save");
            c.args(["-t", "nat"]);
            c
        }
        (_, Family::V6) => {
            let mut c = netns_command(netns, "ip6tables-save");
            c.args(["-t", "nat"]);
            c
        }
    };
    command
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Removes kube-network-policies' nftables table from every node (it stays behind when the
/// peer stops or fails halfway), so that it cannot affect what runs next.
fn remove_peer_tables(lab: &LabState) {
    for node in &lab.nodes {
        let _ = netns_command(&node.netns_path(), "nft")
            .args(["delete", "table", "inet", "kube-network-policies"])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubectl_output_counts_events() {
        let deleted = "networkpolicy.networking.k8s.io \"deny-all\" deleted from x namespace\n\
                       networkpolicy.networking.k8s.io \"allow\" deleted\n";
        assert_eq!(count_lines(deleted, "\" deleted"), 2);
        let applied = "networkpolicy.networking.k8s.io/a created\n\
                       networkpolicy.networking.k8s.io/b configured\n\
                       networkpolicy.networking.k8s.io/c unchanged\n";
        assert_eq!(
            count_lines(applied, " created") + count_lines(applied, " configured"),
            2
        );
    }

    #[test]
    fn kubectl_gets_json_documents() {
        let policy: serde_yaml::Value = serde_yaml::from_str(
            "metadata: {name: p, namespace: y}\nspec: {podSelector: {matchLabels: {ns: no}}}",
        )
        .expect("parses");
        let text = render_json([&policy])
            .expect("renders")
            .expect("one document");
        // YAML 1.1 (kubectl) would read a bare `y` or `no` as a boolean.
        assert!(text.contains("\"namespace\": \"y\""), "{text}");
        assert!(text.contains("\"ns\": \"no\""), "{text}");
    }
}
