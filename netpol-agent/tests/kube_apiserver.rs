//! The kube source (`--source kube`) against a real API server: the lab's control plane
//! (etcd, kube-apiserver, kube-controller-manager; `netpol_lab::controlplane`) with one agent
//! per node reading it through the ServiceAccount that `deploy/` installs.
//!
//! * initial lists: policies that exist before the agents start are enforced once synced;
//! * watches: policies applied and deleted with kubectl, a pod and a namespace relabelled;
//! * an IP that changes hands: a deleted pod's addresses given to a different pod;
//! * kube-apiserver SIGKILLed and started again: enforcement and the pinned maps stay as they
//!   were while it is down, and a change made after it is back is enforced without any probe
//!   seeing a verdict flip back and forth;
//! * a watch too old to resume (`410 Gone`) after an etcd compaction: the agent relists and
//!   enforces changes it never saw as events;
//! * a token without RBAC rights: a log line naming resource and verb, `/readyz` 503, and an
//!   agent restarted with it leaves its pinned maps alone;
//! * an API server that stays down: enforcement goes on unchanged.
//!
//! Two tests were written against agent bugs they found, since fixed: a refused list was
//! retried about every second forever (no backoff), and a pod created while the agent could
//! not list got no programs at all (reachable despite a default-deny policy).
//!
//! Enforcement is checked with real connections between pods (`netpol_lab::probe`), and the
//! agents' status file, `/readyz` and `/metrics` (`--metrics-addr`, queried inside the node's
//! netns), logs and pinned maps (read with aya).
//!
//! Needs root and the control-plane tools (`cargo xtask setup`); skips loudly without them,
//! fails under CI. Each test brings up its own small lab (two nodes, four pods, no kube-proxy,
//! no DNS). Timings are printed as `[measure]` lines; none decides a test.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData, lpm_trie::LpmTrie};
use netpol_common::{EndpointValue, PeerValue, PolicyKey, PolicyValue, map_names};
use netpol_lab::{
    AgentProc, AgentSource, Agents, Family, Lab, LabState, PodSpec, PortSpec, ProbeSpec, Protocol,
    TableKey, TruthTable, connect, controlplane::ControlPlaneState, cp_ops, run_in_netns,
    start_agents_with,
};

mod common {
    pub mod lab;
}

use common::lab::AGENT;

/// netpol's manifests, installed with `kubectl apply -k` as a user would.
const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
/// Where each agent serves `/healthz`, `/readyz` and `/metrics`, inside its node's netns.
const METRICS_ADDR: &str = "127.0.0.1:9964";
const PORTS: &str = "[{name: http, port: 80, protocol: TCP}]";
/// Long enough for a watcher's backoff (up to 30 s) after the API server comes back.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Policies. The lab: x/a and y/b on node-a (routed), x/b and y/a on node-b
// (bridged); pods labelled pod=<name>, namespaces ns=<name>. kubectl reads YAML 1.1, where
// a bare `y` is a boolean: the namespace's name is quoted wherever it is a value.

const DENY_ALL_X: &str = netpol_lab::fixtures::DENY_ALL_X;

/// x/a admits y/a (pod=a in namespace ns=y) on TCP 80.
const ALLOW_YA_TO_XA: &str = netpol_lab::fixtures::ALLOW_YA_TO_XA_80;

/// x/a admits y/b (pod=b in namespace ns=y) on TCP 80.
const ALLOW_YB_TO_XA: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-yb, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
    - from:
        - namespaceSelector: {matchLabels: {ns: "y"}}
          podSelector: {matchLabels: {pod: b}}
      ports: [{protocol: TCP, port: 80}]
"#;

/// x/a admits y pods labelled role=client on TCP 80.
const ALLOW_CLIENTS_TO_XA: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-clients, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
    - from:
        - namespaceSelector: {matchLabels: {ns: "y"}}
          podSelector: {matchLabels: {role: client}}
      ports: [{protocol: TCP, port: 80}]
"#;

/// x/b admits every pod of namespaces labelled team=blue.
const ALLOW_BLUE_TO_XB: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-blue, namespace: x}
spec:
  podSelector: {matchLabels: {pod: b}}
  ingress:
    - from:
        - namespaceSelector: {matchLabels: {team: blue}}
"#;

const ALL_CONNECTED: &str = "
-   x/a x/b y/a y/b
x/a .   .   .   .
x/b .   .   .   .
y/a .   .   .   .
y/b .   .   .   .
";

/// [`DENY_ALL_X`] + [`ALLOW_YA_TO_XA`].
const YA_TO_XA_ONLY: &str = "
-   x/a x/b y/a y/b
x/a .   X   .   .
x/b X   .   .   .
y/a .   X   .   .
y/b X   X   .   .
";

/// [`DENY_ALL_X`] + [`ALLOW_YB_TO_XA`].
const YB_TO_XA_ONLY: &str = "
-   x/a x/b y/a y/b
x/a .   X   .   .
x/b X   .   .   .
y/a X   X   .   .
y/b .   X   .   .
";

// ---------------------------------------------------------------------------
// The lab, the agents and what they show.

/// A control-plane lab of [`common::lab::cluster`] (no kube-proxy, no DNS: the tests dial pod
/// IPs), or `None` after a loud skip.
fn lab_up(test: &str, prefix: char) -> Option<Lab> {
    common::lab::control_plane_up(test, &format!("k{prefix}"), PORTS)
}

fn cp(lab: &LabState) -> ControlPlaneState {
    cp_ops::control_plane(&lab.name).unwrap_or_else(|e| panic!("{e}"))
}

fn agent_args() -> Vec<String> {
    vec!["--metrics-addr".into(), METRICS_ADDR.into()]
}

/// Installs `deploy/` and starts an agent per node with its ServiceAccount's token; waits
/// until they are synced.
fn kube_agents(test: &str, lab: &LabState) -> (Agents, AgentSource) {
    let started = Instant::now();
    let source = AgentSource::kube(lab, Path::new(DEPLOY))
        .unwrap_or_else(|e| panic!("install deploy/: {e}"));
    let mut agents =
        start_agents_with(lab, Path::new(AGENT), &source, &agent_args()).expect("start agents");
    agents
        .wait_synced(&[], Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "[measure] {test}: deploy/ installed and agents synced in {:.1?}",
        started.elapsed()
    );
    (agents, source)
}

fn apply(lab: &LabState, yaml: &str) {
    cp_ops::apply(&cp(lab), yaml).unwrap_or_else(|e| panic!("kubectl apply: {e}"));
}

fn delete_policy(lab: &LabState, namespace: &str, name: &str) {
    cp_ops::delete(&cp(lab), "networkpolicy", namespace, name)
        .unwrap_or_else(|e| panic!("kubectl delete: {e}"));
}

