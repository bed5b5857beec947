//! Live migration between two hosts: each a network namespace with its own
//! agent and data directory, joined by a fabric; memory and disk cross it
//! over real TCP.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_testkit::{Fabric, HostOptions, TestHost};
use serde_json::Value;

use crate::{assert_clean, exec, run_vm};

fn two_hosts() -> (Arc<Fabric>, TestHost, TestHost) {
    let fabric = Arc::new(Fabric::create().expect("fabric"));
    let options = HostOptions {
        fabric: Some(fabric.clone()),
        ..HostOptions::default()
    };
    let a = TestHost::start_with(options.clone()).expect("host a");
    let b = TestHost::start_with(options).expect("host b");
    (fabric, a, b)
}

/// Data on the disk, so that its copy takes a while (only what the guest
/// wrote crosses when the target has the image under it).
fn fill_disk(host: &TestHost, vm: &str, bytes: u64) {
    let cmd = format!("head -c {bytes} /dev/urandom > /root/fill && sync");
    let (code, _, err) = exec(host, vm, &["sh", "-c", &cmd]);
    assert_eq!(code, 0, "{err}");
}

/// Memory (tmpfs) and disk contents, and a counter that keeps going.
fn start_workload(host: &TestHost, vm: &str) {
    let (code, _, err) = exec(
        host,
        vm,
        &["sh", "-c", "head -c 8000000 /dev/urandom > /tmp/mem.bin && head -c 6000000 /dev/urandom > /root/disk.bin && sync"],
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, _) = exec(
        host,
        vm,
        &["sh", "-c", "setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/counter; echo $i > /root/counter; sleep 0.05; done' >/dev/null 2>&1 &"],
    );
    assert_eq!(code, 0);
}

fn sums(host: &TestHost, vm: &str) -> String {
    exec(host, vm, &["md5sum", "/tmp/mem.bin", "/root/disk.bin"]).1
}

fn counter(host: &TestHost, vm: &str, path: &str) -> u64 {
    exec(host, vm, &["cat", path])
        .1
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("counter {path}: {e}"))
}

fn migrate(from: &TestHost, to: &TestHost, vm: &str, extra: &[&str]) -> std::process::Output {
    let token = to.agent_token();
    let fingerprint = to.fingerprint().expect("the target serves HTTPS");
    let mut args = vec![
        "--json",
        "vm",
        "migrate",
        vm,
        "--to",
        &to.endpoint,
        "--to-token",
        &token,
        "--to-fingerprint",
        &fingerprint,
    ];
    args.extend_from_slice(extra);
    from.cli(&args)
}

