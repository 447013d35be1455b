//! The operator surface as an attacker on the network or an unprivileged
//! user on the node sees it: the TCP listener answers health, readiness and
//! metrics and nothing else; the unix socket that answers `explain`, `flows`
//! and `status` is the owner's only; neither listener can be held or
//! flooded. No root needed: the listeners run on loopback and in a temporary
//! directory.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use netpol_agent::{
    agent::Status,
    api::{self, Limits, Shared, SharedRef},
    flowlog::Names,
    metrics::Metrics,
    pins::Pins,
};

fn shared() -> SharedRef {
    Arc::new(Mutex::new(Shared {
        status: Status {
            node: "node-a".into(),
            synced: true,
            ..Status::default()
        },
        names: Arc::new(std::sync::RwLock::new(Names::default())),
        metrics: Metrics::new(),
        pins: Pins::new("/nonexistent/netpol-test"),
    }))
}

fn limits() -> Limits {
    Limits {
        max_request_bytes: 8 * 1024,
        read_timeout: Duration::from_millis(300),
        write_timeout: Duration::from_secs(2),
        max_connections: 4,
    }
}

/// A runtime with the TCP listener on a loopback port and the unix socket in
/// a temporary directory.
struct Agent {
    _rt: tokio::runtime::Runtime,
    tcp: SocketAddr,
    state_dir: PathBuf,
    shared: SharedRef,
}

