//! Durable workflows. An operation is a list of steps, one per target
//! instance; each step is an idempotent call to a host agent (create a VM
//! that may already exist, delete one that may be gone), and is recorded as
//! done before the next begins. A control plane that dies mid-operation
//! repeats at most the step it was in when it comes back (or another
//! replica does, once the lease runs out).

use flotilla_api::control::{ObservedState, OperationState};
use flotilla_api::CreateVmRequest;
use serde::{Deserialize, Serialize};

use crate::agents::{AgentAddr, AgentCallError};
use crate::error::{ControlError, ControlResult};
use crate::service::{observed_from_vm, ControlPlane};
use crate::store::{now_ms, InstanceRow, ObservedUpdate, OperationRow};

/// The tags of an instance's VM: its own, its name, and its tenant (its
/// network group: other tenants' VMs do not reach it).
fn vm_tags(inst: &InstanceRow) -> std::collections::BTreeMap<String, String> {
    let mut tags = inst.tags.clone();
    tags.insert("flotilla.instance".into(), inst.name.clone());
    tags.insert(
        flotilla_api::control::NETWORK_GROUP_TAG.into(),
        inst.tenant_id.clone(),
    );
    tags
}

/// What an operation does to its targets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperationInput {
    Run,
    /// A run whose request carried placement rules of its own: kept, so an
    /// instance its host refuses is placed again under the same rules.
    RunWith {
        placement: Box<flotilla_api::control::PlacementPolicy>,
    },
    Terminate,
    Start,
    Stop,
    Suspend,
    /// A suspend after which a QEMU waits on the host for the resume (a
    /// warm suspend: the resume skips QEMU's start).
    SuspendWarm,
    Resume,
    /// The target is the new instance, made from a snapshot of `source`
    /// (an instance id) on the source's host.
    Clone {
        source: String,
    },
    /// Live-migrate the targets to host `to`, or where placement puts them
    /// (never their current host).
    Migrate {
        #[serde(default)]
        to: Option<String>,
        #[serde(default)]
        options: flotilla_api::migration::MigrationOptions,
    },
}

impl OperationInput {
    pub fn kind(&self) -> &'static str {
        match self {
            OperationInput::Run | OperationInput::RunWith { .. } => "run",
            OperationInput::Terminate => "terminate",
            OperationInput::Start => "start",
            OperationInput::Stop => "stop",
            OperationInput::Suspend | OperationInput::SuspendWarm => "suspend",
            OperationInput::Resume => "resume",
            OperationInput::Clone { .. } => "clone",
            OperationInput::Migrate { .. } => "migrate",
        }
    }

    /// Whether a VM in `state` is where this start, stop, suspend or resume
    /// takes it (or on its way there).
    fn reached_by(&self, state: flotilla_api::VmState) -> bool {
        use flotilla_api::VmState as S;
        match self {
            OperationInput::Start | OperationInput::Resume => {
                matches!(state, S::Running | S::Starting | S::Resuming)
            }
            OperationInput::Stop => matches!(state, S::Stopped | S::Stopping | S::Crashed),
            OperationInput::Suspend | OperationInput::SuspendWarm => {
                matches!(state, S::Suspended | S::Suspending)
            }
            _ => false,
        }
    }

    fn step_name(&self, target: &str) -> String {
        format!("{} {target}", self.kind())
    }
}

/// Targets acted on at once within one operation (a fleet suspend, say).
const PARALLEL_STEPS: usize = 4;

/// Marks a step that ended in failure, after its name.
const FAILED_MARK: &str = ": failed: ";

fn is_done(steps: &[String], step: &str) -> bool {
    steps.iter().any(|s| {
        s == step
            || s.strip_prefix(step)
                .is_some_and(|rest| rest.starts_with(FAILED_MARK))
    })
}

