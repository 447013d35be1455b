//! Verdicts of the uplink's XDP program (`netpol_xdp_uplink`, issue 17)
//! through `BPF_PROG_TEST_RUN`, with the maps filled from the agent's own
//! compiler: a denied new flow to a local pod is dropped and counted under
//! `xdp_deny`; everything else passes to the stack, where the veth's TC
//! program (`netpol_to_pod`, run on the same frames) still decides, and
//! decides the same whether XDP ran first or not.
//!
//! The local pod ("server") is the endpoint on ifindex 1, where
//! `BPF_PROG_TEST_RUN` runs a TC program; `NETPOL_LOCAL_ADDRS` names its
//! addresses, as the agent writes them. The clients are pods of another
//! node.
//!
//! These tests need root (CAP_BPF + CAP_NET_ADMIN). Without it they print
//! `SKIPPED: ...` to stderr and return, unless `CI=true`, where they fail.

mod common {
    pub mod packets;
}

use std::collections::{BTreeMap, BTreeSet};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use common::packets::{Packet, arp_request, echo_request, ip, sctp, tcp, udp};
use netpol_agent::{
    compiler::{Compiled, NodeInfo, compile},
    datapath::{EBPF_OBJECT, write_peer_v4, write_peer_v6, write_policy},
    model::{
        Cluster,
        build::{self as b, allow, cluster, labels, namespace, pod, pods, policy},
    },
};
use netpol_common::{
    CFG_F_AUDIT_ALL, COUNTER_SLOTS, ConfigValue, DIR_INGRESS, EPOCH_BIT, EndpointValue, FlowKey,
    FlowValue, LocalKey, PolicyKey, REASON_POLICY_DENY, REASON_SLOTS, REASON_XDP_DENY,
    VERDICT_DENY, VerdictEvent, XDP_REPLY_SLACK_NS, XdpReplyConfig, counter_index, direction_name,
    endpoint_key, epoch_policy_id, ip_bytes, map_names, prog_names, reason_name, xdp_reply_bucket,
};

/// The device `BPF_PROG_TEST_RUN` runs a TC program on: the server's veth.
const LO: u32 = 1;
const SERVER: &str = "10.1.0.2";
const SERVER6: &str = "fd00:1::2";
/// Allowed to the server on TCP/80, UDP/53 and SCTP/9 (another node).
const CLIENT: &str = "10.2.0.3";
const CLIENT6: &str = "fd00:2::3";
/// Selected by no rule (another node).
const ATTACKER: &str = "10.2.0.4";
const ATTACKER6: &str = "fd00:2::4";
/// A pod of another node: not local, not in `NETPOL_LOCAL_ADDRS`.
const ELSEWHERE: &str = "10.2.0.9";
/// A Service's ClusterIP, which kube-proxy translates to a backend.
const CLUSTER_IP: &str = "10.96.0.10";
/// Conntrack's timeouts the tests arm the reply records with.
const CT_UDP_S: u32 = 120;
const CT_SCTP_S: u32 = 210;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

fn at(addr: &str, port: u16) -> String {
    if addr.contains(':') {
        format!("[{addr}]:{port}")
    } else {
        format!("{addr}:{port}")
    }
}

#[track_caller]
fn skip(test: &str, why: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test} needs root/BPF and CI=true: {why}");
    }
    let bar = "*".repeat(70);
    let _ = std::io::Write::write_fmt(
        &mut std::io::stderr().lock(),
        format_args!("\n{bar}\nSKIPPED: {test} needs root/BPF ({why})\n{bar}\n"),
    );
}

/// The cluster: the server on this node (n1) is isolated for ingress and
/// allows the client pods; its egress is open.
fn the_cluster() -> Cluster {
    cluster()
        .namespace(namespace("x"))
        .pod(
            pod("x", "server")
                .labels([("app", "server")])
                .ip(SERVER)
                .ip(SERVER6)
                .node("n1"),
        )
        .pod(
            pod("x", "client")
                .labels([("role", "client")])
                .ip(CLIENT)
                .ip(CLIENT6)
                .node("n2"),
        )
        .pod(
            pod("x", "attacker")
                .labels([("role", "attacker")])
                .ip(ATTACKER)
                .ip(ATTACKER6)
                .node("n2"),
        )
        .policy(
            policy("x", "server-ingress")
                .select(labels([("app", "server")]))
                .ingress(
                    allow()
                        .from(pods(labels([("role", "client")])))
                        .port(b::tcp(80))
                        .port(b::udp(53))
                        .port(b::sctp(9)),
                ),
        )
}

struct Dp {
    ebpf: Ebpf,
    events: RingBuf<MapData>,
}

