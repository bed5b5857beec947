//! Hosts: heartbeats (registration, reconciliation of what they report),
//! cordons, and marking down the ones that went quiet.

use flotilla_api::control::HeartbeatReply;

use super::*;

impl ControlPlane {
    /// A heartbeat: registers or refreshes the host and reconciles what it
    /// reports with what the store expects there.
    pub async fn heartbeat(
        &self,
        caller: &Caller,
        name: &str,
        beat: &HostHeartbeat,
    ) -> ControlResult<HeartbeatReply> {
        if !(caller.admin || caller.host.as_deref() == Some(name)) {
            return Err(ControlError::new(
                ErrorCode::PermissionDenied,
                format!("this token may not heartbeat as host {name:?}"),
            )
            .with_hint("agents use a host token: flotilla token create --host NAME"));
        }
        check_name("host", name)?;
        if !(beat.endpoint.starts_with("http://") || beat.endpoint.starts_with("https://")) {
            return Err(ControlError::invalid(format!(
                "invalid endpoint {:?}: expected http://HOST:PORT",
                beat.endpoint
            )));
        }
        flotilla_tls::check_pin(&beat.endpoint, beat.tls_fingerprint.as_deref())
            .map_err(|e| ControlError::invalid(format!("tls_fingerprint: {e}")))?;
        if let Some(subnet) = &beat.vm_subnet {
            subnet
                .parse::<flotilla_api::net::Subnet>()
                .map_err(|e| ControlError::invalid(format!("vm_subnet: {e}")))?;
        }
        if let Some(bad) = beat.traits.iter().find(|t| !placement::valid_trait(t)) {
            return Err(ControlError::invalid(format!(
                "traits: {bad:?} is not a trait name (1-63 of a-z, 0-9, '-', '.', ':')"
            )));
        }
        let known = self.store().host(name).await?;
        let was_down = self.store().record_heartbeat(name, beat).await?;
        if was_down {
            tracing::info!(host = name, "host is up again");
        }
        let changed = match &known {
            None => true,
            Some(h) => {
                was_down
                    || h.vcpus != beat.capacity.vcpus
                    || h.memory_mib != beat.capacity.memory_mib
                    || h.labels != beat.labels
                    || h.traits != beat.traits
                    || disk_moved(h, beat.disk)
            }
        };
        if changed {
            self.fleet_changed().await;
        }
        self.reconcile_host(name, beat).await?;
        Ok(HeartbeatReply {
            routes: self
                .routes_reply(name, beat.routes_version.as_deref())
                .await?,
        })
    }

    /// Observed state of the instances on `host` from its report. An
    /// instance the host does not report is `unknown` (unless it is still
    /// being created); nothing is dropped.
    pub(super) async fn reconcile_host(
        &self,
        host: &str,
        beat: &HostHeartbeat,
    ) -> ControlResult<()> {
        let reported: BTreeMap<&str, _> = beat.vms.iter().map(|v| (v.name.as_str(), v)).collect();
        // Moves whose workflow ended without recording where the VM went
        // (an attempt that gave up): this host runs it now.
        let moving_here = self.store().instances_moving_to(host).await?;
        let mut known: std::collections::HashSet<String> =
            moving_here.iter().map(|i| i.id.clone()).collect();
        for inst in moving_here {
            let arrived = reported
                .get(inst.id.as_str())
                .is_some_and(|vm| !matches!(vm.state, VmState::Incoming | VmState::Creating));
            if arrived && !self.operation_running(&inst).await? {
                tracing::info!(instance = %inst.name, host, "its VM runs here: the move is recorded");
                self.store().end_migration(&inst.id, true).await?;
                self.routes_changed().await;
            }
        }
        for inst in self.store().instances_on_host(host).await? {
            known.insert(inst.id.clone());
            if inst.desired == DesiredState::Terminated {
                self.finish_termination(&inst, reported.contains_key(inst.id.as_str()))
                    .await?;
                continue;
            }
            let observed = match reported.get(inst.id.as_str()) {
                // An operation just recorded what it saw; this report may
                // have been composed before that.
                Some(_) if now_ms() - inst.updated_at < JUST_SEEN_MS => continue,
                // A move that ended without a record (see above), with the
                // VM still here: it stays.
                Some(vm)
                    if inst.migrating_to.is_some()
                        && vm.state != VmState::Migrating
                        && !self.operation_running(&inst).await? =>
                {
                    tracing::info!(instance = %inst.name, host, "its VM stayed here: the move is over");
                    self.store().end_migration(&inst.id, false).await?;
                    self.routes_changed().await;
                    observed_from_vm(vm.state)
                }
                Some(vm) => observed_from_vm(vm.state),
                None if inst.observed == ObservedState::Pending => continue,
                // Moving: it leaves this host before the move is recorded.
                None if inst.migrating_to.is_some() => continue,
                // Just made: the heartbeat may have been composed before.
                None if now_ms() - inst.updated_at < RECENT_MS => continue,
                None => {
                    self.recreate_if_missing(&inst).await?;
                    ObservedState::Unknown
                }
            };
            let mut ip = reported
                .get(inst.id.as_str())
                .and_then(|vm| vm.ip.as_deref());
            if let Some(addr) = ip.filter(|a| Some(*a) != inst.ip.as_deref()) {
                // Another instance's address (two hosts gave it out on
                // their own): the first keeps it; not rewritten every beat.
                if self.store().address_held(addr, &inst.id).await? {
                    tracing::warn!(instance = %inst.name, host, ip = addr, "its VM reports an address another instance holds");
                    ip = None;
                }
            }
            if observed != inst.observed || (ip.is_some() && ip != inst.ip.as_deref()) {
                self.store()
                    .set_observed(&inst.id, observed, ip, inst.last_error.as_deref())
                    .await?;
            }
            self.restart_if_down(&inst, observed).await?;
        }
        self.report_orphans(host, beat, &known).await
    }

