//! Command-line options.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::power::ShutdownAction;

/// Shown on `--help` and after a usage error.
pub(crate) const USAGE: &str = "\
usage: flotilla-guest-agent [--port PATH | --listen-unix PATH] [--shutdown-action ACTION]

  (no transport)        find the virtio-serial port org.flotilla.agent.0 and serve on it
  --port PATH           serve on this character device
  --listen-unix PATH    serve on a unix socket, one connection after another (tests)
  --shutdown-action A   reboot | exit | ignore: what Shutdown does after its reply
                        (default: reboot on a port, exit on a unix socket)";

/// Where requests come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Transport {
    /// A virtio-serial port: the given device, or the one found by name.
    Port(Option<PathBuf>),
    /// A listening unix socket.
    Unix(PathBuf),
}

/// Parsed options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Options {
    pub(crate) transport: Transport,
    pub(crate) shutdown: ShutdownAction,
}

/// Bad command lines.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ArgsError {
    #[error("option {0} needs a value")]
    MissingValue(String),
    #[error("unknown argument {0:?}")]
    Unknown(OsString),
    #[error("--port and --listen-unix exclude each other")]
    TwoTransports,
    #[error("unknown shutdown action {0:?} (expected reboot, exit or ignore)")]
    BadAction(OsString),
}

/// Parses the arguments after the program name; `Ok(None)` when `--help`/`--version` was served.
pub(crate) fn parse(
    args: impl IntoIterator<Item = OsString>,
) -> Result<Option<Options>, ArgsError> {
    let mut args = args.into_iter();
    let mut transport = None;
    let mut shutdown = None;
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .ok_or_else(|| ArgsError::MissingValue(name.to_string()))
        };
        match arg.to_str() {
            Some("--port") => set_transport(
                &mut transport,
                Transport::Port(Some(value("--port")?.into())),
            )?,
            Some("--listen-unix") => {
                set_transport(
                    &mut transport,
                    Transport::Unix(value("--listen-unix")?.into()),
                )?;
            }
            Some("--shutdown-action") => {
                let action = value("--shutdown-action")?;
                shutdown = Some(match action.to_str() {
                    Some("reboot") => ShutdownAction::Reboot,
                    Some("exit") => ShutdownAction::Exit,
                    Some("ignore") => ShutdownAction::Ignore,
                    _ => return Err(ArgsError::BadAction(action)),
                });
            }
            Some("--help" | "-h") => {
                println!("{USAGE}");
                return Ok(None);
            }
            Some("--version" | "-V") => {
                println!("flotilla-guest-agent {}", env!("CARGO_PKG_VERSION"));
                return Ok(None);
            }
            _ => return Err(ArgsError::Unknown(arg)),
        }
    }
    let transport = transport.unwrap_or(Transport::Port(None));
    // Never reboot the machine a test runs on: a unix socket means we are not in a VM.
    let default_action = match transport {
        Transport::Port(_) => ShutdownAction::Reboot,
        Transport::Unix(_) => ShutdownAction::Exit,
    };
    Ok(Some(Options {
        transport,
        shutdown: shutdown.unwrap_or(default_action),
    }))
}

fn set_transport(slot: &mut Option<Transport>, transport: Transport) -> Result<(), ArgsError> {
    if slot.replace(transport).is_some() {
        return Err(ArgsError::TwoTransports);
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse_strs(args: &[&str]) -> Result<Option<Options>, ArgsError> {
        parse(args.iter().map(OsString::from))
    }

    #[test]
    fn defaults_to_the_named_port_and_reboot() {
        let options = parse_strs(&[]).unwrap().unwrap();
        assert_eq!(options.transport, Transport::Port(None));
        assert_eq!(options.shutdown, ShutdownAction::Reboot);
    }

    #[test]
    fn unix_socket_defaults_to_exit() {
        let options = parse_strs(&["--listen-unix", "/tmp/s"]).unwrap().unwrap();
        assert_eq!(options.transport, Transport::Unix("/tmp/s".into()));
        assert_eq!(options.shutdown, ShutdownAction::Exit);
    }

    #[test]
    fn rejects_bad_input() {
        assert!(matches!(
            parse_strs(&["--port"]),
            Err(ArgsError::MissingValue(_))
        ));
        assert!(matches!(
            parse_strs(&["--port", "a", "--listen-unix", "b"]),
            Err(ArgsError::TwoTransports)
        ));
        assert!(matches!(parse_strs(&["-x"]), Err(ArgsError::Unknown(_))));
        assert!(matches!(
            parse_strs(&["--shutdown-action", "explode"]),
            Err(ArgsError::BadAction(_))
        ));
    }
}
