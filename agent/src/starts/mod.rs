//! Container start records: what the start-latency probes saw of each container, attributed
//! to its container, pod and image.
//!
//! [`Tracker`] turns lifecycle events into [`StartRecord`]s: a new cgroup that names a
//! container opens a record (others are dropped, and the probes stop watching them), the
//! first exec, first log line and exit fill it in. Each container start is its own record: a
//! restarted container gets a new cgroup, so a new record; init containers are containers.
//! Pod sandboxes (pause containers) are left out.

pub mod pods;
pub mod store;

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

pub use pods::{PodRecord, PullLog, PullRecord};

use crate::{
    attribution::{PodRef, Runtime, parse_cgroup_path, parse_pod_cgroup},
    events::{BootClock, Lifecycle, LifecycleKind},
    time::unix_ns,
};

/// Most containers tracked in memory at once (oldest dropped first; they are in the store).
const TRACKED: usize = 4096;

/// One container start.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StartRecord {
    /// The cgroup's creation time (ns since the epoch) and id: unique, and time-ordered.
    pub created_ns: u64,
    pub cgroup_id: u64,
    pub cgroup_path: String,
    pub container_id: String,
    pub runtime: String,
    /// The pod and container: UID and namespace from the cgroup path, names from CRI.
    #[serde(flatten)]
    pub pod: PodRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Container labels from CRI (`io.kubernetes.*` and the pod's own).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    /// First exec in the container (ns since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ns: Option<u64>,
    /// The program of that exec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program: Option<String>,
    /// First write to stdout or stderr.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_log_ns: Option<u64>,
    /// Which of the two.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_fd: Option<i32>,
    /// Exit of the started process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exited_ns: Option<u64>,
    /// What imgstream fetched for the container's image between its pod's start and its
    /// first log line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub critical_path: Option<CriticalPath>,
    /// CRI says this is a pod sandbox: its first exec goes to its pod's record, and the
    /// record itself is dropped then.
    #[serde(skip)]
    pub sandbox: bool,
}

/// Bytes and range requests fetched for a container's image between its pod's start (the
/// pod cgroup's creation) and its first log line: what the start waited on, at most.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CriticalPath {
    pub bytes: u64,
    pub requests: u64,
    /// Every chunk of the image was in the local cache at the first log line.
    pub fully_cached: bool,
}

impl StartRecord {
    /// Takes what CRI says of the container: names over what the cgroup path said, the
    /// image and labels.
    pub fn apply_cri(&mut self, meta: crate::cri::ContainerMeta) {
        self.pod = meta.pod.or(std::mem::take(&mut self.pod));
        self.image = meta.image;
        self.labels = meta.labels;
    }

    /// Creation to first exec, in seconds.
    pub fn create_to_start(&self) -> Option<f64> {
        Some(secs(self.started_ns?.checked_sub(self.created_ns)?))
    }

    /// First exec to first log line, in seconds.
    pub fn start_to_first_log(&self) -> Option<f64> {
        Some(secs(self.first_log_ns?.checked_sub(self.started_ns?)?))
    }

    /// Creation to first log line, in seconds.
    pub fn total(&self) -> Option<f64> {
        Some(secs(self.first_log_ns?.checked_sub(self.created_ns)?))
    }

