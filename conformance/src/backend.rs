//! Where cases run: a lab with an agent on every node (the real thing), or only a planned lab
//! whose manifests are written to a scratch directory (`--reference-only`: the case files
//! checked against the reference evaluator, without root).
//!
//! Every change is one file written atomically, and with agents the runner waits after each
//! one until every agent has synced a newer revision of the manifests directory. A change of
//! several files at once could be seen half-done by an agent's poll, and the wait would then
//! end before the rest was enforced.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow};
use netpol_agent::compiler::NodeInfo;
use netpol_lab::{
    AddPodOptions, Agents, Attachment, Lab, LabState, PodSpec, PodState, manifests,
    state::write_atomic,
};

use super::case::Labels;

/// How long the agents may take to enforce one change.
const SYNC_TIMEOUT: Duration = Duration::from_secs(20);
/// The file that holds every NetworkPolicy the runner applied (one YAML document each).
const POLICIES_FILE: &str = "conformance-policies.yaml";

pub enum Backend {
    /// A running lab with agents (the agents are dropped, and so stopped, before the lab).
    Lab { agents: Agents, lab: Lab },
    /// A planned lab: manifests only, in a scratch directory.
    Plan { state: LabState, _dir: ScratchDir },
}

/// A directory removed when dropped.
pub struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Backend {
    /// A planned lab with its manifests written to a fresh scratch directory.
    pub fn plan(spec: &netpol_lab::ClusterSpec) -> Result<Backend> {
        let dir = std::env::temp_dir().join(format!(
            "netpol-conformance-{}-{}",
            spec.name,
            std::process::id()
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

    /// Replaces a namespace's labels (the lab keeps `kubernetes.io/metadata.name`).
    pub fn set_namespace_labels(&mut self, namespace: &str, labels: &Labels) -> Result<()> {
        let what = || format!("labelling namespace {namespace}");
        match self {
            Backend::Lab { agents, lab } => {
                let before = agents.revisions();
                lab.set_namespace_labels(namespace, labels.clone())
                    .with_context(what)?;
                wait(agents, &before).with_context(what)
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
        let (namespace, name) = pod
            .split_once('/')
            .ok_or_else(|| anyhow!("pod {pod:?} is not namespace/name"))?;
        match self {
            Backend::Lab { agents, lab } => {
                let before = agents.revisions();
                lab.set_pod_labels(namespace, name, labels.clone())
                    .with_context(what)?;
                wait(agents, &before).with_context(what)
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

    /// Adds a pod, with the given addresses or the next free ones of its node.
    pub fn add_pod(&mut self, pod: PodSpec, addresses: Option<(Ipv4Addr, Ipv6Addr)>) -> Result<()> {
        let what = format!("adding pod {}/{}", pod.namespace, pod.name);
        let (ip_v4, ip_v6) = (addresses.map(|a| a.0), addresses.map(|a| a.1));
        match self {
            Backend::Lab { agents, lab } => {
                let before = agents.revisions();
                let options = AddPodOptions {
                    ip_v4,
                    ip_v6,
                    ..AddPodOptions::default()
                };
                lab.add_pod(pod, &options).context(what.clone())?;
                wait(agents, &before).context(what)
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
        let (namespace, name) = pod
            .split_once('/')
            .ok_or_else(|| anyhow!("pod {pod:?} is not namespace/name"))?;
        match self {
            Backend::Lab { agents, lab } => {
                let before = agents.revisions();
                let removed = lab.remove_pod(namespace, name).with_context(what)?;
                wait(agents, &before).with_context(what)?;
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

    /// Writes the policies file (`None`: removes it).
    pub fn write_policies(&mut self, text: Option<&str>) -> Result<()> {
        let path = self.manifests_dir().join(POLICIES_FILE);
        let write = || -> Result<()> {
            match text {
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
        match self {
            Backend::Lab { agents, .. } => {
                let before = agents.revisions();
                write()?;
                wait(agents, &before).context("applying policies")
            }
            Backend::Plan { .. } => write(),
        }
    }

    /// Fails if an agent has exited (the lab cannot enforce anything any more).
    pub fn check_agents(&mut self) -> Result<()> {
        if let Backend::Lab { agents, .. } = self {
            for a in &mut agents.agents {
                if let Some(status) = a.exited() {
                    return Err(anyhow!(
                        "the agent on {} exited ({status}):\n{}",
                        a.node,
                        a.log_tail(10)
                    ));
                }
            }
        }
        Ok(())
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

fn wait(agents: &mut Agents, before: &[u64]) -> Result<()> {
    agents
        .wait_synced(before, SYNC_TIMEOUT)
        .map_err(|e| anyhow!("{e}"))
}
