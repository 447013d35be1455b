//! Pods created while the agent is away, set up through the chained CNI
//! plugin `netpol-cni` the way a runtime does (CNI ADD with the first
//! plugin's result as prevResult, before the container starts): denied from
//! their first packet (the `no_endpoint` drop counter moves), and enforced per
//! policy once the agent returns and adopts the plugin's links. Where netpol
//! is not installed the plugin passes the result through. Needs root and the
//! `netpol-cni` binary (`NETPOL_CNI_BIN`, or built next to this test:
//! `cargo build -p netpol-cni`); skips loudly without root, fails under CI.

use std::{
    collections::BTreeMap,
    ffi::CString,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use netpol_common::{DIR_EGRESS, DIR_INGRESS, REASON_NO_ENDPOINT, counter_index, map_names};
use netpol_lab::{
    AddPodOptions, Agents, Lab, LabState, PodSpec, PortSpec, Protocol, agents::agent_paths,
    cni::cni_exe, connect, fixtures, require_privileges, start_agents,
};

mod common {
    pub mod lab;
}

use common::lab::{AGENT, write_policy};

const PORTS: &str = "[{port: 80, protocol: TCP}]";

/// x is ingress-isolated; x's pods labelled pod=a take TCP 80 from y/a only.
const POLICIES: [(&str, &str); 2] = [
    ("deny-all.yaml", fixtures::DENY_ALL_X),
    ("allow-ya.yaml", fixtures::ALLOW_YA_TO_XA_80),
];

fn plugin() -> PathBuf {
    cni_exe().unwrap_or_else(|e| panic!("netpol-cni: {e}"))
}

fn apply_policies(lab: &LabState, agents: &mut Agents) {
    agents
        .change(
            || {
                for (f, y) in POLICIES {
                    write_policy(lab, f, y);
                }
            },
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("{e}"));
}

/// A pod in x on `node`, labelled pod=`label`, serving TCP 80.
fn x_pod(name: &str, node: &str, label: &str) -> PodSpec {
    PodSpec {
        namespace: "x".into(),
        name: name.into(),
        node: node.into(),
        labels: BTreeMap::from([("pod".to_string(), label.to_string())]),
        ports: vec![PortSpec {
            name: None,
            port: 80,
            protocol: Protocol::Tcp,
        }],
    }
}

fn connects(lab: &LabState, from: (&str, &str), to: (&str, &str)) -> bool {
    let to = lab.pod(to.0, to.1).expect("to pod").ip_v4;
    connects_ip(lab, from, IpAddr::V4(to))
}

fn connects_ip(lab: &LabState, from: (&str, &str), to: IpAddr) -> bool {
    let from = lab.pod(from.0, from.1).expect("from pod");
    connect(lab, from, to, 80, Protocol::Tcp, Duration::from_millis(500))
}

/// The ifindex of `dev` in `node`'s netns.
fn ifindex(lab: &LabState, node: &str, dev: &str) -> u32 {
    let path = lab.node(node).expect("node").netns_path();
    let dev = CString::new(dev).unwrap();
    // SAFETY: if_nametoindex reads a valid C string.
    let i = netpol_lab::run_in_netns(&path, || Ok(unsafe { libc::if_nametoindex(dev.as_ptr()) }))
        .expect("enter node netns");
    assert_ne!(i, 0, "no {dev:?} on {node}");
    i
}

/// (link id, program id) of a pinned link.
fn link_info(pin: &Path) -> (u32, u32) {
    let link = aya::programs::links::PinnedLink::from_pin(pin)
        .unwrap_or_else(|e| panic!("{}: {e}", pin.display()));
    let info = aya::programs::links::FdLink::from(link)
        .info()
        .expect("link info");
    (info.id(), info.program_id())
}

/// Packets dropped because their veth has no endpoint, both directions,
/// summed over CPUs, from the pinned counters map.
fn no_endpoint_drops(bpffs_root: &Path) -> u64 {
    use aya::maps::{Map, MapData, PerCpuArray};
    let data = MapData::from_pin(bpffs_root.join("maps").join(map_names::COUNTERS))
        .expect("pinned counters map");
    let counters: PerCpuArray<_, u64> =
        PerCpuArray::try_from(Map::PerCpuArray(data)).expect("per-CPU array");
    [DIR_INGRESS, DIR_EGRESS]
        .iter()
        .map(|d| {
            counters
                .get(&counter_index(*d, REASON_NO_ENDPOINT), 0)
                .expect("counter")
                .iter()
                .sum::<u64>()
        })
        .sum()
}

/// Probes `to` from `from` until stopped; counts tries and connections
/// that got through.
struct Prober {
    stop: Arc<AtomicBool>,
    tries: Arc<AtomicU64>,
    leaks: Arc<AtomicU64>,
    handle: std::thread::JoinHandle<()>,
}

impl Prober {
    fn start(lab: &LabState, from: (&str, &str), to: IpAddr) -> Self {
        let lab = lab.clone();
        let from = lab.pod(from.0, from.1).expect("from pod").clone();
        let stop = Arc::new(AtomicBool::new(false));
        let (tries, leaks) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (s, t, l) = (stop.clone(), tries.clone(), leaks.clone());
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                t.fetch_add(1, Ordering::Relaxed);
                if connect(
                    &lab,
                    &from,
                    to,
                    80,
                    Protocol::Tcp,
                    Duration::from_millis(100),
                ) {
                    l.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Self {
            stop,
            tries,
            leaks,
            handle,
        }
    }

    /// (tries, leaks)
    fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("prober thread");
        (
            self.tries.load(Ordering::Relaxed),
            self.leaks.load(Ordering::Relaxed),
        )
    }
}

/// Kill -9 every agent.
fn kill_all(agents: &mut Agents) {
    for a in &mut agents.agents {
        a.kill();
    }
}

/// Start every agent again and wait until each has synced.
fn restart_all(lab: &LabState, agents: &mut Agents) {
    for a in &mut agents.agents {
        a.restart(lab).expect("restart agent");
    }
    agents
        .wait_synced(&[], Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Tries `f` until it holds or `timeout` passes; how long it took.
fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if f() {
            return Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// The agents' flow-log lines that mention `ip` (for failure messages).
fn flows_of(agents: &Agents, ip: &str) -> String {
    agents
        .flow_logs()
        .into_iter()
        .filter(|(line, _)| line.contains(ip))
        .map(|(line, _)| line)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The plugin's log for `node`.
fn plugin_log(lab: &LabState, node: &str) -> String {
    let node = lab.node(node).expect("node");
    let cni = netpol_lab::cni::PodCni::new(lab, node, Path::new("netpol-cni"));
    std::fs::read_to_string(&cni.log_file).unwrap_or_default()
}

/// With every agent killed, x/new (pod=a) is added on node-a through
/// netpol-cni while y/a probes its address: no probe gets through, its own
/// egress is dropped too, and the no_endpoint counter moves. The links the
/// plugin pinned carry the killed agent's programs. A control pod added
/// without the plugin at the same time is reachable (the gap the plugin
/// closes, and proof that the probe sees a leak). Once the agents return,
/// they adopt the plugin's links and the policy decides: y/a may reach
/// x/new, y/b may not, and x/new's egress (not isolated) flows. Removing
/// the pod runs CNI DEL: its link pins go, and a second DEL succeeds.
#[test]
fn pod_added_through_cni_while_agent_is_down_is_denied_until_it_returns() {
    let test = "pod_added_through_cni_while_agent_is_down_is_denied_until_it_returns";
    if !require_privileges(test) {
        return;
    }
    let plugin = plugin();
    let mut lab = common::lab::up('n', PORTS);
    let mut agents = start_agents(&lab, Path::new(AGENT), &[]).expect("start agents");
    apply_policies(&lab, &mut agents);
    let root = agents.node("node-a").bpffs_root.clone();
    kill_all(&mut agents);

    let new_ip: IpAddr = "10.244.1.50".parse().unwrap();
    let prober = Prober::start(&lab, ("y", "a"), new_ip);
    std::thread::sleep(Duration::from_millis(200));
    let drops_before = no_endpoint_drops(&root);
    let pod = lab
        .add_pod(
            x_pod("new", "node-a", "a"),
            &AddPodOptions {
                ip_v4: Some("10.244.1.50".parse().unwrap()),
                cni: Some(plugin.clone()),
                ..AddPodOptions::default()
            },
        )
        .expect("add x/new through netpol-cni");
    assert!(pod.cni.is_some(), "the lab recorded the plugin");

    // The plugin pinned both links on the new veth, with the programs the
    // killed agent left running on the other veths.
    let veth = ifindex(&lab, "node-a", &pod.host_veth);
    let links = root.join("links");
    let mut plugin_links = BTreeMap::new();
    for hook in ["from_pod", "to_pod"] {
        let pin = links.join(format!("{veth}-{hook}"));
        assert!(pin.exists(), "netpol-cni did not pin {}", pin.display());
        let (link_id, prog) = link_info(&pin);
        let other = std::fs::read_dir(&links)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                let n = p.file_name().unwrap().to_string_lossy().into_owned();
                n.ends_with(&format!("-{hook}")) && !n.starts_with(&format!("{veth}-"))
            })
            .expect("another pod's link");
        assert_eq!(
            prog,
            link_info(&other).1,
            "{hook}: the plugin attached the agent's program"
        );
        plugin_links.insert(hook, link_id);
    }
    assert!(
        plugin_log(&lab, "node-a").contains("attached the agent's running programs"),
        "{}",
        plugin_log(&lab, "node-a")
    );
    let prev = netpol_lab::cni::prev_result(lab.node("node-a").unwrap(), &pod).unwrap();
    netpol_lab::cni::invoke(
        pod.cni.as_ref().unwrap(),
        lab.node("node-a").unwrap(),
        &pod,
        "CHECK",
        Some(&prev),
    )
    .expect("CNI CHECK: attached");

    // Denied while the agent is away, both ways, from the first packet.
    assert!(
        !connects(&lab, ("y", "a"), ("x", "new")),
        "y/a reached x/new with no agent"
    );
    assert!(
        !connects(&lab, ("x", "new"), ("y", "b")),
        "x/new's traffic left with no agent"
    );
    let (tries, leaks) = prober.stop();
    assert!(tries > 3, "x/new's address was probed ({tries} tries)");
    assert_eq!(leaks, 0, "{leaks} of {tries} probes reached x/new");
    let drops = no_endpoint_drops(&root) - drops_before;
    assert!(drops > 0, "the no_endpoint counter did not move");

    // Control: without the plugin, a pod added now runs unenforced.
    lab.add_pod(
        x_pod("ctl", "node-a", "ctl"),
        &AddPodOptions {
            ip_v4: Some("10.244.1.51".parse().unwrap()),
            ..AddPodOptions::default()
        },
    )
    .expect("add x/ctl without the plugin");
    assert!(
        connects(&lab, ("y", "b"), ("x", "ctl")),
        "control: a pod added without netpol-cni while the agent is down is reachable"
    );

    // The agents return: they adopt the plugin's links and enforce policy.
    restart_all(&lab, &mut agents);
    for hook in ["from_pod", "to_pod"] {
        let (link_id, _) = link_info(&links.join(format!("{veth}-{hook}")));
        assert_eq!(
            link_id, plugin_links[hook],
            "{hook}: the agent kept the plugin's link"
        );
    }
    // The pod's neighbour entries failed while its ARP was dropped with the
    // rest of its traffic; the first connection may wait for them.
    let allowed_after = eventually(Duration::from_secs(5), || {
        connects(&lab, ("y", "a"), ("x", "new"))
    });
    assert!(
        allowed_after.is_some(),
        "y/a never reached x/new once the agent knew it; flow logs:\n{}",
        flows_of(&agents, "10.244.1.50")
    );
    assert!(
        !connects(&lab, ("y", "b"), ("x", "new")),
        "y/b denied by x's policies"
    );
    assert!(
        eventually(Duration::from_secs(5), || connects(
            &lab,
            ("x", "new"),
            ("y", "b")
        ))
        .is_some(),
        "x/new's egress is not isolated"
    );
    assert!(
        !connects(&lab, ("y", "b"), ("x", "ctl")),
        "the control pod is enforced too now"
    );

    // CNI DEL takes the links off; a second DEL finds nothing and succeeds.
    let node = lab.node("node-a").unwrap().clone();
    lab.remove_pod("x", "new").expect("remove x/new (CNI DEL)");
    for hook in ["from_pod", "to_pod"] {
        assert!(
            !links.join(format!("{veth}-{hook}")).exists(),
            "CNI DEL left {veth}-{hook}"
        );
    }
    netpol_lab::cni::invoke(pod.cni.as_ref().unwrap(), &node, &pod, "DEL", None)
        .expect("a second CNI DEL succeeds");
    let add_line = plugin_log(&lab, "node-a")
        .lines()
        .find(|l| l.contains("carries netpol's programs"))
        .map(str::to_owned)
        .unwrap_or_default();
    eprintln!("[measure] netpol-cni ADD: {add_line}");
    eprintln!(
        "[measure] x/new denied from its first packet with the agent down: {tries} probes, \
         {drops} no_endpoint drops; allowed by policy {allowed_after:?} after the agents synced"
    );
}

/// A node with netpol's maps pinned but no link to take the programs from
/// (as before its first pod): the plugin loads the programs against the
/// pinned maps, and the pod is denied until the agent returns.
#[test]
fn cni_loads_the_programs_where_no_link_is_pinned() {
    let test = "cni_loads_the_programs_where_no_link_is_pinned";
    if !require_privileges(test) {
        return;
    }
    let plugin = plugin();
    let mut lab = common::lab::up('m', PORTS);
    let mut agents = start_agents(&lab, Path::new(AGENT), &[]).expect("start agents");
    apply_policies(&lab, &mut agents);
    let root = agents.node("node-a").bpffs_root.clone();
    kill_all(&mut agents);
    for e in std::fs::read_dir(root.join("links")).unwrap().flatten() {
        std::fs::remove_file(e.path()).unwrap();
    }

    let drops_before = no_endpoint_drops(&root);
    let pod = lab
        .add_pod(
            x_pod("new", "node-a", "a"),
            &AddPodOptions {
                cni: Some(plugin),
                ..AddPodOptions::default()
            },
        )
        .expect("add x/new through netpol-cni");
    let veth = ifindex(&lab, "node-a", &pod.host_veth);
    for hook in ["from_pod", "to_pod"] {
        assert!(root.join("links").join(format!("{veth}-{hook}")).exists());
    }
    let log = plugin_log(&lab, "node-a");
    let add_line = log
        .lines()
        .find(|l| l.contains("carries netpol's programs"))
        .unwrap_or_else(|| panic!("no ADD line in the plugin's log:\n{log}"));
    assert!(add_line.contains("loaded"), "{add_line}");
    eprintln!("[measure] netpol-cni ADD with no link pinned: {add_line}");
    assert!(!connects(&lab, ("y", "a"), ("x", "new")));
    assert!(no_endpoint_drops(&root) > drops_before);

    restart_all(&lab, &mut agents);
    assert!(
        eventually(Duration::from_secs(5), || connects(
            &lab,
            ("y", "a"),
            ("x", "new")
        ))
        .is_some(),
        "allowed once the agent knows x/new"
    );
    assert!(!connects(&lab, ("y", "b"), ("x", "new")));

    // CHECK fails once a link is gone (code 102: not attached).
    std::fs::remove_file(root.join("links").join(format!("{veth}-to_pod"))).unwrap();
    let node = lab.node("node-a").unwrap();
    let prev = netpol_lab::cni::prev_result(node, &pod).unwrap();
    let err = netpol_lab::cni::invoke(pod.cni.as_ref().unwrap(), node, &pod, "CHECK", Some(&prev))
        .expect_err("CHECK with a link missing");
    assert!(err.to_string().contains(r#""code":102"#), "{err}");
}

/// Without netpol on the node (no pinned maps), ADD answers with the
/// previous result unchanged (the lab checks that), creates nothing under
/// the bpffs root, says so in its log, and the pod is reachable; DEL passes
/// through too.
#[test]
fn cni_passes_through_where_netpol_is_not_installed() {
    let test = "cni_passes_through_where_netpol_is_not_installed";
    if !require_privileges(test) {
        return;
    }
    let plugin = plugin();
    let mut lab: Lab = common::lab::up('p', PORTS);
    let node = lab.node("node-b").unwrap().clone();
    let (root, _) = agent_paths(&lab, &node);
    assert!(!root.exists(), "{} exists before any agent", root.display());
    for node in ["node-a", "node-b"] {
        let name = format!("new-{node}");
        lab.add_pod(
            x_pod(&name, node, "a"),
            &AddPodOptions {
                cni: Some(plugin.clone()),
                ..AddPodOptions::default()
            },
        )
        .expect("add through netpol-cni without netpol");
        assert!(
            connects(&lab, ("y", "b"), ("x", &name)),
            "no netpol, no enforcement"
        );
        assert!(
            plugin_log(&lab, node).contains("netpol is not installed"),
            "{}",
            plugin_log(&lab, node)
        );
        lab.remove_pod("x", &name)
            .expect("remove (CNI DEL) without netpol");
    }
    assert!(!root.exists(), "the plugin created {}", root.display());
}

/// Programs attached on `dev`'s TCX hook in `node`'s netns.
fn tcx_programs(lab: &LabState, node: &str, dev: &str, ingress: bool) -> Vec<u32> {
    use aya::programs::{SchedClassifier, TcAttachType};
    let path = lab.node(node).expect("node").netns_path();
    let attach = if ingress {
        TcAttachType::Ingress
    } else {
        TcAttachType::Egress
    };
    netpol_lab::run_in_netns(&path, || {
        SchedClassifier::query_tcx(dev, attach)
            .map(|(_, progs)| progs.iter().map(|p| p.id()).collect())
            .map_err(std::io::Error::other)
    })
    .expect("query tcx")
}

/// With the agents running, the plugin and the agent both attach to a new
/// veth: whoever pins first wins and the other's link goes, so each hook
/// carries exactly one program, and the policy applies.
#[test]
fn cni_and_a_running_agent_leave_one_program_per_hook() {
    let test = "cni_and_a_running_agent_leave_one_program_per_hook";
    if !require_privileges(test) {
        return;
    }
    let plugin = plugin();
    let mut lab = common::lab::up('o', PORTS);
    let mut agents = start_agents(&lab, Path::new(AGENT), &[]).expect("start agents");
    apply_policies(&lab, &mut agents);
    for (node, name) in [("node-a", "new-a"), ("node-b", "new-b")] {
        let before = agents.revisions();
        let pod = lab
            .add_pod(
                x_pod(name, node, "a"),
                &AddPodOptions {
                    cni: Some(plugin.clone()),
                    ..AddPodOptions::default()
                },
            )
            .expect("add through netpol-cni with the agent running");
        agents
            .wait_synced(&before, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{e}"));
        for ingress in [true, false] {
            let progs = tcx_programs(&lab, node, &pod.host_veth, ingress);
            assert_eq!(
                progs.len(),
                1,
                "{node} {} ingress={ingress}: programs {progs:?}",
                pod.host_veth
            );
        }
        assert!(
            eventually(Duration::from_secs(5), || connects(
                &lab,
                ("y", "a"),
                ("x", name)
            ))
            .is_some(),
            "y/a may reach x/{name}"
        );
        assert!(!connects(&lab, ("y", "b"), ("x", name)), "y/b may not");
    }
}

fn sysctl_in(netns: &Path, key: &str, value: &str) {
    let path = Path::new("/proc/sys").join(key.replace('.', "/"));
    netpol_lab::run_in_netns(netns, || {
        std::fs::write(&path, value)?;
        std::fs::read_to_string(&path)
    })
    .map(|v| assert_eq!(v.trim(), value, "{key}"))
    .unwrap_or_else(|e| panic!("{key}={value} in {}: {e}", netns.display()));
}

/// While a pod's veth has no endpoint, its ARP is dropped with the rest of its traffic, so the
/// address resolution that ran meanwhile failed: node-a's entry for the pod (y/a dialling it)
/// and the pod's own entry for its gateway (its first connection out). Here the kernel's next
/// try is 30 s away (`retrans_time_ms`), so only the agent can resolve them in time: once it
/// knows the pod, it announces the pod's addresses (a gratuitous ARP) and asks again for the
/// pod's unresolved entries, from inside the pod's namespace. Both directions then work within
/// seconds of the sync. Before, each waited for the kernel's retry: 1 s by default
/// (`pod_start` measured 984 ms to the first allowed connection), 30 s here.
#[test]
fn a_newly_enforced_pods_failed_neighbour_entries_are_resolved_at_once() {
    let test = "a_newly_enforced_pods_failed_neighbour_entries_are_resolved_at_once";
    if !require_privileges(test) {
        return;
    }
    let plugin = plugin();
    let mut lab = common::lab::up('r', PORTS);
    let mut agents = start_agents(&lab, Path::new(AGENT), &[]).expect("start agents");
    apply_policies(&lab, &mut agents);
    kill_all(&mut agents);
    let node_a = lab.node("node-a").expect("node-a").netns_path();
    let pod = lab
        .add_pod(
            x_pod("slow", "node-a", "a"),
            &AddPodOptions {
                ip_v4: Some("10.244.1.52".parse().unwrap()),
                cni: Some(plugin),
                ..AddPodOptions::default()
            },
        )
        .expect("add x/slow through netpol-cni");
    // Set before anything is sent to or from the pod (a namespace other than the first has no
    // `neigh/default` to set beforehand).
    sysctl_in(
        &node_a,
        &format!("net.ipv4.neigh.{}.retrans_time_ms", pod.host_veth),
        "30000",
    );
    sysctl_in(
        &pod.netns_path(),
        "net.ipv4.neigh.eth0.retrans_time_ms",
        "30000",
    );
    // Both resolutions start, and fail, while the pod is unknown.
    assert!(
        !connects(&lab, ("y", "a"), ("x", "slow")),
        "denied: no agent knows x/slow"
    );
    assert!(
        !connects(&lab, ("x", "slow"), ("y", "b")),
        "x/slow's egress: no endpoint"
    );

    restart_all(&lab, &mut agents);
    let inbound = eventually(Duration::from_secs(8), || {
        connects(&lab, ("y", "a"), ("x", "slow"))
    });
    let outbound = eventually(Duration::from_secs(8), || {
        connects(&lab, ("x", "slow"), ("y", "b"))
    });
    eprintln!(
        "[measure] {test}: after the sync, y/a -> x/slow in {inbound:?}, x/slow -> y/b in {outbound:?}"
    );
    assert!(
        inbound.is_some(),
        "y/a (allowed) never reached x/slow: node-a's ARP entry for it stayed unresolved"
    );
    assert!(
        outbound.is_some(),
        "x/slow never reached y/b: its ARP entry for its gateway stayed unresolved"
    );
    assert!(
        !connects(&lab, ("y", "b"), ("x", "slow")),
        "y/b is still denied by x's policies"
    );
}
