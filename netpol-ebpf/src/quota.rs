//! Flow-table shares: one pod opening flows must not evict other pods'
//! idle allowed flows.
//!
//! `NETPOL_FLOWS` is one LRU shared by every endpoint on the node. When it
//! is full, a new entry evicts the least recently used one, whoever owns it:
//! a pod opening flows in a loop pushes out another pod's idle connection,
//! whose next packet from the far side is then judged as a new flow the
//! other way and dropped. Here each endpoint gets a share of the table, and
//! a new flow of an endpoint that holds its whole share is refused
//! (`REASON_FLOW_QUOTA`, with a verdict event) instead of created.
//!
//! # No count, so nothing to drift
//!
//! The obvious design keeps a per-endpoint count: +1 on insert, -1 on
//! removal. It drifts. The LRU evicts without a callback; entries are
//! removed on the packet path in several places (expiry, a SYN on a closed
//! flow, revocation) that would each have to decrement exactly once; the
//! agent may delete entries; and an entry that never sees another packet (a
//! DNS query's flow) is never removed at all, so its count never comes down
//! and a busy pod would end up refused for good.
//!
//! This design keeps no count. Each endpoint owns, on each CPU, a ring of
//! `slots_per_cpu` slots (`NETPOL_QUOTA_SLOTS`); a slot holds the key of the
//! flow that claimed it. A slot is busy if and only if that flow is in
//! `NETPOL_FLOWS` now and not idle past its timeout: a fact read from the
//! flow table itself at the moment of the claim. Whatever removed an entry
//! (the LRU, expiry, revocation, the agent), its slot is free the next time
//! the ring comes round to it. There is no number that can fall out of step
//! with the table. An entry is created only after its packet claimed a slot
//! and a slot names one flow, so an endpoint holds at most `slots_per_cpu`
//! entries per CPU. The agent sizes the shares so that all of them fit in
//! `NETPOL_FLOWS`: the table then never has to evict, and nobody's flow is
//! pushed out by somebody else's. The only error is on the safe side: a flow
//! that expired and was opened again under another slot may be named by two
//! slots until it goes (its endpoint gets one slot fewer meanwhile), and is
//! never named by none.
//!
//! # Per CPU
//!
//! Each ring is written only by its CPU (the slot key carries it, and a TC
//! program runs to completion on one CPU), so two packets never claim one
//! slot for two flows. A ring shared between CPUs would need atomic
//! compare-and-swap to keep that true; without it, racing claims would leave
//! entries that no slot names, and a pod flooding from two CPUs could grow
//! past its share. The price: the share is split over the CPUs, and a pod
//! whose new flows all start on one CPU gets that CPU's part.
//!
//! # The claim
//!
//! Up to [`PROBES`] slots from the ring's cursor, the way the CLOCK
//! algorithm looks for a page. At its share every slot is busy and the flow
//! is refused. Below it, a flow is refused only if [`PROBES`] slots in a row
//! hold live flows; the cursor then moves past them, so the next attempt (a
//! SYN retransmission) looks at other slots.
//!
//! # Audit mode
//!
//! A flow that audit mode would pass (`VERDICT_AUDIT`) also needs an entry,
//! so it needs a slot too, and is refused beyond the share like an allowed
//! one: the share is a limit on the table, not a policy, and audit mode only
//! softens policy.
//!
//! # Cost
//!
//! Nothing on the established path: a known flow is still one flow lookup.
//! On the new-flow path, only for an allowed packet that opens an entry:
//! the config and state lookups, then per probe one slot lookup and one flow
//! lookup, and one slot update. A pod at its share pays `2 * PROBES` lookups
//! per refused packet.

use aya_ebpf::helpers::bpf_get_smp_processor_id;
use netpol_common::{
    ConfigValue, FlowKey, PROTO_TCP, QuotaSlotKey, QuotaState, REASON_FLOW_QUOTA, VERDICT_DENY,
};

