//! OCI and Docker v2.2 manifests and image indexes, with platform selection. Parsing is
//! bounded ([`MAX_MANIFEST`]) and strict about what imgstream relies on (digests, sizes, media
//! types); unknown fields are kept so that a rewritten manifest loses nothing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::digest::Digest;

/// Largest manifest or index accepted (the distribution spec suggests registries accept 4 MiB).
pub const MAX_MANIFEST: usize = 4 << 20;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// Media types a manifest request accepts.
pub const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// Errors understanding a manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest of {0} bytes exceeds the {MAX_MANIFEST}-byte limit")]
    TooLarge(usize),
    #[error("manifest is not valid JSON of its media type {media_type}")]
    Parse {
        media_type: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("media type {0:?} is not a manifest or index imgstream understands")]
    UnknownMediaType(String),
    #[error("no manifest in the index matches platform {0}")]
    NoPlatform(String),
    #[error("schemaVersion {0} is not supported (only 2)")]
    SchemaVersion(i64),
}

/// A content descriptor.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Descriptor {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl Descriptor {
    /// The descriptor of `bytes` as content of `media_type`: their digest and size, nothing
    /// else.
    pub fn of(media_type: &str, bytes: &[u8]) -> Self {
        Self {
            media_type: media_type.into(),
            digest: Digest::of(bytes),
            size: bytes.len() as u64,
            annotations: BTreeMap::new(),
            platform: None,
            extra: BTreeMap::new(),
        }
    }
}

/// The platform of an index entry.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl Platform {
    /// The platform this agent runs on (`linux/amd64` here).
    pub fn host() -> Self {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        Self {
            architecture: architecture.into(),
            os: "linux".into(),
            variant: None,
            extra: BTreeMap::new(),
        }
    }

    fn matches(&self, other: &Platform) -> bool {
        self.os == other.os
            && self.architecture == other.architecture
            && (self.variant.is_none() || self.variant == other.variant)
    }
}

/// A platform that is not `OS/ARCH[/VARIANT]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not OS/ARCH[/VARIANT]")]
pub struct PlatformError(String);

impl std::str::FromStr for Platform {
    type Err = PlatformError;

    /// `OS/ARCH[/VARIANT]`, e.g. `linux/amd64` or `linux/arm/v7`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('/').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(PlatformError(s.into()));
        }
        let (os, architecture, variant) = match parts.as_slice() {
            [os, arch] => (os, arch, None),
            [os, arch, variant] => (os, arch, Some(variant.to_string())),
            _ => return Err(PlatformError(s.into())),
        };
        Ok(Self {
            os: os.to_string(),
            architecture: architecture.to_string(),
            variant,
            extra: BTreeMap::new(),
        })
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// An image manifest.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    #[serde(rename = "schemaVersion")]
    pub schema_version: i64,
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// An image index (OCI) or manifest list (Docker).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Index {
    #[serde(rename = "schemaVersion")]
    pub schema_version: i64,
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// A parsed manifest document.
#[derive(Clone, Debug)]
pub enum Document {
    Manifest(Box<Manifest>),
    Index(Index),
}

/// Parses a manifest or index. `media_type` is what the registry said (Content-Type), or
/// empty; the document's own `mediaType` decides when the header is missing or generic.
pub fn parse(bytes: &[u8], media_type: &str) -> Result<Document, ManifestError> {
    if bytes.len() > MAX_MANIFEST {
        return Err(ManifestError::TooLarge(bytes.len()));
    }
    let parse_err = |source| ManifestError::Parse {
        media_type: media_type.to_string(),
        source,
    };
    let declared = if media_type.is_empty() || media_type == "application/json" {
        #[derive(Deserialize)]
        struct Probe {
            #[serde(rename = "mediaType")]
            media_type: Option<String>,
            manifests: Option<serde_json::Value>,
        }
        let probe: Probe = serde_json::from_slice(bytes).map_err(parse_err)?;
        match (probe.media_type, probe.manifests) {
            (Some(t), _) => t,
            (None, Some(_)) => OCI_INDEX.to_string(),
            (None, None) => OCI_MANIFEST.to_string(),
        }
    } else {
        media_type.to_string()
    };
    let document = match declared.as_str() {
        OCI_MANIFEST | DOCKER_MANIFEST => {
            Document::Manifest(serde_json::from_slice(bytes).map_err(parse_err)?)
        }
        OCI_INDEX | DOCKER_LIST => {
            Document::Index(serde_json::from_slice(bytes).map_err(parse_err)?)
        }
        other => {
            return Err(ManifestError::UnknownMediaType(
                other.chars().take(100).collect(),
            ));
        }
    };
    let version = match &document {
        Document::Manifest(m) => m.schema_version,
        Document::Index(i) => i.schema_version,
    };
    if version != 2 {
        return Err(ManifestError::SchemaVersion(version));
    }
    Ok(document)
}

