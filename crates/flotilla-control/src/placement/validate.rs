//! Policy documents are checked before use: contradictions and values out of
//! range are reported with the path of the offending field.

use flotilla_api::control::PlacementPolicy;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid placement policy at {path}: {reason}")]
pub struct PolicyError {
    pub path: String,
    pub reason: String,
}

fn err(path: impl Into<String>, reason: impl Into<String>) -> PolicyError {
    PolicyError {
        path: path.into(),
        reason: reason.into(),
    }
}

/// Checks `policy`; `at` prefixes paths (e.g. `placement`).
pub fn validate(policy: &PlacementPolicy, at: &str) -> Result<(), PolicyError> {
    for (key, value) in &policy.forbid_labels {
        if policy.require_labels.get(key) == Some(value) {
            return Err(err(
                format!("{at}.forbid_labels.{key}"),
                format!("forbids {key}={value}, which {at}.require_labels.{key} requires"),
            ));
        }
    }
    for t in &policy.forbid_traits {
        if policy.require_traits.contains(t) {
            return Err(err(
                format!("{at}.forbid_traits"),
                format!("forbids trait {t:?}, which {at}.require_traits requires"),
            ));
        }
    }
    for (field, traits) in [
        ("require_traits", &policy.require_traits),
        ("forbid_traits", &policy.forbid_traits),
    ] {
        if let Some(bad) = traits.iter().find(|t| !valid_trait(t)) {
            return Err(err(
                format!("{at}.{field}"),
                format!("{bad:?} is not a trait name (1-63 of a-z, 0-9, '-', '.', ':')"),
            ));
        }
    }
    for (name, ratio) in [
        ("cpu_overcommit", policy.cpu_overcommit),
        ("memory_overcommit", policy.memory_overcommit),
        ("disk_overcommit", policy.disk_overcommit),
    ] {
        if let Some(r) = ratio {
            if !r.is_finite() || !(0.1..=64.0).contains(&r) {
                return Err(err(
                    format!("{at}.{name}"),
                    format!("{r} is out of range (0.1 to 64)"),
                ));
            }
        }
    }
    if policy.max_per_host == Some(0) {
        return Err(err(
            format!("{at}.max_per_host"),
            "0 would place nothing (at least 1)",
        ));
    }
    for (key, max) in &policy.max_per_label {
        if key.is_empty() {
            return Err(err(
                format!("{at}.max_per_label"),
                "a label name must not be empty",
            ));
        }
        if *max == 0 {
            return Err(err(
                format!("{at}.max_per_label.{key}"),
                "0 would place nothing (at least 1)",
            ));
        }
    }
    if let Some(p) = &policy.partitions {
        if !(1..=64).contains(&p.count) {
            return Err(err(
                format!("{at}.partitions.count"),
                format!("{} is out of range (1 to 64)", p.count),
            ));
        }
        if p.label.is_empty() {
            return Err(err(format!("{at}.partitions.label"), "must not be empty"));
        }
    }
    if let Some(tag) = &policy.group_tag {
        if tag.is_empty() {
            return Err(err(format!("{at}.group_tag"), "must not be empty"));
        }
    }
    for (i, rule) in policy.affinity.iter().enumerate() {
        if rule.tag.is_empty() {
            return Err(err(format!("{at}.affinity[{i}].tag"), "must not be empty"));
        }
        if !rule.weight.is_finite() {
            return Err(err(
                format!("{at}.affinity[{i}].weight"),
                "must be a finite number",
            ));
        }
        let opposite = policy.affinity[..i].iter().position(|r| {
            r.hard
                && rule.hard
                && r.tag == rule.tag
                && r.value == rule.value
                && r.toward != rule.toward
        });
        if let Some(j) = opposite {
            return Err(err(
                format!("{at}.affinity[{i}]"),
                format!(
                    "contradicts {at}.affinity[{j}] (near and away from {}={})",
                    rule.tag, rule.value
                ),
            ));
        }
    }
    for (i, pref) in policy.prefer_labels.iter().enumerate() {
        if !pref.weight.is_finite() {
            return Err(err(
                format!("{at}.prefer_labels[{i}].weight"),
                "must be a finite number",
            ));
        }
        if policy.forbid_labels.get(&pref.label) == Some(&pref.value) && pref.weight > 0.0 {
            return Err(err(
                format!("{at}.prefer_labels[{i}]"),
                format!(
                    "prefers {}={}, which {at}.forbid_labels forbids",
                    pref.label, pref.value
                ),
            ));
        }
    }
    Ok(())
}

/// A trait name: 1-63 characters of a-z, 0-9, `-`, `.` and `:`.
pub fn valid_trait(t: &str) -> bool {
    (1..=63).contains(&t.len())
        && t.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.:".contains(&b))
}
