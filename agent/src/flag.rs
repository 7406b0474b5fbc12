//! Flagging pods hit by the rename-ENXIO regression in the Kubernetes API (kube-rs, with the
//! pod's in-cluster service account): a Warning Event on the pod (reason
//! `RenameSymlinkENXIO`), an annotation on the pod, and a condition on the node. And
//! [`PodEvents`]: the Normal Event `ImageStreaming` on a pod whose image imgstream streams.
//!
//! Deduplicated (one flag per pod and path) and rate-limited (at most one Event per pod per
//! `min_interval`); the node condition is set once. The API is never asked more than that,
//! however often a crash-looping container trips over the same symlink.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Event, EventSource, Node, ObjectReference, Pod};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};

use crate::starts::store::FlagRecord;

/// The Event reason and the node condition type.
pub const REASON: &str = "RenameSymlinkENXIO";
pub const NODE_CONDITION: &str = "ImgstreamRenameENXIO";
/// The pod annotation: the failing path and time of the latest flag.
pub const ANNOTATION: &str = "imgstream.io/rename-enxio";
const FIX: &str = "an overlayfs regression on FUSE-backed images, fixed in Linux 6.6 and 6.1.55 \
                   (overlayfs: make sure that symlink renames work on FUSE lower layers); \
                   upgrade the node's kernel";

/// Where the API is and how often to bother it.
#[derive(Clone, Debug)]
pub struct KubeConfig {
    /// This node's name (the DaemonSet passes `spec.nodeName`).
    pub node_name: String,
    /// An API server URL; `None` uses the in-cluster configuration.
    pub api_url: Option<String>,
    /// Least time between two Events for one pod.
    pub min_interval: Duration,
}

/// Errors flagging.
#[derive(Debug, thiserror::Error)]
pub enum FlagError {
    #[error("Kubernetes client configuration: {0}")]
    Config(String),
    #[error("Kubernetes API: {what}: {source}")]
    Api {
        what: String,
        #[source]
        source: Box<kube::Error>,
    },
}

/// What happened to one flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Event, annotation (and the node condition the first time) written.
    Flagged,
    /// This pod and path were flagged before.
    Duplicate,
    /// The pod had an Event less than `min_interval` ago.
    RateLimited,
    /// Not attributed to a pod (no namespace and name from CRI).
    NoPod,
}

/// Writes flags to the API.
pub struct Flagger {
    client: Client,
    config: KubeConfig,
    seen: HashSet<(String, String)>,
    last_event: HashMap<String, Instant>,
    node_flagged: bool,
}

impl std::fmt::Debug for Flagger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flagger")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Most (pod, path) pairs remembered; past it, the memory starts over.
const SEEN_CAP: usize = 65_536;

/// A client for the API `config` names (in-cluster when it names none).
fn client(config: &KubeConfig) -> Result<Client, FlagError> {
    let client_config = match &config.api_url {
        Some(url) => kube::Config::new(
            url.parse()
                .map_err(|e| FlagError::Config(format!("{url}: {e}")))?,
        ),
        None => kube::Config::incluster().map_err(|e| FlagError::Config(e.to_string()))?,
    };
    Client::try_from(client_config).map_err(|e| FlagError::Config(e.to_string()))
}

/// The Event reason on a pod whose image is streamed, as GKE's image streaming names it.
pub const STREAMING_REASON: &str = "ImageStreaming";

/// A pod as the runtime's PullImage names it (its sandbox's metadata).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodName {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// Normal Events on pods, for what imgstream did for them.
#[derive(Clone)]
pub struct PodEvents {
    client: Client,
    node_name: String,
}

impl std::fmt::Debug for PodEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodEvents")
            .field("node_name", &self.node_name)
            .finish_non_exhaustive()
    }
}

impl PodEvents {
    pub fn new(config: &KubeConfig) -> Result<Self, FlagError> {
        Ok(Self {
            client: client(config)?,
            node_name: config.node_name.clone(),
        })
    }

