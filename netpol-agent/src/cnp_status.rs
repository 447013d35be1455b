//! `status.conditions` of ClusterNetworkPolicies (issue 16): a `Programmed`
//! condition per policy saying on how many nodes it is programmed, and why
//! not where it is not.
//!
//! No agent knows the other nodes' state, so each agent (with `--source
//! kube`) publishes a *node report*: a `coordination.k8s.io/v1` Lease named
//! `netpol-node-<node>` in its namespace (`--status-namespace`), labelled
//! [`REPORT_LABEL`], renewed every [`HEARTBEAT`], whose annotation
//! [`ANNOTATION`] holds, per policy, the generation it judged and whether
//! that generation is programmed here ([`NodeState`]). A Lease is one small
//! object per node, written only when the node's state changes or to renew
//! it, and read by one agent: cheap at a thousand nodes, unlike a condition
//! or an annotation per node on every policy (each write of those would
//! wake every agent's policy watch).
//!
//! One agent writes the conditions: the one whose node name sorts first
//! among the fresh reports ([`writer`]). Two agents that both believe they
//! are first for a moment (a report going stale) write the same condition
//! from the same reports, with server-side apply under one field manager,
//! so the race is harmless. It writes only a condition that changed.
//!
//! A policy is programmed on a node when the agent there is enforcing the
//! current state (its last sync applied every write and the source is not
//! stale) and that state holds the policy exactly as the object's current
//! generation converts. A report older than [`STALE_AFTER`] counts as "not
//! programmed": its agent stopped renewing (the node's datapath keeps
//! enforcing what it had, but nobody can say that includes this
//! generation).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, ObjectMeta, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams},
};
use serde::{Deserialize, Serialize};

use crate::{api::SharedRef, convert, crd, model};

/// The condition type this module owns.
pub const CONDITION_TYPE: &str = "Programmed";
/// Label of the node-report Leases (`key=value`).
pub const REPORT_LABEL: (&str, &str) = ("app.kubernetes.io/component", "netpol-node-report");
/// Annotation of a node report holding its [`NodeState`]s as JSON.
pub const ANNOTATION: &str = "netpol.io/cluster-network-policies";
/// Server-side apply field manager of the Leases and the conditions.
pub const FIELD_MANAGER: &str = "netpol-agent";
/// How often a node report is renewed when nothing changed.
pub const HEARTBEAT: Duration = Duration::from_secs(30);
/// A report not renewed for this long counts as not programmed.
pub const STALE_AFTER: Duration = Duration::from_secs(120);
/// How often the agent's state and the policies are looked at.
const TICK: Duration = Duration::from_secs(2);

/// One node's state of one policy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    /// `metadata.generation` of the object this state is about.
    pub generation: i64,
    pub programmed: bool,
    /// Why not (or what to know when it is), for the condition's message.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// One node's report, as read back from its Lease.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub node: String,
    /// When it was last renewed (`spec.renewTime`).
    pub renewed: Option<Timestamp>,
    pub policies: BTreeMap<String, NodeState>,
}

impl Report {
    fn fresh(&self, now: Timestamp) -> bool {
        self.renewed.is_some_and(|t| age(now, t) < STALE_AFTER)
    }
}

fn age(now: Timestamp, then: Timestamp) -> Duration {
    let ms = now.as_millisecond().saturating_sub(then.as_millisecond());
    Duration::from_millis(ms.max(0) as u64)
}

/// What this agent enforces now, as the condition needs it.
#[derive(Clone, Debug, Default)]
pub struct Local {
    /// The last sync applied every write and the source is not stale
    /// (`/readyz` would say ready).
    pub enforcing: bool,
    /// Why not, when not (the first of `/readyz`'s reasons).
    pub why_not: String,
    /// The policies as the datapath's current state holds them.
    pub applied: BTreeMap<String, model::ClusterNetworkPolicy>,
    /// Whether any Node object is known (else `nodes` peers match nothing).
    pub nodes_known: bool,
}