/// What one run did.
#[derive(Debug)]
struct Outcome {
    action: u32,
    moved: BTreeMap<u32, u64>,
    events: Vec<VerdictEvent>,
}

fn slot_name(slot: u32) -> String {
    format!(
        "{}/{}",
        direction_name((slot / REASON_SLOTS) as u8),
        reason_name((slot % REASON_SLOTS) as u8)
    )
}

impl Outcome {
    /// Only `xdp_deny` moved, by one, with one deny event naming the server.
    #[track_caller]
    fn dropped_at_xdp(&self) {
        assert_eq!(self.action, XDP_DROP, "XDP action: {self:?}");
        let want = BTreeMap::from([(counter_index(DIR_INGRESS, REASON_XDP_DENY), 1)]);
        let moved: BTreeMap<u32, u64> = self
            .moved
            .iter()
            .filter(|(s, _)| **s < 2 * REASON_SLOTS)
            .map(|(s, n)| (*s, *n))
            .collect();
        assert_eq!(
            moved,
            want,
            "counters moved: {:?}",
            moved.keys().map(|s| slot_name(*s)).collect::<Vec<_>>()
        );
        assert_eq!(self.events.len(), 1, "one event: {:?}", self.events);
        let ev = &self.events[0];
        assert_eq!(ev.reason, REASON_XDP_DENY);
        assert_eq!(ev.verdict, VERDICT_DENY);
        assert_eq!(ev.direction, DIR_INGRESS);
        assert_eq!(ev.ifindex, LO, "the event names the pod's veth");
    }

    /// Passed to the stack, nothing counted, nothing reported.
    #[track_caller]
    fn passed_untouched(&self) {
        assert_eq!(self.action, XDP_PASS, "XDP action: {self:?}");
        assert!(
            self.moved.is_empty(),
            "XDP counted a packet it passed: {:?}",
            self.moved.keys().map(|s| slot_name(*s)).collect::<Vec<_>>()
        );
        assert!(self.events.is_empty(), "events: {:?}", self.events);
    }
}

macro_rules! load_or_skip {
    ($name:literal) => {
        match Dp::load($name, &the_cluster()) {
            Some(dp) => dp,
            None => return,
        }
    };
}

impl Dp {
    /// A fresh object, unpinned, the XDP and TC programs loaded, the maps
    /// filled from `cluster` compiled for node n1 (server on ifindex 1).
    fn load(test: &str, cluster: &Cluster) -> Option<Self> {
        Self::load_in_epoch(test, cluster, 0)
    }

