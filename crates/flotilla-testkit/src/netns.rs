//! A network namespace joined to the caller's by a veth pair with a /30.

use std::process::Command;

use anyhow::{bail, Context};

pub struct NetNs {
    pub name: String,
    pub host_veth: String,
    /// The namespace's address, reachable from the caller.
    pub ns_ip: String,
    pub host_ip: String,
}

pub(crate) fn ip(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network joining test hosts as one cluster: a bridge in the caller's
/// namespace with the first address of a /24; each host's namespace joins
/// it with its own address, so hosts reach each other (migration streams,
/// disk exports) over real TCP, and the caller reaches every host.
#[derive(Debug)]
pub struct Fabric {
    pub bridge: String,
    /// The caller's address on the fabric.
    pub gateway: String,
    prefix: [u8; 3],
    next: std::sync::atomic::AtomicU8,
}

impl Fabric {
    pub fn create() -> anyhow::Result<Fabric> {
        let tag: u32 = rand::random::<u32>() & 0xff_ffff;
        let bridge = format!("flf{tag:06x}");
        // 198.18.0.0/15 is reserved for network tests.
        let r: u16 = rand::random();
        let prefix = [198, 18 + (r >> 8) as u8 % 2, r as u8];
        let gateway = format!("{}.{}.{}.1", prefix[0], prefix[1], prefix[2]);
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        crate::claims::claim(&crate::claims::Resource::Link(bridge.clone()));
        let fabric = Fabric {
            bridge: bridge.clone(),
            gateway: gateway.clone(),
            prefix,
            next: std::sync::atomic::AtomicU8::new(2),
        };
        ip(&["addr", "add", &format!("{gateway}/24"), "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        Ok(fabric)
    }

    fn next_address(&self) -> String {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        format!(
            "{}.{}.{}.{n}",
            self.prefix[0], self.prefix[1], self.prefix[2]
        )
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.bridge]);
        crate::claims::release(&crate::claims::Resource::Link(self.bridge.clone()));
    }
}

impl NetNs {
    /// A namespace on `fabric`: `ns_ip` is its fabric address and
    /// `host_ip` the caller's.
    pub fn create_on(fabric: &Fabric) -> anyhow::Result<NetNs> {
        let tag: u32 = rand::random::<u32>() & 0xff_ffff;
        let name = format!("flt-{tag:06x}");
        let host_veth = format!("fv{tag:06x}h");
        let ns_veth = format!("fv{tag:06x}n");
        let ns_ip = fabric.next_address();
        ip(&["netns", "add", &name])?;
        crate::claims::claim(&crate::claims::Resource::NetNs {
            name: name.clone(),
            host_veth: host_veth.clone(),
        });
        let ns = NetNs {
            name: name.clone(),
            host_veth: host_veth.clone(),
            ns_ip: ns_ip.clone(),
            host_ip: fabric.gateway.clone(),
        };
        ip(&[
            "link", "add", &host_veth, "type", "veth", "peer", "name", &ns_veth,
        ])?;
        ip(&["link", "set", &ns_veth, "netns", &name])?;
        ip(&["link", "set", &host_veth, "master", &fabric.bridge])?;
        ip(&["link", "set", &host_veth, "up"])?;
        ns.exec_ip(&["addr", "add", &format!("{ns_ip}/24"), "dev", &ns_veth])?;
        ns.exec_ip(&["link", "set", &ns_veth, "up"])?;
        ns.exec_ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Creates `flt-<hex>` with a veth to the caller's namespace on a random
    /// /30 of 100.64.0.0/10 (shared address space, not routed on the internet).
    pub fn create() -> anyhow::Result<NetNs> {
        let tag: u32 = rand::random::<u32>() & 0xff_ffff;
        let name = format!("flt-{tag:06x}");
        let host_veth = format!("fv{tag:06x}h");
        let ns_veth = format!("fv{tag:06x}n");
        let slot = rand::random::<u32>() & 0xf_ffff; // 2^20 /30s in a /10
        let base = u32::from(std::net::Ipv4Addr::new(100, 64, 0, 0)) + slot * 4;
        let host_ip = std::net::Ipv4Addr::from(base + 1).to_string();
        let ns_ip = std::net::Ipv4Addr::from(base + 2).to_string();
        ip(&["netns", "add", &name])?;
        crate::claims::claim(&crate::claims::Resource::NetNs {
            name: name.clone(),
            host_veth: host_veth.clone(),
        });
        let ns = NetNs {
            name: name.clone(),
            host_veth: host_veth.clone(),
            ns_ip: ns_ip.clone(),
            host_ip: host_ip.clone(),
        };
        ip(&[
            "link", "add", &host_veth, "type", "veth", "peer", "name", &ns_veth,
        ])?;
        ip(&["link", "set", &ns_veth, "netns", &name])?;
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_veth])?;
        ip(&["link", "set", &host_veth, "up"])?;
        ns.exec_ip(&["addr", "add", &format!("{ns_ip}/30"), "dev", &ns_veth])?;
        ns.exec_ip(&["link", "set", &ns_veth, "up"])?;
        ns.exec_ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs `ip ARGS` inside the namespace.
    pub fn exec_ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Names of the links in the namespace.
    pub fn links(&self) -> Vec<String> {
        self.exec_ip(&["-o", "link", "show"])
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace removes its bridge, taps and the veth peer.
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.host_veth]);
        crate::claims::release(&crate::claims::Resource::NetNs {
            name: self.name.clone(),
            host_veth: self.host_veth.clone(),
        });
    }
}