/// This node's state of one policy object.
pub fn node_state(obj: &crd::ClusterNetworkPolicy, local: &Local) -> NodeState {
    let generation = obj.metadata.generation.unwrap_or(0);
    let name = obj.metadata.name.clone().unwrap_or_default();
    let not = |message: String| NodeState {
        generation,
        programmed: false,
        message,
    };
    let converted = match convert::cluster_network_policy(obj) {
        Ok(c) => c,
        Err(e) => return not(format!("cannot be used: {e}")),
    };
    if local.applied.get(&name) != Some(&converted.value) {
        return not("not applied yet: the datapath holds an earlier generation".to_owned());
    }
    let nodes_peers = converted
        .value
        .ingress
        .iter()
        .chain(&converted.value.egress)
        .flat_map(|r| &r.peers)
        .any(|peer| matches!(peer, model::CnpPeer::Nodes(_)));
    if nodes_peers && !local.nodes_known {
        return not(
            "its `nodes` peers are not enforced: no Node object is known, so they match no address"
                .to_owned(),
        );
    }
    if !local.enforcing {
        return not(format!(
            "the agent is not enforcing the current state: {}",
            local.why_not
        ));
    }
    let message = if converted.errors.is_empty() {
        String::new()
    } else {
        format!(
            "programmed with invalid fields reduced to fail closed: {}",
            converted
                .errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        )
    };
    NodeState {
        generation,
        programmed: true,
        message,
    }
}

/// The `Programmed` condition of one policy from every node's report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub status: bool,
    /// `Programmed`, `NotProgrammed` or `NoAgents`.
    pub reason: &'static str,
    pub message: String,
}

/// Most nodes named in a condition message.
const NAMED: usize = 5;

/// Aggregates the reports for one policy at `generation`.
pub fn verdict(name: &str, generation: i64, reports: &[Report], now: Timestamp) -> Verdict {
    if reports.is_empty() {
        return Verdict {
            status: false,
            reason: "NoAgents",
            message: "no netpol agent has reported".to_owned(),
        };
    }
    let mut programmed = 0;
    let mut notes: Vec<String> = Vec::new();
    let mut why: Vec<String> = Vec::new();
    for r in reports {
        let state = r.policies.get(name);
        if !r.fresh(now) {
            why.push(format!(
                "{}: its agent has not reported for {}s",
                r.node,
                r.renewed.map_or(0, |t| age(now, t).as_secs())
            ));
            continue;
        }
        match state {
            Some(s) if s.generation == generation && s.programmed => {
                programmed += 1;
                if !s.message.is_empty() {
                    notes.push(format!("{}: {}", r.node, s.message));
                }
            }
            Some(s) if s.generation == generation => why.push(format!("{}: {}", r.node, s.message)),
            Some(s) => why.push(format!(
                "{}: has generation {} (not yet {generation})",
                r.node, s.generation
            )),
            None => why.push(format!("{}: has not seen it yet", r.node)),
        }
    }
    let total = reports.len();
    let mut message = format!("programmed on {programmed} of {total} nodes");
    let named = |list: &[String]| {
        let mut s = list
            .iter()
            .take(NAMED)
            .cloned()
            .collect::<Vec<_>>()
            .join("; ");
        if list.len() > NAMED {
            s.push_str(&format!("; and {} more", list.len() - NAMED));
        }
        s
    };
    if !why.is_empty() {
        message.push_str(&format!(". Not programmed: {}", named(&why)));
    }
    if !notes.is_empty() {
        message.push_str(&format!(". Note: {}", named(&notes)));
    }
    let status = programmed == total;
    Verdict {
        status,
        reason: if status {
            "Programmed"
        } else {
            "NotProgrammed"
        },
        message,
    }
}

/// Whether `me` writes the conditions: it sorts first among the nodes with
/// a fresh report (its own counts as fresh: it was just written).
pub fn writer(me: &str, reports: &[Report], now: Timestamp) -> bool {
    reports
        .iter()
        .filter(|r| r.node == me || r.fresh(now))
        .map(|r| r.node.as_str())
        .chain(std::iter::once(me))
        .min()
        == Some(me)
}

/// The condition to write, or `None` when the current one already says it
/// (the transition time moves only when the status does).
pub fn condition(
    current: &[Condition],
    generation: i64,
    v: &Verdict,
    now: Timestamp,
) -> Option<Condition> {
    let status = if v.status { "True" } else { "False" };
    let old = current.iter().find(|c| c.type_ == CONDITION_TYPE);
    if let Some(c) = old
        && c.status == status
        && c.reason == v.reason
        && c.message == v.message
        && c.observed_generation == Some(generation)
    {
        return None;
    }
    let transition = match old {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => Time(now),
    };
    Some(Condition {
        type_: CONDITION_TYPE.to_owned(),
        status: status.to_owned(),
        reason: v.reason.to_owned(),
        // The CRD caps messages at 32768 bytes.
        message: truncate(&v.message, 32_000),
        observed_generation: Some(generation),
        last_transition_time: transition,
    })
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// Where and as whom the agent reports.
#[derive(Clone)]
pub struct ReportConfig {
    pub kube: kube::Config,
    /// Namespace of the node-report Leases (the agent's own).
    pub namespace: String,
    pub node: String,
}

impl std::fmt::Debug for ReportConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReportConfig")
            .field("server", &self.kube.cluster_url.to_string())
            .field("namespace", &self.namespace)
            .field("node", &self.node)
            .finish()
    }
}