    /// [`Dp::load`], with the state written in `epoch` (keys and ids tagged,
    /// epoch 1's peer tries) and CONFIG naming it.
    fn load_in_epoch(test: &str, cluster: &Cluster, epoch: u32) -> Option<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            skip(test, "not running as root");
            return None;
        }
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(map_names::FLOWS, 1024)
            .map_max_entries(map_names::EVENTS, 1 << 16)
            .load(EBPF_OBJECT)
            .unwrap_or_else(|e| panic!("{test}: loading the eBPF object: {e:?}"));
        for name in [
            prog_names::TO_POD,
            prog_names::FROM_POD,
            prog_names::POST_NAT,
        ] {
            let p: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
            p.load()
                .unwrap_or_else(|e| panic!("{test}: loading {name}: {e:?}"));
        }
        let x: &mut Xdp = ebpf
            .program_mut(prog_names::XDP_UPLINK)
            .expect("program netpol_xdp_uplink in the object")
            .try_into()
            .expect("an XDP program");
        x.load()
            .unwrap_or_else(|e| panic!("{test}: loading the XDP program: {e:?}"));
        let compiled = compile(cluster, &NodeInfo::new("n1", ["10.1.0.1"]));
        fill(&mut ebpf, &compiled, epoch);
        let events = RingBuf::try_from(ebpf.take_map(map_names::EVENTS).unwrap()).unwrap();
        Some(Dp { ebpf, events })
    }

    fn set_config(&mut self, cfg: ConfigValue) {
        let mut m: Array<_, ConfigValue> =
            Array::try_from(self.ebpf.map_mut(map_names::CONFIG).unwrap()).unwrap();
        m.set(0, cfg, 0).unwrap();
    }

    fn counters(&self) -> Vec<u64> {
        let m: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map(map_names::COUNTERS).unwrap()).unwrap();
        (0..COUNTER_SLOTS)
            .map(|i| m.get(&i, 0).unwrap().iter().sum())
            .collect()
    }

    fn run_frame(&mut self, prog: &str, frame: &[u8]) -> Outcome {
        let before = self.counters();
        let opts = TestRunOptions {
            data_in: Some(frame),
            ..TestRunOptions::default()
        };
        let r = if prog == prog_names::XDP_UPLINK {
            let p: &Xdp = self.ebpf.program(prog).unwrap().try_into().unwrap();
            p.test_run(opts)
        } else {
            let p: &SchedClassifier = self.ebpf.program(prog).unwrap().try_into().unwrap();
            p.test_run(opts)
        }
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {prog}: {e:?}"));
        let after = self.counters();
        let moved = after
            .iter()
            .zip(&before)
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, (a, b))| (i as u32, a - b))
            .collect();
        let mut events = Vec::new();
        while let Some(item) = self.events.next() {
            events.push(VerdictEvent::from_bytes(&item).expect("a whole event"));
        }
        Outcome {
            action: r.return_value,
            moved,
            events,
        }
    }

    /// The reply records' configuration, as the agent arms it.
    fn set_xdp_config(&mut self, x: XdpReplyConfig) {
        let mut m: Array<_, XdpReplyConfig> =
            Array::try_from(self.ebpf.map_mut(map_names::XDP_CONFIG).unwrap()).unwrap();
        m.set(0, x, 0).unwrap();
    }

    /// The reply record of `p`'s 5-tuple as it arrives at the uplink.
    fn reply_record(&self, p: &Packet) -> u64 {
        let m: Array<_, u64> =
            Array::try_from(self.ebpf.map(map_names::XDP_REPLIES).unwrap()).unwrap();
        m.get(&bucket_of(p), 0).unwrap()
    }

    fn set_reply_record(&mut self, p: &Packet, ns: u64) {
        let mut m: Array<_, u64> =
            Array::try_from(self.ebpf.map_mut(map_names::XDP_REPLIES).unwrap()).unwrap();
        m.set(bucket_of(p), ns, 0).unwrap();
    }

    /// Forget every flow entry whose remote address is `addr`, as the LRU
    /// evicts them when the table is full.
    fn evict_flows_with(&mut self, addr: &str) -> usize {
        let (_, bytes) = ip_bytes(ip(addr));
        let mut m: HashMap<_, FlowKey, FlowValue> =
            HashMap::try_from(self.ebpf.map_mut(map_names::FLOWS).unwrap()).unwrap();
        let keys: Vec<FlowKey> = m
            .keys()
            .map(|k| k.unwrap())
            .filter(|k| k.remote_addr == bytes)
            .collect();
        for k in &keys {
            m.remove(k).unwrap();
        }
        keys.len()
    }

    /// A local pod's packet leaves the node by one of its devices, after
    /// kube-proxy's DNAT (`netpol_post_nat`).
    fn leaves_node(&mut self, frame: &[u8]) -> Outcome {
        self.run_frame(prog_names::POST_NAT, frame)
    }

    /// The frame arrives on the node's uplink.
    fn uplink(&mut self, frame: &[u8]) -> Outcome {
        self.run_frame(prog_names::XDP_UPLINK, frame)
    }
    /// The frame reaches the server's veth (what it receives).
    fn at_veth(&mut self, frame: &[u8]) -> Outcome {
        self.run_frame(prog_names::TO_POD, frame)
    }
    /// The server sends the frame.
    fn server_sends(&mut self, frame: &[u8]) -> Outcome {
        self.run_frame(prog_names::FROM_POD, frame)
    }

    fn flows(&self) -> BTreeSet<Vec<u8>> {
        let m: HashMap<_, FlowKey, FlowValue> =
            HashMap::try_from(self.ebpf.map(map_names::FLOWS).unwrap()).unwrap();
        m.keys()
            .map(|k| {
                let k = k.unwrap();
                // SAFETY: FlowKey is plain old data.
                unsafe {
                    std::slice::from_raw_parts(
                        (&k as *const FlowKey).cast::<u8>(),
                        std::mem::size_of::<FlowKey>(),
                    )
                }
                .to_vec()
            })
            .collect()
    }
}

/// `CLOCK_MONOTONIC`, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    netpol_agent::xdp::monotonic_ns()
}

/// The reply window of UDP with the armed timeouts (the flow table's idle
/// timeout is shorter): a record older than this is stale.
fn udp_window_ns() -> u64 {
    u64::from(CT_UDP_S.max(netpol_common::DEFAULT_TIMEOUT_UDP_S)) * 1_000_000_000
        + XDP_REPLY_SLACK_NS
}

