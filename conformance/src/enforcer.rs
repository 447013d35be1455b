//! What enforces policy in a column of the run (`--enforcer`), and which address of a server
//! the probes dial (`--via`).

use std::{fmt, str::FromStr};

use netpol_lab::Via;
use serde::{Deserialize, Serialize};

/// What enforces the policies while the cases run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Enforcer {
    /// netpol-agent on every node, reading the lab's manifests directory (`--source dir:`).
    Netpol,
    /// netpol-agent on every node, reading the lab's API server (`--source kube`) with the
    /// token of `deploy/`'s ServiceAccount.
    NetpolKube,
    /// sig-network's kube-network-policies on every node: the reference peer.
    KubeNetworkPolicies,
    /// Nothing: a baseline that shows the cases can fail.
    None,
}

impl Enforcer {
    pub const ALL: [Enforcer; 4] = [
        Enforcer::Netpol,
        Enforcer::NetpolKube,
        Enforcer::KubeNetworkPolicies,
        Enforcer::None,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Enforcer::Netpol => "netpol",
            Enforcer::NetpolKube => "netpol-kube",
            Enforcer::KubeNetworkPolicies => "kube-network-policies",
            Enforcer::None => "none",
        }
    }

    /// Whether it reads the API server, so the lab needs a control plane.
    pub fn needs_control_plane(self) -> bool {
        matches!(self, Enforcer::NetpolKube | Enforcer::KubeNetworkPolicies)
    }

    /// Why it cannot enforce ClusterNetworkPolicy (policy.networking.k8s.io/v1alpha2), if it
    /// cannot: a case with one is `unsupported` in its columns, not run.
    pub fn cluster_network_policy_gap(self) -> Option<&'static str> {
        match self {
            // Read from its source (sigs.k8s.io/kube-network-policies v0.8.0, the newest the
            // module proxy serves): pkg/networkpolicy imports only
            // sigs.k8s.io/network-policy-api/apis/v1alpha1, and cmd/main.go's flags
            // --admin-network-policy and --baseline-admin-network-policy enable
            // AdminNetworkPolicy and BaselineAdminNetworkPolicy; v1alpha2's
            // ClusterNetworkPolicy appears nowhere.
            Enforcer::KubeNetworkPolicies => Some(
                "not supported by this enforcer: kube-network-policies v0.8.0 implements \
                 AdminNetworkPolicy and BaselineAdminNetworkPolicy \
                 (policy.networking.k8s.io/v1alpha1, flags --admin-network-policy and \
                 --baseline-admin-network-policy), not ClusterNetworkPolicy v1alpha2",
            ),
            Enforcer::Netpol | Enforcer::NetpolKube | Enforcer::None => None,
        }
    }

    /// Whether netpol's own TC programs enforce, so that SCTP cells (no SCTP sockets here) can
    /// be decided by running them with `BPF_PROG_TEST_RUN`.
    pub fn is_netpol(self) -> bool {
        matches!(self, Enforcer::Netpol | Enforcer::NetpolKube)
    }
}

impl fmt::Display for Enforcer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Enforcer {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Enforcer::ALL
            .into_iter()
            .find(|e| e.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown enforcer {s:?} (netpol, netpol-kube, kube-network-policies or none)"
                )
            })
    }
}

/// `--via`: which address of each server the probes dial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViaArg {
    Pod,
    Service,
    Both,
}

impl ViaArg {
    pub fn vias(self) -> Vec<Via> {
        match self {
            ViaArg::Pod => vec![Via::Pod],
            ViaArg::Service => vec![Via::Service],
            ViaArg::Both => vec![Via::Pod, Via::Service],
        }
    }
}

impl FromStr for ViaArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pod" => Ok(ViaArg::Pod),
            "service" => Ok(ViaArg::Service),
            "both" => Ok(ViaArg::Both),
            _ => Err(format!("unknown --via {s:?} (pod, service or both)")),
        }
    }
}

/// `pod` or `service`.
pub fn via_name(via: Via) -> &'static str {
    match via {
        Via::Pod => "pod",
        Via::Service => "service",
    }
}

pub fn parse_via(s: &str) -> Result<Via, String> {
    match s {
        "pod" => Ok(Via::Pod),
        "service" => Ok(Via::Service),
        _ => Err(format!("unknown via {s:?} (pod or service)")),
    }
}

/// One column of the results: an enforcer, probed through one kind of address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Column {
    pub enforcer: Enforcer,
    pub via: Via,
}

impl fmt::Display for Column {
    /// `netpol-kube/service`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.enforcer, via_name(self.via))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enforcer_names_round_trip() {
        for e in Enforcer::ALL {
            assert_eq!(e.name().parse::<Enforcer>(), Ok(e));
            assert_eq!(
                serde_yaml::from_str::<Enforcer>(e.name()).expect("parses"),
                e
            );
        }
        assert!("cilium".parse::<Enforcer>().is_err());
    }
}
