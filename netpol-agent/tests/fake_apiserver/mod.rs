//! An in-process Kubernetes API server for the list/watch part of the API,
//! speaking the real wire format over plain HTTP/1.1 on 127.0.0.1, so a
//! `kube::Client` (and kube-runtime's watcher) can be tested against it.
//!
//! Served: `GET /api/v1/namespaces`, `/api/v1/pods`, `/api/v1/services`,
//! `/apis/networking.k8s.io/v1/networkpolicies`, `.../servicecidrs` and
//! `/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies` (a
//! cluster without that CRD: [`FakeApiServer::fail_lists`] with 404), as
//! - lists (`{"kind":"PodList","metadata":{"resourceVersion":"N"},"items":[…]}`),
//!   paginated with `limit` / `continue` (every page of one list is a snapshot
//!   at the same resourceVersion, like etcd's);
//! - watches (`watch=true&resourceVersion=N`): a chunked stream of
//!   newline-delimited `{"type":"ADDED|MODIFIED|DELETED|BOOKMARK|ERROR","object":{…}}`
//!   events, replaying what happened after `N` first. A resourceVersion older
//!   than the kind's compaction point gets the API server's answer: an
//!   `ERROR` event with a `410` Status ("too old resource version").
//!
//! One resourceVersion counter is shared by every kind (as with etcd). The
//! test changes objects ([`FakeApiServer::apply`], [`FakeApiServer::delete`]),
//! which emits watch events, and drives the failure cases: bookmarks,
//! expiring every watch with 410, compaction, failing lists, slow list pages,
//! and stopping/restarting the server on the same port.

#![allow(dead_code, reason = "each test uses a different subset")]

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::mpsc,
    task::JoinHandle,
};

/// The resources the fake serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Res {
    Namespaces,
    Pods,
    NetworkPolicies,
    Services,
    ServiceCidrs,
    ClusterNetworkPolicies,
    Nodes,
}

impl Res {
    pub const ALL: [Res; 7] = [
        Res::Namespaces,
        Res::Pods,
        Res::NetworkPolicies,
        Res::Services,
        Res::ServiceCidrs,
        Res::ClusterNetworkPolicies,
        Res::Nodes,
    ];

    fn index(self) -> usize {
        self as usize
    }
    fn path(self) -> &'static str {
        match self {
            Res::Namespaces => "/api/v1/namespaces",
            Res::Pods => "/api/v1/pods",
            Res::NetworkPolicies => "/apis/networking.k8s.io/v1/networkpolicies",
            Res::Services => "/api/v1/services",
            Res::ServiceCidrs => "/apis/networking.k8s.io/v1/servicecidrs",
            Res::ClusterNetworkPolicies => {
                "/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies"
            }
            Res::Nodes => "/api/v1/nodes",
        }
    }
    fn kind(self) -> &'static str {
        match self {
            Res::Namespaces => "Namespace",
            Res::Pods => "Pod",
            Res::NetworkPolicies => "NetworkPolicy",
            Res::Services => "Service",
            Res::ServiceCidrs => "ServiceCIDR",
            Res::ClusterNetworkPolicies => "ClusterNetworkPolicy",
            Res::Nodes => "Node",
        }
    }
    fn api_version(self) -> &'static str {
        match self {
            Res::NetworkPolicies | Res::ServiceCidrs => "networking.k8s.io/v1",
            Res::ClusterNetworkPolicies => "policy.networking.k8s.io/v1alpha2",
            _ => "v1",
        }
    }
    fn from_kind(kind: &str) -> Option<Res> {
        Res::ALL.into_iter().find(|r| r.kind() == kind)
    }
    fn from_path(path: &str) -> Option<Res> {
        Res::ALL.into_iter().find(|r| r.path() == path)
    }
}

/// What is sent to one open watch.
#[derive(Debug)]
enum Msg {
    /// One event line (without the newline).
    Event(String),
    /// End the stream (cleanly, like a watch timeout).
    End,
}

