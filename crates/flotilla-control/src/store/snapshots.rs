//! Snapshots of instances, as tenant resources: each names a snapshot its
//! host's agent keeps (under the row's id), so instances can start from it
//! on that host.

use sqlx::Row;

use super::{now_ms, Store, StoreError, StoreResult};

#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotRow {
    /// Also the snapshot's name on its host's agent.
    pub id: String,
    pub tenant_id: String,
    /// Unique within the tenant.
    pub name: String,
    /// Where the snapshot is kept: instances from it run there.
    pub host: String,
    /// The instance it was taken of (its name then).
    pub instance_name: String,
    /// The agent's layer id; empty while the agent is making it.
    pub layer: String,
    pub image: Option<String>,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_mib: u64,
    pub created_at: i64,
}

impl SnapshotRow {
    /// Made by its agent (not still being made, or lost with an agent that
    /// did not answer).
    pub fn ready(&self) -> bool {
        !self.layer.is_empty()
    }
}

const COLUMNS: &str = "id, tenant_id, name, host, instance_name, layer, image, vcpus, \
                       memory_mib, disk_mib, created_at";

fn snapshot(row: &sqlx::any::AnyRow) -> StoreResult<SnapshotRow> {
    Ok(SnapshotRow {
        id: row.try_get("id")?,
        tenant_id: row.try_get("tenant_id")?,
        name: row.try_get("name")?,
        host: row.try_get("host")?,
        instance_name: row.try_get("instance_name")?,
        layer: row.try_get("layer")?,
        image: row.try_get("image")?,
        vcpus: row.try_get::<i64, _>("vcpus")? as u32,
        memory_mib: row.try_get::<i64, _>("memory_mib")? as u64,
        disk_mib: row.try_get::<i64, _>("disk_mib")? as u64,
        created_at: row.try_get("created_at")?,
    })
}

impl Store {
    /// Records a snapshot its agent has made; `Duplicate` if the tenant
    /// has one of that name.
    pub async fn insert_snapshot(&self, s: &SnapshotRow) -> StoreResult<()> {
        sqlx::query(&format!(
            "INSERT INTO snapshots ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        ))
        .bind(&s.id)
        .bind(&s.tenant_id)
        .bind(&s.name)
        .bind(&s.host)
        .bind(&s.instance_name)
        .bind(&s.layer)
        .bind(s.image.as_deref())
        .bind(i64::from(s.vcpus))
        .bind(s.memory_mib as i64)
        .bind(s.disk_mib as i64)
        .bind(if s.created_at > 0 { s.created_at } else { now_ms() })
        .execute(self.pool())
        .await
        .map_err(|e| StoreError::unique(e, format!("snapshot {:?}", s.name)))?;
        self.durable().await?;
        Ok(())
    }

    pub async fn snapshot_by_name(
        &self,
        tenant_id: &str,
        name: &str,
    ) -> StoreResult<Option<SnapshotRow>> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM snapshots WHERE tenant_id = $1 AND name = $2"
        ))
        .bind(tenant_id)
        .bind(name)
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(snapshot).transpose()
    }

    /// The tenant's snapshots (every tenant's with `None`) by name, then
    /// id, from after `after` (the `(name, id)` of the last of a page).
    pub async fn list_snapshots(
        &self,
        tenant_id: Option<&str>,
        after: Option<(&str, &str)>,
        limit: u32,
    ) -> StoreResult<Vec<SnapshotRow>> {
        let (name, id) = after.unwrap_or(("", ""));
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM snapshots
             WHERE ($1 = '' OR tenant_id = $1) AND (name > $2 OR (name = $2 AND id > $3))
             ORDER BY name, id LIMIT {limit}"
        ))
        .bind(tenant_id.unwrap_or(""))
        .bind(name)
        .bind(id)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(snapshot).collect()
    }

    /// Snapshots still `creating` that were begun before `before_ms`.
    pub async fn creating_snapshots(&self, before_ms: i64) -> StoreResult<Vec<SnapshotRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM snapshots WHERE layer = '' AND created_at < $1"
        ))
        .bind(before_ms)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(snapshot).collect()
    }

    /// Records the layer of a snapshot its agent has made: it is ready.
    /// False if the record went meanwhile (removed while it was made).
    pub async fn snapshot_ready(&self, id: &str, layer: &str) -> StoreResult<bool> {
        let done = sqlx::query("UPDATE snapshots SET layer = $1 WHERE id = $2 AND layer = ''")
            .bind(layer)
            .bind(id)
            .execute(self.pool())
            .await?;
        self.durable().await?;
        Ok(done.rows_affected() > 0)
    }

    /// Instances to start from snapshot `id` that their hosts have not
    /// made yet (those made hold the snapshot on their host themselves).
    pub async fn unmade_from_snapshot(&self, id: &str) -> StoreResult<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT name FROM instances WHERE from_snapshot = $1 AND observed = 'pending'
             ORDER BY name",
        )
        .bind(id)
        .fetch_all(self.pool())
        .await?)
    }

    pub async fn delete_snapshot(&self, id: &str) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM snapshots WHERE id = $1")
            .bind(id)
            .execute(self.pool())
            .await?;
        self.durable().await?;
        Ok(done.rows_affected() > 0)
    }
}
