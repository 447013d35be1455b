//! Pinned maps keep the size they were created with: an agent started with
//! other `--max-*` flags adopts them as they are, and reports (and checks
//! fullness against) the capacity the pinned maps really have.
//!
//! Needs root (CAP_BPF and a bpffs at /sys/fs/bpf); prints `SKIPPED` without
//! it, and fails under `CI=true`.

use netpol_agent::{
    datapath::{self, Datapath, MapSizes},
    pins::Pins,
};

#[test]
fn adopted_maps_report_their_pinned_capacity_not_the_asked_one() {
    if !netpol_lab::require_privileges(
        "adopted_maps_report_their_pinned_capacity_not_the_asked_one",
    ) {
        return;
    }
    let root = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/netpol-test-pins-{}",
        std::process::id()
    ));
    let small = MapSizes {
        endpoints: 64,
        peers_v4: 128,
        peers_v6: 96,
        policy: 256,
        flows: 4096,
        frags: 512,
        events_bytes: 1 << 16,
    };
    let result = std::panic::catch_unwind(|| {
        let first = Datapath::load(Pins::new(&root), small).expect("first load creates the pins");
        let created = first.sizes();
        drop(first);
        // The maps stay pinned; a second agent asks for the defaults.
        let second = Datapath::load(Pins::new(&root), MapSizes::default())
            .expect("second load adopts the pins");
        (created, second.sizes())
    });
    let _ = datapath::cleanup(&root);
    let _ = std::fs::remove_dir_all(&root);
    let (created, adopted) = result.expect("loads");
    let asked = MapSizes::default();
    for (name, c, a, want, default) in [
        (
            "endpoints",
            created.endpoints,
            adopted.endpoints,
            small.endpoints,
            asked.endpoints,
        ),
        (
            "peers_v4",
            created.peers_v4,
            adopted.peers_v4,
            small.peers_v4,
            asked.peers_v4,
        ),
        (
            "peers_v6",
            created.peers_v6,
            adopted.peers_v6,
            small.peers_v6,
            asked.peers_v6,
        ),
        (
            "policy",
            created.policy,
            adopted.policy,
            small.policy,
            asked.policy,
        ),
        (
            "flows",
            created.flows,
            adopted.flows,
            small.flows,
            asked.flows,
        ),
        (
            "frags",
            created.frags,
            adopted.frags,
            small.frags,
            asked.frags,
        ),
    ] {
        assert_ne!(
            want, default,
            "{name}: the test needs a size other than the default"
        );
        assert_eq!(c, want, "{name}: created with the size asked for");
        assert_eq!(
            a, want,
            "{name}: adopted with the pinned size, not the {default} asked for"
        );
    }
}
