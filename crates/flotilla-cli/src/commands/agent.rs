//! `flotilla up` and `flotilla agent`: run the host agent in this process.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use flotilla_agent::config::{AgentConfig, GuestHugePages, RestoreMemory};
use flotilla_agent::server::{run_agent, OnExit};
use flotilla_api::Resources;
use flotilla_image::{ImageStore, DEFAULT_IMAGE};

use super::default_data_dir;
use crate::args::{AgentArgs, UpArgs};

fn config_from(args: &AgentArgs) -> anyhow::Result<AgentConfig> {
    let data_dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
    let mut c = AgentConfig::with_defaults(data_dir);
    c.listen = args.listen;
    c.tls = !args.plain_http;
    c.qemu_binary = args.qemu.clone();
    c.accel = args
        .accel
        .parse()
        .map_err(|e| anyhow::anyhow!("--accel: {e}"))?;
    c.accel_probe_cache = match args.accel_probe_cache.as_str() {
        "none" => None,
        "" => {
            anyhow::bail!("--accel-probe-cache: give a file path, or none to probe at every start")
        }
        path => Some(std::path::PathBuf::from(path)),
    };
    c.bridge = args.bridge.clone();
    if c.bridge.is_empty() || c.bridge.len() > 15 {
        anyhow::bail!(
            "--bridge: {:?} is not a valid interface name (1 to 15 characters)",
            c.bridge
        );
    }
    c.subnet = args
        .subnet
        .parse()
        .map_err(|e| anyhow::anyhow!("--subnet: {e}"))?;
    let d = c.capacity;
    c.capacity = Resources {
        vcpus: args.capacity_vcpus.unwrap_or(d.vcpus),
        memory_mib: args.capacity_memory.unwrap_or(d.memory_mib),
    };
    c.disk_capacity_mib = args.capacity_disk;
    c.ready_timeout = Duration::from_secs(args.ready_timeout);
    c.migration_address = args.migration_address;
    c.max_migrations = args.max_migrations;
    c.forward_moved_for = Duration::from_secs(args.forward_moved_secs);
    c.restore_memory = match args.restore_memory.as_str() {
        "map" => RestoreMemory::Map,
        _ => RestoreMemory::Load,
    };
    c.max_standbys = args.max_warm;
    c.guest_huge_pages = match args.guest_huge_pages.as_str() {
        "on" => GuestHugePages::On,
        "off" => GuestHugePages::Off,
        _ => GuestHugePages::Auto,
    };
    if let Some(adv) = &args.advertise {
        let scheme = format!("{}://", c.scheme());
        if !adv.starts_with(&scheme) {
            anyhow::bail!(
                "--advertise {adv}: this agent serves {scheme}HOST:PORT (HTTPS unless --plain-http)"
            );
        }
    }
    if let Some(url) = &args.control_plane {
        let token = args.control_token.clone().context(
            "--control-plane needs --control-token (an admin token of the control plane)",
        )?;
        let host_name = match &args.host_name {
            Some(n) => n.clone(),
            None => registry_name(
                &nix::unistd::gethostname()
                    .map(|h| h.to_string_lossy().into_owned())
                    .context("reading the hostname (or give --host-name)")?,
            ),
        };
        flotilla_control::service::check_name("host", &host_name)
            .map_err(|e| anyhow::anyhow!("--host-name: {e}"))?;
        c.control = Some(flotilla_agent::control_link::ControlLink {
            url: url.clone(),
            token,
            host_name,
            advertise: args
                .advertise
                .clone()
                .unwrap_or_else(|| format!("{}://{}", c.scheme(), args.listen)),
            labels: args.labels.iter().cloned().collect(),
            traits: args.traits.iter().cloned().collect(),
            interval: Duration::from_secs(args.heartbeat_interval.max(1)),
        });
    }
    Ok(c)
}

/// A hostname as a registry name: lowercase, anything but [a-z0-9-] made
/// '-', starting with a letter, at most 63 characters.
fn registry_name(hostname: &str) -> String {
    let mut name: String = hostname
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        name.insert_str(0, "h-");
    }
    name.truncate(63);
    name
}

async fn ctrl_c_or_term() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}

pub async fn agent(args: AgentArgs) -> anyhow::Result<ExitCode> {
    let config = config_from(&args)?;
    run_agent(config, OnExit::KeepVms, ctrl_c_or_term(), |_| {}).await?;
    Ok(ExitCode::SUCCESS)
}

