//! `deploy/`: loads what `deploy/base/kustomization.yaml` lists into the
//! Kubernetes API types, applies the kustomization's namespace and image
//! the way kustomize does, and checks what the agent needs to work on a node
//! and what it may do in the cluster.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{Container, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::{Deserialize, de::DeserializeOwned};

/// The parts of a `Kustomization` this deployment uses.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Kustomization {
    api_version: String,
    kind: String,
    namespace: Option<String>,
    resources: Vec<String>,
    #[serde(default)]
    images: Vec<ImageOverride>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ImageOverride {
    name: String,
    new_name: Option<String>,
    new_tag: Option<String>,
    digest: Option<String>,
}

/// Everything the kustomization produces, typed.
#[derive(Debug, Default)]
struct Deployment {
    daemon_sets: Vec<DaemonSet>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    roles: Vec<Role>,
    role_bindings: Vec<RoleBinding>,
}

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Deserializes one document into its API type, and checks that every field
/// it spells is one the type knows (serializing the typed object gives the
/// document back), so a misspelt field cannot silently vanish.
fn typed<T: DeserializeOwned + serde::Serialize>(file: &str, doc: serde_yaml::Value) -> T {
    let json: serde_json::Value = serde_json::to_value(&doc)
        .unwrap_or_else(|e| panic!("{file}: not representable as JSON: {e}"));
    let obj: T = serde_json::from_value(json.clone())
        .unwrap_or_else(|e| panic!("{file}: does not match the API type: {e}"));
    let back = serde_json::to_value(&obj).expect("serializing an API object");
    assert_eq!(
        back, json,
        "{file}: some fields are unknown to the API types (misspelt?)"
    );
    obj
}

fn load() -> (Kustomization, Deployment) {
    // `kubectl apply -k deploy/` is the base, as it is.
    let top: Kustomization = serde_yaml::from_str(&read(&deploy_dir().join("kustomization.yaml")))
        .unwrap_or_else(|e| panic!("deploy/kustomization.yaml: {e}"));
    assert_eq!(top.resources, ["base"], "deploy/ applies deploy/base/");
    assert!(top.namespace.is_none() && top.images.is_empty());
    let dir = deploy_dir().join("base");
    let k: Kustomization = serde_yaml::from_str(&read(&dir.join("kustomization.yaml")))
        .unwrap_or_else(|e| panic!("deploy/base/kustomization.yaml: {e}"));
    assert_eq!(k.api_version, "kustomize.config.k8s.io/v1beta1");
    assert_eq!(k.kind, "Kustomization");
    let mut d = Deployment::default();
    for file in &k.resources {
        let text = read(&dir.join(file));
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let doc = serde_yaml::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("deploy/base/{file}: {e}"));
            if doc.is_null() {
                continue;
            }
            match doc["kind"].as_str() {
                Some("DaemonSet") => d.daemon_sets.push(typed(file, doc)),
                Some("ServiceAccount") => d.service_accounts.push(typed(file, doc)),
                Some("ClusterRole") => d.cluster_roles.push(typed(file, doc)),
                Some("ClusterRoleBinding") => d.cluster_role_bindings.push(typed(file, doc)),
                Some("Role") => d.roles.push(typed(file, doc)),
                Some("RoleBinding") => d.role_bindings.push(typed(file, doc)),
                other => panic!("deploy/base/{file}: unexpected kind {other:?}"),
            }
        }
    }
    kustomize(&k, &mut d);
    (k, d)
}

/// `image` with the kustomization's `images` overrides applied (matched by
/// name without tag or digest, as kustomize does).
fn override_image(image: &str, overrides: &[ImageOverride]) -> String {
    let name = image
        .split('@')
        .next()
        .map(|n| match n.rsplit_once(':') {
            // A colon in the last path segment starts a tag, not a port.
            Some((repo, tag)) if !tag.contains('/') => repo,
            _ => n,
        })
        .unwrap_or(image);
    let Some(o) = overrides.iter().find(|o| o.name == name) else {
        return image.to_string();
    };
    let repo = o.new_name.as_deref().unwrap_or(name);
    match (&o.digest, &o.new_tag) {
        (Some(d), _) => format!("{repo}@{d}"),
        (None, Some(t)) => format!("{repo}:{t}"),
        (None, None) => format!("{repo}{}", &image[name.len()..]),
    }
}

