//! Live migration benchmark (issue 5): Flotilla's migration of a running
//! VM between two hosts (network namespaces joined by a fabric) against a
//! plain QEMU-to-QEMU migration of the same guest between the same two
//! hosts, in one run.
//!
//! Guest-observed downtime: the guest sends a UDP datagram to its gateway
//! every millisecond (`flotilla-guest-agent tick`); a receiver on each host
//! notes arrival times, and the largest gap across both is the pause the
//! guest's traffic saw (the guest's own clocks stop while it is paused, so
//! it cannot see it itself). The baseline's guest gets the same: a tap on
//! each host's bridge, the same address, the same ticker.
//!
//! Run with `cargo bench -p flotilla-cli --bench migrate` (as root, after
//! `./scripts/setup`). Prints a Markdown table for BENCHMARKS.md: with
//! `FLOTILLA_BENCH_RUNS=N`, each line is the median of N runs (ranges in
//! brackets). See [`Selection`] for choosing cases; for experiments,
//! `FLOTILLA_BENCH_BANDWIDTH_MIBPS` and `FLOTILLA_BENCH_MAX_DOWNTIME_MS`
//! set Flotilla's limits (and `FLOTILLA_TEST_AGENT_ARGS` its agents'
//! flags, e.g. `--guest-huge-pages on`).

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_guest_protocol::client::GuestClient;
use flotilla_qemu::QmpClient;
use flotilla_testkit::{bare_qemu_command, BareQemu, Fabric, HostOptions, TestHost};
use serde_json::{json, Value};

const TICK_PORT: u16 = 9999;
/// Pages the writer dirties: this many bytes every 100 ms.
const WRITER_CHUNK: u64 = 2_000_000;

fn api_ok(host: &TestHost, method: &str, path: &str, body: Option<Value>) -> Value {
    let (s, b) = host.api(method, path, body);
    assert!((200..300).contains(&s), "{method} {path}: {s} {b}");
    b
}

fn exec(host: &TestHost, vm: &str, cmd: &str) {
    api_ok(
        host,
        "POST",
        &format!("/v1/vms/{vm}/exec"),
        Some(json!({ "argv": ["sh", "-c", cmd] })),
    );
}

