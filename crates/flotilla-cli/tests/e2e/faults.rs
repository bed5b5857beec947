//! Faults: QEMU killed from outside, the agent killed while VMs run.

use std::time::Duration;

use flotilla_testkit::TestHost;
use nix::sys::signal::Signal;

use crate::{assert_clean, exec, inspect, run_vm, wait_for};

#[test]
fn qemu_killed_from_outside_shows_crashed() {
    let host = TestHost::start().expect("test host");
    let vm = run_vm(&host, "victim");
    let pid = vm["pid"].as_i64().expect("pid") as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).expect("kill");

    let v = wait_for(&host, "victim", Duration::from_secs(10), |v| {
        v["state"] == "crashed"
    });
    assert!(v["pid"].is_null());
    assert!(
        v["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("unexpectedly"),
        "{v:#}"
    );
    assert!(
        host.taps().is_empty(),
        "tap left after crash: {:?}",
        host.taps()
    );
    assert!(
        !flotilla_testkit::process_alive(pid),
        "QEMU left as a zombie"
    );

    // A crashed VM starts again.
    host.cli_json::<serde_json::Value>(&["vm", "start", "victim", "--wait"]);
    assert_eq!(exec(&host, "victim", &["true"]).0, 0);
    host.cli_json::<serde_json::Value>(&["vm", "rm", "--force", "victim"]);
    assert_clean(&host);
}

#[test]
fn agent_killed_with_sigkill_readopts_running_vms() {
    let cache = std::path::Path::new(flotilla_qemu::DEFAULT_PROBE_CACHE);
    let modified = || std::fs::metadata(cache).and_then(|m| m.modified()).ok();
    let cache_before = modified();
    let mut host = TestHost::start().expect("test host");
    let vm = run_vm(&host, "survivor");
    let pid = vm["pid"].as_i64().expect("pid");
    // State that only this very guest has: a file in its tmpfs.
    let (code, _, _) = exec(&host, "survivor", &["sh", "-c", "echo alive > /tmp/mark"]);
    assert_eq!(code, 0);
    run_vm(&host, "stopped-one");
    host.cli_json::<serde_json::Value>(&["vm", "stop", "stopped-one"]);

    let (_, before) = host.api("GET", "/v1/host", None);
    host.kill_agent(Signal::SIGKILL);
    assert_eq!(
        host.qemu_pids(),
        vec![pid as i32],
        "QEMU must outlive the agent"
    );

    host.start_agent().expect("agent restarts");
    // The next agent runs VMs on the same accelerator; a decision its
    // first start remembered (or found remembered) for the boot spares it
    // the probe.
    let (_, after) = host.api("GET", "/v1/host", None);
    assert_eq!(after["accel"], before["accel"], "{before:#} {after:#}");
    let first_reason = before["accel_reason"].as_str().unwrap_or("");
    if first_reason.contains("remembered in") || modified() != cache_before {
        let reason = after["accel_reason"].as_str().unwrap_or("");
        assert!(reason.contains("remembered in"), "{reason}");
    }
    let v = wait_for(&host, "survivor", Duration::from_secs(30), |v| {
        v["guest_ready"] == true
    });
    assert_eq!(v["state"], "running");
    assert_eq!(v["pid"].as_i64(), Some(pid), "the same QEMU, not a new one");
    let (code, out, _) = exec(&host, "survivor", &["cat", "/tmp/mark"]);
    assert_eq!((code, out.as_str()), (0, "alive\n"));
    assert_eq!(inspect(&host, "stopped-one")["state"], "stopped");

    // A graceful agent stop (SIGTERM) also leaves VMs running.
    host.kill_agent(Signal::SIGTERM);
    assert_eq!(host.qemu_pids(), vec![pid as i32]);
    host.start_agent().expect("agent restarts");
    assert_eq!(exec(&host, "survivor", &["cat", "/tmp/mark"]).1, "alive\n");

    // A VM whose QEMU died while the agent was down is shown crashed.
    host.kill_agent(Signal::SIGKILL);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL).expect("kill");
    std::thread::sleep(Duration::from_millis(200));
    host.start_agent().expect("agent restarts");
    assert_eq!(inspect(&host, "survivor")["state"], "crashed");

    for name in ["survivor", "stopped-one"] {
        host.cli_json::<serde_json::Value>(&["vm", "rm", "--force", name]);
    }
    assert_clean(&host);
}

#[test]
fn a_guest_that_shuts_itself_down_is_stopped_not_crashed() {
    let host = TestHost::start().expect("test host");
    run_vm(&host, "quitter");
    // The command may not get its answer out before the guest goes down.
    let _ = host.cli(&["vm", "exec", "quitter", "--", "reboot", "-f"]);
    let v = wait_for(&host, "quitter", Duration::from_secs(20), |v| {
        v["state"] != "running"
    });
    assert_eq!(v["state"], "stopped", "{v:#}");
    assert!(host.taps().is_empty());
    host.cli_json::<serde_json::Value>(&["vm", "rm", "quitter"]);
    assert_clean(&host);
}
