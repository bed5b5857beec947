//! Placement: which host takes an instance. Candidates (every registered
//! host), then filters (hard rules: a host failing one is out, with the
//! reason), then ranking (soft rules: a score), then the best score wins.
//! Pure logic over a snapshot of the hosts: the caller commits the choice
//! with the host's version, so concurrent placements never oversubscribe.

mod merge;
mod validate;

use std::collections::{BTreeMap, BTreeSet};

use flotilla_api::control::{
    HostVerdict, PlacementExplanation, PlacementPolicy, PlacementStrategy,
};

pub use merge::{merge, Sourced};
pub use validate::{valid_trait, validate, PolicyError};

/// The tag naming an instance's group when the policy names none.
pub const DEFAULT_GROUP_TAG: &str = "group";

/// What the placement sees of a host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostView {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub traits: BTreeSet<String>,
    pub down: bool,
    pub cordoned: bool,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub used_vcpus: u64,
    pub used_memory_mib: u64,
    /// Disk space for VMs (0: not reported, not checked), what instances
    /// placed here are counted for, and what its disk had free last.
    pub disk_mib: u64,
    pub used_disk_mib: u64,
    pub disk_free_mib: Option<u64>,
    /// Instances on the host in the request's group (see `group_tag`).
    pub group_count: u32,
}

/// What is being placed.
#[derive(Debug, Clone, PartialEq)]
pub struct Demand {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_mib: u64,
    /// Label values (`rack`, `r3`) whose hosts already hold as many of the
    /// group as `max_per_label` allows (see [`full_domains`]).
    pub full_domains: BTreeSet<(String, String)>,
    /// For each of the policy's affinity rules, in order: the hosts that
    /// hold an instance it names.
    pub affinity_hosts: Vec<BTreeSet<String>>,
    /// The one host it can go to, and why (e.g. its snapshot is kept there).
    pub only_host: Option<(String, String)>,
    /// In a partition group: its partition, and which partitions hold
    /// each value of the partition label already.
    pub partition: Option<PartitionDemand>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct PartitionDemand {
    pub label: String,
    pub mine: u32,
    /// Label value (a rack) -> partitions of the group on its hosts.
    pub taken: BTreeMap<String, BTreeSet<u32>>,
}

impl PartitionDemand {
    /// Why `host` is not for this partition, if it is not.
    fn reject(&self, host: &HostView) -> Option<String> {
        let Some(value) = host.labels.get(&self.label) else {
            return Some(format!(
                "partitions by {}: the host has no {} label",
                self.label, self.label
            ));
        };
        let other = self
            .taken
            .get(value)
            .and_then(|held| held.iter().find(|p| **p != self.mine))?;
        Some(format!(
            "{}={value} holds partition {other} of the group; this is partition {}",
            self.label, self.mine
        ))
    }

