//! The lazy filesystem's behaviour over time, through real FUSE mounts of an image in a real
//! registry, with every byte from the registry counted by a TCP proxy that can also be taken
//! away: first reads fetch only what they need; the background download then caches the whole
//! image, after which no read touches the network; a registry gone mid-way leaves cached
//! reads working and uncached ones failing with EIO within the deadline; a flipped byte in a
//! cached chunk is caught and the chunk fetched again; a restart with a warm cache fetches
//! nothing at all; far from the registry the kernel reads nothing ahead until a reader reads
//! most of the image; `/metrics` reports what the reads did.

mod support;

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use imgstream::{
    api::{ApiState, Metrics},
    cache::{CacheConfig, ChunkCache},
    fetch::{FetchStats, background::BackgroundConfig, learn::share::Sharing},
    fs::{FsConfig, View},
    mount::{self, MountOptions, MountedImage},
    oci::{digest::Digest, manifest::Platform},
    registry::{
        BlobSource,
        http::{HttpConfig, RegistryClient},
    },
};
use support::{Fault, Proxy, Registry};

struct Image {
    registry: Registry,
    scratch: PathBuf,
    /// `repo@digest` of the converted image.
    repository: String,
    digest: String,
    /// Relative path -> content.
    files: Vec<(String, Vec<u8>)>,
}

