//! Request latency against the number of policies, the method of the Romana
//! article (seed 000): a client pod sends HTTP requests to nginx in a server
//! pod, each on a new TCP connection (`Connection: close`), one at a time
//! with a pause after each (neither CPU nor link saturates), for several
//! response sizes, with 0 .. 10,000 policies selecting the server, built so
//! that a new connection must pass every non-matching policy before the one
//! that accepts it.
//!
//! The modes run in one lab (see `netpol_benches::benchlab`), interleaved
//! in chunks of requests so that a noisy machine hits them alike:
//! - `none`: no agent, no programs, no rules;
//! - `floor`: no agent, no rules, a program that returns TC_ACT_OK at once
//!   on the hooks netpol uses (TCX ingress and egress of both pods' host
//!   veths, TCX egress of the node devices with `netpol_post_nat`),
//!   attached by the benchmark (`netpol_benches::floor`): what any
//!   TC program costs there, so that `netpol - floor` is netpol's own work;
//! - `netpol`: netpol-agent on the client's and the server's node, the
//!   policies written into the manifests dir, flow log on (as deployed);
//! - `netpol-nolog`: the same with `--events-per-sec 0` (the datapath alone);
//! - `iptables`: a per-pod chain in the server's node, conntrack first, one
//!   `-p tcp --dport X -m set --match-set <peers> src -j ACCEPT` per policy,
//!   then DROP (see `netpol_benches::iptables`);
//! - `kube-network-policies` (not in the default set: it brings up a control
//!   plane): sig-network's reference enforcer on the client's and the
//!   server's node, the same policies applied through the lab's API server.
//!   Where this kernel cannot run it, one line says why, the JSON lists it
//!   under `unsupported`, and the other modes run as before.
//!
//! A request is timed from before `connect` to the last byte of the body.
//! Prints mean, p50 and p99 per mode, size and policy count, the overhead
//! over `none` in percent, and the netpol modes' extra time over `floor` in
//! microseconds. With kernel statistics on (the default; see
//! `netpol_benches::kstats`) it also prints, for each mode with programs,
//! what one run of its programs cost in the real path (`run_time_ns /
//! run_cnt`, to_pod and from_pod) and how many runs a request took.
//! `--json` and `--svg` write the numbers and the overhead plot. Needs root
//! and nginx.

use std::{
    cell::Cell,
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use clap::Parser;
use netpol_benches::{
    Binaries,
    benchlab::{BenchLab, Mode},
    clock, http,
    iptables::Backend,
    kstats::{self, Counters, PerHook, Snapshot},
    machine::Machine,
    nginx, require_root, size_label,
    stats::{Overhead, Summary, overhead, summarize},
    svg, write_json,
};
use netpol_lab::run_in_netns;
use serde::Serialize;

#[derive(Parser)]
struct Args {
    /// A reduced run (fewer policy counts, sizes and requests).
    #[arg(long)]
    quick: bool,
    /// Policy counts [default: 0,10,50,100,200,1000,10000; quick: 0,100,1000,10000].
    #[arg(long, value_delimiter = ',')]
    policies: Option<Vec<usize>>,
    /// Response body sizes in bytes [default: 512,1024,10240,102400; quick: 512,10240].
    #[arg(long, value_delimiter = ',')]
    sizes: Option<Vec<usize>>,
    /// Requests per mode, size and policy count [default: 2000; quick: 1000].
    #[arg(long)]
    requests: Option<usize>,
    /// Requests in a row before switching to the next mode.
    #[arg(long, default_value_t = 50)]
    chunk: usize,
    /// Pause after each request, in microseconds (keeps the CPUs mostly idle).
    #[arg(long, default_value_t = 500)]
    gap_us: u64,
    /// Modes to measure (`none` is the baseline and always runs).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "none,floor,netpol,netpol-nolog,iptables"
    )]
    modes: Vec<Mode>,
    /// Leave `kernel.bpf_stats_enabled` alone: no per-program run times
    /// (counting adds two clock reads to every program run, floor and netpol
    /// alike).
    #[arg(long)]
    no_kernel_stats: bool,
    /// iptables backend of the iptables mode.
    #[arg(long, value_enum, default_value = "nft")]
    iptables_backend: Backend,
    /// nginx worker processes.
    #[arg(long, default_value_t = 1)]
    nginx_workers: usize,
    /// How clients reach the server: `pod` (its address) or `service` (its
    /// Service's ClusterIP, through kube-proxy in iptables mode, in a lab
    /// with a control plane). `service` implies `--client-egress`.
    #[arg(long, value_enum, default_value = "pod")]
    via: Via,
    /// One more policy isolates the clients for egress (allowing TCP to the
    /// servers' HTTP port), so netpol judges each connection's egress too:
    /// after kube-proxy's DNAT with `--via service`, on the client's veth
    /// with `--via pod`. Compare the two runs for the post-DNAT verdict's cost.
    #[arg(long)]
    client_egress: bool,
    #[command(flatten)]
    bins: Binaries,
    /// Lab name.
    #[arg(long, default_value = "npb-latency")]
    lab: String,
    /// Write the numbers as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the overhead plot (SVG) here.
    #[arg(long)]
    svg: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Via {
    Pod,
    Service,
}

