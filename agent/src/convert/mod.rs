//! `imgstream convert`: rewrites an image's layers as eStargz, so that it can be streamed,
//! while it stays a valid image for every runtime that does not stream (each layer is still a
//! gzip tar; the config's `diff_ids` are recomputed).
//!
//! Pipeline per layer: download (digest checked) -> decompress -> [`EstargzWriter`] (optionally
//! with prioritised files first and the prefetch landmark) -> upload with the TOC digest
//! annotation. Then the new config and manifest. Layers that already carry a TOC digest
//! annotation are copied as they are.

mod index;
mod job;
mod layer;

use std::{path::PathBuf, sync::Arc};

use bytes::Bytes;
use serde::Serialize;

pub use index::{IndexError, IndexJob, IndexReport, IndexedLayer};
pub use job::{ConvertJob, terminal_progress};
pub use layer::{ConvertLayerError, Converted, LayerFormat, LayerPlan, Progress, convert_layer};

use crate::{
    image::{
        estargz::{TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION, WriterOptions},
        reads::RecordedRead,
        zstd::{TOC_CHECKSUM_ANNOTATIONS, TOC_POSITION_ANNOTATIONS},
    },
    oci::{
        digest::Digest,
        manifest::{
            self, DOCKER_LAYER_GZIP, DOCKER_MANIFEST, Descriptor, Document, Manifest,
            OCI_LAYER_GZIP, OCI_LAYER_ZSTD, Platform,
        },
    },
    registry::{BlobSink, BlobSource, RegistryError},
};

