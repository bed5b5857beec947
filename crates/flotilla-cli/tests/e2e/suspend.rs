//! Suspend and resume (issue 3): memory, processes, disk, addresses and
//! clock come back; layers are diffs; corruption is detected.

use std::time::Duration;

use flotilla_testkit::TestHost;

use crate::{assert_clean, exec, inspect, run_vm};

fn layer_dir(host: &TestHost, id: &str) -> std::path::PathBuf {
    host.data_path().join("snapshots/layers").join(id)
}

fn stored_bytes(host: &TestHost, id: &str) -> u64 {
    std::fs::metadata(layer_dir(host, id).join("memory.data"))
        .map(|m| m.len())
        .unwrap_or(0)
}

fn checksums(host: &TestHost, vm: &str) -> String {
    exec(
        host,
        vm,
        &["sh", "-c", "md5sum /tmp/mem.bin /root/disk.bin"],
    )
    .1
}

#[test]
fn suspend_and_resume_bring_back_memory_processes_disk_and_clock() {
    let host = TestHost::start().expect("test host");
    let vm = run_vm(&host, "sleeper");
    let ip = vm["nics"][0]["ip"].clone();
    let (code, _, err) = exec(
        &host,
        "sleeper",
        &["sh", "-c", "head -c 8000000 /dev/urandom > /tmp/mem.bin && head -c 4000000 /dev/urandom > /root/disk.bin && sync"],
    );
    assert_eq!(code, 0, "{err}");
    // A process that keeps counting in the background.
    let (code, _, _) = exec(
        &host,
        "sleeper",
        &["sh", "-c", "setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.1; done' >/dev/null 2>&1 &"],
    );
    assert_eq!(code, 0);
    std::thread::sleep(Duration::from_millis(500));
    let before = checksums(&host, "sleeper");
    let counter_before: u64 = exec(&host, "sleeper", &["cat", "/tmp/counter"])
        .1
        .trim()
        .parse()
        .expect("counter");

    let s: serde_json::Value = host.cli_json(&["vm", "suspend", "sleeper"]);
    assert_eq!(s["state"], "suspended", "{s:#}");
    let layer = s["snapshot"].as_str().expect("snapshot id").to_string();
    assert!(host.qemu_pids().is_empty(), "QEMU must be gone");
    assert!(host.taps().is_empty(), "taps must be gone");
    // A suspended VM takes no commands and cannot be stopped, only resumed or removed.
    let out = host.cli(&["vm", "exec", "sleeper", "--", "true"]);
    assert!(!out.status.success());
    let (st, b) = host.api("POST", "/v1/vms/sleeper/stop", None);
    assert_eq!(st, 409, "{b}");
    assert!(
        b["error"]["hint"].as_str().unwrap_or("").contains("resume"),
        "{b}"
    );

    std::thread::sleep(Duration::from_secs(2));
    let r: serde_json::Value = host.cli_json(&["vm", "resume", "sleeper", "--wait"]);
    assert_eq!(r["state"], "running");
    assert_eq!(r["nics"][0]["ip"], ip, "same address");
    assert_eq!(
        checksums(&host, "sleeper"),
        before,
        "memory and disk contents"
    );
    // The counting process lives on from where it was.
    std::thread::sleep(Duration::from_millis(500));
    let counter_after: u64 = exec(&host, "sleeper", &["cat", "/tmp/counter"])
        .1
        .trim()
        .parse()
        .expect("counter");
    assert!(
        counter_after > counter_before,
        "{counter_after} > {counter_before}"
    );
    // The guest clock was corrected: within 2 s of the host's.
    let guest: f64 = exec(&host, "sleeper", &["date", "+%s"])
        .1
        .trim()
        .parse()
        .expect("date");
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_secs_f64();
    assert!(
        (guest - host_now).abs() < 2.0,
        "guest clock {guest} vs host {host_now}"
    );
    assert_eq!(exec(&host, "sleeper", &["hostname"]).1.trim(), "sleeper");
    // The network is reattached: the guest reaches its gateway.
    let gw = r["nics"][0]["gateway"].as_str().expect("gw").to_string();
    assert_eq!(
        exec(&host, "sleeper", &["ping", "-c", "1", "-W", "5", &gw]).0,
        0
    );

    // Remove: the VM and its snapshot layers go.
    assert!(layer_dir(&host, &layer).exists());
    host.cli_json::<serde_json::Value>(&["vm", "rm", "--force", "sleeper"]);
    assert!(
        !layer_dir(&host, &layer).exists(),
        "layers of a removed VM are collected"
    );
    assert_clean(&host);
}

