//! Test helpers shared by the crate's unit tests: hand-made ELF files.

/// One Xen note of the given type with a 4-byte descriptor.
pub(crate) fn note(kind: u32) -> Vec<u8> {
    let mut n = Vec::new();
    n.extend_from_slice(&4u32.to_le_bytes()); // namesz, "Xen\0"
    n.extend_from_slice(&4u32.to_le_bytes()); // descsz
    n.extend_from_slice(&kind.to_le_bytes());
    n.extend_from_slice(b"Xen\0");
    n.extend_from_slice(&0x0100_0000u32.to_le_bytes());
    n
}

/// A minimal ELF64 file: header, one program header, then `notes` (as a
/// PT_NOTE segment when `notes` is given, else a PT_LOAD).
pub(crate) fn fake_elf(class: u8, machine: u16, notes: Option<&[u8]>) -> Vec<u8> {
    let payload = notes.unwrap_or(&[0u8; 16]);
    let mut b = vec![0u8; 64];
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = class;
    b[5] = 1; // little-endian
    b[6] = 1;
    b[0x10..0x12].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    b[0x12..0x14].copy_from_slice(&machine.to_le_bytes());
    b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // phoff
    b[0x34..0x36].copy_from_slice(&64u16.to_le_bytes()); // ehsize
    b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes()); // phentsize
    b[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes()); // phnum
    let mut ph = vec![0u8; 56];
    let kind: u32 = if notes.is_some() { 4 } else { 1 };
    ph[..4].copy_from_slice(&kind.to_le_bytes());
    ph[0x08..0x10].copy_from_slice(&120u64.to_le_bytes()); // offset
    ph[0x20..0x28].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    b.extend_from_slice(&ph);
    b.extend_from_slice(payload);
    b
}

/// A tiny file `validate_kernel` accepts as a PVH kernel.
pub(crate) fn fake_pvh_kernel() -> Vec<u8> {
    fake_elf(2, 62, Some(&note(18)))
}
