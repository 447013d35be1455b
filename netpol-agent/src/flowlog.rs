//! Flow logs: verdict events from the ring buffer as JSON lines that name
//! both sides and the policy and rule that decided, written to a file
//! ([`RotatingFile`]: mode 0640, rotated by size) or stdout.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufWriter, Write},
    net::IpAddr,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use netpol_common::{
    DIR_EGRESS, DIR_INGRESS, REASON_POLICY_DENY, VerdictEvent, direction_name, protocol_name,
    reason_name, verdict_name,
};
use serde::Serialize;

use crate::{
    compiler::Compiled,
    model::{PodRef, PolicyRef},
};

/// What the flow log (and the API) needs to name things, kept up to date
/// from each change ([`Names::apply`]), never rebuilt from the whole
/// cluster. The run loop shares it behind a lock ([`SharedNames`]) that
/// readers hold briefly, and it never waits for it (see `agent`).
#[derive(Clone, Debug, Default)]
pub struct Names {
    /// The cluster state the compile was made from.
    pub cluster: crate::model::Cluster,
    /// Every live pod's IPs (peers can be on any node).
    pub pods_by_ip: BTreeMap<IpAddr, PodRef>,
    /// The compile the datapath is running.
    pub compiled: Compiled,
    /// Local endpoints by veth ifindex.
    pub endpoints: BTreeMap<u32, PodRef>,
}

/// [`Names`] as the run loop and the API share it.
pub type SharedNames = std::sync::Arc<std::sync::RwLock<Names>>;

impl Names {
    /// Takes in one change of the cluster: the model and the pods'
    /// addresses (a pod's old addresses go, its new ones come).
    pub fn apply(&mut self, change: &crate::source::SourceChange) {
        use crate::{compiler::Change, source::SourceChange};
        let pod = match change {
            SourceChange::Compiler(Change::UpsertPod(p)) => Some(p.pod_ref()),
            SourceChange::Compiler(Change::RemovePod(r)) => Some(r.clone()),
            _ => None,
        };
        if let Some(r) = &pod
            && let Some(old) = self.cluster.pods.get(r)
        {
            for ip in &old.ips {
                if self.pods_by_ip.get(ip) == Some(r) {
                    self.pods_by_ip.remove(ip);
                }
            }
        }
        change.apply_to(&mut self.cluster);
        if let SourceChange::Compiler(Change::UpsertPod(p)) = change
            && p.is_live()
        {
            for ip in &p.ips {
                self.pods_by_ip.insert(*ip, p.pod_ref());
            }
        }
    }

