//! The light cluster model the policy compiler works on.
//!
//! It keeps only what NetworkPolicy enforcement needs (memory matters at
//! 100k pods): namespace labels and `netpol.dev/` annotations, pod labels,
//! addresses, placement, phase and container ports, and policies in their
//! validated form ([`crate::convert`] builds them from Kubernetes objects).
//!
//! The [`build`] module has fixture builders that read like the spec:
//!
//! ```
//! use netpol_agent::model::build::*;
//! let p = pod("x", "a").labels([("pod", "a")]).ip("10.0.1.2").node("n1");
//! let deny = policy("x", "deny-all").select(all()).deny_ingress();
//! let web = policy("x", "allow-web")
//!     .select(labels([("app", "web")]))
//!     .ingress(allow().from(pods(labels([("role", "client")]))).port(tcp(80)));
//! let cluster = cluster().namespace(namespace("x")).pod(p).policy(deny).policy(web);
//! assert_eq!(cluster.pods.len(), 1);
//! ```

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    sync::LazyLock,
};

use ipnet::IpNet;
use netpol_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};

/// Labels (and annotations) of an object.
pub type Labels = BTreeMap<String, String>;

/// Namespace annotation that puts every pod of the namespace in audit mode.
pub const AUDIT_ANNOTATION: &str = "netpol.dev/audit";
/// Prefix of the namespace annotations the model keeps (others are dropped).
pub const ANNOTATION_PREFIX: &str = "netpol.dev/";

/// `namespace/name` of a namespaced object (a pod or a policy).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A pod, named by namespace and name.
pub type PodRef = ObjectRef;
/// A NetworkPolicy, named by namespace and name.
pub type PolicyRef = ObjectRef;

/// The cluster state the compiler needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cluster {
    pub namespaces: BTreeMap<String, Namespace>,
    pub pods: BTreeMap<PodRef, Pod>,
    pub policies: BTreeMap<PolicyRef, NetworkPolicy>,
    /// ClusterNetworkPolicies (policy.networking.k8s.io/v1alpha2), by name.
    /// Compiled with NetworkPolicy into the datapath (`compiler::tiered`).
    pub cluster_policies: BTreeMap<String, ClusterNetworkPolicy>,
    /// Nodes, by name: labels and addresses (what a CNP `nodes` peer
    /// matches). Only the sources that read Node objects fill it.
    pub nodes: BTreeMap<String, Node>,
    /// Service frontends kube-proxy translates, by ServiceCIDR object: its
    /// CIDRs. A pod's egress to them is judged after the DNAT. Not an input
    /// of the policy compiler.
    pub service_cidrs: BTreeMap<String, Vec<ipnet::IpNet>>,
    /// By Service: its external IPs and load-balancer ingress IPs (also
    /// translated by kube-proxy, outside the service CIDRs).
    pub service_ips: BTreeMap<ObjectRef, Vec<IpAddr>>,
}

impl Cluster {
    /// Insert or replace a namespace.
    pub fn upsert_namespace(&mut self, ns: Namespace) {
        self.namespaces.insert(ns.name.clone(), ns);
    }
    /// Insert or replace a pod.
    pub fn upsert_pod(&mut self, pod: Pod) {
        self.pods.insert(pod.pod_ref(), pod);
    }
    /// Insert or replace a policy.
    pub fn upsert_policy(&mut self, policy: NetworkPolicy) {
        self.policies.insert(policy.policy_ref(), policy);
    }
    /// Insert or replace a ClusterNetworkPolicy.
    pub fn upsert_cluster_policy(&mut self, cnp: ClusterNetworkPolicy) {
        self.cluster_policies.insert(cnp.name.clone(), cnp);
    }
    /// Insert or replace a node.
    pub fn upsert_node(&mut self, node: Node) {
        self.nodes.insert(node.name.clone(), node);
    }
    pub fn remove_namespace(&mut self, name: &str) -> Option<Namespace> {
        self.namespaces.remove(name)
    }
    pub fn remove_pod(&mut self, pod: &PodRef) -> Option<Pod> {
        self.pods.remove(pod)
    }
    pub fn remove_policy(&mut self, policy: &PolicyRef) -> Option<NetworkPolicy> {
        self.policies.remove(policy)
    }

