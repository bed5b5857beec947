//! Live migration between two QEMUs on different hosts, the QEMU side of it:
//! memory pre-copied over TCP by QEMU's own migration stream, and disks
//! synced after the switch-over ("post-copy" of disks).
//!
//! The disk scheme, all stock QEMU:
//! - the source QEMU exports each disk read-only over NBD (`allow-inactive`,
//!   so migration may still inactivate the disks at the switch-over);
//! - the target's disk is a fresh qcow2 whose backing is that export (raw
//!   over NBD, see [`crate::config::NbdBacking`]): it reads from the source
//!   what it has not written itself;
//! - at the switch-over the source re-activates its disks for reading
//!   ([`reactivate_for_reads`]) and the target continues; then
//!   [`stream_from_backing`] copies the rest in the background and drops the
//!   backing, after which the source may go.
//!
//! Layered disks: an overlay over an image both hosts have is also exported
//! as its own bytes ([`export_layer`]) once the source is paused at the
//! switch-over (an export's size is fixed when it is made, and the overlay
//! grows while the VM runs). The target then moves its disk onto those
//! bytes, read as qcow2 over NBD with its local copy of the image as their
//! backing ([`move_to_layer`], a `blockdev-reopen`), and the stream stops at
//! that base: only the overlay's clusters cross.
//!
//! The source's copy never changes after the switch-over, so until the sync
//! is done it stays a consistent image of the disk as it was then.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::block::BlockError;
use crate::error::QmpError;
use crate::qmp::QmpClient;

const POLL: Duration = Duration::from_millis(20);

/// Where a migration stands, from `query-migrate` on either side.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LiveProgress {
    /// `setup`, `active`, `device`, `completed`, `failed`, `cancelled`, ...
    pub status: String,
    pub total_ms: u64,
    /// Guest pause at the switch-over, as QEMU measured it.
    pub downtime_ms: Option<u64>,
    /// Expected pause if QEMU switched over now.
    pub expected_downtime_ms: Option<u64>,
    pub transferred_bytes: u64,
    pub remaining_bytes: u64,
    pub memory_bytes: u64,
    /// Pages the guest dirties per second (from the last round).
    pub dirty_pages_rate: u64,
    /// Bytes per second the stream achieves.
    pub throughput_bps: u64,
    /// Pre-copy rounds over memory.
    pub rounds: u64,
    /// How much auto-converge slows the guest's vCPUs, percent.
    pub cpu_throttle_percent: u64,
    pub error: Option<String>,
}

impl LiveProgress {
    pub fn is_finished(&self) -> bool {
        matches!(self.status.as_str(), "completed" | "failed" | "cancelled")
    }
}

fn progress_of(v: &Value) -> LiveProgress {
    let ram = &v["ram"];
    let n = |x: &Value| x.as_u64().unwrap_or(0);
    LiveProgress {
        status: v["status"].as_str().unwrap_or("none").to_string(),
        total_ms: n(&v["total-time"]),
        downtime_ms: v["downtime"].as_u64(),
        expected_downtime_ms: v["expected-downtime"].as_u64(),
        transferred_bytes: n(&ram["transferred"]),
        remaining_bytes: n(&ram["remaining"]),
        memory_bytes: n(&ram["total"]),
        dirty_pages_rate: n(&ram["dirty-pages-rate"]),
        // QEMU reports mbps (megabits per second) as a float.
        throughput_bps: (ram["mbps"].as_f64().unwrap_or(0.0) * 1_000_000.0 / 8.0) as u64,
        rounds: n(&ram["dirty-sync-count"]),
        cpu_throttle_percent: n(&v["cpu-throttle-percentage"]),
        error: v["error-desc"].as_str().map(str::to_string),
    }
}

