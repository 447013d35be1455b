//! The kernel side as the agent sees it: load the embedded eBPF object with
//! its maps pinned (adopting maps a previous agent pinned), attach the
//! programs to veths through pinned TCX links (replacing a previous agent's
//! program inside the same link, so enforcement never has a gap), and write
//! map entries.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader, Pod,
    maps::{
        Array, HashMap, IterableMap as _, LpmTrie, MapData, PerCpuArray, PerCpuHashMap,
        lpm_trie::Key,
    },
    programs::{
        LinkOrder, SchedClassifier, SkLookup, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
    },
};
use netpol_common::{
    COUNTER_SLOTS, ConfigValue, EndpointValue, FlowKey, FlowValue, LocalKey,
    POLICY_PREFIX_ANY_PROTO, POLICY_PREFIX_FULL, PeerValue, PolicyKey, PolicyShort, PolicyShortKey,
    PolicyValue, QuotaConfig, QuotaSlotKey, QuotaState, map_names, prog_names,
};

use crate::pins::{Hook, Pins};

/// The eBPF object, built by build.rs with aya-build.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netpol"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("preparing bpffs at {path}: {source}")]
    Bpffs {
        path: String,
        source: std::io::Error,
    },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
    #[error("map {map} is full (max_entries {capacity}): {what} could not be programmed")]
    MapFull {
        map: &'static str,
        capacity: u32,
        what: String,
    },
    #[error("map {map}: {what} is not an entry the datapath can use")]
    InvalidEntry { map: &'static str, what: String },
    #[error(
        "pinned map {path} has key size {found_key} and value size {found_value}, but this \
         agent's {map} has {want_key} and {want_value}: it was pinned by an incompatible \
         version. Its programs keep enforcing with it; to replace it run `netpol-agent cleanup \
         --bpffs-root <root>` (enforcement stops until this agent starts)"
    )]
    IncompatiblePin {
        map: &'static str,
        path: String,
        found_key: u32,
        found_value: u32,
        want_key: u32,
        want_value: u32,
    },
    #[error("attaching to {ifname} (ifindex {ifindex}) {hook}: {source}")]
    Attach {
        ifname: String,
        ifindex: u32,
        hook: &'static str,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

type Result<T> = std::result::Result<T, DatapathError>;

/// Map sizes (max entries), set at load time, for one policy state: the maps
/// that hold both epochs (`NETPOL_ENDPOINTS`, `NETPOL_POLICY`) are created
/// twice as big, and each epoch has its own peer tries of these sizes. A map
/// that is already pinned keeps the size it was created with.
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    pub endpoints: u32,
    pub peers_v4: u32,
    pub peers_v6: u32,
    pub policy: u32,
    pub flows: u32,
    pub frags: u32,
    pub events_bytes: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        use netpol_common::sizes;
        Self {
            endpoints: sizes::ENDPOINTS,
            peers_v4: sizes::PEERS_V4,
            peers_v6: sizes::PEERS_V6,
            policy: sizes::POLICY,
            flows: sizes::FLOWS,
            frags: sizes::FRAGS,
            events_bytes: sizes::EVENTS_BYTES,
        }
    }
}

pub struct Datapath {
    ebpf: Ebpf,
    pins: Pins,
    sizes: MapSizes,
    /// This process loaded (and the verifier checked) the object's programs.
    programs_loaded: bool,
    /// Programs loaded from this same object (by earlier agents, and by
    /// this one once it has), by name -> ids: a pinned link that runs one of
    /// them is adopted as it is (see `Datapath::load`).
    reused: BTreeMap<String, BTreeSet<u32>>,
    /// Where that is recorded (a file in the agent's state directory: the
    /// BPF filesystem holds no plain files); `None`: nothing is reused.
    record: Option<PathBuf>,
}

/// Every program of the object.
const PROGRAMS: [&str; 5] = [
    prog_names::FROM_POD,
    prog_names::TO_POD,
    prog_names::POST_NAT,
    prog_names::LOCAL_IN,
    prog_names::XDP_UPLINK,
];

/// What identifies the programs a load produces: the object's bytes and the
/// map sizes (a hash, with Rust's fixed-key SipHash: stable for one build
/// of the agent, and a different build at worst loads again).
fn fingerprint(sizes: MapSizes) -> String {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    EBPF_OBJECT.hash(&mut h);
    format!("{sizes:?}").hash(&mut h);
    format!("{:016x}-{}", h.finish(), EBPF_OBJECT.len())
}

/// The programs record at `path`, if it is for `fingerprint` and names
/// every program: `object <fingerprint>`, then `<program> <id>` lines.
fn read_record(path: &Path, fingerprint: &str) -> Option<BTreeMap<String, BTreeSet<u32>>> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut lines = text.lines();
    if lines.next()? != format!("object {fingerprint}") {
        return None;
    }
    let mut ids: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
    for l in lines {
        if let Some((name, id)) = l.split_once(' ')
            && let Ok(id) = id.parse()
        {
            ids.entry(name.to_string()).or_default().insert(id);
        }
    }
    PROGRAMS.iter().all(|p| ids.contains_key(*p)).then_some(ids)
}

/// Load (verify) every program of the object.
fn load_programs(ebpf: &mut Ebpf) -> Result<()> {
    for hook in Hook::TC {
        let name = hook.program();
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .expect("program is in the object")
            .try_into()
            .map_err(|source| DatapathError::Program { name, source })?;
        prog.load()
            .map_err(|source| DatapathError::Program { name, source })?;
    }
    let name = prog_names::LOCAL_IN;
    let prog: &mut SkLookup = ebpf
        .program_mut(name)
        .expect("program is in the object")
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })?;
    prog.load()
        .map_err(|source| DatapathError::Program { name, source })?;
    let name = prog_names::XDP_UPLINK;
    let prog: &mut aya::programs::Xdp = ebpf
        .program_mut(name)
        .expect("program is in the object")
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })?;
    prog.load()
        .map_err(|source| DatapathError::Program { name, source })?;
    Ok(())
}

/// The id of the program a pinned link runs.
fn link_program(path: &Path) -> Option<u32> {
    let pinned = PinnedLink::from_pin(path).ok()?;
    FdLink::from(pinned).info().ok().map(|i| i.program_id())
}

fn map_err(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map { map, source }
}

/// `E2BIG`/`ENOSPC`/`ENOMEM` from a map update: the map is full.
fn is_full(e: &aya::maps::MapError) -> bool {
    matches!(e, aya::maps::MapError::SyscallError(s)
        if matches!(s.io_error.raw_os_error(), Some(libc::E2BIG) | Some(libc::ENOSPC) | Some(libc::ENOMEM)))
}

