//! `--source kube`: cluster state from the Kubernetes API.
//!
//! Five kube-runtime [`watcher()`]s (Namespaces, Pods in all namespaces,
//! NetworkPolicies, and for the post-DNAT egress verdict ServiceCIDRs and
//! Services) feed one store. Each object is converted with
//! [`crate::convert`] as it arrives and only the light [`crate::model`] is
//! kept, with the conversion problems of each object: at 100k pods the full
//! objects would cost far more than the model does. At most one list page of
//! full objects ([`Options::page_size`]) is in memory at a time.
//!
//! What the snapshot promises:
//! - [`KubeSource::ready`] is false until the initial list of every kind has
//!   completed; until then the agent keeps enforcing what its maps hold.
//! - A relist (startup, a `410 Gone` after the watch fell out of the API
//!   server's window, a watch that could not be resumed) is buffered and
//!   applied as one atomic replace of that kind's objects when it completes
//!   (`InitDone`). Nothing is removed before then, so a snapshot never shows a
//!   half-listed cluster, and a relist that was interrupted leaves the
//!   previous state in force.
//! - The revision only moves when the model or the reported problems change:
//!   a relist that returns the same objects, a bookmark, or a pod status
//!   update that the model does not keep does not cause a recompile.
//! - Watch errors are logged and retried with backoff; the last state stays
//!   in force meanwhile (enforcement is never dropped because the API server
//!   is unreachable).
//!
//! Lists use the default, consistent semantics (`resourceVersion` unset), not
//! `any_semantic()`: a list served from a lagging watch cache could take the
//! agent back in time after a relist (a deleted allow policy would briefly
//! reappear and open traffic). Since Kubernetes 1.31 consistent lists are
//! served from the watch cache anyway (ConsistentListFromCache), so the
//! cheaper semantic buys little. Bookmarks stay enabled (kube-runtime's
//! default): they keep the resume point fresh, so a reconnect resumes the
//! watch instead of relisting.

use std::{
    collections::BTreeMap,
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use futures::StreamExt as _;
use k8s_openapi::api::{core::v1 as core, networking::v1 as net};
use kube::{
    Api, Client, Resource,
    config::{InferConfigError, KubeConfigOptions, Kubeconfig, KubeconfigError},
    runtime::{
        WatchStreamExt as _,
        utils::Backoff,
        watcher::{self, DefaultBackoff, Event, watcher},
    },
};
use serde::de::DeserializeOwned;
use thiserror::Error;
use tokio::task::JoinHandle;

use crate::{
    compiler::Change,
    convert, crd,
    model::{self, Cluster, ObjectRef},
    source::{Changes, ClusterSource, Snapshot, SourceChange, Stamped},
};

/// The kinds the source watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Namespace,
    Pod,
    NetworkPolicy,
    /// networking.k8s.io/v1 ServiceCIDR: the ranges ClusterIPs come from.
    ServiceCidr,
    /// Services, for their external and load-balancer IPs.
    Service,
    /// policy.networking.k8s.io/v1alpha2 ClusterNetworkPolicy, a CRD that
    /// may not be installed: then there are none (see [`watch`]).
    ClusterNetworkPolicy,
    /// Nodes, for their labels and addresses (ClusterNetworkPolicy `nodes`
    /// peers).
    Node,
}

impl Kind {
    /// Every watched kind, in the order their problems are reported.
    pub const ALL: [Kind; 7] = [
        Kind::Namespace,
        Kind::Pod,
        Kind::NetworkPolicy,
        Kind::ServiceCidr,
        Kind::Service,
        Kind::ClusterNetworkPolicy,
        Kind::Node,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::ServiceCidr => "ServiceCIDR",
            Kind::Service => "Service",
            Kind::ClusterNetworkPolicy => "ClusterNetworkPolicy",
            Kind::Node => "Node",
        })
    }
}

/// Why the source could not be set up or stopped working.
#[derive(Debug, Error)]
pub enum KubeSourceError {
    /// Neither `KUBECONFIG`, `~/.kube/config` nor the in-cluster service
    /// account gave a configuration.
    #[error("no Kubernetes API configuration found: {source}")]
    Infer {
        #[source]
        source: InferConfigError,
    },
    /// `--kubeconfig` could not be read or used.
    #[error("kubeconfig {}: {source}", path.display())]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: KubeconfigError,
    },
    /// The client for the API server could not be built (TLS, auth).
    #[error("Kubernetes client for {server}: {source}")]
    Client {
        server: String,
        #[source]
        source: kube::Error,
    },
    /// The watchers were to be started outside a tokio runtime.
    #[error("the Kubernetes watchers must start inside a tokio runtime")]
    NoRuntime,
}

/// Reads the client configuration: `kubeconfig` when given, otherwise
/// inferred (`KUBECONFIG`, `~/.kube/config`, then the in-cluster service
/// account). A client is built from it once and dropped, so that bad
/// certificates or keys fail here, at startup, rather than on every poll.
pub async fn load_config(kubeconfig: Option<&Path>) -> Result<kube::Config, KubeSourceError> {
    let config = read_config(kubeconfig).await?;
    Client::try_from(config.clone()).map_err(|source| KubeSourceError::Client {
        server: config.cluster_url.to_string(),
        source,
    })?;
    Ok(config)
}

