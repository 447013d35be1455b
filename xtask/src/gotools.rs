//! The lab's Go test tools: etcd, the Kubernetes binaries, CoreDNS and
//! kube-network-policies, built by `cargo xtask setup` from the Go modules in
//! `lab/tools/<module>` (see `lab/tools/README.md`), and the
//! ClusterNetworkPolicy CRD manifests, taken from the network-policy-api
//! module's zip (nothing to build).
//!
//! The contract the lab relies on: each binary is at
//! `$NETPOL_TOOLS_DIR/bin/<name>` ([`tools_dir`], default
//! `/var/cache/netpol/tools`), each file at
//! `$NETPOL_TOOLS_DIR/manifests/<name>`. A module is rebuilt only when its go.mod,
//! go.sum, the binaries it names or the Go toolchain change; the key of its
//! last build is in `$NETPOL_TOOLS_DIR/stamps/<module>`. Binaries are built
//! into a scratch directory next to `bin/` and renamed into place, so a
//! half-built tool is never used.

use std::{
    env,
    ffi::OsStr,
    fs, io,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

/// The variable that moves the tools (default [`DEFAULT_TOOLS_DIR`]).
pub const TOOLS_DIR_ENV: &str = "NETPOL_TOOLS_DIR";
pub const DEFAULT_TOOLS_DIR: &str = "/var/cache/netpol/tools";

/// The oldest Go that builds the modules: their go.mod files say `go 1.26.0`.
const MIN_GO: (u32, u32) = (1, 26);
/// The Go the modules are built and tested with, named in install advice.
const TESTED_GO: &str = "1.26.8";
/// Where the go.dev tarball puts `go`; looked at when `go` is not on PATH.
const FALLBACK_GO: &str = "/usr/local/go/bin/go";

/// The `go build` flags before `-ldflags` (see [`build_flags`]).
const BUILD_FLAGS: &[&str] = &["-mod=readonly", "-trimpath"];

/// One Go module under `lab/tools` and the binaries built from it.
pub struct Module {
    /// Directory under `lab/tools`, and the name of its stamp.
    pub dir: &'static str,
    /// The module the binaries come from; its version is read from go.mod.
    pub upstream: &'static str,
    /// `(main package, binary name)` pairs.
    pub bins: &'static [(&'static str, &'static str)],
    /// `(path inside the upstream module, name under manifests/)`: files
    /// copied from the module as downloaded (verified against go.sum).
    pub files: &'static [(&'static str, &'static str)],
    /// Packages whose `gitVersion`, `gitMajor` and `gitMinor` are set with
    /// `-X` to the module's version, as Kubernetes' `hack/lib/version.sh`
    /// does; without them the binaries say `v0.0.0-master`.
    pub version_vars: &'static [&'static str],
    /// Variables set with `-X` to the module's version itself, as projects
    /// other than Kubernetes stamp theirs (helm's Makefile:
    /// `internal/version.version`).
    pub version_strings: &'static [&'static str],
    /// How long the first `cargo xtask setup` takes to build it on 2 cores:
    /// measured with an empty Go build cache, building the modules in the
    /// order of [`MODULES`] (later ones reuse packages of earlier ones).
    pub first_build: &'static str,
}

