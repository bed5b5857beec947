//! The control plane's resources: tenants, tokens, hosts, instances,
//! placement policies and operations. Host agents speak the VM types of
//! [`crate::vm`]; users of a fleet speak these.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::host::{DiskSpace, Resources};
use crate::vm::VmState;

/// A tenant: the owner of instances, policies and tokens.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Tenant {
    pub id: String,
    pub name: String,
    /// RFC 3339.
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTenantRequest {
    /// 1-63 characters of `[a-z0-9-]`, starting with a letter.
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    /// The tenant the token acts for (by name); none for an admin token.
    #[serde(default)]
    pub tenant: Option<String>,
    /// Admin tokens manage tenants, hosts and global policies.
    #[serde(default)]
    pub admin: bool,
    /// A host token: its agent may heartbeat as this host, nothing more.
    #[serde(default)]
    pub host: Option<String>,
    /// A note for people: what the token is for.
    #[serde(default)]
    pub description: Option<String>,
}

/// A new token. The secret is shown here once and stored only as a hash.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenCreated {
    pub id: String,
    pub tenant: Option<String>,
    pub admin: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// `Authorization: Bearer <token>`.
    pub token: String,
}

/// What an agent sends every few seconds; the first one registers the host.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HostHeartbeat {
    /// Where the control plane reaches the agent's API, e.g. `http://10.0.0.5:7777`.
    pub endpoint: String,
    /// The agent's own API token, for the control plane's calls to it. Sent
    /// only over this host-token channel and never shown by the API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_token: Option<String>,
    /// SHA-256 of the agent's TLS certificate, which the control plane
    /// pins when it calls an `https://` endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_fingerprint: Option<String>,
    pub capacity: Resources,
    /// Disk space for VMs: capacity and what is free now.
    #[serde(default)]
    pub disk: Option<DiskSpace>,
    /// What the host is or can do, for placement: found by the agent
    /// (`kvm` or `tcg`, `cpu-avx2`, `cpu-avx512f`, `cpu-aes`,
    /// `network-isolation`) and given by the operator (`--trait gpu`).
    #[serde(default)]
    pub traits: std::collections::BTreeSet<String>,
    /// Labels for placement: `area`, `zone`, `rack`, `hw-gen`, anything.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Every VM on the host with its state, for reconciliation.
    #[serde(default)]
    pub vms: Vec<ReportedVm>,
    /// The host's VM subnet (CIDR), shared by the hosts a VM can move
    /// between: the control plane gives new instances addresses in it that
    /// no other instance holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_subnet: Option<String>,
    /// The version of the VM routes the host applied last (from the last
    /// reply); the reply carries the routes only when they changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes_version: Option<String>,
}

/// The control plane's answer to a heartbeat.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatReply {
    /// Where every instance on another host lives, when that changed since
    /// the version the heartbeat named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes: Option<VmRoutes>,
}

/// The cluster's VM routes as one host sees them: each address of an
/// instance elsewhere, reached via that instance's host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmRoutes {
    pub version: String,
    pub routes: Vec<VmRoute>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
