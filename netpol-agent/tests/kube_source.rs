//! `KubeSource` against an in-process API server (`fake_apiserver`) that
//! speaks the real list/watch wire format: initial lists and readiness,
//! events, conversion errors, 410 Gone relists, bookmarks and an outage.
//!
//! Every wait is bounded (a few seconds) and every test is wrapped in an
//! overall bound, so a regression fails instead of hanging.

mod fake_apiserver;

use std::{
    future::Future,
    time::{Duration, Instant},
};

use fake_apiserver::{FakeApiServer, Res};
use netpol_agent::{
    kube_source::{Kind, KubeSource, Options, Retry, load_config},
    model::{Cluster, ObjectRef, PodPhase, Protocol},
    source::ClusterSource,
};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------
// Fixtures: objects as the API server sends them.

fn namespace(name: &str) -> Value {
    json!({
        "kind": "Namespace",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "labels": {"kubernetes.io/metadata.name": name},
        },
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    })
}

/// A running pod on node `n1` with one container serving `http` on 80.
fn pod(ns: &str, name: &str, ip: &str) -> Value {
    json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {"app": name},
            "managedFields": [{"manager": "kubelet", "operation": "Update"}],
        },
        "spec": {
            "nodeName": "n1",
            "containers": [{
                "name": "c",
                "image": "registry.example/app:1",
                "ports": [{"name": "http", "containerPort": 80, "protocol": "TCP"}],
            }],
        },
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    })
}

fn policy(ns: &str, name: &str, spec: Value) -> Value {
    json!({
        "kind": "NetworkPolicy",
        "apiVersion": "networking.k8s.io/v1",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    })
}

/// Allows `role=client` pods to reach `app=web` pods on TCP 80.
fn allow_web(ns: &str, name: &str) -> Value {
    policy(
        ns,
        name,
        json!({
            "podSelector": {"matchLabels": {"app": "web"}},
            "ingress": [{
                "from": [{"podSelector": {"matchLabels": {"role": "client"}}}],
                "ports": [{"port": 80, "protocol": "TCP"}],
            }],
            "policyTypes": ["Ingress"],
        }),
    )
}

// ---------------------------------------------------------------------------
// Harness.

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Runs a test body with an overall bound.
fn run<F: Future<Output = ()>>(body: F) {
    init_tracing();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(async {
            tokio::time::timeout(Duration::from_secs(20), body)
                .await
                .expect("test exceeded its 20 s bound");
        });
}

/// A started source for the fake server, with quick retries.
fn source(server: &FakeApiServer, page_size: u32) -> KubeSource {
    let url = server.url().parse().expect("server URL");
    let mut s = KubeSource::new(
        kube::Config::new(url),
        Options {
            page_size,
            retry: Some(Retry {
                first: Duration::from_millis(20),
                max: Duration::from_millis(200),
            }),
            absent_recheck: Duration::from_millis(50),
        },
    );
    s.start().expect("starting the watchers");
    s
}

