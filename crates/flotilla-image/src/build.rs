//! `build_default`: the built-in guest image (kernel, initramfs, root disk),
//! built once and then served from the cache in well under a second.

use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::cache::{self, DirLock, KeyHasher};
use crate::error::{ImageError, IoContext};
use crate::kernel;
use crate::progress::Progress;
use crate::rootfs::{self, DEFAULT_BUSYBOX, GUEST_INIT};
use crate::store::RegisterImage;
use crate::validate::validate_guest_agent;

/// Bump when the rootfs recipe changes in a way the inputs do not show.
pub const IMAGE_BUILDER_VERSION: u32 = 2;

/// Default size of the root disk's ext4 filesystem.
pub const DEFAULT_ROOTFS_SIZE_MIB: u64 = 512;

/// File names inside an image cache entry.
const INITRD_NAME: &str = "initrd.cpio";
const ROOTFS_NAME: &str = "rootfs.qcow2";
const MANIFEST_NAME: &str = "build.json";

/// What to build and how.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// Cache root; see [`crate::default_cache_dir`].
    pub cache_dir: PathBuf,
    /// The guest agent: a static x86-64 binary, installed as
    /// `/sbin/flotilla-guest-agent`.
    pub guest_agent: PathBuf,
    /// Draw spinners on the terminal (else log with `tracing`).
    pub progress: bool,
    /// Parallel jobs for the kernel build (`make -jN`); 0 means one per CPU.
    pub jobs: usize,
    /// Size of the root disk's filesystem.
    pub rootfs_size_mib: u64,
}

impl BuildOptions {
    /// Defaults: the default cache dir, no spinners, one job per CPU, a
    /// 512 MiB root disk.
    pub fn new(guest_agent: impl Into<PathBuf>) -> Self {
        BuildOptions {
            cache_dir: cache::default_cache_dir(),
            guest_agent: guest_agent.into(),
            progress: false,
            jobs: default_jobs(),
            rootfs_size_mib: DEFAULT_ROOTFS_SIZE_MIB,
        }
    }
}

impl Default for BuildOptions {
    /// [`BuildOptions::new`] without a guest agent: set `guest_agent` before
    /// building.
    fn default() -> Self {
        BuildOptions::new(PathBuf::new())
    }
}

/// The number of CPUs available to this process.
pub fn default_jobs() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The artifacts of [`build_default`], all inside the cache (treat as
/// read-only: VMs use `rootfs` as a qcow2 backing file).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BuiltImage {
    /// PVH ELF `vmlinux`.
    pub kernel: PathBuf,
    /// Uncompressed newc cpio.
    pub initrd: PathBuf,
    /// qcow2 base disk with an ext4 filesystem (same tree as the initrd).
    pub rootfs: PathBuf,
    /// Cache key of this image (covers the kernel key too).
    pub key: String,
    /// Cache key of the kernel alone.
    pub kernel_key: String,
}

impl BuiltImage {
    /// A request registering these artifacts in an [`crate::ImageStore`] as
    /// a built-in image, replacing an older build of the same name.
    pub fn register_request(&self, name: &str) -> RegisterImage {
        RegisterImage {
            name: name.to_string(),
            kernel: self.kernel.clone(),
            initrd: Some(self.initrd.clone()),
            rootfs: Some(self.rootfs.clone()),
            builtin: true,
            replace: true,
        }
    }
}

/// Recorded next to the artifacts: what went into them.
#[derive(Serialize)]
struct Manifest<'a> {
    key: &'a str,
    kernel_key: &'a str,
    builder_version: u32,
    guest_agent_sha256: &'a str,
    busybox_sha256: &'a str,
    rootfs_size_mib: u64,
}

/// Host files the image is made from.
#[derive(Clone, Debug)]
pub(crate) struct Inputs {
    /// Kernel source tarball.
    pub(crate) linux_source: PathBuf,
    /// Static busybox binary.
    pub(crate) busybox: PathBuf,
}

impl Inputs {
    /// Debian's packages, unless `$FLOTILLA_LINUX_SOURCE` / `$FLOTILLA_BUSYBOX`
    /// point elsewhere.
    pub(crate) fn from_env() -> Self {
        Inputs {
            linux_source: kernel::linux_source(),
            busybox: busybox_path(),
        }
    }
}

/// Builds (or finds in the cache) the default guest image. Blocking; the
/// first run builds a kernel (minutes), later runs take well under a second.
///
/// Inputs: Debian's `linux-source-6.1` tarball and `busybox-static` binary
/// (override with `$FLOTILLA_LINUX_SOURCE` and `$FLOTILLA_BUSYBOX`).
pub fn build_default(opts: &BuildOptions) -> Result<BuiltImage, ImageError> {
    build_with(opts, &Inputs::from_env())
}

