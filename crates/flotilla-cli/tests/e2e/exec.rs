//! Exec: arguments, environment, working directory, stdin, exit codes,
//! timeouts and streamed output.

use std::io::Write;
use std::process::{Command, Stdio};

use flotilla_testkit::{flotilla_bin, TestHost};
use serde_json::json;

use crate::{exec, run_vm, stderr_of};

#[test]
fn exec_passes_env_cwd_stdin_and_exit_codes() {
    let host = TestHost::start().expect("test host");
    run_vm(&host, "ex");

    let out = host.cli(&[
        "--json",
        "vm",
        "exec",
        "ex",
        "--env",
        "GREETING=hi there",
        "--cwd",
        "/tmp",
        "--",
        "sh",
        "-c",
        "echo \"$GREETING\" from $(pwd); echo oops >&2; exit 3",
    ]);
    // --json still exits with the command's code.
    assert_eq!(out.status.code(), Some(3), "{}", stderr_of(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["exit_code"], 3);
    assert_eq!(v["stdout"], "hi there from /tmp\n");
    assert_eq!(v["stderr"], "oops\n");

    // stdin, through the API (base64).
    let (status, body) = host.api(
        "POST",
        "/v1/vms/ex/exec",
        Some(json!({ "argv": ["wc", "-c"], "stdin_b64": "aGVsbG8gd29ybGQ=" })),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["stdout"].as_str().map(str::trim), Some("11"));

    // stdin through the CLI.
    let mut child = Command::new(flotilla_bin())
        .env("FLOTILLA_AGENT_TOKEN", host.agent_token())
        .env(
            "FLOTILLA_AGENT_FINGERPRINT",
            host.fingerprint().expect("HTTPS"),
        )
        .args([
            "--endpoint",
            &host.endpoint,
            "vm",
            "exec",
            "ex",
            "-i",
            "--",
            "tr",
            "a-z",
            "A-Z",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"shout\n")
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "SHOUT\n");

    // The CLI exits with the guest command's code and streams its output.
    let out = host.cli(&[
        "vm",
        "exec",
        "ex",
        "--",
        "sh",
        "-c",
        "for i in 1 2 3; do echo line $i; done; exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "line 1\nline 2\nline 3\n"
    );

    // A timeout kills the command.
    let out = host.cli(&[
        "--json",
        "vm",
        "exec",
        "ex",
        "--timeout",
        "1",
        "--",
        "sleep",
        "30",
    ]);
    assert_eq!(out.status.code(), Some(124));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["timed_out"], true);
    assert!(v["duration_ms"].as_u64().unwrap_or(0) < 10_000);

    // Large output arrives whole (more than one frame's worth).
    let (code, out, _) = exec(
        &host,
        "ex",
        &["sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' x"],
    );
    assert_eq!(code, 0);
    assert_eq!(out.len(), 3_000_000);
    assert!(out.bytes().all(|b| b == b'x'));

    // Guest info is consistent with the VM.
    let (_, hostname, _) = exec(&host, "ex", &["hostname"]);
    assert_eq!(hostname.trim(), "ex");
}

#[test]
fn command_missing_in_guest_is_a_clear_error() {
    let host = TestHost::start().expect("test host");
    run_vm(&host, "nocmd");
    let (status, body) = host.api(
        "POST",
        "/v1/vms/nocmd/exec",
        Some(json!({ "argv": ["no-such-program"] })),
    );
    assert_eq!(status, 400, "{body}");
    let msg = body["error"]["message"].as_str().unwrap_or("");
    assert!(
        msg.contains("no-such-program") && msg.contains("not found"),
        "{msg}"
    );

    let out = host.cli(&["vm", "exec", "nocmd", "--", "no-such-program"]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).starts_with("error: "),
        "{}",
        stderr_of(&out)
    );

    // The guest agent is unharmed.
    assert_eq!(exec(&host, "nocmd", &["true"]).0, 0);
}
