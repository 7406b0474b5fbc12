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

pub mod proto {
    #![allow(clippy::all, unreachable_pub, missing_docs)]
    tonic::include_proto!("containerd.services.snapshots.v1");
}

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use proto::{
    CleanupRequest, CommitSnapshotRequest, Info, Kind, ListSnapshotsRequest, ListSnapshotsResponse,
    Mount, MountsRequest, MountsResponse, PrepareSnapshotRequest, PrepareSnapshotResponse,
    RemoveSnapshotRequest, StatSnapshotRequest, StatSnapshotResponse, UpdateSnapshotRequest,
    UpdateSnapshotResponse, UsageRequest, UsageResponse, ViewSnapshotRequest, ViewSnapshotResponse,
    snapshots_server::{Snapshots, SnapshotsServer},
};
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use crate::{
    cache::ChunkCache,
    image::digest::Digest,
    mount::{self, MountOptions, MountedImage},
    registry::{ImageRef, http::HttpConfig, open_source},
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

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

/// Errors starting the snapshotter.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotterError {
    #[error("snapshotter root {0}: {1}")]
    Root(PathBuf, String),
    #[error("snapshotter socket {0}: {1}")]
    Socket(PathBuf, String),
}

/// Where a lazily mounted layer comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Remote {
    image_ref: String,
    manifest: Option<String>,
    layer: String,
}

/// One snapshot's metadata.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Snapshot {
    id: u64,
    kind: i32,
    parent: String,
    labels: BTreeMap<String, String>,
    created_ns: u64,
    updated_ns: u64,
    remote: Option<Remote>,
}

/// How lazy layers are reached and served.
#[derive(Clone, Debug)]
pub struct SnapshotterConfig {
    pub root: PathBuf,
    pub socket: PathBuf,
    pub http: HttpConfig,
    pub mount: MountOptions,
}

fn now_ns() -> u64 {
    crate::starts::unix_ns(SystemTime::now())
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

/// The service.
pub struct Snapshotter {
    config: SnapshotterConfig,
    db: Database,
    cache: Arc<ChunkCache>,
    runtime: tokio::runtime::Handle,
    /// Lazy layers mounted now, by snapshot id.
    lazy: Mutex<HashMap<u64, MountedImage>>,
    /// Serialises metadata changes (containerd's calls for one image come in order anyway).
    write: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Snapshotter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshotter")
            .field("root", &self.config.root)
            .finish_non_exhaustive()
    }
}

impl Snapshotter {
    /// Opens the root (metadata and snapshot directories) and mounts the lazy layers again.
    pub async fn open(config: SnapshotterConfig) -> Result<Arc<Self>, SnapshotterError> {
        let root = config.root.clone();
        let root_err =
            |e: &dyn std::fmt::Display| SnapshotterError::Root(root.clone(), e.to_string());
        std::fs::create_dir_all(config.root.join("snapshots")).map_err(|e| root_err(&e))?;
        let db = Database::create(config.root.join("metadata.redb")).map_err(|e| root_err(&e))?;
        let cache = Arc::new(ChunkCache::open(&config.mount.cache).map_err(|e| root_err(&e))?);
        let this = Arc::new(Self {
            config,
            db,
            cache,
            runtime: tokio::runtime::Handle::current(),
            lazy: Mutex::new(HashMap::new()),
            write: tokio::sync::Mutex::new(()),
        });
        let remotes: Vec<(String, Snapshot)> = this
            .all()
            .map_err(|e| root_err(&e))?
            .into_iter()
            .filter(|(_, s)| s.remote.is_some())
            .collect();
        for (name, snap) in remotes {
            let Some(remote) = &snap.remote else { continue };
            match this.mount_lazy(snap.id, remote).await {
                Ok(true) => {
                    tracing::info!(snapshot = %name, layer = %remote.layer, "lazy layer mounted again")
                }
                Ok(false) => {
                    tracing::warn!(snapshot = %name, "lazy layer is no longer eStargz or in its image")
                }
                Err(err) => {
                    tracing::warn!(snapshot = %name, %err, "lazy layer could not be mounted again; its containers will fail to read it")
                }
            }
        }
        Ok(this)
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.config.root.join("snapshots").join(id.to_string())
    }

