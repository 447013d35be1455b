//! Kubernetes objects (k8s-openapi) to the [`crate::model`], with the
//! validation the API server does on NetworkPolicy.
//!
//! An invalid policy never opens anything: it is kept with its podSelector
//! and its types and **no rules**, so the pods it selects stay isolated. If
//! its podSelector itself is invalid it selects every pod of its namespace,
//! and unknown policyTypes isolate both directions (fail closed). Every
//! problem is reported, not just the first.

use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::{
    api::{core::v1 as core, networking::v1 as net},
    apimachinery::pkg::{apis::meta::v1 as meta, util::intstr::IntOrString},
};
use thiserror::Error;

use crate::{
    crd,
    model::{
        ANNOTATION_PREFIX, Action, ClusterNetworkPolicy, CnpPeer, CnpPort, CnpRule, ContainerPort,
        IpBlock, LabelSelector, Namespace, NetworkPolicy, Node, Operator, Peer, Pod, PodPhase,
        PortMatch, PortSpec, Protocol, Requirement, Rule, Subject, Tier,
    },
};

/// A problem with one field of one object.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("{kind} {object}: {field}: {problem}")]
pub struct ConvertError {
    /// `NetworkPolicy`, `Pod`, `Namespace`, `Node` or `ClusterNetworkPolicy`.
    pub kind: &'static str,
    /// `namespace/name` (or `name` for a namespace).
    pub object: String,
    /// Field path, e.g. `spec.ingress[0].from[1].ipBlock.except[0]`.
    pub field: String,
    pub problem: Problem,
}

/// What is wrong with a field.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum Problem {
    #[error("required value")]
    Missing,
    #[error("{value:?} is not a valid CIDR")]
    BadCidr { value: String },
    #[error("{except} is not inside cidr {cidr}")]
    ExceptNotInside { except: String, cidr: String },
    #[error("{value:?} is not a valid IP address")]
    BadIp { value: String },
    #[error("unknown operator {operator:?} (want In, NotIn, Exists or DoesNotExist)")]
    UnknownOperator { operator: String },
    #[error("operator {operator} needs at least one value")]
    EmptyValues { operator: String },
    #[error("operator {operator} takes no values")]
    UnexpectedValues { operator: String },
    #[error("port {port} is outside 1-65535")]
    PortOutOfRange { port: i64 },
    #[error("endPort {end_port} is less than port {port}")]
    EndPortBeforePort { port: i32, end_port: i32 },
    #[error("endPort may not be used with a named port")]
    EndPortWithNamedPort,
    #[error("endPort may not be used without port")]
    EndPortWithoutPort,
    #[error("{value:?} is not a valid port name (IANA_SVC_NAME)")]
    BadPortName { value: String },
    #[error("unknown protocol {protocol:?} (want TCP, UDP or SCTP)")]
    UnknownProtocol { protocol: String },
    #[error("unknown policy type {value:?} (want Ingress or Egress)")]
    UnknownPolicyType { value: String },
    #[error("must specify a peer (podSelector, namespaceSelector or ipBlock)")]
    EmptyPeer,
    #[error("ipBlock may not be combined with podSelector or namespaceSelector")]
    IpBlockWithSelector,
    #[error("unknown tier {value:?} (want Admin or Baseline)")]
    UnknownTier { value: String },
    #[error("priority {value} is outside 0-1000")]
    PriorityOutOfRange { value: i64 },
    #[error("unknown action {value:?} (want Accept, Deny or Pass)")]
    UnknownAction { value: String },
    #[error("must have at least one entry")]
    EmptyList,
    #[error("{value:?} is not \"true\" or \"false\" (the policy is enforced)")]
    BadAuditValue { value: String },
    #[error("exactly one of {allowed} must be set, found {found}")]
    NotExactlyOne { allowed: String, found: String },
    #[error(
        "unknown field(s) {fields} (a newer CRD?): the rule fails closed (an Accept rule matches nothing, Deny and Pass deny everything)"
    )]
    UnknownFields { fields: String },
    #[error(
        "{field} is not allowed in an ingress peer: the rule fails closed (an Accept rule matches nothing, Deny and Pass deny everything)"
    )]
    NotAnIngressPeer { field: String },
    #[error(
        "domainNames peers are not implemented by netpol: the rule fails closed (an Accept rule matches nothing, Deny and Pass deny everything)"
    )]
    DomainNamesNotImplemented,
    #[error(
        "no field set: a peer of a newer CRD version whose field the API server pruned? The rule fails closed (an Accept rule matches nothing, Deny and Pass deny everything)"
    )]
    EmptyCnpPeer,
    #[error("range start {start} must be less than end {end}")]
    RangeNotIncreasing { start: i64, end: i64 },
    #[error("destinationNamedPort cannot be used with networks or nodes peers")]
    NamedPortWithoutPods,
}

/// A converted object and the problems found on the way (for a policy: if
/// there are any, the policy was reduced to its isolation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Converted<T> {
    pub value: T,
    pub errors: Vec<ConvertError>,
}

/// Collects the problems of one object.
struct Ctx {
    kind: &'static str,
    object: String,
    errors: Vec<ConvertError>,
}

impl Ctx {
    fn error(&mut self, field: impl Into<String>, problem: Problem) {
        self.errors.push(ConvertError {
            kind: self.kind,
            object: self.object.clone(),
            field: field.into(),
            problem,
        });
    }
}

fn names(
    kind: &'static str,
    meta: &meta::ObjectMeta,
    namespaced: bool,
) -> Result<(String, String), ConvertError> {
    let missing = |field: &str, object: String| ConvertError {
        kind,
        object,
        field: field.into(),
        problem: Problem::Missing,
    };
    let name = meta
        .name
        .clone()
        .ok_or_else(|| missing("metadata.name", "?".into()))?;
    let namespace = if namespaced {
        meta.namespace
            .clone()
            .ok_or_else(|| missing("metadata.namespace", name.clone()))?
    } else {
        String::new()
    };
    Ok((namespace, name))
}