/// Waits for QEMU's next MIGRATION event (a status change) on `events`,
/// or until it is closed.
pub async fn next_status_change(events: &mut tokio::sync::broadcast::Receiver<crate::QmpEvent>) {
    loop {
        match events.recv().await {
            Ok(e) if e.event == "MIGRATION" => return,
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                // Never again: leave the waiting to the caller's timer.
                std::future::pending::<()>().await
            }
        }
    }
}

/// The migration's progress now.
pub async fn progress(qmp: &QmpClient) -> Result<LiveProgress, QmpError> {
    let v: Value = qmp.execute("query-migrate", None).await?;
    Ok(progress_of(&v))
}

/// Limits of a live migration; `None`: see each field.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveLimits {
    /// The longest pause QEMU may plan for at the switch-over
    /// ([`DEFAULT_DOWNTIME_MS`] when `None`).
    pub max_downtime_ms: Option<u64>,
    /// Bytes per second the stream may use (no limit when `None`).
    pub max_bandwidth_bps: Option<u64>,
    /// Throttle the guest's vCPUs while the stream does not converge.
    pub auto_converge: bool,
    /// Allow a switch to post-copy ([`start_post_copy`]); the target must
    /// allow it too.
    pub post_copy: bool,
    /// Connections of the memory stream: more than one is QEMU's multifd
    /// (pages sent and loaded by that many threads, and a receiving QEMU
    /// never touches the memory of a page that arrives as zero). Not with
    /// `post_copy`, nor over QEMU's own TLS: QEMU 10.0 aborts when such a
    /// stream is cancelled while its threads send. The target must listen with as many.
    #[serde(default)]
    pub channels: u32,
}

/// The pause a pre-copy plans for unless told otherwise. QEMU's own, 300
/// ms, let it stop the guest with up to 300 ms worth of pages still to send
/// (by a rate that counts bytes still in socket buffers): 2-18 ms more
/// pause for an idle guest than with this. A guest that dirties memory
/// faster than that allows converges by the migration's policy
/// (auto-converge by default).
pub const DEFAULT_DOWNTIME_MS: u64 = 30;

// These defaults are restored after a migration so its limits never stay
// on the VM's QEMU: a later capture would crawl at a leftover 1 MiB/s.

/// No bandwidth limit unless asked for (as libvirt and OpenStack do):
/// QEMU's own default, 128 MiB/s, made an idle 256 MiB guest's stream take
/// twice as long as it needs on a fast link. QEMU reads 0 as no limit.
pub const UNLIMITED_BANDWIDTH: u64 = 0;

/// A stream over TCP: the file formats other operations may have set
/// (`mapped-ram`, `multifd`, or a resumed VM's `-global`) are switched off.
async fn stream_capabilities(
    qmp: &QmpClient,
    auto_converge: bool,
    post_copy: bool,
    channels: u32,
) -> Result<(), QmpError> {
    let multifd = channels > 1;
    if multifd {
        qmp.execute::<Value>(
            "migrate-set-parameters",
            Some(json!({ "multifd-channels": channels })),
        )
        .await?;
    }
    qmp.execute::<Value>(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": [
            { "capability": "mapped-ram", "state": false },
            { "capability": "multifd", "state": multifd },
            // MIGRATION events: the end is seen at once, not at a poll.
            { "capability": "events", "state": true },
            { "capability": "auto-converge", "state": auto_converge },
            { "capability": "postcopy-ram", "state": post_copy },
        ] })),
    )
    .await?;
    Ok(())
}

/// Sets the limits of the next migration (the defaults where `None`).
pub async fn set_limits(qmp: &QmpClient, limits: LiveLimits) -> Result<(), QmpError> {
    qmp.execute::<Value>(
        "migrate-set-parameters",
        Some(json!({
            "downtime-limit": limits.max_downtime_ms.unwrap_or(DEFAULT_DOWNTIME_MS),
            "max-bandwidth": limits.max_bandwidth_bps.unwrap_or(UNLIMITED_BANDWIDTH),
            // The limit holds after a switch to post-copy too.
            "max-postcopy-bandwidth": limits.max_bandwidth_bps.unwrap_or(UNLIMITED_BANDWIDTH),
        })),
    )
    .await?;
    Ok(())
}

