//! Pod metadata from the container runtime's CRI socket (containerd's CRI plugin, CRI-O):
//! which pod, namespace and image a container id belongs to, from the labels kubelet put on
//! it (`io.kubernetes.pod.*`), and whether an id is a pod sandbox rather than a container.
//! [`image_proxy`] stands between kubelet and the runtime's image service.

use std::{collections::BTreeMap, path::Path, time::Duration};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::{
    ContainerFilter, ContainerStatusRequest, ListContainersRequest, PodSandboxStatusRequest,
    runtime_service_client::RuntimeServiceClient,
};
use tonic::transport::{Channel, Endpoint};

pub mod image_proxy;

/// Errors talking to the CRI socket.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("the CRI endpoint for {0}")]
    Endpoint(std::path::PathBuf, #[source] tonic::transport::Error),
    #[error("connecting to the CRI socket {0}")]
    Connect(std::path::PathBuf, #[source] tonic::transport::Error),
    #[error("CRI {call}: {status}")]
    Call {
        call: &'static str,
        status: Box<tonic::Status>,
    },
}

/// What the runtime knows of a container id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    Container(ContainerMeta),
    /// A pod sandbox (its pause container), not a workload.
    Sandbox,
    /// Not a CRI container (for instance one started with `ctr run`).
    Unknown,
}

/// A CRI container's identity.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerMeta {
    pub pod: crate::attribution::PodRef,
    pub image: Option<String>,
    /// How many times kubelet restarted it before (`metadata.attempt`).
    pub attempt: u32,
    pub labels: BTreeMap<String, String>,
}

/// A client of one CRI socket.
#[derive(Clone, Debug)]
pub struct Cri {
    client: RuntimeServiceClient<Channel>,
}

impl Cri {
    /// Connects to the unix socket at `path`.
    pub async fn connect(path: &Path) -> Result<Self, CriError> {
        Ok(Self {
            client: RuntimeServiceClient::new(channel(path).await?),
        })
    }
}

/// The endpoint of the unix socket at `path`, with the connect timeout every channel here
/// has. The URI is required by the API and unused: the connector dials the socket.
fn endpoint(path: &Path) -> Result<Endpoint, CriError> {
    Ok(Endpoint::try_from("http://cri.invalid")
        .map_err(|e| CriError::Endpoint(path.to_path_buf(), e))?
        .connect_timeout(Duration::from_secs(5)))
}

/// Dials the unix socket at `path`, once per connection the channel makes.
fn dialer(
    path: &Path,
) -> impl tower::Service<
    tonic::transport::Uri,
    Response = TokioIo<tokio::net::UnixStream>,
    Error = std::io::Error,
    Future = impl Future<Output = std::io::Result<TokioIo<tokio::net::UnixStream>>> + Send,
> + Clone
+ Send
+ 'static {
    let socket = path.to_path_buf();
    tower::service_fn(move |_| {
        let socket = socket.clone();
        async move { Ok(TokioIo::new(tokio::net::UnixStream::connect(socket).await?)) }
    })
}

/// A gRPC channel to the CRI socket at `path` that connects at its first call and again
/// after the runtime restarts: a call while the socket is gone fails at once (`Unavailable`)
/// or within the connect timeout. Calls carry their callers' deadlines; the channel has none.
pub fn lazy_channel(path: &Path) -> Result<Channel, CriError> {
    Ok(endpoint(path)?.connect_with_connector_lazy(dialer(path)))
}

/// A gRPC channel to the CRI (or any) unix socket at `path`.
pub async fn channel(path: &Path) -> Result<Channel, CriError> {
    endpoint(path)?
        // Calls carry their own deadlines (a pull can take minutes).
        .timeout(Duration::from_secs(600))
        .connect_with_connector(dialer(path))
        .await
        .map_err(|e| CriError::Connect(path.to_path_buf(), e))
}

impl Cri {
    /// The runtime's view of container (or sandbox) `id`.
    pub async fn lookup(&self, id: &str) -> Result<Lookup, CriError> {
        let mut client = self.client.clone();
        let status = client
            .container_status(ContainerStatusRequest {
                container_id: id.to_string(),
                verbose: false,
            })
            .await;
        match status {
            Ok(response) => {
                let Some(status) = response.into_inner().status else {
                    return Ok(Lookup::Unknown);
                };
                let label = |k: &str| status.labels.get(k).cloned();
                let image = status
                    .image
                    .as_ref()
                    .map(|i| i.image.clone())
                    .filter(|i| !i.is_empty() && !i.starts_with("sha256:"))
                    .or_else(|| Some(status.image_ref.clone()).filter(|i| !i.is_empty()));
                let mut meta = ContainerMeta {
                    pod: crate::attribution::PodRef {
                        uid: label("io.kubernetes.pod.uid"),
                        namespace: label("io.kubernetes.pod.namespace"),
                        name: label("io.kubernetes.pod.name"),
                        container: label("io.kubernetes.container.name")
                            .or_else(|| status.metadata.as_ref().map(|m| m.name.clone())),
                    },
                    image,
                    attempt: status.metadata.as_ref().map_or(0, |m| m.attempt),
                    labels: status.labels.into_iter().collect(),
                };
                if meta.pod.name.is_none() {
                    // Not created by kubelet (no io.kubernetes labels): ask the sandbox.
                    self.fill_from_sandbox(id, &mut meta).await?;
                }
                Ok(Lookup::Container(meta))
            }
            Err(status) if status.code() == tonic::Code::NotFound => {
                let sandbox = client
                    .pod_sandbox_status(PodSandboxStatusRequest {
                        pod_sandbox_id: id.to_string(),
                        verbose: false,
                    })
                    .await;
                match sandbox {
                    Ok(_) => Ok(Lookup::Sandbox),
                    Err(status) if status.code() == tonic::Code::NotFound => Ok(Lookup::Unknown),
                    Err(status) => Err(CriError::Call {
                        call: "PodSandboxStatus",
                        status: Box::new(status),
                    }),
                }
            }
            Err(status) => Err(CriError::Call {
                call: "ContainerStatus",
                status: Box::new(status),
            }),
        }
    }

    /// Pod name, namespace and UID from the container's sandbox metadata.
    async fn fill_from_sandbox(&self, id: &str, meta: &mut ContainerMeta) -> Result<(), CriError> {
        let mut client = self.client.clone();
        let listed = client
            .list_containers(ListContainersRequest {
                filter: Some(ContainerFilter {
                    id: id.to_string(),
                    ..Default::default()
                }),
            })
            .await
            .map_err(|status| CriError::Call {
                call: "ListContainers",
                status: Box::new(status),
            })?;
        let Some(sandbox_id) = listed
            .into_inner()
            .containers
            .into_iter()
            .find(|c| c.id == id)
            .map(|c| c.pod_sandbox_id)
        else {
            return Ok(());
        };
        let sandbox = client
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: sandbox_id,
                verbose: false,
            })
            .await
            .map_err(|status| CriError::Call {
                call: "PodSandboxStatus",
                status: Box::new(status),
            })?;
        if let Some(m) = sandbox.into_inner().status.and_then(|s| s.metadata) {
            meta.pod.name = Some(m.name);
            meta.pod.namespace = Some(m.namespace);
            meta.pod.uid = Some(m.uid);
        }
        Ok(())
    }
}
