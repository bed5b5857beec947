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
    new_id, now_ms, GroupGuard, HostRow, InstanceFilter, InstanceRow, NewInstance, OperationRow,
    PolicyRow, Store, StoreError, TenantRow,
};
use crate::workflows::{self, OperationInput};

/// Settings of one control plane replica.
#[derive(Debug, Clone)]
pub struct ControlSettings {
    /// A host whose last heartbeat is older than this is down.
    pub host_down_after: Duration,
    /// How long a replica holds an operation without renewing it.
    pub lease: Duration,
    /// Most instances one run may ask for.
    pub max_run_count: u32,
}

impl Default for ControlSettings {
    fn default() -> Self {
        ControlSettings {
            host_down_after: Duration::from_secs(15),
            lease: Duration::from_secs(20),
            max_run_count: 100,
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

impl ControlPlane {
    pub fn new(store: Store, settings: ControlSettings) -> ControlPlane {
        ControlPlane {
            inner: Arc::new(Inner {
                store,
                agents: AgentClient::default(),
                settings,
                replica: new_id("replica"),
                fleet: Default::default(),
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

    // ---- tokens and tenants ----

    /// The caller behind a bearer secret.
    pub async fn authenticate(&self, secret: &str) -> ControlResult<Caller> {
        let token = self.store().token_by_hash(&hash_secret(secret)).await?;
        let token = token.ok_or_else(|| {
            ControlError::new(ErrorCode::Unauthenticated, "unknown API token")
                .with_hint("ask an admin for a token: flotilla token create --tenant NAME")
        })?;
        Ok(Caller {
            token_id: token.id,
            tenant_id: token.tenant_id,
            admin: token.admin,
            host: token.host,
        })
    }

    /// Makes sure an admin token with `secret` exists (for a bootstrap
    /// token given by the operator).
    pub async fn ensure_admin_token(&self, secret: &str) -> ControlResult<()> {
        if self
            .store()
            .token_by_hash(&hash_secret(secret))
            .await?
            .is_none()
        {
            // Another replica starting with the same token may win the race.
            let created = self
                .store()
                .create_token(
                    &new_id("tok"),
                    &hash_secret(secret),
                    None,
                    true,
                    Some("bootstrap"),
                )
                .await;
            match created {
                Ok(()) | Err(StoreError::Duplicate(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    pub async fn has_admin_token(&self) -> ControlResult<bool> {
        Ok(self.store().has_admin_token().await?)
    }

    pub async fn create_tenant(&self, caller: &Caller, name: &str) -> ControlResult<TenantRow> {
        require_admin(caller)?;
        check_name("tenant", name)?;
        Ok(self.store().create_tenant(&new_id("t"), name).await?)
    }

    pub async fn list_tenants(&self, caller: &Caller) -> ControlResult<Vec<TenantRow>> {
        require_admin(caller)?;
        Ok(self.store().list_tenants().await?)
    }

    pub async fn tenant_name(&self, id: &str) -> ControlResult<String> {
        Ok(self
            .store()
            .tenant_by_id(id)
            .await?
            .map(|t| t.name)
            .unwrap_or_else(|| id.to_string()))
    }

    /// Issues a token; returns `(id, tenant id, secret)`.
    /// Issues a token: a tenant's, an admin's, or a host's (it may only
    /// heartbeat as that host). Returns `(id, tenant id, secret)`.
    pub async fn create_token(
        &self,
        caller: &Caller,
        req: &CreateTokenRequest,
    ) -> ControlResult<(String, Option<String>, String)> {
        require_admin(caller)?;
        let kinds = usize::from(req.tenant.is_some())
            + usize::from(req.admin)
            + usize::from(req.host.is_some());
        if kinds != 1 {
            return Err(ControlError::invalid(
                "a token is one of: a tenant's (\"tenant\"), an admin token (\"admin\": true), or a host's (\"host\")",
            ));
        }
        let tenant_id = match &req.tenant {
            Some(name) => Some(
                self.store()
                    .tenant_by_name(name)
                    .await?
                    .ok_or_else(|| ControlError::not_found(format!("no tenant {name:?}")))?
                    .id,
            ),
            None => None,
        };
        if let Some(host) = &req.host {
            check_name("host", host)?;
        }
        let secret = new_secret();
        let id = new_id("tok");
        self.store()
            .create_scoped_token(
                &id,
                &hash_secret(&secret),
                tenant_id.as_deref(),
                req.admin,
                req.host.as_deref(),
                req.description.as_deref(),
            )
            .await?;
        Ok((id, tenant_id, secret))
    }

    // ---- hosts ----

    /// A heartbeat: registers or refreshes the host and reconciles what it
    /// reports with what the store expects there.
    pub async fn heartbeat(
        &self,
        caller: &Caller,
        name: &str,
        beat: &HostHeartbeat,
    ) -> ControlResult<()> {
        if !(caller.admin || caller.host.as_deref() == Some(name)) {
            return Err(ControlError::new(
                ErrorCode::PermissionDenied,
                format!("this token may not heartbeat as host {name:?}"),
            )
            .with_hint("agents use a host token: flotilla token create --host NAME"));
        }
        check_name("host", name)?;
        if !(beat.endpoint.starts_with("http://") || beat.endpoint.starts_with("https://")) {
            return Err(ControlError::invalid(format!(
                "invalid endpoint {:?}: expected http://HOST:PORT",
                beat.endpoint
            )));
        }
        let known = self.store().host(name).await?;
        let was_down = self.store().record_heartbeat(name, beat).await?;
        if was_down {
            tracing::info!(host = name, "host is up again");
        }
        let changed = match &known {
            None => true,
            Some(h) => {
                was_down
                    || h.vcpus != beat.capacity.vcpus
                    || h.memory_mib != beat.capacity.memory_mib
                    || h.labels != beat.labels
            }
        };
        if changed {
            self.fleet_changed().await;
        }
        self.reconcile_host(name, beat).await
    }

    /// Observed state of the instances on `host` from its report. An
    /// instance the host does not report is `unknown` (unless it is still
    /// being created); nothing is dropped.
    async fn reconcile_host(&self, host: &str, beat: &HostHeartbeat) -> ControlResult<()> {
        let reported: BTreeMap<&str, _> = beat.vms.iter().map(|v| (v.name.as_str(), v)).collect();
        for inst in self.store().instances_on_host(host).await? {
            if inst.desired == DesiredState::Terminated {
                self.finish_termination(&inst, reported.contains_key(inst.id.as_str()))
                    .await?;
                continue;
            }
            let observed = match reported.get(inst.id.as_str()) {
                Some(vm) => observed_from_vm(vm.state),
                None if inst.observed == ObservedState::Pending => continue,
                // Just made: the heartbeat may have been composed before.
                None if now_ms() - inst.updated_at < RECENT_MS => continue,
                None => ObservedState::Unknown,
            };
            let ip = reported
                .get(inst.id.as_str())
                .and_then(|vm| vm.ip.as_deref());
            if observed != inst.observed || (ip.is_some() && ip != inst.ip.as_deref()) {
                self.store()
                    .set_observed(&inst.id, observed, ip, inst.last_error.as_deref())
                    .await?;
            }
        }
        Ok(())
    }

    /// An instance meant to be gone whose terminate is not running (it
    /// failed, say while its host was down): gone from its host too, its
    /// record goes; still there, a new terminate starts.
    async fn finish_termination(&self, inst: &InstanceRow, on_host: bool) -> ControlResult<()> {
        if let Some(op_id) = &inst.operation {
            if let Some(op) = self.store().operation(op_id).await? {
                if op.state == flotilla_api::control::OperationState::Running {
                    return Ok(());
                }
            }
        }
        if !on_host {
            tracing::info!(instance = %inst.name, "its VM is gone: terminate completed");
            return Ok(self.store().delete_instance(&inst.id).await?);
        }
        tracing::info!(instance = %inst.name, "still on its host: terminating again");
        let op_id = new_id("op");
        self.begin_operation(
            Some(&inst.tenant_id),
            &op_id,
            OperationInput::Terminate,
            vec![inst.id.clone()],
            DesiredState::Terminated,
        )
        .await?;
        Ok(())
    }

    pub async fn list_hosts(&self, caller: &Caller) -> ControlResult<Vec<HostRow>> {
        require_admin(caller)?;
        Ok(self.store().list_hosts().await?)
    }

    pub async fn host(&self, caller: &Caller, name: &str) -> ControlResult<HostRow> {
        require_admin(caller)?;
        self.store()
            .host(name)
            .await?
            .ok_or_else(|| ControlError::not_found(format!("no host {name:?}")))
    }

    pub async fn set_cordoned(
        &self,
        caller: &Caller,
        name: &str,
        cordoned: bool,
    ) -> ControlResult<HostRow> {
        require_admin(caller)?;
        if !self.store().set_cordoned(name, cordoned).await? {
            return Err(ControlError::not_found(format!("no host {name:?}")));
        }
        self.fleet_changed().await;
        self.host(caller, name).await
    }

    /// Marks down the hosts that missed their heartbeats.
    pub async fn check_hosts(&self) -> ControlResult<()> {
        let before = now_ms() - self.inner.settings.host_down_after.as_millis() as i64;
        let down = self.store().mark_stale_hosts_down(before).await?;
        if !down.is_empty() {
            self.fleet_changed().await;
        }
        for host in down {
            tracing::warn!(
                host,
                "host missed its heartbeats: marked down, its instances unknown"
            );
        }
        Ok(())
    }

    // ---- instances ----

    /// The tenant a call acts for: a tenant token's own; for an admin, the
    /// one named. Other tokens (a host's) act for no tenant.
    fn tenant_of(&self, caller: &Caller, tenant: Option<&str>) -> ControlResult<String> {
        match (&caller.tenant_id, tenant) {
            (Some(own), _) => Ok(own.clone()),
            (None, Some(t)) if caller.admin => Ok(t.to_string()),
            (None, None) if caller.admin => Err(ControlError::invalid(
                "an admin token acts on instances only with ?tenant=ID",
            )),
            (None, _) => Err(no_tenant()),
        }
    }

    pub async fn instance(
        &self,
        caller: &Caller,
        tenant: Option<&str>,
        name: &str,
    ) -> ControlResult<InstanceRow> {
        let tenant_id = self.tenant_of(caller, tenant)?;
        match self.store().instance_by_name(&tenant_id, name).await? {
            Some(i) if caller.may_access(&i.tenant_id) => Ok(i),
            _ => Err(ControlError::not_found(format!("no instance {name:?}"))),
        }
    }

    pub async fn list_instances(
        &self,
        caller: &Caller,
        mut filter: InstanceFilter,
    ) -> ControlResult<Vec<InstanceRow>> {
        if !caller.admin {
            filter.tenant_id = Some(caller.tenant_id.clone().ok_or_else(no_tenant)?);
        }
        Ok(self.store().list_instances(&filter).await?)
    }

    /// Hosts as the placement sees them, with each one's count of the group.
    /// Every host read from the store (for explain and clones), with its
    /// count of the group and its version.
    async fn host_views(
        &self,
        tenant_id: &str,
        group: Option<(&str, &str)>,
    ) -> ControlResult<(Vec<HostView>, BTreeMap<String, i64>)> {
        let hosts = self.store().list_hosts().await?;
        let counts = self.group_counts(tenant_id, group).await?;
        let versions = hosts.iter().map(|h| (h.name.clone(), h.version)).collect();
        let views = hosts
            .into_iter()
            .map(|h| {
                let count = counts.get(&h.name).copied().unwrap_or(0);
                HostView {
                    group_count: count,
                    ..fleet_cache::view_of(h)
                }
            })
            .collect();
        Ok((views, versions))
    }

    /// The group's version, when the policy limits the group (per host or
    /// per label): commits under a limit are serialised per group.
    async fn group_guard(
        &self,
        tenant_id: &str,
        group: Option<(&str, &str)>,
        policy: &PlacementPolicy,
    ) -> ControlResult<Option<GroupGuard>> {
        let limited = policy.max_per_host.is_some() || !policy.max_per_label.is_empty();
        let Some((tag, value)) = group.filter(|_| limited) else {
            return Ok(None);
        };
        Ok(Some(GroupGuard {
            tenant_id: tenant_id.to_string(),
            tag: tag.to_string(),
            value: value.to_string(),
            version: self.store().group_version(tenant_id, tag, value).await?,
        }))
    }

    /// For each affinity rule of the policy: the hosts holding an instance
    /// of the tenant with the rule's tag value.
    async fn affinity_hosts(
        &self,
        tenant_id: &str,
        policy: &PlacementPolicy,
    ) -> ControlResult<Vec<std::collections::BTreeSet<String>>> {
        let mut out = Vec::with_capacity(policy.affinity.len());
        for rule in &policy.affinity {
            let counts = self
                .store()
                .group_counts(tenant_id, &rule.tag, &rule.value)
                .await?;
            out.push(counts.into_keys().collect());
        }
        Ok(out)
    }

    async fn group_counts(
        &self,
        tenant_id: &str,
        group: Option<(&str, &str)>,
    ) -> ControlResult<BTreeMap<String, u32>> {
        Ok(match group {
            Some((tag, value)) => self.store().group_counts(tenant_id, tag, value).await?,
            None => BTreeMap::new(),
        })
    }

    fn group_of<'a>(
        policy: &'a PlacementPolicy,
        tags: &'a BTreeMap<String, String>,
    ) -> Option<(&'a str, &'a str)> {
        let tag = policy.group_tag.as_deref().unwrap_or(DEFAULT_GROUP_TAG);
        tags.get(tag).map(|v| (tag, v.as_str()))
    }

    /// `max_per_host` counts the instances sharing the group tag's value:
    /// an instance without the tag would escape it silently.
    fn check_group(policy: &PlacementPolicy, tags: &BTreeMap<String, String>) -> ControlResult<()> {
        let limited = match (policy.max_per_host, policy.max_per_label.iter().next()) {
            (Some(max), _) => Some(format!("max_per_host {max}")),
            (None, Some((key, max))) => Some(format!("max_per_label {key} {max}")),
            (None, None) => None,
        };
        if let Some(rule) = limited {
            if Self::group_of(policy, tags).is_none() {
                let tag = policy.group_tag.as_deref().unwrap_or(DEFAULT_GROUP_TAG);
                return Err(ControlError::invalid(format!(
                    "{rule} limits the instances sharing a value of tag {tag:?}, and this request has no such tag"
                ))
                .with_hint(format!("add --tag {tag}=NAME, or set group_tag in the policy")));
            }
        }
        Ok(())
    }

    pub async fn explain(
        &self,
        caller: &Caller,
        tenant: Option<&str>,
        req: &RunInstancesRequest,
    ) -> ControlResult<PlacementExplanation> {
        let tenant_id = self.tenant_of(caller, tenant)?;
        let policy = self
            .effective_policy(&tenant_id, &req.tags, req.placement.as_ref())
            .await?;
        Self::check_group(&policy, &req.tags)?;
        let (views, _) = self
            .host_views(&tenant_id, Self::group_of(&policy, &req.tags))
            .await?;
        Ok(placement::explain(
            &views,
            &Demand {
                full_domains: placement::full_domains(
                    &policy,
                    views.iter().map(|v| (&v.labels, v.group_count)),
                ),
                affinity_hosts: self.affinity_hosts(&tenant_id, &policy).await?,
                ..Demand::new(req.vcpus, req.memory_mib)
            },
            &policy,
        ))
    }

    /// Places and records the instances, then starts the `run` operation
    /// that creates them on their hosts. Nothing is recorded if any
    /// instance cannot be placed.
    pub async fn run_instances(
        &self,
        caller: &Caller,
        tenant: Option<&str>,
        req: &RunInstancesRequest,
    ) -> ControlResult<(OperationRow, Vec<InstanceRow>)> {
        let tenant_id = self.tenant_of(caller, tenant)?;
        if self.store().tenant_by_id(&tenant_id).await?.is_none() {
            return Err(ControlError::not_found(format!("no tenant {tenant_id:?}")));
        }
        check_name("instance", &req.name)?;
        let max = self.inner.settings.max_run_count;
        if req.count == 0 || req.count > max {
            return Err(ControlError::invalid(format!(
                "count {} is out of range (1 to {max})",
                req.count
            )));
        }
        if req.vcpus == 0 || req.vcpus > 64 {
            return Err(ControlError::invalid(format!(
                "vcpus {} is out of range (1 to 64)",
                req.vcpus
            )));
        }
        if !(64..=1024 * 1024).contains(&req.memory_mib) {
            return Err(ControlError::invalid(format!(
                "memory_mib {} is out of range (64 to 1048576)",
                req.memory_mib
            )));
        }
        let policy = self
            .effective_policy(&tenant_id, &req.tags, req.placement.as_ref())
            .await?;
        Self::check_group(&policy, &req.tags)?;
        let names: Vec<String> = match req.count {
            1 => vec![req.name.clone()],
            n => (1..=n).map(|i| format!("{}-{i}", req.name)).collect(),
        };
        for name in &names {
            check_name("instance", name)?;
            if self.store().name_taken(&tenant_id, name).await? {
                return Err(ControlError::new(
                    ErrorCode::AlreadyExists,
                    format!("instance {name:?} already exists"),
                ));
            }
        }
        let op_id = new_id("op");
        let news: Vec<NewInstance> = names
            .iter()
            .map(|name| NewInstance {
                id: new_id("i"),
                tenant_id: tenant_id.clone(),
                name: name.clone(),
                image: req.image.clone(),
                vcpus: req.vcpus,
                memory_mib: req.memory_mib,
                tags: req.tags.clone(),
                operation: Some(op_id.clone()),
            })
            .collect();
        let targets = news.iter().map(|n| n.id.clone()).collect();
        let op = self.new_operation(Some(&tenant_id), &op_id, OperationInput::Run, targets);
        let demand = Demand::new(req.vcpus, req.memory_mib);
        self.place_run(&tenant_id, &news, &demand, &policy, &op)
            .await?;
        workflows::spawn(self.clone(), op.clone());
        let mut placed = Vec::with_capacity(news.len());
        for new in &news {
            if let Some(row) = self.store().instance(&new.id).await? {
                placed.push(row);
            }
        }
        Ok((op, placed))
    }

    /// Decides where each of `news` goes on the cached view of the fleet
    /// (each decision counting the ones before it), then commits them all
    /// with the operation that creates them in one transaction, valid only
    /// if no host used changed since it was read; otherwise those hosts are
    /// reread and the batch decided again. All or nothing.
    async fn place_run(
        &self,
        tenant_id: &str,
        news: &[NewInstance],
        demand: &Demand,
        policy: &PlacementPolicy,
        op: &OperationRow,
    ) -> ControlResult<()> {
        let Some(first) = news.first() else {
            return Ok(());
        };
        let group = Self::group_of(policy, &first.tags);
        // One decision at a time per replica: they share the view.
        let mut fleet = self.inner.fleet.lock().await;
        let mut checked_fresh = false;
        for _ in 0..PLACEMENT_ATTEMPTS {
            fleet.refresh_if_stale(self.store()).await?;
            // Read before the counts: a placement in the group after this
            // read makes the commit fail and the batch be decided again.
            let guard = self.group_guard(tenant_id, group, policy).await?;
            let mut counts = self.group_counts(tenant_id, group).await?;
            let mut near = self.affinity_hosts(tenant_id, policy).await?;
            let mut chosen: Vec<usize> = Vec::with_capacity(news.len());
            let mut unplaced: Option<&NewInstance> = None;
            for new in news {
                let domains = placement::full_domains(
                    policy,
                    counts
                        .iter()
                        .filter_map(|(h, n)| Some((&fleet.hosts[fleet.index_of(h)?].labels, *n))),
                );
                let demand = Demand {
                    full_domains: domains,
                    affinity_hosts: near.clone(),
                    ..demand.clone()
                };
                let count_of = |i: usize| counts.get(&fleet.hosts[i].name).copied().unwrap_or(0);
                match placement::choose_index(&fleet.hosts, &demand, policy, &count_of) {
                    Some(i) => {
                        // Counted for the next decisions, taken back below.
                        fleet.add_usage(i, demand.vcpus, demand.memory_mib);
                        let name = fleet.hosts[i].name.clone();
                        for (rule, hosts) in policy.affinity.iter().zip(near.iter_mut()) {
                            if new.tags.get(&rule.tag) == Some(&rule.value) {
                                hosts.insert(name.clone());
                            }
                        }
                        *counts.entry(name).or_default() += 1;
                        chosen.push(i);
                    }
                    None => {
                        unplaced = Some(new);
                        break;
                    }
                }
            }
            if let Some(new) = unplaced {
                let explanation = {
                    let views: Vec<HostView> = fleet
                        .hosts
                        .iter()
                        .map(|h| HostView {
                            group_count: counts.get(&h.name).copied().unwrap_or(0),
                            ..h.clone()
                        })
                        .collect();
                    let demand = Demand {
                        full_domains: placement::full_domains(
                            policy,
                            views.iter().map(|v| (&v.labels, v.group_count)),
                        ),
                        affinity_hosts: near.clone(),
                        ..demand.clone()
                    };
                    placement::explain(&views, &demand, policy)
                };
                for &i in &chosen {
                    fleet.remove_usage(i, demand.vcpus, demand.memory_mib);
                }
                if !checked_fresh {
                    // The view may be behind: decide once more on a fresh one.
                    checked_fresh = true;
                    fleet.mark_stale();
                    continue;
                }
                return Err(no_host_error(&new.name, &explanation));
            }
            let mut versions = BTreeMap::new();
            for &i in &chosen {
                versions.insert(fleet.hosts[i].name.clone(), fleet.versions[i]);
            }
            let placed: Vec<(NewInstance, String)> = news
                .iter()
                .zip(&chosen)
                .map(|(n, &i)| (n.clone(), fleet.hosts[i].name.clone()))
                .collect();
            let committed = self
                .store()
                .commit_run(
                    &placed,
                    &versions,
                    guard.as_ref(),
                    op,
                    &self.inner.replica,
                    self.lease_until(),
                )
                .await;
            match committed {
                Ok(()) => {
                    let mut bumped = std::collections::BTreeSet::new();
                    for &i in &chosen {
                        if bumped.insert(i) {
                            fleet.versions[i] += 1;
                        }
                    }
                    for (new, host) in &placed {
                        tracing::info!(instance = %new.name, id = %new.id, host = %host, "placed");
                    }
                    return Ok(());
                }
                Err(StoreError::Contended) => {
                    for &i in &chosen {
                        fleet.remove_usage(i, demand.vcpus, demand.memory_mib);
                    }
                    let mut reread = std::collections::BTreeSet::new();
                    for &i in &chosen {
                        if reread.insert(i) {
                            fleet.reload_host(self.store(), i).await?;
                        }
                    }
                }
                Err(e) => {
                    for &i in &chosen {
                        fleet.remove_usage(i, demand.vcpus, demand.memory_mib);
                    }
                    return Err(e.into());
                }
            }
        }
        Err(ControlError::conflict(format!(
            "could not place {:?}: every attempt raced with other placements",
            first.name
        ))
        .with_hint("send the request again"))
    }

    /// The cached fleet is reread before the next placement.
    async fn fleet_changed(&self) {
        self.inner.fleet.lock().await.mark_stale();
    }

    /// Terminate, start or stop an instance through an operation.
    pub async fn act_on_instance(
        &self,
        caller: &Caller,
        tenant: Option<&str>,
        name: &str,
        input: OperationInput,
    ) -> ControlResult<OperationRow> {
        let inst = self.instance(caller, tenant, name).await?;
        let op_id = new_id("op");
        let desired = match input {
            OperationInput::Terminate => DesiredState::Terminated,
            OperationInput::Start => DesiredState::Running,
            OperationInput::Stop => DesiredState::Stopped,
            OperationInput::Suspend => DesiredState::Suspended,
            OperationInput::Resume => DesiredState::Running,
            OperationInput::Run | OperationInput::Clone { .. } => {
                return Err(ControlError::invalid(
                    "runs and clones have their own calls (POST /v1/instances, .../clone)",
                ))
            }
        };
        if inst.desired == DesiredState::Terminated && desired != DesiredState::Terminated {
            return Err(ControlError::conflict(format!(
                "instance {name:?} is being terminated"
            )));
        }
        self.check_not_being_made(&inst).await?;
        let tenant_id = inst.tenant_id.clone();
        self.begin_operation(Some(&tenant_id), &op_id, input, vec![inst.id], desired)
            .await
    }

    /// Acting on an instance its run or clone is still making would race
    /// with it (a VM made after its record is gone would be nobody's).
    async fn check_not_being_made(&self, inst: &InstanceRow) -> ControlResult<()> {
        let Some(op_id) = &inst.operation else {
            return Ok(());
        };
        if let Some(op) = self.store().operation(op_id).await? {
            if op.state == flotilla_api::control::OperationState::Running
                && (op.kind == "run" || op.kind == "clone")
            {
                return Err(ControlError::conflict(format!(
                    "instance {:?} is still being made by operation {}",
                    inst.name, op.id
                ))
                .with_hint("wait for it to end (flotilla op inspect ID), then try again"));
            }
        }
        Ok(())
    }

    /// Records the operation and its targets' desired state together, then
    /// drives it.
    async fn begin_operation(
        &self,
        tenant_id: Option<&str>,
        id: &str,
        input: OperationInput,
        targets: Vec<String>,
        desired: DesiredState,
    ) -> ControlResult<OperationRow> {
        let op = self.new_operation(tenant_id, id, input, targets);
        self.store()
            .begin_operation(&op, desired, &self.inner.replica, self.lease_until())
            .await?;
        workflows::spawn(self.clone(), op.clone());
        Ok(op)
    }

    /// Where a command for instance `name` goes: its host's endpoint, and
    /// its VM's name there.
    pub async fn exec_target(
        &self,
        caller: &Caller,
        tenant: Option<&str>,
        name: &str,
    ) -> ControlResult<(String, String)> {
        let inst = self.instance(caller, tenant, name).await?;
        let host = inst.host.as_deref().ok_or_else(|| {
            ControlError::conflict(format!("instance {name:?} is not placed yet"))
        })?;
        let row = self
            .store()
            .host(host)
            .await?
            .ok_or_else(|| ControlError::conflict(format!("host {host} is not registered")))?;
        if row.down {
            return Err(ControlError::conflict(format!(
                "instance {name:?} is on host {host}, which is down"
            )));
        }
        Ok((row.endpoint, inst.id))
    }

    pub fn agents(&self) -> &AgentClient {
        &self.inner.agents
    }

    /// Suspend or resume every instance `selector` picks, as one operation
    /// (a few at a time; a result per instance in its steps).
    pub async fn fleet_action(
        &self,
        caller: &Caller,
        tenant: Option<&str>,
        selector: &FleetSelector,
        input: OperationInput,
    ) -> ControlResult<OperationRow> {
        let tenant_id = self.tenant_of(caller, tenant)?;
        let desired = match input {
            OperationInput::Suspend => DesiredState::Suspended,
            OperationInput::Resume => DesiredState::Running,
            _ => return Err(ControlError::invalid("a fleet is suspended or resumed")),
        };
        if selector.tags.is_empty() && selector.names.is_empty() {
            return Err(ControlError::invalid(
                "select the fleet by \"tags\" and/or \"names\" (an empty selector would take everything)",
            ));
        }
        let mut targets = Vec::new();
        if !selector.tags.is_empty() {
            let filter = InstanceFilter {
                tenant_id: Some(tenant_id.clone()),
                tags: selector.tags.clone(),
                limit: u32::MAX,
                ..Default::default()
            };
            targets.extend(self.store().list_instances(&filter).await?);
        }
        for name in &selector.names {
            match self.store().instance_by_name(&tenant_id, name).await? {
                Some(i) => targets.push(i),
                None => return Err(ControlError::not_found(format!("no instance {name:?}"))),
            }
        }
        targets.retain(|i| i.desired != DesiredState::Terminated);
        targets.sort_by(|a, b| a.id.cmp(&b.id));
        targets.dedup_by(|a, b| a.id == b.id);
        if targets.is_empty() {
            return Err(ControlError::not_found("no instance matches the selector"));
        }
        for t in &targets {
            self.check_not_being_made(t).await?;
        }
        let op_id = new_id("op");
        let ids = targets.into_iter().map(|t| t.id).collect();
        self.begin_operation(Some(&tenant_id), &op_id, input, ids, desired)
            .await
    }

    /// A clone of instance `name`, placed on the source's host (its
    /// snapshot is local there) if the policies allow it.
    pub async fn clone_instance(
        &self,
        caller: &Caller,
        tenant: Option<&str>,
        name: &str,
        req: &CloneInstanceRequest,
    ) -> ControlResult<(OperationRow, InstanceRow)> {
        let source = self.instance(caller, tenant, name).await?;
        if source.desired == DesiredState::Terminated {
            return Err(ControlError::conflict(format!(
                "instance {name:?} is being terminated"
            )));
        }
        let Some(host) = source.host.clone() else {
            return Err(ControlError::conflict(format!(
                "instance {name:?} has no host"
            )));
        };
        check_name("instance", &req.name)?;
        if self
            .store()
            .name_taken(&source.tenant_id, &req.name)
            .await?
        {
            return Err(ControlError::new(
                ErrorCode::AlreadyExists,
                format!("instance {:?} already exists", req.name),
            ));
        }
        let tags = req.tags.clone().unwrap_or_else(|| source.tags.clone());
        let policy = self
            .effective_policy(&source.tenant_id, &tags, None)
            .await?;
        Self::check_group(&policy, &tags)?;
        let mut demand = Demand::new(source.vcpus, source.memory_mib);
        let op_id = new_id("op");
        let new = NewInstance {
            id: new_id("i"),
            tenant_id: source.tenant_id.clone(),
            name: req.name.clone(),
            image: source.image.clone(),
            vcpus: source.vcpus,
            memory_mib: source.memory_mib,
            tags,
            operation: Some(op_id.clone()),
        };
        let op = self.new_operation(
            Some(&source.tenant_id),
            &op_id,
            OperationInput::Clone {
                source: source.id.clone(),
            },
            vec![new.id.clone()],
        );
        let mut done = false;
        for _ in 0..PLACEMENT_ATTEMPTS {
            let guard = self
                .group_guard(
                    &source.tenant_id,
                    Self::group_of(&policy, &new.tags),
                    &policy,
                )
                .await?;
            let (views, versions) = self
                .host_views(&source.tenant_id, Self::group_of(&policy, &new.tags))
                .await?;
            let view = views.iter().find(|v| v.name == host).ok_or_else(|| {
                ControlError::conflict(format!("host {host} is no longer registered"))
            })?;
            demand.full_domains =
                placement::full_domains(&policy, views.iter().map(|v| (&v.labels, v.group_count)));
            demand.affinity_hosts = self.affinity_hosts(&source.tenant_id, &policy).await?;
            if let Some(reason) = placement::reject_reason(view, &demand, &policy) {
                return Err(ControlError::new(
                    ErrorCode::InsufficientCapacity,
                    format!("a clone of {name:?} goes on its host {host}, which cannot take it: {reason}"),
                ));
            }
            let host_versions =
                BTreeMap::from([(host.clone(), versions.get(&host).copied().unwrap_or(0))]);
            let placed = [(new.clone(), host.clone())];
            let committed = self
                .store()
                .commit_run(
                    &placed,
                    &host_versions,
                    guard.as_ref(),
                    &op,
                    &self.inner.replica,
                    self.lease_until(),
                )
                .await;
            match committed {
                Ok(()) => {
                    done = true;
                    break;
                }
                Err(StoreError::Contended) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        if !done {
            return Err(
                ControlError::conflict("the clone raced with other placements")
                    .with_hint("send the request again"),
            );
        }
        // Placed by version, not through the cached view: reread it there.
        self.fleet_changed().await;
        workflows::spawn(self.clone(), op.clone());
        let row =
            self.store().instance(&new.id).await?.ok_or_else(|| {
                ControlError::new(ErrorCode::Internal, "the clone's record vanished")
            })?;
        Ok((op, row))
    }

    // ---- policies ----

    /// The tenant a policy call acts on: a tenant token its own, an admin
    /// the one named, or `""` (global) when none is.
    fn policy_scope(&self, caller: &Caller, tenant: Option<&str>) -> ControlResult<String> {
        match (&caller.tenant_id, caller.admin) {
            (Some(own), _) => Ok(own.clone()),
            (None, true) => Ok(tenant.unwrap_or("").to_string()),
            (None, false) => Err(ControlError::new(
                ErrorCode::PermissionDenied,
                "this token acts for no tenant",
            )),
        }
    }

    pub async fn put_policy(
        &self,
        caller: &Caller,
        tenant: Option<&str>,
        name: &str,
        doc: &PolicyDocument,
    ) -> ControlResult<PolicyRow> {
        check_name("policy", name)?;
        placement::validate(&doc.placement, "placement")?;
        let tenant_id = self.policy_scope(caller, tenant)?;
        if !tenant_id.is_empty() && self.store().tenant_by_id(&tenant_id).await?.is_none() {
            return Err(ControlError::not_found(format!("no tenant {tenant_id:?}")));
        }
        let row = PolicyRow {
            tenant_id,
            name: name.to_string(),
            fleet: doc.fleet.clone(),
            placement: doc.placement.clone(),
            updated_at: now_ms(),
        };
        self.store().put_policy(&row).await?;
        Ok(row)
    }

    /// A tenant sees its own policies and the global ones; an admin every
    /// policy, or one tenant's with `tenant`.
    pub async fn list_policies(
        &self,
        caller: &Caller,
        tenant: Option<&str>,
    ) -> ControlResult<Vec<PolicyRow>> {
        match (&caller.tenant_id, tenant) {
            (Some(own), _) => Ok(self.store().policies_for(own).await?),
            (None, Some(t)) if caller.admin => Ok(self.store().policies_for(t).await?),
            (None, _) if caller.admin => Ok(self.store().all_policies().await?),
            _ => Err(ControlError::new(
                ErrorCode::PermissionDenied,
                "this token acts for no tenant",
            )),
        }
    }

    pub async fn delete_policy(
        &self,
        caller: &Caller,
        tenant: Option<&str>,
        name: &str,
    ) -> ControlResult<()> {
        let tenant_id = self.policy_scope(caller, tenant)?;
        if !self.store().delete_policy(&tenant_id, name).await? {
            return Err(ControlError::not_found(format!("no policy {name:?}")));
        }
        Ok(())
    }

    /// Global, tenant-wide and matching fleet policies, then the request's,
    /// merged (see [`placement::merge`]) and checked as a whole.
    async fn effective_policy(
        &self,
        tenant_id: &str,
        tags: &BTreeMap<String, String>,
        request: Option<&PlacementPolicy>,
    ) -> ControlResult<PlacementPolicy> {
        let stored = self.store().policies_for(tenant_id).await?;
        let applies = |p: &PolicyRow| p.fleet.iter().all(|(k, v)| tags.get(k) == Some(v));
        let mut ordered: Vec<&PolicyRow> = stored.iter().filter(|p| applies(p)).collect();
        // Least specific first: global, then the tenant's, whole-tenant before fleets.
        ordered.sort_by_key(|p| (!p.tenant_id.is_empty(), !p.fleet.is_empty(), p.name.clone()));
        let mut sourced: Vec<Sourced<'_>> = ordered
            .iter()
            .map(|p| Sourced {
                source: format!("policy {}", p.name),
                policy: &p.placement,
                global: p.tenant_id.is_empty(),
            })
            .collect();
        if let Some(r) = request {
            placement::validate(r, "placement")?;
            sourced.push(Sourced {
                source: "placement".into(),
                policy: r,
                global: false,
            });
        }
        let merged = placement::merge(&sourced)?;
        placement::validate(&merged, "the merged placement policy")?;
        Ok(merged)
    }

    // ---- operations ----

    fn new_operation(
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
        limit: u32,
    ) -> ControlResult<Vec<OperationRow>> {
        let tenant = if caller.admin {
            None
        } else {
            Some(caller.tenant_id.as_deref().ok_or_else(no_tenant)?)
        };
        Ok(self.store().list_operations(tenant, limit).await?)
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

fn no_tenant() -> ControlError {
    ControlError::new(ErrorCode::PermissionDenied, "this token acts for no tenant")
}

fn require_admin(caller: &Caller) -> ControlResult<()> {
    if caller.admin {
        Ok(())
    } else {
        Err(ControlError::new(
            ErrorCode::PermissionDenied,
            "this needs an admin token",
        ))
    }
}

fn no_host_error(name: &str, e: &PlacementExplanation) -> ControlError {
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
        VmState::Running => ObservedState::Running,
        VmState::Stopped => ObservedState::Stopped,
        VmState::Suspended => ObservedState::Suspended,
        VmState::Crashed => ObservedState::Failed,
        _ => ObservedState::Starting,
    }
}
