//! Giving the guest a new identity after a restore from a snapshot or a clone of a running VM:
//! fresh RNG state, hostname, machine id, MACs and addresses.
//!
//! Every field is checked before anything changes ([`plan`]); then the steps run in a fixed order,
//! RNG first so the clone's random output diverges from its source's before anything else runs.
//! A step that fails ends the request with an error naming it; earlier steps stay applied.
//!
//! This runs on the critical path of a clone, in a guest whose emulator has just been restored
//! with a cold translation cache, where each process started and each fsync costs tens of
//! milliseconds. So the common network case (one IPv4 address per interface) is done with
//! ioctls on a datagram socket ([`readdress_by_ioctl`]), and the files are not synced; anything
//! else runs the `ip` commands of [`ip_commands`], which give the same result.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use flotilla_guest_protocol::{ErrorKind, IdentityRequest};

use crate::log;

/// `_IOW('R', 0x03, int[2])`, in the asm-generic ioctl encoding (x86, Arm, RISC-V); libc lacks it.
const RNDADDENTROPY: u32 = 0x4008_5203;
/// `_IO('R', 0x07)`.
const RNDRESEEDCRNG: u32 = 0x5207;

/// Where busybox keeps `ip` and `arping`; searched in order.
const TOOL_DIRS: [&str; 4] = ["/sbin", "/bin", "/usr/sbin", "/usr/bin"];

/// How long a background `arping` may run before it is killed.
const ARPING_LIMIT: Duration = Duration::from_secs(3);

/// The kernel's main IPv4 routing table, one route a line.
const ROUTE_TABLE: &str = "/proc/net/route";

/// Per-interface IPv6 settings (`all` plus one directory per interface).
const IPV6_CONF: &str = "/proc/sys/net/ipv6/conf";

/// `IFF_UP` in the width of `ifreq.ifr_flags`.
const IFF_UP: libc::c_short = libc::IFF_UP as libc::c_short;

/// One identity change at a time: two interleaved ones would leave a mix of both.
static APPLYING: Mutex<()> = Mutex::new(());

/// Failures of an identity change.
#[derive(Debug, thiserror::Error)]
pub(crate) enum IdentityError {
    /// A field failed validation; nothing was changed.
    #[error("invalid {field}: {reason}")]
    Invalid { field: String, reason: String },
    /// A tool the change needs is not in the guest image; nothing was changed.
    #[error("{0} not found in {dirs}", dirs = TOOL_DIRS.join(", "))]
    ToolMissing(&'static str),
    /// A system call or file write failed.
    #[error("cannot {step}: {source}")]
    Io {
        step: String,
        #[source]
        source: io::Error,
    },
    /// An `ip` command failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
}

impl IdentityError {
    /// The error kind reported to the host.
    pub(crate) fn kind(&self) -> ErrorKind {
        match self {
            Self::Invalid { .. } => ErrorKind::InvalidRequest,
            Self::ToolMissing(_) => ErrorKind::CommandNotFound,
            Self::Io { source, .. } if source.kind() == io::ErrorKind::PermissionDenied => {
                ErrorKind::PermissionDenied
            }
            Self::Io { .. } | Self::Command { .. } => ErrorKind::Internal,
        }
    }
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> IdentityError {
    IdentityError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

fn io_step(step: impl Into<String>) -> impl FnOnce(io::Error) -> IdentityError {
    let step = step.into();
    move |source| IdentityError::Io { step, source }
}

/// Where the change reads and writes; tests point these into a temporary directory.
#[derive(Debug, Clone)]
pub(crate) struct Paths {
    /// Holds `hostname`, `hosts` and `machine-id`.
    pub(crate) etc: PathBuf,
    /// One entry per network interface.
    pub(crate) sys_class_net: PathBuf,
    /// Where the files go when `etc` cannot be written (a read-only root
    /// disk): bind-mounted over the ones in `etc`, as systemd does for
    /// `/etc/machine-id`.
    pub(crate) run: PathBuf,
}

impl Paths {
    pub(crate) fn system() -> Self {
        Self {
            etc: PathBuf::from("/etc"),
            sys_class_net: PathBuf::from("/sys/class/net"),
            run: PathBuf::from("/run/flotilla"),
        }
    }
}

/// An address with its prefix length, e.g. `10.77.0.5/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cidr {
    ip: IpAddr,
    prefix: u8,
}

impl Cidr {
    fn parse(text: &str) -> Result<Self, String> {
        let (ip, prefix) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} lacks a /prefix"))?;
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| format!("{ip:?} is not an IP address"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = prefix
            .parse::<u8>()
            .ok()
            .filter(|&p| p <= max && !prefix.starts_with('+'))
            .ok_or_else(|| format!("prefix {prefix:?} is not 0..={max}"))?;
        if ip.is_unspecified() || ip.is_multicast() {
            return Err(format!("{ip} cannot be an interface address"));
        }
        Ok(Self { ip, prefix })
    }

