//! Calls to host agents' APIs. Every call the workflows make is idempotent
//! on the agent's side or checked first, so a step can be repeated after a
//! crash.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_api::{CreateVmRequest, ErrorBody, VmInfo};
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum AgentCallError {
    #[error("host agent at {endpoint} unreachable: {reason}")]
    Unreachable { endpoint: String, reason: String },
    #[error("host agent answered {status}: {message}")]
    Api {
        status: u16,
        code: Option<flotilla_api::ErrorCode>,
        message: String,
    },
}

impl AgentCallError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, AgentCallError::Api { status: 404, .. })
    }

    /// The agent's error code, if it answered with its error body.
    pub fn code(&self) -> Option<flotilla_api::ErrorCode> {
        match self {
            AgentCallError::Api { code, .. } => *code,
            AgentCallError::Unreachable { .. } => None,
        }
    }

    pub fn is_conflict(&self) -> bool {
        matches!(self, AgentCallError::Api { status: 409, .. })
    }

    /// The agent answered and said no for a reason of its own (4xx, with
    /// its error body: a proxy's or another server's 4xx is not an agent's
    /// answer), other than the thing existing already: another host may
    /// well say yes.
    pub fn is_refusal(&self) -> bool {
        matches!(self, AgentCallError::Api { status, code: Some(_), .. } if (400..500).contains(status))
            && !self.is_already_exists()
    }

    /// A create refused because the thing exists (not for another conflict,
    /// such as an address taken).
    pub fn is_already_exists(&self) -> bool {
        matches!(
            self,
            AgentCallError::Api {
                code: Some(flotilla_api::ErrorCode::AlreadyExists),
                ..
            }
        )
    }
}

/// Where an agent answers, the API token it asks for and its certificate's
/// fingerprint (from its heartbeats; none from an agent that sent none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentAddr {
    pub endpoint: String,
    pub token: Option<String>,
    pub fingerprint: Option<String>,
}

impl From<&crate::store::HostRow> for AgentAddr {
    fn from(host: &crate::store::HostRow) -> Self {
        AgentAddr {
            endpoint: host.endpoint.clone(),
            token: host.agent_token.clone(),
            fingerprint: host.tls_fingerprint.clone(),
        }
    }
}

impl AgentAddr {
    fn authorize(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => request.bearer_auth(t),
            None => request,
        }
    }
}

#[derive(Debug, Clone)]
pub struct AgentClient {
    plain: reqwest::Client,
    /// A client per pinned certificate (an agent serving HTTPS).
    pinned: Arc<Mutex<HashMap<String, reqwest::Client>>>,
}

fn client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(180))
        .connect_timeout(Duration::from_secs(5))
}

impl Default for AgentClient {
    fn default() -> Self {
        AgentClient {
            plain: client_builder().build().unwrap_or_default(),
            pinned: Default::default(),
        }
    }
}

impl AgentClient {
    /// The client for `agent`: one that trusts only its certificate when it
    /// gave a fingerprint (a client with no trusted certificate at all if
    /// that fails, so a call fails rather than trusting anyone).
    fn http(&self, agent: &AgentAddr) -> reqwest::Client {
        let Some(fingerprint) = &agent.fingerprint else {
            return self.plain.clone();
        };
        let mut pinned = self.pinned.lock().unwrap_or_else(|p| p.into_inner());
        pinned
            .entry(fingerprint.clone())
            .or_insert_with(|| {
                let builder = match flotilla_tls::pinned_client_config(fingerprint) {
                    Ok(tls) => client_builder().use_preconfigured_tls(tls),
                    Err(e) => {
                        tracing::warn!(endpoint = %agent.endpoint, error = %e, "unusable agent fingerprint");
                        client_builder()
                    }
                };
                builder.build().unwrap_or_default()
            })
            .clone()
    }

