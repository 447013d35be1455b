//! Probing: real TCP connections and UDP exchanges made from inside client pods' network
//! namespaces to server pods, collected into truth tables.
//!
//! Each probe runs on a worker thread that has entered the client's netns with
//! `setns(CLONE_NEWNET)` (on itself only; worker threads end after the probe run). All probes of
//! a run are in flight at once (up to [`MAX_WORKERS`]), so a full matrix with many blocked cells
//! takes about `attempts * timeout`, not the sum of its timeouts.

use std::{
    collections::BTreeSet,
    fmt,
    io::{self, Read},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    sync::atomic::{AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    netns::{enter_netns, open_netns},
    spec::Protocol,
    state::{Family, LabState, PodState},
    table::TruthTable,
};

/// Most probe threads at once.
pub const MAX_WORKERS: usize = 1024;
/// Stack of a probe thread: they only hold a socket and a small buffer.
const WORKER_STACK: usize = 256 * 1024;
/// What a UDP probe sends.
const UDP_PAYLOAD: &[u8] = b"probe\n";
/// Longest answer read from a server.
const MAX_ANSWER: u64 = 512;

/// Errors in a probe request.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{field}: no pod {pod:?} in lab {lab:?} (pods are named namespace/name)")]
    UnknownPod {
        field: &'static str,
        pod: String,
        lab: String,
    },
    #[error("cannot probe SCTP: the lab's kernel has no SCTP sockets")]
    Sctp,
    #[error("nothing to probe: no ports given and no pod has a TCP or UDP port")]
    NoPorts,
    #[error("pod {pod} has no {family} Service ClusterIP (is the lab up with --control-plane?)")]
    NoServiceIp { pod: String, family: Family },
    #[error("cannot enter the netns of pod {pod}: {source}")]
    Netns {
        pod: String,
        #[source]
        source: io::Error,
    },
}

/// What to probe. [`ProbeSpec::default`] probes every pod to every pod on every TCP/UDP
/// container port of the lab, both families, 1 s timeout, one retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSpec {
    /// Ports; empty means every TCP and UDP container port of any pod.
    pub ports: Vec<u16>,
    /// Protocols (TCP, UDP).
    pub protocols: Vec<Protocol>,
    pub families: Vec<Family>,
    /// Client pods (`namespace/name`); `None` means all.
    pub from: Option<Vec<String>>,
    /// Server pods; `None` means all.
    pub to: Option<Vec<String>>,
    /// Per attempt, for connect and answer together.
    pub timeout: Duration,
    /// Attempts per cell (2 = one retry after a failure).
    pub attempts: u32,
    /// Dial each server's pod IP, or its Service's ClusterIP (as upstream's e2e suite does).
    pub via: Via,
}

/// Which address of a server pod a probe dials.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// The pod's own address.
    #[default]
    Pod,
    /// The ClusterIP of the pod's Service (`s-<ns>-<pod>`): kube-proxy DNATs it to the pod.
    Service,
}

impl std::str::FromStr for Via {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pod" => Ok(Via::Pod),
            "service" => Ok(Via::Service),
            _ => Err(format!("unknown address kind {s:?} (pod or service)")),
        }
    }
}

impl Default for ProbeSpec {
    fn default() -> Self {
        ProbeSpec {
            ports: Vec::new(),
            protocols: vec![Protocol::Tcp, Protocol::Udp],
            families: vec![Family::V4, Family::V6],
            from: None,
            to: None,
            timeout: Duration::from_secs(1),
            attempts: 2,
            via: Via::Pod,
        }
    }
}

/// One table of a probe run: a port, a protocol and a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct TableKey {
    pub port: u16,
    pub protocol: Protocol,
    pub family: Family,
}

impl fmt::Display for TableKey {
    /// `TCP/80 IPv4`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} {}", self.protocol, self.port, self.family)
    }
}

/// The outcome of one cell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProbeResult {
    pub from: String,
    pub to: String,
    pub to_ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub family: Family,
    pub connected: bool,
    /// The server's answer when connected, else why not (`timeout`, `refused`, ...) of the
    /// last attempt.
    pub detail: String,
    /// Attempts made (a connected cell stops at the first success).
    pub attempts: u32,
}

