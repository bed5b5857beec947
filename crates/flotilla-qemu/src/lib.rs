//! flotilla-qemu
