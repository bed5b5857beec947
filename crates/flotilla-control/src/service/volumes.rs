//! Volumes as tenant resources: a data disk kept by one host's agent (under
//! the volume's id, so names of different tenants never meet on a host),
//! placed by the tenant's policy, attached to at most one instance at a
//! time (`RunInstancesRequest::volumes`), which then runs on its host, and
//! outliving it.

use flotilla_api::control::{CreateVolumeRequest, VolumeState};

use super::*;
use crate::store::VolumeRow;

/// Largest volume accepted (1 TiB, as the agents' disks).
pub const MAX_VOLUME_MIB: u64 = 1024 * 1024;

impl ControlPlane {
    /// Makes a volume on a host its policy allows. The record comes first,
    /// not ready (it claims the name and names what the agent makes); it is
    /// ready once the agent has made it, and goes if the agent says no. An
    /// agent that does not answer leaves it creating, settled with its host
    /// later.
    pub async fn create_volume(
        &self,
        caller: &Caller,
        tenant: Option<&str>,
        req: &CreateVolumeRequest,
    ) -> ControlResult<VolumeRow> {
        check_name("volume", &req.name)?;
        if req.size_mib == 0 || req.size_mib > MAX_VOLUME_MIB {
            return Err(ControlError::invalid(format!(
                "size_mib: {} is out of range: use 1 to {MAX_VOLUME_MIB}",
                req.size_mib
            )));
        }
        let tenant_id = self.tenant_of(caller, tenant)?;
        if self
            .store()
            .volume_by_name(&tenant_id, &req.name)
            .await?
            .is_some()
        {
            return Err(ControlError::new(
                ErrorCode::AlreadyExists,
                format!("volume {:?} already exists", req.name),
            ));
        }
        let policy = self
            .effective_policy(&tenant_id, &BTreeMap::new(), req.placement.as_ref())
            .await?;
        let mut row = VolumeRow {
            id: new_id("v"),
            tenant_id,
            name: req.name.clone(),
            host: String::new(),
            size_mib: req.size_mib,
            state: VolumeState::Creating,
            attached_to: None,
            attached_name: None,
            created_at: now_ms(),
        };
        // Placed as an instance needing only disk, and claimed as one: a
        // placement that decided on the host's old usage decides again.
        let mut claimed = false;
        for _ in 0..PLACEMENT_ATTEMPTS {
            let (views, versions) = self.host_views(&row.tenant_id, None).await?;
            let demand = Demand {
                affinity_hosts: self.affinity_hosts(&row.tenant_id, &policy).await?,
                ..Demand::new(0, 0).with_disk(req.size_mib)
            };
            let Some(chosen) = placement::choose(&views, &demand, &policy) else {
                let explanation = placement::explain(&views, &demand, &policy);
                return Err(no_host_error(&req.name, &explanation));
            };
            row.host = chosen.name.clone();
            let version = versions.get(&row.host).copied().unwrap_or(0);
            match self.store().claim_volume(&row, version).await {
                Ok(()) => {
                    claimed = true;
                    break;
                }
                Err(e) if e.is_contention() => continue,
                Err(e) => return Err(e.into()),
            }
        }
        if !claimed {
            return Err(ControlError::conflict(format!(
                "could not claim a host for volume {:?}: every attempt raced with other placements",
                req.name
            )));
        }
        self.fleet_changed().await;
        let host = self
            .store()
            .host(&row.host)
            .await?
            .ok_or_else(|| ControlError::conflict("the chosen host went; send it again"))?;
        let request = flotilla_api::CreateVolumeRequest {
            name: row.id.clone(),
            size_mib: row.size_mib,
        };
        let agent = crate::agents::AgentAddr::from(&host);
        match self.agents().create_volume(&agent, &request).await {
            Ok(_) => {}
            Err(e) if e.is_refusal() => {
                self.store().delete_volume(&row.id).await?;
                self.fleet_changed().await;
                return Err(ControlError::conflict(format!(
                    "volume {:?} on {}: {e}",
                    row.name, row.host
                )));
            }
            Err(e) => {
                return Err(ControlError::new(
                    ErrorCode::Unavailable,
                    format!("volume {:?} on {}: {e}", row.name, row.host),
                )
                .with_hint(format!(
                    "volume {:?} stays creating until its host answers",
                    row.name
                )))
            }
        }
        if !self.store().volume_ready(&row.id).await? {
            // Removed while the agent made it: it goes from the host too.
            let _ = self.agents().delete_volume(&agent, &row.id).await;
            return Err(ControlError::conflict(format!(
                "volume {:?} was removed while it was being made",
                row.name
            )));
        }
        tracing::info!(volume = %row.name, host = %row.host, size_mib = row.size_mib, "volume made");
        Ok(VolumeRow {
            state: VolumeState::Ready,
            ..row
        })
    }

    /// The caller's volume `name` (404 for another tenant's).
    pub async fn volume(
        &self,
        caller: &Caller,
        tenant: Option<&str>,
        name: &str,
    ) -> ControlResult<VolumeRow> {
        let tenant_id = self.tenant_of(caller, tenant)?;
        match self.store().volume_by_name(&tenant_id, name).await? {
            Some(v) if caller.may_access(&v.tenant_id) => Ok(v),
            _ => Err(ControlError::not_found(format!("no volume {name:?}"))),
        }
    }

    /// The caller's volumes; an admin's of every tenant, or of `tenant`.
    pub async fn list_volumes(
        &self,
        caller: &Caller,
        tenant: Option<&str>,
        after: Option<(&str, &str)>,
        limit: u32,
    ) -> ControlResult<Vec<VolumeRow>> {
        let tenant_id = list_scope(caller, tenant)?;
        Ok(self
            .store()
            .list_volumes(tenant_id.as_deref(), after, limit)
            .await?)
    }