    /// Labels of a namespace; empty when the namespace is not known (yet).
    pub fn namespace_labels(&self, namespace: &str) -> &Labels {
        static EMPTY: LazyLock<Labels> = LazyLock::new(Labels::new);
        self.namespaces
            .get(namespace)
            .map_or(&*EMPTY, |ns| &ns.labels)
    }

    /// Every address range kube-proxy may translate, as the cluster says.
    pub fn service_frontends(&self) -> impl Iterator<Item = ipnet::IpNet> + '_ {
        self.service_cidrs.values().flatten().copied().chain(
            self.service_ips
                .values()
                .flatten()
                .map(|ip| ipnet::IpNet::from(*ip)),
        )
    }

    /// Whether the namespace has `netpol.dev/audit: "true"`.
    pub fn namespace_audit(&self, namespace: &str) -> bool {
        self.namespaces.get(namespace).is_some_and(Namespace::audit)
    }

    // Builder-style helpers for fixtures.

    pub fn namespace(mut self, ns: Namespace) -> Self {
        self.upsert_namespace(ns);
        self
    }
    pub fn pod(mut self, pod: Pod) -> Self {
        self.upsert_pod(pod);
        self
    }
    pub fn policy(mut self, policy: NetworkPolicy) -> Self {
        self.upsert_policy(policy);
        self
    }
    pub fn cluster_policy(mut self, cnp: ClusterNetworkPolicy) -> Self {
        self.upsert_cluster_policy(cnp);
        self
    }
    pub fn node(mut self, node: Node) -> Self {
        self.upsert_node(node);
        self
    }
}

/// A node: its labels (for CNP `nodes` peers) and the addresses of
/// `status.addresses` that are IPs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub labels: Labels,
    pub addresses: Vec<IpAddr>,
}

impl Node {
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }
    /// Adds an address (panics on a malformed address: fixtures only).
    pub fn address(mut self, ip: &str) -> Self {
        self.addresses
            .push(ip.parse().unwrap_or_else(|e| panic!("bad IP {ip:?}: {e}")));
        self
    }
}

/// A namespace: its labels (for namespace selectors) and the `netpol.dev/`
/// annotations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
    pub annotations: Labels,
}

impl Namespace {
    /// Whether the namespace is in audit mode (`netpol.dev/audit: "true"`).
    pub fn audit(&self) -> bool {
        self.annotations.get(AUDIT_ANNOTATION).map(String::as_str) == Some("true")
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }
    pub fn labels<'a>(mut self, labels: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        self.labels = to_labels(labels);
        self
    }
    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.into(), value.into());
        self
    }
    /// Sets `netpol.dev/audit: "true"`.
    pub fn audited(self) -> Self {
        self.annotation(AUDIT_ANNOTATION, "true")
    }
}

/// Pod lifecycle phase (`status.phase`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PodPhase {
    #[default]
    Pending,
    Running,
    Succeeded,
    Failed,
    Unknown,
}

impl PodPhase {
    /// Succeeded and Failed pods are done: their IPs may already belong to
    /// another pod.
    pub fn is_terminal(self) -> bool {
        matches!(self, PodPhase::Succeeded | PodPhase::Failed)
    }
}

/// L4 protocols a NetworkPolicy port or a container port can name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// IP protocol number (`PROTO_*`).
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
            Protocol::Sctp => PROTO_SCTP,
        }
    }
    /// The Kubernetes spelling; `None` for anything but TCP, UDP and SCTP.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

/// A container port of a pod (what named ports resolve to).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

/// A pod as the compiler sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    /// `spec.nodeName`; `None` until scheduled.
    pub node: Option<String>,
    pub labels: Labels,
    /// `status.podIPs` (one per family on a dual-stack cluster).
    pub ips: Vec<IpAddr>,
    pub host_network: bool,
    pub phase: PodPhase,
    /// Ports of the containers (and of restartable init containers).
    pub ports: Vec<ContainerPort>,
}

impl Pod {
    pub fn pod_ref(&self) -> PodRef {
        ObjectRef::new(&self.namespace, &self.name)
    }

    /// Whether the pod takes part in NetworkPolicy: it is scheduled, runs
    /// in the pod network (not `hostNetwork`), is not finished (Succeeded or
    /// Failed) and has an IP. Only such pods are endpoints and only their IPs
    /// are pod IPs.
    pub fn is_live(&self) -> bool {
        self.node.is_some()
            && !self.host_network
            && !self.phase.is_terminal()
            && !self.ips.is_empty()
    }

