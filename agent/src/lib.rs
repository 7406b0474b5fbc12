//! imgstream, the image-streaming node agent: containers start from a lazily fetched image
//! while the whole image lands in a local cache, and eBPF probes watch how they start.
//!
//! ```text
//! registry ──> image (manifest, eStargz TOC) ──> fetch (on-demand + background)
//!     ──> cache (chunk store, io_uring, crc32) ──> fs (one FileSystem impl)
//!     ──> transports: fusedev (host) | virtio-fs over vhost-user (VMs) | snapshotter
//!
//! agent-ebpf (kernel programs + ABI) ──> probes (load, ring buffer) ──> events
//!     ──> detect (symlink check) + attribution (cgroup -> container -> pod) ──> agent output
//! ```
//!
//! The binary (`src/bin/imgstream`) puts these together as the node agent (`agent`), the
//! containerd snapshotter (`snapshotter`), one-off mounts and virtio-fs backends
//! (`foreground`), `convert`, `report` and `selftest`.

pub mod agent;
pub mod api;
pub mod attribution;
pub mod cache;
pub mod config;
pub mod convert;
pub mod cri;
pub mod detect;
pub mod events;
pub mod fetch;
pub mod flag;
pub mod foreground;
pub mod fs;
#[doc(hidden)]
pub mod fuzzing;
pub mod image;
pub mod mount;
pub mod mountinfo;
pub mod oci;
pub mod private;
pub mod probes;
pub mod query;
pub mod registry;
pub mod report;
pub mod selftest;
pub mod shutdown;
pub mod snapshotter;
pub mod starts;
pub mod sync;
#[cfg(test)]
mod testing;
pub mod time;

/// An error and its causes as one line (`a: b: c`), for logs: with causes in `#[source]`
/// and not repeated in messages, an error's `Display` alone names only the outermost step.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cause = err.source();
    while let Some(e) = cause {
        out.push_str(": ");
        out.push_str(&e.to_string());
        cause = e.source();
    }
    out
}