/// Key and value sizes of every pinned map, as this agent's object defines
/// them (an LPM key is the 4-byte prefix length plus the data).
fn expected_layout(map: &str) -> Option<(u32, u32)> {
    use std::mem::size_of;

    use netpol_common::*;
    let sz = |k: usize, v: usize| Some((k as u32, v as u32));
    match map {
        map_names::ENDPOINTS => sz(4, size_of::<EndpointValue>()),
        map_names::PEERS_V4 => sz(4 + 4, size_of::<PeerValue>()),
        map_names::PEERS_V6 => sz(4 + 16, size_of::<PeerValue>()),
        map_names::PEERS_V4_E1 => sz(4 + 4, size_of::<PeerValue>()),
        map_names::PEERS_V6_E1 => sz(4 + 16, size_of::<PeerValue>()),
        map_names::POLICY => sz(4 + size_of::<PolicyKey>(), size_of::<PolicyValue>()),
        map_names::FLOWS => sz(size_of::<FlowKey>(), size_of::<FlowValue>()),
        map_names::FRAGS => sz(size_of::<FragKey>(), size_of::<FragValue>()),
        map_names::COUNTERS => sz(4, 8),
        map_names::EVENT_RATE => sz(4, size_of::<RateState>()),
        map_names::CONFIG => sz(4, size_of::<ConfigValue>()),
        map_names::LOCAL_ADDRS => sz(size_of::<LocalKey>(), 4),
        map_names::DEFER_V4 => sz(4 + 4, 4),
        map_names::DEFER_V6 => sz(4 + 16, 4),
        map_names::SLOTS => sz(4, 4),
        map_names::QUOTA_CONFIG => sz(4, size_of::<QuotaConfig>()),
        map_names::QUOTA_SLOTS => sz(size_of::<QuotaSlotKey>(), size_of::<FlowKey>()),
        map_names::QUOTA_STATE => sz(4, size_of::<QuotaState>()),
        map_names::XDP_REPLIES => sz(4, 8),
        map_names::XDP_CONFIG => sz(4, size_of::<XdpReplyConfig>()),
        map_names::EXACT_V4 | map_names::EXACT_V4_E1 => sz(4, size_of::<PeerValue>()),
        map_names::EXACT_V6 | map_names::EXACT_V6_E1 => sz(16, size_of::<PeerValue>()),
        map_names::POLICY_EXACT => sz(size_of::<PolicyKey>(), size_of::<PolicyValue>()),
        map_names::POLICY_SHORT => sz(size_of::<PolicyShortKey>(), size_of::<PolicyShort>()),
        _ => None, // the ring buffer has no key or value
    }
}

/// Refuse to adopt a pinned map whose layout differs from ours (a program
/// would read garbage from it).
fn check_pinned_layouts(pins: &Pins) -> Result<()> {
    for name in map_names::ALL {
        let path = pins.map(name);
        let Some((want_key, want_value)) = expected_layout(name) else {
            continue;
        };
        if !path.exists() {
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&path).map_err(map_err(name))?;
        if info.key_size() != want_key || info.value_size() != want_value {
            return Err(DatapathError::IncompatiblePin {
                map: name,
                path: path.display().to_string(),
                found_key: info.key_size(),
                found_value: info.value_size(),
                want_key,
                want_value,
            });
        }
    }
    Ok(())
}

/// The capacities the maps really have, read from the pins: a map pinned by
/// an earlier agent keeps the size it was created with, whatever `asked`
/// says (for the maps that hold both epochs, per epoch). A difference is
/// logged, since a smaller map fills sooner than the flags suggest.
fn pinned_sizes(pins: &Pins, asked: MapSizes) -> Result<MapSizes> {
    let epochs = netpol_common::sizes::EPOCHS;
    let read = |name: &'static str, per: u32, want: u32| -> Result<u32> {
        let info = aya::maps::MapInfo::from_pin(pins.map(name)).map_err(map_err(name))?;
        let have = info.max_entries() / per;
        if have != want {
            tracing::warn!(
                map = name,
                pinned = have,
                asked = want,
                "map {name} is pinned with capacity {have} (per epoch), not the {want} asked for:                  the pinned map is kept; `netpol-agent cleanup` and a restart create it anew"
            );
        }
        Ok(have)
    };
    Ok(MapSizes {
        endpoints: read(map_names::ENDPOINTS, epochs, asked.endpoints)?,
        peers_v4: read(map_names::PEERS_V4, 1, asked.peers_v4)?.min(read(
            map_names::PEERS_V4_E1,
            1,
            asked.peers_v4,
        )?),
        peers_v6: read(map_names::PEERS_V6, 1, asked.peers_v6)?.min(read(
            map_names::PEERS_V6_E1,
            1,
            asked.peers_v6,
        )?),
        policy: read(map_names::POLICY, epochs, asked.policy)?,
        flows: read(map_names::FLOWS, 1, asked.flows)?,
        frags: read(map_names::FRAGS, 1, asked.frags)?,
        events_bytes: read(map_names::EVENTS, 1, asked.events_bytes)?,
    })
}

impl Datapath {
    /// Load the object, creating or adopting the pinned maps, and load both
    /// programs into the kernel (not attached yet).
    pub fn load(pins: Pins, sizes: MapSizes) -> Result<Self> {
        Self::load_reusing(pins, sizes, None)
    }

    /// [`Datapath::load`], reusing the programs that run in the pinned links
    /// when `record` says they come from this same object (see below).
    pub fn load_reusing(pins: Pins, sizes: MapSizes, record: Option<PathBuf>) -> Result<Self> {
        pins.prepare().map_err(|source| DatapathError::Bpffs {
            path: pins.root().display().to_string(),
            source,
        })?;
        check_pinned_layouts(&pins)?;
        let mut loader = EbpfLoader::new();
        let map_paths: Vec<(&'static str, std::path::PathBuf)> =
            map_names::ALL.iter().map(|n| (*n, pins.map(n))).collect();
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let epochs = netpol_common::sizes::EPOCHS;
        loader
            .map_max_entries(map_names::ENDPOINTS, sizes.endpoints.saturating_mul(epochs))
            .map_max_entries(map_names::PEERS_V4, sizes.peers_v4)
            .map_max_entries(map_names::PEERS_V6, sizes.peers_v6)
            .map_max_entries(map_names::PEERS_V4_E1, sizes.peers_v4)
            .map_max_entries(map_names::PEERS_V6_E1, sizes.peers_v6)
            .map_max_entries(map_names::POLICY, sizes.policy.saturating_mul(epochs))
            // The exact maps hold at most what their tries hold.
            .map_max_entries(map_names::EXACT_V4, sizes.peers_v4)
            .map_max_entries(map_names::EXACT_V4_E1, sizes.peers_v4)
            .map_max_entries(map_names::EXACT_V6, sizes.peers_v6)
            .map_max_entries(map_names::EXACT_V6_E1, sizes.peers_v6)
            .map_max_entries(map_names::POLICY_EXACT, sizes.policy.saturating_mul(epochs))
            .map_max_entries(map_names::POLICY_SHORT, sizes.policy.saturating_mul(epochs))
            .map_max_entries(map_names::FLOWS, sizes.flows)
            .map_max_entries(map_names::FRAGS, sizes.frags)
            .map_max_entries(map_names::EVENTS, sizes.events_bytes)
            .map_max_entries(map_names::LOCAL_ADDRS, sizes.endpoints.saturating_mul(2))
            // Every share's slots fit in as many entries as the flow table.
            .map_max_entries(map_names::QUOTA_SLOTS, sizes.flows)
            .map_max_entries(map_names::QUOTA_STATE, sizes.endpoints);
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        // Before any program of this object can run: the exact maps say what
        // the tries say (an earlier agent may have pinned tries without
        // them, or stopped between a trie write and its exact one).
        let repaired = repair_exact(&mut ebpf)?;
        if repaired > 0 {
            tracing::warn!(repaired, "exact maps repaired from the tries at load");
        }
        // From here on, the sizes are the pinned maps' (which an earlier
        // agent may have created with other flags).
        let sizes = pinned_sizes(&pins, sizes)?;
        // A restart with the same object: the programs in the pinned links
        // (recorded with their ids) are the ones this load would produce,
        // over the same pinned maps. They are adopted as they are, and the
        // verifier (nearly all of a restart's time before its first sync)
        // runs later (`ensure_programs`). Otherwise the programs are loaded
        // now and the record names this object's; links running another
        // object's programs get ours swapped in as before.
        let fp = fingerprint(sizes);
        let reused = record
            .as_deref()
            .and_then(|r| read_record(r, &fp))
            .unwrap_or_default();
        let mut dp = Self {
            ebpf,
            pins,
            sizes,
            programs_loaded: false,
            reused,
            record,
        };
        if dp.reused.is_empty() {
            dp.ensure_programs()?;
        }
        Ok(dp)
    }

    /// The record, written atomically: the fingerprint, then every program
    /// id known to come from this object.
    fn write_record(&self) {
        let Some(path) = &self.record else {
            return;
        };
        let mut text = format!("object {}\n", fingerprint(self.sizes));
        for (name, ids) in &self.reused {
            for id in ids {
                text.push_str(&format!("{name} {id}\n"));
            }
        }
        let tmp = path.with_extension("tmp");
        let written = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            // Only the next restart's speed depends on it.
            tracing::warn!(path = %path.display(), "recording the programs: {e}");
        }
    }