/// kustomize's namespace and image transformers: namespaced objects get the
/// namespace; cluster-scoped ones (ClusterRole, ClusterRoleBinding) do not;
/// binding subjects are only rewritten when named "default" (kustomize's
/// default `setRoleBindingSubjects: defaultOnly`).
fn kustomize(k: &Kustomization, d: &mut Deployment) {
    if let Some(ns) = &k.namespace {
        for ds in &mut d.daemon_sets {
            ds.metadata.namespace = Some(ns.clone());
        }
        for sa in &mut d.service_accounts {
            sa.metadata.namespace = Some(ns.clone());
        }
        for r in &mut d.roles {
            r.metadata.namespace = Some(ns.clone());
        }
        for b in &mut d.role_bindings {
            b.metadata.namespace = Some(ns.clone());
        }
        let subjects = d
            .cluster_role_bindings
            .iter_mut()
            .flat_map(|b| b.subjects.iter_mut().flatten())
            .chain(
                d.role_bindings
                    .iter_mut()
                    .flat_map(|b| b.subjects.iter_mut().flatten()),
            );
        for s in subjects {
            if s.kind == "ServiceAccount" && s.name == "default" {
                s.namespace = Some(ns.clone());
            }
        }
    }
    for ds in &mut d.daemon_sets {
        if let Some(spec) = ds.spec.as_mut().and_then(|s| s.template.spec.as_mut()) {
            let containers = spec
                .containers
                .iter_mut()
                .chain(spec.init_containers.iter_mut().flatten());
            for c in containers {
                if let Some(image) = &c.image {
                    c.image = Some(override_image(image, &k.images));
                }
            }
        }
    }
}

fn agent(d: &Deployment) -> (&DaemonSet, &Container) {
    assert_eq!(d.daemon_sets.len(), 1, "one DaemonSet");
    let ds = &d.daemon_sets[0];
    let pod = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("DaemonSet pod spec");
    assert_eq!(pod.containers.len(), 1, "one container");
    (ds, &pod.containers[0])
}

/// The value following `flag` in `args`.
fn arg<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

#[test]
fn kustomization_sets_namespace_and_image() {
    let (k, d) = load();
    assert_eq!(k.namespace.as_deref(), Some("kube-system"));
    let (ds, c) = agent(&d);
    assert_eq!(ds.metadata.namespace.as_deref(), Some("kube-system"));
    let image = c.image.as_deref().expect("container image");
    let o = k
        .images
        .iter()
        .find(|o| image.starts_with(o.new_name.as_deref().unwrap_or(&o.name)))
        .unwrap_or_else(|| panic!("image {image} is not set by the kustomization"));
    assert_eq!(
        image,
        format!(
            "{}:{}",
            o.new_name.as_deref().unwrap_or(&o.name),
            o.new_tag.as_deref().expect("a tag")
        )
    );
    assert_eq!(
        override_image("netpol-agent", &k.images),
        image,
        "the override matches the image the DaemonSet names"
    );
    assert_eq!(override_image("other:1", &k.images), "other:1");
}

#[test]
fn daemonset_runs_a_privileged_node_agent() {
    let (_, d) = load();
    let (ds, c) = agent(&d);
    let spec = ds.spec.as_ref().expect("spec");
    let pod = spec.template.spec.as_ref().expect("pod spec");

    assert_eq!(pod.host_network, Some(true), "hostNetwork");
    assert_eq!(pod.host_pid, Some(true), "hostPID (for /proc/*/ns/net)");
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_eq!(
        c.security_context.as_ref().and_then(|s| s.privileged),
        Some(true),
        "privileged"
    );
    let strategy = spec.update_strategy.as_ref().expect("updateStrategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let tolerations = pod.tolerations.as_deref().unwrap_or_default();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "tolerates every taint: {tolerations:?}"
    );
    let requests = c
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .expect("resource requests");
    assert!(requests.contains_key("cpu") && requests.contains_key("memory"));

    // Selector matches the template.
    let labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.as_ref());
    for (k, v) in spec.selector.match_labels.iter().flatten() {
        assert_eq!(labels.and_then(|l| l.get(k)), Some(v), "selector {k}={v}");
    }
}

