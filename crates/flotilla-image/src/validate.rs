//! Checks that files are what they claim to be before a VM trips over them:
//! kernels (PVH ELF or bzImage), initrds, root disks and the guest agent.
//!
//! Only headers are read, so validating a large kernel or disk is cheap.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::cmd;
use crate::error::{ImageError, IoContext};

/// How QEMU boots a kernel file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelFormat {
    /// An uncompressed ELF `vmlinux` with a PVH entry point (fastest boot).
    ElfPvh,
    /// A compressed `bzImage` with the Linux x86 boot protocol header.
    #[serde(rename = "bzimage")]
    BzImage,
}

impl std::fmt::Display for KernelFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KernelFormat::ElfPvh => "elf_pvh",
            KernelFormat::BzImage => "bzimage",
        })
    }
}

/// Disk image formats accepted for root disks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskFormat {
    Qcow2,
    Raw,
}

impl DiskFormat {
    /// The name QEMU uses (`-drive format=...`, `qemu-img -f ...`).
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }
}

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const EM_X86_64: u16 = 62;
const PT_INTERP: u32 = 3;
const PT_NOTE: u32 = 4;
const SHT_NOTE: u32 = 7;
/// `XEN_ELFNOTE_PHYS32_ENTRY`: the 32-bit PVH entry point QEMU jumps to.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// Linux x86 boot protocol: "HdrS" at this offset marks a bzImage.
const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;
/// Upper bound on a note section we are willing to read.
const MAX_NOTES_BYTES: u64 = 1 << 20;

/// Checks that `path` is a kernel QEMU can boot directly and says how.
///
/// Accepts an ELF64 x86-64 `vmlinux` carrying a PVH entry note (Xen ELF note
/// type 18, present with `CONFIG_PVH=y`), or a bzImage ("HdrS" at 0x202).
/// Anything else is [`ImageError::NotAKernel`] with the reason.
pub fn validate_kernel(path: &Path) -> Result<KernelFormat, ImageError> {
    let not_kernel = |reason: String| ImageError::NotAKernel {
        path: path.to_path_buf(),
        reason,
    };
    let mut f = File::open(path).ctx("open kernel", path)?;
    let len = f.metadata().ctx("stat", path)?.len();
    let mut head = [0u8; 64];
    let n = read_up_to(&mut f, &mut head).ctx("read", path)?;
    if n >= 4 && &head[..4] == ELF_MAGIC {
        let elf = Elf::parse(len, &head[..n]).map_err(not_kernel)?;
        if elf.machine != EM_X86_64 {
            return Err(not_kernel(format!(
                "ELF for machine {} ({}), not x86-64",
                elf.machine,
                machine_name(elf.machine)
            )));
        }
        return match elf.has_pvh_note(&mut f) {
            Ok(true) => Ok(KernelFormat::ElfPvh),
            Ok(false) => Err(not_kernel(
                "x86-64 ELF without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); \
                 rebuild the kernel with CONFIG_PVH=y or use its bzImage"
                    .to_string(),
            )),
            Err(reason) => Err(not_kernel(reason)),
        };
    }
    let mut magic = [0u8; 4];
    if len >= BZIMAGE_MAGIC_OFFSET + 4 {
        f.seek(SeekFrom::Start(BZIMAGE_MAGIC_OFFSET))
            .and_then(|_| f.read_exact(&mut magic))
            .ctx("read", path)?;
        if &magic == b"HdrS" {
            return Ok(KernelFormat::BzImage);
        }
    }
    Err(not_kernel(format!(
        "neither an ELF file nor a bzImage (starts with {})",
        describe_bytes(&head[..n.min(8)])
    )))
}

/// Checks that `path` looks like an initramfs: gzip or newc/odc cpio.
pub fn validate_initrd(path: &Path) -> Result<(), ImageError> {
    let mut f = File::open(path).ctx("open initrd", path)?;
    let mut head = [0u8; 6];
    let n = read_up_to(&mut f, &mut head).ctx("read", path)?;
    let head = &head[..n];
    if head.starts_with(&[0x1f, 0x8b]) || [&b"070701"[..], b"070702", b"070707"].contains(&head) {
        return Ok(());
    }
    let reason = if n == 0 {
        "the file is empty".to_string()
    } else {
        format!("unknown format (starts with {})", describe_bytes(head))
    };
    Err(ImageError::NotAnInitrd {
        path: path.to_path_buf(),
        reason,
    })
}

