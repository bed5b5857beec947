//! Stored placement policies, per tenant (or global: tenant `""`).

use std::collections::BTreeMap;

use flotilla_api::control::PlacementPolicy;
use sqlx::Row;

use super::{from_json, now_ms, to_json, Store, StoreResult};

#[derive(Debug, Clone, PartialEq)]
pub struct PolicyRow {
    /// `""` for a global policy.
    pub tenant_id: String,
    pub name: String,
    pub fleet: BTreeMap<String, String>,
    pub placement: PlacementPolicy,
    pub updated_at: i64,
}

fn policy(row: &sqlx::any::AnyRow) -> StoreResult<PolicyRow> {
    let fleet: String = row.try_get("fleet")?;
    let document: String = row.try_get("document")?;
    Ok(PolicyRow {
        tenant_id: row.try_get("tenant_id")?,
        name: row.try_get("name")?,
        fleet: from_json("policy fleet", &fleet)?,
        placement: from_json("placement policy", &document)?,
        updated_at: row.try_get("updated_at")?,
    })
}

impl Store {
    /// Creates or replaces a policy.
    pub async fn put_policy(&self, p: &PolicyRow) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO policies (tenant_id, name, fleet, document, updated_at)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (tenant_id, name) DO UPDATE SET fleet = $3, document = $4, updated_at = $5",
        )
        .bind(&p.tenant_id)
        .bind(&p.name)
        .bind(to_json(&p.fleet))
        .bind(to_json(&p.placement))
        .bind(now_ms())
        .execute(self.pool())
        .await?;
        self.durable().await?;
        Ok(())
    }

    /// The policies of `tenant_id` and the global ones (global first), by name.
    pub async fn policies_for(&self, tenant_id: &str) -> StoreResult<Vec<PolicyRow>> {
        let rows = sqlx::query(
            "SELECT tenant_id, name, fleet, document, updated_at FROM policies
             WHERE tenant_id = '' OR tenant_id = $1 ORDER BY tenant_id, name",
        )
        .bind(tenant_id)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(policy).collect()
    }

    pub async fn all_policies(&self) -> StoreResult<Vec<PolicyRow>> {
        let rows = sqlx::query(
            "SELECT tenant_id, name, fleet, document, updated_at FROM policies ORDER BY tenant_id, name",
        )
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(policy).collect()
    }

    pub async fn delete_policy(&self, tenant_id: &str, name: &str) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM policies WHERE tenant_id = $1 AND name = $2")
            .bind(tenant_id)
            .bind(name)
            .execute(self.pool())
            .await?;
        self.durable().await?;
        Ok(done.rows_affected() > 0)
    }
}