/// Makes the migration's TLS credentials in a running QEMU (the source):
/// `dir` holds `keys.psk`.
pub async fn add_tls(qmp: &QmpClient, dir: &std::path::Path) -> Result<(), QmpError> {
    remove_tls(qmp).await;
    for (id, endpoint) in [
        (crate::config::TLS_SERVER_ID, "server"),
        (crate::config::TLS_CLIENT_ID, "client"),
    ] {
        qmp.execute::<Value>(
            "object-add",
            Some(
                json!({ "qom-type": "tls-creds-psk", "id": id, "endpoint": endpoint,
                         "dir": dir.to_string_lossy(),
                         "priority": crate::config::TLS_PRIORITY }),
            ),
        )
        .await?;
    }
    Ok(())
}

/// Drops the migration's TLS credentials (none is fine).
pub async fn remove_tls(qmp: &QmpClient) {
    let _ = qmp
        .execute::<Value>("migrate-set-parameters", Some(json!({ "tls-creds": "" })))
        .await;
    for id in [crate::config::TLS_SERVER_ID, crate::config::TLS_CLIENT_ID] {
        let _ = qmp
            .execute::<Value>("object-del", Some(json!({ "id": id })))
            .await;
    }
}

/// Which of a migration's TLS credentials a stream uses: the ids of
/// [`add_tls`] (or a `tls_psk_dir` config), or none.
async fn stream_tls(qmp: &QmpClient, creds: Option<&str>) -> Result<(), QmpError> {
    qmp.execute::<Value>(
        "migrate-set-parameters",
        Some(json!({ "tls-creds": creds.unwrap_or("") })),
    )
    .await?;
    Ok(())
}

/// Where a migration stream is sent to or received at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamAddr {
    /// TCP: between hosts (port 0 to listen: the system picks one).
    Tcp(SocketAddr),
    /// A unix socket: to or from this host's agent, which carries the
    /// stream between hosts (only the socket's owner can connect).
    Unix(std::path::PathBuf),
}

impl StreamAddr {
    /// The TCP port, for a TCP address.
    pub fn tcp_port(&self) -> Option<u16> {
        match self {
            StreamAddr::Tcp(a) => Some(a.port()),
            StreamAddr::Unix(_) => None,
        }
    }

    fn uri(&self) -> String {
        match self {
            StreamAddr::Tcp(a) => format!("tcp:{a}"),
            StreamAddr::Unix(p) => format!("unix:{}", p.display()),
        }
    }
}

/// Starts sending the running VM's state to a target listening at `to`,
/// over TLS when `tls` (credentials from [`add_tls`]).
pub async fn start_outgoing(
    qmp: &QmpClient,
    to: &StreamAddr,
    limits: LiveLimits,
    tls: bool,
) -> Result<(), QmpError> {
    stream_capabilities(qmp, limits.auto_converge, limits.post_copy, limits.channels).await?;
    set_limits(qmp, limits).await?;
    stream_tls(qmp, tls.then_some(crate::config::TLS_CLIENT_ID)).await?;
    qmp.execute::<Value>("migrate", Some(json!({ "uri": to.uri() })))
        .await?;
    Ok(())
}

/// Makes a QEMU started with `-incoming defer` listen at `at`; returns
/// where it listens (a TCP port 0 replaced by the one the system chose).
pub async fn listen_incoming(
    qmp: &QmpClient,
    at: &StreamAddr,
    tls: bool,
    post_copy: bool,
    channels: u32,
) -> Result<StreamAddr, QmpError> {
    stream_capabilities(qmp, false, post_copy, channels).await?;
    stream_tls(qmp, tls.then_some(crate::config::TLS_SERVER_ID)).await?;
    qmp.execute::<Value>("migrate-incoming", Some(json!({ "uri": at.uri() })))
        .await?;
    let StreamAddr::Tcp(tcp) = at else {
        return Ok(at.clone());
    };
    let v: Value = qmp.execute("query-migrate", None).await?;
    let port = v["socket-address"]
        .as_array()
        .and_then(|a| a.first())
        .and_then(|a| a["port"].as_str())
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| QmpError::Protocol(format!("no listening port in {v}")))?;
    Ok(StreamAddr::Tcp(SocketAddr::new(tcp.ip(), port)))
}

