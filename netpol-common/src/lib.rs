//! Map keys, values and constants shared by the eBPF datapath (`netpol-ebpf`)
//! and the agent (`netpol-agent`, with the `user` feature).
//!
//! Every struct here is `#[repr(C)]`, naturally aligned, with explicit `_pad`
//! fields and a compile-time size assert. Constructors zero the padding: a
//! hash key with garbage padding never matches.
//!
//! Directions are always named from the **pod's** point of view:
//! [`DIR_INGRESS`] is traffic the pod receives (checked against the pod's
//! ingress policy, seen on the TC *egress* hook of the pod's host-side veth),
//! [`DIR_EGRESS`] is traffic the pod sends (the pod's egress policy, seen on the
//! TC *ingress* hook of the host-side veth).
#![cfg_attr(not(feature = "user"), no_std)]

pub mod reason;

pub use reason::*;

/// Traffic the pod receives (its ingress policy).
pub const DIR_INGRESS: u8 = 0;
/// Traffic the pod sends (its egress policy).
pub const DIR_EGRESS: u8 = 1;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_SCTP: u8 = 132;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// Names of the maps in the eBPF object; the agent pins each under
/// `<bpffs-root>/maps/<name>`.
pub mod map_names {
    pub const ENDPOINTS: &str = "NETPOL_ENDPOINTS";
    pub const PEERS_V4: &str = "NETPOL_PEERS_V4";
    pub const PEERS_V6: &str = "NETPOL_PEERS_V6";
    /// The peers of epoch 1 (`PEERS_V4`/`PEERS_V6` are epoch 0's). Names
    /// fit the kernel's 15 characters, so `bpftool` tells them apart.
    pub const PEERS_V4_E1: &str = "NETPOL_PEER1_V4";
    pub const PEERS_V6_E1: &str = "NETPOL_PEER1_V6";
    pub const POLICY: &str = "NETPOL_POLICY";
    pub const FLOWS: &str = "NETPOL_FLOWS";
    pub const FRAGS: &str = "NETPOL_FRAGS";
    pub const COUNTERS: &str = "NETPOL_COUNTERS";
    pub const EVENTS: &str = "NETPOL_EVENTS";
    pub const EVENT_RATE: &str = "NETPOL_EVENT_RATE";
    pub const CONFIG: &str = "NETPOL_CONFIG";
    pub const LOCAL_ADDRS: &str = "NETPOL_LOCAL_ADDRS";
    pub const DEFER_V4: &str = "NETPOL_DEFER_V4";
    pub const DEFER_V6: &str = "NETPOL_DEFER_V6";
    pub const SLOTS: &str = "NETPOL_SLOTS";
    pub const QUOTA_CONFIG: &str = "NETPOL_QUOTA_CONFIG";
    pub const QUOTA_SLOTS: &str = "NETPOL_QUOTA_SLOTS";
    pub const QUOTA_STATE: &str = "NETPOL_QUOTA_STATE";
    /// The uplink XDP program's reply records ([`super::XdpReplyConfig`]).
    pub const XDP_REPLIES: &str = "NETPOL_XDP_RPLY";
    pub const XDP_CONFIG: &str = "NETPOL_XDP_CFG";
    /// Exact-match companions of the tries (see "Exact maps" in the crate):
    /// the full-length peer entries of epoch 0 and of epoch 1, the
    /// full-length policy entries, and the count of shorter policy entries.
    pub const EXACT_V4: &str = "NETPOL_EXACT_V4";
    pub const EXACT_V6: &str = "NETPOL_EXACT_V6";
    pub const EXACT_V4_E1: &str = "NETPOL_EXAC1_V4";
    pub const EXACT_V6_E1: &str = "NETPOL_EXAC1_V6";
    pub const POLICY_EXACT: &str = "NETPOL_POLEXACT";
    pub const POLICY_SHORT: &str = "NETPOL_POLSHORT";
    pub const ALL: [&str; 27] = [
        ENDPOINTS,
        PEERS_V4,
        PEERS_V6,
        PEERS_V4_E1,
        PEERS_V6_E1,
        POLICY,
        FLOWS,
        FRAGS,
        COUNTERS,
        EVENTS,
        EVENT_RATE,
        CONFIG,
        LOCAL_ADDRS,
        DEFER_V4,
        DEFER_V6,
        SLOTS,
        QUOTA_CONFIG,
        QUOTA_SLOTS,
        QUOTA_STATE,
        XDP_REPLIES,
        XDP_CONFIG,
        EXACT_V4,
        EXACT_V6,
        EXACT_V4_E1,
        EXACT_V6_E1,
        POLICY_EXACT,
        POLICY_SHORT,
    ];
}

/// Names of the TC programs in the eBPF object.
pub mod prog_names {
    /// Attached to the TC ingress hook of the host-side veth: packets the pod sends.
    pub const FROM_POD: &str = "netpol_from_pod";
    /// Attached to the TC egress hook of the host-side veth: packets the pod receives.
    pub const TO_POD: &str = "netpol_to_pod";
    /// Attached to the TC egress hook of the node's own devices (uplinks,
    /// tunnels): a local pod's packets leaving the node, after kube-proxy's
    /// DNAT, judged by the pod's egress policy against the real destination.
    pub const POST_NAT: &str = "netpol_post_nat";
    /// sk_lookup in the node's network namespace: a local pod's new
    /// connection to a socket on the node (after any DNAT), judged by the
    /// pod's egress policy.
    pub const LOCAL_IN: &str = "netpol_local_in";
    /// XDP on the node's uplink devices: an early drop of new flows from
    /// other nodes that the destination pod's ingress policy denies.
    pub const XDP_UPLINK: &str = "netpol_xdp_uplink";
}

