//! Running commands in a guest through its agent.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use flotilla_api::{ExecEvent, ExecRequest, ExecResult, VmState};
use flotilla_guest_protocol::client::{ExecEvent as GuestEvent, GuestClient, GuestClientError};
use flotilla_guest_protocol::{ErrorKind, ExecRequest as GuestExecRequest};
use tokio::sync::mpsc;

use super::{VmEntry, VmManager};
use crate::error::{AgentError, AgentResult};
use crate::runtime::Readiness;

/// How long an exec on a VM that is still booting waits for its guest agent.
const EXEC_READY_WAIT: Duration = Duration::from_secs(60);
/// Extra time the host allows beyond the command's own timeout.
const EXEC_SLACK: Duration = Duration::from_secs(10);
/// A command without a timeout is still bounded by this.
const EXEC_MAX: Duration = Duration::from_secs(24 * 3600);
/// Output a non-streamed exec may collect (stdout and stderr each); more
/// must be streamed, so one guest cannot exhaust the agent's memory.
pub const MAX_COLLECTED_OUTPUT: usize = 32 * 1024 * 1024;
/// Standard input must fit in one protocol frame with room to spare.
pub const MAX_STDIN: usize = 512 * 1024;

pub type ExecOutcome = ExecResult;

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

fn to_guest_request(req: &ExecRequest, stream: bool) -> AgentResult<GuestExecRequest> {
    if req.argv.is_empty() || req.argv[0].is_empty() {
        return Err(AgentError::InvalidArgument(
            "argv must name a program: give at least one non-empty argument".into(),
        ));
    }
    if req.argv.iter().any(|a| a.contains('\0')) {
        return Err(AgentError::InvalidArgument(
            "argv: arguments cannot contain NUL bytes".into(),
        ));
    }
    for (k, v) in &req.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(AgentError::InvalidArgument(format!(
                "env: {k:?} is not accepted: names are non-empty without '=' or NUL, values without NUL"
            )));
        }
    }
    let stdin = match &req.stdin_b64 {
        Some(s) => Some(b64().decode(s).map_err(|e| {
            AgentError::InvalidArgument(format!("stdin_b64 is not valid base64: {e}"))
        })?),
        None => None,
    };
    if stdin.as_ref().is_some_and(|d| d.len() > MAX_STDIN) {
        return Err(AgentError::InvalidArgument(format!(
            "stdin: at most {} KiB is accepted",
            MAX_STDIN / 1024
        )));
    }
    Ok(GuestExecRequest {
        argv: req.argv.clone(),
        env: req.env.clone().into_iter().collect(),
        cwd: req.cwd.clone(),
        stdin,
        timeout_ms: req.timeout_ms,
        stream,
    })
}

fn guest_error(vm: &str, e: GuestClientError) -> AgentError {
    match e {
        GuestClientError::Guest { kind, message } => AgentError::Guest {
            caller_mistake: matches!(
                kind,
                ErrorKind::CommandNotFound
                    | ErrorKind::PermissionDenied
                    | ErrorKind::InvalidRequest
            ),
            message,
        },
        GuestClientError::Timeout => {
            AgentError::Timeout(format!("the guest agent of VM {vm:?} did not answer"))
        }
        other => AgentError::Guest {
            message: format!("VM {vm:?}: {other}"),
            caller_mistake: false,
        },
    }
}

impl VmManager {
    /// The VM's guest agent client, waiting for the guest to come up and
    /// reconnecting if the connection dropped.
    async fn guest_client(&self, entry: &VmEntry) -> AgentResult<Arc<GuestClient>> {
        let (name, state) = {
            let s = entry.lock();
            (s.record.name.clone(), s.record.state)
        };
        if !matches!(state, VmState::Running | VmState::Starting) {
            return Err(AgentError::conflict(
                format!("VM {name:?} is {state}: commands run only in a running VM"),
                Some(match state {
                    VmState::Suspended => format!("resume it with `flotilla vm resume {name}`"),
                    VmState::Suspending | VmState::Resuming | VmState::Stopping => {
                        "try again when the operation in progress has finished".to_string()
                    }
                    _ => format!("start it with `flotilla vm start {name}`"),
                }),
            ));
        }
        // A paused QEMU would leave the command hanging: say so instead.
        let qmp = entry.lock().runtime.qmp.clone();
        if let Some(qmp) = qmp {
            if let Ok(st) = qmp.query_status().await {
                if !st.running && st.status != "inmigrate" {
                    return Err(AgentError::conflict(
                        format!("VM {name:?} is paused in QEMU ({}); it cannot run commands", st.status),
                        Some(format!("stop and start it: `flotilla vm stop {name} && flotilla vm start {name}`")),
                    ));
                }
            }
        }
        if entry.readiness.get() == Readiness::Waiting {
            self.wait_ready(entry, EXEC_READY_WAIT).await?;
        }
        let (client, socket) = {
            let s = entry.lock();
            (s.runtime.guest.clone(), self.agent_socket(&s.record))
        };
        match client {
            Some(c) if c.is_connected() => Ok(c),
            _ => {
                let (c, _) = GuestClient::wait_ready(&socket, Duration::from_secs(5))
                    .await
                    .map_err(|e| guest_error(&name, e))?;
                let c = Arc::new(c);
                entry.lock().runtime.guest = Some(c.clone());
                entry.readiness.set(Readiness::Ready);
                Ok(c)
            }
        }
    }

