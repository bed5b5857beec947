//! The cluster's VM network: addresses unique across hosts, handed out at
//! placement from the chosen host's VM subnet, and the routes every host
//! needs to reach instances on the others (sent with heartbeat replies).

use std::collections::HashSet;
use std::net::Ipv4Addr;

use flotilla_api::control::{VmRoute, VmRoutes};
use flotilla_api::net::{first_free, Subnet};
use sha2::{Digest, Sha256};

use super::*;

/// The IPv4 address in an agent endpoint (`http://10.0.0.5:7777`): the
/// next hop of routes to its VMs. None for a name or a bad URL.
pub(crate) fn endpoint_address(endpoint: &str) -> Option<Ipv4Addr> {
    let ip: Ipv4Addr = reqwest::Url::parse(endpoint)
        .ok()?
        .host_str()?
        .parse()
        .ok()?;
    // Not a next hop other hosts can use.
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// A version naming the table's contents: equal tables, equal versions,
/// on every replica.
fn table_version(routes: &[VmRoute]) -> String {
    let mut h = Sha256::new();
    for r in routes {
        h.update(format!(
            "{} {} {} {}\n",
            r.ip,
            r.via,
            r.host,
            r.group.as_deref().unwrap_or("")
        ));
    }
    h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// How long a replica answers heartbeats from the route table it read:
/// reading every instance's address for each heartbeat would cost
/// O(instances) per heartbeat; this way it is once a second (and after
/// this replica's own placements and moves), and a heartbeat whose host
/// has the table costs a comparison.
const ROUTES_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// A table this old is read again for a host whose version differs.
const RECHECK_AFTER: std::time::Duration = std::time::Duration::from_millis(100);

/// The cluster's whole route table (every instance address, via its host),
/// as last read from the store.
#[derive(Debug, Default)]
pub(crate) struct RouteTable {
    read_at: Option<std::time::Instant>,
    routes: Arc<Vec<VmRoute>>,
    version: String,
}

impl RouteTable {
    pub(crate) fn mark_stale(&mut self) {
        self.read_at = None;
    }
}

/// The version of `host`'s part of the table with version `full`: equal
/// on every replica, and different per host (each gets the others' routes).
fn host_version(full: &str, host: &str) -> String {
    let mut h = Sha256::new();
    h.update(full.as_bytes());
    h.update(b" ");
    h.update(host.as_bytes());
    h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Every instance address via its host (a host whose endpoint has no IPv4
/// address is left out), sorted, and the table's version.
fn full_table(addresses: Vec<InstanceAddress>) -> (Vec<VmRoute>, String) {
    let mut routes: Vec<VmRoute> = addresses
        .into_iter()
        .filter_map(|a| {
            Some(VmRoute {
                via: endpoint_address(&a.endpoint)?.to_string(),
                ip: a.ip,
                host: a.host,
                group: Some(a.tenant_id),
            })
        })
        .collect();
    routes.sort();
    let version = table_version(&routes);
    (routes, version)
}

/// `host`'s part of a table: the routes to instances on other hosts.
fn part_for(host: &str, routes: &[VmRoute], full_version: &str) -> VmRoutes {
    VmRoutes {
        version: host_version(full_version, host),
        routes: routes.iter().filter(|r| r.host != host).cloned().collect(),
    }
}

/// The routes `host` needs: every instance address on another host, via
/// that host.
#[cfg(test)]
pub(crate) fn routes_for(host: &str, addresses: Vec<InstanceAddress>) -> VmRoutes {
    let (routes, version) = full_table(addresses);
    part_for(host, &routes, &version)
}

impl ControlPlane {
    /// The VM routes for `host`, unless it has this version already.
    pub(super) async fn routes_reply(
        &self,
        host: &str,
        known: Option<&str>,
    ) -> ControlResult<Option<VmRoutes>> {
        let (routes, full_version) = {
            let mut table = self.inner.routes.lock().await;
            // A host whose table differs from this one may have a newer
            // one (from another replica): read again, at most this often,
            // so a host is never sent back an older table.
            let differs = known.is_some_and(|k| k != host_version(&table.version, host));
            let age = table.read_at.map(|t| t.elapsed());
            if age.is_none_or(|a| a > ROUTES_TTL || (differs && a > RECHECK_AFTER)) {
                let (routes, version) = full_table(self.store().instance_addresses().await?);
                *table = RouteTable {
                    read_at: Some(std::time::Instant::now()),
                    routes: Arc::new(routes),
                    version,
                };
            }
            (table.routes.clone(), table.version.clone())
        };
        if known == Some(host_version(&full_version, host).as_str()) {
            return Ok(None);
        }
        Ok(Some(part_for(host, &routes, &full_version)))
    }

    /// Gives each placed instance the first address of its host's VM subnet
    /// that no instance holds (on any host: a VM keeps its address when it
    /// moves). Hosts that reported no subnet leave it to their agent. Two
    /// replicas picking the same address meet at the store's unique index,
    /// and the batch is decided again.
    pub(super) async fn assign_addresses(
        &self,
        placed: &mut [(NewInstance, String)],
    ) -> ControlResult<()> {
        let mut subnets: BTreeMap<String, Option<Subnet>> = BTreeMap::new();
        for (_, host) in placed.iter() {
            if !subnets.contains_key(host) {
                let subnet = self
                    .store()
                    .host_subnet(host)
                    .await?
                    .and_then(|s| s.parse().ok());
                subnets.insert(host.clone(), subnet);
            }
        }
        if subnets.values().all(Option::is_none) {
            return Ok(());
        }
        let mut used: HashSet<Ipv4Addr> = self
            .store()
            .used_addresses()
            .await?
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect();
        for (new, host) in placed.iter_mut() {
            let Some(subnet) = subnets.get(host.as_str()).copied().flatten() else {
                continue;
            };
            let ip = first_free(&subnet, &used).ok_or_else(|| {
                ControlError::new(
                    ErrorCode::InsufficientCapacity,
                    format!("no free address left in host {host}'s VM subnet {subnet}"),
                )
                .with_hint("terminate instances, or give the hosts a larger --subnet")
            })?;
            used.insert(ip);
            new.ip = Some(ip.to_string());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ip: &str, host: &str, endpoint: &str) -> InstanceAddress {
        InstanceAddress {
            ip: ip.into(),
            host: host.into(),
            tenant_id: "t-1".into(),
            endpoint: endpoint.into(),
        }
    }

    #[test]
    fn a_host_gets_routes_to_the_others_only() {
        let all = vec![
            at("10.77.0.3", "h2", "http://198.18.0.3:7777"),
            at("10.77.0.2", "h1", "http://198.18.0.2:7777"),
            at("10.77.0.4", "h3", "http://agent-3.example:7777"),
        ];
        let r = routes_for("h1", all.clone());
        assert_eq!(
            r.routes,
            vec![VmRoute {
                ip: "10.77.0.3".into(),
                via: "198.18.0.3".into(),
                host: "h2".into(),
                group: Some("t-1".into()),
            }]
        );
        // Same contents, same version; another host's table differs.
        assert_eq!(routes_for("h1", all.clone()).version, r.version);
        assert_ne!(routes_for("h2", all).version, r.version);
    }

    #[test]
    fn endpoints_give_their_ipv4_address() {
        assert_eq!(
            endpoint_address("http://10.0.0.5:7777"),
            Some(Ipv4Addr::new(10, 0, 0, 5))
        );
        assert_eq!(endpoint_address("https://host.example:7777"), None);
        assert_eq!(endpoint_address("https://127.0.0.1:7777"), None);
        assert_eq!(endpoint_address("not a url"), None);
    }
}
