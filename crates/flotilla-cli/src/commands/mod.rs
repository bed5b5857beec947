//! One module per verb group; each parses its arguments into API calls.

mod agent;
mod control;
mod fleet;
mod fleetctl;
mod image;
mod instance_volume;
mod migration;
mod snapshot;
mod vm;
mod volume;

use std::process::ExitCode;

use flotilla_api::HostInfo;

use crate::args::{Cli, Command};
use crate::client::Client;
use crate::output;

pub async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    // Made only when a control plane verb needs it.
    // Without a token, a local `flotilla up`'s own: the admin's for admin
    // verbs (readable by root), the default tenant's for the rest.
    let admin_verb = matches!(
        cli.command,
        Command::Tenant(_) | Command::Token(_) | Command::Hosts(_)
    );
    let control = || {
        let token = cli.token.clone().or_else(|| local_token(admin_verb));
        Client::control(&cli.control_url, token.as_deref())
    };
    let agent_token = cli.agent_token.clone().or_else(local_agent_token);
    let agent_fingerprint = cli
        .agent_fingerprint
        .clone()
        .or_else(local_agent_fingerprint);
    let agent = || {
        Client::agent(
            &cli.endpoint,
            agent_token.clone(),
            agent_fingerprint.as_deref(),
        )
    };
    match cli.command {
        Command::Up(args) => agent::up(args).await,
        Command::Agent(args) => agent::agent(args).await,
        Command::Control(args) => control::control(args).await,
        Command::Image(cmd) => image::run(&agent, cli.json, cmd).await,
        Command::Vm(cmd) => vm::run(&agent()?, cli.json, cmd).await,
        Command::Fleet(cmd) => fleet::run(&agent()?, cli.json, cmd).await,
        Command::Snapshot(cmd) => snapshot::run(&agent()?, cli.json, cmd).await,
        Command::Volume(cmd) => volume::run(&agent()?, cli.json, cmd).await,
        Command::Migration(cmd) => migration::run(&agent()?, cli.json, cmd).await,
        Command::Tenant(cmd) => fleetctl::tenant(&control()?, cli.json, cmd).await,
        Command::Token(cmd) => fleetctl::token(&control()?, cli.json, cmd).await,
        Command::Instance(cmd) => fleetctl::instance(&control()?, cli.json, cmd).await,
        Command::Hosts(cmd) => fleetctl::hosts(&control()?, cli.json, cmd).await,
        Command::Op(cmd) => fleetctl::op(&control()?, cli.json, cmd).await,
        Command::Policy(cmd) => fleetctl::policy(&control()?, cli.json, cmd).await,
        Command::Host => {
            let host: HostInfo = agent()?.get("/v1/host").await?;
            if cli.json {
                output::json(&host)?;
            } else {
                println!("hostname:   {}", host.hostname);
                println!("agent:      {}", host.agent_version);
                println!("qemu:       {}", host.qemu_version);
                println!("accel:      {} ({})", host.accel, host.accel_reason);
                println!(
                    "capacity:   {} vCPUs, {} MiB ({} vCPUs, {} MiB allocated)",
                    host.capacity.vcpus,
                    host.capacity.memory_mib,
                    host.allocated.vcpus,
                    host.allocated.memory_mib
                );
                println!(
                    "network:    bridge {} on {}; tenants {}",
                    host.bridge,
                    host.subnet,
                    if host.network_isolation {
                        "kept apart (nftables)"
                    } else {
                        "NOT kept apart (install nftables)"
                    }
                );
                println!("vms:        {}", host.vm_count);
                println!("data dir:   {}", host.data_dir);
                match &host.tls_fingerprint {
                    Some(f) => println!("tls:        HTTPS, certificate sha256 {f}"),
                    None => println!("tls:        none (plain HTTP)"),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Where local state lives when no --data-dir is given.
pub fn default_data_dir() -> std::path::PathBuf {
    if nix::unistd::Uid::effective().is_root() {
        return "/var/lib/flotilla".into();
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".local/share"))
        })
        .unwrap_or_else(|| "/tmp".into());
    base.join("flotilla")
}

/// The data directory of a local agent: FLOTILLA_DATA_DIR or the default.
fn local_data_dir() -> std::path::PathBuf {
    std::env::var_os("FLOTILLA_DATA_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(default_data_dir)
}

/// The fingerprint of a local agent's certificate, from its data directory.
fn local_agent_fingerprint() -> Option<String> {
    let cert = local_data_dir().join("tls").join(flotilla_tls::CERT_FILE);
    flotilla_tls::fingerprint_of_file(&cert).ok()
}

/// The API token of a local agent, from its data directory.
fn local_agent_token() -> Option<String> {
    let dir = local_data_dir();
    std::fs::read_to_string(dir.join(flotilla_agent::auth::TOKEN_FILE))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// A token of a local `flotilla up` (its admin's, or its default
/// tenant's), for when no token is given.
fn local_token(admin: bool) -> Option<String> {
    let dir = local_data_dir();
    let file = match admin {
        true => flotilla_control::server::ADMIN_TOKEN_FILE.to_string(),
        false => format!("{}.token", agent::DEFAULT_TENANT),
    };
    let path = dir.join("control").join(file);
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}
