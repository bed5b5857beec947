//! Handshake, info, malformed input, reconnects and shutdown.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use flotilla_guest_protocol::{
    encode_frame, encode_message, ErrorKind, FrameDecoder, GuestClient, GuestClientError, Request,
    RequestBody, Response, ResponseBody, MAX_FRAME_LEN,
};

use crate::{run, sh, text, Agent};

const WAIT: Duration = Duration::from_secs(10);

/// A raw connection that speaks bytes, for what the client would never send.
struct Raw {
    stream: UnixStream,
    decoder: FrameDecoder,
}

impl Raw {
    fn connect(agent: &Agent) -> Self {
        // The socket file appears at bind(), a moment before listen().
        let until = std::time::Instant::now() + WAIT;
        let stream = loop {
            match UnixStream::connect(agent.socket()) {
                Ok(stream) => break stream,
                Err(error) if std::time::Instant::now() < until => {
                    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionRefused);
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(error) => panic!("cannot connect: {error}"),
            }
        };
        stream.set_read_timeout(Some(WAIT)).unwrap();
        Self {
            stream,
            decoder: FrameDecoder::new(),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    fn request(id: u64, body: RequestBody) -> Vec<u8> {
        encode_message(&Request { id, body }).unwrap()
    }

    /// Reads until `n` replies arrived; sorted by id since handlers answer in any order.
    fn replies(&mut self, n: usize) -> Vec<Response> {
        let mut replies = Vec::new();
        let mut buf = [0u8; 4096];
        while replies.len() < n {
            while let Some(reply) = self.decoder.next_message::<Response>() {
                replies.push(reply.unwrap());
            }
            if replies.len() >= n {
                break;
            }
            let got = self.stream.read(&mut buf).unwrap();
            assert!(got > 0, "agent closed the connection");
            self.decoder.feed(&buf[..got]);
        }
        replies.sort_by_key(|reply| reply.id);
        replies
    }
}

fn error_kind(reply: &Response) -> Option<ErrorKind> {
    match &reply.body {
        ResponseBody::Error(error) => Some(error.kind),
        _ => None,
    }
}

#[tokio::test]
async fn hello_reports_versions_and_times() {
    let agent = Agent::start();
    let (client, hello) = GuestClient::wait_ready(agent.socket(), WAIT).await.unwrap();
    assert_eq!(hello.protocol_version, 1);
    assert_eq!(hello.agent_version, env!("CARGO_PKG_VERSION"));
    assert!(
        hello.boot_ms > 0 && hello.boot_ms <= hello.uptime_ms,
        "{hello:?}"
    );
    // A second handshake on the same connection works too.
    let again = client.hello(WAIT).await.unwrap();
    assert_ne!(again.nonce, hello.nonce);
    assert!(client.ping(WAIT).await.unwrap() < WAIT);
    assert!(client.is_connected());
}

#[tokio::test]
async fn info_describes_the_machine() {
    let agent = Agent::start();
    let client = agent.client().await;
    let info = client.info(WAIT).await.unwrap();
    assert!(!info.kernel_release.is_empty());
    assert!(!info.hostname.is_empty());
    assert!(info.uptime_ms > 0);
    assert!(info.mem_total_kib > 0 && info.mem_available_kib <= info.mem_total_kib);
    assert!(
        info.addresses
            .iter()
            .any(|a| a.interface == "lo" && a.address == "127.0.0.1" && a.prefix_len == 8),
        "{:?}",
        info.addresses
    );
}

#[tokio::test]
async fn malformed_input_gets_errors_and_the_agent_keeps_going() {
    let agent = Agent::start();
    let mut raw = Raw::connect(&agent);
    raw.send(b"this is not a frame");
    raw.send(&Raw::request(5, RequestBody::Ping));
    raw.send(&encode_frame(b"{broken json").unwrap());
    raw.send(&encode_frame(br#"{"id": 6, "body": {"type": "format_disk"}}"#).unwrap());
    raw.send(&Raw::request(
        7,
        RequestBody::Hello {
            nonce: 1,
            protocol_version: 99,
        },
    ));
    raw.send(&Raw::request(8, RequestBody::Ping));
    let replies = raw.replies(6);
    let summary: Vec<_> = replies.iter().map(|r| (r.id, error_kind(r))).collect();
    assert_eq!(
        summary,
        vec![
            (0, Some(ErrorKind::MalformedFrame)),
            (0, Some(ErrorKind::MalformedFrame)),
            (5, None),
            (6, Some(ErrorKind::InvalidRequest)),
            (7, Some(ErrorKind::UnsupportedVersion)),
            (8, None),
        ]
    );
    assert_eq!(replies[2].body, ResponseBody::Pong);

    // An oversized frame is skipped without killing the connection.
    let mut header = b"FL\x01\x00".to_vec();
    header.extend((MAX_FRAME_LEN as u32 + 1).to_be_bytes());
    raw.send(&header);
    raw.send(&vec![b'x'; MAX_FRAME_LEN + 1]);
    raw.send(&Raw::request(9, RequestBody::Ping));
    let replies = raw.replies(2);
    assert_eq!(error_kind(&replies[0]), Some(ErrorKind::FrameTooLarge));
    assert_eq!((replies[1].id, &replies[1].body), (9, &ResponseBody::Pong));
}

#[tokio::test]
async fn reconnect_after_drop_and_after_half_a_frame() {
    let agent = Agent::start();
    let first = agent.client().await;
    // Leave an exec running and walk away: its replies must not confuse the next client.
    let mut request = sh("sleep 1; echo late");
    request.stream = true;
    let _abandoned = first.exec(request).await.unwrap();
    drop(first);

    // A peer that dies mid-frame.
    let mut raw = Raw::connect(&agent);
    let frame = Raw::request(1, RequestBody::Ping);
    raw.send(&frame[..frame.len() / 2]);
    drop(raw);

    let second = agent.client().await;
    second.ping(WAIT).await.unwrap();
    let exit = run(&second, sh("echo again")).await;
    assert_eq!(text(&exit.stdout), "again\n");
}

#[tokio::test]
async fn shutdown_is_acknowledged_and_ends_the_agent() {
    let mut agent = Agent::start();
    let client = agent.client().await;
    client.shutdown(false, WAIT).await.unwrap();
    let status = agent.wait_exit(WAIT).expect("agent still running");
    assert!(status.success());
    // The connection closed with it, and requests now fail as such.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!client.is_connected());
    assert!(matches!(
        client.ping(WAIT).await,
        Err(GuestClientError::Disconnected)
    ));
}

#[tokio::test]
async fn shutdown_goes_ahead_when_the_host_leaves_at_once() {
    let mut agent = Agent::start();
    let mut raw = Raw::connect(&agent);
    raw.send(&Raw::request(1, RequestBody::Shutdown { reboot: true }));
    drop(raw);
    let status = agent.wait_exit(WAIT).expect("agent still running");
    assert!(status.success());
}
