//! kubelet's image service, passed through to the runtime: kubelet's
//! `--image-service-endpoint` names this socket, every call goes on to containerd's unchanged
//! and its answer (or error) comes back unchanged. On the way, the `auth` of each `PullImage`
//! is kept in memory ([`Keyring`]) for the lazy layers of that image's repository: containerd
//! uses those credentials for its own requests, and a remote snapshotter is never shown them.
//! When a `RemoveImage` leaves no image of a repository on the node, its credentials go.
//!
//! Nothing here writes a credential anywhere or logs one: the log names the repository.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::Arc,
};

use k8s_cri::v1::{
    AuthConfig, FilesystemUsage, ImageFsInfoRequest, ImageFsInfoResponse, ImageStatusRequest,
    ImageStatusResponse, ListImagesRequest, ListImagesResponse, PullImageRequest,
    PullImageResponse, RemoveImageRequest, RemoveImageResponse, UInt64Value,
    image_service_client::ImageServiceClient,
    image_service_server::{ImageService, ImageServiceServer},
};
use tonic::{Request, Response, Status, transport::Channel};

use crate::{
    oci::reference::ImageRef,
    registry::{http::Credentials, keyring::Keyring},
    shutdown::Shutdown,
};

/// Largest message either way: kubelet's own limit for CRI calls (a node with many images
/// lists more than gRPC's default 4 MiB).
const MAX_MESSAGE: usize = 16 << 20;

/// Longest credentials kept (all fields together): registry tokens are a few KiB, and
/// the keyring's memory stays bounded by [`crate::registry::keyring::MAX_REPOSITORIES`]
/// times this.
const MAX_CREDENTIALS: usize = 64 << 10;

