//! netpol-lab: a Kubernetes-like cluster made of network namespaces on one machine, to test
//! netpol without Docker or an API server.
//!
//! * [`ClusterSpec`]: the cluster file (fabric mode, nodes, namespaces, pods).
//! * [`up`] / [`down`]: build and remove a lab; [`LabState`] (saved as
//!   `/run/netpol-lab/<lab>/state.json`, loaded with [`LabState::load`]) says where everything is.
//! * [`probe`] / [`connect`]: real connections from inside pod namespaces, as [`TruthTable`]s.
//! * [`netns_command`]: run a command in a node's (or pod's) netns, keeping bpffs visible.
//! * [`cni`]: pods set up through the chained CNI plugin `netpol-cni`, as a runtime would.
//! * [`Lab`]: a lab that goes down when dropped, for tests; [`require_privileges`] skips them
//!   loudly without root.
//!
//! See `lab/README.md` for the cluster file format and the topology.

pub mod agents;
pub mod cluster;
pub mod cni;
pub mod controlplane;
pub mod cp_ops;
pub mod fixtures;
pub mod kube;
pub mod manifests;
pub mod netns;
pub mod peer;
pub mod pki;
pub mod probe;
pub mod server;
pub mod services;
pub mod spec;
pub mod state;
pub mod stream;
pub mod table;
pub mod tools;

use std::{io::Write, ops::Deref, path::Path};

pub use agents::{AgentProc, AgentSource, Agents, start_agents, start_agents_with};
pub use cluster::{
    AddPodOptions, DownReport, LabError, UpOptions, add_pod, down, down_all, remove_pod,
    set_namespace_labels, set_pod_labels, up,
};
pub use netns::{netns_command, run_in_netns};
pub use probe::{
    Attempt, ProbeError, ProbeResult, ProbeResults, ProbeSpec, TableKey, Via, connect,
    connect_detailed, probe,
};
pub use spec::{Attachment, ClusterSpec, FabricMode, PodSpec, PortSpec, Protocol, SpecError};
pub use state::{ChangeError, Family, LabState, NodeState, PodState, StateError, Vtep, VxlanState};
pub use stream::{StreamError, StreamHandle, StreamReport, start_stream, start_stream_via};
pub use table::{Comparison, Mismatch, TruthTable};

/// A running lab that is torn down when dropped (for tests and tools).
#[derive(Debug)]
pub struct Lab {
    state: LabState,
    down_on_drop: bool,
}

impl Lab {
    /// Brings a lab up (see [`up`]).
    pub fn up(spec: &ClusterSpec, options: &UpOptions) -> Result<Lab, LabError> {
        Ok(Lab {
            state: up(spec, options)?,
            down_on_drop: true,
        })
    }

    /// The lab's state.
    pub fn state(&self) -> &LabState {
        &self.state
    }

    /// Tears the lab down now, reporting errors (dropping does the same, ignoring them).
    pub fn down(mut self) -> Result<DownReport, LabError> {
        self.down_on_drop = false;
        down(&self.state.name)
    }

    /// Leaves the lab running (to look at it after a failed test) and returns its state;
    /// `netpol-lab down <name>` removes it later.
    pub fn keep(mut self) -> LabState {
        self.down_on_drop = false;
        self.state.clone()
    }
}

impl Deref for Lab {
    type Target = LabState;

    fn deref(&self) -> &LabState {
        &self.state
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.down_on_drop {
            return;
        }
        if let Err(e) = down(&self.state.name) {
            eprintln!("netpol-lab: tearing down lab {:?}: {e}", self.state.name);
        }
    }
}

/// For tests that need root and network namespaces: returns true if they can run. Otherwise
/// prints a loud `SKIPPED` line naming the test and returns false, or, when `CI=true`, panics:
/// CI must run these tests, never skip them silently.
pub fn require_privileges(test: &str) -> bool {
    let problem = if unsafe_geteuid() != 0 {
        Some("needs root (creates network namespaces)".to_owned())
    } else if !Path::new("/proc/self/ns/net").exists() {
        Some("needs network namespaces (/proc/self/ns/net is missing)".to_owned())
    } else if std::process::Command::new("ip").arg("-V").output().is_err() {
        Some("needs iproute2 (`ip` is not on PATH)".to_owned())
    } else {
        None
    };
    let Some(problem) = problem else {
        return true;
    };
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: {problem}; CI=true, so this test must run, not be skipped");
    }
    // Straight to fd 2: libtest captures eprintln! of passing tests, and a skip must be seen.
    let _ = writeln!(std::io::stderr(), "\n==== SKIPPED {test}: {problem} ====\n");
    false
}

fn unsafe_geteuid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}
