//! Taps through the kernel's own interfaces (`/dev/net/tun` and interface
//! ioctls) rather than `ip`: every VM start, resume and incoming migration
//! makes or reuses a tap, and each `ip` is a fork and an exec (a few ms
//! each, on the path a user waits on).

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

/// `SIOCBRADDIF` from `<linux/sockios.h>`: adds a port to a bridge (libc
/// does not export it for glibc targets).
const SIOCBRADDIF: libc::c_ulong = 0x89a2;

/// Whether a link of that name exists in this network namespace.
pub(super) fn exists(name: &str) -> bool {
    nix::net::if_::if_nametoindex(name).is_ok()
}

/// Creates a persistent tap (no packet-information header, as QEMU's
/// `-netdev tap` expects); it outlives this call, like `ip tuntap add`.
pub(super) fn create_persistent(name: &str) -> io::Result<()> {
    set_persistent(&attach(name)?, true)
}

/// Deletes a persistent tap no process holds (like `ip tuntap del`):
/// attached to this call's file, no longer persistent, it goes with the
/// file. `Err` with `EBUSY` if a process (a QEMU) still has it open.
pub(super) fn delete_persistent(name: &str) -> io::Result<()> {
    // Attaching would make a missing tap.
    if !exists(name) {
        return Ok(());
    }
    set_persistent(&attach(name)?, false)
}

/// A file of `/dev/net/tun` attached to tap `name` (made if missing).
fn attach(name: &str) -> io::Result<std::fs::File> {
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut req = request(name)?;
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: `req` is a valid ifreq that outlives the call; TUNSETIFF
    // reads its name and flags.
    check(unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) })?;
    Ok(tun)
}

fn set_persistent(tun: &std::fs::File, persistent: bool) -> io::Result<()> {
    // SAFETY: TUNSETPERSIST takes an integer argument.
    check(unsafe {
        libc::ioctl(
            tun.as_raw_fd(),
            libc::TUNSETPERSIST,
            persistent as libc::c_ulong,
        )
    })
}

/// Takes a link down and renames it `new_name` (like `ip link set NAME
/// down name NEW`): its name is free at once, and nothing flows through it.
pub(super) fn set_aside(name: &str, new_name: &str) -> io::Result<()> {
    let socket = control_socket()?;
    let mut req = request(name)?;
    // SAFETY: `req` is a valid ifreq; SIOCGIFFLAGS fills its flags.
    check(unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) })?;
    // SAFETY: the kernel just wrote the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags & !(libc::IFF_UP as libc::c_short);
    // SAFETY: as above; SIOCSIFFLAGS reads the name and flags.
    check(unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req) })?;
    let mut req = request(name)?;
    req.ifr_ifru.ifru_newname = request(new_name)?.ifr_name;
    // SAFETY: `req` is a valid ifreq with the old and the new name.
    check(unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFNAME, &mut req) })
}

/// Adds `port` to `bridge`. `Err` with `EBUSY` when it is a port of a
/// bridge already (this one or another).
pub(super) fn add_to_bridge(port: &str, bridge: &str) -> io::Result<()> {
    let index = nix::net::if_::if_nametoindex(port).map_err(io::Error::from)?;
    let socket = control_socket()?;
    let mut req = request(bridge)?;
    req.ifr_ifru.ifru_ifindex = index as libc::c_int;
    // SAFETY: `req` is a valid ifreq naming the bridge and the port's index.
    check(unsafe { libc::ioctl(socket.as_raw_fd(), SIOCBRADDIF, &mut req) })
}

/// Sets the link up (like `ip link set dev NAME up`).
pub(super) fn set_up(name: &str) -> io::Result<()> {
    let socket = control_socket()?;
    let mut req = request(name)?;
    // SAFETY: `req` is a valid ifreq; SIOCGIFFLAGS fills its flags.
    check(unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) })?;
    // SAFETY: the kernel just wrote the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    if flags & libc::IFF_UP as libc::c_short != 0 {
        return Ok(());
    }
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: as above; SIOCSIFFLAGS reads the name and flags.
    check(unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req) })
}

fn request(name: &str) -> io::Result<libc::ifreq> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?}: 1 to 15 bytes, no NUL"),
        ));
    }
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, b) in req.ifr_name.iter_mut().zip(bytes) {
        *slot = *b as libc::c_char;
    }
    Ok(req)
}

/// Any socket serves interface ioctls; it works on the caller's namespace.
fn control_socket() -> io::Result<OwnedFd> {
    nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)
}

fn check(rc: libc::c_int) -> io::Result<()> {
    match rc {
        -1 => Err(io::Error::last_os_error()),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_fit_the_kernel_limit() {
        assert!(request("fl0123456789n0").is_ok());
        assert!(request("").is_err());
        assert!(request("a-name-of-16-byt").is_err());
        assert!(request("nul\0").is_err());
    }

    #[test]
    fn a_missing_link_does_not_exist() {
        assert!(!exists("flnosuchlink0"));
        assert!(exists("lo"));
    }
}
