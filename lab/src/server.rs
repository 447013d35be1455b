//! The per-pod server (`netpol-lab serve`), like upstream agnhost `serve-hostname`: it listens on
//! IPv4 and IPv6 for every TCP and UDP port and answers every connection or datagram with the
//! pod's `namespace/name` and a newline.

use std::{
    env, fs,
    io::{self, BufRead, BufReader, Write},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket},
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use socket2::{Domain, Socket, Type};

use crate::{netns::enter_netns_before_exec, state::PodState};

/// What the server prints on stdout once every socket is bound.
const READY: &str = "ready";

/// Env var naming the `netpol-lab` binary used to start servers (see [`server_exe`]).
pub const SERVER_EXE_ENV: &str = "NETPOL_LAB_BIN";

/// Errors starting or running a server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(
        "cannot find the netpol-lab binary to run pod servers: set {SERVER_EXE_ENV} or build it \
         (cargo build -p netpol-lab); looked at {looked:?}"
    )]
    NoBinary { looked: Vec<PathBuf> },
    #[error("cannot bind {protocol} {addr}: {source}")]
    Bind {
        protocol: &'static str,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the server of pod {pod}: {source}")]
    Spawn {
        pod: String,
        #[source]
        source: io::Error,
    },
    #[error("the server of pod {pod} did not become ready; its log says: {log}")]
    NotReady { pod: String, log: String },
}

/// Finds the `netpol-lab` binary that runs pod servers: `$NETPOL_LAB_BIN`; this executable if
/// it is `netpol-lab`; else `netpol-lab` next to this executable or one directory up (where
/// cargo puts binaries relative to test executables in `target/<profile>/deps`).
pub fn server_exe() -> Result<PathBuf, ServerError> {
    if let Some(path) = env::var_os(SERVER_EXE_ENV) {
        return Ok(PathBuf::from(path));
    }
    let mut looked = Vec::new();
    if let Ok(me) = env::current_exe() {
        if me.file_name().is_some_and(|n| n == "netpol-lab") {
            return Ok(me);
        }
        let dirs = me
            .parent()
            .into_iter()
            .chain(me.parent().and_then(|d| d.parent()));
        for dir in dirs {
            let candidate = dir.join("netpol-lab");
            if candidate.is_file() {
                return Ok(candidate);
            }
            looked.push(candidate);
        }
    }
    Err(ServerError::NoBinary { looked })
}

/// A running server process, started by [`spawn`], not yet known to be ready.
pub struct Starting {
    pod: String,
    log: PathBuf,
    child: std::process::Child,
}

/// Starts `exe serve` for `pod` inside the pod's netns, detached (own session, stdin closed,
/// stderr appended to `log`). Call [`Starting::wait_ready`] afterwards; starting every server
/// first and then waiting lets them bind in parallel.
pub fn spawn(exe: &std::path::Path, pod: &PodState, log: PathBuf) -> Result<Starting, ServerError> {
    let key = pod.key();
    let spawn_err = |source| ServerError::Spawn {
        pod: key.clone(),
        source,
    };
    if let Some(dir) = log.parent() {
        fs::create_dir_all(dir).map_err(spawn_err)?;
    }
    let stderr = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(spawn_err)?;
    let join = |ports: Vec<u16>| {
        ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut command = Command::new(exe);
    command.arg("serve").arg("--name").arg(&key);
    // A pod may have ports of one protocol only: an empty list is no flag
    // at all (clap would refuse `--udp ''`).
    for (flag, protocol) in [
        ("--tcp", crate::spec::Protocol::Tcp),
        ("--udp", crate::spec::Protocol::Udp),
    ] {
        let ports = pod.ports_of(protocol);
        if !ports.is_empty() {
            command.arg(flag).arg(join(ports));
        }
    }
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr);
    enter_netns_before_exec(&mut command, &pod.netns_path());
    // SAFETY: setsid is async-signal-safe; it detaches the server from our session so that it
    // outlives `netpol-lab up` and ignores the terminal's signals.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().map_err(spawn_err)?;
    Ok(Starting {
        pod: key,
        log,
        child,
    })
}

