//! Attribution: from a cgroup v2 id to a cgroup path, and from that path to the container and
//! pod it belongs to.
//!
//! Owns the cgroup v2 hierarchy walk (a cgroup's id is its directory's inode number in cgroup2fs)
//! and the naming rules of the cgroupfs and systemd drivers for containerd, CRI-O and docker.
//! `pods` asks the container runtimes (CRI) which pod a container id belongs to, again when
//! they do not know it yet; [`PodRef`] is the pod identity every record shares. Knows
//! nothing of events or of the Kubernetes API.

mod naming;
mod pod;
mod pods;
mod resolver;

pub use naming::{
    CgroupDriver, ContainerRef, PodCgroup, Runtime, parse_cgroup_path, parse_pod_cgroup,
};
pub use pod::PodRef;
pub use pods::{PodDirectory, Retries};
pub use resolver::{CgroupResolver, ResolveError, find_cgroup2_mount};
