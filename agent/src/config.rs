//! Configuration, parsed once from the command line by the binary and handed to each part as
//! its own struct. Nothing below this module reads the environment or the arguments.

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

/// A number of bytes as people write it: `4096`, `64K`, `4M`, `1G` (binary multiples; `KB`,
/// `KiB` and a trailing `B` are read alike).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

/// A size that is not a number with an optional K/M/G unit, or does not fit in 64 bits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a size (a number, optionally followed by K, M or G)")]
pub struct ByteSizeError(String);

impl FromStr for ByteSize {
    type Err = ByteSizeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ByteSizeError(s.chars().take(100).collect());
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, unit) = t.split_at(split);
        let n: u64 = digits.parse().map_err(|_| bad())?;
        let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
            "" | "B" => 1,
            "K" | "KB" | "KIB" => 1 << 10,
            "M" | "MB" | "MIB" => 1 << 20,
            "G" | "GB" | "GIB" => 1 << 30,
            _ => return Err(bad()),
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(bad)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (shift, unit) in [(30, "G"), (20, "M"), (10, "K")] {
            if n != 0 && n.is_multiple_of(1 << shift) {
                return write!(f, "{}{unit}", n >> shift);
            }
        }
        write!(f, "{n}")
    }
}

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
    /// Stand between kubelet and the runtime's image service, keeping pulls' credentials.
    pub image_proxy: Option<ImageProxyConfig>,
}

/// kubelet's image service in front of the runtime's (`--cri-image-proxy`).
#[derive(Clone, Debug)]
pub struct ImageProxyConfig {
    /// Where kubelet's `--image-service-endpoint` points.
    pub socket: PathBuf,
    /// The runtime's CRI socket every call goes on to.
    pub upstream: PathBuf,
    /// Where pulls' credentials are kept; the snapshotter's registry clients read it.
    pub keyring: std::sync::Arc<crate::registry::keyring::Keyring>,
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
            image_proxy: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_parse_print_and_refuse_garbage() {
        for (text, n) in [
            ("4096", 4096),
            ("64K", 65_536),
            ("4M", 4 << 20),
            ("1GiB", 1 << 30),
        ] {
            let size: ByteSize = text.parse().unwrap();
            assert_eq!(size, ByteSize(n), "{text}");
            assert_eq!(size.to_string().parse::<ByteSize>().unwrap(), size);
        }
        assert_eq!(ByteSize(4 << 20).to_string(), "4M");
        assert_eq!(ByteSize(1000).to_string(), "1000");
        for bad in [
            "",
            "K",
            "4X",
            "-1",
            "99999999999999999999",
            "18446744073709551615G",
            "4é",
        ] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad}");
        }
    }
}
