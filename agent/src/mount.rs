//! `imgstream mount`: an image from a registry or a local layout, lazily, on a directory.
//! Ties the layers together: image source -> fetcher (cache) -> ImageFs -> FUSE, plus the
//! background download.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
};

use crate::{
    cache::{CacheConfig, CacheError, ChunkCache},
    fetch::{
        Fetcher, ImageReaders,
        background::{self, BackgroundConfig, Progress},
        layer::{self, LayerError, RemoteLayer},
        learn::{
            self,
            share::{Shared, Sharing},
        },
        prefetch,
    },
    fs::{FsConfig, ImageFs, View, fusedev::FuseMount, keeper::Kept},
    image::estargz::EstargzError,
    image::gzip::{MAX_DECODED as MAX_INDEX_BYTES, SPAN_INDEX_TYPE, SpanIndex, WINDOWS_TYPE},
    oci::{
        digest::Digest,
        manifest::{self, Descriptor, Document, Platform},
    },
    registry::attached::{Attached, Listing},
    registry::{BlobSink, BlobSource, FetchedManifest, RegistryError},
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
    #[error("rewriting layer {index} ({digest}), which is not eStargz, for the cache")]
    Rewrite {
        index: usize,
        digest: String,
        #[source]
        source: crate::convert::ConvertLayerError,
    },
    #[error("the task rewriting layer {index} failed")]
    RewriteTask {
        index: usize,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("the view asks for layer {0}, the image has {1}")]
    NoSuchLayer(usize, usize),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Fuse(#[from] crate::fs::fusedev::MountError),
    /// A kept connection whose inode layout is not the one this agent would serve.
    #[error(
        "the connection kept for {mountpoint} served inode layout {kept}, this agent's is {serving}: not served again"
    )]
    LayoutChanged {
        mountpoint: String,
        kept: String,
        serving: Digest,
    },
}

/// Everything a mount (or a virtio-fs backend) needs to know.
#[derive(Clone, Debug)]
pub struct MountOptions {
    pub view: View,
    pub cache: CacheConfig,
    pub fs: FsConfig,
    /// `None` disables the background download.
    pub background: Option<BackgroundConfig>,
    /// Fetch the chunks the layers' TOCs list as read at start, as soon as they are mounted.
    pub prefetch: bool,
    /// Threads serving requests (FUSE workers, or virtio-fs request threads).
    pub threads: usize,
    /// The kernel's readahead on FUSE mounts, in KiB, until the image is all cached; `None`:
    /// 0 when a layer has a prefetch list (it brings what a start reads) or the registry is
    /// far (a bandwidth-delay product of 64 KiB or more: the agent's guesses bring what is
    /// read next), until readers turn the background download greedy; else the kernel's
    /// default.
    pub readahead_kb: Option<u32>,
    pub platform: Platform,
    /// The agent's fetch counters, which this image's fetcher adds to (for `/metrics`).
    pub fetch_totals: Option<Arc<crate::fetch::FetchStats>>,
    /// The agent's journal of requests by image (for pods' timelines), and the name of the
    /// image this mount serves in it.
    pub fetch_journal: Option<Arc<crate::fetch::journal::FetchJournal>>,
    pub image_name: Option<String>,
    /// Where layers' learned prefetch lists are kept ([`crate::fetch::learn`]); `None`:
    /// nothing is learned or used.
    pub learned: Option<PathBuf>,
    /// Whether learned lists are also fetched from and published to the image's registry
    /// ([`crate::fetch::learn::share`]); publishing needs [`OpenedImage::sink`].
    pub share_learned: Sharing,
}

/// An image's layers opened for random access, and the source to read them through.
pub struct OpenedImage {
    /// Digest of the image manifest (the platform's, for an index).
    pub digest: Digest,
    pub layers: Vec<RemoteLayer>,
    /// The source, plus the local files of layers that had to be downloaded whole.
    pub source: Arc<dyn BlobSource>,
    /// The image manifest (the platform's, for an index): what shared learned lists are
    /// attached to.
    pub manifest: Descriptor,
    /// Where this image's learned lists are published, when they are
    /// ([`MountOptions::share_learned`]); set by the caller, which knows the reference.
    pub sink: Option<Arc<dyn BlobSink>>,
    /// The compressed size of the whole image (every layer's, also of an image opened for
    /// one of its layers).
    pub image_bytes: u64,
    /// The readers of the image, when its layers are served each on its own and share them
    /// ([`ImageReaders`]); set by the caller.
    pub readers: Option<ImageReaders>,
    /// For an image opened for one of its layers, where that layer is in the image (0: the
    /// bottom one), and how many layers the image has.
    pub layer_position: Option<(usize, usize)>,
}