#[derive(Debug, Default)]
struct KindState {
    /// Objects by `(namespace, name)`.
    objects: BTreeMap<(String, String), Value>,
    /// Events after `compacted`, as `(resourceVersion, line)`.
    history: Vec<(u64, String)>,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted: u64,
    /// Open watches, and whether each asked for bookmarks.
    watchers: Vec<(mpsc::UnboundedSender<Msg>, bool)>,
    /// Failures to answer list requests with (HTTP code).
    fail_lists: Option<u16>,
    failed_lists: u64,
    pages_served: u64,
    lists_completed: u64,
    watches_started: u64,
}

/// A list being paged through: its resourceVersion and what is left.
#[derive(Debug)]
struct Paging {
    res: Res,
    rv: u64,
    rest: VecDeque<Value>,
}

#[derive(Debug, Default)]
struct State {
    /// Last resourceVersion issued.
    rv: u64,
    kinds: [KindState; Res::ALL.len()],
    pagings: HashMap<String, Paging>,
    next_token: u64,
    /// Delay before each list page is answered.
    page_delay: Duration,
}

impl State {
    fn kind(&mut self, res: Res) -> &mut KindState {
        &mut self.kinds[res.index()]
    }

    /// Records an event and sends it to the open watches.
    fn emit(&mut self, res: Res, event_type: &str, object: &Value) {
        let rv = self.rv;
        let line = json!({"type": event_type, "object": object}).to_string();
        let k = self.kind(res);
        k.history.push((rv, line.clone()));
        k.watchers
            .retain(|(tx, _)| tx.send(Msg::Event(line.clone())).is_ok());
    }
}

/// The tasks of the running server: the acceptor and every connection.
#[derive(Debug, Default)]
struct Tasks {
    acceptor: Option<JoinHandle<()>>,
    connections: Vec<JoinHandle<()>>,
}

/// The fake API server; stops serving when dropped.
#[derive(Debug)]
pub struct FakeApiServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    tasks: Arc<Mutex<Tasks>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(64)
}

impl FakeApiServer {
    /// Serves on an ephemeral port of 127.0.0.1, on the current runtime.
    pub async fn start() -> Self {
        let listener = listen("127.0.0.1:0".parse().expect("address"))
            .unwrap_or_else(|e| panic!("fake API server: listening on 127.0.0.1: {e}"));
        let addr = listener.local_addr().expect("local address");
        let server = Self {
            addr,
            state: Arc::default(),
            tasks: Arc::default(),
        };
        server.serve(listener);
        server
    }

