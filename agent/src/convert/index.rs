//! `imgstream index IMAGE`: a span index for every plain gzip layer of an image, so that the
//! image streams as it is, unconverted. Each layer is downloaded to a scratch file (its
//! digest checked) and read once by [`SpanIndex::build`] (a progress bar a layer on a
//! terminal); the encoded index is published
//! beside the image as an artifact whose subject is the image manifest (the referrers API,
//! or the tag fallback: [`crate::registry::attached`]), or with `--local` kept in the chunk
//! cache under the layer's digest. `mount`, `serve-vhost` and the snapshotter look in both.
//! The image itself is untouched: its digest stays what it was.

use std::{path::PathBuf, sync::Arc};

use serde::Serialize;

use crate::{
    cache::{CacheConfig, ChunkCache},
    image::{
        estargz::TOC_DIGEST_ANNOTATION,
        gzip::{BuildOptions, SPAN_INDEX_TYPE, SpanIndex, WINDOWS_TYPE},
        tar::TarError,
    },
    mount::{MountError, image_manifest, manifest_descriptor},
    oci::{
        digest::Digest,
        manifest::{self, Descriptor, Document, Manifest, Platform, is_gzip_layer},
        reference::ImageRef,
    },
    registry::{
        BlobSource, FetchedManifest, attached::Attached, http::HttpConfig, open_sink, open_source,
    },
};

/// Errors indexing an image.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("opening the image")]
    Image(#[source] MountError),
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    #[error("the cache")]
    Cache(#[from] crate::cache::CacheError),
    #[error("scratch directory {0}")]
    Scratch(PathBuf, #[source] std::io::Error),
    #[error("indexing layer {digest}")]
    Layer {
        digest: Digest,
        #[source]
        source: crate::image::gzip::GzipError,
    },
    #[error("the indexing task failed")]
    Task(#[source] tokio::task::JoinError),
    #[error(
        "the index built for layer {digest} does not read back, so it was neither kept nor published (a bug in imgstream: please report it)"
    )]
    Unreadable {
        digest: Digest,
        #[source]
        source: crate::image::gzip::FormatError,
    },
    #[error("the cache has no room for the index of layer {0}")]
    NoRoom(Digest),
    #[error("publishing a span index beside the image")]
    Publish(#[source] crate::registry::attached::AttachError),
}

/// Where the indexes go: the local cache, or beside the image through this sink.
enum Keep {
    Cache(ChunkCache),
    Publish(Arc<dyn crate::registry::BlobSink>),
}

/// The same, once the image manifest (the artifacts' subject) is known.
enum Destination<'a> {
    Cache(&'a ChunkCache),
    Publish(Box<Attached>),
}

/// One indexing, as the command line asks for it.
#[derive(Clone, Debug)]
pub struct IndexJob {
    pub image: ImageRef,
    pub platform: Platform,
    /// Every platform of an image index, not only `platform`.
    pub all_platforms: bool,
    pub build: BuildOptions,
    /// Layers smaller than this many compressed bytes are not indexed.
    pub min_layer: u64,
    /// Keep the indexes in `cache_dir` (the agent's `--cache-dir`) instead of publishing
    /// them beside the image.
    pub local: bool,
    pub cache_dir: PathBuf,
    /// A directory under which layers are staged, in a directory of the job's own.
    pub scratch_parent: PathBuf,
    pub http: HttpConfig,
}

/// What an indexing did, layer by layer.
#[derive(Clone, Debug, Serialize)]
pub struct IndexReport {
    pub layers: Vec<IndexedLayer>,
}

#[derive(Clone, Debug, Serialize)]
pub struct IndexedLayer {
    /// The image manifest (one platform's) the layer was indexed for.
    pub manifest: Digest,
    pub digest: Digest,
    pub size: u64,
    /// Why the layer has no index (already eStargz, not gzip); `None` when it was indexed.
    pub skipped: Option<&'static str>,
    pub spans: usize,
    pub entries: usize,
    /// Bytes of the encoded index (what a mount downloads).
    pub index_bytes: u64,
    /// Bytes of the windows kept apart from it (published only: fetched a window per miss).
    pub windows_bytes: u64,
    /// The artifact that publishes it, when published.
    pub artifact: Option<Digest>,
}

impl IndexReport {
    /// One line per layer.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        for (n, l) in self.layers.iter().enumerate() {
            let line = match l.skipped {
                Some(why) => format!("layer {n} {}: not indexed ({why})\n", l.digest),
                None => format!(
                    "layer {n} {}: {} spans, {} entries, index {} bytes ({:.2} % of {} bytes){}, {}\n",
                    l.digest,
                    l.spans,
                    l.entries,
                    l.index_bytes,
                    l.index_bytes as f64 * 100.0 / l.size.max(1) as f64,
                    l.size,
                    if l.windows_bytes > 0 {
                        format!(", its windows apart {} bytes", l.windows_bytes)
                    } else {
                        String::new()
                    },
                    match l.artifact {
                        Some(artifact) => format!("published as {artifact}"),
                        None => "kept in the cache".into(),
                    }
                ),
            };
            out.push_str(&line);
        }
        out
    }
}

