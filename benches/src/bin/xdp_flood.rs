//! A flood of denied packets from another node, dropped at the uplink's XDP
//! program or at the pod's veth (issue 17): what the receiving side spends,
//! and what the flood does to an allowed connection's latency.
//!
//! The lab: two nodes (node-a routed, node-b bridged). x/a on node-a takes
//! TCP/80 from x/b only. y/a, on node-b, sends UDP datagrams to x/a:80 from
//! a raw socket at `--rate` packets per second (each a new flow x/a's policy
//! denies), for `--secs` seconds; meanwhile x/b (node-b) opens TCP
//! connections to x/a:80 one after another, `--interval-ms` apart, and each
//! `connect` is timed (SYN to SYN-ACK through both nodes: the allowed
//! connection's latency). Two modes, alternating `--rounds` times:
//! - `tc`: agents with `--xdp off`, the veth's `netpol_to_pod` drops;
//! - `xdp`: agents with `--xdp auto` (native XDP on node-a's `eth0`);
//! - `xdp-g`: agents with `--xdp generic`.
//!
//! node-a's uplink is a veth: the flood's skbs are built by the sender's
//! stack before they cross it, whatever XDP does, and native XDP on a veth
//! runs in the veth's own NAPI (a ring and a poll per batch). So this lab
//! measures what the stack after the uplink costs (routing, netfilter,
//! the pod veth's transmit and `netpol_to_pod`) against what XDP on a veth
//! costs; the skb allocation a NIC driver's XDP saves is not in it.
//!
//! CPU: every node of a netns lab shares one kernel, so there is no
//! "receiving node's CPU" to read. Two figures: the machine's softirq and
//! system time (`/proc/stat`, all CPUs) during the flood, which holds the
//! sender's cost too (the same in both modes: the difference between the
//! modes is the receiving side's) and whatever else runs on the machine,
//! and the kernel's own run time of the two programs that see the flood
//! (`bpf_stats`: `netpol_xdp_uplink`, and the `netpol_to_pod` programs on
//! node-a's veths). Where the flood is dropped shows in the programs' run
//! counts: with XDP on, node-a's `netpol_to_pod` runs only for the allowed
//! connections (`lab_xdp.rs` checks the drop counters themselves).
//!
//! UDP is dropped at XDP only once the reply records cover a reply window
//! (README, "XDP on the node's uplinks"): the agents keep their pins from
//! one mode to the next (only the XDP links are removed, so that each mode
//! attaches as it asks), and the bench waits one window after the first
//! agents armed the records, before the first round. Each round prints the
//! mode the kernel runs on node-a's `eth0`, from the agent's status. (The
//! bench used to start each mode with `start_agents`, which removes the
//! pins, `NETPOL_COUNTERS` among them, as dropping `Agents` does: node-a's
//! counters in `status.json` started from zero at every mode, which read as
//! counters going backwards. Kept pins keep them growing.)
//!
//! `sudo target/release/xdp_flood [--rate 50000] [--secs 5] [--rounds 2]`.
//! Needs root.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use netpol_benches::{
    kstats::{Snapshot, tcx_programs},
    machine::Machine,
    stats::summarize,
};
use netpol_lab::{
    AgentProc, Agents, ClusterSpec, Lab, UpOptions, agents::agent_paths, run_in_netns,
};

#[derive(Parser)]
struct Args {
    /// Denied packets per second sent into x/a.
    #[arg(long, default_value_t = 50_000)]
    rate: u64,
    /// Seconds of flood per round and mode.
    #[arg(long, default_value_t = 5)]
    secs: u64,
    /// Rounds (each runs both modes).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Pause between two timed connections, in milliseconds.
    #[arg(long, default_value_t = 5)]
    interval_ms: u64,
    /// The netpol-agent binary (default: next to this one).
    #[arg(long)]
    agent: Option<PathBuf>,
}

