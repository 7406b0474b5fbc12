//! The prefetch: as soon as a layer is mounted, the chunks its TOC lists as read at start
//! (imgstream's recorded prefetch list, else eStargz's prioritised files before the prefetch
//! landmark) are fetched in that order, a few requests at a time, so the link never idles
//! while a starting container computes, and the container's reads find their chunks cached
//! or already on the way (a read of a chunk in flight waits for that fetch, it does not send
//! another). Prefetch fetches count as on-demand: the background download waits for them.

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use super::{ChunkRef, Fetcher, Priority, learn};
use crate::{
    fetch::layer::RemoteLayer, image::estargz::Chunk, oci::digest::Digest, shutdown::Shutdown,
};

/// Requests in flight at least: enough that the link stays busy between one request's last
/// byte and the next one's first.
const CONCURRENCY: usize = 4;
/// Requests in flight at most (each is a connection to the registry).
const MAX_CONCURRENCY: usize = 16;
/// The list is fetched in windows of about this many compressed bytes: within a window,
/// chunks go in blob order so that neighbours share a request; windows go in list order, so
/// what the container reads first still comes first.
const WINDOW_BYTES: u64 = 1 << 20;

/// How the list is cut into range requests, sized by the link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sizes {
    /// Most compressed bytes one request asks for.
    max_batch: u64,
    /// Chunks between two listed ones are fetched too when they are at most this many
    /// compressed bytes: cheaper than the round trip of another request.
    max_gap: u64,
}

impl Sizes {
    /// With no network in between (or none measured): small gaps, half-MiB requests.
    const LOCAL: Sizes = Sizes {
        max_batch: 512 << 10,
        max_gap: 16 << 10,
    };

    /// Requests in flight for `batches`: enough that their bytes cover two bandwidth-delay
    /// products, since a list learned from reads is scattered over the layer and most of
    /// its requests are small.
    fn concurrency(bdp: Option<u64>, batches: &[Batch]) -> usize {
        let Some(bdp) = bdp.filter(|_| !batches.is_empty()) else {
            return CONCURRENCY;
        };
        let bytes: u64 = batches.iter().map(Batch::bytes).sum();
        let mean = (bytes / batches.len() as u64).max(1);
        let wanted = (2 * bdp).div_ceil(mean);
        usize::try_from(wanted)
            .unwrap_or(MAX_CONCURRENCY)
            .clamp(CONCURRENCY, MAX_CONCURRENCY)
    }

    /// For a link whose bandwidth-delay product is `bdp`: a request's round trip costs what
    /// `bdp` bytes would take to arrive, so a gap of a quarter of that is cheaper to fetch
    /// than to skip with another request, and a request of one product keeps the link busy
    /// across its own round trip.
    fn for_link(bdp: Option<u64>) -> Sizes {
        let Some(bdp) = bdp else { return Self::LOCAL };
        Sizes {
            max_batch: bdp.clamp(Self::LOCAL.max_batch, 4 << 20),
            max_gap: (bdp / 4).clamp(Self::LOCAL.max_gap, 1 << 20),
        }
    }
}

/// Chunks adjacent in one blob, fetched with one range request.
struct Batch {
    blob: Digest,
    chunks: Vec<Chunk>,
}

impl Batch {
    fn bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.blob_end - c.blob_offset).sum()
    }
}

/// The prefetch lists of `layers` as range requests, in list order by window.
fn plan(layers: &[RemoteLayer], sizes: Sizes) -> Vec<Batch> {
    let mut seen = HashSet::new();
    let mut batches: Vec<Batch> = Vec::new();
    for layer in layers {
        let listed = layer.index.prefetch_chunks();
        if listed.is_empty() {
            continue;
        }
        // Every chunk of the layer by blob offset, to fill small gaps.
        let mut by_offset: Vec<&Chunk> = layer
            .index
            .nodes
            .iter()
            .flat_map(|n| n.chunks.iter())
            .collect();
        by_offset.sort_by_key(|c| c.blob_offset);
        let mut window: Vec<&Chunk> = Vec::new();
        let mut window_bytes = 0;
        let mut listed = listed.into_iter().peekable();
        while let Some((node, chunk)) = listed.next() {
            let chunk = &layer.index.nodes[node].chunks[chunk];
            if seen.insert(chunk.digest) {
                window_bytes += chunk.blob_end - chunk.blob_offset;
                window.push(chunk);
            }
            if window_bytes >= WINDOW_BYTES || listed.peek().is_none() {
                window.sort_by_key(|c| c.blob_offset);
                cut(
                    layer.desc.digest,
                    &window,
                    &by_offset,
                    sizes,
                    &mut seen,
                    &mut batches,
                );
                window.clear();
                window_bytes = 0;
            }
        }
    }
    batches
}

