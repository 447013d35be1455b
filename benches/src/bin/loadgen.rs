//! Latency percentiles at a constant request rate (the method of seed 002,
//! which used tcpkali against nginx): an open-loop load generator of ours
//! sends HTTP requests at a fixed rate to nginx serving a 350 B and a 4 KB
//! file, at several rates up to the machine's knee, and reports the
//! percentiles 50 .. 99.99 for each path:
//!
//! - `host`: the client in the client node's netns (like `--net=host`) to
//!   the server pod, no enforcement anywhere: the best case;
//! - `none`: pod to pod without enforcement;
//! - `netpol` / `netpol-nolog`: pod to pod with netpol-agent (flow log on /
//!   off) and `--policies` policies selecting the server, the client allowed
//!   by the last one;
//! - `iptables`: pod to pod with the iptables chain (conntrack, a rule and
//!   an ipset per policy).
//!
//! Open loop: request `i` is due at `start + i / rate`, whatever happened to
//! the others, and its latency runs from that due time to the last byte of
//! the answer, so a stall is charged to every request it delays (no
//! coordinated omission). The schedule is spread over `--threads` client
//! threads (request `i` goes to thread `i mod threads`), each sleeping until
//! its next due time with `clock_nanosleep(TIMER_ABSTIME)`. Latencies go
//! into HdrHistograms (3 significant digits). By default every request is a
//! new TCP connection (`Connection: close`), so every request is a new flow
//! that the policy decides; `--keepalive` keeps one connection per thread.
//!
//! The paths take turns in slices of `--slice-secs` (1 s) until each has
//! had `--step-secs`, so that the machine's stalls hit them alike.
//!
//! The knee is found first with a quick ramp (pod to pod, no enforcement,
//! doubling the rate each second until the achieved rate falls short or the
//! p99 explodes); the measured rates are fractions of it. Every step is
//! bounded: a step of `--step-secs` ends at most 3 s late, and requests it
//! never got to send are counted (and charged) as unsent.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow};
use clap::Parser;
use hdrhistogram::Histogram;
use netpol_benches::{
    Binaries,
    benchlab::{BenchLab, Mode},
    clock, http,
    iptables::Backend,
    machine::Machine,
    nginx, require_root, size_label, svg, write_json,
};
use netpol_lab::netns::{enter_netns, open_netns};
use serde::Serialize;

/// Where the client runs and what enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
enum PathKind {
    Host,
    None,
    Netpol,
    NetpolNolog,
    Iptables,
}

impl PathKind {
    fn mode(self) -> Mode {
        match self {
            PathKind::Host | PathKind::None => Mode::None,
            PathKind::Netpol => Mode::Netpol,
            PathKind::NetpolNolog => Mode::NetpolNolog,
            PathKind::Iptables => Mode::Iptables,
        }
    }

    fn label(self) -> &'static str {
        match self {
            PathKind::Host => "host-to-pod",
            PathKind::None => "pod-to-pod",
            PathKind::Netpol => "netpol",
            PathKind::NetpolNolog => "netpol-nolog",
            PathKind::Iptables => "iptables",
        }
    }
}

#[derive(Parser)]
struct Args {
    /// A reduced run (two rates, short steps).
    #[arg(long)]
    quick: bool,
    /// Response body sizes in bytes.
    #[arg(long, value_delimiter = ',', default_value = "350,4096")]
    sizes: Vec<usize>,
    /// Rates as fractions of the knee [default: 0.25,0.5,0.75,1; quick: 0.25,0.5].
    #[arg(long, value_delimiter = ',')]
    fractions: Option<Vec<f64>>,
    /// Rates in requests/s (skips the knee search).
    #[arg(long, value_delimiter = ',')]
    rates: Option<Vec<f64>>,
    /// Seconds per measured step [default: 5; quick: 2].
    #[arg(long)]
    step_secs: Option<f64>,
    /// The paths take turns in slices of this many seconds (so that a stall
    /// of the machine hits them alike).
    #[arg(long, default_value_t = 1.0)]
    slice_secs: f64,
    /// Seconds per step of the knee search.
    #[arg(long, default_value_t = 1.0)]
    ramp_step_secs: f64,
    /// Client threads sharing the schedule.
    #[arg(long, default_value_t = 32)]
    threads: usize,
    /// One kept-alive connection per thread instead of one per request.
    #[arg(long)]
    keepalive: bool,
    /// Policies selecting the server in the enforcing paths.
    #[arg(long, default_value_t = 100)]
    policies: usize,
    /// The rate (fraction of the knee) the percentile plot shows.
    #[arg(long, default_value_t = 0.5)]
    plot_fraction: f64,
    /// Paths to measure.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "host,none,netpol,netpol-nolog,iptables"
    )]
    paths: Vec<PathKind>,
    /// iptables backend of the iptables path.
    #[arg(long, value_enum, default_value = "nft")]
    iptables_backend: Backend,
    /// nginx worker processes.
    #[arg(long, default_value_t = 1)]
    nginx_workers: usize,
    #[command(flatten)]
    bins: Binaries,
    /// Lab name.
    #[arg(long, default_value = "npb-loadgen")]
    lab: String,
    /// Write the numbers as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the percentile plot (SVG) here.
    #[arg(long)]
    svg: Option<PathBuf>,
}

