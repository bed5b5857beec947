//! `GuestClient` against a scripted fake guest: stale frames, resent hellos, disconnects,
//! retries and error mapping. (The real agent is exercised in flotilla-guest-agent's tests.)

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flotilla_guest_protocol::{
    encode_message, ErrorKind, ExecEvent, ExecRequest, FrameDecoder, GuestClient, GuestClientError,
    GuestErrorReply, HelloReply, OutputStream, Request, RequestBody, Response, ResponseBody,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

const WAIT: Duration = Duration::from_secs(10);

/// The guest end of one connection, driven by the test.
struct FakeGuest {
    stream: UnixStream,
    decoder: FrameDecoder,
}

impl FakeGuest {
    async fn accept(listener: &UnixListener) -> Self {
        let (stream, _) = listener.accept().await.unwrap();
        Self {
            stream,
            decoder: FrameDecoder::new(),
        }
    }

    /// The next request, or `None` when the client closed the connection.
    async fn recv(&mut self) -> Option<Request> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(request) = self.decoder.next_message::<Request>() {
                return Some(request.unwrap());
            }
            let n = self.stream.read(&mut buf).await.unwrap();
            if n == 0 {
                return None;
            }
            self.decoder.feed(&buf[..n]);
        }
    }

    async fn send(&mut self, id: u64, body: ResponseBody) {
        self.send_raw(&encode_message(&Response { id, body }).unwrap())
            .await;
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Answers a Hello request with its own nonce.
    async fn answer_hello(&mut self, request: &Request) {
        let RequestBody::Hello { nonce, .. } = request.body else {
            panic!("expected hello, got {request:?}");
        };
        self.send(request.id, ResponseBody::Hello(hello_reply(nonce)))
            .await;
    }
}

fn hello_reply(nonce: u64) -> HelloReply {
    HelloReply {
        nonce,
        protocol_version: 1,
        agent_version: "test".into(),
        boot_ms: 900,
        uptime_ms: 1000,
    }
}

fn listen() -> (tempfile::TempDir, PathBuf, UnixListener) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("guest.sock");
    let listener = UnixListener::bind(&path).unwrap();
    (dir, path, listener)
}

async fn connect(path: &Path) -> GuestClient {
    GuestClient::connect(path).await.unwrap()
}

#[tokio::test]
async fn stale_and_broken_frames_before_the_reply_are_ignored() {
    let (_dir, path, listener) = listen();
    let guest = tokio::spawn(async move {
        let mut guest = FakeGuest::accept(&listener).await;
        // Leftovers of an earlier connection: garbage, a reply to an id nobody uses, and the
        // start of a frame that never finishes.
        guest.send_raw(b"\x00\x17garbage").await;
        guest.send(3, ResponseBody::Pong).await;
        guest.send_raw(b"FL\x01\x00\x00\x00\x04\x00{\"id\":").await;
        let hello = guest.recv().await.unwrap();
        // Right id, wrong nonce: not ours either.
        guest
            .send(hello.id, ResponseBody::Hello(hello_reply(12345)))
            .await;
        guest.answer_hello(&hello).await;
        guest
    });
    let client = connect(&path).await;
    let reply = client.hello(WAIT).await.unwrap();
    assert_ne!(reply.nonce, 12345);
    assert_eq!(reply.boot_ms, 900);
    drop(guest.await.unwrap());
}

#[tokio::test]
async fn unanswered_hello_is_resent() {
    let (_dir, path, listener) = listen();
    tokio::spawn(async move {
        let mut guest = FakeGuest::accept(&listener).await;
        let _ignored = guest.recv().await.unwrap();
        let second = guest.recv().await.unwrap();
        guest.answer_hello(&second).await;
        // Keep the connection open until the client goes.
        while guest.recv().await.is_some() {}
    });
    let client = connect(&path).await;
    let started = Instant::now();
    client.hello(WAIT).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(900));
}