/// The `NETPOL_XDP_RPLY` bucket of a packet arriving at the uplink.
fn bucket_of(p: &Packet) -> u32 {
    let f = p.frame();
    // Ethernet, then IPv4 (20-byte header in these tests) or IPv6.
    let (proto, s, d, l4) = if f[12..14] == [0x08, 0x00] {
        let mut s = [0u8; 16];
        let mut d = [0u8; 16];
        s[..4].copy_from_slice(&f[26..30]);
        d[..4].copy_from_slice(&f[30..34]);
        (f[23], s, d, 34)
    } else {
        let mut s = [0u8; 16];
        let mut d = [0u8; 16];
        s.copy_from_slice(&f[22..38]);
        d.copy_from_slice(&f[38..54]);
        (f[20], s, d, 54)
    };
    let sport = u16::from_be_bytes([f[l4], f[l4 + 1]]);
    let dport = u16::from_be_bytes([f[l4 + 2], f[l4 + 3]]);
    xdp_reply_bucket(proto, &s, sport, &d, dport)
}

/// Write the compiled maps the way the agent does, for the server on `LO`.
fn fill(ebpf: &mut Ebpf, compiled: &Compiled, epoch: u32) {
    let server = netpol_agent::model::PodRef::new("x", "server");
    let mut ep = *compiled
        .maps
        .endpoints
        .get(&server)
        .expect("the server is an endpoint of n1");
    {
        let mut m: HashMap<_, u32, EndpointValue> =
            HashMap::try_from(ebpf.map_mut(map_names::ENDPOINTS).unwrap()).unwrap();
        ep.policy_id = epoch_policy_id(ep.policy_id, epoch);
        m.insert(endpoint_key(LO, epoch), ep, 0).unwrap();
    }
    {
        let mut m: HashMap<_, LocalKey, u32> =
            HashMap::try_from(ebpf.map_mut(map_names::LOCAL_ADDRS).unwrap()).unwrap();
        for a in [SERVER, SERVER6] {
            let (family, bytes) = ip_bytes(ip(a));
            m.insert(LocalKey::new(family, bytes), LO, 0).unwrap();
        }
    }
    for ((addr, len), v) in &compiled.maps.peers_v4 {
        write_peer_v4(ebpf, epoch, *addr, *len, Some(*v)).unwrap();
    }
    for ((addr, len), v) in &compiled.maps.peers_v6 {
        write_peer_v6(ebpf, epoch, *addr, *len, Some(*v)).unwrap();
    }
    for ((k, len), v) in &compiled.maps.policy {
        let k = PolicyKey {
            policy_id: epoch_policy_id(k.policy_id, epoch),
            ..*k
        };
        write_policy(ebpf, k, *len, Some(*v)).unwrap();
    }
    {
        let mut m: Array<_, ConfigValue> =
            Array::try_from(ebpf.map_mut(map_names::CONFIG).unwrap()).unwrap();
        m.set(
            0,
            ConfigValue {
                generation: 1 | if epoch == 0 { 0 } else { EPOCH_BIT },
                events_per_sec: 1_000_000,
                ..ConfigValue::default()
            },
            0,
        )
        .unwrap();
    }
    {
        // Armed long ago (records kept for more than a reply window), as on
        // a node whose agent has run for a while.
        let mut m: Array<_, XdpReplyConfig> =
            Array::try_from(ebpf.map_mut(map_names::XDP_CONFIG).unwrap()).unwrap();
        m.set(
            0,
            XdpReplyConfig {
                records_since_ns: 1,
                conntrack_udp_s: CT_UDP_S,
                conntrack_sctp_s: CT_SCTP_S,
            },
            0,
        )
        .unwrap();
    }
}

/// New flows the server's ingress policy denies: the attacker's, and the
/// client's on a port no rule opens.
fn denied_new_flows() -> Vec<Packet> {
    vec![
        tcp(&at(ATTACKER, 40000), &at(SERVER, 80)).syn(),
        tcp(&at(ATTACKER6, 40000), &at(SERVER6, 80)).syn(),
        tcp(&at(CLIENT, 40001), &at(SERVER, 81)).syn(),
        udp(&at(ATTACKER, 40002), &at(SERVER, 53)),
        udp(&at(ATTACKER6, 40002), &at(SERVER6, 53)),
        sctp(&at(ATTACKER, 40003), &at(SERVER, 9)),
    ]
}

fn allowed_new_flows() -> Vec<Packet> {
    vec![
        tcp(&at(CLIENT, 40000), &at(SERVER, 80)).syn(),
        tcp(&at(CLIENT6, 40000), &at(SERVER6, 80)).syn(),
        udp(&at(CLIENT, 40002), &at(SERVER, 53)),
        sctp(&at(CLIENT, 40003), &at(SERVER, 9)),
    ]
}

