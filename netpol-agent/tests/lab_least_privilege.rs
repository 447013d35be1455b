//! The least-privilege DaemonSet (`deploy/least-privilege/`) gives the agent
//! five capabilities instead of a privileged container. This test runs the
//! agent in the lab with exactly that set (a root process whose bounding set
//! holds only those, so its effective set is them and nothing else) and
//! checks that it loads, attaches (TCX and sk_lookup), reads bridged pods'
//! namespaces and enforces policy. Needs root; skips loudly without it.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use netpol_lab::{LabState, connect, require_privileges, start_agents};

mod common {
    pub mod lab;
}

use common::lab::{AGENT, write_policy};

const PORTS: &str = "[{port: 80, protocol: TCP}]";

/// The capabilities (lower case, without `CAP_`) and their numbers.
const CAPS: [(&str, u32); 5] = [
    ("bpf", 39),
    ("perfmon", 38),
    ("net_admin", 12),
    ("sys_admin", 21),
    ("sys_ptrace", 19),
];

fn overlay_caps() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/least-privilege/daemonset-capabilities.yaml");
    let doc: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&path).expect("the overlay's patch"))
            .expect("YAML");
    let sc = &doc["spec"]["template"]["spec"]["containers"][0]["securityContext"];
    assert_eq!(sc["privileged"], serde_yaml::Value::Bool(false), "{sc:?}");
    let drop: Vec<&str> = sc["capabilities"]["drop"]
        .as_sequence()
        .expect("drop")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(drop, ["ALL"]);
    sc["capabilities"]["add"]
        .as_sequence()
        .expect("add")
        .iter()
        .filter_map(|v| v.as_str())
        .map(|s| s.to_ascii_lowercase())
        .collect()
}

#[test]
fn the_overlay_grants_exactly_the_tested_capabilities() {
    let mut got = overlay_caps();
    got.sort();
    let mut want: Vec<String> = CAPS.iter().map(|(c, _)| c.to_string()).collect();
    want.sort();
    assert_eq!(got, want);
}

/// `setpriv` in front of the agent: the bounding set is the five
/// capabilities, so root's permitted and effective sets are too.
fn wrapper(dir: &Path) -> PathBuf {
    let agent = std::fs::canonicalize(AGENT).expect("agent binary");
    let caps: Vec<String> = CAPS.iter().map(|(c, _)| format!("+{c}")).collect();
    let path = dir.join("netpol-agent-least-privilege");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\nexec setpriv --bounding-set=-all,{} --inh-caps=-all -- {} \"$@\"\n",
            caps.join(","),
            agent.display()
        ),
    )
    .expect("write wrapper");
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

fn connects(lab: &LabState, from: (&str, &str), to: (&str, &str)) -> bool {
    let from = lab.pod(from.0, from.1).expect("from pod");
    let to = lab.pod(to.0, to.1).expect("to pod");
    connect(
        lab,
        from,
        to.ip_v4.into(),
        80,
        netpol_lab::Protocol::Tcp,
        Duration::from_millis(500),
    )
}

#[test]
fn the_agent_enforces_with_only_the_overlays_capabilities() {
    if !require_privileges("the_agent_enforces_with_only_the_overlays_capabilities") {
        return;
    }
    if which("setpriv").is_none() {
        panic!("setpriv (util-linux) is missing: the README's setup installs util-linux");
    }
    let dir = tempdir();
    let agent = wrapper(&dir);
    let lab = common::lab::up('l', PORTS);
    let mut agents = start_agents(&lab, &agent, &[]).expect("agents");
    agents
        .wait_synced(&[], Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));

    // Each agent runs with exactly the five capabilities.
    let want: u64 = CAPS.iter().map(|(_, bit)| 1u64 << bit).sum();
    for node in ["node-a", "node-b"] {
        let st = agents.node(node).status().expect("status");
        let pid = st["pid"].as_u64().expect("pid");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
        let eff = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .map(|h| u64::from_str_radix(h.trim(), 16).expect("hex"))
            .expect("CapEff");
        assert_eq!(eff, want, "{node}: CapEff {eff:#x}, want {want:#x}");
        assert!(
            st["errors"].as_array().is_none_or(|e| e.is_empty()),
            "{node}: {st}"
        );
    }

    // Enforcing: x is default-deny but for y/a to x/a; x/b is on the
    // bridged node (its addresses read inside its netns).
    assert!(connects(&lab, ("y", "b"), ("x", "a")), "open before policy");
    agents
        .change(
            || {
                write_policy(&lab, "deny-all.yaml", netpol_lab::fixtures::DENY_ALL_X);
                write_policy(
                    &lab,
                    "allow-ya.yaml",
                    "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
                     metadata: {name: allow-ya, namespace: x}\nspec:\n  podSelector: {}\n  \
                     ingress:\n    - from:\n        - namespaceSelector: {matchLabels: {ns: y}}\n          \
                     podSelector: {matchLabels: {pod: a}}\n",
                );
            },
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    for target in ["a", "b"] {
        assert!(
            connects(&lab, ("y", "a"), ("x", target)),
            "y/a -> x/{target} allowed"
        );
        assert!(
            !connects(&lab, ("y", "b"), ("x", target)),
            "y/b -> x/{target} denied"
        );
    }
    drop(agents);
    lab.down().expect("down");
    let _ = std::fs::remove_dir_all(&dir);
}

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(cmd))
            .find(|f| f.is_file())
    })
}

fn tempdir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("netpol-lp-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}
