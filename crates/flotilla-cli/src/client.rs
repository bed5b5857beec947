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
}

impl Client {
    pub fn new(endpoint: &str) -> anyhow::Result<Client> {
        let endpoint = endpoint.trim_end_matches('/').to_string();
        if !endpoint.starts_with("http://") {
            return Err(CliError::new(
                format!("endpoint {endpoint:?} is not supported"),
                Some("use http://HOST:PORT, e.g. http://127.0.0.1:7777".into()),
            )
            .into());
        }
        Ok(Client {
            http: reqwest::Client::builder().build()?,
            endpoint,
        })
    }

    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{}", self.endpoint, path))
    }

    /// Sends the request and checks the status; an error body becomes a [`CliError`].
    pub async fn send(&self, req: RequestBuilder) -> anyhow::Result<Response> {
        let resp = req.send().await.map_err(|e| {
            CliError::new(
                format!(
                    "cannot reach the agent at {}: {}",
                    self.endpoint,
                    root_cause(&e)
                ),
                Some(
                    "start it with `flotilla up`, or point --endpoint / FLOTILLA_ENDPOINT at it"
                        .into(),
                ),
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
                format!("the agent answered {status}: {}", text.trim()),
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
