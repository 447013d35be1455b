//! `netpol-agent`: the node agent (run), and the operator's tools (status,
//! cleanup).

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use netpol_agent::{
    agent::{self, Status},
    datapath::{self, MapSizes},
    pins::DEFAULT_ROOT,
};

#[derive(Parser)]
#[command(
    name = "netpol-agent",
    version,
    about = "Kubernetes NetworkPolicy dataplane (eBPF)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Enforce NetworkPolicy for this node's pods.
    Run(Box<RunArgs>),
    /// Print the agent's status (synced, endpoints, generation, counters).
    Status {
        #[arg(long, default_value = "/run/netpol")]
        state_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Why is a connection allowed or denied? Asks the running agent, which
    /// answers from the compiled state its datapath uses.
    Explain {
        /// `<namespace>/<pod>` or an IP address.
        #[arg(long)]
        from: String,
        /// `<namespace>/<pod>` or an IP address.
        #[arg(long)]
        to: String,
        /// `<port>/<protocol>`, e.g. 80/TCP, 53/UDP, icmp.
        #[arg(long)]
        port: String,
        #[arg(long, default_value = "/run/netpol")]
        state_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// The established-flow table with pod names, verdicts and counters.
    Flows {
        #[arg(long, default_value = "/run/netpol")]
        state_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Print what netlink shows of this node: veths, pod addresses found
    /// per veth, node addresses (for debugging discovery).
    Discover,
    /// Remove every attachment, pinned map and pin (stops enforcement).
    Cleanup {
        #[arg(long, default_value = DEFAULT_ROOT)]
        bpffs_root: PathBuf,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// This node's name (pods with this spec.nodeName are enforced here).
    #[arg(long)]
    node: String,
    /// Where cluster state comes from: `dir:<path>` (a manifests directory)
    /// or `kube` (the Kubernetes API: in-cluster service account, or
    /// --kubeconfig / KUBECONFIG / ~/.kube/config).
    #[arg(long)]
    source: String,
    /// kubeconfig for `--source kube` (default: KUBECONFIG, ~/.kube/config,
    /// then the in-cluster service account).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// With `--source kube`: the namespace of this node's report Lease
    /// (`netpol-node-<node>`), from which ClusterNetworkPolicy `Programmed`
    /// conditions are written. Default: $POD_NAMESPACE (the DaemonSet sets
    /// it), else the kubeconfig's namespace. `--status-namespace ""` turns
    /// reports and conditions off.
    #[arg(long)]
    status_namespace: Option<String>,
    /// bpffs directory for pinned maps and links.
    #[arg(long, default_value = DEFAULT_ROOT)]
    bpffs_root: PathBuf,
    /// Where the status file is written.
    #[arg(long, default_value = "/run/netpol")]
    state_dir: PathBuf,
    /// Write flow logs (JSON lines) here instead of stdout.
    #[arg(long)]
    flow_log: Option<PathBuf>,
    /// Rotate the flow log file before it grows past this many bytes (0:
    /// never).
    #[arg(long, default_value_t = netpol_agent::flowlog::Rotation::default().max_bytes)]
    flow_log_max_bytes: u64,
    /// Rotated flow log files kept (`<file>.1` is the newest).
    #[arg(long, default_value_t = netpol_agent::flowlog::Rotation::default().keep)]
    flow_log_keep: u32,
    /// Verdict events per second per CPU sent by the kernel (0: none).
    #[arg(long, default_value_t = 1000)]
    events_per_sec: u32,
    /// Flow-log allowed new flows too (denied, revoked and audited ones are
    /// always logged; an event per allowed connection costs CPU).
    #[arg(long)]
    log_allowed: bool,
    /// Audit mode for every pod: report what would be denied, pass it.
    #[arg(long)]
    audit: bool,
    /// Pod veth name prefixes (e.g. cali,veth,lxc); default: every veth whose
    /// peer is in another network namespace and that has no node address.
    #[arg(long, value_delimiter = ',')]
    veth_prefixes: Vec<String>,
    /// Serve /healthz, /readyz and /metrics here (e.g. 0.0.0.0:9964).
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// The cluster's service CIDRs (kube-apiserver's
    /// --service-cluster-ip-range), comma-separated. A pod's egress to them is
    /// judged after kube-proxy's DNAT, against the backend. With the kube
    /// source the ServiceCIDR objects and the Services' external IPs are
    /// added; with a manifest directory this flag is the only source.
    #[arg(long, value_delimiter = ',')]
    service_cidr: Vec<ipnet::IpNet>,
    /// XDP on the node's uplinks, an early drop of new flows a local pod's
    /// ingress policy denies: off, native, generic, or auto (native where
    /// the driver has it, generic elsewhere).
    #[arg(long, default_value = "auto")]
    xdp: netpol_agent::xdp::XdpMode,
    /// Devices for XDP, comma-separated (default: those the default route
    /// and the routes through a gateway leave by, tunnels excepted).
    #[arg(long, value_delimiter = ',')]
    xdp_devices: Vec<String>,
    /// Every this many seconds the agent reads its pinned maps back and
    /// rewrites whatever differs from the compiled state.
    #[arg(long, default_value_t = 30)]
    reconcile_secs: u64,
    /// The agent is not ready (`/readyz`) while its source has been failing
    /// for longer than this many seconds: the cluster may have moved on.
    #[arg(long, default_value_t = 60)]
    stale_after_secs: u64,
    /// Poll interval of the source and the node, in milliseconds.
    #[arg(long, default_value_t = 200)]
    poll_ms: u64,
    /// Endpoints of one policy state (the map holds two: the enforced state
    /// and the one being written, so it is created twice as big).
    #[arg(long, default_value_t = netpol_common::sizes::ENDPOINTS)]
    max_endpoints: u32,
    /// Peer entries of one policy state (each state has its own trie).
    #[arg(long, default_value_t = netpol_common::sizes::PEERS_V4)]
    max_peers_v4: u32,
    /// As --max-peers-v4, for IPv6.
    #[arg(long, default_value_t = netpol_common::sizes::PEERS_V6)]
    max_peers_v6: u32,
    /// Policy entries of one policy state (the map holds two, and is
    /// created twice as big).
    #[arg(long, default_value_t = netpol_common::sizes::POLICY)]
    max_policy: u32,
    #[arg(long, default_value_t = netpol_common::sizes::FLOWS)]
    max_flows: u32,
    /// Flow-table entries one pod may hold (0: no shares); a new flow beyond
    /// it is dropped as `flow_quota` rather than evict another pod's flow.
    /// Default: the flow table split over --max-pods, but at least 16,384
    /// entries and at most an eighth of the table.
    #[arg(long)]
    flows_per_endpoint: Option<u32>,
    /// Pods this node may run (kubelet's maxPods), for the default share.
    #[arg(long, default_value_t = 110)]
    max_pods: u32,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // `netpol-agent status | head` must not panic on a closed pipe: the
    // one-shot commands die quietly of SIGPIPE, as `cat` does. The daemon
    // keeps Rust's SIG_IGN: with SIG_DFL, a write to a socket whose peer went
    // away (a client of the API socket that hung up, an API server that was
    // killed mid-request) killed the agent without a word.
    if !matches!(cli.cmd, Cmd::Run(_)) {
        // SAFETY: resetting SIGPIPE to its default before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colour only for a terminal: container logs and files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.cmd {
        Cmd::Run(a) => {
            let mut cnp_status = None;
            let source: Box<dyn netpol_agent::source::ClusterSource> =
                match a.source.strip_prefix("dir:") {
                    Some(dir) => Box::new(netpol_agent::source::DirSource::new(dir)),
                    None if a.source == "kube" => {
                        use netpol_agent::kube_source::{KubeSource, Options, load_config};
                        // Only reads the configuration (fails fast when there
                        // is none); the client and its watchers start on the
                        // first poll, inside the agent's runtime below.
                        let config = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()?
                            .block_on(load_config(a.kubeconfig.as_deref()))?;
                        let namespace = a
                            .status_namespace
                            .clone()
                            .or_else(|| std::env::var("POD_NAMESPACE").ok())
                            .unwrap_or_else(|| config.default_namespace.clone());
                        if !namespace.is_empty() {
                            cnp_status = Some(netpol_agent::cnp_status::ReportConfig {
                                kube: config.clone(),
                                namespace,
                                node: a.node.clone(),
                            });
                        }
                        Box::new(KubeSource::new(config, Options::default()))
                    }
                    None => bail!("--source {}: expected dir:<path> or kube", a.source),
                };
            let cfg = agent::Config {
                node: a.node,
                bpffs_root: a.bpffs_root,
                state_dir: a.state_dir,
                flow_log: a.flow_log,
                flow_log_rotation: netpol_agent::flowlog::Rotation {
                    max_bytes: a.flow_log_max_bytes,
                    keep: a.flow_log_keep,
                },
                events_per_sec: a.events_per_sec,
                log_allowed: a.log_allowed,
                audit: a.audit,
                sizes: MapSizes {
                    endpoints: a.max_endpoints,
                    peers_v4: a.max_peers_v4,
                    peers_v6: a.max_peers_v6,
                    policy: a.max_policy,
                    flows: a.max_flows,
                    ..MapSizes::default()
                },
                poll: std::time::Duration::from_millis(a.poll_ms),
                metrics_addr: a.metrics_addr,
                service_cidrs: a.service_cidr.clone(),
                reconcile: std::time::Duration::from_secs(a.reconcile_secs.max(1)),
                veth_prefixes: a.veth_prefixes,
                cnp_status,
                flows_per_endpoint: a.flows_per_endpoint,
                max_pods: a.max_pods,
                stale_after: std::time::Duration::from_secs(a.stale_after_secs),
                xdp: netpol_agent::xdp::XdpConfig {
                    mode: a.xdp,
                    devices: a.xdp_devices,
                },
            };
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(agent::run(cfg, source))
        }
        Cmd::Status { state_dir, json } => {
            // The running agent answers on its socket; the file is what the
            // last one wrote (read when none answers).
            let text = match netpol_agent::api::get(&state_dir, "/status") {
                Ok((200, body)) => body,
                _ => {
                    let path = agent::status_path(&state_dir);
                    std::fs::read_to_string(&path).with_context(|| {
                        format!("reading {} (is the agent running?)", path.display())
                    })?
                }
            };
            if json {
                println!("{text}");
                return Ok(());
            }
            let s: Status = serde_json::from_str(&text)?;
            println!("node:        {}", s.node);
            println!(
                "synced:      {} (source revision {})",
                s.synced, s.source_revision
            );
            println!("generation:  {}", s.generation);
            println!(
                "endpoints:   {} enforced, {} pending (denied until known)",
                s.endpoints, s.pending
            );
            if !s.missing_veths.is_empty() {
                println!("no veth yet: {}", s.missing_veths.join(", "));
            }
            for (m, n) in &s.map_entries {
                println!("map {m:<10} {n} entries");
            }
            for (c, n) in &s.counters {
                println!("counter {c:<32} {n}");
            }
            for e in &s.errors {
                println!("error: {e}");
            }
            Ok(())
        }
        Cmd::Explain {
            from,
            to,
            port,
            state_dir,
            json,
        } => {
            use netpol_agent::api::{encode_query, get};
            let path = format!(
                "/explain?from={}&to={}&port={}",
                encode_query(&from),
                encode_query(&to),
                encode_query(&port)
            );
            let (code, body) = get(&state_dir, &path).map_err(anyhow::Error::msg)?;
            if code != 200 {
                bail!("explain: {}", body.trim());
            }
            if json {
                println!("{body}");
            } else {
                let e: netpol_agent::explain::Explanation = serde_json::from_str(&body)?;
                print!("{e}");
            }
            Ok(())
        }
        Cmd::Flows { state_dir, json } => {
            let (code, body) =
                netpol_agent::api::get(&state_dir, "/flows").map_err(anyhow::Error::msg)?;
            if code != 200 {
                bail!("flows: {}", body.trim());
            }
            if json {
                println!("{body}");
                return Ok(());
            }
            let flows: Vec<serde_json::Value> = serde_json::from_str(&body)?;
            println!(
                "{:<16} {:<7} {:<6} {:<34} {:<34} {:<7} {:<24} {:>9} {:>9}",
                "ENDPOINT",
                "OPENED",
                "PROTO",
                "POD",
                "REMOTE",
                "VERDICT",
                "POLICY",
                "PKTS OUT",
                "PKTS IN"
            );
            for f in flows {
                let s = |k: &str| f[k].as_str().unwrap_or("-").to_string();
                println!(
                    "{:<16} {:<7} {:<6} {:<34} {:<34} {:<7} {:<24} {:>9} {:>9}",
                    s("endpoint"),
                    s("opened"),
                    s("protocol"),
                    format!("{}:{}", s("pod"), f["pod_port"]),
                    format!("{}:{}", s("remote"), f["remote_port"]),
                    s("verdict"),
                    s("policy"),
                    f["packets_from_pod"],
                    f["packets_to_pod"]
                );
            }
            Ok(())
        }
        Cmd::Discover => {
            let view = netpol_agent::netlink::discover()?;
            for v in view.veths.values() {
                let ips: Vec<String> = view
                    .addresses
                    .get(&v.ifindex)
                    .map(|s| s.iter().map(|ip| ip.to_string()).collect())
                    .unwrap_or_default();
                println!(
                    "{:<16} ifindex {:<4} bridge {:<6} peer netnsid {:<6} pod IPs {}",
                    v.name,
                    v.ifindex,
                    v.controller.map(|c| c.to_string()).unwrap_or("-".into()),
                    v.peer_netnsid.map(|c| c.to_string()).unwrap_or("-".into()),
                    if ips.is_empty() {
                        "-".to_string()
                    } else {
                        ips.join(", ")
                    }
                );
            }
            let node: Vec<String> = view.node_addresses.iter().map(|a| a.to_string()).collect();
            println!("node addresses: {}", node.join(", "));
            Ok(())
        }
        Cmd::Cleanup { bpffs_root } => {
            let n = datapath::cleanup(&bpffs_root)
                .with_context(|| format!("cleaning up {}", bpffs_root.display()))?;
            println!("removed {n} pins under {}", bpffs_root.display());
            Ok(())
        }
    }
}
