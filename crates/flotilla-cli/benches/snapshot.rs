//! Snapshot benchmark (issue 3): suspend and resume of a 256 MiB guest, and
//! the bytes stored for a second snapshot of a VM that changed little,
//! against QEMU's own full save and restore of the same guest (`migrate` to a
//! file without diffs, then a fresh QEMU with `-incoming`) in the same run.
//!
//! Run with `cargo bench -p flotilla-cli --bench snapshot` (as root, after
//! `./scripts/setup`). Prints a Markdown table for BENCHMARKS.md.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flotilla_guest_protocol::client::GuestClient;
use flotilla_guest_protocol::ExecRequest;
use flotilla_qemu::QmpClient;
use flotilla_testkit::{bare_qemu_command, BareQemu, HostOptions, TestHost};
use serde_json::{json, Value};

const MEMORY_MIB: u64 = 256;
/// What the guest does between its two snapshots: a little change.
const SMALL_CHANGE: &str = "head -c 1000000 /dev/urandom > /tmp/change";
/// What the guest holds before the first snapshot.
const WORKLOAD: &str = "head -c 20000000 /dev/urandom > /tmp/state";

fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| allocated(&e.path())).sum())
        .unwrap_or(0)
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn api_ok(host: &TestHost, method: &str, path: &str, body: Option<Value>) -> Value {
    let (s, b) = host.api(method, path, body);
    assert!((200..300).contains(&s), "{method} {path}: {s} {b}");
    b
}

fn flotilla_exec(host: &TestHost, vm: &str, cmd: &str) {
    api_ok(
        host,
        "POST",
        &format!("/v1/vms/{vm}/exec"),
        Some(json!({ "argv": ["sh", "-c", cmd] })),
    );
}

/// The baseline VM: the same kernel, initramfs, root disk (an overlay of the
/// image's) and a virtio NIC as a Flotilla VM, so QEMU saves and restores
/// the same devices.
fn spawn_bare(kernel: &Path, initrd: &Path, dir: &Path, incoming: Option<&Path>) -> BareQemu {
    let cmdline = "console=ttyS0 quiet panic=-1 nolapic_timer flotilla.root=/dev/vda";
    let mut cmd = bare_qemu_command(kernel, initrd, MEMORY_MIB, cmdline, &dir.join("agent.sock"));
    let root = json!({
        "driver": "qcow2",
        "node-name": "disk-root",
        "file": { "driver": "file", "filename": dir.join("root.qcow2").to_string_lossy() },
    });
    cmd.arg("-blockdev")
        .arg(root.to_string())
        .args(["-device", "virtio-blk-device,drive=disk-root"])
        .args(["-netdev", "hubport,id=net0,hubid=0"])
        .args(["-device", "virtio-net-device,netdev=net0"]);
    let qmp = dir.join("qmp.sock");
    let _ = std::fs::remove_file(&qmp);
    cmd.arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    if let Some(f) = incoming {
        cmd.arg("-incoming").arg(format!("file:{}", f.display()));
    }
    BareQemu::spawn(cmd).expect("qemu")
}