/// Starts a migration without waiting for it (the CLI must accept it);
/// returns its id.
fn start_migration(from: &TestHost, to: &TestHost, vm: &str, extra: &[&str]) -> String {
    let mut args = extra.to_vec();
    args.push("--no-wait");
    let out = migrate(from, to, vm, &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m: Value = serde_json::from_slice(&out.stdout).expect("json");
    m["id"].as_str().expect("migration id").to_string()
}

/// Nothing of the VMs left once `host`'s agent has cleaned up (within
/// `limit`).
fn assert_clean_within(host: &TestHost, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !(host.qemu_pids().is_empty() && host.vm_dirs().is_empty()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_clean(host);
}

fn migration(host: &TestHost, id: &str) -> Value {
    host.cli_json(&["migration", "inspect", id])
}

fn wait_phase(host: &TestHost, id: &str, pred: impl Fn(&str) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let m = migration(host, id);
        if pred(m["phase"].as_str().unwrap_or_default()) {
            return m;
        }
        assert!(Instant::now() < deadline, "migration stuck: {m:#}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_running_vm_moves_with_its_memory_disk_and_processes() {
    let (_fabric, a, b) = two_hosts();
    let vm = run_vm(&a, "mover");
    let ip = vm["nics"][0]["ip"].clone();
    start_workload(&a, "mover");
    std::thread::sleep(Duration::from_millis(300));
    let before = sums(&a, "mover");
    let counted = counter(&a, "mover", "/tmp/counter");
    // New data on the disk while memory is copied: its overlay grows.
    let (code, _, _) = exec(
        &a,
        "mover",
        &["sh", "-c", "setsid sh -c 'sleep 1; head -c 20000000 /dev/urandom > /root/grow && sync && md5sum /root/grow > /root/grow.md5 && sync' >/dev/null 2>&1 &"],
    );
    assert_eq!(code, 0);

    let out = migrate(
        &a,
        &b,
        "mover",
        &["--max-downtime-ms", "100", "--bandwidth", "16"],
    );
    assert!(
        out.status.success(),
        "{}\n--- source ---\n{}\n--- target ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        a.agent_log_tail(),
        b.agent_log_tail()
    );
    let m: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(m["phase"], "completed", "{m:#}");
    assert!(m["transferred_bytes"].as_u64().unwrap() > 0, "{m:#}");
    assert!(m["downtime_ms"].as_u64().is_some(), "{m:#}");
    assert_eq!(m["tls"], true, "TLS by default: {m:#}");
    // Encrypted by the agents, so QEMU streams over several connections.
    assert!(
        a.agent_log_lines()
            .iter()
            .any(|l| l.contains("target prepared")
                && l.contains("tunnelled=true")
                && l.contains("channels=2")),
        "{}",
        a.agent_log_tail()
    );

    // It runs on b, the same VM: address, files, and the counting process.
    let moved: Value = b.cli_json(&["vm", "inspect", "mover"]);
    assert_eq!(moved["state"], "running", "{moved:#}");
    assert_eq!(moved["nics"][0]["ip"], ip);
    assert_eq!(sums(&b, "mover"), before, "memory and disk contents");
    let later = counter(&b, "mover", "/tmp/counter");
    assert!(
        later > counted,
        "the counter goes on: {later} after {counted}"
    );
    std::thread::sleep(Duration::from_millis(300));
    let on_disk = counter(&b, "mover", "/root/counter");
    assert!(
        on_disk > later,
        "it writes the disk on b: {on_disk} after {later}"
    );
    // Data written during the copy of memory is there whole.
    let deadline = Instant::now() + Duration::from_secs(30);
    let written = || {
        let probe = "test -s /root/grow.md5 && echo done || echo writing";
        exec(&b, "mover", &["sh", "-c", probe]).1.trim() == "done"
    };
    while !written() {
        assert!(Instant::now() < deadline, "the writer never finished");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (code, out, err) = exec(&b, "mover", &["md5sum", "-c", "/root/grow.md5"]);
    assert_eq!(code, 0, "{out} {err}");
    // Its disks are b's own now, no link to a: the root disk an overlay
    // over b's copy of the image (only the overlay crossed), as a VM made
    // on b has.
    let disks = moved["disks"].as_array().unwrap();
    let root = disks.iter().find(|d| d["name"] == "root").unwrap();
    let base = root["backing"].as_str().unwrap_or_default();
    assert!(
        base.starts_with(&*b.data_path().to_string_lossy()) && base.ends_with("base.qcow2"),
        "{moved:#}"
    );
    let target_side = migration(&b, m["id"].as_str().unwrap());
    assert_eq!(target_side["phase"], "completed", "{target_side:#}");
    assert!(target_side["disk_total_bytes"].as_u64().unwrap() > 0);
    // Waiting past a phase it has left answers at once; a wait without a
    // phase, or too long, is refused.
    let path = format!("/v1/migrations/{}", m["id"].as_str().unwrap());
    let (status, now) = b.api(
        "GET",
        &format!("{path}?phase=disk_sync&wait_ms=10000"),
        None,
    );
    assert_eq!((status, now["phase"].as_str()), (200, Some("completed")));
    let (status, err) = b.api("GET", &format!("{path}?wait_ms=100"), None);
    assert_eq!(status, 400, "{err}");
    assert!(err.to_string().contains("wait_ms needs phase"), "{err}");
    let (status, err) = b.api(
        "GET",
        &format!("{path}?phase=disk_sync&wait_ms=60000"),
        None,
    );
    assert_eq!(status, 400, "{err}");
    let (status, _) = b.api("GET", &format!("{path}?phase=sideways"), None);
    assert_eq!(status, 400);

    // Nothing of it is left on a.
    let left: Vec<Value> = a.cli_json(&["vm", "ls"]);
    assert!(left.is_empty(), "{left:?}");
    assert_clean(&a);

    // It keeps working there, from its own disk, even after its QEMU is
    // killed outright (what the disk sync copied was made durable, not left
    // in QEMU's caches for the guest's next flush).
    let pid = b.cli_json::<Value>(&["vm", "inspect", "mover"])["pid"]
        .as_i64()
        .expect("a running QEMU");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while b.cli_json::<Value>(&["vm", "inspect", "mover"])["state"] == "running" {
        assert!(Instant::now() < deadline, "the kill was not noticed");
        std::thread::sleep(Duration::from_millis(100));
    }
    let started = b.cli(&["vm", "start", "mover", "--wait"]);
    assert!(
        started.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&started.stderr),
        b.agent_log_tail()
    );
    let (_, out, _) = exec(&b, "mover", &["md5sum", "/root/disk.bin"]);
    assert!(
        before.contains(out.split_whitespace().next().unwrap()),
        "{out}"
    );
    // Suspended and resumed there (its QEMU then runs with the snapshot
    // file format set), and back to a over TCP all the same, unencrypted
    // this time.
    assert!(b.cli(&["vm", "suspend", "mover"]).status.success());
    assert!(b.cli(&["vm", "resume", "mover", "--wait"]).status.success());
    let out = migrate(&b, &a, "mover", &["--no-tls"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        b.agent_log_tail()
    );
    let back: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(back["tls"], false, "{back:#}");
    assert_eq!(migration(&a, back["id"].as_str().unwrap())["tls"], false);
    let (_, out, _) = exec(&a, "mover", &["md5sum", "/root/disk.bin"]);
    assert!(
        before.contains(out.split_whitespace().next().unwrap()),
        "{out}"
    );
    assert_clean(&b);
}

#[test]
fn agents_restarted_during_the_disk_sync_finish_the_migration() {
    let (_fabric, mut a, mut b) = two_hosts();
    run_vm(&a, "steady");
    start_workload(&a, "steady");
    fill_disk(&a, "steady", 40_000_000);
    let before = sums(&a, "steady");
    // A slow disk copy, so the agents can be killed in the middle of it.
    let id = start_migration(&a, &b, "steady", &["--disk-bandwidth", "8"]);
    wait_phase(&a, &id, |p| p == "disk_sync");
    let t0 = Instant::now();
    // Nothing that copies its disk files is allowed before they are whole.
    let (s, body) = b.api("POST", "/v1/vms/steady/suspend", None);
    assert_eq!(s, 409, "{body}");

    // The source agent dies: its QEMU keeps serving the disks, and its
    // next agent takes the migration up.
    a.kill_agent(nix::sys::signal::Signal::SIGKILL);
    a.start_agent().expect("a's agent restarts");
    // The VM runs on b meanwhile, and reads what b has not copied yet.
    assert_eq!(sums(&b, "steady"), before);
    // The target agent dies too: the copy goes on under its next agent.
    b.kill_agent(nix::sys::signal::Signal::SIGKILL);
    b.start_agent().expect("b's agent restarts");
    assert_eq!(
        migration(&a, &id)["phase"],
        "disk_sync",
        "the kills came in the copy"
    );
    let m = wait_phase(&a, &id, |p| p != "disk_sync");
    assert_eq!(
        m["phase"],
        "completed",
        "{m:#}\n{}\n{}",
        a.agent_log_tail(),
        b.agent_log_tail()
    );
    eprintln!("disk sync after the kills took {:?}", t0.elapsed());
    assert_eq!(migration(&b, &id)["phase"], "completed");
    assert_eq!(sums(&b, "steady"), before);
    let c1 = counter(&b, "steady", "/root/counter");
    std::thread::sleep(Duration::from_millis(300));
    assert!(counter(&b, "steady", "/root/counter") > c1);
    assert_clean(&a);
    // Its disks are whole now: a suspend works.
    assert!(b.cli(&["vm", "suspend", "steady"]).status.success());
}

#[test]
fn a_cancelled_or_refused_migration_leaves_the_vm_where_it_was() {
    let (_fabric, a, b) = two_hosts();
    run_vm(&a, "stay");
    start_workload(&a, "stay");
    let before = sums(&a, "stay");

    // Slow enough (1 MiB/s for 256 MiB) to be cancelled in the pre-copy.
    let id = start_migration(&a, &b, "stay", &["--bandwidth", "1"]);
    wait_phase(&a, &id, |p| p == "pre_copy");
    let inspect: Value = a.cli_json(&["vm", "inspect", "stay"]);
    assert_eq!(inspect["state"], "migrating");
    // Nothing else may act on it meanwhile.
    let (s, body) = a.api("POST", "/v1/vms/stay/suspend", None);
    assert_eq!(s, 409, "{body}");
    assert!(a.cli(&["migration", "cancel", &id]).status.success());
    let m = wait_phase(&a, &id, |p| p != "pre_copy");
    assert_eq!(m["phase"], "cancelled", "{m:#}");
    let inspect: Value = a.cli_json(&["vm", "inspect", "stay"]);
    assert_eq!(inspect["state"], "running");
    assert_eq!(sums(&a, "stay"), before);
    let c1 = counter(&a, "stay", "/tmp/counter");
    std::thread::sleep(Duration::from_millis(300));
    assert!(counter(&a, "stay", "/tmp/counter") > c1, "it runs on");
    // The target made nothing that stays.
    assert_clean(&b);

    // The target agent dies in the pre-copy: the VM stays on a, and b's
    // next agent removes the half-made VM. (Unencrypted: the stream has
    // two connections then, and their cancel is covered too.)
    let id = start_migration(&a, &b, "stay", &["--bandwidth", "1", "--no-tls"]);
    wait_phase(&a, &id, |p| p == "pre_copy");
    let mut b = b;
    b.kill_agent(nix::sys::signal::Signal::SIGKILL);
    // Its QEMU still receives; the source gives up at the switch-over at the
    // latest. Make it quick: cancel.
    assert!(a.cli(&["migration", "cancel", &id]).status.success());
    let m = wait_phase(&a, &id, |p| p != "pre_copy");
    assert_ne!(m["phase"], "completed", "{m:#}");
    assert_eq!(
        a.cli_json::<Value>(&["vm", "inspect", "stay"])["state"],
        "running"
    );
    b.start_agent().expect("b's agent restarts");
    assert_clean_within(&b, Duration::from_secs(10));

    // Encrypted, the stream goes through b's agent, which takes it along
    // when it dies: the stream fails, and the VM runs on on a unasked.
    let id = start_migration(&a, &b, "stay", &["--bandwidth", "1"]);
    wait_phase(&a, &id, |p| p == "pre_copy");
    b.kill_agent(nix::sys::signal::Signal::SIGKILL);
    let m = wait_phase(&a, &id, |p| p != "pre_copy");
    assert_eq!(m["phase"], "failed", "{m:#}");
    assert!(
        m["error"].as_str().unwrap_or("").contains("memory stream"),
        "{m:#}"
    );
    assert_eq!(
        a.cli_json::<Value>(&["vm", "inspect", "stay"])["state"],
        "running"
    );
    assert_eq!(sums(&a, "stay"), before);
    b.start_agent().expect("b's agent restarts");
    assert_clean_within(&b, Duration::from_secs(10));

    // The source's agent dies in an encrypted pre-copy, and the stream it
    // carried with it: its next agent finds the VM running here, and b's
    // half goes.
    let id = start_migration(&a, &b, "stay", &["--bandwidth", "1"]);
    wait_phase(&a, &id, |p| p == "pre_copy");
    let mut a = a;
    a.kill_agent(nix::sys::signal::Signal::SIGKILL);
    a.start_agent().expect("a's agent restarts");
    let m = wait_phase(&a, &id, |p| p != "pre_copy");
    assert_ne!(m["phase"], "completed", "{m:#}");
    assert_eq!(
        a.cli_json::<Value>(&["vm", "inspect", "stay"])["state"],
        "running",
        "{}",
        a.agent_log_tail()
    );
    assert_eq!(sums(&a, "stay"), before);
    assert_clean_within(&b, Duration::from_secs(30));

    // A target without room refuses up front, and nothing changes.
    let small = TestHost::start_with(HostOptions {
        capacity_memory_mib: 128,
        fabric: Some(_fabric.clone()),
        ..HostOptions::default()
    })
    .expect("small host");
    let out = migrate(&a, &small, "stay", &[]);
    assert!(!out.status.success());
    let m: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(m["phase"], "failed", "{m:#}");
    assert!(m["error"].as_str().unwrap().contains("MiB"), "{m:#}");
    assert_eq!(
        a.cli_json::<Value>(&["vm", "inspect", "stay"])["state"],
        "running"
    );
    assert_eq!(sums(&a, "stay"), before);
    assert_clean(&small);
    // A bad target is refused with the reason.
    let out = a.cli(&["vm", "migrate", "stay", "--to", "ftp://x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("http://"));
    // An HTTPS target is trusted by its certificate only.
    let out = a.cli(&["vm", "migrate", "stay", "--to", &small.endpoint]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("fingerprint is needed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A VM with one of its host's volumes takes it along: the target's
    // volume once synced, with what the guest wrote; the source's copy goes.
    a.cli_json::<Value>(&["volume", "create", "home", "--size", "16M"]);
    a.cli_json::<Value>(&["vm", "run", "homebound", "--volume", "home", "--wait"]);
    let (code, _, err) = exec(
        &a,
        "homebound",
        &[
            "sh",
            "-c",
            "printf travels | dd of=/dev/vdb bs=512 conv=sync,fsync 2>/dev/null",
        ],
    );
    assert_eq!(code, 0, "{err}");
    // A volume of that name on the target: refused up front, nothing moves.
    b.cli_json::<Value>(&["volume", "create", "home", "--size", "16M"]);
    let out = migrate(&a, &b, "homebound", &[]);
    assert!(!out.status.success());
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("a volume named"), "{said}");
    assert_eq!(
        a.cli_json::<Value>(&["vm", "inspect", "homebound"])["state"],
        "running"
    );
    assert!(b.cli(&["volume", "rm", "home"]).status.success());
    // 6 MB more on it, synced at 1 MiB/s: while the volume is arriving,
    // the VM is not removed there (the target holds the only copy of what
    // the guest writes from the switch-over on).
    let (code, _, err) = exec(
        &a,
        "homebound",
        &[
            "sh",
            "-c",
            "head -c 6000000 /dev/urandom | dd of=/dev/vdb bs=1M seek=1 conv=fsync 2>/dev/null",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let id = start_migration(&a, &b, "homebound", &["--disk-bandwidth", "1"]);
    wait_phase(&a, &id, |p| p == "disk_sync");
    let refused = b.cli(&["vm", "rm", "--force", "homebound"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("still receiving volume"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let m = wait_phase(&a, &id, |p| p != "disk_sync");
    assert_eq!(m["phase"], "completed", "{m:#}\n{}", b.agent_log_tail());
    let on_b: Vec<Value> = b.cli_json(&["volume", "ls"]);
    assert_eq!(on_b.len(), 1, "{on_b:?}");
    assert_eq!(on_b[0]["attached_to"], "homebound", "{on_b:?}");
    let on_a: Vec<Value> = a.cli_json(&["volume", "ls"]);
    assert!(on_a.is_empty(), "{on_a:?}");
    let (_, out, _) = exec(
        &b,
        "homebound",
        &[
            "sh",
            "-c",
            "dd if=/dev/vdb bs=512 count=1 2>/dev/null | tr -d '\\000'",
        ],
    );
    assert_eq!(out, "travels");
    // Removing the VM there keeps the volume there.
    assert!(b
        .cli(&["vm", "rm", "--force", "homebound"])
        .status
        .success());
    let kept: Value = b.cli_json(&["volume", "inspect", "home"]);
    assert!(kept.get("attached_to").is_none(), "{kept:#}");
    b.cli_json::<Value>(&["vm", "run", "reader", "--volume", "home", "--wait"]);
    let (_, out, _) = exec(
        &b,
        "reader",
        &[
            "sh",
            "-c",
            "dd if=/dev/vdb bs=512 count=1 2>/dev/null | tr -d '\\000'",
        ],
    );
    assert_eq!(out, "travels", "{}", b.agent_log_tail());
}

/// The host's link to the fabric (its veth's end in the caller's namespace).
fn link(host: &TestHost, up: bool) {
    let state = if up { "up" } else { "down" };
    let out = std::process::Command::new("ip")
        .args(["link", "set", &host.netns.host_veth, state])
        .output()
        .expect("ip");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn cut_networks_and_streams_that_cannot_converge_are_handled() {
    let (_fabric, a, b) = two_hosts();
    run_vm(&a, "busy");
    start_workload(&a, "busy");
    let before = sums(&a, "busy");

    // A guest dirtying memory faster than the stream may send it: predicted
    // not to converge and, as asked, cancelled; the VM runs on.
    let (code, _, _) = exec(
        &a,
        "busy",
        &["sh", "-c", "setsid sh -c 'while [ ! -e /tmp/calm ]; do dd if=/tmp/mem.bin of=/tmp/dirty bs=1M conv=notrunc 2>/dev/null; done' >/dev/null 2>&1 &"],
    );
    assert_eq!(code, 0);
    let out = migrate(
        &a,
        &b,
        "busy",
        &["--bandwidth", "8", "--on-no-convergence", "cancel"],
    );
    assert!(!out.status.success());
    let m: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(m["phase"], "failed", "{m:#}");
    assert!(
        m["error"]
            .as_str()
            .unwrap()
            .contains("predicted not to converge"),
        "{m:#}"
    );
    assert!(m["prediction"].is_string(), "{m:#}");
    assert_eq!(
        a.cli_json::<Value>(&["vm", "inspect", "busy"])["state"],
        "running"
    );
    assert_eq!(sums(&a, "busy"), before);
    assert_clean(&b);
    let (code, _, _) = exec(&a, "busy", &["touch", "/tmp/calm"]);
    assert_eq!(code, 0);

    // The network to the target is cut during the pre-copy: the stream
    // stalls, is given up, and the VM runs on where it was.
    let id = start_migration(&a, &b, "busy", &["--bandwidth", "1"]);
    // Cut once the stream flows.
    let deadline = Instant::now() + Duration::from_secs(60);
    while migration(&a, &id)["transferred_bytes"]
        .as_u64()
        .unwrap_or(0)
        == 0
    {
        assert!(Instant::now() < deadline, "the stream never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    link(&b, false);
    let m = wait_phase(&a, &id, |p| p != "pre_copy");
    link(&b, true);
    assert_eq!(m["phase"], "failed", "{m:#}");
    assert!(
        m["error"].as_str().unwrap().contains("sent nothing"),
        "{m:#}"
    );
    assert_eq!(sums(&a, "busy"), before);
    // b's half goes once its stream ends (its QEMU sees the closed stream).
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(b.qemu_pids().is_empty() && b.vm_dirs().is_empty()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_clean(&b);

    // Cut during the disk sync: the VM runs on b, reads wait for the
    // link, and the copy finishes when it is back.
    fill_disk(&a, "busy", 40_000_000);
    let id = start_migration(&a, &b, "busy", &["--disk-bandwidth", "16"]);
    wait_phase(&a, &id, |p| p == "disk_sync");
    link(&a, false);
    std::thread::sleep(Duration::from_secs(3));
    // (a cannot be asked while its link is down; b can.)
    assert_eq!(
        migration(&b, &id)["phase"],
        "disk_sync",
        "the cut came in the copy"
    );
    link(&a, true);
    let m = wait_phase(&a, &id, |p| p != "disk_sync");
    assert_eq!(m["phase"], "completed", "{m:#}");
    assert_eq!(sums(&b, "busy"), before);
    assert_clean(&a);
}

#[test]
fn a_host_takes_part_in_a_limited_number_of_migrations_at_once() {
    let fabric = Arc::new(Fabric::create().expect("fabric"));
    let a = TestHost::start_with(HostOptions {
        fabric: Some(fabric.clone()),
        ..HostOptions::default()
    })
    .expect("host a");
    let b = TestHost::start_with(HostOptions {
        fabric: Some(fabric.clone()),
        agent_args: vec!["--max-migrations".into(), "1".into()],
        ..HostOptions::default()
    })
    .expect("host b");
    run_vm(&a, "one");
    run_vm(&a, "two");
    // The first holds b's only slot through a slow disk copy (of what the
    // guest wrote: b has the image under it).
    fill_disk(&a, "one", 40_000_000);
    let first = start_migration(&a, &b, "one", &["--disk-bandwidth", "8"]);
    wait_phase(&a, &first, |p| p == "disk_sync");
    let second = start_migration(&a, &b, "two", &[]);
    // The second waits for it: b says it is busy, a asks again.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = migration(&a, &second);
        if m["error"].as_str().is_some_and(|e| e.contains("busy")) {
            break;
        }
        assert!(m["phase"] != "completed", "did not wait: {m:#}");
        assert!(Instant::now() < deadline, "{m:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(migration(&a, &first)["phase"], "disk_sync");
    for id in [&first, &second] {
        let m = wait_phase(&a, id, |p| {
            !matches!(p, "preparing" | "pre_copy" | "disk_sync")
        });
        assert_eq!(m["phase"], "completed", "{m:#}");
    }
    assert_eq!(b.cli_json::<Vec<Value>>(&["vm", "ls"]).len(), 2);
    assert_clean(&a);
}

/// A client on a third host holds a TCP connection to a guest (a router
/// sends it the VM's packets through a); the VM moves to b while they talk.
/// a forwards what still comes to it, b answers directly, and the talk goes
/// on; a's forward ends when its window does.
#[test]
fn a_tcp_connection_from_another_host_survives_the_migration() {
    use std::io::{BufRead, BufReader, Write};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    let fabric = Arc::new(Fabric::create().expect("fabric"));
    let options = HostOptions {
        fabric: Some(fabric.clone()),
        agent_args: vec!["--forward-moved-secs".into(), "4".into()],
        ..HostOptions::default()
    };
    let a = TestHost::start_with(options.clone()).expect("host a");
    let b = TestHost::start_with(options).expect("host b");
    let client = flotilla_testkit::NetNs::create_on(&fabric).expect("client host");

    let vm = run_vm(&a, "served");
    let ip = vm["nics"][0]["ip"].as_str().unwrap().to_string();
    let (code, _, err) = exec(
        &a,
        "served",
        &["sh", "-c", "setsid nc -l -p 7000 -e cat >/dev/null 2>&1 &"],
    );
    assert_eq!(code, 0, "{err}");
    client
        .exec_ip(&["route", "add", &format!("{ip}/32"), "via", &a.netns.ns_ip])
        .expect("the client's route to the VM");

    // The client: a line out, the same line back, again and again.
    let (stop, echoed) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let talk = {
        let (ns, ip, stop, echoed) = (
            client.name.clone(),
            ip.clone(),
            stop.clone(),
            echoed.clone(),
        );
        std::thread::spawn(move || -> Result<(), String> {
            let netns =
                std::fs::File::open(format!("/var/run/netns/{ns}")).map_err(|e| e.to_string())?;
            nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| e.to_string())?;
            let addr: std::net::SocketAddr = format!("{ip}:7000").parse().unwrap();
            // The guest's nc may take a moment to listen.
            let deadline = Instant::now() + Duration::from_secs(20);
            let stream = loop {
                match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() > deadline => return Err(format!("connect: {e}")),
                    Err(_) => std::thread::sleep(Duration::from_millis(200)),
                }
            };
            stream
                .set_read_timeout(Some(Duration::from_secs(20)))
                .map_err(|e| e.to_string())?;
            let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
            let mut writer = stream;
            for n in 0u64.. {
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                writeln!(writer, "line {n}").map_err(|e| format!("send {n}: {e}"))?;
                let mut back = String::new();
                reader
                    .read_line(&mut back)
                    .map_err(|e| format!("echo of {n}: {e}"))?;
                if back != format!("line {n}\n") {
                    return Err(format!("echo of {n} was {back:?}"));
                }
                echoed.store(n + 1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(())
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while echoed.load(Ordering::Relaxed) < 5 {
        assert!(
            Instant::now() < deadline && !talk.is_finished(),
            "no echo before the move"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let out = migrate(&a, &b, "served", &[]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        b.agent_log_tail()
    );
    // The client still sends to a, which forwards to b.
    let route = a
        .netns
        .exec_ip(&["route", "show", &format!("{ip}/32")])
        .unwrap();
    assert!(
        route.contains(&format!("via {}", b.netns.ns_ip)),
        "a's forward: {route:?}"
    );
    let after_move = echoed.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(20);
    while echoed.load(Ordering::Relaxed) < after_move + 20 {
        assert!(
            Instant::now() < deadline && !talk.is_finished(),
            "the connection stalled after the move at {}",
            echoed.load(Ordering::Relaxed)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    talk.join()
        .expect("client thread")
        .expect("the connection survives");

    // The forward ends after its window (4 s here).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let route = a
            .netns
            .exec_ip(&["route", "show", &format!("{ip}/32")])
            .unwrap();
        if route.trim().is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "a still forwards: {route:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_clean(&a);
}

/// A guest that dirties memory faster than the stream may send it, with
/// post-copy as the policy: the VM goes over anyway and runs on the target
/// while its last pages follow. The stream's connection is reset during
/// the post-copy: both sides pause and resume on a new one. Nothing is lost.
#[test]
fn a_stream_that_cannot_converge_switches_to_post_copy() {
    let (_fabric, a, b) = two_hosts();
    run_vm(&a, "hot");
    start_workload(&a, "hot");
    let before = sums(&a, "hot");
    // 32 MB rewritten over and over: the post-copy has that much to send.
    let (code, _, _) = exec(
        &a,
        "hot",
        &["sh", "-c", "head -c 32000000 /dev/urandom > /tmp/hot && setsid sh -c 'while :; do dd if=/tmp/hot of=/tmp/dirty bs=1M conv=notrunc 2>/dev/null; done' >/dev/null 2>&1 &"],
    );
    assert_eq!(code, 0);
    let counted = counter(&a, "hot", "/tmp/counter");

    let id = start_migration(&a, &b, "hot", &["--bandwidth", "8", "--post-copy"]);
    wait_phase(&a, &id, |p| p != "preparing" && p != "pre_copy");
    // Every TCP connection between the hosts reset, the stream's too.
    let killed = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &a.netns.name,
            "ss",
            "-K",
            "dst",
            &b.netns.ns_ip,
        ])
        .output()
        .expect("ss");
    assert!(
        killed.status.success(),
        "{}",
        String::from_utf8_lossy(&killed.stderr)
    );
    let m = wait_phase(&a, &id, |p| p != "disk_sync");
    let log = std::fs::read_to_string(a.data_path().join("agent.log")).unwrap_or_default();
    assert_eq!(
        m["phase"],
        "completed",
        "{m:#}\n--- source ---\n{}\n--- target ---\n{}",
        a.agent_log_tail(),
        b.agent_log_tail()
    );
    assert!(
        log.contains("post-copy resumed after a cut"),
        "{}",
        a.agent_log_tail()
    );
    assert_eq!(m["post_copy"], true, "{m:#}");
    assert!(m["prediction"].is_string(), "{m:#}");
    let target_side = migration(&b, m["id"].as_str().unwrap());
    assert_eq!(target_side["post_copy"], true, "{target_side:#}");

    assert_eq!(sums(&b, "hot"), before, "memory and disk contents");
    let later = counter(&b, "hot", "/tmp/counter");
    assert!(
        later > counted,
        "the counter goes on: {later} after {counted}"
    );
    assert_clean(&a);
    // Its QEMU is an ordinary one afterwards: a suspend (a file save, which
    // QEMU refuses while post-copy is allowed) and a resume work.
    assert!(
        b.cli(&["vm", "suspend", "hot"]).status.success(),
        "{}",
        b.agent_log_tail()
    );
    assert!(b.cli(&["vm", "resume", "hot", "--wait"]).status.success());
    assert_eq!(sums(&b, "hot"), before);
}
