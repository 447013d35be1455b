//! The agent against a real API server holding 10k and 100k Pod objects:
//! memory, time and CPU of the initial sync, and the latency and CPU of
//! each kind of change.
//!
//! For each `--pods` size, a control-plane lab (`netpol_lab::controlplane`:
//! etcd, kube-apiserver, kube-controller-manager; no kube-proxy, no DNS)
//! with one real node, `worker-0`, where the agent runs. `deploy/` is
//! installed (`kubectl apply -k`) for the agent's ServiceAccount and RBAC;
//! its DaemonSet is deleted again (the lab has no scheduler: it would only
//! leave a Pending pod per node). Then, through a kube client in the
//! control plane's netns (this program's API thread enters it before its
//! tokio runtime starts):
//!
//! - namespaces `ns-0000`, ... (one per `--pods-per-namespace` pods), with
//!   `team` and `env` labels (and their `default` ServiceAccount);
//! - fake Node objects (one node per `--pods-per-node` pods; node 0 is the
//!   real `worker-0`), so that the pod garbage collector leaves the pods
//!   alone (the node lifecycle controller is off in the lab);
//! - the pods, objects only (no netns): created with a container that has
//!   named ports, resources and the ServiceAccount token volume that
//!   admission adds, then their status written as a kubelet does (Running,
//!   conditions, container status, podIPs from 100.64.0.0/10, and an IPv6
//!   address in one namespace in five). Labels: `app`, `tier`, `version`,
//!   `pod-template-hash` (10 apps per namespace); pods are spread over
//!   namespaces and nodes;
//! - `--policies` NetworkPolicies (default 50,000), the mix of the `control_plane` benchmark
//!   (default deny, DNS egress, monitoring ingress on a named port,
//!   same-namespace, ipBlocks with excepts, namespace selectors,
//!   matchExpressions, port ranges...).
//!
//! Then `netpol-agent run --source kube` starts on `worker-0` (default
//! settings: `--poll-ms 200`, list pages of 500), and the program prints the
//! time to its first sync (status file `synced`), its CPU time for it
//! (utime + stime of `/proc/<pid>/stat`), VmRSS and VmHWM, the memlock of
//! its BPF maps, and its idle CPU use.
//!
//! Then `--changes` changes of each kind, one at a time: a pod created
//! (Pending, no IP yet), the same pod's status written (Running, podIPs),
//! a pod relabelled, a pod deleted (grace period 0: the kubelet's final
//! delete; a graceful delete only sets deletionTimestamp, which the agent
//! does not act on), a namespace relabelled, a policy added, a policy
//! removed; then an identity split (a policy, in a namespace with a pod on
//! the agent's node, whose peer `app In [app0..app4]` in every namespace
//! splits about half the pods of every identity off: thousands of peer
//! entries rewritten; removed again after it is measured), the merge back
//! (the same policy removed; it is added first, unmeasured), and a pod
//! relabel written right after a split policy, to see whether an ordinary
//! change waits behind the split. For each change: the latency from the
//! (last) API write returning to the agent's status file saying `synced`
//! at a source revision that includes it (read every 5 ms); the agent's
//! own time from the watch event to the end of its map writes, when it
//! exports the histogram `netpol_change_seconds{kind}` (read before and
//! after the change: the delta of `_sum` over one change is that change's
//! exact time; the bucket deltas over the batch give coarse quantiles too,
//! interpolated inside doubling buckets); and the agent's time on CPU over
//! the same span (`/proc/<pid>/task/*/schedstat`, in nanoseconds: utime and
//! stime come in 10 ms ticks); per batch also utime + stime over the whole
//! batch divided by the number of changes. Between changes: a pause of
//! `--gap-ms` plus up to 200 ms at random, so that changes never batch and
//! land at random phases of the agent's poll. Per kind, the agent's own
//! `netpol_compile_seconds` and `netpol_apply_seconds` histograms (its
//! `/metrics`, read over its unix socket before and after the batch) give
//! the mean compile and apply time per sync.
//!
//! CPU times are the agent's own (from /proc), so other work on the
//! machine inflates them less than wall-clock latencies, but a shared
//! 2-CPU machine still slows everything (cache, frequency, waiting for a
//! CPU): read the numbers as orders of magnitude. The load average is
//! printed with each size.
//!
//! Run as root, in release: `cargo build --release -p netpol-agent -p
//! netpol-lab` (their binaries: `--bin agent_scale` alone would leave them
//! out) and `cargo build --release -p netpol-benches --bin agent_scale`,
//! then `target/release/agent_scale [--pods 10000,100000] [--policies
//! 50000] [--json out.json] [--svg target/bench/agent_scale.svg]`.
//! Creating 100k pods takes 9 minutes at 370 writes/s on an idle 2-CPU
//! machine (much longer on a busy one) and 50k policies a few more; long
//! steps print progress lines. `--plot-from out.json` redraws the SVG of a
//! run. Needs the control-plane tools (`cargo xtask setup`).

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use clap::Parser;
use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, ServiceAccount},
    networking::v1::NetworkPolicy,
};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use netpol_benches::{
    Binaries, machine::Machine, require_root, stats::median_and, svg, write_json,
};
use netpol_lab::{
    AgentProc, AgentSource, Agents, ClusterSpec, Lab, UpOptions,
    agents::{agent_paths, remove_agent_pins},
    controlplane::{self, ControlPlaneSpec, ControlPlaneState, ProxyMode},
    netns::{enter_netns, open_netns},
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

#[derive(Parser)]
struct Args {
    /// Pod counts, one lab each (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [10_000u32, 100_000])]
    pods: Vec<u32>,
    /// NetworkPolicies (the scale: 50k with 100k pods).
    #[arg(long, default_value_t = 50_000)]
    policies: u32,
    /// Changes of each kind.
    #[arg(long, default_value_t = 20)]
    changes: usize,
    /// One namespace per this many pods.
    #[arg(long, default_value_t = 100)]
    pods_per_namespace: u32,
    /// One node per this many pods (node 0 is the agent's).
    #[arg(long, default_value_t = 100)]
    pods_per_node: u32,
    /// Pause after a change is synced before the next one (plus up to 200
    /// ms at random).
    #[arg(long, default_value_t = 300)]
    gap_ms: u64,
    /// API requests in flight while creating the objects.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// How long the agent gets for its first sync and for each change.
    #[arg(long, default_value_t = 900)]
    timeout_secs: u64,
    /// A reduced run: 10,000 pods, 5 changes of each kind.
    #[arg(long)]
    quick: bool,
    /// netpol's deploy/ directory [default: the one of this source tree].
    #[arg(long)]
    deploy_dir: Option<PathBuf>,
    #[command(flatten)]
    bins: Binaries,
    /// Lab name.
    #[arg(long, default_value = "npb-agent-scale")]
    lab: String,
    /// Write the numbers (every sample included) as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the plot (latency per kind of change, agent memory) here.
    #[arg(long, default_value = "target/bench/agent_scale.svg")]
    svg: PathBuf,
    /// Only plot: read the numbers from this `--json` output of an earlier
    /// run and write `--svg` (no root, no lab).
    #[arg(long)]
    plot_from: Option<PathBuf>,
}

/// `--plot-from`: the SVG of an earlier run's JSON.
fn replot(from: &Path, to: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(from).with_context(|| format!("reading {}", from.display()))?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", from.display()))?;
    let sizes: Vec<SizeResult> =
        serde_json::from_value(v["sizes"].clone()).context("the run's sizes")?;
    let cpus = v["machine"]["cpus"].as_u64().unwrap_or(0) as usize;
    let kernel = v["machine"]["kernel"].as_str().unwrap_or("?");
    plot(&sizes, cpus, kernel).write(to)?;
    println!("wrote {}", to.display());
    Ok(())
}

/// The real node, where the agent runs.
const REAL_NODE: &str = "worker-0";
/// Apps (deployments) per namespace.
const APPS: u32 = 10;
const TIERS: [&str; 4] = ["frontend", "backend", "db", "cache"];
const ENVS: [&str; 3] = ["prod", "staging", "dev"];
/// Kinds of policy in the mix.
const POLICY_KINDS: u32 = 50;

// ---------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------

#[derive(Serialize)]
struct Output {
    benchmark: &'static str,
    machine: Machine,
    method: String,
    agent_args: Vec<String>,
    sizes: Vec<SizeResult>,
    secs: f64,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(default)]
struct SizeResult {
    pods: u32,
    policies: u32,
    namespaces: u32,
    nodes: u32,
    /// Pods on the agent's node (objects only; none has a veth).
    local_pods: u32,
    load_before: String,
    /// When the changes start and at the end.
    load_changes: String,
    load_end: String,
    /// Creating everything through the API.
    populate_secs: f64,
    api_writes: u64,
    api_writes_per_sec: f64,
    apiserver_rss_mib: f64,
    etcd_rss_mib: f64,
    /// Agent start -> the last "list complete" in its log before the
    /// first sync, and how many there were (one per kind watched).
    lists_done_secs: Option<f64>,
    lists: usize,
    /// Agent start -> status `synced`.
    first_sync_secs: f64,
    /// utime + stime at the first sync.
    first_sync_cpu_secs: f64,
    rss_after_sync_mib: f64,
    hwm_after_sync_mib: f64,
    /// Memlock of the agent's BPF maps (kernel memory, not in VmRSS, but
    /// charged to the agent's memory cgroup).
    bpf_maps_memlock_mib: f64,
    /// Agent CPU while nothing changes, ms per second.
    idle_cpu_ms_per_sec: f64,
    map_entries: Value,
    changes: Vec<ChangeResult>,
    rss_end_mib: f64,
    hwm_end_mib: f64,
    apiserver_rss_end_mib: f64,
    agent_errors: Vec<String>,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(default)]
struct ChangeResult {
    kind: String,
    /// API write returned -> agent synced, ms.
    latency_ms: Vec<f64>,
    /// Agent time on CPU over the same span (schedstat), ms.
    cpu_ms: Vec<f64>,
    /// The agent's VmRSS after each change, MiB.
    rss_mib: Vec<f64>,
    /// VmHWM at the end of the batch, MiB.
    hwm_mib: f64,
    /// The `kind` label of `netpol_change_seconds` for this change.
    agent_label: String,
    /// The agent's own time from the watch event to the end of its map
    /// writes, per change, ms: the delta of `netpol_change_seconds_sum`
    /// over the change divided by the delta of `_count` (one observation,
    /// its exact time; see `agent_windows_with_more`). Empty when the agent
    /// does not export the metric.
    agent_ms: Vec<f64>,
    /// Changes whose window saw no observation of `agent_label`.
    agent_unobserved: usize,
    /// Changes whose window saw more than one observation of
    /// `agent_label` (then `agent_ms` holds their mean).
    agent_windows_with_more: usize,
    /// The same from the bucket deltas over the whole batch, interpolated
    /// inside a bucket (buckets double: coarse).
    agent_bucket_p50_ms: Option<f64>,
    agent_bucket_p99_ms: Option<f64>,
    agent_batch_observations: f64,
    /// For the change behind a split: the agent's time of the split itself
    /// (kind `policy`) in the same window, ms.
    split_in_window_ms: Vec<f64>,
    /// Per change: every `kind` the metric saw in its window, [sum ms,
    /// count].
    windows: Vec<BTreeMap<String, [f64; 2]>>,
    /// Agent utime + stime over the whole batch (pauses included) per
    /// change, ms.
    batch_cpu_ms_per_change: f64,
    /// From the agent's metrics: syncs that compiled during the batch and
    /// their mean compile and apply times.
    syncs: f64,
    compile_mean_ms: f64,
    apply_mean_ms: f64,
}

// ---------------------------------------------------------------------------
// /proc
// ---------------------------------------------------------------------------

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no memory effects.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64
}

