//! `flotilla vm migrate` and `flotilla migration ...`: live migration
//! between hosts' agents.

use std::process::ExitCode;
use std::time::Duration;

use flotilla_api::migration::{MigrateVmRequest, MigrationInfo, MigrationPhase};
use indicatif::{ProgressBar, ProgressStyle};

use crate::args::MigrationCommand;
use crate::client::Client;
use crate::output::{self, opt};

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1024.0 * 1024.0))
}

fn phase(p: MigrationPhase) -> &'static str {
    match p {
        MigrationPhase::Preparing => "preparing",
        MigrationPhase::PreCopy => "pre_copy",
        MigrationPhase::DiskSync => "disk_sync",
        MigrationPhase::Completed => "completed",
        MigrationPhase::Cancelled => "cancelled",
        MigrationPhase::Failed => "failed",
    }
}

/// One line on where a migration stands.
fn progress_line(m: &MigrationInfo) -> String {
    match m.phase {
        MigrationPhase::PreCopy => format!(
            "{}: pre-copy round {}, {} of {} MiB sent, {} MiB left, expected pause {} ms",
            m.vm,
            m.rounds,
            mib(m.transferred_bytes),
            mib(m.memory_bytes),
            mib(m.remaining_bytes),
            opt(&m.expected_downtime_ms)
        ),
        MigrationPhase::DiskSync => format!(
            "{}: runs on the target (paused {} ms); disks {} of {} MiB synced",
            m.vm,
            opt(&m.downtime_ms),
            mib(m.disk_synced_bytes),
            mib(m.disk_total_bytes)
        ),
        p => format!("{}: {}", m.vm, phase(p)),
    }
}

pub struct MigrateArgs {
    pub name: String,
    pub to: String,
    pub to_token: Option<String>,
    pub to_fingerprint: Option<String>,
    pub options: flotilla_api::migration::MigrationOptions,
    pub no_wait: bool,
}

pub async fn migrate(client: &Client, json: bool, a: MigrateArgs) -> anyhow::Result<ExitCode> {
    let req = MigrateVmRequest::new(a.to.clone(), a.to_token, a.to_fingerprint, a.options);
    let started: MigrationInfo = client
        .post(&format!("/v1/vms/{}/migrate", a.name), &req)
        .await?;
    if a.no_wait {
        if json {
            output::json(&started)?;
        } else {
            println!(
                "migration {} of {} to {} started (follow it with `flotilla migration inspect {}`)",
                started.id, a.name, a.to, started.id
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let bar = (!json).then(|| {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    });
    let path = format!("/v1/migrations/{}", started.id);
    let done = loop {
        let m: MigrationInfo = client.get(&path).await?;
        if m.phase.is_finished() {
            break m;
        }
        if let Some(bar) = &bar {
            bar.set_message(progress_line(&m));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if json {
        output::json(&done)?;
    } else if done.phase == MigrationPhase::Completed {
        println!(
            "{} migrated to {} in {:.2} s (paused {} ms; {} MiB of memory sent for {} MiB)",
            done.vm,
            done.peer,
            done.total_ms.unwrap_or(0) as f64 / 1000.0,
            opt(&done.downtime_ms),
            mib(done.transferred_bytes),
            mib(done.memory_bytes)
        );
    } else {
        eprintln!(
            "migration of {} {}: {}",
            done.vm,
            phase(done.phase),
            opt(&done.error)
        );
    }
    Ok(match done.phase {
        MigrationPhase::Completed => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    })
}

pub async fn run(client: &Client, json: bool, cmd: MigrationCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        MigrationCommand::Ls => {
            let all: Vec<MigrationInfo> = client.get("/v1/migrations").await?;
            if json {
                output::json(&all)?;
            } else {
                let rows: Vec<Vec<String>> = all
                    .iter()
                    .map(|m| {
                        vec![
                            m.id.clone(),
                            m.vm.clone(),
                            format!("{:?}", m.role).to_lowercase(),
                            m.peer.clone(),
                            phase(m.phase).into(),
                            opt(&m.downtime_ms),
                            opt(&m.total_ms),
                            opt(&m.error),
                        ]
                    })
                    .collect();
                output::table(
                    &[
                        "ID", "VM", "ROLE", "PEER", "PHASE", "PAUSE MS", "TOTAL MS", "ERROR",
                    ],
                    &rows,
                );
            }
        }
        MigrationCommand::Inspect { id } => {
            let m: MigrationInfo = client.get(&format!("/v1/migrations/{id}")).await?;
            if json {
                output::json(&m)?;
            } else {
                println!("{}", progress_line(&m));
                output::json(&m)?;
            }
        }
        MigrationCommand::Cancel { id } => {
            let m: MigrationInfo = client
                .post(
                    &format!("/v1/migrations/{id}/cancel"),
                    &serde_json::json!({}),
                )
                .await?;
            if json {
                output::json(&m)?;
            } else {
                println!("cancelling migration {id} of {}", m.vm);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
