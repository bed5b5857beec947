//! `flotilla instance volume create|ls|inspect|rm`: the tenant's volumes on
//! the control plane.

use std::process::ExitCode;

use flotilla_api::control::{CreateVolumeRequest, Volume};

use super::fleetctl::{encode, every_page, parse_placement};
use crate::args::InstanceVolumeCommand;
use crate::client::Client;
use crate::output::{self, opt};

pub async fn run(c: &Client, json: bool, cmd: InstanceVolumeCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        InstanceVolumeCommand::Create {
            name,
            size,
            placement,
        } => {
            let req = CreateVolumeRequest {
                name,
                size_mib: size,
                placement: placement.map(parse_placement).transpose()?,
            };
            let vol: Volume = c.post("/v1/volumes", &req).await?;
            if json {
                output::json(&vol)?;
            } else {
                println!("volume {} ({} MiB) on {}", vol.name, vol.size_mib, vol.host);
            }
        }
        InstanceVolumeCommand::Ls => {
            let list: Vec<Volume> = every_page(c, "/v1/volumes").await?;
            if json {
                output::json(&list)?;
            } else {
                let rows = list
                    .iter()
                    .map(|v| {
                        vec![
                            v.name.clone(),
                            state(v),
                            format!("{} MiB", v.size_mib),
                            v.host.clone(),
                            opt(&v.attached_to),
                            v.created_at.clone(),
                        ]
                    })
                    .collect::<Vec<_>>();
                output::table(
                    &["NAME", "STATE", "SIZE", "HOST", "ATTACHED TO", "CREATED"],
                    &rows,
                );
            }
        }
        InstanceVolumeCommand::Inspect { name } => {
            let vol: Volume = c.get(&format!("/v1/volumes/{}", encode(&name))).await?;
            output::json(&vol)?;
        }
        InstanceVolumeCommand::Rm { name } => {
            c.delete(&format!("/v1/volumes/{}", encode(&name))).await?;
            if json {
                output::json(&serde_json::json!({ "removed": name }))?;
            } else {
                println!("removed volume {name}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn state(v: &Volume) -> String {
    serde_json::to_value(v.state)
        .ok()
        .and_then(|s| s.as_str().map(str::to_string))
        .unwrap_or_default()
}
