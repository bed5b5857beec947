//! The state store's behaviour, checked on SQLite and on a real PostgreSQL
//! server alike: one schema, one code path.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::collections::BTreeMap;

use flotilla_api::control::{HostHeartbeat, ObservedState, OperationState, ReportedVm};
use flotilla_api::{Resources, VmState};
use flotilla_control::store::{
    InstanceFilter, NewInstance, OperationRow, Placement, Store, StoreError,
};
use flotilla_testkit::PgServer;

/// A SQLite store and a PostgreSQL store, with what keeps them alive.
async fn stores(test: &str) -> (Vec<Store>, tempfile::TempDir, PgServer) {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Store::open(&format!("sqlite://{}", dir.path().join("c.db").display()))
        .await
        .unwrap();
    let pg = PgServer::start().unwrap();
    let postgres = Store::open(&pg.url(test).unwrap()).await.unwrap();
    (vec![sqlite, postgres], dir, pg)
}

fn beat(vcpus: u32) -> HostHeartbeat {
    HostHeartbeat {
        disk: None,
        traits: Default::default(),
        endpoint: "http://127.0.0.1:9".into(),
        agent_token: None,
        tls_fingerprint: None,
        capacity: Resources {
            vcpus,
            memory_mib: 4096,
        },
        labels: BTreeMap::from([("zone".into(), "z1".into())]),
        vms: vec![],
        vm_subnet: None,
        routes_version: None,
    }
}

fn instance(tenant: &str, name: &str, tags: &[(&str, &str)]) -> NewInstance {
    NewInstance {
        disk_mib: 0,
        from_snapshot: None,
        id: format!("i-{name}"),
        tenant_id: tenant.into(),
        name: name.into(),
        image: None,
        vcpus: 1,
        memory_mib: 256,
        tags: tags
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        operation: None,
        ip: None,
    }
}

#[tokio::test]
async fn tenants_tokens_and_migrations() {
    let (stores, dir, pg) = stores("tenants").await;
    for store in &stores {
        store.create_tenant("t-1", "acme").await.unwrap();
        let dup = store.create_tenant("t-2", "acme").await.unwrap_err();
        assert!(matches!(dup, StoreError::Duplicate(_)), "{dup}");
        assert_eq!(
            store.tenant_by_name("acme").await.unwrap().unwrap().id,
            "t-1"
        );
        store
            .create_token("tok-1", "hash-1", Some("t-1"), false, None)
            .await
            .unwrap();
        let tok = store.token_by_hash("hash-1").await.unwrap().unwrap();
        assert_eq!((tok.tenant_id.as_deref(), tok.admin), (Some("t-1"), false));
        assert!(!store.has_admin_token().await.unwrap());
        assert!(store.token_by_hash("nope").await.unwrap().is_none());
    }
    // Opening again applies nothing twice and keeps the data.
    let again = Store::open(&format!("sqlite://{}", dir.path().join("c.db").display()))
        .await
        .unwrap();
    assert!(again.tenant_by_name("acme").await.unwrap().is_some());
    let again = Store::open(&pg.url("tenants").unwrap()).await.unwrap();
    assert!(again.tenant_by_name("acme").await.unwrap().is_some());
}