#[test]
fn a_chain_of_snapshots_stores_only_changes_and_detects_corruption() {
    let host = TestHost::start().expect("test host");
    run_vm(&host, "chain");
    let mut layers = Vec::new();
    for step in 0..3 {
        let cmd = format!("head -c 1000000 /dev/urandom > /tmp/step{step}; md5sum /tmp/step*");
        let want = exec(&host, "chain", &["sh", "-c", &cmd]).1;
        let s: serde_json::Value = host.cli_json(&["vm", "suspend", "chain"]);
        let id = s["snapshot"].as_str().expect("snapshot").to_string();
        layers.push(id);
        host.cli_json::<serde_json::Value>(&["vm", "resume", "chain", "--wait"]);
        assert_eq!(
            exec(&host, "chain", &["sh", "-c", "md5sum /tmp/step*"]).1,
            want,
            "step {step}"
        );
    }
    let sizes: Vec<u64> = layers.iter().map(|l| stored_bytes(&host, l)).collect();
    assert!(sizes[0] > 0, "{sizes:?}");
    // Later layers hold only what changed: far less than the first, full one.
    assert!(
        sizes[1] * 2 < sizes[0] && sizes[2] * 2 < sizes[0],
        "{sizes:?}"
    );

    // Corrupt one byte of the head layer: the resume is refused, naming it.
    // (Suspended warm: the waiting QEMU goes with the refusal.)
    host.cli_json::<serde_json::Value>(&["vm", "suspend", "chain", "--warm"]);
    wait_warm(&host, "chain", true);
    let head = inspect(&host, "chain")["snapshot"]
        .as_str()
        .expect("snapshot")
        .to_string();
    let data = layer_dir(&host, &head).join("memory.data");
    let mut bytes = std::fs::read(&data).expect("layer data");
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    std::fs::write(&data, &bytes).expect("corrupt");
    let (st, b) = host.api("POST", "/v1/vms/chain/resume", None);
    assert_eq!(st, 409, "{b}");
    assert!(
        b["error"]["message"].as_str().unwrap_or("").contains(&head),
        "{b}"
    );
    assert_eq!(inspect(&host, "chain")["state"], "suspended");
    assert!(host.qemu_pids().is_empty());
    assert!(host.taps().is_empty());
    // Repaired, it resumes.
    bytes[at] ^= 0xff;
    std::fs::write(&data, &bytes).expect("repair");
    host.cli_json::<serde_json::Value>(&["vm", "resume", "chain", "--wait"]);
    assert_eq!(exec(&host, "chain", &["cat", "/tmp/step2"]).0, 0);

    // A chain whose root layer is gone: refused, naming the missing parent.
    host.cli_json::<serde_json::Value>(&["vm", "suspend", "chain", "--warm"]);
    wait_warm(&host, "chain", true);
    let root = layer_dir(&host, &layers[0]);
    let aside = root.with_file_name("moved-aside");
    std::fs::rename(&root, &aside).expect("move the root layer aside");
    let (st, b) = host.api("POST", "/v1/vms/chain/resume", None);
    assert_eq!(st, 409, "{b}");
    let message = b["error"]["message"].as_str().unwrap_or("");
    assert!(
        message.contains(&layers[0]) && message.contains("missing"),
        "{b}"
    );
    assert_eq!(inspect(&host, "chain")["state"], "suspended");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !host.qemu_pids().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the standby QEMU stays"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(host.taps().is_empty(), "{:?}", host.taps());
    std::fs::rename(&aside, &root).expect("put it back");
    // A damaged copy of the memory image kept next to the VM is not used:
    // the resume rebuilds it from the layers.
    let kept = host.data_path().join("vms/chain/memory.img");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&kept)
        .expect("kept image");
    f.set_len(f.metadata().expect("size").len() / 2)
        .expect("truncate");
    drop(f);
    host.cli_json::<serde_json::Value>(&["vm", "resume", "chain", "--wait"]);
    assert_eq!(exec(&host, "chain", &["cat", "/tmp/step2"]).0, 0);
    host.cli_json::<serde_json::Value>(&["vm", "rm", "--force", "chain"]);
    assert_clean(&host);
}

