//! Host-side async client of the guest agent (feature `client`).
//!
//! One connection carries many requests at once: a reader task routes each reply to its request
//! by id, a writer task sends whole frames in order. Ids start at a random value so replies left
//! over from an earlier connection (the guest may still be writing them) match nothing and are
//! dropped.

mod conn;
mod exec;

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{timeout, timeout_at, Instant};

pub use exec::{ExecEvent, ExecStream};

use conn::{Pending, Route};

use crate::{
    encode_message, ErrorKind, ExecExit, ExecRequest, GuestErrorReply, GuestInfo, HelloReply,
    IdentityRequest, Request, RequestBody, ResponseBody, PROTOCOL_VERSION,
};

/// How often `hello` re-sends while unanswered (a guest agent restarted mid-read loses it).
const HELLO_RESEND: Duration = Duration::from_secs(1);

/// Pause between connection attempts in [`GuestClient::wait_ready`].
const CONNECT_RETRY: Duration = Duration::from_millis(10);

/// Frames queued for the writer task before senders wait.
const WRITE_QUEUE: usize = 32;

/// Failures of the guest client.
#[derive(Debug, thiserror::Error)]
pub enum GuestClientError {
    /// The socket could not be opened or failed.
    #[error("guest channel I/O error: {0}")]
    Io(#[from] io::Error),
    /// No reply in time.
    #[error("timed out waiting for the guest agent")]
    Timeout,
    /// The connection closed; requests in flight fail with this.
    #[error("guest agent connection closed")]
    Disconnected,
    /// The guest agent answered with an error.
    #[error("guest agent error ({kind}): {message}")]
    Guest {
        /// Failure category.
        kind: ErrorKind,
        /// The guest's description.
        message: String,
    },
    /// The guest answered something that makes no sense for the request.
    #[error("guest protocol error: {0}")]
    Protocol(String),
}

impl From<GuestErrorReply> for GuestClientError {
    fn from(reply: GuestErrorReply) -> Self {
        Self::Guest {
            kind: reply.kind,
            message: reply.message,
        }
    }
}

/// A connection to one guest agent. Methods take `&self`, so one client serves many tasks.
/// Dropping it closes the connection and stops its tasks.
#[derive(Debug)]
pub struct GuestClient {
    frames: mpsc::Sender<Vec<u8>>,
    pending: Arc<Pending>,
    next_id: AtomicU64,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl Drop for GuestClient {
    fn drop(&mut self) {
        self.pending.close();
        self.reader.abort();
        self.writer.abort();
    }
}

impl GuestClient {
    /// Connects to the unix socket behind the guest's agent port. Must run inside a tokio runtime.
    pub async fn connect(socket_path: &Path) -> Result<Self, GuestClientError> {
        let stream = UnixStream::connect(socket_path).await?;
        let (read_half, write_half) = stream.into_split();
        let pending = Pending::new();
        let (frames, queue) = mpsc::channel(WRITE_QUEUE);
        let reader = tokio::spawn(conn::read_loop(read_half, pending.clone()));
        let writer = tokio::spawn(conn::write_loop(write_half, queue, pending.clone()));
        Ok(Self {
            frames,
            pending,
            // Random start, kept below 2^62 so it never wraps to the reserved id 0.
            next_id: AtomicU64::new((random_u64() >> 2).max(1)),
            reader,
            writer,
        })
    }

    /// Connects and completes a `Hello`, retrying until `deadline` passes: the socket may not
    /// exist yet, and the guest may still be booting (QEMU holds our bytes until it opens the port).
    pub async fn wait_ready(
        socket_path: &Path,
        deadline: Duration,
    ) -> Result<(Self, HelloReply), GuestClientError> {
        let until = Instant::now() + deadline;
        loop {
            match Self::connect(socket_path).await {
                Ok(client) => match client
                    .hello(until.saturating_duration_since(Instant::now()))
                    .await
                {
                    Ok(reply) => return Ok((client, reply)),
                    Err(GuestClientError::Disconnected | GuestClientError::Io(_)) => {}
                    Err(error) => return Err(error),
                },
                Err(GuestClientError::Io(error)) if is_not_ready(&error) => {}
                Err(error) => return Err(error),
            }
            if Instant::now() + CONNECT_RETRY >= until {
                return Err(GuestClientError::Timeout);
            }
            tokio::time::sleep(CONNECT_RETRY).await;
        }
    }

    /// True until the connection closes.
    pub fn is_connected(&self) -> bool {
        self.pending.is_open()
    }

    /// Handshake: sends `Hello` with a fresh nonce (again every second while unanswered) and
    /// returns the first reply that echoes one of our nonces.
    pub async fn hello(&self, wait: Duration) -> Result<HelloReply, GuestClientError> {
        let deadline = Instant::now() + wait;
        let mut route = Route::new(self.pending.clone());
        // Every Hello gets its own id, but all of them reply into the first one's channel.
        let first_id = self.alloc_id();
        let mut replies = self.pending.register(first_id)?;
        let mut id = first_id;
        let mut nonces = Vec::new();
        loop {
            route.add(id);
            let nonce = random_u64();
            nonces.push(nonce);
            let body = RequestBody::Hello {
                nonce,
                protocol_version: u32::from(PROTOCOL_VERSION),
            };
            timeout_at(deadline, self.send(id, body))
                .await
                .map_err(|_| GuestClientError::Timeout)??;
            let resend_at = (Instant::now() + HELLO_RESEND).min(deadline);
            loop {
                match timeout_at(resend_at, replies.recv()).await {
                    Err(_) if Instant::now() >= deadline => return Err(GuestClientError::Timeout),
                    Err(_) => break,
                    Ok(None) => return Err(GuestClientError::Disconnected),
                    Ok(Some(ResponseBody::Hello(reply))) if nonces.contains(&reply.nonce) => {
                        return check_version(reply);
                    }
                    Ok(Some(ResponseBody::Error(reply))) => return Err(reply.into()),
                    Ok(Some(_)) => {}
                }
            }
            id = self.alloc_id();
            self.pending.alias(first_id, id)?;
        }
    }

