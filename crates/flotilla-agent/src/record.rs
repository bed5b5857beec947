//! The on-disk record of one VM: `vms/<name>/vm.json`.
//!
//! The record is the source of truth across agent restarts. It is written
//! whole with write-then-rename, so a crash leaves the old or the new record,
//! never a mix. VM directories are created as `.creating-<id>` and renamed
//! into place once complete, and removed via `.deleting-<id>`, so a crash in
//! the middle of a create or delete never leaves a VM that looks complete.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use flotilla_api::{DiskInfo, NicInfo, VmInfo, VmState};
use flotilla_qemu::{Accel, ProcessIdentity};
use serde::{Deserialize, Serialize};

use crate::fsutil::write_atomic;

/// Bumped when the record's shape changes incompatibly.
pub const RECORD_FORMAT_VERSION: u32 = 1;
pub const RECORD_FILE: &str = "vm.json";
pub const CREATING_PREFIX: &str = ".creating-";
pub const DELETING_PREFIX: &str = ".deleting-";

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot read VM record {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("VM record {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "VM record {path} has format version {found}, this agent reads {RECORD_FORMAT_VERSION}"
    )]
    Version { path: PathBuf, found: u32 },
    #[error("cannot write VM record {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskRecord {
    pub name: String,
    pub path: PathBuf,
    pub format: String,
    pub size_mib: u64,
    pub backing: Option<PathBuf>,
    /// Attached read-only (a clone sharing its source's volume).
    #[serde(default)]
    pub read_only: bool,
    /// A migrated-in disk still reading what it lacks from the source
    /// host's export, until its sync is done.
    #[serde(default)]
    pub sync_from: Option<flotilla_qemu::NbdBacking>,
    /// The host's volume this disk is: not the VM's, so never copied into
    /// its snapshots nor removed with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NicRecord {
    pub mac: String,
    pub ip: std::net::Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: std::net::Ipv4Addr,
    pub tap: String,
}

/// What the agent knows of a VM, persisted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmRecord {
    pub format_version: u32,
    pub id: String,
    pub name: String,
    pub image: String,
    /// The image's kernel and initramfs as resolved at create time, so a
    /// later change of the image does not change an existing VM.
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub cmdline_extra: String,
    pub tags: BTreeMap<String, String>,
    pub disks: Vec<DiskRecord>,
    pub nics: Vec<NicRecord>,
    pub state: VmState,
    pub created_at: String,
    pub started_at: Option<String>,
    /// The QEMU process while `state.has_process()`.
    pub process: Option<ProcessIdentity>,
    pub accel: Option<Accel>,
    pub guest_boot_ms: Option<u64>,
    pub ready_ms: Option<u64>,
    pub last_error: Option<String>,
    /// Head of the VM's snapshot chain: the layer it was last suspended to.
    #[serde(default)]
    pub snapshot_head: Option<String>,
    /// A layer written by a suspend that has not finished yet: if the agent
    /// dies after QEMU quit, this complete layer is where the VM now lives.
    #[serde(default)]
    pub pending_snapshot: Option<String>,
    /// `/etc/machine-id` of the guest: 32 hex digits, this VM's own.
    #[serde(default)]
    pub machine_id: Option<String>,
    /// The VM's memory comes from another VM's snapshot (a clone, a start
    /// from a snapshot): its MAC, IP, hostname, machine-id and RNG are still
    /// the other VM's until the guest agent has applied this VM's own.
    #[serde(default)]
    pub identity_pending: bool,
    /// A root-disk move in progress: if the agent dies, the next one sees
    /// which file QEMU really uses and finishes or undoes the move.
    #[serde(default)]
    pub pending_move: Option<PendingMove>,
    /// The live migration this VM is in (as its source or its target).
    #[serde(default)]
    pub migration: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PendingMove {
    pub from: PathBuf,
    pub from_backing: Option<PathBuf>,
    pub to: PathBuf,
}

impl VmRecord {
    pub fn dir(&self, vms_dir: &Path) -> PathBuf {
        vms_dir.join(&self.name)
    }

