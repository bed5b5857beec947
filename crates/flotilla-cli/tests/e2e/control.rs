//! The control plane driving two real agents, each a test host in its own
//! network namespace: hosts register by heartbeat; runs are placed by
//! policy and created on the agents; terminate removes the VM; a control
//! plane killed mid-operation finishes it after a restart without
//! duplicates; a host whose agent stops is marked down and its instances
//! unknown, then back when it returns.

use std::time::Duration;

use flotilla_testkit::{ControlLinkOptions, ControlPlaneProcess, HostOptions, TestHost};
use serde_json::{json, Value};

fn host(cp: &ControlPlaneProcess, name: &str, zone: &str) -> TestHost {
    host_with(cp, name, zone, Vec::new())
}

/// [`host`] with extra agent arguments.
fn host_with(
    cp: &ControlPlaneProcess,
    name: &str,
    zone: &str,
    agent_args: Vec<String>,
) -> TestHost {
    // Agents heartbeat with a host token, good for nothing else.
    let (s, t) = cp.api("POST", "/v1/tokens", None, Some(json!({"host": name})));
    assert_eq!(s, 201, "{t}");
    TestHost::start_with(HostOptions {
        control: Some(ControlLinkOptions {
            port: cp.port,
            token: t["token"].as_str().expect("token").to_string(),
            host_name: name.into(),
            labels: vec![format!("zone={zone}")],
        }),
        agent_args,
        ..HostOptions::default()
    })
    .expect("test host")
}

/// The VMs an agent has that the control plane made.
fn instance_vms(h: &TestHost) -> Vec<Value> {
    let (_, b) = h.api("GET", "/v1/vms", None);
    b.as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|v| v["tags"]["flotilla.instance"].is_string())
        .collect()
}

