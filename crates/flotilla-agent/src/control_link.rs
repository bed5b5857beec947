//! The agent's link to a control plane: a heartbeat every few seconds with
//! the host's endpoint, capacity, labels, VM subnet and every VM's state.
//! The first heartbeat registers the host; missing ones mark it down. The
//! reply carries the cluster's VM routes when they changed, which the agent
//! applies (see [`crate::routes`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use flotilla_api::control::{HeartbeatReply, HostHeartbeat, ReportedVm, VmRoutes};

use crate::VmManager;

#[derive(Debug, Clone)]
pub struct ControlLink {
    /// The control plane's base URL, e.g. `http://10.0.0.1:7700`.
    pub url: String,
    /// An admin token of the control plane.
    pub token: String,
    /// This host's name in the registry.
    pub host_name: String,
    /// Where the control plane reaches this agent's API.
    pub advertise: String,
    pub labels: BTreeMap<String, String>,
    /// Traits the operator gives this host (`gpu`, `ssd`, ...), on top of
    /// those the agent finds (see [`found_traits`]).
    pub traits: BTreeSet<String>,
    pub interval: Duration,
}

/// CPU flags placement can ask for, as `cpu-FLAG` traits.
const CPU_TRAITS: &[&str] = &["avx2", "avx512f", "aes", "sha_ni"];

/// What the agent finds this host is or can do: its accelerator (`kvm` or
/// `tcg`), some CPU features (`cpu-avx2`, ...), and `network-isolation`
/// when VMs of different tenants are kept apart.
pub fn found_traits(manager: &VmManager, cpuinfo: &str) -> BTreeSet<String> {
    let mut traits = BTreeSet::from([manager.inner.accel.accel.to_string()]);
    let flags: BTreeSet<&str> = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, f)| f.split_whitespace().collect())
        .unwrap_or_default();
    for flag in CPU_TRAITS.iter().filter(|f| flags.contains(*f)) {
        traits.insert(format!("cpu-{}", flag.replace('_', "-")));
    }
    if manager.inner.isolation.available() {
        traits.insert("network-isolation".into());
    }
    traits
}

/// Sends heartbeats until the task is dropped. Failures are logged and
/// retried at the next beat: the agent never depends on the control plane.
pub async fn heartbeat_loop(manager: VmManager, link: ControlLink, agent_token: String) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_default();
    let url = format!(
        "{}/v1/hosts/{}/heartbeat",
        link.url.trim_end_matches('/'),
        link.host_name
    );
    let mut failing = false;
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    loop {
        let info = manager.host_info();
        let mut traits = found_traits(&manager, &cpuinfo);
        traits.extend(link.traits.iter().cloned());
        let vms = manager.list();
        let beat = HostHeartbeat {
            vm_subnet: Some(manager.inner.config.subnet.to_string()),
            routes_version: manager.inner.routes.cluster_version(),
            endpoint: link.advertise.clone(),
            agent_token: Some(agent_token.clone()),
            tls_fingerprint: manager.inner.config.tls_fingerprint.clone(),
            capacity: info.capacity,
            disk: info.disk,
            traits,
            labels: link.labels.clone(),
            vms: vms
                .into_iter()
                .map(|vm| ReportedVm {
                    ip: vm.nics.first().map(|n| n.ip.clone()),
                    name: vm.name,
                    state: vm.state,
                })
                .collect(),
        };
        let sent = http
            .post(&url)
            .bearer_auth(&link.token)
            .json(&beat)
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => {
                if failing {
                    tracing::info!(control = %link.url, "heartbeats reach the control plane again");
                }
                failing = false;
                // An older control plane answers 204 without a body.
                let reply: HeartbeatReply = r.json().await.unwrap_or_default();
                if let Some(routes) = reply.routes {
                    let manager = manager.clone();
                    let applied = tokio::task::spawn_blocking(move || {
                        apply_routes(&manager, routes);
                    })
                    .await;
                    if let Err(e) = applied {
                        tracing::warn!(error = %e, "applying VM routes failed");
                    }
                }
            }
            Ok(r) => {
                let status = r.status();
                let body = r.text().await.unwrap_or_default();
                tracing::warn!(control = %link.url, %status, body, "heartbeat refused");
                failing = true;
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(control = %link.url, error = %e, "heartbeat failed");
                }
                failing = true;
            }
        }
        tokio::time::sleep(link.interval).await;
    }
}

/// Takes the control plane's VM routes (entries that do not parse are
/// skipped with a warning: one bad row must not cut the rest off) and
/// brings the host's routes and filter up to date.
fn apply_routes(manager: &VmManager, routes: VmRoutes) {
    let mut table = BTreeMap::new();
    let mut groups = BTreeMap::new();
    for r in &routes.routes {
        match (r.ip.parse::<Ipv4Addr>(), r.via.parse::<Ipv4Addr>()) {
            (Ok(ip), Ok(via)) => {
                table.insert(ip, via);
                groups.insert(ip, r.group.clone().unwrap_or_default());
            }
            _ => tracing::warn!(ip = %r.ip, via = %r.via, host = %r.host, "unusable VM route"),
        }
    }
    manager
        .inner
        .routes
        .set_cluster(routes.version, table, groups);
    manager.sync_network();
}
