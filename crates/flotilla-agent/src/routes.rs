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
//! A forward wins over the table; the table never routes away an address
//! of a VM running here (the table may not know yet that it arrived). The
//! routes are marked with their own protocol number, so a restarted agent
//! finds the ones it made, keeps their addresses from new VMs, and
//! reconciles them with the next table.
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
    /// The VM's network group (tenant).
    #[serde(default)]
    pub group: String,
    /// The new host's address on the network between the hosts.
    pub via: Ipv4Addr,
    /// Seconds since the epoch after which the route goes.
    pub until_unix: u64,
}

/// The routing protocol number marking Flotilla's routes (`ip route ...
/// proto 248`); unassigned in iproute2's table.
const ROUTE_PROTO: &str = "248";

/// The control plane's table as last received.
#[derive(Debug, Default)]
struct ClusterTable {
    version: Option<String>,
    /// Address -> the host it lives on, as sent (an address of a VM here
    /// is left out when routes are made, not here: the VM may leave).
    table: BTreeMap<Ipv4Addr, Ipv4Addr>,
    /// Address -> its VM's network group.
    groups: BTreeMap<Ipv4Addr, String>,
}

/// This host's routes to VM addresses elsewhere: forwards (in memory and
/// in `forwards.json`) and the cluster table, made into kernel routes by
/// [`Routes::reconcile`].
pub struct Routes {
    path: PathBuf,
    items: Mutex<BTreeMap<Ipv4Addr, Forward>>,
    cluster: Mutex<ClusterTable>,
    /// Addresses of the VMs running here, as last told.
    local: Mutex<HashSet<Ipv4Addr>>,
    /// The kernel's routes as this agent (or an earlier one) made them;
    /// held while routes are changed, one change at a time. Data locks
    /// (`cluster`, `items`, `local`) are only taken briefly, after it.
    applied: Mutex<BTreeMap<Ipv4Addr, Ipv4Addr>>,
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
    let rows: Vec<Row> = serde_json::from_str(out.trim()).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "unreadable route list from `ip -j`");
        Vec::new()
    });
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
    /// treated as none, with a warning) and the routes it made.
    pub fn open(data_dir: &Path) -> Routes {
        let path = data_dir.join("forwards.json");
        let items = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(file = %path.display(), error = %e, "unreadable forwards; ignored");
                BTreeMap::new()
            }),
            Err(_) => BTreeMap::new(),
        };
        // Routes an earlier agent made stay (as the table, until one
        // arrives: the control plane may be out of reach), and their
        // addresses are not given to new VMs.
        let applied = kernel_routes().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "could not list the routes an earlier agent made");
            BTreeMap::new()
        });
        let inherited = ClusterTable {
            version: None,
            table: applied
                .iter()
                .filter(|(addr, _)| !items.contains_key(*addr))
                .map(|(a, v)| (*a, *v))
                .collect(),
            groups: BTreeMap::new(),
        };
        Routes {
            path,
            items: Mutex::new(items),
            cluster: Mutex::new(inherited),
            local: Mutex::new(HashSet::new()),
            applied: Mutex::new(applied),
        }
    }

    fn items(&self) -> std::sync::MutexGuard<'_, BTreeMap<Ipv4Addr, Forward>> {
        self.items.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cluster(&self) -> std::sync::MutexGuard<'_, ClusterTable> {
        self.cluster.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn local(&self) -> std::sync::MutexGuard<'_, HashSet<Ipv4Addr>> {
        self.local.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn applied(&self) -> std::sync::MutexGuard<'_, BTreeMap<Ipv4Addr, Ipv4Addr>> {
        self.applied.lock().unwrap_or_else(|p| p.into_inner())
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

    /// Addresses routed away, or that the table places elsewhere (the
    /// routes an earlier agent made included): not to be given to new VMs
    /// here.
    pub fn addresses(&self) -> Vec<Ipv4Addr> {
        let mut all: Vec<Ipv4Addr> = self.items().keys().copied().collect();
        all.extend(self.cluster().table.keys().copied());
        all
    }

    /// The network group of every address routed away.
    pub fn groups(&self) -> BTreeMap<Ipv4Addr, String> {
        let mut groups = self.cluster().groups.clone();
        for (addr, f) in self.items().iter() {
            // A forward an older agent wrote has no group: the table's holds.
            if !f.group.is_empty() || !groups.contains_key(addr) {
                groups.insert(*addr, f.group.clone());
            }
        }
        groups
    }

    /// The version of the cluster table received last.
    pub fn cluster_version(&self) -> Option<String> {
        self.cluster().version.clone()
    }

    /// Takes the control plane's table `version` (every instance elsewhere,
    /// with its group); [`Routes::reconcile`] makes the routes.
    pub fn set_cluster(
        &self,
        version: String,
        table: BTreeMap<Ipv4Addr, Ipv4Addr>,
        groups: BTreeMap<Ipv4Addr, String>,
    ) {
        let mut cluster = self.cluster();
        cluster.version = Some(version);
        cluster.groups = groups;
        cluster.table = table;
    }

    /// Makes the kernel's routes what the forwards and the table want, with
    /// `local` the addresses of the VMs running here (never routed away
    /// unless forwarded: the table may not know yet that one arrived, or
    /// left). Routes that could not be made are tried again next time.
    pub fn reconcile(&self, local: &HashSet<Ipv4Addr>) {
        *self.local() = local.clone();
        self.apply();
    }

    /// [`Routes::reconcile`] with the VMs last told.
    fn apply(&self) {
        let mut applied = self.applied();
        let wanted: BTreeMap<Ipv4Addr, Ipv4Addr> = {
            let cluster = self.cluster();
            let local = self.local();
            let mut wanted: BTreeMap<Ipv4Addr, Ipv4Addr> = cluster
                .table
                .iter()
                .filter(|(addr, _)| !local.contains(addr))
                .map(|(a, v)| (*a, *v))
                .collect();
            for (addr, f) in self.items().iter() {
                wanted.insert(*addr, f.via);
            }
            wanted
        };
        let every: std::collections::BTreeSet<Ipv4Addr> =
            applied.keys().chain(wanted.keys()).copied().collect();
        for addr in every {
            match (applied.get(&addr).copied(), wanted.get(&addr).copied()) {
                (had, Some(via)) if had != Some(via) => match route_replace(addr, via) {
                    Ok(()) => {
                        applied.insert(addr, via);
                    }
                    // The old route (if any) stays as it was; tried again
                    // next time.
                    Err(e) => {
                        tracing::warn!(%addr, %via, error = %e, "could not route a VM address");
                    }
                },
                (Some(_), None) => {
                    route_del(addr);
                    applied.remove(&addr);
                }
                _ => {}
            }
        }
    }

    /// A VM with `addr` runs here now (it came back, or arrived): its
    /// forward ends and no route takes its address away.
    pub fn arrived(&self, addr: Ipv4Addr) {
        {
            let mut items = self.items();
            if let Some(f) = items.remove(&addr) {
                self.save(&items);
                tracing::info!(%addr, vm = %f.vm, "forward ended: the VM is here");
            }
        }
        self.local().insert(addr);
        self.apply();
    }

    /// Routes `addr` (VM `vm`'s, of network `group`) to `via` for `window`
    /// (a new window if it was forwarded already).
    pub fn add(
        &self,
        addr: Ipv4Addr,
        vm: &str,
        group: &str,
        via: Ipv4Addr,
        window: Duration,
    ) -> Result<(), NetworkError> {
        // Recorded first: a route made just before a crash is still found
        // (and ended) by the next agent.
        {
            let mut items = self.items();
            items.insert(
                addr,
                Forward {
                    vm: vm.to_string(),
                    group: group.to_string(),
                    via,
                    until_unix: now_unix() + window.as_secs(),
                },
            );
            self.save(&items);
        }
        self.apply();
        if self.applied().get(&addr) != Some(&via) {
            return Err(NetworkError::Command {
                args: format!("route replace {addr}/32 via {via}"),
                stderr: "the route could not be made (see the warning above)".into(),
            });
        }
        tracing::info!(%addr, %via, vm, secs = window.as_secs(), "forwarding a moved VM's address");
        Ok(())
    }

    /// Ends every forward whose window is over (checked under the lock, so
    /// one renewed meanwhile stays); the table's routes take over.
    pub fn expire(&self) {
        let now = now_unix();
        let ended: Vec<(Ipv4Addr, Forward)> = {
            let mut items = self.items();
            let over: Vec<Ipv4Addr> = items
                .iter()
                .filter(|(_, f)| f.until_unix <= now)
                .map(|(a, _)| *a)
                .collect();
            let ended: Vec<_> = over
                .into_iter()
                .filter_map(|a| items.remove(&a).map(|f| (a, f)))
                .collect();
            if !ended.is_empty() {
                self.save(&items);
            }
            ended
        };
        if ended.is_empty() {
            return;
        }
        self.apply();
        for (addr, f) in ended {
            tracing::info!(%addr, vm = %f.vm, "forward ended");
        }
    }

    /// Removes every route and forward (an embedded agent leaving).
    pub fn clear(&self) {
        {
            let mut items = self.items();
            items.clear();
            self.save(&items);
        }
        *self.cluster() = ClusterTable::default();
        self.apply();
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
                group: "t-1".into(),
                via: Ipv4Addr::new(192, 0, 2, 7),
                until_unix: now_unix() + 60,
            },
        );
        f.save(&items);
        let again = Routes::open(dir.path());
        assert_eq!(again.forwards(), items);
        assert!(again.addresses().contains(&Ipv4Addr::new(10, 77, 0, 5)));
    }

    #[test]
    fn an_unreadable_file_means_no_forwards() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("forwards.json"), b"{not json").unwrap();
        assert!(Routes::open(dir.path()).forwards().is_empty());
    }
}
