//! Long-lived traffic between two pods, for tests that restart or reconfigure the agent while
//! connections are open: does an established TCP connection survive, does a UDP flow lose
//! datagrams?
//!
//! [`start_stream`] starts an echo server on a thread that entered the server pod's netns
//! (not the pod's own `serve` process: a port of the caller's choosing that the pod's server
//! does not use), then a client on a thread that entered the client pod's netns. The client
//! sends a small sequence-numbered message every `interval`; the server sends each one back.
//!
//! Over TCP the client keeps at most one message in flight, like request/response traffic: it
//! sends on the first tick after the previous echo came back. That keeps the retransmission
//! count meaningful on a busy machine: with several small segments in flight, Linux sends a
//! tail-loss probe (a retransmission) when an ACK is late by a few milliseconds, which a
//! descheduled echo thread causes without any packet being lost; with one segment in flight,
//! the probe waits for the minimum RTO (200 ms) on top. A retransmission then means a lost
//! packet or a stall of 200 ms or more.
//! [`StreamHandle::stop`] ends the stream and reports what was sent, what came back, which
//! sequence numbers never did and, for TCP, whether the connection stayed up and how many
//! segments the client's netns retransmitted meanwhile.
//!
//! Threads in lab namespaces are dedicated to one stream and end with it.

use std::{
    collections::BTreeSet,
    fmt, fs,
    io::{self, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use socket2::{Domain, Socket, Type};

use crate::{
    netns::{enter_netns, open_netns},
    spec::Protocol,
    state::{Family, LabState, PodState},
};

/// Bytes of one message: the sequence number (big endian), then [`MAGIC`].
const MESSAGE_LEN: usize = 16;
/// The second half of every message, to recognise echoes.
const MAGIC: &[u8; 8] = b"npstream";
/// How long the client tries to connect (TCP).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a stopped UDP stream waits for the last echoes.
const UDP_DRAIN: Duration = Duration::from_millis(300);
/// How long a stopped TCP stream waits for every byte to come back (a retransmission after a
/// lost segment takes 200 ms or more).
const TCP_DRAIN: Duration = Duration::from_secs(3);
/// How often blocked threads look at their stop flag.
const POLL: Duration = Duration::from_millis(20);
/// A send that blocks this long (a full TCP send buffer) ends the stream.
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Errors starting a stream. Once started, problems go into the [`StreamReport`].
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("no pod of lab {lab:?} has address {ip}")]
    UnknownAddress { lab: String, ip: IpAddr },
    #[error("streams are TCP or UDP, not {0}")]
    Protocol(Protocol),
    #[error("the interval between messages must be more than zero")]
    ZeroInterval,
    #[error("cannot enter the netns of pod {pod}: {source}")]
    Netns {
        pod: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the {protocol} echo server of pod {pod} on {addr}: {source}")]
    Listen {
        pod: String,
        protocol: Protocol,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("{protocol} stream from {from} to {addr}: {source}")]
    Connect {
        from: String,
        protocol: Protocol,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot start a stream thread: {source}")]
    Thread {
        #[source]
        source: io::Error,
    },
}

/// What a stream did, from [`StreamHandle::stop`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamReport {
    /// Client pod, `namespace/name`.
    pub from: String,
    /// Server pod, `namespace/name`.
    pub to: String,
    /// The server's address and port.
    pub addr: SocketAddr,
    pub protocol: Protocol,
    /// Messages sent (sequence numbers `0..sent`).
    pub sent: u64,
    /// Distinct messages that came back.
    pub echoed: u64,
    /// Sequence numbers sent but never echoed, ascending. For TCP these can only be the last
    /// ones, after the connection broke or stalled.
    pub lost: Vec<u64>,
    pub bytes_sent: u64,
    pub bytes_echoed: u64,
    /// No socket error while the stream ran: for TCP, the connection stayed up (no reset, no
    /// early close, no blocked send, echoes intact and in order); for UDP, no send or receive
    /// failed (a connected UDP socket reports ICMP errors such as port unreachable).
    pub connection_up: bool,
    /// The first error, if any.
    pub error: Option<String>,
    /// TCP: segments retransmitted in the client's netns while the stream ran (`RetransSegs`
    /// of `/proc/net/snmp`, a per-netns counter, so other TCP traffic of that pod counts too;
    /// see the module docs for why a busy CPU alone does not cause any). `None` for UDP, or
    /// when the counter could not be read.
    pub retransmits: Option<u64>,
    /// The longest time without an echo, from the start to the last echo.
    pub longest_gap: Duration,
    /// From the first send to the stop.
    pub duration: Duration,
}

impl StreamReport {
    /// Everything came back over a connection that stayed up, without retransmissions.
    pub fn is_clean(&self) -> bool {
        self.connection_up
            && self.lost.is_empty()
            && self.echoed == self.sent
            && self.retransmits.unwrap_or(0) == 0
    }
}

impl fmt::Display for StreamReport {
    /// `TCP x/a -> x/b 10.244.2.2:9000: 500 sent, 500 echoed, 0 lost, up, 0 retransmits,
    /// longest gap 3.1ms in 1.00s`, and the error if there was one.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} -> {} {}: {} sent, {} echoed, {} lost",
            self.protocol,
            self.from,
            self.to,
            self.addr,
            self.sent,
            self.echoed,
            self.lost.len()
        )?;
        if let (Some(first), Some(last)) = (self.lost.first(), self.lost.last()) {
            write!(f, " (seq {first}..={last})")?;
        }
        write!(f, ", {}", if self.connection_up { "up" } else { "broken" })?;
        if let Some(retransmits) = self.retransmits {
            write!(f, ", {retransmits} retransmits")?;
        }
        write!(
            f,
            ", longest gap {:.1?} in {:.2?}",
            self.longest_gap, self.duration
        )?;
        if let Some(error) = &self.error {
            write!(f, "; {error}")?;
        }
        Ok(())
    }
}

