//! Shared helpers of the netpol benchmark binaries. Benchmarks are programs
//! that print numbers, never pass/fail tests.
//!
//! * [`benchlab`]: the lab the `latency`, `loadgen` and `e2e` benchmarks run
//!   in: one client/server pod pair per enforcement mode, each pair on its
//!   own two nodes, so the modes can be interleaved request by request;
//! * [`iptables`]: enforcement the way iptables-based plugins do it
//!   (a per-pod chain, conntrack first, a rule per policy, ipsets);
//! * [`floor`]: the `floor` mode's program (returns at once), assembled and
//!   attached through TCX by the benchmark;
//! * [`kstats`]: the kernel's per-program statistics (`run_time_ns`,
//!   `run_cnt`, while `kernel.bpf_stats_enabled` is on);
//! * [`nginx`]: nginx inside a pod's netns, serving files of given sizes;
//! * [`http`]: our HTTP/1.1 client (one request per connection, or keep-alive);
//! * [`stats`], [`clock`], [`svg`], [`machine`]: summaries, a precise clock,
//!   hand-written SVG charts and a description of the machine.

pub mod benchlab;
pub mod clock;
pub mod floor;
pub mod http;
pub mod iptables;
pub mod kstats;
pub mod machine;
pub mod nginx;
pub mod prober;
pub mod stats;
pub mod svg;

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

/// Fails unless running as root (namespaces, eBPF, iptables).
pub fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the {what} benchmark creates network namespaces and loads eBPF programs: run it as root"
        );
    }
    Ok(())
}

// The binaries an end-to-end benchmark runs, and extra agent arguments
// (flattened into each benchmark's command line; a doc comment here would
// show up in every benchmark's --help).
#[derive(clap::Args, Debug, Clone)]
pub struct Binaries {
    /// netpol-agent binary [default: next to this one].
    #[arg(long)]
    pub agent: Option<PathBuf>,
    /// netpol-lab binary (pod servers) [default: next to this one].
    #[arg(long)]
    pub lab_bin: Option<PathBuf>,
    /// Extra argument for the agents (repeat for several).
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    pub agent_args: Vec<String>,
}

impl Binaries {
    /// The agent and lab binaries: as given, or next to this executable.
    pub fn resolve(&self) -> Result<(PathBuf, PathBuf)> {
        let agent = match &self.agent {
            Some(p) => p.clone(),
            None => sibling_exe("netpol-agent")?,
        };
        let lab_bin = match &self.lab_bin {
            Some(p) => p.clone(),
            None => sibling_exe("netpol-lab")?,
        };
        Ok((agent, lab_bin))
    }
}

/// A binary next to the running executable (cargo puts every binary of a
/// profile in the same directory): `netpol-agent`, `netpol-lab`.
pub fn sibling_exe(name: &str) -> Result<PathBuf> {
    let me = std::env::current_exe().context("finding the running executable")?;
    let dir = me.parent().context("the executable has no directory")?;
    for candidate in [dir.join(name), dir.join("..").join(name)] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "{name} not found next to {}: build it (`cargo build --release -p {}`) or pass its path",
        me.display(),
        match name {
            "netpol-agent" | "netpol-cni" => name,
            _ => "netpol-lab",
        }
    )
}

/// Writes pretty JSON to `path`, creating its directory.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, serde_json::to_string_pretty(value)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// `512 B`, `1 KB`, `10 KB`, `100 KB` (binary kilobytes, as the sizes are).
pub fn size_label(bytes: usize) -> String {
    if bytes >= 1024 && bytes.is_multiple_of(1024) {
        format!("{} KB", bytes / 1024)
    } else if bytes == 512 {
        "0.5 KB".to_string()
    } else {
        format!("{bytes} B")
    }
}
