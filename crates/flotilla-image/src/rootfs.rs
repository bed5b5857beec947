//! The guest's root filesystem: a busybox tree with Flotilla's /init and
//! guest agent, packed twice: as an uncompressed cpio initramfs and as an ext4
//! qcow2 disk with the same contents.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::Command;

use crate::cmd;
use crate::cpio::{self, Entry, Kind};
use crate::error::{ImageError, IoContext};

/// The guest's /init (also installed as /sbin/init), from `guest/init`.
pub const GUEST_INIT: &str = include_str!("../../../guest/init");

/// Where the guest agent lives inside the guest; `guest/init` runs it.
pub const GUEST_AGENT_PATH: &str = "/sbin/flotilla-guest-agent";

/// Default location of Debian's `busybox-static` binary.
pub const DEFAULT_BUSYBOX: &str = "/bin/busybox";

/// Applets not linked: our /sbin/init replaces busybox init, and linuxrc is
/// an initrd-era alias of it.
const SKIPPED_APPLETS: &[&str] = &["init", "linuxrc"];

/// Lays out the guest tree in `root` (an empty directory).
pub(crate) fn assemble_tree(root: &Path, busybox: &Path, agent: &Path) -> Result<(), ImageError> {
    for (dir, mode) in [
        ("bin", 0o755),
        ("sbin", 0o755),
        ("usr", 0o755),
        ("etc", 0o755),
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("tmp", 0o1777),
        ("run", 0o755),
        ("root", 0o700),
        ("var", 0o755),
        ("var/log", 0o755),
        ("var/lib", 0o755),
        ("mnt", 0o755),
        ("newroot", 0o755),
    ] {
        let p = root.join(dir);
        fs::create_dir_all(&p).ctx("create directory", &p)?;
        set_mode(&p, mode)?;
    }
    // Merged /usr: programs that hard-code /usr/bin/env and friends work.
    link("../bin", &root.join("usr/bin"))?;
    link("../sbin", &root.join("usr/sbin"))?;
    link("../run", &root.join("var/run"))?;
    link("../tmp", &root.join("var/tmp"))?;

    install_file(busybox, &root.join("bin/busybox"), 0o755)?;
    for applet in busybox_applets(busybox)? {
        if applet == "busybox" || SKIPPED_APPLETS.contains(&applet.as_str()) {
            continue;
        }
        link("busybox", &root.join("bin").join(&applet))?;
    }

    write_file(&root.join("init"), GUEST_INIT.as_bytes(), 0o755)?;
    write_file(&root.join("sbin/init"), GUEST_INIT.as_bytes(), 0o755)?;
    install_file(
        agent,
        &root.join(GUEST_AGENT_PATH.trim_start_matches('/')),
        0o755,
    )?;

    for (name, body, mode) in ETC_FILES {
        write_file(&root.join("etc").join(name), body.as_bytes(), *mode)?;
    }
    Ok(())
}

/// Static /etc contents; hostname, hosts and resolv.conf are rewritten by
/// /init at boot from the kernel command line.
const ETC_FILES: &[(&str, &str, u32)] = &[
    (
        "passwd",
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        0o644,
    ),
    ("group", "root:x:0:\nnogroup:x:65534:\n", 0o644),
    ("shadow", "root:*:0:0:99999:7:::\n", 0o600),
    ("hostname", "flotilla\n", 0o644),
    ("hosts", "127.0.0.1\tlocalhost\n::1\tlocalhost\n", 0o644),
    ("resolv.conf", "", 0o644),
    (
        "os-release",
        "NAME=\"Flotilla guest\"\nID=flotilla\nPRETTY_NAME=\"Flotilla guest (busybox)\"\n",
        0o644,
    ),
    (
        "profile",
        "export PATH=/sbin:/bin\nexport PS1='\\h:\\w\\$ '\n",
        0o644,
    ),
];

/// Applet names, from `busybox --list`.
fn busybox_applets(busybox: &Path) -> Result<Vec<String>, ImageError> {
    let out = cmd::run(Command::new(busybox).arg("--list"))?;
    let applets: Vec<String> = String::from_utf8_lossy(&out)
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && !a.contains('/') && !a.starts_with('.'))
        .map(str::to_string)
        .collect();
    if !applets.iter().any(|a| a == "sh") {
        return Err(ImageError::BadOutput {
            path: busybox.to_path_buf(),
            reason: "`busybox --list` has no `sh` applet; the guest init needs busybox ash".into(),
        });
    }
    Ok(applets)
}

