//! XDP on the node's uplink in the lab with the real agents (issue 17).
//!
//! x/a (on the routed node-a) takes TCP/80 only from x/b (on node-b). The
//! agents run with their default, `--xdp auto`: node-a's uplink `eth0` (a
//! veth, native XDP) carries `netpol_xdp_uplink`. Then, from node-b:
//! - y/a's connection to x/a:80 is refused at node-a's uplink: its SYNs are
//!   counted under `ingress_xdp_deny`, and the flow log names `xdp_deny`;
//! - x/b's connection to x/a:80 works;
//! - x/a's own connection to y/a:80 works: its replies cross node-a's
//!   uplink though x/a's ingress policy would deny y/a.
//!
//! With `--xdp off`, node-a's uplink has no XDP program, the same denied
//! connection fails the same way, and `ingress_xdp_deny` stays at zero
//! (the veth drops it as `policy_deny`).
//!
//! In vxlan mode the flows between nodes are tunnelled: XDP (on `eth0`, not
//! on the VXLAN devices) sees only outer packets addressed to the node and
//! passes them; the veth judges the inner packet, so the verdicts are the
//! same and `ingress_xdp_deny` does not move.
//!
//! Needs root; skips loudly without it (and fails under CI=true).

mod common {
    pub mod lab;
}

