//! `flotilla snapshot create|ls|inspect|rm`.

use std::process::ExitCode;

use flotilla_api::{CreateSnapshotRequest, SnapshotCreated, SnapshotInfo};

use crate::args::SnapshotCommand;
use crate::client::Client;
use crate::output::{self, opt};

pub async fn run(client: &Client, json: bool, cmd: SnapshotCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        SnapshotCommand::Create { vm, name } => {
            let made: SnapshotCreated = client
                .post(
                    "/v1/snapshots",
                    &CreateSnapshotRequest {
                        vm: vm.clone(),
                        name,
                    },
                )
                .await?;
            if json {
                output::json(&made)?;
            } else {
                let pause = made
                    .pause_ms
                    .map(|ms| format!(", {vm} paused {ms} ms"))
                    .unwrap_or_default();
                println!(
                    "snapshot {} of {vm}: layer {}, {} stored{pause}",
                    opt(&made.snapshot.name),
                    made.snapshot.id,
                    size(made.snapshot.stored_bytes + made.snapshot.disk_bytes)
                );
            }
        }
        SnapshotCommand::Ls => {
            let list: Vec<SnapshotInfo> = client.get("/v1/snapshots").await?;
            if json {
                output::json(&list)?;
            } else {
                let rows = list
                    .iter()
                    .map(|s| {
                        vec![
                            s.name.clone().unwrap_or_else(|| "-".into()),
                            s.id.clone(),
                            kind(s),
                            opt(&s.vm),
                            opt(&s.parent),
                            size(s.stored_bytes + s.disk_bytes),
                            s.used_by.join(","),
                        ]
                    })
                    .collect::<Vec<_>>();
                output::table(
                    &["NAME", "ID", "KIND", "VM", "PARENT", "STORED", "USED BY"],
                    &rows,
                );
            }
        }
        SnapshotCommand::Inspect { name } => {
            let s: SnapshotInfo = client.get(&format!("/v1/snapshots/{name}")).await?;
            if json {
                output::json(&s)?;
            } else {
                println!("id:          {}", s.id);
                println!("name:        {}", opt(&s.name));
                println!("kind:        {}", kind(&s));
                println!("vm:          {}", opt(&s.vm));
                println!("image:       {}", opt(&s.image));
                println!("created:     {}", s.created_at);
                println!(
                    "shape:       {} vCPUs, {} MiB",
                    opt(&s.vcpus),
                    opt(&s.memory_mib)
                );
                println!("parent:      {}", opt(&s.parent));
                println!("chain:       {} layers", s.chain_length);
                println!("memory:      {} stored", size(s.stored_bytes));
                println!("disk:        {}", size(s.disk_bytes));
                println!("used by:     {}", s.used_by.join(", "));
                println!("children:    {}", s.children.join(", "));
            }
        }
        SnapshotCommand::Rm { name } => {
            client.delete(&format!("/v1/snapshots/{name}")).await?;
            if json {
                output::json(&serde_json::json!({ "removed": name }))?;
            } else {
                println!("removed snapshot {name}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn kind(s: &SnapshotInfo) -> String {
    serde_json::to_value(s.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn size(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}