    /// Counts an instance of partition `mine` placed on `host`.
    pub fn record(&mut self, host: &HostView) {
        if let Some(value) = host.labels.get(&self.label) {
            self.taken
                .entry(value.clone())
                .or_default()
                .insert(self.mine);
        }
    }
}

/// Which partitions hold each value of `label`, from the group's instances
/// as (host, partition) and the hosts' labels.
pub fn partitions_taken<'m, 'l>(
    label: &str,
    members: impl IntoIterator<Item = (&'m str, u32)>,
    labels_of: impl Fn(&str) -> Option<&'l BTreeMap<String, String>>,
) -> BTreeMap<String, BTreeSet<u32>> {
    let mut taken: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
    for (host, partition) in members {
        if let Some(value) = labels_of(host).and_then(|l| l.get(label)) {
            taken.entry(value.clone()).or_default().insert(partition);
        }
    }
    taken
}

/// The partition (1-based) with the fewest of the group, lowest first.
pub fn emptiest_partition(count: u32, members: &BTreeMap<u32, u32>) -> u32 {
    (1..=count.max(1))
        .min_by_key(|p| (members.get(p).copied().unwrap_or(0), *p))
        .unwrap_or(1)
}

impl Demand {
    pub fn new(vcpus: u32, memory_mib: u64) -> Demand {
        Demand {
            vcpus,
            memory_mib,
            disk_mib: 0,
            full_domains: BTreeSet::new(),
            affinity_hosts: Vec::new(),
            only_host: None,
            partition: None,
        }
    }

    pub fn with_disk(self, disk_mib: u64) -> Demand {
        Demand { disk_mib, ..self }
    }

    /// Whether `host`'s disk takes this, and if not, why. A host that
    /// reports no disk is not checked.
    fn disk_reject(&self, host: &HostView, policy: &PlacementPolicy) -> Option<String> {
        if host.disk_mib == 0 || self.disk_mib == 0 {
            return None;
        }
        let ratio = policy.disk_overcommit.unwrap_or(1.0);
        let limit = (host.disk_mib as f64 * ratio).floor() as u64;
        if host.used_disk_mib + self.disk_mib > limit {
            return Some(format!(
                "needs {} MiB of disk, {} of {limit} MiB unallocated (disk_overcommit {ratio})",
                self.disk_mib,
                limit.saturating_sub(host.used_disk_mib)
            ));
        }
        match host.disk_free_mib {
            Some(free) if free < self.disk_mib => Some(format!(
                "needs {} MiB of disk, the host's disk has {free} MiB free",
                self.disk_mib
            )),
            _ => None,
        }
    }

    /// Whether `host` passes the hard affinity rules, and if not, why.
    fn affinity_reject(&self, host: &HostView, policy: &PlacementPolicy) -> Option<String> {
        for (i, rule) in policy.affinity.iter().enumerate() {
            if !rule.hard {
                continue;
            }
            // A rule whose hosts were not given holds on no host.
            let holds = self
                .affinity_hosts
                .get(i)
                .is_some_and(|h| h.contains(&host.name));
            if rule.toward && !holds {
                return Some(format!(
                    "affinity: holds no instance with {}={}",
                    rule.tag, rule.value
                ));
            }
            if !rule.toward && holds {
                return Some(format!(
                    "anti-affinity: holds an instance with {}={}",
                    rule.tag, rule.value
                ));
            }
        }
        None
    }

    fn affinity_score(&self, host: &HostView, policy: &PlacementPolicy) -> f64 {
        policy
            .affinity
            .iter()
            .zip(&self.affinity_hosts)
            .filter(|(rule, hosts)| !rule.hard && hosts.contains(&host.name))
            .map(|(rule, _)| {
                if rule.toward {
                    rule.weight
                } else {
                    -rule.weight
                }
            })
            .sum()
    }
}

/// The label values at their `max_per_label` limit, from the group's count
/// per host and each host's labels.
pub fn full_domains<'a>(
    policy: &PlacementPolicy,
    counts: impl IntoIterator<Item = (&'a BTreeMap<String, String>, u32)>,
) -> BTreeSet<(String, String)> {
    if policy.max_per_label.is_empty() {
        return BTreeSet::new();
    }
    let mut totals: BTreeMap<(String, String), u32> = BTreeMap::new();
    for (labels, n) in counts {
        for key in policy.max_per_label.keys() {
            if let Some(value) = labels.get(key) {
                *totals.entry((key.clone(), value.clone())).or_default() += n;
            }
        }
    }
    totals
        .into_iter()
        .filter(|((key, _), n)| policy.max_per_label.get(key).is_some_and(|max| n >= max))
        .map(|(domain, _)| domain)
        .collect()
}

/// Why `host` cannot take `demand` under `policy`, if it cannot.
pub fn reject_reason(host: &HostView, demand: &Demand, policy: &PlacementPolicy) -> Option<String> {
    reject_reason_with(host, host.group_count, demand, policy)
}

/// [`reject_reason`] with the host's count of the group given apart (the
/// large-fleet path keeps counts in a map instead of in every view).
pub fn reject_reason_with(
    host: &HostView,
    group_count: u32,
    demand: &Demand,
    policy: &PlacementPolicy,
) -> Option<String> {
    if let Some((only, why)) = &demand.only_host {
        if *only != host.name {
            return Some(format!("{why}: only {only} can take it"));
        }
    }
    if host.down {
        return Some("the host is down (missed heartbeats)".into());
    }
    if host.cordoned {
        return Some("the host is cordoned".into());
    }
    for (key, want) in &policy.require_labels {
        match host.labels.get(key) {
            Some(have) if have == want => {}
            Some(have) => {
                return Some(format!(
                    "requires label {key}={want}, the host has {key}={have}"
                ))
            }
            None => {
                return Some(format!(
                    "requires label {key}={want}, the host has no {key}"
                ))
            }
        }
    }
    for (key, banned) in &policy.forbid_labels {
        if host.labels.get(key) == Some(banned) {
            return Some(format!("forbids label {key}={banned}"));
        }
    }
    if let Some(t) = policy
        .require_traits
        .iter()
        .find(|t| !host.traits.contains(*t))
    {
        return Some(format!("requires trait {t}, the host lacks it"));
    }
    if let Some(t) = policy
        .forbid_traits
        .iter()
        .find(|t| host.traits.contains(*t))
    {
        return Some(format!("forbids trait {t}, the host has it"));
    }
    let cpu_ratio = policy.cpu_overcommit.unwrap_or(1.0);
    let cpu_limit = (f64::from(host.vcpus) * cpu_ratio).floor() as u64;
    if host.used_vcpus + u64::from(demand.vcpus) > cpu_limit {
        return Some(format!(
            "needs {} vCPUs, {} of {cpu_limit} free (cpu_overcommit {cpu_ratio})",
            demand.vcpus,
            cpu_limit.saturating_sub(host.used_vcpus)
        ));
    }
    let mem_ratio = policy.memory_overcommit.unwrap_or(1.0);
    let mem_limit = (host.memory_mib as f64 * mem_ratio).floor() as u64;
    if host.used_memory_mib + demand.memory_mib > mem_limit {
        return Some(format!(
            "needs {} MiB, {} of {mem_limit} MiB free (memory_overcommit {mem_ratio})",
            demand.memory_mib,
            mem_limit.saturating_sub(host.used_memory_mib)
        ));
    }
    if let Some(why) = demand.disk_reject(host, policy) {
        return Some(why);
    }
    if let Some(max) = policy.max_per_host {
        if group_count >= max {
            return Some(format!(
                "already holds {group_count} of the group (max_per_host {max})"
            ));
        }
    }
    if let Some(why) = demand.affinity_reject(host, policy) {
        return Some(why);
    }
    if let Some(why) = demand.partition.as_ref().and_then(|p| p.reject(host)) {
        return Some(why);
    }
    for (key, value) in host
        .labels
        .iter()
        .filter(|_| !demand.full_domains.is_empty())
    {
        if demand.full_domains.contains(&(key.clone(), value.clone())) {
            let max = policy.max_per_label.get(key).copied().unwrap_or(0);
            return Some(format!(
                "{key}={value} already holds {max} of the group (max_per_label {key} {max})"
            ));
        }
    }
    None
}

/// A passing host's score: higher is better.
pub fn score(host: &HostView, demand: &Demand, policy: &PlacementPolicy) -> f64 {
    score_with(host, host.group_count, demand, policy)
}

/// [`score`] with the host's count of the group given apart.
pub fn score_with(
    host: &HostView,
    group_count: u32,
    demand: &Demand,
    policy: &PlacementPolicy,
) -> f64 {
    let cpu_after =
        (host.used_vcpus + u64::from(demand.vcpus)) as f64 / f64::from(host.vcpus.max(1));
    let mem_after =
        (host.used_memory_mib + demand.memory_mib) as f64 / host.memory_mib.max(1) as f64;
    let fullness = (cpu_after + mem_after) / 2.0;
    let mut score = match policy.strategy.unwrap_or(PlacementStrategy::Spread) {
        // Fewest of the group first, then the emptiest host.
        PlacementStrategy::Spread => -f64::from(group_count) - fullness,
        PlacementStrategy::Binpack => fullness,
        PlacementStrategy::Cluster => f64::from(group_count) + fullness,
    };
    for pref in &policy.prefer_labels {
        if host.labels.get(&pref.label) == Some(&pref.value) {
            score += pref.weight;
        }
    }
    score + demand.affinity_score(host, policy)
}

/// Up to this many hosts, every host is scored; above it, a sample.
pub const EXHAUSTIVE_UP_TO: usize = 256;

/// [`choose`] with each host's count of the group given by index (the
/// control plane keeps the counts apart from its cached views); returns the
/// chosen host's index.
pub fn choose_index(
    hosts: &[HostView],
    demand: &Demand,
    policy: &PlacementPolicy,
    group_count: &dyn Fn(usize) -> u32,
) -> Option<usize> {
    if hosts.len() > EXHAUSTIVE_UP_TO {
        return choose_sampled(hosts, demand, policy, group_count, rand::random());
    }
    best_index(hosts, demand, policy, group_count)
}

/// Picks the host for `demand`, or none: [`choose_exhaustive`] for small
/// fleets, [`choose_sampled`] for large ones.
pub fn choose<'a>(
    hosts: &'a [HostView],
    demand: &Demand,
    policy: &PlacementPolicy,
) -> Option<&'a HostView> {
    if hosts.len() <= EXHAUSTIVE_UP_TO {
        return choose_exhaustive(hosts, demand, policy);
    }
    let i = choose_sampled(
        hosts,
        demand,
        policy,
        &|h: usize| hosts[h].group_count,
        rand::random(),
    )?;
    hosts.get(i)
}

