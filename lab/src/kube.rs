//! Talking to a lab's API server with the real `kubectl`, run inside the control plane's network
//! namespace (the API server's address is only reachable from lab namespaces).

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
};

use serde_json::{Value, json};

use crate::netns::netns_command;

/// A `kubectl` call failed.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("running kubectl {args}: {source}")]
    Spawn {
        args: String,
        #[source]
        source: std::io::Error,
    },
    #[error("kubectl {args} failed: {stderr}")]
    Failed { args: String, stderr: String },
    #[error("kubectl {args} printed something that is not JSON: {source}")]
    Json {
        args: String,
        #[source]
        source: serde_json::Error,
    },
}

/// `kubectl` with a kubeconfig, in a network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kubectl {
    pub exe: PathBuf,
    pub kubeconfig: PathBuf,
    pub netns: PathBuf,
}

impl Kubectl {
    /// A `kubectl --kubeconfig <kc>` command in the netns; add arguments and run it.
    pub fn command(&self) -> Command {
        let mut command = netns_command(&self.netns, &self.exe);
        command.arg("--kubeconfig").arg(&self.kubeconfig);
        command
    }

    /// Runs kubectl with `args` (and `stdin`), returning stdout; a non-zero exit is an error
    /// carrying stderr.
    pub fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<String, KubeError> {
        let output = self.output(args, stdin)?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    fn output(&self, args: &[&str], stdin: Option<&str>) -> Result<Output, KubeError> {
        let child = self.spawn(args, stdin)?;
        wait(args, child)
    }

    /// Starts kubectl without waiting (see [`wait_all`]), to run several calls at once.
    pub fn spawn(&self, args: &[&str], stdin: Option<&str>) -> Result<Child, KubeError> {
        let joined = args.join(" ");
        let mut command = self.command();
        command
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().map_err(|source| KubeError::Spawn {
            args: joined.clone(),
            source,
        })?;
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().expect("stdin is piped");
            pipe.write_all(input.as_bytes())
                .map_err(|source| KubeError::Spawn {
                    args: joined,
                    source,
                })?;
        }
        Ok(child)
    }

    /// Runs kubectl and parses its stdout as JSON (for `get -o json`).
    pub fn json(&self, args: &[&str]) -> Result<Value, KubeError> {
        let out = self.run(args, None)?;
        serde_json::from_str(&out).map_err(|source| KubeError::Json {
            args: args.join(" "),
            source,
        })
    }

    /// `kubectl apply --server-side -f -` of several objects at once (a v1 List).
    pub fn apply(&self, objects: &[Value]) -> Result<String, KubeError> {
        if objects.is_empty() {
            return Ok(String::new());
        }
        let list = json!({ "apiVersion": "v1", "kind": "List", "items": objects });
        self.run(
            &[
                "apply",
                "--server-side",
                "--force-conflicts",
                "--field-manager=netpol-lab",
                "-f",
                "-",
            ],
            Some(&list.to_string()),
        )
    }

    /// `kubectl apply -f <file>` (a user's manifests, as users apply them).
    pub fn apply_file(&self, file: &Path) -> Result<String, KubeError> {
        self.run(&["apply", "-f", &file.to_string_lossy()], None)
    }
}

/// Waits for a kubectl started with [`Kubectl::spawn`].
pub fn wait(args: &[&str], child: Child) -> Result<Output, KubeError> {
    let joined = args.join(" ");
    let output = child
        .wait_with_output()
        .map_err(|source| KubeError::Spawn {
            args: joined.clone(),
            source,
        })?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(KubeError::Failed {
            args: joined,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// Runs several kubectl calls at once and waits for all of them; the first error wins.
pub fn run_all(
    kubectl: &Kubectl,
    calls: &[(Vec<String>, Option<String>)],
) -> Result<(), KubeError> {
    let mut running = Vec::new();
    for (args, stdin) in calls {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        running.push((refs.clone(), kubectl.spawn(&refs, stdin.as_deref())?));
    }
    let mut first = Ok(());
    for (args, child) in running {
        if let Err(e) = wait(&args, child)
            && first.is_ok()
        {
            first = Err(e);
        }
    }
    first
}
