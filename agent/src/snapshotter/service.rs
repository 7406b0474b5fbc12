//! containerd's `Snapshots` gRPC service: each call checked against the metadata and answered
//! with containerd's status codes. `Prepare` of a layer snapshot that containerd's CRI plugin
//! labelled with its image and layer tries a lazy mount first ([`super::lazy`]).

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::Arc,
    time::SystemTime,
};

use tonic::{Request, Response, Status};

use super::{
    CRI_IMAGE_REF, CRI_LAYER_DIGEST, CRI_MANIFEST_DIGEST, REMOTE_LABEL, Snapshotter, TARGET_REF,
    drop_mounts,
    filter::Filter,
    mounts,
    proto::{
        CleanupRequest, CommitSnapshotRequest, Info, Kind, ListSnapshotsRequest,
        ListSnapshotsResponse, Mount, MountsRequest, MountsResponse, PrepareSnapshotRequest,
        PrepareSnapshotResponse, RemoveSnapshotRequest, StatSnapshotRequest, StatSnapshotResponse,
        UpdateSnapshotRequest, UpdateSnapshotResponse, UsageRequest, UsageResponse,
        ViewSnapshotRequest, ViewSnapshotResponse, snapshots_server::Snapshots,
    },
    store::{MetaError, Remote, Snapshot},
};
use crate::fs::fusedev::umount_lazy;

fn now_ns() -> u64 {
    crate::time::unix_ns(SystemTime::now())
}

fn timestamp(ns: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ns / 1_000_000_000) as i64,
        nanos: (ns % 1_000_000_000) as i32,
    }
}

fn internal<E: std::fmt::Display>(e: E) -> Status {
    Status::internal(e.to_string())
}

impl From<MetaError> for Status {
    fn from(e: MetaError) -> Self {
        Status::internal(crate::error_chain(&e))
    }
}

impl Snapshotter {
    /// The parents' layer directories, nearest first.
    fn lowers(&self, parent: &str) -> Result<Vec<PathBuf>, Status> {
        let mut out = Vec::new();
        let mut name = parent.to_string();
        while !name.is_empty() {
            let snap = self.meta.get(&name)?.ok_or_else(|| {
                Status::not_found(format!("parent snapshot {name} does not exist"))
            })?;
            out.push(self.dir(snap.id).join("fs"));
            name = snap.parent;
            if out.len() > 512 {
                return Err(Status::failed_precondition(
                    "snapshot chain longer than 512",
                ));
            }
        }
        Ok(out)
    }

    fn mounts_of(&self, snap: &Snapshot) -> Result<Vec<Mount>, Status> {
        let lowers = self.lowers(&snap.parent)?;
        Ok(mounts::mounts(
            snap.kind == Kind::Active as i32,
            &self.dir(snap.id),
            &lowers,
        ))
    }

    fn info(name: &str, snap: &Snapshot) -> Info {
        Info {
            name: name.into(),
            parent: snap.parent.clone(),
            kind: snap.kind,
            created_at: Some(timestamp(snap.created_ns)),
            updated_at: Some(timestamp(snap.updated_ns)),
            labels: snap.labels.clone().into_iter().collect(),
        }
    }

