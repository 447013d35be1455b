//! `--source dir:<path>`: a directory of manifests (the lab writes Namespace,
//! Pod and Node objects there; users drop NetworkPolicy manifests in).
//!
//! The directory is watched with inotify: a file is read when its writer
//! closes it (`IN_CLOSE_WRITE`) or when it is renamed into place
//! (`IN_MOVED_TO`), never while it is being written, and the run loop is
//! woken at once ([`ClusterSource::changed`]). A slow periodic rescan
//! (modification time, ctime, size and inode of every manifest) is the safety
//! net for lost events (queue overflow) and for a directory that cannot be
//! watched (then the directory is scanned on every poll).
//!
//! Rules that keep a bad write from opening the network:
//! - Until the first complete read (the directory listed, at least one
//!   manifest in it, every manifest read) the source is not ready, so the
//!   agent never compiles an empty or partial cluster at start and keeps what
//!   its pinned maps enforce.
//! - A file that does not parse, cannot be read, or has become empty keeps
//!   its last good contents, and the error names the file and line.
//! - A half-written file cut at `from:` would parse as `from: null` (every
//!   peer allowed), so while inotify watches, a file is read only after a
//!   close or a rename, and the rescan never reads a file that changed
//!   without one (it may still be open for writing). Without inotify, a
//!   changed file is read once two scans in a row see the same stamp, which a
//!   writer stalled longer than a poll defeats.
//! - Deleting a file removes its objects.
//!
//! Writers should still write a temporary file (a name starting with `.`,
//! which is ignored) and rename it into place: a writer that dies halfway and
//! closes leaves a truncated file that may parse.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsString,
    future::Future,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    pin::Pin,
    time::{Duration, Instant},
};

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};

use crate::{
    compiler::Change,
    convert,
    manifest::{self, ManifestError, Object},
    model::{Cluster, ObjectRef},
};

/// One change a source saw: what the compiler takes, or what only the agent
/// uses (Service frontends, for the deferred ranges).
#[derive(Clone, Debug, PartialEq)]
pub enum SourceChange {
    Compiler(Change),
    /// A ServiceCIDR object's ranges (`None`: it is gone).
    ServiceCidrs {
        name: String,
        cidrs: Option<Vec<ipnet::IpNet>>,
    },
    /// A Service's external and load-balancer IPs (`None`: it is gone).
    ServiceIps {
        service: ObjectRef,
        ips: Option<Vec<std::net::IpAddr>>,
    },
}

impl SourceChange {
    /// The `kind` label of `netpol_change_seconds`.
    pub fn kind(&self) -> &'static str {
        match self {
            SourceChange::Compiler(c) => match c {
                Change::UpsertPod(_) | Change::RemovePod(_) => "pod",
                Change::UpsertNamespace(_) | Change::RemoveNamespace(_) => "namespace",
                Change::UpsertPolicy(_) | Change::RemovePolicy(_) => "policy",
                Change::UpsertClusterPolicy(_) | Change::RemoveClusterPolicy(_) => "cluster_policy",
                Change::UpsertNode(_) | Change::RemoveNode(_) => "node",
                Change::SetNode(_) => "other",
            },
            SourceChange::ServiceCidrs { .. } | SourceChange::ServiceIps { .. } => "service",
        }
    }

    /// Applies the change to a model of the cluster.
    pub fn apply_to(&self, cluster: &mut Cluster) {
        fn set<K: Ord + Clone, V: Clone>(map: &mut BTreeMap<K, V>, key: &K, value: Option<&V>) {
            match value {
                Some(v) => {
                    map.insert(key.clone(), v.clone());
                }
                None => {
                    map.remove(key);
                }
            }
        }
        match self {
            SourceChange::Compiler(c) => match c {
                Change::UpsertNamespace(ns) => cluster.upsert_namespace(ns.clone()),
                Change::RemoveNamespace(n) => {
                    cluster.remove_namespace(n);
                }
                Change::UpsertPod(p) => cluster.upsert_pod(p.clone()),
                Change::RemovePod(p) => {
                    cluster.remove_pod(p);
                }
                Change::UpsertPolicy(p) => cluster.upsert_policy(p.clone()),
                Change::RemovePolicy(p) => {
                    cluster.remove_policy(p);
                }
                Change::UpsertClusterPolicy(p) => cluster.upsert_cluster_policy(p.clone()),
                Change::RemoveClusterPolicy(n) => {
                    cluster.cluster_policies.remove(n);
                }
                Change::UpsertNode(n) => cluster.upsert_node(n.clone()),
                Change::RemoveNode(n) => {
                    cluster.nodes.remove(n);
                }
                Change::SetNode(_) => {}
            },
            SourceChange::ServiceCidrs { name, cidrs } => {
                set(&mut cluster.service_cidrs, name, cidrs.as_ref())
            }
            SourceChange::ServiceIps { service, ips } => {
                set(&mut cluster.service_ips, service, ips.as_ref())
            }
        }
    }
}

/// The changes that turn `old` into `new` (a relist, a resync, a file read
/// again): O(both), for when a source cannot say what changed.
pub fn changes_between(old: &Cluster, new: &Cluster) -> Vec<SourceChange> {
    fn each<K: Ord + Clone, V: PartialEq + Clone>(
        old: &BTreeMap<K, V>,
        new: &BTreeMap<K, V>,
        out: &mut Vec<SourceChange>,
        mk: impl Fn(&K, Option<&V>) -> SourceChange,
    ) {
        for k in old.keys() {
            if !new.contains_key(k) {
                out.push(mk(k, None));
            }
        }
        for (k, v) in new {
            if old.get(k) != Some(v) {
                out.push(mk(k, Some(v)));
            }
        }
    }
    use SourceChange::Compiler as C;
    let mut out = Vec::new();
    each(&old.namespaces, &new.namespaces, &mut out, |k, v| match v {
        Some(v) => C(Change::UpsertNamespace(v.clone())),
        None => C(Change::RemoveNamespace(k.clone())),
    });
    each(&old.nodes, &new.nodes, &mut out, |k, v| match v {
        Some(v) => C(Change::UpsertNode(v.clone())),
        None => C(Change::RemoveNode(k.clone())),
    });
    each(&old.pods, &new.pods, &mut out, |k, v| match v {
        Some(v) => C(Change::UpsertPod(v.clone())),
        None => C(Change::RemovePod(k.clone())),
    });
    each(&old.policies, &new.policies, &mut out, |k, v| match v {
        Some(v) => C(Change::UpsertPolicy(v.clone())),
        None => C(Change::RemovePolicy(k.clone())),
    });
    each(
        &old.cluster_policies,
        &new.cluster_policies,
        &mut out,
        |k, v| match v {
            Some(v) => C(Change::UpsertClusterPolicy(v.clone())),
            None => C(Change::RemoveClusterPolicy(k.clone())),
        },
    );
    each(&old.service_cidrs, &new.service_cidrs, &mut out, |k, v| {
        SourceChange::ServiceCidrs {
            name: k.clone(),
            cidrs: v.cloned(),
        }
    });
    each(&old.service_ips, &new.service_ips, &mut out, |k, v| {
        SourceChange::ServiceIps {
            service: k.clone(),
            ips: v.cloned(),
        }
    });
    out
}

