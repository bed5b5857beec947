use std::collections::{BTreeMap, BTreeSet};

use flotilla_api::control::{LabelPreference, PlacementPolicy, PlacementStrategy};
use proptest::prelude::*;

use super::*;

fn host(name: &str, zone: &str, used_vcpus: u64, group_count: u32) -> HostView {
    HostView {
        name: name.into(),
        labels: BTreeMap::from([("zone".to_string(), zone.to_string())]),
        traits: BTreeSet::from(["tcg".to_string()]),
        down: false,
        cordoned: false,
        vcpus: 4,
        memory_mib: 4096,
        used_vcpus,
        used_memory_mib: used_vcpus * 256,
        disk_mib: 0,
        used_disk_mib: 0,
        disk_free_mib: None,
        group_count,
    }
}

const SMALL: Demand = Demand {
    full_domains: BTreeSet::new(),
    affinity_hosts: Vec::new(),
    vcpus: 1,
    memory_mib: 256,
    disk_mib: 1024,
    only_host: None,
    partition: None,
};

#[test]
fn partitions_keep_to_their_racks() {
    let rack = |name: &str, r: &str| {
        let mut h = host(name, "z1", 0, 0);
        h.labels.insert("rack".into(), r.into());
        h
    };
    let hosts = [
        rack("a", "r1"),
        rack("b", "r2"),
        rack("c", "r3"),
        host("d", "z1", 0, 0),
    ];
    let labels_of = |name: &str| hosts.iter().find(|h| h.name == name).map(|h| &h.labels);
    // Partition 1 is on r1, partition 2 on r2.
    let taken = partitions_taken("rack", [("a", 1), ("b", 2)], labels_of);
    let mut p2 = PartitionDemand {
        label: "rack".into(),
        mine: 2,
        taken,
    };
    let demand = Demand {
        partition: Some(p2.clone()),
        ..SMALL
    };
    let policy = PlacementPolicy::default();
    assert_eq!(
        reject_reason(&hosts[1], &demand, &policy),
        None,
        "its own rack"
    );
    assert_eq!(
        reject_reason(&hosts[2], &demand, &policy),
        None,
        "a free rack"
    );
    assert_eq!(
        reject_reason(&hosts[0], &demand, &policy).as_deref(),
        Some("rack=r1 holds partition 1 of the group; this is partition 2")
    );
    assert_eq!(
        reject_reason(&hosts[3], &demand, &policy).as_deref(),
        Some("partitions by rack: the host has no rack label")
    );
    // Once partition 2 took r3 too, partition 3 has no rack left.
    p2.record(&hosts[2]);
    let p3 = Demand {
        partition: Some(PartitionDemand { mine: 3, ..p2 }),
        ..SMALL
    };
    assert_eq!(choose(&hosts, &p3, &policy), None);
    assert_eq!(choose_sampled(&hosts, &p3, &policy, &|_| 0, 5), None);
    // The emptiest partition comes next, the lowest of equals first.
    let members = BTreeMap::from([(1, 2), (2, 1)]);
    assert_eq!(emptiest_partition(3, &members), 3);
    assert_eq!(emptiest_partition(2, &members), 2);
    assert_eq!(emptiest_partition(3, &BTreeMap::new()), 1);
}

