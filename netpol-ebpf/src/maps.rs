//! Every map of the datapath. Sizes here are defaults; the agent sets the
//! real ones at load time (`EbpfLoader::map_max_entries`) and pins each map
//! under `<bpffs-root>/maps/<NAME>`.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    macros::btf_map,
};
use netpol_common::{
    COUNTER_SLOTS, ConfigValue, EndpointValue, FlowKey, FlowValue, FragKey, FragValue, LocalKey,
    PeerValue, PolicyKey, PolicyShort, PolicyShortKey, PolicyValue, RateState, VerdictEvent, sizes,
};

/// Hash maps in front of the tries are allocated as entries are written, like
/// the tries (a preallocated exact map as big as its trie would hold memory
/// for entries that never come).
const NO_PREALLOC: usize = aya_ebpf::bindings::BPF_F_NO_PREALLOC as usize;

/// Local endpoints. Key: host-side veth ifindex, with the epoch in the top
/// bit (`netpol_common::endpoint_key`). Value: the pod's compiled policy set
/// (its id tagged with the same epoch), isolation and audit flags. Holds
/// both epochs. Written by the agent.
#[btf_map]
pub static NETPOL_ENDPOINTS: HashMap<
    u32,
    EndpointValue,
    { (sizes::EPOCHS * sizes::ENDPOINTS) as usize },
> = HashMap::new();

/// IPv4 peer address (LPM, network byte order) -> identity. Pod IPs are /32,
/// ipBlock CIDRs and excepts are prefixes, 0.0.0.0/0 is always present.
/// Written by the agent.
#[btf_map]
pub static NETPOL_PEERS_V4: LpmTrie<[u8; 4], PeerValue, { sizes::PEERS_V4 as usize }> =
    LpmTrie::new();

/// IPv6 peer address -> identity, as `NETPOL_PEERS_V4`.
#[btf_map]
pub static NETPOL_PEERS_V6: LpmTrie<[u8; 16], PeerValue, { sizes::PEERS_V6 as usize }> =
    LpmTrie::new();

/// The peers of epoch 1 (`NETPOL_PEERS_V4` holds epoch 0's), same layout.
#[btf_map]
pub static NETPOL_PEER1_V4: LpmTrie<[u8; 4], PeerValue, { sizes::PEERS_V4 as usize }> =
    LpmTrie::new();

/// The IPv6 peers of epoch 1.
#[btf_map]
pub static NETPOL_PEER1_V6: LpmTrie<[u8; 16], PeerValue, { sizes::PEERS_V6 as usize }> =
    LpmTrie::new();

/// (policy set, peer identity, direction, protocol, port prefix) -> allow and
/// the rule id. See `netpol_common::PolicyKey` for the wildcard rules. Holds
/// both epochs (policy set ids carry the epoch bit). Written by the agent.
#[btf_map]
pub static NETPOL_POLICY: LpmTrie<
    PolicyKey,
    PolicyValue,
    { (sizes::EPOCHS * sizes::POLICY) as usize },
> = LpmTrie::new();

/// The /32 entries of `NETPOL_PEERS_V4`, exact: address -> the same
/// `PeerValue` (see "Exact maps" in `netpol_common`). Epoch 0. Written by
/// the agent, with the trie.
#[btf_map]
pub static NETPOL_EXACT_V4: HashMap<[u8; 4], PeerValue, { sizes::PEERS_V4 as usize }, NO_PREALLOC> =
    HashMap::new();

/// The /128 entries of `NETPOL_PEERS_V6`, as `NETPOL_EXACT_V4`.
#[btf_map]
pub static NETPOL_EXACT_V6: HashMap<
    [u8; 16],
    PeerValue,
    { sizes::PEERS_V6 as usize },
    NO_PREALLOC,
> = HashMap::new();

/// The /32 entries of `NETPOL_PEER1_V4` (epoch 1).
#[btf_map]
pub static NETPOL_EXAC1_V4: HashMap<[u8; 4], PeerValue, { sizes::PEERS_V4 as usize }, NO_PREALLOC> =
    HashMap::new();

/// The /128 entries of `NETPOL_PEER1_V6` (epoch 1).
#[btf_map]
pub static NETPOL_EXAC1_V6: HashMap<
    [u8; 16],
    PeerValue,
    { sizes::PEERS_V6 as usize },
    NO_PREALLOC,
> = HashMap::new();

/// The one-port (prefix 96) entries of `NETPOL_POLICY`, exact: the same key
/// and value. Both epochs. Written by the agent, with the trie.
#[btf_map]
pub static NETPOL_POLEXACT: HashMap<
    PolicyKey,
    PolicyValue,
    { (sizes::EPOCHS * sizes::POLICY) as usize },
    NO_PREALLOC,
> = HashMap::new();

/// (policy set, identity, direction) -> how many `NETPOL_POLICY` entries
/// shorter than one port it has, by protocol; no entry: none (the trie is
/// not asked). Both epochs. Written by the agent, with the trie.
#[btf_map]
pub static NETPOL_POLSHORT: HashMap<
    PolicyShortKey,
    PolicyShort,
    { (sizes::EPOCHS * sizes::POLICY) as usize },
    NO_PREALLOC,
> = HashMap::new();

/// Established flows, one entry per flow serving both directions of travel
/// (keyed from the pod's side, see `netpol_common::FlowKey`).
/// Written by the datapath; the agent reads it (`netpol-agent flows`) and
/// never needs to write it.
#[btf_map]
pub static NETPOL_FLOWS: LruHashMap<FlowKey, FlowValue, { sizes::FLOWS as usize }> =
    LruHashMap::new();