    /// Port numbers a named port resolves to on this pod: every container
    /// port with that name and protocol.
    pub fn resolve_named_port(&self, name: &str, protocol: Protocol) -> impl Iterator<Item = u16> {
        self.ports
            .iter()
            .filter(move |p| p.protocol == protocol && p.name.as_deref() == Some(name))
            .map(|p| p.port)
    }

    // Builder-style helpers for fixtures.

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }
    pub fn labels<'a>(mut self, labels: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        self.labels = to_labels(labels);
        self
    }
    /// Adds an IP (panics on a malformed address: fixtures only).
    pub fn ip(mut self, ip: &str) -> Self {
        self.ips
            .push(ip.parse().unwrap_or_else(|e| panic!("bad IP {ip:?}: {e}")));
        self
    }
    pub fn node(mut self, node: &str) -> Self {
        self.node = Some(node.into());
        self
    }
    pub fn host_network(mut self) -> Self {
        self.host_network = true;
        self
    }
    pub fn phase(mut self, phase: PodPhase) -> Self {
        self.phase = phase;
        self
    }
    /// Adds a named container port.
    pub fn named_port(mut self, name: &str, protocol: Protocol, port: u16) -> Self {
        self.ports.push(ContainerPort {
            name: Some(name.into()),
            port,
            protocol,
        });
        self
    }
}

/// Operator of a selector requirement, with its values (validated: `In` and
/// `NotIn` have at least one value, `Exists` and `DoesNotExist` none).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Operator {
    In(BTreeSet<String>),
    NotIn(BTreeSet<String>),
    Exists,
    DoesNotExist,
}

/// One `matchExpressions` entry.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
}

impl Requirement {
    pub fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match &self.operator {
            Operator::In(values) => value.is_some_and(|v| values.contains(v)),
            Operator::NotIn(values) => value.is_none_or(|v| !values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

/// A label selector (`matchLabels` AND `matchExpressions`); the empty
/// selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LabelSelector {
    pub match_labels: BTreeMap<String, String>,
    pub match_expressions: Vec<Requirement>,
}

impl LabelSelector {
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }

    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    // Builder-style helpers for fixtures.

    pub fn key_in<'a>(self, key: &str, values: impl IntoIterator<Item = &'a str>) -> Self {
        self.expr(
            key,
            Operator::In(values.into_iter().map(String::from).collect()),
        )
    }
    pub fn key_not_in<'a>(self, key: &str, values: impl IntoIterator<Item = &'a str>) -> Self {
        self.expr(
            key,
            Operator::NotIn(values.into_iter().map(String::from).collect()),
        )
    }
    pub fn exists(self, key: &str) -> Self {
        self.expr(key, Operator::Exists)
    }
    pub fn does_not_exist(self, key: &str) -> Self {
        self.expr(key, Operator::DoesNotExist)
    }
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.match_labels.insert(key.into(), value.into());
        self
    }
    fn expr(mut self, key: &str, operator: Operator) -> Self {
        self.match_expressions.push(Requirement {
            key: key.into(),
            operator,
        });
        self
    }
}

impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("{}");
        }
        let mut parts: Vec<String> = self
            .match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        for r in &self.match_expressions {
            let list = |vs: &BTreeSet<String>| vs.iter().cloned().collect::<Vec<_>>().join(",");
            parts.push(match &r.operator {
                Operator::In(vs) => format!("{} in ({})", r.key, list(vs)),
                Operator::NotIn(vs) => format!("{} notin ({})", r.key, list(vs)),
                Operator::Exists => r.key.clone(),
                Operator::DoesNotExist => format!("!{}", r.key),
            });
        }
        f.write_str(&parts.join(","))
    }
}

/// An `ipBlock`: `cidr` minus the `except` prefixes (each strictly inside
/// `cidr`, same family). Prefixes are stored truncated (no host bits).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpBlock {
    pub cidr: IpNet,
    pub except: Vec<IpNet>,
}

