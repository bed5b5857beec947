//! Incremental frame decoder: feed it bytes as they arrive, pull complete frames out.
//!
//! It never panics and never gives up: every problem is reported as a [`FrameError`] and decoding
//! continues at the next frame. Oversized payloads are dropped as they arrive instead of being
//! buffered, so memory stays bounded by one frame plus one `feed` call.

use serde::de::DeserializeOwned;

use crate::frame::{decode_message, FrameError, HEADER_LEN, MAGIC, SYNC};
use crate::{MAX_FRAME_LEN, PROTOCOL_VERSION};

/// Where the decoder stands in the byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At a frame boundary, expecting a header.
    Header,
    /// Dropping bytes until the next `SYNC` sequence.
    Resync,
    /// Dropping the rest of an oversized frame (or less, if a new frame shows up inside it).
    Skip { remaining: u64 },
    /// Header accepted; waiting for `len` payload bytes. Positions (from the frame start) below
    /// `scanned` are known not to begin a `SYNC` sequence.
    Payload { len: usize, scanned: usize },
}

/// Incremental, panic-free decoder of protocol frames.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
    state: State,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    /// An empty decoder positioned at a frame boundary.
    pub fn new() -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            state: State::Header,
        }
    }

    /// Appends received bytes. Call [`next_frame`](Self::next_frame) until it returns `None`
    /// after each feed.
    pub fn feed(&mut self, data: &[u8]) {
        self.compact();
        self.buf.extend_from_slice(data);
        // Drop skipped bytes right away so they are never held.
        while matches!(self.state, State::Resync | State::Skip { .. }) && self.discard_step() {}
        self.compact();
    }

    /// Drops any partial frame and returns to a frame boundary (e.g. when the peer went away).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.start = 0;
        self.state = State::Header;
    }

    /// Number of bytes held that have not been decoded yet.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete payload, an error about the stream, or `None` when more bytes are needed.
    pub fn next_frame(&mut self) -> Option<Result<Vec<u8>, FrameError>> {
        loop {
            match self.state {
                State::Resync | State::Skip { .. } => {
                    if !self.discard_step() {
                        return None;
                    }
                }
                State::Header => match self.parse_header() {
                    HeaderStep::Wait => return None,
                    HeaderStep::Accepted => {}
                    HeaderStep::Rejected(error) => return Some(Err(error)),
                },
                State::Payload { len, scanned } => return self.payload_step(len, scanned),
            }
        }
    }

    /// Like [`next_frame`](Self::next_frame), then parses the payload as a JSON message.
    pub fn next_message<T: DeserializeOwned>(&mut self) -> Option<Result<T, FrameError>> {
        self.next_frame()
            .map(|frame| frame.and_then(|payload| decode_message(&payload)))
    }

    fn pending(&self) -> &[u8] {
        self.buf.get(self.start..).unwrap_or_default()
    }

    fn compact(&mut self) {
        if self.start >= self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 0 && self.start * 2 >= self.buf.len() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }

    /// Runs one `Resync`/`Skip` step; returns true once back at a frame boundary.
    fn discard_step(&mut self) -> bool {
        let data = self.pending();
        match self.state {
            State::Resync => match find_sync(data) {
                Some(at) => {
                    self.start += at;
                    self.state = State::Header;
                    true
                }
                None => {
                    // Keep a trailing "F" or "FL": the rest of the sequence may come next.
                    let keep = partial_sync_suffix(data);
                    self.start += data.len() - keep;
                    false
                }
            },
            State::Skip { remaining } => {
                let take = usize::try_from(remaining).map_or(data.len(), |r| r.min(data.len()));
                // A new frame may begin inside the skipped range (the big one was cut short).
                let window = data
                    .get(..take.saturating_add(2).min(data.len()))
                    .unwrap_or(data);
                if let Some(at) = find_sync(window).filter(|&at| at < take) {
                    self.start += at;
                    self.state = State::Header;
                    return true;
                }
                // Hold back a prefix of SYNC that runs into the end of what we have.
                let consume = (data.len().saturating_sub(2)..take)
                    .find(|&at| data.get(at..).is_some_and(|tail| SYNC.starts_with(tail)))
                    .unwrap_or(take);
                self.start += consume;
                let remaining = remaining - consume as u64;
                if remaining == 0 {
                    self.state = State::Header;
                    true
                } else {
                    self.state = State::Skip { remaining };
                    false
                }
            }
            State::Header | State::Payload { .. } => true,
        }
    }

    fn parse_header(&mut self) -> HeaderStep {
        let data = self.pending();
        let byte = |at: usize| data.get(at).copied();
        let Some(first) = byte(0) else {
            return HeaderStep::Wait;
        };
        let rejection = if first != MAGIC[0] || byte(1).is_some_and(|b| b != MAGIC[1]) {
            FrameError::BadMagic
        } else if let Some(version) = byte(2).filter(|&v| v != PROTOCOL_VERSION) {
            FrameError::UnsupportedVersion(version)
        } else if let Some(reserved) = byte(3).filter(|&r| r != 0) {
            FrameError::BadReserved(reserved)
        } else {
            let Some(len_bytes) = data.get(4..HEADER_LEN) else {
                return HeaderStep::Wait;
            };
            let len = u32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]);
            let len = len as usize;
            if len > MAX_FRAME_LEN {
                // Skip from offset 1 so a frame starting inside this bogus header is still found.
                self.start += 1;
                self.state = State::Skip {
                    remaining: (HEADER_LEN - 1 + len) as u64,
                };
                return HeaderStep::Rejected(FrameError::TooLarge(len as u64));
            }
            self.state = State::Payload { len, scanned: 1 };
            return HeaderStep::Accepted;
        };
        self.start += 1;
        self.state = State::Resync;
        HeaderStep::Rejected(rejection)
    }

    fn payload_step(&mut self, len: usize, scanned: usize) -> Option<Result<Vec<u8>, FrameError>> {
        let data = self.pending();
        let frame_len = HEADER_LEN + len;
        let end = frame_len.min(data.len());
        // A SYNC inside the frame means it was cut short and a new frame began there.
        if let Some(region) = data.get(scanned..end) {
            if let Some(at) = find_sync(region) {
                self.start += scanned + at;
                self.state = State::Header;
                return Some(Err(FrameError::Truncated));
            }
        }
        let scanned = scanned.max(end.saturating_sub(2));
        let Some(payload) = data.get(HEADER_LEN..frame_len) else {
            self.state = State::Payload { len, scanned };
            return None;
        };
        // A frame ending in "F" or "FL" may be a cut-short one whose length swallowed the start
        // of the next header. JSON never ends that way, so waiting for the next bytes to tell is
        // free for well-formed frames.
        for at in frame_len.saturating_sub(2).max(1)..frame_len {
            if data
                .get(at..frame_len)
                .is_some_and(|tail| SYNC.starts_with(tail))
            {
                match data.get(at..at + SYNC.len()) {
                    None => {
                        self.state = State::Payload { len, scanned };
                        return None;
                    }
                    Some(window) if window == SYNC => {
                        self.start += at;
                        self.state = State::Header;
                        return Some(Err(FrameError::Truncated));
                    }
                    Some(_) => {}
                }
            }
        }
        let payload = payload.to_vec();
        self.start += frame_len;
        self.state = State::Header;
        Some(Ok(payload))
    }
}

/// Outcome of looking at a header.
enum HeaderStep {
    Wait,
    Accepted,
    Rejected(FrameError),
}

fn find_sync(data: &[u8]) -> Option<usize> {
    data.windows(SYNC.len()).position(|window| window == SYNC)
}

/// Length of the longest suffix of `data` that is a proper prefix of `SYNC`.
fn partial_sync_suffix(data: &[u8]) -> usize {
    (1..SYNC.len())
        .rev()
        .find(|&n| data.len() >= n && data[data.len() - n..] == SYNC[..n])
        .unwrap_or(0)
}

#[cfg(test)]
#[path = "decoder_tests.rs"]
mod tests;
