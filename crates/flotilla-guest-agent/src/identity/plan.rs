//! Checking a request before anything changes, so a bad field is refused with nothing applied.

use std::net::{IpAddr, Ipv4Addr};

use flotilla_guest_protocol::IdentityRequest;

use super::{invalid, IdentityError, Paths};

/// An address with its prefix length, e.g. `10.77.0.5/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Cidr {
    pub(super) ip: IpAddr,
    pub(super) prefix: u8,
}

impl Cidr {
    pub(super) fn parse(text: &str) -> Result<Self, String> {
        let (ip, prefix) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} lacks a /prefix"))?;
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| format!("{ip:?} is not an IP address"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = prefix
            .parse::<u8>()
            .ok()
            .filter(|&p| p <= max && !prefix.starts_with('+'))
            .ok_or_else(|| format!("prefix {prefix:?} is not 0..={max}"))?;
        if ip.is_unspecified() || ip.is_multicast() {
            return Err(format!("{ip} cannot be an interface address"));
        }
        Ok(Self { ip, prefix })
    }

    fn contains(&self, other: IpAddr) -> bool {
        let bits = u32::from(self.prefix);
        match (self.ip, other) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::from(netmask(self.prefix));
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// The IPv4 netmask of a prefix length: 24 is 255.255.255.0; 0 and anything above 32 are the
/// extremes.
pub(super) fn netmask(prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(
        u32::MAX
            .checked_shl(32 - u32::from(prefix.min(32)))
            .unwrap_or(0),
    )
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.ip, self.prefix)
    }
}

/// One interface's change, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct InterfacePlan {
    pub(super) name: String,
    pub(super) mac: String,
    pub(super) addresses: Vec<Cidr>,
    pub(super) gateway: Option<IpAddr>,
}

/// The checked request: everything [`apply`](super::apply) needs, nothing left to fail validation.
#[derive(Debug)]
pub(super) struct Plan<'a> {
    pub(super) request: &'a IdentityRequest,
    pub(super) interfaces: Vec<InterfacePlan>,
}

/// Checks every field, naming the first bad one.
pub(super) fn plan<'a>(
    request: &'a IdentityRequest,
    paths: &Paths,
) -> Result<Plan<'a>, IdentityError> {
    check_hostname(&request.hostname).map_err(|reason| invalid("hostname", reason))?;
    check_machine_id(&request.machine_id).map_err(|reason| invalid("machine_id", reason))?;
    let seed = request.rng_seed.len();
    let (min, max) = (
        IdentityRequest::RNG_SEED_MIN_LEN,
        IdentityRequest::RNG_SEED_MAX_LEN,
    );
    if !(min..=max).contains(&seed) {
        return Err(invalid(
            "rng_seed",
            format!("{seed} bytes, expected {min} to {max}"),
        ));
    }
    let mut interfaces: Vec<InterfacePlan> = Vec::new();
    for (at, interface) in request.interfaces.iter().enumerate() {
        let field = |name: &str| format!("interfaces[{at}].{name}");
        let name = &interface.name;
        check_interface_name(name).map_err(|reason| invalid(field("name"), reason))?;
        if interfaces.iter().any(|seen| &seen.name == name) {
            return Err(invalid(field("name"), format!("{name} is listed twice")));
        }
        if !paths.sys_class_net.join(name).exists() {
            return Err(invalid(field("name"), format!("no interface {name}")));
        }
        check_mac(&interface.mac).map_err(|reason| invalid(field("mac"), reason))?;
        let mut addresses: Vec<Cidr> = Vec::new();
        for (n, text) in interface.addresses.iter().enumerate() {
            let cidr =
                Cidr::parse(text).map_err(|r| invalid(field(&format!("addresses[{n}]")), r))?;
            if addresses.iter().any(|seen| seen.ip == cidr.ip) {
                return Err(invalid(
                    field(&format!("addresses[{n}]")),
                    format!("{} is listed twice", cidr.ip),
                ));
            }
            addresses.push(cidr);
        }
        let gateway = interface
            .gateway
            .as_deref()
            .map(|text| check_gateway(text, &addresses))
            .transpose()
            .map_err(|reason| invalid(field("gateway"), reason))?;
        interfaces.push(InterfacePlan {
            name: name.clone(),
            mac: interface.mac.clone(),
            addresses,
            gateway,
        });
    }
    Ok(Plan {
        request,
        interfaces,
    })
}

fn check_hostname(name: &str) -> Result<(), String> {
    let bytes = name.as_bytes();
    let first_ok = bytes
        .first()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let rest_ok = bytes
        .iter()
        .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if first_ok && rest_ok && bytes.len() <= 63 {
        Ok(())
    } else {
        Err(format!("{name:?} does not match [a-z0-9][a-z0-9-]{{0,62}}"))
    }
}

fn check_machine_id(id: &str) -> Result<(), String> {
    let hex = |b: &u8| b.is_ascii_digit() || (b'a'..=b'f').contains(b);
    if id.len() != 32 || !id.as_bytes().iter().all(hex) {
        return Err(format!("{id:?} is not 32 lowercase hex characters"));
    }
    if id.bytes().all(|b| b == b'0') {
        return Err("an all-zero machine id means \"none\"".into());
    }
    Ok(())
}

/// The kernel's rules for a device name (`dev_valid_name`), which also keep it a single path
/// component under `/sys/class/net`; `lo` is refused because flushing it breaks the guest.
fn check_interface_name(name: &str) -> Result<(), String> {
    let bad_char = |c: char| c == '/' || c == ':' || c.is_whitespace() || c.is_control();
    if name.is_empty() || name.len() > 15 || name == "." || name == ".." || name.contains(bad_char)
    {
        return Err(format!("{name:?} is not an interface name"));
    }
    if name == "lo" {
        return Err("the loopback interface cannot be readdressed".into());
    }
    Ok(())
}

/// Six colon-separated hex octets, unicast and not all zero (what the kernel accepts).
fn check_mac(mac: &str) -> Result<(), String> {
    match mac_octets(mac) {
        Some(octets) if octets[0] & 1 != 0 => Err(format!("{mac} is a multicast address")),
        Some(octets) if octets.iter().all(|&b| b == 0) => Err(format!("{mac} is all zero")),
        Some(_) => Ok(()),
        None => Err(format!("{mac:?} is not like 52:54:00:12:34:56")),
    }
}

/// The octets of a MAC written as six colon-separated pairs of hex digits.
pub(super) fn mac_octets(mac: &str) -> Option<[u8; 6]> {
    let mut parts = mac.split(':');
    let mut octets = [0u8; 6];
    for octet in &mut octets {
        let part = parts.next().filter(|part| part.len() == 2)?;
        *octet = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(octets)
}

/// The gateway must be reachable without another route: inside one of the interface's subnets,
/// or an IPv6 link-local address.
fn check_gateway(text: &str, addresses: &[Cidr]) -> Result<IpAddr, String> {
    let gateway: IpAddr = text
        .parse()
        .map_err(|_| format!("{text:?} is not an IP address"))?;
    if gateway.is_unspecified() || gateway.is_multicast() {
        return Err(format!("{gateway} cannot be a gateway"));
    }
    let link_local = matches!(gateway, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80);
    if link_local || addresses.iter().any(|cidr| cidr.contains(gateway)) {
        Ok(gateway)
    } else {
        Err(format!("{gateway} is in none of the interface's subnets"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly by design.
#[path = "plan_tests.rs"]
mod tests;
