//! The cluster file (`cluster.yaml`): what a lab looks like, before it exists.
//!
//! [`ClusterSpec::from_yaml`] parses and validates a file; every error names the field it is
//! about (`nodes[1].podCIDR`, `pods[3].node`, ...). See `lab/README.md` for the format.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
    str::FromStr,
};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

/// Longest lab name accepted. Lab names only appear in netns names and paths (never in interface
/// names), so this is about readability, not IFNAMSIZ.
pub const MAX_LAB_NAME_LEN: usize = 32;

/// Label the lab adds to every namespace, as Kubernetes does.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// A cluster file could not be read or is not a valid cluster.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The file could not be read.
    #[error("cannot read cluster file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The YAML does not have the cluster file's shape. serde_yaml's message names the field
    /// path (`nodes[0]: missing field `podCIDR``) and the line.
    #[error("invalid cluster file: {source}")]
    Yaml {
        #[source]
        source: serde_yaml::Error,
    },
    /// The YAML has the right shape but a field's value is wrong.
    #[error("invalid cluster file: {field}: {message}")]
    Invalid { field: String, message: String },
}

impl SpecError {
    fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        SpecError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A whole lab: nodes, namespaces and pods.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClusterSpec {
    /// Lab name: a DNS label of at most [`MAX_LAB_NAME_LEN`] characters.
    pub name: String,
    /// The network that links the nodes. Defaults to 172.31.0.0/24 and fd00:31::/64.
    #[serde(default)]
    pub fabric: FabricSpec,
    /// Nodes, in order: node `i` gets host address `i + 1` of the fabric.
    pub nodes: Vec<NodeSpec>,
    /// Namespaces that pods may live in.
    #[serde(default)]
    pub namespaces: Vec<NamespaceSpec>,
    /// Pods, in order: pod addresses are given out per node in this order.
    #[serde(default)]
    pub pods: Vec<PodSpec>,
    /// A real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager,
    /// kube-proxy on every node, CoreDNS); `netpol-lab up --control-plane` sets it too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_plane: Option<crate::controlplane::ControlPlaneSpec>,
}

/// The network between nodes, and how pod traffic crosses it ([`FabricMode`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FabricSpec {
    /// IPv4 subnet of the node addresses.
    #[serde(default = "default_fabric_v4")]
    pub cidr: Ipv4Net,
    /// IPv6 subnet of the node addresses.
    #[serde(default = "default_fabric_v6", rename = "cidrV6")]
    pub cidr_v6: Ipv6Net,
    /// How pod traffic goes from node to node; host-gw unless asked otherwise.
    #[serde(default)]
    pub mode: FabricMode,
}

/// How pod traffic goes from node to node, as flannel's backends do it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FabricMode {
    /// flannel's host-gw: other nodes' pod CIDRs are routed via their fabric addresses, so pod
    /// packets cross the fabric as they are.
    #[default]
    HostGw,
    /// flannel's default, vxlan: pod packets cross the fabric inside VXLAN (UDP) between the
    /// nodes' fabric addresses, through a VXLAN device per family on each node.
    Vxlan,
}

impl FabricMode {
    /// The cluster file's spelling: `host-gw`, `vxlan`.
    pub fn as_str(self) -> &'static str {
        match self {
            FabricMode::HostGw => "host-gw",
            FabricMode::Vxlan => "vxlan",
        }
    }
}

impl fmt::Display for FabricMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn default_fabric_v4() -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(172, 31, 0, 0), 24).expect("valid prefix")
}

fn default_fabric_v6() -> Ipv6Net {
    Ipv6Net::new(Ipv6Addr::new(0xfd00, 0x31, 0, 0, 0, 0, 0, 0), 64).expect("valid prefix")
}

impl Default for FabricSpec {
    fn default() -> Self {
        FabricSpec {
            cidr: default_fabric_v4(),
            cidr_v6: default_fabric_v6(),
            mode: FabricMode::default(),
        }
    }
}

/// How pods are plugged into their node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Attachment {
    /// Calico-like: /32 and /128 pod addresses, a route per pod to its `cali*` veth, proxy ARP
    /// and link-local gateways.
    Routed,
    /// bridge-CNI/flannel-like: `veth*` ports of a `cni0` bridge that holds the gateway addresses.
    Bridged,
}