/// Switches a running pre-copy to post-copy: the source stops the VM and
/// sends its device state; the target may then run it, fetching the pages
/// it lacks from the source, which sends the rest meanwhile.
pub async fn start_post_copy(qmp: &QmpClient) -> Result<(), QmpError> {
    qmp.execute::<Value>("migrate-start-postcopy", None).await?;
    Ok(())
}

/// Whether an incoming QEMU has the device state of a post-copy and may be
/// continued (it received everything but pages).
pub async fn post_copy_ready(qmp: &QmpClient) -> Result<bool, QmpError> {
    let p = progress(qmp).await?;
    if !p.status.starts_with("postcopy") {
        return Ok(false);
    }
    // Until the source's "run" command has been loaded the run state is
    // `inmigrate`; after it, paused (the QEMU was started with -S).
    Ok(qmp.query_status().await?.status != "inmigrate")
}

/// After a cut during post-copy both QEMUs wait (`postcopy-paused`), the
/// VM on the target stalled on pages it lacks. The target listens again at
/// `at` for the source to resume ([`resume_outgoing`]).
pub async fn listen_recover(qmp: &QmpClient, at: SocketAddr) -> Result<(), QmpError> {
    qmp.execute_oob::<Value>(
        "migrate-recover",
        Some(json!({ "uri": format!("tcp:{at}") })),
    )
    .await?;
    Ok(())
}

/// Pauses a post-copy whose stream is stuck (a network that stays cut),
/// on either side, so that it can be resumed on a new connection.
pub async fn pause_post_copy(qmp: &QmpClient) -> Result<(), QmpError> {
    qmp.execute_oob::<Value>("migrate-pause", None).await?;
    Ok(())
}

/// Resumes a paused post-copy to a target listening again at `to`.
pub async fn resume_outgoing(qmp: &QmpClient, to: SocketAddr) -> Result<(), QmpError> {
    qmp.execute::<Value>(
        "migrate",
        Some(json!({ "uri": format!("tcp:{to}"), "resume": true })),
    )
    .await?;
    Ok(())
}