pub(crate) fn build_with(opts: &BuildOptions, inputs: &Inputs) -> Result<BuiltImage, ImageError> {
    let progress = Progress::new(opts.progress);
    let jobs = if opts.jobs == 0 {
        default_jobs()
    } else {
        opts.jobs
    };
    // Cheap checks first: do not spend minutes on a kernel for a bad agent.
    validate_guest_agent(&opts.guest_agent)?;
    if opts.rootfs_size_mib < 16 {
        return Err(ImageError::BadOutput {
            path: opts.cache_dir.clone(),
            reason: format!(
                "rootfs_size_mib {} is too small (minimum 16)",
                opts.rootfs_size_mib
            ),
        });
    }
    let busybox = &inputs.busybox;
    let kernel = kernel::ensure_kernel(&opts.cache_dir, &inputs.linux_source, jobs, progress)?;

    let agent_hash = cache::sha256_file(&opts.guest_agent)?;
    let busybox_hash = cache::sha256_file(busybox)?;
    let mut h = KeyHasher::new("flotilla-image");
    h.part("builder", &IMAGE_BUILDER_VERSION.to_le_bytes())
        .part("kernel", kernel.key.as_bytes())
        .part("agent", agent_hash.as_bytes())
        .part("init", GUEST_INIT.as_bytes())
        .part("busybox", busybox_hash.as_bytes())
        .part("size", &opts.rootfs_size_mib.to_le_bytes());
    let key = h.finish();

    let area = opts.cache_dir.join("images");
    let entry = area.join(&key);
    let built = BuiltImage {
        kernel: kernel.vmlinux,
        initrd: entry.join(INITRD_NAME),
        rootfs: entry.join(ROOTFS_NAME),
        key: key.clone(),
        kernel_key: kernel.key.clone(),
    };
    if is_complete(&entry) {
        return Ok(built);
    }
    let _lock = DirLock::acquire(&area)?;
    if is_complete(&entry) {
        return Ok(built);
    }
    cache::remove_stale_temps(&area);
    if entry.exists() {
        fs::remove_dir_all(&entry).ctx("remove broken cache entry", &entry)?;
    }
    let work = cache::temp_dir_in(&area)?;
    let tree = work.path().join("tree");
    let out = work.path().join("out");
    fs::create_dir(&tree).ctx("create directory", &tree)?;
    fs::create_dir(&out).ctx("create directory", &out)?;

    let step = progress.step("rootfs: assembling tree");
    rootfs::assemble_tree(&tree, busybox, &opts.guest_agent)?;
    step.done();

    let step = progress.step("rootfs: writing initrd");
    rootfs::write_initrd(&tree, &out.join(INITRD_NAME))?;
    step.done();

    let step = progress.step("rootfs: creating ext4 qcow2 disk");
    rootfs::write_disk(
        &tree,
        opts.rootfs_size_mib,
        &uuid_from_key(&key),
        &out.join(ROOTFS_NAME),
    )?;
    step.done();

    let manifest = Manifest {
        key: &key,
        kernel_key: &kernel.key,
        builder_version: IMAGE_BUILDER_VERSION,
        guest_agent_sha256: &agent_hash,
        busybox_sha256: &busybox_hash,
        rootfs_size_mib: opts.rootfs_size_mib,
    };
    let manifest_path = out.join(MANIFEST_NAME);
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| ImageError::BadOutput {
        path: manifest_path.clone(),
        reason: e.to_string(),
    })?;
    fs::write(&manifest_path, json).ctx("write", &manifest_path)?;
    // The entry appears whole, by one rename, or not at all.
    cache::publish_dir(&out, &entry)?;
    Ok(built)
}

/// The busybox binary to install: `$FLOTILLA_BUSYBOX` or Debian's
/// busybox-static.
fn busybox_path() -> PathBuf {
    std::env::var_os("FLOTILLA_BUSYBOX")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_BUSYBOX))
}

fn is_complete(entry: &Path) -> bool {
    [INITRD_NAME, ROOTFS_NAME, MANIFEST_NAME]
        .iter()
        .all(|f| entry.join(f).is_file())
}

/// A filesystem UUID derived from the image key, so a rebuild of the same
/// inputs gives the same filesystem identity.
fn uuid_from_key(key: &str) -> String {
    let k: String = key.chars().chain(std::iter::repeat('0')).take(32).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &k[..8],
        &k[8..12],
        &k[12..16],
        &k[16..20],
        &k[20..32]
    )
}

#[cfg(test)]
#[path = "build_tests.rs"]
mod tests;
