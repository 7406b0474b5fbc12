//! `imgstream agent`: the long-running node agent.
//!
//! - The rename-ENXIO detector: probes -> detector -> one log line and one JSON line per
//!   detection, a flag in the store, and (in a cluster) an Event, annotation and node
//!   condition.
//! - Start latency: lifecycle probes -> tracker -> start records (with pod metadata from CRI)
//!   and pod records (the pod cgroup, the sandbox) in the store and in the metrics; with the
//!   CRI image proxy's pull records, a pod's whole startup (`starts::pods`).
//! - The HTTP API over both.
//!
//! Each probe loop runs on its own blocking thread; CRI and Kubernetes calls go through the
//! async runtime with deadlines, so a slow runtime or API server delays records, never the
//! draining of the kernel's ring buffers for long.

use std::{
    io,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use crate::{
    api::{self, ApiState, Metrics},
    attribution::{CgroupResolver, PodDirectory, Retries},
    config::AgentConfig,
    cri::{Cri, Lookup, image_proxy::ImageProxy},
    detect::{Detection, Detector, Verdict, journal::Journal},
    flag::Flagger,
    probes::{DropCounters, LifecycleDrops, ProbeError, RenameProbes, StartProbes},
    shutdown::Shutdown,
    starts::{
        PodRecord, PullLog, StartRecord, Tracker, Update,
        store::{FlagRecord, Store, StoreError},
    },
};

/// How long the write probes stay attached after the last container waiting for its first
/// log line logged, exited or aged out.
const DISARM_GRACE: Duration = Duration::from_secs(2);
/// How often the probes' maps are swept of entries whose thread or cgroup is gone (see
/// `probes::sweep`).
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// What a container's image fetched for readers from its pod's start to its first log
/// line, when imgstream serves the image.
fn critical_path(
    pod: &PodRecord,
    record: &StartRecord,
    journal: &crate::fetch::journal::FetchJournal,
) -> Option<crate::starts::CriticalPath> {
    let fetched = journal.window(
        record.image.as_deref()?,
        pod.created_ns.unwrap_or(pod.first_ns),
        record.first_log_ns?,
    )?;
    Some(crate::starts::CriticalPath {
        bytes: fetched.bytes,
        requests: fetched.requests,
        fully_cached: fetched.fully_cached,
    })
}

/// Applies a late CRI answer: a sandbox goes to its pod's record (and its start record
/// from the store), a container is named.
fn settle(
    cgroup_id: u64,
    answer: Lookup,
    tracker: &mut Tracker,
    probes: &mut StartProbes,
    shared: &Shared,
) {
    match answer {
        Lookup::Sandbox => {
            if let (Some(record), Some(store)) = (tracker.get(cgroup_id), &shared.state.store)
                && let Err(err) = store.remove_start(record)
            {
                tracing::warn!(%err, "sandbox record not removed from the store");
            }
            shared.pod_update(tracker.sandbox_found(cgroup_id), probes);
        }
        Lookup::Container(meta) => {
            if let Some(record) = tracker.annotate(cgroup_id, |r| r.apply_cri(meta)) {
                shared.store_start(&record);
            }
        }
        Lookup::Unknown => {}
    }
}

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("setting up the probes")]
    Probes(#[from] ProbeError),
    #[error("opening the detections file {0}")]
    OpenOutput(std::path::PathBuf, #[source] io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Api(#[from] api::ApiError),
    #[error(transparent)]
    Snapshotter(#[from] crate::snapshotter::SnapshotterError),
    #[error(transparent)]
    ImageProxy(#[from] crate::cri::image_proxy::ProxyError),
    #[error(transparent)]
    Flag(#[from] Box<crate::flag::FlagError>),
    #[error("a probe loop panicked")]
    LoopPanicked,
}

/// What the loops share.
struct Shared {
    state: Arc<ApiState>,
    pods: PodDirectory,
    flags: Option<tokio::sync::mpsc::Sender<FlagRecord>>,
    /// The pulls the image proxy saw.
    pulls: Arc<PullLog>,
    /// What each lazily served image fetched when.
    journal: Arc<crate::fetch::journal::FetchJournal>,
}

impl Shared {
    fn store_pod(&self, pod: &PodRecord) {
        if let Some(store) = &self.state.store
            && let Err(err) = store.put_pod(pod)
        {
            self.state
                .metrics
                .store_errors
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%err, "pod record not stored");
        }
    }

    /// Applies what the tracker made of a pod's cgroup or sandbox.
    fn pod_update(&self, update: Update, probes: &mut StartProbes) {
        let Update::Pod {
            pod,
            unwatch,
            sandbox,
        } = update
        else {
            if let Update::Unwatch(cgroup) = update {
                probes.unwatch(cgroup);
            }
            return;
        };
        if unwatch != 0 {
            probes.unwatch(unwatch);
        }
        if let (Some(sandbox), Some(store)) = (sandbox, &self.state.store)
            && let Err(err) = store.remove_start(&sandbox)
        {
            tracing::warn!(%err, "sandbox record not removed from the store");
        }
        tracing::debug!(uid = %pod.uid, sandbox = ?pod.sandbox_id, "pod record");
        self.store_pod(&pod);
    }

    fn store_start(&self, record: &StartRecord) {
        if let Some(store) = &self.state.store
            && let Err(err) = store.put_start(record)
        {
            self.state
                .metrics
                .store_errors
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%err, "start record not stored");
        }
    }
}

/// Runs the agent until `shutdown` is triggered.
///
/// The snapshotter comes first and stands alone: containerd waits on it, and no pod on the
/// node starts while it is down. Each other part (the probes, the store, the Kubernetes
/// client, the detections file) that fails is reported on `/healthz` and in the log while
/// the rest runs. Only when nothing would be left running (no snapshotter, and the probes
/// failed) does a failure stop the agent, with its error.
pub async fn run(config: AgentConfig, shutdown: Shutdown) -> Result<(), AgentError> {
    let metrics = Arc::new(Metrics::default());
    let health = crate::api::Health::default();
    let pulls = Arc::new(PullLog::default());
    let journal = Arc::new(crate::fetch::journal::FetchJournal::default());
    let mut disk_usage: Option<crate::cri::image_proxy::DiskUsage> = None;
    let mut served: Option<crate::cri::image_proxy::Served> = None;
    let mut open_ahead: Option<crate::cri::image_proxy::OpenAhead> = None;
    let snapshotter = match config.snapshotter.clone() {
        Some(mut snapshotter) => {
            snapshotter.mount.fetch_totals = Some(metrics.fetch_totals());
            snapshotter.mount.fetch_journal = Some(journal.clone());
            snapshotter.pull_log = Some(pulls.clone());
            let service = crate::snapshotter::Snapshotter::open(snapshotter).await?;
            metrics.watch_cache(service.cache().clone());
            let measured = service.clone();
            disk_usage = Some(Arc::new(move || measured.disk_usage()));
            let asked = service.clone();
            served = Some(Arc::new(move |image: &str| asked.take_served(image)));
            let opener = service.clone();
            open_ahead = Some(Arc::new(move |image: &str| opener.open_ahead(image)));
            let listener = service.listen()?;
            let shutdown = shutdown.clone();
            health.running(SNAPSHOTTER);
            Some(tokio::spawn(async move {
                service
                    .serve(listener, shutdown)
                    .await
                    .map_err(AgentError::from)
            }))
        }
        None => None,
    };
    // Like the snapshotter, kubelet waits on the image proxy: it stands alone too.
    let image_proxy = match config.image_proxy.clone() {
        Some(proxy) => {
            let mut server =
                ImageProxy::new(&proxy.upstream, proxy.keyring)?.with_pull_log(pulls.clone());
            if let Some(usage) = disk_usage.take() {
                server = server.with_disk_usage(usage);
            }
            if let Some(open_ahead) = open_ahead.take() {
                server = server.with_open_ahead(open_ahead);
            }
            if let Some(served) = served.take() {
                let events = match &config.kubernetes {
                    Some(kube) => match crate::flag::PodEvents::new(kube) {
                        Ok(events) => Some(events),
                        Err(err) => {
                            tracing::warn!(%err, "no ImageStreaming Events: the Kubernetes client cannot be set up");
                            None
                        }
                    },
                    None => None,
                };
                server = server.with_served(served, events);
            }
            let listener = ImageProxy::listen(&proxy.socket)?;
            let shutdown = shutdown.clone();
            health.running(IMAGE_PROXY);
            // kubelet can pull nothing without it: its failure stops the agent at once.
            Some(tokio::spawn(async move {
                let served = server.serve(listener, proxy.socket, shutdown.clone()).await;
                if served.is_err() {
                    shutdown.trigger();
                }
                served.map_err(AgentError::from)
            }))
        }
        None => None,
    };
    let alone = snapshotter.is_none() && image_proxy.is_none();
    // A part that failed: the agent's error when nothing else would run, else reported.
    let part_failed = |part: &'static str, err: AgentError| -> Result<(), AgentError> {
        if alone {
            return Err(err);
        }
        health.failed(part, &err, false);
        Ok(())
    };
    let out = match Journal::open(
        config.detections_out.as_deref(),
        crate::detect::journal::DEFAULT_MAX_BYTES,
    ) {
        Ok(out) => Some(out),
        Err(e) => {
            let path = config.detections_out.clone().unwrap_or_default();
            part_failed(DETECTIONS, AgentError::OpenOutput(path, e))?;
            None
        }
    };
    // Probes first: without privileges or tracefs they cannot run, and the error says so.
    let rename = match RenameProbes::attach() {
        Ok(probes) => Some(probes),
        Err(err) => {
            part_failed(RENAME_PROBES, err.into())?;
            None
        }
    };
    let starts = match config.start_latency.then(StartProbes::attach) {
        Some(Ok(probes)) => Some(probes),
        Some(Err(err)) => {
            part_failed(START_PROBES, err.into())?;
            None
        }
        None => None,
    };
    let store = match &config.store {
        Some(path) => match Store::open(path, config.store_max_records) {
            Ok(store) => {
                health.running(STORE);
                Some(Arc::new(store))
            }
            Err(err) => {
                part_failed(STORE, err.into())?;
                None
            }
        },
        None => None,
    };
    let mut cri = Vec::new();
    for path in &config.cri_sockets {
        match Cri::connect(path).await {
            Ok(client) => cri.push(client),
            Err(err) => {
                tracing::warn!(%err, "no pod names, namespaces or images from this runtime: CRI is unreachable");
            }
        }
    }
    let flags = match config.kubernetes.clone() {
        Some(kube) => match Flagger::new(kube).await {
            Ok(mut flagger) => {
                let (tx, mut rx) = tokio::sync::mpsc::channel::<FlagRecord>(256);
                tokio::spawn(async move {
                    while let Some(flag) = rx.recv().await {
                        match flagger.flag(&flag).await {
                            Ok(outcome) => {
                                tracing::info!(?outcome, pod = ?flag.pod.name, path = %flag.path, "pod flag")
                            }
                            Err(err) => tracing::warn!(%err, "flagging the pod failed"),
                        }
                    }
                });
                health.running(KUBERNETES);
                Some(tx)
            }
            Err(err) => {
                part_failed(KUBERNETES, AgentError::Flag(Box::new(err)))?;
                None
            }
        },
        None => None,
    };
    let state = Arc::new(ApiState {
        metrics: metrics.clone(),
        store,
        health,
    });
    if let Some(addr) = config.api_addr {
        api::serve(addr, state.clone(), shutdown.clone()).await?;
    }
    if let Some(store) = &state.store {
        pulls.keep_in(store.clone());
    }
    let shared = Arc::new(Shared {
        state: state.clone(),
        pods: PodDirectory::new(cri, tokio::runtime::Handle::current()),
        flags,
        pulls,
        journal,
    });

    let cgroups = match CgroupResolver::discover() {
        Ok(resolver) => Some(resolver),
        Err(err) => {
            tracing::warn!(%err, "detections will carry no cgroup or container");
            None
        }
    };
    // Each loop reports its own end: a failed one is marked on /healthz, the others go on.
    let mut loops = Vec::new();
    if let Some(rename) = rename {
        let (config, shutdown, shared) = (config.clone(), shutdown.clone(), shared.clone());
        state.health.running(RENAME_PROBES);
        loops.push((
            RENAME_PROBES,
            tokio::task::spawn_blocking(move || {
                rename_loop(
                    rename,
                    Detector::new(cgroups),
                    out,
                    &config,
                    &shutdown,
                    &shared,
                )
            }),
        ));
    }
    if let Some(probes) = starts {
        let (config, shutdown, shared) = (config.clone(), shutdown.clone(), shared.clone());
        state.health.running(START_PROBES);
        loops.push((
            START_PROBES,
            tokio::task::spawn_blocking(move || start_loop(probes, &config, &shutdown, &shared)),
        ));
    }
    let mut failed = None;
    for (part, handle) in loops {
        let err = match handle.await {
            Ok(Ok(())) => continue,
            Ok(Err(err)) => err,
            Err(_) => AgentError::LoopPanicked,
        };
        if alone {
            shutdown.trigger();
            failed.get_or_insert(err);
        } else {
            state.health.failed(part, &err, false);
        }
    }
    // The parts kubelet waits on: a failure of one stops the agent.
    let served = [(SNAPSHOTTER, snapshotter), (IMAGE_PROXY, image_proxy)];
    for (part, handle) in served {
        let Some(handle) = handle else { continue };
        let err = match handle.await {
            Ok(Ok(())) => continue,
            Ok(Err(err)) => err,
            Err(_) => AgentError::LoopPanicked,
        };
        state.health.failed(part, &err, true);
        shutdown.trigger();
        failed.get_or_insert(err);
    }
    match failed {
        Some(err) => Err(err),
        None => Ok(()),
    }
}

/// The parts `/healthz` reports.
const SNAPSHOTTER: &str = "snapshotter";
const IMAGE_PROXY: &str = "image-proxy";
const RENAME_PROBES: &str = "rename-probes";
const START_PROBES: &str = "start-probes";
const STORE: &str = "store";
const KUBERNETES: &str = "kubernetes";
const DETECTIONS: &str = "detections-file";

fn rename_loop(
    mut probes: RenameProbes,
    mut detector: Detector,
    mut out: Option<Journal>,
    config: &AgentConfig,
    shutdown: &Shutdown,
    shared: &Shared,
) -> Result<(), AgentError> {
    let mut drops = DropCounters::default();
    let mut last_sweep = std::time::Instant::now();
    tracing::info!("watching rename, renameat and renameat2 for ENXIO");
    while !shutdown.is_triggered() {
        // An error ends this loop only; `run` decides what it means for the rest.
        let batch = probes.next_batch(config.poll_interval)?;
        for failure in decoded(batch, "rename") {
            match detector.judge(failure) {
                Verdict::Report(detection) => {
                    detection.log();
                    record_flag(&detection, shared);
                    // A detection that cannot be written (disk full) is still logged, counted
                    // and flagged on its pod: the agent goes on.
                    let written = match out.as_mut() {
                        Some(out) => serde_json::to_string(&detection)
                            .map_err(io::Error::other)
                            .and_then(|line| out.write_line(&line)),
                        None => Err(io::Error::other("the detections file could not be opened")),
                    };
                    if let Err(err) = written {
                        shared
                            .state
                            .metrics
                            .detection_write_errors
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%err, "detection not written to the detections file");
                    }
                }
                Verdict::NotSymlink(kind) => {
                    tracing::debug!(?kind, "rename failed with ENXIO, but not on a symlink");
                }
            }
        }
        if last_sweep.elapsed() >= SWEEP_EVERY {
            last_sweep = std::time::Instant::now();
            let swept = probes.sweep();
            if swept > 0 {
                tracing::debug!(swept, "rename in-flight entries of gone threads swept");
            }
        }
        let now = probes.drops();
        if now != drops {
            tracing::warn!(?now, "the kernel side dropped rename events");
            drops = now;
            shared.state.metrics.set_rename_drops(now);
        }
    }
    tracing::info!("rename probes detached");
    Ok(())
}