#[test]
fn traits_are_required_or_forbidden() {
    let mut gpu = host("gpu", "z1", 2, 0);
    gpu.traits.insert("gpu".into());
    let hosts = [host("plain", "z1", 0, 0), gpu];
    let needs_gpu = PlacementPolicy {
        require_traits: BTreeSet::from(["gpu".to_string()]),
        ..Default::default()
    };
    assert_eq!(
        choose(&hosts, &SMALL, &needs_gpu).map(|h| h.name.as_str()),
        Some("gpu")
    );
    assert_eq!(
        choose_sampled(&hosts, &SMALL, &needs_gpu, &|_| 0, 3),
        Some(1)
    );
    assert_eq!(
        reject_reason(&hosts[0], &SMALL, &needs_gpu).as_deref(),
        Some("requires trait gpu, the host lacks it")
    );
    let no_gpu = PlacementPolicy {
        forbid_traits: BTreeSet::from(["gpu".to_string()]),
        ..Default::default()
    };
    assert_eq!(
        choose(&hosts, &SMALL, &no_gpu).map(|h| h.name.as_str()),
        Some("plain")
    );
    assert_eq!(
        reject_reason(&hosts[1], &SMALL, &no_gpu).as_deref(),
        Some("forbids trait gpu, the host has it")
    );
    // Both at once is a contradiction, refused with its path.
    let both = PlacementPolicy {
        require_traits: BTreeSet::from(["gpu".to_string()]),
        forbid_traits: BTreeSet::from(["gpu".to_string()]),
        ..Default::default()
    };
    let e = validate(&both, "placement").unwrap_err();
    assert_eq!(e.path, "placement.forbid_traits");
    let bad = PlacementPolicy {
        require_traits: BTreeSet::from(["GPU!".to_string()]),
        ..Default::default()
    };
    assert_eq!(
        validate(&bad, "placement").unwrap_err().path,
        "placement.require_traits"
    );
    // Across policies too.
    let merged = merge(&[
        Sourced {
            source: "tenant".into(),
            policy: &needs_gpu,
            global: false,
        },
        Sourced {
            source: "placement".into(),
            policy: &no_gpu,
            global: false,
        },
    ]);
    assert_eq!(merged.unwrap_err().path, "placement.forbid_traits");
}

#[test]
fn a_demand_for_one_host_goes_there_or_nowhere() {
    let hosts = [host("a", "z1", 0, 0), host("b", "z1", 3, 0)];
    let pinned = Demand {
        only_host: Some(("b".into(), "snapshot s is kept on b".into())),
        ..Demand::new(1, 256)
    };
    let policy = PlacementPolicy::default();
    assert_eq!(
        choose(&hosts, &pinned, &policy).map(|h| h.name.as_str()),
        Some("b")
    );
    assert_eq!(choose_sampled(&hosts, &pinned, &policy, &|_| 0, 7), Some(1));
    let why = reject_reason(&hosts[0], &pinned, &policy).expect("not a");
    assert_eq!(why, "snapshot s is kept on b: only b can take it");
    let full = [host("a", "z1", 0, 0), host("b", "z1", 4, 0)];
    assert_eq!(choose(&full, &pinned, &policy), None);
}

#[test]
fn disk_is_counted_against_capacity_and_checked_against_free_space() {
    let mut h = host("a", "z1", 0, 0);
    // Not reported: not checked.
    assert_eq!(reject_reason(&h, &SMALL, &PlacementPolicy::default()), None);
    h.disk_mib = 4096;
    h.used_disk_mib = 3584;
    let why = reject_reason(&h, &SMALL, &PlacementPolicy::default()).expect("full");
    assert!(
        why.contains("needs 1024 MiB of disk, 512 of 4096 MiB unallocated"),
        "{why}"
    );
    let thin = PlacementPolicy {
        disk_overcommit: Some(2.0),
        ..Default::default()
    };
    assert_eq!(reject_reason(&h, &SMALL, &thin), None);
    // Whatever the ratio, a disk with less free than asked takes nothing.
    h.disk_free_mib = Some(1000);
    let why = reject_reason(&h, &SMALL, &thin).expect("no free space");
    assert!(why.contains("has 1000 MiB free"), "{why}");
    assert_eq!(choose_sampled(&[h], &SMALL, &thin, &|_| 0, 1), None);
}

#[test]
fn spread_prefers_fewer_of_the_group_then_emptier_hosts() {
    let hosts = [
        host("a", "z1", 0, 2),
        host("b", "z1", 3, 0),
        host("c", "z2", 1, 0),
    ];
    let chosen = choose(&hosts, &SMALL, &PlacementPolicy::default()).unwrap();
    assert_eq!(chosen.name, "c");
}

#[test]
fn binpack_prefers_the_fullest_host_that_fits() {
    let hosts = [
        host("a", "z1", 0, 0),
        host("b", "z1", 3, 0),
        host("c", "z1", 4, 0),
    ];
    let policy = PlacementPolicy {
        strategy: Some(PlacementStrategy::Binpack),
        ..Default::default()
    };
    assert_eq!(choose(&hosts, &SMALL, &policy).unwrap().name, "b");
}

