//! The lazy image filesystem through a real FUSE mount: the tree `imgstream mount` shows must
//! equal a GNU tar extraction of the same image (merged view with OCI whiteouts applied, and
//! one layer in overlayfs form), down to modes, owners, times, link targets, device numbers,
//! xattrs, hard links and every byte of every file.

mod support;

use std::{path::Path, process::Command};

use imgstream_vm_tests::tree::describe;
use support::{
    Mounted, Registry,
    image_tree::{expected_merged, extract, layer_dirs, set_xattr, tar_layers},
};

/// One layer as an overlayfs lower directory: whiteouts as 0:0 char devices, opaque markers
/// as the trusted.overlay.opaque xattr.
fn expected_layer(layer: &Path, into: &Path) {
    extract(layer, into, &["--exclude=.wh.*"]);
    let listing = Command::new("tar").arg("-tzf").arg(layer).output().unwrap();
    for name in String::from_utf8(listing.stdout).unwrap().lines() {
        let name = name.trim_start_matches("./");
        let (dir, base) = name.rsplit_once('/').unwrap_or(("", name));
        if base == ".wh..wh..opq" {
            set_xattr(&into.join(dir), "trusted.overlay.opaque", b"y");
        } else if let Some(hidden) = base.strip_prefix(".wh.") {
            // The device takes the whiteout entry's time.
            let raw = into.with_extension("raw");
            extract(layer, &raw, &[]);
            let device = into.join(dir).join(hidden);
            let status = Command::new("mknod")
                .arg(&device)
                .args(["c", "0", "0"])
                .status()
                .unwrap();
            assert!(status.success());
            let status = Command::new("chmod")
                .arg("000")
                .arg(&device)
                .status()
                .unwrap();
            assert!(status.success());
            let reference = raw.join(dir).join(base);
            let status = Command::new("touch")
                .arg("-h")
                .arg("-r")
                .arg(reference)
                .arg(&device)
                .status()
                .unwrap();
            assert!(status.success());
        }
    }
    // Creating the whiteouts touched their directories: extract once more to restore the
    // directories' times from the layer.
    extract(layer, into, &["--exclude=.wh.*"]);
}

fn assert_same_tree(mounted: &Path, expected: &Path, at_least: usize) {
    let (got, want) = (describe(mounted).unwrap(), describe(expected).unwrap());
    let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, extra {extra:?}"
    );
    for (path, line) in &want {
        assert_eq!(&got[path], line, "{path}");
    }
    assert!(
        want.len() >= at_least,
        "the comparison covered only {} paths",
        want.len()
    );
}

/// A fresh scratch directory and registry, both named `name` (as root): the directory, the
/// registry and its host.
fn scratch_and_registry(name: &str) -> (std::path::PathBuf, Registry, String) {
    support::require_root();
    let scratch = support::scratch(name);
    let registry = Registry::start(name, None);
    let reg = registry.host();
    (scratch, registry, reg)
}

/// `tarballs` as the layers of an image that skopeo pushes to `reg` as `repo:v1`, from an
/// OCI layout in `scratch`: the image's reference.
async fn push_layers(
    scratch: &Path,
    reg: &str,
    repo: &str,
    tarballs: &[std::path::PathBuf],
) -> String {
    let layout = scratch.join("layout");
    support::build_image_from_tarballs(&layout, "v1", tarballs, &["/bin/sh"]).await;
    let image = format!("{reg}/{repo}:v1");
    support::skopeo_copy(
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{image}"),
    );
    image
}

