//! Artifacts attached to an image manifest (OCI 1.1): data that belongs to an image without
//! being part of it, published beside it so that the image's own digest never changes.
//!
//! An artifact here is an image manifest with an `artifactType`, the empty config, one blob
//! annotated with the layer it is for ([`LAYER_ANNOTATION`]), and `subject` the image
//! manifest. A registry with the referrers API lists it under the subject by itself; for one
//! without (the distribution registry before v3, most mirrors) the spec's tag fallback is kept
//! too: an image index tagged `sha256-<subject hex>` listing the artifacts. Two writers that
//! update the fallback index at the same moment can lose one's entry: that artifact is then
//! not found, nothing else is lost.
//!
//! Everything read back is untrusted: the listing and the artifact manifest are bounded like
//! any manifest and checked against their digests, the blob is bounded by the caller and
//! checked against its descriptor; what the blob says is for the caller to check.

use std::sync::Arc;

use bytes::Bytes;

use super::{BlobSink, BlobSource, RegistryError};
use crate::oci::{
    digest::Digest,
    manifest::{self, Descriptor, Document, Index, MAX_MANIFEST, OCI_INDEX, OCI_MANIFEST},
};

/// Annotation naming the layer (its digest) an artifact is for.
pub const LAYER_ANNOTATION: &str = "dev.imgstream.layer";
/// The OCI empty descriptor's media type (an artifact with no config of its own).
const EMPTY_TYPE: &str = "application/vnd.oci.empty.v1+json";
const EMPTY: &[u8] = b"{}";
/// Entries the tag fallback index takes at most: more means something publishes in a loop.
const MAX_FALLBACK_ENTRIES: usize = 256;

/// Errors reading or writing attached artifacts.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("the referrers of {subject} are not an image index")]
    NotAnIndex { subject: Digest },
    #[error("artifact {artifact}: {why}")]
    BadArtifact { artifact: Digest, why: String },
    #[error("encoding an artifact")]
    Encode(#[source] serde_json::Error),
}

/// The artifacts attached to one image manifest.
#[derive(Clone)]
pub struct Attached {
    pub source: Arc<dyn BlobSource>,
    /// Where artifacts are published; `None`: read only.
    pub sink: Option<Arc<dyn BlobSink>>,
    /// The image manifest artifacts are attached to.
    pub subject: Descriptor,
}

impl std::fmt::Debug for Attached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attached")
            .field("source", &self.source.name())
            .field("publish", &self.sink.is_some())
            .field("subject", &self.subject.digest)
            .finish_non_exhaustive()
    }
}

/// What is attached to a subject, as listed by the referrers API or the tag fallback.
#[derive(Debug)]
pub struct Listing {
    pub index: Index,
    /// Listed by the referrers API (else by the tag fallback, or nothing).
    pub api: bool,
}

impl Listing {
    /// Nothing attached.
    pub fn empty() -> Self {
        Self {
            index: empty_index(),
            api: false,
        }
    }

    /// The entry of the artifact of `artifact_type` for `layer`, if one is listed.
    pub fn entry(&self, artifact_type: &str, layer: &Digest) -> Option<&Descriptor> {
        self.index
            .manifests
            .iter()
            .find(|d| is_for(d, artifact_type, layer))
    }
}

/// The tag the distribution spec's referrers fallback uses for `subject`.
fn fallback_tag(subject: &Digest) -> String {
    format!("sha256-{}", subject.hex())
}

/// The artifacts of `artifact_type` attached to image manifest `subject` in `source` (through
/// the referrers API, else the tag fallback; none when neither has any).
pub async fn listing(
    source: &dyn BlobSource,
    subject: &Digest,
    artifact_type: &str,
) -> Result<Listing, AttachError> {
    // Both asked at once: a registry without the API (distribution before v3, most mirrors)
    // would otherwise cost a round trip more on every pull; one with it, a small request
    // whose answer is not read.
    let tag = fallback_tag(subject);
    let (referrers, fallback) = tokio::join!(
        source.referrers(subject, artifact_type),
        source.manifest(&tag)
    );
    let (bytes, api) = match referrers? {
        Some(bytes) => (bytes, true),
        None => match fallback {
            Ok(fetched) => (fetched.bytes, false),
            Err(RegistryError::NotFound { .. }) => return Ok(Listing::empty()),
            Err(err) => return Err(err.into()),
        },
    };
    match manifest::parse(&bytes, OCI_INDEX) {
        Ok(Document::Index(index)) => Ok(Listing { index, api }),
        _ => Err(AttachError::NotAnIndex { subject: *subject }),
    }
}

impl Attached {
    /// The artifacts of `artifact_type` attached to the subject ([`listing`]).
    pub async fn listing(&self, artifact_type: &str) -> Result<Listing, AttachError> {
        listing(self.source.as_ref(), &self.subject.digest, artifact_type).await
    }

    /// The blob of the listed artifact `entry` (of `artifact_type`): at most `max` bytes.
    pub async fn blob(
        &self,
        entry: &Descriptor,
        artifact_type: &str,
        max: u64,
    ) -> Result<Bytes, AttachError> {
        Ok(self.blob_and_more(entry, artifact_type, max).await?.0)
    }

