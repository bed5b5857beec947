//! Live block operations: moving a running VM's disk to a new file with
//! QEMU's mirror job (every write during the copy is mirrored too), then
//! switching the device over.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::{QmpClient, QmpError};

const POLL: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("no disk attached as device {0:?}")]
    NoSuchDevice(String),
    #[error("block job {job} failed: {reason}")]
    JobFailed { job: String, reason: String },
    #[error("block job did not finish within {0:?}")]
    Timeout(Duration),
}

#[derive(Debug, Deserialize)]
struct BlockInfo {
    qdev: Option<String>,
    inserted: Option<Inserted>,
}

#[derive(Debug, Deserialize)]
struct Inserted {
    #[serde(rename = "node-name")]
    node_name: Option<String>,
}

#[derive(Debug, Deserialize)]
struct JobInfo {
    device: String,
    ready: bool,
    len: u64,
    offset: u64,
    status: Option<String>,
    error: Option<String>,
}

/// The file the device with qdev id `device` reads and writes (the top of
/// its chain), as QEMU reports it.
pub async fn device_file(qmp: &QmpClient, device: &str) -> Result<String, BlockError> {
    let blocks: Vec<Value> = qmp.execute("query-block", None).await?;
    blocks
        .iter()
        .filter(|b| {
            b["qdev"]
                .as_str()
                .is_some_and(|q| q == device || q.contains(&format!("/{device}/")))
        })
        .find_map(|b| b["inserted"]["file"].as_str().map(str::to_string))
        .ok_or_else(|| BlockError::NoSuchDevice(device.to_string()))
}

/// Writes what QEMU holds in its caches for the disk attached as device
/// `device` (data and qcow2 metadata) to its file and syncs it. A block job
/// that copied data into a disk leaves the qcow2 metadata naming it in
/// QEMU's cache until the guest next flushes; a QEMU killed before then
/// loses the copy. QMP has no flush command of its own: the monitor's
/// `qemu-io` runs one on the device. It reports a device it cannot find,
/// but not a failed write (QEMU prints nothing for that): callers sync the
/// file themselves afterwards to learn of one. The guest waits while it
/// runs, so callers first sync the file to empty the page cache.
pub async fn flush(qmp: &QmpClient, device: &str) -> Result<(), BlockError> {
    let said: Value = qmp
        .execute_timeout(
            "human-monitor-command",
            Some(json!({ "command-line": format!("qemu-io -d {device} \"flush\"") })),
            FLUSH_TIMEOUT,
        )
        .await?;
    let said = said.as_str().unwrap_or_default().trim();
    if said.is_empty() {
        return Ok(());
    }
    Err(BlockError::JobFailed {
        job: format!("flush of {device}"),
        reason: said.to_string(),
    })
}

/// How long a flush may take (a disk just streamed may have a lot to write).
const FLUSH_TIMEOUT: Duration = Duration::from_secs(120);

/// Cancels disk moves (`move-*` jobs) a dead agent left running.
pub async fn cancel_moves(qmp: &QmpClient) -> Result<(), BlockError> {
    let jobs: Vec<JobInfo> = qmp.execute("query-block-jobs", None).await?;
    for job in jobs.iter().filter(|j| j.device.starts_with("move-")) {
        let _ = qmp
            .execute::<Value>(
                "block-job-cancel",
                Some(json!({ "device": job.device, "force": true })),
            )
            .await;
        wait_gone(qmp, &job.device, Duration::from_secs(10))
            .await
            .ok();
    }
    Ok(())
}

/// The node the device with qdev id `device` reads and writes.
async fn device_node(qmp: &QmpClient, device: &str) -> Result<String, BlockError> {
    let blocks: Vec<BlockInfo> = qmp.execute("query-block", None).await?;
    blocks
        .into_iter()
        .filter(|b| {
            b.qdev
                .as_deref()
                .is_some_and(|q| q == device || q.contains(&format!("/{device}/")))
        })
        .find_map(|b| b.inserted.and_then(|i| i.node_name))
        .ok_or_else(|| BlockError::NoSuchDevice(device.to_string()))
}

