//! Where image bytes come from and go to: OCI distribution registries over HTTP(S), and OCI
//! image layouts on local disk (the built-in default, what `skopeo copy ... oci:DIR` writes).
//!
//! Both implement [`BlobSource`] (manifests, whole blobs with their digest checked, and byte
//! ranges of blobs) and [`BlobSink`] (uploads). Nothing here knows what a layer contains.

pub mod attached;
pub mod http;
pub mod keyring;
pub mod local;
pub mod provider;

use std::{ops::Range, path::Path};

use async_trait::async_trait;
use bytes::Bytes;

use crate::oci::{
    digest::{Digest, DigestError},
    manifest::{Descriptor, ManifestError},
    reference::{ImageRef, ReferenceError},
};

/// Largest blob fetched into memory with [`BlobSource::blob`] (configs, small layers).
pub const MAX_IN_MEMORY_BLOB: u64 = 64 << 20;

/// Errors fetching or storing image content.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid image reference")]
    Reference(#[from] ReferenceError),
    #[error("connecting to {url}")]
    Connect {
        url: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("request to {url} timed out after {secs} s")]
    Timeout { url: String, secs: u64 },
    #[error("{url} answered {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("{what} not found at {source_name}")]
    NotFound { what: String, source_name: String },
    #[error("{url} refused the credentials ({status}): {detail}")]
    Unauthorized {
        url: String,
        status: u16,
        detail: String,
    },
    #[error("content of {what} has digest {actual}, expected {expected}")]
    DigestMismatch {
        what: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("{what} is {actual} bytes, expected {expected}")]
    SizeMismatch {
        what: String,
        expected: u64,
        actual: u64,
    },
    #[error("{what} is larger than the {limit}-byte limit")]
    TooLarge { what: String, limit: u64 },
    #[error("invalid digest")]
    Digest(#[from] DigestError),
    #[error("invalid manifest")]
    Manifest(#[from] ManifestError),
    #[error("{0} holds no PEM certificate")]
    NoCertificate(std::path::PathBuf),
    #[error("setting up TLS: {what}")]
    Tls {
        what: String,
        #[source]
        source: rustls::Error,
    },
    #[error("building a request to {url}")]
    BadRequest {
        url: String,
        #[source]
        source: ::http::Error,
    },
    #[error("{0:?} is not a valid header value")]
    BadHeaderValue(String),
    #[error("more than {limit} redirects from {url}")]
    TooManyRedirects { url: String, limit: usize },
    #[error("location {location:?} from {base} is not a URL")]
    BadLocation { base: String, location: String },
    #[error("{url} answered the {what} without a Location")]
    MissingLocation { url: String, what: &'static str },
    #[error("{url} answered a range request for byte {asked} with a range from {answered:?}")]
    WrongRange {
        url: String,
        asked: u64,
        answered: Option<u64>,
    },
    #[error("{url} answered a request for a blob's last {asked} bytes with range {answered:?}")]
    WrongTail {
        url: String,
        asked: u64,
        answered: Option<String>,
    },
    #[error("empty range {start}..{end} of {what}")]
    EmptyRange { what: String, start: u64, end: u64 },
    #[error("{0} is not an image index")]
    NotAnIndex(std::path::PathBuf),
    #[error("{source_name} has several images tagged {tag:?}")]
    AmbiguousTag { source_name: String, tag: String },
    #[error("encoding an image index")]
    Encode(#[source] serde_json::Error),
    #[error("local I/O on {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("reading credentials from {path}: {detail}")]
    Credentials { path: String, detail: String },
    #[error("the client has no endpoint to ask")]
    NoEndpoint,
    #[error("every endpoint failed; the last error was from {last_endpoint}")]
    AllEndpointsFailed {
        last_endpoint: String,
        #[source]
        source: Box<RegistryError>,
    },
}

impl RegistryError {
    /// Whether the same request may succeed if tried again (network trouble, 5xx, a response
    /// cut short), as opposed to a definite answer (404, 401, a wrong digest at the source).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::Timeout { .. } => true,
            Self::Status { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            Self::SizeMismatch { .. } => true,
            Self::AllEndpointsFailed { source, .. } => source.is_retryable(),
            _ => false,
        }
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// A manifest or index as fetched, with the digest of its exact bytes.
#[derive(Clone, Debug)]
pub struct FetchedManifest {
    pub bytes: Bytes,
    pub media_type: String,
    pub digest: Digest,
}

/// Read access to an image repository.
#[async_trait]
pub trait BlobSource: Send + Sync {
    /// A manifest or index by tag or digest. When asked by digest, the bytes are checked.
    async fn manifest(&self, reference: &str) -> Result<FetchedManifest, RegistryError>;

    /// A whole blob in memory, its size and digest checked (up to [`MAX_IN_MEMORY_BLOB`]).
    async fn blob(&self, desc: &Descriptor) -> Result<Bytes, RegistryError>;

    /// A whole blob into `path` (created or truncated), its size and digest checked. On an
    /// error the file's content is unspecified.
    async fn blob_to_file(&self, desc: &Descriptor, path: &Path) -> Result<(), RegistryError>;

    /// Bytes `range` of a blob. Returns exactly `range.end - range.start` bytes or an error.
    async fn read_range(&self, digest: &Digest, range: Range<u64>) -> Result<Bytes, RegistryError>;

    /// The last `len` bytes of a blob (all of it when shorter) and the blob's size, for a
    /// caller that does not know the size yet: one request (a suffix range) where it would
    /// otherwise wait for the manifest first. `None` when the source cannot answer one;
    /// the caller then asks by [`BlobSource::read_range`].
    async fn read_tail(
        &self,
        digest: &Digest,
        len: u64,
    ) -> Result<Option<(Bytes, u64)>, RegistryError> {
        let _ = (digest, len);
        Ok(None)
    }

    /// Opens connections to the source ahead of a burst of requests, so that up to `n` of
    /// them are idle when it returns; nothing for sources with no connections. Never fails:
    /// a connection not opened now is opened by the request that needs it.
    async fn preconnect(&self, n: usize) {
        let _ = n;
    }

    /// A human-readable name for logs and errors.
    fn name(&self) -> String;

    /// The round trip to the source as its recent answers measured it (the shortest time to
    /// a response's first byte); `None` for sources with no network in between.
    fn round_trip(&self) -> Option<std::time::Duration> {
        None
    }

    /// The image index the OCI referrers API lists for manifest `subject`, filtered to
    /// `artifact_type` where the registry filters. `None` when the source has no referrers
    /// API: its referrers are then found through the tag fallback (`sha256-<hex>`).
    async fn referrers(
        &self,
        subject: &Digest,
        artifact_type: &str,
    ) -> Result<Option<Bytes>, RegistryError> {
        let _ = (subject, artifact_type);
        Ok(None)
    }
}

/// Times to first byte of recent requests; their minimum is the round trip (queues and
/// server work only ever add to it).
#[derive(Debug, Default)]
pub struct RoundTrips(std::sync::Mutex<std::collections::VecDeque<std::time::Duration>>);

impl RoundTrips {
    /// Answers remembered.
    const KEEP: usize = 32;

    pub fn observe(&self, took: std::time::Duration) {
        let mut recent = crate::sync::lock(&self.0);
        if recent.len() == Self::KEEP {
            recent.pop_front();
        }
        recent.push_back(took);
    }

    pub fn min(&self) -> Option<std::time::Duration> {
        crate::sync::lock(&self.0).iter().min().copied()
    }
}

/// Write access to an image repository.
#[async_trait]
pub trait BlobSink: Send + Sync {
    /// Whether the repository already has this blob.
    async fn has_blob(&self, digest: &Digest) -> Result<bool, RegistryError>;

    /// Stores a blob from memory.
    async fn put_blob(&self, desc: &Descriptor, bytes: Bytes) -> Result<(), RegistryError>;

    /// Stores a blob from a local file.
    async fn put_blob_file(&self, desc: &Descriptor, path: &Path) -> Result<(), RegistryError>;

    /// Makes a blob that repository `from` (same registry) has available here without
    /// uploading it. Returns whether that worked; `false` means it must be uploaded.
    async fn mount_blob(&self, desc: &Descriptor, from: &str) -> Result<bool, RegistryError>;

    /// Stores a manifest under `tag` (or only by digest when `tag` is `None`).
    async fn put_manifest(
        &self,
        tag: Option<&str>,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<Digest, RegistryError>;
}

/// Checks that `bytes` match `desc`'s size and digest.
pub(crate) fn check_content(
    desc: &Descriptor,
    bytes: &[u8],
    what: &str,
) -> Result<(), RegistryError> {
    if bytes.len() as u64 != desc.size {
        return Err(RegistryError::SizeMismatch {
            what: what.into(),
            expected: desc.size,
            actual: bytes.len() as u64,
        });
    }
    let actual = Digest::of(bytes);
    if actual != desc.digest {
        return Err(RegistryError::DigestMismatch {
            what: what.into(),
            expected: desc.digest,
            actual,
        });
    }
    Ok(())
}

/// Opens `image` for reading: an OCI layout or a registry repository.
pub fn open_source(
    image: &ImageRef,
    config: &http::HttpConfig,
) -> Result<std::sync::Arc<dyn BlobSource>, RegistryError> {
    Ok(match image {
        ImageRef::Layout { path, .. } => std::sync::Arc::new(local::LocalLayout::open(path)?),
        ImageRef::Registry {
            registry,
            repository,
            ..
        } => std::sync::Arc::new(http::RegistryClient::new(
            registry,
            repository,
            config.clone(),
        )?),
    })
}

/// Opens `image` for writing: an OCI layout (created if missing) or a registry repository.
pub fn open_sink(
    image: &ImageRef,
    config: &http::HttpConfig,
) -> Result<std::sync::Arc<dyn BlobSink>, RegistryError> {
    Ok(match image {
        ImageRef::Layout { path, .. } => std::sync::Arc::new(local::LocalLayout::create(path)?),
        ImageRef::Registry {
            registry,
            repository,
            ..
        } => std::sync::Arc::new(http::RegistryClient::new(
            registry,
            repository,
            config.clone(),
        )?),
    })
}