#[test]
fn explain_names_every_reason() {
    let mut hosts = vec![
        host("a", "z1", 0, 0),
        host("b", "z2", 0, 0),
        host("c", "z1", 4, 0),
    ];
    hosts.push(HostView {
        cordoned: true,
        ..host("d", "z1", 0, 0)
    });
    hosts.push(HostView {
        down: true,
        ..host("e", "z1", 0, 0)
    });
    let policy = PlacementPolicy {
        require_labels: BTreeMap::from([("zone".into(), "z1".into())]),
        ..Default::default()
    };
    let e = explain(&hosts, &SMALL, &policy);
    assert_eq!(e.chosen.as_deref(), Some("a"));
    let reason = |n: &str| {
        e.hosts
            .iter()
            .find(|v| v.host == n)
            .unwrap()
            .rejected
            .clone()
    };
    assert_eq!(reason("a"), None);
    assert!(reason("b").unwrap().contains("requires label zone=z1"));
    assert!(reason("c").unwrap().contains("vCPUs"));
    assert!(reason("d").unwrap().contains("cordoned"));
    assert!(reason("e").unwrap().contains("down"));
}

#[test]
fn overcommit_and_max_per_host() {
    let hosts = [host("a", "z1", 4, 1)];
    assert!(choose(&hosts, &SMALL, &PlacementPolicy::default()).is_none());
    let over = PlacementPolicy {
        cpu_overcommit: Some(2.0),
        ..Default::default()
    };
    assert!(choose(&hosts, &SMALL, &over).is_some());
    let capped = PlacementPolicy {
        max_per_host: Some(1),
        ..over
    };
    assert!(choose(&hosts, &SMALL, &capped).is_none());
}

#[test]
fn label_preferences_add_weight() {
    let hosts = [host("a", "z1", 0, 0), host("b", "z2", 2, 0)];
    let policy = PlacementPolicy {
        prefer_labels: vec![LabelPreference {
            label: "zone".into(),
            value: "z2".into(),
            weight: 5.0,
        }],
        ..Default::default()
    };
    assert_eq!(choose(&hosts, &SMALL, &policy).unwrap().name, "b");
}

#[test]
fn contradictions_are_reported_with_their_path() {
    let policy = PlacementPolicy {
        require_labels: BTreeMap::from([("zone".into(), "z1".into())]),
        forbid_labels: BTreeMap::from([("zone".into(), "z1".into())]),
        ..Default::default()
    };
    let e = validate(&policy, "placement").unwrap_err();
    assert_eq!(e.path, "placement.forbid_labels.zone");
    let e = validate(
        &PlacementPolicy {
            max_per_host: Some(0),
            ..Default::default()
        },
        "placement",
    )
    .unwrap_err();
    assert_eq!(e.path, "placement.max_per_host");
    let e = validate(
        &PlacementPolicy {
            cpu_overcommit: Some(f64::NAN),
            ..Default::default()
        },
        "p",
    )
    .unwrap_err();
    assert_eq!(e.path, "p.cpu_overcommit");
}