impl Agent {
    fn start(name: &str, limits: Limits) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let state_dir =
            std::env::temp_dir().join(format!("netpol-ops-api-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state_dir);
        std::fs::create_dir_all(&state_dir).expect("state dir");
        let shared = shared();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("binding loopback");
        let tcp = listener.local_addr().expect("local addr");
        rt.spawn(api::serve_tcp(listener, shared.clone(), limits));
        rt.spawn(api::serve_unix(
            api::socket_path(&state_dir),
            shared.clone(),
            limits,
        ));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !api::socket_path(&state_dir).exists() {
            assert!(Instant::now() < deadline, "the unix socket never appeared");
            std::thread::sleep(Duration::from_millis(10));
        }
        Self {
            _rt: rt,
            tcp,
            state_dir,
            shared,
        }
    }

    fn tcp_get(&self, path: &str) -> (u16, String) {
        raw_tcp(
            self.tcp,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        )
    }

    fn metrics(&self) -> String {
        self.shared.lock().unwrap().metrics.render()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

fn parse_response(buf: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(buf).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("malformed response {text:?}"));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("malformed status line {head:?}"));
    (code, body.to_string())
}

fn raw_tcp(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connecting");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The server may answer and close before it has read everything sent.
    let _ = s.write_all(request);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    parse_response(&buf)
}

#[test]
fn tcp_serves_only_health_readiness_and_metrics() {
    let agent = Agent::start("routes", limits());
    assert_eq!(agent.tcp_get("/healthz").0, 200);
    assert_eq!(agent.tcp_get("/readyz").0, 200);
    let (code, body) = agent.tcp_get("/metrics");
    assert_eq!(code, 200);
    assert!(body.contains("netpol_endpoints"), "{body}");
    // What names pods, policies and live flows is not for the network.
    for path in [
        "/explain?from=x/a&to=x/b&port=80/TCP",
        "/explain",
        "/flows",
        "/status",
        "/status?x",
    ] {
        let (code, body) = agent.tcp_get(path);
        assert_eq!(code, 404, "GET {path} over TCP: {code} {body}");
    }
    // Over the unix socket they answer (explain with no arguments: 400, not
    // 404; flows: 500, there is no pinned flow table here).
    let (code, body) = api::get(&agent.state_dir, "/status").expect("status over the socket");
    assert_eq!(code, 200);
    assert!(body.contains("node-a"), "{body}");
    let (code, _) = api::get(&agent.state_dir, "/explain").expect("explain over the socket");
    assert_eq!(code, 400);
    let (code, _) = api::get(&agent.state_dir, "/flows").expect("flows over the socket");
    assert_eq!(code, 500);
    let (code, _) = api::get(&agent.state_dir, "/healthz").expect("healthz over the socket");
    assert_eq!(code, 200);
}

#[test]
fn the_unix_socket_is_created_0600_replacing_a_stale_one() {
    let dir = std::env::temp_dir().join(format!("netpol-ops-api-mode-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // A world-writable leftover at the path.
    let path = api::socket_path(&dir);
    std::fs::write(&path, "stale").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let agent = Agent::start("mode", limits());
    let mode = std::fs::metadata(api::socket_path(&agent.state_dir))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {:o}", mode & 0o777);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(async { api::bind_unix(&path) })
        .expect("binding");
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert!(
        std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()),
        "the stale file was replaced by the socket"
    );
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    drop(listener);
    // No temporary directory is left behind.
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("api.sock")]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_oversized_request_is_refused_without_reading_it_all() {
    let agent = Agent::start("oversized", limits());
    // A 1 GiB request would be streamed forever; the agent answers 431 after
    // 8 KiB and closes. Send 64 KiB of headers.
    let mut req = b"GET /metrics HTTP/1.1\r\n".to_vec();
    while req.len() < 64 * 1024 {
        req.extend_from_slice(
            b"X-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n",
        );
    }
    req.extend_from_slice(b"\r\n");
    let (code, _) = raw_tcp(agent.tcp, &req);
    assert_eq!(code, 431);
    // One long request line without any newline, over the socket too.
    let mut s = UnixStream::connect(api::socket_path(&agent.state_dir)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(&vec![b'A'; 32 * 1024]);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert_eq!(parse_response(&buf).0, 431);
    // A body is refused too (no route takes one).
    let (code, _) = raw_tcp(
        agent.tcp,
        b"GET /metrics HTTP/1.1\r\nContent-Length: 1073741824\r\n\r\n",
    );
    assert_eq!(code, 413);
    let m = agent.metrics();
    assert!(
        m.contains(r#"netpol_api_refused_total{listener="tcp",reason="too_large"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"netpol_api_refused_total{listener="unix",reason="too_large"} 1"#),
        "{m}"
    );
    assert_eq!(agent.tcp_get("/healthz").0, 200, "still serving");
}

#[test]
fn slow_clients_time_out_and_cannot_hold_every_connection() {
    let agent = Agent::start("slowloris", limits());
    // Slowloris: as many connections as the limit, each sending a byte now
    // and then and never finishing its headers.
    let mut slow: Vec<TcpStream> = (0..limits().max_connections)
        .map(|_| {
            let mut s = TcpStream::connect(agent.tcp).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nX-A: ").unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    // Every slot is taken: one more is closed at once, unanswered.
    let mut extra = TcpStream::connect(agent.tcp).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = extra.write_all(b"GET /healthz HTTP/1.1\r\n\r\n");
    let mut buf = Vec::new();
    let _ = extra.read_to_end(&mut buf);
    assert!(buf.is_empty(), "served beyond the limit: {buf:?}");
    for s in &mut slow {
        let _ = s.write_all(b"a");
    }
    // The slow ones are cut off at the read timeout (300 ms here) with 408,
    // whatever they keep sending (the client gives up after 5 s: an answer
    // before then is the server's timeout).
    for mut s in slow {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        assert_eq!(parse_response(&buf).0, 408);
    }
    // And the listener serves again, once the closed connections' tasks have
    // given their slots back.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = TcpStream::connect(agent.tcp).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(b"GET /healthz HTTP/1.1\r\n\r\n");
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        if !buf.is_empty() {
            assert_eq!(parse_response(&buf).0, 200);
            break;
        }
        assert!(Instant::now() < deadline, "the listener never served again");
        std::thread::sleep(Duration::from_millis(20));
    }
    let m = agent.metrics();
    assert!(
        m.contains(r#"netpol_api_refused_total{listener="tcp",reason="busy"}"#),
        "{m}"
    );
    assert!(
        m.contains(r#"netpol_api_refused_total{listener="tcp",reason="timeout"} 4"#),
        "{m}"
    );
}

/// `/readyz` names why the agent is not ready (what the status says); `/healthz` fails once
/// the run loop has not written a status for longer than `health::STUCK_AFTER`.
#[test]
fn readiness_names_its_reasons_and_health_sees_a_stuck_loop() {
    let agent = Agent::start("health", limits());
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    {
        let mut sh = agent.shared.lock().unwrap();
        sh.status.written_unix_ms = now_ms;
        sh.status.not_ready = vec![
            "the Pod watch has failed for 75s (more than 60s): the enforced state may be stale"
                .into(),
            "1 pod veths carry no programs: cali1".into(),
        ];
    }
    let (code, body) = agent.tcp_get("/readyz");
    assert_eq!(code, 503);
    assert!(body.contains("Pod watch has failed for 75s"), "{body}");
    assert!(body.contains("no programs: cali1"), "{body}");
    assert_eq!(
        agent.tcp_get("/healthz").0,
        200,
        "a fresh status: the loop turns"
    );

    agent.shared.lock().unwrap().status.not_ready.clear();
    assert_eq!(agent.tcp_get("/readyz").0, 200);
    agent.shared.lock().unwrap().status.synced = false;
    let (code, body) = agent.tcp_get("/readyz");
    assert_eq!(code, 503);
    assert!(body.contains("not synced"), "{body}");

    let stale = now_ms - netpol_agent::health::STUCK_AFTER.as_millis() as u64 - 5_000;
    agent.shared.lock().unwrap().status.written_unix_ms = stale;
    let (code, body) = agent.tcp_get("/healthz");
    assert_eq!(code, 503);
    assert!(body.contains("run loop is stuck"), "{body}");
}