/// Cancels an outgoing migration and waits until QEMU is done with it (the
/// source VM runs on).
pub async fn cancel(qmp: &QmpClient, timeout: Duration) -> Result<(), QmpError> {
    let _ = qmp.execute::<Value>("migrate_cancel", None).await;
    let started = Instant::now();
    let mut yanked = false;
    loop {
        let p = progress(qmp).await?;
        if p.is_finished() || p.status == "none" || started.elapsed() > timeout {
            return Ok(());
        }
        if !yanked && p.status == "cancelling" && started.elapsed() > YANK_AFTER {
            // A stream thread stuck sending to a peer that no longer
            // answers (a cut network) holds the cancel up until TCP gives
            // up, minutes later: its connections are shut down under it.
            yanked = true;
            let _ = qmp
                .execute::<Value>(
                    "yank",
                    Some(json!({ "instances": [{ "type": "migration" }] })),
                )
                .await;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// How long a cancel waits before it shuts the stream's connections down.
const YANK_AFTER: Duration = Duration::from_millis(500);

/// Exports disks (block node, export name) read-only over NBD on `listen`,
/// for a target to read what it has not copied yet.
pub async fn export_disks(
    qmp: &QmpClient,
    listen: SocketAddr,
    disks: &[(String, String)],
    tls: bool,
) -> Result<(), QmpError> {
    let mut server = json!({ "addr": { "type": "inet", "data": {
        "host": listen.ip().to_string(), "port": listen.port().to_string() } } });
    if tls {
        server["tls-creds"] = json!(crate::config::TLS_SERVER_ID);
    }
    qmp.execute::<Value>("nbd-server-start", Some(server))
        .await?;
    for (node, export) in disks {
        qmp.execute::<Value>(
            "block-export-add",
            Some(json!({
                "type": "nbd", "id": format!("sync-{export}"), "node-name": node,
                "name": export, "writable": false,
                // Migration inactivates the disks at the switch-over; the
                // export must not stand in its way.
                "allow-inactive": true,
            })),
        )
        .await?;
    }
    Ok(())
}

/// Also exports the bytes of image file `path` (a disk's qcow2 overlay)
/// read-only as `export`, on the server [`export_disks`] started. The file
/// gets a node of its own: the disk's file node cannot be exported, as its
/// format node needs a right (resize) an export does not share. Without
/// locking, which would refuse a second opener of a file in use; reads go
/// through the same page cache as the disk's writes.
pub async fn export_layer(
    qmp: &QmpClient,
    path: &std::path::Path,
    export: &str,
) -> Result<(), QmpError> {
    let node = layer_node(export);
    qmp.execute::<Value>(
        "blockdev-add",
        Some(json!({
            "driver": "file", "node-name": node, "filename": path.to_string_lossy(),
            "read-only": true, "locking": "off",
        })),
    )
    .await?;
    let exported = qmp
        .execute::<Value>(
            "block-export-add",
            Some(json!({
                "type": "nbd", "id": format!("sync-{export}"), "node-name": node,
                "name": export, "writable": false, "allow-inactive": true,
            })),
        )
        .await;
    if let Err(e) = exported {
        let _ = qmp
            .execute::<Value>("blockdev-del", Some(json!({ "node-name": node })))
            .await;
        return Err(e);
    }
    Ok(())
}

fn layer_node(export: &str) -> String {
    format!("{export}-bytes")
}

/// Ends the NBD exports (nothing to do when there are none) and the nodes
/// of [`export_layer`].
pub async fn unexport_disks(qmp: &QmpClient, exports: &[String]) {
    for export in exports {
        let _ = qmp
            .execute::<Value>(
                "block-export-del",
                Some(json!({ "id": format!("sync-{export}"), "mode": "hard" })),
            )
            .await;
    }
    let _ = qmp.execute::<Value>("nbd-server-stop", None).await;
    // A deleted export lets go of its node a moment later.
    let nodes: Option<Vec<Value>> = qmp
        .execute("query-named-block-nodes", Some(json!({ "flat": true })))
        .await
        .ok();
    for export in exports {
        let node = layer_node(export);
        let exists = match &nodes {
            Some(n) => n.iter().any(|n| n["node-name"] == node.as_str()),
            None => export.ends_with(".layer"),
        };
        if !exists {
            continue;
        }
        for _ in 0..50 {
            let gone = qmp
                .execute::<Value>("blockdev-del", Some(json!({ "node-name": node })))
                .await;
            if gone.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Moves a running disk's backing from the source's whole-disk export to
/// its overlay's bytes over the local base (`nbd.layer`), which hold the
/// same data now that the source is paused: a sync from there copies only
/// the overlay's clusters. On an error the disk keeps its old backing.
pub async fn move_to_layer(
    qmp: &QmpClient,
    drive_id: &str,
    format: &str,
    nbd: &crate::config::NbdBacking,
) -> Result<(), QmpError> {
    let Some(layer) = &nbd.layer else {
        return Err(QmpError::Protocol(
            "the disk has no layer to move to".into(),
        ));
    };
    let node = format!("{drive_id}.layer");
    qmp.execute::<Value>(
        "blockdev-add",
        Some(crate::config::layered_backing_json(
            &node, drive_id, nbd, layer,
        )),
    )
    .await?;
    let reopened = qmp
        .execute::<Value>(
            "blockdev-reopen",
            Some(json!({ "options": [{
                "driver": format,
                "node-name": drive_id,
                "file": crate::config::file_node_name(drive_id),
                "read-only": false,
                "backing": node,
            }] })),
        )
        .await;
    if let Err(e) = reopened {
        let _ = qmp
            .execute::<Value>("blockdev-del", Some(json!({ "node-name": node })))
            .await;
        return Err(e);
    }
    Ok(())
}

/// Drops the node [`move_to_layer`] added, once a sync has taken the disk
/// off it (nothing to do when there is none): it would keep its link to
/// the source.
pub async fn drop_layer_node(qmp: &QmpClient, drive_id: &str) {
    let _ = qmp
        .execute::<Value>(
            "blockdev-del",
            Some(json!({ "node-name": format!("{drive_id}.layer") })),
        )
        .await;
}

/// After the switch-over the source's disks are inactive, and an inactive
/// node refuses reads: activated again, they serve the target's reads. The
/// paused source never writes them.
pub async fn reactivate_for_reads(qmp: &QmpClient, nodes: &[String]) -> Result<(), QmpError> {
    for node in nodes {
        qmp.execute::<Value>(
            "blockdev-set-active",
            Some(json!({ "node-name": node, "active": true })),
        )
        .await?;
    }
    Ok(())
}

/// Activates every block node of a QEMU waiting for an incoming migration
/// (QEMU keeps them inactive until `cont`, for storage the source still
/// writes). For disks that are the target's own files, not shared with the
/// source, this is safe early, and takes reopening them off the pause.
pub async fn activate_own_disks(qmp: &QmpClient) -> Result<(), QmpError> {
    qmp.execute::<Value>("blockdev-set-active", Some(json!({ "active": true })))
        .await?;
    Ok(())
}

/// Where a layered disk sync stops: the local base stays the disk's
/// backing, named `backing_file` in its header.
#[derive(Debug, Clone, Copy)]
pub struct StreamBase<'a> {
    pub node: &'a str,
    pub backing_file: &'a str,
}

/// Copies into the disk `node` everything its (NBD) backing still holds,
/// at most `speed` bytes per second, then drops the backing. `progress`
/// gets (bytes done, bytes total).
pub async fn stream_from_backing(
    qmp: &QmpClient,
    node: &str,
    speed: Option<u64>,
    base: Option<StreamBase<'_>>,
    mut progress: impl FnMut(u64, u64),
) -> Result<(), BlockError> {
    let job = format!("sync-{node}");
    // A job left by an earlier attempt (an agent restart) is reused.
    let jobs: Vec<Value> = qmp.execute("query-jobs", None).await?;
    if !jobs.iter().any(|j| j["id"] == job) {
        let mut args = json!({ "job-id": job, "device": node, "auto-dismiss": false });
        if let Some(bps) = speed {
            args["speed"] = json!(bps);
        }
        if let Some(base) = base {
            args["base-node"] = json!(base.node);
            args["backing-file"] = json!(base.backing_file);
        }
        qmp.execute::<Value>("block-stream", Some(args)).await?;
    }
    loop {
        let jobs: Vec<Value> = qmp.execute("query-jobs", None).await?;
        let Some(info) = jobs.iter().find(|j| j["id"] == job) else {
            return Err(BlockError::JobFailed {
                job,
                reason: "the job vanished".into(),
            });
        };
        progress(
            info["current-progress"].as_u64().unwrap_or(0),
            info["total-progress"].as_u64().unwrap_or(0),
        );
        if info["status"] == "concluded" {
            let error = info["error"].as_str().map(str::to_string);
            // Dismissed before anything else asks about block nodes.
            let _ = qmp
                .execute::<Value>("job-dismiss", Some(json!({ "id": job })))
                .await;
            return match error {
                Some(reason) => Err(BlockError::JobFailed { job, reason }),
                None => Ok(()),
            };
        }
        tokio::time::sleep(POLL).await;
    }
}