    fn contains(&self, other: IpAddr) -> bool {
        let bits = u32::from(self.prefix);
        match (self.ip, other) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::from(netmask(self.prefix));
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// The IPv4 netmask of a prefix length: 24 is 255.255.255.0; 0 and anything above 32 are the
/// extremes.
fn netmask(prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(
        u32::MAX
            .checked_shl(32 - u32::from(prefix.min(32)))
            .unwrap_or(0),
    )
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.ip, self.prefix)
    }
}

/// One interface's change, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
struct InterfacePlan {
    name: String,
    mac: String,
    addresses: Vec<Cidr>,
    gateway: Option<IpAddr>,
}

/// The checked request: everything [`apply`] needs, nothing left to fail validation.
#[derive(Debug)]
struct Plan<'a> {
    request: &'a IdentityRequest,
    interfaces: Vec<InterfacePlan>,
}

/// Applies `request` to this guest; returns how long it took, in milliseconds.
pub(crate) fn set(request: &IdentityRequest) -> Result<u64, IdentityError> {
    let _one_at_a_time = APPLYING.lock().unwrap_or_else(PoisonError::into_inner);
    let started = Instant::now();
    let paths = Paths::system();
    let plan = plan(request, &paths)?;
    let ip = if plan.interfaces.is_empty() {
        None
    } else {
        Some(find_tool("ip").ok_or(IdentityError::ToolMissing("ip"))?)
    };
    apply(&plan, &paths, ip.as_deref())?;
    let applied_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    log!(
        "identity set: hostname {}, machine id {}, {} interface(s), in {applied_ms} ms",
        request.hostname,
        request.machine_id,
        plan.interfaces.len()
    );
    Ok(applied_ms)
}

/// Checks every field, naming the first bad one.
fn plan<'a>(request: &'a IdentityRequest, paths: &Paths) -> Result<Plan<'a>, IdentityError> {
    check_hostname(&request.hostname).map_err(|reason| invalid("hostname", reason))?;
    check_machine_id(&request.machine_id).map_err(|reason| invalid("machine_id", reason))?;
    let seed = request.rng_seed.len();
    let (min, max) = (
        IdentityRequest::RNG_SEED_MIN_LEN,
        IdentityRequest::RNG_SEED_MAX_LEN,
    );
    if !(min..=max).contains(&seed) {
        return Err(invalid(
            "rng_seed",
            format!("{seed} bytes, expected {min} to {max}"),
        ));
    }
    let mut interfaces: Vec<InterfacePlan> = Vec::new();
    for (at, interface) in request.interfaces.iter().enumerate() {
        let field = |name: &str| format!("interfaces[{at}].{name}");
        let name = &interface.name;
        check_interface_name(name).map_err(|reason| invalid(field("name"), reason))?;
        if interfaces.iter().any(|seen| &seen.name == name) {
            return Err(invalid(field("name"), format!("{name} is listed twice")));
        }
        if !paths.sys_class_net.join(name).exists() {
            return Err(invalid(field("name"), format!("no interface {name}")));
        }
        check_mac(&interface.mac).map_err(|reason| invalid(field("mac"), reason))?;
        let mut addresses: Vec<Cidr> = Vec::new();
        for (n, text) in interface.addresses.iter().enumerate() {
            let cidr =
                Cidr::parse(text).map_err(|r| invalid(field(&format!("addresses[{n}]")), r))?;
            if addresses.iter().any(|seen| seen.ip == cidr.ip) {
                return Err(invalid(
                    field(&format!("addresses[{n}]")),
                    format!("{} is listed twice", cidr.ip),
                ));
            }
            addresses.push(cidr);
        }
        let gateway = interface
            .gateway
            .as_deref()
            .map(|text| check_gateway(text, &addresses))
            .transpose()
            .map_err(|reason| invalid(field("gateway"), reason))?;
        interfaces.push(InterfacePlan {
            name: name.clone(),
            mac: interface.mac.clone(),
            addresses,
            gateway,
        });
    }
    Ok(Plan {
        request,
        interfaces,
    })
}

