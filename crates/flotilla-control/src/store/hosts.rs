//! The host registry: what agents report in heartbeats, whether a host is
//! down or cordoned, and what its instances hold. `version` changes with
//! every placement on the host: a placement commits only if the version it
//! decided on is still current (optimistic concurrency across replicas).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use flotilla_api::control::HostHeartbeat;
use sqlx::{Any, Row, Transaction};

use super::instances::{insert_instance, NewInstance};
use super::operations::{insert_operation, OperationRow};
use super::{from_json, now_ms, to_json, Store, StoreError, StoreResult};

#[derive(Debug, Clone, PartialEq)]
pub struct HostRow {
    pub name: String,
    pub endpoint: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub labels: BTreeMap<String, String>,
    pub traits: BTreeSet<String>,
    pub down: bool,
    pub cordoned: bool,
    pub last_heartbeat: i64,
    pub registered_at: i64,
    pub version: i64,
    /// The agent's API token, as its last heartbeat gave it.
    pub agent_token: Option<String>,
    /// The host's VM subnet (CIDR), as its last heartbeat gave it.
    pub vm_subnet: Option<String>,
    /// The agent's TLS certificate fingerprint, as its last heartbeat gave it.
    pub tls_fingerprint: Option<String>,
    /// Disk space for VMs (0: not reported) and free now, per its last
    /// heartbeat.
    pub disk_mib: u64,
    pub disk_free_mib: Option<u64>,
    /// Held by the instances placed here.
    pub used_vcpus: u64,
    pub used_memory_mib: u64,
    pub used_disk_mib: u64,
    pub instances: u64,
}

/// What a host's instances hold.
#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    vcpus: u64,
    memory_mib: u64,
    disk_mib: u64,
    instances: u64,
}

/// A placement group's version as read before deciding: `(tenant, tag,
/// value, version)`; 0 for a group never placed under a limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupGuard {
    pub tenant_id: String,
    pub tag: String,
    pub value: String,
    pub version: i64,
}

/// Where an instance's address lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceAddress {
    pub ip: String,
    pub host: String,
    /// The instance's tenant: its network group.
    pub tenant_id: String,
    /// The host agent's endpoint (its address is the route's next hop).
    pub endpoint: String,
}

/// A decision to put an instance on a host, valid while the host's version
/// is still the one read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub host: String,
    pub host_version: i64,
}

const HOST_COLUMNS: &str = "name, endpoint, vcpus, memory_mib, labels, down, cordoned, \
                            last_heartbeat, registered_at, version, agent_token, vm_subnet, \
                            tls_fingerprint, disk_mib, disk_free_mib, traits";

fn host(row: &sqlx::any::AnyRow) -> StoreResult<HostRow> {
    let labels: String = row.try_get("labels")?;
    Ok(HostRow {
        name: row.try_get("name")?,
        endpoint: row.try_get("endpoint")?,
        vcpus: row.try_get::<i64, _>("vcpus")? as u32,
        memory_mib: row.try_get::<i64, _>("memory_mib")? as u64,
        labels: from_json("host labels", &labels)?,
        traits: from_json("host traits", &row.try_get::<String, _>("traits")?)?,
        down: row.try_get::<i64, _>("down")? != 0,
        cordoned: row.try_get::<i64, _>("cordoned")? != 0,
        last_heartbeat: row.try_get("last_heartbeat")?,
        registered_at: row.try_get("registered_at")?,
        version: row.try_get("version")?,
        agent_token: row.try_get("agent_token")?,
        vm_subnet: row.try_get("vm_subnet")?,
        tls_fingerprint: row.try_get("tls_fingerprint")?,
        disk_mib: row.try_get::<i64, _>("disk_mib")? as u64,
        disk_free_mib: row
            .try_get::<Option<i64>, _>("disk_free_mib")?
            .map(|m| m as u64),
        used_vcpus: 0,
        used_memory_mib: 0,
        used_disk_mib: 0,
        instances: 0,
    })
}

