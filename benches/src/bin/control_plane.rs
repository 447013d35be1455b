//! Control-plane benchmark: the policy compiler on synthetic clusters.
//!
//! For each size (pods x policies over 1,000 namespaces, pods spread over
//! enough nodes that the node compiled for has 100-400 of them) it prints:
//! the full compile time (every object fed to a fresh `Compiler` as one
//! batch), the peak memory of the process (`VmHWM`), the map entries by map,
//! identities and policy sets, and the latency of one incremental change,
//! from `Compiler::apply_change` to the list of map updates (median, p99 and
//! max over `--changes` changes of each kind, applied one after another): a
//! policy added (one that selects a local pod), a policy removed, a pod
//! added, a pod relabelled (anywhere, and a local one), a namespace
//! relabelled (namespace selectors pick its new label).
//!
//! The synthetic mix, per namespace: a default deny, DNS egress to
//! kube-system, metrics ingress from the monitoring namespace on a named
//! port, same-namespace ingress, egress to the cluster CIDR (an ipBlock with
//! an except, with a named port), egress to the internet (0.0.0.0/0 except
//! private ranges), then per-app policies cycling through matchLabels and
//! matchExpressions pod selectors, namespace selectors ("allow from namespace
//! x", "from team t"), pod+namespace selectors, ipBlocks with excepts, named
//! ports, port ranges. One namespace in five is dual-stack.
//!
//! The `scale-test` rows are the cluster of `netpol-agent/tests/
//! compiler_scale.rs` at 100k pods (13k policies), with 100 and 500 local
//! pods, each from a different namespace: they also time the snapshot path
//! (`Compiler::compile` of a whole `Cluster`, what the agent calls on every
//! sync): first compile, an unchanged recompile, a recompile after one label
//! change.
//!
//! Each size runs in its own process (so that `VmHWM` is its own; the
//! scale-test rows reset it after the snapshot part). The first change after
//! a full compile runs on cold caches: it shows in the max column. The load
//! average is printed first: other work on the machine skews every number.
//! Run in release: `cargo run --release -p netpol-benches --bin
//! control_plane` (`--quick` for a reduced run, `--json <file>` for the raw
//! numbers). Timings are printed, never asserted.

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use netpol_agent::{
    compiler::{Change, Compiler, NodeInfo},
    model::{
        Cluster, LabelSelector, Namespace, NetworkPolicy, ObjectRef, Pod, PodRef, PolicyRef,
        Protocol, build::*,
    },
};
use serde::{Deserialize, Serialize};

