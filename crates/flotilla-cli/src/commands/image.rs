//! `flotilla image ...`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use flotilla_api::{ImageInfo, RegisterImageRequest};
use flotilla_image::{BuildOptions, ImageStore, RegisterImage, DEFAULT_IMAGE};

use super::default_data_dir;
use crate::args::ImageCommand;
use crate::client::{CliError, Client};
use crate::output;

pub async fn run(
    agent: &dyn Fn() -> anyhow::Result<Client>,
    json: bool,
    cmd: ImageCommand,
) -> anyhow::Result<ExitCode> {
    match cmd {
        ImageCommand::Ls => {
            let images: Vec<ImageInfo> = agent()?.get("/v1/images").await?;
            if json {
                output::json(&images)?;
            } else {
                let rows = images
                    .iter()
                    .map(|i| {
                        vec![
                            i.name.clone(),
                            i.kernel_format.clone(),
                            if i.rootfs.is_some() { "yes" } else { "no" }.into(),
                            format!("{:.1}", i.size_bytes as f64 / (1024.0 * 1024.0)),
                            if i.builtin { "built" } else { "registered" }.into(),
                            i.created_at.clone(),
                        ]
                    })
                    .collect::<Vec<_>>();
                output::table(
                    &[
                        "NAME",
                        "KERNEL",
                        "ROOT DISK",
                        "SIZE MiB",
                        "SOURCE",
                        "CREATED",
                    ],
                    &rows,
                );
            }
        }
        ImageCommand::Build(a) => {
            let data_dir = a.data_dir.unwrap_or_else(default_data_dir);
            let image = tokio::task::spawn_blocking(move || {
                build_and_register(&data_dir, a.cache_dir, a.guest_agent, a.jobs, a.cache_only)
            })
            .await??;
            if json {
                match image {
                    Some(i) => output::json(&i)?,
                    None => output::json(&serde_json::json!({ "cached": true }))?,
                }
            }
        }
        ImageCommand::Register(a) => {
            let abs = |p: PathBuf| -> anyhow::Result<String> {
                Ok(std::fs::canonicalize(&p)
                    .map_err(|e| CliError::new(format!("{}: {e}", p.display()), None))?
                    .display()
                    .to_string())
            };
            let req = RegisterImageRequest {
                name: a.name,
                kernel: abs(a.kernel)?,
                initrd: a.initrd.map(abs).transpose()?,
                rootfs: a.rootfs.map(abs).transpose()?,
                replace: a.replace,
            };
            let image: ImageInfo = agent()?.post("/v1/images", &req).await?;
            if json {
                output::json(&image)?;
            } else {
                println!("registered image {}", image.name);
            }
        }
        ImageCommand::Rm { name } => {
            agent()?.delete(&format!("/v1/images/{name}")).await?;
            if json {
                output::json(&serde_json::json!({ "removed": name }))?;
            } else {
                println!("removed image {name}");
            }
        }
        ImageCommand::BaseSnapshot {
            name,
            memory,
            vcpus,
            nics,
        } => {
            let req = flotilla_api::BaseSnapshotRequest {
                vcpus,
                memory_mib: memory,
                nics,
            };
            let s: flotilla_api::SnapshotInfo = agent()?
                .post(&format!("/v1/images/{name}/base-snapshot"), &req)
                .await?;
            if json {
                output::json(&s)?;
            } else {
                println!(
                    "base snapshot of {name} ({} vCPUs, {} MiB): layer {}",
                    output::opt(&s.vcpus),
                    output::opt(&s.memory_mib),
                    s.id
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Where the static guest agent is: the flag, else next to this binary, else
/// in the cargo target directory this binary was built in.
fn find_guest_agent(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        if p.is_file() {
            return Ok(p);
        }
        return Err(
            CliError::new(format!("guest agent {} does not exist", p.display()), None).into(),
        );
    }
    let exe = std::env::current_exe().context("locating this program")?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    let mut candidates = vec![dir.join("flotilla-guest-agent")];
    // target/{debug,release}/flotilla -> target/x86_64-unknown-linux-gnu/release/
    if let Some(target) = dir.parent() {
        candidates.push(target.join("x86_64-unknown-linux-gnu/release/flotilla-guest-agent"));
    }
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        CliError::new(
            "the static guest agent binary was not found",
            Some("build it with scripts/build-guest-agent, or pass --guest-agent PATH".into()),
        )
        .into()
    })
}

/// Builds the default image (cached) and registers it as `default`.
pub fn build_and_register(
    data_dir: &Path,
    cache_dir: Option<PathBuf>,
    guest_agent: Option<PathBuf>,
    jobs: Option<usize>,
    cache_only: bool,
) -> anyhow::Result<Option<ImageInfo>> {
    let opts = BuildOptions {
        cache_dir: cache_dir.unwrap_or_else(flotilla_image::default_cache_dir),
        guest_agent: find_guest_agent(guest_agent)?,
        progress: true,
        jobs: jobs.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }),
        rootfs_size_mib: 512,
    };
    let built = flotilla_image::build_default(&opts).context("building the default image")?;
    if cache_only {
        eprintln!(
            "image built in {}",
            built.rootfs.parent().unwrap_or(Path::new("")).display()
        );
        return Ok(None);
    }
    let store = ImageStore::open(&data_dir.join("images"))?;
    let image = store.register(RegisterImage {
        name: DEFAULT_IMAGE.to_string(),
        kernel: built.kernel,
        initrd: Some(built.initrd),
        rootfs: Some(built.rootfs),
        builtin: true,
        replace: true,
    })?;
    eprintln!(
        "image {} ready in {}",
        image.name,
        data_dir.join("images").display()
    );
    Ok(Some(flotilla_agent::http::image_info(&image)))
}
