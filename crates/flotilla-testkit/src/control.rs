//! A control plane process for end-to-end tests: `flotilla control` on a
//! free port of the caller's namespace (reachable from test hosts over
//! their veths), with SQLite in a temporary directory. It can be killed and
//! started again on the same state.

use std::fs::File;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

use crate::flotilla_bin;

pub struct ControlPlaneProcess {
    pub port: u16,
    pub admin_token: String,
    pub dir: tempfile::TempDir,
    /// A PostgreSQL URL shared with other replicas; SQLite in `dir` if None.
    database: Option<String>,
    /// Seconds of an operation's lease.
    lease_seconds: u64,
    child: Option<Child>,
    http: reqwest::blocking::Client,
}

impl ControlPlaneProcess {
    pub fn start() -> anyhow::Result<ControlPlaneProcess> {
        Self::start_with(None, None, 20)
    }

    /// A replica on `database` (PostgreSQL, shared with other replicas),
    /// accepting `admin_token` (a new one if None), with leases of
    /// `lease_seconds`.
    pub fn start_with(
        database: Option<String>,
        admin_token: Option<String>,
        lease_seconds: u64,
    ) -> anyhow::Result<ControlPlaneProcess> {
        let port = std::net::TcpListener::bind("0.0.0.0:0")?
            .local_addr()?
            .port();
        let mut cp = ControlPlaneProcess {
            port,
            database,
            lease_seconds,
            admin_token: admin_token
                .unwrap_or_else(|| format!("flt_{:048x}", rand::random::<u128>())),
            dir: tempfile::Builder::new()
                .prefix("flotilla-control-")
                .tempdir()?,
            child: None,
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()?,
        };
        crate::claims::claim(&crate::claims::Resource::Dir(cp.dir.path().to_path_buf()));
        cp.spawn()?;
        Ok(cp)
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts the process (again) and waits until it answers.
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("control.log"))?;
        let child = Command::new(flotilla_bin())
            .arg("control")
            .args(["--listen", &format!("0.0.0.0:{}", self.port)])
            .arg("--data-dir")
            .arg(self.dir.path())
            .args(["--admin-token", &self.admin_token, "--host-down-after", "4"])
            // Snapshots left creating are settled within the tests' waits.
            .args(["--snapshot-settle-secs", "3"])
            .args(["--lease-seconds", &self.lease_seconds.to_string()])
            .args(
                self.database
                    .iter()
                    .flat_map(|d| ["--database", d.as_str()]),
            )
            .env("FLOTILLA_LOG", "info,flotilla_control=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting flotilla control")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = self.http.get(format!("{}/healthz", self.base())).send() {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("flotilla control exited ({status}): {}", self.log_tail());
            }
            if Instant::now() > deadline {
                bail!(
                    "flotilla control did not answer within 30 s: {}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("control.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// An API call; `token` None uses the admin token.
    pub fn api(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap_or(reqwest::Method::GET);
        let mut r = self
            .http
            .request(method, format!("{}{path}", self.base()))
            .bearer_auth(token.unwrap_or(&self.admin_token));
        if let Some(b) = body {
            r = r.json(&b);
        }
        match r.send() {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let text = resp.text().unwrap_or_default();
                (
                    status,
                    serde_json::from_str(&text).unwrap_or(Value::String(text)),
                )
            }
            Err(e) => (0, Value::String(e.to_string())),
        }
    }

    /// Polls `path` until `done` holds for its body, or panics with `what`.
    pub fn wait_for(
        &self,
        what: &str,
        path: &str,
        token: Option<&str>,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let (s, b) = self.api("GET", path, token, None);
            if s == 200 && done(&b) {
                return b;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}: last {s} {b}\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for ControlPlaneProcess {
    fn drop(&mut self) {
        self.kill();
        crate::claims::release(&crate::claims::Resource::Dir(self.dir.path().to_path_buf()));
    }
}
