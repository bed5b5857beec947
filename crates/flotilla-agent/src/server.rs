//! Running the agent: check the host, take the data directory, detect the
//! accelerator, set up the bridge, re-adopt VMs, then serve the API until
//! asked to stop.

use std::future::{Future, IntoFuture};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use flotilla_image::{ImageStore, DEFAULT_IMAGE};
use flotilla_qemu::{detect_accel, AccelProbe};

use crate::config::AgentConfig;
use crate::{http, network, VmManager};

/// How long requests in flight may run on after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What to do with running VMs when the agent stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnExit {
    /// Leave them running, to be re-adopted by the next agent (daemon restarts).
    KeepVms,
    /// Stop them gracefully and remove the bridge (`flotilla up`).
    StopVms,
}

/// A started agent, for callers that need its manager or address.
pub struct AgentHandle {
    pub manager: VmManager,
    pub local_addr: std::net::SocketAddr,
}

/// Keeps the data directory to one agent at a time.
struct DataDirLock(#[allow(dead_code)] std::fs::File);

fn lock_data_dir(config: &AgentConfig) -> anyhow::Result<DataDirLock> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    let path = config.data_dir.join("agent.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        bail!(
            "another agent is already using {} (lock {} is held)",
            config.data_dir.display(),
            path.display()
        );
    }
    Ok(DataDirLock(file))
}

fn qemu_version(binary: &std::path::Path) -> anyhow::Result<String> {
    let out = Command::new(binary)
        .arg("--version")
        .output()
        .with_context(|| {
            format!(
                "cannot run {}: install QEMU 10 (scripts/install-deps does it)",
                binary.display()
            )
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next().unwrap_or_default().to_string();
    Ok(first
        .split("version ")
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or(&first)
        .to_string())
}

/// Starts the agent and serves until `shutdown` resolves.
pub async fn run_agent(
    config: AgentConfig,
    on_exit: OnExit,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(&AgentHandle) + Send,
) -> anyhow::Result<()> {
    let _lock = lock_data_dir(&config)?;
    // Absolute, so socket paths (and the orphan sweep that matches them) are
    // the same whatever directory the agent was started from.
    let mut config = config;
    config.data_dir = config
        .data_dir
        .canonicalize()
        .with_context(|| format!("resolving {}", config.data_dir.display()))?;
    let sock_len = config
        .sockets_dir()
        .join("0123456789abcdef.agent")
        .as_os_str()
        .len();
    if sock_len > 107 {
        bail!(
            "data directory {} is too long: QEMU's socket paths under it would exceed 107 bytes",
            config.data_dir.display()
        );
    }
    let qemu_version = qemu_version(&config.qemu_binary)?;
    let images = ImageStore::open(&config.images_dir())
        .with_context(|| format!("opening image store {}", config.images_dir().display()))?;

    let probe = images.get(DEFAULT_IMAGE).ok().map(|img| AccelProbe {
        qemu_binary: config.qemu_binary.clone(),
        kernel: img.kernel.clone(),
        initrd: img.initrd.clone(),
        timeout: Duration::from_secs(2),
        cache: config.accel_probe_cache.clone(),
    });
    let accel = match &probe {
        Some(p) => detect_accel(config.accel, p).await?,
        None => {
            detect_accel(
                config.accel,
                &AccelProbe {
                    qemu_binary: config.qemu_binary.clone(),
                    kernel: std::path::PathBuf::new(),
                    initrd: None,
                    timeout: Duration::from_secs(2),
                    cache: None,
                },
            )
            .await?
        }
    };
    tracing::info!(accel = %accel.accel, reason = %accel.reason, qemu = %qemu_version, "accelerator chosen");

    network::ensure_bridge(&config.bridge, &config.subnet)
        .with_context(|| format!("setting up bridge {}", config.bridge))?;
    let forwarding_was_on = crate::routes::enable_ip_forwarding().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "could not turn on IPv4 forwarding: VMs are reachable from this host only");
        true
    });

    let snapshots =
        flotilla_snapshot::SnapshotStore::open(&config.snapshots_dir()).with_context(|| {
            format!(
                "opening snapshot store {}",
                config.snapshots_dir().display()
            )
        })?;
    let token = crate::auth::load_or_create_token(&config.data_dir)?;
    let identity = match config.tls {
        true => {
            let id = flotilla_tls::load_or_create(&config.tls_dir(), &certificate_names(&config))
                .context("loading the agent's TLS certificate")?;
            config.tls_fingerprint = Some(id.fingerprint.clone());
            Some(id)
        }
        false => None,
    };
    let manager = VmManager::new(config.clone(), accel, qemu_version, images, snapshots);
    if let Some(id) = &identity {
        let tls = flotilla_tls::server_config(id).context("TLS setup")?;
        let _ = manager.inner.stream_tls.set(Arc::new(tls));
    }
    crate::network::delete_retired_taps();
    manager.adopt_all().await.context("re-adopting VMs")?;
    // Forwards an earlier agent left, and the filter, before serving.
    manager.sync_network();
    let expiring = tokio::spawn(manager.inner.routes.clone().expire_loop());
    let isolating = tokio::spawn(isolation_loop(manager.clone()));

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let handle = AgentHandle {
        manager: manager.clone(),
        local_addr: listener.local_addr()?,
    };
    tracing::info!(
        addr = %handle.local_addr,
        scheme = config.scheme(),
        tls_fingerprint = config.tls_fingerprint.as_deref().unwrap_or("-"),
        data_dir = %config.data_dir.display(),
        "agent serving"
    );
    let heartbeats = config.control.clone().map(|link| {
        tracing::info!(control = %link.url, host = %link.host_name, "heartbeating to the control plane");
        tokio::spawn(crate::control_link::heartbeat_loop(
            manager.clone(),
            link,
            token.clone(),
        ))
    });
    on_ready(&handle);

    // Requests in flight get a short grace period after the shutdown signal;
    // a long exec or --wait must not keep the agent from stopping.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let router = http::router(manager.clone(), crate::auth::TokenCheck::new(&token));
    let stopped = {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let serve: std::pin::Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>> = match &identity
    {
        None => Box::pin(
            axum::serve(listener, router)
                .with_graceful_shutdown(stopped)
                .into_future(),
        ),
        Some(id) => {
            let tls = flotilla_tls::server_config(id).context("TLS setup")?;
            let tls = axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(tls));
            let server_handle = axum_server::Handle::new();
            let on_stop = server_handle.clone();
            tokio::spawn(async move {
                stopped.await;
                on_stop.graceful_shutdown(None);
            });
            let listener = listener.into_std()?;
            Box::pin(
                axum_server::from_tcp_rustls(listener, tls)
                    .handle(server_handle)
                    .serve(router.into_make_service()),
            )
        }
    };
    let signal = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
        tokio::time::sleep(SHUTDOWN_GRACE).await;
        tracing::warn!(
            "requests still running after {} s; closing them",
            SHUTDOWN_GRACE.as_secs()
        );
    };
    tokio::select! {
        r = serve => r.context("serving the API")?,
        _ = signal => {}
    }

    if let Some(h) = heartbeats {
        h.abort();
    }
    expiring.abort();
    isolating.abort();
    if on_exit == OnExit::StopVms {
        stop_everything(&manager).await;
        manager.inner.routes.clear();
        manager.inner.isolation.clear();
        // The host is left as it was found.
        if !forwarding_was_on {
            if let Err(e) = crate::routes::disable_ip_forwarding() {
                tracing::warn!(error = %e, "could not turn IPv4 forwarding off again");
            }
        }
        if let Err(e) = network::delete_bridge(&config.bridge) {
            tracing::warn!(error = %e, "could not remove the bridge");
        }
    }
    // Standbys dropped and VMs stopped set taps aside: deleted before exit.
    let _ = tokio::task::spawn_blocking(network::finish_retired_taps).await;
    tracing::info!("agent stopped");
    Ok(())
}

