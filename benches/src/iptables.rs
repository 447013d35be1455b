//! NetworkPolicy enforcement the way iptables-based plugins do it (Romana,
//! kube-router, Calico in iptables mode), for a baseline: in the server's
//! node netns,
//!
//! ```text
//! -A FORWARD -o <pod's host veth> -j NPB-POD                 # traffic to the pod
//! -A NPB-POD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
//! -A NPB-POD -p tcp --dport <port 0> -m set --match-set npb-0 src -j ACCEPT   # policy 0
//! ...
//! -A NPB-POD -p tcp --dport <port N-1> -m set --match-set npb-<N-1> src -j ACCEPT
//! -A NPB-POD -j DROP                                         # isolated: default deny
//! ```
//!
//! with one ipset (`hash:ip`) per policy holding the addresses its peer
//! selector matches (Calico and kube-router keep one set per selector). A
//! new connection's SYN walks the chain until a rule matches; every later
//! packet of the connection is accepted by the conntrack rule. Loaded with
//! `ipset restore` and `iptables-restore` (one transaction each).

use std::{
    io::Write as _,
    net::Ipv4Addr,
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use netpol_lab::netns_command;
use serde::Serialize;

/// The per-pod chain.
pub const CHAIN: &str = "NPB-POD";
/// Prefix of the ipsets (`npb-<i>`).
pub const SET_PREFIX: &str = "npb-";

/// Which iptables: the nf_tables backend (Debian's default `iptables`) or
/// the legacy xtables one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Nft,
    Legacy,
}

impl Backend {
    fn restore(self) -> &'static str {
        match self {
            Backend::Nft => "iptables-nft-restore",
            Backend::Legacy => "iptables-legacy-restore",
        }
    }

    fn save(self) -> &'static str {
        match self {
            Backend::Nft => "iptables-nft-save",
            Backend::Legacy => "iptables-legacy-save",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        }
    }
}

/// One policy: accept TCP to `port` from `peers`.
#[derive(Debug, Clone)]
pub struct Rule {
    pub port: u16,
    pub peers: Vec<Ipv4Addr>,
}

/// What `apply` loaded and how long it took.
#[derive(Debug, Clone, Serialize)]
pub struct Applied {
    pub rules: usize,
    pub ipsets: usize,
    pub secs: f64,
}

fn run_with_stdin(netns: &Path, program: &str, args: &[&str], input: &str) -> Result<()> {
    let mut child = netns_command(netns, program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| {
            format!("starting {program} (apt-get install iptables ipset; `cargo xtask setup`)")
        })?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(input.as_bytes())
        .with_context(|| format!("writing to {program}"))?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{program} {} in {} failed: {}",
            args.join(" "),
            netns.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Removes every rule of the filter table and every ipset of the node netns
/// (the lab's node namespaces hold nothing else).
pub fn clear(netns: &Path, backend: Backend) -> Result<()> {
    run_with_stdin(
        netns,
        backend.restore(),
        &[],
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n",
    )?;
    // A set is destroyed once no rule refers to it any more.
    let mut last = String::new();
    for _ in 0..20 {
        let out = netns_command(netns, "ipset")
            .arg("destroy")
            .output()
            .context("running ipset")?;
        if out.status.success() {
            return Ok(());
        }
        last = String::from_utf8_lossy(&out.stderr).trim().to_string();
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    bail!("ipset destroy in {}: {last}", netns.display())
}

/// Replaces the node's rules with a per-pod chain for `pod_veth` holding
/// `rules` in order (see the module docs). No rules: no chain at all (a pod
/// no policy selects is not isolated).
pub fn apply(netns: &Path, backend: Backend, pod_veth: &str, rules: &[Rule]) -> Result<Applied> {
    let started = Instant::now();
    clear(netns, backend)?;
    if rules.is_empty() {
        return Ok(Applied {
            rules: 0,
            ipsets: 0,
            secs: started.elapsed().as_secs_f64(),
        });
    }
    let mut sets = String::new();
    for (i, r) in rules.iter().enumerate() {
        sets.push_str(&format!(
            "create {SET_PREFIX}{i} hash:ip family inet hashsize 64 maxelem 65536\n"
        ));
        for ip in &r.peers {
            sets.push_str(&format!("add {SET_PREFIX}{i} {ip}\n"));
        }
    }
    run_with_stdin(netns, "ipset", &["restore", "-exist"], &sets)?;
    let mut t =
        String::from("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    t.push_str(&format!(":{CHAIN} - [0:0]\n"));
    t.push_str(&format!("-A FORWARD -o {pod_veth} -j {CHAIN}\n"));
    t.push_str(&format!(
        "-A {CHAIN} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n"
    ));
    for (i, r) in rules.iter().enumerate() {
        t.push_str(&format!(
            "-A {CHAIN} -p tcp -m tcp --dport {} -m set --match-set {SET_PREFIX}{i} src -j ACCEPT\n",
            r.port
        ));
    }
    t.push_str(&format!("-A {CHAIN} -j DROP\nCOMMIT\n"));
    run_with_stdin(netns, backend.restore(), &[], &t)?;
    Ok(Applied {
        rules: rules.len(),
        ipsets: rules.len(),
        secs: started.elapsed().as_secs_f64(),
    })
}

/// Rules in the per-pod chain now (for a sanity check).
pub fn chain_len(netns: &Path, backend: Backend) -> Result<usize> {
    let out = netns_command(netns, backend.save())
        .args(["-t", "filter"])
        .output()
        .with_context(|| format!("running {}", backend.save()))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(&format!("-A {CHAIN} ")))
        .count())
}

/// Whether the backend's tools are installed.
pub fn available(backend: Backend) -> bool {
    Command::new(backend.restore())
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
        && Command::new("ipset")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
}
