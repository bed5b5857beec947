//! One test host: a namespace, a data directory and an agent process.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::netns::NetNs;
use crate::procs::{kill, process_alive, qemu_pids_under};
use crate::{flotilla_bin, guest_agent_bin};

const AGENT_PORT: u16 = 7777;

#[derive(Debug, Clone)]
pub struct HostOptions {
    pub capacity_vcpus: u32,
    pub capacity_memory_mib: u64,
    /// Register the default image in the host's data directory.
    pub with_default_image: bool,
    /// Put the data directory on a tmpfs of this size, to test a full disk.
    pub data_dir_size_mib: Option<u64>,
    /// Heartbeat to a control plane listening in the caller's namespace.
    pub control: Option<ControlLinkOptions>,
    /// Join this cluster network (hosts reach each other), instead of a
    /// private link to the caller.
    pub fabric: Option<std::sync::Arc<crate::netns::Fabric>>,
    /// More arguments for `flotilla agent` (by default those in
    /// `FLOTILLA_TEST_AGENT_ARGS`, split at spaces: for experiments such as
    /// `--guest-huge-pages on` across a benchmark).
    pub agent_args: Vec<String>,
}

/// How a test host's agent joins a control plane that listens on `port` in
/// the caller's namespace (reached over the host's veth).
#[derive(Debug, Clone)]
pub struct ControlLinkOptions {
    pub port: u16,
    pub token: String,
    pub host_name: String,
    pub labels: Vec<String>,
}

impl Default for HostOptions {
    fn default() -> Self {
        HostOptions {
            capacity_vcpus: 64,
            capacity_memory_mib: 8192,
            with_default_image: true,
            data_dir_size_mib: None,
            control: None,
            fabric: None,
            agent_args: std::env::var("FLOTILLA_TEST_AGENT_ARGS")
                .map(|v| v.split_whitespace().map(str::to_string).collect())
                .unwrap_or_default(),
        }
    }
}

pub struct TestHost {
    pub netns: NetNs,
    pub data_dir: tempfile::TempDir,
    pub endpoint: String,
    options: HostOptions,
    agent: Option<Child>,
    http: reqwest::blocking::Client,
    /// The certificate fingerprint `http` trusts.
    trusted: Option<String>,
}

/// A blocking client of an agent's API: trusting only the certificate with
/// `fingerprint`, if given.
fn api_client(fingerprint: Option<&str>) -> anyhow::Result<reqwest::blocking::Client> {
    let mut builder = reqwest::blocking::Client::builder().timeout(Duration::from_secs(300));
    if let Some(f) = fingerprint {
        builder = builder.use_preconfigured_tls(flotilla_tls::pinned_client_config(f)?);
    }
    Ok(builder.build()?)
}

impl TestHost {
    pub fn start() -> anyhow::Result<TestHost> {
        Self::start_with(HostOptions::default())
    }

    pub fn start_with(options: HostOptions) -> anyhow::Result<TestHost> {
        let bin = flotilla_bin();
        if !bin.is_file() {
            bail!("{} is missing: build the workspace first", bin.display());
        }
        let netns = match &options.fabric {
            Some(f) => NetNs::create_on(f),
            None => NetNs::create(),
        }
        .context("creating the host's network namespace")?;
        let data_dir = tempfile::Builder::new()
            .prefix("flotilla-test-")
            .tempdir()?;
        crate::claims::claim(&crate::claims::Resource::Dir(data_dir.path().to_path_buf()));
        if let Some(mib) = options.data_dir_size_mib {
            let out = Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
                .arg(data_dir.path())
                .output()?;
            if !out.status.success() {
                bail!("mounting a tmpfs: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        // Agents serve HTTPS unless a test asks for plain HTTP.
        let scheme = match options.agent_args.iter().any(|a| a == "--plain-http") {
            true => "http",
            false => "https",
        };
        let endpoint = format!("{scheme}://{}:{AGENT_PORT}", netns.ns_ip);
        let mut host = TestHost {
            netns,
            data_dir,
            endpoint,
            options,
            agent: None,
            http: api_client(None)?,
            trusted: None,
        };
        if host.options.with_default_image {
            host.register_default_image()?;
        }
        host.start_agent()?;
        Ok(host)
    }

    pub fn data_path(&self) -> &Path {
        self.data_dir.path()
    }

    /// The agent's log so far, a line each, without colour codes (for
    /// benchmarks that show where the time went).
    pub fn agent_log_lines(&self) -> Vec<String> {
        std::fs::read_to_string(self.data_path().join("agent.log"))
            .unwrap_or_default()
            .lines()
            .map(without_colours)
            .collect()
    }

    fn register_default_image(&self) -> anyhow::Result<()> {
        let agent = guest_agent_bin();
        if !agent.is_file() {
            bail!(
                "{} is missing: run scripts/build-guest-agent (scripts/test does)",
                agent.display()
            );
        }
        let out = Command::new(flotilla_bin())
            .args(["image", "build", "--data-dir"])
            .arg(self.data_path())
            .arg("--guest-agent")
            .arg(&agent)
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!(
                "flotilla image build failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Starts the agent and waits until its API answers.
    pub fn start_agent(&mut self) -> anyhow::Result<()> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.data_path().join("agent.log"))?;
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.netns.name])
            .arg(flotilla_bin())
            .args(["agent", "--accel", "auto", "--data-dir"])
            .arg(self.data_path());
        if let Some(c) = &self.options.control {
            command
                .arg("--control-plane")
                .arg(format!("http://{}:{}", self.netns.host_ip, c.port))
                .args(["--control-token", &c.token, "--host-name", &c.host_name])
                .args(["--advertise", &self.endpoint, "--heartbeat-interval", "1"]);
            for label in &c.labels {
                command.args(["--label", label]);
            }
        }
        let child = command
            .args(&self.options.agent_args)
            .args(["--listen", &format!("{}:{AGENT_PORT}", self.netns.ns_ip)])
            .args(["--capacity-vcpus", &self.options.capacity_vcpus.to_string()])
            .args([
                "--capacity-memory",
                &format!("{}M", self.options.capacity_memory_mib),
            ])
            .env("FLOTILLA_LOG", "info,flotilla_agent=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the agent")?;
        self.agent = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // The agent makes its certificate on its first start.
            if let Some(f) = self
                .fingerprint()
                .filter(|f| self.trusted.as_ref() != Some(f))
            {
                self.http = api_client(Some(&f))?;
                self.trusted = Some(f);
            }
            if let Ok(r) = self.http.get(format!("{}/healthz", self.endpoint)).send() {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if let Some(child) = self.agent.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("the agent exited ({status}): {}", self.agent_log_tail());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent did not answer within 30 s: {}",
                    self.agent_log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the agent with `signal` and reaps it; its VMs keep running.
    pub fn kill_agent(&mut self, signal: nix::sys::signal::Signal) {
        if let Some(mut child) = self.agent.take() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal);
            let _ = child.wait();
        }
    }

    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(|c| c.id())
    }

