//! Checks of a [`QemuConfig`] before it is turned into arguments. Every error
//! says what was wrong and what would be accepted, so QEMU's own (terser)
//! messages are rarely the first a user sees.

use std::collections::HashSet;
use std::path::Path;

use super::{QemuConfig, MAX_VCPUS, MIN_MEMORY_MIB};
use crate::error::QemuError;

/// Bytes available for a unix socket path (`sun_path` minus the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// QEMU keeps block node names in a 32-byte buffer.
pub const MAX_ID_LEN: usize = 31;

/// Linux interface names are at most 15 bytes (`IFNAMSIZ` - 1).
const MAX_IFNAME_LEN: usize = 15;

pub(super) fn validate(config: &QemuConfig) -> Result<(), QemuError> {
    if config.name.is_empty() || config.name.chars().any(char::is_control) {
        return Err(QemuError::invalid(
            "name",
            format!(
                "{:?} must be non-empty text without control characters",
                config.name
            ),
        ));
    }
    if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
        return Err(QemuError::invalid(
            "vcpus",
            format!("{} is out of range; accepted 1..={MAX_VCPUS}", config.vcpus),
        ));
    }
    if config.memory_mib < MIN_MEMORY_MIB {
        return Err(QemuError::invalid(
            "memory_mib",
            format!(
                "{} MiB is too small; at least {MIN_MEMORY_MIB} MiB is accepted",
                config.memory_mib
            ),
        ));
    }
    existing_file("kernel", &config.kernel)?;
    if let Some(memory) = &config.memory_file {
        existing_file("memory_file", &memory.path)?;
    }
    if let Some(initrd) = &config.initrd {
        existing_file("initrd", initrd)?;
    }
    if config.cmdline.contains('\0') {
        return Err(QemuError::invalid(
            "cmdline",
            "contains a NUL byte; accepted is plain text",
        ));
    }

    // Drive and NIC ids share QEMU's device id namespace.
    let mut ids = HashSet::new();
    for (i, drive) in config.drives.iter().enumerate() {
        let field = format!("drives[{i}]");
        check_id(&format!("{field}.id"), &drive.id)?;
        if !ids.insert(drive.id.as_str()) {
            return Err(duplicate_id(&field, &drive.id));
        }
        existing_file(&format!("{field}.path"), &drive.path)?;
        if !matches!(drive.format.as_str(), "qcow2" | "raw") {
            return Err(QemuError::invalid(
                format!("{field}.format"),
                format!("{:?} is not supported; accepted: qcow2, raw", drive.format),
            ));
        }
    }
    let mut taps = HashSet::new();
    for (i, nic) in config.nics.iter().enumerate() {
        let field = format!("nics[{i}]");
        check_id(&format!("{field}.id"), &nic.id)?;
        if !ids.insert(nic.id.as_str()) {
            return Err(duplicate_id(&field, &nic.id));
        }
        check_ifname(&format!("{field}.tap"), &nic.tap)?;
        if !taps.insert(nic.tap.as_str()) {
            return Err(QemuError::invalid(
                format!("{field}.tap"),
                format!(
                    "tap {:?} is used by two NICs; each NIC needs its own",
                    nic.tap
                ),
            ));
        }
        check_mac(&format!("{field}.mac"), &nic.mac)?;
    }

    socket_path("qmp_socket", &config.qmp_socket)?;
    if let Some(agent) = &config.agent_socket {
        socket_path("agent_socket", agent)?;
        if agent == &config.qmp_socket {
            return Err(QemuError::invalid(
                "agent_socket",
                "is the same path as qmp_socket; each needs its own socket",
            ));
        }
    }
    parent_exists("serial_log", &config.serial_log)?;
    parent_exists("pidfile", &config.pidfile)?;
    if let Some(incoming) = &config.incoming {
        if incoming.trim().is_empty() {
            return Err(QemuError::invalid(
                "incoming",
                "is empty; accepted e.g. \"defer\" or a migration URI",
            ));
        }
    }
    Ok(())
}

fn duplicate_id(field: &str, id: &str) -> QemuError {
    QemuError::invalid(
        format!("{field}.id"),
        format!("{id:?} is used twice; drive and NIC ids must all be distinct"),
    )
}

/// QEMU ids: a letter, then letters, digits, `-`, `.` or `_`.
fn check_id(field: &str, id: &str) -> Result<(), QemuError> {
    let mut chars = id.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        && id.len() <= MAX_ID_LEN;
    if valid {
        Ok(())
    } else {
        Err(QemuError::invalid(
            field,
            format!(
                "{id:?} is not a valid id; accepted: a letter followed by letters, digits, \
                 '-', '.' or '_', at most {MAX_ID_LEN} characters"
            ),
        ))
    }
}

fn check_ifname(field: &str, name: &str) -> Result<(), QemuError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_IFNAME_LEN
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
    if valid {
        Ok(())
    } else {
        Err(QemuError::invalid(
            field,
            format!(
                "{name:?} is not a valid interface name; accepted: 1..={MAX_IFNAME_LEN} \
                 characters without '/', ':' or whitespace"
            ),
        ))
    }
}

/// Six colon-separated hex octets, unicast (the multicast bit must be clear).
pub(crate) fn check_mac(field: &str, mac: &str) -> Result<(), QemuError> {
    let octets: Vec<&str> = mac.split(':').collect();
    let well_formed = octets.len() == 6
        && octets
            .iter()
            .all(|o| o.len() == 2 && o.chars().all(|c| c.is_ascii_hexdigit()));
    if !well_formed {
        return Err(QemuError::invalid(
            field,
            format!(
                "{mac:?} is not a MAC address; accepted: six hex octets like 52:54:00:12:34:56"
            ),
        ));
    }
    let first = u8::from_str_radix(octets[0], 16).unwrap_or(0);
    if first & 1 != 0 {
        return Err(QemuError::invalid(
            field,
            format!(
                "{mac:?} is a multicast address; accepted: a unicast MAC (first octet even, \
                 e.g. 52:54:00:...)"
            ),
        ));
    }
    Ok(())
}

fn utf8<'a>(field: &str, path: &'a Path) -> Result<&'a str, QemuError> {
    path.to_str().ok_or_else(|| {
        QemuError::invalid(
            field,
            format!(
                "{} is not valid UTF-8; accepted: UTF-8 paths",
                path.display()
            ),
        )
    })
}

fn existing_file(field: &str, path: &Path) -> Result<(), QemuError> {
    utf8(field, path)?;
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => Ok(()),
        Ok(_) => Err(QemuError::invalid(
            field,
            format!("{} is not a regular file", path.display()),
        )),
        Err(err) => Err(QemuError::invalid(
            field,
            format!("{} cannot be used: {err}", path.display()),
        )),
    }
}

fn parent_exists(field: &str, path: &Path) -> Result<(), QemuError> {
    utf8(field, path)?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if parent.is_dir() {
        Ok(())
    } else {
        Err(QemuError::invalid(
            field,
            format!(
                "directory {} does not exist; it must exist before QEMU starts",
                parent.display()
            ),
        ))
    }
}

fn socket_path(field: &str, path: &Path) -> Result<(), QemuError> {
    let text = utf8(field, path)?;
    if text.len() > MAX_SOCKET_PATH {
        return Err(QemuError::invalid(
            field,
            format!(
                "{text} is {} bytes long; unix socket paths are limited to {MAX_SOCKET_PATH} bytes",
                text.len()
            ),
        ));
    }
    parent_exists(field, path)
}
