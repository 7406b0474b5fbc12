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
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

pub mod background;
mod inflight;
pub mod layer;
pub mod prefetch;
mod priority;
#[cfg(test)]
mod tests;

use serde::Serialize;

use inflight::Inflight;
use priority::ReaderGate;

use crate::{
    cache::{ChunkCache, MemoryCache, WriteBehind},
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
    #[error("chunk {digest} is {actual} bytes where the TOC says {expected}")]
    Size {
        digest: Digest,
        expected: u64,
        actual: u64,
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
            Self::Chunk { .. } | Self::Size { .. } => false,
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

/// Bytes of verified chunks the fetcher keeps in memory.
const RECENT_BYTES: usize = 16 << 20;

/// Fetches chunks of the blobs of one source.
pub struct Fetcher {
    recent: Mutex<MemoryCache>,
    runtime: tokio::runtime::Handle,
    source: Arc<dyn BlobSource>,
    cache: Arc<ChunkCache>,
    inflight: Mutex<HashMap<Digest, Arc<Inflight>>>,
    readers: ReaderGate,
    /// Chunks fetched for readers, on their way to the cache: a reader gets its data before
    /// its chunk is written.
    writes: WriteBehind,
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
        Self {
            recent: Mutex::new(MemoryCache::new(RECENT_BYTES)),
            runtime,
            source,
            writes: WriteBehind::spawn(cache.clone()),
            cache,
            inflight: Mutex::new(HashMap::new()),
            readers: ReaderGate::new(),
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
        let _guard = (priority == Priority::OnDemand).then(|| self.readers.enter());
        if priority == Priority::Background {
            self.readers.yield_to_readers(deadline);
        }
        let mut out: Vec<Option<Arc<Vec<u8>>>> = vec![None; chunks.len()];
        let mut mine = Vec::new();
        let mut waits = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            // A hit counts only with the length this TOC gives the chunk: a TOC may name a
            // digest another image's TOC cached with another size.
            let fits = |data: &Arc<Vec<u8>>| data.len() as u64 == c.chunk.size;
            if let Some(data) = crate::sync::lock(&self.recent)
                .get(&c.chunk.digest)
                .filter(fits)
            {
                self.count(|s| &s.cache_hits, 1);
                out[i] = Some(data);
                continue;
            }
            if let Ok(Some(data)) = self.cache.get(&c.chunk.digest)
                && data.len() as u64 == c.chunk.size
            {
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
                flight.complete(result.clone());
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
            out[i] = Some(flight.wait(chunks[i].chunk.digest, deadline)?);
        }
        // Every chunk resolved above; a waiter may have been handed a chunk of the same
        // digest fetched for another size, which is as wrong as a missing one.
        chunks
            .iter()
            .zip(out)
            .map(|(c, data)| match data {
                Some(data) if data.len() as u64 == c.chunk.size => Ok(data),
                data => Err(FetchError::Size {
                    digest: c.chunk.digest,
                    expected: c.chunk.size,
                    actual: data.map_or(0, |d| d.len() as u64),
                }),
            })
            .collect()
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
        match priority {
            Priority::OnDemand => self.writes.write_behind(digest, data),
            Priority::Background => self.writes.write_now(&digest, data),
        }
    }

    /// Waits until every chunk fetched so far is in the cache (or failed to be written).
    pub fn flush_cache_writes(&self) {
        self.writes.flush();
    }

    /// Waits (until `deadline`) for the on-demand reads to go quiet: none running, and none
    /// ended in the last `quiet`. The background download calls it before each batch so that
    /// a starting container's burst of reads has the link to itself.
    pub fn wait_quiet(&self, quiet: Duration, deadline: Instant) {
        self.readers.wait_quiet(quiet, deadline);
    }

    /// On-demand fetches running now.
    pub fn active_readers(&self) -> usize {
        self.readers.running()
    }
}
