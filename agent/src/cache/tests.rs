//! The chunk store: round trips, corruption caught, key spaces apart, the limit held, and
//! eviction of the least recently used unmounted images.

use super::*;

fn config(name: &str, limit: Option<u64>, uring: bool) -> CacheConfig {
    let dir = std::env::temp_dir().join(format!("imgstream-cache-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    CacheConfig {
        dir,
        limit_bytes: limit,
        prefer_uring: uring,
    }
}

/// What an empty cache's directories take on disk here, and the blocks of a small entry.
fn empty_cache() -> (u64, u64) {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let n = CALLS.fetch_add(1, Ordering::Relaxed);
    let cfg = config(&format!("empty-{n}"), None, false);
    let cache = ChunkCache::open(&cfg).unwrap();
    let sizes = (cache.usage(), cache.estimate(1));
    drop(cache);
    fs::remove_dir_all(&cfg.dir).unwrap();
    sizes
}

#[test]
fn stores_reads_and_survives_reopening() {
    for uring in [true, false] {
        let cfg = config(if uring { "uring" } else { "sync" }, None, uring);
        let cache = ChunkCache::open(&cfg).unwrap();
        assert_eq!(cache.engine_name(), if uring { "io_uring" } else { "sync" });
        let data = vec![7u8; 100_000];
        let d = Digest::of(&data);
        assert_eq!(cache.get(&d).unwrap(), None);
        assert!(cache.put(&d, &data).unwrap());
        assert_eq!(cache.get(&d).unwrap().as_deref(), Some(&data[..]));
        // Usage is what the directory takes on disk, as `du` counts it.
        assert_eq!(cache.usage(), disk_usage(&cfg.dir));
        assert!(cache.usage() >= 100_016);
        // Private image data: directories 0700, chunk files 0600.
        let mode = |p: &std::path::Path| {
            use std::os::unix::fs::PermissionsExt;
            fs::metadata(p).unwrap().permissions().mode() & 0o7777
        };
        assert_eq!(mode(&cfg.dir.join("chunks")), 0o700);
        assert_eq!(mode(cache.path(&d).parent().unwrap()), 0o700);
        assert_eq!(mode(&cache.path(&d)), 0o600);
        drop(cache);
        let again = ChunkCache::open(&cfg).unwrap();
        assert_eq!(
            again.usage(),
            disk_usage(&cfg.dir),
            "usage is measured from disk"
        );
        assert_eq!(again.get(&d).unwrap().as_deref(), Some(&data[..]));
        fs::remove_dir_all(&cfg.dir).unwrap();
    }
}

#[test]
fn a_flipped_byte_is_caught_and_quarantined() {
    let cfg = config("flip", None, true);
    let cache = ChunkCache::open(&cfg).unwrap();
    let data = b"some chunk data".repeat(100);
    let d = Digest::of(&data);
    cache.put(&d, &data).unwrap();
    let path = cache.path(&d);
    let mut bytes = fs::read(&path).unwrap();
    bytes[HEADER + 500] ^= 0x01;
    fs::write(&path, bytes).unwrap();
    assert_eq!(
        cache.get(&d).unwrap(),
        None,
        "corrupt data is never returned"
    );
    assert_eq!(cache.stats.corrupt.load(Ordering::Relaxed), 1);
    assert!(!path.exists());
    assert_eq!(fs::read_dir(cfg.dir.join("quarantine")).unwrap().count(), 1);
    // Stored again, served again.
    cache.put(&d, &data).unwrap();
    assert_eq!(cache.get(&d).unwrap().as_deref(), Some(&data[..]));
    // A truncated file and a foreign file are caught too.
    fs::write(&path, b"ISC1").unwrap();
    assert_eq!(cache.get(&d).unwrap(), None);
    // Quarantined entries still take their blocks, and are counted; the oldest go beyond
    // what the quarantine keeps.
    assert_eq!(cache.usage(), disk_usage(&cfg.dir));
    for _ in 0..QUARANTINE_KEPT + 3 {
        cache.put(&d, &data).unwrap();
        fs::write(&path, b"ISC1 torn").unwrap();
        assert_eq!(cache.get(&d).unwrap(), None);
    }
    assert_eq!(
        fs::read_dir(cfg.dir.join("quarantine")).unwrap().count(),
        QUARANTINE_KEPT
    );
    assert_eq!(cache.usage(), disk_usage(&cfg.dir));
    fs::remove_dir_all(&cfg.dir).unwrap();
}

#[test]
fn metadata_and_chunks_never_share_a_key() {
    let cfg = config("meta", None, false);
    let cache = ChunkCache::open(&cfg).unwrap();
    let chunk = b"chunk bytes".to_vec();
    let d = Digest::of(&chunk);
    cache.put(&d, &chunk).unwrap();
    // The same digest names no TOC and no manifest until one is stored under it.
    assert_eq!(cache.get_toc(&d).unwrap(), None);
    assert_eq!(cache.get_manifest(&d).unwrap(), None);
    assert!(cache.put_toc(&d, 1234, b"toc member").unwrap());
    assert!(cache.put_manifest(&d, b"{}").unwrap());
    let toc = cache.get_toc(&d).unwrap().unwrap();
    assert_eq!((toc.offset, &toc.member[..]), (1234, &b"toc member"[..]));
    assert_eq!(cache.get_manifest(&d).unwrap().as_deref(), Some(&b"{}"[..]));
    assert_eq!(
        cache.get(&d).unwrap().as_deref(),
        Some(&chunk[..]),
        "the chunk is its own"
    );
    drop(cache);
    let again = ChunkCache::open(&cfg).unwrap();
    assert_eq!(
        again.usage(),
        disk_usage(&cfg.dir),
        "metadata counts against the limit, measured from disk"
    );
    assert_eq!(again.usage(), empty_cache().0 + 3 * again.estimate(1));
    fs::remove_dir_all(&cfg.dir).unwrap();
}

#[test]
fn the_limit_is_never_exceeded() {
    let (base, block) = empty_cache();
    let cfg = config("limit", Some(base + 3 * block), false);
    let cache = ChunkCache::open(&cfg).unwrap();
    let chunks: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 1000]).collect();
    let stored: Vec<bool> = chunks
        .iter()
        .map(|c| cache.put(&Digest::of(c), c).unwrap())
        .collect();
    assert_eq!(stored, [true, true, true, false, false]);
    assert!(cache.usage() <= base + 3 * block);
    assert_eq!(cache.usage(), disk_usage(&cfg.dir));
    fs::remove_dir_all(&cfg.dir).unwrap();
}