/// Default map sizes (the agent overrides them at load time from its flags),
/// for one policy state. `NETPOL_ENDPOINTS` and `NETPOL_POLICY` hold both
/// epochs, so they are created with [`EPOCHS`] times these; each peer trie
/// holds one epoch.
pub mod sizes {
    /// Policy states the epoch maps hold at once.
    pub const EPOCHS: u32 = 2;
    pub const ENDPOINTS: u32 = 4096;
    pub const PEERS_V4: u32 = 262_144;
    pub const PEERS_V6: u32 = 262_144;
    pub const POLICY: u32 = 524_288;
    pub const FLOWS: u32 = 262_144;
    pub const FRAGS: u32 = 8192;
    pub const EVENTS_BYTES: u32 = 1 << 20;
    /// Two addresses (IPv4, IPv6) per endpoint.
    pub const LOCAL_ADDRS: u32 = 2 * ENDPOINTS;
    pub const DEFER_V4: u32 = 4096;
    pub const DEFER_V6: u32 = 4096;
    /// Buckets of `NETPOL_XDP_RPLY` (a power of two).
    pub const XDP_REPLIES: u32 = 65_536;
}

// ---------------------------------------------------------------------------
// XDP reply records: what lets the uplink's XDP program drop UDP and SCTP
// without dropping a reply that kube-proxy's conntrack will un-DNAT.
//
// A local pod that sends UDP/SCTP to a Service has two flow entries (the
// ClusterIP-keyed one on its veth, the backend-keyed one after the DNAT). The
// backend's reply reaches the uplink with the backend's address; only after
// conntrack restores the ClusterIP as its source does it match the veth's
// entry. If the backend-keyed entry was evicted, the flow table alone cannot
// tell XDP that the packet is a reply. So `netpol_post_nat` writes, for every
// UDP/SCTP packet a local pod sends out of a node device (after any DNAT),
// the time into a bucket chosen by a hash of the packet's 5-tuple as its reply
// will show it; XDP writes the time into the bucket of every UDP/SCTP packet
// to a local pod that it passes. XDP drops a UDP/SCTP packet only if its
// bucket is older than the reply window (the longest of conntrack's UDP/SCTP
// timeouts and the flow table's idle timeout), and only once records have
// been kept for a whole window (`records_since_ns`). Collisions only make
// XDP pass more (to the veth, which decides).
// ---------------------------------------------------------------------------

/// `NETPOL_XDP_CFG`: written by the agent once, when it first creates the
/// records (kept across restarts with the pinned map). All zero: XDP drops
/// no UDP or SCTP at all.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpReplyConfig {
    /// `CLOCK_MONOTONIC` (the datapath's `bpf_ktime_get_ns`) when the reply
    /// records started; 0 = not armed.
    pub records_since_ns: u64,
    /// The longest conntrack timeout for UDP on this node, seconds.
    pub conntrack_udp_s: u32,
    /// The longest conntrack timeout for SCTP on this node, seconds.
    pub conntrack_sctp_s: u32,
}
const _: () = assert!(core::mem::size_of::<XdpReplyConfig>() == 16);

/// Slack added to the reply window: clocks read on different CPUs, and
/// records written a little out of order by racing CPUs.
pub const XDP_REPLY_SLACK_NS: u64 = 5_000_000_000;

/// The `NETPOL_XDP_RPLY` bucket of a UDP/SCTP 5-tuple, as the reply shows it
/// at the uplink: `remote` (the reply's source) and `local` (the pod).
/// Addresses are 16 bytes (IPv4 in the first 4, the rest zero). The same
/// function in the datapath and in userspace (tests).
#[inline(always)]
pub fn xdp_reply_bucket(
    protocol: u8,
    remote: &[u8; 16],
    remote_port: u16,
    local: &[u8; 16],
    local_port: u16,
) -> u32 {
    #[inline(always)]
    fn w(a: &[u8; 16], i: usize) -> u32 {
        u32::from_le_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]])
    }
    #[inline(always)]
    fn mix(h: u32, v: u32) -> u32 {
        (h ^ v).wrapping_mul(0x9E37_79B1).rotate_left(13)
    }
    let mut h = 0x811C_9DC5u32 ^ u32::from(protocol);
    h = mix(h, w(remote, 0));
    h = mix(h, w(remote, 4));
    h = mix(h, w(remote, 8));
    h = mix(h, w(remote, 12));
    h = mix(h, w(local, 0));
    h = mix(h, w(local, 4));
    h = mix(h, w(local, 8));
    h = mix(h, w(local, 12));
    h = mix(h, (u32::from(remote_port) << 16) | u32::from(local_port));
    h ^= h >> 16;
    h = h.wrapping_mul(0x85EB_CA6B);
    h ^= h >> 13;
    h & (sizes::XDP_REPLIES - 1)
}

// ---------------------------------------------------------------------------
// Epochs: the maps hold two complete policy states, and one CONFIG write
// chooses which one the datapath reads (issue 13).
//
// The agent writes a new state into the epoch the datapath does not read,
// then flips `ConfigValue::generation`, whose top bit is the active epoch.
// Each program run reads CONFIG once and makes every lookup of that packet
// in that epoch, so a packet sees the old state or the new one, never a mix.
// What is tagged with the epoch:
// - `NETPOL_ENDPOINTS` keys: `ifindex | epoch << 31` ([`endpoint_key`]);
// - policy set ids: the top bit of `EndpointValue::policy_id` and of
//   `PolicyKey::policy_id` ([`epoch_policy_id`]), so the two epochs' policy
//   entries never meet in `NETPOL_POLICY` and `decide` knows the epoch from
//   the endpoint it was given;
// - peers: one LPM trie per epoch (`NETPOL_PEERS_V4` for epoch 0,
//   `NETPOL_PEER1_V4` for epoch 1, and the same for IPv6), so peer keys keep
//   their layout.
// Epoch 0 is exactly the untagged layout: maps filled without epochs (tests,
// benchmarks, a previous agent) are epoch 0 under a generation below 2^31.
// Identities are not tagged: they are only ever looked up together with a
// tagged policy id. The compiler's ids stay below [`EPOCH_BIT`].
// ---------------------------------------------------------------------------

