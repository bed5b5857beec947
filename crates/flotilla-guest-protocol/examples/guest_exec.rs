//! Runs one command in a guest through its agent socket and prints the result.
//!
//! `cargo run -p flotilla-guest-protocol --features client --example guest_exec -- \
//!     /path/to/agent.sock uname -a`
//!
//! Waits up to 60 s for the guest to come up, so it can be started right after QEMU.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use flotilla_guest_protocol::{ExecEvent, ExecRequest, GuestClient};
use std::io::Write;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(socket), argv) = (args.next().map(PathBuf::from), args.collect::<Vec<_>>()) else {
        eprintln!("usage: guest_exec SOCKET [COMMAND ARGS...]");
        return ExitCode::from(2);
    };
    let started = Instant::now();
    let (client, hello) = match GuestClient::wait_ready(&socket, Duration::from_secs(60)).await {
        Ok(ready) => ready,
        Err(error) => {
            eprintln!("guest not ready: {error}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "hello after {:?}: agent {} ready at guest uptime {} ms (now {} ms)",
        started.elapsed(),
        hello.agent_version,
        hello.boot_ms,
        hello.uptime_ms
    );
    if argv.is_empty() {
        return ExitCode::SUCCESS;
    }
    let request = ExecRequest {
        stream: true,
        ..ExecRequest::new(argv)
    };
    let mut stream = match client.exec(request).await {
        Ok(stream) => stream,
        Err(error) => {
            eprintln!("exec failed: {error}");
            return ExitCode::FAILURE;
        }
    };
    while let Some(event) = stream.next().await {
        match event {
            Ok(ExecEvent::Stdout(data)) => drop(std::io::stdout().write_all(&data)),
            Ok(ExecEvent::Stderr(data)) => drop(std::io::stderr().write_all(&data)),
            Ok(ExecEvent::Exit(exit)) => {
                eprintln!("exit: {exit:?}");
                return ExitCode::from(exit.code.map_or(1, |code| code as u8));
            }
            Err(error) => {
                eprintln!("exec failed: {error}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::FAILURE
}