/// A namespace: labels and the `netpol.dev/` annotations.
pub fn namespace(ns: &core::Namespace) -> Result<Namespace, ConvertError> {
    let (_, name) = names("Namespace", &ns.metadata, false)?;
    Ok(Namespace {
        name,
        labels: ns.metadata.labels.clone().unwrap_or_default(),
        annotations: ns
            .metadata
            .annotations
            .iter()
            .flatten()
            .filter(|(k, _)| k.starts_with(ANNOTATION_PREFIX))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    })
}

/// A pod. Malformed IPs and container ports are left out and reported.
pub fn pod(p: &core::Pod) -> Result<Converted<Pod>, ConvertError> {
    let (namespace, name) = names("Pod", &p.metadata, true)?;
    let mut cx = Ctx {
        kind: "Pod",
        object: format!("{namespace}/{name}"),
        errors: Vec::new(),
    };
    let spec = p.spec.as_ref();
    let status = p.status.as_ref();
    let phase = match status.and_then(|s| s.phase.as_deref()) {
        None | Some("Pending") => PodPhase::Pending,
        Some("Running") => PodPhase::Running,
        Some("Succeeded") => PodPhase::Succeeded,
        Some("Failed") => PodPhase::Failed,
        Some(_) => PodPhase::Unknown,
    };
    let mut ips = Vec::new();
    let listed: Vec<(String, &str)> = match status.and_then(|s| s.pod_ips.as_ref()) {
        Some(list) if !list.is_empty() => list
            .iter()
            .enumerate()
            .map(|(i, ip)| (format!("status.podIPs[{i}].ip"), ip.ip.as_str()))
            .collect(),
        _ => status
            .and_then(|s| s.pod_ip.as_deref())
            .map(|ip| vec![("status.podIP".to_string(), ip)])
            .unwrap_or_default(),
    };
    for (field, value) in listed {
        match value.parse::<IpAddr>() {
            Ok(ip) if !ips.contains(&ip) => ips.push(ip),
            Ok(_) => {}
            Err(_) => cx.error(
                field,
                Problem::BadIp {
                    value: value.into(),
                },
            ),
        }
    }
    let mut ports = Vec::new();
    if let Some(spec) = spec {
        let containers = spec
            .containers
            .iter()
            .enumerate()
            .map(|(i, c)| (format!("spec.containers[{i}]"), c));
        // Restartable init containers (sidecars) serve ports too.
        let sidecars = spec
            .init_containers
            .iter()
            .flatten()
            .enumerate()
            .filter(|(_, c)| c.restart_policy.as_deref() == Some("Always"))
            .map(|(i, c)| (format!("spec.initContainers[{i}]"), c));
        for (path, c) in containers.chain(sidecars) {
            for (j, cp) in c.ports.iter().flatten().enumerate() {
                let field = format!("{path}.ports[{j}]");
                let Some(port) = port_number(
                    &mut cx,
                    &format!("{field}.containerPort"),
                    cp.container_port,
                ) else {
                    continue;
                };
                let Some(protocol) = protocol(
                    &mut cx,
                    &format!("{field}.protocol"),
                    cp.protocol.as_deref(),
                ) else {
                    continue;
                };
                ports.push(ContainerPort {
                    name: cp.name.clone(),
                    port,
                    protocol,
                });
            }
        }
    }
    Ok(Converted {
        value: Pod {
            namespace,
            name,
            node: spec.and_then(|s| s.node_name.clone()),
            labels: p.metadata.labels.clone().unwrap_or_default(),
            ips,
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            phase,
            ports,
        },
        errors: cx.errors,
    })
}

/// A NetworkPolicy, validated. With errors, the result keeps only its
/// isolation (see the module docs).
pub fn network_policy(np: &net::NetworkPolicy) -> Result<Converted<NetworkPolicy>, ConvertError> {
    let (namespace, name) = names("NetworkPolicy", &np.metadata, true)?;
    let mut cx = Ctx {
        kind: "NetworkPolicy",
        object: format!("{namespace}/{name}"),
        errors: Vec::new(),
    };
    let default_spec = net::NetworkPolicySpec::default();
    let spec = np.spec.as_ref().unwrap_or(&default_spec);

    let pod_selector = match &spec.pod_selector {
        None => Some(LabelSelector::default()),
        Some(s) => selector(&mut cx, "spec.podSelector", s),
    };

    // policyTypes: absent (or empty) -> Ingress, plus Egress iff there are
    // egress rules. Unknown values isolate both directions.
    let has_egress_rules = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
    let (mut ingress_type, mut egress_type) = (true, has_egress_rules);
    if let Some(types) = spec.policy_types.as_ref().filter(|t| !t.is_empty()) {
        (ingress_type, egress_type) = (false, false);
        let mut unknown = false;
        for (i, t) in types.iter().enumerate() {
            match t.as_str() {
                "Ingress" => ingress_type = true,
                "Egress" => egress_type = true,
                other => {
                    unknown = true;
                    cx.error(
                        format!("spec.policyTypes[{i}]"),
                        Problem::UnknownPolicyType {
                            value: other.into(),
                        },
                    );
                }
            }
        }
        if unknown {
            (ingress_type, egress_type) = (true, true);
        }
    }

    let ingress: Vec<Rule> = spec
        .ingress
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| {
            rule(
                &mut cx,
                &format!("spec.ingress[{i}]"),
                "from",
                r.from.as_deref(),
                r.ports.as_deref(),
            )
        })
        .collect();
    let egress: Vec<Rule> = spec
        .egress
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| {
            rule(
                &mut cx,
                &format!("spec.egress[{i}]"),
                "to",
                r.to.as_deref(),
                r.ports.as_deref(),
            )
        })
        .collect();

    let invalid = !cx.errors.is_empty();
    let keep = |on: bool, rules: Vec<Rule>| on.then(|| if invalid { Vec::new() } else { rules });
    Ok(Converted {
        value: NetworkPolicy {
            namespace,
            name,
            // An invalid podSelector selects the whole namespace (fail closed).
            pod_selector: pod_selector.unwrap_or_default(),
            ingress: keep(ingress_type, ingress),
            egress: keep(egress_type, egress),
            invalid,
        },
        errors: cx.errors,
    })
}

