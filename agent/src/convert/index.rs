//! `imgstream index IMAGE --local`: a span index for every plain gzip layer of an image, so
//! that the image streams as it is, unconverted. Each layer is downloaded to a scratch file
//! (its digest checked), read once by [`SpanIndex::build`], and the encoded index kept in the
//! chunk cache under the layer's digest, where `mount`, `serve-vhost` and the snapshotter
//! look for it. The image itself is untouched.

use std::{path::PathBuf, sync::Arc};

use serde::Serialize;

use crate::{
    cache::{CacheConfig, ChunkCache},
    image::{
        estargz::TOC_DIGEST_ANNOTATION,
        gzip::{BuildOptions, SpanIndex},
    },
    mount::{MountError, image_manifest},
    oci::{
        digest::Digest,
        manifest::{Platform, is_gzip_layer},
        reference::ImageRef,
    },
    registry::{BlobSource, http::HttpConfig, open_source},
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
    #[error("the cache has no room for the index of layer {0}")]
    NoRoom(Digest),
}

/// One indexing, as the command line asks for it.
#[derive(Clone, Debug)]
pub struct IndexJob {
    pub image: ImageRef,
    pub platform: Platform,
    pub build: BuildOptions,
    /// The cache the index is kept in (the agent's `--cache-dir`).
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
    pub digest: Digest,
    pub size: u64,
    /// Why the layer has no index (already eStargz, not gzip); `None` when it was indexed.
    pub skipped: Option<&'static str>,
    pub spans: usize,
    pub entries: usize,
    /// Bytes of the encoded index.
    pub index_bytes: u64,
}

impl IndexReport {
    /// One line per layer.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        for (n, l) in self.layers.iter().enumerate() {
            let line = match l.skipped {
                Some(why) => format!("layer {n} {}: not indexed ({why})\n", l.digest),
                None => format!(
                    "layer {n} {}: {} spans, {} entries, index {} bytes ({:.2} % of {} bytes)\n",
                    l.digest,
                    l.spans,
                    l.entries,
                    l.index_bytes,
                    l.index_bytes as f64 * 100.0 / l.size.max(1) as f64,
                    l.size
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
        let cache = ChunkCache::open(&CacheConfig {
            dir: self.cache_dir.clone(),
            limit_bytes: None,
            prefer_uring: false,
        })?;
        let scratch = self
            .scratch_parent
            .join(format!("imgstream-index-{}", std::process::id()));
        crate::private::own_dir(&scratch).map_err(|e| IndexError::Scratch(scratch.clone(), e))?;
        let result = self.index_layers(source, &cache, &scratch).await;
        let _ = std::fs::remove_dir_all(&scratch);
        result
    }

    async fn index_layers(
        &self,
        source: Arc<dyn BlobSource>,
        cache: &ChunkCache,
        scratch: &std::path::Path,
    ) -> Result<IndexReport, IndexError> {
        let reference = self.image.manifest_reference().unwrap_or_default();
        let (_, manifest) = image_manifest(source.as_ref(), &reference, &self.platform, None)
            .await
            .map_err(IndexError::Image)?;
        let mut layers = Vec::new();
        for desc in &manifest.layers {
            let mut report = IndexedLayer {
                digest: desc.digest,
                size: desc.size,
                skipped: None,
                spans: 0,
                entries: 0,
                index_bytes: 0,
            };
            if desc.annotations.contains_key(TOC_DIGEST_ANNOTATION) {
                report.skipped = Some("eStargz: it streams through its TOC");
            } else if !is_gzip_layer(&desc.media_type) {
                report.skipped = Some("not a gzip layer");
            }
            if report.skipped.is_some() {
                layers.push(report);
                continue;
            }
            // Downloaded whole (its digest checked on the way), then read once.
            let file = scratch.join(desc.digest.hex());
            source.blob_to_file(desc, &file).await?;
            let build = self.build;
            let path = file.clone();
            let index = tokio::task::spawn_blocking(move || {
                let layer =
                    std::fs::File::open(&path).map_err(crate::image::gzip::GzipError::Io)?;
                SpanIndex::build(std::io::BufReader::new(layer), build)
            })
            .await
            .map_err(IndexError::Task)?
            .map_err(|source| IndexError::Layer {
                digest: desc.digest,
                source,
            })?;
            let _ = std::fs::remove_file(&file);
            let encoded = index.encode();
            if !cache.put_span_index(&desc.digest, &encoded)? {
                return Err(IndexError::NoRoom(desc.digest));
            }
            tracing::info!(layer = %desc.digest, spans = index.spans.len(), bytes = encoded.len(), "layer indexed");
            report.spans = index.spans.len();
            report.entries = index.entries.len();
            report.index_bytes = encoded.len() as u64;
            layers.push(report);
        }
        Ok(IndexReport { layers })
    }
}