    async fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
        kind: Kind,
    ) -> Result<Vec<Mount>, Status> {
        let labels: BTreeMap<String, String> = labels.into_iter().collect();
        let lazy = {
            let _write = self.write.lock().await;
            self.check_prepare(key, parent)?;
            match (
                kind,
                labels.get(TARGET_REF),
                labels.get(CRI_IMAGE_REF),
                labels.get(CRI_LAYER_DIGEST),
            ) {
                (Kind::Active, Some(target), Some(image_ref), Some(layer)) => {
                    if self.meta.get(target)?.is_some() {
                        return Err(Status::already_exists(format!(
                            "target snapshot {target} exists"
                        )));
                    }
                    let remote = Remote {
                        image_ref: image_ref.clone(),
                        manifest: labels.get(CRI_MANIFEST_DIGEST).cloned(),
                        layer: layer.clone(),
                    };
                    Some((target.clone(), remote, self.meta.next_id()?))
                }
                _ => None,
            }
        };
        // The lazy mount talks to the registry: without the write lock, so that a slow
        // registry holds up only the Prepares of this target, not every call on the node.
        if let Some((target, remote, id)) = lazy {
            self.prepare_lazy(&target, &remote, id, &labels, parent)
                .await?;
        }
        let _write = self.write.lock().await;
        self.check_prepare(key, parent)?;
        let id = self.meta.next_id()?;
        let dir = self.dir(id);
        // The snapshot's own directory is private; `fs` keeps the usual 0755, as it is the
        // root directory containers see.
        crate::private::own_dir(&dir).map_err(internal)?;
        for sub in ["fs", "work"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(internal)?;
        }
        let now = now_ns();
        let snap = Snapshot {
            id,
            kind: kind as i32,
            parent: parent.to_string(),
            labels,
            created_ns: now,
            updated_ns: now,
            remote: None,
        };
        self.meta.apply(&[(key, Some(&snap))])?;
        self.mounts_of(&snap)
    }

    /// What Prepare needs of `key` and `parent`: a new key, a committed parent.
    fn check_prepare(&self, key: &str, parent: &str) -> Result<(), Status> {
        if key.is_empty() {
            return Err(Status::invalid_argument("empty snapshot key"));
        }
        if self.meta.get(key)?.is_some() {
            return Err(Status::already_exists(format!("snapshot {key} exists")));
        }
        if !parent.is_empty() {
            let p = self.meta.get(parent)?.ok_or_else(|| {
                Status::not_found(format!("parent snapshot {parent} does not exist"))
            })?;
            if p.kind != Kind::Committed as i32 {
                return Err(Status::failed_precondition(format!(
                    "parent {parent} is not committed"
                )));
            }
        }
        Ok(())
    }

    /// Mounts layer `remote` lazily as snapshot `target` (id `id`). `Err(AlreadyExists)` is
    /// success as containerd reads it ("this layer is there"); `Ok` means it could not be
    /// mounted lazily, and containerd unpacks it into the snapshot Prepare makes.
    async fn prepare_lazy(
        &self,
        target: &str,
        remote: &Remote,
        id: u64,
        labels: &BTreeMap<String, String>,
        parent: &str,
    ) -> Result<(), Status> {
        let exists =
            || Status::already_exists(format!("target snapshot {target} exists (mounted lazily)"));
        self.layer_span(&remote.image_ref, super::pulls::LayerEvent::Preparing);
        // One lazy mount of a target at a time: a second Prepare of it waits for the first.
        let serial = self.target_lock(target);
        let _target = serial.lock().await;
        if self.meta.get(target)?.is_some() {
            return Err(exists());
        }
        let layer = &remote.layer;
        let outcome = self.mount_lazy(id, remote, None, labels).await;
        let result = match outcome {
            Ok(true) => {
                let mut labels = labels.clone();
                labels.insert(REMOTE_LABEL.into(), "imgstream".into());
                let now = now_ns();
                let snap = Snapshot {
                    id,
                    kind: Kind::Committed as i32,
                    parent: parent.to_string(),
                    labels,
                    created_ns: now,
                    updated_ns: now,
                    remote: Some(remote.clone()),
                };
                let stored = {
                    let _write = self.write.lock().await;
                    self.meta.apply(&[(target, Some(&snap))])
                };
                match stored {
                    Ok(()) => {
                        tracing::info!(%target, %layer, image = %remote.image_ref, "layer mounted lazily");
                        self.note_served(&remote.image_ref, true);
                        // containerd takes AlreadyExists on the target as "this layer is there".
                        Err(exists())
                    }
                    Err(err) => {
                        self.unmount_lazy(id).await;
                        Err(err.into())
                    }
                }
            }
            Ok(false) => {
                tracing::debug!(%layer, "not eStargz: unpacked by containerd");
                self.note_served(&remote.image_ref, false);
                let _ = std::fs::remove_dir_all(self.dir(id));
                Ok(())
            }
            Err(err) => {
                err.count_fallback();
                self.note_served(&remote.image_ref, false);
                let credentials = err.refused_credentials();
                let err = crate::error_chain(&err);
                if credentials {
                    tracing::warn!(%layer, %err, image = %remote.image_ref, "lazy mount refused by the registry: the agent has no credentials for this repository (a private image needs the CRI image proxy, --cri-image-proxy, or --auth-file); containerd unpacks the layer");
                } else {
                    tracing::warn!(%layer, %err, "lazy mount failed; containerd unpacks the layer");
                }
                let _ = std::fs::remove_dir_all(self.dir(id));
                Ok(())
            }
        };
        drop(_target);
        self.release_target_lock(target, serial);
        result
    }

    /// The lock that serialises lazy mounts of `target`.
    fn target_lock(&self, target: &str) -> Arc<tokio::sync::Mutex<()>> {
        crate::sync::lock(&self.targets)
            .entry(target.to_string())
            .or_default()
            .clone()
    }

    /// Forgets `target`'s lock once nobody else holds or waits for it.
    fn release_target_lock(&self, target: &str, serial: Arc<tokio::sync::Mutex<()>>) {
        let mut targets = crate::sync::lock(&self.targets);
        // The map's reference and ours: nobody else has it.
        if Arc::strong_count(&serial) == 2 {
            targets.remove(target);
        }
    }

    /// Unmounts lazy layer `id` (its background download joined) off the async workers.
    pub(super) async fn unmount_lazy(&self, id: u64) {
        let mounted = crate::sync::lock(&self.lazy).remove(&id);
        drop_mounts(mounted.into_iter().collect()).await;
    }
}