async fn read_config(kubeconfig: Option<&Path>) -> Result<kube::Config, KubeSourceError> {
    match kubeconfig {
        Some(path) => {
            let err = |source| KubeSourceError::Kubeconfig {
                path: path.to_path_buf(),
                source,
            };
            let kc = Kubeconfig::read_from(path).map_err(err)?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(err)
        }
        None => kube::Config::infer()
            .await
            .map_err(|source| KubeSourceError::Infer { source }),
    }
}

/// Tuning of the watchers.
#[derive(Clone, Debug)]
pub struct Options {
    /// Objects per list page during a (re)list; bounds how many full objects
    /// are in memory at once. Default 500, like client-go.
    pub page_size: u32,
    /// Delays between retries after a failed list or watch. `None` (the
    /// default): kube-runtime's `default_backoff()` (0.8 s doubling to 30 s,
    /// jittered, reset after two minutes without errors).
    pub retry: Option<Retry>,
    /// How long a watcher of an optional kind (a CRD: ClusterNetworkPolicy)
    /// waits before it lists again after the API server said the resource
    /// does not exist, on top of the retry delay. Every node's agent asks,
    /// so on a cluster without the CRD this bounds the load of 404s. Default
    /// one minute: a CNP created after its CRD is installed is seen within
    /// about that.
    pub absent_recheck: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            page_size: 500,
            retry: None,
            absent_recheck: Duration::from_secs(60),
        }
    }
}

/// An exponential retry delay without jitter: `first`, doubling up to `max`,
/// back to `first` once a list or watch succeeds again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retry {
    pub first: Duration,
    pub max: Duration,
}

/// [`Retry`] as a kube-runtime [`Backoff`].
#[derive(Debug)]
struct RetryBackoff {
    retry: Retry,
    next: Duration,
}

impl Iterator for RetryBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let d = self.next;
        self.next = (d * 2).min(self.retry.max);
        Some(d)
    }
}

impl Backoff for RetryBackoff {
    fn reset(&mut self) {
        self.next = self.retry.first;
    }
}

/// A backoff that only progress resets. kube-runtime's `StreamBackoff` resets
/// its backoff on every successful item, and the watcher yields `Init` right
/// before each list attempt, so a list that keeps failing (403, refused, a
/// relist after 410) was retried at the first step forever: about once a
/// second per kind and node. Here `StreamBackoff`'s resets do nothing; the
/// watch loop resets the shared backoff itself when a list completes or an
/// object arrives.
#[derive(Clone)]
struct ProgressBackoff(Arc<Mutex<Box<dyn Backoff>>>);

impl ProgressBackoff {
    /// Real progress was made: the next failure starts from the first delay.
    fn progressed(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).reset();
    }
}

impl Iterator for ProgressBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).next()
    }
}

impl Backoff for ProgressBackoff {
    /// `StreamBackoff` calls this on every successful item, `Init` included:
    /// ignored (see [`ProgressBackoff::progressed`]).
    fn reset(&mut self) {}
}

/// Cluster state watched from the Kubernetes API (see the module docs).
///
/// The watchers start on [`KubeSource::start`] or on the first
/// [`ClusterSource::poll`], which must run inside the tokio runtime that is
/// to drive them (the agent's). Dropping the source stops them.
pub struct KubeSource {
    store: Arc<Mutex<Store>>,
    server: String,
    options: Options,
    /// The configuration, until the watchers are started.
    config: Option<kube::Config>,
    tasks: Vec<(Kind, JoinHandle<()>)>,
    /// Where the watchers run and the client they share, once started: a
    /// watcher that stops is spawned again with them.
    runtime: Option<(tokio::runtime::Handle, Client)>,
    /// Per kind: when a stopped watcher may be restarted, and the delay
    /// after that (doubling to [`RESTART_MAX`]; reset by a watcher that ran
    /// [`RESTART_MAX`] without stopping).
    restarts: Vec<Restart>,
    /// Revision seen by the last `poll`.
    polled: u64,
}

/// First delay before a stopped watcher is spawned again.
const RESTART_FIRST: Duration = Duration::from_secs(1);
/// Longest delay between restarts of one kind's watcher.
const RESTART_MAX: Duration = Duration::from_secs(30);

/// Restart bookkeeping of one kind's watcher.
#[derive(Debug, Clone, Copy)]
struct Restart {
    /// When the current task was spawned.
    started: std::time::Instant,
    /// When it was first seen stopped, if it is.
    stopped_at: Option<std::time::Instant>,
    /// Wait after a stop before the next spawn.
    delay: Duration,
    /// How many times this kind's watcher was spawned again.
    count: u64,
}

impl Restart {
    fn new() -> Self {
        Self {
            started: std::time::Instant::now(),
            stopped_at: None,
            delay: RESTART_FIRST,
            count: 0,
        }
    }
}