/// Polls the source until `cond` holds (at most 5 s).
async fn wait_for(src: &mut KubeSource, what: &str, cond: impl Fn(&KubeSource) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        src.poll().expect("polling the source");
        if cond(src) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until the fake server's counter reaches `n` (at most 5 s).
async fn wait_server(what: &str, n: u64, count: impl Fn() -> u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while count() < n {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn cluster(src: &KubeSource) -> Cluster {
    src.snapshot().cluster
}

fn has_pod(src: &KubeSource, ns: &str, name: &str) -> bool {
    cluster(src).pods.contains_key(&ObjectRef::new(ns, name))
}

/// A server with namespaces `a` and `b`, `n` pods in `a` and one policy.
async fn populated(n: usize) -> FakeApiServer {
    let server = FakeApiServer::start().await;
    server.apply(namespace("a"));
    server.apply(namespace("b"));
    for i in 0..n {
        server.apply(pod("a", &format!("p{i}"), &format!("10.0.1.{}", i + 1)));
    }
    server.apply(allow_web("a", "allow-web"));
    server
}

/// A source that is ready and watching every kind (a watch only opens
/// after its list was applied: waiting for it keeps the tests that expire or
/// bookmark watches from racing the first watch request).
async fn ready_source(server: &FakeApiServer, page_size: u32) -> KubeSource {
    let mut src = source(server, page_size);
    wait_for(&mut src, "the initial lists", KubeSource::ready).await;
    for r in Res::ALL {
        wait_server("the first watches", 1, || server.open_watches(r) as u64).await;
    }
    src
}

// ---------------------------------------------------------------------------
// Tests.

#[test]
fn initial_lists_make_it_ready_with_everything_converted() {
    run(async {
        let server = FakeApiServer::start().await;
        let mut ns = namespace("a");
        ns["metadata"]["labels"]["team"] = json!("x");
        ns["metadata"]["annotations"] = json!({"netpol.dev/audit": "true", "other": "dropped"});
        server.apply(ns);
        server.apply(namespace("b"));
        server.apply(pod("a", "web", "10.0.1.1"));
        server.apply(pod("a", "client", "10.0.1.2"));
        let mut host = pod("b", "host", "192.168.0.10");
        host["spec"]["hostNetwork"] = json!(true);
        server.apply(host);
        server.apply(allow_web("a", "allow-web"));
        // Policies cannot be listed yet: the source must not be ready.
        server.fail_lists(Res::NetworkPolicies, Some(500));

        let mut src = source(&server, 2);
        assert_eq!(src.describe(), format!("kube:{}/", server.url()));
        wait_server("pods listed", 1, || server.lists_completed(Res::Pods)).await;
        wait_server("namespaces listed", 1, || {
            server.lists_completed(Res::Namespaces)
        })
        .await;
        wait_server("policy lists retried", 2, || {
            server.failed_lists(Res::NetworkPolicies)
        })
        .await;
        src.poll().expect("poll");
        assert!(!src.ready(), "ready before the policies were listed");

        server.fail_lists(Res::NetworkPolicies, None);
        wait_for(&mut src, "ready", KubeSource::ready).await;
        assert!(src.revision() > 0);
        // Three pods in pages of two.
        assert!(server.pages_served(Res::Pods) >= 2);

        let snap = src.snapshot();
        assert!(
            snap.errors.is_empty(),
            "unexpected errors: {:?}",
            snap.errors
        );
        let c = snap.cluster;
        assert_eq!(c.namespaces.len(), 2);
        let a = &c.namespaces["a"];
        assert_eq!(a.labels["team"], "x");
        assert!(a.audit());
        assert!(!a.annotations.contains_key("other"));
        assert_eq!(c.pods.len(), 3);
        let web = &c.pods[&ObjectRef::new("a", "web")];
        assert_eq!(web.ips, ["10.0.1.1".parse::<std::net::IpAddr>().unwrap()]);
        assert_eq!(web.node.as_deref(), Some("n1"));
        assert_eq!(web.phase, PodPhase::Running);
        assert_eq!(web.labels["app"], "web");
        assert_eq!(
            web.resolve_named_port("http", Protocol::Tcp)
                .collect::<Vec<_>>(),
            [80]
        );
        assert!(web.is_live());
        assert!(!c.pods[&ObjectRef::new("b", "host")].is_live());
        let p = &c.policies[&ObjectRef::new("a", "allow-web")];
        assert!(!p.invalid);
        assert_eq!(p.pod_selector.match_labels["app"], "web");
        assert_eq!(p.ingress.as_ref().map(Vec::len), Some(1));
        assert_eq!(p.egress, None);
    });
}

#[test]
fn added_modified_and_deleted_objects_propagate() {
    run(async {
        let server = populated(2).await;
        let mut src = ready_source(&server, 500).await;

        let r0 = src.revision();
        server.apply(pod("a", "new", "10.0.1.50"));
        wait_for(&mut src, "the new pod", |s| has_pod(s, "a", "new")).await;
        assert!(src.revision() > r0);

        let mut relabeled = pod("a", "new", "10.0.1.50");
        relabeled["metadata"]["labels"]["tier"] = json!("front");
        server.apply(relabeled.clone());
        wait_for(&mut src, "the new label", |s| {
            cluster(s).pods[&ObjectRef::new("a", "new")]
                .labels
                .get("tier")
                .is_some_and(|t| t == "front")
        })
        .await;

        // A status update the model does not keep must not bump the
        // revision. A later event on the same watch proves it was seen.
        let r1 = src.revision();
        let mut status_only = relabeled;
        status_only["status"]["conditions"] = json!([{"type": "Ready", "status": "True"}]);
        status_only["metadata"]["annotations"] = json!({"kubectl.kubernetes.io/restartedAt": "x"});
        server.apply(status_only);
        server.apply(pod("a", "marker", "10.0.1.51"));
        wait_for(&mut src, "the marker pod", |s| has_pod(s, "a", "marker")).await;
        assert_eq!(
            src.revision(),
            r1 + 1,
            "only the marker pod changed the model"
        );

        let mut ns = namespace("b");
        ns["metadata"]["labels"]["env"] = json!("prod");
        server.apply(ns);
        wait_for(&mut src, "the namespace label", |s| {
            cluster(s).namespaces["b"].labels.contains_key("env")
        })
        .await;

        let r2 = src.revision();
        assert!(server.delete(Res::Pods, "a", "new"));
        assert!(server.delete(Res::NetworkPolicies, "a", "allow-web"));
        assert!(server.delete(Res::Namespaces, "", "b"));
        wait_for(&mut src, "the deletions", |s| {
            let c = cluster(s);
            !c.pods.contains_key(&ObjectRef::new("a", "new"))
                && c.policies.is_empty()
                && !c.namespaces.contains_key("b")
        })
        .await;
        assert!(src.revision() >= r2 + 3);
        assert!(src.poll().expect("poll") || src.revision() > r2);
    });
}

#[test]
fn invalid_policy_is_reported_and_still_isolates() {
    run(async {
        let server = populated(1).await;
        server.apply(policy(
            "a",
            "bad",
            json!({
                "podSelector": {"matchLabels": {"app": "web"}},
                "ingress": [{
                    "from": [{"ipBlock": {"cidr": "10.0.0.0/33"}}],
                    "ports": [{"port": 80, "protocol": "ICMP"}],
                }],
            }),
        ));
        let mut src = ready_source(&server, 500).await;

        let snap = src.snapshot();
        let cidr = snap
            .errors
            .iter()
            .find(|e| e.contains("spec.ingress[0].from[0].ipBlock.cidr"))
            .unwrap_or_else(|| panic!("no ipBlock error in {:?}", snap.errors));
        assert!(cidr.contains("NetworkPolicy a/bad"), "{cidr}");
        assert!(
            snap.errors
                .iter()
                .any(|e| e.contains("a/bad") && e.contains("spec.ingress[0].ports[0].protocol")),
            "{:?}",
            snap.errors
        );
        let bad = &snap.cluster.policies[&ObjectRef::new("a", "bad")];
        assert!(bad.invalid);
        assert_eq!(bad.pod_selector.match_labels["app"], "web");
        assert_eq!(bad.ingress, Some(Vec::new()), "isolates, allows nothing");

        // Fixing it clears the errors and brings the rules.
        let r0 = src.revision();
        server.apply(allow_web("a", "bad"));
        wait_for(&mut src, "the fixed policy", |s| {
            s.snapshot().errors.is_empty()
        })
        .await;
        assert!(src.revision() > r0);
        let fixed = &cluster(&src).policies[&ObjectRef::new("a", "bad")];
        assert!(!fixed.invalid);
        assert_eq!(fixed.ingress.as_ref().map(Vec::len), Some(1));
    });
}

/// Expires every watch with 410 Gone while list pages are slow, and samples
/// the source throughout the relist: the snapshot stays the complete,
/// unchanged cluster and the revision does not move.
#[test]
fn gone_relists_without_gaps_or_revision_bumps() {
    run(async {
        let server = populated(40).await;
        let mut src = ready_source(&server, 4).await;
        src.poll().expect("poll");
        let before = cluster(&src);
        let r0 = src.revision();
        let lists = Res::ALL.map(|r| server.lists_completed(r));
        let watches = Res::ALL.map(|r| server.watches_started(r));
        let pages = server.pages_served(Res::Pods);

        server.set_page_delay(Duration::from_millis(15));
        server.expire_watches();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut during = 0;
        // A new watch of every kind means every relist completed and was
        // applied (the watcher only watches after InitDone).
        while Res::ALL
            .iter()
            .zip(watches)
            .any(|(r, w)| server.watches_started(*r) <= w)
        {
            assert!(Instant::now() < deadline, "relists did not complete");
            assert!(!src.poll().expect("poll"), "the relist bumped the revision");
            assert_eq!(src.revision(), r0);
            assert_eq!(
                cluster(&src),
                before,
                "the snapshot changed during the relist"
            );
            if server.pages_served(Res::Pods) > pages
                && server.lists_completed(Res::Pods) == lists[1]
            {
                during += 1;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert!(
            during > 0,
            "never sampled while the pod relist was in progress"
        );
        for (r, l) in Res::ALL.iter().zip(lists) {
            assert_eq!(server.lists_completed(*r), l + 1, "{r:?} relisted once");
        }
        assert_eq!(src.revision(), r0);
        assert_eq!(cluster(&src), before);

        // The watch runs again after the relist.
        server.set_page_delay(Duration::ZERO);
        server.apply(pod("a", "after", "10.0.2.1"));
        wait_for(&mut src, "a pod added after the relist", |s| {
            has_pod(s, "a", "after")
        })
        .await;
    });
}

/// A deletion the watch never saw (compacted away) is learned from the
/// relist, and only once the relist is complete.
#[test]
fn relist_applies_a_missed_deletion_atomically() {
    run(async {
        let server = populated(20).await;
        let mut src = ready_source(&server, 3).await;
        src.poll().expect("poll");
        let r0 = src.revision();
        let pod_lists = server.lists_completed(Res::Pods);
        assert!(has_pod(&src, "a", "p7"));

        server.set_page_delay(Duration::from_millis(15));
        assert!(server.delete_unseen(Res::Pods, "a", "p7"));
        server.expire_watches();
        let deadline = Instant::now() + Duration::from_secs(5);
        while server.lists_completed(Res::Pods) == pod_lists {
            assert!(Instant::now() < deadline, "pod relist did not complete");
            src.poll().expect("poll");
            assert_eq!(
                cluster(&src).pods.len(),
                20,
                "pods removed before the relist completed"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        wait_for(&mut src, "the missed deletion", |s| !has_pod(s, "a", "p7")).await;
        assert_eq!(cluster(&src).pods.len(), 19);
        assert_eq!(src.revision(), r0 + 1, "one replace, one revision");
    });
}

/// Bookmarks change nothing, but move the resume point: after the history
/// is compacted and the watches end, every kind resumes from its bookmark
/// instead of relisting.
#[test]
fn bookmarks_change_nothing_and_spare_a_relist() {
    run(async {
        let server = populated(3).await;
        let mut src = ready_source(&server, 500).await;
        // Moves the resourceVersion past what the pod and policy lists saw.
        let mut ns = namespace("b");
        ns["metadata"]["labels"]["env"] = json!("prod");
        server.apply(ns);
        wait_for(&mut src, "the namespace label", |s| {
            cluster(s).namespaces["b"].labels.contains_key("env")
        })
        .await;
        src.poll().expect("poll");
        let before = src.snapshot();
        let r0 = src.revision();
        let lists = Res::ALL.map(|r| server.lists_completed(r));
        let watches = Res::ALL.map(|r| server.watches_started(r));

        server.bookmark();
        server.bookmark();
        server.compact();
        server.end_watches();
        for (r, w) in Res::ALL.iter().zip(watches) {
            wait_server("the watch to resume", w + 1, || server.watches_started(*r)).await;
        }
        assert!(!src.poll().expect("poll"));
        assert_eq!(src.revision(), r0);
        let after = src.snapshot();
        assert_eq!(after.cluster, before.cluster);
        assert_eq!(after.errors, before.errors);
        for (r, l) in Res::ALL.iter().zip(lists) {
            assert_eq!(server.lists_completed(*r), l, "{r:?} relisted");
        }

        server.apply(pod("a", "after", "10.0.2.1"));
        wait_for(&mut src, "a pod added after the bookmarks", |s| {
            has_pod(s, "a", "after")
        })
        .await;
    });
}

/// The API server goes away for a while: the last state stays in force
/// (ready, same snapshot), and when it is back the watches resume from
/// where they were and catch up on what happened meanwhile.
#[test]
fn api_server_outage_keeps_the_last_state_and_recovers() {
    run(async {
        let server = populated(5).await;
        let mut src = ready_source(&server, 500).await;
        src.poll().expect("poll");
        let before = cluster(&src);
        let r0 = src.revision();
        let lists = Res::ALL.map(|r| server.lists_completed(r));

        server.stop();
        let down = Instant::now();
        while down.elapsed() < Duration::from_millis(400) {
            assert!(!src.poll().expect("a watch error is not a poll error"));
            assert!(src.ready());
            assert_eq!(src.revision(), r0);
            assert_eq!(cluster(&src), before);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Changes while the clients cannot see them.
        server.apply(pod("a", "while-down", "10.0.3.1"));
        server.delete(Res::Pods, "a", "p0");

        server.restart();
        wait_for(&mut src, "the changes made during the outage", |s| {
            has_pod(s, "a", "while-down") && !has_pod(s, "a", "p0")
        })
        .await;
        assert_eq!(cluster(&src).pods.len(), 5);
        for (r, l) in Res::ALL.iter().zip(lists) {
            assert_eq!(
                server.lists_completed(*r),
                l,
                "{r:?}: resumed, not relisted"
            );
        }
    });
}

/// `--kubeconfig`: the configuration `main` hands to the source.
#[test]
fn a_kubeconfig_file_reaches_the_server() {
    run(async {
        let server = populated(2).await;
        let path = std::env::temp_dir().join(format!("netpol-kubeconfig-{}", std::process::id()));
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: test\n\
             clusters:\n- name: fake\n  cluster:\n    server: {}\n\
             contexts:\n- name: test\n  context:\n    cluster: fake\n    user: nobody\n\
             users:\n- name: nobody\n  user: {{}}\n",
            server.url()
        );
        std::fs::write(&path, kubeconfig).expect("writing the kubeconfig");
        let config = load_config(Some(&path)).await;
        let _ = std::fs::remove_file(&path);
        let mut src = KubeSource::new(config.expect("loading the kubeconfig"), Options::default());
        wait_for(&mut src, "the initial lists", KubeSource::ready).await;
        assert_eq!(cluster(&src).pods.len(), 2);

        let missing = std::path::Path::new("/nonexistent/kubeconfig");
        let err = load_config(Some(missing)).await.expect_err("no such file");
        assert!(err.to_string().contains("/nonexistent/kubeconfig"), "{err}");
    });
}

#[test]
fn poll_outside_a_runtime_is_an_error() {
    let mut src = KubeSource::new(
        kube::Config::new("http://127.0.0.1:9".parse().expect("url")),
        Options::default(),
    );
    let err = src.poll().expect_err("no runtime");
    assert!(err.to_string().contains("tokio runtime"), "{err}");
    assert!(!src.ready());
}

/// An Admin ClusterNetworkPolicy denying egress to the metadata address.
fn cnp(name: &str) -> Value {
    json!({
        "kind": "ClusterNetworkPolicy",
        "apiVersion": "policy.networking.k8s.io/v1alpha2",
        "metadata": {"name": name},
        "spec": {
            "tier": "Admin",
            "priority": 7,
            "subject": {"namespaces": {}},
            "egress": [{"name": "no-metadata", "action": "Deny",
                        "to": [{"networks": ["169.254.169.254/32"]}]}],
        },
    })
}

fn not_enforced_lines(src: &KubeSource) -> Vec<String> {
    src.snapshot()
        .errors
        .into_iter()
        .filter(|e| e.contains("NOT ENFORCED"))
        .collect()
}

/// A cluster without the ClusterNetworkPolicy CRD (lists answered 404):
/// the source still becomes ready, with no CNP, and picks CNPs up once the
/// CRD is installed. A CNP is enforced (no notice), except its `nodes`
/// peers while no Node object is known.
#[test]
fn a_missing_cnp_crd_means_no_cnps_and_is_checked_again() {
    run(async {
        let server = populated(1).await;
        server.fail_lists(Res::ClusterNetworkPolicies, Some(404));
        let mut src = source(&server, 500);
        wait_for(&mut src, "readiness without the CRD", KubeSource::ready).await;
        assert!(cluster(&src).cluster_policies.is_empty());
        assert!(not_enforced_lines(&src).is_empty());

        // The CRD is installed and a CNP created.
        server.apply(cnp("deny-metadata"));
        server.fail_lists(Res::ClusterNetworkPolicies, None);
        wait_for(&mut src, "the CNP", |s| {
            cluster(s).cluster_policies.contains_key("deny-metadata")
        })
        .await;
        let lines = not_enforced_lines(&src);
        assert!(lines.is_empty(), "{lines:?}");

        // A `nodes` peer with no Node known matches no address: said.
        let mut to_nodes = cnp("deny-nodes");
        to_nodes["spec"]["egress"][0]["to"] = json!([{"nodes": {"matchLabels": {"role": "cp"}}}]);
        server.apply(to_nodes);
        wait_for(&mut src, "the nodes CNP", |s| {
            cluster(s).cluster_policies.contains_key("deny-nodes")
        })
        .await;
        let lines = not_enforced_lines(&src);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains("deny-nodes"), "{}", lines[0]);
        // Once a Node is watched, the notice goes.
        server.apply(node("cp-1", "a", &["192.168.0.10"]));
        wait_for(&mut src, "the node", |s| !cluster(s).nodes.is_empty()).await;
        assert!(not_enforced_lines(&src).is_empty());
        server.delete(Res::ClusterNetworkPolicies, "", "deny-nodes");

        // Watched like any kind from then on.
        server.delete(Res::ClusterNetworkPolicies, "", "deny-metadata");
        wait_for(&mut src, "the deletion", |s| {
            cluster(s).cluster_policies.is_empty()
        })
        .await;
        assert!(not_enforced_lines(&src).is_empty());
    });
}

/// Only "not found" means "no CNPs": an API server that fails the list
/// otherwise keeps the source unready (it may hold Deny policies).
#[test]
fn a_failing_cnp_list_is_not_taken_for_a_missing_crd() {
    run(async {
        let server = populated(1).await;
        server.fail_lists(Res::ClusterNetworkPolicies, Some(500));
        let mut src = source(&server, 500);
        wait_server("failed CNP lists", 3, || {
            server.failed_lists(Res::ClusterNetworkPolicies)
        })
        .await;
        src.poll().expect("polling");
        assert!(!src.ready(), "a 500 is not an absent CRD");
        server.fail_lists(Res::ClusterNetworkPolicies, None);
        wait_for(&mut src, "readiness", KubeSource::ready).await;
    });
}

#[test]
fn a_stopped_watcher_is_reported_then_restarted_and_sees_changes() {
    run(async {
        let server = populated(1).await;
        let mut src = ready_source(&server, 500).await;
        let pods = server.lists_completed(Res::Pods);

        // A watcher task that ends (as a panic would end it) leaves the
        // last state in force and makes the source unhealthy ...
        src.abort_watcher(Kind::Pod);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let health = src.health();
        assert_eq!(health.stopped, vec!["Pod".to_string()]);
        assert!(has_pod(&src, "a", "p0"), "the last state stays");

        // ... until the poll spawns it again (after the first restart
        // delay), which lists again and then sees new changes.
        server.apply(pod("a", "while-stopped", "10.0.1.60"));
        wait_for(&mut src, "the restarted pod watcher's relist", |s| {
            has_pod(s, "a", "while-stopped")
        })
        .await;
        assert!(
            server.lists_completed(Res::Pods) > pods,
            "the new watcher listed"
        );
        assert!(src.health().stopped.is_empty());
        assert!(
            src.health().restarts.contains(&("Pod".to_string(), 1)),
            "one restart counted: {:?}",
            src.health().restarts
        );
        server.apply(pod("a", "after", "10.0.1.61"));
        wait_for(&mut src, "a pod added after the restart", |s| {
            has_pod(s, "a", "after")
        })
        .await;
    });
}

fn node(name: &str, zone: &str, ips: &[&str]) -> Value {
    json!({
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
        "status": {
            "addresses": ips
                .iter()
                .map(|ip| json!({"type": "InternalIP", "address": ip}))
                .chain(std::iter::once(json!({"type": "Hostname", "address": name})))
                .collect::<Vec<_>>(),
            // Heartbeat-like fields the model does not keep.
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    })
}

#[test]
fn nodes_are_watched_for_their_labels_and_addresses() {
    run(async {
        let server = populated(1).await;
        server.apply(node("n1", "a", &["192.168.0.1", "fd00::1"]));
        let mut src = ready_source(&server, 500).await;
        let n1 = cluster(&src).nodes["n1"].clone();
        assert_eq!(n1.labels["topology.kubernetes.io/zone"], "a");
        assert_eq!(
            n1.addresses,
            [
                "192.168.0.1".parse::<std::net::IpAddr>().unwrap(),
                "fd00::1".parse().unwrap()
            ],
            "InternalIPs only, not the hostname"
        );

        // A relabel and a new node are seen; a status-only update is not a change.
        server.apply(node("n1", "b", &["192.168.0.1", "fd00::1"]));
        server.apply(node("n2", "a", &["192.168.0.2"]));
        wait_for(&mut src, "the relabel and the new node", |s| {
            let c = cluster(s);
            c.nodes.contains_key("n2") && c.nodes["n1"].labels["topology.kubernetes.io/zone"] == "b"
        })
        .await;
        let r = src.revision();
        let mut heartbeat = node("n2", "a", &["192.168.0.2"]);
        heartbeat["status"]["conditions"][0]["lastHeartbeatTime"] = json!("2026-12-07T00:00:00Z");
        server.apply(heartbeat);
        server.apply(pod("a", "marker", "10.0.1.99"));
        wait_for(&mut src, "the marker pod", |s| has_pod(s, "a", "marker")).await;
        assert_eq!(
            src.revision(),
            r + 1,
            "only the marker pod changed the model"
        );

        assert!(server.delete(Res::Nodes, "", "n2"));
        wait_for(&mut src, "the node's removal", |s| {
            !cluster(s).nodes.contains_key("n2")
        })
        .await;
    });
}