/// The events of a batch that decoded; the others are logged and skipped.
fn decoded<T>(
    batch: Vec<Result<T, crate::events::DecodeError>>,
    what: &'static str,
) -> impl Iterator<Item = T> {
    batch.into_iter().filter_map(move |event| {
        event
            .inspect_err(|err| tracing::warn!(%err, what, "undecodable event skipped"))
            .ok()
    })
}

/// Stores, counts and (in a cluster) sends a detection as a flag on its pod.
fn record_flag(detection: &Detection, shared: &Shared) {
    let container = detection.container.as_ref();
    let meta = container
        .and_then(|c| shared.pods.lookup(&c.container_id))
        .and_then(|lookup| match lookup {
            Lookup::Container(meta) => Some(meta),
            _ => None,
        });
    let f = &detection.failure;
    let flag = FlagRecord {
        time_ns: crate::time::unix_ns(
            std::time::SystemTime::now()
                - Duration::from_nanos(crate::events::boot_ns_now().saturating_sub(f.boot_ns)),
        ),
        time: detection.time.clone(),
        container_id: container.map(|c| c.container_id.clone()),
        pod: meta
            .as_ref()
            .map(|m| m.pod.clone())
            .unwrap_or_default()
            .or(container.map(|c| c.pod_ref()).unwrap_or_default()),
        image: meta.as_ref().and_then(|m| m.image.clone()),
        path: f.old.path.clone(),
        new_path: f.new.path.clone(),
        syscall: format!("{:?}", f.syscall).to_lowercase(),
        confirmed: detection.confirmed,
    };
    shared.state.metrics.enxio(flag.pod.namespace.as_deref());
    if let Some(store) = &shared.state.store
        && let Err(err) = store.put_flag(&flag)
    {
        shared
            .state
            .metrics
            .store_errors
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%err, "flag not stored");
    }
    if let Some(tx) = &shared.flags
        && tx.try_send(flag).is_err()
    {
        tracing::warn!("the Kubernetes flagger is behind; flag dropped");
    }
}

