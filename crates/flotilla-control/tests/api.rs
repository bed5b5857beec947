//! The control plane's API over HTTP (a real server on loopback, SQLite),
//! and concurrent placement by two replicas on one PostgreSQL database.
//! Hosts here are registered by heartbeat with an endpoint nothing listens
//! on: these tests are about the API and placement, not the agents (the
//! end-to-end tests drive real agents).

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::collections::BTreeMap;
use std::time::Duration;

use flotilla_api::control::{HostHeartbeat, PlacementPolicy, RunInstancesRequest};
use flotilla_api::Resources;
use flotilla_control::auth::Caller;
use flotilla_control::store::Store;
use flotilla_control::{ControlPlane, ControlSettings};
use flotilla_testkit::PgServer;
use serde_json::{json, Value};

const ADMIN: &str = "flt_test_admin_token";

struct Api {
    base: String,
    http: reqwest::Client,
    store: Store,
    _dir: tempfile::TempDir,
}

impl Api {
    async fn start() -> Api {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("sqlite://{}", dir.path().join("c.db").display()))
            .await
            .unwrap();
        let cp = ControlPlane::new(store.clone(), ControlSettings::default());
        cp.ensure_admin_token(ADMIN).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            axum::serve(listener, flotilla_control::http::router(cp))
                .await
                .unwrap();
        });
        Api {
            base,
            http: reqwest::Client::new(),
            store,
            _dir: dir,
        }
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.call_with(method, path, token, body, None).await
    }

    async fn call_with(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        key: Option<&str>,
    ) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut r = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some(k) = key {
            r = r.header("Idempotency-Key", k);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// A tenant and a token of it.
    async fn tenant(&self, name: &str) -> String {
        let (s, b) = self
            .call(
                "POST",
                "/v1/tenants",
                Some(ADMIN),
                Some(json!({"name": name})),
            )
            .await;
        assert_eq!(s, 201, "{b}");
        let (s, b) = self
            .call(
                "POST",
                "/v1/tokens",
                Some(ADMIN),
                Some(json!({"tenant": name})),
            )
            .await;
        assert_eq!(s, 201, "{b}");
        b["token"].as_str().unwrap().to_string()
    }

    async fn host(&self, name: &str, vcpus: u32, zone: &str) {
        let beat = json!({
            "endpoint": "http://127.0.0.1:9",
            "capacity": {"vcpus": vcpus, "memory_mib": 8192},
            "labels": {"zone": zone},
        });
        let (s, b) = self
            .call(
                "POST",
                &format!("/v1/hosts/{name}/heartbeat"),
                Some(ADMIN),
                Some(beat),
            )
            .await;
        assert_eq!(s, 200, "{b}");
    }
}

fn message(b: &Value) -> String {
    b["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn tokens_decide_who_may_do_what() {
    let api = Api::start().await;
    let (s, b) = api.call("GET", "/v1/instances", None, None).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (401, Some("unauthenticated"))
    );
    let (s, _) = api
        .call("GET", "/v1/instances", Some("flt_nobody"), None)
        .await;
    assert_eq!(s, 401);
    let acme = api.tenant("acme").await;
    let (s, b) = api.call("GET", "/v1/hosts", Some(&acme), None).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (403, Some("permission_denied"))
    );
    let (s, _) = api
        .call(
            "POST",
            "/v1/tenants",
            Some(&acme),
            Some(json!({"name": "evil"})),
        )
        .await;
    assert_eq!(s, 403);
    let (s, b) = api
        .call(
            "POST",
            "/v1/tenants",
            Some(ADMIN),
            Some(json!({"name": "Bad Name"})),
        )
        .await;
    assert_eq!(s, 400, "{b}");
    let (s, _) = api
        .call(
            "POST",
            "/v1/tenants",
            Some(ADMIN),
            Some(json!({"name": "acme"})),
        )
        .await;
    assert_eq!(s, 409);
    let (s, b) = api
        .call(
            "POST",
            "/v1/tokens",
            Some(ADMIN),
            Some(json!({"tenant": "ghost"})),
        )
        .await;
    assert_eq!(s, 404, "{b}");
    // A host token heartbeats as its host, and does nothing else.
    let (s, b) = api
        .call(
            "POST",
            "/v1/tokens",
            Some(ADMIN),
            Some(json!({"host": "h1"})),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let host = b["token"].as_str().unwrap().to_string();
    let beat =
        json!({"endpoint": "http://127.0.0.1:9", "capacity": {"vcpus": 1, "memory_mib": 512}});
    let (s, _) = api
        .call(
            "POST",
            "/v1/hosts/h1/heartbeat",
            Some(&host),
            Some(beat.clone()),
        )
        .await;
    assert_eq!(s, 200);
    let (s, _) = api
        .call("POST", "/v1/hosts/h2/heartbeat", Some(&host), Some(beat))
        .await;
    assert_eq!(s, 403);
    let tenant_id = api.call("GET", "/v1/tenants", Some(ADMIN), None).await.1[0]["id"].clone();
    for path in [
        "/v1/instances".to_string(),
        format!("/v1/instances?tenant={}", tenant_id.as_str().unwrap()),
        "/v1/operations".to_string(),
        "/v1/policies".to_string(),
        "/v1/hosts".to_string(),
    ] {
        let (s, b) = api.call("GET", &path, Some(&host), None).await;
        assert_eq!(s, 403, "{path}: {b}");
    }
    let (s, _) = api
        .call(
            "POST",
            &format!("/v1/instances?tenant={}", tenant_id.as_str().unwrap()),
            Some(&host),
            Some(json!({"name": "x"})),
        )
        .await;
    assert_eq!(s, 403);
    // Not even through an idempotency key of that tenant.
    let (s, _) = api
        .call_with(
            "POST",
            &format!("/v1/instances?tenant={}", tenant_id.as_str().unwrap()),
            Some(&host),
            Some(json!({"name": "x"})),
            Some("k"),
        )
        .await;
    assert_eq!(s, 403);
    let (s, b) = api
        .call(
            "POST",
            "/v1/tokens",
            Some(ADMIN),
            Some(json!({"host": "h1", "admin": true})),
        )
        .await;
    assert_eq!(s, 400, "{b}");
    let (s, b) = api.call("GET", "/v1/nothing", Some(ADMIN), None).await;
    assert_eq!(s, 404, "{b}");
    let (s, b) = api.call("GET", "/v1/openapi.json", None, None).await;
    assert_eq!(s, 200);
    assert!(b["paths"]["/v1/instances"].is_object(), "{b}");
}

