//! Learned lists shared through the registry, so that a node's first start of an image can
//! prefetch what another node learned, with no new image: each list is an artifact attached
//! to the image manifest it was learned under ([`crate::registry::attached`]), its blob the
//! list as [`super`] stores it.
//!
//! A list read back is untrusted: at most one artifact is read per layer, its blob is bounded
//! ([`MAX_FILE_BYTES`]), must name the layer it is used for, and its offsets are checked
//! against the layer's TOC when applied.

use std::{path::PathBuf, sync::Arc};

use bytes::Bytes;

use super::{MAX_FILE_BYTES, Stored};
use crate::{
    oci::{digest::Digest, manifest::Descriptor},
    registry::{
        BlobSink, BlobSource,
        attached::{AttachError, Attached},
    },
};

/// `artifactType` of a learned list's manifest, and media type of its blob.
pub const ARTIFACT_TYPE: &str = "application/vnd.imgstream.learned-prefetch.v1+json";

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
    Attach(#[from] AttachError),
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

impl Shared {
    fn attached(&self) -> Attached {
        Attached {
            source: self.source.clone(),
            sink: self.sink.clone(),
            subject: self.subject.clone(),
        }
    }

    /// Fetches the lists published for `layers` (those with no list on this node) and writes
    /// them to the learned directory. Returns the layers that got one.
    pub async fn fetch(&self, layers: &[Digest]) -> Result<Vec<Digest>, ShareError> {
        if layers.is_empty() {
            return Ok(Vec::new());
        }
        let attached = self.attached();
        let listing = attached.listing(ARTIFACT_TYPE).await?;
        let mut found = Vec::new();
        for layer in layers {
            let Some(entry) = listing.entry(ARTIFACT_TYPE, layer) else {
                continue;
            };
            match self.fetch_one(&attached, entry, layer).await {
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

    async fn fetch_one(
        &self,
        attached: &Attached,
        entry: &Descriptor,
        layer: &Digest,
    ) -> Result<Stored, ShareError> {
        let artifact = entry.digest;
        let bad = |why: String| ShareError::BadArtifact { artifact, why };
        let bytes = attached.blob(entry, ARTIFACT_TYPE, MAX_FILE_BYTES).await?;
        let stored: Stored = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        if stored.layer != *layer {
            return Err(bad(format!("its list is for layer {}", stored.layer)));
        }
        Ok(stored)
    }

    /// Publishes a list this node learned. Returns the artifact's digest.
    pub async fn publish(&self, stored: &Stored) -> Result<Option<Digest>, ShareError> {
        let list = Bytes::from(serde_json::to_vec(stored).map_err(ShareError::Encode)?);
        Ok(self
            .attached()
            .publish(ARTIFACT_TYPE, &stored.layer, list)
            .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sharing_parses_its_three_words_only() {
        assert_eq!("use".parse(), Ok(Sharing::Use));
        assert_eq!("publish".parse(), Ok(Sharing::Publish));
        assert_eq!("off".parse(), Ok(Sharing::Off));
        assert!("on".parse::<Sharing>().is_err());
    }
}
