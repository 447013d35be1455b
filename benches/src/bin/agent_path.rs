//! The agent's path from one change to its map writes, without a kernel:
//! CPU per change at 100k pods, the path before issue 14 against the path
//! the agent runs now.
//!
//! The cluster is `netpol-agent/tests/compiler_scale.rs`'s: 1000 namespaces
//! x 10 apps x 10 replicas (100k pods, 13k policies) over `--nodes` nodes
//! (1000: 100 local pods). Each change relabels one remote pod (it moves
//! from one app to another, so its identity changes), alternating with a
//! local pod's relabel.
//!
//! * `snapshot` is the path before: the source's whole cluster cloned
//!   (`snapshot()`), `Compiler::compile` (every object compared, then the
//!   output cloned), the desired state cloned out of it, both epochs compared
//!   whole with it (the planner's diff of full maps), and the flow log's
//!   names rebuilt from every pod.
//! * `changes` is the path now: the change to `Compiler::apply_changes`,
//!   its diff noted by the epoch planner, which compares only those entries,
//!   and the names updated from the change and the diff.
//!
//! Both write to a no-op kernel (`Epochs::execute` with a writer that
//! succeeds). The first change after the start fills the other epoch whole
//! (it held nothing): it is the max of `changes`, not a per-change cost.
//! Run in release:
//! `cargo run --release -p netpol-benches --bin agent_path [-- --changes 20]`.
//! Prints thread CPU and wall time per change (median, p99, max); the load
//! average first: other work on the machine skews every number.

use std::{collections::BTreeMap, time::Instant};

use clap::Parser;
use netpol_agent::{
    compiler::{Change, Compiler, NodeInfo},
    epoch::{Desired, Epochs, State},
    flowlog::Names,
    model::{Cluster, Pod, build::*},
    source::SourceChange,
};

#[derive(Parser)]
struct Args {
    /// Changes per path.
    #[arg(long, default_value_t = 20)]
    changes: usize,
    /// Nodes the pods are spread over (the node compiled for is `n0`).
    #[arg(long, default_value_t = 1000)]
    nodes: u32,
}

const NAMESPACES: u32 = 1000;
const APPS: u32 = 10;
const REPLICAS: u32 = 10;

/// Pod `i` of the cluster, labelled `app<app>`.
fn pod_with_app(i: u32, app: u32, nodes: u32) -> Pod {
    tenant_pod(i, app, APPS, REPLICAS, nodes)
}

/// `netpol-agent/tests/compiler_scale.rs`'s tenant cluster at 100k pods.
fn cluster_of(nodes: u32) -> Cluster {
    tenant_cluster(NAMESPACES, APPS, REPLICAS, nodes)
}

/// This thread's CPU time, in seconds.
fn thread_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// The `k`th change: a pod (remote for even `k`, local for odd) moves to
/// another app.
fn change(k: usize, nodes: u32) -> Pod {
    // Pod i runs on node (i + 1) % nodes: local pods are i = nodes - 1 + j * nodes.
    let i = if k.is_multiple_of(2) {
        (k as u32 * 7919) % (NAMESPACES * APPS * REPLICAS)
    } else {
        (nodes - 1 + (k as u32 * 13) * nodes) % (NAMESPACES * APPS * REPLICAS)
    };
    let own_app = (i / REPLICAS) % APPS;
    pod_with_app(i, (own_app + 1 + k as u32 / 2) % APPS, nodes)
}

fn summary(name: &str, cpu: &mut [f64], wall: &mut [f64]) {
    let pct = |v: &mut [f64], p: f64| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[((v.len() as f64 - 1.0) * p).round() as usize] * 1e3
    };
    println!(
        "{name:>9}: cpu/change median {:8.2} ms  p99 {:8.2} ms  max {:8.2} ms | wall median {:8.2} ms  p99 {:8.2} ms",
        pct(cpu, 0.5),
        pct(cpu, 0.99),
        pct(cpu, 1.0),
        pct(wall, 0.5),
        pct(wall, 0.99),
    );
}

