//! The directory source with real agents: an agent restarted on an empty
//! manifests directory (a volume not mounted yet, a sync that has not run)
//! must keep enforcing what its pinned maps hold rather than compile an
//! empty cluster and remove every endpoint; a half-written policy file must
//! not open anything. Needs root; skips loudly without it, fails under CI.

use std::{
    io::Write as _,
    net::IpAddr,
    path::Path,
    time::{Duration, Instant},
};

use netpol_lab::{
    AgentProc, AgentSource, Agents, LabState, Protocol, connect, require_privileges, start_agents,
};

mod common {
    pub mod lab;
}

use common::lab::{AGENT, write_policy};

const PORTS: &str = "[{port: 80, protocol: TCP}]";

/// x is default-deny; y/a may reach x/a on 80.
const DENY_ALL: &str = netpol_lab::fixtures::DENY_ALL_X;
const ALLOW_YA: &str = netpol_lab::fixtures::ALLOW_YA_TO_XA_80;

fn connects(lab: &LabState, from: (&str, &str), to: (&str, &str)) -> bool {
    let from = lab.pod(from.0, from.1).expect("from pod");
    let to = lab.pod(to.0, to.1).expect("to pod");
    connect(
        lab,
        from,
        IpAddr::V4(to.ip_v4),
        80,
        Protocol::Tcp,
        Duration::from_millis(500),
    )
}

fn enforced(lab: &LabState) -> (bool, bool) {
    (
        connects(lab, ("y", "a"), ("x", "a")),
        connects(lab, ("y", "b"), ("x", "a")),
    )
}

fn stop(mut agents: Agents) {
    for a in &mut agents.agents {
        a.kill();
        a.cleanup_pins();
    }
}

#[test]
fn an_agent_restarted_on_an_empty_directory_keeps_enforcing_until_it_has_read_one() {
    if !require_privileges("an_agent_restarted_on_an_empty_directory_keeps_enforcing") {
        return;
    }
    let lab = common::lab::up('e', PORTS);
    let mut agents = start_agents(&lab, Path::new(AGENT), &[]).expect("start agents");
    agents
        .change(
            || {
                write_policy(&lab, "deny-all.yaml", DENY_ALL);
                write_policy(&lab, "allow-ya.yaml", ALLOW_YA);
            },
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(enforced(&lab), (true, false), "y/a allowed, y/b denied");

    // Restart every agent on an empty directory.
    let empty = lab.manifests_dir.with_file_name("manifests-empty");
    let _ = std::fs::remove_dir_all(&empty);
    std::fs::create_dir_all(&empty).expect("empty dir");
    for a in &mut agents.agents {
        a.kill();
    }
    let mut restarted = Agents {
        agents: lab
            .nodes
            .iter()
            .map(|n| {
                AgentProc::start_with(
                    &lab,
                    n,
                    Path::new(AGENT),
                    &AgentSource::Dir(empty.clone()),
                    &[],
                )
                .expect("restart agent")
            })
            .collect(),
    };
    // Each new agent's first status (loading the programs takes a moment on a busy
    // machine), then several polls and rescans of nothing.
    for a in &mut restarted.agents {
        let deadline = Instant::now() + Duration::from_secs(30);
        while a.status().and_then(|s| s["pid"].as_u64()) != a.pid().map(u64::from) {
            assert!(a.exited().is_none(), "{}:\n{}", a.node, a.log_tail(20));
            assert!(
                Instant::now() < deadline,
                "{}: no status after 30 s",
                a.node
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    std::thread::sleep(Duration::from_secs(3));
    for a in &mut restarted.agents {
        assert!(a.exited().is_none(), "{}:\n{}", a.node, a.log_tail(20));
        let status = a.status().expect("status written while not ready");
        assert_eq!(
            status["synced"].as_bool(),
            Some(false),
            "{}: ready on an empty directory: {status}",
            a.node
        );
    }
    // Still enforcing the pinned state: had the agent compiled an empty
    // cluster, x/a's endpoint would be gone and y/a denied (no endpoint), or
    // its policy gone and y/b allowed.
    assert_eq!(
        enforced(&lab),
        (true, false),
        "enforcement changed while the source was not ready"
    );

    // The manifests arrive (copied in, each renamed into place): ready, and
    // enforcing the same.
    restarted
        .change(
            || {
                for e in std::fs::read_dir(&lab.manifests_dir).expect("manifests") {
                    let e = e.expect("entry");
                    let name = e.file_name().to_string_lossy().into_owned();
                    if name.starts_with('.') {
                        continue;
                    }
                    let tmp = empty.join(format!(".{name}.tmp"));
                    std::fs::copy(e.path(), &tmp).expect("copy");
                    std::fs::rename(&tmp, empty.join(&name)).expect("rename");
                }
            },
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(enforced(&lab), (true, false));

    // A policy file rewritten in place, with its writer stalled after
    // `from:` (which alone would allow every peer): nothing opens.
    let path = empty.join("allow-ya.yaml");
    let cut = &ALLOW_YA[..ALLOW_YA.find("from:").expect("from:") + "from:".len()];
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .expect("open for writing");
    f.write_all(cut.as_bytes()).expect("write half");
    f.flush().expect("flush");
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        assert!(
            !connects(&lab, ("y", "b"), ("x", "a")),
            "the half-written policy opened x/a to y/b"
        );
    }
    // The writer finishes: the policy as written applies.
    f.write_all(&ALLOW_YA.as_bytes()[cut.len()..])
        .expect("write rest");
    drop(f);
    let revisions = restarted.revisions();
    restarted
        .wait_synced(&revisions, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(enforced(&lab), (true, false));

    stop(restarted);
    let _ = std::fs::remove_dir_all(&empty);
}
