//! End-to-end enforcement latency: the time from a policy file written into
//! the manifests dir to the first probe that sees it enforced.
//!
//! The lab has the netpol pair (see `netpol_benches::benchlab`) with
//! netpol-agent on both nodes, as deployed (default settings, flow log on),
//! and `--fake-pods` extra Pod objects (10,000 by default) on nodes that do
//! not exist, with addresses from 10.250.0.0/16: they exist only as
//! manifests, so the agents compile a 10k-pod cluster on every change.
//!
//! A prober thread in the client pod's netns opens a new TCP connection to
//! the server pod every `--probe-interval-ms` (2 ms), whatever happened to
//! the earlier ones (several may be in flight): a SYN-ACK within
//! `--probe-timeout-ms` means allowed, silence means denied (the SYN was
//! dropped). Each connection is reset right away (SO_LINGER 0), so no
//! TIME_WAIT piles up.
//!
//! Then `--changes` changes alternate: write a policy that isolates the
//! server and allows only the fake pods (the probe's connection becomes
//! denied), then remove it (allowed again). For each change, the latency is
//! the send time of the first probe sent after the write (the rename into
//! place, or the unlink) that saw the new verdict, minus the time of the
//! write. Probes after that one that still saw the old verdict are counted
//! as flaps. Between changes the run waits until the agents report the
//! change synced and then a random 150-350 ms, so changes land at random
//! phases of the agents' poll of the directory (every 200 ms by default).
//!
//! `--modes netpol,kube-network-policies` measures sig-network's reference
//! enforcer in the same run, on a pair of its own (a control plane comes up
//! with it): its own prober, the same policy applied with `kubectl apply`
//! (as JSON) and removed with `kubectl delete`, the changes of the two modes
//! taking turns. Its latency counts from the start of kubectl (the call's own
//! time is recorded as `write_ms`); the fake pods exist only as manifests,
//! so its API server does not have them. Where this kernel cannot run it,
//! one line says why, the JSON lists it under `unsupported`, and netpol is
//! measured as before.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Result, anyhow, bail};
use clap::Parser;
use netpol_benches::{
    Binaries,
    benchlab::{BenchLab, Mode, NAMESPACE, SERVE_PORT},
    clock,
    iptables::Backend,
    machine::Machine,
    prober::{Outcome, Probe, prober},
    require_root,
    stats::median_and,
    write_json,
};
use netpol_lab::state::write_atomic;
use serde::Serialize;
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// A reduced run (fewer changes).
    #[arg(long)]
    quick: bool,
    /// Policy changes (deny, remove the deny, alternating) [default: 100; quick: 30].
    #[arg(long)]
    changes: Option<usize>,
    /// Simulated pods (objects only) in the manifests dir.
    #[arg(long, default_value_t = 10_000)]
    fake_pods: usize,
    /// A new probe connection every this many milliseconds.
    #[arg(long, default_value_t = 2)]
    probe_interval_ms: u64,
    /// A probe with no SYN-ACK after this long counts as denied.
    #[arg(long, default_value_t = 200)]
    probe_timeout_ms: u64,
    /// Enforcers to measure: netpol, kube-network-policies.
    #[arg(long, value_delimiter = ',', default_value = "netpol")]
    modes: Vec<Mode>,
    /// The agents' `--poll-ms` [default: the agent's own default].
    #[arg(long)]
    poll_ms: Option<u64>,
    #[command(flatten)]
    bins: Binaries,
    /// Lab name.
    #[arg(long, default_value = "npb-e2e")]
    lab: String,
    /// Write the numbers as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
struct Change {
    mode: Mode,
    index: usize,
    /// `deny` (the policy written) or `allow` (the policy removed).
    direction: &'static str,
    /// From the write to the first probe that saw the new verdict.
    latency_ms: Option<f64>,
    /// From the write to the agents reporting the change synced (status
    /// file, read every 50 ms; netpol only).
    agents_synced_ms: Option<f64>,
    /// How long the write itself took (kubectl for kube-network-policies).
    write_ms: f64,
    /// Probes after the first new verdict that still saw the old one.
    flaps: usize,
    /// When the first and the last of them were sent (ms after the write).
    flaps_from_ms: Option<f64>,
    flaps_to_ms: Option<f64>,
}

#[derive(Serialize)]
struct Summary {
    mode: Mode,
    direction: &'static str,
    changes: usize,
    timed_out: usize,
    median_ms: f64,
    p99_ms: f64,
    min_ms: f64,
    max_ms: f64,
    agents_synced_median_ms: f64,
    flaps: usize,
}

