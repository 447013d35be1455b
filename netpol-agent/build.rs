//! Builds the eBPF object (crate `netpol-ebpf`) with aya-build so that the
//! agent can embed it: plain `cargo build` / `cargo test` just work once the
//! toolchain is installed (`cargo xtask setup`).
//!
//! The eBPF build uses the stable toolchain with `RUSTC_BOOTSTRAP=1` (so
//! `-Z build-std=core` is accepted) and bpf-linker 0.13 built against LLVM 22.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=RUSTC_BOOTSTRAP");
    if which("bpf-linker").is_none() {
        return Err(anyhow!(
            "bpf-linker not found on PATH: run `cargo xtask setup` (installs bpf-linker 0.13.0 \
             built against LLVM 22, rust-src and the apt packages)"
        ));
    }
    // aya-build only passes `-Z build-std=core` when RUSTC_BOOTSTRAP says
    // unstable flags are allowed; scope it to this build script's children.
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest_dir)
        .parent()
        .context("workspace root")?
        .join("netpol-ebpf");
    let root = root.to_str().context("non-UTF-8 path")?;
    println!("cargo:rerun-if-changed=../netpol-common/src");
    aya_build::build_ebpf(
        [Package {
            name: "netpol-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::Custom("stable"),
    )
}

fn which(bin: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}