const PERCENTILES: [(f64, &str); 5] = [
    (50.0, "p50"),
    (90.0, "p90"),
    (99.0, "p99"),
    (99.9, "p99.9"),
    (99.99, "p99.99"),
];

/// One step: a path, a size and a rate.
#[derive(Debug, Clone, Serialize)]
struct Step {
    path: PathKind,
    size: usize,
    rate: f64,
    /// Completed requests per second over the step.
    achieved: f64,
    scheduled: u64,
    ok: u64,
    errors: u64,
    /// Due but never sent before the step's hard end (overload).
    unsent: u64,
    mean_us: f64,
    /// p50, p90, p99, p99.9, p99.99 in microseconds.
    percentiles_us: BTreeMap<String, f64>,
    max_us: f64,
}

impl Step {
    fn p(&self, name: &str) -> f64 {
        self.percentiles_us.get(name).copied().unwrap_or(f64::NAN)
    }
}

/// What a client runs against.
#[derive(Clone)]
struct Target {
    kind: PathKind,
    netns: PathBuf,
    addr: SocketAddr,
}

struct Lane {
    hist: Histogram<u64>,
    ok: u64,
    errors: u64,
    unsent: u64,
    last_done: u64,
}

/// One open-loop step (see the module docs).
fn run_step(
    t: &Target,
    size: usize,
    rate: f64,
    secs: f64,
    threads: usize,
    keepalive: bool,
) -> Result<Raw> {
    let scheduled = (rate * secs).round().max(1.0) as u64;
    let period = 1e9 / rate;
    let path = Arc::new(nginx::file_path(size));
    let start = clock::now_ns() + 50_000_000;
    let hard_end = start + (secs * 1e9) as u64 + 3_000_000_000;
    let timeout = Duration::from_secs(1);
    let lanes: Vec<Lane> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|k| {
                let (netns, addr, path) = (t.netns.clone(), t.addr, path.clone());
                s.spawn(move || -> Result<Lane> {
                    let fd = open_netns(&netns)?;
                    enter_netns(&fd)?;
                    clock::precise_timer_slack();
                    let mut lane = Lane {
                        hist: Histogram::new_with_bounds(1_000, 600_000_000_000, 3)?,
                        ok: 0,
                        errors: 0,
                        unsent: 0,
                        last_done: start,
                    };
                    let mut ka = http::KeepAlive::new(addr, timeout);
                    let mut buf = Vec::with_capacity(64 * 1024);
                    let mut i = k as u64;
                    while i < scheduled {
                        let due = start + (i as f64 * period) as u64;
                        if clock::now_ns() >= hard_end {
                            // Charged as lasting at least until now.
                            lane.hist
                                .saturating_record(hard_end.saturating_sub(due).max(1));
                            lane.unsent += 1;
                            i += threads as u64;
                            continue;
                        }
                        clock::sleep_until_ns(due);
                        let r = if keepalive {
                            ka.get(&path)
                        } else {
                            http::get_close(addr, &path, timeout, &mut buf)
                        };
                        match r {
                            Ok(r) => {
                                lane.hist.saturating_record((r.last_byte_ns - due).max(1));
                                lane.ok += 1;
                                lane.last_done = lane.last_done.max(r.last_byte_ns);
                            }
                            Err(_) => lane.errors += 1,
                        }
                        i += threads as u64;
                    }
                    Ok(lane)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("a client thread panicked"))?)
            .collect::<Result<Vec<Lane>>>()
    })?;
    let mut raw = Raw::new()?;
    let mut last = start;
    for l in &lanes {
        raw.hist.add(&l.hist).context("merging histograms")?;
        raw.ok += l.ok;
        raw.errors += l.errors;
        raw.unsent += l.unsent;
        last = last.max(l.last_done);
    }
    raw.scheduled = scheduled;
    raw.secs = ((last - start) as f64 / 1e9).max(secs);
    Ok(raw)
}

