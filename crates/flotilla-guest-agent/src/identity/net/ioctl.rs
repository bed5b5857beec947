//! The fast path for one IPv4 address: ioctls on a datagram socket, no process started.

use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use super::{route_replace, run_ip, Ipv4Change};
use crate::identity::plan::netmask;
use crate::identity::{io_step, IdentityError};

/// The kernel's main IPv4 routing table, one route a line.
const ROUTE_TABLE: &str = "/proc/net/route";

/// `IFF_UP` in the width of `ifreq.ifr_flags`.
const IFF_UP: libc::c_short = libc::IFF_UP as libc::c_short;

/// The ioctl equivalent of [`ip_commands`](super::ip_commands) for one IPv4 address, in the
/// same order: down (which drops the interface's routes and IPv6 addresses, as `ip` does), MAC,
/// address (replacing the only one), netmask, no broadcast address (as `ip addr add` without
/// `brd` leaves it), up (a new IPv6 link-local address from the new MAC), default route. The MAC
/// is set while down rather than live so the link-local address is regenerated, as with `ip`.
///
/// The default route is added only when the main table has none with metric 0, where adding
/// and `ip route replace` are the same; otherwise (another interface's default route, or the
/// table unreadable) `ip` replaces it.
pub(super) fn readdress_by_ioctl(
    socket: &OwnedFd,
    name: &str,
    change: &Ipv4Change,
    ip: &Path,
) -> Result<(), IdentityError> {
    let step = |what: &str, call: &str| io_step(format!("{what} {name} ({call})"));
    let mut request = ifreq(name);
    // SAFETY: SIOCGIFFLAGS fills `ifr_flags` of the `ifreq` it is given.
    unsafe { ioctl(socket, libc::SIOCGIFFLAGS, &mut request) }
        .map_err(step("read the flags of", "SIOCGIFFLAGS"))?;
    // SAFETY: the kernel has set `ifr_flags` (and any value of a `c_short` is valid).
    let flags = unsafe { request.ifr_ifru.ifru_flags };
    if flags & IFF_UP != 0 {
        let mut request = ifreq_flags(name, flags & !IFF_UP);
        // SAFETY: SIOCSIFFLAGS reads `ifr_name` and `ifr_flags` of the `ifreq` it is given.
        unsafe { ioctl(socket, libc::SIOCSIFFLAGS, &mut request) }
            .map_err(step("take down", "SIOCSIFFLAGS"))?;
    }
    let mut request = ifreq(name);
    request.ifr_ifru.ifru_hwaddr = hardware_address(change.mac);
    // SAFETY: SIOCSIFHWADDR reads `ifr_name` and `ifr_hwaddr` of the `ifreq` it is given.
    unsafe { ioctl(socket, libc::SIOCSIFHWADDR, &mut request) }
        .map_err(step("set the MAC of", "SIOCSIFHWADDR"))?;
    let addresses = [
        (
            libc::SIOCSIFADDR,
            "SIOCSIFADDR",
            change.address,
            "set the address of",
        ),
        (
            libc::SIOCSIFNETMASK,
            "SIOCSIFNETMASK",
            netmask(change.prefix),
            "set the netmask of",
        ),
        (
            libc::SIOCSIFBRDADDR,
            "SIOCSIFBRDADDR",
            Ipv4Addr::UNSPECIFIED,
            "clear the broadcast address of",
        ),
    ];
    for (command, call, address, what) in addresses {
        let mut request = ifreq(name);
        request.ifr_ifru.ifru_addr = inet_address(address);
        // SAFETY: these three read `ifr_name` and an AF_INET `ifr_addr` of the `ifreq` given.
        unsafe { ioctl(socket, command, &mut request) }.map_err(step(what, call))?;
    }
    let mut request = ifreq_flags(name, flags | IFF_UP);
    // SAFETY: SIOCSIFFLAGS reads `ifr_name` and `ifr_flags` of the `ifreq` it is given.
    unsafe { ioctl(socket, libc::SIOCSIFFLAGS, &mut request) }
        .map_err(step("bring up", "SIOCSIFFLAGS"))?;
    let Some(gateway) = change.gateway else {
        return Ok(());
    };
    match fs::read_to_string(ROUTE_TABLE) {
        Ok(routes) if !has_default_route(&routes) => add_default_route(socket, name, gateway)
            .map_err(io_step(format!(
                "add the default route via {gateway} dev {name} (SIOCADDRT)"
            ))),
        _ => run_ip(ip, &route_replace(name, gateway)),
    }
}