fn check_hostname(name: &str) -> Result<(), String> {
    let bytes = name.as_bytes();
    let first_ok = bytes
        .first()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let rest_ok = bytes
        .iter()
        .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if first_ok && rest_ok && bytes.len() <= 63 {
        Ok(())
    } else {
        Err(format!("{name:?} does not match [a-z0-9][a-z0-9-]{{0,62}}"))
    }
}

fn check_machine_id(id: &str) -> Result<(), String> {
    let hex = |b: &u8| b.is_ascii_digit() || (b'a'..=b'f').contains(b);
    if id.len() != 32 || !id.as_bytes().iter().all(hex) {
        return Err(format!("{id:?} is not 32 lowercase hex characters"));
    }
    if id.bytes().all(|b| b == b'0') {
        return Err("an all-zero machine id means \"none\"".into());
    }
    Ok(())
}

/// The kernel's rules for a device name (`dev_valid_name`), which also keep it a single path
/// component under `/sys/class/net`; `lo` is refused because flushing it breaks the guest.
fn check_interface_name(name: &str) -> Result<(), String> {
    let bad_char = |c: char| c == '/' || c == ':' || c.is_whitespace() || c.is_control();
    if name.is_empty() || name.len() > 15 || name == "." || name == ".." || name.contains(bad_char)
    {
        return Err(format!("{name:?} is not an interface name"));
    }
    if name == "lo" {
        return Err("the loopback interface cannot be readdressed".into());
    }
    Ok(())
}

/// Six colon-separated hex octets, unicast and not all zero (what the kernel accepts).
fn check_mac(mac: &str) -> Result<(), String> {
    match mac_octets(mac) {
        Some(octets) if octets[0] & 1 != 0 => Err(format!("{mac} is a multicast address")),
        Some(octets) if octets.iter().all(|&b| b == 0) => Err(format!("{mac} is all zero")),
        Some(_) => Ok(()),
        None => Err(format!("{mac:?} is not like 52:54:00:12:34:56")),
    }
}

/// The octets of a MAC written as six colon-separated pairs of hex digits.
fn mac_octets(mac: &str) -> Option<[u8; 6]> {
    let mut parts = mac.split(':');
    let mut octets = [0u8; 6];
    for octet in &mut octets {
        let part = parts.next().filter(|part| part.len() == 2)?;
        *octet = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(octets)
}

/// The gateway must be reachable without another route: inside one of the interface's subnets,
/// or an IPv6 link-local address.
fn check_gateway(text: &str, addresses: &[Cidr]) -> Result<IpAddr, String> {
    let gateway: IpAddr = text
        .parse()
        .map_err(|_| format!("{text:?} is not an IP address"))?;
    if gateway.is_unspecified() || gateway.is_multicast() {
        return Err(format!("{gateway} cannot be a gateway"));
    }
    let link_local = matches!(gateway, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80);
    if link_local || addresses.iter().any(|cidr| cidr.contains(gateway)) {
        Ok(gateway)
    } else {
        Err(format!("{gateway} is in none of the interface's subnets"))
    }
}

/// Looks for a tool in [`TOOL_DIRS`].
fn find_tool(name: &str) -> Option<PathBuf> {
    TOOL_DIRS
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|path| path.is_file())
}

/// Carries out a checked plan, in order.
fn apply(plan: &Plan<'_>, paths: &Paths, ip: Option<&Path>) -> Result<(), IdentityError> {
    let mut clock = StepClock::new();
    reseed_rng(&plan.request.rng_seed)?;
    nix::unistd::sethostname(&plan.request.hostname)
        .map_err(|errno| io_step("set the hostname")(io::Error::from(errno)))?;
    clock.step("rng+hostname");
    let hosts_ip = plan
        .interfaces
        .first()
        .and_then(|interface| interface.addresses.first())
        .map(|cidr| cidr.ip);
    write_files(
        &plan.request.hostname,
        &plan.request.machine_id,
        hosts_ip,
        paths,
    )?;
    clock.step("files");
    readdress_all(plan, ip)?;
    clock.step("network");
    // Announcing the new addresses is best effort and off the reply's path.
    announce_in_background(
        plan.interfaces
            .iter()
            .map(|i| {
                (
                    i.name.to_string(),
                    i.addresses.iter().map(|c| c.ip).collect(),
                )
            })
            .collect(),
    );
    log!("identity steps (ms): {}", clock.report());
    Ok(())
}