#[test]
fn agent_killed_mid_suspend_leaves_the_vm_running_or_completely_suspended() {
    let mut host = TestHost::start().expect("test host");
    run_vm(&host, "victim");
    // Enough memory to write that the suspend takes a while.
    let (code, _, _) = exec(
        &host,
        "victim",
        &[
            "sh",
            "-c",
            "head -c 60000000 /dev/urandom > /tmp/mem.bin; : > /root/disk.bin",
        ],
    );
    assert_eq!(code, 0);
    let want = checksums(&host, "victim");
    for delay_ms in [150u64, 400] {
        std::thread::scope(|s| {
            let endpoint = host.endpoint.clone();
            let http = host.http_client();
            let token = host.agent_token();
            s.spawn(move || {
                // Cut off when the agent dies; the outcome is checked below.
                let _ = http
                    .post(format!("{endpoint}/v1/vms/victim/suspend"))
                    .bearer_auth(&token)
                    .send();
            });
            std::thread::sleep(Duration::from_millis(delay_ms));
            host.kill_agent(nix::sys::signal::Signal::SIGKILL);
        });
        host.start_agent().expect("agent restarts");
        let state = inspect(&host, "victim")["state"]
            .as_str()
            .unwrap_or("")
            .to_string();
        match state.as_str() {
            "running" => {}
            "suspended" => {
                host.cli_json::<serde_json::Value>(&["vm", "resume", "victim", "--wait"]);
            }
            other => panic!("after a kill {delay_ms} ms into a suspend the VM is {other}"),
        }
        crate::wait_for(&host, "victim", Duration::from_secs(30), |v| {
            v["guest_ready"] == true
        });
        assert_eq!(
            checksums(&host, "victim"),
            want,
            "after a kill {delay_ms} ms in ({state})"
        );
        assert_eq!(host.qemu_pids().len(), 1);
    }
    host.cli_json::<serde_json::Value>(&["vm", "rm", "--force", "victim"]);
    assert_clean(&host);
}

