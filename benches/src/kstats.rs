//! The kernel's own statistics of each eBPF program: `run_time_ns` and
//! `run_cnt` (`bpftool prog show` prints them as `run_time_ns` and
//! `run_cnt`), counted while `kernel.bpf_stats_enabled` is on. Their
//! quotient is what one run of the program costs on the path it is attached
//! to, timed by the kernel around the program alone; `BPF_PROG_TEST_RUN`'s
//! figure also carries the test harness.
//!
//! Counting costs two clock reads per run for every program on the machine,
//! so the benchmarks turn it on only while they measure ([`enable`]), and
//! the switch goes back when the guard is dropped.

use std::{io, os::fd::OwnedFd, path::Path};

use anyhow::{Context as _, Result};
use aya::programs::{ProgramInfo, SchedClassifier};
use serde::Serialize;

use crate::floor::Hook;

const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Statistics are on while this lives.
#[derive(Debug)]
pub struct StatsEnabled {
    how: How,
}

#[derive(Debug)]
enum How {
    /// `BPF_ENABLE_STATS`: the same switch as the sysctl, held through a file
    /// descriptor, so the kernel turns it back off when we exit, even if we
    /// are killed, and it counts alongside other users of the switch.
    Fd { _fd: OwnedFd },
    /// Kernels without `BPF_ENABLE_STATS` (before 5.8): the sysctl, written
    /// back to its previous value on drop.
    Sysctl { previous: String },
}

/// Turns `kernel.bpf_stats_enabled` on until the guard is dropped.
pub fn enable() -> Result<StatsEnabled> {
    match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
        Ok(fd) => Ok(StatsEnabled {
            how: How::Fd { _fd: fd },
        }),
        Err(_) => {
            let previous = std::fs::read_to_string(SYSCTL)
                .with_context(|| format!("reading {SYSCTL}"))?
                .trim()
                .to_string();
            std::fs::write(SYSCTL, "1").with_context(|| format!("writing 1 to {SYSCTL}"))?;
            Ok(StatsEnabled {
                how: How::Sysctl { previous },
            })
        }
    }
}

impl StatsEnabled {
    /// How statistics were turned on, for the report.
    pub fn describe(&self) -> &'static str {
        match self.how {
            How::Fd { .. } => {
                "BPF_ENABLE_STATS (kernel.bpf_stats_enabled while the benchmark runs)"
            }
            How::Sysctl { .. } => "sysctl kernel.bpf_stats_enabled=1 (restored afterwards)",
        }
    }
}

impl Drop for StatsEnabled {
    fn drop(&mut self) {
        if let How::Sysctl { previous } = &self.how {
            let _ = std::fs::write(SYSCTL, previous);
        }
    }
}

/// A program's accumulated run time and run count, or the difference of
/// two readings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

impl Counters {
    pub fn of(info: &ProgramInfo) -> Counters {
        Counters {
            run_time_ns: info.run_time().as_nanos() as u64,
            run_cnt: info.run_count(),
        }
    }

    /// What happened between `before` and `self`.
    pub fn since(self, before: Counters) -> Counters {
        Counters {
            run_time_ns: self.run_time_ns.saturating_sub(before.run_time_ns),
            run_cnt: self.run_cnt.saturating_sub(before.run_cnt),
        }
    }

    /// `run_time_ns / run_cnt`, or NaN without runs.
    pub fn ns_per_run(self) -> f64 {
        if self.run_cnt == 0 {
            f64::NAN
        } else {
            self.run_time_ns as f64 / self.run_cnt as f64
        }
    }
}

impl std::ops::Add for Counters {
    type Output = Counters;

    fn add(self, o: Counters) -> Counters {
        Counters {
            run_time_ns: self.run_time_ns + o.run_time_ns,
            run_cnt: self.run_cnt + o.run_cnt,
        }
    }
}

/// One program on a hook.
#[derive(Debug, Clone, Serialize)]
pub struct HookProgram {
    /// From the program's name (`*_from_pod`, `*_to_pod`, `*_post_nat`),
    /// else from the TCX direction (ingress: from-pod, egress: to-pod).
    pub hook: Hook,
    pub ifname: String,
    pub egress: bool,
    pub id: u32,
    pub name: String,
    pub counters: Counters,
}

