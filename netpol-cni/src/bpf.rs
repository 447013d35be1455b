//! The two bpf(2) calls aya does not offer: reading a pinned TCX link's
//! interface and attach type. aya's `LinkInfo` gives the link and program ids
//! but keeps the per-type part of `struct bpf_link_info` private, and that part
//! says which interface a link is on, and whether it is on one at all (a TCX
//! link whose interface was deleted stays pinned, with ifindex 0).

use std::{
    ffi::CString,
    io,
    os::{
        fd::{FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use netpol_agent::pins::Hook;

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
/// `enum bpf_attach_type`.
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;

/// The TCX attach type of a hook, as the kernel reports it: only `from_pod`
/// sits on a TC ingress.
pub fn tcx_attach_type(hook: Hook) -> u32 {
    if hook == Hook::FromPod {
        BPF_TCX_INGRESS
    } else {
        BPF_TCX_EGRESS
    }
}

/// What the kernel says about a pinned link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcxLink {
    pub link_id: u32,
    pub prog_id: u32,
    /// 0 once the interface is gone.
    pub ifindex: u32,
    pub attach_type: u32,
}

/// `union bpf_attr` for BPF_OBJ_GET.
#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// `union bpf_attr` for BPF_OBJ_GET_INFO_BY_FD.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `struct bpf_link_info` with its union read as `tcx`; the tail is room for
/// the union's larger members (the kernel copies at most what we offer and
/// checks that any excess we offer is zero).
#[repr(C, align(8))]
struct LinkInfoRaw {
    type_: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    tcx_ifindex: u32,
    tcx_attach_type: u32,
    _rest: [u64; 31],
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: attr is a live, properly sized `union bpf_attr` prefix for cmd;
    // the kernel reads at most size_of::<T>() bytes of it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Open the link pinned at `path` and read its TCX part.
pub fn pinned_tcx_link(path: &Path) -> io::Result<TcxLink> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut get = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        ..Default::default()
    };
    let fd = bpf(BPF_OBJ_GET, &mut get)?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: an all-zero bpf_link_info is valid (plain integers).
    let mut info: LinkInfoRaw = unsafe { std::mem::zeroed() };
    let mut attr = InfoAttr {
        bpf_fd: std::os::fd::AsRawFd::as_raw_fd(&fd) as u32,
        info_len: std::mem::size_of::<LinkInfoRaw>() as u32,
        info: &mut info as *mut LinkInfoRaw as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    /// `BPF_LINK_TYPE_TCX`.
    const BPF_LINK_TYPE_TCX: u32 = 11;
    if info.type_ != BPF_LINK_TYPE_TCX {
        return Err(io::Error::other(format!(
            "{} is a bpf link of type {}, not TCX",
            path.display(),
            info.type_
        )));
    }
    Ok(TcxLink {
        link_id: info.id,
        prog_id: info.prog_id,
        ifindex: info.tcx_ifindex,
        attach_type: info.tcx_attach_type,
    })
}
