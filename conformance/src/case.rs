//! The case files (`conformance/cases/*.yaml`, see `conformance/README.md`): one YAML document
//! per case, loaded and checked against the cluster file before anything runs.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use netpol_lab::{ClusterSpec, Family, LabState, PortSpec, Protocol, TableKey, TruthTable};
use serde::Deserialize;

/// Labels of a namespace or a pod (the whole set).
pub type Labels = BTreeMap<String, String>;

/// A case: policies, and steps that change the cluster and say what must then be reachable.
#[derive(Debug)]
pub struct Case {
    pub file: PathBuf,
    pub name: String,
    /// The upstream e2e test (`network_policy.go`) the case mirrors; `None` for our own.
    pub upstream: Option<String>,
    pub description: Option<String>,
    /// Policy manifests by id (placeholders not substituted yet).
    pub policies: BTreeMap<String, serde_yaml::Value>,
    pub steps: Vec<Step>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct CaseDoc {
    name: String,
    #[serde(default)]
    upstream: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    policies: BTreeMap<String, serde_yaml::Value>,
    steps: Vec<StepDoc>,
}

/// What one step does, in this order: remove and add pods, relabel namespaces and pods, apply
/// and delete policies (waiting for every agent to sync after each change), open connections,
/// check connections, then probe and compare.
#[derive(Debug, Default)]
pub struct Step {
    pub remove_pods: Vec<String>,
    pub add_pods: Vec<AddPod>,
    pub apply: Vec<String>,
    pub delete: Vec<String>,
    pub delete_all: bool,
    pub namespace_labels: BTreeMap<String, Labels>,
    pub pod_labels: BTreeMap<String, Labels>,
    pub open: Vec<OpenSpec>,
    pub connections: BTreeMap<String, ConnState>,
    pub expect: Vec<Expectation>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct StepDoc {
    #[serde(default)]
    remove_pods: Vec<String>,
    #[serde(default)]
    add_pods: Vec<AddPod>,
    #[serde(default)]
    apply: Vec<String>,
    #[serde(default)]
    delete: Vec<String>,
    #[serde(default)]
    delete_all: bool,
    #[serde(default)]
    set_namespace_labels: BTreeMap<String, Labels>,
    #[serde(default)]
    set_pod_labels: BTreeMap<String, Labels>,
    #[serde(default)]
    open: Vec<OpenSpec>,
    #[serde(default)]
    connections: BTreeMap<String, ConnState>,
    #[serde(default)]
    expect: Vec<ExpectDoc>,
}

/// A pod a step adds to the running lab (and that goes again when the case ends).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AddPod {
    /// `namespace/name`.
    pub pod: String,
    pub node: String,
    #[serde(default)]
    pub labels: Labels,
    /// Container ports; by default those of the model (serve-80-tcp, ... as in the cluster
    /// file's pod x/a).
    #[serde(default)]
    pub ports: Option<Vec<PortSpec>>,
    /// Take over the addresses of a pod that an earlier step (or this one) removed, as a new
    /// pod may get a deleted pod's IP in a real cluster.
    #[serde(default)]
    pub addresses_of: Option<String>,
}

/// A long-lived TCP connection to open: the runner starts an echo server on `to:port` (a port
/// the pod's own server does not use) and a client in `from` that keeps sending.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenSpec {
    pub name: String,
    pub from: String,
    pub to: String,
    pub port: u16,
    #[serde(default = "default_family")]
    pub family: FamilyName,
}

fn default_family() -> FamilyName {
    FamilyName::V4
}

/// What an open connection must look like after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnState {
    /// Echoes still come back.
    Alive,
    /// No echo comes back any more.
    Cut,
}

impl fmt::Display for ConnState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConnState::Alive => "alive",
            ConnState::Cut => "cut",
        })
    }
}

/// One IP family, as written in case files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FamilyName {
    V4,
    V6,
}

impl From<FamilyName> for Family {
    fn from(f: FamilyName) -> Family {
        match f {
            FamilyName::V4 => Family::V4,
            FamilyName::V6 => Family::V6,
        }
    }
}

/// The families an expectation covers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Families {
    V4,
    V6,
    #[default]
    Both,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpectDoc {
    ports: Vec<u16>,
    #[serde(default = "default_protocols")]
    protocols: Vec<Protocol>,
    #[serde(default)]
    family: Families,
    table: String,
}

fn default_protocols() -> Vec<Protocol> {
    vec![Protocol::Tcp]
}

/// One truth table that must hold for every (port, protocol, family) it lists. Its rows are
/// the clients and its columns the servers; the diagonal (a pod to itself, over loopback) is
/// never judged, as upstream (`ignoreLoopback`).
#[derive(Debug)]
pub struct Expectation {
    pub keys: Vec<TableKey>,
    pub table: TruthTable,
}

