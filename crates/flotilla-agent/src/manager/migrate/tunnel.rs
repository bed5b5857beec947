//! An encrypted memory stream carried by the agents instead of QEMU's TLS.
//!
//! QEMU 10.0's TLS channel sends every element of a write as a TLS record
//! of its own, each in its own `sendmsg`: about 13,000 for an idle 256 MiB
//! guest, against 230 for the same stream in the clear, which made the
//! stream several times slower between hosts. It also aborts when a
//! several-connection (multifd) stream over TLS is cancelled. So the QEMUs
//! stream in the clear to their own agent over a unix socket (in a
//! directory only the agent's user can enter: no other local process can
//! read the stream or inject one), and the agents carry each connection between the
//! hosts over TLS in large records: the target agent's certificate pinned
//! by its fingerprint (as for its API), the source proving itself with the
//! migration's key as its first bytes.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::task::JoinSet;

/// The migration's key: the first bytes of every tunnelled connection.
pub(super) const KEY_BYTES: usize = 32;

/// Bytes read at once on each side of a tunnel: a few TLS records each.
const COPY_BUFFER: usize = 64 << 10;

/// How long a connection may take to reach the target and present its key.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the target listens for a stream's connections (QEMU opens
/// them all as the stream starts).
const ACCEPT_WINDOW: Duration = Duration::from_secs(120);

/// Connections the target lets present their key at once: more wait in
/// the listener's backlog, so strangers cannot crowd out the stream.
const HANDSHAKES_AT_ONCE: usize = 8;

/// The pause after a failed `accept` (out of descriptors, say).
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// A tunnel's listener and connections: all closed when it is dropped.
pub(super) struct Tunnel {
    tasks: JoinSet<()>,
    /// The unix socket it listens on, removed with it.
    socket_file: Option<PathBuf>,
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        if let Some(path) = &self.socket_file {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Tunnel {
    /// The unix socket it listens on, if it does.
    pub(super) fn socket_file(&self) -> Option<&Path> {
        self.socket_file.as_deref()
    }

    /// Closes the tunnel once every connection it carries has ended, or
    /// at once if `stop` completes first.
    pub(super) async fn run_until(mut self, stop: impl std::future::Future<Output = ()>) {
        tokio::select! {
            _ = stop => self.tasks.abort_all(),
            _ = async { while self.tasks.join_next().await.is_some() {} } => {}
        }
    }
}

/// The source's side: QEMU connects to the unix socket `local` (made
/// here); each connection goes on to the target's tunnel at `remote`.
pub(super) async fn outgoing(
    local: &Path,
    remote: SocketAddr,
    tls: rustls::ClientConfig,
    key: [u8; KEY_BYTES],
) -> std::io::Result<Tunnel> {
    // One a killed agent left behind.
    let _ = std::fs::remove_file(local);
    let listener = UnixListener::bind(local)?;
    {
        use std::os::unix::fs::PermissionsExt;
        // Only this agent's user (QEMU's) may connect.
        std::fs::set_permissions(local, std::fs::Permissions::from_mode(0o600))?;
    }
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let mut tasks = JoinSet::new();
    tasks.spawn(async move {
        let mut carried = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let local = match accepted {
                        Ok((local, _)) => local,
                        Err(e) => {
                            // Out of descriptors, say: the connections
                            // carried go on, and so does listening.
                            tracing::warn!(error = %e, "accepting a connection from QEMU");
                            tokio::time::sleep(ACCEPT_RETRY).await;
                            continue;
                        }
                    };
                    let connector = connector.clone();
                    carried.spawn(async move {
                        if let Err(e) = carry_out(local, remote, connector, key).await {
                            tracing::debug!(%remote, error = %e, "a tunnelled connection ended");
                        }
                    });
                }
                Some(_) = carried.join_next(), if !carried.is_empty() => {}
            }
        }
    });
    Ok(Tunnel {
        tasks,
        socket_file: Some(local.to_path_buf()),
    })
}

