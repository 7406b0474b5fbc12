//! `imgstream mount`: an image from a registry or a local layout, lazily, on a directory.
//! Ties the layers together: image source -> fetcher (cache) -> ImageFs -> FUSE, plus the
//! background download.

use std::{path::Path, sync::Arc, thread};

use crate::{
    cache::{CacheConfig, CacheError, ChunkCache},
    fetch::{
        Fetcher,
        background::{self, BackgroundConfig, Progress},
    },
    fs::{FsConfig, ImageFs, View, fusedev::FuseMount},
    image::{
        digest::Digest,
        estargz::EstargzError,
        layer::{self, LayerError, RemoteLayer},
        manifest::{self, Document, Platform},
    },
    registry::{BlobSource, FetchedManifest, RegistryError},
    shutdown::Shutdown,
};

/// Errors mounting an image.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("opening layer {index} ({digest})")]
    Layer {
        index: usize,
        digest: String,
        #[source]
        source: Box<LayerError>,
    },
    #[error(
        "layer {index} ({digest}) is not eStargz; convert the image with `imgstream convert` first \
         (mounting plain gzip layers, downloaded whole, is not implemented yet)"
    )]
    NotEstargz { index: usize, digest: String },
    #[error("the view asks for layer {0}, the image has {1}")]
    NoSuchLayer(usize, usize),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Fuse(#[from] crate::fs::fusedev::MountError),
}

/// Everything a mount needs to know.
#[derive(Clone, Debug)]
pub struct MountOptions {
    pub view: View,
    pub cache: CacheConfig,
    pub fs: FsConfig,
    /// `None` disables the background download.
    pub background: Option<BackgroundConfig>,
    /// FUSE worker threads.
    pub threads: usize,
    pub platform: Platform,
}

/// The layers of image `reference` (bottom first), opened for random access.
pub async fn open_layers(
    source: &dyn BlobSource,
    reference: &str,
    platform: &Platform,
    cache: Option<&ChunkCache>,
) -> Result<Vec<RemoteLayer>, MountError> {
    let mut fetched = manifest_cached(source, reference, cache).await?;
    let manifest = loop {
        match manifest::parse(&fetched.bytes, &fetched.media_type).map_err(RegistryError::from)? {
            Document::Manifest(m) => break *m,
            Document::Index(index) => {
                let chosen = index.select(platform).map_err(RegistryError::from)?;
                fetched = manifest_cached(source, &chosen.digest.to_string(), cache).await?;
            }
        }
    };
    let mut layers = Vec::with_capacity(manifest.layers.len());
    for (index, desc) in manifest.layers.iter().enumerate() {
        match layer::open_cached(source, desc, cache).await {
            Ok(opened) => layers.push(opened),
            Err(LayerError::Format(EstargzError::NotEstargz(_))) => {
                return Err(MountError::NotEstargz {
                    index,
                    digest: desc.digest.to_string(),
                });
            }
            Err(source) => {
                return Err(MountError::Layer {
                    index,
                    digest: desc.digest.to_string(),
                    source: Box::new(source),
                });
            }
        }
    }
    Ok(layers)
}

/// A manifest by digest from the cache when it is there (checked against the digest), else
/// from the source, then cached. Tags always go to the source: they move.
async fn manifest_cached(
    source: &dyn BlobSource,
    reference: &str,
    cache: Option<&ChunkCache>,
) -> Result<FetchedManifest, MountError> {
    let by_digest = reference.parse::<Digest>().ok();
    if let (Some(cache), Some(digest)) = (cache, by_digest)
        && let Ok(Some(bytes)) = cache.get(&digest)
        && Digest::of(&bytes) == digest
    {
        return Ok(FetchedManifest {
            bytes: bytes.into(),
            media_type: String::new(),
            digest,
        });
    }
    let fetched = source.manifest(reference).await?;
    if let Some(cache) = cache
        && let Err(err) = cache.put(&fetched.digest, &fetched.bytes)
    {
        tracing::warn!(%err, "manifest not cached");
    }
    Ok(fetched)
}

/// A mounted image; unmounted (and the background download stopped) when dropped.
pub struct MountedImage {
    pub fetcher: Arc<Fetcher>,
    pub progress: Option<Arc<Progress>>,
    mount: Option<FuseMount>,
    background: Option<thread::JoinHandle<()>>,
    stop: Shutdown,
}

impl std::fmt::Debug for MountedImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MountedImage")
            .field("mount", &self.mount)
            .finish_non_exhaustive()
    }
}

impl MountedImage {
    /// Stops the background download and waits for its workers.
    pub fn wait_background_stop(&mut self) {
        self.stop.trigger();
        self.wait_background();
    }

    /// Waits for the background download to end (finished, failed or stopped).
    pub fn wait_background(&mut self) {
        if let Some(handle) = self.background.take() {
            let _ = handle.join();
        }
    }
}

impl Drop for MountedImage {
    fn drop(&mut self) {
        self.stop.trigger();
        self.mount.take();
        self.wait_background();
    }
}

/// Mounts `layers` of an image read from `source` at `mountpoint`.
pub fn mount(
    runtime: tokio::runtime::Handle,
    source: Arc<dyn BlobSource>,
    cache: Arc<ChunkCache>,
    layers: Vec<RemoteLayer>,
    mountpoint: &Path,
    options: &MountOptions,
) -> Result<MountedImage, MountError> {
    if let View::Layer(n) = options.view
        && n >= layers.len()
    {
        return Err(MountError::NoSuchLayer(n, layers.len()));
    }
    let fetcher = Arc::new(Fetcher::new(runtime, source, cache));
    let layers: Arc<[RemoteLayer]> = layers.into();
    let background_layers: Arc<[RemoteLayer]> = match options.view {
        View::Merged => layers.clone(),
        View::Layer(n) => Arc::from(vec![layers[n].clone()]),
    };
    let fs = Arc::new(ImageFs::new(
        layers,
        options.view,
        fetcher.clone(),
        options.fs,
    ));
    let files = fs.tree().iter().count();
    let mount = FuseMount::mount(fs, mountpoint, "imgstream", true, options.threads)?;
    tracing::info!(mountpoint = %mountpoint.display(), files, view = ?options.view, "image mounted");
    let stop = Shutdown::new();
    let (progress, background) = match options.background {
        Some(config) => {
            let (progress, handle) =
                background::spawn(fetcher.clone(), background_layers, config, stop.clone());
            (Some(progress), Some(handle))
        }
        None => (None, None),
    };
    Ok(MountedImage {
        fetcher,
        progress,
        mount: Some(mount),
        background,
        stop,
    })
}
