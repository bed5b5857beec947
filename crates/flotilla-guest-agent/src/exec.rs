//! Exec: run a command in its own process group, feed its stdin, collect or stream its output,
//! and kill the whole group when its timeout passes.
//!
//! Helper threads (one per pipe, one waiting for the child) report to the exec's thread over a
//! bounded channel, so a command that outpaces the host is slowed down instead of buffered.

use std::io::{self, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::time::{Duration, Instant};

use flotilla_guest_protocol::{ErrorKind, ExecExit, ExecRequest, OutputStream, ResponseBody};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::output::OutputSink;
use crate::writer::Reply;

/// `PATH` for commands when neither the agent nor the request has one (busybox /init may not).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long to keep reading after the command exited: background processes it left behind may
/// hold its pipes open indefinitely.
const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// How long to wait for a killed process group before replying anyway.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// Events from the helper threads.
enum Event {
    Data(OutputStream, Vec<u8>),
    Eof,
    Exited(io::Result<ExitStatus>, Instant),
}

/// Why a command could not be run.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ExecError {
    #[error("empty argv: nothing to run")]
    EmptyArgv,
    #[error("working directory {0}: no such directory in guest")]
    NoCwd(String),
    #[error("{0}: command not found in guest")]
    NotFound(String),
    #[error("{0}: permission denied in guest")]
    PermissionDenied(String),
    #[error("{program}: cannot start: {source}")]
    Spawn { program: String, source: io::Error },
    #[error("cannot start a helper thread: {0}")]
    Thread(io::Error),
}

impl ExecError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::EmptyArgv | Self::NoCwd(_) => ErrorKind::InvalidRequest,
            Self::NotFound(_) => ErrorKind::CommandNotFound,
            Self::PermissionDenied(_) => ErrorKind::PermissionDenied,
            Self::Spawn { .. } => ErrorKind::SpawnFailed,
            Self::Thread(_) => ErrorKind::Internal,
        }
    }
}

/// Runs the command and sends its replies: `Output` frames as needed, then `Exit` or `Error`.
pub(crate) fn run(request: ExecRequest, reply: &Reply) {
    let mut sink = OutputSink::new(reply, request.stream);
    match execute(request, &mut sink) {
        Ok(exit) => {
            let _ = reply.send(ResponseBody::Exit(sink.finish(exit)));
        }
        Err(error) => reply.error(error.kind(), error.to_string()),
    }
}

fn execute(request: ExecRequest, sink: &mut OutputSink<'_>) -> Result<ExecExit, ExecError> {
    let (program, args) = match request.argv.split_first() {
        Some((program, args)) if !program.is_empty() => (program.clone(), args),
        _ => return Err(ExecError::EmptyArgv),
    };
    let mut command = Command::new(&program);
    command
        .args(args)
        .envs(&request.env)
        .stdin(if request.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group, so a timeout kills everything it started.
        .process_group(0);
    if std::env::var_os("PATH").is_none() && !request.env.contains_key("PATH") {
        command.env("PATH", DEFAULT_PATH);
    }
    if let Some(cwd) = &request.cwd {
        // Checked first: spawn reports a missing cwd as ENOENT, like a missing program.
        if !std::path::Path::new(cwd).is_dir() {
            return Err(ExecError::NoCwd(cwd.clone()));
        }
        command.current_dir(cwd);
    }

    let started = Instant::now();
    let mut child = command.spawn().map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => ExecError::NotFound(program.clone()),
        io::ErrorKind::PermissionDenied => ExecError::PermissionDenied(program.clone()),
        _ => ExecError::Spawn {
            program: program.clone(),
            source,
        },
    })?;
    // The child leads its own group, so its pid is the group id.
    let group = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));

    let (events, inbox) = mpsc::sync_channel(16);
    let helpers = (|| {
        if let (Some(data), Some(mut pipe)) = (request.stdin, child.stdin.take()) {
            // Errors mean the command stopped reading; that is its business.
            helper("exec-stdin", move || drop(pipe.write_all(&data)))?;
        }
        if let Some(pipe) = child.stdout.take() {
            let events = events.clone();
            helper("exec-stdout", move || {
                pump(pipe, OutputStream::Stdout, &events)
            })?;
        }
        if let Some(pipe) = child.stderr.take() {
            let events = events.clone();
            helper("exec-stderr", move || {
                pump(pipe, OutputStream::Stderr, &events)
            })?;
        }
        helper("exec-wait", move || {
            let status = child.wait();
            let _ = events.send(Event::Exited(status, Instant::now()));
        })
    })();
    if let Err(error) = helpers {
        let _ = killpg(group, Signal::SIGKILL);
        return Err(ExecError::Thread(error));
    }

    let deadline = request
        .timeout_ms
        .map(|ms| started + Duration::from_millis(ms));
    Ok(supervise(&inbox, group, started, deadline, sink))
}

/// Forwards events until the command exited and its pipes closed, enforcing the deadline.
fn supervise(
    inbox: &Receiver<Event>,
    group: Pid,
    started: Instant,
    deadline: Option<Instant>,
    sink: &mut OutputSink<'_>,
) -> ExecExit {
    let mut open_pipes = 2u8;
    let mut status = None;
    let mut exited_at = None;
    let mut killed_at = None;
    while open_pipes > 0 || exited_at.is_none() {
        let wake = [
            deadline.filter(|_| killed_at.is_none() && exited_at.is_none()),
            exited_at.map(|at| at + DRAIN_GRACE),
            killed_at.map(|at| at + KILL_GRACE),
        ]
        .into_iter()
        .flatten()
        .min();
        let event = match wake {
            Some(at) => inbox.recv_timeout(at.saturating_duration_since(Instant::now())),
            None => inbox.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match event {
            Ok(Event::Data(stream, data)) => sink.push(stream, data),
            Ok(Event::Eof) => open_pipes = open_pipes.saturating_sub(1),
            Ok(Event::Exited(result, at)) => {
                status = result.ok();
                exited_at = Some(at);
            }
            Err(RecvTimeoutError::Timeout) => {
                let now = Instant::now();
                let drained = exited_at.is_some_and(|at| now >= at + DRAIN_GRACE);
                let hopeless = killed_at.is_some_and(|at| now >= at + KILL_GRACE);
                if drained || hopeless {
                    break;
                }
                if killed_at.is_none() && deadline.is_some_and(|at| now >= at) {
                    let _ = killpg(group, Signal::SIGKILL);
                    killed_at = Some(now);
                }
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    let ended = exited_at.unwrap_or_else(Instant::now);
    ExecExit {
        code: status.and_then(|s| s.code()),
        signal: status.and_then(|s| s.signal()),
        timed_out: killed_at.is_some(),
        duration_ms: u64::try_from(ended.duration_since(started).as_millis()).unwrap_or(u64::MAX),
        stdout: Vec::new(),
        stderr: Vec::new(),
    }
}

/// Reads a pipe in chunks of at most one `Output` frame's worth until it closes.
fn pump(mut pipe: impl Read, stream: OutputStream, events: &SyncSender<Event>) {
    let mut buf = vec![0u8; flotilla_guest_protocol::MAX_OUTPUT_CHUNK];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let chunk = buf.get(..n).unwrap_or_default().to_vec();
                if events.send(Event::Data(stream, chunk)).is_err() {
                    return;
                }
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let _ = events.send(Event::Eof);
}

fn helper(name: &str, work: impl FnOnce() + Send + 'static) -> io::Result<()> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(work)
        .map(drop)
}
