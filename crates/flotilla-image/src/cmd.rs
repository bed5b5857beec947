//! Running external tools (make, tar, mkfs.ext4, qemu-img, ...) with errors
//! that name the command and quote the tail of what it printed.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::thread;

use crate::error::ImageError;

/// How many trailing lines of output an error quotes.
const TAIL_LINES: usize = 30;

/// Renders a command the way a person would type it, for error messages.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    let mut s = parts.join(" ");
    if let Some(dir) = cmd.get_current_dir() {
        s.push_str(&format!(" (in {})", dir.display()));
    }
    s
}

/// Makes the child receive SIGTERM if the thread that started it dies, so a
/// killed build does not leave `make` or `tar` running for minutes, writing
/// into a work directory the next build will delete.
fn die_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: the closure only calls prctl(2), which is async-signal-safe,
    // as required between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                .map_err(std::io::Error::from)
        })
    }
}

/// Runs `cmd` to completion and returns its stdout; non-zero exit is an error
/// quoting the end of stderr.
pub(crate) fn run(cmd: &mut Command) -> Result<Vec<u8>, ImageError> {
    let command = describe(cmd);
    die_with_parent(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| ImageError::Spawn {
            command: command.clone(),
            source,
        })?;
    if out.status.success() {
        return Ok(out.stdout);
    }
    let text = String::from_utf8_lossy(&out.stderr);
    let mut tail: VecDeque<String> = VecDeque::new();
    for line in text.lines() {
        push_tail(&mut tail, line.to_string());
    }
    Err(ImageError::Command {
        command,
        status: out.status.to_string(),
        stderr_tail: join_tail(&tail),
    })
}

/// Runs `cmd`, handing every stdout line to `on_line` as it arrives (for
/// progress display); stderr is kept for the error message. Long builds
/// print a lot, so only a bounded tail of each stream is kept.
pub(crate) fn run_streaming(
    cmd: &mut Command,
    mut on_line: impl FnMut(&str),
) -> Result<(), ImageError> {
    let command = describe(cmd);
    die_with_parent(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ImageError::Spawn {
            command: command.clone(),
            source,
        })?;
    let stderr = child.stderr.take();
    // stderr drains on its own thread so a chatty compiler cannot fill the
    // pipe and deadlock against our stdout reader.
    let err_thread = thread::spawn(move || {
        let mut tail = VecDeque::new();
        if let Some(stderr) = stderr {
            for line in BufReader::new(stderr).split(b'\n').map_while(Result::ok) {
                push_tail(&mut tail, String::from_utf8_lossy(&line).into_owned());
            }
        }
        tail
    });
    let mut out_tail = VecDeque::new();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            let line = String::from_utf8_lossy(&line).into_owned();
            on_line(&line);
            push_tail(&mut out_tail, line);
        }
    }
    let status = child.wait().map_err(|source| ImageError::Spawn {
        command: command.clone(),
        source,
    })?;
    let err_tail = err_thread.join().unwrap_or_default();
    if status.success() {
        return Ok(());
    }
    // make's failing step is on stderr, but the last stdout lines say which
    // file it was working on: quote both, stderr last.
    let mut tail = out_tail;
    for line in err_tail {
        push_tail(&mut tail, line);
    }
    Err(ImageError::Command {
        command,
        status: status.to_string(),
        stderr_tail: join_tail(&tail),
    })
}

fn push_tail(tail: &mut VecDeque<String>, line: String) {
    if tail.len() == TAIL_LINES {
        tail.pop_front();
    }
    tail.push_back(line);
}

fn join_tail(tail: &VecDeque<String>) -> String {
    if tail.is_empty() {
        return "(no output)".to_string();
    }
    tail.iter().cloned().collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failing_command_reports_stderr_tail() {
        let err = run(Command::new("sh").args(["-c", "echo first >&2; echo boom >&2; exit 3"]))
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("sh -c"), "{msg}");
        assert!(msg.contains("exit status: 3"), "{msg}");
        assert!(msg.contains("first\nboom"), "{msg}");
    }

    #[test]
    fn missing_tool_is_a_spawn_error() {
        let err = run(&mut Command::new("/nonexistent/flotilla-tool")).unwrap_err();
        assert!(matches!(err, ImageError::Spawn { .. }), "{err}");
    }

    #[test]
    fn streaming_sees_every_line() {
        let mut seen = Vec::new();
        run_streaming(Command::new("sh").args(["-c", "echo a; echo b"]), |l| {
            seen.push(l.to_string())
        })
        .unwrap();
        assert_eq!(seen, ["a", "b"]);
    }
}
