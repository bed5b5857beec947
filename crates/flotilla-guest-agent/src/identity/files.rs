//! The files that name the guest (`hostname`, `hosts`, `machine-id`), replaced atomically, or
//! bound over when `/etc` is read-only.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::{io_step, IdentityError, Paths};

/// Writes `hostname`, `hosts` and `machine-id` under `paths.etc`, each atomically.
pub(super) fn write_files(
    hostname: &str,
    machine_id: &str,
    hosts_ip: Option<IpAddr>,
    paths: &Paths,
) -> Result<(), IdentityError> {
    let files = [
        ("hostname", format!("{hostname}\n"), 0o644),
        ("hosts", hosts_text(hostname, hosts_ip), 0o644),
        ("machine-id", format!("{machine_id}\n"), 0o444),
    ];
    for (name, contents, mode) in files {
        let path = paths.etc.join(name);
        if let Err(error) = write_atomic(&path, contents.as_bytes(), mode) {
            crate::log!(
                "cannot write {} ({error}); binding a copy in {} over it",
                path.display(),
                paths.run.display()
            );
            bind_over(&paths.run.join(name), &path, contents.as_bytes(), mode).map_err(io_step(
                format!("write {} (nor bind a copy over it)", path.display()),
            ))?;
        }
    }
    Ok(())
}

/// Writes `contents` to `file` in place (so an earlier bind mount of it
/// sees them) and bind-mounts it over `target` unless that is done already.
fn bind_over(file: &Path, target: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    if let Some(dir) = file.parent() {
        fs::create_dir_all(dir)?;
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(file)?;
    f.write_all(contents)?;
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let target_text = target.to_string_lossy();
    if mounts
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(target_text.as_ref()))
    {
        return Ok(());
    }
    nix::mount::mount(
        Some(file),
        target,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(io::Error::from)
}

/// `/etc/hosts` as guest/init writes it: the hostname resolves to the guest's own address, or
/// to a loopback alias when it has none.
fn hosts_text(hostname: &str, address: Option<IpAddr>) -> String {
    let address = address.map_or_else(|| "127.0.1.1".to_string(), |ip| ip.to_string());
    format!(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{address}\t{hostname}\n"
    )
}

/// Writes a sibling temporary file and renames it over `path`, so readers see the old contents
/// or the new, never a mix. Not synced: guest/init rewrites these files from the kernel command
/// line at every boot, so durability adds nothing, and a sync costs tens of milliseconds here.
fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(name);
    temp_name.push(".flotilla-new");
    let temp = path.with_file_name(temp_name);
    let written = (|| {
        match fs::remove_file(&temp) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
            _ => {}
        }
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&temp)?;
        file.write_all(contents)?;
        drop(file);
        fs::rename(&temp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly by design.
mod tests {
    use super::*;
    use crate::identity::tests::{request, sandbox};

    #[test]
    fn hosts_text_matches_guest_init() {
        assert_eq!(
            hosts_text("web-2", Some("10.77.0.5".parse().unwrap())),
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n10.77.0.5\tweb-2\n"
        );
        assert!(hosts_text("web-2", None).ends_with("\n127.0.1.1\tweb-2\n"));
    }

    #[test]
    fn files_are_replaced() {
        let (_dir, paths) = sandbox();
        fs::write(paths.etc.join("machine-id"), "old\n").unwrap();
        write_files("web-2", &request().machine_id, None, &paths).unwrap();
        let read = |name: &str| fs::read_to_string(paths.etc.join(name)).unwrap();
        assert_eq!(read("hostname"), "web-2\n");
        assert_eq!(read("machine-id"), "0123456789abcdef0123456789abcdef\n");
        assert!(read("hosts").contains("127.0.1.1\tweb-2\n"));
        // Read-only machine id, and no temporary files left behind.
        let mode = fs::metadata(paths.etc.join("machine-id")).unwrap();
        assert!(mode.permissions().readonly());
        write_files("web-3", &request().machine_id, None, &paths).unwrap();
        let mut names: Vec<_> = fs::read_dir(&paths.etc)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["hostname", "hosts", "machine-id"]);
        assert_eq!(read("hostname"), "web-3\n");
    }
}
