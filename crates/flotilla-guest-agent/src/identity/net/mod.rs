//! Giving each interface its new MAC and addresses: by ioctls when that gives the same result
//! as `ip` ([`ioctl`]), by the `ip` commands otherwise.

mod ioctl;

use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::{Command, Stdio};

use super::plan::{mac_octets, Cidr, InterfacePlan, Plan};
use super::{io_step, IdentityError};
use crate::log;
use ioctl::{inet_socket, readdress_by_ioctl};

/// Per-interface IPv6 settings (`all` plus one directory per interface).
const IPV6_CONF: &str = "/proc/sys/net/ipv6/conf";

/// Gives every planned interface its MAC and addresses.
pub(super) fn readdress_all(plan: &Plan<'_>, ip: Option<&Path>) -> Result<(), IdentityError> {
    let addresses = if plan.interfaces.is_empty() {
        None
    } else {
        read_addresses()
    };
    let mut socket = None;
    for interface in &plan.interfaces {
        let ip = ip.ok_or(IdentityError::ToolMissing("ip"))?;
        let current = addresses
            .as_deref()
            .map(|all| current_addresses(&interface.name, all));
        match readdress(interface, current.as_ref(), || {
            keeps_ipv6_on_down(&interface.name)
        }) {
            Readdress::Ioctls(change) => {
                let socket = match &mut socket {
                    Some(socket) => socket,
                    empty @ None => empty.insert(inet_socket()?),
                };
                readdress_by_ioctl(socket, &interface.name, &change, ip)?;
            }
            Readdress::Ip => {
                for args in ip_commands(interface) {
                    run_ip(ip, &args)?;
                }
            }
        }
    }
    Ok(())
}

/// How one interface is readdressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Readdress {
    /// The common case, one IPv4 address: ioctls on a datagram socket, no process started.
    Ioctls(Ipv4Change),
    /// Anything else: the commands of [`ip_commands`].
    Ip,
}

/// Everything [`readdress_by_ioctl`] sets on one interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ipv4Change {
    mac: [u8; 6],
    address: Ipv4Addr,
    prefix: u8,
    gateway: Option<Ipv4Addr>,
}

/// What an interface has now, as far as choosing how to readdress it goes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Current {
    /// IPv4 addresses with their labels: the interface's name, or `eth0:1` for a labelled alias.
    ipv4: Vec<(String, Ipv4Addr)>,
    /// Whether it has an IPv6 address other than a link-local one.
    routable_ipv6: bool,
}

/// Every address of every interface, as (name or label, address); `None` (logged) if they cannot
/// be listed, which sends every interface down the `ip` path.
fn read_addresses() -> Option<Vec<(String, IpAddr)>> {
    match nix::ifaddrs::getifaddrs() {
        Ok(entries) => Some(
            entries
                .filter_map(|entry| {
                    let address = entry.address?;
                    let ip = match (address.as_sockaddr_in(), address.as_sockaddr_in6()) {
                        (Some(v4), _) => IpAddr::V4(v4.ip()),
                        (_, Some(v6)) => IpAddr::V6(v6.ip()),
                        _ => return None,
                    };
                    Some((entry.interface_name, ip))
                })
                .collect(),
        ),
        Err(errno) => {
            log!("cannot list the interfaces' addresses ({errno}); readdressing with `ip`");
            None
        }
    }
}

/// Picks `name`'s addresses out of [`read_addresses`]' list.
fn current_addresses(name: &str, all: &[(String, IpAddr)]) -> Current {
    let mut current = Current::default();
    for (label, ip) in all {
        let ours = label == name
            || label
                .strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(':'));
        if !ours {
            continue;
        }
        match ip {
            IpAddr::V4(v4) => current.ipv4.push((label.clone(), *v4)),
            IpAddr::V6(v6) => current.routable_ipv6 |= v6.segments()[0] & 0xffc0 != 0xfe80,
        }
    }
    current
}

