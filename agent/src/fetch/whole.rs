//! The background download of a plain gzip layer mounted through its span index: the layer
//! read once, in order, in large ranges a few at a time, inflated as it arrives. Each span
//! the layer's files use is cached once it matches its digest, and at the end the whole
//! layer is checked against its descriptor's digest, so that the image's own digest vouches
//! for the index and for every byte served through it. A layer that is not what its
//! descriptor names is quarantined ([`Fetcher::quarantine`]).
//!
//! What this costs: the layer's compressed bytes once more for the spans readers had
//! already fetched (a span index gives no way to check a layer digest from spans alone).

use std::{
    collections::VecDeque,
    io::{self, Read},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use bytes::Bytes;

use super::{Fetcher, Priority, background::Progress};
use crate::{
    cache::budget::{self, Lease},
    fetch::layer::RemoteLayer,
    image::{
        estargz::Unit,
        gzip::{self, Cut, GzipError},
    },
    oci::digest::Digest,
    registry::RegistryError,
    shutdown::Shutdown,
};

/// How a layer's read-through ended.
#[derive(Debug)]
pub(super) enum Outcome {
    /// Every byte matched: the spans are cached (within the cache's limit).
    Verified,
    /// The source failed (or the download stopped): nothing is known about the layer.
    Unfinished(String),
    /// The layer is not what its descriptor or its index says.
    Mismatch(GzipError),
}

/// The spans `layer`'s files use, each once, in stream order.
pub(super) fn cuts(layer: &RemoteLayer) -> Vec<Cut> {
    let mut cuts: Vec<Cut> = layer
        .index
        .nodes
        .iter()
        .flat_map(|n| n.chunks.iter())
        .filter_map(|c| match &c.unit {
            Unit::Span { start, len, .. } => Some(Cut {
                at: start.uncompressed,
                len: *len,
                digest: c.digest,
            }),
            Unit::Member | Unit::Frame => None,
        })
        .collect();
    cuts.sort_by_key(|c| c.at);
    cuts.dedup_by_key(|c| c.at);
    cuts
}

/// Reads `layer` through (see the module doc), caching its spans through `fetcher`, with
/// `depth` range requests of `range` bytes in flight, each sent once readers have been
/// `quiet` that long; `pace` is asked before each request and returns false when the
/// download should stop.
pub(super) fn read_through(
    fetcher: &Fetcher,
    layer: &RemoteLayer,
    (depth, range, quiet): (usize, u64, Duration),
    pace: &dyn Fn(u64) -> bool,
    shutdown: &Shutdown,
    progress: &Progress,
) -> Outcome {
    let cuts = cuts(layer);
    let mut ranges = Ranges {
        fetcher,
        blob: layer.desc.digest,
        size: layer.desc.size,
        next: 0,
        depth: depth.max(1),
        range: range.max(1),
        quiet,
        ahead: VecDeque::new(),
        current: (Bytes::new(), None),
        pace,
        shutdown,
        progress,
        failed: None,
    };
    let result = gzip::read_through(
        &mut ranges,
        &cuts,
        &layer.desc.digest,
        layer.desc.size,
        |cut, bytes| {
            if !fetcher.cache().contains(&cut.digest) {
                fetcher.store(cut.digest, &Arc::new(bytes), Priority::Background);
            }
            progress.chunks_done.fetch_add(1, Ordering::Relaxed);
        },
    );
    match (result, ranges.failed.take()) {
        (Ok(()), _) => Outcome::Verified,
        (Err(_), Some(why)) => Outcome::Unfinished(why),
        (Err(GzipError::Io(err)), None) => Outcome::Unfinished(err.to_string()),
        (Err(err), None) => Outcome::Mismatch(err),
    }
}

/// A blob as a `Read`, fetched in ranges of `range` bytes, `depth` of them in flight: the
/// next requests are on the wire while the bytes of the first are inflated.
struct Ranges<'a> {
    fetcher: &'a Fetcher,
    blob: Digest,
    size: u64,
    /// The offset of the next range to request.
    next: u64,
    depth: usize,
    range: u64,
    /// Readers must have been quiet this long before a request goes out (the background
    /// download's `quiet`), so that a starting container has the link to itself.
    quiet: Duration,
    ahead: VecDeque<InFlight>,
    /// The range being read, and the memory it holds.
    current: (Bytes, Option<Lease>),
    pace: &'a dyn Fn(u64) -> bool,
    shutdown: &'a Shutdown,
    progress: &'a Progress,
    /// Why the blob could not be read (the source's error, or a stop).
    failed: Option<String>,
}

type Fetched = Result<Result<Bytes, RegistryError>, tokio::time::error::Elapsed>;

