//! Datapath micro-benchmark: nanoseconds per packet through the real TC
//! program (`BPF_PROG_TEST_RUN`), for a new flow and an established flow,
//! IPv4 and IPv6, with 10 .. 10,000 policies selecting the endpoint. The
//! maps are filled by the same compiler the agent runs.
//!
//! - established: one packet of a known flow, run `--repeat` times in one
//!   `BPF_PROG_TEST_RUN` call (the kernel's own per-run average);
//! - new flow: `--flows` distinct flows (source ports), one run each, so that
//!   every run misses the flow table and takes the policy path. A single run
//!   carries the kernel's timing overhead, so the same single-run method is
//!   also reported for established packets (`established (1 run)`): the
//!   difference between the two is the policy decision and flow insertion;
//! - from_pod reply: the server's answer on that established flow, through
//!   `netpol_from_pod` (the program on the other hook), repeated.
//!
//! Then, unless `--no-kernel-stats`, the same measurements again (new flows
//! on fresh ports) with the kernel's statistics on (see
//! `netpol_benches::kstats`): the kernel times the program alone on every
//! run, and `run_time_ns / run_cnt` is printed next to `BPF_PROG_TEST_RUN`'s
//! figure for the same runs. The difference is the test harness (and, for
//! single runs, its timer); the statistics' own clock reads are in both, so
//! the first table is measured with them off.
//!
//! Needs root. Prints a table and, with `--json <file>`, writes the numbers.

#[path = "../../../netpol-agent/tests/common/packets.rs"]
mod packets;

use std::{collections::BTreeMap, time::Instant};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, lpm_trie::Key},
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
};
use clap::Parser;
use netpol_agent::{
    compiler::{Compiled, NodeInfo, compile},
    datapath::{EBPF_OBJECT, write_peer_v4, write_peer_v6, write_policy},
    model::{Cluster, build::*},
};
use netpol_benches::kstats::{self, Counters};
use netpol_common::{ConfigValue, EndpointValue, map_names};
use serde::Serialize;

#[derive(Parser)]
struct Args {
    /// Policy counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000,10000")]
    policies: Vec<usize>,
    /// Runs per established-flow measurement.
    #[arg(long, default_value_t = 1_000_000)]
    repeat: u32,
    /// Distinct new flows per new-flow measurement.
    #[arg(long, default_value_t = 20_000)]
    flows: u16,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Skip the second pass with `kernel.bpf_stats_enabled` on.
    #[arg(long)]
    no_kernel_stats: bool,
    /// Flow-table share of the endpoint, in entries per CPU (0: no shares,
    /// the default). To measure the new-flow path with shares on, give at
    /// least `--flows` so that every new flow is admitted.
    #[arg(long, default_value_t = 0)]
    slots_per_cpu: u32,
}

/// The endpoint under test is keyed by ifindex 1: `BPF_PROG_TEST_RUN` runs
/// packets on the loopback device when no context is given.
const IFINDEX: u32 = 1;
const SERVER_V4: &str = "10.1.0.2";
const SERVER_V6: &str = "fd00:1::2";
const CLIENT_V4: &str = "10.1.0.3";
const CLIENT_V6: &str = "fd00:1::3";

/// A cluster where `n` policies select the server, each allowing one TCP
/// port (1000 + i) from the clients labelled `tier: v<i>`; there is one
/// such client pod per policy (so every policy compiles to real entries,
/// with `n` identities). The client under test is allowed by the last
/// policy only; even policies select clients by pod label, odd ones by
/// namespace, so the compiler sees varied selectors.
fn bench_cluster(n: usize) -> Cluster {
    let mut c = cluster()
        .namespace(namespace("bench").label("team", "bench"))
        .pod(
            pod("bench", "server")
                .label("app", "server")
                .ip(SERVER_V4)
                .ip(SERVER_V6)
                .node("n1"),
        );
    for i in 0..n {
        let tier = format!("v{i}");
        let team = format!("team{i}");
        let (v4, v6) = client_ips(i, n);
        let ns = if i % 2 == 0 { "bench" } else { team.as_str() };
        if i % 2 == 1 {
            c = c.namespace(namespace(ns).label("team", &team));
        }
        c = c.pod(
            pod(ns, &format!("client{i}"))
                .label("tier", &tier)
                .ip(&v4)
                .ip(&v6)
                .node("n2"),
        );
        let peer = if i % 2 == 0 {
            pods(labels([("tier", tier.as_str())]))
        } else {
            namespaces(labels([("team", team.as_str())]))
        };
        c = c.policy(
            policy("bench", &format!("p{i}"))
                .select(labels([("app", "server")]))
                .ingress(allow().from(peer).port(tcp(1000 + i as u16))),
        );
    }
    c
}

