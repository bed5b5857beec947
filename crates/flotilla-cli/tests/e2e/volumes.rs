//! Host volumes: data disks that outlive VMs, attached to one at a time.

use std::time::Duration;

use flotilla_testkit::TestHost;
use nix::sys::signal::Signal;
use serde_json::{json, Value};

use crate::{assert_clean, exec, inspect, stderr_of};

/// What the guest reads at the start of its second disk (/dev/vdb).
fn read_volume(host: &TestHost, vm: &str) -> String {
    let (code, out, err) = exec(
        host,
        vm,
        &[
            "sh",
            "-c",
            "dd if=/dev/vdb bs=512 count=1 2>/dev/null | tr -d '\\000'",
        ],
    );
    assert_eq!(code, 0, "{err}");
    out
}

fn write_volume(host: &TestHost, vm: &str, text: &str) {
    let script = format!("printf {text} | dd of=/dev/vdb bs=512 conv=sync,fsync 2>/dev/null");
    let (code, _, err) = exec(host, vm, &["sh", "-c", &script]);
    assert_eq!(code, 0, "{err}");
}

fn refused(out: &std::process::Output, needle: &str) {
    assert!(!out.status.success(), "accepted");
    assert!(stderr_of(out).contains(needle), "{}", stderr_of(out));
}

#[test]
fn volumes_outlive_their_vms_and_attach_to_one_at_a_time() {
    let mut host = TestHost::start().expect("test host");
    // Bad input: the field, what is accepted; nothing made.
    for (body, field) in [
        (json!({"name": "Home", "size_mib": 64}), "name"),
        (json!({"name": "home", "size_mib": 0}), "size_mib"),
        (json!({"name": "home"}), "size_mib"),
    ] {
        let (status, err) = host.api("POST", "/v1/volumes", Some(body));
        assert_eq!(status, 400, "{err}");
        assert!(err.to_string().contains(field), "{err}");
    }
    let (status, _) = host.api("GET", "/v1/volumes/nothing", None);
    assert_eq!(status, 404);

    let made: Value = host.cli_json(&["volume", "create", "home", "--size", "64M"]);
    assert_eq!(made["size_mib"], 64, "{made:#}");
    assert!(made.get("attached_to").is_none(), "{made:#}");
    refused(
        &host.cli(&["volume", "create", "home", "--size", "64M"]),
        "exists",
    );
    refused(
        &host.cli(&["vm", "run", "lost", "--volume", "nothing:data"]),
        "no volume named",
    );
    refused(
        &host.cli(&["vm", "run", "lost", "--volume", "a-volume-with-a-long-name"]),
        "VOLUME:DISK",
    );

    let one: Value = host.cli_json(&["vm", "run", "one", "--volume", "home:data", "--wait"]);
    let disk = &one["disks"][1];
    assert_eq!(
        (&disk["name"], &disk["volume"]),
        (&json!("data"), &json!("home")),
        "{one:#}"
    );
    write_volume(&host, "one", "written-by-one");
    assert_eq!(read_volume(&host, "one"), "written-by-one");

    // Attached: to one VM only, not removed, and not copied into a clone, a
    // snapshot or another host (each would make a VM without it).
    let listed: Vec<Value> = host.cli_json(&["volume", "ls"]);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["attached_to"], "one", "{listed:?}");
    refused(
        &host.cli(&["volume", "rm", "home"]),
        "attached to VM \"one\"",
    );
    refused(
        &host.cli(&["vm", "run", "two", "--volume", "home", "--wait"]),
        "attached to VM \"one\"",
    );
    refused(
        &host.cli(&["vm", "clone", "one", "copy"]),
        "volume \"home\"",
    );
    refused(
        &host.cli(&["snapshot", "create", "one", "snap"]),
        "volume \"home\"",
    );
    let vms: Vec<Value> = host.cli_json(&["vm", "ls"]);
    assert_eq!(vms.len(), 1, "nothing half made: {vms:?}");

    // A suspend leaves it as it is (the snapshot holds the VM's own disks)
    // and the resume attaches it again; so does an agent restart.
    let before = std::fs::read(host.data_path().join("data-volumes/home.qcow2")).unwrap();
    assert!(host.cli(&["vm", "suspend", "one"]).status.success());
    let after = std::fs::read(host.data_path().join("data-volumes/home.qcow2")).unwrap();
    assert!(before == after, "a suspend does not touch the volume");
    // Its layer holds its own disks only: no VM starts from it.
    let layer = inspect(&host, "one")["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    refused(
        &host.cli(&["vm", "run", "copy", "--from-snapshot", &layer]),
        "volume attached",
    );
    assert!(host
        .cli(&["vm", "resume", "one", "--wait"])
        .status
        .success());
    assert_eq!(read_volume(&host, "one"), "written-by-one");
    write_volume(&host, "one", "written-again");
    host.kill_agent(Signal::SIGKILL);
    host.start_agent().expect("agent restarted");
    assert_eq!(inspect(&host, "one")["disks"][1]["volume"], "home");
    refused(&host.cli(&["volume", "rm", "home"]), "attached");

    // The VM goes, the volume stays with what it wrote, for the next VM.
    assert!(host.cli(&["vm", "rm", "--force", "one"]).status.success());
    let kept: Value = host.cli_json(&["volume", "inspect", "home"]);
    assert!(kept.get("attached_to").is_none(), "{kept:#}");
    assert!(kept["allocated_mib"].as_u64().unwrap() >= 1, "{kept:#}");
    host.cli_json::<Value>(&["vm", "run", "two", "--volume", "home", "--wait"]);
    assert_eq!(read_volume(&host, "two"), "written-again");
    assert!(host.cli(&["vm", "rm", "--force", "two"]).status.success());

    assert!(host.cli(&["volume", "rm", "home"]).status.success());
    let listed: Vec<Value> = host.cli_json(&["volume", "ls"]);
    assert!(listed.is_empty(), "{listed:?}");
    let left: Vec<_> = std::fs::read_dir(host.data_path().join("data-volumes"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    std::thread::sleep(Duration::from_millis(100));
    assert_clean(&host);
}
