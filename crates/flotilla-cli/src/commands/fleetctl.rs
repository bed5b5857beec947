//! Control plane verbs: tenants, tokens, instances, hosts and operations.
//! Every one is an HTTP call to `flotilla control` with a bearer token.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use flotilla_api::control::{
    CloneInstanceRequest, CreateSnapshotRequest, CreateTenantRequest, CreateTokenRequest,
    FleetSelector, Host, Instance, Operation, OperationState, Page, PlacementExplanation,
    PlacementPolicy, Policy, PolicyDocument, RunInstancesRequest, RunInstancesResult, Snapshot,
    Tenant, TokenCreated,
};
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::Method;

use crate::args::{
    HostsCommand, InstanceCommand, InstanceRunArgs, InstanceSelectArgs, InstanceSnapshotCommand,
    OpCommand, PolicyCommand, TenantCommand, TokenCommand,
};
use crate::client::{CliError, Client};
use crate::output::{self, opt};

/// Path segments and query values are names and ids of `[a-z0-9-]`, or
/// checked by the server; tags go through percent-encoding.
/// Every item of a paged list at `path` (a path without a query), page
/// after page.
pub(super) async fn every_page<T: serde::de::DeserializeOwned>(
    c: &Client,
    path: &str,
) -> anyhow::Result<Vec<T>> {
    let mut items = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page_path = match &token {
            Some(t) => format!("{path}?page_token={}", encode(t)),
            None => path.to_string(),
        };
        let page: Page<T> = c.get(&page_path).await?;
        items.extend(page.items);
        token = page.next_page_token;
        if token.is_none() {
            return Ok(items);
        }
    }
}

pub(super) fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

pub async fn tenant(c: &Client, json: bool, cmd: TenantCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        TenantCommand::Create { name } => {
            let t: Tenant = c.post("/v1/tenants", &CreateTenantRequest { name }).await?;
            if json {
                output::json(&t)?;
            } else {
                println!("tenant {} created (id {})", t.name, t.id);
            }
        }
        TenantCommand::Ls => {
            let list: Vec<Tenant> = c.get("/v1/tenants").await?;
            if json {
                output::json(&list)?;
            } else {
                let rows = list
                    .iter()
                    .map(|t| vec![t.name.clone(), t.id.clone(), t.created_at.clone()])
                    .collect::<Vec<_>>();
                output::table(&["NAME", "ID", "CREATED"], &rows);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn token(c: &Client, json: bool, cmd: TokenCommand) -> anyhow::Result<ExitCode> {
    let TokenCommand::Create {
        tenant,
        admin,
        host,
        description,
    } = cmd;
    let t: TokenCreated = c
        .post(
            "/v1/tokens",
            &CreateTokenRequest {
                tenant,
                admin,
                host,
                description,
            },
        )
        .await?;
    if json {
        output::json(&t)?;
    } else {
        // The secret alone on stdout, for `export FLOTILLA_TOKEN=$(...)`.
        eprintln!(
            "token {} ({}); shown once:",
            t.id,
            match (&t.tenant, &t.host) {
                (Some(x), _) => format!("tenant {x}"),
                (None, Some(h)) => format!("host {h}"),
                (None, None) => "admin".to_string(),
            }
        );
        println!("{}", t.token);
    }
    Ok(ExitCode::SUCCESS)
}

/// A placement policy from JSON inline or `@FILE`.
pub(super) fn parse_placement(text: String) -> anyhow::Result<PlacementPolicy> {
    let text = match text.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).map_err(|e| {
            CliError::new(format!("cannot read placement policy {path}: {e}"), None)
        })?,
        None => text,
    };
    Ok(serde_json::from_str(&text).map_err(|e| {
        CliError::new(
            format!("invalid placement policy: {e}"),
            Some("fields: require_labels, forbid_labels, require_traits, forbid_traits, cpu_overcommit, memory_overcommit, disk_overcommit, max_per_host, max_per_label, partitions, group_tag, strategy, prefer_labels, affinity".into()),
        )
    })?)
}

fn policy_path(name: &str, tenant: Option<String>) -> String {
    match tenant {
        Some(t) => format!("/v1/policies/{}?tenant={}", encode(name), encode(&t)),
        None => format!("/v1/policies/{}", encode(name)),
    }
}

pub async fn policy(c: &Client, json: bool, cmd: PolicyCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PolicyCommand::Set {
            name,
            placement,
            fleet,
            tenant,
        } => {
            let doc = PolicyDocument {
                fleet: fleet.into_iter().collect(),
                placement: parse_placement(placement)?,
            };
            let path = policy_path(&name, tenant);
            let p: Policy = c
                .send(c.request(Method::PUT, &path).json(&doc))
                .await?
                .json()
                .await?;
            if json {
                output::json(&p)?;
            } else {
                println!("policy {} stored", p.name);
            }
        }
        PolicyCommand::Ls => {
            let list: Vec<Policy> = c.get("/v1/policies").await?;
            if json {
                output::json(&list)?;
            } else {
                let rows = list
                    .iter()
                    .map(|p| {
                        vec![
                            p.name.clone(),
                            p.tenant.clone().unwrap_or_else(|| "(global)".into()),
                            p.fleet
                                .iter()
                                .map(|(k, v)| format!("{k}={v}"))
                                .collect::<Vec<_>>()
                                .join(","),
                            serde_json::to_string(&p.placement).unwrap_or_default(),
                        ]
                    })
                    .collect::<Vec<_>>();
                output::table(&["NAME", "TENANT", "FLEET", "PLACEMENT"], &rows);
            }
        }
        PolicyCommand::Rm { name, tenant } => c.delete(&policy_path(&name, tenant)).await?,
    }
    Ok(ExitCode::SUCCESS)
}

