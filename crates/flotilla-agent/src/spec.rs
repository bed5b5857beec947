//! Validation of a create request into a complete VM specification.
//!
//! Every rule names the field, what was wrong and what is accepted, so the
//! API can answer 400 with a message a user can act on.

use std::collections::BTreeMap;

use flotilla_api::vm::{DEFAULT_MEMORY_MIB, DEFAULT_VCPUS, MAX_VCPUS, MIN_MEMORY_MIB};
use flotilla_api::{CreateVmRequest, DiskSpec};

pub const MAX_NICS: u32 = 4;
pub const MAX_DISKS: usize = 8;
pub const MAX_DISK_MIB: u64 = 1024 * 1024;
pub const MAX_CMDLINE_EXTRA: usize = 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {field}: {message}")]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

fn invalid(field: &str, message: impl Into<String>) -> SpecError {
    SpecError {
        field: field.to_string(),
        message: message.into(),
    }
}

/// A create request with every default filled in and every field checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    pub name: String,
    pub image: Option<String>,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub cmdline_extra: String,
    pub disks: Vec<DiskSpec>,
    pub nics: u32,
    pub tags: BTreeMap<String, String>,
    pub start: bool,
    pub wait_ready: bool,
    /// `base` or a snapshot's name or id.
    pub from_snapshot: Option<String>,
    /// The first NIC's address, when the caller picked it.
    pub ip: Option<std::net::Ipv4Addr>,
    /// The shape fields the request gave explicitly (a VM from a named
    /// snapshot takes the snapshot's shape; a different one is refused).
    pub explicit_shape: (Option<u32>, Option<u64>, Option<u32>),
}

/// `[a-z0-9][a-z0-9-]{0,62}`: usable as a hostname and a directory name.
pub fn validate_name(field: &str, name: &str, max: usize) -> Result<(), SpecError> {
    let ok = !name.is_empty()
        && name.len() <= max
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!(
                "{name:?} is not accepted: use 1 to {max} lowercase letters, digits or '-', not starting or ending with '-'"
            ),
        ))
    }
}

/// Tag keys: 1 to 63 characters without spaces or '='.
pub fn validate_tags(tags: &BTreeMap<String, String>) -> Result<(), SpecError> {
    for key in tags.keys() {
        if key.is_empty() || key.len() > 63 || key.chars().any(|c| c.is_whitespace() || c == '=') {
            return Err(invalid(
                "tags",
                format!(
                    "tag key {key:?} is not accepted: 1 to 63 characters without spaces or '='"
                ),
            ));
        }
    }
    Ok(())
}

