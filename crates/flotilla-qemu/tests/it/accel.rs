//! Accelerator detection: explicit choices, unusable KVM, and probe boots
//! with a stub guest under real QEMU.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flotilla_qemu::{
    detect_accel, detect_accel_with_device, run_probe, Accel, AccelChoice, AccelProbe,
    ProbeOutcome, QemuError, PROBE_MARKER,
};

use crate::common::{self, StubEnd};

fn probe(kernel: PathBuf, timeout: Duration) -> AccelProbe {
    AccelProbe {
        qemu_binary: common::qemu_binary(),
        kernel,
        initrd: None,
        timeout,
        cache: None,
    }
}

/// A probe kernel that prints the marker at once, then triple-faults.
fn marker_stub(dir: &Path) -> PathBuf {
    let kernel = dir.join("vmlinux");
    common::write_pvh_stub(
        &kernel,
        &format!("{PROBE_MARKER}\r\n"),
        StubEnd::TripleFault,
    );
    kernel
}

/// A path that exists but is no KVM device.
fn fake_kvm(dir: &Path) -> PathBuf {
    let path = dir.join("kvm");
    std::fs::write(&path, b"").expect("fake kvm");
    path
}

#[tokio::test]
async fn explicit_tcg_needs_no_probe() {
    let missing = AccelProbe::new("/nonexistent/qemu", "/nonexistent/vmlinux");
    let decision = detect_accel(AccelChoice::Tcg, &missing).await.expect("tcg");
    assert_eq!(decision.accel, Accel::Tcg);
    assert!(decision.reason.contains("explicitly"));
}

#[tokio::test]
async fn explicit_kvm_fails_clearly_without_a_usable_device() {
    let dir = common::temp_dir();
    let p = AccelProbe::new("/nonexistent/qemu", "/nonexistent/vmlinux");
    for device in [dir.path().join("absent"), fake_kvm(dir.path())] {
        let err = detect_accel_with_device(AccelChoice::Kvm, &p, &device)
            .await
            .expect_err("unusable KVM");
        let text = err.to_string();
        assert!(matches!(err, QemuError::KvmUnavailable { .. }), "{text}");
        assert!(text.contains(&device.display().to_string()), "{text}");
        assert!(text.contains("tcg"), "{text}");
    }
}

#[tokio::test]
async fn auto_without_usable_kvm_is_tcg_at_once() {
    let dir = common::temp_dir();
    // A missing binary proves no probe is attempted.
    let p = AccelProbe::new("/nonexistent/qemu", "/nonexistent/vmlinux");
    let started = Instant::now();
    let decision = detect_accel_with_device(AccelChoice::Auto, &p, &fake_kvm(dir.path()))
        .await
        .expect("auto");
    assert_eq!(decision.accel, Accel::Tcg);
    assert!(
        decision.reason.contains("not a KVM device"),
        "{}",
        decision.reason
    );
    assert!(started.elapsed() < Duration::from_millis(500));
}

#[tokio::test]
async fn auto_without_a_probe_kernel_is_tcg() {
    let p = AccelProbe::new(common::qemu_binary(), "/nonexistent/vmlinux");
    let decision = detect_accel(AccelChoice::Auto, &p).await.expect("auto");
    assert_eq!(decision.accel, Accel::Tcg);
    // The agent passes an empty path when it has no guest image yet.
    let p = AccelProbe::new(common::qemu_binary(), "");
    let decision = detect_accel(AccelChoice::Auto, &p).await.expect("auto");
    assert_eq!(decision.accel, Accel::Tcg);
}

/// `auto` decides within the timeout on any host, and picks KVM only for a
/// guest that ran under it. (On this machine KVM is paravirtual: this tiny
/// probe guest may run on it, a Linux guest does not, so the agent probes
/// with the guest kernel; the end-to-end tests boot under what it chose.)
#[tokio::test]
async fn auto_on_this_host_decides_within_the_timeout() {
    let dir = common::temp_dir();
    let kernel = marker_stub(dir.path());
    let p = probe(kernel, Duration::from_secs(2));
    let started = Instant::now();
    let decision = detect_accel(AccelChoice::Auto, &p).await.expect("auto");
    let elapsed = started.elapsed();
    println!(
        "auto chose {} in {elapsed:?}: {}",
        decision.accel, decision.reason
    );
    assert!(elapsed < Duration::from_secs(4), "took {elapsed:?}");
    if decision.accel == Accel::Kvm {
        assert!(
            decision.reason.contains("ran under KVM"),
            "{}",
            decision.reason
        );
    }
}

#[tokio::test]
async fn probe_sees_the_marker_of_a_guest_that_runs() {
    let dir = common::temp_dir();
    let kernel = dir.path().join("vmlinux");
    common::write_pvh_stub(
        &kernel,
        &format!("booting\r\n{PROBE_MARKER}\r\n"),
        StubEnd::TripleFault,
    );
    let outcome = run_probe(&probe(kernel, Duration::from_secs(10)), Accel::Tcg)
        .await
        .expect("probe");
    assert!(
        matches!(outcome, ProbeOutcome::MarkerSeen { .. }),
        "{outcome:?}"
    );
}