/// All cells of a probe run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProbeResults {
    pub clients: Vec<String>,
    pub servers: Vec<String>,
    pub results: Vec<ProbeResult>,
    pub elapsed: Duration,
}

impl ProbeResults {
    /// The tables of the run, ordered by port, protocol, family.
    pub fn keys(&self) -> Vec<TableKey> {
        let keys: BTreeSet<TableKey> = self
            .results
            .iter()
            .map(|r| TableKey {
                port: r.port,
                protocol: r.protocol,
                family: r.family,
            })
            .collect();
        keys.into_iter().collect()
    }

    /// The truth table of one port/protocol/family.
    pub fn table(&self, key: &TableKey) -> TruthTable {
        let mut table = TruthTable::empty(&self.clients, &self.servers);
        for r in self
            .results
            .iter()
            .filter(|r| r.port == key.port && r.protocol == key.protocol && r.family == key.family)
        {
            table.set(&r.from, &r.to, r.connected);
        }
        table
    }

    /// Every table of the run.
    pub fn tables(&self) -> Vec<(TableKey, TruthTable)> {
        self.keys()
            .into_iter()
            .map(|k| (k, self.table(&k)))
            .collect()
    }

    /// True when every cell connected.
    pub fn all_connected(&self) -> bool {
        self.results.iter().all(|r| r.connected)
    }

