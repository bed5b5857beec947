//! End-to-end tests: the real guest-agent binary on a unix socket (`--listen-unix`), driven by
//! the host-side `GuestClient`. One test binary; each test starts its own agent.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

mod exec;
mod session;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use flotilla_guest_protocol::{ExecExit, ExecRequest, GuestClient};
use tempfile::TempDir;

/// A guest agent process serving a socket in a temporary directory.
pub struct Agent {
    child: Child,
    socket: PathBuf,
    dir: TempDir,
}

impl Agent {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_flotilla-guest-agent"))
            .arg("--listen-unix")
            .arg(&socket)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let until = std::time::Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            assert!(
                std::time::Instant::now() < until,
                "agent never bound its socket"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { child, socket, dir }
    }

    /// A connected, greeted client.
    pub async fn client(&self) -> GuestClient {
        let (client, _hello) = GuestClient::wait_ready(&self.socket, Duration::from_secs(20))
            .await
            .unwrap();
        client
    }

    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Waits up to `limit` for the agent to exit by itself.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let until = std::time::Instant::now() + limit;
        while std::time::Instant::now() < until {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `sh -c script` as an exec request.
pub fn sh(script: &str) -> ExecRequest {
    ExecRequest::new(["sh", "-c", script])
}

pub async fn run(client: &GuestClient, request: ExecRequest) -> ExecExit {
    client
        .exec_collect(request, Duration::from_secs(30))
        .await
        .unwrap()
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
