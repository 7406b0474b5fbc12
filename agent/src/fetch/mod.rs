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
    ops::Range,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

pub mod background;
mod fill;
mod inflight;
pub mod journal;
pub mod layer;
pub mod learn;
mod link;
pub use link::Line;
pub mod prefetch;
mod priority;
pub mod readaround;
#[cfg(test)]
mod tests;
mod whole;
mod windows;

use serde::Serialize;

use inflight::Inflight;
use priority::ReaderGate;
use readaround::{ReadAround, ReadAroundConfig};

use crate::{
    cache::{ChunkCache, Memory, MemoryBudget, MemoryCache, WriteBehind, budget},
    fetch::layer::RemoteLayer,
    image::estargz::{self, Chunk},
    oci::digest::Digest,
    registry::{BlobSource, RegistryError},
    shutdown::Shutdown,
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
    #[error("layer {blob} is quarantined: it is not what its descriptor names")]
    Quarantined { blob: Digest },
}

impl FetchError {
    /// Whether the same read may succeed if tried again: a deadline passed or the source's
    /// failure is retryable (network trouble, 5xx), as opposed to a definite answer (404, a
    /// chunk that does not match its digest).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Deadline(_) => true,
            Self::Source { source, .. } => source.is_retryable(),
            Self::Chunk { .. } | Self::Size { .. } | Self::Quarantined { .. } => false,
        }
    }
}

/// Whether a fetch serves a reader now, follows a reader's miss ([`readaround`]), fills in
/// code while the link idles ([`fill`]), or fills the cache in the background.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    OnDemand,
    ReadAround,
    Fill,
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
    /// Of `requests` and `bytes`: those fetched around readers' misses ([`readaround`]),
    /// as the loader prefetch's and the idle fill's guesses.
    pub read_around_requests: AtomicU64,
    pub read_around_bytes: AtomicU64,
    /// Of `read_around_requests` and `read_around_bytes`: the idle fill's ([`fill`]).
    pub fill_requests: AtomicU64,
    pub fill_bytes: AtomicU64,
    /// Chunks served from the cache.
    pub cache_hits: AtomicU64,
    /// Chunks fetched from the source.
    pub chunks_fetched: AtomicU64,
    /// Waiters that joined a fetch already in flight.
    pub merged: AtomicU64,
    /// Reads that failed because their deadline passed (a FUSE or virtio-fs EIO).
    pub deadline_exceeded: AtomicU64,
    pub errors: AtomicU64,
    /// Layers served through a span index, read through by the background download: those
    /// that matched their descriptor's digest, and those quarantined because they did not.
    pub layers_verified: AtomicU64,
    pub layers_quarantined: AtomicU64,
}

/// The readers of one image, and the link they share, for fetchers that each serve one of
/// its layers (the snapshotter mounts each layer on its own, with a fetcher of its own).
///
/// The background download yields to readers, and goes to full speed once readers fetched
/// most of the image ([`GREEDY_SHARE`]). Layer by layer, neither holds: the background
/// download of a layer nobody reads yet saw no reader and took the link from a container
/// starting on the image's other layers, and a start that read 40 % of the layer holding
/// the libraries (not of the image) turned that layer's download greedy in the middle of
/// the start. Sharing one gate, the fetchers of an image's layers yield to any reader of
/// the image, and count its share against the whole image. The same goes for the link
/// ([`link`]): the layers come over one link, so their guesses take turns in one window
/// and the idle fill of one layer waits for the requests of all; each layer on its own
/// would let its guesses crowd out another layer's reader, and fill pieces go while
/// another layer's reader waits. The link's bandwidth is measured there too, from the
/// answers to every layer's requests: a layer read little so far sizes its read-around
/// windows and its window of guesses by what the image's other layers measured.
#[derive(Clone, Debug)]
pub struct ImageReaders {
    readers: Arc<ReaderGate>,
    link: Arc<link::LinkGate>,
}

impl ImageReaders {
    /// The readers of an image of `image_bytes` compressed bytes (all its layers).
    pub fn new(image_bytes: u64) -> Self {
        let gate = ReaderGate::new();
        gate.image_bytes.store(image_bytes, Ordering::Relaxed);
        Self {
            readers: Arc::new(gate),
            link: Arc::new(link::LinkGate::new()),
        }
    }

    /// A handle that does not keep them: they live as long as a fetcher shares them.
    pub fn downgrade(&self) -> WeakImageReaders {
        WeakImageReaders {
            readers: Arc::downgrade(&self.readers),
            link: Arc::downgrade(&self.link),
        }
    }
}

/// [`ImageReaders`] while a fetcher still shares them.
#[derive(Clone, Debug)]
pub struct WeakImageReaders {
    readers: std::sync::Weak<ReaderGate>,
    link: std::sync::Weak<link::LinkGate>,
}

impl WeakImageReaders {
    pub fn upgrade(&self) -> Option<ImageReaders> {
        Some(ImageReaders {
            readers: self.readers.upgrade()?,
            link: self.link.upgrade()?,
        })
    }
}

/// The share of an image fetched for readers (their own misses, the prefetch and the
/// read-around beside them) before the background download stops yielding to them
/// ([`Fetcher::serving`]). A start reads a few tens of percent at most (the e2e bench's PHP
/// start: 21 %, 27 % with its read-around 50 ms away).
pub const GREEDY_SHARE: f64 = 0.4;

/// A range request's answer, with the windows its spans keep apart (or its deadline
/// passing), when it was asked and answered.
type Answer = (
    Result<Result<(bytes::Bytes, windows::Fetched), RegistryError>, tokio::time::error::Elapsed>,
    Instant,
    Instant,
);

