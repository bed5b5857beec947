//! Exec through the agent: output, stdin/env/cwd, streaming, timeouts, errors, concurrency.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_guest_protocol::{ErrorKind, ExecEvent, ExecRequest, GuestClientError};

use crate::{run, sh, text, Agent};

fn expected_seq(n: u32) -> String {
    (1..=n).map(|i| format!("{i}\n")).collect()
}

#[tokio::test]
async fn uname_runs() {
    let agent = Agent::start();
    let client = agent.client().await;
    let exit = run(&client, ExecRequest::new(["uname", "-a"])).await;
    assert!(exit.success(), "{exit:?}");
    assert!(text(&exit.stdout).starts_with("Linux"), "{exit:?}");
    assert!(!exit.timed_out);
}

#[tokio::test]
async fn stdin_env_cwd_and_exit_code() {
    let agent = Agent::start();
    let client = agent.client().await;
    let cwd = agent.dir().canonicalize().unwrap();
    let mut request = sh("cat; echo \"$FOO\"; pwd; echo oops >&2; exit 3");
    request.stdin = Some(b"from stdin\n".to_vec());
    request.env.insert("FOO".into(), "bar baz".into());
    request.cwd = Some(cwd.to_string_lossy().into_owned());
    let exit = run(&client, request).await;
    assert_eq!(exit.code, Some(3));
    assert_eq!(exit.signal, None);
    assert_eq!(
        text(&exit.stdout),
        format!("from stdin\nbar baz\n{}\n", cwd.display())
    );
    assert_eq!(text(&exit.stderr), "oops\n");
}

#[tokio::test]
async fn binary_stdin_round_trips() {
    let agent = Agent::start();
    let client = agent.client().await;
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let mut request = ExecRequest::new(["cat"]);
    request.stdin = Some(data.clone());
    let exit = run(&client, request).await;
    assert!(exit.success());
    assert_eq!(exit.stdout, data);
}

#[tokio::test]
async fn streamed_output_arrives_in_chunks() {
    let agent = Agent::start();
    let client = agent.client().await;
    let mut request = ExecRequest::new(["seq", "1", "300000"]);
    request.stream = true;
    let mut stream = client.exec(request).await.unwrap();
    let (mut stdout, mut chunks) = (Vec::new(), 0);
    let exit = loop {
        match stream.next().await.unwrap().unwrap() {
            ExecEvent::Stdout(data) => {
                assert!(data.len() <= flotilla_guest_protocol::MAX_OUTPUT_CHUNK);
                stdout.extend(data);
                chunks += 1;
            }
            ExecEvent::Stderr(data) => panic!("unexpected stderr {}", text(&data)),
            ExecEvent::Exit(exit) => break exit,
        }
    };
    assert!(stream.next().await.is_none());
    assert!(exit.success());
    assert!(exit.stdout.is_empty() && exit.stderr.is_empty());
    assert!(chunks > 1);
    assert_eq!(text(&stdout), expected_seq(300_000));
}

#[tokio::test]
async fn output_too_large_for_one_frame_is_not_lost() {
    let agent = Agent::start();
    let client = agent.client().await;
    // About 2 MB: more than one Exit frame can carry, so the agent falls back to Output frames.
    let exit = run(&client, sh("seq 1 300000; seq 1 1000 >&2")).await;
    assert!(exit.success());
    assert_eq!(text(&exit.stdout), expected_seq(300_000));
    assert_eq!(text(&exit.stderr), expected_seq(1000));
}

#[tokio::test]
async fn timeout_kills_the_whole_process_group() {
    let agent = Agent::start();
    let client = agent.client().await;
    let mut request = sh("sleep 30 & echo $!; wait");
    request.timeout_ms = Some(500);
    let started = Instant::now();
    let exit = run(&client, request).await;
    assert!(exit.timed_out, "{exit:?}");
    assert_eq!(exit.code, None);
    assert_eq!(exit.signal, Some(9));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!((500..5000).contains(&exit.duration_ms), "{exit:?}");
    let background: u32 = text(&exit.stdout).trim().parse().unwrap();
    // The background sleep was in the group: soon gone, or a zombie waiting for its reaper.
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{background}/stat")).unwrap_or_default();
        if stat.is_empty() || stat.contains(") Z ") {
            break;
        }
        assert!(Instant::now() < until, "still alive: {stat}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn missing_command_is_typed() {
    let agent = Agent::start();
    let client = agent.client().await;
    let error = client
        .exec_collect(
            ExecRequest::new(["no-such-command-xyz"]),
            Duration::from_secs(10),
        )
        .await
        .unwrap_err();
    match error {
        GuestClientError::Guest { kind, message } => {
            assert_eq!(kind, ErrorKind::CommandNotFound);
            assert_eq!(message, "no-such-command-xyz: command not found in guest");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn bad_requests_are_typed() {
    let agent = Agent::start();
    let client = agent.client().await;
    let not_executable = agent.dir().join("script");
    std::fs::write(&not_executable, "#!/bin/sh\necho hi\n").unwrap();
    let cases = [
        (
            ExecRequest::new(Vec::<String>::new()),
            ErrorKind::InvalidRequest,
        ),
        (
            ExecRequest::new([not_executable.to_string_lossy()]),
            ErrorKind::PermissionDenied,
        ),
        (
            ExecRequest {
                cwd: Some("/no/such/dir".into()),
                ..ExecRequest::new(["true"])
            },
            ErrorKind::InvalidRequest,
        ),
    ];
    for (request, expected) in cases {
        let error = client
            .exec_collect(request, Duration::from_secs(10))
            .await
            .unwrap_err();
        assert!(
            matches!(error, GuestClientError::Guest { kind, .. } if kind == expected),
            "{error:?}"
        );
    }
    // The connection is still fine afterwards.
    client.ping(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn concurrent_execs_run_in_parallel() {
    let agent = Agent::start();
    let client = Arc::new(agent.client().await);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..8 {
        let client = client.clone();
        tasks.spawn(async move {
            let exit = run(&client, sh(&format!("sleep 1; echo {i}"))).await;
            (i, exit)
        });
    }
    let mut seen = Vec::new();
    while let Some(result) = tasks.join_next().await {
        let (i, exit) = result.unwrap();
        assert_eq!(text(&exit.stdout), format!("{i}\n"));
        seen.push(i);
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..8).collect::<Vec<_>>());
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
}
