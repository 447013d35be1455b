//! `netpol-agent explain`: why a connection is allowed or denied, computed
//! from compiled map contents with the datapath's own lookups
//! (`compiler::sim`), for both ends: the source pod's egress on its node and
//! the destination pod's ingress on its node.
//!
//! The side on the agent's own node uses the compile the datapath is running;
//! the side on another node is compiled for that node on the spot, with the
//! same compiler its agent runs.

use std::net::IpAddr;

use netpol_common::{DIR_EGRESS, DIR_INGRESS, PROTO_ICMP, PROTO_SCTP, PROTO_TCP, PROTO_UDP};
use serde::Serialize;

use crate::{
    compiler::{Compiled, NodeInfo, compile, sim},
    model::{Cluster, Pod, PodRef},
};

/// One end of the connection, as given on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Pod(PodRef),
    Ip(IpAddr),
}

impl std::str::FromStr for Endpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Endpoint::Ip(ip));
        }
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() => {
                Ok(Endpoint::Pod(PodRef::new(ns, name)))
            }
            _ => Err(format!(
                "{s:?}: expected <namespace>/<pod> or an IP address"
            )),
        }
    }
}

/// `<port>/<protocol>` (`80/TCP`, `53/udp`, `icmp`).
pub fn parse_port(s: &str) -> Result<(u16, u8), String> {
    let (port, proto) = match s.split_once('/') {
        Some((p, proto)) => (p, proto),
        None if s.eq_ignore_ascii_case("icmp") => ("0", "icmp"),
        None => (s, "tcp"),
    };
    let proto = match proto.to_ascii_lowercase().as_str() {
        "tcp" => PROTO_TCP,
        "udp" => PROTO_UDP,
        "sctp" => PROTO_SCTP,
        "icmp" => PROTO_ICMP,
        other => return Err(format!("unknown protocol {other:?} (tcp, udp, sctp, icmp)")),
    };
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{port:?} is not a port number"))?;
    if port == 0 && proto != PROTO_ICMP {
        return Err("port must be 1-65535".into());
    }
    Ok((port, proto))
}

#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Side {
    /// `egress of x/a` / `ingress of y/b`.
    pub check: String,
    /// Node whose datapath makes this check (None: not a pod, not enforced).
    pub node: Option<String>,
    /// `live` (this agent's running compile) or `computed` (another node's,
    /// compiled here).
    pub source: String,
    pub isolated_by: Vec<String>,
    pub peer_identity: Option<u32>,
    pub allowed: bool,
    /// Human-readable reason.
    pub reason: String,
}

#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Explanation {
    pub from: String,
    pub to: String,
    pub protocol: String,
    pub port: u16,
    pub allowed: bool,
    pub egress: Side,
    pub ingress: Side,
}

fn pod_by_ip(cluster: &Cluster, ip: IpAddr) -> Option<&Pod> {
    cluster
        .pods
        .values()
        .find(|p| p.is_live() && p.ips.contains(&ip))
}

/// Resolve an endpoint to (address, live pod if any). For a pod, `family_of`
/// picks the address of the same family as the other end (IPv4 first).
fn resolve<'c>(
    cluster: &'c Cluster,
    e: &Endpoint,
    family_of: Option<IpAddr>,
) -> Result<(IpAddr, Option<&'c Pod>), String> {
    match e {
        Endpoint::Ip(ip) => Ok((*ip, pod_by_ip(cluster, *ip))),
        Endpoint::Pod(r) => {
            let pod = cluster
                .pods
                .get(r)
                .ok_or_else(|| format!("no pod {r} in the cluster state"))?;
            if !pod.is_live() {
                return Err(format!(
                    "pod {r} takes no part in NetworkPolicy (no IP, hostNetwork, or finished)"
                ));
            }
            let ip = pod
                .ips
                .iter()
                .find(|ip| family_of.is_none_or(|f| f.is_ipv4() == ip.is_ipv4()))
                .or(pod.ips.first())
                .copied()
                .ok_or_else(|| format!("pod {r} has no IP"))?;
            Ok((ip, Some(pod)))
        }
    }
}

