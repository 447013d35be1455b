//! Putting the agent's programs on a pod's host veth, taking them off, and
//! checking them, through links pinned exactly where the agent pins its own
//! (`<root>/links/<ifindex>-<hook>`, see `netpol_agent::pins`): an agent that
//! starts later finds the pin and swaps its program into the same link, one
//! that runs meanwhile sees the pin and does the same. No endpoint entry is
//! written here: the datapath denies a veth without one (`no_endpoint`), so the
//! pod is isolated from its first packet until the agent knows it.
//!
//! The programs come from the links the agent already pinned on other veths:
//! that is the very program the agent runs (or ran, if it is down), with the
//! maps it uses, and attaching it costs no verifier pass. On a node where no
//! link is pinned yet (netpol's maps are there, but no pod veth carries the
//! programs) the plugin loads the programs itself, as the agent would, against
//! the pinned maps.

use std::{borrow::Cow, collections::BTreeMap, io, path::Path};

use aya::{
    pin::PinError,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, links::FdLink, loaded_programs,
        tc::TcAttachOptions,
    },
};
use netpol_agent::{
    datapath::{Datapath, MapSizes},
    pins::{Hook, Pins},
};
use netpol_common::map_names;

use crate::{
    bpf::{pinned_tcx_link, tcx_attach_type},
    cni::{CniError, code},
    host::HostVeth,
};

/// netpol is installed on this node when its maps are pinned.
pub fn installed(pins: &Pins) -> bool {
    pins.map(map_names::ENDPOINTS).exists()
}

/// A link pin for one (ifindex, hook).
#[derive(Debug)]
pub enum LinkState {
    Missing,
    /// Pinned and attached to that ifindex on that hook.
    Live,
    /// Pinned, but not attached there (its interface is gone, or the pin
    /// cannot be read).
    Stale(String),
}

pub fn link_state(pins: &Pins, ifindex: u32, hook: Hook) -> LinkState {
    let path = pins.link(ifindex, hook);
    if !path.exists() {
        return LinkState::Missing;
    }
    match pinned_tcx_link(&path) {
        Ok(l) if l.ifindex == ifindex && l.attach_type == tcx_attach_type(hook) => LinkState::Live,
        Ok(l) => LinkState::Stale(format!(
            "link {} is on ifindex {} with attach type {}",
            l.link_id, l.ifindex, l.attach_type
        )),
        Err(e) => LinkState::Stale(format!("reading {}: {e}", path.display())),
    }
}

fn attach_err(veth: &HostVeth, hook: Hook, e: impl ToString) -> CniError {
    CniError::new(
        code::ATTACH,
        format!(
            "attaching netpol's {} program to {} (ifindex {})",
            hook.as_str(),
            veth.name,
            veth.ifindex
        ),
        e,
    )
}

fn remove_pin(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// How [`attach`] got the programs onto the veth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    /// Both links were pinned already (the agent was quicker).
    Already,
    /// Attached the programs running in the agent's other links.
    FromLinks,
    /// Loaded the programs against the pinned maps (no link to take them from).
    Loaded,
}

/// Put both programs on `veth` through pinned links; a hook whose link is
/// already pinned and live there is left alone.
pub fn attach(pins: &Pins, veth: &HostVeth) -> Result<Attached, CniError> {
    let mut todo = Vec::new();
    for hook in Hook::ALL {
        match link_state(pins, veth.ifindex, hook) {
            LinkState::Live => {}
            LinkState::Missing => todo.push(hook),
            LinkState::Stale(why) => {
                crate::log::info(format_args!(
                    "replacing the stale link pin for ifindex {} {}: {why}",
                    veth.ifindex,
                    hook.as_str()
                ));
                remove_pin(&pins.link(veth.ifindex, hook))
                    .map_err(|e| attach_err(veth, hook, e))?;
                todo.push(hook);
            }
        }
    }
    if todo.is_empty() {
        return Ok(Attached::Already);
    }
    let mut running = running_programs(pins, veth.ifindex);
    if todo.iter().all(|h| running.contains_key(h)) {
        for hook in todo {
            let prog = running.remove(&hook).expect("checked above");
            attach_one(pins, veth, hook, prog)?;
        }
        return Ok(Attached::FromLinks);
    }
    let mut dp = Datapath::load(pins.clone(), MapSizes::default()).map_err(|e| {
        CniError::new(
            code::ATTACH,
            "loading netpol's programs against its pinned maps",
            e,
        )
    })?;
    dp.attach(veth.ifindex, &veth.name)
        .map_err(|e| attach_err(veth, todo[0], e))?;
    Ok(Attached::Loaded)
}

