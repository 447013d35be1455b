//! SCTP cells through the real TC programs. The kernel here has no SCTP sockets, so the runner
//! loads the agent's eBPF object (the very bytes the agent embeds), fills one copy per node with
//! what the agent's compiler produces for that node, and runs a crafted SCTP INIT through
//! `BPF_PROG_TEST_RUN`: `netpol_from_pod` with the client's endpoint (its egress policy, on the
//! client's node), then `netpol_to_pod` with the server's endpoint (its ingress policy, on the
//! server's node). A cell is connected when both pass.
//!
//! A test run happens on the loopback device, so the pod under test is the endpoint of
//! ifindex 1, rewritten before each run. Source ports are never reused, so no run meets the
//! flow entries of an earlier one.

use std::{collections::BTreeMap, net::IpAddr};

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, Map},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use netpol_agent::{
    compiler::{Compiled, NodeInfo, compile},
    datapath::{EBPF_OBJECT, write_peer_v4, write_peer_v6, write_policy},
    model::{Cluster, PodRef},
};
use netpol_common::{PROTO_SCTP, map_names, prog_names};
use netpol_lab::{Family, PodState};

/// The device `BPF_PROG_TEST_RUN` runs packets on: loopback.
const TEST_RUN_IFINDEX: u32 = 1;
const TC_ACT_OK: u32 = 0;

/// One loaded copy of the datapath per node, filled from the compiler's output.
pub struct Datapaths {
    nodes: BTreeMap<String, NodeDatapath>,
    next_sport: u16,
}

struct NodeDatapath {
    ebpf: Ebpf,
    compiled: Compiled,
}

impl Datapaths {
    /// Compiles `cluster` for every node and loads a datapath per node (needs root).
    pub fn load(cluster: &Cluster, nodes: &[NodeInfo]) -> Result<Datapaths> {
        let mut loaded = BTreeMap::new();
        for node in nodes {
            let compiled = compile(cluster, node);
            let ebpf = load_node(&compiled)
                .with_context(|| format!("loading the datapath of {}", node.name))?;
            loaded.insert(node.name.clone(), NodeDatapath { ebpf, compiled });
        }
        Ok(Datapaths {
            nodes: loaded,
            next_sport: 40000,
        })
    }

    /// Whether an SCTP association from `from` to `to:port` may start.
    pub fn allowed(
        &mut self,
        from: &PodState,
        to: &PodState,
        port: u16,
        family: Family,
    ) -> Result<bool> {
        let sport = self.next_sport;
        self.next_sport = self.next_sport.checked_add(1).unwrap_or(40000);
        let frame = sctp_init(from.ip(family), to.ip(family), sport, port);
        let egress = self.run(from, prog_names::FROM_POD, &frame)?;
        let ingress = self.run(to, prog_names::TO_POD, &frame)?;
        Ok(egress && ingress)
    }

    /// Runs `frame` through `program` on `pod`'s node with `pod` as the endpoint; true if the
    /// program passed it.
    fn run(&mut self, pod: &PodState, program: &str, frame: &[u8]) -> Result<bool> {
        let node = self
            .nodes
            .get_mut(&pod.node)
            .ok_or_else(|| anyhow!("no datapath for node {}", pod.node))?;
        let endpoint = node
            .compiled
            .maps
            .endpoints
            .get(&PodRef::new(&pod.namespace, &pod.name))
            .copied();
        let mut endpoints: HashMap<_, u32, _> =
            HashMap::try_from(map_mut(&mut node.ebpf, map_names::ENDPOINTS)?)?;
        match endpoint {
            Some(ep) => endpoints.insert(TEST_RUN_IFINDEX, ep, 0)?,
            // The agent would know no endpoint for the pod either: the programs drop.
            None => {
                let _ = endpoints.remove(&TEST_RUN_IFINDEX);
            }
        }
        let prog: &SchedClassifier = node
            .ebpf
            .program(program)
            .ok_or_else(|| anyhow!("no program {program}"))?
            .try_into()?;
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ..TestRunOptions::default()
            })
            .with_context(|| format!("BPF_PROG_TEST_RUN of {program}"))?;
        Ok(result.return_value == TC_ACT_OK)
    }
}

