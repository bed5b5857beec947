//! Progress reporting for long build steps: an indicatif spinner with the
//! step name, elapsed time and latest activity when asked for, `tracing`
//! events otherwise (daemons have no terminal to draw on).

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Hands out one [`Step`] per build phase.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Progress {
    interactive: bool,
}

impl Progress {
    pub(crate) fn new(interactive: bool) -> Self {
        Progress { interactive }
    }

    /// Starts a step; finish it with [`Step::done`]. A step dropped without
    /// `done` (an error path) clears its spinner.
    pub(crate) fn step(&self, name: &str) -> Step {
        let bar = if self.interactive {
            let bar = ProgressBar::new_spinner();
            if let Ok(style) = ProgressStyle::with_template(
                "{spinner:.cyan} {prefix:.bold} [{elapsed}] {wide_msg}",
            ) {
                bar.set_style(style);
            }
            bar.set_prefix(name.to_string());
            bar.enable_steady_tick(Duration::from_millis(120));
            Some(bar)
        } else {
            tracing::info!(step = name, "starting");
            None
        };
        Step {
            name: name.to_string(),
            bar,
            started: Instant::now(),
        }
    }
}

/// One running build phase.
pub(crate) struct Step {
    name: String,
    bar: Option<ProgressBar>,
    started: Instant,
}

impl Step {
    /// Shows the latest activity (e.g. the file make is compiling).
    pub(crate) fn message(&self, msg: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(msg.trim().to_string());
        }
    }

    /// Marks the step finished and reports how long it took.
    pub(crate) fn done(mut self) -> Duration {
        let elapsed = self.started.elapsed();
        match self.bar.take() {
            Some(bar) => {
                bar.set_style(
                    ProgressStyle::with_template("  {prefix:.bold} {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                bar.finish_with_message(format!("done in {:.1?}", elapsed));
            }
            None => {
                tracing::info!(step = %self.name, elapsed_ms = elapsed.as_millis() as u64, "done")
            }
        }
        elapsed
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
