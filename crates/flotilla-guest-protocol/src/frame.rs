//! Frame layout, the encoder, payload decoding and the codec's error type.
//!
//! Payloads are JSON text. JSON never contains the byte 0x01 (control characters must be escaped
//! inside strings), so the three bytes `"FL" 0x01` that open every version-1 header never occur
//! inside a well-formed payload. The decoder relies on that to resynchronise after garbage or a
//! frame cut short by a reconnect.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::response::ErrorKind;
use crate::{MAX_FRAME_LEN, PROTOCOL_VERSION};

/// The two bytes that open every frame.
pub const MAGIC: [u8; 2] = *b"FL";

/// Size of the frame header: magic, version, reserved byte, u32 length.
pub const HEADER_LEN: usize = 8;

/// Magic followed by the version byte: the sequence the decoder scans for when resynchronising.
pub(crate) const SYNC: [u8; 3] = [MAGIC[0], MAGIC[1], PROTOCOL_VERSION];

/// Everything that can go wrong while encoding or decoding frames and messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Bytes that do not start with the frame magic; the decoder skips ahead to the next frame.
    #[error("bad frame magic; skipping to the next frame")]
    BadMagic,
    /// A header with a version this side does not speak.
    #[error("unsupported protocol version {0} (this side speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion(u8),
    /// A header whose reserved byte is not zero.
    #[error("reserved header byte is {0:#04x}, expected 0")]
    BadReserved(u8),
    /// A frame longer than [`MAX_FRAME_LEN`]; its payload is skipped.
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_LEN} bytes")]
    TooLarge(u64),
    /// A frame whose payload was interrupted by the header of another frame.
    #[error("frame cut short by the start of another frame")]
    Truncated,
    /// A payload that is not JSON.
    #[error("frame payload is not valid JSON: {0}")]
    InvalidJson(String),
    /// A JSON payload that is not a valid message; `id` is set when it could be read.
    #[error("invalid message: {message}")]
    InvalidMessage {
        /// The message's `id` field, if present and numeric.
        id: Option<u64>,
        /// What was wrong with it.
        message: String,
    },
    /// A message that could not be serialized.
    #[error("cannot encode message: {0}")]
    Encode(String),
}

impl FrameError {
    /// The error kind to report to the peer that sent the offending frame.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::BadMagic | Self::BadReserved(_) | Self::Truncated | Self::InvalidJson(_) => {
                ErrorKind::MalformedFrame
            }
            Self::UnsupportedVersion(_) => ErrorKind::UnsupportedVersion,
            Self::TooLarge(_) => ErrorKind::FrameTooLarge,
            Self::InvalidMessage { .. } => ErrorKind::InvalidRequest,
            Self::Encode(_) => ErrorKind::Internal,
        }
    }

    /// The id to answer with: the offending message's id if it was readable, else 0.
    pub fn reply_id(&self) -> u64 {
        match self {
            Self::InvalidMessage { id: Some(id), .. } => *id,
            _ => 0,
        }
    }
}

/// Wraps a payload in a frame header.
pub fn encode_frame(payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    if payload.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(payload.len() as u64));
    }
    // Cannot fail: the length was just checked against a limit far below u32::MAX.
    let len = u32::try_from(payload.len()).map_err(|_| FrameError::TooLarge(u64::MAX))?;
    let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
    frame.extend_from_slice(&MAGIC);
    frame.push(PROTOCOL_VERSION);
    frame.push(0);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(payload);
    Ok(frame)
}

/// Serializes a message to JSON and frames it.
pub fn encode_message<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    let payload = serde_json::to_vec(message).map_err(|e| FrameError::Encode(e.to_string()))?;
    encode_frame(&payload)
}

/// Parses a frame payload into a message, telling bad JSON apart from a bad message.
pub fn decode_message<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    let value: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| FrameError::InvalidJson(e.to_string()))?;
    let id = value.get("id").and_then(serde_json::Value::as_u64);
    serde_json::from_value(value).map_err(|e| FrameError::InvalidMessage {
        id,
        message: e.to_string(),
    })
}