async fn image(name: &str) -> Image {
    support::require_root();
    let scratch = support::scratch(name);
    let registry = Registry::start(name, None);
    let reg = registry.host();
    let root = scratch.join("root");
    support::busybox_rootfs(&root);
    let mut files = Vec::new();
    std::fs::create_dir_all(root.join("data")).unwrap();
    for i in 0..40u64 {
        let content = support::noise(i + 1, if i % 10 == 0 { 1_500_000 } else { 20_000 });
        let rel = format!("data/f{i:02}.bin");
        std::fs::write(root.join(&rel), &content).unwrap();
        files.push((rel, content));
    }
    let layout = scratch.join("layout");
    support::build_image(&layout, "v1", &[root], &["/bin/true"]).await;
    support::skopeo_copy(
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{reg}/src/app:v1"),
    );
    let out = support::imgstream(&[
        "convert",
        &format!("{reg}/src/app:v1"),
        &format!("{reg}/esgz/app:v1"),
        "--insecure-registry",
        &reg,
        "--chunk-size",
        "256K",
        "--json",
        "--scratch",
        scratch.to_str().unwrap(),
    ]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let digest = report["manifest_digest"].as_str().unwrap().to_string();
    Image {
        registry,
        scratch,
        repository: "esgz/app".into(),
        digest,
        files,
    }
}

/// What a test mount leaves alive: its runtime, the mount, the mountpoint and the cache.
type TestMount = (
    tokio::runtime::Runtime,
    MountedImage,
    PathBuf,
    Arc<ChunkCache>,
);

/// Mounts the image through `proxy` with a fresh runtime; returns what must stay alive.
fn mount_through(
    image: &Image,
    proxy: &Proxy,
    cache: &Path,
    background: Option<BackgroundConfig>,
    deadline: Duration,
    limit: Option<u64>,
) -> TestMount {
    mount_counting(image, proxy, cache, background, deadline, limit, None)
}

/// [`mount_through`], counting fetches into `totals` as the agent does for `/metrics`.
fn mount_counting(
    image: &Image,
    proxy: &Proxy,
    cache: &Path,
    background: Option<BackgroundConfig>,
    deadline: Duration,
    limit: Option<u64>,
    totals: Option<Arc<FetchStats>>,
) -> TestMount {
    mount_learning(
        image, proxy, cache, background, deadline, limit, totals, None,
    )
}

/// [`mount_counting`] with a learned directory and a way of sharing its lists.
#[allow(clippy::too_many_arguments)]
fn mount_learning(
    image: &Image,
    proxy: &Proxy,
    cache: &Path,
    background: Option<BackgroundConfig>,
    deadline: Duration,
    limit: Option<u64>,
    totals: Option<Arc<FetchStats>>,
    learned: Option<(PathBuf, Sharing)>,
) -> TestMount {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let config = HttpConfig {
        insecure: vec![proxy.host()],
        auth_file: None,
        timeout: Duration::from_secs(2),
        retries: 1,
        backoff: Duration::from_millis(20),
        ..HttpConfig::default()
    };
    let client = Arc::new(RegistryClient::new(&proxy.host(), &image.repository, config).unwrap());
    let source: Arc<dyn BlobSource> = client.clone();
    let options = MountOptions {
        view: View::Merged,
        cache: CacheConfig {
            dir: cache.to_path_buf(),
            limit_bytes: limit,
            prefer_uring: true,
        },
        fs: FsConfig {
            read_deadline: deadline,
            // The bytes and requests these tests count are the reads' own: read-around sizes
            // its guesses by this machine's timing (it has tests of its own in fetch::tests,
            // and `bench e2e` measures it).
            read_around: imgstream::fetch::readaround::ReadAroundConfig {
                bdp_multiple: 0.0,
                ..Default::default()
            },
            ..FsConfig::default()
        },
        background,
        threads: 2,
        readahead_kb: None,
        prefetch: true,
        learned: learned.as_ref().map(|(dir, _)| dir.clone()),
        share_learned: learned.as_ref().map_or(Sharing::Off, |(_, s)| *s),
        platform: Platform::host(),
        fetch_totals: totals,
        fetch_journal: None,
        image_name: None,
    };
    let chunk_cache = Arc::new(ChunkCache::open(&options.cache).unwrap());
    let mut opened = runtime
        .block_on(mount::open_layers(
            source,
            &image.digest,
            &options.platform,
            &chunk_cache,
        ))
        .unwrap();
    if options.share_learned == Sharing::Publish {
        opened.sink = Some(client);
    }
    let mountpoint = image.scratch.join(format!("mnt-{}", proxy.addr.port()));
    std::fs::create_dir_all(&mountpoint).unwrap();
    let mounted = mount::mount(
        runtime.handle().clone(),
        opened,
        chunk_cache.clone(),
        &mountpoint,
        &options,
    )
    .unwrap();
    (runtime, mounted, mountpoint, chunk_cache)
}

fn drop_page_cache() {
    std::fs::write("/proc/sys/vm/drop_caches", "3").expect("needs root");
}

fn layer_size(image: &Image) -> u64 {
    let blobs = image.registry.stored_bytes();
    assert!(blobs > 0);
    blobs
}

#[test]
fn reads_fetch_what_they_need_and_the_background_download_caches_the_rest() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let image = rt.block_on(image("lazy-bg"));
    let cache = image.scratch.join("cache");

    // Lazy: one 20 KB file costs the manifest, footer, TOC and about one chunk.
    let proxy = Proxy::start(image.registry.addr, Fault::None);
    let (runtime, mounted, mnt, _cache) =
        mount_through(&image, &proxy, &cache, None, Duration::from_secs(10), None);
    let opened = proxy.bytes();
    let (rel, content) = &image.files[3];
    assert_eq!(&std::fs::read(mnt.join(rel)).unwrap(), content);
    let first_read = proxy.bytes() - opened;
    println!(
        "mount: {opened} B (manifest, footer, TOC); first 20 KB file: {first_read} B; registry holds {} B",
        layer_size(&image)
    );
    assert!(first_read < 64 * 1024, "{first_read}");
    drop(mounted);
    drop(runtime);

    // The background download, then the registry goes away: everything still reads.
    let proxy = Proxy::start(image.registry.addr, Fault::None);
    let config = BackgroundConfig {
        concurrency: 2,
        bandwidth: None,
        ..BackgroundConfig::default()
    };
    let (runtime, mut mounted, mnt, _cache) = mount_through(
        &image,
        &proxy,
        &cache,
        Some(config),
        Duration::from_secs(2),
        None,
    );
    let progress = mounted.progress.clone().unwrap();
    let started = Instant::now();
    while !progress.finished.load(Ordering::Acquire) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "background download did not finish"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    mounted.wait_background();
    let requests = mounted.fetcher.stats.requests.load(Ordering::Relaxed);
    proxy.cut();
    drop_page_cache();
    for (rel, content) in &image.files {
        assert!(&std::fs::read(mnt.join(rel)).unwrap() == content, "{rel}");
    }
    assert_eq!(
        mounted.fetcher.stats.requests.load(Ordering::Relaxed),
        requests,
        "no read touched the network"
    );
    drop(mounted);
    drop(runtime);

    // Restart with the warm cache, by digest: not one byte from the registry.
    let proxy = Proxy::start(image.registry.addr, Fault::None);
    let (runtime, mounted, mnt, _cache) =
        mount_through(&image, &proxy, &cache, None, Duration::from_secs(2), None);
    drop_page_cache();
    for (rel, content) in &image.files {
        assert!(&std::fs::read(mnt.join(rel)).unwrap() == content, "{rel}");
    }
    assert_eq!(proxy.bytes(), 0, "a warm restart transfers nothing");
    assert_eq!(proxy.connections.load(Ordering::SeqCst), 0);
    drop(mounted);
    drop(runtime);
    std::fs::remove_dir_all(&image.scratch).unwrap();
}