impl IpBlock {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.cidr.contains(&ip) && !self.except.iter().any(|e| e.contains(&ip))
    }

    /// Adds an `except` prefix (panics on a malformed prefix: fixtures only).
    pub fn except(mut self, cidr: &str) -> Self {
        self.except.push(parse_net(cidr));
        self.except.sort();
        self.except.dedup();
        self
    }
}

/// One entry of `from` / `to`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Peer {
    /// Pods selected by `pod_selector` (`None`: all pods) in the namespaces
    /// selected by `namespace_selector` (`None`: the policy's own namespace).
    /// Both `None` means every pod of the policy's namespace (the API server
    /// rejects such an empty peer, and [`crate::convert`] reports it).
    Pods {
        namespace_selector: Option<LabelSelector>,
        pod_selector: Option<LabelSelector>,
    },
    IpBlock(IpBlock),
}

/// The port part of a [`PortSpec`].
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortMatch {
    /// Every port of the protocol.
    All,
    /// `port` .. `end` inclusive (`end == start` for one port).
    Range { start: u16, end: u16 },
    /// A container port name, resolved on the destination pod.
    Named(String),
}

/// One entry of `ports`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortSpec {
    pub protocol: Protocol,
    pub port: PortMatch,
}

/// An ingress or egress rule. Empty `peers` = every peer; empty `ports` =
/// every port of every protocol.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    pub peers: Vec<Peer>,
    pub ports: Vec<PortSpec>,
}

impl Rule {
    /// Adds a peer (`from` / `to` entry).
    pub fn from(mut self, peer: Peer) -> Self {
        self.peers.push(peer);
        self
    }
    /// Same as [`Rule::from`], reads better in egress rules.
    pub fn to(self, peer: Peer) -> Self {
        self.from(peer)
    }
    pub fn port(mut self, port: PortSpec) -> Self {
        self.ports.push(port);
        self
    }
}

/// A NetworkPolicy in validated form. `ingress`/`egress` is `Some` when the
/// policy has that type (it isolates the pods it selects in that direction),
/// with the rules that allow traffic; a policy that failed validation has
/// empty rule lists (see [`crate::convert`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetworkPolicy {
    pub namespace: String,
    pub name: String,
    pub pod_selector: LabelSelector,
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
    /// The policy failed validation and was reduced to its isolation (fail
    /// closed).
    pub invalid: bool,
}

impl NetworkPolicy {
    pub fn policy_ref(&self) -> PolicyRef {
        ObjectRef::new(&self.namespace, &self.name)
    }

    /// Whether the policy selects the pod (same namespace, selector matches).
    pub fn selects(&self, pod: &Pod) -> bool {
        pod.namespace == self.namespace && self.pod_selector.matches(&pod.labels)
    }

    /// The rules of one direction (`DIR_*`), `None` when the policy does not
    /// have that type.
    pub fn rules(&self, direction: u8) -> Option<&[Rule]> {
        if direction == netpol_common::DIR_INGRESS {
            self.ingress.as_deref()
        } else {
            self.egress.as_deref()
        }
    }

    // Builder-style helpers for fixtures.

    pub fn select(mut self, selector: LabelSelector) -> Self {
        self.pod_selector = selector;
        self
    }
    /// Adds an ingress rule (and the Ingress type).
    pub fn ingress(mut self, rule: Rule) -> Self {
        self.ingress.get_or_insert_with(Vec::new).push(rule);
        self
    }
    /// Adds an egress rule (and the Egress type).
    pub fn egress(mut self, rule: Rule) -> Self {
        self.egress.get_or_insert_with(Vec::new).push(rule);
        self
    }
    /// Adds the Ingress type (with no rule of its own: isolation).
    pub fn deny_ingress(mut self) -> Self {
        self.ingress.get_or_insert_with(Vec::new);
        self
    }
    /// Adds the Egress type (with no rule of its own: isolation).
    pub fn deny_egress(mut self) -> Self {
        self.egress.get_or_insert_with(Vec::new);
        self
    }
}

/// `spec.tier` of a ClusterNetworkPolicy. Evaluation order: Admin, then
/// NetworkPolicy, then Baseline, then the default (allow).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    #[default]
    Admin,
    Baseline,
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::Admin => "Admin",
            Tier::Baseline => "Baseline",
        })
    }
}

