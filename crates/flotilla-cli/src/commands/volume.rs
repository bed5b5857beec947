//! `flotilla volume create|ls|inspect|rm`: the agent's host volumes.

use std::process::ExitCode;

use flotilla_api::{CreateVolumeRequest, VolumeInfo};

use crate::args::VolumeCommand;
use crate::client::Client;
use crate::output::{self, opt};

pub async fn run(client: &Client, json: bool, cmd: VolumeCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        VolumeCommand::Create { name, size } => {
            let made: VolumeInfo = client
                .post(
                    "/v1/volumes",
                    &CreateVolumeRequest {
                        name,
                        size_mib: size,
                    },
                )
                .await?;
            if json {
                output::json(&made)?;
            } else {
                println!("volume {}: {} MiB", made.name, made.size_mib);
            }
        }
        VolumeCommand::Ls => {
            let list: Vec<VolumeInfo> = client.get("/v1/volumes").await?;
            if json {
                output::json(&list)?;
            } else {
                let rows = list
                    .iter()
                    .map(|v| {
                        vec![
                            v.name.clone(),
                            format!("{} MiB", v.size_mib),
                            format!("{} MiB", v.allocated_mib),
                            opt(&v.attached_to),
                        ]
                    })
                    .collect::<Vec<_>>();
                output::table(&["NAME", "SIZE", "ALLOCATED", "ATTACHED TO"], &rows);
            }
        }
        VolumeCommand::Inspect { name } => {
            let v: VolumeInfo = client.get(&format!("/v1/volumes/{name}")).await?;
            if json {
                output::json(&v)?;
            } else {
                println!("name:        {}", v.name);
                println!("size:        {} MiB", v.size_mib);
                println!("allocated:   {} MiB", v.allocated_mib);
                println!("path:        {}", v.path);
                println!("attached to: {}", opt(&v.attached_to));
            }
        }
        VolumeCommand::Rm { name } => {
            client.delete(&format!("/v1/volumes/{name}")).await?;
            if json {
                output::json(&serde_json::json!({ "removed": name }))?;
            } else {
                println!("removed volume {name}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