/// A running stream; [`StreamHandle::stop`] ends it. Dropping it stops it too (discarding the
/// report), so no thread is left in a lab namespace.
#[derive(Debug)]
pub struct StreamHandle {
    shared: Arc<Shared>,
    client: Option<JoinHandle<Option<StreamReport>>>,
    server: Option<JoinHandle<Option<()>>>,
}

/// What the stream's threads share.
#[derive(Debug, Default)]
struct Shared {
    /// Set by `stop`: the client stops sending.
    stop_client: AtomicBool,
    /// Set once the client is done: the server stops.
    stop_server: AtomicBool,
    /// Messages echoed so far.
    echoed: AtomicU64,
    /// Bytes echoed so far.
    bytes_echoed: AtomicU64,
}

impl StreamHandle {
    /// Messages echoed so far (to wait until traffic flows before disturbing it).
    pub fn echoed(&self) -> u64 {
        self.shared.echoed.load(Ordering::Relaxed)
    }

    /// Stops sending, waits for the last echoes (UDP: 300 ms; TCP: until every byte is back,
    /// at most 3 s), stops the echo server and reports.
    pub fn stop(mut self) -> StreamReport {
        self.finish()
            .expect("a stream is stopped only once: stop consumes the handle")
    }

    fn finish(&mut self) -> Option<StreamReport> {
        let client = self.client.take()?;
        self.shared.stop_client.store(true, Ordering::Relaxed);
        let report = client.join();
        self.shared.stop_server.store(true, Ordering::Relaxed);
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
        match report {
            Ok(report) => Some(report.expect("spawn_in_netns returns threads that entered")),
            Err(_) => panic!("the stream's client thread panicked"),
        }
    }
}

impl Drop for StreamHandle {
    fn drop(&mut self) {
        if !thread::panicking() {
            let _ = self.finish();
        } else {
            // Do not panic again while unwinding; just let the threads end.
            self.shared.stop_client.store(true, Ordering::Relaxed);
            self.shared.stop_server.store(true, Ordering::Relaxed);
        }
    }
}