/// A change with the moment the source received it (`netpol_change_seconds`
/// measures from there).
#[derive(Clone, Debug)]
pub struct Stamped<T> {
    pub at: Instant,
    pub change: T,
}

/// What [`ClusterSource::take_changes`] hands over.
#[derive(Debug)]
pub enum Changes {
    /// The changes since the last call, in the order the source saw them.
    List(Vec<Stamped<SourceChange>>),
    /// The source cannot say what changed: the agent takes a
    /// [`ClusterSource::snapshot`] and compares it whole (O(cluster)).
    Resync,
}

/// Where cluster state comes from (a manifests directory, or the
/// Kubernetes API). The run loop polls it and takes its changes.
pub trait ClusterSource: Send {
    /// Look for changes; true if the cluster may have changed since the
    /// last call. An error leaves the previous state in force.
    fn poll(&mut self) -> std::io::Result<bool>;
    /// Incremented on every change.
    fn revision(&self) -> u64;
    /// The cluster as the source describes it now.
    fn snapshot(&self) -> Snapshot;
    /// Whether the source has delivered a complete state (for the API: every
    /// initial list is done). Until then the agent keeps what it enforces
    /// and does not report ready.
    fn ready(&self) -> bool {
        true
    }
    /// Resolves when the source may have news, so the run loop polls at once
    /// instead of at its next tick. Cancel-safe. The default never resolves
    /// (the tick is all there is).
    fn changed(&mut self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(std::future::pending())
    }
    /// For logs: what this source reads.
    fn describe(&self) -> String;
    /// What has been failing to read, and for how long (readiness). The
    /// default: nothing fails.
    fn health(&self) -> crate::health::SourceHealth {
        crate::health::SourceHealth::default()
    }
    /// The changes since the last call (each change once, in order; the
    /// first call's are those from an empty cluster). The default: a
    /// snapshot instead.
    fn take_changes(&mut self) -> Changes {
        Changes::Resync
    }
    /// The problems a snapshot reports, without the cluster (status: asked
    /// for when the revision moved).
    fn errors(&self) -> Vec<String> {
        self.snapshot().errors
    }
}

/// The cluster a source describes, with every problem found reading it.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub cluster: Cluster,
    /// Files or documents that did not parse, and objects with invalid
    /// fields (an invalid policy still isolates what it selects).
    pub errors: Vec<String>,
}

/// One line per ClusterNetworkPolicy that the datapath cannot enforce as
/// written: one with `nodes` peers while the source knows no Node object
/// (the kube source does not watch Nodes yet), whose `nodes` peers then
/// match no address. Every other ClusterNetworkPolicy is enforced. The
/// agent logs each line once and reports it in its status.
pub fn not_enforced(cluster: &Cluster) -> impl Iterator<Item = String> + '_ {
    cluster
        .cluster_policies
        .values()
        .filter(|p| {
            cluster.nodes.is_empty()
                && p.ingress
                    .iter()
                    .chain(&p.egress)
                    .flat_map(|r| &r.peers)
                    .any(|peer| matches!(peer, crate::model::CnpPeer::Nodes(_)))
        })
        .map(|p| {
            format!(
                "ClusterNetworkPolicy {} ({} tier, priority {}): its `nodes` peers are NOT ENFORCED: no Node object is known, so they match no address",
                p.name, p.tier, p.priority
            )
        })
}

/// What identifies one version of a file: a rename into place changes the
/// inode, an edit in place the modification and change times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    mtime_ns: i128,
    ctime_ns: i128,
    len: u64,
    ino: u64,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            ctime_ns: meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128,
            len: meta.len(),
            ino: meta.ino(),
        }
    }
}

#[derive(Debug)]
struct FileEntry {
    /// `None` when the file could never be read (read again on every scan).
    stamp: Option<Stamp>,
    /// The objects in force: from the last read that parsed, or (when no
    /// read of this file ever parsed) the documents that did.
    objects: Vec<Object>,
    /// Problems of the latest read.
    errors: Vec<ManifestError>,
    /// `objects` converted (once, when read), and what converting found.
    model: Cluster,
    convert_errors: Vec<String>,
}

impl FileEntry {
    fn new(stamp: Option<Stamp>, objects: Vec<Object>, errors: Vec<ManifestError>) -> Self {
        let (model, convert_errors) = convert_objects(&objects);
        Self {
            stamp,
            objects,
            errors,
            model,
            convert_errors,
        }
    }
}

