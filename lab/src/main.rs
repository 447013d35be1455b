//! `netpol-lab`: bring labs up and down, probe them, and run the pod servers.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
    os::unix::process::CommandExt,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use netpol_lab::{
    AddPodOptions, ClusterSpec, Family, LabState, PodSpec, PodState, PortSpec, ProbeSpec, Protocol,
    UpOptions, Via, add_pod,
    controlplane::{ControlPlaneSpec, ProxyMode},
    down, down_all, netns_command, probe, remove_pod, server, set_namespace_labels, set_pod_labels,
    up,
};

#[derive(Parser)]
#[command(
    name = "netpol-lab",
    version,
    about = "A Kubernetes-like cluster of network namespaces"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the cluster a cluster file describes.
    Up {
        /// The cluster file (see lab/README.md).
        cluster: PathBuf,
        /// Where to write manifests [default: /run/netpol-lab/<name>/manifests].
        #[arg(long)]
        manifests: Option<PathBuf>,
        /// Run a real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager,
        /// CoreDNS) with kube-proxy in this mode on every node (iptables, nftables or none);
        /// overrides the cluster file's `controlPlane`.
        #[arg(long, value_name = "PROXY_MODE", num_args = 0..=1, default_missing_value = "iptables")]
        control_plane: Option<ProxyMode>,
    },
    /// Run the real kubectl against a lab's API server, as its admin, e.g.
    /// `netpol-lab kubectl demo -- get pods -A`.
    Kubectl {
        /// Lab name.
        lab: String,
        /// kubectl's arguments.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Remove a lab (or every lab) with its processes, namespaces, manifests and state.
    Down {
        /// Lab name.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        name: Option<String>,
        /// Remove every lab, including leftovers without a state file.
        #[arg(long)]
        all: bool,
    },
    /// Connect from every pod to every pod and print truth tables.
    Probe {
        /// Lab name [default: the only lab that is up].
        #[arg(long)]
        lab: Option<String>,
        /// Ports [default: every TCP/UDP container port in the lab].
        #[arg(long, value_delimiter = ',')]
        ports: Vec<u16>,
        /// Protocols.
        #[arg(long, value_delimiter = ',', default_value = "tcp,udp")]
        protocols: Vec<Protocol>,
        #[arg(long, value_enum, default_value = "both")]
        family: FamilyArg,
        /// Client pods (namespace/name) [default: all].
        #[arg(long, value_delimiter = ',')]
        from: Option<Vec<String>>,
        /// Server pods (namespace/name) [default: all].
        #[arg(long, value_delimiter = ',')]
        to: Option<Vec<String>>,
        /// Timeout of one attempt, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
        /// Attempts per cell (2 = one retry after a failure).
        #[arg(long, default_value_t = 2)]
        attempts: u32,
        /// Print one JSON object per line instead of tables.
        #[arg(long)]
        json: bool,
        /// Dial each server's pod IP (`pod`) or its Service ClusterIP (`service`, through
        /// kube-proxy; needs a control plane).
        #[arg(long, default_value = "pod")]
        via: Via,
    },
    /// Add a pod to a running lab (netns, veth, addresses, server, then its Pod manifest).
    AddPod {
        /// Lab name.
        lab: String,
        /// The pod's namespace (declared in the cluster file).
        #[arg(long)]
        namespace: String,
        /// The pod's name.
        #[arg(long)]
        name: String,
        /// The node to run it on.
        #[arg(long)]
        node: String,
        /// Labels: key=value,... (the whole set).
        #[arg(long, value_parser = parse_labels, default_value = "")]
        labels: Labels,
        /// A container port: [name:]port[/TCP|UDP|SCTP], e.g. serve-80-tcp:80/TCP; repeatable.
        #[arg(long = "port", value_parser = parse_port)]
        ports: Vec<PortSpec>,
        /// IPv4 address [default: the node's next free one], e.g. a deleted pod's.
        #[arg(long)]
        ip_v4: Option<Ipv4Addr>,
        /// IPv6 address [default: the node's next free one].
        #[arg(long)]
        ip_v6: Option<Ipv6Addr>,
        /// Set the pod up through this chained CNI plugin (a netpol-cni binary), as a runtime
        /// would: CNI ADD with the veth's result as prevResult before the pod's server starts.
        #[arg(long, value_name = "PLUGIN")]
        cni: Option<std::path::PathBuf>,
    },
    /// Remove a pod from a running lab (server, veth, netns, then its Pod manifest).
    RemovePod {
        /// Lab name.
        lab: String,
        /// The pod, as namespace/name.
        pod: String,
    },
    /// Replace the labels of a pod or a namespace and rewrite its manifest.
    Label {
        /// Lab name.
        lab: String,
        /// What to relabel.
        #[arg(value_enum)]
        kind: LabelKind,
        /// The pod (namespace/name) or the namespace.
        target: String,
        /// The new labels: key=value,... ("" for none; kubernetes.io/metadata.name stays on
        /// namespaces).
        #[arg(value_parser = parse_labels)]
        labels: Labels,
    },
    /// List labs, or show one lab's nodes and pods.
    Status {
        /// Lab name.
        name: Option<String>,
    },
    /// Run a command in a node's or pod's network namespace (mounts, and so bpffs, stay).
    Exec {
        /// Lab name.
        lab: String,
        /// A node name or a pod as namespace/name.
        target: String,
        /// The command and its arguments.
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
    /// Run a pod server (started by `up` inside the pod's netns).
    Serve {
        /// What to answer: the pod's namespace/name.
        #[arg(long)]
        name: String,
        /// TCP ports.
        #[arg(long, value_delimiter = ',')]
        tcp: Vec<u16>,
        /// UDP ports.
        #[arg(long, value_delimiter = ',')]
        udp: Vec<u16>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LabelKind {
    Pod,
    Namespace,
}

/// Labels as parsed from `key=value,...`.
type Labels = BTreeMap<String, String>;

#[derive(Clone, Copy, ValueEnum)]
enum FamilyArg {
    V4,
    V6,
    Both,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Cmd::Serve { .. }) {
        // Die quietly when stdout is a closed pipe (`netpol-lab probe | head`), like other
        // command-line tools, instead of panicking on the next print. Servers keep ignoring
        // SIGPIPE: a client that goes away must not kill them.
        // SAFETY: setting a signal disposition to the default touches no memory of ours.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netpol-lab: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::Up {
            cluster,
            manifests,
            control_plane,
        } => cmd_up(cluster, manifests, control_plane),
        Cmd::Kubectl { lab, args } => {
            let state = LabState::load(&lab)?;
            let Some(cp) = &state.control_plane else {
                bail!(
                    "lab {lab:?} has no control plane (start it with `netpol-lab up --control-plane`)"
                );
            };
            let err = cp.kubectl()?.command().args(&args).exec();
            Err(err).context("exec kubectl")
        }
        Cmd::Down { name, all } => cmd_down(name, all),
        Cmd::Probe {
            lab,
            ports,
            protocols,
            family,
            from,
            to,
            timeout_ms,
            attempts,
            json,
            via,
        } => {
            let state = LabState::load(&pick_lab(lab)?)?;
            let spec = ProbeSpec {
                ports,
                protocols,
                families: match family {
                    FamilyArg::V4 => vec![Family::V4],
                    FamilyArg::V6 => vec![Family::V6],
                    FamilyArg::Both => vec![Family::V4, Family::V6],
                },
                from,
                to,
                timeout: Duration::from_millis(timeout_ms),
                attempts,
                via,
            };
            let results = probe(&state, &spec)?;
            if json {
                for result in &results.results {
                    println!("{}", serde_json::to_string(result)?);
                }
            } else {
                println!("{}", results.render());
                let connected = results.results.iter().filter(|r| r.connected).count();
                eprintln!(
                    "{connected}/{} connected in {:.2?}",
                    results.results.len(),
                    results.elapsed
                );
            }
            Ok(())
        }
        Cmd::AddPod {
            lab,
            namespace,
            name,
            node,
            labels,
            ports,
            ip_v4,
            ip_v6,
            cni,
        } => {
            let pod = PodSpec {
                namespace,
                name,
                node,
                labels,
                ports,
            };
            let options = AddPodOptions {
                ip_v4,
                ip_v6,
                server_exe: None,
                cni,
            };
            let key = format!("{}/{}", pod.namespace, pod.name);
            let pod = add_pod(&lab, pod, &options)
                .with_context(|| format!("adding pod {key} to lab {lab:?}"))?;
            print_pods(&[pod]);
            Ok(())
        }
        Cmd::RemovePod { lab, pod } => {
            let (namespace, name) = split_pod(&pod)?;
            let removed = remove_pod(&lab, namespace, name)
                .with_context(|| format!("removing pod {pod} from lab {lab:?}"))?;
            eprintln!(
                "removed pod {} ({}, {}) from node {}",
                removed.key(),
                removed.ip_v4,
                removed.ip_v6,
                removed.node
            );
            Ok(())
        }
        Cmd::Label {
            lab,
            kind,
            target,
            labels,
        } => match kind {
            LabelKind::Pod => {
                let (namespace, name) = split_pod(&target)?;
                set_pod_labels(&lab, namespace, name, labels)
                    .with_context(|| format!("relabelling pod {target} of lab {lab:?}"))?;
                Ok(())
            }
            LabelKind::Namespace => {
                set_namespace_labels(&lab, &target, labels)
                    .with_context(|| format!("relabelling namespace {target:?} of lab {lab:?}"))?;
                Ok(())
            }
        },
        Cmd::Status { name } => cmd_status(name),
        Cmd::Exec {
            lab,
            target,
            command,
        } => {
            let state = LabState::load(&lab)?;
            let netns = match (state.node(&target), state.pod_by_key(&target)) {
                (Some(node), _) => node.netns_path(),
                (None, Some(pod)) => pod.netns_path(),
                (None, None) => bail!("lab {lab:?} has no node or pod {target:?}"),
            };
            let err = netns_command(&netns, &command[0])
                .args(&command[1..])
                .exec();
            Err(err).with_context(|| format!("exec {}", command[0]))
        }
        Cmd::Serve { name, tcp, udp } => {
            server::serve(&name, &tcp, &udp)?;
            Ok(())
        }
    }
}

fn cmd_up(
    cluster: PathBuf,
    manifests: Option<PathBuf>,
    control_plane: Option<ProxyMode>,
) -> Result<()> {
    let started = Instant::now();
    let spec = ClusterSpec::from_file(&cluster)?;
    let state = up(
        &spec,
        &UpOptions {
            manifests_dir: manifests,
            server_exe: None,
            control_plane: control_plane.map(|proxy_mode| ControlPlaneSpec {
                proxy_mode,
                ..ControlPlaneSpec::default()
            }),
        },
    )?;
    print_status(&state);
    eprintln!("lab {:?} up in {:.2?}", state.name, started.elapsed());
    Ok(())
}

fn cmd_down(name: Option<String>, all: bool) -> Result<()> {
    let started = Instant::now();
    let reports = if all {
        down_all()?
    } else {
        vec![down(
            name.as_deref().expect("clap requires a name without --all"),
        )?]
    };
    for report in reports {
        if report.is_empty() {
            eprintln!("lab {:?}: nothing to remove", report.lab);
        } else {
            eprintln!(
                "lab {:?}: killed {} processes, deleted {} netns, removed {} manifests",
                report.lab,
                report.processes_killed.len(),
                report.netns_deleted.len(),
                report.manifests_removed
            );
        }
    }
    eprintln!("down in {:.2?}", started.elapsed());
    Ok(())
}

fn cmd_status(name: Option<String>) -> Result<()> {
    match name {
        Some(name) => print_status(&LabState::load(&name)?),
        None => {
            for lab in LabState::list() {
                println!("{lab}");
            }
        }
    }
    Ok(())
}

fn print_status(state: &LabState) {
    println!(
        "lab {}: manifests in {}",
        state.name,
        state.manifests_dir.display()
    );
    let f = &state.fabric;
    println!(
        "fabric {}: mode {}, {} {}, gateway {} {}",
        f.netns, f.mode, f.cidr_v4, f.cidr_v6, f.gateway_v4, f.gateway_v6
    );
    println!("NODE\tATTACHMENT\tIPv4\tIPv6\tPOD CIDRs\tPOD MTU\tNETNS");
    for n in &state.nodes {
        println!(
            "{}\t{}\t{}\t{}\t{},{}\t{}\t{}",
            n.name,
            n.attachment,
            n.ip_v4,
            n.ip_v6,
            n.pod_cidr_v4,
            n.pod_cidr_v6,
            n.pod_mtu,
            n.netns
        );
    }
    if state.nodes.iter().any(|n| n.vxlan.is_some()) {
        println!("NODE\tVXLAN DEVICE\tVNI\tPORT\tVTEP\tMAC\tMTU");
        for n in &state.nodes {
            let Some(v) = &n.vxlan else { continue };
            let rows = [
                (&v.v4.device, v.v4.ip.to_string(), &v.v4.mac, v.v4.mtu),
                (&v.v6.device, v.v6.ip.to_string(), &v.v6.mac, v.v6.mtu),
            ];
            for (device, ip, mac, mtu) in rows {
                println!(
                    "{}\t{device}\t{}\t{}\t{ip}\t{mac}\t{mtu}",
                    n.name, v.vni, v.port
                );
            }
        }
    }
    print_pods(&state.pods);
    if let Some(cp) = &state.control_plane {
        println!(
            "control plane: {} (kube-proxy {}), netns {}; `netpol-lab kubectl {} -- get pods -A`",
            cp.server_url, cp.spec.proxy_mode, cp.netns, state.name
        );
        println!("  admin kubeconfig {}", cp.admin_kubeconfig().display());
        if !cp.dns_service_ips.is_empty() {
            println!("  kube-dns {:?}", cp.dns_service_ips);
        }
        println!("SERVICE	CLUSTER IPs");
        for p in &state.pods {
            let ips: Vec<String> = p.service_ips.iter().map(ToString::to_string).collect();
            println!(
                "{}/s-{}-{}	{}",
                p.namespace,
                p.namespace,
                p.name,
                ips.join(",")
            );
        }
    }
}

fn print_pods(pods: &[PodState]) {
    println!("POD\tNODE\tIPv4\tIPv6\tHOST VETH\tSERVER PID");
    for p in pods {
        let pid = p
            .server_pid
            .map_or_else(|| "-".to_owned(), |pid| pid.to_string());
        println!(
            "{}\t{}\t{}\t{}\t{}\t{}",
            p.key(),
            p.node,
            p.ip_v4,
            p.ip_v6,
            p.host_veth,
            pid
        );
    }
}

/// The lab named, or the only lab that is up.
fn pick_lab(lab: Option<String>) -> Result<String> {
    if let Some(lab) = lab {
        return Ok(lab);
    }
    match LabState::list().as_slice() {
        [only] => Ok(only.clone()),
        [] => bail!("no lab is up"),
        labs => bail!(
            "several labs are up ({}); pick one with --lab",
            labs.join(", ")
        ),
    }
}

/// `namespace/name`.
fn split_pod(pod: &str) -> Result<(&str, &str)> {
    pod.split_once('/')
        .with_context(|| format!("{pod:?}: pods are named namespace/name"))
}

/// `key=value,...`; the empty string is no labels.
fn parse_labels(text: &str) -> Result<Labels, String> {
    text.split(',')
        .filter(|item| !item.is_empty())
        .map(|item| {
            item.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| format!("{item:?} is not key=value"))
        })
        .collect()
}