/// A node: labels and the addresses of `status.addresses` that are IPs
/// (`Hostname` and `InternalDNS` entries are names, skipped).
pub fn node(n: &core::Node) -> Result<Converted<Node>, ConvertError> {
    let (_, name) = names("Node", &n.metadata, false)?;
    let mut cx = Ctx {
        kind: "Node",
        object: name.clone(),
        errors: Vec::new(),
    };
    let mut addresses = Vec::new();
    let listed = n
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .enumerate();
    for (i, a) in listed {
        if !matches!(a.type_.as_str(), "InternalIP" | "ExternalIP") {
            continue;
        }
        match a.address.parse::<IpAddr>() {
            Ok(ip) if !addresses.contains(&ip) => addresses.push(ip),
            Ok(_) => {}
            Err(_) => cx.error(
                format!("status.addresses[{i}].address"),
                Problem::BadIp {
                    value: a.address.clone(),
                },
            ),
        }
    }
    Ok(Converted {
        value: Node {
            name,
            labels: n.metadata.labels.clone().unwrap_or_default(),
            addresses,
        },
        errors: cx.errors,
    })
}

/// A ClusterNetworkPolicy, validated. Problems are reported per field, and
/// the result never allows more than any reading of the object would:
///
/// * A rule with an invalid or unknown field (a peer from a newer CRD, a
///   `domainNames` peer, a bad selector, CIDR or port) fails closed the way
///   upstream defines it for unknown peers: an Accept rule matches nothing,
///   a Deny or Pass rule (or one with an unknown action) denies everything.
/// * An invalid tier, priority or subject makes the policy an Admin policy
///   of priority 0 (if the tier or priority is what is wrong) that selects
///   every pod (if the subject is what is wrong), with its Accept rules
///   matching nothing and its Pass rules turned into Deny: Accept is the most
///   permissive verdict and Deny the least, so the reduced policy is never
///   weaker than the object meant.
pub fn cluster_network_policy(
    cnp: &crd::ClusterNetworkPolicy,
) -> Result<Converted<ClusterNetworkPolicy>, ConvertError> {
    let (_, name) = names("ClusterNetworkPolicy", &cnp.metadata, false)?;
    let mut cx = Ctx {
        kind: "ClusterNetworkPolicy",
        object: name.clone(),
        errors: Vec::new(),
    };
    let default_spec = crd::Spec::default();
    let spec = match &cnp.spec {
        Some(spec) => spec,
        None => {
            cx.error("spec", Problem::Missing);
            &default_spec
        }
    };
    let mut policy_errors = false;
    let tier = match spec.tier.as_deref() {
        Some("Admin") => Tier::Admin,
        Some("Baseline") => Tier::Baseline,
        other => {
            policy_errors = true;
            match other {
                None => cx.error("spec.tier", Problem::Missing),
                Some(v) => cx.error("spec.tier", Problem::UnknownTier { value: v.into() }),
            }
            Tier::Admin
        }
    };
    let priority = match spec.priority {
        Some(p) if (0..=1000).contains(&p) => p as u32,
        other => {
            policy_errors = true;
            match other {
                None => cx.error("spec.priority", Problem::Missing),
                Some(v) => cx.error("spec.priority", Problem::PriorityOutOfRange { value: v }),
            }
            0
        }
    };
    let subject = match subject(&mut cx, spec.subject.as_ref()) {
        Some(s) => s,
        None => {
            policy_errors = true;
            Subject::Namespaces(LabelSelector::default())
        }
    };
    let ingress_rules = spec.ingress.as_deref().unwrap_or_default();
    let ingress: Vec<CnpRule> = ingress_rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            cnp_rule(
                &mut cx,
                &format!("spec.ingress[{i}]"),
                RuleParts {
                    name: r.name.as_deref(),
                    action: r.action.as_deref(),
                    peers_field: "from",
                    peers: r.from.as_deref(),
                    protocols: r.protocols.as_deref(),
                    ingress: true,
                },
            )
        })
        .collect();
    let egress: Vec<CnpRule> = spec
        .egress
        .as_deref()
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, r)| {
            cnp_rule(
                &mut cx,
                &format!("spec.egress[{i}]"),
                RuleParts {
                    name: r.name.as_deref(),
                    action: r.action.as_deref(),
                    peers_field: "to",
                    peers: r.to.as_deref(),
                    protocols: r.protocols.as_deref(),
                    ingress: false,
                },
            )
        })
        .collect();
    let reduce = |rules: Vec<CnpRule>| -> Vec<CnpRule> {
        if !policy_errors {
            return rules;
        }
        rules
            .into_iter()
            .map(|mut r| {
                match r.action {
                    Action::Accept => r.peers.clear(),
                    Action::Pass => r.action = Action::Deny,
                    Action::Deny => {}
                }
                r
            })
            .collect()
    };
    let invalid = !cx.errors.is_empty();
    // `netpol.dev/audit`: "true" makes the Deny rules audit-only; any other
    // value than "false" is reported and enforces (the stricter reading).
    // Not a spec error: the policy itself is not reduced. An invalid policy
    // is never audited: its fail-closed reduction (Deny rules among it) is
    // enforced in full.
    let audit = !invalid
        && match cnp
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(crate::model::AUDIT_ANNOTATION))
            .map(String::as_str)
        {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => {
                cx.error(
                    format!("metadata.annotations[{}]", crate::model::AUDIT_ANNOTATION),
                    Problem::BadAuditValue {
                        value: other.to_owned(),
                    },
                );
                false
            }
        };
    Ok(Converted {
        value: ClusterNetworkPolicy {
            name,
            tier,
            priority,
            subject: Some(subject),
            ingress: reduce(ingress),
            egress: reduce(egress),
            invalid,
            audit,
        },
        errors: cx.errors,
    })
}

