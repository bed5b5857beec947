//! What the agent holds for a VM while it runs: its QEMU process, the QMP
//! connection and the guest agent client. None of this is persisted; after an
//! agent restart it is rebuilt from the record (`adopt`).

use std::sync::Arc;

use flotilla_guest_protocol::client::GuestClient;
use flotilla_qemu::{QemuProcess, QmpClient};
use tokio::sync::watch;

/// Whether the guest agent can take requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// QEMU is (being) started; the guest agent has not answered yet.
    Waiting,
    Ready,
    /// The guest agent did not answer in time, or the connection failed.
    Failed(String),
    /// No QEMU process: the VM is stopped or crashed.
    Gone,
}

#[derive(Default)]
pub struct VmRuntime {
    pub process: Option<Arc<QemuProcess>>,
    pub qmp: Option<QmpClient>,
    pub guest: Option<Arc<GuestClient>>,
    /// Set by a stop so the exit of QEMU is not taken for a crash.
    pub stopping: bool,
    /// Bumped at every start or adoption; a monitor of an older run does nothing.
    pub generation: u64,
    /// The VM's memory image was captured by this agent moments ago (a
    /// clone, a start from a base): its next restore need not re-verify the
    /// layer it was just stored as. Never persisted: after a restart the
    /// layer is verified again.
    pub memory_just_captured: bool,
}

/// The readiness channel of one VM: writers are the start and monitor tasks,
/// readers are execs waiting for the guest.
pub struct ReadinessChannel {
    tx: watch::Sender<Readiness>,
}

impl Default for ReadinessChannel {
    fn default() -> Self {
        let (tx, _rx) = watch::channel(Readiness::Gone);
        ReadinessChannel { tx }
    }
}

impl ReadinessChannel {
    pub fn set(&self, r: Readiness) {
        self.tx.send_replace(r);
    }

    pub fn get(&self) -> Readiness {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Readiness> {
        self.tx.subscribe()
    }
}