/// Manifest objects as the model, with every conversion problem.
fn convert_objects(objects: &[Object]) -> (Cluster, Vec<String>) {
    let mut cluster = Cluster::default();
    let mut errors = Vec::new();
    for o in objects {
        match o {
            Object::Namespace(ns) => match convert::namespace(ns) {
                Ok(ns) => cluster.upsert_namespace(ns),
                Err(e) => errors.push(e.to_string()),
            },
            Object::Pod(p) => match convert::pod(p) {
                Ok(c) => {
                    errors.extend(c.errors.iter().map(|e| e.to_string()));
                    cluster.upsert_pod(c.value);
                }
                Err(e) => errors.push(e.to_string()),
            },
            Object::NetworkPolicy(np) => match convert::network_policy(np) {
                Ok(c) => {
                    errors.extend(c.errors.iter().map(|e| e.to_string()));
                    cluster.upsert_policy(c.value);
                }
                Err(e) => errors.push(e.to_string()),
            },
            Object::Node(n) => match convert::node(n) {
                Ok(c) => {
                    errors.extend(c.errors.iter().map(|e| e.to_string()));
                    cluster.upsert_node(c.value);
                }
                Err(e) => errors.push(e.to_string()),
            },
            Object::ClusterNetworkPolicy(cnp) => match convert::cluster_network_policy(cnp) {
                Ok(c) => {
                    errors.extend(c.errors.iter().map(|e| e.to_string()));
                    cluster.upsert_cluster_policy(c.value);
                }
                Err(e) => errors.push(e.to_string()),
            },
        }
    }
    (cluster, errors)
}

/// One kind's part of [`DirSource::take_changes`]: for each key that a
/// retired or touched file model holds, the value in force (the last file
/// in path order that has it, as [`ClusterSource::snapshot`] merges) against
/// the one last handed over.
fn merge_kind<K: Ord + Clone, V: PartialEq + Clone>(
    files: &BTreeMap<PathBuf, FileEntry>,
    retired: &[Cluster],
    touched: &BTreeSet<PathBuf>,
    get: fn(&Cluster) -> &BTreeMap<K, V>,
    given: &mut BTreeMap<K, V>,
    out: &mut Vec<SourceChange>,
    mk: impl Fn(&K, Option<&V>) -> SourceChange,
) {
    let keys: BTreeSet<K> = retired
        .iter()
        .chain(
            touched
                .iter()
                .filter_map(|p| files.get(p).map(|f| &f.model)),
        )
        .flat_map(|m| get(m).keys().cloned())
        .collect();
    for k in keys {
        let now = files.values().rev().find_map(|f| get(&f.model).get(&k));
        if given.get(&k) == now {
            continue;
        }
        out.push(mk(&k, now));
        match now {
            Some(v) => {
                given.insert(k, v.clone());
            }
            None => {
                given.remove(&k);
            }
        }
    }
}

/// How often the directory is rescanned while inotify watches it.
pub const DEFAULT_RESCAN: Duration = Duration::from_secs(10);

/// The directory and what its files held when last read.
#[derive(Debug)]
pub struct DirSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileEntry>,
    revision: u64,
    ready: bool,
    rescan_every: Duration,
    last_rescan: Option<Instant>,
    /// Stamps seen by a rescan without a close or rename event: the file may
    /// be open for writing. Read once a later rescan sees the same stamp.
    unsettled: BTreeMap<PathBuf, Stamp>,
    watch: Option<Watch>,
    /// Watch with inotify (else scan on every poll).
    use_inotify: bool,
    /// Why the directory is not watched (logged once per reason).
    watch_error: Option<String>,
    /// "Waiting for manifests" was logged.
    waiting_logged: bool,
    /// Events may have been missed (the watch is new, or was lost): the next
    /// scan reads every changed file, so added files arrive with removed
    /// ones.
    read_all_next: bool,
    /// The cluster as last handed over by [`ClusterSource::take_changes`].
    given: Cluster,
    /// Files read or removed since then, and the models they replaced.
    touched: BTreeSet<PathBuf>,
    retired: Vec<Cluster>,
}

/// The inotify watch on the directory and what it reported since the last
/// poll.
#[derive(Debug)]
struct Watch {
    fd: WatchFd,
    wd: WatchDescriptor,
    news: News,
}

#[derive(Debug)]
enum WatchFd {
    /// Before the run loop's first `changed()` (and in tests): read with
    /// non-blocking reads from `poll`.
    Plain(Inotify),
    /// Registered with the tokio reactor, so `changed()` can wait on it.
    Async(tokio::io::unix::AsyncFd<Inotify>),
    /// Transient, while moving from one to the other.
    Moving,
}

impl WatchFd {
    fn inotify(&mut self) -> Option<&mut Inotify> {
        match self {
            WatchFd::Plain(i) => Some(i),
            WatchFd::Async(a) => Some(a.get_mut()),
            WatchFd::Moving => None,
        }
    }
}

#[derive(Debug, Default)]
struct News {
    /// Manifest names written and closed, renamed in or out, or deleted.
    names: BTreeSet<OsString>,
    /// Something else changed (a symlink or directory swapped, as a
    /// ConfigMap volume does; events lost): look at every file.
    rescan: bool,
    /// The directory itself went away or was moved: watch it again.
    lost: bool,
}

const WATCH_MASK: WatchMask = WatchMask::CLOSE_WRITE
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::CREATE)
    .union(WatchMask::DELETE)
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::MOVE_SELF)
    .union(WatchMask::ONLYDIR);

fn is_manifest_name(name: &std::ffi::OsStr) -> bool {
    is_manifest(Path::new(name))
}

fn is_manifest(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    ) && !p
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

impl News {
    fn is_empty(&self) -> bool {
        self.names.is_empty() && !self.rescan && !self.lost
    }

    /// Record a batch of inotify events.
    fn absorb<'a>(
        &mut self,
        dir: &Path,
        events: impl Iterator<Item = inotify::Event<&'a std::ffi::OsStr>>,
    ) {
        for ev in events {
            if ev.mask.contains(EventMask::Q_OVERFLOW) {
                self.rescan = true;
                continue;
            }
            if ev
                .mask
                .intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF | EventMask::IGNORED)
            {
                self.lost = true;
                continue;
            }
            let Some(name) = ev.name else { continue };
            if is_manifest_name(name) {
                if ev.mask.contains(EventMask::CREATE) {
                    // A new regular file is being written: it is read on
                    // close. A symlink or hard link is complete now.
                    let complete = std::fs::symlink_metadata(dir.join(name))
                        .is_ok_and(|m| m.file_type().is_symlink() || m.nlink() > 1);
                    if !complete {
                        continue;
                    }
                }
                self.names.insert(name.to_owned());
            } else if ev.mask.intersects(EventMask::MOVED_TO | EventMask::CREATE) {
                // A ConfigMap volume swaps its `..data` symlink; a temporary
                // file (`.x.tmp`) renamed into place reports under its new
                // name instead, so regular files are not worth a rescan.
                let swapped = std::fs::symlink_metadata(dir.join(name))
                    .is_ok_and(|m| m.file_type().is_symlink() || m.is_dir());
                self.rescan |= swapped;
            }
        }
    }
}