/// How a range request gets on the link ([`link`]).
enum Admission {
    /// The background download's: it yields to readers on its own.
    Free,
    /// A reader's, or one a walk waits on: now, counted.
    Now(link::Turn),
    /// A guess's: in line.
    Queued(link::Queued),
}

/// Bytes (compressed and decompressed, as the budget counts) one fetch of guesses holds at
/// most.
pub(crate) const GUESS_BATCH: u64 = 24 << 20;
/// Bytes of verified chunks the fetcher keeps in memory at most (within the agent's budget,
/// which all fetchers share).
const RECENT_BYTES: usize = 16 << 20;

/// Fetches chunks of the blobs of one source.
pub struct Fetcher {
    recent: Mutex<MemoryCache>,
    runtime: tokio::runtime::Handle,
    source: Arc<dyn BlobSource>,
    cache: Arc<ChunkCache>,
    inflight: Mutex<HashMap<Digest, Arc<Inflight>>>,
    /// Readers of the image, shared with the fetchers of its other layers when each layer
    /// has a fetcher of its own ([`ImageReaders`]).
    readers: Arc<ReaderGate>,
    /// Guessed requests' turns on the link, and its measured bandwidth, shared with the
    /// fetchers of the image's other layers where each has its own ([`ImageReaders`]).
    link: Arc<link::LinkGate>,
    /// Code waiting for the link to idle ([`fill`]).
    filler: fill::Fill,
    /// Chunks fetched for readers, on their way to the cache: a reader gets its data before
    /// its chunk is written.
    writes: WriteBehind,
    pub stats: FetchStats,
    /// The agent's totals, which every fetcher adds to as well.
    totals: Option<Arc<FetchStats>>,
    /// The agent's journal of requests by image, and this fetcher's image's name in it.
    journal: Option<(Arc<journal::FetchJournal>, Arc<str>)>,
    read_around: ReadAround,
    /// While a start is watched ([`learn`]): the chunks readers ask for.
    learning: Mutex<Option<Arc<Mutex<learn::Notes>>>>,
    /// Where the bytes of every fetch are leased from (kept chunks and queued writes lease
    /// theirs from the other pool of the same [`Memory`]).
    budget: Arc<MemoryBudget>,
    /// Layers found not to be what their descriptors name: their reads fail.
    quarantined: Mutex<Vec<Digest>>,
    /// Run between a reader's first look for a chunk and its look at the flights (tests
    /// put the end of a flight there).
    #[cfg(test)]
    pub(crate) between_looks: Mutex<Option<Box<dyn Fn() + Send>>>,
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
    /// A fetcher whose memory comes from the agent's budget ([`budget::global`]).
    pub fn new(
        runtime: tokio::runtime::Handle,
        source: Arc<dyn BlobSource>,
        cache: Arc<ChunkCache>,
    ) -> Self {
        Self::with_budget(runtime, source, cache, budget::global())
    }

    /// A fetcher whose memory comes from `memory`.
    pub fn with_budget(
        runtime: tokio::runtime::Handle,
        source: Arc<dyn BlobSource>,
        cache: Arc<ChunkCache>,
        memory: Arc<Memory>,
    ) -> Self {
        Self {
            recent: Mutex::new(MemoryCache::new(RECENT_BYTES, memory.kept.clone())),
            runtime,
            source,
            writes: WriteBehind::spawn(cache.clone(), memory.kept.clone()),
            budget: memory.fetches.clone(),
            cache,
            inflight: Mutex::new(HashMap::new()),
            readers: Arc::new(ReaderGate::new()),
            link: Arc::new(link::LinkGate::new()),
            filler: fill::Fill::default(),
            stats: FetchStats::default(),
            totals: None,
            journal: None,
            read_around: ReadAround::new(ReadAroundConfig::default()),
            learning: Mutex::new(None),
            quarantined: Mutex::new(Vec::new()),
            #[cfg(test)]
            between_looks: Mutex::new(None),
        }
    }

    /// Sizes read-around windows by `config` instead of the default.
    pub fn with_read_around(mut self, config: ReadAroundConfig) -> Self {
        self.read_around = ReadAround::new(config);
        self
    }

    /// Also counts into `totals` (the agent's figures across images, for `/metrics`).
    pub fn with_totals(mut self, totals: Arc<FetchStats>) -> Self {
        self.totals = Some(totals);
        self
    }

    /// Also journals each request as one of `image`'s (for pods' timelines).
    pub fn with_journal(mut self, journal: Arc<journal::FetchJournal>, image: &str) -> Self {
        let name = journal.layer_mounted(image);
        self.journal = Some((journal, name));
        self
    }

    /// The layer is all cached: journaled for its image.
    pub fn layer_cached(&self) {
        if let Some((journal, image)) = &self.journal {
            journal.layer_cached(image, crate::time::unix_ns(std::time::SystemTime::now()));
        }
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
        self.counting_deadlines(self.get_by(chunks, priority, deadline, None, None))
    }

