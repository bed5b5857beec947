//! Giving the guest a new identity after a restore from a snapshot or a clone of a running VM:
//! fresh RNG state, hostname, machine id, MACs and addresses.
//!
//! Every field is checked before anything changes ([`plan`]); then the steps run in a fixed order,
//! RNG first so the clone's random output diverges from its source's before anything else runs.
//! A step that fails ends the request with an error naming it; earlier steps stay applied.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::fd::AsRawFd;
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
                let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
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
    let octets: Option<Vec<u8>> = mac
        .split(':')
        .map(|part| {
            (part.len() == 2)
                .then(|| u8::from_str_radix(part, 16).ok())
                .flatten()
        })
        .collect();
    match octets.as_deref() {
        Some(octets @ [first, ..]) if octets.len() == 6 => {
            if first & 1 != 0 {
                Err(format!("{mac} is a multicast address"))
            } else if octets.iter().all(|&b| b == 0) {
                Err(format!("{mac} is all zero"))
            } else {
                Ok(())
            }
        }
        _ => Err(format!("{mac:?} is not like 52:54:00:12:34:56")),
    }
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
    reseed_rng(&plan.request.rng_seed)?;
    nix::unistd::sethostname(&plan.request.hostname)
        .map_err(|errno| io_step("set the hostname")(io::Error::from(errno)))?;
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
    let mut arpings = Vec::new();
    for interface in &plan.interfaces {
        let ip = ip.ok_or(IdentityError::ToolMissing("ip"))?;
        for args in ip_commands(interface) {
            run_ip(ip, &args)?;
        }
        arpings.extend(announce(interface));
    }
    reap_in_background(arpings);
    Ok(())
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

/// Writes a sibling temporary file, syncs it and renames it over `path`, so readers see the old
/// contents or the new, never a mix.
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
        file.sync_all()?;
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