    /// `http://127.0.0.1:<port>`, for `kube::Config::new`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn serve(&self, listener: TcpListener) {
        let state = self.state.clone();
        let tasks = self.tasks.clone();
        let acceptor = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                // Small writes must not wait for delayed ACKs.
                let _ = stream.set_nodelay(true);
                let conn = tokio::spawn(serve_connection(stream, state.clone()));
                let mut t = lock(&tasks);
                t.connections.retain(|c| !c.is_finished());
                t.connections.push(conn);
            }
        });
        lock(&self.tasks).acceptor = Some(acceptor);
    }

    /// Goes away: stops listening and drops every connection (open watches
    /// end abruptly). The objects and their history are kept.
    pub fn stop(&self) {
        let mut t = lock(&self.tasks);
        if let Some(a) = t.acceptor.take() {
            a.abort();
        }
        for c in t.connections.drain(..) {
            c.abort();
        }
        drop(t);
        let mut s = lock(&self.state);
        for k in &mut s.kinds {
            k.watchers.clear();
        }
    }

    /// Comes back on the same port, with the same objects and history.
    pub fn restart(&self) {
        let listener = listen(self.addr)
            .unwrap_or_else(|e| panic!("fake API server: listening again on {}: {e}", self.addr));
        self.serve(listener);
    }

    /// Creates or replaces an object (its `kind` says which resource);
    /// watches get ADDED or MODIFIED. Returns its new resourceVersion.
    pub fn apply(&self, mut object: Value) -> u64 {
        let res = Res::from_kind(object["kind"].as_str().unwrap_or_default())
            .unwrap_or_else(|| panic!("fake API server: unsupported object {object}"));
        let key = key_of(&object);
        let mut s = lock(&self.state);
        s.rv += 1;
        let rv = s.rv;
        let meta = &mut object["metadata"];
        meta["resourceVersion"] = json!(rv.to_string());
        meta["uid"] = json!(format!("uid-{}-{}-{}", res.kind(), key.0, key.1));
        let existed = s.kind(res).objects.insert(key, object.clone()).is_some();
        s.emit(res, if existed { "MODIFIED" } else { "ADDED" }, &object);
        rv
    }

    /// Deletes an object; watches get DELETED (with the final object).
    /// Returns whether it existed.
    pub fn delete(&self, res: Res, namespace: &str, name: &str) -> bool {
        let mut s = lock(&self.state);
        let Some(mut object) = s
            .kind(res)
            .objects
            .remove(&(namespace.to_string(), name.to_string()))
        else {
            return false;
        };
        s.rv += 1;
        object["metadata"]["resourceVersion"] = json!(s.rv.to_string());
        s.emit(res, "DELETED", &object);
        true
    }

    /// Deletes an object without any watch seeing it, as if the event had
    /// fallen out of the watch window: the history is compacted past it, so
    /// only a relist can learn of the deletion.
    pub fn delete_unseen(&self, res: Res, namespace: &str, name: &str) -> bool {
        let mut s = lock(&self.state);
        let removed = s
            .kind(res)
            .objects
            .remove(&(namespace.to_string(), name.to_string()))
            .is_some();
        s.rv += 1;
        let rv = s.rv;
        let k = s.kind(res);
        k.history.clear();
        k.compacted = rv;
        removed
    }

    /// Sends a BOOKMARK with the current resourceVersion to every watch that
    /// asked for bookmarks.
    pub fn bookmark(&self) {
        let mut s = lock(&self.state);
        let rv = s.rv.to_string();
        for res in Res::ALL {
            let line = json!({
                "type": "BOOKMARK",
                "object": {
                    "kind": res.kind(),
                    "apiVersion": res.api_version(),
                    "metadata": {"resourceVersion": rv},
                },
            })
            .to_string();
            s.kind(res)
                .watchers
                .retain(|(tx, bookmarks)| !*bookmarks || tx.send(Msg::Event(line.clone())).is_ok());
        }
    }

    /// Forgets the history up to now: a watch can only resume from the
    /// current resourceVersion (older ones get 410 Gone).
    pub fn compact(&self) {
        let mut s = lock(&self.state);
        let rv = s.rv;
        for k in &mut s.kinds {
            k.history.clear();
            k.compacted = rv;
        }
    }

    /// Ends every open watch cleanly (as when `timeoutSeconds` runs out); the
    /// clients resume from the last resourceVersion they saw.
    pub fn end_watches(&self) {
        let mut s = lock(&self.state);
        for k in &mut s.kinds {
            for (tx, _) in k.watchers.drain(..) {
                let _ = tx.send(Msg::End);
            }
        }
    }

    /// Compacts the history and expires every open watch with an ERROR
    /// event carrying a 410 Status, forcing the clients to relist.
    pub fn expire_watches(&self) {
        self.compact();
        let mut s = lock(&self.state);
        let rv = s.rv;
        for k in &mut s.kinds {
            for (tx, _) in k.watchers.drain(..) {
                let _ = tx.send(Msg::Event(gone_event(rv.saturating_sub(1), rv)));
                let _ = tx.send(Msg::End);
            }
        }
    }

    /// Makes list requests for `res` fail with `code` (`None`: succeed).
    pub fn fail_lists(&self, res: Res, code: Option<u16>) {
        lock(&self.state).kind(res).fail_lists = code;
    }

    /// Delays every list page (to observe a relist in progress).
    pub fn set_page_delay(&self, delay: Duration) {
        lock(&self.state).page_delay = delay;
    }

    /// List requests for `res` answered with the failure of
    /// [`FakeApiServer::fail_lists`].
    pub fn failed_lists(&self, res: Res) -> u64 {
        lock(&self.state).kind(res).failed_lists
    }

    /// List pages served so far for `res`.
    pub fn pages_served(&self, res: Res) -> u64 {
        lock(&self.state).kind(res).pages_served
    }

    /// Lists of `res` whose last page was served.
    pub fn lists_completed(&self, res: Res) -> u64 {
        lock(&self.state).kind(res).lists_completed
    }

    /// Watches of `res` accepted (not counting those answered with 410).
    pub fn watches_started(&self, res: Res) -> u64 {
        lock(&self.state).kind(res).watches_started
    }

    /// Open watches of `res`.
    pub fn open_watches(&self, res: Res) -> usize {
        let mut s = lock(&self.state);
        let k = s.kind(res);
        k.watchers.retain(|(tx, _)| !tx.is_closed());
        k.watchers.len()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn key_of(object: &Value) -> (String, String) {
    let meta = &object["metadata"];
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    (s(&meta["namespace"]), s(&meta["name"]))
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn gone_event(requested: u64, oldest: u64) -> String {
    json!({
        "type": "ERROR",
        "object": status(
            410,
            "Expired",
            &format!("too old resource version: {requested} ({oldest})"),
        ),
    })
    .to_string()
}

/// One parsed request line.
struct Request {
    method: String,
    path: String,
    query: HashMap<String, String>,
}

fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_request_line(line: &str) -> Option<Request> {
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    Some(Request {
        method,
        path: path.to_string(),
        query,
    })
}

/// Serves requests on one connection until it closes (or a watch ends it).
async fn serve_connection(stream: TcpStream, state: Arc<Mutex<State>>) {
    let mut stream = BufReader::new(stream);
    loop {
        let mut line = String::new();
        match stream.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        // Headers: only the end of them matters (GET requests, no body).
        loop {
            let mut header = String::new();
            match stream.read_line(&mut header).await {
                Ok(0) | Err(_) => return,
                Ok(_) if header == "\r\n" || header == "\n" => break,
                Ok(_) => {}
            }
        }
        let Some(req) = parse_request_line(line.trim_end()) else {
            let _ = respond(&mut stream, 400, &status(400, "BadRequest", "bad request")).await;
            return;
        };
        let res = Res::from_path(&req.path);
        let result = match (req.method.as_str(), res) {
            ("GET", Some(res))
                if req
                    .query
                    .get("watch")
                    .is_some_and(|w| w == "true" || w == "1") =>
            {
                // A watch ends the connection.
                let _ = watch(&mut stream, &state, res, &req).await;
                return;
            }
            ("GET", Some(res)) => list(&mut stream, &state, res, &req).await,
            _ => {
                respond(
                    &mut stream,
                    404,
                    &status(
                        404,
                        "NotFound",
                        &format!("{} {} not found", req.method, req.path),
                    ),
                )
                .await
            }
        };
        if result.is_err() {
            return;
        }
    }
}

async fn respond(
    stream: &mut BufReader<TcpStream>,
    code: u16,
    body: &Value,
) -> std::io::Result<()> {
    let body = body.to_string();
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        410 => "Gone",
        500 => "Internal Server Error",
        _ => "Error",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let s = stream.get_mut();
    s.write_all(format!("{head}{body}").as_bytes()).await?;
    s.flush().await
}

/// One page of a list (the first, or the next after `continue`).
async fn list(
    stream: &mut BufReader<TcpStream>,
    state: &Mutex<State>,
    res: Res,
    req: &Request,
) -> std::io::Result<()> {
    let delay = lock(state).page_delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let (code, body) = list_page(&mut lock(state), res, req);
    respond(stream, code, &body).await
}

/// The answer to a list request: HTTP code and body.
fn list_page(s: &mut State, res: Res, req: &Request) -> (u16, Value) {
    if let Some(code) = s.kind(res).fail_lists {
        s.kind(res).failed_lists += 1;
        return (
            code,
            status(
                code,
                "InternalError",
                "the fake API server was told to fail lists",
            ),
        );
    }
    let limit = req
        .query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0);
    let paging = match req.query.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => match s.pagings.remove(token) {
            Some(p) if p.res == res => p,
            _ => {
                return (
                    410,
                    status(410, "Expired", "the provided continue parameter is too old"),
                );
            }
        },
        None => Paging {
            res,
            rv: s.rv,
            rest: s.kind(res).objects.values().cloned().collect(),
        },
    };
    let Paging { rv, mut rest, .. } = paging;
    let n = limit.unwrap_or(rest.len()).min(rest.len());
    let items: Vec<Value> = rest.drain(..n).collect();
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if rest.is_empty() {
        s.kind(res).lists_completed += 1;
    } else {
        s.next_token += 1;
        let token = format!("page{}", s.next_token);
        metadata["continue"] = json!(token);
        metadata["remainingItemCount"] = json!(rest.len());
        s.pagings.insert(token, Paging { res, rv, rest });
    }
    s.kind(res).pages_served += 1;
    (
        200,
        json!({
            "kind": format!("{}List", res.kind()),
            "apiVersion": res.api_version(),
            "metadata": metadata,
            "items": items,
        }),
    )
}

