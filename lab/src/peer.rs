//! The reference peer: sig-network's kube-network-policies, run on every node of a
//! control-plane lab as its README describes (a privileged per-node process with in-cluster
//! credentials of its own ServiceAccount, `--hostname-override=<node>`, NRI off: the lab has no
//! container runtime).
//!
//! It reads in-cluster credentials from the fixed path
//! `/var/run/secrets/kubernetes.io/serviceaccount`, so each node's process runs in a private
//! mount namespace where the lab binds that node's token directory there (`unshare --mount`),
//! and in the node's network namespace.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use serde_json::json;

use crate::{
    LabState,
    controlplane::{self, API_PORT, ControlPlaneError, ControlPlaneState, log_tail},
    state::NodeState,
    tools::tool,
};

/// Where in-cluster clients look for their ServiceAccount credentials.
const IN_CLUSTER_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The peer's ServiceAccount.
const PEER_SA: (&str, &str) = ("kube-system", "kube-network-policies");

/// A peer process on one node.
#[derive(Debug)]
pub struct PeerProc {
    pub node: String,
    pub pid: u32,
    pub log: PathBuf,
}

/// The peer on every node of a lab.
#[derive(Debug)]
pub struct Peer {
    pub procs: Vec<PeerProc>,
}

/// The peer could not start or enforce.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error(transparent)]
    ControlPlane(#[from] ControlPlaneError),
    #[error("lab {0} has no control plane: kube-network-policies reads the API server")]
    NoControlPlane(String),
    #[error(
        "kube-network-policies cannot enforce on node {node}: {reason}. Its log ({log}):\n{tail}"
    )]
    Unsupported {
        node: String,
        reason: String,
        log: PathBuf,
        tail: String,
    },
    #[error("kube-network-policies on node {node} exited; its log ({log}):\n{tail}")]
    Exited {
        node: String,
        log: PathBuf,
        tail: String,
    },
}

/// RBAC the peer needs, as its install manifest grants it.
fn peer_objects() -> Vec<serde_json::Value> {
    let (ns, name) = PEER_SA;
    vec![
        json!({ "apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": { "name": name, "namespace": ns } }),
        json!({ "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                "metadata": { "name": name },
                "rules": [
                    { "apiGroups": [""], "resources": ["pods", "namespaces", "nodes"],
                      "verbs": ["list", "watch"] },
                    { "apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"],
                      "verbs": ["list", "watch"] },
                ] }),
        json!({ "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                "metadata": { "name": name },
                "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                             "name": name },
                "subjects": [{ "kind": "ServiceAccount", "name": name, "namespace": ns }] }),
    ]
}

/// Whether a log line says the kernel lacks what the peer needs: its nftables rules use the
/// `queue` expression (CONFIG_NFT_QUEUE).
fn unsupported_reason(log: &str) -> Option<String> {
    let line = log.lines().find(|l| {
        (l.contains("queue") || l.contains("nftables") || l.contains("netlink"))
            && (l.contains("no such file or directory") || l.contains("not supported"))
    })?;
    Some(format!(
        "this kernel has no nftables `queue` expression (CONFIG_NFT_QUEUE is not set), which \
         its rules need to send first packets to user space; it logged: {}",
        line.trim()
    ))
}

/// Starts kube-network-policies on every node and waits until each has installed its rules
/// (its nftables table exists), or reports why it cannot.
pub fn start_peer(lab: &LabState) -> Result<Peer, PeerError> {
    let cp = lab
        .control_plane
        .as_ref()
        .ok_or_else(|| PeerError::NoControlPlane(lab.name.clone()))?;
    let kubectl = cp.kubectl().map_err(ControlPlaneError::from)?;
    kubectl
        .apply(&peer_objects())
        .map_err(ControlPlaneError::from)?;
    let (ns, sa) = PEER_SA;
    let token = controlplane::service_account_token(cp, ns, sa, "24h")?;
    let exe = tool("kube-network-policies").map_err(ControlPlaneError::from)?;
    // Dropping `peer` on an error stops the processes already started.
    let mut peer = Peer { procs: Vec::new() };
    for node in &lab.nodes {
        peer.procs.push(start_one(lab, cp, node, &exe, &token)?);
    }
    peer.wait_ready(lab, Duration::from_secs(30))?;
    Ok(peer)
}