/// Gives every planned interface its MAC and addresses.
fn readdress_all(plan: &Plan<'_>, ip: Option<&Path>) -> Result<(), IdentityError> {
    let addresses = if plan.interfaces.is_empty() {
        None
    } else {
        read_addresses()
    };
    let mut socket = None;
    for interface in &plan.interfaces {
        let ip = ip.ok_or(IdentityError::ToolMissing("ip"))?;
        let current = addresses
            .as_deref()
            .map(|all| current_addresses(&interface.name, all));
        match readdress(interface, current.as_ref(), || {
            keeps_ipv6_on_down(&interface.name)
        }) {
            Readdress::Ioctls(change) => {
                let socket = match &mut socket {
                    Some(socket) => socket,
                    empty @ None => empty.insert(inet_socket()?),
                };
                readdress_by_ioctl(socket, &interface.name, &change, ip)?;
            }
            Readdress::Ip => {
                for args in ip_commands(interface) {
                    run_ip(ip, &args)?;
                }
            }
        }
    }
    Ok(())
}

/// Time spent per step, for the log: this runs on a clone's critical path.
struct StepClock {
    last: Instant,
    steps: Vec<(&'static str, u128)>,
}

impl StepClock {
    fn new() -> Self {
        StepClock {
            last: Instant::now(),
            steps: Vec::new(),
        }
    }

    fn step(&mut self, name: &'static str) {
        self.steps.push((name, self.last.elapsed().as_millis()));
        self.last = Instant::now();
    }