fn lease_name(node: &str) -> String {
    format!("netpol-node-{node}")
}

/// Reads this agent's state from what the run loop published.
fn local(shared: &SharedRef) -> Local {
    let sh = shared.lock().unwrap_or_else(|p| p.into_inner());
    let names = sh.names.read().unwrap_or_else(|p| p.into_inner());
    Local {
        enforcing: sh.status.synced && sh.status.not_ready.is_empty(),
        why_not: sh.status.not_ready.first().cloned().unwrap_or_else(|| {
            if sh.status.synced {
                String::new()
            } else {
                "not synced yet".to_owned()
            }
        }),
        applied: names.cluster.cluster_policies.clone(),
        nodes_known: !names.cluster.nodes.is_empty(),
    }
}

/// Parses a node-report Lease.
pub fn report_of(lease: &Lease) -> Option<Report> {
    let spec = lease.spec.as_ref()?;
    let node = spec.holder_identity.clone()?;
    let policies = lease
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION))
        .and_then(|j| serde_json::from_str(j).ok())
        .unwrap_or_default();
    Some(Report {
        node,
        renewed: spec.renew_time.as_ref().map(|t| t.0),
        policies,
    })
}

/// The Lease that carries this node's report.
pub fn report_lease(cfg: &ReportConfig, policies: &BTreeMap<String, NodeState>) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(lease_name(&cfg.node)),
            namespace: Some(cfg.namespace.clone()),
            labels: Some([(REPORT_LABEL.0.to_owned(), REPORT_LABEL.1.to_owned())].into()),
            annotations: Some(
                [(
                    ANNOTATION.to_owned(),
                    serde_json::to_string(policies).expect("node states serialize"),
                )]
                .into(),
            ),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(cfg.node.clone()),
            lease_duration_seconds: Some(STALE_AFTER.as_secs() as i32),
            renew_time: Some(MicroTime(Timestamp::now())),
            ..Default::default()
        }),
    }
}

/// Logs a failure once per distinct message (a missing RBAC right would
/// otherwise log every tick).
#[derive(Default)]
struct Once(Option<String>);

