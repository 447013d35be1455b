//! Hostile pods in the lab, with the real agents: each test is an attack made
//! of packets the attacker pod crafts itself (raw sockets, as CAP_NET_RAW, a
//! default capability, allows), then what the victim sees, then the flow-log
//! line that names the reason. Needs root; skips loudly without it.
//!
//! The cluster (tests/common/lab.rs): node-a routed with x/a and y/b, node-b
//! bridged with x/b and y/a; every pod serves TCP and UDP port 80. An attacker
//! pod y/c is added on node-b (bridged), where forged ARP matters.

mod common {
    pub mod lab;
    pub mod packets;
}

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use common::{
    lab::{AGENT, write_policy},
    packets::{gratuitous_arp, tcp},
};
use netpol_lab::{
    AddPodOptions, Agents, Family, Lab, PodSpec, PodState, PortSpec, Protocol, connect,
    require_privileges, run_in_netns, start_agents,
};

const PORTS: &str = "[{port: 80, protocol: TCP}, {port: 80, protocol: UDP}]";

/// The lab, agents that log every flow, and the attacker pod y/c on the
/// bridged node.
fn setup(prefix: char) -> (Lab, Agents, PodState) {
    let mut lab = common::lab::up(prefix, PORTS);
    let attacker = lab
        .add_pod(
            PodSpec {
                namespace: "y".into(),
                name: "c".into(),
                node: "node-b".into(),
                labels: BTreeMap::from([("pod".into(), "c".into())]),
                ports: vec![PortSpec {
                    name: None,
                    port: 80,
                    protocol: Protocol::Tcp,
                }],
            },
            &AddPodOptions::default(),
        )
        .expect("add the attacker pod");
    let mut agents =
        start_agents(&lab, Path::new(AGENT), &["--log-allowed".to_string()]).expect("agents");
    agents
        .wait_synced(&[], Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    (lab, agents, attacker)
}

fn pod<'a>(lab: &'a Lab, key: &str) -> &'a PodState {
    lab.pod_by_key(key)
        .unwrap_or_else(|| panic!("no pod {key}"))
}

fn v4(pod: &PodState) -> Ipv4Addr {
    pod.ip_v4
}

/// Sends an IPv4 packet (header included) from inside a pod's netns through
/// a raw socket: the kernel routes it, the pod's source address is whatever
/// the packet says.
fn raw_send_v4(from: &PodState, packet: Vec<u8>) {
    let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    run_in_netns(&from.netns_path(), move || {
        // SAFETY: plain socket(2); the descriptor is owned right away.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(dst.octets()),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: the buffer and the address outlive the call.
        let n = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                std::ptr::from_ref(&addr).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    })
    .unwrap_or_else(|e| panic!("raw send from {}: {e}", from.key()));
}

/// Sends a whole Ethernet frame out of a pod's `eth0` (AF_PACKET).
fn frame_send(from: &PodState, frame: Vec<u8>) {
    run_in_netns(&from.netns_path(), move || {
        // SAFETY: plain socket(2) and if_nametoindex(3) calls.
        let (fd, ifindex) = unsafe {
            (
                libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0),
                libc::if_nametoindex(c"eth0".as_ptr()),
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: the buffer and the address outlive the call.
        let n = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                std::ptr::from_ref(&addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    })
    .unwrap_or_else(|e| panic!("frame send from {}: {e}", from.key()));
}

/// The MAC of a pod's `eth0`.
fn pod_mac(pod: &PodState) -> [u8; 6] {
    let out = Command::new("ip")
        .args(["-n", &pod.netns, "-o", "link", "show", "eth0"])
        .output()
        .expect("ip link");
    let text = String::from_utf8_lossy(&out.stdout);
    let mac = text
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC in {text}"));
    let bytes: Vec<u8> = mac
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).expect("hex"))
        .collect();
    bytes.try_into().expect("six bytes")
}

