//! Volumes as tenant resources: each names a volume its host's agent keeps
//! (under the row's id), attached to at most one instance, which runs on
//! that host.

use flotilla_api::control::VolumeState;
use sqlx::{Any, Row, Transaction};

use super::{from_json, now_ms, to_json, Store, StoreError, StoreResult};

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
    pub state: VolumeState,
    /// The instance (id) it is attached to.
    pub attached_to: Option<String>,
    /// That instance's name (read, never written).
    pub attached_name: Option<String>,
    pub created_at: i64,
}

const COLUMNS: &str = "id, tenant_id, name, host, size_mib, state, attached_to, created_at";
/// Rows with the name of the instance each is attached to.
const SELECT: &str = "SELECT v.id, v.tenant_id, v.name, v.host, v.size_mib, v.state, \
                      v.attached_to, v.created_at, i.name AS attached_name \
                      FROM volumes v LEFT JOIN instances i ON i.id = v.attached_to";

fn volume(row: &sqlx::any::AnyRow) -> StoreResult<VolumeRow> {
    Ok(VolumeRow {
        id: row.try_get("id")?,
        tenant_id: row.try_get("tenant_id")?,
        name: row.try_get("name")?,
        host: row.try_get("host")?,
        size_mib: row.try_get::<i64, _>("size_mib")? as u64,
        state: from_json(
            "volume state",
            &format!("\"{}\"", row.try_get::<String, _>("state")?),
        )?,
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
             WHERE id = $2 AND tenant_id = $3 AND host = $4 AND state = 'ready'
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
                "a volume asked for ({id}) was attached to another instance, or is being made or removed, meanwhile"
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

fn state_text(s: VolumeState) -> String {
    to_json(&s).trim_matches('"').to_string()
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
    .bind(state_text(v.state))
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
        self.commit(tx).await?;
        Ok(())
    }

    /// Records a volume without a placement check (imports, tests).
    pub async fn insert_volume(&self, v: &VolumeRow) -> StoreResult<()> {
        let mut tx = self.pool().begin().await?;
        insert_volume(&mut tx, v).await?;
        self.commit(tx).await?;
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

    /// The names of the volumes attached to instance `id`, in order.
    pub async fn volume_names_of(&self, instance: &str) -> StoreResult<Vec<String>> {
        Ok(
            sqlx::query_scalar("SELECT name FROM volumes WHERE attached_to = $1 ORDER BY name, id")
                .bind(instance)
                .fetch_all(self.pool())
                .await?,
        )
    }

    /// What the volumes attached to instance `id` take, in MiB.
    pub async fn volumes_size_of(&self, instance: &str) -> StoreResult<u64> {
        let mib: i64 = sqlx::query_scalar(
            "SELECT CAST(COALESCE(SUM(size_mib), 0) AS BIGINT) FROM volumes WHERE attached_to = $1",
        )
        .bind(instance)
        .fetch_one(self.pool())
        .await?;
        Ok(mib as u64)
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

    /// Volumes still creating or deleting (their host did not answer)
    /// since before `before_ms`.
    pub async fn unsettled_volumes(&self, before_ms: i64) -> StoreResult<Vec<VolumeRow>> {
        let rows = sqlx::query(&format!(
            "{SELECT} WHERE v.state <> 'ready' AND v.created_at < $1"
        ))
        .bind(before_ms)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(volume).collect()
    }

    /// Its agent has made it. False if the record went or is being
    /// removed meanwhile.
    pub async fn volume_ready(&self, id: &str) -> StoreResult<bool> {
        let done =
            sqlx::query("UPDATE volumes SET state = 'ready' WHERE id = $1 AND state = 'creating'")
                .bind(id)
                .execute(self.pool())
                .await?;
        self.durable().await?;
        Ok(done.rows_affected() > 0)
    }

    /// Marks a volume attached to nothing as being removed, so that no run
    /// attaches it from now on; `Refused` naming the instance it is
    /// attached to.
    pub async fn begin_volume_removal(&self, v: &VolumeRow) -> StoreResult<()> {
        let done = sqlx::query(
            "UPDATE volumes SET state = 'deleting' WHERE id = $1 AND attached_to IS NULL",
        )
        .bind(&v.id)
        .execute(self.pool())
        .await?;
        self.durable().await?;
        if done.rows_affected() > 0 {
            return Ok(());
        }
        let attached: Option<String> = sqlx::query_scalar(
            "SELECT i.name FROM volumes v JOIN instances i ON i.id = v.attached_to
             WHERE v.id = $1",
        )
        .bind(&v.id)
        .fetch_optional(self.pool())
        .await?;
        Err(StoreError::Refused(match attached {
            Some(instance) => format!("volume {:?} is attached to instance {instance:?}", v.name),
            None => format!("volume {:?} is gone", v.name),
        }))
    }

    /// Back to `state` after a removal its host refused.
    pub async fn end_volume_removal(&self, id: &str, state: VolumeState) -> StoreResult<()> {
        sqlx::query("UPDATE volumes SET state = $1 WHERE id = $2 AND state = 'deleting'")
            .bind(state_text(state))
            .bind(id)
            .execute(self.pool())
            .await?;
        self.durable().await?;
        Ok(())
    }

    /// Removes the record of a volume attached to nothing.
    pub async fn delete_volume(&self, id: &str) -> StoreResult<()> {
        sqlx::query("DELETE FROM volumes WHERE id = $1 AND attached_to IS NULL")
            .bind(id)
            .execute(self.pool())
            .await?;
        self.durable().await?;
        Ok(())
    }
}