/// The CLI against the control plane with `token`.
fn cli(cp: &ControlPlaneProcess, token: &str, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(flotilla_testkit::flotilla_bin())
        .args(args)
        .env("FLOTILLA_CONTROL_URL", cp.base())
        .env("FLOTILLA_TOKEN", token)
        .output()
        .expect("flotilla");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn wait_op(cp: &ControlPlaneProcess, token: &str, op: &str) -> Value {
    cp.wait_for(
        &format!("operation {op}"),
        &format!("/v1/operations/{op}"),
        Some(token),
        Duration::from_secs(120),
        |b| b["state"] != "running",
    )
}

#[test]
fn the_control_plane_places_and_drives_real_agents() {
    let mut cp = ControlPlaneProcess::start().expect("control plane");
    let h1 = host(&cp, "h1", "z1");
    let mut h2 = host(&cp, "h2", "z2");
    cp.wait_for(
        "both hosts",
        "/v1/hosts",
        None,
        Duration::from_secs(30),
        |b| {
            b.as_array()
                .is_some_and(|a| a.len() == 2 && a.iter().all(|h| h["state"] == "up"))
        },
    );
    // The agents report their data directory's disk space.
    let (_, hosts) = cp.api("GET", "/v1/hosts", None, None);
    for h in hosts.as_array().expect("hosts") {
        let disk = &h["disk"];
        assert!(disk["capacity_mib"].as_u64().unwrap_or(0) > 0, "{h}");
        assert!(disk["free_mib"].as_u64().unwrap_or(0) > 0, "{h}");
        assert!(
            disk["free_mib"].as_u64() <= disk["capacity_mib"].as_u64(),
            "{h}"
        );
        // And what they are: their accelerator at least.
        let traits = h["traits"].as_array().expect("traits");
        assert!(traits.iter().any(|t| t == "tcg" || t == "kvm"), "{h}");
    }
    // Tenant and token through the CLI, as an admin would.
    let admin = cp.admin_token.clone();
    let (ok, _, err) = cli(&cp, &admin, &["tenant", "create", "acme"]);
    assert!(ok, "{err}");
    let (ok, out, err) = cli(&cp, &admin, &["token", "create", "--tenant", "acme"]);
    assert!(ok, "{err}");
    let acme = out.trim().to_string();
    assert!(acme.starts_with("flt_"), "{out}");
    let (ok, _, err) = cli(&cp, &acme, &["hosts", "ls"]);
    assert!(!ok && err.contains("admin token"), "{err}");

    // Anti-affinity, stored as the web fleet's policy: one per host.
    let (ok, _, err) = cli(
        &cp,
        &acme,
        &[
            "policy",
            "set",
            "web-apart",
            "--fleet",
            "group=web",
            "--placement",
            r#"{"max_per_host": 1}"#,
        ],
    );
    assert!(ok, "{err}");
    let (ok, _, err) = cli(
        &cp,
        &acme,
        &[
            "policy",
            "set",
            "bad",
            "--placement",
            r#"{"max_per_hots": 1}"#,
        ],
    );
    assert!(!ok && err.contains("max_per_hots"), "{err}");
    let run = json!({"name": "web", "count": 2, "tags": {"group": "web"}});
    let (s, b) = cp.api("POST", "/v1/instances", Some(&acme), Some(run));
    assert_eq!(s, 201, "{b}");
    let mut hosts: Vec<String> = b["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .map(|i| i["host"].as_str().unwrap_or_default().to_string())
        .collect();
    hosts.sort();
    assert_eq!(hosts, ["h1", "h2"]);
    let op = wait_op(&cp, &acme, b["operation"].as_str().expect("op"));
    assert_eq!(op["state"], "succeeded", "{op}");
    assert_eq!(instance_vms(&h1).len(), 1);
    assert_eq!(instance_vms(&h2).len(), 1);
    // Heartbeats report them running, with the address the agent gave.
    cp.wait_for(
        "running instances",
        "/v1/instances?tag=group=web",
        Some(&acme),
        Duration::from_secs(30),
        |b| {
            b["items"].as_array().is_some_and(|a| {
                a.iter()
                    .all(|i| i["observed"] == "running" && i["ip"].is_string())
            })
        },
    );
    // A third does not fit the policy: the error says why for each host.
    let (s, b) = cp.api(
        "POST",
        "/v1/instances",
        Some(&acme),
        Some(json!({"name": "web-3", "tags": {"group": "web"}})),
    );
    assert_eq!(s, 409, "{b}");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("max_per_host 1"),
        "{b}"
    );

    // Terminate through the CLI: the VM goes from its agent, the instance
    // from the list.
    let (ok, out, err) = cli(
        &cp,
        &acme,
        &["instance", "terminate", "web-1", "--wait", "--json"],
    );
    assert!(ok, "{out} {err}");
    let op: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(op["state"], "succeeded", "{op}");
    assert_eq!(instance_vms(&h1).len() + instance_vms(&h2).len(), 1);
    let (s, _) = cp.api("GET", "/v1/instances/web-1", Some(&acme), None);
    assert_eq!(s, 404);

    // The control plane SIGKILLed right after accepting a run: after a
    // restart the operation completes, each instance made exactly once.
    let (s, b) = cp.api(
        "POST",
        "/v1/instances",
        Some(&acme),
        Some(json!({"name": "batch", "count": 3})),
    );
    assert_eq!(s, 201, "{b}");
    let op_id = b["operation"].as_str().expect("op").to_string();
    cp.kill();
    cp.spawn().expect("control plane again");
    let op = wait_op(&cp, &acme, &op_id);
    assert_eq!(op["state"], "succeeded", "{op}");
    let mut names: Vec<String> = instance_vms(&h1)
        .into_iter()
        .chain(instance_vms(&h2))
        .map(|v| {
            v["tags"]["flotilla.instance"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    names.sort();
    assert_eq!(names, ["batch-1", "batch-2", "batch-3", "web-2"]);
    let (ok, out, err) = cli(&cp, &acme, &["instance", "ls", "--json"]);
    assert!(ok, "{err}");
    let listed: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(listed.as_array().map(Vec::len), Some(4), "{listed}");
    let (ok, out, err) = cli(&cp, &acme, &["op", "ls"]);
    assert!(
        ok && out.contains("terminate") && out.contains("succeeded"),
        "{out} {err}"
    );

    // Stopped through the control plane it stays stopped (desired stopped:
    // not started again), until started.
    let (ok, out, err) = cli(&cp, &acme, &["instance", "stop", "batch-1", "--wait"]);
    assert!(ok, "{out} {err}");
    let (_, b) = cp.api("GET", "/v1/instances/batch-1", Some(&acme), None);
    assert_eq!(
        (&b["desired"], &b["observed"]),
        (&json!("stopped"), &json!("stopped")),
        "{b}"
    );
    std::thread::sleep(Duration::from_secs(7));
    let (_, b) = cp.api("GET", "/v1/instances/batch-1", Some(&acme), None);
    assert_eq!(b["observed"], "stopped", "{b}");
    let (ok, out, err) = cli(&cp, &acme, &["instance", "start", "batch-1", "--wait"]);
    assert!(ok, "{out} {err}");
    let (_, b) = cp.api("GET", "/v1/instances/batch-1", Some(&acme), None);
    assert_eq!(b["observed"], "running", "{b}");

    // Suspend the fleet by tag (warm: a QEMU waits on its host for each
    // resume), resume it by tag, through the control plane.
    let (ok, out, err) = cli(
        &cp,
        &acme,
        &[
            "instance",
            "suspend",
            "--tag",
            "group=web",
            "--warm",
            "--wait",
            "--json",
        ],
    );
    assert!(ok, "{out} {err}");
    let (_, b) = cp.api("GET", "/v1/instances/web-2", Some(&acme), None);
    assert_eq!(b["observed"], "suspended", "{b}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let warm: Vec<Value> = [&h1, &h2]
            .iter()
            .flat_map(|h| instance_vms(h))
            .filter(|v| v["state"] == "suspended")
            .collect();
        if !warm.is_empty() && warm.iter().all(|v| v["warm"] == true) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not warm: {warm:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (ok, out, err) = cli(
        &cp,
        &acme,
        &[
            "instance",
            "resume",
            "--tag",
            "group=web",
            "--wait",
            "--json",
        ],
    );
    assert!(ok, "{out} {err}");
    let (_, b) = cp.api("GET", "/v1/instances/web-2", Some(&acme), None);
    assert_eq!(b["observed"], "running", "{b}");
    // A clone goes on its source's host, where the snapshot is.
    let (ok, out, err) = cli(
        &cp,
        &acme,
        &[
            "instance",
            "clone",
            "web-2",
            "web-copy",
            "--tag",
            "group=copy",
            "--wait",
            "--json",
        ],
    );
    assert!(ok, "{out} {err}");
    let cloned: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(cloned["instances"][0]["host"], b["host"], "{cloned}");
    let (_, c) = cp.api("GET", "/v1/instances/web-copy", Some(&acme), None);
    assert_eq!(c["observed"], "running", "{c}");
    assert_ne!(c["ip"], b["ip"], "a clone has its own address");
    // Commands run in an instance through the control plane, streamed or
    // collected; another tenant cannot reach it.
    let (ok, out, err) = cli(
        &cp,
        &acme,
        &["instance", "exec", "web-copy", "--", "cat", "/etc/hostname"],
    );
    assert!(ok, "{err}");
    assert_eq!(
        out.trim(),
        c["id"].as_str().unwrap_or_default(),
        "the clone's own hostname"
    );
    let (ok, out, err) = cli(
        &cp,
        &acme,
        &[
            "instance", "exec", "web-2", "--json", "--", "sh", "-c", "exit 3",
        ],
    );
    assert!(!ok, "{err}");
    let result: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(result["exit_code"], 3, "{result}");
    let (_, t) = cp.api("POST", "/v1/tenants", None, Some(json!({"name": "other"})));
    assert!(t["id"].is_string(), "{t}");
    let (_, t) = cp.api("POST", "/v1/tokens", None, Some(json!({"tenant": "other"})));
    let other = t["token"].as_str().unwrap_or_default().to_string();
    let (ok, _, err) = cli(&cp, &other, &["instance", "exec", "web-2", "--", "true"]);
    assert!(!ok && err.contains("no instance"), "{err}");
    // With the source's tags it would break the web fleet's policy.
    let (ok, _, err) = cli(&cp, &acme, &["instance", "clone", "web-2", "web-copy2"]);
    assert!(!ok && err.contains("max_per_host"), "{err}");

    // h2's agent stops: h2 goes down and its instances become unknown,
    // never dropped; its agent back, they are running again.
    h2.kill_agent(nix::sys::signal::Signal::SIGKILL);
    cp.wait_for(
        "h2 down",
        "/v1/hosts/h2",
        None,
        Duration::from_secs(30),
        |b| b["state"] == "down",
    );
    let on_h2 = |b: &Value, want: &str| {
        b["items"].as_array().is_some_and(|a| {
            let mine: Vec<&Value> = a.iter().filter(|i| i["host"] == "h2").collect();
            !mine.is_empty() && mine.iter().all(|i| i["observed"] == want)
        })
    };
    let listed = cp.wait_for(
        "unknown instances",
        "/v1/instances",
        Some(&acme),
        Duration::from_secs(10),
        |b| on_h2(b, "unknown"),
    );
    // A terminate while the host is down fails (its agent cannot be
    // reached) and the instance stays; once the host is back, the
    // termination is carried out by itself.
    let victim = listed["items"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["host"] == "h2"))
        .map(|i| i["name"].as_str().unwrap_or_default().to_string())
        .expect("an instance on h2");
    let (ok, _, err) = cli(&cp, &acme, &["instance", "terminate", &victim, "--wait"]);
    assert!(!ok && err.contains("unreachable"), "{err}");
    let (s, _) = cp.api("GET", &format!("/v1/instances/{victim}"), Some(&acme), None);
    assert_eq!(s, 200, "kept while its host is down");
    h2.start_agent().expect("agent again");
    cp.wait_for(
        "h2 up",
        "/v1/hosts/h2",
        None,
        Duration::from_secs(30),
        |b| b["state"] == "up",
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while cp
        .api("GET", &format!("/v1/instances/{victim}"), Some(&acme), None)
        .0
        != 404
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{victim} never terminated: {}",
            cp.log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        !instance_vms(&h2)
            .iter()
            .any(|v| v["tags"]["flotilla.instance"] == victim.as_str()),
        "the VM went too"
    );
    cp.wait_for(
        "the rest running again",
        "/v1/instances",
        Some(&acme),
        Duration::from_secs(30),
        |b| {
            b["items"].as_array().is_some_and(|a| {
                a.iter()
                    .filter(|i| i["host"] == "h2")
                    .all(|i| i["observed"] == "running")
            })
        },
    );
}

/// Two control plane processes on one PostgreSQL database: the state is
/// shared (a host registered through one is seen by the other), and when
/// the replica driving a run is SIGKILLed, the other takes the run over
/// once its lease runs out and finishes it, each VM made once.
#[test]
fn two_replicas_on_postgresql_share_state_and_take_over_runs() {
    let pg = flotilla_testkit::PgServer::start().expect("postgres");
    let url = pg.url("replicas").expect("database");
    let mut b = ControlPlaneProcess::start_with(Some(url.clone()), None, 3).expect("replica b");
    let a = ControlPlaneProcess::start_with(Some(url), Some(b.admin_token.clone()), 3)
        .expect("replica a");
    let h1 = host(&a, "h1", "z1");
    b.wait_for(
        "h1 seen by the other replica",
        "/v1/hosts",
        None,
        Duration::from_secs(30),
        |v| {
            v.as_array()
                .is_some_and(|h| h.len() == 1 && h[0]["state"] == "up")
        },
    );
    let (s, _) = a.api("POST", "/v1/tenants", None, Some(json!({"name": "acme"})));
    assert_eq!(s, 201);
    let (_, t) = b.api("POST", "/v1/tokens", None, Some(json!({"tenant": "acme"})));
    let acme = t["token"].as_str().expect("token").to_string();
    let (s, r) = b.api(
        "POST",
        "/v1/instances",
        Some(&acme),
        Some(json!({"name": "w", "count": 3})),
    );
    assert_eq!(s, 201, "{r}");
    let op = r["operation"].as_str().expect("op").to_string();
    b.kill();
    let done = wait_op(&a, &acme, &op);
    assert_eq!(done["state"], "succeeded", "{done}\n{}", a.log_tail());
    let log = std::fs::read_to_string(a.dir.path().join("control.log")).unwrap_or_default();
    assert!(
        log.contains("resuming operation") && log.contains(op.as_str()),
        "replica a never took the run over:\n{}",
        a.log_tail()
    );
    let mut made: Vec<String> = instance_vms(&h1)
        .into_iter()
        .map(|v| {
            v["tags"]["flotilla.instance"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    made.sort();
    assert_eq!(made, ["w-1", "w-2", "w-3"]);
}

/// Waits for `hosts` hosts to be up, then makes tenant `acme`: the admin
/// token and acme's.
fn hosts_up_and_tenant(cp: &ControlPlaneProcess, hosts: usize) -> (String, String) {
    cp.wait_for(
        &format!("{hosts} hosts up"),
        "/v1/hosts",
        None,
        Duration::from_secs(30),
        |b| {
            b.as_array()
                .is_some_and(|a| a.len() == hosts && a.iter().all(|h| h["state"] == "up"))
        },
    );
    let admin = cp.admin_token.clone();
    assert!(cli(cp, &admin, &["tenant", "create", "acme"]).0);
    let acme = cli(cp, &admin, &["token", "create", "--tenant", "acme"])
        .1
        .trim()
        .to_string();
    (admin, acme)
}

/// A host on the cluster fabric, heartbeating to `cp`.
fn fabric_host(
    cp: &ControlPlaneProcess,
    fabric: &std::sync::Arc<flotilla_testkit::Fabric>,
    name: &str,
) -> TestHost {
    fabric_host_with(cp, fabric, name, &[])
}

/// A host on the cluster fabric with more agent arguments.
fn fabric_host_with(
    cp: &ControlPlaneProcess,
    fabric: &std::sync::Arc<flotilla_testkit::Fabric>,
    name: &str,
    agent_args: &[&str],
) -> TestHost {
    fabric_host_from(
        cp,
        fabric,
        name,
        HostOptions {
            agent_args: agent_args.iter().map(|a| a.to_string()).collect(),
            ..HostOptions::default()
        },
    )
}

/// A host on the cluster fabric from `options`, heartbeating to `cp`.
fn fabric_host_from(
    cp: &ControlPlaneProcess,
    fabric: &std::sync::Arc<flotilla_testkit::Fabric>,
    name: &str,
    options: HostOptions,
) -> TestHost {
    let (s, t) = cp.api("POST", "/v1/tokens", None, Some(json!({"host": name})));
    assert_eq!(s, 201, "{t}");
    TestHost::start_with(HostOptions {
        control: Some(ControlLinkOptions {
            port: cp.port,
            token: t["token"].as_str().expect("token").to_string(),
            host_name: name.into(),
            labels: vec![],
        }),
        fabric: Some(fabric.clone()),
        ..options
    })
    .expect("test host")
}

/// An instance whose host's agent refuses it (here: that host lacks the
/// image) is placed on another host its policy allows; the run succeeds
/// and the refusing host holds nothing.
#[test]
fn an_instance_its_host_refuses_is_placed_on_another() {
    let cp = ControlPlaneProcess::start().expect("control plane");
    let fabric = std::sync::Arc::new(flotilla_testkit::Fabric::create().expect("fabric"));
    let _h1 = fabric_host(&cp, &fabric, "h1");
    let h2 = fabric_host_from(
        &cp,
        &fabric,
        "h2",
        HostOptions {
            with_default_image: false,
            ..HostOptions::default()
        },
    );
    let (_, acme) = hosts_up_and_tenant(&cp, 2);
    // Two at once spread over both hosts; h2's agent has no image.
    let (s, b) = cp.api(
        "POST",
        "/v1/instances",
        Some(&acme),
        Some(json!({"name": "w", "count": 2})),
    );
    assert_eq!(s, 201, "{b}");
    let placed: Vec<&str> = b["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["host"].as_str())
        .collect();
    assert!(placed.contains(&"h2"), "{b}");
    let op = wait_op(&cp, &acme, b["operation"].as_str().unwrap());
    assert_eq!(op["state"], "succeeded", "{op:#}\n{}", h2.agent_log_tail());
    for name in ["w-1", "w-2"] {
        let (_, inst) = cp.api("GET", &format!("/v1/instances/{name}"), Some(&acme), None);
        assert_eq!(inst["host"], "h1", "{inst:#}");
    }
    let (_, host) = cp.api("GET", "/v1/hosts/h2", None, None);
    assert_eq!(host["instances"], 0, "{host:#}");
    assert!(instance_vms(&h2).is_empty());

    // An image no host has: refused by both, the run fails and the
    // instance holds no room anywhere, until it is terminated.
    let allocated =
        |name: &str| cp.api("GET", &format!("/v1/hosts/{name}"), None, None).1["allocated"].clone();
    let before = (allocated("h1"), allocated("h2"));
    let (s, b) = cp.api(
        "POST",
        "/v1/instances",
        Some(&acme),
        Some(json!({"name": "nowhere", "image": "no-such-image"})),
    );
    assert_eq!(s, 201, "{b}");
    let op = wait_op(&cp, &acme, b["operation"].as_str().unwrap());
    assert_eq!(op["state"], "failed", "{op:#}");
    let (_, inst) = cp.api("GET", "/v1/instances/nowhere", Some(&acme), None);
    assert_eq!(inst["observed"], "failed", "{inst:#}");
    assert!(inst["host"].is_null(), "{inst:#}");
    let error = inst["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("refused by h") && error.contains("no-such-image"),
        "{inst:#}"
    );
    assert_eq!((allocated("h1"), allocated("h2")), before);
    let (s, b) = cp.api("DELETE", "/v1/instances/nowhere", Some(&acme), None);
    assert!(s < 300, "{s} {b}");
    let op = wait_op(&cp, &acme, b["id"].as_str().unwrap_or_default());
    assert_eq!(op["state"], "succeeded", "{op:#}");
    let (s, _) = cp.api("GET", "/v1/instances/nowhere", Some(&acme), None);
    assert_eq!(s, 404);
}

#[test]
fn instances_live_migrate_and_a_drain_empties_a_host() {
    let cp = ControlPlaneProcess::start().expect("control plane");
    let fabric = std::sync::Arc::new(flotilla_testkit::Fabric::create().expect("fabric"));
    let h1 = fabric_host(&cp, &fabric, "h1");
    let h2 = fabric_host(&cp, &fabric, "h2");
    let (admin, acme) = hosts_up_and_tenant(&cp, 2);
    let (s, b) = cp.api(
        "POST",
        "/v1/instances",
        Some(&acme),
        Some(json!({"name": "db"})),
    );
    assert_eq!(s, 201, "{b}");
    let first = b["instances"][0]["host"].as_str().unwrap().to_string();
    let other = if first == "h1" { "h2" } else { "h1" };
    let op = wait_op(&cp, &acme, b["operation"].as_str().unwrap());
    assert_eq!(op["state"], "succeeded", "{op}");
    let (agent_of, agent_other) = if first == "h1" {
        (&h1, &h2)
    } else {
        (&h2, &h1)
    };
    let id = instance_vms(agent_of)[0]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, b) = agent_of.api(
        "POST",
        &format!("/v1/vms/{id}/exec"),
        Some(json!({"argv": ["sh", "-c", "echo kept > /root/mark && sync"]})),
    );
    assert_eq!(s, 200, "{b}");

    // Placement picks the other host: its only choice but its own. The
    // migration's options reach the agents.
    let (ok, out, err) = cli(
        &cp,
        &acme,
        &[
            "--json",
            "instance",
            "migrate",
            "db",
            "--no-tls",
            "--max-downtime-ms",
            "200",
            "--wait",
        ],
    );
    assert!(
        ok,
        "{out} {err}\n{}\n{}",
        h1.agent_log_tail(),
        h2.agent_log_tail()
    );
    let op: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(op["state"], "succeeded", "{op:#}");
    let (_, inst) = cp.api("GET", "/v1/instances/db", Some(&acme), None);
    assert_eq!(inst["host"], other, "{inst:#}");
    let (_, moves) = agent_other.api("GET", "/v1/migrations", None);
    assert!(
        moves.as_array().unwrap().iter().any(|m| m["tls"] == false),
        "{moves:#}"
    );
    assert!(instance_vms(agent_of).is_empty());
    assert_eq!(instance_vms(agent_other).len(), 1);
    let (s, b) = cp.api(
        "POST",
        "/v1/instances/db/exec",
        Some(&acme),
        Some(json!({"argv": ["cat", "/root/mark"]})),
    );
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["stdout"], "kept\n");
    // Asking for the host it is on is refused.
    let (s, b) = cp.api(
        "POST",
        "/v1/instances/db/migrate",
        Some(&acme),
        Some(json!({"to": other})),
    );
    assert_eq!(s, 400, "{b}");

    // Draining its host moves it back and cordons the host.
    let (ok, out, err) = cli(&cp, &admin, &["--json", "hosts", "drain", other, "--wait"]);
    assert!(ok, "{out} {err}");
    let op: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(op["state"], "succeeded", "{op:#}");
    let (_, inst) = cp.api("GET", "/v1/instances/db", Some(&acme), None);
    assert_eq!(inst["host"], first, "{inst:#}");
    assert!(instance_vms(agent_other).is_empty());
    let (_, host) = cp.api("GET", &format!("/v1/hosts/{other}"), None, None);
    assert_eq!(host["cordoned"], true, "{host:#}");
    assert_eq!(host["instances"], 0, "{host:#}");
    // Nowhere left to go: the only other host is cordoned.
    let (s, b) = cp.api(
        "POST",
        "/v1/instances/db/migrate",
        Some(&acme),
        Some(json!({})),
    );
    assert_eq!(s, 202, "{b}");
    let op = wait_op(&cp, &acme, b["id"].as_str().unwrap());
    assert_eq!(op["state"], "failed", "{op:#}");
    let (_, inst) = cp.api("GET", "/v1/instances/db", Some(&acme), None);
    assert_eq!(inst["host"], first, "{inst:#}");
    assert_eq!(instance_vms(agent_of).len(), 1);

    // Stopped behind the control plane's back (on its agent), an instance
    // meant to run is started again (its VM keeps its name, the instance's
    // id, wherever it moves).
    let (s, b) = agent_of.api(
        "POST",
        &format!("/v1/vms/{id}/stop"),
        Some(json!({"force": true})),
    );
    assert_eq!(s, 200, "{b}");
    eventually("the control plane starting db again", 60, || {
        let (_, vm) = agent_of.api("GET", &format!("/v1/vms/{id}"), None);
        let (_, inst) = cp.api("GET", "/v1/instances/db", Some(&acme), None);
        match (vm["state"].as_str(), inst["observed"].as_str()) {
            (Some("running"), Some("running")) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let (_, ops) = cp.api("GET", "/v1/operations", Some(&acme), None);
    assert!(
        ops["items"]
            .as_array()
            .is_some_and(|a| a.iter().any(|o| o["kind"] == "start")),
        "{ops:#}"
    );
}

/// Polls `check` every 200 ms until it holds or `secs` pass.
fn eventually(what: &str, secs: u64, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        match check() {
            Ok(()) => return,
            Err(e) if std::time::Instant::now() > deadline => panic!("{what}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// The cluster VM network: instances on different hosts get addresses
/// unique across them and reach each other (routes from the control
/// plane, proxy ARP on the bridges); after one moves, every host routes
/// its address to its new host and they still reach each other.
#[test]
fn instances_on_different_hosts_reach_each_other_before_and_after_a_move() {
    let cp = ControlPlaneProcess::start().expect("control plane");
    let fabric = std::sync::Arc::new(flotilla_testkit::Fabric::create().expect("fabric"));
    // h3 serves plain HTTP (a trusted network): the control plane and a
    // migration's source reach it without a certificate.
    let hosts = [
        fabric_host(&cp, &fabric, "h1"),
        fabric_host(&cp, &fabric, "h2"),
        fabric_host_with(&cp, &fabric, "h3", &["--plain-http"]),
    ];
    let host = |name: &str| &hosts[name[1..].parse::<usize>().unwrap() - 1];
    let (admin, acme) = hosts_up_and_tenant(&cp, 3);
    // The control plane trusts each agent by the certificate its
    // heartbeats name.
    let (_, h1) = cp.api("GET", "/v1/hosts/h1", None, None);
    assert_eq!(
        h1["tls_fingerprint"],
        json!(host("h1").fingerprint()),
        "{h1}"
    );
    assert_eq!(h1["vm_subnet"], "10.77.0.0/24", "{h1}");
    // h3 is kept free for the move.
    assert!(cli(&cp, &admin, &["hosts", "cordon", "h3"]).0);
    let (s, b) = cp.api(
        "POST",
        "/v1/instances",
        Some(&acme),
        Some(
            json!({"name": "pair", "count": 2, "tags": {"group": "pair"},
                    "placement": {"max_per_host": 1}}),
        ),
    );
    assert_eq!(s, 201, "{b}");
    let op = wait_op(&cp, &acme, b["operation"].as_str().unwrap());
    assert_eq!(op["state"], "succeeded", "{op}");
    let instance = |name: &str| {
        cp.api("GET", &format!("/v1/instances/{name}"), Some(&acme), None)
            .1
    };
    let (one, two) = (instance("pair-1"), instance("pair-2"));
    let ip = |i: &Value| i["ip"].as_str().expect("an address").to_string();
    let (ip1, ip2) = (ip(&one), ip(&two));
    assert_ne!(ip1, ip2, "addresses are unique across hosts");
    let host_of = |i: &Value| i["host"].as_str().unwrap().to_string();
    let (host1, host2) = (host_of(&one), host_of(&two));
    assert_ne!(host1, host2);
    // The VM has the address the control plane gave it.
    let id2 = instance_vms(host(&host2))[0].clone();
    assert_eq!(id2["nics"][0]["ip"], ip2.as_str(), "{id2:#}");

    let ping_as = |token: &str, from: &str, to: &str| -> Result<(), String> {
        let (s, b) = cp.api(
            "POST",
            &format!("/v1/instances/{from}/exec"),
            Some(token),
            Some(json!({"argv": ["ping", "-c", "1", "-W", "1", to]})),
        );
        if s == 200 && b["exit_code"] == 0 {
            Ok(())
        } else {
            Err(format!("{s} {b}"))
        }
    };
    let ping = |from: &str, to: &str| ping_as(&acme, from, to);
    let route = |on: &str, to: &str| -> String {
        host(on)
            .netns
            .exec_ip(&["route", "show", &format!("{to}/32")])
            .unwrap_or_default()
    };
    let via = |on: &str| host(on).netns.ns_ip.clone();
    eventually("pair-1 reaching pair-2 across hosts", 30, || {
        ping("pair-1", &ip2)
    });
    eventually("pair-2 reaching pair-1 across hosts", 30, || {
        ping("pair-2", &ip1)
    });
    let r = route(&host1, &ip2);
    assert!(r.contains(&format!("via {}", via(&host2))), "{r}");
    assert!(
        route(&host2, &ip2).is_empty(),
        "no route away from a VM's own host"
    );

    // Another tenant's instance, on one of the pair's hosts: it and the
    // pair do not reach each other, on that host or across hosts.
    assert!(cli(&cp, &admin, &["tenant", "create", "rival"]).0);
    let rival = cli(&cp, &admin, &["token", "create", "--tenant", "rival"])
        .1
        .trim()
        .to_string();
    let (s, b) = cp.api(
        "POST",
        "/v1/instances",
        Some(&rival),
        Some(json!({"name": "spy"})),
    );
    assert_eq!(s, 201, "{b}");
    let op = wait_op(&cp, &rival, b["operation"].as_str().unwrap());
    assert_eq!(op["state"], "succeeded", "{op}");
    let spy_ip = ip(&cp.api("GET", "/v1/instances/spy", Some(&rival), None).1);
    eventually("spy's guest answering", 30, || {
        let (s, b) = cp.api(
            "POST",
            "/v1/instances/spy/exec",
            Some(&rival),
            Some(json!({"argv": ["true"]})),
        );
        (s == 200).then_some(()).ok_or(format!("{s} {b}"))
    });
    for to in [&ip1, &ip2] {
        assert!(ping_as(&rival, "spy", to).is_err(), "spy reached {to}");
    }
    for from in ["pair-1", "pair-2"] {
        assert!(ping(from, &spy_ip).is_err(), "{from} reached spy");
    }
    // Nor from an address it takes for itself: a tap sends only from its
    // VM's own address.
    let (s, b) = cp.api(
        "POST",
        "/v1/instances/spy/exec",
        Some(&rival),
        Some(json!({"argv": ["ip", "addr", "add", "10.77.0.250/24", "dev", "eth0"]})),
    );
    assert!(s == 200 && b["exit_code"] == 0, "{s} {b}");
    let (s, b) = cp.api(
        "POST",
        "/v1/instances/spy/exec",
        Some(&rival),
        Some(json!({"argv": ["ping", "-c", "1", "-W", "1", "-I", "10.77.0.250", &ip1]})),
    );
    assert!(
        s == 200 && b["exit_code"] != 0,
        "spy reached pair-1 as 10.77.0.250: {b}"
    );
    assert!(cli(&cp, &admin, &["hosts", "uncordon", "h3"]).0);

    // pair-2 moves to h3: every host's route follows it, and the pair
    // still reach each other.
    let (ok, out, err) = cli(
        &cp,
        &acme,
        &[
            "--json", "instance", "migrate", "pair-2", "--to", "h3", "--no-tls", "--wait",
        ],
    );
    assert!(ok, "{out} {err}");
    let op: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(op["state"], "succeeded", "{op:#}");
    eventually("the network converging on h3", 30, || {
        let r = route(&host1, &ip2);
        if r.contains(&format!("via {}", via("h3"))) && route("h3", &ip2).is_empty() {
            Ok(())
        } else {
            Err(format!("{host1}: {r:?}; h3: {:?}", route("h3", &ip2)))
        }
    });
    let r = route("h3", &ip1);
    assert!(r.contains(&format!("via {}", via(&host1))), "{r}");
    eventually("pair-1 reaching pair-2 on h3", 30, || ping("pair-1", &ip2));
    eventually("pair-2 on h3 reaching pair-1", 30, || ping("pair-2", &ip1));
    assert!(
        ping_as(&rival, "spy", &ip2).is_err(),
        "spy reached pair-2 on h3"
    );
}

/// Runs `argv` in the tenant's instance through the control plane, retrying
/// while its guest is not ready yet; returns stdout.
fn exec_in(cp: &ControlPlaneProcess, token: &str, name: &str, argv: &[&str]) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (s, b) = cp.api(
            "POST",
            &format!("/v1/instances/{name}/exec"),
            Some(token),
            Some(json!({ "argv": argv })),
        );
        if s == 200 && b["exit_code"] == 0 {
            return b["stdout"].as_str().unwrap_or_default().to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "exec in {name}: {s} {b}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn snapshots_are_tenant_resources_and_instances_start_from_them() {
    let cp = ControlPlaneProcess::start().expect("control plane");
    let _h1 = host(&cp, "h1", "z1");
    let _h2 = host(&cp, "h2", "z2");
    let (admin, acme) = hosts_up_and_tenant(&cp, 2);
    assert!(cli(&cp, &admin, &["tenant", "create", "other"]).0);
    let other = cli(&cp, &admin, &["token", "create", "--tenant", "other"])
        .1
        .trim()
        .to_string();
    let (s, b) = cp.api(
        "POST",
        "/v1/instances",
        Some(&acme),
        Some(json!({"name": "src"})),
    );
    assert_eq!(s, 201, "{b}");
    let home = b["instances"][0]["host"].as_str().unwrap().to_string();
    let op = wait_op(&cp, &acme, b["operation"].as_str().unwrap());
    assert_eq!(op["state"], "succeeded", "{op:#}");
    exec_in(
        &cp,
        &acme,
        "src",
        &["sh", "-c", "echo gold > /root/mark && sync"],
    );

    // Taken through the CLI; kept on the instance's host.
    let (ok, out, err) = cli(
        &cp,
        &acme,
        &["--json", "instance", "snapshot", "create", "src", "gold"],
    );
    assert!(ok, "{out} {err}");
    let snap: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        (snap["name"].as_str(), snap["host"].as_str()),
        (Some("gold"), Some(home.as_str()))
    );
    assert_eq!(snap["state"], "ready", "{snap}");
    let (s, b) = cp.api(
        "POST",
        "/v1/instances/src/snapshots",
        Some(&acme),
        Some(json!({"name": "gold"})),
    );
    assert_eq!(s, 409, "a second of the name: {b}");
    // Another tenant sees none of it and cannot start from it.
    let (s, _) = cp.api("GET", "/v1/snapshots/gold", Some(&other), None);
    assert_eq!(s, 404);
    let (_, list) = cp.api("GET", "/v1/snapshots", Some(&other), None);
    assert_eq!(list["items"], json!([]));
    let (s, b) = cp.api(
        "POST",
        "/v1/instances",
        Some(&other),
        Some(json!({"name": "thief", "from_snapshot": "gold"})),
    );
    assert_eq!(s, 404, "{b}");
    let (s, _) = cp.api("DELETE", "/v1/snapshots/gold", Some(&other), None);
    assert_eq!(s, 404);

    // Two instances from it: on its host, with its contents, each itself.
    let (s, b) = cp.api(
        "POST",
        "/v1/instances",
        Some(&acme),
        Some(json!({"name": "copy", "count": 2, "from_snapshot": "gold"})),
    );
    assert_eq!(s, 201, "{b}");
    for i in b["instances"].as_array().unwrap() {
        assert_eq!(i["host"], home.as_str(), "{b}");
    }
    let op = wait_op(&cp, &acme, b["operation"].as_str().unwrap());
    assert_eq!(op["state"], "succeeded", "{op:#}");
    for name in ["copy-1", "copy-2"] {
        assert_eq!(exec_in(&cp, &acme, name, &["cat", "/root/mark"]), "gold\n");
        assert_eq!(exec_in(&cp, &acme, name, &["hostname"]).trim(), {
            let (_, inst) = cp.api("GET", &format!("/v1/instances/{name}"), Some(&acme), None);
            inst["id"].as_str().unwrap().to_string()
        });
    }
    // Kept while instances started from it need it.
    let (s, b) = cp.api("DELETE", "/v1/snapshots/gold", Some(&acme), None);
    assert_eq!(s, 409, "{b}");
    for name in ["copy-1", "copy-2"] {
        let (_, b) = cp.api(
            "DELETE",
            &format!("/v1/instances/{name}"),
            Some(&acme),
            None,
        );
        let op = wait_op(&cp, &acme, b["id"].as_str().unwrap());
        assert_eq!(op["state"], "succeeded", "{op:#}");
    }
    let (ok, out, err) = cli(&cp, &acme, &["instance", "snapshot", "rm", "gold"]);
    assert!(ok, "{out} {err}");
    let (_, list) = cp.api("GET", "/v1/snapshots", Some(&acme), None);
    assert_eq!(list["items"], json!([]));
}

/// Drift: an instance whose VM its host no longer has is made again; VMs
/// the control plane does not know (made on the host directly, or named
/// like an instance it has no record of) are left alone.
#[test]
fn missing_vms_are_made_again_and_others_left_alone() {
    let cp = ControlPlaneProcess::start().expect("control plane");
    let h1 = host(&cp, "h1", "z1");
    let (_, acme) = hosts_up_and_tenant(&cp, 1);
    let (s, b) = cp.api(
        "POST",
        "/v1/instances",
        Some(&acme),
        Some(json!({"name": "web"})),
    );
    assert_eq!(s, 201, "{b}");
    let id = b["instances"][0]["id"].as_str().unwrap().to_string();
    let op = wait_op(&cp, &acme, b["operation"].as_str().unwrap());
    assert_eq!(op["state"], "succeeded", "{op:#}");
    for name in ["i-0123456789abcdef", "by-hand"] {
        let (s, b) = h1.api(
            "POST",
            "/v1/vms",
            Some(json!({"name": name, "start": false})),
        );
        assert_eq!(s, 201, "{b}");
    }
    let (s, b) = h1.api("DELETE", &format!("/v1/vms/{id}?force=true"), None);
    assert!(s < 300, "{s} {b}");
    let names = || -> Vec<String> {
        let (_, b) = h1.api("GET", "/v1/vms", None);
        b.as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|v| v["name"].as_str().map(str::to_string))
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let now = names();
        let (_, inst) = cp.api("GET", "/v1/instances/web", Some(&acme), None);
        let settled = now.contains(&id) && inst["observed"] == "running";
        if settled {
            for other in ["by-hand", "i-0123456789abcdef"] {
                assert!(now.iter().any(|n| n == other), "{now:?}");
            }
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not settled: {now:?} {inst:#}\n{}",
            cp.log_tail()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// An agent killed in the middle of an operation: a fleet suspend of eight
/// instances, the host's agent SIGKILLed once the first has been recorded
/// and started again. The operation ends with the steps it could not do
/// failed; every instance is either suspended or running where it was
/// (the agent completes or rolls back a suspend it was in), nothing is
/// lost, and the fleet suspend and resume then go through.
#[test]
fn an_agent_killed_mid_operation_loses_nothing() {
    let cp = ControlPlaneProcess::start().expect("control plane");
    let mut h1 = host(&cp, "h1", "z1");
    let (_, acme) = hosts_up_and_tenant(&cp, 1);
    let (s, b) = cp.api(
        "POST",
        "/v1/instances",
        Some(&acme),
        Some(json!({"name": "w", "count": 8, "tags": {"pool": "p"}})),
    );
    assert_eq!(s, 201, "{b}");
    let op = wait_op(&cp, &acme, b["operation"].as_str().unwrap());
    assert_eq!(op["state"], "succeeded", "{op:#}");
    let names: Vec<String> = (1..=8).map(|i| format!("w-{i}")).collect();
    for name in &names {
        exec_in(
            &cp,
            &acme,
            name,
            &["sh", "-c", &format!("echo {name} > /tmp/mark")],
        );
    }

    let (s, op) = cp.api(
        "POST",
        "/v1/fleet/suspend",
        Some(&acme),
        Some(json!({"tags": {"pool": "p"}})),
    );
    assert!(s < 300, "{s} {op}");
    let op_id = op["id"].as_str().unwrap().to_string();
    eventually("a first suspend recorded", 60, || {
        let (_, op) = cp.api("GET", &format!("/v1/operations/{op_id}"), Some(&acme), None);
        match op["steps"].as_array().map(Vec::len) {
            Some(n) if n > 0 => Ok(()),
            _ => Err(format!("{op}")),
        }
    });
    h1.kill_agent(nix::sys::signal::Signal::SIGKILL);
    let ended = wait_op(&cp, &acme, &op_id);
    // The second four were under way: their steps failed, unreachable.
    assert_eq!(ended["state"], "failed", "{ended:#}");
    assert!(
        ended["error"]
            .as_str()
            .unwrap_or("")
            .contains("unreachable"),
        "{ended:#}"
    );
    h1.start_agent().expect("agent again");
    // Either way, each instance ends up suspended or running, as its
    // host reports it.
    eventually("instances settled", 90, || {
        let (_, list) = cp.api("GET", "/v1/instances?tag=pool=p", Some(&acme), None);
        let states: Vec<String> = list["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|i| i["observed"].as_str().unwrap_or_default().to_string())
            .collect();
        match states.len() == 8 && states.iter().all(|s| s == "suspended" || s == "running") {
            true => Ok(()),
            false => Err(format!("{states:?} after {ended}")),
        }
    });
    for action in ["suspend", "resume"] {
        let (s, op) = cp.api(
            "POST",
            &format!("/v1/fleet/{action}"),
            Some(&acme),
            Some(json!({"tags": {"pool": "p"}})),
        );
        assert!(s < 300, "{s} {op}");
        let op = wait_op(&cp, &acme, op["id"].as_str().unwrap());
        assert_eq!(
            op["state"],
            "succeeded",
            "{action}: {op:#}\n{}",
            h1.agent_log_tail()
        );
    }
    for name in &names {
        assert_eq!(
            exec_in(&cp, &acme, name, &["cat", "/tmp/mark"]).trim(),
            name.as_str(),
            "{name}'s memory"
        );
    }
}

/// A snapshot asked for while its host's agent is down stays `creating`
/// (never started from); once the agent answers again and says it has no
/// such snapshot, the control plane removes the record.
#[test]
fn a_snapshot_left_creating_is_settled_with_its_host() {
    let cp = ControlPlaneProcess::start().expect("control plane");
    let mut h1 = host(&cp, "h1", "z1");
    let (_, acme) = hosts_up_and_tenant(&cp, 1);
    let (s, b) = cp.api(
        "POST",
        "/v1/instances",
        Some(&acme),
        Some(json!({"name": "src"})),
    );
    assert_eq!(s, 201, "{b}");
    let op = wait_op(&cp, &acme, b["operation"].as_str().unwrap());
    assert_eq!(op["state"], "succeeded", "{op:#}");
    h1.kill_agent(nix::sys::signal::Signal::SIGKILL);
    let (s, b) = cp.api(
        "POST",
        "/v1/instances/src/snapshots",
        Some(&acme),
        Some(json!({"name": "lost"})),
    );
    assert_eq!(s, 503, "{b}");
    let (_, snap) = cp.api("GET", "/v1/snapshots/lost", Some(&acme), None);
    assert_eq!(snap["state"], "creating", "{snap}");
    h1.start_agent().expect("agent again");
    eventually("the snapshot settled", 60, || {
        match cp.api("GET", "/v1/snapshots/lost", Some(&acme), None).0 {
            404 => Ok(()),
            s => Err(format!("{s}")),
        }
    });
    // The name is free again, and a snapshot now is ready at once.
    let (s, b) = cp.api(
        "POST",
        "/v1/instances/src/snapshots",
        Some(&acme),
        Some(json!({"name": "lost"})),
    );
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["state"], "ready", "{b}");
}

/// Volumes: made on a host by placement, attached to one instance at a
/// time (which runs on its host), kept with their data when it goes.
#[test]
fn volumes_are_tenant_resources_that_outlive_instances() {
    let cp = ControlPlaneProcess::start().expect("control plane");
    let fabric = std::sync::Arc::new(flotilla_testkit::Fabric::create().expect("fabric"));
    let h1 = fabric_host(&cp, &fabric, "h1");
    let h2 = fabric_host(&cp, &fabric, "h2");
    let (_, acme) = hosts_up_and_tenant(&cp, 2);
    let (ok, out, err) = cli(
        &cp,
        &acme,
        &[
            "--json", "instance", "volume", "create", "home", "--size", "64M",
        ],
    );
    assert!(ok, "{out} {err}");
    let vol: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(vol["state"], "ready", "{vol}");
    let (home_host, other_host) = if vol["host"] == "h1" {
        (&h1, &h2)
    } else {
        (&h2, &h1)
    };
    let (_, on_agent) = home_host.api("GET", "/v1/volumes", None);
    assert_eq!(on_agent[0]["name"], vol["id"], "{on_agent}");
    let (_, elsewhere) = other_host.api("GET", "/v1/volumes", None);
    assert_eq!(elsewhere, json!([]));

    let run = |name: &str, on: &str| {
        let (s, b) = cp.api(
            "POST",
            "/v1/instances",
            Some(&acme),
            Some(json!({"name": name, "volumes": ["home"]})),
        );
        assert_eq!(s, 201, "{b}");
        assert_eq!(b["instances"][0]["host"], on, "{b}");
        let op = wait_op(&cp, &acme, b["operation"].as_str().unwrap());
        assert_eq!(op["state"], "succeeded", "{op:#}");
    };
    let terminate = |name: &str| {
        let (_, b) = cp.api(
            "DELETE",
            &format!("/v1/instances/{name}"),
            Some(&acme),
            None,
        );
        let op = wait_op(&cp, &acme, b["id"].as_str().unwrap());
        assert_eq!(op["state"], "succeeded", "{op:#}");
    };
    let first = vol["host"].as_str().unwrap().to_string();
    let second = if first == "h1" { "h2" } else { "h1" };
    run("dev", &first);
    exec_in(
        &cp,
        &acme,
        "dev",
        &[
            "sh",
            "-c",
            "printf kept-data | dd of=/dev/vdb bs=512 conv=sync,fsync 2>/dev/null",
        ],
    );
    let (_, listed) = cp.api("GET", "/v1/volumes", Some(&acme), None);
    assert_eq!(listed["items"][0]["attached_to"], "dev", "{listed}");
    let (ok, _, err) = cli(&cp, &acme, &["instance", "volume", "rm", "home"]);
    assert!(!ok && err.contains("attached to instance"), "{err}");
    // It moves with its volume: the volume is the other host's then.
    let (s, b) = cp.api(
        "POST",
        "/v1/instances/dev/migrate",
        Some(&acme),
        Some(json!({})),
    );
    assert_eq!(s, 202, "{b}");
    let op = wait_op(&cp, &acme, b["id"].as_str().unwrap());
    assert_eq!(op["state"], "succeeded", "{op:#}");
    let (_, home) = cp.api("GET", "/v1/volumes/home", Some(&acme), None);
    assert_eq!(home["host"], second, "{home}");
    eventually("the volume on its new host", 30, || {
        let (_, on_new) = other_host.api("GET", "/v1/volumes", None);
        let (_, on_old) = home_host.api("GET", "/v1/volumes", None);
        (on_new[0]["name"] == vol["id"] && on_old == json!([]))
            .then_some(())
            .ok_or(format!("{on_new} {on_old}"))
    });
    let read = exec_in(
        &cp,
        &acme,
        "dev",
        &[
            "sh",
            "-c",
            "dd if=/dev/vdb bs=512 count=1 2>/dev/null | tr -d '\\000'",
        ],
    );
    assert_eq!(
        read,
        "kept-data",
        "--- h1 ---\n{}\n--- h2 ---\n{}",
        h1.agent_log_tail(),
        h2.agent_log_tail()
    );
    // No snapshot or clone without it.
    let (s, b) = cp.api(
        "POST",
        "/v1/instances/dev/snapshots",
        Some(&acme),
        Some(json!({"name": "snap"})),
    );
    assert_eq!(s, 409, "{b}");
    assert!(b.to_string().contains("volumes attached"), "{b}");
    let (s, b) = cp.api(
        "POST",
        "/v1/instances/dev/clone",
        Some(&acme),
        Some(json!({"name": "copy"})),
    );
    assert_eq!(s, 409, "{b}");
    let (_, all) = cp.api("GET", "/v1/instances", Some(&acme), None);
    assert_eq!(
        all["items"].as_array().unwrap().len(),
        1,
        "nothing recorded: {all}"
    );

    // The instance goes; the volume stays, with its data, for the next.
    terminate("dev");
    let (_, home) = cp.api("GET", "/v1/volumes/home", Some(&acme), None);
    assert!(home.get("attached_to").is_none(), "{home}");
    run("dev2", second);
    let read = exec_in(
        &cp,
        &acme,
        "dev2",
        &[
            "sh",
            "-c",
            "dd if=/dev/vdb bs=512 count=1 2>/dev/null | tr -d '\\000'",
        ],
    );
    assert_eq!(read, "kept-data");
    terminate("dev2");
    let (ok, out, err) = cli(&cp, &acme, &["instance", "volume", "rm", "home"]);
    assert!(ok, "{out} {err}");
    let (_, on_agent) = other_host.api("GET", "/v1/volumes", None);
    assert_eq!(on_agent, json!([]));
    let (_, listed) = cp.api("GET", "/v1/volumes", Some(&acme), None);
    assert_eq!(listed["items"], json!([]));
}

#[test]
fn a_warm_suspend_its_host_refuses_fails_and_the_instance_runs_on() {
    let cp = ControlPlaneProcess::start().expect("control plane");
    let h = host_with(&cp, "cold", "z1", vec!["--max-warm".into(), "0".into()]);
    let (_, acme) = hosts_up_and_tenant(&cp, 1);
    let (ok, out, err) = cli(&cp, &acme, &["instance", "run", "solo", "--wait"]);
    assert!(ok, "{out} {err}");

    // The agent refuses (409): the step fails with its reason, not taken
    // for a suspend already done.
    let (ok, out, err) = cli(
        &cp,
        &acme,
        &["instance", "suspend", "solo", "--warm", "--wait", "--json"],
    );
    assert!(!ok, "{out} {err}");
    let op: Value = serde_json::from_str(&out).expect("operation json");
    assert_eq!(op["state"], "failed", "{op:#}");
    assert!(format!("{op}").contains("--max-warm 0"), "{op:#}");
    let vms = instance_vms(&h);
    assert_eq!(vms.len(), 1);
    assert_eq!(vms[0]["state"], "running", "{vms:?}");
    // A cold suspend still works.
    let (ok, out, err) = cli(&cp, &acme, &["instance", "suspend", "solo", "--wait"]);
    assert!(ok, "{out} {err}");
    assert_eq!(instance_vms(&h)[0]["state"], "suspended");
}