/// Drives `op` to its end in the background.
/// Drives `op` to its end in the background (unless this replica already
/// does), renewing its lease meanwhile: a step may take minutes, and an
/// expired lease would let another driver in.
pub(crate) fn spawn(cp: ControlPlane, op: OperationRow) {
    if !cp.start_driving(&op.id) {
        return;
    }
    tokio::spawn(async move {
        let id = op.id.clone();
        let renewal = {
            let (cp, id) = (cp.clone(), id.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(cp.inner.settings.lease / 4).await;
                    match cp
                        .store()
                        .renew_lease(&id, &cp.inner.replica, cp.lease_until())
                        .await
                    {
                        Ok(true) => {}
                        Ok(false) => return,
                        Err(e) => tracing::warn!(op = %id, error = %e, "renewing the lease"),
                    }
                }
            })
        };
        if let Err(e) = drive(&cp, op).await {
            tracing::error!(op = %id, error = %e, "operation could not be driven; another attempt takes it over when its lease ends");
        }
        renewal.abort();
        cp.stop_driving(&id);
    });
}

/// Runs the steps not done yet, a few at a time, recording each as it ends
/// (with its failure, if it failed), then the outcome.
async fn drive(cp: &ControlPlane, op: OperationRow) -> ControlResult<()> {
    let input: OperationInput = match serde_json::from_value(op.input.clone()) {
        Ok(input) => input,
        Err(e) => {
            // Another driver would fail alike: end it, with the reason.
            let reason = format!("unreadable operation input: {e}");
            cp.store()
                .finish_operation(
                    &op.id,
                    &cp.inner.replica,
                    OperationState::Failed,
                    Some(&reason),
                )
                .await?;
            return Err(ControlError::invalid(reason));
        }
    };
    let mut steps = op.steps.clone();
    let pending: Vec<String> = op
        .targets
        .iter()
        .filter(|t| !is_done(&steps, &input.step_name(t)))
        .cloned()
        .collect();
    // Each step is a task of its own: a step paused halfway (holding a
    // store connection, say) while this loop records another would stall it.
    let mut pending = pending.into_iter();
    let mut running = tokio::task::JoinSet::new();
    let mut targets_of = std::collections::HashMap::new();
    loop {
        while running.len() < PARALLEL_STEPS {
            let Some(target) = pending.next() else { break };
            let (cp, input, t) = (cp.clone(), input.clone(), target.clone());
            let task = running.spawn(async move { run_step(&cp, &input, &t).await });
            targets_of.insert(task.id(), target);
        }
        let Some(first) = running.join_next_with_id().await else {
            break;
        };
        // Steps that ended meanwhile are recorded in the same write.
        let mut ended = vec![first];
        while let Some(more) = running.try_join_next_with_id() {
            ended.push(more);
        }
        let mut seen = Vec::new();
        for joined in ended {
            let (target, outcome) = match joined {
                Ok((id, outcome)) => (targets_of.remove(&id).unwrap_or_default(), outcome),
                // A step that panicked failed; recorded so, or it would
                // panic again under every later driver.
                Err(e) => (
                    targets_of.remove(&e.id()).unwrap_or_default(),
                    Ok((
                        None,
                        Some(ControlError::new(
                            flotilla_api::ErrorCode::Internal,
                            format!("the step panicked: {e}"),
                        )),
                    )),
                ),
            };
            let (update, failure) = match outcome {
                Ok(outcome) => outcome,
                // The store failed us, not the step: unrecorded, so the
                // next holder of the lease runs it again.
                Err(e) => {
                    running.abort_all();
                    return Err(e);
                }
            };
            let mut step = input.step_name(&target);
            if let Some(e) = failure {
                tracing::warn!(op = %op.id, target, error = %e, "step failed");
                step.push_str(FAILED_MARK);
                step.push_str(&e.message);
            }
            steps.push(step);
            seen.extend(update);
        }
        let still_ours = cp
            .store()
            .record_steps(&op.id, &steps, &cp.inner.replica, cp.lease_until(), &seen)
            .await?;
        if !still_ours {
            tracing::warn!(op = %op.id, "operation taken over by another replica");
            running.abort_all();
            return Ok(());
        }
    }
    let failures: Vec<String> = steps
        .iter()
        .filter_map(|s| s.split_once(FAILED_MARK))
        .map(|(name, why)| format!("{name}: {why}"))
        .collect();
    let (state, error) = match failures.is_empty() {
        true => (OperationState::Succeeded, None),
        false => (OperationState::Failed, Some(failures.join("; "))),
    };
    let finished = cp
        .store()
        .finish_operation(&op.id, &cp.inner.replica, state, error.as_deref())
        .await?;
    if !finished {
        tracing::warn!(op = %op.id, "operation taken over before it could be finished here");
        return Ok(());
    }
    tracing::info!(op = %op.id, kind = %op.kind, ?state, "operation finished");
    Ok(())
}

