//! `flotilla vm ...`.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use base64::Engine;
use flotilla_api::{
    CloneResult, CloneVmRequest, CreateVmRequest, DiskSpec, ExecEvent, ExecRequest, StopVmRequest,
    VmInfo,
};
use futures::StreamExt;
use reqwest::Method;

use crate::args::{VmCommand, VmExecArgs, VmRunArgs};
use crate::client::{CliError, Client};
use crate::output::{self, opt};

pub async fn run(client: &Client, json: bool, cmd: VmCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        VmCommand::Run(a) => {
            let vm: VmInfo = client.post("/v1/vms", &create_request(a)).await?;
            show_vm(json, &vm, "started")?;
        }
        VmCommand::Ls => {
            let vms: Vec<VmInfo> = client.get("/v1/vms").await?;
            if json {
                output::json(&vms)?;
            } else {
                let rows = vms
                    .iter()
                    .map(|v| {
                        let state = match v.warm {
                            true => format!("{} (warm)", v.state),
                            false => v.state.to_string(),
                        };
                        vec![
                            v.name.clone(),
                            state,
                            v.image.clone(),
                            v.vcpus.to_string(),
                            v.memory_mib.to_string(),
                            v.nics
                                .first()
                                .map(|n| n.ip.clone())
                                .unwrap_or_else(|| "-".into()),
                            opt(&v.pid),
                            if v.guest_ready { "yes" } else { "no" }.into(),
                        ]
                    })
                    .collect::<Vec<_>>();
                output::table(
                    &[
                        "NAME", "STATE", "IMAGE", "VCPUS", "MEM MiB", "IP", "PID", "READY",
                    ],
                    &rows,
                );
            }
        }
        VmCommand::Inspect { name } => {
            let vm: VmInfo = client.get(&format!("/v1/vms/{name}")).await?;
            if json {
                output::json(&vm)?;
            } else {
                print_inspect(&vm);
            }
        }
        VmCommand::Exec(a) => return exec(client, json, a).await,
        VmCommand::Logs { name, tail, follow } => logs(client, &name, tail, follow).await?,
        VmCommand::Stop {
            name,
            force,
            timeout,
        } => {
            let body = StopVmRequest {
                timeout_ms: timeout.map(|s| s.saturating_mul(1000)),
                force,
            };
            let vm: VmInfo = client.post(&format!("/v1/vms/{name}/stop"), &body).await?;
            show_vm(json, &vm, "stopped")?;
        }
        VmCommand::Start { name, wait } => {
            let path = format!("/v1/vms/{name}/start?wait={wait}");
            let vm: VmInfo = client.post(&path, &serde_json::json!({})).await?;
            show_vm(json, &vm, "started")?;
        }
        VmCommand::Migrate {
            name,
            to,
            to_token,
            to_fingerprint,
            options,
            no_wait,
        } => {
            let args = super::migration::MigrateArgs {
                name,
                to,
                to_token,
                to_fingerprint,
                options: options.options(),
                no_wait,
            };
            return super::migration::migrate(client, json, args).await;
        }
        VmCommand::Suspend { name, warm } => {
            let vm: VmInfo = client
                .post(
                    &format!("/v1/vms/{name}/suspend?warm={warm}"),
                    &serde_json::json!({}),
                )
                .await?;
            if json {
                output::json(&vm)?;
            } else {
                let waiting = if warm {
                    "; a QEMU is started to wait for its resume"
                } else {
                    ""
                };
                println!(
                    "{} suspended (snapshot {}){waiting}",
                    vm.name,
                    opt(&vm.snapshot)
                );
            }
        }
        VmCommand::Resume { name, wait } => {
            let path = format!("/v1/vms/{name}/resume?wait={wait}");
            let vm: VmInfo = client.post(&path, &serde_json::json!({})).await?;
            show_vm(json, &vm, "resumed")?;
        }
        VmCommand::Clone {
            source,
            name,
            disk,
            tags,
        } => {
            let req = CloneVmRequest {
                name,
                disk,
                tags: (!tags.is_empty()).then(|| tags.into_iter().collect()),
            };
            let made: CloneResult = client
                .post(&format!("/v1/vms/{source}/clone"), &req)
                .await?;
            if json {
                output::json(&made)?;
            } else {
                let ip = made.vm.nics.first().map(|n| n.ip.clone());
                println!(
                    "{} cloned from {source} in {:.2} s ({} paused {} ms); ip {}",
                    made.vm.name,
                    made.total_ms as f64 / 1000.0,
                    source,
                    made.source_pause_ms,
                    opt(&ip)
                );
            }
        }
        VmCommand::MoveDisk { name, volume } => {
            let vm: VmInfo = client
                .post(
                    &format!("/v1/vms/{name}/move-disk"),
                    &flotilla_api::MoveDiskRequest { volume },
                )
                .await?;
            if json {
                output::json(&vm)?;
            } else {
                let path = vm.disks.first().map(|d| d.path.clone());
                println!("{}: root disk moved to {}", vm.name, opt(&path));
            }
        }
        VmCommand::Rm { name, force } => {
            client
                .delete(&format!("/v1/vms/{name}?force={force}"))
                .await?;
            if json {
                output::json(&serde_json::json!({ "removed": name }))?;
            } else {
                println!("removed {name}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn create_request(a: VmRunArgs) -> CreateVmRequest {
    CreateVmRequest {
        name: a.name,
        image: a.image,
        vcpus: a.vcpus,
        memory_mib: a.memory,
        cmdline_extra: a.cmdline,
        disks: a
            .disks
            .into_iter()
            .map(|(name, size_mib)| DiskSpec {
                name,
                size_mib,
                volume: None,
            })
            .chain(a.volumes.into_iter().map(|(volume, name)| DiskSpec {
                name,
                size_mib: 0,
                volume: Some(volume),
            }))
            .collect(),
        nics: a.nics,
        ip: a.ip.map(|ip| ip.to_string()),
        tags: a.tags.into_iter().collect(),
        start: Some(!a.no_start),
        wait_ready: Some(a.wait),
        from_snapshot: a.from_snapshot,
    }
}

fn show_vm(json: bool, vm: &VmInfo, verb: &str) -> anyhow::Result<()> {
    if json {
        return output::json(vm);
    }
    let ip = vm
        .nics
        .first()
        .map(|n| format!(" at {}", n.ip))
        .unwrap_or_default();
    let ready = match (vm.guest_ready, vm.ready_ms) {
        (true, Some(ms)) => format!(", guest ready in {:.2} s", ms as f64 / 1000.0),
        _ => String::new(),
    };
    if vm.state.has_process() || verb == "stopped" {
        println!("{} {}{ip} ({}{ready})", vm.name, verb, vm.state);
    } else {
        println!("{} is {}", vm.name, vm.state);
    }
    Ok(())
}

fn print_inspect(vm: &VmInfo) {
    println!("name:        {}", vm.name);
    println!("id:          {}", vm.id);
    println!("state:       {}", vm.state);
    println!("qemu status: {}", opt(&vm.qemu_status));
    println!("pid:         {}", opt(&vm.pid));
    println!("accel:       {}", opt(&vm.accel));
    println!("image:       {}", vm.image);
    println!("vcpus:       {}", vm.vcpus);
    println!("memory:      {} MiB", vm.memory_mib);
    println!("guest ready: {}", if vm.guest_ready { "yes" } else { "no" });
    println!(
        "boot time:   {}",
        vm.guest_boot_ms
            .map(|m| format!("{m} ms (guest uptime at agent ready)"))
            .unwrap_or("-".into())
    );
    println!(
        "ready in:    {}",
        vm.ready_ms
            .map(|m| format!("{m} ms (from start request)"))
            .unwrap_or("-".into())
    );
    println!("created:     {}", vm.created_at);
    println!("started:     {}", opt(&vm.started_at));
    for (i, n) in vm.nics.iter().enumerate() {
        println!(
            "nic{i}:        {}/{} mac {} tap {} gw {}",
            n.ip, n.prefix_len, n.mac, n.tap, n.gateway
        );
    }
    for d in &vm.disks {
        let volume = d
            .volume
            .as_ref()
            .map(|v| format!(" (volume {v})"))
            .unwrap_or_default();
        println!(
            "disk {:<6}  {} MiB {} {}{volume}",
            d.name, d.virtual_size_mib, d.format, d.path
        );
    }
    for (k, v) in &vm.tags {
        println!("tag:         {k}={v}");
    }
    if let Some(id) = &vm.snapshot {
        println!("snapshot:    {id}");
    }
    if vm.warm {
        println!("warm:        a QEMU waits for the resume");
    }
    if let Some(e) = &vm.last_error {
        println!("last error:  {e}");
    }
    if let Some(g) = &vm.guest {
        println!(
            "guest:       {} (kernel {}), up {:.1} s",
            g.hostname,
            g.kernel_release,
            g.uptime_ms as f64 / 1000.0
        );
        println!(
            "guest mem:   {} MiB available of {} MiB",
            g.mem_available_kib / 1024,
            g.mem_total_kib / 1024
        );
        for a in &g.addresses {
            println!("guest addr:  {a}");
        }
    }
}

async fn exec(client: &Client, json: bool, a: VmExecArgs) -> anyhow::Result<ExitCode> {
    let path = format!("/v1/vms/{}/exec", a.name);
    exec_at(client, json, &path, a).await
}

/// Runs the command through `path` (a VM's exec, or an instance's through
/// the control plane): output streamed, or collected with `--json`.
pub async fn exec_at(
    client: &Client,
    json: bool,
    path: &str,
    a: VmExecArgs,
) -> anyhow::Result<ExitCode> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let stdin_b64 = if a.stdin {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf)?;
        Some(b64.encode(buf))
    } else {
        None
    };
    let req = ExecRequest {
        argv: a.command,
        env: a.env.into_iter().collect(),
        cwd: a.cwd,
        stdin_b64,
        timeout_ms: a.timeout.map(|s| s.saturating_mul(1000)),
    };
    if json {
        let result: flotilla_api::ExecResult = client.post(path, &req).await?;
        output::json(&result)?;
        return Ok(exit_code(result.exit_code, result.signal, result.timed_out));
    }
    let resp = client
        .send(
            client
                .request(Method::POST, &format!("{path}?stream=true"))
                .json(&req),
        )
        .await?;
    let mut body = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    while let Some(chunk) = body.next().await {
        buf.extend_from_slice(&chunk?);
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            match serde_json::from_slice::<ExecEvent>(&line)? {
                ExecEvent::Stdout { data_b64 } => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&b64.decode(data_b64)?)?;
                    out.flush()?;
                }
                ExecEvent::Stderr { data_b64 } => {
                    let mut err = std::io::stderr().lock();
                    err.write_all(&b64.decode(data_b64)?)?;
                    err.flush()?;
                }
                ExecEvent::Exit {
                    exit_code: code,
                    signal,
                    timed_out,
                    ..
                } => {
                    if timed_out {
                        eprintln!("flotilla: the command timed out and was killed");
                    }
                    return Ok(exit_code(code, signal, timed_out));
                }
                ExecEvent::Error { error } => {
                    return Err(CliError::new(error.message, error.hint).into());
                }
            }
        }
    }
    Err(CliError::new(
        "the agent closed the exec stream before the command ended",
        None,
    )
    .into())
}