    fn get(&self, name: &str) -> Result<Option<Snapshot>, Status> {
        let txn = self.db.begin_read().map_err(internal)?;
        let table = match txn.open_table(SNAPSHOTS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(internal(e)),
        };
        match table.get(name).map_err(internal)? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(internal)?)),
            None => Ok(None),
        }
    }

    fn all(&self) -> Result<Vec<(String, Snapshot)>, Status> {
        let txn = self.db.begin_read().map_err(internal)?;
        let table = match txn.open_table(SNAPSHOTS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(internal(e)),
        };
        let mut out = Vec::new();
        for entry in table.iter().map_err(internal)? {
            let (k, v) = entry.map_err(internal)?;
            out.push((
                k.value().to_string(),
                serde_json::from_slice(v.value()).map_err(internal)?,
            ));
        }
        Ok(out)
    }

    /// Writes (`Some`) or deletes (`None`) snapshots in one transaction.
    fn apply(&self, changes: &[(&str, Option<&Snapshot>)]) -> Result<(), Status> {
        let txn = self.db.begin_write().map_err(internal)?;
        {
            let mut table = txn.open_table(SNAPSHOTS).map_err(internal)?;
            for (name, snap) in changes {
                match snap {
                    Some(s) => {
                        let bytes = serde_json::to_vec(s).map_err(internal)?;
                        table.insert(*name, bytes.as_slice()).map_err(internal)?;
                    }
                    None => {
                        table.remove(*name).map_err(internal)?;
                    }
                }
            }
        }
        txn.commit().map_err(internal)
    }

    fn next_id(&self) -> Result<u64, Status> {
        let txn = self.db.begin_write().map_err(internal)?;
        let id = {
            let mut table = txn.open_table(COUNTERS).map_err(internal)?;
            let id = table
                .get("next_id")
                .map_err(internal)?
                .map_or(1, |v| v.value());
            table.insert("next_id", id + 1).map_err(internal)?;
            id
        };
        txn.commit().map_err(internal)?;
        Ok(id)
    }

    /// The parents' layer directories, nearest first.
    fn lowers(&self, parent: &str) -> Result<Vec<PathBuf>, Status> {
        let mut out = Vec::new();
        let mut name = parent.to_string();
        while !name.is_empty() {
            let snap = self.get(&name)?.ok_or_else(|| {
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
        let dir = self.dir(snap.id);
        let lowers = self.lowers(&snap.parent)?;
        let joined = |dirs: &[PathBuf]| {
            dirs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(":")
        };
        let bind = |source: &Path, mode: &str| Mount {
            r#type: "bind".into(),
            source: source.display().to_string(),
            target: String::new(),
            options: vec![mode.into(), "rbind".into()],
        };
        Ok(if snap.kind == Kind::Active as i32 {
            if lowers.is_empty() {
                vec![bind(&dir.join("fs"), "rw")]
            } else {
                vec![Mount {
                    r#type: "overlay".into(),
                    source: "overlay".into(),
                    target: String::new(),
                    options: vec![
                        format!("workdir={}", dir.join("work").display()),
                        format!("upperdir={}", dir.join("fs").display()),
                        format!("lowerdir={}", joined(&lowers)),
                    ],
                }]
            }
        } else {
            match lowers.len() {
                0 => vec![bind(&dir.join("fs"), "ro")],
                1 => vec![bind(&lowers[0], "ro")],
                _ => vec![Mount {
                    r#type: "overlay".into(),
                    source: "overlay".into(),
                    target: String::new(),
                    options: vec![format!("lowerdir={}", joined(&lowers))],
                }],
            }
        })
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

    /// Mounts layer `remote` lazily at snapshot `id`'s directory. `Ok(false)`: not eStargz.
    async fn mount_lazy(&self, id: u64, remote: &Remote) -> Result<bool, String> {
        let image = ImageRef::parse(&remote.image_ref).map_err(|e| e.to_string())?;
        let source = open_source(&image, &self.config.http).map_err(|e| e.to_string())?;
        let reference = remote
            .manifest
            .clone()
            .or_else(|| image.manifest_reference())
            .unwrap_or_default();
        let layer: Digest = remote.layer.parse().map_err(|e| format!("{e:?}"))?;
        let opened = mount::open_one_layer(
            source,
            &reference,
            &self.config.mount.platform,
            &self.cache,
            &layer,
        )
        .await
        .map_err(|e| e.to_string())?;
        let Some(opened) = opened else {
            return Ok(false);
        };
        let fs = self.dir(id).join("fs");
        std::fs::create_dir_all(&fs).map_err(|e| e.to_string())?;
        // A mount left by a snapshotter that died: its FUSE connection is gone.
        let _ = nix_umount_lazy(&fs);
        let options = MountOptions {
            view: crate::fs::View::Layer(0),
            ..self.config.mount.clone()
        };
        let (runtime, cache) = (self.runtime.clone(), self.cache.clone());
        let mounted = tokio::task::spawn_blocking(move || {
            mount::mount(runtime, opened, cache, &fs, &options)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        self.lazy
            .lock()
            .map_err(|_| "lock".to_string())?
            .insert(id, mounted);
        Ok(true)
    }

    async fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        kind: Kind,
    ) -> Result<Vec<Mount>, Status> {
        let _write = self.write.lock().await;
        if key.is_empty() {
            return Err(Status::invalid_argument("empty snapshot key"));
        }
        if self.get(key)?.is_some() {
            return Err(Status::already_exists(format!("snapshot {key} exists")));
        }
        if !parent.is_empty() {
            let p = self.get(parent)?.ok_or_else(|| {
                Status::not_found(format!("parent snapshot {parent} does not exist"))
            })?;
            if p.kind != Kind::Committed as i32 {
                return Err(Status::failed_precondition(format!(
                    "parent {parent} is not committed"
                )));
            }
        }
        if kind == Kind::Active
            && let Some(target) = labels.get(TARGET_REF)
            && let (Some(image_ref), Some(layer)) =
                (labels.get(CRI_IMAGE_REF), labels.get(CRI_LAYER_DIGEST))
        {
            if self.get(target)?.is_some() {
                return Err(Status::already_exists(format!(
                    "target snapshot {target} exists"
                )));
            }
            let id = self.next_id()?;
            let remote = Remote {
                image_ref: image_ref.clone(),
                manifest: labels.get(CRI_MANIFEST_DIGEST).cloned(),
                layer: layer.clone(),
            };
            match self.mount_lazy(id, &remote).await {
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
                        remote: Some(remote),
                    };
                    self.apply(&[(target, Some(&snap))])?;
                    tracing::info!(%target, %layer, image = %image_ref, "layer mounted lazily");
                    // containerd takes AlreadyExists on the target as "this layer is there".
                    return Err(Status::already_exists(format!(
                        "target snapshot {target} exists (mounted lazily)"
                    )));
                }
                Ok(false) => {
                    tracing::debug!(%layer, "not eStargz: unpacked by containerd");
                    let _ = std::fs::remove_dir_all(self.dir(id));
                }
                Err(err) => {
                    tracing::warn!(%layer, %err, "lazy mount failed; containerd unpacks the layer");
                    let _ = std::fs::remove_dir_all(self.dir(id));
                }
            }
        }
        let id = self.next_id()?;
        let dir = self.dir(id);
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
        self.apply(&[(key, Some(&snap))])?;
        self.mounts_of(&snap)
    }

    /// Serves the API on the configured socket until `shutdown`.
    pub async fn serve(self: Arc<Self>, shutdown: Shutdown) -> Result<(), SnapshotterError> {
        let socket = self.config.socket.clone();
        let err =
            |e: &dyn std::fmt::Display| SnapshotterError::Socket(socket.clone(), e.to_string());
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir).map_err(|e| err(&e))?;
        }
        let _ = std::fs::remove_file(&socket);
        let listener = tokio::net::UnixListener::bind(&socket).map_err(|e| err(&e))?;
        tracing::info!(socket = %socket.display(), root = %self.config.root.display(), "snapshotter listening");
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        let service = Service(self.clone());
        let result = tonic::transport::Server::builder()
            .add_service(SnapshotsServer::new(service))
            .serve_with_incoming_shutdown(incoming, shutdown.triggered())
            .await;
        let _ = std::fs::remove_file(&socket);
        // Lazy layers stay mounted for running containers only while this process serves
        // them; unmount them so that nothing hangs on a dead FUSE connection.
        if let Ok(mut lazy) = self.lazy.lock() {
            lazy.clear();
        }
        result.map_err(|e| err(&e))
    }
}