#[tokio::test]
async fn tenants_see_only_their_own_instances() {
    let api = Api::start().await;
    api.host("h1", 8, "z1").await;
    let (acme, other) = (api.tenant("acme").await, api.tenant("other").await);
    let (s, b) = api
        .call(
            "POST",
            "/v1/instances",
            Some(&acme),
            Some(json!({"name": "web"})),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["instances"][0]["host"], "h1");
    let op = b["operation"].as_str().unwrap().to_string();
    // Another tenant: not found, whatever it tries.
    for (method, path) in [
        ("GET", "/v1/instances/web"),
        ("DELETE", "/v1/instances/web"),
        ("POST", "/v1/instances/web/stop"),
    ] {
        let (s, b) = api.call(method, path, Some(&other), None).await;
        assert_eq!(s, 404, "{method} {path}: {b}");
    }
    let (s, _) = api
        .call("GET", &format!("/v1/operations/{op}"), Some(&other), None)
        .await;
    assert_eq!(s, 404);
    let (_, b) = api.call("GET", "/v1/instances", Some(&other), None).await;
    assert_eq!(b["items"].as_array().unwrap().len(), 0);
    let (s, b) = api
        .call("GET", "/v1/instances/web", Some(&acme), None)
        .await;
    assert_eq!(s, 200, "{b}");
    // Its own operation runs to its end: the host's agent is unreachable
    // here, so the run fails with the reason on the instance.
    let mut state = Value::Null;
    for _ in 0..100 {
        let (_, b) = api
            .call("GET", &format!("/v1/operations/{op}"), Some(&acme), None)
            .await;
        state = b["state"].clone();
        if state != "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(state, "failed");
    let (_, b) = api
        .call("GET", "/v1/instances/web", Some(&acme), None)
        .await;
    assert_eq!(b["observed"], "failed");
    assert!(
        b["last_error"].as_str().unwrap().contains("unreachable"),
        "{b}"
    );
    // The admin acts for a tenant with ?tenant=.
    let tenant_id = b["tenant"].as_str().unwrap();
    let (s, _) = api
        .call(
            "GET",
            &format!("/v1/instances/web?tenant={tenant_id}"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn bad_requests_and_policies_are_refused_with_the_reason() {
    let api = Api::start().await;
    api.host("h1", 2, "z1").await;
    let acme = api.tenant("acme").await;
    let run = |body: Value| {
        let api = &api;
        let acme = acme.clone();
        async move {
            api.call("POST", "/v1/instances", Some(&acme), Some(body))
                .await
        }
    };
    let (s, b) = run(json!({"name": "a", "placement": {"max_per_hots": 1}})).await;
    assert_eq!(s, 400);
    assert!(message(&b).contains("max_per_hots"), "{b}");
    let (s, b) = run(json!({"name": "a", "placement": {"require_labels": {"zone": "z1"}, "forbid_labels": {"zone": "z1"}}})).await;
    assert_eq!(s, 400);
    assert!(message(&b).contains("placement.forbid_labels.zone"), "{b}");
    let (s, b) = run(json!({"name": "a", "placement": {"max_per_host": 1}})).await;
    assert_eq!(s, 400);
    assert!(message(&b).contains("tag \"group\""), "{b}");
    let (s, b) = run(json!({"name": "a", "count": 0})).await;
    assert_eq!(s, 400, "{b}");
    let (s, b) = run(json!({"name": "A!"})).await;
    assert_eq!(s, 400, "{b}");
    // Nothing fits: the error says why for each host.
    let (s, b) = run(json!({"name": "big", "vcpus": 4})).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (409, Some("insufficient_capacity"))
    );
    assert!(
        message(&b).contains("h1: needs 4 vCPUs, 2 of 2 free"),
        "{b}"
    );
    let (s, b) =
        run(json!({"name": "zoned", "placement": {"require_labels": {"zone": "z9"}}})).await;
    assert_eq!(s, 409);
    assert!(message(&b).contains("requires label zone=z9"), "{b}");
    // All or nothing: 3 asked, 2 fit, none is kept.
    let (s, _) = run(json!({"name": "trio", "count": 3})).await;
    assert_eq!(s, 409);
    let (_, b) = api.call("GET", "/v1/instances", Some(&acme), None).await;
    assert_eq!(b["items"].as_array().unwrap().len(), 0, "{b}");
    let (s, b) = api
        .call(
            "POST",
            "/v1/placement/explain",
            Some(&acme),
            Some(json!({"name": "x", "vcpus": 2})),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(b["chosen"], "h1");
    // Each verdict shows the host's labels, which the rules weigh.
    let h1 = b["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == "h1")
        .unwrap();
    assert!(h1["labels"]["zone"].is_string(), "{b}");
    let (s, b) = api
        .call("GET", "/v1/instances?page_size=0", Some(&acme), None)
        .await;
    assert_eq!(s, 400, "{b}");
    let (s, b) = api
        .call("GET", "/v1/instances?bogus=1", Some(&acme), None)
        .await;
    assert_eq!(s, 400, "{b}");
}

#[tokio::test]
async fn idempotency_keys_and_pages() {
    let api = Api::start().await;
    api.host("h1", 64, "z1").await;
    let acme = api.tenant("acme").await;
    let body = json!({"name": "batch", "count": 5, "tags": {"app": "web"}});
    let (s1, b1) = api
        .call_with(
            "POST",
            "/v1/instances",
            Some(&acme),
            Some(body.clone()),
            Some("k1"),
        )
        .await;
    let (s2, b2) = api
        .call_with("POST", "/v1/instances", Some(&acme), Some(body), Some("k1"))
        .await;
    assert_eq!((s1, s2), (201, 201), "{b1} {b2}");
    assert_eq!(b1, b2, "the same answer again");
    let (s, b) = api
        .call_with(
            "POST",
            "/v1/instances",
            Some(&acme),
            Some(json!({"name": "other"})),
            Some("k1"),
        )
        .await;
    assert_eq!(s, 409, "{b}");
    assert!(message(&b).contains("different request"), "{b}");
    let mut names = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let path = match &token {
            Some(t) => format!("/v1/instances?tag=app=web&page_size=2&page_token={t}"),
            None => "/v1/instances?tag=app=web&page_size=2".to_string(),
        };
        let (s, b) = api.call("GET", &path, Some(&acme), None).await;
        assert_eq!(s, 200, "{b}");
        names.extend(
            b["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["name"].as_str().unwrap().to_string()),
        );
        token = b["next_page_token"].as_str().map(str::to_string);
        if token.is_none() {
            break;
        }
    }
    assert_eq!(
        names,
        ["batch-1", "batch-2", "batch-3", "batch-4", "batch-5"]
    );
    // Clones take keys too; a key names one request of one kind.
    let clone = json!({"name": "copy"});
    let mut answers = Vec::new();
    for _ in 0..2 {
        let (s, b) = api
            .call_with(
                "POST",
                "/v1/instances/batch-1/clone",
                Some(&acme),
                Some(clone.clone()),
                Some("c1"),
            )
            .await;
        assert_eq!(s, 201, "{b}");
        answers.push(b);
    }
    assert_eq!(answers[0], answers[1], "one clone, the same answer");
    let (s, b) = api
        .call_with(
            "POST",
            "/v1/instances/batch-2/clone",
            Some(&acme),
            Some(clone),
            Some("c1"),
        )
        .await;
    assert_eq!(s, 409, "another source is another request: {b}");
    let (s, b) = api
        .call_with(
            "POST",
            "/v1/instances/batch-1/clone",
            Some(&acme),
            Some(json!({"name": "copy-2"})),
            Some("k1"),
        )
        .await;
    assert_eq!(s, 409, "{b}");
    assert!(message(&b).contains("different request"), "{b}");
    // Operations come in pages too, newest first: the clone, then the run.
    let mut kinds = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let path = match &token {
            Some(t) => format!("/v1/operations?page_size=1&page_token={t}"),
            None => "/v1/operations?page_size=1".to_string(),
        };
        let (s, b) = api.call("GET", &path, Some(&acme), None).await;
        assert_eq!(s, 200, "{b}");
        assert!(b["items"].as_array().unwrap().len() <= 1, "{b}");
        kinds.extend(
            b["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| o["kind"].as_str().unwrap().to_string()),
        );
        token = b["next_page_token"].as_str().map(str::to_string);
        if token.is_none() {
            break;
        }
    }
    assert_eq!(kinds, ["clone", "run"]);
    let (s, _) = api
        .call("GET", "/v1/operations?page_size=0", Some(&acme), None)
        .await;
    assert_eq!(s, 400);
}

/// A 1-vCPU instance `i-NAME` of tenant `t-1`, as the store records it.
fn instance_of_t1(name: &str) -> flotilla_control::store::NewInstance {
    flotilla_control::store::NewInstance {
        disk_mib: 0,
        from_snapshot: None,
        id: format!("i-{name}"),
        tenant_id: "t-1".into(),
        name: name.into(),
        image: None,
        vcpus: 1,
        memory_mib: 256,
        tags: BTreeMap::new(),
        operation: None,
        ip: None,
    }
}

/// An operation of tenant `t-1` as the store records it.
fn operation_of_t1(
    id: &str,
    kind: &str,
    targets: Vec<String>,
    state: flotilla_api::control::OperationState,
) -> flotilla_control::store::OperationRow {
    flotilla_control::store::OperationRow {
        id: id.into(),
        tenant_id: Some("t-1".into()),
        kind: kind.into(),
        targets,
        state,
        steps: vec![],
        input: json!(kind),
        error: None,
        created_at: 1,
        updated_at: 1,
    }
}

fn tenant_caller(tenant: &str) -> Caller {
    Caller {
        token_id: "tok".into(),
        tenant_id: Some(tenant.into()),
        admin: false,
        host: None,
    }
}

/// Two replicas on one PostgreSQL database place at the same time: no host
/// ever holds more than it has, and anti-affinity holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_never_double_book_a_host() {
    let pg = PgServer::start().unwrap();
    let url = pg.url("replicas").unwrap();
    let a = ControlPlane::new(Store::open(&url).await.unwrap(), ControlSettings::default());
    let b = ControlPlane::new(Store::open(&url).await.unwrap(), ControlSettings::default());
    a.store().create_tenant("t-1", "acme").await.unwrap();
    for (name, zone) in [("h1", "z1"), ("h2", "z2")] {
        let beat = HostHeartbeat {
            disk: None,
            traits: Default::default(),
            endpoint: "http://127.0.0.1:9".into(),
            agent_token: None,
            tls_fingerprint: None,
            capacity: Resources {
                vcpus: 4,
                memory_mib: 8192,
            },
            labels: BTreeMap::from([("zone".into(), zone.into())]),
            vms: vec![],
            vm_subnet: Some("10.77.0.0/24".into()),
            routes_version: None,
        };
        a.store().record_heartbeat(name, &beat).await.unwrap();
    }
    let caller = tenant_caller("t-1");
    let request = |name: String,
                   policy: Option<PlacementPolicy>,
                   tags: BTreeMap<String, String>| RunInstancesRequest {
        disk_mib: flotilla_api::control::DEFAULT_INSTANCE_DISK_MIB,
        from_snapshot: None,
        volumes: Vec::new(),
        name,
        count: 1,
        image: None,
        vcpus: 1,
        memory_mib: 256,
        tags,
        placement: policy,
    };
    // 12 asks for 8 vCPUs in all.
    let mut tasks = Vec::new();
    for i in 0..12 {
        let cp = if i % 2 == 0 { a.clone() } else { b.clone() };
        let caller = caller.clone();
        let req = request(format!("fill-{i}"), None, BTreeMap::new());
        tasks.push(tokio::spawn(async move {
            let placed = cp.run_instances(&caller, None, &req).await.ok();
            placed.map(|(_, inst)| inst[0].ip.clone())
        }));
    }
    let mut addresses = std::collections::BTreeSet::new();
    let mut placed = 0;
    for t in tasks {
        if let Some(ip) = t.await.unwrap() {
            placed += 1;
            // Both hosts share the VM subnet: addresses are unique across them.
            let ip = ip.expect("an address from the host's subnet");
            assert!(ip.starts_with("10.77.0."), "{ip}");
            assert!(addresses.insert(ip.clone()), "{ip} handed out twice");
        }
    }
    assert_eq!(placed, 8);
    for h in a.store().list_hosts().await.unwrap() {
        assert_eq!(h.used_vcpus, 4, "{} holds {}", h.name, h.used_vcpus);
    }
    // Anti-affinity: one of the group per host, asked 6 times at once.
    for h in ["h1", "h2"] {
        let beat = HostHeartbeat {
            disk: None,
            traits: Default::default(),
            endpoint: "http://127.0.0.1:9".into(),
            agent_token: None,
            tls_fingerprint: None,
            capacity: Resources {
                vcpus: 64,
                memory_mib: 65536,
            },
            labels: BTreeMap::new(),
            vms: vec![],
            vm_subnet: None,
            routes_version: None,
        };
        a.store().record_heartbeat(h, &beat).await.unwrap();
    }
    let policy = PlacementPolicy {
        max_per_host: Some(1),
        ..Default::default()
    };
    let tags = BTreeMap::from([("group".to_string(), "db".to_string())]);
    let mut tasks = Vec::new();
    for i in 0..6 {
        let cp = if i % 2 == 0 { a.clone() } else { b.clone() };
        let caller = caller.clone();
        let req = request(format!("db-{i}"), Some(policy.clone()), tags.clone());
        tasks.push(tokio::spawn(async move {
            cp.run_instances(&caller, None, &req).await.ok()
        }));
    }
    let mut hosts = Vec::new();
    for t in tasks {
        if let Some((_, inst)) = t.await.unwrap() {
            hosts.push(inst[0].host.clone().unwrap());
        }
    }
    hosts.sort();
    assert_eq!(hosts, ["h1", "h2"]);
    // A limit across hosts (one per rack; h1 and h2 share a rack): the
    // group's version keeps two replicas from filling one rack twice.
    for (h, rack) in [("h1", "r1"), ("h2", "r1"), ("h3", "r2")] {
        let beat = HostHeartbeat {
            disk: None,
            traits: Default::default(),
            endpoint: "http://127.0.0.1:9".into(),
            agent_token: None,
            tls_fingerprint: None,
            capacity: Resources {
                vcpus: 64,
                memory_mib: 65536,
            },
            labels: BTreeMap::from([("rack".into(), rack.into())]),
            vms: vec![],
            vm_subnet: None,
            routes_version: None,
        };
        a.store().record_heartbeat(h, &beat).await.unwrap();
    }
    let policy = PlacementPolicy {
        max_per_label: BTreeMap::from([("rack".to_string(), 1)]),
        ..Default::default()
    };
    let tags = BTreeMap::from([("group".to_string(), "cache".to_string())]);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let cp = if i % 2 == 0 { a.clone() } else { b.clone() };
        let caller = caller.clone();
        let req = request(format!("cache-{i}"), Some(policy.clone()), tags.clone());
        tasks.push(tokio::spawn(async move {
            cp.run_instances(&caller, None, &req).await.ok()
        }));
    }
    let mut racks = Vec::new();
    for t in tasks {
        if let Some((_, inst)) = t.await.unwrap() {
            racks.push(if inst[0].host.as_deref() == Some("h3") {
                "r2"
            } else {
                "r1"
            });
        }
    }
    racks.sort();
    assert_eq!(racks, ["r1", "r2"]);
}

#[tokio::test]
async fn stored_policies_apply_to_their_tenant_and_fleet() {
    let api = Api::start().await;
    api.host("h1", 8, "z1").await;
    api.host("h2", 8, "z2").await;
    let (acme, other) = (api.tenant("acme").await, api.tenant("other").await);
    // acme keeps everything in z1; its db fleet at most one per host.
    let (s, b) = api
        .call(
            "PUT",
            "/v1/policies/eu",
            Some(&acme),
            Some(json!({"placement": {"require_labels": {"zone": "z1"}}})),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = api
        .call("PUT", "/v1/policies/db", Some(&acme), Some(json!({"fleet": {"app": "db"}, "placement": {"max_per_host": 1, "group_tag": "app"}})))
        .await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = api
        .call(
            "PUT",
            "/v1/policies/bad",
            Some(&acme),
            Some(json!({"placement": {"spread": true}})),
        )
        .await;
    assert_eq!(s, 400);
    assert!(message(&b).contains("spread"), "{b}");
    let (_, b) = api
        .call(
            "POST",
            "/v1/instances",
            Some(&acme),
            Some(json!({"name": "w", "count": 3})),
        )
        .await;
    let hosts: Vec<&str> = b["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["host"].as_str().unwrap())
        .collect();
    assert_eq!(hosts, ["h1", "h1", "h1"], "{b}");
    let (s, _) = api
        .call(
            "POST",
            "/v1/instances",
            Some(&acme),
            Some(json!({"name": "db1", "tags": {"app": "db"}})),
        )
        .await;
    assert_eq!(s, 201);
    // The fleet's rule and the tenant's together leave no host.
    let (s, b) = api
        .call(
            "POST",
            "/v1/instances",
            Some(&acme),
            Some(json!({"name": "db2", "tags": {"app": "db"}})),
        )
        .await;
    assert_eq!(s, 409, "{b}");
    assert!(
        message(&b).contains("h1: already holds 1 of the group"),
        "{b}"
    );
    assert!(message(&b).contains("h2: requires label zone=z1"), "{b}");
    // A request cannot contradict a stored requirement.
    let (s, b) = api
        .call(
            "POST",
            "/v1/instances",
            Some(&acme),
            Some(json!({"name": "x", "placement": {"require_labels": {"zone": "z2"}}})),
        )
        .await;
    assert_eq!(s, 400, "{b}");
    assert!(message(&b).contains("placement.require_labels.zone"), "{b}");
    // Another tenant is not bound by them, and does not see them.
    let (_, b) = api
        .call(
            "POST",
            "/v1/instances",
            Some(&other),
            Some(json!({"name": "o", "count": 2})),
        )
        .await;
    let hosts: Vec<&str> = b["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["host"].as_str().unwrap())
        .collect();
    assert!(hosts.contains(&"h2"), "{b}");
    let (_, b) = api.call("GET", "/v1/policies", Some(&other), None).await;
    assert_eq!(b.as_array().unwrap().len(), 0);
    let (s, _) = api
        .call("DELETE", "/v1/policies/eu", Some(&other), None)
        .await;
    assert_eq!(s, 404);
    // A global policy (admin, no tenant) binds everyone.
    let (s, b) = api
        .call(
            "PUT",
            "/v1/policies/no-z2",
            Some(ADMIN),
            Some(json!({"placement": {"forbid_labels": {"zone": "z2"}}})),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let (_, b) = api.call("GET", "/v1/policies", Some(&other), None).await;
    assert_eq!(b.as_array().unwrap().len(), 1, "{b}");
    let (_, b) = api
        .call(
            "POST",
            "/v1/instances",
            Some(&other),
            Some(json!({"name": "p"})),
        )
        .await;
    assert_eq!(b["instances"][0]["host"], "h1", "{b}");
    let (s, _) = api
        .call("DELETE", "/v1/policies/eu", Some(&acme), None)
        .await;
    assert_eq!(s, 204);
}

#[tokio::test]
async fn a_group_spreads_over_racks_with_max_per_label() {
    let api = Api::start().await;
    for (name, rack) in [("h1", "r1"), ("h2", "r1"), ("h3", "r2")] {
        let beat = json!({
            "endpoint": "http://127.0.0.1:9",
            "capacity": {"vcpus": 8, "memory_mib": 8192},
            "labels": {"rack": rack},
        });
        let (s, _) = api
            .call(
                "POST",
                &format!("/v1/hosts/{name}/heartbeat"),
                Some(ADMIN),
                Some(beat),
            )
            .await;
        assert_eq!(s, 200);
    }
    let acme = api.tenant("acme").await;
    let body = json!({"name": "db", "count": 2, "tags": {"group": "db"}, "placement": {"max_per_label": {"rack": 1}}});
    let (s, b) = api
        .call("POST", "/v1/instances", Some(&acme), Some(body))
        .await;
    assert_eq!(s, 201, "{b}");
    let mut hosts: Vec<&str> = b["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["host"].as_str().unwrap())
        .collect();
    hosts.sort();
    assert!(
        hosts.contains(&"h3") && hosts.len() == 2,
        "one per rack: {hosts:?}"
    );
    let body = json!({"name": "db-3", "tags": {"group": "db"}, "placement": {"max_per_label": {"rack": 1}}});
    let (s, b) = api
        .call("POST", "/v1/instances", Some(&acme), Some(body))
        .await;
    assert_eq!(s, 409, "{b}");
    assert!(message(&b).contains("max_per_label rack 1"), "{b}");
}

/// A partition group: each instance gets a partition (the emptiest, or the
/// one asked for), and a rack holds instances of one partition only.
#[tokio::test]
async fn partition_groups_keep_partitions_on_their_own_racks() {
    let api = Api::start().await;
    for (name, rack) in [
        ("h1", "r1"),
        ("h2", "r1"),
        ("h3", "r2"),
        ("h4", "r2"),
        ("h5", "r3"),
        ("h6", "r3"),
    ] {
        let beat = json!({
            "endpoint": "http://127.0.0.1:9",
            "capacity": {"vcpus": 8, "memory_mib": 8192},
            "labels": {"rack": rack},
        });
        let (s, _) = api
            .call(
                "POST",
                &format!("/v1/hosts/{name}/heartbeat"),
                Some(ADMIN),
                Some(beat),
            )
            .await;
        assert_eq!(s, 200);
    }
    let acme = api.tenant("acme").await;
    let (s, b) = api
        .call(
            "PUT",
            "/v1/policies/db",
            Some(&acme),
            Some(json!({"fleet": {"group": "db"}, "placement": {"partitions": {"count": 3, "label": "rack"}}})),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let rack_of = |host: &str| match host {
        "h1" | "h2" => "r1",
        "h3" | "h4" => "r2",
        _ => "r3",
    };
    let (s, b) = api
        .call(
            "POST",
            "/v1/instances",
            Some(&acme),
            Some(json!({"name": "db", "count": 6, "tags": {"group": "db"}})),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let mut racks: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    let mut sizes: BTreeMap<String, u32> = BTreeMap::new();
    for i in b["instances"].as_array().unwrap() {
        let p = i["tags"]["flotilla.partition"]
            .as_str()
            .expect("a partition")
            .to_string();
        *sizes.entry(p.clone()).or_default() += 1;
        racks
            .entry(rack_of(i["host"].as_str().unwrap()).to_string())
            .or_default()
            .insert(p);
    }
    assert_eq!(
        sizes.values().copied().collect::<Vec<_>>(),
        vec![2, 2, 2],
        "{b}"
    );
    assert!(
        racks.values().all(|ps| ps.len() == 1),
        "one partition per rack: {racks:?}"
    );
    // Asked for partition 2: on partition 2's rack.
    let rack_of_2 = racks
        .iter()
        .find(|(_, ps)| ps.contains("2"))
        .unwrap()
        .0
        .clone();
    let (s, b) = api
        .call(
            "POST",
            "/v1/instances",
            Some(&acme),
            Some(json!({"name": "db-x", "tags": {"group": "db", "flotilla.partition": "2"}})),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(
        rack_of(b["instances"][0]["host"].as_str().unwrap()),
        rack_of_2
    );
    let (s, b) = api
        .call(
            "POST",
            "/v1/instances",
            Some(&acme),
            Some(json!({"name": "db-y", "tags": {"group": "db", "flotilla.partition": "9"}})),
        )
        .await;
    assert_eq!(s, 400, "{b}");
    assert!(message(&b).contains("partitions 1 to 3"), "{b}");
    // A fourth partition finds no rack of its own.
    let (s, b) = api
        .call(
            "POST",
            "/v1/instances",
            Some(&acme),
            Some(json!({"name": "db-z", "tags": {"group": "db"}, "placement": {"partitions": {"count": 4, "label": "rack"}}})),
        )
        .await;
    assert_eq!(s, 409, "{b}");
    assert!(message(&b).contains("this is partition 4"), "{b}");
}

/// A snapshot whose host does not answer stays `creating`: listed, never
/// started from, and its name stays taken.
#[tokio::test]
async fn a_snapshot_whose_host_does_not_answer_stays_creating() {
    let api = Api::start().await;
    let beat = json!({
        "endpoint": "http://127.0.0.1:9",
        "capacity": {"vcpus": 8, "memory_mib": 8192},
    });
    let (s, _) = api
        .call("POST", "/v1/hosts/h1/heartbeat", Some(ADMIN), Some(beat))
        .await;
    assert_eq!(s, 200);
    let acme = api.tenant("acme").await;
    let (s, b) = api
        .call(
            "POST",
            "/v1/instances",
            Some(&acme),
            Some(json!({"name": "src"})),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let (s, b) = api
        .call(
            "POST",
            "/v1/instances/src/snapshots",
            Some(&acme),
            Some(json!({"name": "gold"})),
        )
        .await;
    assert_eq!(s, 503, "{b}");
    assert!(
        b["error"]["hint"]
            .as_str()
            .unwrap_or("")
            .contains("stays creating"),
        "{b}"
    );
    let (_, list) = api.call("GET", "/v1/snapshots", Some(&acme), None).await;
    assert_eq!(list["items"][0]["state"], "creating", "{list}");
    let (s, b) = api
        .call(
            "POST",
            "/v1/instances",
            Some(&acme),
            Some(json!({"name": "copy", "from_snapshot": "gold"})),
        )
        .await;
    assert_eq!(s, 409, "{b}");
    assert!(message(&b).contains("still being taken"), "{b}");
    let (s, b) = api
        .call(
            "POST",
            "/v1/instances/src/snapshots",
            Some(&acme),
            Some(json!({"name": "gold"})),
        )
        .await;
    assert_eq!(s, 409, "the name is taken: {b}");
    let (s, b) = api
        .call(
            "POST",
            "/v1/instances/src/snapshots",
            Some(&acme),
            Some(json!({"name": "Bad Name"})),
        )
        .await;
    assert_eq!(s, 400, "{b}");
}

/// Hosts' traits (found by agents or given by operators) steer placement:
/// required or forbidden, per policy or request; bad names are refused.
#[tokio::test]
async fn traits_steer_placement() {
    let api = Api::start().await;
    for (name, traits) in [("h1", json!(["tcg"])), ("h2", json!(["tcg", "gpu"]))] {
        let beat = json!({
            "endpoint": "http://127.0.0.1:9",
            "capacity": {"vcpus": 8, "memory_mib": 8192},
            "traits": traits,
        });
        let (s, b) = api
            .call(
                "POST",
                &format!("/v1/hosts/{name}/heartbeat"),
                Some(ADMIN),
                Some(beat),
            )
            .await;
        assert_eq!(s, 200, "{b}");
    }
    let (_, h) = api.call("GET", "/v1/hosts/h2", Some(ADMIN), None).await;
    assert_eq!(h["traits"], json!(["gpu", "tcg"]), "{h}");
    let acme = api.tenant("acme").await;
    let run = |name: &str, placement: Value| json!({"name": name, "placement": placement});
    let (s, b) = api
        .call(
            "POST",
            "/v1/instances",
            Some(&acme),
            Some(run("ml", json!({"require_traits": ["gpu"]}))),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["instances"][0]["host"], "h2");
    let (s, b) = api
        .call(
            "POST",
            "/v1/instances",
            Some(&acme),
            Some(run("web", json!({"forbid_traits": ["gpu"]}))),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["instances"][0]["host"], "h1");
    let (s, b) = api
        .call(
            "POST",
            "/v1/instances",
            Some(&acme),
            Some(run("fast", json!({"require_traits": ["kvm"]}))),
        )
        .await;
    assert_eq!(s, 409, "{b}");
    assert!(
        message(&b).contains("requires trait kvm, the host lacks it"),
        "{b}"
    );
    let (s, b) = api
        .call(
            "POST",
            "/v1/instances",
            Some(&acme),
            Some(run(
                "odd",
                json!({"require_traits": ["gpu"], "forbid_traits": ["gpu"]}),
            )),
        )
        .await;
    assert_eq!(s, 400, "{b}");
    assert!(message(&b).contains("forbid_traits"), "{b}");
    let beat = json!({
        "endpoint": "http://127.0.0.1:9",
        "capacity": {"vcpus": 8, "memory_mib": 8192},
        "traits": ["Not A Trait"],
    });
    let (s, b) = api
        .call("POST", "/v1/hosts/h3/heartbeat", Some(ADMIN), Some(beat))
        .await;
    assert_eq!(s, 400, "{b}");
}

/// Instances are counted for their disk space against their host's disk
/// capacity (with the policy's overcommit), and a host whose disk is nearly
/// full takes none, whatever the ratio.
#[tokio::test]
async fn disk_space_is_counted_and_full_disks_take_nothing() {
    let api = Api::start().await;
    let beat = |capacity: u64, free: u64| {
        json!({
            "endpoint": "http://127.0.0.1:9",
            "capacity": {"vcpus": 8, "memory_mib": 8192},
            "disk": {"capacity_mib": capacity, "free_mib": free},
        })
    };
    let (s, _) = api
        .call(
            "POST",
            "/v1/hosts/h1/heartbeat",
            Some(ADMIN),
            Some(beat(5000, 5000)),
        )
        .await;
    assert_eq!(s, 200);
    let acme = api.tenant("acme").await;
    // Two of the default 2048 MiB fit in 5000; a third does not.
    let (s, b) = api
        .call(
            "POST",
            "/v1/instances",
            Some(&acme),
            Some(json!({"name": "a", "count": 2})),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["instances"][0]["disk_mib"], 2048, "{b}");
    let (s, b) = api
        .call(
            "POST",
            "/v1/instances",
            Some(&acme),
            Some(json!({"name": "b"})),
        )
        .await;
    assert_eq!(s, 409, "{b}");
    assert!(
        message(&b).contains("needs 2048 MiB of disk, 904 of 5000 MiB unallocated"),
        "{b}"
    );
    // A smaller one fits; the host shows what is counted.
    let (s, b) = api
        .call(
            "POST",
            "/v1/instances",
            Some(&acme),
            Some(json!({"name": "b", "disk_mib": 512})),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let (_, h) = api.call("GET", "/v1/hosts/h1", Some(ADMIN), None).await;
    assert_eq!(
        h["disk"],
        json!({"capacity_mib": 5000, "allocated_mib": 4608, "free_mib": 5000}),
        "{h}"
    );
    // Thin disks: a global policy lets the host be overcommitted, until
    // the disk itself is nearly full.
    let (s, b) = api
        .call(
            "PUT",
            "/v1/policies/thin",
            Some(ADMIN),
            Some(json!({"placement": {"disk_overcommit": 4.0}})),
        )
        .await;
    assert!(s < 300, "{s} {b}");
    let (s, b) = api
        .call(
            "POST",
            "/v1/instances",
            Some(&acme),
            Some(json!({"name": "c"})),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    api.call(
        "POST",
        "/v1/hosts/h1/heartbeat",
        Some(ADMIN),
        Some(beat(5000, 1000)),
    )
    .await;
    let (s, b) = api
        .call(
            "POST",
            "/v1/instances",
            Some(&acme),
            Some(json!({"name": "d"})),
        )
        .await;
    assert_eq!(s, 409, "{b}");
    assert!(
        message(&b).contains("the host's disk has 1000 MiB free"),
        "{b}"
    );
    // Bad sizes are refused with the range.
    let (s, b) = api
        .call(
            "POST",
            "/v1/instances",
            Some(&acme),
            Some(json!({"name": "e", "disk_mib": 1})),
        )
        .await;
    assert_eq!(s, 400, "{b}");
    assert!(message(&b).contains("disk_mib 1 is out of range"), "{b}");
}

/// A replica on PostgreSQL takes over an operation whose driver died (its
/// lease ran out) and drives it to its end; one whose lease holds is left
/// alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_takes_over_operations_of_a_dead_one() {
    use flotilla_api::control::OperationState;
    let pg = PgServer::start().unwrap();
    let url = pg.url("takeover").unwrap();
    let store = Store::open(&url).await.unwrap();
    store.create_tenant("t-1", "acme").await.unwrap();
    let beat = empty_host("http://127.0.0.1:9");
    store.record_heartbeat("h1", &beat).await.unwrap();
    let op = |id: &str, target: &str| {
        operation_of_t1(
            id,
            "terminate",
            vec![target.into()],
            OperationState::Running,
        )
    };
    let inst = instance_of_t1;
    let versions = BTreeMap::from([("h1".to_string(), 0)]);
    // The dead replica's lease ran out; the live one's holds.
    store
        .commit_run(
            &[(inst("a"), "h1".into())],
            &versions,
            None,
            &[],
            &op("op-dead", "i-a"),
            "dead",
            0,
        )
        .await
        .unwrap();
    let versions = BTreeMap::from([("h1".to_string(), 1)]);
    store
        .commit_run(
            &[(inst("b"), "h1".into())],
            &versions,
            None,
            &[],
            &op("op-live", "i-b"),
            "live",
            i64::MAX,
        )
        .await
        .unwrap();
    let b = ControlPlane::new(Store::open(&url).await.unwrap(), ControlSettings::default());
    assert_eq!(b.adopt_operations(false).await.unwrap(), 1);
    let mut finished = None;
    for _ in 0..100 {
        let o = b.store().operation("op-dead").await.unwrap().unwrap();
        if o.state != OperationState::Running {
            finished = Some(o);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let o = finished.expect("the taken-over operation never finished");
    // Its step ran (the host's agent answers nothing here, so it failed
    // with the reason), recorded by the new driver.
    assert_eq!(o.steps.len(), 1, "{o:?}");
    assert!(o.error.unwrap_or_default().contains("unreachable"));
    let live = b.store().operation("op-live").await.unwrap().unwrap();
    assert_eq!((live.state, live.steps.len()), (OperationState::Running, 0));
}

#[tokio::test]
async fn instances_go_near_or_away_from_others_by_affinity() {
    let api = Api::start().await;
    api.host("h1", 8, "z1").await;
    api.host("h2", 8, "z2").await;
    let acme = api.tenant("acme").await;
    let run = |body: Value| {
        let (api, acme) = (&api, acme.clone());
        async move {
            api.call("POST", "/v1/instances", Some(&acme), Some(body))
                .await
        }
    };
    let (s, b) = run(json!({"name": "db", "tags": {"app": "db"}, "placement": {"require_labels": {"zone": "z1"}}})).await;
    assert_eq!(
        (s, b["instances"][0]["host"].as_str()),
        (201, Some("h1")),
        "{b}"
    );
    let near = json!({"affinity": [{"tag": "app", "value": "db", "hard": true}]});
    let (s, b) = run(json!({"name": "api", "count": 2, "placement": near})).await;
    assert_eq!(s, 201, "{b}");
    assert!(
        b["instances"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["host"] == "h1"),
        "{b}"
    );
    let away = json!({"affinity": [{"tag": "app", "value": "db", "toward": false, "hard": true}]});
    let (s, b) = run(json!({"name": "cache", "placement": away})).await;
    assert_eq!(
        (s, b["instances"][0]["host"].as_str()),
        (201, Some("h2")),
        "{b}"
    );
    let nowhere = json!({"affinity": [{"tag": "app", "value": "ghost", "hard": true}]});
    let (s, b) = run(json!({"name": "lost", "placement": nowhere})).await;
    assert_eq!(s, 409);
    assert!(
        message(&b).contains("affinity: holds no instance with app=ghost"),
        "{b}"
    );
}

#[tokio::test]
async fn tags_change_in_place_and_groups_follow() {
    let api = Api::start().await;
    api.host("h1", 8, "z1").await;
    let (acme, other) = (api.tenant("acme").await, api.tenant("other").await);
    let one_per_host = json!({"max_per_host": 1});
    let run = |name: &'static str, group: &'static str| {
        let (api, acme, placement) = (&api, acme.clone(), one_per_host.clone());
        async move {
            api.call(
                "POST",
                "/v1/instances",
                Some(&acme),
                Some(json!({"name": name, "tags": {"group": group, "team": "x"},
                            "placement": placement})),
            )
            .await
        }
    };
    let (s, b) = run("db", "a").await;
    assert_eq!(s, 201, "{b}");
    // One per host in group a: a second one has nowhere to go.
    let (s, b) = run("db2", "a").await;
    assert_eq!(s, 409, "{b}");

    // A merge patch: set, remove, keep.
    let (s, b) = api
        .call(
            "PATCH",
            "/v1/instances/db",
            Some(&acme),
            Some(json!({"tags": {"team": null, "tier": "gold", "group": "b"}})),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["tags"], json!({"group": "b", "tier": "gold"}));
    assert_eq!(b["host"], "h1", "a tag change never moves an instance");
    let (_, b) = api
        .call("GET", "/v1/instances?tag=tier=gold", Some(&acme), None)
        .await;
    assert_eq!(b["items"].as_array().unwrap().len(), 1, "{b}");
    // db left group a: a new member of a fits again.
    let (s, b) = run("db2", "a").await;
    assert_eq!(s, 201, "{b}");

    // Another tenant cannot see it; bad keys and unknown fields are refused.
    let patch = Some(json!({"tags": {"x": "y"}}));
    let (s, _) = api
        .call("PATCH", "/v1/instances/db", Some(&other), patch)
        .await;
    assert_eq!(s, 404);
    let (s, b) = api
        .call(
            "PATCH",
            "/v1/instances/db",
            Some(&acme),
            Some(json!({"tags": {"bad key": "v"}})),
        )
        .await;
    assert_eq!(s, 400, "{b}");
    assert!(message(&b).contains("bad key"), "{b}");
    let (s, b) = api
        .call(
            "PATCH",
            "/v1/instances/db",
            Some(&acme),
            Some(json!({"labels": {}})),
        )
        .await;
    assert_eq!(s, 400, "{b}");
    let (_, b) = api.call("GET", "/v1/instances/db", Some(&acme), None).await;
    assert_eq!(b["tags"], json!({"group": "b", "tier": "gold"}));
}

/// A heartbeat of an 8-vCPU, 8 GiB host at `endpoint` with no VMs.
fn empty_host(endpoint: &str) -> HostHeartbeat {
    HostHeartbeat {
        disk: None,
        traits: Default::default(),
        endpoint: endpoint.into(),
        agent_token: None,
        tls_fingerprint: None,
        capacity: Resources {
            vcpus: 8,
            memory_mib: 8192,
        },
        labels: BTreeMap::new(),
        vms: vec![],
        vm_subnet: None,
        routes_version: None,
    }
}

/// A control plane on a fresh SQLite file with tenant `t-1`, and an admin
/// caller.
async fn sqlite_control_plane() -> (tempfile::TempDir, ControlPlane, Caller) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("sqlite://{}", dir.path().join("c.db").display()))
        .await
        .unwrap();
    let cp = ControlPlane::new(store, ControlSettings::default());
    cp.store().create_tenant("t-1", "acme").await.unwrap();
    let admin = Caller {
        token_id: "tok".into(),
        tenant_id: None,
        admin: true,
        host: None,
    };
    (dir, cp, admin)
}

/// A move whose workflow ended without recording where the VM went (an
/// attempt that gave up) is settled by the hosts' reports: the target
/// reporting the VM running makes it the instance's host; the source
/// reporting it running, not moving, ends the move where it was.
#[tokio::test]
async fn heartbeats_settle_a_move_left_unrecorded() {
    use flotilla_api::control::ReportedVm;
    use flotilla_api::VmState;
    let (_dir, cp, admin) = sqlite_control_plane().await;
    let beat = |vms: Vec<(&str, VmState)>| HostHeartbeat {
        disk: None,
        traits: Default::default(),
        endpoint: "http://127.0.0.1:9".into(),
        agent_token: None,
        tls_fingerprint: None,
        capacity: Resources {
            vcpus: 8,
            memory_mib: 8192,
        },
        vm_subnet: None,
        routes_version: None,
        labels: BTreeMap::new(),
        vms: vms
            .into_iter()
            .map(|(name, state)| ReportedVm {
                name: name.into(),
                state,
                ip: None,
            })
            .collect(),
    };
    for h in ["h1", "h2"] {
        cp.heartbeat(&admin, h, &beat(vec![])).await.unwrap();
    }
    let op = |id: &str, targets: Vec<String>| {
        operation_of_t1(
            id,
            "run",
            targets,
            flotilla_api::control::OperationState::Succeeded,
        )
    };
    let inst = instance_of_t1;
    let versions = BTreeMap::from([("h1".to_string(), 0)]);
    cp.store()
        .commit_run(
            &[(inst("went"), "h1".into()), (inst("stayed"), "h1".into())],
            &versions,
            None,
            &[],
            &op("op-run", vec!["i-went".into(), "i-stayed".into()]),
            "me",
            0,
        )
        .await
        .unwrap();
    let h2 = cp.store().host("h2").await.unwrap().unwrap();
    for id in ["i-went", "i-stayed"] {
        let version = cp.store().host("h2").await.unwrap().unwrap().version;
        cp.store()
            .begin_migration(id, "h1", "h2", version, None)
            .await
            .unwrap();
    }
    let _ = h2;
    let wait_quiet = || tokio::time::sleep(Duration::from_millis(2100));
    // Reports just after a change are not trusted (they may be older).
    wait_quiet().await;
    // Still moving on the source: nothing changes.
    cp.heartbeat(
        &admin,
        "h1",
        &beat(vec![
            ("i-went", VmState::Migrating),
            ("i-stayed", VmState::Migrating),
        ]),
    )
    .await
    .unwrap();
    let went = cp.store().instance("i-went").await.unwrap().unwrap();
    assert_eq!(went.migrating_to.as_deref(), Some("h2"));
    // One arrived on h2; the other runs on at h1.
    cp.heartbeat(&admin, "h2", &beat(vec![("i-went", VmState::Running)]))
        .await
        .unwrap();
    wait_quiet().await;
    cp.heartbeat(&admin, "h1", &beat(vec![("i-stayed", VmState::Running)]))
        .await
        .unwrap();
    let went = cp.store().instance("i-went").await.unwrap().unwrap();
    assert_eq!(
        (went.host.as_deref(), went.migrating_to.as_deref()),
        (Some("h2"), None)
    );
    let stayed = cp.store().instance("i-stayed").await.unwrap().unwrap();
    assert_eq!(
        (stayed.host.as_deref(), stayed.migrating_to.as_deref()),
        (Some("h1"), None)
    );
}

/// Each host's heartbeat reply routes the instances on the other hosts via
/// them, and only when the table changed; a bad subnet is refused.
#[tokio::test]
async fn heartbeat_replies_route_other_hosts_instances() {
    let (_dir, cp, admin) = sqlite_control_plane().await;
    let beat = |n: u8, subnet: &str, known: Option<String>| HostHeartbeat {
        disk: None,
        traits: Default::default(),
        vm_subnet: Some(subnet.into()),
        routes_version: known,
        ..empty_host(&format!("http://198.18.0.{n}:7777"))
    };
    let err = cp
        .heartbeat(&admin, "h1", &beat(2, "10.77.0.0/8", None))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("vm_subnet"), "{err}");
    // An HTTPS agent names its certificate: the control plane trusts it alone.
    let https = HostHeartbeat {
        disk: None,
        traits: Default::default(),
        endpoint: "https://198.18.0.2:7777".into(),
        ..beat(2, "10.77.0.0/24", None)
    };
    let err = cp.heartbeat(&admin, "h1", &https).await.unwrap_err();
    assert!(err.to_string().contains("fingerprint"), "{err}");
    for (h, n) in [("h1", 2), ("h2", 3)] {
        let reply = cp
            .heartbeat(&admin, h, &beat(n, "10.77.0.0/24", None))
            .await
            .unwrap();
        assert_eq!(reply.routes.map(|r| r.routes.len()), Some(0));
    }
    // A VM made on h1 directly (no instance) holds 10.77.0.2.
    let standalone = HostHeartbeat {
        disk: None,
        traits: Default::default(),
        vms: vec![flotilla_api::control::ReportedVm {
            name: "by-hand".into(),
            state: flotilla_api::VmState::Running,
            ip: Some("10.77.0.2".into()),
        }],
        ..beat(2, "10.77.0.0/24", None)
    };
    cp.heartbeat(&admin, "h1", &standalone).await.unwrap();
    // One instance on each host, placed one per host.
    let policy = PlacementPolicy {
        max_per_host: Some(1),
        ..Default::default()
    };
    let req = RunInstancesRequest {
        disk_mib: flotilla_api::control::DEFAULT_INSTANCE_DISK_MIB,
        from_snapshot: None,
        volumes: Vec::new(),
        name: "pair".into(),
        count: 2,
        image: None,
        vcpus: 1,
        memory_mib: 256,
        tags: BTreeMap::from([("group".to_string(), "pair".to_string())]),
        placement: Some(policy),
    };
    let (_, placed) = cp
        .run_instances(&tenant_caller("t-1"), None, &req)
        .await
        .unwrap();
    let on = |host: &str| {
        placed
            .iter()
            .find(|i| i.host.as_deref() == Some(host))
            .and_then(|i| i.ip.clone())
            .expect("an instance with an address")
    };
    let (ip1, ip2) = (on("h1"), on("h2"));
    assert_ne!(ip1, ip2);
    for ip in [&ip1, &ip2] {
        assert_ne!(
            ip, "10.77.0.2",
            "an address a host reported is not handed out"
        );
    }
    let reply = cp
        .heartbeat(&admin, "h1", &beat(2, "10.77.0.0/24", None))
        .await
        .unwrap();
    let routes = reply.routes.expect("routes");
    assert_eq!(
        routes.routes,
        vec![flotilla_api::control::VmRoute {
            ip: ip2.clone(),
            via: "198.18.0.3".into(),
            host: "h2".into(),
            group: Some("t-1".into()),
        }]
    );
    // The host has this table: nothing is sent again.
    let again = cp
        .heartbeat(
            &admin,
            "h1",
            &beat(2, "10.77.0.0/24", Some(routes.version.clone())),
        )
        .await
        .unwrap();
    assert!(again.routes.is_none(), "{routes:?} then {:?}", again.routes);
    let reply = cp
        .heartbeat(&admin, "h2", &beat(3, "10.77.0.0/24", None))
        .await
        .unwrap();
    assert_eq!(reply.routes.expect("routes").routes[0].ip, ip1);
}

#[tokio::test]
async fn volumes_are_tenant_resources_attached_to_one_instance() {
    let api = Api::start().await;
    api.host("h1", 8, "z1").await;
    api.host("h2", 8, "z1").await;
    let acme = api.tenant("acme").await;
    let other = api.tenant("other").await;
    // Bad input: what was wrong, what is accepted.
    for (body, needle) in [
        (json!({"name": "home", "size_mib": 0}), "size_mib"),
        (json!({"name": "Home", "size_mib": 64}), "volume"),
        (
            json!({"name": "home", "size_mib": 64, "color": "red"}),
            "color",
        ),
    ] {
        let (s, b) = api
            .call("POST", "/v1/volumes", Some(&acme), Some(body))
            .await;
        assert_eq!(s, 400, "{b}");
        assert!(message(&b).contains(needle), "{b}");
    }
    // Its host does not answer: 503, and it stays creating, never used.
    let (s, b) = api
        .call(
            "POST",
            "/v1/volumes",
            Some(&acme),
            Some(json!({"name": "slow", "size_mib": 64})),
        )
        .await;
    assert_eq!(s, 503, "{b}");
    let (_, slow) = api.call("GET", "/v1/volumes/slow", Some(&acme), None).await;
    assert_eq!(slow["state"], "creating", "{slow}");
    let run = |name: &str, volumes: Value| json!({"name": name, "volumes": volumes});
    let (s, b) = api
        .call(
            "POST",
            "/v1/instances",
            Some(&acme),
            Some(run("x", json!(["slow"]))),
        )
        .await;
    assert_eq!(s, 409, "{b}");
    assert!(message(&b).contains("still being made"), "{b}");

    // A volume its agent has made, on h2.
    let tenant_id = api.store.tenant_by_name("acme").await.unwrap().unwrap().id;
    api.store
        .insert_volume(&flotilla_control::store::VolumeRow {
            id: "v-data".into(),
            tenant_id,
            name: "data".into(),
            host: "h2".into(),
            size_mib: 64,
            state: flotilla_api::control::VolumeState::Ready,
            attached_to: None,
            attached_name: None,
            created_at: 0,
        })
        .await
        .unwrap();
    // Another tenant's: not found, whatever it does.
    let (s, _) = api
        .call("GET", "/v1/volumes/data", Some(&other), None)
        .await;
    assert_eq!(s, 404);
    let (s, _) = api
        .call("DELETE", "/v1/volumes/data", Some(&other), None)
        .await;
    assert_eq!(s, 404);
    let (s, b) = api
        .call(
            "POST",
            "/v1/instances",
            Some(&other),
            Some(run("y", json!(["data"]))),
        )
        .await;
    assert_eq!(s, 404, "{b}");
    // Runs that cannot have it.
    for (body, status, needle) in [
        (
            json!({"name": "z", "count": 2, "volumes": ["data"]}),
            400,
            "one instance",
        ),
        (
            json!({"name": "z", "volumes": ["data", "data"]}),
            400,
            "twice",
        ),
        (
            json!({"name": "z", "from_snapshot": "gold", "volumes": ["data"]}),
            400,
            "snapshot",
        ),
    ] {
        let (s, b) = api
            .call("POST", "/v1/instances", Some(&acme), Some(body))
            .await;
        assert_eq!(s, status, "{b}");
        assert!(message(&b).contains(needle), "{b}");
    }

    // The instance runs where its volume is.
    let (s, b) = api
        .call(
            "POST",
            "/v1/instances",
            Some(&acme),
            Some(run("db", json!(["data"]))),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["instances"][0]["host"], "h2", "{b}");
    let (_, data) = api.call("GET", "/v1/volumes/data", Some(&acme), None).await;
    assert_eq!(data["attached_to"], "db", "{data}");
    let (_, db) = api.call("GET", "/v1/instances/db", Some(&acme), None).await;
    assert_eq!(db["volumes"], json!(["data"]), "{db}");
    let (s, b) = api
        .call(
            "POST",
            "/v1/instances",
            Some(&acme),
            Some(run("db2", json!(["data"]))),
        )
        .await;
    assert_eq!(s, 409, "{b}");
    assert!(message(&b).contains("attached to instance \"db\""), "{b}");
    let (s, b) = api
        .call("DELETE", "/v1/volumes/data", Some(&acme), None)
        .await;
    assert_eq!(s, 409, "{b}");
    // Pages.
    let (_, page) = api
        .call("GET", "/v1/volumes?page_size=1", Some(&acme), None)
        .await;
    assert_eq!(page["items"][0]["name"], "data", "{page}");
    let token = page["next_page_token"].as_str().unwrap();
    let (_, page) = api
        .call(
            "GET",
            &format!("/v1/volumes?page_size=1&page_token={token}"),
            Some(&acme),
            None,
        )
        .await;
    assert_eq!(page["items"][0]["name"], "slow", "{page}");
    assert!(page["next_page_token"].is_null(), "{page}");
}
