//! Boot, inspect, stop, start, remove; many VMs at once.

use std::time::Duration;

use flotilla_testkit::TestHost;

use crate::{assert_clean, exec, inspect, run_vm, wait_for};

#[test]
fn boots_a_guest_and_runs_uname() {
    let host = TestHost::start().expect("test host");
    let vm = run_vm(&host, "hello");
    assert_eq!(vm["state"], "running");
    assert_eq!(vm["guest_ready"], true);
    let (code, out, _) = exec(&host, "hello", &["uname", "-a"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("Linux hello "), "{out}");

    let info = inspect(&host, "hello");
    let accel = info["accel"].as_str().unwrap_or("");
    assert!(accel == "tcg" || accel == "kvm", "{info:#}");
    assert_eq!(info["qemu_status"], "running");
    assert!(info["pid"].as_i64().unwrap_or(0) > 0);
    assert!(info["guest_boot_ms"].as_u64().is_some(), "{info:#}");
    // The guest's own report, through its agent.
    let ip = info["nics"][0]["ip"].as_str().unwrap_or("").to_string();
    assert_eq!(info["guest"]["hostname"], "hello");
    assert!(
        info["guest"]["mem_total_kib"].as_u64().unwrap_or(0) > 100_000,
        "{info:#}"
    );
    let addrs = info["guest"]["addresses"].to_string();
    assert!(addrs.contains(&format!("eth0 {ip}/24")), "{addrs}");
    assert!(info["nics"][0]["ip"]
        .as_str()
        .unwrap_or("")
        .starts_with("10.77.0."));

    // The console log shows the guest booting.
    let logs = host.cli(&["vm", "logs", "hello"]);
    assert!(logs.status.success());
    assert!(!logs.stdout.is_empty());

    // The human table lists it.
    let ls = host.cli(&["vm", "ls"]);
    let table = String::from_utf8_lossy(&ls.stdout);
    assert!(
        table.contains("NAME") && table.contains("hello") && table.contains("running"),
        "{table}"
    );

    host.cli_json::<serde_json::Value>(&["vm", "rm", "--force", "hello"]);
    assert_clean(&host);
}

#[test]
fn stop_start_and_remove() {
    let host = TestHost::start().expect("test host");
    run_vm(&host, "cycle");
    // Written to the root disk: survives a stop and start.
    let (code, _, err) = exec(
        &host,
        "cycle",
        &["sh", "-c", "echo kept > /root/marker && sync"],
    );
    assert_eq!(code, 0, "{err}");

    let stopped: serde_json::Value = host.cli_json(&["vm", "stop", "cycle"]);
    assert_eq!(stopped["state"], "stopped");
    assert!(stopped["pid"].is_null());
    assert!(host.qemu_pids().is_empty());
    assert!(
        host.taps().is_empty(),
        "tap left after stop: {:?}",
        host.taps()
    );

    let started: serde_json::Value = host.cli_json(&["vm", "start", "cycle", "--wait"]);
    assert_eq!(started["state"], "running");
    let (code, out, _) = exec(&host, "cycle", &["cat", "/root/marker"]);
    assert_eq!((code, out.as_str()), (0, "kept\n"));

    // A running VM is not removed without --force.
    let rm = host.cli(&["vm", "rm", "cycle"]);
    assert!(!rm.status.success());
    assert!(
        crate::stderr_of(&rm).contains("running"),
        "{}",
        crate::stderr_of(&rm)
    );

    host.cli_json::<serde_json::Value>(&["vm", "stop", "cycle", "--force"]);
    host.cli_json::<serde_json::Value>(&["vm", "rm", "cycle"]);
    let (status, _) = host.api("GET", "/v1/vms/cycle", None);
    assert_eq!(status, 404);
    assert_clean(&host);
}

#[test]
fn ten_vms_at_once() {
    let host = TestHost::start().expect("test host");
    let names: Vec<String> = (0..10).map(|i| format!("many-{i}")).collect();
    std::thread::scope(|s| {
        for name in &names {
            let host = &host;
            s.spawn(move || {
                run_vm(host, name);
            });
        }
    });
    let vms: Vec<serde_json::Value> = host.cli_json(&["vm", "ls"]);
    assert_eq!(vms.len(), 10);
    let mut ips: Vec<String> = vms
        .iter()
        .map(|v| v["nics"][0]["ip"].as_str().unwrap_or("").to_string())
        .collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 10, "addresses must be unique");
    for name in &names {
        let (code, out, _) = exec(&host, name, &["hostname"]);
        assert_eq!((code, out.trim()), (0, name.as_str()));
    }
    assert_eq!(host.qemu_pids().len(), 10);
    std::thread::scope(|s| {
        for name in &names {
            let host = &host;
            s.spawn(move || host.cli_json::<serde_json::Value>(&["vm", "rm", "--force", name]));
        }
    });
    assert_clean(&host);
}

#[test]
fn create_without_start_then_start() {
    let host = TestHost::start().expect("test host");
    let vm: serde_json::Value = host.cli_json(&[
        "vm",
        "run",
        "later",
        "--no-start",
        "--disk",
        "data:64M",
        "--nics",
        "2",
    ]);
    assert_eq!(vm["state"], "stopped");
    assert!(host.qemu_pids().is_empty());
    host.cli_json::<serde_json::Value>(&["vm", "start", "later"]);
    let v = wait_for(&host, "later", Duration::from_secs(60), |v| {
        v["guest_ready"] == true
    });
    assert_eq!(v["disks"].as_array().map(|d| d.len()), Some(2));
    // The extra disk is a block device in the guest.
    let (code, out, _) = exec(&host, "later", &["cat", "/sys/block/vdb/size"]);
    assert_eq!(code, 0);
    assert_eq!(out.trim(), (64 * 1024 * 1024 / 512).to_string());
    // The second NIC has its address too.
    let ip1 = v["nics"][1]["ip"].as_str().expect("second nic").to_string();
    let (_, addrs, _) = exec(&host, "later", &["ip", "-4", "-o", "addr", "show", "eth1"]);
    assert!(addrs.contains(&ip1), "{addrs}");
    host.cli_json::<serde_json::Value>(&["vm", "rm", "--force", "later"]);
    assert_clean(&host);
}