impl Index {
    /// The manifest for `platform`: the first exact match, else the first without a platform.
    pub fn select(&self, platform: &Platform) -> Result<&Descriptor, ManifestError> {
        self.manifests
            .iter()
            .find(|d| d.platform.as_ref().is_some_and(|p| platform.matches(p)))
            .or_else(|| self.manifests.iter().find(|d| d.platform.is_none()))
            .ok_or_else(|| ManifestError::NoPlatform(platform.to_string()))
    }
}

/// Whether a layer media type is a gzip tar (eStargz layers are gzip tars).
pub fn is_gzip_layer(media_type: &str) -> bool {
    matches!(media_type, OCI_LAYER_GZIP | DOCKER_LAYER_GZIP)
}

/// Whether a layer of this media type is a zstd-compressed tar (zstd:chunked ones included).
pub fn is_zstd_layer(media_type: &str) -> bool {
    media_type == OCI_LAYER_ZSTD
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn index_json() -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[
            {{"mediaType":"{OCI_MANIFEST}","digest":"{D}","size":1,"platform":{{"architecture":"arm64","os":"linux","variant":"v8"}}}},
            {{"mediaType":"{OCI_MANIFEST}","digest":"{D}","size":2,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#
        )
    }

    #[test]
    fn selects_the_platform() {
        let Document::Index(index) = parse(index_json().as_bytes(), OCI_INDEX).unwrap() else {
            panic!()
        };
        assert_eq!(index.select(&Platform::host()).unwrap().size, 2);
        let mut arm = Platform::host();
        arm.architecture = "arm64".into();
        assert_eq!(index.select(&arm).unwrap().size, 1);
        arm.architecture = "s390x".into();
        assert!(matches!(
            index.select(&arm),
            Err(ManifestError::NoPlatform(_))
        ));
    }

    #[test]
    fn media_type_from_the_document_when_the_header_is_generic() {
        assert!(matches!(
            parse(index_json().as_bytes(), "application/json").unwrap(),
            Document::Index(_)
        ));
        let manifest = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"{OCI_CONFIG}","digest":"{D}","size":3}},"layers":[],"unknownField":7}}"#
        );
        let Document::Manifest(m) = parse(manifest.as_bytes(), "").unwrap() else {
            panic!()
        };
        assert_eq!(m.extra["unknownField"], 7, "unknown fields are kept");
        let again = serde_json::to_string(&m).unwrap();
        assert!(again.contains("unknownField"));
    }

    #[test]
    fn bad_manifests_are_typed_errors() {
        assert!(matches!(
            parse(&vec![b' '; MAX_MANIFEST + 1], ""),
            Err(ManifestError::TooLarge(_))
        ));
        assert!(matches!(
            parse(b"{", OCI_MANIFEST),
            Err(ManifestError::Parse { .. })
        ));
        assert!(matches!(
            parse(b"{}", "text/html"),
            Err(ManifestError::UnknownMediaType(_))
        ));
        let bad_digest = r#"{"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:nothex","size":3},"layers":[]}"#;
        assert!(matches!(
            parse(bad_digest.as_bytes(), OCI_MANIFEST),
            Err(ManifestError::Parse { .. })
        ));
        let v1 = format!(
            r#"{{"schemaVersion":1,"config":{{"mediaType":"x","digest":"{D}","size":3}},"layers":[]}}"#
        );
        assert!(matches!(
            parse(v1.as_bytes(), OCI_MANIFEST),
            Err(ManifestError::SchemaVersion(1))
        ));
        let negative = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"x","digest":"{D}","size":-3}},"layers":[]}}"#
        );
        assert!(parse(negative.as_bytes(), OCI_MANIFEST).is_err());
    }
}