/// Spawns one kind's watcher task.
fn spawn_watcher(
    runtime: &tokio::runtime::Handle,
    kind: Kind,
    client: &Client,
    options: &Options,
    store: &Arc<Mutex<Store>>,
) -> JoinHandle<()> {
    let (client, options, store) = (client.clone(), options.clone(), store.clone());
    match kind {
        Kind::Namespace => runtime.spawn(watch::<core::Namespace>(client, options, store)),
        Kind::Pod => runtime.spawn(watch::<core::Pod>(client, options, store)),
        Kind::NetworkPolicy => runtime.spawn(watch::<net::NetworkPolicy>(client, options, store)),
        Kind::ServiceCidr => runtime.spawn(watch::<net::ServiceCIDR>(client, options, store)),
        Kind::Service => runtime.spawn(watch::<core::Service>(client, options, store)),
        Kind::ClusterNetworkPolicy => {
            runtime.spawn(watch::<crd::ClusterNetworkPolicy>(client, options, store))
        }
        Kind::Node => runtime.spawn(watch::<core::Node>(client, options, store)),
    }
}

impl fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeSource")
            .field("server", &self.server)
            .field("started", &self.config.is_none())
            .field("revision", &self.revision())
            .finish_non_exhaustive()
    }
}

impl KubeSource {
    /// A source for the API server of `config`; nothing is contacted before
    /// [`KubeSource::start`] (or the first poll).
    pub fn new(config: kube::Config, options: Options) -> Self {
        Self {
            store: Arc::default(),
            server: config.cluster_url.to_string(),
            options,
            config: Some(config),
            tasks: Vec::new(),
            runtime: None,
            restarts: Kind::ALL.iter().map(|_| Restart::new()).collect(),
            polled: 0,
        }
    }

    /// Builds the client and spawns the three watchers on the current tokio
    /// runtime. Does nothing if they already run.
    pub fn start(&mut self) -> Result<(), KubeSourceError> {
        let Some(config) = self.config.take() else {
            return Ok(());
        };
        let runtime = match tokio::runtime::Handle::try_current() {
            Ok(h) => h,
            Err(_) => {
                self.config = Some(config);
                return Err(KubeSourceError::NoRuntime);
            }
        };
        // Building the client spawns its request buffer on this runtime.
        let client = match Client::try_from(config.clone()) {
            Ok(client) => client,
            Err(source) => {
                // Left unstarted: the next poll tries again.
                self.config = Some(config);
                return Err(KubeSourceError::Client {
                    server: self.server.clone(),
                    source,
                });
            }
        };
        self.tasks = Kind::ALL
            .into_iter()
            .map(|kind| {
                (
                    kind,
                    spawn_watcher(&runtime, kind, &client, &self.options, &self.store),
                )
            })
            .collect();
        self.runtime = Some((runtime, client));
        tracing::info!(
            server = %self.server,
            "watching namespaces, pods, network policies, service CIDRs, services, cluster network policies and nodes"
        );
        Ok(())
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    /// Spawns again every watcher whose task has ended (a panic, or a stream
    /// that ended although its backoff never gives up), after a delay that
    /// doubles per kind from [`RESTART_FIRST`] to [`RESTART_MAX`]. Until
    /// then the kind is reported stopped ([`ClusterSource::health`]: the
    /// agent is not ready), and the state it last delivered stays in force;
    /// the new watcher lists again and replaces that state atomically.
    fn restart_stopped(&mut self, now: std::time::Instant) {
        let Some((runtime, client)) = &self.runtime else {
            return;
        };
        for (kind, task) in &mut self.tasks {
            let r = &mut self.restarts[kind.index()];
            if !task.is_finished() {
                if r.started.elapsed() >= RESTART_MAX {
                    r.delay = RESTART_FIRST;
                }
                continue;
            }
            let stopped_at = *r.stopped_at.get_or_insert_with(|| {
                tracing::error!(
                    %kind,
                    restart_in = ?r.delay,
                    "the {kind} watcher stopped: its changes are not seen until it is restarted; the last state stays in force"
                );
                now
            });
            if now.duration_since(stopped_at) < r.delay {
                continue;
            }
            *task = spawn_watcher(runtime, *kind, client, &self.options, &self.store);
            r.count += 1;
            r.started = now;
            r.stopped_at = None;
            r.delay = (r.delay * 2).min(RESTART_MAX);
            tracing::warn!(%kind, restarts = r.count, "restarted the {kind} watcher");
        }
    }

    /// How many times each kind's watcher was restarted after it stopped.
    pub fn watcher_restarts(&self) -> Vec<(Kind, u64)> {
        Kind::ALL
            .into_iter()
            .map(|kind| (kind, self.restarts[kind.index()].count))
            .collect()
    }

    /// Stops one kind's watcher as a crash would (for tests of the restart).
    #[doc(hidden)]
    pub fn abort_watcher(&mut self, kind: Kind) {
        if let Some((_, task)) = self.tasks.iter().find(|(k, _)| *k == kind) {
            task.abort();
        }
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for (_, task) in &self.tasks {
            task.abort();
        }
    }
}

impl ClusterSource for KubeSource {
    /// Starts the watchers if needed; true if the revision moved since the
    /// last call. Fails if a watcher task has died (the state it left stays
    /// in force).
    fn poll(&mut self) -> std::io::Result<bool> {
        self.start().map_err(std::io::Error::other)?;
        self.restart_stopped(std::time::Instant::now());
        let revision = self.revision();
        let changed = revision != self.polled;
        self.polled = revision;
        Ok(changed)
    }