/// The bit of `ConfigValue::generation`, of endpoint keys and of policy set
/// ids that names the epoch.
pub const EPOCH_BIT: u32 = 1 << 31;

/// The epoch (0 or 1) the datapath reads under `generation`.
pub const fn generation_epoch(generation: u32) -> u32 {
    generation >> 31
}

/// The generation that flips to `epoch`: a new generation (established flows
/// are re-checked) whose top bit is `epoch`. Both travel in one aligned u32,
/// so no reader can see one without the other.
pub const fn flip_generation(generation: u32, epoch: u32) -> u32 {
    (generation.wrapping_add(1) & !EPOCH_BIT) | ((epoch & 1) << 31)
}

/// A new generation in the same epoch (a revocation outside the epoch maps,
/// e.g. a deferred range that went).
pub const fn bump_generation(generation: u32) -> u32 {
    (generation.wrapping_add(1) & !EPOCH_BIT) | (generation & EPOCH_BIT)
}

/// The `NETPOL_ENDPOINTS` key of a veth in an epoch (ifindexes are positive
/// `int`s: below 2^31).
pub const fn endpoint_key(ifindex: u32, epoch: u32) -> u32 {
    (ifindex & !EPOCH_BIT) | ((epoch & 1) << 31)
}

/// A policy set id as stored in an epoch.
pub const fn epoch_policy_id(policy_id: u32, epoch: u32) -> u32 {
    (policy_id & !EPOCH_BIT) | ((epoch & 1) << 31)
}

/// The epoch of a stored policy set id (or endpoint key).
pub const fn id_epoch(id: u32) -> u32 {
    id >> 31
}

// ---------------------------------------------------------------------------
// Endpoints: NETPOL_ENDPOINTS, hash, key = host-side veth ifindex (u32).
// ---------------------------------------------------------------------------

/// The pod's ingress is judged by policy: some NetworkPolicy with type
/// Ingress selects it, or a ClusterNetworkPolicy does (its policy entries
/// then give the final verdict, allow or deny, of every peer and port).
pub const EP_F_INGRESS_ISOLATED: u32 = 1 << 0;
/// The pod's egress is judged by policy (as for ingress, with type Egress).
pub const EP_F_EGRESS_ISOLATED: u32 = 1 << 1;
/// Audit mode: what policy would deny passes and is reported as `audit`.
pub const EP_F_AUDIT: u32 = 1 << 2;
/// `addr_v4` is the pod's IPv4 address. Without it no IPv4 source is the
/// pod's: a single-stack IPv6 pod sends no IPv4.
pub const EP_F_HAS_V4: u32 = 1 << 3;
/// `addr_v6` is the pod's IPv6 address (link-local sources are allowed for
/// neighbour discovery only).
pub const EP_F_HAS_V6: u32 = 1 << 4;
/// `mac` is the pod's MAC: frames and ARP from the pod must carry it (it
/// matters on bridged nodes, where a forged MAC poisons the bridge).
pub const EP_F_HAS_MAC: u32 = 1 << 5;

/// Value of the endpoints map. Written by the agent, read by the datapath.
///
/// The addresses are what the pod may send from (anti-spoofing) and be sent
/// to: a packet from the pod with another source, or a unicast packet for
/// it with another destination, is dropped before any flow is created, so
/// the flow table (keyed on the pod's address) only ever holds the pod's own.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointValue {
    /// Compiled policy set ("local policy") that applies to this pod; pods
    /// selected by the same policies (and resolving named ports the same way)
    /// share one.
    pub policy_id: u32,
    /// The agent's id of this endpoint (names it in events).
    pub endpoint_id: u32,
    /// `EP_F_*` flags.
    pub flags: u32,
    /// The pod's IPv4 address, network order (`EP_F_HAS_V4`).
    pub addr_v4: [u8; 4],
    /// The pod's MAC (`EP_F_HAS_MAC`).
    pub mac: [u8; 6],
    /// The endpoint's slot (< `SLOTS`): `NETPOL_SLOTS[slot]` is its veth.
    /// The pod's veth tags each packet the pod sends with it (`SENDER_TAG |
    /// slot` in the skb's `tc_index`), so the post-DNAT hooks know the
    /// sender even after kube-proxy masqueraded the source address.
    pub slot: u16,
    /// The pod's IPv6 address (`EP_F_HAS_V6`).
    pub addr_v6: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<EndpointValue>() == 40);

impl EndpointValue {
    /// An endpoint with no addresses (every source it sends from is spoofed:
    /// set them with [`EndpointValue::with_addresses`]).
    pub const fn new(policy_id: u32, endpoint_id: u32, flags: u32) -> Self {
        Self {
            policy_id,
            endpoint_id,
            flags,
            addr_v4: [0; 4],
            mac: [0; 6],
            slot: 0,
            addr_v6: [0; 16],
        }
    }
}

