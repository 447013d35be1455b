//! Flow-table shares through `BPF_PROG_TEST_RUN` (issue 12, item 6): a pod
//! opening flows beyond its share is refused them (`flow_quota`), and
//! another pod's idle allowed flow is never evicted for them.
//!
//! Two endpoints: A on loopback (where `BPF_PROG_TEST_RUN` runs a packet by
//! default) and B on another device of this network namespace, chosen
//! through the `__sk_buff` context's `ifindex` (the packet is only run
//! through the program, never sent). Each test pins its thread to one CPU,
//! so that every run uses the same per-CPU slot ring.
//!
//! These tests need root (CAP_BPF + CAP_NET_ADMIN). Without it they print
//! `SKIPPED: ...` to stderr and return, unless `CI=true`, where they fail.

mod common {
    pub mod packets;
}

use std::{collections::BTreeMap, time::Duration};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use common::packets::{Packet, tcp};
use netpol_agent::datapath::{EBPF_OBJECT, write_peer_v4, write_policy};
use netpol_common::{
    COUNTER_SLOTS, ConfigValue, DIR_EGRESS, DIR_INGRESS, EP_F_EGRESS_ISOLATED,
    EP_F_INGRESS_ISOLATED, EndpointValue, FlowKey, FlowValue, POLICY_PREFIX_FULL, PROTO_TCP,
    PeerValue, PolicyKey, PolicyValue, QuotaConfig, QuotaState, REASON_FLOW_QUOTA,
    REASON_POLICY_ALLOW, REASON_POLICY_DENY, REASON_REPLY, VERDICT_DENY, VerdictEvent,
    counter_index, ip_bytes, map_names, prog_names, reason_name,
};

const LO: u32 = 1;
/// Pod A, behind loopback: the one that floods.
const POD_A: &str = "10.0.0.1";
/// Pod B, behind the other device: its idle flow must survive.
const POD_B: &str = "10.0.0.5";
/// The server both talk to (egress allowed to it on TCP/80).
const PEER: &str = "10.0.0.2";
const PEER_ID: u32 = 100;
const WORLD_ID: u32 = 1;
const POLICY: u32 = 7;
const RULE: u32 = 31;

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

/// Offset of `ifindex` in `struct __sk_buff` (after len, pkt_type, mark,
/// queue_mapping, protocol, vlan_present, vlan_tci, vlan_proto, priority,
/// ingress_ifindex).
const SKB_IFINDEX_OFF: usize = 40;

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

fn at(addr: &str, port: u16) -> String {
    format!("{addr}:{port}")
}

/// An Ethernet device of this network namespace other than loopback, for
/// endpoint B.
fn other_device() -> Option<u32> {
    let mut found: Vec<u32> = std::fs::read_dir("/sys/class/net")
        .ok()?
        .flatten()
        .filter(|e| std::fs::read_to_string(e.path().join("type")).is_ok_and(|t| t.trim() == "1"))
        .filter_map(|e| {
            std::fs::read_to_string(e.path().join("ifindex"))
                .ok()?
                .trim()
                .parse()
                .ok()
        })
        .filter(|i| *i > 1)
        .collect();
    found.sort();
    found.first().copied()
}

/// Pin this thread to the CPU it is on: one slot ring per endpoint.
fn pin_to_current_cpu() {
    // SAFETY: plain libc calls on a zeroed cpu_set_t owned by this frame.
    unsafe {
        let cpu = libc::sched_getcpu();
        assert!(cpu >= 0, "sched_getcpu");
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        let rc = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(rc, 0, "sched_setaffinity");
    }
}

struct Dp {
    ebpf: Ebpf,
    events: RingBuf<MapData>,
    config: ConfigValue,
    /// B's device.
    b: u32,
}

#[derive(Debug)]
struct Outcome {
    action: u32,
    moved: BTreeMap<u32, u64>,
    events: Vec<VerdictEvent>,
}

