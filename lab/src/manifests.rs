//! The lab's cluster state as ordinary Kubernetes manifests: one YAML file per Namespace, Pod
//! and Node, written atomically into the manifests dir, which the agent watches in place of an
//! API server.
//!
//! `up` writes them all ([`write_manifests`]); changes to a running lab rewrite one object's
//! file ([`write_pod_manifest`], [`write_namespace_manifest`]) or remove it.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

use serde_json::{Value, json};

use crate::{
    spec::NAMESPACE_NAME_LABEL,
    state::{LabState, NodeState, PodState, StateError, uid, write_atomic},
};

/// Annotation on every object the lab writes, naming the lab.
pub const LAB_ANNOTATION: &str = "netpol-lab/name";

/// The `Namespace` manifest of namespace `index` of the spec.
pub fn namespace_manifest(state: &LabState, index: usize) -> Value {
    let ns = &state.spec.namespaces[index];
    let mut labels = ns.labels.clone();
    labels.insert(NAMESPACE_NAME_LABEL.to_owned(), ns.name.clone());
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": ns.name,
            "uid": uid(&[&state.name, "namespace", &ns.name]),
            "labels": labels,
            "annotations": { LAB_ANNOTATION: state.name },
        },
        "status": { "phase": "Active" },
    })
}

/// The `Pod` manifest of a pod: labels, node, container ports, Running with both pod IPs.
pub fn pod_manifest(state: &LabState, pod: &PodState) -> Value {
    let node = state.node_of(pod);
    let ports: Vec<Value> = pod
        .ports
        .iter()
        .map(|p| {
            let mut port = json!({ "containerPort": p.port, "protocol": p.protocol.as_str() });
            if let Some(name) = &p.name {
                port["name"] = json!(name);
            }
            port
        })
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod.name,
            "namespace": pod.namespace,
            "uid": pod.uid,
            "labels": pod.labels,
            "annotations": {
                LAB_ANNOTATION: state.name,
                "netpol-lab/netns": pod.netns,
                "netpol-lab/host-veth": pod.host_veth,
            },
        },
        "spec": {
            "nodeName": pod.node,
            "containers": [{
                "name": "serve",
                "image": "netpol-lab/serve",
                "ports": ports,
            }],
        },
        "status": {
            "phase": "Running",
            "conditions": [{ "type": "Ready", "status": "True" }],
            "hostIP": node.ip_v4.to_string(),
            "hostIPs": [{ "ip": node.ip_v4.to_string() }, { "ip": node.ip_v6.to_string() }],
            "podIP": pod.ip_v4.to_string(),
            "podIPs": [{ "ip": pod.ip_v4.to_string() }, { "ip": pod.ip_v6.to_string() }],
        },
    })
}

/// The `Node` manifest of a node: pod CIDRs and InternalIPs.
pub fn node_manifest(state: &LabState, node: &NodeState) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": node.name,
            "uid": node.uid,
            "labels": { "kubernetes.io/hostname": node.name, "kubernetes.io/os": "linux" },
            "annotations": {
                LAB_ANNOTATION: state.name,
                "netpol-lab/netns": node.netns,
                "netpol-lab/attachment": node.attachment.to_string(),
            },
        },
        "spec": {
            "podCIDR": node.pod_cidr_v4.to_string(),
            "podCIDRs": [node.pod_cidr_v4.to_string(), node.pod_cidr_v6.to_string()],
        },
        "status": {
            "addresses": [
                { "type": "InternalIP", "address": node.ip_v4.to_string() },
                { "type": "InternalIP", "address": node.ip_v6.to_string() },
                { "type": "Hostname", "address": node.name },
            ],
        },
    })
}

/// `namespace-<ns>.yaml`.
pub fn namespace_manifest_file(namespace: &str) -> String {
    format!("namespace-{namespace}.yaml")
}

/// `pod-<ns>-<pod>.yaml`. Not unique in general (`a-b`/`c` and `a`/`b-c` share a name): adding
/// a pod whose file name another pod has is refused.
pub fn pod_manifest_file(namespace: &str, name: &str) -> String {
    format!("pod-{namespace}-{name}.yaml")
}

/// `node-<node>.yaml`.
pub fn node_manifest_file(node: &str) -> String {
    format!("node-{node}.yaml")
}