    /// Writes the record into `dir` atomically.
    pub fn save(&self, dir: &Path) -> Result<(), RecordError> {
        let path = dir.join(RECORD_FILE);
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| RecordError::Write {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        write_atomic(&path, &bytes).map_err(|source| RecordError::Write { path, source })
    }

    pub fn load(dir: &Path) -> Result<VmRecord, RecordError> {
        let path = dir.join(RECORD_FILE);
        let bytes = fs::read(&path).map_err(|source| RecordError::Read {
            path: path.clone(),
            source,
        })?;
        let record: VmRecord =
            serde_json::from_slice(&bytes).map_err(|source| RecordError::Corrupt {
                path: path.clone(),
                source,
            })?;
        if record.format_version != RECORD_FORMAT_VERSION {
            return Err(RecordError::Version {
                path,
                found: record.format_version,
            });
        }
        Ok(record)
    }

    /// The public view; runtime fields (QEMU status, readiness) come from the caller.
    pub fn to_info(&self, qemu_status: Option<String>, guest_ready: bool) -> VmInfo {
        VmInfo {
            name: self.name.clone(),
            id: self.id.clone(),
            state: self.state,
            image: self.image.clone(),
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            tags: self.tags.clone(),
            nics: self
                .nics
                .iter()
                .map(|n| NicInfo {
                    mac: n.mac.clone(),
                    ip: n.ip.to_string(),
                    prefix_len: n.prefix_len,
                    gateway: n.gateway.to_string(),
                    tap: n.tap.clone(),
                })
                .collect(),
            disks: self
                .disks
                .iter()
                .map(|d| DiskInfo {
                    name: d.name.clone(),
                    path: d.path.display().to_string(),
                    format: d.format.clone(),
                    virtual_size_mib: d.size_mib,
                    backing: d.backing.as_ref().map(|b| b.display().to_string()),
                    volume: d.volume.clone(),
                })
                .collect(),
            created_at: self.created_at.clone(),
            started_at: self.started_at.clone(),
            pid: if self.state.has_process() {
                self.process.map(|p| p.pid)
            } else {
                None
            },
            qemu_status,
            accel: self.accel.map(|a| a.to_string()),
            guest_ready,
            guest_boot_ms: self.guest_boot_ms,
            ready_ms: self.ready_ms,
            last_error: self.last_error.clone(),
            snapshot: self.snapshot_head.clone(),
            warm: false,
            guest: None,
        }
    }
}

/// Loads every complete VM record under `vms_dir`, removing leftovers of
/// creates and deletes that a crash interrupted. Records that cannot be read
/// are reported, not dropped silently, and their directories are kept.
pub fn load_all(vms_dir: &Path) -> std::io::Result<(Vec<VmRecord>, Vec<RecordError>)> {
    fs::create_dir_all(vms_dir)?;
    let mut records = Vec::new();
    let mut errors = Vec::new();
    for entry in fs::read_dir(vms_dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if name.starts_with(CREATING_PREFIX) || name.starts_with(DELETING_PREFIX) {
            tracing::info!(dir = %path.display(), "removing the leftover of an interrupted create or delete");
            fs::remove_dir_all(&path)?;
            continue;
        }
        if name.starts_with('.') || !path.is_dir() {
            continue;
        }
        match VmRecord::load(&path) {
            Ok(r) => records.push(r),
            Err(e) => errors.push(e),
        }
    }
    records.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((records, errors))
}

/// Current time in RFC 3339 (UTC, seconds).
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    rfc3339_from_unix(secs)
}

fn rfc3339_from_unix(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if mo <= 2 { 1 } else { 0 };
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339_from_unix(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_from_unix(1_795_000_000), "2026-11-18T11:06:40Z");
    }

    #[test]
    fn interrupted_creates_are_removed_and_corrupt_records_reported() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join(".creating-abc")).unwrap();
        fs::create_dir_all(dir.path().join("broken")).unwrap();
        fs::write(dir.path().join("broken").join(RECORD_FILE), b"{not json").unwrap();
        let (records, errors) = load_all(dir.path()).unwrap();
        assert!(records.is_empty());
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().contains("corrupt"));
        assert!(!dir.path().join(".creating-abc").exists());
        assert!(dir.path().join("broken").exists());
    }
}
