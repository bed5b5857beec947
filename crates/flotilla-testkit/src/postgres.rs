//! A real PostgreSQL server for tests: a fresh cluster in a temporary
//! directory, run as the `postgres` user on a free loopback port, removed
//! when dropped.

use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

pub struct PgServer {
    child: Child,
    dir: tempfile::TempDir,
    pub port: u16,
}

/// The newest installed server's `bin` directory (Debian's layout).
fn bin_dir() -> anyhow::Result<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL is not installed (scripts/install-deps installs it)")?
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            Some((v, e.path().join("bin")))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, p)| p)
        .context("no PostgreSQL server under /usr/lib/postgresql")
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl PgServer {
    pub fn start() -> anyhow::Result<PgServer> {
        let bin = bin_dir()?;
        let user = nix::unistd::User::from_name("postgres")?
            .context("no `postgres` user (the postgresql package creates it)")?;
        let (uid, gid) = (user.uid.as_raw(), user.gid.as_raw());
        let dir = tempfile::Builder::new().prefix("flotilla-pg-").tempdir()?;
        crate::claims::claim(&crate::claims::Resource::Dir(dir.path().to_path_buf()));
        nix::unistd::chown(dir.path(), Some(user.uid), Some(user.gid))?;
        let data = dir.path().join("data");
        let out = Command::new(bin.join("initdb"))
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                "-D",
            ])
            .arg(&data)
            .uid(uid)
            .gid(gid)
            .stdin(Stdio::null())
            .output()
            .context("running initdb")?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let port = free_port()?;
        let log = std::fs::File::create(dir.path().join("server.log"))?;
        let child = Command::new(bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
            .arg("-k")
            .arg(dir.path())
            .args(["-c", "fsync=off", "-c", "max_connections=100"])
            .uid(uid)
            .gid(gid)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting postgres")?;
        let server = PgServer { child, dir, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = Command::new(bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q"])
                .status()
                .is_ok_and(|s| s.success());
            if ready && TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(server);
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(server.dir.path().join("server.log"))
                    .unwrap_or_default();
                bail!("PostgreSQL did not start within 30 s: {log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A URL of a database of its own (created on first use of the name).
    pub fn url(&self, database: &str) -> anyhow::Result<String> {
        let bin = bin_dir()?;
        let out = Command::new(bin.join("createdb"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                database,
            ])
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() && !stderr.contains("already exists") {
            bail!("createdb {database}: {stderr}");
        }
        Ok(format!(
            "postgres://postgres@127.0.0.1:{}/{database}",
            self.port
        ))
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
        crate::claims::release(&crate::claims::Resource::Dir(self.dir.path().to_path_buf()));
    }
}

impl PgServer {
    fn stop(&mut self) {
        // SIGINT: PostgreSQL's fast shutdown.
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