use std::{
    net::{SocketAddr, TcpStream},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use common::lab::{AGENT, write_policy};
use netpol_lab::{Agents, Lab, require_privileges, run_in_netns, start_agents};

const PORTS: &str = "[{port: 80, protocol: TCP}]";

const ONLY_XB: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
    metadata: {name: xa-from-xb, namespace: x}\n\
    spec:\n  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n\
    \x20 ingress:\n  - from:\n    - podSelector: {matchLabels: {pod: b}}\n\
    \x20   ports: [{port: 80, protocol: TCP}]\n";

/// `ip -d link show eth0` inside node `node`'s netns.
fn uplink_link(lab: &Lab, node: &str) -> String {
    let netns = lab.node(node).expect("node").netns_path();
    run_in_netns(&netns, || {
        let out = Command::new("ip")
            .args(["-d", "link", "show", "dev", "eth0"])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    })
    .unwrap_or_else(|e| panic!("ip link in {node}: {e}"))
}

/// Whether `from` (a pod key) can open a TCP connection to `to`:80.
fn connects(lab: &Lab, from: &str, to: &str) -> bool {
    let src = lab.pod_by_key(from).expect("pod").clone();
    let dst = lab.pod_by_key(to).expect("pod").ip_v4;
    let addr = SocketAddr::from((dst, 80));
    run_in_netns(&src.netns_path(), move || {
        Ok(TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok())
    })
    .expect("connect from the pod's netns")
}

fn counter(agents: &mut Agents, node: &str, name: &str) -> u64 {
    agents
        .node(node)
        .status()
        .and_then(|s| s["counters"][name].as_u64())
        .unwrap_or(0)
}

/// Wait until `pred` holds of node's counter (status is written now and then).
fn wait_counter(agents: &mut Agents, node: &str, name: &str, pred: impl Fn(u64) -> bool) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let v = counter(agents, node, name);
        if pred(v) || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn setup(lab: &Lab, args: &[&str]) -> Agents {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let mut agents = start_agents(lab, Path::new(AGENT), &args).expect("agents");
    agents
        .wait_synced(&[], Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    agents
        .change(
            || write_policy(lab, "xa-from-xb.yaml", ONLY_XB),
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    agents
}

#[test]
fn a_denied_flow_from_another_node_is_dropped_at_the_uplink() {
    if !require_privileges("a_denied_flow_from_another_node_is_dropped_at_the_uplink") {
        return;
    }
    let lab = common::lab::up('x', PORTS);
    let mut agents = setup(&lab, &[]);

    let link = uplink_link(&lab, "node-a");
    assert!(
        link.contains("prog/xdp"),
        "no XDP program on node-a's eth0:\n{link}"
    );
    // The status says what the kernel runs (read back from the link), not
    // only what was asked: `auto` on a veth is native.
    let status = agents.node("node-a").status().expect("node-a's status");
    assert_eq!(
        status["xdp"]["eth0"], "native",
        "node-a's status: {}",
        status["xdp"]
    );

    // Allowed traffic from the other node still works.
    assert!(
        connects(&lab, "x/b", "x/a"),
        "x/b -> x/a:80 (allowed) failed"
    );
    // A connection x/a opens: its replies come back through the uplink.
    assert!(
        connects(&lab, "x/a", "y/a"),
        "x/a -> y/a:80 failed: its replies were dropped"
    );

    let before = counter(&mut agents, "node-a", "ingress_xdp_deny");
    let veth_before = counter(&mut agents, "node-a", "ingress_policy_deny");
    assert!(
        !connects(&lab, "y/a", "x/a"),
        "y/a -> x/a:80 connected though x/a's policy denies it"
    );
    let after = wait_counter(&mut agents, "node-a", "ingress_xdp_deny", |v| v > before);
    assert!(
        after > before,
        "node-a's ingress_xdp_deny did not move ({before} -> {after}): the SYNs were not \
         dropped at the uplink"
    );
    // Dropped before the stack: none of them reached x/a's veth.
    assert_eq!(
        counter(&mut agents, "node-a", "ingress_policy_deny"),
        veth_before,
        "the denied SYNs reached x/a's veth: XDP counted them but passed them"
    );
    let line = agents
        .flow_logs()
        .into_iter()
        .map(|(_, v)| v)
        .find(|v| v["reason"] == "xdp_deny");
    let line = line.expect("a flow-log line with reason xdp_deny");
    assert_eq!(line["verdict"], "deny", "{line}");
    assert_eq!(line["endpoint"], "x/a", "{line}");

    // A restarted agent of another build (its programs record names
    // another object; the same object's programs would be kept as they
    // are) swaps its program into the pinned link: one XDP program on eth0,
    // a new one.
    let old = xdp_prog_id(&link).expect("an XDP program id");
    for a in &mut agents.agents {
        std::fs::write(a.state_dir.join("programs"), "object another-build\n")
            .expect("write the programs record");
        a.kill();
    }
    for a in &mut agents.agents {
        a.restart(&lab).expect("restart the agent");
    }
    agents
        .wait_synced(&[], Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    let relinked = uplink_link(&lab, "node-a");
    let new = xdp_prog_id(&relinked).unwrap_or_else(|| {
        panic!(
            "no XDP on eth0 after the restart:\n{relinked}\nnode-a's agent:\n{}",
            agents.node("node-a").log_tail(30)
        )
    });
    assert_ne!(old, new, "the restarted agent's program is not in the link");
    assert_eq!(relinked.matches("prog/xdp").count(), 1, "{relinked}");

    // cleanup detaches it.
    for a in &mut agents.agents {
        a.terminate();
        a.cleanup_pins();
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while uplink_link(&lab, "node-a").contains("prog/xdp") {
        assert!(
            Instant::now() < deadline,
            "cleanup left XDP on node-a's eth0"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(lab);
}

/// The id in `ip -d link`'s `prog/xdp id N` (native or generic).
fn xdp_prog_id(link: &str) -> Option<u32> {
    let rest = link.split("prog/xdp").nth(1)?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn with_xdp_off_the_same_flows_get_the_same_verdicts_at_the_veth() {
    if !require_privileges("with_xdp_off_the_same_flows_get_the_same_verdicts_at_the_veth") {
        return;
    }
    let lab = common::lab::up('y', PORTS);
    let mut agents = setup(&lab, &["--xdp", "off"]);
    let link = uplink_link(&lab, "node-a");
    assert!(
        !link.contains("xdp"),
        "--xdp off left an XDP program on node-a's eth0:\n{link}"
    );
    assert!(connects(&lab, "x/b", "x/a"));
    assert!(connects(&lab, "x/a", "y/a"));
    let before = counter(&mut agents, "node-a", "ingress_policy_deny");
    assert!(!connects(&lab, "y/a", "x/a"));
    let after = wait_counter(&mut agents, "node-a", "ingress_policy_deny", |v| v > before);
    assert!(after > before, "the veth did not count the denied SYNs");
    assert_eq!(counter(&mut agents, "node-a", "ingress_xdp_deny"), 0);
}

#[test]
fn tunnelled_traffic_passes_xdp_and_the_veth_decides() {
    if !require_privileges("tunnelled_traffic_passes_xdp_and_the_veth_decides") {
        return;
    }
    let name = format!("v{}", std::process::id() % 100_000);
    let yaml = format!(
        "{}fabric: {{mode: vxlan}}\n",
        common::lab::cluster_yaml(&name, PORTS)
    );
    let spec = netpol_lab::ClusterSpec::from_yaml(&yaml).expect("vxlan cluster parses");
    let lab = Lab::up(&spec, &netpol_lab::UpOptions::default())
        .unwrap_or_else(|e| panic!("lab up {name}: {e}"));
    let mut agents = setup(&lab, &[]);
    let link = uplink_link(&lab, "node-a");
    assert!(
        link.contains("prog/xdp"),
        "no XDP on node-a's eth0:\n{link}"
    );
    assert!(
        connects(&lab, "x/b", "x/a"),
        "x/b -> x/a:80 (allowed) failed"
    );
    assert!(connects(&lab, "x/a", "y/a"), "x/a -> y/a:80 failed");
    let before = counter(&mut agents, "node-a", "ingress_policy_deny");
    assert!(!connects(&lab, "y/a", "x/a"), "y/a -> x/a:80 connected");
    let after = wait_counter(&mut agents, "node-a", "ingress_policy_deny", |v| v > before);
    assert!(after > before, "the veth did not judge the tunnelled SYNs");
    assert_eq!(
        counter(&mut agents, "node-a", "ingress_xdp_deny"),
        0,
        "XDP judged a tunnelled packet"
    );
}

/// A device with a jumbo MTU keeps native XDP: the program is loaded with
/// `xdp.frags`, and a veth refuses a program without it in native mode once
/// its peer's MTU does not fit a page ("MTU too large to enable XDP"). The
/// status reports what the kernel runs on each device.
#[test]
fn a_jumbo_mtu_device_keeps_native_xdp() {
    if !require_privileges("a_jumbo_mtu_device_keeps_native_xdp") {
        return;
    }
    let lab = common::lab::up('j', PORTS);
    for node in ["node-a", "node-b"] {
        let netns = lab.node(node).expect("node").netns_path();
        run_in_netns(&netns, || {
            for args in [
                "link add xj0 mtu 9000 type veth peer name xj1 mtu 9000",
                "link set xj0 up",
                "link set xj1 up",
            ] {
                let st = Command::new("ip").args(args.split(' ')).status()?;
                if !st.success() {
                    return Err(std::io::Error::other(format!("ip {args}: {st}")));
                }
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("jumbo veth in {node}: {e}"));
    }
    let mut agents = setup(&lab, &["--xdp", "native", "--xdp-devices", "eth0,xj0"]);
    let netns = lab.node("node-a").expect("node").netns_path();
    let link = run_in_netns(&netns, || {
        let out = Command::new("ip")
            .args(["-d", "link", "show", "dev", "xj0"])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    })
    .expect("ip link");
    assert!(
        link.contains("mtu 9000 xdp ") && link.contains("prog/xdp"),
        "no native XDP on the jumbo veth xj0:\n{link}\nnode-a's agent:\n{}",
        agents.node("node-a").log_tail(20)
    );
    let status = agents.node("node-a").status().expect("node-a's status");
    assert_eq!(
        status["xdp"],
        serde_json::json!({"eth0": "native", "xj0": "native"}),
        "node-a's status: {status}"
    );
    assert!(
        status["errors"].as_array().is_none_or(|e| e.is_empty()),
        "node-a's errors: {}",
        status["errors"]
    );
    drop(agents);
    drop(lab);
}
