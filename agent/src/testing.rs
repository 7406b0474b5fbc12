//! Test doubles shared by the unit tests: eStargz layers built in memory, and a blob source
//! that serves them from memory with every range request counted, and optionally slow or
//! failing. The real parts (registries, layouts, the cache) are tested as themselves; these
//! stand in only where a test needs to control timing or failures.

use std::{
    collections::HashMap,
    ops::Range,
    path::Path,
    sync::{
        Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use bytes::Bytes;

use crate::{
    cache::{CacheConfig, ChunkCache},
    image::{
        estargz::{
            self, EstargzError, EstargzWriter, FOOTER_SIZE, LayerIndex, LayerSummary,
            TOC_DIGEST_ANNOTATION, WriterOptions,
        },
        tar::Header,
    },
    oci::{
        digest::Digest,
        manifest::{self, Descriptor},
    },
    registry::{BlobSource, FetchedManifest, RegistryError},
};

/// A fresh chunk cache (synchronous writes) in a scratch directory named after `name`:
/// the directory, and the cache.
pub(crate) fn scratch_cache(name: &str) -> (std::path::PathBuf, std::sync::Arc<ChunkCache>) {
    let dir = std::env::temp_dir().join(format!("imgstream-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cache = ChunkCache::open(&CacheConfig {
        dir: dir.join("cache"),
        limit_bytes: None,
        prefer_uring: false,
    })
    .expect("a cache in a scratch directory");
    (dir, std::sync::Arc::new(cache))
}

/// The bytes of `data/hello.bin` in [`hello_image_fs`]: 100,000 of them, in a pattern.
pub(crate) fn hello_content() -> Vec<u8> {
    (0..100_000u32).map(|i| (i * 7 % 253) as u8).collect()
}

/// An image filesystem over one real eStargz layer (16 KiB chunks) holding `data/hello.bin`,
/// its chunk cache in `dir`, its registry answering every range request after `delay`.
pub(crate) fn hello_image_fs(
    runtime: &tokio::runtime::Runtime,
    dir: &Path,
    delay: Duration,
) -> std::sync::Arc<crate::fs::ImageFs> {
    use crate::{
        fetch::{Fetcher, layer},
        fs::{FsConfig, ImageFs, View},
        image::tar::Kind,
    };
    std::fs::create_dir_all(dir).expect("a scratch directory");
    let mut file = Header::new("data/hello.bin", Kind::Regular);
    file.mode = 0o644;
    let (blob, summary) = estargz_layer(
        &[
            (Header::new("data/", Kind::Directory), Vec::new()),
            (file, hello_content()),
        ],
        16 * 1024,
        false,
    );
    let desc = layer_descriptor(&summary);
    let source = std::sync::Arc::new(MemoryBlobs::default().with(blob).delayed(delay));
    let opened = runtime
        .block_on(layer::open_cached(source.as_ref(), &desc, None))
        .expect("the layer opens");
    let cache = ChunkCache::open(&CacheConfig {
        dir: dir.join("cache"),
        limit_bytes: None,
        prefer_uring: false,
    })
    .expect("a cache in a scratch directory");
    let source: std::sync::Arc<dyn BlobSource> = source;
    let fetcher = Fetcher::new(runtime.handle().clone(), source, std::sync::Arc::new(cache));
    std::sync::Arc::new(ImageFs::new(
        std::sync::Arc::from(vec![opened]),
        View::Merged,
        std::sync::Arc::new(fetcher),
        FsConfig::default(),
    ))
}

/// An eStargz layer of `entries` (sizes taken from their data) in chunks of `chunk_size`,
/// after the no-prefetch landmark when `landmark` is set.
pub(crate) fn estargz_layer(
    entries: &[(Header, Vec<u8>)],
    chunk_size: u64,
    landmark: bool,
) -> (Vec<u8>, LayerSummary) {
    let mut w = EstargzWriter::new(
        Vec::new(),
        WriterOptions {
            chunk_size,
            level: 6,
        },
    );
    if landmark {
        w.append_landmark(false).expect("writing to memory");
    }
    for (h, data) in entries {
        let mut h = h.clone();
        h.size = data.len() as u64;
        w.append(&h, &mut data.as_slice())
            .expect("writing to memory");
    }
    w.finish().expect("writing to memory")
}

/// A layer's index as a remote reader gets it: the footer, then the TOC.
pub(crate) fn layer_index(
    blob: &[u8],
    expected: Option<&Digest>,
) -> Result<(LayerIndex, Digest), EstargzError> {
    let size = blob.len() as u64;
    let footer = &blob[blob.len().saturating_sub(FOOTER_SIZE as usize)..];
    let toc_offset = estargz::parse_footer(footer)?;
    let end = (size - FOOTER_SIZE) as usize;
    let toc = blob
        .get(toc_offset as usize..end)
        .ok_or_else(|| EstargzError::BadToc("TOC offset beyond the blob".into()))?;
    estargz::read_toc(toc, toc_offset, size, expected)
}

/// The descriptor a manifest would list for a built layer, TOC digest annotation included.
pub(crate) fn layer_descriptor(summary: &LayerSummary) -> Descriptor {
    let mut desc = Descriptor {
        media_type: manifest::OCI_LAYER_GZIP.into(),
        digest: summary.digest,
        size: summary.size,
        annotations: Default::default(),
        platform: None,
        extra: Default::default(),
    };
    desc.annotations
        .insert(TOC_DIGEST_ANNOTATION.into(), summary.toc_digest.to_string());
    desc
}

/// Bytes that compress a little (text-like) or not at all, from a seeded xorshift.
pub(crate) fn bytes(seed: u64, len: usize, text: bool) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if text {
                b"abcdefgh ijk\n"[(x % 13) as usize]
            } else {
                x as u8
            }
        })
        .collect()
}