    /// Started, and ended (or still running) without a line of output.
    pub fn never_logged(&self) -> bool {
        self.started_ns.is_some() && self.first_log_ns.is_none()
    }
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// What a cgroup turned out to be.
#[derive(Debug)]
pub enum Update {
    /// A container's record changed (new, or a new event): store it.
    Record(Box<StartRecord>),
    /// Not a container, or a pod sandbox: stop watching this cgroup.
    Unwatch(u64),
    /// A pod's record changed: store it. The cgroup (the pod's own, or its sandbox's once
    /// started) is not watched any more; a sandbox's start record, if stored, goes.
    Pod {
        pod: Box<PodRecord>,
        unwatch: u64,
        sandbox: Option<Box<StartRecord>>,
    },
    /// Nothing to do (an event of a cgroup the tracker no longer holds).
    None,
}

/// Builds start records from lifecycle events.
#[derive(Debug)]
pub struct Tracker {
    /// The boot clock's offset to the wall clock, and when it was sampled.
    clock: (BootClock, std::time::Instant),
    records: HashMap<u64, StartRecord>,
    order: std::collections::VecDeque<u64>,
    /// Pods by UID, and their order of arrival (the oldest are dropped first).
    pods: HashMap<String, PodRecord>,
    pod_order: std::collections::VecDeque<String>,
}

impl Default for Tracker {
    fn default() -> Self {
        Self {
            clock: (BootClock::new(), std::time::Instant::now()),
            records: HashMap::new(),
            order: Default::default(),
            pods: HashMap::new(),
            pod_order: Default::default(),
        }
    }
}

impl Tracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one event.
    pub fn apply(&mut self, event: &Lifecycle) -> Update {
        // Both clocks sampled again each second: a wall clock stepped or slewed since the
        // agent started moves the records with it, as it moves every other timestamp they
        // are compared with.
        if self.clock.1.elapsed() >= std::time::Duration::from_secs(1) {
            self.clock = (BootClock::new(), std::time::Instant::now());
        }
        let at = unix_ns(self.clock.0.to_wall(event.boot_ns));
        match &event.kind {
            LifecycleKind::Created { path } => {
                let Some(container) = parse_cgroup_path(path) else {
                    let Some(pod) = parse_pod_cgroup(path) else {
                        return Update::Unwatch(event.cgroup_id);
                    };
                    let record = self.pod_mut(&pod.uid, at);
                    record.cgroup_path = Some(path.clone());
                    record.created_ns = Some(at);
                    record.driver = Some(
                        match pod.driver {
                            crate::attribution::CgroupDriver::Cgroupfs => "cgroupfs",
                            crate::attribution::CgroupDriver::Systemd => "systemd",
                        }
                        .into(),
                    );
                    return Update::Pod {
                        pod: Box::new(record.clone()),
                        unwatch: event.cgroup_id,
                        sandbox: None,
                    };
                };
                let pod = container.pod_ref();
                let record = StartRecord {
                    created_ns: at,
                    cgroup_id: event.cgroup_id,
                    cgroup_path: path.clone(),
                    container_id: container.container_id,
                    runtime: runtime_name(container.runtime).into(),
                    pod,
                    ..Default::default()
                };
                self.insert(record.clone());
                Update::Record(Box::new(record))
            }
            kind => {
                let Some(record) = self.records.get_mut(&event.cgroup_id) else {
                    return Update::None;
                };
                match kind {
                    LifecycleKind::Started { program } => {
                        if record.sandbox || is_sandbox(program) {
                            record.started_ns = Some(at);
                            return self.sandbox_started(event.cgroup_id);
                        }
                        record.started_ns = Some(at);
                        record.program = Some(program.clone());
                    }
                    LifecycleKind::FirstLog { fd, .. } => {
                        record.first_log_ns = Some(at);
                        record.log_fd = Some(*fd);
                    }
                    LifecycleKind::Exited => record.exited_ns = Some(at),
                    LifecycleKind::Created { .. } => {}
                }
                Update::Record(Box::new(record.clone()))
            }
        }
    }

    /// The record of a cgroup, if held.
    pub fn get(&self, cgroup_id: u64) -> Option<&StartRecord> {
        self.records.get(&cgroup_id)
    }

    /// Containers created within `window` of `now_ns` that have neither logged nor exited:
    /// the ones whose first write the probes must not miss.
    pub fn awaiting_first_log(&self, now_ns: u64, window: std::time::Duration) -> usize {
        let since = now_ns.saturating_sub(window.as_nanos() as u64);
        self.records
            .values()
            .filter(|r| r.first_log_ns.is_none() && r.exited_ns.is_none() && r.created_ns >= since)
            .count()
    }

    /// The record of a container id, if held.
    pub fn find_container(&self, container_id: &str) -> Option<&StartRecord> {
        self.records
            .values()
            .find(|r| r.container_id == container_id)
    }

    /// Forgets a record.
    pub fn forget(&mut self, cgroup_id: u64) {
        self.records.remove(&cgroup_id);
    }

    /// CRI says the cgroup is a pod sandbox's. Until its first exec, it is watched for that
    /// (then [`Update::Pod`]); after it, its pod takes what was seen at once.
    pub fn sandbox_found(&mut self, cgroup_id: u64) -> Update {
        let Some(record) = self.records.get_mut(&cgroup_id) else {
            return Update::Unwatch(cgroup_id);
        };
        record.sandbox = true;
        if record.started_ns.is_some() {
            return self.sandbox_started(cgroup_id);
        }
        let record = record.clone();
        let Some(uid) = record.pod.uid.clone() else {
            return Update::None;
        };
        let pod = self.pod_mut(&uid, record.created_ns);
        pod.sandbox_id = Some(record.container_id.clone());
        pod.sandbox_created_ns = Some(record.created_ns);
        Update::Pod {
            pod: Box::new(pod.clone()),
            unwatch: 0,
            sandbox: Some(Box::new(record)),
        }
    }

    /// A sandbox's first exec: its times go to its pod, its own record goes.
    fn sandbox_started(&mut self, cgroup_id: u64) -> Update {
        let Some(record) = self.records.remove(&cgroup_id) else {
            return Update::None;
        };
        let Some(uid) = record.pod.uid.clone() else {
            return Update::Unwatch(cgroup_id);
        };
        let pod = self.pod_mut(&uid, record.created_ns);
        pod.sandbox_id = Some(record.container_id.clone());
        pod.sandbox_created_ns = Some(record.created_ns);
        pod.sandbox_started_ns = record.started_ns;
        Update::Pod {
            pod: Box::new(pod.clone()),
            unwatch: cgroup_id,
            sandbox: Some(Box::new(record)),
        }
    }