#[derive(Serialize)]
struct Row {
    policies: usize,
    size: usize,
    mode: Mode,
    #[serde(flatten)]
    summary: Summary,
    errors: usize,
    /// Over `none` at the same size and policy count (absent for `none`).
    overhead: Option<Overhead>,
    /// The netpol modes over `floor` at the same size and policy count.
    over_floor: Option<OverFloor>,
    /// The kernel's statistics of the mode's programs during the cell
    /// (modes with programs, kernel statistics on).
    kernel: Option<KernelRuns>,
}

/// A mode's extra time per request over `floor`, in microseconds.
#[derive(Serialize, Clone, Copy)]
struct OverFloor {
    mean_us: f64,
    /// Half-width of the 95% confidence interval of `mean_us`.
    mean_ci95_us: f64,
    p50_us: f64,
    /// The difference of the programs' own time per request, from the
    /// kernel's statistics (`KernelRuns::program_us_per_request`).
    program_us: Option<f64>,
}

/// What the kernel counted for a mode's programs over a cell's requests.
#[derive(Serialize, Clone, Copy)]
struct KernelRuns {
    to_pod: Counters,
    from_pod: Counters,
    post_nat: Counters,
    to_pod_ns_per_run: f64,
    from_pod_ns_per_run: f64,
    post_nat_ns_per_run: f64,
    /// Program runs (every hook of both nodes) per request.
    runs_per_request: f64,
    /// run_time_ns of all of them per request, in microseconds.
    program_us_per_request: f64,
}

impl KernelRuns {
    fn new(d: PerHook, requests: usize) -> KernelRuns {
        let per_req = |x: u64| x as f64 / requests.max(1) as f64;
        KernelRuns {
            to_pod: d.to_pod,
            from_pod: d.from_pod,
            post_nat: d.post_nat,
            to_pod_ns_per_run: d.to_pod.ns_per_run(),
            from_pod_ns_per_run: d.from_pod.ns_per_run(),
            post_nat_ns_per_run: d.post_nat.ns_per_run(),
            runs_per_request: per_req(d.total().run_cnt),
            program_us_per_request: per_req(d.total().run_time_ns) / 1000.0,
        }
    }
}

fn over_floor(floor: &Row, x: &Summary, kernel: Option<KernelRuns>) -> OverFloor {
    let f = &floor.summary;
    let se =
        (f.stddev_us.powi(2) / f.n.max(1) as f64 + x.stddev_us.powi(2) / x.n.max(1) as f64).sqrt();
    OverFloor {
        mean_us: x.mean_us - f.mean_us,
        mean_ci95_us: 1.96 * se,
        p50_us: x.p50_us - f.p50_us,
        program_us: match (kernel, floor.kernel) {
            (Some(k), Some(fk)) => Some(k.program_us_per_request - fk.program_us_per_request),
            _ => None,
        },
    }
}

