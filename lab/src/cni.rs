//! Pods set up through a chained CNI plugin (`netpol-cni`), invoked the way a container runtime
//! invokes the plugins of a conflist. The lab itself plays the first plugin of the chain (`ptp`
//! on routed nodes, `bridge` on bridged ones): it creates the veth, addresses and routes, then
//! runs the chained plugin in the node's network namespace with `CNI_COMMAND=ADD` and the
//! network configuration on stdin, with the first plugin's result as `prevResult`, and only
//! then starts the container. DEL runs before the lab deletes the veth, as runtimes call a
//! chain's DEL in reverse order.
//!
//! The configuration points `bpffsRoot` at the node's agent pins (see
//! [`crate::agents::agent_paths`]), whether or not an agent runs there.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{Attachment, LabState, NodeState, PodState, cluster::LabError, netns::netns_command};

/// Environment variable naming the `netpol-cni` binary.
pub const CNI_EXE_ENV: &str = "NETPOL_CNI_BIN";
/// The CNI version the lab speaks.
pub const CNI_VERSION: &str = "1.0.0";

/// How a pod was set up through the plugin, recorded with the pod so that its DEL gets the same
/// configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodCni {
    pub exe: PathBuf,
    pub bpffs_root: PathBuf,
    pub state_dir: PathBuf,
    pub log_file: PathBuf,
}

impl PodCni {
    /// The plugin `exe` on `node` of `lab`: the node agent's pin root, state and log under the
    /// lab's state directory (gone with the lab).
    pub fn new(lab: &LabState, node: &NodeState, exe: &Path) -> PodCni {
        let (bpffs_root, _) = crate::agents::agent_paths(lab, node);
        let dir = lab.state_dir.join("cni").join(&node.name);
        PodCni {
            exe: exe.to_path_buf(),
            bpffs_root,
            state_dir: dir.join("state"),
            log_file: dir.join("netpol-cni.log"),
        }
    }

    /// The network configuration of the plugin's conflist entry, as the runtime hands it over.
    fn netconf(&self, prev_result: Option<&Value>) -> Value {
        let mut conf = json!({
            "cniVersion": CNI_VERSION,
            "name": "netpol-lab",
            "type": "netpol-cni",
            "bpffsRoot": self.bpffs_root,
            "stateDir": self.state_dir,
            "logFile": self.log_file,
        });
        if let Some(prev) = prev_result {
            conf["prevResult"] = prev.clone();
        }
        conf
    }
}

/// The `netpol-cni` binary: `$NETPOL_CNI_BIN`, else `netpol-cni` next to the running
/// executable or in its parent directory (a test binary in `target/debug/deps` finds
/// `target/debug/netpol-cni`).
pub fn cni_exe() -> Result<PathBuf, LabError> {
    if let Some(path) = std::env::var_os(CNI_EXE_ENV) {
        return Ok(PathBuf::from(path));
    }
    let mut looked = Vec::new();
    if let Ok(me) = std::env::current_exe() {
        for dir in me
            .parent()
            .into_iter()
            .chain(me.parent().and_then(Path::parent))
        {
            let candidate = dir.join("netpol-cni");
            if candidate.is_file() {
                return Ok(candidate);
            }
            looked.push(candidate.display().to_string());
        }
    }
    Err(LabError::Command {
        command: "finding netpol-cni".into(),
        stderr: format!(
            "set {CNI_EXE_ENV} or build it (`cargo build -p netpol-cni`); looked at {}",
            looked.join(", ")
        ),
    })
}

/// The MAC address of `dev` in netns `ns`.
fn mac(ns: &str, dev: &str) -> Result<String, LabError> {
    let out = Command::new("ip")
        .args(["-n", ns, "-j", "link", "show", "dev", dev])
        .output()
        .map_err(|source| LabError::Io {
            context: format!("ip -n {ns} link show dev {dev}"),
            source,
        })?;
    let parsed: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    parsed[0]["address"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| LabError::Command {
            command: format!("ip -n {ns} -j link show dev {dev}"),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
}

/// What the first plugin of the chain would have returned for `pod`: `ptp`'s result on a routed
/// node (host veth, pod eth0, /32 and /128 addresses), `bridge`'s on a bridged one (the bridge,
/// host veth, pod eth0, addresses in the node's CIDRs).
pub fn prev_result(node: &NodeState, pod: &PodState) -> Result<Value, LabError> {
    let sandbox = pod.netns_path();
    let host = json!({"name": pod.host_veth, "mac": mac(&node.netns, &pod.host_veth)?});
    let eth0 = json!({"name": "eth0", "mac": mac(&pod.netns, "eth0")?, "sandbox": sandbox});
    let (interfaces, pod_if, len4, len6) = match node.attachment {
        Attachment::Routed => (vec![host, eth0], 1, 32, 128),
        Attachment::Bridged => (
            vec![
                json!({"name": "cni0", "mac": mac(&node.netns, "cni0")?}),
                host,
                eth0,
            ],
            2,
            node.pod_cidr_v4.prefix_len(),
            node.pod_cidr_v6.prefix_len(),
        ),
    };
    Ok(json!({
        "cniVersion": CNI_VERSION,
        "interfaces": interfaces,
        "ips": [
            {"address": format!("{}/{len4}", pod.ip_v4), "gateway": node.gateway_v4, "interface": pod_if},
            {"address": format!("{}/{len6}", pod.ip_v6), "gateway": node.gateway_v6, "interface": pod_if},
        ],
        "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
        "dns": {},
    }))
}

/// Runs the plugin for `pod` with `command` in `node`'s netns; returns its stdout.
pub fn invoke(
    cni: &PodCni,
    node: &NodeState,
    pod: &PodState,
    command: &str,
    prev_result: Option<&Value>,
) -> Result<String, LabError> {
    let what = format!("netpol-cni {command} for pod {}", pod.key());
    let io_err = |source| LabError::Io {
        context: what.clone(),
        source,
    };
    let mut child = netns_command(&node.netns_path(), &cni.exe)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &pod.uid)
        .env("CNI_NETNS", pod.netns_path())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", cni.exe.parent().unwrap_or(Path::new("/")))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_err)?;
    let conf = cni.netconf(prev_result).to_string();
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(conf.as_bytes())
        .map_err(io_err)?;
    let out = child.wait_with_output().map_err(io_err)?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(LabError::Command {
            command: what,
            stderr: format!(
                "{}: {stdout}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ),
        });
    }
    Ok(stdout)
}

/// CNI ADD for a pod whose veth and addresses exist: the plugin must answer with the previous
/// result unchanged (a runtime reports the chain's last result as the pod's).
pub fn add(cni: &PodCni, node: &NodeState, pod: &PodState) -> Result<(), LabError> {
    let prev = prev_result(node, pod)?;
    let out = invoke(cni, node, pod, "ADD", Some(&prev))?;
    match serde_json::from_str::<Value>(&out) {
        Ok(result) if result == prev => Ok(()),
        _ => Err(LabError::Command {
            command: format!("netpol-cni ADD for pod {}", pod.key()),
            stderr: format!("answered {out:?}, not the previous result {prev}"),
        }),
    }
}

/// CNI DEL for a pod (before its veth is deleted; whatever is gone already is no error).
pub fn del(cni: &PodCni, node: &NodeState, pod: &PodState) -> Result<(), LabError> {
    let prev = prev_result(node, pod).ok();
    invoke(cni, node, pod, "DEL", prev.as_ref()).map(drop)
}
