//! IPv4 subnets of the VM network, shared by the agents (their bridge and
//! addresses) and the control plane (addresses unique across hosts).

use std::collections::HashSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A subnet that did not parse, with why and what is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetError {
    pub input: String,
    pub reason: String,
}

impl fmt::Display for SubnetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid subnet {:?}: {} (expected CIDR like 10.77.0.0/24, prefix 16..=29)",
            self.input, self.reason
        )
    }
}

impl std::error::Error for SubnetError {}

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

    /// Whether a VM may have `ip`: in the subnet, and neither its network,
    /// gateway nor broadcast address.
    pub fn is_vm_address(&self, ip: Ipv4Addr) -> bool {
        let size = 1u32 << (32 - self.prefix_len as u32);
        let offset = u32::from(ip).wrapping_sub(u32::from(self.network));
        self.contains(ip) && (2..size - 1).contains(&offset)
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl FromStr for Subnet {
    type Err = SubnetError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| SubnetError {
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
    type Error = SubnetError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Subnet> for String {
    fn from(s: Subnet) -> String {
        s.to_string()
    }
}

/// The first address of `subnet` that VMs may have and `used` does not hold.
pub fn first_free(subnet: &Subnet, used: &HashSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    subnet.vm_addresses().find(|ip| !used.contains(ip))
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
        assert!(s.is_vm_address(Ipv4Addr::new(10, 77, 0, 2)));
        for not in [
            [10, 77, 0, 0],
            [10, 77, 0, 1],
            [10, 77, 0, 255],
            [10, 78, 0, 2],
        ] {
            assert!(!s.is_vm_address(Ipv4Addr::from(not)), "{not:?}");
        }
    }

    #[test]
    fn subnet_errors_say_what_is_accepted() {
        for bad in ["10.0.0.0", "10.0.0.0/8", "x/24", "10.0.0.0/abc"] {
            let err = bad.parse::<Subnet>().unwrap_err().to_string();
            assert!(err.contains("expected CIDR"), "{err}");
        }
    }

    #[test]
    fn first_free_skips_used_ones() {
        let s: Subnet = "10.0.0.0/29".parse().unwrap();
        let used: HashSet<_> = [Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 4)].into();
        assert_eq!(first_free(&s, &used), Some(Ipv4Addr::new(10, 0, 0, 3)));
        let all: HashSet<_> = s.vm_addresses().collect();
        assert_eq!(first_free(&s, &all), None);
    }
}
