//! The agent's Prometheus metrics, in the text exposition format (version 0.0.4): the one
//! owner of `/metrics`. The probe side (start latencies, detections, drops) is counted here;
//! the serving side (fetches, cache, virtio-fs) is read from the parts that count it, which
//! register with [`Metrics::watch_cache`] and [`Metrics::watch_virtiofs`] or count into
//! [`Metrics::fetch_totals`].
//!
//! Start latencies are histograms by namespace only: pod names would give every pod its own
//! series and grow without bound.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use super::serving_metrics::Serving;
use crate::{
    cache::ChunkCache,
    fetch::FetchStats,
    fs::virtiofs::VirtioFsStats,
    probes::{DropCounters, LifecycleDrops},
    starts::StartRecord,
    sync::lock,
};

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 15] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

#[derive(Clone, Debug, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, value: f64) {
        for (bound, count) in BUCKETS.iter().zip(self.counts.iter_mut()) {
            if value <= *bound {
                *count += 1;
            }
        }
        self.count += 1;
        self.sum += value;
    }
}

/// Everything the agent counts.
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    start_to_first_log: Mutex<BTreeMap<String, Histogram>>,
    create_to_start: Mutex<BTreeMap<String, Histogram>>,
    /// A pod's startup phases, by (phase, namespace), observed at each container's first
    /// log line.
    pod_phases: Mutex<BTreeMap<(&'static str, String), Histogram>>,
    enxio: Mutex<BTreeMap<String, u64>>,
    pub lifecycle_events: AtomicU64,
    pub start_records: AtomicU64,
    pub store_errors: AtomicU64,
    /// Detections the detections file did not take (a full disk).
    pub detection_write_errors: AtomicU64,
    /// Whether the write programs are attached (a container waits for its first log line).
    pub write_probes_armed: std::sync::atomic::AtomicBool,
    rename_drops: Mutex<DropCounters>,
    lifecycle_drops: Mutex<LifecycleDrops>,
    serving: Mutex<Serving>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            start_to_first_log: Mutex::default(),
            create_to_start: Mutex::default(),
            pod_phases: Mutex::default(),
            enxio: Mutex::default(),
            lifecycle_events: AtomicU64::new(0),
            start_records: AtomicU64::new(0),
            store_errors: AtomicU64::new(0),
            detection_write_errors: AtomicU64::new(0),
            write_probes_armed: std::sync::atomic::AtomicBool::new(false),
            rename_drops: Mutex::default(),
            lifecycle_drops: Mutex::default(),
            serving: Mutex::default(),
        }
    }
}

fn namespace_of(namespace: Option<&str>) -> String {
    namespace.unwrap_or("").to_string()
}

impl Metrics {
    /// A container reached its first exec (`before` is its record before this event).
    pub fn started(&self, record: &StartRecord) {
        if let Some(v) = record.create_to_start() {
            lock(&self.create_to_start)
                .entry(namespace_of(record.pod.namespace.as_deref()))
                .or_default()
                .observe(v);
        }
    }

    /// A container wrote its first log line.
    pub fn first_log(&self, record: &StartRecord) {
        if let Some(v) = record.start_to_first_log() {
            lock(&self.start_to_first_log)
                .entry(namespace_of(record.pod.namespace.as_deref()))
                .or_default()
                .observe(v);
        }
    }

    /// A container of a pod wrote its first log line: its startup phases.
    pub fn pod_phases(
        &self,
        container: &crate::starts::pods::ContainerTimeline,
        namespace: Option<&str>,
    ) {
        let mut phases = lock(&self.pod_phases);
        for (phase, value) in container.phases.named() {
            if let Some(value) = value {
                phases
                    .entry((phase, namespace_of(namespace)))
                    .or_default()
                    .observe(value);
            }
        }
    }

    /// The fetch counters every lazy layer's fetcher adds to (`Fetcher::with_totals`).
    pub fn fetch_totals(&self) -> Arc<FetchStats> {
        lock(&self.serving).fetch.clone()
    }

    /// Exports `cache`'s size, limit and counters.
    pub fn watch_cache(&self, cache: Arc<ChunkCache>) {
        lock(&self.serving).cache = Some(cache);
    }

    /// Exports a virtio-fs backend's counters.
    pub fn watch_virtiofs(&self, stats: Arc<VirtioFsStats>) {
        lock(&self.serving).virtiofs = Some(stats);
    }

    /// A rename-ENXIO detection.
    pub fn enxio(&self, namespace: Option<&str>) {
        *lock(&self.enxio)
            .entry(namespace_of(namespace))
            .or_default() += 1;
    }

    pub fn set_rename_drops(&self, drops: DropCounters) {
        *lock(&self.rename_drops) = drops;
    }