#[test]
fn a_denied_new_flow_is_dropped_at_xdp_under_its_own_reason() {
    let mut dp = load_or_skip!("a_denied_new_flow_is_dropped_at_xdp_under_its_own_reason");
    for p in denied_new_flows() {
        dp.uplink(&p.frame()).dropped_at_xdp();
        // The veth, without XDP in front, denies the same packet.
        let tc = dp.at_veth(&p.frame());
        assert_eq!(tc.action, TC_ACT_SHOT, "{p:?}");
        assert!(
            tc.moved
                .contains_key(&counter_index(DIR_INGRESS, REASON_POLICY_DENY)),
            "{p:?}: {:?}",
            tc.moved
        );
    }
    assert!(dp.flows().is_empty(), "a drop opened a flow entry");
}

/// XDP judges with the state of the epoch CONFIG names, as the veth does: with everything
/// written in epoch 1 (and nothing in epoch 0), denied new flows are dropped at XDP and
/// allowed ones pass. Reading the endpoint untagged (epoch 0) would find no endpoint and
/// pass every denied flow to the veth, or, with an older state in epoch 0, judge by it.
#[test]
fn xdp_judges_in_the_epoch_the_config_names() {
    let Some(mut dp) = Dp::load_in_epoch(
        "xdp_judges_in_the_epoch_the_config_names",
        &the_cluster(),
        1,
    ) else {
        return;
    };
    for p in denied_new_flows() {
        dp.uplink(&p.frame()).dropped_at_xdp();
    }
    for p in allowed_new_flows() {
        dp.uplink(&p.frame()).passed_untouched();
        assert_eq!(dp.at_veth(&p.frame()).action, TC_ACT_OK, "{p:?}");
    }
}

#[test]
fn an_allowed_new_flow_passes_xdp_and_the_veth_opens_it() {
    let mut dp = load_or_skip!("an_allowed_new_flow_passes_xdp_and_the_veth_opens_it");
    for p in allowed_new_flows() {
        let before = dp.flows();
        dp.uplink(&p.frame()).passed_untouched();
        assert_eq!(dp.flows(), before, "XDP wrote the flow table for {p:?}");
        assert_eq!(dp.at_veth(&p.frame()).action, TC_ACT_OK, "{p:?}");
        assert_ne!(dp.flows(), before, "the veth opened no flow for {p:?}");
        // Its next packets are established: still passed.
        dp.uplink(&p.frame()).passed_untouched();
    }
}

#[test]
fn a_reply_to_a_connection_the_pod_opened_passes_though_ingress_denies_it() {
    let mut dp =
        load_or_skip!("a_reply_to_a_connection_the_pod_opened_passes_though_ingress_denies_it");
    let sent = udp(&at(SERVER, 5353), &at(ATTACKER, 9000));
    let reply = sent.reversed();
    let sent6 = udp(&at(SERVER6, 5353), &at(ATTACKER6, 9000));
    let reply6 = sent6.reversed();
    // Before the server speaks, the attacker's datagram is a denied new flow.
    dp.uplink(&reply.frame()).dropped_at_xdp();
    dp.uplink(&reply6.frame()).dropped_at_xdp();
    assert_eq!(dp.server_sends(&sent.frame()).action, TC_ACT_OK);
    assert_eq!(dp.server_sends(&sent6.frame()).action, TC_ACT_OK);
    dp.uplink(&reply.frame()).passed_untouched();
    dp.uplink(&reply6.frame()).passed_untouched();
    assert_eq!(dp.at_veth(&reply.frame()).action, TC_ACT_OK);
    // A TCP connection the server opened: the SYN-ACK passes too.
    let syn = tcp(&at(SERVER, 41000), &at(ATTACKER, 8080)).syn();
    assert_eq!(dp.server_sends(&syn.frame()).action, TC_ACT_OK);
    dp.uplink(&syn.reversed().syn_ack().frame())
        .passed_untouched();
}

#[test]
fn what_xdp_cannot_or_must_not_judge_passes_to_the_stack() {
    let mut dp = load_or_skip!("what_xdp_cannot_or_must_not_judge_passes_to_the_stack");
    let denied = tcp(&at(ATTACKER, 40000), &at(SERVER, 80)).syn();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "first fragment",
            udp(&at(ATTACKER, 40002), &at(SERVER, 53))
                .payload(&[0; 64])
                .first_fragment(7)
                .frame(),
        ),
        (
            "later fragment",
            udp(&at(ATTACKER, 40002), &at(SERVER, 53))
                .later_fragment(7, 8)
                .frame(),
        ),
        (
            "IPv6 first fragment",
            udp(&at(ATTACKER6, 40002), &at(SERVER6, 53))
                .payload(&[0; 64])
                .first_fragment(8)
                .frame(),
        ),
        ("ARP", arp_request(ATTACKER, SERVER)),
        ("VLAN-tagged SYN", denied.vlan_tagged(5)),
        (
            "frame cut in the IP header",
            denied.frame_truncated(14 + 10),
        ),
        (
            "frame cut in the TCP header",
            denied.frame_truncated(14 + 20 + 12),
        ),
        ("Ethernet header only", denied.frame_truncated(14)),
        (
            "to another node's pod",
            tcp(&at(ATTACKER, 40000), &at(ELSEWHERE, 80)).syn().frame(),
        ),
        (
            "to the node itself",
            tcp(&at(ATTACKER, 40000), &at("10.1.0.1", 80)).syn().frame(),
        ),
        (
            "TCP without SYN, no flow",
            tcp(&at(ATTACKER, 40000), &at(SERVER, 80)).frame(),
        ),
        (
            "ICMP echo (the veth decides ICMP)",
            echo_request(ATTACKER, SERVER, 1).frame(),
        ),
    ];
    for (what, frame) in &cases {
        let o = dp.uplink(frame);
        assert_eq!(o.action, XDP_PASS, "{what}: {o:?}");
        assert!(o.moved.is_empty(), "{what}: {:?}", o.moved);
        assert!(o.events.is_empty(), "{what}: {:?}", o.events);
    }
    assert!(dp.flows().is_empty());
}

