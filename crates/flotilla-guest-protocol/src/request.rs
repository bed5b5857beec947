//! Messages the host sends to the guest.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One request; every response to it carries the same `id`. Id 0 is reserved for replies to
/// frames whose id could not be read, so senders start at 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Chosen by the sender, unique among its requests in flight.
    pub id: u64,
    /// What to do.
    pub body: RequestBody,
}

/// The operations the guest agent offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum RequestBody {
    /// Handshake; the reply echoes `nonce` so the host can tell it from stale replies.
    Hello {
        /// Random value echoed in the reply.
        nonce: u64,
        /// The protocol version the host speaks.
        protocol_version: u32,
    },
    /// Run a command.
    Exec(ExecRequest),
    /// Report facts about the guest.
    Info,
    /// Acknowledge, then reboot (which ends a `-no-reboot` QEMU) or power off.
    Shutdown {
        /// Ask for a reboot rather than a power-off (both end the VM today).
        reboot: bool,
    },
    /// Liveness check.
    Ping,
    /// Set the guest's wall clock (after a resume, the guest's clock still
    /// shows the time it was suspended at).
    SetClock {
        /// Nanoseconds since the Unix epoch, UTC.
        unix_nanos: u64,
    },
}

/// A command to run in the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Variables added to (or replacing those in) the agent's environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory; the agent's own when absent.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Bytes written to the command's standard input, which is then closed. Absent means
    /// standard input is `/dev/null`.
    #[serde(default, with = "crate::b64::option")]
    pub stdin: Option<Vec<u8>>,
    /// Kill the command's process group after this long.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Send output as `Output` frames while it arrives instead of inside `Exit`.
    #[serde(default)]
    pub stream: bool,
}

impl ExecRequest {
    /// A request to run `argv` with defaults for everything else.
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            argv: argv.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }
}