async fn agent_of(cp: &ControlPlane, inst: &InstanceRow) -> ControlResult<AgentAddr> {
    let host = inst
        .host
        .as_deref()
        .ok_or_else(|| ControlError::conflict(format!("instance {} has no host", inst.name)))?;
    let row =
        cp.store().host(host).await?.ok_or_else(|| {
            ControlError::conflict(format!("host {host} is no longer registered"))
        })?;
    Ok(AgentAddr::from(&row))
}

/// What to record of a VM just made for instance `id`; if the instance's
/// record went meanwhile, the VM goes too (nothing to record), so no VM is
/// left that nobody tracks.
async fn made(
    cp: &ControlPlane,
    agent: &AgentAddr,
    id: &str,
    observed: ObservedState,
    ip: Option<String>,
) -> ControlResult<Option<ObservedUpdate>> {
    if cp.store().instance(id).await?.is_none() {
        tracing::warn!(
            instance = id,
            "instance gone while its VM was made: removing the VM"
        );
        cp.inner
            .agents
            .delete_vm(agent, id)
            .await
            .map_err(agent_error)?;
        return Ok(None);
    }
    Ok(Some(ObservedUpdate {
        id: id.to_string(),
        observed,
        ip,
        error: None,
        seen_at: now_ms(),
    }))
}

/// How many times (half a second apart) a VM whose name its agent has
/// reserved is looked for before the step gives up.
const SHOWN_WITHIN_TRIES: usize = 60;

/// How many hosts a run tries for one instance whose agents refuse it.
const HOSTS_PER_INSTANCE: usize = 3;

/// Makes the instance's VM on its host. A host whose agent refuses it (no
/// such image there, no room by the agent's own count, ...) is left for
/// another its policy (with the run's own rules, `request`) allows, up to
/// [`HOSTS_PER_INSTANCE`] hosts; the instance's record moves with it, so
/// its room is never held on a host that does not run it. Refused by them
/// all, or with no other host to try, it is taken off the last one (no
/// room, no address held) and fails.
async fn create_instance_vm(
    cp: &ControlPlane,
    inst: &InstanceRow,
    request: Option<&flotilla_api::control::PlacementPolicy>,
) -> ControlResult<Option<ObservedUpdate>> {
    let mut inst = inst.clone();
    let mut refused: Vec<String> = Vec::new();
    let volumes = cp.store().volumes_of(&inst.id).await?;
    loop {
        let agent = agent_of(cp, &inst).await?;
        let e = match create_on(cp, &agent, &inst, &volumes).await {
            Ok(vm) => {
                let ip = vm.nics.first().map(|n| n.ip.clone());
                return made(cp, &agent, &inst.id, observed_from_vm(vm.state), ip).await;
            }
            Err(e) if e.is_refusal() => e,
            // The VM may exist (an agent that did not answer): the
            // instance stays where it is, for a retry or the heartbeats.
            Err(e) => return Err(agent_error(e)),
        };
        let from = inst.host.clone().unwrap_or_default();
        refused.push(from.clone());
        // From a snapshot or with volumes, only their host can make it; one
        // made before (made again after its VM went) stays on its host.
        if refused.len() >= HOSTS_PER_INSTANCE
            || inst.from_snapshot.is_some()
            || !volumes.is_empty()
            || inst.observed != ObservedState::Pending
        {
            return refused_everywhere(cp, &inst, &refused, e.to_string()).await;
        }
        tracing::warn!(instance = %inst.name, host = %from, error = %e, "its host refused it; placing it elsewhere");
        let to = match cp.place_elsewhere(&inst, &refused, request).await {
            Ok(to) => to,
            // The store's own failure is not a refusal: the step runs again.
            Err(pe) if pe.code == flotilla_api::ErrorCode::Internal => return Err(pe),
            Err(pe) => {
                let why = format!("{e}; no other host takes it: {}", pe.message);
                return refused_everywhere(cp, &inst, &refused, why).await;
            }
        };
        // An address of another subnet does not fit the new host: its
        // agent picks one, recorded when the VM is made.
        let subnet_of = |h: Option<crate::store::HostRow>| h.and_then(|h| h.vm_subnet);
        if subnet_of(cp.store().host(&from).await?) != subnet_of(cp.store().host(&to).await?) {
            inst.ip = None;
        }
        inst.host = Some(to);
    }
}