    /// [`Self::blob`], and the artifact's other blobs, not fetched ([`Self::publish_with`]).
    pub async fn blob_and_more(
        &self,
        entry: &Descriptor,
        artifact_type: &str,
        max: u64,
    ) -> Result<(Bytes, Vec<Descriptor>), AttachError> {
        let artifact = entry.digest;
        let bad = |why: String| AttachError::BadArtifact { artifact, why };
        let fetched = self.source.manifest(&artifact.to_string()).await?;
        let Document::Manifest(m) = manifest::parse(&fetched.bytes, OCI_MANIFEST)
            .map_err(|e| bad(crate::error_chain(&e)))?
        else {
            return Err(bad("not an image manifest".into()));
        };
        let blob = m
            .layers
            .iter()
            .find(|d| d.media_type == artifact_type)
            .ok_or_else(|| bad(format!("no {artifact_type} blob")))?;
        if blob.size > max {
            return Err(bad(format!(
                "its blob is {} bytes, more than {max}",
                blob.size
            )));
        }
        let others = m
            .layers
            .iter()
            .filter(|d| d.digest != blob.digest)
            .cloned()
            .collect();
        Ok((self.source.blob(blob).await?, others))
    }

    /// Attaches `blob` as the artifact of `artifact_type` for `layer`, listed by the
    /// referrers API or, where there is none, the tag fallback. Returns its digest.
    pub async fn publish(
        &self,
        artifact_type: &str,
        layer: &Digest,
        blob: Bytes,
    ) -> Result<Option<Digest>, AttachError> {
        self.publish_with(artifact_type, layer, blob, Vec::new())
            .await
    }

    /// [`Self::publish`], with `more` blobs (media type, bytes) in the same artifact after
    /// `blob`: a reader finds them listed in it, and the registry keeps them as long as it.
    pub async fn publish_with(
        &self,
        artifact_type: &str,
        layer: &Digest,
        blob: Bytes,
        more: Vec<(&str, Bytes)>,
    ) -> Result<Option<Digest>, AttachError> {
        let Some(sink) = &self.sink else {
            return Ok(None);
        };
        let mut blob_desc = Descriptor::of(artifact_type, &blob);
        blob_desc
            .annotations
            .insert(LAYER_ANNOTATION.into(), layer.to_string());
        let config = Descriptor::of(EMPTY_TYPE, EMPTY);
        let mut layers = vec![blob_desc.clone()];
        let mut blobs = vec![
            (config.clone(), Bytes::from_static(EMPTY)),
            (blob_desc, blob),
        ];
        for (media_type, bytes) in more {
            let desc = Descriptor::of(media_type, &bytes);
            layers.push(desc.clone());
            blobs.push((desc, bytes));
        }
        for (desc, bytes) in blobs {
            if !sink.has_blob(&desc.digest).await? {
                sink.put_blob(&desc, bytes).await?;
            }
        }
        let artifact = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": artifact_type,
            "config": config,
            "layers": layers,
            "subject": self.subject,
            "annotations": { LAYER_ANNOTATION: layer.to_string() },
        });
        let bytes = Bytes::from(serde_json::to_vec(&artifact).map_err(AttachError::Encode)?);
        let mut entry = Descriptor::of(OCI_MANIFEST, &bytes);
        let digest = sink.put_manifest(None, OCI_MANIFEST, bytes).await?;
        let Listing { mut index, api } = self.listing(artifact_type).await?;
        if api || index.manifests.iter().any(|d| d.digest == digest) {
            return Ok(Some(digest));
        }
        if index.manifests.len() >= MAX_FALLBACK_ENTRIES {
            tracing::warn!(subject = %self.subject.digest, entries = index.manifests.len(), "the referrers tag is full; this artifact is not listed");
            return Ok(Some(digest));
        }
        entry
            .annotations
            .insert(LAYER_ANNOTATION.into(), layer.to_string());
        entry
            .extra
            .insert("artifactType".into(), artifact_type.into());
        // Another artifact for the same layer and type is replaced, not piled up.
        index.manifests.retain(|d| !is_for(d, artifact_type, layer));
        index.manifests.push(entry);
        let bytes = serde_json::to_vec(&index).map_err(AttachError::Encode)?;
        sink.put_manifest(
            Some(&fallback_tag(&self.subject.digest)),
            OCI_INDEX,
            bytes.into(),
        )
        .await?;
        Ok(Some(digest))
    }
}

/// Whether listing entry `d` is an artifact of `artifact_type` for `layer`.
fn is_for(d: &Descriptor, artifact_type: &str, layer: &Digest) -> bool {
    d.media_type == OCI_MANIFEST
        && d.size <= MAX_MANIFEST as u64
        && d.extra.get("artifactType").and_then(|v| v.as_str()) == Some(artifact_type)
        && d.annotations.get(LAYER_ANNOTATION).map(String::as_str) == Some(&layer.to_string())
}

fn empty_index() -> Index {
    Index {
        schema_version: 2,
        media_type: Some(OCI_INDEX.into()),
        manifests: Vec::new(),
        annotations: Default::default(),
        extra: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_entries_of_the_type_for_the_layer_are_taken() {
        const TYPE: &str = "application/vnd.example.v1";
        let layer = Digest::of(b"layer");
        let mut d = Descriptor::of(OCI_MANIFEST, b"artifact");
        assert!(!is_for(&d, TYPE, &layer), "no artifactType");
        d.extra.insert("artifactType".into(), TYPE.into());
        assert!(!is_for(&d, TYPE, &layer), "no layer annotation");
        d.annotations
            .insert(LAYER_ANNOTATION.into(), Digest::of(b"other").to_string());
        assert!(!is_for(&d, TYPE, &layer), "another layer");
        d.annotations
            .insert(LAYER_ANNOTATION.into(), layer.to_string());
        assert!(is_for(&d, TYPE, &layer));
        assert!(!is_for(&d, "application/vnd.other", &layer), "another type");
        d.size = MAX_MANIFEST as u64 + 1;
        assert!(!is_for(&d, TYPE, &layer), "larger than any manifest");
    }
}
