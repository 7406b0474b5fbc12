//! Reads ([`BlobSource`]): manifests, whole blobs streamed and checked against their digest
//! and size, and byte ranges; each tried on the mirrors, then the origin.

use std::{ops::Range, path::Path, sync::Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};

use super::{Attempt, Fallback, RegistryClient, url};
use crate::{
    oci::{
        digest::{Digest, Hasher},
        manifest::{ACCEPT, Descriptor, MAX_MANIFEST},
    },
    registry::{BlobSource, FetchedManifest, MAX_IN_MEMORY_BLOB, RegistryError, check_content},
};

/// The longest suffix [`BlobSource::read_tail`] asks for.
const MAX_TAIL: u64 = 1 << 20;

/// `out` as an answer when it holds exactly the `expected` bytes of `what`.
fn exactly(
    out: Vec<u8>,
    expected: u64,
    what: impl FnOnce() -> String,
) -> Result<Bytes, RegistryError> {
    if out.len() as u64 != expected {
        return Err(RegistryError::SizeMismatch {
            what: what(),
            expected,
            actual: out.len() as u64,
        });
    }
    Ok(Bytes::from(out))
}

impl RegistryClient {
    /// A whole blob, streamed through `sink` and checked against `desc`; retried from the
    /// start (via `restart`) when the transfer breaks off.
    async fn fetch_blob<S, R>(
        &self,
        desc: &Descriptor,
        mut sink: S,
        mut restart: R,
    ) -> Result<(), RegistryError>
    where
        S: FnMut(&[u8]) -> Result<(), RegistryError> + Send,
        R: FnMut() -> Result<(), RegistryError> + Send,
    {
        let what = format!("blob {}", desc.digest);
        let scope = self.scope(false);
        on_endpoints!(self, |endpoint| {
            let url = self.url(endpoint, &format!("blobs/{}", desc.digest));
            retrying!(self, &url, {
                match restart() {
                    Err(e) => Attempt::Done(Err(e)),
                    Ok(()) => {
                        self.fetch_blob_once(desc, &url, &scope, &what, &mut sink)
                            .await
                    }
                }
            })
        })
    }

    /// One transfer of a whole blob from `url` into `sink`, checked against `desc`. The
    /// request's own failures are final here (`send` has retried them); a transfer that
    /// breaks off or comes short is worth another try.
    async fn fetch_blob_once<S>(
        &self,
        desc: &Descriptor,
        url: &str,
        scope: &str,
        what: &str,
        sink: &mut S,
    ) -> Attempt<Result<(), RegistryError>>
    where
        S: FnMut(&[u8]) -> Result<(), RegistryError> + Send,
    {
        let resp = match self
            .send(Method::GET, url, &HeaderMap::new(), Bytes::new(), scope)
            .await
        {
            Ok(resp) if resp.status().is_success() => resp,
            Ok(resp) => return Attempt::Done(Err(self.error_for(resp, url, what).await)),
            Err(e) => return Attempt::Done(Err(e)),
        };
        let mut hasher = Hasher::new();
        let got = self
            .stream_body(resp, url, desc.size, |data| {
                hasher.update(data);
                sink(data)
            })
            .await;
        Attempt::of(got.and_then(|got| {
            if got != desc.size {
                return Err(RegistryError::SizeMismatch {
                    what: what.into(),
                    expected: desc.size,
                    actual: got,
                });
            }
            let actual = hasher.finish();
            if actual != desc.digest {
                return Err(RegistryError::DigestMismatch {
                    what: what.into(),
                    expected: desc.digest,
                    actual,
                });
            }
            Ok(())
        }))
    }

