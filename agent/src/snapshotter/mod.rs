//! A containerd remote snapshotter: containerd's `Snapshots` gRPC service on a unix socket
//! (`[proxy_plugins]` in containerd's config), overlayfs snapshots on local directories, and
//! eStargz layers mounted lazily instead of unpacked.
//!
//! When containerd's CRI plugin pulls an image it asks, layer by layer, to `Prepare` a
//! snapshot labelled with the layer's target name (`containerd.io/snapshot.ref`), the image
//! and the layer digest (`containerd.io/snapshot/cri.*`). For an eStargz layer the snapshotter
//! mounts that one layer through the image filesystem (overlayfs lower form: whiteouts as
//! 0:0 devices) under its directory, records it as committed under the target name, and
//! answers `AlreadyExists`: containerd then skips downloading and unpacking it. Any other
//! layer gets an empty directory that containerd unpacks into and commits, as with
//! containerd's own overlayfs snapshotter. Containers' active snapshots are overlayfs mounts
//! over the parents' directories, lazy or not.
//!
//! Snapshot metadata lives in a redb database under the root, so it survives restarts; lazy
//! layers are mounted again when the snapshotter starts.
//!
//! Rooms: `service` (the gRPC calls), `store` (metadata, with its own error type), `mounts`
//! (overlay and bind mounts computed from paths), `lazy` (lazy layers and the FUSE keeper),
//! `filter` (containerd's list filters), `containerd` (the configuration drop-in).

mod containerd;
mod filter;
mod lazy;
mod mounts;
mod pulls;
mod service;
mod store;

pub mod proto {
    #![allow(clippy::all, unreachable_pub, missing_docs)]
    tonic::include_proto!("containerd.services.snapshots.v1");
}

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
};

pub use containerd::containerd_config;
use proto::snapshots_server::SnapshotsServer;
use store::MetaStore;

use crate::{
    cache::ChunkCache,
    fs::keeper::Keeper,
    mount::{MountOptions, MountedImage},
    registry::http::HttpConfig,
    shutdown::Shutdown,
};

/// The label naming the committed snapshot containerd wants for a layer.
pub const TARGET_REF: &str = "containerd.io/snapshot.ref";
/// Labels containerd's CRI plugin puts on layer snapshots (with
/// `disable_snapshot_annotations = false`).
pub const CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
pub const CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
pub const CRI_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
/// Set on the snapshots imgstream mounted lazily.
pub const REMOTE_LABEL: &str = "containerd.io/snapshot/remote";

