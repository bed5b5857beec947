//! What happens after a Shutdown request has been acknowledged.

use std::time::Duration;

use crate::log;

/// How to carry out a shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ShutdownAction {
    /// `sync()` then `reboot(RB_AUTOBOOT)`: QEMU runs with `-no-reboot`, so this ends the VM. Used
    /// for power-off too, as our microVM has no ACPI to power off with.
    Reboot,
    /// Exit the agent (tests on a unix socket: never reboot the host).
    Exit,
    /// Only acknowledge.
    Ignore,
}

/// Gives the acknowledgement time to leave the VM, then acts.
pub(crate) fn carry_out(action: ShutdownAction) {
    match action {
        ShutdownAction::Reboot => {
            std::thread::sleep(Duration::from_millis(100));
            nix::unistd::sync();
            // Only returns on failure (e.g. not root); /init will restart us if we exit.
            let Err(error) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
            log!("reboot failed: {error}");
        }
        ShutdownAction::Exit => {
            std::thread::sleep(Duration::from_millis(50));
            std::process::exit(0);
        }
        ShutdownAction::Ignore => {}
    }
}
