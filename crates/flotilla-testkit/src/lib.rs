//! Test hosts for Flotilla's end-to-end tests (and for people trying
//! multi-host setups by hand).
//!
//! A [`TestHost`] is a network namespace with a veth link to the caller's
//! namespace, its own data directory and a real `flotilla agent` process
//! listening on the namespace's address. QEMU processes the agent starts live
//! in that namespace, so bridges and taps never leak into the host's.
//! Dropping a `TestHost` kills everything it started and removes the
//! namespace and the data directory, also when a test fails; what a test
//! process that was killed left behind, the next one removes ([`claims`]).

mod bare;
pub mod claims;
mod control;
mod host;
pub mod netns;
mod postgres;
mod procs;

pub use bare::{bare_qemu_command, BareQemu};
pub use control::ControlPlaneProcess;
pub use host::{ControlLinkOptions, HostOptions, TestHost};
pub use netns::{Fabric, NetNs};
pub use postgres::PgServer;
pub use procs::{mapped_files, process_alive, qemu_pids_under};

use std::path::PathBuf;

/// The `flotilla` binary under test: `FLOTILLA_BIN`, else next to the test
/// executable (`target/<profile>/flotilla`).
pub fn flotilla_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FLOTILLA_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test-binary>
    let profile_dir = exe
        .parent()
        .and_then(|d| d.parent())
        .map(PathBuf::from)
        .unwrap_or_default();
    profile_dir.join("flotilla")
}

/// The static guest agent: `FLOTILLA_GUEST_AGENT`, else the static release
/// build in this target directory (scripts/build-guest-agent makes it).
pub fn guest_agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FLOTILLA_GUEST_AGENT") {
        return PathBuf::from(p);
    }
    let target = flotilla_bin()
        .parent()
        .and_then(|d| d.parent())
        .map(PathBuf::from)
        .unwrap_or_default();
    target.join("x86_64-unknown-linux-gnu/release/flotilla-guest-agent")
}
