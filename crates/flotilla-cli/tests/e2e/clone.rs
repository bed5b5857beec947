//! Clones of running VMs, named snapshots, VMs started from snapshots and
//! from an image's base snapshot (issue 3).

use std::collections::HashSet;

use flotilla_testkit::TestHost;
use serde_json::Value;

use crate::{assert_clean, exec, run_vm};

/// What the guest itself says it is: hostname, machine-id, eth0 MAC and IPv4.
fn guest_identity(host: &TestHost, vm: &str) -> [String; 4] {
    let (code, out, err) = exec(
        host,
        vm,
        &[
            "sh",
            "-c",
            "hostname; cat /etc/machine-id; cat /sys/class/net/eth0/address; ip -o -4 addr show dev eth0 | awk '{print $4}'",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let lines: Vec<String> = out.lines().map(str::to_string).collect();
    assert_eq!(lines.len(), 4, "{out}");
    [
        lines[0].clone(),
        lines[1].clone(),
        lines[2].clone(),
        lines[3].clone(),
    ]
}

fn write(host: &TestHost, vm: &str, script: &str) {
    let (code, _, err) = exec(host, vm, &["sh", "-c", script]);
    assert_eq!(code, 0, "{script}: {err}");
}

fn read(host: &TestHost, vm: &str, path: &str) -> String {
    exec(
        host,
        vm,
        &[
            "sh",
            "-c",
            &format!("cat {path} 2>/dev/null || echo missing"),
        ],
    )
    .1
    .trim()
    .to_string()
}

fn snapshots(host: &TestHost) -> Vec<Value> {
    host.cli_json::<Vec<Value>>(&["snapshot", "ls"])
}

#[test]
fn clones_get_their_own_identity_and_their_own_writes() {
    let host = TestHost::start().expect("test host");
    run_vm(&host, "src");
    write(
        &host,
        "src",
        "echo before > /root/disk.txt && head -c 2000000 /dev/urandom > /tmp/mem.bin && md5sum /tmp/mem.bin > /root/mem.md5 && sync",
    );

    let c1: Value = host.cli_json(&["vm", "clone", "src", "c1"]);
    assert_eq!(c1["vm"]["state"], "running", "{c1:#}");
    let pause = c1["source_pause_ms"].as_u64().expect("pause");
    assert!(pause > 0 && pause < 10_000, "source paused {pause} ms");
    let c2: Value = host.cli_json(&["vm", "clone", "src", "c2"]);
    assert_eq!(c2["vm"]["state"], "running", "{c2:#}");
    let src: Value = host.cli_json(&["vm", "inspect", "src"]);
    assert_eq!(src["state"], "running", "the source runs on");

    // The clones start with the source's memory and disk as they were.
    for vm in ["c1", "c2"] {
        assert_eq!(read(&host, vm, "/root/disk.txt"), "before");
        let (code, out, _) = exec(&host, vm, &["md5sum", "-c", "/root/mem.md5"]);
        assert_eq!(code, 0, "{vm}: tmpfs contents: {out}");
    }

    // Their RNGs were reseeded apart: the first bytes each reads differ.
    let random = |vm: &str| exec(&host, vm, &["sh", "-c", "head -c 32 /dev/urandom | md5sum"]).1;
    assert_ne!(random("c1"), random("c2"), "clones share their RNG state");

    // Writes stay where they were made.
    write(&host, "c1", "echo from-c1 > /root/c1.txt && sync");
    write(&host, "src", "echo from-src > /root/src.txt && sync");
    assert_eq!(read(&host, "src", "/root/c1.txt"), "missing");
    assert_eq!(read(&host, "c2", "/root/c1.txt"), "missing");
    assert_eq!(read(&host, "c1", "/root/src.txt"), "missing");
    assert_eq!(read(&host, "c1", "/root/c1.txt"), "from-c1");

    // Every VM is its own: hostname, machine-id, MAC and IP all differ, and
    // each matches what the agent reports.
    let mut seen: [HashSet<String>; 4] = Default::default();
    for vm in ["src", "c1", "c2"] {
        let id = guest_identity(&host, vm);
        let info: Value = host.cli_json(&["vm", "inspect", vm]);
        assert_eq!(id[0], vm, "hostname");
        assert_eq!(id[1].len(), 32, "machine-id {:?}", id[1]);
        assert_eq!(id[2], info["nics"][0]["mac"].as_str().unwrap(), "{vm} MAC");
        assert_eq!(
            id[3],
            format!(
                "{}/{}",
                info["nics"][0]["ip"].as_str().unwrap(),
                info["nics"][0]["prefix_len"]
            ),
            "{vm} IP"
        );
        for (set, value) in seen.iter_mut().zip(id.iter()) {
            assert!(
                set.insert(value.clone()),
                "{vm} shares {value} with another VM"
            );
        }
    }
    // And the network sees them as three hosts.
    let ip_of = |vm: &str| {
        host.cli_json::<Value>(&["vm", "inspect", vm])["nics"][0]["ip"]
            .as_str()
            .unwrap()
            .to_string()
    };
    for (from, to) in [("c1", "src"), ("c1", "c2"), ("src", "c2")] {
        let (code, out, _) = exec(&host, from, &["ping", "-c", "1", "-W", "3", &ip_of(to)]);
        assert_eq!(code, 0, "{from} -> {to}: {out}");
    }

    // The clone layer cannot go while the clones use it.
    let layer = c1["snapshot"].as_str().unwrap().to_string();
    let info = snapshots(&host)
        .into_iter()
        .find(|s| s["id"] == layer.as_str())
        .expect("clone layer listed");
    assert_eq!(info["kind"], "clone");
    let (status, body) = host.api("DELETE", &format!("/v1/snapshots/{layer}"), None);
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("vm:c1"),
        "{body}"
    );

    for vm in ["c1", "c2", "src"] {
        let out = host.cli(&["vm", "rm", "--force", vm]);
        assert!(out.status.success());
    }
    assert_clean(&host);
    assert!(
        snapshots(&host).is_empty(),
        "layers left: {:?}",
        snapshots(&host)
    );
}

#[test]
fn a_read_only_clone_reads_the_source_volume_and_never_writes_it() {
    let host = TestHost::start().expect("test host");
    run_vm(&host, "src");
    write(&host, "src", "echo shared > /root/data.txt && sync");
    let ro: Value = host.cli_json(&["vm", "clone", "src", "ro", "--disk", "read-only"]);
    assert_eq!(ro["vm"]["state"], "running", "{ro:#}");
    assert_eq!(read(&host, "ro", "/root/data.txt"), "shared");
    // The guest may try; nothing reaches a disk.
    let _ = exec(
        &host,
        "ro",
        &[
            "sh",
            "-c",
            "head -c 1000000 /dev/urandom > /root/new.bin; sync",
        ],
    );
    let overlay = host.data_path().join("vms/ro/root.qcow2");
    let map = std::process::Command::new("qemu-img")
        .args(["map", "--output=json", "-U"])
        .arg(&overlay)
        .output()
        .expect("qemu-img map");
    let map: Vec<Value> = serde_json::from_slice(&map.stdout).expect("map json");
    assert!(
        !map.iter().any(|m| m["depth"] == 0 && m["data"] == true),
        "the read-only clone wrote to its disk: {map:?}"
    );
    assert_eq!(read(&host, "src", "/root/new.bin"), "missing");
    for vm in ["ro", "src"] {
        assert!(host.cli(&["vm", "rm", "--force", vm]).status.success());
    }
    assert_clean(&host);
}

#[test]
fn named_snapshots_start_vms_and_are_kept_while_used() {
    let host = TestHost::start().expect("test host");
    run_vm(&host, "src");
    write(
        &host,
        "src",
        "echo one > /root/step.txt && echo one > /tmp/step.txt && sync",
    );
    let made: Value = host.cli_json(&["snapshot", "create", "src", "one"]);
    assert!(made["pause_ms"].as_u64().is_some(), "{made:#}");
    assert_eq!(made["snapshot"]["name"], "one");
    assert_eq!(made["snapshot"]["kind"], "named");
    write(
        &host,
        "src",
        "echo two > /root/step.txt && echo two > /tmp/step.txt && sync",
    );

    // Same name twice: refused.
    let (status, body) = host.api(
        "POST",
        "/v1/snapshots",
        Some(serde_json::json!({"vm": "src", "name": "one"})),
    );
    assert_eq!(status, 409, "{body}");

    // While a snapshot is being taken, asking for it says so (409), never
    // "no such snapshot": whoever settles records by the answer (the
    // control plane) must not take a long capture for a failed one.
    write(&host, "src", "head -c 30000000 /dev/urandom > /tmp/fill");
    let answers = std::thread::scope(|s| {
        let taking = s.spawn(|| {
            host.api(
                "POST",
                "/v1/snapshots",
                Some(serde_json::json!({"vm": "src", "name": "taking"})),
            )
        });
        let mut answers = Vec::new();
        loop {
            let done = taking.is_finished();
            let (status, _) = host.api("GET", "/v1/snapshots/taking", None);
            if answers.last() != Some(&status) {
                answers.push(status);
            }
            if status == 200 || done {
                break;
            }
        }
        let (status, body) = taking.join().unwrap();
        assert_eq!(status, 201, "{body}");
        answers
    });
    let first_busy = answers.iter().position(|s| *s == 409);
    assert!(first_busy.is_some(), "never seen being taken: {answers:?}");
    assert_eq!(
        answers[first_busy.unwrap()..],
        [409, 200],
        "being taken, then there: {answers:?}"
    );
    assert!(host.cli(&["snapshot", "rm", "taking"]).status.success());
    write(&host, "src", "rm /tmp/fill");

    // A VM from the snapshot has the state of its moment, its own identity.
    let vm: Value = host.cli_json(&["vm", "run", "again", "--from-snapshot", "one", "--wait"]);
    assert_eq!(vm["state"], "running", "{vm:#}");
    assert_eq!(read(&host, "again", "/root/step.txt"), "one");
    assert_eq!(read(&host, "again", "/tmp/step.txt"), "one");
    assert_eq!(read(&host, "src", "/tmp/step.txt"), "two");
    assert_eq!(guest_identity(&host, "again")[0], "again");

    let inspect: Value = host.cli_json(&["snapshot", "inspect", "one"]);
    assert!(
        inspect["used_by"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h == "vm:again"),
        "{inspect:#}"
    );
    // In use by a running VM: refused, and kept.
    let out = host.cli(&["snapshot", "rm", "one"]);
    assert!(!out.status.success());
    assert!(
        crate::stderr_of(&out).contains("in use by"),
        "{}",
        crate::stderr_of(&out)
    );
    // A different shape from the snapshot's: refused with the reason.
    let out = host.cli(&[
        "vm",
        "run",
        "big",
        "--from-snapshot",
        "one",
        "--memory",
        "512M",
    ]);
    assert!(!out.status.success());
    assert!(
        crate::stderr_of(&out).contains("MiB"),
        "{}",
        crate::stderr_of(&out)
    );
    // Unknown snapshot: 404.
    let (status, _) = host.api("GET", "/v1/snapshots/nope", None);
    assert_eq!(status, 404);

    assert!(host.cli(&["vm", "rm", "--force", "again"]).status.success());
    let out = host.cli(&["snapshot", "rm", "one"]);
    assert!(out.status.success(), "{}", crate::stderr_of(&out));
    assert!(snapshots(&host).iter().all(|s| s["name"] != "one"));
    assert!(host.cli(&["vm", "rm", "--force", "src"]).status.success());
    assert_clean(&host);
}

#[test]
fn vms_start_from_the_image_base_snapshot_and_diff_against_it() {
    let host = TestHost::start().expect("test host");
    // The reserved prefix is the agent's.
    let out = host.cli(&["vm", "run", "flotilla-base-x"]);
    assert!(!out.status.success());
    assert!(
        crate::stderr_of(&out).contains("reserved"),
        "{}",
        crate::stderr_of(&out)
    );

    let a: Value = host.cli_json(&["vm", "run", "a", "--from-snapshot", "--wait"]);
    assert_eq!(a["state"], "running", "{a:#}");
    let b: Value = host.cli_json(&["vm", "run", "b", "--from-snapshot", "--wait"]);
    assert_eq!(b["state"], "running", "{b:#}");
    let ids_a = guest_identity(&host, "a");
    let ids_b = guest_identity(&host, "b");
    for i in 0..4 {
        assert_ne!(ids_a[i], ids_b[i], "a and b share {}", ids_a[i]);
    }
    let listed: Vec<Value> = host.cli_json(&["vm", "ls"]);
    assert_eq!(listed.len(), 2, "the base VM is gone: {listed:?}");
    let base = snapshots(&host)
        .into_iter()
        .find(|s| s["kind"] == "base")
        .expect("a base snapshot");
    let base_id = base["id"].as_str().unwrap().to_string();
    // Asked for explicitly, the same shape's base is the one made on first use.
    let again: Value = host.cli_json(&["image", "base-snapshot", "default"]);
    assert_eq!(again["id"], base_id.as_str(), "{again:#}");
    assert_eq!(again["kind"], "base");

    // First snapshots diff against the base: of a VM started from it, and
    // of a VM that booted.
    run_vm(&host, "booted");
    for vm in ["a", "booted"] {
        let s: Value = host.cli_json(&["vm", "suspend", vm]);
        let layer = s["snapshot"].as_str().unwrap();
        let info: Value = host.cli_json(&["snapshot", "inspect", layer]);
        assert_eq!(info["parent"], base_id.as_str(), "{vm}: {info:#}");
        let r: Value = host.cli_json(&["vm", "resume", vm, "--wait"]);
        assert_eq!(r["state"], "running");
        assert_eq!(guest_identity(&host, vm)[0], vm);
    }
    for vm in ["a", "b", "booted"] {
        assert!(host.cli(&["vm", "rm", "--force", vm]).status.success());
    }
    assert_clean(&host);
    // The base goes with its image.
    assert!(!snapshots(&host).is_empty());
    let out = host.cli(&["image", "rm", "default"]);
    assert!(out.status.success(), "{}", crate::stderr_of(&out));
    assert!(snapshots(&host).is_empty(), "{:?}", snapshots(&host));
    let pinned = std::fs::read_dir(host.data_path().join("snapshots/pinned"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(pinned, 0, "pinned files left");
}

#[test]
fn a_clones_disk_moves_to_its_own_volume_while_it_runs() {
    let mut host = TestHost::start().expect("test host");
    run_vm(&host, "src");
    write(&host, "src", "echo from-src > /root/a.txt && sync");
    let c: Value = host.cli_json(&["vm", "clone", "src", "c"]);
    assert_eq!(c["vm"]["state"], "running", "{c:#}");
    write(&host, "c", "echo from-c > /root/c.txt && sync");

    let moved: Value = host.cli_json(&["vm", "move-disk", "c", "--volume", "fast"]);
    let path = moved["disks"][0]["path"].as_str().unwrap().to_string();
    assert!(path.contains("/volumes/fast/"), "{moved:#}");
    assert!(moved["disks"][0]["backing"].is_null(), "{moved:#}");
    let info = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json", &path])
        .output()
        .expect("qemu-img info");
    let info: Value = serde_json::from_slice(&info.stdout).expect("info json");
    assert!(info["backing-filename"].is_null(), "standalone: {info:#}");
    // The guest never noticed, and writes land in the new volume.
    assert_eq!(read(&host, "c", "/root/a.txt"), "from-src");
    write(&host, "c", "echo after-move > /root/after.txt && sync");

    // The source goes; the clone boots from its own disk alone.
    assert!(host.cli(&["vm", "rm", "--force", "src"]).status.success());
    assert!(host.cli(&["vm", "stop", "c"]).status.success());
    let started: Value = host.cli_json(&["vm", "start", "c", "--wait"]);
    assert_eq!(started["state"], "running", "{started:#}");
    assert_eq!(read(&host, "c", "/root/a.txt"), "from-src");
    assert_eq!(read(&host, "c", "/root/c.txt"), "from-c");
    assert_eq!(read(&host, "c", "/root/after.txt"), "after-move");
    assert_eq!(guest_identity(&host, "c")[0], "c");

    // The agent dies in the middle of a move: the VM runs on, on one disk
    // or the other, and the other file is gone.
    for delay_ms in [50u64, 300] {
        let before: Value = host.cli_json(&["vm", "inspect", "c"]);
        let old = before["disks"][0]["path"].as_str().unwrap().to_string();
        std::thread::scope(|s| {
            let endpoint = host.endpoint.clone();
            let http = host.http_client();
            let token = host.agent_token();
            s.spawn(move || {
                let _ = http
                    .post(format!("{endpoint}/v1/vms/c/move-disk"))
                    .bearer_auth(&token)
                    .json(&serde_json::json!({ "volume": "other" }))
                    .send();
            });
            std::thread::sleep(std::time::Duration::from_millis(delay_ms));
            host.kill_agent(nix::sys::signal::Signal::SIGKILL);
        });
        host.start_agent().expect("agent restarts");
        let after = crate::wait_for(&host, "c", std::time::Duration::from_secs(30), |v| {
            v["guest_ready"] == true
        });
        assert_eq!(after["state"], "running", "{after:#}");
        let now = after["disks"][0]["path"].as_str().unwrap().to_string();
        let volume_files: Vec<_> = std::fs::read_dir(host.data_path().join("volumes/other"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        if now == old {
            assert!(volume_files.is_empty(), "undone, yet left {volume_files:?}");
        } else {
            assert!(
                !std::path::Path::new(&old).exists(),
                "finished, yet {old} is left"
            );
        }
        write(
            &host,
            "c",
            &format!("echo {delay_ms} > /root/after-kill.txt && sync"),
        );
        assert_eq!(
            read(&host, "c", "/root/after-kill.txt"),
            delay_ms.to_string()
        );
    }
    let path = host.cli_json::<Value>(&["vm", "inspect", "c"])["disks"][0]["path"]
        .as_str()
        .unwrap()
        .to_string();

    // A suspended VM's disk lives in its snapshot: refused with a hint.
    let (status, body) = host.api(
        "POST",
        "/v1/vms/nope/move-disk",
        Some(serde_json::json!({})),
    );
    assert_eq!(status, 404, "{body}");
    assert!(host.cli(&["vm", "rm", "--force", "c"]).status.success());
    assert!(
        !std::path::Path::new(&path).exists(),
        "the volume file goes with the VM"
    );
    assert_clean(&host);
}

#[test]
fn bad_clone_requests_are_refused_and_a_killed_agent_leaves_the_source_running() {
    let mut host = TestHost::start().expect("test host");
    run_vm(&host, "src");
    write(
        &host,
        "src",
        "head -c 30000000 /dev/urandom > /tmp/big.bin && md5sum /tmp/big.bin > /root/sum",
    );
    for (path, body, want) in [
        ("/v1/vms/src/clone", serde_json::json!({"name": "src"}), 409),
        (
            "/v1/vms/src/clone",
            serde_json::json!({"name": "Bad_Name"}),
            400,
        ),
        (
            "/v1/vms/src/clone",
            serde_json::json!({"name": "x", "disk": "floppy"}),
            400,
        ),
        ("/v1/vms/nope/clone", serde_json::json!({"name": "x"}), 404),
        (
            "/v1/vms/src/clone",
            serde_json::json!({"name": "flotilla-base-x"}),
            400,
        ),
        (
            "/v1/vms/src/clone",
            serde_json::json!({"name": "x", "tags": {"a b": "c"}}),
            400,
        ),
    ] {
        let (status, b) = host.api("POST", path, Some(body.clone()));
        assert_eq!(status, want, "{body} -> {b}");
        assert!(b["error"]["message"].is_string(), "{b}");
    }
    assert_eq!(host.qemu_pids().len(), 1, "nothing started");

    // Two clones under one name at once: one is made, the other refused.
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let calls: Vec<_> = (0..2)
            .map(|_| {
                let endpoint = host.endpoint.clone();
                let http = host.http_client();
                let token = host.agent_token();
                s.spawn(move || {
                    http.post(format!("{endpoint}/v1/vms/src/clone"))
                        .bearer_auth(&token)
                        .json(&serde_json::json!({ "name": "twin" }))
                        .send()
                        .map(|r| r.status().as_u16())
                        .unwrap_or(0)
                })
            })
            .collect();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    });
    let mut sorted = statuses.clone();
    sorted.sort();
    assert_eq!(sorted, vec![201, 409], "{statuses:?}");
    assert_ne!(read(&host, "twin", "/root/sum"), "missing");
    assert!(host.cli(&["vm", "rm", "--force", "twin"]).status.success());

    // The agent dies while it clones: the source runs on, whole.
    for delay_ms in [100u64, 300] {
        let name = format!("c{delay_ms}");
        std::thread::scope(|s| {
            let endpoint = host.endpoint.clone();
            let http = host.http_client();
            let token = host.agent_token();
            let name = name.clone();
            s.spawn(move || {
                let _ = http
                    .post(format!("{endpoint}/v1/vms/src/clone"))
                    .bearer_auth(&token)
                    .json(&serde_json::json!({ "name": name }))
                    .send();
            });
            std::thread::sleep(std::time::Duration::from_millis(delay_ms));
            host.kill_agent(nix::sys::signal::Signal::SIGKILL);
        });
        host.start_agent().expect("agent restarts");
        let src = crate::wait_for(&host, "src", std::time::Duration::from_secs(30), |v| {
            v["guest_ready"] == true
        });
        assert_eq!(src["state"], "running", "{src:#}");
        assert_eq!(src["qemu_status"], "running", "not left paused: {src:#}");
        let (code, out, _) = exec(&host, "src", &["md5sum", "-c", "/root/sum"]);
        assert_eq!(code, 0, "after a kill {delay_ms} ms in: {out}");
        // A clone that got far enough may exist; remove it like any VM.
        let _ = host.cli(&["vm", "rm", "--force", &name]);
    }
    assert!(host.cli(&["vm", "rm", "--force", "src"]).status.success());
    assert_clean(&host);
}

#[test]
fn a_chain_of_three_snapshots_restores_each_step() {
    let host = TestHost::start().expect("test host");
    run_vm(&host, "src");
    let mut snaps: Vec<Value> = Vec::new();
    for step in 1..=3 {
        write(
            &host,
            "src",
            &format!(
                "echo {step} > /root/step{step}.txt && head -c 500000 /dev/urandom > /tmp/m{step} && md5sum /tmp/m* /root/step*.txt > /root/sums{step} && sync"
            ),
        );
        let made: Value = host.cli_json(&["snapshot", "create", "src", &format!("s{step}")]);
        snaps.push(made["snapshot"].clone());
    }
    // Each is a diff against the one before, far smaller than the first.
    assert!(snaps[0]["parent"].is_null(), "{:#}", snaps[0]);
    for i in 1..3 {
        assert_eq!(snaps[i]["parent"], snaps[i - 1]["id"], "{:#}", snaps[i]);
        assert_eq!(snaps[i]["chain_length"], i + 1);
        let (small, first) = (
            snaps[i]["stored_bytes"].as_u64().unwrap(),
            snaps[0]["stored_bytes"].as_u64().unwrap(),
        );
        assert!(small * 2 < first, "layer {i}: {small} bytes vs {first}");
    }
    // Every step comes back as it was: its memory and disk, nothing later.
    for step in 1..=3 {
        let vm: Value = host.cli_json(&[
            "vm",
            "run",
            "back",
            "--from-snapshot",
            &format!("s{step}"),
            "--wait",
        ]);
        assert_eq!(vm["state"], "running", "{vm:#}");
        let (code, out, _) = exec(
            &host,
            "back",
            &["md5sum", "-c", &format!("/root/sums{step}")],
        );
        assert_eq!(code, 0, "step {step}: {out}");
        if step < 3 {
            let later = format!("/root/step{}.txt", step + 1);
            assert_eq!(read(&host, "back", &later), "missing", "step {step}");
        }
        assert!(host.cli(&["vm", "rm", "--force", "back"]).status.success());
    }
    // The first cannot go while the others are diffs against it.
    let out = host.cli(&["snapshot", "rm", "s1"]);
    assert!(!out.status.success());
    assert!(
        crate::stderr_of(&out).contains("later snapshot"),
        "{}",
        crate::stderr_of(&out)
    );
    for name in ["s3", "s2", "s1"] {
        let out = host.cli(&["snapshot", "rm", name]);
        assert!(out.status.success(), "{name}: {}", crate::stderr_of(&out));
    }
    assert!(host.cli(&["vm", "rm", "--force", "src"]).status.success());
    assert_clean(&host);
    assert!(snapshots(&host).is_empty(), "{:?}", snapshots(&host));
}

#[test]
fn data_disks_travel_with_suspends_and_clones() {
    let host = TestHost::start().expect("test host");
    let vm: Value = host.cli_json(&["vm", "run", "src", "--disk", "data:64M", "--wait"]);
    assert_eq!(vm["disks"].as_array().map(|d| d.len()), Some(2), "{vm:#}");
    let sum = |vm: &str| {
        exec(
            &host,
            vm,
            &[
                "sh",
                "-c",
                "dd if=/dev/vdb bs=1M count=2 2>/dev/null | md5sum",
            ],
        )
        .1
    };
    write(&host, "src", "head -c 2097152 /dev/urandom > /tmp/blk && dd if=/tmp/blk of=/dev/vdb bs=1M conv=fsync 2>/dev/null");
    let written = sum("src");

    // Suspended and resumed: the data disk is in the layer and comes back.
    let s: Value = host.cli_json(&["vm", "suspend", "src"]);
    let layer = s["snapshot"].as_str().unwrap().to_string();
    assert!(
        host.data_path()
            .join("snapshots/layers")
            .join(&layer)
            .join("disk-data.qcow2")
            .exists(),
        "the layer holds the data disk"
    );
    host.cli_json::<Value>(&["vm", "resume", "src", "--wait"]);
    assert_eq!(sum("src"), written);

    // A clone has its own copy-on-write data disk.
    let c: Value = host.cli_json(&["vm", "clone", "src", "copy"]);
    assert_eq!(
        c["vm"]["disks"].as_array().map(|d| d.len()),
        Some(2),
        "{c:#}"
    );
    assert_eq!(sum("copy"), written);
    write(
        &host,
        "copy",
        "dd if=/dev/zero of=/dev/vdb bs=1M count=2 conv=fsync 2>/dev/null",
    );
    assert_ne!(sum("copy"), written);
    assert_eq!(sum("src"), written, "the source's data disk is untouched");

    // And from a named snapshot.
    host.cli_json::<Value>(&["snapshot", "create", "src", "with-data"]);
    host.cli_json::<Value>(&[
        "vm",
        "run",
        "again",
        "--from-snapshot",
        "with-data",
        "--wait",
    ]);
    assert_eq!(sum("again"), written);

    for vm in ["again", "copy", "src"] {
        assert!(host.cli(&["vm", "rm", "--force", vm]).status.success());
    }
    assert!(host.cli(&["snapshot", "rm", "with-data"]).status.success());
    assert_clean(&host);
    assert!(snapshots(&host).is_empty(), "{:?}", snapshots(&host));
}

#[test]
fn replacing_an_image_drops_its_base_snapshots() {
    let host = TestHost::start().expect("test host");
    let images: Vec<Value> = host.cli_json(&["image", "ls"]);
    let default = &images[0];
    // The user's own copy of the default image's files.
    let own = host.data_path().join("own");
    std::fs::create_dir_all(&own).expect("dir");
    let mut args = vec!["image".to_string(), "register".into(), "mine".into()];
    for field in ["kernel", "initrd", "rootfs"] {
        let copy = own.join(field);
        std::fs::copy(default[field].as_str().expect(field), &copy).expect("copy");
        args.push(format!("--{field}"));
        args.push(copy.to_string_lossy().into_owned());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    host.cli_json::<Value>(&args);
    let base: Value = host.cli_json(&["image", "base-snapshot", "mine"]);
    assert_eq!(base["kind"], "base", "{base:#}");
    assert_eq!(base["image"], "mine");

    // Replaced by new files under the same name: no VM could start from
    // the old base, so it goes, with what it pinned.
    for field in ["kernel", "initrd", "rootfs"] {
        let copy = own.join(field);
        let bytes = std::fs::read(&copy).expect("read");
        std::fs::remove_file(&copy).expect("remove");
        std::fs::write(&copy, bytes).expect("rewrite");
    }
    let mut replace = args.clone();
    replace.push("--replace");
    host.cli_json::<Value>(&replace);
    assert!(snapshots(&host).is_empty(), "{:?}", snapshots(&host));
    // A new base is made for the new files on request.
    let again: Value = host.cli_json(&["image", "base-snapshot", "mine"]);
    assert_ne!(again["id"], base["id"]);
    assert_clean(&host);
}
