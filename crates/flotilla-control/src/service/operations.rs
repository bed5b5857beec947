//! Operations: records, lookups under tenancy, and taking over the ones no
//! live replica drives.

use super::*;

impl ControlPlane {
    pub(super) fn new_operation(
        &self,
        tenant_id: Option<&str>,
        id: &str,
        input: OperationInput,
        targets: Vec<String>,
    ) -> OperationRow {
        let now = now_ms();
        OperationRow {
            id: id.to_string(),
            tenant_id: tenant_id.map(str::to_string),
            kind: input.kind().to_string(),
            targets,
            state: flotilla_api::control::OperationState::Running,
            steps: Vec::new(),
            input: serde_json::to_value(input).unwrap_or_default(),
            error: None,
            created_at: now,
            updated_at: now,
        }
    }

    pub async fn operation(&self, caller: &Caller, id: &str) -> ControlResult<OperationRow> {
        match self.store().operation(id).await? {
            Some(op)
                if caller.admin || (op.tenant_id.is_some() && op.tenant_id == caller.tenant_id) =>
            {
                Ok(op)
            }
            _ => Err(ControlError::not_found(format!("no operation {id:?}"))),
        }
    }

    pub async fn list_operations(
        &self,
        caller: &Caller,
        after: Option<(i64, &str)>,
        limit: u32,
    ) -> ControlResult<Vec<OperationRow>> {
        let tenant = if caller.admin {
            None
        } else {
            Some(caller.tenant_id.as_deref().ok_or_else(no_tenant)?)
        };
        Ok(self.store().list_operations(tenant, after, limit).await?)
    }

    /// Takes over the operations no live replica drives (`all`: every
    /// running one, for a single replica that owns its store) and drives them.
    pub async fn adopt_operations(&self, all: bool) -> ControlResult<usize> {
        let until = self.lease_until();
        let ops = self
            .store()
            .claim_orphaned_operations(&self.inner.replica, until, all)
            .await?;
        let n = ops.len();
        for op in ops {
            tracing::info!(op = %op.id, kind = %op.kind, done = op.steps.len(), "resuming operation");
            workflows::spawn(self.clone(), op);
        }
        Ok(n)
    }
}
