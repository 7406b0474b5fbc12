//! The fetcher against a registry double: merged and coalesced requests, caching,
//! deadlines, and what a failed request leaves behind.

use super::*;
use crate::{
    cache::CacheConfig,
    image::{
        estargz::LayerIndex,
        tar::{Header, Kind},
    },
    testing::{MemoryBlobs, estargz_layer, layer_index, scratch_cache},
};

/// The digest the tests' blob is served under.
fn the_blob() -> Digest {
    Digest::of(b"the blob")
}

/// One 16 KiB file `f` in 4 KiB chunks.
fn layer() -> (Vec<u8>, LayerIndex) {
    let data: Vec<u8> = (0..16_384u32).map(|i| (i * 31 % 251) as u8).collect();
    let (blob, _) = estargz_layer(&[(Header::new("f", Kind::Regular), data)], 4096, false);
    let (index, _) = layer_index(&blob, None).unwrap();
    (blob, index)
}

#[test]
fn concurrent_reads_of_one_chunk_make_one_request_and_adjacent_chunks_share_one() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (blob, index) = layer();
    let source = Arc::new(
        MemoryBlobs::default()
            .with_digest(the_blob(), blob.clone())
            .delayed(Duration::from_millis(300)),
    );
    let (dir, cache) = scratch_cache("fetch");
    let fetcher = Arc::new(Fetcher::new(
        runtime.handle().clone(),
        source.clone(),
        cache.clone(),
    ));
    let node = index.get("f").unwrap().clone();
    let blob_digest = the_blob();
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
    let stuck = Arc::new(
        MemoryBlobs::default()
            .with_digest(the_blob(), blob)
            .delayed(Duration::from_secs(30)),
    );
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
    let source = Arc::new(
        MemoryBlobs::default()
            .with_digest(the_blob(), blob)
            .delayed(Duration::from_millis(10))
            .failing_first(1),
    );
    let (dir, cache) = scratch_cache("fetch-fail");
    let fetcher = Fetcher::new(runtime.handle().clone(), source.clone(), cache);
    let node = index.get("f").unwrap().clone();
    let blob_digest = the_blob();
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

#[test]
fn a_cached_chunk_named_again_with_another_size_is_an_error_not_a_short_buffer() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (blob, index) = layer();
    let source = Arc::new(MemoryBlobs::default().with_digest(the_blob(), blob));
    let (dir, cache) = scratch_cache("fetch-size");
    let fetcher = Fetcher::new(runtime.handle().clone(), source, cache);
    let real = index.get("f").unwrap().chunks[0].clone();
    let deadline = || Instant::now() + Duration::from_secs(5);
    let get = |chunk| {
        fetcher.get(
            &[ChunkRef {
                blob: the_blob(),
                chunk,
            }],
            Priority::OnDemand,
            deadline(),
        )
    };
    assert_eq!(get(&real).unwrap()[0].len() as u64, real.size);
    fetcher.flush_cache_writes();
    // Another TOC claims the same digest at twice the size: the hit (memory or disk) does
    // not count, and what the source has does not decode to that size.
    let lying = Chunk {
        size: real.size * 2,
        ..real.clone()
    };
    let err = get(&lying).unwrap_err();
    assert!(
        matches!(err, FetchError::Chunk { .. } | FetchError::Size { .. }),
        "{err}"
    );
    // The honest TOC still reads.
    assert_eq!(get(&real).unwrap()[0].len() as u64, real.size);
    drop(fetcher);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An eStargz blob of `entries` cut in chunks of `chunk` bytes, and the layer as mounted.
fn remote_layer(entries: &[(Header, Vec<u8>)], chunk: u64) -> (Vec<u8>, RemoteLayer) {
    let (blob, summary) = estargz_layer(entries, chunk, false);
    let (index, toc_digest) = layer_index(&blob, None).expect("an index");
    let layer = RemoteLayer::new(
        crate::testing::layer_descriptor(&summary),
        index,
        toc_digest,
    );
    (blob, layer)
}

/// Ten 4 KiB files `f0`..`f9`, one chunk each, in order in the blob; the layer as mounted.
fn ten_files() -> (Vec<u8>, RemoteLayer) {
    let entries: Vec<(Header, Vec<u8>)> = (0..10u8)
        .map(|i| (Header::new(&format!("f{i}"), Kind::Regular), vec![i; 4096]))
        .collect();
    remote_layer(&entries, 4096)
}

/// A fetcher over the ten files' layer, served from memory (`rtt`: as if that far away);
/// the runtime, the layer, the source, the scratch directory and the fetcher.
struct TenFiles {
    _runtime: tokio::runtime::Runtime,
    layer: RemoteLayer,
    source: Arc<MemoryBlobs>,
    dir: std::path::PathBuf,
    fetcher: Arc<Fetcher>,
}

impl TenFiles {
    fn new(name: &str, rtt: Option<Duration>) -> Self {
        Self::sharing(name, rtt, None)
    }

    /// [`TenFiles::new`] as one layer of an image whose `readers` its fetcher shares.
    fn sharing(name: &str, rtt: Option<Duration>, readers: Option<&ImageReaders>) -> Self {
        let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
        let (blob, layer) = ten_files();
        let mut source = MemoryBlobs::default().with_digest(layer.desc.digest, blob);
        if let Some(rtt) = rtt {
            source = source.far(rtt);
        }
        let source = Arc::new(source);
        let (dir, cache) = scratch_cache(name);
        let mut fetcher = Fetcher::new(runtime.handle().clone(), source.clone(), cache);
        if let Some(readers) = readers {
            fetcher = fetcher.with_image_readers(readers);
        }
        let fetcher = Arc::new(fetcher);
        Self {
            _runtime: runtime,
            layer,
            source,
            dir,
            fetcher,
        }
    }

    fn read(&self, name: &str) -> Vec<u8> {
        read_file(&self.fetcher, &self.layer, name)
    }
}