/// Starts a stream from pod `from` to `to_ip:port` (an address of a pod of `lab`; `port` one
/// that the pod's own server does not listen on), sending a 16-byte message every `interval`
/// (e.g. 2 ms). Returns once the echo server listens and, for TCP, the client has connected.
pub fn start_stream(
    lab: &LabState,
    from: &PodState,
    to_ip: IpAddr,
    port: u16,
    protocol: Protocol,
    interval: Duration,
) -> Result<StreamHandle, StreamError> {
    let to = lab
        .pod_by_ip(to_ip)
        .ok_or_else(|| StreamError::UnknownAddress {
            lab: lab.name.clone(),
            ip: to_ip,
        })?;
    start_stream_via(
        from,
        to,
        SocketAddr::new(to_ip, port),
        port,
        protocol,
        interval,
    )
}

/// [`start_stream`] to pod `to` through another address: the client dials `dial:port` (a
/// Service's ClusterIP, or a node address with a nodePort as `port`), and the echo server
/// listens on `to`'s own address of the same family and `listen_port` (the Service's
/// targetPort; for a ClusterIP with port = targetPort, the same as `port`).
pub fn start_stream_via(
    from: &PodState,
    to: &PodState,
    dial: SocketAddr,
    listen_port: u16,
    protocol: Protocol,
    interval: Duration,
) -> Result<StreamHandle, StreamError> {
    if !matches!(protocol, Protocol::Tcp | Protocol::Udp) {
        return Err(StreamError::Protocol(protocol));
    }
    if interval.is_zero() {
        return Err(StreamError::ZeroInterval);
    }
    let listen = SocketAddr::new(to.ip(Family::of(&dial.ip())), listen_port);
    let addr = dial;
    let shared = Arc::new(Shared::default());

    let (ready_tx, ready_rx) = mpsc::channel();
    let echo = format!("echo-{listen_port}");
    let server = spawn_in_netns(&to.netns_path(), &to.key(), echo, {
        let shared = shared.clone();
        let pod = to.key();
        move || {
            let bound = match protocol {
                Protocol::Tcp => tcp_listener(listen).map(Echo::Tcp),
                _ => udp_bound(listen).map(Echo::Udp),
            };
            match bound {
                Ok(echo) => {
                    let _ = ready_tx.send(Ok(()));
                    echo.run(&shared);
                }
                Err(source) => {
                    let _ = ready_tx.send(Err(StreamError::Listen {
                        pod,
                        protocol,
                        addr: listen,
                        source,
                    }));
                }
            }
        }
    })?;
    let stop_server = |server: JoinHandle<Option<()>>| {
        shared.stop_server.store(true, Ordering::Relaxed);
        let _ = server.join();
    };
    match ready_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            stop_server(server);
            return Err(e);
        }
        Err(_) => panic!("the echo server thread ended without saying whether it listens"),
    }

    let client = Client {
        from: from.key(),
        to: to.key(),
        addr,
        protocol,
        interval,
        shared: shared.clone(),
    };
    let (connected_tx, connected_rx) = mpsc::channel();
    let client = match spawn_in_netns(
        &from.netns_path(),
        &from.key(),
        format!("stream-{}", dial.port()),
        move || client.run(connected_tx),
    ) {
        Ok(client) => client,
        Err(e) => {
            stop_server(server);
            return Err(e);
        }
    };
    match connected_rx.recv() {
        Ok(Ok(())) => Ok(StreamHandle {
            shared,
            client: Some(client),
            server: Some(server),
        }),
        Ok(Err(source)) => {
            let _ = client.join();
            stop_server(server);
            Err(StreamError::Connect {
                from: from.key(),
                protocol,
                addr,
                source,
            })
        }
        Err(_) => panic!("the stream's client thread ended without saying whether it connected"),
    }
}