#[derive(Serialize)]
struct Point {
    policies: usize,
    size: usize,
    secs: f64,
    /// CPU all agents used while the cell ran, in % of one CPU.
    agents_cpu_pct: f64,
    /// Flow-log events the `netpol` mode's datapath sent to its agents
    /// during the cell (and those its rate limit held back), from the
    /// agents' status files (about 1 s resolution).
    netpol_events_sent: u64,
    netpol_events_rate_limited: u64,
}

#[derive(Serialize)]
struct Output {
    benchmark: &'static str,
    machine: Machine,
    method: String,
    policies: Vec<usize>,
    sizes: Vec<usize>,
    requests: usize,
    chunk: usize,
    gap_us: u64,
    iptables_backend: Backend,
    modes: Vec<Mode>,
    /// Modes asked for that could not run here, with the reason.
    unsupported: BTreeMap<Mode, String>,
    /// How the kernel's per-program statistics were turned on (absent with
    /// `--no-kernel-stats`).
    kernel_stats: Option<&'static str>,
    setup: BTreeMap<String, f64>,
    policy_times: Vec<netpol_benches::benchlab::PolicyTimes>,
    cells: Vec<Point>,
    rows: Vec<Row>,
    secs: f64,
}

/// One client in its pod's netns, for one mode.
struct Client {
    mode: Mode,
    netns: PathBuf,
    addr: SocketAddr,
    /// The next local port. Every connection of a run gets a port of its
    /// own (1024..=65535, then around again), so that it is a new 5-tuple:
    /// netpol keeps the flow-table entry of a closed connection, and a
    /// connection that reused its tuple would take the known-flow path
    /// instead of the policy decision the benchmark is about (iptables'
    /// conntrack, past TIME_WAIT, walks the chain again either way).
    next_port: Cell<u16>,
}

impl Client {
    fn take_port(&self) -> u16 {
        let p = self.next_port.get();
        self.next_port
            .set(if p == u16::MAX { FIRST_PORT } else { p + 1 });
        p
    }
}

const FIRST_PORT: u16 = 1024;

/// `count` requests one after the other from inside the client's netns;
/// returns the latencies (ns) and the number of failed requests.
fn run_chunk(c: &Client, path: &str, count: usize, gap_ns: u64) -> Result<(Vec<u64>, usize)> {
    let addr = c.addr;
    let ports: Vec<u16> = (0..count * 2).map(|_| c.take_port()).collect();
    let (out, used) = run_in_netns(&c.netns, || {
        let mut buf = Vec::with_capacity(128 * 1024);
        let mut samples = Vec::with_capacity(count);
        let mut errors = 0;
        let mut ports = ports.iter().copied();
        let mut used = 0;
        for _ in 0..count {
            // A port still taken (the lab's server on 80, a connection not
            // yet closed) is skipped.
            let r = loop {
                let Some(port) = ports.next() else {
                    break http::get_close(addr, path, Duration::from_secs(2), &mut buf);
                };
                used += 1;
                match http::get_close_from(Some(port), addr, path, Duration::from_secs(2), &mut buf)
                {
                    Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
                    r => break r,
                }
            };
            match r {
                Ok(r) => samples.push(r.elapsed_ns()),
                Err(_) => errors += 1,
            }
            clock::sleep_ns(gap_ns);
        }
        Ok(((samples, errors), used))
    })?;
    // Hand back the ports this chunk did not use.
    let unused = count * 2 - used;
    for _ in 0..unused {
        let p = c.next_port.get();
        c.next_port
            .set(if p == FIRST_PORT { u16::MAX } else { p - 1 });
    }
    Ok(out)
}