/// `spec.subject`; `None` (reported) when missing or invalid.
fn subject(cx: &mut Ctx, s: Option<&crd::Subject>) -> Option<Subject> {
    let Some(s) = s else {
        cx.error("spec.subject", Problem::Missing);
        return None;
    };
    let mut found: Vec<String> = Vec::new();
    if s.namespaces.is_some() {
        found.push("namespaces".into());
    }
    if s.pods.is_some() {
        found.push("pods".into());
    }
    found.extend(s.other.keys().cloned());
    if !s.other.is_empty() {
        cx.error(
            "spec.subject",
            Problem::UnknownFields {
                fields: s.other.keys().cloned().collect::<Vec<_>>().join(", "),
            },
        );
        return None;
    }
    match (&s.namespaces, &s.pods) {
        (Some(ns), None) => selector(cx, "spec.subject.namespaces", ns).map(Subject::Namespaces),
        (None, Some(p)) => {
            let (namespace_selector, pod_selector) = namespaced_pod(cx, "spec.subject.pods", p)?;
            Some(Subject::Pods {
                namespace_selector,
                pod_selector,
            })
        }
        _ => {
            cx.error(
                "spec.subject",
                Problem::NotExactlyOne {
                    allowed: "namespaces, pods".into(),
                    found: found_list(&found),
                },
            );
            None
        }
    }
}

fn found_list(found: &[String]) -> String {
    if found.is_empty() {
        "none".into()
    } else {
        found.join(", ")
    }
}

/// `{namespaceSelector, podSelector}`: podSelector is required (empty
/// selects every pod), namespaceSelector optional (absent or empty selects
/// every namespace).
fn namespaced_pod(
    cx: &mut Ctx,
    path: &str,
    p: &crd::NamespacedPod,
) -> Option<(LabelSelector, LabelSelector)> {
    let ns = match &p.namespace_selector {
        None => Some(LabelSelector::default()),
        Some(s) => selector(cx, &format!("{path}.namespaceSelector"), s),
    };
    let pods = match &p.pod_selector {
        None => {
            cx.error(format!("{path}.podSelector"), Problem::Missing);
            None
        }
        Some(s) => selector(cx, &format!("{path}.podSelector"), s),
    };
    Some((ns?, pods?))
}

/// The parts of an ingress or egress CNP rule.
struct RuleParts<'a> {
    name: Option<&'a str>,
    action: Option<&'a str>,
    peers_field: &'a str,
    peers: Option<&'a [crd::Peer]>,
    protocols: Option<&'a [crd::ProtocolEntry]>,
    ingress: bool,
}

fn cnp_rule(cx: &mut Ctx, path: &str, r: RuleParts<'_>) -> CnpRule {
    let before = cx.errors.len();
    let name = r.name.unwrap_or_default().to_string();
    let action = match r.action {
        Some("Accept") => Some(Action::Accept),
        Some("Deny") => Some(Action::Deny),
        Some("Pass") => Some(Action::Pass),
        None => {
            cx.error(format!("{path}.action"), Problem::Missing);
            None
        }
        Some(other) => {
            cx.error(
                format!("{path}.action"),
                Problem::UnknownAction {
                    value: other.into(),
                },
            );
            None
        }
    };
    let peers_path = format!("{path}.{}", r.peers_field);
    let mut peers = Vec::new();
    match r.peers {
        None => cx.error(&peers_path, Problem::Missing),
        Some([]) => cx.error(&peers_path, Problem::EmptyList),
        Some(list) => {
            for (j, p) in list.iter().enumerate() {
                if let Some(peer) = cnp_peer(cx, &format!("{peers_path}[{j}]"), p, r.ingress) {
                    peers.push(peer);
                }
            }
        }
    }
    let mut protocols = Vec::new();
    if let Some(list) = r.protocols {
        if list.is_empty() {
            cx.error(format!("{path}.protocols"), Problem::EmptyList);
        }
        for (k, e) in list.iter().enumerate() {
            if let Some(port) = cnp_port(cx, &format!("{path}.protocols[{k}]"), e) {
                protocols.push(port);
            }
        }
    }
    let named = protocols.iter().any(|p| matches!(p, CnpPort::Named(_)));
    let non_pod = peers
        .iter()
        .any(|p| matches!(p, CnpPeer::Networks(_) | CnpPeer::Nodes(_)));
    if named && non_pod {
        cx.error(format!("{path}.protocols"), Problem::NamedPortWithoutPods);
    }
    let rule = CnpRule {
        name,
        action: action.unwrap_or(Action::Deny),
        peers,
        protocols,
    };
    if cx.errors.len() == before {
        return rule;
    }
    // Fail closed (upstream's definition for unknown peers).
    match action {
        Some(Action::Accept) => CnpRule {
            peers: Vec::new(),
            ..rule
        },
        _ => CnpRule {
            action: Action::Deny,
            peers: vec![CnpPeer::Everything],
            protocols: Vec::new(),
            ..rule
        },
    }
}