    /// Incremented when the model or the reported problems change, and once
    /// when the source becomes ready.
    fn revision(&self) -> u64 {
        self.store().revision
    }

    /// The model and every object's conversion problems (namespaces, then
    /// pods, then policies), and one line per ClusterNetworkPolicy whose
    /// `nodes` peers cannot be enforced (no Node watch yet).
    fn snapshot(&self) -> Snapshot {
        let store = self.store();
        let mut errors: Vec<String> = store
            .errors
            .iter()
            .flat_map(|by_object| by_object.values().flatten().cloned())
            .collect();
        errors.extend(crate::source::not_enforced(&store.cluster));
        Snapshot {
            cluster: store.cluster.clone(),
            errors,
        }
    }

    /// True once the initial list of every kind has completed.
    fn ready(&self) -> bool {
        self.store().ready()
    }

    /// Resolves on the next change a watcher records (at once if one came
    /// since the last wait): the run loop does not wait for its tick.
    fn changed(&mut self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        let notify = self.store().notify.clone();
        Box::pin(async move { notify.notified().await })
    }

    /// The watch events that changed the model, one change each, and each
    /// relist as the changes between the old objects and the new ones.
    fn take_changes(&mut self) -> Changes {
        Changes::List(std::mem::take(&mut self.store().changes))
    }

    fn errors(&self) -> Vec<String> {
        let store = self.store();
        let mut errors: Vec<String> = store
            .errors
            .iter()
            .flat_map(|by_object| by_object.values().flatten().cloned())
            .collect();
        errors.extend(crate::source::not_enforced(&store.cluster));
        errors
    }

    fn describe(&self) -> String {
        format!("kube:{}", self.server)
    }

    fn health(&self) -> crate::health::SourceHealth {
        let failing = self
            .store()
            .failing_since
            .iter()
            .zip(Kind::ALL)
            .filter_map(|(since, kind)| Some((kind.to_string(), (*since)?.elapsed())))
            .collect();
        let stopped = self
            .tasks
            .iter()
            .filter(|(_, t)| t.is_finished())
            .map(|(kind, _)| kind.to_string())
            .collect();
        let restarts = self
            .watcher_restarts()
            .into_iter()
            .map(|(kind, n)| (kind.to_string(), n))
            .collect();
        crate::health::SourceHealth {
            failing,
            stopped,
            restarts,
        }
    }
}

fn lock(store: &Mutex<Store>) -> MutexGuard<'_, Store> {
    // Updates never panic halfway, so a poisoned store is still consistent.
    store
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What the watchers maintain and the agent reads.
#[derive(Debug, Default)]
struct Store {
    cluster: Cluster,
    /// Conversion problems by object, per kind (`Kind::index`).
    errors: [BTreeMap<ObjectRef, Vec<String>>; Kind::ALL.len()],
    /// Whether each kind's initial list has completed.
    listed: [bool; Kind::ALL.len()],
    /// Since when each kind's watch has been failing (cleared by the first
    /// object the API server delivers again).
    failing_since: [Option<std::time::Instant>; Kind::ALL.len()],
    revision: u64,
    /// Model changes not handed over yet ([`ClusterSource::take_changes`]):
    /// one per watch event that changed the model, and for a relist the
    /// changes between the old objects of its kind and the new ones.
    changes: Vec<Stamped<SourceChange>>,
    /// Wakes the run loop on each change ([`ClusterSource::changed`]).
    notify: Arc<tokio::sync::Notify>,
}

/// One object, converted.
struct Entry<L> {
    /// `None` when the object could not be converted at all.
    value: Option<L>,
    errors: Vec<String>,
}

/// A relist in progress: what the pages held so far.
struct Relist<K: Watched> {
    objects: BTreeMap<K::Key, K::Light>,
    errors: BTreeMap<ObjectRef, Vec<String>>,
}

impl<K: Watched> Default for Relist<K> {
    fn default() -> Self {
        Self {
            objects: BTreeMap::new(),
            errors: BTreeMap::new(),
        }
    }
}

impl<K: Watched> Relist<K> {
    fn add(&mut self, obj: &K) {
        let id = object_ref(obj);
        let entry = obj.light();
        if let Some(v) = entry.value {
            self.objects.insert(K::key(&id), v);
        }
        if !entry.errors.is_empty() {
            self.errors.insert(id, entry.errors);
        }
    }
}

impl Store {
    fn ready(&self) -> bool {
        self.listed.iter().all(|l| *l)
    }

