//! Attribution: from a cgroup v2 id to a cgroup path, and from that path to the container and
//! pod it belongs to.
//!
//! Owns the cgroup v2 hierarchy walk (a cgroup's id is its directory's inode number in cgroup2fs)
//! and the naming rules of the cgroupfs and systemd drivers for containerd, CRI-O and docker.
//! Knows nothing of events or of the Kubernetes API: names and pod metadata come later.

mod naming;
mod resolver;

pub use naming::{CgroupDriver, ContainerRef, Runtime, parse_cgroup_path};
pub use resolver::{CgroupResolver, ResolveError, find_cgroup2_mount};