fn cnp_peer(cx: &mut Ctx, path: &str, p: &crd::Peer, ingress: bool) -> Option<CnpPeer> {
    let mut found: Vec<&str> = Vec::new();
    if p.namespaces.is_some() {
        found.push("namespaces");
    }
    if p.pods.is_some() {
        found.push("pods");
    }
    if p.nodes.is_some() {
        found.push("nodes");
    }
    if p.networks.is_some() {
        found.push("networks");
    }
    if p.domain_names.is_some() {
        found.push("domainNames");
    }
    if !p.other.is_empty() {
        cx.error(
            path,
            Problem::UnknownFields {
                fields: p.other.keys().cloned().collect::<Vec<_>>().join(", "),
            },
        );
        return None;
    }
    if found.is_empty() {
        // Upstream: "If an implementation sees no fields are set then it can infer that the
        // deployed CRD is of an incompatible version with an unknown field" (the API server
        // prunes fields its CRD does not know, e.g. `nodes` under the standard channel).
        cx.error(path, Problem::EmptyCnpPeer);
        return None;
    }
    if found.len() != 1 {
        cx.error(
            path,
            Problem::NotExactlyOne {
                allowed: if ingress {
                    "namespaces, pods".into()
                } else {
                    "namespaces, pods, nodes, networks, domainNames".into()
                },
                found: found_list(&found.iter().map(|s| s.to_string()).collect::<Vec<_>>()),
            },
        );
        return None;
    }
    if ingress && !matches!(found[0], "namespaces" | "pods") {
        cx.error(
            format!("{path}.{}", found[0]),
            Problem::NotAnIngressPeer {
                field: found[0].into(),
            },
        );
        return None;
    }
    if let Some(ns) = &p.namespaces {
        return selector(cx, &format!("{path}.namespaces"), ns).map(CnpPeer::Namespaces);
    }
    if let Some(pods) = &p.pods {
        let (namespace_selector, pod_selector) = namespaced_pod(cx, &format!("{path}.pods"), pods)?;
        return Some(CnpPeer::Pods {
            namespace_selector,
            pod_selector,
        });
    }
    if let Some(nodes) = &p.nodes {
        return selector(cx, &format!("{path}.nodes"), nodes).map(CnpPeer::Nodes);
    }
    if let Some(networks) = &p.networks {
        let field = format!("{path}.networks");
        if networks.is_empty() {
            cx.error(field, Problem::EmptyList);
            return None;
        }
        let before = cx.errors.len();
        let mut nets = Vec::new();
        for (i, n) in networks.iter().enumerate() {
            match n.parse::<IpNet>() {
                Ok(net) => nets.push(net.trunc()),
                Err(_) => cx.error(
                    format!("{field}[{i}]"),
                    Problem::BadCidr { value: n.clone() },
                ),
            }
        }
        nets.sort();
        nets.dedup();
        return (cx.errors.len() == before).then_some(CnpPeer::Networks(nets));
    }
    cx.error(
        format!("{path}.domainNames"),
        Problem::DomainNamesNotImplemented,
    );
    None
}

fn cnp_port(cx: &mut Ctx, path: &str, e: &crd::ProtocolEntry) -> Option<CnpPort> {
    let mut found: Vec<String> = Vec::new();
    for (set, name) in [
        (e.tcp.is_some(), "tcp"),
        (e.udp.is_some(), "udp"),
        (e.sctp.is_some(), "sctp"),
        (e.destination_named_port.is_some(), "destinationNamedPort"),
    ] {
        if set {
            found.push(name.into());
        }
    }
    if !e.other.is_empty() {
        cx.error(
            path,
            Problem::UnknownFields {
                fields: e.other.keys().cloned().collect::<Vec<_>>().join(", "),
            },
        );
        return None;
    }
    if found.len() != 1 {
        cx.error(
            path,
            Problem::NotExactlyOne {
                allowed: "tcp, udp, sctp, destinationNamedPort".into(),
                found: found_list(&found),
            },
        );
        return None;
    }
    if let Some(name) = &e.destination_named_port {
        if !valid_port_name(name) {
            cx.error(
                format!("{path}.destinationNamedPort"),
                Problem::BadPortName {
                    value: name.clone(),
                },
            );
            return None;
        }
        return Some(CnpPort::Named(name.clone()));
    }
    let (protocol, ports, field) = match (&e.tcp, &e.udp, &e.sctp) {
        (Some(p), _, _) => (Protocol::Tcp, p, "tcp"),
        (_, Some(p), _) => (Protocol::Udp, p, "udp"),
        (_, _, Some(p)) => (Protocol::Sctp, p, "sctp"),
        _ => unreachable!("exactly one protocol field is set"),
    };
    let path = format!("{path}.{field}");
    if !ports.other.is_empty() {
        cx.error(
            &path,
            Problem::UnknownFields {
                fields: ports.other.keys().cloned().collect::<Vec<_>>().join(", "),
            },
        );
        return None;
    }
    let Some(port) = &ports.destination_port else {
        cx.error(format!("{path}.destinationPort"), Problem::Missing);
        return None;
    };
    let path = format!("{path}.destinationPort");
    let number = |cx: &mut Ctx, field: String, n: Option<i64>| -> Option<u16> {
        match n {
            None => {
                cx.error(field, Problem::Missing);
                None
            }
            Some(n) => match u16::try_from(n) {
                Ok(p) if p >= 1 => Some(p),
                _ => {
                    cx.error(field, Problem::PortOutOfRange { port: n });
                    None
                }
            },
        }
    };
    match (port.number, &port.range) {
        (Some(n), None) => {
            let p = number(cx, format!("{path}.number"), Some(n))?;
            Some(CnpPort::Range {
                protocol,
                start: p,
                end: p,
            })
        }
        (None, Some(r)) => {
            let start = number(cx, format!("{path}.range.start"), r.start);
            let end = number(cx, format!("{path}.range.end"), r.end);
            let (start, end) = start.zip(end)?;
            if start >= end {
                cx.error(
                    format!("{path}.range"),
                    Problem::RangeNotIncreasing {
                        start: start.into(),
                        end: end.into(),
                    },
                );
                return None;
            }
            Some(CnpPort::Range {
                protocol,
                start,
                end,
            })
        }
        (n, r) => {
            let mut found = Vec::new();
            if n.is_some() {
                found.push("number".to_string());
            }
            if r.is_some() {
                found.push("range".to_string());
            }
            cx.error(
                path,
                Problem::NotExactlyOne {
                    allowed: "number, range".into(),
                    found: found_list(&found),
                },
            );
            None
        }
    }
}

