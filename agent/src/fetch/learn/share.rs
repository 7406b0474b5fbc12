//! Learned lists shared through the registry, so that a node's first start of an image can
//! prefetch what another node learned, with no new image.
//!
//! A learned list is published as an OCI artifact attached to the image manifest it was
//! learned under: an image manifest with `artifactType` [`ARTIFACT_TYPE`], the empty config,
//! one blob (the list, as [`super`] stores it) annotated with its layer ([`LAYER_ANNOTATION`]),
//! and `subject` the image manifest. A registry with the OCI referrers API lists it under the
//! subject by itself; for one without (the distribution registry before v3, most mirrors) the
//! tag fallback of the distribution spec is kept too: an image index tagged
//! `sha256-<subject hex>` that lists the artifacts. Two nodes that update the fallback index
//! at the same moment can lose one's entry: that node's list is then not shared, nothing else
//! is lost.
//!
//! Everything read back is untrusted: the referrers index and the artifact manifest are
//! bounded like any manifest and checked against their digests, at most one artifact is read
//! per layer, its list blob is bounded and checked against its descriptor, must name the layer
//! it is used for, and its offsets are checked against the layer's TOC when applied.

use std::{path::PathBuf, sync::Arc};

use bytes::Bytes;

use super::{MAX_FILE_BYTES, Stored};
use crate::{
    oci::{
        digest::Digest,
        manifest::{self, Descriptor, Document, Index, MAX_MANIFEST, OCI_INDEX, OCI_MANIFEST},
    },
    registry::{BlobSink, BlobSource, RegistryError},
};

/// `artifactType` of a learned list's manifest, and media type of its blob.
pub const ARTIFACT_TYPE: &str = "application/vnd.imgstream.learned-prefetch.v1+json";
/// Annotation naming the layer (its digest) a list is for.
pub const LAYER_ANNOTATION: &str = "dev.imgstream.layer";
/// The OCI empty descriptor's media type (an artifact with no config of its own).
const EMPTY_TYPE: &str = "application/vnd.oci.empty.v1+json";
const EMPTY: &[u8] = b"{}";
/// Entries the tag fallback index takes at most: nodes publish only lists they learned
/// because none was shared, so more means something publishes in a loop.
const MAX_FALLBACK_ENTRIES: usize = 256;

/// What a mount does with lists in the registry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Sharing {
    /// Learned lists stay on the node.
    #[default]
    Off,
    /// Lists other nodes published are used for layers with none of their own.
    Use,
    /// As `Use`, and what this node learns is published.
    Publish,
}

impl std::str::FromStr for Sharing {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Self::Off),
            "use" => Ok(Self::Use),
            "publish" => Ok(Self::Publish),
            other => Err(format!("{other:?}: expected off, use or publish")),
        }
    }
}

/// Errors sharing a learned list.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("the referrers of {subject} are not an image index")]
    NotAnIndex { subject: Digest },
    #[error("artifact {artifact}: {why}")]
    BadArtifact { artifact: Digest, why: String },
    #[error("storing the list")]
    Save(#[source] std::io::Error),
    #[error("encoding")]
    Encode(#[source] serde_json::Error),
}

/// An image's lists in its registry, for one mount.
#[derive(Clone)]
pub struct Shared {
    pub source: Arc<dyn BlobSource>,
    /// Where this node's lists are published; `None`: they are not.
    pub sink: Option<Arc<dyn BlobSink>>,
    /// The image manifest lists are attached to.
    pub subject: Descriptor,
    /// The learned directory lists found are written to.
    pub dir: PathBuf,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("source", &self.source.name())
            .field("publish", &self.sink.is_some())
            .field("subject", &self.subject.digest)
            .finish_non_exhaustive()
    }
}

/// The tag the distribution spec's referrers fallback uses for `subject`.
fn fallback_tag(subject: &Digest) -> String {
    format!("sha256-{}", subject.hex())
}

impl Shared {
    /// Fetches the lists published for `layers` (those with no list on this node) and writes
    /// them to the learned directory. Returns the layers that got one.
    pub async fn fetch(&self, layers: &[Digest]) -> Result<Vec<Digest>, ShareError> {
        if layers.is_empty() {
            return Ok(Vec::new());
        }
        let (index, _) = self.referrers().await?;
        let mut found = Vec::new();
        for layer in layers {
            let Some(entry) = index.manifests.iter().find(|d| lists(d, layer)) else {
                continue;
            };
            match self.fetch_one(entry, layer).await {
                Ok(stored) => {
                    super::save(&self.dir, &stored).map_err(ShareError::Save)?;
                    found.push(*layer);
                }
                Err(err) => {
                    let err = crate::error_chain(&err);
                    tracing::warn!(%err, %layer, artifact = %entry.digest, "shared learned list unusable; ignored");
                }
            }
        }
        Ok(found)
    }

