//! Remembering an `auto` decision for the rest of the host's boot.
//!
//! A KVM that cannot run guests costs every agent start the whole probe
//! timeout (and a CPU crawling through the probe guest). What KVM can do
//! does not change while the host runs, so a decision made by a probe is
//! kept in a file under `/run` (emptied at boot) and reused while its key
//! still matches: the same boot, QEMU binary, probe kernel and initrd, KVM
//! device and timeout. Deleting the file makes the next start probe again.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{AccelDecision, AccelProbe};

/// Where agents keep the decision by default (`/run` is a tmpfs on Debian).
pub const DEFAULT_PROBE_CACHE: &str = "/run/flotilla/accel-probe.json";

/// Identifies a file's version without reading it, whatever the name it
/// is reached by (each test host links the same kernel under its own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FileStamp {
    device: u64,
    inode: u64,
    /// The device number a device node stands for (0 for files).
    rdev: u64,
    len: u64,
    modified_ns: i64,
}

impl FileStamp {
    fn of(path: &Path) -> Option<FileStamp> {
        let m = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            device: m.dev(),
            inode: m.ino(),
            rdev: m.rdev(),
            len: m.len(),
            modified_ns: m.mtime().saturating_mul(1_000_000_000) + m.mtime_nsec(),
        })
    }
}

/// The probe's own arguments and decision rules: a change to them makes
/// every remembered decision stale.
const PROBE_VERSION: u32 = 1;

/// Everything a probe's outcome depends on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ProbeKey {
    probe_version: u32,
    /// The probe guest's command line.
    cmdline: String,
    boot_id: String,
    qemu: FileStamp,
    kernel: FileStamp,
    initrd: Option<FileStamp>,
    kvm_device: FileStamp,
    timeout_ms: u64,
}

impl ProbeKey {
    /// The key of `probe` on `kvm_device`; `None` if any part of it cannot
    /// be read (the decision is then not remembered).
    pub(crate) fn of(probe: &AccelProbe, kvm_device: &Path) -> Option<ProbeKey> {
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        let initrd = match &probe.initrd {
            Some(path) => Some(FileStamp::of(path)?),
            None => None,
        };
        Some(ProbeKey {
            probe_version: PROBE_VERSION,
            cmdline: super::PROBE_CMDLINE.to_string(),
            boot_id: boot_id.trim().to_string(),
            qemu: FileStamp::of(&resolve_binary(&probe.qemu_binary)?)?,
            kernel: FileStamp::of(&probe.kernel)?,
            initrd,
            kvm_device: FileStamp::of(kvm_device)?,
            timeout_ms: u64::try_from(probe.timeout.as_millis()).unwrap_or(u64::MAX),
        })
    }
}

/// What the file holds.
#[derive(Debug, Serialize, Deserialize)]
struct Remembered {
    key: ProbeKey,
    decision: AccelDecision,
    /// Seconds since the epoch when the probe ran.
    probed_at: u64,
}

/// The decision remembered under `key`, its reason saying so; `None` if
/// there is none, it is unreadable or it was made for another key.
pub(crate) fn lookup(file: &Path, key: &ProbeKey) -> Option<AccelDecision> {
    let text = std::fs::read(file).ok()?;
    let remembered: Remembered = serde_json::from_slice(&text).ok()?;
    if &remembered.key != key {
        return None;
    }
    let ago = now_secs().saturating_sub(remembered.probed_at);
    Some(AccelDecision {
        accel: remembered.decision.accel,
        reason: format!(
            "{} (probed {ago} s ago this boot and remembered in {}; delete it to probe again)",
            remembered.decision.reason,
            file.display()
        ),
    })
}

