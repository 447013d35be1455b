//! `cargo xtask conformance`: the upstream Kubernetes NetworkPolicy e2e model
//! (`test/e2e/network/netpol` in kubernetes/kubernetes) run in the lab with the real agents.
//!
//! The cluster is `conformance/cluster.yaml` (namespaces x, y, z with pods a, b, c on a routed
//! and a bridged node); the cases are data, `conformance/cases/*.yaml` (format and list in
//! `conformance/README.md`). For every case the runner puts the cluster back the way the
//! cluster file says, then for every step: changes labels and policies (waiting after each
//! change until every agent has synced it), checks long-lived connections, probes the cells of
//! the expected tables (1 s timeout, probed once more after a mismatch), runs SCTP cells
//! through the TC programs with `BPF_PROG_TEST_RUN` (no SCTP sockets here), and compares.
//!
//! Every expectation is also checked against the compiler's reference evaluator
//! (`compiler::reference::allowed`) on the cluster the agents read (the manifests directory):
//! the case files and the evaluator check each other, and a disagreement fails the case and is
//! reported on its own.
//!
//! `--reference-only` does that last part alone, on a planned lab (no namespaces, no agents,
//! no root).

mod backend;
mod case;
mod check;
mod sctp;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use backend::Backend;
use case::{AddPod, Case, ConnState, Labels, Step};
use netpol_agent::{
    compiler::NodeInfo,
    model::Cluster,
    source::{ClusterSource as _, DirSource},
};
use netpol_lab::{
    ClusterSpec, Comparison, Family, Lab, PodSpec, PodState, PortSpec, ProbeResults, ProbeSpec,
    Protocol, StreamHandle, TableKey, TruthTable, UpOptions, start_stream,
};

/// The workspace root (case and cluster paths are relative to it).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("conformance/ is in the workspace")
        .to_path_buf()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The agent and lab binaries: `cargo xtask conformance` builds them and
/// passes their paths; else they are looked for next to this executable.
fn bins() -> Result<(PathBuf, PathBuf)> {
    let find = |env: &str, name: &str| -> Result<PathBuf> {
        if let Some(p) = std::env::var_os(env) {
            return Ok(PathBuf::from(p));
        }
        let me = std::env::current_exe().context("own path")?;
        let p = me.with_file_name(name);
        if p.is_file() {
            Ok(p)
        } else {
            bail!(
                "{name} not found next to {} (set {env}, or run `cargo xtask conformance`, which builds it)",
                me.display()
            )
        }
    };
    Ok((
        find("NETPOL_AGENT_BIN", "netpol-agent")?,
        find("NETPOL_LAB_BIN", "netpol-lab")?,
    ))
}

/// How long a connection expected to be alive may take to echo (a connection that was cut
/// and is allowed again recovers at TCP's next retransmission, which backs off).
const ALIVE_WINDOW: Duration = Duration::from_secs(8);
/// How long a connection expected to be cut must stay without an echo.
const CUT_WINDOW: Duration = Duration::from_secs(2);
/// How often a long-lived connection sends (one message in flight at a time).
const STREAM_INTERVAL: Duration = Duration::from_millis(100);
/// Per probe attempt.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(clap::Parser)]
#[command(
    name = "netpol-conformance",
    about = "The upstream NetworkPolicy e2e model in the lab, with the real agents"
)]
pub struct ConformanceArgs {
    /// Only the cases whose name contains this.
    #[arg(long)]
    pub filter: Option<String>,
    /// The cluster file.
    #[arg(long, default_value = DEFAULT_CLUSTER)]
    pub cluster: PathBuf,
    /// The directory of case files.
    #[arg(long, default_value = DEFAULT_CASES)]
    pub cases: PathBuf,
    /// Only check the case files against the reference evaluator (no lab, no root).
    #[arg(long)]
    pub reference_only: bool,
    /// List the cases and the upstream tests they mirror, and exit.
    #[arg(long)]
    pub list: bool,
    /// Leave the lab and its agents running afterwards (`cargo xtask lab down <name>`).
    #[arg(long)]
    pub keep: bool,
}

const DEFAULT_CLUSTER: &str = "conformance/cluster.yaml";
const DEFAULT_CASES: &str = "conformance/cases";