/// What one or more slices of a step measured.
struct Raw {
    hist: Histogram<u64>,
    scheduled: u64,
    ok: u64,
    errors: u64,
    unsent: u64,
    /// From the first due time to the last answer, summed over slices.
    secs: f64,
}

impl Raw {
    fn new() -> Result<Raw> {
        Ok(Raw {
            hist: Histogram::new_with_bounds(1_000, 600_000_000_000, 3)?,
            scheduled: 0,
            ok: 0,
            errors: 0,
            unsent: 0,
            secs: 0.0,
        })
    }

    fn add(&mut self, other: &Raw) -> Result<()> {
        self.hist.add(&other.hist).context("merging histograms")?;
        self.scheduled += other.scheduled;
        self.ok += other.ok;
        self.errors += other.errors;
        self.unsent += other.unsent;
        self.secs += other.secs;
        Ok(())
    }

    fn step(&self, path: PathKind, size: usize, rate: f64) -> Step {
        let us = |ns: u64| ns as f64 / 1000.0;
        Step {
            path,
            size,
            rate,
            achieved: self.ok as f64 / self.secs.max(1e-9),
            scheduled: self.scheduled,
            ok: self.ok,
            errors: self.errors,
            unsent: self.unsent,
            mean_us: self.hist.mean() / 1000.0,
            percentiles_us: PERCENTILES
                .iter()
                .map(|(q, name)| (name.to_string(), us(self.hist.value_at_percentile(*q))))
                .collect(),
            max_us: us(self.hist.max()),
        }
    }
}

fn print_header() {
    println!(
        "    {:<13} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "path", "achieved", "mean", "p50", "p90", "p99", "p99.9", "p99.99", "max", "failed"
    );
}

fn print_step(s: &Step) {
    println!(
        "    {:<13} {:>7.0}/s {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>7}",
        s.path.label(),
        s.achieved,
        s.mean_us,
        s.p("p50"),
        s.p("p90"),
        s.p("p99"),
        s.p("p99.9"),
        s.p("p99.99"),
        s.max_us,
        s.errors + s.unsent
    );
}