async fn carry_out(
    mut local: UnixStream,
    remote: SocketAddr,
    connector: tokio_rustls::TlsConnector,
    key: [u8; KEY_BYTES],
) -> std::io::Result<()> {
    let mut remote = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let tcp = TcpStream::connect(remote).await?;
        // The end of the stream must not wait for more to send with it.
        tcp.set_nodelay(true)?;
        // The pinned verifier checks the certificate, not this name.
        let name = rustls::pki_types::ServerName::IpAddress(remote.ip().into());
        let mut tls = connector.connect(name, tcp).await?;
        tls.write_all(&key).await?;
        Ok::<_, std::io::Error>(tls)
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "reaching the target"))??;
    tokio::io::copy_bidirectional_with_sizes(&mut local, &mut remote, COPY_BUFFER, COPY_BUFFER)
        .await?;
    Ok(())
}

/// The target's side: the source's agent connects at the returned address
/// on `ip`; each connection that presents `key` goes on to QEMU listening
/// on the unix socket `qemu`. At most `connections` are carried.
pub(super) async fn incoming(
    ip: IpAddr,
    tls: Arc<rustls::ServerConfig>,
    key: [u8; KEY_BYTES],
    qemu: PathBuf,
    connections: usize,
) -> std::io::Result<(Tunnel, SocketAddr)> {
    let listener = TcpListener::bind((ip, 0)).await?;
    let addr = listener.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_AT_ONCE));
    // A slot per connection QEMU opens: a key shown once more is refused.
    let slots = Arc::new(tokio::sync::Semaphore::new(connections));
    let (admitted_tx, mut admitted) = tokio::sync::mpsc::channel::<()>(connections.max(1));
    let mut tasks = JoinSet::new();
    tasks.spawn(async move {
        let mut carried = JoinSet::new();
        let mut taken = 0;
        let closing = tokio::time::sleep(ACCEPT_WINDOW);
        tokio::pin!(closing);
        while taken < connections {
            tokio::select! {
                _ = &mut closing => break,
                // Each end of a handshake wakes this loop (the connection
                // is admitted, or its task ends).
                accepted = listener.accept(), if handshakes.available_permits() > 0 => {
                    let (tcp, from) = match accepted {
                        Ok(accepted) => accepted,
                        Err(e) => {
                            tracing::warn!(error = %e, "accepting a connection of the stream");
                            tokio::time::sleep(ACCEPT_RETRY).await;
                            continue;
                        }
                    };
                    // Only this loop takes turns, and one is free.
                    let Ok(turn) = handshakes.clone().try_acquire_owned() else { continue };
                    let (acceptor, admitted_tx) = (acceptor.clone(), admitted_tx.clone());
                    let (qemu, slots) = (qemu.clone(), slots.clone());
                    carried.spawn(async move {
                        let to_qemu = Admission { slots, admitted: admitted_tx, turn };
                        let result = carry_in(tcp, acceptor, key, qemu, to_qemu).await;
                        if let Err(e) = result {
                            tracing::debug!(%from, error = %e, "a tunnelled connection ended");
                        }
                    });
                }
                Some(()) = admitted.recv() => taken += 1,
                Some(_) = carried.join_next(), if !carried.is_empty() => {}
            }
        }
        // Listening no more: the connections in flight finish.
        drop(listener);
        while carried.join_next().await.is_some() {}
    });
    let tunnel = Tunnel {
        tasks,
        socket_file: None,
    };
    Ok((tunnel, addr))
}

/// What a connection of the target's tunnel needs to reach QEMU.
struct Admission {
    /// The connections QEMU still takes.
    slots: Arc<tokio::sync::Semaphore>,
    /// Told of each connection admitted.
    admitted: tokio::sync::mpsc::Sender<()>,
    /// This connection's turn to present its key.
    turn: tokio::sync::OwnedSemaphorePermit,
}

