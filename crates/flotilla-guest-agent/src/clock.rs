//! Setting the guest's wall clock on the host's request (after a resume the
//! guest's clock still shows the moment it was suspended).

use std::io;

/// Sets CLOCK_REALTIME to `unix_nanos`; returns new minus old, in ms.
pub fn set_realtime(unix_nanos: u64) -> io::Result<i64> {
    let mut old = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid pointer.
    if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut old) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let new = libc::timespec {
        tv_sec: (unix_nanos / 1_000_000_000) as libc::time_t,
        tv_nsec: (unix_nanos % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: clock_settime reads one timespec from the valid pointer.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &new) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let old_ns = old.tv_sec as i128 * 1_000_000_000 + old.tv_nsec as i128;
    Ok(((unix_nanos as i128 - old_ns) / 1_000_000) as i64)
}
