//! Boot benchmark (issue 2): create-to-ready latency over 20 boots, QEMU RSS
//! of an idle VM, and 10 VMs started at once, against a bare
//! `qemu-system-x86_64` booting the same kernel and initramfs in the same run.
//!
//! Run with `cargo bench -p flotilla-cli --bench boot` (as root; needs the
//! image that scripts/setup builds). Prints a Markdown table for BENCHMARKS.md.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flotilla_guest_protocol::client::GuestClient;
use flotilla_testkit::{bare_qemu_command, BareQemu, HostOptions, TestHost};
use serde_json::json;

const BOOTS: usize = 20;
const MEMORY_MIB: u64 = 256;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn flotilla_boot(host: &TestHost, name: &str) -> (f64, i32) {
    let t = Instant::now();
    let (status, body) = host.api(
        "POST",
        "/v1/vms",
        Some(json!({ "name": name, "memory_mib": MEMORY_MIB, "vcpus": 1, "wait_ready": true })),
    );
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(status, 201, "{body}");
    (secs, body["pid"].as_i64().unwrap_or(0) as i32)
}

/// A bare QEMU with the same kernel, initramfs, memory and agent channel,
/// no disk and no NIC; ready when the guest agent answers a Hello.
async fn bare_boot(
    kernel: &Path,
    initrd: &Path,
    dir: &Path,
    i: usize,
    cmdline: &str,
) -> (f64, BareQemu) {
    let sock = dir.join(format!("bare{i}.sock"));
    let t = Instant::now();
    let cmd = bare_qemu_command(kernel, initrd, MEMORY_MIB, cmdline, &sock);
    let bare = BareQemu::spawn(cmd).expect("qemu-system-x86_64");
    GuestClient::wait_ready(&sock, Duration::from_secs(60))
        .await
        .expect("bare guest ready");
    (t.elapsed().as_secs_f64(), bare)
}

/// The kernel command line a bare QEMU user would write.
const BARE_CMDLINE: &str = "console=ttyS0 quiet panic=-1";
/// The same with the kernel tuning Flotilla applies under TCG, so the
/// comparison isolates Flotilla's own overhead.
const BARE_TUNED_CMDLINE: &str = "console=ttyS0 quiet panic=-1 nolapic_timer";

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

fn main() {
    let host = TestHost::start_with(HostOptions::default()).expect("test host");
    let (_, image) = host.api("GET", "/v1/images/default", None);
    let kernel = PathBuf::from(image["kernel"].as_str().expect("kernel"));
    let initrd = PathBuf::from(image["initrd"].as_str().expect("initrd"));
    let (_, info) = host.api("GET", "/v1/host", None);
    let rt = tokio::runtime::Runtime::new().expect("runtime");

    // Interleave the kinds of boot so machine noise hits all alike.
    let (mut flotilla, mut bare, mut tuned) = (Vec::new(), Vec::new(), Vec::new());
    let (mut flotilla_rss, mut bare_rss) = (0, 0);
    for i in 0..BOOTS {
        let (secs, pid) = flotilla_boot(&host, &format!("bench-{i}"));
        flotilla.push(secs);
        if i == 0 {
            std::thread::sleep(Duration::from_secs(3));
            flotilla_rss = rss_kib(pid);
        }
        host.api("DELETE", &format!("/v1/vms/bench-{i}?force=true"), None);

        let dir = host.data_path();
        let (secs, q) = rt.block_on(bare_boot(&kernel, &initrd, dir, i, BARE_CMDLINE));
        bare.push(secs);
        if i == 0 {
            std::thread::sleep(Duration::from_secs(3));
            bare_rss = rss_kib(q.pid());
        }
        drop(q);
        let (secs, q) = rt.block_on(bare_boot(&kernel, &initrd, dir, i, BARE_TUNED_CMDLINE));
        tuned.push(secs);
        drop(q);
    }
    let (flotilla, bare, tuned) = (sorted(flotilla), sorted(bare), sorted(tuned));

    let t = Instant::now();
    std::thread::scope(|s| {
        for i in 0..10 {
            let host = &host;
            s.spawn(move || flotilla_boot(host, &format!("burst-{i}")));
        }
    });
    let burst = t.elapsed().as_secs_f64();
    for i in 0..10 {
        host.api("DELETE", &format!("/v1/vms/burst-{i}?force=true"), None);
    }

    println!(
        "accelerator: {}; {BOOTS} boots each, 256 MiB, 1 vCPU",
        info["accel"].as_str().unwrap_or("?")
    );
    println!();
    println!("| metric | Flotilla | bare QEMU | ratio | bare QEMU, tuned cmdline | ratio |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for (label, p) in [("ready p50", 0.5), ("ready p95", 0.95)] {
        let (f, b, t) = (
            percentile(&flotilla, p),
            percentile(&bare, p),
            percentile(&tuned, p),
        );
        println!(
            "| {label} | {f:.3} s | {b:.3} s | {:.2}x | {t:.3} s | {:.2}x |",
            f / b,
            f / t
        );
    }
    println!(
        "| QEMU RSS, idle VM | {} MiB | {} MiB | {:.2}x | | |",
        flotilla_rss / 1024,
        bare_rss / 1024,
        flotilla_rss as f64 / bare_rss.max(1) as f64
    );
    println!("| 10 VMs at once, all ready | {burst:.2} s | | | | |");
}
