//! `deploy/helm/netpol`, the Helm chart, rendered by the real helm (built by `cargo xtask
//! setup` from its Go module, like the lab's other tools):
//! - with default values it renders exactly the objects `kubectl kustomize deploy/` does,
//!   and with `leastPrivilege=true` those of `deploy/least-privilege/`, so the two ways of
//!   installing netpol cannot drift apart;
//! - values reach the objects, and every agent flag the chart writes is one the agent has;
//! - installed into the control-plane lab's API server (`helm template | kubectl apply`), in
//!   a namespace of its own, its ServiceAccount's token is enough for agents that enforce.
//!
//! The first two need the tools (skip loudly without them, fail under CI=true); the last also
//! needs root.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use netpol_lab::{
    AgentSource, LabState, Protocol, connect,
    controlplane::token_kubeconfig,
    cp_ops, fixtures, start_agents_with,
    tools::{require_tools, tool},
};

mod common {
    pub mod lab;
}

use common::lab::AGENT;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn chart() -> PathBuf {
    root().join("deploy/helm/netpol")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// `helm template netpol deploy/helm/netpol --namespace <ns> --set ...`.
fn helm_template(namespace: &str, sets: &[&str]) -> String {
    let mut cmd = Command::new(tool("helm").expect("helm"));
    cmd.args(["template", "netpol"])
        .arg(chart())
        .args(["--namespace", namespace]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    run(&mut cmd)
}

fn kustomize(dir: &str) -> String {
    run(Command::new(tool("kubectl").expect("kubectl"))
        .arg("kustomize")
        .arg(root().join(dir)))
}

/// The objects of a multi-document YAML stream, by (kind, name), as JSON.
fn objects(yaml: &str) -> BTreeMap<(String, String), serde_json::Value> {
    use serde::Deserialize as _;
    let mut out = BTreeMap::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let doc = serde_yaml::Value::deserialize(doc).expect("rendered YAML parses");
        if doc.is_null() {
            continue;
        }
        let json = serde_json::to_value(&doc).expect("YAML as JSON");
        let key = (
            json["kind"].as_str().expect("kind").to_owned(),
            json["metadata"]["name"].as_str().expect("name").to_owned(),
        );
        assert!(out.insert(key.clone(), json).is_none(), "{key:?} twice");
    }
    out
}

fn assert_same(chart: &str, kustomized: &str, what: &str) {
    let (c, k) = (objects(chart), objects(kustomized));
    assert_eq!(
        c.keys().collect::<Vec<_>>(),
        k.keys().collect::<Vec<_>>(),
        "{what}: the chart and kustomize render different objects"
    );
    for (key, kobj) in &k {
        assert_eq!(
            &c[key], kobj,
            "{what}: {key:?} differs between the chart (left) and kustomize (right)"
        );
    }
}

fn daemonset(yaml: &str) -> serde_json::Value {
    objects(yaml)
        .remove(&("DaemonSet".to_owned(), "netpol-agent".to_owned()))
        .expect("the DaemonSet")
}

#[test]
fn the_chart_renders_what_kustomize_applies() {
    if !require_tools(
        "the_chart_renders_what_kustomize_applies",
        &["helm", "kubectl"],
    ) {
        return;
    }
    assert_same(
        &helm_template("kube-system", &[]),
        &kustomize("deploy"),
        "default values vs deploy/",
    );
    assert_same(
        &helm_template("kube-system", &["leastPrivilege=true"]),
        &kustomize("deploy/least-privilege"),
        "leastPrivilege=true vs deploy/least-privilege/",
    );
    let lint = run(Command::new(tool("helm").expect("helm"))
        .arg("lint")
        .arg(chart())
        .arg("--strict"));
    assert!(lint.contains("0 chart(s) failed"), "{lint}");
}

#[test]
fn values_reach_the_rendered_objects() {
    if !require_tools("values_reach_the_rendered_objects", &["helm"]) {
        return;
    }
    let ds = daemonset(&helm_template(
        "netpol-system",
        &[
            "image.repository=registry.example/netpol",
            "image.tag=1.2.3",
            "agent.logAllowed=true",
            "agent.audit=true",
            "agent.maxPods=250",
            "agent.metricsPort=9970",
            "agent.bpffsRoot=/sys/fs/bpf/np",
            "agent.extraArgs={--flows-per-endpoint,32768}",
            "cni.enabled=false",
        ],
    ));
    assert_eq!(ds["metadata"]["namespace"], "netpol-system");
    let pod = &ds["spec"]["template"]["spec"];
    assert!(pod.get("initContainers").is_none(), "cni.enabled=false");
    let volumes: Vec<&str> = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .map(|v| v["name"].as_str().expect("name"))
        .collect();
    assert_eq!(volumes, ["bpffs", "netns", "state"]);
    let agent = &pod["containers"][0];
    assert_eq!(agent["image"], "registry.example/netpol:1.2.3");
    assert_eq!(agent["ports"][0]["containerPort"], 9970);
    let args: Vec<&str> = agent["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("string arg"))
        .collect();
    assert_eq!(
        args,
        [
            "run",
            "--node",
            "$(NODE_NAME)",
            "--source",
            "kube",
            "--metrics-addr",
            "0.0.0.0:9970",
            "--bpffs-root",
            "/sys/fs/bpf/np",
            "--log-allowed",
            "--audit",
            "--max-pods",
            "250",
            "--flows-per-endpoint",
            "32768"
        ]
    );
    // Every flag is one `netpol-agent run` has.
    let help = run(Command::new(AGENT).args(["run", "--help"]));
    for flag in args.iter().filter(|a| a.starts_with("--")) {
        assert!(help.contains(flag), "`run` has no {flag} option");
    }
    // With the plugin, the sidecar points it at the agent's bpffs root.
    let ds = daemonset(&helm_template(
        "netpol-system",
        &["agent.bpffsRoot=/sys/fs/bpf/np"],
    ));
    let cmd = &ds["spec"]["template"]["spec"]["initContainers"][0]["command"];
    let cmd: Vec<&str> = cmd
        .as_array()
        .expect("command")
        .iter()
        .map(|a| a.as_str().expect("string"))
        .collect();
    let i = cmd
        .iter()
        .position(|a| *a == "--bpffs-root")
        .expect("--bpffs-root");
    assert_eq!(cmd[i + 1], "/sys/fs/bpf/np");
}

const PORTS: &str = "[{port: 80, protocol: TCP}]";

fn connects(lab: &LabState, from: (&str, &str), to: (&str, &str)) -> bool {
    let to = lab.pod(to.0, to.1).expect("to pod").ip_v4;
    let from = lab.pod(from.0, from.1).expect("from pod");
    connect(
        lab,
        from,
        IpAddr::V4(to),
        80,
        Protocol::Tcp,
        Duration::from_millis(500),
    )
}

/// The chart applied to a real API server in a namespace of its own: the API server accepts
/// every object (the DaemonSet's native sidecar included), and agents holding a token of the
/// chart's ServiceAccount (bound to the chart's ClusterRole in that namespace) list and watch
/// what they need and enforce a policy applied afterwards.
#[test]
fn the_chart_installs_into_the_lab_and_its_agents_enforce() {
    const TEST: &str = "the_chart_installs_into_the_lab_and_its_agents_enforce";
    if !require_tools(TEST, &["helm"]) {
        return;
    }
    let Some(lab) = common::lab::control_plane_up(TEST, "hc", PORTS) else {
        return;
    };
    let cp = cp_ops::control_plane(&lab.name).unwrap_or_else(|e| panic!("{e}"));
    let kubectl = cp.kubectl().expect("kubectl");
    kubectl
        .run(&["create", "namespace", "netpol-system"], None)
        .unwrap_or_else(|e| panic!("{e}"));
    let rendered = helm_template("netpol-system", &[]);
    kubectl
        .run(&["apply", "-f", "-"], Some(&rendered))
        .unwrap_or_else(|e| panic!("kubectl apply of the chart: {e}"));
    let got = kubectl
        .run(
            &[
                "get",
                "daemonset",
                "netpol-agent",
                "--namespace=netpol-system",
                "-o",
                "jsonpath={.spec.template.spec.initContainers[0].restartPolicy}",
            ],
            None,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(got, "Always", "the API server kept the native sidecar");
    let kubeconfig = token_kubeconfig(&cp, "netpol-system", "netpol-agent", "1h")
        .unwrap_or_else(|e| panic!("a token of netpol-system/netpol-agent: {e}"));
    let started = Instant::now();
    let mut agents = start_agents_with(
        &lab,
        Path::new(AGENT),
        &AgentSource::Kube { kubeconfig },
        &["--metrics-addr".to_owned(), "127.0.0.1:9964".to_owned()],
    )
    .expect("start agents");
    agents
        .wait_synced(&[], Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("agents with the chart's ServiceAccount: {e}"));
    eprintln!(
        "[measure] {TEST}: agents synced {:.1?} after start",
        started.elapsed()
    );
    assert!(
        connects(&lab, ("y", "b"), ("x", "a")),
        "open before a policy"
    );
    let revisions = agents.revisions();
    cp_ops::apply(&cp, fixtures::DENY_ALL_X).unwrap_or_else(|e| panic!("kubectl apply: {e}"));
    agents
        .wait_synced(&revisions, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while connects(&lab, ("y", "b"), ("x", "a")) {
        assert!(
            Instant::now() < deadline,
            "x is default-deny, yet y/b still reaches x/a"
        );
    }
    assert!(connects(&lab, ("x", "a"), ("y", "b")), "x's egress is open");
}