#[test]
fn daemonset_mounts_bpffs_netns_and_state() {
    let (_, d) = load();
    let (ds, c) = agent(&d);
    let pod = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec");
    let host_paths: BTreeMap<&str, &str> = pod
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| Some((v.name.as_str(), v.host_path.as_ref()?.path.as_str())))
        .collect();
    let mount = |path: &str| {
        let m = c
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path == path)
            .unwrap_or_else(|| panic!("no mount at {path}"));
        assert_eq!(
            host_paths.get(m.name.as_str()).copied(),
            Some(path),
            "{path} is the host's"
        );
        m.mount_propagation.as_deref()
    };
    assert_eq!(mount("/sys/fs/bpf"), Some("Bidirectional"));
    assert_eq!(mount("/run/netns"), Some("HostToContainer"));
    mount("/run/netpol");
}

#[test]
fn daemonset_args_probes_and_ports_agree() {
    let (_, d) = load();
    let (_, c) = agent(&d);
    let args = c.args.as_deref().expect("args");
    assert_eq!(args.first().map(String::as_str), Some("run"));
    assert_eq!(arg(args, "--source"), Some("kube"));
    assert_eq!(arg(args, "--node"), Some("$(NODE_NAME)"));
    let node_env = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME in env");
    assert_eq!(
        node_env
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("spec.nodeName"),
        "NODE_NAME from the downward API"
    );

    let metrics: std::net::SocketAddr = arg(args, "--metrics-addr")
        .expect("--metrics-addr")
        .parse()
        .expect("--metrics-addr is an address");
    assert!(
        metrics.ip().is_unspecified(),
        "probes reach it on the node IP"
    );
    let port = c
        .ports
        .iter()
        .flatten()
        .find(|p| p.container_port == i32::from(metrics.port()))
        .unwrap_or_else(|| panic!("port {} is not declared", metrics.port()));
    let resolve = |p: &IntOrString| match p {
        IntOrString::Int(n) => *n,
        IntOrString::String(name) => {
            assert_eq!(port.name.as_deref(), Some(name.as_str()), "probe port name");
            port.container_port
        }
    };
    for (what, probe, path) in [
        ("readinessProbe", &c.readiness_probe, "/readyz"),
        ("livenessProbe", &c.liveness_probe, "/healthz"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("{what} is an httpGet"));
        assert_eq!(get.path.as_deref(), Some(path), "{what} path");
        assert_eq!(resolve(&get.port), i32::from(metrics.port()), "{what} port");
    }
}

#[test]
fn daemonset_args_are_flags_the_agent_accepts() {
    let (_, d) = load();
    let (_, c) = agent(&d);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_netpol-agent"))
        .args(["run", "--help"])
        .output()
        .expect("running netpol-agent run --help");
    assert!(out.status.success(), "netpol-agent run --help failed");
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in c.args.iter().flatten().filter(|a| a.starts_with("--")) {
        assert!(
            help.contains(flag.as_str()),
            "`run` has no {flag} option:\n{help}"
        );
    }
}