impl fmt::Display for Attachment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Attachment::Routed => "routed",
            Attachment::Bridged => "bridged",
        })
    }
}

/// One node: a network namespace with forwarding on and its own pod CIDRs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    pub name: String,
    pub attachment: Attachment,
    #[serde(rename = "podCIDR")]
    pub pod_cidr: Ipv4Net,
    #[serde(rename = "podCIDRv6")]
    pub pod_cidr_v6: Ipv6Net,
}

/// A Kubernetes namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceSpec {
    pub name: String,
    /// Labels; the lab adds `kubernetes.io/metadata.name: <name>`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A pod: a network namespace with a dual-stack address and a server on its ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub node: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub ports: Vec<PortSpec>,
}

/// A container port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    /// Optional IANA service name (at most 15 characters), used by named-port policies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: u16,
    /// Defaults to TCP, as in Kubernetes.
    #[serde(default)]
    pub protocol: Protocol,
}

/// A transport protocol as Kubernetes spells it.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub enum Protocol {
    #[default]
    #[serde(rename = "TCP", alias = "tcp")]
    Tcp,
    #[serde(rename = "UDP", alias = "udp")]
    Udp,
    /// Recorded in manifests; the lab starts no SCTP server and cannot probe SCTP.
    #[serde(rename = "SCTP", alias = "sctp")]
    Sctp,
}

impl Protocol {
    /// The Kubernetes spelling: `TCP`, `UDP`, `SCTP`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            "sctp" => Ok(Protocol::Sctp),
            _ => Err(format!(
                "unknown protocol {s:?} (expected tcp, udp or sctp)"
            )),
        }
    }
}

impl ClusterSpec {
    /// Parses and validates a cluster file's text.
    pub fn from_yaml(text: &str) -> Result<Self, SpecError> {
        let spec: ClusterSpec =
            serde_yaml::from_str(text).map_err(|source| SpecError::Yaml { source })?;
        spec.validate()?;
        Ok(spec)
    }