impl IndexJob {
    pub async fn run(self) -> Result<IndexReport, IndexError> {
        let source = open_source(&self.image, &self.http)?;
        let keep = if self.local {
            Keep::Cache(ChunkCache::open(&CacheConfig {
                dir: self.cache_dir.clone(),
                limit_bytes: None,
                prefer_uring: false,
            })?)
        } else {
            Keep::Publish(open_sink(&self.image, &self.http)?)
        };
        let scratch = self
            .scratch_parent
            .join(format!("imgstream-index-{}", std::process::id()));
        crate::private::own_dir(&scratch).map_err(|e| IndexError::Scratch(scratch.clone(), e))?;
        let result = self.index_layers(source, &keep, &scratch).await;
        let _ = std::fs::remove_dir_all(&scratch);
        result
    }

    async fn index_layers(
        &self,
        source: Arc<dyn BlobSource>,
        keep: &Keep,
        scratch: &std::path::Path,
    ) -> Result<IndexReport, IndexError> {
        let reference = self.image.manifest_reference().unwrap_or_default();
        let subjects = if self.all_platforms {
            every_platform(source.as_ref(), &reference).await?
        } else {
            vec![
                image_manifest(source.as_ref(), &reference, &self.platform, None)
                    .await
                    .map_err(IndexError::Image)?,
            ]
        };
        let progress = super::terminal_progress();
        let mut layers = Vec::new();
        for (fetched, manifest) in subjects {
            let subject = manifest_descriptor(&fetched, &manifest);
            let destination = match keep {
                Keep::Cache(cache) => Destination::Cache(cache),
                Keep::Publish(sink) => Destination::Publish(Box::new(Attached {
                    source: source.clone(),
                    sink: Some(sink.clone()),
                    subject: subject.clone(),
                })),
            };
            for desc in &manifest.layers {
                let n = layers.len();
                let progress = progress.clone().map(|p| {
                    Arc::new(move |read, total| p(n, read, total))
                        as Arc<dyn Fn(u64, u64) + Send + Sync>
                });
                layers.push(
                    self.index_layer(
                        source.as_ref(),
                        &destination,
                        (subject.digest, desc),
                        scratch,
                        progress,
                    )
                    .await?,
                );
            }
        }
        Ok(IndexReport { layers })
    }

