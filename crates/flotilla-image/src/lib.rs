//! Flotilla guest images: building the built-in image and storing
//! user-registered ones.
//!
//! * [`build_default`] builds the default guest: a minimal Linux 6.1
//!   `vmlinux` (tinyconfig + `guest/kernel/flotilla.config`, booted via PVH
//!   under `qemu-system-x86_64 -M microvm,acpi=off`), a busybox initramfs with
//!   Flotilla's `/init` (`guest/init`) and guest agent, and the same tree as
//!   an ext4 qcow2 root disk. Everything is cached under
//!   [`default_cache_dir`], keyed by its inputs; a cached run takes well under
//!   a second, a fresh one a few minutes (the kernel).
//! * [`ImageStore`] keeps named images (`<dir>/<name>/image.json` + files),
//!   with atomic registration and replacement.
//! * [`validate_kernel`] and friends check files before a VM trips on them.
//!
//! # Example
//!
//! ```no_run
//! use flotilla_image::{build_default, BuildOptions, ImageStore, DEFAULT_IMAGE};
//!
//! # fn main() -> Result<(), flotilla_image::ImageError> {
//! let mut opts = BuildOptions::new("target/x86_64-unknown-linux-gnu/release/flotilla-guest-agent");
//! opts.progress = true; // spinners on the terminal
//! let built = build_default(&opts)?;
//! println!("kernel {} initrd {} disk {}", built.kernel.display(),
//!          built.initrd.display(), built.rootfs.display());
//!
//! let store = ImageStore::open(&opts.cache_dir.join("store"))?;
//! let image = store.register(built.register_request(DEFAULT_IMAGE))?;
//! println!("registered {} ({} bytes)", image.name, image.size_bytes);
//! # Ok(())
//! # }
//! ```
//!
//! Host tools used: `tar`, `make` and a C toolchain (kernel),
//! `mkfs.ext4`, `qemu-img`, `cp`, and Debian's `busybox-static` and
//! `linux-source-6.1` packages; `scripts/install-deps` installs them.

// Tests may unwrap: a panic there is the failure report.
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod build;
mod cache;
mod cmd;
mod cpio;
mod error;
mod kernel;
mod progress;
mod rootfs;
mod store;
#[cfg(test)]
mod test_support;
mod validate;

pub use build::{
    build_default, default_jobs, BuildOptions, BuiltImage, DEFAULT_ROOTFS_SIZE_MIB,
    IMAGE_BUILDER_VERSION,
};
pub use cache::default_cache_dir;
pub use error::ImageError;
pub use kernel::{DEFAULT_LINUX_SOURCE, KERNEL_BUILDER_VERSION, KERNEL_CONFIG_FRAGMENT};
pub use rootfs::{DEFAULT_BUSYBOX, GUEST_AGENT_PATH, GUEST_INIT};
pub use store::{validate_name, Image, ImageStore, RegisterImage, DEFAULT_IMAGE};
pub use validate::{
    probe_disk, validate_guest_agent, validate_initrd, validate_kernel, DiskFormat, KernelFormat,
};
