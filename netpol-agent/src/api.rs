//! The agent's small HTTP API. The TCP address (`--metrics-addr`, for
//! Prometheus and the kubelet) serves `/healthz`, `/readyz` and `/metrics`
//! only. The unix socket in the state directory, created mode 0600, serves
//! those and `/status`, `/explain` and `/flows` for the `netpol-agent`
//! tools: they name pods, policies and live flows, which is for the node's
//! root only. A unix socket also works from any network namespace.
//!
//! Both listeners bound what a client can cost (see [`Limits`]): the request
//! line and headers are at most 8 KiB and must arrive within 5 s, no request
//! has a body, the response must be taken within 10 s, and at most 32
//! connections are served at once per listener.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use netpol_common::{FlowKey, FlowValue, map_names, protocol_name, reason_name, verdict_name};
use serde::Serialize;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    sync::Semaphore,
};

use crate::{
    agent::Status,
    explain,
    flowlog::{Names, SharedNames},
    metrics::Metrics,
    pins::Pins,
};

/// What the API serves, updated by the run loop after each sync.
pub struct Shared {
    pub status: Status,
    /// Read under its lock, briefly: the run loop skips an update while a
    /// reader holds it (and applies it with the next).
    pub names: SharedNames,
    pub metrics: Metrics,
    pub pins: Pins,
}

pub type SharedRef = Arc<Mutex<Shared>>;

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("api.sock")
}

struct Response {
    code: u16,
    content_type: &'static str,
    body: String,
}

fn ok(content_type: &'static str, body: String) -> Response {
    Response {
        code: 200,
        content_type,
        body,
    }
}

fn err(code: u16, body: impl Into<String>) -> Response {
    Response {
        code,
        content_type: "text/plain; charset=utf-8",
        body: body.into() + "\n",
    }
}

fn query(q: &str) -> BTreeMap<String, String> {
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), percent_decode(v)))
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..(i + 3).min(s.len())], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Which routes a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    /// `--metrics-addr`, reachable from the network (Prometheus, the
    /// kubelet's probes): `/healthz`, `/readyz` and `/metrics` only.
    Tcp,
    /// The unix socket in the state directory, mode 0600 (root on the node):
    /// everything, including `/status`, `/explain` and `/flows`, which tell
    /// who talks to whom.
    Unix,
}

impl Listener {
    fn name(self) -> &'static str {
        match self {
            Listener::Tcp => "tcp",
            Listener::Unix => "unix",
        }
    }
}

/// What one connection may cost the agent.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Request line and headers together (no request has a body).
    pub max_request_bytes: usize,
    /// The whole request must have arrived by then (slowloris).
    pub read_timeout: Duration,
    /// The whole response must have been taken by then (a client that does
    /// not read).
    pub write_timeout: Duration,
    /// Connections served at once on one listener; more are closed at once.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request_bytes: 8 * 1024,
            read_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
            max_connections: 32,
        }
    }
}

fn route(shared: &SharedRef, listener: Listener, path: &str) -> Response {
    let (path, q) = path.split_once('?').unwrap_or((path, ""));
    // The lock is held only to copy what a route needs: the run loop takes
    // it after every sync.
    let lock = || shared.lock().expect("api state lock");
    match (listener, path) {
        (_, "/healthz") => {
            let written = lock().status.written_unix_ms;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            if crate::health::stuck(written, now) {
                err(
                    503,
                    format!(
                        "the run loop is stuck: no status for {} s",
                        now.saturating_sub(written) / 1000
                    ),
                )
            } else {
                ok("text/plain", "ok\n".into())
            }
        }
        (_, "/readyz") => {
            let st = lock().status.clone();
            if !st.synced {
                err(503, "not synced yet")
            } else if !st.not_ready.is_empty() {
                err(503, st.not_ready.join("\n"))
            } else {
                ok("text/plain", "ready\n".into())
            }
        }
        (_, "/metrics") => ok(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            lock().metrics.render(),
        ),
        (Listener::Unix, "/status") => {
            let status = lock().status.clone();
            ok(
                "application/json",
                serde_json::to_string_pretty(&status).unwrap_or_default(),
            )
        }
        (Listener::Unix, "/explain") => {
            let q = query(q);
            let args = (|| -> Result<_, String> {
                let from: explain::Endpoint = q.get("from").ok_or("missing from")?.parse()?;
                let to: explain::Endpoint = q.get("to").ok_or("missing to")?.parse()?;
                let (port, proto) = explain::parse_port(q.get("port").ok_or("missing port")?)?;
                Ok((from, to, port, proto))
            })();
            let names = lock().names.clone();
            let names = names.read().unwrap_or_else(|p| p.into_inner());
            match args.and_then(|(from, to, port, proto)| {
                explain::explain(&names.cluster, &names.compiled, &from, &to, port, proto)
            }) {
                Ok(e) => ok(
                    "application/json",
                    serde_json::to_string_pretty(&e).unwrap_or_default(),
                ),
                Err(e) => err(400, e),
            }
        }
        (Listener::Unix, "/flows") => {
            let (pins, names) = {
                let s = lock();
                (s.pins.clone(), s.names.clone())
            };
            match read_flows(&pins, &names.read().unwrap_or_else(|p| p.into_inner())) {
                Ok(f) => ok(
                    "application/json",
                    serde_json::to_string_pretty(&f).unwrap_or_default(),
                ),
                Err(e) => err(500, e),
            }
        }
        _ => err(404, "not found"),
    }
}