/// The kernel's readahead on the FUSE connection mounted at `mnt`, KiB.
fn readahead_kb(mnt: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(mnt).unwrap().dev();
    let knob = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    std::fs::read_to_string(&knob)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn far_from_the_registry_the_kernel_reads_nothing_ahead_until_a_reader_reads_most_of_the_image() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let image = rt.block_on(image("lazy-readahead"));
    let cache = image.scratch.join("cache");
    // 30 ms away: a bandwidth-delay product far above the 64 KiB where guesses wait in line.
    let far = support::RoundTrip::start(image.registry.addr, Duration::from_millis(30));
    let proxy = Proxy::start(far.addr, Fault::None);
    // The background download capped far below what is left once the reader is done, so
    // that the image is not all cached (which would raise readahead for cached reads).
    let background = BackgroundConfig {
        bandwidth: Some(64 << 10),
        ..BackgroundConfig::default()
    };
    let (runtime, mounted, mnt, _cache) = mount_through(
        &image,
        &proxy,
        &cache,
        Some(background),
        Duration::from_secs(10),
        None,
    );
    assert_eq!(
        readahead_kb(&mnt),
        0,
        "far from the registry, faults and reads ask for what they need"
    );
    let (rel, content) = &image.files[3];
    assert_eq!(&std::fs::read(mnt.join(rel)).unwrap(), content);
    assert!(
        !mounted.fetcher.greedy(),
        "one small file is not most of it"
    );
    assert_eq!(readahead_kb(&mnt), 0);
    // Three of the four large files read through: most of the image fetched for a reader.
    for (rel, content) in image
        .files
        .iter()
        .filter(|(_, c)| c.len() > 1_000_000)
        .take(3)
    {
        assert!(&std::fs::read(mnt.join(rel)).unwrap() == content, "{rel}");
    }
    assert!(mounted.fetcher.greedy());
    let progress = mounted.progress.clone().unwrap();
    let restored = readahead_kb(&mnt);
    assert!(
        !progress.finished.load(Ordering::Acquire),
        "the rest of the image is megabytes at 64 KiB/s"
    );
    assert!(
        restored > 0 && restored != imgstream::fs::fusedev::CACHED_READAHEAD_KB,
        "a reader that reads most of the image gets the kernel's readahead back: {restored} KiB"
    );
    drop(mounted);
    drop(runtime);
    std::fs::remove_dir_all(&image.scratch).unwrap();
}