#[test]
fn least_recently_used_unmounted_images_make_room_and_mounted_ones_keep_theirs() {
    let dir = std::env::temp_dir().join(format!("imgstream-evict-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let chunk = |tag: u8| vec![tag; 1000];
    // Each chunk, and each image's record, takes one block.
    let (base, per) = empty_cache();
    let limit = base + 6 * per;
    let cfg = CacheConfig {
        dir: dir.clone(),
        limit_bytes: Some(limit),
        prefer_uring: false,
    };
    let cache = ChunkCache::open(&cfg).unwrap();
    let (old, mounted, shared) = (chunk(1), chunk(2), chunk(9));
    let key = |n: u8| Digest::of(&[n]);
    // An old image (chunks 1 + shared), unmounted; a mounted one (chunks 2 + shared).
    drop(
        cache
            .pin_image(&key(1), &[Digest::of(&old), Digest::of(&shared)])
            .unwrap(),
    );
    std::thread::sleep(std::time::Duration::from_millis(20));
    let _pin = cache
        .pin_image(&key(2), &[Digest::of(&mounted), Digest::of(&shared)])
        .unwrap();
    for c in [&old, &mounted, &shared] {
        assert!(cache.put(&Digest::of(c), c).unwrap());
    }
    assert_eq!(cache.usage(), base + 5 * per);
    // Two more chunks do not fit: the old image's own chunk goes, the shared one stays.
    assert!(cache.put(&Digest::of(&chunk(3)), &chunk(3)).unwrap());
    assert!(cache.put(&Digest::of(&chunk(4)), &chunk(4)).unwrap());
    assert!(
        !cache.contains(&Digest::of(&old)),
        "the unmounted image's chunk was evicted"
    );
    assert!(
        cache.contains(&Digest::of(&shared)),
        "a chunk of a mounted image stays"
    );
    assert!(cache.contains(&Digest::of(&mounted)));
    assert!(cache.usage() <= limit);
    assert_eq!(cache.stats.evicted.load(Ordering::Relaxed), 1);
    // The old image's record went with it: one more chunk takes its block. Then nothing is
    // left to evict: the next chunk is refused, the limit holds.
    assert!(cache.put(&Digest::of(&chunk(5)), &chunk(5)).unwrap());
    assert!(!cache.put(&Digest::of(&chunk(6)), &chunk(6)).unwrap());
    assert!(cache.usage() <= limit);
    assert_eq!(cache.usage(), disk_usage(&dir));
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn cached_tocs_and_manifests_are_evicted_like_chunks() {
    let cfg = config("evict-meta", None, false);
    // Each entry, and each image's record, takes one block.
    let (base, per) = empty_cache();
    let limit = base + 6 * per;
    let cfg = CacheConfig {
        limit_bytes: Some(limit),
        ..cfg
    };
    let cache = ChunkCache::open(&cfg).expect("a cache");
    let bytes = |tag: u8| vec![tag; 1000];
    let (old_toc, old_manifest, orphan, mounted_toc) = (bytes(1), bytes(2), bytes(3), bytes(4));
    let digest = |b: &[u8]| Digest::of(b);
    // An unmounted image whose record names its TOC and manifest; a mounted one with a TOC.
    drop(
        cache
            .pin_image(&digest(b"old"), &[digest(&old_toc), digest(&old_manifest)])
            .expect("a record"),
    );
    let _pin = cache
        .pin_image(&digest(b"mounted"), &[digest(&mounted_toc)])
        .expect("a record");
    assert!(
        cache
            .put_toc(&digest(&old_toc), 0, &old_toc[8..])
            .expect("written")
    );
    assert!(
        cache
            .put_manifest(&digest(&old_manifest), &old_manifest)
            .expect("written")
    );
    // A manifest no image record names (an index, an image opened and never mounted).
    assert!(
        cache
            .put_manifest(&digest(&orphan), &orphan)
            .expect("written")
    );
    assert!(
        cache
            .put_toc(&digest(&mounted_toc), 0, &mounted_toc[8..])
            .expect("written")
    );
    assert_eq!(cache.usage(), limit);

    // Four chunks need the room of four entries: the unmounted image's TOC, manifest and
    // record go first, then the orphan; the mounted image's TOC stays.
    for tag in [11, 12, 13, 14] {
        assert!(
            cache
                .put(&digest(&bytes(tag)), &bytes(tag))
                .expect("written"),
            "chunk {tag} found room"
        );
    }
    assert_eq!(cache.get_toc(&digest(&old_toc)).expect("readable"), None);
    assert_eq!(
        cache
            .get_manifest(&digest(&old_manifest))
            .expect("readable"),
        None
    );
    assert_eq!(
        cache.get_manifest(&digest(&orphan)).expect("readable"),
        None
    );
    assert!(
        cache
            .get_toc(&digest(&mounted_toc))
            .expect("readable")
            .is_some(),
        "a mounted image's TOC stays"
    );
    assert_eq!(cache.stats.evicted.load(Ordering::Relaxed), 3);
    assert!(cache.usage() <= limit);
    // Nothing else may go: the limit holds.
    assert!(
        !cache
            .put(&digest(&bytes(15)), &bytes(15))
            .expect("no error")
    );
    assert_eq!(cache.usage(), disk_usage(&cfg.dir));
    fs::remove_dir_all(&cfg.dir).expect("cleaned up");
}

#[test]
fn a_released_image_gives_back_what_it_alone_used_at_once() {
    let cfg = config("release", None, false);
    let cache = ChunkCache::open(&cfg).expect("a cache");
    // Each entry, and each image's record, takes one block.
    let (base, per) = empty_cache();
    let chunk = |tag: u8| vec![tag; 1000];
    let (own, shared, other, manifest) = (chunk(1), chunk(2), chunk(3), chunk(4));
    let key = |n: u8| Digest::of(&[n]);
    let released = cache
        .pin_image(
            &key(1),
            &[Digest::of(&own), Digest::of(&shared), Digest::of(&manifest)],
        )
        .expect("a record");
    // Another image shares a chunk; it is not mounted now, and keeps its record.
    drop(
        cache
            .pin_image(&key(2), &[Digest::of(&other), Digest::of(&shared)])
            .expect("a record"),
    );
    for c in [&own, &shared, &other] {
        assert!(cache.put(&Digest::of(c), c).expect("written"));
    }
    assert!(
        cache
            .put_manifest(&Digest::of(&manifest), &manifest)
            .expect("written")
    );
    // Mounted (pinned): nothing is given back.
    assert_eq!(cache.release_image(&key(1)), None);
    assert!(cache.contains(&Digest::of(&own)));
    drop(released);
    // Unmounted: its own chunk and manifest go at once, the shared chunk stays.
    let freed = cache.release_image(&key(1)).expect("released");
    assert!(!cache.contains(&Digest::of(&own)));
    assert!(
        cache
            .get_manifest(&Digest::of(&manifest))
            .expect("read")
            .is_none()
    );
    assert!(cache.contains(&Digest::of(&shared)));
    assert!(cache.contains(&Digest::of(&other)));
    assert_eq!(
        cache.usage(),
        base + 3 * per,
        "shared, other, the other's record"
    );
    assert_eq!(freed, 3 * per, "own, manifest, record");
    // Its record is gone: a second release finds nothing, and so does eviction.
    assert_eq!(cache.release_image(&key(1)), None);
    assert!(
        !images::dir(&cfg.dir)
            .join(format!("{}.chunks", key(1).hex()))
            .exists()
    );
    // The other image, released in turn, takes the shared chunk with it.
    assert_eq!(cache.release_image(&key(2)), Some(3 * per));
    assert_eq!(cache.usage(), base);
    assert_eq!(cache.usage(), disk_usage(&cfg.dir));
    fs::remove_dir_all(&cfg.dir).expect("cleaned up");
}

#[test]
fn chunks_of_the_sharded_layout_are_moved_into_the_flat_one() {
    let cfg = config("flatten", None, false);
    let cache = ChunkCache::open(&cfg).unwrap();
    let data = b"an older chunk".to_vec();
    let d = Digest::of(&data);
    cache.put(&d, &data).unwrap();
    drop(cache);
    let shard = cfg.dir.join("chunks").join(&d.hex()[..2]);
    fs::create_dir_all(&shard).unwrap();
    fs::rename(cfg.dir.join("chunks").join(d.hex()), shard.join(d.hex())).unwrap();
    let cache = ChunkCache::open(&cfg).unwrap();
    assert_eq!(cache.get(&d).unwrap().as_deref(), Some(&data[..]));
    assert!(!shard.exists());
    assert_eq!(cache.usage(), disk_usage(&cfg.dir));
    fs::remove_dir_all(&cfg.dir).unwrap();
}

#[test]
fn an_images_usage_is_what_it_has_cached_and_space_reports_the_room_left() {
    let (base, per) = empty_cache();
    let cfg = config("image-usage", Some(base + 10 * per), false);
    let cache = ChunkCache::open(&cfg).unwrap();
    let (a, b, c) = (vec![1u8; 1000], vec![2u8; 5000], vec![3u8; 1000]);
    let key = Digest::of(b"image");
    drop(
        cache
            .pin_image(&key, &[Digest::of(&a), Digest::of(&b), Digest::of(&c)])
            .unwrap(),
    );
    assert_eq!(cache.image_usage(&key), (per, 1), "the record alone");
    cache.put(&Digest::of(&a), &a).unwrap();
    cache.put(&Digest::of(&b), &b).unwrap();
    // c is not cached (yet): it takes nothing.
    let expected = per + cache.estimate(1016) + cache.estimate(5016);
    assert_eq!(cache.image_usage(&key), (expected, 3));
    assert_eq!(cache.image_usage(&Digest::of(b"unknown")), (0, 0));
    let space = cache.space().unwrap();
    assert_eq!(space.used, cache.usage());
    assert_eq!(space.used, disk_usage(&cfg.dir));
    assert!(space.room <= base + 10 * per - space.used);
    assert!(space.room <= space.filesystem.available);
    fs::remove_dir_all(&cfg.dir).unwrap();
}

#[test]
fn images_long_unused_and_their_orphaned_metadata_are_pruned() {
    let cfg = config("prune", None, false);
    let cache = ChunkCache::open(&cfg).unwrap();
    let day = std::time::Duration::from_secs(86_400);
    let age = |path: &std::path::Path, by: std::time::Duration| {
        let file = File::options().write(true).open(path).unwrap();
        file.set_modified(SystemTime::now() - by).unwrap();
    };
    let bytes = |tag: u8| vec![tag; 1000];
    let key = |n: u8| Digest::of(&[n]);
    let record = |n: u8| images::dir(&cfg.dir).join(format!("{}.chunks", key(n).hex()));
    // Gone (unused for two days), recent, kept (a current snapshot's layer), and mounted.
    for n in 1..=4u8 {
        drop(cache.pin_image(&key(n), &[Digest::of(&bytes(n))]).unwrap());
        cache.put(&Digest::of(&bytes(n)), &bytes(n)).unwrap();
    }
    let _mounted = cache.pin_image(&key(4), &[Digest::of(&bytes(4))]).unwrap();
    for n in [1, 3, 4] {
        age(&record(n), 2 * day);
    }
    // A manifest no image names, old; and a TOC no image names, new.
    let (orphan, fresh) = (bytes(8), bytes(9));
    cache.put_manifest(&Digest::of(&orphan), &orphan).unwrap();
    cache.put_toc(&Digest::of(&fresh), 0, &fresh).unwrap();
    age(
        &cache.meta_path(MetaKind::Manifest, &Digest::of(&orphan)),
        2 * day,
    );

    let keep = std::collections::HashSet::from([key(3)]);
    let (released, freed) = cache.prune(&keep, day);
    assert_eq!(released, 1);
    assert!(freed > 0);
    assert!(
        !cache.contains(&Digest::of(&bytes(1))),
        "the image long gone"
    );
    assert!(!record(1).exists());
    for n in 2..=4 {
        assert!(cache.contains(&Digest::of(&bytes(n))), "image {n} stays");
    }
    assert_eq!(cache.get_manifest(&Digest::of(&orphan)).unwrap(), None);
    assert!(cache.get_toc(&Digest::of(&fresh)).unwrap().is_some());
    assert_eq!(cache.usage(), disk_usage(&cfg.dir));
    fs::remove_dir_all(&cfg.dir).unwrap();
}

#[test]
fn backing_files_written_together_are_each_whole_and_a_missing_chunk_spoils_only_its_own() {
    let cfg = config("backings", None, false);
    let cache = ChunkCache::open(&cfg).expect("the test's own setup");
    let a = vec![1u8; 5000];
    let b = vec![2u8; 3000];
    let (da, db) = (Digest::of(&a), Digest::of(&b));
    assert!(
        cache.put(&da, &a).expect("the test's own setup")
            && cache.put(&db, &b).expect("the test's own setup")
    );
    let missing = Digest::of(b"never stored");
    let key = |n: &[u8]| Digest::of(n);
    let jobs: Vec<BackingJob> = vec![
        (key(b"ab"), vec![(da, 100..5000), (db, 0..3000)]),
        (key(b"gap"), vec![(da, 0..10), (missing, 0..10)]),
        (key(b"b"), vec![(db, 10..20)]),
    ];
    let results: Vec<bool> = cache
        .write_backings(&jobs)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(results, [true, false, true]);
    let read = |k: &Digest| {
        let mut out = Vec::new();
        std::io::Read::read_to_end(
            &mut cache.open_backing(k).expect("the test's own setup"),
            &mut out,
        )
        .expect("the test's own setup");
        out
    };
    assert_eq!(read(&key(b"ab")), [&a[100..], &b[..]].concat());
    assert_eq!(read(&key(b"b")), b[10..20].to_vec());
    assert!(
        cache.open_backing(&key(b"gap")).is_none(),
        "nothing torn in place"
    );
    assert_eq!(
        fs::read_dir(cfg.dir.join("tmp"))
            .expect("the test's own setup")
            .count(),
        0,
        "no temporary file left"
    );
    // Written again: already there. A lone one: flushed on its own.
    assert!(
        cache
            .write_backing(&key(b"b"), &[(db, 10..20)])
            .expect("the test's own setup")
    );
    assert!(
        cache
            .write_backing(&key(b"a"), &[(da, 0..10)])
            .expect("the test's own setup")
    );
    assert_eq!(read(&key(b"a")), a[..10].to_vec());
    assert_eq!(
        cache.usage(),
        disk_usage(&cfg.dir),
        "backing files are counted"
    );
    drop(cache);
    fs::remove_dir_all(&cfg.dir).expect("the test's own setup");
}
