//! Snapshots as tenant resources: taken of a tenant's instance by its host's
//! agent (under the snapshot's id, so names of different tenants never
//! meet on a host), listed and removed per tenant; instances start from one
//! on its host (`RunInstancesRequest::from_snapshot`).

use flotilla_api::control::CreateSnapshotRequest;

use super::*;
use crate::store::SnapshotRow;

impl ControlPlane {
    /// Takes a snapshot of the caller's instance on its host. The record
    /// comes first, as `creating` (it claims the name and names what the
    /// agent makes, so nothing is ever made that no record tracks); it is
    /// `ready` once the agent has the snapshot, and goes if the agent says
    /// no. An agent that does not answer leaves it `creating`: never used,
    /// removed once its agent answers again.
    pub async fn create_snapshot(
        &self,
        caller: &Caller,
        tenant: Option<&str>,
        instance: &str,
        req: &CreateSnapshotRequest,
    ) -> ControlResult<SnapshotRow> {
        check_name("snapshot", &req.name)?;
        let inst = self.instance(caller, tenant, instance).await?;
        self.check_copyable(&inst, "a snapshot").await?;
        let agent = self.agent_of_instance(&inst).await?;
        let mut row = SnapshotRow {
            id: crate::store::new_id("s"),
            tenant_id: inst.tenant_id.clone(),
            name: req.name.clone(),
            host: inst.host.clone().unwrap_or_default(),
            instance_name: inst.name.clone(),
            layer: String::new(),
            image: inst.image.clone(),
            vcpus: inst.vcpus,
            memory_mib: inst.memory_mib,
            disk_mib: inst.disk_mib,
            created_at: crate::store::now_ms(),
        };
        self.store()
            .insert_snapshot(&row)
            .await
            .map_err(|e| match e {
                StoreError::Duplicate(what) => {
                    ControlError::new(ErrorCode::AlreadyExists, format!("{what} already exists"))
                }
                other => other.into(),
            })?;
        let request = flotilla_api::CreateSnapshotRequest {
            vm: inst.id.clone(),
            name: row.id.clone(),
        };
        let created = match self.agents().create_snapshot(&agent, &request).await {
            Ok(created) => created,
            Err(e) if e.is_refusal() => {
                self.store().delete_snapshot(&row.id).await?;
                return Err(ControlError::conflict(format!(
                    "snapshot of instance {instance:?}: {e}"
                )));
            }
            Err(e) => {
                return Err(ControlError::new(
                    ErrorCode::Unavailable,
                    format!("snapshot of instance {instance:?}: {e}"),
                )
                .with_hint(format!(
                    "snapshot {:?} stays creating; remove it (instance snapshot rm) once its host answers",
                    row.name
                )))
            }
        };
        row.layer = created.snapshot.id;
        if !self.store().snapshot_ready(&row.id, &row.layer).await? {
            // Removed while the agent made it: it goes from the host too.
            let _ = self.agents().delete_snapshot(&agent, &row.id).await;
            return Err(ControlError::conflict(format!(
                "snapshot {:?} was removed while it was being taken",
                row.name
            )));
        }
        tracing::info!(snapshot = %row.name, instance, host = %row.host, "snapshot taken");
        Ok(row)
    }

    /// The caller's snapshot `name` (404 for another tenant's).
    pub async fn snapshot(
        &self,
        caller: &Caller,
        tenant: Option<&str>,
        name: &str,
    ) -> ControlResult<SnapshotRow> {
        let tenant_id = self.tenant_of(caller, tenant)?;
        match self.store().snapshot_by_name(&tenant_id, name).await? {
            Some(s) if caller.may_access(&s.tenant_id) => Ok(s),
            _ => Err(ControlError::not_found(format!("no snapshot {name:?}"))),
        }
    }

    /// The caller's snapshots; an admin's of every tenant, or of `tenant`.
    pub async fn list_snapshots(
        &self,
        caller: &Caller,
        tenant: Option<&str>,
        after: Option<(&str, &str)>,
        limit: u32,
    ) -> ControlResult<Vec<SnapshotRow>> {
        let tenant_id = list_scope(caller, tenant)?;
        Ok(self
            .store()
            .list_snapshots(tenant_id.as_deref(), after, limit)
            .await?)
    }

    /// Removes the snapshot from its host, then its record. Refused (409)
    /// while the host keeps it for something (an instance started from it).
    pub async fn delete_snapshot(
        &self,
        caller: &Caller,
        tenant: Option<&str>,
        name: &str,
    ) -> ControlResult<()> {
        let snap = self.snapshot(caller, tenant, name).await?;
        let waiting = self.store().unmade_from_snapshot(&snap.id).await?;
        if !waiting.is_empty() {
            return Err(ControlError::conflict(format!(
                "snapshot {name:?} is needed by instances not made yet: {}",
                waiting.join(", ")
            )));
        }
        let host = self.store().host(&snap.host).await?;
        if let Some(host) = host {
            self.agents()
                .delete_snapshot(&crate::agents::AgentAddr::from(&host), &snap.id)
                .await
                .map_err(|e| ControlError::conflict(format!("snapshot {name:?}: {e}")))?;
        }
        self.store().delete_snapshot(&snap.id).await?;
        tracing::info!(snapshot = name, "snapshot removed");
        Ok(())
    }

    /// Settles the snapshots left `creating` longer than
    /// `snapshot_settle_after` (their host did not answer when they were
    /// taken) with their hosts: ready if the host has it, gone if it says
    /// it has none; a host that still does not answer is asked again later.
    pub async fn settle_snapshots(&self) -> ControlResult<()> {
        let before =
            crate::store::now_ms() - self.inner.settings.snapshot_settle_after.as_millis() as i64;
        for snap in self.store().creating_snapshots(before).await? {
            let Some(host) = self.store().host(&snap.host).await? else {
                continue;
            };
            if host.down {
                continue;
            }
            let agent = crate::agents::AgentAddr::from(&host);
            match self.agents().snapshot(&agent, &snap.id).await {
                Ok(info) => {
                    if self.store().snapshot_ready(&snap.id, &info.id).await? {
                        tracing::info!(snapshot = %snap.name, host = %snap.host, "snapshot found on its host: ready");
                    }
                }
                // The agent's own "no such snapshot", not any 404.
                Err(e) if e.is_not_found() && e.code() == Some(ErrorCode::NotFound) => {
                    self.store().delete_snapshot(&snap.id).await?;
                    tracing::warn!(snapshot = %snap.name, host = %snap.host, "snapshot never made on its host: removed");
                }
                Err(e) => {
                    tracing::debug!(snapshot = %snap.name, error = %e, "snapshot not settled yet");
                }
            }
        }
        Ok(())
    }
}