/// utime + stime of a process, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15 of stat(5); after ')' is field 3.
    let t = |k: usize| {
        fields
            .get(k - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (t(14) + t(15)) / clk_tck()
}

/// Time on CPU of every thread of a process, in seconds, with nanosecond
/// resolution (the first field of `/proc/<pid>/task/*/schedstat`; utime and
/// stime come in clock ticks of 10 ms, too coarse for one change at 10k
/// pods). Threads that exited are not counted: the agent's run loop is one
/// thread (a current-thread runtime) that lives as long as the agent.
fn on_cpu_secs(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter_map(|t| {
            std::fs::read_to_string(t.path().join("schedstat"))
                .ok()?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum::<u64>() as f64
        / 1e9
}

/// A `kB` field of /proc/<pid>/status, in MiB.
fn status_mib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// Memlock of the BPF maps a process holds open (each map once), in MiB.
fn bpf_maps_memlock_mib(pid: u32) -> f64 {
    let mut seen = BTreeSet::new();
    let mut bytes = 0u64;
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return 0.0;
    };
    for e in dir.flatten() {
        let Ok(info) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:"))
            && seen.insert(id)
        {
            bytes += memlock;
        }
    }
    bytes as f64 / 1024.0 / 1024.0
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------
// The synthetic cluster: every object is a function of its index.
// ---------------------------------------------------------------------------

/// A deterministic pseudo-random sequence (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }
    fn below(&mut self, n: u32) -> u32 {
        (self.next() % u64::from(n.max(1))) as u32
    }
}

fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[derive(Clone, Copy)]
struct Shape {
    pods: u32,
    policies: u32,
    namespaces: u32,
    nodes: u32,
}

fn ns_name(n: u32) -> String {
    format!("ns-{n:04}")
}

fn node_name(k: u32) -> String {
    if k == 0 {
        REAL_NODE.to_string()
    } else {
        format!("fake-node-{k:04}")
    }
}

/// Pod `i`'s IPv4 address: 100.64.0.0/10, which no lab network uses.
fn pod_ip_v4(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + 1 + i)
}

fn pod_ip_v6(i: u32) -> Ipv6Addr {
    Ipv6Addr::from(u128::from("fd00:10::".parse::<Ipv6Addr>().expect("valid")) + 1 + u128::from(i))
}

fn node_ip(k: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 20, 0, 0)) + 1 + k)
}

impl Shape {
    fn new(pods: u32, policies: u32, per_namespace: u32, per_node: u32) -> Shape {
        Shape {
            pods,
            policies,
            namespaces: pods.div_ceil(per_namespace).max(2),
            nodes: pods.div_ceil(per_node).max(1),
        }
    }

    /// Pod `i` (`i >= pods`: the pods the changes add) runs on this node.
    fn node_of(&self, i: u32) -> u32 {
        (mix(u64::from(i)) % u64::from(self.nodes)) as u32
    }

    fn namespace_of(&self, i: u32) -> u32 {
        i % self.namespaces
    }

    fn local_pods(&self) -> u32 {
        (0..self.pods).filter(|&i| self.node_of(i) == 0).count() as u32
    }

    fn team(n: u32) -> u32 {
        n % 20
    }