impl Step {
    /// Every client and server the step's expectations name, in first-seen order.
    pub fn probed_pods(&self) -> (Vec<String>, Vec<String>) {
        let mut clients = Vec::new();
        let mut servers = Vec::new();
        for e in &self.expect {
            for c in e.table.clients() {
                if !clients.contains(c) {
                    clients.push(c.clone());
                }
            }
            for s in e.table.servers() {
                if !servers.contains(s) {
                    servers.push(s.clone());
                }
            }
        }
        (clients, servers)
    }
}

impl Case {
    /// The metadata (namespace, name) of policy `id`.
    pub fn policy_ref(&self, id: &str) -> Result<(String, String)> {
        let manifest = self
            .policies
            .get(id)
            .ok_or_else(|| anyhow!("no policy {id:?} in case {}", self.name))?;
        policy_ref(manifest).with_context(|| format!("policy {id:?}"))
    }

    /// Whether any of its policies is a ClusterNetworkPolicy (cluster-scoped).
    pub fn uses_cluster_network_policy(&self) -> bool {
        self.policies
            .values()
            .any(|m| policy_ref(m).is_ok_and(|(namespace, _)| namespace.is_empty()))
    }
}

/// `(namespace, name)` of a policy manifest: a NetworkPolicy, or a ClusterNetworkPolicy
/// (`policy.networking.k8s.io/v1alpha2`, cluster-scoped: namespace `""`).
fn policy_ref(manifest: &serde_yaml::Value) -> Result<(String, String)> {
    let kind = manifest.get("kind").and_then(|k| k.as_str());
    let api_version = manifest.get("apiVersion").and_then(|k| k.as_str());
    let cluster_scoped = match (kind, api_version) {
        (Some("NetworkPolicy"), _) => false,
        (Some("ClusterNetworkPolicy"), Some("policy.networking.k8s.io/v1alpha2")) => true,
        _ => bail!(
            "kind must be NetworkPolicy or ClusterNetworkPolicy (policy.networking.k8s.io/v1alpha2)"
        ),
    };
    let meta = manifest
        .get("metadata")
        .ok_or_else(|| anyhow!("no metadata"))?;
    let field = |f: &str| {
        meta.get(f)
            .and_then(|v| v.as_str())
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("metadata.{f} is missing"))
    };
    let namespace = if cluster_scoped {
        String::new()
    } else {
        field("namespace")?
    };
    Ok((namespace, field("name")?))
}

/// Loads every case of `dir` (files `*.yaml`, in name order; documents in file order).
pub fn load_all(dir: &Path, spec: &ClusterSpec) -> Result<Vec<Case>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let mut cases = Vec::new();
    let mut names = BTreeSet::new();
    for file in files {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let doc = CaseDoc::deserialize(doc)
                .with_context(|| format!("{}: document {}", file.display(), i + 1))?;
            let name = doc.name.clone();
            let case = Case::from_doc(&file, doc, spec)
                .with_context(|| format!("{}: case {name}", file.display()))?;
            ensure!(
                names.insert(case.name.clone()),
                "{}: case name {} is used twice",
                file.display(),
                case.name
            );
            cases.push(case);
        }
    }
    Ok(cases)
}

