//! A packet between two pods of one node is judged by two programs: the
//! sender's veth (`netpol_from_pod`, its egress) and then the receiver's
//! (`netpol_to_pod`, its ingress). A flip of the epoch can fall between the
//! two runs, and so can two flips and the rewrite of the epoch the sender's
//! run read (issue 13). These tests run the two programs through
//! `BPF_PROG_TEST_RUN` with every flip in between, for every pair (and
//! triple) of small states, and check that the packet's fate is one that a
//! state of its lifetime gives: the first one's or the last one's.
//!
//! The sender (A) is on loopback, where `BPF_PROG_TEST_RUN` runs a packet by
//! default; the receiver (B) on another device of this network namespace,
//! chosen through the `__sk_buff` context's `ifindex`. `BPF_PROG_TEST_RUN`
//! refuses a context with `tc_index` set, so the receiver finds the sender
//! by its address (`NETPOL_LOCAL_ADDRS`), as it does for any packet whose
//! tag it does not believe. `NETPOL_LOCAL_ADDRS` holds the address in every
//! state, as the agent keeps it (the union of both epochs' endpoints).
//!
//! These tests need root (CAP_BPF + CAP_NET_ADMIN). Without it they print
//! `SKIPPED: ...` to stderr and return, unless `CI=true`, where they fail.

mod common {
    pub mod packets;
}

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use common::packets::{Packet, tcp};
use netpol_agent::datapath::{EBPF_OBJECT, write_peer_v4, write_policy};
use netpol_common::{
    ConfigValue, DIR_EGRESS, DIR_INGRESS, EP_F_EGRESS_ISOLATED, EP_F_INGRESS_ISOLATED,
    EndpointValue, LocalKey, PEER_F_POD, POLICY_PREFIX_FULL, PROTO_TCP, PeerValue, PolicyKey,
    PolicyValue, endpoint_key, epoch_policy_id, flip_generation, ip_bytes, map_names, prog_names,
};

const LO: u32 = 1;
const POD_A: &str = "10.0.0.1";
const POD_B: &str = "10.0.0.5";
/// Where A's pod lives in a state where its address went to another pod.
const POD_A_MOVED: &str = "10.0.0.9";
const ID_A: u32 = 10;
const ID_B: u32 = 11;
const WORLD_ID: u32 = 1;
const SET_A: u32 = 7;
const SET_B: u32 = 8;
const PORT: u16 = 80;

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

/// Offset of `ifindex` in `struct __sk_buff`.
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

/// An Ethernet device of this network namespace other than loopback.
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

/// What the sender's state says about A -> B on TCP/80.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sender {
    /// A's egress allows B.
    Allows,
    /// A is isolated for egress and nothing allows B.
    Denies,
    /// A's pod is not in this state (deleted, its veth still up).
    Absent,
    /// A's veth belongs to a pod with another address: A's address is no
    /// longer this veth's (its own program drops it as spoofed).
    Moved,
}

/// One policy state of the two pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct S {
    a: Sender,
    /// B's ingress allows A.
    b_allows: bool,
}

impl S {
    /// Whether this state delivers A's new connection to B.
    fn delivers(self) -> bool {
        self.a == Sender::Allows && self.b_allows
    }
}

fn states() -> Vec<S> {
    let mut out = Vec::new();
    for a in [
        Sender::Allows,
        Sender::Denies,
        Sender::Absent,
        Sender::Moved,
    ] {
        for b_allows in [true, false] {
            out.push(S { a, b_allows });
        }
    }
    out
}

struct Dp {
    ebpf: Ebpf,
    config: ConfigValue,
    b: u32,
    sport: u16,
}