/// Notes when datagrams arrive at the gateway address of `netns`.
fn receiver(netns: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<Instant>> {
    std::thread::spawn(move || {
        let ns = std::fs::File::open(format!("/var/run/netns/{netns}")).expect("netns");
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let socket = UdpSocket::bind(("10.77.0.1", TICK_PORT)).expect("bind");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let mut arrivals = Vec::new();
        let mut buf = [0u8; 64];
        while !stop.load(Ordering::Relaxed) {
            if socket.recv(&mut buf).is_ok() {
                arrivals.push(Instant::now());
            }
        }
        arrivals
    })
}

/// Stops both hosts' receivers a second after the migration; returns how
/// many ticks arrived and the largest gap between them.
fn stop_receivers(
    stop: &AtomicBool,
    ra: std::thread::JoinHandle<Vec<Instant>>,
    rb: std::thread::JoinHandle<Vec<Instant>>,
) -> (usize, Duration) {
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let mut arrivals = ra.join().expect("receiver");
    arrivals.extend(rb.join().expect("receiver"));
    (arrivals.len(), largest_gap(arrivals))
}

fn largest_gap(mut arrivals: Vec<Instant>) -> Duration {
    arrivals.sort();
    arrivals
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default()
}

struct Row {
    case: String,
    total_s: f64,
    /// Until the VM runs on the target (the baseline: its total).
    running_s: f64,
    qemu_downtime_ms: u64,
    guest_gap_ms: Option<f64>,
    sent_mib: f64,
    memory_mib: f64,
    disk_sync_s: Option<f64>,
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// Flotilla: a VM on `a` migrated to `b` through the agents' API.
fn flotilla_case(a: &TestHost, b: &TestHost, memory_mib: u64, writer: bool, tls: bool) -> Row {
    let name = format!(
        "m{memory_mib}{}{}",
        if writer { "w" } else { "" },
        if tls { "t" } else { "" }
    );
    api_ok(
        a,
        "POST",
        "/v1/vms",
        Some(json!({ "name": name, "memory_mib": memory_mib, "wait_ready": true })),
    );
    exec(
        a,
        &name,
        &format!(
            "setsid /sbin/flotilla-guest-agent tick 10.77.0.1:{TICK_PORT} 1000 >/dev/null 2>&1 &"
        ),
    );
    if writer {
        exec(
            a,
            &name,
            &format!("setsid sh -c 'while :; do head -c {WRITER_CHUNK} /dev/urandom > /tmp/dirty; sleep 0.1; done' >/dev/null 2>&1 &"),
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    let ra = receiver(a.netns.name.clone(), stop.clone());
    let rb = receiver(b.netns.name.clone(), stop.clone());
    std::thread::sleep(Duration::from_secs(2));
    let mut request = json!({ "target": b.endpoint, "target_token": b.agent_token(),
                              "target_fingerprint": b.fingerprint(), "tls": tls });
    // For experiments: Flotilla's limits on the memory stream.
    for (var, field) in [
        ("FLOTILLA_BENCH_BANDWIDTH_MIBPS", "max_bandwidth_mibps"),
        ("FLOTILLA_BENCH_MAX_DOWNTIME_MS", "max_downtime_ms"),
    ] {
        if let Some(n) = std::env::var(var).ok().and_then(|v| v.parse::<u64>().ok()) {
            request[field] = json!(n);
        }
    }
    let t = Instant::now();
    let m = api_ok(
        a,
        "POST",
        &format!("/v1/vms/{name}/migrate?wait=true"),
        Some(request),
    );
    let total = t.elapsed().as_secs_f64();
    assert_eq!(m["phase"], "completed", "{m:#}");
    let (received, gap) = stop_receivers(&stop, ra, rb);
    api_ok(b, "DELETE", &format!("/v1/vms/{name}?force=true"), None);
    // Where the time goes: this migration's steps in both agents' logs.
    let id = m["id"].as_str().unwrap_or("-").to_string();
    for host in [a, b] {
        let vm = format!("vm={name} ");
        for line in host.agent_log_lines() {
            if !line.contains(&id) && !line.contains(&vm) {
                continue;
            }
            eprintln!("{line}");
        }
    }
    let switch_s = m["switch_over_ms"].as_u64().unwrap_or(0) as f64 / 1000.0;
    Row {
        case: format!(
            "{memory_mib} MiB{}",
            if writer { ", writer 20 MB/s" } else { ", idle" }
        ),
        total_s: total,
        running_s: switch_s,
        qemu_downtime_ms: m["downtime_ms"].as_u64().unwrap_or(0),
        guest_gap_ms: (received > 100).then_some(gap.as_secs_f64() * 1000.0),
        sent_mib: mib(m["transferred_bytes"].as_u64().unwrap_or(0)),
        memory_mib: mib(m["memory_bytes"].as_u64().unwrap_or(0)),
        disk_sync_s: Some(total - switch_s),
    }
}

fn in_netns(ns: &str, cmd: std::process::Command) -> std::process::Command {
    let mut wrapped = std::process::Command::new("ip");
    wrapped
        .args(["netns", "exec", ns])
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    wrapped
}

/// The baseline: the same kernel, initramfs and disk under bare QEMUs, one
/// per host, migrated by QEMU alone (the disk on storage both see).
#[allow(clippy::too_many_arguments)]
fn baseline_case(
    a: &TestHost,
    b: &TestHost,
    image: (&Path, &Path, &Path),
    memory_mib: u64,
    writer: bool,
    tls: bool,
    unlimited: bool,
    rt: &tokio::runtime::Runtime,
) -> Row {
    let (kernel, initrd, rootfs) = image;
    let dir = tempfile::tempdir().expect("tempdir");
    // Over TLS: the same pre-shared key scheme as Flotilla's.
    let psk_dir = dir.path().join("tls");
    std::fs::create_dir_all(&psk_dir).expect("dir");
    std::fs::write(
        psk_dir.join("keys.psk"),
        format!("qemu:{}\n", "ab".repeat(32)),
    )
    .expect("psk");
    let root = dir.path().join("root.qcow2");
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(rootfs)
        .arg(&root)
        .status()
        .expect("qemu-img");
    assert!(made.success());
    // A tap on each host's bridge, as Flotilla's VMs have.
    for host in [a, b] {
        host.netns
            .exec_ip(&["tuntap", "add", "dev", "fltbase", "mode", "tap"])
            .expect("tap");
        host.netns
            .exec_ip(&["link", "set", "dev", "fltbase", "master", "flbr0", "up"])
            .expect("tap up");
    }
    let spawn = |side: &str, ns: &str, incoming: bool| {
        let side_dir = dir.path().join(side);
        std::fs::create_dir_all(&side_dir).expect("dir");
        let cmdline = "console=ttyS0 quiet panic=-1 nolapic_timer flotilla.root=/dev/vda \
                       flotilla.ip=10.77.0.200/24 flotilla.gw=10.77.0.1";
        let mut cmd = bare_qemu_command(
            kernel,
            initrd,
            memory_mib,
            cmdline,
            &side_dir.join("agent.sock"),
        );
        let disk = json!({
            "driver": "qcow2", "node-name": "disk-root",
            "file": { "driver": "file", "filename": root.to_string_lossy() },
        });
        cmd.arg("-blockdev")
            .arg(disk.to_string())
            .args(["-device", "virtio-blk-device,drive=disk-root"])
            .args([
                "-netdev",
                "tap,id=net0,ifname=fltbase,script=no,downscript=no",
            ])
            .args([
                "-device",
                "virtio-net-device,netdev=net0,mac=52:54:00:aa:bb:cc",
            ]);
        cmd.arg("-qmp").arg(format!(
            "unix:{},server=on,wait=off",
            side_dir.join("qmp.sock").display()
        ));
        if tls {
            let endpoint = if incoming { "server" } else { "client" };
            cmd.arg("-object").arg(format!(
                "tls-creds-psk,id=tls0,endpoint={endpoint},dir={}",
                psk_dir.display()
            ));
        }
        if incoming {
            cmd.args(["-incoming", "defer"]);
        }
        BareQemu::spawn(in_netns(ns, cmd)).expect("qemu")
    };
    let _source = spawn("a", &a.netns.name, false);
    let target_uri = format!("tcp:{}:4444", b.netns.ns_ip);
    rt.block_on(async {
        let (guest, _) =
            GuestClient::wait_ready(&dir.path().join("a/agent.sock"), Duration::from_secs(60))
                .await
                .expect("guest");
        let mut cmds = vec![format!(
            "setsid /sbin/flotilla-guest-agent tick 10.77.0.1:{TICK_PORT} 1000 >/dev/null 2>&1 &"
        )];
        if writer {
            cmds.push(format!("setsid sh -c 'while :; do head -c {WRITER_CHUNK} /dev/urandom > /tmp/dirty; sleep 0.1; done' >/dev/null 2>&1 &"));
        }
        for cmd in cmds {
            guest
                .exec_collect(
                    flotilla_guest_protocol::ExecRequest::new(["sh", "-c", &cmd]),
                    Duration::from_secs(30),
                )
                .await
                .expect("guest command");
        }
    });
    let _target = spawn("b", &b.netns.name, true);
    let stop = Arc::new(AtomicBool::new(false));
    let ra = receiver(a.netns.name.clone(), stop.clone());
    let rb = receiver(b.netns.name.clone(), stop.clone());
    std::thread::sleep(Duration::from_secs(2));
    let mut creds = json!({ "tls-creds": if tls { "tls0" } else { "" } });
    if unlimited {
        // As Flotilla's default; QEMU's own is 128 MiB/s.
        creds["max-bandwidth"] = json!(0);
    }
    let info = rt.block_on(async {
        let target =
            QmpClient::connect_retry(&dir.path().join("b/qmp.sock"), Duration::from_secs(10))
                .await
                .expect("qmp");
        target
            .execute::<Value>("migrate-set-parameters", Some(creds.clone()))
            .await
            .expect("tls");
        target
            .execute::<Value>("migrate-incoming", Some(json!({ "uri": target_uri })))
            .await
            .expect("incoming");
        let qmp = QmpClient::connect_retry(&dir.path().join("a/qmp.sock"), Duration::from_secs(10))
            .await
            .expect("qmp");
        qmp.execute::<Value>("migrate-set-parameters", Some(creds))
            .await
            .expect("tls");
        qmp.execute::<Value>("migrate", Some(json!({ "uri": target_uri })))
            .await
            .expect("migrate");
        loop {
            let info: Value = qmp.execute("query-migrate", None).await.expect("query");
            match info["status"].as_str() {
                Some("completed") => break info,
                Some("failed") => panic!("baseline migration failed: {info}"),
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    });
    let (received, gap) = stop_receivers(&stop, ra, rb);
    for host in [a, b] {
        let _ = host.netns.exec_ip(&["link", "del", "fltbase"]);
    }
    Row {
        case: format!(
            "{memory_mib} MiB{}",
            if writer { ", writer 20 MB/s" } else { ", idle" }
        ),
        total_s: info["total-time"].as_u64().unwrap_or(0) as f64 / 1000.0,
        running_s: info["total-time"].as_u64().unwrap_or(0) as f64 / 1000.0,
        qemu_downtime_ms: info["downtime"].as_u64().unwrap_or(0),
        guest_gap_ms: (received > 100).then_some(gap.as_secs_f64() * 1000.0),
        sent_mib: mib(info["ram"]["transferred"].as_u64().unwrap_or(0)),
        memory_mib: mib(info["ram"]["total"].as_u64().unwrap_or(0)),
        disk_sync_s: None,
    }
}

/// Which cases to run and how often, from the environment (all cases
/// once when unset): `FLOTILLA_BENCH_CASES=256,256w,1024` (`w`: with the
/// writer), `FLOTILLA_BENCH_TRANSPORT=plain|tls`, `FLOTILLA_BENCH_RUNS=N`,
/// `FLOTILLA_BENCH_BASELINES=0` (Flotilla's rows only).
struct Selection {
    cases: Option<Vec<String>>,
    transport: Option<String>,
    runs: usize,
    baselines: bool,
}

impl Selection {
    fn from_env() -> Selection {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Selection {
            cases: var("FLOTILLA_BENCH_CASES")
                .map(|v| v.split(',').map(|c| c.trim().to_string()).collect()),
            transport: var("FLOTILLA_BENCH_TRANSPORT"),
            runs: var("FLOTILLA_BENCH_RUNS")
                .map(|v| v.parse().expect("FLOTILLA_BENCH_RUNS: a number"))
                .unwrap_or(1),
            baselines: var("FLOTILLA_BENCH_BASELINES").is_none_or(|v| v != "0"),
        }
    }

    fn wants_case(&self, memory_mib: u64, writer: bool) -> bool {
        let id = format!("{memory_mib}{}", if writer { "w" } else { "" });
        self.cases.as_ref().is_none_or(|c| c.contains(&id))
    }

    fn wants_transport(&self, tls: bool) -> bool {
        let id = if tls { "tls" } else { "plain" };
        self.transport.as_ref().is_none_or(|t| t == id)
    }
}

fn main() {
    let fabric = Arc::new(Fabric::create().expect("fabric"));
    let options = HostOptions {
        fabric: Some(fabric.clone()),
        ..HostOptions::default()
    };
    let a = TestHost::start_with(options.clone()).expect("host a");
    let b = TestHost::start_with(options).expect("host b");
    let image = api_ok(&a, "GET", "/v1/images/default", None);
    let path = |k: &str| PathBuf::from(image[k].as_str().expect("image path"));
    let (kernel, initrd, rootfs) = (path("kernel"), path("initrd"), path("rootfs"));
    let rt = tokio::runtime::Runtime::new().expect("runtime");

    let selection = Selection::from_env();
    let cases = [(256, false), (256, true), (1024, false)];
    let label = |tls: bool| if tls { "TLS" } else { "plain TCP" };
    println!(
        "| case | | total | runs on the target | pause (QEMU) | pause seen by guest traffic | memory sent | disk sync |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for (memory, writer) in cases {
        if !selection.wants_case(memory, writer) {
            continue;
        }
        let mut rows = Vec::new();
        for tls in [false, true] {
            if !selection.wants_transport(tls) {
                continue;
            }
            let image = (kernel.as_path(), initrd.as_path(), rootfs.as_path());
            for _ in 0..selection.runs {
                rows.push((
                    format!("Flotilla, {}", label(tls)),
                    flotilla_case(&a, &b, memory, writer, tls),
                ));
                if !selection.baselines {
                    continue;
                }
                rows.push((
                    format!("QEMU alone, {}", label(tls)),
                    baseline_case(&a, &b, image, memory, writer, tls, false, &rt),
                ));
                rows.push((
                    format!("QEMU alone, no bandwidth limit, {}", label(tls)),
                    baseline_case(&a, &b, image, memory, writer, tls, true, &rt),
                ));
            }
        }
        // One line per kind of run: medians (with the range over several
        // runs), in the order they first ran.
        let mut kinds: Vec<&str> = Vec::new();
        for (who, _) in &rows {
            if !kinds.contains(&who.as_str()) {
                kinds.push(who);
            }
        }
        for who in kinds {
            let runs: Vec<&Row> = rows
                .iter()
                .filter(|(w, _)| w == who)
                .map(|(_, r)| r)
                .collect();
            print_summary(who, &runs);
        }
    }
}

/// A table line for `runs` of one kind: the median of each column, and
/// for several runs the range of the total, the time until the VM runs on
/// the target and the pause its traffic saw.
fn print_summary(who: &str, runs: &[&Row]) {
    let sorted = |f: &dyn Fn(&Row) -> Option<f64>| {
        let mut v: Vec<f64> = runs.iter().filter_map(|r| f(r)).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let stat = |f: &dyn Fn(&Row) -> Option<f64>, unit: &str, digits: usize| {
        let v = sorted(f);
        if v.is_empty() {
            return "-".to_string();
        }
        let median = v[v.len() / 2];
        match v.len() {
            1 => format!("{median:.digits$} {unit}"),
            _ => format!(
                "{median:.digits$} {unit} ({:.digits$}-{:.digits$})",
                v[0],
                v[v.len() - 1]
            ),
        }
    };
    let first = runs[0];
    let median_of = |f: &dyn Fn(&Row) -> Option<f64>| {
        let v = sorted(f);
        v[v.len() / 2]
    };
    println!(
        "| {} | {who} | {} | {} | {:.0} ms | {} | {:.1} MiB of {:.0} MiB | {} |",
        first.case,
        stat(&|r| Some(r.total_s), "s", 3),
        stat(&|r| Some(r.running_s), "s", 3),
        median_of(&|r| Some(r.qemu_downtime_ms as f64)),
        stat(&|r| r.guest_gap_ms, "ms", 1),
        median_of(&|r| Some(r.sent_mib)),
        first.memory_mib,
        match first.disk_sync_s {
            Some(_) => stat(&|r| r.disk_sync_s, "s", 3),
            None => "- (shared disk)".into(),
        },
    );
}
