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
    /// Give the guest a new identity (hostname, machine id, MAC and addresses, fresh RNG
    /// state) after it was restored from a snapshot or cloned from another running VM.
    SetIdentity(IdentityRequest),
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

/// A new identity for a guest restored from a snapshot or cloned from a running VM.
///
/// The guest checks every field before changing anything, then reseeds its RNG first so its
/// random output diverges from the source VM's at once.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityRequest {
    /// New hostname: `[a-z0-9][a-z0-9-]{0,62}`.
    pub hostname: String,
    /// New `/etc/machine-id`: 32 lowercase hex characters, not all zero.
    pub machine_id: String,
    /// Interfaces to readdress, in order; the first one's first address is what the hostname
    /// resolves to in `/etc/hosts`. Interfaces not listed are left alone.
    #[serde(default)]
    pub interfaces: Vec<InterfaceIdentity>,
    /// Fresh entropy mixed into the guest kernel's RNG, which is then reseeded;
    /// [`RNG_SEED_MIN_LEN`](Self::RNG_SEED_MIN_LEN) to [`RNG_SEED_MAX_LEN`](Self::RNG_SEED_MAX_LEN)
    /// bytes from a cryptographic source.
    #[serde(with = "crate::b64")]
    pub rng_seed: Vec<u8>,
}

impl IdentityRequest {
    /// Fewest seed bytes the guest accepts (256 bits: enough to seed a kernel RNG on its own).
    pub const RNG_SEED_MIN_LEN: usize = 32;
    /// Most seed bytes the guest accepts.
    pub const RNG_SEED_MAX_LEN: usize = 4096;
}

/// The seed is RNG input: keep it out of logs.
impl std::fmt::Debug for IdentityRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityRequest")
            .field("hostname", &self.hostname)
            .field("machine_id", &self.machine_id)
            .field("interfaces", &self.interfaces)
            .field("rng_seed", &format_args!("<{} bytes>", self.rng_seed.len()))
            .finish()
    }
}

/// The new identity of one network interface. The interface is taken down, given `mac`, its
/// addresses replaced by `addresses`, brought up, and given a default route via `gateway`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterfaceIdentity {
    /// Interface name in the guest, e.g. `eth0`.
    pub name: String,
    /// Unicast MAC address, e.g. `52:54:00:12:34:56`.
    pub mac: String,
    /// Addresses in CIDR form, e.g. `10.77.0.5/24`; may be empty.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Default route via this address, which must be reachable through `addresses` (or, for
    /// IPv6, be link-local).
    #[serde(default)]
    pub gateway: Option<String>,
}
