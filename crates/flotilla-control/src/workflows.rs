//! Durable workflows. An operation is a list of steps, one per target
//! instance; each step is an idempotent call to a host agent (create a VM
//! that may already exist, delete one that may be gone), and is recorded as
//! done before the next begins. A control plane that dies mid-operation
//! repeats at most the step it was in when it comes back (or another
//! replica does, once the lease runs out).

use flotilla_api::control::{ObservedState, OperationState};
use flotilla_api::CreateVmRequest;
use serde::{Deserialize, Serialize};

use crate::error::{ControlError, ControlResult};
use crate::service::{observed_from_vm, ControlPlane};
use crate::store::{InstanceRow, OperationRow};

/// What an operation does to its targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperationInput {
    Run,
    Terminate,
    Start,
    Stop,
}

impl OperationInput {
    pub fn kind(self) -> &'static str {
        match self {
            OperationInput::Run => "run",
            OperationInput::Terminate => "terminate",
            OperationInput::Start => "start",
            OperationInput::Stop => "stop",
        }
    }

    fn step_name(self, target: &str) -> String {
        format!("{} {target}", self.kind())
    }
}

/// Drives `op` to its end in the background.
pub(crate) fn spawn(cp: ControlPlane, op: OperationRow) {
    tokio::spawn(async move {
        let id = op.id.clone();
        if let Err(e) = drive(&cp, op).await {
            tracing::error!(op = %id, error = %e, "operation could not be driven; another attempt takes it over when its lease ends");
        }
    });
}

async fn drive(cp: &ControlPlane, op: OperationRow) -> ControlResult<()> {
    let input: OperationInput = serde_json::from_value(op.input.clone()).map_err(|e| {
        ControlError::invalid(format!("operation {} has unreadable input: {e}", op.id))
    })?;
    let mut steps = op.steps.clone();
    let mut failures = Vec::new();
    for target in &op.targets {
        let step = input.step_name(target);
        if steps.contains(&step) {
            continue;
        }
        if let Err(e) = run_step(cp, input, target).await {
            tracing::warn!(op = %op.id, target, error = %e, "step failed");
            failures.push(format!("{target}: {}", e.message));
        }
        steps.push(step);
        let still_ours = cp
            .store()
            .record_step(&op.id, &steps, &cp.inner.replica, cp.lease_until())
            .await?;
        if !still_ours {
            tracing::warn!(op = %op.id, "operation taken over by another replica");
            return Ok(());
        }
    }
    let (state, error) = match failures.is_empty() {
        true => (OperationState::Succeeded, None),
        false => (OperationState::Failed, Some(failures.join("; "))),
    };
    cp.store()
        .finish_operation(&op.id, state, error.as_deref())
        .await?;
    tracing::info!(op = %op.id, kind = %op.kind, ?state, "operation finished");
    Ok(())
}

async fn endpoint_of(cp: &ControlPlane, inst: &InstanceRow) -> ControlResult<String> {
    let host = inst
        .host
        .as_deref()
        .ok_or_else(|| ControlError::conflict(format!("instance {} has no host", inst.name)))?;
    let row =
        cp.store().host(host).await?.ok_or_else(|| {
            ControlError::conflict(format!("host {host} is no longer registered"))
        })?;
    Ok(row.endpoint)
}

fn agent_error(e: crate::agents::AgentCallError) -> ControlError {
    ControlError::new(flotilla_api::ErrorCode::Conflict, e.to_string())
}

async fn run_step(cp: &ControlPlane, input: OperationInput, target: &str) -> ControlResult<()> {
    let store = cp.store();
    let Some(inst) = store.instance(target).await? else {
        // Terminated meanwhile: nothing left to do.
        return Ok(());
    };
    let endpoint = endpoint_of(cp, &inst).await;
    let result = async {
        let endpoint = endpoint?;
        let agents = &cp.inner.agents;
        match input {
            OperationInput::Run => {
                let mut tags = inst.tags.clone();
                tags.insert("flotilla.instance".into(), inst.name.clone());
                let request = CreateVmRequest {
                    name: inst.id.clone(),
                    image: inst.image.clone(),
                    vcpus: Some(inst.vcpus),
                    memory_mib: Some(inst.memory_mib),
                    cmdline_extra: None,
                    disks: Vec::new(),
                    nics: None,
                    tags,
                    start: Some(true),
                    wait_ready: Some(false),
                    from_snapshot: None,
                };
                let vm = match agents.create_vm(&endpoint, &request).await {
                    Ok(vm) => vm,
                    // Made by an earlier attempt of this step.
                    Err(e) if e.is_conflict() => {
                        agents.vm(&endpoint, &inst.id).await.map_err(agent_error)?
                    }
                    Err(e) => return Err(agent_error(e)),
                };
                let ip = vm.nics.first().map(|n| n.ip.clone());
                store
                    .set_observed(&inst.id, observed_from_vm(vm.state), ip.as_deref(), None)
                    .await?;
            }
            OperationInput::Terminate => {
                agents
                    .delete_vm(&endpoint, &inst.id)
                    .await
                    .map_err(agent_error)?;
                store.delete_instance(&inst.id).await?;
            }
            OperationInput::Start => {
                let vm = match agents.start_vm(&endpoint, &inst.id).await {
                    Ok(vm) => vm,
                    Err(e) if e.is_conflict() => {
                        agents.vm(&endpoint, &inst.id).await.map_err(agent_error)?
                    }
                    Err(e) => return Err(agent_error(e)),
                };
                store
                    .set_observed(&inst.id, observed_from_vm(vm.state), None, None)
                    .await?;
            }
            OperationInput::Stop => {
                let vm = match agents.stop_vm(&endpoint, &inst.id).await {
                    Ok(vm) => vm,
                    Err(e) if e.is_conflict() => {
                        agents.vm(&endpoint, &inst.id).await.map_err(agent_error)?
                    }
                    Err(e) => return Err(agent_error(e)),
                };
                store
                    .set_observed(&inst.id, observed_from_vm(vm.state), None, None)
                    .await?;
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = &result {
        // The instance stays, with the reason; a terminate can be retried.
        let observed = match input {
            OperationInput::Run => ObservedState::Failed,
            _ => inst.observed,
        };
        store
            .set_observed(&inst.id, observed, None, Some(&e.message))
            .await?;
    }
    result
}