const CLUSTER: &str = r#"
name: NAME
nodes:
  - {name: node-a, attachment: routed, podCIDR: 10.244.1.0/24, podCIDRv6: "fd00:244:1::/64"}
  - {name: node-b, attachment: bridged, podCIDR: 10.244.2.0/24, podCIDRv6: "fd00:244:2::/64"}
namespaces:
  - {name: x, labels: {ns: x}}
  - {name: y, labels: {ns: y}}
pods:
  - {namespace: x, name: a, node: node-a, labels: {pod: a}, ports: [{port: 80, protocol: TCP}]}
  - {namespace: x, name: b, node: node-b, labels: {pod: b}, ports: [{port: 80, protocol: TCP}]}
  - {namespace: y, name: a, node: node-b, labels: {pod: a}, ports: [{port: 80, protocol: TCP}]}
"#;

const POLICY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
    metadata: {name: xa-from-xb, namespace: x}\n\
    spec:\n  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n\
    \x20 ingress:\n  - from:\n    - podSelector: {matchLabels: {pod: b}}\n\
    \x20   ports: [{port: 80, protocol: TCP}]\n";

/// `/proc/stat`'s first line: (system, softirq, total) in clock ticks.
fn cpu_ticks() -> (u64, u64, u64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = s
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 7 {
        return (0, 0, 0);
    }
    (v[2], v[6], v.iter().sum())
}

/// Kernel run time (ns) and runs of every loaded program named `name` (the
/// kernel keeps the first 15 bytes of a name)
/// (only netpol's XDP program has this name: its agents on node-a load it;
/// node-b's is attached to node-b's uplink, which the flood does not reach).
fn prog_stats(name: &str) -> (u64, u64) {
    aya::programs::loaded_programs()
        .flatten()
        .filter(|p| {
            p.name_as_str()
                .is_some_and(|n| name.starts_with(n) && !n.is_empty())
        })
        .fold((0, 0), |(t, c), p| {
            (t + p.run_time().as_nanos() as u64, c + p.run_count())
        })
}

/// An IPv4 UDP datagram (header included, checksum left 0).
fn udp_datagram(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let mut p = vec![0u8; 20 + 8 + 16];
    let len = p.len() as u16;
    p[0] = 0x45;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&dport.to_be_bytes());
    p[24..26].copy_from_slice(&(len - 20).to_be_bytes());
    p
}

/// Send `rate` datagrams per second from `netns` until `stop`; returns the
/// number sent.
fn flood(
    netns: PathBuf,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    rate: u64,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        run_in_netns(&netns, move || {
            // SAFETY: plain socket(2), owned at once.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: a fresh descriptor we own.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let addr = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(dst.octets()),
                },
                sin_zero: [0; 8],
            };
            let packets: Vec<Vec<u8>> = (0..1024u16)
                .map(|i| udp_datagram(src, 20000 + i, dst, 80))
                .collect();
            let start = Instant::now();
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
                if sent >= due {
                    std::thread::sleep(Duration::from_micros(200));
                    continue;
                }
                let p = &packets[(sent % 1024) as usize];
                // SAFETY: buffer and address outlive the call.
                let n = unsafe {
                    libc::sendto(
                        fd.as_raw_fd(),
                        p.as_ptr().cast(),
                        p.len(),
                        0,
                        std::ptr::from_ref(&addr).cast(),
                        std::mem::size_of::<libc::sockaddr_in>() as u32,
                    )
                };
                if n > 0 {
                    sent += 1;
                }
            }
            Ok(sent)
        })
        .unwrap_or(0)
    })
}

#[derive(Debug, Default)]
struct Round {
    sent: u64,
    secs: f64,
    xdp_runs: u64,
    softirq_s: f64,
    system_s: f64,
    xdp_prog_ns: u64,
    veth_prog_ns: u64,
    veth_prog_runs: u64,
    latencies_ns: Vec<u64>,
    failed: usize,
    /// What the kernel runs on node-a's eth0 (node-a's status).
    kernel_mode: String,
}