    async fn fetch_one(&self, entry: &Descriptor, layer: &Digest) -> Result<Stored, ShareError> {
        let artifact = entry.digest;
        let bad = |why: String| ShareError::BadArtifact { artifact, why };
        let fetched = self.source.manifest(&artifact.to_string()).await?;
        let Document::Manifest(m) = manifest::parse(&fetched.bytes, OCI_MANIFEST)
            .map_err(|e| bad(crate::error_chain(&e)))?
        else {
            return Err(bad("not an image manifest".into()));
        };
        let blob = m
            .layers
            .iter()
            .find(|d| d.media_type == ARTIFACT_TYPE)
            .ok_or_else(|| bad(format!("no {ARTIFACT_TYPE} blob")))?;
        if blob.size > MAX_FILE_BYTES {
            return Err(bad(format!(
                "its list is {} bytes, more than {MAX_FILE_BYTES}",
                blob.size
            )));
        }
        let bytes = self.source.blob(blob).await?;
        let stored: Stored = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        if stored.layer != *layer {
            return Err(bad(format!("its list is for layer {}", stored.layer)));
        }
        Ok(stored)
    }

    /// The artifacts attached to the subject, and whether the registry has the referrers API
    /// (else they come from the tag fallback, empty when it is absent).
    async fn referrers(&self) -> Result<(Index, bool), ShareError> {
        let subject = self.subject.digest;
        let not_index = || ShareError::NotAnIndex { subject };
        let (bytes, api) = match self.source.referrers(&subject, ARTIFACT_TYPE).await? {
            Some(bytes) => (bytes, true),
            None => match self.source.manifest(&fallback_tag(&subject)).await {
                Ok(fetched) => (fetched.bytes, false),
                Err(RegistryError::NotFound { .. }) => return Ok((empty_index(), false)),
                Err(err) => return Err(err.into()),
            },
        };
        match manifest::parse(&bytes, OCI_INDEX) {
            Ok(Document::Index(index)) => Ok((index, api)),
            _ => Err(not_index()),
        }
    }

    /// Publishes a list this node learned. Returns the artifact's digest.
    pub async fn publish(&self, stored: &Stored) -> Result<Option<Digest>, ShareError> {
        let Some(sink) = &self.sink else {
            return Ok(None);
        };
        let list = Bytes::from(serde_json::to_vec(stored).map_err(ShareError::Encode)?);
        let mut list_desc = Descriptor::of(ARTIFACT_TYPE, &list);
        list_desc
            .annotations
            .insert(LAYER_ANNOTATION.into(), stored.layer.to_string());
        let config = Descriptor::of(EMPTY_TYPE, EMPTY);
        for (desc, bytes) in [(&config, Bytes::from_static(EMPTY)), (&list_desc, list)] {
            if !sink.has_blob(&desc.digest).await? {
                sink.put_blob(desc, bytes).await?;
            }
        }
        let artifact = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": ARTIFACT_TYPE,
            "config": config,
            "layers": [list_desc],
            "subject": self.subject,
            "annotations": { LAYER_ANNOTATION: stored.layer.to_string() },
        });
        let bytes = Bytes::from(serde_json::to_vec(&artifact).map_err(ShareError::Encode)?);
        let mut entry = Descriptor::of(OCI_MANIFEST, &bytes);
        let digest = sink.put_manifest(None, OCI_MANIFEST, bytes).await?;
        let (mut index, api) = self.referrers().await?;
        if api || index.manifests.iter().any(|d| d.digest == digest) {
            return Ok(Some(digest));
        }
        if index.manifests.len() >= MAX_FALLBACK_ENTRIES {
            tracing::warn!(subject = %self.subject.digest, entries = index.manifests.len(), "the referrers tag is full; this list is not listed");
            return Ok(Some(digest));
        }
        entry
            .annotations
            .insert(LAYER_ANNOTATION.into(), stored.layer.to_string());
        entry
            .extra
            .insert("artifactType".into(), ARTIFACT_TYPE.into());
        index.manifests.push(entry);
        let bytes = serde_json::to_vec(&index).map_err(ShareError::Encode)?;
        sink.put_manifest(
            Some(&fallback_tag(&self.subject.digest)),
            OCI_INDEX,
            bytes.into(),
        )
        .await?;
        Ok(Some(digest))
    }
}

/// Whether index entry `d` is a learned list for `layer`.
fn lists(d: &Descriptor, layer: &Digest) -> bool {
    d.media_type == OCI_MANIFEST
        && d.size <= MAX_MANIFEST as u64
        && d.extra.get("artifactType").and_then(|v| v.as_str()) == Some(ARTIFACT_TYPE)
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
    fn only_entries_of_our_type_for_the_layer_are_taken() {
        let layer = Digest::of(b"layer");
        let mut d = Descriptor::of(OCI_MANIFEST, b"artifact");
        assert!(!lists(&d, &layer), "no artifactType");
        d.extra.insert("artifactType".into(), ARTIFACT_TYPE.into());
        assert!(!lists(&d, &layer), "no layer annotation");
        d.annotations
            .insert(LAYER_ANNOTATION.into(), Digest::of(b"other").to_string());
        assert!(!lists(&d, &layer), "another layer");
        d.annotations
            .insert(LAYER_ANNOTATION.into(), layer.to_string());
        assert!(lists(&d, &layer));
        d.size = MAX_MANIFEST as u64 + 1;
        assert!(!lists(&d, &layer), "larger than any manifest");
    }

    #[test]
    fn sharing_parses_its_three_words_only() {
        assert_eq!("use".parse(), Ok(Sharing::Use));
        assert_eq!("publish".parse(), Ok(Sharing::Publish));
        assert_eq!("off".parse(), Ok(Sharing::Off));
        assert!("on".parse::<Sharing>().is_err());
    }
}
