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

/// Ten 4 KiB files `f0`..`f9`, one chunk each, in order in the blob; the layer as mounted.
fn ten_files() -> (Vec<u8>, RemoteLayer) {
    let entries: Vec<(Header, Vec<u8>)> = (0..10u8)
        .map(|i| (Header::new(&format!("f{i}"), Kind::Regular), vec![i; 4096]))
        .collect();
    let (blob, summary) = estargz_layer(&entries, 4096, false);
    let (index, toc_digest) = layer_index(&blob, None).unwrap();
    let layer = RemoteLayer::new(
        crate::testing::layer_descriptor(&summary),
        index,
        toc_digest,
    );
    (blob, layer)
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
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (blob, layer) = ten_files();
    // 50 ms away: the window is two bandwidth-delay products at the assumed 100 Mbit/s,
    // 1.25 MB, far more than the nine files after f0.
    let source = Arc::new(
        MemoryBlobs::default()
            .with_digest(layer.desc.digest, blob)
            .far(Duration::from_millis(50)),
    );
    let (dir, cache) = scratch_cache("fetch-read-around");
    let fetcher = Arc::new(Fetcher::new(
        runtime.handle().clone(),
        source.clone(),
        cache,
    ));
    assert_eq!(read_file(&fetcher, &layer, "f0"), vec![0; 4096]);
    // f0's own request, and one beside it for the rest.
    for i in 1..10u8 {
        assert_eq!(read_file(&fetcher, &layer, &format!("f{i}")), vec![i; 4096]);
    }
    assert_eq!(source.ranges.load(Ordering::SeqCst), 2);
    assert_eq!(fetcher.stats.read_around_requests.load(Ordering::SeqCst), 1);
    assert_eq!(fetcher.stats.chunks_fetched.load(Ordering::SeqCst), 10);
    // Not the reader's own bytes: f0's chunk is what it fetched.
    assert!(fetcher.on_demand_bytes() < fetcher.stats.read_around_bytes.load(Ordering::SeqCst));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn without_a_network_in_between_a_miss_fetches_only_its_own_chunks() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (blob, layer) = ten_files();
    let source = Arc::new(MemoryBlobs::default().with_digest(layer.desc.digest, blob));
    let (dir, cache) = scratch_cache("fetch-no-read-around");
    let fetcher = Arc::new(Fetcher::new(
        runtime.handle().clone(),
        source.clone(),
        cache,
    ));
    for i in 0..3u8 {
        assert_eq!(read_file(&fetcher, &layer, &format!("f{i}")), vec![i; 4096]);
    }
    assert_eq!(source.ranges.load(Ordering::SeqCst), 3);
    assert_eq!(fetcher.stats.read_around_requests.load(Ordering::SeqCst), 0);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn readers_that_fetch_a_quarter_of_the_image_stop_the_background_yielding() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (blob, layer) = ten_files();
    let source = Arc::new(MemoryBlobs::default().with_digest(layer.desc.digest, blob));
    let (dir, cache) = scratch_cache("fetch-greedy");
    let fetcher = Arc::new(Fetcher::new(runtime.handle().clone(), source, cache));
    let total: u64 = layer
        .chunks_between(0, layer.desc.size)
        .iter()
        .map(|c| c.blob_end - c.blob_offset)
        .sum();
    fetcher.serving(total);
    read_file(&fetcher, &layer, "f0");
    read_file(&fetcher, &layer, "f1");
    assert!(
        !fetcher.greedy(),
        "two files of ten are less than a quarter"
    );
    read_file(&fetcher, &layer, "f2");
    assert!(fetcher.greedy(), "three of ten are more");
    // And the background's waits for readers end at once.
    let _reader = fetcher.readers.enter();
    let before = Instant::now();
    fetcher.wait_quiet(
        Duration::from_secs(5),
        Instant::now() + Duration::from_secs(5),
    );
    assert!(before.elapsed() < Duration::from_secs(5));
    let _ = std::fs::remove_dir_all(dir);
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
