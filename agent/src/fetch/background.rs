//! The background download: every chunk of every layer into the cache, started at mount,
//! yielding to on-demand reads, with a concurrency and an optional bandwidth cap. It is
//! resumable for free: chunks already in the cache are looked for (a stat each), never read
//! or fetched again. When it has
//! finished, no read touches the network.

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use serde::Serialize;

use super::{ChunkRef, Fetcher, Priority, whole};
use crate::{
    fetch::layer::RemoteLayer, image::estargz::Chunk, oci::digest::Digest, shutdown::Shutdown,
};

/// Most compressed bytes one background request asks for.
const MAX_BATCH_BYTES: u64 = 4 << 20;
/// Tries of a batch that fails (a 5xx, a timeout, a connection reset) before its chunks are
/// left on demand.
const BATCH_TRIES: u32 = 4;
/// Wait before the second try; doubled for each next one.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);

/// How the background download runs.
#[derive(Clone, Copy, Debug)]
pub struct BackgroundConfig {
    /// Parallel requests.
    pub concurrency: usize,
    /// Cap in bytes per second; `None` for none.
    pub bandwidth: Option<u64>,
    /// Wait this long after the start before the first batch (a container that is about to
    /// start reads first).
    pub start_delay: Duration,
    /// Start a batch only when on-demand reads have been quiet this long.
    pub quiet: Duration,
}

impl Default for BackgroundConfig {
    fn default() -> Self {
        Self {
            concurrency: 4,
            bandwidth: None,
            start_delay: Duration::ZERO,
            quiet: Duration::ZERO,
        }
    }
}

/// Progress, readable while it runs.
#[derive(Debug, Default, Serialize)]
pub struct Progress {
    pub chunks_total: AtomicUsize,
    pub chunks_done: AtomicUsize,
    pub bytes_total: AtomicU64,
    pub bytes_done: AtomicU64,
    pub failed_batches: AtomicUsize,
    /// Layers read through and found not to be what their descriptors name.
    pub quarantined: AtomicUsize,
    pub finished: AtomicBool,
    #[serde(skip)]
    on_finished: FinishHook,
}

/// What to do once the whole image is cached.
#[derive(Default)]
struct FinishHook(std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>);

impl std::fmt::Debug for FinishHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FinishHook")
    }
}

impl Progress {
    /// Runs `hook` once the whole image is cached (now, if it already is). Not run when the
    /// download stops unfinished.
    pub fn when_finished(&self, hook: impl FnOnce() + Send + 'static) {
        let mut slot = crate::sync::lock(&self.on_finished.0);
        if self.finished.load(Ordering::Acquire) {
            drop(slot);
            hook();
        } else {
            *slot = Some(Box::new(hook));
        }
    }

    fn finish(&self) {
        let hook = {
            let mut slot = crate::sync::lock(&self.on_finished.0);
            self.finished.store(true, Ordering::Release);
            slot.take()
        };
        if let Some(hook) = hook {
            hook();
        }
    }
}

/// A run of adjacent chunks of one blob.
struct Batch {
    blob: Digest,
    chunks: Vec<Chunk>,
}

/// One piece of the background download: a batch of an eStargz layer, or a plain gzip
/// layer served through its span index, read through whole ([`whole`]).
enum Job {
    Batch(Batch),
    Whole(usize),
}

impl Job {
    /// The compressed bytes the job fetches.
    fn bytes(&self, layers: &[RemoteLayer]) -> u64 {
        match self {
            Job::Batch(b) => b.chunks.iter().map(|c| c.blob_end - c.blob_offset).sum(),
            Job::Whole(l) => layers[*l].desc.size,
        }
    }

    /// The distinct chunks it brings into the cache.
    fn chunks(&self, layers: &[RemoteLayer]) -> usize {
        match self {
            Job::Batch(b) => b.chunks.len(),
            Job::Whole(l) => whole::cuts(&layers[*l]).len(),
        }
    }
}

/// Starts the download on `config.concurrency` threads; returns its progress and a handle
/// that finishes when everything is cached, or shutdown is triggered.
pub fn spawn(
    fetcher: Arc<Fetcher>,
    layers: Arc<[RemoteLayer]>,
    config: BackgroundConfig,
    shutdown: Shutdown,
) -> (Arc<Progress>, thread::JoinHandle<()>) {
    let progress = Arc::new(Progress::default());
    // Under a cap, smaller batches keep the rate smooth (about four per second).
    let max_batch = config.bandwidth.map_or(MAX_BATCH_BYTES, |cap| {
        (cap / 4).clamp(64 << 10, MAX_BATCH_BYTES)
    });
    let jobs = Arc::new(plan(&layers, max_batch));
    progress.chunks_total.store(
        jobs.iter().map(|j| j.chunks(&layers)).sum(),
        Ordering::Relaxed,
    );
    progress.bytes_total.store(
        jobs.iter().map(|j| j.bytes(&layers)).sum(),
        Ordering::Relaxed,
    );
    fetcher.serving(progress.bytes_total.load(Ordering::Relaxed));
    let handle = {
        let progress = progress.clone();
        thread::Builder::new()
            .name("background".into())
            .spawn(move || {
                run(
                    fetcher,
                    layers,
                    jobs,
                    (config, max_batch),
                    shutdown,
                    progress,
                )
            })
            .expect("spawning the background download thread")
    };
    (progress, handle)
}