/// Waits until an agent's flow log has a line for which `pred` holds.
fn wait_flow_log(
    agents: &Agents,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some((_, v)) = agents.flow_logs().into_iter().find(|(_, v)| pred(v)) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "no flow log line for {what}; lines:\n{}",
            agents
                .flow_logs()
                .iter()
                .map(|(l, _)| l.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Spoofing: the attacker y/c sends SYNs to y/a:80, which only x/b may
/// reach, once as x/b and once as the node (bridge gateway). Neither gets
/// past the attacker's own veth: y/a's side logs no flow, the attacker's
/// side logs `spoofed` naming the real sender.
#[test]
fn spoofed_sources_get_nowhere() {
    if !require_privileges("spoofed_sources_get_nowhere") {
        return;
    }
    let (lab, mut agents, attacker) = setup('s');
    agents
        .change(
            || {
                write_policy(
                    &lab,
                    "only-xb.yaml",
                    "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
                     metadata: {name: only-xb, namespace: y}\n\
                     spec:\n  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n  \
                     ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: x}}\n      \
                     podSelector: {matchLabels: {pod: b}}\n",
                )
            },
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let victim = pod(&lab, "y/a").clone();
    let trusted = pod(&lab, "x/b").clone();
    let gateway = lab.node("node-b").unwrap().gateway_v4;

    let attempts = [
        ("as x/b", v4(&trusted), 41000u16),
        ("as the node", gateway, 41001),
    ];
    for (_, src, sport) in attempts {
        let syn = tcp(&format!("{src}:{sport}"), &format!("{}:80", v4(&victim))).syn();
        raw_send_v4(&attacker, syn.ip_bytes());
    }
    // Nothing reached the victim: no flow of those ports was decided there.
    std::thread::sleep(Duration::from_millis(500));
    let reached: Vec<_> = agents
        .flow_logs()
        .into_iter()
        .filter(|(_, v)| {
            v["direction"] == "ingress" && (v["sport"] == 41000 || v["sport"] == 41001)
        })
        .collect();
    assert!(reached.is_empty(), "spoofed SYNs reached y/a: {reached:?}");
    for (name, _, sport) in attempts {
        let line = wait_flow_log(&agents, name, |v| {
            v["reason"] == "spoofed" && v["sport"] == sport
        });
        assert_eq!(line["verdict"], "deny", "{line}");
        assert_eq!(
            line["endpoint"], "y/c",
            "the log names the real sender: {line}"
        );
        assert_eq!(line["direction"], "egress");
    }
    // The trusted pod itself still gets in.
    assert!(connect(
        &lab,
        &trusted,
        victim.ip(Family::V4),
        80,
        Protocol::Tcp,
        Duration::from_secs(2)
    ));
    lab.down().expect("down");
}

/// ARP takeover on the bridged node: y/c tells the bridge "x/b is at my MAC".
/// y/a, which talked to x/b a moment ago, must keep reaching the real x/b.
#[test]
fn gratuitous_arp_cannot_take_over_a_bridged_pod() {
    if !require_privileges("gratuitous_arp_cannot_take_over_a_bridged_pod") {
        return;
    }
    let (lab, agents, attacker) = setup('g');
    let victim = pod(&lab, "x/b").clone();
    let client = pod(&lab, "y/a").clone();
    let ok = |lab: &Lab| {
        netpol_lab::connect_detailed(
            lab,
            &client,
            victim.ip(Family::V4),
            80,
            Protocol::Tcp,
            Duration::from_secs(1),
        )
    };
    assert!(ok(&lab).connected, "baseline");
    // Past the neighbour entry's lock time, so an ARP would update it.
    std::thread::sleep(Duration::from_millis(1200));
    let mac = pod_mac(&attacker);
    for _ in 0..3 {
        frame_send(&attacker, gratuitous_arp(&victim.ip_v4.to_string(), mac));
    }
    std::thread::sleep(Duration::from_millis(300));
    let after = ok(&lab);
    assert!(
        after.connected && after.detail.contains("x/b"),
        "y/a no longer reaches x/b: {}",
        after.detail
    );
    let line = wait_flow_log(&agents, "the forged ARP", |v| v["reason"] == "spoofed");
    assert_eq!(line["endpoint"], "y/c", "{line}");
    lab.down().expect("down");
}

/// A rogue IPv6 router: y/c advertises itself as the default router. The
/// other pods on its bridge must not learn a route through it.
#[test]
fn rogue_router_advertisements_are_dropped() {
    if !require_privileges("rogue_router_advertisements_are_dropped") {
        return;
    }
    let (lab, agents, attacker) = setup('r');
    let victim = pod(&lab, "y/a").clone();
    run_in_netns(&attacker.netns_path(), || {
        // SAFETY: plain socket/setsockopt/sendto calls on a descriptor we own.
        unsafe {
            let fd = libc::socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let fd = OwnedFd::from_raw_fd(fd);
            let hops: libc::c_int = 255;
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_IPV6,
                libc::IPV6_MULTICAST_HOPS,
                std::ptr::from_ref(&hops).cast(),
                4,
            );
            // Type 134, code 0, checksum (the kernel fills it), hop limit 64,
            // flags 0, router lifetime 1800 s, reachable and retrans timers 0.
            let ra: [u8; 16] = [134, 0, 0, 0, 64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0];
            let mut dst: libc::sockaddr_in6 = std::mem::zeroed();
            dst.sin6_family = libc::AF_INET6 as u16;
            dst.sin6_addr.s6_addr = "ff02::1".parse::<std::net::Ipv6Addr>().unwrap().octets();
            dst.sin6_scope_id = libc::if_nametoindex(c"eth0".as_ptr());
            for _ in 0..3 {
                if libc::sendto(
                    fd.as_raw_fd(),
                    ra.as_ptr().cast(),
                    ra.len(),
                    0,
                    std::ptr::from_ref(&dst).cast(),
                    std::mem::size_of::<libc::sockaddr_in6>() as u32,
                ) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
        }
        Ok(())
    })
    .expect("send RA");
    std::thread::sleep(Duration::from_millis(500));
    let routes = Command::new("ip")
        .args(["-n", &victim.netns, "-6", "route", "show"])
        .output()
        .expect("ip route");
    let routes = String::from_utf8_lossy(&routes.stdout);
    assert!(
        !routes.contains("proto ra"),
        "y/a learned a route from the rogue router:\n{routes}"
    );
    let line = wait_flow_log(&agents, "the router advertisement", |v| {
        v["reason"] == "rogue_router"
    });
    assert_eq!(line["endpoint"], "y/c", "{line}");
    lab.down().expect("down");
}

/// The forged reply: x/a may send nothing (egress default-deny), y/b is its
/// accomplice outside that policy. y/b sends x/a a SYN-ACK "from y/b:80 to
/// x/a:40000"; x/a then connects from port 40000 to y/b:80, hoping its SYN
/// passes as the "reply" of that flow. It must not.
#[test]
fn a_forged_reply_does_not_open_egress() {
    if !require_privileges("a_forged_reply_does_not_open_egress") {
        return;
    }
    let (lab, mut agents, _) = setup('f');
    agents
        .change(
            || {
                write_policy(
                    &lab,
                    "deny-egress.yaml",
                    "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
                     metadata: {name: deny-egress, namespace: x}\n\
                     spec:\n  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n",
                )
            },
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let prisoner = pod(&lab, "x/a").clone();
    let accomplice = pod(&lab, "y/b").clone();
    for _ in 0..3 {
        let forged = tcp(
            &format!("{}:80", v4(&accomplice)),
            &format!("{}:40000", v4(&prisoner)),
        )
        .syn_ack();
        raw_send_v4(&accomplice, forged.ip_bytes());
    }
    wait_flow_log(&agents, "the forged SYN-ACK reaching x/a", |v| {
        v["direction"] == "ingress" && v["sport"] == 80 && v["dport"] == 40000
    });
    // The prisoner's "reply" from the pinned port.
    let target = SocketAddr::new(IpAddr::V4(v4(&accomplice)), 80);
    let escaped = run_in_netns(&prisoner.netns_path(), move || {
        connect_from_port(40000, target, Duration::from_secs(2))
    })
    .expect("connect");
    assert!(
        !escaped,
        "x/a escaped its egress policy through a forged reply"
    );
    let line = wait_flow_log(&agents, "x/a's denied SYN", |v| {
        v["direction"] == "egress" && v["sport"] == 40000 && v["verdict"] == "deny"
    });
    assert_eq!(line["reason"], "policy_deny", "{line}");
    lab.down().expect("down");
}

/// A TCP connect from a fixed local port (std cannot bind before connecting),
/// in the calling thread's netns: true if the handshake completed in time.
fn connect_from_port(port: u16, target: SocketAddr, timeout: Duration) -> std::io::Result<bool> {
    let IpAddr::V4(ip) = target.ip() else {
        unreachable!("IPv4 target")
    };
    // SAFETY: plain socket calls on a descriptor we own; the structs outlive them.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            std::ptr::from_ref(&one).cast(),
            4,
        );
        let sin = |port: u16, ip: Ipv4Addr| libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(ip.octets()),
            },
            sin_zero: [0; 8],
        };
        let local = sin(port, Ipv4Addr::UNSPECIFIED);
        let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
        if libc::bind(fd.as_raw_fd(), std::ptr::from_ref(&local).cast(), len) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let remote = sin(target.port(), ip);
        libc::connect(fd.as_raw_fd(), std::ptr::from_ref(&remote).cast(), len);
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        if libc::poll(&mut pfd, 1, timeout.as_millis() as i32) <= 0 {
            return Ok(false);
        }
        let mut err: libc::c_int = 0;
        let mut err_len = 4u32;
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            std::ptr::from_mut(&mut err).cast(),
            &mut err_len,
        );
        Ok(err == 0)
    }
}

