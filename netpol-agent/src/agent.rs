//! The agent's run loop: source -> compiler -> map updates, pod veths ->
//! attachments, ring buffer -> flow logs, and a status file.
//!
//! Ordering rules that keep enforcement without gaps:
//! - a new policy state (endpoints, peers, policy entries) is written whole
//!   into the epoch the datapath does not read, then one CONFIG write flips
//!   to it, so every packet is judged by the old state or the new one (see
//!   [`crate::epoch`]); a state with a failed write is never flipped to;
//! - a pod's endpoint entry is in the enforced state before its veth gets
//!   programs;
//! - a veth that looks like a pod's (a host route to it, or a bridge port)
//!   but whose pod the agent does not know yet gets the programs with no
//!   endpoint entry: the datapath drops its traffic (`no_endpoint`) until
//!   the pod is known ("pending = deny");
//! - every flip is a new policy generation, and so is any other update that
//!   can revoke (a deferred range gone): established flows are re-checked on
//!   their next packet.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use netpol_common::{
    CFG_F_AUDIT_ALL, COUNTER_EVENTS_RATE_LIMITED, COUNTER_EVENTS_RINGBUF_FULL, COUNTER_EVENTS_SENT,
    ConfigValue, DIR_EGRESS, DIR_INGRESS, EndpointValue, REASON_COUNT, VerdictEvent, counter_index,
    reason_name,
};
use serde::{Deserialize, Serialize};

use crate::{
    api::{self, Shared, SharedRef},
    compiler::{Change, Compiler, NodeInfo},
    datapath::{Datapath, MapSizes},
    epoch::{Desired, Epochs, Write},
    flowlog::{self, Names, SharedNames},
    maps::MapUpdate,
    metrics::Metrics,
    model::{Cluster, ObjectRef, PodRef},
    netlink,
    pins::Pins,
    source::{Changes, ClusterSource, SourceChange},
};

/// A policy set id the compiler never assigns (its ids stay below, and the
/// top bit is the epoch's): no policy entry carries it, so an endpoint on it
/// (isolated both ways) is denied everything.
const LOCKDOWN_POLICY_ID: u32 = !netpol_common::EPOCH_BIT;

/// Settings of `netpol-agent run`.
#[derive(Clone, Debug)]
pub struct Config {
    pub node: String,
    pub bpffs_root: PathBuf,
    pub state_dir: PathBuf,
    pub flow_log: Option<PathBuf>,
    pub flow_log_rotation: flowlog::Rotation,
    pub events_per_sec: u32,
    /// Flow-log allowed new flows too (drops and audits always are).
    pub log_allowed: bool,
    pub audit: bool,
    pub sizes: MapSizes,
    /// How often the source and the node are looked at.
    pub poll: Duration,
    /// Only veths whose name starts with one of these are pods' (empty: any
    /// veth whose peer is in another netns and that has no node address).
    pub veth_prefixes: Vec<String>,
    /// Where to publish this node's ClusterNetworkPolicy report and from
    /// where to write their `Programmed` conditions (`--source kube` only).
    pub cnp_status: Option<crate::cnp_status::ReportConfig>,
    /// Where `/healthz`, `/readyz` and `/metrics` are served over TCP.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Address ranges kube-proxy translates (the cluster's service CIDRs), in
    /// addition to what the source says (ServiceCIDR objects, Services'
    /// external and load-balancer IPs): a pod's egress to them is judged
    /// after the DNAT.
    pub service_cidrs: Vec<ipnet::IpNet>,
    /// How often the agent reads its pinned maps back and repairs what
    /// differs from what it wrote (drift: a write lost, an entry changed or
    /// removed by hand).
    pub reconcile: Duration,
    /// Each endpoint's share of the flow table, in entries (`None`: the
    /// table split over `max_pods`; `Some(0)`: no shares).
    pub flows_per_endpoint: Option<u32>,
    /// Pods this node may run (kubelet's `maxPods`): the default share
    /// splits the flow table over them.
    pub max_pods: u32,
    /// A source failing for longer than this makes the agent not ready: the
    /// cluster may have moved on without it (see `health`).
    pub stale_after: Duration,
    /// XDP on the node's uplinks (`crate::xdp`).
    pub xdp: crate::xdp::XdpConfig,
}

/// `BPF_LRU`'s per-CPU free lists hold up to 128 free entries each
/// (`LOCAL_FREE_TARGET`) that other CPUs cannot take without evicting: leave
/// twice that per CPU out of the shares, so that the shares all fit without
/// an eviction.
const LRU_SLACK_PER_CPU: u32 = 256;

/// The least default share per endpoint, in entries (an eighth of the table
/// at most).
const DEFAULT_MIN_SHARE: u32 = 16_384;

/// The datapath's share setting: `per_endpoint` entries split over `cpus`
/// (each CPU's ring is written by that CPU only, see netpol-ebpf's
/// quota.rs), by default the flow table (less the LRU's per-CPU slack) split
/// over `max_pods`. Every endpoint gets at least one entry per CPU.
pub fn flow_quota(
    flows: u32,
    max_pods: u32,
    per_endpoint: Option<u32>,
    cpus: u32,
) -> netpol_common::QuotaConfig {
    let cpus = cpus.max(1);
    let per_endpoint = per_endpoint.unwrap_or_else(|| {
        let usable = flows.saturating_sub(LRU_SLACK_PER_CPU.saturating_mul(cpus));
        // An equal split is a few thousand entries per pod: a busy client
        // (80 new connections a second, each live 10 s after its FIN, two
        // entries through a Service) fills it and has its SYNs refused. The
        // default guarantees what matters, that no one pod takes more than
        // an eighth of the table (so one flooding pod never evicts another's
        // flows), and gives each pod at least DEFAULT_MIN_SHARE.
        (usable / max_pods.max(1)).max(DEFAULT_MIN_SHARE.min(usable / 8))
    });
    netpol_common::QuotaConfig {
        slots_per_cpu: if per_endpoint == 0 {
            0
        } else {
            (per_endpoint / cpus).max(1)
        },
        _pad: 0,
    }
}

/// What `netpol-agent status` reads (written atomically after each sync).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Status {
    pub node: String,
    pub pid: u32,
    /// At least one full sync completed with the current source revision.
    pub synced: bool,
    pub source_revision: u64,
    /// The policy generation's count (CONFIG's generation without the
    /// epoch bit).
    pub generation: u32,
    /// The epoch packets read (CONFIG's generation's top bit; see `epoch`).
    #[serde(default)]
    pub epoch: u32,
    /// Local pods enforced (veth found, endpoint programmed).
    pub endpoints: usize,
    /// Pod-like veths whose pod is not known: programs attached, traffic
    /// denied until it is.
    pub pending: usize,
    /// Local pods from the source whose veth was not found (yet).
    pub missing_veths: Vec<String>,
    pub map_entries: BTreeMap<String, usize>,
    pub counters: BTreeMap<String, u64>,
    pub errors: Vec<String>,
    /// When a sync last applied everything (0: not yet).
    pub last_sync_unix_ms: u64,
    /// Map entries the periodic read-back found different from what the
    /// agent wrote (and rewrote), since it started.
    #[serde(default)]
    pub drift_repaired: u64,
    /// Why the agent is not ready (`/readyz`); empty when it is.
    #[serde(default)]
    pub not_ready: Vec<String>,
    /// Pod veths without the programs (the last sync's count).
    #[serde(default)]
    pub veths_without_programs: usize,
    /// When this status was written: the run loop writes it at least once a
    /// second (`/healthz`).
    #[serde(default)]
    pub written_unix_ms: u64,
    /// XDP on the node's devices: device name -> the mode the kernel runs
    /// (`native`, `generic`, ...; read back from the link, not the mode
    /// asked for).
    #[serde(default)]
    pub xdp: BTreeMap<String, String>,
}

fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn status_path(state_dir: &std::path::Path) -> PathBuf {
    state_dir.join("status.json")
}

struct Agent {
    cfg: Config,
    /// When this agent started (its first sync's log line says how long
    /// after: the restart window).
    started: Instant,
    dp: Datapath,
    source: Box<dyn ClusterSource>,
    compiler: Compiler,
    /// What both epochs of the kernel's policy maps hold (endpoints by
    /// ifindex), from the writes that succeeded, and the generation.
    epochs: Epochs<u32>,
    /// `NETPOL_LOCAL_ADDRS` as last written: local pod address -> veth.
    local_addrs: BTreeMap<IpAddr, u32>,
    /// `NETPOL_DEFER_V4`/`V6` as last written.
    deferred: BTreeSet<ipnet::IpNet>,
    /// Endpoint slots (the sender tag) by veth, as written to `NETPOL_SLOTS`.
    slots: BTreeMap<u32, u16>,
    /// Veths this process attached its programs to.
    attached_this_run: BTreeSet<u32>,
    /// Node devices this process attached `netpol_post_nat` to.
    post_nat_this_run: BTreeSet<u32>,
    /// Node devices this process attached (or adopted) XDP on.
    xdp_this_run: BTreeSet<u32>,
    /// The XDP mode the kernel runs on each of them, by device name.
    xdp_modes: BTreeMap<String, String>,
    /// Names for the flow log and the API, shared: updated from each
    /// change, never rebuilt (see [`NamesBacklog`]).
    names: SharedNames,
    /// What the names lack while a reader held their lock.
    names_backlog: NamesBacklog,
    /// Local endpoints by veth, as the last sync found them.
    endpoint_pods: BTreeMap<u32, PodRef>,
    /// The source's problems, read when its revision moved.
    source_errors: Vec<String>,
    errors_revision: Option<u64>,
    /// Service frontends (ServiceCIDRs' ranges, Services' IPs) from the
    /// source's changes, and the deferred ranges they make (recomputed only
    /// when they change).
    service_cidrs: BTreeMap<String, Vec<ipnet::IpNet>>,
    service_ips: BTreeMap<ObjectRef, Vec<IpAddr>>,
    frontends: Option<BTreeSet<ipnet::IpNet>>,
    /// Changes taken from the source and not enforced yet: their kind and
    /// when the source received them (`netpol_change_seconds`).
    inflight: Vec<(&'static str, Instant)>,
    shared: SharedRef,
    synced_revision: Option<u64>,
    /// The node as the last sync saw it.
    last_view: Option<netlink::NodeView>,
    /// The last sync could not write everything: do it again next time.
    retry: bool,
    /// When the maps were last read back (`Config::reconcile`).
    last_reconcile: Instant,
    /// Entries found different from what was written, since start.
    drift_repaired: u64,
    /// Map writes that failed in the last sync.
    failed_writes: usize,
    /// Pod veths the last sync found without the programs.
    veths_without_programs: Vec<String>,
    /// When a sync last applied everything (0: not yet).
    last_good_sync_unix_ms: u64,
    errors: Vec<String>,
    pending: usize,
    missing: Vec<String>,
    flow_log: Box<dyn std::io::Write + Send>,
    /// Flow entries per endpoint, last counted (walking the flow table costs
    /// a syscall per entry: at most every [`FLOW_COUNT_EVERY`]).
    flow_entries: BTreeMap<u32, u64>,
    flow_counted: Option<Instant>,
    /// The verdict counters as last read (what status shows if a read fails).
    last_counters: Vec<u64>,
}

const FLOW_COUNT_EVERY: Duration = Duration::from_secs(5);

pub async fn run(cfg: Config, source: Box<dyn ClusterSource>) -> Result<()> {
    let started = Instant::now();
    let pins = Pins::new(&cfg.bpffs_root);
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating {}", cfg.state_dir.display()))?;
    // A restart with the same eBPF object keeps the programs running in the
    // pinned links and verifies its own only after its first sync.
    let mut dp = Datapath::load_reusing(pins, cfg.sizes, Some(cfg.state_dir.join("programs")))
        .context("loading the datapath")?;
    let load_secs = started.elapsed().as_secs_f64();

    // Adopt what a previous agent left: the generation continues, and the
    // maps' current contents are the starting point of the first diff.
    // The generation also says which epoch the datapath reads: a read
    // failure must not be taken for "epoch 0".
    let old_cfg = dp.config().context("reading the pinned CONFIG")?;
    let generation = old_cfg.generation;
    dp.set_config(ConfigValue {
        generation,
        events_per_sec: cfg.events_per_sec,
        flags: if cfg.audit { CFG_F_AUDIT_ALL } else { 0 }
            | if cfg.log_allowed {
                netpol_common::CFG_F_LOG_ALLOWED
            } else {
                0
            },
        // The datapath's defaults, written out so `bpftool map dump` shows them.
        timeout_tcp_s: netpol_common::DEFAULT_TIMEOUT_TCP_S,
        timeout_tcp_closing_s: netpol_common::DEFAULT_TIMEOUT_TCP_CLOSING_S,
        timeout_udp_s: netpol_common::DEFAULT_TIMEOUT_UDP_S,
        timeout_icmp_s: netpol_common::DEFAULT_TIMEOUT_ICMP_S,
        _pad: 0,
    })?;
    let cpus = aya::util::nr_cpus().map_or(1, |n| n as u32);
    let quota = flow_quota(dp.sizes().flows, cfg.max_pods, cfg.flows_per_endpoint, cpus);
    tracing::info!(
        slots_per_cpu = quota.slots_per_cpu,
        cpus,
        "flow-table share per endpoint: {} entries",
        quota.slots_per_cpu * cpus
    );
    dp.set_quota(quota)?;
    // Both epochs as pinned: this agent writes into the one the datapath
    // does not read, so its fresh numbering never mixes with the old one.
    let epochs = Epochs::adopt(generation, dp.read_epochs().context("reading pinned maps")?);
    let local_addrs = dp
        .read_local_addrs()
        .context("reading pinned local addresses")?;
    let deferred = dp
        .read_deferred()
        .context("reading pinned deferred ranges")?;
    // Pods' connections to sockets on the node are judged after the DNAT,
    // in sk_lookup, from the start (before any endpoint is known a pod's
    // traffic is denied on its veth anyway).
    dp.attach_local_in()
        .context("attaching netpol_local_in to the node's sk_lookup")?;
    tracing::info!(
        generation = epochs.generation_count(),
        epoch = epochs.active(),
        endpoints = epochs.current().endpoints.len(),
        policy_entries = epochs.current().policy.len(),
        load_secs,
        reusing_programs = dp.reusing_programs(),
        "datapath loaded (adopting pinned state where present)"
    );

    let flow_log: Box<dyn std::io::Write + Send> = match &cfg.flow_log {
        Some(p) => Box::new(
            flowlog::RotatingFile::open(p, cfg.flow_log_rotation)
                .with_context(|| format!("opening flow log {}", p.display()))?,
        ),
        None => Box::new(std::io::stdout()),
    };

    let ring = dp.take_events().context("events ring buffer")?;
    // SAFETY: the ring buffer and the socket own their fds and keep them open
    // for as long as the AsyncFd owns them.
    let mut ring = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)
    }
    .map_err(|e| anyhow::anyhow!("polling the ring buffer: {e}"))?;
    let nl = netlink::subscribe().context("subscribing to netlink")?;
    nl.set_non_blocking(true)?;
    let nl = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(nl, tokio::io::Interest::READABLE)
    }
    .map_err(|e| anyhow::anyhow!("polling netlink: {e}"))?;

    let names: SharedNames = Arc::new(std::sync::RwLock::new(Names::default()));
    let shared: SharedRef = Arc::new(Mutex::new(Shared {
        status: Status::default(),
        names: names.clone(),
        metrics: Metrics::new(),
        pins: dp.pins().clone(),
    }));
    if let Some(report) = cfg.cnp_status.clone() {
        tokio::spawn(crate::cnp_status::run(report, shared.clone()));
    }
    let sock = api::socket_path(&cfg.state_dir);
    let api_shared = shared.clone();
    tokio::spawn(async move {
        if let Err(e) = api::serve_unix(sock.clone(), api_shared, api::Limits::default()).await {
            tracing::error!(socket = %sock.display(), "API socket: {e}");
        }
    });
    if let Some(addr) = cfg.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr} for metrics"))?;
        let tcp_shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = api::serve_tcp(listener, tcp_shared, api::Limits::default()).await {
                tracing::error!(%addr, "metrics listener: {e}");
            }
        });
    }

    let mut agent = Agent {
        source,
        cfg,
        dp,
        compiler: Compiler::default(),
        epochs,
        local_addrs,
        deferred,
        slots: BTreeMap::new(),
        attached_this_run: BTreeSet::new(),
        post_nat_this_run: BTreeSet::new(),
        xdp_this_run: BTreeSet::new(),
        xdp_modes: BTreeMap::new(),
        names,
        names_backlog: NamesBacklog::default(),
        endpoint_pods: BTreeMap::new(),
        source_errors: Vec::new(),
        errors_revision: None,
        service_cidrs: BTreeMap::new(),
        service_ips: BTreeMap::new(),
        frontends: None,
        inflight: Vec::new(),
        shared,
        synced_revision: None,
        started,
        last_view: None,
        retry: false,
        last_reconcile: Instant::now(),
        drift_repaired: 0,
        failed_writes: 0,
        veths_without_programs: Vec::new(),
        last_good_sync_unix_ms: 0,
        errors: Vec::new(),
        pending: 0,
        missing: Vec::new(),
        flow_log,
        flow_entries: BTreeMap::new(),
        flow_counted: None,
        last_counters: Vec::new(),
    };

    let mut tick = tokio::time::interval(agent.cfg.poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut last_full = Instant::now() - Duration::from_secs(3600);
    let mut node_dirty = true;
    loop {
        tokio::select! {
            // The tick, or at once when the source reports news (inotify).
            _ = async {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = agent.source.changed() => {}
                }
            } => {
                let changed = match agent.source.poll() {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::error!(source = %agent.source.describe(), "reading the source: {e}");
                        false
                    }
                };
                // Bridged pods get their addresses inside their own netns,
                // where no event reaches us: look again every second.
                if !agent.source.ready() {
                    // Keep enforcing what the maps hold until the source has
                    // a complete picture (never compile a half-listed cluster),
                    // and put the programs on any new pod veth at once.
                    agent.attach_only();
                    agent.write_status();
                    continue;
                }
                if changed || node_dirty || last_full.elapsed() >= Duration::from_secs(1) {
                    // A change from the source alone reuses the node as read
                    // less than a second ago (netlink events and the
                    // one-second look cover the node).
                    let fresh = node_dirty || last_full.elapsed() >= Duration::from_secs(1);
                    node_dirty = false;
                    if fresh {
                        last_full = Instant::now();
                    }
                    if let Err(e) = agent.sync(fresh) {
                        tracing::error!("sync failed: {e:#}");
                        agent.errors = vec![format!("{e:#}")];
                    }
                    agent.write_status();
                    agent.load_programs_if_reusing();
                }
            }
            guard = nl.readable() => {
                let mut guard = guard?;
                let mut buf = vec![0u8; 1 << 16];
                // Drain; any message means links/addresses/routes changed.
                while guard.get_inner().recv(&mut &mut buf[..], 0).is_ok() {}
                guard.clear_ready();
                if agent.source.ready() {
                    if let Err(e) = agent.sync(true) {
                        tracing::error!("sync failed: {e:#}");
                        agent.errors = vec![format!("{e:#}")];
                    }
                    agent.write_status();
                    agent.load_programs_if_reusing();
                } else {
                    agent.attach_only();
                }
            }
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                let rb = guard.get_inner_mut();
                while let Some(item) = rb.next() {
                    if let Some(ev) = VerdictEvent::from_bytes(&item) {
                        agent.log_event(&ev);
                    }
                }
                let _ = agent.flow_log.flush();
                guard.clear_ready();
            }
            _ = term.recv() => {
                tracing::info!("SIGTERM: exiting; programs and maps stay pinned and enforcing");
                agent.write_status();
                return Ok(());
            }
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("interrupted: exiting; programs and maps stay pinned and enforcing");
                return Ok(());
            }
        }
    }
}

