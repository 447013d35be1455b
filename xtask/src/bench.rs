//! `cargo xtask bench [--quick] [--only latency,loadgen,...]`: build the
//! agent, the lab and the benchmark binaries in release, run the benchmarks
//! one after the other (each prints its tables as it goes), and collect
//! their numbers into `<target dir>/bench/results.json` next to the plots
//! (`latency_vs_policies.svg`, `percentiles.svg`).
//!
//! Benchmarks are programs that print numbers; none of them passes or fails
//! on a timing. `--quick` is a reduced run (fewer policy counts, sizes,
//! requests, rates and changes) that takes a few minutes on a 2-core
//! machine. See `benches/README.md`.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use crate::workspace_root;

/// The benchmarks, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Bench {
    /// ns per packet through the TC programs (BPF_PROG_TEST_RUN), and the
    /// kernel's run_time_ns/run_cnt over the same runs.
    Datapath,
    /// The control plane (benches/src/bin/control_plane.rs), when present.
    ControlPlane,
    /// HTTP latency against the number of policies (none / floor / netpol /
    /// iptables), with the programs' kernel statistics.
    Latency,
    /// Latency percentiles at constant request rates (open loop).
    Loadgen,
    /// Policy file written -> enforced, with 10k simulated pods.
    E2e,
    /// The agent with 10k and 100k Pod objects in a real API server
    /// (memory, initial sync, CPU and latency per change). 15 to 30
    /// minutes on 2 CPUs, so only with `--only agent-scale`.
    AgentScale,
}

impl Bench {
    /// What runs without `--only` (agent-scale takes too long for that).
    const DEFAULT: [Bench; 5] = [
        Bench::Datapath,
        Bench::ControlPlane,
        Bench::Latency,
        Bench::Loadgen,
        Bench::E2e,
    ];
    const ALL: [Bench; 6] = [
        Bench::Datapath,
        Bench::ControlPlane,
        Bench::Latency,
        Bench::Loadgen,
        Bench::E2e,
        Bench::AgentScale,
    ];

    fn name(self) -> &'static str {
        match self {
            Bench::Datapath => "datapath",
            Bench::ControlPlane => "control-plane",
            Bench::Latency => "latency",
            Bench::Loadgen => "loadgen",
            Bench::E2e => "e2e",
            Bench::AgentScale => "agent-scale",
        }
    }

    fn binary(self) -> &'static str {
        match self {
            Bench::Datapath => "datapath",
            Bench::ControlPlane => "control_plane",
            Bench::Latency => "latency",
            Bench::Loadgen => "loadgen",
            Bench::E2e => "e2e",
            Bench::AgentScale => "agent_scale",
        }
    }
}

#[derive(clap::Args)]
pub struct BenchArgs {
    /// A reduced run: fewer policy counts, sizes, requests, rates and changes
    /// (a few minutes on 2 cores).
    #[arg(long)]
    pub quick: bool,
    /// Run only these (comma-separated); agent-scale runs only when named here.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub only: Vec<Bench>,
    /// Where results.json and the plots go [default: <target dir>/bench].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// iptables backend of the iptables baseline (nft: Debian's default
    /// `iptables`; legacy: xtables).
    #[arg(long, default_value = "nft", value_parser = ["nft", "legacy"])]
    pub iptables_backend: String,
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

fn cargo_build_release(args: &[&str]) -> Result<bool> {
    let status = Command::new("cargo")
        .current_dir(workspace_root())
        .args(["build", "--release", "--quiet"])
        .args(args)
        .status()
        .context("running cargo build")?;
    Ok(status.success())
}

fn machine() -> Value {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    json!({
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "cpu_model": cpu_model,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
    })
}

fn git_revision() -> String {
    let out = |args: &[&str]| {
        Command::new("git")
            .current_dir(workspace_root())
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let rev = out(&["rev-parse", "--short", "HEAD"]);
    let dirty = !out(&["status", "--porcelain", "--untracked-files=no"]).is_empty();
    if dirty { format!("{rev}+dirty") } else { rev }
}

/// Whether `--help` of a binary mentions an option (for the control-plane
/// benchmark, whose options this file does not own).
fn has_option(bin: &Path, option: &str) -> bool {
    Command::new(bin)
        .arg("--help")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(option))
}

pub fn run(args: BenchArgs) -> Result<()> {
    if !crate::setup::is_root() {
        bail!(
            "the benchmarks create network namespaces, load eBPF programs and set iptables rules in them: run as root"
        );
    }
    crate::setup::ensure(false)?;
    let selected: Vec<Bench> = if args.only.is_empty() {
        Bench::DEFAULT.to_vec()
    } else {
        Bench::ALL
            .into_iter()
            .filter(|b| args.only.contains(b))
            .collect()
    };
    let root = workspace_root();
    let started = Instant::now();

    println!("== Building netpol-agent, netpol-lab and the benchmarks (release)");
    let mut build = vec![
        "-p",
        "netpol-agent",
        "-p",
        "netpol-lab",
        "-p",
        "netpol-benches",
        "--bin",
        "netpol-agent",
        "--bin",
        "netpol-lab",
    ];
    for b in &selected {
        if *b != Bench::ControlPlane {
            build.extend(["--bin", b.binary()]);
        }
    }
    if !cargo_build_release(&build)? {
        bail!("building the benchmarks failed");
    }
    let mut skipped: Vec<(Bench, String)> = Vec::new();
    if selected.contains(&Bench::ControlPlane) {
        if !root.join("benches/src/bin/control_plane.rs").is_file() {
            skipped.push((
                Bench::ControlPlane,
                "benches/src/bin/control_plane.rs does not exist".into(),
            ));
        } else if !cargo_build_release(&["-p", "netpol-benches", "--bin", "control_plane"])? {
            skipped.push((Bench::ControlPlane, "control_plane does not build".into()));
        }
    }
    let build_secs = started.elapsed().as_secs_f64();
    let release = target_dir().join("release");
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| target_dir().join("bench"));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let agent = release.join("netpol-agent");
    let lab_bin = release.join("netpol-lab");
    println!(
        "   built in {build_secs:.0} s; results go to {}",
        out.display()
    );

