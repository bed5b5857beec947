//! `flotilla up`: the single-host default in the foreground; Ctrl-C stops
//! its VMs and exits cleanly.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flotilla_testkit::{flotilla_bin, guest_agent_bin, qemu_pids_under, NetNs};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Whatever happens to the test (a failed assertion included), the `up`
/// it started and its QEMUs do not outlive it; a test process killed from
/// outside leaves the claim, and the next one reaps them.
struct Cleanup {
    dir: std::path::PathBuf,
    up: i32,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        // On success `up` has exited and been reaped: its pid may be
        // another process's by now.
        if std::thread::panicking() {
            let _ = kill(Pid::from_raw(self.up), Signal::SIGKILL);
            for pid in qemu_pids_under(&self.dir) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        flotilla_testkit::claims::release(&flotilla_testkit::claims::Resource::Dir(
            self.dir.clone(),
        ));
    }
}

#[test]
fn up_serves_and_ctrl_c_stops_everything() {
    let ns = NetNs::create().expect("namespace");
    let data = tempfile::Builder::new()
        .prefix("flotilla-up-")
        .tempdir()
        .expect("tempdir");
    flotilla_testkit::claims::claim(&flotilla_testkit::claims::Resource::Dir(
        data.path().to_path_buf(),
    ));
    // HTTPS: the CLI trusts the agent's certificate from its data directory.
    let endpoint = format!("https://{}:7777", ns.ns_ip);
    let log = std::fs::File::create(data.path().join("up.log")).expect("log");
    let mut up = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(flotilla_bin())
        .args(["up", "--data-dir"])
        .arg(data.path())
        .args(["--listen", &format!("{}:7777", ns.ns_ip)])
        .args(["--control-listen", &format!("{}:7700", ns.ns_ip)])
        .arg("--guest-agent")
        .arg(guest_agent_bin())
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("flotilla up");
    let _cleanup = Cleanup {
        dir: data.path().to_path_buf(),
        up: up.id() as i32,
    };
    let cli = |args: &[&str]| {
        // The agent's token from the data directory, as a local user's CLI
        // finds it.
        Command::new(flotilla_bin())
            .env("FLOTILLA_DATA_DIR", data.path())
            .args(["--endpoint", &endpoint])
            .args(args)
            .output()
            .expect("flotilla")
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while !cli(&["host"]).status.success() {
        assert!(
            Instant::now() < deadline,
            "up did not start: {}",
            std::fs::read_to_string(data.path().join("up.log")).unwrap_or_default()
        );
        assert!(
            up.try_wait().expect("wait").is_none(),
            "up exited: {}",
            std::fs::read_to_string(data.path().join("up.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // `up` built and registered the default image by itself.
    let out = cli(&["vm", "run", "demo", "--wait"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&["vm", "exec", "demo", "--", "uname", "-a"]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("Linux demo"));
    assert_eq!(qemu_pids_under(data.path()).len(), 1);

    // The control plane runs in the same process, with a default tenant
    // whose token is in the data directory, and the local agent registered.
    let token = std::fs::read_to_string(data.path().join("control/default.token")).expect("token");
    let control = |args: &[&str]| {
        Command::new(flotilla_bin())
            .args(["--control-url", &format!("http://{}:7700", ns.ns_ip)])
            .env("FLOTILLA_TOKEN", token.trim())
            .args(args)
            .output()
            .expect("flotilla")
    };
    let out = control(&["instance", "run", "web", "--wait"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("web placed on local"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = control(&["instance", "ls", "--json"]);
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if list[0]["observed"] == "running" {
            break;
        }
        assert!(Instant::now() < deadline, "web never seen running: {list}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(qemu_pids_under(data.path()).len(), 2);
    // With no token at all, the CLI takes the local ones: the admin's for
    // admin verbs.
    let out = Command::new(flotilla_bin())
        .args(["--control-url", &format!("http://{}:7700", ns.ns_ip)])
        .args(["hosts", "ls", "--json"])
        .env("FLOTILLA_DATA_DIR", data.path())
        .env_remove("FLOTILLA_TOKEN")
        .output()
        .expect("flotilla");
    let hosts: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert_eq!(
        hosts[0]["name"],
        "local",
        "{hosts} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(hosts[0]["state"], "up");

    // A warm suspend's waiting QEMU goes with the rest at Ctrl-C.
    for args in [
        &["vm", "run", "nap", "--wait"][..],
        &["vm", "suspend", "nap", "--warm"],
    ] {
        let out = cli(args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = cli(&["vm", "inspect", "nap", "--json"]);
        let nap: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if nap["warm"] == true {
            break;
        }
        assert!(Instant::now() < deadline, "no standby QEMU: {nap}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(qemu_pids_under(data.path()).len(), 3);

    kill(Pid::from_raw(up.id() as i32), Signal::SIGINT).expect("SIGINT");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = up.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "up did not stop within 30 s");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "up exited with {status}");
    assert!(qemu_pids_under(data.path()).is_empty(), "VMs left running");
    let links = ns.links();
    assert!(
        !links.iter().any(|l| l.starts_with("fl")),
        "links left: {links:?}"
    );
    // The VM is kept, stopped, for the next `up`.
    let record = std::fs::read_to_string(data.path().join("vms/demo/vm.json")).expect("record");
    assert!(record.contains("\"state\": \"stopped\""), "{record}");
}