async fn carry_in(
    tcp: TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    key: [u8; KEY_BYTES],
    qemu: PathBuf,
    admission: Admission,
) -> std::io::Result<()> {
    tcp.set_nodelay(true)?;
    let mut remote = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let mut tls = acceptor.accept(tcp).await?;
        let mut shown = [0u8; KEY_BYTES];
        tls.read_exact(&mut shown).await?;
        match same_key(&shown, &key) {
            true => Ok(tls),
            false => Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "a connection without the migration's key",
            )),
        }
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no key in time"))??;
    drop(admission.turn);
    let Ok(slot) = admission.slots.try_acquire() else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "a connection beyond those of the stream",
        ));
    };
    slot.forget();
    // Never full: it holds a message per slot.
    let _ = admission.admitted.try_send(());
    let mut local = UnixStream::connect(qemu).await?;
    tokio::io::copy_bidirectional_with_sizes(&mut remote, &mut local, COPY_BUFFER, COPY_BUFFER)
        .await?;
    Ok(())
}

/// Compares keys in time independent of where they differ.
fn same_key(a: &[u8; KEY_BYTES], b: &[u8; KEY_BYTES]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The first [`KEY_BYTES`] of a migration's hex key.
pub(super) fn key_of(hex_key: &str) -> Option<[u8; KEY_BYTES]> {
    let bytes = hex::decode(hex_key).ok()?;
    bytes.get(..KEY_BYTES)?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(dir: &Path) -> flotilla_tls::Identity {
        flotilla_tls::load_or_create(dir, &["127.0.0.1".into()]).expect("identity")
    }

    /// An echo server standing in for the target's QEMU.
    fn echo(path: &Path) -> PathBuf {
        let l = UnixListener::bind(path).expect("bind");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        path.to_path_buf()
    }

    struct Pair {
        source: Tunnel,
        _target: Tunnel,
        local: PathBuf,
        _dir: tempfile::TempDir,
    }

    async fn tunnels(
        key_in: [u8; KEY_BYTES],
        key_out: [u8; KEY_BYTES],
        connections: usize,
    ) -> Pair {
        let dir = tempfile::tempdir().expect("tempdir");
        let id = identity(dir.path());
        let server = Arc::new(flotilla_tls::server_config(&id).expect("server config"));
        let (target, at) = incoming(
            IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            server,
            key_in,
            echo(&dir.path().join("qemu.sock")),
            connections,
        )
        .await
        .expect("incoming");
        let client = flotilla_tls::pinned_client_config(&id.fingerprint).expect("client");
        let local = dir.path().join("out.sock");
        let source = outgoing(&local, at, client, key_out)
            .await
            .expect("outgoing");
        Pair {
            source,
            _target: target,
            local,
            _dir: dir,
        }
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_and_only_so_many_connections_are_carried() {
        let key = [7u8; KEY_BYTES];
        let pair = tunnels(key, key, 2).await;
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        for _ in 0..2 {
            let mut s = UnixStream::connect(&pair.local).await.expect("connect");
            let (mut r, mut w) = s.split();
            let sent = async {
                w.write_all(&data).await.expect("write");
                w.shutdown().await.expect("shutdown");
            };
            let mut back = Vec::new();
            let (_, read) = tokio::join!(sent, r.read_to_end(&mut back));
            read.expect("read");
            assert!(back == data, "the echo differs");
        }
        // The target's listener has closed after two connections.
        let mut s = UnixStream::connect(&pair.local).await.expect("connect");
        let _ = s.write_all(b"more").await;
        let mut back = Vec::new();
        let _ = s.read_to_end(&mut back).await;
        assert!(back.is_empty());
        // The source's socket goes with its tunnel.
        let local = pair.local.clone();
        drop(pair.source);
        assert!(!local.exists());
    }

    #[tokio::test]
    async fn a_connection_without_the_key_reaches_nothing() {
        let pair = tunnels([1; KEY_BYTES], [2; KEY_BYTES], 1).await;
        let mut s = UnixStream::connect(&pair.local).await.expect("connect");
        let _ = s.write_all(b"hello").await;
        let mut back = Vec::new();
        let _ = s.read_to_end(&mut back).await;
        assert!(back.is_empty(), "echoed {back:?}");
    }

    #[test]
    fn keys_come_from_the_migrations_hex_key() {
        let hex_key = "ab".repeat(32);
        assert_eq!(key_of(&hex_key), Some([0xab; KEY_BYTES]));
        assert_eq!(key_of("abcd"), None);
        assert_eq!(key_of("not hex"), None);
    }
}
