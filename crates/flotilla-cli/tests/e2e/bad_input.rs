//! Bad input: each gets a clear 4xx error and leaves nothing behind.

use flotilla_testkit::{HostOptions, TestHost};
use serde_json::json;

use crate::{assert_clean, run_vm, stderr_of};

fn error_of(body: &serde_json::Value) -> String {
    body["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn bad_create_requests_are_refused_and_leave_nothing() {
    let host = TestHost::start_with(HostOptions {
        capacity_vcpus: 4,
        capacity_memory_mib: 1024,
        ..HostOptions::default()
    })
    .expect("test host");

    let (s, b) = host.api(
        "POST",
        "/v1/vms",
        Some(json!({ "name": "z", "memory_mib": 0 })),
    );
    assert_eq!(s, 400);
    assert!(
        error_of(&b).contains("memory_mib") && error_of(&b).contains("at least"),
        "{b}"
    );

    let (s, b) = host.api(
        "POST",
        "/v1/vms",
        Some(json!({ "name": "big", "memory_mib": 4096 })),
    );
    // More than the whole host can ever give: refused as bad input.
    assert_eq!(s, 400, "{b}");
    assert!(error_of(&b).contains("more than this host has"), "{b}");

    let (s, b) = host.api(
        "POST",
        "/v1/vms",
        Some(json!({ "name": "x", "image": "nope" })),
    );
    assert_eq!(s, 404, "{b}");
    assert!(error_of(&b).contains("nope"), "{b}");

    let (s, b) = host.api("POST", "/v1/vms", Some(json!({ "name": "Bad_Name" })));
    assert_eq!(s, 400, "{b}");

    let (s, b) = host.api("POST", "/v1/vms", Some(json!({ "name": "x", "memroy": 5 })));
    assert_eq!(s, 400, "{b}");
    assert!(error_of(&b).contains("memroy"), "{b}");

    let (s, _) = host.api("POST", "/v1/vms", Some(json!({ "name": "x", "vcpus": 0 })));
    assert_eq!(s, 400);

    // An address must be IPv4, and a VM address of the host's subnet.
    for (ip, says) in [
        ("ten", "not an IPv4 address"),
        ("10.99.0.5", "subnet"),
        ("10.77.0.1", "gateway"),
    ] {
        let (s, b) = host.api("POST", "/v1/vms", Some(json!({ "name": "x", "ip": ip })));
        assert_eq!(s, 400, "{ip}: {b}");
        assert!(error_of(&b).contains(says), "{ip}: {b}");
    }

    // The CLI shows one line and a hint.
    let out = host.cli(&["vm", "run", "y", "--image", "nope"]);
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(
        err.starts_with("error: ") && err.contains("\nhint: "),
        "{err}"
    );

    let out = host.cli(&["vm", "run", "y", "--memory", "lots"]);
    assert!(!out.status.success());
    assert!(stderr_of(&out).contains("256M"), "{}", stderr_of(&out));

    assert_clean(&host);

    // A duplicate name is refused; the first VM is untouched.
    run_vm(&host, "dup");
    let (s, b) = host.api("POST", "/v1/vms", Some(json!({ "name": "dup" })));
    assert_eq!(s, 409, "{b}");
    assert!(error_of(&b).contains("already exists"), "{b}");
    assert_eq!(host.qemu_pids().len(), 1);
    // Another VM's address is taken.
    let (_, dup) = host.api("GET", "/v1/vms/dup", None);
    let taken = dup["nics"][0]["ip"].as_str().expect("an address");
    let (s, b) = host.api("POST", "/v1/vms", Some(json!({ "name": "x", "ip": taken })));
    assert_eq!(s, 409, "{b}");
    assert!(error_of(&b).contains("taken"), "{b}");

    // Capacity counts running VMs: 1024 MiB holds 4 of 256, not 5. The
    // first is given its address.
    let vm: serde_json::Value = host.cli_json(&["vm", "run", "fill-0", "--ip", "10.77.0.200"]);
    assert_eq!(vm["nics"][0]["ip"], "10.77.0.200", "{vm}");
    for i in 1..3 {
        host.cli_json::<serde_json::Value>(&["vm", "run", &format!("fill-{i}")]);
    }
    let (s, b) = host.api("POST", "/v1/vms", Some(json!({ "name": "one-too-many" })));
    assert_eq!(s, 409, "{b}");
    assert!(error_of(&b).contains("not enough capacity"), "{b}");
    assert!(b["error"]["hint"].as_str().is_some(), "{b}");
    assert_eq!(host.qemu_pids().len(), 4);
    let (s, _) = host.api("GET", "/v1/vms/one-too-many", None);
    assert_eq!(s, 404);
    for name in ["dup", "fill-0", "fill-1", "fill-2"] {
        host.cli_json::<serde_json::Value>(&["vm", "rm", "--force", name]);
    }
    assert_clean(&host);
}

#[test]
fn exec_on_a_stopped_vm_is_a_conflict() {
    let host = TestHost::start().expect("test host");
    host.cli_json::<serde_json::Value>(&["vm", "run", "idle", "--no-start"]);
    let (s, b) = host.api(
        "POST",
        "/v1/vms/idle/exec",
        Some(json!({ "argv": ["true"] })),
    );
    assert_eq!(s, 409, "{b}");
    assert!(error_of(&b).contains("stopped"), "{b}");
    assert!(
        b["error"]["hint"]
            .as_str()
            .unwrap_or("")
            .contains("flotilla vm start idle"),
        "{b}"
    );

    let (s, _) = host.api(
        "POST",
        "/v1/vms/ghost/exec",
        Some(json!({ "argv": ["true"] })),
    );
    assert_eq!(s, 404);
    let (s, _) = host.api("POST", "/v1/vms/idle/exec", Some(json!({ "argv": [] })));
    assert_eq!(s, 400);
}

#[test]
fn a_kernel_that_is_not_a_kernel_is_refused() {
    let host = TestHost::start().expect("test host");
    let fake = host.data_path().join("not-a-kernel");
    std::fs::write(&fake, b"#!/bin/sh\necho I am a shell script\n").expect("write");
    let (s, b) = host.api(
        "POST",
        "/v1/images",
        Some(json!({ "name": "fake", "kernel": fake.display().to_string() })),
    );
    assert_eq!(s, 400, "{b}");
    assert!(
        error_of(&b).contains("not a kernel") || error_of(&b).contains("not-a-kernel"),
        "{b}"
    );
    let (s, _) = host.api("GET", "/v1/images/fake", None);
    assert_eq!(s, 404);
    assert!(!host.data_path().join("images/fake").exists());

    // The CLI says the same in one line.
    let out = host.cli(&[
        "image",
        "register",
        "fake",
        "--kernel",
        &fake.display().to_string(),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).starts_with("error: "),
        "{}",
        stderr_of(&out)
    );
}

#[test]
fn unknown_paths_and_bad_bodies_get_json_errors() {
    let host = TestHost::start_with(HostOptions {
        with_default_image: false,
        ..HostOptions::default()
    })
    .expect("test host");
    let (s, b) = host.api("GET", "/v1/nothing-here", None);
    assert_eq!(s, 404);
    assert!(error_of(&b).contains("/v1/nothing-here"), "{b}");
    let (s, b) = host.api("PUT", "/v1/vms", None);
    assert_eq!(s, 405);
    assert!(error_of(&b).contains("PUT"), "{b}");
    let (s, b) = host.api("POST", "/v1/vms/x/stop", Some(json!({ "forc": true })));
    assert_eq!(s, 400, "{b}");
    let (s, b) = host.api(
        "POST",
        "/v1/images",
        Some(json!({ "name": "k", "kernel": "/does/not/exist" })),
    );
    assert_eq!(s, 400, "{b}");
    assert!(error_of(&b).contains("/does/not/exist"), "{b}");

    // --json turns a failure into a JSON error body on stdout.
    let out = host.cli(&["--json", "vm", "inspect", "ghost"]);
    assert!(!out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json error");
    assert_eq!(v["error"]["code"], "not_found");
}

#[test]
fn the_agent_api_needs_the_agents_token() {
    let host = TestHost::start_with(HostOptions {
        with_default_image: false,
        ..HostOptions::default()
    })
    .expect("test host");
    let http = host.http_client();
    let call = |token: Option<&str>, path: &str| {
        let mut req = http.get(format!("{}{path}", host.endpoint));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().expect("the agent answers");
        let status = resp.status().as_u16();
        (status, resp.json::<serde_json::Value>().unwrap_or_default())
    };
    // Probes need no token; everything else does, and a wrong one is no
    // better than none.
    assert_eq!(call(None, "/healthz").0, 200);
    let (s, b) = call(None, "/v1/vms");
    assert_eq!(s, 401, "{b}");
    assert_eq!(b["error"]["code"], "unauthenticated");
    assert!(
        b["error"]["hint"]
            .as_str()
            .unwrap_or_default()
            .contains("agent.token"),
        "{b}"
    );
    let (s, b) = call(Some("fla_not-the-token"), "/v1/host");
    assert_eq!(s, 401, "{b}");
    let token = host.agent_token();
    assert!(token.starts_with("fla_"), "{token:?}");
    assert_eq!(call(Some(&token), "/v1/vms").0, 200);

    // The token file is private, and kept across agent restarts.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(host.data_path().join("agent.token"))
        .expect("token file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "{mode:o}");

    // A CLI without the token is told where to find it.
    let fingerprint = host.fingerprint().expect("HTTPS");
    let out = std::process::Command::new(flotilla_testkit::flotilla_bin())
        .env_remove("FLOTILLA_AGENT_TOKEN")
        .env("FLOTILLA_DATA_DIR", "/nonexistent")
        .args([
            "--endpoint",
            &host.endpoint,
            "--agent-fingerprint",
            &fingerprint,
        ])
        .args(["vm", "ls"])
        .output()
        .expect("flotilla");
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(
        err.contains("missing API token") && err.contains("agent.token"),
        "{err}"
    );
    // With FLOTILLA_DATA_DIR pointing at the agent's data, it is found.
    let out = std::process::Command::new(flotilla_testkit::flotilla_bin())
        .env_remove("FLOTILLA_AGENT_TOKEN")
        .env("FLOTILLA_DATA_DIR", host.data_path())
        .args(["--endpoint", &host.endpoint, "vm", "ls"])
        .output()
        .expect("flotilla");
    assert!(out.status.success(), "{}", stderr_of(&out));
}

/// The agent's API is HTTPS with the agent's own certificate: the host
/// shows its fingerprint; a client trusting another certificate, or none,
/// is refused before any request (token included) is sent; the
/// certificate outlives a restart.
#[test]
fn the_agent_api_is_https_with_a_pinned_certificate() {
    let mut host = TestHost::start_with(HostOptions {
        with_default_image: false,
        ..HostOptions::default()
    })
    .expect("test host");
    assert!(host.endpoint.starts_with("https://"));
    let fingerprint = host.fingerprint().expect("a certificate");
    let info: serde_json::Value = host.cli_json(&["host"]);
    assert_eq!(info["tls_fingerprint"], fingerprint.as_str(), "{info}");
    let token = host.agent_token();
    let cli = |fingerprint: Option<&str>, endpoint: &str| {
        let mut c = std::process::Command::new(flotilla_testkit::flotilla_bin());
        c.env("FLOTILLA_DATA_DIR", "/nonexistent")
            .env("FLOTILLA_AGENT_TOKEN", &token)
            .args(["--endpoint", endpoint]);
        if let Some(f) = fingerprint {
            c.args(["--agent-fingerprint", f]);
        }
        c.args(["vm", "ls"]).output().expect("flotilla")
    };
    // Another certificate's fingerprint: the connection is refused.
    let other = "ab".repeat(32);
    let endpoint = host.endpoint.clone();
    let out = cli(Some(&other), &endpoint);
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(err.contains("not the one trusted"), "{err}");
    // None at all: told how to get it.
    let out = cli(None, &endpoint);
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(
        err.contains("fingerprint") && err.contains("flotilla host"),
        "{err}"
    );
    // Not a fingerprint.
    let out = cli(Some("sha256:xyz"), &endpoint);
    assert!(
        stderr_of(&out).contains("64 hex digits"),
        "{}",
        stderr_of(&out)
    );
    // Plain HTTP to an HTTPS agent: told about https://.
    let plain = host.endpoint.replace("https://", "http://");
    let out = cli(None, &plain);
    assert!(!out.status.success());
    assert!(stderr_of(&out).contains("https://"), "{}", stderr_of(&out));
    // The right one works; the certificate is kept across a restart.
    assert!(cli(Some(&fingerprint), &endpoint).status.success());
    host.kill_agent(nix::sys::signal::Signal::SIGTERM);
    host.start_agent().expect("agent restarts");
    assert_eq!(host.fingerprint().as_deref(), Some(fingerprint.as_str()));
    assert!(cli(Some(&fingerprint), &endpoint).status.success());
}
