//! Network groups: VMs of different groups (tenants, by the
//! `flotilla.tenant` tag; VMs without it form one group) do not reach each
//! other, on one host or across hosts.
//!
//! Every tap is an isolated bridge port, so two VMs on the bridge never
//! talk at layer 2; the bridge answers their ARP requests for each other
//! (`proxy_arp_pvlan`), so their traffic is routed through the host
//! (IPv4 forwarding; a firewall whose forward policy drops would cut it),
//! where a rule in the forward hook sends a packet to a VM address to its
//! source's group chain, which drops it unless the destination is in the
//! same group; a packet from an address of the VM subnet that is no known
//! VM's is dropped too. A tap may only send IPv4 and ARP from its own VM's
//! address (a `bridge` table), so a VM cannot pose as another or as an
//! unused address. The addresses and groups come from this host's VMs, the
//! control plane's route table and the forwards of VMs that moved away;
//! both tables are replaced in one `nft -f` transaction when they change,
//! and again every so often (a firewall reload may have flushed them).
//!
//! Traffic between a VM and the host itself, or the world beyond, is not
//! filtered here.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::network::{NetworkError, Subnet};

/// The nftables tables this agent owns (in its network namespace).
const TABLE: &str = "flotilla";

/// Applied again after this long even when nothing changed.
const REFRESH: Duration = Duration::from_secs(30);

/// The group of a VM with `tags`.
pub fn group_of(tags: &BTreeMap<String, String>) -> String {
    tags.get(flotilla_api::control::NETWORK_GROUP_TAG)
        .cloned()
        .unwrap_or_default()
}

/// What the filter is made from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Membership {
    /// Every VM address known here (this host's and others') -> its group.
    pub groups: BTreeMap<Ipv4Addr, String>,
    /// This host's taps -> the address their VM may send from.
    pub ports: BTreeMap<String, Ipv4Addr>,
}

/// The filter as last applied, and whether `nft` can apply one at all.
pub struct Isolation {
    subnet: Subnet,
    applied: Mutex<Option<(Membership, Instant)>>,
    available: bool,
}

fn elements(items: &[String]) -> String {
    match items.is_empty() {
        true => String::new(),
        false => format!(" elements = {{ {} }};", items.join(", ")),
    }
}

/// Both tables for `m` on VM subnet `subnet`, each replaced whole.
pub fn ruleset(subnet: &Subnet, m: &Membership) -> String {
    let groups: BTreeSet<&String> = m.groups.values().collect();
    let number: BTreeMap<&String, usize> = groups.into_iter().zip(1..).collect();
    let members: Vec<String> = m.groups.keys().map(|ip| ip.to_string()).collect();
    let jumps: Vec<String> = m
        .groups
        .iter()
        .map(|(ip, g)| format!("{ip} : jump g{}", number[g]))
        .collect();
    let mut group_sets = String::new();
    for (group, n) in &number {
        let of: Vec<String> = m
            .groups
            .iter()
            .filter(|(_, g)| g == group)
            .map(|(ip, _)| ip.to_string())
            .collect();
        group_sets.push_str(&format!(
            "\tset g{n} {{ type ipv4_addr;{} }}\n\tchain g{n} {{ ip daddr != @g{n} drop; }}\n",
            elements(&of)
        ));
    }
    let ports: Vec<String> = m.ports.keys().map(|t| format!("\"{t}\"")).collect();
    let port_addr: Vec<String> = m
        .ports
        .iter()
        .map(|(t, ip)| format!("\"{t}\" . {ip}"))
        .collect();
    format!(
        "add table ip {TABLE}\n\
         delete table ip {TABLE}\n\
         table ip {TABLE} {{\n\
         \tset members {{ type ipv4_addr;{} }}\n\
         {group_sets}\
         \tmap group_of {{ type ipv4_addr : verdict;{} }}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tip daddr @members ip saddr {subnet} ip saddr != @members drop\n\
         \t\tip daddr @members ip saddr vmap @group_of\n\
         \t}}\n\
         }}\n\
         add table bridge {TABLE}\n\
         delete table bridge {TABLE}\n\
         table bridge {TABLE} {{\n\
         \tset ports {{ type ifname;{} }}\n\
         \tset port_addr {{ type ifname . ipv4_addr;{} }}\n\
         \tchain prerouting {{\n\
         \t\ttype filter hook prerouting priority filter; policy accept;\n\
         \t\tiifname @ports ether type ip iifname . ip saddr != @port_addr drop\n\
         \t\tiifname @ports ether type arp iifname . arp saddr ip != @port_addr drop\n\
         \t}}\n\
         }}\n",
        elements(&members),
        elements(&jumps),
        elements(&ports),
        elements(&port_addr),
    )
}

