//! Entering network namespaces, running commands in them, finding what lives in them.
//!
//! Everything here enters only the *network* namespace (`setns(CLONE_NEWNET)`), unlike
//! `ip netns exec`, which also unshares the mount namespace and remounts `/sys` (hiding bpffs
//! pins). Threads that enter a netns are dedicated threads that end afterwards, so no thread of
//! the caller is ever left in a lab namespace.

use std::{
    ffi::CString,
    fs, io,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::{ffi::OsStrExt, fs::MetadataExt, process::CommandExt},
    },
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use crate::state::NETNS_DIR;

/// Opens a netns file (`/run/netns/<name>` or `/proc/<pid>/ns/net`).
pub fn open_netns(path: &Path) -> io::Result<OwnedFd> {
    Ok(fs::File::open(path)?.into())
}

/// Moves the calling thread into the network namespace `fd` refers to.
pub fn enter_netns(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: setns only reads the descriptor; CLONE_NEWNET affects the calling thread alone.
    let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Runs `f` on a new thread inside the network namespace at `path` and returns its result.
pub fn run_in_netns<T, F>(path: &Path, f: F) -> io::Result<T>
where
    T: Send,
    F: FnOnce() -> io::Result<T> + Send,
{
    let fd = open_netns(path)?;
    thread::scope(|s| {
        s.spawn(move || {
            enter_netns(&fd)?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("thread in netns panicked")))
    })
}

/// A `Command` that runs `program` inside the network namespace at `netns_path` (e.g.
/// `/run/netns/nplab_demo_node_node-a`), keeping the caller's mount namespace (so `/sys/fs/bpf`
/// and the bpffs pins stay visible). Equivalent to `nsenter --net=<path> -- <program>`.
pub fn netns_command(netns_path: &Path, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new(program);
    enter_netns_before_exec(&mut command, netns_path);
    command
}

/// Makes `command`'s child enter the network namespace at `netns_path` before it execs.
pub fn enter_netns_before_exec(command: &mut Command, netns_path: &Path) {
    let path = CString::new(netns_path.as_os_str().as_bytes())
        .unwrap_or_else(|_| CString::new(NETNS_DIR).expect("no NUL"));
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe system
    // calls (open, setns, close) on memory allocated before the fork.
    unsafe {
        command.pre_exec(move || {
            let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let rc = libc::setns(fd, libc::CLONE_NEWNET);
            let err = io::Error::last_os_error();
            libc::close(fd);
            if rc != 0 {
                return Err(err);
            }
            Ok(())
        });
    }
}

/// Names of the named network namespaces (`/run/netns/*`) that start with `prefix`.
pub fn list_netns(prefix: &str) -> Vec<String> {
    let Ok(entries) = fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with(prefix))
        .collect();
    names.sort();
    names
}

/// Inode of a netns file, which identifies the namespace.
fn netns_inode(path: &Path) -> Option<u64> {
    fs::metadata(path).ok().map(|m| m.ino())
}

/// Pids of the processes whose (main thread's) network namespace is one of `netns_paths`.
pub fn processes_in(netns_paths: &[&Path]) -> Vec<u32> {
    let inodes: Vec<u64> = netns_paths.iter().filter_map(|p| netns_inode(p)).collect();
    if inodes.is_empty() {
        return Vec::new();
    }
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id();
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            netns_inode(&Path::new("/proc").join(pid.to_string()).join("ns/net"))
                .is_some_and(|ino| inodes.contains(&ino))
        })
        .collect()
}

/// True while `pid` exists and is not a zombie.
pub fn is_alive(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name, which may itself contain ')'.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, None | Some('Z') | Some('X'))
}

/// Sends SIGTERM to `pids`, SIGKILL to those still alive after `grace`, and reaps those that
/// are our own children (so a test process does not keep zombies around).
pub fn terminate(pids: &[u32], grace: Duration) {
    let signal = |pid: u32, sig| {
        if let Ok(pid) = libc::pid_t::try_from(pid) {
            // SAFETY: kill has no memory effects; a vanished pid just returns ESRCH.
            unsafe { libc::kill(pid, sig) };
        }
    };
    for &pid in pids {
        signal(pid, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    loop {
        reap(pids);
        let alive: Vec<u32> = pids.iter().copied().filter(|&p| is_alive(p)).collect();
        if alive.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            for pid in alive {
                signal(pid, libc::SIGKILL);
            }
            thread::sleep(Duration::from_millis(20));
            reap(pids);
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Reaps those of `pids` that are exited children of this process; others are left alone.
fn reap(pids: &[u32]) {
    for &pid in pids {
        if let Ok(pid) = libc::pid_t::try_from(pid) {
            let mut status = 0;
            // SAFETY: waitpid writes only `status`; for non-children it fails with ECHILD.
            unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        }
    }
}

/// Writes sysctls (`("net/ipv4/ip_forward", "1")`, relative to `/proc/sys`) inside a netns.
/// `/proc/sys/net` shows the network namespace of the thread that opens it.
pub fn write_sysctls(netns_path: &Path, sysctls: &[(String, &str)]) -> io::Result<()> {
    run_in_netns(netns_path, || {
        for (key, value) in sysctls {
            let path = Path::new("/proc/sys").join(key);
            fs::write(&path, value)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_nonsense_pid_is_not() {
        assert!(is_alive(std::process::id()));
        assert!(!is_alive(u32::MAX));
    }

    #[test]
    fn list_netns_filters_by_prefix() {
        assert!(list_netns("nplab_no-such-lab-ever_").is_empty());
    }
}