#[tokio::test]
async fn hosts_heartbeats_down_and_placement_versions() {
    let (stores, _dir, _pg) = stores("hosts").await;
    for store in &stores {
        store.create_tenant("t-1", "acme").await.unwrap();
        assert!(!store.record_heartbeat("h1", &beat(4)).await.unwrap());
        let h = store.host("h1").await.unwrap().unwrap();
        assert_eq!((h.vcpus, h.down, h.version), (4, false, 0));
        assert_eq!(h.agent_token, None);
        // The agent's token is kept from the last beat that gave one.
        let with_token = HostHeartbeat {
            disk: None,
            traits: Default::default(),
            agent_token: Some("fla_x".into()),
            tls_fingerprint: None,
            ..beat(4)
        };
        store.record_heartbeat("h1", &with_token).await.unwrap();
        store.record_heartbeat("h1", &beat(4)).await.unwrap();
        let h = store.host("h1").await.unwrap().unwrap();
        assert_eq!((h.agent_token.as_deref(), h.version), (Some("fla_x"), 0));
        // Two placements decided on the same version: only one commits.
        let p = Placement {
            host: "h1".into(),
            host_version: h.version,
        };
        store
            .commit_placement(&instance("t-1", "a", &[]), &p)
            .await
            .unwrap();
        let lost = store
            .commit_placement(&instance("t-1", "b", &[]), &p)
            .await
            .unwrap_err();
        assert!(matches!(lost, StoreError::Contended));
        assert!(
            store.instance("i-b").await.unwrap().is_none(),
            "nothing half-written"
        );
        let h = store.host("h1").await.unwrap().unwrap();
        assert_eq!((h.used_vcpus, h.instances, h.version), (1, 1, 1));
        // A name is unique within a tenant.
        let p = Placement {
            host: "h1".into(),
            host_version: 1,
        };
        let dup = store.commit_placement(&instance("t-1", "a", &[]), &p).await;
        assert!(dup.is_err());
        // A batch commits whole, with its operation, or not at all.
        let op = OperationRow {
            id: "op-batch".into(),
            tenant_id: Some("t-1".into()),
            kind: "run".into(),
            targets: vec!["i-c".into(), "i-d".into()],
            state: OperationState::Running,
            steps: vec![],
            input: serde_json::json!("run"),
            error: None,
            created_at: 1,
            updated_at: 1,
        };
        let batch = [
            (instance("t-1", "c", &[]), "h1".to_string()),
            (instance("t-1", "d", &[]), "h1".to_string()),
        ];
        let stale = BTreeMap::from([("h1".to_string(), 0)]);
        let lost = store
            .commit_run(&batch, &stale, None, &[], &op, "r", i64::MAX)
            .await
            .unwrap_err();
        assert!(matches!(lost, StoreError::Contended));
        assert!(store.instance("i-c").await.unwrap().is_none());
        assert!(store.operation("op-batch").await.unwrap().is_none());
        let current = BTreeMap::from([("h1".to_string(), 1)]);
        store
            .commit_run(&batch, &current, None, &[], &op, "r", i64::MAX)
            .await
            .unwrap();
        assert!(store.instance("i-d").await.unwrap().is_some());
        assert!(store.operation("op-batch").await.unwrap().is_some());
        assert_eq!(store.host("h1").await.unwrap().unwrap().instances, 3);
        // A group guard: two commits decided on the same group version,
        // one wins, even on different hosts.
        assert_eq!(store.group_version("t-1", "group", "g").await.unwrap(), 0);
        let guard = flotilla_control::store::GroupGuard {
            tenant_id: "t-1".into(),
            tag: "group".into(),
            value: "g".into(),
            version: 0,
        };
        let v = store.host("h1").await.unwrap().unwrap().version;
        let one = [(instance("t-1", "e", &[]), "h1".to_string())];
        let mut op_e = op.clone();
        op_e.id = "op-e".into();
        store
            .commit_run(
                &one,
                &BTreeMap::from([("h1".to_string(), v)]),
                Some(&guard),
                &[],
                &op_e,
                "r",
                1,
            )
            .await
            .unwrap();
        let mut op_f = op.clone();
        op_f.id = "op-f".into();
        let two = [(instance("t-1", "f", &[]), "h1".to_string())];
        let lost = store
            .commit_run(
                &two,
                &BTreeMap::from([("h1".to_string(), v + 1)]),
                Some(&guard),
                &[],
                &op_f,
                "r",
                1,
            )
            .await
            .unwrap_err();
        assert!(matches!(lost, StoreError::Contended));
        assert_eq!(store.group_version("t-1", "group", "g").await.unwrap(), 1);
        // Moves into the group are guarded alike: a move decided before a
        // placement into the group commits only by deciding again.
        store.record_heartbeat("h2", &beat(4)).await.unwrap();
        let v2 = store.host("h2").await.unwrap().unwrap().version;
        let moved = store
            .begin_migration("i-e", "h1", "h2", v2, Some(&guard))
            .await
            .unwrap_err();
        assert!(matches!(moved, StoreError::Contended));
        let replaced = store
            .place_again("i-e", "h1", "h2", v2, Some(&guard))
            .await
            .unwrap_err();
        assert!(matches!(replaced, StoreError::Contended));
        assert_eq!(
            store
                .instance("i-e")
                .await
                .unwrap()
                .unwrap()
                .host
                .as_deref(),
            Some("h1")
        );
        let current = flotilla_control::store::GroupGuard {
            version: 1,
            ..guard.clone()
        };
        store
            .place_again("i-e", "h1", "h2", v2, Some(&current))
            .await
            .unwrap();
        assert_eq!(store.group_version("t-1", "group", "g").await.unwrap(), 2);
        assert_eq!(
            store
                .instance("i-e")
                .await
                .unwrap()
                .unwrap()
                .host
                .as_deref(),
            Some("h2")
        );
        let v1 = store.host("h1").await.unwrap().unwrap().version;
        store
            .place_again("i-e", "h2", "h1", v1, None)
            .await
            .unwrap();
        // What a host holds changing (an instance leaving or changing its
        // tags) gives it a new version: a placement decided on the old set
        // (hard affinity near or away from instances there) decides again.
        let before = store.host("h1").await.unwrap().unwrap().version;
        store.delete_instance("i-e").await.unwrap();
        let c = store.instance("i-c").await.unwrap().unwrap();
        store
            .update_tags(&c, &BTreeMap::from([("app".into(), "db".into())]))
            .await
            .unwrap();
        let after = store.host("h1").await.unwrap().unwrap().version;
        assert_eq!(after, before + 2);
        // An address another instance holds is not taken over.
        store
            .set_observed("i-d", ObservedState::Running, Some("10.0.0.9"), None)
            .await
            .unwrap();
        store
            .set_observed("i-a", ObservedState::Running, Some("10.0.0.9"), None)
            .await
            .unwrap();
        assert_eq!(store.instance("i-a").await.unwrap().unwrap().ip, None);
        store.delete_instance("i-c").await.unwrap();
        store.delete_instance("i-d").await.unwrap();
        // Missed heartbeats: down, and its instances unknown (not dropped).
        store
            .set_observed("i-a", ObservedState::Running, Some("10.0.0.2"), None)
            .await
            .unwrap();
        let mut marked = store.mark_stale_hosts_down(i64::MAX).await.unwrap();
        marked.sort();
        assert_eq!(marked, vec!["h1".to_string(), "h2".to_string()]);
        let a = store.instance("i-a").await.unwrap().unwrap();
        assert_eq!(
            (a.observed, a.ip.as_deref()),
            (ObservedState::Unknown, Some("10.0.0.2"))
        );
        // A heartbeat brings it back and says it was down.
        let mut b = beat(4);
        b.vms.push(ReportedVm {
            name: "i-a".into(),
            state: VmState::Running,
            ip: None,
        });
        assert!(store.record_heartbeat("h1", &b).await.unwrap());
        assert!(!store.host("h1").await.unwrap().unwrap().down);
        assert!(store.set_cordoned("h1", true).await.unwrap());
        assert!(store.host("h1").await.unwrap().unwrap().cordoned);
        assert!(!store.set_cordoned("nope", true).await.unwrap());
    }
}