/// Cuts a window (sorted by blob offset) into batches of adjacent members, taking in the
/// unlisted chunks of small gaps.
fn cut(
    blob: Digest,
    window: &[&Chunk],
    by_offset: &[&Chunk],
    sizes: Sizes,
    seen: &mut HashSet<Digest>,
    batches: &mut Vec<Batch>,
) {
    let mut current: Option<Batch> = None;
    for &chunk in window {
        if let Some(b) = current.as_mut() {
            let (start, end) = (
                b.chunks[0].blob_offset,
                b.chunks[b.chunks.len() - 1].blob_end,
            );
            let gap = chunk.blob_offset.saturating_sub(end);
            if chunk.blob_offset >= end
                && gap <= sizes.max_gap
                && chunk.blob_end - start <= sizes.max_batch
            {
                let from = by_offset.partition_point(|c| c.blob_offset < end);
                for &filler in by_offset[from..]
                    .iter()
                    .take_while(|c| c.blob_offset < chunk.blob_offset)
                {
                    seen.insert(filler.digest);
                    b.chunks.push(filler.clone());
                }
                if b.chunks[b.chunks.len() - 1].blob_end == chunk.blob_offset {
                    b.chunks.push(chunk.clone());
                    continue;
                }
            }
        }
        batches.extend(current.take());
        current = Some(Batch {
            blob,
            chunks: vec![chunk.clone()],
        });
    }
    batches.extend(current);
}

/// Starts prefetching the listed chunks of `layers`; with `shared`, first fetches the lists
/// other nodes published for the layers that have none and prefetches those too. `None`
/// when there is nothing to do. The thread ends when all are fetched (or failed: they stay
/// on demand) or `shutdown` is triggered.
pub fn spawn(
    fetcher: Arc<Fetcher>,
    layers: Arc<[RemoteLayer]>,
    deadline: Duration,
    shared: Option<learn::share::Shared>,
    shutdown: Shutdown,
) -> Option<thread::JoinHandle<()>> {
    // The mount's own requests (footer, TOC) have measured the link by now.
    let bdp = fetcher.link_bdp();
    let sizes = Sizes::for_link(bdp);
    let mut batches = plan(&layers, sizes);
    let wanted = match &shared {
        Some(shared) => learn::without_list(&layers, &shared.dir),
        None => Vec::new(),
    };
    if batches.is_empty() && wanted.is_empty() {
        return None;
    }
    let spawned = thread::Builder::new()
        .name("prefetch".into())
        .spawn(move || {
            if let Some(shared) = shared.filter(|_| !wanted.is_empty()) {
                batches.extend(shared_batches(&fetcher, &shared, &layers, &wanted, sizes));
            }
            let workers = Sizes::concurrency(bdp, &batches);
            run(&fetcher, &batches, workers, deadline, &shutdown)
        });
    match spawned {
        Ok(handle) => Some(handle),
        Err(err) => {
            tracing::warn!(%err, "prefetch not started; files are fetched as they are read");
            None
        }
    }
}

/// How long the look-up of shared lists may take: the start it serves is under way.
const SHARED_WITHIN: Duration = Duration::from_secs(30);

/// The batches of the lists other nodes published for layers `wanted`.
fn shared_batches(
    fetcher: &Fetcher,
    shared: &learn::share::Shared,
    layers: &[RemoteLayer],
    wanted: &[Digest],
    sizes: Sizes,
) -> Vec<Batch> {
    let found = fetcher
        .runtime
        .block_on(async { tokio::time::timeout(SHARED_WITHIN, shared.fetch(wanted)).await });
    let found = match found {
        Ok(Ok(found)) => found,
        Ok(Err(err)) => {
            let err = crate::error_chain(&err);
            tracing::warn!(%err, subject = %shared.subject.digest, "shared learned lists not fetched");
            return Vec::new();
        }
        Err(_) => {
            tracing::warn!(subject = %shared.subject.digest, "shared learned lists not fetched in time");
            return Vec::new();
        }
    };
    let mut got: Vec<RemoteLayer> = layers
        .iter()
        .filter(|l| found.contains(&l.desc.digest))
        .cloned()
        .collect();
    if learn::apply(&mut got, &shared.dir) > 0 {
        tracing::info!(layers = got.len(), subject = %shared.subject.digest, "prefetching lists other nodes learned");
    }
    plan(&got, sizes)
}

