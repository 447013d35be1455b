//! `cargo xtask build-ebpf [--verify]`: build the eBPF object on its own and
//! describe it; with `--verify`, load every program through the kernel
//! verifier and report what the verifier counted.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::workspace_root;

/// Build `netpol-ebpf` exactly the way aya-build does for the agent (same
/// target, flags and build-std), into `target/ebpf`, and return the path of
/// the object.
pub fn build() -> Result<PathBuf> {
    let root = workspace_root();
    let target_dir = root.join("target/ebpf");
    let flags = [
        &format!("--cfg=bpf_target_arch=\"{}\"", std::env::consts::ARCH),
        "-Cdebuginfo=2",
        "-Clink-arg=--btf",
    ]
    .join("\x1f");
    let status = Command::new("cargo")
        .current_dir(&root)
        .args([
            "build",
            "--package",
            "netpol-ebpf",
            "--bins",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--target-dir",
        ])
        .arg(&target_dir)
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_ENCODED_RUSTFLAGS", flags)
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .status()
        .context("running cargo build for netpol-ebpf")?;
    if !status.success() {
        bail!("building the eBPF object failed");
    }
    Ok(target_dir.join("bpfel-unknown-none/release/netpol"))
}

const MAP_TYPES: &[(u32, &str)] = &[
    (1, "hash"),
    (2, "array"),
    (6, "percpu_array"),
    (9, "lru_hash"),
    (11, "lpm_trie"),
    (27, "ringbuf"),
];

fn map_type_name(t: u32) -> String {
    MAP_TYPES
        .iter()
        .find(|(n, _)| *n == t)
        .map(|(_, s)| (*s).to_string())
        .unwrap_or_else(|| format!("type {t}"))
}

/// Print each program's section and instruction count and each map's type,
/// key/value sizes and default size.
pub fn describe(path: &Path) -> Result<()> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let obj = aya_obj::Object::parse(&data).context("parsing the eBPF object")?;
    println!("object: {} ({} bytes)", path.display(), data.len());
    println!("programs:");
    let mut progs: Vec<_> = obj.programs.iter().collect();
    progs.sort_by_key(|(n, _)| n.as_str());
    for (name, prog) in progs {
        let insns = obj
            .functions
            .get(&(prog.section_index, prog.address))
            .map(|f| f.instructions.len())
            .unwrap_or(0);
        // Only the entry function's own instructions: the calls into
        // subprograms are linked at load time (`--verify` prints the
        // linked program's size, as the kernel translated it).
        println!(
            "  {name:<20} section {:<12} entry function {insns:>6} instructions",
            format!("{:?}", prog.section).to_lowercase()
        );
    }
    println!("maps:");
    let mut maps: Vec<_> = obj.maps.iter().collect();
    maps.sort_by_key(|(n, _)| n.as_str());
    for (name, map) in maps {
        if name.starts_with('.') {
            continue;
        }
        println!(
            "  {name:<20} {:<13} key {:>3} B  value {:>4} B  max_entries {}",
            map_type_name(map.map_type()),
            map.key_size(),
            map.value_size(),
            map.max_entries()
        );
    }
    Ok(())
}

/// Load every program through the verifier (maps are created, not pinned)
/// and print the verifier's instruction counts.
pub fn verify(path: &Path) -> Result<()> {
    use aya::programs::Program;
    if !crate::setup::is_root() {
        bail!("--verify loads programs into the kernel: run as root");
    }
    let data = std::fs::read(path)?;
    let mut ebpf = aya::EbpfLoader::new()
        .load(&data)
        .context("loading the eBPF object (maps)")?;
    let names: Vec<String> = ebpf.programs().map(|(n, _)| n.to_string()).collect();
    println!("verifier:");
    let mut failed = false;
    for name in names {
        // Each program loads as the type its section names: TC classifiers,
        // the uplink's XDP program and the sk_lookup program alike (loading
        // one as another fails for the wrong reason).
        let prog = ebpf.program_mut(&name).context("program vanished")?;
        let kind = match prog {
            Program::SchedClassifier(_) => "tc",
            Program::Xdp(_) => "xdp",
            Program::SkLookup(_) => "sk_lookup",
            _ => "other",
        };
        let loaded = match prog {
            Program::SchedClassifier(p) => p.load().map(|()| p.info()),
            Program::Xdp(p) => p.load().map(|()| p.info()),
            Program::SkLookup(p) => p.load().map(|()| p.info()),
            other => bail!(
                "{name}: program type {:?} is not one netpol uses",
                other.prog_type()
            ),
        };
        match loaded {
            Ok(info) => {
                let info = info.context("reading program info")?;
                println!(
                    "  {name:<20} {kind:<9} verified: {} instructions processed by the verifier, {} translated",
                    info.verified_instruction_count()
                        .map(|n| n.to_string())
                        .unwrap_or_else(|| "?".into()),
                    info.size_translated()
                        .map(|n| format!("{} instructions ({n} B)", n / 8))
                        .unwrap_or_else(|| "?".into()),
                );
            }
            Err(e) => {
                failed = true;
                println!("  {name:<20} {kind:<9} REJECTED: {e:#}");
                if let aya::programs::ProgramError::LoadError { verifier_log, .. } = &e {
                    let log = verifier_log.to_string();
                    let tail: Vec<&str> = log.lines().rev().take(40).collect();
                    for l in tail.into_iter().rev() {
                        println!("    {l}");
                    }
                }
            }
        }
    }
    if failed {
        bail!("the verifier rejected a program");
    }
    Ok(())
}
