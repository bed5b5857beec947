//! Policies from several places (global, the tenant's, a fleet's by tag,
//! the request's) combine into the one a placement uses: every hard rule of
//! every policy holds, the most specific policy picks the strategy.

use flotilla_api::control::PlacementPolicy;

use super::validate::PolicyError;

/// A policy with where it came from, for error paths (`tenant`, `fleet
/// app=web`, `placement`).
pub struct Sourced<'a> {
    pub source: String,
    pub policy: &'a PlacementPolicy,
    /// Set by an admin for every tenant: only such a policy may let hosts
    /// be overcommitted (hosts are shared; a tenant may only ask for less).
    pub global: bool,
}

/// Combines `policies`, least specific first. Required labels must agree;
/// overcommit ratios and `max_per_host` take the strictest (a ratio above
/// the global policies' own, 1.0 when they set none, is capped there);
/// preferences add up; strategy and group tag come from the most specific
/// policy that sets them.
pub fn merge(policies: &[Sourced<'_>]) -> Result<PlacementPolicy, PolicyError> {
    let mut out = PlacementPolicy::default();
    let mut required_by: std::collections::BTreeMap<String, String> = Default::default();
    let ceiling = |pick: fn(&PlacementPolicy) -> Option<f64>| {
        policies
            .iter()
            .filter(|s| s.global)
            .filter_map(|s| pick(s.policy))
            .fold(None, |acc: Option<f64>, r| {
                Some(acc.map_or(r, |a| a.min(r)))
            })
            .unwrap_or(1.0)
    };
    let cpu_ceiling = ceiling(|p| p.cpu_overcommit);
    let memory_ceiling = ceiling(|p| p.memory_overcommit);
    let disk_ceiling = ceiling(|p| p.disk_overcommit);
    for Sourced { source, policy, .. } in policies {
        for (k, v) in &policy.require_labels {
            match out.require_labels.get(k) {
                Some(have) if have != v => {
                    return Err(PolicyError {
                        path: format!("{source}.require_labels.{k}"),
                        reason: format!(
                            "requires {k}={v}, but {}.require_labels.{k} requires {k}={have}",
                            required_by
                                .get(k)
                                .map(String::as_str)
                                .unwrap_or("another policy")
                        ),
                    })
                }
                _ => {
                    out.require_labels.insert(k.clone(), v.clone());
                    required_by.insert(k.clone(), source.clone());
                }
            }
        }
        out.forbid_labels.extend(
            policy
                .forbid_labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        for (t, required) in policy
            .require_traits
            .iter()
            .map(|t| (t, true))
            .chain(policy.forbid_traits.iter().map(|t| (t, false)))
        {
            let (same, other, field) = match required {
                true => (
                    &mut out.require_traits,
                    &out.forbid_traits,
                    "require_traits",
                ),
                false => (&mut out.forbid_traits, &out.require_traits, "forbid_traits"),
            };
            if other.contains(t) {
                return Err(PolicyError {
                    path: format!("{source}.{field}"),
                    reason: format!(
                        "{} trait {t:?}, which another policy {}",
                        if required { "requires" } else { "forbids" },
                        if required { "forbids" } else { "requires" }
                    ),
                });
            }
            same.insert(t.clone());
        }
        out.cpu_overcommit = min_opt(out.cpu_overcommit, policy.cpu_overcommit);
        out.memory_overcommit = min_opt(out.memory_overcommit, policy.memory_overcommit);
        out.disk_overcommit = min_opt(out.disk_overcommit, policy.disk_overcommit);
        out.max_per_host = match (out.max_per_host, policy.max_per_host) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        for (key, max) in &policy.max_per_label {
            let limit = out.max_per_label.entry(key.clone()).or_insert(*max);
            *limit = (*limit).min(*max);
        }
        if policy.group_tag.is_some() {
            out.group_tag = policy.group_tag.clone();
        }
        if policy.partitions.is_some() {
            out.partitions = policy.partitions.clone();
        }
        if policy.strategy.is_some() {
            out.strategy = policy.strategy;
        }
        out.prefer_labels
            .extend(policy.prefer_labels.iter().cloned());
        out.affinity.extend(policy.affinity.iter().cloned());
    }
    out.cpu_overcommit = Some(
        out.cpu_overcommit
            .map_or(cpu_ceiling, |r| r.min(cpu_ceiling)),
    );
    out.memory_overcommit = Some(
        out.memory_overcommit
            .map_or(memory_ceiling, |r| r.min(memory_ceiling)),
    );
    out.disk_overcommit = Some(
        out.disk_overcommit
            .map_or(disk_ceiling, |r| r.min(disk_ceiling)),
    );
    Ok(out)
}

fn min_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly by design.
mod tests {
    use std::collections::BTreeMap;

    use flotilla_api::control::PlacementStrategy;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_strictest_rule_and_the_most_specific_choice_win() {
        let tenant = PlacementPolicy {
            require_labels: labels(&[("area", "eu")]),
            cpu_overcommit: Some(4.0),
            max_per_host: Some(3),
            strategy: Some(PlacementStrategy::Binpack),
            ..Default::default()
        };
        let request = PlacementPolicy {
            require_labels: labels(&[("zone", "z1")]),
            cpu_overcommit: Some(2.0),
            max_per_host: Some(5),
            strategy: Some(PlacementStrategy::Spread),
            ..Default::default()
        };
        let m = merge(&[
            Sourced {
                source: "tenant".into(),
                policy: &tenant,
                global: true,
            },
            Sourced {
                source: "placement".into(),
                policy: &request,
                global: false,
            },
        ])
        .unwrap();
        assert_eq!(m.require_labels, labels(&[("area", "eu"), ("zone", "z1")]));
        assert_eq!((m.cpu_overcommit, m.max_per_host), (Some(2.0), Some(3)));
        assert_eq!(m.strategy, Some(PlacementStrategy::Spread));
    }

    #[test]
    fn only_global_policies_let_hosts_be_overcommitted() {
        let tenant = PlacementPolicy {
            cpu_overcommit: Some(64.0),
            ..Default::default()
        };
        let alone = merge(&[Sourced {
            source: "tenant".into(),
            policy: &tenant,
            global: false,
        }])
        .unwrap();
        assert_eq!(
            (alone.cpu_overcommit, alone.memory_overcommit),
            (Some(1.0), Some(1.0))
        );
        let global = PlacementPolicy {
            cpu_overcommit: Some(4.0),
            ..Default::default()
        };
        let both = merge(&[
            Sourced {
                source: "global".into(),
                policy: &global,
                global: true,
            },
            Sourced {
                source: "tenant".into(),
                policy: &tenant,
                global: false,
            },
        ])
        .unwrap();
        assert_eq!(both.cpu_overcommit, Some(4.0));
        let lower = PlacementPolicy {
            cpu_overcommit: Some(2.0),
            ..Default::default()
        };
        let m = merge(&[
            Sourced {
                source: "global".into(),
                policy: &global,
                global: true,
            },
            Sourced {
                source: "placement".into(),
                policy: &lower,
                global: false,
            },
        ])
        .unwrap();
        assert_eq!(m.cpu_overcommit, Some(2.0));
    }

    #[test]
    fn disagreeing_requirements_name_both_places() {
        let a = PlacementPolicy {
            require_labels: labels(&[("zone", "z1")]),
            ..Default::default()
        };
        let b = PlacementPolicy {
            require_labels: labels(&[("zone", "z2")]),
            ..Default::default()
        };
        let e = merge(&[
            Sourced {
                source: "tenant".into(),
                policy: &a,
                global: false,
            },
            Sourced {
                source: "placement".into(),
                policy: &b,
                global: false,
            },
        ])
        .unwrap_err();
        assert_eq!(e.path, "placement.require_labels.zone");
        assert!(
            e.reason.contains("tenant.require_labels.zone"),
            "{}",
            e.reason
        );
    }
}