/// Asks `qemu-img info` what `path` is; accepts qcow2 without a backing
/// file (a copied overlay would dangle) and raw.
pub fn probe_disk(path: &Path) -> Result<DiskFormat, ImageError> {
    // Fail with a clear message before qemu-img's own wording.
    File::open(path).ctx("open disk image", path)?;
    let out = cmd::run(
        Command::new("qemu-img")
            .args(["info", "--force-share", "--output=json"])
            .arg(path),
    )?;
    let info: serde_json::Value =
        serde_json::from_slice(&out).map_err(|e| ImageError::InvalidDisk {
            path: path.to_path_buf(),
            reason: format!("unreadable `qemu-img info` output: {e}"),
        })?;
    let invalid = |reason: String| ImageError::InvalidDisk {
        path: path.to_path_buf(),
        reason,
    };
    let format = info.get("format").and_then(|v| v.as_str()).unwrap_or("");
    match format {
        "qcow2" => {
            if let Some(backing) = info.get("backing-filename").and_then(|v| v.as_str()) {
                return Err(invalid(format!(
                    "qcow2 with backing file {backing:?}; flatten it first \
                     (qemu-img convert -O qcow2 SRC DST)"
                )));
            }
            Ok(DiskFormat::Qcow2)
        }
        "raw" => {
            let size = info
                .get("virtual-size")
                .and_then(|v| v.as_u64())
                .unwrap_or(0);
            if size < 64 * 1024 {
                return Err(invalid(format!("raw image of only {size} bytes")));
            }
            Ok(DiskFormat::Raw)
        }
        other => Err(invalid(format!("format {other:?}"))),
    }
}

/// Checks that the guest agent is a statically linked x86-64 ELF executable:
/// the minimal guest has no dynamic loader or libc, and a dynamic binary
/// there fails with a baffling "not found".
pub fn validate_guest_agent(path: &Path) -> Result<(), ImageError> {
    let invalid = |reason: String| ImageError::InvalidAgent {
        path: path.to_path_buf(),
        reason,
    };
    let mut f = File::open(path).ctx("open guest agent", path)?;
    let len = f.metadata().ctx("stat", path)?.len();
    let mut head = [0u8; 64];
    let n = read_up_to(&mut f, &mut head).ctx("read", path)?;
    if n < 4 || &head[..4] != ELF_MAGIC {
        return Err(invalid("not an ELF executable".to_string()));
    }
    let elf = Elf::parse(len, &head[..n]).map_err(&invalid)?;
    if elf.machine != EM_X86_64 {
        return Err(invalid(format!(
            "built for {}, not x86-64",
            machine_name(elf.machine)
        )));
    }
    let headers = elf.program_headers(&mut f).map_err(&invalid)?;
    if headers.iter().any(|p| p.kind == PT_INTERP) {
        return Err(invalid(
            "dynamically linked (has an ELF interpreter); build it static, e.g. \
             RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release \
             --target x86_64-unknown-linux-gnu"
                .to_string(),
        ));
    }
    Ok(())
}

/// The parts of an ELF64 little-endian header we need.
struct Elf {
    len: u64,
    machine: u16,
    phoff: u64,
    phentsize: u16,
    phnum: u16,
    shoff: u64,
    shentsize: u16,
    shnum: u16,
}

struct ProgramHeader {
    kind: u32,
    offset: u64,
    filesz: u64,
}

impl Elf {
    fn parse(len: u64, head: &[u8]) -> Result<Elf, String> {
        if head.len() < 64 {
            return Err(format!(
                "truncated ELF: header needs 64 bytes, file has {len}"
            ));
        }
        match head[4] {
            2 => {}
            1 => return Err("32-bit ELF; a 64-bit x86-64 kernel is needed".to_string()),
            c => return Err(format!("ELF with unknown class {c}")),
        }
        if head[5] != 1 {
            return Err("big-endian ELF; x86-64 is little-endian".to_string());
        }
        Ok(Elf {
            len,
            machine: le16(head, 0x12),
            phoff: le64(head, 0x20),
            shoff: le64(head, 0x28),
            phentsize: le16(head, 0x36),
            phnum: le16(head, 0x38),
            shentsize: le16(head, 0x3a),
            shnum: le16(head, 0x3c),
        })
    }