impl Default for ConformanceArgs {
    /// Every case, as `cargo xtask conformance` without options runs them.
    fn default() -> Self {
        ConformanceArgs {
            filter: None,
            cluster: DEFAULT_CLUSTER.into(),
            cases: DEFAULT_CASES.into(),
            reference_only: false,
            list: false,
            keep: false,
        }
    }
}

fn main() -> Result<()> {
    run(<ConformanceArgs as clap::Parser>::parse())
}

pub fn run(args: ConformanceArgs) -> Result<()> {
    let started = Instant::now();
    let mut spec = ClusterSpec::from_file(&resolve(&args.cluster))
        .with_context(|| format!("reading {}", args.cluster.display()))?;
    let mut cases = case::load_all(&resolve(&args.cases), &spec)?;
    if let Some(filter) = &args.filter {
        cases.retain(|c| c.name.contains(filter.as_str()));
    }
    if cases.is_empty() {
        bail!("no case matches");
    }
    if args.list {
        for c in &cases {
            let upstream = c.upstream.as_deref().unwrap_or("(beyond upstream)");
            println!("{:<46} {upstream}", c.name);
            if let Some(d) = &c.description {
                println!("{:<46} {d}", "");
            }
        }
        return Ok(());
    }

    let original = Applied::from_spec(&spec);
    let backend = if args.reference_only {
        Backend::plan(&spec)?
    } else {
        if !is_root() {
            bail!(
                "the conformance run creates network namespaces and loads eBPF programs: run it \
                 as root (or use --reference-only)"
            );
        }
        let (agent_bin, lab_bin) = bins()?;
        let bins = [agent_bin, lab_bin];
        spec.name = format!("conf{}", std::process::id() % 100_000);
        let lab = Lab::up(
            &spec,
            &UpOptions {
                server_exe: Some(bins[1].clone()),
                ..UpOptions::default()
            },
        )
        .map_err(|e| anyhow!("lab up: {e}"))?;
        let mut agents =
            netpol_lab::start_agents(&lab, &bins[0], &[]).context("starting the agents")?;
        agents
            .wait_synced(&[], Duration::from_secs(30))
            .map_err(|e| anyhow!("{e}"))?;
        Backend::Lab { agents, lab }
    };
    println!(
        "== conformance: {} cases, lab {} ({} nodes, {} pods){}",
        cases.len(),
        backend.state().name,
        backend.state().nodes.len(),
        backend.state().pods.len(),
        if backend.is_live() {
            ""
        } else {
            ", reference evaluator only"
        }
    );

    let model_ports = spec
        .pods
        .iter()
        .find(|p| p.namespace == "x" && p.name == "a")
        .or(spec.pods.first())
        .map(|p| p.ports.clone())
        .unwrap_or_default();
    let mut runner = Runner {
        nodes: backend.nodes(),
        backend,
        applied: original.clone(),
        original,
        model_ports,
        released: BTreeMap::new(),
    };
    let mut outcomes = Vec::new();
    let width = cases.len().to_string().len();
    for (i, case) in cases.iter().enumerate() {
        let outcome = runner.run_case(case);
        println!(
            "[{:>width$}/{}] {} {} ({:.1} s)",
            i + 1,
            cases.len(),
            if outcome.passed() { "PASS" } else { "FAIL" },
            case.name,
            outcome.elapsed.as_secs_f64()
        );
        if !outcome.passed() {
            println!(
                "        {}{}",
                case.file
                    .strip_prefix(workspace_root())
                    .unwrap_or(&case.file)
                    .display(),
                case.upstream
                    .as_deref()
                    .map(|u| format!(", upstream: {u}"))
                    .unwrap_or_default()
            );
            print!("{}", check::indent(&outcome.report(), 8));
        }
        outcomes.push((case, outcome));
        if let Err(e) = runner.backend.check_agents() {
            println!("== stopping: {e:#}");
            break;
        }
    }

    let disagreements: Vec<_> = outcomes
        .iter()
        .flat_map(|(case, o)| o.reference.iter().map(move |f| (case, f)))
        .collect();
    println!(
        "\n== reference evaluator vs the case files: {} disagreement(s)",
        disagreements.len()
    );
    for (case, f) in &disagreements {
        println!("   {}: {}", case.name, f.summary);
    }
    // Cases that did not run (the run stopped early) count as failed.
    let failed = cases.len() - outcomes.iter().filter(|(_, o)| o.passed()).count();
    println!("== {:.0} s in all", started.elapsed().as_secs_f64());
    println!("{} passed, {failed} failed", cases.len() - failed);

    if args.keep
        && let Backend::Lab { agents, lab } = runner.backend
    {
        let state = lab.keep();
        // Dropping `Agents` would stop the agents and remove their pins; `netpol-lab down`
        // stops them with the lab instead.
        std::mem::forget(agents);
        println!(
            "lab {} left running; remove it with `cargo xtask lab down {}`",
            state.name, state.name
        );
    }
    if failed > 0 {
        bail!("{failed} conformance case(s) failed");
    }
    Ok(())
}