    /// Runs a command to completion and returns its output (at most
    /// [`MAX_COLLECTED_OUTPUT`] of each stream).
    pub async fn exec(&self, name: &str, req: ExecRequest) -> AgentResult<ExecResult> {
        let entry = self.entry(name)?;
        let guest_req = to_guest_request(&req, true)?;
        let client = self.guest_client(&entry).await?;
        let limit = req
            .timeout_ms
            .map(|ms| Duration::from_millis(ms) + EXEC_SLACK)
            .unwrap_or(EXEC_MAX);
        let collect = async {
            let mut stream = client
                .exec(guest_req)
                .await
                .map_err(|e| guest_error(name, e))?;
            let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
            while let Some(event) = stream.next().await {
                let (buf, data) = match event.map_err(|e| guest_error(name, e))? {
                    GuestEvent::Stdout(d) => (&mut stdout, d),
                    GuestEvent::Stderr(d) => (&mut stderr, d),
                    GuestEvent::Exit(exit) => return Ok((exit, stdout, stderr)),
                };
                if buf.len() + data.len() > MAX_COLLECTED_OUTPUT {
                    return Err(AgentError::InvalidArgument(format!(
                        "the command's output is over {} MiB: stream it instead (`?stream=true`, as `flotilla vm exec` without --json does)",
                        MAX_COLLECTED_OUTPUT / (1024 * 1024)
                    )));
                }
                buf.extend_from_slice(&data);
            }
            Err(guest_error(name, GuestClientError::Disconnected))
        };
        let (exit, stdout, stderr) =
            tokio::time::timeout(limit, collect).await.map_err(|_| {
                AgentError::Timeout(format!("the command in VM {name:?} did not end in time"))
            })??;
        Ok(ExecResult {
            exit_code: exit.code,
            signal: exit.signal,
            timed_out: exit.timed_out,
            duration_ms: exit.duration_ms,
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
            stdout_b64: b64().encode(&stdout),
            stderr_b64: b64().encode(&stderr),
        })
    }

    /// Runs a command and streams its output as it comes. Errors before the
    /// command started are returned; later ones arrive as an `Error` event.
    pub async fn exec_stream(
        &self,
        name: &str,
        req: ExecRequest,
    ) -> AgentResult<mpsc::Receiver<ExecEvent>> {
        let entry = self.entry(name)?;
        let guest_req = to_guest_request(&req, true)?;
        let client = self.guest_client(&entry).await?;
        let mut stream = client
            .exec(guest_req)
            .await
            .map_err(|e| guest_error(name, e))?;
        let (tx, rx) = mpsc::channel(64);
        let vm = name.to_string();
        tokio::spawn(async move {
            loop {
                let event = match stream.next().await {
                    Some(Ok(GuestEvent::Stdout(d))) => ExecEvent::Stdout {
                        data_b64: b64().encode(d),
                    },
                    Some(Ok(GuestEvent::Stderr(d))) => ExecEvent::Stderr {
                        data_b64: b64().encode(d),
                    },
                    Some(Ok(GuestEvent::Exit(x))) => ExecEvent::Exit {
                        exit_code: x.code,
                        signal: x.signal,
                        timed_out: x.timed_out,
                        duration_ms: x.duration_ms,
                    },
                    Some(Err(e)) => ExecEvent::Error {
                        error: guest_error(&vm, e).to_detail(),
                    },
                    None => break,
                };
                let last = matches!(event, ExecEvent::Exit { .. } | ExecEvent::Error { .. });
                if tx.send(event).await.is_err() || last {
                    break;
                }
            }
        });
        Ok(rx)
    }
}