/// Loads a fresh, unpinned copy of the object with small maps and fills its peer and policy
/// maps (endpoints are set per run).
fn load_node(compiled: &Compiled) -> Result<Ebpf> {
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(map_names::ENDPOINTS, 16)
        .map_max_entries(map_names::PEERS_V4, 4096)
        .map_max_entries(map_names::PEERS_V6, 4096)
        .map_max_entries(map_names::POLICY, 65536)
        .map_max_entries(map_names::FLOWS, 65536)
        .map_max_entries(map_names::FRAGS, 256)
        .map_max_entries(map_names::EVENTS, 1 << 16)
        .load(EBPF_OBJECT)
        .context("loading the eBPF object")?;
    for name in [prog_names::FROM_POD, prog_names::TO_POD] {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("no program {name}"))?
            .try_into()?;
        prog.load().with_context(|| format!("loading {name}"))?;
    }
    // Through the agent's own writers (epoch 0, what CONFIG's zero generation
    // reads): the tries and the exact-match maps in front of them, as the
    // agent writes them. Filling the tries alone left the exact maps empty,
    // and every range or portless entry unreachable.
    for ((addr, len), value) in &compiled.maps.peers_v4 {
        write_peer_v4(&mut ebpf, 0, *addr, *len, Some(*value))?;
    }
    for ((addr, len), value) in &compiled.maps.peers_v6 {
        write_peer_v6(&mut ebpf, 0, *addr, *len, Some(*value))?;
    }
    for ((key, len), value) in &compiled.maps.policy {
        write_policy(&mut ebpf, *key, *len, Some(*value))?;
    }
    Ok(ebpf)
}

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Map> {
    ebpf.map_mut(name).ok_or_else(|| anyhow!("no map {name}"))
}

/// An Ethernet frame with an SCTP packet holding one INIT chunk. Checksums are left zero: the
/// datapath does not check them.
fn sctp_init(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Vec<u8> {
    let mut sctp = Vec::with_capacity(32);
    sctp.extend_from_slice(&sport.to_be_bytes());
    sctp.extend_from_slice(&dport.to_be_bytes());
    sctp.extend_from_slice(&0u32.to_be_bytes()); // verification tag: 0 in an INIT
    sctp.extend_from_slice(&0u32.to_be_bytes()); // CRC32c
    sctp.extend_from_slice(&[1, 0, 0, 20]); // INIT, no flags, chunk length 20
    sctp.extend_from_slice(&0x1234_5678u32.to_be_bytes()); // initiate tag
    sctp.extend_from_slice(&65535u32.to_be_bytes()); // a_rwnd
    sctp.extend_from_slice(&10u16.to_be_bytes()); // outbound streams
    sctp.extend_from_slice(&10u16.to_be_bytes()); // inbound streams
    sctp.extend_from_slice(&1u32.to_be_bytes()); // initial TSN

    let mut frame = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
    let len = u16::try_from(sctp.len()).expect("a small packet");
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            frame.extend_from_slice(&0x0800u16.to_be_bytes());
            frame.extend_from_slice(&[0x45, 0]);
            frame.extend_from_slice(&(20 + len).to_be_bytes());
            frame.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, PROTO_SCTP, 0, 0]);
            frame.extend_from_slice(&s.octets());
            frame.extend_from_slice(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            frame.extend_from_slice(&0x86ddu16.to_be_bytes());
            frame.extend_from_slice(&[0x60, 0, 0, 0]);
            frame.extend_from_slice(&len.to_be_bytes());
            frame.extend_from_slice(&[PROTO_SCTP, 64]);
            frame.extend_from_slice(&s.octets());
            frame.extend_from_slice(&d.octets());
        }
        _ => unreachable!("both addresses come from one family of the lab"),
    }
    frame.extend_from_slice(&sctp);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sctp_init_frames_have_consistent_lengths() {
        let v4 = sctp_init(
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            40000,
            80,
        );
        assert_eq!(v4.len(), 14 + 20 + 32);
        assert_eq!(&v4[12..14], &[0x08, 0x00]);
        assert_eq!(
            u16::from_be_bytes([v4[16], v4[17]]),
            52,
            "IPv4 total length"
        );
        assert_eq!(v4[23], PROTO_SCTP);
        assert_eq!(u16::from_be_bytes([v4[36], v4[37]]), 80, "destination port");
        let v6 = sctp_init(
            "fd00::1".parse().unwrap(),
            "fd00::2".parse().unwrap(),
            40000,
            81,
        );
        assert_eq!(v6.len(), 14 + 40 + 32);
        assert_eq!(
            u16::from_be_bytes([v6[18], v6[19]]),
            32,
            "IPv6 payload length"
        );
        assert_eq!(v6[20], PROTO_SCTP);
        assert_eq!(u16::from_be_bytes([v6[56], v6[57]]), 81, "destination port");
    }
}