#[test]
fn a_registry_gone_mid_way_fails_uncached_reads_within_the_deadline() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let image = rt.block_on(image("lazy-gone"));
    let cache = image.scratch.join("cache");
    let proxy = Proxy::start(image.registry.addr, Fault::None);
    let deadline = Duration::from_secs(2);
    let (runtime, mounted, mnt, _cache) =
        mount_through(&image, &proxy, &cache, None, deadline, None);
    let (cached, content) = &image.files[1];
    assert_eq!(&std::fs::read(mnt.join(cached)).unwrap(), content);
    proxy.cut();
    drop_page_cache();
    assert_eq!(
        &std::fs::read(mnt.join(cached)).unwrap(),
        content,
        "cached data still reads"
    );
    let started = Instant::now();
    let err = std::fs::read(mnt.join(&image.files[2].0))
        .map(|d| d.len())
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(
        started.elapsed() < deadline + Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // Metadata is all local: listing still works.
    assert_eq!(
        std::fs::read_dir(mnt.join("data")).unwrap().count(),
        image.files.len()
    );
    drop(mounted);
    drop(runtime);
    std::fs::remove_dir_all(&image.scratch).unwrap();
}

#[test]
fn a_flipped_byte_in_the_cache_is_caught_and_fetched_again() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let image = rt.block_on(image("lazy-flip"));
    let cache = image.scratch.join("cache");
    let (rel, content) = &image.files[0];
    let proxy = Proxy::start(image.registry.addr, Fault::None);
    let (runtime, mounted, mnt, _) =
        mount_through(&image, &proxy, &cache, None, Duration::from_secs(10), None);
    assert_eq!(&std::fs::read(mnt.join(rel)).unwrap(), content);
    drop(mounted);
    drop(runtime);
    // Flip one byte in the cached chunk holding the file's first 256 KiB.
    let first = Digest::of(&content[..256 * 1024]);
    let hex = first.hex();
    let chunk_file = cache.join("chunks").join(&hex);
    let mut bytes = std::fs::read(&chunk_file).unwrap();
    bytes[1000] ^= 0x40;
    std::fs::write(&chunk_file, bytes).unwrap();

    let proxy = Proxy::start(image.registry.addr, Fault::None);
    let (runtime, mounted, mnt, chunk_cache) =
        mount_through(&image, &proxy, &cache, None, Duration::from_secs(10), None);
    drop_page_cache();
    assert!(
        &std::fs::read(mnt.join(rel)).unwrap() == content,
        "the right bytes, not the flipped ones"
    );
    assert_eq!(chunk_cache.stats.corrupt.load(Ordering::Relaxed), 1);
    assert_eq!(
        mounted.fetcher.stats.chunks_fetched.load(Ordering::Relaxed),
        1,
        "exactly the bad chunk was fetched again"
    );
    assert!(proxy.bytes() > 0);
    drop(mounted);
    drop(runtime);
    std::fs::remove_dir_all(&image.scratch).unwrap();
}

#[test]
fn a_full_cache_disk_is_reported_and_reads_keep_working_from_the_network() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let image = rt.block_on(image("lazy-full"));
    // A 1 MiB tmpfs as the cache disk: the TOC fits, the 1.5 MB file's chunks do not.
    let cache = image.scratch.join("tiny-cache");
    std::fs::create_dir_all(&cache).unwrap();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&cache)
        .status()
        .unwrap();
    assert!(status.success());
    let proxy = Proxy::start(image.registry.addr, Fault::None);
    let (runtime, mounted, mnt, chunk_cache) =
        mount_through(&image, &proxy, &cache, None, Duration::from_secs(10), None);
    let (big, content) = &image.files[0];
    assert_eq!(content.len(), 1_500_000);
    assert!(
        &std::fs::read(mnt.join(big)).unwrap() == content,
        "read from the network"
    );
    assert!(
        chunk_cache.stats.write_errors.load(Ordering::Relaxed) > 0,
        "the full disk was noticed"
    );
    drop_page_cache();
    assert!(
        &std::fs::read(mnt.join(big)).unwrap() == content,
        "and again"
    );
    drop(mounted);
    drop(runtime);
    let _ = Command::new("umount").arg(&cache).status();
    std::fs::remove_dir_all(&image.scratch).unwrap();
}