/// Explain `from -> to` on `port`/`proto`. `live` is the compile this
/// agent's datapath runs; `node_addresses` of other nodes are unknown here
/// (they only matter for host traffic to their pods).
pub fn explain(
    cluster: &Cluster,
    live: &Compiled,
    from: &Endpoint,
    to: &Endpoint,
    port: u16,
    proto: u8,
) -> Result<Explanation, String> {
    let (dst_ip, dst_pod) = resolve(cluster, to, None)?;
    let (src_ip, src_pod) = resolve(cluster, from, Some(dst_ip))?;
    let (dst_ip, dst_pod) = match to {
        Endpoint::Pod(_) => resolve(cluster, to, Some(src_ip))?,
        Endpoint::Ip(_) => (dst_ip, dst_pod),
    };
    if src_ip.is_ipv4() != dst_ip.is_ipv4() {
        return Err(format!(
            "{src_ip} and {dst_ip} are of different address families"
        ));
    }
    let egress = side(cluster, live, src_pod, DIR_EGRESS, dst_ip, proto, port);
    let ingress = side(cluster, live, dst_pod, DIR_INGRESS, src_ip, proto, port);
    Ok(Explanation {
        from: label(src_ip, src_pod),
        to: label(dst_ip, dst_pod),
        protocol: netpol_common::protocol_name(proto).to_string(),
        port,
        allowed: egress.allowed && ingress.allowed,
        egress,
        ingress,
    })
}

fn label(ip: IpAddr, pod: Option<&Pod>) -> String {
    match pod {
        Some(p) => format!("{} ({ip})", p.pod_ref()),
        None => ip.to_string(),
    }
}

fn side(
    cluster: &Cluster,
    live: &Compiled,
    pod: Option<&Pod>,
    direction: u8,
    peer: IpAddr,
    proto: u8,
    port: u16,
) -> Side {
    let dir = if direction == DIR_INGRESS {
        "ingress"
    } else {
        "egress"
    };
    let Some(pod) = pod else {
        return Side {
            check: format!("{dir} of a non-pod address"),
            node: None,
            source: "none".into(),
            isolated_by: vec![],
            peer_identity: None,
            allowed: true,
            reason: "not a pod: NetworkPolicy does not apply to this end".into(),
        };
    };
    let node = pod.node.clone().unwrap_or_default();
    let computed;
    let (compiled, source) = if live.node == node {
        (live, "live")
    } else {
        computed = compile(
            cluster,
            &NodeInfo {
                name: node.clone(),
                addresses: vec![],
            },
        );
        (&computed, "computed")
    };
    let r = pod.pod_ref();
    let isolated_by: Vec<String> = compiled
        .isolating_policies(&r, direction)
        .iter()
        .map(|p| p.to_string())
        .collect();
    let peer_identity = sim::peer_lookup(&compiled.maps, peer).map(|p| p.identity);
    let verdict = sim::endpoint_verdict(&compiled.maps, &r, direction, peer, proto, port);
    let reason = match verdict {
        sim::Verdict::NotIsolated => {
            format!("{r} is not isolated for {dir}: no policy with {dir} selects it")
        }
        sim::Verdict::Host => "from one of the node's own addresses: always allowed".into(),
        sim::Verdict::Allow { rule_id } => match compiled.rules.get(&rule_id) {
            Some(rule) if rule.cluster.is_some() => format!("allowed by {rule}"),
            Some(rule) => format!(
                "allowed by {}/{} {}[{}]",
                rule.namespace,
                rule.policy,
                if rule.direction == DIR_INGRESS {
                    "ingress"
                } else {
                    "egress"
                },
                rule.index
            ),
            // Only under ClusterNetworkPolicy: judged, but no tier decided.
            None if rule_id == 0 => format!(
                "allowed: no ClusterNetworkPolicy tier and no NetworkPolicy decides {dir} of {r} (default allow)"
            ),
            None => format!("allowed by rule {rule_id}"),
        },
        sim::Verdict::Audit { rule_id } => match compiled.rules.get(&rule_id) {
            Some(rule) => format!(
                "allowed, reported as audit: {rule} would deny it, and its policy is audited (netpol.dev/audit)"
            ),
            None => format!("allowed, reported as audit: rule {rule_id} would deny it"),
        },
        sim::Verdict::DenyRule { rule_id } => match compiled.rules.get(&rule_id) {
            Some(rule) => format!("denied by {rule}"),
            None => format!("denied by rule {rule_id}"),
        },
        sim::Verdict::Deny => format!(
            "denied: {r} is isolated for {dir} by {} and no rule allows this peer, protocol and port",
            isolated_by.join(", ")
        ),
        sim::Verdict::NoEndpoint => {
            format!("{r} has no endpoint on node {node}: its traffic is dropped")
        }
    };
    Side {
        check: format!("{dir} of {r}"),
        node: Some(node),
        source: source.into(),
        isolated_by,
        peer_identity,
        allowed: verdict.is_allowed(),
        reason,
    }
}