pub const MODULES: &[Module] = &[
    Module {
        dir: "etcd",
        upstream: "go.etcd.io/etcd/server/v3",
        bins: &[("go.etcd.io/etcd/server/v3", "etcd")],
        files: &[],
        version_vars: &[],
        version_strings: &[],
        first_build: "~2 minutes",
    },
    Module {
        dir: "kubernetes",
        upstream: "k8s.io/kubernetes",
        bins: &[
            ("k8s.io/kubernetes/cmd/kube-apiserver", "kube-apiserver"),
            (
                "k8s.io/kubernetes/cmd/kube-controller-manager",
                "kube-controller-manager",
            ),
            ("k8s.io/kubernetes/cmd/kube-proxy", "kube-proxy"),
            ("k8s.io/kubernetes/cmd/kubectl", "kubectl"),
        ],
        files: &[],
        version_vars: &[
            "k8s.io/client-go/pkg/version",
            "k8s.io/component-base/version",
        ],
        version_strings: &[],
        first_build: "~12 minutes",
    },
    Module {
        dir: "coredns",
        upstream: "github.com/coredns/coredns",
        bins: &[("github.com/coredns/coredns", "coredns")],
        files: &[],
        version_vars: &[],
        version_strings: &[],
        first_build: "~3 minutes",
    },
    Module {
        dir: "kube-network-policies",
        upstream: "sigs.k8s.io/kube-network-policies",
        bins: &[(
            "sigs.k8s.io/kube-network-policies/cmd",
            "kube-network-policies",
        )],
        files: &[],
        version_vars: &[],
        version_strings: &[],
        first_build: "~4 minutes",
    },
    Module {
        dir: "helm",
        upstream: "helm.sh/helm/v4",
        bins: &[("helm.sh/helm/v4/cmd/helm", "helm")],
        files: &[],
        version_vars: &[],
        version_strings: &["helm.sh/helm/v4/internal/version.version"],
        first_build: "~2 minutes",
    },
    Module {
        dir: "network-policy-api",
        upstream: "sigs.k8s.io/network-policy-api",
        bins: &[],
        // The standard channel is what most clusters install; the
        // experimental one adds the `nodes` and `domainNames` peers.
        files: &[
            (
                "config/crd/standard/policy.networking.k8s.io_clusternetworkpolicies.yaml",
                "network-policy-api/standard/clusternetworkpolicies.yaml",
            ),
            (
                "config/crd/experimental/policy.networking.k8s.io_clusternetworkpolicies.yaml",
                "network-policy-api/experimental/clusternetworkpolicies.yaml",
            ),
        ],
        version_vars: &[],
        version_strings: &[],
        first_build: "seconds (a module download)",
    },
];

