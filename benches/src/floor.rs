//! The `floor` mode's programs: `r0 = 0; exit` (TC_ACT_OK, "pass"),
//! attached through TCX on the same hooks netpol uses (ingress and egress of
//! a pod's host-side veth, and the egress of the node devices where the
//! agent puts `netpol_post_nat`). What the kernel pays to run *any* program there
//! (the TCX dispatch, the context, the call) is in the floor; what netpol
//! adds on top of it is its own work.
//!
//! The eBPF crate is netpol's datapath, so the floor is not one of its
//! programs: the two instructions are assembled here and loaded with the
//! `bpf()` system call (`BPF_PROG_LOAD` of type `SCHED_CLS`), then attached
//! with `BPF_LINK_CREATE` (`BPF_TCX_INGRESS` / `BPF_TCX_EGRESS`, kernel
//! 6.6 or later). No toolchain, no ELF object. A link lives as long as its
//! file descriptor: dropping a [`FloorLink`] detaches it.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

/// `BPF_PROG_LOAD`, `BPF_LINK_CREATE` (`enum bpf_cmd`).
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
/// `BPF_PROG_TYPE_SCHED_CLS` (`enum bpf_prog_type`).
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
/// `BPF_TCX_INGRESS`, `BPF_TCX_EGRESS` (`enum bpf_attach_type`).
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;

/// `r0 = 0` (BPF_ALU64 | BPF_MOV | BPF_K, dst r0, imm 0), then `exit`
/// (BPF_JMP | BPF_EXIT): `struct bpf_insn` is code, dst/src registers, a
/// 16-bit offset and a 32-bit immediate, 8 bytes little-endian.
const PROGRAM: [u64; 2] = [0xb7, 0x95];

/// The leading fields of `union bpf_attr` for `BPF_PROG_LOAD` (the kernel
/// takes a shorter attr and zeroes the rest).
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

/// The leading fields of `union bpf_attr` for `BPF_LINK_CREATE` with the
/// `tcx` member (relative_fd 0 and no flags: appended after the programs
/// already on the hook, of which the floor's pods have none).
#[repr(C)]
struct TcxLinkAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    relative_fd: u32,
    _pad: u32,
    expected_revision: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is a valid, initialized `repr(C)` prefix of `union
    // bpf_attr` of the given size for `cmd`; the kernel reads at most that many
    // bytes and the pointers inside it outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both commands return a new file descriptor that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

/// Which side of the host veth.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Hook {
    /// TC ingress of the host veth: packets the pod sends (netpol's `from_pod`).
    FromPod,
    /// TC egress of the host veth: packets the pod receives (netpol's `to_pod`).
    ToPod,
    /// TC egress of a node device (uplink, tunnel): pods' packets leaving the
    /// node after the DNAT (netpol's `post_nat`).
    PostNat,
}

impl Hook {
    /// The hooks of a pod's host veth.
    pub const ALL: [Hook; 2] = [Hook::FromPod, Hook::ToPod];

    pub fn as_str(self) -> &'static str {
        match self {
            Hook::FromPod => "from_pod",
            Hook::ToPod => "to_pod",
            Hook::PostNat => "post_nat",
        }
    }

    fn tcx_attach_type(self) -> u32 {
        match self {
            Hook::FromPod => BPF_TCX_INGRESS,
            Hook::ToPod | Hook::PostNat => BPF_TCX_EGRESS,
        }
    }

    /// The hook a program named `..._from_pod`, `..._to_pod` or
    /// `..._post_nat` stands for (netpol's and the floor's names).
    pub fn of_program(name: &str) -> Option<Hook> {
        [Hook::FromPod, Hook::ToPod, Hook::PostNat]
            .into_iter()
            .find(|h| name.ends_with(h.as_str()))
    }
}

/// A loaded floor program (one per hook direction, so that the kernel's
/// statistics of the two directions stay apart, as netpol's do).
#[derive(Debug)]
pub struct FloorProgram {
    fd: OwnedFd,
    pub hook: Hook,
}

/// A floor program attached to one hook; detached when dropped.
#[derive(Debug)]
pub struct FloorLink {
    _fd: OwnedFd,
}

impl FloorProgram {
    /// Loads `r0 = 0; exit` as a `SCHED_CLS` program named `floor_<hook>`
    /// (what `bpftool prog` shows).
    pub fn load(hook: Hook) -> io::Result<FloorProgram> {
        let license = CString::new("GPL").expect("no NUL");
        let mut name = [0u8; 16];
        let n = format!("floor_{}", hook.as_str());
        name[..n.len()].copy_from_slice(n.as_bytes());
        let mut attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_SCHED_CLS,
            insn_cnt: PROGRAM.len() as u32,
            insns: PROGRAM.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 0,
            log_size: 0,
            log_buf: 0,
            kern_version: 0,
            prog_flags: 0,
            prog_name: name,
        };
        let fd = bpf(BPF_PROG_LOAD, &mut attr)?;
        Ok(FloorProgram { fd, hook })
    }

    /// Attaches the program to its hook of interface `ifindex` through TCX.
    /// The ifindex is that of the caller's network namespace: call this
    /// inside the node's netns (`netpol_lab::run_in_netns`).
    pub fn attach(&self, ifindex: u32) -> io::Result<FloorLink> {
        let mut attr = TcxLinkAttr {
            prog_fd: self.fd.as_raw_fd() as u32,
            target_ifindex: ifindex,
            attach_type: self.hook.tcx_attach_type(),
            flags: 0,
            relative_fd: 0,
            _pad: 0,
            expected_revision: 0,
        };
        Ok(FloorLink {
            _fd: bpf(BPF_LINK_CREATE, &mut attr)?,
        })
    }
}

/// The index of interface `name` in the caller's network namespace.
pub fn ifindex(name: &str) -> io::Result<u32> {
    let c = CString::new(name).map_err(io::Error::other)?;
    // SAFETY: `c` is a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(io::Error::last_os_error()),
        i => Ok(i),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_is_mov_r0_0_then_exit() {
        // struct bpf_insn { u8 code; u8 dst:4, src:4; s16 off; s32 imm; }
        assert_eq!(PROGRAM[0].to_le_bytes(), [0xb7, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(PROGRAM[1].to_le_bytes(), [0x95, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(size_of::<ProgLoadAttr>(), 64);
        assert_eq!(size_of::<TcxLinkAttr>(), 32);
    }

    /// Loading needs root; the test says so and skips loudly without it.
    #[test]
    fn loads_as_sched_cls() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED loads_as_sched_cls: needs root (BPF_PROG_LOAD)");
            return;
        }
        for hook in [Hook::FromPod, Hook::ToPod, Hook::PostNat] {
            let p = FloorProgram::load(hook).unwrap_or_else(|e| panic!("loading {hook:?}: {e}"));
            drop(p);
        }
    }
}
