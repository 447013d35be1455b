//! `cargo xtask conformance`: the upstream Kubernetes NetworkPolicy e2e model
//! (`test/e2e/network/netpol` in kubernetes/kubernetes) run in the lab with real enforcers.
//!
//! The cluster is `conformance/cluster.yaml` (namespaces x, y, z with pods a, b, c on a routed
//! and a bridged node); the cases are data, `conformance/cases/*.yaml` (format and list in
//! `conformance/README.md`). The run is a table: a row per case, a column per enforcer
//! (`--enforcer`: netpol with the manifests directory, netpol with the API server, the
//! reference peer kube-network-policies, nothing) and per address the probes dial (`--via`:
//! pod IPs, or the ClusterIPs of the pods' Services as upstream's e2e does). One lab serves
//! every column; it has a real control plane (API server, controller-manager, kube-proxy,
//! CoreDNS) when a column needs one.
//!
//! For every case the runner puts the cluster back the way the cluster file says, then for
//! every step: changes pods, labels and policies (waiting after each change until the enforcer
//! has it), checks long-lived connections, probes the cells of the expected tables (1 s
//! timeout, probed once more after a mismatch), runs SCTP cells through netpol's TC programs
//! with `BPF_PROG_TEST_RUN` (no SCTP sockets here), and compares. Known failures are listed in
//! `conformance/expected-failures.yaml`; a listed case that passes fails the run, as does any
//! other failure.
//!
//! Every expectation is also checked against the compiler's reference evaluator
//! (`compiler::reference::allowed`) on the cluster in the manifests directory: the case files
//! and the evaluator check each other, and a disagreement fails the case and is reported on its
//! own.
//!
//! `--reference-only` does that last part alone, on a planned lab (no namespaces, no agents,
//! no root).

mod backend;
mod case;
mod check;
mod enforcer;
mod report;
mod sctp;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use backend::{Backend, Policies, Started};
use case::{AddPod, Case, ConnState, Labels, Step};
use enforcer::{Column, Enforcer, ViaArg, via_name};
use netpol_agent::{
    compiler::NodeInfo,
    model::Cluster,
    source::{ClusterSource as _, DirSource},
};
use netpol_lab::{
    ClusterSpec, Comparison, Family, Lab, PodSpec, PodState, PortSpec, ProbeResults, ProbeSpec,
    Protocol, StreamHandle, TableKey, TruthTable, UpOptions, Via,
    controlplane::{ControlPlaneSpec, ProxyMode},
    start_stream,
};
use report::{Cell, ColumnResult, ExpectedFailures, Report, Verdict};

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

/// kube-proxy's mode in the lab (`--proxy-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyModeArg(ProxyMode);

impl std::str::FromStr for ProxyModeArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.parse::<ProxyMode>()? {
            ProxyMode::None => Err(
                "--proxy-mode none leaves ClusterIPs leading nowhere; use --via pod instead".into(),
            ),
            mode => Ok(ProxyModeArg(mode)),
        }
    }
}

#[derive(clap::Parser)]
#[command(
    name = "netpol-conformance",
    about = "The upstream NetworkPolicy e2e model in the lab, with real enforcers"
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
    /// What enforces, one column (or two, see --via) each: netpol (agents reading the lab's
    /// manifests directory), netpol-kube (agents reading the lab's API server),
    /// kube-network-policies (the reference peer), none (nothing: a baseline). Repeatable or
    /// comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "netpol-kube")]
    pub enforcer: Vec<Enforcer>,
    /// What the probes dial: pod (pod IPs), service (the ClusterIP of each pod's Service, as
    /// upstream's e2e does) or both. Default: both when the lab has a control plane (an
    /// enforcer reads the API server), else pod.
    #[arg(long)]
    pub via: Option<ViaArg>,
    /// kube-proxy's mode in the lab: iptables or nftables.
    #[arg(long, default_value = "iptables")]
    pub proxy_mode: ProxyModeArg,
    /// Cases expected to fail, per enforcer and via, with the reason.
    #[arg(long, default_value = DEFAULT_EXPECTED_FAILURES)]
    pub expected_failures: PathBuf,
    /// Where the results go as JSON (default: target/conformance/results.json).
    #[arg(long)]
    pub results: Option<PathBuf>,
    /// Only check the case files against the reference evaluator (no lab, no root).
    #[arg(long)]
    pub reference_only: bool,
    /// List the cases and the upstream tests they mirror, and exit.
    #[arg(long)]
    pub list: bool,
    /// netpol agents' XDP on the nodes' uplinks (`--xdp` of `netpol-agent run`): off, native,
    /// generic or auto (the agent's default). Run the suite with `--xdp off` and with `--xdp auto`
    /// to check that XDP changes no verdict.
    #[arg(long, default_value = "auto")]
    pub xdp: String,
    /// Leave the lab and the last enforcer running afterwards (`cargo xtask lab down <name>`).
    #[arg(long)]
    pub keep: bool,
}

