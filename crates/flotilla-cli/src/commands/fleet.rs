//! `flotilla fleet suspend|resume`.

use std::process::ExitCode;

use flotilla_api::{FleetRequest, FleetResult};

use crate::args::FleetCommand;
use crate::client::Client;
use crate::output::{self, opt};

pub async fn run(client: &Client, json: bool, cmd: FleetCommand) -> anyhow::Result<ExitCode> {
    let (path, args, warm) = match cmd {
        FleetCommand::Suspend { fleet, warm } => ("/v1/fleet/suspend", fleet, warm),
        FleetCommand::Resume(a) => ("/v1/fleet/resume", a, false),
    };
    let req = FleetRequest {
        names: args.names,
        tag: args.tag,
        parallelism: Some(args.parallel),
        warm,
    };
    let result: FleetResult = client.post(path, &req).await?;
    if json {
        output::json(&result)?;
    } else {
        let rows = result
            .items
            .iter()
            .map(|i| {
                vec![
                    i.name.clone(),
                    opt(&i.state),
                    format!("{:.2}", i.duration_ms as f64 / 1000.0),
                    i.error
                        .as_ref()
                        .map(|e| e.message.clone())
                        .unwrap_or_else(|| "ok".into()),
                ]
            })
            .collect::<Vec<_>>();
        output::table(&["NAME", "STATE", "SECONDS", "RESULT"], &rows);
        println!(
            "{} succeeded, {} failed in {:.2} s",
            result.succeeded,
            result.failed,
            result.duration_ms as f64 / 1000.0
        );
    }
    Ok(if result.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