/// A tar of directories and files of mixed sizes and compressibility: (tar, files).
pub(crate) fn layer_tar() -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
    let mut tar = Vec::new();
    let mut files = Vec::new();
    crate::image::tar::write_entry(
        &mut tar,
        &Header::new("etc/", crate::image::tar::Kind::Directory),
        &[],
    )
    .expect("to memory");
    for i in 0..40u64 {
        let len = [0, 1, 511, 4096, 70_000, 300_000][(i % 6) as usize] + i as usize;
        let data = bytes(i + 1, len, i % 3 != 0);
        let name = format!("etc/file-{i}");
        let mut header = Header::new(&name, crate::image::tar::Kind::Regular);
        header.size = data.len() as u64;
        crate::image::tar::write_entry(&mut tar, &header, &data).expect("to memory");
        files.push((name, data));
    }
    tar.extend_from_slice(&crate::image::tar::TarWriter::end_of_archive());
    (tar, files)
}

/// `data` gzip-compressed at `level`, as a plain (not eStargz) layer is.
pub(crate) fn gzip(data: &[u8], level: u32) -> Vec<u8> {
    use std::io::Write as _;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
    gz.write_all(data).expect("to memory");
    gz.finish().expect("to memory")
}

/// The descriptor of a plain gzip layer `blob`: no TOC annotation.
pub(crate) fn plain_descriptor(blob: &[u8]) -> Descriptor {
    Descriptor {
        media_type: manifest::OCI_LAYER_GZIP.into(),
        digest: Digest::of(blob),
        size: blob.len() as u64,
        annotations: Default::default(),
        platform: None,
        extra: Default::default(),
    }
}

/// Blobs in memory, served by range: every range request counted, each delayed by `delay`,
/// optionally behind a link of limited bandwidth, and the first `failures` of them answered
/// with a 503.
#[derive(Debug, Default)]
pub(crate) struct MemoryBlobs {
    blobs: HashMap<Digest, Vec<u8>>,
    pub ranges: AtomicUsize,
    /// The most bytes one range request asked for.
    pub largest: AtomicU64,
    /// Range requests being answered now, and the most there were at once.
    answering: AtomicUsize,
    pub most_at_once: AtomicUsize,
    /// Bytes range requests asked for, per blob.
    pub asked: Mutex<HashMap<Digest, u64>>,
    /// Blobs downloaded whole into a file ([`BlobSource::blob_to_file`]), per blob.
    pub downloads: Mutex<HashMap<Digest, usize>>,
    /// Manifests asked for (none is served), by reference.
    pub manifests_asked: Mutex<HashMap<String, usize>>,
    pub delay: Duration,
    /// Bytes per second of the link all answers share, one after another (none: no limit),
    /// and when it is next free.
    link: Option<(f64, Mutex<tokio::time::Instant>)>,
    pub failures: AtomicUsize,
    /// What [`BlobSource::round_trip`] says (`None`, as for local files, by default).
    pub round_trip: Option<Duration>,
    /// Bytes of any blob whose range requests are not answered until released.
    held: Mutex<Option<Range<u64>>>,
}

impl MemoryBlobs {
    /// Serves `blob` under its own digest.
    pub(crate) fn with(mut self, blob: Vec<u8>) -> Self {
        self.blobs.insert(Digest::of(&blob), blob);
        self
    }