/// A CNP rule's `action`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    /// Allowed; no later CNP rule or NetworkPolicy of this direction applies.
    #[default]
    Accept,
    /// Dropped; nothing later applies.
    Deny,
    /// Skips the rest of the policy's tier: from Admin to NetworkPolicy,
    /// from Baseline to the default (allow).
    Pass,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Accept => "Accept",
            Action::Deny => "Deny",
            Action::Pass => "Pass",
        })
    }
}

/// `spec.subject`: the pods a CNP applies to (never hostNetwork pods).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Subject {
    /// Every pod of the namespaces the selector matches.
    Namespaces(LabelSelector),
    /// Pods matching `pod_selector` in namespaces matching
    /// `namespace_selector` (empty selectors match everything).
    Pods {
        namespace_selector: LabelSelector,
        pod_selector: LabelSelector,
    },
}

impl Subject {
    /// Whether the (live) pod is selected; `namespace_labels` are its
    /// namespace's labels.
    pub fn matches(&self, pod: &Pod, namespace_labels: &Labels) -> bool {
        match self {
            Subject::Namespaces(ns) => ns.matches(namespace_labels),
            Subject::Pods {
                namespace_selector,
                pod_selector,
            } => namespace_selector.matches(namespace_labels) && pod_selector.matches(&pod.labels),
        }
    }
}

/// One entry of a CNP rule's `from` / `to`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CnpPeer {
    /// Every (non-hostNetwork) pod of the namespaces the selector matches.
    Namespaces(LabelSelector),
    /// Pods matching `pod_selector` in namespaces matching
    /// `namespace_selector`.
    Pods {
        namespace_selector: LabelSelector,
        pod_selector: LabelSelector,
    },
    /// Egress only: addresses in any of the CIDRs, pod IPs included.
    Networks(Vec<IpNet>),
    /// Egress only: the addresses of the nodes the selector matches.
    Nodes(LabelSelector),
    /// Every address. Never written by users: the fail-closed form of a
    /// Deny or Pass rule [`crate::convert`] could not read (an unknown peer
    /// field from a newer CRD, domainNames, an invalid field).
    Everything,
}

/// One entry of a CNP rule's `protocols`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CnpPort {
    /// `tcp`/`udp`/`sctp` `destinationPort`: `start..=end` (`end == start`
    /// for a single number).
    Range {
        protocol: Protocol,
        start: u16,
        end: u16,
    },
    /// `destinationNamedPort`: a container port of the destination pod with
    /// that name, whatever its protocol (the container port says which).
    Named(String),
}

/// A CNP ingress or egress rule. `peers` match if any entry matches; an
/// empty `peers` matches nothing (the API requires at least one, and an
/// Accept rule that could not be read is kept with none). An empty
/// `protocols` matches every protocol and port (ICMP included).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CnpRule {
    /// `name` (for logs and explain; may be empty).
    pub name: String,
    pub action: Action,
    pub peers: Vec<CnpPeer>,
    pub protocols: Vec<CnpPort>,
}

impl CnpRule {
    pub fn peer(mut self, peer: CnpPeer) -> Self {
        self.peers.push(peer);
        self
    }
    pub fn port(mut self, port: CnpPort) -> Self {
        self.protocols.push(port);
        self
    }
    pub fn named(mut self, name: &str) -> Self {
        self.name = name.into();
        self
    }
}

/// A ClusterNetworkPolicy in validated form (see [`crate::convert`] for how
/// an invalid object is reduced so that it never allows more than it says).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterNetworkPolicy {
    pub name: String,
    pub tier: Tier,
    /// 0..=1000; lower is evaluated first within the tier.
    pub priority: u32,
    pub subject: Option<Subject>,
    /// In order: the first rule that matches decides.
    pub ingress: Vec<CnpRule>,
    pub egress: Vec<CnpRule>,
    /// The object had invalid fields and was reduced (fail closed).
    pub invalid: bool,
    /// `netpol.dev/audit: "true"` on the object: its Deny rules are
    /// audit-only (see `compiler::reference`, "Audited policies").
    pub audit: bool,
}

impl ClusterNetworkPolicy {
    /// Whether the policy applies to the pod: a live pod (never a
    /// hostNetwork one) that its subject selects.
    pub fn selects(&self, pod: &Pod, namespace_labels: &Labels) -> bool {
        pod.is_live()
            && self
                .subject
                .as_ref()
                .is_some_and(|s| s.matches(pod, namespace_labels))
    }