/// One planned write to the kernel (see `epoch`).
fn write(dp: &mut Datapath, w: &Write<u32>) -> Result<(), crate::datapath::DatapathError> {
    match *w {
        Write::Endpoint {
            epoch,
            key,
            value: Some(v),
        } => dp.set_endpoint(epoch, key, v),
        Write::Endpoint {
            epoch,
            key,
            value: None,
        } => dp.remove_endpoint(epoch, key),
        Write::PeerV4 {
            epoch,
            addr,
            prefix_len,
            value: Some(v),
        } => dp.set_peer_v4(epoch, addr, prefix_len, v),
        Write::PeerV4 {
            epoch,
            addr,
            prefix_len,
            value: None,
        } => dp.remove_peer_v4(epoch, addr, prefix_len),
        Write::PeerV6 {
            epoch,
            addr,
            prefix_len,
            value: Some(v),
        } => dp.set_peer_v6(epoch, addr, prefix_len, v),
        Write::PeerV6 {
            epoch,
            addr,
            prefix_len,
            value: None,
        } => dp.remove_peer_v6(epoch, addr, prefix_len),
        Write::Policy {
            key,
            prefix_len,
            value: Some(v),
        } => dp.set_policy(key, prefix_len, v),
        Write::Policy {
            key,
            prefix_len,
            value: None,
        } => dp.remove_policy(key, prefix_len),
        Write::Flip { generation } => dp.set_generation(generation),
    }
}

/// A write as an error names it: the map and the key.
fn describe(w: &Write<u32>) -> String {
    use netpol_common::map_names;
    let verb = |set: bool| if set { "set" } else { "delete" };
    match w {
        Write::Endpoint { epoch, key, value } => format!(
            "{} {} veth ifindex {key} (epoch {epoch})",
            map_names::ENDPOINTS,
            verb(value.is_some())
        ),
        Write::PeerV4 {
            epoch,
            addr,
            prefix_len,
            value,
        } => format!(
            "{} {} {addr}/{prefix_len}",
            crate::datapath::peers_v4_map(*epoch),
            verb(value.is_some())
        ),
        Write::PeerV6 {
            epoch,
            addr,
            prefix_len,
            value,
        } => format!(
            "{} {} {addr}/{prefix_len}",
            crate::datapath::peers_v6_map(*epoch),
            verb(value.is_some())
        ),
        Write::Policy {
            key,
            prefix_len,
            value,
        } => format!(
            "{} {} {key:?}/{prefix_len}",
            map_names::POLICY,
            verb(value.is_some())
        ),
        Write::Flip { generation } => {
            format!("{} generation {generation:#x} (flip)", map_names::CONFIG)
        }
    }
}

