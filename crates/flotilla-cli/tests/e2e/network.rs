//! VM networking: the host and other VMs on the same host are reachable.

use flotilla_testkit::TestHost;

use crate::{exec, run_vm};

#[test]
fn vms_reach_the_host_and_each_other() {
    let host = TestHost::start().expect("test host");
    let a = run_vm(&host, "net-a");
    let b = run_vm(&host, "net-b");
    let gw = a["nics"][0]["gateway"]
        .as_str()
        .expect("gateway")
        .to_string();
    let b_ip = b["nics"][0]["ip"].as_str().expect("ip").to_string();

    let (code, out, err) = exec(&host, "net-a", &["ping", "-c", "1", "-W", "5", &gw]);
    assert_eq!(code, 0, "ping host: {out}{err}");
    let (code, out, err) = exec(&host, "net-a", &["ping", "-c", "1", "-W", "5", &b_ip]);
    assert_eq!(code, 0, "ping VM: {out}{err}");

    // The host reaches the guest too (from inside the host's namespace).
    let ping = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &host.netns.name,
            "ping",
            "-c",
            "1",
            "-W",
            "5",
            &b_ip,
        ])
        .output()
        .expect("ping");
    assert!(
        ping.status.success(),
        "{}",
        String::from_utf8_lossy(&ping.stdout)
    );

    // The guest's own view of its address matches the record.
    let (_, addrs, _) = exec(&host, "net-b", &["ip", "-4", "-o", "addr", "show", "eth0"]);
    assert!(addrs.contains(&format!("{b_ip}/24")), "{addrs}");
}