impl Outcome {
    #[track_caller]
    fn passed(&self, direction: u8, reason: u8) -> &Self {
        self.expect(TC_ACT_OK, direction, reason)
    }
    #[track_caller]
    fn dropped(&self, direction: u8, reason: u8) -> &Self {
        self.expect(TC_ACT_SHOT, direction, reason)
    }
    #[track_caller]
    fn expect(&self, action: u32, direction: u8, reason: u8) -> &Self {
        assert_eq!(
            self.action,
            action,
            "expected action {action} ({}), got {self:?}",
            reason_name(reason)
        );
        let slot = counter_index(direction, reason);
        assert_eq!(
            self.moved.get(&slot),
            Some(&1),
            "counter {} did not move by one: {self:?}",
            reason_name(reason)
        );
        self
    }
}

impl Dp {
    fn load(test: &str, flows: u32, slots_per_cpu: u32) -> Option<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            skip(test, "not running as root");
            return None;
        }
        let Some(b) = other_device() else {
            skip(
                test,
                "no Ethernet device besides loopback to put endpoint B on",
            );
            return None;
        };
        pin_to_current_cpu();
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(map_names::FLOWS, flows)
            .map_max_entries(map_names::QUOTA_SLOTS, flows)
            .map_max_entries(map_names::QUOTA_STATE, 64)
            .map_max_entries(map_names::FRAGS, 256)
            .map_max_entries(map_names::ENDPOINTS, 64)
            .map_max_entries(map_names::PEERS_V4, 256)
            .map_max_entries(map_names::PEERS_V6, 256)
            .map_max_entries(map_names::POLICY, 1024)
            .map_max_entries(map_names::EVENTS, 1 << 16);
        let mut ebpf = match loader.load(EBPF_OBJECT) {
            Ok(e) => e,
            Err(e) => panic!("{test}: loading the eBPF object: {e:?}"),
        };
        for name in [prog_names::FROM_POD, prog_names::TO_POD] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .expect("program")
                .try_into()
                .expect("a TC classifier");
            prog.load()
                .unwrap_or_else(|e| panic!("{test}: loading {name}: {e:?}"));
        }
        let events = RingBuf::try_from(ebpf.take_map(map_names::EVENTS).expect("events map"))
            .expect("ring buffer");
        let mut dp = Dp {
            ebpf,
            events,
            config: ConfigValue {
                generation: 1,
                events_per_sec: 1_000_000,
                ..ConfigValue::default()
            },
            b,
        };
        dp.write_config();
        {
            let mut m: Array<_, QuotaConfig> =
                Array::try_from(dp.ebpf.map_mut(map_names::QUOTA_CONFIG).unwrap()).unwrap();
            m.set(
                0,
                QuotaConfig {
                    slots_per_cpu,
                    _pad: 0,
                },
                0,
            )
            .unwrap();
        }
        {
            let world = PeerValue::new(WORLD_ID, 0);
            write_peer_v4(&mut dp.ebpf, 0, [0, 0, 0, 0].into(), 0, Some(world)).unwrap();
            let peer = PeerValue::new(PEER_ID, 0);
            write_peer_v4(&mut dp.ebpf, 0, [10, 0, 0, 2].into(), 32, Some(peer)).unwrap();
        }
        // Both pods: isolated both ways, egress allowed to PEER on TCP/80.
        {
            let mut m: HashMap<_, u32, EndpointValue> =
                HashMap::try_from(dp.ebpf.map_mut(map_names::ENDPOINTS).unwrap()).unwrap();
            for (ifindex, pod, id) in [(LO, POD_A, 1), (b, POD_B, 2)] {
                let ep =
                    EndpointValue::new(POLICY, id, EP_F_INGRESS_ISOLATED | EP_F_EGRESS_ISOLATED)
                        .with_addresses([pod.parse().unwrap()], None);
                m.insert(ifindex, ep, 0).unwrap();
            }
        }
        {
            let k = PolicyKey::new(POLICY, PEER_ID, DIR_EGRESS, PROTO_TCP, 80);
            let v = PolicyValue::allow(RULE);
            write_policy(&mut dp.ebpf, k, POLICY_PREFIX_FULL, Some(v)).unwrap();
        }
        Some(dp)
    }

    fn write_config(&mut self) {
        let mut m: Array<_, ConfigValue> =
            Array::try_from(self.ebpf.map_mut(map_names::CONFIG).unwrap()).unwrap();
        m.set(0, self.config, 0).unwrap();
    }

    fn counters(&self) -> Vec<u64> {
        let m: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map(map_names::COUNTERS).unwrap()).unwrap();
        (0..COUNTER_SLOTS)
            .map(|i| m.get(&i, 0).unwrap().iter().sum())
            .collect()
    }

    /// Run `pkt` through `prog` on the device `ifindex`.
    fn run(&mut self, prog: &str, ifindex: u32, pkt: &Packet) -> Outcome {
        let before = self.counters();
        let mut ctx = [0u8; 48];
        if ifindex != LO {
            ctx[SKB_IFINDEX_OFF..SKB_IFINDEX_OFF + 4].copy_from_slice(&ifindex.to_ne_bytes());
        }
        let frame = pkt.frame();
        let p: &SchedClassifier = self.ebpf.program(prog).unwrap().try_into().unwrap();
        let r = p
            .test_run(TestRunOptions {
                data_in: Some(&frame),
                ctx_in: Some(&ctx),
                ..TestRunOptions::default()
            })
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {prog} on {ifindex}: {e:?}"));
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

    fn a_sends(&mut self, pkt: &Packet) -> Outcome {
        self.run(prog_names::FROM_POD, LO, pkt)
    }
    fn b_sends(&mut self, pkt: &Packet) -> Outcome {
        let b = self.b;
        self.run(prog_names::FROM_POD, b, pkt)
    }
    fn b_receives(&mut self, pkt: &Packet) -> Outcome {
        let b = self.b;
        self.run(prog_names::TO_POD, b, pkt)
    }

    fn flows(&self) -> Vec<(FlowKey, FlowValue)> {
        let m: HashMap<_, FlowKey, FlowValue> =
            HashMap::try_from(self.ebpf.map(map_names::FLOWS).unwrap()).unwrap();
        m.iter().map(|kv| kv.unwrap()).collect()
    }

    fn flows_of(&self, ifindex: u32) -> usize {
        self.flows()
            .iter()
            .filter(|(k, _)| k.ifindex == ifindex)
            .count()
    }

    /// The flow entry of a packet the pod on `ifindex` sent.
    fn has_flow(&self, ifindex: u32, sent: &Packet) -> bool {
        let m: HashMap<_, FlowKey, FlowValue> =
            HashMap::try_from(self.ebpf.map(map_names::FLOWS).unwrap()).unwrap();
        m.get(&flow_key(ifindex, sent), 0).is_ok()
    }

    fn remove_flow(&mut self, ifindex: u32, sent: &Packet) {
        let mut m: HashMap<_, FlowKey, FlowValue> =
            HashMap::try_from(self.ebpf.map_mut(map_names::FLOWS).unwrap()).unwrap();
        m.remove(&flow_key(ifindex, sent)).expect("flow entry");
    }

    /// The share accounting of the endpoint on `ifindex`, summed over CPUs.
    fn quota_state(&self, ifindex: u32) -> QuotaState {
        let m: PerCpuHashMap<_, u32, QuotaState> =
            PerCpuHashMap::try_from(self.ebpf.map(map_names::QUOTA_STATE).unwrap()).unwrap();
        let Ok(per_cpu) = m.get(&ifindex, 0) else {
            return QuotaState::default();
        };
        per_cpu.iter().fold(QuotaState::default(), |mut s, c| {
            s.admitted += c.admitted;
            s.refused += c.refused;
            s.reclaimed_gone += c.reclaimed_gone;
            s.reclaimed_expired += c.reclaimed_expired;
            s
        })
    }
}