/// The program of each hook in the links pinned for other interfaces, by
/// program id, checked to be netpol's program for that hook.
fn running_programs(pins: &Pins, except: u32) -> BTreeMap<Hook, SchedClassifier> {
    let mut want: BTreeMap<u32, Hook> = BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir(pins.links_dir()) {
        let mut entries: Vec<_> = dir.flatten().map(|e| e.path()).collect();
        entries.sort();
        for path in entries {
            let Some((ifindex, hook)) = path
                .file_name()
                .and_then(|n| Pins::parse_link_name(&n.to_string_lossy()))
            else {
                continue;
            };
            if ifindex == except || want.values().any(|h| *h == hook) {
                continue;
            }
            if let Ok(l) = pinned_tcx_link(&path)
                && l.attach_type == tcx_attach_type(hook)
            {
                want.insert(l.prog_id, hook);
            }
        }
    }
    let mut out = BTreeMap::new();
    if want.is_empty() {
        return out;
    }
    for info in loaded_programs().flatten() {
        let Some(hook) = want.get(&info.id()).copied() else {
            continue;
        };
        if info.name_as_str() != Some(hook.program()) {
            continue;
        }
        if let Ok(p) = SchedClassifier::from_program_info(info, Cow::Borrowed(hook.program())) {
            out.insert(hook, p);
        }
    }
    out
}

fn attach_one(
    pins: &Pins,
    veth: &HostVeth,
    hook: Hook,
    mut prog: SchedClassifier,
) -> Result<(), CniError> {
    let attach_type = if hook == Hook::FromPod {
        TcAttachType::Ingress
    } else {
        TcAttachType::Egress
    };
    let id = prog
        .attach_with_options(
            &veth.name,
            attach_type,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .map_err(|e| attach_err(veth, hook, e))?;
    // Out of the program's hands: dropping the program must not detach.
    let link: FdLink = prog
        .take_link(id)
        .map_err(|e| attach_err(veth, hook, e))?
        .try_into()
        .map_err(|e: aya::programs::links::LinkError| attach_err(veth, hook, e))?;
    match link.pin(pins.link(veth.ifindex, hook)) {
        Ok(_pinned) => Ok(()),
        // The agent pinned its own link in the meantime. Ours was closed with
        // the failed pin (and so detached); the agent's is what stays.
        Err(PinError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {
            match link_state(pins, veth.ifindex, hook) {
                LinkState::Live => Ok(()),
                other => Err(attach_err(
                    veth,
                    hook,
                    format!("another link was pinned first, and it is not live: {other:?}"),
                )),
            }
        }
        Err(e) => Err(attach_err(veth, hook, e)),
    }
}

/// Take the programs off interface `ifindex` (unpinning destroys the links).
pub fn detach(pins: &Pins, ifindex: u32) -> Result<(), CniError> {
    for hook in Hook::ALL {
        let path = pins.link(ifindex, hook);
        remove_pin(&path).map_err(|e| {
            CniError::new(
                code::IO,
                format!("removing the link pin {}", path.display()),
                e,
            )
        })?;
    }
    Ok(())
}

/// Whether any link pinned for `ifindex` is still attached to an interface.
pub fn any_live(pins: &Pins, ifindex: u32) -> bool {
    Hook::ALL
        .iter()
        .any(|h| pinned_tcx_link(&pins.link(ifindex, *h)).is_ok_and(|l| l.ifindex != 0))
}

/// CHECK: both links pinned and attached to `veth`.
pub fn check(pins: &Pins, veth: &HostVeth) -> Result<(), CniError> {
    for hook in Hook::ALL {
        match link_state(pins, veth.ifindex, hook) {
            LinkState::Live => {}
            other => {
                return Err(CniError::new(
                    code::NOT_ATTACHED,
                    format!(
                        "{} (ifindex {}) does not carry netpol's {} program",
                        veth.name,
                        veth.ifindex,
                        hook.as_str()
                    ),
                    format!("{other:?}"),
                ));
            }
        }
    }
    Ok(())
}
