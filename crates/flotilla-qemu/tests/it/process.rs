//! QEMU processes: spawning from a config, startup failures, adoption and
//! identity checks.

use std::path::Path;
use std::time::{Duration, Instant};

use flotilla_qemu::{
    Accel, DriveConfig, ProcessIdentity, QemuConfig, QemuError, QemuProcess, QmpClient, Signal,
};

use crate::common::{self, KillGuard, StubEnd};

const WAIT: Duration = Duration::from_secs(10);

/// A config booting the halting stub kernel with a read-only raw disk, a
/// qcow2 disk and an agent channel.
fn stub_config(dir: &Path) -> QemuConfig {
    let kernel = dir.join("vmlinux");
    common::write_pvh_stub(&kernel, "stub kernel says hello\r\n", StubEnd::Halt);
    std::fs::write(dir.join("seed.raw"), vec![0u8; 1 << 20]).expect("raw disk");
    let status = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(dir.join("root.qcow2"))
        .arg("16M")
        .status()
        .expect("run qemu-img");
    assert!(status.success(), "qemu-img failed");
    QemuConfig {
        name: "stub,vm".into(),
        accel: Accel::Tcg,
        vcpus: 1,
        memory_mib: 64,
        kernel,
        initrd: None,
        cmdline: "console=ttyS0".into(),
        drives: vec![
            DriveConfig {
                id: "root".into(),
                path: dir.join("root.qcow2"),
                format: "qcow2".into(),
                read_only: false,
                nbd_backing: None,
            },
            DriveConfig {
                id: "seed".into(),
                path: dir.join("seed.raw"),
                format: "raw".into(),
                read_only: true,
                nbd_backing: None,
            },
        ],
        nics: vec![],
        qmp_socket: dir.join("qmp.sock"),
        agent_socket: Some(dir.join("agent.sock")),
        serial_log: dir.join("serial.log"),
        pidfile: dir.join("qemu.pid"),
        incoming: None,
        start_paused: false,
        mapped_ram: false,
        tls_psk_dir: None,
        memory_file: None,
        huge_pages: false,
    }
}

/// Whether transparent huge pages are allowed for the process `pid`.
fn thp_enabled(pid: i32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let line = status
        .lines()
        .find(|l| l.starts_with("THP_enabled:"))
        .expect("THP_enabled in /proc/PID/status");
    line.split_whitespace().nth(1) == Some("1")
}

/// Fields 5 (pgrp) and 6 (session) of /proc/PID/stat.
fn group_and_session(pid: i32) -> (i32, i32) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let rest = &stat[stat.rfind(')').expect("comm end") + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    (
        fields[2].parse().expect("pgrp"),
        fields[3].parse().expect("session"),
    )
}

#[tokio::test]
async fn spawn_boots_a_config_detached_and_kill_reaps_it() {
    let dir = common::temp_dir();
    let mut guard = KillGuard::default();
    let mut config = stub_config(dir.path());
    let log = dir.path().join("qemu.log");
    // A stale socket from an earlier run must not count as "ready".
    std::fs::write(&config.qmp_socket, b"stale").expect("stale file");

    for round in 1..=2 {
        // Huge pages off in the first round, on in the second.
        config.huge_pages = round == 2;
        let process = QemuProcess::spawn(&common::qemu_binary(), &config, &log)
            .await
            .expect("spawn");
        guard.watch(process.identity);
        let pid = process.pid();
        assert!(process.is_child() && !process.has_exited());
        assert_eq!(
            group_and_session(pid),
            (pid, pid),
            "QEMU not in its own session"
        );
        assert_eq!(thp_enabled(pid), config.huge_pages, "round {round}");
        let pidfile = std::fs::read_to_string(&config.pidfile).expect("pidfile");
        assert_eq!(pidfile.trim(), pid.to_string());
        assert!(config.agent_socket.as_deref().is_some_and(Path::exists));

        let qmp = QmpClient::connect(&config.qmp_socket, WAIT)
            .await
            .expect("connect");
        assert!(qmp.query_status().await.expect("status").running);
        let blocks: serde_json::Value =
            qmp.execute("query-block", None).await.expect("query-block");
        let seed = blocks
            .as_array()
            .and_then(|b| b.iter().find(|d| d["qdev"] == "seed"))
            .expect("seed drive present");
        assert_eq!(seed["inserted"]["ro"], true, "{seed}");
        let name: serde_json::Value = qmp.execute("query-name", None).await.expect("query-name");
        assert_eq!(name["name"], "stub,vm");

        // Serial output is appended: round N shows N greetings.
        let serial = &config.serial_log;
        let seen = common::eventually(WAIT, || {
            std::fs::read_to_string(serial)
                .map(|s| s.matches("stub kernel says hello").count() == round)
                .unwrap_or(false)
        })
        .await;
        assert!(seen, "serial log lacks round {round} output");

        process.kill().await.expect("kill");
        assert!(process.has_exited());
        assert_eq!(
            process.exit_info().and_then(|e| e.signal),
            Some(libc::SIGKILL)
        );
        assert!(common::reaped(pid), "QEMU left a zombie");
        assert!(!process.identity.is_alive());
        tokio::time::timeout(WAIT, qmp.closed())
            .await
            .expect("QMP closed");
    }
}