/// The flow key of a packet the pod on `ifindex` sent.
fn flow_key(ifindex: u32, sent: &Packet) -> FlowKey {
    let (family, pod_addr) = ip_bytes(sent.src);
    let (_, remote_addr) = ip_bytes(sent.dst);
    FlowKey {
        ifindex,
        pod_port: sent.sport(),
        remote_port: sent.dport(),
        protocol: sent.protocol(),
        family,
        _pad: [0; 2],
        pod_addr,
        remote_addr,
    }
}

/// A's `n` SYNs to the server, from distinct source ports.
fn syns_from_a(first_port: u16, n: u16) -> Vec<Packet> {
    (0..n)
        .map(|i| tcp(&at(POD_A, first_port + i), &at(PEER, 80)).syn())
        .collect()
}

macro_rules! load_or_skip {
    ($name:literal, $flows:expr, $slots:expr) => {
        match Dp::load($name, $flows, $slots) {
            Some(dp) => dp,
            None => return,
        }
    };
}

/// The attack, without shares: the table is one LRU, and A's new flows push
/// B's idle one out; B's server's next packet is then a new ingress flow,
/// denied. This is what the shares prevent (and why the test below is not
/// vacuous with these map sizes).
#[test]
fn without_shares_a_flood_evicts_another_pods_idle_flow() {
    let mut dp = load_or_skip!(
        "without_shares_a_flood_evicts_another_pods_idle_flow",
        64,
        0
    );
    let b_syn = tcp(&at(POD_B, 50000), &at(PEER, 80)).syn();
    dp.b_sends(&b_syn).passed(DIR_EGRESS, REASON_POLICY_ALLOW);
    for syn in syns_from_a(40000, 640) {
        dp.a_sends(&syn).passed(DIR_EGRESS, REASON_POLICY_ALLOW);
    }
    assert!(
        !dp.has_flow(dp.b, &b_syn),
        "64 entries, 641 flows: B's idle flow was evicted"
    );
    dp.b_receives(&b_syn.reversed().syn_ack())
        .dropped(DIR_INGRESS, REASON_POLICY_DENY);
}

