//! Running `netpol-agent` on the lab's nodes: one agent per node, inside
//! the node's network namespace (entered with setns before exec, so the
//! bpffs mount stays visible), reading the lab's manifests directory.

use std::{
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use crate::{LabState, NodeState, netns_command};

/// One agent process on one node.
#[derive(Debug)]
pub struct AgentProc {
    pub node: String,
    pub child: Option<Child>,
    pub bpffs_root: PathBuf,
    pub state_dir: PathBuf,
    pub flow_log: PathBuf,
    pub log: PathBuf,
    agent_bin: PathBuf,
    source: AgentSource,
    extra_args: Vec<String>,
}

/// Where agents read the cluster from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentSource {
    /// `--source dir:<dir>`: the lab's manifests directory.
    Dir(PathBuf),
    /// `--source kube --kubeconfig <file>`: the lab's API server, with a token of the
    /// ServiceAccount that `deploy/` creates.
    Kube { kubeconfig: PathBuf },
}

impl AgentSource {
    /// The lab's manifests directory.
    pub fn dir(lab: &LabState) -> AgentSource {
        AgentSource::Dir(lab.manifests_dir.clone())
    }

    /// The lab's API server, after installing netpol's `deploy/` into it (`kubectl apply -k`)
    /// and minting a token of its ServiceAccount.
    pub fn kube(lab: &LabState, deploy_dir: &Path) -> Result<AgentSource, String> {
        let cp = lab.control_plane.as_ref().ok_or_else(|| {
            format!(
                "lab {} has no control plane: the kube source needs `netpol-lab up --control-plane`",
                lab.name
            )
        })?;
        let kubeconfig =
            crate::controlplane::install_netpol(cp, deploy_dir).map_err(|e| e.to_string())?;
        Ok(AgentSource::Kube { kubeconfig })
    }

    fn args(&self) -> Vec<String> {
        match self {
            AgentSource::Dir(dir) => vec!["--source".into(), format!("dir:{}", dir.display())],
            AgentSource::Kube { kubeconfig } => vec![
                "--source".into(),
                "kube".into(),
                "--kubeconfig".into(),
                kubeconfig.display().to_string(),
            ],
        }
    }
}

const BPFFS: &str = "/sys/fs/bpf";

/// `netpol-lab_<lab>_`: lab names cannot contain `_`, so one lab's prefix
/// never matches another lab's pins.
fn pin_prefix(lab: &str) -> String {
    format!("netpol-lab_{lab}_")
}

/// Where a lab's agent keeps its pins and files.
pub fn agent_paths(lab: &LabState, node: &NodeState) -> (PathBuf, PathBuf) {
    let bpffs = Path::new(BPFFS).join(format!("{}{}", pin_prefix(&lab.name), node.name));
    let state = lab.state_dir.join("agents").join(&node.name);
    (bpffs, state)
}

