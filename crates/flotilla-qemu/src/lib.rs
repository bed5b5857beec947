//! flotilla-qemu: runs Linux microVMs on QEMU's `microvm` machine.
//!
//! - [`config`]: a VM's [`QemuConfig`], validated and turned into QEMU
//!   arguments (the only place that knows QEMU's command line).
//! - [`process`]: starting QEMU detached from the agent, adopting a QEMU left
//!   by an earlier agent, waiting for and killing it; [`identity`] guards
//!   against pid reuse.
//! - [`qmp`]: the QMP client (the only place that speaks QMP JSON).
//! - [`accel`]: KVM/TCG choice, proving KVM by booting a probe guest.
//!
//! ```no_run
//! # async fn demo(config: flotilla_qemu::QemuConfig) -> Result<(), Box<dyn std::error::Error>> {
//! use std::path::Path;
//! use flotilla_qemu::QemuProcess;
//!
//! let qemu = Path::new("/usr/bin/qemu-system-x86_64");
//! let (process, qmp) = QemuProcess::start(qemu, &config, Path::new("/run/vm/qemu.log")).await?;
//! println!("{:?}", qmp.query_status().await?);
//! qmp.quit().await?;
//! process.wait_exit().await;
//! # Ok(()) }
//! ```

pub mod accel;
pub mod block;
pub mod config;
pub mod error;
pub mod identity;
pub mod live;
pub mod mapped_ram;
pub mod migration;
pub mod process;
pub mod qmp;

pub use accel::{
    check_kvm_device, detect_accel, detect_accel_with_device, run_probe, AccelDecision, AccelProbe,
    ProbeOutcome, DEFAULT_PROBE_CACHE, DEFAULT_PROBE_TIMEOUT, PROBE_CMDLINE, PROBE_MARKER,
};
pub use config::{
    Accel, AccelChoice, DriveConfig, LayerBacking, MemoryFile, NbdBacking, NicConfig, QemuConfig,
};
pub use error::{QemuError, QmpError};
pub use identity::ProcessIdentity;
pub use nix::sys::signal::Signal;
pub use process::{ExitInfo, QemuProcess, DEFAULT_STARTUP_TIMEOUT};
pub use qmp::{
    next_event, QemuVersion, QmpClient, QmpEvent, QmpGreeting, QmpTimestamp, StatusInfo,
    DEFAULT_COMMAND_TIMEOUT,
};