impl Dp {
    fn load(test: &str) -> Option<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            skip(test, "not running as root");
            return None;
        }
        let Some(b) = other_device() else {
            skip(test, "no Ethernet device besides loopback for the receiver");
            return None;
        };
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(map_names::FLOWS, 8192)
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
        let mut dp = Dp {
            ebpf,
            config: ConfigValue {
                generation: 1,
                events_per_sec: 1_000_000,
                ..ConfigValue::default()
            },
            b,
            sport: 20000,
        };
        dp.write_config();
        // Both epochs' peer tries: the pods' identities and the world.
        for epoch in 0..2 {
            let world = PeerValue::new(WORLD_ID, 0);
            write_peer_v4(&mut dp.ebpf, epoch, [0, 0, 0, 0].into(), 0, Some(world)).unwrap();
            for (addr, id) in [(POD_A, ID_A), (POD_B, ID_B), (POD_A_MOVED, ID_A)] {
                let v = PeerValue::new(id, PEER_F_POD);
                write_peer_v4(&mut dp.ebpf, epoch, addr.parse().unwrap(), 32, Some(v)).unwrap();
            }
        }
        // Local addresses: written in place, outside the epochs; the agent
        // keeps every address either epoch's endpoints have.
        {
            let mut m: HashMap<_, LocalKey, u32> =
                HashMap::try_from(dp.ebpf.map_mut(map_names::LOCAL_ADDRS).unwrap()).unwrap();
            for (addr, ifindex) in [(POD_A, LO), (POD_B, b), (POD_A_MOVED, LO)] {
                let (family, bytes) = ip_bytes(addr.parse().unwrap());
                m.insert(LocalKey::new(family, bytes), ifindex, 0).unwrap();
            }
        }
        Some(dp)
    }

    fn write_config(&mut self) {
        let mut m: Array<_, ConfigValue> =
            Array::try_from(self.ebpf.map_mut(map_names::CONFIG).unwrap()).unwrap();
        m.set(0, self.config, 0).unwrap();
    }

    /// One CONFIG write: the datapath reads `epoch` from now on.
    fn flip_to(&mut self, epoch: u32) {
        self.config.generation = flip_generation(self.config.generation, epoch);
        self.write_config();
    }

    /// Write `s` into `epoch`, replacing what that epoch held for the pods.
    fn write_state(&mut self, epoch: u32, s: S) {
        let b = self.b;
        {
            let mut m: HashMap<_, u32, EndpointValue> =
                HashMap::try_from(self.ebpf.map_mut(map_names::ENDPOINTS).unwrap()).unwrap();
            let a_key = endpoint_key(LO, epoch);
            let _ = m.remove(&a_key);
            let a_addr = match s.a {
                Sender::Allows | Sender::Denies => Some(POD_A),
                Sender::Moved => Some(POD_A_MOVED),
                Sender::Absent => None,
            };
            if let Some(addr) = a_addr {
                let ep = EndpointValue::new(epoch_policy_id(SET_A, epoch), 1, EP_F_EGRESS_ISOLATED)
                    .with_addresses([addr.parse().unwrap()], None);
                m.insert(a_key, ep, 0).unwrap();
            }
            let ep = EndpointValue::new(epoch_policy_id(SET_B, epoch), 2, EP_F_INGRESS_ISOLATED)
                .with_addresses([POD_B.parse().unwrap()], None);
            m.insert(endpoint_key(b, epoch), ep, 0).unwrap();
        }
        let a_rule = (
            POLICY_PREFIX_FULL,
            PolicyKey::new(
                epoch_policy_id(SET_A, epoch),
                ID_B,
                DIR_EGRESS,
                PROTO_TCP,
                PORT,
            ),
        );
        let b_rule = (
            POLICY_PREFIX_FULL,
            PolicyKey::new(
                epoch_policy_id(SET_B, epoch),
                ID_A,
                DIR_INGRESS,
                PROTO_TCP,
                PORT,
            ),
        );
        let a = matches!(s.a, Sender::Allows | Sender::Moved).then_some(PolicyValue::allow(1));
        write_policy(&mut self.ebpf, a_rule.1, a_rule.0, a).unwrap();
        let b = s.b_allows.then_some(PolicyValue::allow(2));
        write_policy(&mut self.ebpf, b_rule.1, b_rule.0, b).unwrap();
    }

    fn run(&mut self, prog: &str, ifindex: u32, pkt: &Packet) -> bool {
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
        match r.return_value {
            TC_ACT_OK => true,
            TC_ACT_SHOT => false,
            other => panic!("{prog}: unexpected action {other}"),
        }
    }

    /// A's veth judges the packet (A sends it).
    fn a_sends(&mut self, pkt: &Packet) -> bool {
        self.run(prog_names::FROM_POD, LO, pkt)
    }

    /// B's veth judges the packet (B receives it).
    fn b_receives(&mut self, pkt: &Packet) -> bool {
        let b = self.b;
        self.run(prog_names::TO_POD, b, pkt)
    }

    /// A new connection's SYN from A to B, on a port pair of its own.
    fn fresh_syn(&mut self) -> Packet {
        self.sport += 1;
        tcp(
            &format!("{POD_A}:{}", self.sport),
            &format!("{POD_B}:{PORT}"),
        )
        .syn()
    }
}

