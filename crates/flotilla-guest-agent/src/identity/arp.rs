//! Announcing new IPv4 addresses with gratuitous ARP, so neighbours drop the source VM's MAC
//! without waiting for their caches to expire.

use std::net::IpAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::find_tool;
use crate::log;

/// How long a background `arping` may run before it is killed.
const ARPING_LIMIT: Duration = Duration::from_secs(3);

/// Sends a gratuitous ARP for each new IPv4 address (busybox `arping`, if
/// present) from a thread of its own, killing any that outlive
/// [`ARPING_LIMIT`], so they neither delay the reply nor stay zombies.
pub(super) fn announce_in_background(interfaces: Vec<(String, Vec<IpAddr>)>) {
    let Some(arping) = find_tool("arping") else {
        return;
    };
    if interfaces
        .iter()
        .all(|(_, ips)| !ips.iter().any(IpAddr::is_ipv4))
    {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("arping".into())
        .spawn(move || {
            let mut children: Vec<Child> = interfaces
                .iter()
                .flat_map(|(name, ips)| {
                    ips.iter()
                        .filter(|ip| ip.is_ipv4())
                        .map(move |ip| (name, ip))
                })
                .filter_map(|(name, ip)| {
                    Command::new(&arping)
                        .args(["-U", "-c", "1", "-I", name, &ip.to_string()])
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .ok()
                })
                .collect();
            let until = Instant::now() + ARPING_LIMIT;
            while !children.is_empty() {
                children.retain_mut(|child| matches!(child.try_wait(), Ok(None)));
                if Instant::now() >= until {
                    for child in &mut children {
                        let _ = child.kill();
                        let _ = child.wait();
                    }
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
    if let Err(error) = spawned {
        log!("cannot start arping: {error}");
    }
}
