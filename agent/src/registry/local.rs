//! OCI image layouts on local disk (image-layout spec: `oci-layout`, `index.json`,
//! `blobs/sha256/<hex>`), as `skopeo copy ... oci:DIR:TAG` writes them. Reading checks every
//! digest like the registry client does; writing is atomic per file (temp file + rename), so a
//! crash never leaves a blob with the wrong content under its digest.

use std::{
    io::{Read, Write},
    ops::Range,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
};

use async_trait::async_trait;
use bytes::Bytes;

use super::{
    BlobSink, BlobSource, FetchedManifest, MAX_IN_MEMORY_BLOB, RegistryError, check_content,
};
use crate::oci::{
    digest::{Digest, Hasher},
    manifest::{self, Descriptor, Index, MAX_MANIFEST, OCI_INDEX},
};

const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// An OCI image layout directory.
#[derive(Clone, Debug)]
pub struct LocalLayout {
    root: PathBuf,
}

impl LocalLayout {
    /// Opens an existing layout.
    pub fn open(root: &Path) -> Result<Self, RegistryError> {
        let marker = root.join("oci-layout");
        std::fs::metadata(&marker).map_err(|e| RegistryError::io(&marker, e))?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    /// Opens a layout, creating an empty one if `root` does not hold one yet.
    pub fn create(root: &Path) -> Result<Self, RegistryError> {
        let blobs = root.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).map_err(|e| RegistryError::io(&blobs, e))?;
        let layout = Self {
            root: root.to_path_buf(),
        };
        if !root.join("oci-layout").exists() {
            layout.write_atomic(
                &root.join("oci-layout"),
                br#"{"imageLayoutVersion":"1.0.0"}"#,
            )?;
        }
        if !root.join("index.json").exists() {
            let empty = Index {
                schema_version: 2,
                media_type: Some(OCI_INDEX.into()),
                manifests: vec![],
                annotations: Default::default(),
                extra: Default::default(),
            };
            layout.write_index(&empty)?;
        }
        Ok(layout)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    fn read_index(&self) -> Result<Index, RegistryError> {
        let path = self.root.join("index.json");
        let bytes = read_bounded(&path, MAX_MANIFEST as u64)?;
        match manifest::parse(&bytes, OCI_INDEX)? {
            manifest::Document::Index(index) => Ok(index),
            manifest::Document::Manifest(_) => Err(RegistryError::NotAnIndex(path)),
        }
    }

    fn write_index(&self, index: &Index) -> Result<(), RegistryError> {
        let bytes = serde_json::to_vec(index).map_err(RegistryError::Encode)?;
        self.write_atomic(&self.root.join("index.json"), &bytes)
    }

    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<(), RegistryError> {
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            RegistryError::io(path, e)
        })
    }

    fn not_found(&self, what: String) -> RegistryError {
        RegistryError::NotFound {
            what,
            source_name: self.name(),
        }
    }
}

fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, RegistryError> {
    let file = std::fs::File::open(path).map_err(|e| RegistryError::io(path, e))?;
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| RegistryError::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(RegistryError::TooLarge {
            what: path.display().to_string(),
            limit,
        });
    }
    Ok(bytes)
}

#[async_trait]
impl BlobSource for LocalLayout {
    async fn manifest(&self, reference: &str) -> Result<FetchedManifest, RegistryError> {
        let index = self.read_index()?;
        let desc = if let Ok(digest) = reference.parse::<Digest>() {
            index
                .manifests
                .iter()
                .find(|d| d.digest == digest)
                .cloned()
                .map(Ok::<_, RegistryError>)
                .unwrap_or_else(|| {
                    // Not listed (a child of an index, say): the blob itself decides.
                    let path = self.blob_path(&digest);
                    let size = std::fs::metadata(&path)
                        .map_err(|_| self.not_found(format!("manifest {digest}")))?
                        .len();
                    Ok(Descriptor {
                        media_type: String::new(),
                        digest,
                        size,
                        annotations: Default::default(),
                        platform: None,
                        extra: Default::default(),
                    })
                })?
        } else {
            let named: Vec<&Descriptor> = index
                .manifests
                .iter()
                .filter(|d| d.annotations.get(REF_NAME).map(String::as_str) == Some(reference))
                .collect();
            match (named.as_slice(), index.manifests.as_slice()) {
                ([one], _) => (*one).clone(),
                ([], [only]) if reference.is_empty() => only.clone(),
                ([], _) => return Err(self.not_found(format!("image tagged {reference:?}"))),
                _ => {
                    return Err(RegistryError::AmbiguousTag {
                        source_name: self.name(),
                        tag: reference.into(),
                    });
                }
            }
        };
        if desc.size > MAX_MANIFEST as u64 {
            return Err(RegistryError::TooLarge {
                what: format!("manifest {}", desc.digest),
                limit: MAX_MANIFEST as u64,
            });
        }
        let bytes = read_bounded(&self.blob_path(&desc.digest), MAX_MANIFEST as u64)?;
        let actual = Digest::of(&bytes);
        if actual != desc.digest {
            return Err(RegistryError::DigestMismatch {
                what: "manifest".into(),
                expected: desc.digest,
                actual,
            });
        }
        Ok(FetchedManifest {
            bytes: bytes.into(),
            media_type: desc.media_type,
            digest: actual,
        })
    }