#[tokio::test]
async fn instance_lists_filter_by_tag_state_and_page() {
    let (stores, _dir, _pg) = stores("lists").await;
    for store in &stores {
        store.create_tenant("t-1", "acme").await.unwrap();
        store.create_tenant("t-2", "other").await.unwrap();
        store.record_heartbeat("h1", &beat(64)).await.unwrap();
        for (i, name) in ["web-1", "web-2", "db-1", "x_y"].iter().enumerate() {
            let tags: &[(&str, &str)] = match *name {
                "db-1" => &[("app", "db")],
                "x_y" => &[("a_b", "50%")],
                _ => &[("app", "web")],
            };
            let p = Placement {
                host: "h1".into(),
                host_version: i as i64,
            };
            store
                .commit_placement(&instance("t-1", name, tags), &p)
                .await
                .unwrap();
        }
        let p = Placement {
            host: "h1".into(),
            host_version: 4,
        };
        store
            .commit_placement(&instance("t-2", "web-9", &[("app", "web")]), &p)
            .await
            .unwrap();
        let names = |rows: Vec<flotilla_control::store::InstanceRow>| {
            rows.into_iter().map(|r| r.name).collect::<Vec<_>>()
        };
        let f = |tags: &[(&str, &str)]| InstanceFilter {
            tenant_id: Some("t-1".into()),
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            limit: 100,
            ..Default::default()
        };
        assert_eq!(
            names(store.list_instances(&f(&[("app", "web")])).await.unwrap()),
            ["web-1", "web-2"]
        );
        // LIKE wildcards in tags match only themselves, case matters.
        assert_eq!(
            names(store.list_instances(&f(&[("a_b", "50%")])).await.unwrap()),
            ["x_y"]
        );
        assert!(store
            .list_instances(&f(&[("aXb", "50%")]))
            .await
            .unwrap()
            .is_empty());
        assert!(store
            .list_instances(&f(&[("app", "WEB")]))
            .await
            .unwrap()
            .is_empty());
        // Tags change in place; an update from a stale read loses.
        let web1 = store
            .list_instances(&f(&[("app", "web")]))
            .await
            .unwrap()
            .remove(0);
        let retagged = BTreeMap::from([("app".to_string(), "api".to_string())]);
        store.update_tags(&web1, &retagged).await.unwrap();
        let stale = store
            .update_tags(&web1, &BTreeMap::new())
            .await
            .unwrap_err();
        assert!(matches!(stale, StoreError::Contended), "{stale}");
        assert_eq!(
            names(store.list_instances(&f(&[("app", "api")])).await.unwrap()),
            ["web-1"]
        );
        assert_eq!(
            store
                .group_version(&web1.tenant_id, "app", "api")
                .await
                .unwrap(),
            1
        );
        store
            .update_tags(
                &store.instance(&web1.id).await.unwrap().unwrap(),
                &web1.tags,
            )
            .await
            .unwrap();
        // Pages by name.
        let page1 = store
            .list_instances(&InstanceFilter { limit: 2, ..f(&[]) })
            .await
            .unwrap();
        assert_eq!(names(page1.clone()), ["db-1", "web-1"]);
        let page2 = store
            .list_instances(&InstanceFilter {
                limit: 2,
                after: Some("web-1".into()),
                ..f(&[])
            })
            .await
            .unwrap();
        assert_eq!(names(page2), ["web-2", "x_y"]);
        let counts = store.group_counts("t-1", "app", "web").await.unwrap();
        assert_eq!(counts, BTreeMap::from([("h1".to_string(), 2)]));
        assert!(store
            .group_counts("t-2", "app", "db")
            .await
            .unwrap()
            .is_empty());
        // A terminated instance leaves no tags behind.
        store.delete_instance("i-web-2").await.unwrap();
        assert_eq!(
            names(store.list_instances(&f(&[("app", "web")])).await.unwrap()),
            ["web-1"]
        );
        assert_eq!(
            store
                .group_counts("t-1", "app", "web")
                .await
                .unwrap()
                .get("h1"),
            Some(&1)
        );
        store
            .set_observed("i-db-1", ObservedState::Running, None, None)
            .await
            .unwrap();
        let running = InstanceFilter {
            observed: Some(ObservedState::Running),
            ..f(&[])
        };
        assert_eq!(
            names(store.list_instances(&running).await.unwrap()),
            ["db-1"]
        );
    }
}

