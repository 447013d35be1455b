//! Size of the compiled maps at scale: entries grow with distinct label
//! sets and policy sets, never with pods x pods. Compile times and memory at
//! 100k pods are measured by `benches/src/bin/control_plane.rs` (a program
//! that prints numbers; this test asserts sizes only).

use netpol_agent::{
    compiler::{Compiler, NodeInfo},
    model::{Cluster, build::*},
};
use netpol_common::IDENTITY_ANY;

/// The tenant cluster (`model::build::tenant_cluster`).
fn cluster_of(namespace_count: u32, apps: u32, replicas: u32, nodes: u32) -> Cluster {
    tenant_cluster(namespace_count, apps, replicas, nodes)
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
fn a_broad_ip_block_costs_entries_per_policy_set_not_per_pod_identity() {
    // One local pod per namespace (so one policy set each), every namespace
    // with its own pod identities: the egress rule to 10.0.0.0/8 (which
    // covers every pod IP) is keyed on address identities, a handful per
    // policy set, where keying it on pod identities would cost one entry per
    // pod identity inside the block per policy set.
    let node = NodeInfo::new("n1", ["192.168.0.1"]);
    let per_set = |namespaces: u32| {
        let c = cluster_of(namespaces, 3, 2, 6);
        let out = Compiler::default().compile(&c, &node);
        let sets = out.policy_sets.len();
        assert_eq!(sets, out.maps.endpoints.len(), "one endpoint per set here");
        let address_entries = out
            .maps
            .policy
            .keys()
            .filter(|(k, _)| {
                k.identity != IDENTITY_ANY
                    && out.identities.get(&k.identity).is_some_and(|i| i.address)
            })
            .count();
        let pod_identities = out.identities.values().filter(|i| !i.address).count();
        (address_entries as f64 / sets as f64, pod_identities)
    };
    let (small, small_ids) = per_set(10);
    let (big, big_ids) = per_set(40);
    assert!(
        big_ids > 3 * small_ids,
        "{small_ids} -> {big_ids} pod identities"
    );
    assert_eq!(small, big, "address entries per policy set do not grow");
    assert!(big <= 6.0, "{big} address entries per policy set");
}
