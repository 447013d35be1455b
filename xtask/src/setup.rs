//! `cargo xtask setup`: install what a fresh Debian machine lacks to build
//! and test netpol, idempotently, and quickly when nothing is missing.
//! Every other command that needs the toolchain calls [`ensure`] first;
//! `cargo xtask setup` ([`setup`]), `test` and `conformance` ([`setup_quiet`])
//! also build the lab's Go test tools ([`crate::gotools`]), which take long the
//! first time (about 20 minutes on 2 cores) and seconds afterwards.

use std::process::Command;

use anyhow::{Context as _, Result, bail};

/// Debian packages the build, the lab and the benchmarks need, with why.
pub const APT_PACKAGES: &[(&str, &str)] = &[
    (
        "llvm-22-dev",
        "bpf-linker is built against LLVM 22, like rustc",
    ),
    (
        "libpolly-22-dev",
        "LLVM 22's static libraries link against Polly",
    ),
    ("libzstd-dev", "linked by bpf-linker's LLVM"),
    ("zlib1g-dev", "linked by bpf-linker's LLVM"),
    (
        "iproute2",
        "the lab's namespaces, veths, bridges and routes",
    ),
    ("bpftool", "inspecting pinned maps (`bpftool map dump`)"),
    (
        "util-linux",
        "nsenter: running agents inside node namespaces",
    ),
    ("iptables", "the iptables baseline of the benchmarks"),
    ("ipset", "the iptables baseline of the benchmarks"),
    ("nginx-light", "the HTTP server of the benchmarks"),
    ("nftables", "kube-proxy in the lab runs in nftables mode"),
    (
        "conntrack",
        "kube-proxy clears stale UDP conntrack entries with it",
    ),
    (
        "openssl",
        "TLS material for the lab's control plane (CA, serving certificates, service-account keys)",
    ),
    (
        "curl",
        "checking the lab's control plane by hand (kube-apiserver's /readyz, metrics endpoints)",
    ),
];

pub const BPF_LINKER_VERSION: &str = "0.13.0";

struct Missing {
    apt: Vec<&'static str>,
    rust_src: bool,
    bpf_linker: bool,
}

impl Missing {
    fn is_empty(&self) -> bool {
        self.apt.is_empty() && !self.rust_src && !self.bpf_linker
    }
    fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        for p in &self.apt {
            let why = APT_PACKAGES
                .iter()
                .find(|(n, _)| n == p)
                .map(|(_, w)| *w)
                .unwrap_or("");
            out.push(format!("apt package {p} ({why})"));
        }
        if self.rust_src {
            out.push("rustup component rust-src (build-std=core for bpfel-unknown-none)".into());
        }
        if self.bpf_linker {
            out.push(format!(
                "bpf-linker {BPF_LINKER_VERSION} built with --features llvm-22 (links the eBPF object)"
            ));
        }
        out
    }
}

fn find_missing() -> Result<Missing> {
    let mut apt = Vec::new();
    for (pkg, _) in APT_PACKAGES {
        let out = Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", pkg])
            .output()
            .context("running dpkg-query (is this Debian?)")?;
        if !String::from_utf8_lossy(&out.stdout).contains("install ok installed") {
            apt.push(*pkg);
        }
    }
    let rust_src = match Command::new("rustup")
        .args(["component", "list", "--installed"])
        .output()
    {
        Ok(out) => !String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.starts_with("rust-src")),
        Err(_) => true,
    };
    let bpf_linker = match Command::new("bpf-linker").arg("--version").output() {
        Ok(out) => !String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION),
        Err(_) => true,
    };
    Ok(Missing {
        apt,
        rust_src,
        bpf_linker,
    })
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("setup: running {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// `cargo xtask setup`: the toolchain ([`ensure`]), then the lab's Go test
/// tools (only `modules` if any are named), printing what is present.
pub fn setup(modules: &[String]) -> Result<()> {
    ensure(true)?;
    crate::gotools::ensure_only(true, modules)
}

/// What `cargo xtask test` and `conformance` need: the toolchain and the
/// lab's Go tools (built once; quiet when everything is there).
pub fn setup_quiet() -> Result<()> {
    ensure(false)?;
    crate::gotools::ensure(false)
}

/// Check the toolchain and install what is missing. `verbose` prints what
/// is already there too (for `cargo xtask setup`).
pub fn ensure(verbose: bool) -> Result<()> {
    let missing = find_missing()?;
    if missing.is_empty() {
        if verbose {
            let apt: Vec<&str> = APT_PACKAGES.iter().map(|(p, _)| *p).collect();
            eprintln!("setup: apt packages installed: {}", apt.join(", "));
            eprintln!("setup: rust-src installed; bpf-linker {BPF_LINKER_VERSION} installed");
        }
        return Ok(());
    }
    let list = missing.describe();
    if !is_root() {
        bail!(
            "netpol needs these installed, and installing them needs root:\n  - {}\n\
             Run `sudo -E cargo xtask setup` (or install them yourself) and try again.",
            list.join("\n  - ")
        );
    }
    eprintln!("setup: installing:\n  - {}", list.join("\n  - "));
    if !missing.apt.is_empty() {
        run(Command::new("apt-get").arg("update").arg("-qq"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing.apt)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    if missing.rust_src {
        run(Command::new("rustup").args(["component", "add", "rust-src"]))?;
    }
    if missing.bpf_linker {
        let path = format!(
            "/usr/lib/llvm-22/bin:{}",
            std::env::var("PATH").unwrap_or_default()
        );
        eprintln!("setup: building bpf-linker (a few minutes on 2 cores)");
        run(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("PATH", path))?;
    }
    let still = find_missing()?;
    if !still.is_empty() {
        bail!(
            "setup: still missing after installing:\n  - {}",
            still.describe().join("\n  - ")
        );
    }
    eprintln!("setup: done");
    Ok(())
}