fn nix_umount_lazy(path: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: a NUL-terminated path that outlives the call.
    let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The tonic service over the shared snapshotter.
struct Service(Arc<Snapshotter>);

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
            .prepare(
                &r.key,
                &r.parent,
                r.labels.into_iter().collect(),
                Kind::Active,
            )
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
            .prepare(
                &r.key,
                &r.parent,
                r.labels.into_iter().collect(),
                Kind::View,
            )
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
            .get(&r.key)?
            .ok_or_else(|| Status::not_found(format!("snapshot {} does not exist", r.key)))?;
        if snap.kind != Kind::Active as i32 {
            return Err(Status::failed_precondition(format!(
                "snapshot {} is not active",
                r.key
            )));
        }
        if self.0.get(&r.name)?.is_some() {
            return Err(Status::already_exists(format!(
                "snapshot {} exists",
                r.name
            )));
        }
        snap.kind = Kind::Committed as i32;
        snap.labels.extend(r.labels);
        snap.updated_ns = now_ns();
        self.0.apply(&[(&r.name, Some(&snap)), (&r.key, None)])?;
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
            .get(&key)?
            .ok_or_else(|| Status::not_found(format!("snapshot {key} does not exist")))?;
        if self.0.all()?.iter().any(|(_, s)| s.parent == key) {
            return Err(Status::failed_precondition(format!(
                "snapshot {key} has children"
            )));
        }
        self.0.apply(&[(&key, None)])?;
        if let Ok(mut lazy) = self.0.lazy.lock() {
            lazy.remove(&snap.id);
        }
        let dir = self.0.dir(snap.id);
        let _ = nix_umount_lazy(&dir.join("fs"));
        if let Err(err) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(%err, dir = %dir.display(), "snapshot directory left behind (Cleanup retries)");
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
        let mut snap = self
            .0
            .get(&info.name)?
            .ok_or_else(|| Status::not_found(format!("snapshot {} does not exist", info.name)))?;
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
        self.0.apply(&[(&info.name, Some(&snap))])?;
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
            .get(&key)?
            .ok_or_else(|| Status::not_found(format!("snapshot {key} does not exist")))?;
        let fs = self.0.dir(snap.id).join("fs");
        let (size, inodes) = tokio::task::spawn_blocking(move || disk_usage(&fs))
            .await
            .map_err(internal)?;
        Ok(Response::new(UsageResponse { size, inodes }))
    }

    async fn cleanup(&self, _request: Request<CleanupRequest>) -> Result<Response<()>, Status> {
        let _write = self.0.write.lock().await;
        let known: std::collections::HashSet<String> = self
            .0
            .all()?
            .iter()
            .map(|(_, s)| s.id.to_string())
            .collect();
        let dir = self.0.config.root.join("snapshots");
        for entry in std::fs::read_dir(&dir).map_err(internal)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !known.contains(&name) {
                let _ = nix_umount_lazy(&entry.path().join("fs"));
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        Ok(Response::new(()))
    }
}