/// The sample image's layer directories and tarballs, pushed as `src/app:v1` to a fresh
/// registry (as root).
async fn sample_image(
    name: &str,
) -> (
    std::path::PathBuf,
    Registry,
    Vec<std::path::PathBuf>,
    Vec<std::path::PathBuf>,
) {
    support::require_root();
    let scratch = support::scratch(name);
    let registry = Registry::start(name, None);
    let dirs = layer_dirs(&scratch);
    let tarballs = tar_layers(&dirs, &scratch);
    push_layers(&scratch, &registry.host(), "src/app", &tarballs).await;
    (scratch, registry, dirs, tarballs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mounted_image_equals_a_gnu_tar_extraction_in_both_views() {
    let (scratch, registry, _, tarballs) = sample_image("fuse-tree").await;
    let reg = registry.host();
    support::imgstream(&[
        "convert",
        &format!("{reg}/src/app:v1"),
        &format!("{reg}/esgz/app:v1"),
        "--insecure-registry",
        &reg,
        "--chunk-size",
        "1M",
        "--scratch",
        scratch.to_str().unwrap(),
    ]);

    let image = format!("{reg}/esgz/app:v1");
    let cache = scratch.join("cache");
    let merged = Mounted::start(
        &image,
        &scratch.join("mnt-merged"),
        &cache,
        &reg,
        &["--no-background"],
    );
    let expected = scratch.join("expected-merged");
    expected_merged(&tarballs, &expected);
    assert_same_tree(&merged.mountpoint, &expected, 25);
    merged.stop();

    let upper = Mounted::start(
        &image,
        &scratch.join("mnt-layer1"),
        &cache,
        &reg,
        &["--no-background", "--view", "layer:1"],
    );
    let expected = scratch.join("expected-layer1");
    expected_layer(&tarballs[1], &expected);
    assert_same_tree(&upper.mountpoint, &expected, 8);
    upper.stop();

    // The original, plain gzip image: its layers are downloaded whole before the mount is
    // ready, and the tree is the same.
    let plain = Mounted::start(
        &format!("{reg}/src/app:v1"),
        &scratch.join("mnt-plain"),
        &cache,
        &reg,
        &["--no-background"],
    );
    assert_same_tree(&plain.mountpoint, &scratch.join("expected-merged"), 25);
    plain.stop();
    drop(registry);
    std::fs::remove_dir_all(&scratch).unwrap();
}

/// `imgstream index IMAGE` against the test registry `reg`, with `extra` flags: its report.
fn index_image(image: &str, reg: &str, scratch: &Path, extra: &[&str]) -> String {
    // The sample layers are a few KB: every one is indexed, however small.
    let mut args = vec![
        "index",
        image,
        "--insecure-registry",
        reg,
        "--scratch",
        scratch.to_str().unwrap(),
        "--min-layer",
        "0",
    ];
    args.extend_from_slice(extra);
    String::from_utf8_lossy(&support::imgstream(&args).stdout).into_owned()
}

/// The chunk cache at `dir`, as a mount of it finds it.
fn open_cache(dir: &Path) -> imgstream::cache::ChunkCache {
    imgstream::cache::ChunkCache::open(&imgstream::cache::CacheConfig {
        dir: dir.to_path_buf(),
        limit_bytes: None,
        prefer_uring: false,
    })
    .unwrap()
}

/// The sample image in a fresh registry, indexed with `imgstream index --local` (64 KiB
/// spans) into `scratch/cache`: (scratch, registry, tarballs, image reference, the report).
async fn sample_indexed_locally(
    name: &str,
) -> (
    std::path::PathBuf,
    Registry,
    Vec<std::path::PathBuf>,
    String,
    String,
) {
    let (scratch, registry, _, tarballs) = sample_image(name).await;
    let reg = registry.host();
    let image = format!("{reg}/src/app:v1");
    let printed = index_locally(&image, &reg, &scratch);
    (scratch, registry, tarballs, image, printed)
}

/// `imgstream index --local` of `image` into `scratch/cache`, 64 KiB spans: the report.
fn index_locally(image: &str, reg: &str, scratch: &Path) -> String {
    let cache = scratch.join("cache");
    index_image(
        image,
        reg,
        scratch,
        &[
            "--local",
            "--cache-dir",
            cache.to_str().unwrap(),
            "--span",
            "64K",
        ],
    )
}

/// Mounts `image` with the cache `index_locally` filled in `scratch`, no background
/// download, the log kept (`log_text`).
fn mount_indexed_locally(image: &str, scratch: &Path, reg: &str) -> Mounted {
    Mounted::start_logged(
        image,
        &scratch.join("mnt"),
        &scratch.join("cache"),
        reg,
        &["--no-background"],
        Some(&scratch.join("mount.log")),
    )
}

/// Checks that the mount holds what GNU tar extracts from `tarballs`; the mount's log.
fn assert_tar_tree(mounted: &Mounted, scratch: &Path, tarballs: &[std::path::PathBuf]) -> String {
    let expected = scratch.join("expected-merged");
    expected_merged(tarballs, &expected);
    assert_same_tree(&mounted.mountpoint, &expected, 25);
    mounted.log_text()
}

/// The mount holds what GNU tar extracts from `tarballs`, and its log says each of its
/// `layers` was streamed through a span index, none downloaded whole.
fn assert_streamed_through_indexes(
    mounted: &Mounted,
    scratch: &Path,
    tarballs: &[std::path::PathBuf],
    layers: usize,
) {
    let text = assert_tar_tree(mounted, scratch, tarballs);
    assert_eq!(
        text.matches("streamed through its span index").count(),
        layers,
        "{text}"
    );
    assert!(!text.contains("downloading it whole"), "{text}");
}

/// An unmodified image (GNU tar + gzip layers, pushed with skopeo, never converted) streams
/// through span indexes that `imgstream index --local` kept in the cache: the mount comes up
/// without downloading a layer, a small file costs a span, not the layer, and the tree is
/// a GNU tar extraction's, file for file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unconverted_image_streams_through_span_indexes_and_equals_gnu_tar() {
    let (scratch, registry, tarballs, image, printed) =
        sample_indexed_locally("fuse-span-index").await;
    let (reg, cache) = (registry.host(), scratch.join("cache"));
    assert_eq!(
        printed.matches(" spans, ").count(),
        tarballs.len(),
        "{printed}"
    );

    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", support::free_port())
        .parse()
        .unwrap();
    let log = scratch.join("mount.log");
    let mounted = Mounted::start_logged(
        &image,
        &scratch.join("mnt"),
        &cache,
        &reg,
        &["--no-background", "--metrics-addr", &metrics.to_string()],
        Some(&log),
    );
    assert_eq!(
        std::fs::read(mounted.mountpoint.join("opt/app/config")).unwrap(),
        b"v2"
    );
    let (_, page) = support::http_get(metrics, "/metrics");
    assert_eq!(
        support::metric(&page, r#"imgstream_layers_opened_total{how="span_index"}"#),
        tarballs.len() as u64
    );
    assert_eq!(
        support::metric(
            &page,
            r#"imgstream_layers_opened_total{how="whole",why="no_index"}"#
        ),
        0
    );
    let fetched: u64 = ["on_demand", "read_around", "background"]
        .iter()
        .map(|p| {
            support::metric(
                &page,
                &format!("imgstream_fetch_bytes_total{{priority=\"{p}\"}}"),
            )
        })
        .sum();
    let layers: u64 = tarballs
        .iter()
        .map(|t| std::fs::metadata(t).unwrap().len())
        .sum();
    assert!(
        fetched > 0 && fetched * 4 < layers,
        "{fetched} bytes fetched for one small file of {layers} bytes of layers"
    );
    assert_streamed_through_indexes(&mounted, &scratch, &tarballs, tarballs.len());
    mounted.stop();
    drop(registry);
    std::fs::remove_dir_all(&scratch).unwrap();
}

/// Mounts `image` (its cache at `cache`) and checks that the span indexes of `refused` of
/// its layers were refused (the log and `/metrics` say so, those layers are downloaded
/// whole), the others' were used, and the tree is a GNU tar extraction of `tarballs`.
fn mount_refusing(
    image: &str,
    scratch: &Path,
    (cache, reg): (&Path, &str),
    tarballs: &[std::path::PathBuf],
    refused: usize,
) -> Mounted {
    let (mounted, metric) = mount_with_metrics(
        image,
        &scratch.join("mnt"),
        (cache, reg),
        &["--no-background"],
        Some(&scratch.join("mount.log")),
    );
    let text = assert_tar_tree(&mounted, scratch, tarballs);
    assert_eq!(
        text.matches("span index refused").count(),
        refused,
        "{text}"
    );
    assert_eq!(
        text.matches("streamed through its span index").count(),
        tarballs.len() - refused,
        "{text}"
    );
    assert_eq!(
        metric(r#"imgstream_layers_opened_total{how="whole",why="index_refused"}"#),
        refused as u64
    );
    mounted
}

/// An index that is not the layer's (the image's second layer's index, put in the cache
/// under the first layer's digest, as a registry could list another image's under it) is
/// refused: that layer is downloaded whole, the others stream, the tree is still GNU tar's,
/// and `/metrics` counts the refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_of_another_layer_is_refused_and_that_layer_downloaded_whole() {
    let (scratch, registry, tarballs, image, _) = sample_indexed_locally("fuse-span-wrong").await;
    let (reg, cache_dir) = (registry.host(), scratch.join("cache"));
    assert!(tarballs.len() >= 2, "the sample has layers to swap");
    let manifest: serde_json::Value =
        serde_json::from_slice(&support::skopeo_raw(&format!("docker://{image}"))).unwrap();
    let digest = |i: usize| -> imgstream::oci::digest::Digest {
        manifest["layers"][i]["digest"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (first, second) = (digest(0), digest(1));
    let cache = open_cache(&cache_dir);
    let others = cache.get_span_index(&second).unwrap().expect("indexed");
    cache.remove_span_index(&first);
    assert!(cache.put_span_index(&first, &others).unwrap());
    drop(cache);

    let mounted = mount_refusing(&image, &scratch, (&cache_dir, &reg), &tarballs, 1);
    mounted.stop();
    drop(registry);
    std::fs::remove_dir_all(&scratch).unwrap();
}

/// A registry whose listing names each layer's index as another layer's (the tag fallback's
/// entries rotated, as a confused or hostile publisher could list them, with every artifact
/// and its windows as published) gets every index refused: each layer is downloaded whole,
/// the tree is still GNU tar's, `/metrics` counts the refusals, and no refused index is kept
/// in the cache for the next mount.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexes_the_registry_lists_for_other_layers_are_refused() {
    use imgstream::registry::{
        BlobSink, BlobSource,
        attached::LAYER_ANNOTATION,
        http::{HttpConfig, RegistryClient},
    };
    let (scratch, registry, _, tarballs) = sample_image("fuse-span-swapped").await;
    let reg = registry.host();
    let image = format!("{reg}/src/app:v1");
    let printed = index_image(&image, &reg, &scratch, &[]);
    let layers = tarballs.len();
    assert!(layers >= 2, "the sample has layers to swap");
    assert_eq!(
        printed.matches("published as sha256:").count(),
        layers,
        "{printed}"
    );
    let client = RegistryClient::new(
        &reg,
        "src/app",
        HttpConfig {
            insecure: vec![reg.clone()],
            ..HttpConfig::default()
        },
    )
    .unwrap();
    let subject =
        imgstream::oci::digest::Digest::of(&support::skopeo_raw(&format!("docker://{image}")));
    let tag = format!("sha256-{}", subject.hex());
    let mut listing: serde_json::Value =
        serde_json::from_slice(&client.manifest(&tag).await.unwrap().bytes).unwrap();
    let entries = listing["manifests"].as_array_mut().unwrap();
    assert_eq!(entries.len(), layers);
    let named: Vec<serde_json::Value> = entries
        .iter()
        .map(|e| e["annotations"][LAYER_ANNOTATION].clone())
        .collect();
    for (i, entry) in entries.iter_mut().enumerate() {
        entry["annotations"][LAYER_ANNOTATION] = named[(i + 1) % layers].clone();
    }
    client
        .put_manifest(
            Some(&tag),
            imgstream::oci::manifest::OCI_INDEX,
            serde_json::to_vec(&listing).unwrap().into(),
        )
        .await
        .unwrap();

    let cache_dir = scratch.join("fresh-cache");
    let mounted = mount_refusing(&image, &scratch, (&cache_dir, &reg), &tarballs, layers);
    mounted.stop();
    let cache = open_cache(&cache_dir);
    for entry in &named {
        let layer: imgstream::oci::digest::Digest = entry.as_str().unwrap().parse().unwrap();
        assert!(
            cache.get_span_index(&layer).unwrap().is_none(),
            "no refused index is cached for {layer}"
        );
    }
    drop(registry);
    std::fs::remove_dir_all(&scratch).unwrap();
}

/// `imgstream index` publishes each layer's span index beside the image (Debian's registry
/// has no referrers API: through the `sha256-<digest>` tag fallback), the image's manifest
/// stays byte for byte what it was, and a node with an empty cache finds the indexes there
/// and streams the unconverted image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_span_indexes_are_found_through_the_tag_fallback() {
    let (scratch, registry, _, tarballs) = sample_image("fuse-span-published").await;
    let reg = registry.host();
    let image = format!("{reg}/src/app:v1");
    let before = support::skopeo_raw(&format!("docker://{image}"));
    let printed = index_image(&image, &reg, &scratch, &[]);
    assert_eq!(
        printed.matches("published as sha256:").count(),
        tarballs.len(),
        "{printed}"
    );
    assert_eq!(
        support::skopeo_raw(&format!("docker://{image}")),
        before,
        "the image manifest is untouched"
    );
    let subject = imgstream::oci::digest::Digest::of(&before);
    let fallback: serde_json::Value = serde_json::from_slice(&support::skopeo_raw(&format!(
        "docker://{reg}/src/app:sha256-{}",
        subject.hex()
    )))
    .unwrap();
    let listed = fallback["manifests"].as_array().unwrap();
    assert_eq!(listed.len(), tarballs.len());
    assert!(
        listed
            .iter()
            .all(|m| m["artifactType"] == imgstream::image::gzip::SPAN_INDEX_TYPE)
    );
    // Each artifact: the index, and the blob of its windows that the mount fetches a
    // window at a time (every file is read below: every span's window is used).
    for entry in listed {
        let artifact: serde_json::Value = serde_json::from_slice(&support::skopeo_raw(&format!(
            "docker://{reg}/src/app@{}",
            entry["digest"].as_str().unwrap()
        )))
        .unwrap();
        let types: Vec<&str> = artifact["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["mediaType"].as_str().unwrap())
            .collect();
        assert_eq!(
            types,
            [
                imgstream::image::gzip::SPAN_INDEX_TYPE,
                imgstream::image::gzip::WINDOWS_TYPE
            ]
        );
    }

    let log = scratch.join("mount.log");
    let mounted = Mounted::start_logged(
        &image,
        &scratch.join("mnt"),
        &scratch.join("fresh-cache"),
        &reg,
        &["--no-background"],
        Some(&log),
    );
    assert_streamed_through_indexes(&mounted, &scratch, &tarballs, tarballs.len());
    assert!(mounted.log_text().contains("the registry"));
    mounted.stop();
    drop(registry);
    std::fs::remove_dir_all(&scratch).unwrap();
}

/// Bytes changed in the registry's own storage after the layer was indexed: every read of
/// the spans they fall in fails with EIO, every other read is served, and no read ever
/// returns bytes the layer did not hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_span_changed_in_the_registry_is_an_error_never_other_bytes() {
    let (scratch, registry, tarballs, image, _) = sample_indexed_locally("fuse-span-corrupt").await;
    let (reg, cache) = (registry.host(), scratch.join("cache"));
    // One byte in the middle of the lower layer, as the registry stores it.
    let lower = std::fs::read(&tarballs[0]).unwrap();
    let hex = imgstream::oci::digest::Digest::of(&lower).hex();
    let stored = registry.blob_data_path(&hex);
    let mut bytes = std::fs::read(&stored).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&stored, &bytes).unwrap();

    let mounted = Mounted::start(
        &image,
        &scratch.join("mnt"),
        &cache,
        &reg,
        &["--no-background"],
    );
    let expected = scratch.join("expected-merged");
    expected_merged(&tarballs, &expected);
    let (mut served, mut refused) = (0, 0);
    let mut dirs = vec![expected.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let kind = std::fs::symlink_metadata(&path).unwrap().file_type();
            if kind.is_dir() {
                dirs.push(path);
                continue;
            }
            if !kind.is_file() {
                continue;
            }
            let relative = path.strip_prefix(&expected).unwrap();
            match std::fs::read(mounted.mountpoint.join(relative)) {
                Ok(got) => {
                    assert!(
                        got == std::fs::read(&path).unwrap(),
                        "{} was served with bytes the layer does not hold",
                        relative.display()
                    );
                    served += 1;
                }
                Err(err) => {
                    assert_eq!(
                        err.raw_os_error(),
                        Some(libc::EIO),
                        "{}",
                        relative.display()
                    );
                    refused += 1;
                }
            }
        }
    }
    assert!(refused > 0, "no read met the changed span");
    assert!(served > 0, "nothing outside the changed span was served");
    mounted.stop();
    drop(registry);
    std::fs::remove_dir_all(&scratch).unwrap();
}