    fn namespace(&self, n: u32, team: u32) -> Value {
        let mut labels = json!({
            "team": format!("t{team}"),
            "env": ENVS[(n % 3) as usize],
        });
        match n {
            0 => labels["role"] = json!("dns"),
            1 => labels["role"] = json!("monitoring"),
            _ => {}
        }
        json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": { "name": ns_name(n), "labels": labels },
        })
    }

    fn node(&self, k: u32) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {
                "name": node_name(k),
                "labels": { "kubernetes.io/hostname": node_name(k), "kubernetes.io/os": "linux" },
            },
            "spec": { "podCIDR": format!("10.200.{}.0/24", k % 256) },
        })
    }

    /// Pod `i`'s name: `<app>-<hash>-<replica>` in its namespace.
    fn pod_name(&self, i: u32) -> String {
        if i >= self.pods {
            return format!("added-{}", i - self.pods);
        }
        format!("p-{:05}", i / self.namespaces)
    }

    /// Pod `i` as created (the API server ignores the status on create).
    /// `app` and `generation` pick its labels.
    fn pod(&self, i: u32, app: u32, generation: u32) -> Value {
        let n = self.namespace_of(i);
        let labels = self.pod_labels(n, app, generation);
        let http = if app.is_multiple_of(3) { 80 } else { 8080 };
        let mut ports = vec![
            json!({ "name": "http", "containerPort": http, "protocol": "TCP" }),
            json!({ "name": "metrics", "containerPort": 9090, "protocol": "TCP" }),
        ];
        if n == 0 {
            ports.push(json!({ "name": "dns", "containerPort": 53, "protocol": "UDP" }));
            ports.push(json!({ "name": "dns-tcp", "containerPort": 53, "protocol": "TCP" }));
        }
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": self.pod_name(i),
                "namespace": ns_name(n),
                "labels": labels,
                "annotations": { "netpol-bench/index": i.to_string() },
            },
            "spec": {
                "nodeName": node_name(self.node_of(i)),
                "containers": [{
                    "name": "app",
                    "image": format!("registry.example/app{app}:v{}", 1 + generation % 3),
                    "ports": ports,
                    "env": [{ "name": "APP", "value": format!("app{app}") }],
                    "resources": {
                        "requests": { "cpu": "100m", "memory": "128Mi" },
                        "limits": { "memory": "256Mi" },
                    },
                }],
            },
        })
    }

    fn pod_labels(&self, n: u32, app: u32, generation: u32) -> Value {
        match n {
            0 => json!({ "k8s-app": if app == 0 { "kube-dns" } else { "other" } }),
            1 => json!({ "app": if app == 0 { "prometheus" } else { "grafana" } }),
            _ => json!({
                "app": format!("app{app}"),
                "tier": TIERS[(app % 4) as usize],
                "version": if app.is_multiple_of(2) { "v1" } else { "v2" },
                "pod-template-hash": format!(
                    "{:x}",
                    mix(u64::from((n * 16 + app) * 8 + generation)) & 0xffff_ffff
                ),
            }),
        }
    }

    fn app_of(&self, i: u32) -> u32 {
        (i / self.namespaces) % APPS
    }

    /// The status a kubelet writes once pod `i` runs.
    fn pod_status(&self, i: u32) -> Value {
        let n = self.namespace_of(i);
        let now = netpol_lab::controlplane::now_rfc3339();
        let mut ips = vec![json!({ "ip": pod_ip_v4(i).to_string() })];
        if n.is_multiple_of(5) {
            ips.push(json!({ "ip": pod_ip_v6(i).to_string() }));
        }
        let host = node_ip(self.node_of(i)).to_string();
        let condition =
            |kind: &str| json!({ "type": kind, "status": "True", "lastTransitionTime": now });
        json!({ "status": {
            "phase": "Running",
            "conditions": [
                condition("PodReadyToStartContainers"), condition("Initialized"),
                condition("ContainersReady"), condition("Ready"), condition("PodScheduled"),
            ],
            "hostIP": host,
            "hostIPs": [{ "ip": host }],
            "podIP": pod_ip_v4(i).to_string(),
            "podIPs": ips,
            "startTime": now,
            "containerStatuses": [{
                "name": "app", "ready": true, "started": true, "restartCount": 0,
                "image": format!("registry.example/app{}:v1", self.app_of(i)),
                "imageID": format!("registry.example/app{}@sha256:{:064x}", self.app_of(i), mix(u64::from(i))),
                "containerID": format!("containerd://{:016x}{:016x}", mix(u64::from(i) + 1), mix(u64::from(i) + 2)),
                "state": { "running": { "startedAt": now } },
            }],
        }})
    }

    /// Policy `j` of the mix: namespace `j % namespaces`, consecutive kinds
    /// per namespace from `namespace % 50` (as the compiler benchmark).
    fn policy(&self, j: u32) -> Value {
        let n = j % self.namespaces;
        let kind = (j / self.namespaces + n) % POLICY_KINDS;
        self.policy_of_kind(n, kind, &format!("pol-{j}"))
    }

    /// The namespace of the split policy: the first (not special) one with
    /// a pod on the agent's node, so that the policy is in play there.
    fn split_namespace(&self) -> u32 {
        (0..self.pods)
            .filter(|&i| self.node_of(i) == 0)
            .map(|i| self.namespace_of(i))
            .find(|&n| n >= 2)
            .unwrap_or(2)
    }

    /// A policy that splits the pod identities of the whole cluster: it
    /// selects every pod of namespace `n` (one of them local) and allows
    /// ingress from apps 0-4 of every namespace. No selector of the mix
    /// separates those apps from apps 5-9 across namespaces, so about half
    /// of every identity's pods move to a new one, and their peer entries
    /// (about half the cluster's pods) are rewritten; removing it merges
    /// them back.
    fn split_policy(&self, n: u32, name: &str) -> Value {
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": { "name": name, "namespace": ns_name(n) },
            "spec": {
                "podSelector": {},
                "policyTypes": ["Ingress"],
                "ingress": [{
                    "from": [{
                        "namespaceSelector": {},
                        "podSelector": { "matchExpressions": [{
                            "key": "app", "operator": "In",
                            "values": ["app0", "app1", "app2", "app3", "app4"],
                        }] },
                    }],
                    "ports": [{ "protocol": "TCP", "port": 7070 }],
                }],
            },
        })
    }

    fn policy_of_kind(&self, n: u32, kind: u32, name: &str) -> Value {
        let a = kind % APPS;
        let other = (kind / APPS + a + 1) % APPS;
        let app = |a: u32| json!({ "matchLabels": { "app": format!("app{a}") } });
        let all = json!({});
        let port = |proto: &str, p: Value| json!({ "protocol": proto, "port": p });
        let (selector, types, ingress, egress): (Value, &[&str], Value, Value) = match kind {
            0 => (all, &["Ingress"], json!([]), Value::Null),
            1 => (
                all,
                &["Egress"],
                Value::Null,
                json!([{
                    "to": [{
                        "namespaceSelector": { "matchLabels": { "role": "dns" } },
                        "podSelector": { "matchLabels": { "k8s-app": "kube-dns" } },
                    }],
                    "ports": [port("UDP", json!(53)), port("TCP", json!(53))],
                }]),
            ),
            2 => (
                all,
                &["Ingress"],
                json!([{
                    "from": [{
                        "namespaceSelector": { "matchLabels": { "role": "monitoring" } },
                        "podSelector": { "matchLabels": { "app": "prometheus" } },
                    }],
                    "ports": [port("TCP", json!("metrics"))],
                }]),
                Value::Null,
            ),
            3 => (
                all,
                &["Ingress"],
                json!([{ "from": [{ "podSelector": {} }] }]),
                Value::Null,
            ),
            4 => (
                all,
                &["Egress"],
                Value::Null,
                json!([{
                    "to": [
                        { "podSelector": {} },
                        { "ipBlock": { "cidr": "100.64.0.0/10", "except": ["100.127.0.0/16"] } },
                    ],
                    "ports": [port("TCP", json!("http")), port("UDP", json!(53))],
                }]),
            ),
            5 => (
                app(a),
                &["Egress"],
                Value::Null,
                json!([{
                    "to": [{ "ipBlock": { "cidr": "0.0.0.0/0",
                                          "except": ["100.64.0.0/10", "169.254.169.254/32"] } }],
                    "ports": [port("TCP", json!(443))],
                }]),
            ),
            _ => match kind % 8 {
                0 => (
                    app(a),
                    &["Ingress"],
                    json!([{ "from": [{ "podSelector": app(other) }],
                             "ports": [port("TCP", json!(8080))] }]),
                    Value::Null,
                ),
                1 => (
                    app(a),
                    &["Ingress"],
                    json!([{
                        "from": [{ "namespaceSelector": { "matchLabels": {
                            "team": format!("t{}", (n + kind) % 20) } } }],
                        "ports": [port("TCP", json!("http"))],
                    }]),
                    Value::Null,
                ),
                2 => (
                    json!({ "matchExpressions": [
                        { "key": "tier", "operator": "In", "values": ["frontend"] }] }),
                    &["Ingress"],
                    json!([{
                        "from": [{
                            "namespaceSelector": { "matchLabels": { "env": "prod" } },
                            "podSelector": { "matchLabels": { "tier": "frontend" } },
                        }],
                        "ports": [port("TCP", json!(443))],
                    }]),
                    Value::Null,
                ),
                3 => (
                    app(a),
                    &["Ingress"],
                    json!([{
                        "from": [{ "namespaceSelector": { "matchLabels": {
                            "kubernetes.io/metadata.name": ns_name((n + kind * 7) % self.namespaces),
                        } } }],
                        "ports": [{ "protocol": "TCP", "port": 8000, "endPort": 8100 }],
                    }]),
                    Value::Null,
                ),
                4 => (
                    app(a),
                    &["Egress"],
                    Value::Null,
                    json!([{
                        "to": [{ "podSelector": { "matchExpressions": [
                            { "key": "tier", "operator": "In", "values": ["db", "cache"] }] } }],
                        "ports": [port("TCP", json!(5432)), port("TCP", json!(6379))],
                    }]),
                ),
                5 => (
                    app(a),
                    &["Egress"],
                    Value::Null,
                    json!([{
                        "to": [{ "ipBlock": {
                            "cidr": format!("203.0.{}.0/24", n % 200),
                            "except": [format!("203.0.{}.128/28", n % 200)],
                        } }],
                        "ports": [port("TCP", json!(443))],
                    }]),
                ),
                6 => (
                    json!({
                        "matchLabels": { "app": format!("app{a}") },
                        "matchExpressions": [
                            { "key": "version", "operator": "NotIn", "values": ["v0"] },
                            { "key": "tier", "operator": "Exists" },
                        ],
                    }),
                    &["Ingress"],
                    json!([{
                        "from": [{ "podSelector": { "matchExpressions": [
                            { "key": "tier", "operator": "In", "values": ["frontend", "backend"] }] } }],
                        "ports": [{ "protocol": "TCP", "port": 30000, "endPort": 32767 }],
                    }]),
                    Value::Null,
                ),
                _ => (
                    app(a),
                    &["Ingress"],
                    json!([{
                        "from": [
                            { "ipBlock": { "cidr": format!("172.16.{}.0/24", n % 16) } },
                            { "podSelector": app(other) },
                        ],
                        "ports": [port("TCP", json!(9000)), port("UDP", json!(9001))],
                    }]),
                    Value::Null,
                ),
            },
        };
        let mut spec = json!({ "podSelector": selector, "policyTypes": types });
        if !ingress.is_null() {
            spec["ingress"] = ingress;
        }
        if !egress.is_null() {
            spec["egress"] = egress;
        }
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": { "name": name, "namespace": ns_name(n) },
            "spec": spec,
        })
    }
}

// ---------------------------------------------------------------------------
// The API
// ---------------------------------------------------------------------------

fn typed<T: serde::de::DeserializeOwned>(v: Value) -> Result<T> {
    serde_json::from_value(v).context("building an object")
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// Runs `op` again after a failure (up to 5 attempts, a second apart): a
/// busy API server may time out a request now and then.
async fn retry<F, Fut>(what: &str, mut op: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), kube::Error>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        match op().await {
            Ok(()) => return Ok(()),
            Err(e) if attempt < 5 => {
                eprintln!("  {what}: {e}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(anyhow!("{what}: {e}")),
        }
    }
}

/// Creates `obj` (an existing one counts: a retry after a timeout may find it).
async fn create<K>(api: &Api<K>, obj: &K, what: &str) -> Result<()>
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    retry(what, || async move {
        match api.create(&PostParams::default(), obj).await {
            Ok(_) => Ok(()),
            Err(e) if is_status(&e, 409) => Ok(()),
            Err(e) => Err(e),
        }
    })
    .await
}

async fn client(cp: &ControlPlaneState) -> Result<Client> {
    let kc =
        Kubeconfig::read_from(cp.admin_kubeconfig()).context("reading the admin kubeconfig")?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .context("the admin kubeconfig")?;
    Client::try_from(config).context("a client for the lab's API server")
}

/// Prints `writes` every 5 s while a phase runs.
fn progress(
    label: &'static str,
    writes: Arc<AtomicU64>,
    total: u64,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let start = Instant::now();
        // Rates count this phase's writes only.
        let base = writes.load(Ordering::Relaxed);
        let mut last = (start, base);
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let now = Instant::now();
            let w = writes.load(Ordering::Relaxed);
            println!(
                "  [{label}] {w}/{total} writes, {:.0}/s over the last 5 s, {:.0}/s since the phase started",
                (w - last.1) as f64 / (now - last.0).as_secs_f64(),
                (w - base) as f64 / (now - start).as_secs_f64()
            );
            last = (now, w);
        }
    })
}

