//! Volumes as tenant resources: each names a volume its host's agent keeps
//! (under the row's id), attached to at most one instance, which runs on
//! that host.

use sqlx::{Any, Row, Transaction};

use super::{now_ms, Store, StoreError, StoreResult};

#[derive(Debug, Clone, PartialEq)]
pub struct VolumeRow {
    /// Also the volume's name on its host's agent.
    pub id: String,
    pub tenant_id: String,
    /// Unique within the tenant.
    pub name: String,
    /// Where it is kept: an instance it is attached to runs there.
    pub host: String,
    pub size_mib: u64,
    /// False while its agent makes it (or if the agent did not answer).
    pub ready: bool,
    /// The instance (id) it is attached to.
    pub attached_to: Option<String>,
    /// That instance's name (read, never written).
    pub attached_name: Option<String>,
    pub created_at: i64,
}

const COLUMNS: &str = "id, tenant_id, name, host, size_mib, ready, attached_to, created_at";
/// Rows with the name of the instance each is attached to.
const SELECT: &str = "SELECT v.id, v.tenant_id, v.name, v.host, v.size_mib, v.ready, \
                      v.attached_to, v.created_at, i.name AS attached_name \
                      FROM volumes v LEFT JOIN instances i ON i.id = v.attached_to";

fn volume(row: &sqlx::any::AnyRow) -> StoreResult<VolumeRow> {
    Ok(VolumeRow {
        id: row.try_get("id")?,
        tenant_id: row.try_get("tenant_id")?,
        name: row.try_get("name")?,
        host: row.try_get("host")?,
        size_mib: row.try_get::<i64, _>("size_mib")? as u64,
        ready: row.try_get::<i64, _>("ready")? != 0,
        attached_to: row.try_get("attached_to")?,
        attached_name: row.try_get("attached_name")?,
        created_at: row.try_get("created_at")?,
    })
}

/// Attaches volumes (ids) to instance `instance` in the transaction that
/// creates it: each must be ready, of the instance's tenant and host, and
/// attached to nothing (`Refused` naming the first that is not).
pub(crate) async fn attach_volumes(
    tx: &mut Transaction<'_, Any>,
    instance: &str,
    tenant_id: &str,
    host: &str,
    volumes: &[String],
) -> StoreResult<()> {
    for id in volumes {
        let done = sqlx::query(
            "UPDATE volumes SET attached_to = $1
             WHERE id = $2 AND tenant_id = $3 AND host = $4 AND ready = 1
               AND attached_to IS NULL",
        )
        .bind(instance)
        .bind(id)
        .bind(tenant_id)
        .bind(host)
        .execute(&mut **tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::Refused(format!(
                "volume {id} is attached to another instance, not ready, or gone"
            )));
        }
    }
    Ok(())
}