/// Errors starting the proxy.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("the runtime's image service")]
    Upstream(#[source] super::CriError),
    #[error("listening on {0}")]
    Listen(PathBuf, #[source] std::io::Error),
    #[error("serving kubelet's image service on {0}")]
    Serve(PathBuf, #[source] tonic::transport::Error),
}

/// The image service between kubelet and the runtime.
pub struct ImageProxy {
    upstream: ImageServiceClient<Channel>,
    keyring: Arc<Keyring>,
    /// Pulls under way, by repository: their credentials stay though no image of theirs is
    /// listed yet (containerd lists an image once its pull is done).
    pulling: std::sync::Mutex<BTreeMap<Repository, usize>>,
    /// The snapshotter's bytes and inodes on disk, for ImageFsInfo's figure of its
    /// filesystem ([`ImageProxy::with_disk_usage`]).
    disk_usage: Option<DiskUsage>,
    /// How the snapshotter served the layers of a pull ([`ImageProxy::with_served`]).
    served: Option<Served>,
    /// Where the `ImageStreaming` Event of a streamed pull goes.
    events: Option<crate::flag::PodEvents>,
    /// Where each pull's times go, for its pod's timeline ([`ImageProxy::with_pull_log`]).
    pull_log: Option<Arc<crate::starts::PullLog>>,
    /// Told of each pull before it goes on ([`ImageProxy::with_open_ahead`]).
    open_ahead: Option<OpenAhead>,
}

/// Starts the snapshotter's openings of an image's layers, given the image a pull names.
pub type OpenAhead = Arc<dyn Fn(&str) + Send + Sync>;

/// Takes how the snapshotter served the layers brought for an image since it was last asked.
pub type Served = Arc<dyn Fn(&str) -> Option<crate::snapshotter::LayersServed> + Send + Sync>;

/// Images pulled through the proxy whose layers imgstream's snapshotter prepared, by how
/// they were served; exported as `imgstream_images_pulled_total`.
#[derive(Debug)]
pub struct ImagesPulled {
    /// Every layer the pull brought is lazy.
    pub streamed: std::sync::atomic::AtomicU64,
    /// Some are lazy, some unpacked.
    pub partly_streamed: std::sync::atomic::AtomicU64,
    /// None is lazy: all unpacked by containerd.
    pub unpacked: std::sync::atomic::AtomicU64,
}

pub static IMAGES_PULLED: ImagesPulled = ImagesPulled {
    streamed: std::sync::atomic::AtomicU64::new(0),
    partly_streamed: std::sync::atomic::AtomicU64::new(0),
    unpacked: std::sync::atomic::AtomicU64::new(0),
};

impl ImagesPulled {
    fn count(&self, served: crate::snapshotter::LayersServed) {
        let counter = match (served.lazy, served.unpacked) {
            (0, _) => &self.unpacked,
            (_, 0) => &self.streamed,
            _ => &self.partly_streamed,
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Longest image reference a pull record keeps.
const MAX_RECORDED_REFERENCE: usize = 4096;

/// Measures a snapshotter's bytes and inodes on disk (blocking).
pub type DiskUsage = Arc<dyn Fn() -> (u64, u64) + Send + Sync>;

/// The last component of the image filesystem containerd reports for imgstream (named as
/// `imgstream containerd-config` names it).
pub const IMAGE_FS: &str = "io.containerd.snapshotter.v1.imgstream";

/// A registry and a repository in it.
type Repository = (String, String);

/// A pull of a repository under way, counted in [`ImageProxy::pulling`] while it lives
/// (kubelet giving up on the call drops it too).
struct Pulling<'a> {
    proxy: &'a ImageProxy,
    repository: Repository,
}

impl<'a> Pulling<'a> {
    fn start(proxy: &'a ImageProxy, repository: Repository) -> Self {
        *crate::sync::lock(&proxy.pulling)
            .entry(repository.clone())
            .or_default() += 1;
        Self { proxy, repository }
    }
}

impl Drop for Pulling<'_> {
    fn drop(&mut self) {
        let mut pulling = crate::sync::lock(&self.proxy.pulling);
        if let Some(count) = pulling.get_mut(&self.repository) {
            *count -= 1;
            if *count == 0 {
                pulling.remove(&self.repository);
            }
        }
    }
}

impl ImageProxy {
    /// A proxy to the runtime's CRI socket `upstream`, keeping credentials in `keyring`.
    /// Nothing is dialled until the first call: the runtime may start after the agent.
    pub fn new(upstream: &Path, keyring: Arc<Keyring>) -> Result<Self, ProxyError> {
        let channel = super::lazy_channel(upstream).map_err(ProxyError::Upstream)?;
        Ok(Self {
            upstream: ImageServiceClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            keyring,
            pulling: Default::default(),
            disk_usage: None,
            served: None,
            events: None,
            pull_log: None,
            open_ahead: None,
        })
    }

    /// Tells `open_ahead` of each pull before passing it on, with the pull's credentials
    /// kept: the snapshotter fetches the image's manifest and TOCs while containerd fetches
    /// the manifest and configuration on its own, and its layers open from the cache.
    pub fn with_open_ahead(mut self, open_ahead: OpenAhead) -> Self {
        self.open_ahead = Some(open_ahead);
        self
    }

    /// After each pull, counts the image by how `served` says its layers were served, and
    /// with `events`, tells the pod whose pull it was when its image streams.
    pub fn with_served(mut self, served: Served, events: Option<crate::flag::PodEvents>) -> Self {
        self.served = Some(served);
        self.events = events;
        self
    }

    /// Counts a pull of `image` that containerd finished, by how its layers were served, and
    /// tells its pod when any streams. The Event is sent off the pull's path: kubelet does not
    /// wait for it, and an API that refuses it costs a log line.
    fn pulled(
        &self,
        image: &str,
        pod: Option<crate::flag::PodName>,
    ) -> Option<crate::snapshotter::LayersServed> {
        let served = self.served.as_ref().and_then(|take| take(image))?;
        IMAGES_PULLED.count(served);
        let (Some(events), Some(pod)) = (self.events.clone(), pod) else {
            return Some(served);
        };
        if served.lazy == 0 {
            return Some(served);
        }
        let image = image.to_string();
        tokio::spawn(async move {
            let layers = served.lazy + served.unpacked;
            if let Err(err) = events
                .image_streaming(&pod, &image, served.lazy, layers)
                .await
            {
                let error = crate::error_chain(&err);
                tracing::warn!(%error, "ImageStreaming Event not sent");
            }
        });
        Some(served)
    }

    /// Records each pull's start and end, with its pod, in `log`.
    pub fn with_pull_log(mut self, log: Arc<crate::starts::PullLog>) -> Self {
        self.pull_log = Some(log);
        self
    }

    /// ImageFsInfo's figures for imgstream's filesystem come from `usage` (measured at each
    /// call) instead of containerd's, which counts a lazy layer as it was when committed.
    pub fn with_disk_usage(mut self, usage: DiskUsage) -> Self {
        self.disk_usage = Some(usage);
        self
    }

    /// Binds the unix socket kubelet is pointed at (a stale socket file is replaced),
    /// readable and writable by its owner only: kubelet runs as root, and nobody else has
    /// business with images' credentials.
    pub fn listen(socket: &Path) -> Result<tokio::net::UnixListener, ProxyError> {
        use std::os::unix::fs::PermissionsExt as _;
        let failed = |e| ProxyError::Listen(socket.to_path_buf(), e);
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir).map_err(failed)?;
        }
        match std::fs::remove_file(socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(failed(e)),
        }
        let listener = tokio::net::UnixListener::bind(socket).map_err(failed)?;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600)).map_err(failed)?;
        Ok(listener)
    }

    /// Serves kubelet on `listener` (from [`Self::listen`], bound at `socket`) until
    /// `shutdown`; the socket file is removed when it ends.
    pub async fn serve(
        self,
        listener: tokio::net::UnixListener,
        socket: PathBuf,
        shutdown: Shutdown,
    ) -> Result<(), ProxyError> {
        tracing::info!(socket = %socket.display(), "serving kubelet's image service");
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        let result = tonic::transport::Server::builder()
            .add_service(
                ImageServiceServer::new(self)
                    .max_decoding_message_size(MAX_MESSAGE)
                    .max_encoding_message_size(MAX_MESSAGE),
            )
            .serve_with_incoming_shutdown(incoming, shutdown.triggered())
            .await;
        let _ = std::fs::remove_file(&socket);
        result.map_err(|e| ProxyError::Serve(socket, e))
    }

    /// The runtime's image service, for one call.
    fn upstream(&self) -> ImageServiceClient<Channel> {
        self.upstream.clone()
    }

    /// Drops the credentials of every repository the runtime no longer holds an image of.
    async fn forget_removed(&self) {
        let kept = self.keyring.repositories();
        if kept.is_empty() {
            return;
        }
        let listed = match self
            .upstream()
            .list_images(ListImagesRequest::default())
            .await
        {
            Ok(listed) => listed.into_inner().images,
            Err(status) => {
                tracing::warn!(%status, "images not listed after a removal: credentials kept until they age out");
                return;
            }
        };
        let present: BTreeSet<Repository> = listed
            .iter()
            .flat_map(|image| image.repo_tags.iter().chain(&image.repo_digests))
            .filter_map(|name| repository_of(name))
            .collect();
        let pulling: BTreeSet<Repository> =
            crate::sync::lock(&self.pulling).keys().cloned().collect();
        for (registry, repository) in unused(kept, &present, &pulling) {
            if self.keyring.forget(&registry, &repository) {
                tracing::info!(%registry, %repository, "no image of the repository is left: its credentials are dropped");
            }
        }
    }
}

