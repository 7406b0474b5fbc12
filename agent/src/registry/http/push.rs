//! Writes ([`BlobSink`]), always to the origin: blob uploads (one PUT, or PATCH chunks of
//! [`UPLOAD_CHUNK`] then a PUT), cross-repository mounts, and manifests.

use std::path::Path;

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};

use super::{RegistryClient, UPLOAD_CHUNK, url};
use crate::{
    oci::{
        digest::{Digest, Hasher},
        manifest::Descriptor,
    },
    registry::{BlobSink, RegistryError, check_content},
};

#[async_trait]
impl BlobSink for RegistryClient {
    async fn has_blob(&self, digest: &Digest) -> Result<bool, RegistryError> {
        let url = self.url(self.origin(), &format!("blobs/{digest}"));
        let resp = self
            .send(
                Method::HEAD,
                &url,
                &HeaderMap::new(),
                Bytes::new(),
                &self.scope(true),
            )
            .await?;
        match resp.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(self.error_for(resp, &url, &format!("blob {digest}")).await),
        }
    }

    async fn put_blob(&self, desc: &Descriptor, bytes: Bytes) -> Result<(), RegistryError> {
        check_content(desc, &bytes, &format!("blob {}", desc.digest))?;
        if self.has_blob(&desc.digest).await? {
            return Ok(());
        }
        let location = self
            .start_upload(None, &desc.digest)
            .await?
            .ok_or_else(|| RegistryError::MissingLocation {
                url: self.origin().into(),
                what: "blob upload",
            })?;
        self.finish_upload(&location, &desc.digest, bytes).await
    }

    async fn put_blob_file(&self, desc: &Descriptor, path: &Path) -> Result<(), RegistryError> {
        if self.has_blob(&desc.digest).await? {
            return Ok(());
        }
        let Some(mut location) = self.start_upload(None, &desc.digest).await? else {
            return Err(RegistryError::MissingLocation {
                url: self.origin().into(),
                what: "blob upload",
            });
        };
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(|e| RegistryError::io(path, e))?;
        if desc.size <= UPLOAD_CHUNK {
            let mut bytes = Vec::with_capacity(desc.size as usize);
            tokio::io::AsyncReadExt::read_to_end(&mut file, &mut bytes)
                .await
                .map_err(|e| RegistryError::io(path, e))?;
            check_content(desc, &bytes, &path.display().to_string())?;
            return self
                .finish_upload(&location, &desc.digest, bytes.into())
                .await;
        }
        // Chunked: PATCH each piece with its Content-Range, then PUT the digest.
        let mut sent = 0u64;
        let mut hasher = Hasher::new();
        while sent < desc.size {
            let n = UPLOAD_CHUNK.min(desc.size - sent) as usize;
            let mut chunk = vec![0u8; n];
            tokio::io::AsyncReadExt::read_exact(&mut file, &mut chunk)
                .await
                .map_err(|e| RegistryError::io(path, e))?;
            hasher.update(&chunk);
            let mut headers = HeaderMap::new();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            headers.insert(
                header::CONTENT_RANGE,
                url::header_value(&format!("{}-{}", sent, sent + n as u64 - 1))?,
            );
            let url = url::resolve_or_err(self.origin(), &location)?;
            let resp = self
                .send(
                    Method::PATCH,
                    &url,
                    &headers,
                    chunk.into(),
                    &self.scope(true),
                )
                .await?;
            if resp.status() != StatusCode::ACCEPTED {
                return Err(self.error_for(resp, &url, "blob upload chunk").await);
            }
            location = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| RegistryError::MissingLocation {
                    url: url.clone(),
                    what: "blob upload chunk",
                })?
                .to_string();
            sent += n as u64;
        }
        let actual = hasher.finish();
        if actual != desc.digest {
            return Err(RegistryError::DigestMismatch {
                what: path.display().to_string(),
                expected: desc.digest,
                actual,
            });
        }
        self.finish_upload(&location, &desc.digest, Bytes::new())
            .await
    }

    async fn mount_blob(&self, desc: &Descriptor, from: &str) -> Result<bool, RegistryError> {
        if self.has_blob(&desc.digest).await? {
            return Ok(true);
        }
        match self.start_upload(Some(from), &desc.digest).await? {
            None => {
                tracing::info!(digest = %desc.digest, %from, "blob mounted from another repository");
                Ok(true)
            }
            Some(location) => {
                // The registry opened an upload instead: cancel it; the caller uploads.
                let url = url::resolve_or_err(self.origin(), &location)?;
                let _ = self
                    .send(
                        Method::DELETE,
                        &url,
                        &HeaderMap::new(),
                        Bytes::new(),
                        &self.scope(true),
                    )
                    .await;
                Ok(false)
            }
        }
    }

    async fn put_manifest(
        &self,
        tag: Option<&str>,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<Digest, RegistryError> {
        let digest = Digest::of(&bytes);
        let reference = tag.map_or_else(|| digest.to_string(), str::to_string);
        let url = self.url(self.origin(), &format!("manifests/{reference}"));
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, url::header_value(media_type)?);
        let resp = self
            .send(Method::PUT, &url, &headers, bytes, &self.scope(true))
            .await?;
        if resp.status() != StatusCode::CREATED && !resp.status().is_success() {
            return Err(self.error_for(resp, &url, "manifest upload").await);
        }
        Ok(digest)
    }
}

impl RegistryClient {
    /// POSTs an upload session; with `mount_from`, first asks for a cross-repository mount.
    /// Returns the upload location, or `None` when the blob was mounted.
    async fn start_upload(
        &self,
        mount_from: Option<&str>,
        digest: &Digest,
    ) -> Result<Option<String>, RegistryError> {
        let mut url = self.url(self.origin(), "blobs/uploads/");
        let mut scope = self.scope(true);
        if let Some(from) = mount_from {
            url.push_str(&format!(
                "?mount={digest}&from={}",
                crate::query::encode(from)
            ));
            scope.push_str(&format!(" repository:{from}:pull"));
        }
        let resp = self
            .send(Method::POST, &url, &HeaderMap::new(), Bytes::new(), &scope)
            .await?;
        match resp.status() {
            StatusCode::CREATED if mount_from.is_some() => Ok(None),
            StatusCode::ACCEPTED => resp
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .map(|l| Some(l.to_string()))
                .ok_or_else(|| RegistryError::MissingLocation {
                    url: url.clone(),
                    what: "blob upload",
                }),
            _ => Err(self.error_for(resp, &url, "blob upload").await),
        }
    }

    async fn finish_upload(
        &self,
        location: &str,
        digest: &Digest,
        body: Bytes,
    ) -> Result<(), RegistryError> {
        let base = url::resolve_or_err(self.origin(), location)?;
        let sep = if base.contains('?') { '&' } else { '?' };
        let url = format!(
            "{base}{sep}digest={}",
            crate::query::encode(&digest.to_string())
        );
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        let resp = self
            .send(Method::PUT, &url, &headers, body, &self.scope(true))
            .await?;
        if resp.status() != StatusCode::CREATED {
            return Err(self.error_for(resp, &url, "blob upload").await);
        }
        Ok(())
    }
}