impl Drop for TenFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Reads file `name` of `layer` whole, as the filesystem does.
fn read_file(fetcher: &Arc<Fetcher>, layer: &RemoteLayer, name: &str) -> Vec<u8> {
    let node = layer.index.get(name).unwrap();
    let file = layer
        .index
        .nodes
        .iter()
        .position(|n| n.path == node.path)
        .unwrap();
    let refs: Vec<ChunkRef<'_>> = node
        .chunks
        .iter()
        .map(|chunk| ChunkRef {
            blob: layer.desc.digest,
            chunk,
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    let data = fetcher.read(&refs, (layer, file), deadline).unwrap();
    data.iter().flat_map(|d| d.iter().copied()).collect()
}

#[test]
fn a_miss_over_a_distant_link_fetches_the_files_after_it_beside_it() {
    // 50 ms away: the window is four bandwidth-delay products at the assumed 100 Mbit/s,
    // 2.5 MB, far more than the nine files after f0.
    let t = TenFiles::new("fetch-read-around", Some(Duration::from_millis(50)));
    assert_eq!(t.read("f0"), vec![0; 4096]);
    for i in 1..10u8 {
        assert_eq!(t.read(&format!("f{i}")), vec![i; 4096]);
    }
    // f0's own request, and one beside it for the rest.
    let stats = &t.fetcher.stats;
    assert_eq!(t.source.ranges.load(Ordering::SeqCst), 2);
    assert_eq!(stats.read_around_requests.load(Ordering::SeqCst), 1);
    assert_eq!(stats.chunks_fetched.load(Ordering::SeqCst), 10);
    // Not the reader's own bytes: f0's chunk is what it fetched.
    let around = stats.read_around_bytes.load(Ordering::SeqCst);
    assert!(stats.bytes.load(Ordering::SeqCst) - around < around);
}

#[test]
fn a_guess_that_lands_while_a_reader_looks_is_not_fetched_again() {
    // f1's reader finds it neither in memory nor on disk; before it looks at the flights, a
    // guess of f1 is sent and lands, and leaves them.
    let t = TenFiles::new("fetch-guess-lands-between", None);
    let node = t.layer.index.get("f1").expect("f1");
    let f1: Vec<(Digest, Chunk)> = node
        .chunks
        .iter()
        .map(|c| (t.layer.desc.digest, c.clone()))
        .collect();
    let fetcher = Arc::downgrade(&t.fetcher);
    *crate::sync::lock(&t.fetcher.between_looks) = Some(Box::new(move || {
        let Some(fetcher) = fetcher.upgrade() else {
            return;
        };
        fetcher.guess(
            f1.clone(),
            Instant::now() + Duration::from_secs(10),
            Line::Back,
        );
        let until = Instant::now() + Duration::from_secs(10);
        while !fetcher.nothing_in_flight() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(2));
        }
    }));
    assert_eq!(t.read("f1"), vec![1; 4096]);
    assert!(crate::sync::lock(&t.fetcher.between_looks).is_none());
    assert_eq!(t.source.ranges.load(Ordering::SeqCst), 1);
    assert_eq!(t.fetcher.stats.chunks_fetched.load(Ordering::SeqCst), 1);
}