    pub fn agent_log_tail(&self) -> String {
        file_tail(&self.data_path().join("agent.log"), 4000)
    }

    /// The agent's API token (made at its first start).
    pub fn agent_token(&self) -> String {
        std::fs::read_to_string(self.data_path().join("agent.token"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    }

    /// The fingerprint of the agent's certificate (when it serves HTTPS).
    pub fn fingerprint(&self) -> Option<String> {
        if !self.endpoint.starts_with("https://") {
            return None;
        }
        flotilla_tls::fingerprint_of_file(
            &self.data_path().join("tls").join(flotilla_tls::CERT_FILE),
        )
        .ok()
    }

    /// A client of this host's API (trusting its certificate), for tests
    /// that make their own calls.
    pub fn http_client(&self) -> reqwest::blocking::Client {
        self.http.clone()
    }

    /// Runs the CLI against this host.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut command = Command::new(flotilla_bin());
        if let Some(f) = self.fingerprint() {
            command.env("FLOTILLA_AGENT_FINGERPRINT", f);
        }
        command
            .env("FLOTILLA_AGENT_TOKEN", self.agent_token())
            .arg("--endpoint")
            .arg(&self.endpoint)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running flotilla {args:?}: {e}"))
    }

    /// Runs the CLI with `--json`, expecting success, and parses its output.
    pub fn cli_json<T: DeserializeOwned>(&self, args: &[&str]) -> T {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        let out = self.cli(&full);
        assert!(
            out.status.success(),
            "flotilla {args:?} failed: {}\n--- agent log ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.agent_log_tail()
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "flotilla {args:?} printed no valid JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// A raw API call: (status, JSON body or null).
    pub fn api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("valid method");
        let mut req = self
            .http
            .request(method, format!("{}{}", self.endpoint, path))
            .bearer_auth(self.agent_token());
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().expect("the agent answers");
        let status = resp.status().as_u16();
        let text = resp.text().unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// QEMU processes started by this host's agent.
    pub fn qemu_pids(&self) -> Vec<i32> {
        qemu_pids_under(self.data_path())
    }

    /// Taps in the host's namespace (Flotilla names them `fl...`).
    pub fn taps(&self) -> Vec<String> {
        self.netns
            .links()
            .into_iter()
            .filter(|l| l.starts_with("fl") && !l.starts_with("flbr") && !l.starts_with("flx"))
            .collect()
    }

    /// Taps the agent set aside and deletes in the background (`flx...`).
    pub fn retired_taps(&self) -> Vec<String> {
        self.netns
            .links()
            .into_iter()
            .filter(|l| l.starts_with("flx"))
            .collect()
    }

    /// Files left in the data directory's `vms/` (one directory per VM).
    pub fn vm_dirs(&self) -> Vec<PathBuf> {
        dir_entries(&self.data_path().join("vms"))
    }

    /// The unix sockets of VMs and their streams (`<data>/sock`).
    pub fn vm_sockets(&self) -> Vec<PathBuf> {
        dir_entries(&self.data_path().join("sock"))
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- agent log of {} ---\n{}",
                self.netns.name,
                self.agent_log_tail()
            );
            // A QEMU that died says why only in its own log.
            for dir in self.vm_dirs() {
                let log = file_tail(&dir.join("qemu.log"), 2000);
                if !log.trim().is_empty() {
                    eprintln!("--- QEMU log of {} ---\n{log}", dir.display());
                }
            }
        }
        self.kill_agent(nix::sys::signal::Signal::SIGKILL);
        for pid in self.qemu_pids() {
            kill(pid);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.qemu_pids().iter().any(|p| process_alive(*p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.options.data_dir_size_mib.is_some() {
            let _ = Command::new("umount").arg(self.data_dir.path()).output();
        }
        // The directory itself goes with `data_dir` right after this.
        crate::claims::release(&crate::claims::Resource::Dir(
            self.data_dir.path().to_path_buf(),
        ));
    }
}

/// A log line without its ANSI colour codes (`ESC [ ... m`).
fn without_colours(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The entries of `dir` (none if it cannot be read).
fn dir_entries(dir: &std::path::Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// The last `bytes` (about) of a text file; empty if it cannot be read.
fn file_tail(path: &std::path::Path, bytes: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let start = text.floor_char_boundary(text.len().saturating_sub(bytes));
    text[start..].to_string()
}