    /// Removes the volume from its host, then its record. Refused (409)
    /// while an instance has it attached.
    pub async fn delete_volume(
        &self,
        caller: &Caller,
        tenant: Option<&str>,
        name: &str,
    ) -> ControlResult<()> {
        let vol = self.volume(caller, tenant, name).await?;
        // Marked first: from then on no run attaches it, so it is never
        // removed from its host under an instance made meanwhile.
        self.store()
            .begin_volume_removal(&vol)
            .await
            .map_err(|e| match (e, &vol.attached_name) {
                (StoreError::Refused(why), Some(instance)) => ControlError::conflict(why)
                    .with_hint(format!(
                        "terminate the instance first (`flotilla instance terminate {instance}`): the volume is kept"
                    )),
                (e, _) => e.into(),
            })?;
        if let Some(host) = self.store().host(&vol.host).await? {
            let agent = crate::agents::AgentAddr::from(&host);
            match self.agents().delete_volume(&agent, &vol.id).await {
                Ok(()) => {}
                Err(e) if e.is_refusal() => {
                    // Its host keeps it (a VM there has it): as it was.
                    let back = match vol.state {
                        VolumeState::Deleting => VolumeState::Ready,
                        other => other,
                    };
                    self.store().end_volume_removal(&vol.id, back).await?;
                    return Err(ControlError::conflict(format!("volume {name:?}: {e}")));
                }
                Err(e) => {
                    return Err(ControlError::new(
                        ErrorCode::Unavailable,
                        format!("volume {name:?} on {}: {e}", vol.host),
                    )
                    .with_hint("it stays deleting, removed once its host answers"))
                }
            }
        }
        self.store().delete_volume(&vol.id).await?;
        self.fleet_changed().await;
        tracing::info!(volume = name, "volume removed");
        Ok(())
    }

    /// The volumes a run asks for, by name: ready, attached to nothing, all
    /// on one host. Returns their ids and that host.
    pub(super) async fn run_volumes(
        &self,
        tenant_id: &str,
        req: &RunInstancesRequest,
    ) -> ControlResult<Option<(Vec<String>, String)>> {
        if req.volumes.is_empty() {
            return Ok(None);
        }
        if req.count != 1 {
            return Err(ControlError::invalid(format!(
                "volumes: a volume is attached to one instance; run them one at a time (count is {})",
                req.count
            )));
        }
        let mut ids = Vec::with_capacity(req.volumes.len());
        let mut host: Option<String> = None;
        for (i, name) in req.volumes.iter().enumerate() {
            if req.volumes[..i].contains(name) {
                return Err(ControlError::invalid(format!(
                    "volumes[{i}]: {name:?} is asked for twice"
                )));
            }
            let vol = self
                .store()
                .volume_by_name(tenant_id, name)
                .await?
                .ok_or_else(|| ControlError::not_found(format!("no volume {name:?}")))?;
            match vol.state {
                VolumeState::Ready => {}
                VolumeState::Creating => {
                    return Err(ControlError::conflict(format!(
                        "volume {name:?} is still being made (or its host never answered)"
                    )))
                }
                VolumeState::Deleting => {
                    return Err(ControlError::conflict(format!(
                        "volume {name:?} is being removed"
                    )))
                }
            }
            if let Some(other) = &vol.attached_name {
                return Err(ControlError::conflict(format!(
                    "volume {name:?} is attached to instance {other:?}"
                )));
            }
            match &host {
                Some(h) if *h != vol.host => {
                    return Err(ControlError::invalid(format!(
                        "volumes: {name:?} is on {} and {:?} on {h}: an instance runs on one host",
                        vol.host, req.volumes[0]
                    )))
                }
                _ => host = Some(vol.host.clone()),
            }
            ids.push(vol.id);
        }
        Ok(host.map(|h| (ids, h)))
    }

    /// Settles the volumes left creating or deleting longer than
    /// `snapshot_settle_after` (their host did not answer): one being made
    /// is ready if the host has it, gone if it says it has none; one being
    /// removed is removed again.
    pub async fn settle_volumes(&self) -> ControlResult<()> {
        let before = now_ms() - self.inner.settings.snapshot_settle_after.as_millis() as i64;
        for vol in self.store().unsettled_volumes(before).await? {
            let Some(host) = self.store().host(&vol.host).await? else {
                continue;
            };
            if host.down {
                continue;
            }
            let agent = crate::agents::AgentAddr::from(&host);
            if vol.state == VolumeState::Deleting {
                match self.agents().delete_volume(&agent, &vol.id).await {
                    Ok(()) => {
                        self.store().delete_volume(&vol.id).await?;
                        self.fleet_changed().await;
                        tracing::info!(volume = %vol.name, host = %vol.host, "volume removed from its host");
                    }
                    Err(e) => {
                        tracing::debug!(volume = %vol.name, error = %e, "volume not removed yet")
                    }
                }
                continue;
            }
            match self.agents().volume(&agent, &vol.id).await {
                Ok(_) => {
                    if self.store().volume_ready(&vol.id).await? {
                        tracing::info!(volume = %vol.name, host = %vol.host, "volume found on its host: ready");
                    }
                }
                Err(e) if e.is_not_found() && e.code() == Some(ErrorCode::NotFound) => {
                    self.store().delete_volume(&vol.id).await?;
                    self.fleet_changed().await;
                    tracing::warn!(volume = %vol.name, host = %vol.host, "volume never made on its host: removed");
                }
                Err(e) => {
                    tracing::debug!(volume = %vol.name, error = %e, "volume not settled yet");
                }
            }
        }
        Ok(())
    }
}