/// Fails a run refused by every host it tried (the last one is where the
/// instance is): the instance comes off that host, holding no room.
async fn refused_everywhere(
    cp: &ControlPlane,
    inst: &InstanceRow,
    refused: &[String],
    why: String,
) -> ControlResult<Option<ObservedUpdate>> {
    if let Some(host) = &inst.host {
        if cp.store().release_unmade(&inst.id, host).await? {
            tracing::warn!(instance = %inst.name, refused_by = ?refused, "no host made it; it holds no room");
            cp.fleet_changed().await;
        }
    }
    Err(ControlError::conflict(format!(
        "refused by {}: {why}",
        refused.join(", ")
    )))
}

/// Creates the instance's VM on `agent` with its volumes (ids) as data
/// disks (an earlier attempt's VM is taken as made).
async fn create_on(
    cp: &ControlPlane,
    agent: &AgentAddr,
    inst: &InstanceRow,
    volumes: &[String],
) -> Result<flotilla_api::VmInfo, AgentCallError> {
    let agents = &cp.inner.agents;
    let request = CreateVmRequest {
        name: inst.id.clone(),
        // A snapshot names its own image.
        image: inst.image.clone().filter(|_| inst.from_snapshot.is_none()),
        vcpus: Some(inst.vcpus),
        memory_mib: Some(inst.memory_mib),
        cmdline_extra: None,
        disks: volumes
            .iter()
            .enumerate()
            .map(|(i, id)| flotilla_api::DiskSpec {
                name: format!("vol{i}"),
                size_mib: 0,
                volume: Some(id.clone()),
            })
            .collect(),
        nics: None,
        ip: inst.ip.clone(),
        tags: vm_tags(inst),
        start: Some(true),
        wait_ready: Some(false),
        from_snapshot: inst.from_snapshot.clone(),
    };
    let mut created = agents.create_vm(agent, &request).await;
    if let Err(e) = &created {
        if request.ip.is_some() && e.is_conflict() && !e.is_already_exists() {
            // The address went to a VM made on the host directly since its
            // last heartbeat: the agent picks one it does not route
            // elsewhere, and it is recorded when the VM is made.
            tracing::warn!(instance = %inst.name, error = %e, "address taken; the agent picks one");
            let request = CreateVmRequest {
                ip: None,
                ..request
            };
            created = agents.create_vm(agent, &request).await;
        }
    }
    match created {
        // Made by an earlier attempt of this step, or still being made:
        // the agent reserves the name before it shows the VM, so it is
        // asked again for a while (never a refusal).
        Err(e) if e.is_already_exists() => {
            for _ in 0..SHOWN_WITHIN_TRIES {
                match agents.vm(agent, &inst.id).await {
                    Err(missing) if missing.is_not_found() => {
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    }
                    other => return other,
                }
            }
            Err(AgentCallError::Api {
                status: 503,
                code: None,
                message: format!("{e}; not shown by its agent yet"),
            })
        }
        other => other,
    }
}

fn agent_error(e: crate::agents::AgentCallError) -> ControlError {
    ControlError::new(flotilla_api::ErrorCode::Conflict, e.to_string())
}

/// One step: the agent call for `target`. Returns what it saw of the
/// instance (recorded with the step by the caller) and its failure, if any.
async fn run_step(
    cp: &ControlPlane,
    input: &OperationInput,
    target: &str,
) -> ControlResult<(Option<ObservedUpdate>, Option<ControlError>)> {
    let Some(inst) = cp.store().instance(target).await? else {
        // Terminated meanwhile: nothing left to do.
        return Ok((None, None));
    };
    match act(cp, input, &inst).await {
        Ok(seen) => Ok((seen, None)),
        // The store's own failures are not the step's (see `drive`).
        Err(e) if e.code == flotilla_api::ErrorCode::Internal => Err(e),
        Err(e) => {
            // The instance stays, with the reason; a terminate can be retried.
            let observed = match input {
                OperationInput::Run
                | OperationInput::RunWith { .. }
                | OperationInput::Clone { .. } => ObservedState::Failed,
                _ => inst.observed,
            };
            let seen = ObservedUpdate {
                id: inst.id.clone(),
                observed,
                ip: None,
                error: Some(e.message.clone()),
                seen_at: now_ms(),
            };
            Ok((Some(seen), Some(e)))
        }
    }
}

