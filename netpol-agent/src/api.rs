//! The agent's small HTTP API: `/healthz`, `/readyz`, `/metrics` (on a TCP
//! address for Prometheus and the kubelet), and `/status`, `/explain`,
//! `/flows` for the `netpol-agent` tools. The tools talk to the agent over a
//! unix socket in its state directory, which works from any network
//! namespace.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use netpol_common::{FlowKey, FlowValue, map_names, protocol_name, reason_name, verdict_name};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncWrite, AsyncWriteExt as _, BufReader};

use crate::{agent::Status, explain, flowlog::Names, metrics::Metrics, pins::Pins};

/// What the API serves, updated by the run loop after each sync.
pub struct Shared {
    pub status: Status,
    pub names: Arc<Names>,
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

fn route(shared: &SharedRef, path: &str) -> Response {
    let (path, q) = path.split_once('?').unwrap_or((path, ""));
    let s = shared.lock().expect("api state lock");
    match path {
        "/healthz" => ok("text/plain", "ok\n".into()),
        "/readyz" => {
            if s.status.synced {
                ok("text/plain", "ready\n".into())
            } else {
                err(503, "not synced yet")
            }
        }
        "/metrics" => ok(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            s.metrics.render(),
        ),
        "/status" => ok(
            "application/json",
            serde_json::to_string_pretty(&s.status).unwrap_or_default(),
        ),
        "/explain" => {
            let q = query(q);
            let args = (|| -> Result<_, String> {
                let from: explain::Endpoint = q.get("from").ok_or("missing from")?.parse()?;
                let to: explain::Endpoint = q.get("to").ok_or("missing to")?.parse()?;
                let (port, proto) = explain::parse_port(q.get("port").ok_or("missing port")?)?;
                Ok((from, to, port, proto))
            })();
            match args.and_then(|(from, to, port, proto)| {
                explain::explain(&s.names.cluster, &s.names.compiled, &from, &to, port, proto)
            }) {
                Ok(e) => ok(
                    "application/json",
                    serde_json::to_string_pretty(&e).unwrap_or_default(),
                ),
                Err(e) => err(400, e),
            }
        }
        "/flows" => match read_flows(&s.pins, &s.names) {
            Ok(f) => ok(
                "application/json",
                serde_json::to_string_pretty(&f).unwrap_or_default(),
            ),
            Err(e) => err(500, e),
        },
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

async fn handle<S: AsyncRead + AsyncWrite + Unpin>(stream: S, shared: SharedRef) {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    if reader.read_line(&mut line).await.is_err() {
        return;
    }
    // Skip the headers.
    loop {
        let mut h = String::new();
        match reader.read_line(&mut h).await {
            Ok(0) | Err(_) => break,
            Ok(_) if h == "\r\n" || h == "\n" => break,
            Ok(_) => {}
        }
    }
    let mut parts = line.split_whitespace();
    let resp = match (parts.next(), parts.next()) {
        (Some("GET"), Some(path)) => route(&shared, path),
        _ => err(405, "only GET"),
    };
    let reason = match resp.code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let head = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        resp.code,
        resp.content_type,
        resp.body.len()
    );
    let mut stream = reader.into_inner();
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(resp.body.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Serve on a unix socket (replacing a stale one).
pub async fn serve_unix(path: PathBuf, shared: SharedRef) -> std::io::Result<()> {
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(handle(stream, shared.clone()));
    }
}

/// Serve on a TCP address (health, readiness and metrics).
pub async fn serve_tcp(
    listener: tokio::net::TcpListener,
    shared: SharedRef,
) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(handle(stream, shared.clone()));
    }
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