fn rule(
    cx: &mut Ctx,
    path: &str,
    peers_field: &str,
    peers: Option<&[net::NetworkPolicyPeer]>,
    ports: Option<&[net::NetworkPolicyPort]>,
) -> Rule {
    let peers = peers
        .unwrap_or_default()
        .iter()
        .enumerate()
        .filter_map(|(j, p)| peer(cx, &format!("{path}.{peers_field}[{j}]"), p))
        .collect();
    let ports = ports
        .unwrap_or_default()
        .iter()
        .enumerate()
        .filter_map(|(k, p)| port(cx, &format!("{path}.ports[{k}]"), p))
        .collect();
    Rule { peers, ports }
}

fn peer(cx: &mut Ctx, path: &str, p: &net::NetworkPolicyPeer) -> Option<Peer> {
    match (&p.ip_block, &p.namespace_selector, &p.pod_selector) {
        (None, None, None) => {
            cx.error(path, Problem::EmptyPeer);
            None
        }
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            cx.error(path, Problem::IpBlockWithSelector);
            None
        }
        (Some(b), None, None) => ip_block(cx, &format!("{path}.ipBlock"), b).map(Peer::IpBlock),
        (None, ns, pods) => {
            let namespace_selector = ns
                .as_ref()
                .map(|s| selector(cx, &format!("{path}.namespaceSelector"), s));
            let pod_selector = pods
                .as_ref()
                .map(|s| selector(cx, &format!("{path}.podSelector"), s));
            Some(Peer::Pods {
                namespace_selector: namespace_selector.map(Option::unwrap_or_default),
                pod_selector: pod_selector.map(Option::unwrap_or_default),
            })
        }
    }
}

fn ip_block(cx: &mut Ctx, path: &str, b: &net::IPBlock) -> Option<IpBlock> {
    let Ok(cidr) = b.cidr.parse::<IpNet>() else {
        cx.error(
            format!("{path}.cidr"),
            Problem::BadCidr {
                value: b.cidr.clone(),
            },
        );
        return None;
    };
    let cidr = cidr.trunc();
    let mut except = Vec::new();
    for (i, e) in b.except.iter().flatten().enumerate() {
        let field = format!("{path}.except[{i}]");
        match e.parse::<IpNet>() {
            Err(_) => cx.error(field, Problem::BadCidr { value: e.clone() }),
            Ok(n) if cidr.contains(&n) && n.prefix_len() > cidr.prefix_len() => {
                except.push(n.trunc())
            }
            Ok(_) => cx.error(
                field,
                Problem::ExceptNotInside {
                    except: e.clone(),
                    cidr: b.cidr.clone(),
                },
            ),
        }
    }
    except.sort();
    except.dedup();
    Some(IpBlock { cidr, except })
}

fn port(cx: &mut Ctx, path: &str, p: &net::NetworkPolicyPort) -> Option<PortSpec> {
    let protocol = protocol(cx, &format!("{path}.protocol"), p.protocol.as_deref());
    let port = match (&p.port, p.end_port) {
        (None, None) => Some(PortMatch::All),
        (None, Some(_)) => {
            cx.error(format!("{path}.endPort"), Problem::EndPortWithoutPort);
            None
        }
        (Some(IntOrString::String(name)), end) => {
            if end.is_some() {
                cx.error(format!("{path}.endPort"), Problem::EndPortWithNamedPort);
            }
            if valid_port_name(name) {
                Some(PortMatch::Named(name.clone()))
            } else {
                cx.error(
                    format!("{path}.port"),
                    Problem::BadPortName {
                        value: name.clone(),
                    },
                );
                None
            }
        }
        (Some(IntOrString::Int(n)), end) => {
            let start = port_number(cx, &format!("{path}.port"), *n);
            let end = match end {
                None => start,
                Some(e) => {
                    let end = port_number(cx, &format!("{path}.endPort"), e);
                    if e < *n {
                        cx.error(
                            format!("{path}.endPort"),
                            Problem::EndPortBeforePort {
                                port: *n,
                                end_port: e,
                            },
                        );
                        None
                    } else {
                        end
                    }
                }
            };
            start
                .zip(end)
                .map(|(start, end)| PortMatch::Range { start, end })
        }
    };
    Some(PortSpec {
        protocol: protocol?,
        port: port?,
    })
}

fn port_number(cx: &mut Ctx, field: &str, n: i32) -> Option<u16> {
    match u16::try_from(n) {
        Ok(p) if p >= 1 => Some(p),
        _ => {
            cx.error(field, Problem::PortOutOfRange { port: n.into() });
            None
        }
    }
}

fn protocol(cx: &mut Ctx, field: &str, p: Option<&str>) -> Option<Protocol> {
    match p {
        None => Some(Protocol::Tcp),
        Some(s) => Protocol::parse(s).or_else(|| {
            cx.error(field, Problem::UnknownProtocol { protocol: s.into() });
            None
        }),
    }
}

