//! The pod-start window: from a pod's creation to the first packet judged
//! by its policy, in the style of kubernetes perf-tests'
//! `pod-creation-reachability-latency`, and with what slips through before.
//!
//! The two-node lab of `netpol_lab::fixtures` with the directory source:
//! namespace x is default-deny for ingress, and x's pods labelled `pod: a`
//! take TCP 80 from y/a only. For each run a new pod x/p<k> (`pod: a`) is
//! created on node-a at a fixed address, while two probers (see
//! `netpol_benches::prober`) open a connection to that address every
//! `--probe-interval-ms` from before the pod exists until `--settle-ms`
//! after it is enforced:
//! - y/a (node-b), allowed by policy: the reachability latency is the time
//!   from the pod's creation (the start of the lab's `add_pod`: netns, veth,
//!   addresses, CNI ADD if asked, server, then the Pod manifest) to the send
//!   time of its first successful probe;
//! - y/b (node-a), denied by policy: every probe it gets through is a leak,
//!   a packet not judged by the pod's policy. The window is from the first
//!   leak to the last.
//!
//! Modes:
//! - `running`: the agents run; the new veth gets the programs when the
//!   agent sees it appear.
//! - `running+cni`: the same, with the pod set up through netpol-cni.
//! - `down`: node-a's agent is killed (-9) before the pod is created and
//!   started again `--down-ms` later.
//! - `down+cni`: the same, with netpol-cni.
//!
//! `cargo build --release -p netpol-benches -p netpol-agent -p netpol-lab -p netpol-cni --bins`
//! then `sudo target/release/pod_start [--runs 5]`.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use clap::Parser;
use netpol_benches::{
    Binaries, clock,
    machine::Machine,
    prober::{Outcome, Probe, prober},
    require_root, sibling_exe,
    stats::percentile_sorted,
    write_json,
};
use netpol_lab::{
    AddPodOptions, Lab, PodSpec, PortSpec, Protocol, UpOptions,
    fixtures::{ALLOW_YA_TO_XA_80, DENY_ALL_X, two_node_cluster},
    start_agents,
    state::write_atomic,
};
use serde::Serialize;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    bins: Binaries,
    /// Pods created per mode.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Modes to run: running, running+cni, down, down+cni.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "running,running+cni,down,down+cni"
    )]
    modes: Vec<String>,
    /// How long node-a's agent stays down after the pod's creation starts (down modes).
    #[arg(long, default_value_t = 2000)]
    down_ms: u64,
    /// A new probe connection every this many ms, from each client.
    #[arg(long, default_value_t = 2)]
    probe_interval_ms: u64,
    /// Silence for this long means the probe's SYN was dropped.
    #[arg(long, default_value_t = 100)]
    probe_timeout_ms: u64,
    /// Probing goes on this long after the pod is added (and its agent is back).
    #[arg(long, default_value_t = 2000)]
    settle_ms: u64,
    /// The netpol-cni binary [default: next to this one].
    #[arg(long)]
    cni: Option<PathBuf>,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
struct Run {
    mode: String,
    pod: String,
    /// The lab's add_pod, start to end.
    add_ms: f64,
    /// First probe of the allowed client that connected, after creation.
    reachable_ms: Option<f64>,
    /// The allowed client's probes denied after its first success.
    allowed_flaps: usize,
    /// The denied client's probes that connected.
    leaks: usize,
    /// The denied client's probes sent from creation on.
    denied_probes: usize,
    /// First and last leak, after creation.
    leak_window_ms: Option<(f64, f64)>,
    /// When node-a's agent was started again (down modes), after creation.
    agent_back_ms: Option<f64>,
    /// When every agent reported the pod's state synced, after creation.
    synced_ms: f64,
}

#[derive(Serialize)]
struct Output {
    machine: Machine,
    runs: Vec<Run>,
}

struct Probing {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Probe>>>,
    thread: std::thread::JoinHandle<std::io::Result<()>>,
}