/// x/a: ingress only from y/b; egress only UDP 80 to y/b (a "DNS" flow).
const XA_TALKS_ONLY_TO_YB: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
metadata: {name: only-yb, namespace: x}\n\
spec:\n  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress, Egress]\n  \
ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: y}}\n      \
podSelector: {matchLabels: {pod: b}}\n  \
egress:\n  - to:\n    - namespaceSelector: {matchLabels: {ns: y}}\n      \
podSelector: {matchLabels: {pod: b}}\n    ports: [{protocol: UDP, port: 80}]\n";

/// Opens a UDP flow from `from`'s `port` to `to`:80 and waits for the answer
/// (a lab server names itself); returns the socket, still bound.
fn udp_exchange(from: &PodState, port: u16, to: Ipv4Addr) -> std::net::UdpSocket {
    run_in_netns(&from.netns_path(), move || {
        let s = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.send_to(b"hello", (to, 80))?;
        let mut buf = [0u8; 128];
        s.recv_from(&mut buf)?;
        Ok(s)
    })
    .unwrap_or_else(|e| panic!("UDP exchange from {}: {e}", from.key()))
}

/// Listens for ICMP in a pod's netns for `wait`; returns how many messages of
/// `icmp_type` arrived from `from`.
fn icmp_arrivals(pod: &PodState, from: Ipv4Addr, icmp_type: u8, wait: Duration) -> usize {
    run_in_netns(&pod.netns_path(), move || {
        // SAFETY: socket(2) on a descriptor we own right away.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fresh descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let deadline = Instant::now() + wait;
        let mut n = 0;
        let mut buf = [0u8; 2048];
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let mut pfd = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd we own.
            if unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) } <= 0 {
                break;
            }
            // SAFETY: the buffer outlives the call.
            let got = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if got >= 21 {
                let src = Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]);
                let ihl = usize::from(buf[0] & 0x0f) * 4;
                if src == from && buf.get(ihl) == Some(&icmp_type) {
                    n += 1;
                }
            }
        }
        Ok(n)
    })
    .expect("listen for ICMP")
}