    /// Reads `size` bytes at `offset`, refusing ranges past the end of file.
    fn read_at(&self, f: &mut File, offset: u64, size: u64, what: &str) -> Result<Vec<u8>, String> {
        let end = offset
            .checked_add(size)
            .ok_or_else(|| format!("corrupt {what} offset"))?;
        if end > self.len {
            return Err(format!(
                "truncated ELF: {what} at {offset:#x}..{end:#x} lies past the end of the \
                 {}-byte file",
                self.len
            ));
        }
        let mut buf = vec![0u8; size as usize];
        f.seek(SeekFrom::Start(offset))
            .and_then(|_| f.read_exact(&mut buf))
            .map_err(|e| format!("reading {what}: {e}"))?;
        Ok(buf)
    }

    fn program_headers(&self, f: &mut File) -> Result<Vec<ProgramHeader>, String> {
        if self.phnum == 0 {
            return Ok(Vec::new());
        }
        if self.phentsize < 56 {
            return Err(format!(
                "corrupt ELF: program header size {}",
                self.phentsize
            ));
        }
        let size = u64::from(self.phentsize) * u64::from(self.phnum);
        let table = self.read_at(f, self.phoff, size, "program headers")?;
        Ok(table
            .chunks_exact(usize::from(self.phentsize))
            .map(|ph| ProgramHeader {
                kind: le32(ph, 0),
                offset: le64(ph, 0x08),
                filesz: le64(ph, 0x20),
            })
            .collect())
    }

    /// Looks for the PVH note in PT_NOTE segments, then SHT_NOTE sections
    /// (some linkers leave notes out of the program headers).
    fn has_pvh_note(&self, f: &mut File) -> Result<bool, String> {
        let mut regions = Vec::new();
        for ph in self.program_headers(f)? {
            if ph.kind == PT_NOTE {
                regions.push((ph.offset, ph.filesz));
            }
        }
        if self.shnum > 0 && self.shentsize >= 64 {
            let size = u64::from(self.shentsize) * u64::from(self.shnum);
            let table = self.read_at(f, self.shoff, size, "section headers")?;
            for sh in table.chunks_exact(usize::from(self.shentsize)) {
                if le32(sh, 0x04) == SHT_NOTE {
                    regions.push((le64(sh, 0x18), le64(sh, 0x20)));
                }
            }
        }
        for (offset, size) in regions {
            let notes = self.read_at(f, offset, size.min(MAX_NOTES_BYTES), "note segment")?;
            if contains_pvh_note(&notes) {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// Walks ELF notes (namesz, descsz, type, name, desc; 4-byte aligned).
fn contains_pvh_note(mut notes: &[u8]) -> bool {
    let align4 = |n: usize| n.div_ceil(4) * 4;
    while notes.len() >= 12 {
        let namesz = le32(notes, 0) as usize;
        let descsz = le32(notes, 4) as usize;
        let kind = le32(notes, 8);
        let name_end = 12 + namesz;
        if name_end > notes.len() {
            return false;
        }
        let name = &notes[12..name_end];
        if kind == XEN_ELFNOTE_PHYS32_ENTRY && name.strip_suffix(b"\0").unwrap_or(name) == b"Xen" {
            return true;
        }
        let next = align4(name_end) + align4(descsz);
        if next > notes.len() || next == 0 {
            return false;
        }
        notes = &notes[next..];
    }
    false
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match f.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn machine_name(machine: u16) -> &'static str {
    match machine {
        3 => "i386",
        40 => "ARM",
        62 => "x86-64",
        183 => "AArch64",
        243 => "RISC-V",
        _ => "unknown machine",
    }
}

fn describe_bytes(b: &[u8]) -> String {
    if b.is_empty() {
        return "nothing: the file is empty".to_string();
    }
    let hex: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("bytes {}", hex.join(" "))
}

#[cfg(test)]
#[path = "validate_tests.rs"]
mod tests;