async fn write_chunk(stream: &mut BufReader<TcpStream>, data: &[u8]) -> std::io::Result<()> {
    let mut chunk = format!("{:x}\r\n", data.len()).into_bytes();
    chunk.extend_from_slice(data);
    chunk.extend_from_slice(b"\r\n");
    let s = stream.get_mut();
    s.write_all(&chunk).await?;
    s.flush().await
}

/// A watch: replays the history after the requested resourceVersion, then
/// streams live events until ended, timed out or the client goes away.
async fn watch(
    stream: &mut BufReader<TcpStream>,
    state: &Mutex<State>,
    res: Res,
    req: &Request,
) -> std::io::Result<()> {
    let from: u64 = req
        .query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = req
        .query
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true");
    let timeout = req
        .query
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(Duration::from_secs(290), Duration::from_secs);
    // Decide and subscribe under one lock, so no event falls in between.
    let (replay, rx) = {
        let mut s = lock(state);
        let k = s.kind(res);
        if from != 0 && from < k.compacted {
            (vec![gone_event(from, k.compacted)], None)
        } else {
            // Without a resourceVersion the watch starts now (kube-runtime
            // always resumes from the one its list or last event gave).
            let replay = k
                .history
                .iter()
                .filter(|(rv, _)| from != 0 && *rv > from)
                .map(|(_, line)| line.clone())
                .collect();
            let (tx, rx) = mpsc::unbounded_channel();
            k.watchers.push((tx, bookmarks));
            k.watches_started += 1;
            (replay, Some(rx))
        }
    };
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    stream.get_mut().write_all(head.as_bytes()).await?;
    for line in replay {
        write_chunk(stream, format!("{line}\n").as_bytes()).await?;
    }
    if let Some(mut rx) = rx {
        let deadline = tokio::time::Instant::now() + timeout;
        // Until ended, the channel closes, or timeoutSeconds runs out.
        while let Ok(Some(Msg::Event(line))) = tokio::time::timeout_at(deadline, rx.recv()).await {
            write_chunk(stream, format!("{line}\n").as_bytes()).await?;
        }
    }
    let s = stream.get_mut();
    s.write_all(b"0\r\n\r\n").await?;
    s.flush().await?;
    s.shutdown().await
}