    /// The record of pod `uid`, opened at `at` if new.
    fn pod_mut(&mut self, uid: &str, at: u64) -> &mut PodRecord {
        if !self.pods.contains_key(uid) {
            if self.pods.len() >= TRACKED
                && let Some(oldest) = self.pod_order.pop_front()
            {
                self.pods.remove(&oldest);
            }
            self.pod_order.push_back(uid.to_string());
        }
        self.pods
            .entry(uid.to_string())
            .or_insert_with(|| PodRecord {
                uid: uid.to_string(),
                first_ns: at,
                ..Default::default()
            })
    }

    /// The record of pod `uid`, if held.
    pub fn pod(&self, uid: &str) -> Option<&PodRecord> {
        self.pods.get(uid)
    }

    /// Updates a held record in place (metadata from CRI) and returns it.
    pub fn annotate(
        &mut self,
        cgroup_id: u64,
        f: impl FnOnce(&mut StartRecord),
    ) -> Option<StartRecord> {
        let record = self.records.get_mut(&cgroup_id)?;
        f(record);
        Some(record.clone())
    }

    fn insert(&mut self, record: StartRecord) {
        if self.records.len() >= TRACKED
            && let Some(oldest) = self.order.pop_front()
        {
            self.records.remove(&oldest);
        }
        self.order.push_back(record.cgroup_id);
        self.records.insert(record.cgroup_id, record);
    }
}

/// The pause container of a pod sandbox: its only program is `/pause`.
fn is_sandbox(program: &str) -> bool {
    program == "/pause" || program.ends_with("/pause")
}

fn runtime_name(runtime: Runtime) -> &'static str {
    match runtime {
        Runtime::Containerd => "containerd",
        Runtime::Crio => "cri-o",
        Runtime::Docker => "docker",
        Runtime::Podman => "podman",
        Runtime::Unknown => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(cgroup_id: u64, boot_ns: u64, kind: LifecycleKind) -> Lifecycle {
        Lifecycle {
            boot_ns,
            cgroup_id,
            tgid: 7,
            comm: "sh".into(),
            kind,
        }
    }

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn a_container_start_becomes_one_record_and_other_cgroups_are_unwatched() {
        let mut tracker = Tracker::new();
        let created = LifecycleKind::Created {
            path: format!("/k8s.io/{ID}"),
        };
        let Update::Record(r) = tracker.apply(&event(5, 1_000_000_000, created)) else {
            panic!("a container cgroup opens a record");
        };
        assert_eq!(
            (r.container_id.as_str(), r.pod.namespace.as_deref()),
            (ID, Some("k8s.io"))
        );
        let started = LifecycleKind::Started {
            program: "/bin/sh".into(),
        };
        tracker.apply(&event(5, 1_250_000_000, started));
        let logged = LifecycleKind::FirstLog {
            fd: 1,
            file_type: 0o010000,
        };
        let Update::Record(r) = tracker.apply(&event(5, 1_750_000_000, logged)) else {
            panic!("the first log line updates the record");
        };
        assert!((r.create_to_start().unwrap() - 0.25).abs() < 1e-6);
        assert!((r.start_to_first_log().unwrap() - 0.5).abs() < 1e-6);
        assert!((r.total().unwrap() - 0.75).abs() < 1e-6);
        assert!(!r.never_logged());

        let other = LifecycleKind::Created {
            path: "/system.slice/cron.service".into(),
        };
        assert!(matches!(
            tracker.apply(&event(6, 1, other)),
            Update::Unwatch(6)
        ));
        let pod_cgroup = LifecycleKind::Created {
            path: "/kubepods/besteffort/pod12345678-1234-1234-1234-123456789abc".into(),
        };
        let Update::Pod {
            pod, unwatch: 7, ..
        } = tracker.apply(&event(7, 500_000_000, pod_cgroup))
        else {
            panic!("a pod cgroup opens a pod record and is not watched");
        };
        assert_eq!(pod.driver.as_deref(), Some("cgroupfs"));
        let sandbox = LifecycleKind::Created {
            path: format!("/kubepods/besteffort/pod12345678-1234-1234-1234-123456789abc/{ID}"),
        };
        tracker.apply(&event(8, 1_000_000_000, sandbox));
        let pause = LifecycleKind::Started {
            program: "/pause".into(),
        };
        let Update::Pod {
            pod,
            unwatch: 8,
            sandbox: Some(_),
        } = tracker.apply(&event(8, 2_000_000_000, pause))
        else {
            panic!("the sandbox's first exec goes to its pod");
        };
        assert_eq!(
            pod.created_ns,
            Some(pod.first_ns),
            "the pod cgroup came first"
        );
        assert_eq!(pod.sandbox_id.as_deref(), Some(ID));
        let (created, started) = (
            pod.sandbox_created_ns.expect("the sandbox cgroup was seen"),
            pod.sandbox_started_ns.expect("the sandbox exec was seen"),
        );
        assert_eq!(started - pod.first_ns, 1_500_000_000);
        assert!(created > pod.first_ns && created < started);
        assert!(
            tracker.get(8).is_none(),
            "the sandbox's own record is dropped"
        );
        assert!(matches!(
            tracker.apply(&event(99, 2, LifecycleKind::Exited)),
            Update::None
        ));
    }
}