    let mut benches = serde_json::Map::new();
    let mut failed = Vec::new();
    let runnable: Vec<Bench> = selected
        .iter()
        .copied()
        .filter(|b| !skipped.iter().any(|(s, _)| s == b))
        .collect();
    for (b, why) in &skipped {
        println!("\n== {}: skipped ({why})", b.name());
        benches.insert(b.name().into(), json!({ "status": "skipped", "note": why }));
    }
    for (i, &b) in runnable.iter().enumerate() {
        let bin = release.join(b.binary());
        let json_path = out.join(format!("{}.json", b.name()));
        let _ = std::fs::remove_file(&json_path);
        let mut cmd = Command::new(&bin);
        let lab_args = |cmd: &mut Command| {
            cmd.arg("--agent")
                .arg(&agent)
                .arg("--lab-bin")
                .arg(&lab_bin);
        };
        match b {
            Bench::Datapath => {
                if args.quick {
                    cmd.args([
                        "--policies",
                        "10,1000,10000",
                        "--repeat",
                        "200000",
                        "--flows",
                        "5000",
                    ]);
                }
                cmd.arg("--json").arg(&json_path);
            }
            Bench::ControlPlane => {
                if args.quick && has_option(&bin, "--quick") {
                    cmd.arg("--quick");
                }
                if has_option(&bin, "--json") {
                    cmd.arg("--json").arg(&json_path);
                }
            }
            Bench::Latency => {
                lab_args(&mut cmd);
                cmd.arg("--svg").arg(out.join("latency_vs_policies.svg"));
                cmd.args(["--iptables-backend", &args.iptables_backend]);
                cmd.arg("--json").arg(&json_path);
            }
            Bench::Loadgen => {
                lab_args(&mut cmd);
                cmd.arg("--svg").arg(out.join("percentiles.svg"));
                cmd.args(["--iptables-backend", &args.iptables_backend]);
                cmd.arg("--json").arg(&json_path);
            }
            Bench::E2e | Bench::AgentScale => {
                lab_args(&mut cmd);
                cmd.arg("--json").arg(&json_path);
            }
        }
        if args.quick && b != Bench::Datapath && b != Bench::ControlPlane {
            cmd.arg("--quick");
        }
        println!(
            "\n== [{}/{}] {} ({})",
            i + 1,
            runnable.len(),
            b.name(),
            if args.quick { "quick" } else { "full" }
        );
        let t = Instant::now();
        let status = cmd
            .current_dir(&root)
            .status()
            .with_context(|| format!("starting {}", bin.display()))?;
        let secs = t.elapsed().as_secs_f64();
        let results: Value = std::fs::read_to_string(&json_path)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(Value::Null);
        if status.success() {
            benches.insert(
                b.name().into(),
                json!({ "status": "ok", "secs": secs, "results": results }),
            );
        } else {
            println!("== {} failed ({status})", b.name());
            failed.push(b.name());
            benches.insert(
                b.name().into(),
                json!({ "status": "failed", "secs": secs, "note": status.to_string(), "results": results }),
            );
        }
    }

    let total_secs = started.elapsed().as_secs_f64();
    let results = json!({
        "machine": machine(),
        "revision": git_revision(),
        "quick": args.quick,
        "iptables_backend": args.iptables_backend,
        "started_unix": SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            .saturating_sub(total_secs as u64),
        "build_secs": build_secs,
        "total_secs": total_secs,
        "benches": benches,
    });
    let results_path = out.join("results.json");
    std::fs::write(&results_path, serde_json::to_string_pretty(&results)?)
        .with_context(|| format!("writing {}", results_path.display()))?;
    println!(
        "\n== Done in {:.0} s ({:.0} s building, {:.0} s running)",
        total_secs,
        build_secs,
        total_secs - build_secs
    );
    println!("   {}", results_path.display());
    for svg in ["latency_vs_policies.svg", "percentiles.svg"] {
        let p = out.join(svg);
        if p.is_file() {
            println!("   {}", p.display());
        }
    }
    if !failed.is_empty() {
        bail!("benchmarks that did not finish: {}", failed.join(", "));
    }
    Ok(())
}