    fn report(&self) -> String {
        self.steps
            .iter()
            .map(|(name, ms)| format!("{name} {ms}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Mixes `seed` into the kernel's input pool, crediting all its bits, then reseeds the CRNG
/// from the pool so output diverges from the source VM's at once.
fn reseed_rng(seed: &[u8]) -> Result<(), IdentityError> {
    let urandom = OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(io_step("open /dev/urandom"))?;
    let info = rand_pool_info(seed);
    // SAFETY: `info` is a whole `struct rand_pool_info` whose `buf_size` matches its buffer;
    // the kernel only reads it.
    let added = unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) };
    if added != 0 {
        return Err(io_step("add the seed to the RNG (RNDADDENTROPY)")(
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG as _) } != 0 {
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::ENODATA) {
            return Err(io_step("reseed the RNG (RNDRESEEDCRNG)")(error));
        }
        // Not seeded yet: the seed is in the pool and feeds the first seeding.
        log!("RNG not seeded yet; the new seed will be part of its first seeding");
    }
    Ok(())
}

/// `struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }` as words, so it is
/// aligned; the bytes of `buf` are `seed` in order.
fn rand_pool_info(seed: &[u8]) -> Vec<u32> {
    // The seed length is capped far below these limits by validation.
    let bits = i32::try_from(seed.len() * 8).unwrap_or(i32::MAX);
    let size = i32::try_from(seed.len()).unwrap_or(i32::MAX);
    let mut words = vec![bits as u32, size as u32];
    words.extend(seed.chunks(4).map(|chunk| {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        u32::from_ne_bytes(word)
    }));
    words
}

/// Writes `hostname`, `hosts` and `machine-id` under `paths.etc`, each atomically.
fn write_files(
    hostname: &str,
    machine_id: &str,
    hosts_ip: Option<IpAddr>,
    paths: &Paths,
) -> Result<(), IdentityError> {
    let files = [
        ("hostname", format!("{hostname}\n"), 0o644),
        ("hosts", hosts_text(hostname, hosts_ip), 0o644),
        ("machine-id", format!("{machine_id}\n"), 0o444),
    ];
    for (name, contents, mode) in files {
        let path = paths.etc.join(name);
        if let Err(error) = write_atomic(&path, contents.as_bytes(), mode) {
            crate::log!(
                "cannot write {} ({error}); binding a copy in {} over it",
                path.display(),
                paths.run.display()
            );
            bind_over(&paths.run.join(name), &path, contents.as_bytes(), mode).map_err(io_step(
                format!("write {} (nor bind a copy over it)", path.display()),
            ))?;
        }
    }
    Ok(())
}

/// Writes `contents` to `file` in place (so an earlier bind mount of it
/// sees them) and bind-mounts it over `target` unless that is done already.
fn bind_over(file: &Path, target: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    if let Some(dir) = file.parent() {
        fs::create_dir_all(dir)?;
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(file)?;
    f.write_all(contents)?;
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let target_text = target.to_string_lossy();
    if mounts
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(target_text.as_ref()))
    {
        return Ok(());
    }
    nix::mount::mount(
        Some(file),
        target,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(io::Error::from)
}

/// `/etc/hosts` as guest/init writes it: the hostname resolves to the guest's own address, or
/// to a loopback alias when it has none.
fn hosts_text(hostname: &str, address: Option<IpAddr>) -> String {
    let address = address.map_or_else(|| "127.0.1.1".to_string(), |ip| ip.to_string());
    format!(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{address}\t{hostname}\n"
    )
}

/// Writes a sibling temporary file and renames it over `path`, so readers see the old contents
/// or the new, never a mix. Not synced: guest/init rewrites these files from the kernel command
/// line at every boot, so durability adds nothing, and a sync costs tens of milliseconds here.
fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(name);
    temp_name.push(".flotilla-new");
    let temp = path.with_file_name(temp_name);
    let written = (|| {
        match fs::remove_file(&temp) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
            _ => {}
        }
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&temp)?;
        file.write_all(contents)?;
        drop(file);
        fs::rename(&temp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written
}

/// The `ip` arguments that readdress one interface, in order.
fn ip_commands(interface: &InterfacePlan) -> Vec<Vec<String>> {
    let dev = interface.name.as_str();
    let words = |text: &str| text.split(' ').map(str::to_string).collect::<Vec<_>>();
    let mut commands = vec![
        words(&format!("link set dev {dev} down")),
        words(&format!("link set dev {dev} address {}", interface.mac)),
        words(&format!("addr flush dev {dev}")),
    ];
    for cidr in &interface.addresses {
        commands.push(words(&format!("addr add {cidr} dev {dev}")));
    }
    commands.push(words(&format!("link set dev {dev} up")));
    if let Some(gateway) = interface.gateway {
        let family = if gateway.is_ipv6() { "-6 " } else { "" };
        commands.push(words(&format!(
            "{family}route replace default via {gateway} dev {dev}"
        )));
    }
    commands
}

fn run_ip(ip: &Path, args: &[String]) -> Result<(), IdentityError> {
    let command = format!("ip {}", args.join(" "));
    let output = Command::new(ip)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(io_step(format!("run `{command}`")))?;
    if output.status.success() {
        return Ok(());
    }
    Err(IdentityError::Command {
        command,
        status: output.status.to_string(),
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
    })
}

/// How one interface is readdressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Readdress {
    /// The common case, one IPv4 address: ioctls on a datagram socket, no process started.
    Ioctls(Ipv4Change),
    /// Anything else: the commands of [`ip_commands`].
    Ip,
}

/// Everything [`readdress_by_ioctl`] sets on one interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ipv4Change {
    mac: [u8; 6],
    address: Ipv4Addr,
    prefix: u8,
    gateway: Option<Ipv4Addr>,
}

/// What an interface has now, as far as choosing how to readdress it goes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Current {
    /// IPv4 addresses with their labels: the interface's name, or `eth0:1` for a labelled alias.
    ipv4: Vec<(String, Ipv4Addr)>,
    /// Whether it has an IPv6 address other than a link-local one.
    routable_ipv6: bool,
}

/// Every address of every interface, as (name or label, address); `None` (logged) if they cannot
/// be listed, which sends every interface down the `ip` path.
fn read_addresses() -> Option<Vec<(String, IpAddr)>> {
    match nix::ifaddrs::getifaddrs() {
        Ok(entries) => Some(
            entries
                .filter_map(|entry| {
                    let address = entry.address?;
                    let ip = match (address.as_sockaddr_in(), address.as_sockaddr_in6()) {
                        (Some(v4), _) => IpAddr::V4(v4.ip()),
                        (_, Some(v6)) => IpAddr::V6(v6.ip()),
                        _ => return None,
                    };
                    Some((entry.interface_name, ip))
                })
                .collect(),
        ),
        Err(errno) => {
            log!("cannot list the interfaces' addresses ({errno}); readdressing with `ip`");
            None
        }
    }
}

/// Picks `name`'s addresses out of [`read_addresses`]' list.
fn current_addresses(name: &str, all: &[(String, IpAddr)]) -> Current {
    let mut current = Current::default();
    for (label, ip) in all {
        let ours = label == name
            || label
                .strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(':'));
        if !ours {
            continue;
        }
        match ip {
            IpAddr::V4(v4) => current.ipv4.push((label.clone(), *v4)),
            IpAddr::V6(v6) => current.routable_ipv6 |= v6.segments()[0] & 0xffc0 != 0xfe80,
        }
    }
    current
}

