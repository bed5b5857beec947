//! The host's volumes: standalone qcow2 data disks in `<data>/data-volumes`
//! that belong to the host, not to a VM. One is attached to at most one VM
//! at a time (as a disk whose record names it), travels through its
//! suspends untouched, and stays when the VM is removed.
//!
//! A VM's snapshots hold its own disks only, so a VM with a volume is not
//! cloned or snapshot by name: each would make a VM without it. A VM that
//! migrates takes its volumes along: synced in its directory on the target,
//! they become the target's volumes when the sync is done, and the source
//! removes its copies once the VM is gone from it.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use flotilla_api::{CreateVolumeRequest, VolumeInfo};

use super::VmManager;
use crate::error::{AgentError, AgentResult};
use crate::fsutil::sync_dir;
use crate::record::VmRecord;
use crate::spec::MAX_DISK_MIB;

const VOLUME_SUFFIX: &str = ".qcow2";
const TMP_PREFIX: &str = ".creating-";

/// Refuses `what` (an operation that copies a VM's disks into a new VM or
/// another host) for a VM with a volume attached, naming it.
pub(crate) fn refuse_with_volumes(record: &VmRecord, what: &str) -> AgentResult<()> {
    let Some(volume) = record.disks.iter().find_map(|d| d.volume.as_deref()) else {
        return Ok(());
    };
    Err(AgentError::conflict(
        format!(
            "VM {:?} has volume {volume:?} attached: {what} would make a VM without it",
            record.name
        ),
        Some(
            "a volume stays on its host with one VM at a time: remove the VM (the volume is kept) and attach the volume to a new one"
                .into(),
        ),
    ))
}

fn holder(name: &str) -> String {
    format!("volume:{name}")
}