#[tokio::test]
async fn operations_leases_and_idempotency_keys() {
    let (stores, _dir, _pg) = stores("ops").await;
    for store in &stores {
        let op = OperationRow {
            id: "op-1".into(),
            tenant_id: None,
            kind: "run".into(),
            targets: vec!["i-a".into(), "i-b".into()],
            state: OperationState::Running,
            steps: vec![],
            input: serde_json::json!("run"),
            error: None,
            created_at: 1,
            updated_at: 1,
        };
        store
            .create_operation(&op, "replica-a", i64::MAX)
            .await
            .unwrap();
        assert!(store
            .record_steps("op-1", &["run i-a".into()], "replica-a", i64::MAX, &[])
            .await
            .unwrap());
        // Another replica cannot record steps, nor take it while the lease holds.
        assert!(!store
            .record_steps("op-1", &[], "replica-b", 0, &[])
            .await
            .unwrap());
        assert!(store
            .claim_orphaned_operations("replica-b", 10, false)
            .await
            .unwrap()
            .is_empty());
        // A lease that ran out is taken over, steps kept.
        assert!(store
            .record_steps("op-1", &["run i-a".into()], "replica-a", 0, &[])
            .await
            .unwrap());
        let taken = store
            .claim_orphaned_operations("replica-b", i64::MAX, false)
            .await
            .unwrap();
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].steps, ["run i-a"]);
        assert!(!store
            .record_steps("op-1", &[], "replica-a", i64::MAX, &[])
            .await
            .unwrap());
        // Only the holder renews or ends it.
        assert!(!store
            .renew_lease("op-1", "replica-a", i64::MAX)
            .await
            .unwrap());
        assert!(store
            .renew_lease("op-1", "replica-b", i64::MAX)
            .await
            .unwrap());
        assert!(!store
            .finish_operation("op-1", "replica-a", OperationState::Failed, None)
            .await
            .unwrap());
        assert!(store
            .finish_operation("op-1", "replica-b", OperationState::Succeeded, None)
            .await
            .unwrap());
        assert_eq!(
            store.operation("op-1").await.unwrap().unwrap().state,
            OperationState::Succeeded
        );
        assert_eq!(
            store.list_operations(None, None, 10).await.unwrap().len(),
            1
        );

        assert!(store.reserve_idempotency_key("t", "k", "h1").await.unwrap());
        assert!(!store.reserve_idempotency_key("t", "k", "h1").await.unwrap());
        assert_eq!(
            store
                .idempotent_response("t", "k")
                .await
                .unwrap()
                .unwrap()
                .1,
            0
        );
        store
            .complete_idempotency_key("t", "k", 201, "{}")
            .await
            .unwrap();
        assert_eq!(
            store.idempotent_response("t", "k").await.unwrap().unwrap(),
            ("h1".into(), 201, "{}".into())
        );
        assert!(
            store
                .reserve_idempotency_key("t2", "k", "h1")
                .await
                .unwrap(),
            "keys are per tenant"
        );
        store.release_idempotency_key("t2", "k").await.unwrap();
        assert!(store
            .idempotent_response("t2", "k")
            .await
            .unwrap()
            .is_none());
    }
}