/// ICMP as a tunnel and as a weapon. x/a may only talk UDP 80 with y/b.
/// (1) It sends 1000 bytes to x/b dressed as "port unreachable about y/b's
/// answer": x/b must receive nothing. (2) y/a, which x/a does not admit,
/// injects "fragmentation needed" about x/a's flow to y/b: x/a must receive
/// nothing. The flow's peer y/b may still send x/a a real error.
#[test]
fn icmp_errors_are_no_tunnel_and_no_weapon_in_the_lab() {
    if !require_privileges("icmp_errors_are_no_tunnel_and_no_weapon_in_the_lab") {
        return;
    }
    let (lab, mut agents, _) = setup('i');
    agents
        .change(
            || write_policy(&lab, "only-yb.yaml", XA_TALKS_ONLY_TO_YB),
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let prisoner = pod(&lab, "x/a").clone();
    let peer = pod(&lab, "y/b").clone();
    let third = pod(&lab, "x/b").clone();
    let denied = pod(&lab, "y/a").clone();
    let _flow = udp_exchange(&prisoner, 5353, v4(&peer));
    let answer = common::packets::udp(
        &format!("{}:80", v4(&peer)),
        &format!("{}:5353", v4(&prisoner)),
    );
    let request = common::packets::udp(
        &format!("{}:5353", v4(&prisoner)),
        &format!("{}:80", v4(&peer)),
    );

    // (1) Exfiltration to a third pod.
    let exfil =
        common::packets::icmp_error(&v4(&prisoner).to_string(), &v4(&third).to_string(), &answer)
            .payload(&[0x41; 1000]);
    let listener = {
        let third = third.clone();
        let from = v4(&prisoner);
        std::thread::spawn(move || icmp_arrivals(&third, from, 3, Duration::from_millis(1500)))
    };
    std::thread::sleep(Duration::from_millis(200));
    raw_send_v4(&prisoner, exfil.ip_bytes());
    assert_eq!(
        listener.join().unwrap(),
        0,
        "x/b received x/a's ICMP tunnel"
    );
    let line = wait_flow_log(&agents, "the exfiltration", |v| {
        v["reason"] == "icmp_error_unrelated" && v["direction"] == "egress"
    });
    assert_eq!(line["endpoint"], "x/a", "{line}");

    // (2) Injection by a pod x/a does not admit.
    let inject = common::packets::icmp_error(
        &v4(&denied).to_string(),
        &v4(&prisoner).to_string(),
        &request,
    );
    let listener = {
        let prisoner = prisoner.clone();
        let from = v4(&denied);
        std::thread::spawn(move || icmp_arrivals(&prisoner, from, 3, Duration::from_millis(1500)))
    };
    std::thread::sleep(Duration::from_millis(200));
    raw_send_v4(&denied, inject.ip_bytes());
    assert_eq!(
        listener.join().unwrap(),
        0,
        "y/a injected an ICMP error into x/a's flow"
    );
    let line = wait_flow_log(&agents, "the injection", |v| {
        v["reason"] == "icmp_error_unrelated" && v["direction"] == "ingress"
    });
    assert_eq!(line["endpoint"], "x/a", "{line}");

    // The flow's peer may report on it (path MTU discovery keeps working).
    let real =
        common::packets::icmp_error(&v4(&peer).to_string(), &v4(&prisoner).to_string(), &request);
    let listener = {
        let prisoner = prisoner.clone();
        let from = v4(&peer);
        std::thread::spawn(move || icmp_arrivals(&prisoner, from, 3, Duration::from_millis(1500)))
    };
    std::thread::sleep(Duration::from_millis(200));
    raw_send_v4(&peer, real.ip_bytes());
    assert_eq!(
        listener.join().unwrap(),
        1,
        "y/b's real error did not reach x/a"
    );
    lab.down().expect("down");
}

/// An IPv4 fragment with the header the kernel completes (raw(7): checksum
/// and total length are filled in).
fn ipv4_fragment(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    id: u16,
    offset: u16,
    more: bool,
    data: &[u8],
) -> Vec<u8> {
    let mut b = vec![0x45, 0, 0, 0];
    b.extend(id.to_be_bytes());
    b.extend(((offset / 8) | if more { 0x2000 } else { 0 }).to_be_bytes());
    b.extend([64, 17, 0, 0]);
    b.extend(src.octets());
    b.extend(dst.octets());
    b.extend(data);
    let len = b.len() as u16;
    b[2..4].copy_from_slice(&len.to_be_bytes());
    b
}

/// `Ip: ReasmOKs` of a pod's netns: datagrams it put back together.
fn reassembled(pod: &PodState) -> u64 {
    run_in_netns(&pod.netns_path(), || {
        let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp")?;
        let mut lines = snmp.lines().filter(|l| l.starts_with("Ip:"));
        let (names, values) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""));
        Ok(names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == "ReasmOKs")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0))
    })
    .expect("read snmp")
}