use crate::{
    conntrack::idle_timeout_ns,
    events::coarse_now_ns,
    maps::{NETPOL_FLOWS, NETPOL_QUOTA_CONFIG, NETPOL_QUOTA_SLOTS, NETPOL_QUOTA_STATE},
    parse::{IcmpKind, Packet, TCP_ACK, TCP_SYN},
};

/// Slots a claim looks at before it refuses.
const PROBES: u32 = 8;

/// The new-flow verdict after the endpoint's share: an allowed (or audited)
/// packet that would create a flow entry is refused with
/// `REASON_FLOW_QUOTA` when its endpoint cannot claim a slot. Anything else
/// is left as decided.
#[inline(always)]
pub fn gate(key: &FlowKey, p: &Packet, verdict: u8, reason: u8, cfg: &ConfigValue) -> (u8, u8) {
    if verdict == VERDICT_DENY || !opens_entry(p) || claim(key, cfg) {
        (verdict, reason)
    } else {
        (VERDICT_DENY, REASON_FLOW_QUOTA)
    }
}

/// Whether `new_flow` creates an entry for this packet once allowed: not for
/// a TCP packet other than a SYN, nor for an ICMP error.
#[inline(always)]
fn opens_entry(p: &Packet) -> bool {
    if p.protocol == PROTO_TCP && p.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return false;
    }
    p.icmp != IcmpKind::Error
}

/// Claim a slot of the endpoint's ring on this CPU for the flow `key`.
#[inline(always)]
fn claim(key: &FlowKey, cfg: &ConfigValue) -> bool {
    let slots = NETPOL_QUOTA_CONFIG.get(0).map_or(0, |c| c.slots_per_cpu);
    if slots == 0 {
        return true;
    }
    // SAFETY: a helper without arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let st = match NETPOL_QUOTA_STATE.get_ptr_mut(key.ifindex) {
        Some(st) => st,
        None => {
            let _ = NETPOL_QUOTA_STATE.insert(key.ifindex, QuotaState::default(), 0);
            match NETPOL_QUOTA_STATE.get_ptr_mut(key.ifindex) {
                Some(st) => st,
                // No room to track this endpoint: fail closed.
                None => return false,
            }
        }
    };
    // SAFETY: this CPU's value; only this CPU's programs write it, and a TC
    // program runs to completion.
    let st = unsafe { &mut *st };
    let now = coarse_now_ns();
    let mut i = 0;
    while i < PROBES {
        let slot = st.cursor.wrapping_add(i) % slots;
        let sk = QuotaSlotKey::new(key.ifindex, cpu, slot);
        // SAFETY: slot values are written only by this CPU (above, below).
        let free = match unsafe { NETPOL_QUOTA_SLOTS.get(&sk) } {
            None => true,
            Some(occupant) => match NETPOL_FLOWS.get_ptr(occupant) {
                None => {
                    st.reclaimed_gone += 1;
                    true
                }
                Some(f) => {
                    // SAFETY: valid for this program run; read only.
                    let f = unsafe { &*f };
                    // The fast path's own test: an entry idle past its
                    // timeout is gone as soon as its next packet comes; do
                    // not wait for that packet to free the slot.
                    if now.saturating_sub(f.last_seen_ns)
                        > idle_timeout_ns(f, occupant.protocol, cfg)
                    {
                        let _ = NETPOL_FLOWS.remove(occupant);
                        st.reclaimed_expired += 1;
                        true
                    } else {
                        false
                    }
                }
            },
        };
        if free {
            if NETPOL_QUOTA_SLOTS.insert(&sk, key, 0).is_err() {
                // The slot map is full (more endpoints than it was sized
                // for): fail closed rather than create an entry no slot names.
                break;
            }
            st.cursor = slot.wrapping_add(1);
            st.admitted += 1;
            return true;
        }
        i += 1;
    }
    st.cursor = st.cursor.wrapping_add(PROBES);
    st.refused += 1;
    false
}