    /// The whole cluster replaced (a resync): O(cluster).
    pub fn replace_cluster(&mut self, cluster: crate::model::Cluster) {
        self.pods_by_ip = cluster
            .pods
            .values()
            .filter(|p| p.is_live())
            .flat_map(|p| p.ips.iter().map(move |ip| (*ip, p.pod_ref())))
            .collect();
        self.cluster = cluster;
    }
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Side {
    pub ip: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct FlowLog {
    pub time: String,
    pub verdict: &'static str,
    /// From the local pod's point of view.
    pub direction: &'static str,
    pub reason: &'static str,
    pub src: Side,
    pub dst: Side,
    pub protocol: &'static str,
    pub sport: u16,
    pub dport: u16,
    /// `namespace/name` of the deciding NetworkPolicy, the name of the
    /// deciding ClusterNetworkPolicy (with `tier`), or `default-deny`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// `ingress[i]` / `egress[i]` of the deciding policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// A ClusterNetworkPolicy decided: its tier (`Admin`, `Baseline`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// ... the rule's `name` (when it has one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule_name: Option<String>,
    /// ... and its action (`Accept`, `Deny`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// For `default-deny`: the policies that isolate the pod.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub isolated_by: Vec<String>,
    pub ifindex: u32,
    /// `namespace/name` of the local pod behind the veth: who really sent (or
    /// was sent) the packet, whatever addresses it carries (a spoofed source
    /// names the victim in `src`, the attacker here).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

fn side(names: &Names, ip: IpAddr) -> Side {
    let pod = names.pods_by_ip.get(&ip);
    Side {
        ip: ip.to_string(),
        namespace: pod.map(|p| p.namespace.clone()),
        pod: pod.map(|p| p.name.clone()),
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Convert a kernel timestamp (CLOCK_MONOTONIC ns) to wall-clock time.
pub fn wall_time(mono_ns: u64) -> SystemTime {
    let age = Duration::from_nanos(monotonic_ns().saturating_sub(mono_ns));
    SystemTime::now() - age
}

/// Build the flow log line of an event.
pub fn describe(ev: &VerdictEvent, names: &Names, time: SystemTime) -> FlowLog {
    let src = ev.src_ip();
    let dst = ev.dst_ip();
    let mut policy = None;
    let mut rule = None;
    let (mut tier, mut rule_name, mut action) = (None, None, None);
    let mut isolated_by = Vec::new();
    if let Some(r) = names
        .compiled
        .rules
        .get(&ev.rule_id)
        .filter(|_| ev.rule_id != 0)
    {
        policy = Some(match &r.cluster {
            Some(_) => r.policy.clone(),
            None => format!("{}/{}", r.namespace, r.policy),
        });
        if let Some(c) = &r.cluster {
            tier = Some(c.tier.to_string());
            rule_name = (!c.name.is_empty()).then(|| c.name.clone());
            action = Some(c.action.to_string());
        }
        rule = Some(format!(
            "{}[{}]",
            if r.direction == DIR_INGRESS {
                "ingress"
            } else {
                "egress"
            },
            r.index
        ));
    } else if matches!(
        ev.reason,
        REASON_POLICY_DENY | netpol_common::REASON_AUDIT | netpol_common::REASON_XDP_DENY
    ) {
        // The uplink's XDP drop is the same policy deny, taken earlier.
        policy = Some("default-deny".to_string());
        // The event carries the set id as the datapath stores it, with its
        // epoch bit; the compiler's id is without.
        let set_id = netpol_common::epoch_policy_id(ev.policy_id, 0);
        if let Some(set) = names.compiled.policy_sets.get(&set_id) {
            let list: &[PolicyRef] = if ev.direction == DIR_EGRESS {
                &set.egress
            } else {
                &set.ingress
            };
            isolated_by = list.iter().map(|p| p.to_string()).collect();
        }
    }
    FlowLog {
        time: humantime::format_rfc3339_millis(time).to_string(),
        verdict: verdict_name(ev.verdict),
        direction: direction_name(ev.direction),
        reason: reason_name(ev.reason),
        src: side(names, src),
        dst: side(names, dst),
        protocol: protocol_name(ev.protocol),
        sport: ev.sport,
        dport: ev.dport,
        policy,
        rule,
        tier,
        rule_name,
        action,
        isolated_by,
        ifindex: ev.ifindex,
        endpoint: names.endpoints.get(&ev.ifindex).map(ToString::to_string),
    }
}

/// When the flow log file is rotated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rotation {
    /// Rotate before a line would take the file past this many bytes (0:
    /// never rotate).
    pub max_bytes: u64,
    /// Rotated files kept: `<file>.1` (the newest) .. `<file>.<keep>`; 0
    /// keeps none (the file starts over).
    pub keep: u32,
}

impl Default for Rotation {
    fn default() -> Self {
        Self {
            max_bytes: 100 * 1024 * 1024,
            keep: 5,
        }
    }
}

/// The flow log file: created with mode 0640 (flow logs say who talks to
/// whom; an existing file is brought to 0640 too), appended to, and rotated
/// by size at line boundaries, so a line is never split across files.
#[derive(Debug)]
pub struct RotatingFile {
    path: PathBuf,
    rotation: Rotation,
    file: BufWriter<File>,
    /// Bytes in the current file (what was there plus what was written).
    size: u64,
    /// The last byte written ended a line: a rotation may happen here.
    at_line_start: bool,
}

pub const FLOW_LOG_MODE: u32 = 0o640;

fn open_log(path: &Path) -> std::io::Result<(File, u64)> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(FLOW_LOG_MODE)
        .open(path)?;
    // `mode` applies only to a file it creates (and under the umask).
    file.set_permissions(std::fs::Permissions::from_mode(FLOW_LOG_MODE))?;
    let size = file.metadata()?.len();
    Ok((file, size))
}

impl RotatingFile {
    pub fn open(path: impl Into<PathBuf>, rotation: Rotation) -> std::io::Result<Self> {
        let path = path.into();
        let (file, size) = open_log(&path)?;
        Ok(Self {
            path,
            rotation,
            file: BufWriter::new(file),
            size,
            at_line_start: true,
        })
    }

    /// `<file>.<n>`
    pub fn rotated_path(path: &Path, n: u32) -> PathBuf {
        let mut p = path.as_os_str().to_owned();
        p.push(format!(".{n}"));
        PathBuf::from(p)
    }

    /// Shift `<file>.i` to `<file>.i+1` (dropping the oldest), move the file
    /// to `<file>.1` and start a new one.
    fn rotate(&mut self) -> std::io::Result<()> {
        self.file.flush()?;
        let keep = self.rotation.keep;
        if keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            let _ = std::fs::remove_file(Self::rotated_path(&self.path, keep));
            for i in (1..keep).rev() {
                let from = Self::rotated_path(&self.path, i);
                if from.exists() {
                    std::fs::rename(&from, Self::rotated_path(&self.path, i + 1))?;
                }
            }
            std::fs::rename(&self.path, Self::rotated_path(&self.path, 1))?;
        }
        let (file, size) = open_log(&self.path)?;
        self.file = BufWriter::new(file);
        self.size = size;
        Ok(())
    }
}

impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.rotation.max_bytes > 0
            && self.at_line_start
            && self.size > 0
            && self.size + buf.len() as u64 > self.rotation.max_bytes
            && let Err(e) = self.rotate()
        {
            // Keep logging into the file we have rather than lose lines.
            tracing::warn!(file = %self.path.display(), "rotating the flow log: {e}");
            self.size = 0;
        }
        let n = self.file.write(buf)?;
        self.size += n as u64;
        if n > 0 {
            self.at_line_start = buf[n - 1] == b'\n';
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use netpol_common::{
        FAMILY_V4, PROTO_TCP, REASON_POLICY_ALLOW, VERDICT_ALLOW, VERDICT_DENY, ip_bytes,
    };

    use super::*;
    use crate::compiler::{PolicySetInfo, RuleInfo};

    fn names() -> Names {
        let mut n = Names::default();
        n.pods_by_ip
            .insert("10.0.1.2".parse().unwrap(), PodRef::new("x", "a"));
        n.pods_by_ip
            .insert("10.0.2.2".parse().unwrap(), PodRef::new("y", "b"));
        n.compiled.rules.insert(
            7,
            RuleInfo {
                namespace: "y".into(),
                policy: "allow-x".into(),
                direction: DIR_INGRESS,
                index: 1,
                cluster: None,
            },
        );
        n.compiled.policy_sets.insert(
            3,
            PolicySetInfo {
                ingress: vec![PolicyRef::new("y", "deny-all")],
                egress: vec![],
            },
        );
        n
    }

    fn event(verdict: u8, reason: u8, rule_id: u32) -> VerdictEvent {
        VerdictEvent {
            rule_id,
            policy_id: 3,
            sport: 40000,
            dport: 80,
            protocol: PROTO_TCP,
            family: FAMILY_V4,
            direction: DIR_INGRESS,
            verdict,
            reason,
            saddr: ip_bytes("10.0.1.2".parse().unwrap()).1,
            daddr: ip_bytes("10.0.2.2".parse().unwrap()).1,
            ..Default::default()
        }
    }

    #[test]
    fn allow_names_the_policy_and_rule() {
        let l = describe(
            &event(VERDICT_ALLOW, REASON_POLICY_ALLOW, 7),
            &names(),
            SystemTime::UNIX_EPOCH,
        );
        assert_eq!(l.verdict, "allow");
        assert_eq!(l.policy.as_deref(), Some("y/allow-x"));
        assert_eq!(l.rule.as_deref(), Some("ingress[1]"));
        assert_eq!(l.src.pod.as_deref(), Some("a"));
        assert_eq!(l.dst.namespace.as_deref(), Some("y"));
        assert_eq!(l.time, "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn a_cluster_network_policy_deny_names_tier_policy_rule_and_action() {
        use crate::{
            compiler::ClusterRuleInfo,
            model::{Action, Tier},
        };
        let mut n = names();
        n.compiled.rules.insert(
            9,
            RuleInfo {
                namespace: String::new(),
                policy: "deny-x-to-y".into(),
                direction: DIR_EGRESS,
                index: 0,
                cluster: Some(ClusterRuleInfo {
                    tier: Tier::Admin,
                    name: "no-y".into(),
                    action: Action::Deny,
                }),
            },
        );
        let l = describe(
            &event(VERDICT_DENY, REASON_POLICY_DENY, 9),
            &n,
            SystemTime::UNIX_EPOCH,
        );
        assert_eq!(l.policy.as_deref(), Some("deny-x-to-y"));
        assert_eq!(l.rule.as_deref(), Some("egress[0]"));
        assert_eq!(l.tier.as_deref(), Some("Admin"));
        assert_eq!(l.rule_name.as_deref(), Some("no-y"));
        assert_eq!(l.action.as_deref(), Some("Deny"));
        assert!(l.isolated_by.is_empty(), "a named rule, not default-deny");
        let json = serde_json::to_string(&l).unwrap();
        assert!(json.contains("\"tier\":\"Admin\""), "{json}");
    }

    #[test]
    fn deny_names_default_deny_and_the_isolating_policies() {
        let l = describe(
            &event(VERDICT_DENY, REASON_POLICY_DENY, 0),
            &names(),
            SystemTime::UNIX_EPOCH,
        );
        assert_eq!(l.verdict, "deny");
        assert_eq!(l.policy.as_deref(), Some("default-deny"));
        assert_eq!(l.isolated_by, vec!["y/deny-all".to_string()]);
        let json = serde_json::to_string(&l).unwrap();
        assert!(json.contains("\"reason\":\"policy_deny\""), "{json}");
    }

    /// A new flow dropped on the uplink by XDP names the policies as the veth's drop would.
    #[test]
    fn an_xdp_drop_names_default_deny_and_the_isolating_policies() {
        let l = describe(
            &event(VERDICT_DENY, netpol_common::REASON_XDP_DENY, 0),
            &names(),
            SystemTime::UNIX_EPOCH,
        );
        assert_eq!(l.policy.as_deref(), Some("default-deny"));
        assert_eq!(l.isolated_by, vec!["y/deny-all".to_string()]);
        assert_eq!(l.reason, "xdp_deny");
    }

    #[test]
    fn a_deny_in_epoch_1_names_the_isolating_policies_too() {
        let mut ev = event(VERDICT_DENY, REASON_POLICY_DENY, 0);
        ev.policy_id = netpol_common::epoch_policy_id(3, 1);
        let l = describe(&ev, &names(), SystemTime::UNIX_EPOCH);
        assert_eq!(l.isolated_by, vec!["y/deny-all".to_string()]);
    }

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("netpol-flowlog-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn flow_log_is_created_0640_and_an_existing_one_is_tightened() {
        let d = temp_dir("mode");
        let path = d.join("flows.jsonl");
        drop(RotatingFile::open(&path, Rotation::default()).unwrap());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640, "new flow log mode {mode:o}");

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        drop(RotatingFile::open(&path, Rotation::default()).unwrap());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640, "reopened flow log mode {mode:o}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn flow_log_rotates_at_the_size_keeping_whole_lines_and_n_files() {
        let d = temp_dir("rotate");
        let path = d.join("flows.jsonl");
        let rotation = Rotation {
            max_bytes: 100,
            keep: 2,
        };
        let mut f = RotatingFile::open(&path, rotation).unwrap();
        // 30-byte lines written as writeln! does (text, then newline): three
        // fit in 100 bytes, the fourth starts a new file.
        let line = "x".repeat(29);
        for i in 0..3 {
            writeln!(f, "{line}").unwrap();
            f.flush().unwrap();
            assert!(
                !RotatingFile::rotated_path(&path, 1).exists(),
                "rotated after line {i}"
            );
        }
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 90);
        writeln!(f, "{line}").unwrap();
        f.flush().unwrap();
        let first = std::fs::read_to_string(RotatingFile::rotated_path(&path, 1)).unwrap();
        assert_eq!(first.lines().count(), 3, "{first}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), format!("{line}\n"));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640, "a rotated-in file is 0640 too");

        // Two more rotations: only `.1` and `.2` are kept.
        for _ in 0..6 {
            writeln!(f, "{line}").unwrap();
        }
        f.flush().unwrap();
        assert!(RotatingFile::rotated_path(&path, 2).exists());
        assert!(!RotatingFile::rotated_path(&path, 3).exists());
        for p in [
            path.clone(),
            RotatingFile::rotated_path(&path, 1),
            RotatingFile::rotated_path(&path, 2),
        ] {
            let text = std::fs::read_to_string(&p).unwrap();
            assert!(
                std::fs::metadata(&p).unwrap().len() <= 100,
                "{}",
                p.display()
            );
            assert!(
                text.lines().all(|l| l == line),
                "{}: a line was split: {text:?}",
                p.display()
            );
        }
        std::fs::remove_dir_all(&d).unwrap();
    }
}