    /// Serves `blob` under `digest`, whatever its content.
    pub(crate) fn with_digest(mut self, digest: Digest, blob: Vec<u8>) -> Self {
        self.blobs.insert(digest, blob);
        self
    }

    pub(crate) fn delayed(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Answers over one link of `bytes_per_second`: an answer's bytes go after those of the
    /// answers before it, as over a real link (the round trip, `delay`, before the first).
    pub(crate) fn throttled(mut self, bytes_per_second: f64) -> Self {
        self.link = Some((bytes_per_second, Mutex::new(tokio::time::Instant::now())));
        self
    }

    /// Reports `rtt` as its round trip, as a registry some distance away would.
    pub(crate) fn far(mut self, rtt: Duration) -> Self {
        self.round_trip = Some(rtt);
        self
    }

    /// Answers no range request that asks for any of `bytes` until [`Self::release`].
    pub(crate) fn hold(&self, bytes: Range<u64>) {
        *crate::sync::lock(&self.held) = Some(bytes);
    }

    /// Answers the requests [`Self::hold`] held.
    pub(crate) fn release(&self) {
        *crate::sync::lock(&self.held) = None;
    }

    pub(crate) fn failing_first(self, failures: usize) -> Self {
        self.failures.store(failures, Ordering::SeqCst);
        self
    }

    fn get(&self, digest: &Digest) -> Result<&Vec<u8>, RegistryError> {
        self.blobs
            .get(digest)
            .ok_or_else(|| RegistryError::NotFound {
                what: format!("blob {digest}"),
                source_name: self.name(),
            })
    }
}

#[async_trait]
impl BlobSource for MemoryBlobs {
    async fn manifest(&self, reference: &str) -> Result<FetchedManifest, RegistryError> {
        *crate::sync::lock(&self.manifests_asked)
            .entry(reference.to_string())
            .or_default() += 1;
        tokio::time::sleep(self.delay).await;
        Err(RegistryError::NotFound {
            what: format!("manifest {reference}"),
            source_name: self.name(),
        })
    }

    async fn blob(&self, desc: &Descriptor) -> Result<Bytes, RegistryError> {
        Ok(Bytes::copy_from_slice(self.get(&desc.digest)?))
    }

    async fn blob_to_file(&self, desc: &Descriptor, path: &Path) -> Result<(), RegistryError> {
        *crate::sync::lock(&self.downloads)
            .entry(desc.digest)
            .or_default() += 1;
        tokio::time::sleep(self.delay).await;
        std::fs::write(path, self.get(&desc.digest)?).map_err(|e| RegistryError::io(path, e))
    }

    async fn read_range(&self, digest: &Digest, range: Range<u64>) -> Result<Bytes, RegistryError> {
        self.ranges.fetch_add(1, Ordering::SeqCst);
        struct Answering<'a>(&'a AtomicUsize);
        impl Drop for Answering<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let now = self.answering.fetch_add(1, Ordering::SeqCst) + 1;
        let _answering = Answering(&self.answering);
        self.most_at_once.fetch_max(now, Ordering::SeqCst);
        self.largest
            .fetch_max(range.end.saturating_sub(range.start), Ordering::SeqCst);
        *crate::sync::lock(&self.asked).entry(*digest).or_default() +=
            range.end.saturating_sub(range.start);
        tokio::time::sleep(self.delay).await;
        let held = || {
            crate::sync::lock(&self.held)
                .as_ref()
                .is_some_and(|held| held.start < range.end && range.start < held.end)
        };
        while held() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if let Some((rate, free)) = &self.link {
            let sent = {
                let mut free = crate::sync::lock(free);
                let start = (*free).max(tokio::time::Instant::now());
                *free = start + Duration::from_secs_f64((range.end - range.start) as f64 / rate);
                *free
            };
            tokio::time::sleep_until(sent).await;
        }
        let fail = self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if fail.is_ok() {
            return Err(RegistryError::Status {
                url: self.name(),
                status: 503,
                body: String::new(),
            });
        }
        let blob = self.get(digest)?;
        let bytes = blob
            .get(range.start as usize..range.end as usize)
            .ok_or_else(|| RegistryError::SizeMismatch {
                what: format!("range {range:?} of {digest}"),
                expected: range.end - range.start,
                actual: 0,
            })?;
        Ok(Bytes::copy_from_slice(bytes))
    }

    fn name(&self) -> String {
        "in-memory test blobs".into()
    }

    fn round_trip(&self) -> Option<Duration> {
        self.round_trip
    }
}
