//! Pod records: a pod's whole startup, from kubelet's creation of its cgroup to each of its
//! containers' first log line, with the image pulls in between.
//!
//! Three sources meet here. The start-latency probes see the pod's cgroup created (kubelet
//! makes it before anything else), the sandbox's cgroup and first exec ([`PodRecord`]), and
//! each container's cgroup, first exec, first log line and exit (start records). The CRI
//! image proxy sees each `PullImage` kubelet makes, with the pod it is for ([`PullRecord`]).
//! [`assemble`] joins them by pod UID into [`PodTimeline`]s, each container with its
//! [`Phases`]. Where no pull was seen (no image proxy, or the image was already present),
//! the time from the sandbox (or the container before) to the container's cgroup is given
//! as a gap and labelled as such: it holds the pull, if there was one, and the create.

use std::{collections::VecDeque, sync::Mutex};

use serde::{Deserialize, Serialize};

use super::StartRecord;
use crate::attribution::PodRef;

/// What the agent saw of a pod itself; its containers are start records.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PodRecord {
    pub uid: String,
    /// The store key's time: the pod cgroup's creation, or the sandbox's when that was
    /// not seen (the agent started after it). Never changes once set.
    pub first_ns: u64,
    /// The pod cgroup's path and creation (ns since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_ns: Option<u64>,
    /// `cgroupfs` or `systemd`, as the pod cgroup's name says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// The sandbox (pause) container: its id, cgroup creation and first exec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_created_ns: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_started_ns: Option<u64>,
}

/// One `PullImage` that went through the CRI image proxy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PullRecord {
    /// When the request arrived and when the runtime's answer went back (ns since the
    /// epoch).
    pub start_ns: u64,
    pub end_ns: u64,
    pub image: String,
    /// The pod kubelet pulled for (the request's sandbox config), if it said.
    #[serde(flatten)]
    pub pod: PodRef,
    pub ok: bool,
    /// How imgstream's snapshotter served the layers the pull brought: `streamed`,
    /// `partly-streamed` or `unpacked`; none when it served none of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served: Option<String>,
    /// Who saw it: the image proxy (none) or the snapshotter ([`FROM_SNAPSHOTTER`]: the
    /// layers' part of the pull, from the first layer's Prepare to the last layer's mount or
    /// commit, for no pod in particular).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

impl PullRecord {
    /// Whether `other` is this same pull, seen again (a snapshotter span that grew).
    fn same(&self, other: &PullRecord) -> bool {
        self.start_ns == other.start_ns && self.image == other.image && self.source == other.source
    }

    fn seen_by_snapshotter(&self) -> bool {
        self.source.as_deref() == Some(FROM_SNAPSHOTTER)
    }
}

/// Pulls kept in memory for the start loop's phase histograms.
const RECENT_PULLS: usize = 1024;

/// The pulls the image proxy saw: the recent ones in memory, all of them in the store once
/// it is open.
#[derive(Debug, Default)]
pub struct PullLog {
    recent: Mutex<VecDeque<PullRecord>>,
    store: std::sync::OnceLock<std::sync::Arc<super::store::Store>>,
}

impl PullLog {
    /// Where pulls are kept from now on.
    pub fn keep_in(&self, store: std::sync::Arc<super::store::Store>) {
        let _ = self.store.set(store);
    }

    pub fn record(&self, pull: PullRecord) {
        if let Some(store) = self.store.get()
            && let Err(err) = store.put_pull(&pull)
        {
            tracing::warn!(%err, "pull record not stored");
        }
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(seen) = recent.iter_mut().rev().find(|p| p.same(&pull)) {
            *seen = pull;
            return;
        }
        if recent.len() >= RECENT_PULLS {
            recent.pop_front();
        }
        recent.push_back(pull);
    }

    /// The recent pulls that may be a container's: those made for its pod `uid`, and the
    /// snapshotter's of its `image`.
    pub fn for_container(&self, uid: &str, image: Option<&str>) -> Vec<PullRecord> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent
            .iter()
            .filter(|p| {
                p.pod.uid.as_deref() == Some(uid)
                    || (p.seen_by_snapshotter() && image == Some(p.image.as_str()))
            })
            .cloned()
            .collect()
    }
}

