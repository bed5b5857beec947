//! The connection machinery behind [`QmpClient`](super::QmpClient): shared
//! state, message framing, the reader (demultiplexer) and the writer task.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use super::wire::{self, QmpEvent};
use crate::error::QmpError;

/// Longest QMP message accepted; protects against a runaway peer.
const MAX_MESSAGE_BYTES: u64 = 16 * 1024 * 1024;

pub(super) type Reply = Result<Value, QmpError>;

/// State shared with the reader and writer tasks.
pub(super) struct Shared {
    pub(super) state: Mutex<State>,
    pub(super) closed: watch::Sender<bool>,
}

pub(super) struct State {
    pub(super) open: bool,
    pub(super) pending: HashMap<u64, oneshot::Sender<Reply>>,
    /// Dropped on close, so event subscribers see `RecvError::Closed`.
    pub(super) events: Option<broadcast::Sender<QmpEvent>>,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks the connection closed and fails every pending command, with
    /// `Protocol(reason)` if the peer misbehaved, else `Disconnected`.
    pub(super) fn close(&self, protocol_error: Option<String>) {
        let pending = {
            let mut state = self.lock();
            if !state.open {
                return;
            }
            state.open = false;
            state.events = None;
            std::mem::take(&mut state.pending)
        };
        match &protocol_error {
            Some(reason) => tracing::warn!(%reason, "closing QMP connection"),
            None => tracing::debug!("QMP connection closed"),
        }
        for (_, tx) in pending {
            let err = match &protocol_error {
                Some(reason) => QmpError::Protocol(reason.clone()),
                None => QmpError::Disconnected,
            };
            let _ = tx.send(Err(err));
        }
        self.closed.send_replace(true);
    }

    /// Routes one message. An `Err` means the stream is no longer trustworthy.
    fn dispatch(&self, value: Value) -> Result<(), String> {
        let Value::Object(map) = value else {
            return Err(format!(
                "expected a JSON object, got {}",
                wire::snippet(&value)
            ));
        };
        if map.contains_key("event") {
            let text = wire::snippet(&Value::Object(map.clone()));
            let event: QmpEvent = serde_json::from_value(Value::Object(map))
                .map_err(|e| format!("malformed event {text}: {e}"))?;
            tracing::debug!(event = %event.event, "QMP event");
            if let Some(tx) = &self.lock().events {
                // No subscribers is fine.
                let _ = tx.send(event);
            }
            return Ok(());
        }
        let Some(id_value) = map.get("id") else {
            return Err(format!(
                "message without \"id\" or \"event\": {}",
                wire::snippet(&Value::Object(map))
            ));
        };
        let Some(id) = id_value.as_u64() else {
            tracing::warn!(id = %id_value, "QMP reply with an id we never sent; ignored");
            return Ok(());
        };
        let waiter = self.lock().pending.remove(&id);
        match waiter {
            Some(tx) => {
                let _ = tx.send(wire::reply_result(id, map));
            }
            None => tracing::debug!(id, "QMP reply for a timed-out or unknown command; ignored"),
        }
        Ok(())
    }
}

/// Removes a pending entry when the waiting command gives up.
pub(super) struct PendingGuard<'a> {
    pub(super) shared: &'a Shared,
    pub(super) id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.lock().pending.remove(&self.id);
    }
}

/// Waits for the reply to `qmp_capabilities` (id 0).
pub(super) async fn negotiate(reader: &mut BufReader<OwnedReadHalf>) -> Result<(), QmpError> {
    loop {
        let value = read_message(reader).await?.ok_or(QmpError::Disconnected)?;
        let Value::Object(map) = value else {
            return Err(QmpError::Protocol(format!(
                "expected a reply to qmp_capabilities, got {}",
                wire::snippet(&value)
            )));
        };
        if map.contains_key("event") {
            continue;
        }
        if map.get("id").and_then(Value::as_u64) != Some(0) {
            return Err(QmpError::Protocol(format!(
                "expected a reply to qmp_capabilities, got {}",
                wire::snippet(&Value::Object(map))
            )));
        }
        return wire::reply_result(0, map).map(drop);
    }
}

/// Reads one newline-terminated JSON message; `Ok(None)` at end of stream.
pub(super) async fn read_message(
    reader: &mut BufReader<OwnedReadHalf>,
) -> Result<Option<Value>, QmpError> {
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = (&mut *reader)
            .take(MAX_MESSAGE_BYTES)
            .read_until(b'\n', &mut buf)
            .await?;
        if n == 0 {
            return Ok(None);
        }
        if n as u64 >= MAX_MESSAGE_BYTES && buf.last() != Some(&b'\n') {
            return Err(QmpError::Protocol(format!(
                "message longer than {MAX_MESSAGE_BYTES} bytes"
            )));
        }
        let line = buf.trim_ascii();
        if line.is_empty() {
            continue;
        }
        return serde_json::from_slice(line).map(Some).map_err(|e| {
            QmpError::Protocol(format!(
                "invalid JSON from QEMU ({e}): {}",
                wire::bounded(&String::from_utf8_lossy(line))
            ))
        });
    }
}

pub(super) async fn read_loop(mut reader: BufReader<OwnedReadHalf>, shared: Arc<Shared>) {
    let protocol_error = loop {
        match read_message(&mut reader).await {
            Ok(Some(value)) => {
                if let Err(reason) = shared.dispatch(value) {
                    break Some(reason);
                }
            }
            Ok(None) => break None,
            Err(QmpError::Protocol(reason)) => break Some(reason),
            Err(err) => {
                tracing::debug!(error = %err, "QMP read failed");
                break None;
            }
        }
    };
    shared.close(protocol_error);
}

pub(super) async fn write_loop(
    mut writer: OwnedWriteHalf,
    mut lines: mpsc::Receiver<Vec<u8>>,
    shared: Arc<Shared>,
) {
    let mut closed = shared.closed.subscribe();
    loop {
        let line = tokio::select! {
            line = lines.recv() => line,
            // Once closed (e.g. protocol error), drop our half so QEMU sees
            // the client leave and can accept the next one.
            _ = closed.wait_for(|closed| *closed) => None,
        };
        let Some(line) = line else { return };
        if let Err(err) = writer.write_all(&line).await {
            tracing::debug!(error = %err, "QMP write failed");
            shared.close(None);
            return;
        }
    }
}

pub(super) fn write_error(err: std::io::Error) -> QmpError {
    match err.kind() {
        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
            QmpError::Disconnected
        }
        _ => QmpError::Io(err),
    }
}
