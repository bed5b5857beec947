//! Wire protocol between the Flotilla host agent and the guest agent.
//!
//! The channel is a virtio-serial port named [`AGENT_PORT_NAME`]. On the host, QEMU exposes it as a
//! unix socket; in the guest it is a character device under `/dev`. Both sides exchange frames:
//!
//! ```text
//! +------+---------+----------+----------------+-------------------+
//! | "FL" | version | reserved | length (u32 BE)| JSON payload      |
//! +------+---------+----------+----------------+-------------------+
//!   2 B      1 B       1 B          4 B          `length` bytes
//! ```
//!
//! The host sends [`Request`]s, the guest answers with one or more [`Response`]s carrying the same
//! `id` (an exec may stream [`ResponseBody::Output`] frames before its [`ResponseBody::Exit`]).
//!
//! Architecture invariant: only this crate knows the byte layout of a frame and the JSON shape of
//! the messages; the host agent and the guest agent use the typed values.
//!
//! ```
//! use flotilla_guest_protocol::{encode_message, FrameDecoder, Request, RequestBody};
//!
//! let bytes = encode_message(&Request { id: 7, body: RequestBody::Ping }).unwrap();
//! let mut decoder = FrameDecoder::new();
//! decoder.feed(&bytes);
//! let request: Request = decoder.next_message().unwrap().unwrap();
//! assert_eq!(request.id, 7);
//! ```

pub mod b64;
mod decoder;
mod frame;
mod request;
mod response;

#[cfg(feature = "client")]
pub mod client;

#[cfg(test)]
mod wire_tests;

pub use decoder::FrameDecoder;
pub use frame::{decode_message, encode_frame, encode_message, FrameError, HEADER_LEN, MAGIC};
pub use request::{ExecRequest, IdentityRequest, InterfaceIdentity, Request, RequestBody};
pub use response::{
    ErrorKind, ExecExit, GuestAddress, GuestErrorReply, GuestInfo, HelloReply, OutputStream,
    Response, ResponseBody,
};

#[cfg(feature = "client")]
pub use client::{ExecEvent, ExecStream, GuestClient, GuestClientError};

/// Version carried in every frame header and in `Hello`.
pub const PROTOCOL_VERSION: u8 = 1;

/// Largest accepted payload, in bytes (1 MiB).
pub const MAX_FRAME_LEN: usize = 1024 * 1024;

/// Name of the virtio-serial port the guest agent listens on.
pub const AGENT_PORT_NAME: &str = "org.flotilla.agent.0";

/// Largest `data` chunk the guest puts in one `Output` frame (64 KiB).
pub const MAX_OUTPUT_CHUNK: usize = 64 * 1024;