/// Start one agent per node with `--xdp <xdp>`, keeping the previous
/// agents' pins (maps, reply records, TC links) but not their XDP links: a
/// pinned XDP link keeps the mode it was created with.
fn start(lab: &Lab, agent: &Path, xdp: &str) -> Result<Agents> {
    let agent_args = vec!["--xdp".to_string(), xdp.to_string()];
    let mut procs = Vec::new();
    for node in &lab.nodes {
        let (bpffs, _) = agent_paths(lab, node);
        if let Ok(rd) = std::fs::read_dir(bpffs.join("links")) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().ends_with("-xdp") {
                    std::fs::remove_file(e.path())?;
                }
            }
        }
        procs.push(AgentProc::start(lab, node, agent, &agent_args).context("agent")?);
    }
    let mut agents = Agents { agents: procs };
    agents
        .wait_synced(&[], Duration::from_secs(30))
        .map_err(anyhow::Error::msg)?;
    Ok(agents)
}

/// Stop the agents, keeping their pins for the next mode.
fn stop_keeping_pins(mut agents: Agents) {
    for a in &mut agents.agents {
        a.terminate();
    }
    // `Agents` removes the pins of the agents it holds when dropped.
    agents.agents.clear();
}

/// The reply window of UDP on node-a (README): the longest of conntrack's
/// UDP timeouts in its netns and the flow table's UDP idle timeout (60 s
/// by default), plus 5 s.
fn udp_reply_window(lab: &Lab) -> Result<Duration> {
    let node_a = lab.node("node-a").context("node-a")?.netns_path();
    let ct = run_in_netns(&node_a, || {
        Ok([
            "nf_conntrack_udp_timeout",
            "nf_conntrack_udp_timeout_stream",
        ]
        .iter()
        .filter_map(|f| {
            std::fs::read_to_string(format!("/proc/sys/net/netfilter/{f}"))
                .ok()?
                .trim()
                .parse::<u64>()
                .ok()
        })
        .max()
        .unwrap_or(180))
    })
    .context("conntrack timeouts in node-a")?;
    Ok(Duration::from_secs(
        ct.max(u64::from(netpol_common::DEFAULT_TIMEOUT_UDP_S)) + 5,
    ))
}