/// How many passing hosts a large-fleet placement scores: about log2 of the
/// fleet, at least 8 (the power of d choices: a few random candidates
/// balance load almost as well as all of them).
pub fn sample_size(hosts: usize) -> usize {
    (usize::BITS - hosts.leading_zeros()).max(8) as usize
}

/// Visits hosts in a pseudo-random order (from `seed`) and scores the first
/// [`sample_size`] that pass every filter; returns the best one's index.
/// Every hard rule is checked on the chosen host, exactly as in the
/// exhaustive path; only the ranking is approximate. The cost is the sample
/// over the fraction of hosts that pass, not the fleet size; when no host
/// passes, every host is visited once, so `None` means none can.
pub fn choose_sampled(
    hosts: &[HostView],
    demand: &Demand,
    policy: &PlacementPolicy,
    group_count: &dyn Fn(usize) -> u32,
    seed: u64,
) -> Option<usize> {
    let n = hosts.len();
    if n == 0 {
        return None;
    }
    // A stride coprime to n walks every index once.
    let start = (seed % n as u64) as usize;
    let mut stride = ((seed >> 32) % n as u64) as usize | 1;
    while gcd(stride, n) != 1 {
        stride += 2;
    }
    let want = sample_size(n);
    let mut best: Option<(usize, f64)> = None;
    let mut found = 0;
    let mut i = start;
    for _ in 0..n {
        let host = &hosts[i];
        let count = group_count(i);
        if reject_reason_fast(host, count, demand, policy) {
            let s = score_with(host, count, demand, policy);
            if best.is_none_or(|(b, bs)| s > bs || (s == bs && host.name < hosts[b].name)) {
                best = Some((i, s));
            }
            found += 1;
            if found == want {
                break;
            }
        }
        i = (i + stride) % n;
    }
    best.map(|(i, _)| i)
}