    /// One range request for `range` of `digest` at `url`: exactly those bytes, from a 206
    /// that starts where asked, or sliced out of a 200 from a server that ignores ranges.
    /// The request's own failures and a wrong range are final here; a body that breaks off
    /// or comes short is worth another try.
    async fn read_range_once(
        &self,
        url: &str,
        headers: &HeaderMap,
        range: &Range<u64>,
        what: &str,
    ) -> Attempt<Result<Bytes, RegistryError>> {
        let len = range.end - range.start;
        let resp = match self.get_ranged(url, headers).await {
            Ok(resp) => resp,
            Err(e) => return Attempt::Done(Err(e)),
        };
        let mut out = Vec::with_capacity(len as usize);
        let streamed = match resp.status() {
            StatusCode::PARTIAL_CONTENT => {
                let start = resp
                    .headers()
                    .get(header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(url::content_range_start);
                if start != Some(range.start) {
                    return Attempt::Done(Err(RegistryError::WrongRange {
                        url: url.into(),
                        asked: range.start,
                        answered: start,
                    }));
                }
                self.stream_body(resp, url, len, |d| {
                    out.extend_from_slice(d);
                    Ok(())
                })
                .await
            }
            StatusCode::OK => {
                // The server ignored Range: keep just the slice, bounded memory.
                let mut at = 0u64;
                self.stream_body(resp, url, u64::MAX, |d| {
                    let (s, e) = (at, at + d.len() as u64);
                    let lo = range.start.max(s);
                    let hi = range.end.min(e);
                    if lo < hi {
                        out.extend_from_slice(&d[(lo - s) as usize..(hi - s) as usize]);
                    }
                    at = e;
                    Ok(())
                })
                .await
            }
            _ => return Attempt::Done(Err(self.error_for(resp, url, what).await)),
        };
        Attempt::of(streamed.and_then(|_| exactly(out, len, || format!("{what} range {range:?}"))))
    }

    /// A pull-scoped GET of `url` with the range in `headers`; its time to the headers counts
    /// as a round trip.
    async fn get_ranged(
        &self,
        url: &str,
        headers: &HeaderMap,
    ) -> Result<http::Response<hyper::body::Incoming>, RegistryError> {
        let asked = std::time::Instant::now();
        let resp = self
            .send(Method::GET, url, headers, Bytes::new(), &self.scope(false))
            .await?;
        self.round_trips.observe(asked.elapsed());
        Ok(resp)
    }

    /// One try of [`BlobSource::read_tail`] at `url`: `None` when the server answers
    /// with the whole blob (it ignored the suffix range).
    async fn read_tail_once(
        &self,
        url: &str,
        headers: &HeaderMap,
        len: u64,
        what: &str,
    ) -> Attempt<Result<Option<(Bytes, u64)>, RegistryError>> {
        let resp = match self.get_ranged(url, headers).await {
            Ok(resp) => resp,
            Err(e) => return Attempt::Done(Err(e)),
        };
        match resp.status() {
            StatusCode::PARTIAL_CONTENT => {}
            // Not read: the body is the whole blob.
            StatusCode::OK => return Attempt::Done(Ok(None)),
            _ => return Attempt::Done(Err(self.error_for(resp, url, what).await)),
        }
        let answered = resp
            .headers()
            .get(header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        // The blob's last `len` bytes (all of it when shorter), and nothing else.
        let range =
            answered
                .as_deref()
                .and_then(url::content_range)
                .filter(|&(start, end, total)| {
                    total > 0
                        && end.checked_add(1) == Some(total)
                        && end.checked_sub(start) == Some(len.min(total) - 1)
                });
        let Some((start, end, total)) = range else {
            return Attempt::Done(Err(RegistryError::WrongTail {
                url: url.into(),
                asked: len,
                answered,
            }));
        };
        let expected = end - start + 1;
        let mut out = Vec::with_capacity(expected as usize);
        let streamed = self
            .stream_body(resp, url, expected, |d| {
                out.extend_from_slice(d);
                Ok(())
            })
            .await;
        Attempt::of(streamed.and_then(|_| {
            let tail = exactly(out, expected, || format!("{what}'s last {len} bytes"))?;
            Ok(Some((tail, total)))
        }))
    }

    /// A pull-scoped GET of `url` that accepts the media types `accept`.
    async fn get_accepting(
        &self,
        url: &str,
        accept: &'static str,
    ) -> Result<http::Response<hyper::body::Incoming>, RegistryError> {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static(accept));
        self.send(Method::GET, url, &headers, Bytes::new(), &self.scope(false))
            .await
    }

    /// One manifest request at `endpoint`, checked against the digest asked for and the one
    /// the registry claims.
    async fn manifest_from(
        &self,
        endpoint: &str,
        reference: &str,
    ) -> Result<FetchedManifest, RegistryError> {
        let url = self.url(endpoint, &format!("manifests/{reference}"));
        let resp = self.get_accepting(&url, ACCEPT).await?;
        if !resp.status().is_success() {
            return Err(self
                .error_for(resp, &url, &format!("manifest {reference}"))
                .await);
        }
        let media_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim().to_string())
            .unwrap_or_default();
        let claimed = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<Digest>().ok());
        let bytes = self.read_small(resp, MAX_MANIFEST as u64, &url).await?;
        let digest = Digest::of(&bytes);
        let by_digest = reference.parse::<Digest>().ok();
        for expected in [by_digest, claimed].into_iter().flatten() {
            if expected != digest {
                return Err(RegistryError::DigestMismatch {
                    what: format!("manifest {reference}"),
                    expected,
                    actual: digest,
                });
            }
        }
        Ok(FetchedManifest {
            bytes,
            media_type,
            digest,
        })
    }
}

#[async_trait]
impl BlobSource for RegistryClient {
    async fn manifest(&self, reference: &str) -> Result<FetchedManifest, RegistryError> {
        on_endpoints!(self, |endpoint| self
            .manifest_from(endpoint, reference)
            .await)
    }