impl VmSpec {
    pub fn from_request(req: CreateVmRequest) -> Result<VmSpec, SpecError> {
        validate_name("name", &req.name, 63)?;
        let vcpus = req.vcpus.unwrap_or(DEFAULT_VCPUS);
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(invalid(
                "vcpus",
                format!("{vcpus} is out of range: use 1 to {MAX_VCPUS}"),
            ));
        }
        let memory_mib = req.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB);
        if memory_mib < MIN_MEMORY_MIB {
            return Err(invalid(
                "memory_mib",
                format!("{memory_mib} MiB is too little: use at least {MIN_MEMORY_MIB} MiB"),
            ));
        }
        let cmdline_extra = req.cmdline_extra.unwrap_or_default();
        if cmdline_extra.len() > MAX_CMDLINE_EXTRA || cmdline_extra.chars().any(|c| c.is_control())
        {
            return Err(invalid(
                "cmdline_extra",
                format!("use at most {MAX_CMDLINE_EXTRA} printable characters"),
            ));
        }
        if cmdline_extra
            .split_whitespace()
            .any(|w| w.starts_with("flotilla."))
        {
            return Err(invalid(
                "cmdline_extra",
                "flotilla.* parameters are set by the agent and cannot be overridden",
            ));
        }
        if req.disks.len() > MAX_DISKS {
            return Err(invalid(
                "disks",
                format!("at most {MAX_DISKS} extra disks are accepted"),
            ));
        }
        let mut disk_names = Vec::new();
        for (i, d) in req.disks.iter().enumerate() {
            validate_name(&format!("disks[{i}].name"), &d.name, 16)?;
            if d.name == "root" || disk_names.contains(&d.name) {
                return Err(invalid(
                    &format!("disks[{i}].name"),
                    format!(
                        "{:?} is taken: disk names must be unique and not \"root\"",
                        d.name
                    ),
                ));
            }
            disk_names.push(d.name.clone());
            if let Some(volume) = &d.volume {
                validate_name(&format!("disks[{i}].volume"), volume, 63)?;
                if d.size_mib != 0 {
                    return Err(invalid(
                        &format!("disks[{i}].size_mib"),
                        "a volume has its own size: give size_mib or volume, not both",
                    ));
                }
                if req.disks[..i].iter().any(|o| o.volume == d.volume) {
                    return Err(invalid(
                        &format!("disks[{i}].volume"),
                        format!("{volume:?} is attached twice"),
                    ));
                }
                continue;
            }
            if d.size_mib == 0 || d.size_mib > MAX_DISK_MIB {
                return Err(invalid(
                    &format!("disks[{i}].size_mib"),
                    format!("{} is out of range: use 1 to {MAX_DISK_MIB}", d.size_mib),
                ));
            }
        }
        let nics = req.nics.unwrap_or(1);
        if nics > MAX_NICS {
            return Err(invalid(
                "nics",
                format!("{nics} is out of range: use 0 to {MAX_NICS}"),
            ));
        }
        validate_tags(&req.tags)?;
        let ip = match &req.ip {
            None => None,
            Some(_) if nics == 0 => {
                return Err(invalid("ip", "a VM without NICs has no address to set"))
            }
            Some(text) => Some(text.parse().map_err(|_| {
                invalid(
                    "ip",
                    format!("{text:?} is not an IPv4 address (e.g. 10.77.0.5)"),
                )
            })?),
        };
        if let Some(image) = &req.image {
            if image.is_empty() {
                return Err(invalid("image", "must not be empty when given"));
            }
        }
        if let Some(from) = &req.from_snapshot {
            if from.is_empty() {
                return Err(invalid(
                    "from_snapshot",
                    "must not be empty when given: use \"base\" or a snapshot's name or id",
                ));
            }
            if !req.disks.is_empty() {
                return Err(invalid(
                    "disks",
                    "a VM started from a snapshot has the snapshot's disks; extra disks are not accepted",
                ));
            }
        }
        Ok(VmSpec {
            ip,
            from_snapshot: req.from_snapshot,
            explicit_shape: (req.vcpus, req.memory_mib, req.nics),
            name: req.name,
            image: req.image,
            vcpus,
            memory_mib,
            cmdline_extra,
            disks: req.disks,
            nics,
            tags: req.tags,
            start: req.start.unwrap_or(true),
            wait_ready: req.wait_ready.unwrap_or(false),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(name: &str) -> CreateVmRequest {
        serde_json::from_value(serde_json::json!({ "name": name })).unwrap()
    }

    #[test]
    fn defaults_are_filled_in() {
        let s = VmSpec::from_request(req("web-1")).unwrap();
        assert_eq!((s.vcpus, s.memory_mib, s.nics, s.start), (1, 256, 1, true));
    }

    #[test]
    fn zero_memory_is_refused_with_the_minimum() {
        let mut r = req("a");
        r.memory_mib = Some(0);
        let e = VmSpec::from_request(r).unwrap_err();
        assert_eq!(e.field, "memory_mib");
        assert!(e.message.contains("at least 64"), "{e}");
    }

    #[test]
    fn bad_names_are_refused() {
        for n in ["", "UPPER", "-a", "a-", "a_b", &"x".repeat(64)] {
            assert!(VmSpec::from_request(req(n)).is_err(), "{n:?}");
        }
    }

    #[test]
    fn duplicate_and_reserved_disk_names_are_refused() {
        let mut r = req("a");
        r.disks = vec![
            DiskSpec {
                name: "data".into(),
                size_mib: 10,
                ..Default::default()
            },
            DiskSpec {
                name: "data".into(),
                size_mib: 10,
                ..Default::default()
            },
        ];
        assert_eq!(VmSpec::from_request(r).unwrap_err().field, "disks[1].name");
        let mut r = req("a");
        r.disks = vec![DiskSpec {
            name: "root".into(),
            size_mib: 10,
            ..Default::default()
        }];
        assert!(VmSpec::from_request(r).is_err());
    }

    #[test]
    fn volumes_are_attached_once_without_a_size() {
        let volume = |disk: &str, volume: &str, size_mib| DiskSpec {
            name: disk.into(),
            size_mib,
            volume: Some(volume.into()),
        };
        let mut r = req("a");
        r.disks = vec![volume("data", "home", 0)];
        assert!(VmSpec::from_request(r).is_ok());
        let mut r = req("a");
        r.disks = vec![volume("data", "home", 10)];
        assert_eq!(
            VmSpec::from_request(r).unwrap_err().field,
            "disks[0].size_mib"
        );
        let mut r = req("a");
        r.disks = vec![volume("one", "home", 0), volume("two", "home", 0)];
        assert_eq!(
            VmSpec::from_request(r).unwrap_err().field,
            "disks[1].volume"
        );
        let mut r = req("a");
        r.disks = vec![volume("data", "Home", 0)];
        assert_eq!(
            VmSpec::from_request(r).unwrap_err().field,
            "disks[0].volume"
        );
    }

    #[test]
    fn agent_owned_cmdline_parameters_are_refused() {
        let mut r = req("a");
        r.cmdline_extra = Some("quiet flotilla.ip=1.2.3.4/24".into());
        assert_eq!(VmSpec::from_request(r).unwrap_err().field, "cmdline_extra");
    }
}
