//! `cargo xtask bench fs`: the lazy filesystem against its baselines, each pair measured in
//! the same run on the same machine and reported as a ratio (absolute numbers on a shared
//! 2-core machine mean little). Needs root (FUSE, drop_caches) and the tools setup installs.
//!
//! 1. time to read one small file from a cold ~300 MB image, vs pulling and extracting the
//!    whole image from the same registry;
//! 2. time for the background download to cache the whole image, vs a plain parallel download
//!    of all its blobs;
//! 3. cached sequential read throughput through FUSE, vs reading the same bytes from disk;
//!    and reading 10,000 small files of a cached tree, vs the same files on disk;
//! 4. chunk-cache write throughput, io_uring engine vs sync engine vs `dd oflag=direct`;
//! 5. peak RSS of `imgstream mount` reading a 1 GB image while its background download runs.

#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    fmt::Write as _,
    path::Path,
    process::Command,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use imgstream::{
    cache::{CacheConfig, ChunkCache, SyncEngine, UringEngine, engine::CacheEngine},
    fetch::background::BackgroundConfig,
    fs::{FsConfig, View},
    mount::{self, MountOptions},
    oci::{
        digest::Digest,
        manifest::{self, Document, Platform},
    },
    registry::{
        BlobSource,
        http::{HttpConfig, RegistryClient},
    },
};
use support::Registry;

const IMGSTREAM: &str = env!("CARGO_BIN_EXE_imgstream");
/// Files of the RSS image's tree read in the small-file row (of its 50,000).
const TREE_FILES: usize = 10_000;

/// File `i` of the RSS image's tree: its path and its 20 KB.
fn tree_file(i: usize) -> (String, Vec<u8>) {
    (
        format!("d{:03}/f{i}", i % 500),
        support::noise(i as u64 + 7, 20_000),
    )
}

/// Syncs and drops the page cache, then reads the first [`TREE_FILES`] files of the tree
/// under `root`: the bytes read and the time it took.
fn read_tree(root: &Path) -> (usize, Duration) {
    drop_page_cache();
    let started = Instant::now();
    let bytes = (0..TREE_FILES)
        .map(|i| std::fs::read(root.join(tree_file(i).0)).unwrap().len())
        .sum();
    (bytes, started.elapsed())
}

/// Writes back every dirty page, then drops the page cache: what was just written (the
/// chunk cache, the local copy) is read from disk afterwards, on both sides of a ratio.
fn drop_page_cache() {
    let synced = Command::new("sync").status().expect("running sync");
    assert!(synced.success(), "sync failed");
    std::fs::write("/proc/sys/vm/drop_caches", "3").expect("the benchmark needs root");
}

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

fn http(host: &str) -> HttpConfig {
    HttpConfig {
        insecure: vec![host.to_string()],
        auth_file: None,
        timeout: Duration::from_secs(30),
        ..HttpConfig::default()
    }
}

/// Mounts image `reference` of `client`'s repository at `mnt` with the cache in `cache_dir`.
fn mount_image(
    rt: &tokio::runtime::Runtime,
    client: &Arc<RegistryClient>,
    reference: &str,
    cache_dir: &Path,
    mnt: &Path,
    background: Option<BackgroundConfig>,
) -> mount::MountedImage {
    let opts = MountOptions {
        view: View::Merged,
        cache: CacheConfig {
            dir: cache_dir.to_path_buf(),
            limit_bytes: None,
            prefer_uring: true,
        },
        fs: FsConfig::default(),
        background,
        threads: 4,
        readahead_kb: None,
        prefetch: true,
        learned: None,
        share_learned: Default::default(),
        platform: Platform::host(),
        fetch_totals: None,
        fetch_journal: None,
        image_name: None,
    };
    let cache = Arc::new(ChunkCache::open(&opts.cache).unwrap());
    let opened = rt
        .block_on(mount::open_layers(
            client.clone(),
            reference,
            &opts.platform,
            &cache,
        ))
        .unwrap();
    mount::mount(rt.handle().clone(), opened, cache, mnt, &opts).unwrap()
}

