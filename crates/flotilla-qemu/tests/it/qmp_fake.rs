//! QMP client against a fake server that misbehaves on purpose.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_qemu::{next_event, QmpClient, QmpError, StatusInfo};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixListener;
use tokio::task::JoinHandle;

use crate::common;

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10}, "package": ""}, "capabilities": ["oob"]}}"#;
const SHORT: Duration = Duration::from_secs(5);

/// The server side of one fake QMP connection.
struct Peer {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Peer {
    async fn send(&mut self, line: &str) {
        self.writer
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .expect("fake server write");
    }

    /// The next command the client sent.
    async fn recv(&mut self) -> Value {
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .await
            .expect("fake server read");
        serde_json::from_str(&line).expect("client sent JSON")
    }

    /// Greeting plus the reply to qmp_capabilities.
    async fn handshake(&mut self) {
        self.send(GREETING).await;
        let caps = self.recv().await;
        assert_eq!(caps["execute"], "qmp_capabilities");
        self.send(&json!({"return": {}, "id": caps["id"]}).to_string())
            .await;
    }
}

/// Serves one connection at `dir/qmp.sock` with `script`; the returned task
/// ends when the script does (dropping the connection).
fn serve<F, Fut>(dir: &Path, script: F) -> (PathBuf, JoinHandle<()>)
where
    F: FnOnce(Peer) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let path = dir.join("qmp.sock");
    let listener = UnixListener::bind(&path).expect("bind fake QMP socket");
    let task = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.expect("accept");
        let (read, writer) = stream.into_split();
        script(Peer {
            reader: BufReader::new(read),
            writer,
        })
        .await;
    });
    (path, task)
}

async fn protocol_error_on_connect(greeting: &'static str) -> String {
    let dir = common::temp_dir();
    let (path, _server) = serve(dir.path(), move |mut peer| async move {
        peer.send(greeting).await;
        tokio::time::sleep(SHORT).await;
    });
    match QmpClient::connect(&path, SHORT).await {
        Err(QmpError::Protocol(msg)) => msg,
        Err(other) => panic!("expected a protocol error, got {other}"),
        Ok(_) => panic!("expected a protocol error, got a connection"),
    }
}