    /// Load the programs if this process has not (a restart that adopted a
    /// previous agent's): before a new link is made, and right after the
    /// first sync, so that a new pod's veth does not wait for the verifier.
    /// Their ids join the record.
    pub fn ensure_programs(&mut self) -> Result<()> {
        if self.programs_loaded {
            return Ok(());
        }
        load_programs(&mut self.ebpf)?;
        self.programs_loaded = true;
        for name in PROGRAMS {
            if let Some(Ok(info)) = self.ebpf.program(name).map(|p| p.info()) {
                self.reused
                    .entry(name.to_string())
                    .or_default()
                    .insert(info.id());
            }
        }
        self.write_record();
        Ok(())
    }

    /// Whether the pinned link at `path` runs a `program` of this same
    /// object (an earlier agent's, or ours): then it is adopted as it is,
    /// with no swap (the programs are the same code over the same maps).
    pub(crate) fn adoptable(&self, path: &Path, program: &str) -> bool {
        path.exists()
            && self
                .reused
                .get(program)
                .is_some_and(|ids| link_program(path).is_some_and(|id| ids.contains(&id)))
    }

    /// Whether this process runs on programs a previous agent loaded (no
    /// verifier run yet).
    pub fn reusing_programs(&self) -> bool {
        !self.programs_loaded
    }

    /// The loaded object, for the XDP attachment (`crate::xdp`).
    pub(crate) fn ebpf_mut(&mut self) -> &mut Ebpf {
        if let Err(e) = self.ensure_programs() {
            tracing::error!("loading the programs: {e}");
        }
        &mut self.ebpf
    }

    pub fn pins(&self) -> &Pins {
        &self.pins
    }

    /// The maps' capacities as pinned (see [`pinned_sizes`]), which may
    /// differ from what was asked for when the maps were adopted.
    pub fn sizes(&self) -> MapSizes {
        self.sizes
    }

    /// Attach both programs to the veth, or, if a previous agent left pinned
    /// links there, swap our programs into those links atomically.
    pub fn attach(&mut self, ifindex: u32, ifname: &str) -> Result<()> {
        for hook in Hook::ALL {
            self.attach_hook(ifindex, ifname, hook)?;
        }
        Ok(())
    }

    /// Attach `netpol_post_nat` to a device of the node (an uplink, a
    /// tunnel), the same way: a pinned link, adopted across restarts.
    pub fn attach_post_nat(&mut self, ifindex: u32, ifname: &str) -> Result<()> {
        self.attach_hook(ifindex, ifname, Hook::PostNat)
    }

    /// Attach `netpol_local_in` to this network namespace's sk_lookup, and
    /// pin the link. A previous agent's link stays until ours is attached
    /// (the kernel runs both meanwhile): the new pin replaces the old one,
    /// whose link then goes. No gap.
    pub fn attach_local_in(&mut self) -> Result<()> {
        let path = self.pins.local_in_link();
        let name = prog_names::LOCAL_IN;
        if self.adoptable(&path, name) {
            return Ok(());
        }
        self.ensure_programs()?;
        let attach_err = |source: Box<dyn std::error::Error + Send + Sync>| DatapathError::Attach {
            ifname: "sk_lookup".to_string(),
            ifindex: 0,
            hook: "local_in",
            source,
        };
        let prog: &mut SkLookup = self
            .ebpf
            .program_mut(name)
            .expect("program is in the object")
            .try_into()
            .map_err(|source| DatapathError::Program { name, source })?;
        let netns =
            std::fs::File::open("/proc/self/ns/net").map_err(|e| attach_err(Box::new(e)))?;
        let id = prog.attach(&netns).map_err(|e| attach_err(Box::new(e)))?;
        let link = prog.take_link(id).map_err(|e| attach_err(Box::new(e)))?;
        let fd: FdLink = link.into();
        // bpffs refuses names with a dot.
        let tmp = path.with_file_name("netns-local_in-new");
        let _ = std::fs::remove_file(&tmp);
        fd.pin(&tmp).map_err(|e| attach_err(Box::new(e)))?;
        std::fs::rename(&tmp, &path).map_err(|e| attach_err(Box::new(e)))?;
        Ok(())
    }

