//! Services beyond each model pod's own `s-<ns>-<pod>`, for tests in a control-plane lab: a
//! Service whose selector several pods can match (so its backend can be replaced while a
//! connection is open), or a NodePort Service (dialled at `<node IP>:<nodePort>`).
//!
//! The Service is created through the API server as a user would (`kubectl apply`); its
//! EndpointSlices come from the real controller and kube-proxy programs it on every node. These
//! functions do not wait for that: callers probe until it answers.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use serde_json::{Value, json};

use crate::{
    kube::KubeError,
    spec::Protocol,
    state::{Family, LabState, NodeState},
    tools::MissingTool,
};

/// How a Service is reached from outside its ClusterIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceType {
    ClusterIp,
    /// A ClusterIP plus a port on every node's addresses.
    NodePort,
}

/// A Service of the lab's API server, as created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabService {
    pub namespace: String,
    pub name: String,
    /// `spec.clusterIPs` (IPv4 first in a dual-stack lab).
    pub cluster_ips: Vec<IpAddr>,
    /// `(protocol, port)` -> the nodePort the API server allocated (NodePort Services only).
    pub node_ports: BTreeMap<(Protocol, u16), u16>,
}

impl LabService {
    /// The ClusterIP of one family.
    pub fn cluster_ip(&self, family: Family) -> Option<IpAddr> {
        self.cluster_ips
            .iter()
            .copied()
            .find(|ip| Family::of(ip) == family)
    }

    /// Where a pod dials this NodePort Service's `port`/`protocol` on `node`, over `family`.
    pub fn node_port_addr(
        &self,
        node: &NodeState,
        family: Family,
        protocol: Protocol,
        port: u16,
    ) -> Option<SocketAddr> {
        let node_port = self.node_ports.get(&(protocol, port))?;
        Some(SocketAddr::new(node.ip(family), *node_port))
    }
}

/// Creating or deleting a Service failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("lab {lab} has no control plane (bring it up with --control-plane)")]
    NoControlPlane { lab: String },
    #[error(transparent)]
    Tool(#[from] MissingTool),
    #[error(transparent)]
    Kube(#[from] KubeError),
}

/// The Service object: dual-stack, one port per `(port, protocol)` (targetPort = port), named
/// `service-port-<protocol>-<port>` as the lab's own Services are.
pub fn service_manifest(
    namespace: &str,
    name: &str,
    selector: &BTreeMap<String, String>,
    ports: &[(u16, Protocol)],
    kind: ServiceType,
) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(port, protocol)| {
            json!({
                "name": format!("service-port-{}-{port}", protocol.as_str().to_lowercase()),
                "port": port, "targetPort": port, "protocol": protocol.as_str(),
            })
        })
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": name, "namespace": namespace },
        "spec": {
            "type": match kind { ServiceType::ClusterIp => "ClusterIP", ServiceType::NodePort => "NodePort" },
            "selector": selector, "ports": ports,
            "ipFamilyPolicy": "PreferDualStack", "ipFamilies": ["IPv4", "IPv6"],
        },
    })
}

/// Creates (or updates) a Service in the lab's API server and returns its ClusterIPs and
/// nodePorts as allocated.
pub fn create_service(
    lab: &LabState,
    namespace: &str,
    name: &str,
    selector: &BTreeMap<String, String>,
    ports: &[(u16, Protocol)],
    kind: ServiceType,
) -> Result<LabService, ServiceError> {
    let cp = lab
        .control_plane
        .as_ref()
        .ok_or_else(|| ServiceError::NoControlPlane {
            lab: lab.name.clone(),
        })?;
    let kubectl = cp.kubectl()?;
    kubectl.apply(&[service_manifest(namespace, name, selector, ports, kind)])?;
    let svc = kubectl.json(&[
        "get",
        "service",
        name,
        &format!("--namespace={namespace}"),
        "-o",
        "json",
    ])?;
    let cluster_ips = svc["spec"]["clusterIPs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str()?.parse().ok())
        .collect();
    let node_ports = svc["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let protocol = match p["protocol"].as_str()? {
                "TCP" => Protocol::Tcp,
                "UDP" => Protocol::Udp,
                "SCTP" => Protocol::Sctp,
                _ => return None,
            };
            let port = u16::try_from(p["port"].as_u64()?).ok()?;
            let node_port = u16::try_from(p["nodePort"].as_u64()?).ok()?;
            Some(((protocol, port), node_port))
        })
        .collect();
    Ok(LabService {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        cluster_ips,
        node_ports,
    })
}