/// A new version for the placement group if it is still at the version the
/// decision was read at (false if another placement into the group got
/// there first). Called after the transaction's host updates: hosts, then
/// groups, is every writer's lock order.
pub(crate) async fn claim_group(
    tx: &mut Transaction<'_, Any>,
    group: Option<&GroupGuard>,
) -> StoreResult<bool> {
    let Some(g) = group else {
        return Ok(true);
    };
    let claimed = sqlx::query(
        "INSERT INTO placement_groups (tenant_id, tag, value, version)
         VALUES ($1, $2, $3, 1)
         ON CONFLICT (tenant_id, tag, value) DO UPDATE
         SET version = placement_groups.version + 1
         WHERE placement_groups.version = $4",
    )
    .bind(&g.tenant_id)
    .bind(&g.tag)
    .bind(&g.value)
    .bind(g.version)
    .execute(&mut **tx)
    .await?;
    Ok(claimed.rows_affected() > 0)
}

impl Store {
    /// The group's version now (0 if never placed under a limit).
    pub async fn group_version(&self, tenant_id: &str, tag: &str, value: &str) -> StoreResult<i64> {
        let v: Option<i64> = sqlx::query_scalar(
            "SELECT version FROM placement_groups WHERE tenant_id = $1 AND tag = $2 AND value = $3",
        )
        .bind(tenant_id)
        .bind(tag)
        .bind(value)
        .fetch_optional(self.pool())
        .await?;
        Ok(v.unwrap_or(0))
    }