/// SQLite's writes are durable through a group commit: writers at once
/// share fsyncs of the log, and every write they were told was done is
/// there after the store is closed and opened again. (PostgreSQL makes its
/// commits durable itself.)
#[tokio::test]
async fn concurrent_sqlite_writes_share_fsyncs_and_all_persist() {
    let (stores, dir, _pg) = stores("group_commit").await;
    assert_eq!(stores[1].log_syncs(), None);
    let sqlite = stores[0].clone();
    let before = sqlite.log_syncs().unwrap();
    let writers: Vec<_> = (0..32)
        .map(|i| {
            let store = sqlite.clone();
            tokio::spawn(async move { store.record_heartbeat(&format!("h{i:02}"), &beat(4)).await })
        })
        .collect();
    for w in writers {
        w.await.unwrap().unwrap();
    }
    let syncs = sqlite.log_syncs().unwrap() - before;
    assert!((1..32).contains(&syncs), "{syncs} fsyncs for 32 writes");
    drop(stores);
    drop(sqlite);
    let again = Store::open(&format!("sqlite://{}", dir.path().join("c.db").display()))
        .await
        .unwrap();
    assert_eq!(again.list_hosts().await.unwrap().len(), 32);
}

#[tokio::test]
async fn a_hosts_subnet_is_read_alone() {
    let (stores, _dir, _pg) = stores("host_subnet").await;
    for store in &stores {
        let mut b = beat(4);
        b.vm_subnet = Some("10.77.3.0/24".into());
        store.record_heartbeat("with-subnet", &b).await.unwrap();
        store.record_heartbeat("without", &beat(4)).await.unwrap();
        let subnet = store.host_subnet("with-subnet").await.unwrap();
        assert_eq!(subnet.as_deref(), Some("10.77.3.0/24"));
        assert_eq!(store.host_subnet("without").await.unwrap(), None);
        assert_eq!(store.host_subnet("absent").await.unwrap(), None);
    }
}

