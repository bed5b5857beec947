//! Packets for VMs that moved away. After a live migration the old host
//! still receives traffic for the VM's address (other hosts' routes, a
//! client's cached next hop) until the network has converged. For a while
//! the old host routes the address to the new host (`ip route replace
//! IP/32 via NEW`): the more specific route wins over the VM subnet on the
//! bridge, and a sender on the same network gets an ICMP redirect to the
//! new host from the kernel. The forwards are kept on disk, so an agent
//! restarted in that window still removes them when it ends.
//!
//! The VM network is routed: the agent turns on IPv4 forwarding, as any
//! host whose VMs talk beyond it needs.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::fsutil::write_atomic;
use crate::network::{ip, NetworkError};

/// How long a moved VM's address is forwarded by default.
pub const DEFAULT_FORWARD_FOR: Duration = Duration::from_secs(120);

/// One moved VM address routed to its new host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forward {
    pub vm: String,
    /// The new host's address on the network between the hosts.
    pub via: Ipv4Addr,
    /// Seconds since the epoch after which the route goes.
    pub until_unix: u64,
}

/// This host's forwards, in memory and in `forwards.json`.
pub struct Forwards {
    path: PathBuf,
    items: Mutex<BTreeMap<Ipv4Addr, Forward>>,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// Turns on IPv4 forwarding (for this network namespace): VMs' traffic to
/// and from other hosts, and forwards, pass through the host. Returns
/// whether it was on before.
pub fn enable_ip_forwarding() -> std::io::Result<bool> {
    let was_on = std::fs::read_to_string(IP_FORWARD)?.trim() == "1";
    if !was_on {
        std::fs::write(IP_FORWARD, "1")?;
    }
    Ok(was_on)
}

/// Turns IPv4 forwarding off again (an embedded `flotilla up` leaving).
pub fn disable_ip_forwarding() -> std::io::Result<()> {
    std::fs::write(IP_FORWARD, "0")
}

impl Forwards {
    /// Reads the forwards a previous agent left (an unreadable file is
    /// treated as none, with a warning).
    pub fn open(data_dir: &Path) -> Forwards {
        let path = data_dir.join("forwards.json");
        let items = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(file = %path.display(), error = %e, "unreadable forwards; ignored");
                BTreeMap::new()
            }),
            Err(_) => BTreeMap::new(),
        };
        Forwards {
            path,
            items: Mutex::new(items),
        }
    }

    fn items(&self) -> std::sync::MutexGuard<'_, BTreeMap<Ipv4Addr, Forward>> {
        self.items.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self, items: &BTreeMap<Ipv4Addr, Forward>) {
        let written = serde_json::to_vec_pretty(items)
            .map_err(std::io::Error::other)
            .and_then(|bytes| write_atomic(&self.path, &bytes));
        if let Err(e) = written {
            tracing::warn!(file = %self.path.display(), error = %e, "could not write forwards");
        }
    }

    pub fn list(&self) -> BTreeMap<Ipv4Addr, Forward> {
        self.items().clone()
    }

    /// Addresses routed away: not to be given to new VMs meanwhile.
    pub fn addresses(&self) -> Vec<Ipv4Addr> {
        self.items().keys().copied().collect()
    }

    /// Routes `addr` (VM `vm`'s) to `via` for `window`.
    pub fn add(
        &self,
        addr: Ipv4Addr,
        vm: &str,
        via: Ipv4Addr,
        window: Duration,
    ) -> Result<(), NetworkError> {
        // Recorded first: a route made just before a crash is still found
        // (and ended) by the next agent.
        let mut items = self.items();
        items.insert(
            addr,
            Forward {
                vm: vm.to_string(),
                via,
                until_unix: now_unix() + window.as_secs(),
            },
        );
        self.save(&items);
        drop(items);
        ip(&[
            "route",
            "replace",
            &format!("{addr}/32"),
            "via",
            &via.to_string(),
        ])?;
        tracing::info!(%addr, %via, vm, secs = window.as_secs(), "forwarding a moved VM's address");
        Ok(())
    }

    /// Ends the forward of `addr`, if any (its VM came back, or its time is
    /// up).
    pub fn remove(&self, addr: Ipv4Addr) {
        let mut items = self.items();
        let Some(f) = items.remove(&addr) else {
            return;
        };
        Self::unroute(addr, f.via);
        self.save(&items);
        tracing::info!(%addr, vm = %f.vm, "forward ended");
    }

    fn unroute(addr: Ipv4Addr, via: Ipv4Addr) {
        let target = format!("{addr}/32");
        if let Err(e) = ip(&["route", "del", &target, "via", &via.to_string()]) {
            // Gone already (someone removed it, or the host restarted).
            tracing::debug!(%addr, error = %e, "forward's route not removed");
        }
    }

    /// Puts back the routes of forwards still in their window (after a
    /// host restart) and ends those past it.
    pub fn restore(&self) {
        self.expire();
        for (addr, f) in self.list() {
            let via = f.via.to_string();
            if let Err(e) = ip(&["route", "replace", &format!("{addr}/32"), "via", &via]) {
                tracing::warn!(%addr, error = %e, "could not restore a forward");
            }
        }
    }

    /// Ends the forwards whose window is over.
    pub fn expire(&self) {
        let now = now_unix();
        let over: Vec<Ipv4Addr> = self
            .items()
            .iter()
            .filter(|(_, f)| f.until_unix <= now)
            .map(|(a, _)| *a)
            .collect();
        for addr in over {
            self.remove(addr);
        }
    }

    /// Ends forwards as their windows close, for as long as the agent runs.
    pub async fn expire_loop(self: std::sync::Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || me.expire()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let f = Forwards::open(dir.path());
        // Written by hand: adding needs `ip` and privileges.
        let mut items = BTreeMap::new();
        items.insert(
            Ipv4Addr::new(10, 77, 0, 5),
            Forward {
                vm: "web".into(),
                via: Ipv4Addr::new(192, 0, 2, 7),
                until_unix: now_unix() + 60,
            },
        );
        f.save(&items);
        let again = Forwards::open(dir.path());
        assert_eq!(again.list(), items);
        assert_eq!(again.addresses(), vec![Ipv4Addr::new(10, 77, 0, 5)]);
    }

    #[test]
    fn an_unreadable_file_means_no_forwards() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("forwards.json"), b"{not json").unwrap();
        assert!(Forwards::open(dir.path()).list().is_empty());
    }
}
