//! Integration tests of flotilla-qemu, in one binary: real QEMU where QEMU is
//! involved, fake QMP servers for protocol misbehaviour.

mod accel;
mod common;
mod process;
mod qmp_fake;
mod qmp_qemu;
