//! Getting chunks: from the cache when it has them, else from the image source, once.
//!
//! Reads come from FUSE worker threads (synchronous), so the fetcher is synchronous at its
//! surface and drives the async source on a tokio runtime handle. Concurrent requests for the
//! same chunk are merged (one fetch, every waiter gets its result); the chunks one read needs
//! that sit next to each other in the blob are fetched with one range request; every fetch has
//! the read's deadline, after which the read fails instead of hanging. Fetched chunks are
//! checked against their digests before anyone sees them, then cached.
//!
//! Background downloads mark themselves as such and yield: while any on-demand fetch is
//! running they wait, so a container's reads never queue behind the bulk download.

use std::{
    collections::HashMap,
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

pub mod background;
pub mod layer;
pub mod prefetch;

use serde::Serialize;

use crate::{
    cache::ChunkCache,
    image::estargz::{self, Chunk},
    oci::digest::Digest,
    registry::{BlobSource, RegistryError},
};

/// Errors fetching a chunk.
/// Clone, because one fetch's result goes to every reader waiting on it: causes are shared.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    #[error("no answer for chunk {0} before the read's deadline")]
    Deadline(Digest),
    #[error("fetching chunk {digest}")]
    Source {
        digest: Digest,
        #[source]
        source: Arc<RegistryError>,
    },
    #[error("chunk {digest} as fetched is not what the TOC describes")]
    Chunk {
        digest: Digest,
        #[source]
        source: Arc<estargz::EstargzError>,
    },
}

impl FetchError {
    /// Whether the same read may succeed if tried again: a deadline passed or the source's
    /// failure is retryable (network trouble, 5xx), as opposed to a definite answer (404, a
    /// chunk that does not match its digest).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Deadline(_) => true,
            Self::Source { source, .. } => source.is_retryable(),
            Self::Chunk { .. } => false,
        }
    }
}

/// Whether a fetch serves a reader now or fills the cache in the background.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    OnDemand,
    Background,
}

/// Counters, for logs, tests and metrics. Each fetcher keeps its own (one image's figures)
/// and also adds to the agent's totals when it was given them ([`Fetcher::with_totals`]),
/// which `/metrics` exports.
#[derive(Debug, Default, Serialize)]
pub struct FetchStats {
    /// Range requests sent to the source.
    pub requests: AtomicU64,
    /// Compressed bytes received from the source.
    pub bytes: AtomicU64,
    /// Of `requests` and `bytes`: those of the background download.
    pub background_requests: AtomicU64,
    pub background_bytes: AtomicU64,
    /// Chunks served from the cache.
    pub cache_hits: AtomicU64,
    /// Chunks fetched from the source.
    pub chunks_fetched: AtomicU64,
    /// Waiters that joined a fetch already in flight.
    pub merged: AtomicU64,
    /// Reads that failed because their deadline passed (a FUSE or virtio-fs EIO).
    pub deadline_exceeded: AtomicU64,
    pub errors: AtomicU64,
}

/// A chunk being fetched; waiters block on `ready`.
#[derive(Default)]
struct Inflight {
    result: Mutex<Option<Result<Arc<Vec<u8>>, FetchError>>>,
    ready: Condvar,
}

/// Verified chunks kept in memory, so that the consecutive reads a chunk serves (FUSE reads
/// are at most 1 MiB, chunks up to 4 MiB) do not each read and check it again. First in,
/// first out: sequential readers are what it is for.
struct Recent {
    map: HashMap<Digest, Arc<Vec<u8>>>,
    order: std::collections::VecDeque<Digest>,
    bytes: usize,
    cap: usize,
}

impl Recent {
    fn get(&self, digest: &Digest) -> Option<Arc<Vec<u8>>> {
        self.map.get(digest).cloned()
    }

    fn insert(&mut self, digest: Digest, data: Arc<Vec<u8>>) {
        if data.len() > self.cap || self.map.contains_key(&digest) {
            return;
        }
        while self.bytes + data.len() > self.cap {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(gone) = self.map.remove(&old) {
                self.bytes -= gone.len();
            }
        }
        self.bytes += data.len();
        self.order.push_back(digest);
        self.map.insert(digest, data);
    }
}