/// Starts a gratuitous ARP for each IPv4 address (if busybox `arping` exists), so neighbours
/// forget the source VM's MAC; best effort.
fn announce(interface: &InterfacePlan) -> Vec<Child> {
    let Some(arping) = find_tool("arping") else {
        return Vec::new();
    };
    interface
        .addresses
        .iter()
        .filter(|cidr| cidr.ip.is_ipv4())
        .filter_map(|cidr| {
            Command::new(&arping)
                .args(["-U", "-c", "1", "-I", &interface.name, &cidr.ip.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .ok()
        })
        .collect()
}

/// Waits for the `arping`s off the request's path (killing any that outlive [`ARPING_LIMIT`]),
/// so they neither delay the reply nor stay zombies.
fn reap_in_background(mut children: Vec<Child>) {
    if children.is_empty() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("arping-reaper".into())
        .spawn(move || {
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
        log!("cannot start the arping reaper: {error}");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly by design.
mod tests {
    use flotilla_guest_protocol::InterfaceIdentity;

    use super::*;

    /// Paths in a temporary directory with interfaces `eth0` and `eth1`.
    fn sandbox() -> (tempfile::TempDir, Paths) {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths {
            etc: dir.path().join("etc"),
            sys_class_net: dir.path().join("net"),
            run: dir.path().join("run"),
        };
        fs::create_dir_all(&paths.etc).unwrap();
        for name in ["lo", "eth0", "eth1"] {
            fs::create_dir_all(paths.sys_class_net.join(name)).unwrap();
        }
        (dir, paths)
    }

    fn request() -> IdentityRequest {
        IdentityRequest {
            hostname: "web-2".into(),
            machine_id: "0123456789abcdef0123456789abcdef".into(),
            interfaces: vec![InterfaceIdentity {
                name: "eth0".into(),
                mac: "52:54:00:12:34:56".into(),
                addresses: vec!["10.77.0.5/24".into(), "fd00::5/64".into()],
                gateway: Some("10.77.0.1".into()),
            }],
            rng_seed: vec![7; 32],
        }
    }

    /// The field a rejection names, or a panic if it was accepted.
    fn rejected(request: &IdentityRequest) -> String {
        let (_dir, paths) = sandbox();
        match plan(request, &paths) {
            Err(IdentityError::Invalid { field, .. }) => field,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn a_good_request_is_planned() {
        let (_dir, paths) = sandbox();
        let request = request();
        let plan = plan(&request, &paths).unwrap();
        assert_eq!(
            plan.interfaces,
            vec![InterfacePlan {
                name: "eth0".into(),
                mac: "52:54:00:12:34:56".into(),
                addresses: vec![
                    Cidr::parse("10.77.0.5/24").unwrap(),
                    Cidr::parse("fd00::5/64").unwrap()
                ],
                gateway: Some("10.77.0.1".parse().unwrap()),
            }]
        );
    }

    #[test]
    fn each_bad_field_is_named() {
        type Edit = fn(&mut IdentityRequest);
        let cases: [(&str, Edit); 22] = [
            ("hostname", |r| r.hostname = String::new()),
            ("hostname", |r| r.hostname = "Web".into()),
            ("hostname", |r| r.hostname = "-web".into()),
            ("hostname", |r| r.hostname = "web.example".into()),
            ("hostname", |r| r.hostname = "a".repeat(64)),
            ("machine_id", |r| {
                r.machine_id = "0123456789ABCDEF0123456789abcdef".into()
            }),
            ("machine_id", |r| r.machine_id = "0123".into()),
            ("machine_id", |r| r.machine_id = "0".repeat(32)),
            ("rng_seed", |r| r.rng_seed = vec![1; 31]),
            ("rng_seed", |r| r.rng_seed = vec![1; 4097]),
            ("interfaces[0].name", |r| {
                r.interfaces[0].name = "eth9".into()
            }),
            ("interfaces[0].name", |r| {
                r.interfaces[0].name = "../eth0".into()
            }),
            ("interfaces[0].name", |r| r.interfaces[0].name = "lo".into()),
            ("interfaces[1].name", |r| {
                r.interfaces.push(r.interfaces[0].clone())
            }),
            ("interfaces[0].mac", |r| {
                r.interfaces[0].mac = "52:54:00:12:34".into()
            }),
            ("interfaces[0].mac", |r| {
                r.interfaces[0].mac = "52-54-00-12-34-56".into()
            }),
            ("interfaces[0].mac", |r| {
                r.interfaces[0].mac = "01:00:5e:00:00:01".into()
            }),
            ("interfaces[0].addresses[0]", |r| {
                r.interfaces[0].addresses[0] = "10.77.0.5".into()
            }),
            ("interfaces[0].addresses[1]", |r| {
                r.interfaces[0].addresses[1] = "10.77.0.6/33".into()
            }),
            ("interfaces[0].addresses[1]", |r| {
                r.interfaces[0].addresses[1] = "10.77.0.5/16".into()
            }),
            ("interfaces[0].gateway", |r| {
                r.interfaces[0].gateway = Some("10.78.0.1".into())
            }),
            ("interfaces[0].gateway", |r| {
                r.interfaces[0].gateway = Some("gateway".into())
            }),
        ];
        for (field, edit) in cases {
            let mut request = request();
            edit(&mut request);
            assert_eq!(rejected(&request), field, "{request:?}");
        }
    }

    #[test]
    fn edge_values_are_accepted() {
        let (_dir, paths) = sandbox();
        let mut request = request();
        request.hostname = format!("0{}", "-".repeat(62));
        request.rng_seed = vec![0; IdentityRequest::RNG_SEED_MAX_LEN];
        request.interfaces[0].mac = "AA:bb:00:00:00:01".into();
        request.interfaces[0].gateway = Some("fe80::1".into());
        request.interfaces.push(InterfaceIdentity {
            name: "eth1".into(),
            mac: "52:54:00:00:00:02".into(),
            addresses: Vec::new(),
            gateway: None,
        });
        assert!(plan(&request, &paths).is_ok());
        request.interfaces[0].gateway = Some("fd00::ffff".into());
        assert!(plan(&request, &paths).is_ok());
    }

    #[test]
    fn subnets_contain_their_addresses_only() {
        let net = Cidr::parse("10.77.0.5/24").unwrap();
        assert!(net.contains("10.77.0.255".parse().unwrap()));
        assert!(!net.contains("10.77.1.1".parse().unwrap()));
        assert!(!net.contains("::1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.1/0")
            .unwrap()
            .contains("192.0.2.1".parse().unwrap()));
        let host = Cidr::parse("10.0.0.1/32").unwrap();
        assert!(host.contains("10.0.0.1".parse().unwrap()));
        assert!(!host.contains("10.0.0.2".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/8").is_err());
        assert!(Cidr::parse("10.0.0.1/+8").is_err());
    }

    #[test]
    fn hosts_text_matches_guest_init() {
        assert_eq!(
            hosts_text("web-2", Some("10.77.0.5".parse().unwrap())),
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n10.77.0.5\tweb-2\n"
        );
        assert!(hosts_text("web-2", None).ends_with("\n127.0.1.1\tweb-2\n"));
    }

    #[test]
    fn files_are_replaced() {
        let (_dir, paths) = sandbox();
        fs::write(paths.etc.join("machine-id"), "old\n").unwrap();
        write_files("web-2", &request().machine_id, None, &paths).unwrap();
        let read = |name: &str| fs::read_to_string(paths.etc.join(name)).unwrap();
        assert_eq!(read("hostname"), "web-2\n");
        assert_eq!(read("machine-id"), "0123456789abcdef0123456789abcdef\n");
        assert!(read("hosts").contains("127.0.1.1\tweb-2\n"));
        // Read-only machine id, and no temporary files left behind.
        let mode = fs::metadata(paths.etc.join("machine-id")).unwrap();
        assert!(mode.permissions().readonly());
        write_files("web-3", &request().machine_id, None, &paths).unwrap();
        let mut names: Vec<_> = fs::read_dir(&paths.etc)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["hostname", "hosts", "machine-id"]);
        assert_eq!(read("hostname"), "web-3\n");
    }

    #[test]
    fn ip_commands_readdress_in_order() {
        let (_dir, paths) = sandbox();
        let mut request = request();
        request.interfaces.push(InterfaceIdentity {
            name: "eth1".into(),
            mac: "52:54:00:00:00:02".into(),
            addresses: vec!["fd00:1::2/64".into()],
            gateway: Some("fe80::1".into()),
        });
        let plan = plan(&request, &paths).unwrap();
        let lines = |at: usize| -> Vec<String> {
            ip_commands(&plan.interfaces[at])
                .iter()
                .map(|args| args.join(" "))
                .collect()
        };
        assert_eq!(
            lines(0),
            [
                "link set dev eth0 down",
                "link set dev eth0 address 52:54:00:12:34:56",
                "addr flush dev eth0",
                "addr add 10.77.0.5/24 dev eth0",
                "addr add fd00::5/64 dev eth0",
                "link set dev eth0 up",
                "route replace default via 10.77.0.1 dev eth0",
            ]
        );
        assert_eq!(
            lines(1).last().unwrap(),
            "-6 route replace default via fe80::1 dev eth1"
        );
    }

    #[test]
    fn pool_info_carries_the_seed_bytes_in_order() {
        let info = rand_pool_info(&[1, 2, 3, 4, 5]);
        assert_eq!(&info[..2], [40, 5]);
        let bytes: Vec<u8> = info[2..].iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(bytes, [1, 2, 3, 4, 5, 0, 0, 0]);
        // _IOW('R', 0x03, int[2]) and _IO('R', 0x07) in the generic encoding.
        let ioc =
            |dir: u32, nr: u32, size: u32| (dir << 30) | (size << 16) | (u32::from(b'R') << 8) | nr;
        assert_eq!(RNDADDENTROPY, ioc(1, 0x03, 8));
        assert_eq!(RNDRESEEDCRNG, ioc(0, 0x07, 0));
    }

    #[test]
    fn errors_map_to_kinds() {
        assert_eq!(invalid("hostname", "x").kind(), ErrorKind::InvalidRequest);
        assert_eq!(
            IdentityError::ToolMissing("ip").kind(),
            ErrorKind::CommandNotFound
        );
        let denied = io_step("x")(io::Error::from_raw_os_error(libc::EPERM));
        assert_eq!(denied.kind(), ErrorKind::PermissionDenied);
    }
}