/// Errors converting an image.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("converting layer {digest}")]
    Layer {
        digest: Digest,
        #[source]
        source: ConvertLayerError,
    },
    #[error("the image config is not a JSON object with rootfs.diff_ids")]
    Config,
    #[error("the source names no image (give a tag or digest)")]
    NoReference,
    #[error("scratch directory {0}")]
    Scratch(PathBuf, #[source] std::io::Error),
    #[error("a conversion task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// Progress callback: (layer number, compressed bytes read, compressed size).
pub type ProgressFn = Arc<dyn Fn(usize, u64, u64) + Send + Sync>;

/// How to convert.
#[derive(Clone)]
pub struct ConvertOptions {
    pub format: LayerFormat,
    pub writer: WriterOptions,
    /// Files (paths inside the image) to put first, in this order, before the prefetch
    /// landmark.
    pub prioritized: Vec<String>,
    /// Reads recorded while the workload started (`imgstream mount --record-reads`): the
    /// files they touch go first in their layer (after `prioritized`), the chunks they touch
    /// become the layer's prefetch list. A layer with recorded reads is rewritten even when
    /// it is already eStargz.
    pub reads: Vec<RecordedRead>,
    /// Which manifest of an index to convert.
    pub platform: Platform,
    /// Where layers are staged (removed afterwards).
    pub scratch: PathBuf,
    /// Called with (layer number, bytes read so far, compressed size) while converting.
    pub progress: Option<ProgressFn>,
    /// The source repository, when the sink is another repository of the same registry:
    /// layers that stay as they are are then mounted across repositories, not copied.
    pub mount_from: Option<String>,
}

impl ConvertOptions {
    /// Layer `n`'s plan: the prioritised files, then the files its recorded reads touch in
    /// the order first touched; and those reads.
    fn plan(&self, n: usize) -> LayerPlan {
        let reads: Vec<(String, u64, u64)> = self
            .reads
            .iter()
            .filter(|r| r.layer == n)
            .map(|r| (r.path.clone(), r.offset, r.size))
            .collect();
        let mut prioritized = self.prioritized.clone();
        let mut seen: std::collections::HashSet<String> = prioritized.iter().cloned().collect();
        for (path, ..) in &reads {
            if seen.insert(path.clone()) {
                prioritized.push(path.clone());
            }
        }
        LayerPlan { prioritized, reads }
    }
}

/// What a conversion produced.
#[derive(Clone, Debug, Serialize)]
pub struct ConvertReport {
    pub manifest_digest: Digest,
    pub layers: Vec<LayerReport>,
}

#[derive(Clone, Debug, Serialize)]
pub struct LayerReport {
    pub source_digest: Digest,
    pub source_size: u64,
    pub digest: Digest,
    pub size: u64,
    pub toc_digest: Digest,
    /// Already eStargz: copied unchanged.
    pub reused: bool,
    /// Reused and mounted from the source repository (no bytes moved).
    pub mounted: bool,
}

impl ConvertReport {
    /// One line per layer, then the new manifest of `dst`.
    pub fn render_text(&self, dst: &str) -> String {
        let mut out = String::new();
        for (i, l) in self.layers.iter().enumerate() {
            let how = if l.reused {
                "already eStargz, copied"
            } else {
                "converted"
            };
            out.push_str(&format!(
                "layer {i}: {} ({} B) -> {} ({} B), TOC {}, {how}\n",
                l.source_digest, l.source_size, l.digest, l.size, l.toc_digest
            ));
        }
        out.push_str(&format!("{dst}: manifest {}\n", self.manifest_digest));
        out
    }
}

/// Converts the image `reference` of `source` into `sink`, tagged `tag`.
pub async fn convert(
    source: Arc<dyn BlobSource>,
    reference: Option<&str>,
    sink: Arc<dyn BlobSink>,
    tag: Option<&str>,
    options: &ConvertOptions,
) -> Result<ConvertReport, ConvertError> {
    let reference = reference.unwrap_or("");
    let mut fetched = source.manifest(reference).await?;
    let manifest = loop {
        match manifest::parse(&fetched.bytes, &fetched.media_type).map_err(RegistryError::from)? {
            Document::Manifest(m) => break *m,
            Document::Index(index) => {
                let chosen = index
                    .select(&options.platform)
                    .map_err(RegistryError::from)?;
                tracing::info!(platform = %options.platform, manifest = %chosen.digest, "selected from the index");
                fetched = source.manifest(&chosen.digest.to_string()).await?;
            }
        }
    };
    let docker = manifest.media_type.as_deref() == Some(DOCKER_MANIFEST)
        || manifest.config.media_type == manifest::DOCKER_CONFIG;
    // Docker's manifests have no zstd layer type: a zstd:chunked image is an OCI image.
    let to_oci = docker && options.format == LayerFormat::ZstdChunked;
    let docker = docker && !to_oci;
    let config_bytes = source.blob(&manifest.config).await?;
    let mut config: serde_json::Value =
        serde_json::from_slice(&config_bytes).map_err(|_| ConvertError::Config)?;

    std::fs::create_dir_all(&options.scratch)
        .map_err(|e| ConvertError::Scratch(options.scratch.clone(), e))?;
    let mut layers = Vec::new();
    let mut reports = Vec::new();
    let mut diff_ids = Vec::new();
    // A layer kept as it is keeps its diff ID: take it from the source config.
    let source_diff_ids: Vec<Option<Digest>> = config["rootfs"]["diff_ids"]
        .as_array()
        .map(|ids| {
            ids.iter()
                .map(|id| id.as_str().and_then(|s| s.parse().ok()))
                .collect()
        })
        .unwrap_or_default();
    for (n, desc) in manifest.layers.iter().enumerate() {
        let source_diff_id = source_diff_ids.get(n).copied().flatten();
        let (new_desc, diff_id, report) =
            convert_one(&source, &sink, n, desc, source_diff_id, docker, options).await?;
        layers.push(new_desc);
        diff_ids.push(serde_json::Value::String(diff_id.to_string()));
        reports.push(report);
    }
    let rootfs = config
        .get_mut("rootfs")
        .and_then(|r| r.as_object_mut())
        .ok_or(ConvertError::Config)?;
    rootfs.insert("diff_ids".into(), serde_json::Value::Array(diff_ids));
    let config_bytes = Bytes::from(serde_json::to_vec(&config).map_err(|_| ConvertError::Config)?);
    let mut config_desc = Descriptor {
        digest: Digest::of(&config_bytes),
        size: config_bytes.len() as u64,
        ..manifest.config.clone()
    };
    let mut manifest = manifest;
    if to_oci {
        config_desc.media_type = manifest::OCI_CONFIG.into();
        manifest.media_type = Some(manifest::OCI_MANIFEST.into());
    }
    sink.put_blob(&config_desc, config_bytes).await?;
    let new_manifest = Manifest {
        config: config_desc,
        layers,
        ..manifest
    };
    let media_type = new_manifest
        .media_type
        .clone()
        .unwrap_or_else(|| manifest::OCI_MANIFEST.to_string());
    let bytes = Bytes::from(serde_json::to_vec(&new_manifest).map_err(|_| ConvertError::Config)?);
    let manifest_digest = sink.put_manifest(tag, &media_type, bytes).await?;
    Ok(ConvertReport {
        manifest_digest,
        layers: reports,
    })
}

async fn convert_one(
    source: &Arc<dyn BlobSource>,
    sink: &Arc<dyn BlobSink>,
    n: usize,
    desc: &Descriptor,
    source_diff_id: Option<Digest>,
    docker: bool,
    options: &ConvertOptions,
) -> Result<(Descriptor, Digest, LayerReport), ConvertError> {
    let input = options.scratch.join(format!("layer-{n}.in"));
    let output = options.scratch.join(format!("layer-{n}.esgz"));
    let reuse = |toc_digest, mounted| LayerReport {
        source_digest: desc.digest,
        source_size: desc.size,
        digest: desc.digest,
        size: desc.size,
        toc_digest,
        reused: true,
        mounted,
    };
    let plan = options.plan(n);
    // A layer already in the wanted format, with no reads to add, is kept.
    let kept_toc = match options.format {
        LayerFormat::Estargz => desc.annotations.get(TOC_DIGEST_ANNOTATION).cloned(),
        LayerFormat::ZstdChunked => crate::image::zstd::toc_of(desc)
            .and_then(Result::ok)
            .map(|(_, checksum)| checksum.to_string()),
    };
    if let Some(toc) = kept_toc
        && plan.reads.is_empty()
    {
        // Already eStargz: keep it, without moving a byte when the registry can mount it.
        let toc_digest: Digest = toc.parse().map_err(RegistryError::from)?;
        if let (Some(from), Some(diff_id)) = (&options.mount_from, source_diff_id)
            && sink.mount_blob(desc, from).await?
        {
            return Ok((desc.clone(), diff_id, reuse(toc_digest, true)));
        }
        source.blob_to_file(desc, &input).await?;
        let path = input.clone();
        let media_type = desc.media_type.clone();
        let diff_id = tokio::task::spawn_blocking(move || layer::diff_id_of(&path, &media_type))
            .await
            .map_err(ConvertError::Task)?
            .map_err(|source| ConvertError::Layer {
                digest: desc.digest,
                source,
            })?;
        sink.put_blob_file(desc, &input).await?;
        let _ = std::fs::remove_file(&input);
        return Ok((desc.clone(), diff_id, reuse(toc_digest, false)));
    }
    source.blob_to_file(desc, &input).await?;
    let (media_type, writer) = (desc.media_type.clone(), (options.format, options.writer));
    let (src_path, dst_path) = (input.clone(), output.clone());
    let progress = options.progress.clone();
    let total = desc.size;
    let summary = tokio::task::spawn_blocking(move || {
        let report = |read: u64| {
            if let Some(p) = &progress {
                p(n, read, total);
            }
        };
        convert_layer(&src_path, &media_type, &dst_path, writer, &plan, &report)
    })
    .await
    .map_err(ConvertError::Task)?
    .map_err(|source| ConvertError::Layer {
        digest: desc.digest,
        source,
    })?;
    let Converted { summary, zstd_toc } = summary;
    let mut annotations = desc.annotations.clone();
    // What described the source layer's format does not describe the new one.
    for key in [TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION]
        .into_iter()
        .chain(TOC_CHECKSUM_ANNOTATIONS)
        .chain(TOC_POSITION_ANNOTATIONS)
    {
        annotations.remove(key);
    }
    let media_type = match zstd_toc {
        Some(position) => {
            // Both spellings containers/storage has read: podman 4 reads the older.
            for key in TOC_CHECKSUM_ANNOTATIONS {
                annotations.insert(key.into(), summary.toc_digest.to_string());
            }
            for key in TOC_POSITION_ANNOTATIONS {
                annotations.insert(key.into(), position.annotation());
            }
            OCI_LAYER_ZSTD
        }
        None => {
            annotations.insert(TOC_DIGEST_ANNOTATION.into(), summary.toc_digest.to_string());
            annotations.insert(
                UNCOMPRESSED_SIZE_ANNOTATION.into(),
                summary.uncompressed_size.to_string(),
            );
            if docker {
                DOCKER_LAYER_GZIP
            } else {
                OCI_LAYER_GZIP
            }
        }
    };
    let new_desc = Descriptor {
        media_type: media_type.to_string(),
        digest: summary.digest,
        size: summary.size,
        annotations,
        platform: None,
        extra: desc.extra.clone(),
    };
    sink.put_blob_file(&new_desc, &output).await?;
    let _ = std::fs::remove_file(&input);
    let _ = std::fs::remove_file(&output);
    tracing::info!(layer = n, from = %desc.digest, to = %summary.digest, size = summary.size, toc = %summary.toc_digest, "layer converted");
    let report = LayerReport {
        source_digest: desc.digest,
        source_size: desc.size,
        digest: summary.digest,
        size: summary.size,
        toc_digest: summary.toc_digest,
        reused: false,
        mounted: false,
    };
    Ok((new_desc, summary.diff_id, report))
}