/// Bytes of verified chunks the fetcher keeps in memory.
const RECENT_BYTES: usize = 16 << 20;

/// Fetches chunks of the blobs of one source.
pub struct Fetcher {
    recent: Mutex<Recent>,
    runtime: tokio::runtime::Handle,
    source: Arc<dyn BlobSource>,
    cache: Arc<ChunkCache>,
    inflight: Mutex<HashMap<Digest, Arc<Inflight>>>,
    ondemand: AtomicUsize,
    ondemand_done: (Mutex<()>, Condvar),
    /// When the last on-demand fetch ended, in ns since `born` (`u64::MAX`: never).
    last_ondemand_ns: AtomicU64,
    born: Instant,
    warned_cache: Arc<std::sync::atomic::AtomicBool>,
    /// Chunks fetched for readers, on their way to the cache: a reader gets its data before
    /// its chunk is written. `None` if the writer thread could not start.
    writes: Option<Writer>,
    pub stats: FetchStats,
    /// The agent's totals, which every fetcher adds to as well.
    totals: Option<Arc<FetchStats>>,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("source", &self.source.name())
            .finish_non_exhaustive()
    }
}

/// One chunk to get: where it is (blob and member range) and what it must hash to.
#[derive(Clone, Debug)]
pub struct ChunkRef<'a> {
    pub blob: Digest,
    pub chunk: &'a Chunk,
}

impl Fetcher {
    pub fn new(
        runtime: tokio::runtime::Handle,
        source: Arc<dyn BlobSource>,
        cache: Arc<ChunkCache>,
    ) -> Self {
        let warned_cache = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writes = Writer::spawn(cache.clone(), warned_cache.clone());
        Self {
            recent: Mutex::new(Recent {
                map: HashMap::new(),
                order: Default::default(),
                bytes: 0,
                cap: RECENT_BYTES,
            }),
            runtime,
            source,
            cache,
            inflight: Mutex::new(HashMap::new()),
            ondemand: AtomicUsize::new(0),
            last_ondemand_ns: AtomicU64::new(u64::MAX),
            born: Instant::now(),
            writes,
            warned_cache,
            ondemand_done: (Mutex::new(()), Condvar::new()),
            stats: FetchStats::default(),
            totals: None,
        }
    }

    /// Also counts into `totals` (the agent's figures across images, for `/metrics`).
    pub fn with_totals(mut self, totals: Arc<FetchStats>) -> Self {
        self.totals = Some(totals);
        self
    }