// ---------------------------------------------------------------------------
// Local addresses: NETPOL_LOCAL_ADDRS, hash, `LocalKey` -> the host-side veth
// ifindex of the local pod that owns the address (the key of its endpoint).
// Written by the agent from the endpoints' addresses. The datapath's
// anti-spoofing makes it trustworthy: a packet with a local pod's source
// address was sent by that pod (or by the node itself).
// ---------------------------------------------------------------------------

/// Key of the local-address map: an address (IPv4 in the first four bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LocalKey {
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<LocalKey>() == 20);

impl LocalKey {
    pub const fn new(family: u8, addr: [u8; 16]) -> Self {
        Self {
            family,
            _pad: [0; 3],
            addr,
        }
    }
}

/// Endpoint slots: `NETPOL_SLOTS` is an array of this many veth ifindexes.
pub const SLOTS: u32 = 1 << 15;
/// Set in a packet's `tc_index` by the sending pod's veth (through
/// `tc_classid`, which the kernel copies into `tc_index` when the program
/// passes the packet): the low 15 bits are the pod's endpoint slot. The kernel keeps `tc_index` through
/// netfilter (NAT, masquerade) and fragmentation within the node; the
/// post-DNAT hooks believe it only when the packet's source is the slot's pod
/// or one of this node's own addresses (a masquerade), because a packet that
/// crossed from another node's namespace over veths may still carry that
/// node's tag.
pub const SENDER_TAG: u16 = 1 << 15;

// ---------------------------------------------------------------------------
// Deferred destinations: NETPOL_DEFER_V4 / NETPOL_DEFER_V6, LPM tries of the
// addresses kube-proxy may translate (Service CIDRs, external and load
// balancer IPs). A pod's new TCP/UDP/SCTP flow to one of them (or to one of
// this node's own addresses, for NodePorts) is not judged on the pod's veth:
// its egress verdict is taken after the DNAT. Value: `DEFER_F_*` (unused: 0).
// ---------------------------------------------------------------------------

// ---------------------------------------------------------------------------
// Peers: NETPOL_PEERS_V4 / NETPOL_PEERS_V6, LPM tries keyed by address
// (aya `lpm_trie::Key<[u8; 4]>` / `Key<[u8; 16]>`, network byte order).
// Pod IPs are /32 (/128) entries, ipBlock CIDRs and excepts are prefixes, and
// 0.0.0.0/0 (::/0) is always present, so every address has an identity.
// ---------------------------------------------------------------------------

/// The address is one of this node's own addresses: traffic from it to a
/// local pod is allowed (kubelet probes), as Kubernetes documents.
pub const PEER_F_HOST: u32 = 1 << 0;
/// The address is a pod's. Pods are never routers: an ICMP error from a pod
/// about a flow it is not the far end of is no error "from the path".
pub const PEER_F_POD: u32 = 1 << 1;

/// Identity 0 is never given to an address: in the policy map it is the
/// wildcard "any peer" (a rule with no `from`/`to`).
pub const IDENTITY_ANY: u32 = 0;

/// Value of the peer LPM tries.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerValue {
    /// Identity: the equivalence class of addresses under every peer selector
    /// in play.
    pub identity: u32,
    /// A second, coarser identity for rules that only look at the address:
    /// the class of the address under the ipBlocks in play. Policy entries of
    /// ipBlock peers can be keyed on it, so they do not multiply with the pod
    /// identities inside the block. 0 (or equal to `identity`): none, the
    /// datapath skips that lookup.
    pub cidr_identity: u32,
    /// `PEER_F_*` flags.
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<PeerValue>() == 16);

impl PeerValue {
    pub const fn new(identity: u32, flags: u32) -> Self {
        Self {
            identity,
            cidr_identity: 0,
            flags,
            _pad: 0,
        }
    }
    pub const fn with_cidr_identity(mut self, cidr_identity: u32) -> Self {
        self.cidr_identity = cidr_identity;
        self
    }
}

// ---------------------------------------------------------------------------
// Policy: NETPOL_POLICY, LPM trie keyed by `PolicyKey` (prefix length in bits
// over its bytes, most significant bit first).
// ---------------------------------------------------------------------------

/// Bits of `PolicyKey` that are always fully specified: policy_id, identity,
/// direction.
pub const POLICY_PREFIX_ANY_PROTO: u32 = 72;
/// ... plus the protocol: "all ports of this protocol".
pub const POLICY_PREFIX_ANY_PORT: u32 = 80;
/// ... plus the whole port: one port.
pub const POLICY_PREFIX_FULL: u32 = 96;

/// Data of a policy LPM key. Field order is the match order:
///
/// `policy_id (32) | identity (32) | direction (8) | protocol (8) | port (16, big endian)`
///
/// Wildcards and precedence: `policy_id`, `identity` and `direction` are
/// always matched exactly (prefix >= 72). The protocol can only be wildcarded
/// when the port is wildcarded too (prefix 72 = any protocol, any port: a rule
/// without `ports`). Prefix 80 = one protocol, every port. Prefix 80+k matches
/// the ports whose first k bits equal `port`'s: an `endPort` range is a handful
/// of such prefixes, never a per-port loop. Port-less protocols (ICMP echo)
/// are looked up with port 0 and so match only prefix-72 entries.
///
/// `identity` is [`IDENTITY_ANY`] for rules that allow every peer; the
/// datapath looks up the peer's identity, then its `cidr_identity` (when it
/// has a distinct one), then `IDENTITY_ANY`: at most three lookups whatever
/// the number of policies. The first entry found decides: [`ACTION_ALLOW`]
/// allows, anything else ([`ACTION_DENY`]) denies without asking further.
/// A set judged by ClusterNetworkPolicy has entries for the peer's identity
/// only, covering every protocol and port (see `compiler::tiered`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub policy_id: u32,
    pub identity: u32,
    pub direction: u8,
    pub protocol: u8,
    /// Big-endian port bytes (so that prefixes are port ranges).
    pub port: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<PolicyKey>() == 12);