/// The baseline: every layer blob downloaded at once into `dir`, one stream each.
fn plain_download(
    rt: &tokio::runtime::Runtime,
    client: &Arc<RegistryClient>,
    layers: &[imgstream::oci::manifest::Descriptor],
    dir: &Path,
) -> Duration {
    std::fs::create_dir_all(dir).unwrap();
    let started = Instant::now();
    rt.block_on(async {
        let tasks: Vec<_> = layers
            .iter()
            .enumerate()
            .map(|(i, layer)| {
                let (client, layer, path) =
                    (client.clone(), layer.clone(), dir.join(format!("l{i}")));
                tokio::spawn(async move { client.blob_to_file(&layer, &path).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
    });
    let took = started.elapsed();
    std::fs::remove_dir_all(dir).unwrap();
    took
}

fn main() {
    support::require_root();
    let scratch = support::scratch("bench-fs");
    let mut table = String::from(
        "| measurement | imgstream | baseline | ratio | target |\n|---|---|---|---|---|\n",
    );

    // The image: ~300 MB of incompressible data in 150 files, 2,000 small files, busybox.
    let root = scratch.join("root");
    support::busybox_rootfs(&root);
    for i in 0..150u64 {
        let dir = root.join(format!("data/{:02}", i % 10));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(format!("blob-{i}.bin")),
            support::noise(i + 1, 2 << 20),
        )
        .unwrap();
    }
    for i in 0..2000u64 {
        let dir = root.join(format!("usr/share/doc/pkg{}", i % 100));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(format!("f{i}.txt")),
            format!("file {i}\n").repeat(20),
        )
        .unwrap();
    }
    let registry = Registry::start("bench-fs", None);
    let reg = registry.host();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let layout = scratch.join("layout");
    rt.block_on(support::build_image(
        &layout,
        "v1",
        std::slice::from_ref(&root),
        &["/bin/true"],
    ));
    std::fs::remove_dir_all(&root).unwrap();
    support::skopeo_copy(
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{reg}/bench/plain:v1"),
    );
    let out = support::imgstream(&[
        "convert",
        &format!("{reg}/bench/plain:v1"),
        &format!("{reg}/bench/esgz:v1"),
        "--insecure-registry",
        &reg,
        "--json",
        "--scratch",
        scratch.to_str().unwrap(),
    ]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let digest = report["manifest_digest"].as_str().unwrap().to_string();
    let client = Arc::new(RegistryClient::new(&reg, "bench/esgz", http(&reg)).unwrap());
    let fetched = rt.block_on(client.manifest(&digest)).unwrap();
    let Document::Manifest(m) = manifest::parse(&fetched.bytes, &fetched.media_type).unwrap()
    else {
        panic!()
    };
    let image_bytes: u64 = m.layers.iter().map(|l| l.size).sum();
    println!(
        "image: {} layers, {:.1} MB compressed",
        m.layers.len(),
        image_bytes as f64 / 1e6
    );

    // 1. Baseline: pull every blob, then extract every layer.
    let pull_dir = scratch.join("pull");
    std::fs::create_dir_all(pull_dir.join("rootfs")).unwrap();
    drop_page_cache();
    let started = Instant::now();
    for (i, layer) in m.layers.iter().enumerate() {
        let path = pull_dir.join(format!("layer{i}"));
        rt.block_on(client.blob_to_file(layer, &path)).unwrap();
        let status = Command::new("tar")
            .arg("-xzf")
            .arg(&path)
            .arg("-C")
            .arg(pull_dir.join("rootfs"))
            .status()
            .unwrap();
        assert!(status.success());
    }
    let pull = started.elapsed();
    std::fs::remove_dir_all(&pull_dir).unwrap();

    // 1. imgstream: mount cold (empty cache), read one small file.
    let cache_dir = scratch.join("cache");
    let mnt = scratch.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    drop_page_cache();
    let started = Instant::now();
    let mounted = mount_image(&rt, &client, &digest, &cache_dir, &mnt, None);
    let small = std::fs::read(mnt.join("usr/share/doc/pkg7/f7.txt")).unwrap();
    let first_file = started.elapsed();
    assert_eq!(small.len(), "file 7\n".len() * 20);
    drop(mounted);
    let ratio = first_file.as_secs_f64() / pull.as_secs_f64();
    writeln!(
        table,
        "| cold image: mount + read one small file, vs pull and extract the whole image | {} | {} | {:.1} % | < 5 % |",
        secs(first_file),
        secs(pull),
        100.0 * ratio
    )
    .unwrap();

    // 2. Background download of the whole image vs a plain parallel download of the blobs.
    let concurrency = 4;
    let plain = plain_download(&rt, &client, &m.layers, &scratch.join("plain"));
    let _ = std::fs::remove_dir_all(&cache_dir);
    let started = Instant::now();
    let background_config = BackgroundConfig {
        concurrency,
        bandwidth: None,
        ..BackgroundConfig::default()
    };
    let mut mounted = mount_image(
        &rt,
        &client,
        &digest,
        &cache_dir,
        &mnt,
        Some(background_config),
    );
    mounted.wait_background();
    let background = started.elapsed();
    assert!(
        mounted
            .progress
            .as_ref()
            .unwrap()
            .finished
            .load(Ordering::Acquire)
    );
    writeln!(
        table,
        "| background download of the whole image (into the chunk cache), vs a plain parallel download of its blobs ({concurrency} streams) | {} | {} | {:.2}x | within 1.10x |",
        secs(background),
        secs(plain),
        background.as_secs_f64() / plain.as_secs_f64()
    )
    .unwrap();

    // 3. Cached sequential read through FUSE vs the same bytes from the local disk.
    let files: Vec<String> = (0..20)
        .map(|i| format!("data/{:02}/blob-{i}.bin", i % 10))
        .collect();
    drop_page_cache();
    let started = Instant::now();
    let mut fuse_bytes = 0;
    for f in &files {
        fuse_bytes += std::fs::read(mnt.join(f)).unwrap().len();
    }
    let fuse = started.elapsed();
    let requests = mounted.fetcher.stats.requests.load(Ordering::Relaxed);
    drop(mounted);
    let local_dir = scratch.join("local");
    std::fs::create_dir_all(&local_dir).unwrap();
    for (i, f) in files.iter().enumerate() {
        let n: u64 = f
            .rsplit_once("blob-")
            .unwrap()
            .1
            .trim_end_matches(".bin")
            .parse()
            .unwrap();
        std::fs::write(
            local_dir.join(format!("{i}")),
            support::noise(n + 1, 2 << 20),
        )
        .unwrap();
    }
    drop_page_cache();
    let started = Instant::now();
    let mut local_bytes = 0;
    for i in 0..files.len() {
        local_bytes += std::fs::read(local_dir.join(format!("{i}"))).unwrap().len();
    }
    let local = started.elapsed();
    assert_eq!(fuse_bytes, local_bytes);
    let mbps = |b: usize, d: Duration| b as f64 / 1e6 / d.as_secs_f64();
    writeln!(
        table,
        "| cached sequential read through FUSE ({} MB, synced and page cache dropped; {requests} registry requests all run) vs the same bytes from local disk | {:.0} MB/s | {:.0} MB/s | {:.0} % | >= 70 % |",
        fuse_bytes / 1_000_000,
        mbps(fuse_bytes, fuse),
        mbps(local_bytes, local),
        100.0 * local.as_secs_f64() / fuse.as_secs_f64()
    )
    .unwrap();

    // 4. Cache writes: io_uring engine vs sync engine vs dd oflag=direct, 256 x 1 MiB.
    let chunk = support::noise(99, 1 << 20);
    let header = [0u8; 16];
    let engine_rate = |engine: &dyn CacheEngine, dir: &Path| {
        std::fs::create_dir_all(dir).unwrap();
        let started = Instant::now();
        for i in 0..256 {
            let file = std::fs::File::create(dir.join(format!("{i}"))).unwrap();
            engine.write_parts(&file, &[&header, &chunk], true).unwrap();
        }
        let took = started.elapsed();
        std::fs::remove_dir_all(dir).unwrap();
        mbps(256 << 20, took)
    };
    let uring = engine_rate(&UringEngine::probe().unwrap(), &scratch.join("w-uring"));
    let sync = engine_rate(&SyncEngine, &scratch.join("w-sync"));
    let started = Instant::now();
    let out = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=256", "oflag=direct"])
        .arg(format!("of={}", scratch.join("dd.bin").display()))
        .output()
        .unwrap();
    assert!(out.status.success());
    let dd = mbps(256 << 20, started.elapsed());
    writeln!(
        table,
        "| chunk-cache writes, 256 x 1 MiB, each chunk file written and fdatasync'd: io_uring engine vs sync engine (and `dd oflag=direct`, one file) | {uring:.0} MB/s | {sync:.0} MB/s (dd {dd:.0} MB/s) | {:.2}x | (report) |",
        uring / sync
    )
    .unwrap();

    let _ = Digest::of(b"");
    // 2b. The same comparison where the target's setting puts it: behind a 100 Mbit/s link.
    let (background, plain, mb) = background_on_a_slow_link(&scratch, &rt);
    writeln!(
        table,
        "| same, {mb:.0} MB image behind a 100 Mbit/s link (tc tbf on a veth into a network namespace) | {} | {} | {:.2}x | within 1.10x |",
        secs(background),
        secs(plain),
        background.as_secs_f64() / plain.as_secs_f64()
    )
    .unwrap();

    // 5. Peak RSS of `imgstream mount` serving and downloading a 1 GB image of 50,000 files.
    let (rss, files, gigabytes, background_share, tree) = peak_rss(&scratch, &reg, &rt);
    writeln!(
        table,
        "| cached: read {TREE_FILES} files of 20 KB (a 50,000-file image's tree, every file of 500 directories in turn) through FUSE vs the same files on local disk (synced and page cache dropped) | {} | {} | {:.0} % | (report) |",
        secs(tree.0),
        secs(tree.1),
        100.0 * tree.1.as_secs_f64() / tree.0.as_secs_f64()
    )
    .unwrap();
    writeln!(
        table,
        "| peak RSS of `imgstream mount` while reading all {files} files and downloading the {gigabytes:.2} GB image in the background (`--background-quiet-ms 0`, so the download runs beside the reader; it had fetched {:.0} % of the bytes when the reader finished) | {} MiB | | | < 150 MiB |",
        background_share * 100.0,
        rss / 1024
    )
    .unwrap();

    println!("\n{table}");
    let out_dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out_dir).unwrap();
    std::fs::write(out_dir.join("fs.md"), &table).unwrap();
    drop(registry);
    std::fs::remove_dir_all(&scratch).unwrap();
}

/// Builds a ~1 GB image of 50,000 files, mounts it with `imgstream mount` (background download
/// on, not waiting for readers to go quiet), reads every file through the mount while the
/// download runs, and returns the mount process's VmHWM in KiB, the file count, the image
/// size in GB and the share of the fetched bytes the background had fetched by the end of the
/// reads (read from the mount's `/metrics`).
/// Then, the whole image cached, it times reading [`TREE_FILES`] of its files through the
/// mount and from a copy on local disk.
fn peak_rss(
    scratch: &Path,
    reg: &str,
    rt: &tokio::runtime::Runtime,
) -> (u64, usize, f64, f64, (Duration, Duration)) {
    let root = scratch.join("rss-root");
    let files = 50_000;
    for i in 0..files {
        let dir = root.join(format!("d{:03}", i % 500));
        if i < 500 {
            std::fs::create_dir_all(&dir).unwrap();
        }
        std::fs::write(
            dir.join(format!("f{i}")),
            support::noise(i as u64 + 7, 20_000),
        )
        .unwrap();
    }
    let layout = scratch.join("rss-layout");
    rt.block_on(support::build_image(
        &layout,
        "v1",
        std::slice::from_ref(&root),
        &["/bin/true"],
    ));
    std::fs::remove_dir_all(&root).unwrap();
    support::skopeo_copy(
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{reg}/bench/big:v1"),
    );
    std::fs::remove_dir_all(&layout).unwrap();
    let out = support::imgstream(&[
        "convert",
        &format!("{reg}/bench/big:v1"),
        &format!("{reg}/bench/big-esgz:v1"),
        "--insecure-registry",
        reg,
        "--json",
        "--scratch",
        scratch.to_str().unwrap(),
    ]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let bytes: u64 = report["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["size"].as_u64().unwrap())
        .sum();

    let mnt = scratch.join("rss-mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", support::free_port())
        .parse()
        .unwrap();
    let metrics_arg = metrics.to_string();
    let mut child = Command::new(IMGSTREAM)
        .args(["mount", &format!("{reg}/bench/big-esgz:v1")])
        .arg(&mnt)
        .arg("--cache-dir")
        .arg(scratch.join("rss-cache"))
        .args(["--insecure-registry", reg])
        // A reader that never pauses would otherwise hold the download back until it has
        // fetched a quarter of the image itself.
        .args(["--background-quiet-ms", "0"])
        .args(["--metrics-addr", &metrics_arg])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let done_rx =
        support::processes::on_line(child.stderr.take().unwrap(), "background download complete");
    support::processes::wait_until_mounted(&mnt, Duration::from_secs(120));
    let mut read = 0;
    for d in 0..500 {
        for entry in std::fs::read_dir(mnt.join(format!("d{d:03}")))
            .unwrap()
            .flatten()
        {
            read += std::fs::read(entry.path()).unwrap().len();
        }
    }
    assert_eq!(read, files * 20_000);
    let (status, page) = support::http_get(metrics, "/metrics");
    assert_eq!(status, 200, "{page}");
    let fetched = |priority: &str| {
        support::metric(
            &page,
            &format!("imgstream_fetch_bytes_total{{priority=\"{priority}\"}}"),
        ) as f64
    };
    let background = fetched("background");
    let background_share =
        background / (background + fetched("on_demand") + fetched("read_around")).max(1.0);
    assert!(
        background > 0.0,
        "the background download ran beside the reader"
    );
    done_rx
        .recv_timeout(Duration::from_secs(300))
        .expect("the background download finished");
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let hwm: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    let (fuse_bytes, fuse) = read_tree(&mnt);
    // SAFETY: kill(2) of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap();
    let local_root = scratch.join("rss-local");
    for i in 0..TREE_FILES {
        let (path, data) = tree_file(i);
        let path = local_root.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, data).unwrap();
    }
    let (local_bytes, local) = read_tree(&local_root);
    assert_eq!(fuse_bytes, local_bytes);
    (
        hwm,
        files,
        bytes as f64 / 1e9,
        background_share,
        (fuse, local),
    )
}

/// Background download vs plain parallel download of a ~64 MB image served from a registry
/// behind a 100 Mbit/s link. Returns both times and the image size in MB.
fn background_on_a_slow_link(
    scratch: &Path,
    rt: &tokio::runtime::Runtime,
) -> (Duration, Duration, f64) {
    let link = support::SlowLink::new("bench", "100mbit");
    let registry = Registry::start_in_netns("bench-slow", &link.netns, &link.ip);
    let reg = registry.host();
    let root = scratch.join("slow-root");
    for i in 0..32u64 {
        std::fs::create_dir_all(root.join("data")).unwrap();
        std::fs::write(
            root.join(format!("data/f{i}")),
            support::noise(1000 + i, 2 << 20),
        )
        .unwrap();
    }
    let layout = scratch.join("slow-layout");
    rt.block_on(support::build_image(
        &layout,
        "v1",
        std::slice::from_ref(&root),
        &["/bin/true"],
    ));
    // Convert next to the registry's data path, straight into it.
    let esgz = scratch.join("slow-esgz");
    support::imgstream(&[
        "convert",
        &format!("oci:{}:v1", layout.display()),
        &format!("oci:{}:v1", esgz.display()),
        "--json",
        "--scratch",
        scratch.to_str().unwrap(),
    ]);
    support::skopeo_copy(
        &format!("oci:{}:v1", esgz.display()),
        &format!("docker://{reg}/slow/esgz:v1"),
    );
    let client = Arc::new(RegistryClient::new(&reg, "slow/esgz", http(&reg)).unwrap());
    let fetched = rt.block_on(client.manifest("v1")).unwrap();
    let Document::Manifest(m) = manifest::parse(&fetched.bytes, &fetched.media_type).unwrap()
    else {
        panic!()
    };
    let bytes: u64 = m.layers.iter().map(|l| l.size).sum();

    let plain = plain_download(rt, &client, &m.layers, &scratch.join("slow-plain"));

    let mnt = scratch.join("slow-mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let started = Instant::now();
    let background_config = BackgroundConfig {
        concurrency: 4,
        bandwidth: None,
        ..BackgroundConfig::default()
    };
    let mut mounted = mount_image(
        rt,
        &client,
        "v1",
        &scratch.join("slow-cache"),
        &mnt,
        Some(background_config),
    );
    mounted.wait_background();
    let background = started.elapsed();
    assert!(
        mounted
            .progress
            .as_ref()
            .unwrap()
            .finished
            .load(Ordering::Acquire)
    );
    drop(mounted);
    drop(registry);
    drop(link);
    (background, plain, bytes as f64 / 1e6)
}
