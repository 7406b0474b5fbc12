//! Hostile eStargz layers, as an image author who wants to hurt the node would build them,
//! mounted for real (FUSE, in this process) from a local OCI layout: each is refused at
//! mount with an error naming what is wrong, or served with every read answered, data or
//! EIO, within the read deadline; never a panic, an abort or a reader stuck in the kernel,
//! and the memory budget's pools never past their limits.

mod support;

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    sync::{Arc, mpsc},
    time::Duration,
};

use bytes::Bytes;
use imgstream::{
    cache::ChunkCache,
    image::{
        estargz::{TOC_DIGEST_ANNOTATION, TOC_NAME, footer_bytes},
        tar::{Header, Kind, TarWriter},
    },
    mount,
    oci::{
        digest::Digest,
        manifest::{self, Descriptor, Manifest, Platform},
    },
    registry::{BlobSink, BlobSource, local::LocalLayout},
};
use serde_json::{Value, json};

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).expect("writing to memory");
    encoder.finish().expect("writing to memory")
}

/// A raw ustar header (for what the library's writer would never write).
fn ustar(name: &str, size: u64, typeflag: u8) -> Vec<u8> {
    let mut h = vec![0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = typeflag;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

/// One hostile layer: its files' chunks (one gzip member each), then a TOC member holding
/// `before_toc` and the TOC as `tamper` left it, then the footer. The blob and its TOC digest.
fn layer(
    files: &[(&str, Vec<u8>)],
    tamper: impl FnOnce(&mut Vec<Value>),
    before_toc: &[u8],
) -> (Vec<u8>, Digest) {
    // What a tar header's member would be: no data offset is 0.
    let mut blob = gzip(&[0u8; 512]);
    let mut entries = Vec::new();
    for (name, data) in files {
        let offset = blob.len();
        blob.extend(gzip(data));
        let digest = Digest::of(data).to_string();
        entries.push(json!({
            "name": name, "type": "reg", "size": data.len(), "mode": 420,
            "modtime": "2026-01-01T00:00:00Z", "offset": offset,
            "digest": digest, "chunkDigest": digest,
        }));
    }
    tamper(&mut entries);
    let toc = serde_json::to_vec(&json!({"version": 1, "entries": entries})).expect("JSON");
    let toc_digest = Digest::of(&toc);
    let mut tar = before_toc.to_vec();
    let mut header = Header::new(TOC_NAME, Kind::Regular);
    header.size = toc.len() as u64;
    header.mode = 0o644;
    tar.extend(TarWriter::header_bytes(&header));
    tar.extend(&toc);
    tar.resize(tar.len() + TarWriter::padding(toc.len() as u64), 0);
    tar.extend(TarWriter::end_of_archive());
    let toc_offset = blob.len() as u64;
    blob.extend(gzip(&tar));
    blob.extend(footer_bytes(toc_offset));
    (blob, toc_digest)
}

/// Writes an image of the one `blob` layer into `layout` under `tag`.
async fn image(layout: &LocalLayout, tag: &str, blob: Vec<u8>, toc_digest: &Digest) {
    let mut desc = Descriptor::of(manifest::OCI_LAYER_GZIP, &blob);
    desc.annotations
        .insert(TOC_DIGEST_ANNOTATION.into(), toc_digest.to_string());
    layout
        .put_blob(&desc, Bytes::from(blob))
        .await
        .expect("a layer blob");
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [Digest::of(tag.as_bytes()).to_string()]},
    }))
    .expect("JSON");
    let config_desc = Descriptor::of(manifest::OCI_CONFIG, &config);
    layout
        .put_blob(&config_desc, Bytes::from(config))
        .await
        .expect("a config blob");
    let m = Manifest {
        schema_version: 2,
        media_type: Some(manifest::OCI_MANIFEST.into()),
        config: config_desc,
        layers: vec![desc],
        annotations: Default::default(),
        extra: Default::default(),
    };
    layout
        .put_manifest(
            Some(tag),
            manifest::OCI_MANIFEST,
            Bytes::from(serde_json::to_vec(&m).expect("JSON")),
        )
        .await
        .expect("a manifest");
}

/// What happened to one hostile image.
#[derive(Debug)]
enum Outcome {
    /// Refused at mount, with this error chain.
    Refused(String),
    /// Served: per file, its bytes or the errno of its read.
    Served(Vec<(PathBuf, Result<Vec<u8>, i32>)>),
}