/// Frees the volumes attached to `instance` (its record goes).
pub(crate) async fn detach_volumes(
    tx: &mut Transaction<'_, Any>,
    instance: &str,
) -> StoreResult<()> {
    sqlx::query("UPDATE volumes SET attached_to = NULL WHERE attached_to = $1")
        .bind(instance)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

async fn insert_volume(tx: &mut Transaction<'_, Any>, v: &VolumeRow) -> StoreResult<()> {
    sqlx::query(&format!(
        "INSERT INTO volumes ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, NULL, $7)"
    ))
    .bind(&v.id)
    .bind(&v.tenant_id)
    .bind(&v.name)
    .bind(&v.host)
    .bind(v.size_mib as i64)
    .bind(i64::from(v.ready))
    .bind(if v.created_at > 0 {
        v.created_at
    } else {
        now_ms()
    })
    .execute(&mut **tx)
    .await
    .map_err(|e| StoreError::unique(e, format!("volume {:?}", v.name)))?;
    Ok(())
}

impl Store {
    /// Records a volume placed on its host at `host_version` (before its
    /// agent makes it, as not ready): the host gets a new version, as with
    /// any placement; `Contended` if it is not at that version any more,
    /// `Duplicate` if the tenant has a volume of that name.
    pub async fn claim_volume(&self, v: &VolumeRow, host_version: i64) -> StoreResult<()> {
        let mut tx = self.pool().begin().await?;
        let claimed =
            sqlx::query("UPDATE hosts SET version = version + 1 WHERE name = $1 AND version = $2")
                .bind(&v.host)
                .bind(host_version)
                .execute(&mut *tx)
                .await?;
        if claimed.rows_affected() == 0 {
            return Err(StoreError::Contended);
        }
        insert_volume(&mut tx, v).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records a volume without a placement check (imports, tests).
    pub async fn insert_volume(&self, v: &VolumeRow) -> StoreResult<()> {
        let mut tx = self.pool().begin().await?;
        insert_volume(&mut tx, v).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn volume_by_name(
        &self,
        tenant_id: &str,
        name: &str,
    ) -> StoreResult<Option<VolumeRow>> {
        let row = sqlx::query(&format!("{SELECT} WHERE v.tenant_id = $1 AND v.name = $2"))
            .bind(tenant_id)
            .bind(name)
            .fetch_optional(self.pool())
            .await?;
        row.as_ref().map(volume).transpose()
    }

    /// The tenant's volumes (every tenant's with `None`) by name, then id,
    /// from after `after` (the `(name, id)` of the last of a page).
    pub async fn list_volumes(
        &self,
        tenant_id: Option<&str>,
        after: Option<(&str, &str)>,
        limit: u32,
    ) -> StoreResult<Vec<VolumeRow>> {
        let (name, id) = after.unwrap_or(("", ""));
        let rows = sqlx::query(&format!(
            "{SELECT}
             WHERE ($1 = '' OR v.tenant_id = $1) AND (v.name > $2 OR (v.name = $2 AND v.id > $3))
             ORDER BY v.name, v.id LIMIT {limit}"
        ))
        .bind(tenant_id.unwrap_or(""))
        .bind(name)
        .bind(id)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(volume).collect()
    }

    /// The volumes (ids) attached to instance `id`, in name order: the
    /// order its VM gets them as disks.
    pub async fn volumes_of(&self, instance: &str) -> StoreResult<Vec<String>> {
        Ok(
            sqlx::query_scalar("SELECT id FROM volumes WHERE attached_to = $1 ORDER BY name, id")
                .bind(instance)
                .fetch_all(self.pool())
                .await?,
        )
    }

    /// Volumes not ready that were begun before `before_ms`.
    pub async fn creating_volumes(&self, before_ms: i64) -> StoreResult<Vec<VolumeRow>> {
        let rows = sqlx::query(&format!("{SELECT} WHERE v.ready = 0 AND v.created_at < $1"))
            .bind(before_ms)
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(volume).collect()
    }

    /// Its agent has made it. False if the record went meanwhile.
    pub async fn volume_ready(&self, id: &str) -> StoreResult<bool> {
        let done = sqlx::query("UPDATE volumes SET ready = 1 WHERE id = $1 AND ready = 0")
            .bind(id)
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Removes the record unless an instance has the volume attached
    /// (`Refused` naming it then).
    pub async fn delete_volume(&self, id: &str) -> StoreResult<()> {
        let done = sqlx::query("DELETE FROM volumes WHERE id = $1 AND attached_to IS NULL")
            .bind(id)
            .execute(self.pool())
            .await?;
        if done.rows_affected() == 0 {
            let attached: Option<Option<String>> =
                sqlx::query_scalar("SELECT attached_to FROM volumes WHERE id = $1")
                    .bind(id)
                    .fetch_optional(self.pool())
                    .await?;
            if let Some(Some(instance)) = attached {
                return Err(StoreError::Refused(format!(
                    "volume {id} is attached to instance {instance}"
                )));
            }
        }
        Ok(())
    }
}