impl DirSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
            revision: 0,
            ready: false,
            rescan_every: DEFAULT_RESCAN,
            last_rescan: None,
            unsettled: BTreeMap::new(),
            watch: None,
            use_inotify: true,
            watch_error: None,
            waiting_logged: false,
            read_all_next: false,
            given: Cluster::default(),
            touched: BTreeSet::new(),
            retired: Vec::new(),
        }
    }

    /// How often to rescan the whole directory while it is watched.
    pub fn with_rescan(mut self, every: Duration) -> Self {
        self.rescan_every = every;
        self
    }

    /// Never watch with inotify: scan the directory on every poll (a file
    /// whose stamp changed is read once two polls see the same stamp). For
    /// file systems without inotify (network file systems) and for tests.
    pub fn without_inotify(mut self) -> Self {
        self.use_inotify = false;
        self
    }

    /// Whether inotify watches the directory (otherwise every poll scans it).
    pub fn watching(&self) -> bool {
        self.watch.is_some()
    }

    /// Watch the directory if it is not watched; errors are logged once and
    /// leave the source polling.
    fn ensure_watch(&mut self) {
        if self.watch.is_some() || !self.use_inotify {
            return;
        }
        let res = Inotify::init().and_then(|ino| {
            let wd = ino.watches().add(&self.dir, WATCH_MASK)?;
            Ok((ino, wd))
        });
        match res {
            Ok((ino, wd)) => {
                if self.watch_error.take().is_some() {
                    tracing::info!(dir = %self.dir.display(), "watching the manifests directory again");
                }
                self.watch = Some(Watch {
                    fd: WatchFd::Plain(ino),
                    wd,
                    news: News::default(),
                });
                // Whatever happened before the watch existed.
                self.last_rescan = None;
                self.read_all_next = true;
            }
            Err(e) => {
                let msg = e.to_string();
                if self.watch_error.as_deref() != Some(&msg) {
                    tracing::warn!(
                        dir = %self.dir.display(),
                        "cannot watch the manifests directory with inotify ({msg}); scanning it on every poll"
                    );
                }
                self.watch_error = Some(msg);
            }
        }
    }

    /// Read whatever inotify has queued (non-blocking).
    fn drain(&mut self) {
        let Some(w) = self.watch.as_mut() else { return };
        let Some(ino) = w.fd.inotify() else { return };
        let mut buf = [0u8; 8192];
        loop {
            match ino.read_events(&mut buf) {
                Ok(events) => w.news.absorb(&self.dir, events),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::warn!(dir = %self.dir.display(), "reading inotify events: {e}");
                    w.news.rescan = true;
                    break;
                }
            }
        }
        if w.news.lost {
            // The directory was removed or moved: its watch is gone. Scan
            // until it can be watched again.
            let _ = w.fd.inotify().map(|i| i.watches().remove(w.wd.clone()));
            self.watch = None;
            self.last_rescan = None;
            self.read_all_next = true;
        }
    }

    /// Read one file into `files`; true if what it contributes changed.
    fn read(&mut self, path: &Path) -> bool {
        let meta = match std::fs::metadata(path) {
            Ok(m) if m.is_file() => m,
            Ok(_) => return self.forget(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.unsettled.remove(path);
                return self.forget(path);
            }
            Err(e) => return self.read_failed(path, None, e.to_string()),
        };
        let stamp = Stamp::of(&meta);
        self.unsettled.remove(path);
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return self.forget(path);
            }
            Err(e) => return self.read_failed(path, Some(stamp), e.to_string()),
        };
        let (objects, mut errors) = manifest::parse(path, &text);
        let previous = self.files.get(path);
        if objects.is_empty()
            && errors.is_empty()
            && previous.is_some_and(|p| !p.objects.is_empty())
        {
            // Truncated (a writer cut short, `> file`): delete the file to
            // remove its objects.
            errors.push(ManifestError {
                file: path.to_path_buf(),
                line: 1,
                message: "the file is empty (delete it to remove its objects)".into(),
            });
        }
        let objects = match previous {
            Some(p) if !errors.is_empty() => {
                for e in &mut errors {
                    e.message
                        .push_str("; keeping the file's last good contents");
                }
                p.objects.clone()
            }
            _ => objects,
        };
        self.put(path, FileEntry::new(Some(stamp), objects, errors));
        true
    }

    /// A file is gone: its objects go (see `take_changes`).
    fn forget(&mut self, path: &Path) -> bool {
        match self.files.remove(path) {
            Some(f) => {
                self.touched.insert(path.to_path_buf());
                self.retired.push(f.model);
                true
            }
            None => false,
        }
    }

    /// A file read: what it held before is retired (see `take_changes`).
    fn put(&mut self, path: &Path, entry: FileEntry) {
        if let Some(old) = self.files.insert(path.to_path_buf(), entry) {
            self.retired.push(old.model);
        }
        self.touched.insert(path.to_path_buf());
    }

    /// A file that could not be read: it keeps what it had.
    fn read_failed(&mut self, path: &Path, stamp: Option<Stamp>, message: String) -> bool {
        let error = ManifestError {
            file: path.to_path_buf(),
            line: 0,
            message: format!("{message}; keeping the file's last good contents"),
        };
        match self.files.get_mut(path) {
            Some(f) => {
                if stamp.is_some() {
                    f.stamp = stamp;
                }
                f.errors = vec![error];
            }
            None => {
                self.put(path, FileEntry::new(None, Vec::new(), vec![error]));
            }
        }
        true
    }

    /// List the directory, forget deleted files and read the changed ones
    /// that `mode` allows. Returns (changed, complete): complete when at
    /// least one manifest is there and every one was read.
    fn scan(&mut self, mode: ScanMode) -> std::io::Result<(bool, bool)> {
        let mut seen: BTreeMap<PathBuf, (Stamp, bool)> = BTreeMap::new();
        for e in std::fs::read_dir(&self.dir)? {
            let e = e?;
            let path = e.path();
            if !is_manifest(&path) {
                continue;
            }
            let symlink = e.file_type().is_ok_and(|t| t.is_symlink());
            // Follow symlinks (ConfigMap volumes are symlinks into `..data`).
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            seen.insert(path, (Stamp::of(&meta), symlink));
        }
        let mut changed = false;
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !seen.contains_key(*p))
            .cloned()
            .collect();
        for p in gone {
            self.forget(&p);
            changed = true;
        }
        self.unsettled.retain(|p, _| seen.contains_key(p));
        let mut complete = !seen.is_empty();
        for (path, (stamp, symlink)) in seen {
            let entry = self.files.get(&path);
            let known = entry.and_then(|f| f.stamp);
            if known == Some(stamp) {
                continue;
            }
            let settled = self.unsettled.get(&path) == Some(&stamp);
            let read = match mode {
                ScanMode::All => true,
                ScanMode::Settled => settled,
                // A file that failed to read is tried again; a symlink's
                // target may live where no event of ours reaches.
                ScanMode::Closed => (entry.is_some() && known.is_none()) || (symlink && settled),
            };
            if !read {
                if !settled {
                    tracing::debug!(
                        file = %path.display(),
                        "changed without a close or rename: not read while it may be being written"
                    );
                    self.unsettled.insert(path, stamp);
                }
                continue;
            }
            changed |= self.read(&path);
            complete &= self.files.get(&path).is_some_and(|f| f.stamp.is_some());
        }
        self.last_rescan = Some(Instant::now());
        Ok((changed, complete))
    }
}