    /// An added or modified object. True if the model or the problems
    /// changed.
    fn apply<K: Watched>(&mut self, id: ObjectRef, entry: Entry<K::Light>) -> bool {
        let key = K::key(&id);
        let objects = K::objects(&mut self.cluster);
        let at = std::time::Instant::now();
        let mut changed = match entry.value {
            Some(v) => {
                if objects.get(&key) == Some(&v) {
                    false
                } else {
                    self.changes.push(Stamped {
                        at,
                        change: K::change(&key, Some(&v)),
                    });
                    objects.insert(key, v);
                    true
                }
            }
            None => match objects.remove(&key) {
                Some(_) => {
                    self.changes.push(Stamped {
                        at,
                        change: K::change(&key, None),
                    });
                    true
                }
                None => false,
            },
        };
        let errors = &mut self.errors[K::KIND.index()];
        if entry.errors.is_empty() {
            changed |= errors.remove(&id).is_some();
        } else if errors.get(&id) != Some(&entry.errors) {
            errors.insert(id, entry.errors);
            changed = true;
        }
        if changed {
            self.revision += 1;
            self.notify.notify_one();
        }
        changed
    }

    /// A deleted object. True if it was known.
    fn delete<K: Watched>(&mut self, id: &ObjectRef) -> bool {
        let key = K::key(id);
        let removed = K::objects(&mut self.cluster).remove(&key).is_some();
        if removed {
            self.changes.push(Stamped {
                at: std::time::Instant::now(),
                change: K::change(&key, None),
            });
        }
        let changed = self.errors[K::KIND.index()].remove(id).is_some() || removed;
        if changed {
            self.revision += 1;
            self.notify.notify_one();
        }
        changed
    }