#[tokio::test]
async fn incoming_defer_waits_for_a_restore() {
    let dir = common::temp_dir();
    let mut guard = KillGuard::default();
    let mut config = stub_config(dir.path());
    config.incoming = Some("defer".into());
    config.start_paused = true;
    let process = QemuProcess::spawn(
        &common::qemu_binary(),
        &config,
        &dir.path().join("qemu.log"),
    )
    .await
    .expect("spawn");
    guard.watch(process.identity);
    let qmp = QmpClient::connect(&config.qmp_socket, WAIT)
        .await
        .expect("connect");
    let status = qmp.query_status().await.expect("status");
    assert_eq!(
        (status.running, status.status.as_str()),
        (false, "inmigrate")
    );
    qmp.quit().await.expect("quit");
    assert_eq!(process.wait_exit().await.code, Some(0));
}

#[tokio::test]
async fn bad_argument_reports_qemu_stderr() {
    let dir = common::temp_dir();
    let qmp = dir.path().join("qmp.sock");
    let mut args = common::paused_qemu_args(&qmp);
    args.push("-no-such-option".into());
    let started = Instant::now();
    let err = QemuProcess::spawn_with_args(
        &common::qemu_binary(),
        &args,
        &qmp,
        &dir.path().join("qemu.log"),
        WAIT,
    )
    .await
    .expect_err("QEMU must reject the option");
    assert!(started.elapsed() < Duration::from_secs(5));
    match &err {
        QemuError::EarlyExit { exit, stderr_tail } => {
            assert_eq!(exit, "exit code 1");
            assert!(stderr_tail.contains("-no-such-option"), "{stderr_tail}");
        }
        other => panic!("expected EarlyExit, got {other}"),
    }
}

#[tokio::test]
async fn a_file_that_is_not_a_kernel_is_reported_after_the_socket_appears() {
    let dir = common::temp_dir();
    let mut config = stub_config(dir.path());
    // An ELF without a PVH note: QEMU creates the QMP socket, then fails.
    std::fs::copy("/bin/true", &config.kernel).expect("copy /bin/true");
    let log = dir.path().join("qemu.log");
    std::fs::write(&log, "output of an earlier run\n").expect("old log");
    config.drives.clear();
    let err = QemuProcess::spawn(&common::qemu_binary(), &config, &log)
        .await
        .expect_err("not a kernel");
    let text = err.to_string();
    assert!(matches!(err, QemuError::EarlyExit { .. }), "{text}");
    assert!(text.contains("PVH ELF Note"), "{text}");
    assert!(
        !text.contains("earlier run"),
        "tail must cover this run only: {text}"
    );
}

#[tokio::test]
async fn missing_binary_is_a_spawn_error() {
    let dir = common::temp_dir();
    let qmp = dir.path().join("qmp.sock");
    let err = QemuProcess::spawn_with_args(
        Path::new("/nonexistent/qemu"),
        &[],
        &qmp,
        &dir.path().join("qemu.log"),
        WAIT,
    )
    .await
    .expect_err("no binary");
    assert!(matches!(err, QemuError::Spawn { .. }), "{err}");
}

/// Starts a paused QEMU that is not our child (its parent shell exits), as
/// left behind by an earlier agent.
fn orphan_qemu(dir: &Path) -> i32 {
    let qmp = dir.join("qmp.sock");
    let args: Vec<String> = common::paused_qemu_args(&qmp)
        .iter()
        .map(|a| format!("'{a}'"))
        .collect();
    let script = format!(
        "{} {} >/dev/null 2>&1 </dev/null & echo $!",
        common::qemu_binary().display(),
        args.join(" ")
    );
    let out = std::process::Command::new("sh")
        .args(["-c", &script])
        .output()
        .expect("run sh");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("pid from sh")
}