#[test]
fn a_pod_over_its_share_is_refused_and_another_pods_idle_flow_survives() {
    const SHARE: u16 = 8;
    let mut dp = load_or_skip!(
        "a_pod_over_its_share_is_refused_and_another_pods_idle_flow_survives",
        64,
        SHARE as u32
    );
    let b_syn = tcp(&at(POD_B, 50000), &at(PEER, 80)).syn();
    dp.b_sends(&b_syn).passed(DIR_EGRESS, REASON_POLICY_ALLOW);

    // A opens its share...
    let syns = syns_from_a(40000, 10 * SHARE);
    for syn in &syns[..SHARE as usize] {
        dp.a_sends(syn).passed(DIR_EGRESS, REASON_POLICY_ALLOW);
    }
    // ...and every flow beyond it is refused, with a verdict event that
    // names the reason (and the rule that would have allowed it).
    for syn in &syns[SHARE as usize..] {
        let out = dp.a_sends(syn);
        out.dropped(DIR_EGRESS, REASON_FLOW_QUOTA);
        assert_eq!(out.events.len(), 1, "one event per refused flow: {out:?}");
        let ev = out.events[0];
        assert_eq!(
            (ev.verdict, ev.reason, ev.ifindex, ev.sport, ev.rule_id),
            (VERDICT_DENY, REASON_FLOW_QUOTA, LO, syn.sport(), RULE),
            "{ev:?}"
        );
    }
    assert_eq!(dp.flows_of(LO), SHARE as usize, "A holds its share");
    let st = dp.quota_state(LO);
    assert_eq!(
        (st.admitted, st.refused),
        (SHARE as u64, 9 * SHARE as u64),
        "{st:?}"
    );

    // B's idle flow survived, and its server's answer is a reply.
    assert!(dp.has_flow(dp.b, &b_syn), "B's flow is still in the table");
    dp.b_receives(&b_syn.reversed().syn_ack())
        .passed(DIR_INGRESS, REASON_REPLY);
    // A's admitted flows work as ever.
    let back = syns[0].reversed().syn_ack();
    let out = dp.run(prog_names::TO_POD, LO, &back);
    out.passed(DIR_INGRESS, REASON_REPLY);
}