impl std::fmt::Display for Explanation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} -> {} {}/{}: {}",
            self.from,
            self.to,
            self.protocol,
            self.port,
            if self.allowed { "ALLOWED" } else { "DENIED" }
        )?;
        for s in [&self.egress, &self.ingress] {
            writeln!(
                f,
                "  {:<28} {:<7} {}{}",
                s.check,
                if s.allowed { "allow" } else { "deny" },
                s.reason,
                match (&s.node, s.source.as_str()) {
                    (Some(n), "computed") => format!(" (node {n}, computed here)"),
                    (Some(n), _) => format!(" (node {n})"),
                    _ => String::new(),
                }
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::build::*;

    #[test]
    fn parses_ports_and_endpoints() {
        assert_eq!(parse_port("80/TCP"), Ok((80, PROTO_TCP)));
        assert_eq!(parse_port("53/udp"), Ok((53, PROTO_UDP)));
        assert_eq!(parse_port("icmp"), Ok((0, PROTO_ICMP)));
        assert!(parse_port("0/tcp").is_err());
        assert!(parse_port("80/gre").is_err());
        assert_eq!(
            "x/a".parse::<Endpoint>(),
            Ok(Endpoint::Pod(PodRef::new("x", "a")))
        );
        assert!("x/".parse::<Endpoint>().is_err());
        assert_eq!(
            "10.0.0.1".parse::<Endpoint>(),
            Ok(Endpoint::Ip("10.0.0.1".parse().unwrap()))
        );
    }

    fn test_cluster() -> Cluster {
        cluster()
            .namespace(namespace("x").label("ns", "x"))
            .namespace(namespace("y").label("ns", "y"))
            .pod(pod("x", "a").label("pod", "a").ip("10.0.1.2").node("n1"))
            .pod(pod("y", "b").label("pod", "b").ip("10.0.2.2").node("n2"))
            .policy(
                policy("y", "allow-x").select(all()).ingress(
                    allow()
                        .from(namespaces(labels([("ns", "x")])))
                        .port(tcp(80)),
                ),
            )
    }

    #[test]
    fn names_the_allowing_rule_and_the_isolating_policy() {
        let c = test_cluster();
        let live = compile(&c, &NodeInfo::new("n2", []));
        let from: Endpoint = "x/a".parse().unwrap();
        let to: Endpoint = "y/b".parse().unwrap();
        let e = explain(&c, &live, &from, &to, 80, PROTO_TCP).unwrap();
        assert!(e.allowed, "{e}");
        assert_eq!(e.ingress.source, "live");
        assert_eq!(e.egress.source, "computed");
        assert!(e.ingress.reason.contains("y/allow-x ingress[0]"), "{e}");
        let e = explain(&c, &live, &from, &to, 81, PROTO_TCP).unwrap();
        assert!(!e.allowed, "{e}");
        assert_eq!(e.ingress.isolated_by, vec!["y/allow-x".to_string()]);
        assert!(e.egress.allowed, "x/a is not egress-isolated");
    }
}