/// Whether `/proc/net/route` (`Iface Destination Gateway Flags RefCnt Use Metric Mask ...`, hex
/// addresses) lists a default route with metric 0, the one `ip route replace` would replace;
/// a line it cannot read counts as one.
fn has_default_route(table: &str) -> bool {
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let zero_hex = |at: usize| {
            fields
                .get(at)
                .and_then(|field| u32::from_str_radix(field, 16).ok())
                .map(|value| value == 0)
        };
        let metric = fields.get(6).and_then(|field| field.parse::<u32>().ok());
        match (zero_hex(1), zero_hex(7), metric) {
            (Some(destination), Some(mask), Some(metric)) => destination && mask && metric == 0,
            _ => !line.trim().is_empty(),
        }
    })
}

/// Adds the default route via `gateway` on `name`; one that is already there is fine.
fn add_default_route(socket: &OwnedFd, name: &str, gateway: Ipv4Addr) -> io::Result<()> {
    // The kernel copies IFNAMSIZ - 1 bytes from `rt_dev` whatever the name's length, so it
    // points to a whole NUL-padded name buffer, which lives until this function returns.
    let mut device = interface_name(name);
    let mut route = default_route(gateway);
    route.rt_dev = device.as_mut_ptr();
    // SAFETY: SIOCADDRT reads the `rtentry` it is given and IFNAMSIZ bytes at its `rt_dev`,
    // which points to `device`, alive and unmoved for the call.
    match unsafe { ioctl(socket, libc::SIOCADDRT, &mut route) } {
        Err(error) if error.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        result => result,
    }
}

/// A socket for interface and route ioctls.
pub(super) fn inet_socket() -> Result<OwnedFd, IdentityError> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|errno| io_step("open a socket for interface ioctls")(io::Error::from(errno)))
}

/// Runs an ioctl whose argument is `arg`.
///
/// # Safety
///
/// `T` must be the structure `request` reads or writes, and any pointers in it must be valid
/// for what the kernel does with them.
unsafe fn ioctl<T>(socket: &OwnedFd, request: libc::c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: `socket` is open, `arg` is a live exclusive reference, and the caller vouches
    // that it is what `request` expects.
    let result = unsafe { libc::ioctl(socket.as_raw_fd(), request as _, std::ptr::from_mut(arg)) };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// An interface name as the kernel takes it: NUL-padded to IFNAMSIZ. Validation has kept it to
/// at most 15 bytes with no NUL, so the last byte stays NUL.
fn interface_name(name: &str) -> [libc::c_char; libc::IFNAMSIZ] {
    let mut buffer = [0; libc::IFNAMSIZ];
    for (slot, byte) in buffer[..libc::IFNAMSIZ - 1].iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    buffer
}

/// A zeroed `ifreq` naming `name`.
fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: `ifreq` is plain data (a name array and a union of integers, arrays, sockaddrs
    // and a raw pointer), for which all-zero bytes are a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    request.ifr_name = interface_name(name);
    request
}

/// An `ifreq` naming `name`, with `flags`.
fn ifreq_flags(name: &str, flags: libc::c_short) -> libc::ifreq {
    let mut request = ifreq(name);
    request.ifr_ifru.ifru_flags = flags;
    request
}

/// `struct sockaddr_in` for `address` (port 0) in a `struct sockaddr`: the port in `sa_data[0..2]`,
/// the address in network order in `sa_data[2..6]`, zeros after.
fn inet_address(address: Ipv4Addr) -> libc::sockaddr {
    let mut data = [0; 14];
    for (slot, byte) in data[2..6].iter_mut().zip(address.octets()) {
        *slot = byte as libc::c_char;
    }
    libc::sockaddr {
        sa_family: libc::AF_INET as libc::sa_family_t,
        sa_data: data,
    }
}

/// An Ethernet hardware address as SIOCSIFHWADDR takes it.
fn hardware_address(mac: [u8; 6]) -> libc::sockaddr {
    let mut data = [0; 14];
    for (slot, byte) in data.iter_mut().zip(mac) {
        *slot = byte as libc::c_char;
    }
    libc::sockaddr {
        sa_family: libc::ARPHRD_ETHER,
        sa_data: data,
    }
}

/// The default route via `gateway` (0.0.0.0/0, up, via a gateway, metric 0), without its device.
fn default_route(gateway: Ipv4Addr) -> libc::rtentry {
    // SAFETY: `rtentry` is plain data (integers, sockaddrs and a raw pointer), for which all-zero
    // bytes are a valid value, with a null `rt_dev`.
    let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
    route.rt_dst = inet_address(Ipv4Addr::UNSPECIFIED);
    route.rt_genmask = inet_address(Ipv4Addr::UNSPECIFIED);
    route.rt_gateway = inet_address(gateway);
    route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    route
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly by design.
#[path = "ioctl_tests.rs"]
mod tests;
