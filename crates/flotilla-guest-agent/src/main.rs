//! flotilla-guest-agent: serves host requests inside a Flotilla microVM.
//!
//! Started (and restarted when it exits) by the guest's `/init`. It finds the virtio-serial port
//! named [`AGENT_PORT_NAME`] and answers framed requests from the host agent: handshake, exec,
//! info, shutdown, clock and identity changes. `--listen-unix PATH` serves a unix socket
//! instead, for tests without a VM.
//!
//! Built static (`-C target-feature=+crt-static`) with std threads only, to stay small.

mod args;
mod clock;
mod dispatch;
mod exec;
mod identity;
mod info;
mod output;
mod port;
mod power;
mod session;
mod tick;
mod unix;
mod writer;

use std::process::ExitCode;
use std::sync::OnceLock;
use std::time::Duration;

use flotilla_guest_protocol::AGENT_PORT_NAME;

use args::{Options, Transport};
use power::ShutdownAction;

/// Prints one line to stderr (the guest's serial console), prefixed with the agent's name.
macro_rules! log {
    ($($arg:tt)*) => {
        eprintln!("flotilla-guest-agent: {}", format_args!($($arg)*))
    };
}
pub(crate) use log;

/// State shared by every request handler.
#[derive(Debug)]
pub(crate) struct AgentContext {
    /// Guest uptime when the agent first became ready to serve.
    boot_ms: OnceLock<u64>,
    pub(crate) shutdown: ShutdownAction,
}

impl AgentContext {
    /// Records the ready time; only the first call counts.
    pub(crate) fn mark_ready(&self) {
        self.boot_ms.get_or_init(info::uptime_ms);
    }

    pub(crate) fn boot_ms(&self) -> u64 {
        self.boot_ms.get().copied().unwrap_or_default()
    }
}

fn main() -> ExitCode {
    let raw: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    if raw.first().map(String::as_str) == Some("tick") {
        return tick::run(&raw[1..]);
    }
    let options = match args::parse(std::env::args_os().skip(1)) {
        Ok(Some(options)) => options,
        Ok(None) => return ExitCode::SUCCESS,
        Err(error) => {
            log!("{error}");
            eprintln!("{}", args::USAGE);
            return ExitCode::from(2);
        }
    };
    run(options)
}

fn run(options: Options) -> ExitCode {
    let context = std::sync::Arc::new(AgentContext {
        boot_ms: OnceLock::new(),
        shutdown: options.shutdown,
    });
    match options.transport {
        Transport::Unix(path) => match unix::serve(&path, &context) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                log!("cannot serve on {}: {error}", path.display());
                ExitCode::FAILURE
            }
        },
        Transport::Port(given) => loop {
            let path = match &given {
                Some(path) => path.clone(),
                None => port::wait_for(AGENT_PORT_NAME),
            };
            let error = port::serve(&path, &context);
            log!("port {} failed: {error}; reopening", path.display());
            // The device may have been unplugged; do not spin while it is gone.
            std::thread::sleep(Duration::from_secs(1));
        },
    }
}
