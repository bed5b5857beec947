//! Acknowledging a Shutdown request, then carrying it out.

use std::sync::mpsc;
use std::time::Duration;

use flotilla_guest_protocol::ResponseBody;

use crate::log;
use crate::writer::Reply;

/// How long the acknowledgement may take before we go down without it.
const ACK_WAIT: Duration = Duration::from_secs(2);

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

/// Sends `ShutdownAck`, waiting at most [`ACK_WAIT`]: a virtio-serial write blocks while no host
/// is connected, and a host that asked and left must not keep the guest up.
pub(crate) fn acknowledge(reply: &Reply) {
    let (done, written) = mpsc::channel();
    let reply = reply.clone();
    let sent = std::thread::Builder::new()
        .name("shutdown-ack".into())
        .spawn(move || {
            let _ = reply.send(ResponseBody::ShutdownAck);
            let _ = done.send(());
        });
    if sent.is_ok() && written.recv_timeout(ACK_WAIT).is_err() {
        log!("shutdown acknowledgement not delivered; going ahead");
    }
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
