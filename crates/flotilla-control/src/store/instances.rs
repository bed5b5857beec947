//! Instances: what each tenant asked for (desired state) and what its host
//! last reported (observed state).

use std::collections::BTreeMap;

use flotilla_api::control::{DesiredState, ObservedState};
use sqlx::{Any, Row, Transaction};

use super::hosts::{claim_group, GroupGuard};
use super::{from_json, now_ms, to_json, Store, StoreError, StoreResult};

#[derive(Debug, Clone)]
pub struct NewInstance {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    pub image: Option<String>,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Disk space it is counted for on its host.
    pub disk_mib: u64,
    /// The snapshot it starts from (the agent's name for it), if any.
    pub from_snapshot: Option<String>,
    pub tags: BTreeMap<String, String>,
    pub operation: Option<String>,
    /// The address handed out for it (unique across hosts), if its host's
    /// VM subnet is known.
    pub ip: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct InstanceRow {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    pub host: Option<String>,
    pub desired: DesiredState,
    pub observed: ObservedState,
    pub image: Option<String>,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_mib: u64,
    pub from_snapshot: Option<String>,
    pub ip: Option<String>,
    pub tags: BTreeMap<String, String>,
    pub operation: Option<String>,
    pub last_error: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    /// The host a live migration is moving it to.
    pub migrating_to: Option<String>,
}

/// What `list_instances` returns: everything matching, by name, from after
/// `after` on.
#[derive(Debug, Clone, Default)]
pub struct InstanceFilter {
    pub tenant_id: Option<String>,
    pub host: Option<String>,
    pub observed: Option<ObservedState>,
    pub tags: BTreeMap<String, String>,
    /// A page token: `name:id` of the last instance of the previous page.
    pub after: Option<String>,
    pub limit: u32,
}

const COLUMNS: &str = "id, tenant_id, name, host, desired, observed, image, vcpus, memory_mib, \
                       ip, tags, operation, last_error, created_at, updated_at, disk_mib, \
                       from_snapshot";
/// What reads select: the inserted columns and those added later.
const READ_COLUMNS: &str = "id, tenant_id, name, host, desired, observed, image, vcpus, \
                            memory_mib, ip, tags, operation, last_error, created_at, \
                            updated_at, migrating_to, disk_mib, from_snapshot";

fn enum_text<T: serde::Serialize>(v: &T) -> String {
    to_json(v).trim_matches('"').to_string()
}

fn enum_from<T: serde::de::DeserializeOwned>(what: &str, text: &str) -> StoreResult<T> {
    from_json(what, &format!("\"{text}\""))
}

fn instance(row: &sqlx::any::AnyRow) -> StoreResult<InstanceRow> {
    let desired: String = row.try_get("desired")?;
    let observed: String = row.try_get("observed")?;
    let tags: String = row.try_get("tags")?;
    Ok(InstanceRow {
        id: row.try_get("id")?,
        tenant_id: row.try_get("tenant_id")?,
        name: row.try_get("name")?,
        host: row.try_get("host")?,
        desired: enum_from("desired state", &desired)?,
        observed: enum_from("observed state", &observed)?,
        image: row.try_get("image")?,
        vcpus: row.try_get::<i64, _>("vcpus")? as u32,
        memory_mib: row.try_get::<i64, _>("memory_mib")? as u64,
        disk_mib: row.try_get::<i64, _>("disk_mib")? as u64,
        from_snapshot: row.try_get("from_snapshot")?,
        ip: row.try_get("ip")?,
        tags: from_json("instance tags", &tags)?,
        operation: row.try_get("operation")?,
        last_error: row.try_get("last_error")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        migrating_to: row.try_get("migrating_to")?,
    })
}

/// Tag rows for instances stored before tags had a table of their own.
pub(crate) async fn backfill_tags(tx: &mut Transaction<'_, Any>) -> StoreResult<()> {
    let rows = sqlx::query("SELECT id, tags FROM instances")
        .fetch_all(&mut **tx)
        .await?;
    for row in rows {
        let id: String = row.try_get("id")?;
        let tags: String = row.try_get("tags")?;
        let tags: BTreeMap<String, String> = from_json("instance tags", &tags)?;
        insert_tags(tx, &id, &tags).await?;
    }
    Ok(())
}

async fn insert_tags(
    tx: &mut Transaction<'_, Any>,
    id: &str,
    tags: &BTreeMap<String, String>,
) -> StoreResult<()> {
    for (k, v) in tags {
        sqlx::query("INSERT INTO instance_tags (instance_id, key, value) VALUES ($1, $2, $3)")
            .bind(id)
            .bind(k)
            .bind(v)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// What an operation's step saw of an instance, recorded with the step.
#[derive(Debug, Clone, PartialEq)]
pub struct ObservedUpdate {
    pub id: String,
    pub observed: ObservedState,
    /// Kept as it was when None.
    pub ip: Option<String>,
    pub error: Option<String>,
    /// When it was seen: a newer record of the instance is kept.
    pub seen_at: i64,
}

pub(crate) async fn apply_observed(
    tx: &mut Transaction<'_, Any>,
    u: &ObservedUpdate,
) -> StoreResult<()> {
    // An address another instance holds is not taken over (two hosts
    // that gave the same one out on their own): the first keeps it.
    sqlx::query(
        "UPDATE instances SET observed = $1,
            ip = CASE WHEN EXISTS (SELECT 1 FROM instances o WHERE o.ip = $2 AND o.id <> $5)
                      THEN ip ELSE COALESCE($2, ip) END,
            last_error = $3, updated_at = $4 WHERE id = $5 AND updated_at <= $6",
    )
    .bind(enum_text(&u.observed))
    .bind(u.ip.as_deref())
    .bind(u.error.as_deref())
    .bind(now_ms())
    .bind(&u.id)
    .bind(u.seen_at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A new version for the hosts an instance is on or moving to: what a
/// host holds changes (an instance leaves, moves or changes tags), so a
/// placement decided on the old set (hard affinity near or away from
/// instances there) commits only after deciding again.
async fn bump_hosts_of(tx: &mut Transaction<'_, Any>, id: &str) -> StoreResult<()> {
    bump_hosts_of_all(tx, std::slice::from_ref(&id.to_string())).await
}

/// [`bump_hosts_of`] for many instances at once. The hosts are updated one
/// at a time in name order, as every writer locks them: two transactions
/// never wait for each other's hosts (PostgreSQL would end one).
async fn bump_hosts_of_all(tx: &mut Transaction<'_, Any>, ids: &[String]) -> StoreResult<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = (1..=ids.len()).map(|i| format!("${i}")).collect();
    let list = list.join(", ");
    let sql = format!(
        "SELECT host FROM instances WHERE id IN ({list}) AND host IS NOT NULL
         UNION SELECT migrating_to FROM instances WHERE id IN ({list}) AND migrating_to IS NOT NULL"
    );
    let mut q = sqlx::query_scalar::<_, String>(&sql);
    for id in ids {
        q = q.bind(id);
    }
    let mut hosts = q.fetch_all(&mut **tx).await?;
    hosts.sort();
    hosts.dedup();
    for host in hosts {
        sqlx::query("UPDATE hosts SET version = version + 1 WHERE name = $1")
            .bind(&host)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// Room on `host` for a decision made at `version`: a new version if it is
/// still that one (false if another placement got there first).
async fn claim_host(tx: &mut Transaction<'_, Any>, host: &str, version: i64) -> StoreResult<bool> {
    let done =
        sqlx::query("UPDATE hosts SET version = version + 1 WHERE name = $1 AND version = $2")
            .bind(host)
            .bind(version)
            .execute(&mut **tx)
            .await?;
    Ok(done.rows_affected() > 0)
}

/// Whether `e` is the unique index on instance addresses refusing a row.
fn is_ip_taken(e: &sqlx::Error) -> bool {
    e.as_database_error().is_some_and(|d| {
        d.is_unique_violation()
            && (d.constraint() == Some("instances_by_ip") || d.message().contains("instances.ip"))
    })
}

pub(crate) async fn insert_instance(
    tx: &mut Transaction<'_, Any>,
    i: &NewInstance,
    host: Option<&str>,
) -> StoreResult<()> {
    let now = now_ms();
    sqlx::query(&format!(
        "INSERT INTO instances ({COLUMNS})
         VALUES ($1, $2, $3, $4, 'running', 'pending', $5, $6, $7, $8, $9, $10, NULL, $11, $11,
                 $12, $13)"
    ))
    .bind(&i.id)
    .bind(&i.tenant_id)
    .bind(&i.name)
    .bind(host)
    .bind(i.image.as_deref())
    .bind(i64::from(i.vcpus))
    .bind(i.memory_mib as i64)
    .bind(i.ip.as_deref())
    .bind(to_json(&i.tags))
    .bind(i.operation.as_deref())
    .bind(now)
    .bind(i.disk_mib as i64)
    .bind(i.from_snapshot.as_deref())
    .execute(&mut **tx)
    .await
    .map_err(|e| {
        // Another placement took the address meanwhile: decide again.
        if is_ip_taken(&e) {
            return StoreError::Contended;
        }
        StoreError::unique(e, format!("instance {:?}", i.name))
    })?;
    insert_tags(tx, &i.id, &i.tags).await
}

impl Store {
    /// Claims room on `to` for moving the instance there (it holds capacity
    /// on both hosts until [`Store::end_migration`]): valid only if `to` is
    /// still at `to_version`, its placement group (if any) at the version
    /// the move was decided on, and the instance still on `from`, not
    /// moving.
    pub async fn begin_migration(
        &self,
        id: &str,
        from: &str,
        to: &str,
        to_version: i64,
        group: Option<&GroupGuard>,
    ) -> StoreResult<()> {
        let mut tx = self.pool().begin().await?;
        let claimed =
            claim_host(&mut tx, to, to_version).await? && claim_group(&mut tx, group).await?;
        let moving = sqlx::query(
            "UPDATE instances SET migrating_to = $1, updated_at = $2
             WHERE id = $3 AND host = $4 AND migrating_to IS NULL",
        )
        .bind(to)
        .bind(now_ms())
        .bind(id)
        .bind(from)
        .execute(&mut *tx)
        .await?;
        if !claimed || moving.rows_affected() == 0 {
            return Err(StoreError::Contended);
        }
        self.commit(tx).await?;
        Ok(())
    }

    /// Moves an instance not made yet (`pending`) from `from`, whose agent
    /// refused to make it, to `to`: valid only if `to` is still at
    /// `to_version` and the placement group (if any) at the version the
    /// move was decided on. Both hosts get a new version (hosts locked in
    /// name order, as concurrent moves the other way may run).
    pub async fn place_again(
        &self,
        id: &str,
        from: &str,
        to: &str,
        to_version: i64,
        group: Option<&GroupGuard>,
    ) -> StoreResult<()> {
        let mut tx = self.pool().begin().await?;
        let mut claimed = true;
        let mut hosts = [from, to];
        hosts.sort();
        for host in hosts {
            if host == to {
                claimed &= claim_host(&mut tx, to, to_version).await?;
            } else {
                sqlx::query("UPDATE hosts SET version = version + 1 WHERE name = $1")
                    .bind(from)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        claimed &= claim_group(&mut tx, group).await?;
        let moved = sqlx::query(
            "UPDATE instances SET host = $1, updated_at = $2
             WHERE id = $3 AND host = $4 AND observed = 'pending' AND migrating_to IS NULL",
        )
        .bind(to)
        .bind(now_ms())
        .bind(id)
        .bind(from)
        .execute(&mut *tx)
        .await?;
        if !claimed || moved.rows_affected() == 0 {
            return Err(StoreError::Contended);
        }
        self.commit(tx).await?;
        Ok(())
    }

    /// Takes an instance not made yet (`pending`) off `host`, whose agent
    /// refused to make it: it holds no room and no address any more (the
    /// host gets a new version), and stays as a record of the failed run
    /// until terminated. False if it is not pending on `host`.
    pub async fn release_unmade(&self, id: &str, host: &str) -> StoreResult<bool> {
        let mut tx = self.pool().begin().await?;
        sqlx::query("UPDATE hosts SET version = version + 1 WHERE name = $1")
            .bind(host)
            .execute(&mut *tx)
            .await?;
        let released = sqlx::query(
            "UPDATE instances SET host = NULL, ip = NULL, updated_at = $1
             WHERE id = $2 AND host = $3 AND observed = 'pending' AND migrating_to IS NULL",
        )
        .bind(now_ms())
        .bind(id)
        .bind(host)
        .execute(&mut *tx)
        .await?;
        self.commit(tx).await?;
        Ok(released.rows_affected() > 0)
    }

    /// Instances being moved to `host`.
    pub async fn instances_moving_to(&self, host: &str) -> StoreResult<Vec<InstanceRow>> {
        let sql = format!("SELECT {READ_COLUMNS} FROM instances WHERE migrating_to = $1");
        let rows = sqlx::query(&sql).bind(host).fetch_all(self.pool()).await?;
        rows.iter().map(instance).collect()
    }

    /// Ends a move: the instance is on its target (`moved`) or stays.
    pub async fn end_migration(&self, id: &str, moved: bool) -> StoreResult<()> {
        let mut tx = self.pool().begin().await?;
        bump_hosts_of(&mut tx, id).await?;
        let sql = match moved {
            true => {
                "UPDATE instances SET host = migrating_to, migrating_to = NULL, updated_at = $1
                     WHERE id = $2 AND migrating_to IS NOT NULL"
            }
            false => "UPDATE instances SET migrating_to = NULL, updated_at = $1 WHERE id = $2",
        };
        sqlx::query(sql)
            .bind(now_ms())
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if moved {
            // Its volumes moved with it.
            sqlx::query(
                "UPDATE volumes SET host = (SELECT host FROM instances WHERE id = $1)
                 WHERE attached_to = $1",
            )
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        self.commit(tx).await?;
        Ok(())
    }

    /// Replaces an instance's tags, if they are still `old` (another update
    /// in between gives [`StoreError::Contended`]). Every group entered or
    /// left gets a new version, so a placement that counted the group
    /// before this change decides again.
    pub async fn update_tags(
        &self,
        instance: &InstanceRow,
        new: &BTreeMap<String, String>,
    ) -> StoreResult<()> {
        let (id, old, tenant_id) = (&instance.id, &instance.tags, &instance.tenant_id);
        let mut tx = self.pool().begin().await?;
        // Hosts first, as every writer does: no lock-order deadlock.
        bump_hosts_of(&mut tx, id).await?;
        let updated = sqlx::query(
            "UPDATE instances SET tags = $1, updated_at = $2 WHERE id = $3 AND tags = $4",
        )
        .bind(to_json(new))
        .bind(now_ms())
        .bind(id)
        .bind(to_json(old))
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() == 0 {
            return Err(StoreError::Contended);
        }
        sqlx::query("DELETE FROM instance_tags WHERE instance_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        insert_tags(&mut tx, id, new).await?;
        let changed = old
            .iter()
            .filter(|(k, v)| new.get(*k) != Some(*v))
            .chain(new.iter().filter(|(k, v)| old.get(*k) != Some(*v)));
        for (tag, value) in changed {
            sqlx::query(
                "INSERT INTO placement_groups (tenant_id, tag, value, version)
                 VALUES ($1, $2, $3, 1)
                 ON CONFLICT (tenant_id, tag, value) DO UPDATE
                 SET version = placement_groups.version + 1",
            )
            .bind(tenant_id)
            .bind(tag)
            .bind(value)
            .execute(&mut *tx)
            .await?;
        }
        self.commit(tx).await?;
        Ok(())
    }

    /// Inserts many placed instances in one transaction, without host
    /// version checks: for imports and benchmarks, not for placement.
    pub async fn import_instances(&self, rows: &[(NewInstance, String)]) -> StoreResult<()> {
        let mut tx = self.pool().begin().await?;
        for (instance, host) in rows {
            insert_instance(&mut tx, instance, Some(host)).await?;
        }
        self.commit(tx).await?;
        self.analyze().await
    }

    pub async fn instance(&self, id: &str) -> StoreResult<Option<InstanceRow>> {
        let row = sqlx::query(&format!(
            "SELECT {READ_COLUMNS} FROM instances WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(instance).transpose()
    }

    pub async fn instance_by_name(
        &self,
        tenant_id: &str,
        name: &str,
    ) -> StoreResult<Option<InstanceRow>> {
        let row = sqlx::query(&format!(
            "SELECT {READ_COLUMNS} FROM instances WHERE tenant_id = $1 AND name = $2"
        ))
        .bind(tenant_id)
        .bind(name)
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(instance).transpose()
    }

    pub async fn name_taken(&self, tenant_id: &str, name: &str) -> StoreResult<bool> {
        Ok(self.instance_by_name(tenant_id, name).await?.is_some())
    }

    pub async fn list_instances(&self, f: &InstanceFilter) -> StoreResult<Vec<InstanceRow>> {
        let mut sql = format!("SELECT {READ_COLUMNS} FROM instances WHERE 1 = 1");
        let mut args: Vec<String> = Vec::new();
        // Appends `clause` with its `?` as the next `$n`; returns n.
        let mut param = |sql: &mut String, clause: &str, value: String| {
            args.push(value);
            sql.push_str(&clause.replace("?", &format!("${}", args.len())));
            args.len()
        };
        if let Some(t) = &f.tenant_id {
            param(&mut sql, " AND tenant_id = ?", t.clone());
        }
        if let Some(h) = &f.host {
            param(&mut sql, " AND host = ?", h.clone());
        }
        if let Some(o) = &f.observed {
            param(&mut sql, " AND observed = ?", enum_text(o));
        }
        for (k, v) in &f.tags {
            param(
                &mut sql,
                " AND instances.id IN (SELECT instance_id FROM instance_tags WHERE key = ?",
                k.clone(),
            );
            param(&mut sql, " AND value = ?)", v.clone());
        }
        if let Some(after) = &f.after {
            // `name:id` of the last row seen (names repeat across tenants).
            match after.split_once(':') {
                Some((name, id)) => {
                    let n = param(&mut sql, " AND (name > ?", name.to_string());
                    sql.push_str(&format!(" OR (name = ${n}"));
                    param(&mut sql, " AND id > ?))", id.to_string());
                }
                None => {
                    param(&mut sql, " AND name > ?", after.clone());
                }
            }
        }
        sql.push_str(&format!(" ORDER BY name, id LIMIT {}", f.limit.max(1)));
        let mut query = sqlx::query(&sql);
        for a in &args {
            query = query.bind(a);
        }
        let rows = query.fetch_all(self.pool()).await?;
        rows.iter().map(instance).collect()
    }

    /// Instances placed on `host`, of every tenant.
    pub async fn instances_on_host(&self, host: &str) -> StoreResult<Vec<InstanceRow>> {
        self.list_instances(&InstanceFilter {
            host: Some(host.to_string()),
            limit: u32::MAX,
            ..Default::default()
        })
        .await
    }

    /// Sets what the operation's targets should become and records the
    /// operation, in one transaction: never one without the other.
    /// `desired` None keeps each target's desired state (a migration).
    pub async fn begin_operation(
        &self,
        op: &super::OperationRow,
        desired: Option<DesiredState>,
        owner: &str,
        lease_until: i64,
    ) -> StoreResult<()> {
        let mut tx = self.pool().begin().await?;
        if desired == Some(DesiredState::Terminated) {
            // They stop counting where they are (groups, affinity). All
            // hosts first, in one statement, as every writer locks hosts
            // before instances.
            bump_hosts_of_all(&mut tx, &op.targets).await?;
        }
        for id in &op.targets {
            // A terminate decided meanwhile is not undone by another action.
            let done = sqlx::query(
                "UPDATE instances SET desired = COALESCE($1, desired), operation = $2,
                    updated_at = $3
                 WHERE id = $4 AND (desired <> 'terminated' OR $1 = 'terminated')",
            )
            .bind(desired.as_ref().map(enum_text))
            .bind(&op.id)
            .bind(now_ms())
            .bind(id)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() == 0 {
                return Err(StoreError::Contended);
            }
        }
        super::operations::insert_operation(&mut tx, op, owner, lease_until).await?;
        self.commit(tx).await?;
        Ok(())
    }

    /// Records what the host reported (or what an operation saw).
    pub async fn set_observed(
        &self,
        id: &str,
        observed: ObservedState,
        ip: Option<&str>,
        error: Option<&str>,
    ) -> StoreResult<()> {
        let mut tx = self.pool().begin().await?;
        let update = ObservedUpdate {
            id: id.to_string(),
            observed,
            ip: ip.map(str::to_string),
            error: error.map(str::to_string),
            seen_at: now_ms(),
        };
        apply_observed(&mut tx, &update).await?;
        self.commit(tx).await?;
        Ok(())
    }

    pub async fn delete_instance(&self, id: &str) -> StoreResult<()> {
        let mut tx = self.pool().begin().await?;
        bump_hosts_of(&mut tx, id).await?;
        super::volumes::detach_volumes(&mut tx, id).await?;
        sqlx::query("DELETE FROM instance_tags WHERE instance_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM instances WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        self.commit(tx).await?;
        Ok(())
    }

    /// How many of `tenant_id`'s instances with tag `key=value` each host
    /// holds.
    pub async fn group_counts(
        &self,
        tenant_id: &str,
        key: &str,
        value: &str,
    ) -> StoreResult<BTreeMap<String, u32>> {
        let rows = sqlx::query(
            "SELECT i.host AS host, COUNT(*) AS n FROM instance_tags t
             JOIN instances i ON i.id = t.instance_id
             WHERE t.key = $1 AND t.value = $2 AND i.tenant_id = $3 AND i.host IS NOT NULL
               AND i.desired <> 'terminated'
             GROUP BY i.host",
        )
        .bind(key)
        .bind(value)
        .bind(tenant_id)
        .fetch_all(self.pool())
        .await?;
        let moving = sqlx::query(
            "SELECT i.migrating_to AS host, COUNT(*) AS n FROM instance_tags t
             JOIN instances i ON i.id = t.instance_id
             WHERE t.key = $1 AND t.value = $2 AND i.tenant_id = $3
               AND i.migrating_to IS NOT NULL AND i.desired <> 'terminated'
             GROUP BY i.migrating_to",
        )
        .bind(key)
        .bind(value)
        .bind(tenant_id)
        .fetch_all(self.pool())
        .await?;
        // An instance on the move counts on both hosts.
        let mut counts = BTreeMap::new();
        for r in rows.iter().chain(&moving) {
            let host: String = r.try_get("host")?;
            let n: i64 = r.try_get("n")?;
            *counts.entry(host).or_insert(0) += n as u32;
        }
        Ok(counts)
    }
    /// The group's instances that carry a partition (tag `partition_tag`),
    /// as (host, partition, where it is rather than where it moves to):
    /// each on its host and on the host it is moving to.
    pub async fn group_partitions(
        &self,
        tenant_id: &str,
        key: &str,
        value: &str,
        partition_tag: &str,
    ) -> StoreResult<Vec<(String, u32, bool)>> {
        let rows = sqlx::query(
            "SELECT i.host AS host, i.migrating_to AS moving, p.value AS partition
             FROM instance_tags t
             JOIN instances i ON i.id = t.instance_id
             JOIN instance_tags p ON p.instance_id = i.id AND p.key = $4
             WHERE t.key = $1 AND t.value = $2 AND i.tenant_id = $3
               AND i.desired <> 'terminated'",
        )
        .bind(key)
        .bind(value)
        .bind(tenant_id)
        .bind(partition_tag)
        .fetch_all(self.pool())
        .await?;
        let mut members = Vec::new();
        for r in &rows {
            let Ok(partition) = r.try_get::<String, _>("partition")?.parse::<u32>() else {
                continue;
            };
            for (column, home) in [("host", true), ("moving", false)] {
                if let Some(host) = r.try_get::<Option<String>, _>(column)? {
                    members.push((host, partition, home));
                }
            }
        }
        Ok(members)
    }
}
