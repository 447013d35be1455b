//! Operations on a running lab's control plane for tests of its failure modes: stopping
//! kube-apiserver (SIGKILL) and starting it again with the arguments it ran with; etcd's
//! current revision and a compaction (etcd's JSON gateway, inside the control netns); a
//! ServiceAccount's token in a kubeconfig; applying and deleting manifests as a user does.
//!
//! Stopping and starting record the new pid in the lab's state (under the lab's lock), so
//! [`crate::controlplane::wait_api_ready`] watches the right process and `down` needs nothing
//! special (it stops whatever runs in the lab's namespaces anyway).

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::PathBuf,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{
    controlplane::{self, ControlPlaneError, ControlPlaneState},
    kube::KubeError,
    netns::{is_alive, run_in_netns},
    pki::PkiError,
    state::{LabState, StateError, lock},
};

/// etcd's client URL inside the control netns (see [`controlplane::start`]).
const ETCD_CLIENT: (Ipv4Addr, u16) = (Ipv4Addr::LOCALHOST, 2379);
/// How long a killed API server gets to be gone.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// A control-plane operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CpOpsError {
    #[error("lab {lab:?} has no control plane")]
    NoControlPlane { lab: String },
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    ControlPlane(#[from] ControlPlaneError),
    #[error(transparent)]
    Kube(#[from] KubeError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("{component} of lab {lab:?} is not running")]
    NotRunning { lab: String, component: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("etcd {call}: {message}")]
    Etcd { call: String, message: String },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> CpOpsError {
    let context = context.into();
    move |source| CpOpsError::Io { context, source }
}

/// The lab's control plane as its state file records it now.
pub fn control_plane(lab: &str) -> Result<ControlPlaneState, CpOpsError> {
    LabState::load(lab)?
        .control_plane
        .ok_or_else(|| CpOpsError::NoControlPlane {
            lab: lab.to_owned(),
        })
}

/// How a kube-apiserver was started: its executable and arguments, read from
/// `/proc/<pid>/cmdline` before it was stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiServerCommand {
    pub exe: PathBuf,
    pub args: Vec<String>,
}

/// The command line of a running process.
pub fn command_line(pid: u32) -> Result<Vec<String>, CpOpsError> {
    let path = format!("/proc/{pid}/cmdline");
    let raw = std::fs::read(&path).map_err(io_err(format!("read {path}")))?;
    Ok(raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect())
}

/// SIGKILLs the lab's kube-apiserver (no graceful shutdown: its clients see their connections
/// drop), waits until it is gone and records that in the state. Returns how to start it again.
pub fn kill_apiserver(lab: &str) -> Result<ApiServerCommand, CpOpsError> {
    let _lock = lock(lab)?;
    let mut state = LabState::load(lab)?;
    let Some(cp) = state.control_plane.as_mut() else {
        return Err(CpOpsError::NoControlPlane {
            lab: lab.to_owned(),
        });
    };
    let not_running = || CpOpsError::NotRunning {
        lab: lab.to_owned(),
        component: "kube-apiserver".into(),
    };
    let pid = cp
        .apiserver_pid
        .filter(|pid| is_alive(*pid))
        .ok_or_else(not_running)?;
    let mut argv = command_line(pid)?;
    if argv.is_empty() {
        return Err(not_running());
    }
    let exe = PathBuf::from(argv.remove(0));
    let command = ApiServerCommand { exe, args: argv };
    let raw = libc::pid_t::try_from(pid).expect("pids fit pid_t");
    // SAFETY: kill(2) has no memory effects.
    unsafe { libc::kill(raw, libc::SIGKILL) };
    let deadline = Instant::now() + EXIT_TIMEOUT;
    loop {
        // The lab's components are children of the process that brought the lab up (a test):
        // reap it if it is ours, so no zombie is left; ECHILD otherwise.
        let mut status = 0;
        // SAFETY: waitpid writes only `status`.
        unsafe { libc::waitpid(raw, &mut status, libc::WNOHANG) };
        if !is_alive(pid) {
            break;
        }
        if Instant::now() > deadline {
            return Err(CpOpsError::Io {
                context: format!("kube-apiserver (pid {pid}) still alive after SIGKILL"),
                source: std::io::Error::from(std::io::ErrorKind::TimedOut),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cp.apiserver_pid = None;
    state.save()?;
    Ok(command)
}

/// Starts kube-apiserver again with `command` (from [`kill_apiserver`]), records its pid and
/// waits until it answers `/readyz`. Returns the control plane as now recorded.
pub fn start_apiserver(
    lab: &str,
    command: &ApiServerCommand,
) -> Result<ControlPlaneState, CpOpsError> {
    let cp = {
        let _lock = lock(lab)?;
        let mut state = LabState::load(lab)?;
        let Some(cp) = state.control_plane.as_mut() else {
            return Err(CpOpsError::NoControlPlane {
                lab: lab.to_owned(),
            });
        };
        let pid = controlplane::spawn_daemon(
            &cp.netns_path(),
            &command.exe,
            &command.args,
            &cp.log("kube-apiserver"),
            "kube-apiserver",
        )?;
        cp.apiserver_pid = Some(pid);
        let cp = cp.clone();
        state.save()?;
        cp
    };
    controlplane::wait_api_ready(&cp)?;
    Ok(cp)
}

/// [`kill_apiserver`], then [`start_apiserver`] with the same arguments.
pub fn restart_apiserver(lab: &str) -> Result<ControlPlaneState, CpOpsError> {
    let command = kill_apiserver(lab)?;
    start_apiserver(lab, &command)
}

/// POSTs a JSON body to etcd's gRPC gateway (`/v3/...`) from inside the control netns and
/// returns the JSON answer; an answer with `error` (or a status other than 200) is an error.
pub fn etcd_call(cp: &ControlPlaneState, path: &str, body: &Value) -> Result<Value, CpOpsError> {
    let body = body.to_string();
    let call = path.to_owned();
    let raw = run_in_netns(&cp.netns_path(), || {
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::from(ETCD_CLIENT), Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        // HTTP/1.0: the answer ends with the connection, never chunked.
        write!(
            s,
            "POST {path} HTTP/1.0\r\nHost: 127.0.0.1:2379\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
    .map_err(io_err(format!("etcd {call}")))?;
    let (head, text) = raw.split_once("\r\n\r\n").unwrap_or((raw.as_str(), ""));
    let status = head.split_whitespace().nth(1).unwrap_or_default();
    let value: Value = serde_json::from_str(text).map_err(|e| CpOpsError::Etcd {
        call: call.clone(),
        message: format!("status {status}, answer is not JSON ({e}): {text}"),
    })?;
    if status != "200" || value.get("error").is_some() {
        return Err(CpOpsError::Etcd {
            call,
            message: format!("status {status}: {value}"),
        });
    }
    Ok(value)
}

/// etcd's current revision (the header of any range request).
pub fn etcd_revision(cp: &ControlPlaneState) -> Result<i64, CpOpsError> {
    // Key "\0" (base64 "AA=="): the header carries the store's revision whatever the key.
    let answer = etcd_call(cp, "/v3/kv/range", &json!({ "key": "AA==", "limit": 1 }))?;
    let revision = &answer["header"]["revision"];
    revision
        .as_str()
        .and_then(|s| s.parse().ok())
        .or_else(|| revision.as_i64())
        .ok_or_else(|| CpOpsError::Etcd {
            call: "/v3/kv/range".into(),
            message: format!("no header.revision in {answer}"),
        })
}

/// Compacts etcd's history up to `revision` (physically: the old revisions are gone when this
/// returns). A watch that resumes from before it gets `410 Gone` from the API server.
pub fn etcd_compact(cp: &ControlPlaneState, revision: i64) -> Result<(), CpOpsError> {
    etcd_call(
        cp,
        "/v3/kv/compaction",
        &json!({ "revision": revision.to_string(), "physical": true }),
    )?;
    Ok(())
}

/// Creates a ServiceAccount (if missing), mints a token for it (`kubectl create token`) and
/// writes a kubeconfig with that token next to the lab's other kubeconfigs. The account gets
/// no RoleBinding here: what it may do is what the cluster already grants it.
pub fn service_account_kubeconfig(
    cp: &ControlPlaneState,
    namespace: &str,
    name: &str,
) -> Result<PathBuf, CpOpsError> {
    let kubectl = cp.kubectl().map_err(ControlPlaneError::from)?;
    kubectl.apply(&[json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": { "name": name, "namespace": namespace },
    })])?;
    Ok(controlplane::token_kubeconfig(cp, namespace, name, "1h")?)
}

/// `kubectl apply -f -` of YAML or JSON manifests, as a user applies them.
pub fn apply(cp: &ControlPlaneState, manifests: &str) -> Result<String, CpOpsError> {
    let kubectl = cp.kubectl().map_err(ControlPlaneError::from)?;
    Ok(kubectl.run(&["apply", "-f", "-"], Some(manifests))?)
}

/// Installs the ClusterNetworkPolicy CRD ([`crate::tools::CNP_CRD`], from the
/// network-policy-api module) with `kubectl apply`, and waits until the API server serves it
/// (`Established`).
pub fn install_cnp_crd(cp: &ControlPlaneState) -> Result<String, CpOpsError> {
    let crd = crate::tools::manifest(crate::tools::CNP_CRD).map_err(ControlPlaneError::from)?;
    let kubectl = cp.kubectl().map_err(ControlPlaneError::from)?;
    let mut out = kubectl.apply_file(&crd)?;
    out.push_str(&kubectl.run(
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/clusternetworkpolicies.policy.networking.k8s.io",
        ],
        None,
    )?);
    Ok(out)
}

/// `kubectl delete <kind> <name> --namespace <ns>` (waits for the object to be gone).
pub fn delete(
    cp: &ControlPlaneState,
    kind: &str,
    namespace: &str,
    name: &str,
) -> Result<String, CpOpsError> {
    let kubectl = cp.kubectl().map_err(ControlPlaneError::from)?;
    Ok(kubectl.run(
        &["delete", kind, name, &format!("--namespace={namespace}")],
        None,
    )?)
}