    fn attach_hook(&mut self, ifindex: u32, ifname: &str, hook: Hook) -> Result<()> {
        {
            let path = self.pins.link(ifindex, hook);
            let name = hook.program();
            if self.adoptable(&path, name) {
                return Ok(());
            }
            self.ensure_programs()?;
            let attach_err =
                |source: Box<dyn std::error::Error + Send + Sync>| DatapathError::Attach {
                    ifname: ifname.to_string(),
                    ifindex,
                    hook: hook.as_str(),
                    source,
                };
            let prog: &mut SchedClassifier = self
                .ebpf
                .program_mut(name)
                .expect("program is in the object")
                .try_into()
                .map_err(|source| DatapathError::Program { name, source })?;
            if path.exists() {
                let replaced = PinnedLink::from_pin(&path)
                    .map_err(|e| attach_err(Box::new(e)))
                    .and_then(|pinned| {
                        let link: SchedClassifierLink = FdLink::from(pinned).try_into().map_err(
                            |e: aya::programs::links::LinkError| attach_err(Box::new(e)),
                        )?;
                        let id = prog
                            .attach_to_link(link)
                            .map_err(|e| attach_err(Box::new(e)))?;
                        // Ownership back out of the program, so that dropping
                        // the program never detaches; the pin keeps it alive.
                        let link = prog.take_link(id).map_err(|e| attach_err(Box::new(e)))?;
                        drop(link);
                        Ok(())
                    });
                match replaced {
                    Ok(()) => return Ok(()),
                    Err(e) => {
                        // A link whose interface is gone: start over.
                        tracing::warn!(
                            ifname,
                            ifindex,
                            hook = hook.as_str(),
                            "stale link pin: {e}"
                        );
                        let _ = std::fs::remove_file(&path);
                    }
                }
            }
            let attach_type = match hook {
                Hook::FromPod => TcAttachType::Ingress,
                Hook::ToPod | Hook::PostNat => TcAttachType::Egress,
            };
            let id = prog
                .attach_with_options(
                    ifname,
                    attach_type,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(|e| attach_err(Box::new(e)))?;
            let link = prog.take_link(id).map_err(|e| attach_err(Box::new(e)))?;
            let fd: FdLink = link
                .try_into()
                .map_err(|e: aya::programs::links::LinkError| attach_err(Box::new(e)))?;
            fd.pin(&path).map_err(|e| attach_err(Box::new(e)))?;
        }
        Ok(())
    }

    /// Remove our programs from a veth (unpinning the links destroys them).
    pub fn detach(&mut self, ifindex: u32) {
        for hook in Hook::ALL {
            let _ = std::fs::remove_file(self.pins.link(ifindex, hook));
        }
    }

    /// Remove `netpol_post_nat` from a node device.
    pub fn detach_post_nat(&mut self, ifindex: u32) {
        let _ = std::fs::remove_file(self.pins.link(ifindex, Hook::PostNat));
    }

    /// Pod veths that have pinned links (from us or a previous agent).
    pub fn attached(&self) -> BTreeSet<u32> {
        attached_ifindexes(&self.pins)
    }

    /// Node devices that have a pinned `netpol_post_nat` link.
    pub fn attached_post_nat(&self) -> BTreeSet<u32> {
        linked_ifindexes(&self.pins, |h| h == Hook::PostNat)
    }

    fn local_addrs(&mut self) -> Result<HashMap<&mut MapData, LocalKey, u32>> {
        HashMap::try_from(
            self.ebpf
                .map_mut(map_names::LOCAL_ADDRS)
                .expect("map in object"),
        )
        .map_err(map_err(map_names::LOCAL_ADDRS))
    }

    /// Endpoint slot -> its veth (the sender tag's meaning).
    pub fn set_slot(&mut self, slot: u16, ifindex: u32) -> Result<()> {
        let mut m: Array<_, u32> =
            Array::try_from(self.ebpf.map_mut(map_names::SLOTS).expect("map"))
                .map_err(map_err(map_names::SLOTS))?;
        m.set(u32::from(slot), ifindex, 0)
            .map_err(map_err(map_names::SLOTS))
    }

    /// A local pod's address -> its veth.
    pub fn set_local_addr(&mut self, ip: std::net::IpAddr, ifindex: u32) -> Result<()> {
        let (family, addr) = netpol_common::ip_bytes(ip);
        let cap = self.sizes.endpoints.saturating_mul(2);
        self.local_addrs()?
            .insert(LocalKey::new(family, addr), ifindex, 0)
            .map_err(|e| full_or(e, map_names::LOCAL_ADDRS, cap, format!("address {ip}")))
    }

    pub fn remove_local_addr(&mut self, ip: std::net::IpAddr) -> Result<()> {
        let (family, addr) = netpol_common::ip_bytes(ip);
        ignore_missing(
            self.local_addrs()?.remove(&LocalKey::new(family, addr)),
            map_names::LOCAL_ADDRS,
        )
    }

    /// The local-address entries in the kernel map.
    pub fn read_local_addrs(
        &mut self,
    ) -> Result<std::collections::BTreeMap<std::net::IpAddr, u32>> {
        let m = self.local_addrs()?;
        let mut out = std::collections::BTreeMap::new();
        for kv in m.iter() {
            let (k, v) = kv.map_err(map_err(map_names::LOCAL_ADDRS))?;
            out.insert(netpol_common::ip_from(k.family, &k.addr), v);
        }
        Ok(out)
    }

    /// An address range kube-proxy may translate: a pod's egress to it is
    /// judged after the DNAT.
    pub fn set_deferred(&mut self, net: ipnet::IpNet) -> Result<()> {
        match net {
            ipnet::IpNet::V4(n) => {
                let mut m: LpmTrie<_, [u8; 4], u32> =
                    LpmTrie::try_from(self.ebpf.map_mut(map_names::DEFER_V4).expect("map"))
                        .map_err(map_err(map_names::DEFER_V4))?;
                m.insert(&Key::new(n.prefix_len() as u32, n.network().octets()), 0, 0)
                    .map_err(|e| {
                        full_or(
                            e,
                            map_names::DEFER_V4,
                            netpol_common::sizes::DEFER_V4,
                            n.to_string(),
                        )
                    })
            }
            ipnet::IpNet::V6(n) => {
                let mut m: LpmTrie<_, [u8; 16], u32> =
                    LpmTrie::try_from(self.ebpf.map_mut(map_names::DEFER_V6).expect("map"))
                        .map_err(map_err(map_names::DEFER_V6))?;
                m.insert(&Key::new(n.prefix_len() as u32, n.network().octets()), 0, 0)
                    .map_err(|e| {
                        full_or(
                            e,
                            map_names::DEFER_V6,
                            netpol_common::sizes::DEFER_V6,
                            n.to_string(),
                        )
                    })
            }
        }
    }

    pub fn remove_deferred(&mut self, net: ipnet::IpNet) -> Result<()> {
        match net {
            ipnet::IpNet::V4(n) => {
                let mut m: LpmTrie<_, [u8; 4], u32> =
                    LpmTrie::try_from(self.ebpf.map_mut(map_names::DEFER_V4).expect("map"))
                        .map_err(map_err(map_names::DEFER_V4))?;
                ignore_missing(
                    m.remove(&Key::new(n.prefix_len() as u32, n.network().octets())),
                    map_names::DEFER_V4,
                )
            }
            ipnet::IpNet::V6(n) => {
                let mut m: LpmTrie<_, [u8; 16], u32> =
                    LpmTrie::try_from(self.ebpf.map_mut(map_names::DEFER_V6).expect("map"))
                        .map_err(map_err(map_names::DEFER_V6))?;
                ignore_missing(
                    m.remove(&Key::new(n.prefix_len() as u32, n.network().octets())),
                    map_names::DEFER_V6,
                )
            }
        }
    }

    /// The deferred ranges in the kernel maps.
    pub fn read_deferred(&mut self) -> Result<BTreeSet<ipnet::IpNet>> {
        let mut out = BTreeSet::new();
        {
            let m: LpmTrie<_, [u8; 4], u32> =
                LpmTrie::try_from(self.ebpf.map(map_names::DEFER_V4).expect("map"))
                    .map_err(map_err(map_names::DEFER_V4))?;
            for kv in m.iter() {
                let (k, _) = kv.map_err(map_err(map_names::DEFER_V4))?;
                if let Ok(n) = ipnet::Ipv4Net::new(Ipv4Addr::from(k.data()), k.prefix_len() as u8) {
                    out.insert(n.into());
                }
            }
        }
        {
            let m: LpmTrie<_, [u8; 16], u32> =
                LpmTrie::try_from(self.ebpf.map(map_names::DEFER_V6).expect("map"))
                    .map_err(map_err(map_names::DEFER_V6))?;
            for kv in m.iter() {
                let (k, _) = kv.map_err(map_err(map_names::DEFER_V6))?;
                if let Ok(n) = ipnet::Ipv6Net::new(Ipv6Addr::from(k.data()), k.prefix_len() as u8) {
                    out.insert(n.into());
                }
            }
        }
        Ok(out)
    }

    fn endpoints(&mut self) -> Result<HashMap<&mut MapData, u32, EndpointValue>> {
        HashMap::try_from(
            self.ebpf
                .map_mut(map_names::ENDPOINTS)
                .expect("map in object"),
        )
        .map_err(map_err(map_names::ENDPOINTS))
    }

    /// An endpoint in an epoch (`v.policy_id` already carries the epoch).
    pub fn set_endpoint(&mut self, epoch: u32, ifindex: u32, v: EndpointValue) -> Result<()> {
        let cap = self
            .sizes
            .endpoints
            .saturating_mul(netpol_common::sizes::EPOCHS);
        let key = netpol_common::endpoint_key(ifindex, epoch);
        self.endpoints()?.insert(key, v, 0).map_err(|e| {
            if is_full(&e) {
                DatapathError::MapFull {
                    map: map_names::ENDPOINTS,
                    capacity: cap,
                    what: format!("endpoint ifindex {ifindex} (epoch {epoch})"),
                }
            } else {
                map_err(map_names::ENDPOINTS)(e)
            }
        })
    }

    /// Removes an endpoint from one epoch.
    pub fn remove_endpoint(&mut self, epoch: u32, ifindex: u32) -> Result<()> {
        let key = netpol_common::endpoint_key(ifindex, epoch);
        match self.endpoints()?.remove(&key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(map_names::ENDPOINTS)(e)),
        }
    }