/// Of the repositories credentials are `kept` for, those with no image `present` and no
/// pull under way.
fn unused(
    kept: Vec<Repository>,
    present: &BTreeSet<Repository>,
    pulling: &BTreeSet<Repository>,
) -> Vec<Repository> {
    kept.into_iter()
        .filter(|r| !present.contains(r) && !pulling.contains(r))
        .collect()
}

/// The registry and repository an image name of the runtime's belongs to.
fn repository_of(image: &str) -> Option<(String, String)> {
    match ImageRef::parse(image).ok()? {
        ImageRef::Registry {
            registry,
            repository,
            ..
        } => Some((registry, repository)),
        ImageRef::Layout { .. } => None,
    }
}

/// The credentials a `PullImage` carries, as the registry client uses them: a user name and
/// password, given apart or as docker's base64 `auth`, or an identity token. A registry token
/// (a bearer token to send as it is) has no place in the registry client yet.
pub fn credentials(auth: &AuthConfig) -> Result<Option<Credentials>, &'static str> {
    use base64::Engine as _;
    let length = [
        &auth.username,
        &auth.password,
        &auth.auth,
        &auth.identity_token,
        &auth.registry_token,
    ]
    .iter()
    .map(|field| field.len())
    .sum::<usize>();
    if length > MAX_CREDENTIALS {
        return Err("credentials longer than 64 KiB are not kept");
    }
    if !auth.identity_token.is_empty() {
        return Ok(Some(Credentials {
            username: "<token>".into(),
            password: auth.identity_token.clone(),
        }));
    }
    if !auth.username.is_empty() || !auth.password.is_empty() {
        return Ok(Some(Credentials {
            username: auth.username.clone(),
            password: auth.password.clone(),
        }));
    }
    if !auth.auth.is_empty() {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.auth.trim())
            .map_err(|_| "auth is not base64")?;
        let decoded = String::from_utf8(decoded).map_err(|_| "auth is not UTF-8")?;
        let (username, password) = decoded.split_once(':').ok_or("auth is not user:password")?;
        return Ok(Some(Credentials {
            username: username.into(),
            password: password.into(),
        }));
    }
    if !auth.registry_token.is_empty() {
        return Err("a registry token is not supported for lazy layers");
    }
    Ok(None)
}

