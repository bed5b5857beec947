//! The agent's API token. Every route but `/healthz` needs
//! `Authorization: Bearer <token>`: the agent starts and stops VMs as root,
//! so nobody who can merely reach its port may drive it.
//!
//! The token lives in `<data-dir>/agent.token` (mode 0600), made at the
//! first start. A local CLI reads it from there; an agent that heartbeats
//! hands it to its control plane over the host-token channel, so the control
//! plane can call back.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use flotilla_api::http::ApiError;
use flotilla_api::{ErrorCode, ErrorDetail};
use sha2::{Digest, Sha256};

use crate::fsutil::sync_dir;

/// The token's file in the data directory.
pub const TOKEN_FILE: &str = "agent.token";

/// The token in `data_dir`, made (random, 0600, written then renamed) when
/// there is none yet.
pub fn load_or_create_token(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join(TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let token = format!("fla_{}", hex::encode(rand::random::<[u8; 24]>()));
    let tmp = data_dir.join(format!(".{TOKEN_FILE}.tmp"));
    let written = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(token.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        sync_dir(data_dir)
    })();
    written.with_context(|| format!("writing {}", path.display()))?;
    tracing::info!(file = %path.display(), "made a new API token");
    Ok(token)
}

/// What the middleware compares against: the token's digest, so the
/// comparison takes the same time however much of a guess matches.
#[derive(Clone)]
pub struct TokenCheck(Arc<[u8; 32]>);

impl TokenCheck {
    pub fn new(token: &str) -> Self {
        TokenCheck(Arc::new(Sha256::digest(token.as_bytes()).into()))
    }

    fn accepts(&self, presented: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        digest == *self.0
    }
}

/// Refuses requests without the agent's token; `/healthz` stays open for
/// probes.
pub async fn require_token(State(check): State<TokenCheck>, req: Request, next: Next) -> Response {
    if req.uri().path() == "/healthz" {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(t) if check.accepts(t) => next.run(req).await,
        Some(_) => unauthenticated("wrong API token for this agent").into_response(),
        None => unauthenticated("missing API token").into_response(),
    }
}

fn unauthenticated(message: &str) -> ApiError {
    ApiError(ErrorDetail {
        code: ErrorCode::Unauthenticated,
        message: message.to_string(),
        hint: Some(format!(
            "send `Authorization: Bearer <token>` with the token in the agent's {TOKEN_FILE} \
             (the CLI reads it from the data directory, or takes --agent-token / FLOTILLA_AGENT_TOKEN)"
        )),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_made_once_private_and_kept() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create_token(dir.path()).unwrap();
        assert!(first.starts_with("fla_") && first.len() == 52);
        assert_eq!(load_or_create_token(dir.path()).unwrap(), first);
        let mode = std::fs::metadata(dir.path().join(TOKEN_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let check = TokenCheck::new(&first);
        assert!(check.accepts(&first));
        assert!(!check.accepts("fla_guess"));
    }
}
