//! Wire types of `ClusterNetworkPolicy` (`policy.networking.k8s.io/v1alpha2`,
//! sigs.k8s.io/network-policy-api v0.2), written from the upstream
//! `apis/v1alpha2/clusternetworkpolicy_types.go`. They are what the API
//! server (or a manifest) sends; [`crate::convert::cluster_network_policy`]
//! validates them into the [`crate::model`].
//!
//! Every field is optional here even where upstream requires it, so that a
//! missing field is reported by the converter with its path instead of
//! failing the whole object in serde. Peers and protocol entries keep the
//! fields they do not know (`other`): a peer written for a newer CRD has
//! none of the fields we know, and upstream says to fail closed then.

use std::collections::BTreeMap;

use k8s_openapi::{
    ClusterResourceScope, ListableResource, Metadata, Resource,
    apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, ObjectMeta},
};
use serde::{Deserialize, Serialize};

/// Fields a newer CRD may carry that this version does not know.
pub type Unknown = BTreeMap<String, serde_json::Value>;

/// A `ClusterNetworkPolicy` object.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterNetworkPolicy {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<Spec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
}

impl Resource for ClusterNetworkPolicy {
    const API_VERSION: &'static str = "policy.networking.k8s.io/v1alpha2";
    const GROUP: &'static str = "policy.networking.k8s.io";
    const KIND: &'static str = "ClusterNetworkPolicy";
    const VERSION: &'static str = "v1alpha2";
    const URL_PATH_SEGMENT: &'static str = "clusternetworkpolicies";
    type Scope = ClusterResourceScope;
}

impl ListableResource for ClusterNetworkPolicy {
    const LIST_KIND: &'static str = "ClusterNetworkPolicyList";
}

impl Metadata for ClusterNetworkPolicy {
    type Ty = ObjectMeta;
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// `spec`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    /// `Admin` or `Baseline`.
    #[serde(default)]
    pub tier: Option<String>,
    /// 0..=1000.
    #[serde(default)]
    pub priority: Option<i64>,
    #[serde(default)]
    pub subject: Option<Subject>,
    #[serde(default)]
    pub ingress: Option<Vec<IngressRule>>,
    #[serde(default)]
    pub egress: Option<Vec<EgressRule>>,
}

/// `status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// `spec.subject`: exactly one field.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Subject {
    #[serde(default)]
    pub namespaces: Option<LabelSelector>,
    #[serde(default)]
    pub pods: Option<NamespacedPod>,
    #[serde(flatten)]
    pub other: Unknown,
}

/// `pods` of a subject or peer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NamespacedPod {
    #[serde(default)]
    pub namespace_selector: Option<LabelSelector>,
    #[serde(default)]
    pub pod_selector: Option<LabelSelector>,
}

/// One `spec.ingress` rule.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct IngressRule {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub action: Option<String>,
    #[serde(default)]
    pub from: Option<Vec<Peer>>,
    #[serde(default)]
    pub protocols: Option<Vec<ProtocolEntry>>,
}

/// One `spec.egress` rule.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EgressRule {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub action: Option<String>,
    #[serde(default)]
    pub to: Option<Vec<Peer>>,
    #[serde(default)]
    pub protocols: Option<Vec<ProtocolEntry>>,
}

/// A `from` / `to` entry: exactly one field. Ingress peers may only use
/// `namespaces` and `pods`; the converter checks that.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Peer {
    #[serde(default)]
    pub namespaces: Option<LabelSelector>,
    #[serde(default)]
    pub pods: Option<NamespacedPod>,
    #[serde(default)]
    pub nodes: Option<LabelSelector>,
    #[serde(default)]
    pub networks: Option<Vec<String>>,
    #[serde(default)]
    pub domain_names: Option<Vec<String>>,
    #[serde(flatten)]
    pub other: Unknown,
}

/// A `protocols` entry: exactly one field.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProtocolEntry {
    #[serde(default)]
    pub tcp: Option<ProtocolPorts>,
    #[serde(default)]
    pub udp: Option<ProtocolPorts>,
    #[serde(default)]
    pub sctp: Option<ProtocolPorts>,
    #[serde(default)]
    pub destination_named_port: Option<String>,
    #[serde(flatten)]
    pub other: Unknown,
}

/// `tcp` / `udp` / `sctp`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProtocolPorts {
    #[serde(default)]
    pub destination_port: Option<Port>,
    #[serde(flatten)]
    pub other: Unknown,
}

/// `destinationPort`: exactly one of `number` and `range`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Port {
    #[serde(default)]
    pub number: Option<i64>,
    #[serde(default)]
    pub range: Option<PortRange>,
}

/// `range`: `start < end`, both in 1..=65535.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PortRange {
    #[serde(default)]
    pub start: Option<i64>,
    #[serde(default)]
    pub end: Option<i64>,
}
