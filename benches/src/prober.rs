//! A TCP prober: from a pod's network namespace, a new connection every
//! interval, whatever happened to the earlier ones (several may be in
//! flight). A SYN-ACK within the timeout means allowed, silence means denied
//! (the SYN was dropped), an RST or an unreachable is an error. Each
//! connection is reset right away (SO_LINGER 0), so no TIME_WAIT piles up.
//! Shared by `e2e` (policy change to enforcement) and `pod_start`.

use std::{
    io,
    net::SocketAddr,
    os::fd::AsRawFd,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use netpol_lab::netns::{enter_netns, open_netns};
use serde::Serialize;
use socket2::{Domain, Socket, Type};

use crate::clock;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Allowed,
    Denied,
    /// RST, unreachable or another socket error (not expected).
    Error,
}

#[derive(Debug, Clone, Copy)]
pub struct Probe {
    /// When the SYN was sent ([`clock::now_ns`]).
    pub sent_ns: u64,
    pub outcome: Outcome,
}

/// Probes `addr` from `netns` every `interval_ns` until `stop`, recording
/// every probe's outcome in `log`. Runs on the calling thread, which it moves
/// into `netns`: give it a thread of its own.
pub fn prober(
    netns: PathBuf,
    addr: SocketAddr,
    interval_ns: u64,
    timeout_ns: u64,
    log: Arc<Mutex<Vec<Probe>>>,
    stop: Arc<AtomicBool>,
) -> io::Result<()> {
    let fd = open_netns(&netns)?;
    enter_netns(&fd)?;
    clock::precise_timer_slack();
    let mut inflight: Vec<(Socket, u64)> = Vec::new();
    let start = clock::now_ns();
    let mut next = start;
    while !stop.load(Ordering::Relaxed) {
        let now = clock::now_ns();
        if now >= next {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            s.set_nonblocking(true)?;
            s.set_linger(Some(Duration::ZERO))?;
            let sent_ns = clock::now_ns();
            match s.connect(&addr.into()) {
                Ok(()) => log.lock().expect("log").push(Probe {
                    sent_ns,
                    outcome: Outcome::Allowed,
                }),
                Err(e)
                    if e.raw_os_error() == Some(libc::EINPROGRESS)
                        || e.kind() == io::ErrorKind::WouldBlock =>
                {
                    inflight.push((s, sent_ns))
                }
                Err(_) => log.lock().expect("log").push(Probe {
                    sent_ns,
                    outcome: Outcome::Error,
                }),
            }
            // Never catch up in a burst after a stall: the next probe is
            // due one interval from now at the latest.
            next = (next + interval_ns).max(now);
        }
        let wait = next.saturating_sub(clock::now_ns());
        let mut fds: Vec<libc::pollfd> = inflight
            .iter()
            .map(|(s, _)| libc::pollfd {
                fd: s.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            })
            .collect();
        let ts = libc::timespec {
            tv_sec: (wait / 1_000_000_000) as libc::time_t,
            tv_nsec: (wait % 1_000_000_000) as libc::c_long,
        };
        // SAFETY: `fds` is a valid array of `fds.len()` pollfds; ppoll writes
        // only their `revents`; no signal mask is passed.
        let rc = unsafe {
            libc::ppoll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                &ts,
                std::ptr::null(),
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        let now = clock::now_ns();
        let mut done = Vec::new();
        for (i, p) in fds.iter().enumerate() {
            let (s, sent) = &inflight[i];
            let outcome = if p.revents != 0 {
                match s.take_error() {
                    Ok(None) => Some(Outcome::Allowed),
                    _ => Some(Outcome::Error),
                }
            } else if now - sent >= timeout_ns {
                Some(Outcome::Denied)
            } else {
                None
            };
            if let Some(outcome) = outcome {
                done.push(i);
                log.lock().expect("log").push(Probe {
                    sent_ns: *sent,
                    outcome,
                });
            }
        }
        for i in done.into_iter().rev() {
            inflight.swap_remove(i);
        }
    }
    Ok(())
}