/// Every regular file under `dir`, read whole on a thread of its own: a read not answered
/// within `within` (a reader stuck in the kernel) fails the test.
fn read_all(dir: &Path, within: Duration) -> Vec<(PathBuf, Result<Vec<u8>, i32>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("a directory of the mount lists") {
            let path = entry.expect("an entry").path();
            let meta = std::fs::symlink_metadata(&path).expect("an entry stats");
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() {
                let (tx, rx) = mpsc::channel();
                let reading = path.clone();
                std::thread::spawn(move || {
                    let _ = tx
                        .send(std::fs::read(&reading).map_err(|e| e.raw_os_error().unwrap_or(-1)));
                });
                let result = rx
                    .recv_timeout(within)
                    .unwrap_or_else(|_| panic!("{} was not answered", path.display()));
                out.push((path, result));
            }
        }
    }
    out
}

#[test]
fn hostile_layers_are_refused_at_mount_or_served_with_every_read_answered() {
    support::require_root();
    let scratch = support::scratch("hostile-layers");
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let layout_dir = scratch.join("layout");
    let layout = LocalLayout::create(&layout_dir).expect("a layout");
    let ok = b"hello\n".to_vec();
    let cases: Vec<(&str, (Vec<u8>, Digest))> = vec![
        // A path of 5000 components (each implied parent once cost a stack frame).
        (
            "deep-path",
            layer(
                &[("a", ok.clone())],
                |e| e[0]["name"] = json!("d/".repeat(5000) + "f"),
                b"",
            ),
        ),
        // A time that is not ASCII (its parser once sliced inside a character).
        (
            "non-ascii-time",
            layer(
                &[("a", ok.clone())],
                |e| e[0]["modtime"] = json!("2026-01-01T00:00:0\u{e9}Z"),
                b"",
            ),
        ),
        // A chunk claimed past the 64 MiB cap.
        (
            "chunk-past-the-cap",
            layer(
                &[("a", ok.clone())],
                |e| e[0]["size"] = json!((64u64 << 20) + 1),
                b"",
            ),
        ),
        // PAX records piled up in front of the TOC, 1.2 MB together.
        ("pax-pile-up", {
            let mut piled = Vec::new();
            for _ in 0..3 {
                let body = format!(" comment={}\n", "x".repeat(400_000));
                // The length counts its own digits.
                let record = format!("{}{body}", body.len() + 6);
                piled.extend(ustar("PaxHeaders/x", record.len() as u64, b'x'));
                piled.extend(record.as_bytes());
                piled.resize(piled.len().next_multiple_of(512), 0);
            }
            layer(&[("a", ok.clone())], |_| {}, &piled)
        }),
        // A chunk claimed at exactly the cap, its member holding six bytes.
        (
            "chunk-at-the-cap-short",
            layer(
                &[("big", ok.clone()), ("a", ok.clone())],
                |e| e[0]["size"] = json!(64u64 << 20),
                b"",
            ),
        ),
        // One chunk digest given two sizes: the six-byte file's digest on a 60 kB file.
        (
            "one-digest-two-sizes",
            layer(
                &[("p", ok.clone()), ("q", vec![7u8; 60_000])],
                |e| e[1]["chunkDigest"] = e[0]["chunkDigest"].clone(),
                b"",
            ),
        ),
        // A chunk digest naming a TOC (another layer's, cached under the same digest).
        ("chunk-names-a-toc", {
            let (_, other_toc) = layer(&[("a", ok.clone())], |_| {}, b"");
            layer(
                &[("r", ok.clone())],
                |e| e[0]["chunkDigest"] = json!(other_toc.to_string()),
                b"",
            )
        }),
        // A blob cut short of the size its descriptor gives.
        (
            "truncated",
            layer(&[("a", ok.clone()), ("b", vec![1u8; 10_000])], |_| {}, b""),
        ),
    ];
    for (tag, (blob, toc)) in &cases {
        runtime.block_on(image(&layout, tag, blob.clone(), toc));
    }
    // Cut the truncated case's blob on disk after the manifest gave its full size.
    let (truncated, _) = &cases[cases.len() - 1].1;
    let path = layout_dir
        .join("blobs/sha256")
        .join(Digest::of(truncated).hex());
    std::fs::write(&path, &truncated[..truncated.len() / 2]).expect("the blob is cut");

    let options = support::local_mount_options(&scratch.join("cache"), Duration::from_secs(5));
    let cache = Arc::new(ChunkCache::open(&options.cache).expect("a cache"));
    let source: Arc<dyn BlobSource> = Arc::new(LocalLayout::open(&layout_dir).expect("layout"));
    let mut outcomes = Vec::new();
    for (tag, _) in &cases {
        let opened = runtime.block_on(mount::open_layers(
            source.clone(),
            tag,
            &Platform::host(),
            &cache,
        ));
        let outcome = match opened {
            Err(err) => Outcome::Refused(imgstream::error_chain(&err)),
            Ok(opened) => {
                let mountpoint = scratch.join(format!("mnt-{tag}"));
                std::fs::create_dir_all(&mountpoint).expect("a mount point");
                match mount::mount(
                    runtime.handle().clone(),
                    opened,
                    cache.clone(),
                    &mountpoint,
                    &options,
                ) {
                    Err(err) => Outcome::Refused(imgstream::error_chain(&err)),
                    Ok(mounted) => {
                        let reads = read_all(&mountpoint, Duration::from_secs(30));
                        // Dropped, the mount has written the backing files of what its
                        // reads cached: a second mount opens those files with them (FUSE
                        // passthrough), and must answer every read as the first did.
                        drop(mounted);
                        let again = runtime
                            .block_on(mount::open_layers(
                                source.clone(),
                                tag,
                                &Platform::host(),
                                &cache,
                            ))
                            .expect("it opened before");
                        let mounted = mount::mount(
                            runtime.handle().clone(),
                            again,
                            cache.clone(),
                            &mountpoint,
                            &options,
                        )
                        .expect("it mounted before");
                        let mut second = read_all(&mountpoint, Duration::from_secs(30));
                        drop(mounted);
                        let mut first = reads.clone();
                        first.sort();
                        second.sort();
                        assert!(
                            first == second,
                            "{tag}: a second mount answered otherwise: {second:?}"
                        );
                        Outcome::Served(reads)
                    }
                }
            }
        };
        println!("{tag}: {outcome:?}", outcome = summary(&outcome));
        outcomes.push((*tag, outcome));
    }

    let refused = |tag: &str, needle: &str| match &outcomes.iter().find(|(t, _)| *t == tag) {
        Some((_, Outcome::Refused(err))) => {
            assert!(
                err.contains(needle),
                "{tag}: refused, but not for {needle:?}: {err}"
            )
        }
        other => panic!(
            "{tag}: not refused: {other:?}",
            other = other.map(|(_, o)| summary(o))
        ),
    };
    let served = |tag: &str| match &outcomes.iter().find(|(t, _)| *t == tag) {
        Some((_, Outcome::Served(reads))) => reads
            .iter()
            .map(|(p, r)| {
                (
                    p.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    r.clone(),
                )
            })
            .collect::<Vec<_>>(),
        other => panic!(
            "{tag}: not served: {other:?}",
            other = other.map(|(_, o)| summary(o))
        ),
    };
    refused("deep-path", "deeper than 512");
    refused("non-ascii-time", "RFC 3339");
    refused("chunk-past-the-cap", "exceeds the 67108864-byte limit");
    refused("pax-pile-up", "exceeds the 1048576-byte limit");
    refused("truncated", "opening layer 0");
    // Served: the honest file's bytes, EIO for what its chunk does not hold.
    for (tag, expect) in [
        (
            "chunk-at-the-cap-short",
            [("big", Err(libc::EIO)), ("a", Ok(ok.clone()))],
        ),
        (
            "one-digest-two-sizes",
            [("p", Ok(ok.clone())), ("q", Err(libc::EIO))],
        ),
    ] {
        let mut reads = served(tag);
        reads.sort();
        let mut expect: Vec<(String, Result<Vec<u8>, i32>)> = expect
            .into_iter()
            .map(|(n, r)| (n.to_string(), r))
            .collect();
        expect.sort();
        assert!(
            reads == expect,
            "{tag}: {:?}",
            reads
                .iter()
                .map(|(n, r)| (n, r.as_ref().map(Vec::len)))
                .collect::<Vec<_>>()
        );
    }
    let reads = served("chunk-names-a-toc");
    assert!(
        reads == [("r".to_string(), Err(libc::EIO))],
        "chunk-names-a-toc: {reads:?}"
    );
    let memory = imgstream::cache::budget::global();
    for pool in [&memory.fetches, &memory.kept] {
        let peak = pool.stats.peak.load(std::sync::atomic::Ordering::SeqCst);
        assert!(peak <= pool.limit(), "{peak} of {}", pool.limit());
    }
    drop(runtime);
    support::umount_below(&scratch);
    let _ = std::fs::remove_dir_all(&scratch);
}

fn summary(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Refused(err) => format!("refused: {}", err.chars().take(300).collect::<String>()),
        Outcome::Served(reads) => format!(
            "served: {:?}",
            reads
                .iter()
                .map(|(p, r)| (p.display().to_string(), r.as_ref().map(Vec::len)))
                .collect::<Vec<_>>()
        ),
    }
}