#[test]
fn audit_mode_passes_to_the_veth() {
    let mut dp = load_or_skip!("audit_mode_passes_to_the_veth");
    let denied = tcp(&at(ATTACKER, 40000), &at(SERVER, 80)).syn();
    dp.uplink(&denied.frame()).dropped_at_xdp();
    dp.set_config(ConfigValue {
        generation: 1,
        events_per_sec: 1_000_000,
        flags: CFG_F_AUDIT_ALL,
        ..ConfigValue::default()
    });
    dp.uplink(&denied.frame()).passed_untouched();
    assert_eq!(dp.at_veth(&denied.frame()).action, TC_ACT_OK);
}

/// The same sequence of packets through two copies of the datapath: the
/// veth alone, and XDP in front of the veth (a packet XDP drops never
/// reaches it). Every packet gets the same fate and the flow tables end
/// equal: XDP moves drops earlier and changes nothing else.
#[test]
fn xdp_in_front_changes_no_verdict() {
    let mut tc_only = load_or_skip!("xdp_in_front_changes_no_verdict");
    let mut with_xdp = load_or_skip!("xdp_in_front_changes_no_verdict");
    let mut sequence: Vec<(&str, Packet)> = Vec::new();
    for p in denied_new_flows() {
        sequence.push(("in", p));
    }
    for p in allowed_new_flows() {
        sequence.push(("in", p.clone()));
        sequence.push(("out", p.reversed()));
        sequence.push(("in", p.reversed().reversed()));
    }
    let out = udp(&at(SERVER, 5353), &at(ATTACKER, 9000));
    sequence.push(("in", out.reversed()));
    sequence.push(("out", out.clone()));
    sequence.push(("in", out.reversed()));
    sequence.push(("in", tcp(&at(ATTACKER, 40000), &at(SERVER, 80))));
    sequence.push(("in", echo_request(ATTACKER, SERVER, 3)));
    sequence.push(("in", echo_request(CLIENT, SERVER, 3)));
    sequence.push((
        "in",
        udp(&at(ATTACKER, 40002), &at(SERVER, 53))
            .payload(&[0; 64])
            .first_fragment(9),
    ));
    sequence.push((
        "in",
        udp(&at(ATTACKER, 40002), &at(SERVER, 53)).later_fragment(9, 8),
    ));
    let mut xdp_drops = 0;
    for (dir, p) in &sequence {
        let f = p.frame();
        let (a, b) = if *dir == "out" {
            (
                tc_only.server_sends(&f).action == TC_ACT_OK,
                with_xdp.server_sends(&f).action == TC_ACT_OK,
            )
        } else {
            let a = tc_only.at_veth(&f).action == TC_ACT_OK;
            let b = match with_xdp.uplink(&f).action {
                XDP_DROP => {
                    xdp_drops += 1;
                    false
                }
                _ => with_xdp.at_veth(&f).action == TC_ACT_OK,
            };
            (a, b)
        };
        assert_eq!(a, b, "{dir} {p:?}: passed without XDP: {a}, with: {b}");
    }
    assert!(
        xdp_drops > 0,
        "XDP dropped nothing: the comparison is empty"
    );
    assert_eq!(tc_only.flows(), with_xdp.flows(), "flow tables differ");
}