pub struct VmRoute {
    /// The instance's address.
    pub ip: String,
    /// Its host's address on the network between the hosts.
    pub via: String,
    /// Its host's name (for people reading the table).
    pub host: String,
    /// Its network group (its tenant): VMs of different groups do not
    /// reach each other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// The VM tag naming a VM's network group: VMs of different groups (the
/// control plane sets its tenant's id) do not reach each other; VMs
/// without it form a group of their own.
pub const NETWORK_GROUP_TAG: &str = "flotilla.tenant";

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ReportedVm {
    pub name: String,
    pub state: VmState,
    #[serde(default)]
    pub ip: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Heartbeats arrive.
    Up,
    /// Heartbeats stopped: its instances are reported `unknown`, never dropped.
    Down,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Host {
    pub name: String,
    pub endpoint: String,
    pub state: HostState,
    /// No new instances are placed on a cordoned host.
    pub cordoned: bool,
    pub capacity: Resources,
    /// Held by the instances placed on the host.
    pub allocated: Resources,
    /// Disk space: what the host has for VMs, what its instances are
    /// counted for, what is free on its disk (absent until an agent that
    /// reports it heartbeats).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<HostDisk>,
    pub instances: u64,
    pub labels: BTreeMap<String, String>,
    /// What the host is or can do (see `HostHeartbeat::traits`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
    pub traits: std::collections::BTreeSet<String>,
    /// The host's VM subnet, as its agent reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_subnet: Option<String>,
    /// SHA-256 of the agent's TLS certificate, which the control plane
    /// trusts alone when it calls the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_fingerprint: Option<String>,
    /// RFC 3339.
    pub last_heartbeat: String,
    /// RFC 3339.
    pub registered_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunInstancesRequest {
    /// The name; with `count` > 1, instances are named `<name>-<i>` (from 1).
    pub name: String,
    #[serde(default = "one")]
    pub count: u32,
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default = "one")]
    pub vcpus: u32,
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Placement rules for this request, on top of the tenant's.
    #[serde(default)]
    pub placement: Option<PlacementPolicy>,
    /// Disk space each instance is counted for on its host: its root
    /// disk's growth and its snapshots (default 2048).
    #[serde(default = "default_disk_mib")]
    pub disk_mib: u64,
    /// Start from this snapshot of the tenant's instead of booting: the
    /// instances run on the snapshot's host, with its vCPUs and memory
    /// (`vcpus` and `memory_mib` are taken from it), each with its own
    /// identity.
    #[serde(default)]
    pub from_snapshot: Option<String>,
    /// Volumes of the tenant's to attach (a run of one instance): it runs
    /// on their host, and gets them as data disks in name order after its
    /// root disk (`/dev/vdb`, ...). They stay when it is terminated.
    #[serde(default)]
    pub volumes: Vec<String>,
}

/// The tag holding an instance's partition (`1`..=count) in a partition
/// group (see [`PlacementPolicy::partitions`]).
pub const PARTITION_TAG: &str = "flotilla.partition";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Partitions {
    /// How many partitions (1 to 64).
    pub count: u32,
    /// The host label partitions do not share values of (e.g. `rack`).
    pub label: String,
}

/// A tenant's snapshot of an instance: kept on the instance's host, where
/// instances can start from it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Snapshot {
    pub id: String,
    pub name: String,
    pub tenant: String,
    pub host: String,
    /// The instance it was taken of.
    pub instance: String,
    pub image: Option<String>,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// `ready`, or `creating` while its host makes it (one whose host did
    /// not answer stays so until removed).
    pub state: SnapshotState,
    /// RFC 3339.
    pub created_at: String,
}

/// A tenant's volume: a data disk kept on one host, attached to at most one
/// instance at a time (which runs on that host), outliving it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Volume {
    pub id: String,
    pub name: String,
    pub tenant: String,
    pub host: String,
    pub size_mib: u64,
    pub state: VolumeState,
    /// The instance it is attached to (its name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attached_to: Option<String>,
    /// RFC 3339.
    pub created_at: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VolumeState {
    /// Its host is making it (one whose host did not answer stays so until
    /// the host is asked again: ready if it has it, gone if not).
    Creating,
    Ready,
    /// Being removed from its host (one whose host did not answer stays so
    /// until the host is asked again); never attached again.
    Deleting,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVolumeRequest {
    /// Unique among the tenant's volumes: `[a-z0-9][a-z0-9-]{0,62}`.
    pub name: String,
    pub size_mib: u64,
    /// Rules for the host it is made on (and so where instances using it
    /// run), on top of the tenant's policy.
    #[serde(default)]
    pub placement: Option<PlacementPolicy>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotState {
    Creating,
    Ready,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshotRequest {
    /// Unique among the tenant's snapshots: `[a-z0-9][a-z0-9-]{0,62}`.
    pub name: String,
}

fn one() -> u32 {
    1
}

fn default_memory_mib() -> u64 {
    256
}

/// Disk room an instance is counted for when its request names none: the
/// default image's root disk (512 MiB) grown full, plus a few snapshots.
pub const DEFAULT_INSTANCE_DISK_MIB: u64 = 2048;

fn default_disk_mib() -> u64 {
    DEFAULT_INSTANCE_DISK_MIB
}

/// A host's disk space as the control plane counts it, in MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HostDisk {
    pub capacity_mib: u64,
    /// What its instances are counted for.
    pub allocated_mib: u64,
    /// Free on its disk at its last heartbeat.
    pub free_mib: u64,
}

/// What the user asked an instance to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DesiredState {
    Running,
    Stopped,
    Suspended,
    Terminated,
}

/// What the instance was last seen as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ObservedState {
    /// Placed, not created on its host yet.
    Pending,
    Starting,
    Running,
    Stopped,
    Suspended,
    /// Its host stopped sending heartbeats, or stopped reporting it.
    Unknown,
    Failed,
    Terminated,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Instance {
    pub id: String,
    pub name: String,
    pub tenant: String,
    pub host: Option<String>,
    pub desired: DesiredState,
    pub observed: ObservedState,
    pub image: Option<String>,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Disk space the instance is counted for on its host.
    #[serde(default)]
    pub disk_mib: u64,
    /// The snapshot it started from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_snapshot: Option<String>,
    pub ip: Option<String>,
    pub tags: BTreeMap<String, String>,
    /// The operation that last acted on it.
    pub operation: Option<String>,
    pub last_error: Option<String>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
    /// The volumes attached to it, by name (on describe; lists leave
    /// them out).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<String>,
}

/// A page of a list; pass `next_page_token` as `page_token` for the next.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_page_token: Option<String>,
}