impl Once {
    fn warn(&mut self, what: &str, e: &kube::Error) {
        let msg = format!("{what}: {e}");
        if self.0.as_deref() != Some(msg.as_str()) {
            tracing::warn!("ClusterNetworkPolicy status: {msg}");
            self.0 = Some(msg);
        }
    }
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// The reporting task: runs until the agent exits.
pub async fn run(cfg: ReportConfig, shared: SharedRef) {
    let client = match Client::try_from(cfg.kube.clone()) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("ClusterNetworkPolicy status: no client, nothing reported: {e}");
            return;
        }
    };
    let cnps: Api<crd::ClusterNetworkPolicy> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    let selector = ListParams::default().labels(&format!("{}={}", REPORT_LABEL.0, REPORT_LABEL.1));
    let mut reported: Option<(BTreeMap<String, NodeState>, std::time::Instant)> = None;
    let mut errors = Once::default();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let objects = match cnps.list(&ListParams::default()).await {
            Ok(list) => list.items,
            // No CRD: no policies, nothing to report on (and no Lease
            // writes in clusters that do not use them).
            Err(e) if is_not_found(&e) => continue,
            Err(e) => {
                errors.warn("listing ClusterNetworkPolicies", &e);
                continue;
            }
        };
        let local = local(&shared);
        let states: BTreeMap<String, NodeState> = objects
            .iter()
            .filter_map(|o| Some((o.metadata.name.clone()?, node_state(o, &local))))
            .collect();
        let due = match &reported {
            Some((last, at)) => *last != states || at.elapsed() >= HEARTBEAT,
            None => true,
        };
        if due {
            let lease = report_lease(&cfg, &states);
            match leases
                .patch(&lease_name(&cfg.node), &apply, &Patch::Apply(&lease))
                .await
            {
                Ok(_) => reported = Some((states, std::time::Instant::now())),
                Err(e) => {
                    errors.warn(
                        &format!(
                            "writing the node report Lease {}/{}",
                            cfg.namespace,
                            lease_name(&cfg.node)
                        ),
                        &e,
                    );
                    continue;
                }
            }
        }
        if objects.is_empty() {
            continue;
        }
        let reports: Vec<Report> = match leases.list(&selector).await {
            Ok(list) => list.items.iter().filter_map(report_of).collect(),
            Err(e) => {
                errors.warn("listing the node report Leases", &e);
                continue;
            }
        };
        let now = Timestamp::now();
        if !writer(&cfg.node, &reports, now) {
            continue;
        }
        for obj in &objects {
            let Some(name) = obj.metadata.name.as_deref() else {
                continue;
            };
            let generation = obj.metadata.generation.unwrap_or(0);
            let v = verdict(name, generation, &reports, now);
            let current = obj.status.as_ref().map_or(&[][..], |s| &s.conditions[..]);
            let Some(c) = condition(current, generation, &v, now) else {
                continue;
            };
            let patch = serde_json::json!({
                "apiVersion": "policy.networking.k8s.io/v1alpha2",
                "kind": "ClusterNetworkPolicy",
                "status": { "conditions": [c] },
            });
            match cnps.patch_status(name, &apply, &Patch::Apply(&patch)).await {
                Ok(_) => tracing::info!(
                    policy = name,
                    status = %c.status,
                    reason = %c.reason,
                    "ClusterNetworkPolicy {name}: {}",
                    c.message
                ),
                Err(e) => errors.warn(&format!("writing the status of {name}"), &e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn report(node: &str, renewed: i64, states: &[(&str, i64, bool, &str)]) -> Report {
        Report {
            node: node.into(),
            renewed: Some(ts(renewed)),
            policies: states
                .iter()
                .map(|(n, g, p, m)| {
                    (
                        n.to_string(),
                        NodeState {
                            generation: *g,
                            programmed: *p,
                            message: m.to_string(),
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn programmed_only_when_every_node_has_this_generation() {
        let now = ts(100);
        let all = [
            report("node-a", 95, &[("p", 2, true, "")]),
            report("node-b", 90, &[("p", 2, true, "")]),
        ];
        let v = verdict("p", 2, &all, now);
        assert!(v.status);
        assert_eq!(v.reason, "Programmed");
        assert_eq!(v.message, "programmed on 2 of 2 nodes");

        let behind = [
            report("node-a", 95, &[("p", 2, true, "")]),
            report("node-b", 90, &[("p", 1, true, "")]),
            report("node-c", 90, &[]),
            report("node-d", 90, &[("p", 2, false, "not applied yet")]),
        ];
        let v = verdict("p", 2, &behind, now);
        assert!(!v.status);
        assert_eq!(v.reason, "NotProgrammed");
        assert_eq!(
            v.message,
            "programmed on 1 of 4 nodes. Not programmed: node-b: has generation 1 (not yet 2); \
             node-c: has not seen it yet; node-d: not applied yet"
        );
    }

    #[test]
    fn a_stale_report_counts_as_not_programmed_and_no_reports_say_so() {
        let now = ts(1000);
        let reports = [
            report("node-a", 999, &[("p", 1, true, "")]),
            report("node-b", 1000 - 121, &[("p", 1, true, "")]),
        ];
        let v = verdict("p", 1, &reports, now);
        assert!(!v.status);
        assert!(
            v.message
                .contains("node-b: its agent has not reported for 121s"),
            "{}",
            v.message
        );
        let v = verdict("p", 1, &[], now);
        assert_eq!((v.status, v.reason), (false, "NoAgents"));
    }

    #[test]
    fn long_lists_are_cut_and_notes_are_kept() {
        let now = ts(10);
        let mut reports: Vec<Report> = (0..8).map(|i| report(&format!("n{i}"), 10, &[])).collect();
        reports.push(report("z", 10, &[("p", 3, true, "reduced")]));
        let v = verdict("p", 3, &reports, now);
        assert!(
            v.message
                .starts_with("programmed on 1 of 9 nodes. Not programmed: n0:")
        );
        assert!(
            v.message.contains("; and 3 more. Note: z: reduced"),
            "{}",
            v.message
        );
    }

    #[test]
    fn the_first_fresh_node_writes() {
        let now = ts(500);
        let reports = [
            report("node-a", 500 - 200, &[]), // stale: not a writer
            report("node-b", 499, &[]),
            report("node-c", 499, &[]),
        ];
        assert!(!writer("node-c", &reports, now));
        assert!(writer("node-b", &reports, now));
        // A stale node that comes back writes again (its own report is fresh
        // to itself).
        assert!(writer("node-a", &reports, now));
        // Before any report is readable, a node writes.
        assert!(writer("node-x", &[], now));
    }

    #[test]
    fn a_condition_is_written_only_when_it_changes() {
        let now = ts(0);
        let v = Verdict {
            status: false,
            reason: "NotProgrammed",
            message: "programmed on 0 of 1 nodes".into(),
        };
        let first = condition(&[], 4, &v, now).expect("nothing yet: write");
        assert_eq!(first.type_, CONDITION_TYPE);
        assert_eq!(first.status, "False");
        assert_eq!(first.observed_generation, Some(4));
        assert!(condition(std::slice::from_ref(&first), 4, &v, ts(9)).is_none());
        // A new generation with the same verdict: rewritten, same transition.
        let again = condition(std::slice::from_ref(&first), 5, &v, ts(9)).expect("generation");
        assert_eq!(again.last_transition_time, first.last_transition_time);
        // A new status moves the transition time.
        let ok = Verdict {
            status: true,
            reason: "Programmed",
            message: "programmed on 1 of 1 nodes".into(),
        };
        let flipped = condition(std::slice::from_ref(&again), 5, &ok, ts(9)).expect("status");
        assert_eq!(flipped.last_transition_time, Time(ts(9)));
    }

    #[test]
    fn a_report_lease_reads_back_as_written() {
        let cfg = ReportConfig {
            kube: kube::Config::new("https://127.0.0.1:6443".parse().unwrap()),
            namespace: "kube-system".into(),
            node: "node-a".into(),
        };
        let states: BTreeMap<String, NodeState> = [(
            "deny-metadata".to_string(),
            NodeState {
                generation: 3,
                programmed: false,
                message: "not enforced".into(),
            },
        )]
        .into();
        let lease = report_lease(&cfg, &states);
        assert_eq!(lease.metadata.name.as_deref(), Some("netpol-node-node-a"));
        let back = report_of(&lease).expect("parses");
        assert_eq!(back.node, "node-a");
        assert_eq!(back.policies, states);
        assert!(back.renewed.is_some());
    }

    fn object(generation: i64, yaml: &str) -> crd::ClusterNetworkPolicy {
        let mut obj: crd::ClusterNetworkPolicy = serde_yaml::from_str(yaml).expect("yaml");
        obj.metadata.generation = Some(generation);
        obj
    }

    const DENY_X: &str = "
metadata: {name: p}
spec:
  tier: Admin
  priority: 1
  subject: {namespaces: {matchLabels: {ns: x}}}
  egress:
  - {name: r, action: Deny, to: [{namespaces: {}}]}
";

    #[test]
    fn programmed_when_the_datapath_holds_this_generation_and_enforces() {
        let obj = object(7, DENY_X);
        let model = convert::cluster_network_policy(&obj).unwrap().value;
        let mut local = Local {
            enforcing: true,
            applied: [("p".to_string(), model.clone())].into(),
            ..Local::default()
        };
        let s = node_state(&obj, &local);
        assert_eq!((s.generation, s.programmed), (7, true), "{}", s.message);

        // An older generation in the datapath.
        let newer = object(8, &DENY_X.replace("priority: 1", "priority: 2"));
        let s = node_state(&newer, &local);
        assert_eq!((s.generation, s.programmed), (8, false));
        assert!(s.message.contains("not applied yet"), "{}", s.message);

        // Not enforcing the current state (a failed write, a stale source).
        local.enforcing = false;
        local.why_not = "map writes failed in the last sync".into();
        let s = node_state(&obj, &local);
        assert!(!s.programmed);
        assert!(s.message.contains("map writes failed"), "{}", s.message);
    }

    #[test]
    fn nodes_peers_without_any_node_are_not_programmed() {
        let obj = object(
            1,
            "
metadata: {name: p}
spec:
  tier: Admin
  priority: 1
  subject: {namespaces: {}}
  egress:
  - {name: r, action: Deny, to: [{nodes: {matchLabels: {role: control}}}]}
",
        );
        let model = convert::cluster_network_policy(&obj).unwrap().value;
        let mut local = Local {
            enforcing: true,
            applied: [("p".to_string(), model)].into(),
            ..Local::default()
        };
        let s = node_state(&obj, &local);
        assert!(!s.programmed);
        assert!(
            s.message.contains("no Node object is known"),
            "{}",
            s.message
        );
        local.nodes_known = true;
        assert!(node_state(&obj, &local).programmed);
    }
}
