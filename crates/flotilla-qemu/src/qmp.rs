//! QMP client: one connection per QEMU, shared by clones.
//!
//! Only this module speaks QMP JSON. A reader task demultiplexes replies (by
//! the numeric `id` we attach to every command) and events (broadcast to
//! subscribers); a writer task writes whole lines, so a command timing out
//! never leaves half a message on the socket. Anything that is not valid QMP
//! fails the affected commands with [`QmpError::Protocol`]; a stream that
//! cannot be trusted any more (invalid JSON) is closed.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::AbortHandle;

use crate::error::QmpError;

mod conn;
mod wire;

use conn::{PendingGuard, Shared, State};

pub use wire::{QemuVersion, QmpEvent, QmpGreeting, QmpTimestamp, StatusInfo};

/// Timeout of [`QmpClient::execute`].
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// Events buffered per subscriber before it starts missing some (`Lagged`).
const EVENT_CAPACITY: usize = 256;

/// Pause between attempts of [`QmpClient::connect_retry`]: short, as a
/// restore waits on the connection and an attempt costs one syscall.
const RETRY_INTERVAL: Duration = Duration::from_millis(5);

/// A QMP connection. Cheap to clone; the connection closes when the last
/// clone is dropped.
#[derive(Clone)]
pub struct QmpClient {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    lines: mpsc::Sender<Vec<u8>>,
    next_id: AtomicU64,
    greeting: QmpGreeting,
    /// Out-of-band execution was negotiated.
    oob: bool,
    tasks: [AbortHandle; 2],
}

impl Drop for Inner {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl QmpClient {
    /// Connects, reads the greeting and negotiates capabilities: out-of-band
    /// execution when offered ([`execute_oob`](Self::execute_oob)).
    /// QEMU serves one QMP client at a time: while another is connected the
    /// greeting never comes and this times out.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<QmpClient, QmpError> {
        let deadline = Instant::now() + timeout;
        let stream = tokio::time::timeout(timeout, UnixStream::connect(path))
            .await
            .map_err(|_| QmpError::Timeout {
                command: "connect".into(),
            })??;
        let (read, write) = stream.into_split();
        let mut reader = BufReader::new(read);

        // An event can come before the greeting (one emitted while QEMU
        // was still opening this connection, e.g. RESUME as a VM starts):
        // it is no one's yet and is skipped.
        let greeting = loop {
            let message = until(deadline, "greeting", conn::read_message(&mut reader))
                .await?
                .ok_or(QmpError::Disconnected)?;
            if message.get("event").is_some() && message.get("QMP").is_none() {
                tracing::debug!(path = %path.display(), event = %message["event"], "QMP event before the greeting; skipped");
                continue;
            }
            break wire::parse_greeting(message)?;
        };
        let mut write = write;
        let oob = greeting.capabilities.iter().any(|c| c == "oob");
        let negotiate: &[u8] = match oob {
            true => b"{\"execute\":\"qmp_capabilities\",\"arguments\":{\"enable\":[\"oob\"]},\"id\":0}\n",
            false => b"{\"execute\":\"qmp_capabilities\",\"id\":0}\n",
        };
        write
            .write_all(negotiate)
            .await
            .map_err(conn::write_error)?;
        until(deadline, "qmp_capabilities", conn::negotiate(&mut reader)).await?;
        tracing::debug!(path = %path.display(), version = ?greeting.version, "QMP connected");
        Ok(Self::start(reader, write, greeting, oob))
    }

    /// Like [`connect`](Self::connect), but keeps retrying while the socket
    /// does not exist yet or refuses connections, until `deadline` elapses.
    pub async fn connect_retry(path: &Path, deadline: Duration) -> Result<QmpClient, QmpError> {
        let end = Instant::now() + deadline;
        loop {
            let remaining = end.saturating_duration_since(Instant::now());
            match Self::connect(path, remaining).await {
                Err(QmpError::Io(err))
                    if matches!(
                        err.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    if Instant::now() + RETRY_INTERVAL >= end {
                        return Err(QmpError::Io(err));
                    }
                    tokio::time::sleep(RETRY_INTERVAL).await;
                }
                other => return other,
            }
        }
    }