/// Client `i`'s addresses; the last one is the client under test.
fn client_ips(i: usize, n: usize) -> (String, String) {
    if i + 1 == n {
        return (CLIENT_V4.to_string(), CLIENT_V6.to_string());
    }
    let i = i + 10;
    (
        format!("10.2.{}.{}", i / 250, i % 250 + 1),
        format!("fd00:2::{:x}", i + 1),
    )
}

fn load(compiled: &Compiled) -> Result<Ebpf> {
    load_for(
        compiled,
        &netpol_agent::model::PodRef::new("bench", "server"),
    )
}

/// The object with the compiled maps, `endpoint` as the pod on `IFINDEX`.
/// `--slots-per-cpu`, for every object the benchmark loads.
static SLOTS_PER_CPU: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn load_for(compiled: &Compiled, endpoint: &netpol_agent::model::PodRef) -> Result<Ebpf> {
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(map_names::FLOWS, 1 << 20)
        .load(EBPF_OBJECT)
        .context("loading the eBPF object (root needed)")?;
    for name in [
        netpol_common::prog_names::TO_POD,
        netpol_common::prog_names::FROM_POD,
        netpol_common::prog_names::POST_NAT,
    ] {
        let p: &mut SchedClassifier = ebpf.program_mut(name).expect("program").try_into()?;
        p.load()?;
    }
    let ep = compiled
        .maps
        .endpoints
        .get(endpoint)
        .with_context(|| format!("{endpoint} is not an endpoint"))?;
    {
        let mut m: HashMap<_, u32, EndpointValue> =
            HashMap::try_from(ebpf.map_mut(map_names::ENDPOINTS).expect("map"))?;
        m.insert(IFINDEX, *ep, 0)?;
    }
    // As the agent writes them: each trie entry with its exact copy or count.
    for ((addr, len), v) in &compiled.maps.peers_v4 {
        write_peer_v4(&mut ebpf, 0, *addr, *len, Some(*v))?;
    }
    for ((addr, len), v) in &compiled.maps.peers_v6 {
        write_peer_v6(&mut ebpf, 0, *addr, *len, Some(*v))?;
    }
    for ((k, len), v) in &compiled.maps.policy {
        write_policy(&mut ebpf, *k, *len, Some(*v))?;
    }
    {
        let mut m: Array<_, ConfigValue> =
            Array::try_from(ebpf.map_mut(map_names::CONFIG).expect("map"))?;
        // Events off: the benchmark measures the verdict, not the ring buffer.
        m.set(0, ConfigValue::default(), 0)?;
    }
    {
        let mut m: Array<_, netpol_common::QuotaConfig> =
            Array::try_from(ebpf.map_mut(map_names::QUOTA_CONFIG).expect("map"))?;
        m.set(
            0,
            netpol_common::QuotaConfig {
                slots_per_cpu: SLOTS_PER_CPU.load(std::sync::atomic::Ordering::Relaxed),
                _pad: 0,
            },
            0,
        )?;
    }
    Ok(ebpf)
}

fn run(prog: &SchedClassifier, frame: &[u8], repeat: u32) -> Result<(u32, f64)> {
    let r = prog.test_run(TestRunOptions {
        data_in: Some(frame),
        repeat,
        ..TestRunOptions::default()
    })?;
    // The kernel reports the average time of one run over `repeat` runs.
    Ok((r.return_value, r.duration.as_nanos() as f64))
}

#[derive(Serialize)]
struct Row {
    family: &'static str,
    policies: usize,
    policy_entries: usize,
    identities: usize,
    /// Allowed new flows, one run each (includes the single-run timing
    /// overhead, like `established_single_ns`).
    new_flow_ns: f64,
    established_single_ns: f64,
    /// A denied new flow, repeated (no flow is inserted, so every run takes
    /// the whole policy path).
    denied_new_flow_ns: f64,
    /// A known flow's packet, repeated.
    established_ns: f64,
    /// The server's reply on a known flow through `netpol_from_pod`, repeated.
    from_pod_reply_ns: f64,
    /// The second pass, with the kernel's statistics on.
    kernel: Option<KernelPass>,
}