async fn act(
    cp: &ControlPlane,
    input: &OperationInput,
    inst: &InstanceRow,
) -> ControlResult<Option<ObservedUpdate>> {
    let store = cp.store();
    if matches!(input, OperationInput::Terminate) && inst.host.is_none() {
        // Made nowhere (every host refused its run): only the record goes.
        store.delete_instance(&inst.id).await?;
        cp.routes_changed().await;
        return Ok(None);
    }
    let agent = agent_of(cp, inst).await?;
    {
        let agents = &cp.inner.agents;
        match input {
            OperationInput::Run => create_instance_vm(cp, inst, None).await,
            OperationInput::RunWith { placement } => {
                create_instance_vm(cp, inst, Some(placement.as_ref())).await
            }
            OperationInput::Terminate => {
                agents
                    .delete_vm(&agent, &inst.id)
                    .await
                    .map_err(agent_error)?;
                store.delete_instance(&inst.id).await?;
                cp.routes_changed().await;
                Ok(None)
            }
            OperationInput::Start
            | OperationInput::Stop
            | OperationInput::Suspend
            | OperationInput::SuspendWarm
            | OperationInput::Resume => {
                let action = match input {
                    OperationInput::SuspendWarm => "suspend?warm=true",
                    _ => input.kind(),
                };
                let vm = match agents.vm_action(&agent, &inst.id, action).await {
                    Ok(vm) => vm,
                    // Already there (an earlier attempt, or the user's
                    // own); any other refusal (on the move, or a warm
                    // suspend the host cannot keep) is the step's failure.
                    Err(e) if e.is_conflict() => {
                        let vm = agents.vm(&agent, &inst.id).await.map_err(agent_error)?;
                        if !input.reached_by(vm.state) {
                            return Err(agent_error(e));
                        }
                        vm
                    }
                    Err(e) => return Err(agent_error(e)),
                };
                Ok(Some(ObservedUpdate {
                    id: inst.id.clone(),
                    observed: observed_from_vm(vm.state),
                    ip: None,
                    error: None,
                    // As of the agent's answer.
                    seen_at: now_ms(),
                }))
            }
            OperationInput::Migrate { to, options } => {
                migrate_step(cp, inst, to.as_deref(), options).await
            }
            OperationInput::Clone { source } => {
                let tags = vm_tags(inst);
                let request = flotilla_api::CloneVmRequest {
                    name: inst.id.clone(),
                    disk: flotilla_api::CloneDisk::Cow,
                    tags: Some(tags),
                };
                let vm = match agents.clone_vm(&agent, source, &request).await {
                    Ok(result) => result.vm,
                    Err(e) if e.is_conflict() => match agents.vm(&agent, &inst.id).await {
                        // Made by an earlier attempt of this step.
                        Ok(vm) => vm,
                        Err(_) => return Err(agent_error(e)),
                    },
                    Err(e) => return Err(agent_error(e)),
                };
                let ip = vm.nics.first().map(|n| n.ip.clone());
                made(cp, &agent, &inst.id, observed_from_vm(vm.state), ip).await
            }
        }
    }
}