#[derive(Serialize)]
struct Output {
    benchmark: &'static str,
    machine: Machine,
    method: String,
    fake_pods: usize,
    probe_interval_ms: u64,
    probe_timeout_ms: u64,
    poll_ms: Option<u64>,
    modes: Vec<Mode>,
    /// Modes asked for that could not run here, with the reason.
    unsupported: BTreeMap<Mode, String>,
    agents_start_secs: f64,
    peer_start_secs: Option<f64>,
    probes: usize,
    probe_errors: usize,
    summary: Vec<Summary>,
    changes: Vec<Change>,
    secs: f64,
}

/// A small PRNG (xorshift) for the pauses between changes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    require_root("e2e")?;
    let changes = args.changes.unwrap_or(if args.quick { 30 } else { 100 });
    let (agent, lab_bin) = args.bins.resolve()?;
    let machine = Machine::describe();
    let method = format!(
        "a policy file written into (or removed from) the manifests dir -> the first new TCP connection that sees the new verdict; \
         a probe every {} ms from the client pod (bridged node) to the server pod (routed node), {} ms without SYN-ACK = denied; \
         {} fake pods (objects only); agents with default settings{}",
        args.probe_interval_ms,
        args.probe_timeout_ms,
        args.fake_pods,
        args.poll_ms
            .map_or(String::new(), |p| format!(" and --poll-ms {p}"))
    );
    println!("e2e: {machine}");
    println!("  {method}");
    let mut modes = args.modes.clone();
    modes.sort();
    modes.dedup();
    if let Some(m) = modes
        .iter()
        .find(|m| !matches!(m, Mode::Netpol | Mode::Peer))
    {
        bail!("e2e measures netpol and kube-network-policies, not {m}");
    }
    let started = Instant::now();
    let mut lab = BenchLab::up(&args.lab, &modes, &lab_bin, Backend::Nft)?;
    let mut unsupported = BTreeMap::new();
    let mut peer_start_secs = None;
    if modes.contains(&Mode::Peer) {
        let t = Instant::now();
        match lab.start_peer()? {
            Some(reason) => {
                println!("kube-network-policies: not measured: {reason}");
                modes.retain(|&m| m != Mode::Peer);
                unsupported.insert(Mode::Peer, reason);
            }
            None => {
                let secs = t.elapsed().as_secs_f64();
                println!("  kube-network-policies started in {secs:.1} s");
                peer_start_secs = Some(secs);
            }
        }
    }
    let t = Instant::now();
    lab.add_fake_pods(args.fake_pods)?;
    println!(
        "  wrote {} fake pods in {:.1} s",
        args.fake_pods,
        t.elapsed().as_secs_f64()
    );
    let mut agent_args = args.bins.agent_args.clone();
    if let Some(p) = args.poll_ms {
        agent_args.extend(["--poll-ms".to_string(), p.to_string()]);
    }
    let mut agents_start_secs = 0.0;
    if modes.contains(&Mode::Netpol) {
        agents_start_secs = lab.start_agents(&agent, &agent_args, Duration::from_secs(300))?;
        println!("  agents started and synced in {agents_start_secs:.1} s");
    }

    let stop = Arc::new(AtomicBool::new(false));
    let interval_ns = args.probe_interval_ms * 1_000_000;
    let timeout_ns = args.probe_timeout_ms * 1_000_000;
    let mut targets = Vec::new();
    let mut threads = Vec::new();
    for &mode in &modes {
        let pair = lab.pair(mode);
        let addr = SocketAddr::new(pair.server.ip_v4.into(), SERVE_PORT);
        let log = Arc::new(Mutex::new(Vec::<Probe>::new()));
        let (netns, log2, stop) = (pair.client.netns_path(), log.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            prober(netns, addr, interval_ns, timeout_ns, log2, stop)
        }));
        targets.push((mode, log));
    }
    let result = run_changes(&mut lab, changes, &targets, timeout_ns);
    stop.store(true, Ordering::Relaxed);
    let mut prober_results = Vec::new();
    for t in threads {
        prober_results.push(t.join().map_err(|_| anyhow!("a prober panicked"))?);
    }
    drop(lab);
    let changes_done = result?;
    for r in prober_results {
        r.map_err(|e| anyhow!("prober: {e}"))?;
    }
    let mut probes = 0;
    let mut probe_errors = 0;
    for (_, log) in &targets {
        let log = log.lock().expect("log");
        probes += log.len();
        probe_errors += log.iter().filter(|p| p.outcome == Outcome::Error).count();
    }

    let mut summary = Vec::new();
    println!(
        "\n== Policy written -> enforced ({changes} changes, {} fake pods, a probe every {} ms)",
        args.fake_pods, args.probe_interval_ms
    );
    println!(
        "{:<22} {:<8} {:>7} {:>10} {:>10} {:>10} {:>10} {:>14} {:>6} {:>9}",
        "mode",
        "change",
        "n",
        "median ms",
        "p99 ms",
        "min ms",
        "max ms",
        "agents synced",
        "flaps",
        "timed out"
    );
    for &mode in &modes {
        for dir in ["deny", "allow", "all"] {
            let of: Vec<&Change> = changes_done
                .iter()
                .filter(|c| c.mode == mode && (dir == "all" || c.direction == dir))
                .collect();
            let lat: Vec<f64> = of.iter().filter_map(|c| c.latency_ms).collect();
            let synced: Vec<f64> = of.iter().filter_map(|c| c.agents_synced_ms).collect();
            let (median, p99) = median_and(&lat, 0.99);
            let s = Summary {
                mode,
                direction: dir,
                changes: of.len(),
                timed_out: of.len() - lat.len(),
                median_ms: median,
                p99_ms: p99,
                min_ms: lat.iter().copied().fold(f64::INFINITY, f64::min),
                max_ms: lat.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                agents_synced_median_ms: median_and(&synced, 0.5).0,
                flaps: of.iter().map(|c| c.flaps).sum(),
            };
            println!(
                "{:<22} {:<8} {:>7} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>11.1} ms {:>6} {:>9}",
                mode.as_str(),
                dir,
                s.changes,
                s.median_ms,
                s.p99_ms,
                s.min_ms,
                s.max_ms,
                s.agents_synced_median_ms,
                s.flaps,
                s.timed_out
            );
            summary.push(s);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!("({probes} probes, {probe_errors} with socket errors; {secs:.0} s)");
    let out = Output {
        benchmark: "e2e",
        machine,
        method,
        fake_pods: args.fake_pods,
        probe_interval_ms: args.probe_interval_ms,
        probe_timeout_ms: args.probe_timeout_ms,
        poll_ms: args.poll_ms,
        modes,
        unsupported,
        agents_start_secs,
        peer_start_secs,
        probes,
        probe_errors,
        summary,
        changes: changes_done,
        secs,
    };
    if let Some(path) = &args.json {
        write_json(path, &out)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// Probes sent at or after `from_ns` (and before `to_ns`), by send time.
fn probes_between(log: &Mutex<Vec<Probe>>, from_ns: u64, to_ns: u64) -> Vec<Probe> {
    let mut v: Vec<Probe> = log
        .lock()
        .expect("log")
        .iter()
        .filter(|p| p.sent_ns >= from_ns && p.sent_ns < to_ns)
        .copied()
        .collect();
    v.sort_by_key(|p| p.sent_ns);
    v
}

fn run_changes(
    lab: &mut BenchLab,
    changes: usize,
    targets: &[(Mode, Arc<Mutex<Vec<Probe>>>)],
    timeout_ns: u64,
) -> Result<Vec<Change>> {
    let manifests = lab.manifests_dir();
    let policy_file = manifests.join("e2e-deny.json");
    let policy = json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": { "name": "e2e-deny", "namespace": NAMESPACE },
        "spec": {
            "podSelector": { "matchLabels": { "netpol": "server" } },
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{ "podSelector": { "matchLabels": { "role": "fake" } } }],
                "ports": [{ "protocol": "TCP", "port": 8080 }],
            }],
        },
    });
    let policy_text = policy.to_string();
    let kubectl = if targets.iter().any(|(m, _)| *m == Mode::Peer) {
        Some(lab.kubectl()?)
    } else {
        None
    };
    let delete_args = [
        "delete",
        "networkpolicy",
        "e2e-deny",
        "-n",
        NAMESPACE,
        "--ignore-not-found",
    ];
    // The probes must see the server allowed before the first change.
    for (mode, log) in targets {
        let t0 = clock::now_ns();
        loop {
            std::thread::sleep(Duration::from_millis(50));
            let p = probes_between(log, t0, u64::MAX);
            if p.iter().filter(|p| p.outcome == Outcome::Allowed).count() >= 10 {
                break;
            }
            if clock::now_ns() - t0 > 10_000_000_000 {
                bail!(
                    "{mode}: the probes never got through before any policy: {:?}",
                    p.last()
                );
            }
        }
    }
    let mut rng = Rng(clock::now_ns() | 1);
    let mut out = Vec::new();
    // Per change: its mode, write time, first probe with the new verdict, verdict.
    let mut writes = Vec::new();
    for index in 0..changes {
        let deny = index % 2 == 0;
        let expected = if deny {
            Outcome::Denied
        } else {
            Outcome::Allowed
        };
        for j in 0..targets.len() {
            // Rotate the order: each mode goes first equally often.
            let (mode, log) = &targets[(index / 2 + j) % targets.len()];
            let mode = *mode;
            std::thread::sleep(Duration::from_millis(150 + rng.next() % 200));
            let before = match mode {
                Mode::Netpol => Some(
                    lab.agents(Mode::Netpol)
                        .ok_or_else(|| anyhow!("no agents"))?
                        .revisions(),
                ),
                _ => None,
            };
            let t_write = clock::now_ns();
            match (mode, &kubectl) {
                (Mode::Peer, Some(kubectl)) => {
                    if deny {
                        kubectl.apply(std::slice::from_ref(&policy))
                    } else {
                        kubectl.run(&delete_args, None)
                    }
                    .map_err(|e| anyhow!("{e}"))?;
                }
                _ => {
                    if deny {
                        write_atomic(&policy_file, policy_text.as_bytes())
                            .map_err(|e| anyhow!("{e}"))?;
                    } else {
                        std::fs::remove_file(&policy_file)?;
                    }
                }
            }
            let write_ms = (clock::now_ns() - t_write) as f64 / 1e6;
            let synced_ms = match before {
                Some(before) => {
                    let agents = lab
                        .agents(Mode::Netpol)
                        .ok_or_else(|| anyhow!("no agents"))?;
                    let synced = agents.wait_synced(&before, Duration::from_secs(60));
                    synced
                        .is_ok()
                        .then(|| (clock::now_ns() - t_write) as f64 / 1e6)
                }
                None => None,
            };
            // Wait for a probe with the new verdict, then for every probe
            // sent before it to resolve.
            let deadline = t_write + 30_000_000_000;
            let mut seen = false;
            while clock::now_ns() < deadline {
                if probes_between(log, t_write, u64::MAX)
                    .iter()
                    .any(|p| p.outcome == expected)
                {
                    seen = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            if seen {
                std::thread::sleep(Duration::from_nanos(timeout_ns) + Duration::from_millis(30));
            }
            let first = probes_between(log, t_write, u64::MAX)
                .into_iter()
                .find(|p| p.outcome == expected);
            let latency_ms = first.map(|p| (p.sent_ns - t_write) as f64 / 1e6);
            println!(
                "[{}/{changes}] {mode}: {}{}{}",
                index + 1,
                if deny {
                    "deny written  "
                } else {
                    "deny removed  "
                },
                latency_ms.map_or("not seen in 30 s".to_string(), |l| format!(
                    "enforced after {l:.1} ms"
                )),
                match (mode, synced_ms) {
                    (Mode::Netpol, None) => " (agents did not report it synced)".to_string(),
                    (Mode::Netpol, Some(s)) =>
                        format!(" (agents reported it synced after {s:.0} ms)"),
                    _ => format!(" (kubectl took {write_ms:.0} ms)"),
                }
            );
            writes.push((mode, t_write, first.map(|p| p.sent_ns), expected, log));
            out.push(Change {
                mode,
                index,
                direction: if deny { "deny" } else { "allow" },
                latency_ms,
                agents_synced_ms: synced_ms,
                write_ms,
                flaps: 0,
                flaps_from_ms: None,
                flaps_to_ms: None,
            });
        }
    }
    // Flaps: after the first probe with the new verdict and before the next
    // change of the same mode, probes that still saw the old one.
    std::thread::sleep(Duration::from_nanos(timeout_ns) + Duration::from_millis(30));
    for (i, (mode, t_write, first, expected, log)) in writes.iter().enumerate() {
        let Some(first) = first else { continue };
        let end = writes[i + 1..]
            .iter()
            .find(|w| w.0 == *mode)
            .map_or(u64::MAX, |w| w.1);
        let flapped: Vec<Probe> = probes_between(log, *first, end)
            .into_iter()
            .filter(|p| p.outcome != *expected && p.outcome != Outcome::Error)
            .collect();
        out[i].flaps = flapped.len();
        let ms = |p: &Probe| (p.sent_ns - t_write) as f64 / 1e6;
        out[i].flaps_from_ms = flapped.first().map(ms);
        out[i].flaps_to_ms = flapped.last().map(ms);
        if let (Some(a), Some(b)) = (out[i].flaps_from_ms, out[i].flaps_to_ms) {
            println!(
                "  change {} of {mode} ({}): {} probes sent {a:.1} .. {b:.1} ms after the write saw the old verdict after the new one had been seen",
                out[i].index + 1,
                out[i].direction,
                flapped.len()
            );
        }
    }
    let _ = std::fs::remove_file(&policy_file);
    if let Some(kubectl) = &kubectl {
        let _ = kubectl.run(&delete_args, None);
    }
    Ok(out)
}
