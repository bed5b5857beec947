//! Host-side view of one running command: a stream of output chunks ending with its exit.

use tokio::sync::mpsc;

use super::conn::Route;
use super::GuestClientError;
use crate::{ExecExit, OutputStream, ResponseBody};

/// One event of a running command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// A chunk of standard output.
    Stdout(Vec<u8>),
    /// A chunk of standard error.
    Stderr(Vec<u8>),
    /// The command ended; the last event.
    Exit(ExecExit),
}

/// Events of one exec, in the order the guest sent them. Dropping it stops listening (the
/// command keeps running in the guest until it ends or its `timeout_ms` passes).
#[derive(Debug)]
pub struct ExecStream {
    replies: mpsc::UnboundedReceiver<ResponseBody>,
    done: bool,
    _route: Route,
}

impl ExecStream {
    pub(crate) fn new(replies: mpsc::UnboundedReceiver<ResponseBody>, route: Route) -> Self {
        Self {
            replies,
            done: false,
            _route: route,
        }
    }

    /// The next event; `None` after `Exit` or an error has been returned.
    pub async fn next(&mut self) -> Option<Result<ExecEvent, GuestClientError>> {
        if self.done {
            return None;
        }
        let event = match self.replies.recv().await {
            None => Err(GuestClientError::Disconnected),
            Some(ResponseBody::Output {
                stream: OutputStream::Stdout,
                data,
            }) => return Some(Ok(ExecEvent::Stdout(data))),
            Some(ResponseBody::Output {
                stream: OutputStream::Stderr,
                data,
            }) => return Some(Ok(ExecEvent::Stderr(data))),
            Some(ResponseBody::Exit(exit)) => Ok(ExecEvent::Exit(exit)),
            Some(ResponseBody::Error(reply)) => Err(reply.into()),
            Some(other) => Err(GuestClientError::Protocol(format!(
                "unexpected reply to exec: {other:?}"
            ))),
        };
        self.done = true;
        Some(event)
    }

    /// Reads the remaining events, joining the output chunks into the returned [`ExecExit`].
    pub async fn collect(mut self) -> Result<ExecExit, GuestClientError> {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        while let Some(event) = self.next().await {
            match event? {
                ExecEvent::Stdout(data) => stdout.extend(data),
                ExecEvent::Stderr(data) => stderr.extend(data),
                ExecEvent::Exit(mut exit) => {
                    // Chunks streamed before Exit come first; Exit may still carry the tail.
                    stdout.append(&mut exit.stdout);
                    stderr.append(&mut exit.stderr);
                    exit.stdout = stdout;
                    exit.stderr = stderr;
                    return Ok(exit);
                }
            }
        }
        Err(GuestClientError::Disconnected)
    }
}