#[test]
fn the_background_download_keeps_to_its_bandwidth_cap() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let image = rt.block_on(image("lazy-cap"));
    let cache = image.scratch.join("cache");
    let proxy = Proxy::start(image.registry.addr, Fault::None);
    let cap = 4_000_000;
    let config = BackgroundConfig {
        concurrency: 2,
        bandwidth: Some(cap),
        ..BackgroundConfig::default()
    };
    let started = Instant::now();
    let (runtime, mut mounted, _mnt, _cache) = mount_through(
        &image,
        &proxy,
        &cache,
        Some(config),
        Duration::from_secs(10),
        None,
    );
    mounted.wait_background();
    let took = started.elapsed();
    let progress = mounted.progress.clone().unwrap();
    assert!(progress.finished.load(Ordering::Acquire));
    let bytes = progress.bytes_done.load(Ordering::Relaxed);
    // The cap spaces batches out: everything but the last batch (at most cap/4 bytes) waits
    // its turn. A slow machine can only make this take longer, never shorter.
    let floor = Duration::from_secs_f64(bytes.saturating_sub(cap / 4) as f64 / cap as f64);
    println!("{bytes} B in {took:?} under a {cap} B/s cap (floor {floor:?})");
    assert!(took >= floor, "{took:?} < {floor:?}");
    drop(mounted);
    drop(runtime);
    std::fs::remove_dir_all(&image.scratch).unwrap();
}

#[test]
fn a_small_cache_limit_evicts_the_unmounted_image_not_the_mounted_one() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut image = rt.block_on(image("lazy-evict"));
    let reg = image.registry.host();
    // The same files as a second image: other chunk boundaries, so other chunks.
    let out = support::imgstream(&[
        "convert",
        &format!("{reg}/src/app:v1"),
        &format!("{reg}/esgz/app:v2"),
        "--insecure-registry",
        &reg,
        "--chunk-size",
        "1M",
        "--json",
        "--scratch",
        image.scratch.to_str().unwrap(),
    ]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let second = report["manifest_digest"].as_str().unwrap().to_string();
    let cache = image.scratch.join("cache");
    let proxy = Proxy::start(image.registry.addr, Fault::None);
    let data: u64 = image.files.iter().map(|(_, c)| c.len() as u64).sum();

    // Image 1, read in full with a limit of 1.5 images' worth, then unmounted.
    let limit = data * 3 / 2;
    let (runtime, mounted, mnt, chunks) = mount_through(
        &image,
        &proxy,
        &cache,
        None,
        Duration::from_secs(10),
        Some(limit),
    );
    for (rel, content) in &image.files {
        assert!(&std::fs::read(mnt.join(rel)).unwrap() == content);
    }
    let first_usage = chunks.usage();
    drop(mounted);
    drop(runtime);

    // Image 2, mounted and read in full: it needs room, image 1 (unmounted) gives it.
    image.digest = second;
    let (runtime, mounted, mnt, chunks) = mount_through(
        &image,
        &proxy,
        &cache,
        None,
        Duration::from_secs(10),
        Some(limit),
    );
    for (rel, content) in &image.files {
        assert!(&std::fs::read(mnt.join(rel)).unwrap() == content, "{rel}");
    }
    // Readers' chunks reach the cache through the writer thread; the unmount waits for what
    // it still holds (under load, CI saw no eviction yet when this was asked before it).
    drop(mounted);
    drop(runtime);
    assert!(
        chunks.stats.evicted.load(Ordering::Relaxed) > 0,
        "image 1's chunks were evicted"
    );
    assert!(chunks.usage() <= limit, "{} > {limit}", chunks.usage());
    assert_eq!(
        chunks.stats.skipped_over_limit.load(Ordering::Relaxed),
        0,
        "room was made for every chunk of the mounted image"
    );
    println!(
        "limit {limit}, image 1 used {first_usage}, after image 2 {}",
        chunks.usage()
    );
    std::fs::remove_dir_all(&image.scratch).unwrap();
}