impl Starting {
    /// Waits until the server reports that all its sockets are bound; returns its pid.
    pub fn wait_ready(mut self, timeout: Duration) -> Result<u32, ServerError> {
        let pid = self.child.id();
        let stdout = self.child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            let ok = BufReader::new(stdout).read_line(&mut line).is_ok() && line.trim() == READY;
            // The receiver may have timed out and gone.
            let _ = tx.send(ok);
        });
        if rx.recv_timeout(timeout).unwrap_or(false) {
            Ok(pid)
        } else {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let log = fs::read_to_string(&self.log).unwrap_or_default();
            Err(ServerError::NotReady {
                pod: self.pod,
                log: log.trim().to_owned(),
            })
        }
    }
}

/// Runs the server in the current process: binds every port on `0.0.0.0` and `[::]`
/// (IPV6_V6ONLY, so both families have their own socket), prints `ready` on stdout, detaches
/// stdout, then answers forever. Returns only if binding fails.
pub fn serve(name: &str, tcp: &[u16], udp: &[u16]) -> Result<(), ServerError> {
    let answer: &'static [u8] = format!("{name}\n").into_bytes().leak();
    let mut tcp_listeners = Vec::new();
    let mut udp_sockets = Vec::new();
    for &port in tcp {
        for addr in wildcard_addrs(port) {
            tcp_listeners.push(bind(addr, Type::STREAM)?.into());
        }
    }
    for &port in udp {
        for addr in wildcard_addrs(port) {
            udp_sockets.push(bind(addr, Type::DGRAM)?.into());
        }
    }
    println!("{READY}");
    let _ = io::stdout().flush();
    detach_stdout();

    let mut threads = Vec::new();
    for listener in tcp_listeners {
        threads.push(thread::spawn(move || serve_tcp(listener, answer)));
    }
    for socket in udp_sockets {
        threads.push(thread::spawn(move || serve_udp(socket, answer)));
    }
    for thread in threads {
        let _ = thread.join();
    }
    Ok(())
}

fn wildcard_addrs(port: u16) -> [SocketAddr; 2] {
    [
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
    ]
}

fn bind(addr: SocketAddr, ty: Type) -> Result<Socket, ServerError> {
    let protocol = if ty == Type::STREAM { "TCP" } else { "UDP" };
    let err = |source| ServerError::Bind {
        protocol,
        addr,
        source,
    };
    let socket = Socket::new(Domain::for_address(addr), ty, None).map_err(err)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true).map_err(err)?;
    }
    socket.set_reuse_address(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    if ty == Type::STREAM {
        socket.listen(1024).map_err(err)?;
    }
    Ok(socket)
}

/// Points stdout at /dev/null so the parent's "ready" pipe is not held open.
fn detach_stdout() {
    if let Ok(null) = fs::OpenOptions::new().write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        // SAFETY: dup2 onto fd 1 only replaces our own stdout descriptor.
        unsafe { libc::dup2(null.as_raw_fd(), libc::STDOUT_FILENO) };
    }
}

fn serve_tcp(listener: TcpListener, answer: &[u8]) {
    loop {
        match listener.accept() {
            Ok((mut stream, _)) => {
                // A fresh socket's send buffer always takes a few bytes: this never blocks long.
                let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
                let _ = stream.write_all(answer);
                let _ = stream.shutdown(std::net::Shutdown::Write);
            }
            Err(e) => {
                eprintln!("accept: {e}");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn serve_udp(socket: UdpSocket, answer: &[u8]) {
    let mut buf = [0u8; 2048];
    loop {
        match socket.recv_from(&mut buf) {
            Ok((_, peer)) => {
                if let Err(e) = socket.send_to(answer, peer) {
                    eprintln!("send to {peer}: {e}");
                }
            }
            Err(e) => {
                eprintln!("recv: {e}");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}