/// Which changed files a scan reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ScanMode {
    /// Every one: the first read, a rescan after lost events or a swapped
    /// symlink (ConfigMap volume), or the first scan of a new watch.
    All,
    /// Those two scans in a row saw with the same stamp (no inotify: a
    /// heuristic, a writer that stalls longer than a poll is read halfway).
    Settled,
    /// None but retries of failed reads (and settled symlinks): inotify
    /// reports every close and rename, and a file changed without one may
    /// still be open for writing.
    Closed,
}

impl ClusterSource for DirSource {
    fn describe(&self) -> String {
        format!("dir:{}", self.dir.display())
    }

    /// Incremented every time the directory's content changes.
    fn revision(&self) -> u64 {
        self.revision
    }

    /// Once the directory has been read completely (see the module doc).
    fn ready(&self) -> bool {
        self.ready
    }

    /// Read what inotify reported; rescan when due (or on every poll when
    /// the directory is not watched). A directory that cannot be listed is
    /// an error (the caller keeps enforcing what it had).
    fn poll(&mut self) -> std::io::Result<bool> {
        self.ensure_watch();
        self.drain();
        let mut changed = false;
        let news = self
            .watch
            .as_mut()
            .map(|w| std::mem::take(&mut w.news))
            .unwrap_or_default();
        for name in &news.names {
            let path = self.dir.join(name);
            changed |= self.read(&path);
        }
        let due = match (&self.watch, self.last_rescan) {
            (None, _) | (_, None) => true,
            (Some(_), Some(t)) => news.rescan || t.elapsed() >= self.rescan_every,
        };
        if due || !self.ready {
            let mode = if !self.ready || news.rescan || self.read_all_next {
                ScanMode::All
            } else if self.watch.is_some() {
                ScanMode::Closed
            } else {
                ScanMode::Settled
            };
            let (c, complete) = self.scan(mode)?;
            self.read_all_next = false;
            changed |= c;
            if !self.ready {
                if complete {
                    self.ready = true;
                    changed = true;
                    tracing::info!(dir = %self.dir.display(), files = self.files.len(), "manifests directory read");
                } else if !self.waiting_logged {
                    self.waiting_logged = true;
                    tracing::warn!(
                        dir = %self.dir.display(),
                        "no readable manifests yet: not ready, keeping what the datapath enforces"
                    );
                }
            }
        }
        if changed {
            self.revision += 1;
        }
        Ok(changed)
    }

