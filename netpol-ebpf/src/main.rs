//! netpol datapath: TC programs on each local pod's host-side veth.
//!
//! Hooks and directions (always from the **pod's** point of view):
//! - `netpol_from_pod` is attached to the TC **ingress** hook of the
//!   host-side veth: it sees what the pod *sends*, judged by the pod's
//!   **egress** policy (`DIR_EGRESS`).
//! - `netpol_to_pod` is attached to the TC **egress** hook of the host-side
//!   veth: it sees what the pod *receives*, judged by the pod's **ingress**
//!   policy (`DIR_INGRESS`).
//!
//! - `netpol_post_nat` is attached to the TC **egress** hook of the node's
//!   own devices, and `netpol_local_in` is the node netns's sk_lookup: they
//!   see a pod's packets after kube-proxy's DNAT, where the egress verdict of
//!   a flow to a Service is taken (against the backend it really goes to;
//!   `netpol_to_pod` does the same for a backend on this node).
//!
//! - `netpol_xdp_uplink` is attached (XDP) to the node's uplink devices: an
//!   early drop of new flows from other nodes that the destination pod's
//!   ingress policy denies. It passes everything else, and `netpol_to_pod`
//!   still judges every packet that reaches a pod (see `xdp.rs`).
//!
//! Every packet to or from a pod crosses its veth whatever the CNI does, so
//! enforcement does not depend on routing or bridging. Each entry is thin;
//! the logic is in `try_handle`, and anything it cannot handle is dropped
//! (`TC_ACT_SHOT`): the datapath fails closed.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod conntrack;
#[cfg(target_arch = "bpf")]
mod events;
#[cfg(target_arch = "bpf")]
mod fast;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod policy;
#[cfg(target_arch = "bpf")]
mod quota;
#[cfg(target_arch = "bpf")]
mod xdp;

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::{TC_ACT_OK, TC_ACT_SHOT},
        macros::{classifier, sk_lookup, xdp},
        programs::{SkLookupContext, TcContext, XdpContext},
    };
    use netpol_common::{DIR_EGRESS, DIR_INGRESS};

    use crate::conntrack::{Verdict, handle, handle_post_nat, local_in};

    /// TC ingress of the host-side veth: packets the pod sends.
    #[classifier]
    pub fn netpol_from_pod(ctx: TcContext) -> i32 {
        to_action(handle(&ctx, DIR_EGRESS))
    }

    /// TC egress of the host-side veth: packets the pod receives.
    #[classifier]
    pub fn netpol_to_pod(ctx: TcContext) -> i32 {
        to_action(handle(&ctx, DIR_INGRESS))
    }

    /// TC egress of the node's own devices (uplinks, tunnels): a local pod's
    /// packets leaving the node after kube-proxy's DNAT, judged by the pod's
    /// egress policy against the real destination.
    #[classifier]
    pub fn netpol_post_nat(ctx: TcContext) -> i32 {
        to_action(handle_post_nat(&ctx))
    }

    /// sk_lookup of the node's network namespace: a local pod's new
    /// connection to a socket on the node, after any DNAT.
    #[sk_lookup]
    pub fn netpol_local_in(ctx: SkLookupContext) -> u32 {
        local_in(&ctx)
    }

    /// XDP on the node's uplinks: drops a new flow to a local pod that the
    /// pod's ingress policy denies, passes everything else to the stack.
    /// `frags` (loaded with `BPF_F_XDP_HAS_FRAGS`): it handles multi-buffer
    /// packets, so a device with a jumbo MTU keeps native XDP.
    #[xdp(frags)]
    pub fn netpol_xdp_uplink(ctx: XdpContext) -> u32 {
        crate::xdp::handle_xdp(&ctx)
    }

    #[inline(always)]
    fn to_action(v: Verdict) -> i32 {
        match v {
            Verdict::Pass => TC_ACT_OK,
            Verdict::Drop => TC_ACT_SHOT,
        }
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {
    // This crate is only built for bpfel-unknown-none (by aya-build, from
    // netpol-agent/build.rs). On the host it is an empty binary so that
    // `cargo check --workspace` works.
}
