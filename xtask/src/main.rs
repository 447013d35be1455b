//! `cargo xtask`: orchestration for netpol (setup, build-ebpf, lab, demo,
//! test). Each command that needs the eBPF toolchain runs `setup::ensure`
//! first, so the README's commands work on a fresh machine.

mod bench;
mod demo;
mod ebpf;
mod gotools;
mod setup;
mod test;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "netpol developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what this machine lacks (apt packages, rust-src, bpf-linker)
    /// and build the lab's Go test tools into $NETPOL_TOOLS_DIR/bin.
    Setup {
        /// Only these lab/tools modules (by directory, e.g.
        /// `--module network-policy-api`); default every module.
        #[arg(long = "module")]
        modules: Vec<String>,
    },
    /// Build the eBPF object and describe its programs and maps.
    BuildEbpf {
        /// Also load every program through the kernel verifier (root).
        #[arg(long)]
        verify: bool,
    },
    /// The lab: a cluster of network namespaces (`lab up|down|probe ...`).
    Lab {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// A 2-node lab (routed + bridged) with agents; reachability before and
    /// after the policies in `examples/`.
    Demo(demo::DemoArgs),
    /// Benchmarks in the lab: tables, results.json and SVG plots in target/bench.
    Bench(bench::BenchArgs),
    /// Unit tests, then the privileged lab tests (conformance included).
    Test(test::TestArgs),
    /// The upstream NetworkPolicy e2e model in the lab, with the real agents or
    /// another enforcer, through pod IPs and ClusterIPs (`--enforcer
    /// netpol|netpol-kube|kube-network-policies|none`, `--via pod|service|both`,
    /// `--proxy-mode`, `--filter <name>`, `--list`, `--reference-only`, `--keep`).
    Conformance {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Setup { modules } => setup::setup(&modules),
        Cmd::BuildEbpf { verify } => {
            setup::ensure(false)?;
            let obj = ebpf::build()?;
            ebpf::describe(&obj)?;
            if verify {
                ebpf::verify(&obj)?;
            }
            Ok(())
        }
        Cmd::Lab { args } => {
            let lab = build_bins(&["netpol-lab"])?.remove(0);
            exec(Command::new(lab).args(args))
        }
        Cmd::Demo(args) => {
            setup::ensure(false)?;
            demo::run(args)
        }
        Cmd::Test(args) => {
            // The control-plane lab tests and conformance run the Go tools.
            setup::setup_quiet()?;
            test::run(args)
        }
        Cmd::Bench(args) => bench::run(args),
        Cmd::Conformance { args } => {
            setup::setup_quiet()?;
            conformance(&args)
        }
    }
}

/// Run the conformance suite (its own crate: it needs netpol-agent, which
/// xtask must not depend on so that it builds before bpf-linker exists).
pub fn conformance(args: &[String]) -> Result<()> {
    let bins = build_bins(&["netpol-agent", "netpol-lab", "netpol-conformance"])?;
    exec(
        Command::new(&bins[2])
            .current_dir(workspace_root())
            .args(args)
            .env("NETPOL_AGENT_BIN", &bins[0])
            .env("NETPOL_LAB_BIN", &bins[1]),
    )
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Build the named binaries (debug profile, shared with `cargo test`) and
/// return their paths.
pub fn build_bins(bins: &[&str]) -> Result<Vec<PathBuf>> {
    let root = workspace_root();
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&root).args(["build", "--quiet"]);
    for b in bins {
        cmd.args(["--bin", b]);
    }
    let status = cmd.status().context("running cargo build")?;
    if !status.success() {
        bail!("building {bins:?} failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(bins.iter().map(|b| target.join("debug").join(b)).collect())
}

/// Run a command to completion; fail on a non-zero exit.
pub fn exec(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}
