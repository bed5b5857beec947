//! Instances: lookups under tenancy, and the lifecycle calls, fleet actions,
//! clones and exec that act on them through operations.

use super::*;

impl ControlPlane {
    /// The tenant a call acts for: a tenant token's own; for an admin, the
    /// one named. Other tokens (a host's) act for no tenant.
    pub(crate) fn tenant_of(&self, caller: &Caller, tenant: Option<&str>) -> ControlResult<String> {
        match (&caller.tenant_id, tenant) {
            (Some(own), _) => Ok(own.clone()),
            (None, Some(t)) if caller.admin => Ok(t.to_string()),
            (None, None) if caller.admin => Err(ControlError::invalid(
                "an admin token acts on instances only with ?tenant=ID",
            )),
            (None, _) => Err(no_tenant()),
        }
    }

    pub async fn instance(
        &self,
        caller: &Caller,
        tenant: Option<&str>,
        name: &str,
    ) -> ControlResult<InstanceRow> {
        let tenant_id = self.tenant_of(caller, tenant)?;
        match self.store().instance_by_name(&tenant_id, name).await? {
            Some(i) if caller.may_access(&i.tenant_id) => Ok(i),
            _ => Err(ControlError::not_found(format!("no instance {name:?}"))),
        }
    }

    pub async fn list_instances(
        &self,
        caller: &Caller,
        mut filter: InstanceFilter,
    ) -> ControlResult<Vec<InstanceRow>> {
        if !caller.admin {
            filter.tenant_id = Some(caller.tenant_id.clone().ok_or_else(no_tenant)?);
        }
        Ok(self.store().list_instances(&filter).await?)
    }

