//! Guest images: a kernel, an initramfs and an optional root disk.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ImageInfo {
    pub name: String,
    pub kernel: String,
    pub initrd: Option<String>,
    pub rootfs: Option<String>,
    /// `elf-pvh` or `bzimage`.
    pub kernel_format: String,
    /// Built by Flotilla (true) or registered by a user.
    pub builtin: bool,
    pub created_at: String,
    pub size_bytes: u64,
}

/// Register a user's own kernel (and initramfs / root disk) as a named image.
/// Paths are on the agent's host.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterImageRequest {
    pub name: String,
    pub kernel: String,
    #[serde(default)]
    pub initrd: Option<String>,
    #[serde(default)]
    pub rootfs: Option<String>,
    #[serde(default)]
    pub replace: bool,
}