    async fn blob(&self, desc: &Descriptor) -> Result<Bytes, RegistryError> {
        if desc.size > MAX_IN_MEMORY_BLOB {
            return Err(RegistryError::TooLarge {
                what: format!("blob {}", desc.digest),
                limit: MAX_IN_MEMORY_BLOB,
            });
        }
        let buf = Mutex::new(Vec::with_capacity(desc.size as usize));
        self.fetch_blob(
            desc,
            |data| {
                crate::sync::lock(&buf).extend_from_slice(data);
                Ok(())
            },
            || {
                crate::sync::lock(&buf).clear();
                Ok(())
            },
        )
        .await?;
        let bytes = buf
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        check_content(desc, &bytes, &format!("blob {}", desc.digest))?;
        Ok(bytes.into())
    }

    async fn blob_to_file(&self, desc: &Descriptor, path: &Path) -> Result<(), RegistryError> {
        let file = std::fs::File::create(path).map_err(|e| RegistryError::io(path, e))?;
        let file = Mutex::new(file);
        self.fetch_blob(
            desc,
            |data| {
                use std::io::Write;
                crate::sync::lock(&file)
                    .write_all(data)
                    .map_err(|e| RegistryError::io(path, e))
            },
            || {
                use std::io::Seek;
                let mut f = crate::sync::lock(&file);
                f.set_len(0)
                    .and_then(|()| f.rewind())
                    .map_err(|e| RegistryError::io(path, e))
            },
        )
        .await?;
        file.into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .sync_all()
            .map_err(|e| RegistryError::io(path, e))
    }

    async fn referrers(
        &self,
        subject: &Digest,
        artifact_type: &str,
    ) -> Result<Option<Bytes>, RegistryError> {
        // Asked of the origin only: a mirror that lacks the API would hide the origin's.
        let url = self.url(
            self.origin(),
            &format!(
                "referrers/{subject}?artifactType={}",
                crate::query::encode(artifact_type)
            ),
        );
        let resp = self
            .get_accepting(&url, crate::oci::manifest::OCI_INDEX)
            .await?;
        let status = resp.status();
        let index = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with(crate::oci::manifest::OCI_INDEX));
        // The spec: a registry without the API answers 404 (or, behind some proxies, 400 or
        // 405); one with it answers an image index, even an empty one.
        if !status.is_success() || !index {
            if status.is_success()
                || [
                    StatusCode::NOT_FOUND,
                    StatusCode::BAD_REQUEST,
                    StatusCode::METHOD_NOT_ALLOWED,
                ]
                .contains(&status)
            {
                return Ok(None);
            }
            return Err(self
                .error_for(resp, &url, &format!("referrers of {subject}"))
                .await);
        }
        self.read_small(resp, MAX_MANIFEST as u64, &url)
            .await
            .map(Some)
    }

    async fn preconnect(&self, n: usize) {
        self.preconnect_to_first_endpoint(n).await;
    }

    async fn read_tail(
        &self,
        digest: &Digest,
        len: u64,
    ) -> Result<Option<(Bytes, u64)>, RegistryError> {
        if len == 0 || len > MAX_TAIL {
            return Ok(None);
        }
        let what = format!("blob {digest}");
        let mut headers = HeaderMap::new();
        headers.insert(header::RANGE, url::header_value(&format!("bytes=-{len}"))?);
        on_endpoints!(self, |endpoint| {
            let url = self.url(endpoint, &format!("blobs/{digest}"));
            retrying!(self, &url, {
                self.read_tail_once(&url, &headers, len, &what).await
            })
        })
    }

    async fn read_range(&self, digest: &Digest, range: Range<u64>) -> Result<Bytes, RegistryError> {
        let len = range.end.checked_sub(range.start).filter(|&l| l > 0);
        let Some(len) = len else {
            return Err(RegistryError::EmptyRange {
                what: format!("blob {digest}"),
                start: range.start,
                end: range.end,
            });
        };
        if len > MAX_IN_MEMORY_BLOB {
            return Err(RegistryError::TooLarge {
                what: format!("range of {digest}"),
                limit: MAX_IN_MEMORY_BLOB,
            });
        }
        let what = format!("blob {digest}");
        let mut headers = HeaderMap::new();
        headers.insert(
            header::RANGE,
            url::header_value(&format!("bytes={}-{}", range.start, range.end - 1))?,
        );
        on_endpoints!(self, |endpoint| {
            let url = self.url(endpoint, &format!("blobs/{digest}"));
            retrying!(self, &url, {
                self.read_range_once(&url, &headers, &range, &what).await
            })
        })
    }

    fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    fn round_trip(&self) -> Option<std::time::Duration> {
        self.round_trips.min()
    }
}
