//! `imgstream report --pods`: pods' whole startup, phase by phase (sandbox, pull, create,
//! start, first log line, and the total from the pod cgroup to the first log line), as
//! p50/p90/p99/max per image and per namespace; a comparison of groups on the whole timeline
//! (streamed against unpacked pulls: the pull shrinking, start -> first log growing, and the
//! net); and each pod's waterfall.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{GroupBy, Quantiles, aligned, ms};
use crate::starts::pods::{ContainerTimeline, PodTimeline};

/// The phases, in order (see [`crate::starts::pods::Phases`]).
pub const PHASES: [&str; 6] = ["sandbox", "pull", "create", "start", "first_log", "total"];

/// One container of one pod: what a group holds.
struct Entry<'a> {
    pod: &'a PodTimeline,
    container: &'a ContainerTimeline,
}

impl Entry<'_> {
    fn key(&self, by: &GroupBy) -> String {
        let or_none = |v: Option<&String>| v.cloned().unwrap_or_else(|| "(none)".into());
        match by {
            GroupBy::Namespace => or_none(self.pod.namespace.as_ref()),
            GroupBy::Image => or_none(self.container.image.as_ref()),
            // Timelines carry no labels: every container is in one group.
            GroupBy::Label(_) => "(none)".into(),
            GroupBy::ImageMatch(pattern) => {
                if self
                    .container
                    .image
                    .as_deref()
                    .is_some_and(|i| i.contains(pattern.as_str()))
                {
                    format!("image ~ {pattern}")
                } else {
                    format!("image !~ {pattern}")
                }
            }
            GroupBy::Served => match &self.container.pull {
                Some(p) if p.source == crate::starts::pods::GAP => "no pull seen".into(),
                Some(p) => p.served.clone().unwrap_or_else(|| "not imgstream's".into()),
                None => "no pull seen".into(),
            },
        }
    }
}

/// The phases of one group.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PhaseStats {
    pub group: String,
    pub containers: usize,
    /// By phase name ([`PHASES`]).
    pub phases: BTreeMap<String, Quantiles>,
    /// Containers whose pull was a gap (no PullImage seen).
    pub pull_gaps: usize,
}

fn stats(group: String, entries: &[&Entry]) -> PhaseStats {
    let mut phases = BTreeMap::new();
    for (i, name) in PHASES.iter().enumerate() {
        let values = entries
            .iter()
            .filter_map(|e| e.container.phases.named()[i].1)
            .collect();
        phases.insert(name.to_string(), Quantiles::of(values));
    }
    PhaseStats {
        group,
        containers: entries.len(),
        phases,
        pull_gaps: entries
            .iter()
            .filter(|e| {
                e.container
                    .pull
                    .as_ref()
                    .is_none_or(|p| p.source == crate::starts::pods::GAP)
            })
            .count(),
    }
}

fn grouped(entries: &[Entry], by: &GroupBy) -> Vec<PhaseStats> {
    let mut groups: BTreeMap<String, Vec<&Entry>> = BTreeMap::new();
    for e in entries {
        groups.entry(e.key(by)).or_default().push(e);
    }
    groups.into_iter().map(|(g, es)| stats(g, &es)).collect()
}

/// The report on pods.
#[derive(Clone, Debug, Serialize)]
pub struct PodReport {
    pub pods: usize,
    pub containers: usize,
    pub by_image: Vec<PhaseStats>,
    pub by_namespace: Vec<PhaseStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comparison: Option<PhaseComparison>,
    pub timelines: Vec<PodTimeline>,
}

/// Groups side by side on the whole timeline, each against the first.
#[derive(Clone, Debug, Serialize)]
pub struct PhaseComparison {
    pub by: String,
    pub groups: Vec<PhaseStats>,
    /// Each group's median of each phase minus the first group's, in seconds.
    pub p50_change: Vec<BTreeMap<String, f64>>,
    /// Each group's median total over the first group's.
    pub total_p50_ratio: Vec<Option<f64>>,
}

impl PodReport {
    pub fn build(timelines: Vec<PodTimeline>, compare: Option<&GroupBy>) -> Self {
        let entries: Vec<Entry> = timelines
            .iter()
            .flat_map(|pod| {
                pod.containers
                    .iter()
                    .map(move |container| Entry { pod, container })
            })
            .collect();
        let comparison = compare.map(|by| {
            let groups = grouped(&entries, by);
            let p50 = |g: &PhaseStats, phase: &str| {
                g.phases.get(phase).filter(|q| q.count > 0).map(|q| q.p50)
            };
            let p50_change = groups
                .iter()
                .map(|g| {
                    PHASES
                        .iter()
                        .filter_map(|phase| {
                            let base = p50(&groups[0], phase)?;
                            Some((phase.to_string(), p50(g, phase)? - base))
                        })
                        .collect()
                })
                .collect();
            let total_p50_ratio = groups
                .iter()
                .map(|g| {
                    let base = p50(&groups[0], "total")?;
                    (base > 0.0).then_some(p50(g, "total")? / base)
                })
                .collect();
            PhaseComparison {
                by: by.to_string(),
                groups,
                p50_change,
                total_p50_ratio,
            }
        });
        Self {
            pods: timelines.len(),
            containers: entries.len(),
            by_image: grouped(&entries, &GroupBy::Image),
            by_namespace: grouped(&entries, &GroupBy::Namespace),
            comparison,
            timelines,
        }
    }

