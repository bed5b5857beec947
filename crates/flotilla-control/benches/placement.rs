//! Placement benchmark (issue 4): 10,000 hosts holding 100,000 instances,
//! new instances placed under anti-affinity (at most one of a group per
//! host) and spread with a zone preference; decisions per second on one
//! core and p99 decision time. Then the API's read throughput (describe and
//! list) over a SQLite store holding the same 100,000 instances.
//!
//! Run with `cargo bench -p flotilla-control --bench placement`. Prints a
//! Markdown table for BENCHMARKS.md.

#![allow(clippy::unwrap_used)] // A benchmark fails loudly.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_api::control::{
    HostHeartbeat, LabelPreference, PlacementPolicy, PlacementStrategy, RunInstancesRequest,
};
use flotilla_api::Resources;
use flotilla_control::auth::Caller;
use flotilla_control::placement::{choose_exhaustive, choose_sampled, Demand, HostView};
use flotilla_control::store::{NewInstance, Store};
use flotilla_control::{ControlPlane, ControlSettings};
use rand::{Rng, SeedableRng};

const HOSTS: usize = 10_000;
const EXISTING: usize = 100_000;
const GROUP_SIZE: usize = 10;
const NEW: usize = 40_000;
/// Runs through the whole control plane path.
const RUNS: usize = 2_000;
/// Runs of 100 instances each.
const BATCHES: usize = 50;
/// Concurrent callers of the run path.
const CALLERS: usize = 8;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn main() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut hosts: Vec<HostView> = (0..HOSTS)
        .map(|i| HostView {
            disk_mib: 0,
            traits: Default::default(),
            used_disk_mib: 0,
            disk_free_mib: None,
            name: format!("h{i:05}"),
            labels: BTreeMap::from([
                ("zone".to_string(), format!("z{}", i % 10)),
                ("rack".to_string(), format!("r{}", i % 200)),
            ]),
            down: i % 500 == 0,
            cordoned: i % 777 == 0,
            vcpus: 16,
            memory_mib: 65536,
            used_vcpus: 0,
            used_memory_mib: 0,
            group_count: 0,
        })
        .collect();
    // 100,000 instances in groups of 10, one of a group per host.
    let groups = EXISTING / GROUP_SIZE;
    let mut members: Vec<HashMap<usize, u32>> = vec![HashMap::new(); groups];
    let mut placed_hosts = Vec::with_capacity(EXISTING);
    for (g, counts) in members.iter_mut().enumerate() {
        while counts.len() < GROUP_SIZE {
            let h = rng.gen_range(0..HOSTS);
            if counts.contains_key(&h) || hosts[h].used_vcpus >= 12 {
                continue;
            }
            counts.insert(h, 1);
            hosts[h].used_vcpus += 1;
            hosts[h].used_memory_mib += 1024;
            placed_hosts.push((g, h));
        }
    }
    let policy = PlacementPolicy {
        max_per_host: Some(1),
        strategy: Some(PlacementStrategy::Spread),
        prefer_labels: vec![LabelPreference {
            label: "zone".into(),
            value: "z3".into(),
            weight: 0.1,
        }],
        ..Default::default()
    };
    let demand = Demand::new(1, 1024);

    // The sampled path, as the control plane runs it above 256 hosts: one
    // thread, state updated after each decision.
    let mut times = Vec::with_capacity(NEW);
    let mut failed = 0;
    let started = Instant::now();
    for _ in 0..NEW {
        let g = rng.gen_range(0..groups);
        let seed: u64 = rng.gen();
        let t = Instant::now();
        let counts = &members[g];
        let chosen = choose_sampled(
            &hosts,
            &demand,
            &policy,
            &|h| counts.get(&h).copied().unwrap_or(0),
            seed,
        );
        times.push(t.elapsed());
        match chosen {
            Some(h) => {
                hosts[h].used_vcpus += 1;
                hosts[h].used_memory_mib += 1024;
                *members[g].entry(h).or_default() += 1;
            }
            None => failed += 1,
        }
    }
    let wall = started.elapsed();
    times.sort();
    let per_sec = NEW as f64 / times.iter().sum::<Duration>().as_secs_f64();
    // Every hard rule held.
    assert!(
        members.iter().all(|m| m.values().all(|&c| c <= 1)),
        "anti-affinity broken"
    );
    assert!(
        hosts.iter().all(|h| h.used_vcpus <= 16),
        "a host oversubscribed"
    );

    // The exhaustive path for comparison (a few hundred decisions).
    let sample = 300;
    let t = Instant::now();
    for i in 0..sample {
        let counts = &members[i % groups];
        for (h, host) in hosts.iter_mut().enumerate() {
            host.group_count = counts.get(&h).copied().unwrap_or(0);
        }
        let _ = choose_exhaustive(&hosts, &demand, &policy);
    }
    let exhaustive_per_sec = sample as f64 / t.elapsed().as_secs_f64();

    println!("{HOSTS} hosts (16 vCPUs, 64 GiB; 10 zones, 200 racks; 20 down, 13 cordoned), {EXISTING} instances in groups of {GROUP_SIZE}; {NEW} new 1-vCPU instances, each in a random group; policy: max_per_host 1 of the group, spread, prefer zone=z3");
    println!();
    println!("| metric | value |");
    println!("| --- | --- |");
    println!("| placements per second, one core (sampled path) | {per_sec:.0} |");
    println!(
        "| decision time p50 / p99 / max | {:.1} µs / {:.1} µs / {:.1} µs |",
        micros(percentile(&times, 0.5)),
        micros(percentile(&times, 0.99)),
        micros(times[times.len() - 1])
    );
    println!(
        "| wall time for {NEW} placements incl. state updates | {:.2} s |",
        wall.as_secs_f64()
    );
    println!("| placements refused (no host fits) | {failed} |");
    println!(
        "| placements per second, scoring every host (exhaustive) | {exhaustive_per_sec:.0} |"
    );

    api_reads(&placed_hosts);
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Describe and list through the HTTP API over SQLite holding the instances.
fn api_reads(placed: &[(usize, usize)]) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("sqlite://{}", dir.path().join("c.db").display()))
            .await
            .unwrap();
        store.create_tenant("t-bench", "bench").await.unwrap();
        let rows: Vec<(NewInstance, String)> = placed
            .iter()
            .enumerate()
            .map(|(i, (g, h))| {
                (
                    NewInstance {
                        disk_mib: 0,
                        from_snapshot: None,
                        id: format!("i-{i:08}"),
                        tenant_id: "t-bench".into(),
                        name: format!("inst-{i:06}"),
                        image: None,
                        vcpus: 1,
                        memory_mib: 1024,
                        tags: BTreeMap::from([("group".to_string(), format!("g{g}"))]),
                        operation: None,
                        ip: None,
                    },
                    format!("h{h:05}"),
                )
            })
            .collect();
        let t = Instant::now();
        for chunk in rows.chunks(10_000) {
            store.import_instances(chunk).await.unwrap();
        }
        let import = t.elapsed();
        // The hosts, registered as agents would (endpoints nothing answers:
        // the runs' operations fail fast in the background).
        for i in 0..HOSTS {
            let beat = HostHeartbeat {
                disk: None,
                traits: Default::default(),
                endpoint: "http://127.0.0.1:9".into(),
                agent_token: None,
                tls_fingerprint: None,
                capacity: Resources { vcpus: 16, memory_mib: 65536 },
                labels: BTreeMap::from([("zone".to_string(), format!("z{}", i % 10))]),
                vms: vec![],
                vm_subnet: None,
                routes_version: None,
            };
            store.record_heartbeat(&format!("h{i:05}"), &beat).await.unwrap();
        }
        let cp = ControlPlane::new(store, ControlSettings::default());
        cp.ensure_admin_token("flt_bench").await.unwrap();
        let caller = Caller { token_id: "bench".into(), tenant_id: Some("t-bench".into()), admin: false, host: None };
        let policy = PlacementPolicy { max_per_host: Some(1), strategy: Some(PlacementStrategy::Spread), ..Default::default() };
        let mut lat = Vec::with_capacity(RUNS);
        let t = Instant::now();
        for i in 0..RUNS {
            let req = run_of_one(format!("new-{i:05}"), (i * 7) % (EXISTING / GROUP_SIZE), &policy);
            let s = Instant::now();
            cp.run_instances(&caller, None, &req).await.unwrap();
            lat.push(s.elapsed().as_secs_f64());
        }
        let run_rate = RUNS as f64 / t.elapsed().as_secs_f64();
        lat.sort_by(f64::total_cmp);
        let (run_p50, run_p99) = (lat[lat.len() / 2], lat[lat.len() * 99 / 100]);
        // The same runs from concurrent callers (an API server's load):
        // their commits share fsyncs.
        let syncs_before = cp.store().log_syncs().unwrap_or(0);
        let t = Instant::now();
        let callers: Vec<_> = (0..CALLERS)
            .map(|c| {
                let (cp, caller, policy) = (cp.clone(), caller.clone(), policy.clone());
                tokio::spawn(async move {
                    for i in (c..RUNS).step_by(CALLERS) {
                        let req = run_of_one(format!("conc-{i:05}"), (i * 11) % (EXISTING / GROUP_SIZE), &policy);
                        cp.run_instances(&caller, None, &req).await.unwrap();
                    }
                })
            })
            .collect();
        for c in callers {
            c.await.unwrap();
        }
        let concurrent_rate = RUNS as f64 / t.elapsed().as_secs_f64();
        let concurrent_syncs = cp.store().log_syncs().unwrap_or(0) - syncs_before;
        // Runs of 100 at once: one decision each, one commit for the lot.
        let t = Instant::now();
        for i in 0..BATCHES {
            let req = RunInstancesRequest {
                disk_mib: flotilla_api::control::DEFAULT_INSTANCE_DISK_MIB,
                from_snapshot: None,
                volumes: Vec::new(),
                name: format!("batch-{i:03}"),
                count: 100,
                image: None,
                vcpus: 1,
                memory_mib: 1024,
                tags: BTreeMap::from([("group".to_string(), format!("batch-{i}"))]),
                placement: Some(policy.clone()),
            };
            cp.run_instances(&caller, None, &req).await.unwrap();
        }
        let batch_rate = (BATCHES * 100) as f64 / t.elapsed().as_secs_f64();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            axum::serve(listener, flotilla_control::http::router(cp))
                .await
                .unwrap()
        });
        let http = reqwest::Client::new();
        let n = placed.len();
        let describe = throughput(&http, &base, move |i| {
            format!("/v1/instances/inst-{:06}?tenant=t-bench", (i * 7919) % n)
        })
        .await;
        let list = throughput(&http, &base, move |i| {
            format!(
                "/v1/instances?tenant=t-bench&page_size=100&page_token=inst-{:06}",
                (i * 7919) % n
            )
        })
        .await;
        let by_tag = throughput(&http, &base, move |i| {
            format!(
                "/v1/instances?tenant=t-bench&tag=group=g{}",
                (i * 31) % (n / GROUP_SIZE)
            )
        })
        .await;
        println!(
            "| API: import of {n} instances into SQLite | {:.2} s |",
            import.as_secs_f64()
        );
        println!("| run through the control plane (service call, SQLite, durable), {RUNS} sequential, same policy | {run_rate:.0} placements/s, p50 {:.1} ms, p99 {:.1} ms |", run_p50 * 1e3, run_p99 * 1e3);
        println!("| run through the control plane, {RUNS} runs of 1 from {CALLERS} concurrent callers | {concurrent_rate:.0} placements/s, {concurrent_syncs} log fsyncs |");
        println!("| run through the control plane, {BATCHES} runs of `count: 100` (one commit each) | {batch_rate:.0} placements/s |");
        println!("| API: describe (GET /v1/instances/NAME), 8 clients | {describe:.0} req/s |");
        println!("| API: list, pages of 100 by name, 8 clients | {list:.0} req/s |");
        println!("| API: list by tag (a group of 10 among {n}), 8 clients | {by_tag:.0} req/s |");
    });
}