fn run(
    fetcher: &Fetcher,
    batches: &[Batch],
    workers: usize,
    deadline: Duration,
    shutdown: &Shutdown,
) {
    let started = Instant::now();
    let next = AtomicUsize::new(0);
    let (bytes, chunks, failed) = (AtomicU64::new(0), AtomicUsize::new(0), AtomicUsize::new(0));
    thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                while !shutdown.is_triggered() {
                    let Some(batch) = batches.get(next.fetch_add(1, Ordering::Relaxed)) else {
                        return;
                    };
                    // What is cached already is looked up, not read: on an image cached
                    // whole, reading it back would only keep the disk from its readers.
                    let refs: Vec<ChunkRef<'_>> = batch
                        .chunks
                        .iter()
                        .filter(|chunk| !fetcher.present(&chunk.digest))
                        .map(|chunk| ChunkRef {
                            blob: batch.blob,
                            chunk,
                        })
                        .collect();
                    if refs.is_empty() {
                        continue;
                    }
                    match fetcher.get(&refs, Priority::OnDemand, Instant::now() + deadline) {
                        Ok(_) => {
                            let fetched: u64 =
                                refs.iter().map(|c| c.chunk.blob_end - c.chunk.blob_offset).sum();
                            chunks.fetch_add(refs.len(), Ordering::Relaxed);
                            bytes.fetch_add(fetched, Ordering::Relaxed);
                        }
                        Err(err) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            let err = crate::error_chain(&err);
                            tracing::debug!(%err, "prefetch batch failed; its chunks stay on demand");
                        }
                    }
                }
            });
        }
    });
    tracing::info!(
        chunks = chunks.into_inner(),
        bytes = bytes.into_inner(),
        failed_batches = failed.into_inner(),
        requests_in_flight = workers,
        secs = started.elapsed().as_secs_f32(),
        stopped = shutdown.is_triggered(),
        "prefetch done"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_grow_with_the_link_within_bounds() {
        assert_eq!(Sizes::for_link(None), Sizes::LOCAL);
        // A loopback registry: the local sizes are the floor.
        assert_eq!(Sizes::for_link(Some(2_000)), Sizes::LOCAL);
        // 100 Mbit/s at 50 ms: 625 KB per round trip.
        let far = Sizes::for_link(Some(625_000));
        assert_eq!((far.max_batch, far.max_gap), (625_000, 156_250));
        // Gigabit at 100 ms: capped.
        let huge = Sizes::for_link(Some(12_500_000));
        assert_eq!((huge.max_batch, huge.max_gap), (4 << 20, 1 << 20));
    }

    #[test]
    fn small_scattered_requests_go_more_at_a_time() {
        let chunk = |size: u64| Chunk {
            file_offset: 0,
            size,
            blob_offset: 0,
            blob_end: size,
            digest: Digest::of(b"chunk"),
            unit: Default::default(),
        };
        let of = |size: u64, n: usize| -> Vec<Batch> {
            (0..n)
                .map(|_| Batch {
                    blob: Digest::of(b"blob"),
                    chunks: vec![chunk(size)],
                })
                .collect()
        };
        // No network measured, or nothing to fetch: the floor.
        assert_eq!(Sizes::concurrency(None, &of(1000, 10)), CONCURRENCY);
        assert_eq!(Sizes::concurrency(Some(625_000), &[]), CONCURRENCY);
        // 50 ms at 100 Mbit/s: 1.25 MB in flight takes eight 160 kB requests...
        assert_eq!(Sizes::concurrency(Some(625_000), &of(160_000, 100)), 8);
        // ...and more than the cap of 20 kB ones; half-MiB ones need no more than the floor.
        assert_eq!(
            Sizes::concurrency(Some(625_000), &of(20_000, 100)),
            MAX_CONCURRENCY
        );
        assert_eq!(
            Sizes::concurrency(Some(625_000), &of(512 << 10, 100)),
            CONCURRENCY
        );
    }
}