/// Endpoints the last sync had, whose veth is still there and whose pod is
/// still a local endpoint, but that this sync did not find (its addresses
/// were not read): kept, with the pod's current policy and the addresses
/// they had. Returns how many.
fn keep_endpoints_on_transient_miss(
    previous_pods: &BTreeMap<u32, crate::model::PodRef>,
    previous: &BTreeMap<u32, EndpointValue>,
    pod_like: &BTreeSet<u32>,
    compiled: &BTreeMap<crate::model::PodRef, EndpointValue>,
    desired: &mut BTreeMap<u32, EndpointValue>,
    endpoint_pods: &mut BTreeMap<u32, crate::model::PodRef>,
) -> usize {
    let mut kept = 0;
    for (ifindex, pod) in previous_pods {
        if desired.contains_key(ifindex)
            || !pod_like.contains(ifindex)
            || endpoint_pods.values().any(|p| p == pod)
        {
            continue;
        }
        let (Some(old), Some(now)) = (previous.get(ifindex), compiled.get(pod)) else {
            continue;
        };
        let addresses =
            netpol_common::EP_F_HAS_V4 | netpol_common::EP_F_HAS_V6 | netpol_common::EP_F_HAS_MAC;
        desired.insert(
            *ifindex,
            EndpointValue {
                flags: (now.flags & !addresses) | (old.flags & addresses),
                addr_v4: old.addr_v4,
                addr_v6: old.addr_v6,
                mac: old.mac,
                ..*now
            },
        );
        endpoint_pods.insert(*ifindex, pod.clone());
        kept += 1;
    }
    kept
}

/// Whether this network namespace has an interface `ifindex` right now.
fn interface_exists(ifindex: u32) -> bool {
    let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `name` has IF_NAMESIZE bytes, as if_indextoname(3) requires.
    !unsafe { libc::if_indextoname(ifindex, name.as_mut_ptr()) }.is_null()
}

/// The lowest slot no veth holds.
fn free_slot(slots: &BTreeMap<u32, u16>, held: &BTreeSet<u16>) -> Option<u16> {
    let used: BTreeSet<u16> = slots.values().chain(held).copied().collect();
    (0..netpol_common::SLOTS as u16).find(|s| !used.contains(s))
}

/// The addresses an endpoint entry says the pod has.
fn endpoint_ips(ep: &EndpointValue) -> impl Iterator<Item = IpAddr> {
    let v4 = (ep.flags & netpol_common::EP_F_HAS_V4 != 0).then(|| IpAddr::from(ep.addr_v4));
    let v6 = (ep.flags & netpol_common::EP_F_HAS_V6 != 0).then(|| IpAddr::from(ep.addr_v6));
    v4.into_iter().chain(v6)
}

/// Updates of the shared [`Names`] not applied yet: the run loop never
/// waits for a reader (an `explain` compiling another node holds the lock
/// for a while); it keeps what it could not apply and applies it with the
/// next update.
#[derive(Default)]
struct NamesBacklog {
    /// The cluster replaced whole (a resync).
    cluster: Option<Cluster>,
    changes: Vec<SourceChange>,
    /// Updates of the compiled maps.
    updates: Vec<MapUpdate>,
    /// The compile's rules, policy sets and identities changed.
    meta: bool,
    endpoints: Option<BTreeMap<u32, PodRef>>,
}

impl NamesBacklog {
    fn is_empty(&self) -> bool {
        self.cluster.is_none()
            && self.changes.is_empty()
            && self.updates.is_empty()
            && !self.meta
            && self.endpoints.is_none()
    }
}

impl Agent {
    fn log_event(&mut self, ev: &VerdictEvent) {
        let line = {
            let names = self.names.read().unwrap_or_else(|p| p.into_inner());
            flowlog::describe(ev, &names, flowlog::wall_time(ev.timestamp_ns))
        };
        if let Ok(json) = serde_json::to_string(&line) {
            let _ = writeln!(self.flow_log, "{json}");
        }
    }

    /// A pod's veth: its peer lives in another network namespace and it
    /// carries none of the node's own addresses (that would be an uplink).
    /// It is attached from the moment it appears, before the CNI gives the
    /// pod an address: until the agent knows the pod, its traffic is denied
    /// (no endpoint entry), so there is no window without policy.
    fn pod_like(&self, view: &netlink::NodeView) -> BTreeSet<u32> {
        view.veths
            .values()
            .filter(|v| v.peer_netnsid.is_some() && !view.node_veths.contains(&v.ifindex))
            .filter(|v| {
                self.cfg.veth_prefixes.is_empty()
                    || self.cfg.veth_prefixes.iter().any(|p| v.name.starts_with(p))
            })
            .map(|v| v.ifindex)
            .collect()
    }

    /// Attaches the programs to every pod-like veth not attached in this run
    /// yet; returns the errors. Programs are attached once per agent run even
    /// where pins exist, so a restarted (or upgraded) agent swaps its programs
    /// into the links it adopts.
    fn attach_pod_veths(
        &mut self,
        view: &netlink::NodeView,
        pod_like: &BTreeSet<u32>,
    ) -> Vec<String> {
        let mut errors = Vec::new();
        for ifindex in pod_like {
            if !self.attached_this_run.contains(ifindex) {
                let name = &view.veths[ifindex].name;
                match self.dp.attach(*ifindex, name) {
                    Ok(()) => {
                        self.attached_this_run.insert(*ifindex);
                    }
                    Err(e) => errors.push(e.to_string()),
                }
            }
        }
        errors
    }

    /// Puts `netpol_post_nat` on every device where pods' packets may leave
    /// the node, once per run (swapping this agent's program into pinned
    /// links), and takes it off devices that are gone or became pods'.
    fn attach_post_nat(&mut self, view: &netlink::NodeView) -> Vec<String> {
        let mut errors = Vec::new();
        let devices = view.post_nat_devices();
        for (ifindex, name) in &devices {
            if !self.post_nat_this_run.contains(ifindex) {
                match self.dp.attach_post_nat(*ifindex, name) {
                    Ok(()) => {
                        self.post_nat_this_run.insert(*ifindex);
                    }
                    Err(e) => errors.push(e.to_string()),
                }
            }
        }
        for ifindex in self.dp.attached_post_nat() {
            if !devices.contains_key(&ifindex)
                && (view.veths.contains_key(&ifindex) || !interface_exists(ifindex))
            {
                self.dp.detach_post_nat(ifindex);
                self.post_nat_this_run.remove(&ifindex);
            }
        }
        errors
    }

    /// While the source is not ready (listing, disconnected, refused) there is
    /// nothing to compile, but a veth that appears meanwhile must not run
    /// unenforced: it gets the programs now, with no endpoint entry, so its
    /// pod is denied until the agent knows it.
    fn attach_only(&mut self) {
        match netlink::discover() {
            Ok(view) => {
                let pod_like = self.pod_like(&view);
                let mut errors = self.attach_pod_veths(&view, &pod_like);
                errors.extend(self.attach_post_nat(&view));
                errors.extend(crate::xdp::reconcile(
                    &mut self.dp,
                    &self.cfg.xdp,
                    &mut self.xdp_this_run,
                    &mut self.xdp_modes,
                ));
                for e in errors {
                    tracing::error!("attaching while the source is not ready: {e}");
                }
            }
            Err(e) => tracing::error!("reading the node through netlink: {e:#}"),
        }
    }

