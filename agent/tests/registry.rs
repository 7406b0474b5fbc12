//! The image source against a real registry (Debian's docker-registry on loopback): convert
//! an image pushed by skopeo, read every file back by range and compare it with a GNU tar
//! extraction of the original layer; basic auth; and the failures a registry can throw.

mod support;

use std::{
    collections::BTreeMap,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use imgstream::{
    fetch::layer::{self, RemoteLayer},
    image::estargz::{NO_PREFETCH_LANDMARK, NodeKind, PREFETCH_LANDMARK, TOC_DIGEST_ANNOTATION},
    oci::{
        digest::Digest,
        manifest::{self, Descriptor, Document},
    },
    registry::{
        BlobSource, RegistryError,
        http::{HttpConfig, RegistryClient},
    },
};
use support::{Fault, Proxy, Recorder, Registry};

const IMGSTREAM: &str = env!("CARGO_BIN_EXE_imgstream");

fn http(insecure: &[&str]) -> HttpConfig {
    HttpConfig {
        insecure: insecure.iter().map(|s| s.to_string()).collect(),
        auth_file: None,
        timeout: Duration::from_secs(5),
        backoff: Duration::from_millis(20),
        ..HttpConfig::default()
    }
}

/// Two layers: a busybox root with every kind of file, and an upper layer with a whiteout.
fn layer_dirs(dir: &Path) -> Vec<PathBuf> {
    let base = dir.join("base");
    support::busybox_rootfs(&base);
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    std::fs::create_dir_all(base.join("usr/lib")).unwrap();
    std::fs::write(base.join("usr/lib/big.bin"), &big).unwrap();
    std::fs::hard_link(
        base.join("usr/lib/big.bin"),
        base.join("usr/lib/big-link.bin"),
    )
    .unwrap();
    std::fs::write(base.join("usr/lib/empty"), b"").unwrap();
    std::fs::write(base.join("usr/lib/suid"), b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(
        base.join("usr/lib/suid"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    std::fs::set_permissions(base.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    std::os::unix::fs::symlink("/usr/lib/big.bin", base.join("usr/big")).unwrap();
    let long = "l".repeat(150);
    std::fs::write(base.join("usr/lib").join(&long), b"long name").unwrap();
    let status = Command::new("mknod")
        .arg(base.join("dev/null"))
        .args(["c", "1", "3"])
        .status()
        .unwrap();
    assert!(status.success());
    let status = Command::new("mkfifo")
        .arg(base.join("tmp/fifo"))
        .status()
        .unwrap();
    assert!(status.success());
    let status = Command::new("chown")
        .args(["-h", "1000:1000"])
        .arg(base.join("usr/lib/empty"))
        .status()
        .unwrap();
    assert!(status.success());
    let upper = dir.join("upper");
    std::fs::create_dir_all(upper.join("etc")).unwrap();
    std::fs::write(upper.join("etc/.wh.hostname"), b"").unwrap();
    std::fs::write(upper.join("etc/motd"), b"streamed\n").unwrap();
    vec![base, upper]
}

/// Compares a layer read through eStargz with a GNU tar extraction of the original layer.
async fn assert_layer_matches(
    source: &dyn BlobSource,
    layer: &RemoteLayer,
    original_gz: &Path,
    scratch: &Path,
) {
    let dir = scratch.join(format!("extract-{}", layer.desc.digest.hex()));
    std::fs::create_dir_all(&dir).unwrap();
    let status = Command::new("tar")
        .args(["-xzf"])
        .arg(original_gz)
        .args(["--numeric-owner", "-p", "-C"])
        .arg(&dir)
        .status()
        .unwrap();
    assert!(status.success());
    let mut checked = 0;
    let mut on_disk = Vec::new();
    walk(&dir, &dir, &mut on_disk);
    for rel in &on_disk {
        let path = dir.join(rel);
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let node = layer
            .index
            .get(rel)
            .unwrap_or_else(|| panic!("{rel} missing from the eStargz layer"));
        let data_node = layer.index.data_node(node);
        let what = format!("{rel}: {node:?}");
        assert_eq!(data_node.mode, meta.mode() & 0o7777, "mode of {what}");
        assert_eq!(
            (data_node.uid, data_node.gid),
            (meta.uid(), meta.gid()),
            "owner of {what}"
        );
        assert_eq!(data_node.mtime.0, meta.mtime(), "mtime of {what}");
        let ft = meta.file_type();
        use std::os::unix::fs::FileTypeExt;
        match &node.kind {
            NodeKind::Directory => assert!(ft.is_dir(), "{what}"),
            NodeKind::Regular | NodeKind::HardLink { .. } => {
                assert!(ft.is_file(), "{what}");
                let expected = std::fs::read(&path).unwrap();
                let got = layer.read_file(source, rel).await.unwrap();
                assert_eq!(got.len(), expected.len(), "size of {rel}");
                assert!(got == expected, "content of {rel}");
                if let NodeKind::HardLink { target } = node.kind {
                    let target_meta =
                        std::fs::metadata(dir.join(&layer.index.nodes[target].path)).unwrap();
                    assert_eq!(
                        target_meta.ino(),
                        meta.ino(),
                        "{rel} is a hard link on disk too"
                    );
                }
            }
            NodeKind::Symlink { target } => {
                assert!(ft.is_symlink(), "{what}");
                assert_eq!(std::fs::read_link(&path).unwrap().to_str().unwrap(), target);
            }
            NodeKind::CharDevice { major, minor } => {
                assert!(ft.is_char_device(), "{what}");
                assert_eq!(meta.rdev(), libc::makedev(*major, *minor), "{what}");
            }
            NodeKind::BlockDevice { .. } => assert!(ft.is_block_device(), "{what}"),
            NodeKind::Fifo => assert!(ft.is_fifo(), "{what}"),
        }
        checked += 1;
    }
    // Nothing extra in the layer but the root and the landmark.
    let extra: Vec<&str> = layer
        .index
        .nodes
        .iter()
        .map(|n| n.path.as_str())
        .filter(|p| {
            !p.is_empty()
                && *p != NO_PREFETCH_LANDMARK
                && *p != PREFETCH_LANDMARK
                && !on_disk.iter().any(|d| d == p)
        })
        .collect();
    assert!(extra.is_empty(), "entries not in the original: {extra:?}");
    assert_eq!(checked, on_disk.len());
    assert!(checked > 0);
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        out.push(
            path.strip_prefix(root)
                .unwrap()
                .to_str()
                .unwrap()
                .to_string(),
        );
        if entry.file_type().unwrap().is_dir() {
            walk(root, &path, out);
        }
    }
}

async fn manifest_of(client: &RegistryClient, reference: &str) -> manifest::Manifest {
    let fetched = client.manifest(reference).await.unwrap();
    match manifest::parse(&fetched.bytes, &fetched.media_type).unwrap() {
        Document::Manifest(m) => *m,
        Document::Index(_) => panic!("expected a manifest"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn convert_pushes_estargz_that_reads_back_file_for_file() {
    support::require_root();
    let scratch = support::scratch("convert");
    let registry = Registry::start("convert", None);
    let reg = registry.host();
    let layout = scratch.join("layout");
    let originals = support::build_image(
        &layout,
        "v1",
        &layer_dirs(&scratch),
        &["/bin/sh", "-c", "echo hello"],
    )
    .await;
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
        "1M",
        "--prioritize",
        "/bin/busybox",
        "--json",
        "--scratch",
        scratch.to_str().unwrap(),
    ]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["layers"].as_array().unwrap().len(), 2);

    let client = RegistryClient::new(&reg, "esgz/app", http(&[&reg])).unwrap();
    let converted = manifest_of(&client, "v1").await;
    assert_eq!(converted.layers.len(), 2);
    for (desc, original) in converted.layers.iter().zip(&originals) {
        assert_eq!(desc.media_type, manifest::OCI_LAYER_GZIP);
        assert!(desc.annotations.contains_key(TOC_DIGEST_ANNOTATION));
        let opened = layer::open(&client, desc).await.unwrap();
        assert_layer_matches(&client, &opened, original, &scratch).await;
    }
    // The prioritised file comes first, then the landmark.
    let base = layer::open(&client, &converted.layers[0]).await.unwrap();
    let busybox = base.index.get("bin/busybox").unwrap();
    assert!(
        base.index
            .prefetch_end
            .is_some_and(|end| busybox.chunks[0].blob_offset < end)
    );
    // The config's diff_ids are the digests of the new layers' decompressed content.
    let config: serde_json::Value =
        serde_json::from_slice(&client.blob(&converted.config).await.unwrap()).unwrap();
    for (i, desc) in converted.layers.iter().enumerate() {
        let path = scratch.join(format!("check-{i}.gz"));
        client.blob_to_file(desc, &path).await.unwrap();
        let mut hasher = imgstream::oci::digest::Hasher::new();
        std::io::copy(
            &mut flate2::read::MultiGzDecoder::new(std::fs::File::open(&path).unwrap()),
            &mut hasher,
        )
        .unwrap();
        assert_eq!(config["rootfs"]["diff_ids"][i], hasher.finish().to_string());
    }
    // Converting again from the converted image copies the layers as they are.
    let out = support::imgstream(&[
        "convert",
        &format!("{reg}/esgz/app:v1"),
        &format!("oci:{}:again", scratch.join("again").display()),
        "--insecure-registry",
        &reg,
        "--json",
        "--scratch",
        scratch.to_str().unwrap(),
    ]);
    let again: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        again["layers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["reused"] == true)
    );
    std::fs::remove_dir_all(&scratch).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_with_docker_config_credentials() {
    let scratch = support::scratch("auth");
    let registry = Registry::start("auth", Some(("tester", "s3cret")));
    let reg = registry.host();
    let layout = scratch.join("layout");
    let dirs = vec![{
        let d = scratch.join("root");
        support::busybox_rootfs(&d);
        d
    }];
    support::build_image(&layout, "v1", &dirs, &["/bin/true"]).await;
    let out = Command::new("skopeo")
        .args([
            "copy",
            "--dest-tls-verify=false",
            "--dest-creds",
            "tester:s3cret",
            "--quiet",
        ])
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("docker://{reg}/private/app:v1"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Without credentials: a clear error, no retry storm.
    let out = Command::new(IMGSTREAM)
        .args([
            "convert",
            &format!("{reg}/private/app:v1"),
            &format!("{reg}/private/esgz:v1"),
        ])
        .args([
            "--insecure-registry",
            &reg,
            "--auth-file",
            scratch.join("none.json").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("credentials"), "{stderr}");

    // With a docker config.json.
    let auth = base64_encode("tester:s3cret");
    std::fs::write(
        scratch.join("config.json"),
        format!(r#"{{"auths":{{"{reg}":{{"auth":"{auth}"}}}}}}"#),
    )
    .unwrap();
    support::imgstream(&[
        "convert",
        &format!("{reg}/private/app:v1"),
        &format!("{reg}/private/esgz:v1"),
        "--insecure-registry",
        &reg,
        "--auth-file",
        scratch.join("config.json").to_str().unwrap(),
        "--scratch",
        scratch.to_str().unwrap(),
    ]);
    std::fs::remove_dir_all(&scratch).unwrap();
}

fn base64_encode(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// A registry holding one small image, for the failure tests.
async fn small_image(name: &str) -> (Registry, PathBuf, Descriptor, Digest) {
    let scratch = support::scratch(name);
    let registry = Registry::start(name, None);
    let layout = scratch.join("layout");
    let dir = scratch.join("root");
    support::busybox_rootfs(&dir);
    support::build_image(&layout, "v1", &[dir], &["/bin/true"]).await;
    support::skopeo_copy(
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{}/f/app:v1", registry.host()),
    );
    let client = RegistryClient::new(&registry.host(), "f/app", http(&[&registry.host()])).unwrap();
    let fetched = client.manifest("v1").await.unwrap();
    let m = manifest_of(&client, "v1").await;
    (registry, scratch, m.layers[0].clone(), fetched.digest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_blobs_and_corrupt_content_are_typed_errors() {
    let (registry, scratch, layer, _) = small_image("corrupt").await;
    let client = RegistryClient::new(&registry.host(), "f/app", http(&[&registry.host()])).unwrap();
    let missing = Descriptor {
        digest: Digest::of(b"no such blob"),
        ..layer.clone()
    };
    assert!(matches!(
        client.blob(&missing).await,
        Err(RegistryError::NotFound { .. })
    ));
    assert!(matches!(
        client.read_range(&missing.digest, 0..10).await,
        Err(RegistryError::NotFound { .. })
    ));
    assert!(matches!(
        client.manifest("nope").await,
        Err(RegistryError::NotFound { .. })
    ));
    // A wrong size in the descriptor.
    let wrong_size = Descriptor {
        size: layer.size + 1,
        ..layer.clone()
    };
    assert!(matches!(
        client.blob(&wrong_size).await,
        Err(RegistryError::SizeMismatch { .. })
    ));
    // Corrupt the blob in the registry's own storage: served under its digest, caught here.
    let hex = layer.digest.hex();
    let data = registry.blob_data_path(&hex);
    let mut bytes = std::fs::read(&data).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&data, bytes).unwrap();
    let err = client.blob(&layer).await.unwrap_err();
    assert!(matches!(err, RegistryError::DigestMismatch { .. }), "{err}");
    let err = client
        .blob_to_file(&layer, &scratch.join("x"))
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::DigestMismatch { .. }), "{err}");
    drop(registry);
    std::fs::remove_dir_all(&scratch).unwrap();
}

/// `imgstream convert` of `f/app:v1` in registry `reg` to `esgz/app:v1`, with defaults.
fn convert_to_esgz(reg: &str) {
    support::imgstream(&[
        "convert",
        &format!("{reg}/f/app:v1"),
        &format!("{reg}/esgz/app:v1"),
        "--insecure-registry",
        reg,
    ]);
}

/// A chunk cache in `scratch`, for openings to keep TOCs and manifests in.
fn cache_in(scratch: &Path) -> std::sync::Arc<imgstream::cache::ChunkCache> {
    std::sync::Arc::new(
        imgstream::cache::ChunkCache::open(&imgstream::cache::CacheConfig {
            dir: scratch.join("cache"),
            limit_bytes: None,
            prefer_uring: false,
        })
        .expect("a cache in the test's scratch directory"),
    )
}

/// A source that notes, in order, when each read of a layer's opening is asked and answered.
/// Its manifest answers only once the blob's last bytes were asked for (or after 10 s): an
/// opening that asks for them beside the manifest has them asked first whatever the
/// scheduling; one that waits for the manifest does not.
struct Noting {
    inner: RegistryClient,
    notes: std::sync::Mutex<Vec<String>>,
    tail_asked: std::sync::atomic::AtomicBool,
}

impl Noting {
    fn note(&self, what: String) {
        self.notes.lock().unwrap().push(what);
    }
}

#[async_trait::async_trait]
impl BlobSource for Noting {
    async fn manifest(
        &self,
        reference: &str,
    ) -> Result<imgstream::registry::FetchedManifest, RegistryError> {
        self.note(format!("manifest {reference} asked"));
        let asked = Instant::now();
        while !self.tail_asked.load(std::sync::atomic::Ordering::SeqCst)
            && asked.elapsed() < Duration::from_secs(10)
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let fetched = self.inner.manifest(reference).await;
        self.note(format!("manifest {reference} answered"));
        fetched
    }

    async fn blob(&self, desc: &Descriptor) -> Result<bytes::Bytes, RegistryError> {
        self.note(format!("blob {}", desc.digest));
        self.inner.blob(desc).await
    }

    async fn blob_to_file(&self, desc: &Descriptor, path: &Path) -> Result<(), RegistryError> {
        self.note(format!("blob {}", desc.digest));
        self.inner.blob_to_file(desc, path).await
    }

    async fn read_range(
        &self,
        digest: &Digest,
        range: std::ops::Range<u64>,
    ) -> Result<bytes::Bytes, RegistryError> {
        self.note(format!("range {range:?}"));
        self.inner.read_range(digest, range).await
    }

    async fn read_tail(
        &self,
        digest: &Digest,
        len: u64,
    ) -> Result<Option<(bytes::Bytes, u64)>, RegistryError> {
        self.note(format!("last {len} bytes asked"));
        self.tail_asked
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.inner.read_tail(digest, len).await
    }

    fn name(&self) -> String {
        self.inner.name()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_estargz_layers_footer_is_asked_for_beside_its_manifest() {
    let (registry, scratch, _, _) = small_image("tail").await;
    let reg = registry.host();
    convert_to_esgz(&reg);
    let client = RegistryClient::new(&reg, "esgz/app", http(&[&reg])).unwrap();
    let converted = manifest_of(&client, "v1").await;
    let layer = converted.layers[0].clone();
    // A suffix range: the blob's last bytes and its size, which the caller did not know.
    let (tail, size) = client.read_tail(&layer.digest, 51).await.unwrap().unwrap();
    assert_eq!(size, layer.size);
    let footer = client
        .read_range(&layer.digest, size - 51..size)
        .await
        .unwrap();
    assert_eq!(tail, footer);
    // Asked for more than there is: all of it.
    let config = &converted.config;
    let (whole, size) = client
        .read_tail(&config.digest, config.size + 100)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((Digest::of(&whole), size), (config.digest, config.size));

    // The snapshotter's opening of the layer: the layer's end is asked for before the
    // manifest is in, and the one range request left, if any, is the TOC's (how much of
    // the end is asked for, by the round trip: `fetch::tests`).
    let noting = std::sync::Arc::new(Noting {
        inner: client,
        notes: std::sync::Mutex::new(Vec::new()),
        tail_asked: false.into(),
    });
    let cache = cache_in(&scratch);
    let opened = imgstream::mount::open_one_layer(
        noting.clone(),
        "v1",
        &manifest::Platform::host(),
        &cache,
        (&layer.digest, false, true),
        &imgstream::mount::LayerOpenings::default(),
    )
    .await
    .unwrap()
    .expect("an eStargz layer");
    assert_eq!(opened.layers[0].desc.digest, layer.digest);
    let notes = noting.notes.lock().unwrap().clone();
    let tail = notes
        .iter()
        .position(|n| n.starts_with("last ") && n.ends_with(" bytes asked"));
    let answered = notes.iter().position(|n| n == "manifest v1 answered");
    assert!(tail.is_some() && tail < answered, "{notes:?}");
    let ranges: Vec<&String> = notes.iter().filter(|n| n.starts_with("range")).collect();
    assert!(ranges.len() <= 1, "the TOC's range at most: {notes:?}");
    drop(registry);
    std::fs::remove_dir_all(&scratch).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_one_layer_fetches_the_other_layers_tocs_ahead() {
    // Three layers, as containerd prepares them: bottom first, each once the one below is
    // ready, the manifest named by digest (CRI's label).
    let scratch = support::scratch("tocs-ahead");
    let registry = Registry::start("tocs-ahead", None);
    let reg = registry.host();
    let mut dirs = vec![scratch.join("root")];
    support::busybox_rootfs(&dirs[0]);
    for i in 1..3u64 {
        let dir = scratch.join(format!("layer{i}"));
        std::fs::create_dir_all(dir.join("data")).expect("a layer directory");
        std::fs::write(
            dir.join(format!("data/file{i}")),
            support::noise(i, 300 << 10),
        )
        .expect("a layer's file");
        dirs.push(dir);
    }
    let layout = scratch.join("layout");
    support::build_image(&layout, "v1", &dirs, &["/bin/true"]).await;
    support::skopeo_copy(
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{reg}/f/app:v1"),
    );
    convert_to_esgz(&reg);
    let client = || RegistryClient::new(&reg, "esgz/app", http(&[&reg])).expect("a client");
    let noting = |inner| {
        std::sync::Arc::new(Noting {
            inner,
            notes: std::sync::Mutex::new(Vec::new()),
            // Nothing waits for a tail request: the manifest is answered at once.
            tail_asked: true.into(),
        })
    };
    let reference = client()
        .manifest("v1")
        .await
        .expect("the converted manifest")
        .digest
        .to_string();
    let layers = manifest_of(&client(), "v1").await.layers;
    assert_eq!(layers.len(), 3);
    let cache = cache_in(&scratch);
    let openings = imgstream::mount::LayerOpenings::default();
    let open = |source, layer: Digest| {
        let (cache, openings, reference) = (cache.clone(), openings.clone(), reference.clone());
        async move {
            imgstream::mount::open_one_layer(
                source,
                &reference,
                &manifest::Platform::host(),
                &cache,
                (&layer, true, false),
                &openings,
            )
            .await
            .expect("the layer opens")
            .expect("an eStargz layer")
        }
    };
    let first = noting(client());
    open(first.clone(), layers[0].digest).await;
    // The next layers come at once, while their TOCs may still be on their way: they wait
    // for those fetches and ask the registry nothing themselves.
    let later = noting(client());
    for desc in &layers[1..] {
        let opened = open(later.clone(), desc.digest).await;
        assert_eq!(opened.layers[0].desc.digest, desc.digest);
        assert!(opened.layers[0].index.nodes.len() > 1);
    }
    let asked_later = later.notes.lock().expect("notes").clone();
    assert!(asked_later.is_empty(), "{asked_later:?}");
    // The first opening asked for its own footer (beside the manifest) and TOC, and for the
    // other two layers' ends: footer and TOC, in one request each where the round trip
    // measured is worth their few kilobytes, else two.
    let asked_first = first.notes.lock().expect("notes").clone();
    let ranges = asked_first
        .iter()
        .filter(|n| n.starts_with("range"))
        .count();
    assert!((3..=5).contains(&ranges), "{asked_first:?}");
    // And, once, what the image runs: its configuration, with no second manifest request,
    // kept for the top layer's mount to take.
    let config = manifest_of(&client(), &reference).await.config;
    let image: Digest = reference.parse().expect("the manifest's digest");
    let count = |what: &str| asked_first.iter().filter(|n| *n == what).count();
    assert_eq!(
        count(&format!("manifest {reference} asked")),
        1,
        "{asked_first:?}"
    );
    // The layers were not said to be eStargz (no TOC label): the image's listing, where a
    // span index would be, was asked for beside the manifest, once (the tag fallback: this
    // source has no referrers API).
    assert_eq!(
        count(&format!("manifest sha256-{} asked", image.hex())),
        1,
        "{asked_first:?}"
    );
    assert_eq!(
        count(&format!("blob {}", config.digest)),
        1,
        "{asked_first:?}"
    );
    let run = openings
        .take_run(&image)
        .await
        .expect("what the image runs");
    assert_eq!(run.argv, ["/bin/true"]);
    assert!(openings.take_run(&image).await.is_none(), "taken once");
    drop(registry);
    std::fs::remove_dir_all(&scratch).expect("scratch removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_made_from_one_configuration_share_their_connections() {
    let (registry, scratch, layer, _) = small_image("shared-connections").await;
    let proxy = Proxy::start(registry.addr, Fault::None);
    let connections = || proxy.connections.load(std::sync::atomic::Ordering::SeqCst);
    // The snapshotter makes a client per layer from the agent's configuration: the second
    // layer, and the third, go on the connection the first one opened. (A client of its own
    // pool opens one each: three.)
    let config = http(&[&proxy.host()]);
    for _ in 0..3 {
        let client = RegistryClient::new(&proxy.host(), "f/app", config.clone()).unwrap();
        let bytes = client.read_range(&layer.digest, 0..100).await.unwrap();
        assert_eq!(bytes.len(), 100);
        // hyper hands a connection back to its pool from a task of its own once the answer
        // is read; a request that comes before that task ran opens another connection
        // (CI saw two once), so the next client comes a little later, and the count
        // below allows for one such race.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let shared = connections();
    assert!(shared < 3, "{shared} connections for the three clients");
    // Another configuration opens its own.
    let other = RegistryClient::new(&proxy.host(), "f/app", http(&[&proxy.host()])).unwrap();
    other.read_range(&layer.digest, 0..100).await.unwrap();
    assert_eq!(connections(), shared + 1);
    drop(registry);
    std::fs::remove_dir_all(&scratch).unwrap();
}

/// Four range requests of `blob` side by side, each answered in full.
async fn burst_of_four(client: &RegistryClient, blob: &Digest) {
    let (a, b, c, d) = tokio::join!(
        client.read_range(blob, 0..10),
        client.read_range(blob, 10..20),
        client.read_range(blob, 20..30),
        client.read_range(blob, 30..40),
    );
    for read in [a, b, c, d] {
        assert_eq!(read.unwrap().len(), 10);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preconnected_connections_carry_the_burst_that_follows() {
    let (registry, scratch, layer, _) = small_image("preconnect").await;
    let proxy = Proxy::start(registry.addr, Fault::None);
    let connections = || proxy.connections.load(std::sync::atomic::Ordering::SeqCst);
    let client = RegistryClient::new(&proxy.host(), "f/app", http(&[&proxy.host()])).unwrap();
    client.preconnect(4).await;
    assert_eq!(
        connections(),
        4,
        "four version checks side by side, four connections"
    );
    // hyper hands a connection back to its pool from a task of its own (see above).
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A burst of four range requests goes on them: no connection more (one allowed for the
    // hand-back race), where without them it opens four.
    burst_of_four(&client, &layer.digest).await;
    let after = connections();
    assert!(after <= 5, "{after} connections after the burst");
    // A client of another configuration, not preconnected, opens one per request of the
    // same burst.
    let cold = RegistryClient::new(&proxy.host(), "f/app", http(&[&proxy.host()])).unwrap();
    burst_of_four(&cold, &layer.digest).await;
    assert_eq!(connections(), after + 4);
    drop(registry);
    std::fs::remove_dir_all(&scratch).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_and_truncation_are_retried_and_bounded() {
    let (registry, scratch, layer, _) = small_image("faults").await;
    // Two connection resets, then service: the retries absorb them.
    let proxy = Proxy::start(registry.addr, Fault::ResetFirst(2));
    let client = RegistryClient::new(&proxy.host(), "f/app", http(&[&proxy.host()])).unwrap();
    client.manifest("v1").await.unwrap();
    assert!(proxy.connections.load(std::sync::atomic::Ordering::SeqCst) >= 3);

    // A registry that always resets: an error after the bounded retries, quickly.
    let proxy = Proxy::start(registry.addr, Fault::ResetAll);
    let client = RegistryClient::new(&proxy.host(), "f/app", http(&[&proxy.host()])).unwrap();
    let started = Instant::now();
    let err = client.manifest("v1").await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(
        proxy.connections.load(std::sync::atomic::Ordering::SeqCst),
        4,
        "1 try + 3 retries"
    );

    // The first response cut short: the blob is fetched again and verified.
    let proxy = Proxy::start(
        registry.addr,
        Fault::TruncateFirst {
            bytes: 600,
            connections: 1,
        },
    );
    let client = RegistryClient::new(&proxy.host(), "f/app", http(&[&proxy.host()])).unwrap();
    let blob = client.blob(&layer).await.unwrap();
    assert_eq!(Digest::of(&blob), layer.digest);
    let range = client.read_range(&layer.digest, 10..5000).await.unwrap();
    assert_eq!(range.len(), 4990);

    // Every response cut short: a size error, not a hang and not corrupt data.
    let proxy = Proxy::start(
        registry.addr,
        Fault::TruncateFirst {
            bytes: 600,
            connections: usize::MAX,
        },
    );
    let client = RegistryClient::new(&proxy.host(), "f/app", http(&[&proxy.host()])).unwrap();
    let err = client
        .read_range(&layer.digest, 10..5000)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            RegistryError::SizeMismatch { .. } | RegistryError::Connect { .. }
        ),
        "{err}"
    );
    // A registry that accepts and never answers: a timeout per attempt, not a hang.
    let proxy = Proxy::start(registry.addr, Fault::Stall);
    let config = HttpConfig {
        timeout: Duration::from_millis(500),
        retries: 1,
        ..http(&[&proxy.host()])
    };
    let client = RegistryClient::new(&proxy.host(), "f/app", config).unwrap();
    let started = Instant::now();
    let err = client.read_range(&layer.digest, 0..100).await.unwrap_err();
    assert!(matches!(err, RegistryError::Timeout { .. }), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    drop(registry);
    std::fs::remove_dir_all(&scratch).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_are_tried_first_and_a_dead_one_falls_back() {
    let (registry, scratch, layer, manifest_digest) = small_image("mirrors").await;
    let origin = Proxy::start(registry.addr, Fault::None);
    let mirror = Proxy::start(registry.addr, Fault::None);
    let dead = format!("http://127.0.0.1:{}", support::free_port());
    let mut config = http(&[&origin.host()]);
    config.mirrors = BTreeMap::from([(
        origin.host(),
        vec![dead.clone(), format!("http://{}", mirror.host())],
    )]);
    let client = RegistryClient::new(&origin.host(), "f/app", config).unwrap();
    let fetched = client.manifest("v1").await.unwrap();
    assert_eq!(fetched.digest, manifest_digest);
    client.blob(&layer).await.unwrap();
    assert!(mirror.bytes() > layer.size, "served by the live mirror");
    assert_eq!(origin.bytes(), 0, "the origin was not needed");

    // Only a dead mirror: the origin serves.
    let mut config = http(&[&origin.host()]);
    config.mirrors = BTreeMap::from([(origin.host(), vec![dead])]);
    let client = RegistryClient::new(&origin.host(), "f/app", config).unwrap();
    client.blob(&layer).await.unwrap();
    assert!(origin.bytes() > layer.size);
    drop(registry);
    std::fs::remove_dir_all(&scratch).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_from_the_challenge_realm_and_refresh_on_401() {
    let scratch = support::scratch("token");
    let tokens = support::TokenServer::start(&scratch, ("tester", "s3cret"), 3);
    let registry = Registry::start_with_auth("token", tokens.registry_auth());
    let reg = registry.host();
    let creds = imgstream::registry::http::Credentials {
        username: "tester".into(),
        password: "s3cret".into(),
    };

    // Push with our own client: 401 -> token from the realm -> upload.
    let client = std::sync::Arc::new(
        RegistryClient::new(&reg, "tok/app", http(&[&reg]))
            .unwrap()
            .with_credentials(creds),
    );
    let layout = scratch.join("layout");
    let dir = scratch.join("root");
    support::busybox_rootfs(&dir);
    support::build_image(&layout, "v1", &[dir], &["/bin/true"]).await;
    let source = imgstream::registry::local::LocalLayout::open(&layout).unwrap();
    let options = imgstream::convert::ConvertOptions {
        format: Default::default(),
        writer: Default::default(),
        prioritized: vec![],
        reads: Vec::new(),
        platform: imgstream::oci::manifest::Platform::host(),
        scratch: scratch.join("convert"),
        progress: None,
        mount_from: None,
    };
    let report = imgstream::convert::convert(
        std::sync::Arc::new(source),
        Some("v1"),
        client.clone(),
        Some("v1"),
        &options,
    )
    .await
    .unwrap();
    assert_eq!(
        tokens.issued.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one token, reused for the whole push"
    );

    // The cached token expires: the next request gets a 401, fetches a fresh token, succeeds.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let fetched = client.manifest("v1").await.unwrap();
    assert_eq!(
        tokens.issued.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "refreshed once"
    );
    assert_eq!(fetched.digest, report.manifest_digest);
    let m = manifest_of(&client, "v1").await;
    let opened = layer::open(client.as_ref(), &m.layers[0]).await.unwrap();
    assert_eq!(
        opened
            .read_file(client.as_ref(), "etc/hostname")
            .await
            .unwrap(),
        b"imgstream\n"
    );

    // Wrong password: the token server refuses, a clear error.
    let bad = imgstream::registry::http::Credentials {
        username: "tester".into(),
        password: "nope".into(),
    };
    let client = RegistryClient::new(&reg, "tok/app", http(&[&reg]))
        .unwrap()
        .with_credentials(bad);
    assert!(matches!(
        client.manifest("v1").await,
        Err(RegistryError::Unauthorized { .. })
    ));
    drop(registry);
    std::fs::remove_dir_all(&scratch).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_custom_ca_and_a_clear_error_without_it() {
    let scratch = support::scratch("tls");
    let (ca, cert, key) = support::test_pki(&scratch);
    let registry = Registry::start_tls("tls", &cert, &key);
    let reg = registry.host();
    let layout = scratch.join("layout");
    let dir = scratch.join("root");
    support::busybox_rootfs(&dir);
    support::build_image(&layout, "v1", &[dir], &["/bin/true"]).await;
    let source =
        std::sync::Arc::new(imgstream::registry::local::LocalLayout::open(&layout).unwrap());
    let options = imgstream::convert::ConvertOptions {
        format: Default::default(),
        writer: Default::default(),
        prioritized: vec![],
        reads: Vec::new(),
        platform: imgstream::oci::manifest::Platform::host(),
        scratch: scratch.join("convert"),
        progress: None,
        mount_from: None,
    };
    // Not trusted: a TLS error, reported as such.
    let untrusted = std::sync::Arc::new(
        RegistryClient::new(
            &reg,
            "tls/app",
            HttpConfig {
                retries: 0,
                ..http(&[])
            },
        )
        .unwrap(),
    );
    let err =
        imgstream::convert::convert(source.clone(), Some("v1"), untrusted, Some("v1"), &options)
            .await
            .unwrap_err();
    let chain = format!("{:?}", anyhow::Error::from(err));
    assert!(
        chain.contains("certificate") || chain.contains("UnknownIssuer"),
        "{chain}"
    );
    // Trusted through --ca-file: HTTPS end to end.
    let config = HttpConfig {
        ca_files: vec![ca],
        ..http(&[])
    };
    let client = std::sync::Arc::new(RegistryClient::new(&reg, "tls/app", config).unwrap());
    imgstream::convert::convert(source, Some("v1"), client.clone(), Some("v1"), &options)
        .await
        .unwrap();
    let m = manifest_of(&client, "v1").await;
    let opened = layer::open(client.as_ref(), &m.layers[0]).await.unwrap();
    assert_eq!(
        opened
            .read_file(client.as_ref(), "etc/hostname")
            .await
            .unwrap(),
        b"imgstream\n"
    );
    drop(registry);
    std::fs::remove_dir_all(&scratch).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_never_gets_the_origins_credentials() {
    let registry = Registry::start("creds-mirror", Some(("tester", "s3cret")));
    let origin = registry.host();
    // A mirror that asks for credentials, and then for a token from a realm of its own.
    let basic = Recorder::start(
        "401 Unauthorized",
        &["WWW-Authenticate: Basic realm=\"mirror\"".into()],
        "",
    );
    let realm = Recorder::start("200 OK", &[], r#"{"token":"mirror-token"}"#);
    let bearer = Recorder::start(
        "401 Unauthorized",
        &[format!(
            "WWW-Authenticate: Bearer realm=\"http://{}/token\",service=\"mirror\"",
            realm.host()
        )],
        "",
    );
    for mirror in [&basic, &bearer] {
        let mut config = http(&[&origin, &mirror.host()]);
        config.mirrors =
            BTreeMap::from([(origin.clone(), vec![format!("http://{}", mirror.host())])]);
        let client = RegistryClient::new(&origin, "private/app", config)
            .unwrap()
            .with_credentials(imgstream::registry::http::Credentials {
                username: "tester".into(),
                password: "s3cret".into(),
            });
        // The mirror fails; the origin takes the credentials and answers (no such tag).
        let err = client.manifest("v1").await.unwrap_err();
        let RegistryError::AllEndpointsFailed { source, .. } = &err else {
            panic!("{err:?}");
        };
        assert!(
            matches!(**source, RegistryError::NotFound { .. }),
            "the origin answered with the credentials: {err:?}"
        );
        assert!(!mirror.heads().is_empty(), "the mirror was asked first");
        assert!(!mirror.saw_credentials(), "{:?}", mirror.heads());
    }
    assert_eq!(realm.heads().len(), 1, "the mirror's realm was asked once");
    assert!(!realm.saw_credentials(), "{:?}", realm.heads());
    let mirror_requests = bearer.heads();
    assert!(
        mirror_requests
            .iter()
            .any(|h| h.contains("Bearer mirror-token")),
        "the mirror's own token goes to the mirror: {mirror_requests:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_go_to_a_plain_http_realm_only_on_a_host_allowed_insecure() {
    let realm = Recorder::start("200 OK", &[], r#"{"token":"t"}"#);
    let port = realm.addr.port();
    // "localhost" and "127.0.0.1" are the same machine but not the same host name: only the
    // second is allowed plain HTTP below.
    for (realm_host, trusted) in [("localhost", false), ("127.0.0.1", true)] {
        let before = realm.heads().len();
        let registry = Recorder::start(
            "401 Unauthorized",
            &[format!(
                "WWW-Authenticate: Bearer realm=\"http://{realm_host}:{port}/token\",service=\"s\""
            )],
            "",
        );
        let client =
            RegistryClient::new(&registry.host(), "private/app", http(&[&registry.host()]))
                .unwrap()
                .with_credentials(imgstream::registry::http::Credentials {
                    username: "tester".into(),
                    password: "s3cret".into(),
                });
        let err = client.manifest("v1").await.unwrap_err();
        assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err:?}");
        let heads = realm.heads();
        assert_eq!(heads.len(), before + 1, "one token request");
        let sent = heads[before]
            .to_ascii_lowercase()
            .contains("\r\nauthorization: basic");
        assert_eq!(sent, trusted, "realm {realm_host}: {}", heads[before]);
    }
}

/// Object storage on loopback: busybox's httpd serving a registry's storage directory, with
/// ranges, its requests logged.
struct ObjectStore {
    child: std::process::Child,
    log: PathBuf,
}

impl ObjectStore {
    /// busybox httpd on `port`, once a request it answered is in its own log; `None` when
    /// the port turned out to be another process's (a port [`support::free_port`] found free
    /// can be taken before busybox binds it, by the tests running beside this one: a
    /// registry or proxy of theirs would then answer this test's ranges with 404s).
    fn start(root: &Path, port: u16, log: &Path) -> Option<Self> {
        let child = Command::new("busybox")
            .args([
                "httpd",
                "-f",
                "-vv",
                "-p",
                &format!("127.0.0.1:{port}"),
                "-h",
            ])
            .arg(root)
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .expect("busybox runs (cargo xtask setup installs busybox-static)");
        let mut store = Self {
            child,
            log: log.to_path_buf(),
        };
        let probe = format!("/imgstream-probe-{}-{port}", std::process::id());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if store.child.try_wait().unwrap().is_some() {
                return None; // could not bind: the port is taken
            }
            if let Ok(mut conn) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                use std::io::{Read, Write};
                conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let request = format!("GET {probe} HTTP/1.0\r\n\r\n");
                if conn.write_all(request.as_bytes()).is_ok() {
                    let _ = conn.read_to_end(&mut Vec::new());
                }
                let answered = std::fs::read_to_string(&store.log)
                    .unwrap_or_default()
                    .contains(&probe);
                return answered.then_some(store);
            }
            assert!(Instant::now() < deadline, "busybox httpd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Requests answered so far, its own probe left out.
    fn requests(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(" url:/") && !l.contains(" url:/imgstream-probe-"))
            .count()
    }
}

impl Drop for ObjectStore {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Registries backed by object storage (Docker Hub, ECR, GHCR, Artifact Registry) answer a
/// blob GET with a redirect to a signed URL there. The ranges of a blob go to the location
/// its first GET was redirected to, one round trip each instead of two: the registry sees
/// one GET of the blob, not one per range. A location that stops answering is forgotten and
/// the registry asked again; once storage is back, reads go there again after one GET.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blobs_ranges_go_where_the_registry_redirected_its_first_get() {
    let scratch = support::scratch("redirects");
    let log = scratch.join("store.log");
    // The registry redirects to the store's port, so both start again on a port that was
    // taken before the store could bind it.
    let (port, registry, store) = (0..5)
        .find_map(|_| {
            let port = support::free_port();
            let registry =
                Registry::start_redirecting("redirects", &format!("http://127.0.0.1:{port}"));
            // busybox serves an existing directory; the registry fills it on the first push.
            std::fs::create_dir_all(registry.storage_root()).unwrap();
            let store = ObjectStore::start(&registry.storage_root(), port, &log)?;
            Some((port, registry, store))
        })
        .expect("five free ports were all taken before busybox bound them");
    let reg = registry.host();
    let client = RegistryClient::new(&reg, "redir/app", http(&[&reg])).unwrap();
    let blob: Vec<u8> = (0..200_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let desc = Descriptor {
        media_type: manifest::OCI_LAYER_GZIP.into(),
        digest: Digest::of(&blob),
        size: blob.len() as u64,
        annotations: Default::default(),
        platform: None,
        extra: Default::default(),
    };
    imgstream::registry::BlobSink::put_blob(&client, &desc, blob.clone().into())
        .await
        .unwrap();
    let blob_gets = || {
        registry
            .access_log()
            .lines()
            .filter(|l| l.contains(&format!("\"GET /v2/redir/app/blobs/{}", desc.digest)))
            .count()
    };
    let read = |at: usize| {
        let client = &client;
        let digest = desc.digest;
        async move {
            client
                .read_range(&digest, at as u64..(at + 1000) as u64)
                .await
        }
    };

    for at in (0..8).map(|i| i * 20_000) {
        assert!(
            read(at).await.unwrap() == blob[at..at + 1000],
            "range at {at}"
        );
    }
    assert_eq!(blob_gets(), 1, "{}", registry.access_log());
    assert_eq!(store.requests(), 8);

    // Storage gone: the remembered location fails, the registry is asked again (and sends
    // the read there too), and the read fails.
    drop(store);
    assert!(read(0).await.is_err());
    let during = blob_gets();
    assert!(during >= 2, "{}", registry.access_log());

    let store = ObjectStore::start(&registry.storage_root(), port, &log)
        .expect("the store's port was taken while it was down");
    for at in (0..4).map(|i| i * 30_000) {
        assert!(
            read(at).await.unwrap() == blob[at..at + 1000],
            "range at {at}"
        );
    }
    assert_eq!(blob_gets(), during + 1, "{}", registry.access_log());
    drop(store);
    drop(registry);
    std::fs::remove_dir_all(&scratch).unwrap();
}