impl PolicyKey {
    pub const fn new(
        policy_id: u32,
        identity: u32,
        direction: u8,
        protocol: u8,
        port: u16,
    ) -> Self {
        Self {
            policy_id,
            identity,
            direction,
            protocol,
            port: port.to_be_bytes(),
        }
    }
    pub const fn port(&self) -> u16 {
        u16::from_be_bytes(self.port)
    }
}

/// The entry allows the traffic.
pub const ACTION_ALLOW: u32 = 1;
/// The entry denies the traffic: the lookup stops here, the identities
/// after it are not asked. Written only for policy sets that a
/// ClusterNetworkPolicy judges, whose entries give the final verdict of the
/// tiers and NetworkPolicy together for every (identity, protocol, port).
/// `rule_id` is the denying CNP rule, or 0 for NetworkPolicy's default deny.
/// Any action other than [`ACTION_ALLOW`] and [`ACTION_AUDIT`] denies (fail closed).
pub const ACTION_DENY: u32 = 2;
/// The entry allows the traffic and reports it as `audit` (`VERDICT_AUDIT`,
/// `REASON_AUDIT`): `rule_id` is a Deny rule of an audited
/// ClusterNetworkPolicy (`netpol.dev/audit: "true"`) that would have denied
/// it; without that rule the tiers allow it (`compiler::reference`).
pub const ACTION_AUDIT: u32 = 3;

/// Value of the policy LPM trie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyValue {
    /// `ACTION_*`.
    pub action: u32,
    /// Id of the rule that decided (the agent maps it back to
    /// namespace/policy, direction and rule index).
    pub rule_id: u32,
}
const _: () = assert!(core::mem::size_of::<PolicyValue>() == 8);

impl PolicyValue {
    pub const fn allow(rule_id: u32) -> Self {
        Self {
            action: ACTION_ALLOW,
            rule_id,
        }
    }
    pub const fn deny(rule_id: u32) -> Self {
        Self {
            action: ACTION_DENY,
            rule_id,
        }
    }
}

// ---------------------------------------------------------------------------
// Exact maps: hash maps in front of the LPM tries, so that the cost of a
// verdict does not grow with the number of entries (issue 15). A trie lookup
// walks a path whose length grows with the number of entries; a hash lookup
// does not. They are derived from the tries by the agent's write methods
// (`netpol_agent::datapath`), in the same epochs, and hold nothing the tries
// do not:
//
// - `NETPOL_EXACT_V4`/`_V6` (epoch 0) and `NETPOL_EXAC1_V4`/`_V6` (epoch 1):
//   address -> the `PeerValue` of its /32 (/128) trie entry. A full-length
//   entry is always the longest match, so a hit is what the trie would
//   answer; on a miss the datapath asks the trie (ipBlocks, /0).
// - `NETPOL_POLEXACT`: `PolicyKey` -> the `PolicyValue` of its prefix-96
//   (one port) trie entry; both epochs (policy set ids carry the epoch bit).
// - `NETPOL_POLSHORT`: (policy set, identity, direction) -> how many trie
//   entries shorter than one port it has ([`PolicyShort`]). No entry: none,
//   so a miss in `NETPOL_POLEXACT` is a miss of the trie too and the trie
//   is not asked. This is what keeps a denied flow (which misses every
//   exact entry) from walking the trie.
//
// Invariants the writer keeps at every step: an exact entry exists only
// while its trie entry does, with the same value (written after the trie
// entry, removed before it); a shorter trie entry exists only while its
// `PolicyShort` counts it (counted before it is written, uncounted after it
// is removed). A count too high only sends lookups to the trie.
// ---------------------------------------------------------------------------

/// Key of `NETPOL_POLSHORT`: the fields of a `PolicyKey` that every trie
/// entry matches exactly (prefix >= `POLICY_PREFIX_ANY_PROTO`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyShortKey {
    pub policy_id: u32,
    pub identity: u32,
    pub direction: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<PolicyShortKey>() == 12);

impl PolicyShortKey {
    pub const fn new(policy_id: u32, identity: u32, direction: u8) -> Self {
        Self {
            policy_id,
            identity,
            direction,
            _pad: [0; 3],
        }
    }
}

/// Value of `NETPOL_POLSHORT`: trie entries of one (policy set, identity,
/// direction) shorter than `POLICY_PREFIX_FULL`, by what they can match.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyShort {
    /// Prefix below 80: any protocol (a rule without ports).
    pub any_protocol: u32,
    /// Prefix 80..95 (all ports or a port range) of TCP, UDP, SCTP, and of
    /// any other protocol.
    pub tcp: u32,
    pub udp: u32,
    pub sctp: u32,
    pub other: u32,
}
const _: () = assert!(core::mem::size_of::<PolicyShort>() == 20);

impl PolicyShort {
    /// The counter of entries of `prefix` (< 96) and `protocol`.
    pub fn slot(&mut self, prefix: u32, protocol: u8) -> &mut u32 {
        if prefix < POLICY_PREFIX_ANY_PORT {
            return &mut self.any_protocol;
        }
        match protocol {
            PROTO_TCP => &mut self.tcp,
            PROTO_UDP => &mut self.udp,
            PROTO_SCTP => &mut self.sctp,
            _ => &mut self.other,
        }
    }