#[test]
fn metrics_report_the_fetches_cache_and_deadlines_of_real_reads() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let image = rt.block_on(image("lazy-metrics"));
    let cache = image.scratch.join("cache");
    let metrics = Arc::new(Metrics::default());
    let proxy = Proxy::start(image.registry.addr, Fault::None);
    let deadline = Duration::from_secs(2);
    let (runtime, mounted, mnt, chunk_cache) = mount_counting(
        &image,
        &proxy,
        &cache,
        None,
        deadline,
        None,
        Some(metrics.fetch_totals()),
    );
    metrics.watch_cache(chunk_cache.clone());
    // On demand: a 1.5 MB file (several chunks) and a small one.
    for i in [0, 3] {
        let (rel, content) = &image.files[i];
        assert!(&std::fs::read(mnt.join(rel)).unwrap() == content, "{rel}");
    }
    mounted.fetcher.flush_cache_writes();
    // A registry that hangs: the next uncached read fails at its deadline.
    image.registry.pause();
    let err = std::fs::read(mnt.join(&image.files[5].0)).unwrap_err();
    image.registry.resume();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");

    let state = Arc::new(ApiState {
        metrics: metrics.clone(),
        store: None,
        health: Default::default(),
    });
    let shutdown = imgstream::shutdown::Shutdown::new();
    let (addr, _task) = rt
        .block_on(imgstream::api::serve(
            "127.0.0.1:0".parse().unwrap(),
            state,
            shutdown.clone(),
        ))
        .unwrap();
    let (status, page) = support::http_get(addr, "/metrics");
    assert_eq!(status, 200);
    let stats = &mounted.fetcher.stats;
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let on_demand = support::metric(
        &page,
        r#"imgstream_fetch_bytes_total{priority="on_demand"}"#,
    );
    assert!(
        on_demand > 1_000_000,
        "the 1.5 MB file's chunks: {on_demand}"
    );
    assert_eq!(on_demand, load(&stats.bytes));
    assert!(on_demand <= proxy.bytes(), "no more than crossed the link");
    for priority in ["background", "read_around"] {
        let series = format!("imgstream_fetch_bytes_total{{priority=\"{priority}\"}}");
        assert_eq!(support::metric(&page, &series), 0, "{series}");
    }
    assert_eq!(
        support::metric(
            &page,
            r#"imgstream_fetch_requests_total{priority="on_demand"}"#
        ),
        load(&stats.requests)
    );
    let chunks = support::metric(&page, "imgstream_fetch_chunks_total");
    assert!(chunks >= 6, "1.5 MB in 256 KiB chunks and more: {chunks}");
    // The failed read's readahead request, and the page read the kernel retries it with.
    let deadlines = support::metric(&page, "imgstream_fetch_deadline_exceeded_total");
    assert!((1..=2).contains(&deadlines), "{deadlines}");
    assert_eq!(deadlines, load(&stats.deadline_exceeded));
    assert_eq!(
        support::metric(&page, "imgstream_cache_size_bytes"),
        chunk_cache.usage()
    );
    assert!(support::metric(&page, "imgstream_cache_writes_total") >= chunks);
    assert_eq!(
        support::metric(&page, "imgstream_cache_quarantined_chunks_total"),
        0
    );
    assert!(
        !page.contains("imgstream_cache_limit_bytes"),
        "no limit set"
    );
    shutdown.trigger();
    drop(mounted);
    drop(runtime);
    std::fs::remove_dir_all(&image.scratch).unwrap();
}

