//! The connection's plumbing: the routing table from request id to waiter, and the reader and
//! writer tasks that own the two halves of the socket.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;

use super::GuestClientError;
use crate::{FrameDecoder, Response, ResponseBody};

type Routes = HashMap<u64, mpsc::UnboundedSender<ResponseBody>>;

/// Request ids in flight and where their replies go; `None` once the connection is closed.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    routes: Mutex<Option<Routes>>,
}

impl Pending {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            routes: Mutex::new(Some(HashMap::new())),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Option<Routes>> {
        // A poisoned map is still a valid map: every critical section is a single insert/remove.
        self.routes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Routes replies for `id` to a new channel.
    pub(crate) fn register(
        &self,
        id: u64,
    ) -> Result<mpsc::UnboundedReceiver<ResponseBody>, GuestClientError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut routes = self.lock();
        let routes = routes.as_mut().ok_or(GuestClientError::Disconnected)?;
        routes.insert(id, tx);
        Ok(rx)
    }

    /// Routes replies for `id` to the channel already serving `existing`.
    pub(crate) fn alias(&self, existing: u64, id: u64) -> Result<(), GuestClientError> {
        let mut routes = self.lock();
        let routes = routes.as_mut().ok_or(GuestClientError::Disconnected)?;
        let tx = routes
            .get(&existing)
            .cloned()
            .ok_or(GuestClientError::Disconnected)?;
        routes.insert(id, tx);
        Ok(())
    }

    fn remove(&self, id: u64) {
        if let Some(routes) = self.lock().as_mut() {
            routes.remove(&id);
        }
    }

    /// Hands a reply to its waiter; replies nobody waits for (stale ones) are dropped.
    fn route(&self, response: Response) {
        let routes = self.lock();
        match routes.as_ref().and_then(|routes| routes.get(&response.id)) {
            Some(tx) => {
                // The waiter may have just given up; that is fine.
                let _ = tx.send(response.body);
            }
            None => tracing::debug!(id = response.id, "dropping guest reply nobody waits for"),
        }
    }

    /// Marks the connection closed: waiters see their channel end and report `Disconnected`.
    pub(crate) fn close(&self) {
        self.lock().take();
    }

    pub(crate) fn is_open(&self) -> bool {
        self.lock().is_some()
    }
}

/// Removes its ids from the routing table when the request is done or abandoned.
#[derive(Debug)]
pub(crate) struct Route {
    pending: Arc<Pending>,
    ids: Vec<u64>,
}

impl Route {
    pub(crate) fn new(pending: Arc<Pending>) -> Self {
        Self {
            pending,
            ids: Vec::new(),
        }
    }

    pub(crate) fn add(&mut self, id: u64) {
        self.ids.push(id);
    }
}

impl Drop for Route {
    fn drop(&mut self) {
        for &id in &self.ids {
            self.pending.remove(id);
        }
    }
}

/// Reads frames until the connection ends, routing each reply by id.
pub(crate) async fn read_loop(mut reader: OwnedReadHalf, pending: Arc<Pending>) {
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(error) => {
                tracing::debug!(%error, "guest channel read failed");
                break;
            }
        };
        decoder.feed(buf.get(..n).unwrap_or_default());
        while let Some(message) = decoder.next_message::<Response>() {
            match message {
                Ok(response) if response.id == 0 => {
                    tracing::warn!(body = ?response.body, "guest reported an error without a request id");
                }
                Ok(response) => pending.route(response),
                // Stale or cut-short frames from an earlier connection end up here.
                Err(error) => tracing::debug!(%error, "skipping undecodable guest frame"),
            }
        }
    }
    pending.close();
}

/// Writes whole frames in order; a failed write closes the connection.
pub(crate) async fn write_loop(
    mut writer: OwnedWriteHalf,
    mut frames: mpsc::Receiver<Vec<u8>>,
    pending: Arc<Pending>,
) {
    while let Some(frame) = frames.recv().await {
        if let Err(error) = writer.write_all(&frame).await {
            tracing::debug!(%error, "guest channel write failed");
            pending.close();
            return;
        }
    }
    let _ = writer.shutdown().await;
}