    /// [`Fetcher::get`] for guesses the caller waits for (read-around priority): they take
    /// their turn on the link, in `line`, behind the requests readers and narrower guesses
    /// wait for.
    pub fn get_guessed(
        &self,
        chunks: &[ChunkRef<'_>],
        deadline: Instant,
        line: Line,
    ) -> Result<Vec<Arc<Vec<u8>>>, FetchError> {
        self.counting_deadlines(self.get_by(
            chunks,
            Priority::ReadAround,
            deadline,
            None,
            Some(line),
        ))
    }

    /// [`Fetcher::get`] for a reader of file `file` (its index in the layer) of `layer`: when
    /// it misses, what follows its chunks in the blob is fetched beside it ([`readaround`]).
    pub fn read(
        self: &Arc<Self>,
        chunks: &[ChunkRef<'_>],
        (layer, file): (&RemoteLayer, usize),
        deadline: Instant,
    ) -> Result<Vec<Arc<Vec<u8>>>, FetchError> {
        let result = self.get_by(
            chunks,
            Priority::OnDemand,
            deadline,
            Some((self, layer, file)),
            None,
        );
        self.counting_deadlines(result)
    }

    /// `result`, a deadline it missed counted.
    fn counting_deadlines<T>(&self, result: Result<T, FetchError>) -> Result<T, FetchError> {
        if let Err(FetchError::Deadline(_)) = &result {
            self.count(|s| &s.deadline_exceeded, 1);
        }
        result
    }

    /// A cached copy of the chunk, from memory or disk, of the size its TOC gives it.
    fn cached(&self, chunk: &Chunk, keep_in_memory: bool) -> Option<Arc<Vec<u8>>> {
        self.cached_unit(&chunk.digest, chunk.unit_len(), keep_in_memory)
    }

    /// Where `chunk`'s span starts and the bytes of the span before it, if that one is
    /// cached and can stand in for its window (only for a window kept apart: any other is
    /// at hand already).
    fn cached_before(&self, chunk: &Chunk) -> Option<(u64, Arc<Vec<u8>>)> {
        let estargz::Unit::Span {
            start,
            before: Some((digest, len)),
            ..
        } = &chunk.unit
        else {
            return None;
        };
        start.window.place()?;
        if !self.present(digest) {
            return None;
        }
        let bytes = self.cached_unit(digest, *len, false)?;
        Some((start.uncompressed, bytes))
    }

    /// A cached unit `digest` of `len` bytes, from memory or disk.
    fn cached_unit(&self, digest: &Digest, len: u64, keep_in_memory: bool) -> Option<Arc<Vec<u8>>> {
        // A hit counts only with the length this TOC gives the chunk: a TOC may name a digest
        // another image's TOC cached with another size.
        let fits = |data: &Arc<Vec<u8>>| data.len() as u64 == len;
        if let Some(data) = crate::sync::lock(&self.recent).get(digest).filter(fits) {
            return Some(data);
        }
        let data = Arc::new(self.cache.get(digest).ok()??);
        if !fits(&data) {
            return None;
        }
        if keep_in_memory {
            crate::sync::lock(&self.recent).insert(*digest, data.clone());
        }
        Some(data)
    }

    /// [`Self::cached`] again, for the few chunks whose flight ended between the first look
    /// and the flight map's lock; the disk is read only where the chunk is there.
    fn landed(&self, chunk: &Chunk, keep_in_memory: bool) -> Option<Arc<Vec<u8>>> {
        if self.present(&chunk.digest) {
            self.cached(chunk, keep_in_memory)
        } else {
            None
        }
    }

    /// Whether the chunk `digest` is in memory or in the cache, looked up without reading it.
    pub(crate) fn present(&self, digest: &Digest) -> bool {
        crate::sync::lock(&self.recent).contains(digest) || self.cache.contains(digest)
    }

    fn get_by(
        &self,
        chunks: &[ChunkRef<'_>],
        priority: Priority,
        deadline: Instant,
        around: Option<(&Arc<Self>, &RemoteLayer, usize)>,
        line: Option<Line>,
    ) -> Result<Vec<Arc<Vec<u8>>>, FetchError> {
        if let Some(blob) = self.quarantined_among(chunks) {
            return Err(FetchError::Quarantined { blob });
        }
        let _guard = (priority == Priority::OnDemand).then(|| self.readers.enter());
        if priority == Priority::Background {
            self.readers.yield_to_readers(deadline);
        }
        if priority == Priority::OnDemand
            && let Some(notes) = crate::sync::lock(&self.learning).as_ref()
        {
            let mut notes = crate::sync::lock(notes);
            for c in chunks {
                notes.note(c.blob, c.chunk.blob_offset);
            }
        }
        let mut out: Vec<Option<Arc<Vec<u8>>>> = vec![None; chunks.len()];
        let mut mine = Vec::new();
        let mut waits = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            if let Some(data) = self.cached(c.chunk, priority == Priority::OnDemand) {
                self.count(|s| &s.cache_hits, 1);
                out[i] = Some(data);
                continue;
            }
            #[cfg(test)]
            if let Some(hook) = crate::sync::lock(&self.between_looks).take() {
                hook();
            }
            let mut map = crate::sync::lock(&self.inflight);
            if let Some(flight) = map.get(&c.chunk.digest) {
                self.count(|s| &s.merged, 1);
                waits.push((i, flight.clone()));
                continue;
            }
            // A flight that ended since the look above published its chunk before it left
            // the map (`complete`): look again rather than fetch the chunk twice.
            if let Some(data) = self.landed(c.chunk, priority == Priority::OnDemand) {
                self.count(|s| &s.cache_hits, 1);
                out[i] = Some(data);
                continue;
            }
            // A read-around fetch is a guess: when it fails, its waiters fetch.
            let flight = Arc::new(if priority == Priority::ReadAround {
                Inflight::guess()
            } else {
                Inflight::default()
            });
            map.insert(c.chunk.digest, flight.clone());
            mine.push((i, flight));
        }
        // A reader waiting for a guess still in line for the link has it go now.
        for (_, flight) in &waits {
            if let Some(ticket) = flight.ticket() {
                self.link.promote(ticket);
            }
        }
        if let (Some((this, layer, file)), Some(last)) = (around, mine.last()) {
            let last = chunks[last.0].chunk;
            let first = chunks[mine[0].0].chunk;
            this.fetch_around((layer, file), first.blob_offset..last.blob_end, deadline);
        }
        if !mine.is_empty() {
            let wanted: Vec<&ChunkRef<'_>> = mine.iter().map(|(i, _)| &chunks[*i]).collect();
            let flights: Vec<&Arc<Inflight>> = mine.iter().map(|(_, f)| f).collect();
            let results = self.fetch_runs(&wanted, &flights, deadline, priority, line);
            for ((i, _), result) in mine.iter().zip(results) {
                out[*i] = Some(result?);
            }
            if priority == Priority::OnDemand {
                self.check_share();
            }
        }
        for (i, flight) in waits {
            out[i] = Some(match flight.wait(chunks[i].chunk.digest, deadline) {
                Ok(data) => data,
                // Read-around guessed, and its request failed: this reader still needs the
                // chunk, and asks for it itself.
                Err(_) if flight.guessed() && Instant::now() < deadline => self
                    .get_by(&chunks[i..=i], priority, deadline, None, None)?
                    .remove(0),
                Err(e) => return Err(e),
            });
        }
        // Every chunk resolved above; a waiter may have been handed a chunk of the same
        // digest fetched for another size, which is as wrong as a missing one.
        chunks
            .iter()
            .zip(out)
            .map(|(c, data)| match data {
                Some(data) if data.len() as u64 == c.chunk.unit_len() => Ok(data),
                data => Err(FetchError::Size {
                    digest: c.chunk.digest,
                    expected: c.chunk.unit_len(),
                    actual: data.map_or(0, |d| d.len() as u64),
                }),
            })
            .collect()
    }

    /// Completes the flights of fetched chunks and wakes their waiters, whatever the results:
    /// a flight left open would make every later read of its chunk wait out its deadline, for
    /// the life of the mount. Chunks fetched for readers are kept in memory first, so that no
    /// read between the flight's end and the chunk's write misses it.
    fn complete<'c, 'r: 'c>(
        &self,
        flights: impl Iterator<Item = (&'c ChunkRef<'r>, &'c Arc<Inflight>)>,
        results: &[Result<Arc<Vec<u8>>, FetchError>],
        priority: Priority,
    ) {
        let flights: Vec<_> = flights.collect();
        if priority != Priority::Background {
            let mut recent = crate::sync::lock(&self.recent);
            for ((c, _), result) in flights.iter().zip(results) {
                if let Ok(data) = result {
                    recent.insert(c.chunk.digest, data.clone());
                }
            }
        }
        let mut map = crate::sync::lock(&self.inflight);
        for ((c, flight), result) in flights.into_iter().zip(results) {
            map.remove(&c.chunk.digest);
            flight.complete(result.clone());
        }
    }

    /// Whether no chunk is in flight (tests wait for guesses to land).
    #[cfg(test)]
    pub(crate) fn nothing_in_flight(&self) -> bool {
        crate::sync::lock(&self.inflight).is_empty()
    }

    /// The source's round trip as this fetcher's requests measured it so far (the shortest
    /// recent time to a first byte); `None` for a source with no network in between.
    pub(crate) fn round_trip(&self) -> Option<Duration> {
        self.source.round_trip()
    }

    /// The link's bandwidth-delay product as measured so far: the source's round trip, and
    /// the bandwidth the requests of every fetcher sharing the link delivered; `None` for a
    /// source with no network in between.
    pub(crate) fn link_bdp(&self) -> Option<u64> {
        self.source.round_trip().map(|rtt| self.link.bdp(rtt))
    }

    /// Counts an answer towards the link's bandwidth; once the answers first measure it, says
    /// what the guesses are sized by from then on (the measure, not the link: see
    /// [`link::Bandwidth`]).
    fn observe_link(&self, bytes: u64, asked: Instant, answered: Instant) {
        if self.link.observe(bytes, asked, answered)
            && let Some(rtt) = self.source.round_trip()
        {
            tracing::info!(
                round_trip_ms = rtt.as_secs_f64() * 1e3,
                mbit_per_s = self.link.rate(rtt) * 8e-6,
                bdp = self.link.bdp(rtt),
                "the link is measured (by its large answers alone, so below the link when small ones share it): read-around windows, guesses in flight and code fetched whole are sized by it"
            );
        }
    }

    /// Whether the source is far enough for guesses to wait in line (a bandwidth-delay
    /// product of at least [`link::NEAR`], as measured so far).
    pub fn far(&self) -> bool {
        self.link_bdp().is_some_and(|bdp| bdp >= link::NEAR)
    }

    /// Starts fetching, on a thread of its own, the chunks of `layer` that follow a miss of
    /// `missed` in the blob by a reader of `file`, as far as the read-around window goes;
    /// chunks cached or in flight are left out. Readers that want them meanwhile wait for
    /// this fetch.
    fn fetch_around(
        self: &Arc<Self>,
        (layer, file): (&RemoteLayer, usize),
        missed: std::ops::Range<u64>,
        deadline: Instant,
    ) {
        let blob = layer.desc.digest;
        let end = missed.end;
        let window = self
            .read_around
            .window(blob, file, (missed.start, end), self.link_bdp());
        if window == 0 {
            return;
        }
        if window >= self.read_around.max_window() && self.readers.open() {
            tracing::info!(
                %blob,
                window,
                "a reader reads a file through: the background download stops yielding to readers"
            );
        }
        // From the byte before: the span after a plain gzip layer's span may start in the
        // byte where it ends (no eStargz member is one byte long, so none starts there).
        let around = layer.chunks_between(end.saturating_sub(1), end.saturating_add(window));
        if let Some(last) = around.last() {
            self.read_around.covered(blob, last.blob_end);
        }
        self.guess(
            around.into_iter().map(|c| (blob, c.clone())).collect(),
            deadline,
            Line::Back,
        );
    }

    /// Fetches `chunks` into the cache on a thread of their own, as guesses (read-around
    /// priority): readers that want them meanwhile wait for these flights, and fetch for
    /// themselves what fails. Chunks cached or in flight are left out; the rest go in
    /// batches of at most [`GUESS_BATCH`] bytes, so that no fetch holds the memory budget
    /// readers need. They wait for their turn on the link in `line` ([`link`]).
    pub(crate) fn guess(
        self: &Arc<Self>,
        chunks: Vec<(Digest, Chunk)>,
        deadline: Instant,
        line: Line,
    ) {
        let mut guessed = self.open_guesses(chunks);
        if guessed.is_empty() {
            return;
        }
        // Runs are made of chunks adjacent in a blob.
        guessed.sort_by_key(|(blob, chunk, _)| (*blob, chunk.blob_offset));
        let opened: Vec<(Digest, Arc<Inflight>)> = guessed
            .iter()
            .map(|(_, c, f)| (c.digest, f.clone()))
            .collect();
        let this = self.clone();
        let spawned = std::thread::Builder::new()
            .name("read-around".into())
            .spawn(move || {
                let refs: Vec<ChunkRef<'_>> = guessed
                    .iter()
                    .map(|(blob, chunk, _)| ChunkRef { blob: *blob, chunk })
                    .collect();
                let mut start = 0;
                while start < refs.len() {
                    let mut end = start;
                    let mut bytes = 0u64;
                    while end < refs.len() && (end == start || bytes < GUESS_BATCH) {
                        let c = refs[end].chunk;
                        bytes = bytes
                            .saturating_add(c.unit_len())
                            .saturating_add(c.blob_end - c.blob_offset);
                        end += 1;
                    }
                    let wanted: Vec<&ChunkRef<'_>> = refs[start..end].iter().collect();
                    let flights: Vec<&Arc<Inflight>> =
                        guessed[start..end].iter().map(|(_, _, f)| f).collect();
                    this.fetch_runs(
                        &wanted,
                        &flights,
                        deadline,
                        Priority::ReadAround,
                        Some(line),
                    );
                    start = end;
                }
            });
        if let Err(err) = spawned {
            tracing::warn!(%err, "no read-around thread; readers fetch for themselves");
            // The flights were never started: fail them so that their waiters fetch.
            let mut map = crate::sync::lock(&self.inflight);
            for (digest, flight) in opened {
                map.remove(&digest);
                flight.complete(Err(FetchError::Deadline(digest)));
            }
        }
    }

    /// A guess's flight for each of `chunks` neither cached nor in flight: readers that want
    /// them wait for these, and fetch for themselves what fails.
    fn open_guesses(&self, chunks: Vec<(Digest, Chunk)>) -> Vec<(Digest, Chunk, Arc<Inflight>)> {
        let candidates: Vec<(Digest, Chunk)> = chunks
            .into_iter()
            .filter(|(_, c)| !self.present(&c.digest))
            .collect();
        let mut opened = Vec::with_capacity(candidates.len());
        let mut map = crate::sync::lock(&self.inflight);
        for (blob, chunk) in candidates {
            if let std::collections::hash_map::Entry::Vacant(slot) = map.entry(chunk.digest) {
                let flight = Arc::new(Inflight::guess());
                slot.insert(flight.clone());
                opened.push((blob, chunk, flight));
            }
        }
        opened
    }

    /// Queues `chunks`, one segment of code, for the idle fill ([`fill`]): fetched in pieces,
    /// one at a time, each only while nothing else is on the link, taking turns with the
    /// other segments queued, until the background download starts. Chunks cached by then
    /// are skipped; a reader that wants one meanwhile fetches it as usual.
    pub(crate) fn fill(self: &Arc<Self>, chunks: Vec<(Digest, Chunk)>) {
        if !self.fill_pays() || !self.filler.push(chunks) {
            return;
        }
        let fetcher = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("idle-fill".into())
            .spawn(move || {
                while let Some(this) = fetcher.upgrade() {
                    let Some(piece) = this.filler.next_piece(|d| this.present(d)) else {
                        return;
                    };
                    // A panic costs its piece, never the fill.
                    let filled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        this.fill_piece(piece)
                    }));
                    if filled.is_err() {
                        tracing::error!("a piece of the idle fill panicked");
                    }
                }
            });
        if let Err(err) = spawned {
            tracing::warn!(%err, "no idle-fill thread; the code waiting is left to its readers");
            self.filler.no_thread();
        }
    }

    /// Fetches one piece of the idle fill once the link has nothing else in flight (given up
    /// after [`fill::PATIENCE`]), but for its chunks cached or in flight by then; none where
    /// the link turned out near.
    fn fill_piece(&self, piece: Vec<(Digest, Chunk)>) {
        if !self.fill_pays() {
            return;
        }
        let bytes = piece
            .iter()
            .map(|(_, c)| c.blob_end.saturating_sub(c.blob_offset))
            .fold(0u64, u64::saturating_add);
        let queued = self.link.queue(bytes, Line::Idle);
        // The timer is made inside the runtime: this is a thread of the fetcher's own.
        let turn = self
            .runtime
            .block_on(async { tokio::time::timeout(fill::PATIENCE, queued.turn()).await });
        let Ok(_turn) = turn else {
            return;
        };
        if self.filler.stopped() {
            return;
        }
        // Claimed only now, with the link: a guess or a reader that wanted these chunks while
        // the piece waited fetched them without waiting for it.
        let claimed = self.open_guesses(piece);
        if claimed.is_empty() {
            return;
        }
        let refs: Vec<ChunkRef<'_>> = claimed
            .iter()
            .map(|(blob, chunk, _)| ChunkRef { blob: *blob, chunk })
            .collect();
        let wanted: Vec<&ChunkRef<'_>> = refs.iter().collect();
        let flights: Vec<&Arc<Inflight>> = claimed.iter().map(|(_, _, f)| f).collect();
        let deadline = Instant::now() + fill::PATIENCE;
        self.fetch_runs(&wanted, &flights, deadline, Priority::Fill, None);
    }

    /// Whether the link is far enough for the idle fill ([`fill::MIN_BDP`]).
    pub(crate) fn fill_pays(&self) -> bool {
        self.link_bdp().is_some_and(|bdp| bdp >= fill::MIN_BDP)
    }

    /// Ends the idle fill: the background download fetches the rest.
    pub fn stop_filling(&self) {
        self.filler.stop();
    }

    /// Fetches the given chunks, one range request per run of members adjacent in a blob,
    /// the runs in parallel, and completes each chunk's flight (`flights`, one per chunk of
    /// `wanted`) as soon as its run's answer is in: a reader waiting on one chunk of a large
    /// batch waits for its own request, not for the batch's slowest.
    fn fetch_runs(
        &self,
        wanted: &[&ChunkRef<'_>],
        flights: &[&Arc<Inflight>],
        deadline: Instant,
        priority: Priority,
        line: Option<Line>,
    ) -> Vec<Result<Arc<Vec<u8>>, FetchError>> {
        debug_assert_eq!(wanted.len(), flights.len());
        // One lease for everything this fetch holds at once, compressed and decompressed;
        // taken whole, so that no fetch holds part of the budget while it waits for more.
        let bytes = wanted
            .iter()
            .map(|c| {
                c.chunk
                    .unit_len()
                    .saturating_add(c.chunk.blob_end - c.chunk.blob_offset)
            })
            .fold(0u64, u64::saturating_add);
        let ceiling = match priority {
            Priority::Background => (self.budget.limit() as f64 * budget::BACKGROUND_SHARE) as u64,
            Priority::OnDemand | Priority::ReadAround | Priority::Fill => self.budget.limit(),
        };
        let Some(_lease) = self.budget.acquire_below(bytes, ceiling, deadline) else {
            let results: Vec<_> = wanted
                .iter()
                .map(|c| Err(FetchError::Deadline(c.chunk.digest)))
                .collect();
            self.complete(
                wanted.iter().copied().zip(flights.iter().copied()),
                &results,
                priority,
            );
            return results;
        };
        if line.is_some() {
            self.link.set_window(self.link_bdp());
        }
        // A guess in line is asked for in pieces of at most half the window, so that one
        // large guess (a library's code, a long read-around) does not hold the link for
        // everything in line behind it: a walk's next request gets the room the first piece
        // leaves.
        let largest = line.map_or(u64::MAX, |_| self.link.largest_guess());
        // Runs, as ranges of `wanted`.
        let mut runs: Vec<Range<usize>> = Vec::new();
        let mut i = 0;
        while i < wanted.len() {
            let mut j = i;
            while j + 1 < wanted.len()
                && wanted[j + 1].blob == wanted[j].blob
                && wanted[j + 1].chunk.follows(wanted[j].chunk)
                && wanted[j + 1]
                    .chunk
                    .blob_end
                    .saturating_sub(wanted[i].chunk.blob_offset)
                    <= largest
            {
                j += 1;
            }
            runs.push(i..j + 1);
            i = j + 1;
        }
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let requests: Vec<(Digest, u64, u64)> = runs
            .iter()
            .map(|run| {
                let (blob, start, end) = (
                    wanted[run.start].blob,
                    wanted[run.start].chunk.blob_offset,
                    wanted[run.end - 1].chunk.blob_end,
                );
                tracing::trace!(
                    target: "imgstream::reads",
                    %blob,
                    start,
                    bytes = end - start,
                    chunks = run.len(),
                    ?priority,
                    "range request"
                );
                (blob, start, end)
            })
            .collect();
        // Guesses take their turn on the link; readers' requests, and those a walk waits on,
        // go at once and count, so that guesses wait for them (the background download
        // yields to readers on its own).
        let admissions: Vec<Admission> = runs
            .iter()
            .zip(&requests)
            .map(|(run, &(_, start, end))| match (priority, line) {
                (Priority::Background, _) => Admission::Free,
                (_, Some(line)) => {
                    let queued = self.link.queue(end - start, line);
                    for flight in &flights[run.clone()] {
                        flight.set_ticket(queued.ticket());
                    }
                    Admission::Queued(queued)
                }
                _ => Admission::Now(self.link.enter(end - start)),
            })
            .collect();
        let source = self.source.clone();
        // A run whose first span comes right after one already cached takes its window from
        // that span's bytes, not from the windows blob: a start reading a library page by
        // page misses in span after span, each once the one before has landed.
        let preceding: Vec<Option<(u64, Arc<Vec<u8>>)>> = runs
            .iter()
            .map(|run| self.cached_before(wanted[run.start].chunk))
            .collect();
        let mut windows_wanted: Vec<windows::Wanted> = runs
            .iter()
            .zip(&preceding)
            .map(|(run, before)| {
                windows::wanted(
                    wanted[run.clone()].iter().map(|c| c.chunk),
                    before.as_ref().map(|(at, _)| *at),
                )
            })
            .collect();
        let fetch = move |(blob, start, end): (Digest, u64, u64),
                          admission: Admission,
                          windows_wanted: windows::Wanted| {
            let source = source.clone();
            async move {
                let _turn = match admission {
                    Admission::Free => None,
                    Admission::Now(turn) => Some(turn),
                    Admission::Queued(queued) => {
                        match tokio::time::timeout(left, queued.turn()).await {
                            Ok(turn) => Some(turn),
                            Err(elapsed) => return (Err(elapsed), Instant::now(), Instant::now()),
                        }
                    }
                };
                let asked = Instant::now();
                let both = async {
                    let (data, windows) = tokio::join!(
                        source.read_range(&blob, start..end),
                        windows::fetch(&*source, &windows_wanted)
                    );
                    Ok((data?, windows?))
                };
                let result = tokio::time::timeout(left, both).await;
                (result, asked, Instant::now())
            }
        };
        let mut results: Vec<Option<Result<Arc<Vec<u8>>, FetchError>>> = vec![None; wanted.len()];
        let mut finish = |r: usize, fetched: Option<_>| {
            let run = runs[r].clone();
            let done = self.decode_run(
                &wanted[run.clone()],
                fetched,
                preceding[r].clone(),
                priority,
            );
            self.complete(
                wanted[run.clone()]
                    .iter()
                    .copied()
                    .zip(flights[run.clone()].iter().copied()),
                &done,
                priority,
            );
            for (slot, result) in results[run].iter_mut().zip(done) {
                *slot = Some(result);
            }
        };
        let mut admissions = admissions;
        self.runtime.block_on(async {
            if requests.len() == 1 {
                // One request (the usual case, and every background batch): polled right here,
                // on the calling thread, not handed to the runtime's workers.
                let (request, admission) = (requests[0], admissions.remove(0));
                let windows_wanted = windows_wanted.remove(0);
                finish(0, Some(fetch(request, admission, windows_wanted).await));
                return;
            }
            let mut tasks = tokio::task::JoinSet::new();
            let mut runs_of = HashMap::new();
            let each = requests.into_iter().zip(admissions).zip(windows_wanted);
            for (r, ((request, admission), windows_wanted)) in each.enumerate() {
                let id = tasks.spawn(fetch(request, admission, windows_wanted)).id();
                runs_of.insert(id, r);
            }
            let mut finished = vec![false; runs_of.len()];
            while let Some(joined) = tasks.join_next_with_id().await {
                let (id, fetched) = match joined {
                    Ok((id, fetched)) => (id, Some(fetched)),
                    Err(err) => (err.id(), None),
                };
                if let Some(&r) = runs_of.get(&id) {
                    finished[r] = true;
                    finish(r, fetched);
                }
            }
            // Every task ends in the loop above; a run it could not name still completes.
            for (r, done) in finished.into_iter().enumerate() {
                if !done {
                    finish(r, None);
                }
            }
        });
        results
            .into_iter()
            .zip(wanted)
            .map(|(result, c)| result.unwrap_or(Err(FetchError::Deadline(c.chunk.digest))))
            .collect()
    }

    /// One run's chunks from its range request's answer (`None`: the request's task failed),
    /// each checked, decoded and cached, and the request counted.
    fn decode_run(
        &self,
        run: &[&ChunkRef<'_>],
        fetched: Option<Answer>,
        preceding: Option<(u64, Arc<Vec<u8>>)>,
        priority: Priority,
    ) -> Vec<Result<Arc<Vec<u8>>, FetchError>> {
        match fetched {
            None | Some((Err(_), ..)) => {
                self.count(|s| &s.errors, 1);
                run.iter()
                    .map(|c| Err(FetchError::Deadline(c.chunk.digest)))
                    .collect()
            }
            Some((Ok(Err(e)), ..)) => {
                self.count(|s| &s.errors, 1);
                let source = Arc::new(e);
                run.iter()
                    .map(|c| {
                        Err(FetchError::Source {
                            digest: c.chunk.digest,
                            source: source.clone(),
                        })
                    })
                    .collect()
            }
            Some((Ok(Ok((bytes, windows))), asked, answered)) => {
                tracing::trace!(
                    target: "imgstream::reads",
                    start = run[0].chunk.blob_offset,
                    bytes = bytes.len(),
                    windows = windows.len(),
                    secs = answered.duration_since(asked).as_secs_f64(),
                    ?priority,
                    "range answered"
                );
                // The windows went beside the range, on the same link: its bytes.
                let over_link = bytes.len() as u64 + windows.len();
                self.observe_link(over_link, asked, answered);
                self.count(|s| &s.requests, 1);
                self.count(|s| &s.bytes, over_link);
                if let Some((journal, image)) = &self.journal {
                    journal.request(
                        image,
                        crate::time::unix_ns(std::time::SystemTime::now()),
                        over_link,
                        priority == Priority::Background,
                    );
                }
                if priority != Priority::Background {
                    self.readers
                        .reader_bytes
                        .fetch_add(over_link, Ordering::Relaxed);
                }
                match priority {
                    Priority::Background => {
                        self.count(|s| &s.background_requests, 1);
                        self.count(|s| &s.background_bytes, over_link);
                    }
                    Priority::ReadAround => {
                        self.count(|s| &s.read_around_requests, 1);
                        self.count(|s| &s.read_around_bytes, over_link);
                    }
                    Priority::Fill => {
                        self.count(|s| &s.read_around_requests, 1);
                        self.count(|s| &s.read_around_bytes, over_link);
                        self.count(|s| &s.fill_requests, 1);
                        self.count(|s| &s.fill_bytes, over_link);
                    }
                    Priority::OnDemand => {}
                }
                let start = run[0].chunk.blob_offset;
                // Spans inflated so far (and the cached one before the first), by where
                // they end: the next one's window.
                let mut spans: Vec<(u64, Arc<Vec<u8>>)> = preceding.into_iter().collect();
                run.iter()
                    .map(|c| {
                        let member = &bytes[(c.chunk.blob_offset - start) as usize
                            ..(c.chunk.blob_end - start) as usize];
                        let window = windows.window(c.chunk, &spans);
                        match estargz::decode_unit(member, c.chunk, window) {
                            Ok(data) => {
                                self.count(|s| &s.chunks_fetched, 1);
                                let data = Arc::new(data);
                                self.store(c.chunk.digest, &data, priority);
                                if let Some(end) = windows::span_end(c.chunk) {
                                    spans.push((end, data.clone()));
                                }
                                Ok(data)
                            }
                            Err(e) => {
                                self.count(|s| &s.errors, 1);
                                Err(FetchError::Chunk {
                                    digest: c.chunk.digest,
                                    source: Arc::new(e),
                                })
                            }
                        }
                    })
                    .collect()
            }
        }
    }

    /// Caches a fetched chunk: for a reader or around one, through the writer thread (written
    /// inline when its queue is full, so nothing fetched is dropped), since readers wait for
    /// these flights; for the background, inline, on its own threads.
    fn store(&self, digest: Digest, data: &Arc<Vec<u8>>, priority: Priority) {
        match priority {
            Priority::OnDemand | Priority::ReadAround | Priority::Fill => {
                self.writes.write_behind(digest, data)
            }
            Priority::Background => self.writes.write_now(&digest, data),
        }
    }

    /// The first blob among `chunks`' that is quarantined.
    fn quarantined_among(&self, chunks: &[ChunkRef<'_>]) -> Option<Digest> {
        let quarantined = crate::sync::lock(&self.quarantined);
        if quarantined.is_empty() {
            return None;
        }
        chunks
            .iter()
            .map(|c| c.blob)
            .find(|blob| quarantined.contains(blob))
    }

    /// Takes `layer` out of service: it was found not to be what its descriptor names
    /// (`why`). Its reads fail from now on, its spans leave memory and the cache, and its
    /// cached span index is dropped, so that the next mount looks for one again. What was
    /// served from it before stays served: the kernel's page cache and readers' buffers are
    /// out of reach.
    pub fn quarantine(&self, layer: &RemoteLayer, why: &(dyn std::error::Error + 'static)) {
        let blob = layer.desc.digest;
        {
            let mut quarantined = crate::sync::lock(&self.quarantined);
            if quarantined.contains(&blob) {
                return;
            }
            quarantined.push(blob);
        }
        let spans = whole::cuts(layer);
        {
            let mut recent = crate::sync::lock(&self.recent);
            for span in &spans {
                recent.remove(&span.digest);
            }
        }
        self.writes.flush();
        for span in &spans {
            self.cache.remove(&span.digest);
        }
        self.cache.remove_span_index(&blob);
        self.count(|s| &s.layers_quarantined, 1);
        let error = crate::error_chain(why);
        tracing::error!(
            layer = %blob,
            %error,
            "layer quarantined: it is not what its descriptor names; its reads fail from now on"
        );
    }

    /// Whether `blob` was quarantined.
    pub fn is_quarantined(&self, blob: &Digest) -> bool {
        crate::sync::lock(&self.quarantined).contains(blob)
    }

    /// Tells the fetcher the compressed size of the image it serves (the background download
    /// does), so that it can tell when readers read most of it. A size already known (the
    /// whole image's, for fetchers that share [`ImageReaders`]) stays.
    pub fn serving(&self, image_bytes: u64) {
        let _ = self.readers.image_bytes.compare_exchange(
            0,
            image_bytes,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// Shares `readers`, and their link, with the other fetchers of the image (see
    /// [`ImageReaders`]).
    pub fn with_image_readers(mut self, readers: &ImageReaders) -> Self {
        self.readers = readers.readers.clone();
        self.link = readers.link.clone();
        self
    }

    /// Once [`GREEDY_SHARE`] of the image was fetched for readers, they read most of it (a
    /// start reads a few percent; a workload that reads its data, or its whole tree, reads
    /// it all): from then on the background download does not yield to them, since its
    /// large parallel requests serve them faster than misses that each wait a round trip.
    /// Read-around counts: far from the registry it brings most of what a tree walk reads.
    fn check_share(&self) {
        let total = self.readers.image_bytes.load(Ordering::Relaxed);
        let fetched = self.readers.reader_bytes.load(Ordering::Relaxed);
        if total > 0 && fetched as f64 >= total as f64 * GREEDY_SHARE && self.readers.open() {
            tracing::info!(
                fetched,
                total,
                share = GREEDY_SHARE,
                "most of the image was fetched for readers: the background download stops yielding to them"
            );
        }
    }

    /// Notes every chunk readers ask for into `notes` until [`Fetcher::stop_learning`].
    fn learn_into(&self, notes: Arc<Mutex<learn::Notes>>) {
        *crate::sync::lock(&self.learning) = Some(notes);
    }

    fn stop_learning(&self) {
        *crate::sync::lock(&self.learning) = None;
    }

    /// Whether any reader has read through this fetcher yet.
    fn readers_seen(&self) -> bool {
        self.readers.seen()
    }

    /// Whether no reader has read for `quiet` (and none reads now).
    fn readers_quiet_for(&self, quiet: Duration) -> bool {
        self.readers.quiet_for(quiet)
    }

    /// Whether the background download no longer yields to readers.
    pub fn greedy(&self) -> bool {
        self.readers.is_open()
    }

    /// Runs `hook` once the background download stops yielding to readers (at once if it
    /// has): readers read most of the image, or a file through.
    pub fn when_greedy(&self, hook: impl FnOnce() + Send + 'static) {
        self.readers.when_open(hook);
    }

    /// Waits until every chunk fetched so far is in the cache (or failed to be written).
    pub fn flush_cache_writes(&self) {
        self.writes.flush();
    }

    /// Waits (until `deadline`) for the on-demand reads to go quiet: none running, and none
    /// ended in the last `quiet`. The background download calls it before each batch so that
    /// a starting container's burst of reads has the link to itself. Returns early when
    /// `stop` is triggered.
    pub fn wait_quiet(&self, quiet: Duration, deadline: Instant, stop: &Shutdown) {
        self.readers.wait_quiet(quiet, deadline, stop);
    }

    /// On-demand fetches running now.
    pub fn active_readers(&self) -> usize {
        self.readers.running()
    }
}