/// The layers of image `reference` (bottom first), opened for random access. eStargz and
/// zstd:chunked layers cost two range requests each (none with a warm cache), all layers'
/// side by side; any other layer is downloaded whole and rewritten as eStargz under
/// `<cache>/layers` before the mount is ready (kept for the next mount), and then read the
/// same way.
pub async fn open_layers(
    base: Arc<dyn BlobSource>,
    reference: &str,
    platform: &Platform,
    cache: &Arc<ChunkCache>,
) -> Result<OpenedImage, MountError> {
    let source = base.as_ref();
    let cache_opt = Some(cache.as_ref());
    let (fetched, manifest) = image_manifest(source, reference, platform, cache_opt).await?;
    // Every layer's TOC is asked for at once, not one layer's after another's, and every
    // layer that must be downloaded whole is (a few at a time).
    let openings = LayerOpenings {
        whole_ahead: WholeAhead::Always,
        ..LayerOpenings::default()
    };
    let subject = manifest_descriptor(&fetched, &manifest);
    openings.start(&base, (&subject, &manifest), None, cache);
    let mut span_indexes = SpanIndexes::new(cache, base.clone(), subject);
    let mut layers = Vec::with_capacity(manifest.layers.len());
    let mut local = std::collections::HashMap::new();
    for (index, desc) in manifest.layers.iter().enumerate() {
        openings.wait(&desc.digest).await;
        let opened = match kept_form(desc, cache) {
            Some(why) => Err(LayerError::Format(EstargzError::NotEstargz(why))),
            None => layer::open_cached(source, desc, cache_opt).await,
        };
        match opened {
            Ok(opened) => {
                LAYERS_OPENED.count_lazy(&opened);
                layers.push(opened);
            }
            Err(LayerError::Format(EstargzError::NotEstargz(why))) => {
                if let Some(opened) = span_indexes.open(desc, index).await {
                    layers.push(opened);
                    continue;
                }
                let (opened, path) = whole_layer(source, desc, cache, index, why).await?;
                local.insert(opened.desc.digest, path);
                layers.push(opened);
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
    let source: Arc<dyn BlobSource> = if local.is_empty() {
        base
    } else {
        Arc::new(crate::registry::local::WithLocalBlobs::new(base, local))
    };
    Ok(OpenedImage {
        manifest: manifest_descriptor(&fetched, &manifest),
        digest: fetched.digest,
        layers,
        source,
        sink: None,
        image_bytes: image_bytes(&manifest),
        readers: None,
        layer_position: None,
    })
}

/// The image manifest `reference` names (for an index, its manifest for `platform`), as
/// fetched and as parsed; kept in `cache` when given.
pub async fn image_manifest(
    source: &dyn BlobSource,
    reference: &str,
    platform: &Platform,
    cache: Option<&ChunkCache>,
) -> Result<(FetchedManifest, manifest::Manifest), MountError> {
    let mut fetched = manifest_cached(source, reference, cache).await?;
    loop {
        match manifest::parse(&fetched.bytes, &fetched.media_type).map_err(RegistryError::from)? {
            Document::Manifest(m) => return Ok((fetched, *m)),
            Document::Index(index) => {
                let chosen = index.select(platform).map_err(RegistryError::from)?;
                fetched = manifest_cached(source, &chosen.digest.to_string(), cache).await?;
            }
        }
    }
}

/// The layers of an image whose TOCs are being fetched ahead of their own opening.
///
/// containerd prepares an image's snapshots one after another, each once the one below it is
/// ready, and each lazy layer's footer and TOC cost two round trips to the registry: an image
/// of ten layers 50 ms away spent a second of its pull on them, one layer after another.
/// So once the first layer's opening has the manifest, the TOCs of the image's other layers
/// are fetched side by side ([`LAYERS_AHEAD`] at a time) into the cache, where the later
/// openings find them (with the manifest cached too, they ask nothing); an opening whose TOC
/// is still on its way waits for that fetch rather than making its own. A fetch ahead that
/// fails costs nothing but its requests: the layer's own opening asks again. Layers with no
/// TOC are treated alike once the image's listing is here: a listed span index is fetched
/// ahead, and a layer with none is downloaded whole ahead where [`WholeAhead`] says so.
///
/// What an image runs (its configuration's entrypoint and command) is asked for there too,
/// when the caller wants it: beside the TOC, once per image, for the snapshotter to take
/// when it mounts the image's top layer ([`LayerOpenings::take_run`]).
#[derive(Clone, Debug)]
pub struct LayerOpenings {
    /// Layers whose TOC or span index is being fetched ahead, or which are being downloaded
    /// whole ahead.
    underway: Underway<Digest>,
    permits: Arc<tokio::sync::Semaphore>,
    /// What images run, by manifest digest: asked for by the first opening that has the
    /// manifest, taken by whoever mounts the top layer.
    runs: Arc<std::sync::Mutex<std::collections::HashMap<Digest, ImageRun>>>,
    /// Images whose pull was seen before containerd prepared their layers, by reference
    /// (as [`ImageRef`]'s `Display` writes it), while their manifest is being fetched ahead
    /// ([`LayerOpenings::open_ahead`]).
    resolving: Underway<String>,
    /// Which layers that neither stream nor have a span index are downloaded whole ahead of
    /// their own opening.
    whole_ahead: WholeAhead,
}

/// Which of an image's layers with no TOC and no span index [`LayerOpenings`] downloads whole
/// (and rewrites, see [`whole_layer`]) as soon as the image's listing is here, side by side
/// with the other layers' TOCs and indexes, rather than at each one's opening.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WholeAhead {
    /// Only in an image some of whose layers stream: the snapshotter's case, where such a
    /// layer of any other image is left to containerd to unpack.
    WhenImageStreams,
    /// Every such layer: `imgstream mount` serves all of an image's layers itself.
    Always,
}

/// Fetches ahead under way, by what each fetches (a layer's TOC, an image's manifest): an
/// opening that wants one waits for it instead of asking the registry the same again.
#[derive(Debug)]
struct Underway<K>(
    Arc<std::sync::Mutex<std::collections::HashMap<K, tokio::sync::watch::Receiver<()>>>>,
);

impl<K> Default for Underway<K> {
    fn default() -> Self {
        Self(Arc::default())
    }
}

impl<K> Clone for Underway<K> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<K: Eq + std::hash::Hash + Clone> Underway<K> {
    /// Puts the fetch of `key` on the list, unless one is there already or `limit` fetches
    /// are: the fetch holds what this returns, which takes it off the list, and wakes its
    /// waiters, when dropped (the fetch ended, however it ended: a panic too).
    fn begin(&self, key: K, limit: usize) -> Option<Fetching<K>> {
        let (done, waiting) = tokio::sync::watch::channel(());
        let mut list = crate::sync::lock(&self.0);
        if list.contains_key(&key) || list.len() >= limit {
            return None;
        }
        list.insert(key.clone(), waiting);
        Some(Fetching {
            list: self.clone(),
            key,
            _done: done,
        })
    }

    /// Waits until the fetch of `key`, if one is under way, has ended ([`AHEAD_DEADLINE`] at
    /// most).
    async fn wait<Q>(&self, key: &Q)
    where
        K: std::borrow::Borrow<Q>,
        Q: Eq + std::hash::Hash + ?Sized,
    {
        let underway = crate::sync::lock(&self.0).get(key).cloned();
        if let Some(mut done) = underway {
            let _ = tokio::time::timeout(AHEAD_DEADLINE, done.changed()).await;
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        crate::sync::lock(&self.0).len()
    }
}

/// A fetch ahead under way ([`Underway::begin`]).
struct Fetching<K: Eq + std::hash::Hash> {
    list: Underway<K>,
    key: K,
    /// Dropped after [`Drop::drop`] ran: a waiter it wakes finds the fetch off the list.
    _done: tokio::sync::watch::Sender<()>,
}

impl<K: Eq + std::hash::Hash> Drop for Fetching<K> {
    fn drop(&mut self) {
        crate::sync::lock(&self.list.0).remove(&self.key);
    }
}

/// What an image runs, on its way: `None` when its configuration could not be had.
type ImageRun = tokio::task::JoinHandle<Option<crate::oci::config::Run>>;

/// Images whose run is kept at most for their top layer's mount (an image whose top layer
/// is never mounted lazily leaves its entry; past this many, all are dropped).
const MAX_IMAGE_RUNS: usize = 64;

/// TOCs fetched ahead at once.
const LAYERS_AHEAD: usize = 4;
/// Layers of one image whose TOCs are fetched ahead at most (manifests may list more).
const MAX_LAYERS_AHEAD: usize = 256;
/// How long a TOC fetched ahead may take; an opening waits for it at most this long.
const AHEAD_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

impl Default for LayerOpenings {
    fn default() -> Self {
        Self {
            underway: Underway::default(),
            permits: Arc::new(tokio::sync::Semaphore::new(LAYERS_AHEAD)),
            runs: Arc::default(),
            resolving: Underway::default(),
            whole_ahead: WholeAhead::WhenImageStreams,
        }
    }
}

impl LayerOpenings {
    /// Waits until the TOC of `layer` fetched ahead, if one is on its way, has landed or
    /// failed.
    async fn wait(&self, layer: &Digest) {
        self.underway.wait(layer).await;
    }

    /// Starts an image's openings before containerd asks for any of its layers: kubelet's
    /// `PullImage` came through the CRI image proxy, and containerd now fetches the manifest
    /// and configuration (three round trips to the registry, 0.3 s of a pull 50 ms away)
    /// before it prepares the first layer. Meanwhile this fetches the manifest of image
    /// `image` (`reference`, its tag or digest, from `source`) for `platform` into `cache`,
    /// then its layers' TOCs (as [`LayerOpenings::start`] does) and, with `ask_run`, what it
    /// runs. A layer's opening waits for this first ([`LayerOpenings::wait_resolving`]), then
    /// finds the manifest and the TOC in the cache, or waits for the TOC's fetch, and asks the
    /// registry nothing. A manifest that cannot be had costs its requests: the openings ask
    /// again.
    pub fn open_ahead(
        &self,
        source: Arc<dyn BlobSource>,
        (image, reference): (String, String),
        platform: Platform,
        cache: Arc<ChunkCache>,
        ask_run: bool,
    ) {
        let Some(fetching) = self.resolving.begin(image.clone(), MAX_IMAGE_RUNS) else {
            return;
        };
        let openings = self.clone();
        tokio::spawn(async move {
            // Off the list when this ends, and then the openings go on.
            let _fetching = fetching;
            let fetched = tokio::time::timeout(
                AHEAD_DEADLINE,
                image_manifest(source.as_ref(), &reference, &platform, Some(&cache)),
            )
            .await;
            match fetched {
                Ok(Ok((fetched, manifest))) => {
                    let subject = manifest_descriptor(&fetched, &manifest);
                    openings.start(&source, (&subject, &manifest), None, &cache);
                    if ask_run {
                        openings.start_run(&source, fetched.digest, &manifest);
                    }
                    tracing::info!(%image, manifest = %fetched.digest, layers = manifest.layers.len(), "pull seen: the image's manifest and TOCs are fetched before containerd asks");
                }
                Ok(Err(err)) => {
                    let err = crate::error_chain(&err);
                    tracing::debug!(%image, err, "pull seen, but its manifest could not be fetched ahead: the layers' openings ask for it");
                }
                Err(_) => {
                    tracing::debug!(%image, "pull seen, but its manifest took too long to fetch ahead: the layers' openings ask for it");
                }
            }
        });
    }

    /// Waits until the manifest of `image` fetched ahead ([`LayerOpenings::open_ahead`]), if
    /// it is on its way, has landed or failed (its layers' TOC fetches are under way by then).
    pub async fn wait_resolving(&self, image: &str) {
        self.resolving.wait(image).await;
    }

    /// Starts asking what image `manifest` (with digest `digest`) runs, unless an opening
    /// already did and its answer was not taken yet: its configuration, one request beside
    /// the opening's TOC.
    fn start_run(
        &self,
        source: &Arc<dyn BlobSource>,
        digest: Digest,
        manifest: &manifest::Manifest,
    ) {
        let mut runs = crate::sync::lock(&self.runs);
        if runs.contains_key(&digest) {
            return;
        }
        if runs.len() >= MAX_IMAGE_RUNS {
            for (_, run) in runs.drain() {
                run.abort();
            }
        }
        let (source, config) = (source.clone(), manifest.config.clone());
        runs.insert(
            digest,
            tokio::spawn(async move {
                image_run(source.as_ref(), &config)
                    .await
                    .inspect_err(|err| {
                        tracing::debug!(
                            err,
                            manifest = %digest,
                            "no image configuration: its program is left to the readers"
                        )
                    })
                    .ok()
            }),
        );
    }

    /// What image `manifest` runs, if an opening asked for it and nobody took it yet: `None`
    /// when no opening did, or the configuration could not be had.
    pub async fn take_run(&self, manifest: &Digest) -> Option<crate::oci::config::Run> {
        let run = crate::sync::lock(&self.runs).remove(manifest)?;
        run.await.ok().flatten()
    }

    /// Starts fetching the TOCs of `manifest`'s layers (but `opening`, which its caller
    /// opens) that have one and are neither cached nor on their way.
    fn start(
        &self,
        source: &Arc<dyn BlobSource>,
        (subject, manifest): (&Descriptor, &manifest::Manifest),
        opening: Option<&Digest>,
        cache: &Arc<ChunkCache>,
    ) {
        self.start_without_toc(source, (subject, manifest), opening, cache);
        let others = manifest
            .layers
            .iter()
            .filter(|desc| Some(&desc.digest) != opening)
            .take(MAX_LAYERS_AHEAD);
        for desc in others {
            let Some(key) = layer::toc_key(desc) else {
                continue;
            };
            if cache.get_toc(&key).ok().flatten().is_some() {
                continue;
            }
            let Some(fetching) = self.underway.begin(desc.digest, usize::MAX) else {
                continue;
            };
            let (openings, source, cache, desc) =
                (self.clone(), source.clone(), cache.clone(), desc.clone());
            tokio::spawn(async move {
                // Off the list when the fetch ends, and then its waiters go on.
                let _fetching = fetching;
                let opened = match openings.permits.acquire().await {
                    Ok(_permit) => tokio::time::timeout(
                        AHEAD_DEADLINE,
                        layer::open_cached(source.as_ref(), &desc, Some(&cache)),
                    )
                    .await
                    .map_err(|_| "it took too long".to_string())
                    .and_then(|opened| opened.map_err(|err| crate::error_chain(&err))),
                    Err(_) => Err("no permit".to_string()),
                };
                match opened {
                    Ok(_) => {
                        tracing::debug!(layer = %desc.digest, "TOC fetched ahead of the layer's opening")
                    }
                    Err(err) => {
                        tracing::debug!(layer = %desc.digest, err, "TOC not fetched ahead: the layer's opening asks for it")
                    }
                }
            });
        }
    }
}

impl LayerOpenings {
    /// Starts, once the image's listing is here, what `manifest`'s layers with no TOC named
    /// (and none kept in the cache, see [`kept_form`]) need before their openings: each
    /// listed span index is fetched into the cache, where the layer's opening finds it and
    /// asks nothing (a 50 ms trace of an 8-layer image as pushed: each opening's footer,
    /// artifact manifest and index were three round trips, one layer after another, 1.3 s
    /// of the pull); a layer with none listed is downloaded whole, if [`WholeAhead`] says so
    /// (the same trace: its two small unindexed layers, a footer and a download each at
    /// their openings, held the container back 0.34 s). The layer being opened is among
    /// them: its index or download goes beside its footer, not after it, and without
    /// waiting for a permit.
    fn start_without_toc(
        &self,
        source: &Arc<dyn BlobSource>,
        (subject, manifest): (&Descriptor, &manifest::Manifest),
        opening: Option<&Digest>,
        cache: &Arc<ChunkCache>,
    ) {
        let untocked: Vec<(usize, Descriptor, Fetching<Digest>)> = manifest
            .layers
            .iter()
            .enumerate()
            .filter(|(_, d)| layer::toc_key(d).is_none() && kept_form(d, cache).is_none())
            .take(MAX_LAYERS_AHEAD)
            .filter_map(|(i, d)| Some((i, d.clone(), self.underway.begin(d.digest, usize::MAX)?)))
            .collect();
        if untocked.is_empty() {
            return;
        }
        let attached = Attached {
            source: source.clone(),
            sink: None,
            subject: subject.clone(),
        };
        let (cache, permits, opening) = (cache.clone(), self.permits.clone(), opening.copied());
        let (whole_ahead, layers) = (self.whole_ahead, manifest.layers.clone());
        tokio::spawn(async move {
            let listing = image_listing(attached.source.as_ref(), attached.subject.digest).await;
            let wholes =
                whole_ahead == WholeAhead::Always || image_streams(&layers, &cache, &listing);
            for (position, desc, fetching) in untocked {
                let listed = manifest::is_gzip_layer(&desc.media_type)
                    && listing.entry(SPAN_INDEX_TYPE, &desc.digest).is_some();
                if !listed && !wholes {
                    continue;
                }
                let (attached, listing, cache, permits) = (
                    attached.clone(),
                    listing.clone(),
                    cache.clone(),
                    permits.clone(),
                );
                // The layer being opened waits for no other's.
                let first = Some(desc.digest) == opening;
                tokio::spawn(async move {
                    // Off the list when this ends, and then the layer's opening goes on.
                    let _fetching = fetching;
                    let _permit = if first {
                        None
                    } else {
                        match permits.acquire_owned().await {
                            Ok(permit) => Some(permit),
                            Err(_) => return,
                        }
                    };
                    if listed {
                        index_ahead(&attached, &listing, &desc, &cache).await;
                    } else {
                        let source = attached.source.as_ref();
                        whole_ahead_of_opening(source, &desc, &cache, position, whole_ahead).await;
                    }
                });
            }
        });
    }
}

/// Fetches the span index `listing` names for `desc` into `cache` ([`AHEAD_DEADLINE`] at most).
async fn index_ahead(
    attached: &Attached,
    listing: &Listing,
    desc: &Descriptor,
    cache: &ChunkCache,
) {
    let fetched =
        tokio::time::timeout(AHEAD_DEADLINE, published_index(attached, listing, desc)).await;
    let Ok(Some((encoded, companions))) = fetched else {
        return;
    };
    // Kept only if the opening would take it: a refused one is left to the opening to fetch
    // and refuse, and to count.
    match checked_index(desc, &encoded, Some(&companions)) {
        Ok(_) => match cache.put_span_index(&desc.digest, &encoded) {
            Ok(_) => {
                tracing::info!(layer = %desc.digest, "span index fetched from the registry ahead of the layer's opening")
            }
            Err(err) => {
                tracing::debug!(layer = %desc.digest, err = %crate::error_chain(&err), "span index fetched ahead not cached")
            }
        },
        Err(err) => {
            tracing::debug!(layer = %desc.digest, err, "span index fetched ahead not kept: the layer's opening asks again")
        }
    }
}

/// Downloads layer `desc` (number `position` of its image, with no TOC named) whole into
/// `cache` ([`whole_layer`]), as its opening would, finding no TOC to take (an eStargz TOC is
/// used only when the descriptor names its digest). No deadline: the opening waits for
/// this rather than download the layer a second time.
async fn whole_ahead_of_opening(
    source: &dyn BlobSource,
    desc: &Descriptor,
    cache: &ChunkCache,
    position: usize,
    whole_ahead: WholeAhead,
) {
    let why = match whole_ahead {
        WholeAhead::Always => {
            "no TOC named and no span index listed: downloaded ahead of its opening"
        }
        WholeAhead::WhenImageStreams => {
            "no TOC named and no span index listed, while the image's other layers stream (left to containerd, every layer above it would be downloaded too): downloaded ahead of its opening"
        }
    };
    match whole_layer(source, desc, cache, position, why).await {
        Ok(_) => {
            tracing::debug!(layer = %desc.digest, "downloaded whole ahead of the layer's opening")
        }
        Err(err) => {
            tracing::debug!(layer = %desc.digest, err = %crate::error_chain(&err), "not downloaded ahead: the layer's opening tries again")
        }
    }
}

/// Why a layer is taken as plain gzip without a look at its end: its span index is kept.
const INDEX_KEPT: &str = "a span index of it is kept";
/// Why a layer is taken as not eStargz without a look at its end: it was downloaded whole.
const WHOLE_KEPT: &str = "it was downloaded whole before";

/// Why layer `desc`, with no TOC named, can be opened from what `cache` holds alone, with no
/// request for its footer: a span index of it is kept (fetched ahead by an earlier layer's
/// opening, or by `imgstream index --local`), or it was downloaded whole and rewritten
/// ([`whole_layer`]). `None`: neither, or it names a TOC.
fn kept_form(desc: &Descriptor, cache: &ChunkCache) -> Option<&'static str> {
    if layer::toc_key(desc).is_some() {
        None
    } else if manifest::is_gzip_layer(&desc.media_type) && cache.has_span_index(&desc.digest) {
        Some(INDEX_KEPT)
    } else {
        rewritten(cache, &desc.digest).map(|_| WHOLE_KEPT)
    }
}

/// Image manifest `reference` for `platform` from `cache` alone (`None` unless `reference`
/// is a digest and every manifest on the way is cached).
fn cached_manifest(
    reference: &str,
    platform: &Platform,
    cache: &ChunkCache,
) -> Option<(FetchedManifest, manifest::Manifest)> {
    let mut digest: Digest = reference.parse().ok()?;
    // An index, then its manifest for the platform: two at most.
    for _ in 0..2 {
        let fetched = manifest_in_cache(cache, digest)?;
        match manifest::parse(&fetched.bytes, &fetched.media_type).ok()? {
            Document::Manifest(m) => return Some((fetched, *m)),
            Document::Index(index) => digest = index.select(platform).ok()?.digest,
        }
    }
    None
}

/// What the image of `config` runs, from its configuration.
async fn image_run(
    source: &dyn BlobSource,
    config: &Descriptor,
) -> Result<crate::oci::config::Run, String> {
    if config.size > crate::oci::config::MAX_CONFIG_BYTES {
        return Err(format!("{} bytes", config.size));
    }
    let bytes = source
        .blob(config)
        .await
        .map_err(|err| crate::error_chain(&err))?;
    crate::oci::config::Run::parse(&bytes).map_err(|err| err.to_string())
}

/// Connections to the registry opened when an image's first layer is opened, beside its
/// manifest: the mount's first reads come in bursts (a 50 ms trace: the agent's
/// connections went from 3 to 18 as the loader prefetch asked for the program's libraries,
/// each new one a round trip, a TLS handshake more against a real registry, before its
/// request went).
pub(crate) const PRECONNECT: usize = 16;

/// One layer of image `reference` (the one with digest `layer`), opened for random access,
/// as a one-layer image: what a remote snapshot mounts. `None` when the layer is not eStargz
/// (the caller unpacks it the ordinary way) or not in the image. The TOCs of the image's
/// other layers are fetched meanwhile, through `openings` (see [`LayerOpenings`]), and,
/// with `ask_run`, what the image runs. `said_estargz`: whoever asked knows the layer's TOC
/// digest (containerd passes eStargz layers' annotation as a label), so its end, the footer
/// and most TOCs, is asked for beside the manifest; otherwise only the footer is.
pub async fn open_one_layer(
    source: Arc<dyn BlobSource>,
    reference: &str,
    platform: &Platform,
    cache: &Arc<ChunkCache>,
    (layer, ask_run, said_estargz): (&Digest, bool, bool),
    openings: &LayerOpenings,
) -> Result<Option<OpenedImage>, MountError> {
    openings.wait(layer).await;
    // With the manifest and this layer's TOC cached (an earlier layer's opening fetched it
    // ahead), nothing is asked of the registry.
    let known = cached_manifest(reference, platform, cache).filter(|(_, manifest)| {
        manifest
            .layers
            .iter()
            .find(|d| d.digest == *layer)
            .is_some_and(|d| match layer::toc_key(d) {
                Some(key) => cache.get_toc(&key).ok().flatten().is_some(),
                None => kept_form(d, cache).is_some(),
            })
    });
    // The manifest names the image's configuration (what it runs: where the loader prefetch
    // starts) and its other layers (whose TOCs are fetched ahead): both are asked for as soon
    // as it is here, not once the layer's end has come too (a 50 ms trace: the configuration
    // went out 65 ms after the manifest came, and the walk started 40 ms after the mount).
    let begin = |(fetched, manifest): &(FetchedManifest, manifest::Manifest)| {
        if manifest.layers.iter().any(|d| d.digest == *layer) {
            let subject = manifest_descriptor(fetched, manifest);
            openings.start(&source, (&subject, manifest), Some(layer), cache);
            if ask_run {
                openings.start_run(&source, fetched.digest, manifest);
            }
        }
    };
    let (manifest, tail) = match known {
        Some(known) => {
            begin(&known);
            (Ok(known), None)
        }
        // An eStargz layer's end is asked for beside the manifest (its size comes with the
        // answer and is checked against the manifest's): the footer, a round trip less
        // before the TOC, and when the layer is said to be eStargz and the registry is a
        // round trip away, what the link carries meanwhile, the TOC too if it is within it
        // (a 50 ms trace: footer and TOC were two round trips of the pull's path). A
        // source without suffix ranges, or a failed or wrong answer, costs the round trip
        // saved: the end is then asked for once the size is known.
        None => {
            let preconnecting = source.clone();
            tokio::spawn(async move { preconnecting.preconnect(PRECONNECT).await });
            let asked = if said_estargz {
                crate::fetch::layer::tail_worth(source.round_trip())
            } else {
                crate::image::estargz::FOOTER_SIZE
            };
            let manifest = async {
                let manifest =
                    image_manifest(source.as_ref(), reference, platform, Some(cache)).await;
                if let Ok(manifest) = &manifest {
                    begin(manifest);
                }
                manifest
            };
            // A layer not said to be eStargz may have a span index: the image's listing is
            // asked for beside the manifest too, when the manifest's digest is known (CRI
            // labels the layer with it), and not once the manifest is here (a round trip
            // of every plain image's first opening). The manifest's own fetch ahead of the
            // indexes finds it here, or waits for it.
            let listing = async {
                match reference.parse::<Digest>() {
                    Ok(subject) if !said_estargz => {
                        image_listing(source.as_ref(), subject).await;
                    }
                    _ => {}
                }
            };
            let (manifest, tail, ()) =
                tokio::join!(manifest, source.read_tail(layer, asked), listing);
            (manifest, tail.ok().flatten())
        }
    };
    let (fetched, manifest) = manifest?;
    let Some((index, desc)) = manifest
        .layers
        .iter()
        .enumerate()
        .find(|(_, d)| d.digest == *layer)
    else {
        return Ok(None);
    };
    let opened = match kept_form(desc, cache) {
        Some(why) => Err(LayerError::Format(EstargzError::NotEstargz(why))),
        None => layer::open_cached_with_tail(source.as_ref(), desc, Some(cache), tail).await,
    };
    match opened {
        Ok(opened) => {
            LAYERS_OPENED.count_lazy(&opened);
            Ok(Some(OpenedImage {
                digest: desc.digest,
                layers: vec![opened],
                manifest: manifest_descriptor(&fetched, &manifest),
                source,
                sink: None,
                image_bytes: image_bytes(&manifest),
                readers: None,
                layer_position: Some((index, manifest.layers.len())),
            }))
        }
        Err(LayerError::Format(EstargzError::NotEstargz(why))) => {
            // Its index, fetched ahead since the manifest came, may still be on its way.
            openings.wait(&desc.digest).await;
            let subject = manifest_descriptor(&fetched, &manifest);
            let mut span_indexes = SpanIndexes::new(cache, source.clone(), subject.clone());
            let opened = span_indexes.open(desc, index).await;
            let streams = opened.is_none() && span_indexes.image_streams(&manifest).await;
            let (opened, source) = match opened {
                Some(opened) => (opened, source),
                // containerd 1.6 fetches every layer from the first one it must unpack
                // itself to the top, streamed or not: one small layer left to it (an image
                // indexed with `--min-layer`'s default leaves every layer under 1 MiB
                // unindexed) made it download the whole image before the container
                // started. In an image that streams, such a layer is downloaded whole here.
                None if streams => {
                    let why = format!(
                        "{why}, and it has no span index while the image's other layers stream \
                         (left to containerd, every layer above it would be downloaded too)"
                    );
                    let (opened, path) =
                        whole_layer(source.as_ref(), desc, cache, index, &why).await?;
                    let local = std::collections::HashMap::from([(opened.desc.digest, path)]);
                    let source: Arc<dyn BlobSource> =
                        Arc::new(crate::registry::local::WithLocalBlobs::new(source, local));
                    (opened, source)
                }
                None => return Ok(None),
            };
            Ok(Some(OpenedImage {
                digest: desc.digest,
                layers: vec![opened],
                manifest: subject,
                source,
                sink: None,
                image_bytes: image_bytes(&manifest),
                readers: None,
                layer_position: Some((index, manifest.layers.len())),
            }))
        }
        Err(source) => Err(MountError::Layer {
            index,
            digest: desc.digest.to_string(),
            source: Box::new(source),
        }),
    }
}

/// The compressed size of `manifest`'s image: its layers'.
fn image_bytes(manifest: &manifest::Manifest) -> u64 {
    manifest
        .layers
        .iter()
        .fold(0u64, |sum, layer| sum.saturating_add(layer.size))
}

/// The descriptor of a fetched image manifest (its media type from the registry, else from
/// its own field: a manifest from the cache comes without one).
pub(crate) fn manifest_descriptor(
    fetched: &FetchedManifest,
    manifest: &manifest::Manifest,
) -> Descriptor {
    let media_type = Some(fetched.media_type.clone())
        .filter(|t| !t.is_empty())
        .or_else(|| manifest.media_type.clone())
        .unwrap_or_else(|| manifest::OCI_MANIFEST.to_string());
    Descriptor::of(&media_type, &fetched.bytes)
}

/// Layers opened to be served, by how; exported as `imgstream_layers_opened_total`.
#[derive(Debug)]
pub struct LayersOpened {
    /// eStargz, through their TOCs.
    pub estargz: AtomicU64,
    /// zstd:chunked, through their TOCs.
    pub zstd_chunked: AtomicU64,
    /// Plain gzip, through a span index.
    pub span_index: AtomicU64,
    /// Downloaded whole (by a mount; for the snapshotter, unpacked by containerd), by why:
    /// not a gzip layer, no index found, or an index refused.
    pub whole_not_gzip: AtomicU64,
    pub whole_no_index: AtomicU64,
    pub whole_index_refused: AtomicU64,
    /// A layer the snapshotter meant to mount lazily and could not, so containerd unpacked
    /// it: the registry refused the agent's credentials (or wanted some and it had none),
    /// the opening passed its deadline, or anything else.
    pub fallback_credentials: AtomicU64,
    pub fallback_deadline: AtomicU64,
    pub fallback_other: AtomicU64,
}

pub static LAYERS_OPENED: LayersOpened = LayersOpened {
    estargz: AtomicU64::new(0),
    zstd_chunked: AtomicU64::new(0),
    span_index: AtomicU64::new(0),
    whole_not_gzip: AtomicU64::new(0),
    whole_no_index: AtomicU64::new(0),
    whole_index_refused: AtomicU64::new(0),
    fallback_credentials: AtomicU64::new(0),
    fallback_deadline: AtomicU64::new(0),
    fallback_other: AtomicU64::new(0),
};

impl LayersOpened {
    /// Counts a layer opened through its own TOC (eStargz or zstd:chunked).
    fn count_lazy(&self, layer: &RemoteLayer) {
        if manifest::is_zstd_layer(&layer.desc.media_type) {
            tracing::info!(digest = %layer.desc.digest, "zstd:chunked layer: streamed through its TOC");
            self.zstd_chunked.fetch_add(1, Ordering::Relaxed);
        } else {
            self.estargz.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// How long what a registry listed of an image's span indexes (or that it listed none) is
/// taken as still true: the snapshotter prepares an image's layers one by one, and a plain
/// image with no index would otherwise cost two requests (referrers, tag fallback) a layer.
const LISTING_FRESH: std::time::Duration = std::time::Duration::from_secs(300);
/// Images whose listings are remembered at most.
const LISTINGS_KEPT: usize = 256;

type Listings = std::collections::HashMap<Digest, (std::time::Instant, Arc<Listing>)>;

fn listings() -> &'static std::sync::Mutex<Listings> {
    static LISTINGS: std::sync::OnceLock<std::sync::Mutex<Listings>> = std::sync::OnceLock::new();
    LISTINGS.get_or_init(Default::default)
}

fn recent_listing(subject: &Digest) -> Option<Arc<Listing>> {
    let listings = crate::sync::lock(listings());
    let (at, listing) = listings.get(subject)?;
    (at.elapsed() < LISTING_FRESH).then(|| listing.clone())
}

fn remember_listing(subject: Digest, listing: Arc<Listing>) {
    let mut listings = crate::sync::lock(listings());
    listings.retain(|_, (at, _)| at.elapsed() < LISTING_FRESH);
    if listings.len() < LISTINGS_KEPT {
        listings.insert(subject, (std::time::Instant::now(), listing));
    }
}

/// Finds span indexes for an image's plain gzip layers: kept in the cache (by `imgstream
/// index --local`, or fetched by an earlier mount), else published beside the image
/// (`imgstream index`: the referrers API, then the tag fallback; listed once per image every
/// [`LISTING_FRESH`], "none" included).
/// A bad or missing index is logged and the layer is downloaded whole, as without one.
struct SpanIndexes<'a> {
    cache: &'a ChunkCache,
    attached: Attached,
    /// `None` until first needed; an error is remembered as an empty listing.
    listing: Option<Arc<Listing>>,
}

impl<'a> SpanIndexes<'a> {
    fn new(cache: &'a ChunkCache, source: Arc<dyn BlobSource>, subject: Descriptor) -> Self {
        Self {
            cache,
            attached: Attached {
                source,
                sink: None,
                subject,
            },
            listing: None,
        }
    }

    /// Layer `desc` (number `index` of its image) opened through its span index, if it has
    /// one that is its own.
    async fn open(&mut self, desc: &Descriptor, index: usize) -> Option<RemoteLayer> {
        let counts = &LAYERS_OPENED;
        if !manifest::is_gzip_layer(&desc.media_type) {
            counts.whole_not_gzip.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let (encoded, from, companions) = match self.cache.get_span_index(&desc.digest) {
            Ok(Some(encoded)) => (encoded, "the cache", None),
            Ok(None) => match self.published(desc).await {
                Some((encoded, companions)) => (encoded, "the registry", Some(companions)),
                None => {
                    counts.whole_no_index.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
            },
            Err(err) => {
                counts.whole_no_index.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(layer = index, digest = %desc.digest, err = %crate::error_chain(&err), "span index not read");
                return None;
            }
        };
        match checked_index(desc, &encoded, companions.as_deref()) {
            Ok((opened, spans, windows_held)) => {
                if from == "the registry"
                    && let Err(err) = self.cache.put_span_index(&desc.digest, &encoded)
                {
                    tracing::warn!(layer = index, err = %crate::error_chain(&err), "span index not cached");
                }
                tracing::info!(layer = index, digest = %desc.digest, from, spans, windows_held, "plain gzip layer: streamed through its span index");
                counts.span_index.fetch_add(1, Ordering::Relaxed);
                Some(opened)
            }
            Err(err) => {
                tracing::warn!(layer = index, digest = %desc.digest, from, %err, "span index refused; the layer is downloaded whole");
                counts.whole_index_refused.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// What the registry lists of the image's span indexes (fetched once).
    async fn listing(&mut self) -> Arc<Listing> {
        if let Some(listing) = &self.listing {
            return listing.clone();
        }
        let listing =
            image_listing(self.attached.source.as_ref(), self.attached.subject.digest).await;
        self.listing = Some(listing.clone());
        listing
    }

    /// Whether a layer of `manifest` streams (see [`image_streams`]).
    async fn image_streams(&mut self, manifest: &manifest::Manifest) -> bool {
        let listing = self.listing().await;
        image_streams(&manifest.layers, self.cache, &listing)
    }

    /// The span index published for `desc`, if the registry lists one, and the other blobs
    /// of its artifact.
    async fn published(&mut self, desc: &Descriptor) -> Option<(Vec<u8>, Vec<Descriptor>)> {
        let listing = self.listing().await;
        published_index(&self.attached, &listing, desc).await
    }
}

/// Whether one of an image's `layers` streams: it names a TOC (eStargz, zstd:chunked), or has
/// a span index kept in `cache` or listed in `listing`.
fn image_streams(layers: &[Descriptor], cache: &ChunkCache, listing: &Listing) -> bool {
    layers.iter().any(|d| {
        layer::toc_key(d).is_some()
            || cache.has_span_index(&d.digest)
            || listing.entry(SPAN_INDEX_TYPE, &d.digest).is_some()
    })
}

/// What `source` lists of the span indexes of image manifest `subject`: asked once per image
/// every [`LISTING_FRESH`] ("none", and a failure, included); a caller that comes while it is
/// being asked waits for that answer.
async fn image_listing(source: &dyn BlobSource, subject: Digest) -> Arc<Listing> {
    static ASKING: std::sync::OnceLock<Underway<Digest>> = std::sync::OnceLock::new();
    let asking = ASKING.get_or_init(Underway::default);
    if let Some(listing) = recent_listing(&subject) {
        return listing;
    }
    let Some(_asking) = asking.begin(subject, LISTINGS_KEPT) else {
        asking.wait(&subject).await;
        if let Some(listing) = recent_listing(&subject) {
            return listing;
        }
        return Arc::new(list_span_indexes(source, subject).await);
    };
    let listing = Arc::new(list_span_indexes(source, subject).await);
    remember_listing(subject, listing.clone());
    listing
}

/// What `source` lists of the span indexes of `subject` (an empty listing, logged, when it
/// cannot be had).
async fn list_span_indexes(source: &dyn BlobSource, subject: Digest) -> Listing {
    crate::registry::attached::listing(source, &subject, SPAN_INDEX_TYPE)
        .await
        .unwrap_or_else(|err| {
            tracing::warn!(err = %crate::error_chain(&err), "published span indexes not listed");
            Listing::empty()
        })
}

/// The span index `listing` names for `desc`, and the other blobs of its artifact.
async fn published_index(
    attached: &Attached,
    listing: &Listing,
    desc: &Descriptor,
) -> Option<(Vec<u8>, Vec<Descriptor>)> {
    let entry = listing.entry(SPAN_INDEX_TYPE, &desc.digest)?;
    match attached
        .blob_and_more(entry, SPAN_INDEX_TYPE, MAX_INDEX_BYTES)
        .await
    {
        Ok((bytes, companions)) => Some((bytes.to_vec(), companions)),
        Err(err) => {
            tracing::warn!(digest = %desc.digest, err = %crate::error_chain(&err), "published span index not fetched");
            None
        }
    }
}

/// Layer `desc` opened through `encoded`, a span index said to be its own, with how many
/// spans it has and window bytes it holds; or why it is refused. `companions`: the other
/// blobs of the artifact it was published in (`None`: from the cache).
fn checked_index(
    desc: &Descriptor,
    encoded: &[u8],
    companions: Option<&[Descriptor]>,
) -> Result<(RemoteLayer, usize, usize), String> {
    let span_index = SpanIndex::decode(encoded).map_err(|e| crate::error_chain(&e))?;
    windows_published(&span_index, companions)?;
    let held: usize = span_index.spans.iter().map(|s| s.start.window.held()).sum();
    layer::open_indexed(desc, &span_index, desc.digest)
        .map(|opened| (opened, span_index.spans.len(), held))
        .map_err(|e| crate::error_chain(&e))
}

/// Whether `index`'s windows, if it keeps them apart, are among `companions`, the other
/// blobs of the artifact it was published in (`None`: it came from the cache, checked when
/// it was fetched). They are fetched from the image's repository as readers need them: the
/// artifact must hold them, so that the registry keeps them as long as the index.
fn windows_published(index: &SpanIndex, companions: Option<&[Descriptor]>) -> Result<(), String> {
    match (&index.windows, companions) {
        (Some(w), Some(companions))
            if !companions.iter().any(|d| {
                d.digest == w.digest && d.size == w.size && d.media_type == WINDOWS_TYPE
            }) =>
        {
            Err(format!(
                "its windows blob {} is not published with it",
                w.digest
            ))
        }
        _ => Ok(()),
    }
}

/// Downloads a layer that is not eStargz, rewrites it as eStargz in the cache directory
/// (reused by later mounts) and opens that.
async fn whole_layer(
    source: &dyn BlobSource,
    desc: &Descriptor,
    cache: &ChunkCache,
    index: usize,
    why: &str,
) -> Result<(RemoteLayer, std::path::PathBuf), MountError> {
    // One download of a layer at a time: its opening may come while the download ahead of
    // it is under way (or two images share the layer), and both write the same files.
    let _rewriting = rewrite_lock(desc.digest).await;
    let dir = cache.dir().join("layers");
    let io_err = |e: std::io::Error| MountError::Cache(CacheError::Prepare(dir.clone(), e));
    crate::private::own_dir(&dir).map_err(io_err)?;
    let (out, meta) = rewrite_paths(cache, &desc.digest);
    let layer_err = |source: LayerError| MountError::Layer {
        index,
        digest: desc.digest.to_string(),
        source: Box::new(source),
    };
    let (digest, size, toc) = match rewritten(cache, &desc.digest) {
        Some(summary) => summary,
        None => {
            tracing::info!(layer = index, digest = %desc.digest, size = desc.size, %why, "layer is not eStargz: downloading it whole before the mount is ready");
            let input = dir.join(format!("{}.download", desc.digest.hex()));
            source.blob_to_file(desc, &input).await?;
            let (input_path, out_path, media_type) =
                (input.clone(), out.clone(), desc.media_type.clone());
            let summary = tokio::task::spawn_blocking(move || {
                crate::convert::convert_layer(
                    &input_path,
                    &media_type,
                    &out_path,
                    Default::default(),
                    &Default::default(),
                    &|_| {},
                )
                .map(|converted| converted.summary)
            })
            .await
            .map_err(|source| MountError::RewriteTask { index, source })?
            .map_err(|source| MountError::Rewrite {
                index,
                digest: desc.digest.to_string(),
                source,
            })?;
            let _ = std::fs::remove_file(&input);
            let record = (summary.digest, summary.size, summary.toc_digest);
            // A tuple of digests and a number always serialises; without the record the
            // layer is only rewritten again at the next mount.
            if let Ok(bytes) = serde_json::to_vec(&record) {
                crate::private::write(&meta, &bytes).map_err(io_err)?;
                cache.count_file(&meta);
            }
            cache.count_file(&out);
            record
        }
    };
    let mut local_desc = desc.clone();
    local_desc.media_type = manifest::OCI_LAYER_GZIP.to_string();
    local_desc.digest = digest;
    local_desc.size = size;
    local_desc.annotations.insert(
        crate::image::estargz::TOC_DIGEST_ANNOTATION.into(),
        toc.to_string(),
    );
    let local = crate::registry::local::WithLocalBlobs::local_only(
        std::collections::HashMap::from([(digest, out.clone())]),
    );
    let opened = layer::open_cached(&local, &local_desc, Some(cache))
        .await
        .map_err(layer_err)?;
    Ok((opened, out))
}

/// Where [`whole_layer`] keeps layer `digest` rewritten as eStargz, and its summary.
fn rewrite_paths(cache: &ChunkCache, digest: &Digest) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = cache.dir().join("layers");
    (
        dir.join(format!("{}.esgz", digest.hex())),
        dir.join(format!("{}.json", digest.hex())),
    )
}

/// Layer `digest` as [`whole_layer`] rewrote it into `cache`, if it did: the rewrite's
/// digest, size and TOC digest.
fn rewritten(cache: &ChunkCache, digest: &Digest) -> Option<(Digest, u64, Digest)> {
    let (out, meta) = rewrite_paths(cache, digest);
    let summary = serde_json::from_slice(&std::fs::read(meta).ok()?).ok()?;
    out.exists().then_some(summary)
}

/// Held while layer `digest` is downloaded whole and rewritten ([`whole_layer`]).
async fn rewrite_lock(digest: Digest) -> tokio::sync::OwnedMutexGuard<()> {
    type Locks = std::collections::HashMap<Digest, Arc<tokio::sync::Mutex<()>>>;
    static LOCKS: std::sync::OnceLock<std::sync::Mutex<Locks>> = std::sync::OnceLock::new();
    let lock = {
        let mut locks = crate::sync::lock(LOCKS.get_or_init(Default::default));
        // Only the layers being rewritten stay: nobody else holds a finished one's lock.
        locks.retain(|_, lock| Arc::strong_count(lock) > 1);
        locks.entry(digest).or_default().clone()
    };
    lock.lock_owned().await
}

/// Manifest `digest` from `cache`, if it is there and its bytes hash to `digest`.
fn manifest_in_cache(cache: &ChunkCache, digest: Digest) -> Option<FetchedManifest> {
    let bytes = cache.get_manifest(&digest).ok().flatten()?;
    (Digest::of(&bytes) == digest).then(|| FetchedManifest {
        bytes: bytes.into(),
        media_type: String::new(),
        digest,
    })
}

/// A manifest by digest from the cache when it is there (checked against the digest), else
/// from the source, then cached. Tags always go to the source: they move.
async fn manifest_cached(
    source: &dyn BlobSource,
    reference: &str,
    cache: Option<&ChunkCache>,
) -> Result<FetchedManifest, MountError> {
    let by_digest = reference.parse::<Digest>().ok();
    if let Some(cached) = cache
        .zip(by_digest)
        .and_then(|(cache, digest)| manifest_in_cache(cache, digest))
    {
        return Ok(cached);
    }
    let fetched = source.manifest(reference).await?;
    if let Some(cache) = cache
        && let Err(err) = cache.put_manifest(&fetched.digest, &fetched.bytes)
    {
        tracing::warn!(%err, "manifest not cached");
    }
    Ok(fetched)
}

/// An image ready to serve: its filesystem, the fetcher behind it, the pin that keeps its
/// chunks from eviction, and the background download. Any transport serves `fs`; the
/// background download stops when this is dropped.
pub struct ServedImage {
    pub fs: Arc<ImageFs>,
    pub fetcher: Arc<Fetcher>,
    /// Keeps the image's chunks from eviction while served.
    _pin: crate::cache::Pin,
    pub progress: Option<Arc<Progress>>,
    background: Option<thread::JoinHandle<()>>,
    prefetch: Option<thread::JoinHandle<()>>,
    /// Watches the first start of layers with no prefetch list ([`learn`]).
    learner: Option<thread::JoinHandle<()>>,
    stop: Shutdown,
}

impl std::fmt::Debug for ServedImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedImage")
            .field("fs", &self.fs)
            .finish_non_exhaustive()
    }
}

impl ServedImage {
    /// Stops the background download and waits for its workers.
    pub fn wait_background_stop(&mut self) {
        self.stop.trigger();
        self.wait_background();
    }

    /// Waits for the background download and the prefetch to end (finished, failed or
    /// stopped).
    pub fn wait_background(&mut self) {
        for handle in [self.prefetch.take(), self.background.take()]
            .into_iter()
            .flatten()
        {
            let _ = handle.join();
        }
    }
}

impl Drop for ServedImage {
    fn drop(&mut self) {
        self.stop.trigger();
        self.wait_background();
        if let Some(learner) = self.learner.take() {
            let _ = learner.join();
        }
        // Other holders of the fetcher may outlive this image briefly; what readers fetched
        // is in the cache when it is gone, so a remount finds it there.
        self.fetcher.flush_cache_writes();
    }
}

/// A mounted image; unmounted (and the background download stopped) when dropped.
pub struct MountedImage {
    // Declared first: unmounted before the image it serves is dropped.
    mount: Option<FuseMount>,
    served: ServedImage,
}

impl std::fmt::Debug for MountedImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MountedImage")
            .field("mount", &self.mount)
            .finish_non_exhaustive()
    }
}

impl std::ops::Deref for MountedImage {
    type Target = ServedImage;
    fn deref(&self) -> &ServedImage {
        &self.served
    }
}

impl std::ops::DerefMut for MountedImage {
    fn deref_mut(&mut self) -> &mut ServedImage {
        &mut self.served
    }
}

impl MountedImage {
    /// Whether the mount is gone from under this process (unmounted from outside).
    pub fn ended(&self) -> bool {
        self.mount.as_ref().is_some_and(FuseMount::ended)
    }

    /// The FUSE connection's descriptor, to hand to a keeper.
    pub fn fuse_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.mount.as_ref()?.fuse_fd()
    }

    /// Whether opens of cached files are handed to backing files (FUSE passthrough).
    pub fn passthrough_enabled(&self) -> bool {
        self.served.fs.passthrough_enabled()
    }

    /// The inode layout the mount serves, kept with its descriptor.
    pub fn layout(&self) -> Digest {
        self.served.fs.tree().layout()
    }

    /// Stops serving (after the requests being served are answered) and the background
    /// download, and leaves the mount for the next agent, whose keeper holds the connection.
    /// (The passthrough ledger stays for it: see [`crate::fs::passthrough::ledger`].)
    pub fn leave_mounted(mut self) {
        self.served.stop.trigger();
        if let Some(mount) = self.mount.take() {
            mount.leave_mounted();
        }
    }
}

impl Drop for MountedImage {
    fn drop(&mut self) {
        self.served.stop.trigger();
        if let Some(mount) = self.mount.take() {
            let ledger = ledger_path(mount.mountpoint());
            drop(mount);
            let _ = std::fs::remove_file(ledger);
        }
    }
}

/// Builds the filesystem of an opened image, pins its chunks in `cache` and starts the
/// background download (when configured): everything but the transport.
pub fn serve(
    runtime: tokio::runtime::Handle,
    image: OpenedImage,
    cache: Arc<ChunkCache>,
    options: &MountOptions,
) -> Result<ServedImage, MountError> {
    let OpenedImage {
        digest,
        mut layers,
        source,
        manifest,
        sink,
        image_bytes: _,
        readers,
        layer_position: _,
    } = image;
    let manifest_digest = manifest.digest;
    let shared = match (options.share_learned, &options.learned) {
        (Sharing::Off, _) | (_, None) => None,
        (sharing, Some(dir)) => Some(Shared {
            source: source.clone(),
            sink: sink.filter(|_| sharing == Sharing::Publish),
            subject: manifest,
            dir: dir.clone(),
        }),
    };
    if let Some(dir) = &options.learned {
        learn::apply(&mut layers, dir);
    }
    if let View::Layer(n) = options.view
        && n >= layers.len()
    {
        return Err(MountError::NoSuchLayer(n, layers.len()));
    }
    // The image's chunks, TOCs and manifest: evicted together when it is unused long enough.
    let chunks: Vec<Digest> = layers
        .iter()
        .flat_map(|l| {
            l.index
                .nodes
                .iter()
                .flat_map(|n| n.chunks.iter().map(|c| c.digest))
                .chain(crate::fs::passthrough::backing_keys(l.index.nodes.iter()))
                .chain([l.toc_digest])
        })
        .chain([manifest_digest])
        .collect();
    let pin = cache.pin_image(&digest, &chunks)?;
    let mut fetcher = Fetcher::new(runtime, source, cache).with_read_around(options.fs.read_around);
    if let Some(readers) = &readers {
        fetcher = fetcher.with_image_readers(readers);
    }
    if let Some(totals) = &options.fetch_totals {
        fetcher = fetcher.with_totals(totals.clone());
    }
    if let (Some(journal), Some(image)) = (&options.fetch_journal, &options.image_name) {
        fetcher = fetcher.with_journal(journal.clone(), image);
    }
    let fetcher = Arc::new(fetcher);
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
    let stop = Shutdown::new();
    let prefetch = if options.prefetch {
        prefetch::spawn(
            fetcher.clone(),
            background_layers.clone(),
            options.fs.read_deadline,
            shared.clone(),
            stop.clone(),
        )
    } else {
        None
    };
    let learner = options.learned.as_ref().and_then(|dir| {
        learn::spawn(
            fetcher.clone(),
            &background_layers,
            dir.clone(),
            shared.clone(),
            stop.clone(),
        )
    });
    let (progress, background) = match options.background {
        Some(config) => {
            let (progress, handle) =
                background::spawn(fetcher.clone(), background_layers, config, stop.clone());
            (Some(progress), Some(handle))
        }
        None => (None, None),
    };
    Ok(ServedImage {
        fs,
        fetcher,
        _pin: pin,
        progress,
        background,
        prefetch,
        learner,
        stop,
    })
}

/// Mounts an opened image at `mountpoint`, pinning its chunks in `cache` while mounted.
pub fn mount(
    runtime: tokio::runtime::Handle,
    image: OpenedImage,
    cache: Arc<ChunkCache>,
    mountpoint: &Path,
    options: &MountOptions,
) -> Result<MountedImage, MountError> {
    let mut image = image;
    if let Some(dir) = &options.learned {
        learn::apply(&mut image.layers, dir);
    }
    let has_list = image.layers.iter().any(|l| !l.index.prefetch.is_empty());
    let served = serve(runtime, image, cache, options)?;
    // No kernel readahead while the agent guesses for readers: a list brings what a start
    // reads, and far from the registry the agent's own guesses (read-around windows, the
    // loader prefetch) are sized for the link, where the kernel's window of 128 KiB around
    // each page fault would put chunks nobody reads on the link and make the fault wait for
    // them (PHP's start at 50 ms: 3.04 s against 3.16 s, 15 cold starts each). Nearer, a
    // miss costs little and readahead saves requests (the whole image read first at 0 ms:
    // 12.1-12.2 s with it, 12.5-12.9 s without).
    let guessing = (has_list && options.prefetch) || served.fetcher.far();
    let readahead_kb = options.readahead_kb.or_else(|| guessing.then_some(0));
    let files = served.fs.tree().iter().count();
    let mount = FuseMount::mount(
        served.fs.clone(),
        mountpoint,
        "imgstream",
        true,
        options.threads,
        readahead_kb,
    )?;
    if let Some(device) = mount.fuse_fd().and_then(|fd| fd.try_clone_to_owned().ok()) {
        served.fs.attach_fuse_device(device);
    }
    let ledger = ledger_path(mountpoint);
    let kept = connection_at(mountpoint)
        .and_then(|connection| served.fs.keep_passthrough_ledger(&ledger, connection));
    if let Err(err) = kept {
        tracing::warn!(%err, path = %ledger.display(), "no passthrough ledger: if this agent is killed, files held open in passthrough mode fail to open until closed");
    }
    raise_readahead_when_cached(&mount, &served);
    if options.readahead_kb.is_none() && guessing {
        restore_readahead_when_greedy(&mount, &served);
    }
    tracing::info!(mountpoint = %mountpoint.display(), files, view = ?options.view, readahead_kb = ?mount.readahead().and_then(|r| r.kb().ok()), "image mounted");
    Ok(MountedImage {
        mount: Some(mount),
        served,
    })
}

/// Serves an opened image again on the FUSE connection mounted at `mountpoint` by a previous
/// agent, taken back from a keeper (see [`crate::fs::keeper`]): only if the inode layout the
/// connection served is the one this image's tree has, since the kernel keeps the inode
/// numbers it was given.
pub fn adopt(
    runtime: tokio::runtime::Handle,
    image: OpenedImage,
    cache: Arc<ChunkCache>,
    mountpoint: &Path,
    kept: Kept,
    options: &MountOptions,
) -> Result<MountedImage, MountError> {
    let served = serve(runtime, image, cache, options)?;
    let serving = served.fs.tree().layout();
    if kept.layout != Some(serving) {
        return Err(MountError::LayoutChanged {
            mountpoint: mountpoint.display().to_string(),
            kept: kept
                .layout
                .map_or_else(|| "unknown".to_string(), |l| l.to_string()),
            serving,
        });
    }
    let file = std::fs::File::from(kept.fd);
    // Passthrough goes on from the ledger of the agents before this one on the connection,
    // which says which files are open in which mode, whether the last one left or was
    // killed; without it every open is served here.
    let device = file.try_clone().ok().map(std::os::fd::OwnedFd::from);
    let passing = match (connection_at(mountpoint), device) {
        (Ok(connection), Some(device)) => {
            served
                .fs
                .take_over_passthrough(&ledger_path(mountpoint), connection, device)
        }
        _ => false,
    };
    tracing::info!(mountpoint = %mountpoint.display(), passthrough = passing, "passthrough on the adopted connection");
    let mount = FuseMount::adopt(
        served.fs.clone(),
        mountpoint,
        "imgstream",
        file,
        options.threads,
    )?;
    raise_readahead_when_cached(&mount, &served);
    tracing::info!(mountpoint = %mountpoint.display(), "image served again on the mount a previous agent left");
    Ok(MountedImage {
        mount: Some(mount),
        served,
    })
}

/// Where the agents serving a mount keep its passthrough ledger.
fn ledger_path(mountpoint: &Path) -> std::path::PathBuf {
    let mut path = mountpoint.as_os_str().to_owned();
    path.push(".passthrough");
    path.into()
}

/// The FUSE connection mounted at `mountpoint`, by its device number, found in mountinfo
/// (a stat of the mount point would ask the filesystem, which may not be served yet).
fn connection_at(mountpoint: &Path) -> std::io::Result<u64> {
    let absolute = std::path::absolute(mountpoint)?;
    crate::mountinfo::device(&crate::mountinfo::read()?, &absolute).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{} is not in mountinfo", absolute.display()),
        )
    })
}

