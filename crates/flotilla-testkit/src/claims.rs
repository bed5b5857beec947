//! What a test process owns outside itself (data directories with their
//! agents and QEMUs, network namespaces, bridges), written down so that a
//! later test process can clean up after one that died without running its
//! `Drop`s (killed by a signal, or aborted).
//!
//! Each claim is a file under [`claims_dir`] naming the owner (pid and its
//! start time, so a reused pid is not mistaken for it) and the resource.
//! The first claim a process makes first reaps every claim whose owner is
//! gone.

use std::path::{Path, PathBuf};
use std::sync::Once;

use crate::procs::{kill, pids_mentioning, process_alive};

/// A resource a test process owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    /// A data directory: processes whose command line names it are
    /// killed, a tmpfs mounted on it unmounted, and it is removed.
    Dir(PathBuf),
    /// A network namespace and the veth end left in the caller's.
    NetNs { name: String, host_veth: String },
    /// A link in the caller's namespace (a fabric's bridge).
    Link(String),
}

impl Resource {
    fn key(&self) -> String {
        let raw = match self {
            Resource::Dir(p) => format!("dir{}", p.display()),
            Resource::NetNs { name, .. } => format!("netns-{name}"),
            Resource::Link(name) => format!("link-{name}"),
        };
        raw.replace('/', "_")
    }

    fn encode(&self) -> String {
        match self {
            Resource::Dir(p) => format!("dir\n{}", p.display()),
            Resource::NetNs { name, host_veth } => format!("netns\n{name}\n{host_veth}"),
            Resource::Link(name) => format!("link\n{name}"),
        }
    }

    fn decode(lines: &[&str]) -> Option<Resource> {
        match lines {
            ["dir", path] => Some(Resource::Dir(PathBuf::from(path))),
            ["netns", name, host_veth] => Some(Resource::NetNs {
                name: name.to_string(),
                host_veth: host_veth.to_string(),
            }),
            ["link", name] => Some(Resource::Link(name.to_string())),
            _ => None,
        }
    }

    /// Removes it, whatever is left of it.
    fn clean(&self) {
        match self {
            Resource::Dir(dir) => {
                for pid in pids_mentioning(dir) {
                    kill(pid);
                }
                for _ in 0..250 {
                    if pids_mentioning(dir).into_iter().all(|p| !process_alive(p)) {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                let _ = std::process::Command::new("umount")
                    .arg(dir)
                    .stderr(std::process::Stdio::null())
                    .output();
                let _ = std::fs::remove_dir_all(dir);
            }
            Resource::NetNs { name, host_veth } => {
                let _ = crate::netns::ip(&["netns", "del", name]);
                let _ = crate::netns::ip(&["link", "del", host_veth]);
            }
            Resource::Link(name) => {
                let _ = crate::netns::ip(&["link", "del", name]);
            }
        }
    }
}

/// Where claims are kept (shared by every test process of the machine).
pub fn claims_dir() -> PathBuf {
    std::env::temp_dir().join("flotilla-testkit-claims")
}

/// This process's identity: pid and start time (clock ticks since boot).
fn identity(pid: i32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name in parentheses; start time is the 22nd
    // field overall, the 20th after it.
    let start = stat.rsplit(')').next()?.split_whitespace().nth(19)?;
    Some(format!("{pid} {start}"))
}

fn owner_alive(owner: &str) -> bool {
    let Some(pid) = owner.split(' ').next().and_then(|p| p.parse::<i32>().ok()) else {
        return false;
    };
    process_alive(pid) && identity(pid).as_deref() == Some(owner)
}

/// Records that this process owns `resource` (reaping what dead test
/// processes left, the first time).
pub fn claim(resource: &Resource) {
    static REAP: Once = Once::new();
    REAP.call_once(reap_orphans);
    let Some(me) = identity(std::process::id() as i32) else {
        return;
    };
    let dir = claims_dir();
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(
        dir.join(resource.key()),
        format!("{me}\n{}", resource.encode()),
    );
}

/// The resource is cleaned up: its claim goes.
pub fn release(resource: &Resource) {
    let _ = std::fs::remove_file(claims_dir().join(resource.key()));
}

/// Cleans up every claim whose owner is no longer running. Directories
/// first (their processes hold taps in the namespaces), then namespaces,
/// then links.
pub fn reap_orphans() {
    let Ok(entries) = std::fs::read_dir(claims_dir()) else {
        return;
    };
    let mut orphans: Vec<(PathBuf, Resource)> = entries
        .flatten()
        .filter_map(|e| {
            let text = std::fs::read_to_string(e.path()).ok()?;
            let lines: Vec<&str> = text.lines().collect();
            let (owner, rest) = lines.split_first()?;
            if owner_alive(owner) {
                return None;
            }
            Some((e.path(), Resource::decode(rest)?))
        })
        .collect();
    let order = |r: &Resource| match r {
        Resource::Dir(_) => 0,
        Resource::NetNs { .. } => 1,
        Resource::Link(_) => 2,
    };
    orphans.sort_by_key(|(_, r)| order(r));
    for (file, resource) in orphans {
        eprintln!("testkit: cleaning up after a test process that died: {resource:?}");
        resource.clean();
        let _ = std::fs::remove_file(file);
    }
}

/// Whether a claim on `resource` is recorded.
pub fn is_claimed(resource: &Resource) -> bool {
    Path::new(&claims_dir().join(resource.key())).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_round_trip_through_their_claim_files() {
        for r in [
            Resource::Dir(PathBuf::from("/tmp/flotilla-test-abc")),
            Resource::NetNs {
                name: "flt-123456".into(),
                host_veth: "fv123456h".into(),
            },
            Resource::Link("flf123456".into()),
        ] {
            let text = r.encode();
            let lines: Vec<&str> = text.lines().collect();
            assert_eq!(Resource::decode(&lines), Some(r.clone()));
            assert!(!r.key().contains('/'));
        }
    }

    #[test]
    fn a_dead_owner_is_told_from_a_live_one() {
        let me = identity(std::process::id() as i32).unwrap();
        assert!(owner_alive(&me));
        // The same pid with another start time is a reused pid.
        let pid = me.split(' ').next().unwrap();
        assert!(!owner_alive(&format!("{pid} 1")));
        assert!(!owner_alive("not-a-pid 1"));
    }

    #[test]
    fn an_orphaned_directory_is_reaped() {
        let dir = tempfile::Builder::new()
            .prefix("flotilla-claims-test-")
            .tempdir()
            .unwrap()
            .keep();
        let r = Resource::Dir(dir.clone());
        std::fs::create_dir_all(claims_dir()).unwrap();
        // Owned by a process that is gone.
        std::fs::write(
            claims_dir().join(r.key()),
            format!("{} 1\n{}", std::process::id(), r.encode()),
        )
        .unwrap();
        reap_orphans();
        assert!(!dir.exists());
        assert!(!is_claimed(&r));
    }
}