/// Spawns a thread that enters the netns at `path` and runs `f` there; returns once the thread
/// is in the netns. The thread's result is `None` only if it could not enter, which this
/// reports as an error instead of returning the handle.
fn spawn_in_netns<T, F>(
    path: &Path,
    pod: &str,
    name: String,
    f: F,
) -> Result<JoinHandle<Option<T>>, StreamError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let netns_err = |source| StreamError::Netns {
        pod: pod.to_owned(),
        source,
    };
    let fd = open_netns(path).map_err(netns_err)?;
    let (entered_tx, entered_rx) = mpsc::channel();
    let handle = thread::Builder::new()
        .name(name)
        .spawn(move || {
            // setns only moves the calling thread, so the thread itself reports whether it got in.
            let entered = enter_netns(&fd);
            let ok = entered.is_ok();
            let _ = entered_tx.send(entered);
            ok.then(f)
        })
        .map_err(|source| StreamError::Thread { source })?;
    let entered = entered_rx
        .recv()
        .unwrap_or_else(|_| Err(io::Error::other("the thread ended early")));
    match entered {
        Ok(()) => Ok(handle),
        Err(source) => {
            let _ = handle.join();
            Err(netns_err(source))
        }
    }
}

/// A bound echo server socket.
enum Echo {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

impl Echo {
    /// Echoes until `stop_server` is set.
    fn run(self, shared: &Shared) {
        let stopped = || shared.stop_server.load(Ordering::Relaxed);
        match self {
            Echo::Tcp(listener) => {
                while !stopped() {
                    match listener.accept() {
                        Ok((stream, _)) => echo_tcp(stream, &stopped),
                        // Polled briefly: the client connects right after the server listens.
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(1))
                        }
                        Err(_) => thread::sleep(POLL),
                    }
                }
            }
            Echo::Udp(socket) => {
                let mut buf = [0u8; 2048];
                while !stopped() {
                    if let Ok((len, peer)) = socket.recv_from(&mut buf) {
                        let _ = socket.send_to(&buf[..len], peer);
                    }
                }
            }
        }
    }
}

/// Echoes one TCP connection until the client closes it or the server stops.
fn echo_tcp(mut stream: TcpStream, stopped: &dyn Fn() -> bool) {
    let setup = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_nodelay(true))
        .and_then(|()| stream.set_read_timeout(Some(POLL)))
        .and_then(|()| stream.set_write_timeout(Some(WRITE_TIMEOUT)));
    if setup.is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    while !stopped() {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(len) => {
                if stream.write_all(&buf[..len]).is_err() {
                    return;
                }
            }
            Err(e) if is_timeout(&e) => {}
            Err(_) => return,
        }
    }
}

