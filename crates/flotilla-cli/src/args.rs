//! The command line, declared with clap. Verbs and flags here are a stable
//! interface: scripts and docs rely on them.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::units::{parse_disk, parse_key_value, parse_mib, parse_trait};

pub const DEFAULT_ENDPOINT: &str = "https://127.0.0.1:7777";

#[derive(Debug, Parser)]
#[command(
    name = "flotilla",
    version,
    about = "Run fleets of Linux microVMs",
    propagate_version = true
)]
pub struct Cli {
    /// The agent's API address.
    #[arg(long, global = true, env = "FLOTILLA_ENDPOINT", default_value = DEFAULT_ENDPOINT)]
    pub endpoint: String,
    /// The agent's API token (default: the one in the data directory of a
    /// local agent, FLOTILLA_DATA_DIR or the default, when readable).
    #[arg(
        long,
        global = true,
        env = "FLOTILLA_AGENT_TOKEN",
        hide_env_values = true
    )]
    pub agent_token: Option<String>,
    /// SHA-256 of the agent's TLS certificate, which the CLI trusts alone
    /// (default: the certificate in a local agent's data directory;
    /// `flotilla host` on the agent's machine shows it).
    #[arg(long, global = true, env = "FLOTILLA_AGENT_FINGERPRINT")]
    pub agent_fingerprint: Option<String>,
    /// Print JSON instead of tables, for scripts.
    #[arg(long, global = true)]
    pub json: bool,
    /// The control plane's API address (for tenant, token, instance, hosts, op).
    #[arg(
        long,
        global = true,
        env = "FLOTILLA_CONTROL_URL",
        default_value = "http://127.0.0.1:7700"
    )]
    pub control_url: String,
    /// An API token of the control plane.
    #[arg(long, global = true, env = "FLOTILLA_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a single-host Flotilla in the foreground with embedded defaults
    /// (builds the default image if needed). Ctrl-C stops the VMs and exits.
    Up(UpArgs),
    /// Run the host agent daemon. VMs keep running when it exits and are
    /// re-adopted by the next agent on the same data directory.
    Agent(AgentArgs),
    /// Run a control plane replica: tenants, hosts, instances, placement and
    /// durable operations over SQLite or PostgreSQL.
    Control(ControlArgs),
    /// Guest images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Virtual machines.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Operations on many VMs at once, by name or tag.
    #[command(subcommand)]
    Fleet(FleetCommand),
    /// Snapshots: layers of VMs' memory and disk.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Volumes: data disks of this host that outlive VMs, attached to one
    /// VM at a time (`vm run --volume NAME`).
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Live migrations this host takes part in.
    #[command(subcommand)]
    Migration(MigrationCommand),
    /// What the agent reports about its host.
    Host,
    /// Control plane: tenants (admin).
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Control plane: API tokens (admin).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Control plane: instances, placed on hosts by policy.
    #[command(subcommand)]
    Instance(InstanceCommand),
    /// Control plane: the registered hosts (admin).
    #[command(subcommand)]
    Hosts(HostsCommand),
    /// Control plane: operations (runs, terminations, ...) and their steps.
    #[command(subcommand)]
    Op(OpCommand),
    /// Control plane: placement policies stored for a tenant or a fleet.
    #[command(subcommand)]
    Policy(PolicyCommand),
}