    /// Adds `n` to one counter of this fetcher's stats and of the agent's totals.
    fn count(&self, counter: fn(&FetchStats) -> &AtomicU64, n: u64) {
        counter(&self.stats).fetch_add(n, Ordering::Relaxed);
        if let Some(totals) = &self.totals {
            counter(totals).fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn cache(&self) -> &Arc<ChunkCache> {
        &self.cache
    }

    pub fn source(&self) -> &Arc<dyn BlobSource> {
        &self.source
    }

    /// The data of `chunks` (in order), from the cache or the source, by `deadline`.
    pub fn get(
        &self,
        chunks: &[ChunkRef<'_>],
        priority: Priority,
        deadline: Instant,
    ) -> Result<Vec<Arc<Vec<u8>>>, FetchError> {
        let result = self.get_by(chunks, priority, deadline);
        if let Err(FetchError::Deadline(_)) = &result {
            self.count(|s| &s.deadline_exceeded, 1);
        }
        result
    }

    fn get_by(
        &self,
        chunks: &[ChunkRef<'_>],
        priority: Priority,
        deadline: Instant,
    ) -> Result<Vec<Arc<Vec<u8>>>, FetchError> {
        let _guard = (priority == Priority::OnDemand).then(|| OnDemand::enter(self));
        if priority == Priority::Background {
            self.yield_to_readers(deadline);
        }
        let mut out: Vec<Option<Arc<Vec<u8>>>> = vec![None; chunks.len()];
        let mut mine = Vec::new();
        let mut waits = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            if let Some(data) = crate::sync::lock(&self.recent).get(&c.chunk.digest) {
                self.count(|s| &s.cache_hits, 1);
                out[i] = Some(data);
                continue;
            }
            if let Ok(Some(data)) = self.cache.get(&c.chunk.digest) {
                self.count(|s| &s.cache_hits, 1);
                let data = Arc::new(data);
                if priority == Priority::OnDemand {
                    crate::sync::lock(&self.recent).insert(c.chunk.digest, data.clone());
                }
                out[i] = Some(data);
                continue;
            }
            let mut map = crate::sync::lock(&self.inflight);
            match map.get(&c.chunk.digest) {
                Some(flight) => {
                    self.count(|s| &s.merged, 1);
                    waits.push((i, flight.clone()));
                }
                None => {
                    let flight = Arc::new(Inflight::default());
                    map.insert(c.chunk.digest, flight.clone());
                    mine.push((i, flight));
                }
            }
        }
        if !mine.is_empty() {
            let wanted: Vec<(usize, &ChunkRef<'_>)> =
                mine.iter().map(|(i, _)| (*i, &chunks[*i])).collect();
            let results = self.fetch_runs(&wanted, deadline, priority);
            if priority == Priority::OnDemand {
                // The next reads of a container usually want the rest of what it just read.
                let mut recent = crate::sync::lock(&self.recent);
                for ((i, _), result) in mine.iter().zip(&results) {
                    if let Ok(data) = result {
                        recent.insert(chunks[*i].chunk.digest, data.clone());
                    }
                }
            }
            // Every flight this call opened is completed and its waiters woken, whatever
            // the results: a flight left open would make every later read of its chunk wait
            // out its deadline, for the life of the mount.
            let mut first_error = None;
            let mut map = crate::sync::lock(&self.inflight);
            for ((i, flight), result) in mine.iter().zip(results) {
                map.remove(&chunks[*i].chunk.digest);
                *crate::sync::lock(&flight.result) = Some(result.clone());
                flight.ready.notify_all();
                match result {
                    Ok(data) => out[*i] = Some(data),
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
            drop(map);
            if let Some(e) = first_error {
                return Err(e);
            }
        }
        for (i, flight) in waits {
            out[i] = Some(wait(&flight, chunks[i].chunk.digest, deadline)?);
        }
        Ok(out
            .into_iter()
            .map(|d| d.expect("every chunk resolved"))
            .collect())
    }

    /// Fetches the given chunks, one range request per run of members adjacent in a blob.
    fn fetch_runs(
        &self,
        wanted: &[(usize, &ChunkRef<'_>)],
        deadline: Instant,
        priority: Priority,
    ) -> Vec<Result<Arc<Vec<u8>>, FetchError>> {
        let mut results = Vec::with_capacity(wanted.len());
        let mut i = 0;
        while i < wanted.len() {
            let mut j = i;
            while j + 1 < wanted.len()
                && wanted[j + 1].1.blob == wanted[j].1.blob
                && wanted[j + 1].1.chunk.blob_offset == wanted[j].1.chunk.blob_end
            {
                j += 1;
            }
            let run = &wanted[i..=j];
            let (blob, start, end) = (
                run[0].1.blob,
                run[0].1.chunk.blob_offset,
                run[run.len() - 1].1.chunk.blob_end,
            );
            tracing::trace!(
                target: "imgstream::reads",
                %blob,
                start,
                bytes = end - start,
                chunks = run.len(),
                "range request"
            );
            let left = deadline.saturating_duration_since(Instant::now());
            let source = self.source.clone();
            let fetched = self.runtime.block_on(async move {
                tokio::time::timeout(
                    left.max(Duration::from_millis(1)),
                    source.read_range(&blob, start..end),
                )
                .await
            });
            match fetched {
                Err(_) => {
                    self.count(|s| &s.errors, 1);
                    results.extend(
                        run.iter()
                            .map(|(_, c)| Err(FetchError::Deadline(c.chunk.digest))),
                    );
                }
                Ok(Err(e)) => {
                    self.count(|s| &s.errors, 1);
                    let source = Arc::new(e);
                    results.extend(run.iter().map(|(_, c)| {
                        Err(FetchError::Source {
                            digest: c.chunk.digest,
                            source: source.clone(),
                        })
                    }));
                }
                Ok(Ok(bytes)) => {
                    self.count(|s| &s.requests, 1);
                    self.count(|s| &s.bytes, bytes.len() as u64);
                    if priority == Priority::Background {
                        self.count(|s| &s.background_requests, 1);
                        self.count(|s| &s.background_bytes, bytes.len() as u64);
                    }
                    for (_, c) in run {
                        let member = &bytes[(c.chunk.blob_offset - start) as usize
                            ..(c.chunk.blob_end - start) as usize];
                        results.push(match estargz::decode_chunk(member, c.chunk) {
                            Ok(data) => {
                                self.count(|s| &s.chunks_fetched, 1);
                                let data = Arc::new(data);
                                self.store(c.chunk.digest, &data, priority);
                                Ok(data)
                            }
                            Err(e) => {
                                self.count(|s| &s.errors, 1);
                                Err(FetchError::Chunk {
                                    digest: c.chunk.digest,
                                    source: Arc::new(e),
                                })
                            }
                        });
                    }
                }
            }
            i = j + 1;
        }
        results
    }

    /// Caches a fetched chunk: for a reader, through the writer thread (written inline when
    /// its queue is full, so nothing fetched is dropped); for the background, inline.
    fn store(&self, digest: Digest, data: &Arc<Vec<u8>>, priority: Priority) {
        if priority == Priority::OnDemand
            && let Some(writes) = &self.writes
            && writes.queue(digest, data)
        {
            return;
        }
        put(&self.cache, &self.warned_cache, &digest, data);
    }

    /// Waits until every chunk fetched so far is in the cache (or failed to be written).
    pub fn flush_cache_writes(&self) {
        if let Some(writes) = &self.writes {
            writes.flush();
        }
    }

    /// Blocks a background fetch while on-demand fetches run (bounded by `deadline`).
    fn yield_to_readers(&self, deadline: Instant) {
        let (lock, cv) = &self.ondemand_done;
        let mut guard = crate::sync::lock(lock);
        while self.ondemand.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(50));
            guard = cv.wait_timeout(guard, left).expect("yield lock").0;
        }
    }

    /// Waits (until `deadline`) for the on-demand reads to go quiet: none running, and none
    /// ended in the last `quiet`. The background download calls it before each batch so that
    /// a starting container's burst of reads has the link to itself.
    pub fn wait_quiet(&self, quiet: Duration, deadline: Instant) {
        loop {
            let active = self.ondemand.load(Ordering::Acquire) > 0;
            let last = self.last_ondemand_ns.load(Ordering::Acquire);
            let since = (last != u64::MAX).then(|| {
                self.born
                    .elapsed()
                    .saturating_sub(Duration::from_nanos(last))
            });
            let recent = since.is_some_and(|s| s < quiet);
            if (!active && !recent) || Instant::now() >= deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// On-demand fetches running now.
    pub fn active_readers(&self) -> usize {
        self.ondemand.load(Ordering::Acquire)
    }
}

/// Bytes of chunks queued for the writer thread at most; beyond, readers write inline (so
/// a slow disk costs readers time, never memory).
const MAX_QUEUED_BYTES: usize = 32 << 20;

/// What the writer thread is asked to do.
enum WriteJob {
    Put(Digest, Arc<Vec<u8>>),
    /// Answered once every chunk queued before it is written.
    Flush(std::sync::mpsc::SyncSender<()>),
}

/// The writer thread's queue.
struct Writer {
    tx: Option<std::sync::mpsc::SyncSender<WriteJob>>,
    queued: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    /// Starts the thread that writes readers' chunks to the cache. When the writer is
    /// dropped, the thread writes what is queued and is joined: nothing fetched is lost.
    fn spawn(cache: Arc<ChunkCache>, warned: Arc<std::sync::atomic::AtomicBool>) -> Option<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<WriteJob>(1024);
        let queued = Arc::new(AtomicUsize::new(0));
        let written = queued.clone();
        let thread = std::thread::Builder::new()
            .name("cache-writer".into())
            .spawn(move || {
                for job in rx {
                    match job {
                        WriteJob::Put(digest, data) => {
                            put(&cache, &warned, &digest, &data);
                            written.fetch_sub(data.len(), Ordering::AcqRel);
                        }
                        WriteJob::Flush(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            })
            .inspect_err(
                |err| tracing::warn!(%err, "no cache writer thread: readers write chunks themselves"),
            )
            .ok()?;
        Some(Self {
            tx: Some(tx),
            queued,
            thread: Some(thread),
        })
    }

    /// Queues a chunk; false when the queue is full (the caller writes it).
    fn queue(&self, digest: Digest, data: &Arc<Vec<u8>>) -> bool {
        let Some(tx) = &self.tx else { return false };
        let len = data.len();
        if self.queued.fetch_add(len, Ordering::AcqRel) + len > MAX_QUEUED_BYTES
            || tx.try_send(WriteJob::Put(digest, data.clone())).is_err()
        {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Waits until every chunk queued so far is written (or the thread is gone).
    fn flush(&self) {
        let Some(tx) = &self.tx else { return };
        let (done_tx, done_rx) = std::sync::mpsc::sync_channel(1);
        if tx.send(WriteJob::Flush(done_tx)).is_ok() {
            // An error means the thread ended: nothing is left to wait for.
            let _ = done_rx.recv();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Writes a chunk to the cache. A failure is reported loudly the first time, quietly after
/// (a full disk would otherwise log once per chunk); reads go on from the network either way.
fn put(cache: &ChunkCache, warned: &std::sync::atomic::AtomicBool, digest: &Digest, data: &[u8]) {
    if let Err(err) = cache.put(digest, data) {
        if !warned.swap(true, Ordering::Relaxed) {
            tracing::error!(%err, dir = %cache.dir().display(), "chunks cannot be cached; reads keep working from the network");
        } else {
            tracing::debug!(%err, "chunk not cached");
        }
    }
}

/// Counts an on-demand fetch for as long as it lives.
struct OnDemand<'a>(&'a Fetcher);

impl<'a> OnDemand<'a> {
    fn enter(fetcher: &'a Fetcher) -> Self {
        fetcher.ondemand.fetch_add(1, Ordering::AcqRel);
        Self(fetcher)
    }
}

impl Drop for OnDemand<'_> {
    fn drop(&mut self) {
        let now = self.0.born.elapsed().as_nanos() as u64;
        self.0.last_ondemand_ns.store(now, Ordering::Release);
        if self.0.ondemand.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.ondemand_done.1.notify_all();
        }
    }
}

fn wait(flight: &Inflight, digest: Digest, deadline: Instant) -> Result<Arc<Vec<u8>>, FetchError> {
    let mut result = crate::sync::lock(&flight.result);
    loop {
        if let Some(r) = result.as_ref() {
            return r.clone();
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(FetchError::Deadline(digest));
        }
        result = flight
            .ready
            .wait_timeout(result, left)
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0;
    }
}

#[cfg(test)]
mod tests {
    use std::{ops::Range, path::Path, sync::atomic::AtomicUsize};

    use async_trait::async_trait;
    use bytes::Bytes;

    use super::*;
    use crate::{
        cache::CacheConfig,
        image::{
            estargz::{self, EstargzWriter, FOOTER_SIZE, LayerIndex, WriterOptions},
            tar::{Header, Kind},
        },
        oci::manifest::Descriptor,
        registry::{FetchedManifest, RegistryError},
    };

    /// The fetcher's test double for a registry: one blob in memory, slow range reads, every
    /// request counted.
    struct SlowBlob {
        blob: Vec<u8>,
        ranges: AtomicUsize,
        delay: Duration,
        /// The first this many range requests fail with a 503.
        failures: AtomicUsize,
    }

    #[async_trait]
    impl BlobSource for SlowBlob {
        async fn manifest(&self, _: &str) -> Result<FetchedManifest, RegistryError> {
            unreachable!("not used by the fetcher")
        }
        async fn blob(&self, _: &Descriptor) -> Result<Bytes, RegistryError> {
            unreachable!("not used by the fetcher")
        }
        async fn blob_to_file(&self, _: &Descriptor, _: &Path) -> Result<(), RegistryError> {
            unreachable!("not used by the fetcher")
        }
        async fn read_range(&self, _: &Digest, range: Range<u64>) -> Result<Bytes, RegistryError> {
            self.ranges.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            let fail = self
                .failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
            if fail.is_ok() {
                return Err(RegistryError::Status {
                    url: "test".into(),
                    status: 503,
                    body: String::new(),
                });
            }
            Ok(Bytes::copy_from_slice(
                &self.blob[range.start as usize..range.end as usize],
            ))
        }
        fn name(&self) -> String {
            "slow test blob".into()
        }
    }

    fn layer() -> (Vec<u8>, LayerIndex) {
        let mut w = EstargzWriter::new(
            Vec::new(),
            WriterOptions {
                chunk_size: 4096,
                level: 1,
            },
        );
        let data: Vec<u8> = (0..16_384u32).map(|i| (i * 31 % 251) as u8).collect();
        let mut h = Header::new("f", Kind::Regular);
        h.size = data.len() as u64;
        w.append(&h, &mut data.as_slice()).unwrap();
        let (blob, _) = w.finish().unwrap();
        let size = blob.len() as u64;
        let toc_offset = estargz::parse_footer(&blob[blob.len() - FOOTER_SIZE as usize..]).unwrap();
        let (index, _) = estargz::read_toc(
            &blob[toc_offset as usize..(size - FOOTER_SIZE) as usize],
            toc_offset,
            size,
            None,
        )
        .unwrap();
        (blob, index)
    }

    #[test]
    fn concurrent_reads_of_one_chunk_make_one_request_and_adjacent_chunks_share_one() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let (blob, index) = layer();
        let source = Arc::new(SlowBlob {
            blob: blob.clone(),
            ranges: AtomicUsize::new(0),
            delay: Duration::from_millis(300),
            failures: AtomicUsize::new(0),
        });
        let dir = std::env::temp_dir().join(format!("imgstream-fetch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cache = Arc::new(
            ChunkCache::open(&CacheConfig {
                dir: dir.clone(),
                limit_bytes: None,
                prefer_uring: false,
            })
            .unwrap(),
        );
        let fetcher = Arc::new(Fetcher::new(
            runtime.handle().clone(),
            source.clone(),
            cache.clone(),
        ));
        let node = index.get("f").unwrap().clone();
        let blob_digest = Digest::of(b"the blob");
        let deadline = Instant::now() + Duration::from_secs(10);

        // Two readers of chunk 0 at once: one request, one merged waiter.
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (fetcher, node) = (fetcher.clone(), node.clone());
                std::thread::spawn(move || {
                    let refs = [ChunkRef {
                        blob: blob_digest,
                        chunk: &node.chunks[0],
                    }];
                    fetcher.get(&refs, Priority::OnDemand, deadline).unwrap()[0].clone()
                })
            })
            .collect();
        let got: Vec<_> = readers.into_iter().map(|r| r.join().unwrap()).collect();
        assert!(got[0] == got[1]);
        assert_eq!(
            source.ranges.load(Ordering::SeqCst),
            1,
            "one request for two readers"
        );
        assert_eq!(fetcher.stats.merged.load(Ordering::Relaxed), 1);

        // Chunks 1..4 are adjacent members: one request for all three.
        let refs: Vec<_> = node.chunks[1..4]
            .iter()
            .map(|chunk| ChunkRef {
                blob: blob_digest,
                chunk,
            })
            .collect();
        let data = fetcher.get(&refs, Priority::OnDemand, deadline).unwrap();
        assert_eq!(data.len(), 3);
        assert_eq!(
            source.ranges.load(Ordering::SeqCst),
            2,
            "coalesced into one range request"
        );
        // Readers' chunks are cached by the writer thread; a flush waits for it.
        fetcher.flush_cache_writes();
        for chunk in &node.chunks[..4] {
            assert!(cache.contains(&chunk.digest), "fetched chunks are cached");
        }

        // A deadline far shorter than the source's answer: an error, not a hang.
        let fresh = index.get("f").unwrap().chunks[0].clone();
        let stuck = Arc::new(SlowBlob {
            blob,
            ranges: AtomicUsize::new(0),
            delay: Duration::from_secs(30),
            failures: AtomicUsize::new(0),
        });
        let other = Fetcher::new(
            runtime.handle().clone(),
            stuck,
            Arc::new(
                ChunkCache::open(&CacheConfig {
                    dir: dir.join("other"),
                    limit_bytes: None,
                    prefer_uring: false,
                })
                .unwrap(),
            ),
        );
        let started = Instant::now();
        let err = other
            .get(
                &[ChunkRef {
                    blob: blob_digest,
                    chunk: &fresh,
                }],
                Priority::OnDemand,
                Instant::now() + Duration::from_millis(50),
            )
            .unwrap_err();
        assert!(matches!(err, FetchError::Deadline(_)), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "returned at its deadline"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_chunk_leaves_no_flight_behind_for_the_next_reads() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let (blob, index) = layer();
        // The first range request fails (a 503), then the registry answers again.
        let source = Arc::new(SlowBlob {
            blob,
            ranges: AtomicUsize::new(0),
            delay: Duration::from_millis(10),
            failures: AtomicUsize::new(1),
        });
        let dir = std::env::temp_dir().join(format!("imgstream-fetch-fail-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cache = Arc::new(
            ChunkCache::open(&CacheConfig {
                dir: dir.clone(),
                limit_bytes: None,
                prefer_uring: false,
            })
            .unwrap(),
        );
        let fetcher = Fetcher::new(runtime.handle().clone(), source.clone(), cache);
        let node = index.get("f").unwrap().clone();
        let blob_digest = Digest::of(b"the blob");
        let chunk = |n: usize| ChunkRef {
            blob: blob_digest,
            chunk: &node.chunks[n],
        };
        // Chunks 0 and 1 are adjacent: one range request for both, and it fails.
        let deadline = Instant::now() + Duration::from_secs(10);
        let err = fetcher
            .get(&[chunk(0), chunk(1)], Priority::OnDemand, deadline)
            .unwrap_err();
        assert!(matches!(err, FetchError::Source { .. }), "{err}");
        assert!(err.is_retryable(), "a 503 is worth another try: {err}");
        assert_eq!(source.ranges.load(Ordering::SeqCst), 1);
        // The registry is back: the next read of chunk 1 fetches it with one request. A
        // flight left open by the failed read would make it wait out its deadline instead.
        let data = fetcher
            .get(
                &[chunk(1)],
                Priority::OnDemand,
                Instant::now() + Duration::from_secs(2),
            )
            .unwrap();
        assert_eq!(*data[0], {
            let c = &node.chunks[1];
            (0..16_384u32)
                .map(|i| (i * 31 % 251) as u8)
                .collect::<Vec<_>>()[c.file_offset as usize..(c.file_offset + c.size) as usize]
                .to_vec()
        });
        assert_eq!(source.ranges.load(Ordering::SeqCst), 2, "one more request");
        assert_eq!(fetcher.stats.deadline_exceeded.load(Ordering::Relaxed), 0);
        drop(fetcher);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
