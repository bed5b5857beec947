//! Operations: durable multi-step workflows. Each finished step is recorded
//! before the next begins; a lease says which replica drives one, so another
//! takes over when it dies.

use flotilla_api::control::OperationState;
use sqlx::{Any, Row, Transaction};

use super::instances::{apply_observed, ObservedUpdate};

use super::{from_json, now_ms, to_json, Store, StoreResult};

#[derive(Debug, Clone, PartialEq)]
pub struct OperationRow {
    pub id: String,
    pub tenant_id: Option<String>,
    pub kind: String,
    pub targets: Vec<String>,
    pub state: OperationState,
    pub steps: Vec<String>,
    pub input: serde_json::Value,
    pub error: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// Inserts a new running operation, leased to `owner` until `lease_until`.
pub(crate) async fn insert_operation(
    tx: &mut Transaction<'_, Any>,
    op: &OperationRow,
    owner: &str,
    lease_until: i64,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO operations (id, tenant_id, kind, targets, state, steps, input, error,
                                 lease_owner, lease_until, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, NULL, $8, $9, $10, $10)",
    )
    .bind(&op.id)
    .bind(op.tenant_id.as_deref())
    .bind(&op.kind)
    .bind(to_json(&op.targets))
    .bind(state_text(op.state))
    .bind(to_json(&op.steps))
    .bind(to_json(&op.input))
    .bind(owner)
    .bind(lease_until)
    .bind(op.created_at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

const COLUMNS: &str =
    "id, tenant_id, kind, targets, state, steps, input, error, created_at, updated_at";

fn state_text(s: OperationState) -> &'static str {
    match s {
        OperationState::Running => "running",
        OperationState::Succeeded => "succeeded",
        OperationState::Failed => "failed",
    }
}

fn operation(row: &sqlx::any::AnyRow) -> StoreResult<OperationRow> {
    let targets: String = row.try_get("targets")?;
    let steps: String = row.try_get("steps")?;
    let input: String = row.try_get("input")?;
    let state: String = row.try_get("state")?;
    Ok(OperationRow {
        id: row.try_get("id")?,
        tenant_id: row.try_get("tenant_id")?,
        kind: row.try_get("kind")?,
        targets: from_json("operation targets", &targets)?,
        state: from_json("operation state", &format!("\"{state}\""))?,
        steps: from_json("operation steps", &steps)?,
        input: from_json("operation input", &input)?,
        error: row.try_get("error")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

impl Store {
    /// A new running operation, leased to `owner` until `lease_until`.
    pub async fn create_operation(
        &self,
        op: &OperationRow,
        owner: &str,
        lease_until: i64,
    ) -> StoreResult<()> {
        let mut tx = self.pool().begin().await?;
        insert_operation(&mut tx, op, owner, lease_until).await?;
        self.commit(tx).await?;
        Ok(())
    }

    pub async fn operation(&self, id: &str) -> StoreResult<Option<OperationRow>> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM operations WHERE id = $1"))
            .bind(id)
            .fetch_optional(self.pool())
            .await?;
        row.as_ref().map(operation).transpose()
    }

    /// Newest first; `tenant_id` None lists every tenant's.
    /// Operations newest first (of `tenant_id`, or all), from after
    /// `after` (the `(created_at, id)` of the last one of a page).
    pub async fn list_operations(
        &self,
        tenant_id: Option<&str>,
        after: Option<(i64, &str)>,
        limit: u32,
    ) -> StoreResult<Vec<OperationRow>> {
        let (at, id) = after.unwrap_or((i64::MAX, ""));
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM operations
             WHERE ($1 = '' OR tenant_id = $1)
               AND (created_at < $2 OR (created_at = $2 AND id > $3))
             ORDER BY created_at DESC, id LIMIT {limit}"
        ))
        .bind(tenant_id.unwrap_or(""))
        .bind(at)
        .bind(id)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(operation).collect()
    }

    /// Records a finished step and extends the lease, if `owner` still holds it.
    /// Records the steps done and what they saw of their instances in one
    /// transaction, if `owner` still holds the operation (nothing otherwise:
    /// the new holder repeats the steps).
    pub async fn record_steps(
        &self,
        id: &str,
        steps: &[String],
        owner: &str,
        lease_until: i64,
        seen: &[ObservedUpdate],
    ) -> StoreResult<bool> {
        let mut tx = self.pool().begin().await?;
        let done = sqlx::query(
            "UPDATE operations SET steps = $1, lease_until = $2, updated_at = $3
             WHERE id = $4 AND lease_owner = $5 AND state = 'running'",
        )
        .bind(to_json(&steps))
        .bind(lease_until)
        .bind(now_ms())
        .bind(id)
        .bind(owner)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        for update in seen {
            apply_observed(&mut tx, update).await?;
        }
        self.commit(tx).await?;
        Ok(true)
    }

    /// Ends the operation, if `owner` still holds it; false otherwise.
    pub async fn finish_operation(
        &self,
        id: &str,
        owner: &str,
        state: OperationState,
        error: Option<&str>,
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE operations SET state = $1, error = $2, lease_owner = NULL, updated_at = $3
             WHERE id = $4 AND lease_owner = $5 AND state = 'running'",
        )
        .bind(state_text(state))
        .bind(error)
        .bind(now_ms())
        .bind(id)
        .bind(owner)
        .execute(self.pool())
        .await?;
        self.durable().await?;
        Ok(done.rows_affected() > 0)
    }

    /// Extends `owner`'s lease on a running operation; false if it lost it.
    pub async fn renew_lease(&self, id: &str, owner: &str, lease_until: i64) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE operations SET lease_until = $1
             WHERE id = $2 AND lease_owner = $3 AND state = 'running'",
        )
        .bind(lease_until)
        .bind(id)
        .bind(owner)
        .execute(self.pool())
        .await?;
        self.durable().await?;
        Ok(done.rows_affected() > 0)
    }

    /// Takes over running operations whose lease ran out (their driver died)
    /// and returns them; with `all`, every running one (a single replica
    /// that owns its store takes over from its own previous life).
    pub async fn claim_orphaned_operations(
        &self,
        owner: &str,
        lease_until: i64,
        all: bool,
    ) -> StoreResult<Vec<OperationRow>> {
        let now = if all { i64::MAX } else { now_ms() };
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM operations WHERE state = 'running' AND lease_until < $1",
        )
        .bind(now)
        .fetch_all(self.pool())
        .await?;
        let mut claimed = Vec::new();
        for id in ids {
            let done = sqlx::query(
                "UPDATE operations SET lease_owner = $1, lease_until = $2
                 WHERE id = $3 AND state = 'running' AND lease_until < $4",
            )
            .bind(owner)
            .bind(lease_until)
            .bind(&id)
            .bind(now)
            .execute(self.pool())
            .await?;
            if done.rows_affected() > 0 {
                // One unreadable row must not keep the others from their driver.
                match self.operation(&id).await {
                    Ok(Some(op)) => claimed.push(op),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::error!(op = %id, error = %e, "unreadable operation: marked failed");
                        let reason = format!("unreadable operation record: {e}");
                        let _ = self
                            .finish_operation(&id, owner, OperationState::Failed, Some(&reason))
                            .await;
                    }
                }
            }
        }
        // Every claim durable before its operation is driven: one fsync.
        self.durable().await?;
        Ok(claimed)
    }
}