/// The programs on the TCX hooks (ingress and egress) of every interface
/// in the network namespace at `netns` (`BPF_PROG_QUERY`, then each
/// program's info by id).
pub fn tcx_programs(netns: &Path) -> Result<Vec<HookProgram>> {
    netpol_lab::run_in_netns(netns, || {
        let mut out = Vec::new();
        for ifname in interfaces()? {
            for (egress, dir) in [
                (false, aya::programs::TcAttachType::Ingress),
                (true, aya::programs::TcAttachType::Egress),
            ] {
                let (_, infos) = SchedClassifier::query_tcx(&ifname, dir)
                    .map_err(|e| io::Error::other(format!("{ifname}: {e}")))?;
                out.extend(infos.iter().map(|i| {
                    let name = i.name_as_str().unwrap_or_default().to_string();
                    HookProgram {
                        hook: Hook::of_program(&name).unwrap_or(if egress {
                            Hook::ToPod
                        } else {
                            Hook::FromPod
                        }),
                        ifname: ifname.clone(),
                        egress,
                        id: i.id(),
                        name,
                        counters: Counters::of(i),
                    }
                }));
            }
        }
        Ok(out)
    })
    .with_context(|| format!("querying the TCX hooks in {}", netns.display()))
}

/// The names of the caller's network namespace's interfaces
/// (`if_nameindex`, which asks the kernel through netlink).
fn interfaces() -> io::Result<Vec<String>> {
    // SAFETY: if_nameindex returns an array ending with a zero entry, or
    // NULL; it is freed with if_freenameindex below.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut p = list;
    // SAFETY: every entry up to the zero one is valid, with a C string name.
    unsafe {
        while (*p).if_index != 0 {
            out.push(
                std::ffi::CStr::from_ptr((*p).if_name)
                    .to_string_lossy()
                    .into_owned(),
            );
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    Ok(out)
}

/// The counters of several hooks' programs, by program id (a program on two
/// hooks counts once).
#[derive(Debug, Clone, Default)]
pub struct Snapshot(pub std::collections::BTreeMap<u32, HookProgram>);

impl Snapshot {
    pub fn new(programs: impl IntoIterator<Item = HookProgram>) -> Snapshot {
        Snapshot(programs.into_iter().map(|p| (p.id, p)).collect())
    }

    /// The runs between `before` and `self`, summed per hook (a program that
    /// appeared in between counts from zero).
    pub fn since(&self, before: &Snapshot) -> PerHook {
        let mut out = PerHook::default();
        for (id, p) in &self.0 {
            let base = before.0.get(id).map(|b| b.counters).unwrap_or_default();
            let d = p.counters.since(base);
            match p.hook {
                Hook::FromPod => out.from_pod = out.from_pod + d,
                Hook::ToPod => out.to_pod = out.to_pod + d,
                Hook::PostNat => out.post_nat = out.post_nat + d,
            }
        }
        out
    }
}

/// Runs on the from-pod (veth TC ingress), to-pod (veth TC egress) and
/// post-NAT (node device TC egress) hooks.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PerHook {
    pub from_pod: Counters,
    pub to_pod: Counters,
    pub post_nat: Counters,
}

impl PerHook {
    pub fn total(&self) -> Counters {
        self.from_pod + self.to_pod + self.post_nat
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_per_hook() {
        let p = |hook, id, t, n| HookProgram {
            hook,
            ifname: String::new(),
            egress: hook != Hook::FromPod,
            id,
            name: String::new(),
            counters: Counters {
                run_time_ns: t,
                run_cnt: n,
            },
        };
        let before = Snapshot::new([p(Hook::ToPod, 1, 100, 1), p(Hook::FromPod, 2, 50, 1)]);
        let after = Snapshot::new([
            p(Hook::ToPod, 1, 1100, 11),
            p(Hook::FromPod, 2, 450, 5),
            p(Hook::ToPod, 3, 300, 2),
            p(Hook::PostNat, 4, 70, 7),
        ]);
        let d = after.since(&before);
        assert_eq!(d.to_pod.run_cnt, 12);
        assert_eq!(d.to_pod.run_time_ns, 1300);
        assert_eq!(d.from_pod.ns_per_run(), 100.0);
        assert_eq!(d.post_nat.run_cnt, 7);
        assert_eq!(d.total().run_cnt, 23);
        assert_eq!(Hook::of_program("netpol_post_nat"), Some(Hook::PostNat));
        assert_eq!(Hook::of_program("floor_from_pod"), Some(Hook::FromPod));
        assert!(Counters::default().ns_per_run().is_nan());
    }
}