/// Copies everything the device `device` sees (its whole backing chain)
/// into `target`, an empty qcow2 of the same size that the caller created,
/// then switches the device to it; the old chain is closed. `progress` is
/// called with (bytes done, bytes total); `switching` right after QEMU
/// accepted the switch-over, from when on the target holds the disk's
/// latest writes (record that before anything else). On an error the caller
/// asks [`device_file`] which file the device uses.
pub async fn mirror_to_file(
    qmp: &QmpClient,
    device: &str,
    target: &Path,
    timeout: Duration,
    mut progress: impl FnMut(u64, u64),
    switching: impl FnOnce(),
) -> Result<(), BlockError> {
    let source = device_node(qmp, device).await?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let node = format!("{device}-m{}", stamp % 1_000_000);
    let job = format!("move-{node}");
    qmp.execute::<Value>(
        "blockdev-add",
        Some(json!({
            "driver": "qcow2",
            "node-name": node,
            "file": { "driver": "file", "filename": target.to_string_lossy() },
        })),
    )
    .await?;
    let result = run_mirror(qmp, &source, &node, &job, timeout, &mut progress, switching).await;
    if result.is_err() {
        let _ = qmp
            .execute::<Value>(
                "block-job-cancel",
                Some(json!({ "device": job, "force": true })),
            )
            .await;
        wait_gone(qmp, &job, Duration::from_secs(10)).await.ok();
        let _ = qmp
            .execute::<Value>("blockdev-del", Some(json!({ "node-name": node })))
            .await;
        return result;
    }
    // The old chain is no longer used by anything: close its files.
    if let Err(e) = qmp
        .execute::<Value>("blockdev-del", Some(json!({ "node-name": source })))
        .await
    {
        tracing::warn!(node = %source, error = %e, "closing the old disk chain");
    }
    Ok(())
}

async fn run_mirror(
    qmp: &QmpClient,
    source: &str,
    node: &str,
    job: &str,
    timeout: Duration,
    progress: &mut impl FnMut(u64, u64),
    switching: impl FnOnce(),
) -> Result<(), BlockError> {
    let mut switching = Some(switching);
    qmp.execute::<Value>(
        "blockdev-mirror",
        Some(json!({
            "job-id": job,
            "device": source,
            "target": node,
            "sync": "full",
            // Once in sync, every guest write reaches both files before it
            // completes: the target is current from then on.
            "copy-mode": "write-blocking",
            "auto-dismiss": false,
        })),
    )
    .await?;
    let started = Instant::now();
    let mut completing = false;
    loop {
        let jobs: Vec<JobInfo> = qmp.execute("query-block-jobs", None).await?;
        let Some(info) = jobs.into_iter().find(|j| j.device == job) else {
            return Err(BlockError::JobFailed {
                job: job.to_string(),
                reason: "the job vanished".into(),
            });
        };
        progress(info.offset, info.len);
        if info.status.as_deref() == Some("concluded") {
            let _ = qmp
                .execute::<Value>("job-dismiss", Some(json!({ "id": job })))
                .await;
            return match info.error {
                Some(reason) => Err(BlockError::JobFailed {
                    job: job.to_string(),
                    reason,
                }),
                None if completing => Ok(()),
                None => Err(BlockError::JobFailed {
                    job: job.to_string(),
                    reason: "it ended before switching over".into(),
                }),
            };
        }
        if info.ready && !completing {
            qmp.execute::<Value>("block-job-complete", Some(json!({ "device": job })))
                .await?;
            completing = true;
            if let Some(switching) = switching.take() {
                switching();
            }
        }
        if started.elapsed() > timeout {
            return Err(BlockError::Timeout(timeout));
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn wait_gone(qmp: &QmpClient, job: &str, timeout: Duration) -> Result<(), BlockError> {
    let started = Instant::now();
    loop {
        let jobs: Vec<JobInfo> = qmp.execute("query-block-jobs", None).await?;
        match jobs.iter().find(|j| j.device == job) {
            None => return Ok(()),
            Some(j) if j.status.as_deref() == Some("concluded") => {
                let _ = qmp
                    .execute::<Value>("job-dismiss", Some(json!({ "id": job })))
                    .await;
            }
            Some(_) if started.elapsed() > timeout => return Err(BlockError::Timeout(timeout)),
            Some(_) => tokio::time::sleep(POLL).await,
        }
    }
}