/// Packs `tree` into an uncompressed newc cpio at `out` (decompressing
/// gzip costs the guest ~60 ms of boot under TCG; the host only copies the
/// bytes), adding the device nodes
/// the kernel needs before devtmpfs is mounted (/dev/console gives /init
/// its stdin/stdout).
pub(crate) fn write_initrd(tree: &Path, out: &Path) -> Result<(), ImageError> {
    let mut entries = cpio::entries_from_tree(tree)?;
    for (name, major, minor, mode) in [("dev/console", 5, 1, 0o600), ("dev/null", 1, 3, 0o666)] {
        entries.push(Entry {
            path: name.to_string(),
            mode,
            kind: Kind::CharDev { major, minor },
        });
    }
    let mut archive = Vec::new();
    cpio::write_newc(entries, &mut archive)?;
    write_file(out, &archive, 0o644)
}

/// Makes an ext4 filesystem of `size_mib` holding `tree` and converts it to
/// qcow2 at `out`. `uuid` makes the filesystem identity deterministic.
pub(crate) fn write_disk(
    tree: &Path,
    size_mib: u64,
    uuid: &str,
    out: &Path,
) -> Result<(), ImageError> {
    let work = out.with_extension("raw.tmp");
    // Sparse: set_len allocates nothing, and qemu-img skips the holes.
    let f = fs::File::create(&work).ctx("create", &work)?;
    f.set_len(size_mib * 1024 * 1024).ctx("resize", &work)?;
    drop(f);
    let result = (|| {
        cmd::run(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-L", "flotilla-root", "-U", uuid, "-m", "0"])
                // Initialise inode tables now: otherwise the guest's
                // ext4lazyinit thread zeroes them on first mount, burning
                // TCG time and growing every VM's overlay.
                .arg("-E")
                .arg(format!(
                    "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0,hash_seed={uuid}"
                ))
                .arg("-d")
                .arg(tree)
                .arg(&work),
        )?;
        cmd::run(
            Command::new("qemu-img")
                .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
                .arg(&work)
                .arg(out),
        )?;
        Ok(())
    })();
    let _ = fs::remove_file(&work);
    result
}

fn link(target: &str, at: &Path) -> Result<(), ImageError> {
    symlink(target, at).ctx("create symlink", at)
}

fn install_file(src: &Path, dst: &Path, mode: u32) -> Result<(), ImageError> {
    fs::copy(src, dst).ctx("copy into rootfs", src)?;
    set_mode(dst, mode)
}

fn write_file(path: &Path, body: &[u8], mode: u32) -> Result<(), ImageError> {
    fs::write(path, body).ctx("write", path)?;
    set_mode(path, mode)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), ImageError> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).ctx("chmod", path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_has_busybox_init_and_agent() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        // busybox-static stands in for the agent: any static binary will do.
        assemble_tree(
            &root,
            Path::new(DEFAULT_BUSYBOX),
            Path::new(DEFAULT_BUSYBOX),
        )
        .unwrap();
        assert_eq!(
            fs::read_link(root.join("bin/sh")).unwrap(),
            Path::new("busybox")
        );
        assert_eq!(
            fs::read_link(root.join("usr/bin")).unwrap(),
            Path::new("../bin")
        );
        assert!(
            !root.join("bin/init").exists(),
            "busybox init must not shadow ours"
        );
        assert_eq!(fs::read_to_string(root.join("init")).unwrap(), GUEST_INIT);
        let agent = root.join("sbin/flotilla-guest-agent");
        assert_eq!(
            fs::metadata(&agent).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert_eq!(
            fs::metadata(root.join("tmp")).unwrap().permissions().mode() & 0o7777,
            0o1777
        );
    }

    #[test]
    fn guest_init_is_valid_ash() {
        let out = Command::new(DEFAULT_BUSYBOX)
            .args(["sh", "-n", "-c", GUEST_INIT])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(GUEST_INIT.contains("FLOTILLA-PROBE-OK"));
        assert!(GUEST_INIT.contains(GUEST_AGENT_PATH));
    }
}
