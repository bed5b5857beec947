//! The single writer of response frames, shared by every handler thread, and the per-request
//! [`Reply`] handle that handlers answer through.
//!
//! Replies are never dropped on purpose, even when the host that asked seems to have gone: the
//! guest learns of host disconnects through a different virtqueue than the data, so a quick
//! reconnect's requests can arrive before the old host's disconnect is seen. Clients discard
//! replies to ids they did not send instead.

use std::io::{self, Write};
use std::sync::{Arc, Mutex, PoisonError};

use flotilla_guest_protocol::{encode_message, ErrorKind, GuestErrorReply, Response, ResponseBody};

/// Serializes whole frames onto the channel; the mutex keeps frames from interleaving.
pub(crate) struct FrameWriter {
    out: Mutex<Box<dyn Write + Send>>,
}

impl FrameWriter {
    pub(crate) fn new(out: impl Write + Send + 'static) -> Arc<Self> {
        Arc::new(Self {
            out: Mutex::new(Box::new(out)),
        })
    }

    /// A handle for answering request `id`.
    pub(crate) fn reply_to(self: &Arc<Self>, id: u64) -> Reply {
        Reply {
            writer: self.clone(),
            id,
        }
    }

    fn send(&self, id: u64, body: ResponseBody) -> io::Result<()> {
        let frame = match encode_message(&Response { id, body }) {
            Ok(frame) => frame,
            // Replies are sized to fit; reaching this is a bug, reported rather than dropped.
            Err(error) => encode_message(&Response {
                id,
                body: error_body(ErrorKind::Internal, format!("cannot encode reply: {error}")),
            })
            .map_err(io::Error::other)?,
        };
        // Poison only means another thread panicked while holding the lock; the writer is fine.
        let mut out = self.out.lock().unwrap_or_else(PoisonError::into_inner);
        out.write_all(&frame)?;
        out.flush()
    }
}

/// Answers one request. Send failures mean the host went away; callers may ignore them.
#[derive(Clone)]
pub(crate) struct Reply {
    writer: Arc<FrameWriter>,
    id: u64,
}

impl Reply {
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    pub(crate) fn send(&self, body: ResponseBody) -> io::Result<()> {
        self.writer.send(self.id, body)
    }

    pub(crate) fn error(&self, kind: ErrorKind, message: impl Into<String>) {
        let _ = self.send(error_body(kind, message.into()));
    }
}

fn error_body(kind: ErrorKind, message: String) -> ResponseBody {
    ResponseBody::Error(GuestErrorReply { kind, message })
}