    async fn blob(&self, desc: &Descriptor) -> Result<Bytes, RegistryError> {
        if desc.size > MAX_IN_MEMORY_BLOB {
            return Err(RegistryError::TooLarge {
                what: format!("blob {}", desc.digest),
                limit: MAX_IN_MEMORY_BLOB,
            });
        }
        let path = self.blob_path(&desc.digest);
        if !path.exists() {
            return Err(self.not_found(format!("blob {}", desc.digest)));
        }
        let bytes = read_bounded(&path, desc.size)?;
        check_content(desc, &bytes, &format!("blob {}", desc.digest))?;
        Ok(bytes.into())
    }

    async fn blob_to_file(&self, desc: &Descriptor, path: &Path) -> Result<(), RegistryError> {
        let src = self.blob_path(&desc.digest);
        if !src.exists() {
            return Err(self.not_found(format!("blob {}", desc.digest)));
        }
        copy_verified(&src, desc, path)
    }

    async fn read_range(&self, digest: &Digest, range: Range<u64>) -> Result<Bytes, RegistryError> {
        let path = self.blob_path(digest);
        let file =
            std::fs::File::open(&path).map_err(|_| self.not_found(format!("blob {digest}")))?;
        let len = range
            .end
            .checked_sub(range.start)
            .ok_or_else(|| RegistryError::EmptyRange {
                what: path.display().to_string(),
                start: range.start,
                end: range.end,
            })?;
        if len > MAX_IN_MEMORY_BLOB {
            return Err(RegistryError::TooLarge {
                what: format!("range of {digest}"),
                limit: MAX_IN_MEMORY_BLOB,
            });
        }
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, range.start)
            .map_err(|e| RegistryError::io(&path, e))?;
        Ok(buf.into())
    }

    fn name(&self) -> String {
        format!("oci:{}", self.root.display())
    }
}

#[async_trait]
impl BlobSink for LocalLayout {
    async fn has_blob(&self, digest: &Digest) -> Result<bool, RegistryError> {
        Ok(self.blob_path(digest).exists())
    }

    async fn put_blob(&self, desc: &Descriptor, bytes: Bytes) -> Result<(), RegistryError> {
        check_content(desc, &bytes, &format!("blob {}", desc.digest))?;
        self.write_atomic(&self.blob_path(&desc.digest), &bytes)
    }

    async fn put_blob_file(&self, desc: &Descriptor, path: &Path) -> Result<(), RegistryError> {
        let dest = self.blob_path(&desc.digest);
        let tmp = dest.with_extension(format!("tmp-{}", std::process::id()));
        // Copy through the digest check, then rename into place.
        copy_verified(path, desc, &tmp)?;
        std::fs::rename(&tmp, &dest).map_err(|e| RegistryError::io(&dest, e))
    }

    async fn mount_blob(&self, desc: &Descriptor, _from: &str) -> Result<bool, RegistryError> {
        // One layout is one repository: the blob is either here already or not at all.
        self.has_blob(&desc.digest).await
    }

