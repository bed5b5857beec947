//! Where a command's output goes: kept for the `Exit` reply, or sent as `Output` frames.
//!
//! A non-streamed exec keeps its output until the total would no longer fit one frame; then it
//! sends what it has as `Output` frames and streams the rest, so `Exit` never exceeds
//! `MAX_FRAME_LEN` and no output is lost. The host client joins the chunks back together.

use flotilla_guest_protocol::{
    ExecExit, OutputStream, ResponseBody, MAX_FRAME_LEN, MAX_OUTPUT_CHUNK,
};

use crate::writer::Reply;

/// Raw output kept for one `Exit` reply. Base64 grows it by 4/3, leaving ample room for the
/// rest of the JSON inside `MAX_FRAME_LEN`.
const INLINE_LIMIT: usize = 512 * 1024;
const _: () = assert!(INLINE_LIMIT / 3 * 4 + 64 * 1024 < MAX_FRAME_LEN);

/// Collects or forwards the output of one exec.
pub(crate) struct OutputSink<'a> {
    reply: &'a Reply,
    streaming: bool,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl<'a> OutputSink<'a> {
    pub(crate) fn new(reply: &'a Reply, streaming: bool) -> Self {
        Self {
            reply,
            streaming,
            stdout: Vec::new(),
            stderr: Vec::new(),
        }
    }

    /// Takes a chunk read from one of the command's pipes.
    pub(crate) fn push(&mut self, stream: OutputStream, data: Vec<u8>) {
        if self.streaming {
            self.emit(stream, &data);
            return;
        }
        match stream {
            OutputStream::Stdout => self.stdout.extend(data),
            OutputStream::Stderr => self.stderr.extend(data),
        }
        if self.stdout.len() + self.stderr.len() > INLINE_LIMIT {
            self.streaming = true;
            let (stdout, stderr) = (
                std::mem::take(&mut self.stdout),
                std::mem::take(&mut self.stderr),
            );
            self.emit(OutputStream::Stdout, &stdout);
            self.emit(OutputStream::Stderr, &stderr);
        }
    }

    /// Puts whatever output was kept into the exit reply.
    pub(crate) fn finish(self, mut exit: ExecExit) -> ExecExit {
        exit.stdout = self.stdout;
        exit.stderr = self.stderr;
        exit
    }

    fn emit(&self, stream: OutputStream, data: &[u8]) {
        for chunk in data.chunks(MAX_OUTPUT_CHUNK) {
            // A vanished host is not the command's problem: keep draining its pipes.
            let _ = self.reply.send(ResponseBody::Output {
                stream,
                data: chunk.to_vec(),
            });
        }
    }
}
