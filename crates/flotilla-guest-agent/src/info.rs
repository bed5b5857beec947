//! Facts about the guest for `Info` and `Hello`.

use std::net::IpAddr;

use flotilla_guest_protocol::{GuestAddress, GuestInfo};
use nix::sys::socket::SockaddrStorage;

/// Guest uptime from `/proc/uptime`, in milliseconds (0 if unreadable).
pub(crate) fn uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|text| parse_uptime_ms(&text))
        .unwrap_or(0)
}

fn parse_uptime_ms(text: &str) -> Option<u64> {
    let seconds: f64 = text.split_whitespace().next()?.parse().ok()?;
    Some((seconds * 1000.0) as u64)
}

/// Collects everything `Info` reports; missing pieces stay empty rather than failing.
pub(crate) fn gather() -> GuestInfo {
    let (kernel_release, kernel_version) = match nix::sys::utsname::uname() {
        Ok(uts) => (
            uts.release().to_string_lossy().into_owned(),
            uts.version().to_string_lossy().into_owned(),
        ),
        Err(_) => (String::new(), String::new()),
    };
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    GuestInfo {
        kernel_release,
        kernel_version,
        hostname: nix::unistd::gethostname()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default(),
        uptime_ms: uptime_ms(),
        mem_total_kib: meminfo_kib(&meminfo, "MemTotal").unwrap_or(0),
        mem_available_kib: meminfo_kib(&meminfo, "MemAvailable").unwrap_or(0),
        addresses: addresses(),
        machine_id: std::fs::read_to_string("/etc/machine-id")
            .ok()
            .map(|id| id.trim().to_string())
            .filter(|id| !id.is_empty()),
    }
}

/// The value of a `Name:   1234 kB` line of `/proc/meminfo`.
fn meminfo_kib(meminfo: &str, field: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let (name, rest) = line.split_once(':')?;
        (name == field).then(|| rest.split_whitespace().next()?.parse().ok())?
    })
}

fn addresses() -> Vec<GuestAddress> {
    let Ok(interfaces) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    interfaces
        .filter_map(|ifa| {
            let (address, prefix_len) = ip_and_prefix(ifa.address.as_ref()?, ifa.netmask.as_ref())?;
            Some(GuestAddress {
                interface: ifa.interface_name,
                address: address.to_string(),
                prefix_len,
            })
        })
        .collect()
}

fn ip_and_prefix(
    address: &SockaddrStorage,
    netmask: Option<&SockaddrStorage>,
) -> Option<(IpAddr, u8)> {
    if let Some(v4) = address.as_sockaddr_in() {
        let prefix = netmask
            .and_then(SockaddrStorage::as_sockaddr_in)
            .map_or(32, |mask| u32::from(mask.ip()).count_ones());
        return Some((IpAddr::V4(v4.ip()), prefix as u8));
    }
    let v6 = address.as_sockaddr_in6()?;
    let prefix = netmask
        .and_then(SockaddrStorage::as_sockaddr_in6)
        .map_or(128, |mask| u128::from(mask.ip()).count_ones());
    Some((IpAddr::V6(v6.ip()), prefix as u8))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        assert_eq!(parse_uptime_ms("12.34 56.78\n"), Some(12_340));
        assert_eq!(parse_uptime_ms(""), None);
        let meminfo = "MemTotal:         245000 kB\nMemFree: 1 kB\nMemAvailable:      200000 kB\n";
        assert_eq!(meminfo_kib(meminfo, "MemTotal"), Some(245_000));
        assert_eq!(meminfo_kib(meminfo, "MemAvailable"), Some(200_000));
        assert_eq!(meminfo_kib(meminfo, "SwapTotal"), None);
    }

    #[test]
    fn gathers_something_on_this_machine() {
        let info = gather();
        assert!(!info.kernel_release.is_empty());
        assert!(info.mem_total_kib > 0);
        assert!(info
            .addresses
            .iter()
            .any(|a| a.address == "127.0.0.1" && a.prefix_len == 8));
    }
}