    /// The rules of one direction (`DIR_*`).
    pub fn rules(&self, direction: u8) -> &[CnpRule] {
        if direction == netpol_common::DIR_INGRESS {
            &self.ingress
        } else {
            &self.egress
        }
    }

    // Builder-style helpers for fixtures.

    pub fn priority(mut self, priority: u32) -> Self {
        self.priority = priority;
        self
    }
    pub fn subject(mut self, subject: Subject) -> Self {
        self.subject = Some(subject);
        self
    }
    pub fn ingress(mut self, rule: CnpRule) -> Self {
        self.ingress.push(rule);
        self
    }
    pub fn egress(mut self, rule: CnpRule) -> Self {
        self.egress.push(rule);
        self
    }
    /// Sets `netpol.dev/audit: "true"`.
    pub fn audited(mut self) -> Self {
        self.audit = true;
        self
    }
}

fn to_labels<'a>(labels: impl IntoIterator<Item = (&'a str, &'a str)>) -> Labels {
    labels
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect()
}

fn parse_net(cidr: &str) -> IpNet {
    cidr.parse::<IpNet>()
        .unwrap_or_else(|e| panic!("bad CIDR {cidr:?}: {e}"))
        .trunc()
}

/// Fixture builders that read like the spec. Meant for tests and examples:
/// they panic on malformed input.
pub mod build {
    use super::*;
    pub use super::{PodPhase, Protocol};