/// A run of one 1-vCPU instance in group `g{group}` under `policy`.
fn run_of_one(name: String, group: usize, policy: &PlacementPolicy) -> RunInstancesRequest {
    RunInstancesRequest {
        disk_mib: flotilla_api::control::DEFAULT_INSTANCE_DISK_MIB,
        from_snapshot: None,
        volumes: Vec::new(),
        name,
        count: 1,
        image: None,
        vcpus: 1,
        memory_mib: 1024,
        tags: BTreeMap::from([("group".to_string(), format!("g{group}"))]),
        placement: Some(policy.clone()),
    }
}

/// Requests per second from 8 concurrent clients over 3 seconds.
async fn throughput(
    http: &reqwest::Client,
    base: &str,
    path: impl Fn(usize) -> String + Send + Sync + 'static,
) -> f64 {
    let path = Arc::new(path);
    let done = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(3);
    let mut tasks = Vec::new();
    for c in 0..8 {
        let (http, base, path, done) = (http.clone(), base.to_string(), path.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = c * 1_000_003;
            while Instant::now() < until {
                let r = http
                    .get(format!("{base}{}", path(i)))
                    .bearer_auth("flt_bench")
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success(), "{}", r.status());
                let _ = r.bytes().await.unwrap();
                done.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / 3.0
}