macro_rules! load_or_skip {
    ($name:literal) => {
        match Dp::load($name) {
            Some(dp) => dp,
            None => return,
        }
    };
}

fn verdict(pass: bool) -> &'static str {
    if pass { "delivered" } else { "dropped" }
}

/// The sender's run reads the old state, then one flip, then the
/// receiver's run reads the new one: for every pair of states (an allow
/// added or removed on either side, the sender's pod deleted or its address
/// given to another pod), the SYN is delivered only if one of the two states
/// delivers it, and dropped only if one of them drops it. On the code before
/// the fix, a sender missing from the new state (or whose address moved)
/// was trusted on its old egress verdict: `(old A allows, B denies) ->
/// (A deleted, B allows)` was delivered, which neither state does.
#[test]
fn a_flip_between_the_senders_and_the_receivers_program_gives_one_states_verdict() {
    let mut dp = load_or_skip!(
        "a_flip_between_the_senders_and_the_receivers_program_gives_one_states_verdict"
    );
    let mut broken = Vec::new();
    let mut cases = 0;
    for old in states() {
        for new in states() {
            for from in [0u32, 1] {
                let to = from ^ 1;
                dp.write_state(from, old);
                dp.write_state(to, new);
                dp.flip_to(from);
                let syn = dp.fresh_syn();
                let mut delivered = dp.a_sends(&syn);
                if delivered {
                    dp.flip_to(to);
                    delivered = dp.b_receives(&syn);
                }
                cases += 1;
                if delivered != old.delivers() && delivered != new.delivers() {
                    broken.push(format!(
                        "epoch {from} -> {to}: {old:?} -> {new:?}: {}, old {}, new {}",
                        verdict(delivered),
                        verdict(old.delivers()),
                        verdict(new.delivers())
                    ));
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "{} of {cases} packets got a verdict neither state gives:\n{}",
        broken.len(),
        broken.join("\n")
    );
}

/// The packet waits between the two programs (a neighbour queue) while the
/// agent flips, waits a grace period, rewrites the epoch the sender's run
/// read with a third state and flips back to it: the receiver's run reads
/// the same epoch bit as the sender's, with other contents. The packet is
/// delivered only if the last state delivers it, and dropped only if the
/// first or the last state drops it.
#[test]
fn a_packet_held_across_two_flips_and_the_rewrite_of_its_epoch_gives_one_states_verdict() {
    let mut dp = load_or_skip!(
        "a_packet_held_across_two_flips_and_the_rewrite_of_its_epoch_gives_one_states_verdict"
    );
    let mut broken = Vec::new();
    let mut cases = 0;
    for s0 in states() {
        for s1 in states() {
            for s2 in states() {
                dp.write_state(0, s0);
                dp.flip_to(0);
                let syn = dp.fresh_syn();
                let mut delivered = dp.a_sends(&syn);
                dp.write_state(1, s1);
                dp.flip_to(1);
                dp.write_state(0, s2);
                dp.flip_to(0);
                if delivered {
                    delivered = dp.b_receives(&syn);
                }
                cases += 1;
                if delivered != s0.delivers() && delivered != s2.delivers() {
                    broken.push(format!(
                        "{s0:?} -> {s1:?} -> {s2:?}: {}, first {}, last {}",
                        verdict(delivered),
                        verdict(s0.delivers()),
                        verdict(s2.delivers())
                    ));
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "{} of {cases} packets got a verdict neither the first nor the last state gives:\n{}",
        broken.len(),
        broken.join("\n")
    );
}

/// An open connection (allowed by the old state, entries on both veths):
/// its next packet is judged by the sender's run in the old state, then a
/// flip, then the receiver's run in the new one. And its reply, the other
/// way round. Each is passed only if one of the states still allows the
/// connection, and dropped only if one of them no longer does.
#[test]
fn an_open_connection_across_a_flip_between_the_two_programs_gives_one_states_verdict() {
    let mut dp = load_or_skip!(
        "an_open_connection_across_a_flip_between_the_two_programs_gives_one_states_verdict"
    );
    let mut broken = Vec::new();
    let mut cases = 0;
    for old in states().into_iter().filter(|s| s.delivers()) {
        for new in states() {
            for from in [0u32, 1] {
                let to = from ^ 1;
                dp.write_state(from, old);
                dp.write_state(to, new);
                dp.flip_to(from);
                let syn = dp.fresh_syn();
                assert!(dp.a_sends(&syn) && dp.b_receives(&syn), "{old:?} opens it");
                let reply = syn.reversed().syn_ack();
                assert!(
                    dp.b_sends_reply(&reply) && dp.a_receives_reply(&reply),
                    "{old:?} answers it"
                );
                // The next packet from A: A's run in the old state, then the
                // flip, then B's run in the new one.
                let ack = syn.clone().ack();
                let mut delivered = dp.a_sends(&ack);
                if delivered {
                    dp.flip_to(to);
                    delivered = dp.b_receives(&ack);
                }
                cases += 1;
                if delivered != old.delivers() && delivered != new.delivers() {
                    broken.push(format!(
                        "A's packet, epoch {from} -> {to}: {old:?} -> {new:?}: {}",
                        verdict(delivered)
                    ));
                }
                // And B's reply on the same open connection, after the same
                // change: B's run in the old state, a flip, A's in the new.
                // (A fresh connection: the one above may be gone.)
                dp.flip_to(from);
                let syn = dp.fresh_syn();
                assert!(dp.a_sends(&syn) && dp.b_receives(&syn), "{old:?} opens it");
                let reply = syn.reversed().syn_ack();
                assert!(dp.b_sends_reply(&reply) && dp.a_receives_reply(&reply));
                let reply = syn.reversed().ack();
                let mut delivered = dp.b_sends_reply(&reply);
                if delivered {
                    dp.flip_to(to);
                    delivered = dp.a_receives_reply(&reply);
                }
                cases += 1;
                if delivered != old.delivers() && delivered != new.delivers() {
                    broken.push(format!(
                        "B's reply, epoch {from} -> {to}: {old:?} -> {new:?}: {}",
                        verdict(delivered)
                    ));
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "{} of {cases} packets got a verdict neither state gives:\n{}",
        broken.len(),
        broken.join("\n")
    );
}

impl Dp {
    /// B's veth judges B's reply (B sends it).
    fn b_sends_reply(&mut self, pkt: &Packet) -> bool {
        let b = self.b;
        self.run(prog_names::FROM_POD, b, pkt)
    }

    /// A's veth judges B's reply (A receives it).
    fn a_receives_reply(&mut self, pkt: &Packet) -> bool {
        self.run(prog_names::TO_POD, LO, pkt)
    }
}