    /// One layer of one image manifest indexed and kept or published.
    /// With `progress` (bytes read of the layer, its size) on a terminal.
    async fn index_layer(
        &self,
        source: &dyn BlobSource,
        destination: &Destination<'_>,
        (manifest, desc): (Digest, &Descriptor),
        scratch: &std::path::Path,
        progress: Option<Arc<dyn Fn(u64, u64) + Send + Sync>>,
    ) -> Result<IndexedLayer, IndexError> {
        let mut report = IndexedLayer {
            manifest,
            digest: desc.digest,
            size: desc.size,
            skipped: None,
            spans: 0,
            entries: 0,
            index_bytes: 0,
            windows_bytes: 0,
            artifact: None,
        };
        if desc.annotations.contains_key(TOC_DIGEST_ANNOTATION) {
            report.skipped = Some("eStargz: it streams through its TOC");
        } else if !is_gzip_layer(&desc.media_type) {
            report.skipped = Some("not a gzip layer");
        } else if desc.size < self.min_layer {
            report.skipped = Some("smaller than --min-layer: a mount downloads it whole");
        }
        if report.skipped.is_some() {
            return Ok(report);
        }
        // Downloaded whole (its digest checked on the way), then read once.
        let file = scratch.join(desc.digest.hex());
        source.blob_to_file(desc, &file).await?;
        let (build, size) = (self.build, desc.size);
        let path = file.clone();
        let index = tokio::task::spawn_blocking(move || {
            let layer = std::fs::File::open(&path).map_err(crate::image::gzip::GzipError::Io)?;
            let report = |read| {
                if let Some(progress) = &progress {
                    progress(read, size);
                }
            };
            let layer = super::layer::Counted::new(
                std::io::BufReader::with_capacity(1 << 20, layer),
                &report,
            );
            SpanIndex::build(layer, build)
        })
        .await
        .map_err(IndexError::Task)?;
        let _ = std::fs::remove_file(&file);
        let index = match index {
            Ok(index) => index,
            // The layer is fine, only not for an index: mounts download it whole.
            Err(crate::image::gzip::GzipError::SparseFile(path)) => {
                tracing::warn!(layer = %desc.digest, path, "layer not indexed: it holds a sparse file, whose holes a span index cannot give; mounts download it whole");
                report.skipped = Some("holds a sparse file: a mount downloads it whole");
                return Ok(report);
            }
            Err(crate::image::gzip::GzipError::Tar(err @ TarError::NotUtf8 { .. })) => {
                tracing::warn!(layer = %desc.digest, %err, "layer not indexed: imgstream cannot show one of its names; the snapshotter leaves it to containerd, other mounts refuse it");
                report.skipped = Some(
                    "a name in it is not UTF-8: the snapshotter leaves it to containerd, other mounts refuse it",
                );
                return Ok(report);
            }
            Err(source) => {
                return Err(IndexError::Layer {
                    digest: desc.digest,
                    source,
                });
            }
        };
        let layer_err = |source| IndexError::Layer {
            digest: desc.digest,
            source,
        };
        // What agents refuse is worth nothing kept or published: an index is read back as
        // a mount reads it before it goes anywhere.
        let reads_back = |encoded: &[u8]| {
            SpanIndex::decode(encoded)
                .map(drop)
                .map_err(|source| IndexError::Unreadable {
                    digest: desc.digest,
                    source,
                })
        };
        match destination {
            Destination::Cache(cache) => {
                // The cache is on this node: windows held, read from the index in memory.
                let encoded = index.encode().map_err(layer_err)?;
                reads_back(&encoded)?;
                report.index_bytes = encoded.len() as u64;
                if !cache.put_span_index(&desc.digest, &encoded)? {
                    return Err(IndexError::NoRoom(desc.digest));
                }
            }
            Destination::Publish(attached) => {
                // Windows apart, in the same artifact: a mount downloads the index without
                // them, each miss fetches its span's window beside the span.
                let (encoded, windows) = index.encode_apart().map_err(layer_err)?;
                reads_back(&encoded)?;
                report.index_bytes = encoded.len() as u64;
                report.windows_bytes = windows.len() as u64;
                report.artifact = attached
                    .publish_with(
                        SPAN_INDEX_TYPE,
                        &desc.digest,
                        encoded.into(),
                        vec![(WINDOWS_TYPE, windows.into())],
                    )
                    .await
                    .map_err(IndexError::Publish)?;
            }
        }
        tracing::info!(layer = %desc.digest, spans = index.spans.len(), bytes = report.index_bytes, "layer indexed");
        report.spans = index.spans.len();
        report.entries = index.entries.len();
        Ok(report)
    }
}