#[tokio::test]
async fn disconnect_fails_requests_in_flight() {
    let (_dir, path, listener) = listen();
    tokio::spawn(async move {
        let mut guest = FakeGuest::accept(&listener).await;
        let exec = guest.recv().await.unwrap();
        guest
            .send(
                exec.id,
                ResponseBody::Output {
                    stream: OutputStream::Stdout,
                    data: b"partial".to_vec(),
                },
            )
            .await;
        // Then the guest vanishes.
    });
    let client = connect(&path).await;
    let mut stream = client.exec(ExecRequest::new(["true"])).await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first, ExecEvent::Stdout(b"partial".to_vec()));
    assert!(matches!(
        stream.next().await,
        Some(Err(GuestClientError::Disconnected))
    ));
    assert!(stream.next().await.is_none());
    assert!(!client.is_connected());
    assert!(matches!(
        client.ping(WAIT).await,
        Err(GuestClientError::Disconnected)
    ));
}

#[tokio::test]
async fn guest_errors_are_typed() {
    let (_dir, path, listener) = listen();
    tokio::spawn(async move {
        let mut guest = FakeGuest::accept(&listener).await;
        while let Some(request) = guest.recv().await {
            let body = ResponseBody::Error(GuestErrorReply {
                kind: ErrorKind::Internal,
                message: format!("cannot do {:?}", request.body),
            });
            guest.send(request.id, body).await;
        }
    });
    let client = connect(&path).await;
    let error = client.info(WAIT).await.unwrap_err();
    assert!(
        matches!(&error, GuestClientError::Guest { kind: ErrorKind::Internal, message } if message.contains("Info")),
        "{error}"
    );
    let error = client
        .exec_collect(ExecRequest::new(["x"]), WAIT)
        .await
        .unwrap_err();
    assert!(matches!(error, GuestClientError::Guest { .. }));
}

#[tokio::test]
async fn unanswered_request_times_out_and_the_connection_survives() {
    let (_dir, path, listener) = listen();
    tokio::spawn(async move {
        let mut guest = FakeGuest::accept(&listener).await;
        let _ignored = guest.recv().await.unwrap();
        let ping = guest.recv().await.unwrap();
        guest.send(ping.id, ResponseBody::Pong).await;
        while guest.recv().await.is_some() {}
    });
    let client = connect(&path).await;
    let result = client.info(Duration::from_millis(200)).await;
    assert!(matches!(result, Err(GuestClientError::Timeout)));
    client.ping(WAIT).await.unwrap();
}

#[tokio::test]
async fn wait_ready_retries_until_the_socket_appears() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("late.sock");
    let server_path = path.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let listener = UnixListener::bind(&server_path).unwrap();
        let mut guest = FakeGuest::accept(&listener).await;
        let hello = guest.recv().await.unwrap();
        guest.answer_hello(&hello).await;
        while guest.recv().await.is_some() {}
    });
    let (client, reply) = GuestClient::wait_ready(&path, WAIT).await.unwrap();
    assert_eq!(reply.protocol_version, 1);
    assert!(client.is_connected());
}

#[tokio::test]
async fn wait_ready_gives_up_at_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let result =
        GuestClient::wait_ready(&dir.path().join("never"), Duration::from_millis(300)).await;
    assert!(matches!(result, Err(GuestClientError::Timeout)));
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn dropping_the_client_closes_the_connection() {
    let (_dir, path, listener) = listen();
    let guest = tokio::spawn(async move {
        let mut guest = FakeGuest::accept(&listener).await;
        let ping = guest.recv().await.unwrap();
        guest.send(ping.id, ResponseBody::Pong).await;
        // Sees end-of-stream once the client is dropped.
        guest.recv().await
    });
    let client = connect(&path).await;
    client.ping(WAIT).await.unwrap();
    drop(client);
    let after = tokio::time::timeout(WAIT, guest).await.unwrap().unwrap();
    assert!(after.is_none());
}