/// First fragments seen: later fragments of the datagram follow their
/// verdict. Written and read by the datapath.
#[btf_map]
pub static NETPOL_FRAGS: LruHashMap<FragKey, FragValue, { sizes::FRAGS as usize }> =
    LruHashMap::new();

/// Per-CPU packet counters by direction and reason, then event accounting
/// (see `netpol_common::counter_index`). Written by the datapath.
#[btf_map]
pub static NETPOL_COUNTERS: PerCpuArray<u64, { COUNTER_SLOTS as usize }> = PerCpuArray::new();

/// Verdict events for new flows and drops, read by the agent.
#[btf_map]
pub static NETPOL_EVENTS: RingBuf<VerdictEvent, { sizes::EVENTS_BYTES as usize }> = RingBuf::new();

/// Per-CPU rate limiter state for `NETPOL_EVENTS`. Written by the datapath.
#[btf_map]
pub static NETPOL_EVENT_RATE: PerCpuArray<RateState, 1> = PerCpuArray::new();

/// Generation (its top bit: the epoch the datapath reads), event rate and
/// global flags. Read once per program run. Written by the agent.
#[btf_map]
pub static NETPOL_CONFIG: Array<ConfigValue, 1> = Array::new();

/// Per-CPU working memory of the programs (not pinned, not shared).
#[btf_map]
pub static NETPOL_SCRATCH: PerCpuArray<crate::conntrack::Scratch, 1> = PerCpuArray::new();

/// Per-CPU working memory of the uplink's XDP program (not pinned, not
/// shared): its own, so that it never shares a slot with a TC program.
#[btf_map]
pub static NETPOL_XDP_SCRATCH: PerCpuArray<crate::conntrack::Scratch, 1> = PerCpuArray::new();

/// Addresses of local pods -> the host-side veth ifindex of the pod (its
/// `NETPOL_ENDPOINTS` key). The post-DNAT hooks find the sending pod by its
/// source address. Written by the agent.
#[btf_map]
pub static NETPOL_LOCAL_ADDRS: HashMap<LocalKey, u32, { sizes::LOCAL_ADDRS as usize }> =
    HashMap::new();

/// IPv4 addresses kube-proxy may translate (Service CIDRs, external IPs):
/// a pod's egress to them is judged after the DNAT. Written by the agent.
#[btf_map]
pub static NETPOL_DEFER_V4: LpmTrie<[u8; 4], u32, { sizes::DEFER_V4 as usize }> = LpmTrie::new();

/// IPv6 addresses kube-proxy may translate, as `NETPOL_DEFER_V4`.
#[btf_map]
pub static NETPOL_DEFER_V6: LpmTrie<[u8; 16], u32, { sizes::DEFER_V6 as usize }> = LpmTrie::new();

/// Endpoint slot -> the veth ifindex of the endpoint (its `NETPOL_ENDPOINTS`
/// key): resolves the sender tag a pod's veth writes into `tc_index`.
/// Written by the agent (before the endpoint that uses the slot).
#[btf_map]
pub static NETPOL_SLOTS: Array<u32, { netpol_common::SLOTS as usize }> = Array::new();
/// Flow-table shares: how many entries an endpoint may create per CPU
/// (`netpol_common::QuotaConfig`, 0 = off). Written by the agent.
#[btf_map]
pub static NETPOL_QUOTA_CONFIG: Array<netpol_common::QuotaConfig, 1> = Array::new();

/// Each endpoint's per-CPU ring of flow slots: (ifindex, cpu, slot) -> the
/// `FlowKey` that last claimed the slot. Written by the datapath (each ring
/// only by its CPU), on the new-flow path only; the agent removes an
/// endpoint's rings when the endpoint goes. Preallocated, like the flow
/// table: claiming a slot takes no allocation on the packet path (without
/// it, the datapath benchmark's new flow cost twice as much). See
/// `quota.rs`.
#[btf_map]
pub static NETPOL_QUOTA_SLOTS: HashMap<
    netpol_common::QuotaSlotKey,
    FlowKey,
    { sizes::FLOWS as usize },
> = HashMap::new();

/// Per endpoint (ifindex), per CPU: the ring cursor and the admitted,
/// refused and reclaimed counts (`netpol_common::QuotaState`). Written by the
/// datapath, read by the agent for its metrics.
#[btf_map]
pub static NETPOL_QUOTA_STATE: aya_ebpf::btf_maps::PerCpuHashMap<
    u32,
    netpol_common::QuotaState,
    { sizes::ENDPOINTS as usize },
> = aya_ebpf::btf_maps::PerCpuHashMap::new();

/// Reply records of the uplink's XDP program: bucket (a hash of a UDP/SCTP
/// 5-tuple as its reply shows it, `netpol_common::xdp_reply_bucket`) -> the
/// last time (`bpf_ktime_get_ns`) a packet of such a tuple was seen: a local
/// pod's packet leaving by a node device (`netpol_post_nat`, after the DNAT)
/// or a packet to a local pod that XDP passed. Written by the datapath only.
#[btf_map]
pub static NETPOL_XDP_RPLY: Array<u64, { netpol_common::sizes::XDP_REPLIES as usize }> =
    Array::new();

/// When the reply records started and conntrack's timeouts on this node
/// (`netpol_common::XdpReplyConfig`; all zero: XDP drops no UDP or SCTP).
/// Written by the agent.
#[btf_map]
pub static NETPOL_XDP_CFG: Array<netpol_common::XdpReplyConfig, 1> = Array::new();