#[test]
fn a_list_one_node_learned_is_published_and_prefetched_by_the_next_node() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let image = rt.block_on(image("lazy-share"));
    let read = [3usize, 17, 25];
    let quiet = imgstream::fetch::learn::QUIET;

    // A node with its own cache and learned directory, publishing what it learns.
    let node = |name: &str, proxy: &Proxy| {
        mount_learning(
            &image,
            proxy,
            &image.scratch.join(format!("{name}-cache")),
            None,
            Duration::from_secs(10),
            None,
            None,
            Some((
                image.scratch.join(format!("{name}-learned")),
                Sharing::Publish,
            )),
        )
    };
    let read_the_start = |mnt: &Path| {
        for &i in &read {
            let (rel, content) = &image.files[i];
            assert_eq!(&std::fs::read(mnt.join(rel)).unwrap(), content);
        }
    };

    // Node A: no list anywhere; its start reads three files, then goes quiet: the list is
    // learned, written and published next to the image.
    let a_learned = image.scratch.join("a-learned");
    let proxy = Proxy::start(image.registry.addr, Fault::None);
    let (runtime, mounted, mnt, _cache) = node("a", &proxy);
    read_the_start(&mnt);
    std::thread::sleep(quiet + Duration::from_millis(500));
    drop(mounted); // joins the learner, which has written and published the list
    drop(runtime);
    let lists: Vec<_> = std::fs::read_dir(&a_learned).unwrap().collect();
    assert_eq!(lists.len(), 1, "one layer, one list");
    let layer_hex = lists[0].as_ref().unwrap().file_name();
    let a_list = std::fs::read(a_learned.join(&layer_hex)).unwrap();

    // In the registry: the tag fallback (this registry has no referrers API) lists one
    // artifact of ours for the image manifest.
    let registry = RegistryClient::new(
        &image.registry.host(),
        &image.repository,
        HttpConfig {
            insecure: vec![image.registry.host()],
            ..HttpConfig::default()
        },
    )
    .unwrap();
    let subject: Digest = image.digest.parse().unwrap();
    let tag = format!("sha256-{}", subject.hex());
    let index = |registry: &RegistryClient| -> serde_json::Value {
        let fetched = rt.block_on(registry.manifest(&tag)).unwrap();
        serde_json::from_slice(&fetched.bytes).unwrap()
    };
    let listed = index(&registry);
    let entries = listed["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{listed}");
    assert_eq!(
        entries[0]["artifactType"],
        imgstream::fetch::learn::share::ARTIFACT_TYPE
    );
    let artifact = rt
        .block_on(registry.manifest(entries[0]["digest"].as_str().unwrap()))
        .unwrap();
    let artifact: serde_json::Value = serde_json::from_slice(&artifact.bytes).unwrap();
    assert_eq!(artifact["subject"]["digest"], image.digest.as_str());

    // Node B: empty cache, empty learned directory. The list comes from the registry and is
    // prefetched at mount; reading the same files afterwards costs no byte.
    let b_learned = image.scratch.join("b-learned");
    let proxy = Proxy::start(image.registry.addr, Fault::None);
    let (runtime, mut mounted, mnt, _cache) = node("b", &proxy);
    mounted.wait_background(); // the prefetch, with the look-up first
    assert_eq!(
        std::fs::read(b_learned.join(&layer_hex)).unwrap(),
        a_list,
        "node B keeps the list node A published"
    );
    let before = proxy.bytes();
    read_the_start(&mnt);
    assert_eq!(proxy.bytes(), before, "the start's files were prefetched");
    std::thread::sleep(quiet + Duration::from_millis(500));
    drop(mounted);
    drop(runtime);
    // Node B had a list, so it learned nothing new and published nothing.
    let entries = index(&registry)["manifests"].as_array().unwrap().len();
    assert_eq!(entries, 1);
}