    /// One reconciliation: read the node (or, `fresh: false`, take it as
    /// the last sync read it), take the source's changes, compile them,
    /// write maps, attach.
    fn sync(&mut self, fresh: bool) -> Result<()> {
        let view = match (&self.last_view, fresh) {
            (Some(v), false) => v.clone(),
            _ => netlink::discover().context("reading the node through netlink")?,
        };
        // The safety net: what the kernel holds is read back now and then,
        // and becomes the starting point of this sync's diff, so whatever
        // differs from the compiled state is written again.
        let reconcile = self.last_reconcile.elapsed() >= self.cfg.reconcile;
        if reconcile {
            self.last_reconcile = Instant::now();
            match self.read_back() {
                Ok(0) => {}
                Ok(n) => {
                    self.drift_repaired += n as u64;
                    tracing::warn!(
                        entries = n,
                        "reconcile: the pinned maps differ from what this agent wrote; repairing"
                    );
                }
                Err(e) => tracing::error!("reconcile: reading the pinned maps: {e:#}"),
            }
        }
        // The source's changes, straight to the compiler: its diff says
        // which peer and policy entries the epochs must be written.
        let revision = self.source.revision();
        let node = NodeInfo {
            name: self.cfg.node.clone(),
            addresses: view.node_addresses.iter().copied().collect(),
        };
        let t_compile = Instant::now();
        let mut batch: Vec<Change> = Vec::new();
        let mut resync = None;
        match self.source.take_changes() {
            Changes::List(list) => {
                for c in list {
                    self.inflight.push((c.change.kind(), c.at));
                    match &c.change {
                        SourceChange::Compiler(change) => batch.push(change.clone()),
                        SourceChange::ServiceCidrs { name, cidrs } => {
                            match cidrs {
                                Some(c) => self.service_cidrs.insert(name.clone(), c.clone()),
                                None => self.service_cidrs.remove(name),
                            };
                            self.frontends = None;
                        }
                        SourceChange::ServiceIps { service, ips } => {
                            match ips {
                                Some(i) => self.service_ips.insert(service.clone(), i.clone()),
                                None => self.service_ips.remove(service),
                            };
                            self.frontends = None;
                        }
                    }
                    self.names_backlog.changes.push(c.change);
                }
            }
            Changes::Resync => {
                let snap = self.source.snapshot();
                self.inflight.push(("other", Instant::now()));
                self.service_cidrs = snap.cluster.service_cidrs.clone();
                self.service_ips = snap.cluster.service_ips.clone();
                self.frontends = None;
                resync = Some(snap.cluster);
            }
        }
        if *self.compiler.node() != node {
            batch.push(Change::SetNode(node));
        }
        let had_changes = !batch.is_empty() || resync.is_some();
        let mut diff = if batch.is_empty() {
            crate::maps::Diff::default()
        } else {
            self.compiler.apply_changes(batch)
        };
        if let Some(cluster) = resync {
            let more = self.compiler.sync(&cluster);
            diff.revokes |= more.revokes;
            diff.updates.extend(more.updates);
            self.names_backlog.changes.clear();
            self.names_backlog.cluster = Some(cluster);
        }
        self.epochs.note(&diff.updates);
        if !diff.is_empty() {
            self.names_backlog.meta = true;
        }
        self.names_backlog.updates.extend(diff.updates);
        let compile_secs = t_compile.elapsed().as_secs_f64();
        if self.errors_revision != Some(revision) {
            self.source_errors = self.source.errors();
            self.errors_revision = Some(revision);
        }
        // Nothing changed since a sync that fully applied: nothing to write.
        if !self.retry
            && !reconcile
            && !had_changes
            && self.synced_revision.is_some()
            && self.last_view.as_ref() == Some(&view)
        {
            self.synced_revision = Some(revision);
            self.publish_names();
            return Ok(());
        }
        let compiled = self.compiler.compiled();
        let t_apply = Instant::now();

        // Pod veths and their endpoints.
        let mut desired: BTreeMap<u32, EndpointValue> = BTreeMap::new();
        let mut endpoint_pods: BTreeMap<u32, crate::model::PodRef> = BTreeMap::new();
        let pod_like = self.pod_like(&view);
        for (ifindex, ips) in &view.addresses {
            let pod = ips.iter().find_map(|ip| compiled.local_ips.get(ip));
            if let Some(pod) = pod
                && let Some(ep) = compiled.maps.endpoints.get(pod)
            {
                let mut ep = *ep;
                if let Some(mac) = view.peer_macs.get(ifindex) {
                    ep.mac = *mac;
                    ep.flags |= netpol_common::EP_F_HAS_MAC;
                }
                desired.insert(*ifindex, ep);
                endpoint_pods.insert(*ifindex, pod.clone());
            }
        }
        // A transient miss (one failed read of a bridged pod's netns, an
        // address not seen this time) must not remove an endpoint: that
        // drops and forgets all its flows. An endpoint goes when its veth
        // goes or its pod is deleted.
        let kept = keep_endpoints_on_transient_miss(
            &self.endpoint_pods,
            &self.epochs.current().endpoints,
            &pod_like,
            &compiled.maps.endpoints,
            &mut desired,
            &mut endpoint_pods,
        );
        if kept > 0 {
            tracing::debug!(
                kept,
                "endpoints kept: veth present, pod live, addresses not read this time"
            );
        }
        // A peer map that cannot hold every address would let some address
        // fall back to a shorter prefix's identity, possibly a more
        // permissive one: fail closed by isolating every local pod with
        // nothing allowed until the map fits.
        let mut errors: Vec<String> = self.source_errors.clone();
        let source_errors = errors.len();
        let sizes = self.dp.sizes();
        for (map, need, cap) in [
            (
                netpol_common::map_names::PEERS_V4,
                compiled.maps.peers_v4.len(),
                sizes.peers_v4,
            ),
            (
                netpol_common::map_names::PEERS_V6,
                compiled.maps.peers_v6.len(),
                sizes.peers_v6,
            ),
        ] {
            if need > cap as usize {
                errors.push(format!(
                    "map {map} is full: the cluster needs {need} entries, capacity is {cap}; \
                     every local pod is denied until it fits (raise --max-peers-v4/--max-peers-v6)"
                ));
                self.map_error_named(map);
                for ep in desired.values_mut() {
                    // Nothing allowed; the addresses stay (a locked-down pod
                    // still may not spoof).
                    let flags = netpol_common::EP_F_INGRESS_ISOLATED
                        | netpol_common::EP_F_EGRESS_ISOLATED
                        | (ep.flags
                            & (netpol_common::EP_F_HAS_V4
                                | netpol_common::EP_F_HAS_V6
                                | netpol_common::EP_F_HAS_MAC));
                    *ep = EndpointValue {
                        policy_id: LOCKDOWN_POLICY_ID,
                        flags,
                        ..*ep
                    };
                }
            }
        }
        let found: BTreeSet<&crate::model::PodRef> = endpoint_pods.values().collect();
        self.missing = compiled
            .maps
            .endpoints
            .keys()
            .filter(|p| !found.contains(p))
            .map(|p| p.to_string())
            .collect();
        self.pending = pod_like.len() - desired.len().min(pod_like.len());

        let mut revokes = false;
        // Where a pod's egress is judged after the DNAT: new ranges now (the
        // post-DNAT hooks are attached before any endpoint exists), old ones
        // at the end. Either way verdicts of existing flows may move: they
        // are re-checked (the generation).
        let want_deferred = self
            .frontends
            .get_or_insert_with(|| {
                self.cfg
                    .service_cidrs
                    .iter()
                    .copied()
                    .chain(self.service_cidrs.values().flatten().copied())
                    .chain(
                        self.service_ips
                            .values()
                            .flatten()
                            .map(|ip| ipnet::IpNet::from(*ip)),
                    )
                    .map(|n| n.trunc())
                    .collect()
            })
            .clone();
        for net in want_deferred.difference(&self.deferred.clone()) {
            match self.dp.set_deferred(*net) {
                Ok(()) => {
                    self.deferred.insert(*net);
                    revokes = true;
                }
                Err(e) => {
                    self.map_error(&e);
                    errors.push(e.to_string());
                }
            }
        }
        // After a flip, a grace period before anything is written: the
        // in-place maps below and the inactive epoch alike. Runs that read
        // the epoch before the flip are over, so the two states any run can
        // read from here on are the enforced one and the one written now.
        if self.epochs.needs_grace() {
            let t = Instant::now();
            match self.dp.grace_period() {
                Ok(()) => {
                    self.epochs.graced();
                    tracing::debug!(secs = t.elapsed().as_secs_f64(), "grace period");
                }
                Err(e) => errors.push(format!(
                    "waiting for a grace period before writing epoch {}: {e}; the change waits",
                    self.epochs.inactive()
                )),
            }
        }
        // Local addresses (written in place, outside the epochs) before the
        // epoch writes: every address of the new state and of the enforced
        // one names its veth in one of the two. The datapath believes an
        // address's veth only if the endpoint of that veth in the epoch the
        // run reads carries the address, and drops the packet otherwise:
        // every verdict stays the old state's or the new one's (see
        // `epoch`, "Maps outside the epochs").
        let local_writes = if self.epochs.needs_grace() {
            Vec::new()
        } else {
            crate::epoch::local_addr_writes(
                &self.local_addrs,
                &self.epochs.current().endpoints,
                &desired,
            )
        };
        for (ip, ifindex) in local_writes {
            match self.dp.set_local_addr(ip, ifindex) {
                Ok(()) => {
                    self.local_addrs.insert(ip, ifindex);
                }
                Err(e) => {
                    self.map_error(&e);
                    errors.push(e.to_string());
                }
            }
        }
        // Slots: stable per veth (adopted from the pinned endpoints), the
        // slot's veth written before the endpoint that carries it.
        for (ifindex, ep) in desired.iter_mut() {
            let slot = match self.slots.get(ifindex) {
                Some(s) => Some(*s),
                None => {
                    let adopted = self
                        .epochs
                        .current()
                        .endpoints
                        .get(ifindex)
                        .map(|e| e.slot)
                        .filter(|s| !self.slots.values().any(|u| u == s));
                    // A slot either epoch's endpoints still carry is not
                    // handed out: a tag written by a run of the other epoch
                    // must not name another pod.
                    let held: BTreeSet<u16> = (0..2)
                        .flat_map(|e| self.epochs.held(e).endpoints.values().map(|v| v.slot))
                        .collect();
                    let slot = adopted.or_else(|| free_slot(&self.slots, &held));
                    if let Some(slot) = slot {
                        match self.dp.set_slot(slot, *ifindex) {
                            Ok(()) => {
                                self.slots.insert(*ifindex, slot);
                            }
                            Err(e) => {
                                errors.push(e.to_string());
                                continue;
                            }
                        }
                    }
                    slot
                }
            };
            match slot {
                Some(slot) => ep.slot = slot,
                None => errors.push(format!(
                    "no free endpoint slot (of {}) for veth {ifindex}: its pod's traffic \
                     through a masquerading Service is judged by address only",
                    netpol_common::SLOTS
                )),
            }
        }
        self.slots.retain(|i, _| desired.contains_key(i));
        // The new state (peers, policy entries, endpoints): written into the
        // epoch the datapath does not read, then one flip (see `epoch`).
        let before: BTreeSet<u32> = self.epochs.current().endpoints.keys().copied().collect();
        let graced = !self.epochs.needs_grace();
        let plan = if graced {
            self.epochs.plan(Desired::new(&compiled.maps, &desired))
        } else {
            Vec::new()
        };
        // Nothing to write: the enforced state is the desired one already.
        let nothing_to_write = graced && plan.is_empty();
        let mut flipped = false;
        if !plan.is_empty() {
            let writes = plan.len() - 1;
            let dp = &mut self.dp;
            let t = Instant::now();
            let mut flip_secs = 0.0;
            let span = tracing::debug_span!("apply", writes, epoch = self.epochs.inactive());
            let failed = span.in_scope(|| {
                self.epochs.execute(plan, |w| {
                    let t = Instant::now();
                    let r = write(dp, w);
                    if matches!(w, Write::Flip { .. }) {
                        flip_secs = t.elapsed().as_secs_f64();
                    }
                    r
                })
            });
            let write_secs = t.elapsed().as_secs_f64();
            for f in &failed {
                self.map_error(&f.error);
                errors.push(format!("writing {}: {}", describe(&f.write), f.error));
            }
            flipped = failed.is_empty();
            tracing::debug!(
                writes,
                write_secs,
                flip_secs,
                failed = failed.len(),
                epoch = self.epochs.active(),
                generation = self.epochs.generation(),
                "policy state written"
            );
        }
        // No flip (a write failed, or nothing to write): the enforced state
        // stays, and so must its addresses' veths; the new state's are
        // written again with its next try.
        if !flipped && !self.epochs.needs_grace() {
            for (ip, ifindex) in crate::epoch::local_addr_writes(
                &self.local_addrs,
                &self.epochs.current().endpoints,
                &self.epochs.current().endpoints,
            ) {
                match self.dp.set_local_addr(ip, ifindex) {
                    Ok(()) => {
                        self.local_addrs.insert(ip, ifindex);
                    }
                    Err(e) => errors.push(e.to_string()),
                }
            }
        }
        // Attach to every pod-like veth (endpoint written first).
        errors.extend(self.attach_pod_veths(&view, &pod_like));
        errors.extend(self.attach_post_nat(&view));
        errors.extend(crate::xdp::reconcile(
            &mut self.dp,
            &self.cfg.xdp,
            &mut self.xdp_this_run,
            &mut self.xdp_modes,
        ));
        // Endpoints the enforced state no longer has (veths gone or no
        // longer a pod's): their flow-table shares go. Their entries stay in
        // the inactive epoch, which no packet reads, until the next change.
        if flipped {
            let now: BTreeSet<u32> = self.epochs.current().endpoints.keys().copied().collect();
            for ifindex in before.difference(&now) {
                if let Err(e) = self.dp.forget_endpoint(*ifindex) {
                    errors.push(e.to_string());
                }
            }
            // A pod known from now on: what resolved nothing while its veth
            // dropped everything is asked again (see `neigh`).
            for ifindex in now.difference(&before) {
                let (Some(veth), Some(ep)) = (
                    view.veths.get(ifindex),
                    self.epochs.current().endpoints.get(ifindex),
                ) else {
                    continue;
                };
                match crate::neigh::announce(veth, endpoint_ips(ep).collect()) {
                    Ok(a) => tracing::debug!(
                        veth = %veth.name,
                        announced = a.announcements,
                        resolicited = ?a.resolicited,
                        "neighbours told of a newly enforced pod"
                    ),
                    Err(e) => tracing::debug!(veth = %veth.name, "neighbour announcement: {e}"),
                }
            }
        }
        // Links go with their veth, or when the veth is no pod's. A veth
        // that appeared after this sync read the node (a CNI plugin pinned
        // its links meanwhile) is in neither list: it keeps them.
        for ifindex in self.dp.attached() {
            let stale = match view.veths.get(&ifindex) {
                Some(_) => !pod_like.contains(&ifindex),
                None => !interface_exists(ifindex),
            };
            if stale {
                self.dp.detach(ifindex);
                self.attached_this_run.remove(&ifindex);
            }
        }
        // Addresses no epoch holds any more (see `epoch::stale_local_addrs`).
        let gone = crate::epoch::stale_local_addrs(
            &self.local_addrs,
            [
                &self.epochs.held(0).endpoints,
                &self.epochs.held(1).endpoints,
            ],
            &desired,
        );
        for ip in gone {
            match self.dp.remove_local_addr(ip) {
                Ok(()) => {
                    self.local_addrs.remove(&ip);
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        let stale_deferred: Vec<ipnet::IpNet> =
            self.deferred.difference(&want_deferred).copied().collect();
        for net in stale_deferred {
            revokes = true;
            match self.dp.remove_deferred(net) {
                Ok(()) => {
                    self.deferred.remove(&net);
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        // A revocation outside the epoch maps (a deferred range gone): a new
        // generation in the same epoch re-checks established flows.
        if revokes {
            let generation = self.epochs.bumped();
            match self.dp.set_generation(generation) {
                Ok(()) => self.epochs.set_generation(generation),
                Err(e) => errors.push(e.to_string()),
            }
        }
        for e in &errors {
            if !self.errors.contains(e) {
                tracing::warn!("{e}");
            }
        }
        let datapath_errors = errors.len() > source_errors;
        self.failed_writes = errors.len() - source_errors;
        if !datapath_errors {
            self.last_good_sync_unix_ms = unix_ms_now();
        }
        let attached = self.dp.attached();
        self.veths_without_programs = pod_like
            .iter()
            .filter(|i| !attached.contains(i))
            .map(|i| {
                view.veths
                    .get(i)
                    .map_or_else(|| i.to_string(), |v| v.name.clone())
            })
            .collect();
        self.errors = errors;
        {
            let sh = self.shared.lock().expect("api state lock");
            sh.metrics.compile_seconds.observe(compile_secs);
            sh.metrics
                .apply_seconds
                .observe(t_apply.elapsed().as_secs_f64());
        }
        // The changes taken are enforced once their writes flipped (or
        // nothing was to be written); a failed write keeps them in flight.
        if nothing_to_write || flipped {
            let sh = self.shared.lock().expect("api state lock");
            for (kind, at) in self.inflight.drain(..) {
                sh.metrics.observe_change(kind, at.elapsed().as_secs_f64());
            }
        }
        self.endpoint_pods = endpoint_pods;
        self.names_backlog.endpoints = Some(self.endpoint_pods.clone());
        self.publish_names();
        if self.synced_revision.is_none() {
            tracing::info!(
                secs = self.started.elapsed().as_secs_f64(),
                "first sync applied"
            );
        }
        self.synced_revision = Some(revision);
        self.retry = datapath_errors;
        self.last_view = Some(view);
        Ok(())
    }

    /// Brings the shared names up to date, unless a reader holds them: then
    /// what is missing waits for the next sync (the run loop never blocks on
    /// the API). Per change O(change), plus the compile's rules, policy sets
    /// and identities when the maps changed.
    fn publish_names(&mut self) {
        if self.names_backlog.is_empty() {
            return;
        }
        let Ok(mut names) = self.names.try_write() else {
            return;
        };
        let b = std::mem::take(&mut self.names_backlog);
        if let Some(cluster) = b.cluster {
            names.replace_cluster(cluster);
        }
        for c in &b.changes {
            names.apply(c);
        }
        names.compiled.maps.apply(&b.updates);
        if b.meta {
            let c = self.compiler.compiled();
            names.compiled.node = c.node.clone();
            names.compiled.rules = c.rules.clone();
            names.compiled.policy_sets = c.policy_sets.clone();
            names.compiled.identities = c.identities.clone();
            names.compiled.local_ips = c.local_ips.clone();
        }
        if let Some(e) = b.endpoints {
            names.endpoints = e;
        }
    }

    /// After a sync and its status: if this agent adopted the previous
    /// one's programs, load (verify) its own now, so that a new veth does not
    /// wait for the verifier. The adopted links keep running theirs.
    fn load_programs_if_reusing(&mut self) {
        if self.synced_revision.is_none() || !self.dp.reusing_programs() {
            return;
        }
        let t = Instant::now();
        match self.dp.ensure_programs() {
            Ok(()) => tracing::info!(
                secs = t.elapsed().as_secs_f64(),
                "programs loaded after the first sync"
            ),
            Err(e) => tracing::error!("loading the programs: {e}"),
        }
    }

    /// Replace what the agent believes it wrote with what the kernel holds;
    /// returns how many entries differed.
    fn read_back(&mut self) -> Result<usize> {
        fn differ<K: Ord, V: PartialEq>(a: &BTreeMap<K, V>, b: &BTreeMap<K, V>) -> usize {
            a.iter().filter(|(k, v)| b.get(k) != Some(v)).count()
                + b.keys().filter(|k| !a.contains_key(k)).count()
        }
        let held = self.dp.read_epochs()?;
        let generation = self.dp.config()?.generation;
        let local = self.dp.read_local_addrs()?;
        let deferred = self.dp.read_deferred()?;
        let mut n = self.epochs.reread(held)
            + differ(&self.local_addrs, &local)
            + self.deferred.symmetric_difference(&deferred).count();
        if generation != self.epochs.generation() {
            // CONFIG changed by hand: the next sync writes the epoch packets
            // do not read and flips to it, under a new generation.
            self.epochs.config_drifted(generation);
            n += 1;
        }
        self.local_addrs = local;
        self.deferred = deferred;
        Ok(n)
    }

    fn map_error(&self, e: &crate::datapath::DatapathError) {
        use crate::datapath::DatapathError::*;
        if let Map { map, .. } | MapFull { map, .. } = e {
            self.map_error_named(map);
        }
    }

    fn map_error_named(&self, map: &str) {
        self.shared
            .lock()
            .expect("api state lock")
            .metrics
            .map_error(map);
    }

    /// Each endpoint's flow-table pressure: entries it holds, and its
    /// share's admitted, refused and reclaimed counts.
    fn quota_rows(&mut self) -> (Vec<crate::metrics::QuotaRow>, u64) {
        if self
            .flow_counted
            .is_none_or(|t| t.elapsed() >= FLOW_COUNT_EVERY)
        {
            self.flow_counted = Some(Instant::now());
            match self.dp.flow_entries() {
                Ok(e) => self.flow_entries = e,
                Err(e) => tracing::warn!("counting flow entries: {e}"),
            }
        }
        let cpus = aya::util::nr_cpus().map_or(1, |n| n as u64);
        let share = self.dp.quota().map_or(0, |q| q.slots_per_cpu as u64 * cpus);
        let states = self.dp.quota_states().unwrap_or_default();
        let rows = self
            .epochs
            .current()
            .endpoints
            .keys()
            .map(|ifindex| crate::metrics::QuotaRow {
                endpoint: self
                    .endpoint_pods
                    .get(ifindex)
                    .map_or_else(|| format!("ifindex/{ifindex}"), |p| p.to_string()),
                entries: self.flow_entries.get(ifindex).copied().unwrap_or(0),
                state: states.get(ifindex).copied().unwrap_or_default(),
            })
            .collect();
        (rows, share)
    }

    fn write_status(&mut self) {
        let (quota_rows, share) = self.quota_rows();
        // A failed read keeps the last values read (status) and counts
        // nothing (metrics), rather than publishing zeros.
        let counters = match self.dp.counters() {
            Ok(c) => {
                self.last_counters = c.clone();
                c
            }
            Err(e) => {
                tracing::warn!(
                    "reading the verdict counters: {e}; status keeps the last values read"
                );
                Vec::new()
            }
        };
        let shown = if counters.is_empty() {
            &self.last_counters
        } else {
            &counters
        };
        let mut named = BTreeMap::new();
        for dir in [DIR_INGRESS, DIR_EGRESS] {
            for r in 0..REASON_COUNT {
                let v = shown
                    .get(counter_index(dir, r) as usize)
                    .copied()
                    .unwrap_or(0);
                if v > 0 {
                    named.insert(
                        format!("{}_{}", netpol_common::direction_name(dir), reason_name(r)),
                        v,
                    );
                }
            }
        }
        for (slot, name) in [
            (COUNTER_EVENTS_SENT, "events_sent"),
            (COUNTER_EVENTS_RATE_LIMITED, "events_rate_limited"),
            (COUNTER_EVENTS_RINGBUF_FULL, "events_ringbuf_full"),
        ] {
            named.insert(
                name.to_string(),
                shown.get(slot as usize).copied().unwrap_or(0),
            );
        }
        let synced = self.synced_revision == Some(self.source.revision());
        let source_health = self.source.health();
        let not_ready = crate::health::not_ready(&crate::health::Inputs {
            synced,
            source: &source_health,
            stale_after: self.cfg.stale_after,
            failed_writes: self.failed_writes,
            veths_without_programs: &self.veths_without_programs,
        });
        let status = Status {
            node: self.cfg.node.clone(),
            pid: std::process::id(),
            synced,
            source_revision: self.source.revision(),
            generation: self.epochs.generation_count(),
            epoch: self.epochs.active(),
            endpoints: self.epochs.current().endpoints.len(),
            pending: self.pending,
            missing_veths: self.missing.clone(),
            map_entries: BTreeMap::from([
                (
                    "endpoints".to_string(),
                    self.epochs.current().endpoints.len(),
                ),
                ("peers_v4".to_string(), self.epochs.current().peers_v4.len()),
                ("peers_v6".to_string(), self.epochs.current().peers_v6.len()),
                ("policy".to_string(), self.epochs.current().policy.len()),
            ]),
            counters: named,
            errors: self.errors.clone(),
            drift_repaired: self.drift_repaired,
            last_sync_unix_ms: self.last_good_sync_unix_ms,
            not_ready,
            veths_without_programs: self.veths_without_programs.len(),
            written_unix_ms: unix_ms_now(),
            xdp: self.xdp_modes.clone(),
        };
        {
            let mut sh = self.shared.lock().expect("api state lock");
            sh.metrics.observe_counters(&counters);
            let sizes = self.dp.sizes();
            sh.metrics.set_map(
                "endpoints",
                self.epochs.current().endpoints.len(),
                sizes.endpoints,
            );
            sh.metrics.set_map(
                "peers_v4",
                self.epochs.current().peers_v4.len(),
                sizes.peers_v4,
            );
            sh.metrics.set_map(
                "peers_v6",
                self.epochs.current().peers_v6.len(),
                sizes.peers_v6,
            );
            sh.metrics
                .set_map("policy", self.epochs.current().policy.len(), sizes.policy);
            sh.metrics
                .endpoints
                .set(self.epochs.current().endpoints.len() as i64);
            sh.metrics.observe_quota(&quota_rows, share);
            sh.metrics.observe_watcher_restarts(&source_health.restarts);
            sh.metrics.pending_endpoints.set(self.pending as i64);
            sh.metrics
                .generation
                .set(self.epochs.generation_count() as i64);
            sh.metrics.source_errors.set(self.errors.len() as i64);
            sh.metrics
                .last_sync
                .set(status.last_sync_unix_ms as f64 / 1000.0);
            sh.metrics
                .veths_without_programs
                .set(status.veths_without_programs as i64);
            sh.metrics.ready.set(i64::from(status.not_ready.is_empty()));
            sh.metrics.set_xdp_modes(&status.xdp);
            sh.status = status.clone();
        }
        let path = status_path(&self.cfg.state_dir);
        let tmp = path.with_extension("json.tmp");
        if let Ok(json) = serde_json::to_vec_pretty(&status)
            && std::fs::write(&tmp, json).is_ok()
        {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PodRef;

    #[test]
    fn a_transient_miss_keeps_the_endpoint_until_its_veth_or_pod_goes() {
        let pod = PodRef::new("x", "a");
        let old = EndpointValue::new(1, 7, netpol_common::EP_F_INGRESS_ISOLATED)
            .with_addresses(["10.0.0.5".parse().unwrap()], Some([2, 0, 0, 0, 0, 1]));
        let now = EndpointValue::new(2, 7, netpol_common::EP_F_EGRESS_ISOLATED);
        let previous_pods = BTreeMap::from([(10, pod.clone())]);
        let previous = BTreeMap::from([(10, old)]);
        let compiled = BTreeMap::from([(pod.clone(), now)]);
        let run = |pod_like: &[u32], compiled: &BTreeMap<PodRef, EndpointValue>| {
            let mut desired = BTreeMap::new();
            let mut pods = BTreeMap::new();
            let n = keep_endpoints_on_transient_miss(
                &previous_pods,
                &previous,
                &pod_like.iter().copied().collect(),
                compiled,
                &mut desired,
                &mut pods,
            );
            (n, desired, pods)
        };
        // Veth there, pod live, addresses not read: kept, with the new
        // policy and the old addresses.
        let (n, desired, pods) = run(&[10], &compiled);
        assert_eq!(n, 1);
        let ep = desired[&10];
        assert_eq!(ep.policy_id, 2);
        assert_eq!(ep.addr_v4, [10, 0, 0, 5]);
        assert_eq!(ep.mac, [2, 0, 0, 0, 0, 1]);
        assert_eq!(
            ep.flags,
            netpol_common::EP_F_EGRESS_ISOLATED
                | netpol_common::EP_F_HAS_V4
                | netpol_common::EP_F_HAS_MAC
        );
        assert_eq!(pods[&10], pod);
        // The veth is gone: removed.
        assert_eq!(run(&[], &compiled).0, 0);
        // The pod is deleted: removed.
        assert_eq!(run(&[10], &BTreeMap::new()).0, 0);
    }

    #[test]
    fn default_shares_keep_a_pod_to_an_eighth_and_a_busy_pod_out_of_refusals() {
        for cpus in [1, 2, 8, 64] {
            for max_pods in [1, 110, 250] {
                let flows = netpol_common::sizes::FLOWS;
                let usable = flows - LRU_SLACK_PER_CPU * cpus;
                let q = flow_quota(flows, max_pods, None, cpus);
                assert!(q.slots_per_cpu >= 1);
                let share = q.slots_per_cpu * cpus;
                // At least the equal split, and at least the minimum share
                // (an eighth of the table at most).
                assert!(
                    share + cpus > usable / max_pods,
                    "{cpus}/{max_pods}: {share}"
                );
                assert!(
                    share + cpus > DEFAULT_MIN_SHARE.min(usable / 8),
                    "{cpus}/{max_pods}: {share}"
                );
                // No more than an eighth of the table, unless fewer than
                // eight pods split it.
                if max_pods >= 8 {
                    assert!(share <= usable / 8, "{cpus}/{max_pods}: {share}");
                }
            }
        }
        // An explicit share is taken as given; 0 turns shares off.
        assert_eq!(flow_quota(1 << 18, 110, Some(4000), 2).slots_per_cpu, 2000);
        assert_eq!(flow_quota(1 << 18, 110, Some(0), 2).slots_per_cpu, 0);
    }

    #[test]
    fn an_explicit_share_is_split_over_the_cpus_and_zero_turns_shares_off() {
        assert_eq!(flow_quota(1 << 20, 110, Some(64), 2).slots_per_cpu, 32);
        assert_eq!(flow_quota(1 << 20, 110, Some(1), 4).slots_per_cpu, 1);
        assert_eq!(flow_quota(1 << 20, 110, Some(0), 4).slots_per_cpu, 0);
    }
}