    fn start(
        reader: BufReader<OwnedReadHalf>,
        writer: OwnedWriteHalf,
        greeting: QmpGreeting,
        oob: bool,
    ) -> Self {
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                open: true,
                pending: Default::default(),
                events: Some(events),
            }),
            closed: watch::channel(false).0,
        });
        let (lines, lines_rx) = mpsc::channel(64);
        let reader_task = tokio::spawn(conn::read_loop(reader, shared.clone()));
        let writer_task = tokio::spawn(conn::write_loop(writer, lines_rx, shared.clone()));
        QmpClient {
            inner: Arc::new(Inner {
                shared,
                lines,
                next_id: AtomicU64::new(1),
                greeting,
                oob,
                tasks: [reader_task.abort_handle(), writer_task.abort_handle()],
            }),
        }
    }

    /// What QEMU announced on connect.
    pub fn greeting(&self) -> &QmpGreeting {
        &self.inner.greeting
    }

    /// Runs a command with [`DEFAULT_COMMAND_TIMEOUT`]. Use
    /// `serde_json::Value` or `serde::de::IgnoredAny` for `R` when the reply
    /// does not matter.
    pub async fn execute<R: DeserializeOwned>(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<R, QmpError> {
        self.execute_timeout(command, arguments, DEFAULT_COMMAND_TIMEOUT)
            .await
    }

    /// Runs a command QEMU allows out of band (`migrate-pause`,
    /// `migrate-recover`): answered by the monitor's own thread even while
    /// QEMU's main loop is blocked, e.g. on a guest page a paused post-copy
    /// has not delivered. In band where QEMU offers no out-of-band.
    pub async fn execute_oob<R: DeserializeOwned>(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<R, QmpError> {
        let key = if self.inner.oob {
            "exec-oob"
        } else {
            "execute"
        };
        let value = self
            .send_raw(key, command, arguments, DEFAULT_COMMAND_TIMEOUT)
            .await?;
        serde_json::from_value(value).map_err(|source| QmpError::Decode {
            command: command.to_string(),
            source,
        })
    }

    /// Runs a command and decodes its `return` value into `R`.
    pub async fn execute_timeout<R: DeserializeOwned>(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<R, QmpError> {
        let value = self.execute_raw(command, arguments, timeout).await?;
        serde_json::from_value(value).map_err(|source| QmpError::Decode {
            command: command.to_string(),
            source,
        })
    }

    async fn execute_raw(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        self.send_raw("execute", command, arguments, timeout).await
    }

    async fn send_raw(
        &self,
        key: &str,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let shared = &self.inner.shared;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            // Checked under the same lock `close` takes, so no entry is left
            // behind on a connection that already closed.
            let mut state = shared.lock();
            if !state.open {
                return Err(QmpError::Disconnected);
            }
            state.pending.insert(id, tx);
        }
        let _guard = PendingGuard { shared, id };

        let mut message = json!({ key: command, "id": id });
        if let Some(arguments) = arguments {
            message["arguments"] = arguments;
        }
        let mut line = message.to_string().into_bytes();
        line.push(b'\n');
        tracing::trace!(command, id, "QMP command");

        let exchange = async {
            self.inner
                .lines
                .send(line)
                .await
                .map_err(|_| QmpError::Disconnected)?;
            rx.await.map_err(|_| QmpError::Disconnected)?
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| QmpError::Timeout {
                command: command.to_string(),
            })?
    }

    /// A receiver of all events from now on.
    pub fn events(&self) -> broadcast::Receiver<QmpEvent> {
        match &self.inner.shared.lock().events {
            Some(tx) => tx.subscribe(),
            // Closed: hand out a receiver that reports Closed at once.
            None => broadcast::channel(1).1,
        }
    }

    pub async fn query_status(&self) -> Result<StatusInfo, QmpError> {
        self.execute("query-status", None).await
    }

    /// Pauses the vCPUs (`STOP` event).
    pub async fn stop(&self) -> Result<(), QmpError> {
        self.execute::<Value>("stop", None).await.map(drop)
    }

    /// Resumes the vCPUs (`RESUME` event).
    pub async fn cont(&self) -> Result<(), QmpError> {
        self.execute::<Value>("cont", None).await.map(drop)
    }

    /// Asks QEMU to exit and waits until the connection closes. QEMU may close
    /// the socket before replying; that counts as success.
    pub async fn quit(&self) -> Result<(), QmpError> {
        match self.execute::<Value>("quit", None).await {
            Ok(_) | Err(QmpError::Disconnected) => {}
            Err(err) => return Err(err),
        }
        tokio::time::timeout(DEFAULT_COMMAND_TIMEOUT, self.closed())
            .await
            .map_err(|_| QmpError::Timeout {
                command: "quit".into(),
            })
    }

    pub fn is_connected(&self) -> bool {
        self.inner.shared.lock().open
    }

    /// Resolves once the connection is gone (QEMU exited or was killed).
    pub async fn closed(&self) {
        let mut rx = self.inner.shared.closed.subscribe();
        // An error means the sender is gone, which also means closed.
        let _ = rx.wait_for(|closed| *closed).await;
    }
}

/// Waits for the next event named `name`, skipping others.
pub async fn next_event(
    events: &mut broadcast::Receiver<QmpEvent>,
    name: &str,
    timeout: Duration,
) -> Result<QmpEvent, QmpError> {
    let wait = async {
        loop {
            match events.recv().await {
                Ok(event) if event.event == name => return Ok(event),
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "QMP event subscriber lagged");
                }
                Err(broadcast::error::RecvError::Closed) => return Err(QmpError::Disconnected),
            }
        }
    };
    tokio::time::timeout(timeout, wait)
        .await
        .map_err(|_| QmpError::Timeout {
            command: format!("wait for event {name}"),
        })?
}

async fn until<T>(
    deadline: Instant,
    stage: &str,
    fut: impl std::future::Future<Output = Result<T, QmpError>>,
) -> Result<T, QmpError> {
    let remaining = deadline.saturating_duration_since(Instant::now());
    tokio::time::timeout(remaining, fut)
        .await
        .map_err(|_| QmpError::Timeout {
            command: stage.to_string(),
        })?
}