async fn stop_everything(manager: &VmManager) {
    let running: Vec<String> = manager
        .list()
        .into_iter()
        .filter(|vm| vm.state.has_process())
        .map(|vm| vm.name)
        .collect();
    let stops = running.iter().map(|name| async move {
        tracing::info!(vm = %name, "stopping");
        if let Err(e) = manager.stop(name, false, None).await {
            tracing::error!(vm = %name, error = %e, "stop failed");
        }
    });
    futures::future::join_all(stops).await;
    manager.drop_all_standbys().await;
}

/// Names and addresses for the certificate, for clients that check names
/// (ours pin the certificate instead): the listen and migration addresses,
/// this host's name, and loopback.
fn certificate_names(config: &AgentConfig) -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let listen = config.listen.ip();
    if !listen.is_unspecified() {
        names.push(listen.to_string());
    }
    if let Some(a) = config.migration_address {
        names.push(a.to_string());
    }
    if let Ok(h) = nix::unistd::gethostname() {
        names.push(h.to_string_lossy().into_owned());
    }
    names.sort();
    names.dedup();
    names
}

/// Keeps the routes and the network groups' filter in step with the VMs,
/// the route table and the forwards (also brought up to date before a VM
/// starts and when a route table arrives); nothing runs while nothing
/// changed. The first run is the start-up's own, before serving.
async fn isolation_loop(manager: VmManager) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let m = manager.clone();
        let _ = tokio::task::spawn_blocking(move || m.sync_network()).await;
    }
}
