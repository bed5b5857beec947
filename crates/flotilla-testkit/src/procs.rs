//! Finding and killing processes by what their command line refers to.

use std::path::Path;

/// Pids of QEMU processes whose command line mentions `dir`.
pub fn qemu_pids_under(dir: &Path) -> Vec<i32> {
    pids_matching(dir, true)
}

/// Pids of other processes whose command line mentions `dir` (agents,
/// control planes, QEMUs).
pub fn pids_mentioning(dir: &Path) -> Vec<i32> {
    pids_matching(dir, false)
}

fn pids_matching(dir: &Path, qemu_only: bool) -> Vec<i32> {
    let me = std::process::id() as i32;
    let needle = dir.display().to_string();
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        let qemu = !qemu_only || cmd.contains("qemu-system");
        if pid != me && qemu && cmd.contains(&needle) && process_alive(pid) {
            pids.push(pid);
        }
    }
    pids
}

/// Files process `pid` maps whose name ends with `suffix`, as (inode,
/// path): e.g. the memory image a restored VM's QEMU maps as guest memory.
pub fn mapped_files(pid: i32, suffix: &str) -> Vec<(u64, String)> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let mut files: Vec<(u64, String)> = maps
        .lines()
        .filter_map(|line| {
            // address perms offset dev inode path
            let mut fields = line.split_whitespace();
            let inode = fields.nth(4)?.parse().ok()?;
            let path = fields.collect::<Vec<_>>().join(" ");
            path.ends_with(suffix).then_some((inode, path))
        })
        .collect();
    files.dedup();
    files
}

/// Alive and not a zombie.
pub fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}

pub fn kill(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}
