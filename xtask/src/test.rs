//! `cargo xtask test`: unit tests, then the integration and privileged
//! tests (BPF_PROG_TEST_RUN verdicts, lab namespaces with real agents).
//! With CI=true a privileged test that cannot run fails instead of skipping.

use std::process::Command;

use anyhow::{Result, bail};

use crate::{build_bins, exec, setup::is_root, workspace_root};

#[derive(clap::Args)]
pub struct TestArgs {
    /// Only the unit tests (no root needed).
    #[arg(long)]
    unit: bool,
    /// Extra arguments for the test harness (e.g. a test name filter).
    #[arg(trailing_var_arg = true)]
    filter: Vec<String>,
}

pub fn run(args: TestArgs) -> Result<()> {
    let root = workspace_root();
    // The lab's tests and the agent's lab tests start these binaries.
    let bins = build_bins(&["netpol-agent", "netpol-lab", "netpol-cni"])?;

    println!("== Unit tests");
    exec(
        Command::new("cargo")
            .current_dir(&root)
            .args(["test", "--workspace", "--lib", "--bins", "--"])
            .args(&args.filter),
    )?;
    if args.unit {
        return Ok(());
    }

    println!("\n== Integration and privileged tests (compiler equivalence, BPF verdicts, lab)");
    if !is_root() {
        let msg = "privileged tests need root (network namespaces, BPF)";
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            bail!("{msg}; CI=true, so they must run: run as root");
        }
        eprintln!("==== SKIPPING what needs root: {msg} ====");
    }
    exec(
        Command::new("cargo")
            .current_dir(&root)
            .args(["test", "--workspace", "--test", "*", "--"])
            .args(&args.filter)
            .env("NETPOL_LAB_BIN", &bins[1])
            .env("NETPOL_CNI_BIN", &bins[2]),
    )?;
    if !args.filter.is_empty() {
        return Ok(());
    }

    println!("\n== Conformance: the upstream NetworkPolicy e2e model in the lab");
    if is_root() {
        // Both agent sources, each through pod IPs and through ClusterIPs (a control-plane
        // lab), with conformance/expected-failures.yaml.
        crate::conformance(&["--enforcer".to_string(), "netpol-kube,netpol".to_string()])
    } else {
        // Without root only the case files against the reference evaluator.
        crate::conformance(&["--reference-only".to_string()])
    }
}