/// The server sends UDP to a Service; kube-proxy's DNAT sends it to a
/// backend on another node (the attacker's address: a pod the server's
/// ingress policy does not admit). The flow table then holds the veth's
/// ClusterIP-keyed entry and the backend-keyed one `netpol_post_nat` wrote.
/// The LRU evicts the backend-keyed entry. The backend's reply reaches the
/// uplink from the backend's address with no entry under it; conntrack
/// turns its source back into the ClusterIP before the veth, where the
/// ClusterIP-keyed entry passes it. XDP must pass it too. Before the reply
/// records, XDP judged it as a new flow from the backend and dropped it.
#[test]
fn a_service_reply_whose_backend_entry_was_evicted_passes_xdp() {
    let mut dp = load_or_skip!("a_service_reply_whose_backend_entry_was_evicted_passes_xdp");
    for (server, cip, backend) in [
        (SERVER, CLUSTER_IP, ATTACKER),
        (SERVER6, "fd00:96::a", ATTACKER6),
    ] {
        for proto in ["udp", "sctp"] {
            let mk = |src: &str, dst: &str| {
                if proto == "udp" {
                    udp(src, dst)
                } else {
                    sctp(src, dst)
                }
            };
            // What the server sends, on its veth and after the DNAT.
            let to_service = mk(&at(server, 5353), &at(cip, 53));
            let to_backend = mk(&at(server, 5353), &at(backend, 53));
            // The backend's reply at the uplink, and after conntrack's
            // un-DNAT at the server's veth.
            let reply = to_backend.reversed();
            let reply_at_veth = to_service.reversed();

            assert_eq!(dp.server_sends(&to_service.frame()).action, TC_ACT_OK);
            assert_eq!(dp.leaves_node(&to_backend.frame()).action, TC_ACT_OK);
            assert!(
                dp.evict_flows_with(backend) > 0,
                "{proto}: no backend-keyed entry to evict"
            );

            let o = dp.uplink(&reply.frame());
            assert_eq!(
                o.action, XDP_PASS,
                "{proto} {backend}: XDP dropped a Service reply the veth passes: {o:?}"
            );
            assert!(o.moved.is_empty() && o.events.is_empty(), "{o:?}");
            assert_eq!(
                dp.at_veth(&reply_at_veth.frame()).action,
                TC_ACT_OK,
                "{proto}: the veth passes the un-DNATed reply (ClusterIP-keyed entry)"
            );
            // The flood XDP is for is still dropped there: the same backend
            // from a port the server never sent to.
            dp.uplink(&mk(&at(backend, 40002), &at(server, 5353)).frame())
                .dropped_at_xdp();
        }
    }
}

/// The reply window: a datagram whose 5-tuple was seen (sent by a local pod
/// after the DNAT, or passed by XDP) within the window passes and renews
/// its record; one seen only before the window is judged, and dropped if
/// denied.
#[test]
fn a_reply_record_expires_after_the_reply_window() {
    let mut dp = load_or_skip!("a_reply_record_expires_after_the_reply_window");
    let flood = udp(&at(ATTACKER, 40002), &at(SERVER, 53));
    let window = udp_window_ns();

    let now = monotonic_ns();
    dp.set_reply_record(&flood, now - window + 10_000_000_000);
    dp.uplink(&flood.frame()).passed_untouched();
    assert!(
        dp.reply_record(&flood) >= now,
        "XDP passed a possible reply without renewing its record"
    );

    dp.set_reply_record(&flood, monotonic_ns() - window - 2_000_000_000);
    dp.uplink(&flood.frame()).dropped_at_xdp();

    // A packet the server sends out of the node renews the record of its
    // reply, and that reply passes.
    assert_eq!(dp.leaves_node(&flood.reversed().frame()).action, TC_ACT_OK);
    assert!(dp.reply_record(&flood) >= now);
    dp.uplink(&flood.frame()).passed_untouched();
}

/// Until the agent arms the records, and for a whole reply window after it
/// does, XDP drops no UDP or SCTP (flows opened before the records started
/// may still be live in conntrack); a TCP SYN is never a reply, and is
/// dropped all along.
#[test]
fn udp_and_sctp_are_dropped_only_once_the_records_cover_a_window() {
    let mut dp = load_or_skip!("udp_and_sctp_are_dropped_only_once_the_records_cover_a_window");
    let syn = tcp(&at(ATTACKER, 40000), &at(SERVER, 80)).syn();
    let datagrams = [
        udp(&at(ATTACKER, 40002), &at(SERVER, 53)),
        udp(&at(ATTACKER6, 40002), &at(SERVER6, 53)),
        sctp(&at(ATTACKER, 40003), &at(SERVER, 9)),
    ];
    for (what, x) in [
        ("not armed", XdpReplyConfig::default()),
        (
            "armed just now",
            XdpReplyConfig {
                records_since_ns: monotonic_ns(),
                conntrack_udp_s: CT_UDP_S,
                conntrack_sctp_s: CT_SCTP_S,
            },
        ),
    ] {
        dp.set_xdp_config(x);
        for d in &datagrams {
            let o = dp.uplink(&d.frame());
            assert_eq!(o.action, XDP_PASS, "{what}: {d:?}: {o:?}");
            assert_eq!(dp.at_veth(&d.frame()).action, TC_ACT_SHOT, "{d:?}");
        }
        dp.uplink(&syn.frame()).dropped_at_xdp();
    }
    // SCTP's window is conntrack's SCTP timeout: armed longer ago than the
    // UDP window but not the SCTP one, UDP is dropped and SCTP is not.
    dp.set_xdp_config(XdpReplyConfig {
        records_since_ns: monotonic_ns() - udp_window_ns() - 1_000_000_000,
        conntrack_udp_s: CT_UDP_S,
        conntrack_sctp_s: 100_000,
    });
    let fresh = udp(&at(ATTACKER, 40100), &at(SERVER, 53));
    dp.uplink(&fresh.frame()).dropped_at_xdp();
    let o = dp.uplink(&sctp(&at(ATTACKER, 40101), &at(SERVER, 9)).frame());
    assert_eq!(o.action, XDP_PASS, "{o:?}");
}

