//! Configuration, parsed once from the command line by the binary and handed to each part as
//! its own struct. Nothing below this module reads the environment or the arguments.

use std::{path::PathBuf, time::Duration};

/// `imgstream agent`.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Where detections go as JSON lines; `None` means standard output.
    pub detections_out: Option<PathBuf>,
    /// How long one wait on the probes' ring buffer lasts (bounds shutdown latency).
    pub poll_interval: Duration,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            detections_out: None,
            poll_interval: Duration::from_millis(200),
        }
    }
}