#[derive(Serialize)]
struct Output {
    benchmark: &'static str,
    machine: Machine,
    method: String,
    policies: usize,
    iptables_backend: Backend,
    keepalive: bool,
    threads: usize,
    step_secs: f64,
    knee: Option<f64>,
    ramp: Vec<Step>,
    rates: Vec<f64>,
    plot_rate: f64,
    steps: Vec<Step>,
    secs: f64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    require_root("loadgen")?;
    let sizes = args.sizes.clone();
    let fractions = args.fractions.clone().unwrap_or_else(|| {
        if args.quick {
            vec![0.25, 0.5]
        } else {
            vec![0.25, 0.5, 0.75, 1.0]
        }
    });
    let step_secs = args.step_secs.unwrap_or(if args.quick { 2.0 } else { 5.0 });
    let mut paths = args.paths.clone();
    paths.sort();
    paths.dedup();
    let mut modes: Vec<Mode> = paths.iter().map(|p| p.mode()).collect();
    modes.push(Mode::None);
    modes.sort();
    modes.dedup();
    let (agent, lab_bin) = args.bins.resolve()?;
    let machine = Machine::describe();
    let method = format!(
        "open loop: requests due at a constant rate over {} client threads, latency from the due time to the last byte (HdrHistogram); {}; \
         nginx ({} worker) in a pod on a routed node, clients on a bridged node; {} policies in the enforcing paths, the client allowed by the last",
        args.threads,
        if args.keepalive {
            "one kept-alive connection per thread"
        } else {
            "a new TCP connection per request (Connection: close)"
        },
        args.nginx_workers,
        args.policies
    );
    println!("loadgen: {machine}");
    println!("  {method}");
    let started = Instant::now();
    let mut lab = BenchLab::up(&args.lab, &modes, &lab_bin, args.iptables_backend)?;
    let mut all_sizes = sizes.clone();
    all_sizes.push(350);
    all_sizes.sort();
    all_sizes.dedup();
    lab.start_nginx(&all_sizes, args.nginx_workers)?;
    if modes.iter().any(|m| m.is_netpol()) {
        lab.start_agents(&agent, &args.bins.agent_args, Duration::from_secs(300))?;
    }
    let times = lab.set_policies(args.policies, Duration::from_secs(300))?;
    lab.check_enforcement()?;
    println!(
        "  {} policies: agents synced in {}, iptables loaded in {}",
        args.policies,
        times
            .netpol_secs
            .map_or("-".into(), |s| format!("{s:.2} s")),
        times
            .iptables_secs
            .map_or("-".into(), |s| format!("{s:.2} s"))
    );
    let targets: Vec<Target> = paths
        .iter()
        .map(|&kind| {
            let pair = lab.pair(kind.mode());
            Target {
                kind,
                netns: if kind == PathKind::Host {
                    pair.client_node.netns_path()
                } else {
                    pair.client.netns_path()
                },
                addr: pair.http_addr(),
            }
        })
        .collect();

    // The knee: pod to pod, no enforcement, 350 B.
    let mut ramp = Vec::new();
    let (rates, knee) = match &args.rates {
        Some(r) => (r.clone(), None),
        None => {
            let probe = Target {
                kind: PathKind::None,
                netns: lab.pair(Mode::None).client.netns_path(),
                addr: lab.pair(Mode::None).http_addr(),
            };
            println!(
                "== Knee search: pod-to-pod, no enforcement, {}, {} s per step",
                size_label(sizes[0]),
                args.ramp_step_secs
            );
            print_header();
            let mut knee = 0.0;
            let mut base_p99 = f64::NAN;
            let good = |s: &Step, base_p99: f64| {
                let failed = (s.errors + s.unsent) as f64 / s.scheduled as f64;
                failed <= 0.005
                    && s.achieved >= 0.95 * s.rate
                    && (base_p99.is_nan() || s.p("p99") <= (20.0 * base_p99).max(5_000.0))
            };
            let mut rate = 500.0;
            while rate <= 64_000.0 {
                let s = run_step(
                    &probe,
                    sizes[0],
                    rate,
                    args.ramp_step_secs,
                    args.threads,
                    args.keepalive,
                )?
                .step(PathKind::None, sizes[0], rate);
                print_step(&s);
                let ok = good(&s, base_p99);
                if base_p99.is_nan() {
                    base_p99 = s.p("p99");
                }
                ramp.push(s);
                if !ok {
                    break;
                }
                knee = rate;
                rate *= 2.0;
            }
            if knee > 0.0 && knee < 64_000.0 {
                let s = run_step(
                    &probe,
                    sizes[0],
                    knee * 1.5,
                    args.ramp_step_secs,
                    args.threads,
                    args.keepalive,
                )?
                .step(PathKind::None, sizes[0], knee * 1.5);
                print_step(&s);
                if good(&s, base_p99) {
                    knee *= 1.5;
                }
                ramp.push(s);
            }
            if knee == 0.0 {
                knee = 250.0;
            }
            println!("  knee: about {knee:.0} requests/s");
            let rates: Vec<f64> = fractions
                .iter()
                .map(|f| ((f * knee) / 50.0).round().max(1.0) * 50.0)
                .collect();
            (rates, Some(knee))
        }
    };
    let plot_rate = knee.map_or(rates[rates.len() / 2], |k| {
        let want = args.plot_fraction * k;
        *rates
            .iter()
            .min_by(|a, b| (*a - want).abs().total_cmp(&(*b - want).abs()))
            .expect("rates")
    });

