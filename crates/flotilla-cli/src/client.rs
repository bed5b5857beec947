//! A small client for the agent's HTTP API that turns every failure into one
//! clear line plus a hint.

use std::fmt;

use flotilla_api::ErrorBody;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// An error to show the user as is.
#[derive(Debug)]
pub struct CliError {
    /// The API's error code (`not_found`, `conflict`, ...) when the agent sent one.
    pub code: Option<String>,
    pub message: String,
    pub hint: Option<String>,
}

impl CliError {
    pub fn new(message: impl Into<String>, hint: Option<String>) -> Self {
        CliError {
            code: None,
            message: message.into(),
            hint,
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CliError {}

pub struct Client {
    http: reqwest::Client,
    endpoint: String,
    /// Bearer token: the control plane's, or the agent's.
    token: Option<String>,
    /// What answers at `endpoint`, for messages.
    server: &'static str,
}

impl Client {
    /// A client of `endpoint`; an `https://` one trusts only the
    /// certificate with `fingerprint`.
    pub fn new(endpoint: &str, fingerprint: Option<&str>) -> anyhow::Result<Client> {
        Self::of("agent", endpoint, fingerprint)
    }

    fn of(
        server: &'static str,
        endpoint: &str,
        fingerprint: Option<&str>,
    ) -> anyhow::Result<Client> {
        let endpoint = endpoint.trim_end_matches('/').to_string();
        let mut builder = reqwest::Client::builder();
        if endpoint.starts_with("https://") {
            let Some(fingerprint) = fingerprint else {
                if server != "agent" {
                    return Err(CliError::new(
                        format!("{endpoint}: the control plane serves plain HTTP"),
                        Some("use http://HOST:PORT".into()),
                    )
                    .into());
                }
                return Err(CliError::new(
                    format!("no certificate fingerprint to trust {endpoint} by"),
                    Some("pass --agent-fingerprint or set FLOTILLA_AGENT_FINGERPRINT (`flotilla host` on the agent's machine shows it; a local agent's is read from its data directory, FLOTILLA_DATA_DIR)".into()),
                )
                .into());
            };
            let tls = flotilla_tls::pinned_client_config(fingerprint).map_err(|e| {
                CliError::new(
                    e.to_string(),
                    Some("`flotilla host` on the agent's machine shows its fingerprint".into()),
                )
            })?;
            builder = builder.use_preconfigured_tls(tls);
        } else if !endpoint.starts_with("http://") {
            return Err(CliError::new(
                format!("endpoint {endpoint:?} is not supported"),
                Some("use https://HOST:PORT (or http:// for a server on plain HTTP), e.g. https://127.0.0.1:7777".into()),
            )
            .into());
        }
        Ok(Client {
            http: builder.build()?,
            endpoint,
            token: None,
            server,
        })
    }

    /// A client of the agent at `endpoint`, sending its API token if known
    /// (without one the agent's 401 says where to find it).
    pub fn agent(
        endpoint: &str,
        token: Option<String>,
        fingerprint: Option<&str>,
    ) -> anyhow::Result<Client> {
        let mut c = Client::new(endpoint, fingerprint)?;
        c.token = token;
        Ok(c)
    }

    /// A client of the control plane at `endpoint`, sending `token`.
    pub fn control(endpoint: &str, token: Option<&str>) -> anyhow::Result<Client> {
        let mut c = Client::of("control plane", endpoint, None)?;
        c.token = Some(token.map(str::to_string).ok_or_else(|| {
            CliError::new(
                "no API token for the control plane",
                Some("pass --token or set FLOTILLA_TOKEN (`flotilla up` writes its default tenant's token to <data-dir>/control/default.token, used when neither is given)".into()),
            )
        })?);
        Ok(c)
    }

    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let r = self
            .http
            .request(method, format!("{}{}", self.endpoint, path));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    /// Sends the request and checks the status; an error body becomes a [`CliError`].
    pub async fn send(&self, req: RequestBuilder) -> anyhow::Result<Response> {
        let resp = req.send().await.map_err(|e| {
            let cause = root_cause(&e);
            if cause.contains("invalid peer certificate") {
                return CliError::new(
                    format!(
                        "the {} at {} is not the one trusted: its certificate is not the one with the fingerprint given ({cause})",
                        self.server, self.endpoint
                    ),
                    Some("check --agent-fingerprint / FLOTILLA_AGENT_FINGERPRINT against `flotilla host` on the agent's machine (an agent with a new data directory has a new certificate)".into()),
                );
            }
            let hint = match self.server {
                "agent" if self.endpoint.starts_with("http://") => "start it with `flotilla up`, or point --endpoint / FLOTILLA_ENDPOINT at it (agents serve HTTPS unless started with --plain-http: https://HOST:PORT)",
                "agent" => "start it with `flotilla up`, or point --endpoint / FLOTILLA_ENDPOINT at it",
                _ => "start it with `flotilla control`, or point --control-url / FLOTILLA_CONTROL_URL at it",
            };
            CliError::new(
                format!(
                    "cannot reach the {} at {}: {}",
                    self.server,
                    self.endpoint,
                    root_cause(&e)
                ),
                Some(hint.into()),
            )
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        Err(match serde_json::from_str::<ErrorBody>(&text) {
            Ok(body) => CliError {
                code: serde_json::to_value(body.error.code)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string)),
                message: body.error.message,
                hint: body.error.hint,
            },
            Err(_) => CliError::new(
                format!("the {} answered {status}: {}", self.server, text.trim()),
                None,
            ),
        }
        .into())
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let resp = self.send(self.request(Method::GET, path)).await?;
        Ok(resp.json().await?)
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        let resp = self
            .send(self.request(Method::POST, path).json(body))
            .await?;
        Ok(resp.json().await?)
    }

    pub async fn patch<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        let resp = self
            .send(self.request(Method::PATCH, path).json(body))
            .await?;
        Ok(resp.json().await?)
    }

    pub async fn delete(&self, path: &str) -> anyhow::Result<()> {
        let resp = self.send(self.request(Method::DELETE, path)).await?;
        debug_assert!(resp.status() == StatusCode::NO_CONTENT || resp.status().is_success());
        Ok(())
    }
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur: &(dyn std::error::Error + 'static) = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}