/// Runs `f(i)` for `i` in `range` with `concurrency` in flight.
async fn for_all<F, Fut>(range: std::ops::Range<u32>, concurrency: usize, f: F) -> Result<()>
where
    F: Fn(u32) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let mut results = futures::stream::iter(range.map(f)).buffer_unordered(concurrency);
    while let Some(r) = results.next().await {
        r?;
    }
    Ok(())
}

/// Creates the cluster's objects; returns the number of writes.
async fn populate(client: &Client, shape: Shape, concurrency: usize) -> Result<u64> {
    let writes = Arc::new(AtomicU64::new(0));
    let count = |w: &Arc<AtomicU64>, n: u64| w.fetch_add(n, Ordering::Relaxed);

    let t = Instant::now();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for_all(0..shape.namespaces, concurrency, |n| {
        let (namespaces, client, writes) = (namespaces.clone(), client.clone(), writes.clone());
        async move {
            let ns: Namespace = typed(shape.namespace(n, Shape::team(n)))?;
            create(&namespaces, &ns, &format!("namespace {}", ns_name(n))).await?;
            // The ServiceAccount admission plugin refuses pods until the
            // namespace's default ServiceAccount exists; its controller may
            // not have got there yet.
            let sa: ServiceAccount =
                typed(json!({ "metadata": { "name": "default", "namespace": ns_name(n) } }))?;
            create(
                &Api::namespaced(client, &ns_name(n)),
                &sa,
                &format!("serviceaccount {}/default", ns_name(n)),
            )
            .await?;
            count(&writes, 2);
            Ok(())
        }
    })
    .await?;
    let nodes: Api<Node> = Api::all(client.clone());
    for_all(1..shape.nodes, concurrency, |k| {
        let (nodes, writes) = (nodes.clone(), writes.clone());
        async move {
            let node: Node = typed(shape.node(k))?;
            create(&nodes, &node, &format!("node {}", node_name(k))).await?;
            count(&writes, 1);
            Ok(())
        }
    })
    .await?;
    println!(
        "  {} namespaces (and their default ServiceAccounts), {} fake nodes: {:.1} s",
        shape.namespaces,
        shape.nodes - 1,
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    let before = writes.load(Ordering::Relaxed);
    let reporter = progress("pods", writes.clone(), before + 2 * u64::from(shape.pods));
    let result = for_all(0..shape.pods, concurrency, |i| {
        let (client, writes) = (client.clone(), writes.clone());
        async move {
            let n = shape.namespace_of(i);
            let api: Api<Pod> = Api::namespaced(client, &ns_name(n));
            let pod: Pod = typed(shape.pod(i, shape.app_of(i), 0))?;
            let name = shape.pod_name(i);
            create(&api, &pod, &format!("pod {}/{name}", ns_name(n))).await?;
            count(&writes, 1);
            let status = shape.pod_status(i);
            let (api, name, status) = (&api, &name, &status);
            retry(
                &format!("status of pod {}/{name}", ns_name(n)),
                || async move {
                    api.patch_status(name, &PatchParams::default(), &Patch::Merge(status))
                        .await
                        .map(|_| ())
                },
            )
            .await?;
            count(&writes, 1);
            Ok(())
        }
    })
    .await;
    reporter.abort();
    result?;
    let pod_writes = writes.load(Ordering::Relaxed) - before;
    println!(
        "  {} pods (create, then status): {:.1} s, {:.0} writes/s",
        shape.pods,
        t.elapsed().as_secs_f64(),
        pod_writes as f64 / t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    let before = writes.load(Ordering::Relaxed);
    let reporter = progress(
        "policies",
        writes.clone(),
        before + u64::from(shape.policies),
    );
    let result = for_all(0..shape.policies, concurrency, |j| {
        let (client, writes) = (client.clone(), writes.clone());
        async move {
            let pol: NetworkPolicy = typed(shape.policy(j))?;
            let ns = pol.metadata.namespace.clone().unwrap_or_default();
            create(
                &Api::namespaced(client, &ns),
                &pol,
                &format!("networkpolicy {ns}/pol-{j}"),
            )
            .await?;
            count(&writes, 1);
            Ok(())
        }
    })
    .await;
    reporter.abort();
    result?;
    println!(
        "  {} policies: {:.1} s",
        shape.policies,
        t.elapsed().as_secs_f64()
    );
    Ok(writes.load(Ordering::Relaxed))
}

// ---------------------------------------------------------------------------
// The agent
// ---------------------------------------------------------------------------

struct Watched {
    agents: Agents,
    pid: u32,
    state_dir: PathBuf,
    log: PathBuf,
}

impl Watched {
    fn agent(&mut self) -> &mut AgentProc {
        &mut self.agents.agents[0]
    }

    fn status(&mut self) -> Result<Option<Value>> {
        let a = self.agent();
        if let Some(st) = a.exited() {
            bail!("the agent exited ({st}):\n{}", a.log_tail(30));
        }
        Ok(a.status())
    }

    /// utime + stime (clock ticks).
    fn cpu(&self) -> f64 {
        cpu_secs(self.pid)
    }

    /// Time on CPU of its threads (nanoseconds).
    fn on_cpu(&self) -> f64 {
        on_cpu_secs(self.pid)
    }

    /// Waits until the status says synced at a revision of at least `min`;
    /// returns that status.
    fn wait_synced(&mut self, min: u64, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.status()?
                && s["synced"].as_bool() == Some(true)
                && s["source_revision"].as_u64().unwrap_or(0) >= min
            {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent did not sync revision {min} within {timeout:?}; status {:?}\n{}",
                    self.status()?,
                    self.agent().log_tail(20)
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The agent's `netpol_change_seconds` by kind; `None` if it does not
    /// export it.
    fn change_histograms(&self) -> Option<BTreeMap<String, Hist>> {
        let Ok((200, body)) = netpol_agent::api::get(&self.state_dir, "/metrics") else {
            return None;
        };
        parse_change_histograms(&body)
    }

    /// `netpol_<name>_sum` and `_count` from the agent's /metrics.
    fn histogram(&self, name: &str) -> (f64, f64) {
        let Ok((200, body)) = netpol_agent::api::get(&self.state_dir, "/metrics") else {
            return (f64::NAN, f64::NAN);
        };
        let value = |suffix: &str| {
            let key = format!("netpol_{name}_{suffix}");
            body.lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(' ')?;
                    (k == key).then(|| v.trim().parse::<f64>().ok())?
                })
                .unwrap_or(f64::NAN)
        };
        (value("sum"), value("count"))
    }
}

/// One `kind` of the agent's `netpol_change_seconds` histogram.
#[derive(Clone, Debug, Default)]
struct Hist {
    /// (upper bound in seconds, cumulative count), by bound.
    buckets: Vec<(f64, f64)>,
    sum: f64,
    count: f64,
}

impl Hist {
    /// The `q` quantile, interpolated linearly inside its bucket (from the
    /// bucket below's bound, or 0); `None` without observations. Above the
    /// last finite bound: that bound.
    fn quantile(&self, q: f64) -> Option<f64> {
        if self.count <= 0.0 {
            return None;
        }
        let rank = q * self.count;
        let mut below = (0.0, 0.0);
        for &(le, cum) in &self.buckets {
            if cum >= rank {
                if le.is_infinite() {
                    return Some(below.0);
                }
                let inside = cum - below.1;
                let frac = if inside > 0.0 {
                    (rank - below.1) / inside
                } else {
                    1.0
                };
                return Some(below.0 + (le - below.0) * frac);
            }
            below = (le, cum);
        }
        Some(below.0)
    }
}

/// `netpol_change_seconds` by `kind` from a /metrics body; `None` when the
/// agent does not export it (no `# TYPE` line).
fn parse_change_histograms(body: &str) -> Option<BTreeMap<String, Hist>> {
    const NAME: &str = "netpol_change_seconds";
    if !body
        .lines()
        .any(|l| l.starts_with(&format!("# TYPE {NAME} ")))
    {
        return None;
    }
    let mut out: BTreeMap<String, Hist> = BTreeMap::new();
    for line in body.lines() {
        let Some(rest) = line.strip_prefix(NAME).and_then(|r| r.strip_prefix('_')) else {
            continue;
        };
        let Some((series, rest)) = rest.split_once('{') else {
            continue;
        };
        let Some((labels, value)) = rest.split_once('}') else {
            continue;
        };
        // The value, then maybe an exemplar (` # {...}`).
        let Some(value) = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        let label = |name: &str| {
            labels.split(',').find_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                (k.trim() == name).then(|| v.trim().trim_matches('"').to_string())
            })
        };
        let Some(kind) = label("kind") else {
            continue;
        };
        let h = out.entry(kind).or_default();
        match series {
            "sum" => h.sum = value,
            "count" => h.count = value,
            "bucket" => {
                let le = label("le").map_or(f64::INFINITY, |v| {
                    if v == "+Inf" {
                        f64::INFINITY
                    } else {
                        v.parse().unwrap_or(f64::INFINITY)
                    }
                });
                h.buckets.push((le, value));
            }
            _ => {}
        }
    }
    for h in out.values_mut() {
        h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    Some(out)
}

/// `after - before`, kind by kind and bucket by bucket.
fn hist_delta(
    before: &BTreeMap<String, Hist>,
    after: &BTreeMap<String, Hist>,
) -> BTreeMap<String, Hist> {
    after
        .iter()
        .map(|(kind, a)| {
            let b = before.get(kind).cloned().unwrap_or_default();
            let at = |le: f64| {
                b.buckets
                    .iter()
                    .find(|(l, _)| *l == le)
                    .map_or(0.0, |(_, c)| *c)
            };
            let d = Hist {
                buckets: a.buckets.iter().map(|&(le, c)| (le, c - at(le))).collect(),
                sum: a.sum - b.sum,
                count: a.count - b.count,
            };
            (kind.clone(), d)
        })
        .filter(|(_, d)| d.count > 0.0)
        .collect()
}

/// What one change does, through the API.
enum Step {
    CreatePod(u32),
    PodStatus(u32),
    RelabelPod(u32, Value),
    DeletePod(u32),
    RelabelNamespace(u32, u32),
    AddPolicy(u32, Value),
    RemovePolicy(u32, String),
}

async fn apply(client: &Client, shape: Shape, step: &Step) -> Result<()> {
    let pods = |i: u32| Api::<Pod>::namespaced(client.clone(), &ns_name(shape.namespace_of(i)));
    let pp = PatchParams::default();
    match step {
        Step::CreatePod(i) => {
            let pod: Pod = typed(shape.pod(*i, shape.app_of(*i), 0))?;
            pods(*i).create(&PostParams::default(), &pod).await?;
        }
        Step::PodStatus(i) => {
            pods(*i)
                .patch_status(
                    &shape.pod_name(*i),
                    &pp,
                    &Patch::Merge(&shape.pod_status(*i)),
                )
                .await?;
        }
        Step::RelabelPod(i, labels) => {
            pods(*i)
                .patch(
                    &shape.pod_name(*i),
                    &pp,
                    &Patch::Merge(&json!({ "metadata": { "labels": labels } })),
                )
                .await?;
        }
        Step::DeletePod(i) => {
            pods(*i)
                .delete(
                    &shape.pod_name(*i),
                    &DeleteParams::default().grace_period(0),
                )
                .await?;
        }
        Step::RelabelNamespace(n, team) => {
            Api::<Namespace>::all(client.clone())
                .patch(
                    &ns_name(*n),
                    &pp,
                    &Patch::Merge(
                        &json!({ "metadata": { "labels": { "team": format!("t{team}") } } }),
                    ),
                )
                .await?;
        }
        Step::AddPolicy(n, policy) => {
            let pol: NetworkPolicy = typed(policy.clone())?;
            Api::<NetworkPolicy>::namespaced(client.clone(), &ns_name(*n))
                .create(&PostParams::default(), &pol)
                .await?;
        }
        Step::RemovePolicy(n, name) => {
            Api::<NetworkPolicy>::namespaced(client.clone(), &ns_name(*n))
                .delete(name, &DeleteParams::default())
                .await?;
        }
    }
    Ok(())
}

/// The kinds of change, in the order they run, and the `kind` label of
/// the agent's `netpol_change_seconds` that the measured change falls under.
const KINDS: [(&str, &str); 10] = [
    ("pod created (Pending)", "pod"),
    ("pod Running (podIPs)", "pod"),
    ("pod relabelled", "pod"),
    ("pod deleted", "pod"),
    ("namespace relabelled", "namespace"),
    ("policy added", "policy"),
    ("policy removed", "policy"),
    (SPLIT, "policy"),
    (MERGE, "policy"),
    (BEHIND_SPLIT, "pod"),
];
const SPLIT: &str = "identity split (policy added)";
const MERGE: &str = "identity merge (policy removed)";
const BEHIND_SPLIT: &str = "pod relabelled behind a split";

/// One measured change: `pre` is written and synced first (not measured),
/// then `steps` back to back (the latency runs from the last write
/// returning to the agent's sync of all of them), then `post` (synced, not
/// measured) undoes what must not stay.
#[derive(Default)]
struct Trial {
    pre: Vec<Step>,
    steps: Vec<Step>,
    post: Vec<Step>,
}

/// `k` distinct existing pods for relabels and deletions (disjoint sets).
fn victims(shape: Shape, k: usize, seed: u64) -> Vec<u32> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    let mut x = seed;
    while out.len() < k {
        x += 1;
        let i = (mix(x) % u64::from(shape.pods)) as u32;
        if seen.insert(i) {
            out.push(i);
        }
    }
    out
}

