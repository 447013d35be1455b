//! Counters and verdict events.

use aya_ebpf::helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns};
use netpol_common::{
    COUNTER_EVENTS_RATE_LIMITED, COUNTER_EVENTS_RINGBUF_FULL, COUNTER_EVENTS_SENT, VerdictEvent,
    counter_index,
};

use crate::maps::{NETPOL_COUNTERS, NETPOL_EVENT_RATE, NETPOL_EVENTS};

#[inline(always)]
fn bump(index: u32) {
    if let Some(c) = NETPOL_COUNTERS.get_ptr_mut(index) {
        // Per-CPU slot: no other CPU writes it.
        unsafe { *c += 1 };
    }
}

/// Count one packet under `reason` in `direction`.
#[inline(always)]
pub fn count(direction: u8, reason: u8) {
    bump(counter_index(direction, reason));
}

/// Send `event` unless this CPU already sent `per_sec` events in the current
/// one-second window. What is not sent is counted, never silently lost.
#[inline(always)]
pub fn emit(event: &VerdictEvent, per_sec: u32) {
    let Some(state) = NETPOL_EVENT_RATE.get_ptr_mut(0) else {
        bump(COUNTER_EVENTS_RATE_LIMITED);
        return;
    };
    let now = event.timestamp_ns;
    // SAFETY: per-CPU slot, only this program on this CPU touches it.
    let state = unsafe { &mut *state };
    if now.wrapping_sub(state.window_start_ns) >= 1_000_000_000 {
        state.window_start_ns = now;
        state.count = 0;
    }
    if state.count >= per_sec {
        bump(COUNTER_EVENTS_RATE_LIMITED);
        return;
    }
    state.count += 1;
    match NETPOL_EVENTS.output(event, 0) {
        Ok(()) => bump(COUNTER_EVENTS_SENT),
        Err(_) => bump(COUNTER_EVENTS_RINGBUF_FULL),
    }
}

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// CLOCK_MONOTONIC at tick resolution (cheaper than `now_ns`); same clock,
/// so timestamps of both kinds compare.
#[inline(always)]
pub fn coarse_now_ns() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}