#[tokio::test]
async fn wrong_greeting_is_a_protocol_error() {
    let msg = protocol_error_on_connect(r#"{"hello": "world"}"#).await;
    assert!(msg.contains("greeting"), "{msg}");
    let msg = protocol_error_on_connect("this is not json").await;
    assert!(msg.contains("invalid JSON"), "{msg}");
    let msg = protocol_error_on_connect("[1, 2, 3]").await;
    assert!(msg.contains("greeting"), "{msg}");
}

#[tokio::test]
async fn missing_greeting_times_out() {
    let dir = common::temp_dir();
    let (path, _server) = serve(dir.path(), |peer| async move {
        // Hold the connection open without ever greeting.
        let _peer = peer;
        tokio::time::sleep(SHORT).await;
    });
    match QmpClient::connect(&path, Duration::from_millis(200)).await {
        Err(QmpError::Timeout { command }) => assert_eq!(command, "greeting"),
        Err(other) => panic!("expected a timeout, got {other}"),
        Ok(_) => panic!("expected a timeout, got a connection"),
    }
}

#[tokio::test]
async fn an_event_before_the_greeting_is_skipped() {
    // QEMU may emit an event (RESUME as a VM starts) on a connection it is
    // still opening, before the greeting.
    let dir = common::temp_dir();
    let (path, _server) = serve(dir.path(), |mut peer| async move {
        peer.send(r#"{"event": "RESUME", "timestamp": {"seconds": 1, "microseconds": 2}}"#)
            .await;
        peer.handshake().await;
        tokio::time::sleep(SHORT).await;
    });
    QmpClient::connect(&path, SHORT)
        .await
        .expect("connected past the early event");
}

#[tokio::test]
async fn failed_negotiation_is_reported() {
    let dir = common::temp_dir();
    let (path, _server) = serve(dir.path(), |mut peer| async move {
        peer.send(GREETING).await;
        let caps = peer.recv().await;
        peer.send(&json!({"id": caps["id"], "weird": true}).to_string())
            .await;
        tokio::time::sleep(SHORT).await;
    });
    match QmpClient::connect(&path, SHORT).await {
        Err(QmpError::Protocol(msg)) => assert!(msg.contains("neither"), "{msg}"),
        Err(other) => panic!("expected a protocol error, got {other}"),
        Ok(_) => panic!("expected a protocol error, got a connection"),
    }
}

#[tokio::test]
async fn silent_server_times_out_and_late_replies_are_ignored() {
    let dir = common::temp_dir();
    let (path, _server) = serve(dir.path(), |mut peer| async move {
        peer.handshake().await;
        let first = peer.recv().await;
        let second = peer.recv().await;
        // Answer the abandoned command first, then the live one.
        peer.send(
            &json!({"return": {"running": false, "status": "late"}, "id": first["id"]}).to_string(),
        )
        .await;
        peer.send(
            &json!({"return": {"running": true, "status": "running"}, "id": second["id"]})
                .to_string(),
        )
        .await;
        tokio::time::sleep(SHORT).await;
    });
    let qmp = QmpClient::connect(&path, SHORT).await.expect("connect");
    match qmp
        .execute_timeout::<StatusInfo>("query-status", None, Duration::from_millis(200))
        .await
    {
        Err(QmpError::Timeout { command }) => assert_eq!(command, "query-status"),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(qmp.is_connected());
    let status = qmp.query_status().await.expect("second command");
    assert_eq!(status.status, "running");
}

#[tokio::test]
async fn closing_mid_command_fails_pending_with_disconnected() {
    let dir = common::temp_dir();
    let (path, server) = serve(dir.path(), |mut peer| async move {
        peer.handshake().await;
        let _ = peer.recv().await;
        // Drop the connection without replying.
    });
    let qmp = QmpClient::connect(&path, SHORT).await.expect("connect");
    let mut events = qmp.events();
    let result = qmp.query_status().await;
    assert!(matches!(result, Err(QmpError::Disconnected)), "{result:?}");
    tokio::time::timeout(SHORT, qmp.closed())
        .await
        .expect("closed resolves");
    assert!(!qmp.is_connected());
    assert!(matches!(qmp.cont().await, Err(QmpError::Disconnected)));
    assert!(matches!(
        next_event(&mut events, "STOP", SHORT).await,
        Err(QmpError::Disconnected)
    ));
    server.await.expect("server task");
}

#[tokio::test]
async fn malformed_replies_are_protocol_errors() {
    let dir = common::temp_dir();
    let (path, _server) = serve(dir.path(), |mut peer| async move {
        peer.handshake().await;
        // A reply with neither return nor error: only that command fails.
        let cmd = peer.recv().await;
        peer.send(&json!({"id": cmd["id"], "result": 1}).to_string())
            .await;
        // An error reply without a class.
        let cmd = peer.recv().await;
        peer.send(&json!({"id": cmd["id"], "error": "bad"}).to_string())
            .await;
        // Invalid JSON: the stream is unusable, the pending command fails.
        let _ = peer.recv().await;
        peer.send("{\"return\": ").await;
        tokio::time::sleep(SHORT).await;
    });
    let qmp = QmpClient::connect(&path, SHORT).await.expect("connect");
    let err = qmp.query_status().await.expect_err("no return/error");
    assert!(
        matches!(&err, QmpError::Protocol(m) if m.contains("neither")),
        "{err}"
    );
    let err = qmp.query_status().await.expect_err("bad error reply");
    assert!(
        matches!(&err, QmpError::Protocol(m) if m.contains("malformed error")),
        "{err}"
    );
    assert!(qmp.is_connected());
    let err = qmp.query_status().await.expect_err("invalid JSON");
    assert!(
        matches!(&err, QmpError::Protocol(m) if m.contains("invalid JSON")),
        "{err}"
    );
    tokio::time::timeout(SHORT, qmp.closed())
        .await
        .expect("connection closed after invalid JSON");
    assert!(matches!(
        qmp.query_status().await,
        Err(QmpError::Disconnected)
    ));
}

#[tokio::test]
async fn replies_are_matched_by_id_and_events_are_broadcast() {
    let dir = common::temp_dir();
    let (path, _server) = serve(dir.path(), |mut peer| async move {
        peer.handshake().await;
        let a = peer.recv().await;
        let b = peer.recv().await;
        let (name_cmd, status_cmd) = if a["execute"] == "query-name" {
            (a, b)
        } else {
            (b, a)
        };
        peer.send(
            r#"{"event": "STOP", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}"#,
        )
        .await;
        // Out of order: the later command first.
        peer.send(
            &json!({"return": {"running": true, "status": "running"}, "id": status_cmd["id"]})
                .to_string(),
        )
        .await;
        peer.send(&json!({"return": {"name": "vm-1"}, "id": name_cmd["id"]}).to_string())
            .await;
        peer.send(r#"{"event": "RESUME"}"#).await;
        tokio::time::sleep(SHORT).await;
    });
    let qmp = QmpClient::connect(&path, SHORT).await.expect("connect");
    let mut events = qmp.events();
    let mut more_events = qmp.events();
    let (name, status) = tokio::join!(qmp.execute::<Value>("query-name", None), qmp.query_status());
    assert_eq!(name.expect("name")["name"], "vm-1");
    assert!(status.expect("status").running);
    let stop = next_event(&mut events, "STOP", SHORT).await.expect("STOP");
    assert_eq!(stop.timestamp.map(|t| t.microseconds), Some(2));
    next_event(&mut events, "RESUME", SHORT)
        .await
        .expect("RESUME");
    let first = more_events.recv().await.expect("second subscriber");
    assert_eq!(first.event, "STOP");
}

#[tokio::test]
async fn command_errors_carry_class_and_desc() {
    let dir = common::temp_dir();
    let (path, _server) = serve(dir.path(), |mut peer| async move {
        peer.handshake().await;
        let cmd = peer.recv().await;
        assert_eq!(cmd["arguments"]["device"], "nope");
        peer.send(&json!({"id": cmd["id"], "error": {"class": "DeviceNotFound", "desc": "Device 'nope' not found"}}).to_string())
            .await;
        tokio::time::sleep(SHORT).await;
    });
    let qmp = QmpClient::connect(&path, SHORT).await.expect("connect");
    let err = qmp
        .execute::<Value>("device_del", Some(json!({"device": "nope"})))
        .await
        .expect_err("error reply");
    assert_eq!(err.class(), Some("DeviceNotFound"));
    assert_eq!(
        err.to_string(),
        "QMP command failed: DeviceNotFound: Device 'nope' not found"
    );
}

#[tokio::test]
async fn connect_retry_waits_for_the_socket() {
    let dir = common::temp_dir();
    let path = dir.path().join("qmp.sock");
    let missing = QmpClient::connect_retry(&path, Duration::from_millis(150)).await;
    assert!(matches!(&missing, Err(QmpError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound));

    let late_dir = dir.path().to_path_buf();
    let server = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (_path, task) = serve(&late_dir, |mut peer| async move {
            peer.handshake().await;
            tokio::time::sleep(SHORT).await;
        });
        task.await.expect("server");
    });
    let qmp = QmpClient::connect_retry(&path, SHORT)
        .await
        .expect("connect after retries");
    assert!(qmp.is_connected());
    server.abort();
}