/// Whether the host passes every filter: [`reject_reason_with`] without
/// building the message.
fn reject_reason_fast(
    host: &HostView,
    group_count: u32,
    demand: &Demand,
    policy: &PlacementPolicy,
) -> bool {
    if host.down || host.cordoned {
        return false;
    }
    if demand
        .only_host
        .as_ref()
        .is_some_and(|(only, _)| *only != host.name)
    {
        return false;
    }
    if policy.max_per_host.is_some_and(|max| group_count >= max) {
        return false;
    }
    if !policy.affinity.is_empty() && demand.affinity_reject(host, policy).is_some() {
        return false;
    }
    if demand
        .partition
        .as_ref()
        .is_some_and(|p| p.reject(host).is_some())
    {
        return false;
    }
    if !demand.full_domains.is_empty()
        && host
            .labels
            .iter()
            .any(|(k, v)| demand.full_domains.contains(&(k.clone(), v.clone())))
    {
        return false;
    }
    if policy
        .require_labels
        .iter()
        .any(|(k, v)| host.labels.get(k) != Some(v))
    {
        return false;
    }
    if policy
        .forbid_labels
        .iter()
        .any(|(k, v)| host.labels.get(k) == Some(v))
    {
        return false;
    }
    if !policy.require_traits.is_subset(&host.traits)
        || !policy.forbid_traits.is_disjoint(&host.traits)
    {
        return false;
    }
    let cpu_limit = (f64::from(host.vcpus) * policy.cpu_overcommit.unwrap_or(1.0)).floor() as u64;
    let mem_limit =
        (host.memory_mib as f64 * policy.memory_overcommit.unwrap_or(1.0)).floor() as u64;
    host.used_vcpus + u64::from(demand.vcpus) <= cpu_limit
        && host.used_memory_mib + demand.memory_mib <= mem_limit
        && demand.disk_reject(host, policy).is_none()
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Scores every host and picks the best. Ties go to the first host by name,
/// so a decision can be replayed.
pub fn choose_exhaustive<'a>(
    hosts: &'a [HostView],
    demand: &Demand,
    policy: &PlacementPolicy,
) -> Option<&'a HostView> {
    best_index(hosts, demand, policy, &|i| hosts[i].group_count).map(|i| &hosts[i])
}

/// The best-scoring host that passes every filter, by index.
fn best_index(
    hosts: &[HostView],
    demand: &Demand,
    policy: &PlacementPolicy,
    group_count: &dyn Fn(usize) -> u32,
) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, host) in hosts.iter().enumerate() {
        let count = group_count(i);
        if reject_reason_with(host, count, demand, policy).is_some() {
            continue;
        }
        let s = score_with(host, count, demand, policy);
        if best.is_none_or(|(b, bs)| s > bs || (s == bs && host.name < hosts[b].name)) {
            best = Some((i, s));
        }
    }
    best.map(|(i, _)| i)
}

/// The decision with every host's verdict, for the explain call and for
/// the error when nothing fits.
pub fn explain(
    hosts: &[HostView],
    demand: &Demand,
    policy: &PlacementPolicy,
) -> PlacementExplanation {
    let chosen = choose(hosts, demand, policy).map(|h| h.name.clone());
    let hosts = hosts
        .iter()
        .map(|h| {
            let rejected = reject_reason(h, demand, policy);
            HostVerdict {
                host: h.name.clone(),
                labels: h.labels.clone(),
                score: rejected.is_none().then(|| score(h, demand, policy)),
                rejected,
            }
        })
        .collect();
    PlacementExplanation { chosen, hosts }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly by design.
mod tests;
