//! The agent's lifecycle in a lab: kill -9 and restart without a gap,
//! SIGTERM keeps enforcing, `cleanup` removes it all, and pods that come and
//! go while agents run (a new pod's veth is denied until the agent knows the
//! pod). Needs root; skips loudly without it, fails under CI.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use netpol_lab::{
    AddPodOptions, LabState, PodSpec, PortSpec, Protocol, connect, require_privileges,
    start_agents, start_stream,
};

mod common {
    pub mod lab;
}

use common::lab::{AGENT, write_policy};

const PORTS: &str = "[{port: 80, protocol: TCP}]";

/// x is default-deny; y/a may reach x/a on the stream ports (TCP 9100,
/// UDP 9101) and on 80.
const POLICIES: [(&str, &str); 2] = [
    ("deny-all.yaml", netpol_lab::fixtures::DENY_ALL_X),
    (
        "allow-ya.yaml",
        netpol_lab::fixtures::ALLOW_YA_TO_XA_STREAMS,
    ),
];

/// Write [`POLICIES`] and wait until every agent enforces them.
fn apply_policies(lab: &LabState, agents: &mut netpol_lab::Agents) {
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

fn connects(lab: &LabState, from: (&str, &str), to: (&str, &str)) -> bool {
    let from = lab.pod(from.0, from.1).expect("from pod");
    let to = lab.pod(to.0, to.1).expect("to pod");
    connect(
        lab,
        from,
        IpAddr::V4(to.ip_v4),
        80,
        Protocol::Tcp,
        Duration::from_millis(500),
    )
}

/// Keeps trying a connection that policy denies until stopped; counts the
/// ones that got through.
struct DeniedProber {
    stop: Arc<AtomicBool>,
    leaks: Arc<AtomicU64>,
    tries: Arc<AtomicU64>,
    handle: std::thread::JoinHandle<()>,
}

impl DeniedProber {
    fn start(lab: &LabState, from: (&str, &str), to: (&str, &str)) -> Self {
        let lab = lab.clone();
        let (from, to) = (
            (from.0.to_string(), from.1.to_string()),
            (to.0.to_string(), to.1.to_string()),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let leaks = Arc::new(AtomicU64::new(0));
        let tries = Arc::new(AtomicU64::new(0));
        let (s, l, t) = (stop.clone(), leaks.clone(), tries.clone());
        let handle = std::thread::spawn(move || {
            let from = lab.pod(&from.0, &from.1).expect("from").clone();
            let to = lab.pod(&to.0, &to.1).expect("to").clone();
            while !s.load(Ordering::Relaxed) {
                t.fetch_add(1, Ordering::Relaxed);
                if connect(
                    &lab,
                    &from,
                    IpAddr::V4(to.ip_v4),
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
            leaks,
            tries,
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

/// Pinned links of pod veths (`<ifindex>-from_pod`, `<ifindex>-to_pod`): not
/// the node devices' `post_nat` links nor the netns's sk_lookup link.
fn pod_links(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.ends_with("-from_pod") || name.ends_with("-to_pod")
                })
                .count()
        })
        .unwrap_or_default()
}

/// Program ids attached in the pinned links of an agent.
fn attached_programs(bpffs_root: &Path) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(bpffs_root.join("links"))
        .expect("links dir")
        .flatten()
    {
        let link = aya::programs::links::PinnedLink::from_pin(e.path()).expect("pinned link");
        let fd: aya::programs::links::FdLink = link.into();
        let info = fd.info().expect("link info");
        out.insert(
            e.file_name().to_string_lossy().into_owned(),
            info.program_id(),
        );
    }
    out
}

/// kill -9 both agents while a TCP and a UDP stream flow through an allowed
/// path and a denied path is probed: no allowed packet is lost, no denied
/// connection gets through, and the restarted agents keep the same
/// object's programs in the pinned links (or, after an upgrade, swap theirs
/// in).
#[test]
fn agent_kill_and_restart_leaves_no_gap() {
    if !require_privileges("agent_kill_and_restart_leaves_no_gap") {
        return;
    }
    let lab = common::lab::up('r', PORTS);
    let mut agents = start_agents(&lab, Path::new(AGENT), &[]).expect("start agents");
    apply_policies(&lab, &mut agents);
    assert!(connects(&lab, ("y", "a"), ("x", "a")), "allowed path works");
    assert!(
        !connects(&lab, ("y", "b"), ("x", "b")),
        "denied path denied"
    );

    let ya = lab.pod("y", "a").unwrap().clone();
    let xa = lab.pod("x", "a").unwrap().clone();
    let tick = Duration::from_millis(2);
    let tcp = start_stream(&lab, &ya, IpAddr::V4(xa.ip_v4), 9100, Protocol::Tcp, tick)
        .expect("tcp stream");
    let udp = start_stream(&lab, &ya, IpAddr::V4(xa.ip_v4), 9101, Protocol::Udp, tick)
        .expect("udp stream");
    let prober = DeniedProber::start(&lab, ("y", "b"), ("x", "b"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while (tcp.echoed() < 50 || udp.echoed() < 50) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }

    let before: Vec<_> = agents
        .agents
        .iter()
        .map(|a| attached_programs(&a.bpffs_root))
        .collect();
    for a in &mut agents.agents {
        a.kill();
    }
    // Nothing runs the control plane now; enforcement must carry on.
    std::thread::sleep(Duration::from_millis(500));
    for a in &mut agents.agents {
        a.restart(&lab).expect("restart agent");
    }
    agents
        .wait_synced(&[], Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    std::thread::sleep(Duration::from_millis(500));

    let (tries, leaks) = prober.stop();
    let tcp = tcp.stop();
    let udp = udp.stop();
    assert!(tcp.is_clean(), "TCP stream through the restart: {tcp}");
    assert!(udp.is_clean(), "UDP stream through the restart: {udp}");
    assert!(tries > 5, "the denied path was probed ({tries} tries)");
    assert_eq!(
        leaks, 0,
        "{leaks} of {tries} denied connections got through"
    );

    // Same links (same pins). The object did not change, so the restarted
    // agents reuse the programs inside them (recorded in their state
    // directory): no verifier run before the first sync.
    for (a, before) in agents.agents.iter().zip(&before) {
        let after = attached_programs(&a.bpffs_root);
        assert_eq!(
            &after, before,
            "{}: the same object's programs stay in the same links",
            a.node
        );
    }

    // An upgrade: the record names another object. The next agents load
    // their own programs and swap them into the same links.
    for a in &mut agents.agents {
        std::fs::write(a.state_dir.join("programs"), "object another-build\n")
            .expect("write the programs record");
        a.kill();
    }
    for a in &mut agents.agents {
        a.restart(&lab).expect("restart agent");
    }
    agents
        .wait_synced(&[], Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        connects(&lab, ("y", "a"), ("x", "a")),
        "allowed path works after the upgrade"
    );
    assert!(
        !connects(&lab, ("y", "b"), ("x", "b")),
        "denied path denied after the upgrade"
    );
    for (a, before) in agents.agents.iter().zip(before) {
        let after = attached_programs(&a.bpffs_root);
        assert_eq!(
            after.keys().collect::<Vec<_>>(),
            before.keys().collect::<Vec<_>>(),
            "{}: the links are the same",
            a.node
        );
        for (link, prog) in &after {
            assert_ne!(
                *prog, before[link],
                "{}: {link} still runs the killed agent's program after an upgrade",
                a.node
            );
        }
    }
}

/// SIGTERM leaves enforcement in place; `netpol-agent cleanup` removes every
/// attachment, map and pin.
#[test]
fn sigterm_keeps_enforcing_and_cleanup_removes_everything() {
    if !require_privileges("sigterm_keeps_enforcing_and_cleanup_removes_everything") {
        return;
    }
    let lab = common::lab::up('t', PORTS);
    let mut agents = start_agents(&lab, Path::new(AGENT), &[]).expect("start agents");
    apply_policies(&lab, &mut agents);
    for a in &mut agents.agents {
        a.terminate();
    }
    assert!(
        !connects(&lab, ("y", "b"), ("x", "b")),
        "denied after the agents stopped"
    );
    assert!(
        connects(&lab, ("y", "a"), ("x", "a")),
        "allowed after the agents stopped"
    );
    for a in &agents.agents {
        assert!(a.bpffs_root.join("maps").exists());
        a.cleanup_pins();
        assert!(
            !a.bpffs_root.exists(),
            "cleanup left {}",
            a.bpffs_root.display()
        );
    }
    // Unpinning releases the links (and detaches the programs) as the
    // kernel drops its last reference; give it a moment.
    let deadline = Instant::now() + Duration::from_secs(3);
    while !connects(&lab, ("y", "b"), ("x", "b")) {
        assert!(
            Instant::now() < deadline,
            "after cleanup nothing is enforced, yet y/b still cannot reach x/b"
        );
    }
}

/// Pods added and removed while the agents run: a new pod's veth gets the
/// programs as soon as it appears and is denied until the agent knows the
/// pod; then its policies apply; a removed pod's attachments and endpoint go.
/// Prints how long each step took (a measurement, not a pass/fail bar).
#[test]
fn pods_added_and_removed_while_agents_run() {
    if !require_privileges("pods_added_and_removed_while_agents_run") {
        return;
    }
    let mut lab = common::lab::up('p', PORTS);
    let mut agents = start_agents(&lab, Path::new(AGENT), &[]).expect("start agents");
    apply_policies(&lab, &mut agents);

    for (node, name, v4) in [
        ("node-a", "c", "10.244.1.200"),
        ("node-b", "d", "10.244.2.200"),
    ] {
        // x/a may not reach the new x pod at all (x is default-deny): probe
        // its address from before it exists until well after it is known.
        let new_ip: IpAddr = v4.parse().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let leaks = Arc::new(AtomicU64::new(0));
        let prober = {
            let lab = lab.state().clone();
            let (stop, leaks) = (stop.clone(), leaks.clone());
            std::thread::spawn(move || {
                let from = lab.pod("x", "a").unwrap().clone();
                while !stop.load(Ordering::Relaxed) {
                    if connect(
                        &lab,
                        &from,
                        new_ip,
                        80,
                        Protocol::Tcp,
                        Duration::from_millis(50),
                    ) {
                        leaks.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        let t0 = Instant::now();
        let before = agents.revisions();
        let pod = lab
            .add_pod(
                PodSpec {
                    namespace: "x".into(),
                    name: name.into(),
                    node: node.into(),
                    labels: BTreeMap::from([("pod".to_string(), name.to_string())]),
                    ports: vec![PortSpec {
                        name: None,
                        port: 80,
                        protocol: Protocol::Tcp,
                    }],
                },
                &AddPodOptions {
                    ip_v4: Some(v4.parse().unwrap()),
                    ..AddPodOptions::default()
                },
            )
            .expect("add pod");
        let added = t0.elapsed();
        let agent = agents.node(node);
        let links = agent.bpffs_root.join("links");
        let attach_seen = (|| {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                let n = pod_links(&links);
                // two links per pod veth
                if n >= 2 * lab.pods.iter().filter(|p| p.node == node).count() {
                    return Some(t0.elapsed());
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            None
        })();
        agents
            .wait_synced(&before, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{e}"));
        let known = t0.elapsed();
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        prober.join().unwrap();
        eprintln!(
            "[measure] pod x/{name} on {node}: lab created it in {added:?}; programs on its veth after {attach_seen:?}; agent knew the pod after {known:?}"
        );
        assert_eq!(
            leaks.load(Ordering::Relaxed),
            0,
            "x/a reached the new default-deny pod x/{name}"
        );
        assert!(
            attach_seen.is_some(),
            "no programs attached to x/{name}'s veth"
        );
        // Known now: y/a may not reach it either (allow-ya selects pod=a).
        assert!(!connects(&lab, ("y", "a"), ("x", name)));
        assert_eq!(pod.ip_v4.to_string(), v4);
    }

    // Remove one: its endpoint and links go.
    let before = agents.revisions();
    let endpoints_before = agents.node("node-a").status().unwrap()["endpoints"]
        .as_u64()
        .unwrap();
    lab.remove_pod("x", "c").expect("remove pod");
    agents
        .wait_synced(&before, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let a = agents.node("node-a");
        let st = a.status().unwrap();
        let links = pod_links(&a.bpffs_root.join("links"));
        if st["endpoints"].as_u64() == Some(endpoints_before - 1) && links == 2 * 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "x/c's endpoint or links were not removed: {st} ({links} links)"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Drift: an endpoint entry vanishes from the pinned map behind the agent's
/// back (a lost write, a hand edit): its pod is denied (no endpoint), and the
/// agent's periodic read-back notices and writes it again.
#[test]
fn drift_in_the_pinned_maps_is_repaired() {
    if !require_privileges("drift_in_the_pinned_maps_is_repaired") {
        return;
    }
    let lab = common::lab::up('d', PORTS);
    let mut agents =
        start_agents(&lab, Path::new(AGENT), &["--reconcile-secs=1".to_string()]).expect("agents");
    agents
        .wait_synced(&[], Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    apply_policies(&lab, &mut agents);
    assert!(
        connects(&lab, ("y", "a"), ("x", "a")),
        "allowed before the drift"
    );

    // Remove x/a's endpoint entry from its node's pinned map.
    let node = lab.pod("x", "a").expect("x/a").node.clone();
    let agent = agents.node(&node);
    let pin = agent.bpffs_root.join("maps").join("NETPOL_ENDPOINTS");
    let data = aya::maps::MapData::from_pin(&pin).expect("pinned endpoints map");
    let mut m: aya::maps::HashMap<_, u32, netpol_common::EndpointValue> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).expect("a hash map");
    let config_pin = agent.bpffs_root.join("maps").join("NETPOL_CONFIG");
    let config: aya::maps::Array<_, netpol_common::ConfigValue> = aya::maps::Array::try_from(
        aya::maps::Map::Array(aya::maps::MapData::from_pin(&config_pin).expect("pinned CONFIG")),
    )
    .expect("an array");
    let ip = lab.pod("x", "a").unwrap().ip_v4;
    // x/a's entry in the epoch the datapath reads (the maps hold two).
    let active_key = |m: &aya::maps::HashMap<_, u32, netpol_common::EndpointValue>| {
        let epoch = netpol_common::generation_epoch(config.get(&0, 0).expect("CONFIG").generation);
        m.keys().map(|k| k.expect("key")).find(|k| {
            netpol_common::id_epoch(*k) == epoch
                && m.get(k, 0).is_ok_and(|v| v.addr_v4 == ip.octets())
        })
    };
    let key = active_key(&m).expect("x/a's endpoint entry");
    let before = agent.status().expect("status")["drift_repaired"]
        .as_u64()
        .unwrap_or(0);
    m.remove(&key).expect("remove the entry");
    let t0 = Instant::now();
    // Repaired within a few read-back periods: allowed again, and the
    // status counts the repair (the repaired state may be in the other
    // epoch, flipped to).
    let deadline = t0 + Duration::from_secs(10);
    loop {
        let repaired = active_key(&m).is_some();
        if repaired && connects(&lab, ("y", "a"), ("x", "a")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "x/a's endpoint was not written again within 10 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("[measure] endpoint entry repaired after {:?}", t0.elapsed());
    let deadline = Instant::now() + Duration::from_secs(5);
    while agents.node(&node).status().expect("status")["drift_repaired"]
        .as_u64()
        .unwrap_or(0)
        <= before
    {
        assert!(
            Instant::now() < deadline,
            "status does not count the repair"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    lab.down().expect("down");
}

/// A write to a socket whose peer is gone is an error to the agent, never a SIGPIPE: the
/// daemon ignores SIGPIPE (Rust's default, which the agent once reset for all its commands).
/// With SIGPIPE at its default action the agent died silently when kube-apiserver was killed
/// mid-request: hyper writes TLS records with writev(2), which, unlike std's send(), has no
/// MSG_NOSIGNAL. That needs a killed API server at the wrong moment, so the disposition is
/// read from /proc; clients of the API socket that hang up before the answer are then sent
/// too, and the agent must keep answering.
#[test]
fn api_clients_that_hang_up_do_not_kill_the_agent() {
    use std::{io::Write, os::unix::net::UnixStream};
    if !require_privileges("api_clients_that_hang_up_do_not_kill_the_agent") {
        return;
    }
    let lab = common::lab::up('h', PORTS);
    let mut agents = start_agents(&lab, Path::new(AGENT), &[]).expect("start agents");
    apply_policies(&lab, &mut agents);
    for a in &mut agents.agents {
        let pid = a.pid().expect("the agent runs");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
        let ignored = status
            .lines()
            .find_map(|l| l.strip_prefix("SigIgn:"))
            .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
            .expect("SigIgn in /proc/<pid>/status");
        assert_ne!(
            ignored & (1 << (libc::SIGPIPE - 1)),
            0,
            "{}: the agent does not ignore SIGPIPE (SigIgn {ignored:#x})",
            a.node
        );
        let sock = netpol_agent::api::socket_path(&a.state_dir);
        for i in 0..200 {
            let mut s = UnixStream::connect(&sock)
                .unwrap_or_else(|e| panic!("{}: connect {} (#{i}): {e}", a.node, sock.display()));
            // The request is in the agent's buffer; we are gone before its answer.
            s.write_all(b"GET /status HTTP/1.0\r\n\r\n").expect("write");
            drop(s);
        }
        // The agent answers (and fails to write) after we hung up: give it a moment.
        std::thread::sleep(Duration::from_millis(500));
        let exited = a.exited();
        assert!(
            exited.is_none(),
            "{} exited ({exited:?}) after clients hung up:\n{}",
            a.node,
            a.log_tail(20)
        );
        let (code, _) = netpol_agent::api::get(&a.state_dir, "/status")
            .unwrap_or_else(|e| panic!("{}: the agent stopped answering: {e}", a.node));
        assert_eq!(code, 200);
    }
    assert!(connects(&lab, ("y", "a"), ("x", "a")), "allowed");
    assert!(!connects(&lab, ("y", "b"), ("x", "b")), "denied");
}
