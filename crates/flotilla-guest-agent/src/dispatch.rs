//! Runs each request on its own thread and sends its replies.

use std::sync::Arc;

use flotilla_guest_protocol::{ErrorKind, HelloReply, RequestBody, ResponseBody, PROTOCOL_VERSION};

use crate::writer::Reply;
use crate::{clock, exec, identity, info, power, AgentContext};

/// Handles a request on a new thread so a long exec never blocks the reader.
pub(crate) fn spawn(body: RequestBody, reply: Reply, context: &Arc<AgentContext>) {
    let (thread_reply, thread_context) = (reply.clone(), context.clone());
    let spawned = std::thread::Builder::new()
        .name(format!("request-{}", reply.id()))
        .spawn(move || handle(body, &thread_reply, &thread_context));
    if let Err(error) = spawned {
        reply.error(
            ErrorKind::Internal,
            format!("cannot start a handler thread: {error}"),
        );
    }
}

fn handle(body: RequestBody, reply: &Reply, context: &AgentContext) {
    match body {
        RequestBody::Hello {
            nonce,
            protocol_version,
        } => {
            if protocol_version != u32::from(PROTOCOL_VERSION) {
                reply.error(
                    ErrorKind::UnsupportedVersion,
                    format!(
                        "guest agent speaks protocol version {PROTOCOL_VERSION}, not {protocol_version}"
                    ),
                );
                return;
            }
            let _ = reply.send(ResponseBody::Hello(HelloReply {
                nonce,
                protocol_version: u32::from(PROTOCOL_VERSION),
                agent_version: env!("CARGO_PKG_VERSION").to_string(),
                boot_ms: context.boot_ms(),
                uptime_ms: info::uptime_ms(),
            }));
        }
        RequestBody::Exec(request) => exec::run(request, reply),
        RequestBody::Info => {
            let _ = reply.send(ResponseBody::Info(info::gather()));
        }
        RequestBody::Shutdown { reboot } => {
            crate::log!("shutdown requested (reboot: {reboot})");
            power::acknowledge(reply);
            power::carry_out(context.shutdown);
        }
        RequestBody::Ping => {
            let _ = reply.send(ResponseBody::Pong);
        }
        RequestBody::SetClock { unix_nanos } => {
            let _ = reply.send(match clock::set_realtime(unix_nanos) {
                Ok(adjusted_by_ms) => ResponseBody::ClockSet { adjusted_by_ms },
                Err(e) => ResponseBody::Error(flotilla_guest_protocol::GuestErrorReply {
                    kind: flotilla_guest_protocol::ErrorKind::PermissionDenied,
                    message: format!("cannot set the clock: {e}"),
                }),
            });
        }
        RequestBody::SetIdentity(request) => match identity::set(&request) {
            Ok(applied_ms) => {
                let _ = reply.send(ResponseBody::IdentitySet { applied_ms });
            }
            Err(error) => {
                crate::log!("cannot set identity: {error}");
                reply.error(error.kind(), format!("cannot set identity: {error}"));
            }
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly by design.
mod tests {
    use std::io::{self, Write};
    use std::sync::{Mutex, OnceLock};

    use flotilla_guest_protocol::{FrameDecoder, IdentityRequest, Response};

    use super::*;
    use crate::power::ShutdownAction;
    use crate::writer::FrameWriter;

    /// A writer whose bytes the test reads back.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn answer(body: RequestBody) -> Response {
        let sink = Sink::default();
        let reply = FrameWriter::new(sink.clone()).reply_to(21);
        let context = AgentContext {
            boot_ms: OnceLock::new(),
            shutdown: ShutdownAction::Ignore,
        };
        handle(body, &reply, &context);
        let mut decoder = FrameDecoder::new();
        decoder.feed(&sink.0.lock().unwrap());
        decoder.next_message().unwrap().unwrap()
    }

    /// Safe to run anywhere: validation fails before the agent touches this machine.
    #[test]
    fn invalid_identity_is_refused_naming_the_field() {
        let response = answer(RequestBody::SetIdentity(IdentityRequest {
            hostname: "Not_A_Hostname".into(),
            ..IdentityRequest::default()
        }));
        assert_eq!(response.id, 21);
        let ResponseBody::Error(error) = response.body else {
            panic!("expected an error, got {response:?}");
        };
        assert_eq!(error.kind, ErrorKind::InvalidRequest);
        assert!(error.message.contains("invalid hostname"), "{error:?}");
    }
}
