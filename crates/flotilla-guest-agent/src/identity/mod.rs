//! Giving the guest a new identity after a restore from a snapshot or a clone of a running VM:
//! fresh RNG state, hostname, machine id, MACs and addresses.
//!
//! Every field is checked before anything changes ([`plan()`]); then the steps run in a fixed
//! order, RNG first so the clone's random output diverges from its source's before anything else
//! runs. A step that fails ends the request with an error naming it; earlier steps stay applied.
//!
//! This runs on the critical path of a clone, in a guest whose emulator has just been restored
//! with a cold translation cache, where each process started and each fsync costs tens of
//! milliseconds. So the common network case (one IPv4 address per interface) is done with
//! ioctls on a datagram socket, and the files are not synced; anything else runs `ip` commands,
//! which give the same result ([`net`]).

mod arp;
mod files;
mod net;
mod plan;
mod rng;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use flotilla_guest_protocol::{ErrorKind, IdentityRequest};

use crate::log;
use plan::{plan, Plan};

/// Where busybox keeps `ip` and `arping`; searched in order.
const TOOL_DIRS: [&str; 4] = ["/sbin", "/bin", "/usr/sbin", "/usr/bin"];

/// One identity change at a time: two interleaved ones would leave a mix of both.
static APPLYING: Mutex<()> = Mutex::new(());

/// Failures of an identity change.
#[derive(Debug, thiserror::Error)]
pub(crate) enum IdentityError {
    /// A field failed validation; nothing was changed.
    #[error("invalid {field}: {reason}")]
    Invalid { field: String, reason: String },
    /// A tool the change needs is not in the guest image; nothing was changed.
    #[error("{0} not found in {dirs}", dirs = TOOL_DIRS.join(", "))]
    ToolMissing(&'static str),
    /// A system call or file write failed.
    #[error("cannot {step}: {source}")]
    Io {
        step: String,
        #[source]
        source: io::Error,
    },
    /// An `ip` command failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
}

impl IdentityError {
    /// The error kind reported to the host.
    pub(crate) fn kind(&self) -> ErrorKind {
        match self {
            Self::Invalid { .. } => ErrorKind::InvalidRequest,
            Self::ToolMissing(_) => ErrorKind::CommandNotFound,
            Self::Io { source, .. } if source.kind() == io::ErrorKind::PermissionDenied => {
                ErrorKind::PermissionDenied
            }
            Self::Io { .. } | Self::Command { .. } => ErrorKind::Internal,
        }
    }
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> IdentityError {
    IdentityError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

fn io_step(step: impl Into<String>) -> impl FnOnce(io::Error) -> IdentityError {
    let step = step.into();
    move |source| IdentityError::Io { step, source }
}

/// Where the change reads and writes; tests point these into a temporary directory.
#[derive(Debug, Clone)]
pub(crate) struct Paths {
    /// Holds `hostname`, `hosts` and `machine-id`.
    pub(crate) etc: PathBuf,
    /// One entry per network interface.
    pub(crate) sys_class_net: PathBuf,
    /// Where the files go when `etc` cannot be written (a read-only root
    /// disk): bind-mounted over the ones in `etc`, as systemd does for
    /// `/etc/machine-id`.
    pub(crate) run: PathBuf,
}

impl Paths {
    pub(crate) fn system() -> Self {
        Self {
            etc: PathBuf::from("/etc"),
            sys_class_net: PathBuf::from("/sys/class/net"),
            run: PathBuf::from("/run/flotilla"),
        }
    }
}

/// Applies `request` to this guest; returns how long it took, in milliseconds.
pub(crate) fn set(request: &IdentityRequest) -> Result<u64, IdentityError> {
    let _one_at_a_time = APPLYING.lock().unwrap_or_else(PoisonError::into_inner);
    let started = Instant::now();
    let paths = Paths::system();
    let plan = plan(request, &paths)?;
    let ip = if plan.interfaces.is_empty() {
        None
    } else {
        Some(find_tool("ip").ok_or(IdentityError::ToolMissing("ip"))?)
    };
    apply(&plan, &paths, ip.as_deref())?;
    let applied_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    log!(
        "identity set: hostname {}, machine id {}, {} interface(s), in {applied_ms} ms",
        request.hostname,
        request.machine_id,
        plan.interfaces.len()
    );
    Ok(applied_ms)
}

/// Looks for a tool in [`TOOL_DIRS`].
fn find_tool(name: &str) -> Option<PathBuf> {
    TOOL_DIRS
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|path| path.is_file())
}

/// Carries out a checked plan, in order.
fn apply(plan: &Plan<'_>, paths: &Paths, ip: Option<&Path>) -> Result<(), IdentityError> {
    let mut clock = StepClock::new();
    rng::reseed_rng(&plan.request.rng_seed)?;
    nix::unistd::sethostname(&plan.request.hostname)
        .map_err(|errno| io_step("set the hostname")(io::Error::from(errno)))?;
    clock.step("rng+hostname");
    let hosts_ip = plan
        .interfaces
        .first()
        .and_then(|interface| interface.addresses.first())
        .map(|cidr| cidr.ip);
    files::write_files(
        &plan.request.hostname,
        &plan.request.machine_id,
        hosts_ip,
        paths,
    )?;
    clock.step("files");
    net::readdress_all(plan, ip)?;
    clock.step("network");
    // Announcing the new addresses is best effort and off the reply's path.
    arp::announce_in_background(
        plan.interfaces
            .iter()
            .map(|i| {
                (
                    i.name.to_string(),
                    i.addresses.iter().map(|c| c.ip).collect(),
                )
            })
            .collect(),
    );
    log!("identity steps (ms): {}", clock.report());
    Ok(())
}

/// Time spent per step, for the log: this runs on a clone's critical path.
struct StepClock {
    last: Instant,
    steps: Vec<(&'static str, u128)>,
}

impl StepClock {
    fn new() -> Self {
        StepClock {
            last: Instant::now(),
            steps: Vec::new(),
        }
    }

    fn step(&mut self, name: &'static str) {
        self.steps.push((name, self.last.elapsed().as_millis()));
        self.last = Instant::now();
    }

    fn report(&self) -> String {
        self.steps
            .iter()
            .map(|(name, ms)| format!("{name} {ms}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly by design.
mod tests;
