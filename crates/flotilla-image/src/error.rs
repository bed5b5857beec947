//! The crate's one error type, [`ImageError`].
//!
//! Every variant carries enough context to act on without a debugger: the path
//! involved, or the external command with its exit status and the tail of its
//! stderr.

use std::io;
use std::path::PathBuf;

/// Anything that can go wrong while building, validating or storing images.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A filesystem operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What we were doing ("read", "create directory", ...).
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// An external tool could not be started at all (usually: not installed).
    #[error("cannot run `{command}`: {source} (is it installed? scripts/install-deps installs the host tools)")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },

    /// An external tool ran and failed.
    #[error("`{command}` failed ({status}); last lines of its output:\n{stderr_tail}")]
    Command {
        command: String,
        status: String,
        stderr_tail: String,
    },

    /// The file is not a kernel QEMU can boot directly.
    #[error(
        "{}: not a bootable kernel: {reason}. Accepted: an uncompressed x86-64 ELF vmlinux \
         with a PVH entry point (Xen ELF note type 18, from CONFIG_PVH=y), or a bzImage \
         (\"HdrS\" boot header at offset 0x202)",
        path.display()
    )]
    NotAKernel { path: PathBuf, reason: String },

    /// The file is not an initramfs the guest kernel can unpack.
    #[error(
        "{}: not an initrd: {reason}. Accepted: a gzip-compressed or uncompressed newc cpio archive",
        path.display()
    )]
    NotAnInitrd { path: PathBuf, reason: String },

    /// The file is not a usable root disk image.
    #[error("{}: not a usable root disk: {reason}. Accepted: qcow2 (without a backing file) or raw", path.display())]
    InvalidDisk { path: PathBuf, reason: String },

    /// The guest agent binary cannot run inside the minimal guest.
    #[error("{}: unusable guest agent: {reason}", path.display())]
    InvalidAgent { path: PathBuf, reason: String },

    /// An image name outside `[a-z0-9][a-z0-9._-]{0,62}`.
    #[error("invalid image name {name:?}: {reason} (names match [a-z0-9][a-z0-9._-]{{0,62}})")]
    InvalidName { name: String, reason: String },

    /// No image of that name is registered.
    #[error("no image named {name:?}; available: {}", list_or_none(available))]
    NotFound {
        name: String,
        available: Vec<String>,
    },

    /// An image of that name is already registered and `replace` was not set.
    #[error("an image named {name:?} already exists (register with replace to overwrite it)")]
    AlreadyExists { name: String },

    /// A stored `image.json` could not be parsed.
    #[error("corrupt image metadata {}: {source}", path.display())]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// Requested kernel options that `make olddefconfig` silently dropped.
    #[error(
        "kernel config {}: requested options missing from the final .config \
         (an unmet Kconfig dependency?): {}",
        config.display(),
        missing.join(", ")
    )]
    KernelConfig {
        config: PathBuf,
        missing: Vec<String>,
    },

    /// The output of a build step was not what the step promised.
    #[error("{}: {reason}", path.display())]
    BadOutput { path: PathBuf, reason: String },
}

impl ImageError {
    /// Shorthand for [`ImageError::Io`].
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        ImageError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

fn list_or_none(names: &[String]) -> String {
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    }
}

/// Attaches an operation and a path to an `io::Result`.
pub(crate) trait IoContext<T> {
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T, ImageError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T, ImageError> {
        self.map_err(|e| ImageError::io(op, path, e))
    }
}