/// Moves one instance: picks and claims a target (unless an earlier attempt
/// did), has the source's agent migrate the VM, and records where it ended.
/// Repeatable: an attempt cut short finds the move where the agents have
/// it (done, still going, or not begun).
async fn migrate_step(
    cp: &ControlPlane,
    inst: &InstanceRow,
    to: Option<&str>,
    options: &flotilla_api::migration::MigrationOptions,
) -> ControlResult<Option<ObservedUpdate>> {
    let agents = &cp.inner.agents;
    let store = cp.store();
    let from = inst
        .host
        .clone()
        .ok_or_else(|| ControlError::conflict(format!("instance {} has no host", inst.name)))?;
    let source = agent_of(cp, inst).await?;
    let target_host = match &inst.migrating_to {
        Some(t) => t.clone(),
        None => cp.claim_migration_target(inst, &from, to).await?,
    };
    let target = match store.host(&target_host).await? {
        Some(row) => AgentAddr::from(&row),
        None => {
            store.end_migration(&inst.id, false).await?;
            cp.routes_changed().await;
            return Err(ControlError::conflict(format!(
                "host {target_host} is no longer registered"
            )));
        }
    };
    let seen = |vm: &flotilla_api::VmInfo| ObservedUpdate {
        id: inst.id.clone(),
        observed: observed_from_vm(vm.state),
        ip: vm.nics.first().map(|n| n.ip.clone()),
        error: None,
        seen_at: now_ms(),
    };
    // Agents that cannot be asked for a moment are asked again; a move that
    // still goes on after this long is left to a later attempt.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(4 * 3600);
    let mut transient = 0;
    let mut retry = |e: crate::agents::AgentCallError| -> ControlResult<()> {
        transient += 1;
        match transient > 30 || std::time::Instant::now() > deadline {
            true => Err(agent_error(e)),
            false => Ok(()),
        }
    };
    loop {
        let on_source = match agents.vm(&source, &inst.id).await {
            Ok(vm) => Some(vm),
            Err(e) if e.is_not_found() => None,
            Err(e) => {
                retry(e)?;
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                continue;
            }
        };
        match on_source.as_ref().map(|v| v.state) {
            // Gone from the source: moved, if the target has it.
            None => match agents.vm(&target, &inst.id).await {
                Ok(vm) => {
                    store.end_migration(&inst.id, true).await?;
                    cp.routes_changed().await;
                    tracing::info!(instance = %inst.name, from = %from, to = %target_host, "migrated");
                    return Ok(Some(seen(&vm)));
                }
                Err(e) if e.is_not_found() => {
                    store.end_migration(&inst.id, false).await?;
                    cp.routes_changed().await;
                    return Err(ControlError::conflict(format!(
                        "instance {}'s VM is on neither {from} nor {target_host}",
                        inst.name
                    )));
                }
                Err(e) => {
                    retry(e)?;
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                }
            },
            // An earlier attempt's migration is still going.
            Some(flotilla_api::VmState::Migrating) => {
                if std::time::Instant::now() > deadline {
                    return Err(ControlError::conflict(format!(
                        "the migration of {} still runs after 4 hours",
                        inst.name
                    )));
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Some(_) => match agents.migrate_vm(&source, &inst.id, &target, options).await {
                Ok(m) if m.phase == flotilla_api::migration::MigrationPhase::Completed => {}
                // Removed on the target after it took over: gone from
                // both; the next round finds that out.
                Ok(m) if m.switch_over_ms.is_some() => {}
                Ok(m) => {
                    store.end_migration(&inst.id, false).await?;
                    cp.routes_changed().await;
                    return Err(ControlError::conflict(format!(
                        "migration of {} to {target_host} {:?}: {}",
                        inst.name,
                        m.phase,
                        m.error.unwrap_or_default()
                    )));
                }
                Err(e) if e.is_conflict() => {
                    // Not running (stopped, suspended): it stays.
                    store.end_migration(&inst.id, false).await?;
                    cp.routes_changed().await;
                    return Err(agent_error(e));
                }
                Err(e) => {
                    retry(e)?;
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_api::VmState;

    #[test]
    fn a_warm_suspend_is_stored_apart_and_named_as_a_suspend() {
        let stored = serde_json::to_value(OperationInput::SuspendWarm).expect("json");
        assert_eq!(stored, "suspend_warm");
        let back: OperationInput = serde_json::from_value(stored).expect("parse");
        assert_eq!(back, OperationInput::SuspendWarm);
        assert_eq!(OperationInput::SuspendWarm.kind(), "suspend");
        let old: OperationInput = serde_json::from_str("\"suspend\"").expect("parse");
        assert_eq!(old, OperationInput::Suspend);
    }

    #[test]
    fn a_refused_action_counts_as_done_only_where_it_leads() {
        assert!(OperationInput::SuspendWarm.reached_by(VmState::Suspended));
        assert!(!OperationInput::SuspendWarm.reached_by(VmState::Running));
        assert!(!OperationInput::Suspend.reached_by(VmState::Migrating));
        assert!(OperationInput::Resume.reached_by(VmState::Running));
        assert!(!OperationInput::Start.reached_by(VmState::Suspended));
        assert!(OperationInput::Stop.reached_by(VmState::Crashed));
        assert!(!OperationInput::Stop.reached_by(VmState::Incoming));
    }
}