/// `request`'s message in a request of its own, with its deadline (kubelet's) and nothing
/// else of what kubelet sent.
fn forwarded<T>(request: Request<T>) -> Request<T> {
    let deadline = request.metadata().get("grpc-timeout").cloned();
    let mut forwarded = Request::new(request.into_inner());
    if let Some(deadline) = deadline {
        forwarded.metadata_mut().insert("grpc-timeout", deadline);
    }
    forwarded
}

#[tonic::async_trait]
impl ImageService for ImageProxy {
    async fn list_images(
        &self,
        request: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        self.upstream().list_images(forwarded(request)).await
    }

    async fn image_status(
        &self,
        request: Request<ImageStatusRequest>,
    ) -> Result<Response<ImageStatusResponse>, Status> {
        self.upstream().image_status(forwarded(request)).await
    }

    async fn pull_image(
        &self,
        request: Request<PullImageRequest>,
    ) -> Result<Response<PullImageResponse>, Status> {
        let message = request.get_ref();
        let repository = message
            .image
            .as_ref()
            .and_then(|spec| repository_of(&spec.image));
        let _pulling = repository
            .clone()
            .map(|repository| Pulling::start(self, repository));
        // Kept before the pull: containerd prepares the lazy layers while it pulls.
        if let (Some((registry, repository)), Some(auth)) = (repository, message.auth.as_ref()) {
            match credentials(auth) {
                Ok(Some(found)) => {
                    tracing::info!(%registry, %repository, "credentials kept for the image's lazy layers");
                    self.keyring.keep(&registry, &repository, found);
                }
                Ok(None) => {}
                Err(why) => {
                    tracing::warn!(%registry, %repository, why, "the pull's credentials are not kept: its lazy layers use the node's")
                }
            }
        }
        let started = std::time::SystemTime::now();
        let image = message.image.as_ref().map(|spec| spec.image.clone());
        let uid = message
            .sandbox_config
            .as_ref()
            .and_then(|config| config.metadata.as_ref())
            .map(|meta| crate::attribution::PodRef {
                uid: Some(meta.uid.clone()).filter(|u| !u.is_empty()),
                namespace: Some(meta.namespace.clone()).filter(|n| !n.is_empty()),
                name: Some(meta.name.clone()).filter(|n| !n.is_empty()),
                container: None,
            })
            .unwrap_or_default();
        let pod = message
            .sandbox_config
            .as_ref()
            .and_then(|config| config.metadata.as_ref())
            .filter(|meta| !meta.name.is_empty() && !meta.namespace.is_empty())
            .map(|meta| crate::flag::PodName {
                namespace: meta.namespace.clone(),
                name: meta.name.clone(),
                uid: meta.uid.clone(),
            });
        if let (Some(image), Some(take)) = (&image, &self.served) {
            // What an earlier pull of the repository left untaken is not this pull's.
            take(image);
        }
        if let (Some(image), Some(open_ahead)) = (&image, &self.open_ahead) {
            open_ahead(image);
        }
        let pulled = self.upstream().pull_image(forwarded(request)).await;
        drop(_pulling);
        let ended = std::time::SystemTime::now();
        let served = match (&pulled, &image) {
            (Ok(_), Some(image)) => self.pulled(image, pod),
            (Ok(_), None) => None,
            // Nothing may need them now: kept only while an image of the repository is.
            (Err(_), _) => {
                self.forget_removed().await;
                None
            }
        };
        // Image references are short (the distribution spec caps a repository name at 255
        // bytes); a longer one is not worth keeping in the pods' timelines.
        let image = image.filter(|i| i.len() <= MAX_RECORDED_REFERENCE);
        if let (Some(log), Some(image)) = (&self.pull_log, image) {
            log.record(crate::starts::PullRecord {
                start_ns: crate::time::unix_ns(started),
                end_ns: crate::time::unix_ns(ended),
                image,
                pod: uid,
                ok: pulled.is_ok(),
                served: served.map(|s| s.kind().to_string()),
                source: None,
            });
        }
        pulled
    }

