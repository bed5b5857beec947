//! VM configuration and its translation into a QEMU `microvm` command line.
//!
//! Only this module knows QEMU's command-line syntax. Values that land inside
//! QEMU option strings have their commas doubled (QEMU's escape); block devices
//! use `-blockdev` JSON so image paths need no escaping at all.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::QemuError;

mod validate;

#[cfg(test)]
mod tests;

/// The id of the guest RAM backend. Snapshot restore and migration need the
/// same id on both sides, so it is fixed.
pub const MEMORY_BACKEND_ID: &str = "mem";

/// The virtio-serial port name the guest agent opens inside the guest.
pub const AGENT_PORT_NAME: &str = "org.flotilla.agent.0";

/// Highest vCPU count accepted: microvm needs x2APIC beyond 255.
pub const MAX_VCPUS: u32 = 255;

/// Smallest guest memory accepted, in MiB.
pub const MIN_MEMORY_MIB: u64 = 16;

/// The accelerator a VM runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualization through `/dev/kvm`.
    Kvm,
    /// QEMU's software emulator (slow but works everywhere).
    Tcg,
}

impl Accel {
    /// The `-cpu` model to use with this accelerator.
    pub fn cpu_model(&self) -> &'static str {
        match self {
            Accel::Kvm => "host",
            Accel::Tcg => "max",
        }
    }

    /// The `-accel` value.
    pub fn as_str(&self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Accel {
    type Err = QemuError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            _ => Err(QemuError::UnknownAccel {
                value: s.to_string(),
            }),
        }
    }
}

/// What the operator asked for: a fixed accelerator or detection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    /// Use KVM only if a probe guest proves it works, else TCG.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl fmt::Display for AccelChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AccelChoice::Auto => "auto",
            AccelChoice::Kvm => "kvm",
            AccelChoice::Tcg => "tcg",
        })
    }
}

impl FromStr for AccelChoice {
    type Err = QemuError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(AccelChoice::Auto),
            "kvm" => Ok(AccelChoice::Kvm),
            "tcg" => Ok(AccelChoice::Tcg),
            _ => Err(QemuError::UnknownAccel {
                value: s.to_string(),
            }),
        }
    }
}

/// A disk image attached as a virtio-blk device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    /// Block node name and device id (QEMU id syntax, at most 31 characters).
    pub id: String,
    pub path: PathBuf,
    /// Image format: `qcow2` or `raw`.
    pub format: String,
    #[serde(default)]
    pub read_only: bool,
    /// Read what the image does not hold from another host's export (a
    /// migration's disk sync, see [`crate::live`]).
    #[serde(default)]
    pub nbd_backing: Option<NbdBacking>,
}

/// A disk exported over NBD by another host's QEMU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdBacking {
    pub host: String,
    pub port: u16,
    pub export: String,
    /// Over TLS with the migration's pre-shared key ([`QemuConfig::tls_psk_dir`]).
    #[serde(default)]
    pub tls: bool,
    /// The disk is an overlay over an image this host has too: once the
    /// source is paused its overlay's own bytes are exported apart, and the
    /// disk can read them over the local base instead, so that only the
    /// overlay's clusters cross ([`crate::live::move_to_layer`]).
    #[serde(default)]
    pub layer: Option<LayerBacking>,
    /// The disk reads from `layer` now, no longer from `export`.
    #[serde(default)]
    pub on_layer: bool,
}

/// An overlay's bytes exported apart, and the local copy of its base.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerBacking {
    pub export: String,
    pub base: PathBuf,
    /// `qcow2` or `raw`.
    pub base_format: String,
}

/// Node name of the local base under a layered NBD backing (the dot keeps
/// it apart from drive ids).
pub fn base_node_name(drive_id: &str) -> String {
    format!("{drive_id}.base")
}

/// Node name of a drive's file node, named so that the drive can be
/// reopened with another backing ([`crate::live::move_to_layer`]).
pub fn file_node_name(drive_id: &str) -> String {
    format!("{drive_id}.file")
}

/// Node name of the NBD backing a drive starts with (either kind).
pub fn nbd_node_name(drive_id: &str) -> String {
    format!("{drive_id}-src")
}

/// A layered NBD backing as a block node: the overlay's bytes read as
/// qcow2 over NBD, over the local base.
pub fn layered_backing_json(
    node_name: &str,
    drive_id: &str,
    nbd: &NbdBacking,
    layer: &LayerBacking,
) -> serde_json::Value {
    serde_json::json!({
        "driver": "qcow2",
        "node-name": node_name,
        "read-only": true,
        "file": nbd_json(nbd, &layer.export),
        "backing": {
            "driver": layer.base_format,
            "node-name": base_node_name(drive_id),
            "read-only": true,
            "file": { "driver": "file", "filename": layer.base.to_string_lossy(), "read-only": true },
        },
    })
}

