//! What `/readyz` and `/healthz` answer.
//!
//! Ready means "enforcing the current state": a complete state is applied
//! (synced), the source has not been failing for longer than a bound (past
//! it, the cluster may have moved on without us), no map write failed in
//! the last sync, and every pod veth carries the programs. Each reason not
//! to be ready is a sentence naming what is wrong, in `/readyz`'s body and
//! in the status. Readiness gates a DaemonSet's rolling update: a new agent
//! that cannot enforce stops the rollout.
//!
//! Healthy means the run loop turns: it writes the status at least once a
//! second, so a status older than [`STUCK_AFTER`] means the loop is stuck
//! (the kubelet then restarts the agent; the programs stay pinned).

use std::time::Duration;

/// No status write for this long: the run loop is stuck.
pub const STUCK_AFTER: Duration = Duration::from_secs(30);

/// A source that has been failing, by what it could not read.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SourceHealth {
    /// What fails (a kind of object, a watcher), and for how long.
    pub failing: Vec<(String, Duration)>,
    /// Watchers that stopped (they read nothing more until restarted).
    pub stopped: Vec<String>,
    /// How many times each watcher was restarted after it stopped.
    pub restarts: Vec<(String, u64)>,
}

/// What the agent knows at the end of a sync.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    pub synced: bool,
    pub source: &'a SourceHealth,
    pub stale_after: Duration,
    /// Map writes that failed in the last sync (they are retried).
    pub failed_writes: usize,
    /// Pod veths without the agent's programs.
    pub veths_without_programs: &'a [String],
}

/// Why the agent is not ready; empty when it is.
pub fn not_ready(i: &Inputs<'_>) -> Vec<String> {
    let mut why = Vec::new();
    if !i.synced {
        why.push("not synced: the source's current state is not applied yet".to_owned());
    }
    for (what, since) in &i.source.failing {
        if *since > i.stale_after {
            why.push(format!(
                "the {what} watch has failed for {:.1}s (more than {}s): the enforced state may be stale",
                since.as_secs_f64(),
                i.stale_after.as_secs()
            ));
        }
    }
    for what in &i.source.stopped {
        why.push(format!(
            "the {what} watcher stopped: its changes are not seen"
        ));
    }
    if i.failed_writes > 0 {
        why.push(format!(
            "{} map writes failed in the last sync (retried; the status' errors name them)",
            i.failed_writes
        ));
    }
    if !i.veths_without_programs.is_empty() {
        why.push(format!(
            "{} pod veths carry no programs: {}",
            i.veths_without_programs.len(),
            i.veths_without_programs.join(", ")
        ));
    }
    why
}

/// Whether a status written at `written_unix_ms` (0: none yet) shows a
/// stuck run loop at `now_unix_ms`.
pub fn stuck(written_unix_ms: u64, now_unix_ms: u64) -> bool {
    written_unix_ms != 0
        && now_unix_ms.saturating_sub(written_unix_ms) > STUCK_AFTER.as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs<'a>(source: &'a SourceHealth, veths: &'a [String]) -> Inputs<'a> {
        Inputs {
            synced: true,
            source,
            stale_after: Duration::from_secs(60),
            failed_writes: 0,
            veths_without_programs: veths,
        }
    }

    #[test]
    fn ready_when_synced_fresh_written_and_attached() {
        assert!(not_ready(&inputs(&SourceHealth::default(), &[])).is_empty());
    }

    #[test]
    fn a_short_outage_keeps_ready_a_long_one_does_not() {
        let short = SourceHealth {
            failing: vec![("Pod".into(), Duration::from_secs(15))],
            stopped: vec![],
            restarts: vec![],
        };
        assert!(not_ready(&inputs(&short, &[])).is_empty());
        let long = SourceHealth {
            failing: vec![("Pod".into(), Duration::from_secs(61))],
            stopped: vec![],
            restarts: vec![],
        };
        let why = not_ready(&inputs(&long, &[]));
        assert_eq!(why.len(), 1);
        assert!(why[0].contains("Pod watch has failed for 61.0s"), "{why:?}");
    }

    #[test]
    fn every_reason_is_named() {
        let source = SourceHealth {
            failing: vec![],
            stopped: vec!["NetworkPolicy".into()],
            restarts: vec![],
        };
        let veths = ["cali1".to_owned(), "veth2".to_owned()];
        let why = not_ready(&Inputs {
            synced: false,
            failed_writes: 2,
            ..inputs(&source, &veths)
        });
        assert_eq!(why.len(), 4, "{why:?}");
        assert!(why[0].starts_with("not synced"));
        assert!(why[1].contains("NetworkPolicy watcher stopped"));
        assert!(why[2].starts_with("2 map writes failed"));
        assert!(why[3].contains("2 pod veths carry no programs: cali1, veth2"));
    }

    #[test]
    fn stuck_only_after_a_first_write_and_the_bound() {
        assert!(!stuck(0, 1_000_000), "no status yet: starting");
        assert!(!stuck(1_000_000, 1_000_000 + 29_000));
        assert!(stuck(1_000_000, 1_000_000 + 31_000));
    }
}