    /// Starts a command; its output and exit arrive on the returned stream.
    pub async fn exec(&self, request: ExecRequest) -> Result<ExecStream, GuestClientError> {
        let (replies, route) = self.start(RequestBody::Exec(request)).await?;
        Ok(ExecStream::new(replies, route))
    }

    /// Runs a command and waits up to `wait` for it, returning all its output in the result.
    /// Set `request.timeout_ms` too, or the command keeps running in the guest after a timeout.
    pub async fn exec_collect(
        &self,
        request: ExecRequest,
        wait: Duration,
    ) -> Result<ExecExit, GuestClientError> {
        timeout(wait, async { self.exec(request).await?.collect().await })
            .await
            .map_err(|_| GuestClientError::Timeout)?
    }

    /// Facts about the guest.
    pub async fn info(&self, wait: Duration) -> Result<GuestInfo, GuestClientError> {
        match self.call(RequestBody::Info, wait).await? {
            ResponseBody::Info(info) => Ok(info),
            other => Err(unexpected("info", &other)),
        }
    }

    /// Round trip to the guest agent; returns how long it took.
    pub async fn ping(&self, wait: Duration) -> Result<Duration, GuestClientError> {
        let started = Instant::now();
        match self.call(RequestBody::Ping, wait).await? {
            ResponseBody::Pong => Ok(started.elapsed()),
            other => Err(unexpected("ping", &other)),
        }
    }

    /// Sets the guest's wall clock to `now` (nanoseconds since the epoch);
    /// returns how far it moved, in milliseconds.
    pub async fn set_clock(
        &self,
        unix_nanos: u64,
        wait: Duration,
    ) -> Result<i64, GuestClientError> {
        match self
            .call(RequestBody::SetClock { unix_nanos }, wait)
            .await?
        {
            ResponseBody::ClockSet { adjusted_by_ms } => Ok(adjusted_by_ms),
            other => Err(unexpected("set_clock", &other)),
        }
    }

    /// Gives the guest a new identity (after a restore from a snapshot, or on a clone of a
    /// running VM); returns how long the guest took to apply it, in milliseconds.
    ///
    /// A guest that rejects a field answers [`ErrorKind::InvalidRequest`] having changed
    /// nothing; an agent too old to know the request answers the same kind. Any other guest
    /// error names the step that failed, and the steps before it stay applied (the RNG is
    /// reseeded first).
    pub async fn set_identity(
        &self,
        identity: IdentityRequest,
        wait: Duration,
    ) -> Result<u64, GuestClientError> {
        match self.call(RequestBody::SetIdentity(identity), wait).await? {
            ResponseBody::IdentitySet { applied_ms } => Ok(applied_ms),
            other => Err(unexpected("set_identity", &other)),
        }
    }

    /// Asks the guest to go down; returns once it acknowledged (it then syncs and reboots,
    /// which ends a `-no-reboot` QEMU).
    pub async fn shutdown(&self, reboot: bool, wait: Duration) -> Result<(), GuestClientError> {
        match self.call(RequestBody::Shutdown { reboot }, wait).await? {
            ResponseBody::ShutdownAck => Ok(()),
            other => Err(unexpected("shutdown", &other)),
        }
    }

    /// Sends a request that has exactly one reply and waits for it.
    async fn call(
        &self,
        body: RequestBody,
        wait: Duration,
    ) -> Result<ResponseBody, GuestClientError> {
        timeout(wait, async {
            let (mut replies, _route) = self.start(body).await?;
            match replies.recv().await {
                None => Err(GuestClientError::Disconnected),
                Some(ResponseBody::Error(reply)) => Err(reply.into()),
                Some(reply) => Ok(reply),
            }
        })
        .await
        .map_err(|_| GuestClientError::Timeout)?
    }

    async fn start(
        &self,
        body: RequestBody,
    ) -> Result<(mpsc::UnboundedReceiver<ResponseBody>, Route), GuestClientError> {
        let id = self.alloc_id();
        let replies = self.pending.register(id)?;
        let mut route = Route::new(self.pending.clone());
        route.add(id);
        self.send(id, body).await?;
        Ok((replies, route))
    }

    async fn send(&self, id: u64, body: RequestBody) -> Result<(), GuestClientError> {
        let frame = encode_message(&Request { id, body })
            .map_err(|error| GuestClientError::Protocol(error.to_string()))?;
        self.frames
            .send(frame)
            .await
            .map_err(|_| GuestClientError::Disconnected)
    }

    fn alloc_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

fn check_version(reply: HelloReply) -> Result<HelloReply, GuestClientError> {
    if reply.protocol_version == u32::from(PROTOCOL_VERSION) {
        Ok(reply)
    } else {
        Err(GuestClientError::Protocol(format!(
            "guest speaks protocol version {}, we speak {PROTOCOL_VERSION}",
            reply.protocol_version
        )))
    }
}

fn unexpected(what: &str, reply: &ResponseBody) -> GuestClientError {
    GuestClientError::Protocol(format!("unexpected reply to {what}: {reply:?}"))
}

/// Connection errors that mean "the VM (or its QEMU socket) is not up yet".
fn is_not_ready(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
    )
}

/// A value unlikely to repeat across connections and processes, without a `rand` dependency:
/// std's `RandomState` is seeded from the OS, mixed with the time and a counter.
fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u32(std::process::id());
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    hasher.write_u128(nanos);
    hasher.finish()
}
