//! What the agent holds for a VM while it runs (its QEMU process, the QMP
//! connection and the guest agent client) or waits (a warm suspend's
//! standby QEMU). None of this is persisted; after an
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
    /// A QEMU waiting for a suspended VM's resume (a warm suspend).
    pub standby: Option<Standby>,
}

/// A QEMU started for a suspended VM with `-incoming defer` and the VM's
/// devices, taps and disks: its resume loads the state into it instead of
/// starting QEMU (tens of ms under TCG). It holds no guest memory until
/// then. Never persisted: an agent that restarts kills it as an orphan.
pub struct Standby {
    pub process: Arc<QemuProcess>,
    pub qmp: QmpClient,
    /// The layer it was made for, and the files it opened (device and
    /// inode of each disk, in the record's order): a resume from anything
    /// else starts a QEMU of its own.
    pub head: String,
    pub files: Vec<(u64, u64)>,
    /// When it started: the oldest goes first beyond the host's limit.
    pub since: std::time::Instant,
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