/// A pod's startup, as [`assemble`] puts it together.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PodTimeline {
    pub uid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// The pod cgroup's creation: where the timeline starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_ns: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_created_ns: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_started_ns: Option<u64>,
    /// In the order their cgroups were created: init containers first, as kubelet runs them.
    pub containers: Vec<ContainerTimeline>,
}

/// One container start in a pod's timeline.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ContainerTimeline {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    pub container_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull: Option<Pull>,
    /// The container's cgroup creation, first exec, first log line and exit.
    pub created_ns: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ns: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_log_ns: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exited_ns: Option<u64>,
    /// Bytes and requests fetched for the container's image between the pod's start and
    /// the container's first log line, when imgstream serves the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub critical_path: Option<super::CriticalPath>,
    pub phases: Phases,
}

/// The pull before a container, or the gap where it would be.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Pull {
    pub start_ns: u64,
    pub end_ns: u64,
    /// `image-proxy`: the PullImage call itself. `snapshotter`: the layers' part of the
    /// pull (from the first layer's Prepare to the last one's mount or commit; the manifest
    /// and config fetched before it are not in it). `gap`: no pull was seen; this is the
    /// time from the sandbox's (or the previous container's) start to this container's
    /// cgroup, which holds the pull, if there was one, and the create.
    pub source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served: Option<String>,
}

/// Pull source: the PullImage call, as the image proxy saw it.
pub const FROM_PROXY: &str = "image-proxy";
/// Pull source: no pull seen; the gap before the container's cgroup.
pub const GAP: &str = "gap";
/// Pull source: the layers' part of the pull, as the snapshotter saw it.
pub const FROM_SNAPSHOTTER: &str = "snapshotter";

/// A container's startup in phases, in seconds; each is missing when an end of it was not
/// seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Phases {
    /// The pod cgroup's creation to the sandbox's first exec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<f64>,
    /// The pull (or the gap, see [`Pull::source`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull: Option<f64>,
    /// The pull's end to the container's cgroup (CreateContainer, and the runtime's create).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create: Option<f64>,
    /// The container's cgroup to its first exec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<f64>,
    /// First exec to first log line: where lazy reads show.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_log: Option<f64>,
    /// The pod cgroup's creation to the container's first log line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<f64>,
}

