//! Running a control plane replica: the store, a bootstrap admin token, the
//! background checks (hosts that missed heartbeats, operations whose driver
//! died) and the HTTP server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use crate::auth::new_secret;
use crate::service::{ControlPlane, ControlSettings};
use crate::store::{Dialect, Store};

#[derive(Debug, Clone)]
pub struct ControlConfig {
    pub listen: SocketAddr,
    /// `sqlite://PATH` or `postgres://...`.
    pub database: String,
    /// Where the bootstrap admin token is written when none is given.
    pub data_dir: PathBuf,
    /// An admin token to accept (created if missing).
    pub admin_token: Option<String>,
    /// A tenant to create at start if missing, with a token of it written
    /// to `<data_dir>/<tenant>.token` (the embedded single-host default).
    pub default_tenant: Option<String>,
    /// A host to make a host token for at start, written to
    /// `<data_dir>/host-<name>.token` (for the embedded local agent).
    pub local_host: Option<String>,
    pub settings: ControlSettings,
}

/// How often hosts and orphaned operations are checked.
const CHECK_EVERY: Duration = Duration::from_secs(2);
/// How often snapshots left `creating` are looked at.
const SETTLE_EVERY: Duration = Duration::from_secs(5);

/// The store's planner statistics are refreshed every this many checks
/// (10 minutes).
const ANALYZE_EVERY_ROUNDS: u64 = 300;

/// The file the generated admin token is written to.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

pub async fn run_control(config: ControlConfig) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating {}", config.data_dir.display()))?;
    let store = Store::open(&config.database)
        .await
        .with_context(|| format!("opening the state store {}", redact(&config.database)))?;
    let dialect = store.dialect();
    let cp = ControlPlane::new(store, config.settings.clone());
    bootstrap_admin(&cp, &config).await?;
    if let Some(tenant) = &config.default_tenant {
        bootstrap_tenant(&cp, &config, tenant).await?;
    }
    if let Some(host) = &config.local_host {
        bootstrap_host_token(&cp, &config, host).await?;
    }

    // A SQLite store has one owner (this process): what was running when it
    // last stopped is ours to resume at once. Replicas on PostgreSQL wait
    // for the dead driver's lease to run out.
    let resumed = cp.adopt_operations(dialect == Dialect::Sqlite).await?;
    if resumed > 0 {
        tracing::info!(resumed, "resumed operations left running");
    }
    let background = cp.clone();
    tokio::spawn(async move {
        for round in 1u64.. {
            tokio::time::sleep(CHECK_EVERY).await;
            if round % ANALYZE_EVERY_ROUNDS == 0 {
                if let Err(e) = background.store().analyze().await {
                    tracing::warn!(error = %e, "refreshing the store's statistics");
                }
            }
            if let Err(e) = background.check_hosts().await {
                tracing::warn!(error = %e, "checking hosts");
            }
            if let Err(e) = background.adopt_operations(false).await {
                tracing::warn!(error = %e, "taking over orphaned operations");
            }
        }
    });
    // Apart: it calls agents, which may be slow to answer, and must not
    // hold up marking hosts down.
    let settling = cp.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(SETTLE_EVERY).await;
            if let Err(e) = settling.settle_snapshots().await {
                tracing::warn!(error = %e, "settling snapshots");
            }
            if let Err(e) = settling.settle_volumes().await {
                tracing::warn!(error = %e, "settling volumes");
            }
        }
    });

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    tracing::info!(addr = %config.listen, store = %redact(&config.database), "control plane serving");
    axum::serve(listener, crate::http::router(cp))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("serving the API")?;
    Ok(())
}

async fn bootstrap_admin(cp: &ControlPlane, config: &ControlConfig) -> anyhow::Result<()> {
    if let Some(token) = &config.admin_token {
        cp.ensure_admin_token(token).await?;
        return Ok(());
    }
    if cp.has_admin_token().await? {
        return Ok(());
    }
    let secret = new_secret();
    cp.ensure_admin_token(&secret).await?;
    let path = config.data_dir.join(ADMIN_TOKEN_FILE);
    write_private(&path, &secret).with_context(|| format!("writing {}", path.display()))?;
    tracing::info!(path = %path.display(), "created the first admin token");
    Ok(())
}

async fn bootstrap_tenant(
    cp: &ControlPlane,
    config: &ControlConfig,
    name: &str,
) -> anyhow::Result<()> {
    if cp.store().tenant_by_name(name).await?.is_none() {
        cp.store()
            .create_tenant(&crate::store::new_id("t"), name)
            .await?;
    }
    let path = tenant_token_file(&config.data_dir, name);
    let request = flotilla_api::control::CreateTokenRequest {
        tenant: Some(name.to_string()),
        admin: false,
        host: None,
        description: Some("default tenant".into()),
    };
    if ensure_token_file(cp, &path, |_| true, &request).await? {
        tracing::info!(tenant = name, path = %path.display(), "wrote the default tenant's token");
    }
    Ok(())
}

async fn bootstrap_host_token(
    cp: &ControlPlane,
    config: &ControlConfig,
    host: &str,
) -> anyhow::Result<()> {
    let request = flotilla_api::control::CreateTokenRequest {
        tenant: None,
        admin: false,
        host: Some(host.to_string()),
        description: Some("local agent".into()),
    };
    let path = host_token_file(&config.data_dir, host);
    ensure_token_file(cp, &path, |c| c.host.as_deref() == Some(host), &request).await?;
    Ok(())
}

/// Keeps a working token in `path`: the one there if it still
/// authenticates as a caller `fits` accepts, else a new one made by the
/// bootstrap admin from `request`. Returns whether it made one.
async fn ensure_token_file(
    cp: &ControlPlane,
    path: &std::path::Path,
    fits: impl Fn(&crate::auth::Caller) -> bool,
    request: &flotilla_api::control::CreateTokenRequest,
) -> anyhow::Result<bool> {
    if let Ok(secret) = std::fs::read_to_string(path) {
        if cp.authenticate(secret.trim()).await.is_ok_and(|c| fits(&c)) {
            return Ok(false);
        }
    }
    let admin = crate::auth::Caller {
        token_id: "bootstrap".into(),
        tenant_id: None,
        admin: true,
        host: None,
    };
    let (_, _, secret) = cp.create_token(&admin, request).await?;
    write_private(path, &secret).with_context(|| format!("writing {}", path.display()))?;
    Ok(true)
}

/// The file holding the host token of a host made at start.
pub fn host_token_file(data_dir: &std::path::Path, host: &str) -> PathBuf {
    data_dir.join(format!("host-{host}.token"))
}

/// The file holding the token of a tenant made at start.
pub fn tenant_token_file(data_dir: &std::path::Path, tenant: &str) -> PathBuf {
    data_dir.join(format!("{tenant}.token"))
}

/// Reads the admin token file of `data_dir`, making one if there is none.
pub fn admin_token_in(data_dir: &std::path::Path) -> anyhow::Result<String> {
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    if let Ok(secret) = std::fs::read_to_string(&path) {
        return Ok(secret.trim().to_string());
    }
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let secret = new_secret();
    write_private(&path, &secret).with_context(|| format!("writing {}", path.display()))?;
    Ok(secret)
}

fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The URL without its password, for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(
            super::redact("postgres://fl:secret@127.0.0.1/db"),
            "postgres://fl:***@127.0.0.1/db"
        );
        assert_eq!(
            super::redact("sqlite:///var/lib/x.db"),
            "sqlite:///var/lib/x.db"
        );
    }
}