/// Whether the kernel keeps `name`'s IPv6 addresses when it goes down (`keep_addr_on_down`, where
/// a non-zero `all` overrides the interface's own); unreadable counts as keeping.
fn keeps_ipv6_on_down(name: &str) -> bool {
    let read = |dir: &str| -> Option<i32> {
        fs::read_to_string(format!("{IPV6_CONF}/{dir}/keep_addr_on_down"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    keeps_addresses(read("all"), read(name))
}

/// `addrconf_ifdown`'s rule: `all` unless it is 0, then the interface's own; above 0 keeps.
fn keeps_addresses(all: Option<i32>, own: Option<i32>) -> bool {
    match (all, own) {
        (Some(all), _) if all != 0 => all > 0,
        (Some(_), Some(own)) => own > 0,
        _ => true,
    }
}

/// Whether `interface` can be readdressed by ioctls with the same result as [`ip_commands`]:
/// one IPv4 address asked for (and no IPv6 one), an IPv4 gateway or none, and nothing on the
/// interface that only netlink can remove: at most one IPv4 address, labelled with the
/// interface's own name (an ioctl replaces only that one), and no IPv6 address that survives
/// taking the interface down. `current` is `None` when the addresses could not be listed.
fn readdress(
    interface: &InterfacePlan,
    current: Option<&Current>,
    keeps_ipv6: impl FnOnce() -> bool,
) -> Readdress {
    let [Cidr {
        ip: IpAddr::V4(address),
        prefix,
    }] = interface.addresses[..]
    else {
        return Readdress::Ip;
    };
    // Addresses the kernel treats specially (127/8 gets host scope, 0/8 and 255.255.255.255
    // no class) are rare here: left to `ip`.
    if address.is_loopback() || address.is_broadcast() || address.octets()[0] == 0 {
        return Readdress::Ip;
    }
    let gateway = match interface.gateway {
        None => None,
        Some(IpAddr::V4(gateway)) => Some(gateway),
        Some(IpAddr::V6(_)) => return Readdress::Ip,
    };
    let (Some(mac), Some(current)) = (mac_octets(&interface.mac), current) else {
        return Readdress::Ip;
    };
    match &current.ipv4[..] {
        [] => {}
        [(label, _)] if *label == interface.name => {}
        _ => return Readdress::Ip,
    }
    if current.routable_ipv6 && keeps_ipv6() {
        return Readdress::Ip;
    }
    Readdress::Ioctls(Ipv4Change {
        mac,
        address,
        prefix,
        gateway,
    })
}

/// The ioctl equivalent of [`ip_commands`] for one IPv4 address, in the same order: down (which
/// drops the interface's routes and IPv6 addresses, as `ip` does), MAC, address (replacing the
/// only one), netmask, no broadcast address (as `ip addr add` without `brd` leaves it), up (a new
/// IPv6 link-local address from the new MAC), default route. The MAC is set while down rather
/// than live so the link-local address is regenerated, as with `ip`.
///
/// The default route is added only when the main table has none with metric 0, where adding
/// and `ip route replace` are the same; otherwise (another interface's default route, or the
/// table unreadable) `ip` replaces it.
fn readdress_by_ioctl(
    socket: &OwnedFd,
    name: &str,
    change: &Ipv4Change,
    ip: &Path,
) -> Result<(), IdentityError> {
    let step = |what: &str, call: &str| io_step(format!("{what} {name} ({call})"));
    let mut request = ifreq(name);
    // SAFETY: SIOCGIFFLAGS fills `ifr_flags` of the `ifreq` it is given.
    unsafe { ioctl(socket, libc::SIOCGIFFLAGS, &mut request) }
        .map_err(step("read the flags of", "SIOCGIFFLAGS"))?;
    // SAFETY: the kernel has set `ifr_flags` (and any value of a `c_short` is valid).
    let flags = unsafe { request.ifr_ifru.ifru_flags };
    if flags & IFF_UP != 0 {
        let mut request = ifreq_flags(name, flags & !IFF_UP);
        // SAFETY: SIOCSIFFLAGS reads `ifr_name` and `ifr_flags` of the `ifreq` it is given.
        unsafe { ioctl(socket, libc::SIOCSIFFLAGS, &mut request) }
            .map_err(step("take down", "SIOCSIFFLAGS"))?;
    }
    let mut request = ifreq(name);
    request.ifr_ifru.ifru_hwaddr = hardware_address(change.mac);
    // SAFETY: SIOCSIFHWADDR reads `ifr_name` and `ifr_hwaddr` of the `ifreq` it is given.
    unsafe { ioctl(socket, libc::SIOCSIFHWADDR, &mut request) }
        .map_err(step("set the MAC of", "SIOCSIFHWADDR"))?;
    let addresses = [
        (
            libc::SIOCSIFADDR,
            "SIOCSIFADDR",
            change.address,
            "set the address of",
        ),
        (
            libc::SIOCSIFNETMASK,
            "SIOCSIFNETMASK",
            netmask(change.prefix),
            "set the netmask of",
        ),
        (
            libc::SIOCSIFBRDADDR,
            "SIOCSIFBRDADDR",
            Ipv4Addr::UNSPECIFIED,
            "clear the broadcast address of",
        ),
    ];
    for (command, call, address, what) in addresses {
        let mut request = ifreq(name);
        request.ifr_ifru.ifru_addr = inet_address(address);
        // SAFETY: these three read `ifr_name` and an AF_INET `ifr_addr` of the `ifreq` given.
        unsafe { ioctl(socket, command, &mut request) }.map_err(step(what, call))?;
    }
    let mut request = ifreq_flags(name, flags | IFF_UP);
    // SAFETY: SIOCSIFFLAGS reads `ifr_name` and `ifr_flags` of the `ifreq` it is given.
    unsafe { ioctl(socket, libc::SIOCSIFFLAGS, &mut request) }
        .map_err(step("bring up", "SIOCSIFFLAGS"))?;
    let Some(gateway) = change.gateway else {
        return Ok(());
    };
    match fs::read_to_string(ROUTE_TABLE) {
        Ok(routes) if !has_default_route(&routes) => add_default_route(socket, name, gateway)
            .map_err(io_step(format!(
                "add the default route via {gateway} dev {name} (SIOCADDRT)"
            ))),
        _ => run_ip(ip, &route_replace(name, gateway)),
    }
}

/// The `ip` arguments that make `gateway` on `name` the default route.
fn route_replace(name: &str, gateway: Ipv4Addr) -> Vec<String> {
    [
        "route",
        "replace",
        "default",
        "via",
        &gateway.to_string(),
        "dev",
        name,
    ]
    .map(str::to_string)
    .to_vec()
}

/// Whether `/proc/net/route` (`Iface Destination Gateway Flags RefCnt Use Metric Mask ...`, hex
/// addresses) lists a default route with metric 0, the one `ip route replace` would replace;
/// a line it cannot read counts as one.
fn has_default_route(table: &str) -> bool {
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let zero_hex = |at: usize| {
            fields
                .get(at)
                .and_then(|field| u32::from_str_radix(field, 16).ok())
                .map(|value| value == 0)
        };
        let metric = fields.get(6).and_then(|field| field.parse::<u32>().ok());
        match (zero_hex(1), zero_hex(7), metric) {
            (Some(destination), Some(mask), Some(metric)) => destination && mask && metric == 0,
            _ => !line.trim().is_empty(),
        }
    })
}

/// Adds the default route via `gateway` on `name`; one that is already there is fine.
fn add_default_route(socket: &OwnedFd, name: &str, gateway: Ipv4Addr) -> io::Result<()> {
    // The kernel copies IFNAMSIZ - 1 bytes from `rt_dev` whatever the name's length, so it
    // points to a whole NUL-padded name buffer, which lives until this function returns.
    let mut device = interface_name(name);
    let mut route = default_route(gateway);
    route.rt_dev = device.as_mut_ptr();
    // SAFETY: SIOCADDRT reads the `rtentry` it is given and IFNAMSIZ bytes at its `rt_dev`,
    // which points to `device`, alive and unmoved for the call.
    match unsafe { ioctl(socket, libc::SIOCADDRT, &mut route) } {
        Err(error) if error.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        result => result,
    }
}

/// A socket for interface and route ioctls.
fn inet_socket() -> Result<OwnedFd, IdentityError> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|errno| io_step("open a socket for interface ioctls")(io::Error::from(errno)))
}

