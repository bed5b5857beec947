//! Host networking for VMs: the bridge, one tap per NIC, addresses from the
//! host's subnet and MAC addresses.
//!
//! Links are managed with iproute2's `ip`, which every Linux host has; the
//! calls are idempotent so a restarted agent can run them again.

use std::collections::HashSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::process::Command;
use std::str::FromStr;

use rand::Rng;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error(
        "invalid subnet {input:?}: {reason} (expected CIDR like 10.77.0.0/24, prefix 16..=29)"
    )]
    InvalidSubnet { input: String, reason: String },
    #[error("no free address left in subnet {subnet}")]
    SubnetExhausted { subnet: Subnet },
    #[error("`ip {args}` failed: {stderr}")]
    Command { args: String, stderr: String },
    #[error("could not run `ip`: {0} (is iproute2 installed?)")]
    Spawn(#[from] std::io::Error),
}

/// An IPv4 subnet in CIDR form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Subnet {
    network: Ipv4Addr,
    prefix_len: u8,
}

impl Subnet {
    pub fn new(network: Ipv4Addr, prefix_len: u8) -> Self {
        let mask = Self::mask_of(prefix_len);
        Subnet {
            network: Ipv4Addr::from(u32::from(network) & mask),
            prefix_len,
        }
    }

    fn mask_of(prefix_len: u8) -> u32 {
        if prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - prefix_len as u32)
        }
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// The first host address, held by the bridge and used as the VMs' gateway.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// Addresses VMs may get: everything but network, gateway and broadcast.
    pub fn vm_addresses(&self) -> impl Iterator<Item = Ipv4Addr> {
        let base = u32::from(self.network);
        let size = 1u32 << (32 - self.prefix_len as u32);
        (2..size - 1).map(move |i| Ipv4Addr::from(base + i))
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask_of(self.prefix_len) == u32::from(self.network)
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl FromStr for Subnet {
    type Err = NetworkError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| NetworkError::InvalidSubnet {
            input: s.to_string(),
            reason: reason.to_string(),
        };
        let (addr, prefix) = s.split_once('/').ok_or_else(|| bad("missing /prefix"))?;
        let network: Ipv4Addr = addr.parse().map_err(|_| bad("not an IPv4 address"))?;
        let prefix_len: u8 = prefix.parse().map_err(|_| bad("prefix is not a number"))?;
        if !(16..=29).contains(&prefix_len) {
            return Err(bad("prefix out of range"));
        }
        Ok(Subnet::new(network, prefix_len))
    }
}

impl TryFrom<String> for Subnet {
    type Error = NetworkError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Subnet> for String {
    fn from(s: Subnet) -> String {
        s.to_string()
    }
}

/// The first address of `subnet` not in `used`.
pub fn allocate_ip(subnet: &Subnet, used: &HashSet<Ipv4Addr>) -> Result<Ipv4Addr, NetworkError> {
    subnet
        .vm_addresses()
        .find(|ip| !used.contains(ip))
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
    ip(&["link", "show", "dev", name]).is_ok()
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
    if !link_exists(tap) {
        ip(&["tuntap", "add", "dev", tap, "mode", "tap"])?;
    }
    // One command for both: every `ip` costs a fork on a resume's path.
    ip(&["link", "set", "dev", tap, "master", bridge, "up"])?;
    Ok(())
}

pub fn delete_tap(tap: &str) -> Result<(), NetworkError> {
    if link_exists(tap) {
        ip(&["link", "del", "dev", tap])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_parsing_and_gateway() {
        let s: Subnet = "10.77.0.9/24".parse().unwrap();
        assert_eq!(s.to_string(), "10.77.0.0/24");
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 77, 0, 1));
        assert_eq!(s.vm_addresses().count(), 253);
        assert!(s.contains(Ipv4Addr::new(10, 77, 0, 200)));
        assert!(!s.contains(Ipv4Addr::new(10, 78, 0, 2)));
    }

    #[test]
    fn subnet_errors_say_what_is_accepted() {
        for bad in ["10.0.0.0", "10.0.0.0/8", "x/24", "10.0.0.0/abc"] {
            let err = bad.parse::<Subnet>().unwrap_err().to_string();
            assert!(err.contains("expected CIDR"), "{err}");
        }
    }

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
    fn tap_names_fit_linux_limit() {
        assert!(tap_name("0123456789abcdef", 3).len() <= 15);
        let mac = allocate_mac(&HashSet::new());
        assert!(mac.starts_with("02:f1:"));
        assert_eq!(mac.len(), 17);
    }
}
