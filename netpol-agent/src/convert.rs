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

use crate::model::{
    ANNOTATION_PREFIX, ContainerPort, IpBlock, LabelSelector, Namespace, NetworkPolicy, Operator,
    Peer, Pod, PodPhase, PortMatch, PortSpec, Protocol, Requirement, Rule,
};

/// A problem with one field of one object.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("{kind} {object}: {field}: {problem}")]
pub struct ConvertError {
    /// `NetworkPolicy`, `Pod` or `Namespace`.
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