    /// Whether some shorter entry may match `protocol`: the trie must be
    /// asked.
    #[inline(always)]
    pub fn covers(&self, protocol: u8) -> bool {
        self.any_protocol != 0
            || match protocol {
                PROTO_TCP => self.tcp != 0,
                PROTO_UDP => self.udp != 0,
                PROTO_SCTP => self.sctp != 0,
                _ => self.other != 0,
            }
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

// ---------------------------------------------------------------------------
// Flows: NETPOL_FLOWS, LRU hash of allowed flows, ONE entry per flow that
// serves both directions of travel: every packet of a known flow costs one
// lookup, and the LRU can only ever evict a whole flow (never one direction
// of it).
// ---------------------------------------------------------------------------

/// A flow as seen on one endpoint's veth, keyed from the pod's side so that
/// both directions of travel find the same entry: for a packet the pod sends
/// the pod side is its source, for a packet it receives its destination.
/// IPv4 addresses use the first four bytes and leave the rest zero. For ICMP
/// echo the echo id is the port of the side that sent the request and the
/// other side's port is 0, so a reply finds its request's entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub ifindex: u32,
    pub pod_port: u16,
    pub remote_port: u16,
    pub protocol: u8,
    pub family: u8,
    pub _pad: [u8; 2],
    pub pod_addr: [u8; 16],
    pub remote_addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 44);

/// Value of the flow table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowValue {
    pub created_ns: u64,
    pub last_seen_ns: u64,
    pub packets_from_pod: u64,
    pub bytes_from_pod: u64,
    pub packets_to_pod: u64,
    pub bytes_to_pod: u64,
    /// Policy generation the verdict was decided under.
    pub generation: u32,
    /// Rule that allowed the flow (0: not isolated, host, ...).
    pub rule_id: u32,
    /// `VERDICT_*`.
    pub verdict: u8,
    /// `REASON_*` of the original decision.
    pub reason: u8,
    /// `DIR_*` of the packet that opened the flow: packets the other way
    /// are replies. Set once, when the entry is created (with `BPF_NOEXIST`,
    /// so a racing packet of the other direction never flips it).
    pub origin: u8,
    /// `FLOW_S_*`: which idle timeout applies.
    pub state: u8,
    /// `SENDER_TAG | slot` of the pod, written to the `tc_index` of each
    /// packet the pod sends on this flow (0 in flows the veth did not see
    /// leave the pod).
    pub sender_tag: u16,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FlowValue>() == 64);

/// The flow is open: its protocol's idle timeout applies.
pub const FLOW_S_OPEN: u8 = 0;
/// A FIN or RST was seen (TCP): the short closing timeout applies.
pub const FLOW_S_CLOSING: u8 = 1;

/// Idle timeouts when `ConfigValue` leaves them 0, in seconds (Cilium's
/// defaults for TCP and closing; UDP and ICMP are datagram "flows" that an
/// application keeps alive or reopens).
pub const DEFAULT_TIMEOUT_TCP_S: u32 = 21_600;
pub const DEFAULT_TIMEOUT_TCP_CLOSING_S: u32 = 10;
pub const DEFAULT_TIMEOUT_UDP_S: u32 = 60;
pub const DEFAULT_TIMEOUT_ICMP_S: u32 = 30;

pub const VERDICT_ALLOW: u8 = 1;
pub const VERDICT_DENY: u8 = 2;
/// Would be denied, passed because the endpoint is in audit mode.
pub const VERDICT_AUDIT: u8 = 3;

// ---------------------------------------------------------------------------
// Fragments: NETPOL_FRAGS, LRU hash; the first fragment of a datagram records
// its ports and verdict, later fragments follow it.
// ---------------------------------------------------------------------------

/// A fragmented datagram on one endpoint's veth, like the kernel's
/// reassembly key: addresses and id, plus the protocol for IPv4 (for IPv6
/// `protocol` is 0: a later fragment's header does not name the upper
/// protocol).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FragKey {
    pub ifindex: u32,
    /// IPv4 identification or IPv6 fragment header identification.
    pub id: u32,
    pub protocol: u8,
    pub family: u8,
    pub direction: u8,
    pub _pad: u8,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<FragKey>() == 44);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FragValue {
    pub sport: u16,
    pub dport: u16,
    /// Policy generation of the first fragment's verdict: under a newer one,
    /// later fragments follow only a flow that is still allowed.
    pub generation: u32,
    /// `VERDICT_*` of the first fragment.
    pub verdict: u8,
    /// The datagram's upper protocol (an IPv6 later fragment does not name it).
    pub protocol: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FragValue>() == 12);

// ---------------------------------------------------------------------------
// Config: NETPOL_CONFIG, array of one `ConfigValue`.
// ---------------------------------------------------------------------------

/// Every endpoint is in audit mode.
pub const CFG_F_AUDIT_ALL: u32 = 1 << 0;
/// Send events for allowed new flows too (drops, revocations and audits are
/// always sent). Off by default: on a busy node an event per new connection
/// costs more than the verdict itself.
pub const CFG_F_LOG_ALLOWED: u32 = 1 << 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConfigValue {
    /// Bumped by the agent when a change can revoke; flows decided under an
    /// older generation are re-checked on their next packet. The top bit is
    /// the active epoch ([`generation_epoch`]): a flip is one write of this
    /// field.
    pub generation: u32,
    /// Verdict events allowed per second per CPU (0 = no events).
    pub events_per_sec: u32,
    /// `CFG_F_*`.
    pub flags: u32,
    /// Idle timeout of an open TCP flow, seconds (0: `DEFAULT_TIMEOUT_TCP_S`).
    pub timeout_tcp_s: u32,
    /// Idle timeout of a TCP flow after FIN or RST (0: the default).
    pub timeout_tcp_closing_s: u32,
    /// Idle timeout of UDP, SCTP and other non-TCP, non-ICMP flows (0: the default).
    pub timeout_udp_s: u32,
    /// Idle timeout of ICMP echo flows (0: the default).
    pub timeout_icmp_s: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<ConfigValue>() == 32);