#[derive(Parser)]
struct Args {
    /// A reduced run (three sizes, fewer changes): under a minute.
    #[arg(long)]
    quick: bool,
    /// Changes of each kind per size (default 100, 20 with `--quick`).
    #[arg(long)]
    changes: Option<usize>,
    /// Write the raw numbers (every latency sample included) as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Run one scenario in this process and print its result as JSON (what
    /// the parent process runs in each child).
    #[arg(long, hide = true)]
    one: Option<String>,
    /// Instead: the ClusterNetworkPolicy mix (the synthetic clusters plus
    /// Admin and Baseline policies), timing the tier compile per change.
    #[arg(long)]
    cnp: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let changes = args.changes.unwrap_or(if args.quick { 20 } else { 100 });
    if args.cnp {
        return cnp_mix::run(args.quick, changes.min(50));
    }
    if let Some(one) = &args.one {
        let scenario = Scenario::parse(one)?;
        let result = scenario.run(changes);
        println!("{}", serde_json::to_string(&result)?);
        return Ok(());
    }
    let scenarios: Vec<Scenario> = if args.quick {
        vec![
            Scenario::Synthetic(Spec::new(1_000, 100)),
            Scenario::Synthetic(Spec::new(10_000, 10_000)),
            Scenario::Synthetic(Spec::new(100_000, 50_000)),
        ]
    } else {
        let mut v = Vec::new();
        for pods in [1_000, 10_000, 100_000] {
            for policies in [100, 1_000, 10_000, 50_000] {
                v.push(Scenario::Synthetic(Spec::new(pods, policies)));
            }
        }
        v.push(Scenario::ScaleTest { nodes: 1000 });
        v.push(Scenario::ScaleTest { nodes: 200 });
        v
    };
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "load average (1/5/15 min) before: {}; {} CPUs",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let exe = std::env::current_exe().context("finding this program")?;
    let mut results = Vec::new();
    for s in &scenarios {
        eprintln!("running {} ...", s.label());
        let out = Command::new(&exe)
            .args(["--one", &s.id(), "--changes", &changes.to_string()])
            .output()
            .with_context(|| format!("running {}", s.label()))?;
        if !out.status.success() {
            bail!(
                "{} failed: {}",
                s.label(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let result: ScenarioResult = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("reading the result of {}", s.label()))?;
        results.push(result);
    }
    print_tables(&results, changes);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&results)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------

#[derive(Serialize, Deserialize)]
struct ScenarioResult {
    label: String,
    pods: u32,
    policies: u32,
    namespaces: u32,
    nodes: u32,
    /// Full compile: every object as one batch into a fresh compiler.
    compile_ms: f64,
    /// Updates of the full compile's diff.
    compile_updates: usize,
    /// `VmHWM` of the process at the end.
    peak_rss_mib: f64,
    endpoints: usize,
    peers_v4: usize,
    peers_v6: usize,
    policy: usize,
    identities: usize,
    policy_sets: usize,
    rules: usize,
    /// Kind of change -> one sample per change.
    changes: Vec<ChangeSamples>,
    /// The snapshot path (`Compiler::compile`), scale-test rows only.
    snapshot: Option<Snapshot>,
}

#[derive(Serialize, Deserialize)]
struct ChangeSamples {
    kind: String,
    /// Microseconds from the change to the list of map updates.
    micros: Vec<f64>,
    /// Map updates each change produced.
    updates: Vec<usize>,
}

#[derive(Serialize, Deserialize)]
struct Snapshot {
    first_ms: f64,
    unchanged_ms: f64,
    unchanged_updates: usize,
    relabel_ms: f64,
    relabel_updates: usize,
    relabel_revokes: bool,
}

fn percentile(samples: &[f64], p: f64) -> f64 {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (v.len() as f64)).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn median_usize(samples: &[usize]) -> usize {
    let mut v = samples.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn print_tables(results: &[ScenarioResult], changes: usize) {
    println!();
    println!(
        "Full compile (node with the endpoints below; all objects as one batch into a fresh compiler)"
    );
    println!(
        "{:<26} {:>10} {:>9} {:>9} {:>9} {:>8} {:>9} {:>10} {:>6} {:>7}",
        "cluster",
        "compile",
        "peak RSS",
        "endpoints",
        "peers v4",
        "peers v6",
        "policy",
        "identities",
        "sets",
        "rules"
    );
    for r in results {
        println!(
            "{:<26} {:>8.0}ms {:>6.0}MiB {:>9} {:>9} {:>8} {:>9} {:>10} {:>6} {:>7}",
            r.label,
            r.compile_ms,
            r.peak_rss_mib,
            r.endpoints,
            r.peers_v4,
            r.peers_v6,
            r.policy,
            r.identities,
            r.policy_sets,
            r.rules
        );
    }
    println!();
    println!(
        "One incremental change, from apply_change to the list of map updates ({changes} changes per kind, one after another)"
    );
    println!(
        "{:<26} {:<22} {:>9} {:>9} {:>9} {:>12}",
        "cluster", "change", "median", "p99", "max", "updates (med/max)"
    );
    for r in results {
        for c in &r.changes {
            let max = c.micros.iter().copied().fold(0.0, f64::max);
            println!(
                "{:<26} {:<22} {:>9} {:>9} {:>9} {:>12}",
                r.label,
                c.kind,
                fmt_us(percentile(&c.micros, 50.0)),
                fmt_us(percentile(&c.micros, 99.0)),
                fmt_us(max),
                format!(
                    "{}/{}",
                    median_usize(&c.updates),
                    c.updates.iter().max().copied().unwrap_or(0)
                ),
            );
        }
    }
    let snapshots: Vec<&ScenarioResult> = results.iter().filter(|r| r.snapshot.is_some()).collect();
    if !snapshots.is_empty() {
        println!();
        println!(
            "Snapshot path (Compiler::compile of a whole Cluster, what the agent calls today)"
        );
        for r in snapshots {
            let s = r.snapshot.as_ref().expect("filtered");
            println!(
                "{:<26} first {:.0}ms; unchanged {:.1}ms ({} updates); one label change {:.1}ms ({} updates, revokes: {})",
                r.label,
                s.first_ms,
                s.unchanged_ms,
                s.unchanged_updates,
                s.relabel_ms,
                s.relabel_updates,
                s.relabel_revokes
            );
        }
    }
}

fn fmt_us(us: f64) -> String {
    if us >= 1000.0 {
        format!("{:.1}ms", us / 1000.0)
    } else {
        format!("{us:.0}us")
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `VmHWM` (peak resident set) of this process, in MiB.
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

// ---------------------------------------------------------------------------
// Scenarios
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

enum Scenario {
    Synthetic(Spec),
    /// The cluster of `tests/compiler_scale.rs` at 1000 namespaces x 10 apps
    /// x 10 replicas over this many nodes.
    ScaleTest {
        nodes: u32,
    },
}

impl Scenario {
    fn id(&self) -> String {
        match self {
            Scenario::Synthetic(s) => format!("synthetic:{}:{}", s.pods, s.policies),
            Scenario::ScaleTest { nodes } => format!("scale-test:{nodes}"),
        }
    }

    fn parse(id: &str) -> Result<Self> {
        let parts: Vec<&str> = id.split(':').collect();
        match parts.as_slice() {
            ["synthetic", pods, policies] => Ok(Scenario::Synthetic(Spec::new(
                pods.parse()?,
                policies.parse()?,
            ))),
            ["scale-test", nodes] => Ok(Scenario::ScaleTest {
                nodes: nodes.parse()?,
            }),
            _ => bail!("unknown scenario {id:?}"),
        }
    }

    fn label(&self) -> String {
        match self {
            Scenario::Synthetic(s) => format!("{} pods x {} pol", short(s.pods), short(s.policies)),
            Scenario::ScaleTest { nodes } => format!("scale-test, {} local", 100_000 / nodes),
        }
    }

    fn run(&self, changes: usize) -> ScenarioResult {
        match self {
            Scenario::Synthetic(spec) => run_synthetic(self.label(), spec, changes),
            Scenario::ScaleTest { nodes } => run_scale_test(self.label(), *nodes, changes),
        }
    }
}

fn short(n: u32) -> String {
    if n >= 1000 && n.is_multiple_of(1000) {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}

/// What a scenario generates: every object is a pure function of its index,
/// so the benchmark holds no copy of the cluster besides the compiler's.
trait Generator {
    fn namespaces(&self) -> u32;
    fn pods(&self) -> u32;
    fn policies(&self) -> u32;
    fn nodes(&self) -> u32;
    fn namespace(&self, n: u32) -> Namespace;
    fn pod(&self, i: u32) -> Pod;
    fn policy(&self, j: u32) -> NetworkPolicy;
    /// The index of the pod with this name.
    fn pod_index(&self, pod: &PodRef) -> u32;
    /// Another label set for pod `i` (a relabel).
    fn relabel(&self, i: u32, rng: &mut Rng) -> Pod;
    /// A new policy in namespace `n`.
    fn new_policy(&self, n: u32, name: &str, rng: &mut Rng) -> NetworkPolicy;
    /// Namespace `n` with another value of a label that selectors use.
    fn relabel_namespace(&self, n: u32, rng: &mut Rng) -> Namespace;
    fn namespace_index(&self, ns: &str) -> u32;

    fn objects(&self) -> Vec<Change> {
        let mut out = Vec::new();
        out.extend((0..self.namespaces()).map(|n| Change::UpsertNamespace(self.namespace(n))));
        out.extend((0..self.pods()).map(|i| Change::UpsertPod(self.pod(i))));
        out.extend((0..self.policies()).map(|j| Change::UpsertPolicy(self.policy(j))));
        out
    }
}

fn node_name(n: u32) -> String {
    format!("node-{n}")
}

fn bench_node() -> NodeInfo {
    NodeInfo::new(&node_name(1), ["192.168.0.1", "fd00:ff::1"])
}

fn run_synthetic(label: String, spec: &Spec, changes: usize) -> ScenarioResult {
    let (compiler, mut result) = full_compile(label, spec);
    result.changes = incremental(compiler, spec, changes);
    result.peak_rss_mib = peak_rss_mib();
    result
}

fn full_compile(label: String, g: &dyn Generator) -> (Compiler, ScenarioResult) {
    let objects = g.objects();
    let mut compiler = Compiler::new(bench_node());
    let t = Instant::now();
    let diff = compiler.apply_changes(objects);
    let compile_ms = ms(t.elapsed());
    let out = compiler.compiled();
    let result = ScenarioResult {
        label,
        pods: g.pods(),
        policies: g.policies(),
        namespaces: g.namespaces(),
        nodes: g.nodes(),
        compile_ms,
        compile_updates: diff.updates.len(),
        peak_rss_mib: 0.0,
        endpoints: out.maps.endpoints.len(),
        peers_v4: out.maps.peers_v4.len(),
        peers_v6: out.maps.peers_v6.len(),
        policy: out.maps.policy.len(),
        identities: out.identities.len(),
        policy_sets: out.policy_sets.len(),
        rules: out.rules.len(),
        changes: Vec::new(),
        snapshot: None,
    };
    (compiler, result)
}

/// Kinds of incremental changes, in the order they are measured.
const KINDS: [&str; 6] = [
    "policy added",
    "policy removed",
    "pod added",
    "pod relabelled",
    "local pod relabelled",
    "namespace relabelled",
];

/// Times `changes` changes of each kind, applied one after another.
fn incremental(mut compiler: Compiler, g: &dyn Generator, changes: usize) -> Vec<ChangeSamples> {
    let mut rng = Rng(0x5eed);
    let mut next_pod = g.pods();
    let mut added: Vec<PolicyRef> = Vec::new();
    let mut out = Vec::new();
    for kind in KINDS {
        let mut samples = ChangeSamples {
            kind: kind.into(),
            micros: Vec::new(),
            updates: Vec::new(),
        };
        for _ in 0..changes {
            let change = match kind {
                // A policy of the mix, in the namespace of a local pod and
                // selecting it (the expensive case: a policy that selects no
                // local pod changes nothing on this node).
                "policy added" => {
                    let Some(pod) = pick_local(&compiler, &mut rng) else {
                        break;
                    };
                    let n = g.namespace_index(&pod.namespace);
                    let name = format!("bench-{}", added.len());
                    let app = g.pod(g.pod_index(&pod)).labels.get("app").cloned();
                    let selector = app.map_or_else(all, |a| labels([("app", a.as_str())]));
                    let policy = g.new_policy(n, &name, &mut rng).select(selector);
                    added.push(policy.policy_ref());
                    Change::UpsertPolicy(policy)
                }
                "policy removed" => match added.pop() {
                    Some(p) => Change::RemovePolicy(p),
                    None => break,
                },
                "pod added" => {
                    next_pod += 1;
                    Change::UpsertPod(g.pod(next_pod))
                }
                "pod relabelled" => Change::UpsertPod(g.relabel(rng.below(g.pods()), &mut rng)),
                "local pod relabelled" => {
                    let Some(pod) = pick_local(&compiler, &mut rng) else {
                        break;
                    };
                    Change::UpsertPod(g.relabel(g.pod_index(&pod), &mut rng))
                }
                _ => Change::UpsertNamespace(
                    g.relabel_namespace(rng.below(g.namespaces()), &mut rng),
                ),
            };
            let t = Instant::now();
            let diff = compiler.apply_change(change);
            samples.micros.push(t.elapsed().as_secs_f64() * 1e6);
            samples.updates.push(diff.updates.len());
        }
        out.push(samples);
    }
    out
}

/// A random local endpoint.
fn pick_local(compiler: &Compiler, rng: &mut Rng) -> Option<PodRef> {
    let eps = &compiler.compiled().maps.endpoints;
    let at = rng.below(u32::try_from(eps.len()).expect("few endpoints"));
    eps.keys().nth(at as usize).cloned()
}

// ---------------------------------------------------------------------------
// The synthetic mix
// ---------------------------------------------------------------------------

/// A synthetic cluster size.
#[derive(Clone, Copy, Debug)]
struct Spec {
    pods: u32,
    policies: u32,
    namespaces: u32,
    nodes: u32,
}

impl Spec {
    /// 100 local pods at 1k pods, 200 at 10k, 400 at 100k.
    fn new(pods: u32, policies: u32) -> Self {
        let local = if pods <= 1_000 {
            100
        } else if pods <= 10_000 {
            200
        } else {
            400
        };
        Self {
            pods,
            policies,
            namespaces: 1000,
            nodes: (pods / local).max(1),
        }
    }

    fn pods_per_namespace(&self) -> u32 {
        (self.pods / self.namespaces).max(1)
    }

    /// Deployments per namespace (replicas share labels).
    fn apps(&self) -> u32 {
        (self.pods_per_namespace() / 2).clamp(1, 10)
    }
}

fn ns_name(n: u32) -> String {
    match n {
        0 => "kube-system".into(),
        1 => "monitoring".into(),
        _ => format!("ns-{n:04}"),
    }
}

const TIERS: [&str; 4] = ["frontend", "backend", "db", "cache"];
const ENVS: [&str; 3] = ["prod", "staging", "dev"];

fn app_sel(a: u32) -> LabelSelector {
    labels([("app", format!("app{a}").as_str())])
}

impl Spec {
    /// Pod `i` with the labels of deployment `app`.
    fn pod_with_app(&self, i: u32, app: u32, generation: u32) -> Pod {
        let ns = i % self.namespaces;
        let r = i / self.namespaces;
        let x = i + 65536; // 10.1.0.0 and up: inside 10/8, outside the 10.255/16 except
        let mut p = pod(&ns_name(ns), &format!("app{}-{r}", r % self.apps()))
            .ip(&format!("10.{}.{}.{}", x >> 16, (x >> 8) & 255, x & 255))
            .node(&node_name(
                (mix(u64::from(i)) % u64::from(self.nodes)) as u32,
            ));
        if ns.is_multiple_of(5) {
            p = p.ip(&format!(
                "fd00:10::{:x}:{:x}",
                (i + 1) >> 16,
                (i + 1) & 0xffff
            ));
        }
        p = match ns {
            0 => p
                .label("k8s-app", if app == 0 { "kube-dns" } else { "other" })
                .named_port("dns", Protocol::Udp, 53)
                .named_port("dns-tcp", Protocol::Tcp, 53),
            1 => p.label("app", if app == 0 { "prometheus" } else { "grafana" }),
            _ => p
                .label("app", &format!("app{app}"))
                .label("tier", TIERS[(app % 4) as usize])
                .label("version", if app.is_multiple_of(2) { "v1" } else { "v2" })
                .label(
                    "pod-template-hash",
                    &format!(
                        "{:x}",
                        mix(u64::from((ns * 16 + app) * 8 + generation)) & 0xffff_ffff
                    ),
                ),
        };
        p.named_port(
            "http",
            Protocol::Tcp,
            if app.is_multiple_of(3) { 80 } else { 8080 },
        )
        .named_port("metrics", Protocol::Tcp, 9090)
    }

    /// A policy of one kind of the mix (`kind` in 0..50) in namespace `n`.
    fn policy_of_kind(&self, n: u32, kind: u32, name: &str) -> NetworkPolicy {
        let ns = ns_name(n);
        let apps = self.apps();
        let p = policy(&ns, name);
        let a = kind % apps;
        let other = (kind / apps + a + 1) % apps;
        match kind {
            0 => p.select(all()).deny_ingress(),
            1 => p.select(all()).egress(
                allow()
                    .to(pods_in(
                        labels([("kubernetes.io/metadata.name", "kube-system")]),
                        labels([("k8s-app", "kube-dns")]),
                    ))
                    .port(udp(53))
                    .port(tcp(53)),
            ),
            2 => p.select(all()).ingress(
                allow()
                    .from(pods_in(
                        labels([("kubernetes.io/metadata.name", "monitoring")]),
                        labels([("app", "prometheus")]),
                    ))
                    .port(named(Protocol::Tcp, "metrics")),
            ),
            3 => p.select(all()).ingress(allow().from(pods(all()))),
            4 => p.select(all()).egress(
                allow()
                    .to(pods(all()))
                    .to(block(cidr("10.0.0.0/8").except("10.255.0.0/16")))
                    .port(named(Protocol::Tcp, "http"))
                    .port(udp(53)),
            ),
            5 => p.select(app_sel(a)).egress(
                allow()
                    .to(block(
                        cidr("0.0.0.0/0")
                            .except("10.0.0.0/8")
                            .except("169.254.169.254/32"),
                    ))
                    .port(tcp(443)),
            ),
            _ => match kind % 8 {
                0 => p
                    .select(app_sel(a))
                    .ingress(allow().from(pods(app_sel(other))).port(tcp(8080))),
                1 => p.select(app_sel(a)).ingress(
                    allow()
                        .from(namespaces(labels([(
                            "team",
                            format!("t{}", (n + kind) % 20).as_str(),
                        )])))
                        .port(named(Protocol::Tcp, "http")),
                ),
                2 => p.select(all().key_in("tier", ["frontend"])).ingress(
                    allow()
                        .from(pods_in(
                            labels([("env", "prod")]),
                            labels([("tier", "frontend")]),
                        ))
                        .port(tcp(443)),
                ),
                3 => p.select(app_sel(a)).ingress(
                    allow()
                        .from(namespaces(labels([(
                            "kubernetes.io/metadata.name",
                            ns_name((n + kind * 7) % self.namespaces).as_str(),
                        )])))
                        .port(port_range(Protocol::Tcp, 8000, 8100)),
                ),
                4 => p.select(app_sel(a)).egress(
                    allow()
                        .to(pods(all().key_in("tier", ["db", "cache"])))
                        .port(tcp(5432))
                        .port(tcp(6379)),
                ),
                5 => p.select(app_sel(a)).egress(
                    allow()
                        .to(block(
                            cidr(&format!("203.0.{}.0/24", n % 200))
                                .except(&format!("203.0.{}.128/28", n % 200)),
                        ))
                        .port(tcp(443)),
                ),
                6 => p
                    .select(app_sel(a).key_not_in("version", ["v0"]).exists("tier"))
                    .ingress(
                        allow()
                            .from(pods(all().key_in("tier", ["frontend", "backend"])))
                            .port(port_range(Protocol::Tcp, 30000, 32767)),
                    ),
                _ => p.select(app_sel(a)).ingress(
                    allow()
                        .from(ip_block(&format!("172.16.{}.0/24", n % 16)))
                        .from(pods(app_sel(other)))
                        .port(tcp(9000))
                        .port(udp(9001)),
                ),
            },
        }
    }
}

impl Generator for Spec {
    fn namespaces(&self) -> u32 {
        self.namespaces
    }
    fn pods(&self) -> u32 {
        self.pods
    }
    fn policies(&self) -> u32 {
        self.policies
    }
    fn nodes(&self) -> u32 {
        self.nodes
    }

    fn namespace(&self, n: u32) -> Namespace {
        namespace(&ns_name(n))
            .label("team", &format!("t{}", n % 20))
            .label("env", ENVS[(n % 3) as usize])
    }

    fn pod(&self, i: u32) -> Pod {
        let r = i / self.namespaces;
        self.pod_with_app(i, r % self.apps(), 0)
    }

    /// Policy `j`: namespace `j % 1000`, the kinds of a namespace are
    /// consecutive from `namespace % 50` (so small counts still mix kinds).
    fn policy(&self, j: u32) -> NetworkPolicy {
        let n = j % self.namespaces;
        let kind = (j / self.namespaces + n) % 50;
        self.policy_of_kind(n, kind, &format!("pol-{j}"))
    }

    fn pod_index(&self, pod: &PodRef) -> u32 {
        let n = self.namespace_index(&pod.namespace);
        let r: u32 = pod
            .name
            .rsplit('-')
            .next()
            .and_then(|r| r.parse().ok())
            .expect("generated name");
        r * self.namespaces + n
    }

    /// The pod moves to another deployment's labels (a new template hash).
    fn relabel(&self, i: u32, rng: &mut Rng) -> Pod {
        let apps = self.apps();
        let app = (i / self.namespaces + 1 + rng.below(apps.max(2) - 1)) % apps;
        self.pod_with_app(i, app, 1 + rng.below(1000))
    }

    fn new_policy(&self, n: u32, name: &str, rng: &mut Rng) -> NetworkPolicy {
        self.policy_of_kind(n, rng.below(50), name)
    }

    /// Another team (namespace selectors pick teams).
    fn relabel_namespace(&self, n: u32, rng: &mut Rng) -> Namespace {
        let team = (n + 1 + rng.below(19)) % 20;
        self.namespace(n).label("team", &format!("t{team}"))
    }

    fn namespace_index(&self, ns: &str) -> u32 {
        match ns {
            "kube-system" => 0,
            "monitoring" => 1,
            _ => ns
                .strip_prefix("ns-")
                .and_then(|n| n.parse().ok())
                .expect("generated namespace"),
        }
    }
}

// ---------------------------------------------------------------------------
// The scale-test cluster (tests/compiler_scale.rs at 100k pods)
// ---------------------------------------------------------------------------

/// 1000 namespaces x 10 apps x 10 replicas over `nodes` nodes (pod `i`
/// runs on node `i % nodes`, so a node's pods come from as many namespaces
/// as possible); every namespace has a default deny, an allow-from-app0 rule
/// per app on a named port, an allow from the monitoring namespace on a
/// named port, and egress to every pod of the namespace and to an ipBlock
/// with a named port.
struct ScaleTest {
    nodes: u32,
}

const ST_NAMESPACES: u32 = 1000;
const ST_APPS: u32 = 10;
const ST_REPLICAS: u32 = 10;

impl ScaleTest {
    /// `model::build::tenant_pod`, on this benchmark's node names.
    fn pod_with_app(&self, i: u32, app: u32) -> Pod {
        tenant_pod(i, app, ST_APPS, ST_REPLICAS, self.nodes).node(&node_name((i + 1) % self.nodes))
    }

    fn app_policy(&self, ns: u32, app: u32, name: &str, from: u32) -> NetworkPolicy {
        policy(&format!("ns{ns}"), name)
            .select(labels([("app", format!("app{app}").as_str())]))
            .ingress(
                allow()
                    .from(pods(labels([("app", format!("app{from}").as_str())])))
                    .port(named(Protocol::Tcp, "http")),
            )
    }

    fn cluster(&self) -> Cluster {
        let mut c = Cluster::default();
        for change in self.objects() {
            match change {
                Change::UpsertNamespace(ns) => c.upsert_namespace(ns),
                Change::UpsertPod(p) => c.upsert_pod(p),
                Change::UpsertPolicy(p) => c.upsert_policy(p),
                _ => unreachable!("only upserts"),
            }
        }
        c
    }
}

impl Generator for ScaleTest {
    fn namespaces(&self) -> u32 {
        ST_NAMESPACES + 1
    }
    fn pods(&self) -> u32 {
        ST_NAMESPACES * ST_APPS * ST_REPLICAS
    }
    fn policies(&self) -> u32 {
        ST_NAMESPACES * (ST_APPS + 3)
    }
    fn nodes(&self) -> u32 {
        self.nodes
    }

    fn namespace(&self, n: u32) -> Namespace {
        if n == ST_NAMESPACES {
            return namespace("monitoring").label("role", "monitoring");
        }
        namespace(&format!("ns{n}")).label("tenant", &format!("t{}", n % 10))
    }

    fn pod(&self, i: u32) -> Pod {
        self.pod_with_app(i, (i / ST_REPLICAS) % ST_APPS)
    }

    fn policy(&self, j: u32) -> NetworkPolicy {
        let ns = j / (ST_APPS + 3);
        let k = j % (ST_APPS + 3);
        let ns_name = format!("ns{ns}");
        match k {
            0 => policy(&ns_name, "default-deny")
                .select(all())
                .deny_ingress()
                .deny_egress(),
            1 => policy(&ns_name, "allow-monitoring").select(all()).ingress(
                allow()
                    .from(namespaces(labels([("role", "monitoring")])))
                    .port(named(Protocol::Tcp, "metrics")),
            ),
            2 => policy(&ns_name, "egress").select(all()).egress(
                allow()
                    .to(pods(all()))
                    .to(block(cidr("10.0.0.0/8").except("10.255.0.0/16")))
                    .port(named(Protocol::Tcp, "http"))
                    .port(udp(53)),
            ),
            _ => {
                let app = k - 3;
                self.app_policy(ns, app, &format!("app{app}-ingress"), 0)
            }
        }
    }

    fn pod_index(&self, pod: &PodRef) -> u32 {
        let ns: u32 = pod.namespace[2..].parse().expect("generated namespace");
        let (app, r) = pod.name[3..].split_once('-').expect("generated name");
        let (app, r): (u32, u32) = (app.parse().expect("app"), r.parse().expect("replica"));
        ns * ST_APPS * ST_REPLICAS + app * ST_REPLICAS + r
    }

    fn relabel(&self, i: u32, rng: &mut Rng) -> Pod {
        self.pod_with_app(i, rng.below(ST_APPS))
    }

    fn new_policy(&self, n: u32, name: &str, rng: &mut Rng) -> NetworkPolicy {
        self.app_policy(n, rng.below(ST_APPS), name, rng.below(ST_APPS))
    }

    /// The monitoring namespace loses or regains its role (namespace
    /// selectors pick it); another namespace changes tenant.
    fn relabel_namespace(&self, n: u32, rng: &mut Rng) -> Namespace {
        let ns = self.namespace(n);
        if n == ST_NAMESPACES {
            let role = if rng.below(2) == 0 {
                "monitoring"
            } else {
                "none"
            };
            return ns.label("role", role);
        }
        ns.label("tenant", &format!("t{}", rng.below(10)))
    }

    fn namespace_index(&self, ns: &str) -> u32 {
        ns[2..].parse().expect("generated namespace")
    }
}

fn run_scale_test(label: String, nodes: u32, changes: usize) -> ScenarioResult {
    let g = ScaleTest { nodes };
    // The snapshot path first (it holds a whole Cluster), then the rest.
    let snapshot = {
        let mut c = g.cluster();
        let node = bench_node();
        let mut compiler = Compiler::default();
        let t = Instant::now();
        let first = compiler.compile(&c, &node);
        let first_ms = ms(t.elapsed());
        let t = Instant::now();
        let unchanged = compiler.sync(&c);
        let unchanged_ms = ms(t.elapsed());
        // A pod of a namespace with a local endpoint becomes an app0 (a
        // peer that app policies allow).
        let local_ns = first
            .maps
            .endpoints
            .keys()
            .next()
            .expect("local endpoints")
            .namespace
            .clone();
        let victim = ObjectRef::new(local_ns, "app3-1");
        c.pods
            .get_mut(&victim)
            .expect("pod exists")
            .labels
            .insert("app".into(), "app0".into());
        let t = Instant::now();
        let relabel = compiler.sync(&c);
        let relabel_ms = ms(t.elapsed());
        Snapshot {
            first_ms,
            unchanged_ms,
            unchanged_updates: unchanged.updates.len(),
            relabel_ms,
            relabel_updates: relabel.updates.len(),
            relabel_revokes: relabel.revokes,
        }
    };
    // Peak memory from here on: the full compile and the changes only.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let (compiler, mut result) = full_compile(label, &g);
    result.changes = incremental(compiler, &g, changes);
    result.snapshot = Some(snapshot);
    result.peak_rss_mib = peak_rss_mib();
    result
}

// ---------------------------------------------------------------------------
// The ClusterNetworkPolicy mix (`--cnp`)
// ---------------------------------------------------------------------------

/// The synthetic clusters with ClusterNetworkPolicies on top: per CNP `k`,
/// an Admin policy on the namespaces of one env (Deny from one team's
/// namespaces on TCP 22, Pass from monitoring, Deny egress to the metadata
/// address) and a Baseline policy on every namespace (Deny from the dev
/// namespaces). While any CNP exists a node's maps come from the tier
/// compile (`compiler::tiered`). Per change it times, median over the
/// changes: `Compiler::apply_change` (what the agent runs), and the tier
/// table step alone, fresh (`compile_tiers_local`) and reusing earlier
/// decisions (`compile_tiers_local_cached` with a warm `TierCache`), on the
/// same cluster. Timings are printed, never asserted.
mod cnp_mix {
    use netpol_agent::{
        compiler::tiers::{TierCache, compile_tiers_local, compile_tiers_local_cached},
        model::{ClusterNetworkPolicy, Protocol},
    };

    use super::*;

    fn cnps(k: u32) -> Vec<ClusterNetworkPolicy> {
        (0..k)
            .flat_map(|i| {
                let env = ENVS[(i % 3) as usize];
                [
                    admin(&format!("guard-{i}"))
                        .priority(i)
                        .subject(in_namespaces(labels([("env", env)])))
                        .ingress(
                            deny()
                                .named("no-ssh")
                                .peer(peer_namespaces(labels([(
                                    "team",
                                    format!("t{}", i % 20).as_str(),
                                )])))
                                .port(dport(Protocol::Tcp, 22)),
                        )
                        .ingress(pass().named("monitoring").peer(peer_namespaces(labels([(
                            "kubernetes.io/metadata.name",
                            "monitoring",
                        )]))))
                        .egress(
                            deny()
                                .named("no-metadata")
                                .peer(networks(["169.254.169.254/32"])),
                        ),
                    baseline(&format!("floor-{i}"))
                        .priority(i)
                        .subject(in_namespaces(all()))
                        .ingress(
                            deny()
                                .named("no-dev")
                                .peer(peer_namespaces(labels([("env", "dev")]))),
                        ),
                ]
            })
            .collect()
    }

    fn apply(c: &mut Cluster, change: &Change) {
        match change {
            Change::UpsertNamespace(n) => c.upsert_namespace(n.clone()),
            Change::UpsertPod(p) => c.upsert_pod(p.clone()),
            Change::UpsertPolicy(p) => c.upsert_policy(p.clone()),
            Change::UpsertClusterPolicy(p) => c.upsert_cluster_policy(p.clone()),
            other => panic!("the mix makes no {other:?}"),
        }
    }

    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    }

    pub fn run(quick: bool, changes: usize) -> Result<()> {
        let sizes: &[(u32, u32, u32)] = if quick {
            &[(1_000, 100, 4)]
        } else {
            &[(1_000, 100, 4), (1_000, 100, 16), (5_000, 500, 8)]
        };
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        println!(
            "load average (1/5/15 min) before: {}; {} CPUs",
            load.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        println!(
            "{:<28} {:>10} {:>8} {:>22} {:>16} {:>16} {:>12}",
            "cluster",
            "compile",
            "classes",
            "change kind",
            "apply_change",
            "table, fresh",
            "table, cache"
        );
        for &(pods, policies, k) in sizes {
            let spec = Spec::new(pods, policies);
            let mut objects = spec.objects();
            objects.extend(cnps(k).into_iter().map(Change::UpsertClusterPolicy));
            let mut cluster = Cluster::default();
            for c in &objects {
                apply(&mut cluster, c);
            }
            let node = bench_node();
            let mut compiler = Compiler::new(node.clone());
            let t = Instant::now();
            compiler.apply_changes(objects);
            let compile_ms = ms(t.elapsed());
            let mut cache = TierCache::default();
            let table = compile_tiers_local_cached(&cluster, &node, &mut cache);
            let (subjects, peers) = table.class_counts();
            let mut rng = Rng(0xc1a5);
            let mut next_pod = pods;
            for kind in ["pod added", "pod relabelled", "local pod relabelled"] {
                let (mut apply_us, mut fresh_us, mut cached_us) = (vec![], vec![], vec![]);
                let mut reused = 0;
                let mut made = 0;
                for _ in 0..changes {
                    let change = match kind {
                        "pod added" => {
                            next_pod += 1;
                            Change::UpsertPod(spec.pod(next_pod))
                        }
                        "pod relabelled" => {
                            Change::UpsertPod(spec.relabel(rng.below(pods), &mut rng))
                        }
                        _ => {
                            let Some(pod) = pick_local(&compiler, &mut rng) else {
                                break;
                            };
                            Change::UpsertPod(spec.relabel(spec.pod_index(&pod), &mut rng))
                        }
                    };
                    apply(&mut cluster, &change);
                    let t = Instant::now();
                    compiler.apply_change(change);
                    apply_us.push(t.elapsed().as_secs_f64() * 1e6);
                    let t = Instant::now();
                    let fresh = compile_tiers_local(&cluster, &node);
                    fresh_us.push(t.elapsed().as_secs_f64() * 1e6);
                    let t = Instant::now();
                    let cached = compile_tiers_local_cached(&cluster, &node, &mut cache);
                    cached_us.push(t.elapsed().as_secs_f64() * 1e6);
                    assert!(
                        fresh == cached,
                        "the cached table differs from the fresh one"
                    );
                    reused += cache.reused;
                    made += cache.made;
                }
                println!(
                    "{:<28} {:>10} {:>8} {:>22} {:>16} {:>16} {:>12}",
                    format!(
                        "{} pods x {} pol + {} CNP",
                        short(pods),
                        short(policies),
                        2 * k
                    ),
                    fmt_us(compile_ms * 1000.0),
                    format!("{subjects}x{peers}"),
                    kind,
                    fmt_us(median(apply_us)),
                    fmt_us(median(fresh_us)),
                    format!(
                        "{} ({:.0}% reused)",
                        fmt_us(median(cached_us)),
                        100.0 * reused as f64 / (reused + made).max(1) as f64
                    ),
                );
            }
        }
        Ok(())
    }
}