/// `image` mounted with `extra` flags and its metrics on a free port: the mount, and a reader
/// of one series of its `/metrics` as it stands when called.
fn mount_with_metrics(
    image: &str,
    mountpoint: &Path,
    (cache, reg): (&Path, &str),
    extra: &[&str],
    log: Option<&Path>,
) -> (Mounted, impl Fn(&str) -> u64 + use<>) {
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", support::free_port())
        .parse()
        .unwrap();
    let metrics_addr = metrics.to_string();
    let mut args = extra.to_vec();
    args.extend(["--metrics-addr", &metrics_addr]);
    let mounted = Mounted::start_logged(image, mountpoint, cache, reg, &args, log);
    let metric = move |series: &str| {
        let (_, page) = support::http_get(metrics, "/metrics");
        support::metric(&page, series)
    };
    (mounted, metric)
}

/// A layer whose bytes in the registry's storage differ from what its digest names only in
/// its gzip trailer: every span still matches the index, so readers cannot tell. The
/// background download reads each layer through and checks it against its descriptor: the
/// changed layer is quarantined (reported in `/metrics` and the log) and its files are EIO
/// from then on, while the intact layer is verified and served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_background_checks_each_layer_digest_and_quarantines_one_that_differs() {
    let (scratch, registry, tarballs, image, _) =
        sample_indexed_locally("fuse-span-quarantine").await;
    let (reg, cache) = (registry.host(), scratch.join("cache"));
    let lower = std::fs::read(&tarballs[0]).unwrap();
    let hex = imgstream::oci::digest::Digest::of(&lower).hex();
    let stored = registry.blob_data_path(&hex);
    let mut bytes = std::fs::read(&stored).unwrap();
    // The first byte of the CRC-32 in the gzip trailer: no span's inflated bytes change.
    let crc = bytes.len() - 8;
    bytes[crc] ^= 0x55;
    std::fs::write(&stored, &bytes).unwrap();

    let log = scratch.join("mount.log");
    let (mounted, metric) = mount_with_metrics(
        &image,
        &scratch.join("mnt"),
        (&cache, &reg),
        &[],
        Some(&log),
    );
    let verified = |result: &str| {
        metric(&format!(
            "imgstream_layers_verified_total{{result=\"{result}\"}}"
        ))
    };
    let waited = std::time::Instant::now();
    while verified("quarantined") + verified("match") < tarballs.len() as u64 {
        assert!(
            waited.elapsed() < std::time::Duration::from_secs(60),
            "the background download did not read every layer through\n{}",
            mounted.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(verified("quarantined"), 1);
    assert_eq!(verified("match"), tarballs.len() as u64 - 1);
    assert!(mounted.log_text().contains("layer quarantined"));

    // Files of the upper layer are served as GNU tar extracts them; those only the lower
    // layer holds are EIO.
    let upper = scratch.join("expected-upper");
    expected_layer(&tarballs[1], &upper);
    let expected = scratch.join("expected-merged");
    expected_merged(&tarballs, &expected);
    let (mut served, mut refused) = (0, 0);
    let mut dirs = vec![expected.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let kind = std::fs::symlink_metadata(&path).unwrap().file_type();
            if kind.is_dir() {
                dirs.push(path);
                continue;
            }
            let relative = path.strip_prefix(&expected).unwrap();
            if !kind.is_file() || std::fs::metadata(&path).unwrap().len() == 0 {
                continue;
            }
            let got = std::fs::read(mounted.mountpoint.join(relative));
            if upper.join(relative).exists() {
                assert!(
                    got.unwrap() == std::fs::read(&path).unwrap(),
                    "{}",
                    relative.display()
                );
                served += 1;
            } else {
                let err = got.expect_err("a file of the quarantined layer was served");
                assert_eq!(
                    err.raw_os_error(),
                    Some(libc::EIO),
                    "{}",
                    relative.display()
                );
                refused += 1;
            }
        }
    }
    assert!(
        served > 0 && refused > 0,
        "{served} served, {refused} refused"
    );
    mounted.stop();
    drop(registry);
    std::fs::remove_dir_all(&scratch).unwrap();
}