#[test]
fn rbac_is_read_only_but_for_cnp_status_and_the_node_reports() {
    let (_, d) = load();
    assert_eq!(d.cluster_roles.len(), 1, "one ClusterRole");
    let role = &d.cluster_roles[0];
    assert!(role.aggregation_rule.is_none());
    let granted = rules(role.rules.as_deref().unwrap_or_default());
    let mut wanted = BTreeSet::new();
    for (g, res) in [
        ("", "pods"),
        ("", "namespaces"),
        ("", "services"),
        ("", "nodes"),
        ("networking.k8s.io", "networkpolicies"),
        ("networking.k8s.io", "servicecidrs"),
        ("policy.networking.k8s.io", "clusternetworkpolicies"),
    ] {
        for v in ["get", "list", "watch"] {
            wanted.insert((g, res, v));
        }
    }
    // The one cluster-wide write: the `Programmed` condition.
    for v in ["get", "patch", "update"] {
        wanted.insert((
            "policy.networking.k8s.io",
            "clusternetworkpolicies/status",
            v,
        ));
    }
    assert_eq!(
        granted, wanted,
        "exactly get/list/watch on the seven resources, and the CNP status"
    );

    // In the agents' own namespace: the node report Leases, nothing else.
    assert_eq!(d.roles.len(), 1, "one Role");
    let role = &d.roles[0];
    assert_eq!(role.metadata.namespace.as_deref(), Some("kube-system"));
    let granted = rules(role.rules.as_deref().unwrap_or_default());
    let wanted: BTreeSet<_> = ["get", "list", "watch", "create", "update", "patch"]
        .into_iter()
        .map(|v| ("coordination.k8s.io", "leases", v))
        .collect();
    assert_eq!(granted, wanted, "the Role grants the Leases only");
}

/// (group, resource, verb) of every rule; no resource names or URLs.
fn rules(rules: &[k8s_openapi::api::rbac::v1::PolicyRule]) -> BTreeSet<(&str, &str, &str)> {
    let mut granted = BTreeSet::new();
    for r in rules {
        assert!(r.resource_names.is_none(), "{r:?}");
        assert!(r.non_resource_urls.is_none(), "{r:?}");
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                for v in &r.verbs {
                    granted.insert((g.as_str(), res.as_str(), v.as_str()));
                }
            }
        }
    }
    granted
}

#[test]
fn binding_ties_the_service_account_to_the_role() {
    let (_, d) = load();
    let (ds, _) = agent(&d);
    assert_eq!(d.service_accounts.len(), 1, "one ServiceAccount");
    let sa = &d.service_accounts[0];
    let sa_name = sa.metadata.name.as_deref().expect("ServiceAccount name");
    let sa_ns = sa
        .metadata
        .namespace
        .as_deref()
        .expect("ServiceAccount namespace");
    assert_eq!(sa_ns, "kube-system");
    let pod = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec");
    assert_eq!(pod.service_account_name.as_deref(), Some(sa_name));
    assert_eq!(ds.metadata.namespace.as_deref(), Some(sa_ns));

    assert_eq!(d.cluster_role_bindings.len(), 1, "one ClusterRoleBinding");
    let b = &d.cluster_role_bindings[0];
    assert_eq!(b.role_ref.api_group, "rbac.authorization.k8s.io");
    assert_eq!(b.role_ref.kind, "ClusterRole");
    assert_eq!(
        Some(b.role_ref.name.as_str()),
        d.cluster_roles[0].metadata.name.as_deref()
    );
    let subjects = b.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1, "{subjects:?}");
    let s = &subjects[0];
    assert_eq!(s.kind, "ServiceAccount");
    assert_eq!(s.name, sa_name);
    assert_eq!(s.namespace.as_deref(), Some(sa_ns), "subject namespace");

    // The Role (node report Leases), in the same namespace, to the same account.
    assert_eq!(d.role_bindings.len(), 1, "one RoleBinding");
    let b = &d.role_bindings[0];
    assert_eq!(b.metadata.namespace.as_deref(), Some(sa_ns));
    assert_eq!(b.role_ref.kind, "Role");
    assert_eq!(
        Some(b.role_ref.name.as_str()),
        d.roles[0].metadata.name.as_deref()
    );
    let subjects = b.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1, "{subjects:?}");
    assert_eq!(
        (subjects[0].kind.as_str(), subjects[0].name.as_str()),
        ("ServiceAccount", sa_name)
    );
    assert_eq!(subjects[0].namespace.as_deref(), Some(sa_ns));
}