/// A relabel of pod `i` to another app (a label that no selector picks in
/// the two special namespaces).
fn relabel(shape: Shape, i: u32, k: usize, rng: &mut Rng) -> Step {
    let n = shape.namespace_of(i);
    let app = (shape.app_of(i) + 1 + rng.below(APPS - 1)) % APPS;
    let mut labels = shape.pod_labels(n, app, 1 + rng.below(1000));
    if n < 2 {
        // Those namespaces' pods carry one label: change it.
        labels = json!({ "relabelled": format!("r{k}") });
    }
    Step::RelabelPod(i, labels)
}

/// Writes `steps` one after the other; returns when the last write returned.
async fn write_all(client: &Client, shape: Shape, steps: &[Step], what: &str) -> Result<Instant> {
    for step in steps {
        apply(client, shape, step)
            .await
            .with_context(|| what.to_string())?;
    }
    Ok(Instant::now())
}

async fn run_changes(
    client: &Client,
    shape: Shape,
    agent: &mut Watched,
    args: &Args,
    changes: usize,
) -> Result<Vec<ChangeResult>> {
    let timeout = Duration::from_secs(args.timeout_secs);
    let mut rng = Rng(0x5eed);
    let picked = victims(shape, 3 * changes, 42);
    let relabelled = &picked[..changes];
    let deleted = &picked[changes..2 * changes];
    let behind = &picked[2 * changes..];
    let split_ns = shape.split_namespace();
    let mut added_policies = Vec::new();
    let mut namespace_teams: Vec<(u32, u32)> = Vec::new();
    let mut results = Vec::new();
    let exported = agent.change_histograms().is_some();
    if exported {
        println!(
            "  the agent exports netpol_change_seconds: its event -> map-write time per change"
        );
    } else {
        println!("  netpol_change_seconds: not exported by this agent");
    }
    for (kind, label) in KINDS {
        let (compile0, compiles0) = agent.histogram("compile_seconds");
        let (apply0, applies0) = agent.histogram("apply_seconds");
        let batch_hist0 = agent.change_histograms();
        let batch_cpu0 = agent.cpu();
        let batch_start = Instant::now();
        let mut r = ChangeResult {
            kind: kind.to_string(),
            agent_label: label.to_string(),
            ..ChangeResult::default()
        };
        for k in 0..changes {
            let split =
                |name: String| Step::AddPolicy(split_ns, shape.split_policy(split_ns, &name));
            let unsplit = |name: String| Step::RemovePolicy(split_ns, name);
            let trial = match kind {
                "pod created (Pending)" => Trial {
                    steps: vec![Step::CreatePod(shape.pods + k as u32)],
                    ..Trial::default()
                },
                "pod Running (podIPs)" => Trial {
                    steps: vec![Step::PodStatus(shape.pods + k as u32)],
                    ..Trial::default()
                },
                "pod relabelled" => Trial {
                    steps: vec![relabel(shape, relabelled[k], k, &mut rng)],
                    ..Trial::default()
                },
                "pod deleted" => Trial {
                    steps: vec![Step::DeletePod(deleted[k])],
                    ..Trial::default()
                },
                "namespace relabelled" => {
                    let n = (mix(7000 + k as u64) % u64::from(shape.namespaces)) as u32;
                    let current = namespace_teams
                        .iter()
                        .rev()
                        .find(|(m, _)| *m == n)
                        .map_or(Shape::team(n), |(_, t)| *t);
                    let team = (current + 1 + rng.below(19)) % 20;
                    namespace_teams.push((n, team));
                    Trial {
                        steps: vec![Step::RelabelNamespace(n, team)],
                        ..Trial::default()
                    }
                }
                "policy added" => {
                    let n = (mix(9000 + k as u64) % u64::from(shape.namespaces)) as u32;
                    let name = format!("added-pol-{k}");
                    added_policies.push((n, name.clone()));
                    Trial {
                        steps: vec![Step::AddPolicy(
                            n,
                            shape.policy_of_kind(n, rng.below(POLICY_KINDS), &name),
                        )],
                        ..Trial::default()
                    }
                }
                "policy removed" => {
                    let (n, name) = added_policies[k].clone();
                    Trial {
                        steps: vec![Step::RemovePolicy(n, name)],
                        ..Trial::default()
                    }
                }
                SPLIT => Trial {
                    steps: vec![split(format!("split-{k}"))],
                    post: vec![unsplit(format!("split-{k}"))],
                    ..Trial::default()
                },
                MERGE => Trial {
                    pre: vec![split(format!("merge-{k}"))],
                    steps: vec![unsplit(format!("merge-{k}"))],
                    ..Trial::default()
                },
                _ => Trial {
                    steps: vec![
                        split(format!("behind-{k}")),
                        relabel(shape, behind[k], k, &mut rng),
                    ],
                    post: vec![unsplit(format!("behind-{k}"))],
                    ..Trial::default()
                },
            };
            let what = format!("{kind} #{k}");
            if !trial.pre.is_empty() {
                let rev = agent.wait_synced(0, timeout)?["source_revision"]
                    .as_u64()
                    .unwrap_or(0);
                write_all(client, shape, &trial.pre, &what).await?;
                agent
                    .wait_synced(rev + trial.pre.len() as u64, timeout)
                    .with_context(|| format!("waiting for the setup of {what}"))?;
            }
            let before = agent.wait_synced(0, timeout)?;
            let revision = before["source_revision"].as_u64().unwrap_or(0);
            let hist0 = agent.change_histograms();
            let cpu0 = agent.on_cpu();
            let written = write_all(client, shape, &trial.steps, &what).await?;
            agent
                .wait_synced(revision + trial.steps.len() as u64, timeout)
                .with_context(|| format!("waiting for {what}"))?;
            let latency = written.elapsed().as_secs_f64() * 1e3;
            r.latency_ms.push(latency);
            r.cpu_ms.push((agent.on_cpu() - cpu0) * 1e3);
            if let Some(h0) = hist0 {
                // The agent may record the observation just after it writes
                // its status: give it a moment.
                let deadline = Instant::now() + Duration::from_secs(2);
                let window = loop {
                    let w = hist_delta(&h0, &agent.change_histograms().unwrap_or_default());
                    if w.get(label).is_some_and(|h| h.count >= 1.0) || Instant::now() > deadline {
                        break w;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                };
                match window.get(label) {
                    Some(h) if h.count >= 1.0 => {
                        // One observation: its exact time; more (another
                        // event of the kind in the window): their mean.
                        r.agent_ms.push(h.sum / h.count * 1e3);
                        if h.count > 1.0 {
                            r.agent_windows_with_more += 1;
                        }
                    }
                    _ => r.agent_unobserved += 1,
                }
                if kind == BEHIND_SPLIT
                    && let Some(h) = window.get("policy")
                    && h.count >= 1.0
                {
                    r.split_in_window_ms.push(h.sum / h.count * 1e3);
                }
                r.windows.push(
                    window
                        .iter()
                        .map(|(k, h)| (k.clone(), [h.sum * 1e3, h.count]))
                        .collect(),
                );
            }
            r.rss_mib.push(status_mib(agent.pid, "VmRSS"));
            if !trial.post.is_empty() {
                let rev = agent.wait_synced(0, timeout)?["source_revision"]
                    .as_u64()
                    .unwrap_or(0);
                write_all(client, shape, &trial.post, &what).await?;
                agent
                    .wait_synced(rev + trial.post.len() as u64, timeout)
                    .with_context(|| format!("waiting for the undoing of {what}"))?;
            }
            if (k + 1) % 5 == 0 && k + 1 < changes {
                println!(
                    "    [{kind}] {}/{changes}: last latency {latency:.0} ms, {:.0} s in this batch",
                    k + 1,
                    batch_start.elapsed().as_secs_f64()
                );
            }
            tokio::time::sleep(Duration::from_millis(args.gap_ms + rng.below(200) as u64)).await;
        }
        r.batch_cpu_ms_per_change = (agent.cpu() - batch_cpu0) * 1e3 / changes as f64;
        let (compile1, compiles1) = agent.histogram("compile_seconds");
        let (apply1, applies1) = agent.histogram("apply_seconds");
        r.syncs = compiles1 - compiles0;
        r.compile_mean_ms = (compile1 - compile0) / (compiles1 - compiles0) * 1e3;
        r.apply_mean_ms = (apply1 - apply0) / (applies1 - applies0) * 1e3;
        if let (Some(h0), Some(h1)) = (batch_hist0, agent.change_histograms())
            && let Some(h) = hist_delta(&h0, &h1).get(label)
        {
            r.agent_bucket_p50_ms = h.quantile(0.5).map(|v| v * 1e3);
            r.agent_bucket_p99_ms = h.quantile(0.99).map(|v| v * 1e3);
            r.agent_batch_observations = h.count;
        }
        r.hwm_mib = status_mib(agent.pid, "VmHWM");
        let (lat50, lat99) = median_and(&r.latency_ms, 0.99);
        let (cpu50, cpu99) = median_and(&r.cpu_ms, 0.99);
        let agent_part = if exported {
            let (a50, a99) = median_and(&r.agent_ms, 0.99);
            format!(
                "agent event->maps median {a50:.1} ms, p99 {a99:.1} ms ({} of {changes} seen); ",
                r.agent_ms.len()
            )
        } else {
            String::new()
        };
        let behind_part = if r.split_in_window_ms.is_empty() {
            String::new()
        } else {
            let (s50, s99) = median_and(&r.split_in_window_ms, 0.99);
            format!("the split before it: median {s50:.1} ms, p99 {s99:.1} ms; ")
        };
        println!(
            "  {kind:<31} API->synced median {lat50:.0} ms, p99 {lat99:.0} ms; {agent_part}{behind_part}CPU median {cpu50:.0} ms, p99 {cpu99:.0} ms; \
             compile {:.0} ms, apply {:.1} ms per sync ({} syncs); VmRSS {:.0} MiB, VmHWM {:.0} MiB",
            r.compile_mean_ms,
            r.apply_mean_ms,
            r.syncs,
            r.rss_mib.last().copied().unwrap_or(0.0),
            r.hwm_mib
        );
        results.push(r);
    }
    Ok(results)
}

// ---------------------------------------------------------------------------
// One size
// ---------------------------------------------------------------------------

fn lab_spec(name: &str) -> Result<ClusterSpec> {
    let y = format!(
        "name: {name}\n\
         nodes:\n  - {{name: {REAL_NODE}, attachment: routed, podCIDR: 10.244.1.0/24, podCIDRv6: 'fd00:244:1::/64'}}\n\
         namespaces:\n  - {{name: lab}}\n\
         pods:\n  - {{namespace: lab, name: a, node: {REAL_NODE}, labels: {{app: web}}, ports: [{{port: 80}}]}}\n"
    );
    ClusterSpec::from_yaml(&y).map_err(|e| anyhow!("lab cluster: {e}"))
}

fn run_size(
    args: &Args,
    pods: u32,
    changes: usize,
    agent_bin: &Path,
    lab_bin: &Path,
) -> Result<SizeResult> {
    let shape = Shape::new(
        pods,
        args.policies,
        args.pods_per_namespace,
        args.pods_per_node,
    );
    let mut result = SizeResult {
        pods,
        policies: shape.policies,
        namespaces: shape.namespaces,
        nodes: shape.nodes,
        local_pods: shape.local_pods(),
        load_before: load_average(),
        ..SizeResult::default()
    };
    println!(
        "\n== {pods} pods, {} policies: {} namespaces, {} nodes ({} of the pods on the agent's node, {REAL_NODE}); load average {}",
        shape.policies, shape.namespaces, shape.nodes, result.local_pods, result.load_before
    );
    let _ = netpol_lab::down(&args.lab);
    remove_agent_pins(&args.lab);
    let t = Instant::now();
    let lab = Lab::up(
        &lab_spec(&args.lab)?,
        &UpOptions {
            server_exe: Some(lab_bin.to_path_buf()),
            control_plane: Some(ControlPlaneSpec {
                proxy_mode: ProxyMode::None,
                dns: false,
                ..ControlPlaneSpec::default()
            }),
            ..UpOptions::default()
        },
    )
    .map_err(|e| anyhow!("lab up: {e}"))?;
    let cp = lab
        .control_plane
        .clone()
        .context("the lab came up without its control plane")?;
    let deploy_dir = match &args.deploy_dir {
        Some(d) => d.clone(),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy"),
    };
    let kubeconfig = controlplane::install_netpol(&cp, &deploy_dir)
        .map_err(|e| anyhow!("installing {}: {e}", deploy_dir.display()))?;
    // This program runs the agent itself; the lab has no scheduler, so the
    // DaemonSet's pods would only sit Pending (one per node).
    cp.kubectl()?
        .run(
            &[
                "delete",
                "daemonset",
                "netpol-agent",
                "--namespace=kube-system",
                "--wait=true",
            ],
            None,
        )
        .map_err(|e| anyhow!("deleting the DaemonSet: {e}"))?;
    println!(
        "  lab up with its control plane, deploy/ installed: {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // The API is reachable only from lab namespaces: a thread enters the
    // control plane's netns, then starts the runtime (its threads inherit
    // the netns).
    let control = open_netns(&cp.netns_path()).context("opening the control plane's netns")?;
    let node = lab.node(REAL_NODE).context("the real node")?.clone();
    let state = (*lab).clone();
    let measured = std::thread::scope(|s| {
        s.spawn(|| -> Result<SizeResult> {
            enter_netns(&control).context("entering the control plane's netns")?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(async {
                let client = client(&cp).await?;
                let t = Instant::now();
                result.api_writes = populate(&client, shape, args.concurrency).await?;
                result.populate_secs = t.elapsed().as_secs_f64();
                result.api_writes_per_sec = result.api_writes as f64 / result.populate_secs;
                let rss = |pid: Option<u32>| pid.map_or(0.0, |p| status_mib(p, "VmRSS"));
                result.apiserver_rss_mib = rss(cp.apiserver_pid);
                result.etcd_rss_mib = rss(cp.etcd_pid);
                println!(
                    "  created {} objects in {:.0} s ({:.0} writes/s); kube-apiserver RSS {:.0} MiB, etcd RSS {:.0} MiB",
                    result.api_writes,
                    result.populate_secs,
                    result.api_writes_per_sec,
                    result.apiserver_rss_mib,
                    result.etcd_rss_mib
                );

                // The agent.
                let (bpffs, state_dir) = agent_paths(&state, &node);
                let _ = std::process::Command::new(agent_bin)
                    .arg("cleanup")
                    .arg("--bpffs-root")
                    .arg(&bpffs)
                    .stdout(std::process::Stdio::null())
                    .status();
                let _ = std::fs::remove_file(state_dir.join("status.json"));
                let _ = std::fs::remove_file(state_dir.join("agent.log"));
                let started = Instant::now();
                let proc_ = AgentProc::start_with(
                    &state,
                    &node,
                    agent_bin,
                    &AgentSource::Kube {
                        kubeconfig: kubeconfig.clone(),
                    },
                    &args.bins.agent_args,
                )
                .with_context(|| format!("starting {}", agent_bin.display()))?;
                let pid = proc_.child.as_ref().map(|c| c.id()).context("no agent pid")?;
                let log = proc_.log.clone();
                let mut agent = Watched {
                    agents: Agents {
                        agents: vec![proc_],
                    },
                    pid,
                    state_dir,
                    log,
                };
                // Wait for the first sync, noting when the lists completed.
                let deadline = started + Duration::from_secs(args.timeout_secs);
                let mut next_note = 15;
                loop {
                    // The agent watches more kinds than it once did (pods,
                    // namespaces, policies, nodes, ...): the lists are done
                    // when the last "list complete" before the sync is.
                    let listed = std::fs::read_to_string(&agent.log)
                        .unwrap_or_default()
                        .lines()
                        .filter(|l| l.contains("list complete"))
                        .count();
                    if listed > result.lists {
                        result.lists = listed;
                        result.lists_done_secs = Some(started.elapsed().as_secs_f64());
                    }
                    if let Some(s) = agent.status()?
                        && s["synced"].as_bool() == Some(true)
                    {
                        result.first_sync_secs = started.elapsed().as_secs_f64();
                        result.first_sync_cpu_secs = agent.cpu();
                        result.rss_after_sync_mib = status_mib(pid, "VmRSS");
                        result.hwm_after_sync_mib = status_mib(pid, "VmHWM");
                        result.map_entries = s["map_entries"].clone();
                        break;
                    }
                    if started.elapsed().as_secs() >= next_note {
                        next_note += 15;
                        println!(
                            "  [first sync] {:.0} s: {} lists complete; VmRSS {:.0} MiB; CPU {:.1} s",
                            started.elapsed().as_secs_f64(),
                            result.lists,
                            status_mib(pid, "VmRSS"),
                            agent.cpu()
                        );
                    }
                    if Instant::now() > deadline {
                        bail!(
                            "the agent did not sync within {} s\n{}",
                            args.timeout_secs,
                            agent.agent().log_tail(30)
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                result.bpf_maps_memlock_mib = bpf_maps_memlock_mib(pid);
                println!(
                    "  agent: {} lists done after {}, first sync after {:.1} s using {:.2} s of CPU; VmRSS {:.0} MiB, VmHWM {:.0} MiB; BPF maps {:.0} MiB (memlock); maps {}",
                    result.lists,
                    result
                        .lists_done_secs
                        .map_or("?".to_string(), |s| format!("{s:.1} s")),
                    result.first_sync_secs,
                    result.first_sync_cpu_secs,
                    result.rss_after_sync_mib,
                    result.hwm_after_sync_mib,
                    result.bpf_maps_memlock_mib,
                    result.map_entries
                );
                // Idle: nothing changes for 10 s.
                tokio::time::sleep(Duration::from_secs(2)).await;
                let c0 = agent.cpu();
                let t0 = Instant::now();
                tokio::time::sleep(Duration::from_secs(10)).await;
                result.idle_cpu_ms_per_sec = (agent.cpu() - c0) * 1e3 / t0.elapsed().as_secs_f64();
                println!(
                    "  agent idle: {:.1} ms of CPU per second; VmRSS {:.0} MiB",
                    result.idle_cpu_ms_per_sec,
                    status_mib(pid, "VmRSS")
                );

                result.load_changes = load_average();
                println!("  changes start; load average {}", result.load_changes);
                result.changes = run_changes(&client, shape, &mut agent, args, changes).await?;
                result.load_end = load_average();
                result.rss_end_mib = status_mib(pid, "VmRSS");
                result.hwm_end_mib = status_mib(pid, "VmHWM");
                result.apiserver_rss_end_mib = rss(cp.apiserver_pid);
                if let Some(s) = agent.status()? {
                    result.agent_errors = s["errors"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|e| e.as_str().map(str::to_string))
                        .collect();
                }
                println!(
                    "  agent after the changes: VmRSS {:.0} MiB, VmHWM {:.0} MiB; {} errors in its status",
                    result.rss_end_mib,
                    result.hwm_end_mib,
                    result.agent_errors.len()
                );
                drop(agent);
                Ok(std::mem::take(&mut result))
            })
        })
        .join()
        .map_err(|_| anyhow!("the API thread panicked"))?
    });
    drop(lab);
    measured
}

// ---------------------------------------------------------------------------
// Tables
// ---------------------------------------------------------------------------

fn print_table(r: &SizeResult, changes: usize) {
    println!(
        "\n### {} pods, {} policies ({} namespaces, {} nodes, {} pods on the agent's node)\n",
        r.pods, r.policies, r.namespaces, r.nodes, r.local_pods
    );
    println!(
        "API: {} writes in {:.0} s ({:.0}/s); kube-apiserver RSS {:.0} MiB after populating, {:.0} MiB at the end; etcd RSS {:.0} MiB.",
        r.api_writes,
        r.populate_secs,
        r.api_writes_per_sec,
        r.apiserver_rss_mib,
        r.apiserver_rss_end_mib,
        r.etcd_rss_mib
    );
    println!(
        "Agent: {} lists done {}, first sync {:.1} s after start, {:.2} s of CPU; VmRSS {:.0} MiB and VmHWM {:.0} MiB after it, {:.0} / {:.0} MiB after the changes; BPF maps {:.0} MiB memlock; idle {:.1} ms CPU/s.\n",
        r.lists,
        r.lists_done_secs
            .map_or("?".to_string(), |s| format!("{s:.1} s")),
        r.first_sync_secs,
        r.first_sync_cpu_secs,
        r.rss_after_sync_mib,
        r.hwm_after_sync_mib,
        r.rss_end_mib,
        r.hwm_end_mib,
        r.bpf_maps_memlock_mib,
        r.idle_cpu_ms_per_sec
    );
    println!(
        "Load average (1, 5, 15 min): {} at the start, {} when the changes started, {} at the end.\n",
        r.load_before, r.load_changes, r.load_end
    );
    let exported = r.changes.iter().any(|c| !c.windows.is_empty());
    if !exported {
        println!(
            "The agent's own event -> map-write time: netpol_change_seconds not exported by this agent.\n"
        );
    }
    println!(
        "| change ({changes} each) | API write -> synced median ms | p99 ms | max ms | agent event -> maps median ms | p99 ms | (buckets: median / p99 ms) | CPU/change median ms | p99 ms | batch CPU/change ms | compile ms/sync | apply ms/sync | syncs |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let ms = |v: f64| {
        if v.is_nan() {
            "-".to_string()
        } else if v < 10.0 {
            format!("{v:.2}")
        } else {
            format!("{v:.0}")
        }
    };
    for c in &r.changes {
        let (l50, l99) = median_and(&c.latency_ms, 0.99);
        let lmax = c.latency_ms.iter().copied().fold(0.0, f64::max);
        let (a50, a99) = median_and(&c.agent_ms, 0.99);
        let (c50, c99) = median_and(&c.cpu_ms, 0.99);
        let buckets = match (c.agent_bucket_p50_ms, c.agent_bucket_p99_ms) {
            (Some(b50), Some(b99)) => format!("{} / {}", ms(b50), ms(b99)),
            _ => "-".to_string(),
        };
        println!(
            "| {} | {l50:.0} | {l99:.0} | {lmax:.0} | {} | {} | {buckets} | {c50:.0} | {c99:.0} | {:.0} | {:.0} | {:.1} | {} |",
            c.kind,
            ms(a50),
            ms(a99),
            c.batch_cpu_ms_per_change,
            c.compile_mean_ms,
            c.apply_mean_ms,
            c.syncs
        );
    }
    println!(
        "\nCompile and apply per sync include the unmeasured setup and undo syncs of the split kinds (each split is removed again, each merge set up first)."
    );
    if exported {
        let odd: Vec<String> = r
            .changes
            .iter()
            .filter(|c| c.agent_unobserved + c.agent_windows_with_more > 0)
            .map(|c| {
                format!(
                    "{}: {} unobserved, {} windows with more than one",
                    c.kind, c.agent_unobserved, c.agent_windows_with_more
                )
            })
            .collect();
        if !odd.is_empty() {
            println!("Agent times not exact for: {}", odd.join("; "));
        }
    }
    if let (Some(alone), Some(behind)) = (
        r.changes.iter().find(|c| c.kind == "pod relabelled"),
        r.changes.iter().find(|c| c.kind == BEHIND_SPLIT),
    ) {
        let (l50, _) = median_and(&alone.latency_ms, 0.99);
        let (b50, b99) = median_and(&behind.latency_ms, 0.99);
        let mut line = format!(
            "Queued behind a split: a pod relabel written right after the split policy is synced {b50:.0} ms (median; p99 {b99:.0}) after its write, against {l50:.0} ms alone"
        );
        if exported {
            let (a50, _) = median_and(&alone.agent_ms, 0.99);
            let (q50, q99) = median_and(&behind.agent_ms, 0.99);
            let (s50, _) = median_and(&behind.split_in_window_ms, 0.99);
            line += &format!(
                "; the agent's event -> maps time of that relabel: median {} ms, p99 {} ms, against {} ms alone (the split in the same window: {} ms)",
                ms(q50),
                ms(q99),
                ms(a50),
                ms(s50)
            );
        }
        println!("{line}.");
    }
}

/// Latency per kind of change (one panel per size, log scale) and the
/// agent's VmRSS through the run (one line per size).
fn plot(sizes: &[SizeResult], cpus: usize, kernel: &str) -> svg::Figure {
    let short = |kind: &str| -> String {
        match kind {
            "pod created (Pending)" => "pod new",
            "pod Running (podIPs)" => "pod IPs",
            "pod relabelled" => "pod label",
            "pod deleted" => "pod del",
            "namespace relabelled" => "ns label",
            "policy added" => "pol add",
            "policy removed" => "pol del",
            SPLIT => "split",
            MERGE => "merge",
            BEHIND_SPLIT => "behind split",
            other => other,
        }
        .to_string()
    };
    let mut panels = Vec::new();
    for r in sizes {
        let q = |f: &dyn Fn(&ChangeResult) -> &Vec<f64>, p99: bool| svg::Series {
            name: String::new(),
            values: r
                .changes
                .iter()
                .map(|c| {
                    let (m, h) = median_and(f(c), 0.99);
                    let v = if p99 { h } else { m };
                    (v.is_finite() && v > 0.0).then_some(v)
                })
                .collect(),
        };
        let named = |mut s: svg::Series, name: &str| {
            s.name = name.to_string();
            s
        };
        let mut series = vec![
            named(q(&|c| &c.latency_ms, false), "API write -> synced, median"),
            named(q(&|c| &c.latency_ms, true), "API write -> synced, p99"),
        ];
        if r.changes.iter().any(|c| !c.agent_ms.is_empty()) {
            series.push(named(
                q(&|c| &c.agent_ms, false),
                "agent event -> map writes, median",
            ));
            series.push(named(
                q(&|c| &c.agent_ms, true),
                "agent event -> map writes, p99",
            ));
        }
        series.push(named(
            q(&|c| &c.cpu_ms, false),
            "agent CPU per change, median",
        ));
        panels.push(svg::Panel {
            title: format!(
                "{} pods x {} policies: latency per change",
                r.pods, r.policies
            ),
            x_label: "kind of change".into(),
            y_label: "ms (log)".into(),
            x_ticks: r.changes.iter().map(|c| short(&c.kind)).collect(),
            series,
            y_log: true,
            guides: vec![(10.0, "10 ms goal (p99)".into())],
        });
    }
    // Memory: after the first sync, after each batch.
    let mut ticks = vec!["first sync".to_string()];
    if let Some(r) = sizes.first() {
        ticks.extend(r.changes.iter().map(|c| short(&c.kind)));
    }
    let mut series = Vec::new();
    for r in sizes {
        let mut rss = vec![Some(r.rss_after_sync_mib)];
        rss.extend(r.changes.iter().map(|c| c.rss_mib.last().copied()));
        series.push(svg::Series {
            name: format!("VmRSS, {} pods", r.pods),
            values: rss,
        });
        let mut hwm = vec![Some(r.hwm_after_sync_mib)];
        hwm.extend(r.changes.iter().map(|c| Some(c.hwm_mib)));
        series.push(svg::Series {
            name: format!("VmHWM, {} pods", r.pods),
            values: hwm,
        });
    }
    panels.push(svg::Panel {
        title: "agent memory after the first sync and after each batch".into(),
        x_label: "after".into(),
        y_label: "MiB".into(),
        x_ticks: ticks,
        series,
        y_log: false,
        guides: vec![(1024.0, "1 GiB goal".into())],
    });
    let policies = sizes.first().map_or(0, |r| r.policies);
    svg::Figure {
        title: "netpol-agent against a real API server: latency per change and memory".into(),
        subtitle: format!(
            "{} policies; one change at a time; {} CPUs, kernel {}; load average {}",
            policies,
            cpus,
            kernel,
            sizes
                .iter()
                .map(|r| r.load_before.as_str())
                .collect::<Vec<_>>()
                .join(" / ")
        ),
        // One column: ten kinds of change need the width for their labels.
        columns: 1,
        panels,
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(from) = &args.plot_from {
        return replot(from, &args.svg);
    }
    require_root("agent_scale")?;
    for t in [
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kubectl",
    ] {
        netpol_lab::tools::tool(t)?;
    }
    let (agent_bin, lab_bin) = args.bins.resolve()?;
    let (sizes, changes) = if args.quick {
        (vec![10_000], args.changes.min(5))
    } else {
        (args.pods.clone(), args.changes)
    };
    let machine = Machine::describe();
    let method = format!(
        "objects only, through the lab's kube-apiserver: pods spread over one namespace per {} pods and one node per {} pods (node 0 is the agent's); \
         {} policies of the control_plane mix; one netpol-agent --source kube (args: {:?}); per change: API write returned -> status synced \
         (read every 5 ms), the agent's own event -> map-write time (delta of its netpol_change_seconds{{kind}} _sum over the change, when exported), \
         and the agent's time on CPU over the same span (schedstat; utime+stime per batch); \
         {} changes per kind, {} ms + up to 200 ms apart",
        args.pods_per_namespace,
        args.pods_per_node,
        args.policies,
        args.bins.agent_args,
        changes,
        args.gap_ms
    );
    println!("agent_scale: {machine}");
    println!("  {method}");
    let started = Instant::now();
    let mut out = Output {
        benchmark: "agent_scale",
        machine,
        method,
        agent_args: args.bins.agent_args.clone(),
        sizes: Vec::new(),
        secs: 0.0,
    };
    for &pods in &sizes {
        let r = run_size(&args, pods, changes, &agent_bin, &lab_bin)?;
        print_table(&r, changes);
        out.sizes.push(r);
        if let Some(path) = &args.json {
            out.secs = started.elapsed().as_secs_f64();
            write_json(path, &out)?;
        }
    }
    println!("\n== All sizes");
    for r in &out.sizes {
        print_table(r, changes);
    }
    if let Some(path) = &args.json {
        println!("\nwrote {}", path.display());
    }
    plot(&out.sizes, out.machine.cpus, &out.machine.kernel).write(&args.svg)?;
    println!("wrote {}", args.svg.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A /metrics body as prometheus-client 0.24 encodes a
    /// `Family<[(kind, ..)], Histogram>`: `le` first, then the family's
    /// labels; buckets cumulative.
    fn body(pod: [u64; 4], pod_sum: f64) -> String {
        let mut b = String::from(
            "# HELP netpol_change_seconds Watch event to the end of its map writes.\n\
             # TYPE netpol_change_seconds histogram\n",
        );
        for (le, c) in ["0.001", "0.002", "0.004", "+Inf"].iter().zip(pod) {
            b += &format!("netpol_change_seconds_bucket{{le=\"{le}\",kind=\"pod\"}} {c}\n");
        }
        b += &format!("netpol_change_seconds_sum{{kind=\"pod\"}} {pod_sum}\n");
        b += &format!("netpol_change_seconds_count{{kind=\"pod\"}} {}\n", pod[3]);
        b += "netpol_change_seconds_bucket{le=\"0.001\",kind=\"policy\"} 1\n\
              netpol_change_seconds_bucket{le=\"+Inf\",kind=\"policy\"} 1\n\
              netpol_change_seconds_sum{kind=\"policy\"} 0.0005\n\
              netpol_change_seconds_count{kind=\"policy\"} 1\n\
              netpol_compile_seconds_sum 3.0\n# EOF\n";
        b
    }

    #[test]
    fn an_agent_without_the_metric_has_none() {
        assert!(
            parse_change_histograms(
                "# TYPE netpol_compile_seconds histogram\nnetpol_compile_seconds_sum 1\n"
            )
            .is_none()
        );
    }

    #[test]
    fn one_change_is_the_delta_of_the_sum() {
        let before = parse_change_histograms(&body([1, 2, 2, 2], 0.0025)).expect("exported");
        let after = parse_change_histograms(&body([1, 2, 3, 3], 0.0055)).expect("exported");
        let d = hist_delta(&before, &after);
        // The policy kind did not move, so it is not in the window.
        assert_eq!(d.keys().collect::<Vec<_>>(), ["pod"]);
        let pod = &d["pod"];
        assert_eq!(pod.count, 1.0);
        assert!((pod.sum - 0.003).abs() < 1e-12, "{}", pod.sum);
        assert_eq!(
            pod.buckets,
            [
                (0.001, 0.0),
                (0.002, 0.0),
                (0.004, 1.0),
                (f64::INFINITY, 1.0)
            ]
        );
    }

    #[test]
    fn bucket_quantiles_interpolate_inside_the_bucket() {
        let h = Hist {
            buckets: vec![
                (0.001, 2.0),
                (0.002, 4.0),
                (0.004, 4.0),
                (f64::INFINITY, 5.0),
            ],
            sum: 0.0,
            count: 5.0,
        };
        // Rank 2.5 of 5: a quarter into (0.001, 0.002], which holds ranks 3-4.
        assert!((h.quantile(0.5).unwrap() - 0.00125).abs() < 1e-12);
        // Rank 1 of 5: half-way through [0, 0.001].
        assert!((h.quantile(0.2).unwrap() - 0.0005).abs() < 1e-12);
        // In the +Inf bucket: the last finite bound.
        assert_eq!(h.quantile(0.99), Some(0.004));
        assert_eq!(Hist::default().quantile(0.5), None);
    }
}