    /// Sets and removes tags (a merge patch). Tags are read when an
    /// instance is placed: a change never moves an instance, and the groups
    /// it enters or leaves get new versions so no placement decides on the
    /// counts from before.
    pub async fn update_instance(
        &self,
        caller: &Caller,
        tenant: Option<&str>,
        name: &str,
        req: &flotilla_api::control::UpdateInstanceRequest,
    ) -> ControlResult<InstanceRow> {
        if req.tags.contains_key(flotilla_api::control::PARTITION_TAG) {
            // Where it runs follows from its partition: set at placement.
            return Err(ControlError::invalid(format!(
                "tag {}: an instance's partition is set when it is placed, not changed after",
                flotilla_api::control::PARTITION_TAG
            )));
        }
        for _attempt in 0..5 {
            let inst = self.instance(caller, tenant, name).await?;
            if inst.desired == DesiredState::Terminated {
                return Err(ControlError::conflict(format!(
                    "instance {name:?} is being terminated"
                )));
            }
            let mut tags = inst.tags.clone();
            for (key, value) in &req.tags {
                match value {
                    Some(v) => tags.insert(key.clone(), v.clone()),
                    None => tags.remove(key),
                };
            }
            check_tags(&tags)?;
            if tags == inst.tags {
                return Ok(inst);
            }
            match self.store().update_tags(&inst, &tags).await {
                Ok(()) => return self.instance(caller, tenant, name).await,
                Err(e) if e.is_contention() => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ControlError::conflict(format!(
            "instance {name:?} kept changing; try again"
        )))
    }

    /// Terminate, start or stop an instance through an operation.
    pub async fn act_on_instance(
        &self,
        caller: &Caller,
        tenant: Option<&str>,
        name: &str,
        input: OperationInput,
    ) -> ControlResult<OperationRow> {
        let inst = self.instance(caller, tenant, name).await?;
        let op_id = new_id("op");
        let desired = match input {
            OperationInput::Terminate => DesiredState::Terminated,
            OperationInput::Start => DesiredState::Running,
            OperationInput::Stop => DesiredState::Stopped,
            OperationInput::Suspend | OperationInput::SuspendWarm => DesiredState::Suspended,
            OperationInput::Resume => DesiredState::Running,
            OperationInput::Run
            | OperationInput::RunWith { .. }
            | OperationInput::Clone { .. }
            | OperationInput::Migrate { .. } => {
                return Err(ControlError::invalid(
                    "runs, clones and migrations have their own calls (POST /v1/instances, .../clone, .../migrate)",
                ))
            }
        };
        if inst.desired == DesiredState::Terminated && desired != DesiredState::Terminated {
            return Err(ControlError::conflict(format!(
                "instance {name:?} is being terminated"
            )));
        }
        self.check_not_being_made(&inst).await?;
        let tenant_id = inst.tenant_id.clone();
        self.begin_operation(Some(&tenant_id), &op_id, input, vec![inst.id], desired)
            .await
    }

    /// Live-migrates a running instance to host `to`, or to where its
    /// placement policy puts it.
    pub async fn migrate_instance(
        &self,
        caller: &Caller,
        tenant: Option<&str>,
        name: &str,
        to: Option<String>,
        options: flotilla_api::migration::MigrationOptions,
    ) -> ControlResult<OperationRow> {
        let inst = self.instance(caller, tenant, name).await?;
        if inst.desired == DesiredState::Terminated {
            return Err(ControlError::conflict(format!(
                "instance {name:?} is being terminated"
            )));
        }
        if inst.observed != ObservedState::Running {
            return Err(ControlError::conflict(format!(
                "instance {name:?} is {:?}: only a running instance can be live-migrated",
                inst.observed
            )));
        }
        if let Some(to) = &to {
            if inst.host.as_deref() == Some(to.as_str()) {
                return Err(ControlError::invalid(format!(
                    "instance {name:?} is already on host {to}"
                )));
            }
        }
        self.check_not_being_made(&inst).await?;
        let tenant_id = inst.tenant_id.clone();
        self.begin_operation(
            Some(&tenant_id),
            &new_id("op"),
            OperationInput::Migrate { to, options },
            vec![inst.id],
            None,
        )
        .await
    }

    /// Acting on an instance its run or clone is still making would race
    /// with it (a VM made after its record is gone would be nobody's).
    pub(super) async fn check_not_being_made(&self, inst: &InstanceRow) -> ControlResult<()> {
        let Some(op_id) = &inst.operation else {
            return Ok(());
        };
        if let Some(op) = self.store().operation(op_id).await? {
            if op.state == flotilla_api::control::OperationState::Running
                && (op.kind == "run" || op.kind == "clone")
            {
                return Err(ControlError::conflict(format!(
                    "instance {:?} is still being made by operation {}",
                    inst.name, op.id
                ))
                .with_hint("wait for it to end (flotilla op inspect ID), then try again"));
            }
        }
        Ok(())
    }

    /// Records the operation and its targets' desired state together, then
    /// drives it.
    pub(super) async fn begin_operation(
        &self,
        tenant_id: Option<&str>,
        id: &str,
        input: OperationInput,
        targets: Vec<String>,
        desired: impl Into<Option<DesiredState>>,
    ) -> ControlResult<OperationRow> {
        let op = self.new_operation(tenant_id, id, input, targets);
        let desired = desired.into();
        self.store()
            .begin_operation(&op, desired, &self.inner.replica, self.lease_until())
            .await?;
        workflows::spawn(self.clone(), op.clone());
        Ok(op)
    }

    /// Where a command for instance `name` goes: its host's agent, and
    /// its VM's name there.
    pub async fn exec_target(
        &self,
        caller: &Caller,
        tenant: Option<&str>,
        name: &str,
    ) -> ControlResult<(crate::agents::AgentAddr, String)> {
        let inst = self.instance(caller, tenant, name).await?;
        Ok((self.agent_of_instance(&inst).await?, inst.id))
    }

    /// The agent of the host `inst` is on (409 if it has none, or it is
    /// down).
    pub(crate) async fn agent_of_instance(
        &self,
        inst: &InstanceRow,
    ) -> ControlResult<crate::agents::AgentAddr> {
        let name = &inst.name;
        let host = inst.host.as_deref().ok_or_else(|| {
            ControlError::conflict(format!("instance {name:?} is not placed yet"))
        })?;
        let row = self
            .store()
            .host(host)
            .await?
            .ok_or_else(|| ControlError::conflict(format!("host {host} is not registered")))?;
        if row.down {
            return Err(ControlError::conflict(format!(
                "instance {name:?} is on host {host}, which is down"
            )));
        }
        Ok(crate::agents::AgentAddr::from(&row))
    }

    pub fn agents(&self) -> &AgentClient {
        &self.inner.agents
    }

    /// Suspend or resume every instance `selector` picks, as one operation
    /// (a few at a time; a result per instance in its steps).
    pub async fn fleet_action(
        &self,
        caller: &Caller,
        tenant: Option<&str>,
        selector: &FleetSelector,
        input: OperationInput,
    ) -> ControlResult<OperationRow> {
        let tenant_id = self.tenant_of(caller, tenant)?;
        let desired = match input {
            OperationInput::Suspend | OperationInput::SuspendWarm => DesiredState::Suspended,
            OperationInput::Resume => DesiredState::Running,
            _ => return Err(ControlError::invalid("a fleet is suspended or resumed")),
        };
        if selector.tags.is_empty() && selector.names.is_empty() {
            return Err(ControlError::invalid(
                "select the fleet by \"tags\" and/or \"names\" (an empty selector would take everything)",
            ));
        }
        let mut targets = Vec::new();
        if !selector.tags.is_empty() {
            let filter = InstanceFilter {
                tenant_id: Some(tenant_id.clone()),
                tags: selector.tags.clone(),
                limit: u32::MAX,
                ..Default::default()
            };
            targets.extend(self.store().list_instances(&filter).await?);
        }
        for name in &selector.names {
            match self.store().instance_by_name(&tenant_id, name).await? {
                Some(i) => targets.push(i),
                None => return Err(ControlError::not_found(format!("no instance {name:?}"))),
            }
        }
        targets.retain(|i| i.desired != DesiredState::Terminated);
        targets.sort_by(|a, b| a.id.cmp(&b.id));
        targets.dedup_by(|a, b| a.id == b.id);
        if targets.is_empty() {
            return Err(ControlError::not_found("no instance matches the selector"));
        }
        for t in &targets {
            self.check_not_being_made(t).await?;
        }
        let op_id = new_id("op");
        let ids = targets.into_iter().map(|t| t.id).collect();
        self.begin_operation(Some(&tenant_id), &op_id, input, ids, desired)
            .await
    }

    /// A clone of instance `name`, placed on the source's host (its
    /// snapshot is local there) if the policies allow it.
    pub async fn clone_instance(
        &self,
        caller: &Caller,
        tenant: Option<&str>,
        name: &str,
        req: &CloneInstanceRequest,
    ) -> ControlResult<(OperationRow, InstanceRow)> {
        let source = self.instance(caller, tenant, name).await?;
        if source.desired == DesiredState::Terminated {
            return Err(ControlError::conflict(format!(
                "instance {name:?} is being terminated"
            )));
        }
        let Some(host) = source.host.clone() else {
            return Err(ControlError::conflict(format!(
                "instance {name:?} has no host"
            )));
        };
        check_name("instance", &req.name)?;
        self.check_copyable(&source, "a clone").await?;
        if self
            .store()
            .name_taken(&source.tenant_id, &req.name)
            .await?
        {
            return Err(ControlError::new(
                ErrorCode::AlreadyExists,
                format!("instance {:?} already exists", req.name),
            ));
        }
        let tags = req.tags.clone().unwrap_or_else(|| source.tags.clone());
        check_tags(&tags)?;
        let policy = self
            .effective_policy(&source.tenant_id, &tags, None)
            .await?;
        Self::check_group(&policy, &tags)?;
        let mut demand = Demand::new(source.vcpus, source.memory_mib).with_disk(source.disk_mib);
        let op_id = new_id("op");
        let mut new = NewInstance {
            id: new_id("i"),
            tenant_id: source.tenant_id.clone(),
            name: req.name.clone(),
            image: source.image.clone(),
            vcpus: source.vcpus,
            memory_mib: source.memory_mib,
            disk_mib: source.disk_mib,
            from_snapshot: None,
            tags,
            operation: Some(op_id.clone()),
            // The source's agent gives the clone an address it does not
            // route elsewhere; the heartbeats report it.
            ip: None,
        };
        // In a partition group the clone gets a partition too; one whose
        // racks are not the source host's is refused below.
        self.assign_partitions(&source.tenant_id, &policy, std::slice::from_mut(&mut new))
            .await?;
        let op = self.new_operation(
            Some(&source.tenant_id),
            &op_id,
            OperationInput::Clone {
                source: source.id.clone(),
            },
            vec![new.id.clone()],
        );
        let mut done = false;
        for _ in 0..PLACEMENT_ATTEMPTS {
            let guard = self
                .group_guard(&source.tenant_id, Self::group_of(&policy, &new.tags))
                .await?;
            let (views, versions) = self
                .host_views(&source.tenant_id, Self::group_of(&policy, &new.tags))
                .await?;
            let view = views.iter().find(|v| v.name == host).ok_or_else(|| {
                ControlError::conflict(format!("host {host} is no longer registered"))
            })?;
            demand.full_domains =
                placement::full_domains(&policy, views.iter().map(|v| (&v.labels, v.group_count)));
            demand.affinity_hosts = self.affinity_hosts(&source.tenant_id, &policy).await?;
            let members = self
                .partition_members(
                    &source.tenant_id,
                    &policy,
                    Self::group_of(&policy, &new.tags),
                )
                .await?;
            demand.partition = Self::partition_demand(&policy, &new.tags, &members, |h| {
                views.iter().find(|v| v.name == h).map(|v| &v.labels)
            });
            if let Some(reason) = placement::reject_reason(view, &demand, &policy) {
                return Err(ControlError::new(
                    ErrorCode::InsufficientCapacity,
                    format!("a clone of {name:?} goes on its host {host}, which cannot take it: {reason}"),
                ));
            }
            let host_versions =
                BTreeMap::from([(host.clone(), versions.get(&host).copied().unwrap_or(0))]);
            let placed = [(new.clone(), host.clone())];
            let committed = self
                .store()
                .commit_run(
                    &placed,
                    &host_versions,
                    guard.as_ref(),
                    &[],
                    &op,
                    &self.inner.replica,
                    self.lease_until(),
                )
                .await;
            match committed {
                Ok(()) => {
                    done = true;
                    break;
                }
                Err(e) if e.is_contention() => continue,
                Err(e) => return Err(e.into()),
            }
        }
        if !done {
            return Err(
                ControlError::conflict("the clone raced with other placements")
                    .with_hint("send the request again"),
            );
        }
        // Placed by version, not through the cached view: reread it there.
        self.fleet_changed().await;
        workflows::spawn(self.clone(), op.clone());
        let row =
            self.store().instance(&new.id).await?.ok_or_else(|| {
                ControlError::new(ErrorCode::Internal, "the clone's record vanished")
            })?;
        Ok((op, row))
    }
}
