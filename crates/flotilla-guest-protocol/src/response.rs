//! Messages the guest sends back to the host.

use serde::{Deserialize, Serialize};

/// One reply frame for request `id` (0 when the request's id could not be read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Response {
    /// The id of the request this answers.
    pub id: u64,
    /// The answer.
    pub body: ResponseBody,
}

/// The replies the guest agent sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseBody {
    /// Answer to `Hello`.
    Hello(HelloReply),
    /// A chunk of a command's output (streamed execs, or output too large for one `Exit`).
    Output {
        /// Which stream it came from.
        stream: OutputStream,
        /// Up to [`MAX_OUTPUT_CHUNK`](crate::MAX_OUTPUT_CHUNK) bytes.
        #[serde(with = "crate::b64")]
        data: Vec<u8>,
    },
    /// The command finished; the last frame of an exec.
    Exit(ExecExit),
    /// Answer to `Info`.
    Info(GuestInfo),
    /// The request failed; the last frame for its id.
    Error(GuestErrorReply),
    /// Answer to `Ping`.
    Pong,
    /// Answer to `Shutdown`, sent before the guest goes down.
    ShutdownAck,
    /// Answer to `SetClock`: how far the guest's clock moved, in milliseconds.
    ClockSet {
        /// New time minus old time (negative when the clock went back).
        adjusted_by_ms: i64,
    },
    /// Answer to `SetIdentity`: the whole identity was applied.
    IdentitySet {
        /// How long applying it took in the guest, in milliseconds.
        applied_ms: u64,
    },
}

/// The guest's side of the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReply {
    /// The nonce from the `Hello` being answered.
    pub nonce: u64,
    /// The protocol version the guest speaks.
    pub protocol_version: u32,
    /// The guest agent's version.
    pub agent_version: String,
    /// Guest uptime when the agent became ready to serve, in milliseconds.
    pub boot_ms: u64,
    /// Guest uptime now, in milliseconds.
    pub uptime_ms: u64,
}

/// Which output stream a chunk belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// How a command ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecExit {
    /// Exit code, if it exited normally.
    pub code: Option<i32>,
    /// Signal number, if a signal killed it.
    pub signal: Option<i32>,
    /// True when the agent killed it because `timeout_ms` passed.
    pub timed_out: bool,
    /// Time from spawn to exit.
    pub duration_ms: u64,
    /// Collected standard output; empty when the output was sent as `Output` frames.
    #[serde(with = "crate::b64")]
    pub stdout: Vec<u8>,
    /// Collected standard error; empty when the output was sent as `Output` frames.
    #[serde(with = "crate::b64")]
    pub stderr: Vec<u8>,
}

impl ExecExit {
    /// True for an exit code of 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// Facts about the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestInfo {
    /// `uname -r`.
    pub kernel_release: String,
    /// `uname -v`.
    pub kernel_version: String,
    /// The guest's hostname.
    pub hostname: String,
    /// Guest uptime in milliseconds.
    pub uptime_ms: u64,
    /// `MemTotal` from `/proc/meminfo`.
    pub mem_total_kib: u64,
    /// `MemAvailable` from `/proc/meminfo`.
    pub mem_available_kib: u64,
    /// IPv4 and IPv6 addresses of the guest's interfaces.
    pub addresses: Vec<GuestAddress>,
    /// Contents of `/etc/machine-id`, if present.
    pub machine_id: Option<String>,
}

/// One address on a guest interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestAddress {
    /// Interface name, e.g. `eth0`.
    pub interface: String,
    /// The address in its usual text form.
    pub address: String,
    /// Network prefix length.
    pub prefix_len: u8,
}

/// A failed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestErrorReply {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// Human-readable detail.
    pub message: String,
}

/// Failure categories reported by the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The frame could not be decoded.
    MalformedFrame,
    /// The frame exceeded [`MAX_FRAME_LEN`](crate::MAX_FRAME_LEN).
    FrameTooLarge,
    /// The frame or `Hello` named a protocol version the guest does not speak.
    UnsupportedVersion,
    /// The frame decoded but is not a valid request.
    InvalidRequest,
    /// The program to exec does not exist.
    CommandNotFound,
    /// The program (or its working directory) may not be used.
    PermissionDenied,
    /// The program could not be started for another reason.
    SpawnFailed,
    /// A fault inside the agent.
    Internal,
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Self::MalformedFrame => "malformed frame",
            Self::FrameTooLarge => "frame too large",
            Self::UnsupportedVersion => "unsupported version",
            Self::InvalidRequest => "invalid request",
            Self::CommandNotFound => "command not found",
            Self::PermissionDenied => "permission denied",
            Self::SpawnFailed => "spawn failed",
            Self::Internal => "internal error",
        };
        f.write_str(name)
    }
}