    /// The report as text: the tables, the comparison, and each pod's timeline.
    pub fn render_text(&self) -> String {
        let mut out = format!(
            "{} pods, {} container starts (phases p50/p90/p99/max; pull \"gap\": no PullImage seen, the time before the container's cgroup)\n",
            self.pods, self.containers
        );
        for (title, groups) in [("image", &self.by_image), ("namespace", &self.by_namespace)] {
            out.push_str(&format!("\nby {title}\n"));
            out.push_str(&table(title, groups));
        }
        if let Some(c) = &self.comparison {
            out.push_str(&format!("\ncomparison ({})\n", c.by));
            out.push_str(&table("group", &c.groups));
            for ((g, change), ratio) in c
                .groups
                .iter()
                .zip(&c.p50_change)
                .zip(&c.total_p50_ratio)
                .skip(1)
            {
                let moved: Vec<String> = PHASES
                    .iter()
                    .filter(|phase| **phase != "total")
                    .filter_map(|phase| {
                        let d = change.get(*phase)?;
                        let sign = if *d < 0.0 { "-" } else { "+" };
                        Some(format!("{} {sign}{}", phase.replace('_', " "), ms(d.abs())))
                    })
                    .collect();
                out.push_str(&format!(
                    "  {} against {}: median {}; net total {}\n",
                    g.group,
                    c.groups[0].group,
                    moved.join(", "),
                    ratio.map_or("-".into(), |r| format!("{r:.2}x")),
                ));
            }
        }
        out.push_str("\npods\n");
        for pod in &self.timelines {
            out.push_str(&waterfall_text(pod));
        }
        out
    }
}

impl PodReport {
    /// A waterfall of each pod's startup, and under it a CDF of the pull, start -> first
    /// log and total phases (per compared group when there is a comparison).
    pub fn render_svg(&self, compare: Option<&GroupBy>) -> String {
        let mut bars = Vec::new();
        for pod in &self.timelines {
            let Some(zero) = pod
                .created_ns
                .or(pod.sandbox_created_ns)
                .or(pod.containers.first().map(|c| c.created_ns))
            else {
                continue;
            };
            let at = |t: u64| t.saturating_sub(zero) as f64 / 1e9;
            let name = format!(
                "{}/{}",
                pod.namespace.as_deref().unwrap_or("-"),
                pod.pod.as_deref().unwrap_or(&pod.uid)
            );
            if let Some(started) = pod.sandbox_started_ns {
                bars.push(super::svg::Bar {
                    label: format!("{name} sandbox"),
                    segments: vec![("sandbox", 0.0, at(started))],
                });
            }
            for c in &pod.containers {
                let mut segments = Vec::new();
                if let Some(p) = &c.pull {
                    let phase = if p.source == crate::starts::pods::GAP {
                        "gap"
                    } else {
                        "pull"
                    };
                    segments.push((phase, at(p.start_ns), at(p.end_ns)));
                    if phase == "pull" {
                        segments.push(("create", at(p.end_ns), at(c.created_ns)));
                    }
                }
                if let Some(started) = c.started_ns {
                    segments.push(("start", at(c.created_ns), at(started)));
                    if let Some(logged) = c.first_log_ns {
                        segments.push(("first_log", at(started), at(logged)));
                    }
                }
                bars.push(super::svg::Bar {
                    label: format!("{name} {}", c.container.as_deref().unwrap_or("?")),
                    segments,
                });
            }
        }
        let by = compare.cloned();
        let mut series: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for pod in &self.timelines {
            for container in &pod.containers {
                let group = by
                    .as_ref()
                    .map(|by| format!("{}: ", Entry { pod, container }.key(by)))
                    .unwrap_or_default();
                for (phase, value) in container.phases.named() {
                    if let (true, Some(v)) =
                        (matches!(phase, "pull" | "first_log" | "total"), value)
                    {
                        series
                            .entry(format!("{group}{}", phase.replace('_', " ")))
                            .or_default()
                            .push(v);
                    }
                }
            }
        }
        let series: Vec<super::svg::Series> = series
            .into_iter()
            .map(|(name, values)| super::svg::Series { name, values })
            .collect();
        let cdf = super::svg::cdf("pod startup phases", &series);
        super::svg::waterfall("pod startup, from the pod cgroup", &bars, Some(&cdf))
    }
}

