//! The clusters and policies that tests and benchmarks share, so that one
//! scenario is written once.

use crate::spec::{ClusterSpec, SpecError};

/// Two nodes (node-a routed, node-b bridged), namespaces x and y (labelled
/// `ns: <name>`), pods a and b in each spread over both nodes (labelled
/// `pod: <name>`), dual-stack, each serving `ports` (e.g.
/// `[{port: 80, protocol: TCP}]`). node-a's pods are in 10.244.1.0/24,
/// node-b's in 10.244.2.0/24.
pub fn two_node_cluster(name: &str, ports: &str) -> Result<ClusterSpec, SpecError> {
    ClusterSpec::from_yaml(&two_node_cluster_yaml(name, ports))
}

/// The YAML of [`two_node_cluster`], for tests that add to it.
pub fn two_node_cluster_yaml(name: &str, ports: &str) -> String {
    format!(
        r#"
name: {name}
nodes:
  - {{name: node-a, attachment: routed, podCIDR: 10.244.1.0/24, podCIDRv6: "fd00:244:1::/64"}}
  - {{name: node-b, attachment: bridged, podCIDR: 10.244.2.0/24, podCIDRv6: "fd00:244:2::/64"}}
namespaces:
  - {{name: x, labels: {{ns: x}}}}
  - {{name: y, labels: {{ns: y}}}}
pods:
  - {{namespace: x, name: a, node: node-a, labels: {{pod: a}}, ports: {ports}}}
  - {{namespace: x, name: b, node: node-b, labels: {{pod: b}}, ports: {ports}}}
  - {{namespace: y, name: a, node: node-b, labels: {{pod: a}}, ports: {ports}}}
  - {{namespace: y, name: b, node: node-a, labels: {{pod: b}}, ports: {ports}}}
"#
    )
}

/// Namespace x isolated for ingress, nothing allowed.
pub const DENY_ALL_X: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: x}
spec:
  podSelector: {}
"#;

/// x's pods labelled `pod: a` take TCP 80 from y's `pod: a` pods. (`"y"` is
/// quoted: kubectl reads YAML 1.1, where a bare `y` is a boolean.)
pub const ALLOW_YA_TO_XA_80: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-ya, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
    - from:
        - namespaceSelector: {matchLabels: {ns: "y"}}
          podSelector: {matchLabels: {pod: a}}
      ports:
        - {protocol: TCP, port: 80}
"#;

/// [`ALLOW_YA_TO_XA_80`], and also the lab's stream ports (TCP 9100, UDP 9101:
/// `start_stream`).
pub const ALLOW_YA_TO_XA_STREAMS: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-ya, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
    - from:
        - namespaceSelector: {matchLabels: {ns: "y"}}
          podSelector: {matchLabels: {pod: a}}
      ports:
        - {protocol: TCP, port: 9100}
        - {protocol: UDP, port: 9101}
        - {protocol: TCP, port: 80}
"#;
