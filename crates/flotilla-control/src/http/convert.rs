//! Store rows to API resources.

use std::time::{Duration, UNIX_EPOCH};

use flotilla_api::control::{
    Host, HostDisk, HostState, Instance, Operation, Policy, Snapshot, SnapshotState, Tenant, Volume,
};
use flotilla_api::Resources;

use crate::store::{
    HostRow, InstanceRow, OperationRow, PolicyRow, SnapshotRow, TenantRow, VolumeRow,
};

/// Milliseconds since the epoch as RFC 3339 (UTC, milliseconds).
pub fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

pub fn tenant(t: TenantRow) -> Tenant {
    Tenant {
        id: t.id,
        name: t.name,
        created_at: rfc3339(t.created_at),
    }
}

pub fn host(h: HostRow) -> Host {
    Host {
        state: if h.down {
            HostState::Down
        } else {
            HostState::Up
        },
        cordoned: h.cordoned,
        capacity: Resources {
            vcpus: h.vcpus,
            memory_mib: h.memory_mib,
        },
        allocated: Resources {
            vcpus: h.used_vcpus as u32,
            memory_mib: h.used_memory_mib,
        },
        disk: (h.disk_mib > 0).then(|| HostDisk {
            capacity_mib: h.disk_mib,
            allocated_mib: h.used_disk_mib,
            free_mib: h.disk_free_mib.unwrap_or(0),
        }),
        instances: h.instances,
        labels: h.labels,
        traits: h.traits,
        vm_subnet: h.vm_subnet,
        tls_fingerprint: h.tls_fingerprint,
        last_heartbeat: rfc3339(h.last_heartbeat),
        registered_at: rfc3339(h.registered_at),
        name: h.name,
        endpoint: h.endpoint,
    }
}

pub fn instance(i: InstanceRow) -> Instance {
    Instance {
        id: i.id,
        name: i.name,
        tenant: i.tenant_id,
        host: i.host,
        desired: i.desired,
        observed: i.observed,
        image: i.image,
        vcpus: i.vcpus,
        memory_mib: i.memory_mib,
        disk_mib: i.disk_mib,
        from_snapshot: i.from_snapshot,
        ip: i.ip,
        tags: i.tags,
        operation: i.operation,
        last_error: i.last_error,
        created_at: rfc3339(i.created_at),
        updated_at: rfc3339(i.updated_at),
        volumes: Vec::new(),
    }
}

pub fn operation(o: OperationRow) -> Operation {
    Operation {
        id: o.id,
        tenant: o.tenant_id,
        kind: o.kind,
        targets: o.targets,
        state: o.state,
        steps: o.steps,
        error: o.error,
        created_at: rfc3339(o.created_at),
        updated_at: rfc3339(o.updated_at),
    }
}

pub fn policy(p: PolicyRow) -> Policy {
    Policy {
        name: p.name,
        tenant: (!p.tenant_id.is_empty()).then_some(p.tenant_id),
        fleet: p.fleet,
        placement: p.placement,
        updated_at: rfc3339(p.updated_at),
    }
}

pub fn volume(v: VolumeRow) -> Volume {
    Volume {
        state: v.state,
        id: v.id,
        name: v.name,
        tenant: v.tenant_id,
        host: v.host,
        size_mib: v.size_mib,
        attached_to: v.attached_name,
        created_at: rfc3339(v.created_at),
    }
}

pub fn snapshot(s: SnapshotRow) -> Snapshot {
    Snapshot {
        state: if s.ready() {
            SnapshotState::Ready
        } else {
            SnapshotState::Creating
        },
        id: s.id,
        name: s.name,
        tenant: s.tenant_id,
        host: s.host,
        instance: s.instance_name,
        image: s.image,
        vcpus: s.vcpus,
        memory_mib: s.memory_mib,
        created_at: rfc3339(s.created_at),
    }
}
