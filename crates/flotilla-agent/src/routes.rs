//! Routes to VM addresses that live on other hosts. The VM subnet is shared
//! by the hosts a VM can move between, and every host's bridge holds it; a
//! route to one address (`IP/32 via HOST`) is more specific and wins, and
//! the bridge answers ARP for such addresses (proxy ARP), so a VM reaches
//! a VM on another host as if it were next to it.
//!
//! Two sources of routes:
//! - the **cluster table**, from the control plane with each heartbeat's
//!   reply: every instance elsewhere, via its host (VM-to-VM across hosts);
//! - **forwards** after a live migration: the old host still receives
//!   traffic for the VM (other hosts' routes not yet updated, a client's
//!   cached next hop) until the network has converged, so for a while it
//!   routes the address to the new host, and a sender on the same network
//!   gets an ICMP redirect from the kernel. Forwards are kept on disk, so
//!   an agent restarted in that window still ends them.
//!
//! A forward wins over the table; an address of a VM on this host is never
//! routed away. Routes are marked with their own protocol number, so a
//! restarted agent finds and reconciles the ones it made.
//!
//! The VM network is routed: the agent turns on IPv4 forwarding, as any
//! host whose VMs talk beyond it needs.

use std::collections::{BTreeMap, HashSet};
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

/// The routing protocol number marking Flotilla's routes (`ip route ...
/// proto 248`); unassigned in iproute2's table.
const ROUTE_PROTO: &str = "248";

/// The control plane's table as last applied.
#[derive(Debug, Default)]
struct ClusterTable {
    version: Option<String>,
    /// Address -> the host it lives on (addresses of VMs here left out).
    routes: BTreeMap<Ipv4Addr, Ipv4Addr>,
}

/// This host's routes to VM addresses elsewhere: forwards (in memory and
/// in `forwards.json`) and the cluster table.
pub struct Routes {
    path: PathBuf,
    items: Mutex<BTreeMap<Ipv4Addr, Forward>>,
    cluster: Mutex<ClusterTable>,
}

/// What one route should be, given the forward and table entries for it.
fn wanted(forward: Option<&Forward>, cluster: Option<&Ipv4Addr>) -> Option<Ipv4Addr> {
    forward.map(|f| f.via).or(cluster.copied())
}

fn route_replace(addr: Ipv4Addr, via: Ipv4Addr) -> Result<(), NetworkError> {
    ip(&[
        "route",
        "replace",
        &format!("{addr}/32"),
        "via",
        &via.to_string(),
        "proto",
        ROUTE_PROTO,
    ])
    .map(|_| ())
}

fn route_del(addr: Ipv4Addr) {
    let target = format!("{addr}/32");
    if let Err(e) = ip(&["route", "del", &target, "proto", ROUTE_PROTO]) {
        // Gone already (someone removed it, or the host restarted).
        tracing::debug!(%addr, error = %e, "route not removed");
    }
}