/// Every platform's image manifest of `reference` (one, if it names a manifest); entries of
/// an index that are not images (attestations, `unknown/unknown`) are left out.
async fn every_platform(
    source: &dyn BlobSource,
    reference: &str,
) -> Result<Vec<(FetchedManifest, Manifest)>, IndexError> {
    let top = source.manifest(reference).await?;
    let index = match manifest::parse(&top.bytes, &top.media_type)
        .map_err(crate::registry::RegistryError::from)?
    {
        Document::Manifest(m) => return Ok(vec![(top, *m)]),
        Document::Index(index) => index,
    };
    let mut out = Vec::new();
    for entry in &index.manifests {
        if entry.platform.as_ref().is_some_and(|p| p.os == "unknown") {
            continue;
        }
        let fetched = source.manifest(&entry.digest.to_string()).await?;
        if let Document::Manifest(m) = manifest::parse(&fetched.bytes, &fetched.media_type)
            .map_err(crate::registry::RegistryError::from)?
        {
            out.push((fetched, *m));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::{
        oci::manifest::{OCI_CONFIG, OCI_INDEX, OCI_MANIFEST},
        registry::{BlobSink as _, local::LocalLayout},
        testing::{gzip, layer_tar, plain_descriptor},
    };

    /// One image manifest of a single plain layer `blob`, stored in `layout`.
    async fn image(layout: &LocalLayout, blob: Vec<u8>) -> Descriptor {
        let layer = plain_descriptor(&blob);
        layout
            .put_blob(&layer, Bytes::from(blob))
            .await
            .expect("a blob");
        let config =
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
        let config_desc = Descriptor::of(OCI_CONFIG, config);
        layout
            .put_blob(&config_desc, Bytes::from_static(config))
            .await
            .expect("a blob");
        let m = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config_desc,
            "layers": [layer],
        });
        let bytes = serde_json::to_vec(&m).expect("JSON");
        layout
            .put_manifest(None, OCI_MANIFEST, Bytes::from(bytes.clone()))
            .await
            .expect("a manifest");
        Descriptor::of(OCI_MANIFEST, &bytes)
    }

    #[tokio::test]
    async fn every_platform_of_an_index_gets_its_own_indexes() {
        let dir = std::env::temp_dir().join(format!("imgstream-index-all-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let layout = LocalLayout::create(&dir.join("layout")).expect("a layout");
        let (tar, _) = layer_tar();
        let mut entries = Vec::new();
        for (level, (os, arch)) in [(6, ("linux", "amd64")), (1, ("linux", "arm64"))] {
            let mut desc = image(&layout, gzip(&tar, level)).await;
            desc.platform = Some(format!("{os}/{arch}").parse().expect("a platform"));
            entries.push(desc);
        }
        // An attestation, as buildkit adds: not an image of any platform.
        let mut attestation = image(&layout, gzip(b"not a tar", 6)).await;
        attestation.platform = Some("unknown/unknown".parse().expect("a platform"));
        entries.push(attestation);
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": entries,
        });
        layout
            .put_manifest(
                Some("v1"),
                OCI_INDEX,
                Bytes::from(serde_json::to_vec(&index).expect("JSON")),
            )
            .await
            .expect("the index");
        let job = IndexJob {
            image: ImageRef::parse(&format!("oci:{}:v1", dir.join("layout").display()))
                .expect("a reference"),
            platform: Platform::host(),
            all_platforms: true,
            build: BuildOptions::default(),
            min_layer: 0,
            local: true,
            cache_dir: dir.join("cache"),
            scratch_parent: dir.clone(),
            http: HttpConfig::default(),
        };
        let job_again = job.clone();
        let report = job.run().await.expect("indexed");
        let manifests: Vec<Digest> = report.layers.iter().map(|l| l.manifest).collect();
        assert_eq!(manifests, vec![entries[0].digest, entries[1].digest]);
        assert!(
            report
                .layers
                .iter()
                .all(|l| l.skipped.is_none() && l.spans > 0)
        );
        let cache = ChunkCache::open(&CacheConfig {
            dir: dir.join("cache"),
            limit_bytes: None,
            prefer_uring: false,
        })
        .expect("the cache");
        for layer in &report.layers {
            let encoded = cache
                .get_span_index(&layer.digest)
                .expect("readable")
                .expect("kept");
            let index = SpanIndex::decode(&encoded).expect("it decodes");
            assert_eq!(index.layer, layer.digest);
        }

        // Layers under --min-layer are left to be downloaded whole, and say so.
        let small = report.layers.iter().map(|l| l.size).max().unwrap_or(0) + 1;
        let report = IndexJob {
            min_layer: small,
            cache_dir: dir.join("cache-small"),
            ..job_again
        }
        .run()
        .await
        .expect("indexed");
        assert_eq!(report.layers.len(), 2);
        for layer in &report.layers {
            assert!(layer.size < small);
            assert_eq!(
                layer.skipped,
                Some("smaller than --min-layer: a mount downloads it whole")
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