    pub fn set_lifecycle_drops(&self, drops: LifecycleDrops) {
        *lock(&self.lifecycle_drops) = drops;
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let histograms = [
            (
                "imgstream_container_start_to_first_log_seconds",
                "Time from a container's first exec to its first write to stdout or stderr.",
                &self.start_to_first_log,
            ),
            (
                "imgstream_container_create_to_start_seconds",
                "Time from a container's cgroup creation to its first exec.",
                &self.create_to_start,
            ),
        ];
        for (name, help, hist) in histograms {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            let hist = lock(hist);
            for (ns, h) in hist.iter() {
                let ns = escape(ns);
                for (bound, count) in BUCKETS.iter().zip(h.counts) {
                    let _ = writeln!(
                        out,
                        "{name}_bucket{{namespace=\"{ns}\",le=\"{bound}\"}} {count}"
                    );
                }
                let _ = writeln!(
                    out,
                    "{name}_bucket{{namespace=\"{ns}\",le=\"+Inf\"}} {}",
                    h.count
                );
                let _ = writeln!(out, "{name}_sum{{namespace=\"{ns}\"}} {}", h.sum);
                let _ = writeln!(out, "{name}_count{{namespace=\"{ns}\"}} {}", h.count);
            }
        }
        let name = "imgstream_pod_startup_phase_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} A pod's startup by phase, per container at its first log line: sandbox (pod cgroup to sandbox exec), pull (PullImage, or the gap before the container when no pull was seen), create, start (cgroup to exec), first_log (exec to first log line), total (pod cgroup to first log line).\n# TYPE {name} histogram"
        );
        for ((phase, ns), h) in lock(&self.pod_phases).iter() {
            let labels = format!("phase=\"{phase}\",namespace=\"{}\"", escape(ns));
            for (bound, count) in BUCKETS.iter().zip(h.counts) {
                let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {count}");
            }
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", h.count);
            let _ = writeln!(out, "{name}_sum{{{labels}}} {}", h.sum);
            let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.count);
        }
        let name = "imgstream_rename_enxio_total";
        let _ = writeln!(
            out,
            "# HELP {name} Renames of a symlink that failed with ENXIO (the overlayfs regression).\n# TYPE {name} counter"
        );
        for (ns, n) in lock(&self.enxio).iter() {
            let _ = writeln!(out, "{name}{{namespace=\"{}\"}} {n}", escape(ns));
        }
        let name = "imgstream_probe_dropped_total";
        let _ = writeln!(
            out,
            "# HELP {name} Events the eBPF programs could not deliver, by probe and reason.\n# TYPE {name} counter"
        );
        let rename = *lock(&self.rename_drops);
        let lifecycle = *lock(&self.lifecycle_drops);
        for (probe, reason, n) in [
            ("rename", "ring_buffer_full", rename.rename_events_dropped),
            ("rename", "inflight_map_full", rename.rename_inflight_full),
            ("rename", "path_unreadable", rename.rename_path_unreadable),
            ("lifecycle", "ring_buffer_full", lifecycle.events_dropped),
            ("lifecycle", "state_map_full", lifecycle.containers_full),
            (
                "lifecycle",
                "log_fd_unreadable",
                lifecycle.log_fd_unreadable,
            ),
        ] {
            let _ = writeln!(out, "{name}{{probe=\"{probe}\",reason=\"{reason}\"}} {n}");
        }
        for (name, help, kind, value) in [
            (
                "imgstream_lifecycle_events_total",
                "Start-latency events received from the kernel.",
                "counter",
                self.lifecycle_events.load(Ordering::Relaxed) as f64,
            ),
            (
                "imgstream_start_records_total",
                "Container starts recorded.",
                "counter",
                self.start_records.load(Ordering::Relaxed) as f64,
            ),
            (
                "imgstream_store_errors_total",
                "Writes to the local store that failed.",
                "counter",
                self.store_errors.load(Ordering::Relaxed) as f64,
            ),
            (
                "imgstream_detection_write_errors_total",
                "Detections the detections file did not take (they are still logged and flagged).",
                "counter",
                self.detection_write_errors.load(Ordering::Relaxed) as f64,
            ),
            (
                "imgstream_write_probes_armed",
                "1 while the write probes are attached (a container waits for its first log line).",
                "gauge",
                f64::from(u8::from(self.write_probes_armed.load(Ordering::Relaxed))),
            ),
            (
                "imgstream_agent_uptime_seconds",
                "Seconds since the agent started.",
                "gauge",
                self.started.elapsed().as_secs_f64(),
            ),
            (
                "imgstream_agent_resident_memory_bytes",
                "The agent's resident set size.",
                "gauge",
                resident_bytes() as f64,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        lock(&self.serving).render(&mut out);
        let _ = writeln!(
            out,
            "# HELP imgstream_agent_info The agent's version.\n# TYPE imgstream_agent_info gauge\nimgstream_agent_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        out
    }
}

/// Label values escape backslash, double quote and newline.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_labels_escaped() {
        let m = Metrics::default();
        let record = |ns: &str, start: u64, log: u64| StartRecord {
            pod: crate::attribution::PodRef {
                namespace: Some(ns.into()),
                ..Default::default()
            },
            created_ns: 0,
            started_ns: Some(start),
            first_log_ns: Some(log),
            ..Default::default()
        };
        m.first_log(&record("web", 0, 20_000_000)); // 0.02 s
        m.first_log(&record("web", 0, 3_000_000_000)); // 3 s
        m.first_log(&record("a\"b", 0, 1_000_000));
        m.enxio(Some("web"));
        let text = m.render();
        let line = |prefix: &str| {
            text.lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
                .to_string()
        };
        let name = "imgstream_container_start_to_first_log_seconds";
        assert!(line(&format!("{name}_bucket{{namespace=\"web\",le=\"0.01\"}}")).ends_with(" 0"));
        assert!(line(&format!("{name}_bucket{{namespace=\"web\",le=\"0.025\"}}")).ends_with(" 1"));
        assert!(line(&format!("{name}_bucket{{namespace=\"web\",le=\"5\"}}")).ends_with(" 2"));
        assert!(line(&format!("{name}_bucket{{namespace=\"web\",le=\"+Inf\"}}")).ends_with(" 2"));
        assert!(line(&format!("{name}_count{{namespace=\"web\"}}")).ends_with(" 2"));
        assert!(text.contains("namespace=\"a\\\"b\""));
        assert!(line("imgstream_rename_enxio_total{namespace=\"web\"}").ends_with(" 1"));
        assert!(text.contains(
            "imgstream_probe_dropped_total{probe=\"lifecycle\",reason=\"ring_buffer_full\"} 0"
        ));
    }
}
