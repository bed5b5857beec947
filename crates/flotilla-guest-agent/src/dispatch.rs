//! Runs each request on its own thread and sends its replies.

use std::sync::Arc;

use flotilla_guest_protocol::{ErrorKind, HelloReply, RequestBody, ResponseBody, PROTOCOL_VERSION};

use crate::writer::Reply;
use crate::{clock, exec, info, power, AgentContext};

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
    }
}