/// How often the agent checks that its FUSE keeper holds every lazy layer's connection.
const KEEPER_RESYNC: std::time::Duration = std::time::Duration::from_secs(5);
/// How often the cache is pruned of images long gone, and how long unused they must be: a
/// layer whose snapshot containerd removed is released at once; this catches the rest (a
/// Remove the agent missed while it was down, images `imgstream mount` left in a shared
/// cache, metadata no image names).
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);
const PRUNE_UNUSED: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Errors starting or serving the snapshotter.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotterError {
    #[error("snapshotter directory {0}")]
    Dir(PathBuf, #[source] std::io::Error),
    #[error("snapshotter metadata under {0}")]
    Meta(PathBuf, #[source] store::MetaError),
    #[error("the snapshotter's chunk cache")]
    Cache(#[source] crate::cache::CacheError),
    #[error("snapshotter socket {0}")]
    Socket(PathBuf, #[source] std::io::Error),
    #[error("serving the snapshotter on {0}")]
    Serve(PathBuf, #[source] tonic::transport::Error),
}

/// How lazy layers are reached and served.
#[derive(Clone, Debug)]
pub struct SnapshotterConfig {
    pub root: PathBuf,
    pub socket: PathBuf,
    pub http: HttpConfig,
    pub mount: MountOptions,
    /// A FUSE keeper's socket ([`crate::fs::keeper`]): lazy layers then keep serving
    /// running containers across agent restarts.
    pub keeper: Option<PathBuf>,
    /// Where the layers' part of each pull is recorded, for pods' timelines.
    pub pull_log: Option<Arc<crate::starts::PullLog>>,
}

/// The service.
pub struct Snapshotter {
    config: SnapshotterConfig,
    meta: MetaStore,
    cache: Arc<ChunkCache>,
    runtime: tokio::runtime::Handle,
    /// Lazy layers mounted now, by snapshot id.
    lazy: Mutex<HashMap<u64, MountedImage>>,
    keeper: Option<Keeper>,
    /// Whether the keeper answered last time (to log changes, not every check).
    keeper_ok: std::sync::atomic::AtomicBool,
    /// Serialises metadata changes (containerd's calls for one image come in order anyway).
    write: tokio::sync::Mutex<()>,
    /// Per target snapshot, the lock its lazy mount holds while it talks to the registry.
    targets: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// How the layers containerd brought lately were served, by image repository, until the
    /// image proxy takes the figure of its pull ([`Snapshotter::take_served`]).
    served: Mutex<std::collections::VecDeque<(Repository, LayersServed)>>,
    /// The layers' part of each pull, for pods' timelines.
    spans: pulls::LayerSpans,
    /// TOCs of an image's layers fetched ahead of their own Prepare.
    openings: crate::mount::LayerOpenings,
    /// The readers of each image with lazy layers mounted, by manifest digest: the fetchers
    /// of an image's layers share them.
    image_readers: Mutex<HashMap<crate::oci::digest::Digest, crate::fetch::WeakImageReaders>>,
    /// The mounted lazy layers of each image, by manifest digest: where a layer's loader
    /// prefetch looks for the libraries it lacks.
    image_layers: Mutex<HashMap<crate::oci::digest::Digest, lazy::ImageLayers>>,
}

/// A registry and a repository in it.
type Repository = (String, String);

/// Images whose layers' serving is remembered at most, the oldest forgotten first (a pull
/// nobody takes the figure of, through no proxy).
const SERVED_IMAGES: usize = 1024;

/// How the layers one pull brought were served (those already on the node are not
/// prepared again, and not counted).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LayersServed {
    /// Mounted lazily.
    pub lazy: u32,
    /// Unpacked by containerd: not streamable, or a lazy mount that failed.
    pub unpacked: u32,
}

impl LayersServed {
    /// In a word: `streamed` (every layer lazy), `unpacked` (none), or `partly-streamed`.
    pub fn kind(self) -> &'static str {
        match (self.lazy, self.unpacked) {
            (0, _) => "unpacked",
            (_, 0) => "streamed",
            _ => "partly-streamed",
        }
    }
}

/// The registry and repository of `image`, a reference as containerd or kubelet write it.
fn repository(image: &str) -> Option<Repository> {
    match crate::oci::reference::ImageRef::parse(image).ok()? {
        crate::oci::reference::ImageRef::Registry {
            registry,
            repository,
            ..
        } => Some((registry, repository)),
        crate::oci::reference::ImageRef::Layout { .. } => None,
    }
}

impl std::fmt::Debug for Snapshotter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshotter")
            .field("root", &self.config.root)
            .finish_non_exhaustive()
    }
}

impl Snapshotter {
    /// The chunk cache every lazy layer of this snapshotter shares.
    pub fn cache(&self) -> &Arc<ChunkCache> {
        &self.cache
    }

    /// What this snapshotter takes on disk, and its inodes: the chunk cache (the lazy
    /// layers' bytes, as `du` counts them) and every other snapshot's directory (unpacked
    /// layers, containers' writable layers). kubelet's figure, through the image proxy:
    /// containerd measures a committed snapshot once, when a lazy layer has hardly anything
    /// cached yet.
    pub fn disk_usage(&self) -> (u64, u64) {
        let mut bytes = self.cache.usage();
        let mut inodes = 0;
        let snapshots = self.meta.all().unwrap_or_else(|err| {
            tracing::warn!(%err, "snapshot metadata unreadable: disk usage counts the cache alone");
            Vec::new()
        });
        for (_, snap) in snapshots {
            let layer = snap
                .remote
                .as_ref()
                .and_then(|r| r.layer.parse::<crate::oci::digest::Digest>().ok());
            match layer {
                Some(layer) => inodes += self.cache.image_usage(&layer).1,
                None => {
                    let (b, i) = mounts::disk_usage(&self.dir(snap.id).join("fs"));
                    bytes += u64::try_from(b).unwrap_or(0);
                    inodes += u64::try_from(i).unwrap_or(0);
                }
            }
        }
        (bytes, inodes)
    }

    /// Notes that a layer of `image` was mounted lazily (`lazy`) or left to containerd.
    fn note_served(&self, image: &str, lazy: bool) {
        let event = if lazy {
            pulls::LayerEvent::Mounted
        } else {
            pulls::LayerEvent::Unpacking
        };
        self.layer_span(image, event);
        let Some(key) = repository(image) else {
            return;
        };
        let mut served = crate::sync::lock(&self.served);
        let at = match served.iter().position(|(k, _)| *k == key) {
            Some(at) => at,
            None => {
                if served.len() == SERVED_IMAGES {
                    served.pop_front();
                }
                served.push_back((key, LayersServed::default()));
                served.len() - 1
            }
        };
        let counts = &mut served[at].1;
        if lazy {
            counts.lazy += 1;
        } else {
            counts.unpacked += 1;
        }
    }

    /// How the layers brought for `image` (its repository) since the last call were served,
    /// if any were prepared; forgotten once taken.
    /// Notes a layer of `image` in its pull's span, and records the span in the pull log.
    fn layer_span(&self, image: &str, event: pulls::LayerEvent) {
        let now = crate::time::unix_ns(std::time::SystemTime::now());
        let span = self.spans.touch(image, event, now);
        if let Some(log) = &self.config.pull_log {
            log.record(span);
        }
    }

    pub fn take_served(&self, image: &str) -> Option<LayersServed> {
        let key = repository(image)?;
        let mut served = crate::sync::lock(&self.served);
        let at = served.iter().position(|(k, _)| *k == key)?;
        served.remove(at).map(|(_, counts)| counts)
    }

    /// Prunes the cache of images long gone: layers no snapshot of this snapshotter serves,
    /// unused for [`PRUNE_UNUSED`].
    fn prune_cache(&self) {
        let Ok(snapshots) = self.meta.all() else {
            return;
        };
        let keep: std::collections::HashSet<crate::oci::digest::Digest> = snapshots
            .iter()
            .filter_map(|(_, s)| s.remote.as_ref()?.layer.parse().ok())
            .collect();
        let (images, bytes) = self.cache.prune(&keep, PRUNE_UNUSED);
        if images > 0 || bytes > 0 {
            tracing::info!(images, bytes, "cache pruned of images long gone");
        }
    }

    /// Opens the root (metadata and snapshot directories) and mounts the lazy layers again.
    pub async fn open(config: SnapshotterConfig) -> Result<Arc<Self>, SnapshotterError> {
        let root = config.root.clone();
        let snapshots = config.root.join("snapshots");
        // Private all the way down to each snapshot: containers' writable layers and the
        // setuid binaries of unpacked layers are reached only through mounts, never by path.
        crate::private::own_dir(&snapshots)
            .map_err(|e| SnapshotterError::Dir(snapshots.clone(), e))?;
        let meta = MetaStore::open(&config.root.join("metadata.redb"))
            .map_err(|e| SnapshotterError::Meta(root.clone(), e))?;
        let cache =
            Arc::new(ChunkCache::open(&config.mount.cache).map_err(SnapshotterError::Cache)?);
        let this = Arc::new(Self {
            meta,
            cache,
            runtime: tokio::runtime::Handle::current(),
            lazy: Mutex::new(HashMap::new()),
            keeper: config.keeper.as_deref().map(Keeper::new),
            keeper_ok: std::sync::atomic::AtomicBool::new(true),
            write: tokio::sync::Mutex::new(()),
            targets: Mutex::new(HashMap::new()),
            served: Mutex::new(std::collections::VecDeque::new()),
            spans: Default::default(),
            openings: Default::default(),
            image_readers: Mutex::new(HashMap::new()),
            image_layers: Mutex::new(HashMap::new()),
            config,
        });
        this.remount_all()
            .await
            .map_err(|e| SnapshotterError::Meta(root, e))?;
        Ok(this)
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.config.root.join("snapshots").join(id.to_string())
    }

    /// Binds the configured socket (replacing a stale one).
    pub fn listen(&self) -> Result<tokio::net::UnixListener, SnapshotterError> {
        let socket = &self.config.socket;
        let err = |e| SnapshotterError::Socket(socket.clone(), e);
        if let Some(dir) = socket.parent() {
            crate::private::create_dir(dir).map_err(err)?;
        }
        let _ = std::fs::remove_file(socket);
        let listener = tokio::net::UnixListener::bind(socket).map_err(err)?;
        crate::private::restrict(socket, crate::private::FILE_MODE).map_err(err)?;
        tracing::info!(socket = %socket.display(), root = %self.config.root.display(), "snapshotter listening");
        Ok(listener)
    }

    /// Serves the API on `listener` (from [`Snapshotter::listen`]) until `shutdown`.
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::UnixListener,
        shutdown: Shutdown,
    ) -> Result<(), SnapshotterError> {
        let socket = self.config.socket.clone();
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        let service = service::Service(self.clone());
        let resync = self
            .keeper
            .is_some()
            .then(|| self.every(KEEPER_RESYNC, &shutdown, Self::resync_keeper));
        let prune = self.every(PRUNE_EVERY, &shutdown, Self::prune_cache);
        let result = tonic::transport::Server::builder()
            .add_service(SnapshotsServer::new(service))
            .serve_with_incoming_shutdown(incoming, shutdown.triggered())
            .await;
        if let Some(task) = resync {
            let _ = task.await;
        }
        let _ = prune.await;
        let _ = std::fs::remove_file(&socket);
        let mounts = std::mem::take(&mut *crate::sync::lock(&self.lazy));
        if self.keeper.is_some() {
            // The keeper holds their connections: the mounts stay, requests wait in the
            // kernel, and the next agent serves them.
            let count = mounts.len();
            let _ = tokio::task::spawn_blocking(move || {
                for mounted in mounts.into_values() {
                    mounted.leave_mounted();
                }
            })
            .await;
            tracing::info!(
                lazy_layers = count,
                "lazy layers left mounted for the next agent"
            );
        } else {
            // Without a keeper, the mounts die with this process: unmount them so that
            // nothing new starts on a dead FUSE connection.
            drop_mounts(mounts.into_values().collect()).await;
        }
        result.map_err(|e| SnapshotterError::Serve(socket, e))
    }
}

impl Snapshotter {
    /// Runs `work` on this snapshotter every `period`, the first time at once, off the async
    /// workers, until `stop`.
    fn every(
        self: &Arc<Self>,
        period: std::time::Duration,
        stop: &Shutdown,
        work: fn(&Self),
    ) -> tokio::task::JoinHandle<()> {
        let (this, stop) = (self.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            while !stop.is_triggered() {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.triggered() => break,
                }
                let this = this.clone();
                let _ = tokio::task::spawn_blocking(move || work(&this)).await;
            }
        })
    }
}

/// Unmounts lazy layers and stops their background downloads, off the async workers: the
/// downloads wait on fetches that need those workers to finish.
async fn drop_mounts(mounts: Vec<MountedImage>) {
    if mounts.is_empty() {
        return;
    }
    let _ = tokio::task::spawn_blocking(move || drop(mounts)).await;
}

#[cfg(test)]
mod tests;