fn start_loop(
    mut probes: StartProbes,
    config: &AgentConfig,
    shutdown: &Shutdown,
    shared: &Shared,
) -> Result<(), AgentError> {
    let mut tracker = Tracker::new();
    let mut retries = Retries::default();
    let mut last_awaited = std::time::Instant::now();
    let mut drops = LifecycleDrops::default();
    let mut last_sweep = std::time::Instant::now();
    let metrics = &shared.state.metrics;
    tracing::info!("watching container starts");
    while !shutdown.is_triggered() {
        // An error ends this loop only; `run` decides what it means for the rest.
        let batch = probes.next_batch(config.poll_interval)?;
        for event in decoded(batch, "lifecycle") {
            metrics.lifecycle_events.fetch_add(1, Ordering::Relaxed);
            let record = match tracker.apply(&event) {
                Update::Record(record) => *record,
                Update::None => continue,
                update => {
                    shared.pod_update(update, &mut probes);
                    continue;
                }
            };
            use crate::events::LifecycleKind as K;
            if matches!(event.kind, K::Created { .. }) && !probes.writes_armed() {
                // Before anything else: the container's first write must find them attached.
                match probes.arm_writes() {
                    Ok(()) => metrics.write_probes_armed.store(true, Ordering::Relaxed),
                    Err(err) => tracing::warn!(%err, "arming the write probes failed"),
                }
            }
            let mut record = match &event.kind {
                K::Created { .. } => match shared.pods.lookup(&record.container_id) {
                    Some(Lookup::Sandbox) => {
                        shared.pod_update(tracker.sandbox_found(event.cgroup_id), &mut probes);
                        continue;
                    }
                    Some(Lookup::Container(meta)) => tracker
                        .annotate(event.cgroup_id, |r| r.apply_cri(meta))
                        .unwrap_or(record),
                    Some(Lookup::Unknown) => {
                        // Too early for the runtime: ask again shortly.
                        retries.later(event.cgroup_id, &record.container_id);
                        record
                    }
                    None => record,
                },
                _ => record,
            };
            match &event.kind {
                K::Created { .. } => {
                    metrics.start_records.fetch_add(1, Ordering::Relaxed);
                }
                K::Started { program } => {
                    metrics.started(&record);
                    tracing::info!(container = %record.container_id, pod = ?record.pod.name, %program, create_to_start = ?record.create_to_start(), "container started");
                }
                K::FirstLog { fd, .. } => {
                    metrics.first_log(&record);
                    let pod = record
                        .pod
                        .uid
                        .as_deref()
                        .and_then(|uid| tracker.pod(uid))
                        .cloned();
                    if let Some(pod) = pod {
                        record.critical_path = critical_path(&pod, &record, &shared.journal);
                        let critical = record.critical_path;
                        tracker.annotate(event.cgroup_id, |r| r.critical_path = critical);
                        let pulls = shared
                            .pulls
                            .for_container(&pod.uid, record.image.as_deref());
                        let timeline = crate::starts::pods::assemble(
                            &pod,
                            std::slice::from_ref(&record),
                            &pulls,
                        );
                        if let Some(container) = timeline.containers.first() {
                            metrics.pod_phases(container, timeline.namespace.as_deref());
                        }
                    }
                    tracing::info!(container = %record.container_id, pod = ?record.pod.name, fd, start_to_first_log = ?record.start_to_first_log(), "container's first log line");
                }
                K::Exited => {
                    tracing::info!(container = %record.container_id, pod = ?record.pod, logged = record.first_log_ns.is_some(), "container exited");
                }
            }
            shared.store_start(&record);
        }
        for (cgroup_id, answer) in retries.due(&shared.pods) {
            settle(cgroup_id, answer, &mut tracker, &mut probes, shared);
        }
        let now = crate::time::unix_ns(std::time::SystemTime::now());
        if tracker.awaiting_first_log(now, config.first_log_window) > 0 {
            last_awaited = std::time::Instant::now();
        } else if probes.writes_armed() && last_awaited.elapsed() > DISARM_GRACE {
            probes.disarm_writes();
            metrics.write_probes_armed.store(false, Ordering::Relaxed);
        }
        if last_sweep.elapsed() >= SWEEP_EVERY {
            last_sweep = std::time::Instant::now();
            let swept = probes.sweep();
            if swept > 0 {
                tracing::debug!(swept, "watched cgroups that are gone swept");
            }
        }
        let now = probes.drops();
        if now != drops {
            tracing::warn!(?now, "the kernel side dropped lifecycle events");
            drops = now;
            metrics.set_lifecycle_drops(now);
        }
    }
    tracing::info!("start-latency probes detached");
    Ok(())
}
