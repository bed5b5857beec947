//! Placement of new instances: the policy's inputs read from the store
//! (groups, affinity), explain, and runs decided on the cached fleet view and
//! committed in one transaction.

use flotilla_api::control::PARTITION_TAG;

use super::*;
use crate::placement::PartitionDemand;

impl ControlPlane {
    /// Every host read from the store (for explain and clones), with its
    /// count of the group and its version.
    pub(super) async fn host_views(
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

    /// The group's version: every placement into a group checks and bumps
    /// it, limited or not (one without a limit still changes the counts a
    /// limited one decided on), so group limits hold across hosts.
    pub(super) async fn group_guard(
        &self,
        tenant_id: &str,
        group: Option<(&str, &str)>,
    ) -> ControlResult<Option<GroupGuard>> {
        let Some((tag, value)) = group else {
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
    pub(super) async fn affinity_hosts(
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

    pub(super) async fn group_counts(
        &self,
        tenant_id: &str,
        group: Option<(&str, &str)>,
    ) -> ControlResult<BTreeMap<String, u32>> {
        Ok(match group {
            Some((tag, value)) => self.store().group_counts(tenant_id, tag, value).await?,
            None => BTreeMap::new(),
        })
    }

    pub(super) fn group_of<'a>(
        policy: &'a PlacementPolicy,
        tags: &'a BTreeMap<String, String>,
    ) -> Option<(&'a str, &'a str)> {
        let tag = policy.group_tag.as_deref().unwrap_or(DEFAULT_GROUP_TAG);
        tags.get(tag).map(|v| (tag, v.as_str()))
    }

    /// `max_per_host` counts the instances sharing the group tag's value:
    /// an instance without the tag would escape it silently.
    pub(super) fn check_group(
        policy: &PlacementPolicy,
        tags: &BTreeMap<String, String>,
    ) -> ControlResult<()> {
        let limited = match (policy.max_per_host, policy.max_per_label.iter().next()) {
            (Some(max), _) => Some(format!("max_per_host {max}")),
            (None, Some((key, max))) => Some(format!("max_per_label {key} {max}")),
            (None, None) => policy
                .partitions
                .as_ref()
                .map(|p| format!("partitions ({} by {})", p.count, p.label)),
        };
        if let (Some(p), Some(given)) = (&policy.partitions, tags.get(PARTITION_TAG)) {
            if !given
                .parse::<u32>()
                .is_ok_and(|n| (1..=p.count).contains(&n))
            {
                return Err(ControlError::invalid(format!(
                    "tag {PARTITION_TAG}={given:?}: the group has partitions 1 to {}",
                    p.count
                )));
            }
        }
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

    /// The group's members in partitions (see `PlacementPolicy::partitions`),
    /// as (host, partition, on it rather than moving to it).
    pub(super) async fn partition_members(
        &self,
        tenant_id: &str,
        policy: &PlacementPolicy,
        group: Option<(&str, &str)>,
    ) -> ControlResult<Vec<(String, u32, bool)>> {
        Ok(match (&policy.partitions, group) {
            (Some(_), Some((tag, value))) => {
                self.store()
                    .group_partitions(tenant_id, tag, value, PARTITION_TAG)
                    .await?
            }
            _ => Vec::new(),
        })
    }

    /// Gives each instance of a run in a partition group its partition
    /// (tag [`PARTITION_TAG`]): the one asked for, else the emptiest.
    pub(super) async fn assign_partitions(
        &self,
        tenant_id: &str,
        policy: &PlacementPolicy,
        news: &mut [NewInstance],
    ) -> ControlResult<()> {
        let (Some(partitions), Some(first)) = (&policy.partitions, news.first()) else {
            return Ok(());
        };
        let members = self
            .partition_members(tenant_id, policy, Self::group_of(policy, &first.tags))
            .await?;
        let mut counts: BTreeMap<u32, u32> = BTreeMap::new();
        for (_, p, home) in &members {
            if *home {
                *counts.entry(*p).or_default() += 1;
            }
        }
        for new in news {
            let p = match new.tags.get(PARTITION_TAG).and_then(|v| v.parse().ok()) {
                Some(p) => p,
                None => placement::emptiest_partition(partitions.count, &counts),
            };
            new.tags.insert(PARTITION_TAG.into(), p.to_string());
            *counts.entry(p).or_default() += 1;
        }
        Ok(())
    }

    /// The partition demand of an instance with `tags` (none outside a
    /// partition group), given the group's members and the hosts' labels.
    pub(super) fn partition_demand<'a>(
        policy: &PlacementPolicy,
        tags: &BTreeMap<String, String>,
        members: &[(String, u32, bool)],
        labels_of: impl Fn(&str) -> Option<&'a BTreeMap<String, String>>,
    ) -> Option<PartitionDemand> {
        let partitions = policy.partitions.as_ref()?;
        let mine = tags.get(PARTITION_TAG)?.parse().ok()?;
        Some(PartitionDemand {
            label: partitions.label.clone(),
            mine,
            taken: placement::partitions_taken(
                &partitions.label,
                members.iter().map(|(h, p, _)| (h.as_str(), *p)),
                labels_of,
            ),
        })
    }

    /// What each instance of a run is: the request's shape, or its
    /// snapshot's (which also decides the host).
    async fn run_shape(
        &self,
        tenant_id: &str,
        req: &RunInstancesRequest,
    ) -> ControlResult<RunShape> {
        if req.from_snapshot.is_some() && !req.volumes.is_empty() {
            return Err(ControlError::invalid(
                "volumes: an instance from a snapshot has the snapshot's disks only; run it without volumes",
            ));
        }
        let mut shape = self.run_shape_of_source(tenant_id, req).await?;
        if let Some((ids, host)) = self.run_volumes(tenant_id, req).await? {
            let why = format!("volume {:?} is kept on {host}", req.volumes[0]);
            shape.demand.only_host = Some((host, why));
            shape.volumes = ids;
        }
        Ok(shape)
    }

    /// Image, demand and snapshot of a run, from its request or the
    /// snapshot it starts from.
    async fn run_shape_of_source(
        &self,
        tenant_id: &str,
        req: &RunInstancesRequest,
    ) -> ControlResult<RunShape> {
        let Some(name) = &req.from_snapshot else {
            return Ok(RunShape {
                image: req.image.clone(),
                demand: Demand::new(req.vcpus, req.memory_mib).with_disk(req.disk_mib),
                snapshot: None,
                volumes: Vec::new(),
            });
        };
        if req.image.is_some() {
            return Err(ControlError::invalid(
                "image: an instance from a snapshot runs the snapshot's image; leave image out",
            ));
        }
        let snap = self
            .store()
            .snapshot_by_name(tenant_id, name)
            .await?
            .ok_or_else(|| ControlError::not_found(format!("no snapshot {name:?}")))?;
        if !snap.ready() {
            return Err(ControlError::conflict(format!(
                "snapshot {name:?} is still being taken (or its host never answered)"
            )));
        }
        Ok(RunShape {
            image: snap.image.clone(),
            demand: Demand {
                only_host: Some((
                    snap.host.clone(),
                    format!("snapshot {name:?} is kept on {}", snap.host),
                )),
                // Its instances need at least the room its source had.
                ..Demand::new(snap.vcpus, snap.memory_mib)
                    .with_disk(req.disk_mib.max(snap.disk_mib))
            },
            snapshot: Some(snap.id),
            volumes: Vec::new(),
        })
    }

    pub async fn explain(
        &self,
        caller: &Caller,
        tenant: Option<&str>,
        req: &RunInstancesRequest,
    ) -> ControlResult<PlacementExplanation> {
        let tenant_id = self.tenant_of(caller, tenant)?;
        let shape = self.run_shape(&tenant_id, req).await?;
        let policy = self
            .effective_policy(&tenant_id, &req.tags, req.placement.as_ref())
            .await?;
        Self::check_group(&policy, &req.tags)?;
        let group = Self::group_of(&policy, &req.tags);
        let (views, _) = self.host_views(&tenant_id, group).await?;
        // As the first instance of such a run would be.
        let mut one = [NewInstance {
            id: String::new(),
            tenant_id: tenant_id.clone(),
            name: req.name.clone(),
            image: None,
            vcpus: shape.demand.vcpus,
            memory_mib: shape.demand.memory_mib,
            disk_mib: shape.demand.disk_mib,
            from_snapshot: None,
            tags: req.tags.clone(),
            operation: None,
            ip: None,
        }];
        self.assign_partitions(&tenant_id, &policy, &mut one)
            .await?;
        let members = self.partition_members(&tenant_id, &policy, group).await?;
        let partition = Self::partition_demand(&policy, &one[0].tags, &members, |h| {
            views.iter().find(|v| v.name == h).map(|v| &v.labels)
        });
        Ok(placement::explain(
            &views,
            &Demand {
                full_domains: placement::full_domains(
                    &policy,
                    views.iter().map(|v| (&v.labels, v.group_count)),
                ),
                affinity_hosts: self.affinity_hosts(&tenant_id, &policy).await?,
                partition,
                ..shape.demand
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
        if !(64..=64 * 1024 * 1024).contains(&req.disk_mib) {
            return Err(ControlError::invalid(format!(
                "disk_mib {} is out of range (64 to 67108864)",
                req.disk_mib
            )));
        }
        check_tags(&req.tags)?;
        let shape = self.run_shape(&tenant_id, req).await?;
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
        let mut news: Vec<NewInstance> = names
            .iter()
            .map(|name| NewInstance {
                id: new_id("i"),
                tenant_id: tenant_id.clone(),
                name: name.clone(),
                image: shape.image.clone(),
                vcpus: shape.demand.vcpus,
                memory_mib: shape.demand.memory_mib,
                disk_mib: shape.demand.disk_mib,
                from_snapshot: shape.snapshot.clone(),
                tags: req.tags.clone(),
                operation: Some(op_id.clone()),
                ip: None,
            })
            .collect();
        let targets = news.iter().map(|n| n.id.clone()).collect();
        let input = match &req.placement {
            Some(p) => OperationInput::RunWith {
                placement: Box::new(p.clone()),
            },
            None => OperationInput::Run,
        };
        let op = self.new_operation(Some(&tenant_id), &op_id, input, targets);
        self.assign_partitions(&tenant_id, &policy, &mut news)
            .await?;
        self.place_run(&tenant_id, &news, &shape, &policy, &op)
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
    pub(super) async fn place_run(
        &self,
        tenant_id: &str,
        news: &[NewInstance],
        shape: &RunShape,
        policy: &PlacementPolicy,
        op: &OperationRow,
    ) -> ControlResult<()> {
        let demand = &shape.demand;
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
            let guard = self.group_guard(tenant_id, group).await?;
            let mut counts = self.group_counts(tenant_id, group).await?;
            let mut near = self.affinity_hosts(tenant_id, policy).await?;
            let mut members = self.partition_members(tenant_id, policy, group).await?;
            let mut chosen: Vec<usize> = Vec::with_capacity(news.len());
            // The first that fits nowhere, with what it asked for.
            let mut unplaced: Option<(&NewInstance, Demand)> = None;
            for new in news {
                let domains = placement::full_domains(
                    policy,
                    counts
                        .iter()
                        .filter_map(|(h, n)| Some((&fleet.hosts[fleet.index_of(h)?].labels, *n))),
                );
                let partition = Self::partition_demand(policy, &new.tags, &members, |h| {
                    fleet.index_of(h).map(|i| &fleet.hosts[i].labels)
                });
                let demand = Demand {
                    full_domains: domains,
                    affinity_hosts: near.clone(),
                    partition,
                    ..demand.clone()
                };
                let count_of = |i: usize| counts.get(&fleet.hosts[i].name).copied().unwrap_or(0);
                match placement::choose_index(&fleet.hosts, &demand, policy, &count_of) {
                    Some(i) => {
                        // Counted for the next decisions, taken back below.
                        fleet.add_usage(i, &demand);
                        let name = fleet.hosts[i].name.clone();
                        for (rule, hosts) in policy.affinity.iter().zip(near.iter_mut()) {
                            if new.tags.get(&rule.tag) == Some(&rule.value) {
                                hosts.insert(name.clone());
                            }
                        }
                        if let Some(p) = &demand.partition {
                            members.push((name.clone(), p.mine, true));
                        }
                        *counts.entry(name).or_default() += 1;
                        chosen.push(i);
                    }
                    None => {
                        unplaced = Some((new, demand));
                        break;
                    }
                }
            }
            if let Some((new, failed)) = unplaced {
                let explanation = {
                    let views: Vec<HostView> = fleet
                        .hosts
                        .iter()
                        .map(|h| HostView {
                            group_count: counts.get(&h.name).copied().unwrap_or(0),
                            ..h.clone()
                        })
                        .collect();
                    placement::explain(&views, &failed, policy)
                };
                for &i in &chosen {
                    fleet.remove_usage(i, demand);
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
            let mut placed: Vec<(NewInstance, String)> = news
                .iter()
                .zip(&chosen)
                .map(|(n, &i)| (n.clone(), fleet.hosts[i].name.clone()))
                .collect();
            if let Err(e) = self.assign_addresses(&mut placed).await {
                for &i in &chosen {
                    fleet.remove_usage(i, demand);
                }
                return Err(e);
            }
            let committed = self
                .store()
                .commit_run(
                    &placed,
                    &versions,
                    guard.as_ref(),
                    &shape.volumes,
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
                    drop(fleet);
                    self.routes_changed().await;
                    return Ok(());
                }
                Err(e) if e.is_contention() => {
                    for &i in &chosen {
                        fleet.remove_usage(i, demand);
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
                        fleet.remove_usage(i, demand);
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

    /// Picks where a migrating instance goes (`to`, checked against the
    /// instance's hard rules like any placement, or the best host but its
    /// own) and claims room there; retried when another placement raced.
    pub(crate) async fn claim_migration_target(
        &self,
        inst: &InstanceRow,
        from: &str,
        to: Option<&str>,
    ) -> ControlResult<String> {
        let policy = self
            .effective_policy(&inst.tenant_id, &inst.tags, None)
            .await?;
        // Its volumes move with it: they need room there too.
        let volumes_mib = self.store().volumes_size_of(&inst.id).await?;
        self.claim_other_host(
            inst,
            &policy,
            from,
            volumes_mib,
            |host| to.is_none_or(|t| t == host),
            |host, version, group| async move {
                self.store()
                    .begin_migration(&inst.id, from, &host, version, group.as_ref())
                    .await
            },
        )
        .await
    }

    /// An instance with volumes attached stays on their host.
    /// A clone or a snapshot holds an instance's own disks: refused for
    /// one with volumes attached, before anything is recorded.
    pub(crate) async fn check_copyable(&self, inst: &InstanceRow, what: &str) -> ControlResult<()> {
        if self.store().volumes_of(&inst.id).await?.is_empty() {
            return Ok(());
        }
        Err(ControlError::conflict(format!(
            "instance {:?} has volumes attached: {what} would be made without them",
            inst.name
        )))
    }

    /// Places an instance whose host's agent refused to make it (no such
    /// image there, no room by the agent's own count, ...) on another host
    /// its policy (with the run's own rules, `request`) allows, never one
    /// that refused it before; returns the new host.
    pub(crate) async fn place_elsewhere(
        &self,
        inst: &InstanceRow,
        refused_by: &[String],
        request: Option<&PlacementPolicy>,
    ) -> ControlResult<String> {
        let from = inst
            .host
            .as_deref()
            .ok_or_else(|| ControlError::conflict(format!("instance {} has no host", inst.name)))?;
        let policy = self
            .effective_policy(&inst.tenant_id, &inst.tags, request)
            .await?;
        let to = self
            .claim_other_host(
                inst,
                &policy,
                from,
                0,
                |host| !refused_by.iter().any(|r| r == host),
                |host, version, group| async move {
                    self.store()
                        .place_again(&inst.id, from, &host, version, group.as_ref())
                        .await
                },
            )
            .await?;
        tracing::info!(instance = %inst.name, from, to = %to, "placed again");
        Ok(to)
    }

    /// The best host for `inst` under `policy` other than `from` (where it
    /// is, and does not count against itself) among those `usable` allows,
    /// claimed by `commit` with the versions of the host and of the
    /// instance's group it was chosen at (a move changes the group's counts
    /// per host and rack as a run does); decided again when another
    /// placement got there first.
    async fn claim_other_host<Fut>(
        &self,
        inst: &InstanceRow,
        policy: &PlacementPolicy,
        from: &str,
        extra_disk_mib: u64,
        usable: impl Fn(&str) -> bool,
        commit: impl Fn(String, i64, Option<GroupGuard>) -> Fut,
    ) -> ControlResult<String>
    where
        Fut: std::future::Future<Output = Result<(), StoreError>>,
    {
        let group = Self::group_of(policy, &inst.tags);
        for _ in 0..PLACEMENT_ATTEMPTS {
            // Read before the counts it guards.
            let guard = self.group_guard(&inst.tenant_id, group).await?;
            let (mut views, versions) = self.host_views(&inst.tenant_id, group).await?;
            let members = self
                .partition_members(&inst.tenant_id, policy, group)
                .await?;
            let partition = Self::partition_demand(policy, &inst.tags, &members, |h| {
                views.iter().find(|v| v.name == h).map(|v| &v.labels)
            });
            for v in &mut views {
                if v.name == from {
                    v.group_count = v.group_count.saturating_sub(1);
                }
                if v.name == from || !usable(&v.name) {
                    v.cordoned = true;
                }
            }
            let demand = Demand {
                full_domains: placement::full_domains(
                    policy,
                    views.iter().map(|v| (&v.labels, v.group_count)),
                ),
                affinity_hosts: self.affinity_hosts(&inst.tenant_id, policy).await?,
                partition,
                ..Demand::new(inst.vcpus, inst.memory_mib).with_disk(inst.disk_mib + extra_disk_mib)
            };
            let Some(chosen) = placement::choose(&views, &demand, policy) else {
                let explanation = placement::explain(&views, &demand, policy);
                return Err(no_host_error(&inst.name, &explanation));
            };
            let name = chosen.name.clone();
            let version = versions.get(&name).copied().unwrap_or(0);
            match commit(name.clone(), version, guard).await {
                Ok(()) => {
                    self.fleet_changed().await;
                    return Ok(name);
                }
                Err(e) if e.is_contention() => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ControlError::conflict(format!(
            "could not claim a host for {:?}: every attempt raced with other placements",
            inst.name
        )))
    }

    /// The cached fleet is reread before the next placement.
    pub(crate) async fn fleet_changed(&self) {
        self.inner.fleet.lock().await.mark_stale();
        self.routes_changed().await;
    }

    /// Instances came, went or moved: the route table is read again at
    /// the next heartbeat (other replicas' changes show within a second).
    pub(crate) async fn routes_changed(&self) {
        self.inner.routes.lock().await.mark_stale();
    }
}

/// A run's instances as placement and the store see them.
pub(super) struct RunShape {
    image: Option<String>,
    demand: Demand,
    /// The agent's name of the snapshot they start from.
    snapshot: Option<String>,
    /// Volumes (ids) attached to the run's one instance.
    volumes: Vec<String>,
}