impl Phases {
    /// The phases by name, in order.
    pub fn named(&self) -> [(&'static str, Option<f64>); 6] {
        [
            ("sandbox", self.sandbox),
            ("pull", self.pull),
            ("create", self.create),
            ("start", self.start),
            ("first_log", self.first_log),
            ("total", self.total),
        ]
    }
}

fn span(from: Option<u64>, to: Option<u64>) -> Option<f64> {
    Some(to?.checked_sub(from?)? as f64 / 1e9)
}

/// Joins a pod's record, its containers' start records and the pulls made for it into its
/// timeline. `starts` and `pulls` may hold other pods' too.
pub fn assemble(pod: &PodRecord, starts: &[StartRecord], pulls: &[PullRecord]) -> PodTimeline {
    let mut containers: Vec<&StartRecord> = starts
        .iter()
        .filter(|s| s.pod.uid.as_deref() == Some(pod.uid.as_str()))
        .collect();
    containers.sort_by_key(|s| (s.created_ns, s.cgroup_id));
    let spans: Vec<&PullRecord> = pulls.iter().filter(|p| p.seen_by_snapshotter()).collect();
    let mut pulls: Vec<&PullRecord> = pulls
        .iter()
        .filter(|p| p.pod.uid.as_deref() == Some(pod.uid.as_str()))
        .collect();
    pulls.sort_by_key(|p| p.start_ns);
    let mut used = vec![false; pulls.len()];
    let named = |f: fn(&PodRef) -> &Option<String>| {
        containers
            .iter()
            .find_map(|s| f(&s.pod).clone())
            .or_else(|| pulls.iter().find_map(|p| f(&p.pod).clone()))
    };
    let mut timeline = PodTimeline {
        uid: pod.uid.clone(),
        namespace: named(|p| &p.namespace),
        pod: named(|p| &p.name),
        cgroup_path: pod.cgroup_path.clone(),
        driver: pod.driver.clone(),
        created_ns: pod.created_ns,
        sandbox_created_ns: pod.sandbox_created_ns,
        sandbox_started_ns: pod.sandbox_started_ns,
        containers: Vec::new(),
    };
    let mut before: Option<&StartRecord> = None;
    for start in containers {
        // The latest pull for this pod that began before the container's cgroup, its own
        // image's first.
        let pick = |same_image: bool| {
            (0..pulls.len()).rev().find(|&i| {
                !used[i]
                    && pulls[i].start_ns <= start.created_ns
                    && (!same_image || start.image.as_deref() == Some(pulls[i].image.as_str()))
            })
        };
        // Where this container's pull may begin: after the sandbox, or the container
        // before it, started (or exited).
        let marks = [
            pod.sandbox_started_ns,
            before.and_then(|b| b.started_ns),
            before.and_then(|b| b.exited_ns),
        ];
        let from = marks
            .into_iter()
            .flatten()
            .filter(|&t| t <= start.created_ns)
            .max();
        // Without the proxy's, the snapshotter's span of the image's layers, if one began
        // there.
        let layers_span = || {
            spans.iter().rev().find(|s| {
                start.image.as_deref() == Some(s.image.as_str())
                    && from.is_none_or(|f| s.start_ns >= f)
                    && s.start_ns <= start.created_ns
            })
        };
        let pull = match pick(true).or_else(|| pick(false)) {
            Some(i) => {
                used[i] = true;
                Pull {
                    start_ns: pulls[i].start_ns,
                    end_ns: pulls[i].end_ns,
                    source: FROM_PROXY.into(),
                    served: pulls[i].served.clone(),
                }
            }
            None => match layers_span() {
                Some(s) => Pull {
                    start_ns: s.start_ns,
                    end_ns: s.end_ns.min(start.created_ns),
                    source: FROM_SNAPSHOTTER.into(),
                    served: s.served.clone(),
                },
                None => Pull {
                    start_ns: from.unwrap_or(start.created_ns),
                    end_ns: start.created_ns,
                    source: GAP.into(),
                    served: None,
                },
            },
        };
        let from_proxy = pull.source != GAP;
        let phases = Phases {
            sandbox: span(pod.created_ns, pod.sandbox_started_ns),
            pull: span(Some(pull.start_ns), Some(pull.end_ns)),
            create: from_proxy
                .then(|| span(Some(pull.end_ns), Some(start.created_ns)))
                .flatten(),
            start: span(Some(start.created_ns), start.started_ns),
            first_log: span(start.started_ns, start.first_log_ns),
            total: span(pod.created_ns, start.first_log_ns),
        };
        timeline.containers.push(ContainerTimeline {
            container: start.pod.container.clone(),
            container_id: start.container_id.clone(),
            image: start.image.clone(),
            pull: Some(pull),
            created_ns: start.created_ns,
            started_ns: start.started_ns,
            first_log_ns: start.first_log_ns,
            exited_ns: start.exited_ns,
            critical_path: start.critical_path,
            phases,
        });
        before = Some(start);
    }
    timeline
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f0e0d0c-0b0a-4909-8807-060504030201";
    const MS: u64 = 1_000_000;

    fn start(id: &str, name: &str, image: &str, at: [u64; 4]) -> StartRecord {
        let ms = |t: u64| (t != 0).then_some(t * MS);
        StartRecord {
            created_ns: at[0] * MS,
            cgroup_id: at[0],
            container_id: id.into(),
            pod: PodRef {
                uid: Some(UID.into()),
                namespace: Some("shop".into()),
                name: Some("web".into()),
                container: Some(name.into()),
            },
            image: Some(image.into()),
            started_ns: ms(at[1]),
            first_log_ns: ms(at[2]),
            exited_ns: ms(at[3]),
            ..Default::default()
        }
    }

    fn pull(image: &str, from: u64, to: u64) -> PullRecord {
        PullRecord {
            start_ns: from * MS,
            end_ns: to * MS,
            image: image.into(),
            pod: PodRef {
                uid: Some(UID.into()),
                ..Default::default()
            },
            ok: true,
            served: Some("streamed".into()),
            source: None,
        }
    }

    fn pod() -> PodRecord {
        PodRecord {
            uid: UID.into(),
            first_ns: 1000 * MS,
            created_ns: Some(1000 * MS),
            sandbox_created_ns: Some(1010 * MS),
            sandbox_started_ns: Some(1050 * MS),
            ..Default::default()
        }
    }

    #[test]
    fn an_init_container_and_an_app_in_kubelets_order_get_their_own_pulls_and_phases() {
        let starts = [
            start("app", "app", "reg/app:1", [1900, 1910, 2400, 0]),
            start("init", "init", "reg/init:1", [1300, 1320, 0, 1500]),
            // Another pod's container is not this pod's.
            StartRecord {
                pod: PodRef::default(),
                ..start("other", "x", "reg/app:1", [1200, 0, 0, 0])
            },
        ];
        let pulls = [
            pull("reg/init:1", 1060, 1280),
            pull("reg/app:1", 1510, 1880),
        ];
        let t = assemble(&pod(), &starts, &pulls);
        assert_eq!(
            (t.namespace.as_deref(), t.pod.as_deref()),
            (Some("shop"), Some("web"))
        );
        let names: Vec<_> = t
            .containers
            .iter()
            .map(|c| c.container_id.as_str())
            .collect();
        assert_eq!(
            names,
            ["init", "app"],
            "init containers first, in their order"
        );
        let app = &t.containers[1];
        let close = |a: Option<f64>, b: f64| (a.expect("the test's own setup") - b).abs() < 1e-9;
        assert!(close(app.phases.sandbox, 0.050));
        assert!(close(app.phases.pull, 0.370));
        assert!(close(app.phases.create, 0.020));
        assert!(close(app.phases.start, 0.010));
        assert!(close(app.phases.first_log, 0.490));
        assert!(close(app.phases.total, 1.400));
        assert_eq!(
            app.pull.as_ref().expect("the test's own setup").source,
            FROM_PROXY
        );
        let init = &t.containers[0];
        assert_eq!(
            init.pull.as_ref().expect("the test's own setup").start_ns,
            1060 * MS
        );
        assert_eq!(init.phases.first_log, None, "never logged");
    }

    #[test]
    fn without_a_pull_the_gap_is_given_and_labelled() {
        let starts = [
            start("init", "init", "reg/init:1", [1300, 1320, 0, 1500]),
            start("app", "app", "reg/app:1", [1900, 1910, 2400, 0]),
        ];
        let t = assemble(&pod(), &starts, &[]);
        let [init, app] = &t.containers[..] else {
            panic!("two containers")
        };
        let gap = init.pull.as_ref().expect("the test's own setup");
        assert_eq!(
            (gap.source.as_str(), gap.start_ns, gap.end_ns),
            (GAP, 1050 * MS, 1300 * MS)
        );
        let gap = app.pull.as_ref().expect("the test's own setup");
        assert_eq!(gap.start_ns, 1500 * MS, "from the init container's exit");
        assert_eq!(app.phases.create, None, "the gap holds the create");
    }

    #[test]
    fn without_the_proxy_the_snapshotters_span_of_the_image_is_the_pull() {
        let starts = [start("app", "app", "reg/app:1", [1900, 1910, 2400, 0])];
        let span = |image: &str, from: u64, to: u64| PullRecord {
            pod: PodRef::default(),
            source: Some(FROM_SNAPSHOTTER.into()),
            ..pull(image, from, to)
        };
        let spans = [
            span("reg/app:1", 900, 990), // before the pod's sandbox: another pod's
            span("reg/other:1", 1100, 1200),
            span("reg/app:1", 1200, 1850),
        ];
        let t = assemble(&pod(), &starts, &spans);
        let pull = t.containers[0].pull.as_ref().expect("the test's own setup");
        assert_eq!(
            (pull.source.as_str(), pull.start_ns, pull.end_ns),
            (FROM_SNAPSHOTTER, 1200 * MS, 1850 * MS)
        );
        assert!(
            (t.containers[0].phases.create.expect("the test's own setup") - 0.050).abs() < 1e-9
        );
    }
}