#[test]
fn unknown_fields_are_rejected_with_their_name() {
    let e = serde_json::from_str::<PlacementPolicy>(r#"{"max_per_hots": 2}"#).unwrap_err();
    assert!(e.to_string().contains("max_per_hots"), "{e}");
}

fn arb_host() -> impl Strategy<Value = HostView> {
    (
        "[a-f]{1,3}",
        prop::sample::select(vec!["z1", "z2", "z3"]),
        any::<bool>(),
        any::<bool>(),
        1u32..16,
        0u64..20,
        0u32..4,
        (
            prop::sample::select(vec![0u64, 4096, 16384]),
            0u64..16384,
            prop::option::of(0u64..8192),
        ),
    )
        .prop_map(
            |(name, zone, down, cordoned, vcpus, used, group, (disk, used_disk, free))| HostView {
                name,
                labels: BTreeMap::from([("zone".to_string(), zone.to_string())]),
                down,
                cordoned,
                vcpus,
                memory_mib: u64::from(vcpus) * 1024,
                used_vcpus: used,
                used_memory_mib: used * 512,
                traits: if group % 2 == 0 {
                    BTreeSet::from(["kvm".to_string()])
                } else {
                    BTreeSet::new()
                },
                disk_mib: disk,
                used_disk_mib: used_disk.min(disk),
                disk_free_mib: free,
                group_count: group,
            },
        )
}

/// Whether `h` has disk room for `disk_mib` under `policy`.
fn disk_fits(h: &HostView, disk_mib: u64, policy: &PlacementPolicy) -> bool {
    let limit = (h.disk_mib as f64 * policy.disk_overcommit.unwrap_or(1.0)).floor() as u64;
    h.disk_mib == 0
        || (h.used_disk_mib + disk_mib <= limit && h.disk_free_mib.is_none_or(|f| f >= disk_mib))
}

fn arb_policy() -> impl Strategy<Value = PlacementPolicy> {
    (
        prop::option::of(prop::sample::select(vec!["z1", "z2"])),
        prop::option::of(prop::sample::select(vec!["z2", "z3"])),
        prop::option::of(prop::sample::select(vec![0.5, 1.0, 2.0, 4.0])),
        prop::option::of(1u32..4),
        any::<bool>(),
        0u8..3,
    )
        .prop_map(|(req, forbid, over, max, binpack, kvm)| PlacementPolicy {
            require_traits: (kvm == 1).then(|| "kvm".to_string()).into_iter().collect(),
            forbid_traits: (kvm == 2).then(|| "kvm".to_string()).into_iter().collect(),
            require_labels: req
                .map(|z| BTreeMap::from([("zone".into(), z.into())]))
                .unwrap_or_default(),
            forbid_labels: forbid
                .map(|z| BTreeMap::from([("zone".into(), z.into())]))
                .unwrap_or_default(),
            cpu_overcommit: over,
            memory_overcommit: over,
            disk_overcommit: over,
            max_per_host: max,
            strategy: Some(if binpack {
                PlacementStrategy::Binpack
            } else {
                PlacementStrategy::Spread
            }),
            ..Default::default()
        })
}

proptest! {
    /// No placement ever breaks a hard rule, and one is found whenever a
    /// host passes every filter.
    #[test]
    fn placements_never_break_hard_rules(
        hosts in prop::collection::vec(arb_host(), 0..12),
        policy in arb_policy(),
        vcpus in 1u32..4,
    ) {
        let demand = Demand::new(vcpus, u64::from(vcpus) * 256).with_disk(u64::from(vcpus) * 1024);
        let chosen = choose(&hosts, &demand, &policy);
        let any_fits = hosts.iter().any(|h| reject_reason(h, &demand, &policy).is_none());
        prop_assert_eq!(chosen.is_some(), any_fits);
        if let Some(h) = chosen {
            prop_assert!(!h.down && !h.cordoned);
            let cpu_limit = (f64::from(h.vcpus) * policy.cpu_overcommit.unwrap_or(1.0)).floor() as u64;
            prop_assert!(h.used_vcpus + u64::from(vcpus) <= cpu_limit);
            prop_assert!(disk_fits(h, demand.disk_mib, &policy));
            for (k, v) in &policy.require_labels {
                prop_assert_eq!(h.labels.get(k), Some(v));
            }
            for (k, v) in &policy.forbid_labels {
                prop_assert_ne!(h.labels.get(k), Some(v));
            }
            prop_assert!(policy.require_traits.is_subset(&h.traits));
            prop_assert!(policy.forbid_traits.is_disjoint(&h.traits));
            if let Some(max) = policy.max_per_host {
                prop_assert!(h.group_count < max);
            }
        }
    }
}

proptest! {
    /// The sampled path (large fleets) keeps every hard rule too, agrees
    /// with the message-building filter, and finds a host whenever one fits.
    #[test]
    fn sampled_placements_never_break_hard_rules(
        hosts in prop::collection::vec(arb_host(), 0..40),
        policy in arb_policy(),
        vcpus in 1u32..4,
        seed in any::<u64>(),
    ) {
        let demand = Demand::new(vcpus, u64::from(vcpus) * 256).with_disk(u64::from(vcpus) * 1024);
        let chosen = choose_sampled(&hosts, &demand, &policy, &|i| hosts[i].group_count, seed);
        let any_fits = hosts.iter().any(|h| reject_reason(h, &demand, &policy).is_none());
        prop_assert_eq!(chosen.is_some(), any_fits);
        if let Some(i) = chosen {
            prop_assert_eq!(reject_reason(&hosts[i], &demand, &policy), None);
        }
    }
}

proptest! {
    /// Runs of placements in a row (each counting the ones before, as a
    /// run does) never break hard affinity, hard anti-affinity, a
    /// `max_per_label` limit or capacity, on either path; a placement is
    /// refused only when no host passes.
    #[test]
    fn runs_of_placements_keep_affinity_and_label_limits(
        hosts in prop::collection::vec(arb_host(), 1..14),
        near in prop::collection::vec(any::<bool>(), 14),
        away in prop::collection::vec(any::<bool>(), 14),
        use_near in any::<bool>(),
        use_away in any::<bool>(),
        zone_max in prop::option::of(1u32..3),
        partitions in prop::option::of(1u32..4),
        count in 1usize..10,
        sampled in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let mut hosts = hosts;
        for (i, h) in hosts.iter_mut().enumerate() {
            h.name = format!("h{i}");
            h.group_count = 0;
        }
        let set_of = |pick: &[bool]| -> BTreeSet<String> {
            hosts.iter().enumerate().filter(|(i, _)| pick[*i]).map(|(_, h)| h.name.clone()).collect()
        };
        let (near_set, away_set) = (set_of(&near), set_of(&away));
        let mut policy = PlacementPolicy::default();
        let mut sets = Vec::new();
        let rule = |value: &str, toward: bool| flotilla_api::control::AffinityRule {
            tag: "app".into(),
            value: value.into(),
            toward,
            hard: true,
            weight: 1.0,
        };
        if use_near {
            policy.affinity.push(rule("db", true));
            sets.push(near_set.clone());
        }
        if use_away {
            policy.affinity.push(rule("cache", false));
            sets.push(away_set.clone());
        }
        if let Some(m) = zone_max {
            policy.max_per_label.insert("zone".into(), m);
        }
        let mut counts = vec![0u32; hosts.len()];
        // Partitions by zone: (host index, partition) of each placed.
        let mut members: Vec<(usize, u32)> = Vec::new();
        for n in 0..count {
            let views: Vec<HostView> = hosts
                .iter()
                .zip(&counts)
                .map(|(h, c)| HostView { group_count: *c, ..h.clone() })
                .collect();
            let partition = partitions.map(|p| {
                let mut sizes = BTreeMap::new();
                for (_, m) in &members {
                    *sizes.entry(*m).or_insert(0) += 1;
                }
                PartitionDemand {
                    label: "zone".into(),
                    mine: emptiest_partition(p, &sizes),
                    taken: partitions_taken(
                        "zone",
                        members.iter().map(|(i, m)| (views[*i].name.as_str(), *m)),
                        |name| views.iter().find(|v| v.name == name).map(|v| &v.labels),
                    ),
                }
            });
            let demand = Demand {
                full_domains: full_domains(&policy, views.iter().map(|v| (&v.labels, v.group_count))),
                affinity_hosts: sets.clone(),
                partition: partition.clone(),
                ..Demand::new(1, 256).with_disk(1024)
            };
            let count_of = |i: usize| counts[i];
            let chosen = if sampled {
                choose_sampled(&views, &demand, &policy, &count_of, seed.wrapping_add(n as u64))
            } else {
                choose_index(&views, &demand, &policy, &count_of)
            };
            let Some(i) = chosen else {
                prop_assert!(views.iter().all(|h| reject_reason(h, &demand, &policy).is_some()));
                break;
            };
            let h = &views[i];
            prop_assert!(!h.down && !h.cordoned);
            prop_assert!(h.used_vcpus < u64::from(h.vcpus), "{} is full", h.name);
            prop_assert!(disk_fits(h, 1024, &policy), "{}'s disk is full", h.name);
            if use_near {
                prop_assert!(near_set.contains(&h.name), "{} holds no db", h.name);
            }
            if use_away {
                prop_assert!(!away_set.contains(&h.name), "{} holds a cache", h.name);
            }
            if let Some(p) = &partition {
                members.push((i, p.mine));
                let mut per_zone: BTreeMap<&String, BTreeSet<u32>> = BTreeMap::new();
                for (j, m) in &members {
                    if let Some(z) = hosts[*j].labels.get("zone") {
                        per_zone.entry(z).or_default().insert(*m);
                    }
                }
                prop_assert!(per_zone.values().all(|ps| ps.len() == 1), "{per_zone:?}");
            }
            counts[i] += 1;
            hosts[i].used_vcpus += 1;
            hosts[i].used_memory_mib += 256;
            hosts[i].used_disk_mib += 1024;
            if let Some(m) = zone_max {
                let mut per_zone: BTreeMap<&String, u32> = BTreeMap::new();
                for (h, c) in hosts.iter().zip(&counts) {
                    if let Some(z) = h.labels.get("zone") {
                        *per_zone.entry(z).or_default() += c;
                    }
                }
                prop_assert!(per_zone.values().all(|&c| c <= m), "{per_zone:?} over {m}");
            }
        }
    }
}

#[test]
fn large_fleets_are_sampled_yet_spread() {
    let hosts: Vec<HostView> = (0..2000)
        .map(|i| host(&format!("h{i:04}"), "z1", (i % 4) as u64, 0))
        .collect();
    let mut used = vec![0u32; hosts.len()];
    let policy = PlacementPolicy::default();
    for seed in 0..500u64 {
        let i = choose_sampled(
            &hosts,
            &SMALL,
            &policy,
            &|i| used[i],
            seed.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        )
        .unwrap();
        used[i] += 1;
        // Spread with the group count: a host rarely gets a second one.
    }
    assert!(
        used.iter().all(|&u| u <= 2),
        "max {}",
        used.iter().max().unwrap()
    );
}

#[test]
fn label_domains_at_their_limit_are_out_and_cluster_keeps_groups_together() {
    let mut hosts = vec![
        host("a", "z1", 0, 1),
        host("b", "z1", 0, 0),
        host("c", "z2", 0, 0),
    ];
    let policy = PlacementPolicy {
        max_per_label: BTreeMap::from([("zone".to_string(), 1)]),
        ..Default::default()
    };
    let demand = Demand {
        full_domains: full_domains(&policy, hosts.iter().map(|h| (&h.labels, h.group_count))),
        ..SMALL
    };
    assert_eq!(
        demand.full_domains,
        BTreeSet::from([("zone".to_string(), "z1".to_string())])
    );
    let e = explain(&hosts, &demand, &policy);
    assert_eq!(e.chosen.as_deref(), Some("c"));
    let why = e.hosts[1].rejected.clone().unwrap();
    assert!(
        why.contains("zone=z1 already holds 1 of the group (max_per_label zone 1)"),
        "{why}"
    );
    // Cluster: where the group already is.
    hosts[2].group_count = 0;
    let cluster = PlacementPolicy {
        strategy: Some(PlacementStrategy::Cluster),
        ..Default::default()
    };
    assert_eq!(choose(&hosts, &SMALL, &cluster).unwrap().name, "a");
    assert!(validate(
        &PlacementPolicy {
            max_per_label: BTreeMap::from([("rack".into(), 0)]),
            ..Default::default()
        },
        "p"
    )
    .is_err());
}

#[test]
fn affinity_rules_hard_and_soft() {
    use flotilla_api::control::AffinityRule;
    let hosts = [host("a", "z1", 3, 0), host("b", "z1", 0, 0)];
    let rule = |toward: bool, hard: bool| AffinityRule {
        tag: "app".into(),
        value: "db".into(),
        toward,
        hard,
        weight: 10.0,
    };
    let near_a = Demand {
        affinity_hosts: vec![BTreeSet::from(["a".to_string()])],
        ..SMALL
    };
    let policy = |r| PlacementPolicy {
        affinity: vec![r],
        ..Default::default()
    };
    // Hard: only where db is, or only where it is not.
    assert_eq!(
        choose(&hosts, &near_a, &policy(rule(true, true)))
            .unwrap()
            .name,
        "a"
    );
    assert_eq!(
        choose(&hosts, &near_a, &policy(rule(false, true)))
            .unwrap()
            .name,
        "b"
    );
    let e = explain(&hosts, &near_a, &policy(rule(true, true)));
    assert!(e.hosts[1]
        .rejected
        .clone()
        .unwrap()
        .contains("affinity: holds no instance with app=db"));
    // Soft: a fuller host wins by the weight.
    assert_eq!(
        choose(&hosts, &near_a, &policy(rule(true, false)))
            .unwrap()
            .name,
        "a"
    );
    // Near and away at once, both hard: refused with the path.
    let both = PlacementPolicy {
        affinity: vec![rule(true, true), rule(false, true)],
        ..Default::default()
    };
    assert_eq!(validate(&both, "p").unwrap_err().path, "p.affinity[1]");
}