/// Every distinct chunk of the eStargz layers, in blob order, cut into batches of adjacent
/// members; each layer served through a span index, whole, once.
fn plan(layers: &[RemoteLayer], max_batch: u64) -> Vec<Job> {
    let mut seen = HashSet::new();
    let mut seen_blobs = HashSet::new();
    let mut batches = Vec::new();
    for (l, layer) in layers.iter().enumerate() {
        if layer.indexed {
            if seen_blobs.insert(layer.desc.digest) {
                batches.push(Job::Whole(l));
            }
            continue;
        }
        let mut chunks: Vec<Chunk> = layer
            .index
            .nodes
            .iter()
            .flat_map(|n| n.chunks.iter().cloned())
            .filter(|c| seen.insert(c.digest))
            .collect();
        chunks.sort_by_key(|c| c.blob_offset);
        let mut current: Option<Batch> = None;
        for chunk in chunks {
            match current.as_mut() {
                Some(b)
                    if b.chunks.last().is_some_and(|l| chunk.follows(l))
                        && chunk.blob_end - b.chunks[0].blob_offset <= max_batch =>
                {
                    b.chunks.push(chunk)
                }
                _ => {
                    if let Some(done) = current.take() {
                        batches.push(Job::Batch(done));
                    }
                    current = Some(Batch {
                        blob: layer.desc.digest,
                        chunks: vec![chunk],
                    });
                }
            }
        }
        batches.extend(current.map(Job::Batch));
    }
    batches
}