/// Bytes (in allocated blocks) and inodes under `dir`, not crossing into other filesystems.
fn disk_usage(dir: &Path) -> (i64, i64) {
    use std::os::unix::fs::MetadataExt;
    let Ok(root) = std::fs::symlink_metadata(dir) else {
        return (0, 0);
    };
    let (mut size, mut inodes) = (0i64, 0i64);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            inodes += 1;
            size += (meta.blocks() * 512) as i64;
            if meta.is_dir() && meta.dev() == root.dev() {
                stack.push(entry.path());
            }
        }
    }
    (size, inodes)
}

/// A containerd filter as snapshot walks use it: comma-separated selectors that must all hold
/// (`name==X`, `parent==X`, `kind==active|view|committed`, `labels."K"==V`, `labels."K"`).
/// containerd's metadata store finds a remote snapshot with
/// `labels."containerd.io/snapshot.ref"==TARGET,parent==PARENT`.
#[derive(Debug, PartialEq, Eq)]
struct Filter(Vec<Selector>);

#[derive(Debug, PartialEq, Eq)]
enum Selector {
    Name(String),
    Parent(String),
    Kind(i32),
    Label(String, Option<String>),
}

/// Splits on commas outside double quotes.
fn split_selectors(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

impl Filter {
    fn parse(s: &str) -> Result<Self, Status> {
        split_selectors(s)
            .into_iter()
            .map(|part| Selector::parse(part, s))
            .collect::<Result<_, _>>()
            .map(Self)
    }

    fn matches(&self, info: &Info) -> bool {
        self.0.iter().all(|s| s.matches(info))
    }
}

impl Selector {
    fn parse(part: &str, whole: &str) -> Result<Self, Status> {
        let bad = || Status::invalid_argument(format!("unsupported filter {whole:?}"));
        let unquote = |v: &str| v.trim().trim_matches('"').to_string();
        let (field, value) = match part.split_once("==") {
            Some((f, v)) => (f.trim(), Some(unquote(v))),
            None => (part.trim(), None),
        };
        if let Some(label) = field.strip_prefix("labels.") {
            return Ok(Self::Label(unquote(label), value));
        }
        let value = value.ok_or_else(bad)?;
        Ok(match field {
            "name" => Self::Name(value),
            "parent" => Self::Parent(value),
            "kind" => Self::Kind(match value.as_str() {
                "view" => Kind::View as i32,
                "active" => Kind::Active as i32,
                "committed" => Kind::Committed as i32,
                _ => return Err(bad()),
            }),
            _ => return Err(bad()),
        })
    }

    fn matches(&self, info: &Info) -> bool {
        match self {
            Self::Name(n) => &info.name == n,
            Self::Parent(p) => &info.parent == p,
            Self::Kind(k) => info.kind == *k,
            Self::Label(k, None) => info.labels.contains_key(k),
            Self::Label(k, Some(v)) => info.labels.get(k) == Some(v),
        }
    }
}

#[cfg(test)]
mod tests;