/// The group commit syncs the log of the file SQLite opened, also when the
/// URL spells its name with escapes.
#[tokio::test]
async fn the_log_synced_is_the_one_sqlite_writes() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/my%20db.db", dir.path().display());
    let store = Store::open(&url).await.unwrap();
    store.create_tenant("t-1", "one").await.unwrap();
    assert!(dir.path().join("my db.db-wal").is_file());
    assert!(store.log_syncs().unwrap() > 0);
}

#[tokio::test]
async fn a_bad_database_url_is_refused_clearly() {
    let e = Store::open("mysql://x").await.unwrap_err();
    assert!(
        e.to_string().contains("sqlite://PATH or postgres://"),
        "{e}"
    );
}

#[tokio::test]
async fn snapshots_are_named_per_tenant() {
    use flotilla_control::store::SnapshotRow;
    let (stores, _dir, _pg) = stores("snapshots").await;
    for store in stores {
        store.create_tenant("t-1", "acme").await.unwrap();
        store.create_tenant("t-2", "other").await.unwrap();
        let snap = |id: &str, tenant: &str, name: &str| SnapshotRow {
            id: id.into(),
            tenant_id: tenant.into(),
            name: name.into(),
            host: "h1".into(),
            instance_name: "web".into(),
            layer: "layer-1".into(),
            image: None,
            vcpus: 1,
            memory_mib: 256,
            disk_mib: 2048,
            created_at: 0,
        };
        store
            .insert_snapshot(&snap("s-1", "t-1", "gold"))
            .await
            .unwrap();
        // The name is the tenant's: taken in t-1, free in t-2.
        let dup = store.insert_snapshot(&snap("s-2", "t-1", "gold")).await;
        assert!(matches!(dup, Err(StoreError::Duplicate(_))), "{dup:?}");
        store
            .insert_snapshot(&snap("s-3", "t-2", "gold"))
            .await
            .unwrap();
        let mine = store.list_snapshots(Some("t-1"), None, 100).await.unwrap();
        assert_eq!(mine.len(), 1);
        assert_eq!((mine[0].id.as_str(), mine[0].disk_mib), ("s-1", 2048));
        assert!(mine[0].created_at > 0);
        assert_eq!(
            store.list_snapshots(None, None, 100).await.unwrap().len(),
            2
        );
        // Pages: by name, then id, from after the last of the one before.
        let first = store.list_snapshots(None, None, 1).await.unwrap();
        assert_eq!(first[0].id, "s-1");
        let next = store
            .list_snapshots(None, Some(("gold", "s-1")), 10)
            .await
            .unwrap();
        assert_eq!(
            next.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
            ["s-3"]
        );
        let found = store
            .snapshot_by_name("t-2", "gold")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(found.id, "s-3");
        // An instance to start from s-3, not made yet, needs it.
        store.record_heartbeat("h1", &beat(4)).await.unwrap();
        let h = store.host("h1").await.unwrap().unwrap();
        let waiting = NewInstance {
            from_snapshot: Some("s-3".into()),
            ..instance("t-2", "copy", &[])
        };
        let p = Placement {
            host: "h1".into(),
            host_version: h.version,
        };
        store.commit_placement(&waiting, &p).await.unwrap();
        assert_eq!(
            store.unmade_from_snapshot("s-3").await.unwrap(),
            vec!["copy"]
        );
        assert!(store.unmade_from_snapshot("s-1").await.unwrap().is_empty());
        assert!(store.delete_snapshot("s-3").await.unwrap());
        assert!(store
            .snapshot_by_name("t-2", "gold")
            .await
            .unwrap()
            .is_none());
        assert!(!store.delete_snapshot("s-3").await.unwrap());
    }
}