/// A listening TCP socket on `addr` (SO_REUSEADDR, so a port can be used again at once),
/// non-blocking so that the accept loop can look at its stop flag.
fn tcp_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(16)?;
    let listener: TcpListener = socket.into();
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// A UDP socket bound to `addr`, with a short read timeout for the stop flag.
fn udp_bound(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = UdpSocket::bind(addr)?;
    socket.set_read_timeout(Some(POLL))?;
    Ok(socket)
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// The sending side of a stream, run on a thread inside the client's netns.
struct Client {
    from: String,
    to: String,
    addr: SocketAddr,
    protocol: Protocol,
    interval: Duration,
    shared: Arc<Shared>,
}

/// What the receiving thread saw.
#[derive(Debug, Default)]
struct Received {
    /// Sequence numbers echoed.
    seqs: BTreeSet<u64>,
    bytes: u64,
    longest_gap: Duration,
    error: Option<String>,
}

impl Client {
    /// Connects (reporting the outcome on `connected`), sends until stopped, drains, reports.
    fn run(self, connected: mpsc::Sender<io::Result<()>>) -> StreamReport {
        match self.protocol {
            Protocol::Tcp => self.run_tcp(connected),
            _ => self.run_udp(connected),
        }
    }

    fn run_tcp(self, connected: mpsc::Sender<io::Result<()>>) -> StreamReport {
        let before = tcp_retransmits();
        let setup = TcpStream::connect_timeout(&self.addr, CONNECT_TIMEOUT).and_then(|stream| {
            stream.set_nodelay(true)?;
            stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
            stream.set_read_timeout(Some(POLL))?;
            let reader = stream.try_clone()?;
            Ok((stream, reader))
        });
        let (mut stream, mut reader) = match setup {
            Ok(pair) => pair,
            Err(e) => {
                let _ = connected.send(Err(e));
                return self.report(0, 0, Received::default(), None, Duration::ZERO);
            }
        };
        let _ = connected.send(Ok(()));

        let start = Instant::now();
        let done = Arc::new(AtomicBool::new(false));
        let receiver = {
            let (shared, done) = (self.shared.clone(), done.clone());
            thread::spawn(move || receive_tcp(&mut reader, &shared, &done, start))
        };
        let mut send_error = None;
        let sent = self.send_loop(start, true, |message| {
            stream.write_all(message).map_err(|e| {
                send_error = Some(format!("send: {e}"));
            })
        });
        let bytes_sent = sent * MESSAGE_LEN as u64;
        let duration = start.elapsed();

        // Wait for every byte to come back (unless the connection is known to be broken).
        let deadline = Instant::now() + TCP_DRAIN;
        while send_error.is_none()
            && !receiver.is_finished()
            && self.shared.bytes_echoed.load(Ordering::Relaxed) < bytes_sent
            && Instant::now() < deadline
        {
            thread::sleep(Duration::from_millis(2));
        }
        let after = tcp_retransmits();
        done.store(true, Ordering::Relaxed);
        let _ = stream.shutdown(Shutdown::Both);
        let mut received = receiver
            .join()
            .unwrap_or_else(|_| panic!("the stream's receiver thread panicked"));
        if received.error.is_none() {
            received.error = send_error;
        } else if let Some(send_error) = send_error {
            received.error = Some(format!(
                "{}; {send_error}",
                received.error.unwrap_or_default()
            ));
        }
        if received.error.is_none() && received.bytes < bytes_sent {
            received.error = Some(format!(
                "{} of {bytes_sent} bytes echoed {TCP_DRAIN:?} after the last send",
                received.bytes
            ));
        }
        let retransmits = before.zip(after).map(|(b, a)| a.saturating_sub(b));
        self.report(sent, bytes_sent, received, retransmits, duration)
    }

    fn run_udp(self, connected: mpsc::Sender<io::Result<()>>) -> StreamReport {
        let local: SocketAddr = match self.addr {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let setup = UdpSocket::bind(local).and_then(|socket| {
            socket.connect(self.addr)?;
            socket.set_read_timeout(Some(POLL))?;
            socket.set_write_timeout(Some(WRITE_TIMEOUT))?;
            let reader = socket.try_clone()?;
            Ok((socket, reader))
        });
        let (socket, reader) = match setup {
            Ok(pair) => pair,
            Err(e) => {
                let _ = connected.send(Err(e));
                return self.report(0, 0, Received::default(), None, Duration::ZERO);
            }
        };
        let _ = connected.send(Ok(()));

        let start = Instant::now();
        let done = Arc::new(AtomicBool::new(false));
        let receiver = {
            let (shared, done) = (self.shared.clone(), done.clone());
            thread::spawn(move || receive_udp(&reader, &shared, &done, start))
        };
        let mut send_error = None;
        // A failed send (such as ECONNREFUSED after an ICMP port unreachable) loses that
        // message but not the stream: UDP flows outlive such errors.
        let sent = self.send_loop(start, false, |message| {
            if let Err(e) = socket.send(message) {
                send_error.get_or_insert_with(|| format!("send: {e}"));
            }
            Ok(())
        });
        let duration = start.elapsed();

        let deadline = Instant::now() + UDP_DRAIN;
        while self.shared.echoed.load(Ordering::Relaxed) < sent && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(2));
        }
        done.store(true, Ordering::Relaxed);
        let mut received = receiver
            .join()
            .unwrap_or_else(|_| panic!("the stream's receiver thread panicked"));
        if received.error.is_none() {
            received.error = send_error;
        }
        self.report(sent, sent * MESSAGE_LEN as u64, received, None, duration)
    }

    /// Calls `send` with message 0, 1, ... every `interval` from `start` until stopped or until
    /// `send` fails; returns how many were sent. Falls behind rather than sending in bursts.
    /// With `one_in_flight`, a message is only sent once the previous one has come back.
    fn send_loop(
        &self,
        start: Instant,
        one_in_flight: bool,
        mut send: impl FnMut(&[u8]) -> Result<(), ()>,
    ) -> u64 {
        let mut seq = 0u64;
        let mut next = start;
        loop {
            // Wait for the tick (and the previous echo), looking at the stop flag meanwhile.
            loop {
                if self.shared.stop_client.load(Ordering::Relaxed) {
                    return seq;
                }
                let now = Instant::now();
                if now < next {
                    thread::sleep((next - now).min(POLL));
                } else if one_in_flight && self.shared.echoed.load(Ordering::Relaxed) < seq {
                    thread::sleep(Duration::from_millis(1));
                } else {
                    break;
                }
            }
            if send(&message(seq)).is_err() {
                return seq;
            }
            seq += 1;
            next += self.interval;
            next = next.max(Instant::now());
        }
    }

    fn report(
        &self,
        sent: u64,
        bytes_sent: u64,
        received: Received,
        retransmits: Option<u64>,
        duration: Duration,
    ) -> StreamReport {
        let lost: Vec<u64> = (0..sent).filter(|s| !received.seqs.contains(s)).collect();
        StreamReport {
            from: self.from.clone(),
            to: self.to.clone(),
            addr: self.addr,
            protocol: self.protocol,
            sent,
            echoed: received.seqs.range(..sent).count() as u64,
            lost,
            bytes_sent,
            bytes_echoed: received.bytes,
            connection_up: received.error.is_none(),
            error: received.error,
            retransmits,
            longest_gap: received.longest_gap,
            duration,
        }
    }
}