/// A flow table entry with names.
#[derive(Debug, Serialize)]
pub struct FlowEntry {
    /// The local pod (the veth's).
    pub endpoint: Option<String>,
    /// Who opened the flow: `egress` (the pod) or `ingress` (the peer).
    pub opened: &'static str,
    pub protocol: &'static str,
    pub pod: String,
    pub pod_port: u16,
    pub remote: String,
    pub remote_port: u16,
    pub verdict: &'static str,
    pub reason: &'static str,
    pub policy: Option<String>,
    pub packets_from_pod: u64,
    pub bytes_from_pod: u64,
    pub packets_to_pod: u64,
    pub bytes_to_pod: u64,
    pub generation: u32,
    pub age_ms: u64,
    pub idle_ms: u64,
}

/// Read the pinned flow table (it can be read while the datapath writes it).
pub fn read_flows(pins: &Pins, names: &Names) -> Result<Vec<FlowEntry>, String> {
    let data =
        aya::maps::MapData::from_pin(pins.map(map_names::FLOWS)).map_err(|e| e.to_string())?;
    let map = aya::maps::Map::LruHashMap(data);
    let flows: aya::maps::HashMap<_, FlowKey, FlowValue> =
        aya::maps::HashMap::try_from(&map).map_err(|e| e.to_string())?;
    let now = crate::flowlog::monotonic_ns();
    let label = |ip: std::net::IpAddr| match names.pods_by_ip.get(&ip) {
        Some(p) => format!("{p} ({ip})"),
        None => ip.to_string(),
    };
    let mut out = Vec::new();
    for kv in flows.iter() {
        let (k, v) = kv.map_err(|e| e.to_string())?;
        out.push(FlowEntry {
            endpoint: names.endpoints.get(&k.ifindex).map(|p| p.to_string()),
            opened: netpol_common::direction_name(v.origin),
            protocol: protocol_name(k.protocol),
            pod: label(k.pod_ip()),
            pod_port: k.pod_port,
            remote: label(k.remote_ip()),
            remote_port: k.remote_port,
            verdict: verdict_name(v.verdict),
            reason: reason_name(v.reason),
            policy: names
                .compiled
                .rules
                .get(&v.rule_id)
                .map(|r| format!("{}/{}", r.namespace, r.policy)),
            packets_from_pod: v.packets_from_pod,
            bytes_from_pod: v.bytes_from_pod,
            packets_to_pod: v.packets_to_pod,
            bytes_to_pod: v.bytes_to_pod,
            generation: v.generation,
            age_ms: now.saturating_sub(v.created_ns) / 1_000_000,
            idle_ms: now.saturating_sub(v.last_seen_ns) / 1_000_000,
        });
    }
    out.sort_by(|a, b| {
        (&a.endpoint, &a.remote, a.remote_port).cmp(&(&b.endpoint, &b.remote, b.remote_port))
    });
    Ok(out)
}

/// Why a request was not read.
enum ReadError {
    TooLarge,
    /// The peer closed or the connection failed: nothing to answer.
    Closed,
}