    let mut steps = Vec::new();
    let total = sizes.len() * rates.len();
    let mut k = 0;
    for &size in &sizes {
        for (ri, &rate) in rates.iter().enumerate() {
            k += 1;
            let slices = (step_secs / args.slice_secs).ceil().max(1.0) as usize;
            let slice = step_secs / slices as f64;
            println!(
                "[{k}/{total}] {} at {rate:.0} requests/s{}, {} paths x {step_secs} s, interleaved in slices of {slice:.1} s",
                size_label(size),
                knee.map_or(String::new(), |kn| format!(
                    " ({:.0}% of the knee)",
                    rate / kn * 100.0
                )),
                targets.len()
            );
            let mut raws: Vec<Raw> = targets.iter().map(|_| Raw::new()).collect::<Result<_>>()?;
            for r in 0..slices {
                for j in 0..targets.len() {
                    // Rotate the order: each path goes first equally often.
                    let i = (ri + r + j) % targets.len();
                    let raw =
                        run_step(&targets[i], size, rate, slice, args.threads, args.keepalive)?;
                    raws[i].add(&raw)?;
                }
            }
            print_header();
            for (t, raw) in targets.iter().zip(&raws) {
                let s = raw.step(t.kind, size, rate);
                print_step(&s);
                steps.push(s);
            }
        }
    }
    drop(lab);
    let secs = started.elapsed().as_secs_f64();

    println!("\n== Percentiles (us) per path; in brackets: relative to host-to-pod");
    for &size in &sizes {
        for &rate in &rates {
            println!("{} at {rate:.0} requests/s", size_label(size));
            println!(
                "    {:<13} {:>17} {:>17} {:>17} {:>17} {:>17}",
                "path", "p50", "p90", "p99", "p99.9", "p99.99"
            );
            let host = steps
                .iter()
                .find(|s| s.size == size && s.rate == rate && s.path == PathKind::Host);
            for &p in &paths {
                let Some(s) = steps
                    .iter()
                    .find(|s| s.size == size && s.rate == rate && s.path == p)
                else {
                    continue;
                };
                print!("    {:<13}", p.label());
                for (_, name) in PERCENTILES {
                    let rel =
                        host.map_or(String::new(), |h| format!("[{:.2}]", s.p(name) / h.p(name)));
                    print!(" {:>17}", format!("{:.1} {rel}", s.p(name)));
                }
                println!();
            }
        }
    }
    println!("({secs:.0} s)");

    let out = Output {
        benchmark: "loadgen",
        machine: machine.clone(),
        method,
        policies: args.policies,
        iptables_backend: args.iptables_backend,
        keepalive: args.keepalive,
        threads: args.threads,
        step_secs,
        knee,
        ramp,
        rates,
        plot_rate,
        steps,
        secs,
    };
    if let Some(path) = &args.json {
        write_json(path, &out)?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &args.svg {
        plot(&out, &sizes, &paths).write(path)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn plot(out: &Output, sizes: &[usize], paths: &[PathKind]) -> svg::Figure {
    let panels: Vec<svg::Panel> = sizes
        .iter()
        .map(|&size| svg::Panel {
            title: format!("{} at {:.0} requests/s", size_label(size), out.plot_rate),
            x_label: "percentile".into(),
            y_label: "latency (us, log scale)".into(),
            x_ticks: PERCENTILES.iter().map(|(_, n)| n.to_string()).collect(),
            series: paths
                .iter()
                .map(|&p| svg::Series {
                    name: p.label().to_string(),
                    values: PERCENTILES
                        .iter()
                        .map(|(_, name)| {
                            out.steps
                                .iter()
                                .find(|s| s.size == size && s.rate == out.plot_rate && s.path == p)
                                .map(|s| s.p(name))
                        })
                        .collect(),
                })
                .collect(),
            y_log: true,
            guides: Vec::new(),
        })
        .collect();
    svg::Figure {
        title: "HTTP latency by percentile at a constant request rate".into(),
        subtitle: format!(
            "open loop, {}; {} policies; knee {}; {} CPUs, kernel {}",
            if out.keepalive {
                "kept-alive connections"
            } else {
                "a new connection per request"
            },
            out.policies,
            out.knee
                .map_or("not searched".into(), |k| format!("~{k:.0} req/s")),
            out.machine.cpus,
            out.machine.kernel
        ),
        columns: panels.len().min(2),
        panels,
    }
}