    /// An empty cluster.
    pub fn cluster() -> Cluster {
        Cluster::default()
    }
    /// A namespace without labels. Like the API server, it carries the
    /// `kubernetes.io/metadata.name` label.
    pub fn namespace(name: &str) -> Namespace {
        Namespace {
            name: name.into(),
            ..Default::default()
        }
        .label("kubernetes.io/metadata.name", name)
    }
    /// A running pod without labels, IPs or node.
    pub fn pod(namespace: &str, name: &str) -> Pod {
        Pod {
            namespace: namespace.into(),
            name: name.into(),
            phase: PodPhase::Running,
            ..Default::default()
        }
    }
    /// A policy that selects every pod of its namespace and has no type yet.
    pub fn policy(namespace: &str, name: &str) -> NetworkPolicy {
        NetworkPolicy {
            namespace: namespace.into(),
            name: name.into(),
            ..Default::default()
        }
    }
    /// The empty selector (matches everything).
    pub fn all() -> LabelSelector {
        LabelSelector::default()
    }
    /// A `matchLabels` selector.
    pub fn labels<'a>(labels: impl IntoIterator<Item = (&'a str, &'a str)>) -> LabelSelector {
        LabelSelector {
            match_labels: to_labels(labels),
            ..Default::default()
        }
    }
    /// A rule that allows everything until peers or ports narrow it.
    pub fn allow() -> Rule {
        Rule::default()
    }
    /// Peer: pods of the policy's namespace selected by `selector`.
    pub fn pods(selector: LabelSelector) -> Peer {
        Peer::Pods {
            namespace_selector: None,
            pod_selector: Some(selector),
        }
    }
    /// Peer: every pod of the namespaces selected by `selector`.
    pub fn namespaces(selector: LabelSelector) -> Peer {
        Peer::Pods {
            namespace_selector: Some(selector),
            pod_selector: None,
        }
    }
    /// Peer: pods selected by `pods` in namespaces selected by `namespaces`
    /// (both in one peer: ANDed).
    pub fn pods_in(namespaces: LabelSelector, pods: LabelSelector) -> Peer {
        Peer::Pods {
            namespace_selector: Some(namespaces),
            pod_selector: Some(pods),
        }
    }
    /// An `ipBlock` (add excepts with [`IpBlock::except`], then wrap it with
    /// [`block`] or use [`ip_block`] directly).
    pub fn cidr(cidr: &str) -> IpBlock {
        IpBlock {
            cidr: parse_net(cidr),
            except: Vec::new(),
        }
    }
    /// Peer: an `ipBlock` without excepts.
    pub fn ip_block(c: &str) -> Peer {
        Peer::IpBlock(cidr(c))
    }
    /// Peer: an `ipBlock`.
    pub fn block(block: IpBlock) -> Peer {
        Peer::IpBlock(block)
    }
    pub fn tcp(port: u16) -> PortSpec {
        port_range(Protocol::Tcp, port, port)
    }
    pub fn udp(port: u16) -> PortSpec {
        port_range(Protocol::Udp, port, port)
    }
    pub fn sctp(port: u16) -> PortSpec {
        port_range(Protocol::Sctp, port, port)
    }
    /// `port` .. `end_port` inclusive.
    pub fn port_range(protocol: Protocol, start: u16, end: u16) -> PortSpec {
        PortSpec {
            protocol,
            port: PortMatch::Range { start, end },
        }
    }
    /// A named port (resolved on the destination pod).
    pub fn named(protocol: Protocol, name: &str) -> PortSpec {
        PortSpec {
            protocol,
            port: PortMatch::Named(name.into()),
        }
    }
    /// Every port of a protocol.
    pub fn any_port(protocol: Protocol) -> PortSpec {
        PortSpec {
            protocol,
            port: PortMatch::All,
        }
    }

    /// A node without labels or addresses.
    pub fn node(name: &str) -> Node {
        Node {
            name: name.into(),
            ..Default::default()
        }
    }
    /// An Admin tier ClusterNetworkPolicy (priority 0, no subject yet).
    pub fn admin(name: &str) -> ClusterNetworkPolicy {
        ClusterNetworkPolicy {
            name: name.into(),
            tier: Tier::Admin,
            ..Default::default()
        }
    }
    /// A Baseline tier ClusterNetworkPolicy (priority 0, no subject yet).
    pub fn baseline(name: &str) -> ClusterNetworkPolicy {
        ClusterNetworkPolicy {
            name: name.into(),
            tier: Tier::Baseline,
            ..Default::default()
        }
    }
    /// Subject: every pod of the namespaces `selector` matches.
    pub fn in_namespaces(selector: LabelSelector) -> Subject {
        Subject::Namespaces(selector)
    }
    /// Subject: pods `pods` in namespaces `namespaces`.
    pub fn pods_of(namespaces: LabelSelector, pods: LabelSelector) -> Subject {
        Subject::Pods {
            namespace_selector: namespaces,
            pod_selector: pods,
        }
    }
    pub fn accept() -> CnpRule {
        rule(Action::Accept)
    }
    pub fn deny() -> CnpRule {
        rule(Action::Deny)
    }
    pub fn pass() -> CnpRule {
        rule(Action::Pass)
    }
    fn rule(action: Action) -> CnpRule {
        CnpRule {
            action,
            ..Default::default()
        }
    }
    /// CNP peer: every pod of the namespaces `selector` matches.
    pub fn peer_namespaces(selector: LabelSelector) -> CnpPeer {
        CnpPeer::Namespaces(selector)
    }
    /// CNP peer: pods `pods` in namespaces `namespaces`.
    pub fn peer_pods(namespaces: LabelSelector, pods: LabelSelector) -> CnpPeer {
        CnpPeer::Pods {
            namespace_selector: namespaces,
            pod_selector: pods,
        }
    }
    /// CNP peer: CIDRs (egress).
    pub fn networks<'a>(cidrs: impl IntoIterator<Item = &'a str>) -> CnpPeer {
        CnpPeer::Networks(cidrs.into_iter().map(parse_net).collect())
    }
    /// CNP peer: nodes (egress).
    pub fn peer_nodes(selector: LabelSelector) -> CnpPeer {
        CnpPeer::Nodes(selector)
    }
    /// CNP protocol entry: one port.
    pub fn dport(protocol: Protocol, port: u16) -> CnpPort {
        CnpPort::Range {
            protocol,
            start: port,
            end: port,
        }
    }
    /// CNP protocol entry: a port range.
    pub fn dports(protocol: Protocol, start: u16, end: u16) -> CnpPort {
        CnpPort::Range {
            protocol,
            start,
            end,
        }
    }
    /// CNP protocol entry: a destination named port.
    pub fn named_dport(name: &str) -> CnpPort {
        CnpPort::Named(name.into())
    }

    /// The tenant cluster of the scale tests and benchmarks: a `monitoring`
    /// namespace with one pod, then `namespaces` namespaces (`ns<i>`, label
    /// `tenant`) of `apps` deployments with `replicas` pods each, spread
    /// over `nodes` nodes (`n<k>`). Every namespace has a default deny, an
    /// allow-from-`app0` rule per app on the named port `http`, an allow from
    /// the monitoring namespace on `metrics`, and egress to every pod and to
    /// an ipBlock with an except on `http` and UDP 53. Pod `i` (in creation
    /// order) is [`tenant_pod`]`(i, app, apps, replicas, nodes)`.
    pub fn tenant_cluster(namespaces_count: u32, apps: u32, replicas: u32, nodes: u32) -> Cluster {
        let mut c = cluster().namespace(namespace("monitoring").label("role", "monitoring"));
        c.upsert_pod(
            pod("monitoring", "prom")
                .labels([("app", "prom")])
                .ip("10.255.255.1")
                .node("n0"),
        );
        for ns in 0..namespaces_count {
            let ns_name = format!("ns{ns}");
            c.upsert_namespace(namespace(&ns_name).label("tenant", &format!("t{}", ns % 10)));
            for app in 0..apps {
                for r in 0..replicas {
                    let i = (ns * apps + app) * replicas + r;
                    c.upsert_pod(tenant_pod(i, app, apps, replicas, nodes));
                }
                let app_name = format!("app{app}");
                c.upsert_policy(
                    policy(&ns_name, &format!("{app_name}-ingress"))
                        .select(labels([("app", app_name.as_str())]))
                        .ingress(
                            allow()
                                .from(pods(labels([("app", "app0")])))
                                .port(named(Protocol::Tcp, "http")),
                        ),
                );
            }
            c.upsert_policy(
                policy(&ns_name, "default-deny")
                    .select(all())
                    .deny_ingress()
                    .deny_egress(),
            );
            c.upsert_policy(
                policy(&ns_name, "allow-monitoring").select(all()).ingress(
                    allow()
                        .from(namespaces(labels([("role", "monitoring")])))
                        .port(named(Protocol::Tcp, "metrics")),
                ),
            );
            c.upsert_policy(
                policy(&ns_name, "egress").select(all()).egress(
                    allow()
                        .to(pods(all()))
                        .to(block(cidr("10.0.0.0/8").except("10.255.0.0/16")))
                        .port(named(Protocol::Tcp, "http"))
                        .port(udp(53)),
                ),
            );
        }
        c
    }

    /// Pod `i` of [`tenant_cluster`], labelled `app<app>` (its own
    /// deployment's app, or another one to relabel it): its name, address
    /// (`10.x.y.z` from `i + 1`), node and named ports follow from `i`.
    pub fn tenant_pod(i: u32, app: u32, apps: u32, replicas: u32, nodes: u32) -> Pod {
        let n = i + 1;
        let ns = i / (apps * replicas);
        let own_app = (i / replicas) % apps;
        let r = i % replicas;
        let app_name = format!("app{app}");
        pod(&format!("ns{ns}"), &format!("app{own_app}-{r}"))
            .labels([("app", app_name.as_str()), ("pod-template-hash", "abc123")])
            .ip(&format!(
                "10.{}.{}.{}",
                n >> 16 & 0xff,
                n >> 8 & 0xff,
                n & 0xff
            ))
            .node(&format!("n{}", n % nodes))
            .named_port("metrics", Protocol::Tcp, 9090)
            .named_port("http", Protocol::Tcp, 8080 + (app % 2) as u16)
    }
}

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;

    #[test]
    fn selector_operators() {
        let l: Labels = [("a".to_string(), "1".to_string())].into();
        assert!(all().matches(&l));
        assert!(all().key_in("a", ["1", "2"]).matches(&l));
        assert!(!all().key_in("b", ["1"]).matches(&l));
        assert!(all().key_not_in("b", ["1"]).matches(&l));
        assert!(!all().key_not_in("a", ["1"]).matches(&l));
        assert!(all().exists("a").does_not_exist("b").matches(&l));
        assert!(!all().exists("b").matches(&l));
        assert!(!labels([("a", "1")]).does_not_exist("a").matches(&l));
    }

    #[test]
    fn liveness() {
        let p = pod("x", "a").ip("10.0.0.1").node("n1");
        assert!(p.is_live());
        assert!(!p.clone().host_network().is_live());
        assert!(!p.clone().phase(PodPhase::Succeeded).is_live());
        assert!(!pod("x", "a").node("n1").is_live());
    }
}
