//! The Kubernetes test tools the control-plane lab runs (etcd, kube-apiserver,
//! kube-controller-manager, kube-proxy, kubectl, CoreDNS, kube-network-policies), built from
//! their Go modules by `cargo xtask setup` (see `lab/tools/README.md`).
//!
//! They live in `$NETPOL_TOOLS_DIR/bin` (default `/var/cache/netpol/tools/bin`); manifests taken
//! from Go modules (the ClusterNetworkPolicy CRD) in `$NETPOL_TOOLS_DIR/manifests`.

use std::path::PathBuf;

/// Default of `$NETPOL_TOOLS_DIR`.
pub const DEFAULT_TOOLS_DIR: &str = "/var/cache/netpol/tools";

/// A tool is not built.
#[derive(Debug, thiserror::Error)]
#[error(
    "{tool} is not installed at {path}: run `cargo xtask setup` (it builds the lab's Kubernetes \
     tools from their Go modules), or point NETPOL_TOOLS_DIR at a directory whose bin/ has it"
)]
pub struct MissingTool {
    pub tool: String,
    pub path: PathBuf,
}

/// `$NETPOL_TOOLS_DIR` or [`DEFAULT_TOOLS_DIR`].
pub fn tools_dir() -> PathBuf {
    std::env::var_os("NETPOL_TOOLS_DIR")
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_TOOLS_DIR), PathBuf::from)
}

/// The path of a built tool, or an error saying how to build it.
pub fn tool(name: &str) -> Result<PathBuf, MissingTool> {
    let path = tools_dir().join("bin").join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(MissingTool {
            tool: name.to_owned(),
            path,
        })
    }
}

/// The ClusterNetworkPolicy CRD of sigs.k8s.io/network-policy-api (experimental channel: it has
/// the `nodes` and `domainNames` peers), under `$NETPOL_TOOLS_DIR/manifests`.
pub const CNP_CRD: &str = "network-policy-api/experimental/clusternetworkpolicies.yaml";

/// The path of a manifest `cargo xtask setup` copied from a Go module, or an error saying how
/// to get it.
pub fn manifest(name: &str) -> Result<PathBuf, MissingTool> {
    let path = tools_dir().join("manifests").join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(MissingTool {
            tool: name.to_owned(),
            path,
        })
    }
}

/// [`require_tools`] for manifests ([`manifest`]).
pub fn require_manifests(test: &str, names: &[&str]) -> bool {
    require(
        test,
        names
            .iter()
            .filter_map(|n| manifest(n).err())
            .map(|e| e.to_string())
            .collect(),
    )
}

/// For tests that need the control-plane tools: true if they are all built. Otherwise prints a
/// loud `SKIPPED` line naming the test and what is missing and returns false, or, when
/// `CI=true`, panics: CI must run these tests (its setup builds the tools).
pub fn require_tools(test: &str, tools: &[&str]) -> bool {
    require(
        test,
        tools
            .iter()
            .filter_map(|t| tool(t).err())
            .map(|e| e.to_string())
            .collect(),
    )
}

fn require(test: &str, missing: Vec<String>) -> bool {
    if missing.is_empty() {
        return true;
    }
    let problem = missing.join("; ");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: {problem}; CI=true, so this test must run, not be skipped");
    }
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "\n==== SKIPPED {test}: {problem} ====\n");
    false
}

/// Every tool a control-plane lab runs.
pub const CONTROL_PLANE_TOOLS: &[&str] = &[
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-proxy",
    "kubectl",
    "coredns",
];
