//! The CNI protocol (spec 1.1, read back to 0.3.0): the `CNI_*` environment,
//! the network configuration on stdin, and the results and errors on stdout.
//! Pure: nothing here touches the kernel.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The versions whose configuration and results this plugin reads. It only
/// reads `prevResult.interfaces`, which every one of them has, and hands the
/// previous result back untouched.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The newest supported version (answers to VERSION without a config).
pub const LATEST_VERSION: &str = "1.1.0";

/// Well-known error codes (CNI spec, "Error" section); 100 and up are ours.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    /// netpol's programs could not be put on (or taken off) the pod's veth.
    pub const ATTACH: u32 = 100;
    /// No host-side veth for the pod could be found.
    pub const NO_HOST_VETH: u32 = 101;
    /// CHECK: netpol is installed but the pod's veth does not carry its programs.
    pub const NOT_ATTACHED: u32 = 102;
}

/// A CNI error result: printed on stdout, with a non-zero exit code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}: {details} (code {code})")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl ToString) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.to_string(),
        }
    }

    /// The error result as JSON.
    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Out<'a> {
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        serde_json::to_string(&Out {
            cni_version,
            code: self.code,
            msg: &self.msg,
            details: &self.details,
        })
        .expect("plain strings serialize")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    /// CNI 1.1: is the plugin ready for ADDs?
    Status,
    /// CNI 1.1: forget attachments the runtime no longer has.
    Gc,
}

impl Command {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
            Self::Version => "VERSION",
            Self::Status => "STATUS",
            Self::Gc => "GC",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "VERSION" => Self::Version,
            "STATUS" => Self::Status,
            "GC" => Self::Gc,
            _ => return None,
        })
    }
}

/// The `CNI_*` variables a command needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub command: Command,
    /// `CNI_CONTAINERID` (ADD, DEL, CHECK).
    pub container_id: String,
    /// `CNI_NETNS`: required for ADD and CHECK, optional for DEL (the
    /// sandbox may be gone already).
    pub netns: Option<PathBuf>,
    /// `CNI_IFNAME`: the pod-side interface (ADD, DEL, CHECK).
    pub ifname: String,
}

impl Env {
    /// Read the variables through `var` (`std::env::var` in the binary).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Env, CniError> {
        let missing = |name: &str| {
            CniError::new(
                code::INVALID_ENV,
                format!("{name} is not set"),
                "the runtime must set it for this command",
            )
        };
        let raw = var("CNI_COMMAND").ok_or_else(|| missing("CNI_COMMAND"))?;
        let command = Command::parse(&raw).ok_or_else(|| {
            CniError::new(
                code::INVALID_ENV,
                format!("unknown CNI_COMMAND {raw:?}"),
                "expected ADD, DEL, CHECK, VERSION, STATUS or GC",
            )
        })?;
        let nonempty = |name: &str| var(name).filter(|v| !v.is_empty());
        let per_attachment = matches!(command, Command::Add | Command::Del | Command::Check);
        let (mut container_id, mut ifname, mut netns) = (String::new(), String::new(), None);
        if per_attachment {
            container_id = nonempty("CNI_CONTAINERID").ok_or_else(|| missing("CNI_CONTAINERID"))?;
            ifname = nonempty("CNI_IFNAME").ok_or_else(|| missing("CNI_IFNAME"))?;
            netns = nonempty("CNI_NETNS").map(PathBuf::from);
            if netns.is_none() && command != Command::Del {
                return Err(missing("CNI_NETNS"));
            }
        }
        Ok(Env {
            command,
            container_id,
            netns,
            ifname,
        })
    }
}

/// One attachment the runtime still has (GC's `cni.dev/valid-attachments`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ValidAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The network configuration the runtime passes on stdin (one plugin's
/// entry of the conflist, with `cniVersion`, `name` and, when chained,
/// `prevResult` filled in). Fields this plugin does not know are ignored.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    /// The network's name (the conflist's), for the log.
    #[serde(default)]
    pub name: String,
    /// Where the agent pins its maps and links (its `--bpffs-root`).
    #[serde(default = "default_bpffs_root")]
    pub bpffs_root: PathBuf,
    /// Where ADD records which host veth it attached to, for a DEL that
    /// comes after the veth or the sandbox is gone.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Append log lines here instead of writing them to stderr.
    #[serde(default)]
    pub log_file: Option<PathBuf>,
    /// The previous plugin's result, exactly as the runtime sent it.
    #[serde(default)]
    pub prev_result: Option<Box<RawValue>>,
    #[serde(default, rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<ValidAttachment>>,
}