    /// Every table with its title (`TCP/80 IPv4`), separated by blank lines.
    pub fn render(&self) -> String {
        self.tables()
            .iter()
            .map(|(key, table)| format!("{key}\n{}", table.render()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// One attempt's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub connected: bool,
    /// The answer when connected, else the failure (`timeout`, `refused`, `wrong answer ...`).
    pub detail: String,
}

struct Job {
    client: usize,
    to: String,
    to_ip: IpAddr,
    port: u16,
    protocol: Protocol,
    family: Family,
}

/// Probes every selected client to every selected server on every port/protocol/family.
pub fn probe(state: &LabState, spec: &ProbeSpec) -> Result<ProbeResults, ProbeError> {
    let started = Instant::now();
    if spec.protocols.contains(&Protocol::Sctp) {
        return Err(ProbeError::Sctp);
    }
    let clients = select(state, spec.from.as_deref(), "from")?;
    let servers = select(state, spec.to.as_deref(), "to")?;
    let ports = if spec.ports.is_empty() {
        lab_ports(state)
    } else {
        spec.ports.clone()
    };
    if ports.is_empty() {
        return Err(ProbeError::NoPorts);
    }
    let netns = clients
        .iter()
        .map(|pod| {
            open_netns(&pod.netns_path()).map_err(|source| ProbeError::Netns {
                pod: pod.key(),
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;

    let mut jobs = Vec::new();
    for &port in &ports {
        for &protocol in &spec.protocols {
            for &family in &spec.families {
                for client in 0..clients.len() {
                    for server in &servers {
                        let to_ip = match spec.via {
                            Via::Pod => server.ip(family),
                            Via::Service => server.service_ip(family).ok_or_else(|| {
                                ProbeError::NoServiceIp {
                                    pod: server.key(),
                                    family,
                                }
                            })?,
                        };
                        jobs.push(Job {
                            client,
                            to: server.key(),
                            to_ip,
                            port,
                            protocol,
                            family,
                        });
                    }
                }
            }
        }
    }

    let next = AtomicUsize::new(0);
    let workers = jobs.len().clamp(1, MAX_WORKERS);
    let mut done: Vec<(usize, Attempt, u32)> = thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                thread::Builder::new()
                    .stack_size(WORKER_STACK)
                    .spawn_scoped(s, || {
                        let mut out = Vec::new();
                        let mut entered = None;
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some(job) = jobs.get(i) else { break };
                            if entered != Some(job.client) {
                                if let Err(e) = enter_netns(&netns[job.client]) {
                                    let fail = Attempt {
                                        connected: false,
                                        detail: format!("setns: {e}"),
                                    };
                                    out.push((i, fail, 0));
                                    continue;
                                }
                                entered = Some(job.client);
                            }
                            let (attempt, n) = attempt_with_retries(job, spec);
                            out.push((i, attempt, n));
                        }
                        out
                    })
                    .expect("spawn probe thread")
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("probe thread panicked"))
            .collect()
    });
    done.sort_by_key(|(i, _, _)| *i);

    let results = done
        .into_iter()
        .map(|(i, attempt, attempts)| {
            let job = &jobs[i];
            ProbeResult {
                from: clients[job.client].key(),
                to: job.to.clone(),
                to_ip: job.to_ip,
                port: job.port,
                protocol: job.protocol,
                family: job.family,
                connected: attempt.connected,
                detail: attempt.detail,
                attempts,
            }
        })
        .collect();
    Ok(ProbeResults {
        clients: clients.iter().map(|p| p.key()).collect(),
        servers: servers.iter().map(|p| p.key()).collect(),
        results,
        elapsed: started.elapsed(),
    })
}

fn attempt_with_retries(job: &Job, spec: &ProbeSpec) -> (Attempt, u32) {
    let addr = SocketAddr::new(job.to_ip, job.port);
    let mut last = None;
    for n in 1..=spec.attempts.max(1) {
        let attempt = attempt(addr, job.protocol, Some(&job.to), spec.timeout);
        if attempt.connected {
            return (attempt, n);
        }
        last = Some(attempt);
    }
    (last.expect("at least one attempt"), spec.attempts.max(1))
}

/// Every TCP and UDP container port of the lab, sorted.
fn lab_ports(state: &LabState) -> Vec<u16> {
    let ports: BTreeSet<u16> = state
        .pods
        .iter()
        .flat_map(|p| p.ports.iter())
        .filter(|p| p.protocol != Protocol::Sctp)
        .map(|p| p.port)
        .collect();
    ports.into_iter().collect()
}

fn select<'a>(
    state: &'a LabState,
    keys: Option<&[String]>,
    field: &'static str,
) -> Result<Vec<&'a PodState>, ProbeError> {
    match keys {
        None => Ok(state.pods.iter().collect()),
        Some(keys) => keys
            .iter()
            .map(|key| {
                state.pod_by_key(key).ok_or_else(|| ProbeError::UnknownPod {
                    field,
                    pod: key.clone(),
                    lab: state.name.clone(),
                })
            })
            .collect(),
    }
}

/// One connection attempt from inside pod `from`'s netns to `to_ip:port` (no retry). Connected
/// means: TCP handshake done and an answer read, or a UDP answer received; if `to_ip` belongs
/// to a lab pod, the answer must also name that pod. Any other address (the fabric gateway, a
/// node) only needs to answer at all.
pub fn connect(
    state: &LabState,
    from: &PodState,
    to_ip: IpAddr,
    port: u16,
    protocol: Protocol,
    timeout: Duration,
) -> bool {
    connect_detailed(state, from, to_ip, port, protocol, timeout).connected
}

/// [`connect`], with the answer or the reason of the failure.
pub fn connect_detailed(
    state: &LabState,
    from: &PodState,
    to_ip: IpAddr,
    port: u16,
    protocol: Protocol,
    timeout: Duration,
) -> Attempt {
    let expected = state
        .pod_by_ip(to_ip)
        .or_else(|| state.pod_by_service_ip(to_ip))
        .map(PodState::key);
    let fd = match open_netns(&from.netns_path()) {
        Ok(fd) => fd,
        Err(e) => {
            return Attempt {
                connected: false,
                detail: format!("open netns of {}: {e}", from.key()),
            };
        }
    };
    thread::scope(|s| {
        s.spawn(|| match enter_netns(&fd) {
            Ok(()) => attempt(
                SocketAddr::new(to_ip, port),
                protocol,
                expected.as_deref(),
                timeout,
            ),
            Err(e) => Attempt {
                connected: false,
                detail: format!("setns: {e}"),
            },
        })
        .join()
        .expect("connect thread panicked")
    })
}

/// One attempt from the calling thread's netns.
fn attempt(
    addr: SocketAddr,
    protocol: Protocol,
    expected: Option<&str>,
    timeout: Duration,
) -> Attempt {
    let answer = match protocol {
        Protocol::Tcp => tcp_exchange(addr, timeout),
        Protocol::Udp => udp_exchange(addr, timeout),
        Protocol::Sctp => Err("SCTP is not supported".to_owned()),
    };
    match answer {
        Ok(answer) => match expected {
            Some(expected) if answer != expected => Attempt {
                connected: false,
                detail: format!("wrong answer {answer:?}"),
            },
            _ => Attempt {
                connected: true,
                detail: answer,
            },
        },
        Err(detail) => Attempt {
            connected: false,
            detail,
        },
    }
}

fn tcp_exchange(addr: SocketAddr, timeout: Duration) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    let stream = TcpStream::connect_timeout(&addr, timeout).map_err(describe)?;
    let remaining = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    stream.set_read_timeout(Some(remaining)).map_err(describe)?;
    let mut answer = Vec::new();
    stream
        .take(MAX_ANSWER)
        .read_to_end(&mut answer)
        .map_err(describe)?;
    Ok(String::from_utf8_lossy(&answer).trim().to_owned())
}