/// A reader that reads most of the image (or a file through) turns the background download
/// greedy, and then reads what it fetches at full speed: the files it opens from then on get
/// the kernel's readahead back, as they would on a mount that never held it.
fn restore_readahead_when_greedy(mount: &FuseMount, served: &ServedImage) {
    if let Some(readahead) = mount.readahead() {
        let readahead = readahead.clone();
        served.fetcher.when_greedy(move || readahead.restore());
    }
}

/// Once the background download has cached the whole image, readahead costs no network:
/// give the mount the large window cached reads want.
fn raise_readahead_when_cached(mount: &FuseMount, served: &ServedImage) {
    if let (Some(readahead), Some(progress)) = (mount.readahead(), &served.progress) {
        let readahead = readahead.clone();
        progress.when_finished(move || readahead.cached());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::gzip::{BuildOptions, MIN_SPAN};

    /// An image manifest whose configuration is `config` (no layers).
    fn manifest_with(config: Descriptor) -> manifest::Manifest {
        manifest::Manifest {
            schema_version: 2,
            media_type: None,
            config,
            layers: Vec::new(),
            annotations: Default::default(),
            extra: Default::default(),
        }
    }

    #[tokio::test]
    async fn an_images_run_is_taken_once_and_a_bad_configuration_is_none() {
        let good = br#"{"config":{"Entrypoint":["/bin/app"],"Cmd":["serve"]}}"#.to_vec();
        let garbage = b"\xff not json".to_vec();
        let missing = Descriptor::of(manifest::OCI_CONFIG, b"nobody serves this");
        let mut huge = Descriptor::of(manifest::OCI_CONFIG, b"{}");
        huge.size = crate::oci::config::MAX_CONFIG_BYTES + 1;
        let blobs = crate::testing::MemoryBlobs::default()
            .with(good.clone())
            .with(garbage.clone())
            .with(b"{}".to_vec());
        let source: Arc<dyn BlobSource> = Arc::new(blobs);
        let openings = LayerOpenings::default();
        let image = |n: u8| Digest::of(&[n]);
        let cases = [
            Descriptor::of(manifest::OCI_CONFIG, &good),
            Descriptor::of(manifest::OCI_CONFIG, &garbage),
            missing,
            huge,
        ];
        for (n, config) in cases.into_iter().enumerate() {
            openings.start_run(&source, image(n as u8), &manifest_with(config));
        }
        // A second opening of the first image asks nothing more; its answer is taken once.
        openings.start_run(
            &source,
            image(0),
            &manifest_with(Descriptor::of(manifest::OCI_CONFIG, b"{}")),
        );
        let run = openings
            .take_run(&image(0))
            .await
            .expect("the first image's run");
        assert_eq!(run.argv, ["/bin/app", "serve"]);
        assert!(openings.take_run(&image(0)).await.is_none(), "taken once");
        for n in 1..4 {
            assert!(openings.take_run(&image(n)).await.is_none(), "case {n}");
        }
        assert!(openings.take_run(&image(9)).await.is_none(), "never asked");
    }

    #[tokio::test]
    async fn a_manifest_that_cannot_be_fetched_ahead_lets_the_openings_go_on() {
        // A source with no manifests: the fetch ahead fails as a registry's 404 would.
        let source: Arc<dyn BlobSource> = Arc::new(crate::testing::MemoryBlobs::default());
        let (dir, cache) = crate::testing::scratch_cache("open-ahead");
        let openings = LayerOpenings::default();
        let image = "registry.example/team/app:v1".to_string();
        let ahead = || {
            openings.open_ahead(
                source.clone(),
                (image.clone(), "v1".into()),
                Platform::host(),
                cache.clone(),
                true,
            )
        };
        ahead();
        assert!(openings.resolving.len() == 1, "on its way until it ends");
        // A second pull of the image meanwhile starts nothing more.
        ahead();
        assert_eq!(openings.resolving.len(), 1);
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            openings.wait_resolving(&image),
        )
        .await
        .expect("a layer's opening waits for the failed fetch ahead, and no longer");
        assert_eq!(openings.resolving.len(), 0);
        assert_eq!(openings.underway.len(), 0, "no TOC asked for");
        assert!(
            crate::sync::lock(&openings.runs).is_empty(),
            "no run asked for"
        );
        // An image nobody fetches ahead is not waited for.
        tokio::time::timeout(
            std::time::Duration::from_millis(100),
            openings.wait_resolving("registry.example/team/other:v1"),
        )
        .await
        .expect("nothing to wait for");
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A tar of one small file, `name`.
    fn one_file_tar(name: &str) -> Vec<u8> {
        use crate::image::tar::{Kind, TarWriter, write_entry};
        let mut header = crate::image::tar::Header::new(name, Kind::Regular);
        header.size = 5;
        let mut tar = Vec::new();
        write_entry(&mut tar, &header, b"small").expect("to memory");
        tar.extend_from_slice(&TarWriter::end_of_archive());
        tar
    }

    #[tokio::test]
    async fn layers_with_no_toc_and_no_index_are_downloaded_whole_ahead_in_an_image_that_streams() {
        // A plain layer whose span index the cache keeps (so the image streams), and small
        // ones with none.
        let (tar, _) = crate::testing::layer_tar();
        let indexed = crate::testing::gzip(&tar, 6);
        let small = crate::testing::gzip(&one_file_tar("etc/motd"), 6);
        let alone = crate::testing::gzip(&one_file_tar("etc/issue"), 6);
        let descs = [&indexed, &small, &alone].map(|b| crate::testing::plain_descriptor(b));
        let blobs = crate::testing::MemoryBlobs::default()
            .with(indexed.clone())
            .with(small)
            .with(alone)
            .delayed(std::time::Duration::from_millis(20));
        let blobs = Arc::new(blobs);
        let source: Arc<dyn BlobSource> = blobs.clone();
        let (dir, cache) = crate::testing::scratch_cache("whole-ahead");
        let span_index = SpanIndex::build(indexed.as_slice(), BuildOptions { span: MIN_SPAN })
            .expect("the layer indexes");
        cache
            .put_span_index(&descs[0].digest, &span_index.encode().expect("it encodes"))
            .expect("kept");
        let subject = Descriptor::of(manifest::OCI_MANIFEST, b"the image's manifest");
        let mut image = manifest_with(Descriptor::of(manifest::OCI_CONFIG, b"{}"));
        image.layers = descs[..2].to_vec();
        let openings = LayerOpenings::default();
        openings.start(&source, (&subject, &image), None, &cache);
        openings.wait(&descs[1].digest).await;
        openings.wait(&descs[0].digest).await;
        assert_eq!(kept_form(&descs[0], &cache), Some(INDEX_KEPT));
        assert_eq!(
            kept_form(&descs[1], &cache),
            Some(WHOLE_KEPT),
            "downloaded ahead"
        );
        let downloads = |d: &Descriptor| {
            crate::sync::lock(&blobs.downloads)
                .get(&d.digest)
                .copied()
                .unwrap_or(0)
        };
        assert_eq!(downloads(&descs[1]), 1);
        // The small layer's opening takes the download, and asks the registry nothing.
        let ranges = blobs.ranges.load(Ordering::SeqCst);
        whole_layer(source.as_ref(), &descs[1], &cache, 1, "opened")
            .await
            .expect("opens from the cache");
        assert_eq!(blobs.ranges.load(Ordering::SeqCst), ranges);
        assert_eq!(downloads(&descs[1]), 1);

        // Two openings of one layer at once (two images sharing it) download it once.
        let (a, b) = tokio::join!(
            whole_layer(source.as_ref(), &descs[2], &cache, 0, "one image"),
            whole_layer(source.as_ref(), &descs[2], &cache, 2, "another"),
        );
        assert!(a.is_ok() && b.is_ok());
        assert_eq!(downloads(&descs[2]), 1);

        // An image none of whose layers streams: its layers are left to their openings (the
        // snapshotter's then leave them to containerd); `imgstream mount` downloads them.
        let (dir2, cache2) = crate::testing::scratch_cache("whole-ahead-none");
        image.layers = vec![descs[1].clone()];
        openings.start(&source, (&subject, &image), None, &cache2);
        openings.wait(&descs[1].digest).await;
        assert_eq!(kept_form(&descs[1], &cache2), None);
        let mounting = LayerOpenings {
            whole_ahead: WholeAhead::Always,
            ..LayerOpenings::default()
        };
        mounting.start(&source, (&subject, &image), None, &cache2);
        mounting.wait(&descs[1].digest).await;
        assert_eq!(kept_form(&descs[1], &cache2), Some(WHOLE_KEPT));
        let _ = std::fs::remove_dir_all(dir);
        let _ = std::fs::remove_dir_all(dir2);
    }

    #[tokio::test]
    async fn an_images_listing_is_asked_for_once_by_callers_that_come_while_it_is_asked() {
        let blobs = Arc::new(
            crate::testing::MemoryBlobs::default().delayed(std::time::Duration::from_millis(50)),
        );
        let subject = Digest::of(b"an image manifest nobody listed before");
        let lists = || image_listing(blobs.as_ref(), subject);
        let (a, b, c) = tokio::join!(lists(), lists(), lists());
        assert!(
            a.index.manifests.is_empty()
                && b.index.manifests.is_empty()
                && c.index.manifests.is_empty()
        );
        // The tag fallback (a source without the referrers API): asked once.
        let asked = crate::sync::lock(&blobs.manifests_asked).clone();
        assert_eq!(
            asked.get(&format!("sha256-{}", subject.hex())),
            Some(&1),
            "{asked:?}"
        );
        // And remembered: asked no more.
        lists().await;
        assert_eq!(crate::sync::lock(&blobs.manifests_asked).len(), 1);
        assert_eq!(
            crate::sync::lock(&blobs.manifests_asked)
                .values()
                .sum::<usize>(),
            1
        );
    }

    #[test]
    fn an_index_whose_windows_are_not_in_its_artifact_is_refused() {
        let (tar, _) = crate::testing::layer_tar();
        let layer = crate::testing::gzip(&tar, 6);
        let built = SpanIndex::build(layer.as_slice(), BuildOptions { span: MIN_SPAN })
            .expect("the layer indexes");
        let (core, windows) = built.encode_apart().expect("an index encodes");
        let apart = SpanIndex::decode(&core).expect("it decodes");
        let listed = Descriptor::of(WINDOWS_TYPE, &windows);
        assert!(windows_published(&apart, Some(std::slice::from_ref(&listed))).is_ok());
        assert!(windows_published(&apart, None).is_ok(), "from the cache");
        assert!(windows_published(&built, Some(&[])).is_ok(), "windows held");
        let err = windows_published(&apart, Some(&[])).expect_err("not in the artifact");
        assert!(err.contains("not published"), "{err}");
        let mut other = listed.clone();
        other.digest = crate::oci::digest::Digest::of(b"other windows");
        assert!(
            windows_published(&apart, Some(&[other])).is_err(),
            "another blob"
        );
        let mut shorter = listed.clone();
        shorter.size -= 1;
        assert!(
            windows_published(&apart, Some(&[shorter])).is_err(),
            "another size"
        );
        let mut typed = listed;
        typed.media_type = SPAN_INDEX_TYPE.into();
        assert!(
            windows_published(&apart, Some(&[typed])).is_err(),
            "another type"
        );
    }
}
