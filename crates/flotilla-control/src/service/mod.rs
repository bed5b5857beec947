//! [`ControlPlane`]: the typed core the HTTP handlers call. Tenancy is
//! enforced here: every lookup of a tenant's resource goes through the
//! caller, and another tenant's resource is simply not found.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_api::control::{
    CloneInstanceRequest, CreateTokenRequest, DesiredState, FleetSelector, HostHeartbeat,
    ObservedState, PlacementExplanation, PlacementPolicy, PolicyDocument, RunInstancesRequest,
};
use flotilla_api::{ErrorCode, VmState};

use crate::agents::AgentClient;
use crate::auth::{hash_secret, new_secret, Caller};
use crate::error::{ControlError, ControlResult};
use crate::fleet_cache::{self, FleetView};
use crate::placement::{self, Demand, HostView, Sourced, DEFAULT_GROUP_TAG};
use crate::store::{
    new_id, now_ms, GroupGuard, HostRow, InstanceAddress, InstanceFilter, InstanceRow, NewInstance,
    OperationRow, PolicyRow, Store, StoreError, TenantRow,
};
use crate::workflows::{self, OperationInput};

mod hosts;
mod instances;
mod network;
mod operations;
mod placing;
mod policies;
mod snapshots;
mod tenants;
mod volumes;

pub use volumes::MAX_VOLUME_MIB;

/// Settings of one control plane replica.
#[derive(Debug, Clone)]
pub struct ControlSettings {
    /// A host whose last heartbeat is older than this is down.
    pub host_down_after: Duration,
    /// How long a replica holds an operation without renewing it.
    pub lease: Duration,
    /// Most instances one run may ask for.
    pub max_run_count: u32,
    /// A snapshot still `creating` after this (its host did not answer
    /// when it was taken) is settled with its host: ready if the host has
    /// it, gone if not.
    pub snapshot_settle_after: Duration,
}

impl Default for ControlSettings {
    fn default() -> Self {
        ControlSettings {
            host_down_after: Duration::from_secs(15),
            lease: Duration::from_secs(20),
            max_run_count: 100,
            // Longer than an agent call may take (see `agents`).
            snapshot_settle_after: Duration::from_secs(300),
        }
    }
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub store: Store,
    pub agents: AgentClient,
    pub settings: ControlSettings,
    /// This replica's name in operation leases.
    pub replica: String,
    pub fleet: tokio::sync::Mutex<FleetView>,
    /// The cluster's VM routes as last read, shared by heartbeat replies.
    pub routes: tokio::sync::Mutex<network::RouteTable>,
    /// Operations this replica drives now.
    pub driving: std::sync::Mutex<std::collections::HashSet<String>>,
}

#[derive(Debug, Clone)]
pub struct ControlPlane {
    pub(crate) inner: Arc<Inner>,
}

/// An instance changed this recently is not called unknown for missing
/// from a heartbeat (the heartbeat may predate it).
const RECENT_MS: i64 = 10_000;

/// What an operation saw of an instance outranks heartbeats for this long.
const JUST_SEEN_MS: i64 = 2_000;

/// How long an instance meant to run is seen stopped or crashed before it
/// is started again.
const RESTART_AFTER_MS: i64 = 5_000;

/// How many times a placement retries after losing a race for a host.
const PLACEMENT_ATTEMPTS: usize = 16;

pub fn check_name(what: &str, name: &str) -> ControlResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.as_bytes()[0].is_ascii_lowercase()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ControlError::invalid(format!(
            "invalid {what} name {name:?}: use 1-63 characters of a-z, 0-9 and '-', starting with a letter"
        )))
    }
}

/// Tag keys are 1-63 characters of a-z, A-Z, 0-9 and `._/-`; values at
/// most 255 characters, any but control characters.
pub fn check_tags(tags: &BTreeMap<String, String>) -> ControlResult<()> {
    for (key, value) in tags {
        let key_ok = !key.is_empty()
            && key.len() <= 63
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b));
        if !key_ok {
            return Err(ControlError::invalid(format!(
                "invalid tag key {key:?}: use 1-63 characters of a-z, A-Z, 0-9, '.', '_', '/' and '-'"
            )));
        }
        if value.len() > 255 || value.chars().any(char::is_control) {
            return Err(ControlError::invalid(format!(
                "invalid value of tag {key:?}: at most 255 characters, no control characters"
            )));
        }
    }
    Ok(())
}

impl ControlPlane {
    pub fn new(store: Store, settings: ControlSettings) -> ControlPlane {
        ControlPlane {
            inner: Arc::new(Inner {
                store,
                agents: AgentClient::default(),
                settings,
                replica: new_id("replica"),
                fleet: Default::default(),
                routes: Default::default(),
                driving: Default::default(),
            }),
        }
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Marks `op` driven here; false if it already is.
    pub(crate) fn start_driving(&self, op: &str) -> bool {
        let mut set = self.inner.driving.lock().unwrap_or_else(|e| e.into_inner());
        set.insert(op.to_string())
    }

    pub(crate) fn stop_driving(&self, op: &str) {
        let mut set = self.inner.driving.lock().unwrap_or_else(|e| e.into_inner());
        set.remove(op);
    }

    pub(crate) fn lease_until(&self) -> i64 {
        now_ms() + self.inner.settings.lease.as_millis() as i64
    }
}

/// Whose resources a list shows: the caller's tenant's; an admin's, every
/// tenant's (`None`) or `tenant`'s.
pub(super) fn list_scope(caller: &Caller, tenant: Option<&str>) -> ControlResult<Option<String>> {
    match (&caller.tenant_id, tenant) {
        (Some(own), _) => Ok(Some(own.clone())),
        (None, t) if caller.admin => Ok(t.map(str::to_string)),
        (None, _) => Err(no_tenant()),
    }
}

pub(super) fn no_tenant() -> ControlError {
    ControlError::new(ErrorCode::PermissionDenied, "this token acts for no tenant")
}

pub(super) fn require_admin(caller: &Caller) -> ControlResult<()> {
    if caller.admin {
        Ok(())
    } else {
        Err(ControlError::new(
            ErrorCode::PermissionDenied,
            "this needs an admin token",
        ))
    }
}

pub(super) fn no_host_error(name: &str, e: &PlacementExplanation) -> ControlError {
    let reasons: Vec<String> = e
        .hosts
        .iter()
        .filter_map(|v| v.rejected.as_ref().map(|r| format!("{}: {r}", v.host)))
        .collect();
    let message = if reasons.is_empty() {
        format!("no host can take instance {name:?}: no hosts are registered")
    } else {
        format!("no host can take instance {name:?}: {}", reasons.join("; "))
    };
    ControlError::new(ErrorCode::InsufficientCapacity, message)
        .with_hint("POST /v1/placement/explain shows each host's verdict")
}

pub(crate) fn observed_from_vm(state: VmState) -> ObservedState {
    match state {
        // A VM being migrated away runs on its host until it is gone.
        VmState::Running | VmState::Migrating => ObservedState::Running,
        VmState::Stopped => ObservedState::Stopped,
        VmState::Suspended => ObservedState::Suspended,
        VmState::Crashed => ObservedState::Failed,
        _ => ObservedState::Starting,
    }
}