const DEFAULT_CLUSTER: &str = "conformance/cluster.yaml";
const DEFAULT_CASES: &str = "conformance/cases";
const DEFAULT_EXPECTED_FAILURES: &str = "conformance/expected-failures.yaml";

impl Default for ConformanceArgs {
    /// Every case, as `cargo xtask conformance` without options runs them.
    fn default() -> Self {
        ConformanceArgs {
            filter: None,
            cluster: DEFAULT_CLUSTER.into(),
            cases: DEFAULT_CASES.into(),
            enforcer: vec![Enforcer::NetpolKube],
            via: None,
            proxy_mode: ProxyModeArg(ProxyMode::Iptables),
            expected_failures: DEFAULT_EXPECTED_FAILURES.into(),
            results: None,
            reference_only: false,
            list: false,
            xdp: "auto".into(),
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
    let names: BTreeSet<String> = cases.iter().map(|c| c.name.clone()).collect();
    let expected = ExpectedFailures::load(&resolve(&args.expected_failures), &names)?;
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
    if args.reference_only {
        return run_reference_only(&spec, &cases, started);
    }

    let mut enforcers: Vec<Enforcer> = Vec::new();
    for e in &args.enforcer {
        if !enforcers.contains(e) {
            enforcers.push(*e);
        }
    }
    if enforcers.is_empty() {
        bail!("--enforcer: name at least one");
    }
    let wants_control_plane = enforcers.iter().any(|e| e.needs_control_plane());
    let via = args.via.unwrap_or(if wants_control_plane {
        ViaArg::Both
    } else {
        ViaArg::Pod
    });
    let vias = via.vias();
    let control_plane = wants_control_plane || vias.contains(&Via::Service);
    if !is_root() {
        bail!(
            "the conformance run creates network namespaces and loads eBPF programs: run it \
             as root (or use --reference-only)"
        );
    }
    if control_plane {
        let missing: Vec<String> = netpol_lab::tools::CONTROL_PLANE_TOOLS
            .iter()
            .filter_map(|t| netpol_lab::tools::tool(t).err())
            .map(|e| e.to_string())
            .collect();
        if !missing.is_empty() {
            bail!(
                "{} and --via {} need the lab's control plane, whose tools are missing:\n{}\n\
                 (`--enforcer netpol --via pod` runs without them)",
                enforcers
                    .iter()
                    .map(|e| e.name())
                    .collect::<Vec<_>>()
                    .join(","),
                vias.iter()
                    .map(|v| via_name(*v))
                    .collect::<Vec<_>>()
                    .join(","),
                missing.join("\n")
            );
        }
    }
    let (agent_bin, lab_bin) = bins()?;
    spec.name = format!("conf{}", std::process::id() % 100_000);
    let lab_started = Instant::now();
    let lab = Lab::up(
        &spec,
        &UpOptions {
            server_exe: Some(lab_bin),
            control_plane: control_plane.then(|| ControlPlaneSpec {
                proxy_mode: args.proxy_mode.0,
                ..ControlPlaneSpec::default()
            }),
            ..UpOptions::default()
        },
    )
    .map_err(|e| anyhow!("lab up: {e}"))?;
    // ClusterNetworkPolicy cases need the CRD in the API server before kubectl can apply
    // them: installed from the network-policy-api module's manifest, as users install it.
    if control_plane && cases.iter().any(Case::uses_cluster_network_policy) {
        let cp = lab
            .control_plane
            .as_ref()
            .ok_or_else(|| anyhow!("the lab came up without its control plane"))?;
        netpol_lab::cp_ops::install_cnp_crd(cp)
            .map_err(|e| anyhow!("installing the ClusterNetworkPolicy CRD: {e}"))?;
        println!("== ClusterNetworkPolicy CRD installed (policy.networking.k8s.io/v1alpha2)");
    }
    let backend = Backend::Lab {
        running: backend::Running::Nothing,
        lab,
    };
    println!(
        "== conformance: {} cases, lab {} ({} nodes, {} pods{}; up in {:.0} s); columns: {}",
        cases.len(),
        backend.state().name,
        backend.state().nodes.len(),
        backend.state().pods.len(),
        if control_plane {
            format!(", control plane, kube-proxy {}", args.proxy_mode.0)
        } else {
            String::new()
        },
        lab_started.elapsed().as_secs_f64(),
        enforcers
            .iter()
            .flat_map(|e| vias.iter().map(move |v| format!("{e}/{}", via_name(*v))))
            .collect::<Vec<_>>()
            .join(", ")
    );

    let original = Applied::from_spec(&spec);
    let mut runner = Runner {
        nodes: backend.nodes(),
        backend,
        applied: original.clone(),
        original,
        model_ports: model_ports(&spec),
        released: BTreeMap::new(),
        column: None,
    };
    let deploy_dir = workspace_root().join("deploy");
    let mut columns = Vec::new();
    let mut disagreements = BTreeSet::new();
    for (i, &enforcer) in enforcers.iter().enumerate() {
        let start = Instant::now();
        let started = runner
            .backend
            .start(enforcer, &agent_bin, &deploy_dir, &args.xdp);
        println!(
            "\n== {enforcer}: {} ({:.0} s)",
            match &started {
                Ok(Started::Running) => "started".to_owned(),
                Ok(Started::Unsupported(reason)) => reason.clone(),
                Err(e) => format!("could not start: {e:#}"),
            },
            start.elapsed().as_secs_f64()
        );
        let mut broken: Option<String> = None;
        for &via in &vias {
            let column = Column { enforcer, via };
            let result = match (&started, &broken) {
                (Ok(Started::Running), None) => {
                    let result = runner.run_column(column, &cases, &expected, &mut disagreements);
                    broken = result.error.clone();
                    result
                }
                (Ok(Started::Running), Some(e)) => ColumnResult {
                    column,
                    unsupported: None,
                    error: Some(format!("not run: {e}")),
                    cells: vec![Cell::new(Verdict::NotRun, None); cases.len()],
                    seconds: 0.0,
                },
                (Ok(Started::Unsupported(reason)), _) => ColumnResult {
                    column,
                    unsupported: Some(reason.clone()),
                    error: None,
                    // A case the enforcer does not implement says so, whatever else stops it.
                    cells: cases
                        .iter()
                        .map(|case| {
                            let why = unsupported_case(enforcer, case).unwrap_or(reason);
                            Cell::new(Verdict::Unsupported, Some(why.to_owned()))
                        })
                        .collect(),
                    seconds: 0.0,
                },
                (Err(e), _) => {
                    let why = format!("{enforcer} could not start: {e:#}");
                    ColumnResult {
                        column,
                        unsupported: None,
                        error: Some(why.clone()),
                        cells: vec![Cell::new(Verdict::Fail, Some(why)); cases.len()],
                        seconds: 0.0,
                    }
                }
            };
            columns.push(result);
        }
        let last = i + 1 == enforcers.len();
        if !(last && args.keep) {
            runner.backend.stop();
        }
    }

    let report = Report {
        cases: cases
            .iter()
            .map(|c| (c.name.as_str(), c.upstream.as_deref()))
            .collect(),
        columns,
        disagreements: disagreements.into_iter().collect(),
        lab: runner.backend.state().name.clone(),
        proxy_mode: control_plane.then(|| args.proxy_mode.0.to_string()),
        seconds: started.elapsed().as_secs_f64(),
    };
    println!(
        "\n== reference evaluator vs the case files: {} disagreement(s)",
        report.disagreements.len()
    );
    for (case, summary) in &report.disagreements {
        println!("   {case}: {summary}");
    }
    println!("\n== results\n{}", report.table());
    print!("{}", report.notes());
    let results = args.results.clone().unwrap_or_else(default_results);
    let results = resolve(&results);
    if let Some(dir) = results.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&results, serde_json::to_string_pretty(&report.json())?)
        .with_context(|| format!("writing {}", results.display()))?;
    println!("results: {}", results.display());
    println!("== {:.0} s in all", report.seconds);
    let bad = report.bad();
    let disagreed = report.disagreements.len();

    if args.keep
        && let Some(state) = runner.backend.keep()
    {
        println!(
            "lab {} left running; remove it with `cargo xtask lab down {}`",
            state.name, state.name
        );
    }
    if bad > 0 || disagreed > 0 {
        bail!(
            "{bad} cell(s) failed (FAIL, XPASS or not run), {disagreed} disagreement(s) with the \
             reference evaluator"
        );
    }
    Ok(())
}

/// `--reference-only`: every case against the reference evaluator on a planned lab.
fn run_reference_only(spec: &ClusterSpec, cases: &[Case], started: Instant) -> Result<()> {
    let backend = Backend::plan(spec)?;
    println!(
        "== conformance: {} cases, lab {} ({} nodes, {} pods), reference evaluator only",
        cases.len(),
        backend.state().name,
        backend.state().nodes.len(),
        backend.state().pods.len(),
    );
    let original = Applied::from_spec(spec);
    let mut runner = Runner {
        nodes: backend.nodes(),
        backend,
        applied: original.clone(),
        original,
        model_ports: model_ports(spec),
        released: BTreeMap::new(),
        column: None,
    };
    let mut failed = 0;
    for case in cases {
        let outcome = runner.run_case(case);
        if !outcome.passed() {
            failed += 1;
            println!("FAIL {}", case.name);
            print!("{}", check::indent(&outcome.report(), 8));
        }
    }
    println!("== {:.1} s in all", started.elapsed().as_secs_f64());
    println!("{} passed, {failed} failed", cases.len() - failed);
    if failed > 0 {
        bail!("{failed} case file(s) disagree with the reference evaluator");
    }
    Ok(())
}

fn default_results() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
        .join("conformance")
        .join("results.json")
}