pub async fn up(args: UpArgs) -> anyhow::Result<ExitCode> {
    let config = config_from(&args.agent)?;
    let store = ImageStore::open(&config.images_dir())
        .with_context(|| format!("opening image store {}", config.images_dir().display()))?;
    if store.get(DEFAULT_IMAGE).is_err() {
        eprintln!("No default image yet: building it (cached after the first time).");
        let data_dir = config.data_dir.clone();
        let guest_agent = args.guest_agent.clone();
        tokio::task::spawn_blocking(move || {
            super::image::build_and_register(&data_dir, None, guest_agent, None, false)
        })
        .await??;
    }
    let on_exit = if args.keep_vms {
        OnExit::KeepVms
    } else {
        OnExit::StopVms
    };
    let (config, control, token_file) = with_embedded_control(config, args.control_listen).await?;
    let control_url = format!("http://{}", args.control_listen);
    let scheme = config.scheme();
    let result = run_agent(config, on_exit, ctrl_c_or_term(), |h| {
        eprintln!(
            "Flotilla is up: agent on {scheme}://{}, control plane on {control_url} (tenant {DEFAULT_TENANT}, token in {}). In another terminal:\n  flotilla vm run demo --wait\n  flotilla vm exec demo -- uname -a\n  FLOTILLA_TOKEN=$(cat {}) flotilla instance run web --count 2 --wait\nCtrl-C stops the VMs and exits{}.",
            h.local_addr,
            token_file.display(),
            token_file.display(),
            if args.keep_vms { " (VMs kept running)" } else { "" }
        );
    })
    .await;
    control.abort();
    result?;
    Ok(ExitCode::SUCCESS)
}

/// The tenant `flotilla up` makes for local use.
pub const DEFAULT_TENANT: &str = "default";

/// The local agent's name in `flotilla up`'s registry.
const LOCAL_HOST: &str = "local";

/// Starts the control plane in this process (SQLite in `<data>/control`) and
/// links the agent to it; returns the agent's config, the control plane's
/// task and the default tenant's token file.
async fn with_embedded_control(
    mut config: AgentConfig,
    listen: std::net::SocketAddr,
) -> anyhow::Result<(AgentConfig, tokio::task::JoinHandle<()>, std::path::PathBuf)> {
    let dir = config.data_dir.join("control");
    let admin = flotilla_control::server::admin_token_in(&dir)?;
    let control = flotilla_control::ControlConfig {
        listen,
        database: format!("sqlite://{}", dir.join("control.db").display()),
        data_dir: dir.clone(),
        admin_token: Some(admin.clone()),
        default_tenant: Some(DEFAULT_TENANT.into()),
        local_host: Some(LOCAL_HOST.into()),
        settings: flotilla_control::ControlSettings::default(),
    };
    let task = tokio::spawn(async move {
        if let Err(e) = flotilla_control::run_control(control).await {
            tracing::error!(error = %format!("{e:#}"), "the control plane stopped");
        }
    });
    // Up before the agent's first heartbeat, or the reason it is not.
    let url = format!("http://{listen}");
    let http = reqwest::Client::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if http
            .get(format!("{url}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            break;
        }
        if task.is_finished() || std::time::Instant::now() > deadline {
            anyhow::bail!("the control plane did not start on {listen} (see the log above; --control-listen picks another address)");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if config.control.is_none() {
        let host_token =
            std::fs::read_to_string(flotilla_control::server::host_token_file(&dir, LOCAL_HOST))
                .context("reading the local agent's host token")?;
        config.control = Some(flotilla_agent::control_link::ControlLink {
            url,
            token: host_token.trim().to_string(),
            host_name: LOCAL_HOST.into(),
            advertise: format!("{}://{}", config.scheme(), config.listen),
            labels: Default::default(),
            traits: Default::default(),
            interval: Duration::from_secs(3),
        });
    }
    let token_file = flotilla_control::server::tenant_token_file(&dir, DEFAULT_TENANT);
    Ok((config, task, token_file))
}

#[cfg(test)]
mod tests {
    #[test]
    fn hostnames_become_registry_names() {
        assert_eq!(
            super::registry_name("Build-01.Example.COM"),
            "build-01-example-com"
        );
        assert_eq!(super::registry_name("42box"), "h-42box");
    }
}
