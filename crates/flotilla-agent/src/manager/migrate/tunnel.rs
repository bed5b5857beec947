//! An encrypted memory stream carried by the agents instead of QEMU's TLS.
//!
//! QEMU 10.0's TLS channel sends every element of a write as a TLS record
//! of its own, each in its own `sendmsg`: about 13,000 for an idle 256 MiB
//! guest, against 230 for the same stream in the clear, which made the
//! stream several times slower between hosts. It also aborts when a
//! several-connection (multifd) stream over TLS is cancelled. So the QEMUs
//! stream in the clear to their own agent on loopback, and the agents carry
//! each connection between the hosts over TLS in large records: the target
//! agent's certificate pinned by its fingerprint (as for its API), the
//! source proving itself with the migration's key as its first bytes.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
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

/// A tunnel's listener and connections: all closed when it is dropped.
pub(super) struct Tunnel {
    /// Where it listens: loopback for the source's QEMU, the host's
    /// address for the source's agent.
    pub addr: SocketAddr,
    tasks: JoinSet<()>,
}

impl Tunnel {
    /// Closes the tunnel once every connection it carries has ended, or
    /// at once if `stop` completes first.
    pub(super) async fn run_until(mut self, stop: impl std::future::Future<Output = ()>) {
        tokio::select! {
            _ = stop => self.tasks.abort_all(),
            _ = async { while self.tasks.join_next().await.is_some() {} } => {}
        }
    }
}

/// The source's side: QEMU connects to the returned tunnel's loopback
/// address; each connection goes on to the target's tunnel at `remote`.
pub(super) async fn outgoing(
    remote: SocketAddr,
    tls: rustls::ClientConfig,
    key: [u8; KEY_BYTES],
) -> std::io::Result<Tunnel> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let mut tasks = JoinSet::new();
    tasks.spawn(async move {
        let mut carried = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((local, _)) = accepted else { break };
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
    Ok(Tunnel { addr, tasks })
}

async fn carry_out(
    mut local: TcpStream,
    remote: SocketAddr,
    connector: tokio_rustls::TlsConnector,
    key: [u8; KEY_BYTES],
) -> std::io::Result<()> {
    local.set_nodelay(true)?;
    let mut remote = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let tcp = TcpStream::connect(remote).await?;
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

/// The target's side: the source's agent connects at the returned tunnel's
/// address on `ip`; each connection that presents `key` goes on to QEMU
/// listening at `qemu`. At most `connections` are carried.
pub(super) async fn incoming(
    ip: IpAddr,
    tls: Arc<rustls::ServerConfig>,
    key: [u8; KEY_BYTES],
    qemu: SocketAddr,
    connections: usize,
) -> std::io::Result<Tunnel> {
    let listener = TcpListener::bind((ip, 0)).await?;
    let addr = listener.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
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
                accepted = listener.accept() => {
                    let Ok((tcp, from)) = accepted else { break };
                    let (acceptor, admitted_tx) = (acceptor.clone(), admitted_tx.clone());
                    carried.spawn(async move {
                        if let Err(e) = carry_in(tcp, acceptor, key, qemu, admitted_tx).await {
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
    Ok(Tunnel { addr, tasks })
}

async fn carry_in(
    tcp: TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    key: [u8; KEY_BYTES],
    qemu: SocketAddr,
    admitted: tokio::sync::mpsc::Sender<()>,
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
    let _ = admitted.send(()).await;
    let mut local = TcpStream::connect(qemu).await?;
    local.set_nodelay(true)?;
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

    fn identity(dir: &std::path::Path) -> flotilla_tls::Identity {
        flotilla_tls::load_or_create(dir, &["127.0.0.1".into()]).expect("identity")
    }

    /// An echo server standing in for the target's QEMU.
    async fn echo() -> SocketAddr {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn tunnels(
        key_in: [u8; KEY_BYTES],
        key_out: [u8; KEY_BYTES],
        connections: usize,
    ) -> (Tunnel, Tunnel, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let id = identity(dir.path());
        let server = Arc::new(flotilla_tls::server_config(&id).expect("server config"));
        let target = incoming(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            server,
            key_in,
            echo().await,
            connections,
        )
        .await
        .expect("incoming");
        let client = flotilla_tls::pinned_client_config(&id.fingerprint).expect("client");
        let source = outgoing(target.addr, client, key_out)
            .await
            .expect("outgoing");
        (source, target, dir)
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_and_only_so_many_connections_are_carried() {
        let key = [7u8; KEY_BYTES];
        let (source, target, _dir) = tunnels(key, key, 2).await;
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        for _ in 0..2 {
            let mut s = TcpStream::connect(source.addr).await.expect("connect");
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
        let mut s = TcpStream::connect(source.addr).await.expect("connect");
        let mut back = Vec::new();
        s.write_all(b"more").await.expect("write");
        let _ = s.read_to_end(&mut back).await;
        assert!(back.is_empty());
        drop((source, target));
    }

    #[tokio::test]
    async fn a_connection_without_the_key_reaches_nothing() {
        let (source, target, _dir) = tunnels([1; KEY_BYTES], [2; KEY_BYTES], 1).await;
        let mut s = TcpStream::connect(source.addr).await.expect("connect");
        s.write_all(b"hello").await.expect("write");
        let mut back = Vec::new();
        let _ = s.read_to_end(&mut back).await;
        assert!(back.is_empty(), "echoed {back:?}");
        drop((source, target));
    }

    #[test]
    fn keys_come_from_the_migrations_hex_key() {
        let hex_key = "ab".repeat(32);
        assert_eq!(key_of(&hex_key), Some([0xab; KEY_BYTES]));
        assert_eq!(key_of("abcd"), None);
        assert_eq!(key_of("not hex"), None);
    }
}