/// Container ports of pods a case adds without a list of their own: the model's (x/a's).
fn model_ports(spec: &ClusterSpec) -> Vec<PortSpec> {
    spec.pods
        .iter()
        .find(|p| p.namespace == "x" && p.name == "a")
        .or(spec.pods.first())
        .map(|p| p.ports.clone())
        .unwrap_or_default()
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
    policies: Policies,
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
            policies: Policies::new(),
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
    /// The column being run (`None`: reference evaluator only).
    column: Option<Column>,
}

/// What kind of check failed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// Only what should have been denied got through (all that a missing enforcer does).
    NotDenied,
    Other,
}

/// Something that did not go as expected, with the details to print.
struct Failure {
    /// One line.
    summary: String,
    /// Tables and the like.
    details: String,
    kind: Kind,
}

#[derive(Default)]
struct Outcome {
    /// The datapath (probes, test runs, connections) differed from the case file, or the case
    /// could not run.
    failures: Vec<Failure>,
    /// The reference evaluator differed from the case file.
    reference: Vec<Failure>,
    /// Checks of this column not made, and why (the cell is `pass*` at best).
    skipped: Vec<String>,
    /// Checks that do not apply to this column, and why.
    notes: Vec<String>,
    /// Tables (per port, protocol and family) and connections checked.
    checked: usize,
    /// Whether a checked table or connection expects something to be denied.
    expects_denial: bool,
    elapsed: Duration,
}