    /// An endpoint is gone from the enforced state: forget its flow-table
    /// share (a pod that gets its ifindex later starts with a free one).
    pub fn forget_endpoint(&mut self, ifindex: u32) -> Result<()> {
        self.remove_quota(ifindex)
    }

    /// A peer entry in an epoch's trie (and its exact copy, for a /32).
    pub fn set_peer_v4(
        &mut self,
        epoch: u32,
        addr: Ipv4Addr,
        prefix: u8,
        v: PeerValue,
    ) -> Result<()> {
        write_peer_v4(&mut self.ebpf, epoch, addr, prefix, Some(v))
    }

    pub fn remove_peer_v4(&mut self, epoch: u32, addr: Ipv4Addr, prefix: u8) -> Result<()> {
        write_peer_v4(&mut self.ebpf, epoch, addr, prefix, None)
    }

    /// A peer entry in an epoch's trie (and its exact copy, for a /128).
    pub fn set_peer_v6(
        &mut self,
        epoch: u32,
        addr: Ipv6Addr,
        prefix: u8,
        v: PeerValue,
    ) -> Result<()> {
        write_peer_v6(&mut self.ebpf, epoch, addr, prefix, Some(v))
    }

    pub fn remove_peer_v6(&mut self, epoch: u32, addr: Ipv6Addr, prefix: u8) -> Result<()> {
        write_peer_v6(&mut self.ebpf, epoch, addr, prefix, None)
    }

    /// A policy entry (its policy set id carries its epoch), with its exact
    /// copy (one port) or its count in `NETPOL_POLSHORT` (shorter).
    pub fn set_policy(&mut self, key: PolicyKey, prefix: u32, v: PolicyValue) -> Result<()> {
        write_policy(&mut self.ebpf, key, prefix, Some(v))
    }

    pub fn remove_policy(&mut self, key: PolicyKey, prefix: u32) -> Result<()> {
        write_policy(&mut self.ebpf, key, prefix, None)
    }

    pub fn config(&mut self) -> Result<ConfigValue> {
        let m: Array<_, ConfigValue> =
            Array::try_from(self.ebpf.map_mut(map_names::CONFIG).expect("map"))
                .map_err(map_err(map_names::CONFIG))?;
        m.get(&0, 0).map_err(map_err(map_names::CONFIG))
    }

    pub fn set_config(&mut self, v: ConfigValue) -> Result<()> {
        let mut m: Array<_, ConfigValue> =
            Array::try_from(self.ebpf.map_mut(map_names::CONFIG).expect("map"))
                .map_err(map_err(map_names::CONFIG))?;
        m.set(0, v, 0).map_err(map_err(map_names::CONFIG))
    }