/// True if some process has `needle` in its command line.
fn process_mentions(needle: &str) -> bool {
    std::fs::read_dir("/proc")
        .expect("read /proc")
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .any(|cmdline| String::from_utf8_lossy(&cmdline).contains(needle))
}

#[tokio::test]
async fn probe_times_out_on_a_silent_guest_and_kills_qemu() {
    let dir = common::temp_dir();
    let kernel = dir.path().join("vmlinux");
    common::write_pvh_stub(&kernel, "no marker here\r\n", StubEnd::Halt);
    let started = Instant::now();
    let outcome = run_probe(
        &probe(kernel.clone(), Duration::from_millis(1500)),
        Accel::Tcg,
    )
    .await
    .expect("probe");
    assert!(
        matches!(outcome, ProbeOutcome::TimedOut { .. }),
        "{outcome:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(4));
    assert!(
        !process_mentions(&kernel.display().to_string()),
        "the probe QEMU is still around"
    );
}

/// A silent guest that idles uses little CPU: its timeout says nothing
/// about KVM. One that keeps its CPU busy (as a Linux guest crawling under
/// a KVM that cannot run it does) uses far more, as much as the host gives
/// it (so only a floor is checked: the machine may be busy).
#[tokio::test]
async fn a_timeout_counts_the_cpu_its_guest_used() {
    let dir = common::temp_dir();
    let timeout = Duration::from_millis(1500);
    let mut used = Vec::new();
    for end in [StubEnd::Halt, StubEnd::Spin] {
        let kernel = dir.path().join("vmlinux");
        common::write_pvh_stub(&kernel, "no marker here\r\n", end);
        let outcome = run_probe(&probe(kernel, timeout), Accel::Tcg)
            .await
            .expect("probe");
        let ProbeOutcome::TimedOut { cpu: Some(cpu), .. } = &outcome else {
            panic!("expected a timeout with its CPU time, got {outcome:?}");
        };
        assert_eq!(
            outcome.is_conclusive(timeout),
            *cpu >= timeout / 4,
            "{outcome:?}"
        );
        used.push(*cpu);
    }
    let (idle, spinning) = (used[0], used[1]);
    assert!(idle < timeout / 4, "an idle guest used {idle:?}");
    assert!(
        spinning > idle + Duration::from_millis(100),
        "idle {idle:?}, spinning {spinning:?}"
    );
}

/// The second `auto` decision with the same probe comes from the cache at
/// once and says so; without a cache every decision probes.
#[tokio::test]
async fn auto_remembers_a_probe_for_the_boot() {
    let dir = common::temp_dir();
    let kernel = marker_stub(dir.path());
    let cache = dir.path().join("run/accel-probe.json");
    let mut p = probe(kernel, Duration::from_secs(2));
    p.cache = Some(cache.clone());
    let first = detect_accel(AccelChoice::Auto, &p).await.expect("auto");
    assert!(!first.reason.contains("remembered"), "{}", first.reason);
    if let Err(why) = flotilla_qemu::check_kvm_device(Path::new(flotilla_qemu::accel::KVM_DEVICE)) {
        // No probe runs without a KVM device, and nothing is remembered.
        assert!(!cache.exists(), "{why}");
        return;
    }
    // This stub prints the marker at once: under KVM it is seen (remembered);
    // a KVM that cannot start it exits (not remembered: it may be passing).
    if !cache.is_file() {
        assert!(first.reason.contains("exited"), "{}", first.reason);
        return;
    }
    let started = Instant::now();
    let second = detect_accel(AccelChoice::Auto, &p).await.expect("auto");
    assert!(started.elapsed() < Duration::from_millis(200));
    assert_eq!(second.accel, first.accel);
    assert!(
        second.reason.starts_with(&first.reason) && second.reason.contains("remembered in"),
        "{}",
        second.reason
    );
    // A different probe (here: its timeout) is not answered from the cache.
    p.timeout = Duration::from_secs(3);
    let third = detect_accel(AccelChoice::Auto, &p).await.expect("auto");
    assert!(!third.reason.contains("remembered"), "{}", third.reason);
}

#[tokio::test]
async fn probe_reports_why_qemu_exited() {
    let dir = common::temp_dir();
    let kernel = dir.path().join("vmlinux");
    std::fs::copy("/bin/true", &kernel).expect("copy /bin/true");
    let outcome = run_probe(&probe(kernel, Duration::from_secs(10)), Accel::Tcg)
        .await
        .expect("probe");
    match outcome {
        ProbeOutcome::Exited { exit, stderr_tail } => {
            assert_eq!(exit, "exit code 1");
            assert!(stderr_tail.contains("PVH ELF Note"), "{stderr_tail}");
        }
        other => panic!("expected Exited, got {other:?}"),
    }
}