fn run_request(args: InstanceRunArgs) -> anyhow::Result<RunInstancesRequest> {
    let placement = args.placement.map(parse_placement).transpose()?;
    Ok(RunInstancesRequest {
        name: args.name,
        count: args.count,
        image: args.image,
        vcpus: args.vcpus,
        memory_mib: args.memory,
        disk_mib: args.disk,
        tags: args.tags.into_iter().collect::<BTreeMap<_, _>>(),
        placement,
        from_snapshot: args.from_snapshot,
        volumes: args.volumes,
    })
}

/// Polls the operation until it ends, with a spinner on a terminal.
async fn wait_op(c: &Client, id: &str) -> anyhow::Result<Operation> {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    loop {
        let op: Operation = c.get(&format!("/v1/operations/{}", encode(id))).await?;
        bar.set_message(format!(
            "{} {}: {} of {} steps",
            op.kind,
            op.id,
            op.steps.len(),
            op.targets.len()
        ));
        if op.state != OperationState::Running {
            bar.finish_and_clear();
            return Ok(op);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn op_outcome(op: &Operation) -> ExitCode {
    match op.state {
        OperationState::Failed => {
            eprintln!(
                "error: operation {} failed: {}",
                op.id,
                op.error.as_deref().unwrap_or("no reason given")
            );
            ExitCode::FAILURE
        }
        _ => ExitCode::SUCCESS,
    }
}

fn instance_rows(list: &[Instance]) -> Vec<Vec<String>> {
    list.iter()
        .map(|i| {
            vec![
                i.name.clone(),
                serde_json::to_value(i.observed)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                opt(&i.host),
                opt(&i.ip),
                i.vcpus.to_string(),
                i.memory_mib.to_string(),
                i.tags
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(","),
            ]
        })
        .collect()
}

const INSTANCE_HEADER: [&str; 7] = ["NAME", "STATE", "HOST", "IP", "VCPUS", "MEM MiB", "TAGS"];

pub async fn instance(c: &Client, json: bool, cmd: InstanceCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        InstanceCommand::Run(args) => {
            let (wait, key) = (args.wait, args.idempotency_key.clone());
            let req = run_request(args)?;
            let mut r = c.request(Method::POST, "/v1/instances").json(&req);
            if let Some(k) = key {
                r = r.header("Idempotency-Key", k);
            }
            let result: RunInstancesResult = c.send(r).await?.json().await?;
            return report_made(c, json, result, wait, "placed on").await;
        }
        InstanceCommand::Explain(args) => {
            let e: PlacementExplanation =
                c.post("/v1/placement/explain", &run_request(args)?).await?;
            if json {
                output::json(&e)?;
            } else {
                println!("chosen: {}", opt(&e.chosen));
                let rows = e
                    .hosts
                    .iter()
                    .map(|v| {
                        let labels = v
                            .labels
                            .iter()
                            .map(|(k, val)| format!("{k}={val}"))
                            .collect::<Vec<_>>()
                            .join(",");
                        vec![
                            v.host.clone(),
                            labels,
                            v.score.map_or("-".into(), |s| format!("{s:.3}")),
                            opt(&v.rejected),
                        ]
                    })
                    .collect::<Vec<_>>();
                output::table(&["HOST", "LABELS", "SCORE", "REJECTED"], &rows);
            }
        }
        InstanceCommand::Ls { tags, state, host } => {
            let mut query = vec!["page_size=500".to_string()];
            if !tags.is_empty() {
                let t = tags
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",");
                query.push(format!("tag={}", encode(&t)));
            }
            if let Some(s) = state {
                query.push(format!("state={}", encode(&s)));
            }
            if let Some(h) = host {
                query.push(format!("host={}", encode(&h)));
            }
            let mut all = Vec::new();
            let mut token: Option<String> = None;
            loop {
                let mut q = query.clone();
                if let Some(t) = &token {
                    q.push(format!("page_token={}", encode(t)));
                }
                let page: Page<Instance> = c.get(&format!("/v1/instances?{}", q.join("&"))).await?;
                all.extend(page.items);
                token = page.next_page_token;
                if token.is_none() {
                    break;
                }
            }
            if json {
                output::json(&all)?;
            } else {
                output::table(&INSTANCE_HEADER, &instance_rows(&all));
            }
        }
        InstanceCommand::Inspect { name } => {
            let i: Instance = c.get(&format!("/v1/instances/{}", encode(&name))).await?;
            output::json(&i)?;
        }
        InstanceCommand::Tag { name, set, remove } => {
            let mut tags: BTreeMap<String, Option<String>> =
                remove.into_iter().map(|k| (k, None)).collect();
            tags.extend(set.into_iter().map(|(k, v)| (k, Some(v))));
            let req = flotilla_api::control::UpdateInstanceRequest { tags };
            let i: Instance = c
                .patch(&format!("/v1/instances/{}", encode(&name)), &req)
                .await?;
            if json {
                output::json(&i)?;
            } else {
                let tags: Vec<String> = i.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
                println!("{}: {}", i.name, tags.join(" "));
            }
        }
        InstanceCommand::Exec(args) => {
            let path = format!("/v1/instances/{}/exec", encode(&args.name));
            return super::vm::exec_at(c, json, &path, args).await;
        }
        InstanceCommand::Suspend { select, warm } => {
            let query = if warm { "?warm=true" } else { "" };
            return select_act(c, json, ("suspend", query), select).await;
        }
        InstanceCommand::Resume(sel) => return select_act(c, json, ("resume", ""), sel).await,
        InstanceCommand::Snapshot(cmd) => return snapshot_command(c, json, cmd).await,
        InstanceCommand::Volume(cmd) => return super::instance_volume::run(c, json, cmd).await,
        InstanceCommand::Clone {
            source,
            name,
            tags,
            wait,
        } => {
            let req = CloneInstanceRequest {
                name,
                tags: (!tags.is_empty()).then(|| tags.into_iter().collect()),
            };
            let result: RunInstancesResult = c
                .post(&format!("/v1/instances/{}/clone", encode(&source)), &req)
                .await?;
            let verb = format!("cloned from {source} on");
            return report_made(c, json, result, wait, &verb).await;
        }
        InstanceCommand::Migrate {
            name,
            to,
            options,
            wait,
        } => {
            let path = format!("/v1/instances/{}/migrate", encode(&name));
            let body = flotilla_api::control::MigrateInstanceRequest {
                to,
                options: options.options(),
            };
            let req = c.request(Method::POST, &path).json(&body);
            return act_request(c, json, req, wait).await;
        }
        InstanceCommand::Terminate { name, wait } => {
            return act(
                c,
                json,
                Method::DELETE,
                &format!("/v1/instances/{}", encode(&name)),
                wait,
            )
            .await
        }
        InstanceCommand::Start { name, wait } => {
            return act(
                c,
                json,
                Method::POST,
                &format!("/v1/instances/{}/start", encode(&name)),
                wait,
            )
            .await
        }
        InstanceCommand::Stop { name, wait } => {
            return act(
                c,
                json,
                Method::POST,
                &format!("/v1/instances/{}/stop", encode(&name)),
                wait,
            )
            .await
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints the instances a run or clone made (`NAME <verb> HOST`) and its
/// operation, waiting for the operation with `wait`.
async fn report_made(
    c: &Client,
    json: bool,
    result: RunInstancesResult,
    wait: bool,
    verb: &str,
) -> anyhow::Result<ExitCode> {
    let op = match wait {
        true => Some(wait_op(c, &result.operation).await?),
        false => None,
    };
    if json {
        output::json(&result)?;
    } else {
        for i in &result.instances {
            println!("{} {verb} {}", i.name, opt(&i.host));
        }
        let follow = if wait {
            ""
        } else {
            " (flotilla op inspect ID to follow it)"
        };
        println!("operation {}{follow}", result.operation);
    }
    Ok(op.as_ref().map_or(ExitCode::SUCCESS, op_outcome))
}

/// One instance by name, or a fleet by names and tags.
/// `action` with the query its requests carry (`?...`, or empty).
async fn select_act(
    c: &Client,
    json: bool,
    (action, query): (&str, &str),
    sel: InstanceSelectArgs,
) -> anyhow::Result<ExitCode> {
    if sel.names.is_empty() && sel.tags.is_empty() {
        return Err(CliError::new(
            format!("name the instances to {action}, or select them with --tag"),
            None,
        )
        .into());
    }
    if sel.names.len() == 1 && sel.tags.is_empty() {
        let path = format!("/v1/instances/{}/{action}{query}", encode(&sel.names[0]));
        return act(c, json, Method::POST, &path, sel.wait).await;
    }
    let selector = FleetSelector {
        tags: sel.tags.into_iter().collect(),
        names: sel.names,
    };
    let mut op: Operation = c
        .post(&format!("/v1/fleet/{action}{query}"), &selector)
        .await?;
    if sel.wait {
        op = wait_op(c, &op.id).await?;
    }
    if json {
        output::json(&op)?;
    } else {
        println!(
            "operation {} ({} of {} instances): {}",
            op.id,
            action,
            op.targets.len(),
            serde_json::to_value(op.state)?.as_str().unwrap_or_default()
        );
        for step in op.steps.iter().filter(|s| s.contains(": failed: ")) {
            eprintln!("  {step}");
        }
    }
    Ok(op_outcome(&op))
}

async fn act(
    c: &Client,
    json: bool,
    method: Method,
    path: &str,
    wait: bool,
) -> anyhow::Result<ExitCode> {
    act_request(c, json, c.request(method, path), wait).await
}

/// Starts an operation with `req`, optionally follows it, and reports it.
async fn act_request(
    c: &Client,
    json: bool,
    req: reqwest::RequestBuilder,
    wait: bool,
) -> anyhow::Result<ExitCode> {
    let mut op: Operation = c.send(req).await?.json().await?;
    if wait {
        op = wait_op(c, &op.id).await?;
    }
    if json {
        output::json(&op)?;
    } else {
        println!(
            "operation {} ({}): {}",
            op.id,
            op.kind,
            serde_json::to_value(op.state)?.as_str().unwrap_or_default()
        );
    }
    Ok(op_outcome(&op))
}

pub async fn hosts(c: &Client, json: bool, cmd: HostsCommand) -> anyhow::Result<ExitCode> {
    let one = match cmd {
        HostsCommand::Ls => {
            let list: Vec<Host> = c.get("/v1/hosts").await?;
            if json {
                output::json(&list)?;
            } else {
                let rows = list
                    .iter()
                    .map(|h| {
                        vec![
                            h.name.clone(),
                            serde_json::to_value(h.state)
                                .ok()
                                .and_then(|v| v.as_str().map(str::to_string))
                                .unwrap_or_default()
                                + if h.cordoned { ",cordoned" } else { "" },
                            format!("{}/{}", h.allocated.vcpus, h.capacity.vcpus),
                            format!("{}/{}", h.allocated.memory_mib, h.capacity.memory_mib),
                            h.disk.map_or("-".into(), |d| {
                                format!(
                                    "{}/{} ({} free)",
                                    d.allocated_mib, d.capacity_mib, d.free_mib
                                )
                            }),
                            h.instances.to_string(),
                            h.labels
                                .iter()
                                .map(|(k, v)| format!("{k}={v}"))
                                .collect::<Vec<_>>()
                                .join(","),
                            h.endpoint.clone(),
                        ]
                    })
                    .collect::<Vec<_>>();
                output::table(
                    &[
                        "NAME",
                        "STATE",
                        "VCPUS",
                        "MEM MiB",
                        "DISK MiB",
                        "INSTANCES",
                        "LABELS",
                        "ENDPOINT",
                    ],
                    &rows,
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        HostsCommand::Inspect { name } => {
            c.get::<Host>(&format!("/v1/hosts/{}", encode(&name)))
                .await?
        }
        HostsCommand::Cordon { name } => {
            c.post::<_, Host>(&format!("/v1/hosts/{}/cordon", encode(&name)), &())
                .await?
        }
        HostsCommand::Drain { name, wait } => {
            let path = format!("/v1/hosts/{}/drain", encode(&name));
            return act(c, json, Method::POST, &path, wait).await;
        }
        HostsCommand::Uncordon { name } => {
            c.post::<_, Host>(&format!("/v1/hosts/{}/uncordon", encode(&name)), &())
                .await?
        }
    };
    output::json(&one)?;
    Ok(ExitCode::SUCCESS)
}

pub async fn op(c: &Client, json: bool, cmd: OpCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        OpCommand::Ls { limit } => {
            let page: Page<Operation> = c.get(&format!("/v1/operations?page_size={limit}")).await?;
            let ops = page.items;
            if json {
                output::json(&ops)?;
            } else {
                let rows = ops
                    .iter()
                    .map(|o| {
                        vec![
                            o.id.clone(),
                            o.kind.clone(),
                            serde_json::to_value(o.state)
                                .ok()
                                .and_then(|v| v.as_str().map(str::to_string))
                                .unwrap_or_default(),
                            format!("{}/{}", o.steps.len(), o.targets.len()),
                            o.created_at.clone(),
                            opt(&o.error),
                        ]
                    })
                    .collect::<Vec<_>>();
                output::table(&["ID", "KIND", "STATE", "STEPS", "CREATED", "ERROR"], &rows);
            }
        }
        OpCommand::Inspect { id } => {
            let o: Operation = c.get(&format!("/v1/operations/{}", encode(&id))).await?;
            output::json(&o)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn snapshot_command(
    c: &Client,
    json: bool,
    cmd: InstanceSnapshotCommand,
) -> anyhow::Result<ExitCode> {
    let show = |snaps: &[Snapshot]| {
        let rows = snaps
            .iter()
            .map(|s| {
                vec![
                    s.name.clone(),
                    serde_json::to_value(s.state)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default(),
                    s.instance.clone(),
                    s.host.clone(),
                    s.vcpus.to_string(),
                    s.memory_mib.to_string(),
                    s.created_at.clone(),
                ]
            })
            .collect::<Vec<_>>();
        output::table(
            &[
                "NAME", "STATE", "INSTANCE", "HOST", "VCPUS", "MEM MiB", "CREATED",
            ],
            &rows,
        );
    };
    match cmd {
        InstanceSnapshotCommand::Create { instance, name } => {
            let path = format!("/v1/instances/{}/snapshots", encode(&instance));
            let snap: Snapshot = c.post(&path, &CreateSnapshotRequest { name }).await?;
            if json {
                output::json(&snap)?;
            } else {
                println!(
                    "snapshot {} of {} on {}",
                    snap.name, snap.instance, snap.host
                );
            }
        }
        InstanceSnapshotCommand::Ls => {
            let list: Vec<Snapshot> = every_page(c, "/v1/snapshots").await?;
            if json {
                output::json(&list)?;
            } else {
                show(&list);
            }
        }
        InstanceSnapshotCommand::Inspect { name } => {
            let snap: Snapshot = c.get(&format!("/v1/snapshots/{}", encode(&name))).await?;
            output::json(&snap)?;
        }
        InstanceSnapshotCommand::Rm { name } => {
            c.delete(&format!("/v1/snapshots/{}", encode(&name)))
                .await?;
            if !json {
                println!("removed snapshot {name}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