/// The answer to a run: the instances and the operation creating them.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RunInstancesResult {
    pub operation: String,
    pub instances: Vec<Instance>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OperationState {
    Running,
    Succeeded,
    Failed,
}

/// A multi-step change, persisted step by step so that it resumes after a
/// control plane restart.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Operation {
    pub id: String,
    pub tenant: Option<String>,
    /// `run`, `terminate`, `start`, `stop`.
    pub kind: String,
    /// The instances it acts on.
    pub targets: Vec<String>,
    pub state: OperationState,
    /// Steps done so far, in order, e.g. `place`, `create i-…`.
    pub steps: Vec<String>,
    pub error: Option<String>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
}

/// Placement rules: filters (hard) then ranking (soft). Unknown fields are
/// rejected with their path.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlacementPolicy {
    /// Hosts must carry every one of these labels with these values.
    #[serde(default)]
    pub require_labels: BTreeMap<String, String>,
    /// Hosts must not carry any of these label values.
    #[serde(default)]
    pub forbid_labels: BTreeMap<String, String>,
    /// Hosts must have every one of these traits (what a host is or can
    /// do: `kvm`, `tcg`, `cpu-avx2`, `network-isolation`, or an operator's
    /// own such as `gpu`).
    #[serde(default)]
    pub require_traits: std::collections::BTreeSet<String>,
    /// Hosts must have none of these traits.
    #[serde(default)]
    pub forbid_traits: std::collections::BTreeSet<String>,
    /// vCPUs placed per host vCPU (default 1.0; e.g. 4.0 to overcommit).
    #[serde(default)]
    pub cpu_overcommit: Option<f64>,
    /// Memory placed per host MiB (default 1.0).
    #[serde(default)]
    pub memory_overcommit: Option<f64>,
    /// Instances' disk space placed per MiB of a host's disk capacity
    /// (default 1.0; disks are thin, so e.g. 2.0 is common). Whatever the
    /// ratio, a host whose disk has less free than an instance's
    /// `disk_mib` takes no more.
    #[serde(default)]
    pub disk_overcommit: Option<f64>,
    /// At most this many of the tenant's instances carrying `group` tag
    /// value per host (spread); hard.
    #[serde(default)]
    pub max_per_host: Option<u32>,
    /// At most this many of the group on hosts sharing a value of the
    /// label, per label: `{"rack": 1}` puts each of a group on its own rack
    /// (a partition), `{"zone": 3}` caps a zone; hard.
    // Left out when empty, so replicas of an older version (which refuse
    // unknown fields) still read the policies a newer one stored.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub max_per_label: BTreeMap<String, u32>,
    /// A partition group (as EC2's): the group is split into `count`
    /// partitions, and hosts sharing a value of `label` (a rack) hold
    /// instances of one partition only, so a rack failure takes at most one
    /// partition. Each instance carries its partition in tag
    /// [`PARTITION_TAG`] (set at placement to the emptiest, or given in
    /// the request to choose one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<Partitions>,
    /// The tag whose value defines the group for `max_per_host`,
    /// `max_per_label`, `spread` and `cluster` (default `group`).
    #[serde(default)]
    pub group_tag: Option<String>,
    /// `spread` (fewest of the group first), `binpack` (fullest host first)
    /// or `cluster` (most of the group first).
    #[serde(default)]
    pub strategy: Option<PlacementStrategy>,
    /// Soft preferences: a host with the label value gains the weight.
    #[serde(default)]
    pub prefer_labels: Vec<LabelPreference>,
    /// Near or away from the tenant's instances carrying a tag value, hard
    /// (a filter) or soft (a score).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub affinity: Vec<AffinityRule>,
}