fn main() {
    let args = Args::parse();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "load average: {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let node = NodeInfo::new("n0", ["192.168.0.1"]);
    let base = cluster_of(args.nodes);
    println!(
        "cluster: {} pods, {} policies, node n0 of {}",
        base.pods.len(),
        base.policies.len(),
        args.nodes
    );

    // The path before: snapshot, compile, clone, compare whole.
    {
        let mut cluster = base.clone();
        let mut compiler = Compiler::new(node.clone());
        let mut epochs =
            Epochs::<netpol_agent::model::PodRef>::adopt(0, [State::default(), State::default()]);
        let first = compiler.compile(&cluster, &node);
        epochs.graced();
        let plan = epochs.plan(&State::from_maps(&first.maps));
        epochs.execute::<()>(plan, |_| Ok(()));
        let (mut cpu, mut wall) = (Vec::new(), Vec::new());
        for k in 0..args.changes {
            let p = change(k, args.nodes);
            let (c0, w0) = (thread_cpu(), Instant::now());
            cluster.upsert_pod(p);
            let snap = cluster.clone();
            let compiled = compiler.compile(&snap, &node);
            let desired = State::new(&compiled.maps, compiled.maps.endpoints.clone());
            epochs.compare_all();
            epochs.graced();
            let plan = epochs.plan(&desired);
            epochs.execute::<()>(plan, |_| Ok(()));
            let names = Names {
                pods_by_ip: snap
                    .pods
                    .values()
                    .filter(|p| p.is_live())
                    .flat_map(|p| p.ips.iter().map(move |ip| (*ip, p.pod_ref())))
                    .collect::<BTreeMap<_, _>>(),
                compiled,
                endpoints: BTreeMap::new(),
                cluster: snap,
            };
            cpu.push(thread_cpu() - c0);
            wall.push(w0.elapsed().as_secs_f64());
            drop(names);
        }
        summary("snapshot", &mut cpu, &mut wall);
    }

    // The path now: the change, the compiler's diff, the noted entries.
    {
        let mut compiler = Compiler::new(node.clone());
        let mut epochs =
            Epochs::<netpol_agent::model::PodRef>::adopt(0, [State::default(), State::default()]);
        let mut names = Names::default();
        let first: Vec<SourceChange> =
            netpol_agent::source::changes_between(&Cluster::default(), &base);
        let batch: Vec<Change> = first
            .iter()
            .filter_map(|c| match c {
                SourceChange::Compiler(c) => Some(c.clone()),
                _ => None,
            })
            .collect();
        let diff = compiler.apply_changes(batch);
        epochs.note(&diff.updates);
        for c in &first {
            names.apply(c);
        }
        names.compiled.maps.apply(&diff.updates);
        epochs.graced();
        let endpoints = compiler.compiled().maps.endpoints.clone();
        let plan = epochs.plan(Desired::new(&compiler.compiled().maps, &endpoints));
        epochs.execute::<()>(plan, |_| Ok(()));
        let (mut cpu, mut wall) = (Vec::new(), Vec::new());
        for k in 0..args.changes {
            let p = change(k, args.nodes);
            let (c0, w0) = (thread_cpu(), Instant::now());
            let c = Change::UpsertPod(p);
            let diff = compiler.apply_changes([c.clone()]);
            epochs.note(&diff.updates);
            // The agent builds the node's endpoints (by veth) every sync.
            let endpoints = compiler.compiled().maps.endpoints.clone();
            epochs.graced();
            let plan = epochs.plan(Desired::new(&compiler.compiled().maps, &endpoints));
            epochs.execute::<()>(plan, |_| Ok(()));
            names.apply(&SourceChange::Compiler(c));
            names.compiled.maps.apply(&diff.updates);
            if !diff.is_empty() {
                let out = compiler.compiled();
                names.compiled.rules = out.rules.clone();
                names.compiled.policy_sets = out.policy_sets.clone();
                names.compiled.identities = out.identities.clone();
                names.compiled.local_ips = out.local_ips.clone();
            }
            cpu.push(thread_cpu() - c0);
            wall.push(w0.elapsed().as_secs_f64());
        }
        summary("changes", &mut cpu, &mut wall);
    }
}