#[derive(Debug, Subcommand)]
pub enum MigrationCommand {
    Ls,
    Inspect {
        id: String,
    },
    /// Stop a migration still copying memory; the VM runs on where it was.
    Cancel {
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Create or replace a policy.
    Set {
        name: String,
        /// The placement rules: JSON inline or @FILE.
        #[arg(long)]
        placement: String,
        /// Apply only to instances with this tag (repeat: all of them).
        #[arg(long = "fleet", value_parser = parse_key_value)]
        fleet: Vec<(String, String)>,
        /// Admin: the tenant (id); without it an admin stores a global policy.
        #[arg(long)]
        tenant: Option<String>,
    },
    Ls,
    Rm {
        name: String,
        #[arg(long)]
        tenant: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    Create { name: String },
    Ls,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Issue a token; its secret is printed once.
    #[command(group(clap::ArgGroup::new("kind").required(true).multiple(false)))]
    Create {
        /// The tenant the token acts for.
        #[arg(long, group = "kind")]
        tenant: Option<String>,
        /// An admin token (hosts, tenants, every tenant's instances).
        #[arg(long, group = "kind")]
        admin: bool,
        /// A host token: an agent heartbeats with it as this host, and can
        /// do nothing else.
        #[arg(long, group = "kind")]
        host: Option<String>,
        #[arg(long)]
        description: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct InstanceRunArgs {
    /// The name; with --count N the instances are NAME-1..NAME-N.
    pub name: String,
    #[arg(long, default_value_t = 1)]
    pub count: u32,
    #[arg(long)]
    pub image: Option<String>,
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Memory, e.g. 256M or 1G.
    #[arg(long, value_parser = parse_mib, default_value = "256")]
    pub memory: u64,
    /// Disk space each instance is counted for on its host (its root
    /// disk's growth and snapshots), e.g. 4G.
    #[arg(long, value_parser = parse_mib, default_value = "2048")]
    pub disk: u64,
    #[arg(long = "tag", value_parser = parse_key_value)]
    pub tags: Vec<(String, String)>,
    /// A placement policy: JSON inline or @FILE.
    #[arg(long)]
    pub placement: Option<String>,
    /// Start from this snapshot (see `instance snapshot`) on its host,
    /// with its vCPUs and memory, instead of booting.
    #[arg(long, conflicts_with = "image")]
    pub from_snapshot: Option<String>,
    /// Attach this volume of yours (see `instance volume`; repeatable): the
    /// instance runs on its host and gets it as /dev/vdb, /dev/vdc, ... in
    /// name order.
    #[arg(long = "volume", conflicts_with = "from_snapshot")]
    pub volumes: Vec<String>,
    /// The same key again gets the first answer instead of new instances.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Wait until the operation is done.
    #[arg(long)]
    pub wait: bool,
}

#[derive(Debug, Subcommand)]
pub enum InstanceCommand {
    /// Place and start instances.
    Run(InstanceRunArgs),
    /// Why each host would or would not take such an instance.
    Explain(InstanceRunArgs),
    /// List instances (every page).
    Ls {
        #[arg(long = "tag", value_parser = parse_key_value)]
        tags: Vec<(String, String)>,
        /// Observed state: pending, starting, running, stopped, unknown, failed, ...
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        host: Option<String>,
    },
    Inspect {
        name: String,
    },
    /// Live-migrate a running instance to another host.
    Migrate {
        name: String,
        /// The host; without it, placement picks one (never the current).
        #[arg(long)]
        to: Option<String>,
        #[command(flatten)]
        options: MigrationFlags,
        #[arg(long)]
        wait: bool,
    },
    /// Set or remove tags (never moves the instance).
    Tag {
        name: String,
        /// KEY=VALUE to set.
        #[arg(value_parser = parse_key_value)]
        set: Vec<(String, String)>,
        /// A tag to remove (repeat for more).
        #[arg(long = "rm")]
        remove: Vec<String>,
    },
    Terminate {
        name: String,
        #[arg(long)]
        wait: bool,
    },
    Start {
        name: String,
        #[arg(long)]
        wait: bool,
    },
    Stop {
        name: String,
        #[arg(long)]
        wait: bool,
    },
    /// Suspend instances (by name and/or --tag), a few at a time.
    Suspend {
        #[command(flatten)]
        select: InstanceSelectArgs,
        /// Then keep a QEMU waiting on the host for each resume (a process
        /// without guest memory): the resume skips QEMU's start.
        #[arg(long)]
        warm: bool,
    },
    /// Resume suspended instances (by name and/or --tag).
    Resume(InstanceSelectArgs),
    /// Run a command in the instance through its host's agent.
    Exec(VmExecArgs),
    /// Clone a running instance on its host.
    Clone {
        source: String,
        name: String,
        /// The clone's tags (default: the source's).
        #[arg(long = "tag", value_parser = parse_key_value)]
        tags: Vec<(String, String)>,
        #[arg(long)]
        wait: bool,
    },
    /// The tenant's snapshots of instances: take, list, inspect, remove.
    #[command(subcommand)]
    Snapshot(InstanceSnapshotCommand),
    /// The tenant's volumes: data disks kept on one host, attached to one
    /// instance at a time (`instance run --volume`), kept when it goes.
    #[command(subcommand)]
    Volume(InstanceVolumeCommand),
}

#[derive(Debug, Subcommand)]
pub enum InstanceVolumeCommand {
    /// Make an empty volume on a host the tenant's policy allows.
    Create {
        name: String,
        /// Size, e.g. 512M or 10G.
        #[arg(long, value_parser = parse_mib)]
        size: u64,
        /// Placement rules for its host: JSON inline or @FILE.
        #[arg(long)]
        placement: Option<String>,
    },
    Ls,
    Inspect {
        name: String,
    },
    /// Remove a volume and its data (refused while attached).
    Rm {
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum InstanceSnapshotCommand {
    /// Take a snapshot of an instance (kept on its host).
    Create {
        instance: String,
        name: String,
    },
    Ls,
    Inspect {
        name: String,
    },
    /// Remove a snapshot (refused while an instance started from it needs it).
    Rm {
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct InstanceSelectArgs {
    pub names: Vec<String>,
    #[arg(long = "tag", value_parser = parse_key_value)]
    pub tags: Vec<(String, String)>,
    #[arg(long)]
    pub wait: bool,
}

#[derive(Debug, Subcommand)]
pub enum HostsCommand {
    Ls,
    Inspect {
        name: String,
    },
    /// No new instances go to the host.
    Cordon {
        name: String,
    },
    /// Cordon the host and live-migrate every instance off it, each where
    /// its placement policy puts it; the operation reports each outcome.
    Drain {
        name: String,
        #[arg(long)]
        wait: bool,
    },
    Uncordon {
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum OpCommand {
    /// Newest first.
    Ls {
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    Inspect {
        id: String,
    },
}

#[derive(Debug, Args, Clone)]
pub struct AgentArgs {
    /// VM records, disks and images live here.
    #[arg(long, env = "FLOTILLA_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address of the API (HTTPS with the agent's own certificate).
    #[arg(long, default_value = "127.0.0.1:7777")]
    pub listen: SocketAddr,
    /// Serve the API over plain HTTP: only on a trusted network, or behind
    /// a proxy that adds TLS (API tokens and migration keys cross it).
    #[arg(long)]
    pub plain_http: bool,
    /// Accelerator: auto (prove KVM works, else TCG), kvm or tcg.
    #[arg(long, default_value = "auto", env = "FLOTILLA_ACCEL")]
    pub accel: String,
    /// Where `--accel auto` remembers its KVM probe's decision until the
    /// host reboots (later starts skip the probe; delete the file to probe
    /// again); `none` probes at every start.
    #[arg(long, default_value = flotilla_qemu::DEFAULT_PROBE_CACHE, env = "FLOTILLA_ACCEL_PROBE_CACHE")]
    pub accel_probe_cache: String,
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// Host bridge for VM NICs.
    #[arg(long, default_value = "flbr0")]
    pub bridge: String,
    /// VM subnet; the bridge takes its first address.
    #[arg(long, default_value = "10.77.0.0/24")]
    pub subnet: String,
    /// vCPUs VMs may hold in all (default: 16 per host CPU).
    #[arg(long)]
    pub capacity_vcpus: Option<u32>,
    /// Memory VMs may hold in all, e.g. 8G (default: host memory less 1 GiB).
    #[arg(long, value_parser = parse_mib)]
    pub capacity_memory: Option<u64>,
    /// Disk space VMs may take in all, e.g. 200G, reported to a control
    /// plane for placement (default: the data directory's file system size).
    #[arg(long, value_parser = parse_mib)]
    pub capacity_disk: Option<u64>,
    /// Seconds a start waits for the guest agent when asked to wait.
    #[arg(long, default_value_t = 120)]
    pub ready_timeout: u64,
    /// A control plane to register with and heartbeat to, e.g. http://10.0.0.1:7700.
    #[arg(long, env = "FLOTILLA_CONTROL_PLANE")]
    pub control_plane: Option<String>,
    /// An admin token of that control plane.
    #[arg(long, env = "FLOTILLA_CONTROL_TOKEN", requires = "control_plane")]
    pub control_token: Option<String>,
    /// This host's name in the control plane's registry, [a-z0-9-] (default:
    /// the hostname, lowercased, other characters made '-').
    #[arg(long, requires = "control_plane")]
    pub host_name: Option<String>,
    /// The URL the control plane reaches this agent at (default:
    /// https://<listen>, or http:// with --plain-http).
    #[arg(long, requires = "control_plane")]
    pub advertise: Option<String>,
    /// A placement label of this host, KEY=VALUE (repeat for more).
    #[arg(long = "label", value_parser = parse_key_value, requires = "control_plane")]
    pub labels: Vec<(String, String)>,
    /// A placement trait of this host, e.g. gpu (repeat for more); the
    /// agent adds those it finds (kvm or tcg, cpu-avx2, network-isolation).
    #[arg(long = "trait", value_parser = parse_trait, requires = "control_plane")]
    pub traits: Vec<String>,
    /// Seconds between heartbeats.
    #[arg(long, default_value_t = 3, requires = "control_plane")]
    pub heartbeat_interval: u64,
    /// The address other hosts reach this one at for live migration
    /// (default: the --listen address, unless that is 0.0.0.0).
    #[arg(long)]
    pub migration_address: Option<std::net::IpAddr>,
    /// Live migrations this host takes part in at once (as source or
    /// target); more wait for a slot.
    #[arg(long, default_value_t = 2)]
    pub max_migrations: usize,
    /// Seconds this host keeps forwarding a VM's address to the host it
    /// moved to (until routes and neighbours elsewhere have caught up).
    #[arg(long, default_value_t = 120)]
    pub forward_moved_secs: u64,
    /// How resumes and starts from snapshots bring back guest memory:
    /// `load` (read it all before the VM runs: fastest) or `map` (map the
    /// snapshot's image copy-on-write: VMs from one snapshot share the pages
    /// they only read, about a third of the private memory per VM, slower
    /// suspends).
    #[arg(long, default_value = "load", value_parser = ["load", "map"])]
    pub restore_memory: String,
    /// Warm suspends kept at once: each keeps a QEMU without guest memory
    /// (about 17 MiB private) waiting for its VM; beyond this many, the
    /// oldest goes and that VM's resume starts QEMU again. 0: none.
    #[arg(long, default_value_t = flotilla_agent::manager::DEFAULT_MAX_STANDBYS)]
    pub max_warm: usize,
    /// Whether guest memory may take transparent huge pages: `auto` (yes,
    /// except for a QEMU receiving a live migration under TCG, until the
    /// VM's next start or resume: there each page that arrives made the
    /// kernel zero 2 MiB, and the loader fell behind, lengthening the
    /// pause), `on` or `off` (sparse guests hold less memory; saves and
    /// outgoing migrations are slower).
    #[arg(long, default_value = "auto", value_parser = ["auto", "on", "off"])]
    pub guest_huge_pages: String,
}

#[derive(Debug, Args)]
pub struct ControlArgs {
    /// Address of the control plane's HTTP API.
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub listen: SocketAddr,
    /// Where the SQLite store and the first admin token live.
    #[arg(
        long,
        env = "FLOTILLA_CONTROL_DIR",
        default_value = "/var/lib/flotilla-control"
    )]
    pub data_dir: PathBuf,
    /// The state store: sqlite://PATH (default: control.db in the data
    /// directory) or postgres://USER:PASSWORD@HOST/DB for several replicas.
    #[arg(long, env = "FLOTILLA_DATABASE_URL")]
    pub database: Option<String>,
    /// An admin token to accept (created if missing); otherwise the first
    /// start writes a new one to <data-dir>/admin.token.
    #[arg(long, env = "FLOTILLA_ADMIN_TOKEN")]
    pub admin_token: Option<String>,
    /// Seconds without a heartbeat before a host is marked down.
    #[arg(long, default_value_t = 15)]
    pub host_down_after: u64,
    /// Seconds a replica holds an operation without renewing it; another
    /// replica takes it over after that.
    #[arg(long, default_value_t = 20)]
    pub lease_seconds: u64,
    /// Seconds before a snapshot left `creating` (its host did not answer)
    /// is settled with its host: ready if the host has it, gone if not.
    #[arg(long, default_value_t = 300)]
    pub snapshot_settle_secs: u64,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub agent: AgentArgs,
    /// Leave VMs running on exit (the next `up` re-adopts them).
    #[arg(long)]
    pub keep_vms: bool,
    /// The static guest agent binary to put in the image (when building it).
    #[arg(long, env = "FLOTILLA_GUEST_AGENT")]
    pub guest_agent: Option<PathBuf>,
    /// Address of the in-process control plane (state in <data-dir>/control).
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub control_listen: SocketAddr,
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// List images.
    Ls,
    /// Build the default image (kernel from linux-source, busybox, guest agent),
    /// cached by its inputs, and register it on the local data directory.
    Build(ImageBuildArgs),
    /// Register your own kernel (and initramfs / root disk) as a named image.
    Register(ImageRegisterArgs),
    /// Remove an image no VM uses.
    Rm { name: String },
    /// Make the image's base snapshot for a VM shape now (booted once to
    /// ready and captured), rather than on the first `vm run --from-snapshot`.
    BaseSnapshot {
        name: String,
        /// Memory, e.g. 256M or 1G.
        #[arg(long, value_parser = parse_mib)]
        memory: Option<u64>,
        #[arg(long)]
        vcpus: Option<u32>,
        #[arg(long)]
        nics: Option<u32>,
    },
}

#[derive(Debug, Args)]
pub struct ImageBuildArgs {
    #[arg(long, env = "FLOTILLA_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    #[arg(long, env = "FLOTILLA_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    #[arg(long, env = "FLOTILLA_GUEST_AGENT")]
    pub guest_agent: Option<PathBuf>,
    /// Parallel jobs for the kernel build (default: CPUs).
    #[arg(long)]
    pub jobs: Option<usize>,
    /// Only fill the cache; do not register the image.
    #[arg(long)]
    pub cache_only: bool,
}

#[derive(Debug, Args)]
pub struct ImageRegisterArgs {
    pub name: String,
    #[arg(long)]
    pub kernel: PathBuf,
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    #[arg(long)]
    pub rootfs: Option<PathBuf>,
    /// Replace an image of the same name.
    #[arg(long)]
    pub replace: bool,
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Create and start a VM.
    Run(VmRunArgs),
    /// List VMs.
    Ls,
    /// Show one VM in full.
    Inspect { name: String },
    /// Run a command in a VM: `flotilla vm exec NAME -- CMD ARGS...`.
    /// Exits with the command's exit code.
    Exec(VmExecArgs),
    /// Print a VM's serial console.
    Logs {
        name: String,
        /// Only the last N bytes.
        #[arg(long)]
        tail: Option<u64>,
        /// Keep printing new output.
        #[arg(long, short)]
        follow: bool,
    },
    /// Stop a VM: the guest shuts down, QEMU is killed after --timeout.
    Stop {
        name: String,
        /// Kill QEMU at once.
        #[arg(long)]
        force: bool,
        /// Seconds to wait for a graceful shutdown.
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Start a stopped VM.
    Start {
        name: String,
        /// Return once the guest agent is ready.
        #[arg(long)]
        wait: bool,
    },
    /// Live-migrate a running VM to another host's agent: memory pre-copied
    /// while it runs, a short pause, then its disks copied from here while
    /// it already runs there.
    Migrate {
        name: String,
        /// The target host's agent, e.g. https://10.0.0.6:7777.
        #[arg(long)]
        to: String,
        /// The target agent's API token (its data directory's agent.token).
        #[arg(long, env = "FLOTILLA_TARGET_TOKEN", hide_env_values = true)]
        to_token: Option<String>,
        /// SHA-256 of the target agent's TLS certificate (`flotilla host`
        /// on the target shows it).
        #[arg(long, env = "FLOTILLA_TARGET_FINGERPRINT")]
        to_fingerprint: Option<String>,
        #[command(flatten)]
        options: MigrationFlags,
        /// Return at once instead of following the migration to its end.
        #[arg(long)]
        no_wait: bool,
    },
    /// Suspend a running VM: its memory and root disk go into a snapshot
    /// layer (only what changed since its last one) and its QEMU ends.
    Suspend {
        name: String,
        /// Then keep a QEMU waiting for the resume (a process without guest
        /// memory): the resume skips QEMU's start.
        #[arg(long)]
        warm: bool,
    },
    /// Bring a suspended VM back exactly where it was.
    Resume {
        name: String,
        /// Return once the guest agent answers.
        #[arg(long)]
        wait: bool,
    },
    /// Clone a VM: a new VM from a snapshot of SOURCE (paused only for
    /// the capture when it runs), with its own MAC, IP, hostname,
    /// machine-id and RNG state.
    Clone {
        source: String,
        name: String,
        /// Root disk: `cow` (its own copy-on-write volume) or `read-only`
        /// (attached read-only to the source's volume as it was).
        #[arg(long, default_value = "cow", value_parser = parse_clone_disk)]
        disk: flotilla_api::CloneDisk,
        /// KEY=VALUE (repeatable); the source's tags when none are given.
        #[arg(long = "tag", value_parser = parse_key_value)]
        tags: Vec<(String, String)>,
    },
    /// Move a VM's root disk into a volume of its own (live while it
    /// runs): afterwards it depends on no snapshot or image.
    MoveDisk {
        name: String,
        /// Volume name (a directory in the agent's data dir).
        #[arg(long)]
        volume: Option<String>,
    },
    /// Remove a stopped VM and its disks.
    Rm {
        name: String,
        /// Stop it first if it runs.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Snapshot a VM under a name: a running VM is paused only for the
    /// capture and runs on; a suspended VM's snapshot gets the name.
    Create { vm: String, name: String },
    /// List snapshot layers (named ones, suspended VMs', image bases).
    Ls,
    /// Show one snapshot, by name or layer id.
    Inspect { name: String },
    /// Remove a snapshot; refused while a VM or later snapshot depends on it.
    Rm { name: String },
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Make an empty volume.
    Create {
        name: String,
        /// Size, e.g. 512M or 10G.
        #[arg(long, value_parser = parse_mib)]
        size: u64,
    },
    /// List the host's volumes and the VMs they are attached to.
    Ls,
    /// Show one volume.
    Inspect { name: String },
    /// Remove a volume and its data; refused while a VM has it attached.
    Rm { name: String },
}

#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// Suspend the selected VMs; one that fails keeps running.
    Suspend {
        #[command(flatten)]
        fleet: FleetArgs,
        /// Then keep a QEMU waiting for each VM's resume (see `vm suspend`).
        #[arg(long)]
        warm: bool,
    },
    /// Resume the selected VMs.
    Resume(FleetArgs),
}

#[derive(Debug, Args)]
pub struct FleetArgs {
    /// VMs by name.
    pub names: Vec<String>,
    /// VMs with this tag, KEY=VALUE.
    #[arg(long)]
    pub tag: Option<String>,
    /// How many VMs at once.
    #[arg(long, default_value_t = 4)]
    pub parallel: u32,
}

#[derive(Debug, Args)]
pub struct VmRunArgs {
    pub name: String,
    #[arg(long)]
    pub image: Option<String>,
    /// Memory, e.g. 256M or 1G.
    #[arg(long, value_parser = parse_mib)]
    pub memory: Option<u64>,
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Extra empty disk NAME:SIZE (repeatable), e.g. data:1G.
    #[arg(long = "disk", value_parser = parse_disk)]
    pub disks: Vec<(String, u64)>,
    /// Attach the host's volume VOLUME as disk DISK (default: named as the
    /// volume), repeatable: VOLUME[:DISK]. It stays when the VM goes.
    #[arg(long = "volume", value_parser = parse_volume)]
    pub volumes: Vec<(String, String)>,
    /// Number of NICs on the host bridge.
    #[arg(long)]
    pub nics: Option<u32>,
    /// The first NIC's address, in the host's VM subnet (default: the next
    /// free one).
    #[arg(long)]
    pub ip: Option<std::net::Ipv4Addr>,
    /// Extra kernel command line.
    #[arg(long)]
    pub cmdline: Option<String>,
    /// KEY=VALUE (repeatable).
    #[arg(long = "tag", value_parser = parse_key_value)]
    pub tags: Vec<(String, String)>,
    /// Return once the guest agent is ready.
    #[arg(long)]
    pub wait: bool,
    /// Create only; start later with `flotilla vm start`.
    #[arg(long)]
    pub no_start: bool,
    /// Start from a snapshot instead of booting: the image's base snapshot
    /// (made on first use for this image and shape) when no NAME is given.
    #[arg(long, value_name = "NAME", num_args = 0..=1, default_missing_value = "base")]
    pub from_snapshot: Option<String>,
}

fn parse_volume(s: &str) -> Result<(String, String), String> {
    match s.split_once(':') {
        Some((volume, disk)) if !volume.is_empty() && !disk.is_empty() => {
            Ok((volume.to_string(), disk.to_string()))
        }
        Some(_) => Err(format!("{s:?} is not a volume: use VOLUME or VOLUME:DISK")),
        // The disk is named as the volume, if that can name a disk.
        None if s.len() <= 16 && s != "root" => Ok((s.to_string(), s.to_string())),
        None => Err(format!(
            "volume {s:?} cannot name its disk (at most 16 characters, not \"root\"): use VOLUME:DISK"
        )),
    }
}

fn parse_clone_disk(s: &str) -> Result<flotilla_api::CloneDisk, String> {
    match s {
        "cow" => Ok(flotilla_api::CloneDisk::Cow),
        "read-only" | "readonly" => Ok(flotilla_api::CloneDisk::ReadOnly),
        _ => Err(format!("{s:?} is not a disk mode: use cow or read-only")),
    }
}

#[derive(Debug, Args)]
pub struct VmExecArgs {
    pub name: String,
    /// KEY=VALUE (repeatable).
    #[arg(long = "env", short = 'e', value_parser = parse_key_value)]
    pub env: Vec<(String, String)>,
    #[arg(long)]
    pub cwd: Option<String>,
    /// Seconds before the command is killed.
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Send this process's standard input to the command.
    #[arg(long, short = 'i')]
    pub stdin: bool,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// How a live migration goes (`vm migrate`, `instance migrate`).
#[derive(Debug, Args)]
pub struct MigrationFlags {
    /// The longest pause to plan for at the switch-over (30 ms by default).
    #[arg(long)]
    pub max_downtime_ms: Option<u64>,
    /// Bandwidth limit of the memory stream in MiB/s (post-copy included);
    /// none by default.
    #[arg(long)]
    pub bandwidth: Option<u64>,
    /// Bandwidth limit of the disk copy after the switch-over, in MiB/s.
    #[arg(long)]
    pub disk_bandwidth: Option<u64>,
    /// When the memory copy is predicted not to converge: throttle the
    /// guest until it does (auto-converge), switch to post-copy (the VM
    /// runs on the target at once and fetches the pages it lacks), or
    /// cancel.
    #[arg(long, default_value = "auto-converge", value_parser = ["auto-converge", "post-copy", "cancel"])]
    pub on_no_convergence: String,
    /// Short for --on-no-convergence post-copy.
    #[arg(long, conflicts_with = "on_no_convergence")]
    pub post_copy: bool,
    /// Send memory and disks unencrypted: only on a trusted migration
    /// network (TLS with a key made per migration is the default).
    #[arg(long)]
    pub no_tls: bool,
}

impl MigrationFlags {
    pub fn options(&self) -> flotilla_api::migration::MigrationOptions {
        use flotilla_api::migration::ConvergencePolicy;
        flotilla_api::migration::MigrationOptions {
            max_downtime_ms: self.max_downtime_ms,
            max_bandwidth_mibps: self.bandwidth,
            disk_sync_mibps: self.disk_bandwidth,
            on_no_convergence: match self.on_no_convergence.as_str() {
                _ if self.post_copy => ConvergencePolicy::PostCopy,
                "post-copy" => ConvergencePolicy::PostCopy,
                "cancel" => ConvergencePolicy::Cancel,
                _ => ConvergencePolicy::AutoConverge,
            },
            tls: !self.no_tls,
        }
    }
}
