//! Configuration, parsed once from the command line by the binary and handed to each part as
//! its own struct. Nothing below this module reads the environment or the arguments.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

/// `imgstream agent`.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Where detections go as JSON lines; `None` means standard output.
    pub detections_out: Option<PathBuf>,
    /// How long one wait on the probes' ring buffer lasts (bounds shutdown latency).
    pub poll_interval: Duration,
    /// Run the start-latency probes.
    pub start_latency: bool,
    /// How long after its creation a container's first log line is waited for (the write
    /// probes stay attached while one waits); later lines count as never logged.
    pub first_log_window: Duration,
    /// The local store of start records and flags; `None` keeps nothing.
    pub store: Option<PathBuf>,
    /// Most records of each kind the store keeps (oldest pruned first).
    pub store_max_records: u64,
    /// The HTTP API's address; `None` serves no API.
    pub api_addr: Option<SocketAddr>,
    /// The container runtimes' CRI sockets, for pod names, namespaces and images.
    pub cri_sockets: Vec<PathBuf>,
    /// Flag pods in the Kubernetes API (needs in-cluster credentials).
    pub kubernetes: Option<crate::flag::KubeConfig>,
    /// Serve containerd's snapshot API (the remote snapshotter).
    pub snapshotter: Option<crate::snapshotter::SnapshotterConfig>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            detections_out: None,
            poll_interval: Duration::from_millis(200),
            start_latency: true,
            first_log_window: Duration::from_secs(300),
            store: None,
            store_max_records: 100_000,
            api_addr: None,
            cri_sockets: Vec::new(),
            kubernetes: None,
            snapshotter: None,
        }
    }
}