/// Nothing is counted, so nothing can drift: a slot is free as soon as its
/// flow is gone from the table, whatever removed it (the LRU, revocation,
/// the agent: here a delete from user space, as the LRU would evict it) or
/// as soon as the flow is idle past its timeout, even if no packet of it
/// ever comes again.
#[test]
fn a_share_frees_up_when_flows_leave_the_table_or_go_idle() {
    const SHARE: u16 = 4;
    let mut dp = load_or_skip!(
        "a_share_frees_up_when_flows_leave_the_table_or_go_idle",
        64,
        SHARE as u32
    );
    let syns = syns_from_a(40000, 3 * SHARE);
    for syn in &syns[..SHARE as usize] {
        dp.a_sends(syn).passed(DIR_EGRESS, REASON_POLICY_ALLOW);
    }
    let next = &syns[SHARE as usize];
    dp.a_sends(next).dropped(DIR_EGRESS, REASON_FLOW_QUOTA);

    // One of A's flows leaves the table without the datapath seeing it.
    dp.remove_flow(LO, &syns[1]);
    dp.a_sends(next).passed(DIR_EGRESS, REASON_POLICY_ALLOW);
    dp.a_sends(&syns[SHARE as usize + 1])
        .dropped(DIR_EGRESS, REASON_FLOW_QUOTA);
    assert_eq!(dp.quota_state(LO).reclaimed_gone, 1);

    // All of A's flows go idle past the TCP timeout: no packet of theirs
    // comes, yet the share is whole again.
    dp.config.timeout_tcp_s = 1;
    dp.write_config();
    std::thread::sleep(Duration::from_millis(2100));
    for syn in &syns[2 * SHARE as usize..] {
        dp.a_sends(syn).passed(DIR_EGRESS, REASON_POLICY_ALLOW);
    }
    let st = dp.quota_state(LO);
    assert_eq!(st.reclaimed_expired, SHARE as u64, "{st:?}");
    assert_eq!(
        dp.flows_of(LO),
        SHARE as usize,
        "the idle entries were removed as their slots were reclaimed"
    );
}

/// A packet that opens no entry (a non-SYN TCP packet) neither needs nor
/// takes a slot, so a pod at its share is not cut off from what it is
/// allowed without an entry.
#[test]
fn a_pod_at_its_share_still_passes_packets_that_open_no_entry() {
    const SHARE: u16 = 2;
    let mut dp = load_or_skip!(
        "a_pod_at_its_share_still_passes_packets_that_open_no_entry",
        64,
        SHARE as u32
    );
    for syn in syns_from_a(40000, SHARE) {
        dp.a_sends(&syn).passed(DIR_EGRESS, REASON_POLICY_ALLOW);
    }
    let ack = tcp(&at(POD_A, 45000), &at(PEER, 80)).ack();
    dp.a_sends(&ack)
        .passed(DIR_EGRESS, netpol_common::REASON_TCP_NO_FLOW);
    // And the established fast path of an admitted flow is untouched.
    let again = tcp(&at(POD_A, 40000), &at(PEER, 80)).ack();
    dp.a_sends(&again)
        .passed(DIR_EGRESS, netpol_common::REASON_ESTABLISHED);
}