    /// A completed (re)list replaces every object of its kind at once.
    /// Returns whether anything changed, and the replaced state (to be
    /// dropped outside the lock).
    fn replace<K: Watched>(&mut self, relist: Relist<K>) -> (bool, Relist<K>) {
        let was_ready = self.ready();
        let objects = K::objects(&mut self.cluster);
        let errors = &mut self.errors[K::KIND.index()];
        let changed = *objects != relist.objects || *errors != relist.errors;
        let old = if changed {
            self.revision += 1;
            self.notify.notify_one();
            // The relist as changes: what it removed, added and modified.
            let at = std::time::Instant::now();
            for k in objects.keys() {
                if !relist.objects.contains_key(k) {
                    self.changes.push(Stamped {
                        at,
                        change: K::change(k, None),
                    });
                }
            }
            for (k, v) in &relist.objects {
                if objects.get(k) != Some(v) {
                    self.changes.push(Stamped {
                        at,
                        change: K::change(k, Some(v)),
                    });
                }
            }
            Relist {
                objects: std::mem::replace(objects, relist.objects),
                errors: std::mem::replace(errors, relist.errors),
            }
        } else {
            relist
        };
        self.listed[K::KIND.index()] = true;
        if !was_ready && self.ready() {
            // The agent compiles once the source is ready, whatever the
            // lists held.
            self.revision += 1;
            self.notify.notify_one();
        }
        (changed, old)
    }
}

/// `namespace/name` of an object (empty namespace for a Namespace).
fn object_ref<K: Resource>(obj: &K) -> ObjectRef {
    let meta = obj.meta();
    ObjectRef::new(
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// A watched kind: how its objects become model entries.
trait Watched:
    Resource<DynamicType = ()> + Clone + DeserializeOwned + fmt::Debug + Send + Sync + 'static
{
    const KIND: Kind;
    /// A kind served by a CRD that may not be installed: a list answered
    /// with 404 means there are no such objects (the kind counts as listed,
    /// empty), and the watcher keeps checking with its backoff.
    const OPTIONAL: bool = false;
    /// Key of the model's map for this kind.
    type Key: Ord + Clone + Send + 'static;
    /// The model's value for this kind.
    type Light: Clone + PartialEq + Send + 'static;
    /// The model's map for this kind.
    fn objects(cluster: &mut Cluster) -> &mut BTreeMap<Self::Key, Self::Light>;
    fn key(id: &ObjectRef) -> Self::Key;
    fn light(&self) -> Entry<Self::Light>;
    /// The change that sets (`Some`) or removes an object of this kind.
    fn change(key: &Self::Key, value: Option<&Self::Light>) -> SourceChange;
}

impl Watched for core::Namespace {
    const KIND: Kind = Kind::Namespace;
    type Key = String;
    type Light = model::Namespace;
    fn objects(cluster: &mut Cluster) -> &mut BTreeMap<String, model::Namespace> {
        &mut cluster.namespaces
    }
    fn key(id: &ObjectRef) -> String {
        id.name.clone()
    }
    fn light(&self) -> Entry<model::Namespace> {
        match convert::namespace(self) {
            Ok(ns) => Entry {
                value: Some(ns),
                errors: Vec::new(),
            },
            Err(e) => Entry {
                value: None,
                errors: vec![e.to_string()],
            },
        }
    }
    fn change(key: &String, value: Option<&model::Namespace>) -> SourceChange {
        SourceChange::Compiler(match value {
            Some(v) => Change::UpsertNamespace(v.clone()),
            None => Change::RemoveNamespace(key.clone()),
        })
    }
}

impl Watched for core::Pod {
    const KIND: Kind = Kind::Pod;
    type Key = ObjectRef;
    type Light = model::Pod;
    fn objects(cluster: &mut Cluster) -> &mut BTreeMap<ObjectRef, model::Pod> {
        &mut cluster.pods
    }
    fn key(id: &ObjectRef) -> ObjectRef {
        id.clone()
    }
    fn light(&self) -> Entry<model::Pod> {
        converted(convert::pod(self))
    }
    fn change(key: &ObjectRef, value: Option<&model::Pod>) -> SourceChange {
        SourceChange::Compiler(match value {
            Some(v) => Change::UpsertPod(v.clone()),
            None => Change::RemovePod(key.clone()),
        })
    }
}

impl Watched for net::NetworkPolicy {
    const KIND: Kind = Kind::NetworkPolicy;
    type Key = ObjectRef;
    type Light = model::NetworkPolicy;
    fn objects(cluster: &mut Cluster) -> &mut BTreeMap<ObjectRef, model::NetworkPolicy> {
        &mut cluster.policies
    }
    fn key(id: &ObjectRef) -> ObjectRef {
        id.clone()
    }
    fn light(&self) -> Entry<model::NetworkPolicy> {
        converted(convert::network_policy(self))
    }
    fn change(key: &ObjectRef, value: Option<&model::NetworkPolicy>) -> SourceChange {
        SourceChange::Compiler(match value {
            Some(v) => Change::UpsertPolicy(v.clone()),
            None => Change::RemovePolicy(key.clone()),
        })
    }
}

impl Watched for net::ServiceCIDR {
    const KIND: Kind = Kind::ServiceCidr;
    type Key = String;
    type Light = Vec<ipnet::IpNet>;
    fn objects(cluster: &mut Cluster) -> &mut BTreeMap<String, Vec<ipnet::IpNet>> {
        &mut cluster.service_cidrs
    }
    fn key(id: &ObjectRef) -> String {
        id.name.clone()
    }
    fn light(&self) -> Entry<Vec<ipnet::IpNet>> {
        let mut errors = Vec::new();
        let mut cidrs = Vec::new();
        for (i, c) in self
            .spec
            .as_ref()
            .and_then(|s| s.cidrs.as_ref())
            .into_iter()
            .flatten()
            .enumerate()
        {
            match c.parse::<ipnet::IpNet>() {
                Ok(net) => cidrs.push(net.trunc()),
                Err(e) => errors.push(format!("spec.cidrs[{i}] {c:?}: {e}")),
            }
        }
        Entry {
            value: Some(cidrs),
            errors,
        }
    }
    fn change(key: &String, value: Option<&Vec<ipnet::IpNet>>) -> SourceChange {
        SourceChange::ServiceCidrs {
            name: key.clone(),
            cidrs: value.cloned(),
        }
    }
}

impl Watched for core::Service {
    const KIND: Kind = Kind::Service;
    type Key = ObjectRef;
    type Light = Vec<IpAddr>;
    fn objects(cluster: &mut Cluster) -> &mut BTreeMap<ObjectRef, Vec<IpAddr>> {
        &mut cluster.service_ips
    }
    fn key(id: &ObjectRef) -> ObjectRef {
        id.clone()
    }
    fn light(&self) -> Entry<Vec<IpAddr>> {
        let mut errors = Vec::new();
        let mut ips = Vec::new();
        let external = self
            .spec
            .as_ref()
            .and_then(|s| s.external_ips.as_ref())
            .into_iter()
            .flatten()
            .enumerate()
            .map(|(i, ip)| (format!("spec.externalIPs[{i}]"), ip));
        let lb = self
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|l| l.ingress.as_ref())
            .into_iter()
            .flatten()
            .enumerate()
            .filter_map(|(i, ing)| {
                Some((
                    format!("status.loadBalancer.ingress[{i}].ip"),
                    ing.ip.as_ref()?,
                ))
            });
        for (field, ip) in external.chain(lb) {
            match ip.parse::<IpAddr>() {
                Ok(ip) => ips.push(ip),
                Err(e) => errors.push(format!("{field} {ip:?}: {e}")),
            }
        }
        Entry {
            value: Some(ips),
            errors,
        }
    }
    fn change(key: &ObjectRef, value: Option<&Vec<IpAddr>>) -> SourceChange {
        SourceChange::ServiceIps {
            service: key.clone(),
            ips: value.cloned(),
        }
    }
}

impl Watched for crd::ClusterNetworkPolicy {
    const KIND: Kind = Kind::ClusterNetworkPolicy;
    const OPTIONAL: bool = true;
    type Key = String;
    type Light = model::ClusterNetworkPolicy;
    fn objects(cluster: &mut Cluster) -> &mut BTreeMap<String, model::ClusterNetworkPolicy> {
        &mut cluster.cluster_policies
    }
    fn key(id: &ObjectRef) -> String {
        id.name.clone()
    }
    fn light(&self) -> Entry<model::ClusterNetworkPolicy> {
        converted(convert::cluster_network_policy(self))
    }
    fn change(key: &String, value: Option<&model::ClusterNetworkPolicy>) -> SourceChange {
        SourceChange::Compiler(match value {
            Some(v) => Change::UpsertClusterPolicy(v.clone()),
            None => Change::RemoveClusterPolicy(key.clone()),
        })
    }
}

impl Watched for core::Node {
    const KIND: Kind = Kind::Node;
    type Key = String;
    type Light = model::Node;
    fn objects(cluster: &mut Cluster) -> &mut BTreeMap<String, model::Node> {
        &mut cluster.nodes
    }
    fn key(id: &ObjectRef) -> String {
        id.name.clone()
    }
    fn light(&self) -> Entry<model::Node> {
        converted(convert::node(self))
    }
    fn change(key: &String, value: Option<&model::Node>) -> SourceChange {
        SourceChange::Compiler(match value {
            Some(v) => Change::UpsertNode(v.clone()),
            None => Change::RemoveNode(key.clone()),
        })
    }
}

/// Whether a watcher error says the resource does not exist on the API
/// server (its CRD is not installed).
fn not_found(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => status.code == 404,
        watcher::Error::WatchError(status) => status.code == 404,
        _ => false,
    }
}

fn converted<T>(r: Result<convert::Converted<T>, convert::ConvertError>) -> Entry<T> {
    match r {
        Ok(c) => Entry {
            value: Some(c.value),
            errors: c.errors.iter().map(ToString::to_string).collect(),
        },
        Err(e) => Entry {
            value: None,
            errors: vec![e.to_string()],
        },
    }
}

/// How often a failing watch's kind is probed with a small list.
const PROBE_EVERY: Duration = Duration::from_secs(10);

/// One kind's watcher task: list, then watch, relisting when the API server
/// says the resume point is gone; runs until aborted.
async fn watch<K: Watched>(client: Client, options: Options, store: Arc<Mutex<Store>>) {
    let kind = K::KIND;
    let config = watcher::Config::default().page_size(options.page_size);
    // `DefaultBackoff` is what `WatchStreamExt::default_backoff()` applies.
    let backoff: Box<dyn Backoff> = match options.retry {
        None => Box::new(DefaultBackoff::default()),
        Some(retry) => Box::new(RetryBackoff {
            retry,
            next: retry.first,
        }),
    };
    let backoff = ProgressBackoff(Arc::new(Mutex::new(backoff)));
    let api = Api::<K>::all(client);
    let mut events = std::pin::pin!(watcher(api.clone(), config).backoff(backoff.clone()));
    let mut relist: Option<Relist<K>> = None;
    let mut failing = false;
    // An optional kind whose resource is absent (logged once per absence).
    let mut absent = false;
    // A watch that resumes from its resource version yields nothing until
    // an object changes: no event says it is back. While the watch fails,
    // a small list (one object's metadata, served from the API server's
    // watch cache) every PROBE_EVERY tells whether this kind can be read
    // again, so readiness does not stay down on a quiet cluster.
    let mut probe = tokio::time::interval(PROBE_EVERY);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            _ = probe.tick(), if failing => {
                if api.list_metadata(&kube::api::ListParams::default().limit(1)).await.is_ok() {
                    failing = false;
                    lock(&store).failing_since[kind.index()] = None;
                    tracing::info!(%kind, "the API server answers again: watch recovered");
                }
                continue;
            }
        };
        let Some(event) = event else {
            break;
        };
        match event {
            Ok(event) => {
                // `Init` comes before every list attempt: only what the API
                // server actually delivered counts as recovery.
                if !matches!(event, Event::Init | Event::InitApply(_))
                    && std::mem::take(&mut failing)
                {
                    lock(&store).failing_since[kind.index()] = None;
                    tracing::info!(%kind, "watch recovered");
                }
                if matches!(event, Event::InitDone) && std::mem::take(&mut absent) {
                    tracing::info!(%kind, "the resource is served now (its CRD was installed)");
                }
                match event {
                    Event::Init => {
                        tracing::debug!(%kind, "listing");
                        relist = Some(Relist::default());
                    }
                    Event::InitApply(obj) => relist.get_or_insert_with(Relist::default).add(&obj),
                    Event::InitDone => {
                        backoff.progressed();
                        let listed = relist.take().unwrap_or_default();
                        let count = listed.objects.len();
                        let (changed, old) = lock(&store).replace(listed);
                        drop(old);
                        tracing::info!(%kind, objects = count, changed, "list complete");
                    }
                    Event::Apply(obj) => {
                        backoff.progressed();
                        let id = object_ref(&obj);
                        let entry = obj.light();
                        drop(obj);
                        if lock(&store).apply::<K>(id.clone(), entry) {
                            tracing::debug!(%kind, object = %id, "applied");
                        }
                    }
                    Event::Delete(obj) => {
                        backoff.progressed();
                        let id = object_ref(&obj);
                        if lock(&store).delete::<K>(&id) {
                            tracing::debug!(%kind, object = %id, "deleted");
                        }
                    }
                }
            }
            Err(e) if K::OPTIONAL && not_found(&e) => {
                // No CRD, no such objects: the kind counts as listed and
                // empty, so readiness does not wait for a CRD that a
                // cluster may never install. The backoff keeps listing, and
                // a list that succeeds once the CRD is installed replaces
                // the empty state.
                relist = None;
                let (changed, old) = lock(&store).replace(Relist::<K>::default());
                drop(old);
                if !std::mem::replace(&mut absent, true) {
                    tracing::warn!(
                        %kind,
                        changed,
                        recheck = ?options.absent_recheck,
                        "the API server does not serve {kind} (404: its CRD is not installed): none apply; checking again periodically"
                    );
                }
                // The stream is pulled: while we sleep it sends nothing.
                tokio::time::sleep(options.absent_recheck).await;
            }
            Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                tracing::info!(%kind, "watch expired (410 Gone): relisting; the last state stays in force");
            }
            Err(e) => {
                if !failing {
                    // The first probe one period after the failure.
                    probe.reset();
                }
                failing = true;
                lock(&store).failing_since[kind.index()]
                    .get_or_insert_with(std::time::Instant::now);
                tracing::warn!(%kind, "watch failed, retrying with backoff; the last state stays in force: {e}");
            }
        }
    }
    // The backoff never gives up, so the stream does not end.
    tracing::error!(%kind, "watcher ended");
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn ns(name: &str, team: &str) -> core::Namespace {
        core::Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some([("team".to_string(), team.to_string())].into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn entry(n: &core::Namespace) -> (ObjectRef, Entry<model::Namespace>) {
        (object_ref(n), n.light())
    }

    #[test]
    fn apply_bumps_only_on_change() {
        let mut s = Store::default();
        let (id, e) = entry(&ns("a", "x"));
        assert!(s.apply::<core::Namespace>(id, e));
        let (id, e) = entry(&ns("a", "x"));
        assert!(!s.apply::<core::Namespace>(id, e));
        let (id, e) = entry(&ns("a", "y"));
        assert!(s.apply::<core::Namespace>(id.clone(), e));
        assert_eq!(s.revision, 2);
        assert!(s.delete::<core::Namespace>(&id));
        assert!(!s.delete::<core::Namespace>(&id));
        assert_eq!(s.revision, 3);
    }

    #[test]
    fn relist_replaces_atomically_and_only_bumps_on_change() {
        let mut s = Store::default();
        let mut r = Relist::<core::Namespace>::default();
        r.add(&ns("a", "x"));
        r.add(&ns("b", "x"));
        let (changed, _) = s.replace(r);
        assert!(changed);
        assert!(!s.ready());
        let rev = s.revision;
        let mut same = Relist::<core::Namespace>::default();
        same.add(&ns("a", "x"));
        same.add(&ns("b", "x"));
        assert!(!s.replace(same).0);
        assert_eq!(s.revision, rev);
        let mut fewer = Relist::<core::Namespace>::default();
        fewer.add(&ns("a", "x"));
        assert!(s.replace(fewer).0);
        assert_eq!(s.cluster.namespaces.len(), 1);
    }

    /// The names of the namespaces upserted and removed by these changes.
    fn names_of(changes: Vec<Stamped<SourceChange>>) -> Vec<String> {
        changes
            .into_iter()
            .map(|c| match c.change {
                SourceChange::Compiler(Change::UpsertNamespace(ns)) => format!("+{}", ns.name),
                SourceChange::Compiler(Change::RemoveNamespace(n)) => format!("-{n}"),
                other => panic!("not a namespace change: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn events_become_changes_one_to_one_and_a_relist_the_differences() {
        let mut s = Store::default();
        let (id, e) = entry(&ns("a", "x"));
        s.apply::<core::Namespace>(id, e);
        // The same object again changes nothing: no change.
        let (id, e) = entry(&ns("a", "x"));
        s.apply::<core::Namespace>(id.clone(), e);
        s.delete::<core::Namespace>(&id);
        assert_eq!(names_of(std::mem::take(&mut s.changes)), ["+a", "-a"]);
        let mut r = Relist::<core::Namespace>::default();
        r.add(&ns("a", "x"));
        r.add(&ns("b", "x"));
        s.replace(r);
        assert_eq!(names_of(std::mem::take(&mut s.changes)), ["+a", "+b"]);
        // A relist: b gone, a modified, c new; nothing for what stayed.
        let mut r = Relist::<core::Namespace>::default();
        r.add(&ns("a", "y"));
        r.add(&ns("c", "x"));
        s.replace(r);
        assert_eq!(names_of(std::mem::take(&mut s.changes)), ["-b", "+a", "+c"]);
    }

    #[test]
    fn retry_doubles_to_max_and_resets() {
        let retry = Retry {
            first: Duration::from_millis(10),
            max: Duration::from_millis(30),
        };
        let mut b = RetryBackoff {
            retry,
            next: retry.first,
        };
        let ms: Vec<u128> = b.by_ref().take(4).map(|d| d.as_millis()).collect();
        assert_eq!(ms, [10, 20, 30, 30]);
        b.reset();
        assert_eq!(b.next(), Some(Duration::from_millis(10)));
    }
}