    /// Waits for inotify events on the directory (records them for the
    /// next `poll`). Never resolves while the directory is not watched: the
    /// run loop's tick polls it then.
    fn changed(&mut self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            let Some(w) = self.watch.as_mut() else {
                return std::future::pending().await;
            };
            if let WatchFd::Plain(_) = w.fd {
                let WatchFd::Plain(ino) = std::mem::replace(&mut w.fd, WatchFd::Moving) else {
                    unreachable!("matched above")
                };
                // SAFETY: the Inotify owns its fd and keeps it open for as
                // long as the AsyncFd owns the Inotify.
                let registered = unsafe {
                    tokio::io::unix::AsyncFd::register_with_interest(
                        ino,
                        tokio::io::Interest::READABLE,
                    )
                };
                match registered {
                    Ok(a) => w.fd = WatchFd::Async(a),
                    Err(e) => {
                        tracing::warn!("registering the inotify watch: {e}; polling");
                        return std::future::pending().await;
                    }
                }
            }
            let WatchFd::Async(afd) = &mut w.fd else {
                return std::future::pending().await;
            };
            let news = &mut w.news;
            let dir = &self.dir;
            let mut buf = [0u8; 8192];
            loop {
                let Ok(mut guard) = afd.readable_mut().await else {
                    return std::future::pending().await;
                };
                match guard.try_io(|inner| {
                    inner
                        .get_mut()
                        .read_events(&mut buf)
                        .map(|ev| news.absorb(dir, ev))
                }) {
                    // Only what `poll` acts on wakes the run loop (not a
                    // temporary file's creation, say).
                    Ok(Ok(())) if news.is_empty() => continue,
                    Ok(Ok(())) => return,
                    Ok(Err(_)) => {
                        news.rescan = true;
                        return;
                    }
                    Err(_would_block) => continue,
                }
            }
        })
    }

    /// The cluster as the files describe it now (merged in path order: a
    /// later file's object replaces an earlier one's of the same name).
    fn snapshot(&self) -> Snapshot {
        let mut snap = Snapshot::default();
        for f in self.files.values() {
            snap.errors.extend(f.errors.iter().map(|e| e.to_string()));
            snap.errors.extend(f.convert_errors.iter().cloned());
            let m = &f.model;
            for ns in m.namespaces.values() {
                snap.cluster.upsert_namespace(ns.clone());
            }
            for p in m.pods.values() {
                snap.cluster.upsert_pod(p.clone());
            }
            for p in m.policies.values() {
                snap.cluster.upsert_policy(p.clone());
            }
            for n in m.nodes.values() {
                snap.cluster.upsert_node(n.clone());
            }
            for p in m.cluster_policies.values() {
                snap.cluster.upsert_cluster_policy(p.clone());
            }
        }
        snap.errors.extend(not_enforced(&snap.cluster));
        snap
    }

    /// Per file read since the last call: the objects it held before and
    /// holds now, each compared with what is in force (converted once, when
    /// the file was read).
    fn take_changes(&mut self) -> Changes {
        let retired = std::mem::take(&mut self.retired);
        let touched = std::mem::take(&mut self.touched);
        let mut out = Vec::new();
        let files = &self.files;
        let g = &mut self.given;
        use SourceChange::Compiler as C;
        merge_kind(
            files,
            &retired,
            &touched,
            |c| &c.namespaces,
            &mut g.namespaces,
            &mut out,
            |k, v| match v {
                Some(v) => C(Change::UpsertNamespace(v.clone())),
                None => C(Change::RemoveNamespace(k.clone())),
            },
        );
        merge_kind(
            files,
            &retired,
            &touched,
            |c| &c.nodes,
            &mut g.nodes,
            &mut out,
            |k, v| match v {
                Some(v) => C(Change::UpsertNode(v.clone())),
                None => C(Change::RemoveNode(k.clone())),
            },
        );
        merge_kind(
            files,
            &retired,
            &touched,
            |c| &c.pods,
            &mut g.pods,
            &mut out,
            |k, v| match v {
                Some(v) => C(Change::UpsertPod(v.clone())),
                None => C(Change::RemovePod(k.clone())),
            },
        );
        merge_kind(
            files,
            &retired,
            &touched,
            |c| &c.policies,
            &mut g.policies,
            &mut out,
            |k, v| match v {
                Some(v) => C(Change::UpsertPolicy(v.clone())),
                None => C(Change::RemovePolicy(k.clone())),
            },
        );
        merge_kind(
            files,
            &retired,
            &touched,
            |c| &c.cluster_policies,
            &mut g.cluster_policies,
            &mut out,
            |k, v| match v {
                Some(v) => C(Change::UpsertClusterPolicy(v.clone())),
                None => C(Change::RemoveClusterPolicy(k.clone())),
            },
        );
        let at = Instant::now();
        Changes::List(
            out.into_iter()
                .map(|change| Stamped { at, change })
                .collect(),
        )
    }

    fn errors(&self) -> Vec<String> {
        let mut errors: Vec<String> = self
            .files
            .values()
            .flat_map(|f| {
                f.errors
                    .iter()
                    .map(|e| e.to_string())
                    .chain(f.convert_errors.iter().cloned())
            })
            .collect();
        errors.extend(not_enforced(&self.given));
        errors
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;
    use crate::model::{Peer, PolicyRef};

    const POLICY: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-client
  namespace: x
spec:
  podSelector: {}
  ingress:
  - from:
    - podSelector:
        matchLabels:
          role: client
";

    const NAMESPACE: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: x\n";

    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Self {
            let d =
                std::env::temp_dir().join(format!("netpol-source-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).expect("creating the test directory");
            Self(d)
        }

        /// Write as the lab and kubectl-like tools do: a dotfile renamed
        /// into place.
        fn write(&self, name: &str, text: &str) {
            let tmp = self.0.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, text).expect("writing");
            std::fs::rename(&tmp, self.0.join(name)).expect("renaming");
        }

        fn path(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// The `from` peers of the policy's first ingress rule.
    fn peers(src: &DirSource) -> Option<Vec<Peer>> {
        let snap = src.snapshot();
        let p = snap
            .cluster
            .policies
            .get(&PolicyRef::new("x", "allow-client"))?;
        Some(p.ingress.as_ref().expect("ingress rules")[0].peers.clone())
    }

    fn only_clients(peers: &Option<Vec<Peer>>) -> bool {
        matches!(
            peers.as_deref(),
            Some([Peer::Pods {
                pod_selector: Some(_),
                ..
            }])
        )
    }

    #[test]
    fn an_empty_directory_is_not_ready_and_a_missing_one_is_an_error() {
        let d = Dir::new("empty");
        let mut src = DirSource::new(&d.0);
        assert!(!src.poll().expect("an empty directory lists"));
        assert!(
            !src.ready(),
            "an empty directory must not count as an empty cluster"
        );
        assert!(!src.poll().expect("polls again"));
        assert!(!src.ready());
        // A non-manifest file does not make it ready either.
        d.write("README", "not a manifest");
        src.poll().expect("poll");
        assert!(!src.ready());
        d.write("ns.yaml", NAMESPACE);
        assert!(
            src.poll().expect("poll"),
            "the first complete read is a change"
        );
        assert!(src.ready());
        assert_eq!(src.snapshot().cluster.namespaces.len(), 1);

        let mut missing = DirSource::new(d.path("nope"));
        assert!(
            missing.poll().is_err(),
            "a directory that cannot be listed is an error"
        );
        assert!(!missing.ready());
    }

    #[test]
    fn a_cluster_network_policy_is_read_and_its_invalid_field_named() {
        let d = Dir::new("cnp");
        d.write("ns.yaml", NAMESPACE);
        d.write(
            "node.yaml",
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: n1\n  labels:\n    zone: a\n\
             status:\n  addresses:\n  - type: InternalIP\n    address: 192.168.0.1\n",
        );
        d.write(
            "cnp.yaml",
            r#"apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata:
  name: deny-metadata
spec:
  tier: Admin
  priority: 5
  subject:
    namespaces: {}
  egress:
  - action: Deny
    to:
    - networks: [169.254.169.254/32]
  - action: Accept
    to:
    - domainNames: [example.com]
"#,
        );
        let mut src = DirSource::new(&d.0);
        src.poll().expect("poll");
        let snap = src.snapshot();
        let cnp = &snap.cluster.cluster_policies["deny-metadata"];
        assert_eq!(cnp.priority, 5);
        assert_eq!(cnp.egress.len(), 2);
        assert_eq!(snap.cluster.nodes["n1"].addresses.len(), 1);
        // Enforced: no "not enforced" notice.
        assert!(
            !snap.errors.iter().any(|e| e.contains("NOT ENFORCED")),
            "{:?}",
            snap.errors
        );
        assert!(
            snap.errors
                .iter()
                .any(|e| e.contains("spec.egress[1].to[0].domainNames")),
            "{:?}",
            snap.errors
        );
    }

    #[test]
    fn nodes_peers_without_node_objects_are_reported_as_not_enforced() {
        use crate::model::build::*;
        let c = cluster().cluster_policy(
            admin("no-nodes")
                .subject(in_namespaces(all()))
                .egress(deny().peer(peer_nodes(all()))),
        );
        let lines: Vec<String> = not_enforced(&c).collect();
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains("no-nodes") && lines[0].contains("`nodes` peers"));
        let c = c.node(node("n1"));
        assert_eq!(not_enforced(&c).count(), 0, "Node objects known");
    }

    #[test]
    fn a_file_read_again_hands_over_only_what_changed_in_it() {
        let dir = Dir::new("changes");
        dir.write("ns.yaml", NAMESPACE);
        dir.write("policy.yaml", POLICY);
        let mut src = DirSource::new(&dir.0).without_inotify();
        src.poll().expect("poll");
        let Changes::List(first) = src.take_changes() else {
            panic!("the directory source says what changed")
        };
        assert_eq!(first.len(), 2, "{first:?}");
        // The policy's file rewritten with another rule: one upsert.
        dir.write(
            "policy.yaml",
            &POLICY.replace("role: client", "role: server"),
        );
        src.poll().expect("poll");
        src.poll().expect("poll");
        let Changes::List(second) = src.take_changes() else {
            panic!("the directory source says what changed")
        };
        assert!(
            matches!(
                second.as_slice(),
                [Stamped {
                    change: SourceChange::Compiler(Change::UpsertPolicy(_)),
                    ..
                }]
            ),
            "{second:?}"
        );
        // The file deleted: its policy goes; the namespace stays.
        std::fs::remove_file(dir.path("policy.yaml")).expect("remove");
        src.poll().expect("poll");
        let Changes::List(third) = src.take_changes() else {
            panic!("the directory source says what changed")
        };
        assert!(
            matches!(
                third.as_slice(),
                [Stamped {
                    change: SourceChange::Compiler(Change::RemovePolicy(_)),
                    ..
                }]
            ),
            "{third:?}"
        );
        assert!(matches!(src.take_changes(), Changes::List(l) if l.is_empty()));
    }

    #[test]
    fn a_write_is_read_at_close_without_waiting_for_the_rescan() {
        let d = Dir::new("close");
        d.write("ns.yaml", NAMESPACE);
        let mut src = DirSource::new(&d.0).with_rescan(Duration::from_secs(3600));
        src.poll().expect("first read");
        assert!(src.watching(), "inotify should watch {}", d.0.display());
        assert!(peers(&src).is_none());
        let rev = src.revision();
        // Written in place (no rename): read on IN_CLOSE_WRITE.
        std::fs::write(d.path("policy.yaml"), POLICY).expect("writing");
        assert!(src.poll().expect("poll"));
        assert!(src.revision() > rev);
        assert!(only_clients(&peers(&src)), "{:?}", peers(&src));
        // Deleted: gone.
        std::fs::remove_file(d.path("policy.yaml")).expect("removing");
        assert!(src.poll().expect("poll"));
        assert!(peers(&src).is_none());
        // Nothing new: nothing changed, and no rescan was due.
        assert!(!src.poll().expect("poll"));
    }

    #[tokio::test]
    async fn changed_wakes_the_run_loop_on_a_write() {
        let d = Dir::new("wake");
        d.write("ns.yaml", NAMESPACE);
        let mut src = DirSource::new(&d.0).with_rescan(Duration::from_secs(3600));
        src.poll().expect("first read");
        // Nothing written: no wake.
        assert!(
            tokio::time::timeout(Duration::from_millis(100), src.changed())
                .await
                .is_err(),
            "woken without a change"
        );
        let writer = {
            let d = d.0.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                let tmp = d.join(".policy.yaml.tmp");
                std::fs::write(&tmp, POLICY).expect("writing");
                std::fs::rename(&tmp, d.join("policy.yaml")).expect("renaming");
            })
        };
        tokio::time::timeout(Duration::from_secs(10), src.changed())
            .await
            .expect("changed() resolves after a rename into the directory");
        writer.join().expect("writer");
        // A temporary file's events alone may wake it first; the rename
        // follows at once.
        let mut applied = src.poll().expect("poll");
        if !applied {
            tokio::time::timeout(Duration::from_secs(10), src.changed())
                .await
                .expect("the rename wakes it");
            applied = src.poll().expect("poll");
        }
        assert!(applied);
        assert!(only_clients(&peers(&src)));
    }

    #[test]
    fn a_half_written_file_keeps_the_previous_contents() {
        let d = Dir::new("half");
        d.write("ns.yaml", NAMESPACE);
        d.write("policy.yaml", POLICY);
        // Rescan on every poll: the safety net must not read the half file
        // either.
        let mut src = DirSource::new(&d.0).with_rescan(Duration::ZERO);
        src.poll().expect("first read");
        assert!(only_clients(&peers(&src)));

        // A writer truncates the file and has written up to `from:` (which
        // alone would parse as `from: null`: every peer allowed).
        let cut = &POLICY[..POLICY.find("from:").expect("from") + "from:".len()];
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(d.path("policy.yaml"))
            .expect("opening for writing");
        f.write_all(cut.as_bytes()).expect("writing half");
        f.flush().expect("flush");
        for _ in 0..3 {
            src.poll().expect("poll");
            assert!(
                only_clients(&peers(&src)),
                "a file still being written was read: {:?}",
                peers(&src)
            );
        }
        // The writer is cut short mid-token and closes: the file does not
        // parse, so the last good contents stay, and the error says where.
        f.write_all(b"\n    - podSelector: {matchLabels: {role: cl")
            .expect("writing");
        drop(f);
        src.poll().expect("poll");
        assert!(only_clients(&peers(&src)), "{:?}", peers(&src));
        let errors = src.snapshot().errors;
        assert_eq!(errors.len(), 1, "{errors:?}");
        let file = d.path("policy.yaml").display().to_string();
        assert!(
            errors[0].starts_with(&format!("{file}:")) && errors[0].contains("last good"),
            "{errors:?}"
        );
        let line: usize = errors[0][file.len() + 1..]
            .split(':')
            .next()
            .and_then(|l| l.parse().ok())
            .expect("a line number");
        assert!(
            line >= 10,
            "the error names the line of the cut: {errors:?}"
        );

        // The complete file: the new contents apply, the error is gone.
        d.write(
            "policy.yaml",
            &POLICY.replace("role: client", "role: frontend"),
        );
        assert!(src.poll().expect("poll"));
        assert!(only_clients(&peers(&src)));
        assert!(src.snapshot().errors.is_empty());
    }

    #[test]
    fn an_emptied_file_keeps_its_contents_until_deleted() {
        let d = Dir::new("emptied");
        d.write("policy.yaml", POLICY);
        let mut src = DirSource::new(&d.0);
        src.poll().expect("first read");
        std::fs::write(d.path("policy.yaml"), "").expect("truncating");
        src.poll().expect("poll");
        assert!(
            only_clients(&peers(&src)),
            "an emptied file dropped its policy"
        );
        assert!(src.snapshot().errors[0].contains("empty"));
        std::fs::remove_file(d.path("policy.yaml")).expect("removing");
        src.poll().expect("poll");
        assert!(peers(&src).is_none());
    }

    #[test]
    fn without_inotify_a_change_is_read_once_it_settles() {
        let d = Dir::new("poll");
        d.write("ns.yaml", NAMESPACE);
        d.write("policy.yaml", POLICY);
        let mut src = DirSource::new(&d.0).without_inotify();
        src.poll().expect("first read");
        assert!(!src.watching());
        assert!(only_clients(&peers(&src)));
        let broad = POLICY.replace(
            "  - from:\n    - podSelector:\n        matchLabels:\n          role: client\n",
            "  - from:\n",
        );
        std::fs::write(d.path("policy.yaml"), &broad).expect("writing");
        assert!(!src.poll().expect("poll"), "read before it settled");
        assert!(only_clients(&peers(&src)));
        assert!(
            src.poll().expect("poll"),
            "read once two polls saw the same file"
        );
        assert_eq!(
            peers(&src),
            Some(vec![]),
            "`from:` with no peers: every peer"
        );
    }

    #[test]
    fn a_directory_replaced_is_read_again_whole() {
        let d = Dir::new("replaced");
        d.write("ns.yaml", NAMESPACE);
        d.write("policy.yaml", POLICY);
        let mut src = DirSource::new(&d.0).with_rescan(Duration::from_secs(3600));
        src.poll().expect("first read");
        assert!(only_clients(&peers(&src)));
        // The directory goes: an error, the last state stays.
        std::fs::remove_dir_all(&d.0).expect("removing");
        assert!(src.poll().is_err());
        assert!(src.ready());
        assert!(only_clients(&peers(&src)));
        // It comes back with the policy under another file name: it is read
        // in the same poll that forgets the old file.
        std::fs::create_dir_all(&d.0).expect("recreating");
        d.write("ns.yaml", NAMESPACE);
        d.write("policy-renamed.yaml", POLICY);
        assert!(src.poll().expect("poll"));
        assert!(src.watching(), "watched again");
        assert!(only_clients(&peers(&src)), "{:?}", peers(&src));
        // And changes are seen through the new watch.
        std::fs::remove_file(d.path("policy-renamed.yaml")).expect("removing");
        assert!(src.poll().expect("poll"));
        assert!(peers(&src).is_none());
    }

    #[test]
    fn a_configmap_symlink_swap_is_read() {
        // A ConfigMap volume: `policy.yaml -> ..data/policy.yaml`,
        // `..data -> ..v1`; an update swaps `..data` by rename.
        let d = Dir::new("configmap");
        std::fs::create_dir(d.path("..v1")).expect("mkdir");
        std::fs::write(d.path("..v1/policy.yaml"), POLICY).expect("writing");
        std::fs::write(d.path("..v1/ns.yaml"), NAMESPACE).expect("writing");
        std::os::unix::fs::symlink("..v1", d.path("..data")).expect("symlink");
        for f in ["policy.yaml", "ns.yaml"] {
            std::os::unix::fs::symlink(format!("..data/{f}"), d.path(f)).expect("symlink");
        }
        let mut src = DirSource::new(&d.0).with_rescan(Duration::from_secs(3600));
        src.poll().expect("first read");
        assert!(only_clients(&peers(&src)));

        std::fs::create_dir(d.path("..v2")).expect("mkdir");
        std::fs::write(
            d.path("..v2/policy.yaml"),
            POLICY.replace("allow-client", "other"),
        )
        .expect("writing");
        std::fs::write(d.path("..v2/ns.yaml"), NAMESPACE).expect("writing");
        std::os::unix::fs::symlink("..v2", d.path("..data_tmp")).expect("symlink");
        std::fs::rename(d.path("..data_tmp"), d.path("..data")).expect("swap");
        assert!(src.poll().expect("poll"));
        assert!(peers(&src).is_none(), "the old policy is gone");
        let snap = src.snapshot();
        assert!(
            snap.cluster
                .policies
                .contains_key(&PolicyRef::new("x", "other"))
        );
    }
}