/// Remove the pins of every agent a lab ran (what `netpol-agent cleanup`
/// does, for each node). Returns how many pin directories went.
pub fn remove_agent_pins(lab: &str) -> usize {
    let prefix = pin_prefix(lab);
    let Ok(dir) = std::fs::read_dir(BPFFS) else {
        return 0;
    };
    let mut removed = 0;
    for e in dir.flatten() {
        if !e.file_name().to_string_lossy().starts_with(&prefix) {
            continue;
        }
        for sub in ["links", "maps"] {
            if let Ok(files) = std::fs::read_dir(e.path().join(sub)) {
                for f in files.flatten() {
                    let _ = std::fs::remove_file(f.path());
                }
            }
            let _ = std::fs::remove_dir(e.path().join(sub));
        }
        if std::fs::remove_dir(e.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

impl AgentProc {
    /// Start the agent for `node` (see [`start_agents`]).
    pub fn start(
        lab: &LabState,
        node: &NodeState,
        agent_bin: &Path,
        extra_args: &[String],
    ) -> std::io::Result<AgentProc> {
        Self::start_with(lab, node, agent_bin, &AgentSource::dir(lab), extra_args)
    }

    /// Start the agent for `node` reading `source`.
    pub fn start_with(
        lab: &LabState,
        node: &NodeState,
        agent_bin: &Path,
        source: &AgentSource,
        extra_args: &[String],
    ) -> std::io::Result<AgentProc> {
        let (bpffs_root, state_dir) = agent_paths(lab, node);
        std::fs::create_dir_all(&state_dir)?;
        // A status left by an earlier agent on this node would read as this
        // one's until it writes its own.
        let _ = std::fs::remove_file(state_dir.join("status.json"));
        let mut extra_args = extra_args.to_vec();
        // A manifest directory has no ServiceCIDR objects: tell the agent the
        // lab's service ranges, as an operator would (the kube source reads
        // them from the API server).
        if let (AgentSource::Dir(_), Some(cp)) = (source, &lab.control_plane)
            && !extra_args.iter().any(|a| a.starts_with("--service-cidr"))
        {
            extra_args.push(format!(
                "--service-cidr={},{}",
                cp.spec.service_cidr, cp.spec.service_cidr_v6
            ));
        }
        let mut a = AgentProc {
            node: node.name.clone(),
            child: None,
            flow_log: state_dir.join("flows.jsonl"),
            log: state_dir.join("agent.log"),
            bpffs_root,
            state_dir,
            agent_bin: agent_bin.to_path_buf(),
            source: source.clone(),
            extra_args,
        };
        a.spawn(&node.netns_path())?;
        Ok(a)
    }

    fn spawn(&mut self, netns: &Path) -> std::io::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = netns_command(netns, &self.agent_bin)
            .arg("run")
            .arg("--node")
            .arg(&self.node)
            .args(self.source.args())
            .arg("--bpffs-root")
            .arg(&self.bpffs_root)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--flow-log")
            .arg(&self.flow_log)
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// Start a new agent process (after [`AgentProc::kill`] or
    /// [`AgentProc::terminate`]) with the same settings.
    pub fn restart(&mut self, lab: &LabState) -> std::io::Result<()> {
        let node = lab
            .node(&self.node)
            .ok_or_else(|| std::io::Error::other(format!("no node {}", self.node)))?;
        let _ = std::fs::remove_file(self.state_dir.join("status.json"));
        self.spawn(&node.netns_path())
    }

    /// SIGKILL, no chance to clean up (enforcement must stay).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: plain kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The agent's status file as JSON (None until it wrote one).
    pub fn status(&self) -> Option<serde_json::Value> {
        let text = std::fs::read_to_string(self.state_dir.join("status.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// The agent's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    /// Whether the agent exited (and how).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// The agent's log so far (for failure messages).
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Flow log lines so far: each as written and parsed.
    pub fn flow_logs(&self) -> Vec<(String, serde_json::Value)> {
        std::fs::read_to_string(&self.flow_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| Some((l.to_string(), serde_json::from_str(l).ok()?)))
            .collect()
    }

    /// Remove the agent's pins (detaching its programs).
    pub fn cleanup_pins(&self) {
        let _ = std::process::Command::new(&self.agent_bin)
            .arg("cleanup")
            .arg("--bpffs-root")
            .arg(&self.bpffs_root)
            .stdout(Stdio::null())
            .status();
    }
}

/// Agents for every node of a lab. Dropping them stops the processes and
/// removes their pins.
#[derive(Debug)]
pub struct Agents {
    pub agents: Vec<AgentProc>,
}

/// Start one agent per node.
pub fn start_agents(
    lab: &LabState,
    agent_bin: &Path,
    extra_args: &[String],
) -> std::io::Result<Agents> {
    start_agents_with(lab, agent_bin, &AgentSource::dir(lab), extra_args)
}

/// Start one agent per node, reading `source`.
pub fn start_agents_with(
    lab: &LabState,
    agent_bin: &Path,
    source: &AgentSource,
    extra_args: &[String],
) -> std::io::Result<Agents> {
    let mut agents = Vec::new();
    for node in &lab.nodes {
        // A previous run's pins under the same root would be adopted; a
        // fresh start is what callers of this function want.
        let (bpffs, _) = agent_paths(lab, node);
        let _ = std::process::Command::new(agent_bin)
            .arg("cleanup")
            .arg("--bpffs-root")
            .arg(&bpffs)
            .stdout(Stdio::null())
            .status();
        agents.push(AgentProc::start_with(
            lab, node, agent_bin, source, extra_args,
        )?);
    }
    Ok(Agents { agents })
}

impl Agents {
    pub fn node(&mut self, node: &str) -> &mut AgentProc {
        self.agents
            .iter_mut()
            .find(|a| a.node == node)
            .unwrap_or_else(|| panic!("no agent on node {node}"))
    }

    /// Each agent's source revision now (see [`Agents::wait_synced`]).
    pub fn revisions(&self) -> Vec<u64> {
        self.agents
            .iter()
            .map(|a| {
                a.status()
                    .and_then(|s| s["source_revision"].as_u64())
                    .unwrap_or(0)
            })
            .collect()
    }

    /// Change the manifests with `change`, then wait until every agent has
    /// seen a newer revision and synced it.
    pub fn change(&mut self, change: impl FnOnce(), timeout: Duration) -> Result<(), String> {
        let before = self.revisions();
        change();
        self.wait_synced(&before, timeout)
    }

    /// Wait until every agent reports `synced` with a source revision above
    /// `after` (its entry; empty = any) and no local pod without a veth.
    /// Errors with the agents' logs.
    pub fn wait_synced(&mut self, after: &[u64], timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut all = true;
            for (i, a) in self.agents.iter_mut().enumerate() {
                let min_revision = after.get(i).map_or(1, |r| r + 1);
                if let Some(st) = a.exited() {
                    return Err(format!(
                        "agent on {} exited ({st}):\n{}",
                        a.node,
                        a.log_tail(30)
                    ));
                }
                let ok = a.status().is_some_and(|s| {
                    s["synced"].as_bool() == Some(true)
                        && s["source_revision"].as_u64().unwrap_or(0) >= min_revision
                        && s["missing_veths"].as_array().is_some_and(|m| m.is_empty())
                });
                all &= ok;
            }
            if all {
                return Ok(());
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = self
                    .agents
                    .iter()
                    .map(|a| format!("--- {} status {:?}\n{}", a.node, a.status(), a.log_tail(20)))
                    .collect();
                return Err(format!(
                    "agents not synced after {timeout:?}:\n{}",
                    logs.join("\n")
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Flow logs of every agent.
    pub fn flow_logs(&self) -> Vec<(String, serde_json::Value)> {
        self.agents.iter().flat_map(|a| a.flow_logs()).collect()
    }

    /// Stop every agent (SIGTERM) and remove its pins.
    pub fn stop(&mut self) {
        for a in &mut self.agents {
            a.terminate();
            a.cleanup_pins();
        }
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        self.stop();
    }
}