/// One kind of packet measured with the kernel's statistics on.
#[derive(Serialize, Clone, Copy)]
struct Kernel {
    /// The program's `run_time_ns / run_cnt` over these runs.
    kernel_ns: f64,
    /// `BPF_PROG_TEST_RUN`'s average over the same runs.
    test_run_ns: f64,
    runs: u64,
}

#[derive(Serialize)]
struct KernelPass {
    /// `netpol_to_pod`, allowed new flows (fresh ports), one run each.
    to_pod_new_flow: Kernel,
    /// `netpol_to_pod`, the same packets again (now established), one run
    /// each: a different flow entry every run, as on the real path.
    to_pod_established_single: Kernel,
    /// `netpol_to_pod`, a known flow's packet, repeated.
    to_pod_established: Kernel,
    /// `netpol_to_pod`, a denied new flow, repeated.
    to_pod_denied: Kernel,
    /// `netpol_from_pod`, the server's reply on a known flow, repeated.
    from_pod_reply: Kernel,
}

/// Runs `f` (which returns the sum of the test-run durations and the number
/// of runs) and reads what the kernel counted for `prog` meanwhile.
fn with_kernel_stats(
    prog: &SchedClassifier,
    f: impl FnOnce() -> Result<(f64, u64)>,
) -> Result<Kernel> {
    let before = Counters::of(&prog.info()?);
    let (total_ns, runs) = f()?;
    let d = Counters::of(&prog.info()?).since(before);
    Ok(Kernel {
        kernel_ns: d.ns_per_run(),
        test_run_ns: total_ns / runs.max(1) as f64,
        runs: d.run_cnt,
    })
}

