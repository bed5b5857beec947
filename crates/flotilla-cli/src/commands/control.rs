//! `flotilla control`: run a control plane replica in this process.

use std::process::ExitCode;
use std::time::Duration;

use flotilla_control::{run_control, ControlConfig, ControlSettings};

use crate::args::ControlArgs;

pub async fn control(args: ControlArgs) -> anyhow::Result<ExitCode> {
    let database = args
        .database
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", args.data_dir.join("control.db").display()));
    let settings = ControlSettings {
        host_down_after: Duration::from_secs(args.host_down_after.max(1)),
        lease: Duration::from_secs(args.lease_seconds.max(2)),
        snapshot_settle_after: Duration::from_secs(args.snapshot_settle_secs),
        ..ControlSettings::default()
    };
    run_control(ControlConfig {
        listen: args.listen,
        database,
        data_dir: args.data_dir,
        admin_token: args.admin_token,
        default_tenant: None,
        local_host: None,
        settings,
    })
    .await?;
    Ok(ExitCode::SUCCESS)
}