    /// Desired running, and its host (up: it heartbeats) no longer has its
    /// VM at all (removed on the agent directly, say) for a while: made
    /// again, from its image or snapshot, by a run operation. Not after a
    /// run that failed (its image or snapshot gone, say): that waits for
    /// the user, rather than failing again every few seconds.
    async fn recreate_if_missing(&self, inst: &InstanceRow) -> ControlResult<()> {
        if inst.desired != DesiredState::Running
            || inst.observed != ObservedState::Unknown
            || inst.migrating_to.is_some()
            || now_ms() - inst.updated_at < RESTART_AFTER_MS
            || self.operation_running(inst).await?
        {
            return Ok(());
        }
        if let Some(op_id) = &inst.operation {
            let last = self.store().operation(op_id).await?;
            // A clone is not made again from its image; an instance whose
            // own run step failed waits for the user.
            let own_failed = |op: &crate::store::OperationRow| {
                let failed = format!("{} {}: failed", op.kind, inst.id);
                op.steps.iter().any(|s| s.starts_with(&failed))
            };
            if last.is_some_and(|op| op.kind == "clone" || (op.kind == "run" && own_failed(&op))) {
                tracing::debug!(instance = %inst.name, "made by a clone, or its run failed: not made again");
                return Ok(());
            }
        }
        tracing::warn!(instance = %inst.name, host = ?inst.host, "its host has no VM for it: making it again");
        let made = self
            .begin_operation(
                Some(&inst.tenant_id),
                &new_id("op"),
                OperationInput::Run,
                vec![inst.id.clone()],
                DesiredState::Running,
            )
            .await;
        if let Err(e) = made {
            tracing::info!(instance = %inst.name, error = %e, "not made again");
        }
        Ok(())
    }

    /// VMs the control plane made (named by an instance id) whose instance
    /// is gone from the store: reported, not removed (a control plane on a
    /// restored or wrong database would otherwise destroy VMs it does not
    /// know). VMs made on the host directly are its own.
    async fn report_orphans(
        &self,
        host: &str,
        beat: &HostHeartbeat,
        known: &std::collections::HashSet<String>,
    ) -> ControlResult<()> {
        for vm in &beat.vms {
            if !is_instance_id(&vm.name)
                || known.contains(&vm.name)
                || matches!(vm.state, VmState::Incoming | VmState::Creating)
                || self.store().instance(&vm.name).await?.is_some()
            {
                continue;
            }
            // Every heartbeat: at debug, not to flood the log.
            tracing::debug!(host, vm = %vm.name, "a VM the control plane made for an instance it no longer has");
        }
        Ok(())
    }

    /// Desired running, found stopped or crashed on its host (its guest
    /// powered off, it crashed, someone stopped it on the agent): started
    /// again by an operation, once it has been so for [`RESTART_AFTER_MS`]
    /// (so a VM that keeps crashing is started at most that often).
    async fn restart_if_down(
        &self,
        inst: &InstanceRow,
        observed: ObservedState,
    ) -> ControlResult<()> {
        let down = matches!(observed, ObservedState::Stopped | ObservedState::Failed);
        if inst.desired != DesiredState::Running
            || !down
            || inst.observed != observed
            || inst.migrating_to.is_some()
            || now_ms() - inst.updated_at < RESTART_AFTER_MS
            || self.operation_running(inst).await?
        {
            return Ok(());
        }
        tracing::warn!(instance = %inst.name, ?observed, "desired running: starting it again");
        let started = self
            .begin_operation(
                Some(&inst.tenant_id),
                &new_id("op"),
                OperationInput::Start,
                vec![inst.id.clone()],
                DesiredState::Running,
            )
            .await;
        // Another change got there first (a stop, a terminate): it stands.
        if let Err(e) = started {
            tracing::info!(instance = %inst.name, error = %e, "not started again");
        }
        Ok(())
    }