    async fn remove_image(
        &self,
        request: Request<RemoveImageRequest>,
    ) -> Result<Response<RemoveImageResponse>, Status> {
        let removed = self.upstream().remove_image(forwarded(request)).await?;
        self.forget_removed().await;
        Ok(removed)
    }

    async fn image_fs_info(
        &self,
        request: Request<ImageFsInfoRequest>,
    ) -> Result<Response<ImageFsInfoResponse>, Status> {
        let mut answer = self.upstream().image_fs_info(forwarded(request)).await?;
        let Some(usage) = self.disk_usage.clone() else {
            return Ok(answer);
        };
        let ours = |fs: &FilesystemUsage| {
            fs.fs_id.as_ref().is_some_and(|id| {
                Path::new(&id.mountpoint).file_name() == Some(std::ffi::OsStr::new(IMAGE_FS))
            })
        };
        if !answer.get_ref().image_filesystems.iter().any(ours) {
            return Ok(answer);
        }
        let (bytes, inodes) = tokio::task::spawn_blocking(move || usage())
            .await
            .map_err(|e| {
                Status::internal(format!("measuring the snapshotter's disk usage: {e}"))
            })?;
        for fs in &mut answer.get_mut().image_filesystems {
            if ours(fs) {
                fs.used_bytes = Some(UInt64Value { value: bytes });
                fs.inodes_used = Some(UInt64Value { value: inodes });
            }
        }
        Ok(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_come_apart_or_as_docker_auth_and_bad_ones_are_refused() {
        let apart = AuthConfig {
            username: "alice".into(),
            password: "s3cret".into(),
            ..Default::default()
        };
        let expected = Credentials {
            username: "alice".into(),
            password: "s3cret".into(),
        };
        assert_eq!(credentials(&apart), Ok(Some(expected.clone())));
        let docker = AuthConfig {
            auth: "YWxpY2U6czNjcmV0".into(), // alice:s3cret
            ..Default::default()
        };
        assert_eq!(credentials(&docker), Ok(Some(expected)));
        let token = AuthConfig {
            identity_token: "tok".into(),
            ..Default::default()
        };
        assert_eq!(
            credentials(&token).map(|c| c.map(|c| c.password)),
            Ok(Some("tok".into()))
        );
        assert_eq!(credentials(&AuthConfig::default()), Ok(None));
        for bad in ["%%%", "bm9jb2xvbg=="] {
            let auth = AuthConfig {
                auth: bad.into(),
                ..Default::default()
            };
            assert!(credentials(&auth).is_err(), "{bad}");
        }
        let huge = AuthConfig {
            username: "u".into(),
            password: "p".repeat(MAX_CREDENTIALS),
            ..Default::default()
        };
        assert!(credentials(&huge).is_err());
        let bearer = AuthConfig {
            registry_token: "t".into(),
            ..Default::default()
        };
        assert!(credentials(&bearer).is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_runtime_that_cannot_be_reached_is_an_answer_not_a_wait() {
        let dir =
            std::env::temp_dir().join(format!("imgstream-image-proxy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let socket = dir.join("kubelet").join("image.sock");
        let keyring = Arc::new(Keyring::new(crate::registry::keyring::DEFAULT_TTL));
        let proxy = ImageProxy::new(&dir.join("no-runtime.sock"), keyring).expect("a lazy channel");
        let listener = ImageProxy::listen(&socket).expect("the socket, its directory created");
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&socket)
                .expect("the socket")
                .permissions()
                .mode();
            assert_eq!(
                mode & 0o777,
                0o600,
                "only its owner (kubelet's root) may call it"
            );
        }
        let shutdown = Shutdown::new();
        let server = tokio::spawn(proxy.serve(listener, socket.clone(), shutdown.clone()));
        let channel = super::super::channel(&socket)
            .await
            .expect("the proxy answers");
        let mut client = ImageServiceClient::new(channel);
        let pull = PullImageRequest {
            image: Some(k8s_cri::v1::ImageSpec {
                image: "reg:5000/team/app:v1".into(),
                ..Default::default()
            }),
            auth: Some(AuthConfig {
                username: "u".into(),
                password: "p".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        // A generous bound, so that a hang fails the test instead of stalling it.
        let bound = std::time::Duration::from_secs(60);
        let pulled = tokio::time::timeout(bound, client.pull_image(pull))
            .await
            .expect("an answer, not a wait");
        let status = pulled.expect_err("no runtime, no image");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        let listed = tokio::time::timeout(bound, client.list_images(ListImagesRequest::default()))
            .await
            .expect("an answer, not a wait");
        assert_eq!(
            listed.expect_err("no runtime").code(),
            tonic::Code::Unavailable
        );
        shutdown.trigger();
        server
            .await
            .expect("the server task ends without a panic")
            .expect("the server ends cleanly");
        assert!(
            !socket.exists(),
            "the socket is removed when the proxy stops"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_forwarded_call_keeps_kubelets_deadline_and_nothing_else_it_sent() {
        let mut request = Request::new(ListImagesRequest::default());
        let metadata = request.metadata_mut();
        metadata.insert("grpc-timeout", "2000m".parse().expect("ascii"));
        metadata.insert("x-from-kubelet", "1".parse().expect("ascii"));
        let passed = forwarded(request);
        assert_eq!(
            passed
                .metadata()
                .get("grpc-timeout")
                .map(|v| v.to_str().expect("ascii")),
            Some("2000m")
        );
        assert!(passed.metadata().get("x-from-kubelet").is_none());
        assert!(
            forwarded(Request::new(ListImagesRequest::default()))
                .metadata()
                .get("grpc-timeout")
                .is_none()
        );
    }

    #[test]
    fn credentials_go_with_the_last_image_of_their_repository_but_not_mid_pull() {
        let repo = |name: &str| ("reg".to_string(), name.to_string());
        let kept = vec![repo("gone"), repo("listed"), repo("pulling")];
        let present = BTreeSet::from([repo("listed"), repo("other")]);
        // Another image's pull failed meanwhile: the one still pulling keeps its own.
        let pulling = BTreeSet::from([repo("pulling")]);
        assert_eq!(unused(kept.clone(), &present, &pulling), vec![repo("gone")]);
        assert_eq!(
            unused(kept, &present, &BTreeSet::new()),
            vec![repo("gone"), repo("pulling")]
        );
    }

    #[tokio::test]
    async fn a_pull_counts_while_it_lives_even_when_abandoned() {
        let keyring = Arc::new(Keyring::new(crate::registry::keyring::DEFAULT_TTL));
        let proxy = ImageProxy::new(Path::new("/nonexistent/cri.sock"), keyring).expect("lazy");
        let repo = ("reg".to_string(), "app".to_string());
        let first = Pulling::start(&proxy, repo.clone());
        let second = Pulling::start(&proxy, repo.clone());
        drop(first);
        assert!(crate::sync::lock(&proxy.pulling).contains_key(&repo));
        drop(second);
        assert!(crate::sync::lock(&proxy.pulling).is_empty());
    }

    #[test]
    fn images_are_keyed_by_the_repository_the_snapshotter_sees() {
        assert_eq!(
            repository_of("reg:5000/team/app:v1"),
            Some(("reg:5000".into(), "team/app".into()))
        );
        assert_eq!(
            repository_of(
                "reg:5000/team/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
            ),
            Some(("reg:5000".into(), "team/app".into()))
        );
        assert_eq!(
            repository_of("nginx"),
            Some(("docker.io".into(), "library/nginx".into()))
        );
    }
}