fn table(title: &str, groups: &[PhaseStats]) -> String {
    let mut head = vec![title.to_string(), "n".into()];
    head.extend(PHASES.iter().map(|p| p.replace('_', " ")));
    let rows = groups.iter().map(|g| {
        let mut row = vec![g.group.clone(), g.containers.to_string()];
        row.extend(
            PHASES
                .iter()
                .map(|phase| g.phases.get(*phase).map_or("-".into(), Quantiles::cell)),
        );
        row
    });
    aligned(std::iter::once(head).chain(rows))
}

/// One pod's timeline, each mark as the time since the pod cgroup's creation.
pub fn waterfall_text(pod: &PodTimeline) -> String {
    let zero = pod
        .created_ns
        .or(pod.sandbox_created_ns)
        .or(pod.containers.first().map(|c| c.created_ns));
    let at = |t: Option<u64>| match (zero, t) {
        (Some(z), Some(t)) if t >= z => format!("+{}", ms((t - z) as f64 / 1e9)),
        _ => "-".into(),
    };
    let mut out = format!(
        "  {}/{} ({}): pod cgroup {}, sandbox cgroup {}, sandbox exec {}\n",
        pod.namespace.as_deref().unwrap_or("-"),
        pod.pod.as_deref().unwrap_or("-"),
        pod.uid,
        if pod.created_ns.is_some() {
            "+0"
        } else {
            "not seen"
        },
        at(pod.sandbox_created_ns),
        at(pod.sandbox_started_ns),
    );
    for c in &pod.containers {
        let pull = match &c.pull {
            Some(p) => format!(
                "{} {}..{}{}",
                p.source,
                at(Some(p.start_ns)),
                at(Some(p.end_ns)),
                p.served
                    .as_deref()
                    .map(|s| format!(" ({s})"))
                    .unwrap_or_default()
            ),
            None => "-".into(),
        };
        let critical = c
            .critical_path
            .map(|cp| {
                format!(
                    ", {} KiB in {} requests before its first log line{}",
                    cp.bytes / 1024,
                    cp.requests,
                    if cp.fully_cached {
                        ", image fully cached by then"
                    } else {
                        ""
                    }
                )
            })
            .unwrap_or_default();
        out.push_str(&format!(
            "    {} [{}]: pull {pull}, cgroup {}, exec {}, first log {}, exit {}{critical}\n",
            c.container.as_deref().unwrap_or(&c.container_id),
            c.image.as_deref().unwrap_or("-"),
            at(Some(c.created_ns)),
            at(c.started_ns),
            at(c.first_log_ns),
            at(c.exited_ns),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::starts::pods::{Phases, Pull};

    fn pod(ns: &str, served: &str, pull_s: f64, log_s: f64) -> PodTimeline {
        let ms = 1_000_000u64;
        let pull_ns = (pull_s * 1e9) as u64;
        let log_ns = (log_s * 1e9) as u64;
        PodTimeline {
            uid: format!("{ns}-{served}-{pull_s}"),
            namespace: Some(ns.into()),
            pod: Some("web".into()),
            created_ns: Some(1000 * ms),
            sandbox_started_ns: Some(1100 * ms),
            containers: vec![ContainerTimeline {
                container: Some("app".into()),
                container_id: "c".into(),
                image: Some(format!("reg/app:{served}")),
                pull: Some(Pull {
                    start_ns: 1100 * ms,
                    end_ns: 1100 * ms + pull_ns,
                    source: crate::starts::pods::FROM_PROXY.into(),
                    served: Some(served.into()),
                }),
                created_ns: 1100 * ms + pull_ns,
                started_ns: Some(1100 * ms + pull_ns),
                first_log_ns: Some(1100 * ms + pull_ns + log_ns),
                phases: Phases {
                    sandbox: Some(0.1),
                    pull: Some(pull_s),
                    create: Some(0.0),
                    start: Some(0.0),
                    first_log: Some(log_s),
                    total: Some(0.1 + pull_s + log_s),
                },
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn the_comparison_shows_the_pull_shrinking_the_first_log_growing_and_the_net() {
        let timelines = vec![
            pod("a", "unpacked", 9.9, 0.1),
            pod("a", "unpacked", 9.9, 0.1),
            pod("a", "streamed", 0.9, 1.1),
        ];
        let by: GroupBy = "served".parse().expect("the test's own setup");
        let report = PodReport::build(timelines, Some(&by));
        let c = report.comparison.as_ref().expect("the test's own setup");
        assert_eq!(c.groups[0].group, "streamed");
        assert_eq!(c.groups[1].group, "unpacked");
        assert!((c.p50_change[1]["pull"] - 9.0).abs() < 1e-9);
        assert!((c.p50_change[1]["first_log"] + 1.0).abs() < 1e-9);
        let ratio = c.total_p50_ratio[1].expect("the test's own setup");
        assert!((ratio - 10.1 / 2.1).abs() < 1e-9, "{ratio}");
        let text = report.render_text();
        assert!(text.contains("3 pods, 3 container starts"), "{text}");
        assert!(text.contains("unpacked against streamed: median"), "{text}");
        assert!(
            text.contains("pull image-proxy +100.0ms..+10.0s (unpacked)"),
            "{text}"
        );
    }
}