    async fn put_manifest(
        &self,
        tag: Option<&str>,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<Digest, RegistryError> {
        let digest = Digest::of(&bytes);
        self.write_atomic(&self.blob_path(&digest), &bytes)?;
        let mut index = self.read_index()?;
        let mut desc = Descriptor {
            media_type: media_type.to_string(),
            digest,
            size: bytes.len() as u64,
            annotations: Default::default(),
            platform: None,
            extra: Default::default(),
        };
        if let Some(tag) = tag {
            index
                .manifests
                .retain(|d| d.annotations.get(REF_NAME).map(String::as_str) != Some(tag));
            desc.annotations.insert(REF_NAME.into(), tag.into());
        }
        index.manifests.push(desc);
        self.write_index(&index)?;
        Ok(digest)
    }
}

/// Copies `src` to `dst` (synced), checking it has `desc`'s size and digest; on a mismatch
/// `dst` is removed.
fn copy_verified(src: &Path, desc: &Descriptor, dst: &Path) -> Result<(), RegistryError> {
    let input = std::fs::File::open(src).map_err(|e| RegistryError::io(src, e))?;
    let mut out = std::fs::File::create(dst).map_err(|e| RegistryError::io(dst, e))?;
    let mut hasher = Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    // One byte more than expected is enough to tell an oversized source.
    let mut input = input.take(desc.size + 1);
    loop {
        let n = input
            .read(&mut buf)
            .map_err(|e| RegistryError::io(src, e))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(|e| RegistryError::io(dst, e))?;
    }
    out.sync_all().map_err(|e| RegistryError::io(dst, e))?;
    let what = format!("blob {}", desc.digest);
    let result = if total != desc.size {
        Err(RegistryError::SizeMismatch {
            what,
            expected: desc.size,
            actual: total,
        })
    } else {
        let actual = hasher.finish();
        if actual == desc.digest {
            Ok(())
        } else {
            Err(RegistryError::DigestMismatch {
                what,
                expected: desc.digest,
                actual,
            })
        }
    };
    if result.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    result
}

/// A source that serves some blobs from local files and everything else from `base`: how a
/// layer that had to be downloaded whole (and rewritten as eStargz on disk) is read through
/// the same path as the streamed ones.
pub struct WithLocalBlobs {
    base: Option<std::sync::Arc<dyn BlobSource>>,
    local: std::collections::HashMap<Digest, PathBuf>,
}

impl WithLocalBlobs {
    pub fn new(
        base: std::sync::Arc<dyn BlobSource>,
        local: std::collections::HashMap<Digest, PathBuf>,
    ) -> Self {
        Self {
            base: Some(base),
            local,
        }
    }

    /// Only the local blobs; anything else is not found.
    pub fn local_only(local: std::collections::HashMap<Digest, PathBuf>) -> Self {
        Self { base: None, local }
    }

    fn base(&self, what: String) -> Result<&dyn BlobSource, RegistryError> {
        self.base.as_deref().ok_or(RegistryError::NotFound {
            what,
            source_name: "local blobs".into(),
        })
    }
}

#[async_trait]
impl BlobSource for WithLocalBlobs {
    async fn manifest(&self, reference: &str) -> Result<FetchedManifest, RegistryError> {
        self.base(format!("manifest {reference}"))?
            .manifest(reference)
            .await
    }

    async fn blob(&self, desc: &Descriptor) -> Result<Bytes, RegistryError> {
        match self.local.get(&desc.digest) {
            Some(path) => {
                let bytes = read_bounded(path, MAX_IN_MEMORY_BLOB)?;
                check_content(desc, &bytes, &path.display().to_string())?;
                Ok(bytes.into())
            }
            None => self.base(format!("blob {}", desc.digest))?.blob(desc).await,
        }
    }

    async fn blob_to_file(&self, desc: &Descriptor, path: &Path) -> Result<(), RegistryError> {
        match self.local.get(&desc.digest) {
            Some(src) => copy_verified(src, desc, path),
            None => {
                self.base(format!("blob {}", desc.digest))?
                    .blob_to_file(desc, path)
                    .await
            }
        }
    }

    async fn read_range(&self, digest: &Digest, range: Range<u64>) -> Result<Bytes, RegistryError> {
        let Some(path) = self.local.get(digest) else {
            return self
                .base(format!("blob {digest}"))?
                .read_range(digest, range)
                .await;
        };
        let len = range
            .end
            .checked_sub(range.start)
            .ok_or_else(|| RegistryError::EmptyRange {
                what: path.display().to_string(),
                start: range.start,
                end: range.end,
            })?;
        let file = std::fs::File::open(path).map_err(|e| RegistryError::io(path, e))?;
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, range.start)
            .map_err(|e| RegistryError::io(path, e))?;
        Ok(buf.into())
    }

    fn name(&self) -> String {
        let base = self
            .base
            .as_ref()
            .map_or_else(|| "nothing".to_string(), |b| b.name());
        format!("{base} (+{} local layers)", self.local.len())
    }

    fn round_trip(&self) -> Option<std::time::Duration> {
        self.base.as_ref().and_then(|b| b.round_trip())
    }

    async fn referrers(
        &self,
        subject: &Digest,
        artifact_type: &str,
    ) -> Result<Option<Bytes>, RegistryError> {
        match &self.base {
            Some(base) => base.referrers(subject, artifact_type).await,
            None => Ok(None),
        }
    }
}