#[tokio::test]
async fn volumes_attach_to_one_instance_of_their_tenant_and_host() {
    use flotilla_control::store::VolumeRow;
    let (stores, _dir, _pg) = stores("volumes").await;
    for store in stores {
        store.create_tenant("t-1", "acme").await.unwrap();
        store.create_tenant("t-2", "other").await.unwrap();
        for h in ["h1", "h2"] {
            store.record_heartbeat(h, &beat(8)).await.unwrap();
        }
        use flotilla_api::control::VolumeState;
        let vol = |id: &str, tenant: &str, name: &str, ready: bool| VolumeRow {
            id: id.into(),
            tenant_id: tenant.into(),
            name: name.into(),
            host: "h1".into(),
            size_mib: 64,
            state: if ready {
                VolumeState::Ready
            } else {
                VolumeState::Creating
            },
            attached_to: None,
            attached_name: None,
            created_at: 0,
        };
        store
            .insert_volume(&vol("v-1", "t-1", "home", true))
            .await
            .unwrap();
        let dup = store.insert_volume(&vol("v-9", "t-1", "home", true)).await;
        assert!(matches!(dup, Err(StoreError::Duplicate(_))), "{dup:?}");
        store
            .insert_volume(&vol("v-2", "t-1", "making", false))
            .await
            .unwrap();
        store
            .insert_volume(&vol("v-3", "t-2", "home", true))
            .await
            .unwrap();
        // They take disk on their host, attached or not.
        assert_eq!(store.host("h1").await.unwrap().unwrap().used_disk_mib, 192);
        let listed = store.list_hosts().await.unwrap();
        assert_eq!(listed[0].used_disk_mib, 192);
        // A claim is valid at the version the host was chosen at only.
        let v = store.host("h1").await.unwrap().unwrap().version;
        let lost = store
            .claim_volume(&vol("v-4", "t-1", "late", false), v + 1)
            .await
            .unwrap_err();
        assert!(matches!(lost, StoreError::Contended), "{lost:?}");
        store
            .claim_volume(&vol("v-4", "t-1", "late", false), v)
            .await
            .unwrap();
        assert_eq!(store.host("h1").await.unwrap().unwrap().version, v + 1);
        store.delete_volume("v-4").await.unwrap();
        assert!(store.volume_by_name("t-1", "late").await.unwrap().is_none());

        let op = |id: &str, target: &str| OperationRow {
            id: id.into(),
            tenant_id: Some("t-1".into()),
            kind: "run".into(),
            targets: vec![target.into()],
            state: OperationState::Running,
            steps: vec![],
            input: serde_json::json!("run"),
            error: None,
            created_at: 1,
            updated_at: 1,
        };
        let run = |name: &'static str,
                   tenant: &'static str,
                   host: &'static str,
                   volumes: Vec<&'static str>| {
            let store = store.clone();
            async move {
                let version = store.host(host).await.unwrap().unwrap().version;
                let volumes: Vec<String> = volumes.into_iter().map(String::from).collect();
                store
                    .commit_run(
                        &[(instance(tenant, name, &[]), host.to_string())],
                        &BTreeMap::from([(host.to_string(), version)]),
                        None,
                        &volumes,
                        &op(&format!("op-{name}"), &format!("i-{name}")),
                        "r",
                        i64::MAX,
                    )
                    .await
            }
        };
        run("a", "t-1", "h1", vec!["v-1"]).await.unwrap();
        assert_eq!(store.volumes_of("i-a").await.unwrap(), vec!["v-1"]);
        let home = store.volume_by_name("t-1", "home").await.unwrap().unwrap();
        assert_eq!(
            (home.attached_to.as_deref(), home.attached_name.as_deref()),
            (Some("i-a"), Some("a"))
        );
        // Attached already, not ready, another tenant's, another host's:
        // refused, and the run is not made at all.
        for (name, tenant, host, volume) in [
            ("b", "t-1", "h1", "v-1"),
            ("c", "t-1", "h1", "v-2"),
            ("d", "t-2", "h1", "v-1"),
            ("e", "t-2", "h2", "v-3"),
        ] {
            let refused = run(name, tenant, host, vec![volume]).await.unwrap_err();
            assert!(
                matches!(refused, StoreError::Refused(_)),
                "{name}: {refused:?}"
            );
            assert!(store
                .instance(&format!("i-{name}"))
                .await
                .unwrap()
                .is_none());
            assert!(store
                .operation(&format!("op-{name}"))
                .await
                .unwrap()
                .is_none());
        }
        // Kept while attached; the instance going frees it.
        let home = store.volume_by_name("t-1", "home").await.unwrap().unwrap();
        let kept = store.begin_volume_removal(&home).await.unwrap_err();
        assert!(
            kept.to_string().contains("attached to instance \"a\""),
            "{kept:?}"
        );
        store.delete_instance("i-a").await.unwrap();
        assert!(store.volumes_of("i-a").await.unwrap().is_empty());
        run("f", "t-1", "h1", vec!["v-1"]).await.unwrap();
        store.delete_instance("i-f").await.unwrap();
        // Being removed: no run attaches it any more; a removal its host
        // refused puts it back.
        store.begin_volume_removal(&home).await.unwrap();
        let refused = run("g", "t-1", "h1", vec!["v-1"]).await.unwrap_err();
        assert!(matches!(refused, StoreError::Refused(_)), "{refused:?}");
        assert_eq!(store.unsettled_volumes(i64::MAX).await.unwrap().len(), 2);
        store
            .end_volume_removal("v-1", VolumeState::Ready)
            .await
            .unwrap();
        run("g", "t-1", "h1", vec!["v-1"]).await.unwrap();
        store.delete_instance("i-g").await.unwrap();
        store.begin_volume_removal(&home).await.unwrap();
        store.delete_volume("v-1").await.unwrap();
        // Pages, per tenant; the one not ready is listed as such.
        let mine = store.list_volumes(Some("t-1"), None, 100).await.unwrap();
        assert_eq!(mine.len(), 1);
        assert_eq!(mine[0].state, VolumeState::Creating);
        assert_eq!(store.unsettled_volumes(i64::MAX).await.unwrap().len(), 1);
        assert!(store.volume_ready("v-2").await.unwrap());
        assert!(store.unsettled_volumes(i64::MAX).await.unwrap().is_empty());
        let all = store.list_volumes(None, None, 1).await.unwrap();
        let next = store
            .list_volumes(None, Some((&all[0].name, &all[0].id)), 10)
            .await
            .unwrap();
        assert_eq!(all.len() + next.len(), 2);
    }
}