impl Module {
    fn names(&self) -> String {
        self.bins
            .iter()
            .map(|(_, name)| *name)
            .chain(self.files.iter().map(|(_, name)| *name))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// `$NETPOL_TOOLS_DIR`, or `/var/cache/netpol/tools`. The binaries are in
/// its `bin/`.
pub fn tools_dir() -> PathBuf {
    match env::var_os(TOOLS_DIR_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(DEFAULT_TOOLS_DIR),
    }
}

/// Build every module whose stamp does not match or whose binaries are
/// missing. `verbose` also prints the modules that are up to date.
pub fn ensure(verbose: bool) -> Result<()> {
    ensure_only(verbose, &[])
}

/// [`ensure`] for the modules named by directory (every module when `only`
/// is empty): after changing one module, the others (which another
/// checkout may have built from other pins into the same
/// `$NETPOL_TOOLS_DIR`) are left alone.
pub fn ensure_only(verbose: bool, only: &[String]) -> Result<()> {
    if let Some(unknown) = only.iter().find(|m| !MODULES.iter().any(|x| x.dir == *m)) {
        let known: Vec<&str> = MODULES.iter().map(|m| m.dir).collect();
        bail!(
            "no module lab/tools/{unknown} (known: {})",
            known.join(", ")
        );
    }
    let modules_root = crate::workspace_root().join("lab/tools");
    let tools = tools_dir();
    let go = find_go(env::var_os("PATH").as_deref(), Path::new(FALLBACK_GO))
        .ok_or_else(|| anyhow::anyhow!(no_go_message()))?;
    for module in MODULES
        .iter()
        .filter(|m| only.is_empty() || only.iter().any(|o| o == m.dir))
    {
        let dir = modules_root.join(module.dir);
        let go_mod = fs::read(dir.join("go.mod"))
            .with_context(|| format!("reading {}", dir.join("go.mod").display()))?;
        let go_sum = fs::read(dir.join("go.sum"))
            .with_context(|| format!("reading {}", dir.join("go.sum").display()))?;
        let version = required_version(&String::from_utf8_lossy(&go_mod), module.upstream)
            .with_context(|| {
                format!(
                    "{} does not require {}",
                    dir.join("go.mod").display(),
                    module.upstream
                )
            })?;
        let toolchain = go_toolchain(&go, &dir)?;
        let flags = build_flags(module, &version);
        let key = cache_key(
            &toolchain,
            &flags,
            module.bins,
            module.files,
            &go_mod,
            &go_sum,
        );
        let stamp = fs::read_to_string(stamp_path(&tools, module)).ok();
        let stamp_ok = stamp_matches(stamp.as_deref(), &key);
        let bins_ok = module
            .bins
            .iter()
            .all(|(_, name)| tools.join("bin").join(name).is_file())
            && module
                .files
                .iter()
                .all(|(_, name)| tools.join("manifests").join(name).is_file());
        if stamp_ok && bins_ok {
            if verbose {
                let dir = if module.bins.is_empty() {
                    "manifests"
                } else {
                    "bin"
                };
                eprintln!(
                    "setup: {} ({} {version}) up to date in {}",
                    module.names(),
                    module.upstream,
                    tools.join(dir).display()
                );
            }
            continue;
        }
        let why = match (&stamp, stamp_ok) {
            (None, _) => "first build",
            (Some(_), false) => "go.mod, go.sum, Go or the build flags changed",
            (Some(_), true) => "a binary or file is missing",
        };
        eprintln!(
            "setup: {} {} from {} {version} ({why}; the first time takes {} on 2 cores)",
            if module.bins.is_empty() {
                "fetching"
            } else {
                "building"
            },
            module.names(),
            module.upstream,
            module.first_build,
        );
        let started = Instant::now();
        build(&go, &dir, &tools, module, &version, &flags)?;
        fs::create_dir_all(tools.join("stamps"))
            .with_context(|| format!("creating {}", tools.join("stamps").display()))?;
        write_atomically(
            &stamp_path(&tools, module),
            &stamp_contents(&key, &toolchain, module.upstream, &version),
        )?;
        eprintln!(
            "setup: built {} in {} s",
            module.names(),
            started.elapsed().as_secs()
        );
    }
    Ok(())
}

fn stamp_path(tools: &Path, module: &Module) -> PathBuf {
    tools.join("stamps").join(module.dir)
}

/// `go mod download`, then `go build` into a scratch directory next to
/// `bin/`, then rename each binary into `bin/`.
fn build(
    go: &Path,
    dir: &Path,
    tools: &Path,
    module: &Module,
    version: &str,
    flags: &[String],
) -> Result<()> {
    download(go, dir, module, version)?;
    copy_files(go, dir, tools, module, version)?;
    if module.bins.is_empty() {
        return Ok(());
    }

    let scratch = tools
        .join("tmp")
        .join(format!("{}.{}", module.dir, std::process::id()));
    remove_dir_if_exists(&scratch)?;
    fs::create_dir_all(&scratch).with_context(|| {
        format!(
            "creating {} (set {TOOLS_DIR_ENV} to a writable directory, or run as root)",
            scratch.display()
        )
    })?;
    let mut out_dir = scratch.clone().into_os_string();
    out_dir.push("/");
    let status = Command::new(go)
        .current_dir(dir)
        .arg("build")
        .args(flags)
        .arg("-o")
        .arg(&out_dir)
        .args(module.bins.iter().map(|(pkg, _)| pkg))
        .status()
        .with_context(|| format!("starting {}", go.display()))?;
    if !status.success() {
        remove_dir_if_exists(&scratch)?;
        bail!(
            "go build of {} from {} {version} failed with {status} (go's errors are above)",
            module.names(),
            module.upstream
        );
    }

    // From here the old stamp no longer describes bin/: if we stop halfway,
    // the next run rebuilds.
    match fs::remove_file(stamp_path(tools, module)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(e).context("removing the old stamp");
        }
        _ => {}
    }
    let bin = tools.join("bin");
    fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
    for (pkg, name) in module.bins {
        let built = scratch.join(go_exec_name(pkg));
        fs::rename(&built, bin.join(name)).with_context(|| {
            format!("moving {} to {}", built.display(), bin.join(name).display())
        })?;
    }
    remove_dir_if_exists(&scratch)
}

/// Copies the module's `files` from the module cache (where `go mod
/// download` put them, checked against go.sum) into `manifests/`, each
/// through a temporary file renamed into place.
fn copy_files(go: &Path, dir: &Path, tools: &Path, module: &Module, version: &str) -> Result<()> {
    if module.files.is_empty() {
        return Ok(());
    }
    let out = Command::new(go)
        .current_dir(dir)
        .args(["list", "-m", "-f", "{{.Dir}}", module.upstream])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {}", go.display()))?;
    if !out.status.success() {
        bail!(
            "go list -m {} failed in lab/tools/{}:\n{}",
            module.upstream,
            module.dir,
            tail(&String::from_utf8_lossy(&out.stderr), 15)
        );
    }
    let module_dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    for (src, name) in module.files {
        let from = module_dir.join(src);
        let to = tools.join("manifests").join(name);
        let contents = fs::read_to_string(&from).with_context(|| {
            format!(
                "reading {} from {} {version} (did the file move upstream?)",
                from.display(),
                module.upstream
            )
        })?;
        let parent = to.parent().expect("a file under manifests/");
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        write_atomically(&to, &contents)?;
        eprintln!(
            "setup: {} <- {} {version}:{src}",
            to.display(),
            module.upstream
        );
    }
    Ok(())
}

/// `go mod download` with go's stderr kept, to say what went wrong.
fn download(go: &Path, dir: &Path, module: &Module, version: &str) -> Result<()> {
    let out = Command::new(go)
        .current_dir(dir)
        .args(["mod", "download"])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {}", go.display()))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail = tail(&stderr, 15);
    let what = format!("{} {version} (lab/tools/{})", module.upstream, module.dir);
    match classify_download_failure(&stderr) {
        DownloadFailure::Network => {
            let proxy = Command::new(go)
                .current_dir(dir)
                .args(["env", "GOPROXY"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_default();
            bail!(
                "the Go module proxy (GOPROXY={proxy}) is unreachable: downloading the modules \
                 of {what} failed. Check the network or set GOPROXY to a proxy you can reach.\n\
                 go mod download said:\n{tail}"
            )
        }
        DownloadFailure::Checksum => bail!(
            "a module downloaded for {what} does not match its go.sum: go.sum is authoritative, \
             so do not update it to make this pass; find out why the proxy serves other bytes.\n\
             go mod download said:\n{tail}"
        ),
        DownloadFailure::Other => bail!(
            "go mod download failed for {what} with {}:\n{tail}",
            out.status
        ),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum DownloadFailure {
    /// The proxy (or the origin behind `direct`) could not be reached.
    Network,
    /// What was downloaded does not match go.sum or the checksum database.
    Checksum,
    Other,
}

fn classify_download_failure(stderr: &str) -> DownloadFailure {
    const NETWORK: &[&str] = &[
        "dial tcp",
        "no such host",
        "connection refused",
        "connection reset",
        "network is unreachable",
        "i/o timeout",
        "TLS handshake timeout",
        "proxyconnect",
        "server misbehaving",
        "Client.Timeout exceeded",
    ];
    if stderr.contains("checksum mismatch") || stderr.contains("SECURITY ERROR") {
        DownloadFailure::Checksum
    } else if NETWORK.iter().any(|m| stderr.contains(m)) {
        DownloadFailure::Network
    } else {
        DownloadFailure::Other
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The first `go` on `path`, else `fallback` if it exists.
fn find_go(path: Option<&OsStr>, fallback: &Path) -> Option<PathBuf> {
    path.into_iter()
        .flat_map(env::split_paths)
        .map(|dir| dir.join("go"))
        .chain([fallback.to_path_buf()])
        .find(|candidate| candidate.is_file())
}

fn no_go_message() -> String {
    let arch = match env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    format!(
        "no Go toolchain: `go` is not on PATH and {FALLBACK_GO} does not exist.\n\
         The lab's test tools (etcd, kube-apiserver, coredns, ...) are built from the Go modules \
         in lab/tools, which need Go >= {}.{} (tested with {TESTED_GO}). Install one of:\n  \
         - Go {TESTED_GO} from go.dev, into /usr/local/go:\n      \
         curl -fsSL https://go.dev/dl/go{TESTED_GO}.linux-{arch}.tar.gz | tar -C /usr/local -xz\n  \
         - Debian's golang-go if it is Go >= 1.21 (Debian 13 has 1.24; Debian 12's 1.19 is too \
         old): `apt-get install golang-go`. With GOTOOLCHAIN=auto it then fetches Go 1.26 from \
         the Go module proxy (golang.org/toolchain) the first time it builds these modules.\n\
         Then run `cargo xtask setup` again.",
        MIN_GO.0, MIN_GO.1
    )
}

/// What builds in `dir`: `go env` run there, so a toolchain switch by
/// GOTOOLCHAIN is seen; checked against [`MIN_GO`]. Returns e.g.
/// `go1.26.8 linux/amd64 cgo=1`, which goes into the cache key.
fn go_toolchain(go: &Path, dir: &Path) -> Result<String> {
    let out = Command::new(go)
        .current_dir(dir)
        .args(["env", "GOVERSION", "GOOS", "GOARCH", "CGO_ENABLED"])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {}", go.display()))?;
    if !out.status.success() {
        bail!(
            "`{} env` in {} failed (the modules need Go >= {}.{}):\n{}\n{}",
            go.display(),
            dir.display(),
            MIN_GO.0,
            MIN_GO.1,
            tail(&String::from_utf8_lossy(&out.stderr), 15),
            no_go_message()
                .split_once('\n')
                .map_or("", |(_, advice)| advice)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let fields: Vec<&str> = stdout.lines().map(str::trim).collect();
    let [version, os, arch, cgo] = fields[..] else {
        bail!("unexpected output of `go env`: {stdout:?}");
    };
    match parse_go_version(version) {
        Some(v) if v >= MIN_GO => Ok(format!("{version} {os}/{arch} cgo={cgo}")),
        _ => bail!(
            "{} is {version}; the modules in lab/tools need Go >= {}.{}.\n{}",
            go.display(),
            MIN_GO.0,
            MIN_GO.1,
            no_go_message()
                .split_once('\n')
                .map_or("", |(_, advice)| advice)
        ),
    }
}

/// `go1.26.8` -> (1, 26); also `go1.27rc1` and `devel go1.27-abcdef`.
fn parse_go_version(version: &str) -> Option<(u32, u32)> {
    let rest = &version[version.find("go1.")? + 2..];
    let (major, rest) = rest.split_once('.')?;
    let minor: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// The version `go_mod` requires of `module` (`require m v` or inside a
/// `require (...)` block).
fn required_version(go_mod: &str, module: &str) -> Option<String> {
    let mut in_block = false;
    for line in go_mod.lines() {
        let line = line.split("//").next().unwrap_or("").trim();
        let entry = if in_block {
            if line == ")" {
                in_block = false;
                continue;
            }
            line
        } else if line == "require (" {
            in_block = true;
            continue;
        } else if let Some(entry) = line.strip_prefix("require ") {
            entry
        } else {
            continue;
        };
        let mut words = entry.split_whitespace();
        if words.next() == Some(module) {
            return words.next().map(str::to_owned);
        }
    }
    None
}

/// The name `go build -o dir/` gives the binary of `pkg` (Go's
/// `load.DefaultExecName`): the last path element, or the one before it when
/// that is a major version suffix (`go.etcd.io/etcd/server/v3` -> `server`).
fn go_exec_name(pkg: &str) -> &str {
    let (parent, last) = pkg.rsplit_once('/').unwrap_or(("", pkg));
    let is_major = last.len() >= 2
        && last.starts_with('v')
        && last[1..].bytes().all(|b| b.is_ascii_digit())
        && !last[1..].starts_with('0')
        && last != "v1";
    if is_major && !parent.is_empty() {
        parent.rsplit('/').next().unwrap_or(parent)
    } else {
        last
    }
}

/// The flags of `go build` for `module` at `version` (from its go.mod).
/// Part of the cache key, so changing them rebuilds.
fn build_flags(module: &Module, version: &str) -> Vec<String> {
    let mut ldflags = String::from("-ldflags=-s -w");
    if let Some((major, minor)) = major_minor(version) {
        for pkg in module.version_vars {
            for (var, value) in [
                ("gitVersion", version),
                ("gitMajor", major),
                ("gitMinor", minor),
            ] {
                ldflags.push_str(&format!(" -X {pkg}.{var}={value}"));
            }
        }
    }
    for var in module.version_strings {
        ldflags.push_str(&format!(" -X {var}={version}"));
    }
    BUILD_FLAGS
        .iter()
        .map(|f| (*f).to_owned())
        .chain([ldflags])
        .collect()
}

/// `v1.37.2` -> ("1", "37").
fn major_minor(version: &str) -> Option<(&str, &str)> {
    let mut parts = version.strip_prefix('v')?.split('.');
    Some((parts.next()?, parts.next()?))
}

/// The cache key of a module's build: FNV-1a (64 bits) of everything the
/// binaries depend on, each field length-prefixed so that no two inputs
/// hash the same bytes.
fn cache_key(
    toolchain: &str,
    flags: &[String],
    bins: &[(&str, &str)],
    files: &[(&str, &str)],
    go_mod: &[u8],
    go_sum: &[u8],
) -> String {
    let mut hash = Fnv1a::new();
    hash.field(b"netpol lab/tools v1");
    hash.field(toolchain.as_bytes());
    for flag in flags {
        hash.field(flag.as_bytes());
    }
    for (pkg, name) in bins {
        hash.field(pkg.as_bytes());
        hash.field(name.as_bytes());
    }
    // Nothing for modules without files: their keys stay what they were.
    for (src, name) in files {
        hash.field(b"file");
        hash.field(src.as_bytes());
        hash.field(name.as_bytes());
    }
    hash.field(go_mod);
    hash.field(go_sum);
    format!("{:016x}", hash.0)
}

struct Fnv1a(u64);

impl Fnv1a {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    fn bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn field(&mut self, bytes: &[u8]) {
        self.bytes(&(bytes.len() as u64).to_le_bytes());
        self.bytes(bytes);
    }
}

/// A stamp: the key on the first line, then what was built, for people.
fn stamp_contents(key: &str, toolchain: &str, upstream: &str, version: &str) -> String {
    format!("{key}\n{upstream} {version}\nbuilt with {toolchain}\n")
}

fn stamp_matches(stamp: Option<&str>, key: &str) -> bool {
    stamp.and_then(|s| s.lines().next()).map(str::trim) == Some(key)
}

fn write_atomically(path: &Path, contents: &str) -> Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    fs::write(&tmp, contents).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming {} into place", tmp.display()))
}

fn remove_dir_if_exists(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BINS: &[(&str, &str)] = &[("k8s.io/kubernetes/cmd/kubectl", "kubectl")];
    /// The key of the inputs below before modules could name files.
    const KEY_BEFORE_FILES: &str = "30a509898775e7ec";

    fn flags() -> Vec<String> {
        build_flags(&MODULES[0], "v3.6.16")
    }

    #[test]
    fn build_flags_stamp_versions_only() {
        let etcd = &MODULES[0];
        assert_eq!(
            build_flags(etcd, "v3.6.16"),
            ["-mod=readonly", "-trimpath", "-ldflags=-s -w"],
            "go.sum is authoritative; no paths or symbols in the binaries"
        );
        let kubernetes = MODULES
            .iter()
            .find(|m| m.dir == "kubernetes")
            .expect("a kubernetes module");
        let flags = build_flags(kubernetes, "v1.37.2");
        let ldflags = flags.last().expect("-ldflags");
        for pkg in [
            "k8s.io/client-go/pkg/version",
            "k8s.io/component-base/version",
        ] {
            for x in [".gitVersion=v1.37.2", ".gitMajor=1", ".gitMinor=37"] {
                assert!(
                    ldflags.contains(&format!(" -X {pkg}{x}")),
                    "{ldflags} sets {pkg}{x}"
                );
            }
        }
        let helm = MODULES.iter().find(|m| m.dir == "helm").expect("helm");
        assert_eq!(
            build_flags(helm, "v4.3.2").last().map(String::as_str),
            Some("-ldflags=-s -w -X helm.sh/helm/v4/internal/version.version=v4.3.2"),
            "`helm version` says v4.3.2, as upstream's build does"
        );
    }

    #[test]
    fn cache_key_changes_with_each_input() {
        let base = cache_key(
            "go1.26.8 linux/amd64 cgo=1",
            &flags(),
            BINS,
            &[],
            b"mod",
            b"sum",
        );
        assert_eq!(
            base,
            cache_key(
                "go1.26.8 linux/amd64 cgo=1",
                &flags(),
                BINS,
                &[],
                b"mod",
                b"sum"
            ),
            "the key is stable"
        );
        let others = [
            cache_key(
                "go1.26.8 linux/amd64 cgo=1",
                &flags(),
                BINS,
                &[],
                b"mod",
                b"sum2",
            ),
            cache_key(
                "go1.26.8 linux/amd64 cgo=1",
                &flags(),
                BINS,
                &[],
                b"mod2",
                b"sum",
            ),
            cache_key(
                "go1.26.9 linux/amd64 cgo=1",
                &flags(),
                BINS,
                &[],
                b"mod",
                b"sum",
            ),
            cache_key(
                "go1.26.8 linux/amd64 cgo=0",
                &flags(),
                BINS,
                &[],
                b"mod",
                b"sum",
            ),
            cache_key(
                "go1.26.8 linux/amd64 cgo=1",
                &["-ldflags=-s".to_owned()],
                BINS,
                &[],
                b"mod",
                b"sum",
            ),
            cache_key(
                "go1.26.8 linux/amd64 cgo=1",
                &flags(),
                &[("k8s.io/kubernetes/cmd/kubectl", "kctl")],
                &[],
                b"mod",
                b"sum",
            ),
            cache_key(
                "go1.26.8 linux/amd64 cgo=1",
                &flags(),
                BINS,
                &[("config/crd.yaml", "crd.yaml")],
                b"mod",
                b"sum",
            ),
            // Moving bytes from go.mod to go.sum is a different input.
            cache_key(
                "go1.26.8 linux/amd64 cgo=1",
                &flags(),
                BINS,
                &[],
                b"mo",
                b"dsum",
            ),
        ];
        for other in others {
            assert_ne!(base, other, "a changed input must change the key");
        }
    }

    #[test]
    fn modules_without_files_keep_their_keys() {
        // Pinned: adding `files` must not rebuild the Go tools.
        assert_eq!(
            cache_key(
                "go1.26.8 linux/amd64 cgo=1",
                &flags(),
                BINS,
                &[],
                b"mod",
                b"sum"
            ),
            KEY_BEFORE_FILES,
        );
    }

    #[test]
    fn cache_key_is_fnv1a_of_length_prefixed_fields() {
        // FNV-1a's published test vectors, so the key never changes by accident.
        let mut h = Fnv1a::new();
        h.bytes(b"");
        assert_eq!(h.0, 0xcbf2_9ce4_8422_2325);
        let mut h = Fnv1a::new();
        h.bytes(b"a");
        assert_eq!(h.0, 0xaf63_dc4c_8601_ec8c);
        let mut h = Fnv1a::new();
        h.bytes(b"foobar");
        assert_eq!(h.0, 0x8594_4171_f739_67e8);
    }

    #[test]
    fn stamp_matches_only_its_key() {
        let key = cache_key(
            "go1.26.8 linux/amd64 cgo=1",
            &flags(),
            BINS,
            &[],
            b"mod",
            b"sum",
        );
        let stamp = stamp_contents(&key, "go1.26.8", "k8s.io/kubernetes", "v1.37.2");
        assert!(stamp_matches(Some(&stamp), &key));
        let other = cache_key(
            "go1.26.8 linux/amd64 cgo=1",
            &flags(),
            BINS,
            &[],
            b"mod",
            b"sum2",
        );
        assert!(!stamp_matches(Some(&stamp), &other), "go.sum changed");
        assert!(!stamp_matches(None, &key), "no stamp: never built");
        assert!(!stamp_matches(Some(""), &key), "empty stamp");
        assert!(
            !stamp_matches(Some(&format!("x{key}\n")), &key),
            "only the exact key"
        );
    }

    #[test]
    fn exec_names_follow_go() {
        assert_eq!(go_exec_name("k8s.io/kubernetes/cmd/kubectl"), "kubectl");
        assert_eq!(go_exec_name("go.etcd.io/etcd/server/v3"), "server");
        assert_eq!(go_exec_name("github.com/coredns/coredns"), "coredns");
        assert_eq!(go_exec_name("sigs.k8s.io/kube-network-policies/cmd"), "cmd");
        assert_eq!(
            go_exec_name("example.com/tool/v1"),
            "v1",
            "v1 is not a suffix"
        );
        assert_eq!(go_exec_name("example.com/tool/v0"), "v0");
        assert_eq!(go_exec_name("example.com/tool/v2x"), "v2x");
    }

    #[test]
    fn binary_names_are_the_contract() {
        let names: Vec<&str> = MODULES
            .iter()
            .flat_map(|m| m.bins.iter().map(|(_, name)| *name))
            .collect();
        assert_eq!(
            names,
            [
                "etcd",
                "kube-apiserver",
                "kube-controller-manager",
                "kube-proxy",
                "kubectl",
                "coredns",
                "kube-network-policies",
                "helm"
            ]
        );
    }

    #[test]
    fn every_module_requires_its_upstream_and_names_its_packages() {
        let root = crate::workspace_root().join("lab/tools");
        for m in MODULES {
            let go_mod = fs::read_to_string(root.join(m.dir).join("go.mod"))
                .unwrap_or_else(|e| panic!("lab/tools/{}/go.mod: {e}", m.dir));
            assert!(
                required_version(&go_mod, m.upstream).is_some(),
                "lab/tools/{}/go.mod must require {}",
                m.dir,
                m.upstream
            );
            let tools_go = fs::read_to_string(root.join(m.dir).join("tools.go"))
                .unwrap_or_else(|e| panic!("lab/tools/{}/tools.go: {e}", m.dir));
            for (pkg, _) in m.bins {
                assert!(
                    tools_go.contains(&format!("_ \"{pkg}\"")),
                    "lab/tools/{}/tools.go must import {pkg}, or go mod tidy drops its dependencies",
                    m.dir
                );
            }
        }
    }

    #[test]
    fn required_version_reads_single_lines_and_blocks() {
        let go_mod = "module x\n\ngo 1.26.0\n\nrequire k8s.io/kubernetes v1.37.2\n\n\
                      require (\n\tgithub.com/a/b v1.0.0 // indirect\n\tgo.etcd.io/etcd/server/v3 v3.6.16\n)\n\
                      replace k8s.io/api => k8s.io/api v0.37.2\n";
        assert_eq!(
            required_version(go_mod, "k8s.io/kubernetes").as_deref(),
            Some("v1.37.2")
        );
        assert_eq!(
            required_version(go_mod, "go.etcd.io/etcd/server/v3").as_deref(),
            Some("v3.6.16")
        );
        assert_eq!(
            required_version(go_mod, "k8s.io/api"),
            None,
            "replace is not require"
        );
        assert_eq!(required_version(go_mod, "github.com/a"), None);
    }

    #[test]
    fn no_go_says_what_to_install() {
        let message = no_go_message();
        assert!(message.contains(&format!("https://go.dev/dl/go{TESTED_GO}.linux-")));
        assert!(message.contains("tar -C /usr/local -xz"));
        assert!(message.contains("apt-get install golang-go"));
        assert!(message.contains("Go module proxy"));
    }

    #[test]
    fn go_versions() {
        assert_eq!(parse_go_version("go1.26.8"), Some((1, 26)));
        assert_eq!(parse_go_version("go1.26"), Some((1, 26)));
        assert_eq!(parse_go_version("go1.27rc1"), Some((1, 27)));
        assert_eq!(parse_go_version("devel go1.27-abcdef Tue"), Some((1, 27)));
        assert_eq!(parse_go_version("nonsense"), None);
        assert!(parse_go_version("go1.24.4").unwrap() < MIN_GO);
    }

    #[test]
    fn download_failures_are_told_apart() {
        let unreachable = "go: k8s.io/api@v0.37.2: Get \"https://proxy.golang.org/k8s.io/api/@v/v0.37.2.zip\": \
                           dial tcp 142.250.0.1:443: connect: connection refused";
        assert_eq!(
            classify_download_failure(unreachable),
            DownloadFailure::Network
        );
        let dns = "go: x@v1: Get \"https://proxy.golang.org/x/@v/v1.zip\": dial tcp: lookup proxy.golang.org: no such host";
        assert_eq!(classify_download_failure(dns), DownloadFailure::Network);
        let tampered = "verifying k8s.io/api@v0.37.2: checksum mismatch\n\tdownloaded: h1:x\n\tgo.sum:     h1:y\n\nSECURITY ERROR";
        assert_eq!(
            classify_download_failure(tampered),
            DownloadFailure::Checksum
        );
        let missing = "go: example.com/x@v9.9.9: reading https://proxy.golang.org/example.com/x/@v/v9.9.9.zip: 404 Not Found";
        assert_eq!(classify_download_failure(missing), DownloadFailure::Other);
    }

    #[test]
    fn go_is_found_on_path_then_at_the_fallback() {
        let dir = env::temp_dir().join(format!("netpol-gotools-test-{}", std::process::id()));
        let (a, b) = (dir.join("a"), dir.join("b"));
        fs::create_dir_all(&a).expect("creating a test dir");
        fs::create_dir_all(&b).expect("creating a test dir");
        fs::write(b.join("go"), "").expect("writing a fake go");
        let fallback = dir.join("fallback-go");
        let path = env::join_paths([&a, &b]).expect("joining test paths");
        assert_eq!(find_go(Some(&path), &fallback), Some(b.join("go")));
        let only_a = env::join_paths([&a]).expect("joining test paths");
        assert_eq!(find_go(Some(&only_a), &fallback), None);
        fs::write(&fallback, "").expect("writing a fake fallback go");
        assert_eq!(find_go(Some(&only_a), &fallback), Some(fallback.clone()));
        assert_eq!(find_go(None, &fallback), Some(fallback));
        fs::remove_dir_all(&dir).expect("removing the test dir");
    }
}
