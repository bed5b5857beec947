//! Placement: which host takes an instance. Candidates (every registered
//! host), then filters (hard rules: a host failing one is out, with the
//! reason), then ranking (soft rules: a score), then the best score wins.
//! Pure logic over a snapshot of the hosts: the caller commits the choice
//! with the host's version, so concurrent placements never oversubscribe.

mod validate;

use std::collections::BTreeMap;

use flotilla_api::control::{
    HostVerdict, PlacementExplanation, PlacementPolicy, PlacementStrategy,
};

pub use validate::{validate, PolicyError};

/// The tag naming an instance's group when the policy names none.
pub const DEFAULT_GROUP_TAG: &str = "group";

/// What the placement sees of a host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostView {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub down: bool,
    pub cordoned: bool,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub used_vcpus: u64,
    pub used_memory_mib: u64,
    /// Instances on the host in the request's group (see `group_tag`).
    pub group_count: u32,
}

/// What is being placed.
#[derive(Debug, Clone, PartialEq)]
pub struct Demand {
    pub vcpus: u32,
    pub memory_mib: u64,
}

/// Why `host` cannot take `demand` under `policy`, if it cannot.
pub fn reject_reason(host: &HostView, demand: &Demand, policy: &PlacementPolicy) -> Option<String> {
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
    if let Some(max) = policy.max_per_host {
        if host.group_count >= max {
            return Some(format!(
                "already holds {} of the group (max_per_host {max})",
                host.group_count
            ));
        }
    }
    None
}

/// A passing host's score: higher is better.
pub fn score(host: &HostView, demand: &Demand, policy: &PlacementPolicy) -> f64 {
    let cpu_after =
        (host.used_vcpus + u64::from(demand.vcpus)) as f64 / f64::from(host.vcpus.max(1));
    let mem_after =
        (host.used_memory_mib + demand.memory_mib) as f64 / host.memory_mib.max(1) as f64;
    let fullness = (cpu_after + mem_after) / 2.0;
    let mut score = match policy.strategy.unwrap_or(PlacementStrategy::Spread) {
        // Fewest of the group first, then the emptiest host.
        PlacementStrategy::Spread => -f64::from(host.group_count) - fullness,
        PlacementStrategy::Binpack => fullness,
    };
    for pref in &policy.prefer_labels {
        if host.labels.get(&pref.label) == Some(&pref.value) {
            score += pref.weight;
        }
    }
    score
}

/// Picks the host for `demand`, or none. Ties go to the first host by name,
/// so a decision can be replayed.
pub fn choose<'a>(
    hosts: &'a [HostView],
    demand: &Demand,
    policy: &PlacementPolicy,
) -> Option<&'a HostView> {
    let mut best: Option<(&HostView, f64)> = None;
    for host in hosts {
        if reject_reason(host, demand, policy).is_some() {
            continue;
        }
        let s = score(host, demand, policy);
        let better = match best {
            None => true,
            Some((b, bs)) => s > bs || (s == bs && host.name < b.name),
        };
        if better {
            best = Some((host, s));
        }
    }
    best.map(|(h, _)| h)
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