    /// Registers the host or refreshes it; a host that was down is up again.
    /// Returns whether it was down before.
    pub async fn record_heartbeat(&self, name: &str, beat: &HostHeartbeat) -> StoreResult<bool> {
        let now = now_ms();
        let was_down: Option<i64> = sqlx::query_scalar("SELECT down FROM hosts WHERE name = $1")
            .bind(name)
            .fetch_optional(self.pool())
            .await?;
        sqlx::query(
            "INSERT INTO hosts (name, endpoint, vcpus, memory_mib, labels, down, cordoned,
                                last_heartbeat, registered_at, version, agent_token, vm_subnet,
                                vm_addresses, tls_fingerprint, disk_mib, disk_free_mib, traits)
             VALUES ($1, $2, $3, $4, $5, 0, 0, $6, $6, 0, $7, $8, $9, $10, $11, $12, $13)
             ON CONFLICT (name) DO UPDATE SET endpoint = $2, vcpus = $3, memory_mib = $4,
                labels = $5, down = 0, last_heartbeat = $6,
                agent_token = COALESCE($7, hosts.agent_token), vm_subnet = $8,
                vm_addresses = $9, tls_fingerprint = $10, disk_mib = $11, disk_free_mib = $12,
                traits = $13,
                version = CASE WHEN hosts.vcpus <> $3 OR hosts.memory_mib <> $4
                                    OR hosts.labels <> $5 OR hosts.down <> 0
                                    OR hosts.disk_mib <> $11 OR hosts.traits <> $13
                               THEN hosts.version + 1 ELSE hosts.version END",
        )
        .bind(name)
        .bind(&beat.endpoint)
        .bind(i64::from(beat.capacity.vcpus))
        .bind(beat.capacity.memory_mib as i64)
        .bind(to_json(&beat.labels))
        .bind(now)
        .bind(beat.agent_token.as_deref())
        .bind(beat.vm_subnet.as_deref())
        .bind(to_json(
            &beat
                .vms
                .iter()
                .filter_map(|v| v.ip.as_deref())
                .collect::<Vec<_>>(),
        ))
        .bind(beat.tls_fingerprint.as_deref())
        .bind(beat.disk.map_or(0, |d| d.capacity_mib as i64))
        .bind(beat.disk.map(|d| d.free_mib as i64))
        .bind(to_json(&beat.traits))
        .execute(self.pool())
        .await?;
        self.durable().await?;
        Ok(was_down == Some(1))
    }

    /// Every instance's address with its host and the host's endpoint: the
    /// cluster's VM routes.
    pub async fn instance_addresses(&self) -> StoreResult<Vec<InstanceAddress>> {
        let rows = sqlx::query(
            "SELECT i.ip, i.host, i.tenant_id, h.endpoint FROM instances i
             JOIN hosts h ON h.name = i.host WHERE i.ip IS NOT NULL",
        )
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(InstanceAddress {
                    ip: r.try_get("ip")?,
                    host: r.try_get("host")?,
                    tenant_id: r.try_get("tenant_id")?,
                    endpoint: r.try_get("endpoint")?,
                })
            })
            .collect()
    }

    /// Whether an instance other than `id` holds address `ip`.
    pub async fn address_held(&self, ip: &str, id: &str) -> StoreResult<bool> {
        let held: Option<String> =
            sqlx::query_scalar("SELECT id FROM instances WHERE ip = $1 AND id <> $2")
                .bind(ip)
                .bind(id)
                .fetch_optional(self.pool())
                .await?;
        Ok(held.is_some())
    }

    /// Every address an instance holds, or a VM on a host had at its last
    /// heartbeat (VMs made on a host directly included).
    pub async fn used_addresses(&self) -> StoreResult<Vec<String>> {
        let mut used: Vec<String> =
            sqlx::query_scalar("SELECT ip FROM instances WHERE ip IS NOT NULL")
                .fetch_all(self.pool())
                .await?;
        let reported: Vec<Option<String>> = sqlx::query_scalar("SELECT vm_addresses FROM hosts")
            .fetch_all(self.pool())
            .await?;
        for list in reported.into_iter().flatten() {
            used.extend(from_json::<Vec<String>>("host VM addresses", &list)?);
        }
        Ok(used)
    }

    /// Every host with what its instances hold, by name.
    pub async fn list_hosts(&self) -> StoreResult<Vec<HostRow>> {
        let rows = sqlx::query(&format!("SELECT {HOST_COLUMNS} FROM hosts ORDER BY name"))
            .fetch_all(self.pool())
            .await?;
        let mut hosts = rows.iter().map(host).collect::<StoreResult<Vec<_>>>()?;
        let usage = self.usage_by_host().await?;
        for h in &mut hosts {
            if let Some(u) = usage.get(&h.name) {
                (
                    h.used_vcpus,
                    h.used_memory_mib,
                    h.used_disk_mib,
                    h.instances,
                ) = (u.vcpus, u.memory_mib, u.disk_mib, u.instances);
            }
        }
        Ok(hosts)
    }

    /// The VM subnet host `name` reported, without its usage (the run
    /// path's address assignment needs nothing else).
    pub async fn host_subnet(&self, name: &str) -> StoreResult<Option<String>> {
        let subnet: Option<Option<String>> =
            sqlx::query_scalar("SELECT vm_subnet FROM hosts WHERE name = $1")
                .bind(name)
                .fetch_optional(self.pool())
                .await?;
        Ok(subnet.flatten())
    }

    pub async fn host(&self, name: &str) -> StoreResult<Option<HostRow>> {
        let row = sqlx::query(&format!("SELECT {HOST_COLUMNS} FROM hosts WHERE name = $1"))
            .bind(name)
            .fetch_optional(self.pool())
            .await?;
        let Some(mut h) = row.as_ref().map(host).transpose()? else {
            return Ok(None);
        };
        // Its instances, and those being moved to it (as `list_hosts`).
        for column in ["host", "migrating_to"] {
            let usage = sqlx::query(&format!(
                "SELECT CAST(COALESCE(SUM(vcpus), 0) AS BIGINT) AS v,
                        CAST(COALESCE(SUM(memory_mib), 0) AS BIGINT) AS m,
                        CAST(COALESCE(SUM(disk_mib), 0) AS BIGINT) AS d, COUNT(*) AS n
                 FROM instances WHERE {column} = $1"
            ))
            .bind(name)
            .fetch_one(self.pool())
            .await?;
            h.used_vcpus += usage.try_get::<i64, _>("v")? as u64;
            h.used_memory_mib += usage.try_get::<i64, _>("m")? as u64;
            h.used_disk_mib += usage.try_get::<i64, _>("d")? as u64;
            h.instances += usage.try_get::<i64, _>("n")? as u64;
        }
        // Its volumes, and those moving to it with their instance.
        let volumes: i64 = sqlx::query_scalar(
            "SELECT CAST(COALESCE(SUM(v.size_mib), 0) AS BIGINT) FROM volumes v
             LEFT JOIN instances i ON i.id = v.attached_to
             WHERE v.host = $1 OR i.migrating_to = $1",
        )
        .bind(name)
        .fetch_one(self.pool())
        .await?;
        h.used_disk_mib += volumes as u64;
        Ok(Some(h))
    }

    async fn usage_by_host(&self) -> StoreResult<HashMap<String, Usage>> {
        let rows = sqlx::query(
            "SELECT host, CAST(SUM(vcpus) AS BIGINT) AS v, CAST(SUM(memory_mib) AS BIGINT) AS m,
                    CAST(SUM(disk_mib) AS BIGINT) AS d, COUNT(*) AS n
             FROM instances WHERE host IS NOT NULL GROUP BY host",
        )
        .fetch_all(self.pool())
        .await?;
        // An instance being migrated holds room on its target too.
        let moving = sqlx::query(
            "SELECT migrating_to AS host, CAST(SUM(vcpus) AS BIGINT) AS v,
                    CAST(SUM(memory_mib) AS BIGINT) AS m, CAST(SUM(disk_mib) AS BIGINT) AS d,
                    COUNT(*) AS n
             FROM instances WHERE migrating_to IS NOT NULL GROUP BY migrating_to",
        )
        .fetch_all(self.pool())
        .await?;
        // Volumes take disk on their host, whatever they are attached to.
        let volumes = sqlx::query(
            "SELECT host, CAST(SUM(size_mib) AS BIGINT) AS d FROM volumes GROUP BY host",
        )
        .fetch_all(self.pool())
        .await?;
        // Volumes moving with their instance hold room on its target too.
        let moving_volumes = sqlx::query(
            "SELECT i.migrating_to AS host, CAST(SUM(v.size_mib) AS BIGINT) AS d
             FROM volumes v JOIN instances i ON i.id = v.attached_to
             WHERE i.migrating_to IS NOT NULL GROUP BY i.migrating_to",
        )
        .fetch_all(self.pool())
        .await?;
        let mut usage: HashMap<String, Usage> = HashMap::new();
        for r in volumes.iter().chain(&moving_volumes) {
            let host: String = r.try_get("host")?;
            usage.entry(host).or_default().disk_mib += r.try_get::<i64, _>("d")? as u64;
        }
        for r in rows.iter().chain(&moving) {
            let host: String = r.try_get("host")?;
            let u = usage.entry(host).or_default();
            u.vcpus += r.try_get::<i64, _>("v")? as u64;
            u.memory_mib += r.try_get::<i64, _>("m")? as u64;
            u.disk_mib += r.try_get::<i64, _>("d")? as u64;
            u.instances += r.try_get::<i64, _>("n")? as u64;
        }
        Ok(usage)
    }

    pub async fn set_cordoned(&self, name: &str, cordoned: bool) -> StoreResult<bool> {
        // A new version: a placement decided before the change must not commit.
        let done =
            sqlx::query("UPDATE hosts SET cordoned = $1, version = version + 1 WHERE name = $2")
                .bind(i64::from(cordoned))
                .bind(name)
                .execute(self.pool())
                .await?;
        self.durable().await?;
        Ok(done.rows_affected() > 0)
    }

    /// Marks down the hosts whose last heartbeat is older than `before`;
    /// their instances become `unknown`. Returns the hosts marked.
    pub async fn mark_stale_hosts_down(&self, before: i64) -> StoreResult<Vec<String>> {
        let mut tx = self.pool().begin().await?;
        let names: Vec<String> =
            sqlx::query_scalar("SELECT name FROM hosts WHERE down = 0 AND last_heartbeat < $1")
                .bind(before)
                .fetch_all(&mut *tx)
                .await?;
        let mut marked = Vec::new();
        for name in names {
            // Checked again: another replica may have recorded a heartbeat
            // since the SELECT.
            let done = sqlx::query(
                "UPDATE hosts SET down = 1, version = version + 1
                 WHERE name = $1 AND down = 0 AND last_heartbeat < $2",
            )
            .bind(&name)
            .bind(before)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() == 0 {
                continue;
            }
            sqlx::query(
                "UPDATE instances SET observed = 'unknown', updated_at = $1
                 WHERE host = $2 AND observed NOT IN ('pending', 'terminated')",
            )
            .bind(now_ms())
            .bind(&name)
            .execute(&mut *tx)
            .await?;
            marked.push(name);
        }
        self.commit(tx).await?;
        Ok(marked)
    }

    /// Inserts `instance` on the placement's host if that host's version is
    /// still the one the placement was decided on; `Contended` otherwise.
    pub async fn commit_placement(
        &self,
        instance: &NewInstance,
        placement: &Placement,
    ) -> StoreResult<()> {
        let placed = [(instance.clone(), placement.host.clone())];
        let versions = BTreeMap::from([(placement.host.clone(), placement.host_version)]);
        self.commit_placed(&placed, &versions, None, &[], None)
            .await
    }

    /// Places a whole batch in one transaction: every host it uses must
    /// still be at the version the decisions were made on (`Contended`
    /// otherwise, and nothing is written); the instances and the operation
    /// that creates them appear together or not at all. `volumes` (ids) are
    /// attached to the batch's one instance (a run with volumes has one).
    #[allow(clippy::too_many_arguments)]
    pub async fn commit_run(
        &self,
        placed: &[(NewInstance, String)],
        host_versions: &BTreeMap<String, i64>,
        group: Option<&GroupGuard>,
        volumes: &[String],
        op: &OperationRow,
        owner: &str,
        lease_until: i64,
    ) -> StoreResult<()> {
        self.commit_placed(
            placed,
            host_versions,
            group,
            volumes,
            Some((op, owner, lease_until)),
        )
        .await
    }

    async fn commit_placed(
        &self,
        placed: &[(NewInstance, String)],
        host_versions: &BTreeMap<String, i64>,
        group: Option<&GroupGuard>,
        volumes: &[String],
        op: Option<(&OperationRow, &str, i64)>,
    ) -> StoreResult<()> {
        let mut tx = self.pool().begin().await?;
        // Hosts (in name order) before the group, as every writer locks them.
        for (host, version) in host_versions {
            let claimed = sqlx::query(
                "UPDATE hosts SET version = version + 1 WHERE name = $1 AND version = $2",
            )
            .bind(host)
            .bind(version)
            .execute(&mut *tx)
            .await?;
            if claimed.rows_affected() == 0 {
                return Err(StoreError::Contended);
            }
        }
        if !claim_group(&mut tx, group).await? {
            return Err(StoreError::Contended);
        }
        for (instance, host) in placed {
            insert_instance(&mut tx, instance, Some(host)).await?;
        }
        if let (false, [(instance, host)]) = (volumes.is_empty(), placed) {
            super::volumes::attach_volumes(
                &mut tx,
                &instance.id,
                &instance.tenant_id,
                host,
                volumes,
            )
            .await?;
        } else if !volumes.is_empty() {
            return Err(StoreError::Refused(
                "volumes are attached to a run of one instance".into(),
            ));
        }
        if let Some((op, owner, lease_until)) = op {
            insert_operation(&mut tx, op, owner, lease_until).await?;
        }
        self.commit(tx).await?;
        Ok(())
    }
}
