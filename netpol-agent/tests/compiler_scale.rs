//! Size of the compiled maps at scale, and (ignored by default) a
//! measurement of compile time at 100k pods that prints numbers:
//!
//! `cargo test --release -p netpol-agent --test compiler_scale -- --ignored --nocapture`
//!
//! Timings are printed, never asserted.

use std::time::Instant;

use netpol_agent::{
    compiler::{Compiler, NodeInfo, diff},
    model::{Cluster, ObjectRef, build::*},
};

/// `namespaces` namespaces of `apps` deployments with `replicas` pods each,
/// spread over `nodes` nodes; every namespace has a default deny, an
/// allow-from-frontend rule per app, an allow from the monitoring namespace
/// on a named port, and egress to DNS and to an ipBlock.
fn cluster_of(namespace_count: u32, apps: u32, replicas: u32, nodes: u32) -> Cluster {
    let mut c = cluster().namespace(namespace("monitoring").label("role", "monitoring"));
    c.upsert_pod(
        pod("monitoring", "prom")
            .labels([("app", "prom")])
            .ip("10.255.255.1")
            .node("n0"),
    );
    let mut n = 0u32;
    for ns in 0..namespace_count {
        let ns_name = format!("ns{ns}");
        c.upsert_namespace(namespace(&ns_name).label("tenant", &format!("t{}", ns % 10)));
        for app in 0..apps {
            let app_name = format!("app{app}");
            for r in 0..replicas {
                n += 1;
                let ip = format!("10.{}.{}.{}", n >> 16 & 0xff, n >> 8 & 0xff, n & 0xff);
                c.upsert_pod(
                    pod(&ns_name, &format!("{app_name}-{r}"))
                        .labels([("app", app_name.as_str()), ("pod-template-hash", "abc123")])
                        .ip(&ip)
                        .node(&format!("n{}", n % nodes))
                        .named_port("metrics", Protocol::Tcp, 9090)
                        .named_port("http", Protocol::Tcp, 8080 + (app % 2) as u16),
                );
            }
            c.upsert_policy(
                policy(&ns_name, &format!("{app_name}-ingress"))
                    .select(labels([("app", app_name.as_str())]))
                    .ingress(
                        allow()
                            .from(pods(labels([("app", "app0")])))
                            .port(named(Protocol::Tcp, "http")),
                    ),
            );
        }
        c.upsert_policy(
            policy(&ns_name, "default-deny")
                .select(all())
                .deny_ingress()
                .deny_egress(),
        );
        c.upsert_policy(
            policy(&ns_name, "allow-monitoring").select(all()).ingress(
                allow()
                    .from(namespaces(labels([("role", "monitoring")])))
                    .port(named(Protocol::Tcp, "metrics")),
            ),
        );
        c.upsert_policy(
            policy(&ns_name, "egress").select(all()).egress(
                allow()
                    .to(pods(all()))
                    .to(block(cidr("10.0.0.0/8").except("10.255.0.0/16")))
                    .port(named(Protocol::Tcp, "http"))
                    .port(udp(53)),
            ),
        );
    }
    c
}

#[test]
fn map_sizes_grow_with_distinct_label_sets_not_pods() {
    let small = cluster_of(10, 5, 4, 4);
    let big = cluster_of(10, 5, 40, 4);
    let node = NodeInfo::new("n1", ["192.168.0.1"]);
    let s = Compiler::default().compile(&small, &node);
    let b = Compiler::default().compile(&big, &node);
    assert_eq!(
        s.identities.len(),
        b.identities.len(),
        "10x the replicas, same identities"
    );
    assert_eq!(
        s.maps.policy.len(),
        b.maps.policy.len(),
        "10x the replicas, same policy entries"
    );
    assert_eq!(s.policy_sets.len(), b.policy_sets.len());
    assert_eq!(b.maps.endpoints.len(), 10 * 5 * 40 / 4);
}

#[test]
#[ignore = "measurement: run in release with --ignored --nocapture"]
fn compile_100k_pods() {
    // 1000 namespaces x 10 apps x 10 replicas; 100 and 500 pods per node.
    for nodes in [1000, 200] {
        measure(1000, 10, 10, nodes);
    }
}

fn measure(namespace_count: u32, apps: u32, replicas: u32, nodes: u32) {
    let t = Instant::now();
    let mut c = cluster_of(namespace_count, apps, replicas, nodes);
    println!(
        "cluster: {} namespaces, {} pods, {} policies, {} nodes, built in {:?}",
        c.namespaces.len(),
        c.pods.len(),
        c.policies.len(),
        nodes,
        t.elapsed()
    );
    let node = NodeInfo::new("n1", ["192.168.0.1"]);
    let mut compiler = Compiler::default();
    let t = Instant::now();
    let first = compiler.compile(&c, &node);
    println!("  first compile: {:?}", t.elapsed());
    println!(
        "  maps: {} endpoints, {} v4 peers, {} policy entries, {} identities, {} policy sets, {} rules",
        first.maps.endpoints.len(),
        first.maps.peers_v4.len(),
        first.maps.policy.len(),
        first.identities.len(),
        first.policy_sets.len(),
        first.rules.len()
    );

    let t = Instant::now();
    let again = compiler.compile(&c, &node);
    let d = diff(&first, &again);
    println!(
        "  recompile unchanged + diff: {:?}, {} updates",
        t.elapsed(),
        d.updates.len()
    );

    // A pod in a namespace with a local endpoint becomes an app0 (a peer
    // that app policies allow).
    let local_ns = first
        .maps
        .endpoints
        .keys()
        .next()
        .expect("local endpoints")
        .namespace
        .clone();
    let victim = ObjectRef::new(local_ns, "app3-1");
    c.pods
        .get_mut(&victim)
        .expect("pod exists")
        .labels
        .insert("app".into(), "app0".into());
    let t = Instant::now();
    let changed = compiler.compile(&c, &node);
    let d = diff(&again, &changed);
    println!(
        "  recompile after one label change + diff: {:?}, {} updates, revokes: {}",
        t.elapsed(),
        d.updates.len(),
        d.revokes
    );
}