    /// Whether the instance's last operation still runs (a workflow that
    /// will record its outcome itself).
    async fn operation_running(&self, inst: &InstanceRow) -> ControlResult<bool> {
        let Some(op_id) = &inst.operation else {
            return Ok(false);
        };
        Ok(self
            .store()
            .operation(op_id)
            .await?
            .is_some_and(|op| op.state == flotilla_api::control::OperationState::Running))
    }

    /// An instance meant to be gone whose terminate is not running (it
    /// failed, say while its host was down): gone from its host too, its
    /// record goes; still there, a new terminate starts.
    pub(super) async fn finish_termination(
        &self,
        inst: &InstanceRow,
        on_host: bool,
    ) -> ControlResult<()> {
        if self.operation_running(inst).await? {
            return Ok(());
        }
        if !on_host {
            tracing::info!(instance = %inst.name, "its VM is gone: terminate completed");
            self.store().delete_instance(&inst.id).await?;
            self.routes_changed().await;
            return Ok(());
        }
        tracing::info!(instance = %inst.name, "still on its host: terminating again");
        let op_id = new_id("op");
        self.begin_operation(
            Some(&inst.tenant_id),
            &op_id,
            OperationInput::Terminate,
            vec![inst.id.clone()],
            DesiredState::Terminated,
        )
        .await?;
        Ok(())
    }

    pub async fn list_hosts(&self, caller: &Caller) -> ControlResult<Vec<HostRow>> {
        require_admin(caller)?;
        Ok(self.store().list_hosts().await?)
    }

    pub async fn host(&self, caller: &Caller, name: &str) -> ControlResult<HostRow> {
        require_admin(caller)?;
        self.store()
            .host(name)
            .await?
            .ok_or_else(|| ControlError::not_found(format!("no host {name:?}")))
    }

    pub async fn set_cordoned(
        &self,
        caller: &Caller,
        name: &str,
        cordoned: bool,
    ) -> ControlResult<HostRow> {
        require_admin(caller)?;
        if !self.store().set_cordoned(name, cordoned).await? {
            return Err(ControlError::not_found(format!("no host {name:?}")));
        }
        self.fleet_changed().await;
        self.host(caller, name).await
    }

    /// Cordons the host and live-migrates every instance off it, a few at
    /// a time, each where its placement policy puts it; the operation's
    /// steps report each outcome. Instances that are not running stay.
    pub async fn drain_host(&self, caller: &Caller, name: &str) -> ControlResult<OperationRow> {
        require_admin(caller)?;
        let host = self.set_cordoned(caller, name, true).await?;
        if host.down {
            return Err(ControlError::conflict(format!(
                "host {name} is down: its instances cannot be live-migrated"
            )));
        }
        let targets: Vec<String> = self
            .store()
            .instances_on_host(name)
            .await?
            .into_iter()
            .filter(|i| i.desired != DesiredState::Terminated)
            .map(|i| i.id)
            .collect();
        self.begin_operation(
            None,
            &new_id("op"),
            OperationInput::Migrate {
                to: None,
                options: Default::default(),
            },
            targets,
            None,
        )
        .await
    }

    /// Marks down the hosts that missed their heartbeats.
    pub async fn check_hosts(&self) -> ControlResult<()> {
        let before = now_ms() - self.inner.settings.host_down_after.as_millis() as i64;
        let down = self.store().mark_stale_hosts_down(before).await?;
        if !down.is_empty() {
            self.fleet_changed().await;
        }
        for host in down {
            tracing::warn!(
                host,
                "host missed its heartbeats: marked down, its instances unknown"
            );
        }
        Ok(())
    }
}

/// Whether a host's disk changed enough for placements to see it now
/// rather than at the next reread: its capacity, or its free space by a
/// tenth of it (at least 1 GiB).
fn disk_moved(known: &crate::store::HostRow, now: Option<flotilla_api::DiskSpace>) -> bool {
    let Some(now) = now else {
        return known.disk_mib != 0;
    };
    let free_before = known.disk_free_mib.unwrap_or(0);
    known.disk_mib != now.capacity_mib
        || free_before.abs_diff(now.free_mib) >= (now.capacity_mib / 10).max(1024)
}

/// Whether `name` is an instance id (`i-` and 16 hex digits): the names the
/// control plane gives the VMs it makes.
fn is_instance_id(name: &str) -> bool {
    name.strip_prefix("i-")
        .is_some_and(|hex| hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn instance_ids_are_told_from_other_names() {
        assert!(super::is_instance_id("i-0123456789abcdef"));
        assert!(!super::is_instance_id("i-0123"));
        assert!(!super::is_instance_id("web-1"));
        assert!(!super::is_instance_id("i-0123456789abcdeg"));
    }
}