#[tokio::test]
async fn adopted_qemu_is_seen_exiting_when_killed_from_outside() {
    let dir = common::temp_dir();
    let mut guard = KillGuard::default();
    let pid = orphan_qemu(dir.path());
    let identity = ProcessIdentity::of(pid).expect("identity");
    guard.watch(identity);
    QmpClient::connect_retry(&dir.path().join("qmp.sock"), WAIT)
        .await
        .expect("orphan QEMU is up");

    let process = QemuProcess::adopt(identity).expect("adopt");
    assert!(!process.is_child());
    assert!(!process.has_exited());
    let waiter = process.clone();
    let wait = tokio::spawn(async move { waiter.wait_exit().await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!wait.is_finished(), "wait_exit resolved while QEMU runs");

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).expect("kill");
    let exit = tokio::time::timeout(WAIT, wait)
        .await
        .expect("wait_exit resolves")
        .expect("join");
    assert_eq!(exit, flotilla_qemu::ExitInfo::unknown());
    assert!(process.has_exited());
    assert!(matches!(
        QemuProcess::adopt(identity),
        Err(QemuError::ProcessGone { .. } | QemuError::IdentityMismatch { .. })
    ));
}

#[tokio::test]
async fn adopted_qemu_can_be_killed() {
    let dir = common::temp_dir();
    let mut guard = KillGuard::default();
    let pid = orphan_qemu(dir.path());
    let identity = ProcessIdentity::of(pid).expect("identity");
    guard.watch(identity);
    let process = QemuProcess::adopt(identity).expect("adopt");
    tokio::time::timeout(WAIT, process.kill())
        .await
        .expect("kill completes")
        .expect("kill");
    assert!(!identity.is_alive());
}

#[tokio::test]
async fn identity_rejects_a_different_start_time() {
    let mut child = tokio::process::Command::new("sleep")
        .arg("30")
        .kill_on_drop(true)
        .spawn()
        .expect("spawn sleep");
    let pid = child.id().expect("pid") as i32;
    let real = ProcessIdentity::of(pid).expect("identity");
    let recycled = ProcessIdentity {
        pid,
        start_time: real.start_time + 1,
    };
    assert!(real.is_alive());
    assert!(!recycled.is_alive());
    assert!(matches!(
        recycled.signal(Signal::SIGKILL),
        Err(QemuError::IdentityMismatch { .. })
    ));
    assert!(matches!(
        QemuProcess::adopt(recycled),
        Err(QemuError::IdentityMismatch { .. })
    ));
    assert!(
        real.is_alive(),
        "the mismatched signal must not be delivered"
    );

    real.signal(Signal::SIGTERM).expect("signal the real one");
    let status = child.wait().await.expect("wait");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGTERM)
    );
    assert!(matches!(
        real.signal(Signal::SIGTERM),
        Err(QemuError::ProcessGone { .. })
    ));
}

#[tokio::test]
async fn zombies_are_not_alive() {
    let mut child = std::process::Command::new("true")
        .spawn()
        .expect("spawn true");
    let identity = ProcessIdentity::of(child.id() as i32).expect("identity");
    // Not reaped yet: a zombie with the same start time.
    let dead = common::eventually(WAIT, || !identity.is_alive()).await;
    assert!(dead, "a zombie counts as alive");
    child.wait().expect("reap");
}

/// Dropping every handle and the whole runtime (what an agent crash or exit
/// amounts to for this process) must leave QEMU running.
#[test]
fn qemu_outlives_the_runtime_that_started_it() {
    let dir = common::temp_dir();
    let mut guard = KillGuard::default();
    let qmp = dir.path().join("qmp.sock");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let identity = runtime.block_on(async {
        let process = QemuProcess::spawn_with_args(
            &common::qemu_binary(),
            &common::paused_qemu_args(&qmp),
            &qmp,
            &dir.path().join("qemu.log"),
            WAIT,
        )
        .await
        .expect("spawn");
        process.identity
    });
    guard.watch(identity);
    drop(runtime);
    std::thread::sleep(Duration::from_millis(300));
    assert!(identity.is_alive(), "QEMU died with its runtime");

    // A "restarted agent" adopts it and shuts it down over QMP.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let process = QemuProcess::adopt(identity).expect("adopt");
        let client = QmpClient::connect(&qmp, WAIT).await.expect("connect");
        client.quit().await.expect("quit");
        tokio::time::timeout(WAIT, process.wait_exit())
            .await
            .expect("exit seen");
    });
    // Still our child at the OS level, so reap it here.
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(identity.pid), None);
    assert!(common::reaped(identity.pid));
}
