//! One host connection's read side: bytes in, requests dispatched, decode errors answered.

use std::sync::Arc;

use flotilla_guest_protocol::{FrameDecoder, Request};

use crate::dispatch;
use crate::writer::FrameWriter;
use crate::AgentContext;

/// Decoder state plus where replies go.
pub(crate) struct Session {
    decoder: FrameDecoder,
    writer: Arc<FrameWriter>,
    context: Arc<AgentContext>,
}

impl Session {
    pub(crate) fn new(writer: Arc<FrameWriter>, context: Arc<AgentContext>) -> Self {
        Self {
            decoder: FrameDecoder::new(),
            writer,
            context,
        }
    }

    /// Decodes what arrived and starts a handler for every complete request.
    pub(crate) fn receive(&mut self, bytes: &[u8]) {
        self.decoder.feed(bytes);
        while let Some(message) = self.decoder.next_message::<Request>() {
            match message {
                Ok(request) => {
                    let reply = self.writer.reply_to(request.id);
                    dispatch::spawn(request.body, reply, &self.context);
                }
                // Bad input gets an answer and decoding goes on; never fatal.
                Err(error) => self
                    .writer
                    .reply_to(error.reply_id())
                    .error(error.kind(), error.to_string()),
            }
        }
    }
}