impl Probing {
    fn start(netns: PathBuf, addr: SocketAddr, args: &Args) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (s, l) = (stop.clone(), log.clone());
        let (interval, timeout) = (
            args.probe_interval_ms * 1_000_000,
            args.probe_timeout_ms * 1_000_000,
        );
        let thread = std::thread::spawn(move || prober(netns, addr, interval, timeout, l, s));
        Self { stop, log, thread }
    }

    fn finish(self) -> Result<Vec<Probe>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow!("prober thread panicked"))?
            .context("prober")?;
        let mut log = std::mem::take(&mut *self.log.lock().expect("probe log"));
        log.sort_by_key(|p| p.sent_ns);
        Ok(log)
    }
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

fn main() -> Result<()> {
    let args = Args::parse();
    require_root("pod_start")?;
    for m in &args.modes {
        if !["running", "running+cni", "down", "down+cni"].contains(&m.as_str()) {
            bail!("--modes: unknown mode {m} (running, running+cni, down, down+cni)");
        }
    }
    let (agent_bin, lab_bin) = args.bins.resolve()?;
    let cni = match &args.cni {
        Some(p) => p.clone(),
        None => sibling_exe("netpol-cni")?,
    };
    let machine = Machine::describe();
    let name = format!("ps{}", std::process::id() % 100_000);
    eprintln!("[pod_start] lab {name} up ...");
    // x/b and y/a's ports, as every pod's; the new pods are on node-a.
    let spec = two_node_cluster(&name, "[{port: 80, protocol: TCP}]")?;
    let mut lab = Lab::up(
        &spec,
        &UpOptions {
            server_exe: Some(lab_bin.clone()),
            ..UpOptions::default()
        },
    )?;
    let mut agents = start_agents(lab.state(), &agent_bin, &args.bins.agent_args)
        .map_err(|e| anyhow!("start agents: {e}"))?;
    agents
        .change(
            || {
                write_atomic(
                    &lab.manifests_dir.join("policy.yaml"),
                    format!("{DENY_ALL_X}---{ALLOW_YA_TO_XA_80}").as_bytes(),
                )
                .expect("write policy")
            },
            Duration::from_secs(30),
        )
        .map_err(|e| anyhow!("{e}"))?;
    let node_a = agents
        .agents
        .iter()
        .position(|a| a.node == "node-a")
        .context("no agent on node-a")?;
    let allowed_client = lab.pod("y", "a").context("y/a")?.netns_path();
    let denied_client = lab.pod("y", "b").context("y/b")?.netns_path();

    let mut runs = Vec::new();
    let mut k = 0u8;
    for mode in &args.modes {
        for i in 0..args.runs {
            k += 1;
            let ip = Ipv4Addr::new(10, 244, 1, 100 + k);
            let addr = SocketAddr::new(IpAddr::V4(ip), 80);
            let pod = format!("p{k}");
            let down = mode.starts_with("down");
            let allowed = Probing::start(allowed_client.clone(), addr, &args);
            let denied = Probing::start(denied_client.clone(), addr, &args);
            std::thread::sleep(Duration::from_millis(50));
            if down {
                agents.agents[node_a].kill();
            }
            let t0 = clock::now_ns();
            lab.add_pod(
                PodSpec {
                    namespace: "x".into(),
                    name: pod.clone(),
                    node: "node-a".into(),
                    labels: BTreeMap::from([("pod".to_string(), "a".to_string())]),
                    ports: vec![PortSpec {
                        name: None,
                        port: 80,
                        protocol: Protocol::Tcp,
                    }],
                },
                &AddPodOptions {
                    ip_v4: Some(ip),
                    server_exe: Some(lab_bin.clone()),
                    cni: mode.ends_with("+cni").then(|| cni.clone()),
                    ..AddPodOptions::default()
                },
            )
            .with_context(|| format!("add x/{pod}"))?;
            let added = clock::now_ns();
            let mut agent_back = None;
            if down {
                let due = t0 + args.down_ms * 1_000_000;
                std::thread::sleep(Duration::from_nanos(due.saturating_sub(clock::now_ns())));
                agent_back = Some(clock::now_ns());
                agents.agents[node_a]
                    .restart(lab.state())
                    .context("restart node-a's agent")?;
            }
            agents
                .wait_synced(&[], Duration::from_secs(30))
                .map_err(|e| anyhow!("{e}"))?;
            let synced = clock::now_ns();
            std::thread::sleep(Duration::from_millis(args.settle_ms));
            let allowed = allowed.finish()?;
            let denied = denied.finish()?;
            lab.remove_pod("x", &pod)
                .with_context(|| format!("remove x/{pod}"))?;

            let after = |p: &&Probe| p.sent_ns >= t0;
            let first_ok = allowed
                .iter()
                .filter(after)
                .find(|p| p.outcome == Outcome::Allowed)
                .map(|p| p.sent_ns);
            let allowed_flaps = first_ok.map_or(0, |t| {
                allowed
                    .iter()
                    .filter(|p| p.sent_ns > t && p.outcome != Outcome::Allowed)
                    .count()
            });
            let leaks: Vec<u64> = denied
                .iter()
                .filter(after)
                .filter(|p| p.outcome == Outcome::Allowed)
                .map(|p| p.sent_ns - t0)
                .collect();
            let run = Run {
                mode: mode.clone(),
                pod: format!("x/{pod}"),
                add_ms: ms(added - t0),
                reachable_ms: first_ok.map(|t| ms(t - t0)),
                allowed_flaps,
                leaks: leaks.len(),
                denied_probes: denied.iter().filter(after).count(),
                leak_window_ms: leaks
                    .first()
                    .zip(leaks.last())
                    .map(|(a, b)| (ms(*a), ms(*b))),
                agent_back_ms: agent_back.map(|t| ms(t - t0)),
                synced_ms: ms(synced - t0),
            };
            eprintln!(
                "[pod_start] {mode:<12} run {}/{}: created in {:.1} ms, reachable by y/a after {}, \
                 y/b got through {} of {} times{}",
                i + 1,
                args.runs,
                run.add_ms,
                run.reachable_ms
                    .map_or("never".to_string(), |m| format!("{m:.1} ms")),
                run.leaks,
                run.denied_probes,
                run.leak_window_ms
                    .map_or(String::new(), |(a, b)| format!(" ({a:.1}-{b:.1} ms)"))
            );
            if let Some(back) = run.agent_back_ms {
                eprintln!(
                    "[pod_start] {mode:<12}   agent started again at {back:.0} ms, synced by {:.0} ms",
                    run.synced_ms
                );
            }
            runs.push(run);
        }
    }
    drop(agents);
    lab.down()?;

    println!(
        "pod start: {} runs per mode, probes every {} ms from y/a (allowed) and y/b (denied); {}",
        args.runs, args.probe_interval_ms, machine
    );
    println!(
        "{:<12} {:>22} {:>18} {:>16} {:>14}",
        "mode", "reachable p50/max (ms)", "denied got through", "runs with leaks", "leak window"
    );
    for mode in &args.modes {
        let rs: Vec<&Run> = runs.iter().filter(|r| &r.mode == mode).collect();
        let mut reach: Vec<u64> = rs
            .iter()
            .filter_map(|r| r.reachable_ms.map(|m| (m * 1000.0) as u64))
            .collect();
        reach.sort_unstable();
        let never = rs.len() - reach.len();
        let reach_s = if reach.is_empty() {
            "never".to_string()
        } else {
            format!(
                "{:.1}/{:.1}{}",
                percentile_sorted(&reach, 0.5) as f64 / 1000.0,
                *reach.last().unwrap() as f64 / 1000.0,
                if never > 0 {
                    format!(" ({never} never)")
                } else {
                    String::new()
                }
            )
        };
        let leaks: usize = rs.iter().map(|r| r.leaks).sum();
        let probes: usize = rs.iter().map(|r| r.denied_probes).sum();
        let with = rs.iter().filter(|r| r.leaks > 0).count();
        let window = rs
            .iter()
            .filter_map(|r| r.leak_window_ms.map(|(a, b)| b - a))
            .fold(None::<f64>, |m, w| Some(m.map_or(w, |m| m.max(w))));
        println!(
            "{:<12} {:>22} {:>18} {:>16} {:>14}",
            mode,
            reach_s,
            format!("{leaks} of {probes}"),
            format!("{with} of {}", rs.len()),
            window.map_or("-".to_string(), |w| format!("up to {w:.0} ms"))
        );
    }
    if let Some(path) = &args.json {
        write_json(path, &Output { machine, runs })?;
        eprintln!("[pod_start] wrote {}", path.display());
    }
    Ok(())
}