impl Case {
    fn from_doc(file: &Path, doc: CaseDoc, spec: &ClusterSpec) -> Result<Case> {
        ensure!(!doc.steps.is_empty(), "a case needs at least one step");
        // The pods present at each step: the cluster file's, plus those added, minus those
        // removed so far.
        let mut pods: BTreeSet<String> = spec
            .pods
            .iter()
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect();
        let mut added = BTreeSet::new();
        let mut removed = BTreeSet::new();
        fn known_pod(pods: &BTreeSet<String>, what: &str, pod: &str) -> Result<()> {
            ensure!(pods.contains(pod), "{what}: no pod {pod} at this step");
            Ok(())
        }
        for (id, manifest) in &doc.policies {
            policy_ref(manifest).with_context(|| format!("policies.{id}"))?;
        }
        let mut opened = BTreeSet::new();
        let mut steps = Vec::new();
        for (i, s) in doc.steps.into_iter().enumerate() {
            let at = |f: &str| format!("steps[{i}].{f}");
            for pod in &s.remove_pods {
                ensure!(
                    added.contains(pod) && pods.remove(pod),
                    "{}: {pod} is not a pod an earlier step added (a case removes only its own)",
                    at("remove-pods")
                );
                removed.insert(pod.clone());
            }
            for a in &s.add_pods {
                let (namespace, name) = a.pod.split_once('/').ok_or_else(|| {
                    anyhow!("{}: {:?} is not namespace/name", at("add-pods"), a.pod)
                })?;
                ensure!(
                    spec.namespaces.iter().any(|n| n.name == namespace),
                    "{}: no namespace {namespace} in the cluster file",
                    at("add-pods")
                );
                ensure!(
                    spec.nodes.iter().any(|n| n.name == a.node),
                    "{}: no node {} in the cluster file",
                    at("add-pods"),
                    a.node
                );
                ensure!(
                    !name.is_empty() && pods.insert(a.pod.clone()) && added.insert(a.pod.clone()),
                    "{}: pod {} exists already or was added before",
                    at("add-pods"),
                    a.pod
                );
                if let Some(other) = &a.addresses_of {
                    ensure!(
                        removed.contains(other),
                        "{}: addresses-of {other}: not a pod removed by this or an earlier step",
                        at("add-pods")
                    );
                }
            }
            for id in s.apply.iter().chain(&s.delete) {
                ensure!(
                    doc.policies.contains_key(id),
                    "{}: no policy {id:?} in policies",
                    at("apply/delete")
                );
            }
            for ns in s.set_namespace_labels.keys() {
                ensure!(
                    spec.namespaces.iter().any(|n| &n.name == ns),
                    "{}: no namespace {ns} in the cluster file",
                    at("set-namespace-labels")
                );
            }
            for pod in s.set_pod_labels.keys() {
                known_pod(&pods, &at("set-pod-labels"), pod)?;
            }
            for o in &s.open {
                known_pod(&pods, &at("open.from"), &o.from)?;
                known_pod(&pods, &at("open.to"), &o.to)?;
                let served = spec.pods.iter().any(|p| {
                    format!("{}/{}", p.namespace, p.name) == o.to
                        && p.ports
                            .iter()
                            .any(|c| c.port == o.port && c.protocol == Protocol::Tcp)
                });
                ensure!(
                    !served,
                    "{}: connection {}: port {} is a TCP container port of {}, which the lab's \
                     own server answers; use another port for the echo server",
                    at("open"),
                    o.name,
                    o.port,
                    o.to
                );
                ensure!(
                    opened.insert(o.name.clone()),
                    "{}: connection {} is opened twice",
                    at("open"),
                    o.name
                );
            }
            for name in s.connections.keys() {
                ensure!(
                    opened.contains(name),
                    "{}: connection {name} is not opened by this or an earlier step",
                    at("connections")
                );
            }
            let mut expect = Vec::new();
            for (j, e) in s.expect.into_iter().enumerate() {
                let at = at(&format!("expect[{j}]"));
                ensure!(!e.ports.is_empty(), "{at}.ports: at least one port");
                ensure!(
                    !e.protocols.is_empty(),
                    "{at}.protocols: at least one protocol"
                );
                let table: TruthTable = e
                    .table
                    .parse()
                    .map_err(|err| anyhow!("{at}.table: {err}"))?;
                for p in table.clients().iter().chain(table.servers()) {
                    known_pod(&pods, &format!("{at}.table"), p)?;
                }
                for c in table.clients() {
                    for s in table.servers() {
                        ensure!(
                            c == s || table.get(c, s).is_some(),
                            "{at}.table: cell {c} -> {s} is not set (only the diagonal may be ?)"
                        );
                    }
                }
                let families = match e.family {
                    Families::V4 => vec![Family::V4],
                    Families::V6 => vec![Family::V6],
                    Families::Both => vec![Family::V4, Family::V6],
                };
                let mut keys = Vec::new();
                for &port in &e.ports {
                    for &protocol in &e.protocols {
                        for &family in &families {
                            keys.push(TableKey {
                                port,
                                protocol,
                                family,
                            });
                        }
                    }
                }
                expect.push(Expectation { keys, table });
            }
            steps.push(Step {
                remove_pods: s.remove_pods,
                add_pods: s.add_pods,
                apply: s.apply,
                delete: s.delete,
                delete_all: s.delete_all,
                namespace_labels: s.set_namespace_labels,
                pod_labels: s.set_pod_labels,
                open: s.open,
                connections: s.connections,
                expect,
            });
        }
        Ok(Case {
            file: file.to_owned(),
            name: doc.name,
            upstream: doc.upstream,
            description: doc.description,
            policies: doc.policies,
            steps,
        })
    }
}