/// The routes this agent (or an earlier one) made, as the kernel has them.
fn kernel_routes() -> Result<BTreeMap<Ipv4Addr, Ipv4Addr>, NetworkError> {
    #[derive(Deserialize)]
    struct Row {
        dst: String,
        gateway: Option<String>,
    }
    let out = ip(&["-4", "-j", "route", "show", "proto", ROUTE_PROTO])?;
    let rows: Vec<Row> = serde_json::from_str(out.trim()).unwrap_or_default();
    Ok(rows
        .into_iter()
        .filter_map(|r| Some((r.dst.parse().ok()?, r.gateway?.parse().ok()?)))
        .collect())
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

impl Routes {
    /// Reads the forwards a previous agent left (an unreadable file is
    /// treated as none, with a warning).
    pub fn open(data_dir: &Path) -> Routes {
        let path = data_dir.join("forwards.json");
        let items = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(file = %path.display(), error = %e, "unreadable forwards; ignored");
                BTreeMap::new()
            }),
            Err(_) => BTreeMap::new(),
        };
        Routes {
            path,
            items: Mutex::new(items),
            cluster: Mutex::new(ClusterTable::default()),
        }
    }

    fn cluster(&self) -> std::sync::MutexGuard<'_, ClusterTable> {
        self.cluster.lock().unwrap_or_else(|p| p.into_inner())
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

    pub fn forwards(&self) -> BTreeMap<Ipv4Addr, Forward> {
        self.items().clone()
    }

    /// Addresses forwarded to VMs that moved away.
    pub fn forwarded(&self) -> Vec<Ipv4Addr> {
        self.items().keys().copied().collect()
    }

    /// Addresses routed away (forwards and the cluster table): not to be
    /// given to new VMs here.
    pub fn addresses(&self) -> Vec<Ipv4Addr> {
        let cluster = self.cluster();
        let mut all: Vec<Ipv4Addr> = self.items().keys().copied().collect();
        all.extend(cluster.routes.keys().copied());
        all
    }

    /// The version of the cluster table applied last.
    pub fn cluster_version(&self) -> Option<String> {
        self.cluster().version.clone()
    }

    /// Applies the control plane's table `version`: routes for addresses
    /// now elsewhere, none for those gone, never one for an address in
    /// `local` (a VM here, which the table may not know yet: it just
    /// arrived). The first table after a start also removes routes an
    /// earlier agent made that no table or forward wants any more.
    pub fn set_cluster(
        &self,
        version: String,
        table: BTreeMap<Ipv4Addr, Ipv4Addr>,
        local: &HashSet<Ipv4Addr>,
    ) {
        // Lock order everywhere: the table, then the forwards.
        let mut cluster = self.cluster();
        let forwards = self.items().clone();
        let before: BTreeMap<Ipv4Addr, Ipv4Addr> = if cluster.version.is_none() {
            kernel_routes().unwrap_or_else(|e| {
                tracing::warn!(error = %e, "could not list the routes an earlier agent made");
                BTreeMap::new()
            })
        } else {
            cluster.routes.clone()
        };
        let table: BTreeMap<Ipv4Addr, Ipv4Addr> = table
            .into_iter()
            .filter(|(addr, _)| !local.contains(addr))
            .collect();
        let mut failed = false;
        let every: std::collections::BTreeSet<&Ipv4Addr> =
            before.keys().chain(table.keys()).collect();
        for addr in every {
            let had = wanted(forwards.get(addr), before.get(addr));
            let want = wanted(forwards.get(addr), table.get(addr));
            if cluster.version.is_some() && had == want {
                continue;
            }
            match want {
                Some(via) => {
                    if let Err(e) = route_replace(*addr, via) {
                        tracing::warn!(%addr, %via, error = %e, "could not route a VM address");
                        failed = true;
                    }
                }
                None => route_del(*addr),
            }
        }
        tracing::debug!(version, routes = table.len(), "VM routes applied");
        // A failed route is tried again with the next table.
        cluster.version = (!failed).then_some(version);
        cluster.routes = table;
    }

    /// A VM with `addr` runs here now (it came back, or arrived): no route
    /// takes its address away, whatever the table said.
    pub fn arrived(&self, addr: Ipv4Addr) {
        let mut cluster = self.cluster();
        let routed = cluster.routes.remove(&addr);
        let mut items = self.items();
        let forwarded = items.remove(&addr);
        if let Some(f) = &forwarded {
            self.save(&items);
            tracing::info!(%addr, vm = %f.vm, "forward ended: the VM is here");
        }
        if forwarded.is_some() || routed.is_some() {
            route_del(addr);
        }
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
        let _cluster = self.cluster();
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
        route_replace(addr, via)?;
        tracing::info!(%addr, %via, vm, secs = window.as_secs(), "forwarding a moved VM's address");
        Ok(())
    }

    /// Ends the forward of `addr`, if any (its time is up, or the agent
    /// leaves); the table's route for it, if any, takes over.
    pub fn remove(&self, addr: Ipv4Addr) {
        let cluster = self.cluster();
        let mut items = self.items();
        let Some(f) = items.remove(&addr) else {
            return;
        };
        self.save(&items);
        drop(items);
        match cluster.routes.get(&addr).copied() {
            Some(via) => {
                if let Err(e) = route_replace(addr, via) {
                    tracing::warn!(%addr, %via, error = %e, "could not route a VM address");
                }
            }
            None => route_del(addr),
        }
        tracing::info!(%addr, vm = %f.vm, "forward ended");
    }

    /// Removes every route this agent made (an embedded agent leaving).
    pub fn clear(&self) {
        for addr in self.forwarded() {
            self.remove(addr);
        }
        let mut cluster = self.cluster();
        for addr in std::mem::take(&mut cluster.routes).into_keys() {
            route_del(addr);
        }
        cluster.version = None;
    }

    /// Puts back the routes of forwards still in their window (after a
    /// host restart) and ends those past it.
    pub fn restore(&self) {
        self.expire();
        for (addr, f) in self.forwards() {
            if let Err(e) = route_replace(addr, f.via) {
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
        let f = Routes::open(dir.path());
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
        let again = Routes::open(dir.path());
        assert_eq!(again.forwards(), items);
        assert_eq!(again.addresses(), vec![Ipv4Addr::new(10, 77, 0, 5)]);
    }

    #[test]
    fn an_unreadable_file_means_no_forwards() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("forwards.json"), b"{not json").unwrap();
        assert!(Routes::open(dir.path()).forwards().is_empty());
    }
}