/// Whether the kernel keeps `name`'s IPv6 addresses when it goes down (`keep_addr_on_down`, where
/// a non-zero `all` overrides the interface's own); unreadable counts as keeping.
fn keeps_ipv6_on_down(name: &str) -> bool {
    let read = |dir: &str| -> Option<i32> {
        fs::read_to_string(format!("{IPV6_CONF}/{dir}/keep_addr_on_down"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    keeps_addresses(read("all"), read(name))
}

/// `addrconf_ifdown`'s rule: `all` unless it is 0, then the interface's own; above 0 keeps.
fn keeps_addresses(all: Option<i32>, own: Option<i32>) -> bool {
    match (all, own) {
        (Some(all), _) if all != 0 => all > 0,
        (Some(_), Some(own)) => own > 0,
        _ => true,
    }
}

/// Whether `interface` can be readdressed by ioctls with the same result as [`ip_commands`]:
/// one IPv4 address asked for (and no IPv6 one), an IPv4 gateway or none, and nothing on the
/// interface that only netlink can remove: at most one IPv4 address, labelled with the
/// interface's own name (an ioctl replaces only that one), and no IPv6 address that survives
/// taking the interface down. `current` is `None` when the addresses could not be listed.
fn readdress(
    interface: &InterfacePlan,
    current: Option<&Current>,
    keeps_ipv6: impl FnOnce() -> bool,
) -> Readdress {
    let [Cidr {
        ip: IpAddr::V4(address),
        prefix,
    }] = interface.addresses[..]
    else {
        return Readdress::Ip;
    };
    // Addresses the kernel treats specially (127/8 gets host scope, 0/8 and 255.255.255.255
    // no class) are rare here: left to `ip`.
    if address.is_loopback() || address.is_broadcast() || address.octets()[0] == 0 {
        return Readdress::Ip;
    }
    let gateway = match interface.gateway {
        None => None,
        Some(IpAddr::V4(gateway)) => Some(gateway),
        Some(IpAddr::V6(_)) => return Readdress::Ip,
    };
    let (Some(mac), Some(current)) = (mac_octets(&interface.mac), current) else {
        return Readdress::Ip;
    };
    match &current.ipv4[..] {
        [] => {}
        [(label, _)] if *label == interface.name => {}
        _ => return Readdress::Ip,
    }
    if current.routable_ipv6 && keeps_ipv6() {
        return Readdress::Ip;
    }
    Readdress::Ioctls(Ipv4Change {
        mac,
        address,
        prefix,
        gateway,
    })
}

/// The `ip` arguments that readdress one interface, in order.
fn ip_commands(interface: &InterfacePlan) -> Vec<Vec<String>> {
    let dev = interface.name.as_str();
    let words = |text: &str| text.split(' ').map(str::to_string).collect::<Vec<_>>();
    let mut commands = vec![
        words(&format!("link set dev {dev} down")),
        words(&format!("link set dev {dev} address {}", interface.mac)),
        words(&format!("addr flush dev {dev}")),
    ];
    for cidr in &interface.addresses {
        commands.push(words(&format!("addr add {cidr} dev {dev}")));
    }
    commands.push(words(&format!("link set dev {dev} up")));
    if let Some(gateway) = interface.gateway {
        let family = if gateway.is_ipv6() { "-6 " } else { "" };
        commands.push(words(&format!(
            "{family}route replace default via {gateway} dev {dev}"
        )));
    }
    commands
}

fn run_ip(ip: &Path, args: &[String]) -> Result<(), IdentityError> {
    let command = format!("ip {}", args.join(" "));
    let output = Command::new(ip)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(io_step(format!("run `{command}`")))?;
    if output.status.success() {
        return Ok(());
    }
    Err(IdentityError::Command {
        command,
        status: output.status.to_string(),
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
    })
}

/// The `ip` arguments that make `gateway` on `name` the default route.
fn route_replace(name: &str, gateway: Ipv4Addr) -> Vec<String> {
    [
        "route",
        "replace",
        "default",
        "via",
        &gateway.to_string(),
        "dev",
        name,
    ]
    .map(str::to_string)
    .to_vec()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly by design.
mod tests;