fn measure(args: &Args, n: usize, v6: bool) -> Result<Row> {
    let c = bench_cluster(n);
    let compiled = compile(&c, &NodeInfo::new("n1", []));
    let ebpf = load(&compiled)?;
    let prog: &SchedClassifier = ebpf
        .program(netpol_common::prog_names::TO_POD)
        .expect("program")
        .try_into()?;
    let from_pod: &SchedClassifier = ebpf
        .program(netpol_common::prog_names::FROM_POD)
        .expect("program")
        .try_into()?;
    let port = 1000 + n as u16 - 1;
    let (client, server) = if v6 {
        (format!("[{CLIENT_V6}]"), format!("[{SERVER_V6}]"))
    } else {
        (CLIENT_V4.to_string(), SERVER_V4.to_string())
    };
    let packet =
        |sport: u16| packets::tcp(&format!("{client}:{sport}"), &format!("{server}:{port}"));
    let frame = |sport: u16| packet(sport).syn().frame();
    // Sanity: the packet is allowed (and only by the last policy).
    let (rc, _) = run(prog, &frame(1), 1)?;
    if rc != 0 {
        bail!("the benchmark packet was dropped ({n} policies): the cluster is wrong");
    }
    let denied = packets::tcp(
        &format!("{client}:1"),
        &format!("{server}:{}", 1000 + n as u16),
    )
    .syn()
    .frame();
    if run(prog, &denied, 1)?.0 == 0 {
        bail!("a port no policy allows passed ({n} policies)");
    }

    // New flows: distinct source ports, one run each.
    let frames: Vec<Vec<u8>> = (0..args.flows).map(|i| frame(10_000 + i)).collect();
    let mut new_total = 0.0;
    for f in &frames {
        new_total += run(prog, f, 1)?.1;
    }
    // The same packets again: now established, one run each.
    let mut est_single = 0.0;
    for f in &frames {
        est_single += run(prog, f, 1)?.1;
    }
    let (_, est) = run(prog, &frames[0], args.repeat)?;
    let (_, denied_ns) = run(prog, &denied, args.repeat)?;
    // The first flow's handshake, so that its reply is established traffic
    // in from_pod: SYN (above), SYN-ACK out of the server, ACK in.
    let first = packet(10_000);
    for (p, pkt) in [
        (from_pod, first.reversed().syn_ack()),
        (prog, first.clone().ack()),
    ] {
        if run(p, &pkt.frame(), 1)?.0 != 0 {
            bail!("the handshake of the benchmark flow was dropped ({n} policies)");
        }
    }
    let reply = first.reversed().ack().payload(&[0u8; 64]).frame();
    let (rc, _) = run(from_pod, &reply, 1)?;
    if rc != 0 {
        bail!("the server's reply on an established flow was dropped ({n} policies)");
    }
    let (_, reply_ns) = run(from_pod, &reply, args.repeat)?;

    let kernel = if args.no_kernel_stats {
        None
    } else {
        // Counting on only for this pass (the guard turns it off).
        let _on = kstats::enable()?;
        // Fresh ports: every run misses the flow table again.
        let fresh: Vec<Vec<u8>> = (0..args.flows)
            .map(|i| frame(10_000u16.wrapping_add(args.flows).wrapping_add(i)))
            .collect();
        let repeated = |p: &SchedClassifier, f: &[u8]| -> Result<(f64, u64)> {
            let (_, ns) = run(p, f, args.repeat)?;
            Ok((ns * f64::from(args.repeat), u64::from(args.repeat)))
        };
        Some(KernelPass {
            to_pod_new_flow: with_kernel_stats(prog, || {
                let mut total = 0.0;
                for f in &fresh {
                    total += run(prog, f, 1)?.1;
                }
                Ok((total, fresh.len() as u64))
            })?,
            to_pod_established_single: with_kernel_stats(prog, || {
                let mut total = 0.0;
                for f in &fresh {
                    total += run(prog, f, 1)?.1;
                }
                Ok((total, fresh.len() as u64))
            })?,
            to_pod_established: with_kernel_stats(prog, || repeated(prog, &frames[0]))?,
            to_pod_denied: with_kernel_stats(prog, || repeated(prog, &denied))?,
            from_pod_reply: with_kernel_stats(from_pod, || repeated(from_pod, &reply))?,
        })
    };
    Ok(Row {
        family: if v6 { "IPv6" } else { "IPv4" },
        policies: n,
        policy_entries: compiled.maps.policy.len(),
        identities: compiled.identities.len(),
        new_flow_ns: new_total / frames.len() as f64,
        established_single_ns: est_single / frames.len() as f64,
        denied_new_flow_ns: denied_ns,
        established_ns: est,
        from_pod_reply_ns: reply_ns,
        kernel,
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    SLOTS_PER_CPU.store(args.slots_per_cpu, std::sync::atomic::Ordering::Relaxed);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the datapath benchmark runs eBPF programs: run it as root");
    }
    println!(
        "datapath: ns per packet through netpol_to_pod (BPF_PROG_TEST_RUN), {} CPUs, kernel {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel()
    );
    println!(
        "{:<5} {:>9} {:>8} {:>10} | {:>13} {:>17} | {:>15} {:>12} {:>14}",
        "fam",
        "policies",
        "entries",
        "identities",
        "new flow ns",
        "estab. ns",
        "denied new ns",
        "estab. ns",
        "from_pod reply"
    );
    println!(
        "{:<36} | {:^31} | {:^43}",
        "", "single runs (timer overhead in)", "repeated runs (kernel avg)"
    );
    let started = Instant::now();
    // The floor: an ARP frame passes after the ethertype and one counter.
    let floor_ebpf = load(&compile(&bench_cluster(1), &NodeInfo::new("n1", [])))?;
    let floor_prog: &SchedClassifier = floor_ebpf
        .program(netpol_common::prog_names::TO_POD)
        .expect("program")
        .try_into()?;
    let arp = packets::arp_request("10.1.0.3", "10.1.0.2");
    let floor = {
        let prog = floor_prog;
        let (_, floor) = run(prog, &arp, args.repeat)?;
        println!("floor (ARP frame: ethertype check and one counter, repeated): {floor:.1} ns");
        if !args.no_kernel_stats {
            let _on = kstats::enable()?;
            let k = with_kernel_stats(prog, || {
                let (_, ns) = run(prog, &arp, args.repeat)?;
                Ok((ns * f64::from(args.repeat), u64::from(args.repeat)))
            })?;
            println!(
                "floor with kernel statistics on: run_time_ns/run_cnt {:.1} ns, BPF_PROG_TEST_RUN {:.1} ns over the same {} runs",
                k.kernel_ns, k.test_run_ns, k.runs
            );
        }
        floor
    };
    let mut rows = Vec::new();
    for &n in &args.policies {
        for v6 in [false, true] {
            let r = measure(&args, n, v6)?;
            println!(
                "{:<5} {:>9} {:>8} {:>10} | {:>13.1} {:>17.1} | {:>15.1} {:>12.1} {:>14.1}",
                r.family,
                r.policies,
                r.policy_entries,
                r.identities,
                r.new_flow_ns,
                r.established_single_ns,
                r.denied_new_flow_ns,
                r.established_ns,
                r.from_pod_reply_ns
            );
            rows.push(r);
        }
    }
    // The floor again after the rows: on a shared machine one measurement
    // can catch a busy moment, and a high floor flatters the ratios. The
    // ratios use the lower of the two.
    let (_, floor_after) = run(floor_prog, &arp, args.repeat)?;
    println!(
        "floor again after the rows: {floor_after:.1} ns (the ratios below use {:.1} ns, the lower)",
        floor.min(floor_after)
    );
    let floor = floor.min(floor_after);
    let mut summary = BTreeMap::new();
    for fam in ["IPv4", "IPv6"] {
        let of = |n: usize| rows.iter().find(|r| r.family == fam && r.policies == n);
        if let (Some(lo), Some(hi)) = (
            of(*args.policies.iter().min().unwrap_or(&0)),
            of(*args.policies.iter().max().unwrap_or(&0)),
        ) {
            let ratio = hi.new_flow_ns / lo.new_flow_ns;
            println!(
                "{fam}: new flow at {} policies costs {:.1}% of the cost at {} (denied new flow: {:.1}%; bar: within 110%)",
                hi.policies,
                ratio * 100.0,
                lo.policies,
                hi.denied_new_flow_ns / lo.denied_new_flow_ns * 100.0,
            );
            // Issue 15's bar is a ratio to the floor of the same run.
            let fam_rows = rows.iter().filter(|r| r.family == fam);
            let worst = |f: fn(&Row) -> f64| fam_rows.clone().map(f).fold(0.0, f64::max);
            let (est, reply) = (worst(|r| r.established_ns), worst(|r| r.from_pod_reply_ns));
            println!(
                "{fam}: established packet at most {est:.1} ns = {:.2}x the floor, from_pod reply at most {reply:.1} ns = {:.2}x (bar: at most 2x the floor of the same run)",
                est / floor,
                reply / floor,
            );
            summary.insert(fam, ratio);
        }
    }
    print_kernel_table(&rows);
    service_path(&args)?;
    println!("({:.1} s)", started.elapsed().as_secs_f64());
    if let Some(path) = &args.json {
        // An array of rows, as before (the floor's kernel figure is printed).
        std::fs::write(path, serde_json::to_string_pretty(&rows)?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// The second pass: the kernel's per-run time next to BPF_PROG_TEST_RUN's
/// over the same runs.
fn print_kernel_table(rows: &[Row]) {
    if rows.iter().all(|r| r.kernel.is_none()) {
        return;
    }
    println!(
        "\nkernel statistics on (bpf_stats_enabled), ns per run: run_time_ns/run_cnt / BPF_PROG_TEST_RUN's average, over the same runs"
    );
    println!(
        "{:<5} {:>9} | {:>17} | {:>17} | {:>17} | {:>17} | {:>17}",
        "fam",
        "policies",
        "to_pod new flow",
        "estab., 1 run",
        "estab., repeated",
        "to_pod denied new",
        "from_pod reply"
    );
    for r in rows {
        let Some(k) = &r.kernel else { continue };
        let cell = |k: &Kernel| format!("{:>7.1} / {:>7.1}", k.kernel_ns, k.test_run_ns);
        println!(
            "{:<5} {:>9} | {:>17} | {:>17} | {:>17} | {:>17} | {:>17}",
            r.family,
            r.policies,
            cell(&k.to_pod_new_flow),
            cell(&k.to_pod_established_single),
            cell(&k.to_pod_established),
            cell(&k.to_pod_denied),
            cell(&k.from_pod_reply)
        );
    }
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// What the post-DNAT egress verdict (a pod dialling a Service) costs, IPv4:
/// a local client pod (ifindex 1) whose egress allows TCP 8080 to the pods
/// labelled `app: backend`, one of which runs on another node, and a Service
/// range kube-proxy translates.
fn service_path(args: &Args) -> Result<()> {
    const CLIENT: &str = "10.1.0.2";
    const BACKEND: &str = "10.1.1.5";
    const CLUSTER_IP: &str = "10.96.0.10";
    let c = cluster()
        .namespace(namespace("bench"))
        .pod(
            pod("bench", "client")
                .label("app", "client")
                .ip(CLIENT)
                .node("n1"),
        )
        .pod(
            pod("bench", "backend")
                .label("app", "backend")
                .ip(BACKEND)
                .node("n2"),
        )
        .policy(
            policy("bench", "client-egress")
                .select(labels([("app", "client")]))
                .egress(
                    allow()
                        .to(pods(labels([("app", "backend")])))
                        .port(tcp(8080)),
                ),
        );
    let compiled = compile(&c, &NodeInfo::new("n1", []));
    let client = netpol_agent::model::PodRef::new("bench", "client");
    let mut ebpf = load_for(&compiled, &client)?;
    {
        let mut m: HashMap<_, netpol_common::LocalKey, u32> =
            HashMap::try_from(ebpf.map_mut(map_names::LOCAL_ADDRS).expect("map"))?;
        let (family, addr) = netpol_common::ip_bytes(CLIENT.parse()?);
        m.insert(netpol_common::LocalKey::new(family, addr), IFINDEX, 0)?;
        let mut d: LpmTrie<_, [u8; 4], u32> =
            LpmTrie::try_from(ebpf.map_mut(map_names::DEFER_V4).expect("map"))?;
        d.insert(&Key::new(12, [10, 96, 0, 0]), 0, 0)?;
    }
    let prog = |name: &str| -> Result<&SchedClassifier> {
        Ok(ebpf.program(name).expect("program").try_into()?)
    };
    let from_pod = prog(netpol_common::prog_names::FROM_POD)?;
    let post_nat = prog(netpol_common::prog_names::POST_NAT)?;
    let syn = |sport: u16, dst: &str| {
        packets::tcp(&format!("{CLIENT}:{sport}"), dst)
            .syn()
            .frame()
    };
    // Sanity: the ClusterIP is deferred, the backend allowed after the DNAT,
    // another port denied.
    if run(from_pod, &syn(1, &format!("{CLUSTER_IP}:80")), 1)?.0 != 0
        || run(post_nat, &syn(1, &format!("{BACKEND}:8080")), 1)?.0 != 0
        || run(post_nat, &syn(2, &format!("{BACKEND}:9090")), 1)?.0 == 0
    {
        bail!("service path: unexpected verdicts, the benchmark setup is wrong");
    }
    let flows = args.flows.min(10_000);
    let single = |prog: &SchedClassifier, dst: &str, base: u16| -> Result<f64> {
        let mut total = 0.0;
        for i in 0..flows {
            total += run(prog, &syn(base + i, dst), 1)?.1;
        }
        Ok(total / f64::from(flows))
    };
    // New flows, one run each: to the pod address (judged on the veth), to
    // the ClusterIP (deferred on the veth), then after the DNAT.
    let direct = single(from_pod, &format!("{BACKEND}:8080"), 10_000)?;
    let deferred = single(from_pod, &format!("{CLUSTER_IP}:80"), 30_000)?;
    let decided = single(post_nat, &format!("{BACKEND}:8080"), 30_000)?;
    // Repeated: a known flow's packet on the node's device, and the node's
    // own traffic there.
    let est = packets::tcp(&format!("{CLIENT}:30000"), &format!("{BACKEND}:8080")).frame();
    let (_, est_ns) = run(post_nat, &est, args.repeat)?;
    let node = packets::tcp("192.0.2.1:22", "192.0.2.2:40000").frame();
    let (_, node_ns) = run(post_nat, &node, args.repeat)?;
    println!("service path, IPv4 (egress through a ClusterIP, judged after the DNAT):");
    println!(
        "  new flow on the veth, ns (single runs): to the pod address {direct:.1}, to the ClusterIP (deferred) {deferred:.1}"
    );
    println!(
        "  new flow after the DNAT (netpol_post_nat, single runs): {decided:.1} ns; so a Service flow's verdict costs {:.1} ns in all vs {direct:.1} ns direct",
        deferred + decided
    );
    println!(
        "  per packet on the node's device (netpol_post_nat, repeated): a pod's known flow {est_ns:.1} ns, the node's own traffic {node_ns:.1} ns"
    );
    Ok(())
}