impl Outcome {
    fn passed(&self) -> bool {
        self.failures.is_empty() && self.reference.is_empty()
    }

    fn skip(&mut self, why: String) {
        if !self.skipped.contains(&why) {
            self.skipped.push(why);
        }
    }

    fn note(&mut self, why: String) {
        if !self.notes.contains(&why) {
            self.notes.push(why);
        }
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

/// Why `enforcer` cannot run `case` at all (an API it does not implement), if so.
fn unsupported_case(enforcer: Enforcer, case: &Case) -> Option<&'static str> {
    enforcer
        .cluster_network_policy_gap()
        .filter(|_| case.uses_cluster_network_policy())
}

/// A case's cell in a column: its outcome against the expected failures.
fn classify(column: Column, case: &Case, outcome: &Outcome, expected: &ExpectedFailures) -> Cell {
    let failed = !outcome.passed();
    let mut cell = Cell::new(Verdict::Pass, None);
    cell.failures = outcome
        .failures
        .iter()
        .map(|f| f.summary.clone())
        .chain(
            outcome
                .reference
                .iter()
                .map(|f| format!("reference evaluator: {}", f.summary)),
        )
        .collect();
    cell.skipped = outcome.skipped.clone();
    cell.notes = outcome.notes.clone();
    cell.seconds = outcome.elapsed.as_secs_f64();
    // A disagreement with the reference evaluator is a case-file bug: never expected.
    let datapath_only = outcome.reference.is_empty();
    let (verdict, reason) = if !failed && outcome.checked == 0 {
        let why: Vec<&str> = outcome
            .skipped
            .iter()
            .chain(&outcome.notes)
            .map(String::as_str)
            .collect();
        (Verdict::Unsupported, Some(why.join("; ")))
    } else if let Some(reason) = expected.reason(column, &case.name) {
        match (failed, datapath_only) {
            (true, true) => (Verdict::Xfail, Some(reason.to_owned())),
            (true, false) => (Verdict::Fail, None),
            (false, _) => (Verdict::Xpass, Some(reason.to_owned())),
        }
    } else if column.enforcer == Enforcer::None && outcome.expects_denial {
        let only_not_denied = outcome.failures.iter().all(|f| f.kind == Kind::NotDenied);
        match (failed, datapath_only && only_not_denied) {
            (true, true) => (
                Verdict::Xfail,
                Some("nothing enforces, and the case expects denials".to_owned()),
            ),
            (true, false) => (Verdict::Fail, None),
            (false, _) => (
                Verdict::Xpass,
                Some(
                    "nothing enforces, yet every denial the case expects held: the case cannot \
                     tell a missing enforcer"
                        .to_owned(),
                ),
            ),
        }
    } else if failed {
        (Verdict::Fail, None)
    } else {
        (Verdict::Pass, None)
    };
    cell.verdict = verdict;
    cell.reason = reason;
    cell
}

impl Runner {
    /// Every case in one column; the enforcer is running.
    fn run_column(
        &mut self,
        column: Column,
        cases: &[Case],
        expected: &ExpectedFailures,
        disagreements: &mut BTreeSet<(String, String)>,
    ) -> ColumnResult {
        self.column = Some(column);
        let start = Instant::now();
        println!("== {column}");
        let mut cells = Vec::new();
        let mut error = None;
        let width = cases.len().to_string().len();
        for (i, case) in cases.iter().enumerate() {
            if error.is_some() {
                cells.push(Cell::new(Verdict::NotRun, None));
                continue;
            }
            if let Some(gap) = unsupported_case(column.enforcer, case) {
                println!(
                    "[{:>width$}/{}] {column} unsupported {}: {gap}",
                    i + 1,
                    cases.len(),
                    case.name,
                );
                cells.push(Cell::new(Verdict::Unsupported, Some(gap.to_owned())));
                continue;
            }
            let outcome = self.run_case(case);
            for f in &outcome.reference {
                disagreements.insert((case.name.clone(), f.summary.clone()));
            }
            let cell = classify(column, case, &outcome, expected);
            println!(
                "[{:>width$}/{}] {column} {} {} ({:.1} s){}",
                i + 1,
                cases.len(),
                cell.label(),
                case.name,
                outcome.elapsed.as_secs_f64(),
                // The first sentence; the whole reason is in the notes and results.json.
                cell.reason
                    .as_deref()
                    .map(|r| format!(": {}", r.split(". ").next().unwrap_or(r)))
                    .unwrap_or_default()
            );
            match cell.verdict {
                Verdict::Fail | Verdict::Xpass => {
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
                Verdict::Xfail => {
                    for f in &cell.failures {
                        println!("        {f}");
                    }
                }
                _ => {}
            }
            for s in &cell.skipped {
                if cell.verdict != Verdict::Unsupported {
                    println!("        not checked here: {s}");
                }
            }
            cells.push(cell);
            if let Err(e) = self.backend.check_running() {
                println!("== stopping {column}: {e:#}");
                error = Some(format!("{e:#}"));
            }
        }
        ColumnResult {
            column,
            unsupported: None,
            error,
            cells,
            seconds: start.elapsed().as_secs_f64(),
        }
    }

    fn run_case(&mut self, case: &Case) -> Outcome {
        let started = Instant::now();
        let mut outcome = Outcome::default();
        if let Err(e) = self.try_run_case(case, &mut outcome) {
            outcome.failures.push(Failure {
                summary: format!("the case could not run: {e:#}"),
                details: String::new(),
                kind: Kind::Other,
            });
        }
        outcome.elapsed = started.elapsed();
        outcome
    }

    fn try_run_case(&mut self, case: &Case, outcome: &mut Outcome) -> Result<()> {
        let mut desired = self.original.clone();
        let mut policies = Policies::new();
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
            desired.policies = policies.clone();
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
                // Always to the pod's address: the stream's port is not one of its Service's.
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
                    kind: Kind::Other,
                });
            }
            let Some(handle) = handle else { continue };
            outcome.checked += 1;
            outcome.expects_denial |= *want == ConnState::Cut;
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
                    kind: if echoes { Kind::NotDenied } else { Kind::Other },
                });
            }
        }
        Ok(())
    }

    /// Makes the lab hold `desired`: pods removed, then added, then labels one object at a
    /// time, then the policies.
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
            let result = self
                .backend
                .apply_policies(&self.applied.policies, &desired.policies);
            // Whatever happened, the next change starts from what was asked for: deletions
            // of policies that never made it are ignored (`--ignore-not-found`).
            self.applied.policies = desired.policies.clone();
            result?;
        }
        Ok(())
    }

    /// The cluster the reference evaluator judges, from the manifests directory.
    fn cluster(&self) -> Result<Cluster> {
        let mut source = DirSource::new(self.backend.manifests_dir());
        source.poll().context("reading the manifests directory")?;
        let mut snapshot = source.snapshot();
        // ClusterNetworkPolicies are read and reported as not enforced yet: not a problem of
        // the manifests.
        let notices: Vec<String> = netpol_agent::source::not_enforced(&snapshot.cluster).collect();
        snapshot.errors.retain(|e| !notices.contains(e));
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

    /// Servers whose Service does not lead to them alone, and why. A pod's Service selects
    /// `pod: <name>`, or the pod's labels at its creation when it has no such label (see
    /// `netpol_lab::controlplane::service_object`); a case that gives another pod the same
    /// labels makes the ClusterIP lead to either.
    fn ambiguous_services(&self, servers: &[String]) -> Vec<String> {
        let lab = self.backend.state();
        servers
            .iter()
            .filter_map(|key| {
                let pod = lab.pod_by_key(key)?;
                let mut as_created = pod.clone();
                as_created.labels = self
                    .applied
                    .added
                    .get(key)
                    .map(|a| a.labels.clone())
                    .or_else(|| self.original.pod_labels.get(key).cloned())?;
                let service = netpol_lab::controlplane::service_object(&as_created)?;
                let selector: Labels =
                    serde_json::from_value(service["spec"]["selector"].clone()).ok()?;
                let selected: Vec<String> = lab
                    .pods
                    .iter()
                    .filter(|p| {
                        p.namespace == pod.namespace
                            && selector.iter().all(|(k, v)| p.labels.get(k) == Some(v))
                    })
                    .map(PodState::key)
                    .collect();
                (selected != [key.clone()]).then(|| {
                    format!(
                        "the Service of {key} selects {}",
                        if selected.is_empty() {
                            "no pod".to_owned()
                        } else {
                            selected.join(" and ")
                        }
                    )
                })
            })
            .collect()
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
                        kind: Kind::Other,
                    });
                }
            }
        }
        let Some(column) = self.column.filter(|_| self.backend.is_live()) else {
            return Ok(());
        };

        if let Some(spec) = probe_spec(step, column.via) {
            let ambiguous = if column.via == Via::Service {
                self.ambiguous_services(spec.to.as_deref().unwrap_or_default())
            } else {
                Vec::new()
            };
            if ambiguous.is_empty() {
                self.probe_step(n, step, &spec, outcome)?;
            } else {
                outcome.skip(format!(
                    "step {n} through ClusterIPs: {}",
                    ambiguous.join("; ")
                ));
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
        if sctp.is_empty() {
            return Ok(());
        }
        if !column.enforcer.is_netpol() {
            outcome.skip(format!(
                "SCTP tables: no SCTP sockets on this kernel, and the test runs that decide \
                 them run netpol's programs, which say nothing of {}",
                column.enforcer
            ));
            return Ok(());
        }
        if column.via != Via::Pod {
            outcome.note(
                "SCTP tables: no SCTP sockets on this kernel; their test runs of netpol's \
                 programs are made in the pod column"
                    .to_owned(),
            );
            return Ok(());
        }
        let mut datapaths = sctp::Datapaths::load(cluster, &self.nodes)?;
        for (e, key) in sctp {
            let observed = check::try_shaped(&e.table, |from, to| {
                let (from, to) = (self.pod(from)?, self.pod(to)?);
                datapaths
                    .allowed(&from, &to, key.port, key.family)
                    .map(Some)
            })
            .with_context(|| format!("step {n}, {key}: test runs"))?;
            outcome.checked += 1;
            outcome.expects_denial |= has_denial(&e.table);
            let cmp = check::compare(&e.table, &observed);
            if !cmp.is_match() {
                outcome.failures.push(Failure {
                    summary: format!(
                        "step {n}, {key} (BPF_PROG_TEST_RUN): {} cell(s) differ from the \
                         case file",
                        cmp.mismatches.len()
                    ),
                    kind: kind_of(&cmp),
                    details: cmp.render(),
                });
            }
        }
        Ok(())
    }

    /// Probes every TCP and UDP cell of a step at once (again once after a mismatch) and
    /// compares.
    fn probe_step(
        &self,
        n: usize,
        step: &Step,
        spec: &ProbeSpec,
        outcome: &mut Outcome,
    ) -> Result<()> {
        let lab = self.backend.state();
        let mut results = netpol_lab::probe(lab, spec).context("probing")?;
        let mut retried = false;
        if !mismatches(step, &results).is_empty() {
            results = netpol_lab::probe(lab, spec).context("probing again")?;
            retried = true;
        }
        for e in &step.expect {
            let tables = e
                .keys
                .iter()
                .filter(|k| k.protocol != Protocol::Sctp)
                .count();
            outcome.checked += tables;
            outcome.expects_denial |= tables > 0 && has_denial(&e.table);
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
                kind: kind_of(&cmp),
                details: format!("{}what the probes saw:\n{probes}", cmp.render()),
            });
        }
        Ok(())
    }
}