fn default_bpffs_root() -> PathBuf {
    PathBuf::from(netpol_agent::pins::DEFAULT_ROOT)
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/run/netpol-cni")
}

impl NetConf {
    pub fn parse(stdin: &str) -> Result<NetConf, CniError> {
        let conf: NetConf = serde_json::from_str(stdin).map_err(|e| {
            CniError::new(code::DECODE, "cannot decode the network configuration", e)
        })?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("cniVersion {:?} is not supported", conf.cni_version),
                format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
            ));
        }
        Ok(conf)
    }

    /// The previous result, for ADD and CHECK: netpol-cni only ever runs
    /// chained after the plugin that creates the interfaces.
    pub fn require_prev_result(&self) -> Result<(&RawValue, PrevResult), CniError> {
        let raw = self.prev_result.as_deref().ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                "no prevResult",
                "netpol-cni is a chained plugin: list it after the plugin that creates the pod's \
                 interfaces (bridge, ptp, ...) in a conflist",
            )
        })?;
        Ok((raw, PrevResult::parse(raw)?))
    }

    /// The previous result if there is one and it parses (DEL: best effort).
    pub fn prev_result(&self) -> Option<PrevResult> {
        PrevResult::parse(self.prev_result.as_deref()?).ok()
    }
}

/// The part of a result this plugin reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct PrevResult {
    #[serde(default)]
    pub interfaces: Vec<Interface>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default)]
    pub mac: String,
    /// The netns path for interfaces inside the sandbox; absent or empty for
    /// host interfaces (a bridge, a host-side veth).
    #[serde(default)]
    pub sandbox: Option<String>,
}

impl PrevResult {
    pub fn parse(raw: &RawValue) -> Result<PrevResult, CniError> {
        serde_json::from_str(raw.get())
            .map_err(|e| CniError::new(code::DECODE, "cannot decode prevResult", e))
    }

    /// Names of the host-side interfaces (no sandbox): the pod's host veth
    /// among them, and for bridge plugins the bridge itself.
    pub fn host_interfaces(&self) -> Vec<&str> {
        self.interfaces
            .iter()
            .filter(|i| i.sandbox.as_deref().is_none_or(str::is_empty))
            .map(|i| i.name.as_str())
            .collect()
    }
}

