//! Host networking for VMs: the bridge, one tap per NIC, addresses from the
//! host's subnet and MAC addresses.
//!
//! Links are managed with iproute2's `ip`, which every Linux host has, and
//! taps on the paths a user waits on through the kernel's interfaces
//! ([`tap`]); the calls are idempotent so a restarted agent can run them
//! again.

mod tap;

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

pub use flotilla_api::net::{Subnet, SubnetError};
use rand::Rng;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error(transparent)]
    InvalidSubnet(#[from] SubnetError),
    #[error("no free address left in subnet {subnet}")]
    SubnetExhausted { subnet: Subnet },
    #[error("`ip {args}` failed: {stderr}")]
    Command { args: String, stderr: String },
    #[error("could not run `ip`: {0} (is iproute2 installed?)")]
    Spawn(#[from] std::io::Error),
}

/// The first address of `subnet` not in `used`.
pub fn allocate_ip(subnet: &Subnet, used: &HashSet<Ipv4Addr>) -> Result<Ipv4Addr, NetworkError> {
    flotilla_api::net::first_free(subnet, used)
        .ok_or(NetworkError::SubnetExhausted { subnet: *subnet })
}

/// A random, locally administered unicast MAC not in `used`.
pub fn allocate_mac(used: &HashSet<String>) -> String {
    let mut rng = rand::thread_rng();
    loop {
        let b: [u8; 4] = rng.gen();
        // 0x02: locally administered, unicast; 0xf1 marks Flotilla's MACs.
        let mac = format!("02:f1:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3]);
        if !used.contains(&mac) {
            return mac;
        }
    }
}

/// Tap name for NIC `index` of the VM with id `vm_id` (Linux allows 15 bytes).
pub fn tap_name(vm_id: &str, index: usize) -> String {
    let short: String = vm_id.chars().take(10).collect();
    format!("fl{short}n{index}")
}

pub(crate) fn ip(args: &[&str]) -> Result<String, NetworkError> {
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NetworkError::Command {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

pub fn link_exists(name: &str) -> bool {
    tap::exists(name)
}

/// Every host's bridge has this MAC (a locally administered one): a VM
/// live-migrated to another host finds its gateway at the MAC it has
/// cached, so its traffic flows at once instead of after its ARP entry
/// expires (an anycast gateway, as in distributed routers).
pub const GATEWAY_MAC: &str = "02:66:6c:74:00:01";

/// Creates the bridge with the gateway address if missing, and brings it up.
pub fn ensure_bridge(bridge: &str, subnet: &Subnet) -> Result<(), NetworkError> {
    if !link_exists(bridge) {
        ip(&[
            "link",
            "add",
            "name",
            bridge,
            "address",
            GATEWAY_MAC,
            "type",
            "bridge",
        ])?;
    } else {
        ip(&["link", "set", "dev", bridge, "address", GATEWAY_MAC])?;
    }
    let cidr = format!("{}/{}", subnet.gateway(), subnet.prefix_len());
    let addrs = ip(&["-o", "addr", "show", "dev", bridge])?;
    if !addrs.contains(&format!(" {cidr} ")) {
        ip(&["addr", "add", &cidr, "dev", bridge])?;
    }
    ip(&["link", "set", "dev", bridge, "up"])?;
    answer_arp_for_routed_addresses(bridge)?;
    Ok(())
}

/// Proxy ARP on the bridge: a VM asking for an address of its subnet that
/// lives on another host (routed there, see [`crate::routes`]), or on an
/// isolated port of the same bridge (`proxy_arp_pvlan`), gets the bridge's
/// MAC and sends through this host. At once: the kernel's default waits up
/// to 0.8 s before a proxy answer. (An ICMP redirect the host may send a
/// VM changes nothing: asked for the other VM, the bridge still answers.)
fn answer_arp_for_routed_addresses(bridge: &str) -> Result<(), NetworkError> {
    for (path, value) in [
        (format!("/proc/sys/net/ipv4/conf/{bridge}/proxy_arp"), "1"),
        (
            format!("/proc/sys/net/ipv4/conf/{bridge}/proxy_arp_pvlan"),
            "1",
        ),
        (
            format!("/proc/sys/net/ipv4/neigh/{bridge}/proxy_delay"),
            "0",
        ),
    ] {
        std::fs::write(&path, value).map_err(|e| NetworkError::Command {
            args: format!("write {value} to {path}"),
            stderr: e.to_string(),
        })?;
    }
    Ok(())
}

pub fn delete_bridge(bridge: &str) -> Result<(), NetworkError> {
    if link_exists(bridge) {
        ip(&["link", "del", "dev", bridge])?;
    }
    Ok(())
}

/// Creates a persistent tap on `bridge`, up. Reuses a tap that already exists.
pub fn ensure_tap(tap: &str, bridge: &str) -> Result<(), NetworkError> {
    let failed = |what: &str, e: std::io::Error| NetworkError::Command {
        args: format!("{what} {tap}"),
        stderr: e.to_string(),
    };
    if !link_exists(tap) {
        tap::create_persistent(tap).map_err(|e| failed("tuntap add dev", e))?;
    }
    // Read through sysfs (`ip netns exec` mounts the namespace's own).
    let master = std::fs::read_link(format!("/sys/class/net/{tap}/master")).ok();
    let in_bridge = master.is_some_and(|m| m.file_name() == Some(std::ffi::OsStr::new(bridge)));
    let added = match in_bridge {
        true => Ok(()),
        false => tap::add_to_bridge(tap, bridge),
    };
    match added {
        Ok(()) => {}
        // A port already, of this bridge or (a leftover) another: `ip`
        // settles both.
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            ip(&["link", "set", "dev", tap, "master", bridge])?;
        }
        Err(e) => return Err(failed(&format!("link set master {bridge} dev"), e)),
    }
    tap::set_up(tap).map_err(|e| failed("link set up dev", e))?;
    // An isolated port: VMs on the bridge do not talk at layer 2, so their
    // traffic passes the host's filter (see `crate::isolation`). Through
    // sysfs: no fork on a resume's path.
    let isolated = format!("/sys/class/net/{tap}/brport/isolated");
    if std::fs::write(&isolated, "1").is_err() {
        ip(&[
            "link",
            "set",
            "dev",
            tap,
            "type",
            "bridge_slave",
            "isolated",
            "on",
        ])?;
    }
    Ok(())
}

/// Removes a VM's tap. Unregistering a link waits for the kernel's RCU
/// grace periods (about 23 ms here), on the path of every stop, suspend and
/// migration: the tap is taken down and renamed aside at once (its name
/// free for a VM that comes back), and deleted on a thread of its own
/// ([`finish_retired_taps`] waits for those).
pub fn delete_tap(tap: &str) -> Result<(), NetworkError> {
    if !link_exists(tap) {
        return Ok(());
    }
    let aside = format!(
        "{RETIRED_TAP_PREFIX}{:012x}",
        rand::random::<u64>() & 0xffff_ffff_ffff
    );
    match tap::set_aside(tap, &aside) {
        Ok(()) => {
            let deleting = aside.clone();
            let spawned = std::thread::Builder::new()
                .name("tap-delete".into())
                .spawn(move || {
                    if let Err(e) = delete_link_now(&deleting) {
                        tracing::warn!(tap = %deleting, error = %e, "deleting a retired tap");
                    }
                });
            match spawned {
                Ok(handle) => {
                    let mut retiring = RETIRING.lock().unwrap_or_else(|p| p.into_inner());
                    retiring.retain(|h| !h.is_finished());
                    retiring.push(handle);
                    Ok(())
                }
                Err(_) => delete_link_now(&aside),
            }
        }
        // Gone meanwhile (a deletion by ioctl would make it anew).
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(()),
        Err(e) => {
            tracing::debug!(tap, error = %e, "tap not set aside; deleting it now");
            delete_link_now(tap)
        }
    }
}

/// Deletions of retired taps in flight.
static RETIRING: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>> =
    std::sync::Mutex::new(Vec::new());

/// Waits for the retired taps' deletions in flight (an agent leaving the
/// host as it found it).
pub fn finish_retired_taps() {
    let handles = std::mem::take(&mut *RETIRING.lock().unwrap_or_else(|p| p.into_inner()));
    for handle in handles {
        let _ = handle.join();
    }
}

/// Taps set aside for deletion are named so: `x` is no hex digit, so no
/// VM's tap name ([`tap_name`]) starts like this.
const RETIRED_TAP_PREFIX: &str = "flx";

/// Deletes a tap by ioctl (no `ip` process), or with `ip` one a process
/// still holds or that is no tap.
fn delete_link_now(tap: &str) -> Result<(), NetworkError> {
    if let Err(e) = tap::delete_persistent(tap) {
        tracing::debug!(tap, error = %e, "tap not deleted by ioctl; using ip");
        ip(&["link", "del", "dev", tap])?;
    }
    Ok(())
}

/// Whether `name` is a tap [`delete_tap`] set aside: so named, and a
/// tun/tap device.
fn is_retired_tap(name: &str) -> bool {
    has_retired_name(name)
        && Path::new("/sys/class/net")
            .join(name)
            .join("tun_flags")
            .exists()
}

/// The prefix and 12 hex digits.
fn has_retired_name(name: &str) -> bool {
    name.strip_prefix(RETIRED_TAP_PREFIX)
        .is_some_and(|id| id.len() == 12 && id.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Deletes the retired taps an earlier agent left (it stopped before their
/// deletion had finished). Call before re-adopting VMs, whose exits set
/// taps aside too.
pub fn delete_retired_taps() {
    let Ok(links) = nix::net::if_::if_nameindex() else {
        return;
    };
    for link in links.iter() {
        let name = link.name().to_string_lossy();
        if is_retired_tap(&name) {
            if let Err(e) = delete_link_now(&name) {
                tracing::warn!(tap = %name, error = %e, "deleting a retired tap");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_skips_used_and_reports_exhaustion() {
        let s: Subnet = "10.0.0.0/29".parse().unwrap();
        let mut used = HashSet::new();
        for _ in 0..5 {
            let ip = allocate_ip(&s, &used).unwrap();
            assert!(used.insert(ip));
        }
        assert!(matches!(
            allocate_ip(&s, &used),
            Err(NetworkError::SubnetExhausted { .. })
        ));
    }

    #[test]
    fn only_set_aside_names_are_taken_for_retired_taps() {
        assert!(has_retired_name("flx0123456789ab"));
        assert!(!has_retired_name("flx0"));
        assert!(!has_retired_name("flxbridge00000"));
        assert!(!has_retired_name(&tap_name("0123456789abcdef", 0)));
        // Not a tap (no such link here).
        assert!(!is_retired_tap("flx0123456789ab"));
    }

    #[test]
    fn tap_names_fit_linux_limit() {
        assert!(tap_name("0123456789abcdef", 3).len() <= 15);
        let mac = allocate_mac(&HashSet::new());
        assert!(mac.starts_with("02:f1:"));
        assert_eq!(mac.len(), 17);
    }
}