    /// Tells `pod` that `image` is backed by imgstream: `lazy` of the `layers` its pull
    /// brought are streamed.
    pub async fn image_streaming(
        &self,
        pod: &PodName,
        image: &str,
        lazy: u32,
        layers: u32,
    ) -> Result<(), FlagError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
        let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::chrono::DateTime::from_timestamp_nanos(nanos),
        );
        let event = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{}.imgstream-", pod.name)),
                namespace: Some(pod.namespace.clone()),
                ..Default::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod.name.clone()),
                namespace: Some(pod.namespace.clone()),
                uid: (!pod.uid.is_empty()).then(|| pod.uid.clone()),
                ..Default::default()
            },
            reason: Some(STREAMING_REASON.into()),
            message: Some(format!(
                "image {image} is backed by imgstream: {lazy} of {layers} layers lazy"
            )),
            type_: Some("Normal".into()),
            source: Some(EventSource {
                component: Some("imgstream".into()),
                host: Some(self.node_name.clone()),
            }),
            reporting_component: Some("imgstream".into()),
            reporting_instance: Some(self.node_name.clone()),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            count: Some(1),
            ..Default::default()
        };
        Api::<Event>::namespaced(self.client.clone(), &pod.namespace)
            .create(&PostParams::default(), &event)
            .await
            .map(|_| ())
            .map_err(|source| FlagError::Api {
                what: format!("creating an Event for pod {}/{}", pod.namespace, pod.name),
                source: Box::new(source),
            })
    }
}

impl Flagger {
    pub async fn new(config: KubeConfig) -> Result<Self, FlagError> {
        let client = client(&config)?;
        Ok(Self {
            client,
            config,
            seen: HashSet::new(),
            last_event: HashMap::new(),
            node_flagged: false,
        })
    }

    /// Flags the pod of `flag`, unless a duplicate or rate-limited.
    pub async fn flag(&mut self, flag: &FlagRecord) -> Result<Outcome, FlagError> {
        let (Some(namespace), Some(pod)) = (&flag.pod.namespace, &flag.pod.name) else {
            return Ok(Outcome::NoPod);
        };
        let pod_key = flag
            .pod
            .uid
            .clone()
            .unwrap_or_else(|| format!("{namespace}/{pod}"));
        if !self.seen.insert((pod_key.clone(), flag.path.clone())) {
            return Ok(Outcome::Duplicate);
        }
        if self.seen.len() > SEEN_CAP {
            self.seen.clear();
        }
        if self
            .last_event
            .get(&pod_key)
            .is_some_and(|t| t.elapsed() < self.config.min_interval)
        {
            return Ok(Outcome::RateLimited);
        }
        self.last_event.insert(pod_key, Instant::now());
        let message = format!(
            "renaming the symlink {} (to {}) failed with ENXIO in container {}: {FIX}",
            flag.path,
            flag.new_path,
            flag.pod.container.as_deref().unwrap_or("?")
        );
        let api_err = |what: String| {
            move |source| FlagError::Api {
                what,
                source: Box::new(source),
            }
        };

        let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::chrono::DateTime::from_timestamp_nanos(flag.time_ns as i64),
        );
        let event = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{pod}.imgstream-")),
                namespace: Some(namespace.clone()),
                ..Default::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod.clone()),
                namespace: Some(namespace.clone()),
                uid: flag.pod.uid.clone(),
                ..Default::default()
            },
            reason: Some(REASON.into()),
            message: Some(message.clone()),
            type_: Some("Warning".into()),
            source: Some(EventSource {
                component: Some("imgstream".into()),
                host: Some(self.config.node_name.clone()),
            }),
            reporting_component: Some("imgstream".into()),
            reporting_instance: Some(self.config.node_name.clone()),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            count: Some(1),
            ..Default::default()
        };
        Api::<Event>::namespaced(self.client.clone(), namespace)
            .create(&PostParams::default(), &event)
            .await
            .map_err(api_err(format!(
                "creating an Event for pod {namespace}/{pod}"
            )))?;

        let annotation = serde_json::json!({
            "metadata": {"annotations": {ANNOTATION: format!("{} at {}", flag.path, flag.time)}}
        });
        Api::<Pod>::namespaced(self.client.clone(), namespace)
            .patch(pod, &PatchParams::default(), &Patch::Merge(&annotation))
            .await
            .map_err(api_err(format!("annotating pod {namespace}/{pod}")))?;

        if !self.node_flagged {
            let condition = serde_json::json!({
                "status": {"conditions": [{
                    "type": NODE_CONDITION,
                    "status": "True",
                    "reason": REASON,
                    "message": format!("a container on this node hit the rename-ENXIO regression: {FIX}"),
                    "lastHeartbeatTime": flag.time,
                    "lastTransitionTime": flag.time,
                }]}
            });
            Api::<Node>::all(self.client.clone())
                .patch_status(
                    &self.config.node_name,
                    &PatchParams::default(),
                    &Patch::Strategic(&condition),
                )
                .await
                .map_err(api_err(format!(
                    "setting condition {NODE_CONDITION} on node {}",
                    self.config.node_name
                )))?;
            self.node_flagged = true;
        }
        Ok(Outcome::Flagged)
    }
}