fn nbd_json(nbd: &NbdBacking, export: &str) -> serde_json::Value {
    let mut file = serde_json::json!({
        "driver": "nbd",
        "server": { "type": "inet", "host": nbd.host, "port": nbd.port.to_string() },
        "export": export,
        // A short network cut stalls reads instead of failing them.
        "reconnect-delay": 30,
    });
    if nbd.tls {
        file["tls-creds"] = serde_json::json!(TLS_CLIENT_ID);
    }
    file
}

/// Ids of the TLS credentials a migration uses, as server (this QEMU
/// listens: the incoming stream, the disk exports) and as client.
pub const TLS_SERVER_ID: &str = "mig-tls-server";
pub const TLS_CLIENT_ID: &str = "mig-tls-client";

/// GnuTLS cipher priorities of those credentials: its defaults without
/// ChaCha20-Poly1305, which GnuTLS negotiated for these pre-shared-key
/// sessions though the host's CPU has AES instructions. With AES-GCM an
/// idle 256 MiB guest's stream (one connection, TCG) took 87-103 ms
/// instead of 145-162 ms. Every x86-64 server CPU of the last decade has
/// AES instructions; GnuTLS still offers the other ciphers it has.
pub const TLS_PRIORITY: &str = "NORMAL:-CHACHA20-POLY1305";

/// A network interface backed by a host tap device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicConfig {
    /// Netdev and device id (QEMU id syntax).
    pub id: String,
    /// Host tap interface name (created by QEMU if absent).
    pub tap: String,
    /// Guest MAC address, `xx:xx:xx:xx:xx:xx`, unicast.
    pub mac: String,
}

/// Everything needed to start one microVM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QemuConfig {
    pub name: String,
    pub accel: Accel,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// An uncompressed ELF `vmlinux` with a PVH entry note.
    pub kernel: PathBuf,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    #[serde(default)]
    pub drives: Vec<DriveConfig>,
    #[serde(default)]
    pub nics: Vec<NicConfig>,
    pub qmp_socket: PathBuf,
    /// Host end of the guest agent's virtio-serial port, if any.
    #[serde(default)]
    pub agent_socket: Option<PathBuf>,
    /// Guest serial console output, appended across restarts.
    pub serial_log: PathBuf,
    pub pidfile: PathBuf,
    /// `-incoming` value, e.g. `defer` to restore a snapshot later.
    #[serde(default)]
    pub incoming: Option<String>,
    /// Start with vCPUs stopped (`-S`).
    #[serde(default)]
    pub start_paused: bool,
    /// Migration state in `mapped-ram` form (`-global migration.mapped-ram=on`),
    /// so `incoming` can name such a file and QEMU loads it as it starts.
    #[serde(default)]
    pub mapped_ram: bool,
    /// A directory with `keys.psk` (`qemu:<hex key>`): TLS credentials for
    /// a migration's stream and disk exports, made at start.
    #[serde(default)]
    pub tls_psk_dir: Option<PathBuf>,
    /// Guest memory mapped copy-on-write from a file (see
    /// [`crate::mapped_ram`]) instead of fresh anonymous memory.
    #[serde(default)]
    pub memory_file: Option<MemoryFile>,
    /// Let guest memory take transparent huge pages (QEMU asks for them
    /// where the host allows). Off, QEMU runs with THP disabled: a page
    /// written into fresh memory (state being loaded) costs 4 KiB of
    /// zeroing instead of 2 MiB, and a guest that touched little of its
    /// memory holds little; but reading memory never touched (a save's or
    /// an outgoing migration's scan for zero pages) faults 4 KiB at a time.
    /// On when not given, as QEMU has it.
    #[serde(default = "huge_pages_by_default")]
    pub huge_pages: bool,
}

fn huge_pages_by_default() -> bool {
    true
}

/// A file region the guest's memory starts as: mapped private and
/// read-only, so the guest's writes never reach the file and QEMU cannot
/// change it (not even to discard pages).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryFile {
    pub path: PathBuf,
    /// Where the guest's first byte is in the file.
    pub offset: u64,
}

impl QemuConfig {
    /// Checks the configuration; see the error for what is accepted.
    pub fn validate(&self) -> Result<(), QemuError> {
        validate::validate(self)
    }