/// Remembers `decision` under `key`: written whole then renamed, so a
/// reader sees the old file or the new one.
pub(crate) fn store(file: &Path, key: &ProbeKey, decision: &AccelDecision) -> std::io::Result<()> {
    let remembered = Remembered {
        key: key.clone(),
        decision: decision.clone(),
        probed_at: now_secs(),
    };
    let body = serde_json::to_vec_pretty(&remembered).map_err(std::io::Error::other)?;
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = file.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, body)?;
    std::fs::rename(&tmp, file).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The file a command name runs: itself if it has a slash, else the first
/// match on `PATH`, as `execvp` finds it.
fn resolve_binary(binary: &Path) -> Option<PathBuf> {
    if binary.components().count() > 1 {
        return Some(binary.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::Accel;

    fn probe_in(dir: &Path) -> AccelProbe {
        let kernel = dir.join("vmlinux");
        std::fs::write(&kernel, b"kernel").expect("kernel");
        AccelProbe {
            qemu_binary: PathBuf::from("/bin/sh"),
            kernel,
            initrd: None,
            timeout: Duration::from_secs(2),
            cache: None,
        }
    }

    fn tcg() -> AccelDecision {
        AccelDecision {
            accel: Accel::Tcg,
            reason: "the probe guest did not report in".into(),
        }
    }

    #[test]
    fn a_stored_decision_is_found_under_its_key_and_says_it_was_remembered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let probe = probe_in(dir.path());
        let device = dir.path().join("kvm");
        std::fs::write(&device, b"").expect("device");
        let key = ProbeKey::of(&probe, &device).expect("key");
        let file = dir.path().join("run/flotilla/accel-probe.json");
        assert!(lookup(&file, &key).is_none());
        store(&file, &key, &tcg()).expect("store");
        let found = lookup(&file, &key).expect("remembered");
        assert_eq!(found.accel, Accel::Tcg);
        assert!(found.reason.starts_with(&tcg().reason), "{}", found.reason);
        assert!(found.reason.contains("remembered in"), "{}", found.reason);
        assert!(found.reason.contains(&file.display().to_string()));
        // Nothing but the file is left in its directory.
        let names: Vec<_> = std::fs::read_dir(file.parent().expect("dir"))
            .expect("list")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("accel-probe.json")]);
    }

    #[test]
    fn a_changed_kernel_or_timeout_probes_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut probe = probe_in(dir.path());
        let device = dir.path().join("kvm");
        std::fs::write(&device, b"").expect("device");
        let file = dir.path().join("accel-probe.json");
        let key = ProbeKey::of(&probe, &device).expect("key");
        store(&file, &key, &tcg()).expect("store");

        probe.timeout = Duration::from_secs(3);
        let longer = ProbeKey::of(&probe, &device).expect("key");
        assert!(lookup(&file, &longer).is_none());

        probe.timeout = Duration::from_secs(2);
        std::fs::write(&probe.kernel, b"another kernel").expect("kernel");
        let rebuilt = ProbeKey::of(&probe, &device).expect("key");
        assert!(lookup(&file, &rebuilt).is_none());
    }

    #[test]
    fn an_unreadable_file_or_missing_part_is_no_decision() {
        let dir = tempfile::tempdir().expect("tempdir");
        let probe = probe_in(dir.path());
        let device = dir.path().join("kvm");
        assert!(ProbeKey::of(&probe, &device).is_none(), "no device");
        std::fs::write(&device, b"").expect("device");
        let key = ProbeKey::of(&probe, &device).expect("key");
        let file = dir.path().join("accel-probe.json");
        std::fs::write(&file, b"{ half a decis").expect("corrupt");
        assert!(lookup(&file, &key).is_none());
    }

    #[test]
    fn command_names_resolve_on_path() {
        assert_eq!(
            resolve_binary(Path::new("/usr/bin/env")),
            Some(PathBuf::from("/usr/bin/env"))
        );
        let sh = resolve_binary(Path::new("sh")).expect("sh on PATH");
        assert!(sh.is_absolute() && sh.ends_with("sh"), "{}", sh.display());
        assert_eq!(resolve_binary(Path::new("no-such-binary-here")), None);
    }
}