fn nft(script: &str) -> Result<(), NetworkError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    // Written, then waited for even if the write failed (no zombie).
    let written = match child.stdin.take() {
        Some(mut stdin) => stdin.write_all(script.as_bytes()),
        None => Ok(()),
    };
    let out = child.wait_with_output()?;
    written?;
    if !out.status.success() {
        return Err(NetworkError::Command {
            args: "nft -f -".into(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

impl Isolation {
    /// Checks that `nft` runs; without it VMs are not kept apart (warned,
    /// and reported by `/v1/host`).
    pub fn new(subnet: Subnet) -> Isolation {
        let available = Command::new("nft")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !available {
            tracing::warn!("nft (nftables) is missing: VMs of different tenants are NOT kept apart on the network (scripts/install-deps installs it)");
        }
        Isolation {
            subnet,
            applied: Mutex::new(None),
            available,
        }
    }

    pub fn available(&self) -> bool {
        self.available
    }

    /// Makes the filter match `m`, unless it did already (and not long
    /// ago). `members` is called under the filter's lock, so filters are
    /// applied in the order their memberships were read.
    pub fn apply(&self, members: impl FnOnce() -> Membership) -> Result<(), NetworkError> {
        if !self.available {
            return Ok(());
        }
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        let m = members();
        if let Some((last, at)) = applied.as_ref() {
            if *last == m && at.elapsed() < REFRESH {
                return Ok(());
            }
        }
        nft(&ruleset(&self.subnet, &m))?;
        tracing::debug!(
            addresses = m.groups.len(),
            ports = m.ports.len(),
            "network groups applied"
        );
        *applied = Some((m, Instant::now()));
        Ok(())
    }

    /// Removes the filter (an embedded agent leaving the host as it was).
    pub fn clear(&self) {
        if !self.available {
            return;
        }
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        let script = format!(
            "add table ip {TABLE}\ndelete table ip {TABLE}\nadd table bridge {TABLE}\ndelete table bridge {TABLE}\n"
        );
        if let Err(e) = nft(&script) {
            tracing::warn!(error = %e, "could not remove the network groups' tables");
        }
        *applied = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_group_has_its_chain_and_each_port_its_address() {
        let m = Membership {
            groups: BTreeMap::from([
                (Ipv4Addr::new(10, 77, 0, 2), "t-a".to_string()),
                (Ipv4Addr::new(10, 77, 0, 3), "t-b".to_string()),
                (Ipv4Addr::new(10, 77, 0, 4), String::new()),
                (Ipv4Addr::new(10, 77, 0, 5), "t-a".to_string()),
            ]),
            ports: BTreeMap::from([("flvm1n0".to_string(), Ipv4Addr::new(10, 77, 0, 2))]),
        };
        let subnet: Subnet = "10.77.0.0/24".parse().unwrap();
        let r = ruleset(&subnet, &m);
        // "" < "t-a" < "t-b": g1, g2, g3.
        assert!(
            r.contains("set g2 { type ipv4_addr; elements = { 10.77.0.2, 10.77.0.5 }; }"),
            "{r}"
        );
        assert!(r.contains("chain g2 { ip daddr != @g2 drop; }"), "{r}");
        assert!(r.contains("10.77.0.3 : jump g3"), "{r}");
        assert!(r.contains("10.77.0.4 : jump g1"), "{r}");
        assert!(
            r.contains("ip saddr 10.77.0.0/24 ip saddr != @members drop"),
            "{r}"
        );
        assert!(r.contains("elements = { \"flvm1n0\" . 10.77.0.2 }"), "{r}");
        // Replaced whole, in one transaction.
        assert!(r.starts_with("add table ip flotilla\ndelete table ip flotilla\n"));
        let empty = ruleset(&subnet, &Membership::default());
        assert!(!empty.contains("elements"), "{empty}");
    }

    #[test]
    fn a_vm_without_the_tag_is_in_the_unnamed_group() {
        let mut tags = BTreeMap::new();
        assert_eq!(group_of(&tags), "");
        tags.insert("flotilla.tenant".to_string(), "t-1".to_string());
        assert_eq!(group_of(&tags), "t-1");
    }
}