fn resolve(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        workspace_root().join(p)
    }
}

/// The pods, labels and policies the lab holds now (as far as the runner changed them).
#[derive(Clone, PartialEq, Eq)]
struct Applied {
    namespace_labels: BTreeMap<String, Labels>,
    /// Labels of every pod there is.
    pod_labels: BTreeMap<String, Labels>,
    /// Pods a case added, by `namespace/name`.
    added: BTreeMap<String, AddPod>,
    /// The policies file's text; `None` when there is none.
    policies: Option<String>,
}

impl Applied {
    fn from_spec(spec: &ClusterSpec) -> Applied {
        Applied {
            namespace_labels: spec
                .namespaces
                .iter()
                .map(|n| (n.name.clone(), n.labels.clone()))
                .collect(),
            pod_labels: spec
                .pods
                .iter()
                .map(|p| (format!("{}/{}", p.namespace, p.name), p.labels.clone()))
                .collect(),
            added: BTreeMap::new(),
            policies: None,
        }
    }
}

struct Runner {
    backend: Backend,
    nodes: Vec<NodeInfo>,
    /// The cluster as the cluster file describes it (each case starts from it).
    original: Applied,
    applied: Applied,
    /// Container ports of pods added without a list of their own.
    model_ports: Vec<PortSpec>,
    /// Addresses of the pods the current case removed, for `addresses-of`.
    released: BTreeMap<String, (Ipv4Addr, Ipv6Addr)>,
}

/// Something that did not go as expected, with the details to print.
struct Failure {
    /// One line.
    summary: String,
    /// Tables and the like.
    details: String,
}

#[derive(Default)]
struct Outcome {
    /// The datapath (probes, test runs, connections) differed from the case file, or the case
    /// could not run.
    failures: Vec<Failure>,
    /// The reference evaluator differed from the case file.
    reference: Vec<Failure>,
    elapsed: Duration,
}

impl Outcome {
    fn passed(&self) -> bool {
        self.failures.is_empty() && self.reference.is_empty()
    }

    fn report(&self) -> String {
        let mut out = String::new();
        for f in &self.failures {
            let _ = writeln!(out, "{}", f.summary);
            out.push_str(&check::indent(&f.details, 4));
        }
        for f in &self.reference {
            let _ = writeln!(out, "reference evaluator: {}", f.summary);
            out.push_str(&check::indent(&f.details, 4));
        }
        out
    }
}

impl Runner {
    fn run_case(&mut self, case: &Case) -> Outcome {
        let started = Instant::now();
        let mut outcome = Outcome::default();
        if let Err(e) = self.try_run_case(case, &mut outcome) {
            outcome.failures.push(Failure {
                summary: format!("the case could not run: {e:#}"),
                details: String::new(),
            });
        }
        outcome.elapsed = started.elapsed();
        outcome
    }

    fn try_run_case(&mut self, case: &Case, outcome: &mut Outcome) -> Result<()> {
        let mut desired = self.original.clone();
        let mut policies: BTreeMap<(String, String), serde_yaml::Value> = BTreeMap::new();
        let mut connections = Connections::default();
        self.released.clear();
        for (i, step) in case.steps.iter().enumerate() {
            let n = i + 1;
            for pod in &step.remove_pods {
                desired.added.remove(pod);
                desired.pod_labels.remove(pod);
            }
            for a in &step.add_pods {
                desired.added.insert(a.pod.clone(), a.clone());
                desired.pod_labels.insert(a.pod.clone(), a.labels.clone());
            }
            if step.delete_all {
                policies.clear();
            }
            for id in &step.delete {
                policies.remove(&case.policy_ref(id)?);
            }
            for id in &step.apply {
                let manifest = case::substitute(&case.policies[id], self.backend.state())
                    .with_context(|| format!("policy {id}"))?;
                policies.insert(case.policy_ref(id)?, manifest);
            }
            desired
                .namespace_labels
                .extend(step.namespace_labels.clone());
            desired.pod_labels.extend(step.pod_labels.clone());
            desired.policies = render_policies(&policies)?;
            self.converge(&desired)
                .with_context(|| format!("step {n}: changing the cluster"))?;

            let cluster = self.cluster().with_context(|| format!("step {n}"))?;
            self.open_connections(n, step, &mut connections)?;
            self.check_connections(n, step, &cluster, &connections, outcome)?;
            self.check_expectations(n, step, &cluster, outcome)?;
        }
        Ok(())
    }