/// podman's run directory for a test of `scratch`: under /tmp, since podman takes at most
/// 50 characters there.
fn podman_runroot(scratch: &Path) -> std::path::PathBuf {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    scratch.hash(&mut hasher);
    format!("/tmp/podman-run-{:016x}", hasher.finish()).into()
}

/// `podman` with storage of its own under `scratch` (vfs: no overlay mounts needed).
fn podman(scratch: &Path, args: &[&str]) {
    let out = std::process::Command::new("podman")
        .arg("--storage-driver")
        .arg("vfs")
        .arg("--root")
        .arg(scratch.join("podman"))
        .arg("--runroot")
        .arg(podman_runroot(scratch))
        .args(args)
        .output()
        .expect("podman runs (apt-get install podman)");
    assert!(
        out.status.success(),
        "podman {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `tree` tarred by GNU tar (xattrs kept), imported into podman and pushed by podman itself
/// to `{reg}/{name}:{tag}` in each `(compression format, tag)`: the tar.
fn podman_pushes(
    scratch: &Path,
    tree: &Path,
    (reg, name): (&str, &str),
    pushes: &[(&str, &str)],
) -> std::path::PathBuf {
    let tar = scratch.join(format!("{name}.tar"));
    let tarred = std::process::Command::new("tar")
        .args(["--xattrs", "--xattrs-include=*", "-C"])
        .arg(tree)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(tarred.success());
    let local = format!("localhost/{name}:v1");
    podman(scratch, &["import", tar.to_str().unwrap(), &local]);
    for (format, tag) in pushes {
        podman(
            scratch,
            &[
                "push",
                "--tls-verify=false",
                "--compression-format",
                format,
                &local,
                &format!("docker://{reg}/{name}:{tag}"),
            ],
        );
    }
    tar
}

/// The sample image's merged tree imported into podman and pushed by podman itself as
/// zstd:chunked and as plain zstd: the zstd:chunked layer (the TOC found through podman's
/// annotations) mounts lazily, a small file costing its frame, not the layer; the plain zstd
/// one is downloaded whole and mounted, not refused; both trees are GNU tar's extraction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_chunked_and_zstd_layers_written_by_podman_mount_and_equal_gnu_tar() {
    let (scratch, registry, _, tarballs) = sample_image("fuse-zstd").await;
    let (reg, cache) = (registry.host(), scratch.join("cache"));
    let expected = scratch.join("expected-merged");
    expected_merged(&tarballs, &expected);
    let merged = podman_pushes(
        &scratch,
        &expected,
        (&reg, "zc"),
        &[("zstd:chunked", "chunked"), ("zstd", "zstd")],
    );
    let big = std::fs::metadata(&merged).unwrap().len();

    let (mounted, metric) = mount_with_metrics(
        &format!("{reg}/zc:chunked"),
        &scratch.join("mnt"),
        (&cache, &reg),
        &["--no-background"],
        None,
    );
    assert_eq!(
        std::fs::read(mounted.mountpoint.join("opt/app/config")).unwrap(),
        b"v2"
    );
    assert_eq!(
        metric(r#"imgstream_layers_opened_total{how="zstd_chunked"}"#),
        1
    );
    let fetched = metric(r#"imgstream_fetch_bytes_total{priority="on_demand"}"#)
        + metric(r#"imgstream_fetch_bytes_total{priority="read_around"}"#);
    assert!(
        fetched > 0 && fetched * 4 < big,
        "{fetched} bytes fetched for one small file of a {big}-byte tree"
    );
    assert_same_tree(&mounted.mountpoint, &expected, 25);
    mounted.stop();

    let (mounted, metric) = mount_with_metrics(
        &format!("{reg}/zc:zstd"),
        &scratch.join("mnt-zstd"),
        (&cache, &reg),
        &["--no-background"],
        None,
    );
    assert_eq!(
        metric(r#"imgstream_layers_opened_total{how="whole",why="not_gzip"}"#),
        1
    );
    assert_same_tree(&mounted.mountpoint, &expected, 25);
    mounted.stop();
    drop(registry);
    let _ = std::fs::remove_dir_all(podman_runroot(&scratch));
    std::fs::remove_dir_all(&scratch).unwrap();
}

/// The sample image's merged tree, with 2 MiB of text and 512 KiB of zeros beside it,
/// pushed by podman as plain gzip: the layer as Go's gzip writers make it (flushed blocks,
/// then an empty final one), which is how most images in registries were compressed.
/// `imgstream index` publishes its span index (through the tag fallback), a fresh mount
/// finds it and streams the layer through it, a small file costing a sliver of the layer,
/// and the tree is GNU tar's extraction, file for file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_gzip_layer_pushed_by_podman_streams_through_its_published_index() {
    let (scratch, registry, _, tarballs) = sample_image("fuse-podman-gzip").await;
    let reg = registry.host();
    let expected = scratch.join("expected-merged");
    expected_merged(&tarballs, &expected);
    // Enough for several spans: the stream ends after a span's worth of blocks.
    let text: String = (0..120_000u64)
        .map(|i| format!("{:05} {}\n", i, i.wrapping_mul(2_654_435_761) % 104_729))
        .collect();
    std::fs::write(expected.join("opt/app/words"), text.as_bytes()).unwrap();
    // Last in the layer (podman writes it in name order), zeros: the final deflate block
    // is longer than a span, so a checkpoint falls at its end, where only the empty
    // blocks that close the stream follow.
    std::fs::write(expected.join("zzz-zeros"), vec![0u8; 512 << 10]).unwrap();
    podman_pushes(&scratch, &expected, (&reg, "pg"), &[("gzip", "v1")]);
    let image = format!("{reg}/pg:v1");
    let printed = index_image(&image, &reg, &scratch, &["--span", "64K"]);
    assert_eq!(
        printed.matches("published as sha256:").count(),
        1,
        "{printed}"
    );

    let log = scratch.join("mount.log");
    let (mounted, metric) = mount_with_metrics(
        &image,
        &scratch.join("mnt"),
        (&scratch.join("fresh-cache"), &reg),
        &["--no-background", "--no-loader-prefetch"],
        Some(&log),
    );
    assert_eq!(
        std::fs::read(mounted.mountpoint.join("opt/app/config")).unwrap(),
        b"v2"
    );
    assert_eq!(
        metric(r#"imgstream_layers_opened_total{how="span_index"}"#),
        1
    );
    let fetched = metric(r#"imgstream_fetch_bytes_total{priority="on_demand"}"#)
        + metric(r#"imgstream_fetch_bytes_total{priority="read_around"}"#);
    let manifest: serde_json::Value =
        serde_json::from_slice(&support::skopeo_raw(&format!("docker://{image}"))).unwrap();
    let layer = manifest["layers"][0]["size"].as_u64().unwrap();
    assert!(
        fetched > 0 && fetched * 4 < layer,
        "{fetched} bytes fetched for one small file of a {layer}-byte layer"
    );
    assert_same_tree(&mounted.mountpoint, &expected, 25);
    let text = mounted.log_text();
    assert!(text.contains("streamed through its span index"), "{text}");
    assert!(!text.contains("downloading it whole"), "{text}");
    mounted.stop();
    drop(registry);
    let _ = std::fs::remove_dir_all(podman_runroot(&scratch));
    std::fs::remove_dir_all(&scratch).unwrap();
}

/// Layers written by tools that share no code with GNU tar, gzip, Go or zlib: busybox's tar
/// (GNU long-name entries for paths past 100 bytes, its own header fields) and busybox's
/// gzip (its own deflate, at -9), pushed with skopeo and never converted. `imgstream index`
/// indexes them, a mount streams them through their indexes, and the tree is what GNU tar
/// extracts from the same files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_tarred_and_gzipped_by_busybox_stream_through_their_span_indexes() {
    let (scratch, registry, reg) = scratch_and_registry("fuse-busybox-gzip");
    let dirs = layer_dirs(&scratch);
    let deep = dirs[0].join("usr/share").join("d".repeat(120));
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::write(deep.join("f".repeat(200)), b"a long path").unwrap();
    std::fs::write(
        dirs[0].join("usr/share/ünïcødé name"),
        "héllo".repeat(20_000),
    )
    .unwrap();
    let tarballs: Vec<_> = dirs
        .iter()
        .enumerate()
        .map(|(i, dir)| {
            let out = scratch.join(format!("layer{i}.tar.gz"));
            let status = Command::new("sh")
                .arg("-c")
                .arg(r#"cd "$1" && busybox tar -cf - . | busybox gzip -9 > "$2""#)
                .args(["sh", dir.to_str().unwrap(), out.to_str().unwrap()])
                .status()
                .unwrap();
            assert!(status.success(), "busybox tar | busybox gzip");
            out
        })
        .collect();
    let image = push_layers(&scratch, &reg, "bb/app", &tarballs).await;
    let printed = index_locally(&image, &reg, &scratch);
    assert_eq!(
        printed.matches(" spans, ").count(),
        tarballs.len(),
        "{printed}"
    );

    let mounted = mount_indexed_locally(&image, &scratch, &reg);
    let long = Path::new("usr/share")
        .join("d".repeat(120))
        .join("f".repeat(200));
    assert_eq!(
        std::fs::read(mounted.mountpoint.join(long)).unwrap(),
        b"a long path"
    );
    assert_streamed_through_indexes(&mounted, &scratch, &tarballs, tarballs.len());
    mounted.stop();
    drop(registry);
    std::fs::remove_dir_all(&scratch).unwrap();
}

/// Tars `dir` into `out` (gzip) as GNU tar with `flags` does, then appends, as `tar
/// --append` does, each of `again` (name, bytes): a second entry of a name the layer holds.
fn tar_appending(dir: &Path, out: &Path, flags: &[&str], again: &[(&str, &[u8])]) {
    let plain = out.with_extension("");
    let later = out.with_extension("again");
    for (name, bytes) in again {
        let path = later.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    let names = again.iter().map(|(name, _)| format!("./{name}"));
    for (mode, from, names) in [
        ("-cf", dir, vec![".".to_string()]),
        ("-rf", &later, names.collect()),
    ] {
        let status = Command::new("tar")
            .args(["--format=pax", "--numeric-owner"])
            .args(flags)
            .arg(mode)
            .arg(&plain)
            .arg("-C")
            .arg(from)
            .args(names)
            .status()
            .unwrap();
        assert!(status.success(), "tar {mode}");
    }
    let status = Command::new("gzip")
        .args(["-1", "-f"])
        .arg(&plain)
        .status()
        .unwrap();
    assert!(status.success());
}

/// Layers written with GNU tar features the usual builders never use but tar pipelines
/// do: a sparse file (`--sparse`: a disk image, a database file; PAX sparse format 1.0, GNU
/// tar's default) and names given twice (`--append`, some build tools), mount as GNU tar
/// extracts them. The sparse file reads whole under its own name, not as the stretches of
/// data the stream holds under GNU tar's `GNUSparseFile.<pid>` name (the tar reader once
/// showed that); a name given twice is its later entry, in a layer streamed through its
/// span index and in one downloaded whole (the mount refused the image before). A span
/// index cannot give holes, so `imgstream index` leaves the sparse layer unindexed and says
/// why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_with_sparse_files_and_names_given_twice_mount_as_gnu_tar_extracts_them() {
    use std::os::unix::fs::FileExt;
    let (scratch, registry, reg) = scratch_and_registry("fuse-tar-features");
    let dirs = layer_dirs(&scratch);
    let data = dirs[1].join("var/lib/data");
    std::fs::create_dir_all(&data).unwrap();
    for (name, size, stretches) in [
        (
            "disk.img",
            8u64 << 20,
            &[(4096u64, 5000usize), (5 << 20, 70_000)][..],
        ),
        ("ends-in-data", 300_000, &[(250_000, 50_000)][..]),
    ] {
        let file = std::fs::File::create(data.join(name)).unwrap();
        file.set_len(size).unwrap();
        for &(at, len) in stretches {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + at as usize) as u8).collect();
            file.write_all_at(&bytes, at).unwrap();
        }
    }
    // A time the extraction's own cannot be (see the expected tree below).
    let status = Command::new("touch")
        .args(["-d", "@1600000000"])
        .arg(dirs[1].join("etc"))
        .status()
        .unwrap();
    assert!(status.success());
    let tarballs = [scratch.join("layer0.tar.gz"), scratch.join("layer1.tar.gz")];
    let hostname: &[u8] = b"given twice: the later one";
    tar_appending(&dirs[0], &tarballs[0], &[], &[("etc/hostname", hostname)]);
    tar_appending(
        &dirs[1],
        &tarballs[1],
        &["--sparse"],
        &[("etc/motd", b"later motd\n")],
    );
    // The stream holds the sparse files' data, not their holes.
    assert!(std::fs::metadata(&tarballs[1]).unwrap().len() < 1 << 20);
    let image = push_layers(&scratch, &reg, "tar/app", &tarballs).await;
    let printed = index_locally(&image, &reg, &scratch);
    assert_eq!(printed.matches(" spans, ").count(), 1, "{printed}");
    assert!(
        printed.contains("layer 1 ") && printed.contains("not indexed (holds a sparse file"),
        "{printed}"
    );

    let mounted = mount_indexed_locally(&image, &scratch, &reg);
    let expected = scratch.join("expected-merged");
    expected_merged(&tarballs, &expected);
    // GNU tar sets a directory's time from its entry once it has left it: an entry appended
    // into it later leaves it with the time of the extraction. containerd's unpacking, and
    // the mount, give a directory its entry's time (here the upper layer's `etc`).
    let status = Command::new("touch")
        .arg("-r")
        .arg(dirs[1].join("etc"))
        .arg(expected.join("etc"))
        .status()
        .unwrap();
    assert!(status.success());
    assert_same_tree(&mounted.mountpoint, &expected, 25);
    let text = mounted.log_text();
    let root = &mounted.mountpoint;
    assert_eq!(std::fs::read(root.join("etc/hostname")).unwrap(), hostname);
    assert_eq!(
        std::fs::read(root.join("etc/motd")).unwrap(),
        b"later motd\n"
    );
    assert_eq!(
        std::fs::metadata(root.join("var/lib/data/disk.img"))
            .unwrap()
            .len(),
        8 << 20
    );
    assert_eq!(
        text.matches("streamed through its span index").count(),
        1,
        "{text}"
    );
    assert!(text.contains("downloading it whole"), "{text}");
    mounted.stop();
    drop(registry);
    std::fs::remove_dir_all(&scratch).unwrap();
}

/// A file whose name is not UTF-8 (made on a Latin-1 system, tarred by GNU tar): imgstream's
/// paths are strings, and a name with its bytes replaced would show the file under another
/// name (as it did). `imgstream index` leaves the layer unindexed and says why, and a mount
/// refuses the image with an error that names the cause (the snapshotter then leaves the
/// layer to containerd, which unpacks the name as it is).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_that_is_not_utf8_is_refused_with_the_reason_not_renamed() {
    use std::os::unix::ffi::OsStrExt;
    let (scratch, registry, reg) = scratch_and_registry("fuse-latin1");
    let dir = scratch.join("layer");
    std::fs::create_dir_all(dir.join("srv")).unwrap();
    std::fs::write(dir.join("srv/plain"), b"fine").unwrap();
    let latin1 = dir
        .join("srv")
        .join(std::ffi::OsStr::from_bytes(b"caf\xe9.txt"));
    std::fs::write(latin1, b"a Latin-1 name").unwrap();
    let tarball = scratch.join("layer0.tar.gz");
    support::image_tree::tar_layer(&dir, &tarball);
    let image = push_layers(&scratch, &reg, "latin1/app", std::slice::from_ref(&tarball)).await;
    let printed = index_locally(&image, &reg, &scratch);
    assert!(
        printed.contains("not indexed (a name in it is not UTF-8"),
        "{printed}"
    );

    let mountpoint = scratch.join("mnt");
    std::fs::create_dir_all(&mountpoint).unwrap();
    // Bounded: a mount that came up (the old behaviour) is stopped, and fails the test.
    let out = Command::new("timeout")
        .args(["-s", "INT", "30"])
        .arg(support::imgstream_bin())
        .args(["mount", &image])
        .arg(&mountpoint)
        .arg("--cache-dir")
        .arg(scratch.join("cache"))
        .args(["--insecure-registry", &reg])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("is not UTF-8"), "{stderr}");
    drop(registry);
    std::fs::remove_dir_all(&scratch).unwrap();
}

/// `imgstream convert --format zstd:chunked` writes an image podman itself pulls (it checks
/// every layer against the config's diff IDs) and imgstream mounts lazily, through the
/// annotations podman 4 reads, with the tree GNU tar extracts from the original layers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_converted_to_zstd_chunked_is_pulled_by_podman_and_mounts_lazily() {
    let (scratch, registry, _, tarballs) = sample_image("fuse-zstd-convert").await;
    let (reg, cache) = (registry.host(), scratch.join("cache"));
    let out = support::imgstream(&[
        "convert",
        &format!("{reg}/src/app:v1"),
        &format!("{reg}/src/app:zc"),
        "--format",
        "zstd:chunked",
        "--chunk-size",
        "64K",
        "--insecure-registry",
        &reg,
        "--scratch",
        scratch.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    podman(
        &scratch,
        &[
            "pull",
            "--tls-verify=false",
            &format!("docker://{reg}/src/app:zc"),
        ],
    );

    let (mounted, metric) = mount_with_metrics(
        &format!("{reg}/src/app:zc"),
        &scratch.join("mnt"),
        (&cache, &reg),
        &["--no-background"],
        None,
    );
    assert_eq!(
        metric(r#"imgstream_layers_opened_total{how="zstd_chunked"}"#),
        tarballs.len() as u64
    );
    let expected = scratch.join("expected-merged");
    expected_merged(&tarballs, &expected);
    assert_same_tree(&mounted.mountpoint, &expected, 25);
    mounted.stop();
    drop(registry);
    let _ = std::fs::remove_dir_all(podman_runroot(&scratch));
    std::fs::remove_dir_all(&scratch).unwrap();
}

/// Images GKE's Image streaming declines stream here like any other: one with an empty layer
/// (a tar of nothing) and the same layer twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_and_repeated_layers_stream_like_any_other() {
    let (scratch, registry, reg) = scratch_and_registry("fuse-odd-layers");
    let dirs = layer_dirs(&scratch);
    let tarballs = tar_layers(&dirs, &scratch);
    let empty = scratch.join("empty.tar.gz");
    {
        use std::io::Write as _;
        let mut gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&empty).unwrap(),
            flate2::Compression::default(),
        );
        gz.write_all(&[0u8; 1024]).unwrap();
        gz.finish().unwrap();
    }
    let layers = [
        tarballs[0].clone(),
        empty,
        tarballs[1].clone(),
        tarballs[1].clone(),
    ];
    let image = push_layers(&scratch, &reg, "odd/app", &layers).await;
    let cache = scratch.join("cache");
    index_image(
        &image,
        &reg,
        &scratch,
        &["--local", "--cache-dir", cache.to_str().unwrap()],
    );
    let log = scratch.join("mount.log");
    let mounted = Mounted::start_logged(
        &image,
        &scratch.join("mnt"),
        &cache,
        &reg,
        &["--no-background"],
        Some(&log),
    );
    assert_streamed_through_indexes(&mounted, &scratch, &tarballs, layers.len());
    mounted.stop();
    drop(registry);
    std::fs::remove_dir_all(&scratch).unwrap();
}

/// `imgstream mount --record-reads` records what a workload reads, `imgstream convert
/// --prefetch-from` turns that into the layer's prefetch list, and a mount of the converted
/// image fetches exactly those chunks before anything reads them: with the registry hung
/// afterwards, the recorded reads are served from the cache and any other read fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_reads_are_prefetched_at_mount() {
    let (scratch, registry, dirs, _) = sample_image("fuse-prefetch").await;
    let reg = registry.host();
    let convert = |dst: &str, extra: &[&str]| {
        let mut args = vec![
            "convert".to_string(),
            format!("{reg}/src/app:v1"),
            format!("{reg}/{dst}"),
            "--insecure-registry".into(),
            reg.clone(),
            "--chunk-size".into(),
            "64K".into(),
            "--scratch".into(),
            scratch.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        support::imgstream(&args.iter().map(String::as_str).collect::<Vec<_>>());
    };
    convert("esgz/app:v1", &[]);

    // The "workload": a read in the middle of big.bin and all of a small file.
    let reads = scratch.join("reads.jsonl");
    let recording = Mounted::start(
        &format!("{reg}/esgz/app:v1"),
        &scratch.join("mnt-record"),
        &scratch.join("cache-record"),
        &reg,
        &["--no-background", "--record-reads", reads.to_str().unwrap()],
    );
    let big = std::fs::read(dirs[0].join("usr/lib/big.bin")).unwrap();
    let middle = read_at(
        &recording.mountpoint.join("usr/lib/big.bin"),
        1_000_000,
        100,
    );
    assert_eq!(middle, big[1_000_000..1_000_100]);
    let config = std::fs::read(recording.mountpoint.join("opt/app/config")).unwrap();
    // Unmounted from outside rather than stopped: the process exits on its own and still
    // writes what it recorded.
    recording.unmount_from_outside();
    let recorded: Vec<serde_json::Value> = std::fs::read_to_string(&reads)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Readahead is off while recording: the page around the read, nothing more. (The path
    // is the one holding the data: big.bin and big-hardlink.bin are one file.)
    assert!(
        recorded.iter().any(|r| r["path"]
            .as_str()
            .is_some_and(|p| p.starts_with("usr/lib/big"))
            && r["layer"] == 0
            && r["offset"] == 999_424
            && r["size"] == 4096),
        "{recorded:?}"
    );
    assert!(recorded.iter().any(|r| r["path"] == "opt/app/config"));
    assert!(
        !recorded.iter().any(|r| r["path"] == "bin/busybox"),
        "{recorded:?}"
    );

    convert(
        "prefetch/app:v1",
        &["--prefetch-from", reads.to_str().unwrap()],
    );
    let log = scratch.join("mount.log");
    let mounted = Mounted::start_logged(
        &format!("{reg}/prefetch/app:v1"),
        &scratch.join("mnt"),
        &scratch.join("cache"),
        &reg,
        &["--no-background", "--read-deadline-secs", "2"],
        Some(&log),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !mounted.log_text().contains("prefetch done") {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            mounted.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(mounted.log_text().contains("failed_batches=0"));
    registry.pause();
    assert_eq!(
        read_at(&mounted.mountpoint.join("usr/lib/big.bin"), 1_000_000, 100),
        middle
    );
    assert_eq!(
        std::fs::read(mounted.mountpoint.join("opt/app/config")).unwrap(),
        config
    );
    // Not in the list: needs the (hung) registry.
    let err = std::fs::read(mounted.mountpoint.join("bin/busybox")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    registry.resume();
    mounted.stop();
    drop(registry);
    std::fs::remove_dir_all(&scratch).unwrap();
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}