fn main() -> Result<()> {
    let args = Args::parse();
    require_root("latency")?;
    let policies = args.policies.clone().unwrap_or_else(|| {
        if args.quick {
            vec![0, 100, 1000, 10000]
        } else {
            vec![0, 10, 50, 100, 200, 1000, 10000]
        }
    });
    let sizes = args.sizes.clone().unwrap_or_else(|| {
        if args.quick {
            vec![512, 10240]
        } else {
            vec![512, 1024, 10240, 102400]
        }
    });
    let requests = args
        .requests
        .unwrap_or(if args.quick { 1000 } else { 2000 });
    let mut modes = args.modes.clone();
    if !modes.contains(&Mode::None) {
        modes.insert(0, Mode::None);
    }
    modes.sort();
    modes.dedup();
    let (agent, lab_bin) = args.bins.resolve()?;
    let machine = Machine::describe();
    let method = format!(
        "HTTP/1.1 GET, a new TCP connection per request (Connection: close), timed from connect to the last body byte; \
         client pod on a bridged node -> nginx ({} worker) in a pod on a routed node; \
         {requests} requests per mode, size and policy count, modes interleaved in chunks of {}, {} us pause after each request",
        args.nginx_workers, args.chunk, args.gap_us
    );
    println!("latency: {machine}");
    println!("  {method}");
    println!(
        "  modes: {} (iptables: {} backend, conntrack + one rule and one ipset per policy)",
        modes
            .iter()
            .map(|m| m.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        args.iptables_backend.as_str()
    );
    let started = Instant::now();
    let mut setup = BTreeMap::new();

    let options = netpol_benches::benchlab::LabOptions {
        via_service: args.via == Via::Service,
        client_egress: args.client_egress || args.via == Via::Service,
    };
    println!(
        "  clients dial the server's {}{}",
        if options.via_service {
            "Service ClusterIP (kube-proxy iptables mode)"
        } else {
            "pod address"
        },
        if options.client_egress {
            "; one more policy isolates the clients for egress (allowing TCP to the servers' HTTP port)"
        } else {
            ""
        }
    );
    let mut lab = BenchLab::up_with(&args.lab, &modes, &lab_bin, args.iptables_backend, options)?;
    setup.insert("lab_up_secs".to_string(), started.elapsed().as_secs_f64());
    let mut unsupported = BTreeMap::new();
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
                setup.insert("peer_start_secs".to_string(), secs);
            }
        }
    }
    lab.start_nginx(&sizes, args.nginx_workers)?;
    if modes.iter().any(|m| m.is_netpol()) {
        let secs = lab.start_agents(&agent, &args.bins.agent_args, Duration::from_secs(300))?;
        println!("  agents started and synced in {secs:.1} s");
        setup.insert("agents_start_secs".to_string(), secs);
        // The agents also put netpol_post_nat on node devices: the floor
        // goes there too, so that it runs wherever netpol runs.
        if let Some(&m) = modes.iter().find(|m| m.is_netpol()) {
            let (done, missing) = lab.mirror_post_nat(m)?;
            if !done.is_empty() {
                println!("  floor also on the post_nat hooks: {}", done.join(", "));
            }
            if !missing.is_empty() {
                println!(
                    "  floor NOT on these post_nat hooks: {}",
                    missing.join(", ")
                );
            }
        }
    }
    // Counted from here to the end of the run (the guard drops with main).
    let stats_on = if args.no_kernel_stats || !modes.iter().any(|m| m.has_programs()) {
        None
    } else {
        let s = kstats::enable()?;
        println!("  kernel statistics on: {}", s.describe());
        Some(s)
    };
    let prog_modes: Vec<Mode> = if stats_on.is_some() {
        modes.iter().copied().filter(|m| m.has_programs()).collect()
    } else {
        Vec::new()
    };
    let clients: Vec<Client> = modes
        .iter()
        .map(|&m| {
            let p = lab.pair(m);
            Client {
                mode: m,
                netns: p.client.netns_path(),
                addr: p.http_addr(),
                next_port: Cell::new(FIRST_PORT),
            }
        })
        .collect();

    let total = policies.len() * sizes.len();
    let mut k = 0;
    let mut rows: Vec<Row> = Vec::new();
    let mut cells = Vec::new();
    let mut policy_times = Vec::new();
    let gap_ns = args.gap_us * 1000;
    for &n in &policies {
        let times = lab.set_policies(n, Duration::from_secs(600))?;
        println!(
            "== {n} policies: agents synced in {}, iptables loaded in {}{}",
            times
                .netpol_secs
                .map_or("-".into(), |s| format!("{s:.2} s")),
            times
                .iptables_secs
                .map_or("-".into(), |s| format!("{s:.2} s")),
            times.peer_secs.map_or(String::new(), |s| format!(
                ", kube-network-policies applied and enforced in {s:.2} s"
            ))
        );
        policy_times.push(times);
        lab.check_enforcement()?;
        for &size in &sizes {
            k += 1;
            let path = nginx::file_path(size);
            let label = size_label(size);
            print!(
                "[{k}/{total}] {n} policies, {label}: {} modes x {requests} requests interleaved ... ",
                clients.len()
            );
            use std::io::Write as _;
            let _ = std::io::stdout().flush();
            let t = Instant::now();
            let cpu0 = lab.agents_cpu_secs();
            let sent0 = lab.agent_counter(Mode::Netpol, "events_sent");
            let limited0 = lab.agent_counter(Mode::Netpol, "events_rate_limited");
            // Warm up every path (ARP, neighbour entries, nginx's caches).
            for c in &clients {
                run_chunk(c, &path, 10, gap_ns)?;
            }
            let snapshots = |lab: &BenchLab| -> Result<BTreeMap<Mode, Snapshot>> {
                prog_modes
                    .iter()
                    .map(|&m| Ok((m, lab.hook_snapshot(m)?)))
                    .collect()
            };
            let before = snapshots(&lab)?;
            let mut samples: BTreeMap<Mode, (Vec<u64>, usize)> = BTreeMap::new();
            let rounds = requests.div_ceil(args.chunk.max(1));
            for r in 0..rounds {
                let count = args.chunk.min(requests - r * args.chunk);
                for j in 0..clients.len() {
                    // Rotate the order: each mode goes first equally often.
                    let c = &clients[(r + j) % clients.len()];
                    let (s, e) = run_chunk(c, &path, count, gap_ns)?;
                    let entry = samples.entry(c.mode).or_default();
                    entry.0.extend(s);
                    entry.1 += e;
                    if entry.1 > requests / 10 + 5 {
                        bail!(
                            "{}: {} failed requests at {n} policies, {label}",
                            c.mode,
                            entry.1
                        );
                    }
                }
            }
            let after = snapshots(&lab)?;
            let secs = t.elapsed().as_secs_f64();
            let cpu = (lab.agents_cpu_secs() - cpu0) / secs * 100.0;
            let sent = lab
                .agent_counter(Mode::Netpol, "events_sent")
                .saturating_sub(sent0);
            let limited = lab
                .agent_counter(Mode::Netpol, "events_rate_limited")
                .saturating_sub(limited0);
            println!(
                "{secs:.1} s (agents {cpu:.1}% CPU{})",
                if modes.contains(&Mode::Netpol) {
                    format!(", netpol flow-log events: {sent} sent, {limited} rate-limited")
                } else {
                    String::new()
                }
            );
            cells.push(Point {
                policies: n,
                size,
                secs,
                agents_cpu_pct: cpu,
                netpol_events_sent: sent,
                netpol_events_rate_limited: limited,
            });
            let base = summarize(&samples[&Mode::None].0);
            // Floor first (BTreeMap order follows `Mode`), so the netpol
            // modes can be compared with it.
            let mut floor_row: Option<usize> = None;
            for (&mode, (s, errors)) in &samples {
                let summary = summarize(s);
                let o = (mode != Mode::None).then(|| overhead(&base, &summary));
                let kernel = after
                    .get(&mode)
                    .zip(before.get(&mode))
                    .map(|(a, b)| KernelRuns::new(a.since(b), s.len() + errors));
                let of = floor_row
                    .filter(|_| mode.is_netpol())
                    .map(|i| over_floor(&rows[i], &summary, kernel));
                println!(
                    "    {:<9} mean {:>8.1} us  p50 {:>8.1}  p99 {:>8.1}{}{}",
                    mode.as_str(),
                    summary.mean_us,
                    summary.p50_us,
                    summary.p99_us,
                    o.map_or(String::new(), |o| format!(
                        "   overhead: mean {:+.1}% (±{:.1}), p50 {:+.1}%",
                        o.mean_pct, o.mean_ci95_pct, o.p50_pct
                    )),
                    if *errors > 0 {
                        format!("  ({errors} failed)")
                    } else {
                        String::new()
                    }
                );
                if let Some(k) = kernel {
                    println!(
                        "    {:<9} kernel: to_pod {:>5.0} ns x {:.1}, from_pod {:>5.0} ns x {:.1}, post_nat {:>5.0} ns x {:.1} runs/request: {:.2} us/request in programs{}",
                        "",
                        k.to_pod_ns_per_run,
                        k.to_pod.run_cnt as f64 / (s.len() + errors).max(1) as f64,
                        k.from_pod_ns_per_run,
                        k.from_pod.run_cnt as f64 / (s.len() + errors).max(1) as f64,
                        k.post_nat_ns_per_run,
                        k.post_nat.run_cnt as f64 / (s.len() + errors).max(1) as f64,
                        k.program_us_per_request,
                        of.map_or(String::new(), |o| format!(
                            "; over floor: p50 {:+.2} us, mean {:+.2} us (±{:.2}), programs {}",
                            o.p50_us,
                            o.mean_us,
                            o.mean_ci95_us,
                            o.program_us.map_or("-".into(), |p| format!("{p:+.2} us"))
                        ))
                    );
                } else if let Some(o) = of {
                    println!(
                        "    {:<9} over floor: p50 {:+.2} us, mean {:+.2} us (±{:.2})",
                        "", o.p50_us, o.mean_us, o.mean_ci95_us
                    );
                }
                if mode == Mode::Floor {
                    floor_row = Some(rows.len());
                }
                rows.push(Row {
                    policies: n,
                    size,
                    mode,
                    summary,
                    errors: *errors,
                    overhead: o,
                    over_floor: of,
                    kernel,
                });
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    print_tables(&rows, &policies, &sizes, &modes);
    print_floor_tables(&rows, &policies, &sizes, &modes);
    drop(lab);

    if let Some(&max) = policies.iter().max()
        && modes.iter().any(|m| m.is_netpol())
    {
        let parts: Vec<String> = sizes
            .iter()
            .filter_map(|&s| {
                let r = rows
                    .iter()
                    .find(|r| r.policies == max && r.size == s && r.mode == Mode::NetpolNolog)?;
                let o = r.overhead?;
                Some(format!(
                    "{} {:+.1}% (±{:.1}, p50 {:+.1}%)",
                    size_label(s),
                    o.mean_pct,
                    o.mean_ci95_pct,
                    o.p50_pct
                ))
            })
            .collect();
        if !parts.is_empty() {
            println!(
                "netpol-nolog (the datapath) at {max} policies, mean overhead over no enforcement: {} (bar: within 2%)",
                parts.join(", ")
            );
        }
    }
    print_over_floor_summary(&rows, &policies, &sizes, &modes);
    println!("({secs:.0} s)");
    let kernel_stats = stats_on.as_ref().map(|s| s.describe());
    drop(stats_on);

    let out = Output {
        benchmark: "latency",
        machine: machine.clone(),
        method: method.clone(),
        policies: policies.clone(),
        sizes: sizes.clone(),
        requests,
        chunk: args.chunk,
        gap_us: args.gap_us,
        iptables_backend: args.iptables_backend,
        modes: modes.clone(),
        unsupported,
        kernel_stats,
        setup,
        policy_times,
        cells,
        rows,
        secs,
    };
    if let Some(path) = &args.json {
        write_json(path, &out)?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &args.svg {
        plot(&out, &machine).write(path)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// The overhead tables: one per enforcing mode, sizes by policy counts.
fn print_tables(rows: &[Row], policies: &[usize], sizes: &[usize], modes: &[Mode]) {
    let find = |n: usize, s: usize, m: Mode| {
        rows.iter()
            .find(|r| r.policies == n && r.size == s && r.mode == m)
    };
    println!("\n== Latency per request (us): mean / p50 / p99");
    print!("{:<8} {:>8}", "size", "policies");
    for m in modes {
        print!(" | {:^26}", m.as_str());
    }
    println!();
    for &s in sizes {
        for &n in policies {
            print!("{:<8} {:>8}", size_label(s), n);
            for &m in modes {
                match find(n, s, m) {
                    Some(r) => print!(
                        " | {:>8.1} {:>8.1} {:>8.1}",
                        r.summary.mean_us, r.summary.p50_us, r.summary.p99_us
                    ),
                    None => print!(" | {:^26}", "-"),
                }
            }
            println!();
        }
    }
    for &m in modes.iter().filter(|&&m| m != Mode::None) {
        println!(
            "\n== {m}: overhead of the mean over no enforcement, % (± half-width of the 95% CI); [p50 overhead]"
        );
        print!("{:<8}", "size");
        for n in policies {
            print!(" {:>20}", format!("{n} policies"));
        }
        println!();
        for &s in sizes {
            print!("{:<8}", size_label(s));
            for &n in policies {
                match find(n, s, m).and_then(|r| r.overhead) {
                    Some(o) => print!(
                        " {:>20}",
                        format!(
                            "{:+.1}±{:.1} [{:+.1}]",
                            o.mean_pct, o.mean_ci95_pct, o.p50_pct
                        )
                    ),
                    None => print!(" {:>20}", "-"),
                }
            }
            println!();
        }
    }
}

/// The netpol modes over `floor`, and what one program run cost (kernel
/// statistics), by size and policy count.
fn print_floor_tables(rows: &[Row], policies: &[usize], sizes: &[usize], modes: &[Mode]) {
    let find = |n: usize, s: usize, m: Mode| {
        rows.iter()
            .find(|r| r.policies == n && r.size == s && r.mode == m)
    };
    let header = || {
        print!("{:<8}", "size");
        for n in policies {
            print!(" {:>26}", format!("{n} policies"));
        }
        println!();
    };
    if modes.contains(&Mode::Floor) {
        for &m in modes.iter().filter(|m| m.is_netpol()) {
            println!(
                "\n== {m} over floor, us per request: p50 / mean (± half-width of the 95% CI) [programs' kernel time]"
            );
            header();
            for &s in sizes {
                print!("{:<8}", size_label(s));
                for &n in policies {
                    match find(n, s, m).and_then(|r| r.over_floor) {
                        Some(o) => print!(
                            " {:>26}",
                            format!(
                                "{:+.2} / {:+.2}±{:.2} [{}]",
                                o.p50_us,
                                o.mean_us,
                                o.mean_ci95_us,
                                o.program_us.map_or("-".into(), |p| format!("{p:+.2}"))
                            )
                        ),
                        None => print!(" {:>26}", "-"),
                    }
                }
                println!();
            }
        }
    }
    let with_kernel: Vec<Mode> = modes
        .iter()
        .copied()
        .filter(|&m| rows.iter().any(|r| r.mode == m && r.kernel.is_some()))
        .collect();
    if with_kernel.is_empty() {
        return;
    }
    println!(
        "\n== Kernel statistics (run_time_ns / run_cnt): ns per program run, to_pod / from_pod / post_nat; runs per request"
    );
    print!("{:<8} {:>8}", "size", "policies");
    for m in &with_kernel {
        print!(" | {:^30}", m.as_str());
    }
    println!();
    for &s in sizes {
        for &n in policies {
            print!("{:<8} {:>8}", size_label(s), n);
            for &m in &with_kernel {
                match find(n, s, m).and_then(|r| r.kernel) {
                    Some(k) => print!(
                        " | {:>6.0} / {:>5.0} / {:>5.0} x {:>4.1}",
                        k.to_pod_ns_per_run,
                        k.from_pod_ns_per_run,
                        k.post_nat_ns_per_run,
                        k.runs_per_request
                    ),
                    None => print!(" | {:^30}", "-"),
                }
            }
            println!();
        }
    }
}

/// One line per netpol mode: its p50 over floor at each policy count, per
/// size (the bar: at most +0.5 us per request at every policy count).
fn print_over_floor_summary(rows: &[Row], policies: &[usize], sizes: &[usize], modes: &[Mode]) {
    if !modes.contains(&Mode::Floor) {
        return;
    }
    for &m in modes.iter().filter(|m| m.is_netpol()) {
        for &s in sizes {
            let parts: Vec<String> = policies
                .iter()
                .filter_map(|&n| {
                    let r = rows
                        .iter()
                        .find(|r| r.policies == n && r.size == s && r.mode == m)?;
                    let o = r.over_floor?;
                    Some(format!("{n}: {:+.2} us", o.p50_us))
                })
                .collect();
            if !parts.is_empty() {
                println!(
                    "{m} over floor, p50 per request, {}: {} (bar: at most +0.5 us at every policy count)",
                    size_label(s),
                    parts.join(", ")
                );
            }
        }
    }
}

/// Overhead over `none` by policy count: one column per size; the mean (the
/// article's measure) on top, the median below.
fn plot(out: &Output, machine: &Machine) -> svg::Figure {
    let mut panels = Vec::new();
    for (metric, label) in [("mean", "mean"), ("p50", "median")] {
        for &s in &out.sizes {
            panels.push(svg::Panel {
                title: format!("{} responses: {label}", size_label(s)),
                x_label: "policies selecting the server".into(),
                y_label: format!("{label} latency over no enforcement (%)"),
                x_ticks: out.policies.iter().map(|n| n.to_string()).collect(),
                series: out
                    .modes
                    .iter()
                    .filter(|&&m| m != Mode::None)
                    .map(|&m| svg::Series {
                        name: m.as_str().to_string(),
                        values: out
                            .policies
                            .iter()
                            .map(|&n| {
                                out.rows
                                    .iter()
                                    .find(|r| r.policies == n && r.size == s && r.mode == m)
                                    .and_then(|r| r.overhead)
                                    .map(|o| {
                                        if metric == "mean" {
                                            o.mean_pct
                                        } else {
                                            o.p50_pct
                                        }
                                    })
                            })
                            .collect(),
                    })
                    .collect(),
                y_log: false,
                guides: vec![(0.0, String::new()), (2.0, "2%".into())],
            });
        }
    }
    svg::Figure {
        title: "HTTP latency over no enforcement, by number of policies".into(),
        subtitle: format!(
            "a new connection per request, {} requests per point and mode; {} CPUs, kernel {}; iptables: {}",
            out.requests,
            machine.cpus,
            machine.kernel,
            out.iptables_backend.as_str()
        ),
        columns: out.sizes.len().max(1),
        panels,
    }
}