    fn open_connections(&self, n: usize, step: &Step, conns: &mut Connections) -> Result<()> {
        for o in &step.open {
            let handle = if self.backend.is_live() {
                let (from, to) = (self.pod(&o.from)?, self.pod(&o.to)?);
                let to_ip = to.ip(o.family.into());
                let stream = start_stream(
                    self.backend.state(),
                    &from,
                    to_ip,
                    o.port,
                    Protocol::Tcp,
                    STREAM_INTERVAL,
                )
                .with_context(|| format!("step {n}: opening connection {}", o.name))?;
                Some(stream)
            } else {
                None
            };
            conns.0.insert(o.name.clone(), (o.clone(), handle));
        }
        Ok(())
    }

    /// Checks the connections a step names, all in the same window: alive when a new echo
    /// comes back within [`ALIVE_WINDOW`], cut when none does for [`CUT_WINDOW`].
    fn check_connections(
        &self,
        n: usize,
        step: &Step,
        cluster: &Cluster,
        conns: &Connections,
        outcome: &mut Outcome,
    ) -> Result<()> {
        let start = Instant::now();
        let before: BTreeMap<&String, u64> = conns
            .0
            .iter()
            .filter_map(|(name, (_, h))| Some((name, h.as_ref()?.echoed())))
            .collect();
        for (name, want) in &step.connections {
            let (spec, handle) = &conns.0[name];
            let (from, to) = (self.pod(&spec.from)?, self.pod(&spec.to)?);
            let family = Family::from(spec.family);
            let what = format!(
                "step {n}: connection {name} ({} -> {}:{} TCP {family})",
                spec.from, spec.to, spec.port
            );
            // A connection lives on exactly when the policies allow it as a new one.
            let allowed = check::reference_allows(
                cluster,
                &self.nodes,
                from.ip(family),
                to.ip(family),
                Protocol::Tcp,
                spec.port,
            );
            if allowed != (*want == ConnState::Alive) {
                outcome.reference.push(Failure {
                    summary: format!(
                        "{what}: the case file says {want}, the reference evaluator says a new \
                         connection is {}",
                        if allowed { "allowed" } else { "denied" }
                    ),
                    details: String::new(),
                });
            }
            let Some(handle) = handle else { continue };
            let deadline = start
                + match want {
                    ConnState::Alive => ALIVE_WINDOW,
                    ConnState::Cut => CUT_WINDOW,
                };
            let echoes = loop {
                if handle.echoed() > before[name] {
                    break true;
                }
                if Instant::now() >= deadline {
                    break false;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            if echoes != (*want == ConnState::Alive) {
                let seen = if echoes {
                    "echoes still come back".to_owned()
                } else {
                    format!("no echo for {:.1} s", (deadline - start).as_secs_f64())
                };
                outcome.failures.push(Failure {
                    summary: format!("{what}: expected {want}, observed: {seen}"),
                    details: String::new(),
                });
            }
        }
        Ok(())
    }

    /// Makes the lab hold `desired`: pods removed, then added, then labels one object at a
    /// time, then the policies file.
    fn converge(&mut self, desired: &Applied) -> Result<()> {
        let gone: Vec<String> = self
            .applied
            .added
            .iter()
            .filter(|(key, a)| desired.added.get(*key) != Some(*a))
            .map(|(key, _)| key.clone())
            .collect();
        for key in gone {
            let removed = self.backend.remove_pod(&key)?;
            self.released
                .insert(key.clone(), (removed.ip_v4, removed.ip_v6));
            self.applied.added.remove(&key);
            self.applied.pod_labels.remove(&key);
        }
        for (key, a) in &desired.added {
            if self.applied.added.contains_key(key) {
                continue;
            }
            let (namespace, name) = key
                .split_once('/')
                .ok_or_else(|| anyhow!("pod {key:?} is not namespace/name"))?;
            let labels = desired.pod_labels.get(key).cloned().unwrap_or_default();
            let spec = PodSpec {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                node: a.node.clone(),
                labels: labels.clone(),
                ports: a.ports.clone().unwrap_or_else(|| self.model_ports.clone()),
            };
            let addresses = match &a.addresses_of {
                Some(other) => Some(*self.released.get(other).ok_or_else(|| {
                    anyhow!("{key}: addresses-of {other}: that pod was not removed")
                })?),
                None => None,
            };
            self.backend.add_pod(spec, addresses)?;
            self.applied.added.insert(key.clone(), a.clone());
            self.applied.pod_labels.insert(key.clone(), labels);
        }
        for (ns, labels) in &desired.namespace_labels {
            if self.applied.namespace_labels.get(ns) != Some(labels) {
                self.backend.set_namespace_labels(ns, labels)?;
                self.applied
                    .namespace_labels
                    .insert(ns.clone(), labels.clone());
            }
        }
        for (pod, labels) in &desired.pod_labels {
            if self.applied.pod_labels.get(pod) != Some(labels) {
                self.backend.set_pod_labels(pod, labels)?;
                self.applied.pod_labels.insert(pod.clone(), labels.clone());
            }
        }
        if self.applied.policies != desired.policies {
            self.backend.write_policies(desired.policies.as_deref())?;
            self.applied.policies = desired.policies.clone();
        }
        Ok(())
    }

    /// The cluster the agents read now, from the manifests directory.
    fn cluster(&self) -> Result<Cluster> {
        let mut source = DirSource::new(self.backend.manifests_dir());
        source.poll().context("reading the manifests directory")?;
        let snapshot = source.snapshot();
        if !snapshot.errors.is_empty() {
            bail!(
                "the manifests do not read cleanly:\n{}",
                snapshot.errors.join("\n")
            );
        }
        Ok(snapshot.cluster)
    }

    fn pod(&self, key: &str) -> Result<PodState> {
        self.backend
            .state()
            .pod_by_key(key)
            .cloned()
            .ok_or_else(|| anyhow!("no pod {key} in the lab"))
    }

    /// Checks every expectation of a step: against the reference evaluator, and (with a lab)
    /// against probes and SCTP test runs.
    fn check_expectations(
        &self,
        n: usize,
        step: &Step,
        cluster: &Cluster,
        outcome: &mut Outcome,
    ) -> Result<()> {
        let lab = self.backend.state();
        for e in &step.expect {
            for key in &e.keys {
                let reference = check::reference_table(&e.table, key, cluster, &self.nodes, lab);
                let cmp = check::compare(&e.table, &reference);
                if !cmp.is_match() {
                    outcome.reference.push(Failure {
                        summary: format!(
                            "step {n}, {key}: {} cell(s) of the case file differ from the \
                             reference evaluator (observed = evaluator)",
                            cmp.mismatches.len()
                        ),
                        details: cmp.render(),
                    });
                }
            }
        }
        if !self.backend.is_live() {
            return Ok(());
        }

        let probed = probe_spec(step);
        if let Some(spec) = &probed {
            let mut results = netpol_lab::probe(lab, spec).context("probing")?;
            let mut retried = false;
            if !mismatches(step, &results).is_empty() {
                results = netpol_lab::probe(lab, spec).context("probing again")?;
                retried = true;
            }
            for (key, expected, cmp) in mismatches(step, &results) {
                let probes: String = cmp
                    .mismatches
                    .iter()
                    .filter_map(|m| {
                        results.results.iter().find(|r| {
                            r.from == m.from
                                && r.to == m.to
                                && r.port == key.port
                                && r.protocol == key.protocol
                                && r.family == key.family
                        })
                    })
                    .map(|r| format!("  {} -> {} ({}): {}\n", r.from, r.to, r.to_ip, r.detail))
                    .collect();
                outcome.failures.push(Failure {
                    summary: format!(
                        "step {n}, {key}: {} of {} judged cell(s) differ from the case file{}",
                        cmp.mismatches.len(),
                        check::judged_cells(expected),
                        if retried { " (probed twice)" } else { "" }
                    ),
                    details: format!("{}what the probes saw:\n{probes}", cmp.render()),
                });
            }
        }

        let sctp: Vec<_> = step
            .expect
            .iter()
            .flat_map(|e| {
                e.keys
                    .iter()
                    .filter(|k| k.protocol == Protocol::Sctp)
                    .map(move |k| (e, k))
            })
            .collect();
        if !sctp.is_empty() {
            let mut datapaths = sctp::Datapaths::load(cluster, &self.nodes)?;
            for (e, key) in sctp {
                let observed = check::try_shaped(&e.table, |from, to| {
                    let (from, to) = (self.pod(from)?, self.pod(to)?);
                    datapaths
                        .allowed(&from, &to, key.port, key.family)
                        .map(Some)
                })
                .with_context(|| format!("step {n}, {key}: test runs"))?;
                let cmp = check::compare(&e.table, &observed);
                if !cmp.is_match() {
                    outcome.failures.push(Failure {
                        summary: format!(
                            "step {n}, {key} (BPF_PROG_TEST_RUN): {} cell(s) differ from the \
                             case file",
                            cmp.mismatches.len()
                        ),
                        details: cmp.render(),
                    });
                }
            }
        }
        Ok(())
    }
}

/// The long-lived connections of a case, by name (no stream without a lab).
#[derive(Default)]
struct Connections(BTreeMap<String, (case::OpenSpec, Option<StreamHandle>)>);

impl Drop for Connections {
    /// Stops every stream at once: a cut TCP stream waits up to 3 s for its last echo.
    fn drop(&mut self) {
        let streams: Vec<StreamHandle> = std::mem::take(&mut self.0)
            .into_values()
            .filter_map(|(_, h)| h)
            .collect();
        std::thread::scope(|s| {
            for stream in streams {
                s.spawn(move || stream.stop());
            }
        });
    }
}

/// The policies file: one YAML document per policy, in namespace/name order.
fn render_policies(
    policies: &BTreeMap<(String, String), serde_yaml::Value>,
) -> Result<Option<String>> {
    if policies.is_empty() {
        return Ok(None);
    }
    let mut text = String::new();
    for manifest in policies.values() {
        text.push_str("---\n");
        text.push_str(&serde_yaml::to_string(manifest)?);
    }
    Ok(Some(text))
}

/// One probe run for every TCP and UDP table of a step: the union of their pods, ports,
/// protocols and families (all cells are probed at once, so the union costs no more time).
fn probe_spec(step: &Step) -> Option<ProbeSpec> {
    let keys: Vec<_> = step
        .expect
        .iter()
        .flat_map(|e| e.keys.iter())
        .filter(|k| k.protocol != Protocol::Sctp)
        .collect();
    if keys.is_empty() {
        return None;
    }
    let mut spec = ProbeSpec {
        ports: Vec::new(),
        protocols: Vec::new(),
        families: Vec::new(),
        timeout: PROBE_TIMEOUT,
        attempts: 1,
        ..ProbeSpec::default()
    };
    for k in keys {
        if !spec.ports.contains(&k.port) {
            spec.ports.push(k.port);
        }
        if !spec.protocols.contains(&k.protocol) {
            spec.protocols.push(k.protocol);
        }
        if !spec.families.contains(&k.family) {
            spec.families.push(k.family);
        }
    }
    let (clients, servers) = step.probed_pods();
    spec.from = Some(clients);
    spec.to = Some(servers);
    Some(spec)
}

/// Every TCP/UDP table of a step whose judged cells differ from the probe results.
fn mismatches<'a>(
    step: &'a Step,
    results: &ProbeResults,
) -> Vec<(TableKey, &'a TruthTable, Comparison)> {
    let mut out = Vec::new();
    for e in &step.expect {
        for key in e.keys.iter().filter(|k| k.protocol != Protocol::Sctp) {
            let table = results.table(key);
            let observed = check::shaped(&e.table, |from, to| table.get(from, to));
            let cmp = check::compare(&e.table, &observed);
            if !cmp.is_match() {
                out.push((*key, &e.table, cmp));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped case files and the reference evaluator agree (no lab, no root).
    #[test]
    fn shipped_cases_agree_with_the_reference_evaluator() {
        let args = ConformanceArgs {
            reference_only: true,
            ..ConformanceArgs::default()
        };
        run(args).unwrap_or_else(|e| panic!("{e:#}"));
    }
}