/// Runs an ioctl whose argument is `arg`.
///
/// # Safety
///
/// `T` must be the structure `request` reads or writes, and any pointers in it must be valid
/// for what the kernel does with them.
unsafe fn ioctl<T>(socket: &OwnedFd, request: libc::c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: `socket` is open, `arg` is a live exclusive reference, and the caller vouches
    // that it is what `request` expects.
    let result = unsafe { libc::ioctl(socket.as_raw_fd(), request as _, std::ptr::from_mut(arg)) };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// An interface name as the kernel takes it: NUL-padded to IFNAMSIZ. Validation has kept it to
/// at most 15 bytes with no NUL, so the last byte stays NUL.
fn interface_name(name: &str) -> [libc::c_char; libc::IFNAMSIZ] {
    let mut buffer = [0; libc::IFNAMSIZ];
    for (slot, byte) in buffer[..libc::IFNAMSIZ - 1].iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    buffer
}

/// A zeroed `ifreq` naming `name`.
fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: `ifreq` is plain data (a name array and a union of integers, arrays, sockaddrs
    // and a raw pointer), for which all-zero bytes are a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    request.ifr_name = interface_name(name);
    request
}

/// An `ifreq` naming `name`, with `flags`.
fn ifreq_flags(name: &str, flags: libc::c_short) -> libc::ifreq {
    let mut request = ifreq(name);
    request.ifr_ifru.ifru_flags = flags;
    request
}

/// `struct sockaddr_in` for `address` (port 0) in a `struct sockaddr`: the port in `sa_data[0..2]`,
/// the address in network order in `sa_data[2..6]`, zeros after.
fn inet_address(address: Ipv4Addr) -> libc::sockaddr {
    let mut data = [0; 14];
    for (slot, byte) in data[2..6].iter_mut().zip(address.octets()) {
        *slot = byte as libc::c_char;
    }
    libc::sockaddr {
        sa_family: libc::AF_INET as libc::sa_family_t,
        sa_data: data,
    }
}

/// An Ethernet hardware address as SIOCSIFHWADDR takes it.
fn hardware_address(mac: [u8; 6]) -> libc::sockaddr {
    let mut data = [0; 14];
    for (slot, byte) in data.iter_mut().zip(mac) {
        *slot = byte as libc::c_char;
    }
    libc::sockaddr {
        sa_family: libc::ARPHRD_ETHER,
        sa_data: data,
    }
}

/// The default route via `gateway` (0.0.0.0/0, up, via a gateway, metric 0), without its device.
fn default_route(gateway: Ipv4Addr) -> libc::rtentry {
    // SAFETY: `rtentry` is plain data (integers, sockaddrs and a raw pointer), for which all-zero
    // bytes are a valid value, with a null `rt_dev`.
    let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
    route.rt_dst = inet_address(Ipv4Addr::UNSPECIFIED);
    route.rt_genmask = inet_address(Ipv4Addr::UNSPECIFIED);
    route.rt_gateway = inet_address(gateway);
    route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    route
}

/// Sends a gratuitous ARP for each new IPv4 address (busybox `arping`, if
/// present) from a thread of its own, killing any that outlive
/// [`ARPING_LIMIT`], so they neither delay the reply nor stay zombies.
fn announce_in_background(interfaces: Vec<(String, Vec<IpAddr>)>) {
    let Some(arping) = find_tool("arping") else {
        return;
    };
    if interfaces
        .iter()
        .all(|(_, ips)| !ips.iter().any(IpAddr::is_ipv4))
    {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("arping".into())
        .spawn(move || {
            let mut children: Vec<Child> = interfaces
                .iter()
                .flat_map(|(name, ips)| {
                    ips.iter()
                        .filter(|ip| ip.is_ipv4())
                        .map(move |ip| (name, ip))
                })
                .filter_map(|(name, ip)| {
                    Command::new(&arping)
                        .args(["-U", "-c", "1", "-I", name, &ip.to_string()])
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .ok()
                })
                .collect();
            let until = Instant::now() + ARPING_LIMIT;
            while !children.is_empty() {
                children.retain_mut(|child| matches!(child.try_wait(), Ok(None)));
                if Instant::now() >= until {
                    for child in &mut children {
                        let _ = child.kill();
                        let _ = child.wait();
                    }
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
    if let Err(error) = spawned {
        log!("cannot start arping: {error}");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly by design.
#[path = "identity_tests.rs"]
mod tests;
