//! Network groups: VMs of different groups (tenants, by the
//! `flotilla.tenant` tag; VMs without it form one group) do not reach each
//! other, on one host or across hosts.
//!
//! Every tap is an isolated bridge port, so two VMs on the bridge never
//! talk at layer 2; the bridge answers their ARP requests for each other
//! (`proxy_arp_pvlan`), so their traffic is routed through the host, where
//! an nftables rule in the forward hook drops a packet whose source and
//! destination are VM addresses of different groups. The addresses and
//! groups come from this host's VMs, the control plane's route table and
//! the forwards of VMs that moved away; the whole table is replaced in one
//! `nft -f` transaction whenever they change.
//!
//! Traffic between a VM and the host itself, or the world beyond, is not
//! filtered here.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::Mutex;

use crate::network::NetworkError;

/// The nftables table this agent owns (in its network namespace).
const TABLE: &str = "flotilla";

/// The group of a VM with `tags`.
pub fn group_of(tags: &BTreeMap<String, String>) -> String {
    tags.get(flotilla_api::control::NETWORK_GROUP_TAG)
        .cloned()
        .unwrap_or_default()
}

/// The filter as last applied, and whether `nft` can apply one at all.
pub struct Isolation {
    applied: Mutex<Option<BTreeMap<Ipv4Addr, String>>>,
    available: bool,
}

/// The whole table for `members` (address -> group): groups are numbered
/// in order, and a packet between two members is dropped unless the
/// destination is in the source's group.
pub fn ruleset(members: &BTreeMap<Ipv4Addr, String>) -> String {
    let groups: BTreeSet<&String> = members.values().collect();
    let number: BTreeMap<&String, usize> = groups.into_iter().zip(1..).collect();
    let group_of: Vec<String> = members
        .iter()
        .map(|(ip, g)| format!("{ip} : {}", number[g]))
        .collect();
    let member: Vec<String> = members
        .iter()
        .map(|(ip, g)| format!("{} . {ip}", number[g]))
        .collect();
    let elements = |items: &[String]| match items.is_empty() {
        true => String::new(),
        false => format!(" elements = {{ {} }};", items.join(", ")),
    };
    format!(
        "add table ip {TABLE}\n\
         delete table ip {TABLE}\n\
         table ip {TABLE} {{\n\
         \tmap group_of {{ type ipv4_addr : mark;{} }}\n\
         \tset member {{ type mark . ipv4_addr;{} }}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tip saddr @group_of ip daddr @group_of meta mark set ip saddr map @group_of \
         meta mark . ip daddr != @member drop\n\
         \t}}\n\
         }}\n",
        elements(&group_of),
        elements(&member),
    )
}

fn nft(script: &str) -> Result<(), NetworkError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(NetworkError::Command {
            args: "nft -f -".into(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

impl Isolation {
    /// Checks that `nft` runs; without it VMs are not kept apart (warned).
    pub fn new() -> Isolation {
        let available = Command::new("nft")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !available {
            tracing::warn!("nft (nftables) is missing: VMs of different tenants are not kept apart on the network (scripts/install-deps installs it)");
        }
        Isolation {
            applied: Mutex::new(None),
            available,
        }
    }

    pub fn available(&self) -> bool {
        self.available
    }

    /// Makes the filter match `members`, if it does not already.
    pub fn apply(&self, members: BTreeMap<Ipv4Addr, String>) -> Result<(), NetworkError> {
        if !self.available {
            return Ok(());
        }
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        if applied.as_ref() == Some(&members) {
            return Ok(());
        }
        nft(&ruleset(&members))?;
        tracing::debug!(addresses = members.len(), "network groups applied");
        *applied = Some(members);
        Ok(())
    }

    /// Removes the filter (an embedded agent leaving the host as it was).
    pub fn clear(&self) {
        if !self.available {
            return;
        }
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = nft(&format!("add table ip {TABLE}\ndelete table ip {TABLE}\n")) {
            tracing::warn!(error = %e, "could not remove the network groups' table");
        }
        *applied = None;
    }
}

impl Default for Isolation {
    fn default() -> Self {
        Isolation::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_numbered_and_every_address_is_a_member_of_its_own() {
        let members = BTreeMap::from([
            (Ipv4Addr::new(10, 77, 0, 2), "t-a".to_string()),
            (Ipv4Addr::new(10, 77, 0, 3), "t-b".to_string()),
            (Ipv4Addr::new(10, 77, 0, 4), String::new()),
        ]);
        let r = ruleset(&members);
        // "" < "t-a" < "t-b": 1, 2, 3.
        assert!(
            r.contains("elements = { 10.77.0.2 : 2, 10.77.0.3 : 3, 10.77.0.4 : 1 }"),
            "{r}"
        );
        assert!(
            r.contains("elements = { 2 . 10.77.0.2, 3 . 10.77.0.3, 1 . 10.77.0.4 }"),
            "{r}"
        );
        // Replaced whole, in one transaction.
        assert!(r.starts_with("add table ip flotilla\ndelete table ip flotilla\n"));
        let empty = ruleset(&BTreeMap::new());
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