/// Message `seq`.
fn message(seq: u64) -> [u8; MESSAGE_LEN] {
    let mut message = [0u8; MESSAGE_LEN];
    message[..8].copy_from_slice(&seq.to_be_bytes());
    message[8..].copy_from_slice(MAGIC);
    message
}

/// The sequence number of a message, if it is one.
fn parse_message(bytes: &[u8]) -> Option<u64> {
    (bytes.len() == MESSAGE_LEN && &bytes[8..] == MAGIC)
        .then(|| u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes")))
}

/// Records one echo: its sequence number, the gap since the previous one, the counters.
fn record(received: &mut Received, shared: &Shared, seq: u64, last: &mut Instant) {
    let now = Instant::now();
    received.longest_gap = received.longest_gap.max(now - *last);
    *last = now;
    if received.seqs.insert(seq) {
        shared.echoed.fetch_add(1, Ordering::Relaxed);
    }
}

/// Reads TCP echoes until `done`; they must come back whole and in order.
fn receive_tcp(
    stream: &mut TcpStream,
    shared: &Shared,
    done: &AtomicBool,
    start: Instant,
) -> Received {
    let mut received = Received::default();
    let mut last = start;
    let mut buf = [0u8; 4096];
    let mut pending = Vec::new();
    let mut expected = 0u64;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => {
                if !done.load(Ordering::Relaxed) {
                    received.error = Some("the server closed the connection".to_owned());
                }
                break;
            }
            Ok(len) => {
                received.bytes += len as u64;
                shared.bytes_echoed.fetch_add(len as u64, Ordering::Relaxed);
                pending.extend_from_slice(&buf[..len]);
                let whole = pending.len() / MESSAGE_LEN * MESSAGE_LEN;
                for chunk in pending[..whole].chunks(MESSAGE_LEN) {
                    match parse_message(chunk) {
                        Some(seq) if seq == expected => {
                            record(&mut received, shared, seq, &mut last);
                            expected += 1;
                        }
                        _ => {
                            received.error.get_or_insert_with(|| {
                                format!("echo of message {expected} garbled or out of order")
                            });
                        }
                    }
                }
                pending.drain(..whole);
            }
            Err(e) if is_timeout(&e) => {
                if done.load(Ordering::Relaxed) {
                    break;
                }
            }
            Err(e) => {
                if !done.load(Ordering::Relaxed) {
                    received.error = Some(format!("receive: {e}"));
                }
                break;
            }
        }
    }
    received
}

