//! Builds the default guest image and prints where its artifacts are.
//!
//! ```text
//! cargo run -p flotilla-image --example build_default -- GUEST_AGENT [--jobs N] [--cache DIR] [--quiet]
//! ```
//!
//! GUEST_AGENT must be a static x86-64 binary (see `validate_guest_agent`).
//! The first run builds the kernel (minutes); later runs hit the cache.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use flotilla_image::{build_default, BuildOptions};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut agent = None;
    let mut cache = None;
    let mut jobs = None;
    let mut quiet = false;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--jobs" => jobs = args.next().and_then(|j| j.parse().ok()),
            "--cache" => cache = args.next().map(PathBuf::from),
            "--quiet" => quiet = true,
            _ => agent = Some(PathBuf::from(arg)),
        }
    }
    let Some(agent) = agent else {
        eprintln!("usage: build_default GUEST_AGENT [--jobs N] [--cache DIR] [--quiet]");
        return ExitCode::from(2);
    };
    let mut opts = BuildOptions::new(agent);
    opts.progress = !quiet;
    if quiet {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .init();
    }
    if let Some(cache) = cache {
        opts.cache_dir = cache;
    }
    if let Some(jobs) = jobs {
        opts.jobs = jobs;
    }
    let started = Instant::now();
    match build_default(&opts) {
        Ok(built) => {
            println!("kernel: {}", built.kernel.display());
            println!("initrd: {}", built.initrd.display());
            println!("rootfs: {}", built.rootfs.display());
            println!("key:    {}", built.key);
            eprintln!("took {:.2?}", started.elapsed());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
