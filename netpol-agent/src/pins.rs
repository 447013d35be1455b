//! Every bpffs path the agent uses, in one place.
//!
//! ```text
//! <root>/maps/<MAP_NAME>                   pinned maps (netpol_common::map_names)
//! <root>/links/<ifindex>-<hook>            pinned TCX links, hook = from_pod | to_pod
//!                                          (pod veths) | post_nat (node devices)
//! <root>/links/netns-local_in              the sk_lookup link of the node's netns
//! <root>/links/<ifindex>-xdp               XDP links on the node's uplinks
//! ```
//! A restarted agent adopts both: the maps keep their contents, and a new
//! program replaces the old one inside each pinned link atomically, unless
//! the link already runs a program of the same eBPF object (recorded, with
//! the programs' ids, in `<state-dir>/programs`: a BPF filesystem holds no
//! plain files), which is kept as it is.

use std::path::{Path, PathBuf};

/// Magic number of the BPF filesystem (`statfs.f_type`).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

pub const DEFAULT_ROOT: &str = "/sys/fs/bpf/netpol";

/// A TC hook on the host-side veth, named from the pod's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Hook {
    /// TC ingress of the host-side veth: what the pod sends.
    FromPod,
    /// TC egress of the host-side veth: what the pod receives.
    ToPod,
    /// TC egress of a node device (uplink, tunnel): pods' packets leaving
    /// the node after the DNAT.
    PostNat,
}

impl Hook {
    /// The hooks of a pod veth.
    pub const ALL: [Hook; 2] = [Hook::FromPod, Hook::ToPod];
    /// Every TC hook (their programs are loaded at start).
    pub const TC: [Hook; 3] = [Hook::FromPod, Hook::ToPod, Hook::PostNat];
    pub fn as_str(self) -> &'static str {
        match self {
            Hook::FromPod => "from_pod",
            Hook::ToPod => "to_pod",
            Hook::PostNat => "post_nat",
        }
    }
    pub fn program(self) -> &'static str {
        match self {
            Hook::FromPod => netpol_common::prog_names::FROM_POD,
            Hook::ToPod => netpol_common::prog_names::TO_POD,
            Hook::PostNat => netpol_common::prog_names::POST_NAT,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Pins {
    root: PathBuf,
}

impl Pins {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }
    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }
    pub fn link(&self, ifindex: u32, hook: Hook) -> PathBuf {
        self.links_dir()
            .join(format!("{ifindex}-{}", hook.as_str()))
    }
    /// The pinned sk_lookup link of the node's network namespace.
    pub fn local_in_link(&self) -> PathBuf {
        self.links_dir().join("netns-local_in")
    }
    /// The pinned XDP link of a node device (`crate::xdp`).
    pub fn xdp_link(&self, ifindex: u32) -> PathBuf {
        self.links_dir().join(format!("{ifindex}-xdp"))
    }
    /// Parse a link pin's file name back into (ifindex, hook).
    pub fn parse_link_name(name: &str) -> Option<(u32, Hook)> {
        let (idx, hook) = name.split_once('-')?;
        let hook = match hook {
            "from_pod" => Hook::FromPod,
            "to_pod" => Hook::ToPod,
            "post_nat" => Hook::PostNat,
            _ => return None,
        };
        Some((idx.parse().ok()?, hook))
    }

    /// Make sure a BPF filesystem is mounted under the root (mount one at
    /// /sys/fs/bpf if it is missing) and create the directories.
    pub fn prepare(&self) -> std::io::Result<()> {
        if !is_bpffs(self.root.parent().unwrap_or(Path::new("/"))) && !is_bpffs(&self.root) {
            let mnt = Path::new("/sys/fs/bpf");
            if self.root.starts_with(mnt) && !is_bpffs(mnt) {
                mount_bpffs(mnt)?;
            }
        }
        std::fs::create_dir_all(self.maps_dir())?;
        std::fs::create_dir_all(self.links_dir())?;
        Ok(())
    }
}

fn is_bpffs(p: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into a zeroed struct we own.
    unsafe {
        let mut s: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut s) == 0 && s.f_type as i64 == BPF_FS_MAGIC
    }
}

fn mount_bpffs(at: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    std::fs::create_dir_all(at)?;
    let target = std::ffi::CString::new(at.as_os_str().as_bytes())?;
    // SAFETY: plain mount(2) with valid C strings.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    tracing::info!(path = %at.display(), "mounted a BPF filesystem");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_names_round_trip() {
        let p = Pins::new("/sys/fs/bpf/netpol");
        for hook in Hook::TC {
            let path = p.link(42, hook);
            let name = path.file_name().unwrap().to_str().unwrap();
            assert_eq!(Pins::parse_link_name(name), Some((42, hook)));
        }
        assert_eq!(Pins::parse_link_name("42-sideways"), None);
        assert_eq!(Pins::parse_link_name("x-to_pod"), None);
    }
}