#[test]
fn a_large_guess_in_line_is_asked_for_in_pieces_of_half_the_window() {
    // 50 ms away at the assumed 100 Mbit/s: a bandwidth-delay product of 625 KB, a window
    // of two, pieces of one. A file of 3 MiB that does not compress, in 24 chunks adjacent
    // in the blob.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let data: Vec<u8> = (0..3 << 20)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let entries = [(Header::new("big", Kind::Regular), data)];
    let (blob, _) = estargz_layer(&entries, 128 << 10, false);
    let (index, _) = layer_index(&blob, None).expect("an index");
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let source = Arc::new(
        MemoryBlobs::default()
            .with_digest(the_blob(), blob)
            .far(Duration::from_millis(50)),
    );
    let (dir, cache) = scratch_cache("fetch-guess-pieces");
    let fetcher = Arc::new(Fetcher::new(
        runtime.handle().clone(),
        source.clone(),
        cache,
    ));
    let chunks: Vec<(Digest, Chunk)> = index
        .nodes
        .iter()
        .flat_map(|n| n.chunks.iter().map(|c| (the_blob(), c.clone())))
        .collect();
    let compressed: u64 = chunks.iter().map(|(_, c)| c.blob_end - c.blob_offset).sum();
    assert!(compressed > 3_000_000, "the data does not compress");
    fetcher.guess(
        chunks.clone(),
        Instant::now() + Duration::from_secs(10),
        Line::Back,
    );
    let until = Instant::now() + Duration::from_secs(10);
    while !fetcher.nothing_in_flight() {
        assert!(Instant::now() < until, "the guesses landed");
        std::thread::sleep(Duration::from_millis(5));
    }
    let largest = source.largest.load(Ordering::SeqCst);
    assert!(largest <= 625_000, "one request asked for {largest} bytes");
    assert!(source.ranges.load(Ordering::SeqCst) >= 5);
    // All of it was fetched: reading it back asks for nothing more.
    let asked = source.ranges.load(Ordering::SeqCst);
    let refs: Vec<ChunkRef<'_>> = chunks
        .iter()
        .map(|(blob, chunk)| ChunkRef { blob: *blob, chunk })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    fetcher
        .get(&refs, Priority::OnDemand, deadline)
        .expect("all of it, from the cache");
    assert_eq!(source.ranges.load(Ordering::SeqCst), asked);
    drop(fetcher);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A layer of `small` (one 4 KiB chunk) then `big` (3 MiB that does not compress, in 24
/// chunks of 128 KiB, each larger than a piece of the idle fill).
struct SmallAndBig {
    source: Arc<MemoryBlobs>,
    fetcher: Arc<Fetcher>,
    dir: std::path::PathBuf,
    layer: RemoteLayer,
    small: Chunk,
    big: Vec<(Digest, Chunk)>,
}

impl Drop for SmallAndBig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn small_and_big(runtime: &tokio::runtime::Runtime, name: &str, rtt: Duration) -> SmallAndBig {
    small_and_big_of(runtime, name, rtt, None)
}

/// [`small_and_big`] as one layer of an image whose `readers` (and link) its fetcher shares.
fn small_and_big_of(
    runtime: &tokio::runtime::Runtime,
    name: &str,
    rtt: Duration,
    readers: Option<&ImageReaders>,
) -> SmallAndBig {
    let entries = [
        (Header::new("small", Kind::Regular), vec![7; 4096]),
        (
            Header::new("big", Kind::Regular),
            crate::testing::bytes(0x9e37_79b9, 3 << 20, false),
        ),
    ];
    let (blob, layer) = remote_layer(&entries, 128 << 10);
    let source = Arc::new(
        MemoryBlobs::default()
            .with_digest(layer.desc.digest, blob)
            .far(rtt),
    );
    let (dir, cache) = scratch_cache(name);
    let mut fetcher = Fetcher::new(runtime.handle().clone(), source.clone(), cache);
    if let Some(readers) = readers {
        fetcher = fetcher.with_image_readers(readers);
    }
    let fetcher = Arc::new(fetcher);
    let small = layer.index.get("small").expect("small").chunks[0].clone();
    let big: Vec<(Digest, Chunk)> = layer
        .index
        .get("big")
        .expect("big")
        .chunks
        .iter()
        .map(|c| (layer.desc.digest, c.clone()))
        .collect();
    assert_eq!(big.len(), 24);
    assert!(
        big.iter()
            .all(|(_, c)| c.blob_end - c.blob_offset > fill::PIECE)
    );
    SmallAndBig {
        source,
        fetcher,
        dir,
        layer,
        small,
        big,
    }
}

/// Waits until every chunk of `chunks` is cached (or 10 s pass).
fn wait_cached(fetcher: &Fetcher, chunks: &[(Digest, Chunk)]) -> bool {
    let until = Instant::now() + Duration::from_secs(10);
    while !chunks.iter().all(|(_, c)| fetcher.present(&c.digest)) {
        if Instant::now() > until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

#[test]
fn the_idle_fill_asks_for_one_piece_at_a_time_only_while_nothing_else_is_in_flight() {
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    // 20 ms away: a round trip carries more than two pieces.
    let t = small_and_big(&runtime, "fetch-fill", Duration::from_millis(20));
    let (source, fetcher, big, blob) = (&t.source, &t.fetcher, &t.big, t.layer.desc.digest);
    // A reader fetched big's sixth chunk: the fill leaves it out.
    let sixth = [ChunkRef {
        blob,
        chunk: &big[5].1,
    }];
    let deadline = Instant::now() + Duration::from_secs(10);
    fetcher
        .get(&sixth, Priority::OnDemand, deadline)
        .expect("the sixth chunk");
    // A reader's request is held in the registry; the code handed over meanwhile waits.
    source.hold(t.small.blob_offset..t.small.blob_end);
    std::thread::scope(|scope| {
        let reader = scope.spawn(|| {
            let refs = [ChunkRef {
                blob,
                chunk: &t.small,
            }];
            let deadline = Instant::now() + Duration::from_secs(10);
            fetcher.get(&refs, Priority::OnDemand, deadline)
        });
        let until = Instant::now() + Duration::from_secs(10);
        while source.ranges.load(Ordering::SeqCst) < 2 {
            assert!(Instant::now() < until, "the reader asked");
            std::thread::sleep(Duration::from_millis(1));
        }
        fetcher.fill(big.clone());
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            source.ranges.load(Ordering::SeqCst),
            2,
            "no piece went while the reader's request was in flight"
        );
        source.release();
        let got = reader
            .join()
            .expect("no panic")
            .expect("the reader's chunk");
        assert_eq!(*got[0], vec![7; 4096]);
    });
    assert!(wait_cached(fetcher, big), "the fill fetched all of big");
    // One request per piece (each chunk is one), never two at once, nor beside the reader's;
    // none for the chunk the reader had fetched.
    let pieces = big.len() - 1;
    assert_eq!(source.ranges.load(Ordering::SeqCst), 2 + pieces);
    assert_eq!(source.most_at_once.load(Ordering::SeqCst), 1);
    let stats = &fetcher.stats;
    assert_eq!(stats.fill_requests.load(Ordering::SeqCst), pieces as u64);
    let compressed: u64 = big
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 5)
        .map(|(_, (_, c))| c.blob_end - c.blob_offset)
        .sum();
    assert_eq!(stats.fill_bytes.load(Ordering::SeqCst), compressed);
    // Handed over again, cached code asks for nothing.
    fetcher.fill(big.clone());
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(source.ranges.load(Ordering::SeqCst), 2 + pieces);
}

#[test]
fn the_idle_fill_of_one_layer_waits_for_the_requests_of_the_images_other_layers() {
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    // Two layers of an image, each with a fetcher and a registry connection of its own, as
    // the snapshotter serves them, 20 ms away.
    let readers = ImageReaders::new(0);
    let rtt = Duration::from_millis(20);
    let a = small_and_big_of(&runtime, "fetch-fill-image-a", rtt, Some(&readers));
    let b = small_and_big_of(&runtime, "fetch-fill-image-b", rtt, Some(&readers));
    // A reader of layer b waits on the registry; layer a's code is handed to the fill.
    b.source.hold(b.small.blob_offset..b.small.blob_end);
    std::thread::scope(|scope| {
        let reader = scope.spawn(|| {
            let refs = [ChunkRef {
                blob: b.layer.desc.digest,
                chunk: &b.small,
            }];
            let deadline = Instant::now() + Duration::from_secs(10);
            b.fetcher.get(&refs, Priority::OnDemand, deadline)
        });
        let until = Instant::now() + Duration::from_secs(10);
        while b.source.ranges.load(Ordering::SeqCst) < 1 {
            assert!(Instant::now() < until, "the reader asked");
            std::thread::sleep(Duration::from_millis(1));
        }
        a.fetcher.fill(a.big.clone());
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            a.source.ranges.load(Ordering::SeqCst),
            0,
            "no piece of layer a went while layer b's reader waited"
        );
        b.source.release();
        reader
            .join()
            .expect("no panic")
            .expect("the reader's chunk");
    });
    assert!(
        wait_cached(&a.fetcher, &a.big),
        "then the fill fetched all of big"
    );
    assert_eq!(a.source.ranges.load(Ordering::SeqCst), a.big.len());
    assert_eq!(a.source.most_at_once.load(Ordering::SeqCst), 1);
}

#[test]
fn a_layer_sizes_its_guesses_by_the_bandwidth_its_images_other_layers_measured() {
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    // Two layers of an image 20 ms away, each with a fetcher of its own, over a link of
    // 5 MB/s, not the 100 Mbit/s assumed before any answer measured it.
    let readers = ImageReaders::new(0);
    let rtt = Duration::from_millis(20);
    let a = small_and_big_of(&runtime, "fetch-bandwidth-image-a", rtt, Some(&readers));
    let assumed = 250_000; // 20 ms at 12.5 MB/s
    assert_eq!(a.fetcher.link_bdp(), Some(assumed));

    let data = crate::testing::bytes(0x51ed_270b, 5 << 20, false);
    let (blob, b) = remote_layer(&[(Header::new("data", Kind::Regular), data)], 256 << 10);
    let source = Arc::new(
        MemoryBlobs::default()
            .with_digest(b.desc.digest, blob)
            .delayed(rtt)
            .throttled(5e6)
            .far(rtt),
    );
    let (dir, cache) = scratch_cache("fetch-bandwidth-image-b");
    let fetcher =
        Fetcher::new(runtime.handle().clone(), source, cache).with_image_readers(&readers);
    let chunks = &b.index.get("data").expect("data").chunks;
    let refs: Vec<ChunkRef> = chunks
        .iter()
        .map(|chunk| ChunkRef {
            blob: b.desc.digest,
            chunk,
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let got = fetcher
        .get(&refs, Priority::OnDemand, deadline)
        .expect("layer b's data");
    assert_eq!(got.len(), refs.len());
    // Layer b's answers measured the link: at most 5 MB/s (a slow machine only makes them
    // slower), 100 kB in a round trip, give or take the round trip taken out of each.
    let measured = a.fetcher.link_bdp().expect("far");
    assert!(
        measured < assumed * 3 / 5,
        "layer a, which fetched nothing, sizes its guesses by layer b's answers: {measured}"
    );
    assert_eq!(fetcher.link_bdp(), Some(measured), "one link, one measure");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn near_the_registry_there_is_no_idle_fill() {
    // 5 ms away at the assumed 100 Mbit/s: a round trip carries one piece.
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let t = small_and_big(&runtime, "fetch-fill-near", Duration::from_millis(5));
    t.fetcher.fill(t.big.clone());
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(t.source.ranges.load(Ordering::SeqCst), 0);
    assert_eq!(t.fetcher.filler.waiting(), 0, "nothing was queued");
}

#[test]
fn the_idle_fill_ends_when_the_background_download_starts() {
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let t = small_and_big(&runtime, "fetch-fill-stop", Duration::from_millis(20));
    let (source, fetcher, big) = (&t.source, &t.fetcher, &t.big);
    // The first piece is held in the registry; the background download starts meanwhile
    // (it does not count on the link, so the fill would go on beside it).
    let first = &big[0].1;
    source.hold(first.blob_offset..first.blob_end);
    fetcher.fill(big.clone());
    let until = Instant::now() + Duration::from_secs(10);
    while source.ranges.load(Ordering::SeqCst) < 1 {
        assert!(Instant::now() < until, "the first piece was asked for");
        std::thread::sleep(Duration::from_millis(1));
    }
    let stop = crate::shutdown::Shutdown::new();
    let (progress, download) = background::spawn(
        fetcher.clone(),
        Arc::from(vec![t.layer.clone()]),
        background::BackgroundConfig::default(),
        stop.clone(),
    );
    let until = Instant::now() + Duration::from_secs(10);
    while fetcher.filler.waiting() > 0 {
        assert!(Instant::now() < until, "what waited was dropped");
        std::thread::sleep(Duration::from_millis(1));
    }
    source.release();
    download.join().expect("no panic");
    assert!(progress.finished.load(Ordering::SeqCst));
    assert!(wait_cached(fetcher, big));
    // The piece in flight when the download started, and nothing after.
    fetcher.fill(big.clone());
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(fetcher.stats.fill_requests.load(Ordering::SeqCst), 1);
}

#[test]
fn without_a_network_in_between_a_miss_fetches_only_its_own_chunks() {
    let t = TenFiles::new("fetch-no-read-around", None);
    for i in 0..3u8 {
        assert_eq!(t.read(&format!("f{i}")), vec![i; 4096]);
    }
    assert_eq!(t.source.ranges.load(Ordering::SeqCst), 3);
    assert_eq!(
        t.fetcher.stats.read_around_requests.load(Ordering::SeqCst),
        0
    );
}

#[test]
fn readers_that_fetch_most_of_the_image_stop_the_background_yielding() {
    let t = TenFiles::new("fetch-greedy", None);
    let total: u64 = t
        .layer
        .chunks_between(0, t.layer.desc.size)
        .iter()
        .map(|c| c.blob_end - c.blob_offset)
        .sum();
    t.fetcher.serving(total);
    for name in ["f0", "f1", "f2"] {
        t.read(name);
    }
    assert!(!t.fetcher.greedy(), "three files of ten are less than 40 %");
    t.read("f3");
    assert!(t.fetcher.greedy(), "four of ten are 40 %");
    // And the background's waits for readers end at once.
    let _reader = t.fetcher.readers.enter();
    let before = Instant::now();
    t.fetcher.wait_quiet(
        Duration::from_secs(5),
        Instant::now() + Duration::from_secs(5),
        &crate::shutdown::Shutdown::new(),
    );
    assert!(before.elapsed() < Duration::from_secs(5));
}

#[test]
fn the_fetchers_of_an_images_layers_yield_to_and_count_its_readers_together() {
    let bytes = |layer: &RemoteLayer| -> u64 {
        layer
            .chunks_between(0, layer.desc.size)
            .iter()
            .map(|c| c.blob_end - c.blob_offset)
            .sum()
    };
    let (_, one) = ten_files();
    // Two layers of ten files, each served by a fetcher of its own, as the snapshotter
    // serves an image's layers.
    let readers = ImageReaders::new(2 * bytes(&one));
    let a = TenFiles::sharing("fetch-image-readers-a", None, Some(&readers));
    let b = TenFiles::sharing("fetch-image-readers-b", None, Some(&readers));
    // A reader of one layer is a reader of the image: the other layer's background waits.
    {
        let _reader = a.fetcher.readers.enter();
        assert_eq!(b.fetcher.readers.running(), 1);
        assert!(!b.fetcher.readers_quiet_for(Duration::ZERO));
    }
    // 40 % of one layer is 20 % of the image: neither layer's background turns greedy.
    for name in ["f0", "f1", "f2", "f3"] {
        a.read(name);
    }
    assert!(!a.fetcher.greedy() && !b.fetcher.greedy());
    // 40 % of the image, read through both layers: both do.
    for name in ["f0", "f1", "f2", "f3"] {
        b.read(name);
    }
    assert!(a.fetcher.greedy() && b.fetcher.greedy());
    // A layer's own size, told by its background download, does not replace the image's.
    a.fetcher.serving(bytes(&a.layer));
    assert_eq!(
        a.fetcher.readers.image_bytes.load(Ordering::SeqCst),
        2 * bytes(&one)
    );
}

#[test]
fn a_stopping_background_does_not_wait_for_readers_to_go_quiet() {
    let t = TenFiles::new("fetch-quiet-stop", None);
    let _reader = t.fetcher.readers.enter(); // a reader that never ends
    let stop = crate::shutdown::Shutdown::new();
    let trigger = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            stop.trigger();
        })
    };
    let before = Instant::now();
    t.fetcher.wait_quiet(
        Duration::from_secs(1),
        Instant::now() + Duration::from_secs(300),
        &stop,
    );
    trigger.join().expect("the thread ends without a panic");
    // Not the 300 s of its deadline: a few polls after the trigger.
    assert!(
        before.elapsed() < Duration::from_secs(60),
        "{:?}",
        before.elapsed()
    );
}

#[test]
fn chunks_between_lists_whole_members_in_blob_order() {
    let (_, layer) = ten_files();
    let all = layer.chunks_between(0, layer.desc.size);
    assert_eq!(all.len(), 10);
    assert!(all.windows(2).all(|w| w[0].blob_end <= w[1].blob_offset));
    // A range that ends inside f3's member holds f1 and f2 only.
    let (from, to) = (all[1].blob_offset, all[3].blob_end - 1);
    let some = layer.chunks_between(from, to);
    assert_eq!(some.len(), 2);
    assert_eq!(some[0].blob_offset, all[1].blob_offset);
}

#[test]
fn a_start_is_learned_in_the_order_it_read_and_becomes_the_next_mounts_prefetch_list() {
    let t = TenFiles::new("fetch-learn", None);
    let (layer, fetcher) = (&t.layer, &t.fetcher);
    let learned = t.dir.join("learned");
    let stop = crate::shutdown::Shutdown::new();
    let watcher = learn::spawn(
        fetcher.clone(),
        std::slice::from_ref(layer),
        learned.clone(),
        None,
        stop.clone(),
    )
    .expect("a layer with no list is watched");
    for name in ["f7", "f2", "f7", "f4"] {
        t.read(name);
    }
    // The mount goes away before the reads went quiet: what was read is kept all the same.
    stop.trigger();
    watcher.join().expect("the thread ends without a panic");

    let mut again = layer.clone();
    assert_eq!(learn::apply(std::slice::from_mut(&mut again), &learned), 1);
    let files: Vec<&str> = again
        .index
        .prefetch
        .iter()
        .map(|&(node, _)| again.index.nodes[node].path.as_str())
        .collect();
    assert_eq!(files, ["f7", "f2", "f4"], "first read first, once each");
    // A layer with a list is neither watched nor given another.
    assert!(
        learn::spawn(
            fetcher.clone(),
            std::slice::from_ref(&again),
            learned,
            None,
            stop
        )
        .is_none()
    );
}

#[test]
fn a_learned_list_is_checked_against_its_layer() {
    let (_, layer) = ten_files();
    let (dir, _cache) = scratch_cache("fetch-learn-hostile");
    let learned = dir.join("learned");
    std::fs::create_dir_all(&learned).expect("a scratch directory");
    let file = learned.join(layer.desc.digest.hex());
    let f3 = layer.index.get("f3").expect("f3 is in the layer").chunks[0].blob_offset;
    let apply = |text: String| {
        std::fs::write(&file, text).expect("the file is written");
        let mut copy = layer.clone();
        let n = learn::apply(std::slice::from_mut(&mut copy), &learned);
        (n, copy.index.prefetch)
    };
    // Offsets that start no chunk of the layer are dropped.
    let (n, list) = apply(format!(
        r#"{{"layer":"{}","chunks":[{f3},{},999999999]}}"#,
        layer.desc.digest,
        f3 + 1
    ));
    assert_eq!(n, 1);
    assert_eq!(list.len(), 1);
    // Another layer's list under this layer's name, or no JSON at all: ignored.
    let (n, _) = apply(format!(
        r#"{{"layer":"{}","chunks":[{f3}]}}"#,
        Digest::of(b"another layer")
    ));
    assert_eq!(n, 0);
    let (n, _) = apply("not json".into());
    assert_eq!(n, 0);
    // Larger than any list could be: not even read.
    let (n, _) = apply(" ".repeat(33 << 20));
    assert_eq!(n, 0);
    let _ = std::fs::remove_dir_all(dir);
}

/// The ten files' background download with `source`'s failures and the cache's `limit`;
/// returns its progress once it ended, and the source.
fn background_of_ten(
    name: &str,
    failures: usize,
    limit: Option<u64>,
) -> (Arc<background::Progress>, Arc<MemoryBlobs>) {
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let (blob, layer) = ten_files();
    let source = Arc::new(
        MemoryBlobs::default()
            .with_digest(layer.desc.digest, blob)
            .failing_first(failures),
    );
    let dir = std::env::temp_dir().join(format!("imgstream-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cache = Arc::new(
        ChunkCache::open(&CacheConfig {
            dir: dir.join("cache"),
            limit_bytes: limit,
            prefer_uring: false,
        })
        .expect("a cache in a scratch directory"),
    );
    let fetcher = Arc::new(Fetcher::new(
        runtime.handle().clone(),
        source.clone(),
        cache,
    ));
    let config = background::BackgroundConfig {
        concurrency: 1,
        ..Default::default()
    };
    let (progress, handle) = background::spawn(
        fetcher,
        Arc::from(vec![layer]),
        config,
        crate::shutdown::Shutdown::new(),
    );
    handle.join().expect("the thread ends without a panic");
    let _ = std::fs::remove_dir_all(&dir);
    (progress, source)
}

#[test]
fn a_failed_background_batch_is_tried_again_and_the_image_completes() {
    // The ten files are one batch; its first two tries get a 503.
    let (progress, source) = background_of_ten("bg-retry", 2, None);
    assert_eq!(progress.failed_batches.load(Ordering::SeqCst), 0);
    assert!(progress.finished.load(Ordering::SeqCst));
    assert_eq!(
        source.ranges.load(Ordering::SeqCst),
        3,
        "two failures, one success"
    );
}

#[test]
fn a_cache_that_did_not_keep_every_chunk_is_not_called_whole() {
    // Room for two of the ten 4 KiB chunks.
    let (progress, _) = background_of_ten("bg-limit", 0, Some(9000));
    assert_eq!(progress.failed_batches.load(Ordering::SeqCst), 0);
    assert_eq!(progress.chunks_done.load(Ordering::SeqCst), 10);
    assert!(
        !progress.finished.load(Ordering::SeqCst),
        "the download ended, the image is not cached whole"
    );
}

#[test]
fn many_fetchers_hold_at_most_the_one_budget_they_share() {
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    // Room for about three chunk fetches at once (each leases its 4 KiB chunk plus its
    // compressed bytes) and as many kept chunks, shared by eight layers' fetchers read from
    // sixteen threads.
    let memory = Memory::new(2 * (3 * 4096 + 512));
    let mut dirs = Vec::new();
    let mut layers = Vec::new();
    for n in 0..8 {
        let (blob, layer) = ten_files();
        let source = Arc::new(
            MemoryBlobs::default()
                .with_digest(layer.desc.digest, blob)
                .delayed(Duration::from_millis(20)),
        );
        let (dir, cache) = scratch_cache(&format!("fetch-budget-{n}"));
        dirs.push(dir);
        let fetcher = Arc::new(Fetcher::with_budget(
            runtime.handle().clone(),
            source,
            cache,
            memory.clone(),
        ));
        layers.push((fetcher, Arc::new(layer)));
    }
    std::thread::scope(|scope| {
        for (i, (fetcher, layer)) in layers.iter().enumerate() {
            for half in 0..2u8 {
                scope.spawn(move || {
                    for f in (half * 5)..(half * 5 + 5) {
                        let data = read_file(fetcher, layer, &format!("f{f}"));
                        assert_eq!(data, vec![f; 4096], "layer {i}, f{f}");
                    }
                });
            }
        }
    });
    for pool in [&memory.fetches, &memory.kept] {
        let peak = pool.stats.peak.load(Ordering::SeqCst);
        assert!(peak <= pool.limit(), "{peak} leased of {}", pool.limit());
    }
    assert!(
        memory.fetches.stats.waits.load(Ordering::SeqCst) > 0,
        "the budget held fetches back"
    );
    drop(layers);
    assert_eq!(
        memory.fetches.used() + memory.kept.used(),
        0,
        "every lease given back"
    );
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn a_plain_gzip_layer_reads_through_its_span_index_one_span_per_request() {
    use crate::image::gzip::{BuildOptions, MIN_SPAN, SpanIndex};
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let (tar, files) = crate::testing::layer_tar();
    let blob = crate::testing::gzip(&tar, 6);
    let desc = crate::testing::plain_descriptor(&blob);
    let index = SpanIndex::build(blob.as_slice(), BuildOptions { span: MIN_SPAN })
        .expect("the layer indexes");
    let encoded = index.encode().expect("an index encodes");
    let layer = layer::open_indexed(&desc, &index, Digest::of(&encoded)).expect("it opens");
    let source = MemoryBlobs::default().with(blob.clone());
    // A small file in one span: one request, of that span's bytes only.
    let (name, data) = &files[1];
    let got = runtime
        .block_on(layer.read_file(&source, name))
        .expect("it reads");
    assert!(got == *data, "{name} as read differs");
    assert_eq!(source.ranges.load(Ordering::SeqCst), 1);
    // Every file, each the bytes the tar holds; a large one spans several spans, fetched
    // together when adjacent (spans may share a byte).
    for (name, data) in &files {
        let got = runtime
            .block_on(layer.read_file(&source, name))
            .expect("it reads");
        assert!(got == *data, "{name} as read differs");
    }
    let big = layer.index.get("etc/file-5").expect("a 300 KB file");
    assert!(big.chunks.len() >= 4, "{} chunks", big.chunks.len());
    let before = source.ranges.load(Ordering::SeqCst);
    runtime
        .block_on(layer.read_file(&source, "etc/file-5"))
        .expect("it reads");
    assert_eq!(source.ranges.load(Ordering::SeqCst) - before, 1);
    // Through the fetcher, as the filesystem reads: verified, cached, one unit per span.
    let (dir, cache) = scratch_cache("fetch-span");
    let fetcher = Fetcher::new(runtime.handle().clone(), Arc::new(source), cache);
    let refs: Vec<ChunkRef<'_>> = big
        .chunks
        .iter()
        .map(|chunk| ChunkRef {
            blob: desc.digest,
            chunk,
        })
        .collect();
    let units = fetcher
        .get(
            &refs,
            Priority::OnDemand,
            Instant::now() + Duration::from_secs(10),
        )
        .expect("the spans fetch");
    let mut whole = Vec::new();
    for (chunk, unit) in big.chunks.iter().zip(&units) {
        assert_eq!(unit.len() as u64, chunk.unit_len());
        whole.extend_from_slice(chunk.slice(unit).expect("within its span"));
    }
    assert!(whole == files[5].1, "the fetcher's spans hold the file");
    // An index of another layer is refused before anything is read.
    let other = crate::testing::gzip(&tar, 1);
    let err = layer::open_indexed(
        &crate::testing::plain_descriptor(&other),
        &index,
        Digest::of(&encoded),
    )
    .expect_err("another layer's index");
    assert!(matches!(err, layer::LayerError::WrongIndex { .. }), "{err}");
    drop(fetcher);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn windows_kept_apart_are_fetched_beside_their_spans_and_only_theirs() {
    use crate::image::gzip::{BuildOptions, SpanIndex};
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let (tar, files) = crate::testing::layer_tar();
    let blob = crate::testing::gzip(&tar, 6);
    let desc = crate::testing::plain_descriptor(&blob);
    // 64 KiB spans: each at least as long as a window, so a span's window can be the span
    // before it.
    let built = SpanIndex::build(blob.as_slice(), BuildOptions { span: 64 << 10 })
        .expect("the layer indexes");
    let (core, windows) = built.encode_apart().expect("an index encodes");
    let index = SpanIndex::decode(&core).expect("the index reads back");
    let apart = index.windows.expect("its windows are apart");
    assert_eq!(apart.digest, Digest::of(&windows));
    assert!(
        index.spans.iter().all(|s| s.start.window.held() == 0),
        "no window is held in memory"
    );
    let layer = layer::open_indexed(&desc, &index, Digest::of(&core)).expect("it opens");
    // A file whose (first) span resumes mid-member, with a window to fetch.
    let (name, data) = files
        .iter()
        .find(|(name, _)| {
            let node = layer.index.get(name).expect("in the layer");
            node.chunks.first().is_some_and(|c| match &c.unit {
                crate::image::estargz::Unit::Span { start, .. } => start.window.place().is_some(),
                _ => false,
            })
        })
        .expect("a file in a span with a window");
    let node = layer.index.get(name).expect("in the layer");
    let served = |windows: Vec<u8>| {
        Arc::new(
            MemoryBlobs::default()
                .with(blob.clone())
                .with_digest(apart.digest, windows),
        )
    };
    let source = served(windows.clone());
    let (dir, cache) = scratch_cache("fetch-windows-apart");
    let fetcher = Fetcher::new(runtime.handle().clone(), source.clone(), cache);
    let got = read_node(&fetcher, desc.digest, node).expect("the spans fetch");
    assert!(got == *data, "{name} as read differs");
    let asked = crate::sync::lock(&source.asked).clone();
    let window_bytes = asked.get(&apart.digest).copied().unwrap_or_default();
    let spans = node.chunks.len() as u64;
    assert_eq!(
        source.ranges.load(Ordering::SeqCst) as u64,
        1 + 1,
        "one request for the span run, one for its windows"
    );
    assert!(
        window_bytes > 0
            && window_bytes <= spans * (32 << 10)
            && window_bytes < windows.len() as u64,
        "{window_bytes} bytes of windows fetched for {spans} spans, of {}",
        windows.len()
    );
    drop(fetcher);
    // A file over several spans, adjacent in one request: only the first span's window is
    // fetched; each later span's is the end of the span before it, inflated first.
    let big = layer.index.get("etc/file-5").expect("a 300 KB file");
    assert!(big.chunks.len() >= 4, "{} chunks", big.chunks.len());
    let source = served(windows.clone());
    let (dir3, cache) = scratch_cache("fetch-windows-apart-run");
    let fetcher = Fetcher::new(runtime.handle().clone(), source.clone(), cache);
    let got = read_node(&fetcher, desc.digest, big).expect("the spans fetch");
    assert!(got == files[5].1, "the file over several spans differs");
    let first = match &big.chunks[0].unit {
        crate::image::estargz::Unit::Span { start, .. } => start.window.place(),
        _ => None,
    };
    let first_len = first.map_or(0, |p| p.range.1 - p.range.0);
    // Bytes of windows asked for, and requests made.
    let asked = |source: &MemoryBlobs| {
        let windows = crate::sync::lock(&source.asked).get(&apart.digest).copied();
        (
            windows.unwrap_or_default(),
            source.ranges.load(Ordering::SeqCst),
        )
    };
    assert_eq!(
        asked(&source),
        (first_len, 1 + usize::from(first.is_some())),
        "only the first span's window"
    );
    drop(fetcher);
    let _ = std::fs::remove_dir_all(&dir3);
    // The same file read span by span, each a request of its own once the one before is
    // cached: only the first span's window is fetched, each later one's is the span before,
    // read back from the cache.
    let source = served(windows.clone());
    let (dir4, cache) = scratch_cache("fetch-windows-apart-cached");
    let fetcher = Fetcher::new(runtime.handle().clone(), source.clone(), cache);
    let mut got = Vec::new();
    for chunk in &big.chunks {
        let one = crate::image::estargz::Node {
            chunks: vec![chunk.clone()],
            size: chunk.size,
            ..big.clone()
        };
        got.extend(read_node(&fetcher, desc.digest, &one).expect("the span fetches"));
        fetcher.flush_cache_writes();
    }
    assert!(got == files[5].1, "the file read span by span differs");
    assert_eq!(
        asked(&source),
        (first_len, big.chunks.len() + usize::from(first.is_some())),
        "only the first span's window, the others from the cache: a request a span and one \
         for that window"
    );
    drop(fetcher);
    let _ = std::fs::remove_dir_all(&dir4);
    // The same read through the layer's own reader.
    for (name, data) in [(name, data), (&files[5].0, &files[5].1)] {
        let got = runtime
            .block_on(layer.read_file(&*source, name))
            .expect("it reads");
        assert!(got == *data, "{name} read by the layer differs");
    }
    // A window changed in the registry: the span does not match, nothing is served.
    let mut bad = windows.clone();
    let place = node
        .chunks
        .iter()
        .find_map(|c| match &c.unit {
            crate::image::estargz::Unit::Span { start, .. } => start.window.place(),
            _ => None,
        })
        .expect("a window apart");
    bad[place.range.0 as usize + 1] ^= 0x55;
    let source = served(bad);
    let (dir2, cache) = scratch_cache("fetch-windows-apart-bad");
    let fetcher = Fetcher::new(runtime.handle().clone(), source, cache);
    let err = read_node(&fetcher, desc.digest, node).expect_err("a changed window is caught");
    assert!(matches!(err, FetchError::Chunk { .. }), "{err}");
    drop(fetcher);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&dir2);
}

/// The file `node` of blob `blob` through `fetcher`, as the filesystem reads it: its chunks
/// in one get, on demand.
fn read_node(
    fetcher: &Fetcher,
    blob: Digest,
    node: &crate::image::estargz::Node,
) -> Result<Vec<u8>, FetchError> {
    let refs: Vec<ChunkRef<'_>> = node
        .chunks
        .iter()
        .map(|chunk| ChunkRef { blob, chunk })
        .collect();
    let units = fetcher.get(
        &refs,
        Priority::OnDemand,
        Instant::now() + Duration::from_secs(10),
    )?;
    let mut out = Vec::new();
    for (chunk, unit) in node.chunks.iter().zip(&units) {
        out.extend_from_slice(chunk.slice(unit).expect("within its span"));
    }
    Ok(out)
}

/// A plain gzip layer served from memory, opened through its span index, and a fetcher for
/// it over a scratch cache.
struct Indexed {
    /// What the fetcher's requests run on, alive as long as it is.
    _runtime: tokio::runtime::Runtime,
    layer: RemoteLayer,
    source: Arc<MemoryBlobs>,
    dir: std::path::PathBuf,
    fetcher: Arc<Fetcher>,
}

/// Indexes `served` (a gzip layer of `tar` or of other bytes) and opens it as the layer
/// `named` names: the descriptor says `named`'s digest, the registry serves `served` under it.
fn indexed(name: &str, named: &[u8], served: Vec<u8>) -> Indexed {
    use crate::image::gzip::{BuildOptions, MIN_SPAN, SpanIndex};
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let mut index = SpanIndex::build(served.as_slice(), BuildOptions { span: MIN_SPAN })
        .expect("the layer indexes");
    let mut desc = crate::testing::plain_descriptor(named);
    desc.size = served.len() as u64;
    index.layer = desc.digest;
    let encoded = index.encode().expect("an index encodes");
    let layer = layer::open_indexed(&desc, &index, Digest::of(&encoded)).expect("it opens");
    let source = Arc::new(MemoryBlobs::default().with_digest(desc.digest, served));
    let (dir, cache) = scratch_cache(name);
    let fetcher = Arc::new(Fetcher::new(
        runtime.handle().clone(),
        source.clone(),
        cache,
    ));
    Indexed {
        _runtime: runtime,
        layer,
        source,
        dir,
        fetcher,
    }
}

impl Indexed {
    /// File `path` through the fetcher, as the filesystem reads it.
    fn read(&self, path: &str) -> Result<Vec<u8>, FetchError> {
        let node = self.layer.index.get(path).expect("in the layer");
        read_node(&self.fetcher, self.layer.desc.digest, node)
    }

    /// The background download, run to its end: 1 MiB ranges (a 4 MB/s cap), two at once.
    fn background(&self) -> Arc<background::Progress> {
        let config = background::BackgroundConfig {
            concurrency: 2,
            bandwidth: Some(4 << 20),
            ..Default::default()
        };
        let (progress, handle) = background::spawn(
            self.fetcher.clone(),
            Arc::from(vec![self.layer.clone()]),
            config,
            crate::shutdown::Shutdown::new(),
        );
        handle.join().expect("the thread ends without a panic");
        progress
    }

    fn spans(&self) -> Vec<Digest> {
        whole::cuts(&self.layer).iter().map(|c| c.digest).collect()
    }
}

impl Drop for Indexed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn a_span_indexed_layer_is_read_through_in_order_checked_whole_and_cached() {
    let (tar, files) = crate::testing::layer_tar();
    let blob = crate::testing::gzip(&tar, 6);
    let size = blob.len() as u64;
    let t = indexed("bg-whole", &blob, blob.clone());
    // A reader first: its span is fetched (and cached) on demand.
    assert!(t.read(&files[5].0).expect("it reads") == files[5].1);
    let on_demand = t.source.ranges.load(Ordering::SeqCst);
    let progress = t.background();
    assert!(
        progress.finished.load(Ordering::SeqCst),
        "the image is whole"
    );
    assert_eq!(progress.failed_batches.load(Ordering::SeqCst), 0);
    assert_eq!(progress.quarantined.load(Ordering::SeqCst), 0);
    assert_eq!(t.fetcher.stats.layers_verified.load(Ordering::SeqCst), 1);
    // The whole layer once, in 1 MiB ranges, the spans readers had fetched included.
    let ranges = t.source.ranges.load(Ordering::SeqCst) - on_demand;
    assert_eq!(ranges as u64, size.div_ceil(1 << 20));
    assert_eq!(
        t.fetcher.stats.background_bytes.load(Ordering::SeqCst),
        size
    );
    assert_eq!(
        progress.chunks_done.load(Ordering::SeqCst),
        progress.chunks_total.load(Ordering::SeqCst)
    );
    for span in t.spans() {
        assert!(t.fetcher.cache().contains(&span), "span {span} cached");
    }
    // Every file now reads from the cache, with no request.
    let before = t.source.ranges.load(Ordering::SeqCst);
    for (name, data) in &files {
        assert!(t.read(name).expect("it reads") == *data, "{name}");
    }
    assert_eq!(t.source.ranges.load(Ordering::SeqCst), before);
}

#[test]
fn a_layer_that_is_not_what_its_descriptor_names_is_quarantined_and_its_reads_fail() {
    use crate::image::gzip::{BuildOptions, SpanIndex};
    let (tar, files) = crate::testing::layer_tar();
    let genuine = crate::testing::gzip(&tar, 6);
    // Other bytes under the genuine layer's digest, with an index built from them (a
    // registry's storage and an index publisher both compromised): every span matches its
    // digest, so only the layer digest can tell.
    let entry = SpanIndex::build(genuine.as_slice(), BuildOptions::default())
        .expect("it indexes")
        .entries
        .into_iter()
        .find(|e| e.header.name == files[5].0)
        .expect("listed");
    let mut other_tar = tar.clone();
    other_tar[entry.data_offset as usize + 100] ^= 0xff;
    let other = crate::testing::gzip(&other_tar, 6);
    let t = indexed("bg-quarantine", &genuine, other);
    let read = t
        .read(&files[5].0)
        .expect("served: its span matches the index");
    assert!(
        read != files[5].1,
        "the other bytes, as the index describes them"
    );
    // Chunks fetched for a reader are written behind it.
    t.fetcher.flush_cache_writes();
    assert!(t.spans().iter().any(|s| t.fetcher.cache().contains(s)));

    let progress = t.background();
    assert_eq!(progress.quarantined.load(Ordering::SeqCst), 1);
    assert!(!progress.finished.load(Ordering::SeqCst));
    assert_eq!(t.fetcher.stats.layers_quarantined.load(Ordering::SeqCst), 1);
    assert_eq!(t.fetcher.stats.layers_verified.load(Ordering::SeqCst), 0);
    assert!(t.fetcher.is_quarantined(&t.layer.desc.digest));
    for span in t.spans() {
        assert!(
            !t.fetcher.cache().contains(&span),
            "span {span} left cached"
        );
    }
    for (name, _) in &files[1..] {
        let err = t
            .read(name)
            .expect_err("a quarantined layer serves nothing");
        assert!(matches!(err, FetchError::Quarantined { .. }), "{err}");
    }
}

#[test]
fn a_prefetch_on_a_cached_layer_reads_nothing_back() {
    let t = TenFiles::new("fetch-prefetch-cached", None);
    let mut layer = t.layer.clone();
    layer.index.prefetch = (0..layer.index.nodes.len())
        .flat_map(|node| (0..layer.index.nodes[node].chunks.len()).map(move |c| (node, c)))
        .collect();
    assert!(!layer.index.prefetch.is_empty());
    let layers: Arc<[RemoteLayer]> = Arc::from(vec![layer]);
    let prefetch = |fetcher: &Arc<Fetcher>| {
        let stop = crate::shutdown::Shutdown::new();
        prefetch::spawn(
            fetcher.clone(),
            layers.clone(),
            Duration::from_secs(10),
            None,
            stop,
        )
        .expect("a layer with a list is prefetched")
        .join()
        .expect("the prefetch ends without a panic");
    };
    prefetch(&t.fetcher);
    t.fetcher.flush_cache_writes();
    let fetched = t.fetcher.stats.chunks_fetched.load(Ordering::SeqCst);
    assert_eq!(fetched, 10, "the first mount fetches the list");

    // The next mount of the image (nothing in memory) finds every chunk on disk.
    let cache = t.fetcher.cache().clone();
    let hits = cache.stats.hits.load(Ordering::SeqCst);
    let again = Arc::new(Fetcher::new(
        t._runtime.handle().clone(),
        t.source.clone(),
        cache.clone(),
    ));
    prefetch(&again);
    assert_eq!(again.stats.requests.load(Ordering::SeqCst), 0);
    assert_eq!(
        cache.stats.hits.load(Ordering::SeqCst),
        hits,
        "cached chunks are looked up, not read"
    );
    // Readers still get every file, from the cache.
    assert_eq!(read_file(&again, &layers[0], "f3"), t.read("f3"));
    assert_eq!(again.stats.requests.load(Ordering::SeqCst), 0);
}

/// An eStargz layer of `files` small files, with its descriptor and where its TOC starts.
fn layer_of_files(files: usize) -> (Vec<u8>, crate::oci::manifest::Descriptor, u64) {
    let entries: Vec<(Header, Vec<u8>)> = (0..files)
        .map(|i| {
            let name = format!("etc/ssl/certs/certificate-authority-number-{i:05}.pem");
            (
                Header::new(&name, Kind::Regular),
                format!("{i}").into_bytes(),
            )
        })
        .collect();
    let (blob, summary) = estargz_layer(&entries, 4096, false);
    let desc = crate::testing::layer_descriptor(&summary);
    let footer = &blob[blob.len() - estargz::FOOTER_SIZE as usize..];
    let toc_offset = estargz::parse_footer(footer).unwrap();
    (blob, desc, toc_offset)
}

/// Opens `desc` from `source` (with `tail` asked beside the manifest) and returns its files.
fn open_counting(
    source: &MemoryBlobs,
    desc: &crate::oci::manifest::Descriptor,
    tail: Option<(bytes::Bytes, u64)>,
) -> Vec<String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let opened = runtime
        .block_on(layer::open_cached_with_tail(source, desc, None, tail))
        .expect("the layer opens");
    opened.index.nodes.iter().map(|n| n.path.clone()).collect()
}

#[test]
fn a_layers_footer_and_toc_come_in_one_request_unless_the_toc_is_larger() {
    let far = || MemoryBlobs::default().far(Duration::from_millis(50));
    // Few files, 50 ms away: the TOC is within the blob's end that one request asks for.
    let (blob, desc, toc_offset) = layer_of_files(50);
    let rtt = Some(Duration::from_millis(50));
    assert!(desc.size - toc_offset <= layer::toc_tail(desc.size, rtt));
    let source = far().with(blob.clone());
    let files = open_counting(&source, &desc, None);
    assert_eq!(files.len(), layer_index(&blob, None).unwrap().0.nodes.len());
    assert_eq!(source.ranges.load(Ordering::SeqCst), 1);
    assert_eq!(
        source.asked.lock().unwrap()[&desc.digest],
        layer::toc_tail(desc.size, rtt),
        "the blob's end, no more"
    );
    // With no round trip to speak of: the footer, then the TOC.
    let source = MemoryBlobs::default().with(blob.clone());
    open_counting(&source, &desc, None);
    assert_eq!(source.ranges.load(Ordering::SeqCst), 2);
    assert_eq!(
        source.asked.lock().unwrap()[&desc.digest],
        desc.size - toc_offset
    );

    // Thousands of files: a TOC larger than that end; its start is the one request more,
    // and no byte is asked for twice.
    let (blob, desc, toc_offset) = layer_of_files(4000);
    assert!(desc.size - toc_offset > layer::toc_tail(desc.size, rtt));
    let (expected, _) = layer_index(&blob, None).unwrap();
    let source = far().with(blob.clone());
    let files = open_counting(&source, &desc, None);
    assert_eq!(files.len(), expected.nodes.len());
    assert_eq!(source.ranges.load(Ordering::SeqCst), 2);
    assert_eq!(
        source.asked.lock().unwrap()[&desc.digest],
        desc.size - toc_offset,
        "the TOC and footer, each byte once"
    );

    // The end asked for beside the manifest: the footer alone costs the TOC's request, a
    // part of the TOC the rest of it, all of it none.
    let end = |len: u64| {
        let start = (desc.size - len) as usize;
        Some((bytes::Bytes::copy_from_slice(&blob[start..]), desc.size))
    };
    for (len, requests) in [
        (estargz::FOOTER_SIZE, 1),
        ((desc.size - toc_offset) / 2, 1),
        (desc.size - toc_offset, 0),
        (desc.size, 0),
    ] {
        let source = far().with(blob.clone());
        let files = open_counting(&source, &desc, end(len));
        assert_eq!(files.len(), expected.nodes.len(), "{len} bytes at the end");
        assert_eq!(
            source.ranges.load(Ordering::SeqCst),
            requests,
            "{len} bytes at the end"
        );
    }
    // An end of another blob's size is not used; one shorter than a footer neither.
    for wrong in [
        Some((
            bytes::Bytes::copy_from_slice(&blob[blob.len() - 100..]),
            desc.size + 1,
        )),
        Some((
            bytes::Bytes::copy_from_slice(&blob[blob.len() - 10..]),
            desc.size,
        )),
    ] {
        let source = far().with(blob.clone());
        assert_eq!(
            open_counting(&source, &desc, wrong).len(),
            expected.nodes.len()
        );
        assert_eq!(source.ranges.load(Ordering::SeqCst), 2);
    }
}

#[test]
fn the_end_worth_asking_for_is_what_the_link_carries_in_a_round_trip() {
    let ms = |ms| Some(Duration::from_millis(ms));
    assert_eq!(layer::tail_worth(None), estargz::FOOTER_SIZE);
    assert_eq!(layer::tail_worth(ms(0)), estargz::FOOTER_SIZE);
    // 20 ms at 100 Mbit/s: 250 KB; 50 ms: more than the cap.
    assert!((249_999..=250_000).contains(&layer::tail_worth(ms(20))));
    assert_eq!(layer::tail_worth(ms(50)), layer::TOC_TAIL);
    // A layer's size bounds it: 1/256 of it, at least 64 KiB, never more than the blob.
    assert_eq!(layer::toc_tail(140 << 20, ms(50)), layer::TOC_TAIL);
    assert_eq!(layer::toc_tail(32 << 20, ms(50)), 128 << 10);
    assert_eq!(layer::toc_tail(1 << 20, ms(50)), 64 << 10);
    assert_eq!(layer::toc_tail(10_000, ms(50)), 10_000);
    assert_eq!(layer::toc_tail(32 << 20, None), estargz::FOOTER_SIZE);
}