fn udp_exchange(addr: SocketAddr, timeout: Duration) -> Result<String, String> {
    let local: SocketAddr = match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).map_err(describe)?;
    // Connected: only the server's answers are received, and ICMP errors are reported.
    socket.connect(addr).map_err(describe)?;
    socket.set_read_timeout(Some(timeout)).map_err(describe)?;
    socket.send(UDP_PAYLOAD).map_err(describe)?;
    let mut buf = [0u8; MAX_ANSWER as usize];
    let n = socket.recv(&mut buf).map_err(describe)?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
}

/// A short reason for a failed probe.
fn describe(e: io::Error) -> String {
    match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => "timeout".to_owned(),
        io::ErrorKind::ConnectionRefused => "refused".to_owned(),
        io::ErrorKind::ConnectionReset => "reset".to_owned(),
        io::ErrorKind::HostUnreachable => "host unreachable".to_owned(),
        io::ErrorKind::NetworkUnreachable => "network unreachable".to_owned(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn results() -> ProbeResults {
        let mk = |from: &str, to: &str, port, protocol, family, connected| ProbeResult {
            from: from.into(),
            to: to.into(),
            to_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port,
            protocol,
            family,
            connected,
            detail: String::new(),
            attempts: 1,
        };
        ProbeResults {
            clients: vec!["x/a".into(), "x/b".into()],
            servers: vec!["x/a".into(), "x/b".into()],
            results: vec![
                mk("x/a", "x/a", 80, Protocol::Udp, Family::V4, true),
                mk("x/a", "x/b", 80, Protocol::Udp, Family::V4, false),
                mk("x/b", "x/a", 80, Protocol::Udp, Family::V4, true),
                mk("x/b", "x/b", 80, Protocol::Udp, Family::V4, true),
                mk("x/a", "x/b", 80, Protocol::Tcp, Family::V6, true),
            ],
            elapsed: Duration::ZERO,
        }
    }

    #[test]
    fn tables_are_keyed_and_ordered() {
        let r = results();
        let keys: Vec<String> = r.keys().iter().map(ToString::to_string).collect();
        assert_eq!(keys, ["TCP/80 IPv6", "UDP/80 IPv4"]);
        assert_eq!(
            r.render(),
            "TCP/80 IPv6\n-\tx/a\tx/b\nx/a\t?\t.\nx/b\t?\t?\n\n\
             UDP/80 IPv4\n-\tx/a\tx/b\nx/a\t.\tX\nx/b\t.\t.\n"
        );
        assert!(!r.all_connected());
    }

    #[test]
    fn json_uses_kubernetes_spellings() {
        let json = serde_json::to_value(&results().results[0]).expect("serializes");
        assert_eq!(json["protocol"], "UDP");
        assert_eq!(json["family"], "IPv4");
        assert_eq!(json["connected"], true);
    }

    #[test]
    fn describe_names_common_failures() {
        assert_eq!(describe(io::ErrorKind::WouldBlock.into()), "timeout");
        assert_eq!(describe(io::ErrorKind::ConnectionRefused.into()), "refused");
    }
}