/// The tonic service over the shared snapshotter.
pub(super) struct Service(pub(super) Arc<Snapshotter>);

type ListStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<ListSnapshotsResponse, Status>> + Send>,
>;

#[tonic::async_trait]
impl Snapshots for Service {
    async fn prepare(
        &self,
        request: Request<PrepareSnapshotRequest>,
    ) -> Result<Response<PrepareSnapshotResponse>, Status> {
        let r = request.into_inner();
        let mounts = self
            .0
            .prepare(&r.key, &r.parent, r.labels, Kind::Active)
            .await?;
        Ok(Response::new(PrepareSnapshotResponse { mounts }))
    }

    async fn view(
        &self,
        request: Request<ViewSnapshotRequest>,
    ) -> Result<Response<ViewSnapshotResponse>, Status> {
        let r = request.into_inner();
        let mounts = self
            .0
            .prepare(&r.key, &r.parent, r.labels, Kind::View)
            .await?;
        Ok(Response::new(ViewSnapshotResponse { mounts }))
    }

    async fn mounts(
        &self,
        request: Request<MountsRequest>,
    ) -> Result<Response<MountsResponse>, Status> {
        let key = request.into_inner().key;
        let snap = self
            .0
            .meta
            .get(&key)?
            .ok_or_else(|| Status::not_found(format!("snapshot {key} does not exist")))?;
        if snap.kind == Kind::Committed as i32 {
            return Err(Status::failed_precondition(format!(
                "snapshot {key} is committed: it has no mounts"
            )));
        }
        Ok(Response::new(MountsResponse {
            mounts: self.0.mounts_of(&snap)?,
        }))
    }