/// One batch, tried again with exponential backoff while its failure is worth another try
/// and the download is not stopping.
fn fetch_with_retries(
    fetcher: &Fetcher,
    refs: &[ChunkRef<'_>],
    deadline: Instant,
    shutdown: &Shutdown,
) -> Result<(), super::FetchError> {
    let mut backoff = FIRST_BACKOFF;
    let mut tries = 1;
    loop {
        match fetcher.get(refs, Priority::Background, deadline) {
            Ok(_) => return Ok(()),
            Err(err)
                if tries < BATCH_TRIES && err.is_retryable() && !shutdown.wait_timeout(backoff) =>
            {
                let error = crate::error_chain(&err);
                tracing::debug!(%error, tries, "background batch failed; trying it again");
                tries += 1;
                backoff *= 2;
            }
            Err(err) => return Err(err),
        }
    }
}

fn run(
    fetcher: Arc<Fetcher>,
    layers: Arc<[RemoteLayer]>,
    jobs: Arc<Vec<Job>>,
    (config, max_batch): (BackgroundConfig, u64),
    shutdown: Shutdown,
    progress: Arc<Progress>,
) {
    let next = Arc::new(AtomicUsize::new(0));
    let scheduled = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let delay_end = started + config.start_delay;
    while Instant::now() < delay_end && !shutdown.is_triggered() && !fetcher.greedy() {
        thread::sleep(Duration::from_millis(50).min(delay_end - Instant::now()));
    }
    // From here on the download fetches everything: code still waiting for the link to idle
    // would only share it.
    fetcher.stop_filling();
    let workers: Vec<_> = (0..config.concurrency.max(1))
        .map(|i| {
            let (fetcher, layers, jobs, next, progress, shutdown) = (
                fetcher.clone(),
                layers.clone(),
                jobs.clone(),
                next.clone(),
                progress.clone(),
                shutdown.clone(),
            );
            let (scheduled, stop) = (scheduled.clone(), shutdown.clone());
            // Under a cap, each request takes its turn in a shared schedule, starting when
            // the bytes scheduled before it fit the cap; false when the download stops.
            let pace = move |bytes: u64| -> bool {
                let Some(cap) = config.bandwidth else {
                    return true;
                };
                let before = scheduled.fetch_add(bytes, Ordering::Relaxed);
                let due = Duration::from_secs_f64(before as f64 / cap.max(1) as f64);
                due.checked_sub(started.elapsed())
                    .is_none_or(|wait| !stop.wait_timeout(wait))
            };
            thread::Builder::new()
                .name(format!("background-{i}"))
                .spawn(move || {
                    loop {
                        if shutdown.is_triggered() {
                            return;
                        }
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        let Some(job) = jobs.get(n) else { return };
                        match job {
                            Job::Batch(batch) => {
                                run_batch(&fetcher, batch, config, &pace, &shutdown, &progress)
                            }
                            Job::Whole(l) => {
                                let layer = &layers[*l];
                                let depth = config.concurrency.max(1);
                                let outcome = whole::read_through(
                                    &fetcher,
                                    layer,
                                    (depth, max_batch, config.quiet),
                                    &pace,
                                    &shutdown,
                                    &progress,
                                );
                                settle(&fetcher, layer, outcome, &progress);
                            }
                        }
                    }
                })
                .expect("spawning a background download worker")
        })
        .collect();
    for worker in workers {
        let _ = worker.join();
    }
    let failed = progress.failed_batches.load(Ordering::Relaxed);
    if !shutdown.is_triggered() && failed == 0 {
        // Chunks readers fetched count as done here; they may still be queued for the cache.
        fetcher.flush_cache_writes();
        // Fetched is not cached: a cache at its limit refuses writes. Then the image is not
        // whole on disk, and readers still need the network (and their readahead settings).
        let missing = layers
            .iter()
            .flat_map(|l| l.index.nodes.iter().flat_map(|n| n.chunks.iter()))
            .filter(|c| !fetcher.cache().contains(&c.digest))
            .count();
        if missing > 0 {
            tracing::warn!(
                missing,
                secs = started.elapsed().as_secs_f32(),
                "background download done, but the cache did not keep every chunk (its limit?): reads of those still go to the registry"
            );
            return;
        }
        progress.finish();
        fetcher.layer_cached();
        tracing::info!(
            chunks = progress.chunks_done.load(Ordering::Relaxed),
            bytes = progress.bytes_done.load(Ordering::Relaxed),
            secs = started.elapsed().as_secs_f32(),
            "background download complete: the whole image is cached"
        );
    }
}

/// One batch of an eStargz layer, waiting for quiet readers first when asked to.
fn run_batch(
    fetcher: &Fetcher,
    batch: &Batch,
    config: BackgroundConfig,
    pace: &dyn Fn(u64) -> bool,
    shutdown: &Shutdown,
    progress: &Progress,
) {
    let size = |c: &Chunk| c.blob_end - c.blob_offset;
    let bytes: u64 = batch.chunks.iter().map(size).sum();
    // A chunk already on disk is not read again, only looked for: on an image that is
    // cached the download costs a stat per chunk, not a second read of the whole image
    // competing with the containers reading it.
    let refs: Vec<ChunkRef<'_>> = batch
        .chunks
        .iter()
        .filter(|c| !fetcher.cache().contains(&c.digest))
        .map(|chunk| ChunkRef {
            blob: batch.blob,
            chunk,
        })
        .collect();
    if refs.is_empty() {
        progress
            .chunks_done
            .fetch_add(batch.chunks.len(), Ordering::Relaxed);
        progress.bytes_done.fetch_add(bytes, Ordering::Relaxed);
        return;
    }
    if !pace(refs.iter().map(|r| size(r.chunk)).sum()) {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    if !config.quiet.is_zero() {
        fetcher.wait_quiet(config.quiet, deadline, shutdown);
    }
    match fetch_with_retries(fetcher, &refs, deadline, shutdown) {
        Ok(()) => {
            progress
                .chunks_done
                .fetch_add(batch.chunks.len(), Ordering::Relaxed);
            progress.bytes_done.fetch_add(bytes, Ordering::Relaxed);
        }
        Err(err) => {
            progress.failed_batches.fetch_add(1, Ordering::Relaxed);
            let err = crate::error_chain(&err);
            tracing::warn!(%err, "background download batch failed; the chunks stay on demand");
        }
    }
}

/// Records how a layer's read-through ended: a layer that does not match is quarantined.
fn settle(fetcher: &Fetcher, layer: &RemoteLayer, outcome: whole::Outcome, progress: &Progress) {
    let blob = layer.desc.digest;
    match outcome {
        whole::Outcome::Verified => {
            fetcher.count(|s| &s.layers_verified, 1);
            tracing::info!(layer = %blob, "layer read through: it matches its descriptor's digest");
        }
        whole::Outcome::Unfinished(err) => {
            progress.failed_batches.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(layer = %blob, %err, "the layer's background read-through stopped; its spans stay on demand and it is not verified");
        }
        whole::Outcome::Mismatch(err) => {
            progress.failed_batches.fetch_add(1, Ordering::Relaxed);
            progress.quarantined.fetch_add(1, Ordering::Relaxed);
            fetcher.quarantine(layer, &err);
        }
    }
}