/// Reads UDP echoes until `done`.
fn receive_udp(socket: &UdpSocket, shared: &Shared, done: &AtomicBool, start: Instant) -> Received {
    let mut received = Received::default();
    let mut last = start;
    let mut buf = [0u8; 2048];
    while !done.load(Ordering::Relaxed) {
        match socket.recv(&mut buf) {
            Ok(len) => {
                received.bytes += len as u64;
                shared.bytes_echoed.fetch_add(len as u64, Ordering::Relaxed);
                if let Some(seq) = parse_message(&buf[..len]) {
                    record(&mut received, shared, seq, &mut last);
                }
            }
            Err(e) if is_timeout(&e) => {}
            Err(e) => {
                // ECONNREFUSED and friends: note the first, keep listening.
                received
                    .error
                    .get_or_insert_with(|| format!("receive: {e}"));
                thread::sleep(POLL);
            }
        }
    }
    received
}

/// `RetransSegs` of the TCP MIB of the calling thread's netns. `/proc/net` is
/// `/proc/self/net`, which shows the netns of the process's main thread; a thread that entered
/// another netns must read `/proc/thread-self/net`.
fn tcp_retransmits() -> Option<u64> {
    let snmp = fs::read_to_string("/proc/thread-self/net/snmp").ok()?;
    snmp_counter(&snmp, "Tcp", "RetransSegs")
}

/// A counter of `/proc/net/snmp`, where each group is a line of names and a line of values,
/// both starting with `<group>:`.
fn snmp_counter(snmp: &str, group: &str, name: &str) -> Option<u64> {
    let prefix = format!("{group}:");
    let mut lines = snmp.lines().filter(|l| l.starts_with(&prefix));
    let names = lines.next()?;
    let values = lines.next()?;
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        for seq in [0, 1, 255, 256, u64::MAX] {
            assert_eq!(parse_message(&message(seq)), Some(seq));
        }
        assert_eq!(parse_message(b"0123456789abcdef"), None);
        assert_eq!(parse_message(&message(1)[..15]), None);
    }

    #[test]
    fn reads_snmp_counters() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                    Tcp: RtoAlgorithm ActiveOpens RetransSegs InErrs\nTcp: 1 7 42 0\n\
                    Udp: InDatagrams\nUdp: 5\n";
        assert_eq!(snmp_counter(snmp, "Tcp", "RetransSegs"), Some(42));
        assert_eq!(snmp_counter(snmp, "Tcp", "ActiveOpens"), Some(7));
        assert_eq!(snmp_counter(snmp, "Udp", "InDatagrams"), Some(5));
        assert_eq!(snmp_counter(snmp, "Tcp", "Nope"), None);
        assert_eq!(snmp_counter(snmp, "Icmp", "InMsgs"), None);
    }

    #[test]
    fn this_netns_has_a_retransmission_counter() {
        assert!(tcp_retransmits().is_some());
    }

    #[test]
    fn report_is_clean_only_without_losses_and_retransmissions() {
        let report = StreamReport {
            from: "x/a".into(),
            to: "x/b".into(),
            addr: "10.244.2.2:9000".parse().expect("addr"),
            protocol: Protocol::Tcp,
            sent: 3,
            echoed: 3,
            lost: vec![],
            bytes_sent: 48,
            bytes_echoed: 48,
            connection_up: true,
            error: None,
            retransmits: Some(0),
            longest_gap: Duration::from_millis(3),
            duration: Duration::from_secs(1),
        };
        assert!(report.is_clean(), "{report}");
        let retransmitted = StreamReport {
            retransmits: Some(1),
            ..report.clone()
        };
        assert!(!retransmitted.is_clean());
        let lossy = StreamReport {
            echoed: 2,
            lost: vec![2],
            ..report
        };
        assert!(!lossy.is_clean());
        assert!(lossy.to_string().contains("1 lost (seq 2..=2)"), "{lossy}");
    }
}