/// Waits until the incoming state is loaded and the VM runs: a guest channel
/// connected while QEMU is still loading loses its "host connected" signal
/// to the loaded device state.
async fn wait_running(dir: &Path) {
    let qmp = QmpClient::connect_retry(&dir.join("qmp.sock"), Duration::from_secs(10))
        .await
        .expect("qmp");
    loop {
        let st = qmp.query_status().await.expect("status");
        if st.running {
            return;
        }
        // The state was saved paused, and QEMU restores the run state too.
        if st.status == "paused" {
            qmp.cont().await.expect("cont");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn guest_exec(dir: &Path, cmd: &str) {
    let (client, _) = GuestClient::wait_ready(&dir.join("agent.sock"), Duration::from_secs(60))
        .await
        .expect("guest");
    let exit = client
        .exec_collect(ExecRequest::new(["sh", "-c", cmd]), Duration::from_secs(60))
        .await
        .expect("exec");
    assert_eq!(exit.code, Some(0));
}

/// QEMU's own full save: stop, `migrate` to a plain file, quit. With
/// `unlimited`, without QEMU's default bandwidth limit (128 MiB/s), as
/// Flotilla saves.
async fn bare_save(dir: &Path, file: &Path, unlimited: bool) -> f64 {
    let qmp = QmpClient::connect_retry(&dir.join("qmp.sock"), Duration::from_secs(10))
        .await
        .expect("qmp");
    if unlimited {
        qmp.execute::<Value>(
            "migrate-set-parameters",
            Some(json!({ "max-bandwidth": 0 })),
        )
        .await
        .expect("no limit");
    }
    let t = Instant::now();
    qmp.stop().await.expect("stop");
    qmp.execute::<Value>(
        "migrate",
        Some(json!({ "uri": format!("file:{}", file.display()) })),
    )
    .await
    .expect("migrate");
    loop {
        let info: Value = qmp.execute("query-migrate", None).await.expect("query");
        match info["status"].as_str() {
            Some("completed") => break,
            Some("failed") => panic!("baseline save failed: {info}"),
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let _ = qmp.quit().await;
    secs
}

fn main() {
    let host = TestHost::start().expect("test host");
    let image = api_ok(&host, "GET", "/v1/images/default", None);
    let kernel = PathBuf::from(image["kernel"].as_str().expect("kernel"));
    let initrd = PathBuf::from(image["initrd"].as_str().expect("initrd"));
    let rootfs = PathBuf::from(image["rootfs"].as_str().expect("rootfs"));
    let rt = tokio::runtime::Runtime::new().expect("runtime");

    // Flotilla: two suspends with a small change between them.
    let load = suspend_cycle(&host);
    let Cycle {
        suspend1,
        suspend2,
        resume1,
        resume2,
        bytes1,
        bytes2,
        memory: resumed_memory,
    } = load;
    let (warm_resume, standby_memory) = warm_cycle(&host);

    // Baseline: the same guest under a bare QEMU, same workload, full saves.
    let dir = tempfile::tempdir().expect("tempdir");
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&rootfs)
        .arg(dir.path().join("root.qcow2"))
        .status()
        .expect("qemu-img");
    assert!(made.success());
    let (base1, base2) = (dir.path().join("full1.bin"), dir.path().join("full2.bin"));
    let (save1, save2, save2_unlimited, restore2, restored_memory) = rt.block_on(async {
        let q = spawn_bare(&kernel, &initrd, dir.path(), None);
        guest_exec(dir.path(), WORKLOAD).await;
        let save1 = bare_save(dir.path(), &base1, false).await;
        drop(q);
        let q = spawn_bare(&kernel, &initrd, dir.path(), Some(&base1));
        wait_running(dir.path()).await;
        guest_exec(dir.path(), SMALL_CHANGE).await;
        let save2 = bare_save(dir.path(), &base2, false).await;
        drop(q);
        // Each restore starts from the disk as it was at the save.
        let (root, saved_root) = (
            dir.path().join("root.qcow2"),
            dir.path().join("root-saved.qcow2"),
        );
        std::fs::copy(&root, &saved_root).expect("keep the saved disk");
        let mut restores = Vec::new();
        let mut restored_memory = MemoryUse::default();
        for _ in 0..REPEAT {
            std::fs::copy(&saved_root, &root).expect("restore the saved disk");
            let t = Instant::now();
            let q = spawn_bare(&kernel, &initrd, dir.path(), Some(&base2));
            wait_running(dir.path()).await;
            guest_exec(dir.path(), "true").await;
            restores.push(t.elapsed().as_secs_f64());
            restored_memory = memory_of(q.pid());
            drop(q);
        }
        let restore2 = median(&mut restores);
        // The second save again without the limit (into another file).
        std::fs::copy(&saved_root, &root).expect("restore the saved disk");
        let q = spawn_bare(&kernel, &initrd, dir.path(), Some(&base2));
        wait_running(dir.path()).await;
        let save2_unlimited = bare_save(dir.path(), &dir.path().join("full3.bin"), true).await;
        drop(q);
        (save1, save2, save2_unlimited, restore2, restored_memory)
    });
    let (full1, full2) = (allocated(&base1), allocated(&base2));

    println!("256 MiB guest, 1 vCPU, TCG; workload: 20 MB random in tmpfs, then 1 MB more before the second snapshot");
    println!();
    println!("| metric | Flotilla | QEMU full save/restore | ratio |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| first snapshot: time | {suspend1:.3} s | {save1:.3} s | {:.2}x |",
        suspend1 / save1
    );
    println!(
        "| first snapshot: bytes stored | {:.1} MiB | {:.1} MiB | {:.2}x |",
        mib(bytes1),
        mib(full1),
        bytes1 as f64 / full1 as f64
    );
    println!(
        "| second snapshot: time | {suspend2:.3} s | {save2:.3} s | {:.2}x |",
        suspend2 / save2
    );
    println!(
        "| second snapshot: time, QEMU without its bandwidth limit | {suspend2:.3} s | {save2_unlimited:.3} s | {:.2}x |",
        suspend2 / save2_unlimited
    );
    println!(
        "| second snapshot: bytes stored | {:.1} MiB | {:.1} MiB | {:.1}% |",
        mib(bytes2),
        mib(full2),
        100.0 * bytes2 as f64 / full2 as f64
    );
    println!("| resume until exec answers (after the second; median of {REPEAT}) | {resume2:.3} s | {restore2:.3} s | {:.2}x |", resume2 / restore2);
    println!("| resume until exec answers (after the first) | {resume1:.3} s | | |");
    println!("| resume of a warm suspend until exec answers (median of {REPEAT}) | {warm_resume:.3} s | {restore2:.3} s | {:.2}x |", warm_resume / restore2);
    println!(
        "| a warm suspend's waiting QEMU: resident / private memory | {:.1} / {:.1} MiB | | |",
        mib(standby_memory.resident),
        mib(standby_memory.anonymous),
    );
    println!(
        "| a resumed VM's QEMU after one exec: resident / private memory | {:.1} / {:.1} MiB | {:.1} / {:.1} MiB | {:.2}x private |",
        mib(resumed_memory.resident),
        mib(resumed_memory.anonymous),
        mib(restored_memory.resident),
        mib(restored_memory.anonymous),
        resumed_memory.anonymous as f64 / restored_memory.anonymous.max(1) as f64
    );

    // Clones of a running VM holding the same workload. QEMU's own way to
    // the same result is a full save (the source paused throughout) and a
    // restore into a new QEMU.
    api_ok(
        &host,
        "POST",
        "/v1/vms",
        Some(json!({ "name": "origin", "memory_mib": MEMORY_MIB, "wait_ready": true })),
    );
    flotilla_exec(&host, "origin", WORKLOAD);
    let (mut clone_times, mut pauses) = (Vec::new(), Vec::new());
    for i in 0..REPEAT {
        let name = format!("clone-{i}");
        let t = Instant::now();
        let r = api_ok(
            &host,
            "POST",
            "/v1/vms/origin/clone",
            Some(json!({ "name": name })),
        );
        flotilla_exec(&host, &name, "true");
        clone_times.push(t.elapsed().as_secs_f64());
        pauses.push(r["source_pause_ms"].as_f64().unwrap_or(f64::NAN) / 1000.0);
        api_ok(&host, "DELETE", &format!("/v1/vms/{name}?force=true"), None);
    }
    api_ok(&host, "DELETE", "/v1/vms/origin?force=true", None);
    let (clone_p50, pause_p50) = (median(&mut clone_times), median(&mut pauses));
    println!(
        "| clone of a running VM until the clone answers an exec (median of {REPEAT}) | {clone_p50:.3} s | {:.3} s | {:.2}x |",
        save2 + restore2,
        clone_p50 / (save2 + restore2)
    );
    println!(
        "| source paused by a clone (median of {REPEAT}) | {pause_p50:.3} s | {save2:.3} s | {:.2}x |",
        pause_p50 / save2
    );

    // Starting from the image's base snapshot against booting, in turn.
    let base_request = |name: &str, from_base: bool| {
        let mut body = json!({ "name": name, "memory_mib": MEMORY_MIB, "wait_ready": true });
        if from_base {
            body["from_snapshot"] = json!("base");
        }
        body
    };
    let t = Instant::now();
    api_ok(&host, "POST", "/v1/vms", Some(base_request("warm", true)));
    let base_made = t.elapsed().as_secs_f64();
    api_ok(&host, "DELETE", "/v1/vms/warm?force=true", None);
    let (mut boots, mut from_base) = (Vec::new(), Vec::new());
    for i in 0..REPEAT {
        for (times, snapshot) in [(&mut boots, false), (&mut from_base, true)] {
            let name = format!("start-{i}");
            let t = Instant::now();
            api_ok(
                &host,
                "POST",
                "/v1/vms",
                Some(base_request(&name, snapshot)),
            );
            flotilla_exec(&host, &name, "true");
            times.push(t.elapsed().as_secs_f64());
            api_ok(&host, "DELETE", &format!("/v1/vms/{name}?force=true"), None);
        }
    }
    let (boot_p50, base_p50) = (median(&mut boots), median(&mut from_base));
    println!(
        "| `vm run --from-snapshot` until exec answers vs a boot (median of {REPEAT}) | {base_p50:.3} s | boot: {boot_p50:.3} s | {:.2}x |",
        base_p50 / boot_p50
    );
    println!(
        "| making the image's base snapshot (once per image and shape) | {base_made:.2} s | | |"
    );

    let load_density = density(&host);

    // A fleet of 20, each with a little state of its own, suspended and
    // resumed by tag, four at a time.
    std::thread::scope(|s| {
        for i in 0..FLEET {
            let host = &host;
            s.spawn(move || {
                let name = format!("fleet-{i}");
                api_ok(host, "POST", "/v1/vms", Some(json!({ "name": name, "memory_mib": MEMORY_MIB, "tags": { "pool": "bench" }, "wait_ready": true })));
                flotilla_exec(host, &name, SMALL_CHANGE);
            });
        }
    });
    let t = Instant::now();
    let r = api_ok(
        &host,
        "POST",
        "/v1/fleet/suspend",
        Some(json!({ "tag": "pool=bench", "parallelism": 4 })),
    );
    let fleet_suspend = t.elapsed().as_secs_f64();
    assert_eq!(r["succeeded"], FLEET, "{r}");
    let t = Instant::now();
    let r = api_ok(
        &host,
        "POST",
        "/v1/fleet/resume",
        Some(json!({ "tag": "pool=bench", "parallelism": 4 })),
    );
    let fleet_resume = t.elapsed().as_secs_f64();
    assert_eq!(r["succeeded"], FLEET, "{r}");
    println!("| fleet of {FLEET}: suspend, 4 at a time | {fleet_suspend:.2} s | | |");
    println!("| fleet of {FLEET}: resume until every guest agent answers, 4 at a time | {fleet_resume:.2} s | | |");
    for i in 0..FLEET {
        api_ok(
            &host,
            "DELETE",
            &format!("/v1/vms/fleet-{i}?force=true"),
            None,
        );
    }
    drop(host);

    // The same cycle and starts on a host that maps memory images
    // copy-on-write instead of loading them.
    let defaults = HostOptions::default();
    let host = TestHost::start_with(HostOptions {
        agent_args: [
            &defaults.agent_args[..],
            &["--restore-memory".into(), "map".into()],
        ]
        .concat(),
        ..defaults
    })
    .expect("test host");
    let map = suspend_cycle(&host);
    let map_density = density(&host);
    println!();
    println!(
        "Guest memory restore modes (`flotilla agent --restore-memory load|map`), same workload:"
    );
    println!();
    println!("| metric | load (default) | map |");
    println!("| --- | --- | --- |");
    for (metric, l, m) in [
        ("first snapshot: time", load.suspend1, map.suspend1),
        ("second snapshot: time", load.suspend2, map.suspend2),
        (
            "resume until exec answers (after the first)",
            load.resume1,
            map.resume1,
        ),
        (
            "resume until exec answers (after the second; median of 5)",
            load.resume2,
            map.resume2,
        ),
    ] {
        println!("| {metric} | {l:.3} s | {m:.3} s |");
    }
    let show = |m: &MemoryUse| {
        format!(
            "{:.1} / {:.1} / {:.1} MiB",
            mib(m.resident),
            mib(m.proportional),
            mib(m.anonymous)
        )
    };
    println!(
        "| a resumed VM's QEMU after one exec: resident / proportional / private | {} | {} |",
        show(&load.memory),
        show(&map.memory)
    );
    println!(
        "| {DENSITY} VMs from the base snapshot, per VM: resident / proportional / private | {} | {} |",
        show(&load_density),
        show(&map_density)
    );
}

/// What one suspend-and-resume cycle measured.
#[derive(Debug, Clone, Copy)]
struct Cycle {
    suspend1: f64,
    suspend2: f64,
    resume1: f64,
    /// Median of [`REPEAT`] resumes after the second suspend.
    resume2: f64,
    bytes1: u64,
    bytes2: u64,
    /// The resumed VM's QEMU after an exec.
    memory: MemoryUse,
}

/// A VM holding [`WORKLOAD`] suspended warm (a QEMU waits for the resume)
/// and resumed [`REPEAT`] times: the median resume until an exec answers,
/// and what the waiting QEMU holds.
fn warm_cycle(host: &TestHost) -> (f64, MemoryUse) {
    api_ok(
        host,
        "POST",
        "/v1/vms",
        Some(json!({ "name": "warm", "memory_mib": MEMORY_MIB, "wait_ready": true })),
    );
    flotilla_exec(host, "warm", WORKLOAD);
    let mut resumes = Vec::new();
    let mut standby = MemoryUse::default();
    for i in 0..REPEAT {
        api_ok(host, "POST", "/v1/vms/warm/suspend?warm=true", None);
        let waiting = Instant::now();
        while !api_ok(host, "GET", "/v1/vms/warm", None)["warm"]
            .as_bool()
            .unwrap_or(false)
        {
            assert!(waiting.elapsed() < Duration::from_secs(30), "no standby");
            std::thread::sleep(Duration::from_millis(20));
        }
        if i == 0 {
            let pids = host.qemu_pids();
            standby = memory_of(pids[0]);
        }
        let t = Instant::now();
        api_ok(host, "POST", "/v1/vms/warm/resume?wait=true", None);
        let resumed = t.elapsed();
        flotilla_exec(host, "warm", "true");
        resumes.push(t.elapsed().as_secs_f64());
        eprintln!(
            "warm resume {i}: ready at {} ms, exec answered at {} ms",
            resumed.as_millis(),
            t.elapsed().as_millis()
        );
    }
    for line in host.agent_log_lines() {
        if line.contains("restore phases") && line.contains("warm=true") {
            eprintln!("{line}");
        }
    }
    api_ok(host, "DELETE", "/v1/vms/warm?force=true", None);
    (median(&mut resumes), standby)
}

/// A VM holding [`WORKLOAD`] suspended, resumed, changed a little,
/// suspended again and resumed [`REPEAT`] times.
fn suspend_cycle(host: &TestHost) -> Cycle {
    api_ok(
        host,
        "POST",
        "/v1/vms",
        Some(json!({ "name": "snap", "memory_mib": MEMORY_MIB, "wait_ready": true })),
    );
    flotilla_exec(host, "snap", WORKLOAD);
    let t = Instant::now();
    let first = api_ok(host, "POST", "/v1/vms/snap/suspend", None);
    let suspend1 = t.elapsed().as_secs_f64();
    let layer1 = first["snapshot"].as_str().expect("layer").to_string();
    let t = Instant::now();
    api_ok(host, "POST", "/v1/vms/snap/resume?wait=true", None);
    flotilla_exec(host, "snap", "true");
    let resume1 = t.elapsed().as_secs_f64();
    flotilla_exec(host, "snap", SMALL_CHANGE);
    let t = Instant::now();
    let second = api_ok(host, "POST", "/v1/vms/snap/suspend", None);
    let suspend2 = t.elapsed().as_secs_f64();
    let layer2 = second["snapshot"].as_str().expect("layer").to_string();
    let mut resumes = Vec::new();
    for i in 0..REPEAT {
        if i > 0 {
            api_ok(host, "POST", "/v1/vms/snap/suspend", None);
        }
        let t = Instant::now();
        api_ok(host, "POST", "/v1/vms/snap/resume?wait=true", None);
        let resumed = t.elapsed();
        flotilla_exec(host, "snap", "true");
        resumes.push(t.elapsed().as_secs_f64());
        eprintln!(
            "resume {i}: ready at {} ms, exec answered at {} ms",
            resumed.as_millis(),
            t.elapsed().as_millis()
        );
    }
    // Where the time went, from the agent's log.
    for line in host.agent_log_lines() {
        if line.contains("restore phases") || line.contains(" resumed ") {
            eprintln!("{line}");
        }
    }
    let pid = api_ok(host, "GET", "/v1/vms/snap", None)["pid"]
        .as_i64()
        .expect("pid") as i32;
    let memory = memory_of(pid);
    let layers = host.data_path().join("snapshots/layers");
    let cycle = Cycle {
        suspend1,
        suspend2,
        resume1,
        resume2: median(&mut resumes),
        bytes1: dir_bytes(&layers.join(&layer1)),
        bytes2: dir_bytes(&layers.join(&layer2)),
        memory,
    };
    api_ok(host, "DELETE", "/v1/vms/snap?force=true", None);
    cycle
}

/// Memory per VM of [`DENSITY`] VMs started from the image's base snapshot,
/// each after one exec.
fn density(host: &TestHost) -> MemoryUse {
    let request = |i: usize| json!({ "name": format!("dense-{i}"), "memory_mib": MEMORY_MIB, "from_snapshot": "base" });
    let pids: Vec<i32> = (0..DENSITY)
        .map(|i| {
            let vm = api_ok(host, "POST", "/v1/vms", Some(request(i)));
            vm["pid"].as_i64().expect("pid") as i32
        })
        .collect();
    for i in 0..DENSITY {
        flotilla_exec(host, &format!("dense-{i}"), "true");
    }
    let uses: Vec<MemoryUse> = pids.iter().map(|p| memory_of(*p)).collect();
    let per_vm = |f: fn(&MemoryUse) -> u64| uses.iter().map(f).sum::<u64>() / DENSITY as u64;
    for i in 0..DENSITY {
        api_ok(
            host,
            "DELETE",
            &format!("/v1/vms/dense-{i}?force=true"),
            None,
        );
    }
    MemoryUse {
        resident: per_vm(|m| m.resident),
        proportional: per_vm(|m| m.proportional),
        anonymous: per_vm(|m| m.anonymous),
    }
}

const FLEET: usize = 20;
const DENSITY: usize = 10;

/// A process's memory, in bytes: resident (shared pages in full),
/// proportional (shared pages divided among their sharers), and anonymous
/// (its own, which the kernel cannot drop and read back from a file).
#[derive(Debug, Default, Clone, Copy)]
struct MemoryUse {
    resident: u64,
    proportional: u64,
    anonymous: u64,
}

fn memory_of(pid: i32) -> MemoryUse {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| {
        rollup
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    MemoryUse {
        resident: field("Rss:"),
        proportional: field("Pss:"),
        anonymous: field("Anonymous:"),
    }
}
const REPEAT: usize = 5;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