#[test]
fn a_suspend_on_a_full_disk_fails_cleanly_and_the_vm_runs_on() {
    let host = TestHost::start_with(flotilla_testkit::HostOptions {
        data_dir_size_mib: Some(160),
        ..flotilla_testkit::HostOptions::default()
    })
    .expect("test host");
    run_vm(&host, "full");
    // More memory to save than the data directory has room for, twice over.
    let (code, _, _) = exec(
        &host,
        "full",
        &[
            "sh",
            "-c",
            "head -c 100000000 /dev/urandom > /tmp/mem.bin; : > /root/disk.bin",
        ],
    );
    assert_eq!(code, 0);
    let want = checksums(&host, "full");
    let (st, b) = host.api("POST", "/v1/vms/full/suspend", None);
    assert!(st >= 400, "{st} {b}");
    let v = inspect(&host, "full");
    assert_eq!(v["state"], "running", "{v:#}");
    assert!(v["snapshot"].is_null(), "{v:#}");
    assert_eq!(checksums(&host, "full"), want);
    // No half-written layer is left to be taken for complete.
    let layers: Vec<_> = std::fs::read_dir(host.data_path().join("snapshots/layers"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(layers.is_empty(), "{layers:?}");
    host.cli_json::<serde_json::Value>(&["vm", "rm", "--force", "full"]);
    assert_clean(&host);
}

#[test]
fn a_fleet_of_twenty_is_suspended_and_resumed_by_tag() {
    let host = TestHost::start().expect("test host");
    let names: Vec<String> = (0..20).map(|i| format!("fleet-{i}")).collect();
    std::thread::scope(|s| {
        for name in &names {
            let host = &host;
            s.spawn(move || {
                host.cli_json::<serde_json::Value>(&[
                    "vm", "run", name, "--tag", "pool=a", "--wait",
                ])
            });
        }
    });
    for name in &names {
        exec(
            &host,
            name,
            &["sh", "-c", &format!("echo {name} > /tmp/who")],
        );
    }
    // One name that does not exist fails alone; the others go on.
    let out = host.cli(&[
        "--json",
        "fleet",
        "suspend",
        "--tag",
        "pool=a",
        "--parallel",
        "6",
        "ghost",
    ]);
    assert!(
        !out.status.success(),
        "a failed VM makes the exit code non-zero"
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(r["succeeded"], 20, "{r:#}");
    assert_eq!(r["failed"], 1, "{r:#}");
    assert!(host.qemu_pids().is_empty());
    let r: serde_json::Value =
        host.cli_json(&["fleet", "resume", "--tag", "pool=a", "--parallel", "6"]);
    assert_eq!(r["succeeded"], 20, "{r:#}");
    for name in &names {
        assert_eq!(
            exec(&host, name, &["cat", "/tmp/who"]).1.trim(),
            name.as_str()
        );
    }
    let (s, b) = host.api("POST", "/v1/fleet/suspend", Some(serde_json::json!({})));
    assert_eq!(s, 400, "{b}");
    std::thread::scope(|s| {
        for name in &names {
            let host = &host;
            s.spawn(move || host.cli_json::<serde_json::Value>(&["vm", "rm", "--force", name]));
        }
    });
    assert_clean(&host);
}

fn md5sum(path: &std::path::Path) -> String {
    let out = std::process::Command::new("md5sum")
        .arg(path)
        .output()
        .expect("md5sum");
    assert!(out.status.success(), "md5sum {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The memory image a VM's QEMU maps as guest memory, as (inode, path).
fn mapped_image(vm: &serde_json::Value) -> Vec<(u64, String)> {
    let pid = vm["pid"].as_i64().expect("pid") as i32;
    flotilla_testkit::mapped_files(pid, "/memory.img")
}

#[test]
fn with_mapped_memory_vms_share_the_snapshot_image_and_never_write_it() {
    let host = TestHost::start_with(flotilla_testkit::HostOptions {
        agent_args: vec!["--restore-memory".into(), "map".into()],
        ..Default::default()
    })
    .expect("test host");
    // Two VMs from the image's base snapshot map its one image.
    let a: serde_json::Value = host.cli_json(&["vm", "run", "a", "--from-snapshot", "--wait"]);
    let b: serde_json::Value = host.cli_json(&["vm", "run", "b", "--from-snapshot", "--wait"]);
    let (in_a, in_b) = (mapped_image(&a), mapped_image(&b));
    assert_eq!((in_a.len(), in_b.len()), (1, 1), "{in_a:?} {in_b:?}");
    assert_eq!(in_a[0].0, in_b[0].0, "the same file: {in_a:?} {in_b:?}");
    assert_ne!(
        exec(&host, "a", &["hostname"]).1,
        exec(&host, "b", &["hostname"]).1
    );
    // No QEMU can wait for a VM whose memory is mapped as QEMU starts: a
    // warm suspend is refused up front, the VM runs on.
    let (st, body) = host.api("POST", "/v1/vms/b/suspend?warm=true", None);
    assert_eq!(st, 409, "{body}");
    assert!(
        body["error"]["hint"]
            .as_str()
            .unwrap_or("")
            .contains("without --warm"),
        "{body}"
    );
    assert_eq!(inspect(&host, "b")["state"], "running");

    // A suspend and resume brings back memory written since.
    let (code, _, err) = exec(
        &host,
        "a",
        &[
            "sh",
            "-c",
            "head -c 8000000 /dev/urandom > /tmp/mem.bin && md5sum /tmp/mem.bin",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let before = exec(&host, "a", &["md5sum", "/tmp/mem.bin"]).1;
    assert!(host.cli(&["vm", "suspend", "a"]).status.success());
    let image = host.data_path().join("vms/a/memory.img");
    let image_sum = md5sum(&image);
    let r: serde_json::Value = host.cli_json(&["vm", "resume", "a", "--wait"]);
    assert_eq!(r["state"], "running");
    let mapped = mapped_image(&r);
    assert_eq!(mapped.len(), 1, "{mapped:?}");
    assert!(mapped[0].1.ends_with("/vms/a/memory.img"), "{mapped:?}");
    assert_eq!(exec(&host, "a", &["md5sum", "/tmp/mem.bin"]).1, before);
    // The guest writes its memory: none of it reaches the image.
    let (code, _, _) = exec(
        &host,
        "a",
        &["sh", "-c", "head -c 8000000 /dev/urandom > /tmp/more.bin"],
    );
    assert_eq!(code, 0);
    assert_eq!(md5sum(&image), image_sum, "the memory image is unchanged");
    for vm in ["a", "b"] {
        assert!(host.cli(&["vm", "rm", "--force", vm]).status.success());
    }
    assert_clean(&host);
}

/// Waits until the VM's `warm` is `want` (its standby QEMU started or gone).
fn wait_warm(host: &TestHost, vm: &str, want: bool) {
    for _ in 0..200 {
        if inspect(host, vm)["warm"].as_bool().unwrap_or(false) == want {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("VM {vm} never became warm={want}: {:#}", inspect(host, vm));
}

#[test]
fn a_warm_suspend_keeps_a_qemu_waiting_that_the_resume_loads_into() {
    let mut host = TestHost::start().expect("test host");
    run_vm(&host, "warm");
    let (code, _, err) = exec(
        &host,
        "warm",
        &["sh", "-c", "head -c 8000000 /dev/urandom > /tmp/mem.bin && head -c 4000000 /dev/urandom > /root/disk.bin && sync"],
    );
    assert_eq!(code, 0, "{err}");
    let before = checksums(&host, "warm");
    let (st, body) = host.api("POST", "/v1/vms/warm/suspend?warm=maybe", None);
    assert_eq!(st, 400, "{body}");

    // The suspend answers at once; the standby QEMU follows.
    let s: serde_json::Value = host.cli_json(&["vm", "suspend", "warm", "--warm"]);
    assert_eq!(s["state"], "suspended", "{s:#}");
    wait_warm(&host, "warm", true);
    let standby = host.qemu_pids();
    assert_eq!(standby.len(), 1, "one QEMU waits: {standby:?}");
    let info = inspect(&host, "warm");
    assert_eq!(info["state"], "suspended", "{info:#}");
    assert!(
        info["pid"].is_null(),
        "a suspended VM shows no process: {info:#}"
    );
    let out = host.cli(&["vm", "exec", "warm", "--", "true"]);
    assert!(!out.status.success(), "a suspended VM takes no commands");

    // The resume loads the state into that QEMU.
    let r: serde_json::Value = host.cli_json(&["vm", "resume", "warm", "--wait"]);
    assert_eq!(r["state"], "running", "{r:#}");
    assert_eq!(r["pid"].as_i64(), Some(i64::from(standby[0])), "{r:#}");
    assert_eq!(r["warm"], serde_json::Value::Null, "{r:#}");
    assert_eq!(checksums(&host, "warm"), before, "memory and disk contents");
    let gw = r["nics"][0]["gateway"].as_str().expect("gw").to_string();
    assert_eq!(
        exec(&host, "warm", &["ping", "-c", "1", "-W", "5", &gw]).0,
        0
    );

    // A restarted agent kills a standby it no longer knows; the next
    // resume starts its own QEMU.
    host.cli_json::<serde_json::Value>(&["vm", "suspend", "warm", "--warm"]);
    wait_warm(&host, "warm", true);
    host.kill_agent(nix::sys::signal::Signal::SIGKILL);
    host.start_agent().expect("agent again");
    assert!(host.qemu_pids().is_empty(), "the orphaned standby is gone");
    assert_eq!(inspect(&host, "warm")["warm"], serde_json::Value::Null);
    let r: serde_json::Value = host.cli_json(&["vm", "resume", "warm", "--wait"]);
    assert_eq!(r["state"], "running", "{r:#}");
    assert_eq!(checksums(&host, "warm"), before, "memory and disk contents");

    // Removing a warm VM takes its standby with it.
    host.cli_json::<serde_json::Value>(&["vm", "suspend", "warm", "--warm"]);
    wait_warm(&host, "warm", true);
    assert_eq!(host.qemu_pids().len(), 1);
    host.cli_json::<serde_json::Value>(&["vm", "rm", "warm"]);
    assert_clean(&host);
}

#[test]
fn warm_suspends_beyond_the_hosts_limit_go_oldest_first() {
    let host = TestHost::start_with(flotilla_testkit::HostOptions {
        agent_args: vec!["--max-warm".into(), "1".into()],
        ..Default::default()
    })
    .expect("test host");
    run_vm(&host, "old");
    run_vm(&host, "new");
    host.cli_json::<serde_json::Value>(&["vm", "suspend", "old", "--warm"]);
    wait_warm(&host, "old", true);
    // Through the fleet call this time.
    let out: serde_json::Value = host.cli_json(&["fleet", "suspend", "new", "--warm"]);
    assert_eq!(out["succeeded"], 1, "{out:#}");
    wait_warm(&host, "new", true);
    wait_warm(&host, "old", false);
    let pids = host.qemu_pids();
    assert_eq!(pids.len(), 1, "one standby at most: {pids:?}");
    let (st, body) = host.api(
        "POST",
        "/v1/fleet/resume",
        Some(serde_json::json!({ "names": ["new"], "warm": true })),
    );
    assert_eq!(st, 400, "{body}");

    // Both come back: the newer into its waiting QEMU, the older cold.
    let r: serde_json::Value = host.cli_json(&["vm", "resume", "new", "--wait"]);
    assert_eq!(r["pid"].as_i64(), Some(i64::from(pids[0])), "{r:#}");
    let r: serde_json::Value = host.cli_json(&["vm", "resume", "old", "--wait"]);
    assert_eq!(r["state"], "running", "{r:#}");
    assert_eq!(exec(&host, "old", &["hostname"]).1.trim(), "old");
    for vm in ["old", "new"] {
        host.cli_json::<serde_json::Value>(&["vm", "rm", "--force", vm]);
    }
    assert_clean(&host);
}