fn start_one(
    lab: &LabState,
    cp: &ControlPlaneState,
    node: &NodeState,
    exe: &Path,
    token: &str,
) -> Result<PeerProc, PeerError> {
    let dir = lab.state_dir.join("peer").join(&node.name);
    let creds = dir.join("serviceaccount");
    let io = |context: String| move |source| ControlPlaneError::Io { context, source };
    fs::create_dir_all(&creds).map_err(io(format!("create {}", creds.display())))?;
    fs::write(creds.join("token"), token).map_err(io("write the peer's token".into()))?;
    fs::copy(cp.dir.join("pki").join("ca.crt"), creds.join("ca.crt"))
        .map_err(io("copy the CA".into()))?;
    fs::write(creds.join("namespace"), PEER_SA.0).map_err(io("write namespace".into()))?;
    fs::create_dir_all(IN_CLUSTER_DIR).map_err(io(format!("create {IN_CLUSTER_DIR}")))?;
    let log = dir.join("kube-network-policies.log");
    // A private mount namespace binds this node's credentials over the in-cluster path; then
    // the node's network namespace; then the peer, as its DaemonSet runs it.
    let script = format!(
        "mount --bind {creds} {IN_CLUSTER_DIR} && exec nsenter --net={netns} {exe} \
         --hostname-override={node} --disable-nri --nfqueue-id=98 \
         --netfilter-bug-1766-fix=false --metrics-bind-address=127.0.0.1:9080 --v=2",
        creds = creds.display(),
        netns = node.netns_path().display(),
        exe = exe.display(),
        node = node.name,
    );
    let args: Vec<String> = vec![
        "--mount".into(),
        "--propagation".into(),
        "private".into(),
        "sh".into(),
        "-c".into(),
        script,
    ];
    let pid = {
        let mut command = Command::new("unshare");
        command
            .args(&args)
            .env("KUBERNETES_SERVICE_HOST", cp.ip_v4.to_string())
            .env("KUBERNETES_SERVICE_PORT", API_PORT.to_string());
        controlplane::spawn_command(command, &log, "kube-network-policies")?
    };
    Ok(PeerProc {
        node: node.name.clone(),
        pid,
        log,
    })
}

impl Peer {
    /// Waits until every node's peer has its nftables table, or fails with the reason.
    pub fn wait_ready(&self, lab: &LabState, timeout: Duration) -> Result<(), PeerError> {
        for p in &self.procs {
            let node = lab.node(&p.node).expect("started on a lab node");
            let start = Instant::now();
            loop {
                let tail = log_tail(&p.log, 40);
                if let Some(reason) = unsupported_reason(&tail) {
                    return Err(PeerError::Unsupported {
                        node: p.node.clone(),
                        reason,
                        log: p.log.clone(),
                        tail,
                    });
                }
                if !crate::netns::is_alive(p.pid) {
                    return Err(PeerError::Exited {
                        node: p.node.clone(),
                        log: p.log.clone(),
                        tail,
                    });
                }
                let table = crate::netns_command(&node.netns_path(), "nft")
                    .args(["list", "table", "inet", "kube-network-policies"])
                    .output()
                    .is_ok_and(|o| o.status.success());
                if table {
                    break;
                }
                if start.elapsed() > timeout {
                    return Err(PeerError::Unsupported {
                        node: p.node.clone(),
                        reason: format!("no nftables table after {timeout:?}"),
                        log: p.log.clone(),
                        tail,
                    });
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        Ok(())
    }

    /// Stops every peer process (SIGTERM, then SIGKILL).
    pub fn stop(&mut self) {
        let pids: Vec<u32> = self.procs.iter().map(|p| p.pid).collect();
        crate::netns::terminate(&pids, Duration::from_secs(2));
        self.procs.clear();
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_the_missing_queue_expression() {
        let log = r#"E1207 controller.go:300] "syncing nftables" err="netlink receive: no such file or directory""#;
        assert!(unsupported_reason(log).is_some());
        assert!(unsupported_reason("I1207 started").is_none());
    }
}