/// Per-CPU token state of the event rate limiter (NETPOL_EVENT_RATE).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateState {
    pub window_start_ns: u64,
    pub count: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<RateState>() == 16);

// ---------------------------------------------------------------------------
// Events: NETPOL_EVENTS ring buffer of `VerdictEvent`, for new flows and drops.
// ---------------------------------------------------------------------------

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerdictEvent {
    pub timestamp_ns: u64,
    pub ifindex: u32,
    pub endpoint_id: u32,
    pub rule_id: u32,
    /// Identity of the peer address (0 when not looked up).
    pub peer_identity: u32,
    pub policy_id: u32,
    pub packet_len: u32,
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    pub family: u8,
    pub direction: u8,
    /// `VERDICT_*`.
    pub verdict: u8,
    /// `REASON_*`.
    pub reason: u8,
    pub _pad: [u8; 7],
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<VerdictEvent>() == 80);

/// Counter slots: `direction * REASON_SLOTS + reason`, then the event
/// accounting slots.
pub const REASON_SLOTS: u32 = 64;
pub const COUNTER_EVENTS_SENT: u32 = 2 * REASON_SLOTS;
/// Events not sent because of the per-CPU rate limit.
pub const COUNTER_EVENTS_RATE_LIMITED: u32 = 2 * REASON_SLOTS + 1;
/// Events not sent because the ring buffer was full.
pub const COUNTER_EVENTS_RINGBUF_FULL: u32 = 2 * REASON_SLOTS + 2;
pub const COUNTER_SLOTS: u32 = 2 * REASON_SLOTS + 3;

pub const fn counter_index(direction: u8, reason: u8) -> u32 {
    (direction as u32 & 1) * REASON_SLOTS + (reason as u32 % REASON_SLOTS)
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are `#[repr(C)]`, contain only integers and arrays
    // of integers, and have explicit padding, so every bit pattern is valid.
    unsafe impl aya::Pod for XdpReplyConfig {}
    unsafe impl aya::Pod for EndpointValue {}
    unsafe impl aya::Pod for PeerValue {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for PolicyValue {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragValue {}
    unsafe impl aya::Pod for ConfigValue {}
    unsafe impl aya::Pod for RateState {}
    unsafe impl aya::Pod for VerdictEvent {}
    unsafe impl aya::Pod for LocalKey {}
    unsafe impl aya::Pod for PolicyShortKey {}
    unsafe impl aya::Pod for PolicyShort {}

    impl EndpointValue {
        /// The pod's addresses (the first of each family counts) and MAC.
        pub fn with_addresses(
            mut self,
            ips: impl IntoIterator<Item = std::net::IpAddr>,
            mac: Option<[u8; 6]>,
        ) -> Self {
            self.flags &= !(EP_F_HAS_V4 | EP_F_HAS_V6 | EP_F_HAS_MAC);
            self.addr_v4 = [0; 4];
            self.addr_v6 = [0; 16];
            self.mac = [0; 6];
            for ip in ips {
                match ip {
                    std::net::IpAddr::V4(v4) if self.flags & EP_F_HAS_V4 == 0 => {
                        self.addr_v4 = v4.octets();
                        self.flags |= EP_F_HAS_V4;
                    }
                    std::net::IpAddr::V6(v6) if self.flags & EP_F_HAS_V6 == 0 => {
                        self.addr_v6 = v6.octets();
                        self.flags |= EP_F_HAS_V6;
                    }
                    _ => {}
                }
            }
            if let Some(mac) = mac {
                self.mac = mac;
                self.flags |= EP_F_HAS_MAC;
            }
            self
        }
    }

    impl FlowKey {
        pub fn pod_ip(&self) -> std::net::IpAddr {
            ip_from(self.family, &self.pod_addr)
        }
        pub fn remote_ip(&self) -> std::net::IpAddr {
            ip_from(self.family, &self.remote_addr)
        }
    }

    impl VerdictEvent {
        pub fn src_ip(&self) -> std::net::IpAddr {
            ip_from(self.family, &self.saddr)
        }
        pub fn dst_ip(&self) -> std::net::IpAddr {
            ip_from(self.family, &self.daddr)
        }
        /// Parse an event from the bytes of a ring buffer record.
        pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
            if bytes.len() < core::mem::size_of::<Self>() {
                return None;
            }
            // SAFETY: length checked; every bit pattern is a valid VerdictEvent.
            Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<Self>()) })
        }
    }

    /// Address bytes as stored in flow keys and events.
    pub fn ip_from(family: u8, bytes: &[u8; 16]) -> std::net::IpAddr {
        if family == FAMILY_V4 {
            std::net::IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])
        } else {
            std::net::IpAddr::from(*bytes)
        }
    }

    /// The stored form of an address (IPv4 in the first four bytes).
    pub fn ip_bytes(ip: std::net::IpAddr) -> (u8, [u8; 16]) {
        let mut out = [0u8; 16];
        match ip {
            std::net::IpAddr::V4(v4) => {
                out[..4].copy_from_slice(&v4.octets());
                (FAMILY_V4, out)
            }
            std::net::IpAddr::V6(v6) => (FAMILY_V6, v6.octets()),
        }
    }

    pub fn protocol_name(p: u8) -> &'static str {
        match p {
            PROTO_TCP => "TCP",
            PROTO_UDP => "UDP",
            PROTO_SCTP => "SCTP",
            PROTO_ICMP => "ICMP",
            PROTO_ICMPV6 => "ICMPv6",
            _ => "other",
        }
    }

    pub fn verdict_name(v: u8) -> &'static str {
        match v {
            VERDICT_ALLOW => "allow",
            VERDICT_DENY => "deny",
            VERDICT_AUDIT => "audit",
            _ => "unknown",
        }
    }

    pub fn direction_name(d: u8) -> &'static str {
        if d == DIR_INGRESS {
            "ingress"
        } else {
            "egress"
        }
    }
}
#[cfg(feature = "user")]
pub use user::*;