    /// Counters summed over CPUs, indexed like `netpol_common::counter_index`.
    pub fn counters(&mut self) -> Result<Vec<u64>> {
        let m: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map_mut(map_names::COUNTERS).expect("map"))
                .map_err(map_err(map_names::COUNTERS))?;
        let mut out = vec![0u64; COUNTER_SLOTS as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let v = m
                .get(&(i as u32), 0)
                .map_err(map_err(map_names::COUNTERS))?;
            *slot = v.iter().sum();
        }
        Ok(out)
    }

    /// What both epochs of the kernel maps hold, untagged
    /// (`crate::epoch::split`), with endpoints keyed by veth ifindex.
    ///
    /// The exact maps are repaired from the tries first (the tries are what
    /// the agent diffs against; a missing, stale or different exact entry
    /// is rewritten to agree with its trie).
    pub fn read_epochs(&mut self) -> Result<[crate::epoch::State<u32>; 2]> {
        let repaired = repair_exact(&mut self.ebpf)?;
        if repaired > 0 {
            tracing::warn!(repaired, "exact maps disagreed with the tries: repaired");
        }
        let mut v4 = [
            std::collections::BTreeMap::new(),
            std::collections::BTreeMap::new(),
        ];
        let mut v6 = [
            std::collections::BTreeMap::new(),
            std::collections::BTreeMap::new(),
        ];
        for epoch in 0..2u32 {
            let name = peers_v4_map(epoch);
            let m: LpmTrie<_, [u8; 4], PeerValue> =
                LpmTrie::try_from(self.ebpf.map(name).expect("map")).map_err(map_err(name))?;
            for kv in m.iter() {
                let (k, v) = kv.map_err(map_err(name))?;
                v4[epoch as usize].insert((Ipv4Addr::from(k.data()), k.prefix_len() as u8), v);
            }
            let name = peers_v6_map(epoch);
            let m: LpmTrie<_, [u8; 16], PeerValue> =
                LpmTrie::try_from(self.ebpf.map(name).expect("map")).map_err(map_err(name))?;
            for kv in m.iter() {
                let (k, v) = kv.map_err(map_err(name))?;
                v6[epoch as usize].insert((Ipv6Addr::from(k.data()), k.prefix_len() as u8), v);
            }
        }
        let mut policy = Vec::new();
        {
            let m: LpmTrie<_, PolicyKey, PolicyValue> =
                LpmTrie::try_from(self.ebpf.map(map_names::POLICY).expect("map"))
                    .map_err(map_err(map_names::POLICY))?;
            for kv in m.iter() {
                let (k, v) = kv.map_err(map_err(map_names::POLICY))?;
                policy.push(((k.data(), k.prefix_len()), v));
            }
        }
        let mut endpoints = Vec::new();
        {
            let m = self.endpoints()?;
            for kv in m.iter() {
                let (k, v) = kv.map_err(map_err(map_names::ENDPOINTS))?;
                endpoints.push((
                    (k & !netpol_common::EPOCH_BIT, netpol_common::id_epoch(k)),
                    v,
                ));
            }
        }
        Ok(crate::epoch::split(endpoints, v4, v6, policy))
    }

    /// Waits for a grace period: every program run that started before
    /// this call has finished. TC and sk_lookup programs run inside an RCU
    /// read-side critical section (softirq or `rcu_read_lock()` with
    /// preemption or bottom halves disabled), and
    /// `membarrier(MEMBARRIER_CMD_GLOBAL)` is `synchronize_rcu()` in the
    /// kernel, so after it no run still reads an epoch that stopped being
    /// active before the call. Kernels that refuse it (`nohz_full` CPUs)
    /// get a delay instead, far longer than a program run; on one CPU
    /// membarrier returns at once, which is right there too: while this
    /// thread runs, no non-preemptible program run is in progress.
    pub fn grace_period(&self) -> std::io::Result<()> {
        const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
        // SAFETY: membarrier takes two integers and touches no memory of ours.
        let r = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINVAL) {
            std::thread::sleep(std::time::Duration::from_millis(100));
            return Ok(());
        }
        Err(e)
    }

    /// Writes the generation (a flip when its epoch bit changes), keeping
    /// the rest of CONFIG: one `u32` the datapath reads once per run.
    pub fn set_generation(&mut self, generation: u32) -> Result<()> {
        let mut c = self.config()?;
        c.generation = generation;
        self.set_config(c)
    }

    /// Set the flow-table share (`slots_per_cpu` entries per endpoint and
    /// CPU; 0 = no shares).
    pub fn set_quota(&mut self, v: QuotaConfig) -> Result<()> {
        let mut m: Array<_, QuotaConfig> =
            Array::try_from(self.ebpf.map_mut(map_names::QUOTA_CONFIG).expect("map"))
                .map_err(map_err(map_names::QUOTA_CONFIG))?;
        m.set(0, v, 0).map_err(map_err(map_names::QUOTA_CONFIG))
    }

    pub fn quota(&mut self) -> Result<QuotaConfig> {
        let m: Array<_, QuotaConfig> =
            Array::try_from(self.ebpf.map(map_names::QUOTA_CONFIG).expect("map"))
                .map_err(map_err(map_names::QUOTA_CONFIG))?;
        m.get(&0, 0).map_err(map_err(map_names::QUOTA_CONFIG))
    }

    /// Forget an endpoint's slot rings and counters (the endpoint is gone; a
    /// pod that gets its ifindex later starts with a free share).
    fn remove_quota(&mut self, ifindex: u32) -> Result<()> {
        let slots = self.quota()?.slots_per_cpu;
        let cpus = aya::util::nr_cpus().unwrap_or(1) as u32;
        {
            let mut m: HashMap<_, QuotaSlotKey, FlowKey> =
                HashMap::try_from(self.ebpf.map_mut(map_names::QUOTA_SLOTS).expect("map"))
                    .map_err(map_err(map_names::QUOTA_SLOTS))?;
            for cpu in 0..cpus {
                for slot in 0..slots {
                    ignore_missing(
                        m.remove(&QuotaSlotKey::new(ifindex, cpu, slot)),
                        map_names::QUOTA_SLOTS,
                    )?;
                }
            }
        }
        let mut m: PerCpuHashMap<_, u32, QuotaState> =
            PerCpuHashMap::try_from(self.ebpf.map_mut(map_names::QUOTA_STATE).expect("map"))
                .map_err(map_err(map_names::QUOTA_STATE))?;
        ignore_missing(m.remove(&ifindex), map_names::QUOTA_STATE)
    }

    /// Each endpoint's share accounting, summed over CPUs, by ifindex.
    pub fn quota_states(&mut self) -> Result<std::collections::BTreeMap<u32, QuotaState>> {
        let m: PerCpuHashMap<_, u32, QuotaState> =
            PerCpuHashMap::try_from(self.ebpf.map(map_names::QUOTA_STATE).expect("map"))
                .map_err(map_err(map_names::QUOTA_STATE))?;
        let mut out = std::collections::BTreeMap::new();
        for kv in m.iter() {
            let (ifindex, per_cpu) = kv.map_err(map_err(map_names::QUOTA_STATE))?;
            let mut sum = QuotaState::default();
            for s in per_cpu.iter() {
                sum.admitted += s.admitted;
                sum.refused += s.refused;
                sum.reclaimed_gone += s.reclaimed_gone;
                sum.reclaimed_expired += s.reclaimed_expired;
            }
            out.insert(ifindex, sum);
        }
        Ok(out)
    }

    /// Flow entries per endpoint (ifindex), counted in the flow table itself.
    pub fn flow_entries(&mut self) -> Result<std::collections::BTreeMap<u32, u64>> {
        let m: HashMap<_, FlowKey, FlowValue> =
            HashMap::try_from(self.ebpf.map(map_names::FLOWS).expect("map"))
                .map_err(map_err(map_names::FLOWS))?;
        let mut out = std::collections::BTreeMap::new();
        for k in m.keys() {
            let k = k.map_err(map_err(map_names::FLOWS))?;
            *out.entry(k.ifindex).or_insert(0) += 1;
        }
        Ok(out)
    }

    /// Hand over the events ring buffer (for the flow-log task).
    pub fn take_events(&mut self) -> Option<aya::maps::RingBuf<aya::maps::MapData>> {
        let map = self.ebpf.take_map(map_names::EVENTS)?;
        aya::maps::RingBuf::try_from(map).ok()
    }
}

/// The IPv4 peer trie of an epoch.
pub fn peers_v4_map(epoch: u32) -> &'static str {
    if epoch & 1 == 0 {
        map_names::PEERS_V4
    } else {
        map_names::PEERS_V4_E1
    }
}

/// The IPv6 peer trie of an epoch.
pub fn peers_v6_map(epoch: u32) -> &'static str {
    if epoch & 1 == 0 {
        map_names::PEERS_V6
    } else {
        map_names::PEERS_V6_E1
    }
}

/// The exact IPv4 peer map of an epoch (the /32 entries of its trie).
pub fn exact_v4_map(epoch: u32) -> &'static str {
    if epoch & 1 == 0 {
        map_names::EXACT_V4
    } else {
        map_names::EXACT_V4_E1
    }
}

/// The exact IPv6 peer map of an epoch (the /128 entries of its trie).
pub fn exact_v6_map(epoch: u32) -> &'static str {
    if epoch & 1 == 0 {
        map_names::EXACT_V6
    } else {
        map_names::EXACT_V6_E1
    }
}

// ---------------------------------------------------------------------------
// Entry writes with their exact maps (see "Exact maps" in `netpol_common`),
// on the maps of any loaded object: the agent's `Datapath`, and the test kits
// and benchmarks that load the object themselves, write through these, so
// that every filler keeps the exact maps the datapath reads first.
// ---------------------------------------------------------------------------

fn lpm<'a, K: Pod, V: Pod>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<LpmTrie<&'a mut MapData, K, V>> {
    LpmTrie::try_from(ebpf.map_mut(name).expect("map in object")).map_err(map_err(name))
}