struct InFlight {
    at: u64,
    len: u64,
    task: tokio::task::JoinHandle<Fetched>,
    lease: Lease,
}

/// Longest a range request of the read-through may take.
const RANGE_TIMEOUT: Duration = Duration::from_secs(120);
/// Tries of a range before the read-through gives up (it is started again at the next
/// mount).
const TRIES: u32 = 4;
const FIRST_BACKOFF: Duration = Duration::from_secs(1);

impl Ranges<'_> {
    /// Requests ranges until `depth` are in flight or the blob is all asked for; false when
    /// the download is to stop.
    fn top_up(&mut self) -> bool {
        while self.ahead.len() < self.depth && self.next < self.size {
            let len = self.range.min(self.size - self.next);
            if self.shutdown.is_triggered() || !(self.pace)(len) {
                return false;
            }
            let deadline = Instant::now() + RANGE_TIMEOUT;
            if !self.quiet.is_zero() {
                self.fetcher.wait_quiet(self.quiet, deadline, self.shutdown);
            }
            self.fetcher.readers.yield_to_readers(deadline);
            let ceiling = (self.fetcher.budget.limit() as f64 * budget::BACKGROUND_SHARE) as u64;
            let Some(lease) = self.fetcher.budget.acquire_below(len, ceiling, deadline) else {
                return false;
            };
            let at = self.next;
            self.ahead.push_back(InFlight {
                at,
                len,
                task: self.spawn(at, len),
                lease,
            });
            self.next += len;
        }
        true
    }

    fn spawn(&self, at: u64, len: u64) -> tokio::task::JoinHandle<Fetched> {
        let (source, blob) = (self.fetcher.source.clone(), self.blob);
        self.fetcher.runtime.spawn(async move {
            tokio::time::timeout(RANGE_TIMEOUT, source.read_range(&blob, at..at + len)).await
        })
    }

    /// The next range's bytes, tried again with backoff while its failure may pass.
    fn next_range(&mut self) -> Result<Option<(Bytes, Lease)>, String> {
        if !self.top_up() && self.ahead.is_empty() {
            return Err("the download was stopped".into());
        }
        let Some(mut flight) = self.ahead.pop_front() else {
            return Ok(None);
        };
        let mut backoff = FIRST_BACKOFF;
        let mut tries = 1;
        loop {
            let began = Instant::now();
            let fetched = self.fetcher.runtime.block_on(&mut flight.task);
            let error = match fetched {
                Ok(Ok(Ok(bytes))) => {
                    let f = self.fetcher;
                    f.observe_link(bytes.len() as u64, began, Instant::now());
                    f.count(|s| &s.requests, 1);
                    f.count(|s| &s.bytes, bytes.len() as u64);
                    f.count(|s| &s.background_requests, 1);
                    f.count(|s| &s.background_bytes, bytes.len() as u64);
                    if let Some((journal, image)) = &f.journal {
                        let now = crate::time::unix_ns(std::time::SystemTime::now());
                        journal.request(image, now, bytes.len() as u64, true);
                    }
                    self.progress
                        .bytes_done
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    return Ok(Some((bytes, flight.lease)));
                }
                Ok(Ok(Err(err))) if !err.is_retryable() => {
                    self.fetcher.count(|s| &s.errors, 1);
                    return Err(crate::error_chain(&err));
                }
                Ok(Ok(Err(err))) => crate::error_chain(&err),
                Ok(Err(_)) => format!("no answer within {RANGE_TIMEOUT:?}"),
                Err(err) => err.to_string(),
            };
            self.fetcher.count(|s| &s.errors, 1);
            if tries == TRIES || self.shutdown.wait_timeout(backoff) {
                return Err(error);
            }
            tracing::debug!(%error, tries, at = flight.at, "a range of the layer read-through failed; asking again");
            tries += 1;
            backoff *= 2;
            flight.task = self.spawn(flight.at, flight.len);
        }
    }
}

impl Read for Ranges<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.current.0.is_empty() {
            // Drop the lease of the range read before asking for more.
            self.current = (Bytes::new(), None);
            match self.next_range() {
                Ok(Some((bytes, lease))) => self.current = (bytes, Some(lease)),
                Ok(None) => return Ok(0),
                Err(why) => {
                    let err = io::Error::other(why.clone());
                    self.failed = Some(why);
                    return Err(err);
                }
            }
        }
        let n = out.len().min(self.current.0.len());
        out[..n].copy_from_slice(&self.current.0.split_to(n));
        Ok(n)
    }
}

impl Drop for Ranges<'_> {
    fn drop(&mut self) {
        for flight in &self.ahead {
            flight.task.abort();
        }
    }
}