fn run_mode(lab: &Lab, agent: &Path, xdp: &str, args: &Args) -> Result<Round> {
    let mut agents = start(lab, agent, xdp)?;
    // The policy is in the manifests directory from the start (see main).
    std::thread::sleep(Duration::from_secs(1));
    let xa = lab.pod_by_key("x/a").context("x/a")?.clone();
    let xb = lab.pod_by_key("x/b").context("x/b")?.clone();
    let ya = lab.pod_by_key("y/a").context("y/a")?.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let ticks0 = cpu_ticks();
    let xdp0 = prog_stats("netpol_xdp_uplink");
    let node_a = lab.node("node-a").context("node-a")?.netns_path();
    let tc0 = Snapshot::new(tcx_programs(&node_a)?);
    let t0 = Instant::now();
    let sender = flood(ya.netns_path(), ya.ip_v4, xa.ip_v4, args.rate, stop.clone());
    // The allowed connection, timed while the flood runs.
    let target = SocketAddr::from((xa.ip_v4, 80));
    let interval = Duration::from_millis(args.interval_ms);
    let secs = args.secs;
    let failed = Arc::new(AtomicU64::new(0));
    let f2 = failed.clone();
    let latencies = run_in_netns(&xb.netns_path(), move || {
        let mut out = Vec::new();
        let end = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < end {
            let t = Instant::now();
            match TcpStream::connect_timeout(&target, Duration::from_secs(1)) {
                Ok(s) => {
                    out.push(t.elapsed().as_nanos() as u64);
                    drop(s);
                }
                Err(_) => {
                    f2.fetch_add(1, Ordering::Relaxed);
                }
            }
            std::thread::sleep(interval);
        }
        Ok(out)
    })
    .context("timing connections from x/b")?;
    stop.store(true, Ordering::Relaxed);
    let sent = sender.join().unwrap_or(0);
    let secs = t0.elapsed().as_secs_f64();
    let ticks1 = cpu_ticks();
    let xdp1 = prog_stats("netpol_xdp_uplink");
    let tc = Snapshot::new(tcx_programs(&node_a)?).since(&tc0).to_pod;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let kernel_mode = agents
        .node("node-a")
        .status()
        .and_then(|s| s["xdp"]["eth0"].as_str().map(str::to_string))
        .unwrap_or_else(|| "-".to_string());
    stop_keeping_pins(agents);
    Ok(Round {
        kernel_mode,
        sent,
        secs,
        xdp_runs: xdp1.1 - xdp0.1,
        system_s: (ticks1.0 - ticks0.0) as f64 / hz,
        softirq_s: (ticks1.1 - ticks0.1) as f64 / hz,
        xdp_prog_ns: xdp1.0 - xdp0.0,
        veth_prog_ns: tc.run_time_ns,
        veth_prog_runs: tc.run_cnt,
        latencies_ns: latencies,
        failed: failed.load(Ordering::Relaxed) as usize,
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("needs root (network namespaces, BPF)");
    }
    let agent = args.agent.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .expect("own path")
            .with_file_name("netpol-agent")
    });
    let _stats = netpol_benches::kstats::enable().context("bpf_stats")?;
    let name = format!("xf{}", std::process::id() % 100_000);
    let spec = ClusterSpec::from_yaml(&CLUSTER.replace("NAME", &name))?;
    let lab = Lab::up(&spec, &UpOptions::default()).map_err(|e| anyhow::anyhow!("{e}"))?;
    std::fs::write(lab.manifests_dir.join("xa-from-xb.yaml"), POLICY)?;
    println!("machine: {}", Machine::describe());
    println!(
        "flood: {} denied UDP packets/s from y/a (node-b) to x/a:80 (node-a), {} s per mode and \
         round, {} rounds; allowed: TCP connect x/b (node-b) -> x/a:80 every {} ms",
        args.rate, args.secs, args.rounds, args.interval_ms
    );
    // The first agents arm the reply records; UDP is dropped at XDP only a
    // reply window later.
    let window = udp_reply_window(&lab)?;
    stop_keeping_pins(start(&lab, &agent, "off")?);
    println!(
        "waiting {} s: XDP drops UDP once the reply records cover a window",
        window.as_secs()
    );
    std::thread::sleep(window);
    let mut all: Vec<(&str, Round)> = Vec::new();
    for _ in 0..args.rounds {
        for (mode, xdp) in [("tc", "off"), ("xdp", "auto"), ("xdp-g", "generic")] {
            let r = run_mode(&lab, &agent, xdp, &args)?;
            all.push((mode, r));
        }
    }
    println!(
        "{:<5} {:>8} {:>10} {:>11} {:>11} {:>10} {:>10} {:>12} {:>12} {:>9} {:>9} {:>7}",
        "mode",
        "kernel",
        "sent/s",
        "xdp runs/s",
        "veth runs/s",
        "softirq %",
        "system %",
        "xdp ns/run",
        "veth ns/run",
        "p50 us",
        "p99 us",
        "failed"
    );
    for (mode, r) in &all {
        let s = summarize(&r.latencies_ns);
        println!(
            "{:<5} {:>8} {:>10.0} {:>11.0} {:>11.0} {:>10.1} {:>10.1} {:>12.0} {:>12.0} {:>9.0} {:>9.0} {:>7}",
            mode,
            r.kernel_mode,
            r.sent as f64 / r.secs,
            r.xdp_runs as f64 / r.secs,
            r.veth_prog_runs as f64 / r.secs,
            // Percent of one CPU.
            100.0 * r.softirq_s / r.secs,
            100.0 * r.system_s / r.secs,
            r.xdp_prog_ns as f64 / r.xdp_runs.max(1) as f64,
            r.veth_prog_ns as f64 / r.veth_prog_runs.max(1) as f64,
            s.p50_us,
            s.p99_us,
            r.failed
        );
    }
    // The lab's teardown removes the pins the agents kept.
    drop(lab);
    Ok(())
}
