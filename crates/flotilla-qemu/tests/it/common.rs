//! Shared test helpers: temp dirs, kill guards and a tiny PVH "kernel".
//!
//! The stub kernel is a hand-assembled 32-bit PVH entry point that writes a
//! message to the serial port and then either triple-faults (QEMU exits
//! under `-no-reboot`, like the probe guest's reboot) or halts forever. It
//! lets real QEMU boot a "guest" in milliseconds without the guest image.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flotilla_qemu::{ProcessIdentity, Signal};

pub fn qemu_binary() -> PathBuf {
    std::env::var_os("FLOTILLA_QEMU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/qemu-system-x86_64"))
}

/// A temp dir (short path, so socket paths fit in `sun_path`).
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("flq-")
        .tempdir_in("/tmp")
        .expect("create temp dir")
}

/// SIGKILLs the recorded processes when dropped, so a failing test leaves no
/// QEMU behind. Identities protect against killing a recycled pid.
#[derive(Default)]
pub struct KillGuard(Vec<ProcessIdentity>);

impl KillGuard {
    pub fn watch(&mut self, identity: ProcessIdentity) {
        self.0.push(identity);
    }
}

impl Drop for KillGuard {
    fn drop(&mut self) {
        for identity in &self.0 {
            if identity.is_alive() {
                let _ = identity.signal(Signal::SIGKILL);
            }
        }
    }
}

/// True if /proc has no entry at all for `pid` (exited and reaped).
pub fn reaped(pid: i32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub async fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Arguments for a paused microvm with no kernel and a QMP socket.
pub fn paused_qemu_args(qmp: &Path) -> Vec<String> {
    [
        "-M",
        "microvm,acpi=off,memory-backend=mem",
        "-object",
        "memory-backend-ram,id=mem,size=64M",
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-S",
        "-qmp",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("unix:{},server=on,wait=off", qmp.display())])
    .collect()
}

/// What the stub kernel does after printing.
#[derive(Clone, Copy)]
pub enum StubEnd {
    /// Load an empty IDT and trap: a triple fault, i.e. a reset.
    TripleFault,
    /// `cli; hlt` forever.
    Halt,
    /// `jmp $` forever: a guest that keeps its CPU busy.
    Spin,
}

/// Physical load address of the stub (1 MiB).
const BASE: u32 = 0x10_0000;

/// Writes an ELF64 file with a PVH entry note (`XEN_ELFNOTE_PHYS32_ENTRY`).
pub fn write_pvh_stub(path: &Path, message: &str, end: StubEnd) {
    std::fs::write(path, pvh_stub(message, end)).expect("write stub kernel");
}

fn pvh_stub(message: &str, end: StubEnd) -> Vec<u8> {
    // 32-bit code, entered in flat protected mode.
    let mut code: Vec<u8> = vec![0x66, 0xBA, 0xF8, 0x03]; // mov dx, 0x3f8
    let msg_imm = code.len() + 1;
    code.extend([0xBE, 0, 0, 0, 0]); // mov esi, msg
    let print_loop = code.len();
    code.extend([0xAC, 0x84, 0xC0]); // lodsb; test al, al
    let jz = code.len();
    code.extend([0x74, 0x00]); // jz done
    code.push(0xEE); // out dx, al
    let back = print_loop as i64 - (code.len() as i64 + 2);
    code.extend([0xEB, back as i8 as u8]); // jmp print_loop
    code[jz + 1] = (code.len() - (jz + 2)) as u8;
    let idt_imm = match end {
        StubEnd::TripleFault => {
            let at = code.len() + 3;
            code.extend([0x0F, 0x01, 0x1D, 0, 0, 0, 0]); // lidt [idt]
            code.push(0xCC); // int3 with no IDT: triple fault
            Some(at)
        }
        StubEnd::Halt => None,
        StubEnd::Spin => {
            code.extend([0xEB, 0xFE]); // jmp $
            None
        }
    };
    code.extend([0xFA, 0xF4, 0xEB, 0xFD]); // cli; hlt; jmp hlt
    while !code.len().is_multiple_of(8) {
        code.push(0x90);
    }
    let idt = code.len();
    code.extend([0u8; 8]); // limit 0, base 0
    let msg = code.len();
    code.extend(message.as_bytes());
    code.push(0);
    code[msg_imm..msg_imm + 4].copy_from_slice(&(BASE + msg as u32).to_le_bytes());
    if let Some(at) = idt_imm {
        code[at..at + 4].copy_from_slice(&(BASE + idt as u32).to_le_bytes());
    }

    let mut note = Vec::new();
    note.extend(4u32.to_le_bytes()); // namesz
    note.extend(8u32.to_le_bytes()); // descsz
    note.extend(18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    note.extend(b"Xen\0");
    note.extend(u64::from(BASE).to_le_bytes());

    let (ehsize, phentsize, phnum) = (64u64, 56u64, 2u64);
    let note_off = ehsize + phnum * phentsize;
    let code_off = (note_off + note.len() as u64 + 15) & !15;
    let mut elf = Vec::new();
    elf.extend(b"\x7fELF");
    elf.extend([2, 1, 1, 0]); // 64-bit, little endian, version 1, SysV
    elf.extend([0u8; 8]);
    elf.extend(2u16.to_le_bytes()); // ET_EXEC
    elf.extend(62u16.to_le_bytes()); // EM_X86_64
    elf.extend(1u32.to_le_bytes());
    elf.extend(u64::from(BASE).to_le_bytes()); // e_entry
    elf.extend(ehsize.to_le_bytes()); // e_phoff
    elf.extend(0u64.to_le_bytes()); // e_shoff
    elf.extend(0u32.to_le_bytes()); // e_flags
    for half in [ehsize, phentsize, phnum, 64, 0, 0] {
        elf.extend((half as u16).to_le_bytes());
    }
    let code_len = code.len() as u64;
    // PT_LOAD, rwx, at BASE.
    program_header(&mut elf, 1, 7, code_off, u64::from(BASE), code_len, 0x1000);
    // PT_NOTE holding the PVH entry.
    program_header(&mut elf, 4, 4, note_off, 0, note.len() as u64, 4);
    elf.extend(&note);
    elf.resize(code_off as usize, 0);
    elf.extend(&code);
    elf
}

fn program_header(
    elf: &mut Vec<u8>,
    kind: u32,
    flags: u32,
    off: u64,
    addr: u64,
    len: u64,
    align: u64,
) {
    elf.extend(kind.to_le_bytes());
    elf.extend(flags.to_le_bytes());
    for field in [off, addr, addr, len, len, align] {
        elf.extend(field.to_le_bytes());
    }
}