fn hash<'a, K: Pod, V: Pod>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<HashMap<&'a mut MapData, K, V>> {
    HashMap::try_from(ebpf.map_mut(name).expect("map in object")).map_err(map_err(name))
}

/// A map's capacity, for an error message.
fn capacity(map: &MapData) -> u32 {
    map.info().map(|i| i.max_entries()).unwrap_or(0)
}

/// `Some`: write the peer entry `addr/prefix` into `trie`, then, for a
/// full-length prefix, its copy into `exact`. `None`: remove them (the exact
/// copy first). So an exact entry never outlives its trie entry, and the
/// agent writes only the epoch no packet reads anyway.
fn write_peer<A: std::fmt::Display, const N: usize>(
    ebpf: &mut Ebpf,
    (trie, exact): (&'static str, &'static str),
    addr: A,
    data: [u8; N],
    prefix: u8,
    v: Option<PeerValue>,
) -> Result<()> {
    let full = u32::from(prefix) == 8 * N as u32;
    let key = Key::new(u32::from(prefix), data);
    match v {
        Some(v) => {
            let mut m = lpm::<[u8; N], PeerValue>(ebpf, trie)?;
            m.insert(&key, v, 0)
                .map_err(|e| full_or(e, trie, capacity(m.map()), format!("{addr}/{prefix}")))?;
            if full {
                let mut m = hash::<[u8; N], PeerValue>(ebpf, exact)?;
                m.insert(data, v, 0)
                    .map_err(|e| full_or(e, exact, capacity(m.map()), format!("{addr}")))?;
            }
            Ok(())
        }
        None => {
            if full {
                ignore_missing(
                    hash::<[u8; N], PeerValue>(ebpf, exact)?.remove(&data),
                    exact,
                )?;
            }
            ignore_missing(lpm::<[u8; N], PeerValue>(ebpf, trie)?.remove(&key), trie)
        }
    }
}

/// Writes (`Some`) or removes (`None`) an IPv4 peer entry of `epoch`, with
/// its exact copy.
pub fn write_peer_v4(
    ebpf: &mut Ebpf,
    epoch: u32,
    addr: Ipv4Addr,
    prefix: u8,
    v: Option<PeerValue>,
) -> Result<()> {
    let maps = (peers_v4_map(epoch), exact_v4_map(epoch));
    write_peer(ebpf, maps, addr, addr.octets(), prefix, v)
}

/// Writes (`Some`) or removes (`None`) an IPv6 peer entry of `epoch`, with
/// its exact copy.
pub fn write_peer_v6(
    ebpf: &mut Ebpf,
    epoch: u32,
    addr: Ipv6Addr,
    prefix: u8,
    v: Option<PeerValue>,
) -> Result<()> {
    let maps = (peers_v6_map(epoch), exact_v6_map(epoch));
    write_peer(ebpf, maps, addr, addr.octets(), prefix, v)
}

/// `bpf_map_update_elem` flag: create only (`EEXIST` if the key is there).
const BPF_NOEXIST: u64 = 1;

fn is_errno(e: &aya::maps::MapError, errno: i32) -> bool {
    matches!(e, aya::maps::MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(errno))
}

/// Writes (`Some`) or removes (`None`) a policy entry and what is derived
/// from it: a one-port entry (prefix 96) is copied into `NETPOL_POLEXACT`
/// (after the trie entry; removed before it); a shorter one is counted in
/// `NETPOL_POLSHORT` (before the trie entry is created; uncounted after it is
/// removed). A prefix below 72 (a partial policy set, identity or
/// direction) is refused: the datapath never asks for one, and
/// `NETPOL_POLSHORT` could not count it.
pub fn write_policy(
    ebpf: &mut Ebpf,
    key: PolicyKey,
    prefix: u32,
    v: Option<PolicyValue>,
) -> Result<()> {
    let (trie, exact, short) = (
        map_names::POLICY,
        map_names::POLICY_EXACT,
        map_names::POLICY_SHORT,
    );
    if !(POLICY_PREFIX_ANY_PROTO..=POLICY_PREFIX_FULL).contains(&prefix) {
        return Err(DatapathError::InvalidEntry {
            map: trie,
            what: format!("{key:?}/{prefix}"),
        });
    }
    let what = || format!("{key:?}/{prefix}");
    let tkey = Key::new(prefix, key);
    let skey = PolicyShortKey::new(key.policy_id, key.identity, key.direction);
    if prefix == POLICY_PREFIX_FULL {
        return match v {
            Some(v) => {
                let mut m = lpm::<PolicyKey, PolicyValue>(ebpf, trie)?;
                m.insert(&tkey, v, 0)
                    .map_err(|e| full_or(e, trie, capacity(m.map()), what()))?;
                let mut m = hash::<PolicyKey, PolicyValue>(ebpf, exact)?;
                m.insert(key, v, 0)
                    .map_err(|e| full_or(e, exact, capacity(m.map()), what()))
            }
            None => {
                ignore_missing(
                    hash::<PolicyKey, PolicyValue>(ebpf, exact)?.remove(&key),
                    exact,
                )?;
                ignore_missing(
                    lpm::<PolicyKey, PolicyValue>(ebpf, trie)?.remove(&tkey),
                    trie,
                )
            }
        };
    }
    let counts = |ebpf: &mut Ebpf| -> Result<PolicyShort> {
        match hash::<PolicyShortKey, PolicyShort>(ebpf, short)?.get(&skey, 0) {
            Ok(c) => Ok(c),
            Err(aya::maps::MapError::KeyNotFound) => Ok(PolicyShort::default()),
            Err(e) if is_errno(&e, libc::ENOENT) => Ok(PolicyShort::default()),
            Err(e) => Err(map_err(short)(e)),
        }
    };
    let set_counts = |ebpf: &mut Ebpf, c: PolicyShort| -> Result<()> {
        let mut m = hash::<PolicyShortKey, PolicyShort>(ebpf, short)?;
        if c.is_empty() {
            ignore_missing(m.remove(&skey), short)
        } else {
            m.insert(skey, c, 0)
                .map_err(|e| full_or(e, short, capacity(m.map()), what()))
        }
    };
    let before = counts(ebpf)?;
    match v {
        Some(v) => {
            // Counted first: the datapath asks the trie as soon as the entry
            // may be there. If it was there already, the count goes back.
            let mut counted = before;
            *counted.slot(prefix, key.protocol) += 1;
            set_counts(ebpf, counted)?;
            let mut m = lpm::<PolicyKey, PolicyValue>(ebpf, trie)?;
            match m.insert(&tkey, v, BPF_NOEXIST) {
                Ok(()) => Ok(()),
                Err(e) if is_errno(&e, libc::EEXIST) => {
                    m.insert(&tkey, v, 0).map_err(map_err(trie))?;
                    set_counts(ebpf, before)
                }
                Err(e) => {
                    let cap = capacity(m.map());
                    // Not written: not counted (a failure here leaves the
                    // count high, which only sends lookups to the trie).
                    let _ = set_counts(ebpf, before);
                    Err(full_or(e, trie, cap, what()))
                }
            }
        }
        None => {
            match lpm::<PolicyKey, PolicyValue>(ebpf, trie)?.remove(&tkey) {
                Ok(()) => {}
                Err(aya::maps::MapError::KeyNotFound) => return Ok(()),
                Err(e) if is_errno(&e, libc::ENOENT) => return Ok(()),
                Err(e) => return Err(map_err(trie)(e)),
            }
            let mut after = before;
            let slot = after.slot(prefix, key.protocol);
            *slot = slot.saturating_sub(1);
            set_counts(ebpf, after)
        }
    }
}

