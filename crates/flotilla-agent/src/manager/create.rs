//! Creating and removing VMs: directory, disks, addresses, record.

use std::collections::HashSet;
use std::fs;

use flotilla_api::{CreateVmRequest, Resources, VmInfo, VmState};
use flotilla_image::DEFAULT_IMAGE;

use super::{VmEntry, VmManager};
use crate::disks;
use crate::error::{AgentError, AgentResult};
use crate::fsutil::sync_dir;
use crate::network::{allocate_ip, allocate_mac, tap_name};
use crate::record::{
    now_rfc3339, DiskRecord, NicRecord, VmRecord, CREATING_PREFIX, DELETING_PREFIX,
    RECORD_FORMAT_VERSION,
};
use crate::spec::VmSpec;

/// Root disk file inside a VM's directory.
pub const ROOT_DISK: &str = "root.qcow2";

fn new_vm_id() -> String {
    let b: [u8; 8] = rand::random();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl VmManager {
    /// Creates a VM and, unless asked not to, starts it.
    pub async fn create(&self, req: CreateVmRequest) -> AgentResult<VmInfo> {
        let spec = VmSpec::from_request(req)?;
        let image_name = spec.image.clone().unwrap_or_else(|| DEFAULT_IMAGE.to_string());
        let image = self.inner.images.get(&image_name)?;
        if spec.start {
            // Refuse early what could never start; start() checks again under the lock.
            let cap = self.inner.config.capacity;
            let needed = Resources {
                vcpus: spec.vcpus,
                memory_mib: spec.memory_mib,
            };
            crate::capacity::check_fits(cap, self.allocated(), needed)?;
        }

        let entry = {
            // Name, addresses and MACs are taken under the admission lock so
            // two concurrent creates never get the same ones.
            let _admission = self.inner.admission.lock().await;
            if self.vms().contains_key(&spec.name) {
                return Err(AgentError::VmExists { name: spec.name });
            }
            let record = self.build_record(&spec, &image_name, &image)?;
            self.materialize(&record, &image)?;
            let entry = VmEntry::new(record);
            self.vms().insert(spec.name.clone(), entry.clone());
            entry
        };
        tracing::info!(vm = %spec.name, image = %image_name, "created");
        if spec.start {
            if let Err(e) = self.start_entry(&entry, spec.wait_ready).await {
                // `run` is one operation: a VM that could not start is removed
                // again rather than left behind half made.
                tracing::warn!(vm = %spec.name, error = %e, "start failed; removing the new VM");
                if let Err(cleanup) = self.delete(&spec.name, true).await {
                    tracing::error!(vm = %spec.name, error = %cleanup, "could not remove the VM after a failed start");
                }
                return Err(e);
            }
        } else {
            let mut s = entry.lock();
            self.transition(&mut s, VmState::Stopped)?;
            self.save(&s)?;
        }
        Ok(self.info_of(&entry))
    }

    fn build_record(
        &self,
        spec: &VmSpec,
        image_name: &str,
        image: &flotilla_image::Image,
    ) -> AgentResult<VmRecord> {
        let cfg = &self.inner.config;
        let id = new_vm_id();
        let (used_ips, used_macs) = {
            let mut ips = HashSet::new();
            let mut macs = HashSet::new();
            for e in self.vms().values() {
                for n in &e.lock().record.nics {
                    ips.insert(n.ip);
                    macs.insert(n.mac.clone());
                }
            }
            (ips, macs)
        };
        let mut used_ips = used_ips;
        let mut used_macs = used_macs;
        let mut nics = Vec::new();
        for i in 0..spec.nics as usize {
            let ip = allocate_ip(&cfg.subnet, &used_ips)?;
            used_ips.insert(ip);
            let mac = allocate_mac(&used_macs);
            used_macs.insert(mac.clone());
            nics.push(NicRecord {
                mac,
                ip,
                prefix_len: cfg.subnet.prefix_len(),
                gateway: cfg.subnet.gateway(),
                tap: tap_name(&id, i),
            });
        }
        let dir = self.vm_dir(&spec.name);
        let mut disks = Vec::new();
        if let Some(rootfs) = &image.rootfs {
            let (_, size_mib) = disks::inspect(rootfs)?;
            disks.push(DiskRecord {
                name: "root".into(),
                path: dir.join(ROOT_DISK),
                format: "qcow2".into(),
                size_mib,
                backing: Some(rootfs.clone()),
            });
        }
        for d in &spec.disks {
            disks.push(DiskRecord {
                name: d.name.clone(),
                path: dir.join(format!("disk-{}.qcow2", d.name)),
                format: "qcow2".into(),
                size_mib: d.size_mib,
                backing: None,
            });
        }
        Ok(VmRecord {
            format_version: RECORD_FORMAT_VERSION,
            id,
            name: spec.name.clone(),
            image: image_name.to_string(),
            kernel: image.kernel.clone(),
            initrd: image.initrd.clone(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            cmdline_extra: spec.cmdline_extra.clone(),
            tags: spec.tags.clone(),
            disks,
            nics,
            state: VmState::Creating,
            created_at: now_rfc3339(),
            started_at: None,
            process: None,
            accel: None,
            guest_boot_ms: None,
            ready_ms: None,
            last_error: None,
        })
    }

    /// Writes the VM's directory under a temporary name, then renames it into
    /// place: a crash before the rename leaves only a `.creating-` leftover
    /// that the next start removes.
    fn materialize(&self, record: &VmRecord, image: &flotilla_image::Image) -> AgentResult<()> {
        let vms_dir = self.inner.config.vms_dir();
        let tmp = vms_dir.join(format!("{CREATING_PREFIX}{}", record.id));
        let result = (|| -> AgentResult<()> {
            fs::create_dir_all(&tmp).map_err(|e| AgentError::io("creating VM directory", e))?;
            for d in &record.disks {
                let at = tmp.join(d.path.file_name().unwrap_or_default());
                match &d.backing {
                    Some(base) => {
                        let fmt = image.rootfs_format.as_deref().unwrap_or("qcow2");
                        disks::create_overlay(&at, base, fmt)?
                    }
                    None => disks::create_blank(&at, d.size_mib)?,
                }
            }
            record.save(&tmp)?;
            let dest = vms_dir.join(&record.name);
            fs::rename(&tmp, &dest).map_err(|e| AgentError::io("placing VM directory", e))?;
            sync_dir(&vms_dir).map_err(|e| AgentError::io("syncing VM directory", e))?;
            Ok(())
        })();
        if result.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        result
    }

    /// Removes a stopped VM with its disks. `force` stops a running one first.
    pub async fn delete(&self, name: &str, force: bool) -> AgentResult<()> {
        let entry = self.entry(name)?;
        if entry.lock().record.state.has_process() {
            if !force {
                return Err(AgentError::conflict(
                    format!("VM {name:?} is running"),
                    Some(format!(
                        "stop it first (`flotilla vm stop {name}`) or remove it with --force"
                    )),
                ));
            }
            self.stop(name, true, None).await?;
        }
        let _op = entry.op_lock.lock().await;
        let id = {
            let s = entry.lock();
            if s.record.state.has_process() {
                return Err(AgentError::conflict(
                    format!("VM {name:?} was started again while being removed"),
                    None,
                ));
            }
            for n in &s.record.nics {
                crate::network::delete_tap(&n.tap)?;
            }
            s.record.id.clone()
        };
        let vms_dir = self.inner.config.vms_dir();
        let doomed = vms_dir.join(format!("{DELETING_PREFIX}{id}"));
        fs::rename(self.vm_dir(name), &doomed)
            .map_err(|e| AgentError::io("moving VM directory aside", e))?;
        self.vms().remove(name);
        let _ = sync_dir(&vms_dir);
        self.remove_sockets(&id);
        fs::remove_dir_all(&doomed).map_err(|e| AgentError::io("removing VM directory", e))?;
        tracing::info!(vm = name, "removed");
        Ok(())
    }

    pub(crate) fn remove_sockets(&self, id: &str) {
        let dir = self.inner.config.sockets_dir();
        for suffix in ["qmp", "agent"] {
            let _ = fs::remove_file(dir.join(format!("{id}.{suffix}")));
        }
    }
}