    async fn call<T: DeserializeOwned>(
        &self,
        agent: &AgentAddr,
        request: reqwest::RequestBuilder,
    ) -> Result<T, AgentCallError> {
        let unreachable = |e: reqwest::Error| AgentCallError::Unreachable {
            endpoint: agent.endpoint.clone(),
            reason: e.to_string(),
        };
        let response = agent.authorize(request).send().await.map_err(unreachable)?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await.map_err(unreachable)?;
        if (200..300).contains(&status) {
            // 204 and other empty answers read as JSON null.
            let body: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
            return serde_json::from_slice(body).map_err(|e| AgentCallError::Api {
                status,
                code: None,
                message: format!("unreadable answer: {e}"),
            });
        }
        let (code, message) = match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => (Some(body.error.code), body.error.message),
            Err(_) => (None, String::from_utf8_lossy(&bytes).into_owned()),
        };
        Err(AgentCallError::Api {
            status,
            code,
            message,
        })
    }

    pub async fn create_vm(
        &self,
        agent: &AgentAddr,
        request: &CreateVmRequest,
    ) -> Result<VmInfo, AgentCallError> {
        let url = format!("{}/v1/vms", agent.endpoint);
        self.call(agent, self.http(agent).post(url).json(request))
            .await
    }

    pub async fn vm(&self, agent: &AgentAddr, name: &str) -> Result<VmInfo, AgentCallError> {
        let url = format!("{}/v1/vms/{name}", agent.endpoint);
        self.call(agent, self.http(agent).get(url)).await
    }

    /// Removes the VM, stopping it first; a VM already gone is fine.
    pub async fn delete_vm(&self, agent: &AgentAddr, name: &str) -> Result<(), AgentCallError> {
        let url = format!("{}/v1/vms/{name}?force=true", agent.endpoint);
        self.delete_if_there(agent, url).await
    }

    /// A DELETE for which "not found" means done.
    async fn delete_if_there(&self, agent: &AgentAddr, url: String) -> Result<(), AgentCallError> {
        match self
            .call::<serde_json::Value>(agent, self.http(agent).delete(url))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `start`, `stop`, `suspend` (`suspend?warm=true`) or `resume` on the VM.
    pub async fn vm_action(
        &self,
        agent: &AgentAddr,
        name: &str,
        action: &str,
    ) -> Result<VmInfo, AgentCallError> {
        let url = format!("{}/v1/vms/{name}/{action}", agent.endpoint);
        let request = match action {
            "stop" => self.http(agent).post(url).json(&serde_json::json!({})),
            _ => self.http(agent).post(url),
        };
        self.call(agent, request).await
    }

    /// Takes a named snapshot of a VM (running: paused briefly; or suspended).
    pub async fn create_snapshot(
        &self,
        agent: &AgentAddr,
        request: &flotilla_api::CreateSnapshotRequest,
    ) -> Result<flotilla_api::SnapshotCreated, AgentCallError> {
        let url = format!("{}/v1/snapshots", agent.endpoint);
        self.call(agent, self.http(agent).post(url).json(request))
            .await
    }

    pub async fn snapshot(
        &self,
        agent: &AgentAddr,
        name: &str,
    ) -> Result<flotilla_api::SnapshotInfo, AgentCallError> {
        let url = format!("{}/v1/snapshots/{name}", agent.endpoint);
        self.call(agent, self.http(agent).get(url)).await
    }

    /// Removes a named snapshot; one already gone is fine.
    pub async fn delete_snapshot(
        &self,
        agent: &AgentAddr,
        name: &str,
    ) -> Result<(), AgentCallError> {
        let url = format!("{}/v1/snapshots/{name}", agent.endpoint);
        self.delete_if_there(agent, url).await
    }

    pub async fn create_volume(
        &self,
        agent: &AgentAddr,
        request: &flotilla_api::CreateVolumeRequest,
    ) -> Result<flotilla_api::VolumeInfo, AgentCallError> {
        let url = format!("{}/v1/volumes", agent.endpoint);
        self.call(agent, self.http(agent).post(url).json(request))
            .await
    }

    pub async fn volume(
        &self,
        agent: &AgentAddr,
        name: &str,
    ) -> Result<flotilla_api::VolumeInfo, AgentCallError> {
        let url = format!("{}/v1/volumes/{name}", agent.endpoint);
        self.call(agent, self.http(agent).get(url)).await
    }

    /// Removes a volume; one already gone is fine.
    pub async fn delete_volume(&self, agent: &AgentAddr, name: &str) -> Result<(), AgentCallError> {
        let url = format!("{}/v1/volumes/{name}", agent.endpoint);
        self.delete_if_there(agent, url).await
    }

    /// Clones VM `source` into a new VM `request.name` on the same host.
    pub async fn clone_vm(
        &self,
        agent: &AgentAddr,
        source: &str,
        request: &flotilla_api::CloneVmRequest,
    ) -> Result<flotilla_api::CloneResult, AgentCallError> {
        let url = format!("{}/v1/vms/{source}/clone", agent.endpoint);
        self.call(agent, self.http(agent).post(url).json(request))
            .await
    }

    /// Live-migrates VM `name` from `source` to `target` and waits for the
    /// end (the answer tells whether it moved).
    pub async fn migrate_vm(
        &self,
        source: &AgentAddr,
        name: &str,
        target: &AgentAddr,
        options: &flotilla_api::migration::MigrationOptions,
    ) -> Result<flotilla_api::migration::MigrationInfo, AgentCallError> {
        let url = format!("{}/v1/vms/{name}/migrate?wait=true", source.endpoint);
        let request = flotilla_api::migration::MigrateVmRequest::new(
            target.endpoint.clone(),
            target.token.clone(),
            target.fingerprint.clone(),
            options.clone(),
        );
        // As long as a large VM may take to move.
        let call = self
            .http(source)
            .post(url)
            .timeout(Duration::from_secs(3600))
            .json(&request);
        self.call(source, call).await
    }

    /// The migrations an agent knows of.
    pub async fn migrations(
        &self,
        agent: &AgentAddr,
    ) -> Result<Vec<flotilla_api::migration::MigrationInfo>, AgentCallError> {
        let url = format!("{}/v1/migrations", agent.endpoint);
        self.call(agent, self.http(agent).get(url)).await
    }

    /// Sends an exec to the VM and hands back the agent's answer as is
    /// (collected JSON, or the NDJSON stream with `stream`), errors included.
    pub async fn exec_raw(
        &self,
        agent: &AgentAddr,
        name: &str,
        request: &flotilla_api::ExecRequest,
        stream: bool,
    ) -> Result<reqwest::Response, AgentCallError> {
        let url = format!("{}/v1/vms/{name}/exec?stream={stream}", agent.endpoint);
        // As long as the command may run, and a minute more; an hour when
        // it sets no limit.
        let limit = Duration::from_millis(request.timeout_ms.unwrap_or(3_600_000))
            + Duration::from_secs(60);
        agent
            .authorize(self.http(agent).post(url))
            .timeout(limit)
            .json(request)
            .send()
            .await
            .map_err(|e| AgentCallError::Unreachable {
                endpoint: agent.endpoint.clone(),
                reason: e.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(status: u16, code: Option<flotilla_api::ErrorCode>) -> AgentCallError {
        AgentCallError::Api {
            status,
            code,
            message: String::new(),
        }
    }

    #[test]
    fn only_an_agents_own_4xx_is_a_refusal() {
        use flotilla_api::ErrorCode;
        assert!(api(404, Some(ErrorCode::NotFound)).is_refusal());
        assert!(api(409, Some(ErrorCode::Conflict)).is_refusal());
        // A proxy's or another server's answer says nothing of the agent.
        assert!(!api(404, None).is_refusal());
        assert!(!api(409, Some(ErrorCode::AlreadyExists)).is_refusal());
        assert!(!api(500, Some(ErrorCode::Internal)).is_refusal());
        let unreachable = AgentCallError::Unreachable {
            endpoint: "https://h1:7777".into(),
            reason: "refused".into(),
        };
        assert!(!unreachable.is_refusal());
    }
}