/// `[name:]port[/protocol]`: `serve-80-tcp:80/TCP`, `81/udp`, `80` (TCP).
fn parse_port(text: &str) -> Result<PortSpec, String> {
    let (name, rest) = match text.split_once(':') {
        Some((name, rest)) => (Some(name.to_owned()), rest),
        None => (None, text),
    };
    let (port, protocol) = match rest.split_once('/') {
        Some((port, protocol)) => (port, protocol.parse::<Protocol>()?),
        None => (rest, Protocol::Tcp),
    };
    let port = port
        .parse()
        .map_err(|e| format!("{text:?}: port {port:?}: {e}"))?;
    Ok(PortSpec {
        name,
        port,
        protocol,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels() {
        let labels = parse_labels("pod=c,app=web").expect("labels");
        assert_eq!(labels.len(), 2);
        assert_eq!(labels["app"], "web");
        assert!(parse_labels("").expect("no labels").is_empty());
        assert_eq!(parse_labels("empty=").expect("empty value")["empty"], "");
        assert!(parse_labels("pod").is_err());
    }

    #[test]
    fn parses_ports() {
        let port = parse_port("serve-80-tcp:80/TCP").expect("named port");
        assert_eq!(port.name.as_deref(), Some("serve-80-tcp"));
        assert_eq!((port.port, port.protocol), (80, Protocol::Tcp));
        let port = parse_port("81/udp").expect("udp port");
        assert_eq!(
            (port.name, port.port, port.protocol),
            (None, 81, Protocol::Udp)
        );
        assert_eq!(parse_port("90").expect("bare port").protocol, Protocol::Tcp);
        assert!(parse_port("x:eighty").is_err());
        assert!(parse_port("80/icmp").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