/// `{"tag": "app", "value": "db", "toward": true, "hard": true}`: only
/// hosts already holding an instance tagged `app=db`. With `toward: false`,
/// only hosts holding none (anti-affinity). Soft rules add or subtract
/// `weight` instead.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AffinityRule {
    pub tag: String,
    pub value: String,
    /// Near them (affinity) or away (anti-affinity).
    #[serde(default = "yes")]
    pub toward: bool,
    #[serde(default)]
    pub hard: bool,
    #[serde(default = "default_weight")]
    pub weight: f64,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PlacementStrategy {
    /// Fewest of the group first, then the emptiest host.
    Spread,
    /// The fullest host that fits.
    Binpack,
    /// Most of the group first (kept together), then the fullest host.
    Cluster,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LabelPreference {
    pub label: String,
    pub value: String,
    #[serde(default = "default_weight")]
    pub weight: f64,
}

fn default_weight() -> f64 {
    1.0
}

/// Why each host was taken or not, for one placement.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PlacementExplanation {
    pub chosen: Option<String>,
    pub hosts: Vec<HostVerdict>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HostVerdict {
    pub host: String,
    /// The host's labels (zone, rack, ...), which the rules weigh.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Why the host was filtered out; none if it passed.
    pub rejected: Option<String>,
    /// Its ranking score if it passed (higher is better).
    pub score: Option<f64>,
}

/// A stored placement policy: for every instance of its tenant (or of every
/// tenant, when an admin stores it without one), or for a fleet: the
/// instances carrying all of `fleet`'s tags.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyDocument {
    /// Tags selecting the fleet it applies to; none: the whole tenant.
    #[serde(default)]
    pub fleet: BTreeMap<String, String>,
    pub placement: PlacementPolicy,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Policy {
    pub name: String,
    /// None: a global policy, for every tenant.
    pub tenant: Option<String>,
    pub fleet: BTreeMap<String, String>,
    pub placement: PlacementPolicy,
    /// RFC 3339.
    pub updated_at: String,
}

/// A clone of a running (or suspended) instance, on the same host: its
/// snapshot is local to that host.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloneInstanceRequest {
    pub name: String,
    /// The clone's tags (default: the source's).
    #[serde(default)]
    pub tags: Option<BTreeMap<String, String>>,
}

/// `POST /v1/instances/{name}/migrate`: live-migrate it to `to`, or to where
/// its placement policy puts it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateInstanceRequest {
    #[serde(default)]
    pub to: Option<String>,
    /// Limits, convergence policy and encryption of the migration.
    #[serde(default)]
    pub options: crate::migration::MigrationOptions,
}

/// Changes to an instance (`PATCH /v1/instances/{name}`), as a JSON merge
/// patch: a tag set to a string is set, a tag set to null is removed, tags
/// not named are kept.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateInstanceRequest {
    #[serde(default)]
    pub tags: BTreeMap<String, Option<String>>,
}

/// Instances of the caller's tenant selected by tags (all must match) and/or
/// names.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FleetSelector {
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    #[serde(default)]
    pub names: Vec<String>,
}