/// Rewrites `name` to hold exactly `want`; returns how many entries it
/// changed.
fn sync_hash<K: Pod + Ord, V: Pod + PartialEq>(
    ebpf: &mut Ebpf,
    name: &'static str,
    want: &BTreeMap<K, V>,
) -> Result<usize> {
    let mut m = hash::<K, V>(ebpf, name)?;
    let mut have = BTreeMap::new();
    for kv in m.iter() {
        let (k, v) = kv.map_err(map_err(name))?;
        have.insert(k, v);
    }
    let mut changed = 0;
    for (k, v) in want {
        if have.get(k) != Some(v) {
            m.insert(*k, *v, 0)
                .map_err(|e| full_or(e, name, capacity(m.map()), "a repaired entry".into()))?;
            changed += 1;
        }
    }
    for k in have.keys().filter(|k| !want.contains_key(k)) {
        ignore_missing(m.remove(k), name)?;
        changed += 1;
    }
    Ok(changed)
}

/// The full-length entries of a peer trie, by address.
fn full_peers<const N: usize>(
    ebpf: &mut Ebpf,
    trie: &'static str,
) -> Result<BTreeMap<[u8; N], PeerValue>> {
    let m = lpm::<[u8; N], PeerValue>(ebpf, trie)?;
    let mut out = BTreeMap::new();
    for kv in m.iter() {
        let (k, v) = kv.map_err(map_err(trie))?;
        if k.prefix_len() == 8 * N as u32 {
            out.insert(k.data(), v);
        }
    }
    Ok(out)
}

/// Makes every exact map agree with its trie (the tries are what the agent
/// wrote and reads back): missing, stale or different exact entries and
/// wrong counts are rewritten. Returns how many entries changed. Safe in
/// the epoch packets read too: what it writes is what the trie answers.
pub fn repair_exact(ebpf: &mut Ebpf) -> Result<usize> {
    let mut changed = 0;
    for epoch in 0..2 {
        let want = full_peers::<4>(ebpf, peers_v4_map(epoch))?;
        changed += sync_hash(ebpf, exact_v4_map(epoch), &want)?;
        let want = full_peers::<16>(ebpf, peers_v6_map(epoch))?;
        changed += sync_hash(ebpf, exact_v6_map(epoch), &want)?;
    }
    let (mut exact, mut short) = (BTreeMap::new(), BTreeMap::<_, PolicyShort>::new());
    {
        let m = lpm::<PolicyKey, PolicyValue>(ebpf, map_names::POLICY)?;
        for kv in m.iter() {
            let (k, v) = kv.map_err(map_err(map_names::POLICY))?;
            let (key, prefix) = (k.data(), k.prefix_len());
            if prefix == POLICY_PREFIX_FULL {
                exact.insert(key, v);
            } else if prefix >= POLICY_PREFIX_ANY_PROTO {
                let c = short
                    .entry(PolicyShortKey::new(
                        key.policy_id,
                        key.identity,
                        key.direction,
                    ))
                    .or_default();
                *c.slot(prefix, key.protocol) += 1;
            } else {
                // Never written by `write_policy`, never asked for by the
                // datapath (its lookups are full keys of one policy set).
                tracing::warn!(
                    ?key,
                    prefix,
                    "a policy entry shorter than 72 bits is ignored"
                );
            }
        }
    }
    changed += sync_hash(ebpf, map_names::POLICY_EXACT, &exact)?;
    changed += sync_hash(ebpf, map_names::POLICY_SHORT, &short)?;
    Ok(changed)
}

fn full_or(
    e: aya::maps::MapError,
    map: &'static str,
    capacity: u32,
    what: String,
) -> DatapathError {
    if is_full(&e) {
        DatapathError::MapFull {
            map,
            capacity,
            what,
        }
    } else {
        DatapathError::Map { map, source: e }
    }
}

fn ignore_missing(
    r: std::result::Result<(), aya::maps::MapError>,
    map: &'static str,
) -> Result<()> {
    match r {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(s))
            if s.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(source) => Err(DatapathError::Map { map, source }),
    }
}

/// Pod veths with pinned links under `pins`.
pub fn attached_ifindexes(pins: &Pins) -> BTreeSet<u32> {
    linked_ifindexes(pins, |h| Hook::ALL.contains(&h))
}

/// Interfaces with a pinned link of a hook `wanted` accepts.
fn linked_ifindexes(pins: &Pins, wanted: impl Fn(Hook) -> bool) -> BTreeSet<u32> {
    std::fs::read_dir(pins.links_dir())
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| Pins::parse_link_name(&e.file_name().to_string_lossy()))
                .filter(|(_, h)| wanted(*h))
                .map(|(i, _)| i)
                .collect()
        })
        .unwrap_or_default()
}

/// `netpol-agent cleanup`: remove every link (detaching the programs),
/// every pinned map and the root directory.
pub fn cleanup(root: &Path) -> std::io::Result<usize> {
    let mut removed = 0;
    let pins = Pins::new(root);
    for dir in [pins.links_dir(), pins.maps_dir()] {
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                std::fs::remove_file(e.path())?;
                removed += 1;
            }
        }
        let _ = std::fs::remove_dir(&dir);
    }
    let _ = std::fs::remove_dir(root);
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(text: &str) -> (PathBuf, Option<BTreeMap<String, BTreeSet<u32>>>) {
        let path = std::env::temp_dir().join(format!(
            "netpol-programs-record-{}-{}",
            std::process::id(),
            text.len()
        ));
        std::fs::write(&path, text).unwrap();
        let r = read_record(&path, "fp");
        let _ = std::fs::remove_file(&path);
        (path, r)
    }

    /// The programs in the pinned links are reused only on the word of a
    /// record made for this very object that names every program; anything
    /// else loads (and verifies) the programs again.
    #[test]
    fn a_programs_record_is_believed_only_for_this_object_and_whole() {
        let all: String = PROGRAMS.iter().map(|p| format!("{p} 7\n")).collect();
        let (_, r) = record(&format!("object fp\n{all}{} 9\n", prog_names::TO_POD));
        let r = r.expect("a whole record for this object");
        assert_eq!(r[prog_names::TO_POD], BTreeSet::from([7, 9]));
        assert_eq!(r[prog_names::XDP_UPLINK], BTreeSet::from([7]));
        // Another object (an upgrade): not believed.
        assert!(record(&format!("object other\n{all}")).1.is_none());
        // A program missing: not believed.
        let partial: String = PROGRAMS[1..].iter().map(|p| format!("{p} 7\n")).collect();
        assert!(record(&format!("object fp\n{partial}")).1.is_none());
        // No record at all.
        assert!(read_record(Path::new("/nonexistent/netpol/programs"), "fp").is_none());
        // The fingerprint follows the map sizes too.
        let mut sizes = MapSizes::default();
        let a = fingerprint(sizes);
        sizes.flows += 1;
        assert_ne!(a, fingerprint(sizes));
        assert_eq!(a, fingerprint(MapSizes::default()));
    }
}
