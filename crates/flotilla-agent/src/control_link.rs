//! The agent's link to a control plane: a heartbeat every few seconds with
//! the host's endpoint, capacity, labels and every VM's state. The first
//! heartbeat registers the host; missing ones mark it down.

use std::collections::BTreeMap;
use std::time::Duration;

use flotilla_api::control::{HostHeartbeat, ReportedVm};

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
    pub interval: Duration,
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
    loop {
        let info = manager.host_info();
        let beat = HostHeartbeat {
            endpoint: link.advertise.clone(),
            agent_token: Some(agent_token.clone()),
            capacity: info.capacity,
            labels: link.labels.clone(),
            vms: manager
                .list()
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