#[cfg(all(test, feature = "user"))]
mod tests {
    use super::*;

    #[test]
    fn policy_key_port_is_big_endian_for_prefix_ranges() {
        let k = PolicyKey::new(7, 9, DIR_EGRESS, PROTO_TCP, 0x1234);
        assert_eq!(k.port, [0x12, 0x34]);
        assert_eq!(k.port(), 0x1234);
    }

    #[test]
    fn counter_slots_do_not_overlap() {
        assert!(counter_index(DIR_EGRESS, (REASON_SLOTS - 1) as u8) < COUNTER_EVENTS_SENT);
        assert_ne!(counter_index(DIR_INGRESS, 3), counter_index(DIR_EGRESS, 3));
    }

    #[test]
    fn epochs_travel_in_the_generation_and_tag_keys_and_ids() {
        let g = flip_generation(41, 1);
        assert_eq!((generation_epoch(g), g & !EPOCH_BIT), (1, 42));
        let g2 = flip_generation(g, 0);
        assert_eq!((generation_epoch(g2), g2), (0, 43));
        assert_eq!(bump_generation(g), g + 1, "a bump keeps the epoch");
        assert_eq!(generation_epoch(flip_generation(u32::MAX, 1)), 1);
        assert_ne!(
            flip_generation(u32::MAX, 1),
            u32::MAX,
            "a flip always changes it"
        );
        assert_eq!(endpoint_key(7, 0), 7, "epoch 0 is the untagged layout");
        assert_eq!(endpoint_key(7, 1), 7 | EPOCH_BIT);
        assert_eq!(id_epoch(epoch_policy_id(5, 1)), 1);
        assert_eq!(epoch_policy_id(epoch_policy_id(5, 1), 0), 5);
    }

    #[test]
    fn ip_bytes_round_trip() {
        for ip in ["10.1.2.3", "fd00::1"] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            let (f, b) = ip_bytes(ip);
            assert_eq!(ip_from(f, &b), ip);
        }
    }
}

// ---------------------------------------------------------------------------
// Flow-table shares: NETPOL_QUOTA_CONFIG, NETPOL_QUOTA_SLOTS and
// NETPOL_QUOTA_STATE (see `netpol-ebpf/src/quota.rs` for why there is no
// per-endpoint count that could drift).
//
// Every endpoint owns, on each CPU, a ring of `slots_per_cpu` slots. A new
// flow entry is only created after it claimed a slot on the CPU that creates
// it; a slot is free when the flow it names is no longer in NETPOL_FLOWS (or
// is there but idle past its timeout). So an endpoint holds at most
// `slots_per_cpu` entries per CPU, and never needs to evict another's.
// ---------------------------------------------------------------------------

/// Value of NETPOL_QUOTA_CONFIG (array of one). Written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QuotaConfig {
    /// Flow entries one endpoint may create per CPU; 0 = no shares (the
    /// shared LRU alone, as before).
    pub slots_per_cpu: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<QuotaConfig>() == 8);

/// Key of NETPOL_QUOTA_SLOTS: one slot of one endpoint's ring on one CPU.
/// The value is the `FlowKey` of the flow that last claimed the slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QuotaSlotKey {
    /// Host-side veth ifindex of the endpoint.
    pub ifindex: u32,
    /// `bpf_get_smp_processor_id()` of the CPU whose ring this is: only that
    /// CPU writes it, so claims never race.
    pub cpu: u32,
    /// `0 .. slots_per_cpu`.
    pub slot: u32,
}
const _: () = assert!(core::mem::size_of::<QuotaSlotKey>() == 12);

impl QuotaSlotKey {
    pub const fn new(ifindex: u32, cpu: u32, slot: u32) -> Self {
        Self { ifindex, cpu, slot }
    }
}

/// Per-CPU value of NETPOL_QUOTA_STATE, keyed by endpoint ifindex: the ring's
/// cursor and what happened on this CPU. Written by the datapath; the agent
/// sums the counters over CPUs for its metrics. The counters only ever grow
/// (events, not a level), so they cannot drift either.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QuotaState {
    /// Next slot to try (modulo `slots_per_cpu`).
    pub cursor: u32,
    pub _pad: u32,
    /// New flows that claimed a slot.
    pub admitted: u64,
    /// New flows refused: every slot tried named a live flow.
    pub refused: u64,
    /// Slots reclaimed because their flow was gone from NETPOL_FLOWS (closed,
    /// expired on its own packet, revoked, or evicted by the LRU).
    pub reclaimed_gone: u64,
    /// Slots reclaimed because their flow was idle past its timeout (the
    /// datapath removed the entry then).
    pub reclaimed_expired: u64,
}
const _: () = assert!(core::mem::size_of::<QuotaState>() == 40);

#[cfg(feature = "user")]
mod quota_user {
    use super::*;
    // SAFETY: `#[repr(C)]`, integers only, explicit padding.
    unsafe impl aya::Pod for QuotaConfig {}
    unsafe impl aya::Pod for QuotaSlotKey {}
    unsafe impl aya::Pod for QuotaState {}
}
