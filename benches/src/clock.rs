//! A monotonic clock in nanoseconds and sleeping until an absolute time on
//! it, for schedules that must not drift (the open-loop load generator
//! sends request `i` at `start + i / rate`, whatever happened before).

/// `CLOCK_MONOTONIC` in nanoseconds (the clock `Instant` uses on Linux).
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only `ts`; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Sleeps until `CLOCK_MONOTONIC` reaches `t_ns` (returns at once if it has).
pub fn sleep_until_ns(t_ns: u64) {
    let ts = libc::timespec {
        tv_sec: (t_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (t_ns % 1_000_000_000) as libc::c_long,
    };
    loop {
        // SAFETY: clock_nanosleep reads `ts` and writes nothing with TIMER_ABSTIME.
        let rc = unsafe {
            libc::clock_nanosleep(
                libc::CLOCK_MONOTONIC,
                libc::TIMER_ABSTIME,
                &ts,
                std::ptr::null_mut(),
            )
        };
        if rc != libc::EINTR {
            return;
        }
    }
}

/// Sleeps for `ns` nanoseconds.
pub fn sleep_ns(ns: u64) {
    sleep_until_ns(now_ns() + ns);
}

/// Asks the kernel to wake this thread as close to its deadlines as it can
/// (the default timer slack of 50 us would add up to 50 us to every
/// scheduled send).
pub fn precise_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer and affects only this thread.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
}
