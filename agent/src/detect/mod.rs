//! The rename-ENXIO detector's judgement: which failed renames are the overlayfs symlink
//! regression, and which pod they hit.
//!
//! Input: [`RenameFailure`]s from the probes. Output: [`Detection`]s, machine-readable (serde)
//! for the store and the HTTP API of later stages, and logged as one structured line each.
//! A failure whose source is confirmed not to be a symlink (or not to exist) is dropped and
//! counted; one that cannot be inspected is still reported, marked unconfirmed, because an
//! `ENXIO` from rename is rare enough that silence would be the worse error.

mod inspect;
pub mod journal;

use serde::Serialize;

pub use inspect::{SourceKind, Via, inspect_source};

use crate::{
    attribution::{CgroupResolver, ContainerRef, parse_cgroup_path},
    events::{BootClock, RenameFailure},
};

/// One rename of a symlink that failed with `ENXIO`.
#[derive(Clone, Debug, Serialize)]
pub struct Detection {
    /// Wall-clock time of the failure (RFC 3339, UTC).
    pub time: String,
    /// `true` when the source was seen to be a symlink; `false` when it could not be looked
    /// at (see `source.reason`).
    pub confirmed: bool,
    #[serde(flatten)]
    pub failure: RenameFailure,
    /// renameat2 flag names.
    pub flag_names: Vec<String>,
    pub source: SourceKind,
    /// Whose view of the filesystem `source` was looked up in.
    pub inspected_via: Via,
    /// The caller's cgroup v2 path, if the cgroup still exists.
    pub cgroup_path: Option<String>,
    /// The container (and pod) the cgroup path names.
    pub container: Option<ContainerRef>,
}

/// What the detector made of one failure.
#[derive(Debug)]
pub enum Verdict {
    Report(Box<Detection>),
    /// Not the regression: the source was seen and is not a symlink.
    NotSymlink(SourceKind),
}

/// Turns rename failures into detections; keeps the cgroup cache between events.
#[derive(Debug)]
pub struct Detector {
    cgroups: Option<CgroupResolver>,
    clock: BootClock,
}

impl Detector {
    /// A detector resolving cgroups through `cgroups` (without one, detections carry no
    /// cgroup path or container).
    pub fn new(cgroups: Option<CgroupResolver>) -> Self {
        Self {
            cgroups,
            clock: BootClock::new(),
        }
    }

    /// Judges one failure.
    pub fn judge(&mut self, failure: RenameFailure) -> Verdict {
        let cgroup_path = self
            .cgroups
            .as_mut()
            .and_then(|r| r.resolve(failure.cgroup_id));
        let cgroup_dir = match (&self.cgroups, &cgroup_path) {
            (Some(r), Some(path)) => Some(r.dir_of(path)),
            _ => None,
        };
        let (source, via) = inspect_source(failure.tgid, cgroup_dir.as_deref(), &failure.old);
        let confirmed = match source {
            SourceKind::Symlink => true,
            SourceKind::Unknown { .. } => false,
            SourceKind::Other { .. } | SourceKind::Missing => return Verdict::NotSymlink(source),
        };
        let container = cgroup_path.as_deref().and_then(parse_cgroup_path);
        Verdict::Report(Box::new(Detection {
            time: crate::time::rfc3339_millis(self.clock.to_wall(failure.boot_ns)),
            confirmed,
            flag_names: failure.flag_names(),
            failure,
            source,
            inspected_via: via,
            cgroup_path,
            container,
        }))
    }
}

impl Detection {
    /// Logs the detection as one structured warning.
    pub fn log(&self) {
        let f = &self.failure;
        tracing::warn!(
            target: "imgstream::enxio",
            syscall = ?f.syscall,
            pid = f.tgid,
            comm = %f.comm,
            old = %f.old.path,
            new = %f.new.path,
            flags = ?self.flag_names,
            confirmed = self.confirmed,
            cgroup = self.cgroup_path.as_deref().unwrap_or("?"),
            container = self.container.as_ref().map_or("-", |c| c.container_id.as_str()),
            pod_uid = self.container.as_ref().and_then(|c| c.pod_uid.as_deref()).unwrap_or("-"),
            "rename of a symlink failed with ENXIO (overlayfs regression, fixed in Linux 6.6 and 6.1.55)"
        );
    }
}