/// Whether a table expects some judged cell to be blocked.
fn has_denial(expected: &TruthTable) -> bool {
    let judged = check::judged(expected);
    judged.clients().iter().any(|c| {
        judged
            .servers()
            .iter()
            .any(|s| judged.get(c, s) == Some(false))
    })
}

/// [`Kind::NotDenied`] when every differing cell was expected blocked and was connected.
fn kind_of(cmp: &Comparison) -> Kind {
    if cmp
        .mismatches
        .iter()
        .all(|m| m.expected == Some(false) && m.actual == Some(true))
    {
        Kind::NotDenied
    } else {
        Kind::Other
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

/// One probe run for every TCP and UDP table of a step: the union of their pods, ports,
/// protocols and families (all cells are probed at once, so the union costs no more time).
fn probe_spec(step: &Step, via: Via) -> Option<ProbeSpec> {
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
        via,
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

    /// The shipped case files and the reference evaluator agree (no lab, no root), and the
    /// expected-failures file names real cases.
    #[test]
    fn shipped_cases_agree_with_the_reference_evaluator() {
        let args = ConformanceArgs {
            reference_only: true,
            ..ConformanceArgs::default()
        };
        run(args).unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// The ClusterNetworkPolicy cases (upstream CNP conformance scenarios on this model) agree
    /// with the reference evaluator's tiers.
    #[test]
    fn cnp_cases_agree_with_the_reference_evaluator() {
        let args = ConformanceArgs {
            reference_only: true,
            cases: "conformance/cnp-cases".into(),
            ..ConformanceArgs::default()
        };
        run(args).unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// kube-network-policies' columns say that it has no ClusterNetworkPolicy for every case
    /// with one (and only those); netpol's run them.
    #[test]
    fn cnp_cases_are_unsupported_where_the_api_is_missing() {
        let spec = ClusterSpec::from_file(&resolve(Path::new("conformance/cluster.yaml")))
            .expect("cluster.yaml");
        let cnp =
            case::load_all(&resolve(Path::new("conformance/cnp-cases")), &spec).expect("cnp cases");
        let np = case::load_all(&resolve(Path::new("conformance/cases")), &spec).expect("cases");
        assert!(!cnp.is_empty() && !np.is_empty());
        for c in &cnp {
            let why = unsupported_case(Enforcer::KubeNetworkPolicies, c)
                .unwrap_or_else(|| panic!("{}: kube-network-policies should not run it", c.name));
            assert!(why.contains("ClusterNetworkPolicy"), "{why}");
            for e in [Enforcer::Netpol, Enforcer::NetpolKube, Enforcer::None] {
                assert_eq!(unsupported_case(e, c), None, "{}: {e}", c.name);
            }
        }
        for c in &np {
            assert_eq!(
                unsupported_case(Enforcer::KubeNetworkPolicies, c),
                None,
                "{}",
                c.name
            );
        }
    }

    #[test]
    fn the_command_line_takes_lists_of_enforcers() {
        let args = <ConformanceArgs as clap::Parser>::try_parse_from([
            "netpol-conformance",
            "--enforcer",
            "netpol,netpol-kube",
            "--enforcer",
            "none",
            "--via",
            "service",
            "--proxy-mode",
            "nftables",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            args.enforcer,
            [Enforcer::Netpol, Enforcer::NetpolKube, Enforcer::None]
        );
        assert_eq!(args.via, Some(ViaArg::Service));
        assert_eq!(args.proxy_mode, ProxyModeArg(ProxyMode::Nftables));
        let default = <ConformanceArgs as clap::Parser>::try_parse_from(["netpol-conformance"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(default.enforcer, [Enforcer::NetpolKube]);
        assert!(
            <ConformanceArgs as clap::Parser>::try_parse_from([
                "netpol-conformance",
                "--proxy-mode",
                "none"
            ])
            .is_err()
        );
    }
}