impl VmManager {
    /// Refused while VM records could not be read (a volume may be attached
    /// to one of them).
    fn check_records_readable(&self, what: &str) -> AgentResult<()> {
        if !self
            .inner
            .unreadable_records
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Ok(());
        }
        Err(AgentError::conflict(
            format!("{what}: some VM records could not be read at start, and one of those VMs may have the volume"),
            Some("see the agent's log for the unreadable records; fix or remove them and restart the agent".into()),
        ))
    }

    /// While volume `name` is being made, asking for it says so (not "no
    /// such volume": a control plane settles its records by that answer).
    fn not_found_unless_pending(&self, name: &str) -> AgentError {
        if self.name_pending(&holder(name)) {
            return AgentError::conflict(
                format!("volume {name:?} is being made or removed"),
                Some("ask again when it is done".into()),
            );
        }
        AgentError::VolumeNotFound {
            name: name.to_string(),
        }
    }

    fn volumes_dir(&self) -> PathBuf {
        self.inner.config.data_volumes_dir()
    }

    pub(crate) fn volume_path(&self, name: &str) -> PathBuf {
        self.volumes_dir().join(format!("{name}{VOLUME_SUFFIX}"))
    }

    /// The VM volume `name` is attached to, if any. Call without holding
    /// any VM's lock.
    pub(crate) fn volume_user(&self, name: &str) -> Option<String> {
        let entries: Vec<_> = self.vms().values().cloned().collect();
        entries.iter().find_map(|e| {
            let s = e.lock();
            s.record
                .disks
                .iter()
                .any(|d| d.volume.as_deref() == Some(name))
                .then(|| s.record.name.clone())
        })
    }

    /// Makes an empty volume (written aside, then renamed into place).
    pub async fn volume_create(&self, req: CreateVolumeRequest) -> AgentResult<VolumeInfo> {
        crate::spec::validate_name("name", &req.name, 63).map_err(AgentError::from)?;
        if req.size_mib == 0 || req.size_mib > MAX_DISK_MIB {
            return Err(AgentError::InvalidArgument(format!(
                "size_mib: {} is out of range: use 1 to {MAX_DISK_MIB}",
                req.size_mib
            )));
        }
        let exists = || {
            AgentError::conflict(
                format!("a volume named {:?} exists on this host", req.name),
                Some("pick another name, or remove it first (`flotilla volume rm NAME`)".into()),
            )
        };
        let _name = self.reserve_name(holder(&req.name)).ok_or_else(exists)?;
        // Creates, attachments and removals of volumes take the admission
        // lock, as VM creates do: a volume is never attached while removed.
        let _admission = self.inner.admission.lock().await;
        let path = self.volume_path(&req.name);
        // A VM arriving with a volume of that name claims it too.
        if path.exists() || self.volume_user(&req.name).is_some() {
            return Err(exists());
        }
        let dir = self.volumes_dir();
        std::fs::create_dir_all(&dir)
            .map_err(|e| AgentError::io("creating the volumes directory", e))?;
        let tmp = dir.join(format!("{TMP_PREFIX}{}{VOLUME_SUFFIX}", req.name));
        let size_mib = req.size_mib;
        // qemu-img and fsync: off the async threads.
        let made = tokio::task::spawn_blocking(move || -> AgentResult<()> {
            let made = (|| -> AgentResult<()> {
                crate::disks::create_blank(&tmp, size_mib)?;
                std::fs::File::open(&tmp)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| AgentError::io("syncing the new volume", e))?;
                std::fs::rename(&tmp, &path)
                    .map_err(|e| AgentError::io("placing the new volume", e))?;
                sync_dir(&dir).map_err(|e| AgentError::io("syncing the volumes directory", e))
            })();
            if made.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            made
        })
        .await
        .map_err(|e| AgentError::io("creating the volume", std::io::Error::other(e)))?;
        made?;
        tracing::info!(volume = %req.name, size_mib = req.size_mib, "volume created");
        let name = req.name.clone();
        let manager = self.clone();
        tokio::task::spawn_blocking(move || manager.volume_get(&name))
            .await
            .map_err(|e| AgentError::io("reading the new volume", std::io::Error::other(e)))?
    }

    pub fn volume_get(&self, name: &str) -> AgentResult<VolumeInfo> {
        crate::spec::validate_name("name", name, 63).map_err(AgentError::from)?;
        let path = self.volume_path(name);
        let meta = std::fs::metadata(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => self.not_found_unless_pending(name),
            _ => AgentError::io(format!("reading volume {name}"), e),
        })?;
        let (_, size_mib) = crate::disks::inspect(&path)?;
        Ok(VolumeInfo {
            name: name.to_string(),
            size_mib,
            allocated_mib: (meta.blocks() * 512).div_ceil(1 << 20),
            path: path.display().to_string(),
            attached_to: self.volume_user(name),
        })
    }

    /// Every volume of the host, by name.
    pub fn volume_list(&self) -> AgentResult<Vec<VolumeInfo>> {
        let entries = match std::fs::read_dir(self.volumes_dir()) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(AgentError::io("listing volumes", e)),
        };
        let mut names: Vec<String> = entries
            .flatten()
            .filter_map(|e| {
                let file = e.file_name().into_string().ok()?;
                let name = file.strip_suffix(VOLUME_SUFFIX)?;
                (!name.starts_with('.')).then(|| name.to_string())
            })
            .collect();
        names.sort();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            match self.volume_get(&name) {
                Ok(v) => out.push(v),
                // Removed meanwhile.
                Err(AgentError::VolumeNotFound { .. }) => {}
                // One that cannot be read does not hide the others.
                Err(e) => tracing::warn!(volume = %name, error = %e, "listing a volume"),
            }
        }
        Ok(out)
    }

    /// Removes a volume and its data; refused while a VM has it attached.
    pub async fn volume_remove(&self, name: &str) -> AgentResult<()> {
        crate::spec::validate_name("name", name, 63).map_err(AgentError::from)?;
        let _name = self
            .reserve_name(holder(name))
            .ok_or_else(|| self.not_found_unless_pending(name))?;
        let _admission = self.inner.admission.lock().await;
        let path = self.volume_path(name);
        if !path.exists() {
            return Err(AgentError::VolumeNotFound {
                name: name.to_string(),
            });
        }
        self.check_records_readable(&format!("volume {name:?} is kept"))?;
        if let Some(vm) = self.volume_user(name) {
            return Err(AgentError::conflict(
                format!("volume {name:?} is attached to VM {vm:?}"),
                Some(format!(
                    "remove the VM first (`flotilla vm rm {vm}`): the volume is kept"
                )),
            ));
        }
        std::fs::remove_file(&path).map_err(|e| AgentError::io("removing the volume", e))?;
        let _ = sync_dir(&self.volumes_dir());
        tracing::info!(volume = name, "volume removed");
        Ok(())
    }

    /// A migrated-in volume moved to the host's volumes by an agent that
    /// died before it recorded the move: the record follows the file.
    pub(crate) fn find_placed_volumes(&self, record: &mut VmRecord) {
        let mut changed = false;
        for disk in record.disks.iter_mut() {
            let Some(volume) = &disk.volume else { continue };
            let placed = self.volume_path(volume);
            if !disk.path.exists() && placed.exists() {
                disk.path = placed;
                changed = true;
            }
        }
        if changed {
            if let Err(e) = record.save(&self.vm_dir(&record.name)) {
                tracing::warn!(vm = %record.name, error = %e, "recording a placed volume");
            }
        }
    }

    /// Removes volumes left half made by an agent that died creating them.
    pub(crate) fn remove_volume_leftovers(&self) {
        let Ok(entries) = std::fs::read_dir(self.volumes_dir()) else {
            return;
        };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// The disk record of volume `volume` attached as disk `disk` of a new
    /// VM (called under the admission lock).
    pub(crate) fn volume_disk(
        &self,
        disk: &str,
        volume: &str,
    ) -> AgentResult<crate::record::DiskRecord> {
        let path = self.volume_path(volume);
        if !path.exists() {
            return Err(self.not_found_unless_pending(volume));
        }
        if self.name_pending(&holder(volume)) {
            return Err(AgentError::conflict(
                format!("volume {volume:?} is being removed"),
                None,
            ));
        }
        self.check_records_readable(&format!("volume {volume:?} is not attached"))?;
        if let Some(vm) = self.volume_user(volume) {
            return Err(AgentError::conflict(
                format!("volume {volume:?} is attached to VM {vm:?}"),
                Some("a volume is attached to one VM at a time".into()),
            ));
        }
        let (format, size_mib) = crate::disks::inspect(&path)?;
        Ok(crate::record::DiskRecord {
            name: disk.to_string(),
            path,
            format,
            size_mib,
            backing: None,
            read_only: false,
            sync_from: None,
            volume: Some(volume.to_string()),
        })
    }
}
