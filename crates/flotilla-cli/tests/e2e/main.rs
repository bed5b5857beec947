//! End-to-end tests: real agents in network namespaces, real QEMU, real
//! guests. One test binary; every test makes its own host and cleans up
//! through `TestHost`'s Drop, also when it fails.

mod bad_input;
mod clone;
mod control;
mod exec;
mod faults;
mod images;
mod lifecycle;
mod migrate;
mod network;
mod suspend;
mod up;
mod volumes;

use std::time::{Duration, Instant};

use flotilla_testkit::TestHost;
use serde_json::Value;

/// Runs a VM with defaults and waits for its guest agent.
pub fn run_vm(host: &TestHost, name: &str) -> Value {
    host.cli_json(&["vm", "run", name, "--wait"])
}

/// Runs a command in the guest; returns (exit code, stdout, stderr).
pub fn exec(host: &TestHost, name: &str, cmd: &[&str]) -> (i64, String, String) {
    let mut args = vec!["vm", "exec", name, "--"];
    args.extend_from_slice(cmd);
    let v: Value = host.cli_json(&args);
    (
        v["exit_code"].as_i64().unwrap_or(-1),
        v["stdout"].as_str().unwrap_or_default().to_string(),
        v["stderr"].as_str().unwrap_or_default().to_string(),
    )
}

pub fn inspect(host: &TestHost, name: &str) -> Value {
    host.cli_json(&["vm", "inspect", name])
}

/// Polls `inspect` until `pred` holds, or panics after `timeout`.
pub fn wait_for(
    host: &TestHost,
    name: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let v = inspect(host, name);
        if pred(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "condition not met within {timeout:?}: {v:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls until `done` holds or `timeout` has passed.
fn settle_within(timeout: Duration, done: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Nothing of the VMs is left: no QEMU, no tap, no VM directory, no socket.
pub fn assert_clean(host: &TestHost) {
    // QEMUs exit, and taps set aside are deleted, in the background.
    settle_within(Duration::from_secs(5), || host.qemu_pids().is_empty());
    assert!(
        host.qemu_pids().is_empty(),
        "stray QEMU: {:?}",
        host.qemu_pids()
    );
    assert!(host.taps().is_empty(), "stray taps: {:?}", host.taps());
    settle_within(Duration::from_secs(5), || host.retired_taps().is_empty());
    assert!(
        host.retired_taps().is_empty(),
        "retired taps never deleted: {:?}",
        host.retired_taps()
    );
    assert!(
        host.vm_dirs().is_empty(),
        "stray VM dirs: {:?}",
        host.vm_dirs()
    );
    assert!(
        host.vm_sockets().is_empty(),
        "stray sockets: {:?}",
        host.vm_sockets()
    );
}

pub fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}
