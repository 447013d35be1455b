//! `cargo xtask demo`: a 2-node lab (one routed node, one bridged node),
//! an agent on each, the reachability matrix before and after the example
//! policies, and one denied connection as the flow log shows it.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use netpol_lab::{ClusterSpec, Family, LabState, ProbeSpec, Protocol, UpOptions};

use crate::{build_bins, workspace_root};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Cluster file.
    #[arg(long, default_value = "examples/cluster.yaml")]
    cluster: PathBuf,
    /// Directory of NetworkPolicy manifests to apply.
    #[arg(long, default_value = "examples/policies")]
    policies: PathBuf,
    /// Leave the lab and agents running afterwards (`cargo xtask lab down
    /// demo` removes them).
    #[arg(long)]
    keep: bool,
}

fn resolve(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        workspace_root().join(p)
    }
}

pub fn run(args: DemoArgs) -> Result<()> {
    if !crate::setup::is_root() {
        bail!("the demo creates network namespaces and loads eBPF programs: run it as root");
    }
    let bins = build_bins(&["netpol-agent", "netpol-lab"])?;
    let (agent, lab_bin) = (&bins[0], &bins[1]);
    let spec = ClusterSpec::from_file(&resolve(&args.cluster))
        .with_context(|| format!("reading {}", args.cluster.display()))?;

    println!(
        "== Lab: {} nodes, {} pods",
        spec.nodes.len(),
        spec.pods.len()
    );
    for n in &spec.nodes {
        println!("   node {:<8} {:?} pod attachment", n.name, n.attachment);
    }
    // A stale demo (an earlier run that was interrupted) goes first.
    let _ = netpol_lab::down(&spec.name);
    let lab = netpol_lab::Lab::up(
        &spec,
        &UpOptions {
            server_exe: Some(lab_bin.clone()),
            ..UpOptions::default()
        },
    )
    .map_err(|e| anyhow!("lab up: {e}"))?;
    for p in &lab.pods {
        println!(
            "   pod {:<16} on {:<7} {} {}",
            p.key(),
            p.node,
            p.ip_v4,
            p.ip_v6
        );
    }

    println!("\n== Starting netpol-agent on each node");
    let mut agents = netpol_lab::start_agents(&lab, agent, &[]).context("starting the agents")?;
    agents
        .wait_synced(&[], Duration::from_secs(20))
        .map_err(|e| anyhow!(e))?;
    for a in &agents.agents {
        let st = a.status().unwrap_or_default();
        println!(
            "   {}: {} endpoints enforced, maps pinned under {}",
            a.node,
            st["endpoints"],
            a.bpffs_root.display()
        );
    }

    let probe = ProbeSpec {
        ports: vec![80],
        protocols: vec![Protocol::Tcp, Protocol::Udp],
        families: vec![Family::V4, Family::V6],
        ..ProbeSpec::default()
    };
    println!(
        "\n== Reachability before any policy (rows: client, columns: server; . connected, X blocked)"
    );
    let before = netpol_lab::probe(&lab, &probe).map_err(|e| anyhow!("probe: {e}"))?;
    print!("{}", before.render());

    let policies = resolve(&args.policies);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&policies)
        .with_context(|| format!("reading {}", policies.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    println!(
        "\n== Applying {} policies from {}",
        files.len(),
        args.policies.display()
    );
    for f in &files {
        println!("   {}", f.file_name().unwrap_or_default().to_string_lossy());
    }
    let manifests = lab.manifests_dir.clone();
    agents
        .change(
            || {
                for f in &files {
                    copy_atomically(f, &manifests).expect("copying a policy");
                }
            },
            Duration::from_secs(20),
        )
        .map_err(|e| anyhow!(e))?;

    println!("\n== Reachability with the policies");
    let after = netpol_lab::probe(&lab, &probe).map_err(|e| anyhow!("probe: {e}"))?;
    print!("{}", after.render());

    show_denied(&lab, &after, &agents)?;

    if args.keep {
        let state = lab.keep();
        std::mem::forget(agents);
        println!(
            "\nLab {} left running; `cargo xtask lab down {}` removes it (agents too).",
            state.name, state.name
        );
    } else {
        agents.stop();
        lab.down().map_err(|e| anyhow!("lab down: {e}"))?;
        println!("\nLab removed, agents stopped and their pins removed.");
    }
    Ok(())
}

fn copy_atomically(src: &Path, dir: &Path) -> std::io::Result<()> {
    let name = src
        .file_name()
        .expect("a file")
        .to_string_lossy()
        .to_string();
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::copy(src, &tmp)?;
    std::fs::rename(&tmp, dir.join(name))
}

/// Pick a denied cell, and show the flow log entry the agent wrote for it.
fn show_denied(
    lab: &LabState,
    after: &netpol_lab::ProbeResults,
    agents: &netpol_lab::Agents,
) -> Result<()> {
    let Some(denied) = after
        .results
        .iter()
        .find(|r| !r.connected && r.protocol == Protocol::Tcp && r.family == Family::V4)
    else {
        println!("\n(no connection was denied)");
        return Ok(());
    };
    let from = lab
        .pod_by_key(&denied.from)
        .ok_or_else(|| anyhow!("unknown pod {}", denied.from))?;
    println!(
        "\n== A denied connection: {} -> {} ({} TCP/{})",
        denied.from, denied.to, denied.to_ip, denied.port
    );
    let ok = netpol_lab::connect(
        lab,
        from,
        denied.to_ip,
        denied.port,
        Protocol::Tcp,
        Duration::from_secs(1),
    );
    println!(
        "   connect from {} to {}:{}: {}",
        denied.from,
        denied.to_ip,
        denied.port,
        if ok {
            "connected (!)"
        } else {
            "timed out (dropped)"
        }
    );
    std::thread::sleep(Duration::from_millis(300));
    let to_ip = denied.to_ip.to_string();
    let from_ip = from.ip_v4.to_string();
    let line = agents.flow_logs().into_iter().rev().find(|(_, l)| {
        l["verdict"] == "deny"
            && l["protocol"] == "TCP"
            && l["src"]["ip"] == from_ip.as_str()
            && l["dst"]["ip"] == to_ip.as_str()
            && l["dport"] == denied.port
    });
    match line {
        Some((raw, _)) => println!("   flow log: {raw}"),
        None => println!("   (no flow log line found for it)"),
    }
    Ok(())
}
