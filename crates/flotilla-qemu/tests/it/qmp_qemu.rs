//! QMP against a real QEMU: a paused microvm without a kernel.

use std::time::Duration;

use flotilla_qemu::{next_event, QemuProcess, QmpClient, QmpError, StatusInfo};
use serde_json::json;

use crate::common::{self, KillGuard};

const WAIT: Duration = Duration::from_secs(10);

async fn paused_qemu(dir: &std::path::Path, guard: &mut KillGuard) -> QemuProcess {
    let qmp = dir.join("qmp.sock");
    let process = QemuProcess::spawn_with_args(
        &common::qemu_binary(),
        &common::paused_qemu_args(&qmp),
        &qmp,
        &dir.join("qemu.log"),
        WAIT,
    )
    .await
    .expect("spawn paused QEMU");
    guard.watch(process.identity);
    process
}

#[tokio::test]
async fn status_stop_cont_events_errors_and_quit() {
    let dir = common::temp_dir();
    let mut guard = KillGuard::default();
    let process = paused_qemu(dir.path(), &mut guard).await;
    let qmp = QmpClient::connect(&dir.path().join("qmp.sock"), WAIT)
        .await
        .expect("connect");
    assert!(qmp.greeting().version.major >= 10, "{:?}", qmp.greeting());

    let status = qmp.query_status().await.expect("query-status");
    assert_eq!(
        status,
        StatusInfo {
            running: false,
            status: "prelaunch".into()
        }
    );

    let mut events = qmp.events();
    qmp.cont().await.expect("cont");
    next_event(&mut events, "RESUME", WAIT)
        .await
        .expect("RESUME event");
    assert!(qmp.query_status().await.expect("status").running);

    qmp.stop().await.expect("stop");
    let stop = next_event(&mut events, "STOP", WAIT)
        .await
        .expect("STOP event");
    assert!(stop.timestamp.is_some());
    let status = qmp.query_status().await.expect("status");
    assert_eq!((status.running, status.status.as_str()), (false, "paused"));

    match qmp
        .execute::<serde_json::Value>("no-such-command", None)
        .await
    {
        Err(QmpError::Command { class, desc }) => {
            assert_eq!(class, "CommandNotFound");
            assert!(desc.contains("no-such-command"), "{desc}");
        }
        other => panic!("expected CommandNotFound, got {other:?}"),
    }
    let err = qmp
        .execute::<serde_json::Value>("human-monitor-command", Some(json!({})))
        .await
        .expect_err("missing argument");
    assert_eq!(err.class(), Some("GenericError"), "{err}");
    // A reply of the wrong shape is a Decode error, and the client stays usable.
    let err = qmp
        .execute::<StatusInfo>("query-name", None)
        .await
        .expect_err("wrong shape");
    assert!(matches!(err, QmpError::Decode { .. }), "{err}");
    assert!(qmp.is_connected());

    qmp.quit().await.expect("quit");
    tokio::time::timeout(WAIT, qmp.closed())
        .await
        .expect("closed resolves");
    assert!(!qmp.is_connected());
    let exit = tokio::time::timeout(WAIT, process.wait_exit())
        .await
        .expect("QEMU exits after quit");
    assert_eq!(exit.code, Some(0), "{exit}");
    assert!(common::reaped(process.pid()), "QEMU left a zombie");
    assert!(matches!(
        qmp.query_status().await,
        Err(QmpError::Disconnected)
    ));
}

#[tokio::test]
async fn killing_qemu_closes_the_client() {
    let dir = common::temp_dir();
    let mut guard = KillGuard::default();
    let process = paused_qemu(dir.path(), &mut guard).await;
    let qmp = QmpClient::connect_retry(&dir.path().join("qmp.sock"), WAIT)
        .await
        .expect("connect");
    let mut events = qmp.events();
    let clone = qmp.clone();

    process.kill().await.expect("kill");
    tokio::time::timeout(WAIT, clone.closed())
        .await
        .expect("closed resolves after kill");
    assert!(matches!(
        events.recv().await,
        Err(tokio::sync::broadcast::error::RecvError::Closed)
    ));
    assert!(matches!(qmp.stop().await, Err(QmpError::Disconnected)));
    let exit = process.wait_exit().await;
    assert_eq!(exit.signal, Some(libc::SIGKILL), "{exit}");
    assert!(common::reaped(process.pid()));
}

#[tokio::test]
async fn a_second_client_can_connect_after_the_first_leaves() {
    let dir = common::temp_dir();
    let mut guard = KillGuard::default();
    let process = paused_qemu(dir.path(), &mut guard).await;
    let socket = dir.path().join("qmp.sock");
    for _ in 0..2 {
        let qmp = QmpClient::connect(&socket, WAIT).await.expect("connect");
        qmp.query_status().await.expect("status");
        drop(qmp);
    }
    process.kill().await.expect("kill");
}