fn kubectl(lab: &LabState, args: &[&str]) -> String {
    cp(lab)
        .kubectl()
        .expect("kubectl")
        .run(args, None)
        .unwrap_or_else(|e| panic!("{e}"))
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// TCP/80 between every pair of model pods.
fn probe(
    lab: &LabState,
    families: &[Family],
    timeout: Duration,
    attempts: u32,
) -> Vec<(Family, TruthTable)> {
    let spec = ProbeSpec {
        ports: vec![80],
        protocols: vec![Protocol::Tcp],
        families: families.to_vec(),
        timeout,
        attempts,
        ..ProbeSpec::default()
    };
    let results = netpol_lab::probe(lab, &spec).expect("probe");
    families
        .iter()
        .map(|&family| {
            (
                family,
                results.table(&TableKey {
                    port: 80,
                    protocol: Protocol::Tcp,
                    family,
                }),
            )
        })
        .collect()
}

/// Probes both families (1 s per attempt, one retry) and asserts the table.
fn expect_table(lab: &LabState, expected: &str, what: &str) {
    let expected: TruthTable = expected.parse().expect("expected table parses");
    for (family, actual) in probe(lab, &[Family::V4, Family::V6], Duration::from_secs(1), 2) {
        let cmp = expected.compare(&actual);
        assert!(
            cmp.is_match(),
            "{what}: TCP/80 {family} reachability differs:\n{}\nactual:\n{}",
            cmp.render(),
            actual.render()
        );
    }
}

/// Probes IPv4 quickly until the table is `expected` (an agent is applying a change), then
/// asserts it over both families with [`expect_table`]. Returns how long it took.
fn wait_table(lab: &LabState, agents: &Agents, expected: &str, what: &str) -> Duration {
    let started = Instant::now();
    let table: TruthTable = expected.parse().expect("expected table parses");
    loop {
        let (_, actual) = probe(lab, &[Family::V4], Duration::from_millis(300), 1)
            .pop()
            .expect("one family");
        if table.compare(&actual).is_match() {
            break;
        }
        if started.elapsed() > CHANGE_TIMEOUT {
            panic!(
                "{what}: not enforced after {CHANGE_TIMEOUT:?}:\n{}\nactual:\n{}\n{}",
                table.compare(&actual).render(),
                actual.render(),
                agent_logs(agents)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = started.elapsed();
    expect_table(lab, expected, what);
    eprintln!("[measure] {what}: enforced after {took:.1?}");
    took
}

fn agent_logs(agents: &Agents) -> String {
    agents
        .agents
        .iter()
        .map(|a| {
            format!(
                "--- agent on {} ({:?})\n{}",
                a.node,
                a.status(),
                a.log_tail(25)
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// An agent's log so far, without the terminal colours tracing writes even to a file.
fn log_of(agent: &AgentProc) -> String {
    let raw = std::fs::read_to_string(&agent.log).unwrap_or_default();
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ parameters final-byte (a letter).
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The source's lines of an agent's log after byte `offset` (watch failures, 410s, lists),
/// for the test's output.
fn source_log_since(agent: &AgentProc, offset: usize) -> String {
    let log = log_of(agent);
    log.get(offset..)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("kube_source"))
        .map(|l| format!("  {}: {l}", agent.node))
        .collect::<Vec<_>>()
        .join("\n")
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Completed (re)lists in an agent's log so far (three per full relist: one per kind).
fn lists_completed(agent: &AgentProc) -> usize {
    log_of(agent).matches("list complete").count()
}

/// GET `path` from an agent's `--metrics-addr`, from inside its node's netns (as the kubelet's
/// probes reach a hostNetwork pod). Returns the status code and body.
fn agent_http(lab: &LabState, node: &str, path: &str) -> (u16, String) {
    let netns = lab.node(node).expect("node").netns_path();
    let addr: SocketAddr = METRICS_ADDR.parse().expect("address");
    let raw = run_in_netns(&netns, || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: agent\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
    .unwrap_or_else(|e| panic!("GET {path} from the agent on {node}: {e}"));
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw.as_str(), ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("malformed answer to GET {path}: {raw:?}"));
    (code, body.to_owned())
}

/// What an agent's pinned maps hold: endpoints, peers and policy (not flows or counters,
/// which traffic changes).
#[derive(Debug, Clone, PartialEq, Eq)]
struct PinnedMaps {
    endpoints: BTreeMap<u32, EndpointValue>,
    peers_v4: BTreeMap<([u8; 4], u32), PeerValue>,
    peers_v6: BTreeMap<([u8; 16], u32), PeerValue>,
    /// Epoch 1's peer tries (the maps hold two policy states).
    peers1_v4: BTreeMap<([u8; 4], u32), PeerValue>,
    peers1_v6: BTreeMap<([u8; 16], u32), PeerValue>,
    policy: BTreeMap<(PolicyKey, u32), PolicyValue>,
}

impl PinnedMaps {
    fn read(bpffs_root: &Path) -> PinnedMaps {
        let data = |name: &str| {
            let path = bpffs_root.join("maps").join(name);
            MapData::from_pin(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        };
        let endpoints: BpfHashMap<MapData, u32, EndpointValue> =
            BpfHashMap::try_from(Map::HashMap(data(map_names::ENDPOINTS))).expect("endpoints");
        let peers_v4: LpmTrie<MapData, [u8; 4], PeerValue> =
            LpmTrie::try_from(Map::LpmTrie(data(map_names::PEERS_V4))).expect("peers v4");
        let peers_v6: LpmTrie<MapData, [u8; 16], PeerValue> =
            LpmTrie::try_from(Map::LpmTrie(data(map_names::PEERS_V6))).expect("peers v6");
        let peers1_v4: LpmTrie<MapData, [u8; 4], PeerValue> =
            LpmTrie::try_from(Map::LpmTrie(data(map_names::PEERS_V4_E1))).expect("peers v4");
        let peers1_v6: LpmTrie<MapData, [u8; 16], PeerValue> =
            LpmTrie::try_from(Map::LpmTrie(data(map_names::PEERS_V6_E1))).expect("peers v6");
        let policy: LpmTrie<MapData, PolicyKey, PolicyValue> =
            LpmTrie::try_from(Map::LpmTrie(data(map_names::POLICY))).expect("policy");
        PinnedMaps {
            peers1_v4: peers1_v4
                .iter()
                .map(|kv| kv.expect("peer"))
                .map(|(k, v)| ((k.data(), k.prefix_len()), v))
                .collect(),
            peers1_v6: peers1_v6
                .iter()
                .map(|kv| kv.expect("peer"))
                .map(|(k, v)| ((k.data(), k.prefix_len()), v))
                .collect(),
            endpoints: endpoints.iter().map(|kv| kv.expect("endpoint")).collect(),
            peers_v4: peers_v4
                .iter()
                .map(|kv| kv.expect("peer"))
                .map(|(k, v)| ((k.data(), k.prefix_len()), v))
                .collect(),
            peers_v6: peers_v6
                .iter()
                .map(|kv| kv.expect("peer"))
                .map(|(k, v)| ((k.data(), k.prefix_len()), v))
                .collect(),
            policy: policy
                .iter()
                .map(|kv| kv.expect("policy entry"))
                .map(|(k, v)| ((k.data(), k.prefix_len()), v))
                .collect(),
        }
    }

    fn of(agents: &Agents) -> Vec<PinnedMaps> {
        agents
            .agents
            .iter()
            .map(|a| PinnedMaps::read(&a.bpffs_root))
            .collect()
    }

    fn summary(&self) -> String {
        format!(
            "{} endpoints, {} v4 peers, {} v6 peers, {} policy entries",
            self.endpoints.len(),
            self.peers_v4.len(),
            self.peers_v6.len(),
            self.policy.len()
        )
    }
}

fn signal(agent: &AgentProc, sig: libc::c_int) {
    let pid = agent.child.as_ref().expect("agent runs").id();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}

/// Connections tried over and over on a few cells while something happens, each verdict
/// recorded in order (one thread per cell).
struct Sampler {
    stop: Arc<AtomicBool>,
    cells: Vec<(String, String, JoinHandle<Vec<bool>>)>,
}

impl Sampler {
    fn start(lab: &LabState, cells: &[(&str, &str)]) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let cells = cells
            .iter()
            .map(|(from, to)| {
                let (lab, stop) = (lab.clone(), stop.clone());
                let from_pod = lab.pod_by_key(from).expect("from pod").clone();
                let to_ip = IpAddr::V4(lab.pod_by_key(to).expect("to pod").ip_v4);
                let handle = std::thread::spawn(move || {
                    let mut verdicts = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        verdicts.push(connect(
                            &lab,
                            &from_pod,
                            to_ip,
                            80,
                            Protocol::Tcp,
                            Duration::from_secs(1),
                        ));
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    verdicts
                });
                (from.to_string(), to.to_string(), handle)
            })
            .collect();
        Sampler { stop, cells }
    }

    /// Each cell's verdicts, in order.
    fn stop(self) -> Vec<(String, String, Vec<bool>)> {
        self.stop.store(true, Ordering::Relaxed);
        self.cells
            .into_iter()
            .map(|(from, to, h)| (from, to, h.join().expect("sampler thread")))
            .collect()
    }
}

/// Verdicts compressed to runs: `[(true, 12), (false, 3)]`.
fn runs(verdicts: &[bool]) -> Vec<(bool, usize)> {
    let mut out: Vec<(bool, usize)> = Vec::new();
    for &v in verdicts {
        match out.last_mut() {
            Some((last, n)) if *last == v => *n += 1,
            _ => out.push((v, 1)),
        }
    }
    out
}

// ---------------------------------------------------------------------------
// 1. Initial lists.

/// Policies that exist in the API before the agents start are enforced once the agents have
/// listed everything; the status, `/readyz` and `/metrics` say so.
#[test]
fn initial_list_is_enforced_once_synced() {
    const TEST: &str = "initial_list_is_enforced_once_synced";
    let Some(lab) = lab_up(TEST, 'i') else {
        return;
    };
    apply(&lab, &format!("{DENY_ALL_X}\n---\n{ALLOW_YA_TO_XA}"));
    // Nothing enforces them yet.
    expect_table(&lab, ALL_CONNECTED, "before any agent runs");

    let (agents, _) = kube_agents(TEST, &lab);
    // Synced means the lists are in: no waiting for a change here.
    expect_table(&lab, YA_TO_XA_ONLY, "right after the agents synced");

    for a in &agents.agents {
        let st = a.status().expect("status");
        assert_eq!(st["synced"], true, "{}: {st}", a.node);
        assert_eq!(st["endpoints"], 2, "{}: two local pods: {st}", a.node);
        assert!(
            st["errors"].as_array().is_some_and(|e| e.is_empty()),
            "{}: {st}",
            a.node
        );
        // Policy entries are per local pod: x/a's allow on node-a; node-b's x/b is denied
        // everything, which needs no entry.
        let policy_entries = st["map_entries"]["policy"].as_u64().unwrap_or(0);
        assert_eq!(policy_entries > 0, a.node == "node-a", "{}: {st}", a.node);
        let log = log_of(a);
        assert!(
            log.contains(
                "watching namespaces, pods, network policies, service CIDRs, services, cluster network policies and nodes"
            ),
            "{}:\n{log}",
            a.node
        );
        // This lab has no ClusterNetworkPolicy CRD: said once, and ready anyway.
        assert!(
            log.contains("does not serve ClusterNetworkPolicy"),
            "{}:\n{log}",
            a.node
        );
        for kind in [
            "Namespace",
            "Pod",
            "NetworkPolicy",
            "ServiceCIDR",
            "Service",
        ] {
            assert!(
                log.lines()
                    .any(|l| l.contains("list complete") && l.contains(&format!("kind={kind}"))),
                "{}: no completed list of {kind}:\n{log}",
                a.node
            );
        }
        assert!(
            log.lines().any(|l| l.contains("list complete")
                && l.contains("kind=NetworkPolicy")
                && l.contains("objects=2")),
            "{}: the list of policies did not hold both:\n{log}",
            a.node
        );
        let (code, body) = agent_http(&lab, &a.node, "/readyz");
        assert_eq!(code, 200, "{}: /readyz: {body}", a.node);
        let (code, body) = agent_http(&lab, &a.node, "/metrics");
        assert_eq!(code, 200, "{}: /metrics: {body}", a.node);
        assert!(
            body.lines().any(|l| l == "netpol_endpoints 2"),
            "{}: /metrics has no netpol_endpoints 2:\n{body}",
            a.node
        );
    }
}

// ---------------------------------------------------------------------------
// 2. Watches.

/// Changes made through the API while the agents watch: policies applied and deleted with
/// kubectl, a pod relabelled, a namespace relabelled; each is enforced (probes before and
/// after), including revocations.
#[test]
fn watched_changes_are_enforced() {
    const TEST: &str = "watched_changes_are_enforced";
    let Some(mut lab) = lab_up(TEST, 'w') else {
        return;
    };
    let (agents, _) = kube_agents(TEST, &lab);
    expect_table(&lab, ALL_CONNECTED, "no policies");

    apply(
        &lab,
        &format!("{DENY_ALL_X}\n---\n{ALLOW_CLIENTS_TO_XA}\n---\n{ALLOW_BLUE_TO_XB}"),
    );
    let x_isolated = "
-   x/a x/b y/a y/b
x/a .   X   .   .
x/b X   .   .   .
y/a X   X   .   .
y/b X   X   .   .
";
    wait_table(
        &lab,
        &agents,
        x_isolated,
        "three policies applied with kubectl",
    );

    // y/b becomes a client: allowed into x/a.
    lab.set_pod_labels("y", "b", labels(&[("pod", "b"), ("role", "client")]))
        .expect("relabel y/b");
    let yb_client = "
-   x/a x/b y/a y/b
x/a .   X   .   .
x/b X   .   .   .
y/a X   X   .   .
y/b .   X   .   .
";
    wait_table(&lab, &agents, yb_client, "pod y/b relabelled role=client");

    // y becomes team=blue: all of y allowed into x/b.
    lab.set_namespace_labels("y", labels(&[("ns", "y"), ("team", "blue")]))
        .expect("relabel y");
    let y_blue = "
-   x/a x/b y/a y/b
x/a .   X   .   .
x/b X   .   .   .
y/a X   .   .   .
y/b .   .   .   .
";
    wait_table(&lab, &agents, y_blue, "namespace y relabelled team=blue");

    // Deleting the allow revokes it.
    delete_policy(&lab, "x", "allow-clients");
    let revoked = "
-   x/a x/b y/a y/b
x/a .   X   .   .
x/b X   .   .   .
y/a X   .   .   .
y/b X   .   .   .
";
    wait_table(&lab, &agents, revoked, "allow-clients deleted with kubectl");

    delete_policy(&lab, "x", "deny-all");
    delete_policy(&lab, "x", "allow-blue");
    wait_table(&lab, &agents, ALL_CONNECTED, "every policy deleted");
    for a in &agents.agents {
        let st = a.status().expect("status");
        assert_eq!(st["map_entries"]["policy"], 0, "{}: {st}", a.node);
    }
}

// ---------------------------------------------------------------------------
// 3. An IP that changes hands.

/// A deleted pod's addresses given to a different pod: the address carries the new pod's
/// identity, on the node that hosts it and on the node that enforces against it, in both
/// directions (an allowed pod's IP to a denied pod, a denied pod's IP to an allowed one).
#[test]
fn reused_pod_ip_carries_the_new_pods_identity() {
    const TEST: &str = "reused_pod_ip_carries_the_new_pods_identity";
    let Some(mut lab) = lab_up(TEST, 'r') else {
        return;
    };
    apply(&lab, &format!("{DENY_ALL_X}\n---\n{ALLOW_YA_TO_XA}"));
    let (agents, _) = kube_agents(TEST, &lab);
    expect_table(&lab, YA_TO_XA_ONLY, "before");

    let port = PortSpec {
        name: Some("http".into()),
        port: 80,
        protocol: Protocol::Tcp,
    };
    let reuse = |lab: &mut Lab, gone: (&str, &str), new: (&str, &str, &str)| {
        let started = Instant::now();
        let old = lab.remove_pod(gone.0, gone.1).expect("remove pod");
        let pod = lab
            .add_pod(
                PodSpec {
                    namespace: new.0.into(),
                    name: new.1.into(),
                    node: old.node.clone(),
                    labels: labels(&[("pod", new.2)]),
                    ports: vec![port.clone()],
                },
                &netpol_lab::AddPodOptions {
                    ip_v4: Some(old.ip_v4),
                    ip_v6: Some(old.ip_v6),
                    ..Default::default()
                },
            )
            .expect("add pod with the old addresses");
        assert_eq!((pod.ip_v4, pod.ip_v6), (old.ip_v4, old.ip_v6));
        eprintln!(
            "[measure] {}/{} replaced by {}/{} on {} ({}, {}) in {:.1?}",
            gone.0,
            gone.1,
            new.0,
            new.1,
            old.node,
            old.ip_v4,
            old.ip_v6,
            started.elapsed()
        );
        old
    };

    // y/a (allowed into x/a) goes; y/c (pod=c, not allowed) gets its addresses.
    let old_ya = reuse(&mut lab, ("y", "a"), ("y", "c", "c"));
    let after_c = "
-   x/a x/b y/b y/c
x/a .   X   .   .
x/b X   .   .   .
y/b X   X   .   .
y/c X   X   .   .
";
    wait_table(&lab, &agents, after_c, "y/a's addresses now y/c's (pod=c)");

    // y/b (denied) goes; y/d labelled pod=a (allowed) gets its addresses.
    let old_yb = reuse(&mut lab, ("y", "b"), ("y", "d", "a"));
    let after_d = "
-   x/a x/b y/c y/d
x/a .   X   .   .
x/b X   .   .   .
y/c X   X   .   .
y/d .   X   .   .
";
    wait_table(&lab, &agents, after_d, "y/b's addresses now y/d's (pod=a)");

    // The agent enforcing x/a (node-a) names the new owners of the old addresses.
    let node_a = agents
        .agents
        .iter()
        .find(|a| a.node == "node-a")
        .expect("agent on node-a");
    for (ip, owner, allowed) in [
        (IpAddr::V4(old_ya.ip_v4), "y/c", false),
        (IpAddr::V6(old_ya.ip_v6), "y/c", false),
        (IpAddr::V4(old_yb.ip_v4), "y/d", true),
        (IpAddr::V6(old_yb.ip_v6), "y/d", true),
    ] {
        let (code, body) = netpol_agent::api::get(
            &node_a.state_dir,
            &format!(
                "/explain?from={}&to=x/a&port=80/TCP",
                netpol_agent::api::encode_query(&ip.to_string())
            ),
        )
        .unwrap_or_else(|e| panic!("explain {ip} -> x/a: {e}"));
        assert_eq!(code, 200, "explain {ip} -> x/a: {body}");
        let e: netpol_agent::explain::Explanation =
            serde_json::from_str(&body).expect("explanation JSON");
        assert!(
            e.from.starts_with(owner),
            "{ip} should be {owner}'s now:\n{e}"
        );
        assert_eq!(e.allowed, allowed, "{ip} ({owner}) -> x/a:\n{e}");
    }
    // The flow log of x/a's node names y/c as the source of the denied connection.
    std::thread::sleep(Duration::from_millis(300));
    let c_ip = old_ya.ip_v4.to_string();
    let logs = node_a.flow_logs();
    assert!(
        logs.iter().any(|(_, l)| l["verdict"] == "deny"
            && l["src"]["ip"] == c_ip.as_str()
            && l["src"]["pod"] == "c"
            && l["src"]["namespace"] == "y"),
        "no denied flow from y/c ({c_ip}) in node-a's flow log: {logs:?}"
    );
}

// ---------------------------------------------------------------------------
// 4. API server restart.

/// kube-apiserver is SIGKILLed: while it is down, the verdicts and the pinned maps stay as
/// they were; started again, a change made then is enforced, and a prober on four cells
/// sees each cell's verdict change at most once, in the expected direction.
#[test]
fn apiserver_restart_keeps_enforcing_and_resyncs() {
    const TEST: &str = "apiserver_restart_keeps_enforcing_and_resyncs";
    let Some(mut lab) = lab_up(TEST, 'a') else {
        return;
    };
    let allow_ya_or_clients = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-ya-or-clients, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
    - from:
        - namespaceSelector: {matchLabels: {ns: "y"}}
          podSelector: {matchLabels: {pod: a}}
        - namespaceSelector: {matchLabels: {ns: "y"}}
          podSelector: {matchLabels: {role: client}}
      ports: [{protocol: TCP, port: 80}]
"#;
    apply(&lab, &format!("{DENY_ALL_X}\n---\n{allow_ya_or_clients}"));
    let (mut agents, _) = kube_agents(TEST, &lab);
    expect_table(&lab, YA_TO_XA_ONLY, "before the restart");

    let maps_before = PinnedMaps::of(&agents);
    let revisions_before = agents.revisions();
    let lists_before: Vec<usize> = agents.agents.iter().map(lists_completed).collect();
    let log_offsets: Vec<usize> = agents.agents.iter().map(|a| log_of(a).len()).collect();
    // (from, to, verdict before, verdict after)
    let cells = [
        ("y/a", "x/a", true, true),
        ("y/b", "x/a", false, true),
        ("y/a", "x/b", false, false),
        ("x/a", "y/b", true, true),
    ];
    let sampler = Sampler::start(&lab, &cells.iter().map(|c| (c.0, c.1)).collect::<Vec<_>>());

    let down_at = Instant::now();
    let command = cp_ops::kill_apiserver(&lab.name).unwrap_or_else(|e| panic!("{e}"));
    std::thread::sleep(Duration::from_secs(4));
    expect_table(&lab, YA_TO_XA_ONLY, "kube-apiserver down");
    assert_eq!(
        PinnedMaps::of(&agents),
        maps_before,
        "the maps changed while kube-apiserver was down"
    );
    for a in &mut agents.agents {
        assert!(
            a.exited().is_none(),
            "{} exited:\n{}",
            a.node,
            a.log_tail(20)
        );
        assert!(
            log_of(a).contains("watch failed, retrying with backoff"),
            "{}: the lost watches are not logged:\n{}",
            a.node,
            a.log_tail(20)
        );
    }
    cp_ops::start_apiserver(&lab.name, &command).unwrap_or_else(|e| panic!("{e}"));
    let back_at = Instant::now();
    eprintln!(
        "[measure] {TEST}: kube-apiserver down and back (ready) in {:.1?}",
        down_at.elapsed()
    );
    lab.reload().expect("reload lab state");

    // The agents reconnect (a relist when their resume points predate the new API server's
    // watch cache); the cluster is the same, so nothing may change in the maps.
    let deadline = Instant::now() + CHANGE_TIMEOUT;
    let deadline = deadline.min(Instant::now() + Duration::from_secs(50));
    let relisted = loop {
        let done: Vec<bool> = agents
            .agents
            .iter()
            .zip(&lists_before)
            .map(|(a, before)| lists_completed(a) >= before + 3)
            .collect();
        if done.iter().all(|d| *d) || Instant::now() > deadline {
            break done;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!(
        "[measure] {TEST}: agents relisted all three kinds after the restart: {relisted:?} \
         ({:.1?} after the kill, {:.1?} after the API server was ready again); their log:\n{}",
        down_at.elapsed(),
        back_at.elapsed(),
        agents
            .agents
            .iter()
            .zip(&log_offsets)
            .map(|(a, offset)| source_log_since(a, *offset))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        PinnedMaps::of(&agents),
        maps_before,
        "a relist of an unchanged cluster changed the maps"
    );
    assert_eq!(
        agents.revisions(),
        revisions_before,
        "a relist of an unchanged cluster moved the source revision"
    );

    let changed_at = Instant::now();
    lab.set_pod_labels("y", "b", labels(&[("pod", "b"), ("role", "client")]))
        .expect("relabel y/b after the restart");
    let yb_client = "
-   x/a x/b y/a y/b
x/a .   X   .   .
x/b X   .   .   .
y/a .   X   .   .
y/b .   X   .   .
";
    wait_table(&lab, &agents, yb_client, "y/b relabelled after the restart");
    eprintln!(
        "[measure] {TEST}: change after the restart enforced in {:.1?}",
        changed_at.elapsed()
    );
    std::thread::sleep(Duration::from_millis(500));
    for ((from, to, verdicts), (_, _, before, after)) in sampler.stop().into_iter().zip(cells) {
        let runs = runs(&verdicts);
        let expected: Vec<bool> = if before == after {
            vec![before]
        } else {
            vec![before, after]
        };
        let seen: Vec<bool> = runs.iter().map(|r| r.0).collect();
        assert_eq!(
            seen, expected,
            "{from} -> {to}: verdict runs {runs:?} (true = connected); expected {expected:?}"
        );
        eprintln!("[measure] {TEST}: {from} -> {to}: {runs:?}");
    }
}

// ---------------------------------------------------------------------------
// 5. 410 Gone after a compaction.

/// The agents are frozen (SIGSTOP) while many changes are made, etcd is compacted at its
/// current revision and kube-apiserver restarts: when they resume, their watches cannot be
/// resumed (`410 Gone`), they relist and enforce the latest state, which they never saw as
/// events. While frozen, enforcement stays as it was.
#[test]
fn watch_expired_after_compaction_relists() {
    const TEST: &str = "watch_expired_after_compaction_relists";
    let Some(lab) = lab_up(TEST, 'g') else {
        return;
    };
    apply(&lab, &format!("{DENY_ALL_X}\n---\n{ALLOW_YA_TO_XA}"));
    let (mut agents, _) = kube_agents(TEST, &lab);
    expect_table(&lab, YA_TO_XA_ONLY, "before");
    let lists_before: Vec<usize> = agents.agents.iter().map(lists_completed).collect();
    let log_len_before: Vec<usize> = agents.agents.iter().map(|a| log_of(a).len()).collect();

    for a in &agents.agents {
        signal(a, libc::SIGSTOP);
    }
    let frozen_at = Instant::now();

    // Many changes they miss: twenty policies created and deleted, twenty updates of
    // allow-ya, then the change that matters (allow-ya replaced by allow-yb).
    let churn: Vec<String> = (0..20)
        .map(|i| {
            format!(
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
                 metadata: {{name: churn-{i}, namespace: \"y\", labels: {{churn: \"true\"}}}}\n\
                 spec: {{podSelector: {{matchLabels: {{pod: none-{i}}}}}}}\n"
            )
        })
        .collect();
    apply(&lab, &churn.join("---\n"));
    kubectl(
        &lab,
        &["delete", "networkpolicy", "-n", "y", "-l", "churn=true"],
    );
    for i in 0..20 {
        kubectl(
            &lab,
            &[
                "annotate",
                "networkpolicy",
                "allow-ya",
                "-n",
                "x",
                &format!("netpol-test/churn={i}"),
                "--overwrite",
            ],
        );
    }
    delete_policy(&lab, "x", "allow-ya");
    apply(&lab, ALLOW_YB_TO_XA);
    // An object the agents do not watch moves etcd past every object they do.
    kubectl(&lab, &["create", "configmap", "bump", "-n", "x"]);

    let control = cp(&lab);
    let revision = cp_ops::etcd_revision(&control).unwrap_or_else(|e| panic!("{e}"));
    cp_ops::etcd_compact(&control, revision).unwrap_or_else(|e| panic!("{e}"));
    // The history before it is gone.
    let err = cp_ops::etcd_call(
        &control,
        "/v3/kv/range",
        &serde_json::json!({ "key": "AA==", "revision": (revision - 1).to_string() }),
    )
    .expect_err("reading below the compacted revision");
    assert!(err.to_string().contains("compacted"), "{err}");
    // Their connections drop with the old API server. The new one's watch cache starts at
    // etcd's current revision, after every resume point they hold (restarted before the
    // writes, the cache would hold them as events whenever a bookmark had moved an agent's
    // resume point past the cache's start, and no 410 would come).
    cp_ops::restart_apiserver(&lab.name).unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "[measure] {TEST}: API server restarted, 63 writes made and etcd compacted at revision \
         {revision} in {:.1?} while the agents were frozen",
        frozen_at.elapsed()
    );

    // Nothing runs the control plane of the datapath: it enforces what it had.
    expect_table(&lab, YA_TO_XA_ONLY, "agents frozen, changes made");

    for a in &agents.agents {
        signal(a, libc::SIGCONT);
    }
    wait_table(
        &lab,
        &agents,
        YB_TO_XA_ONLY,
        "the changes missed while frozen",
    );
    for ((a, before), len) in agents
        .agents
        .iter_mut()
        .zip(&lists_before)
        .zip(&log_len_before)
    {
        assert!(
            a.exited().is_none(),
            "{} exited:\n{}",
            a.node,
            a.log_tail(20)
        );
        let log = log_of(a);
        let since = &log[*len..];
        assert!(
            since.contains("watch expired (410 Gone): relisting"),
            "{}: no 410 relist in the log since the agents were frozen:\n{since}",
            a.node
        );
        let lists = lists_completed(a) - before;
        assert!(
            lists >= 1,
            "{}: no list completed after the 410:\n{since}",
            a.node
        );
        let expired: Vec<&str> = since.lines().filter(|l| l.contains("410 Gone")).collect();
        eprintln!(
            "[measure] {TEST}: {}: {} lists completed after resuming; 410s:\n  {}",
            a.node,
            lists,
            expired.join("\n  ")
        );
        let st = a.status().expect("status");
        assert_eq!(st["synced"], true, "{}: {st}", a.node);
    }
}

// ---------------------------------------------------------------------------
// 6. A token without RBAC rights.

/// An agent whose ServiceAccount has no bindings: the log names each resource it may not
/// list (forbidden), `/readyz` answers 503, and restarting an enforcing agent with that token
/// removes nothing from its pinned maps: its pods stay enforced.
#[test]
fn token_without_rbac_rights_is_reported_and_keeps_enforcement() {
    const TEST: &str = "token_without_rbac_rights_is_reported_and_keeps_enforcement";
    let Some(lab) = lab_up(TEST, 'f') else {
        return;
    };
    apply(&lab, &format!("{DENY_ALL_X}\n---\n{ALLOW_YA_TO_XA}"));
    let (mut agents, _) = kube_agents(TEST, &lab);
    expect_table(&lab, YA_TO_XA_ONLY, "with the right token");
    let maps_before = PinnedMaps::of(&agents);
    let (code, _) = agent_http(&lab, "node-a", "/readyz");
    assert_eq!(code, 200, "ready with the right token");

    let control = cp(&lab);
    let (sa_ns, sa) = ("kube-system", "netpol-nobody");
    let bad = AgentSource::Kube {
        kubeconfig: cp_ops::service_account_kubeconfig(&control, sa_ns, sa)
            .unwrap_or_else(|e| panic!("{e}")),
    };
    let who = format!("system:serviceaccount:{sa_ns}:{sa}");
    // `kubectl auth can-i` answers on stdout and exits 1 for "no".
    let can_i = control
        .kubectl()
        .expect("kubectl")
        .command()
        .args([
            "auth",
            "can-i",
            "list",
            "pods",
            "--all-namespaces",
            "--as",
            &who,
        ])
        .output()
        .expect("kubectl auth can-i");
    let answer = String::from_utf8_lossy(&can_i.stdout);
    assert_eq!(answer.trim(), "no", "{who} may list pods?");

    // node-a's agent restarts with the token that may not read anything.
    let i = agents
        .agents
        .iter()
        .position(|a| a.node == "node-a")
        .expect("agent on node-a");
    agents.agents[i].terminate();
    let _ = std::fs::remove_file(agents.agents[i].state_dir.join("status.json"));
    let log_offset = log_of(&agents.agents[i]).len();
    let node = lab.node("node-a").expect("node-a").clone();
    agents.agents[i] = AgentProc::start_with(&lab, &node, Path::new(AGENT), &bad, &agent_args())
        .expect("start agent with the bad token");
    let started = Instant::now();
    let a = &mut agents.agents[i];

    // Every kind is refused, and the log says which resource and which verb.
    let wanted = [
        ("namespaces", ""),
        ("pods", ""),
        ("networkpolicies", "networking.k8s.io"),
        ("services", ""),
        ("servicecidrs", "networking.k8s.io"),
    ];
    let deadline = started + Duration::from_secs(30);
    // The agent's own line carries the API's message as is: `pods is forbidden: User
    // "system:serviceaccount:..." cannot list resource "pods" in API group "" at the cluster
    // scope`.
    let refusal = |log: &str, res: &str, group: &str| -> Option<String> {
        let needle = format!("cannot list resource \"{res}\" in API group \"{group}\"");
        log.lines()
            .find(|l| {
                l.contains("watch failed")
                    && l.contains(" is forbidden: ")
                    && l.contains(&who)
                    && l.contains(&needle)
            })
            .map(str::to_owned)
    };
    let since = loop {
        let since = log_of(a)[log_offset..].to_string();
        if wanted
            .iter()
            .all(|(res, group)| refusal(&since, res, group).is_some())
        {
            break since;
        }
        assert!(
            Instant::now() < deadline,
            "the agent's log does not name every forbidden resource:\n{since}"
        );
        assert!(a.exited().is_none(), "the agent exited:\n{since}");
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!(
        "[measure] {TEST}: every forbidden list logged {:.1?} after the start; e.g.\n  {}",
        started.elapsed(),
        refusal(&since, "pods", "").unwrap_or_default()
    );
    // Not ready, and it says so (the status names no cause: that is only in the log).
    let (code, body) = agent_http(&lab, "node-a", "/readyz");
    assert_eq!(code, 503, "/readyz with a token that may not list: {body}");
    let (code, _) = agent_http(&lab, "node-a", "/healthz");
    assert_eq!(code, 200, "/healthz: the process itself is fine");
    let st = a.status().expect("status");
    assert_eq!(st["synced"], false, "{st}");
    assert!(
        a.exited().is_none(),
        "the agent exited:\n{}",
        a.log_tail(20)
    );

    // Nothing was taken away: maps as they were, pods enforced as before.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        PinnedMaps::read(&a.bpffs_root),
        maps_before[i],
        "the maps of node-a changed under the agent without rights"
    );
    expect_table(&lab, YA_TO_XA_ONLY, "node-a's agent without rights");
    eprintln!(
        "[measure] {TEST}: node-a's maps unchanged: {}",
        maps_before[i].summary()
    );
    let since = log_of(a)[log_offset..].to_string();
    eprintln!(
        "[measure] {TEST}: refused lists in the {:.1?} since the start: {:?}; \
         'watch recovered' lines (a list that then failed): {}",
        started.elapsed(),
        failed_watches(&since),
        since.matches("watch recovered").count()
    );
}

/// Failed list or watch attempts logged in `log`, per kind.
fn failed_watches(log: &str) -> BTreeMap<&'static str, usize> {
    ["Namespace", "Pod", "NetworkPolicy"]
        .into_iter()
        .map(|kind| {
            let n = log
                .lines()
                .filter(|l| {
                    l.contains("watch failed, retrying with backoff")
                        && l.trim_end().ends_with(&format!("kind={kind}"))
                })
                .count();
            (kind, n)
        })
        .collect()
}

/// A list that the API server keeps refusing (403) is retried with a growing delay: the
/// agent's backoff (kube-runtime's default: 0.8 s doubling to 30 s) allows at most five
/// attempts per kind in 20 s. It does not grow: kube-runtime's `StreamBackoff` resets the
/// backoff on every `Ok` item, and the watcher yields `Ok(Event::Init)` before each list
/// attempt, so the delay never leaves its first step and each agent sends each kind's LIST
/// about once a second for as long as its token lacks the rights.
#[test]
fn refused_lists_back_off() {
    const TEST: &str = "refused_lists_back_off";
    /// How long the refusals are counted.
    const WINDOW: Duration = Duration::from_secs(20);
    let Some(lab) = lab_up(TEST, 'b') else {
        return;
    };
    let bad = AgentSource::Kube {
        kubeconfig: cp_ops::service_account_kubeconfig(&cp(&lab), "kube-system", "netpol-nobody")
            .unwrap_or_else(|e| panic!("{e}")),
    };
    let node = lab.node("node-a").expect("node-a").clone();
    let agents = Agents {
        agents: vec![
            AgentProc::start_with(&lab, &node, Path::new(AGENT), &bad, &agent_args())
                .expect("start agent"),
        ],
    };
    std::thread::sleep(WINDOW);
    let failed = failed_watches(&log_of(&agents.agents[0]));
    eprintln!("[measure] {TEST}: refused lists in {WINDOW:?}: {failed:?}");
    for (kind, n) in failed {
        assert!(
            n <= 5,
            "{kind}: {n} refused lists in {WINDOW:?}: no backoff\n{}",
            last_lines(&log_of(&agents.agents[0]), 6)
        );
    }
}

/// A pod that appears on a node whose agent cannot list (it was restarted with a token
/// without rights) is in a default-deny namespace: it must be denied, as the agent does for
/// any veth whose pod it does not know ("pending = deny"), not left without programs.
#[test]
fn new_pod_is_denied_while_the_source_cannot_list() {
    const TEST: &str = "new_pod_is_denied_while_the_source_cannot_list";
    let Some(mut lab) = lab_up(TEST, 'n') else {
        return;
    };
    apply(&lab, &format!("{DENY_ALL_X}\n---\n{ALLOW_YA_TO_XA}"));
    let (mut agents, _) = kube_agents(TEST, &lab);
    expect_table(&lab, YA_TO_XA_ONLY, "with the right token");

    let bad = AgentSource::Kube {
        kubeconfig: cp_ops::service_account_kubeconfig(&cp(&lab), "kube-system", "netpol-nobody")
            .unwrap_or_else(|e| panic!("{e}")),
    };
    let i = agents
        .agents
        .iter()
        .position(|a| a.node == "node-a")
        .expect("agent on node-a");
    agents.agents[i].terminate();
    let _ = std::fs::remove_file(agents.agents[i].state_dir.join("status.json"));
    let node = lab.node("node-a").expect("node-a").clone();
    agents.agents[i] = AgentProc::start_with(&lab, &node, Path::new(AGENT), &bad, &agent_args())
        .expect("start agent with the bad token");
    let deadline = Instant::now() + Duration::from_secs(20);
    while agents.agents[i]
        .status()
        .is_none_or(|st| st["synced"] != false)
    {
        assert!(
            Instant::now() < deadline,
            "no status from the restarted agent"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // x/c on node-a: x is default-deny, and the agent there cannot know the pod.
    lab.add_pod(
        PodSpec {
            namespace: "x".into(),
            name: "c".into(),
            node: "node-a".into(),
            labels: labels(&[("pod", "c")]),
            ports: vec![PortSpec {
                name: Some("http".into()),
                port: 80,
                protocol: Protocol::Tcp,
            }],
        },
        &netpol_lab::AddPodOptions::default(),
    )
    .expect("add x/c");
    std::thread::sleep(Duration::from_secs(3));
    let a = &agents.agents[i];
    let links = std::fs::read_dir(a.bpffs_root.join("links"))
        .map(|d| d.count())
        .unwrap_or_default();
    eprintln!(
        "[measure] {TEST}: node-a's agent (cannot list) has {links} pinned links for 3 pods; \
         status {:?}",
        a.status()
    );
    for (family, actual) in probe(&lab, &[Family::V4, Family::V6], Duration::from_secs(1), 2) {
        let reached: Vec<&str> = ["x/a", "x/b", "y/a", "y/b"]
            .into_iter()
            .filter(|from| actual.get(from, "x/c") != Some(false))
            .collect();
        assert!(
            reached.is_empty(),
            "{family}: {reached:?} reached x/c, a new pod in default-deny x, while node-a's \
             agent cannot list:\n{}",
            actual.render()
        );
    }
}

// ---------------------------------------------------------------------------
// 7. The API server stays down.

/// kube-apiserver is SIGKILLed and kept down: a relabel cannot happen (the lab's kubectl
/// fails), and for the whole time the agents keep enforcing the last state with unchanged
/// maps. What they report meanwhile (`/readyz`, the status) is printed: readiness means "has a
/// complete state", so they stay ready; the log is where the outage shows.
#[test]
fn apiserver_down_keeps_last_state_enforced() {
    const TEST: &str = "apiserver_down_keeps_last_state_enforced";
    /// How long the API server stays down.
    const OUTAGE: Duration = Duration::from_secs(15);
    let Some(mut lab) = lab_up(TEST, 'd') else {
        return;
    };
    apply(&lab, &format!("{DENY_ALL_X}\n---\n{ALLOW_YA_TO_XA}"));
    let (mut agents, _) = kube_agents(TEST, &lab);
    expect_table(&lab, YA_TO_XA_ONLY, "before the outage");
    let maps_before = PinnedMaps::of(&agents);
    let revisions_before = agents.revisions();

    let down_at = Instant::now();
    cp_ops::kill_apiserver(&lab.name).unwrap_or_else(|e| panic!("{e}"));
    let err = lab
        .set_pod_labels("y", "b", labels(&[("pod", "a")]))
        .expect_err("a relabel without an API server");
    eprintln!("[measure] {TEST}: relabel refused while down: {err}");
    assert_eq!(
        lab.pod("y", "b").expect("y/b").labels,
        labels(&[("pod", "b")]),
        "the lab recorded a relabel that did not happen"
    );
    let mut observed = Vec::new();
    while down_at.elapsed() < OUTAGE {
        expect_table(
            &lab,
            YA_TO_XA_ONLY,
            &format!("{:.0?} into the outage", down_at.elapsed()),
        );
        assert_eq!(
            PinnedMaps::of(&agents),
            maps_before,
            "the maps changed {:.0?} into the outage",
            down_at.elapsed()
        );
        for a in &mut agents.agents {
            let exited = a.exited();
            assert!(
                exited.is_none(),
                "{} exited ({exited:?}):\n{}",
                a.node,
                a.log_tail(20)
            );
            let (code, _) = agent_http(&lab, &a.node, "/readyz");
            let st = a.status().expect("status");
            observed.push(format!(
                "{:>4.1?} {}: /readyz {code}, synced {}, source_revision {}, last_sync_unix_ms {}",
                down_at.elapsed(),
                a.node,
                st["synced"],
                st["source_revision"],
                st["last_sync_unix_ms"]
            ));
            // A complete (if old) state is enforced: ready, as before.
            assert_eq!(code, 200, "{}: /readyz during the outage", a.node);
            assert_eq!(st["synced"], true, "{}: {st}", a.node);
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    assert_eq!(agents.revisions(), revisions_before);
    for a in &agents.agents {
        let log = log_of(a);
        for kind in ["Namespace", "Pod", "NetworkPolicy"] {
            assert!(
                log.lines()
                    .any(|l| l.contains("watch failed, retrying with backoff")
                        && l.contains(&format!("kind={kind}"))),
                "{}: the outage of the {kind} watch is not logged:\n{}",
                a.node,
                a.log_tail(20)
            );
        }
        let failures = log
            .lines()
            .filter(|l| l.contains("watch failed, retrying with backoff"))
            .count();
        eprintln!(
            "[measure] {TEST}: {}: {failures} failed watch attempts logged in {OUTAGE:?}",
            a.node
        );
    }
    eprintln!(
        "[measure] {TEST}: what the agents reported during the outage:\n  {}",
        observed.join("\n  ")
    );
}

/// Readiness follows the source: with `--stale-after-secs 3`, an API server that stays down
/// makes `/readyz` answer 503 naming the failing watches (the status says the same), while
/// the last state stays enforced; once the API server is back and their watches have
/// delivered again, the agents are ready again.
#[test]
fn readiness_goes_while_the_apiserver_is_away_too_long_and_comes_back() {
    const TEST: &str = "readiness_goes_while_the_apiserver_is_away_too_long_and_comes_back";
    let Some(lab) = lab_up(TEST, 'r') else {
        return;
    };
    apply(&lab, &format!("{DENY_ALL_X}\n---\n{ALLOW_YA_TO_XA}"));
    let source = AgentSource::kube(&lab, Path::new(DEPLOY))
        .unwrap_or_else(|e| panic!("install deploy/: {e}"));
    let mut args = agent_args();
    args.extend(["--stale-after-secs".to_owned(), "3".to_owned()]);
    let mut agents = start_agents_with(&lab, Path::new(AGENT), &source, &args).expect("agents");
    agents
        .wait_synced(&[], Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    for a in &agents.agents {
        assert_eq!(agent_http(&lab, &a.node, "/readyz").0, 200, "{}", a.node);
    }
    let command = cp_ops::kill_apiserver(&lab.name).unwrap_or_else(|e| panic!("{e}"));
    let down_at = Instant::now();
    for a in &agents.agents {
        let deadline = Instant::now() + Duration::from_secs(30);
        let body = loop {
            let (code, body) = agent_http(&lab, &a.node, "/readyz");
            if code == 503 {
                break body;
            }
            assert!(
                Instant::now() < deadline,
                "{}: /readyz still {code} {:.0?} into the outage",
                a.node,
                down_at.elapsed()
            );
            std::thread::sleep(Duration::from_millis(250));
        };
        assert!(body.contains("watch has failed for"), "{}: {body}", a.node);
        let st = a.status().expect("status");
        assert!(
            st["not_ready"].as_array().is_some_and(|r| r
                .iter()
                .any(|w| w.as_str().is_some_and(|w| w.contains("watch has failed")))),
            "{}: {st}",
            a.node
        );
        eprintln!(
            "[measure] {TEST}: {} not ready {:.1?} into the outage: {}",
            a.node,
            down_at.elapsed(),
            body.trim()
        );
    }
    expect_table(&lab, YA_TO_XA_ONLY, "while not ready");
    cp_ops::start_apiserver(&lab.name, &command).unwrap_or_else(|e| panic!("{e}"));
    let back_at = Instant::now();
    for a in &agents.agents {
        // Watch retries back off as client-go's reflectors do (kube-runtime's default: 0.8 s
        // doubling to 30 s, plus up to 100% jitter), so after an outage of about 20 s the
        // last retry may come a minute later.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let (code, body) = agent_http(&lab, &a.node, "/readyz");
            if code == 200 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: not ready 120 s after the API server came back: {body}\n{}",
                a.node,
                a.log_tail(80)
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        eprintln!(
            "[measure] {TEST}: {} ready again {:.1?} after the API server was started",
            a.node,
            back_at.elapsed()
        );
    }
}