/// IANA_SVC_NAME: 1-15 lowercase letters, digits and '-', at least one
/// letter, no leading, trailing or doubled '-'.
fn valid_port_name(s: &str) -> bool {
    (1..=15).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

/// A label selector; `None` (with errors reported) when invalid.
fn selector(cx: &mut Ctx, path: &str, s: &meta::LabelSelector) -> Option<LabelSelector> {
    let before = cx.errors.len();
    let mut match_expressions = Vec::new();
    for (i, r) in s.match_expressions.iter().flatten().enumerate() {
        let values = r.values.clone().unwrap_or_default();
        let field = format!("{path}.matchExpressions[{i}]");
        let operator = match r.operator.as_str() {
            op @ ("In" | "NotIn") => {
                if values.is_empty() {
                    cx.error(
                        format!("{field}.values"),
                        Problem::EmptyValues {
                            operator: op.into(),
                        },
                    );
                    continue;
                }
                let set = values.into_iter().collect();
                if op == "In" {
                    Operator::In(set)
                } else {
                    Operator::NotIn(set)
                }
            }
            op @ ("Exists" | "DoesNotExist") => {
                if !values.is_empty() {
                    cx.error(
                        format!("{field}.values"),
                        Problem::UnexpectedValues {
                            operator: op.into(),
                        },
                    );
                    continue;
                }
                if op == "Exists" {
                    Operator::Exists
                } else {
                    Operator::DoesNotExist
                }
            }
            other => {
                cx.error(
                    format!("{field}.operator"),
                    Problem::UnknownOperator {
                        operator: other.into(),
                    },
                );
                continue;
            }
        };
        match_expressions.push(Requirement {
            key: r.key.clone(),
            operator,
        });
    }
    (cx.errors.len() == before).then(|| LabelSelector {
        match_labels: s.match_labels.clone().unwrap_or_default(),
        match_expressions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_names() {
        for ok in ["http", "h2c", "web-8080", "a"] {
            assert!(valid_port_name(ok), "{ok}");
        }
        for bad in [
            "",
            "80",
            "-http",
            "http-",
            "we--b",
            "HTTP",
            "a-very-long-port-name",
        ] {
            assert!(!valid_port_name(bad), "{bad}");
        }
    }
}

#[cfg(test)]
mod cnp_tests {
    use serde_json::json;

    use super::*;
    use crate::model::build::*;

    fn cnp(spec: serde_json::Value) -> Converted<ClusterNetworkPolicy> {
        let obj: crd::ClusterNetworkPolicy = serde_json::from_value(json!({
            "apiVersion": "policy.networking.k8s.io/v1alpha2",
            "kind": "ClusterNetworkPolicy",
            "metadata": {"name": "p"},
            "spec": spec,
        }))
        .expect("parses");
        cluster_network_policy(&obj).expect("has a name")
    }

    fn fields(c: &Converted<ClusterNetworkPolicy>) -> Vec<String> {
        c.errors.iter().map(|e| e.field.clone()).collect()
    }

    fn annotated(audit: &str, spec: serde_json::Value) -> Converted<ClusterNetworkPolicy> {
        let obj: crd::ClusterNetworkPolicy = serde_json::from_value(json!({
            "apiVersion": "policy.networking.k8s.io/v1alpha2",
            "kind": "ClusterNetworkPolicy",
            "metadata": {"name": "p", "annotations": {"netpol.dev/audit": audit}},
            "spec": spec,
        }))
        .expect("parses");
        cluster_network_policy(&obj).expect("has a name")
    }

    #[test]
    fn the_audit_annotation_marks_a_valid_policy_only() {
        let spec = json!({
            "tier": "Admin", "priority": 1,
            "subject": {"namespaces": {}},
            "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}],
        });
        assert!(!cnp(spec.clone()).value.audit);
        let c = annotated("true", spec.clone());
        assert!(c.errors.is_empty() && c.value.audit, "{:?}", c.errors);
        let c = annotated("false", spec.clone());
        assert!(c.errors.is_empty() && !c.value.audit, "{:?}", c.errors);
        // Anything else: reported, naming the field, and enforced.
        let c = annotated("yes", spec.clone());
        assert!(!c.value.audit && !c.value.invalid);
        assert_eq!(fields(&c), ["metadata.annotations[netpol.dev/audit]"]);
        assert!(
            c.errors[0].to_string().contains("\"yes\""),
            "{}",
            c.errors[0]
        );
        // An invalid policy's fail-closed reduction is never audited.
        let mut broken = spec;
        broken["tier"] = json!("Middle");
        let c = annotated("true", broken);
        assert!(c.value.invalid && !c.value.audit);
    }

    #[test]
    fn a_valid_policy_converts_without_errors() {
        let c = cnp(json!({
            "tier": "Admin", "priority": 10,
            "subject": {"namespaces": {"matchLabels": {"team": "a"}}},
            "ingress": [{"name": "deny-b", "action": "Deny",
                "from": [{"namespaces": {"matchLabels": {"team": "b"}}}],
                "protocols": [{"tcp": {"destinationPort": {"number": 80}}},
                              {"udp": {"destinationPort": {"range": {"start": 53, "end": 60}}}},
                              {"destinationNamedPort": "web"}]}],
            "egress": [{"action": "Pass", "to": [{"networks": ["10.0.0.1/8"]}]}],
        }));
        assert!(c.errors.is_empty(), "{:?}", c.errors);
        let p = c.value;
        assert_eq!((p.tier, p.priority, p.invalid), (Tier::Admin, 10, false));
        assert_eq!(
            p.subject,
            Some(Subject::Namespaces(labels([("team", "a")])))
        );
        assert_eq!(
            p.ingress,
            vec![
                deny()
                    .named("deny-b")
                    .peer(peer_namespaces(labels([("team", "b")])))
                    .port(dport(Protocol::Tcp, 80))
                    .port(dports(Protocol::Udp, 53, 60))
                    .port(named_dport("web"))
            ]
        );
        assert_eq!(p.egress, vec![pass().peer(networks(["10.0.0.0/8"]))]);
    }

    #[test]
    fn an_unknown_peer_field_fails_closed_per_action() {
        let c = cnp(json!({
            "tier": "Baseline", "priority": 5,
            "subject": {"pods": {"namespaceSelector": {}, "podSelector": {}}},
            "egress": [
                {"action": "Accept", "to": [{"serviceAccounts": {"x": 1}}, {"networks": ["0.0.0.0/0"]}]},
                {"action": "Deny", "to": [{"serviceAccounts": {"x": 1}}],
                 "protocols": [{"tcp": {"destinationPort": {"number": 80}}}]},
                {"action": "Pass", "to": [{}]},
            ],
        }));
        assert_eq!(
            fields(&c),
            [
                "spec.egress[0].to[0]",
                "spec.egress[1].to[0]",
                "spec.egress[2].to[0]"
            ]
        );
        assert!(
            c.errors[0].to_string().contains("serviceAccounts"),
            "{}",
            c.errors[0]
        );
        assert_eq!(c.errors[2].problem, Problem::EmptyCnpPeer, "a pruned peer");
        let p = c.value;
        assert!(p.invalid);
        assert_eq!(p.egress[0].action, Action::Accept);
        assert!(p.egress[0].peers.is_empty(), "Accept matches nothing");
        for r in &p.egress[1..] {
            assert_eq!(r.action, Action::Deny);
            assert_eq!(r.peers, vec![CnpPeer::Everything]);
            assert!(r.protocols.is_empty(), "every port");
        }
        // The rest of the policy stands.
        assert_eq!((p.tier, p.priority), (Tier::Baseline, 5));
    }

    #[test]
    fn domain_names_are_rejected_clearly() {
        let c = cnp(json!({
            "tier": "Admin", "priority": 1, "subject": {"namespaces": {}},
            "egress": [{"action": "Accept", "to": [{"domainNames": ["*.example.com"]}]}],
        }));
        assert_eq!(fields(&c), ["spec.egress[0].to[0].domainNames"]);
        assert!(c.errors[0].to_string().contains("not implemented"));
        assert!(c.value.egress[0].peers.is_empty());
    }

    #[test]
    fn ingress_peers_are_only_namespaces_and_pods() {
        let c = cnp(json!({
            "tier": "Admin", "priority": 1, "subject": {"namespaces": {}},
            "ingress": [{"action": "Deny", "from": [{"networks": ["10.0.0.0/8"]}]}],
        }));
        assert_eq!(fields(&c), ["spec.ingress[0].from[0].networks"]);
        assert_eq!(c.value.ingress[0].peers, vec![CnpPeer::Everything]);
    }

    #[test]
    fn each_invalid_field_is_named() {
        let c = cnp(json!({
            "tier": "Middle", "priority": 1001,
            "subject": {"namespaces": {}, "pods": {"podSelector": {}}},
            "ingress": [{"action": "Allow", "from": [{"namespaces": {}}]},
                        {"action": "Accept", "from": [],
                         "protocols": [{"tcp": {"destinationPort": {"range": {"start": 90, "end": 80}}}},
                                       {"udp": {"destinationPort": {"number": 0}}},
                                       {"tcp": {}, "udp": {}},
                                       {"destinationNamedPort": "Not_A_Name"}]}],
            "egress": [{"action": "Deny", "to": [{"pods": {"namespaceSelector": {}}}]},
                       {"action": "Accept", "to": [{"nodes": {}}], "protocols": [{"destinationNamedPort": "dns"}]}],
        }));
        assert_eq!(
            fields(&c),
            [
                "spec.tier",
                "spec.priority",
                "spec.subject",
                "spec.ingress[0].action",
                "spec.ingress[1].from",
                "spec.ingress[1].protocols[0].tcp.destinationPort.range",
                "spec.ingress[1].protocols[1].udp.destinationPort.number",
                "spec.ingress[1].protocols[2]",
                "spec.ingress[1].protocols[3].destinationNamedPort",
                "spec.egress[0].to[0].pods.podSelector",
                "spec.egress[1].protocols",
            ]
        );
        assert!(
            c.errors
                .iter()
                .all(|e| e.kind == "ClusterNetworkPolicy" && e.object == "p")
        );
    }

    #[test]
    fn an_invalid_subject_selects_every_pod_and_only_denies() {
        let c = cnp(json!({
            "tier": "Baseline", "priority": 3,
            "subject": {"pods": {"podSelector": {"matchExpressions": [{"key": "a", "operator": "Near"}]}}},
            "ingress": [{"action": "Accept", "from": [{"namespaces": {}}]},
                        {"action": "Pass", "from": [{"namespaces": {"matchLabels": {"x": "y"}}}]},
                        {"action": "Deny", "from": [{"namespaces": {}}]}],
        }));
        assert_eq!(
            fields(&c),
            ["spec.subject.pods.podSelector.matchExpressions[0].operator"]
        );
        let p = c.value;
        assert_eq!(p.subject, Some(Subject::Namespaces(all())));
        assert!(p.ingress[0].peers.is_empty(), "Accept matches nothing");
        assert_eq!(p.ingress[1].action, Action::Deny, "Pass becomes Deny");
        assert_eq!(
            p.ingress[1].peers,
            vec![peer_namespaces(labels([("x", "y")]))]
        );
        assert_eq!(p.ingress[2].action, Action::Deny);
    }

    #[test]
    fn nodes_keep_their_ip_addresses() {
        let n: core::Node = serde_json::from_value(json!({
            "metadata": {"name": "n1", "labels": {"zone": "a"}},
            "status": {"addresses": [
                {"type": "InternalIP", "address": "192.168.1.1"},
                {"type": "Hostname", "address": "n1"},
                {"type": "InternalIP", "address": "fd00::1"},
                {"type": "ExternalIP", "address": "not-an-ip"}]},
        }))
        .expect("parses");
        let c = super::node(&n).expect("named");
        assert_eq!(
            c.value,
            crate::model::build::node("n1")
                .label("zone", "a")
                .address("192.168.1.1")
                .address("fd00::1")
        );
        assert_eq!(
            c.errors
                .iter()
                .map(|e| e.field.as_str())
                .collect::<Vec<_>>(),
            ["status.addresses[3].address"]
        );
    }
}