/// Every manifest of the lab with its file name: `namespace-<ns>.yaml`, `node-<node>.yaml`,
/// `pod-<ns>-<pod>.yaml`.
pub fn all_manifests(state: &LabState) -> Vec<(String, Value)> {
    let namespaces = (0..state.spec.namespaces.len()).map(|i| {
        (
            namespace_manifest_file(&state.spec.namespaces[i].name),
            namespace_manifest(state, i),
        )
    });
    let nodes = state
        .nodes
        .iter()
        .map(|n| (node_manifest_file(&n.name), node_manifest(state, n)));
    let pods = state.pods.iter().chain(&state.system_pods).map(|p| {
        (
            pod_manifest_file(&p.namespace, &p.name),
            pod_manifest(state, p),
        )
    });
    // The system pods' namespace (kube-system), which the cluster file does not declare.
    let system_namespaces: BTreeSet<&str> = state
        .system_pods
        .iter()
        .map(|p| p.namespace.as_str())
        .filter(|ns| !state.spec.namespaces.iter().any(|n| n.name == *ns))
        .collect();
    let system_namespaces = system_namespaces.into_iter().map(|ns| {
        (
            namespace_manifest_file(ns),
            json!({
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {
                    "name": ns,
                    "labels": { NAMESPACE_NAME_LABEL: ns },
                    "annotations": { LAB_ANNOTATION: state.name },
                },
                "status": { "phase": "Active" },
            }),
        )
    });
    namespaces
        .chain(system_namespaces)
        .chain(nodes)
        .chain(pods)
        .collect()
}

/// Writes every manifest into the manifests dir (created if missing), each atomically, and
/// returns the paths written.
pub fn write_manifests(state: &LabState) -> Result<Vec<PathBuf>, StateError> {
    all_manifests(state)
        .into_iter()
        .map(|(file, manifest)| write_manifest(&state.manifests_dir, &file, &manifest))
        .collect()
}

/// Writes (or rewrites) one pod's manifest atomically; returns its path.
pub fn write_pod_manifest(state: &LabState, pod: &PodState) -> Result<PathBuf, StateError> {
    write_manifest(
        &state.manifests_dir,
        &pod_manifest_file(&pod.namespace, &pod.name),
        &pod_manifest(state, pod),
    )
}

/// Rewrites one namespace's manifest atomically; returns its path. `namespace` must be
/// declared in the state's spec.
pub fn write_namespace_manifest(state: &LabState, namespace: &str) -> Result<PathBuf, StateError> {
    let index = state
        .spec
        .namespaces
        .iter()
        .position(|n| n.name == namespace)
        .expect("callers check that the namespace exists");
    write_manifest(
        &state.manifests_dir,
        &namespace_manifest_file(namespace),
        &namespace_manifest(state, index),
    )
}

/// Writes one manifest as YAML into `dir` (created if missing), atomically.
fn write_manifest(dir: &Path, file: &str, manifest: &Value) -> Result<PathBuf, StateError> {
    fs::create_dir_all(dir).map_err(|source| StateError::Io {
        action: "create",
        path: dir.to_owned(),
        source,
    })?;
    let path = dir.join(file);
    let yaml = serde_yaml::to_string(manifest).expect("manifest serializes");
    write_atomic(&path, yaml.as_bytes())?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::spec::ClusterSpec;

    fn state() -> LabState {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/two-node.yaml");
        LabState::plan(
            &ClusterSpec::from_file(&path).expect("example parses"),
            None,
        )
    }

    #[test]
    fn pod_manifest_has_what_the_agent_needs() {
        let state = state();
        let pod = state.pod("x", "a").expect("x/a");
        let m = pod_manifest(&state, pod);
        assert_eq!(m["metadata"]["labels"]["pod"], "a");
        assert_eq!(m["spec"]["nodeName"], json!(pod.node));
        let ports = m["spec"]["containers"][0]["ports"]
            .as_array()
            .expect("ports");
        assert_eq!(ports.len(), 4);
        assert_eq!(ports[0]["name"], "serve-80-tcp");
        assert_eq!(ports[0]["containerPort"], 80);
        assert_eq!(ports[1]["protocol"], "UDP");
        assert_eq!(m["status"]["podIP"], json!(pod.ip_v4.to_string()));
        assert_eq!(m["status"]["podIPs"][1]["ip"], json!(pod.ip_v6.to_string()));
        assert_eq!(m["status"]["phase"], "Running");
    }

    #[test]
    fn namespace_gets_metadata_name_label() {
        let state = state();
        let m = namespace_manifest(&state, 1);
        assert_eq!(m["metadata"]["labels"][NAMESPACE_NAME_LABEL], "y");
        assert_eq!(m["metadata"]["labels"]["ns"], "y");
        assert_eq!(m["metadata"]["uid"].as_str().map(str::len), Some(36));
    }

    #[test]
    fn node_manifest_has_cidrs_and_addresses() {
        let state = state();
        let m = node_manifest(&state, &state.nodes[1]);
        assert_eq!(m["spec"]["podCIDRs"][1], "fd00:244:2::/64");
        assert_eq!(m["status"]["addresses"][0]["address"], "172.31.0.2");
        assert_eq!(m["status"]["addresses"][1]["type"], "InternalIP");
    }

    #[test]
    fn file_names_are_unique() {
        let state = state();
        let manifests = all_manifests(&state);
        let names: std::collections::BTreeSet<_> = manifests.iter().map(|(n, _)| n).collect();
        assert_eq!(names.len(), manifests.len());
        assert_eq!(manifests.len(), 3 + 2 + 9);
    }
}