/// A fragment after a revocation: x/a sends the first half of a datagram to
/// y/b while allowed; the allow goes; the second half must not follow the old
/// verdict (y/b never puts the datagram together).
#[test]
fn a_fragment_after_revocation_is_dropped() {
    if !require_privileges("a_fragment_after_revocation_is_dropped") {
        return;
    }
    let (lab, mut agents, _) = setup('x');
    agents
        .change(
            || write_policy(&lab, "only-yb.yaml", XA_TALKS_ONLY_TO_YB),
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let sender = pod(&lab, "x/a").clone();
    let receiver = pod(&lab, "y/b").clone();
    let (src, dst) = (v4(&sender), v4(&receiver));
    // UDP 7777 -> 80, 72 bytes: header and 32 bytes, then 32 more at offset 40.
    let mut first = Vec::new();
    first.extend(7777u16.to_be_bytes());
    first.extend(80u16.to_be_bytes());
    first.extend(72u16.to_be_bytes());
    first.extend([0, 0]); // no checksum
    first.extend([b'1'; 32]);
    let before = reassembled(&receiver);
    raw_send_v4(&sender, ipv4_fragment(src, dst, 0x4242, 0, true, &first));
    wait_flow_log(&agents, "the first fragment", |v| {
        v["direction"] == "egress" && v["sport"] == 7777 && v["verdict"] == "allow"
    });
    // The policy that allowed it goes: x/a stays isolated (a default deny).
    agents
        .change(
            || {
                write_policy(
                    &lab,
                    "only-yb.yaml",
                    "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
                     metadata: {name: only-yb, namespace: x}\n\
                     spec:\n  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress, Egress]\n",
                )
            },
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    raw_send_v4(
        &sender,
        ipv4_fragment(src, dst, 0x4242, 40, false, &[b'2'; 32]),
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        reassembled(&receiver),
        before,
        "y/b put together a datagram whose second half came after the revocation"
    );
    let line = wait_flow_log(&agents, "the late fragment", |v| {
        v["reason"] == "revoked" && v["direction"] == "egress"
    });
    assert_eq!(line["endpoint"], "x/a", "{line}");
    lab.down().expect("down");
}

/// A VLAN-tagged frame from a pod: the receiving veth moves the tag out of
/// the frame's data before TC runs (the frame looks untagged), while a bridge
/// forwards it tagged. Tagged traffic is refused however it is carried.
#[test]
fn vlan_tagged_traffic_from_a_pod_is_refused() {
    if !require_privileges("vlan_tagged_traffic_from_a_pod_is_refused") {
        return;
    }
    let (lab, agents, attacker) = setup('v');
    let target = pod(&lab, "y/a").clone();
    let mut frame = common::packets::udp(
        &format!("{}:5555", v4(&attacker)),
        &format!("{}:80", v4(&target)),
    )
    .vlan_tagged(10);
    frame[6..12].copy_from_slice(&pod_mac(&attacker));
    frame_send(&attacker, frame);
    let line = wait_flow_log(&agents, "the tagged frame", |v| {
        v["reason"] == "unsupported_ethertype"
    });
    assert_eq!(line["endpoint"], "y/c", "{line}");
    assert_eq!(line["verdict"], "deny");
    lab.down().expect("down");
}

/// Frames whose IP header is cut short. `BPF_PROG_TEST_RUN` on this kernel
/// refuses to build such an skb, so the verdict tests cannot run them; a pod
/// can still send them (AF_PACKET), and they reach the host veth's TC hook
/// before any IP validation. Each is dropped as malformed on the sender's
/// veth, with a flow-log line naming the pod.
#[test]
fn frames_with_cut_ip_headers_are_dropped_as_malformed() {
    if !require_privileges("frames_with_cut_ip_headers_are_dropped_as_malformed") {
        return;
    }
    let (lab, agents, attacker) = setup('t');
    let target = pod(&lab, "y/a").clone();
    let mac = pod_mac(&attacker);
    let v4_frame = common::packets::tcp(
        &format!("{}:5555", v4(&attacker)),
        &format!("{}:80", v4(&target)),
    )
    .syn()
    .frame();
    let v6_frame = common::packets::tcp(
        &format!("[{}]:5555", attacker.ip_v6),
        &format!("[{}]:80", target.ip_v6),
    )
    .syn()
    .frame();
    let cases = [
        ("IPv4 header cut to 12 bytes", &v4_frame, 14 + 12),
        ("IPv4 addresses cut", &v4_frame, 14 + 18),
        ("IPv6 header cut to 30 bytes", &v6_frame, 14 + 30),
    ];
    let malformed = |agents: &Agents| -> Vec<serde_json::Value> {
        agents
            .flow_logs()
            .into_iter()
            .map(|(_, v)| v)
            .filter(|v| v["reason"] == "malformed")
            .collect()
    };
    for (what, full, len) in cases {
        let before = malformed(&agents).len();
        let mut frame = full[..len].to_vec();
        frame[6..12].copy_from_slice(&mac);
        frame_send(&attacker, frame);
        let deadline = Instant::now() + Duration::from_secs(5);
        let line = loop {
            let now = malformed(&agents);
            if now.len() > before {
                break now[now.len() - 1].clone();
            }
            let logs = agents.flow_logs();
            assert!(
                Instant::now() < deadline,
                "{what}: no `malformed` flow-log line; lines:\n{}",
                logs.iter()
                    .map(|(l, _)| l.as_str())
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(line["verdict"], "deny", "{what}: {line}");
        assert_eq!(line["endpoint"], "y/c", "{what}: {line}");
    }
    lab.down().expect("down");
}

/// Neighbour discovery as a data channel: the attacker y/c (node-b) sends a
/// "neighbour advertisement" for its own address, hop limit 255 as ND must
/// have, with a payload, to the other node's address (a host no pod policy
/// guards, as any host outside the cluster). Routed, it would carry data past
/// policy. ND from a pod stays on the link: dropped on the attacker's veth as
/// nd_invalid, with a flow-log line naming y/c, and node-a receives nothing.
#[test]
fn neighbour_discovery_addressed_off_the_link_is_dropped() {
    if !require_privileges("neighbour_discovery_addressed_off_the_link_is_dropped") {
        return;
    }
    let (lab, agents, attacker) = setup('n');
    let target = lab.node("node-a").expect("node-a").clone();
    let (own, dst) = (attacker.ip_v6, target.ip_v6);
    // node-a listens for ICMPv6 type 136 while the attacker sends.
    let listener = {
        let target = target.clone();
        std::thread::spawn(move || {
            run_in_netns(&target.netns_path(), move || {
                // SAFETY: socket(2); the descriptor is owned right away.
                let fd =
                    unsafe { libc::socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6) };
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // SAFETY: fresh descriptor.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                let deadline = Instant::now() + Duration::from_secs(3);
                let mut n = 0;
                let mut buf = [0u8; 2048];
                while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                    let mut pfd = libc::pollfd {
                        fd: fd.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one pollfd we own.
                    if unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) } <= 0 {
                        break;
                    }
                    // SAFETY: the buffer outlives the call.
                    let got = unsafe {
                        libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
                    };
                    // Raw ICMPv6 sockets get the ICMPv6 message (no IP header).
                    if got > 24 && buf[0] == 136 && buf[24..got as usize].starts_with(b"exfil") {
                        n += 1;
                    }
                }
                Ok(n)
            })
            .expect("listen for ICMPv6")
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    run_in_netns(&attacker.netns_path(), move || {
        // SAFETY: socket(2); owned right away.
        let fd = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fresh descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let hops: libc::c_int = 255;
        // SAFETY: an int option of the right size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_IPV6,
                libc::IPV6_UNICAST_HOPS,
                std::ptr::from_ref(&hops).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        // type 136, code 0, checksum (the kernel fills it), flags, target = own
        // address, then the payload.
        let mut msg = vec![136u8, 0, 0, 0, 0x20, 0, 0, 0];
        msg.extend_from_slice(&own.octets());
        msg.extend_from_slice(b"exfil: a secret the policy would not let out");
        // SAFETY: all-zero is a valid sockaddr_in6.
        let mut addr: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        addr.sin6_family = libc::AF_INET6 as u16;
        addr.sin6_addr.s6_addr = dst.octets();
        for _ in 0..5 {
            // SAFETY: the buffer and the address outlive the call.
            let n = unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    msg.as_ptr().cast(),
                    msg.len(),
                    0,
                    std::ptr::from_ref(&addr).cast(),
                    std::mem::size_of::<libc::sockaddr_in6>() as u32,
                )
            };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    })
    .unwrap_or_else(|e| panic!("ND send from y/c: {e}"));
    let arrived = listener.join().expect("listener");
    assert_eq!(arrived, 0, "node-a received the attacker's ND payload");
    let line = wait_flow_log(&agents, "the off-link ND", |v| v["reason"] == "nd_invalid");
    assert_eq!(line["endpoint"], "y/c", "{line}");
    assert_eq!(line["verdict"], "deny", "{line}");
    lab.down().expect("down");
}