/// The guest's exit code; 128+signal for a killed command, 124 for a timeout (like timeout(1)).
fn exit_code(code: Option<i32>, signal: Option<i32>, timed_out: bool) -> ExitCode {
    let c = if timed_out {
        124
    } else {
        code.or(signal.map(|s| 128 + s)).unwrap_or(1)
    };
    ExitCode::from(c.clamp(0, 255) as u8)
}

async fn logs(client: &Client, name: &str, tail: Option<u64>, follow: bool) -> anyhow::Result<()> {
    let first_path = match tail {
        Some(n) => format!("/v1/vms/{name}/logs?tail_bytes={n}"),
        None => format!("/v1/vms/{name}/logs"),
    };
    let resp = client
        .send(client.request(Method::GET, &first_path))
        .await?;
    let mut size = log_size(&resp);
    std::io::stdout().write_all(&resp.bytes().await?)?;
    if !follow {
        return Ok(());
    }
    // Follow by polling from the last size seen: the log only grows.
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let path = format!("/v1/vms/{name}/logs?offset={size}");
        let resp = client.send(client.request(Method::GET, &path)).await?;
        let new_size = log_size(&resp);
        let bytes = resp.bytes().await?;
        let mut out = std::io::stdout().lock();
        out.write_all(&bytes)?;
        out.flush()?;
        size = new_size.max(size);
    }
}

fn log_size(resp: &reqwest::Response) -> u64 {
    resp.headers()
        .get(LOG_SIZE_HEADER)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(0)
}

/// The console log's full size, sent with every logs response.
const LOG_SIZE_HEADER: &str = "x-flotilla-log-size";
