//! Flow logs: verdict events from the ring buffer as JSON lines that name
//! both sides and the policy and rule that decided.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, SystemTime},
};

use netpol_common::{
    DIR_EGRESS, DIR_INGRESS, REASON_POLICY_DENY, VerdictEvent, direction_name, protocol_name,
    reason_name, verdict_name,
};
use serde::Serialize;

use crate::{
    compiler::Compiled,
    model::{PodRef, PolicyRef},
};

/// What the flow log (and the API) needs to name things, rebuilt after
/// each compile.
#[derive(Clone, Debug, Default)]
pub struct Names {
    /// The cluster state the compile was made from.
    pub cluster: crate::model::Cluster,
    /// Every live pod's IPs (peers can be on any node).
    pub pods_by_ip: BTreeMap<IpAddr, PodRef>,
    /// The compile the datapath is running.
    pub compiled: Compiled,
    /// Local endpoints by veth ifindex.
    pub endpoints: BTreeMap<u32, PodRef>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Side {
    pub ip: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct FlowLog {
    pub time: String,
    pub verdict: &'static str,
    /// From the local pod's point of view.
    pub direction: &'static str,
    pub reason: &'static str,
    pub src: Side,
    pub dst: Side,
    pub protocol: &'static str,
    pub sport: u16,
    pub dport: u16,
    /// `namespace/name` of the deciding policy, or `default-deny`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// `ingress[i]` / `egress[i]` of the deciding policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// For `default-deny`: the policies that isolate the pod.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub isolated_by: Vec<String>,
    pub ifindex: u32,
    /// `namespace/name` of the local pod behind the veth: who really sent (or
    /// was sent) the packet, whatever addresses it carries (a spoofed source
    /// names the victim in `src`, the attacker here).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

fn side(names: &Names, ip: IpAddr) -> Side {
    let pod = names.pods_by_ip.get(&ip);
    Side {
        ip: ip.to_string(),
        namespace: pod.map(|p| p.namespace.clone()),
        pod: pod.map(|p| p.name.clone()),
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Convert a kernel timestamp (CLOCK_MONOTONIC ns) to wall-clock time.
pub fn wall_time(mono_ns: u64) -> SystemTime {
    let age = Duration::from_nanos(monotonic_ns().saturating_sub(mono_ns));
    SystemTime::now() - age
}

/// Build the flow log line of an event.
pub fn describe(ev: &VerdictEvent, names: &Names, time: SystemTime) -> FlowLog {
    let src = ev.src_ip();
    let dst = ev.dst_ip();
    let mut policy = None;
    let mut rule = None;
    let mut isolated_by = Vec::new();
    if let Some(r) = names
        .compiled
        .rules
        .get(&ev.rule_id)
        .filter(|_| ev.rule_id != 0)
    {
        policy = Some(format!("{}/{}", r.namespace, r.policy));
        rule = Some(format!(
            "{}[{}]",
            if r.direction == DIR_INGRESS {
                "ingress"
            } else {
                "egress"
            },
            r.index
        ));
    } else if ev.reason == REASON_POLICY_DENY || ev.reason == netpol_common::REASON_AUDIT {
        policy = Some("default-deny".to_string());
        if let Some(set) = names.compiled.policy_sets.get(&ev.policy_id) {
            let list: &[PolicyRef] = if ev.direction == DIR_EGRESS {
                &set.egress
            } else {
                &set.ingress
            };
            isolated_by = list.iter().map(|p| p.to_string()).collect();
        }
    }
    FlowLog {
        time: humantime::format_rfc3339_millis(time).to_string(),
        verdict: verdict_name(ev.verdict),
        direction: direction_name(ev.direction),
        reason: reason_name(ev.reason),
        src: side(names, src),
        dst: side(names, dst),
        protocol: protocol_name(ev.protocol),
        sport: ev.sport,
        dport: ev.dport,
        policy,
        rule,
        isolated_by,
        ifindex: ev.ifindex,
        endpoint: names.endpoints.get(&ev.ifindex).map(ToString::to_string),
    }
}

#[cfg(test)]
mod tests {
    use netpol_common::{
        FAMILY_V4, PROTO_TCP, REASON_POLICY_ALLOW, VERDICT_ALLOW, VERDICT_DENY, ip_bytes,
    };

    use super::*;
    use crate::compiler::{PolicySetInfo, RuleInfo};

    fn names() -> Names {
        let mut n = Names::default();
        n.pods_by_ip
            .insert("10.0.1.2".parse().unwrap(), PodRef::new("x", "a"));
        n.pods_by_ip
            .insert("10.0.2.2".parse().unwrap(), PodRef::new("y", "b"));
        n.compiled.rules.insert(
            7,
            RuleInfo {
                namespace: "y".into(),
                policy: "allow-x".into(),
                direction: DIR_INGRESS,
                index: 1,
            },
        );
        n.compiled.policy_sets.insert(
            3,
            PolicySetInfo {
                ingress: vec![PolicyRef::new("y", "deny-all")],
                egress: vec![],
            },
        );
        n
    }

    fn event(verdict: u8, reason: u8, rule_id: u32) -> VerdictEvent {
        VerdictEvent {
            rule_id,
            policy_id: 3,
            sport: 40000,
            dport: 80,
            protocol: PROTO_TCP,
            family: FAMILY_V4,
            direction: DIR_INGRESS,
            verdict,
            reason,
            saddr: ip_bytes("10.0.1.2".parse().unwrap()).1,
            daddr: ip_bytes("10.0.2.2".parse().unwrap()).1,
            ..Default::default()
        }
    }

    #[test]
    fn allow_names_the_policy_and_rule() {
        let l = describe(
            &event(VERDICT_ALLOW, REASON_POLICY_ALLOW, 7),
            &names(),
            SystemTime::UNIX_EPOCH,
        );
        assert_eq!(l.verdict, "allow");
        assert_eq!(l.policy.as_deref(), Some("y/allow-x"));
        assert_eq!(l.rule.as_deref(), Some("ingress[1]"));
        assert_eq!(l.src.pod.as_deref(), Some("a"));
        assert_eq!(l.dst.namespace.as_deref(), Some("y"));
        assert_eq!(l.time, "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn deny_names_default_deny_and_the_isolating_policies() {
        let l = describe(
            &event(VERDICT_DENY, REASON_POLICY_DENY, 0),
            &names(),
            SystemTime::UNIX_EPOCH,
        );
        assert_eq!(l.verdict, "deny");
        assert_eq!(l.policy.as_deref(), Some("default-deny"));
        assert_eq!(l.isolated_by, vec!["y/deny-all".to_string()]);
        let json = serde_json::to_string(&l).unwrap();
        assert!(json.contains("\"reason\":\"policy_deny\""), "{json}");
    }
}
