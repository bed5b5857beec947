//! Saving a paused VM's state to a file and loading it into a fresh QEMU,
//! with QEMU's `mapped-ram` format: RAM pages at fixed offsets of a sparse
//! file, so two saves of the same VM can be compared page by page.
//!
//! The source must be paused (`stop`); the destination QEMU must have been
//! started with `-incoming defer` and the same memory backend id (`mem`).

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::json;

use crate::error::QmpError;
use crate::qmp::QmpClient;

/// How often a save's or a load's progress is polled: often, as suspends,
/// resumes and clones wait on it (a query is a cheap round trip).
const POLL: Duration = Duration::from_millis(2);

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("migration {status}: {reason}")]
    Failed { status: String, reason: String },
    #[error("migration did not finish within {0:?}")]
    Timeout(Duration),
}

#[derive(Debug, Deserialize)]
struct MigrateInfo {
    status: Option<String>,
    #[serde(rename = "error-desc")]
    error_desc: Option<String>,
    #[serde(rename = "total-time")]
    total_time: Option<u64>,
    ram: Option<RamInfo>,
}

#[derive(Debug, Deserialize)]
struct RamInfo {
    transferred: Option<u64>,
}

/// What a finished save or load reports.
#[derive(Debug, Clone, Copy, Default)]
pub struct MigrationStats {
    pub total_ms: u64,
    pub transferred_bytes: u64,
}

/// Threads QEMU saves and loads RAM with (multifd over the mapped-ram file:
/// each writes or reads its own pages at their fixed offsets).
pub const FILE_CHANNELS: u8 = 2;

async fn set_mapped_ram(qmp: &QmpClient) -> Result<(), QmpError> {
    // A file has no peer: TLS a live migration left set would make QEMU
    // refuse mapped-ram, so it goes first.
    qmp.execute::<serde_json::Value>("migrate-set-parameters", Some(json!({ "tls-creds": "" })))
        .await?;
    qmp.execute::<serde_json::Value>(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": [
            { "capability": "mapped-ram", "state": true },
            { "capability": "multifd", "state": true },
            // A live migration's; QEMU refuses it with mapped-ram.
            { "capability": "postcopy-ram", "state": false },
        ] })),
    )
    .await?;
    // A file is no link to share: QEMU's default limit (128 MiB/s) would
    // make a save, and so a suspend's or a clone's pause, several times
    // longer than the disk needs.
    qmp.execute::<serde_json::Value>(
        "migrate-set-parameters",
        Some(json!({
            "multifd-channels": FILE_CHANNELS,
            "max-bandwidth": crate::live::UNLIMITED_BANDWIDTH,
        })),
    )
    .await?;
    Ok(())
}

fn file_uri(path: &Path) -> String {
    format!("file:{}", path.display())
}

async fn wait_done(qmp: &QmpClient, timeout: Duration) -> Result<MigrationStats, MigrationError> {
    let started = Instant::now();
    loop {
        let info: MigrateInfo = qmp.execute("query-migrate", None).await?;
        match info.status.as_deref() {
            Some("completed") => {
                return Ok(MigrationStats {
                    total_ms: info.total_time.unwrap_or(0),
                    transferred_bytes: info.ram.and_then(|r| r.transferred).unwrap_or(0),
                })
            }
            Some(s @ ("failed" | "cancelled")) => {
                return Err(MigrationError::Failed {
                    status: s.to_string(),
                    reason: info.error_desc.unwrap_or_else(|| "no reason given".into()),
                })
            }
            _ => {}
        }
        if started.elapsed() > timeout {
            let _ = qmp
                .execute::<serde_json::Value>("migrate_cancel", None)
                .await;
            return Err(MigrationError::Timeout(timeout));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Writes the paused VM's RAM and device state to `path` (mapped-ram).
pub async fn save_to_file(
    qmp: &QmpClient,
    path: &Path,
    timeout: Duration,
) -> Result<MigrationStats, MigrationError> {
    set_mapped_ram(qmp).await?;
    qmp.execute::<serde_json::Value>("migrate", Some(json!({ "uri": file_uri(path) })))
        .await?;
    wait_done(qmp, timeout).await
}

/// Loads state saved by [`save_to_file`] into a QEMU started with
/// `-incoming defer`; the VM stays paused (call `cont`).
pub async fn load_from_file(
    qmp: &QmpClient,
    path: &Path,
    timeout: Duration,
) -> Result<MigrationStats, MigrationError> {
    set_mapped_ram(qmp).await?;
    qmp.execute::<serde_json::Value>("migrate-incoming", Some(json!({ "uri": file_uri(path) })))
        .await?;
    wait_done(qmp, timeout).await
}

/// Makes QEMU load `path` (written by [`save_to_file`]) as it starts,
/// paused afterwards: no QMP round trips before the load begins. Wait for it
/// with [`wait_incoming`].
pub fn load_at_start(config: &mut crate::QemuConfig, path: &Path) {
    config.incoming = Some(file_uri(path));
    config.mapped_ram = true;
    config.start_paused = true;
}

/// Like [`load_at_start`], but the guest's memory is mapped from `image`
/// (copy-on-write, read as the guest touches it) instead of loaded: QEMU
/// loads the rest of the state from `state_file`, written here. The image
/// must not change while the VM runs (replace it, never write it in place).
/// Errors if the image's layout is not one QEMU's loader and this mapping
/// agree on; loading it with [`load_at_start`] still works then.
pub fn map_at_start(
    config: &mut crate::QemuConfig,
    image: &Path,
    state_file: &Path,
) -> Result<(), crate::mapped_ram::MappedRamError> {
    let layout = crate::mapped_ram::BlockLayout::find(
        image,
        crate::config::MEMORY_BACKEND_ID,
        config.memory_mib << 20,
    )?;
    layout.write_state_file(image, state_file)?;
    config.memory_file = Some(crate::MemoryFile {
        path: image.to_path_buf(),
        offset: layout.pages_offset,
    });
    load_at_start(config, state_file);
    Ok(())
}

/// Waits until the state QEMU loads (see [`load_at_start`]) is in.
pub async fn wait_incoming(
    qmp: &QmpClient,
    timeout: Duration,
) -> Result<MigrationStats, MigrationError> {
    wait_done(qmp, timeout).await
}

/// Cancels an outgoing migration that may still be running (one an agent
/// started before it died) and waits until QEMU is done with it, so the VM
/// can be continued. A migration that already completed leaves QEMU in
/// `postmigrate`, from which `cont` also resumes.
pub async fn cancel_outgoing(qmp: &QmpClient, timeout: Duration) -> Result<(), MigrationError> {
    let _ = qmp
        .execute::<serde_json::Value>("migrate_cancel", None)
        .await;
    let started = Instant::now();
    loop {
        let info: MigrateInfo = qmp.execute("query-migrate", None).await?;
        match info.status.as_deref() {
            None | Some("completed" | "failed" | "cancelled" | "none") => return Ok(()),
            _ if started.elapsed() > timeout => return Err(MigrationError::Timeout(timeout)),
            _ => tokio::time::sleep(POLL).await,
        }
    }
}

/// Connects or disconnects a NIC's link (`set_link`): a VM whose link is down
/// takes no network input.
pub async fn set_link(qmp: &QmpClient, nic_id: &str, up: bool) -> Result<(), QmpError> {
    qmp.execute::<serde_json::Value>("set_link", Some(json!({ "name": nic_id, "up": up })))
        .await?;
    Ok(())
}