    async fn commit(
        &self,
        request: Request<CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        let _write = self.0.write.lock().await;
        let mut snap = self
            .0
            .meta
            .get(&r.key)?
            .ok_or_else(|| Status::not_found(format!("snapshot {} does not exist", r.key)))?;
        if snap.kind != Kind::Active as i32 {
            return Err(Status::failed_precondition(format!(
                "snapshot {} is not active",
                r.key
            )));
        }
        if self.0.meta.get(&r.name)?.is_some() {
            return Err(Status::already_exists(format!(
                "snapshot {} exists",
                r.name
            )));
        }
        if let Some(image) = snap.labels.get(CRI_IMAGE_REF) {
            // A layer containerd unpacked: its pull's span runs to here.
            self.0
                .layer_span(image, super::pulls::LayerEvent::Committed);
        }
        snap.kind = Kind::Committed as i32;
        snap.labels.extend(r.labels);
        snap.updated_ns = now_ns();
        self.0
            .meta
            .apply(&[(&r.name, Some(&snap)), (&r.key, None)])?;
        let _ = std::fs::remove_dir_all(self.0.dir(snap.id).join("work"));
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        request: Request<RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let key = request.into_inner().key;
        let _write = self.0.write.lock().await;
        let snap = self
            .0
            .meta
            .get(&key)?
            .ok_or_else(|| Status::not_found(format!("snapshot {key} does not exist")))?;
        if self.0.meta.all()?.iter().any(|(_, s)| s.parent == key) {
            return Err(Status::failed_precondition(format!(
                "snapshot {key} has children"
            )));
        }
        self.0.meta.apply(&[(&key, None)])?;
        // Unmounting joins the layer's threads: not under the lock.
        drop(_write);
        self.0.unmount_lazy(snap.id).await;
        let dir = self.0.dir(snap.id);
        if let Some(keeper) = &self.0.keeper
            && snap.remote.is_some()
            && let Err(err) = keeper.del(&dir.join("fs").display().to_string())
        {
            tracing::warn!(%err, "FUSE keeper unreachable: it keeps a removed layer's connection");
        }
        let _ = umount_lazy(&dir.join("fs"));
        if let Err(err) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(%err, dir = %dir.display(), "snapshot directory left behind (Cleanup retries)");
        }
        // Its background download ended with the mount; what it alone had cached goes now
        // instead of waiting for eviction (another mount of the layer keeps it all).
        if let Some(layer) = snap
            .remote
            .as_ref()
            .and_then(|r| r.layer.parse::<crate::oci::digest::Digest>().ok())
        {
            let cache = self.0.cache.clone();
            let released = tokio::task::spawn_blocking(move || cache.release_image(&layer))
                .await
                .ok()
                .flatten();
            if let Some(bytes) = released {
                tracing::info!(snapshot = %key, layer = %layer, bytes, "removed lazy layer's cached chunks freed");
            }
        }
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        request: Request<StatSnapshotRequest>,
    ) -> Result<Response<StatSnapshotResponse>, Status> {
        let key = request.into_inner().key;
        let snap = self
            .0
            .meta
            .get(&key)?
            .ok_or_else(|| Status::not_found(format!("snapshot {key} does not exist")))?;
        Ok(Response::new(StatSnapshotResponse {
            info: Some(Snapshotter::info(&key, &snap)),
        }))
    }

    async fn update(
        &self,
        request: Request<UpdateSnapshotRequest>,
    ) -> Result<Response<UpdateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let info = r.info.ok_or_else(|| Status::invalid_argument("no info"))?;
        let _write = self.0.write.lock().await;
        let mut snap =
            self.0.meta.get(&info.name)?.ok_or_else(|| {
                Status::not_found(format!("snapshot {} does not exist", info.name))
            })?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        if paths.is_empty() {
            snap.labels = info.labels.into_iter().collect();
        } else {
            for path in paths {
                if path == "labels" {
                    snap.labels = info.labels.clone().into_iter().collect();
                } else if let Some(key) = path.strip_prefix("labels.") {
                    match info.labels.get(key) {
                        Some(v) => snap.labels.insert(key.to_string(), v.clone()),
                        None => snap.labels.remove(key),
                    };
                } else {
                    return Err(Status::invalid_argument(format!("cannot update {path}")));
                }
            }
        }
        snap.updated_ns = now_ns();
        self.0.meta.apply(&[(&info.name, Some(&snap))])?;
        Ok(Response::new(UpdateSnapshotResponse {
            info: Some(Snapshotter::info(&info.name, &snap)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let filters: Vec<Filter> = request
            .into_inner()
            .filters
            .iter()
            .map(|f| Filter::parse(f))
            .collect::<Result<_, _>>()?;
        let infos: Vec<Info> = self
            .0
            .meta
            .all()?
            .iter()
            .map(|(name, snap)| Snapshotter::info(name, snap))
            .filter(|info| filters.is_empty() || filters.iter().any(|f| f.matches(info)))
            .collect();
        let batches: Vec<Result<ListSnapshotsResponse, Status>> = infos
            .chunks(100)
            .map(|c| Ok(ListSnapshotsResponse { info: c.to_vec() }))
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn usage(
        &self,
        request: Request<UsageRequest>,
    ) -> Result<Response<UsageResponse>, Status> {
        let key = request.into_inner().key;
        let snap = self
            .0
            .meta
            .get(&key)?
            .ok_or_else(|| Status::not_found(format!("snapshot {key} does not exist")))?;
        // A lazy layer's bytes are in the chunk cache: what it has cached so far there (a
        // walk of its mount would count the whole image, cached or not, and fetch for it).
        let layer = snap
            .remote
            .as_ref()
            .map(|r| r.layer.parse::<crate::oci::digest::Digest>());
        let (size, inodes) = match layer {
            Some(Ok(layer)) => {
                let cache = self.0.cache.clone();
                let (bytes, files) = tokio::task::spawn_blocking(move || cache.image_usage(&layer))
                    .await
                    .map_err(internal)?;
                (
                    i64::try_from(bytes).unwrap_or(i64::MAX),
                    i64::try_from(files).unwrap_or(i64::MAX),
                )
            }
            Some(Err(_)) | None => {
                let fs = self.0.dir(snap.id).join("fs");
                tokio::task::spawn_blocking(move || mounts::disk_usage(&fs))
                    .await
                    .map_err(internal)?
            }
        };
        Ok(Response::new(UsageResponse { size, inodes }))
    }

    async fn cleanup(&self, _request: Request<CleanupRequest>) -> Result<Response<()>, Status> {
        let _write = self.0.write.lock().await;
        let known: std::collections::HashSet<String> = self
            .0
            .meta
            .all()?
            .iter()
            .map(|(_, s)| s.id.to_string())
            .collect();
        let dir = self.0.config.root.join("snapshots");
        for entry in std::fs::read_dir(&dir).map_err(internal)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !known.contains(&name) {
                let _ = umount_lazy(&entry.path().join("fs"));
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        Ok(Response::new(()))
    }
}
