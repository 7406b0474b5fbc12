//! Lazy layers: an eStargz layer mounted through the image filesystem (one layer, overlayfs
//! lower form) at its snapshot's directory instead of unpacked; mounted again when the
//! snapshotter starts, or served again on the FUSE connection a keeper held across the
//! restart; and the keeper kept holding every lazy layer's connection.

use std::{
    collections::BTreeMap,
    os::fd::{AsFd as _, OwnedFd},
    sync::{Arc, Mutex, Weak},
};

use crate::fs::{ImageFs, keeper::Kept};

use super::{Snapshotter, store::Remote};
use crate::{
    fs::fusedev::umount_lazy,
    mount::{self, MountError, MountOptions},
    oci::{
        digest::{Digest, DigestError},
        reference::{ImageRef, ReferenceError},
    },
    registry::{RegistryError, open_sink, open_source},
};

/// How long a lazy layer's manifest, footer and TOC may take together before Prepare gives
/// up on it (containerd then unpacks the layer: a full pull, slower but sure).
const OPEN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

/// Errors mounting a lazy layer.
#[derive(Debug, thiserror::Error)]
pub(super) enum LazyError {
    #[error("the layer's image reference")]
    Reference(#[from] ReferenceError),
    #[error("the layer's digest")]
    Digest(#[from] DigestError),
    #[error("reaching the layer's registry")]
    Source(#[source] RegistryError),
    #[error("opening the layer")]
    Open(#[source] MountError),
    #[error("the manifest, footer and TOC did not arrive within {0} s")]
    Deadline(u64),
    #[error("preparing the mount point")]
    Dir(#[source] std::io::Error),
    #[error("the mount task failed")]
    Task(#[source] tokio::task::JoinError),
    #[error("mounting the layer")]
    Mount(#[source] MountError),
}

impl LazyError {
    /// Counts this failure in `imgstream_layers_opened_total` by its reason: the layer is
    /// unpacked by containerd instead.
    pub(super) fn count_fallback(&self) {
        let layers = &crate::mount::LAYERS_OPENED;
        let counter = if self.refused_credentials() {
            &layers.fallback_credentials
        } else if matches!(self, Self::Deadline(_)) {
            &layers.fallback_deadline
        } else {
            &layers.fallback_other
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether a registry refused the agent's credentials, or wanted some it had none of.
    pub(super) fn refused_credentials(&self) -> bool {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(err) = source {
            // `MountError::Registry` is transparent: its source is the registry error's own.
            let registry = err.downcast_ref::<RegistryError>().or_else(|| {
                match err.downcast_ref::<MountError>() {
                    Some(MountError::Registry(inner)) => Some(inner),
                    _ => None,
                }
            });
            if let Some(RegistryError::Unauthorized { .. }) = registry {
                return true;
            }
            source = err.source();
        }
        false
    }
}

/// An image's lazily mounted layers, topmost first, each with its position in the image.
pub(super) type ImageLayers = Arc<Mutex<Vec<(usize, Weak<ImageFs>)>>>;

impl Snapshotter {
    /// kubelet's `PullImage` of `image` was seen (the CRI image proxy): its manifest, its
    /// layers' TOCs and what it runs are fetched while containerd still fetches the manifest
    /// and configuration itself, and connections to its registry are opened for the first
    /// reads (see [`mount::LayerOpenings::open_ahead`]). An image that is no registry's, or
    /// whose registry cannot be reached, is left to its layers' openings.
    pub fn open_ahead(&self, image: &str) {
        let Ok(parsed @ ImageRef::Registry { .. }) = ImageRef::parse(image) else {
            return;
        };
        let Some(reference) = parsed.manifest_reference() else {
            return;
        };
        let source = match open_source(&parsed, &self.config.http) {
            Ok(source) => source,
            Err(err) => {
                tracing::debug!(%image, %err, "pull seen, but its registry cannot be reached ahead");
                return;
            }
        };
        let preconnecting = source.clone();
        tokio::spawn(async move { preconnecting.preconnect(mount::PRECONNECT).await });
        let key = parsed.to_string();
        // The requests are the pull's openings: journaled as a layer's opening would have them.
        let source: Arc<dyn crate::registry::BlobSource> = match &self.config.mount.fetch_journal {
            Some(journal) => Arc::new(crate::fetch::journal::Journaled::new(
                source,
                journal.clone(),
                &key,
            )),
            None => source,
        };
        self.openings.open_ahead(
            source,
            (key, reference),
            self.config.mount.platform.clone(),
            self.cache.clone(),
            self.config.mount.fs.loader_prefetch,
        );
    }

    /// Adds `fs`, layer `position` of image `manifest`, to the image's mounted layers, and
    /// has its loader prefetch look for the libraries it lacks in the others, topmost first
    /// (as the container's merged view finds them; a library an upper layer deleted may be
    /// walked from a lower one, which costs its bytes, nothing else).
    fn join_image_layers(
        &self,
        manifest: &Digest,
        position: usize,
        fs: &Arc<ImageFs>,
    ) -> ImageLayers {
        let layers = {
            let mut all = crate::sync::lock(&self.image_layers);
            // Images none of whose layers is mounted any more.
            all.retain(|_, layers| {
                crate::sync::lock(layers)
                    .iter()
                    .any(|(_, fs)| fs.strong_count() > 0)
            });
            all.entry(*manifest).or_default().clone()
        };
        {
            let mut mounted = crate::sync::lock(&layers);
            mounted.retain(|(at, fs)| *at != position && fs.strong_count() > 0);
            mounted.push((position, Arc::downgrade(fs)));
            mounted.sort_by_key(|(at, _)| std::cmp::Reverse(*at));
        }
        let all = layers.clone();
        fs.set_other_layers(Arc::new(move |mut wanted: Vec<Vec<String>>| {
            let others: Vec<Arc<ImageFs>> = crate::sync::lock(&all)
                .iter()
                .filter(|(at, _)| *at != position)
                .filter_map(|(_, fs)| fs.upgrade())
                .collect();
            for other in others {
                if wanted.is_empty() {
                    break;
                }
                let mut found = other.walk_from_libraries(&wanted).into_iter();
                wanted.retain(|_| !found.next().unwrap_or(false));
            }
        }));
        layers
    }

    /// The readers of image `manifest` (of `image_bytes` compressed bytes), shared by the
    /// fetchers of its mounted layers: those of a mounted layer, or new ones.
    fn image_readers(&self, manifest: &Digest, image_bytes: u64) -> crate::fetch::ImageReaders {
        let mut all = crate::sync::lock(&self.image_readers);
        if let Some(readers) = all.get(manifest).and_then(|weak| weak.upgrade()) {
            return readers;
        }
        // Images none of whose layers is mounted any more.
        all.retain(|_, weak| weak.upgrade().is_some());
        let readers = crate::fetch::ImageReaders::new(image_bytes);
        all.insert(*manifest, readers.downgrade());
        readers
    }

    /// Mounts layer `remote` lazily at snapshot `id`'s directory, or serves it again on the
    /// connection `kept` (a keeper held it while the agent restarted). `Ok(false)`: not
    /// eStargz (containerd unpacks it). `labels`: the snapshot's, where containerd passes an
    /// eStargz layer's TOC digest annotation.
    pub(super) async fn mount_lazy(
        &self,
        id: u64,
        remote: &Remote,
        kept: Option<Kept>,
        labels: &BTreeMap<String, String>,
    ) -> Result<bool, LazyError> {
        let image = ImageRef::parse(&remote.image_ref)?;
        let source = open_source(&image, &self.config.http).map_err(LazyError::Source)?;
        // The opening's requests (manifest, footer, TOC) are on the pull's path: journaled.
        let journaled = self.config.mount.fetch_journal.as_ref().map(|journal| {
            Arc::new(crate::fetch::journal::Journaled::new(
                source.clone(),
                journal.clone(),
                &remote.image_ref,
            ))
        });
        let source: Arc<dyn crate::registry::BlobSource> = match &journaled {
            Some(journaled) => journaled.clone(),
            None => source,
        };
        let reference = remote
            .manifest
            .clone()
            .or_else(|| image.manifest_reference())
            .unwrap_or_default();
        let layer: Digest = remote.layer.parse()?;
        // What the image runs is asked for by the opening, beside the TOC, not after the
        // mount: the loader prefetch then starts from the program as soon as the top layer
        // is mounted (a 50 ms trace: the configuration's round trip came after the mount,
        // and the walk started 20 ms before the program's first read).
        let ask_run = kept.is_none() && self.config.mount.fs.loader_prefetch;
        // Every response has a per-frame timeout; a registry that trickles bytes passes it
        // forever, so the whole opening has one deadline too.
        // A pull seen by the CRI image proxy may be fetching the manifest and TOCs already:
        // waited for, they are then found in the cache.
        let opened = tokio::time::timeout(OPEN_DEADLINE, async {
            self.openings.wait_resolving(&image.to_string()).await;
            mount::open_one_layer(
                source,
                &reference,
                &self.config.mount.platform,
                &self.cache,
                (
                    &layer,
                    ask_run,
                    labels.contains_key(crate::image::estargz::TOC_DIGEST_ANNOTATION),
                ),
                &self.openings,
            )
            .await
        })
        .await
        .map_err(|_| LazyError::Deadline(OPEN_DEADLINE.as_secs()))?
        .map_err(LazyError::Open)?;
        if let Some(journaled) = &journaled {
            journaled.opened();
        }
        let Some(mut opened) = opened else {
            return Ok(false);
        };
        // The image's other layers are mounted each on its own too: their fetchers share
        // the image's readers.
        opened.readers = Some(self.image_readers(&opened.manifest.digest, opened.image_bytes));
        let (manifest, position) = (opened.manifest.digest, opened.layer_position);
        if self.config.mount.share_learned == crate::fetch::learn::share::Sharing::Publish {
            opened.sink = Some(open_sink(&image, &self.config.http).map_err(LazyError::Source)?);
        }
        // containerd prepares an image's layers bottom first: once the top one is mounted, a
        // container of the image is about to start, and its program is looked for in all of
        // them, topmost first (a walk started from a lower layer would miss the libraries of
        // the layers not mounted yet).
        let top = position.is_none_or(|(at, count)| at + 1 >= count);
        let fs = self.dir(id).join("fs");
        if kept.is_none() {
            // A mount left by a snapshotter that died: its FUSE connection is gone.
            let _ = umount_lazy(&fs);
            let dir = fs.parent().unwrap_or(&fs);
            crate::private::own_dir(dir)
                .and_then(|()| std::fs::create_dir_all(&fs))
                .map_err(LazyError::Dir)?;
        }
        let options = MountOptions {
            view: crate::fs::View::Layer(0),
            image_name: Some(remote.image_ref.clone()),
            ..self.config.mount.clone()
        };
        let (runtime, cache) = (self.runtime.clone(), self.cache.clone());
        let mountpoint = fs.clone();
        let mounted = tokio::task::spawn_blocking(move || match kept {
            Some(kept) => mount::adopt(runtime, opened, cache, &fs, kept, &options),
            None => mount::mount(runtime, opened, cache, &fs, &options),
        })
        .await
        .map_err(LazyError::Task)?
        .map_err(LazyError::Mount)?;
        if let (Some(keeper), Some(fd)) = (&self.keeper, mounted.fuse_fd())
            && let Err(err) = keeper.put(&mountpoint.display().to_string(), &mounted.layout(), fd)
        {
            tracing::warn!(%err, keeper = %keeper.socket().display(), mountpoint = %mountpoint.display(), "FUSE keeper unreachable: this layer's containers will lose it if the agent restarts");
        }
        let image_layers =
            position.map(|(at, _)| self.join_image_layers(&manifest, at, &mounted.fs));
        if top && ask_run {
            let openings = self.openings.clone();
            let views: Vec<Arc<ImageFs>> = match &image_layers {
                Some(layers) => crate::sync::lock(layers)
                    .iter()
                    .filter_map(|(_, fs)| fs.upgrade())
                    .collect(),
                None => vec![mounted.fs.clone()],
            };
            tokio::spawn(async move {
                let Some(run) = openings.take_run(&manifest).await else {
                    return;
                };
                let candidates = run.program_candidates();
                for (fs, at) in views.iter().zip(0..) {
                    if let Some(program) = fs.walk_from_program(&candidates) {
                        tracing::info!(
                            program,
                            layers_above = at,
                            "the image's program is in a mounted layer: the loader prefetch starts from it before a container does"
                        );
                        break;
                    }
                }
            });
        }
        crate::sync::lock(&self.lazy).insert(id, mounted);
        Ok(true)
    }

    /// Mounts every lazy layer of the metadata again (at start), adopting the connections a
    /// keeper held; a kept connection that cannot be served again is ended, so that its
    /// containers get errors instead of waiting forever.
    pub(super) async fn remount_all(&self) -> Result<(), super::store::MetaError> {
        let remotes: Vec<_> = self
            .meta
            .all()?
            .into_iter()
            .filter(|(_, s)| s.remote.is_some())
            .collect();
        // Connections a keeper held through a restart, by mount point.
        let mut held = match &self.keeper {
            Some(keeper) => keeper.get().unwrap_or_else(|err| {
                tracing::warn!(%err, "FUSE keeper unreachable: lazy layers are mounted afresh, and running containers lose theirs");
                Default::default()
            }),
            None => Default::default(),
        };
        for (name, snap) in remotes {
            let Some(remote) = &snap.remote else { continue };
            let fs = self.dir(snap.id).join("fs");
            let kept = held
                .remove(&fs.display().to_string())
                .filter(|_| crate::fs::keeper::is_fuse_mount(&fs));
            let mut adopting = kept.is_some();
            let mut outcome = self.mount_lazy(snap.id, remote, kept, &snap.labels).await;
            if let Err(LazyError::Mount(err @ MountError::LayoutChanged { .. })) = &outcome {
                // Serving it would answer the kernel's inode numbers with other files: end
                // the kept connection (its containers get errors, not wrong bytes) and mount
                // the layer afresh for the containers to come.
                tracing::warn!(snapshot = %name, %err, "lazy layer mounted afresh: its running containers lose their mount");
                if let Some(keeper) = &self.keeper {
                    let _ = keeper.del(&fs.display().to_string());
                }
                let _ = umount_lazy(&fs);
                adopting = false;
                outcome = self.mount_lazy(snap.id, remote, None, &snap.labels).await;
            }
            let served = match outcome {
                Ok(true) if adopting => {
                    tracing::info!(snapshot = %name, layer = %remote.layer, "lazy layer served again: its containers kept their mount");
                    true
                }
                Ok(true) => {
                    tracing::info!(snapshot = %name, layer = %remote.layer, "lazy layer mounted again");
                    true
                }
                Ok(false) => {
                    tracing::warn!(snapshot = %name, "lazy layer is no longer eStargz or in its image");
                    false
                }
                Err(err) => {
                    let err = crate::error_chain(&err);
                    tracing::warn!(snapshot = %name, %err, "lazy layer could not be mounted again; its containers will fail to read it");
                    false
                }
            };
            if adopting && !served {
                if let Some(keeper) = &self.keeper {
                    let _ = keeper.del(&fs.display().to_string());
                }
                let _ = umount_lazy(&fs);
            }
        }
        if let Some(keeper) = &self.keeper {
            for key in held.keys() {
                if let Err(err) = keeper.del(key) {
                    tracing::debug!(%err, key, "stale keeper entry not released");
                }
            }
        }
        Ok(())
    }

    /// Hands the keeper every lazy layer's connection it does not hold: after it restarted
    /// (it then holds nothing), or when it was unreachable at mount time.
    pub(super) fn resync_keeper(&self) {
        let Some(keeper) = &self.keeper else { return };
        let held = match keeper.get() {
            Ok(held) => held,
            Err(err) => {
                if self
                    .keeper_ok
                    .swap(false, std::sync::atomic::Ordering::Relaxed)
                {
                    tracing::warn!(%err, keeper = %keeper.socket().display(), "FUSE keeper unreachable: running containers would lose their lazy layers if the agent restarted now");
                }
                return;
            }
        };
        if !self
            .keeper_ok
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::info!(keeper = %keeper.socket().display(), "FUSE keeper reachable");
        }
        // Duplicates, so that the keeper is talked to without holding the lock.
        let missing: Vec<(String, OwnedFd, _)> = crate::sync::lock(&self.lazy)
            .iter()
            .filter_map(|(id, mounted)| {
                let key = self.dir(*id).join("fs").display().to_string();
                if held.contains_key(&key) {
                    return None;
                }
                let fd = mounted.fuse_fd()?.try_clone_to_owned().ok()?;
                Some((key, fd, mounted.layout()))
            })
            .collect();
        for (key, fd, layout) in missing {
            match keeper.put(&key, &layout, fd.as_fd()) {
                Ok(()) => {
                    tracing::info!(mountpoint = %key, "lazy layer's connection handed to the FUSE keeper")
                }
                Err(err) => {
                    tracing::debug!(%err, mountpoint = %key, "FUSE keeper did not take a connection")
                }
            }
        }
    }
}