/// Multi-buffer packets (the program is loaded with `xdp.frags`, so a
/// device with a jumbo MTU keeps native XDP: `lab_xdp.rs` checks the
/// attachment): `BPF_PROG_TEST_RUN` builds one from a frame longer than a
/// page's linear part. The headers are in the linear part, the datagram's
/// length covers the fragments: a denied jumbo datagram is dropped, an
/// allowed one passes, as a short one would. (Judged by the linear part's
/// length alone, the datagram looked truncated and passed: this test failed.)
#[test]
fn a_multi_buffer_jumbo_frame_is_judged_like_a_short_one() {
    let mut dp = load_or_skip!("a_multi_buffer_jumbo_frame_is_judged_like_a_short_one");
    let jumbo = [0u8; 8000];
    for (denied, allowed) in [
        (
            udp(&at(ATTACKER, 40002), &at(SERVER, 53)),
            udp(&at(CLIENT, 40002), &at(SERVER, 53)),
        ),
        (
            udp(&at(ATTACKER6, 40002), &at(SERVER6, 53)),
            udp(&at(CLIENT6, 40002), &at(SERVER6, 53)),
        ),
    ] {
        let frame = denied.clone().payload(&jumbo).frame();
        assert!(frame.len() > 4096, "not a multi-buffer frame");
        dp.uplink(&frame).dropped_at_xdp();
        // The veth denies the same datagram (a short one: BPF_PROG_TEST_RUN
        // builds no skb longer than a page).
        assert_eq!(dp.at_veth(&denied.frame()).action, TC_ACT_SHOT);
        dp.uplink(&allowed.clone().payload(&jumbo).frame())
            .passed_untouched();
    }
    // A jumbo frame whose IP length claims more than the frame holds: not
    // parsed, passed to the stack (which drops it, or the veth does).
    let mut cut = udp(&at(ATTACKER, 40002), &at(SERVER, 53))
        .payload(&jumbo)
        .frame();
    cut.truncate(6000);
    dp.uplink(&cut).passed_untouched();
}

/// `NETPOL_LOCAL_ADDRS` is written in place, outside the epochs, so it may
/// still name the server's veth for an address that veth's endpoint in this
/// epoch does not carry (the address of the pod the veth had in the other
/// state). XDP must not judge such a packet with the server's ingress policy
/// (which denies the attacker): it leaves it to the veth, which decides with
/// the state its own run reads.
#[test]
fn an_address_the_endpoint_does_not_carry_is_left_to_the_veth() {
    const STALE: &str = "10.1.0.77";
    const STALE6: &str = "fd00:1::77";
    let mut dp = load_or_skip!("an_address_the_endpoint_does_not_carry_is_left_to_the_veth");
    {
        let mut m: HashMap<_, LocalKey, u32> =
            HashMap::try_from(dp.ebpf.map_mut(map_names::LOCAL_ADDRS).unwrap()).unwrap();
        for a in [STALE, STALE6] {
            let (family, bytes) = ip_bytes(ip(a));
            m.insert(LocalKey::new(family, bytes), LO, 0).unwrap();
        }
    }
    for p in [
        tcp(&at(ATTACKER, 40000), &at(STALE, 80)).syn(),
        tcp(&at(ATTACKER6, 40000), &at(STALE6, 80)).syn(),
        udp(&at(ATTACKER, 40002), &at(STALE, 53)),
    ] {
        dp.uplink(&p.frame()).passed_untouched();
    }
    // The same packets to the address the endpoint carries are still dropped.
    for p in denied_new_flows() {
        dp.uplink(&p.frame()).dropped_at_xdp();
    }
}