/// Read the request line and headers (up to the blank line), at most
/// `max` bytes.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S, max: usize) -> Result<String, ReadError> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = head_end(&buf) {
            buf.truncate(end);
            return Ok(String::from_utf8_lossy(&buf).into_owned());
        }
        if buf.len() > max {
            return Err(ReadError::TooLarge);
        }
        let n = stream
            .read(&mut chunk[..(max + 1 - buf.len()).min(1024)])
            .await
            .map_err(|_| ReadError::Closed)?;
        if n == 0 {
            return Err(ReadError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Where the headers end (`\r\n\r\n`, or `\n\n` from lenient clients).
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = buf.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// What a request asks, or the answer that refuses it.
fn parse_head(head: &str) -> Result<&str, Response> {
    let mut lines = head.lines();
    let mut parts = lines.next().unwrap_or_default().split_whitespace();
    let (method, path) = (parts.next(), parts.next());
    for h in lines {
        let Some((name, value)) = h.split_once(':') else {
            continue;
        };
        let name = name.trim();
        let value = value.trim();
        // No route takes a body; refuse one rather than leave it unread.
        if (name.eq_ignore_ascii_case("content-length") && value != "0")
            || name.eq_ignore_ascii_case("transfer-encoding")
        {
            return Err(err(413, "requests have no body"));
        }
    }
    match (method, path) {
        (Some("GET"), Some(path)) => Ok(path),
        _ => Err(err(405, "only GET")),
    }
}

async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    shared: SharedRef,
    listener: Listener,
    limits: Limits,
) {
    let refused = |why: &str| {
        shared
            .lock()
            .expect("api state lock")
            .metrics
            .api_refused(listener.name(), why);
    };
    let resp = match tokio::time::timeout(
        limits.read_timeout,
        read_head(&mut stream, limits.max_request_bytes),
    )
    .await
    {
        Err(_) => {
            refused("timeout");
            err(408, "request not received in time")
        }
        Ok(Err(ReadError::TooLarge)) => {
            refused("too_large");
            err(431, "request too large")
        }
        Ok(Err(ReadError::Closed)) => return,
        Ok(Ok(head)) => match parse_head(&head) {
            Ok(path) => {
                // explain and flows take time at scale: off the runtime's
                // worker so the run loop keeps going.
                let shared = shared.clone();
                let path = path.to_string();
                tokio::task::spawn_blocking(move || route(&shared, listener, &path))
                    .await
                    .unwrap_or_else(|e| err(500, e.to_string()))
            }
            Err(resp) => {
                refused("bad_request");
                resp
            }
        },
    };
    let reason = match resp.code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let head = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        resp.code,
        resp.content_type,
        resp.body.len()
    );
    let _ = tokio::time::timeout(limits.write_timeout, async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(resp.body.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
    if matches!(resp.code, 408 | 413 | 431) {
        // The client may still be sending: closing with unread data resets
        // the connection, and it would lose the answer. Discard a bounded
        // amount for a bounded time first.
        let _ = tokio::time::timeout(LINGER, async {
            let mut sink = [0u8; 4096];
            let mut left = LINGER_BYTES;
            while left > 0 {
                match stream.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        })
        .await;
    }
}

/// How long and how much a refused request is read and discarded after the
/// answer.
const LINGER: Duration = Duration::from_millis(500);
const LINGER_BYTES: usize = 256 * 1024;

/// Create the unix socket at `path` with mode 0600, replacing a stale one.
/// It is bound in a fresh 0700 directory, restricted, then renamed into
/// place, so there is no moment when another user could connect.
pub fn bind_unix(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    let parent = path.parent().unwrap_or(Path::new("."));
    // Short names: a socket path has at most 107 bytes.
    let tmp_dir = parent.join(format!(".a{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp_dir);
    std::fs::DirBuilder::new().mode(0o700).create(&tmp_dir)?;
    let tmp = tmp_dir.join("s");
    let res = (|| {
        let listener = std::os::unix::net::UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&tmp, path)?;
        listener.set_nonblocking(true)?;
        tokio::net::UnixListener::from_std(listener)
    })();
    let _ = std::fs::remove_dir_all(&tmp_dir);
    res
}

/// Serve every route on a unix socket created 0600 (replacing a stale one).
pub async fn serve_unix(path: PathBuf, shared: SharedRef, limits: Limits) -> std::io::Result<()> {
    let listener = bind_unix(&path)?;
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let (stream, _) = listener.accept().await?;
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            refuse_busy(&shared, Listener::Unix);
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            handle(stream, shared, Listener::Unix, limits).await;
            drop(permit);
        });
    }
}

/// Serve health, readiness and metrics on a TCP address.
pub async fn serve_tcp(
    listener: tokio::net::TcpListener,
    shared: SharedRef,
    limits: Limits,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            // Out of fds and the like: do not end the listener.
            Err(e) => {
                tracing::warn!("accepting on the metrics listener: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            refuse_busy(&shared, Listener::Tcp);
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            handle(stream, shared, Listener::Tcp, limits).await;
            drop(permit);
        });
    }
}

/// Every slot is taken: the new connection is closed unanswered.
fn refuse_busy(shared: &SharedRef, listener: Listener) {
    shared
        .lock()
        .expect("api state lock")
        .metrics
        .api_refused(listener.name(), "busy");
}

/// Client side for the tools: GET `path` from the agent's unix socket.
pub fn get(state_dir: &Path, path: &str) -> Result<(u16, String), String> {
    use std::io::{Read as _, Write as _};
    let sock = socket_path(state_dir);
    let mut s = std::os::unix::net::UnixStream::connect(&sock).map_err(|e| {
        format!(
            "connecting to {} (is the agent running?): {e}",
            sock.display()
        )
    })?;
    // A stuck agent must not hang the tool forever.
    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
    write!(s, "GET {path} HTTP/1.1\r\nHost: netpol\r\n\r\n").map_err(|e| e.to_string())?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).map_err(|e| e.to_string())?;
    let (head, body) = buf.split_once("\r\n\r\n").ok_or("malformed response")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("malformed status line")?;
    Ok((code, body.to_string()))
}

/// Percent-encode a query value.
pub fn encode_query(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_round_trip() {
        let q = query(&format!(
            "from={}&to={}&port={}",
            encode_query("x/a"),
            encode_query("fd00::1"),
            encode_query("80/TCP")
        ));
        assert_eq!(q["from"], "x/a");
        assert_eq!(q["to"], "fd00::1");
        assert_eq!(q["port"], "80/TCP");
        assert_eq!(percent_decode("a%20b+c"), "a b c");
    }
}