    /// The QEMU command line (without the binary). Call [`validate`] first:
    /// this function does not check anything.
    ///
    /// [`validate`]: QemuConfig::validate
    pub fn to_args(&self) -> Vec<String> {
        let mut args = Args::default();
        args.opt("-name", escape_opt(&self.name));
        args.opt(
            "-M",
            format!("microvm,acpi=off,memory-backend={MEMORY_BACKEND_ID}"),
        );
        let memory = match &self.memory_file {
            None => format!(
                "memory-backend-ram,id={MEMORY_BACKEND_ID},size={}M",
                self.memory_mib
            ),
            Some(file) => format!(
                "memory-backend-file,id={MEMORY_BACKEND_ID},size={}M,mem-path={},offset={},\
                 share=off,readonly=on,rom=off",
                self.memory_mib,
                escape_path(&file.path),
                file.offset
            ),
        };
        args.opt("-object", memory);
        if let Some(dir) = &self.tls_psk_dir {
            for (id, endpoint) in [(TLS_SERVER_ID, "server"), (TLS_CLIENT_ID, "client")] {
                args.opt(
                    "-object",
                    format!(
                        "tls-creds-psk,id={id},endpoint={endpoint},dir={},priority={TLS_PRIORITY}",
                        escape_path(dir)
                    ),
                );
            }
        }
        args.opt("-accel", self.accel.as_str());
        args.opt("-cpu", self.accel.cpu_model());
        args.opt("-smp", self.vcpus.to_string());
        args.flags(&["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
        // Timestamps make the shared stderr log readable across restarts.
        args.opt("-msg", "timestamp=on");

        args.opt(
            "-chardev",
            format!(
                "file,id=serial0,path={},append=on",
                escape_path(&self.serial_log)
            ),
        );
        args.opt("-serial", "chardev:serial0");
        args.opt(
            "-chardev",
            format!(
                "socket,id=qmp,path={},server=on,wait=off",
                escape_path(&self.qmp_socket)
            ),
        );
        args.opt("-mon", "chardev=qmp,mode=control");
        args.opt("-pidfile", self.pidfile.to_string_lossy());

        args.opt("-kernel", self.kernel.to_string_lossy());
        if let Some(initrd) = &self.initrd {
            args.opt("-initrd", initrd.to_string_lossy());
        }
        args.opt("-append", self.cmdline.as_str());

        for drive in &self.drives {
            args.opt("-blockdev", blockdev_json(drive));
            args.opt(
                "-device",
                format!(
                    "virtio-blk-device,drive={id},id={id},serial={id}",
                    id = drive.id
                ),
            );
        }
        for nic in &self.nics {
            args.opt(
                "-netdev",
                format!(
                    "tap,id={},ifname={},script=no,downscript=no",
                    nic.id,
                    escape_opt(&nic.tap)
                ),
            );
            args.opt(
                "-device",
                format!(
                    "virtio-net-device,netdev={id},mac={mac},id={id}",
                    id = nic.id,
                    mac = nic.mac.to_ascii_lowercase()
                ),
            );
        }
        if let Some(agent) = &self.agent_socket {
            args.opt("-device", "virtio-serial-device");
            args.opt(
                "-chardev",
                format!(
                    "socket,id=agent,path={},server=on,wait=off",
                    escape_path(agent)
                ),
            );
            args.opt(
                "-device",
                format!("virtserialport,chardev=agent,name={AGENT_PORT_NAME}"),
            );
        }
        if self.mapped_ram {
            args.opt("-global", "migration.mapped-ram=on");
        }
        if let Some(incoming) = &self.incoming {
            args.opt("-incoming", incoming.as_str());
        }
        if self.start_paused {
            args.flags(&["-S"]);
        }
        args.0
    }
}

/// `-blockdev` in JSON form: a format node over a file node. Read-only is set
/// on both so QEMU never opens the image for writing.
fn blockdev_json(drive: &DriveConfig) -> String {
    let mut node = serde_json::json!({
        "driver": drive.format,
        "node-name": drive.id,
        "read-only": drive.read_only,
        "file": {
            "driver": "file",
            "node-name": file_node_name(&drive.id),
            "filename": drive.path.to_string_lossy(),
            "read-only": drive.read_only,
        },
    });
    if let Some(nbd) = &drive.nbd_backing {
        node["backing"] = match &nbd.layer {
            Some(layer) if nbd.on_layer => {
                layered_backing_json(&nbd_node_name(&drive.id), &drive.id, nbd, layer)
            }
            _ => serde_json::json!({
                "driver": "raw",
                "node-name": nbd_node_name(&drive.id),
                "read-only": true,
                "file": nbd_json(nbd, &nbd.export),
            }),
        };
    }
    node.to_string()
}

/// Doubles commas, QEMU's escape inside `key=value,...` option strings.
pub(crate) fn escape_opt(value: &str) -> String {
    value.replace(',', ",,")
}

fn escape_path(path: &std::path::Path) -> String {
    escape_opt(&path.to_string_lossy())
}

#[derive(Default)]
struct Args(Vec<String>);

impl Args {
    fn opt(&mut self, flag: &str, value: impl Into<String>) {
        self.0.push(flag.to_string());
        self.0.push(value.into());
    }

    fn flags(&mut self, flags: &[&str]) {
        self.0.extend(flags.iter().map(|f| f.to_string()));
    }
}