/// Replaces the placeholders in every string of a manifest:
///
/// * `{{ip <ns/pod> <v4|v6>}}`: the pod's address, e.g. `10.244.1.2`;
/// * `{{cidr <ns/pod> <v4|v6> /<len>}}`: the prefix of that length around it, host bits
///   cleared, e.g. `{{cidr x/b v4 /24}}` is `10.244.2.0/24` and `/32` the pod alone.
pub fn substitute(manifest: &serde_yaml::Value, lab: &LabState) -> Result<serde_yaml::Value> {
    Ok(match manifest {
        serde_yaml::Value::String(s) => serde_yaml::Value::String(substitute_str(s, lab)?),
        serde_yaml::Value::Sequence(items) => serde_yaml::Value::Sequence(
            items
                .iter()
                .map(|v| substitute(v, lab))
                .collect::<Result<_>>()?,
        ),
        serde_yaml::Value::Mapping(map) => {
            let mut out = serde_yaml::Mapping::new();
            for (k, v) in map {
                out.insert(k.clone(), substitute(v, lab)?);
            }
            serde_yaml::Value::Mapping(out)
        }
        other => other.clone(),
    })
}

fn substitute_str(text: &str, lab: &LabState) -> Result<String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find("}}")
            .ok_or_else(|| anyhow!("unterminated placeholder in {text:?}"))?;
        let inner = &rest[start + 2..start + end];
        out.push_str(&placeholder(inner, lab).with_context(|| format!("{{{{{inner}}}}}"))?);
        rest = &rest[start + end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

fn placeholder(inner: &str, lab: &LabState) -> Result<String> {
    let words: Vec<&str> = inner.split_whitespace().collect();
    let (kind, pod, family, len) = match words.as_slice() {
        ["ip", pod, family] => ("ip", *pod, *family, None),
        ["cidr", pod, family, len] => ("cidr", *pod, *family, Some(*len)),
        _ => bail!("expected `ip <ns/pod> <v4|v6>` or `cidr <ns/pod> <v4|v6> /<len>`"),
    };
    let pod = lab
        .pod_by_key(pod)
        .ok_or_else(|| anyhow!("no pod {pod} in the lab"))?;
    let ip = match family {
        "v4" => pod.ip(Family::V4),
        "v6" => pod.ip(Family::V6),
        other => bail!("family {other:?}: expected v4 or v6"),
    };
    if kind == "ip" {
        return Ok(ip.to_string());
    }
    let len: u8 = len
        .and_then(|l| l.strip_prefix('/'))
        .and_then(|l| l.parse().ok())
        .ok_or_else(|| anyhow!("prefix length: expected /<number>"))?;
    Ok(match ip {
        IpAddr::V4(a) => {
            ensure!(len <= 32, "/{len} is longer than an IPv4 address");
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            format!("{}/{len}", std::net::Ipv4Addr::from(u32::from(a) & mask))
        }
        IpAddr::V6(a) => {
            ensure!(len <= 128, "/{len} is longer than an IPv6 address");
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            format!("{}/{len}", std::net::Ipv6Addr::from(u128::from(a) & mask))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lab() -> LabState {
        let spec =
            ClusterSpec::from_file(&crate::workspace_root().join("conformance/cluster.yaml"))
                .expect("the conformance cluster file parses");
        LabState::plan(&spec, None)
    }

    #[test]
    fn placeholders_become_addresses_and_prefixes() {
        let lab = lab();
        let cases = [
            ("{{ip x/a v4}}", "10.244.1.2"),
            ("{{ip x/b v6}}", "fd00:244:2::2"),
            ("{{cidr x/b v4 /32}}", "10.244.2.2/32"),
            ("{{cidr x/b v4 /24}}", "10.244.2.0/24"),
            ("{{cidr x/b v4 /4}}", "0.0.0.0/4"),
            ("{{cidr x/b v6 /4}}", "f000::/4"),
            ("{{cidr x/b v6 /128}}", "fd00:244:2::2/128"),
            ("{{cidr x/b v4 /0}}", "0.0.0.0/0"),
            ("a {{ip x/a v4}} b", "a 10.244.1.2 b"),
        ];
        for (text, want) in cases {
            assert_eq!(substitute_str(text, &lab).expect(text), want, "{text}");
        }
        for bad in [
            "{{ip x/q v4}}",
            "{{ip x/a v5}}",
            "{{cidr x/a v4 24}}",
            "{{ip x/a v4",
        ] {
            assert!(substitute_str(bad, &lab).is_err(), "{bad}");
        }
    }

    #[test]
    fn shipped_cases_load() {
        let root = crate::workspace_root();
        let spec = ClusterSpec::from_file(&root.join("conformance/cluster.yaml"))
            .expect("the conformance cluster file parses");
        let cases =
            load_all(&root.join("conformance/cases"), &spec).unwrap_or_else(|e| panic!("{e:#}"));
        assert!(!cases.is_empty());
    }
}