/// The answer to VERSION.
pub fn version_result(cni_version: &str) -> String {
    serde_json::json!({
        "cniVersion": cni_version,
        "supportedVersions": SUPPORTED_VERSIONS,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// What the bridge plugin returns for a pod (CNI 1.0.0).
    const BRIDGE_RESULT: &str = r#"{
      "cniVersion": "1.0.0",
      "interfaces": [
        {"name": "cni0", "mac": "0a:58:0a:f4:02:01"},
        {"name": "veth1234abcd", "mac": "9e:9c:0c:a2:5b:2e"},
        {"name": "eth0", "mac": "0a:58:0a:f4:02:05", "sandbox": "/var/run/netns/cni-1111"}
      ],
      "ips": [{"address": "10.244.2.5/24", "gateway": "10.244.2.1", "interface": 2}],
      "routes": [{"dst": "0.0.0.0/0"}],
      "dns": {}
    }"#;

    fn conf(extra: &str) -> String {
        format!(
            r#"{{"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "netpol-cni"{extra}}}"#
        )
    }

    fn env(vars: &[(&str, &str)]) -> Result<Env, CniError> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Env::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn a_chained_add_config_parses_with_defaults() {
        let c = NetConf::parse(&conf(&format!(r#", "prevResult": {BRIDGE_RESULT}"#))).unwrap();
        assert_eq!(c.name, "k8s-pod-network");
        assert_eq!(c.bpffs_root, PathBuf::from("/sys/fs/bpf/netpol"));
        assert_eq!(c.state_dir, PathBuf::from("/run/netpol-cni"));
        assert_eq!(c.log_file, None);
        let (_, prev) = c.require_prev_result().unwrap();
        assert_eq!(prev.host_interfaces(), ["cni0", "veth1234abcd"]);
    }

    #[test]
    fn plugin_fields_are_read_and_unknown_fields_ignored() {
        let c = NetConf::parse(&conf(
            r#", "bpffsRoot": "/sys/fs/bpf/x", "stateDir": "/tmp/s", "logFile": "/tmp/l",
               "runtimeConfig": {"portMappings": []}, "args": {"cni": {}}"#,
        ))
        .unwrap();
        assert_eq!(c.bpffs_root, PathBuf::from("/sys/fs/bpf/x"));
        assert_eq!(c.state_dir, PathBuf::from("/tmp/s"));
        assert_eq!(c.log_file, Some(PathBuf::from("/tmp/l")));
        assert!(c.prev_result.is_none());
    }

    /// The runtime gets back exactly what the previous plugin said: same
    /// bytes, key order and whitespace included.
    #[test]
    fn prev_result_passes_through_byte_for_byte() {
        let c = NetConf::parse(&conf(&format!(r#", "prevResult": {BRIDGE_RESULT}"#))).unwrap();
        let (raw, _) = c.require_prev_result().unwrap();
        assert_eq!(raw.get(), BRIDGE_RESULT);
    }

    #[test]
    fn add_without_prev_result_is_a_config_error() {
        let c = NetConf::parse(&conf("")).unwrap();
        let e = c.require_prev_result().unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG);
        let c = NetConf::parse(&conf(r#", "prevResult": null"#)).unwrap();
        assert_eq!(
            c.require_prev_result().unwrap_err().code,
            code::INVALID_CONFIG
        );
    }

    #[test]
    fn versions_and_decoding_errors_have_their_codes() {
        let e = NetConf::parse(r#"{"cniVersion": "2.0.0", "name": "n"}"#).unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        let e = NetConf::parse("{not json").unwrap_err();
        assert_eq!(e.code, code::DECODE);
        let e = NetConf::parse(&conf(r#", "prevResult": {"interfaces": 3}"#))
            .unwrap()
            .require_prev_result()
            .unwrap_err();
        assert_eq!(e.code, code::DECODE);
        for v in SUPPORTED_VERSIONS {
            NetConf::parse(&format!(r#"{{"cniVersion": "{v}", "name": "n"}}"#)).unwrap();
        }
    }

    #[test]
    fn sandbox_empty_string_counts_as_host_side() {
        let raw = RawValue::from_string(
            r#"{"interfaces": [{"name": "cali1", "sandbox": ""}, {"name": "eth0", "sandbox": "/proc/1/ns/net"}]}"#
                .into(),
        )
        .unwrap();
        assert_eq!(
            PrevResult::parse(&raw).unwrap().host_interfaces(),
            ["cali1"]
        );
    }

    #[test]
    fn gc_reads_valid_attachments() {
        let c = NetConf::parse(&conf(
            r#", "cni.dev/valid-attachments": [{"containerID": "abc", "ifname": "eth0"}]"#,
        ))
        .unwrap();
        assert_eq!(
            c.valid_attachments.unwrap(),
            [ValidAttachment {
                container_id: "abc".into(),
                ifname: "eth0".into()
            }]
        );
    }

    #[test]
    fn environment_per_command() {
        let add = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/run/netns/p"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
        ])
        .unwrap();
        assert_eq!(add.command, Command::Add);
        assert_eq!(add.netns, Some(PathBuf::from("/run/netns/p")));
        // DEL may come after the sandbox is gone.
        let del = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
        ])
        .unwrap();
        assert_eq!(del.netns, None);
        let e = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
        ])
        .unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
        assert!(e.msg.contains("CNI_NETNS"), "{e}");
        assert_eq!(
            env(&[("CNI_COMMAND", "ADD")]).unwrap_err().code,
            code::INVALID_ENV
        );
        assert_eq!(
            env(&[("CNI_COMMAND", "FROB")]).unwrap_err().code,
            code::INVALID_ENV
        );
        assert_eq!(env(&[]).unwrap_err().code, code::INVALID_ENV);
        assert_eq!(
            env(&[("CNI_COMMAND", "VERSION")]).unwrap().command,
            Command::Version
        );
    }

    #[test]
    fn error_and_version_results_are_cni_json() {
        let e = CniError::new(code::ATTACH, "attaching", "EPERM");
        let v: serde_json::Value = serde_json::from_str(&e.to_json("1.0.0")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"cniVersion": "1.0.0", "code": 100, "msg": "attaching", "details": "EPERM"})
        );
        let v: serde_json::Value = serde_json::from_str(&version_result("1.1.0")).unwrap();
        assert_eq!(v["cniVersion"], "1.1.0");
        assert!(
            v["supportedVersions"]
                .as_array()
                .unwrap()
                .contains(&"1.0.0".into())
        );
    }
}