    /// Reads, parses and validates a cluster file.
    pub fn from_file(path: &Path) -> Result<Self, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml(&text)
    }

    /// Checks everything serde cannot: names, references, uniqueness, address space.
    pub fn validate(&self) -> Result<(), SpecError> {
        check_dns_label("name", &self.name, MAX_LAB_NAME_LEN)?;
        self.validate_fabric()?;
        self.validate_nodes()?;
        self.validate_namespaces()?;
        self.validate_pods()
    }

    fn validate_fabric(&self) -> Result<(), SpecError> {
        let FabricSpec {
            cidr,
            cidr_v6,
            mode: _,
        } = &self.fabric;
        if cidr.network() != cidr.addr() {
            return Err(SpecError::invalid(
                "fabric.cidr",
                format!(
                    "{cidr} is not a network address (did you mean {}?)",
                    cidr.trunc()
                ),
            ));
        }
        if cidr_v6.network() != cidr_v6.addr() {
            return Err(SpecError::invalid(
                "fabric.cidrV6",
                format!(
                    "{cidr_v6} is not a network address (did you mean {}?)",
                    cidr_v6.trunc()
                ),
            ));
        }
        // Node i gets host i + 1, the gateway gets host 254 (see plan.rs): a /24 at least.
        if cidr.prefix_len() > 24 {
            return Err(SpecError::invalid("fabric.cidr", "must be a /24 or larger"));
        }
        if cidr_v6.prefix_len() > 120 {
            return Err(SpecError::invalid(
                "fabric.cidrV6",
                "must be a /120 or larger",
            ));
        }
        Ok(())
    }

    fn validate_nodes(&self) -> Result<(), SpecError> {
        if self.nodes.is_empty() {
            return Err(SpecError::invalid("nodes", "a lab needs at least one node"));
        }
        // Host 254 of the fabric is the gateway; nodes take hosts 1..=253.
        if self.nodes.len() > 253 {
            return Err(SpecError::invalid("nodes", "at most 253 nodes"));
        }
        let mut names = BTreeSet::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let field = |f: &str| format!("nodes[{i}].{f}");
            check_dns_subdomain(&field("name"), &node.name)?;
            if !names.insert(node.name.as_str()) {
                return Err(SpecError::invalid(
                    field("name"),
                    format!("duplicate node name {:?}", node.name),
                ));
            }
            if node.pod_cidr.network() != node.pod_cidr.addr() {
                return Err(SpecError::invalid(
                    field("podCIDR"),
                    format!("{} is not a network address", node.pod_cidr),
                ));
            }
            if node.pod_cidr_v6.network() != node.pod_cidr_v6.addr() {
                return Err(SpecError::invalid(
                    field("podCIDRv6"),
                    format!("{} is not a network address", node.pod_cidr_v6),
                ));
            }
            if node.pod_cidr.prefix_len() > 29 {
                return Err(SpecError::invalid(
                    field("podCIDR"),
                    "must be a /29 or larger",
                ));
            }
            if node.pod_cidr_v6.prefix_len() > 125 {
                return Err(SpecError::invalid(
                    field("podCIDRv6"),
                    "must be a /125 or larger",
                ));
            }
            if overlaps4(&node.pod_cidr, &self.fabric.cidr) {
                return Err(SpecError::invalid(
                    field("podCIDR"),
                    format!(
                        "{} overlaps fabric.cidr {}",
                        node.pod_cidr, self.fabric.cidr
                    ),
                ));
            }
            if overlaps6(&node.pod_cidr_v6, &self.fabric.cidr_v6) {
                return Err(SpecError::invalid(
                    field("podCIDRv6"),
                    format!(
                        "{} overlaps fabric.cidrV6 {}",
                        node.pod_cidr_v6, self.fabric.cidr_v6
                    ),
                ));
            }
            for (j, other) in self.nodes[..i].iter().enumerate() {
                if overlaps4(&node.pod_cidr, &other.pod_cidr) {
                    return Err(SpecError::invalid(
                        field("podCIDR"),
                        format!(
                            "{} overlaps nodes[{j}].podCIDR {}",
                            node.pod_cidr, other.pod_cidr
                        ),
                    ));
                }
                if overlaps6(&node.pod_cidr_v6, &other.pod_cidr_v6) {
                    return Err(SpecError::invalid(
                        field("podCIDRv6"),
                        format!(
                            "{} overlaps nodes[{j}].podCIDRv6 {}",
                            node.pod_cidr_v6, other.pod_cidr_v6
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate_namespaces(&self) -> Result<(), SpecError> {
        let mut names = BTreeSet::new();
        for (i, ns) in self.namespaces.iter().enumerate() {
            check_dns_label(&format!("namespaces[{i}].name"), &ns.name, 63)?;
            if !names.insert(ns.name.as_str()) {
                return Err(SpecError::invalid(
                    format!("namespaces[{i}].name"),
                    format!("duplicate namespace {:?}", ns.name),
                ));
            }
            check_labels(&format!("namespaces[{i}].labels"), &ns.labels)?;
            if let Some(value) = ns.labels.get(NAMESPACE_NAME_LABEL)
                && value != &ns.name
            {
                return Err(SpecError::invalid(
                    format!("namespaces[{i}].labels"),
                    format!(
                        "{NAMESPACE_NAME_LABEL} must be the namespace name {:?}",
                        ns.name
                    ),
                ));
            }
        }
        Ok(())
    }

    fn validate_pods(&self) -> Result<(), SpecError> {
        let namespaces: BTreeSet<&str> = self.namespaces.iter().map(|n| n.name.as_str()).collect();
        let mut pods = BTreeSet::new();
        let mut per_node: BTreeMap<&str, u128> = BTreeMap::new();
        for (i, pod) in self.pods.iter().enumerate() {
            let field = |f: &str| format!("pods[{i}].{f}");
            if !namespaces.contains(pod.namespace.as_str()) {
                return Err(SpecError::invalid(
                    field("namespace"),
                    format!(
                        "namespace {:?} is not declared in namespaces",
                        pod.namespace
                    ),
                ));
            }
            check_dns_subdomain(&field("name"), &pod.name)?;
            if !pods.insert((pod.namespace.as_str(), pod.name.as_str())) {
                return Err(SpecError::invalid(
                    field("name"),
                    format!("duplicate pod {}/{}", pod.namespace, pod.name),
                ));
            }
            let Some(node) = self.nodes.iter().find(|n| n.name == pod.node) else {
                return Err(SpecError::invalid(
                    field("node"),
                    format!("node {:?} is not declared in nodes", pod.node),
                ));
            };
            let count = per_node.entry(node.name.as_str()).or_default();
            *count += 1;
            // Hosts 0 (network) and 1 (gateway) and the v4 broadcast are never pod addresses.
            let room4 = (1u128 << (32 - node.pod_cidr.prefix_len())) - 3;
            let room6 = (1u128 << (128 - node.pod_cidr_v6.prefix_len()).min(127)) - 2;
            if *count > room4.min(room6) {
                return Err(SpecError::invalid(
                    field("node"),
                    format!("node {:?} has no pod address left", node.name),
                ));
            }
            check_labels(&field("labels"), &pod.labels)?;
            self.validate_ports(i, pod)?;
        }
        Ok(())
    }

    fn validate_ports(&self, i: usize, pod: &PodSpec) -> Result<(), SpecError> {
        let mut names = BTreeSet::new();
        let mut ports = BTreeSet::new();
        for (j, port) in pod.ports.iter().enumerate() {
            let field = |f: &str| format!("pods[{i}].ports[{j}].{f}");
            if port.port == 0 {
                return Err(SpecError::invalid(field("port"), "must be 1-65535"));
            }
            if let Some(name) = &port.name {
                check_port_name(&field("name"), name)?;
                if !names.insert(name.as_str()) {
                    return Err(SpecError::invalid(
                        field("name"),
                        format!("duplicate port name {name:?}"),
                    ));
                }
            }
            if !ports.insert((port.port, port.protocol)) {
                return Err(SpecError::invalid(
                    field("port"),
                    format!("duplicate port {}/{}", port.port, port.protocol),
                ));
            }
        }
        Ok(())
    }
}

fn overlaps4(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn overlaps6(a: &Ipv6Net, b: &Ipv6Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// RFC 1123 label: lowercase alphanumerics and '-', starting and ending alphanumeric.
fn check_dns_label(field: &str, value: &str, max: usize) -> Result<(), SpecError> {
    let ok = !value.is_empty()
        && value.len() <= max
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(SpecError::invalid(
            field,
            format!(
                "{value:?} is not a DNS label (1-{max} characters of a-z, 0-9 and '-', \
                 starting and ending with a letter or digit)"
            ),
        ))
    }
}

/// RFC 1123 subdomain: dot-separated labels, at most 253 characters.
fn check_dns_subdomain(field: &str, value: &str) -> Result<(), SpecError> {
    if value.is_empty() || value.len() > 253 {
        return Err(SpecError::invalid(
            field,
            format!("{value:?} must be 1-253 characters"),
        ));
    }
    for label in value.split('.') {
        check_dns_label(field, label, 63).map_err(|_| {
            SpecError::invalid(
                field,
                format!("{value:?} is not a DNS subdomain (a-z, 0-9, '-' and '.')"),
            )
        })?;
    }
    Ok(())
}

/// IANA service name as Kubernetes checks it: 1-15 characters of a-z, 0-9 and '-', at least
/// one letter, no leading, trailing or double '-'.
fn check_port_name(field: &str, value: &str) -> Result<(), SpecError> {
    let ok = !value.is_empty()
        && value.len() <= 15
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && value.bytes().any(|b| b.is_ascii_lowercase())
        && !value.starts_with('-')
        && !value.ends_with('-')
        && !value.contains("--");
    if ok {
        Ok(())
    } else {
        Err(SpecError::invalid(
            field,
            format!("{value:?} is not an IANA service name (1-15 of a-z, 0-9, '-')"),
        ))
    }
}

/// Label keys (`[prefix/]name`) and values, checked loosely: enough to catch typos that would
/// make the manifests unloadable, not the full Kubernetes grammar.
fn check_labels(field: &str, labels: &BTreeMap<String, String>) -> Result<(), SpecError> {
    let name_ok = |s: &str, allow_empty: bool| {
        (allow_empty || !s.is_empty())
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && (s.is_empty()
                || (s.as_bytes()[0].is_ascii_alphanumeric()
                    && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()))
    };
    for (key, value) in labels {
        let (prefix, name) = match key.rsplit_once('/') {
            Some((prefix, name)) => (Some(prefix), name),
            None => (None, key.as_str()),
        };
        let prefix_ok = prefix.is_none_or(|p| check_dns_subdomain(field, p).is_ok());
        if !prefix_ok || !name_ok(name, false) {
            return Err(SpecError::invalid(
                field,
                format!("{key:?} is not a valid label key"),
            ));
        }
        if !name_ok(value, true) {
            return Err(SpecError::invalid(
                field,
                format!("label {key:?}: {value:?} is not a valid label value"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEMO: &str = r#"
name: demo
nodes:
  - {name: node-a, attachment: routed, podCIDR: 10.244.1.0/24, podCIDRv6: "fd00:244:1::/64"}
  - {name: node-b, attachment: bridged, podCIDR: 10.244.2.0/24, podCIDRv6: "fd00:244:2::/64"}
namespaces:
  - {name: x, labels: {ns: x}}
pods:
  - namespace: x
    name: a
    node: node-a
    labels: {pod: a}
    ports:
      - {name: serve-80-tcp, port: 80, protocol: TCP}
      - {name: serve-80-udp, port: 80, protocol: udp}
      - {port: 81}
"#;

    fn invalid_field(yaml: &str) -> String {
        match ClusterSpec::from_yaml(yaml) {
            Err(SpecError::Invalid { field, .. }) => field,
            other => panic!("expected SpecError::Invalid, got {other:?}"),
        }
    }

    fn yaml_message(yaml: &str) -> String {
        match ClusterSpec::from_yaml(yaml) {
            Err(e @ SpecError::Yaml { .. }) => e.to_string(),
            other => panic!("expected SpecError::Yaml, got {other:?}"),
        }
    }

    #[test]
    fn parses_demo() {
        let spec = ClusterSpec::from_yaml(DEMO).expect("demo parses");
        assert_eq!(spec.name, "demo");
        assert_eq!(spec.fabric, FabricSpec::default());
        assert_eq!(spec.nodes[0].attachment, Attachment::Routed);
        assert_eq!(spec.nodes[1].attachment, Attachment::Bridged);
        assert_eq!(spec.nodes[1].pod_cidr_v6.to_string(), "fd00:244:2::/64");
        let ports = &spec.pods[0].ports;
        assert_eq!(ports[1].protocol, Protocol::Udp);
        assert_eq!(ports[2].protocol, Protocol::Tcp, "protocol defaults to TCP");
        assert_eq!(ports[2].name, None);
    }

    #[test]
    fn shipped_examples_parse() {
        for (file, mode) in [
            ("examples/two-node.yaml", FabricMode::HostGw),
            ("examples/demo.yaml", FabricMode::HostGw),
            ("examples/two-node-vxlan.yaml", FabricMode::Vxlan),
        ] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
            let spec = ClusterSpec::from_file(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!(spec.fabric.mode, mode, "{file}");
        }
    }

    #[test]
    fn missing_field_is_named_with_its_path() {
        let msg = yaml_message(
            "name: d\nnodes:\n  - {name: n, attachment: routed, podCIDRv6: \"fd00::/64\"}\n",
        );
        assert!(msg.contains("nodes[0]") && msg.contains("podCIDR"), "{msg}");
    }

    #[test]
    fn unknown_field_is_named() {
        let msg =
            yaml_message(&DEMO.replace("attachment: routed", "attachment: routed, mtu: 9000"));
        assert!(msg.contains("nodes[0]") && msg.contains("mtu"), "{msg}");
    }

    #[test]
    fn bad_attachment_is_named() {
        let msg = yaml_message(&DEMO.replace("attachment: bridged", "attachment: vxlan"));
        assert!(
            msg.contains("nodes[1].attachment") && msg.contains("vxlan"),
            "{msg}"
        );
    }

    #[test]
    fn fabric_mode_defaults_to_host_gw_and_parses_vxlan() {
        let spec = ClusterSpec::from_yaml(DEMO).expect("demo parses");
        assert_eq!(spec.fabric.mode, FabricMode::HostGw);
        for (text, mode) in [
            ("host-gw", FabricMode::HostGw),
            ("vxlan", FabricMode::Vxlan),
        ] {
            let yaml = DEMO.replace(
                "name: demo\n",
                &format!("name: demo\nfabric: {{mode: {text}}}\n"),
            );
            let spec = ClusterSpec::from_yaml(&yaml).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(spec.fabric.mode, mode);
            assert_eq!(
                mode.to_string(),
                text,
                "Display is the cluster file's spelling"
            );
            // The other fabric fields keep their defaults.
            assert_eq!(spec.fabric.cidr, FabricSpec::default().cidr);
        }
    }

    #[test]
    fn bad_fabric_mode_is_named() {
        for bad in [
            "geneve", "VXLAN", "hostgw", "host_gw", "\"\"", "1", "[vxlan]",
        ] {
            let yaml = DEMO.replace(
                "name: demo\n",
                &format!("name: demo\nfabric: {{mode: {bad}}}\n"),
            );
            let msg = yaml_message(&yaml);
            assert!(msg.contains("fabric.mode"), "{bad}: {msg}");
        }
        let msg =
            yaml_message(&DEMO.replace("name: demo\n", "name: demo\nfabric: {mode: geneve}\n"));
        assert!(
            msg.contains("geneve") && msg.contains("host-gw") && msg.contains("vxlan"),
            "the error names the value and the choices: {msg}"
        );
    }

    #[test]
    fn bad_cidr_is_named() {
        let msg = yaml_message(&DEMO.replace("10.244.2.0/24", "10.244.2.0/33"));
        assert!(msg.contains("nodes[1].podCIDR"), "{msg}");
    }

    #[test]
    fn validation_errors_name_the_field() {
        let cases: &[(&str, &str, &str)] = &[
            ("name: demo", "name: Demo", "name"),
            ("10.244.2.0/24", "10.244.1.128/25", "nodes[1].podCIDR"),
            ("10.244.2.0/24", "10.244.2.1/24", "nodes[1].podCIDR"),
            ("fd00:244:2::/64", "fd00:244:1::/64", "nodes[1].podCIDRv6"),
            ("name: node-b", "name: node-a", "nodes[1].name"),
            ("node: node-a", "node: node-c", "pods[0].node"),
            ("namespace: x", "namespace: y", "pods[0].namespace"),
            ("name: a", "name: A_1", "pods[0].name"),
            ("{pod: a}", "{\"bad key!\": a}", "pods[0].labels"),
            ("port: 81", "port: 0", "pods[0].ports[2].port"),
            (
                "{port: 81}",
                "{port: 80, protocol: UDP}",
                "pods[0].ports[2].port",
            ),
            (
                "name: serve-80-udp",
                "name: serve-80-tcp",
                "pods[0].ports[1].name",
            ),
            (
                "name: serve-80-udp",
                "name: a-very-long-port-name",
                "pods[0].ports[1].name",
            ),
            (
                "{ns: x}",
                "{ns: x, kubernetes.io/metadata.name: y}",
                "namespaces[0].labels",
            ),
        ];
        for (from, to, field) in cases {
            let yaml = DEMO.replacen(from, to, 1);
            assert_ne!(yaml, DEMO, "case {to:?} did not change the file");
            assert_eq!(invalid_field(&yaml), *field, "case {from:?} -> {to:?}");
        }
    }

    #[test]
    fn pod_cidr_overlapping_fabric_is_rejected() {
        let yaml = DEMO.replace("10.244.2.0/24", "172.31.0.0/16");
        assert_eq!(invalid_field(&yaml), "nodes[1].podCIDR");
    }

    #[test]
    fn full_node_is_rejected() {
        let mut yaml = DEMO.replace("10.244.1.0/24", "10.244.1.0/29");
        // A /29 holds 5 pods (hosts 2..=6).
        for i in 0..5 {
            yaml.push_str(&format!("  - {{namespace: x, name: p{i}, node: node-a}}\n"));
        }
        assert_eq!(invalid_field(&yaml), "pods[5].node");
    }

    #[test]
    fn protocol_round_trips() {
        for p in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
            assert_eq!(p.as_str().parse::<Protocol>(), Ok(p));
            assert_eq!(p.as_str().to_lowercase().parse::<Protocol>(), Ok(p));
        }
        assert!("icmp".parse::<Protocol>().is_err());
    }
}
